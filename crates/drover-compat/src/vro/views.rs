//! The dialect's wire types, separate from drover's domain types, with explicit conversions.
//!
//! Property names are camelCase as the Recovery Orchestrator documents them. State identifiers
//! and names follow spec 1.6; the conversion is spelled out here (not derived from the domain
//! enum's variant names), so a renamed domain variant cannot change the wire.

use drover_types::{self as d, PlanState, RecoveryLocationKind, Role, Session, SessionResult, SessionState};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// The control plane as this dialect's `serverId`: one drover is one orchestrator server.
/// **Decision:** a fixed id, the same on every installation.
pub const SERVER_ID: Uuid = crate::CONTROL_PLANE_ID;

/// **Decision:** drover has no report templates; every plan names this one.
pub const REPORT_TEMPLATE_ID: Uuid = Uuid::nil();

/// The API identifier of a plan state (`state`, spec 1.6).
pub fn state_id(s: PlanState) -> &'static str {
    use PlanState as S;
    match s {
        S::NeedsVerified => "NeedsVerified",
        S::NotVerified => "NotVerified",
        S::Verified => "Verified",
        S::Checking => "Checking",
        S::FailoverInProgress => "FailoverInProgress",
        S::Failover => "Failover",
        S::Halting => "Halting",
        S::Halted => "Halted",
        S::UndoFailoverInProgress => "UndoFailoverInProgress",
        S::UndoFailover => "UndoFailover",
        S::PermanentFailoverInProgress => "PermanentFailoverInProgress",
        S::PermanentFailover => "PermanentFailover",
        S::PrepareForFailbackInProgress => "PrepareForFailbackInProgress",
        S::PrepareForFailback => "PrepareForFailback",
        S::FailbackInProgress => "FailbackInProgress",
        S::Failback => "Failback",
        S::UndoFailbackInProgress => "UndoFailbackInProgress",
        S::UndoFailback => "UndoFailback",
        S::CommitFailbackInProgress => "CommitFailbackInProgress",
        S::CommitFailback => "CommitFailback",
    }
}

/// `stateOrder`: **decision** the state's position in the table of spec 1.6 (from 0).
pub fn state_order(s: PlanState) -> u32 {
    PlanState::ALL.iter().position(|x| *x == s).unwrap_or(0) as u32
}

/// `Undefined` | `Success` | `Warning` | `Error`: how the last run, test or check went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum ExecutionResult {
    Undefined,
    Success,
    Warning,
    Error,
}

impl ExecutionResult {
    /// `errors`: the session's steps that stand failed. A session halted by a failure is an
    /// error; one halted on request has simply not finished.
    pub fn of(session: Option<&Session>, errors: u64) -> ExecutionResult {
        match session {
            None => ExecutionResult::Undefined,
            Some(s) if s.halted && (errors > 0 || s.failure_message.is_some()) => ExecutionResult::Error,
            Some(s) if s.halted => ExecutionResult::Undefined,
            Some(s) if s.state != SessionState::Stopped => ExecutionResult::Undefined,
            Some(s) => match s.result {
                SessionResult::None => ExecutionResult::Undefined,
                SessionResult::Success => ExecutionResult::Success,
                SessionResult::Warning => ExecutionResult::Warning,
                SessionResult::Failed => ExecutionResult::Error,
            },
        }
    }
}

/// What a plan's representations need besides the plan: its tenant and its sessions.
#[derive(Debug, Clone, Default)]
pub struct PlanFacts {
    pub site_scope_id: Uuid,
    pub site_scope_name: String,
    /// The name of the plan's recovery location.
    pub recovery_location_name: String,
    /// The newest session that moves the plan's state (everything but test failovers).
    pub current: Option<Session>,
    /// The current session's steps that were skipped (warnings) and that stand failed (errors).
    pub warnings: u64,
    pub errors: u64,
    pub last_run: Option<Session>,
    pub last_test: Option<Session>,
    pub last_check: Option<Session>,
    /// The newest failback went to another location than the original VMs.
    pub recovery_to_new_location: bool,
}

impl PlanFacts {
    /// The failed steps of a session: counted for the current session; for an older one,
    /// assumed (only the current session can be halted).
    fn errors_of(&self, s: Option<&Session>) -> u64 {
        match (s, &self.current) {
            (Some(s), Some(c)) if s.id == c.id => self.errors,
            _ => 1,
        }
    }

    /// The result of one of the plan's sessions. The saga moves the plan to HALTED just before it
    /// records its session halted, so a plan already HALTED shows its current session as halted.
    pub fn result_of(&self, p: &d::Plan, s: Option<&Session>) -> ExecutionResult {
        ExecutionResult::of(s.map(|s| self.as_shown(p, s)).as_ref(), self.errors_of(s))
    }

    /// A session as the plan shows it: the current one, still working, of a HALTED plan is halted.
    fn as_shown(&self, p: &d::Plan, s: &Session) -> Session {
        let halting = p.lifecycle.state == PlanState::Halted
            && s.state != SessionState::Stopped
            && self.current.as_ref().is_some_and(|c| c.id == s.id);
        Session { halted: s.halted || halting, ..s.clone() }
    }

    /// `resultName` as of the state shown: a plan that has just been moved to a running state
    /// and whose session is not recorded yet is "In progress" too, not the previous result.
    pub fn result_name(&self, p: &d::Plan) -> String {
        if self.state(p).is_running() && self.current.as_ref().is_none_or(|c| c.state == SessionState::Stopped) {
            return "In progress".into();
        }
        let current = self.current.as_ref().map(|c| self.as_shown(p, c));
        result_name(current.as_ref(), self.warnings, self.errors)
    }

