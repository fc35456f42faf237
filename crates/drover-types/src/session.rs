//! Sessions, tasks, their logs and the saga step records.
//!
//! A session is one execution of an operation. Its lifecycle:
//!
//! ```text
//!  Starting ─▶ Working ─▶ Stopping ─▶ Stopped(result)
//!      └──────────┴──────────┴────────▶ Stopped(Failed)      (any state can fail)
//! ```
//!
//! `result` is `None` until the session stops. Every change is persisted before it is reported.

use serde::{Deserialize, Serialize};

use crate::{Error, PlanId, Result, SessionId, TaskId, TenantId, Timestamp, VmId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionState {
    Starting,
    Working,
    Stopping,
    Stopped,
}

/// Ordered by severity: `Success < Warning < Failed`, as the EM query service compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SessionResult {
    None,
    Success,
    Warning,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionEvent {
    Began,
    Finishing,
    Finished(SessionResult),
}

impl SessionState {
    pub fn apply(self, event: SessionEvent) -> Result<SessionState> {
        use SessionEvent as E;
        use SessionState as S;
        Ok(match (self, event) {
            (S::Starting, E::Began) => S::Working,
            (S::Starting | S::Working, E::Finishing) => S::Stopping,
            (S::Starting | S::Working | S::Stopping, E::Finished(r)) if r != SessionResult::None => S::Stopped,
            (s, e) => return Err(Error::conflict(format!("a session that is {s:?} cannot take {e:?}"))),
        })
    }
}

/// What a session does. Names follow the operations; the EM dialect maps them to its `Operation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SessionKind {
    VmCreate,
    VmPowerOn,
    VmShutdown,
    VmPowerOff,
    VmDelete,
    Replication,
    PlanReadinessCheck,
    PlanFailover,
    PlanTestFailover,
    PlanUndoFailover,
    PlanPermanentFailover,
    PlanPrepareFailback,
    PlanFailback,
    PlanUndoFailback,
    PlanCommitFailback,
}

impl SessionKind {
    pub const ALL: [SessionKind; 15] = [
        SessionKind::VmCreate,
        SessionKind::VmPowerOn,
        SessionKind::VmShutdown,
        SessionKind::VmPowerOff,
        SessionKind::VmDelete,
        SessionKind::Replication,
        SessionKind::PlanReadinessCheck,
        SessionKind::PlanFailover,
        SessionKind::PlanTestFailover,
        SessionKind::PlanUndoFailover,
        SessionKind::PlanPermanentFailover,
        SessionKind::PlanPrepareFailback,
        SessionKind::PlanFailback,
        SessionKind::PlanUndoFailback,
        SessionKind::PlanCommitFailback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SessionKind::VmCreate => "VmCreate",
            SessionKind::VmPowerOn => "VmPowerOn",
            SessionKind::VmShutdown => "VmShutdown",
            SessionKind::VmPowerOff => "VmPowerOff",
            SessionKind::VmDelete => "VmDelete",
            SessionKind::Replication => "Replication",
            SessionKind::PlanReadinessCheck => "PlanReadinessCheck",
            SessionKind::PlanFailover => "PlanFailover",
            SessionKind::PlanTestFailover => "PlanTestFailover",
            SessionKind::PlanUndoFailover => "PlanUndoFailover",
            SessionKind::PlanPermanentFailover => "PlanPermanentFailover",
            SessionKind::PlanPrepareFailback => "PlanPrepareFailback",
            SessionKind::PlanFailback => "PlanFailback",
            SessionKind::PlanUndoFailback => "PlanUndoFailback",
            SessionKind::PlanCommitFailback => "PlanCommitFailback",
        }
    }
}

impl std::str::FromStr for SessionKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        SessionKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::invalid(format!("unknown session kind {s:?}")))
    }
}

