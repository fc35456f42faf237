//! The one place where the Recovery Orchestrator dialect turns errors into HTTP.
//!
//! Every body is `{"errorCode", "message", "resourceId"}` (spec 1.2), with `errorCode` one of
//! [`ErrorCode`]. drover's domain [`Error`] is mapped here and nowhere else; request rejections
//! (bad JSON, wrong types, bad query parameters) are 400s; unknown routes 404, wrong methods
//! 405. Only an unclassified error is a 500; it is logged with its chain under a reference that
//! the client gets instead (`drover_api::error::client_message`). A 503 carries `Retry-After`.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use drover_types::Error;
use serde::Serialize;
use utoipa::ToSchema;

/// The dialect's error codes (those of the Backup & Replication REST API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum ErrorCode {
    AccessDenied,
    ExpiredToken,
    InvalidToken,
    #[serde(rename = "InvalidURI")]
    InvalidUri,
    MethodNotAllowed,
    NotFound,
    NotImplemented,
    ServiceUnavailable,
    UnexpectedContent,
    UnknownError,
    Conflict,
}

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub error_code: ErrorCode,
    /// What is wrong, for a person.
    pub message: String,
    /// The id the error is about, when there is one; otherwise empty.
    pub resource_id: String,
}

/// An error of this dialect: a domain error, or one that only HTTP knows about.
#[derive(Debug)]
pub enum VroError {
    Domain(Error),
    /// The bearer token is missing, malformed, unknown or expired.
    Token {
        expired: bool,
        message: String,
    },
    /// The token endpoint refused the credentials.
    Credentials(String),
    /// The request body is not what the endpoint takes.
    Body(String),
    /// The query string or path cannot be understood.
    Uri(String),
    NoRoute,
    MethodNotAllowed,
    /// `POST /Plans/{planId}/<name>` where `<name>` is no action of the product.
    UnknownAction(String),
    /// An action of the product that does not apply to this plan (its type, in drover always
    /// `Replica`).
    ActionNotForPlan {
        plan_id: uuid::Uuid,
        message: String,
    },
}

impl From<Error> for VroError {
    fn from(e: Error) -> Self {
        VroError::Domain(e)
    }
}

pub type VroResult<T> = Result<T, VroError>;

impl VroError {
    pub fn parts(&self) -> (StatusCode, ErrorCode, String, String) {
        use ErrorCode as C;
        let none = String::new;
        match self {
            VroError::Domain(e) => {
                let (status, code) = match e {
                    Error::NotFound { .. } => (StatusCode::NOT_FOUND, C::NotFound),
                    Error::AlreadyExists(_) | Error::Conflict(_) => (StatusCode::CONFLICT, C::Conflict),
                    Error::InvalidRequest(_) => (StatusCode::BAD_REQUEST, C::UnexpectedContent),
                    Error::Unauthorized(_) => (StatusCode::UNAUTHORIZED, C::InvalidToken),
                    Error::Forbidden(_) => (StatusCode::FORBIDDEN, C::AccessDenied),
                    Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, C::ServiceUnavailable),
                    Error::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, C::AccessDenied),
                    Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, C::UnknownError),
                };
                let resource = match e {
                    Error::NotFound { id, .. } => id.clone(),
                    _ => none(),
                };
                (status, code, e.to_string(), resource)
            }
            VroError::Token { expired, message } => {
                let code = if *expired { C::ExpiredToken } else { C::InvalidToken };
                (StatusCode::UNAUTHORIZED, code, message.clone(), none())
            }
            VroError::Credentials(m) => (StatusCode::UNAUTHORIZED, C::AccessDenied, m.clone(), none()),
            VroError::Body(m) => (StatusCode::BAD_REQUEST, C::UnexpectedContent, m.clone(), none()),
            VroError::Uri(m) => (StatusCode::BAD_REQUEST, C::InvalidUri, m.clone(), none()),
            VroError::NoRoute => (StatusCode::NOT_FOUND, C::NotFound, "no resource at this path".into(), none()),
            VroError::UnknownAction(m) => (StatusCode::BAD_REQUEST, C::InvalidUri, m.clone(), none()),
            VroError::ActionNotForPlan { plan_id, message } => {
                (StatusCode::CONFLICT, C::Conflict, message.clone(), plan_id.to_string())
            }
            VroError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                C::MethodNotAllowed,
                "this path does not take that method".into(),
                none(),
            ),
        }
    }
}

