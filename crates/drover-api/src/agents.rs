//! The routes agents call on the control plane (its agent listener, `drover serve
//! --agent-listen`): today, enrolment. They are not under `/v1` and take no user token: an
//! enrolling agent proves itself with its one-time token, and the listener's TLS identity comes
//! from the control plane's own CA, which the agent pins by the fingerprint in its token.

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use serde::{Deserialize, Serialize};

use crate::ApiState;
use crate::error::{ApiResult, Json};

/// What `drover agent --enroll` sends.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolRequest {
    /// The one-time token the administrator got from `POST /v1/hosts/{id}/enrolment`.
    pub token: String,
    /// A PKCS#10 certificate request for the agent's new key (its names are ignored: the
    /// certificate names the token's host).
    pub csr_pem: String,
}

/// The agent's certificate.
#[derive(Debug, Deserialize, Serialize)]
pub struct EnrolResponse {
    pub host_id: uuid::Uuid,
    pub certificate_pem: String,
    /// The control plane's CA: the agent trusts it, and only it, from now on.
    pub ca_pem: String,
}

/// The largest enrolment request: a token and a CSR are a few KiB.
pub const MAX_ENROL_BODY: usize = 64 << 10;

/// The agent listener's routes.
pub fn router(app: drover_engine::app::App) -> Router {
    Router::new()
        .route("/agent/v1/enrol", post(enrol))
        .fallback(crate::not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_ENROL_BODY))
        .with_state(ApiState { app })
}

async fn enrol(State(st): State<ApiState>, Json(r): Json<EnrolRequest>) -> ApiResult<Json<EnrolResponse>> {
    let enrolled = st.app.engine().enrol(&r.token, &r.csr_pem).await?;
    Ok(Json(EnrolResponse {
        host_id: enrolled.host_id.0,
        certificate_pem: enrolled.certificate.certificate_pem,
        ca_pem: enrolled.certificate.ca_pem,
    }))
}
