//! Replication runs: one session per run of a replication job, one task per VM.
//!
//! Per VM, in this order:
//!
//! | step | does | undo |
//! |---|---|---|
//! | `prepare:<i>` | finds or creates the replica, moves it `Ready → Processing`, decides each disk's bitmaps | back to `Ready` |
//! | `cut:<i>` | freezes the guest through its guest agent (as the job's consistency says), cuts a point in time of every disk at once (live over QMP, or offline with a storage daemon), thaws | ends the cuts as failed, thaws |
//! | `transfer:<i>` | copies what changed since each disk's cut into a new point file on the target, flushes, writes the manifest | ends the cut as failed (the changes stay tracked) and deletes the unpublished file |
//! | `publish:<i>` | records the restore point: from now on it exists | none: a published point is valid |
//! | `release:<i>` | ends the cut as successful (the old bitmap goes), replica `Ready`, garbage of the chain removed | none |
//! | `retention:<i>` | retires the oldest points beyond the job's retention | none |
//!
//! VMs stand alone ([`FailurePolicy::IsolateTasks`]): a failed step runs again within the run
//! (twice, after the engine's `retry_backoff`, doubling); a VM whose step still fails is given up
//! for this run, its own steps undone (its cut ends as failed, so its changes stay tracked for the
//! next run), while the other VMs' points are published. The run then ends `Warning` (`Failed`
//! when every VM was given up), and the VM's task says why.
//!
//! Each disk moves by one of three modes, recorded in the session log and the step output:
//! `seed` (no point yet: the allocated data), `bitmap` (the dirty granules since the last point),
//! `hash-compare` (a point exists but no bitmap can be trusted: after a crash of the VM, a new
//! disk; both sides are read and only differing blocks written).
//!
//! Consistency. A running VM's disks are cut together, between a freeze of the guest's file
//! systems and their thaw through the QEMU guest agent (whose fsfreeze hooks let applications
//! flush), when the job's [`ConsistencyMode`] is `require` or `try`: such a point is
//! application-consistent. The freeze is bounded ([`FREEZE_BOUND`]; the agent's watchdog thaws a
//! guest whose freeze outlasts it, even if the control plane is gone), and the point is
//! application-consistent only if the freeze held until every disk was cut. Otherwise (no guest
//! agent, it cannot freeze, the freeze did not hold, a cut resumed from an earlier attempt) the
//! point is crash-consistent, with the reason on the point and a warning in the log; `require`
//! fails the VM's task instead, its changes kept for the next run. A VM that is not running is
//! cut as it was left (crash-consistent, and `require` does not apply: there is no guest to
//! freeze).
//!
//! Invariants. The cut's bitmap is dropped only after the point is published, so a crash at any
//! moment loses no change: an unfinished cut is ended as failed, which merges its changes into
//! the next bitmap. A point file is never visible before its data is flushed and its manifest is
//! written. Bitmaps are found, not derived: the one recording, consistent `drover-*` bitmap of a
//! disk is the cut's `current`, and `next` is named after the run (`drover-<session>`), so a
//! failed or crashed run (whose cut ends by merging `current` into `next`) hands the next run a
//! bitmap that still covers everything since the last point. See [`plan_bitmaps`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_agent_api::{
    AgentError, BitmapInfo, ChainRef, Cut, CutSpec, DiskRef, ErrorKind, FreezeSpec, HostAgent, PointFile, PointSpec,
    SourceEndpoint, TransferMode, TransferSpec, TransferState, TransferStatus,
};
use drover_hv::PowerState;
use drover_types::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::saga::{FailurePolicy, Saga, SagaStep, Step, StepCtx};
use crate::{Engine, Error, Result, agent_error};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicationParams {
    pub job_id: ReplicationJobId,
    pub tenant_id: TenantId,
}

pub(crate) fn register(engine: &Engine) {
    engine.register_saga(SessionKind::Replication, Arc::new(saga));
}

fn saga(session: &Session, tasks: &[Task]) -> Result<Saga> {
    let p: ReplicationParams = serde_json::from_value(session.params.clone())
        .map_err(|e| Error::internal(format!("session {}: unreadable parameters: {e}", session.id)))?;
    let mut steps = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        let vm = t.vm_id.ok_or_else(|| Error::internal("a replication task without a VM"))?;
        let step = |weight, critical, step: Box<dyn Step>| SagaStep {
            task: Some(i),
            group: Some(i as u32),
            weight,
            critical,
            step,
        };
        let ctx = VmCtx { p: p.clone(), vm, index: i };
        steps.push(step(1, true, Box::new(Prepare(ctx.clone()))));
        steps.push(step(1, true, Box::new(CutStep(ctx.clone()))));
        steps.push(step(8, true, Box::new(Transfer(ctx.clone()))));
        steps.push(step(1, true, Box::new(Publish(ctx.clone()))));
        steps.push(step(1, true, Box::new(Release(ctx.clone()))));
        steps.push(step(1, false, Box::new(Retention(ctx))));
    }
    // One VM's point does not depend on another's: a VM whose step keeps failing is given up
    // (its steps undone, its changes still tracked for the next run) and the others go on.
    let mut saga = Saga::unwinding(steps);
    saga.on_failure = FailurePolicy::IsolateTasks { retries: RETRIES };
    Ok(saga)
}

/// How many times a failed step of a VM runs again within the run (after the engine's
/// `retry_backoff`, doubling) before the VM is given up for this run.
const RETRIES: u32 = 2;

/// Starts a replication run of a job now. Refused while another run of the job is unfinished.
/// The newest run of a job, if it ever ran.
pub async fn newest_run(engine: &Engine, job: &ReplicationJob) -> Result<Option<Session>> {
    let filter = SessionFilter {
        target_id: Some(job.id.0),
        kind: Some(SessionKind::Replication),
        limit: 1,
        ..Default::default()
    };
    let (runs, _) = engine.store().session_list(job.tenant_id, &filter).await?;
    Ok(runs.into_iter().next())
}

