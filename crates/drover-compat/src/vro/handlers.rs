//! The dialect's handlers: parse, call [`drover_engine::app::App`], render the wire types of
//! [`super::views`]. None touches the store or the engine.

use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use drover_engine::app::{Caller, PlanActionOptions};
use drover_engine::saga::ContinueOption;
use drover_types::{self as d, Error, PlanAction, SessionFilter, SessionKind};
use serde::Deserialize;
use serde_json::Value;
use utoipa::IntoParams;
use uuid::Uuid;

use super::collection::{Collection, CollectionQuery};
use super::error::{Body, ErrorBody, Json, Query, VroError, VroResult, body_or_default};
use super::views::*;
use super::{Auth, Path, VroState};

// ------------------------------------------------------------------------------------------------
// Token

/// Logs in (`password`, `client_credentials`) or trades a refresh token (`refresh_token`, single
/// use: each use returns a new one). The body is form-urlencoded or multipart.
#[utoipa::path(post, path = "/api/token", tag = "Authorization",
    request_body(content = TokenRequest, content_type = "application/x-www-form-urlencoded"),
    responses((status = 200, body = TokenResponse), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 429, body = ErrorBody, description = "Too many failed logins for this user from this address, or from this address: try again after Retry-After seconds.",
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again."))),
        (status = 503, body = ErrorBody, description = "Too many password checks are waiting; try again after Retry-After seconds.",
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again.")))))]
pub async fn token(
    State(st): State<VroState>,
    drover_api::ClientAddr(from): drover_api::ClientAddr,
    req: Request,
) -> VroResult<Json<TokenResponse>> {
    let content_type = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
    let body = if content_type.starts_with("multipart/form-data") {
        token_fields_multipart(req).await?
    } else if content_type.is_empty() || content_type.starts_with("application/x-www-form-urlencoded") {
        let axum::Form(b) = axum::Form::<TokenRequest>::from_request(req, &())
            .await
            .map_err(|r| VroError::Body(format!("bad token request: {}", r.body_text())))?;
        b
    } else {
        return Err(VroError::Body(format!(
            "the token request is form-urlencoded or multipart/form-data, not {content_type:?}"
        )));
    };
    let need = |v: Option<String>, what: &str| {
        v.filter(|s| !s.is_empty())
            .ok_or_else(|| VroError::Body(format!("grant_type={} needs {what}", body.grant_type)))
    };
    let pair = match body.grant_type.as_str() {
        "password" => {
            let username = need(body.username.clone(), "username")?;
            let password = need(body.password.clone(), "password")?;
            st.app.login(&username, &password, from).await.map_err(credentials)?
        }
        "refresh_token" => {
            let refresh = need(body.refresh_token.clone(), "refresh_token")?;
            st.app.refresh(&refresh).await.map_err(|e| match e {
                Error::Unauthorized(message) => VroError::Token { expired: false, message },
                e => e.into(),
            })?
        }
        "client_credentials" => {
            let id = need(body.client_id.clone(), "client_id")?;
            let secret = need(body.client_secret.clone(), "client_secret")?;
            let id = Uuid::parse_str(&id).map_err(|_| VroError::Credentials("wrong client id or secret".into()))?;
            st.app.client_login(id, &secret, from).await.map_err(credentials)?
        }
        "" => return Err(VroError::Body("grant_type is missing".into())),
        other => {
            return Err(VroError::Body(format!(
                "unsupported grant_type {other:?}: use password, refresh_token or client_credentials"
            )));
        }
    };
    Ok(Json(pair.into()))
}

fn credentials(e: Error) -> VroError {
    match e {
        Error::Unauthorized(m) => VroError::Credentials(m),
        e => e.into(),
    }
}

async fn token_fields_multipart(req: Request) -> VroResult<TokenRequest> {
    let bad =
        |e: axum::extract::multipart::MultipartError| VroError::Body(format!("bad multipart body: {}", e.body_text()));
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|r| VroError::Body(format!("bad multipart body: {}", r.body_text())))?;
    let mut body = TokenRequest::default();
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or("").to_string();
        let value = field.text().await.map_err(bad)?;
        match name.as_str() {
            "grant_type" => body.grant_type = value,
            "username" => body.username = Some(value),
            "password" => body.password = Some(value),
            "refresh_token" => body.refresh_token = Some(value),
            "client_id" => body.client_id = Some(value),
            "client_secret" => body.client_secret = Some(value),
            _ => {}
        }
    }
    Ok(body)
}

