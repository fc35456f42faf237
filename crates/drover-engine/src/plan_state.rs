//! What every plan saga does to its plan: move its lifecycle when an operation completes, when
//! it halts, and when it is undone. One place, so every plan operation follows the state machine
//! of `drover_types::plan` the same way.

use async_trait::async_trait;
use drover_types::{Plan, PlanEvent, PlanId, PlanState, Session, SessionKind, Task, TenantId, VmId, now};
use serde_json::Value;

use crate::saga::{HaltHook, SagaStep, Step, StepCtx};
use crate::{Engine, Error, Result};

/// The in-progress state of a plan while a session of `kind` carries its action (for the
/// reconciliation on start). A failback session carries both a one-shot failback and a
/// switchover; a test failover moves no plan.
pub(crate) fn carried_by(kind: SessionKind) -> Option<PlanState> {
    Some(match kind {
        SessionKind::PlanReadinessCheck => PlanState::Checking,
        SessionKind::PlanFailover => PlanState::FailoverInProgress,
        SessionKind::PlanUndoFailover => PlanState::UndoFailoverInProgress,
        SessionKind::PlanPermanentFailover => PlanState::PermanentFailoverInProgress,
        SessionKind::PlanPrepareFailback => PlanState::PrepareForFailbackInProgress,
        SessionKind::PlanFailback => PlanState::FailbackInProgress,
        SessionKind::PlanUndoFailback => PlanState::UndoFailbackInProgress,
        SessionKind::PlanCommitFailback => PlanState::CommitFailbackInProgress,
        SessionKind::PlanTestFailover
        | SessionKind::VmCreate
        | SessionKind::VmPowerOn
        | SessionKind::VmShutdown
        | SessionKind::VmPowerOff
        | SessionKind::VmDelete
        | SessionKind::Replication => return None,
    })
}

/// Applies `event` to the plan if it is in one of `only_if` (so a rerun after a crash, or an
/// event that no longer applies, changes nothing). `passed` matters for a readiness check only.
pub(crate) async fn plan_event(
    engine: &Engine,
    tenant: TenantId,
    plan: PlanId,
    event: PlanEvent,
    passed: bool,
    only_if: &[PlanState],
) -> Result<()> {
    let r = engine
        .store()
        .object_modify::<Plan, _, _>(tenant, plan.0, |p| {
            if only_if.contains(&p.lifecycle.state) {
                p.lifecycle = p.lifecycle.apply(event, passed)?;
                p.updated_at = now();
            }
            Ok(())
        })
        .await;
    match r {
        Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The last step of a plan saga: the plan's running state `from` completes.
pub(crate) struct Conclude {
    pub tenant: TenantId,
    pub plan: PlanId,
    pub from: PlanState,
}

#[async_trait]
impl Step for Conclude {
    fn name(&self) -> String {
        "conclude".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        plan_event(&ctx.engine, self.tenant, self.plan, PlanEvent::Completed, true, &[self.from]).await?;
        // A halt that came while this last step ran finds nothing left to halt: the action
        // completed all the same, and the plan must not wait in HALTING for a session that ends.
        let r = ctx
            .engine
            .store()
            .object_modify::<Plan, _, _>(self.tenant, self.plan.0, |p| {
                if p.lifecycle.state == PlanState::Halting
                    && p.lifecycle.interrupted == Some(self.from)
                    && let Some(done) = p.lifecycle.abandoned(true)
                {
                    p.lifecycle = done;
                    p.updated_at = now();
                }
                Ok(())
            })
            .await;
        match r {
            Ok(_) | Err(Error::NotFound { .. }) => Ok(Value::Null),
            Err(e) => Err(e),
        }
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

/// The first step of a plan saga. Its run only checks that the plan is there; its undo is the
/// last of an unwound saga and lands the plan where that unwinding ends: `event` (with
/// `passed`) from the running state `unwinding`.
pub(crate) struct Begin {
    pub tenant: TenantId,
    pub plan: PlanId,
    pub unwinding: PlanState,
    pub event: PlanEvent,
    pub passed: bool,
}

impl Begin {
    /// As the first step of a saga.
    pub fn step(self) -> SagaStep {
        SagaStep { task: None, group: None, weight: 1, critical: true, step: Box::new(self) }
    }
}

#[async_trait]
impl Step for Begin {
    fn name(&self) -> String {
        "begin".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        ctx.engine.store().object_get::<Plan>(self.tenant, self.plan.0).await?;
        Ok(Value::Null)
    }
    async fn undo(&self, ctx: &StepCtx, _: &Value) -> Result<()> {
        plan_event(&ctx.engine, self.tenant, self.plan, self.event, self.passed, &[self.unwinding]).await
    }
}

/// When a plan saga halts: a requested halt reaches HALTED, and a critical failure of one of the
/// `running` states halts the plan too.
pub(crate) struct PlanHalted {
    pub tenant: TenantId,
    pub plan: PlanId,
    pub running: Vec<PlanState>,
}

#[async_trait]
impl HaltHook for PlanHalted {
    async fn halted(&self, engine: &Engine, _: &Session) -> Result<()> {
        plan_event(engine, self.tenant, self.plan, PlanEvent::HaltReached, true, &[PlanState::Halting]).await?;
        plan_event(engine, self.tenant, self.plan, PlanEvent::Failed, true, &self.running).await
    }
}

/// One critical step per VM task of a plan session, made by `mk(task index, VM)`.
pub(crate) fn per_vm_steps(
    tasks: &[Task],
    weight: u32,
    mk: impl Fn(usize, VmId) -> Box<dyn Step>,
) -> Result<Vec<SagaStep>> {
    tasks
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let vm = t.vm_id.ok_or_else(|| Error::internal("a plan task without a VM"))?;
            Ok(SagaStep { task: Some(i), group: Some(i as u32), weight, critical: true, step: mk(i, vm) })
        })
        .collect()
}
