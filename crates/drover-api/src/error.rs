//! The one place where the native API turns errors into HTTP.
//!
//! Every handler returns `Result<_, ApiError>`. Domain errors map to their status; request
//! rejections (bad JSON, wrong types, malformed ids) are 400 with axum's explanation; anything
//! unclassified is a 500 that is logged with its chain under a reference (a UUID) that the client
//! gets instead of the chain ([`internal_message`], shared by the Veeam dialects). A 503 carries
//! `Retry-After`. Bad input never becomes a 500.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use drover_types::Error;
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// A stable code: `not_found`, `already_exists`, `invalid_request`, `conflict`,
    /// `unauthorized`, `forbidden`, `unavailable`, `internal`.
    #[schema(schema_with = crate::openapi::error_code)]
    pub error: &'static str,
    /// What is wrong, for a person.
    pub message: String,
}

#[derive(Debug)]
pub struct ApiError(pub Error);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError(e)
    }
}

pub fn status_of(e: &Error) -> (StatusCode, &'static str) {
    match e {
        Error::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
        Error::AlreadyExists(_) => (StatusCode::CONFLICT, "already_exists"),
        Error::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        Error::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
        Error::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        Error::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests"),
        Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

/// How long a client should wait before retrying a 503 (`Retry-After`, in seconds). A 503 means
/// a bounded resource is full (the password-hashing queue, the database's connections) and frees
/// up within about that.
pub const RETRY_AFTER_SECS: u32 = 1;

/// The message a client gets for an unclassified error, in every dialect: a reference to the log
/// line, which has the whole chain. The chain itself (paths, SQL, internal names) is for the
/// operator, not for whoever sent the request.
pub fn internal_message(error: &Error, api: &'static str) -> String {
    let reference = uuid::Uuid::new_v4();
    tracing::error!(%reference, api, error = %error, "request failed with an internal error");
    format!("internal error; reference {reference}")
}

/// The message of an error for the client (the reference for an `Internal`, logging it; the
/// error's own text otherwise), and the `Retry-After` a 503 or a 429 carries.
pub fn client_message(error: &Error, api: &'static str) -> (String, Option<axum::http::HeaderValue>) {
    match error {
        Error::Internal(_) => (internal_message(error, api), None),
        Error::Unavailable(_) => {
            tracing::warn!(api, error = %error, "request refused: unavailable");
            (error.to_string(), Some(axum::http::HeaderValue::from(RETRY_AFTER_SECS)))
        }
        // Login throttling says when to come back.
        _ => (error.to_string(), error.retry_after_secs().map(axum::http::HeaderValue::from)),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = status_of(&self.0);
        let (message, retry_after) = client_message(&self.0, "native");
        let mut resp = (status, axum::Json(ErrorBody { error: code, message })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        if let Some(after) = retry_after {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, after);
        }
        resp
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        ApiError(Error::invalid(format!("bad request body: {}", r.body_text())))
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError(Error::invalid(format!("bad path: {}", r.body_text())))
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError(Error::invalid(format!("bad query: {}", r.body_text())))
    }
}

/// `axum::Json` whose rejection is our 400.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(resp: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn an_internal_error_gives_the_client_a_reference_not_the_chain() {
        let chain = "store: error returned from database: no such table: sessions";
        let resp = ApiError(Error::internal(chain)).into_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = body_of(resp).await;
        assert_eq!(body["error"], "internal");
        let message = body["message"].as_str().unwrap();
        let reference = message.strip_prefix("internal error; reference ").expect(message);
        assert!(uuid::Uuid::parse_str(reference).is_ok(), "{message}");
        assert!(!message.contains("sessions") && !message.contains("database"), "{message}");
        // A new reference each time, so a log line names one request.
        let again = body_of(ApiError(Error::internal(chain)).into_response()).await;
        assert_ne!(again["message"], body["message"]);
    }

    #[tokio::test]
    async fn a_503_says_when_to_retry_and_other_errors_keep_their_message() {
        let resp = ApiError(Error::Unavailable("the password checks are all busy".into())).into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[axum::http::header::RETRY_AFTER], "1");
        assert_eq!(body_of(resp).await["message"], "the password checks are all busy");
        let resp = ApiError(Error::invalid("name is empty")).into_response();
        assert!(resp.headers().get(axum::http::header::RETRY_AFTER).is_none());
        assert_eq!(body_of(resp).await["message"], "name is empty");
    }
}