/// A new client for `client_credentials` logins (Administrator only). The secret is shown once;
/// only its hash is kept. The client acts with the role given (default `Plan Operator`).
#[utoipa::path(post, path = "/api/v3/Clients", tag = "Authorization", security(("bearer" = [])),
    request_body(content = NewClientBody, content_type = "application/json"),
    responses((status = 200, body = ClientCredentials), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn clients_create(
    State(st): State<VroState>,
    Auth(c): Auth,
    Body(body): Body,
) -> VroResult<Json<ClientCredentials>> {
    let b: NewClientBody = body_or_default(&body)?;
    let role = match b.role.as_deref() {
        None => d::Role::PlanOperator,
        Some(r) => r.parse().map_err(|e: Error| VroError::Body(e.to_string()))?,
    };
    let (id, secret) = st.app.client_create(&c, role).await?;
    Ok(Json(ClientCredentials { client_id: id, client_secret: secret }))
}

// ------------------------------------------------------------------------------------------------
// What the representations of a plan need

fn plan_id(s: &str) -> VroResult<d::PlanId> {
    Uuid::parse_str(s).map(d::PlanId).map_err(|_| Error::not_found(d::PlanId::KIND, s).into())
}

async fn plan(st: &VroState, c: &Caller, id: &str) -> VroResult<d::Plan> {
    Ok(st.app.get::<d::Plan>(c, plan_id(id)?.0).await?)
}

/// The caller's tenant: the plan's site scope.
async fn site_scope(st: &VroState, c: &Caller) -> VroResult<(Uuid, String)> {
    let name =
        st.app.tenant_list(c).await?.into_iter().find(|t| t.id == c.tenant_id).map(|t| t.name).unwrap_or_default();
    Ok((c.tenant_id.0, name))
}

async fn facts(st: &VroState, c: &Caller, p: &d::Plan, scope: &(Uuid, String)) -> VroResult<PlanFacts> {
    let filter = SessionFilter { target_id: Some(p.id.0), limit: 200, ..Default::default() };
    let (sessions, _) = st.app.session_list(c, &filter).await?;
    let first = |f: &dyn Fn(SessionKind) -> bool| sessions.iter().find(|s| f(s.kind)).cloned();
    let current = first(&|k| k != SessionKind::PlanTestFailover);
    // The result is the steps' final outcomes, not the log: a step that failed and then
    // succeeded on Continue is no error; a step that still stands failed is one, and a skipped
    // step (a non-critical failure, or a Continue that proceeded past it) is a warning.
    let (mut warnings, mut errors) = (0, 0);
    if let Some(s) = &current {
        for step in st.app.session_steps(c, s.id).await? {
            match step.state {
                d::StepState::Failed => errors += 1,
                d::StepState::Skipped => warnings += 1,
                _ => {}
            }
        }
    }
    let recovery_to_new_location = first(&|k| k == SessionKind::PlanFailback).is_some_and(|s| {
        s.params
            .get("location")
            .and_then(Value::as_str)
            .and_then(|l| Uuid::parse_str(l).ok())
            .is_some_and(|l| l != d::RecoveryLocationId::ORIGINAL.0)
    });
    let location = st.app.recovery_location_get(c, p.recovery_location_id).await?;
    Ok(PlanFacts {
        site_scope_id: scope.0,
        site_scope_name: scope.1.clone(),
        recovery_location_name: location.name,
        current,
        warnings,
        errors,
        last_run: first(&|k| !matches!(k, SessionKind::PlanTestFailover | SessionKind::PlanReadinessCheck)),
        last_test: first(&|k| k == SessionKind::PlanTestFailover),
        last_check: first(&|k| k == SessionKind::PlanReadinessCheck),
        recovery_to_new_location,
    })
}

// ------------------------------------------------------------------------------------------------
// Plans

/// `GET /Plans` query: `onlyEnabled` plus the collection parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(rename_all = "camelCase")]
pub struct PlansQuery {
    /// Only plans whose mode is ENABLED.
    pub only_enabled: Option<bool>,
    pub start: Option<u64>,
    pub limit: Option<u64>,
    /// JSON array of `{"property", "operator": "==", "value"}`.
    pub filter: Option<String>,
    /// JSON array of `{"property", "direction": "ASC" | "DESC"}`.
    pub sort: Option<String>,
}

#[utoipa::path(get, path = "/api/v3/Plans", tag = "Plans", security(("bearer" = [])), params(PlansQuery),
    responses((status = 200, body = Collection<RecoveryPlanInfo>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)))]
pub async fn plans_list(
    State(st): State<VroState>,
    Auth(c): Auth,
    Query(q): Query<PlansQuery>,
) -> VroResult<Json<Collection<Value>>> {
    let scope = site_scope(&st, &c).await?;
    let mut out = Vec::new();
    for p in st.app.list::<d::Plan>(&c).await? {
        if q.only_enabled == Some(true) && p.mode() != d::PlanMode::Enabled {
            continue;
        }
        let f = facts(&st, &c, &p, &scope).await?;
        out.push(RecoveryPlanInfo::from((&p, &f)));
    }
    let cq = CollectionQuery { start: q.start, limit: q.limit, filter: q.filter, sort: q.sort };
    Ok(Json(cq.apply(out)?))
}