/// The object a session works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionTarget {
    Vm(VmId),
    Plan(PlanId),
    ReplicationJob(crate::ReplicationJobId),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: SessionId,
    pub tenant_id: TenantId,
    pub kind: SessionKind,
    /// What users see, e.g. the plan's or VM's name.
    pub name: String,
    pub target: SessionTarget,
    pub state: SessionState,
    pub result: SessionResult,
    pub progress: u8,
    pub failure_message: Option<String>,
    /// The operation's parameters, as the saga needs them to resume after a restart.
    pub params: serde_json::Value,
    /// Set when a user asks the session to stop; running steps finish first.
    pub halt_requested: bool,
    /// The session stopped between steps (asked to, or a step failed under the halt policy) and
    /// waits for Continue or Undo. A halted session is not finished: its state stays `Working`.
    pub halted: bool,
    pub created_at: Timestamp,
    pub ended_at: Option<Timestamp>,
}

impl Session {
    /// A new session, not yet started.
    pub fn new(
        tenant_id: TenantId,
        kind: SessionKind,
        name: impl Into<String>,
        target: SessionTarget,
        params: serde_json::Value,
    ) -> Session {
        Session {
            id: SessionId::new(),
            tenant_id,
            kind,
            name: name.into(),
            target,
            state: SessionState::Starting,
            result: SessionResult::None,
            progress: 0,
            failure_message: None,
            params,
            halt_requested: false,
            halted: false,
            created_at: crate::now(),
            ended_at: None,
        }
    }

    /// A new task of this session, with weight 1.
    pub fn task(&self, vm_id: Option<VmId>, name: impl Into<String>) -> Task {
        Task {
            id: TaskId::new(),
            session_id: self.id,
            vm_id,
            name: name.into(),
            state: SessionState::Starting,
            result: SessionResult::None,
            progress: 0,
            weight: 1,
            failure_message: None,
            created_at: self.created_at,
            ended_at: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub session_id: SessionId,
    pub vm_id: Option<VmId>,
    pub name: String,
    pub state: SessionState,
    pub result: SessionResult,
    pub progress: u8,
    /// Its share of the session's progress.
    pub weight: u32,
    pub failure_message: Option<String>,
    pub created_at: Timestamp,
    pub ended_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LogLevel {
    Info,
    Warning,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub session_id: SessionId,
    pub task_id: Option<TaskId>,
    /// Position in the session's log; the log is append-only.
    pub seq: i64,
    pub at: Timestamp,
    pub level: LogLevel,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepState {
    /// To run (again): set by Continue with a retry option.
    Pending,
    Started,
    Done,
    Failed,
    UndoStarted,
    Undone,
    Skipped,
}

/// One saga step's record. Written `Started` before the step runs and with its outcome after, so
/// that after a crash the engine knows which steps may have had effects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub session_id: SessionId,
    pub task_id: Option<TaskId>,
    /// Position in the saga.
    pub index: u32,
    pub name: String,
    pub state: StepState,
    pub attempts: u32,
    /// What the step produced, for later steps and for its undo.
    pub output: serde_json::Value,
    pub error: Option<String>,
    pub updated_at: Timestamp,
}

/// Filters for listing sessions. Every field narrows the list.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    pub kind: Option<SessionKind>,
    pub state: Option<SessionState>,
    pub result: Option<SessionResult>,
    pub target_id: Option<uuid::Uuid>,
    pub created_after: Option<Timestamp>,
    /// Newest first when false (the default), oldest first when true.
    pub oldest_first: bool,
    pub offset: u64,
    pub limit: u64,
}

/// A session without its parameters: what a list shows and filters on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSummary {
    pub id: SessionId,
    pub tenant_id: TenantId,
    pub kind: SessionKind,
    pub name: String,
    pub target: SessionTarget,
    pub state: SessionState,
    pub result: SessionResult,
    pub progress: u8,
    pub failure_message: Option<String>,
    pub created_at: Timestamp,
    pub ended_at: Option<Timestamp>,
}

impl From<&Session> for SessionSummary {
    fn from(s: &Session) -> SessionSummary {
        SessionSummary {
            id: s.id,
            tenant_id: s.tenant_id,
            kind: s.kind,
            name: s.name.clone(),
            target: s.target,
            state: s.state,
            result: s.result,
            progress: s.progress,
            failure_message: s.failure_message.clone(),
            created_at: s.created_at,
            ended_at: s.ended_at,
        }
    }
}

/// A comparison in a [`SessionCondition`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareOp {
    Eq,
    Ne,
    Lt,
    Gt,
    Le,
    Ge,
}

