//! Replication runs: one session per run of a replication job, one task per VM.
//!
//! Per VM, in this order:
//!
//! | step | does | undo |
//! |---|---|---|
//! | `prepare:<i>` | finds or creates the replica, moves it `Ready → Processing`, decides each disk's bitmaps | back to `Ready` |
//! | `transfer:<i>` | cuts a point in time of each disk (live over QMP, or offline with a storage daemon), copies what changed into a new point file on the target, flushes, writes the manifest | ends the cut as failed (the changes stay tracked) and deletes the unpublished file |
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
//! Invariants. The cut's bitmap is dropped only after the point is published, so a crash at any
//! moment loses no change: an unfinished cut is ended as failed, which merges its changes into
//! the next bitmap. A point file is never visible before its data is flushed and its manifest is
//! written. Bitmaps are found, not derived: the one recording, consistent `drover-*` bitmap of a
//! disk is the cut's `current`, and `next` is named after the run (`drover-<session>`), so a
//! failed or crashed run (whose cut ends by merging `current` into `next`) hands the next run a
//! bitmap that still covers everything since the last point. See [`plan_bitmaps`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use drover_block::chain::{ChainDir, manifest_path};
use drover_block::copy::{CopyStats, copy_extents, hash_compare_sync, manifest_compare_sync};
use drover_block::direct::DirectImage;
use drover_block::hash::Manifest;
use drover_block::nbd::NbdClient;
use drover_hv::tracking::{self, CycleExport};
use drover_hv::{HvError, PowerState};
use drover_qemu::qsd::{Backing, NbdExport, Qcow2Node, StorageDaemon};
use drover_types::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::ops::{disk_dir, disk_path};
use crate::saga::{FailurePolicy, Saga, SagaStep, Step, StepCtx};
use crate::{Engine, Error, Result, unavailable};

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
    /// The source image.
    image: PathBuf,
    chain_dir: PathBuf,
    /// The newest published point's file and manifest, if any.
    prev_file: Option<PathBuf>,
    bitmaps: BitmapPlan,
    current_bitmap: String,
    next_bitmap: String,
}

/// How one disk's changes are found in a run: decided from the bitmaps the disk has.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapPlan {
    /// `seed`, `bitmap` or `hash-compare`.
    pub mode: String,
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

/// Decides a disk's bitmaps. `ours` are the disk's `drover-*` bitmaps as
/// `(name, recording, persistent, inconsistent)`; `seed` says there is no point yet.
pub fn plan_bitmaps(ours: &[(String, bool, bool, bool)], seed: bool, run: &str) -> BitmapPlan {
    let next = format!("drover-{run}");
    let fresh_name = format!("drover-{run}-base");
    // A rerun of the same run finds its own `next` already made by an earlier cut attempt: the
    // cut is then resumed with the same names, which begin_cycle accepts.
    let usable: Vec<&(String, bool, bool, bool)> =
        ours.iter().filter(|(n, rec, pers, inc)| *rec && *pers && !*inc && *n != next).collect();
    let broken: Vec<String> = ours.iter().filter(|(_, _, _, inc)| *inc).map(|(n, ..)| n.clone()).collect();
    let plan = |mode: &str, reason: Option<String>, current: String, fresh: bool, remove: Vec<String>| BitmapPlan {
        mode: mode.into(),
        reason,
        current,
        next: next.clone(),
        fresh,
        remove,
    };
    match (seed, usable.as_slice()) {
        (true, [one]) => plan("seed", None, one.0.clone(), false, broken),
        (true, _) => {
            plan("seed", None, fresh_name, true, ours.iter().map(|(n, ..)| n.clone()).filter(|n| *n != next).collect())
        }
        (false, [one]) => plan("bitmap", None, one.0.clone(), false, broken),
        (false, []) => {
            let why = if broken.is_empty() {
                "no bitmap records this disk's changes".to_string()
            } else {
                format!("bitmap {} is inconsistent (the VM stopped uncleanly)", broken.join(", "))
            };
            plan(
                "hash-compare",
                Some(why),
                fresh_name,
                true,
                ours.iter().map(|(n, ..)| n.clone()).filter(|n| *n != next).collect(),
            )
        }
        (false, many) => plan(
            "hash-compare",
            Some(format!("{} bitmaps record this disk; which covers the last point is unclear", many.len())),
            fresh_name,
            true,
            ours.iter().map(|(n, ..)| n.clone()).filter(|n| *n != next).collect(),
        ),
    }
}

