//! The EM routes. Thin: parse, call [`App`], build a view; [`super::render`] writes it.

use std::collections::HashMap;
use std::collections::hash_map::Entry;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use drover_engine::app::{App, Caller, PlanActionOptions};
use drover_types::{
    CompareOp, Error, Plan, PlanAction, PlanId, Replica, ReplicaId, RestorePointId, Role, Session, SessionCondition,
    SessionFilter, SessionId, SessionKind, SessionOrder, SessionQuery, SessionSummary, SessionTarget, Timestamp, Vm,
    VmId,
};
use serde::Deserialize;

use super::EmState;
use super::body::parse_body;
use super::logon::{self, LogonSession, SESSION_HEADER};
use super::render::{Element, EmError, EmResult, Reply};
use super::views::{self, BackupServer, Ctx, PlanKind, PlanView, PointLink, Shape};

// -------------------------------------------------------------------------------------------------
// Extractors

impl FromRequestParts<EmState> for Ctx {
    type Rejection = EmError;

    async fn from_request_parts(parts: &mut Parts, state: &EmState) -> Result<Self, Self::Rejection> {
        // The request's authority: HTTP/2 carries it in the URI (`:authority`) and sends no
        // `Host`; HTTP/1.1 sends `Host` and an origin-form URI.
        let host = parts
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()))
            .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_graphic()))
            .unwrap_or("localhost");
        let base = match &state.config.external_base_url {
            // Behind a proxy: the address the clients see, whatever the request says.
            Some(external) => external.to_string(),
            None => format!("{}://{host}", state.config.scheme),
        };
        Ok(Ctx {
            base,
            server: BackupServer {
                id: state.config.backup_server_id,
                name: state.config.backup_server_name.clone(),
                port: state.config.backup_server_port,
            },
        })
    }
}

/// The logged-on caller, from `X-RestSvcSessionId` (cookie or header).
#[derive(Debug, Clone)]
pub struct Auth {
    pub caller: Caller,
    pub logon: LogonSession,
}

impl FromRequestParts<EmState> for Auth {
    type Rejection = EmError;

    async fn from_request_parts(parts: &mut Parts, state: &EmState) -> Result<Self, Self::Rejection> {
        let token = logon::token_of(&parts.headers).ok_or_else(|| {
            Error::Unauthorized(format!("log on first: POST /api/sessionMngr/?v=latest, then send {SESSION_HEADER}"))
        })?;
        let logon = state.logons.touch(&token)?;
        let caller = match state.app.caller_for(logon.user_id).await {
            Err(Error::NotFound { .. }) => Err(Error::Unauthorized("the logon session's user no longer exists".into())),
            other => other,
        }?;
        drover_api::audit::note_caller(parts, &caller);
        Ok(Auth { caller, logon })
    }
}

/// The query string, every key once.
#[derive(Debug, Clone, Default)]
pub struct Params(pub HashMap<String, String>);

impl FromRequestParts<EmState> for Params {
    type Rejection = EmError;

    async fn from_request_parts(parts: &mut Parts, state: &EmState) -> Result<Self, Self::Rejection> {
        let axum::extract::Query(map) =
            axum::extract::Query::<HashMap<String, String>>::from_request_parts(parts, state)
                .await
                .map_err(|e| Error::invalid(format!("bad query string: {}", e.body_text())))?;
        Ok(Params(map))
    }
}

impl Params {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.as_str())
    }

    /// `?format=Entity` or the reference (the default).
    fn shape(&self, reference: Shape) -> EmResult<Shape> {
        match self.get("format") {
            None => Ok(reference),
            Some(f) if f.eq_ignore_ascii_case("Entity") => Ok(Shape::Entity),
            Some(f) => Err(Error::invalid(format!("format must be Entity, not {f:?}")).into()),
        }
    }
}

/// An id in a path; a malformed one names nothing, so it is not found.
fn parse_id<T: std::str::FromStr>(kind: &'static str, id: &str) -> EmResult<T> {
    id.parse().map_err(|_| EmError(Error::not_found(kind, id)))
}

pub async fn not_found() -> EmError {
    EmError(Error::not_found("resource", "at this path"))
}

// -------------------------------------------------------------------------------------------------
// Logon

pub async fn enterprise_manager(ctx: Ctx) -> Reply {
    Reply::ok(views::enterprise_manager(&ctx))
}

