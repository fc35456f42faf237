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
//! | `step:<i>:<k>` | the plan's per-VM steps after power-on: wait for the heartbeat, check a TCP port, run a script | none |
//! | `conclude` | plan `FailoverInProgress → Failover` | none |
//!
//! A failed step of a critical group halts the plan (HALTED); in a non-critical group it is a
//! warning and the plan goes on. From HALTED, Continue retries or skips; Undo unwinds.
//!
//! Undo failover (session `PlanUndoFailover`, from FAILOVER): each replica VM is powered off, its
//! overlays are discarded (its changes are thrown away, the restore points were never written),
//! the replica returns to `Ready`, and the plan lands in UNDO FAILOVER.
//!
//! Permanent failover (`PlanPermanentFailover`, from FAILOVER): the replicas become production;
//! failback is no longer possible.
//!
//! Test failover (`PlanTestFailover`, any stable state): throwaway VMs boot from the points as
//! above, the plan's steps run, the VMs are discarded; replicas and the plan's state are never
//! touched, so replication goes on meanwhile.
//!
//! The VMs of a parallel group boot and run their steps at once, up to the group's maximum (each
//! VM's own steps in order; a critical failure lets the others finish the step they are in, then
//! halts); a sequential group takes them one after another.
//!
//! Decisions: replica and test VMs keep their source's NICs (networks, MACs) but have no uplink
//! until network mapping exists: the QEMU driver gives them user-mode networking with
//! `restrict=on`, so they reach nothing outside, and the host reaches them only through the port
//! forward a `CheckTcpPort` step adds for its check (`Hypervisor::check_tcp_port`). The step
//! retries until its timeout and fails naming the VM, the port and the timeout when the port stays
//! closed or silent.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_agent_api::{ChainRef, HostAgent, PointFile, VmDisk, VmRunSpec};
use drover_hv::TcpPortState;
use drover_types::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::saga::{FailurePolicy, Saga, SagaStep, Step, StepCtx};
use crate::{Engine, Error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverParams {
    pub plan_id: PlanId,
    pub tenant_id: TenantId,
    /// The newest point at or before this time; `None` for the newest.
    #[serde(default)]
    pub point_date: Option<Timestamp>,
    /// A planned failover: production is reachable and is shut down first, and its last changes
    /// are replicated, so nothing written before the command is lost.
    #[serde(default)]
    pub planned: bool,
}

pub(crate) fn register(engine: &Engine) {
    engine.register_saga(SessionKind::PlanFailover, Arc::new(failover_saga));
    engine.register_saga(SessionKind::PlanUndoFailover, Arc::new(undo_saga));
    engine.register_saga(SessionKind::PlanPermanentFailover, Arc::new(permanent_saga));
    engine.register_saga(SessionKind::PlanTestFailover, Arc::new(test_saga));
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
        // The last undo of an unwound failover: the plan lands in UNDO FAILOVER.
        vec![
            crate::plan_state::Begin {
                tenant: p.tenant_id,
                plan: p.plan_id,
                unwinding: PlanState::UndoFailoverInProgress,
                event: PlanEvent::Completed,
                passed: true,
            }
            .step(),
        ];
    if p.planned {
        let mut i = 0usize;
        for group in &plan.groups {
            for pvm in &group.vms {
                let task = task_of(pvm.vm_id).ok_or_else(|| Error::internal("a plan VM without a task"))?;
                steps.push(SagaStep {
                    task: Some(task),
                    group: None,
                    weight: 2,
                    critical: true,
                    step: Box::new(ShutdownSource { p: p.clone(), vm: pvm.vm_id, index: i }),
                });
                i += 1;
            }
        }
        steps.push(SagaStep {
            task: None,
            group: None,
            weight: 4,
            critical: true,
            step: Box::new(LastDelta { p: p.clone() }),
        });
    }
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
                Box::new(Boot { p: p.clone(), vm: pvm.vm_id, index: i, restore_tags: group.restore_tags, test: None }),
            ));
            for (k, s) in pvm.steps.iter().enumerate() {
                if s.kind == PlanStepKind::PowerOn {
                    continue; // the boot step is the power-on
                }
                let mut entry = step(
                    2,
                    Box::new(PlanVmStep { p: p.clone(), vm: pvm.vm_id, index: i, k, step: s.clone(), test: None }),
                );
                entry.critical = group.critical && s.critical;
                steps.push(entry);
            }
            i += 1;
        }
    }
    steps.push(conclude(&p, PlanState::FailoverInProgress));
    let parallel = parallel_groups(&plan);
    Ok(Saga { steps, on_failure: FailurePolicy::Halt, on_halt: halted(&p), parallel })
}