#[utoipa::path(get, path = "/api/v3/Plans/{planId}", tag = "Plans", security(("bearer" = [])),
    params(("planId" = Uuid, Path)),
    responses((status = 200, body = RecoveryPlanInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn plans_get(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path(id): Path<String>,
) -> VroResult<Json<RecoveryPlanInfo>> {
    let p = plan(&st, &c, &id).await?;
    let scope = site_scope(&st, &c).await?;
    let f = facts(&st, &c, &p, &scope).await?;
    Ok(Json(RecoveryPlanInfo::from((&p, &f))))
}

fn group<'a>(p: &'a d::Plan, id: &str) -> VroResult<(usize, &'a d::PlanGroup)> {
    p.groups
        .iter()
        .enumerate()
        .find(|(_, g)| g.id.0.to_string().eq_ignore_ascii_case(id))
        .ok_or_else(|| Error::not_found(d::PlanGroupId::KIND, id).into())
}

fn plan_vm<'a>(p: &'a d::Plan, id: &str) -> VroResult<(&'a d::PlanGroup, &'a d::PlanVm)> {
    p.groups
        .iter()
        .flat_map(|g| g.vms.iter().map(move |v| (g, v)))
        .find(|(_, v)| v.vm_id.0.to_string().eq_ignore_ascii_case(id))
        .ok_or_else(|| Error::not_found(d::VmId::KIND, id).into())
}

async fn vm_name(st: &VroState, c: &Caller, vm: d::VmId) -> String {
    st.app.get::<d::Vm>(c, vm.0).await.map(|v| v.name).unwrap_or_else(|_| vm.to_string())
}

fn steps_of(p: &d::Plan, g: &d::PlanGroup, v: &d::PlanVm) -> Vec<PlanStepInfo> {
    v.steps
        .iter()
        .enumerate()
        .map(|(i, s)| PlanStepInfo {
            id: s.id.0,
            plan_id: p.id.0,
            group_id: g.id.0,
            vm_id: v.vm_id.0,
            name: s.name.clone(),
            r#type: step_type(&s.kind),
            is_critical: s.critical,
            order: i as u32 + 1,
        })
        .collect()
}

#[utoipa::path(get, path = "/api/v3/Plans/{planId}/Groups", tag = "Plans", security(("bearer" = [])),
    params(("planId" = Uuid, Path), CollectionQuery),
    responses((status = 200, body = Collection<PlanGroupInfo>), (status = 404, body = ErrorBody)))]
pub async fn plan_groups(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    Query(q): Query<CollectionQuery>,
) -> VroResult<Json<Collection<Value>>> {
    let p = plan(&st, &c, &id).await?;
    let groups: Vec<PlanGroupInfo> = p.groups.iter().enumerate().map(|(i, g)| (&p, i, g).into()).collect();
    Ok(Json(q.apply(groups)?))
}

#[utoipa::path(get, path = "/api/v3/Plans/{planId}/Groups/{groupId}/Vms", tag = "Plans", security(("bearer" = [])),
    params(("planId" = Uuid, Path), ("groupId" = Uuid, Path), CollectionQuery),
    responses((status = 200, body = Collection<PlanVmInfo>), (status = 404, body = ErrorBody)))]
pub async fn plan_group_vms(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path((id, group_id)): Path<(String, String)>,
    Query(q): Query<CollectionQuery>,
) -> VroResult<Json<Collection<Value>>> {
    let p = plan(&st, &c, &id).await?;
    let (_, g) = group(&p, &group_id)?;
    let mut vms = Vec::new();
    for (i, v) in g.vms.iter().enumerate() {
        vms.push(PlanVmInfo {
            id: v.vm_id.0,
            plan_id: p.id.0,
            group_id: g.id.0,
            name: vm_name(&st, &c, v.vm_id).await,
            order: i as u32 + 1,
            step_count: v.steps.len() as u32,
            latest_restore_point: latest_point(&st, &c, v.vm_id).await?.as_ref().map(Into::into),
        });
    }
    Ok(Json(q.apply(vms)?))
}

/// The newest published restore point of any replica of `vm` the caller sees.
async fn latest_point(st: &VroState, c: &Caller, vm: d::VmId) -> VroResult<Option<d::RestorePoint>> {
    let mut newest: Option<d::RestorePoint> = None;
    for r in st.app.list::<d::Replica>(c).await?.into_iter().filter(|r| r.source_vm_id == vm) {
        let points = st.app.restore_points(c, r.id).await?;
        if let Some(p) = points.into_iter().rev().find(|p| p.state == d::RestorePointState::Published)
            && newest.as_ref().is_none_or(|n| p.created_at > n.created_at)
        {
            newest = Some(p);
        }
    }
    Ok(newest)
}

