//! The sagas of plan operations available before replication exists: the readiness check.
//!
//! Readiness check: one `check_vm:<n>` step per VM of the plan (the VM exists and is provisioned,
//! a ready replica of it exists, and the recovery host can give its NICs the networks the job
//! maps them to), then `conclude`, which lands the plan in `Verified` when
//! every VM passed and in `NotVerified` otherwise. The first step's undo moves a plan that is
//! still `Checking` to `NotVerified`, so a failed or unwound check never leaves it busy.

use std::sync::Arc;

use async_trait::async_trait;
use drover_types::{LogLevel, PlanEvent, PlanId, PlanState, Replica, ReplicaState, SessionKind, TenantId, Vm, VmId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::saga::{Saga, SagaStep, Step, StepCtx};
use crate::{Engine, Error, Result};

#[derive(Debug, Clone, Deserialize)]
struct PlanParams {
    plan_id: PlanId,
    tenant_id: TenantId,
}

pub(crate) fn register(engine: &Engine) {
    engine.register_saga(
        SessionKind::PlanReadinessCheck,
        Arc::new(|session, tasks| {
            let p: PlanParams = serde_json::from_value(session.params.clone())
                .map_err(|e| Error::internal(format!("session {}: unreadable parameters: {e}", session.id)))?;
            let mut steps = vec![
                crate::plan_state::Begin {
                    tenant: p.tenant_id,
                    plan: p.plan_id,
                    unwinding: PlanState::Checking,
                    event: PlanEvent::Failed,
                    passed: false,
                }
                .step(),
            ];
            for (i, t) in tasks.iter().enumerate() {
                let vm = t.vm_id.ok_or_else(|| Error::internal("a plan task without a VM"))?;
                steps.push(SagaStep {
                    task: Some(i),
                    group: None,
                    weight: 1,
                    critical: true,
                    step: Box::new(CheckVm { p: p.clone(), vm, index: i }),
                });
            }
            let n = tasks.len();
            steps.push(SagaStep {
                task: None,
                group: None,
                weight: 1,
                critical: true,
                step: Box::new(Conclude { p, vms: n }),
            });
            Ok(Saga::unwinding(steps))
        }),
    );
}

async fn plan_event(ctx: &StepCtx, p: &PlanParams, event: PlanEvent, passed: bool, only_if: PlanState) -> Result<()> {
    crate::plan_state::plan_event(&ctx.engine, p.tenant_id, p.plan_id, event, passed, &[only_if]).await
}

struct CheckVm {
    p: PlanParams,
    vm: VmId,
    index: usize,
}

#[async_trait]
impl Step for CheckVm {
    fn name(&self) -> String {
        format!("check_vm:{}", self.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let store = ctx.engine.store();
        let mut problems = Vec::new();
        match store.object_get::<Vm>(self.p.tenant_id, self.vm.0).await {
            Ok(vm) if !vm.provisioned => problems.push(format!("VM {} has no disks yet", vm.name)),
            Ok(_) => {}
            Err(Error::NotFound { .. }) => problems.push(format!("VM {} no longer exists", self.vm)),
            Err(e) => return Err(e),
        }
        let replicas = store.object_list::<Replica>(self.p.tenant_id).await?;
        let ready = replicas.iter().find(|r| r.source_vm_id == self.vm && r.state == ReplicaState::Ready);
        if ready.is_none() {
            problems.push(format!("VM {} has no ready replica", self.vm));
        }
        // Where the replica's NICs would go at failover: a mapping the recovery host cannot
        // honour now is a problem; a NIC isolated for want of any mapping is said, not a problem.
        if let (Some(replica), Ok(vm)) = (ready, store.object_get::<Vm>(self.p.tenant_id, self.vm.0).await) {
            let placed = match crate::failover::replica_agent(&ctx.engine, replica).await {
                Ok(agent) => crate::networks::placements(&ctx.engine, agent.as_ref(), replica, &vm).await?,
                Err(e) => {
                    problems.push(format!("{}: the recovery host's agent: {e}", replica.name));
                    Vec::new()
                }
            };
            for p in placed {
                let line = format!("{}: at failover, {}", replica.name, p.message);
                if p.against_mapping {
                    problems.push(line);
                } else {
                    ctx.log(LogLevel::Info, line).await;
                }
            }
        }
        for p in &problems {
            ctx.log(LogLevel::Warning, p).await;
        }
        Ok(json!({ "ok": problems.is_empty(), "problems": problems }))
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

struct Conclude {
    p: PlanParams,
    vms: usize,
}

#[async_trait]
impl Step for Conclude {
    fn name(&self) -> String {
        "conclude".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let passed = (0..self.vms).all(|i| {
            ctx.outputs.get(&format!("check_vm:{i}")).and_then(|o| o.get("ok")).and_then(Value::as_bool) == Some(true)
        });
        plan_event(ctx, &self.p, PlanEvent::Completed, passed, PlanState::Checking).await?;
        let level = if passed { LogLevel::Info } else { LogLevel::Warning };
        ctx.log(level, if passed { "readiness check passed" } else { "readiness check found problems" }).await;
        Ok(json!({ "passed": passed }))
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}
