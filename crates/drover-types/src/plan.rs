//! Replica plans and their lifecycle (spec `veeam-compat.md` section 1.6).
//!
//! ```text
//!  default ─ReadinessCheck─▶ Checking ─ok─▶ Verified / ─fail─▶ NotVerified
//!  default, UndoFailover, CommitFailback ─Failover─▶ FailoverInProgress ─ok─▶ Failover
//!  Failover ─Undo─▶ UndoFailoverInProgress ─ok─▶ UndoFailover
//!  Failover ─PermanentFailover─▶ PermanentFailoverInProgress ─ok─▶ PermanentFailover
//!  Failover ─PrepareToFailback─▶ PrepareForFailbackInProgress ─ok─▶ PrepareForFailback
//!  Failover, PrepareForFailback ─FailbackToProduction─▶ FailbackInProgress ─ok─▶ Failback
//!  PrepareForFailback ─SwitchoverToProduction─▶ FailbackInProgress
//!  PrepareForFailback, Failback ─Undo─▶ UndoFailbackInProgress ─ok─▶ Failover
//!  Failback ─CommitFailback─▶ CommitFailbackInProgress ─ok─▶ CommitFailback
//!  any *InProgress ─Halt─▶ Halting ─steps finished─▶ Halted
//!  any *InProgress ─critical failure─▶ Halted
//!  Halted ─Continue─▶ the interrupted *InProgress;  Halted ─Undo─▶ the undo of the interrupted action
//!  any stable state ─ResetState─▶ NeedsVerified (and the plan is disabled)
//! ```
//!
//! Decisions beyond the spec: a plan may fail over again from `UndoFailover` and `CommitFailback`
//! without a reset (the replicas are back in their normal role then); the undo of a failback lands
//! in `Failover`, as the spec's action table says, so `UndoFailback` is never a resting state.

use serde::{Deserialize, Serialize};

use crate::{Error, PlanGroupId, PlanId, PlanStepId, RecoveryLocationId, Result, TenantId, Timestamp, VmId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PlanState {
    NeedsVerified,
    NotVerified,
    Verified,
    Checking,
    FailoverInProgress,
    Failover,
    Halting,
    Halted,
    UndoFailoverInProgress,
    UndoFailover,
    PermanentFailoverInProgress,
    PermanentFailover,
    PrepareForFailbackInProgress,
    PrepareForFailback,
    FailbackInProgress,
    Failback,
    UndoFailbackInProgress,
    UndoFailback,
    CommitFailbackInProgress,
    CommitFailback,
}

/// Something a user asks a plan to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PlanAction {
    ReadinessCheck,
    Failover,
    PermanentFailover,
    PrepareToFailback,
    FailbackToProduction,
    SwitchoverToProduction,
    CommitFailback,
    Undo,
    Halt,
    Continue,
    ResetState,
}

/// What happens to a running plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PlanEvent {
    Requested(PlanAction),
    /// The running action finished (possibly with warnings).
    Completed,
    /// The running action failed in a way that stops the plan (a critical group failed, or an undo failed).
    Failed,
    /// The last running step finished after a halt was requested.
    HaltReached,
}

impl PlanState {
    pub const ALL: [PlanState; 20] = [
        PlanState::NeedsVerified,
        PlanState::NotVerified,
        PlanState::Verified,
        PlanState::Checking,
        PlanState::FailoverInProgress,
        PlanState::Failover,
        PlanState::Halting,
        PlanState::Halted,
        PlanState::UndoFailoverInProgress,
        PlanState::UndoFailover,
        PlanState::PermanentFailoverInProgress,
        PlanState::PermanentFailover,
        PlanState::PrepareForFailbackInProgress,
        PlanState::PrepareForFailback,
        PlanState::FailbackInProgress,
        PlanState::Failback,
        PlanState::UndoFailbackInProgress,
        PlanState::UndoFailback,
        PlanState::CommitFailbackInProgress,
        PlanState::CommitFailback,
    ];

    pub fn is_default(self) -> bool {
        matches!(self, PlanState::NeedsVerified | PlanState::NotVerified | PlanState::Verified)
    }