pub async fn logon(
    State(state): State<EmState>,
    drover_api::ClientAddr(from): drover_api::ClientAddr,
    ctx: Ctx,
    params: Params,
    headers: HeaderMap,
) -> EmResult {
    let version = params.get("v").unwrap_or("latest");
    if !views::VERSIONS.contains(&version) {
        return Err(Error::invalid(format!("unsupported version {version:?}; see GET /api/")).into());
    }
    let (user, password) = logon::basic_credentials(&headers)?;
    let (session, caller) = state.logons.logon(&state.app, &user, &password, from).await?;
    let mut reply = Reply::with_status(StatusCode::CREATED, views::logon_session(&ctx, session.id, &caller.name));
    let token = HeaderValue::from_str(&session.token).map_err(|e| Error::internal(e.to_string()))?;
    let cookie = HeaderValue::from_str(&format!("{SESSION_HEADER}={}; Path=/api", session.token))
        .map_err(|e| Error::internal(e.to_string()))?;
    reply.headers.push((header::HeaderName::from_static("x-restsvcsessionid"), token));
    reply.headers.push((header::SET_COOKIE, cookie));
    Ok(reply)
}

/// `GET /api/sessionMngr/`: the caller's own logon session (so the links to it resolve).
pub async fn logon_current(auth: Auth, ctx: Ctx) -> Reply {
    Reply::ok(views::logon_session(&ctx, auth.logon.id, &auth.logon.user_name))
}

pub async fn logon_sessions(auth: Auth, State(state): State<EmState>, ctx: Ctx) -> Reply {
    let list: Vec<_> = state.logons.of_user(auth.caller.user_id).into_iter().map(|s| (s.id, s.user_name)).collect();
    Reply::ok(views::logon_sessions(&ctx, &list))
}

pub async fn logon_session_get(auth: Auth, State(state): State<EmState>, ctx: Ctx, Path(id): Path<String>) -> EmResult {
    let id: uuid::Uuid = parse_id("logon session", &id)?;
    let s = state
        .logons
        .of_user(auth.caller.user_id)
        .into_iter()
        .find(|s| s.id == id)
        .ok_or_else(|| Error::not_found("logon session", id))?;
    Ok(Reply::ok(views::logon_session(&ctx, s.id, &s.user_name)))
}

pub async fn logon_session_delete(auth: Auth, State(state): State<EmState>, Path(id): Path<String>) -> EmResult {
    let id: uuid::Uuid = parse_id("logon session", &id)?;
    if state.logons.end(auth.caller.user_id, id) {
        Ok(Reply::no_content())
    } else {
        Err(Error::not_found("logon session", id).into())
    }
}

// -------------------------------------------------------------------------------------------------
// Backup servers

pub async fn backup_servers(_: Auth, ctx: Ctx, params: Params) -> EmResult {
    let shape = params.shape(Shape::Ref)?;
    Ok(Reply::ok(views::collection(shape, "BackupServers", vec![views::backup_server(&ctx, shape)])))
}

pub async fn backup_server_get(_: Auth, ctx: Ctx, params: Params, Path(id): Path<String>) -> EmResult {
    let shape = params.shape(Shape::EntityRef)?;
    if id.parse::<uuid::Uuid>().ok() != Some(ctx.server.id) {
        return Err(Error::not_found("backup server", id).into());
    }
    Ok(Reply::ok(views::backup_server(&ctx, shape)))
}

// -------------------------------------------------------------------------------------------------
// Failover sessions

/// The plan executions EM shows as cloud failover sessions.
pub const PLAN_SESSION_KINDS: [SessionKind; 8] = [
    SessionKind::PlanFailover,
    SessionKind::PlanTestFailover,
    SessionKind::PlanUndoFailover,
    SessionKind::PlanPermanentFailover,
    SessionKind::PlanPrepareFailback,
    SessionKind::PlanFailback,
    SessionKind::PlanUndoFailback,
    SessionKind::PlanCommitFailback,
];

/// The most sessions `GET /api/cloud/failoverSessions` lists: Enterprise Manager's collections
/// are not paged, so the newest of the last 30 days are listed up to this bound (which bounds
/// the answer's memory); the query service pages through every session.
pub const COLLECTION_MAX: u64 = 10_000;

/// The same bound for the collection as entities, each of which reads its tasks and steps.
pub const COLLECTION_ENTITIES_MAX: u64 = 1_000;