    /// `totalProgress` of the execution the state shows.
    pub fn progress(&self, p: &d::Plan) -> u8 {
        match &self.current {
            Some(c) if !(self.state(p).is_running() && c.state == SessionState::Stopped) => c.progress.min(100),
            _ => 0,
        }
    }

    /// The state to show. A plan session moves the plan to its stable state in its last step and
    /// stops just after; in between, the plan still shows the running state, so that a client
    /// that polls until a stable state reads a finished result.
    pub fn state(&self, p: &d::Plan) -> PlanState {
        let s = p.lifecycle.state;
        match &self.current {
            Some(c) if s.is_stable() && s != PlanState::Halted && c.state != SessionState::Stopped && !c.halted => {
                running_state_of(c).unwrap_or(s)
            }
            _ => s,
        }
    }
}

/// The running state a plan session stands for (its undo's, when it is being undone).
pub fn running_state_of(s: &Session) -> Option<PlanState> {
    use d::SessionKind as K;
    let undoing = s.params.get("_undo").and_then(serde_json::Value::as_bool) == Some(true);
    Some(match (s.kind, undoing) {
        (K::PlanFailover | K::PlanPermanentFailover, true) => PlanState::UndoFailoverInProgress,
        (K::PlanFailback | K::PlanPrepareFailback, true) => PlanState::UndoFailbackInProgress,
        (_, true) => return None,
        (K::PlanReadinessCheck, _) => PlanState::Checking,
        (K::PlanFailover, _) => PlanState::FailoverInProgress,
        (K::PlanUndoFailover, _) => PlanState::UndoFailoverInProgress,
        (K::PlanPermanentFailover, _) => PlanState::PermanentFailoverInProgress,
        (K::PlanPrepareFailback, _) => PlanState::PrepareForFailbackInProgress,
        (K::PlanFailback, _) => PlanState::FailbackInProgress,
        (K::PlanUndoFailback, _) => PlanState::UndoFailbackInProgress,
        (K::PlanCommitFailback, _) => PlanState::CommitFailbackInProgress,
        _ => return None,
    })
}

fn count(n: u64, one: &str, many: &str) -> String {
    if n == 1 { format!("1 {one}") } else { format!("{n} {many}") }
}

/// `resultName`, e.g. "Complete, no errors, 1 warning" (**decision**: empty before the first run,
/// "In progress" while running, "Halted, ..." while halted, "Failed, ..." after a failure).
pub fn result_name(current: Option<&Session>, warnings: u64, errors: u64) -> String {
    let Some(s) = current else { return String::new() };
    let errors = if s.result == SessionResult::Failed && errors == 0 { 1 } else { errors };
    let head = if s.halted {
        "Halted"
    } else if s.state != SessionState::Stopped {
        return "In progress".into();
    } else if s.result == SessionResult::Failed {
        "Failed"
    } else {
        "Complete"
    };
    let errors = if errors == 0 { "no errors".to_string() } else { count(errors, "error", "errors") };
    let mut name = format!("{head}, {errors}");
    if warnings > 0 {
        name.push_str(", ");
        name.push_str(&count(warnings, "warning", "warnings"));
    }
    name
}

// ------------------------------------------------------------------------------------------------
// Schemas of the string values below: each the values the functions that make them can return.

use drover_api::openapi::{or_null, string_enum};
use utoipa::openapi::schema::{Array, ArrayBuilder, Object};

fn schema_plan_type() -> Object {
    string_enum(["Replica"])
}
fn schema_state() -> Object {
    string_enum(PlanState::ALL.map(state_id))
}
fn schema_state_or_null() -> Object {
    or_null(schema_state())
}
fn schema_state_name() -> Object {
    string_enum(PlanState::ALL.map(PlanState::display_name))
}
fn schema_mode() -> Object {
    string_enum(["ENABLED", "DISABLED", "IN-USE"])
}
fn schema_roles() -> Array {
    ArrayBuilder::new().items(string_enum(Role::ALL.map(role_name))).build()
}
fn schema_step_type() -> Object {
    string_enum(example_step_kinds().iter().map(step_type))
}
fn schema_step_parameter() -> Object {
    let mut names: Vec<&str> = example_step_kinds().iter().flat_map(step_parameters).map(|p| p.name).collect();
    names.sort_unstable();
    names.dedup();
    string_enum(names)
}
/// One step of each kind.
fn example_step_kinds() -> [d::PlanStepKind; 4] {
    [
        d::PlanStepKind::PowerOn,
        d::PlanStepKind::WaitHeartbeat { timeout_secs: 0 },
        d::PlanStepKind::CheckTcpPort { port: 1, timeout_secs: 0 },
        d::PlanStepKind::RunScript { path: String::new(), args: Vec::new(), timeout_secs: 0 },
    ]
}
fn schema_progress_state() -> Object {
    string_enum(["Pending", "Running", "Complete"])
}
fn schema_step_state() -> Object {
    string_enum(["Pending", "Running", "Success", "Error", "Skipped", "Undone"])
}
fn schema_location_type() -> Object {
    string_enum(["Restore"])
}
fn schema_availability() -> Object {
    string_enum(["Available", "PartiallyAvailable", "Unavailable"])
}
fn schema_grant_type() -> Object {
    string_enum(["password", "refresh_token", "client_credentials"])
}
fn schema_client_role() -> Object {
    or_null(string_enum(Role::ALL.map(role_name).into_iter().chain(Role::ALL.map(Role::as_str))))
}

