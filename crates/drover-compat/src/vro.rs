//! The Recovery Orchestrator dialect (spec `veeam-compat.md` section 1): JSON under `/api/v3`
//! and the version aliases `v4` … `v13.1`, tokens at `/api/token` and `/token`.
//!
//! A thin facade over [`App`]: the plans, sessions and state machines are the application
//! layer's, and this module only translates. [`error`] is the one place errors become HTTP,
//! [`views`] holds the wire types, [`collection`] the `{"total","data"}` envelope with its
//! `start`/`limit`/`filter`/`sort` parameters, [`handlers`] the thin handlers. Actions answer
//! 200 with an empty body (typed `application/json`, `Content-Length: 0`, see
//! [`crate::headers`]) once accepted, except `ReadinessCheck`, which names the session that runs
//! the check; progress is read from `RuntimeDetails`.
//!
//! Decisions of this dialect beyond the spec:
//! - `POST /Plans/{planId}/<name>` for an action of the product that drover does not serve
//!   (`Restore` and `MalwareScan`, which apply to restore plans only, and `Clone`) is 409
//!   `Conflict` naming the plan; a name that is no action of the product is 400 `InvalidURI`.
//! - `/Scopes` lists one scope, the caller's tenant; license usage counts the distinct VMs of the
//!   caller's plans (`newInstances` is always 0: drover has no license).
//! - `recoveryLocationName` is never null: a location in use cannot be deleted.
//! - The built-in Original VM Location has the nil UUID (`00000000-0000-0000-0000-000000000000`,
//!   the value of the seed's example) in every tenant; failback there syncs back into the
//!   original VMs, failback to any other location makes full copies as new VMs.
//! - `siteScopeId`/`siteScopeName` are the caller's tenant; `serverId` is [`views::SERVER_ID`].
//! - A path id that is not a UUID names nothing: 404 `NotFound`, like an unknown id.
//! - Wrong credentials at the token endpoint are 401 `AccessDenied`; a missing or unknown bearer
//!   token, and a spent or unknown refresh token, are 401 `InvalidToken`; an expired bearer token
//!   is 401 `ExpiredToken`.
//! - A client of `client_credentials` is a user of the caller's tenant named `client:<id>` (a
//!   name no API can give a person), so administrators see and delete clients like users.

use axum::Router;
use axum::extract::FromRequestParts;
use axum::extract::rejection::PathRejection;
use axum::http::request::Parts;
use axum::routing::{get, post};
use drover_api::BearerScheme;
use drover_api::openapi::ErrorResponses;
use drover_engine::app::{App, Caller};
use utoipa::OpenApi;

pub mod collection;
pub mod error;
pub mod handlers;
pub mod views;

use error::VroError;

/// The version segments served besides `v3`, all by the same handlers.
pub const VERSION_ALIASES: [&str; 9] = ["v4", "v5", "v6", "v7", "v7.1", "v7.2", "v7.21", "v13", "v13.1"];

#[derive(Clone, Debug)]
pub struct VroState {
    pub app: App,
}

/// The authenticated caller, from `Authorization: Bearer <access_token>`.
#[derive(Debug, Clone)]
pub struct Auth(pub Caller);

impl FromRequestParts<VroState> for Auth {
    type Rejection = VroError;

    async fn from_request_parts(parts: &mut Parts, state: &VroState) -> Result<Self, Self::Rejection> {
        let invalid = |m: &str| VroError::Token { expired: false, message: m.to_string() };
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| invalid("missing Authorization: Bearer <access_token>"))?;
        let value = header.to_str().map_err(|_| invalid("malformed Authorization header"))?;
        let token = value
            .get(..7)
            .filter(|p| p.eq_ignore_ascii_case("bearer "))
            .map(|_| value[7..].trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| invalid("Authorization must be Bearer <access_token>"))?;
        match state.app.authenticate(token).await {
            Ok(c) => {
                drover_api::audit::note_caller(parts, &c);
                Ok(Auth(c))
            }
            Err(drover_types::Error::Unauthorized(m)) => match state.app.token_expired(token).await {
                Ok(true) => Err(VroError::Token { expired: true, message: "the access token has expired".into() }),
                _ => Err(invalid(&m)),
            },
            Err(e) => Err(e.into()),
        }
    }
}

impl From<PathRejection> for VroError {
    fn from(r: PathRejection) -> Self {
        VroError::Uri(format!("bad path: {}", r.body_text()))
    }
}

/// `axum::extract::Path` whose rejection is this dialect's 400.
#[derive(Debug, axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(VroError))]
pub struct Path<T>(pub T);