/// A tenant's plan sessions that meet `condition`, in the query's page and order.
pub fn plan_sessions_query(
    condition: SessionCondition,
    order: Option<(SessionOrder, bool)>,
    offset: u64,
    limit: u64,
) -> SessionQuery {
    SessionQuery { kinds: PLAN_SESSION_KINDS.to_vec(), condition, order, offset, limit }
}

pub fn thirty_days_ago() -> Timestamp {
    drover_types::now() - chrono::Duration::days(30)
}

/// A plan session with its tasks; any other session is not found here.
pub async fn plan_session(
    app: &App,
    caller: &Caller,
    id: SessionId,
) -> Result<(Session, Vec<drover_types::Task>), Error> {
    let (s, tasks) = app.session_get(caller, id).await?;
    if !PLAN_SESSION_KINDS.contains(&s.kind) {
        return Err(Error::not_found("failover session", id));
    }
    Ok((s, tasks))
}

/// What a session entity shows beside the session: its VM tasks and their restore points (only
/// points that still exist, so the links resolve).
pub async fn session_details(
    app: &App,
    caller: &Caller,
    id: SessionId,
) -> Result<(Vec<drover_types::Task>, Vec<PointLink>), Error> {
    let (session, tasks) = app.session_get(caller, id).await?;
    let points = point_links(app, caller, &session, &tasks).await?;
    Ok((tasks, points))
}

/// The restore point of each VM task of a plan session (only points that still exist): the
/// point it booted from (failover, test failover); for the sessions that follow a failover
/// (its undo, permanent failover, failback, its undo, commit), the point the plan's latest
/// failover before the session booted that VM from.
async fn point_links(
    app: &App,
    caller: &Caller,
    session: &Session,
    tasks: &[drover_types::Task],
) -> Result<Vec<PointLink>, Error> {
    let booted = match session.kind {
        SessionKind::PlanFailover | SessionKind::PlanTestFailover => {
            app.session_boot_points(caller, session.id).await?
        }
        _ => failover_points(app, caller, session, tasks).await?,
    };
    let mut links = Vec::new();
    let mut existing: HashMap<ReplicaId, (String, Vec<RestorePointId>)> = HashMap::new();
    for (task_id, replica_id, point_id) in booted {
        let (name, points) = match existing.entry(replica_id) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => {
                let Ok(replica) = app.get::<Replica>(caller, replica_id.0).await else { continue };
                let points = app.restore_points(caller, replica_id).await?.into_iter().map(|p| p.id).collect();
                v.insert((replica.name, points))
            }
        };
        if points.contains(&point_id) {
            links.push(PointLink { task_id, point_id, name: name.clone() });
        }
    }
    Ok(links)
}

/// For a session that follows a failover: its VM tasks with the points the plan's latest
/// failover created before it booted the same VMs from.
async fn failover_points(
    app: &App,
    caller: &Caller,
    session: &Session,
    tasks: &[drover_types::Task],
) -> Result<Vec<(drover_types::TaskId, ReplicaId, RestorePointId)>, Error> {
    let SessionTarget::Plan(plan) = session.target else { return Ok(Vec::new()) };
    let filter = SessionFilter {
        kind: Some(SessionKind::PlanFailover),
        target_id: Some(plan.0),
        limit: 100,
        ..Default::default()
    };
    let (failovers, _) = app.session_list(caller, &filter).await?;
    let Some(failover) = failovers.into_iter().find(|f| f.created_at <= session.created_at && f.id != session.id)
    else {
        return Ok(Vec::new());
    };
    let (_, failover_tasks) = app.session_get(caller, failover.id).await?;
    let mut out = Vec::new();
    for (failover_task, replica, point) in app.session_boot_points(caller, failover.id).await? {
        let vm = failover_tasks.iter().find(|t| t.id == failover_task).and_then(|t| t.vm_id);
        if let Some(task) = tasks.iter().find(|t| vm.is_some() && t.vm_id == vm) {
            out.push((task.id, replica, point));
        }
    }
    Ok(out)
}

/// `GET /api/cloud/failoverSessions`: references built from summaries; entities are read only for
/// the sessions listed.
pub async fn sessions_list(auth: Auth, State(state): State<EmState>, ctx: Ctx, params: Params) -> EmResult {
    let shape = params.shape(Shape::Ref)?;
    let limit = if shape == Shape::Entity { COLLECTION_ENTITIES_MAX } else { COLLECTION_MAX };
    let recent = SessionCondition::CreatedAt(CompareOp::Ge, thirty_days_ago());
    let (sessions, _) = state.app.session_summaries(&auth.caller, &plan_sessions_query(recent, None, 0, limit)).await?;
    let items = session_elements(&state.app, &auth.caller, &ctx, &sessions, shape).await?;
    Ok(Reply::ok(views::collection(shape, "CloudFailoverSessions", items)))
}