/// `RecoveryPlanInfo` (spec 1.3).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPlanInfo {
    pub id: Uuid,
    /// Always `Replica`.
    #[schema(schema_with = schema_plan_type)]
    pub plan_type: &'static str,
    pub recovery_location_id: Uuid,
    /// The name of that recovery location (**decision**: never null; a location a plan uses
    /// cannot be deleted, and the Original VM Location is built in).
    pub recovery_location_name: String,
    pub server_id: Uuid,
    /// The plan's tenant.
    pub site_scope_id: Uuid,
    pub site_scope_name: String,
    pub name: String,
    /// The API identifier of the state (spec 1.6), e.g. `FailoverInProgress`.
    #[schema(schema_with = schema_state)]
    pub state: &'static str,
    /// The UI name, e.g. `FAILOVER`.
    #[schema(schema_with = schema_state_name)]
    pub state_name: &'static str,
    /// How the newest execution went, e.g. "Complete, no errors, 1 warning".
    pub result_name: String,
    #[schema(schema_with = schema_state)]
    pub last_stable_state: &'static str,
    #[schema(schema_with = schema_state_name)]
    pub last_stable_state_name: &'static str,
    /// The running state a HALTED plan was in when it halted; null otherwise.
    #[schema(schema_with = schema_state_or_null)]
    pub previous_execution_state: Option<&'static str>,
    pub report_template_id: Uuid,
    pub description: String,
    /// Only an enabled plan runs.
    pub enabled: bool,
    #[schema(schema_with = schema_mode)]
    pub mode: &'static str,
}

impl From<(&d::Plan, &PlanFacts)> for RecoveryPlanInfo {
    fn from((p, f): (&d::Plan, &PlanFacts)) -> Self {
        let l = p.lifecycle;
        let state = f.state(p);
        RecoveryPlanInfo {
            id: p.id.0,
            plan_type: "Replica",
            recovery_location_id: p.recovery_location_id.0,
            recovery_location_name: f.recovery_location_name.clone(),
            server_id: SERVER_ID,
            site_scope_id: f.site_scope_id,
            site_scope_name: f.site_scope_name.clone(),
            name: p.name.clone(),
            state: state_id(state),
            state_name: state.display_name(),
            result_name: f.result_name(p),
            last_stable_state: state_id(l.last_stable),
            last_stable_state_name: l.last_stable.display_name(),
            previous_execution_state: l.interrupted.map(state_id),
            report_template_id: REPORT_TEMPLATE_ID,
            description: p.description.clone(),
            enabled: p.enabled,
            mode: match p.mode() {
                d::PlanMode::Enabled => "ENABLED",
                d::PlanMode::Disabled => "DISABLED",
                d::PlanMode::InUse => "IN-USE",
            },
        }
    }
}

/// `GET /RuntimeDetails/Plans/{planId}` (spec 1.4).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanRuntimeDetails {
    pub id: Uuid,
    #[schema(schema_with = schema_plan_type)]
    pub plan_type: &'static str,
    #[schema(schema_with = schema_state)]
    pub state: &'static str,
    #[schema(schema_with = schema_state_name)]
    pub state_name: &'static str,
    pub state_order: u32,
    pub result_name: String,
    #[schema(schema_with = schema_state)]
    pub last_stable_state: &'static str,
    #[schema(schema_with = schema_state_name)]
    pub last_stable_state_name: &'static str,
    /// 0–100, of the current execution.
    pub total_progress: u8,
    pub is_running_state: bool,
    pub is_stable_state: bool,
    pub current_run_result: ExecutionResult,
    pub current_test_result: ExecutionResult,
    pub current_check_result: ExecutionResult,
    pub recovery_location_id: Uuid,
    pub site_scope_id: Uuid,
    pub site_scope_name: String,
    pub recovery_to_new_location: bool,
    pub is_undo_possible: bool,
    pub is_reverse_possible: bool,
    pub is_editing_by_current_user: bool,
    /// Who edits the plan now: drover edits plans in one request, so always null.
    pub current_editing_user: Option<String>,
    /// The caller's roles.
    #[schema(schema_with = schema_roles)]
    pub roles: Vec<&'static str>,
}

/// The role names of the Recovery Orchestrator.
pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::Viewer => "Viewer",
        Role::PlanOperator => "Plan Operator",
        Role::PlanAuthor => "Plan Author",
        Role::Administrator => "Administrator",
    }
}

impl PlanRuntimeDetails {
    pub fn new(p: &d::Plan, f: &PlanFacts, caller_role: Role) -> Self {
        let l = p.lifecycle;
        let state = f.state(p);
        let possible = |a| state.is_stable() && l.apply(d::PlanEvent::Requested(a), true).is_ok();
        let running = state.is_running();
        PlanRuntimeDetails {
            id: p.id.0,
            plan_type: "Replica",
            state: state_id(state),
            state_name: state.display_name(),
            state_order: state_order(state),
            result_name: f.result_name(p),
            last_stable_state: state_id(l.last_stable),
            last_stable_state_name: l.last_stable.display_name(),
            total_progress: f.progress(p),
            is_running_state: running,
            is_stable_state: !running,
            current_run_result: f.result_of(p, f.last_run.as_ref()),
            current_test_result: f.result_of(p, f.last_test.as_ref()),
            current_check_result: f.result_of(p, f.last_check.as_ref()),
            recovery_location_id: p.recovery_location_id.0,
            site_scope_id: f.site_scope_id,
            site_scope_name: f.site_scope_name.clone(),
            recovery_to_new_location: f.recovery_to_new_location,
            is_undo_possible: possible(d::PlanAction::Undo),
            is_reverse_possible: possible(d::PlanAction::FailbackToProduction)
                || possible(d::PlanAction::PrepareToFailback),
            is_editing_by_current_user: false,
            current_editing_user: None,
            roles: vec![role_name(caller_role)],
        }
    }
}

