//! Plan failover and its undo.
//!
//! Failover (session `PlanFailover`): for each VM of the plan, group by group in the plan's
//! order:
//!
//! | step | does | undo |
//! |---|---|---|
//! | `begin` | checks the plan is failing over | lands the plan in UNDO FAILOVER (this undo runs last) |
//! | `delay:<g>` | waits the group's delay before the next group | none |
//! | `boot:<i>` | picks the restore point (newest, or newest at or before the requested date), makes a throwaway overlay on each of its disk files, boots the replica VM from them (QEMU uuid = replica id), replica `Ready → Failover` | powers the replica off, discards the overlays, replica back to `Ready` |
//! | `step:<i>:<k>` | the plan's per-VM steps after power-on: wait for the heartbeat, run a script | none |
//! | `conclude` | plan `FailoverInProgress → Failover` | none |
//!
//! A failed step of a critical group halts the plan (HALTED); in a non-critical group it is a
//! warning and the plan goes on. From HALTED, Continue retries or skips; Undo unwinds.
//!
//! Undo failover (session `PlanUndoFailover`, from FAILOVER): each replica VM is powered off, its
//! overlays are discarded (its changes are thrown away, the restore points were never written),
//! the replica returns to `Ready`, and the plan lands in UNDO FAILOVER.
//!
//! Decisions: VMs of a group run one after another for now (the group's parallel maximum is
//! recorded but not yet used); replica VMs have no network uplink until network mapping exists,
//! so a `CheckTcpPort` step fails with a clear message.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_block::chain::ChainDir;
use drover_hv::{BootSpec, DiskSpec, VmSpec};
use drover_types::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::saga::{FailurePolicy, HaltHook, Saga, SagaStep, Step, StepCtx};
use crate::{Engine, Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverParams {
    pub plan_id: PlanId,
    pub tenant_id: TenantId,
    /// The newest point at or before this time; `None` for the newest.
    #[serde(default)]
    pub point_date: Option<Timestamp>,
}

pub(crate) fn register(engine: &Engine) {
    engine.register_saga(SessionKind::PlanFailover, Arc::new(failover_saga));
    engine.register_saga(SessionKind::PlanUndoFailover, Arc::new(undo_saga));
}

fn params(session: &Session) -> Result<FailoverParams> {
    serde_json::from_value(session.params.clone())
        .map_err(|e| Error::internal(format!("session {}: unreadable parameters: {e}", session.id)))
}

/// The plan as the session saw it when it started (the plan cannot be edited while IN-USE).
fn plan_of(session: &Session) -> Result<Plan> {
    let plan = session.params.get("plan").ok_or_else(|| Error::internal("the session does not carry its plan"))?;
    serde_json::from_value(plan.clone()).map_err(|e| Error::internal(format!("the session's plan: {e}")))
}

fn failover_saga(session: &Session, tasks: &[Task]) -> Result<Saga> {
    let p = params(session)?;
    let plan = plan_of(session)?;
    let task_of = |vm: VmId| tasks.iter().position(|t| t.vm_id == Some(vm));
    let mut steps =
        vec![SagaStep { task: None, group: None, weight: 1, critical: true, step: Box::new(Begin(p.clone())) }];
    let mut i = 0usize;
    for (g, group) in plan.groups.iter().enumerate() {
        if g > 0 && plan.groups[g - 1].delay_secs > 0 {
            let secs = plan.groups[g - 1].delay_secs;
            steps.push(SagaStep {
                task: None,
                group: Some(g as u32),
                weight: 1,
                critical: false,
                step: Box::new(Delay { group: g, secs }),
            });
        }
        for pvm in &group.vms {
            let task = task_of(pvm.vm_id).ok_or_else(|| Error::internal("a plan VM without a task"))?;
            let step = |weight, step: Box<dyn Step>| SagaStep {
                task: Some(task),
                group: Some(g as u32),
                weight,
                critical: group.critical,
                step,
            };
            steps.push(step(
                4,
                Box::new(Boot { p: p.clone(), vm: pvm.vm_id, index: i, restore_tags: group.restore_tags }),
            ));
            for (k, s) in pvm.steps.iter().enumerate() {
                if s.kind == PlanStepKind::PowerOn {
                    continue; // the boot step is the power-on
                }
                let mut entry =
                    step(2, Box::new(PlanVmStep { p: p.clone(), vm: pvm.vm_id, index: i, k, step: s.clone() }));
                entry.critical = group.critical && s.critical;
                steps.push(entry);
            }
            i += 1;
        }
    }
    steps.push(SagaStep {
        task: None,
        group: None,
        weight: 1,
        critical: true,
        step: Box::new(Conclude { p: p.clone(), from: PlanState::FailoverInProgress }),
    });
    Ok(Saga { steps, on_failure: FailurePolicy::Halt, on_halt: Some(Box::new(PlanHalted(p))) })
}

fn undo_saga(session: &Session, tasks: &[Task]) -> Result<Saga> {
    let p = params(session)?;
    let mut steps = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        let vm = t.vm_id.ok_or_else(|| Error::internal("a plan task without a VM"))?;
        steps.push(SagaStep {
            task: Some(i),
            group: None,
            weight: 1,
            critical: true,
            step: Box::new(StopReplica { p: p.clone(), vm, index: i }),
        });
    }
    steps.push(SagaStep {
        task: None,
        group: None,
        weight: 1,
        critical: true,
        step: Box::new(Conclude { p: p.clone(), from: PlanState::UndoFailoverInProgress }),
    });
    Ok(Saga::unwinding(steps))
}