/// The representations of listed sessions: references from their summaries, or entities read
/// one by one (a session gone since it was listed is left out).
pub async fn session_elements(
    app: &App,
    caller: &Caller,
    ctx: &Ctx,
    sessions: &[SessionSummary],
    shape: Shape,
) -> Result<Vec<Element>, Error> {
    let mut items = Vec::with_capacity(sessions.len());
    for s in sessions {
        if shape != Shape::Entity {
            items.push(views::cloud_failover_session_ref(ctx, s.id, &s.name, shape));
            continue;
        }
        let (session, tasks) = match app.session_get(caller, s.id).await {
            Err(Error::NotFound { .. }) => continue,
            other => other?,
        };
        let points = point_links(app, caller, &session, &tasks).await?;
        items.push(views::cloud_failover_session(ctx, &session, &tasks, &points, shape));
    }
    Ok(items)
}

pub async fn session_get(
    auth: Auth,
    State(state): State<EmState>,
    ctx: Ctx,
    params: Params,
    Path(id): Path<String>,
) -> EmResult {
    let shape = params.shape(Shape::EntityRef)?;
    let id: SessionId = parse_id("failover session", &id)?;
    let (s, tasks) = plan_session(&state.app, &auth.caller, id).await?;
    let (tasks, points) = if shape == Shape::Entity {
        let points = point_links(&state.app, &auth.caller, &s, &tasks).await?;
        (tasks, points)
    } else {
        Default::default()
    };
    Ok(Reply::ok(views::cloud_failover_session(&ctx, &s, &tasks, &points, shape)))
}

/// `GET /api/vmReplicaPoints/{ID}`: the points failover tasks link to.
pub async fn replica_point_get(
    auth: Auth,
    State(state): State<EmState>,
    ctx: Ctx,
    params: Params,
    Path(id): Path<String>,
) -> EmResult {
    let shape = params.shape(Shape::EntityRef)?;
    let id: RestorePointId = parse_id("restore point", &id)?;
    for replica in state.app.list::<Replica>(&auth.caller).await? {
        let points = state.app.restore_points(&auth.caller, replica.id).await?;
        if let Some(point) = points.iter().find(|p| p.id == id) {
            let oldest = points.iter().all(|p| p.sequence >= point.sequence);
            return Ok(Reply::ok(views::vm_replica_point(&ctx, &replica, point, oldest, shape)));
        }
    }
    Err(Error::not_found("restore point", id).into())
}

// -------------------------------------------------------------------------------------------------
// Plans

/// A plan with its tenant's name and its VMs' names.
pub async fn plan_view(app: &App, caller: &Caller, plan: Plan) -> Result<PlanView, Error> {
    let tenant_name =
        app.tenant_list(caller).await?.into_iter().find(|t| t.id == plan.tenant_id).map(|t| t.name).unwrap_or_default();
    Ok(with_vm_names(app, caller, PlanView { plan, tenant_name, vms: Vec::new() }).await)
}

/// The caller's plans by name, each with its tenant's name (read once) and, for entities, its
/// VMs' names (a reference shows none).
pub async fn plan_views(app: &App, caller: &Caller, shape: Shape) -> Result<Vec<PlanView>, Error> {
    let mut plans = app.list::<Plan>(caller).await?;
    plans.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    let tenants: HashMap<_, _> = app.tenant_list(caller).await?.into_iter().map(|t| (t.id, t.name)).collect();
    let mut views = Vec::with_capacity(plans.len());
    for plan in plans {
        let tenant_name = tenants.get(&plan.tenant_id).cloned().unwrap_or_default();
        let view = PlanView { plan, tenant_name, vms: Vec::new() };
        views.push(if shape == Shape::Entity { with_vm_names(app, caller, view).await } else { view });
    }
    Ok(views)
}

/// A plan's view with its VMs' names.
pub async fn with_vm_names(app: &App, caller: &Caller, mut view: PlanView) -> PlanView {
    let mut vms = Vec::new();
    for vm_id in view.plan.vm_ids() {
        let name = app.get::<Vm>(caller, vm_id.0).await.map(|v| v.name).unwrap_or_else(|_| vm_id.to_string());
        vms.push((vm_id, name));
    }
    view.vms = vms;
    view
}