/// A group of a plan.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanGroupInfo {
    pub id: Uuid,
    pub plan_id: Uuid,
    pub name: String,
    /// Position in the plan, from 1.
    pub order: u32,
    pub is_parallel: bool,
    /// VMs of the group started at once (1 when sequential).
    pub max_parallel_vms: u32,
    pub delay_seconds: u32,
    /// A failure in a critical group halts the plan.
    pub is_critical: bool,
    pub restore_vm_tags: bool,
    pub vm_count: u32,
}

impl From<(&d::Plan, usize, &d::PlanGroup)> for PlanGroupInfo {
    fn from((p, i, g): (&d::Plan, usize, &d::PlanGroup)) -> Self {
        let (is_parallel, max) = match g.mode {
            d::GroupMode::Sequential => (false, 1),
            d::GroupMode::Parallel { max } => (true, max),
        };
        PlanGroupInfo {
            id: g.id.0,
            plan_id: p.id.0,
            name: g.name.clone(),
            order: i as u32 + 1,
            is_parallel,
            max_parallel_vms: max,
            delay_seconds: g.delay_secs,
            is_critical: g.critical,
            restore_vm_tags: g.restore_tags,
            vm_count: g.vms.len() as u32,
        }
    }
}

/// A VM of a plan group.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanVmInfo {
    /// The VM's id.
    pub id: Uuid,
    pub plan_id: Uuid,
    pub group_id: Uuid,
    pub name: String,
    /// Position in its group, from 1.
    pub order: u32,
    pub step_count: u32,
    /// **Decision (a drover extension; clients that do not know it ignore it):** the newest
    /// restore point a failover of this VM would boot, with whether it is application- or
    /// crash-consistent and why. Absent while the VM has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest_restore_point: Option<RestorePointSummary>,
}

/// A restore point as a plan's VM shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestorePointSummary {
    pub id: Uuid,
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// `ApplicationConsistent` (cut while the guest agent held the guest's file systems frozen)
    /// or `CrashConsistent`.
    #[schema(example = "ApplicationConsistent")]
    pub consistency: &'static str,
    pub consistency_reason: Option<String>,
}

impl From<&d::RestorePoint> for RestorePointSummary {
    fn from(p: &d::RestorePoint) -> Self {
        RestorePointSummary {
            id: p.id.0,
            created_at: p.created_at,
            consistency: match p.consistency.kind {
                d::ConsistencyKind::Application => "ApplicationConsistent",
                d::ConsistencyKind::Crash => "CrashConsistent",
            },
            consistency_reason: p.consistency.reason.clone(),
        }
    }
}

/// A step of a VM in a plan.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlanStepInfo {
    pub id: Uuid,
    pub plan_id: Uuid,
    pub group_id: Uuid,
    pub vm_id: Uuid,
    pub name: String,
    #[schema(schema_with = schema_step_type)]
    pub r#type: &'static str,
    /// A failed critical step fails its VM; a non-critical one gives a warning.
    pub is_critical: bool,
    /// Position among the VM's steps, from 1.
    pub order: u32,
}

pub fn step_type(k: &d::PlanStepKind) -> &'static str {
    match k {
        d::PlanStepKind::PowerOn => "PowerOn",
        d::PlanStepKind::WaitHeartbeat { .. } => "WaitHeartbeat",
        d::PlanStepKind::CheckTcpPort { .. } => "CheckTcpPort",
        d::PlanStepKind::RunScript { .. } => "RunScript",
    }
}

/// A parameter of a step, as text.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepParameter {
    #[schema(schema_with = schema_step_parameter)]
    pub name: &'static str,
    pub value: String,
}

pub fn step_parameters(k: &d::PlanStepKind) -> Vec<StepParameter> {
    let p = |name, value: String| StepParameter { name, value };
    match k {
        d::PlanStepKind::PowerOn => Vec::new(),
        d::PlanStepKind::WaitHeartbeat { timeout_secs } => vec![p("TimeoutSeconds", timeout_secs.to_string())],
        d::PlanStepKind::CheckTcpPort { port, timeout_secs } => {
            vec![p("Port", port.to_string()), p("TimeoutSeconds", timeout_secs.to_string())]
        }
        d::PlanStepKind::RunScript { path, args, timeout_secs } => {
            vec![p("Path", path.clone()), p("Arguments", args.join(" ")), p("TimeoutSeconds", timeout_secs.to_string())]
        }
    }
}

/// How one VM of the plan fares in the current execution.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeVm {
    pub id: Uuid,
    pub group_id: Uuid,
    pub name: String,
    #[schema(schema_with = schema_progress_state)]
    pub state: &'static str,
    pub result: ExecutionResult,
    pub progress: u8,
    pub failure_message: Option<String>,
}

/// How one group of the plan fares in the current execution.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeGroup {
    pub id: Uuid,
    pub name: String,
    pub order: u32,
    #[schema(schema_with = schema_progress_state)]
    pub state: &'static str,
    pub result: ExecutionResult,
    pub progress: u8,
}