impl IntoResponse for VroError {
    fn into_response(self) -> Response {
        let (status, error_code, mut message, resource_id) = self.parts();
        let mut retry_after = None;
        if let VroError::Domain(e) = &self {
            // An internal error's chain is logged under a reference; the client gets the reference.
            (message, retry_after) = drover_api::error::client_message(e, "Recovery Orchestrator");
        }
        let mut resp = (status, axum::Json(ErrorBody { error_code, message, resource_id })).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(after) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, after);
        }
        resp
    }
}

impl From<JsonRejection> for VroError {
    fn from(r: JsonRejection) -> Self {
        VroError::Body(format!("bad request body: {}", r.body_text()))
    }
}

impl From<QueryRejection> for VroError {
    fn from(r: QueryRejection) -> Self {
        VroError::Uri(format!("bad query: {}", r.body_text()))
    }
}

/// `axum::Query` whose rejection is this dialect's 400.
#[derive(Debug, FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(VroError))]
pub struct Query<T>(pub T);

/// `axum::Json` whose rejection is this dialect's 400.
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(VroError))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

/// The raw request body, whose rejection (unreadable, or over the size limit) is this
/// dialect's 400.
#[derive(Debug)]
pub struct Body(pub axum::body::Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = VroError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::body::Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|r| VroError::Body(format!("cannot read the request body: {}", r.body_text())))
    }
}

/// An optional JSON body: empty means `T::default()`; anything else must parse as `T`.
pub fn body_or_default<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> VroResult<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| VroError::Body(format!("bad request body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_errors_map_to_the_dialects_codes() {
        let cases = [
            (Error::not_found("plan", "p1"), 404, "NotFound", "p1"),
            (Error::conflict("busy"), 409, "Conflict", ""),
            (Error::AlreadyExists("x".into()), 409, "Conflict", ""),
            (Error::invalid("bad"), 400, "UnexpectedContent", ""),
            (Error::Unauthorized("no".into()), 401, "InvalidToken", ""),
            (Error::Forbidden("role".into()), 403, "AccessDenied", ""),
            (Error::Unavailable("later".into()), 503, "ServiceUnavailable", ""),
            (Error::internal("bug"), 500, "UnknownError", ""),
        ];
        for (e, status, code, resource) in cases {
            let (s, c, _, r) = VroError::from(e).parts();
            assert_eq!((s.as_u16(), serde_json::to_value(c).unwrap(), r.as_str()), (status, code.into(), resource));
        }
        let (s, c, ..) = VroError::Token { expired: true, message: String::new() }.parts();
        assert_eq!((s.as_u16(), c), (401, ErrorCode::ExpiredToken));
        assert_eq!(serde_json::to_value(ErrorCode::InvalidUri).unwrap(), "InvalidURI");
        let (s, c, _, r) = VroError::UnknownAction("x".into()).parts();
        assert_eq!((s.as_u16(), c, r.as_str()), (400, ErrorCode::InvalidUri, ""));
        let plan_id = uuid::Uuid::new_v4();
        let (s, c, _, r) = VroError::ActionNotForPlan { plan_id, message: "m".into() }.parts();
        assert_eq!((s.as_u16(), c, r), (409, ErrorCode::Conflict, plan_id.to_string()));
    }

    async fn body_of(resp: Response) -> serde_json::Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn an_internal_error_gives_the_client_a_reference_not_the_chain() {
        let resp = VroError::from(Error::internal("store: no such table: sessions")).into_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = body_of(resp).await;
        assert_eq!(body["errorCode"], "UnknownError");
        let message = body["message"].as_str().unwrap();
        let reference = message.strip_prefix("internal error; reference ").expect(message);
        assert!(uuid::Uuid::parse_str(reference).is_ok(), "{message}");
        assert!(!message.contains("sessions"), "{message}");
    }

    #[tokio::test]
    async fn a_503_says_when_to_retry() {
        let resp = VroError::from(Error::Unavailable("busy".into())).into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        assert_eq!(
            body_of(resp).await,
            serde_json::json!({"errorCode": "ServiceUnavailable", "message": "busy", "resourceId": ""})
        );
    }

    #[test]
    fn an_empty_body_is_the_default_and_a_bad_one_is_400() {
        #[derive(Debug, Default, serde::Deserialize, PartialEq)]
        struct B {
            flag: Option<bool>,
        }
        assert_eq!(body_or_default::<B>(b" \n").unwrap(), B::default());
        assert_eq!(body_or_default::<B>(br#"{"flag": true}"#).unwrap(), B { flag: Some(true) });
        for bad in [&b"{"[..], br#"{"flag": "yes"}"#, b"[]"] {
            let (s, c, ..) = body_or_default::<B>(bad).unwrap_err().parts();
            assert_eq!((s.as_u16(), c), (400, ErrorCode::UnexpectedContent));
        }
    }
}