/// The plan's parallel groups and how many of their VMs start at once.
fn parallel_groups(plan: &Plan) -> std::collections::HashMap<u32, usize> {
    let parallel = plan.groups.iter().enumerate().filter_map(|(g, group)| match group.mode {
        GroupMode::Parallel { max } => Some((g as u32, max as usize)),
        GroupMode::Sequential => None,
    });
    parallel.collect()
}

/// A test failover: each VM boots from its point through an overlay of its own, as a VM of its
/// own (QEMU uuid = its task's id, so a rerun finds it), with no uplink; the plan's steps run;
/// then every test VM is powered off and its overlay discarded. Replicas and the plan's state are
/// not touched; replication may go on meanwhile.
fn test_saga(session: &Session, tasks: &[Task]) -> Result<Saga> {
    let p = params(session)?;
    let plan = plan_of(session)?;
    let mut steps = Vec::new();
    let mut ends = Vec::new();
    let mut i = 0usize;
    for (g, group) in plan.groups.iter().enumerate() {
        for pvm in &group.vms {
            let task = tasks
                .iter()
                .position(|t| t.vm_id == Some(pvm.vm_id))
                .ok_or_else(|| Error::internal("a plan VM without a task"))?;
            let test = Some(tasks[task].id.0);
            let step = |weight, step: Box<dyn Step>| SagaStep {
                task: Some(task),
                group: Some(g as u32),
                weight,
                critical: true,
                step,
            };
            steps.push(step(4, Box::new(Boot { p: p.clone(), vm: pvm.vm_id, index: i, restore_tags: false, test })));
            for (k, s) in pvm.steps.iter().enumerate() {
                if s.kind != PlanStepKind::PowerOn {
                    let mut entry = step(
                        2,
                        Box::new(PlanVmStep { p: p.clone(), vm: pvm.vm_id, index: i, k, step: s.clone(), test }),
                    );
                    entry.critical = s.critical;
                    steps.push(entry);
                }
            }
            ends.push(step(1, Box::new(EndTest { p: p.clone(), source: pvm.vm_id, vm: tasks[task].id.0, index: i })));
            i += 1;
        }
    }
    steps.extend(ends);
    Ok(Saga { parallel: parallel_groups(&plan), ..Saga::unwinding(steps) })
}

struct EndTest {
    p: FailoverParams,
    /// The plan's VM, whose replica the test VM was booted from.
    source: VmId,
    vm: uuid::Uuid,
    index: usize,
}