/// The runtime view of one VM from its task in the current session (none: not run yet). In a
/// halted session nothing runs: a VM whose step failed reads `Complete` with its error, one that
/// has not finished `Pending` (a Continue runs it on).
pub fn runtime_vm(group: Uuid, vm: Uuid, name: String, task: Option<&d::Task>, halted: bool) -> RuntimeVm {
    let Some(t) = task else {
        return RuntimeVm {
            id: vm,
            group_id: group,
            name,
            state: "Pending",
            result: ExecutionResult::Undefined,
            progress: 0,
            failure_message: None,
        };
    };
    RuntimeVm {
        id: vm,
        group_id: group,
        name,
        state: match t.state {
            SessionState::Stopped => "Complete",
            _ if halted && t.result == SessionResult::Failed => "Complete",
            _ if halted => "Pending",
            SessionState::Starting => "Pending",
            SessionState::Working | SessionState::Stopping => "Running",
        },
        result: match t.result {
            SessionResult::None => ExecutionResult::Undefined,
            SessionResult::Success => ExecutionResult::Success,
            SessionResult::Warning => ExecutionResult::Warning,
            SessionResult::Failed => ExecutionResult::Error,
        },
        progress: t.progress.min(100),
        failure_message: t.failure_message.clone(),
    }
}

/// A group's runtime view from those of its VMs: the worst result, the least advanced state
/// (in a halted session, where nothing runs, `Pending` while a VM has not finished).
pub fn runtime_group(g: &d::PlanGroup, order: usize, vms: &[RuntimeVm], halted: bool) -> RuntimeGroup {
    let rank = |s: &str| match s {
        "Pending" => 0,
        "Running" => 1,
        _ => 2,
    };
    let state = if vms.iter().any(|v| v.state == "Running")
        || (!halted && vms.iter().any(|v| v.state == "Complete") && vms.iter().any(|v| v.state == "Pending"))
    {
        "Running"
    } else {
        vms.iter().map(|v| v.state).min_by_key(|s| rank(s)).unwrap_or("Pending")
    };
    let result_rank = |r: ExecutionResult| match r {
        ExecutionResult::Undefined => 0,
        ExecutionResult::Success => 1,
        ExecutionResult::Warning => 2,
        ExecutionResult::Error => 3,
    };
    let result = if state == "Complete" {
        vms.iter().map(|v| v.result).max_by_key(|r| result_rank(*r)).unwrap_or(ExecutionResult::Undefined)
    } else if vms.iter().any(|v| v.result == ExecutionResult::Error) {
        ExecutionResult::Error
    } else {
        ExecutionResult::Undefined
    };
    let progress = if vms.is_empty() {
        0
    } else {
        (vms.iter().map(|v| u32::from(v.progress)).sum::<u32>() / vms.len() as u32) as u8
    };
    RuntimeGroup { id: g.id.0, name: g.name.clone(), order: order as u32 + 1, state, result, progress }
}

/// How one plan step fared in the plan's newest failover (plan steps run there).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeStep {
    /// The plan step's id.
    pub id: Uuid,
    pub vm_id: Uuid,
    pub name: String,
    #[schema(schema_with = schema_step_type)]
    pub r#type: &'static str,
    /// Position among the VM's steps, from 1.
    pub order: u32,
    #[schema(schema_with = schema_step_state)]
    pub state: &'static str,
    pub attempts: u32,
    pub error_message: Option<String>,
}

/// The saga step that carries plan step `k` of the plan's `index`-th VM in a failover: the
/// power-on is the VM's boot, every other step its own (see the engine's failover saga).
pub fn saga_step_name(index: usize, k: usize, kind: &d::PlanStepKind) -> String {
    match kind {
        d::PlanStepKind::PowerOn => format!("boot:{index}"),
        _ => format!("step:{index}:{k}"),
    }
}

impl RuntimeStep {
    pub fn new(vm: d::VmId, k: usize, step: &d::PlanStep, record: Option<&d::StepRecord>) -> Self {
        use d::StepState as S;
        RuntimeStep {
            id: step.id.0,
            vm_id: vm.0,
            name: step.name.clone(),
            r#type: step_type(&step.kind),
            order: k as u32 + 1,
            state: match record.map(|r| r.state) {
                None | Some(S::Pending) => "Pending",
                Some(S::Started) => "Running",
                Some(S::Done) => "Success",
                Some(S::Failed) => "Error",
                Some(S::Skipped) => "Skipped",
                Some(S::UndoStarted | S::Undone) => "Undone",
            },
            attempts: record.map_or(0, |r| r.attempts),
            error_message: record.and_then(|r| r.error.clone()),
        }
    }
}