    /// Running states: work is under way and only Halt is accepted.
    pub fn is_running(self) -> bool {
        matches!(
            self,
            PlanState::Checking
                | PlanState::FailoverInProgress
                | PlanState::Halting
                | PlanState::UndoFailoverInProgress
                | PlanState::PermanentFailoverInProgress
                | PlanState::PrepareForFailbackInProgress
                | PlanState::FailbackInProgress
                | PlanState::UndoFailbackInProgress
                | PlanState::CommitFailbackInProgress
        )
    }

    pub fn is_stable(self) -> bool {
        !self.is_running()
    }

    /// The UI name (`stateName`) of the Veeam products.
    pub fn display_name(self) -> &'static str {
        match self {
            PlanState::NeedsVerified => "NEEDS VERIFIED",
            PlanState::NotVerified => "NOT VERIFIED",
            PlanState::Verified => "VERIFIED",
            PlanState::Checking => "CHECKING",
            PlanState::FailoverInProgress | PlanState::Failover => "FAILOVER",
            PlanState::Halting => "HALTING",
            PlanState::Halted => "HALTED",
            PlanState::UndoFailoverInProgress | PlanState::UndoFailover => "UNDO FAILOVER",
            PlanState::PermanentFailoverInProgress | PlanState::PermanentFailover => "PERMANENT FAILOVER",
            PlanState::PrepareForFailbackInProgress | PlanState::PrepareForFailback => "PREPARE FOR FAILBACK",
            PlanState::FailbackInProgress | PlanState::Failback => "FAILBACK",
            PlanState::UndoFailbackInProgress | PlanState::UndoFailback => "UNDO FAILBACK",
            PlanState::CommitFailbackInProgress | PlanState::CommitFailback => "COMMIT FAILBACK",
        }
    }

    /// The in-progress state an action leads to from a stable state, if it is allowed there.
    fn start(self, action: PlanAction) -> Option<PlanState> {
        use PlanAction as A;
        use PlanState as S;
        Some(match (self, action) {
            (s, A::ReadinessCheck) if s.is_default() => S::Checking,
            (s, A::Failover) if s.is_default() || matches!(s, S::UndoFailover | S::CommitFailback) => {
                S::FailoverInProgress
            }
            (S::Failover, A::Undo) => S::UndoFailoverInProgress,
            (S::Failover, A::PermanentFailover) => S::PermanentFailoverInProgress,
            (S::Failover, A::PrepareToFailback) => S::PrepareForFailbackInProgress,
            (S::Failover | S::PrepareForFailback, A::FailbackToProduction) => S::FailbackInProgress,
            (S::PrepareForFailback, A::SwitchoverToProduction) => S::FailbackInProgress,
            (S::PrepareForFailback | S::Failback, A::Undo) => S::UndoFailbackInProgress,
            (S::Failback, A::CommitFailback) => S::CommitFailbackInProgress,
            _ => return None,
        })
    }

    /// Where an in-progress state lands when its action completes.
    fn completed(self, check_passed: bool) -> Option<PlanState> {
        use PlanState as S;
        Some(match self {
            S::Checking if check_passed => S::Verified,
            S::Checking => S::NotVerified,
            S::FailoverInProgress => S::Failover,
            S::UndoFailoverInProgress => S::UndoFailover,
            S::PermanentFailoverInProgress => S::PermanentFailover,
            S::PrepareForFailbackInProgress => S::PrepareForFailback,
            S::FailbackInProgress => S::Failback,
            S::UndoFailbackInProgress => S::Failover,
            S::CommitFailbackInProgress => S::CommitFailback,
            _ => return None,
        })
    }

    /// The undo of an interrupted action, for `Undo` from `Halted`.
    fn undo_of(self) -> Option<PlanState> {
        use PlanState as S;
        match self {
            S::FailoverInProgress | S::PermanentFailoverInProgress => Some(S::UndoFailoverInProgress),
            S::PrepareForFailbackInProgress | S::FailbackInProgress => Some(S::UndoFailbackInProgress),
            _ => None,
        }
    }
}

/// A plan's state plus what the state machine must remember across a halt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanLifecycle {
    pub state: PlanState,
    /// The in-progress state that was running when the plan halted (`previousExecutionState`).
    pub interrupted: Option<PlanState>,
    /// The last stable state before the current action started.
    pub last_stable: PlanState,
}