#[utoipa::path(get, path = "/api/v3/Plans/{planId}/Groups/{groupId}/Steps", tag = "Plans", security(("bearer" = [])),
    params(("planId" = Uuid, Path), ("groupId" = Uuid, Path), CollectionQuery),
    responses((status = 200, body = Collection<PlanStepInfo>), (status = 404, body = ErrorBody)))]
pub async fn plan_group_steps(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path((id, group_id)): Path<(String, String)>,
    Query(q): Query<CollectionQuery>,
) -> VroResult<Json<Collection<Value>>> {
    let p = plan(&st, &c, &id).await?;
    let (_, g) = group(&p, &group_id)?;
    let steps: Vec<PlanStepInfo> = g.vms.iter().flat_map(|v| steps_of(&p, g, v)).collect();
    Ok(Json(q.apply(steps)?))
}

#[utoipa::path(get, path = "/api/v3/Plans/{planId}/Vms/{vmId}/Steps", tag = "Plans", security(("bearer" = [])),
    params(("planId" = Uuid, Path), ("vmId" = Uuid, Path), CollectionQuery),
    responses((status = 200, body = Collection<PlanStepInfo>), (status = 404, body = ErrorBody)))]
pub async fn plan_vm_steps(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path((id, vm_id)): Path<(String, String)>,
    Query(q): Query<CollectionQuery>,
) -> VroResult<Json<Collection<Value>>> {
    let p = plan(&st, &c, &id).await?;
    let (g, v) = plan_vm(&p, &vm_id)?;
    Ok(Json(q.apply(steps_of(&p, g, v))?))
}

#[utoipa::path(get, path = "/api/v3/Plans/{planId}/Steps/{stepId}/Parameters", tag = "Plans", security(("bearer" = [])),
    params(("planId" = Uuid, Path), ("stepId" = Uuid, Path), CollectionQuery),
    responses((status = 200, body = Collection<StepParameter>), (status = 404, body = ErrorBody)))]
pub async fn plan_step_parameters(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path((id, step_id)): Path<(String, String)>,
    Query(q): Query<CollectionQuery>,
) -> VroResult<Json<Collection<Value>>> {
    let p = plan(&st, &c, &id).await?;
    let step = p
        .groups
        .iter()
        .flat_map(|g| g.vms.iter().flat_map(|v| v.steps.iter()))
        .find(|s| s.id.0.to_string().eq_ignore_ascii_case(&step_id))
        .ok_or_else(|| Error::not_found(d::PlanStepId::KIND, &step_id))?;
    Ok(Json(q.apply(step_parameters(&step.kind))?))
}

// ------------------------------------------------------------------------------------------------
// Plan actions: 200 with an empty body once accepted; the work goes on in a session.

async fn act(
    st: &VroState,
    c: &Caller,
    id: &str,
    action: PlanAction,
    opts: PlanActionOptions,
) -> VroResult<StatusCode> {
    st.app.plan_action(c, plan_id(id)?, action, opts).await?;
    Ok(StatusCode::OK)
}