/// A recovery location (spec 1.5).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryLocationInfo {
    pub id: Uuid,
    /// `Restore` (drover has no storage locations).
    #[schema(schema_with = schema_location_type)]
    pub r#type: &'static str,
    pub name: String,
    pub description: String,
    /// drover does not re-address VMs: always false.
    pub use_re_ip: bool,
    pub use_network_mapping: bool,
    /// The hosts VMs restored here run on.
    pub compute_groups: Vec<ComputeGroup>,
    pub re_ip_rules: Vec<serde_json::Value>,
    pub network_mapping_rules: Vec<NetworkMappingRule>,
    #[schema(schema_with = schema_availability)]
    pub availability: &'static str,
    pub is_original: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ComputeGroup {
    pub host_id: Uuid,
    pub datastore_id: Uuid,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkMappingRule {
    pub source_network: String,
    pub target_network: String,
}

impl RecoveryLocationInfo {
    /// `host_and_datastore_exist`: whether what the location points at is still there.
    pub fn new(l: &d::RecoveryLocation, host_and_datastore_exist: bool) -> Self {
        let original = l.kind == RecoveryLocationKind::Original;
        RecoveryLocationInfo {
            id: l.id.0,
            r#type: "Restore",
            name: l.name.clone(),
            description: l.description.clone(),
            use_re_ip: false,
            use_network_mapping: !l.network_mappings.is_empty(),
            compute_groups: match (l.host_id, l.datastore_id) {
                (Some(h), Some(ds)) => vec![ComputeGroup { host_id: h.0, datastore_id: ds.0 }],
                _ => Vec::new(),
            },
            re_ip_rules: Vec::new(),
            network_mapping_rules: l
                .network_mappings
                .iter()
                .map(|m| NetworkMappingRule { source_network: m.from.clone(), target_network: m.to.clone() })
                .collect(),
            availability: if original || host_and_datastore_exist { "Available" } else { "Unavailable" },
            is_original: original,
        }
    }
}

fn schema_scope_state() -> Object {
    string_enum(["Active"])
}

/// A scope (`GET /Scopes`). **Decision:** a drover tenant is one scope: the caller's tenant, the
/// same id and name as `siteScopeId`/`siteScopeName` of its plans.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScopeInfo {
    /// The tenant's id.
    pub id: Uuid,
    /// The tenant's name.
    pub name: String,
    /// drover's tenants have no description: always empty.
    pub description: String,
    /// The tenant created on first start, as the product's built-in "Admin Scope" is its default.
    pub is_default: bool,
    /// A tenant is always active.
    #[schema(schema_with = schema_scope_state)]
    pub state: &'static str,
    pub server_id: Uuid,
    /// The name of the disaster-recovery site the tenant sees (the first by name; a production
    /// site when it sees no disaster-recovery one); null when it sees no site.
    pub site_name: Option<String>,
}

impl ScopeInfo {
    /// `sites`: the sites the tenant sees, in any order.
    pub fn new(tenant: &d::Tenant, sites: &[d::Site]) -> ScopeInfo {
        let site_name = sites
            .iter()
            .min_by_key(|s| (s.kind != d::SiteKind::DisasterRecovery, s.name.to_lowercase(), s.id.0))
            .map(|s| s.name.clone());
        ScopeInfo {
            id: tenant.id.0,
            name: tenant.name.clone(),
            description: String::new(),
            is_default: tenant.is_system,
            state: "Active",
            server_id: SERVER_ID,
            site_name,
        }
    }
}

/// License usage (`/LicenseUsage/Server`, `/License/Usage/Server`, `/Plans/{planId}/LicenseUsage`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LicenseUsage {
    /// Instances of VMs added to plans that do not count yet. drover has no license and no
    /// grace period: always 0.
    pub new_instances: u64,
    /// The distinct VMs in the plans counted (each VM once, however many plans hold it).
    pub managed_instances: u64,
}

impl LicenseUsage {
    /// The usage of `plans`: the distinct VMs they hold.
    pub fn of<'a>(plans: impl IntoIterator<Item = &'a d::Plan>) -> LicenseUsage {
        let vms: std::collections::BTreeSet<Uuid> =
            plans.into_iter().flat_map(|p| p.groups.iter().flat_map(|g| g.vms.iter().map(|v| v.vm_id.0))).collect();
        LicenseUsage { new_instances: 0, managed_instances: vms.len() as u64 }
    }
}

fn schema_checking_state() -> Object {
    string_enum([state_id(PlanState::Checking)])
}

/// The answer to `POST /Plans/{planId}/ReadinessCheck`: the check has started.
/// **Decision:** the product documents no body for it; this one names what a client needs to
/// follow the check (RuntimeDetails of the plan, or the session in the native API).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadinessCheckStarted {
    pub plan_id: Uuid,
    /// The session that runs the check.
    pub session_id: Option<Uuid>,
    /// The plan's state now: `Checking`.
    #[schema(schema_with = schema_checking_state)]
    pub state: &'static str,
    /// drover writes the check into its session's log; no separate report: always false.
    pub report_generated: bool,
}

/// `POST /api/token` response: the native API's token, the same on the wire.
pub use drover_api::views::TokenResponse;

/// The fields of `POST /api/token` (form-urlencoded or multipart).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct TokenRequest {
    #[schema(schema_with = schema_grant_type)]
    pub grant_type: String,
    /// `USER` or `DOMAIN\USER`.
    pub username: Option<String>,
    pub password: Option<String>,
    pub refresh_token: Option<String>,
    /// A client's id (a UUID); any other text is refused like a wrong secret (401).
    #[schema(format = Uuid)]
    pub client_id: Option<String>,
    pub client_secret: Option<String>,
}

/// `POST /api/v3/Clients` body (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewClientBody {
    /// The role the client acts with (default `Plan Operator`; case and spaces do not matter).
    #[serde(default)]
    #[schema(schema_with = schema_client_role)]
    pub role: Option<String>,
}

/// A new client's credentials, for `grant_type=client_credentials`. The secret is shown once.
#[derive(Debug, Serialize, ToSchema)]
pub struct ClientCredentials {
    pub client_id: Uuid,
    pub client_secret: String,
}

// ------------------------------------------------------------------------------------------------
// Action bodies