fn ours(states: &[tracking::BitmapState]) -> Vec<(String, bool, bool, bool)> {
    states
        .iter()
        .filter(|b| b.name.starts_with("drover-"))
        .map(|b| (b.name.clone(), b.recording, b.persistent, b.inconsistent))
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Prepared {
    replica_id: ReplicaId,
    running: bool,
    disks: Vec<DiskPlan>,
    /// Where this run's sockets and daemons live.
    work_dir: PathBuf,
}

/// What `transfer` made for one disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Transferred {
    disk: String,
    file: PathBuf,
    size: u64,
    manifest_digest: String,
    mode: String,
    reason: Option<String>,
    bytes_read: u64,
    bytes_written: u64,
    /// The live cut, to end after publishing. `None` for an offline cut.
    live: Option<CycleExport>,
    offline_dir: Option<PathBuf>,
    current_bitmap: String,
    next_bitmap: String,
    image: PathBuf,
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
        let running = matches!(ctx.engine.hv().status(vm.id.0).await, Ok(PowerState::Running | PowerState::Paused));
        let src_dir = disk_dir(&source_ds, vm.id);
        let mut disks = Vec::new();
        for (index, d) in vm.disks.iter().enumerate() {
            let image = disk_path(&src_dir, &d.name);
            let size = drover_qemu::image::info(&image).await.map_err(unavailable)?.virtual_size;
            let prev_file =
                newest.and_then(|p| p.disks.iter().find(|x| x.disk == d.name)).map(|x| PathBuf::from(&x.file));
            let ct = crate::change_tracking(&ctx.engine, "replication")?;
            let states = if running {
                ct.state(vm.id.0, index).await.map_err(unavailable)?
            } else {
                ct.state_offline(&image).await.map_err(unavailable)?
            };
            let bitmaps = plan_bitmaps(&ours(&states), prev_file.is_none(), &run);
            disks.push(DiskPlan {
                index,
                name: d.name.clone(),
                size,
                image,
                chain_dir: Path::new(&target_ds.path).join(replica.id.to_string()).join(&d.name),
                prev_file,
                current_bitmap: bitmaps.current.clone(),
                next_bitmap: bitmaps.next.clone(),
                bitmaps,
            });
        }
        let work_dir = ctx.engine.config().work_dir.join(format!("r{}-{}", &ctx.session.id.to_string()[..8], c.index));
        let out = Prepared { replica_id: replica.id, running, disks, work_dir };
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
        let mut done = Vec::new();
        for d in &prep.disks {
            let t = transfer_disk(ctx, &self.0, &prep, d).await?;
            let level = if t.mode == "hash-compare" { LogLevel::Warning } else { LogLevel::Info };
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
        let transferred: Vec<Transferred> = serde_json::from_value(out.clone()).unwrap_or_default();
        for d in &prep.disks {
            // End the cut as failed, so the changes it covered stay tracked for the next run.
            match transferred.iter().find(|t| t.disk == d.name).and_then(|t| t.live.clone()) {
                Some(live) => {
                    if let Some(ct) = ctx.engine.hv().change_tracking() {
                        ct.cut_end(&live, false).await.map_err(unavailable)?;
                    }
                }
                None if !prep.running => {
                    let dir = prep.work_dir.join(format!("src{}", d.index));
                    let ct = crate::change_tracking(&ctx.engine, "replication")?;
                    match ct.cut_recover_offline(&d.image, &d.current_bitmap, &d.next_bitmap, &dir, false).await {
                        Ok(()) | Err(HvError::BitmapUnusable { .. }) => {}
                        Err(e) => return Err(unavailable(e)),
                    }
                }
                None => {}
            }
            collect_garbage(ctx, &self.0, &prep.replica_id, d).await?;
        }
        let _ = tokio::fs::remove_dir_all(&prep.work_dir).await;
        Ok(())
    }
}