async fn list_plans(state: &EmState, auth: &Auth, ctx: &Ctx, params: &Params, kind: PlanKind) -> EmResult {
    let shape = params.shape(Shape::Ref)?;
    let plans = plan_views(&state.app, &auth.caller, shape).await?;
    let items = plans.iter().map(|view| views::plan(ctx, view, kind, shape)).collect();
    let plural = match kind {
        PlanKind::Cloud => "CloudFailoverPlans",
        PlanKind::Plain => "FailoverPlans",
    };
    Ok(Reply::ok(views::collection(shape, plural, items)))
}

async fn get_plan(state: &EmState, auth: &Auth, ctx: &Ctx, params: &Params, id: &str, kind: PlanKind) -> EmResult {
    // A GET on an action link (`?action=start`) shows the plan: only POST acts.
    let shape = params.shape(Shape::EntityRef)?;
    let id: PlanId = parse_id("plan", id)?;
    let plan = state.app.get::<Plan>(&auth.caller, id.0).await?;
    let view = plan_view(&state.app, &auth.caller, plan).await?;
    Ok(Reply::ok(views::plan(ctx, &view, kind, shape)))
}

pub async fn cloud_plans_list(auth: Auth, State(state): State<EmState>, ctx: Ctx, params: Params) -> EmResult {
    list_plans(&state, &auth, &ctx, &params, PlanKind::Cloud).await
}

pub async fn plans_list(auth: Auth, State(state): State<EmState>, ctx: Ctx, params: Params) -> EmResult {
    list_plans(&state, &auth, &ctx, &params, PlanKind::Plain).await
}

pub async fn cloud_plan_get(
    auth: Auth,
    State(state): State<EmState>,
    ctx: Ctx,
    params: Params,
    Path(id): Path<String>,
) -> EmResult {
    get_plan(&state, &auth, &ctx, &params, &id, PlanKind::Cloud).await
}

pub async fn plan_get(
    auth: Auth,
    State(state): State<EmState>,
    ctx: Ctx,
    params: Params,
    Path(id): Path<String>,
) -> EmResult {
    get_plan(&state, &auth, &ctx, &params, &id, PlanKind::Plain).await
}

/// `GET .../includes` and `.../includes/{vm}`: a plan's VMs, and one of them.
async fn plan_vms_of(
    state: &EmState,
    auth: &Auth,
    ctx: &Ctx,
    (id, vm): (&str, Option<&str>),
    kind: PlanKind,
) -> EmResult {
    let id: PlanId = parse_id("plan", id)?;
    let plan = state.app.get::<Plan>(&auth.caller, id.0).await?;
    let view = plan_view(&state.app, &auth.caller, plan).await?;
    let Some(vm) = vm else { return Ok(Reply::ok(views::plan_vms(ctx, &view, kind))) };
    let vm_id: VmId = parse_id("VM of the plan", vm)?;
    let (order, (_, name)) = view
        .vms
        .iter()
        .enumerate()
        .find(|(_, (v, _))| *v == vm_id)
        .ok_or_else(|| Error::not_found("VM of the plan", vm_id))?;
    Ok(Reply::ok(views::plan_vm(ctx, id, kind, order, vm_id, name)))
}

pub async fn cloud_plan_vms(auth: Auth, State(state): State<EmState>, ctx: Ctx, Path(id): Path<String>) -> EmResult {
    plan_vms_of(&state, &auth, &ctx, (&id, None), PlanKind::Cloud).await
}

pub async fn plan_vms(auth: Auth, State(state): State<EmState>, ctx: Ctx, Path(id): Path<String>) -> EmResult {
    plan_vms_of(&state, &auth, &ctx, (&id, None), PlanKind::Plain).await
}

pub async fn cloud_plan_vm(
    auth: Auth,
    State(state): State<EmState>,
    ctx: Ctx,
    Path((id, vm)): Path<(String, String)>,
) -> EmResult {
    plan_vms_of(&state, &auth, &ctx, (&id, Some(&vm)), PlanKind::Cloud).await
}