/// `POST /Plans/{planId}/Failover`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailoverBody {
    /// drover has no chained plans: accepted and ignored.
    #[serde(default)]
    pub execute_chained_plans: bool,
    /// The newest restore point at or before this time; null: the newest point.
    #[serde(default, alias = "restorepointDate")]
    pub restore_point_date: Option<chrono::DateTime<chrono::Utc>>,
    /// drover has no storage volumes: accepted and ignored.
    #[serde(default)]
    pub protect_storage_volumes: bool,
}

/// `POST /Plans/{planId}/FailbackToProduction` (seed 000).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailbackBody {
    /// The Original VM Location (`00000000-0000-0000-0000-000000000000`) or another recovery
    /// location; absent: the plan's recovery location.
    #[serde(default)]
    pub restore_location_id: Option<Uuid>,
    /// Give the restored VMs the original VMs' tags (failback to another location).
    #[serde(default, rename = "failbackRestoreVMTags", alias = "failbackRestoreVmTags")]
    pub failback_restore_vm_tags: bool,
}

/// `POST /Plans/{planId}/Halt`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HaltBody {
    /// drover always lets running steps finish: accepted, with the same effect either way.
    #[serde(default, alias = "fullstop")]
    pub full_stop: bool,
}

/// `POST /Plans/{planId}/Continue`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContinueBody {
    /// Default: `RetryFailedStep`.
    #[serde(default)]
    #[schema(schema_with = drover_api::openapi::continue_option_or_null)]
    pub execution_continue_options: Option<drover_engine::saga::ContinueOption>,
}

/// `POST /Plans/{planId}/ReadinessCheck`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadinessCheckBody {
    /// drover writes the check into the session's log; no separate report.
    #[serde(default)]
    pub generate_report: bool,
}