/// Removes from a disk's chain directory everything no published point uses.
async fn collect_garbage(ctx: &StepCtx, c: &VmCtx, replica: &ReplicaId, d: &DiskPlan) -> Result<()> {
    let points = ctx.engine.store().restore_points_of(c.p.tenant_id, *replica).await?;
    let keep: Vec<PathBuf> = points
        .iter()
        .flat_map(|p| p.disks.iter())
        .filter(|x| x.disk == d.name)
        .map(|x| PathBuf::from(&x.file))
        .collect();
    ChainDir::new(&d.chain_dir).collect_garbage(&keep).await.map_err(unavailable)?;
    Ok(())
}

async fn transfer_disk(ctx: &StepCtx, c: &VmCtx, prep: &Prepared, d: &DiskPlan) -> Result<Transferred> {
    // A file left by an interrupted attempt is not a point: clear it first.
    collect_garbage(ctx, c, &prep.replica_id, d).await?;
    let plan = &d.bitmaps;
    let (mode, mut reason) = (plan.mode.as_str(), plan.reason.clone());
    // Hash-compare onto a new point over the newest one: that point's manifest says what the
    // target holds, so only the source is read.
    let against_manifest = mode == "hash-compare" && d.prev_file.is_some();
    if against_manifest {
        reason = Some(match reason {
            Some(r) => format!("{r}; target hashes from the newest point's manifest"),
            None => "target hashes from the newest point's manifest".into(),
        });
    }
    // Set the bitmaps up as planned, then cut the point in time.
    let ct = crate::change_tracking(&ctx.engine, "replication")?;
    let (live, offline) = if prep.running {
        for b in &plan.remove {
            ct.remove(c.vm.0, d.index, b).await.map_err(unavailable)?;
        }
        if plan.fresh {
            ct.enable(c.vm.0, d.index, &plan.current).await.map_err(unavailable)?;
        }
        let dir = prep.work_dir.join("live");
        let x = ct.cut_begin(c.vm.0, d.index, &plan.current, &plan.next, &dir).await.map_err(unavailable)?;
        (Some(x), None)
    } else {
        for b in &plan.remove {
            ct.remove_offline(&d.image, b).await.map_err(unavailable)?;
        }
        if plan.fresh {
            ct.enable_offline(&d.image, &plan.current).await.map_err(unavailable)?;
        }
        let dir = prep.work_dir.join(format!("src{}", d.index));
        let x = ct.cut_begin_offline(&d.image, &plan.current, &plan.next, &dir).await.map_err(unavailable)?;
        (None, Some(x))
    };
    let (endpoint, context) = match (&live, &offline) {
        (Some(x), _) => (x.nbd.clone(), x.meta_context.clone()),
        (_, Some(x)) => (x.nbd.clone(), x.meta_context.clone()),
        _ => return Err(Error::internal("no cut")),
    };
    // A powered-off disk compared against the manifest is read from its files: the cut's daemon
    // holds it (nothing writes it) and reading through NBD would cost the daemon as much CPU as
    // the whole comparison. Anything only QEMU can decode is read through NBD as before.
    let direct = match &offline {
        Some(_) if against_manifest => Some(direct_source(&d.image).await),
        _ => None,
    };
    match &direct {
        Some(Ok(_)) => reason = reason.map(|r| format!("{r}; source read from its files")),
        Some(Err(why)) => reason = reason.map(|r| format!("{r}; source read through NBD: {why}")),
        None => {}
    }
    // The target: a new point file, written through a storage daemon of its own.
    let chain = ChainDir::new(&d.chain_dir);
    let file = chain.new_point_file(d.size, d.prev_file.as_deref()).await.map_err(unavailable)?;
    let daemon = StorageDaemon::start(&prep.work_dir.join(format!("dst{}", d.index))).await.map_err(unavailable)?;
    let result = async {
        daemon.start_nbd_server().await?;
        daemon
            .add_qcow2(&Qcow2Node {
                node_name: "target".into(),
                path: file.clone(),
                backing: Backing::FromImage,
                read_only: false,
            })
            .await?;
        daemon
            .add_nbd_export(&NbdExport {
                id: "target".into(),
                node_name: "target".into(),
                name: "target".into(),
                writable: true,
                bitmaps: vec![],
            })
            .await
    }
    .await;
    let target = match result {
        Ok(t) => t,
        Err(e) => {
            let _ = daemon.shutdown().await;
            return Err(unavailable(e));
        }
    };
    let copy = async {
        let mut src =
            NbdClient::connect_unix(&endpoint.socket, &endpoint.export_name, &[&context, "base:allocation"]).await?;
        let mut dst = NbdClient::connect_unix(&target.socket, &target.export_name, &[]).await?;
        let mut manifest = match &d.prev_file {
            Some(prev) => Manifest::load(&manifest_path(prev)).await?,
            None => Manifest::zeroed(d.size),
        };
        let total_hint = d.size;
        let stats: CopyStats = match mode {
            "seed" => {
                let data = src.data_extents(0, d.size).await?;
                copy_extents(&mut src, &mut dst, &data, &mut manifest, |_, _| {}).await?
            }
            "bitmap" => {
                let dirty = src.dirty_extents(&context, 0, d.size).await?;
                copy_extents(&mut src, &mut dst, &dirty, &mut manifest, |_, _| {}).await?
            }
            // The new point is an empty overlay on the newest one, which its manifest describes:
            // only the source needs reading.
            _ if against_manifest => match direct {
                Some(Ok(mut image)) => manifest_compare_sync(&mut image, &mut dst, &mut manifest, |_, _| {}).await?,
                _ => manifest_compare_sync(&mut src, &mut dst, &mut manifest, |_, _| {}).await?,
            },
            _ => hash_compare_sync(&mut src, &mut dst, &mut manifest, |_, _| {}).await?,
        };
        let _ = total_hint;
        dst.disconnect().await?;
        let _ = src.disconnect().await;
        manifest.save(&manifest_path(&file)).await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((stats, manifest.digest()))
    }
    .await;
    let _ = daemon.shutdown().await;
    // An offline cut's daemon goes now; its bitmaps are ended after publishing (release).
    drop(offline);
    let (stats, digest) = copy.map_err(|e| Error::Unavailable(format!("disk {}: {e}", d.name)))?;
    Ok(Transferred {
        disk: d.name.clone(),
        file,
        size: d.size,
        manifest_digest: digest,
        mode: mode.to_string(),
        reason,
        bytes_read: stats.source_read + stats.target_read,
        bytes_written: stats.written,
        live,
        offline_dir: (!prep.running).then(|| prep.work_dir.join(format!("src{}", d.index))),
        current_bitmap: d.current_bitmap.clone(),
        next_bitmap: d.next_bitmap.clone(),
        image: d.image.clone(),
    })
}

