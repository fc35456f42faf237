//! The one place where the native API turns errors into HTTP.
//!
//! Every handler returns `Result<_, ApiError>`. Domain errors map to their status; request
//! rejections (bad JSON, wrong types, malformed ids) are 400 with axum's explanation; anything
//! unclassified is a 500 that is logged with its chain. Bad input never becomes a 500.

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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = status_of(&self.0);
        if status.is_server_error() {
            tracing::error!(error = %self.0, "request failed");
        }
        let mut resp = (status, axum::Json(ErrorBody { error: code, message: self.0.to_string() })).into_response();
        if let Some(secs) = self.0.retry_after_secs() {
            resp.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
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