/// `POST /Plans/{planId}/ResetState`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResetStateBody {
    /// Not supported: a reset plan is disabled, and only an enabled plan is checked. Accepted
    /// and ignored.
    #[serde(default)]
    pub execute_readiness_check: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(state: SessionState, result: SessionResult, halted: bool) -> Session {
        let mut s = Session::new(
            d::TenantId::new(),
            d::SessionKind::PlanFailover,
            "p",
            d::SessionTarget::Plan(d::PlanId::new()),
            serde_json::Value::Null,
        );
        (s.state, s.result, s.halted) = (state, result, halted);
        s
    }

    #[test]
    fn result_names_read_like_the_products() {
        let done = session(SessionState::Stopped, SessionResult::Success, false);
        assert_eq!(result_name(None, 0, 0), "");
        assert_eq!(result_name(Some(&done), 0, 0), "Complete, no errors");
        assert_eq!(result_name(Some(&done), 1, 0), "Complete, no errors, 1 warning");
        assert_eq!(result_name(Some(&done), 3, 2), "Complete, 2 errors, 3 warnings");
        let failed = session(SessionState::Stopped, SessionResult::Failed, false);
        assert_eq!(result_name(Some(&failed), 0, 0), "Failed, 1 error");
        let halted = session(SessionState::Working, SessionResult::None, true);
        assert_eq!(result_name(Some(&halted), 0, 2), "Halted, 2 errors");
        assert_eq!(result_name(Some(&halted), 1, 0), "Halted, no errors, 1 warning");
        let running = session(SessionState::Working, SessionResult::None, false);
        assert_eq!(result_name(Some(&running), 0, 0), "In progress");
        assert_eq!(ExecutionResult::of(Some(&running), 0), ExecutionResult::Undefined);
        assert_eq!(ExecutionResult::of(Some(&halted), 1), ExecutionResult::Error);
        assert_eq!(ExecutionResult::of(Some(&halted), 0), ExecutionResult::Undefined, "halted on request");
        assert_eq!(ExecutionResult::of(Some(&done), 0), ExecutionResult::Success);
    }

    #[test]
    fn a_concluded_plan_shows_its_running_state_until_its_session_stops() {
        let mut plan = d::Plan {
            id: d::PlanId::new(),
            tenant_id: d::TenantId::new(),
            name: "p".into(),
            description: String::new(),
            enabled: true,
            lifecycle: d::PlanLifecycle::default(),
            recovery_location_id: d::RecoveryLocationId::ORIGINAL,
            groups: Vec::new(),
            created_at: d::now(),
            updated_at: d::now(),
        };
        plan.lifecycle.state = PlanState::Failover;
        let mut f = PlanFacts {
            current: Some(session(SessionState::Working, SessionResult::None, false)),
            ..Default::default()
        };
        assert_eq!(f.state(&plan), PlanState::FailoverInProgress);
        let info = PlanRuntimeDetails::new(&plan, &f, Role::Viewer);
        assert!(info.is_running_state && !info.is_undo_possible && !info.is_reverse_possible);
        f.current = Some(session(SessionState::Stopped, SessionResult::Success, false));
        f.current.as_mut().unwrap().progress = 100;
        assert_eq!(f.state(&plan), PlanState::Failover);
        assert_eq!((f.result_name(&plan), f.progress(&plan)), ("Complete, no errors".to_string(), 100));
        // Moved to a running state before its session is recorded: not the previous result.
        plan.lifecycle.state = PlanState::UndoFailoverInProgress;
        assert_eq!((f.result_name(&plan), f.progress(&plan)), ("In progress".to_string(), 0));
        plan.lifecycle.state = PlanState::Failover;
        // Being undone after a halt: the undo's running state.
        let mut undoing = session(SessionState::Working, SessionResult::None, false);
        undoing.params = serde_json::json!({"_undo": true});
        plan.lifecycle.state = PlanState::UndoFailover;
        f.current = Some(undoing);
        assert_eq!(f.state(&plan), PlanState::UndoFailoverInProgress);
        // HALTED by a critical failure, its session not yet recorded halted: already an error.
        let failing = session(SessionState::Working, SessionResult::None, false);
        (f.current, f.last_run, f.errors) = (Some(failing.clone()), Some(failing), 1);
        plan.lifecycle.state = PlanState::Halted;
        let info = PlanRuntimeDetails::new(&plan, &f, Role::Viewer);
        assert_eq!((info.current_run_result, info.result_name.as_str()), (ExecutionResult::Error, "Halted, 1 error"));
        plan.lifecycle.state = PlanState::FailbackInProgress;
        let info = PlanRuntimeDetails::new(&plan, &f, Role::Viewer);
        assert_eq!((info.current_run_result, info.result_name.as_str()), (ExecutionResult::Undefined, "In progress"));
    }

    #[test]
    fn every_state_has_the_identifier_and_name_of_the_spec_table() {
        for s in PlanState::ALL {
            // The identifier is the variant name (spec 1.6), and the name drops "InProgress".
            assert_eq!(state_id(s), format!("{s:?}"));
            let expected = state_id(s).trim_end_matches("InProgress");
            let spaced: String = expected
                .chars()
                .enumerate()
                .flat_map(|(i, c)| {
                    let sep = (i > 0 && c.is_ascii_uppercase()).then_some(' ');
                    sep.into_iter().chain(std::iter::once(c.to_ascii_uppercase()))
                })
                .collect();
            assert_eq!(s.display_name(), spaced, "{s:?}");
        }
        assert_eq!(state_order(PlanState::NeedsVerified), 0);
        assert_eq!(state_order(PlanState::CommitFailback), 19);
    }

    #[test]
    fn a_scope_names_the_disaster_recovery_site_first_and_usage_counts_each_vm_once() {
        let tenant = d::Tenant { id: d::TenantId::new(), name: "acme".into(), is_system: false, created_at: d::now() };
        let site = |name: &str, kind| d::Site {
            id: d::SiteId::new(),
            tenant_id: tenant.id,
            name: name.into(),
            kind,
            created_at: d::now(),
        };
        assert_eq!(ScopeInfo::new(&tenant, &[]).site_name, None);
        let prod = site("alpha", d::SiteKind::Production);
        assert_eq!(ScopeInfo::new(&tenant, std::slice::from_ref(&prod)).site_name.as_deref(), Some("alpha"));
        let sites = [prod, site("zulu", d::SiteKind::DisasterRecovery), site("Mike", d::SiteKind::DisasterRecovery)];
        let scope = ScopeInfo::new(&tenant, &sites);
        assert_eq!(
            (scope.id, scope.site_name.as_deref(), scope.is_default, scope.state),
            (tenant.id.0, Some("Mike"), false, "Active")
        );

        let plan = |vms: &[d::VmId]| d::Plan {
            id: d::PlanId::new(),
            tenant_id: tenant.id,
            name: "p".into(),
            description: String::new(),
            enabled: true,
            lifecycle: d::PlanLifecycle::default(),
            recovery_location_id: d::RecoveryLocationId::ORIGINAL,
            groups: vec![d::PlanGroup {
                id: d::PlanGroupId::new(),
                name: "g".into(),
                mode: d::GroupMode::Sequential,
                delay_secs: 0,
                critical: false,
                restore_tags: false,
                vms: vms.iter().map(|v| d::PlanVm { vm_id: *v, steps: Vec::new() }).collect(),
            }],
            created_at: d::now(),
            updated_at: d::now(),
        };
        let (a, b) = (d::VmId::new(), d::VmId::new());
        let plans = [plan(&[a]), plan(&[a, b]), plan(&[])];
        assert_eq!(LicenseUsage::of(&plans), LicenseUsage { new_instances: 0, managed_instances: 2 });
        assert_eq!(LicenseUsage::of(&plans[2..]).managed_instances, 0);
        assert_eq!(LicenseUsage::of(&plans[..1]).managed_instances, 1);
    }

    #[test]
    fn action_bodies_take_the_documented_misspellings() {
        let b: FailoverBody = serde_json::from_str(r#"{"restorepointDate": "2026-01-02T03:04:05Z"}"#).unwrap();
        assert_eq!(b.restore_point_date.unwrap().to_rfc3339(), "2026-01-02T03:04:05+00:00");
        let b: FailoverBody =
            serde_json::from_str(r#"{"restorePointDate": null, "executeChainedPlans": true}"#).unwrap();
        assert!(b.restore_point_date.is_none() && b.execute_chained_plans);
        let b: HaltBody = serde_json::from_str(r#"{"fullstop": true}"#).unwrap();
        assert!(b.full_stop);
        let b: FailbackBody = serde_json::from_str(
            r#"{"restoreLocationId": "00000000-0000-0000-0000-000000000000", "failbackRestoreVMTags": true}"#,
        )
        .unwrap();
        assert_eq!((b.restore_location_id, b.failback_restore_vm_tags), (Some(Uuid::nil()), true));
        let b: ContinueBody = serde_json::from_str(r#"{"executionContinueOptions": "ProceedToNextVm"}"#).unwrap();
        assert_eq!(b.execution_continue_options, Some(drover_engine::saga::ContinueOption::ProceedToNextVm));
        assert!(serde_json::from_str::<ContinueBody>(r#"{"executionContinueOptions": "Sideways"}"#).is_err());
    }
}
