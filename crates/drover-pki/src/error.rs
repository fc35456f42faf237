//! The crate's one error type, with the class the HTTP layer maps it by ([`PkiError::kind`]).

use std::path::PathBuf;

/// What an error means to whoever asked: the HTTP layer maps each kind to one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PkiErrorKind {
    /// The input is malformed, too large or refused on its face (400).
    BadRequest,
    /// The caller did not prove who it is: a wrong, used or misdirected token, or a certificate
    /// this control plane did not issue (401).
    Unauthorized,
    /// A token (or a certificate) that was good once and is no longer (401 with its own message;
    /// the agent is told to ask for a new token rather than to retry).
    Expired,
    /// Our own files, keys or configuration are wrong (500, logged with its chain).
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{what} is larger than {limit} bytes")]
    TooLarge { what: &'static str, limit: usize },
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    /// The CSR does not parse, is not self-consistent (its signature does not verify with the key
    /// it carries) or uses an algorithm or extension we do not take.
    #[error("certificate signing request refused")]
    CsrRefused(#[source] rcgen::Error),
    /// The token's secret does not match the stored hash.
    #[error("enrolment token not valid")]
    TokenInvalid,
    /// The token is good, but it was issued for another host.
    #[error("enrolment token was issued for another host")]
    TokenHostMismatch,
    #[error("enrolment token has already been used")]
    TokenConsumed,
    #[error("enrolment token expired at {0}")]
    TokenExpired(drover_types::Timestamp),
    /// A certificate is not signed by the CA we trust, is expired, or names no drover identity.
    #[error("certificate not trusted: {0}")]
    Untrusted(String),
    /// The CA certificate does not have the fingerprint the enrolment token pins.
    #[error("the control plane's CA does not match the enrolment token's fingerprint")]
    CaPinMismatch,
    #[error("{} is not private: mode {mode:o} (expected {expected:o})", path.display())]
    InsecurePermissions { path: PathBuf, mode: u32, expected: u32 },
    #[error("{} does not hold what it should: {reason}", path.display())]
    CorruptFile { path: PathBuf, reason: String },
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("certificate generation failed")]
    Certificate(#[source] rcgen::Error),
    #[error("TLS configuration failed")]
    Tls(#[source] rustls::Error),
    #[error("TLS client verifier configuration failed")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

impl PkiError {
    pub fn kind(&self) -> PkiErrorKind {
        match self {
            PkiError::TooLarge { .. } | PkiError::Malformed { .. } | PkiError::CsrRefused(_) => {
                PkiErrorKind::BadRequest
            }
            PkiError::TokenInvalid
            | PkiError::TokenHostMismatch
            | PkiError::TokenConsumed
            | PkiError::Untrusted(_)
            | PkiError::CaPinMismatch => PkiErrorKind::Unauthorized,
            PkiError::TokenExpired(_) => PkiErrorKind::Expired,
            PkiError::InsecurePermissions { .. }
            | PkiError::CorruptFile { .. }
            | PkiError::Io { .. }
            | PkiError::Certificate(_)
            | PkiError::Tls(_)
            | PkiError::Verifier(_) => PkiErrorKind::Internal,
        }
    }

    pub(crate) fn malformed(what: &'static str, reason: impl std::fmt::Display) -> Self {
        PkiError::Malformed { what, reason: reason.to_string() }
    }

    pub(crate) fn io(op: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_path_buf();
        move |source| PkiError::Io { op, path, source }
    }
}

/// The domain error, for callers that speak it. An expired token is an `Unauthorized` there: the
/// domain has no separate class, and the message says which it was.
impl From<PkiError> for drover_types::Error {
    fn from(e: PkiError) -> Self {
        match e.kind() {
            PkiErrorKind::BadRequest => drover_types::Error::InvalidRequest(e.to_string()),
            PkiErrorKind::Unauthorized | PkiErrorKind::Expired => drover_types::Error::Unauthorized(e.to_string()),
            // The chain stays out of the message (it reaches clients): the caller logs it.
            PkiErrorKind::Internal => drover_types::Error::Internal(e.to_string()),
        }
    }
}

pub type Result<T, E = PkiError> = std::result::Result<T, E>;
