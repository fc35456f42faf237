//! The domain error. Each API dialect maps it to HTTP in exactly one place.

/// What went wrong, classified by who has to act: the caller (4xx) or us (`Internal`, `Unavailable`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidRequest(String),
    /// The request is well-formed but the object's current state does not allow it.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Unavailable(String),
    /// Too many attempts (login throttling): the caller may try again after `retry_after_secs`.
    #[error("{message}")]
    TooManyRequests { message: String, retry_after_secs: u64 },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn not_found(kind: &'static str, id: impl ToString) -> Self {
        Error::NotFound { kind, id: id.to_string() }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::InvalidRequest(msg.into())
    }
    pub fn conflict(msg: impl Into<String>) -> Self {
        Error::Conflict(msg.into())
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        Error::Internal(msg.into())
    }
    /// When the caller should try again, in seconds (the `Retry-After` header), if the error says.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Error::TooManyRequests { retry_after_secs, .. } => Some(*retry_after_secs),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its sources, joined with ": " (what an operator needs in a log line or message).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}