pub async fn submit(engine: &Engine, job: &ReplicationJob) -> Result<SessionId> {
    // Runs are one at a time and in order, so only the newest can be unfinished.
    if newest_run(engine, job).await?.is_some_and(|s| s.state != SessionState::Stopped) {
        return Err(Error::conflict(format!("replication job {:?} is already running", job.name)));
    }
    let params = serde_json::to_value(ReplicationParams { job_id: job.id, tenant_id: job.tenant_id })
        .map_err(|e| Error::internal(e.to_string()))?;
    let session = Session::new(
        job.tenant_id,
        SessionKind::Replication,
        job.name.clone(),
        SessionTarget::ReplicationJob(job.id),
        params,
    );
    let mut tasks = Vec::new();
    for vm_id in &job.vm_ids {
        let name = engine
            .store()
            .object_get::<Vm>(job.tenant_id, vm_id.0)
            .await
            .map(|v| v.name)
            .unwrap_or_else(|_| vm_id.to_string());
        tasks.push(session.task(Some(*vm_id), name));
    }
    engine.submit(session, tasks).await
}

#[derive(Debug, Clone)]
struct VmCtx {
    p: ReplicationParams,
    vm: VmId,
    index: usize,
}

/// What `prepare` decided for one disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DiskPlan {
    index: usize,
    name: String,
    size: u64,
    /// The source disk, on the VM's host.
    disk: DiskRef,
    /// Its chain, on the target datastore's host.
    chain: ChainRef,
    /// The newest published point's file (its manifest beside it), if any.
    prev_file: Option<PointFile>,
    bitmaps: BitmapPlan,
    /// The host of the chain's datastore, whose agent pulls the cut (absent in a plan recorded
    /// before cuts named their reader: such a cut is read on its own host only).
    #[serde(default)]
    reader: Option<uuid::Uuid>,
}

impl DiskPlan {
    /// The cut of this disk in this run: its id (session, VM, disk) makes a rerun resume it.
    fn cut(&self, ctx: &StepCtx, c: &VmCtx, live: bool) -> CutSpec {
        CutSpec {
            id: format!("{}-{}-{}", &ctx.session.id.to_string()[..8], c.index, self.index),
            disk: self.disk.clone(),
            live,
            current: self.bitmaps.current.clone(),
            next: self.bitmaps.next.clone(),
            remove: self.bitmaps.remove.clone(),
            fresh: self.bitmaps.fresh,
            file: None,
            reader: self.reader,
        }
    }
}

/// How one disk's changes are found in a run: decided from the bitmaps the disk has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapPlan {
    pub mode: TransferMode,
    pub reason: Option<String>,
    /// The bitmap the cut exports and then drops.
    pub current: String,
    /// The bitmap that records from the cut on.
    pub next: String,
    /// `current` must be created before the cut (there is no usable one).
    pub fresh: bool,
    /// Bitmaps of ours to remove before the cut (inconsistent ones, or all when it is unclear
    /// which one covers the time since the last point).
    pub remove: Vec<String>,
}

/// Sets the replica's bitmap ledger of `disks` (see `Replica::tracking_bitmaps`).
async fn record_ledger(
    ctx: &StepCtx,
    tenant: TenantId,
    replica: ReplicaId,
    disks: Vec<(String, Vec<String>)>,
) -> Result<()> {
    if disks.is_empty() {
        return Ok(());
    }
    ctx.engine
        .store()
        .object_modify::<Replica, _, _>(tenant, replica.0, |r| {
            for (disk, bitmaps) in &disks {
                r.tracking_bitmaps.insert(disk.clone(), bitmaps.clone());
            }
            Ok(())
        })
        .await?;
    Ok(())
}