#[derive(OpenApi)]
#[openapi(
    info(title = "drover: Recovery Orchestrator dialect",
        description = "The Veeam Recovery Orchestrator REST API (v3; v4 to v13.1 are aliases) served by drover. \
            Collections are {\"total\",\"data\"}; errors are {\"errorCode\",\"message\",\"resourceId\"}."),
    paths(
        handlers::token, handlers::clients_create,
        handlers::plans_list, handlers::plans_get,
        handlers::plan_groups, handlers::plan_group_vms, handlers::plan_group_steps, handlers::plan_vm_steps,
        handlers::plan_step_parameters,
        handlers::plans_enable, handlers::plans_disable, handlers::plans_readiness_check, handlers::plans_failover,
        handlers::plans_permanent_failover, handlers::plans_prepare_to_failback, handlers::plans_failback,
        handlers::plans_switchover, handlers::plans_commit_failback, handlers::plans_undo, handlers::plans_halt,
        handlers::plans_continue, handlers::plans_reset,
        handlers::runtime_plan, handlers::runtime_groups, handlers::runtime_group_vms, handlers::runtime_vm_steps,
        handlers::runtime_step,
        handlers::locations_list, handlers::locations_get,
        handlers::scopes_list, handlers::license_usage_server, handlers::license_usage_server_later,
        handlers::plan_license_usage,
    ),
    modifiers(&BearerScheme, &ErrorResponses)
)]
#[derive(Debug)]
pub struct VroApiDoc;

async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(VroApiDoc::openapi())
}

async fn no_route() -> VroError {
    VroError::NoRoute
}

/// The routes under one version segment.
fn versioned() -> Router<VroState> {
    use handlers as h;
    Router::new()
        .route("/openapi.json", get(openapi_json))
        .route("/Clients", post(h::clients_create))
        .route("/Plans", get(h::plans_list))
        .route("/Plans/{planId}", get(h::plans_get))
        .route("/Plans/{planId}/Groups", get(h::plan_groups))
        .route("/Plans/{planId}/Groups/{groupId}/Vms", get(h::plan_group_vms))
        .route("/Plans/{planId}/Groups/{groupId}/Steps", get(h::plan_group_steps))
        .route("/Plans/{planId}/Vms/{vmId}/Steps", get(h::plan_vm_steps))
        .route("/Plans/{planId}/Steps/{stepId}/Parameters", get(h::plan_step_parameters))
        .route("/Plans/{planId}/Enable", post(h::plans_enable))
        .route("/Plans/{planId}/Disable", post(h::plans_disable))
        .route("/Plans/{planId}/ReadinessCheck", post(h::plans_readiness_check))
        .route("/Plans/{planId}/Failover", post(h::plans_failover))
        .route("/Plans/{planId}/PermanentFailover", post(h::plans_permanent_failover))
        .route("/Plans/{planId}/PrepareToFailback", post(h::plans_prepare_to_failback))
        .route("/Plans/{planId}/FailbackToProduction", post(h::plans_failback))
        .route("/Plans/{planId}/SwitchoverToProduction", post(h::plans_switchover))
        .route("/Plans/{planId}/CommitFailback", post(h::plans_commit_failback))
        .route("/Plans/{planId}/Undo", post(h::plans_undo))
        .route("/Plans/{planId}/Halt", post(h::plans_halt))
        .route("/Plans/{planId}/Continue", post(h::plans_continue))
        .route("/Plans/{planId}/ResetState", post(h::plans_reset))
        .route("/Plans/{planId}/LicenseUsage", get(h::plan_license_usage))
        // Every other name after the plan: an action the product has but drover does not serve
        // (409), or none (400); any other method finds nothing there (404).
        .route("/Plans/{planId}/{action}", post(h::plans_other_action).fallback(no_route))
        .route("/RuntimeDetails/Plans/{planId}", get(h::runtime_plan))
        .route("/RuntimeDetails/Plans/{planId}/Groups", get(h::runtime_groups))
        .route("/RuntimeDetails/Plans/{planId}/Groups/{groupId}", get(h::runtime_group_vms))
        .route("/RuntimeDetails/Plans/{planId}/Vms/{vmId}/Steps", get(h::runtime_vm_steps))
        .route("/RuntimeDetails/Plans/{planId}/Steps/{stepId}", get(h::runtime_step))
        .route("/RecoveryLocations", get(h::locations_list))
        .route("/RecoveryLocations/{id}", get(h::locations_get))
        .route("/Scopes", get(h::scopes_list))
        .route("/LicenseUsage/Server", get(h::license_usage_server))
        .route("/License/Usage/Server", get(h::license_usage_server_later))
}

/// Every answer of the dialect is JSON, an action's empty body included (seed 000).
fn json_content_type(_: &axum::http::HeaderMap) -> axum::http::HeaderValue {
    axum::http::HeaderValue::from_static("application/json")
}

/// The dialect's router, to be served on its own listener (see [`drover_api::listen`]).
pub fn router(app: App) -> Router {
    let mut r = Router::new().route("/api/token", post(handlers::token)).route("/token", post(handlers::token));
    for v in std::iter::once("v3").chain(VERSION_ALIASES) {
        r = r.nest(&format!("/api/{v}"), versioned());
    }
    r.fallback(no_route)
        .method_not_allowed_fallback(|| async { VroError::MethodNotAllowed })
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20))
        .layer(axum::middleware::from_fn_with_state(app.clone(), drover_api::audit::record))
        .layer(axum::middleware::from_fn_with_state(
            json_content_type as crate::headers::DefaultContentType,
            crate::headers::complete,
        ))
        .with_state(VroState { app })
}