macro_rules! plain_action {
    ($(#[$doc:meta])* $name:ident, $path:literal, $action:expr) => {
        $(#[$doc])*
        #[utoipa::path(post, path = $path, tag = "Plan actions", security(("bearer" = [])),
            params(("planId" = Uuid, Path)),
            responses((status = 200, description = "accepted; watch RuntimeDetails"), (status = 401, body = ErrorBody),
                (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
        pub async fn $name(State(st): State<VroState>, Auth(c): Auth, Path(id): Path<String>) -> VroResult<StatusCode> {
            act(&st, &c, &id, $action, PlanActionOptions::default()).await
        }
    };
}

plain_action!(
    /// FAILOVER → PERMANENT FAILOVER: the replicas become production; failback is no longer possible.
    plans_permanent_failover, "/api/v3/Plans/{planId}/PermanentFailover", PlanAction::PermanentFailover);
plain_action!(
    /// FAILOVER → PREPARE FOR FAILBACK: syncs the original VMs while the replicas keep running.
    plans_prepare_to_failback, "/api/v3/Plans/{planId}/PrepareToFailback", PlanAction::PrepareToFailback);
plain_action!(
    /// Finishes a prepared failback now.
    plans_switchover, "/api/v3/Plans/{planId}/SwitchoverToProduction", PlanAction::SwitchoverToProduction);
plain_action!(
    /// FAILBACK → COMMIT FAILBACK: replication resumes production → DR.
    plans_commit_failback, "/api/v3/Plans/{planId}/CommitFailback", PlanAction::CommitFailback);
plain_action!(
    /// Undoes a failover, a failback, or the action a HALTED plan was running.
    plans_undo, "/api/v3/Plans/{planId}/Undo", PlanAction::Undo);

#[utoipa::path(post, path = "/api/v3/Plans/{planId}/Enable", tag = "Plan actions", security(("bearer" = [])),
    params(("planId" = Uuid, Path)),
    responses((status = 200, description = "enabled"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn plans_enable(State(st): State<VroState>, Auth(c): Auth, Path(id): Path<String>) -> VroResult<StatusCode> {
    st.app.plan_set_enabled(&c, plan_id(&id)?, true).await?;
    Ok(StatusCode::OK)
}

#[utoipa::path(post, path = "/api/v3/Plans/{planId}/Disable", tag = "Plan actions", security(("bearer" = [])),
    params(("planId" = Uuid, Path)),
    responses((status = 200, description = "disabled"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn plans_disable(State(st): State<VroState>, Auth(c): Auth, Path(id): Path<String>) -> VroResult<StatusCode> {
    st.app.plan_set_enabled(&c, plan_id(&id)?, false).await?;
    Ok(StatusCode::OK)
}

/// Checks that every replica, host, datastore and network the plan needs is there. Unlike the
/// other actions, answers with a JSON body: the session that runs the check.
#[utoipa::path(post, path = "/api/v3/Plans/{planId}/ReadinessCheck", tag = "Plan actions", security(("bearer" = [])),
    params(("planId" = Uuid, Path)), request_body(content = ReadinessCheckBody, content_type = "application/json"),
    responses((status = 200, body = ReadinessCheckStarted, description = "started; watch RuntimeDetails"),
        (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn plans_readiness_check(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(body): Body,
) -> VroResult<Json<ReadinessCheckStarted>> {
    let _: ReadinessCheckBody = body_or_default(&body)?;
    let (p, session) =
        st.app.plan_action(&c, plan_id(&id)?, PlanAction::ReadinessCheck, PlanActionOptions::default()).await?;
    Ok(Json(ReadinessCheckStarted {
        plan_id: p.id.0,
        session_id: session.map(|s| s.0),
        state: state_id(p.lifecycle.state),
        report_generated: false,
    }))
}

/// Why an action of the product is not served.
#[derive(Debug, Clone, Copy)]
enum NotServed {
    /// The product runs it on restore plans only; drover's plans are replica plans.
    RestorePlansOnly,
    /// drover has no such operation.
    NotInDrover(&'static str),
}

/// The plan actions of the product (its documented `POST /Plans/{planId}/...`) that drover does
/// not serve. Every other name after `/Plans/{planId}/` that no route serves is not an action of
/// the product.
const ACTIONS_NOT_SERVED: [(&str, NotServed); 3] = [
    ("Restore", NotServed::RestorePlansOnly),
    ("MalwareScan", NotServed::RestorePlansOnly),
    ("Clone", NotServed::NotInDrover("create the plan anew through the native API")),
];

/// The names after `/Plans/{planId}/` that routes serve, to tell a misspelt one from an unknown
/// one.
const SERVED_NAMES: [&str; 17] = [
    "Enable",
    "Disable",
    "ReadinessCheck",
    "Failover",
    "PermanentFailover",
    "PrepareToFailback",
    "FailbackToProduction",
    "SwitchoverToProduction",
    "CommitFailback",
    "Undo",
    "Halt",
    "Continue",
    "ResetState",
    "LicenseUsage",
    "Groups",
    "Vms",
    "Steps",
];

/// `POST /Plans/{planId}/{action}` for every action no route serves: an action of the product
/// that does not apply to drover's (replica) plans is 409 `Conflict`; any other name is 400
/// `InvalidURI`. Neither changes anything.
pub async fn plans_other_action(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path((id, action)): Path<(String, String)>,
) -> VroResult<StatusCode> {
    let Some((name, why)) = ACTIONS_NOT_SERVED.iter().find(|(name, _)| *name == action) else {
        let hint = SERVED_NAMES
            .iter()
            .chain(ACTIONS_NOT_SERVED.iter().map(|(name, _)| name))
            .find(|name| name.eq_ignore_ascii_case(&action))
            .map(|name| format!(" (names are spelled as documented: {name})"))
            .unwrap_or_default();
        return Err(VroError::UnknownAction(format!("{action:?} is not an action of a plan{hint}")));
    };
    let p = plan(&st, &c, &id).await?;
    let message = match why {
        NotServed::RestorePlansOnly => {
            format!("{name} applies only to restore plans; plan {:?} is a replica plan", p.name)
        }
        NotServed::NotInDrover(instead) => format!("{name} is not supported for plan {:?}: {instead}", p.name),
    };
    Err(VroError::ActionNotForPlan { plan_id: p.id.0, message })
}

/// Fails over to the newest restore point, or the newest at or before `restorePointDate`.
#[utoipa::path(post, path = "/api/v3/Plans/{planId}/Failover", tag = "Plan actions", security(("bearer" = [])),
    params(("planId" = Uuid, Path)), request_body(content = FailoverBody, content_type = "application/json"),
    responses((status = 200, description = "accepted; watch RuntimeDetails"), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn plans_failover(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(body): Body,
) -> VroResult<StatusCode> {
    let b: FailoverBody = body_or_default(&body)?;
    let opts = PlanActionOptions { point_date: b.restore_point_date, ..Default::default() };
    act(&st, &c, &id, PlanAction::Failover, opts).await
}

/// Seed 000: fails back from the replicas, into the original VMs (the Original VM Location,
/// `00000000-0000-0000-0000-000000000000`: only what changed travels) or as new VMs at another
/// recovery location (a full copy; `failbackRestoreVMTags` gives them the original VMs' tags).
#[utoipa::path(post, path = "/api/v3/Plans/{planId}/FailbackToProduction", tag = "Plan actions",
    security(("bearer" = [])), params(("planId" = Uuid, Path)),
    request_body(content = FailbackBody, content_type = "application/json"),
    responses((status = 200, description = "accepted; watch RuntimeDetails"), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)))]
pub async fn plans_failback(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(body): Body,
) -> VroResult<StatusCode> {
    let b: FailbackBody = body_or_default(&body)?;
    let opts = PlanActionOptions {
        recovery_location_id: b.restore_location_id.map(d::RecoveryLocationId),
        restore_tags: b.failback_restore_vm_tags,
        ..Default::default()
    };
    act(&st, &c, &id, PlanAction::FailbackToProduction, opts).await
}

/// Running steps complete, then the plan is HALTED.
#[utoipa::path(post, path = "/api/v3/Plans/{planId}/Halt", tag = "Plan actions", security(("bearer" = [])),
    params(("planId" = Uuid, Path)), request_body(content = HaltBody, content_type = "application/json"),
    responses((status = 200, description = "accepted"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn plans_halt(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(body): Body,
) -> VroResult<StatusCode> {
    let _: HaltBody = body_or_default(&body)?;
    act(&st, &c, &id, PlanAction::Halt, PlanActionOptions::default()).await
}

/// Goes on from HALTED.
#[utoipa::path(post, path = "/api/v3/Plans/{planId}/Continue", tag = "Plan actions", security(("bearer" = [])),
    params(("planId" = Uuid, Path)), request_body(content = ContinueBody, content_type = "application/json"),
    responses((status = 200, description = "accepted"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn plans_continue(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(body): Body,
) -> VroResult<StatusCode> {
    let b: ContinueBody = body_or_default(&body)?;
    let option = b.execution_continue_options.unwrap_or(ContinueOption::RetryFailedStep);
    act(&st, &c, &id, PlanAction::Continue, PlanActionOptions { continue_option: Some(option), ..Default::default() })
        .await
}

/// Back to a default state, mode DISABLED; touches no VM.
#[utoipa::path(post, path = "/api/v3/Plans/{planId}/ResetState", tag = "Plan actions", security(("bearer" = [])),
    params(("planId" = Uuid, Path)), request_body(content = ResetStateBody, content_type = "application/json"),
    responses((status = 200, description = "reset"), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn plans_reset(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    Body(body): Body,
) -> VroResult<StatusCode> {
    let _: ResetStateBody = body_or_default(&body)?;
    act(&st, &c, &id, PlanAction::ResetState, PlanActionOptions::default()).await
}

// ------------------------------------------------------------------------------------------------
// Runtime details

#[utoipa::path(get, path = "/api/v3/RuntimeDetails/Plans/{planId}", tag = "Runtime details", security(("bearer" = [])),
    params(("planId" = Uuid, Path)),
    responses((status = 200, body = PlanRuntimeDetails), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn runtime_plan(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path(id): Path<String>,
) -> VroResult<Json<PlanRuntimeDetails>> {
    let p = plan(&st, &c, &id).await?;
    let scope = site_scope(&st, &c).await?;
    let f = facts(&st, &c, &p, &scope).await?;
    Ok(Json(PlanRuntimeDetails::new(&p, &f, c.role)))
}

/// The VM tasks of the plan's current session (its newest that is not a test failover), and
/// whether that session is halted.
async fn current_tasks(st: &VroState, c: &Caller, p: &d::Plan) -> VroResult<(bool, Vec<d::Task>)> {
    let filter = SessionFilter { target_id: Some(p.id.0), limit: 50, ..Default::default() };
    let (sessions, _) = st.app.session_list(c, &filter).await?;
    Ok(match sessions.iter().find(|s| s.kind != SessionKind::PlanTestFailover) {
        Some(s) => (s.halted, st.app.session_get(c, s.id).await?.1),
        None => (false, Vec::new()),
    })
}

/// The runtime views of a group's VMs, from their `tasks` in the plan's current session.
async fn runtime_vms(
    st: &VroState,
    c: &Caller,
    g: &d::PlanGroup,
    (halted, tasks): &(bool, Vec<d::Task>),
) -> VroResult<Vec<RuntimeVm>> {
    let mut out = Vec::new();
    for v in &g.vms {
        let task = tasks.iter().find(|t| t.vm_id == Some(v.vm_id));
        out.push(runtime_vm(g.id.0, v.vm_id.0, vm_name(st, c, v.vm_id).await, task, *halted));
    }
    Ok(out)
}

#[utoipa::path(get, path = "/api/v3/RuntimeDetails/Plans/{planId}/Groups", tag = "Runtime details",
    security(("bearer" = [])), params(("planId" = Uuid, Path), CollectionQuery),
    responses((status = 200, body = Collection<RuntimeGroup>), (status = 404, body = ErrorBody)))]
pub async fn runtime_groups(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path(id): Path<String>,
    Query(q): Query<CollectionQuery>,
) -> VroResult<Json<Collection<Value>>> {
    let p = plan(&st, &c, &id).await?;
    let tasks = current_tasks(&st, &c, &p).await?;
    let mut out = Vec::new();
    for (i, g) in p.groups.iter().enumerate() {
        out.push(runtime_group(g, i, &runtime_vms(&st, &c, g, &tasks).await?, tasks.0));
    }
    Ok(Json(q.apply(out)?))
}

#[utoipa::path(get, path = "/api/v3/RuntimeDetails/Plans/{planId}/Groups/{groupId}", tag = "Runtime details",
    security(("bearer" = [])), params(("planId" = Uuid, Path), ("groupId" = Uuid, Path), CollectionQuery),
    responses((status = 200, body = Collection<RuntimeVm>), (status = 404, body = ErrorBody)))]
pub async fn runtime_group_vms(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path((id, group_id)): Path<(String, String)>,
    Query(q): Query<CollectionQuery>,
) -> VroResult<Json<Collection<Value>>> {
    let p = plan(&st, &c, &id).await?;
    let (_, g) = group(&p, &group_id)?;
    let tasks = current_tasks(&st, &c, &p).await?;
    Ok(Json(q.apply(runtime_vms(&st, &c, g, &tasks).await?)?))
}

/// The runtime views of the plan's steps, from the saga records of its newest failover;
/// `keep` chooses which (VM, step) to show.
async fn runtime_steps(
    st: &VroState,
    c: &Caller,
    p: &d::Plan,
    keep: &(dyn Fn(&d::PlanVm, &d::PlanStep) -> bool + Sync),
) -> VroResult<Vec<RuntimeStep>> {
    let filter = SessionFilter {
        target_id: Some(p.id.0),
        kind: Some(SessionKind::PlanFailover),
        limit: 1,
        ..Default::default()
    };
    let (sessions, _) = st.app.session_list(c, &filter).await?;
    let records = match sessions.first() {
        Some(s) => st.app.session_steps(c, s.id).await?,
        None => Vec::new(),
    };
    let mut out = Vec::new();
    for (index, v) in p.groups.iter().flat_map(|g| g.vms.iter()).enumerate() {
        for (k, step) in v.steps.iter().enumerate() {
            if keep(v, step) {
                let name = saga_step_name(index, k, &step.kind);
                out.push(RuntimeStep::new(v.vm_id, k, step, records.iter().find(|r| r.name == name)));
            }
        }
    }
    Ok(out)
}

#[utoipa::path(get, path = "/api/v3/RuntimeDetails/Plans/{planId}/Vms/{vmId}/Steps", tag = "Runtime details",
    security(("bearer" = [])), params(("planId" = Uuid, Path), ("vmId" = Uuid, Path), CollectionQuery),
    responses((status = 200, body = Collection<RuntimeStep>), (status = 404, body = ErrorBody)))]
pub async fn runtime_vm_steps(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path((id, vm_id)): Path<(String, String)>,
    Query(q): Query<CollectionQuery>,
) -> VroResult<Json<Collection<Value>>> {
    let p = plan(&st, &c, &id).await?;
    let (_, vm) = plan_vm(&p, &vm_id)?;
    let vm = vm.vm_id;
    Ok(Json(q.apply(runtime_steps(&st, &c, &p, &|v, _| v.vm_id == vm).await?)?))
}

#[utoipa::path(get, path = "/api/v3/RuntimeDetails/Plans/{planId}/Steps/{stepId}", tag = "Runtime details",
    security(("bearer" = [])), params(("planId" = Uuid, Path), ("stepId" = Uuid, Path)),
    responses((status = 200, body = RuntimeStep), (status = 404, body = ErrorBody)))]
pub async fn runtime_step(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path((id, step_id)): Path<(String, String)>,
) -> VroResult<Json<RuntimeStep>> {
    let p = plan(&st, &c, &id).await?;
    let wanted = |s: &d::PlanStep| s.id.0.to_string().eq_ignore_ascii_case(&step_id);
    let found = runtime_steps(&st, &c, &p, &|_, s| wanted(s)).await?.pop();
    Ok(Json(found.ok_or_else(|| Error::not_found(d::PlanStepId::KIND, &step_id))?))
}

// ------------------------------------------------------------------------------------------------
// Recovery locations

async fn location_info(st: &VroState, c: &Caller, l: &d::RecoveryLocation) -> RecoveryLocationInfo {
    let exists = match (l.host_id, l.datastore_id) {
        (Some(h), Some(ds)) => {
            st.app.get::<d::Host>(c, h.0).await.is_ok() && st.app.get::<d::Datastore>(c, ds.0).await.is_ok()
        }
        _ => false,
    };
    RecoveryLocationInfo::new(l, exists)
}

#[utoipa::path(get, path = "/api/v3/RecoveryLocations", tag = "Recovery locations", security(("bearer" = [])),
    params(CollectionQuery),
    responses((status = 200, body = Collection<RecoveryLocationInfo>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)))]
pub async fn locations_list(
    State(st): State<VroState>,
    Auth(c): Auth,
    Query(q): Query<CollectionQuery>,
) -> VroResult<Json<Collection<Value>>> {
    let mut out = Vec::new();
    for l in st.app.recovery_location_list(&c).await? {
        out.push(location_info(&st, &c, &l).await);
    }
    Ok(Json(q.apply(out)?))
}

#[utoipa::path(get, path = "/api/v3/RecoveryLocations/{id}", tag = "Recovery locations", security(("bearer" = [])),
    params(("id" = Uuid, Path)),
    responses((status = 200, body = RecoveryLocationInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn locations_get(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path(id): Path<String>,
) -> VroResult<Json<RecoveryLocationInfo>> {
    let lid = Uuid::parse_str(&id).map_err(|_| Error::not_found(d::RecoveryLocationId::KIND, &id))?;
    let l = st.app.recovery_location_get(&c, d::RecoveryLocationId(lid)).await?;
    Ok(Json(location_info(&st, &c, &l).await))
}

// ------------------------------------------------------------------------------------------------
// Scopes and license usage

#[utoipa::path(get, path = "/api/v3/Scopes", tag = "Scopes", security(("bearer" = [])), params(CollectionQuery),
    responses((status = 200, body = Collection<ScopeInfo>), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody)))]
pub async fn scopes_list(
    State(st): State<VroState>,
    Auth(c): Auth,
    Query(q): Query<CollectionQuery>,
) -> VroResult<Json<Collection<Value>>> {
    let sites = st.app.list::<d::Site>(&c).await?;
    let scopes: Vec<ScopeInfo> = st
        .app
        .tenant_list(&c)
        .await?
        .iter()
        .filter(|t| t.id == c.tenant_id)
        .map(|t| ScopeInfo::new(t, &sites))
        .collect();
    Ok(Json(q.apply(scopes)?))
}

async fn server_license_usage(st: &VroState, c: &Caller) -> VroResult<LicenseUsage> {
    Ok(LicenseUsage::of(&st.app.list::<d::Plan>(c).await?))
}

/// The VMs the caller's plans protect.
#[utoipa::path(get, path = "/api/v3/LicenseUsage/Server", tag = "LicenseUsage", security(("bearer" = [])),
    responses((status = 200, body = LicenseUsage), (status = 401, body = ErrorBody)))]
pub async fn license_usage_server(State(st): State<VroState>, Auth(c): Auth) -> VroResult<Json<LicenseUsage>> {
    Ok(Json(server_license_usage(&st, &c).await?))
}

/// The same as `/LicenseUsage/Server`, at the path of the product's later versions.
#[utoipa::path(get, path = "/api/v3/License/Usage/Server", tag = "LicenseUsage", security(("bearer" = [])),
    responses((status = 200, body = LicenseUsage), (status = 401, body = ErrorBody)))]
pub async fn license_usage_server_later(State(st): State<VroState>, Auth(c): Auth) -> VroResult<Json<LicenseUsage>> {
    Ok(Json(server_license_usage(&st, &c).await?))
}

/// The VMs one plan protects.
#[utoipa::path(get, path = "/api/v3/Plans/{planId}/LicenseUsage", tag = "LicenseUsage", security(("bearer" = [])),
    params(("planId" = Uuid, Path)),
    responses((status = 200, body = LicenseUsage), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn plan_license_usage(
    State(st): State<VroState>,
    Auth(c): Auth,
    Path(id): Path<String>,
) -> VroResult<Json<LicenseUsage>> {
    let p = plan(&st, &c, &id).await?;
    Ok(Json(LicenseUsage::of([&p])))
}