/// The files of `image` to read it from directly, or why they cannot be.
async fn direct_source(image: &Path) -> std::result::Result<DirectImage, String> {
    let map = drover_qemu::image::host_map(image).await.map_err(|e| e.to_string())?;
    DirectImage::open(&map).map_err(|e| e.to_string())
}

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
                    file: t.file.to_string_lossy().into_owned(),
                    size_bytes: t.size,
                    manifest_digest: t.manifest_digest.clone(),
                })
                .collect(),
            verified: false,
        };
        let stored = ctx.engine.store().restore_point_publish(self.0.p.tenant_id, &point).await?;
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
        let ct = crate::change_tracking(&ctx.engine, "replication")?;
        for t in &done {
            match (&t.live, &t.offline_dir) {
                (Some(live), _) => {
                    ct.cut_end(live, true).await.map_err(unavailable)?;
                }
                (None, Some(dir)) => {
                    ct.cut_recover_offline(&t.image, &t.current_bitmap, &t.next_bitmap, dir, true)
                        .await
                        .map_err(unavailable)?;
                }
                (None, None) => {}
            }
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
            collect_garbage(ctx, &self.0, &prep.replica_id, d).await?;
        }
        let _ = tokio::fs::remove_dir_all(&prep.work_dir).await;
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
                let ad = after.and_then(|a| a.disks.iter().find(|x| x.disk == nd.disk)).map(|x| PathBuf::from(&x.file));
                let chain = ChainDir::new(Path::new(&nd.file).parent().unwrap_or(Path::new("/")));
                let holder = chain
                    .retire_oldest(Path::new(&od.file), Path::new(&nd.file), ad.as_deref())
                    .await
                    .map_err(unavailable)?;
                moved.push(RestorePointDisk { file: holder.to_string_lossy().into_owned(), ..nd.clone() });
            }
            store.restore_point_retire(oldest.id, next.id, &moved).await?;
            retired += 1;
        }
        for d in &prep.disks {
            collect_garbage(ctx, c, &prep.replica_id, d).await?;
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

    fn b(name: &str, recording: bool, inconsistent: bool) -> (String, bool, bool, bool) {
        (name.into(), recording, true, inconsistent)
    }

    #[test]
    fn the_one_recording_bitmap_is_current_and_next_is_named_after_the_run() {
        let p = plan_bitmaps(&[b("drover-aaaa", true, false)], false, "bbbb");
        assert_eq!(
            (p.mode.as_str(), p.current.as_str(), p.next.as_str(), p.fresh),
            ("bitmap", "drover-aaaa", "drover-bbbb", false)
        );
        assert!(p.remove.is_empty());
        // A disabled leftover is not a candidate, and is left alone.
        let p = plan_bitmaps(&[b("drover-old", false, false), b("drover-aaaa", true, false)], false, "bbbb");
        assert_eq!((p.mode.as_str(), p.current.as_str()), ("bitmap", "drover-aaaa"));
    }

    #[test]
    fn anything_unclear_falls_back_to_hash_compare_with_a_fresh_bitmap() {
        let none = plan_bitmaps(&[], false, "r1");
        assert_eq!((none.mode.as_str(), none.current.as_str(), none.fresh), ("hash-compare", "drover-r1-base", true));
        let broken = plan_bitmaps(&[b("drover-x", true, true)], false, "r1");
        assert_eq!(broken.mode, "hash-compare");
        assert!(broken.reason.unwrap().contains("inconsistent"));
        assert_eq!(broken.remove, vec!["drover-x".to_string()]);
        let two = plan_bitmaps(&[b("drover-x", true, false), b("drover-y", true, false)], false, "r1");
        assert_eq!((two.mode.as_str(), two.remove.len()), ("hash-compare", 2));
    }

    #[test]
    fn a_rerun_keeps_its_own_next_bitmap() {
        // A first attempt of run r1 already added drover-r1 and disabled drover-a.
        let p = plan_bitmaps(&[b("drover-a", false, false), b("drover-r1", true, false)], false, "r1");
        assert_ne!(p.current, "drover-r1", "the run's own next is never its current");
        assert!(!p.remove.contains(&"drover-r1".to_string()));
    }

    #[test]
    fn a_seed_uses_a_recording_bitmap_or_makes_one() {
        assert_eq!(plan_bitmaps(&[], true, "r").mode, "seed");
        assert!(plan_bitmaps(&[], true, "r").fresh);
        let p = plan_bitmaps(&[b("drover-z", true, false)], true, "r");
        assert_eq!((p.mode.as_str(), p.current.as_str(), p.fresh), ("seed", "drover-z", false));
    }
}