pub async fn plan_vm(
    auth: Auth,
    State(state): State<EmState>,
    ctx: Ctx,
    Path((id, vm)): Path<(String, String)>,
) -> EmResult {
    plan_vms_of(&state, &auth, &ctx, (&id, Some(&vm)), PlanKind::Plain).await
}

async fn delete_plan(state: &EmState, auth: &Auth, id: &str) -> EmResult {
    let id: PlanId = parse_id("plan", id)?;
    state.app.delete::<Plan>(&auth.caller, id.0).await?;
    Ok(Reply::no_content())
}

pub async fn cloud_plan_delete(auth: Auth, State(state): State<EmState>, Path(id): Path<String>) -> EmResult {
    delete_plan(&state, &auth, &id).await
}

pub async fn plan_delete(auth: Auth, State(state): State<EmState>, Path(id): Path<String>) -> EmResult {
    delete_plan(&state, &auth, &id).await
}

/// `CloudFailoverPlanManagementSpec` (XML, or JSON with `Content-Type: application/json`).
#[derive(Debug, Default, Deserialize)]
pub struct ManagementSpec {
    #[serde(rename = "StartNow", default)]
    pub start_now: Option<bool>,
    #[serde(rename = "StartDate", default)]
    pub start_date: Option<String>,
}

impl ManagementSpec {
    /// Parses a body; an empty body means "start now".
    pub fn parse(headers: &HeaderMap, body: &[u8]) -> Result<ManagementSpec, Error> {
        Ok(parse_body(headers, body, "CloudFailoverPlanManagementSpec")?.unwrap_or_default())
    }

    /// The newest point at or before `StartDate`, or the newest point.
    pub fn point_date(&self) -> Result<Option<Timestamp>, Error> {
        match (&self.start_date, self.start_now) {
            (Some(d), _) => chrono::DateTime::parse_from_rfc3339(d.trim())
                .map(|t| Some(t.with_timezone(&chrono::Utc)))
                .map_err(|_| Error::invalid(format!("StartDate {d:?} is not a date-time like 2015-12-07T17:38:16Z"))),
            (None, Some(false)) => Err(Error::invalid("give StartNow true, or a StartDate")),
            (None, _) => Ok(None),
        }
    }
}

/// The body of a PUT on a plan: `FailoverPlan` (its `Description`) or `CloudFailoverPlan` (its
/// `CloudFailoverPlanOptions`, and a `Description` too).
#[derive(Debug, Default, Deserialize)]
pub struct PlanEdit {
    #[serde(rename = "Description", default)]
    pub description: Option<String>,
    #[serde(rename = "CloudFailoverPlanOptions", default)]
    pub options: Option<PlanCommands>,
}

#[derive(Debug, Default, Deserialize)]
pub struct PlanCommands {
    #[serde(rename = "PreFailoverPlanCommandEnabled", default)]
    pub pre_enabled: Option<bool>,
    #[serde(rename = "PreFailoverPlanCommand", default)]
    pub pre: Option<String>,
    #[serde(rename = "PostFailoverPlanCommandEnabled", default)]
    pub post_enabled: Option<bool>,
    #[serde(rename = "PostFailoverPlanCommand", default)]
    pub post: Option<String>,
}

/// `PUT` on a plan: 202 with no body, as EM answers. drover runs no commands around a whole plan
/// (checks and scripts are per-VM plan steps), so enabling one is refused rather than accepted
/// and silently not run.
async fn edit_plan(
    state: &EmState,
    auth: &Auth,
    (headers, body): (&HeaderMap, &[u8]),
    id: &str,
    kind: PlanKind,
) -> EmResult {
    let id: PlanId = parse_id("plan", id)?;
    state.app.get::<Plan>(&auth.caller, id.0).await?;
    // The role first: a caller who may not edit gets its 403 without the body being parsed.
    auth.caller.require(Role::PlanAuthor)?;
    let edit: PlanEdit = parse_body(headers, body, kind.kind())?.unwrap_or_default();
    if let Some(c) = &edit.options {
        if kind == PlanKind::Plain {
            return Err(Error::invalid("a FailoverPlan has no CloudFailoverPlanOptions").into());
        }
        let set = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.trim().is_empty());
        if c.pre_enabled == Some(true) || c.post_enabled == Some(true) || set(&c.pre) || set(&c.post) {
            return Err(Error::invalid(
                "drover runs no pre- or post-failover plan commands (put checks and scripts in the plan's steps): \
                 leave PreFailoverPlanCommandEnabled and PostFailoverPlanCommandEnabled false and the commands empty",
            )
            .into());
        }
    }
    if let Some(description) = &edit.description {
        state.app.plan_set_description(&auth.caller, id, description).await?;
    }
    Ok(Reply::empty(StatusCode::ACCEPTED))
}