/// A condition on sessions' stored fields that the store evaluates where the sessions are (so a
/// page of a filtered list reads only that page). Text compares byte by byte (code point order);
/// an absent end time equals nothing, so only `Ne` holds for it.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionCondition {
    /// All hold; `And(vec![])` is true.
    And(Vec<SessionCondition>),
    /// One holds; `Or(vec![])` is false.
    Or(Vec<SessionCondition>),
    /// The id as lower-case hyphenated text.
    Id(CompareOp, String),
    /// The name lower-cased (Unicode, as `str::to_lowercase`): compares without regard to case.
    NameLowercase(CompareOp, String),
    /// Millisecond precision, as sessions are stored.
    CreatedAt(CompareOp, Timestamp),
    EndedAt(CompareOp, Timestamp),
    StateIn(Vec<SessionState>),
    ResultIn(Vec<SessionResult>),
    Target(uuid::Uuid),
}

impl SessionCondition {
    pub const TRUE: SessionCondition = SessionCondition::And(Vec::new());
    pub const FALSE: SessionCondition = SessionCondition::Or(Vec::new());
}

/// What a [`SessionQuery`] sorts by. Ties, and the query without a sort, are newest first (by
/// creation time, then id, both descending), so pages are stable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionOrder {
    Id,
    NameLowercase,
    CreatedAt,
    /// Sessions still running (no end time) come first ascending, last descending.
    EndedAt,
    /// By the lifecycle's order: Starting, Working, Stopping, Stopped.
    State,
    /// By severity: None, Success, Warning, Failed.
    Result,
}

/// A page of one tenant's sessions of some kinds that meet a condition, in an order.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionQuery {
    /// Every kind when empty.
    pub kinds: Vec<SessionKind>,
    pub condition: SessionCondition,
    /// `(field, ascending)`; newest first when `None`.
    pub order: Option<(SessionOrder, bool)>,
    pub offset: u64,
    pub limit: u64,
}

/// Progress of a session from its tasks' progress, weighted. 0 when there are no tasks.
pub fn weighted_progress(tasks: &[(u32, u8)]) -> u8 {
    let total: u64 = tasks.iter().map(|(w, _)| u64::from(*w)).sum();
    if total == 0 {
        return 0;
    }
    let done: u64 = tasks.iter().map(|(w, p)| u64::from(*w) * u64::from((*p).min(100))).sum();
    (done / total) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn progress_stays_within_bounds_and_reaches_100(tasks in proptest::collection::vec((1u32..100, 0u8..=100), 1..20)) {
            let p = weighted_progress(&tasks);
            prop_assert!(p <= 100);
            let all_done: Vec<_> = tasks.iter().map(|(w, _)| (*w, 100u8)).collect();
            prop_assert_eq!(weighted_progress(&all_done), 100);
        }
    }

    #[test]
    fn a_stopped_session_takes_nothing_more() {
        let s = SessionState::Starting.apply(SessionEvent::Began).unwrap();
        let s = s.apply(SessionEvent::Finished(SessionResult::Success)).unwrap();
        assert_eq!(s, SessionState::Stopped);
        assert!(s.apply(SessionEvent::Began).is_err());
        assert!(SessionState::Working.apply(SessionEvent::Finished(SessionResult::None)).is_err());
    }

    #[test]
    fn session_kinds_round_trip() {
        for k in SessionKind::ALL {
            assert_eq!(k.as_str().parse::<SessionKind>().unwrap(), k);
        }
    }
}