impl Default for PlanLifecycle {
    fn default() -> Self {
        PlanLifecycle { state: PlanState::NeedsVerified, interrupted: None, last_stable: PlanState::NeedsVerified }
    }
}

impl PlanLifecycle {
    /// The one transition function of the plan lifecycle. `check_passed` matters only when a
    /// readiness check completes.
    pub fn apply(self, event: PlanEvent, check_passed: bool) -> Result<PlanLifecycle> {
        use PlanAction as A;
        use PlanState as S;
        let refuse = |what: String| Err(Error::conflict(what));
        let s = self.state;
        let stable = |state: PlanState| PlanLifecycle { state, interrupted: None, last_stable: state };
        match event {
            PlanEvent::Requested(A::Halt) => {
                if s.is_running() && s != S::Halting && s != S::Checking {
                    Ok(PlanLifecycle { state: S::Halting, interrupted: Some(s), ..self })
                } else {
                    refuse(format!("a plan in state {} cannot be halted: nothing is running", s.display_name()))
                }
            }
            PlanEvent::Requested(A::Continue) => match (s, self.interrupted) {
                (S::Halted, Some(running)) => Ok(PlanLifecycle { state: running, interrupted: None, ..self }),
                _ => refuse(format!("only a HALTED plan can continue; this plan is {}", s.display_name())),
            },
            PlanEvent::Requested(A::Undo) if s == S::Halted => match self.interrupted.and_then(PlanState::undo_of) {
                Some(undo) => Ok(PlanLifecycle { state: undo, interrupted: None, ..self }),
                None => refuse("the halted action has nothing to undo; reset the plan instead".to_string()),
            },
            PlanEvent::Requested(A::ResetState) => {
                if s.is_stable() {
                    Ok(stable(S::NeedsVerified))
                } else {
                    refuse(format!("a plan in state {} is running; halt it before resetting", s.display_name()))
                }
            }
            PlanEvent::Requested(action) => {
                if s.is_running() {
                    return refuse(format!(
                        "the plan is busy ({}); {action:?} is not possible until it finishes or is halted",
                        s.display_name()
                    ));
                }
                match s.start(action) {
                    Some(next) => Ok(PlanLifecycle { state: next, interrupted: None, last_stable: s }),
                    None => refuse(format!("{action:?} is not possible while the plan is {}", s.display_name())),
                }
            }
            PlanEvent::Completed => match s.completed(check_passed) {
                Some(next) => Ok(stable(next)),
                None if s == S::Halting => Ok(PlanLifecycle { state: S::Halted, ..self }),
                None => refuse(format!("nothing is running in a plan that is {}", s.display_name())),
            },
            PlanEvent::Failed => match s {
                S::Checking => Ok(stable(S::NotVerified)),
                s if s.is_running() && s != S::Halting => {
                    Ok(PlanLifecycle { state: S::Halted, interrupted: Some(s), ..self })
                }
                S::Halting => Ok(PlanLifecycle { state: S::Halted, ..self }),
                _ => refuse(format!("nothing is running in a plan that is {}", s.display_name())),
            },
            PlanEvent::HaltReached => match s {
                S::Halting => Ok(PlanLifecycle { state: S::Halted, ..self }),
                _ => refuse(format!("no halt is pending in a plan that is {}", s.display_name())),
            },
        }
    }
}

/// Reconciliation on start: where a plan lands when its lifecycle and its sessions disagree.
/// Not user requests, so not events of [`PlanLifecycle::apply`]; the engine calls these only for a
/// running plan that no running session will move (a database written by an older build, which
/// stored the plan's move and its session in two commits, or a halt that came after the
/// session's last step).
impl PlanLifecycle {
    /// The in-progress state of the action under way: the state itself, or while `Halting` the
    /// state that is being halted. `None` for a plan at rest.
    pub fn running_action(self) -> Option<PlanState> {
        match self.state {
            PlanState::Halting => self.interrupted,
            s if s.is_running() => Some(s),
            _ => None,
        }
    }