/// Decides a disk's bitmaps from its `drover-*` bitmaps (`ours`); `seed` says there is no point
/// yet; `ledger` is the replica's ledger for the disk (`Replica::tracking_bitmaps`: the bitmaps
/// that cover every change since the newest point, in order; absent for replicas older than it).
///
/// With a ledger, only the first of its bitmaps the disk has sound may carry the cycle: another
/// sound bitmap (made by a run that published nothing, such as a failed hash-compare's fresh
/// one, or left by a restored or reverted disk) does not cover everything since the point, so
/// the disk is hash-compared and the strays are removed.
pub fn plan_bitmaps(ours: &[BitmapInfo], seed: bool, run: &str, ledger: Option<&[String]>) -> BitmapPlan {
    let next = format!("drover-{run}");
    let fresh_name = format!("drover-{run}-base");
    // A rerun of the same run finds its own `next` already made by an earlier cut attempt: the
    // cut is then resumed with the same names, which begin_cycle accepts.
    let usable: Vec<&BitmapInfo> =
        ours.iter().filter(|b| b.recording && b.persistent && !b.inconsistent && b.name != next).collect();
    let broken: Vec<String> = ours.iter().filter(|b| b.inconsistent).map(|b| b.name.clone()).collect();
    let all_but_next = || ours.iter().map(|b| b.name.clone()).filter(|n| *n != next).collect::<Vec<_>>();
    let all_but = |keep: &str| ours.iter().map(|b| b.name.clone()).filter(|n| *n != next && n != keep).collect();
    let plan = |mode: TransferMode, reason: Option<String>, current: String, fresh: bool, remove: Vec<String>| {
        BitmapPlan { mode, reason, current, next: next.clone(), fresh, remove }
    };
    match (seed, ledger, usable.as_slice()) {
        (true, _, [one]) => plan(TransferMode::Seed, None, one.name.clone(), false, broken),
        (true, _, _) => plan(TransferMode::Seed, None, fresh_name, true, all_but_next()),
        (false, Some(recorded), usable) => match recorded.iter().find_map(|r| usable.iter().find(|b| b.name == *r)) {
            // Strays beside it are removed: they cover less, or something else.
            Some(b) => plan(TransferMode::Bitmap, None, b.name.clone(), false, all_but(&b.name)),
            None => {
                let state = |name: &String| match ours.iter().find(|b| b.name == *name) {
                    Some(b) if b.inconsistent => format!("{name} is inconsistent (the VM stopped uncleanly)"),
                    Some(_) => format!("{name} no longer records"),
                    None => format!("{name} is gone"),
                };
                let states: Vec<String> = recorded.iter().map(state).collect();
                let mut why = format!("the bitmap recorded since the newest point: {}", states.join(", "));
                if !usable.is_empty() {
                    let names: Vec<&str> = usable.iter().map(|b| b.name.as_str()).collect();
                    why.push_str(&format!(
                        "; {} cannot stand for it (made since that point, or the disk was replaced)",
                        names.join(", ")
                    ));
                }
                plan(TransferMode::HashCompare, Some(why), fresh_name, true, all_but_next())
            }
        },
        (false, None, [one]) => plan(TransferMode::Bitmap, None, one.name.clone(), false, broken),
        (false, None, []) => {
            let why = if broken.is_empty() {
                "no bitmap records this disk's changes".to_string()
            } else {
                format!("bitmap {} is inconsistent (the VM stopped uncleanly)", broken.join(", "))
            };
            plan(TransferMode::HashCompare, Some(why), fresh_name, true, all_but_next())
        }
        (false, None, many) => plan(
            TransferMode::HashCompare,
            Some(format!("{} bitmaps record this disk; which covers the last point is unclear", many.len())),
            fresh_name,
            true,
            all_but_next(),
        ),
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Prepared {
    replica_id: ReplicaId,
    running: bool,
    source_datastore: DatastoreId,
    target_datastore: DatastoreId,
    disks: Vec<DiskPlan>,
    /// The job's bandwidth limit when the run began (bytes per second).
    #[serde(default)]
    bandwidth_limit: Option<u64>,
}

impl Prepared {
    /// The agents of the source VM's host and of the target datastore's host.
    async fn agents(&self, ctx: &StepCtx, c: &VmCtx) -> Result<(Arc<dyn HostAgent>, Arc<dyn HostAgent>)> {
        let store = ctx.engine.store();
        let source = store.object_get::<Datastore>(c.p.tenant_id, self.source_datastore.0).await?;
        let target = store.object_get::<Datastore>(c.p.tenant_id, self.target_datastore.0).await?;
        Ok((ctx.engine.datastore_agent(&source).await?, ctx.engine.datastore_agent(&target).await?))
    }
}

/// What `transfer` made for one disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Transferred {
    disk: String,
    file: PointFile,
    size: u64,
    manifest_digest: String,
    mode: TransferMode,
    reason: Option<String>,
    bytes_read: u64,
    bytes_written: u64,
    /// The cut, to end after publishing.
    cut: Cut,
}

fn output<T: for<'de> Deserialize<'de>>(ctx: &StepCtx, step: &str) -> Result<T> {
    let v = ctx.outputs.get(step).ok_or_else(|| Error::internal(format!("step {step} has no output")))?;
    serde_json::from_value(v.clone()).map_err(|e| Error::internal(format!("output of {step}: {e}")))
}

async fn replica_for(ctx: &StepCtx, c: &VmCtx) -> Result<Option<Replica>> {
    let all = ctx.engine.store().object_list::<Replica>(c.p.tenant_id).await?;
    Ok(all.into_iter().find(|r| r.job_id == c.p.job_id && r.source_vm_id == c.vm))
}

struct Prepare(VmCtx);

#[async_trait]
impl Step for Prepare {
    fn name(&self) -> String {
        format!("prepare:{}", self.0.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let c = &self.0;
        let store = ctx.engine.store();
        let job = store.object_get::<ReplicationJob>(c.p.tenant_id, c.p.job_id.0).await?;
        let vm = store.object_get::<Vm>(c.p.tenant_id, c.vm.0).await?;
        if !vm.provisioned {
            return Err(Error::conflict(format!("VM {} has no disks yet", vm.name)));
        }
        let source_ds = store.object_get::<Datastore>(c.p.tenant_id, vm.datastore_id.0).await?;
        let target_ds = store.object_get::<Datastore>(c.p.tenant_id, job.target_datastore_id.0).await?;
        let source = ctx.engine.datastore_agent(&source_ds).await?;
        ctx.engine.datastore_agent(&target_ds).await?;
        let replica = match replica_for(ctx, c).await? {
            Some(r) => r,
            None => {
                let r = Replica::new(c.p.tenant_id, job.id, (vm.id, &vm.name), target_ds.id);
                store.object_insert(&r).await?;
                ctx.log(LogLevel::Info, format!("created replica {}", r.name)).await;
                r
            }
        };
        // Only a Ready replica takes a new point; a rerun of this step finds it Processing already.
        if !matches!(replica.state, ReplicaState::Ready | ReplicaState::Processing) {
            return Err(Error::conflict(format!(
                "replica {} is {:?}; replication resumes after failback or undo",
                replica.name, replica.state
            )));
        }
        crate::ops::replica_event(
            &ctx.engine,
            c.p.tenant_id,
            replica.id,
            ReplicaEvent::ReplicationStarted,
            &[ReplicaState::Ready],
        )
        .await?;
        let points = store.restore_points_of(c.p.tenant_id, replica.id).await?;
        let newest = points.iter().rev().find(|p| p.state == RestorePointState::Published);
        let run = ctx.session.id.to_string()[..8].to_string();
        let running = matches!(source.vm_status(vm.id.0).await, Ok(PowerState::Running | PowerState::Paused));
        let mut disks = Vec::new();
        for (index, d) in vm.disks.iter().enumerate() {
            let disk = DiskRef { datastore: source_ds.id.0, vm: vm.id.0, disk: d.name.clone(), index };
            let info = source.disk_info(&disk, running).await.map_err(agent_error)?;
            let newest_disk = newest.and_then(|p| p.disks.iter().find(|x| x.disk == d.name));
            let prev_file = newest_disk.map(|x| PointFile(x.file.clone()));
            // The replica's ledger, or (for a replica older than it) what the point recorded.
            let ledger: Option<Vec<String>> = replica
                .tracking_bitmaps
                .get(&d.name)
                .cloned()
                .or_else(|| newest_disk.and_then(|x| x.tracking_bitmap.clone()).map(|b| vec![b]));
            let ours: Vec<BitmapInfo> = info.bitmaps.into_iter().filter(|b| b.name.starts_with("drover-")).collect();
            disks.push(DiskPlan {
                index,
                name: d.name.clone(),
                size: info.size,
                disk,
                chain: ChainRef { datastore: target_ds.id.0, replica: replica.id.0, disk: d.name.clone() },
                bitmaps: plan_bitmaps(&ours, prev_file.is_none(), &run, ledger.as_deref()),
                prev_file,
                reader: Some(target_ds.host_id.0),
            });
        }
        let out = Prepared {
            replica_id: replica.id,
            running,
            source_datastore: source_ds.id,
            target_datastore: target_ds.id,
            disks,
            bandwidth_limit: job.bandwidth_limit,
        };
        serde_json::to_value(out).map_err(|e| Error::internal(e.to_string()))
    }
    async fn undo(&self, ctx: &StepCtx, out: &Value) -> Result<()> {
        let replica = match serde_json::from_value::<Prepared>(out.clone()) {
            Ok(p) => Some(p.replica_id),
            Err(_) => replica_for(ctx, &self.0).await?.map(|r| r.id),
        };
        if let Some(id) = replica {
            crate::ops::replica_event(
                &ctx.engine,
                self.0.p.tenant_id,
                id,
                ReplicaEvent::ReplicationFinished,
                &[ReplicaState::Processing],
            )
            .await?;
        }
        Ok(())
    }
}

/// The longest a guest stays frozen for its disks' cuts (from when it is frozen): the agent
/// thaws it when this passes, and the point is then crash-consistent. Cutting every disk of a
/// running VM is a few QMP commands per disk.
pub const FREEZE_BOUND: Duration = Duration::from_secs(30);

/// What `cut` did: the consistency of the point its cuts make.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CutsMade {
    consistency: PointConsistency,
    /// Each disk's cut, in the order of the plan's disks.
    cuts: Vec<Cut>,
}

struct CutStep(VmCtx);

impl CutStep {
    fn freeze_id(&self, ctx: &StepCtx) -> String {
        format!("{}-{}", &ctx.session.id.to_string()[..8], self.0.index)
    }
}

#[async_trait]
impl Step for CutStep {
    fn name(&self) -> String {
        format!("cut:{}", self.0.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let c = &self.0;
        let prep: Prepared = output(ctx, &format!("prepare:{}", c.index))?;
        let (source, _) = prep.agents(ctx, c).await?;
        let job = ctx.engine.store().object_get::<ReplicationJob>(c.p.tenant_id, c.p.job_id.0).await?;
        let vm = c.vm.0;
        let freeze_id = self.freeze_id(ctx);
        // Why the point cannot be application-consistent, when it cannot.
        let mut not_app: Option<String> = None;
        let mut frozen = None;
        if !prep.running {
            not_app = Some("the VM was not running: its disks were cut as it left them".into());
        } else if job.consistency == ConsistencyMode::Off {
            not_app = Some("the job's consistency is off: the guest was not frozen".into());
        } else {
            // A cut an earlier attempt of this step made is resumed, not made again, and was
            // not necessarily made inside a freeze: `next` exists once a disk was cut.
            for d in &prep.disks {
                let info = source.disk_info(&d.disk, true).await.map_err(agent_error)?;
                if info.bitmaps.iter().any(|b| b.name == d.bitmaps.next) {
                    not_app = Some(format!(
                        "disk {} was cut by an earlier attempt, which is resumed (not necessarily inside a freeze)",
                        d.name
                    ));
                    break;
                }
            }
            if not_app.is_none() {
                let spec = FreezeSpec { id: freeze_id.clone(), max_ms: FREEZE_BOUND.as_millis() as u64 };
                match source.vm_freeze(vm, &spec).await {
                    Ok(o) if o.frozen => frozen = Some(o),
                    Ok(o) => not_app = Some(o.reason),
                    // The agent cannot be reached: the step is tried again.
                    Err(e) if e.kind == ErrorKind::Retry => return Err(agent_error(e)),
                    Err(e) => not_app = Some(format!("the freeze failed: {}", e.message)),
                }
            }
        }
        // `require` applies to a running guest only: a stopped VM has nothing to freeze.
        let required = job.consistency == ConsistencyMode::Require && prep.running;
        let unmet = |why: &str| Error::conflict(format!("the job requires application-consistent points: {why}"));
        if let (Some(why), true) = (&not_app, required) {
            return Err(unmet(why));
        }
        // Every disk at once, while the guest is frozen.
        let mut cuts = Vec::new();
        let mut failed = None;
        for d in &prep.disks {
            match source.cut_begin(&d.cut(ctx, c, prep.running)).await {
                Ok(cut) => cuts.push(cut),
                Err(e) => {
                    failed = Some(e.context(format!("disk {}", d.name)));
                    break;
                }
            }
        }
        let consistency = match (frozen, not_app) {
            (Some(f), _) => match source.vm_thaw(vm, &freeze_id).await {
                Ok(t) if t.held => PointConsistency::application(f.reason),
                Ok(t) => PointConsistency::crash(t.reason.unwrap_or_else(|| "the freeze did not hold".into())),
                Err(e) => PointConsistency::crash(format!(
                    "the thaw failed ({}); the agent's watchdog thaws the guest",
                    e.message
                )),
            },
            (None, why) => PointConsistency::crash(why.unwrap_or_else(|| "the guest was not frozen".into())),
        };
        let failed = match failed {
            Some(e) => Some(agent_error(e)),
            None if required && consistency.kind == ConsistencyKind::Crash => {
                Some(unmet(consistency.reason.as_deref().unwrap_or("the freeze did not hold")))
            }
            None => None,
        };
        if let Some(e) = failed {
            // The cuts made are ended as failed (their changes fold into `next`), so nothing
            // stays exported and no change is lost; this run of the VM cannot resume them.
            for (d, cut) in prep.disks.iter().zip(&cuts) {
                if let Err(end) = source.cut_end(&d.cut(ctx, c, prep.running), Some(cut), false).await {
                    tracing::warn!(disk = %d.name, error = %end.message, "ending a cut after the step failed");
                }
            }
            return Err(e);
        }
        // The ledger: a disk cut from a bitmap of the ledger is covered by that `current` and the
        // new `next` together, whichever the cut's end leaves.
        let covering: Vec<(String, Vec<String>)> = prep
            .disks
            .iter()
            .filter(|d| d.bitmaps.mode == TransferMode::Bitmap)
            .map(|d| (d.name.clone(), vec![d.bitmaps.current.clone(), d.bitmaps.next.clone()]))
            .collect();
        record_ledger(ctx, c.p.tenant_id, prep.replica_id, covering).await?;
        let why = consistency.reason.as_deref().unwrap_or_default();
        let (level, kind) = match consistency.kind {
            ConsistencyKind::Application => (LogLevel::Info, "application"),
            // Worth a warning only where a freeze was tried.
            ConsistencyKind::Crash if prep.running && job.consistency == ConsistencyMode::Try => {
                (LogLevel::Warning, "crash")
            }
            ConsistencyKind::Crash => (LogLevel::Info, "crash"),
        };
        ctx.log(level, format!("{kind}-consistent cut: {why}")).await;
        serde_json::to_value(CutsMade { consistency, cuts }).map_err(|e| Error::internal(e.to_string()))
    }
    async fn undo(&self, ctx: &StepCtx, out: &Value) -> Result<()> {
        let c = &self.0;
        let Ok(prep) = output::<Prepared>(ctx, &format!("prepare:{}", c.index)) else { return Ok(()) };
        let made: Option<CutsMade> = serde_json::from_value(out.clone()).ok();
        let (source, _) = prep.agents(ctx, c).await?;
        if prep.running {
            // A freeze a crash left holding: the watchdog would thaw it too, later.
            source.vm_thaw(c.vm.0, &self.freeze_id(ctx)).await.map_err(agent_error)?;
        }
        for (i, d) in prep.disks.iter().enumerate() {
            let cut = made.as_ref().and_then(|m| m.cuts.get(i));
            source.cut_end(&d.cut(ctx, c, prep.running), cut, false).await.map_err(agent_error)?;
        }
        Ok(())
    }
}

struct Transfer(VmCtx);

impl Transfer {
    fn prepared(&self, ctx: &StepCtx) -> Result<Prepared> {
        output(ctx, &format!("prepare:{}", self.0.index))
    }
}

#[async_trait]
impl Step for Transfer {
    fn name(&self) -> String {
        format!("transfer:{}", self.0.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let prep = self.prepared(ctx)?;
        let (source, target) = prep.agents(ctx, &self.0).await?;
        let mut done = Vec::new();
        for d in &prep.disks {
            let t = transfer_disk(ctx, &self.0, &prep, d, &*source, &*target).await?;
            let level = if t.mode == TransferMode::HashCompare { LogLevel::Warning } else { LogLevel::Info };
            ctx.log(
                level,
                format!(
                    "disk {}: {} mode{}, read {} bytes, sent {} bytes",
                    d.name,
                    t.mode,
                    t.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default(),
                    t.bytes_read,
                    t.bytes_written
                ),
            )
            .await;
            done.push(t);
        }
        serde_json::to_value(done).map_err(|e| Error::internal(e.to_string()))
    }
    async fn undo(&self, ctx: &StepCtx, out: &Value) -> Result<()> {
        let Ok(prep) = self.prepared(ctx) else { return Ok(()) };
        let (source, target) = prep.agents(ctx, &self.0).await?;
        let transferred: Vec<Transferred> = serde_json::from_value(out.clone()).unwrap_or_default();
        for d in &prep.disks {
            // End the cut as failed, so the changes it covered stay tracked for the next run.
            let cut = transferred.iter().find(|t| t.disk == d.name).map(|t| &t.cut);
            let spec = d.cut(ctx, &self.0, prep.running);
            source.cut_end(&spec, cut, false).await.map_err(agent_error)?;
            target.transfer_forget(&spec.id).await.map_err(agent_error)?;
            collect_garbage(ctx, &self.0, &prep.replica_id, d, &*target).await?;
        }
        Ok(())
    }
}

/// Removes from a disk's chain everything no published point uses.
async fn collect_garbage(
    ctx: &StepCtx,
    c: &VmCtx,
    replica: &ReplicaId,
    d: &DiskPlan,
    target: &dyn HostAgent,
) -> Result<()> {
    let points = ctx.engine.store().restore_points_of(c.p.tenant_id, *replica).await?;
    let keep: Vec<PointFile> = points
        .iter()
        .flat_map(|p| p.disks.iter())
        .filter(|x| x.disk == d.name)
        .map(|x| PointFile(x.file.clone()))
        .collect();
    target.chain_collect_garbage(&d.chain, &keep).await.map_err(agent_error)?;
    Ok(())
}

/// How often a running transfer is asked how far it got, and how often that goes to the log.
const POLL: Duration = Duration::from_millis(200);
const LOG_EVERY: Duration = Duration::from_secs(10);

/// One disk: cut on the source, a new point on the target, the transfer between them, followed
/// into the session log. Each call is an ensure keyed by the cut's id, so a rerun re-attaches.
async fn transfer_disk(
    ctx: &StepCtx,
    c: &VmCtx,
    prep: &Prepared,
    d: &DiskPlan,
    source: &dyn HostAgent,
    target: &dyn HostAgent,
) -> Result<Transferred> {
    let plan = &d.bitmaps;
    let (mode, mut reason) = (plan.mode, plan.reason.clone());
    // Hash-compare onto a new point over the newest one: that point's manifest says what the
    // target holds, so only the source is read.
    if mode == TransferMode::HashCompare && d.prev_file.is_some() {
        reason = Some(match reason {
            Some(r) => format!("{r}; target hashes from the newest point's manifest"),
            None => "target hashes from the newest point's manifest".into(),
        });
    }
    let spec = d.cut(ctx, c, prep.running);
    let cut = source.cut_begin(&spec).await.map_err(agent_error)?;
    // A cut read through a local socket is for an agent on the same host only.
    let same_agent = std::ptr::addr_eq(source as *const dyn HostAgent, target as *const dyn HostAgent);
    if matches!(cut.source, SourceEndpoint::LocalNbd { .. }) && !same_agent {
        let _ = source.cut_end(&spec, Some(&cut), false).await;
        return Err(Error::conflict(format!(
            "disk {}: the source host's agent does not serve its cuts to other hosts' agents, so the target's agent \
             cannot read them; start it with a data listener (drover serve or drover agent --data-listen)",
            d.name
        )));
    }
    let running = match target.transfer_status(&spec.id).await {
        Ok(s) if s.state != TransferState::Failed => Some(s),
        _ => None,
    };
    // A powered-off disk may be read from its files, by an agent on its host.
    let source_files = (!prep.running && same_agent).then(|| d.disk.clone());
    let transfer_into = |file: PointFile| TransferSpec {
        id: spec.id.clone(),
        source: cut.source.clone(),
        source_files: source_files.clone(),
        mode,
        target: file,
        target_disk: None,
        prev: d.prev_file.clone(),
        size: d.size,
        bandwidth_limit: prep.bandwidth_limit,
    };
    let (transfer, status) = match running {
        // A rerun of this step while the transfer it started still runs or has finished.
        Some(s) => (transfer_into(s.target.clone()), s),
        None => {
            // A file left by an interrupted attempt is not a point: clear it first.
            collect_garbage(ctx, c, &prep.replica_id, d, target).await?;
            let file = target
                .point_create(&PointSpec { chain: d.chain.clone(), size: d.size, prev: d.prev_file.clone() })
                .await
                .map_err(agent_error)?;
            let transfer = transfer_into(file);
            let status = target.transfer_ensure(&transfer).await.map_err(agent_error)?;
            (transfer, status)
        }
    };
    let status = follow(ctx, &d.name, target, &transfer, status).await?;
    let outcome = status.outcome.clone().ok_or_else(|| Error::internal("a finished transfer without an outcome"))?;
    if let Some(p) = &outcome.peer {
        let note = format!(
            "pulled by the target's agent from the source's: {} bytes on the wire for {} bytes of data and {} of zeroes{}{}",
            p.wire_bytes_in,
            p.data_bytes,
            p.zero_bytes,
            if p.reconnects > 0 { format!(", {} reconnections", p.reconnects) } else { String::new() },
            if p.resumed_bytes > 0 {
                format!(", {} bytes resumed from the journal", p.resumed_bytes)
            } else {
                String::new()
            },
        );
        reason = Some(match reason {
            Some(r) => format!("{r}; {note}"),
            None => note,
        });
    }
    if let Some(note) = outcome.note {
        reason = Some(match reason {
            Some(r) => format!("{r}; {note}"),
            None => note,
        });
    }
    Ok(Transferred {
        disk: d.name.clone(),
        file: status.target,
        size: d.size,
        manifest_digest: outcome.manifest_digest,
        mode,
        reason,
        bytes_read: outcome.bytes_read,
        bytes_written: outcome.bytes_written,
        cut,
    })
}

/// Waits for a transfer to end, saying in the session log how far it got.
///
/// The agent that runs it may go away for a while (a restart, a cut link): calls that cannot
/// reach it are retried, with the wait said in the log, for up to `EngineConfig::agent_wait`.
/// An agent that comes back without the transfer (it restarted) is asked for it again: the same
/// id and the same point file, so it goes on from what it had made durable (a peer transfer
/// from its journal) instead of a new point from the start. Failback follows its transfers so too.
pub(crate) async fn follow(
    ctx: &StepCtx,
    disk: &str,
    target: &dyn HostAgent,
    transfer: &TransferSpec,
    mut status: TransferStatus,
) -> Result<TransferStatus> {
    let mut logged = tokio::time::Instant::now();
    let mut unreachable: Option<tokio::time::Instant> = None;
    let mut restarts = 0;
    loop {
        match status.state {
            TransferState::Done => return Ok(status),
            TransferState::Failed => {
                let e = status.error.unwrap_or_else(|| AgentError::internal("the transfer failed"));
                return Err(agent_error(e.context(format!("disk {}", disk))));
            }
            TransferState::Running => {}
        }
        if logged.elapsed() >= LOG_EVERY {
            logged = tokio::time::Instant::now();
            ctx.log(
                LogLevel::Info,
                format!("disk {}: {} of {} bytes done", disk, status.bytes_done, status.bytes_total),
            )
            .await;
        }
        tokio::time::sleep(POLL).await;
        status = loop {
            let asked = match target.transfer_status(&transfer.id).await {
                Err(e) if e.kind == ErrorKind::Gone && restarts < MAX_TRANSFER_RESTARTS => {
                    restarts += 1;
                    ctx.log(
                        LogLevel::Warning,
                        format!(
                            "disk {}: the agent writing the point no longer knows its transfer (it restarted); \
                             asked again into the same point file, going on from what it had made durable",
                            disk
                        ),
                    )
                    .await;
                    target.transfer_ensure(transfer).await
                }
                other => other,
            };
            match asked {
                Ok(s) => {
                    if unreachable.take().is_some() {
                        ctx.log(LogLevel::Info, format!("disk {}: the agent is reachable again", disk)).await;
                    }
                    break s;
                }
                Err(e) if e.kind == ErrorKind::Retry => {
                    let since = match unreachable {
                        Some(t) => t,
                        None => {
                            ctx.log(
                                LogLevel::Warning,
                                format!(
                                    "disk {}: {}; waiting for it (up to {} s)",
                                    disk,
                                    e.message,
                                    ctx.engine.config().agent_wait.as_secs()
                                ),
                            )
                            .await;
                            *unreachable.insert(tokio::time::Instant::now())
                        }
                    };
                    if since.elapsed() >= ctx.engine.config().agent_wait {
                        return Err(agent_error(e.context(format!("disk {}", disk))));
                    }
                    tokio::time::sleep(UNREACHABLE_POLL).await;
                }
                Err(e) => return Err(agent_error(e.context(format!("disk {}", disk)))),
            }
        };
    }
}

/// How often an unreachable agent is tried again while a transfer waits for it.
const UNREACHABLE_POLL: Duration = Duration::from_secs(1);
/// How many times one step asks a restarted agent for its transfer again.
const MAX_TRANSFER_RESTARTS: u32 = 5;

struct Publish(VmCtx);

#[async_trait]
impl Step for Publish {
    fn name(&self) -> String {
        format!("publish:{}", self.0.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let prep: Prepared = output(ctx, &format!("prepare:{}", self.0.index))?;
        let done: Vec<Transferred> = output(ctx, &format!("transfer:{}", self.0.index))?;
        let point = RestorePoint {
            id: RestorePointId::new(),
            replica_id: prep.replica_id,
            sequence: 0,
            session_id: ctx.session.id,
            state: RestorePointState::Published,
            created_at: now(),
            bytes_written: done.iter().map(|t| t.bytes_written).sum(),
            disks: done
                .iter()
                .map(|t| RestorePointDisk {
                    disk: t.disk.clone(),
                    file: t.file.0.clone(),
                    size_bytes: t.size,
                    manifest_digest: t.manifest_digest.clone(),
                    // The cut's `next` records from the point on.
                    tracking_bitmap: prep.disks.iter().find(|d| d.name == t.disk).map(|d| d.bitmaps.next.clone()),
                })
                .collect(),
            verified: false,
            consistency: output::<CutsMade>(ctx, &format!("cut:{}", self.0.index))
                .map(|c| c.consistency)
                .unwrap_or_default(),
        };
        let stored = ctx.engine.store().restore_point_publish(self.0.p.tenant_id, &point).await?;
        let since_point = point.disks.iter().filter_map(|d| Some((d.disk.clone(), vec![d.tracking_bitmap.clone()?])));
        record_ledger(ctx, self.0.p.tenant_id, prep.replica_id, since_point.collect()).await?;
        ctx.log(
            LogLevel::Info,
            format!("restore point {} published ({} bytes)", stored.sequence, stored.bytes_written),
        )
        .await;
        Ok(json!({ "point_id": stored.id, "sequence": stored.sequence }))
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

struct Release(VmCtx);

#[async_trait]
impl Step for Release {
    fn name(&self) -> String {
        format!("release:{}", self.0.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let prep: Prepared = output(ctx, &format!("prepare:{}", self.0.index))?;
        let done: Vec<Transferred> = output(ctx, &format!("transfer:{}", self.0.index))?;
        let (source, target) = prep.agents(ctx, &self.0).await?;
        for d in &prep.disks {
            let spec = d.cut(ctx, &self.0, prep.running);
            let cut = done.iter().find(|t| t.disk == d.name).map(|t| &t.cut);
            source.cut_end(&spec, cut, true).await.map_err(agent_error)?;
            target.transfer_forget(&spec.id).await.map_err(agent_error)?;
        }
        crate::ops::replica_event(
            &ctx.engine,
            self.0.p.tenant_id,
            prep.replica_id,
            ReplicaEvent::ReplicationFinished,
            &[ReplicaState::Processing],
        )
        .await?;
        for d in &prep.disks {
            collect_garbage(ctx, &self.0, &prep.replica_id, d, &*target).await?;
        }
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

struct Retention(VmCtx);

#[async_trait]
impl Step for Retention {
    fn name(&self) -> String {
        format!("retention:{}", self.0.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let c = &self.0;
        let prep: Prepared = output(ctx, &format!("prepare:{}", c.index))?;
        let (_, target) = prep.agents(ctx, c).await?;
        let store = ctx.engine.store();
        let job = store.object_get::<ReplicationJob>(c.p.tenant_id, c.p.job_id.0).await?;
        let mut retired = 0;
        loop {
            let points = store.restore_points_of(c.p.tenant_id, prep.replica_id).await?;
            if points.len() as u64 <= u64::from(job.retention_points) || points.len() < 2 {
                break;
            }
            let (oldest, next) = (&points[0], &points[1]);
            let after = points.get(2);
            store.restore_point_set_state(oldest.id, RestorePointState::Retiring).await?;
            let mut moved = Vec::new();
            for nd in &next.disks {
                let od = oldest.disks.iter().find(|x| x.disk == nd.disk);
                let Some(od) = od else {
                    // A disk added after the oldest point: nothing to merge.
                    moved.push(nd.clone());
                    continue;
                };
                let ad =
                    after.and_then(|a| a.disks.iter().find(|x| x.disk == nd.disk)).map(|x| PointFile(x.file.clone()));
                let chain =
                    ChainRef { datastore: prep.target_datastore.0, replica: prep.replica_id.0, disk: nd.disk.clone() };
                let holder = target
                    .chain_retire_oldest(&chain, &PointFile(od.file.clone()), &PointFile(nd.file.clone()), ad.as_ref())
                    .await
                    .map_err(agent_error)?;
                moved.push(RestorePointDisk { file: holder.0, ..nd.clone() });
            }
            store.restore_point_retire(oldest.id, next.id, &moved).await?;
            retired += 1;
        }
        for d in &prep.disks {
            collect_garbage(ctx, c, &prep.replica_id, d, &*target).await?;
        }
        if retired > 0 {
            ctx.log(LogLevel::Info, format!("retention: merged {retired} oldest point(s)")).await;
        }
        Ok(json!({ "retired": retired }))
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, recording: bool, inconsistent: bool) -> BitmapInfo {
        BitmapInfo { name: name.into(), recording, persistent: true, inconsistent }
    }

    #[test]
    fn the_one_recording_bitmap_is_current_and_next_is_named_after_the_run() {
        let p = plan_bitmaps(&[b("drover-aaaa", true, false)], false, "bbbb", None);
        assert_eq!(
            (p.mode, p.current.as_str(), p.next.as_str(), p.fresh),
            (TransferMode::Bitmap, "drover-aaaa", "drover-bbbb", false)
        );
        assert!(p.remove.is_empty());
        // A disabled leftover is not a candidate, and is left alone.
        let p = plan_bitmaps(&[b("drover-old", false, false), b("drover-aaaa", true, false)], false, "bbbb", None);
        assert_eq!((p.mode, p.current.as_str()), (TransferMode::Bitmap, "drover-aaaa"));
    }

    #[test]
    fn anything_unclear_falls_back_to_hash_compare_with_a_fresh_bitmap() {
        let none = plan_bitmaps(&[], false, "r1", None);
        assert_eq!((none.mode, none.current.as_str(), none.fresh), (TransferMode::HashCompare, "drover-r1-base", true));
        let broken = plan_bitmaps(&[b("drover-x", true, true)], false, "r1", None);
        assert_eq!(broken.mode, TransferMode::HashCompare);
        assert!(broken.reason.unwrap().contains("inconsistent"));
        assert_eq!(broken.remove, vec!["drover-x".to_string()]);
        let two = plan_bitmaps(&[b("drover-x", true, false), b("drover-y", true, false)], false, "r1", None);
        assert_eq!((two.mode, two.remove.len()), (TransferMode::HashCompare, 2));
    }

    #[test]
    fn the_ledger_says_which_bitmap_carries_the_cycle() {
        let ledger = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<String>>();
        // The one the newest point recorded, strays beside it removed.
        let l = ledger(&["drover-a"]);
        let p = plan_bitmaps(&[b("drover-a", true, false), b("drover-s", true, false)], false, "r2", Some(&l));
        assert_eq!(
            (p.mode, p.current.as_str(), p.remove.clone()),
            (TransferMode::Bitmap, "drover-a", vec!["drover-s".into()])
        );
        // A sound bitmap that is not in the ledger (a failed hash-compare made it, so it misses
        // what changed between the point and its making): hash-compare, and why.
        let p = plan_bitmaps(&[b("drover-r1-base", true, false)], false, "r2", Some(&l));
        assert_eq!((p.mode, p.fresh), (TransferMode::HashCompare, true));
        let why = p.reason.unwrap();
        assert!(why.contains("drover-a is gone") && why.contains("drover-r1-base cannot stand for it"), "{why}");
        assert_eq!(p.remove, vec!["drover-r1-base".to_string()]);
        let p = plan_bitmaps(&[b("drover-a", true, true)], false, "r2", Some(&l));
        assert!(p.reason.unwrap().contains("inconsistent"));
        // A failed cut from the ledger folded into its `next`: that one carries the cycle; with
        // both left, the earlier (which covers everything) does.
        let l = ledger(&["drover-a", "drover-r1"]);
        let p = plan_bitmaps(&[b("drover-r1", true, false)], false, "r2", Some(&l));
        assert_eq!((p.mode, p.current.as_str()), (TransferMode::Bitmap, "drover-r1"));
        let p = plan_bitmaps(&[b("drover-a", true, false), b("drover-r1", true, false)], false, "r2", Some(&l));
        assert_eq!(
            (p.mode, p.current.as_str(), p.remove.clone()),
            (TransferMode::Bitmap, "drover-a", vec!["drover-r1".into()])
        );
        // Without a ledger (replicas older than it), the one recording bitmap.
        let p = plan_bitmaps(&[b("drover-r1-base", true, false)], false, "r2", None);
        assert_eq!(p.mode, TransferMode::Bitmap);
    }

    #[test]
    fn a_rerun_keeps_its_own_next_bitmap() {
        // A first attempt of run r1 already added drover-r1 and disabled drover-a.
        let p = plan_bitmaps(
            &[b("drover-a", false, false), b("drover-r1", true, false)],
            false,
            "r1",
            Some(&["drover-a".into()]),
        );
        assert_ne!(p.current, "drover-r1", "the run's own next is never its current");
        assert!(!p.remove.contains(&"drover-r1".to_string()));
    }

    #[test]
    fn a_seed_uses_a_recording_bitmap_or_makes_one() {
        assert_eq!(plan_bitmaps(&[], true, "r", None).mode, TransferMode::Seed);
        assert!(plan_bitmaps(&[], true, "r", None).fresh);
        let p = plan_bitmaps(&[b("drover-z", true, false)], true, "r", None);
        assert_eq!((p.mode, p.current.as_str(), p.fresh), (TransferMode::Seed, "drover-z", false));
    }
}