pub async fn cloud_plan_put(
    auth: Auth,
    State(state): State<EmState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> EmResult {
    edit_plan(&state, &auth, (&headers, &body), &id, PlanKind::Cloud).await
}

pub async fn plan_put(
    auth: Auth,
    State(state): State<EmState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> EmResult {
    edit_plan(&state, &auth, (&headers, &body), &id, PlanKind::Plain).await
}

async fn act(
    state: &EmState,
    auth: &Auth,
    ctx: &Ctx,
    params: &Params,
    (headers, body): (&HeaderMap, &[u8]),
    id: &str,
    kind: PlanKind,
) -> EmResult {
    let action = params.get("action").unwrap_or("").to_ascii_lowercase();
    let allowed: &[&str] = match kind {
        PlanKind::Cloud => &["start", "test", "undo"],
        PlanKind::Plain => &["start", "undo"],
    };
    if !allowed.contains(&action.as_str()) {
        return Err(Error::invalid(format!("action must be one of {}", allowed.join(", "))).into());
    }
    let id: PlanId = parse_id("plan", id)?;
    let plan = state.app.get::<Plan>(&auth.caller, id.0).await?;
    // The role first: a caller who may not act gets its 403 without the body being parsed.
    auth.caller.require(Role::PlanOperator)?;
    let spec = ManagementSpec::parse(headers, body)?;
    let opts = PlanActionOptions { point_date: spec.point_date()?, ..Default::default() };
    let (session, operation) = match (action.as_str(), kind) {
        ("test", _) => (Some(state.app.plan_test_failover(&auth.caller, id, opts).await?), "TestCloudFailoverPlan"),
        ("start", k) => {
            let (_, s) = state.app.plan_action(&auth.caller, id, PlanAction::Failover, opts).await?;
            (s, if k == PlanKind::Cloud { "StartCloudFailoverPlan" } else { "StartFailoverPlan" })
        }
        (_, k) => {
            let (_, s) = state.app.plan_action(&auth.caller, id, PlanAction::Undo, opts).await?;
            (s, if k == PlanKind::Cloud { "UndoCloudFailoverPlan" } else { "UndoFailoverPlan" })
        }
    };
    let session = session.ok_or_else(|| Error::internal("the plan action started no session"))?;
    let task = state.tasks.finished(auth.caller.tenant_id, operation, &plan.name, session);
    Ok(Reply::with_status(StatusCode::ACCEPTED, views::task(ctx, &task)))
}

pub async fn cloud_plan_action(
    auth: Auth,
    State(state): State<EmState>,
    ctx: Ctx,
    params: Params,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> EmResult {
    act(&state, &auth, &ctx, &params, (&headers, &body), &id, PlanKind::Cloud).await
}

pub async fn plan_action(
    auth: Auth,
    State(state): State<EmState>,
    ctx: Ctx,
    params: Params,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> EmResult {
    act(&state, &auth, &ctx, &params, (&headers, &body), &id, PlanKind::Plain).await
}

// -------------------------------------------------------------------------------------------------
// Tasks

pub async fn tasks_list(auth: Auth, State(state): State<EmState>, ctx: Ctx) -> Reply {
    Reply::ok(views::tasks(&ctx, &state.tasks.list(auth.caller.tenant_id)))
}

pub async fn task_get(auth: Auth, State(state): State<EmState>, ctx: Ctx, Path(id): Path<String>) -> EmResult {
    let t = state.tasks.get(auth.caller.tenant_id, &id).ok_or_else(|| Error::not_found("task", &id))?;
    Ok(Reply::ok(views::task(&ctx, &t)))
}

pub async fn task_delete(auth: Auth, State(state): State<EmState>, Path(id): Path<String>) -> EmResult {
    state.tasks.remove(auth.caller.tenant_id, &id).ok_or_else(|| Error::not_found("task", &id))?;
    Ok(Reply::no_content())
}

// -------------------------------------------------------------------------------------------------
// Query service

pub async fn query(auth: Auth, State(state): State<EmState>, ctx: Ctx, params: Params) -> EmResult {
    Ok(Reply::ok(super::query::run(&state, &auth.caller, &ctx, &params).await?))
}