    /// A running plan with no session behind it. When the action's session ended in success
    /// (`completed`) the action is done, so the plan lands where the action completes; otherwise
    /// nothing of the action is in effect (its session was never recorded, or it unwound
    /// everything), so the plan goes back to the stable state it left. A readiness check that
    /// did not conclude goes back too: its verdict is unknown. `None` for a plan at rest.
    pub fn abandoned(self, completed: bool) -> Option<PlanLifecycle> {
        if !self.state.is_running() {
            return None;
        }
        let done = self.running_action().filter(|s| *s != PlanState::Checking).and_then(|s| s.completed(true));
        let state = if completed { done.unwrap_or(self.last_stable) } else { self.last_stable };
        Some(PlanLifecycle { state, interrupted: None, last_stable: state })
    }

    /// A running plan whose session is halted (it waits for Continue or Undo and will not move
    /// the plan): the plan is `Halted` on `action`, the in-progress state of the session's
    /// action, so Continue and Undo act on that session again. `None` for a plan at rest.
    pub fn halted_on(self, action: PlanState) -> Option<PlanLifecycle> {
        (self.state.is_running() && action.is_running() && action != PlanState::Halting).then_some(PlanLifecycle {
            state: PlanState::Halted,
            interrupted: Some(action),
            ..self
        })
    }
}