async fn plan_event(engine: &Engine, p: &FailoverParams, event: PlanEvent, only_if: &[PlanState]) -> Result<()> {
    let r = engine
        .store()
        .object_modify::<Plan, _, _>(p.tenant_id, p.plan_id.0, |plan| {
            if only_if.contains(&plan.lifecycle.state) {
                plan.lifecycle = plan.lifecycle.apply(event, true)?;
                plan.updated_at = now();
            }
            Ok(())
        })
        .await;
    match r {
        Ok(_) | Err(Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

struct PlanHalted(FailoverParams);

#[async_trait]
impl HaltHook for PlanHalted {
    async fn halted(&self, engine: &Engine, _: &Session) -> Result<()> {
        // Halting (on request) reaches Halted; a running failover that failed critically too.
        plan_event(engine, &self.0, PlanEvent::HaltReached, &[PlanState::Halting]).await?;
        plan_event(engine, &self.0, PlanEvent::Failed, &[PlanState::FailoverInProgress]).await
    }
}

struct Begin(FailoverParams);

#[async_trait]
impl Step for Begin {
    fn name(&self) -> String {
        "begin".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        ctx.engine.store().object_get::<Plan>(self.0.tenant_id, self.0.plan_id.0).await?;
        Ok(Value::Null)
    }
    async fn undo(&self, ctx: &StepCtx, _: &Value) -> Result<()> {
        // The last undo of an unwound failover: the plan lands in UNDO FAILOVER.
        plan_event(&ctx.engine, &self.0, PlanEvent::Completed, &[PlanState::UndoFailoverInProgress]).await
    }
}

struct Delay {
    group: usize,
    secs: u32,
}

#[async_trait]
impl Step for Delay {
    fn name(&self) -> String {
        format!("delay:{}", self.group)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        ctx.log(LogLevel::Info, format!("waiting {} s before group {}", self.secs, self.group + 1)).await;
        tokio::time::sleep(Duration::from_secs(u64::from(self.secs))).await;
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Booted {
    replica_id: ReplicaId,
    point_id: RestorePointId,
    point_sequence: u64,
    overlays: Vec<PathBuf>,
}

fn hv_err(e: drover_hv::HvError) -> Error {
    Error::Unavailable(error_chain(&e))
}

/// The replica of a VM in the plan's tenant.
async fn replica_of(engine: &Engine, tenant: TenantId, vm: VmId) -> Result<Replica> {
    engine
        .store()
        .object_list::<Replica>(tenant)
        .await?
        .into_iter()
        .find(|r| r.source_vm_id == vm)
        .ok_or_else(|| Error::conflict(format!("VM {vm} has no replica: replicate it first")))
}

/// The label of a session's boot overlays: the same on a rerun, different per failover.
fn overlay_label(session: &Session) -> String {
    format!("fo-{}", &session.id.to_string()[..8])
}

struct Boot {
    p: FailoverParams,
    vm: VmId,
    index: usize,
    restore_tags: bool,
}

#[async_trait]
impl Step for Boot {
    fn name(&self) -> String {
        format!("boot:{}", self.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let engine = &ctx.engine;
        let source = engine.store().object_get::<Vm>(self.p.tenant_id, self.vm.0).await?;
        let replica = replica_of(engine, self.p.tenant_id, self.vm).await?;
        if !matches!(replica.state, ReplicaState::Ready | ReplicaState::Failover) {
            return Err(Error::conflict(format!("replica {} is {:?}", replica.name, replica.state)));
        }
        let points = engine.store().restore_points_of(self.p.tenant_id, replica.id).await?;
        let point = points
            .iter()
            .rev()
            .filter(|p| p.state == RestorePointState::Published)
            .find(|p| self.p.point_date.is_none_or(|d| p.created_at <= d))
            .ok_or_else(|| match self.p.point_date {
                Some(d) => Error::conflict(format!("replica {} has no restore point at or before {d}", replica.name)),
                None => Error::conflict(format!("replica {} has no restore point", replica.name)),
            })?;
        let label = overlay_label(&ctx.session);
        let mut overlays = Vec::new();
        for d in &source.disks {
            let pd =
                point.disks.iter().find(|x| x.disk == d.name).ok_or_else(|| {
                    Error::conflict(format!("restore point {} has no disk {}", point.sequence, d.name))
                })?;
            let file = Path::new(&pd.file);
            let chain = ChainDir::new(file.parent().unwrap_or(Path::new("/")));
            overlays.push(chain.boot_overlay(file, &label).await.map_err(|e| Error::Unavailable(error_chain(&e)))?);
        }
        let spec = VmSpec {
            id: replica.id.0,
            name: replica.name.clone(),
            vcpus: source.vcpus,
            memory_mib: source.memory_mib,
            disks: overlays.iter().map(|o| DiskSpec { path: o.clone() }).collect(),
            // No uplink until network mapping exists: the replica cannot reach production.
            nics: Vec::new(),
            boot: BootSpec {
                kernel: source.boot.kernel.as_ref().map(PathBuf::from),
                initrd: source.boot.initrd.as_ref().map(PathBuf::from),
                cmdline: source.boot.cmdline.clone(),
            },
        };
        engine.hv().power_on(&spec).await.map_err(hv_err)?;
        engine
            .store()
            .object_modify::<Replica, _, _>(self.p.tenant_id, replica.id.0, |r| {
                if r.state != ReplicaState::Failover {
                    r.state = r.state.apply(ReplicaEvent::FailedOver)?;
                }
                r.failover_point_id = Some(point.id);
                r.updated_at = now();
                Ok(())
            })
            .await?;
        let tags = if self.restore_tags && !source.tags.is_empty() {
            format!(", tags {}", source.tags.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "))
        } else {
            String::new()
        };
        ctx.log(LogLevel::Info, format!("{} booted from restore point {}{tags}", replica.name, point.sequence)).await;
        let out = Booted { replica_id: replica.id, point_id: point.id, point_sequence: point.sequence, overlays };
        serde_json::to_value(out).map_err(|e| Error::internal(e.to_string()))
    }
    async fn undo(&self, ctx: &StepCtx, _: &Value) -> Result<()> {
        stop_replica(ctx, self.p.tenant_id, self.vm).await
    }
}

/// Powers a failed-over replica off, discards its overlays, and returns it to `Ready`.
async fn stop_replica(ctx: &StepCtx, tenant: TenantId, vm: VmId) -> Result<()> {
    let engine = &ctx.engine;
    let replica = match replica_of(engine, tenant, vm).await {
        Ok(r) => r,
        Err(Error::Conflict(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    engine.hv().forget(replica.id.0).await.map_err(hv_err)?;
    // Keep only the published points' files: the boot overlays go.
    let points = engine.store().restore_points_of(tenant, replica.id).await?;
    let mut dirs: Vec<PathBuf> = points
        .iter()
        .flat_map(|p| p.disks.iter())
        .filter_map(|d| Path::new(&d.file).parent().map(Path::to_path_buf))
        .collect();
    dirs.sort();
    dirs.dedup();
    let keep: Vec<PathBuf> = points.iter().flat_map(|p| p.disks.iter()).map(|d| PathBuf::from(&d.file)).collect();
    for dir in dirs {
        ChainDir::new(dir).collect_garbage(&keep).await.map_err(|e| Error::Unavailable(error_chain(&e)))?;
    }
    engine
        .store()
        .object_modify::<Replica, _, _>(tenant, replica.id.0, |r| {
            if matches!(r.state, ReplicaState::Failover | ReplicaState::FailedFailover) {
                r.state = r.state.apply(ReplicaEvent::FailoverUndone)?;
            }
            r.failover_point_id = None;
            r.updated_at = now();
            Ok(())
        })
        .await?;
    ctx.log(LogLevel::Info, format!("{} powered off; its changes were discarded", replica.name)).await;
    Ok(())
}

struct PlanVmStep {
    p: FailoverParams,
    vm: VmId,
    index: usize,
    k: usize,
    step: PlanStep,
}

#[async_trait]
impl Step for PlanVmStep {
    fn name(&self) -> String {
        format!("step:{}:{}", self.index, self.k)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let replica = replica_of(&ctx.engine, self.p.tenant_id, self.vm).await?;
        match &self.step.kind {
            PlanStepKind::PowerOn => Ok(Value::Null),
            PlanStepKind::WaitHeartbeat { timeout_secs } => {
                let hb = ctx
                    .engine
                    .hv()
                    .wait_heartbeat(replica.id.0, Duration::from_secs(u64::from(*timeout_secs)))
                    .await
                    .map_err(hv_err)?;
                ctx.log(LogLevel::Info, format!("{}: heartbeat, guest up {:.1} s", replica.name, hb.uptime_secs)).await;
                Ok(json!({ "uptime_secs": hb.uptime_secs }))
            }
            PlanStepKind::CheckTcpPort { port, .. } => Err(Error::conflict(format!(
                "step {:?}: cannot check port {port}: replica VMs have no network yet",
                self.step.name
            ))),
            PlanStepKind::RunScript { path, args, timeout_secs } => {
                let mut cmd = tokio::process::Command::new(path);
                cmd.args(args)
                    .env("DROVER_VM_NAME", &replica.name)
                    .env("DROVER_REPLICA_ID", replica.id.to_string())
                    .env("DROVER_SESSION_ID", ctx.session.id.to_string())
                    .kill_on_drop(true);
                let out = tokio::time::timeout(Duration::from_secs(u64::from(*timeout_secs)), cmd.output())
                    .await
                    .map_err(|_| Error::Unavailable(format!("script {path} did not finish in {timeout_secs} s")))?
                    .map_err(|e| Error::Unavailable(format!("cannot run script {path}: {e}")))?;
                if !out.status.success() {
                    return Err(Error::Unavailable(format!(
                        "script {path} exited with {}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    )));
                }
                ctx.log(LogLevel::Info, format!("script {path} succeeded")).await;
                Ok(Value::Null)
            }
        }
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

struct StopReplica {
    p: FailoverParams,
    vm: VmId,
    index: usize,
}

#[async_trait]
impl Step for StopReplica {
    fn name(&self) -> String {
        format!("stop:{}", self.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        stop_replica(ctx, self.p.tenant_id, self.vm).await?;
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

struct Conclude {
    p: FailoverParams,
    from: PlanState,
}

#[async_trait]
impl Step for Conclude {
    fn name(&self) -> String {
        "conclude".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        plan_event(&ctx.engine, &self.p, PlanEvent::Completed, &[self.from]).await?;
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}