#[async_trait]
impl Step for EndTest {
    fn name(&self) -> String {
        format!("end_test:{}", self.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let replica = replica_of(&ctx.engine, self.p.tenant_id, self.source).await?;
        discard_vm(&ctx.engine, &replica, self.vm).await?;
        ctx.log(LogLevel::Info, "test VM powered off; its overlay discarded").await;
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

fn permanent_saga(session: &Session, tasks: &[Task]) -> Result<Saga> {
    let p = params(session)?;
    let mut steps =
        crate::plan_state::per_vm_steps(tasks, 1, |i, vm| Box::new(MakePermanent { p: p.clone(), vm, index: i }))?;
    steps.push(conclude(&p, PlanState::PermanentFailoverInProgress));
    Ok(Saga::unwinding(steps))
}

struct MakePermanent {
    p: FailoverParams,
    vm: VmId,
    index: usize,
}

#[async_trait]
impl Step for MakePermanent {
    fn name(&self) -> String {
        format!("permanent:{}", self.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let replica = replica_of(&ctx.engine, self.p.tenant_id, self.vm).await?;
        let (event, only_if) = (ReplicaEvent::MadePermanent, &[ReplicaState::Failover]);
        crate::ops::replica_event(&ctx.engine, self.p.tenant_id, replica.id, event, only_if).await?;
        ctx.log(LogLevel::Info, format!("{} is production now; failback is no longer possible", replica.name)).await;
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

fn undo_saga(session: &Session, tasks: &[Task]) -> Result<Saga> {
    let p = params(session)?;
    let mut steps =
        crate::plan_state::per_vm_steps(tasks, 1, |i, vm| Box::new(StopReplica { p: p.clone(), vm, index: i }))?;
    steps.push(conclude(&p, PlanState::UndoFailoverInProgress));
    Ok(Saga::unwinding(steps))
}

fn conclude(p: &FailoverParams, from: PlanState) -> SagaStep {
    let step = crate::plan_state::Conclude { tenant: p.tenant_id, plan: p.plan_id, from };
    SagaStep { task: None, group: None, weight: 1, critical: true, step: Box::new(step) }
}

fn halted(p: &FailoverParams) -> Option<Box<dyn crate::saga::HaltHook>> {
    let running = vec![PlanState::FailoverInProgress];
    Some(Box::new(crate::plan_state::PlanHalted { tenant: p.tenant_id, plan: p.plan_id, running }))
}

/// A planned failover's first step per VM: production is shut down (powered off after the
/// engine's shutdown timeout), through its agent, which must be reachable.
struct ShutdownSource {
    p: FailoverParams,
    vm: VmId,
    index: usize,
}

#[async_trait]
impl Step for ShutdownSource {
    fn name(&self) -> String {
        format!("shutdown:{}", self.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let engine = &ctx.engine;
        let vm = engine.store().object_get::<Vm>(self.p.tenant_id, self.vm.0).await?;
        let agent = crate::ops::vm_agent(engine, &vm).await.map_err(|e| {
            Error::Unavailable(format!(
                "a planned failover shuts production down first, and {}'s host cannot be reached ({e}); fail over \
                 without `planned` to go on from the newest restore point",
                vm.name
            ))
        })?;
        let outcome = crate::ops::shut_down(engine, agent.as_ref(), &vm).await?;
        let level = if outcome == drover_hv::ShutdownOutcome::ForcedOff { LogLevel::Warning } else { LogLevel::Info };
        ctx.log(level, format!("planned failover: production VM {} shut down ({outcome:?})", vm.name)).await;
        Ok(json!({ "outcome": outcome }))
    }
    async fn undo(&self, ctx: &StepCtx, _: &Value) -> Result<()> {
        // Production stays off: what ran at DR meanwhile may matter more; it is started on request.
        ctx.log(LogLevel::Info, "production stays powered off; power it on when wanted").await;
        Ok(())
    }
}

/// How long a planned failover waits for the replication of production's last changes.
const LAST_DELTA_WAIT: Duration = Duration::from_secs(6 * 3600);

/// A planned failover's replication of what production wrote until it was shut down: a run of
/// every replication job of the plan's VMs (after a run already going ends), which must leave
/// each VM a restore point made after the shutdown.
struct LastDelta {
    p: FailoverParams,
}

#[async_trait]
impl Step for LastDelta {
    fn name(&self) -> String {
        "last_delta".into()
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let engine = &ctx.engine;
        let plan = plan_of(&ctx.session)?;
        let since = now();
        let mut jobs: Vec<ReplicationJobId> = Vec::new();
        for vm in plan.groups.iter().flat_map(|g| g.vms.iter()) {
            let replica = replica_of(engine, self.p.tenant_id, vm.vm_id).await?;
            if !jobs.contains(&replica.job_id) {
                jobs.push(replica.job_id);
            }
        }
        let mut runs = Vec::new();
        for job_id in jobs {
            let job = engine.store().object_get::<ReplicationJob>(self.p.tenant_id, job_id.0).await?;
            if let Some(s) = crate::replication::newest_run(engine, &job).await?
                && s.state != SessionState::Stopped
            {
                ctx.log(LogLevel::Info, format!("waiting for the run of {} under way", job.name)).await;
                engine.wait(s.id, LAST_DELTA_WAIT).await?;
            }
            let run = crate::replication::submit(engine, &job).await?;
            ctx.log(LogLevel::Info, format!("replicating production's last changes: job {} (session {run})", job.name))
                .await;
            let s = engine.wait(run, LAST_DELTA_WAIT).await?;
            if !matches!(s.result, SessionResult::Success | SessionResult::Warning) {
                return Err(Error::Unavailable(format!(
                    "the last replication of job {} ended {:?}: {}",
                    job.name,
                    s.result,
                    s.failure_message.unwrap_or_default()
                )));
            }
            runs.push(run);
        }
        for vm in plan.groups.iter().flat_map(|g| g.vms.iter()) {
            let replica = replica_of(engine, self.p.tenant_id, vm.vm_id).await?;
            let points = engine.store().restore_points_of(self.p.tenant_id, replica.id).await?;
            let fresh = points.iter().any(|p| p.state == RestorePointState::Published && p.created_at >= since);
            if !fresh {
                return Err(Error::Unavailable(format!(
                    "{} has no restore point of production's last state: its last replication did not publish one",
                    replica.name
                )));
            }
        }
        ctx.log(
            LogLevel::Info,
            "production's last changes are replicated: nothing written before the failover is lost",
        )
        .await;
        Ok(json!({ "runs": runs }))
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
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
    overlays: Vec<PointFile>,
}

/// The replica and restore point a boot step's output names (failover and test failover).
pub(crate) fn booted_from(output: &Value) -> Option<(ReplicaId, RestorePointId)> {
    let b: Booted = serde_json::from_value(output.clone()).ok()?;
    Some((b.replica_id, b.point_id))
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
    /// A test failover's VM (its own uuid and overlay); `None` boots the replica itself.
    test: Option<uuid::Uuid>,
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
        if self.test.is_none() && !matches!(replica.state, ReplicaState::Ready | ReplicaState::Failover) {
            return Err(Error::conflict(format!("replica {} is {:?}", replica.name, replica.state)));
        }
        let agent = replica_agent(engine, &replica).await?;
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
        // Failover never needs production: its host is only asked whether it can be reached, so
        // the session says so, and production is fenced once it comes back.
        let production_lost = match self.test {
            Some(_) => None,
            None => crate::ops::vm_agent(engine, &source).await.err(),
        };
        if let Some(e) = &production_lost {
            let msg = format!(
                "{}: the production host cannot be reached ({e}); failing over from the newest published restore point \
                 ({}); the production VM will be fenced (kept powered off) when its host returns",
                source.name, point.sequence
            );
            ctx.log(LogLevel::Warning, msg).await;
        }
        let label = match self.test {
            Some(id) => format!("test-{id}"),
            None => overlay_label(&ctx.session),
        };
        let mut overlays = Vec::new();
        for d in &source.disks {
            let pd =
                point.disks.iter().find(|x| x.disk == d.name).ok_or_else(|| {
                    Error::conflict(format!("restore point {} has no disk {}", point.sequence, d.name))
                })?;
            let chain =
                ChainRef { datastore: replica.target_datastore_id.0, replica: replica.id.0, disk: d.name.clone() };
            let overlay = agent
                .boot_overlay_ensure(&chain, &PointFile(pd.file.clone()), &label)
                .await
                .map_err(crate::ops::vm_err)?;
            overlays.push(overlay);
        }
        let spec = VmRunSpec {
            id: self.test.unwrap_or(replica.id.0),
            name: if self.test.is_some() { format!("{}_test", source.name) } else { replica.name.clone() },
            vcpus: source.vcpus,
            memory_mib: source.memory_mib,
            disks: overlays.iter().map(|o| VmDisk::Overlay { file: o.clone() }).collect(),
            // A test VM is isolated: it cannot reach production, and the host reaches it only to
            // check a port. The replica is on the networks the job maps its source's to.
            nics: match self.test {
                Some(_) => crate::ops::no_uplink_vm_nics(&source),
                None => crate::networks::failover_nics(ctx, agent.as_ref(), &replica, &source).await?,
            },
            boot: crate::ops::vm_boot(&source),
            hardware: crate::ops::vm_hardware(&source),
        };
        crate::ops::power_on(ctx, agent.as_ref(), &spec).await?;
        if self.test.is_some() {
            ctx.log(
                LogLevel::Info,
                format!(
                    "test VM {} booted from restore point {} ({}; no uplink)",
                    spec.name,
                    point.sequence,
                    point.consistency.describe()
                ),
            )
            .await;
            let out = Booted { replica_id: replica.id, point_id: point.id, point_sequence: point.sequence, overlays };
            return serde_json::to_value(out).map_err(|e| Error::internal(e.to_string()));
        }
        engine
            .store()
            .object_modify::<Replica, _, _>(self.p.tenant_id, replica.id.0, |r| {
                if r.state != ReplicaState::Failover {
                    r.state = r.state.apply(ReplicaEvent::FailedOver)?;
                }
                r.failover_point_id = Some(point.id);
                if production_lost.is_some() {
                    r.fence_source = true;
                }
                r.updated_at = now();
                Ok(())
            })
            .await?;
        let tags = if self.restore_tags && !source.tags.is_empty() {
            format!(", tags {}", source.tags.iter().map(ToString::to_string).collect::<Vec<_>>().join(" "))
        } else {
            String::new()
        };
        ctx.log(
            LogLevel::Info,
            format!(
                "{} booted from restore point {} ({}){tags}",
                replica.name,
                point.sequence,
                point.consistency.describe()
            ),
        )
        .await;
        let out = Booted { replica_id: replica.id, point_id: point.id, point_sequence: point.sequence, overlays };
        serde_json::to_value(out).map_err(|e| Error::internal(e.to_string()))
    }
    async fn undo(&self, ctx: &StepCtx, _: &Value) -> Result<()> {
        match self.test {
            Some(id) => {
                let replica = replica_of(&ctx.engine, self.p.tenant_id, self.vm).await?;
                discard_vm(&ctx.engine, &replica, id).await
            }
            None => stop_replica(ctx, self.p.tenant_id, self.vm).await,
        }
    }
}

/// The disk files a VM of this control plane's own host was last started with (its runtime
/// record): failback, which still runs on this host only, reads a replica's overlays so.
pub(crate) async fn runtime_disks(engine: &Engine, vm: uuid::Uuid) -> Result<Vec<PathBuf>> {
    engine.hv().runtime_disks(vm).await.map_err(crate::unavailable)
}

/// The agent of the host a replica's restore points (and so its VM, once failed over) are on.
pub(crate) async fn replica_agent(engine: &Engine, replica: &Replica) -> Result<Arc<dyn HostAgent>> {
    crate::ops::datastore_agent_of(engine, replica.target_datastore_id).await
}

/// Powers off and forgets a VM that ran on boot overlays of `replica`'s chains (the replica
/// itself, a test VM), and removes the overlays. Idempotent.
pub(crate) async fn discard_vm(engine: &Engine, replica: &Replica, vm: uuid::Uuid) -> Result<()> {
    let agent = replica_agent(engine, replica).await?;
    agent.vm_forget(vm, true).await.map_err(crate::ops::vm_err)
}

/// Powers a failed-over replica off, discards its overlays, and returns it to `Ready`.
async fn stop_replica(ctx: &StepCtx, tenant: TenantId, vm: VmId) -> Result<()> {
    let engine = &ctx.engine;
    let replica = match replica_of(engine, tenant, vm).await {
        Ok(r) => r,
        Err(Error::Conflict(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    discard_vm(engine, &replica, replica.id.0).await?;
    engine
        .store()
        .object_modify::<Replica, _, _>(tenant, replica.id.0, |r| {
            if matches!(r.state, ReplicaState::Failover | ReplicaState::FailedFailover) {
                r.state = r.state.apply(ReplicaEvent::FailoverUndone)?;
            }
            r.failover_point_id = None;
            r.fence_source = false;
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
    /// The test VM to act on instead of the replica.
    test: Option<uuid::Uuid>,
}

#[async_trait]
impl Step for PlanVmStep {
    fn name(&self) -> String {
        format!("step:{}:{}", self.index, self.k)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let replica = replica_of(&ctx.engine, self.p.tenant_id, self.vm).await?;
        let target = self.test.unwrap_or(replica.id.0);
        match &self.step.kind {
            PlanStepKind::PowerOn => Ok(Value::Null),
            PlanStepKind::WaitHeartbeat { timeout_secs } => {
                let agent = replica_agent(&ctx.engine, &replica).await?;
                let hb = agent
                    .vm_wait_heartbeat(target, Duration::from_secs(u64::from(*timeout_secs)))
                    .await
                    .map_err(crate::ops::vm_err)?;
                let at = crate::ops::at_addresses(&hb);
                ctx.log(LogLevel::Info, format!("{}: heartbeat, guest up {:.1} s{at}", replica.name, hb.uptime_secs))
                    .await;
                Ok(json!({ "uptime_secs": hb.uptime_secs, "addresses": hb.addresses }))
            }
            PlanStepKind::CheckTcpPort { port, timeout_secs } => {
                let name = match self.test {
                    Some(_) => {
                        let source = ctx.engine.store().object_get::<Vm>(self.p.tenant_id, self.vm.0).await?;
                        format!("test VM {}_test", source.name)
                    }
                    None => replica.name.clone(),
                };
                let timeout = Duration::from_secs(u64::from(*timeout_secs));
                let started = std::time::Instant::now();
                let agent = replica_agent(&ctx.engine, &replica).await?;
                let state = agent
                    .vm_check_tcp_port(target, *port, timeout)
                    .await
                    .map_err(|e| Error::Unavailable(format!("{name}: cannot check TCP port {port}: {}", e.message)))?;
                let took = started.elapsed().as_secs_f64();
                match state {
                    TcpPortState::Open => {
                        ctx.log(LogLevel::Info, format!("{name}: TCP port {port} is open ({took:.1} s)")).await;
                        Ok(json!({ "port": port, "state": state }))
                    }
                    TcpPortState::Closed => Err(Error::Unavailable(format!(
                        "{name}: TCP port {port} is closed: the guest refused connections for {timeout_secs} s"
                    ))),
                    TcpPortState::NoAnswer => Err(Error::Unavailable(format!(
                        "{name}: TCP port {port} did not answer within {timeout_secs} s (guest not up, or no \
                         address on its network)"
                    ))),
                }
            }
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