/// Enabled or disabled by the user; `InUse` whenever the plan sits in a non-default state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlanMode {
    Enabled,
    Disabled,
    InUse,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupMode {
    Sequential,
    Parallel { max: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlanStepKind {
    PowerOn,
    WaitHeartbeat { timeout_secs: u32 },
    CheckTcpPort { port: u16, timeout_secs: u32 },
    RunScript { path: String, args: Vec<String>, timeout_secs: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStep {
    pub id: PlanStepId,
    pub name: String,
    pub kind: PlanStepKind,
    /// A failed critical step fails its VM; a non-critical one gives a warning.
    pub critical: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanVm {
    pub vm_id: VmId,
    pub steps: Vec<PlanStep>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanGroup {
    pub id: PlanGroupId,
    pub name: String,
    pub mode: GroupMode,
    pub delay_secs: u32,
    /// A failure in a critical group halts the plan.
    pub critical: bool,
    pub restore_tags: bool,
    pub vms: Vec<PlanVm>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub id: PlanId,
    pub tenant_id: TenantId,
    pub name: String,
    pub description: String,
    pub enabled: bool,
    pub lifecycle: PlanLifecycle,
    /// Where failback goes by default.
    pub recovery_location_id: RecoveryLocationId,
    /// In execution order.
    pub groups: Vec<PlanGroup>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

pub const PLAN_MAX_GROUP_DELAY_SECS: u32 = 24 * 3600;
pub const PLAN_MAX_STEP_TIMEOUT_SECS: u32 = 24 * 3600;

impl Plan {
    pub fn mode(&self) -> PlanMode {
        if !self.lifecycle.state.is_default() {
            PlanMode::InUse
        } else if self.enabled {
            PlanMode::Enabled
        } else {
            PlanMode::Disabled
        }
    }

    pub fn vm_ids(&self) -> impl Iterator<Item = VmId> + '_ {
        self.groups.iter().flat_map(|g| g.vms.iter().map(|v| v.vm_id))
    }

    /// Structural checks; that the VMs exist is the engine's to check.
    pub fn validate(&self) -> Result<()> {
        crate::validate_name("plan", &self.name)?;
        if self.description.len() > 4096 {
            return Err(Error::invalid("plan description is longer than 4096 bytes"));
        }
        let mut vms = std::collections::HashSet::new();
        for g in &self.groups {
            crate::validate_name("group", &g.name)?;
            if let GroupMode::Parallel { max } = g.mode
                && (max == 0 || max > 256)
            {
                return Err(Error::invalid(format!("group {:?}: parallel max must be between 1 and 256", g.name)));
            }
            if g.delay_secs > PLAN_MAX_GROUP_DELAY_SECS {
                return Err(Error::invalid(format!(
                    "group {:?}: delay_secs must be at most {PLAN_MAX_GROUP_DELAY_SECS}",
                    g.name
                )));
            }
            for v in &g.vms {
                if !vms.insert(v.vm_id) {
                    return Err(Error::invalid(format!("VM {} appears twice in the plan", v.vm_id)));
                }
                for step in &v.steps {
                    crate::validate_name("step", &step.name)?;
                    let timeout = match &step.kind {
                        PlanStepKind::PowerOn => 0,
                        PlanStepKind::WaitHeartbeat { timeout_secs } => *timeout_secs,
                        PlanStepKind::CheckTcpPort { port, timeout_secs } => {
                            if *port == 0 {
                                return Err(Error::invalid(format!("step {:?}: port must not be 0", step.name)));
                            }
                            *timeout_secs
                        }
                        PlanStepKind::RunScript { path, timeout_secs, .. } => {
                            if path.trim().is_empty() {
                                return Err(Error::invalid(format!("step {:?}: script path is empty", step.name)));
                            }
                            *timeout_secs
                        }
                    };
                    if timeout > PLAN_MAX_STEP_TIMEOUT_SECS {
                        return Err(Error::invalid(format!(
                            "step {:?}: timeout_secs must be at most {PLAN_MAX_STEP_TIMEOUT_SECS}",
                            step.name
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_action() -> impl Strategy<Value = PlanAction> {
        prop_oneof![
            Just(PlanAction::ReadinessCheck),
            Just(PlanAction::Failover),
            Just(PlanAction::PermanentFailover),
            Just(PlanAction::PrepareToFailback),
            Just(PlanAction::FailbackToProduction),
            Just(PlanAction::SwitchoverToProduction),
            Just(PlanAction::CommitFailback),
            Just(PlanAction::Undo),
            Just(PlanAction::Halt),
            Just(PlanAction::Continue),
            Just(PlanAction::ResetState),
        ]
    }
    fn any_event() -> impl Strategy<Value = PlanEvent> {
        prop_oneof![
            any_action().prop_map(PlanEvent::Requested),
            Just(PlanEvent::Completed),
            Just(PlanEvent::Failed),
            Just(PlanEvent::HaltReached),
        ]
    }

    fn run(events: &[PlanEvent]) -> PlanLifecycle {
        events.iter().fold(PlanLifecycle::default(), |l, e| l.apply(*e, true).unwrap())
    }

    #[test]
    fn the_documented_story_runs() {
        use PlanAction as A;
        use PlanEvent as E;
        let l = run(&[E::Requested(A::Failover), E::Completed]);
        assert_eq!(l.state, PlanState::Failover);
        let l = l.apply(E::Requested(A::FailbackToProduction), true).unwrap();
        assert_eq!(l.state, PlanState::FailbackInProgress);
        let l = l.apply(E::Completed, true).unwrap().apply(E::Requested(A::CommitFailback), true).unwrap();
        let l = l.apply(E::Completed, true).unwrap();
        assert_eq!(l.state, PlanState::CommitFailback);
        // Fail over again after a committed failback.
        assert!(l.apply(E::Requested(A::Failover), true).is_ok());
    }

    #[test]
    fn halt_continue_and_undo_of_a_halted_failover() {
        use PlanAction as A;
        use PlanEvent as E;
        let halted = run(&[E::Requested(A::Failover), E::Requested(A::Halt), E::HaltReached]);
        assert_eq!(halted.state, PlanState::Halted);
        assert_eq!(halted.interrupted, Some(PlanState::FailoverInProgress));
        assert_eq!(halted.apply(E::Requested(A::Continue), true).unwrap().state, PlanState::FailoverInProgress);
        assert_eq!(halted.apply(E::Requested(A::Undo), true).unwrap().state, PlanState::UndoFailoverInProgress);
        // A critical failure halts too, and remembers what was running.
        let failed = run(&[E::Requested(A::Failover), E::Failed]);
        assert_eq!((failed.state, failed.interrupted), (PlanState::Halted, Some(PlanState::FailoverInProgress)));
    }

    #[test]
    fn illegal_requests_are_refused_with_a_message() {
        let err = PlanLifecycle::default().apply(PlanEvent::Requested(PlanAction::CommitFailback), true).unwrap_err();
        assert!(matches!(err, Error::Conflict(ref m) if m.contains("NEEDS VERIFIED")), "{err}");
        let l = run(&[PlanEvent::Requested(PlanAction::Failover)]);
        assert!(l.apply(PlanEvent::Requested(PlanAction::Failover), true).is_err());
        assert!(l.apply(PlanEvent::Requested(PlanAction::ResetState), true).is_err());
    }

    #[test]
    fn an_abandoned_action_goes_back_unless_its_session_completed_it() {
        use PlanAction as A;
        use PlanEvent as E;
        let moved = run(&[E::Requested(A::Failover)]);
        let back = moved.abandoned(false).unwrap();
        assert_eq!(
            (back.state, back.interrupted, back.last_stable),
            (PlanState::NeedsVerified, None, PlanState::NeedsVerified)
        );
        assert_eq!(moved.abandoned(true).unwrap().state, PlanState::Failover);
        // A halt that came after the last step: the action completed.
        let halting = run(&[E::Requested(A::Failover), E::Completed, E::Requested(A::Undo), E::Requested(A::Halt)]);
        assert_eq!(halting.running_action(), Some(PlanState::UndoFailoverInProgress));
        assert_eq!(halting.abandoned(true).unwrap().state, PlanState::UndoFailover);
        assert_eq!(halting.abandoned(false).unwrap().state, PlanState::Failover);
        // A check that did not conclude says nothing.
        let checking = run(&[E::Requested(A::ReadinessCheck)]);
        assert_eq!(checking.abandoned(true).unwrap().state, PlanState::NeedsVerified);
        assert_eq!(back.abandoned(false), None);
        // Halted on the session's action: Continue and Undo work again.
        let undoing = run(&[E::Requested(A::Failover), E::Failed, E::Requested(A::Undo)]);
        let halted = undoing.halted_on(PlanState::FailoverInProgress).unwrap();
        assert_eq!(halted.apply(E::Requested(A::Continue), true).unwrap().state, PlanState::FailoverInProgress);
        assert_eq!(halted.apply(E::Requested(A::Undo), true).unwrap().state, PlanState::UndoFailoverInProgress);
    }

    proptest! {
        #[test]
        fn an_abandoned_plan_rests_and_takes_requests_again(
            events in proptest::collection::vec(any_event(), 0..60),
            completed in any::<bool>(),
        ) {
            let mut l = PlanLifecycle::default();
            for e in events {
                if let Ok(next) = l.apply(e, true) { l = next; }
            }
            match l.abandoned(completed) {
                None => prop_assert!(l.state.is_stable()),
                Some(next) => {
                    prop_assert!(next.state.is_stable() && next.state != PlanState::Halted);
                    prop_assert!(next.apply(PlanEvent::Requested(PlanAction::ResetState), true).is_ok());
                    if !completed {
                        prop_assert_eq!(next.state, l.last_stable);
                    }
                }
            }
        }

        #[test]
        fn running_states_refuse_everything_but_halt_and_outcomes(
            events in proptest::collection::vec(any_event(), 0..60),
            action in any_action(),
        ) {
            let mut l = PlanLifecycle::default();
            for e in events {
                if let Ok(next) = l.apply(e, true) { l = next; }
            }
            if l.state.is_running() && action != PlanAction::Halt {
                prop_assert!(l.apply(PlanEvent::Requested(action), true).is_err());
            }
        }

        #[test]
        fn invariants_hold_on_every_walk(events in proptest::collection::vec(any_event(), 0..80)) {
            let mut l = PlanLifecycle::default();
            for e in events {
                let before = l;
                match l.apply(e, true) {
                    Ok(next) => {
                        // Halted always knows what it interrupted, unless it came from a halt of nothing.
                        if next.state == PlanState::Halted {
                            prop_assert!(next.interrupted.is_some());
                        }
                        // last_stable is always a stable state.
                        prop_assert!(next.last_stable.is_stable());
                        // UndoFailback is never a resting state (decision in the module doc).
                        prop_assert_ne!(next.state, PlanState::UndoFailback);
                        l = next;
                    }
                    Err(err) => {
                        prop_assert!(matches!(err, Error::Conflict(_)));
                        prop_assert_eq!(l, before);
                    }
                }
            }
        }

        #[test]
        fn reset_is_possible_from_every_stable_state(events in proptest::collection::vec(any_event(), 0..60)) {
            let mut l = PlanLifecycle::default();
            for e in events {
                if let Ok(next) = l.apply(e, true) { l = next; }
            }
            let reset = l.apply(PlanEvent::Requested(PlanAction::ResetState), true);
            prop_assert_eq!(reset.is_ok(), l.state.is_stable());
        }
    }
}
