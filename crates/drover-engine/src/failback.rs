//! Failback to the original VMs, and its commit and undo.
//!
//! Production and a failed-over replica last agreed at the restore point the replica booted
//! from. What must travel back is the union of
//! - the clusters the replica wrote (its failover overlay's own clusters),
//! - the clusters of restore points newer than the one it booted from (production wrote those), and
//! - the blocks production wrote since the last replicated point (its recording dirty bitmap).
//!
//! Only those extents move; when production has no bitmap that can be trusted, that disk is
//! brought level by hash-compare instead, and the session says so.
//!
//! Two phases per VM. A production VM that still runs when its data is about to move (a drill, a
//! partial outage) is shut down first, and powered off when the guest has not stopped after the
//! engine's shutdown timeout, as the product does; the log and the step's output say so:
//! - `sync:<i>` while the replica runs: a fresh bitmap `fb-0` is enabled on the replica first, then
//!   the union above is computed, then a point-in-time cut of the replica (`fb-0` → `fb-1`) is
//!   copied into production. Writes during the sync are in `fb-0`/`fb-1`, so none is missed.
//! - `switch:<i>`: the replica shuts down; what `fb-1` recorded is copied; production is checked
//!   equal to the replica (`qemu-img compare`); production powers on.
//!
//! `FailbackToProduction` runs both phases, `PrepareToFailback` the first (→ PREPARE FOR FAILBACK),
//! `SwitchoverToProduction` the second. A failure halts the plan (production may be half-synced,
//! which a retry repairs; it never starts before it compares equal). Commit (`commit:<i>`) discards
//! the replica's overlay and returns it to `Ready`, so replication resumes production → DR (the
//! failback's writes are in production's bitmap, so the next run carries them). Undo powers
//! production off and boots the replica again from its overlay.
//!
//! Failback to another recovery location (`restore:<i>`): the replica stops, its disks are copied
//! whole into new images on the location's datastore (on one host, checked equal with `qemu-img
//! compare`; between agents, pulled by the location's agent as a seed of an offline cut of the
//! replica's boot overlay, every block checked against its hash), and a new VM
//! `<vm>_restored` with the original's settings (networks mapped, tags when asked) starts there;
//! the original VM is not touched. Undo removes the new VM and runs the replica again.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use drover_agent_api::{
    CutSpec, DiskRef, HostAgent, NewDisk, PointFile, SourceEndpoint, TransferMode, TransferOutcome, TransferSpec,
    VmDisksSpec, VmRunSpec,
};
use drover_block::copy::{copy_extents, hash_compare_sync};
use drover_block::extents::{Extent, ExtentSet};
use drover_block::hash::Manifest;
use drover_block::nbd::NbdClient;
use drover_hv::ChangeTracking;
use drover_hv::tracking;
use drover_qemu::qsd::{Backing, NbdEndpoint, NbdExport, Qcow2Node, StorageDaemon};
use drover_types::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::ops::{disk_dir, disk_path};
use crate::saga::{FailurePolicy, Saga, SagaStep, Step, StepCtx};
use crate::{Engine, Error, Result, unavailable};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailbackParams {
    pub plan_id: PlanId,
    pub tenant_id: TenantId,
    /// Run phase 1 (sync while the replica runs).
    #[serde(default)]
    pub sync: bool,
    /// Run phase 2 (switch over to production).
    #[serde(default)]
    pub switch: bool,
    /// Fail back into new VMs at this recovery location instead of the original VMs.
    #[serde(default)]
    pub location: Option<RecoveryLocationId>,
    /// Give the new VMs the original VMs' tags.
    #[serde(default)]
    pub restore_tags: bool,
}

pub(crate) fn register(engine: &Engine) {
    engine.register_saga(SessionKind::PlanPrepareFailback, Arc::new(failback_saga));
    engine.register_saga(SessionKind::PlanFailback, Arc::new(failback_saga));
    engine.register_saga(SessionKind::PlanCommitFailback, Arc::new(commit_saga));
    engine.register_saga(SessionKind::PlanUndoFailback, Arc::new(undo_saga));
}

fn params(session: &Session) -> Result<FailbackParams> {
    serde_json::from_value(session.params.clone())
        .map_err(|e| Error::internal(format!("session {}: unreadable parameters: {e}", session.id)))
}

fn conclude(p: &FailbackParams, from: PlanState) -> SagaStep {
    let step = crate::plan_state::Conclude { tenant: p.tenant_id, plan: p.plan_id, from };
    SagaStep { task: None, group: None, weight: 1, critical: true, step: Box::new(step) }
}

fn failback_saga(session: &Session, tasks: &[Task]) -> Result<Saga> {
    let p = params(session)?;
    // Undo from HALTED unwinds a halted failback; its last undo lands the plan where the undo
    // of a failback lands, FAILOVER (without it the plan would stay in UNDO FAILBACK for ever).
    let begin = crate::plan_state::Begin {
        tenant: p.tenant_id,
        plan: p.plan_id,
        unwinding: PlanState::UndoFailbackInProgress,
        event: PlanEvent::Completed,
        passed: true,
    };
    let mut steps = vec![begin.step()];
    if let Some(location) = p.location {
        steps.extend(crate::plan_state::per_vm_steps(tasks, 4, |i, vm| {
            Box::new(RestoreToLocation { p: p.clone(), vm, index: i, location })
        })?);
        steps.push(conclude(&p, PlanState::FailbackInProgress));
        return Ok(Saga {
            steps,
            on_failure: FailurePolicy::Halt,
            on_halt: Some(Box::new(crate::plan_state::PlanHalted {
                tenant: p.tenant_id,
                plan: p.plan_id,
                running: vec![PlanState::FailbackInProgress],
            })),
            parallel: Default::default(),
        });
    }
    if p.sync {
        steps.extend(crate::plan_state::per_vm_steps(tasks, 4, |i, vm| {
            Box::new(SyncStep { p: p.clone(), vm, index: i })
        })?);
    }
    if p.switch {
        steps.extend(crate::plan_state::per_vm_steps(tasks, 4, |i, vm| {
            Box::new(Switch { p: p.clone(), vm, index: i })
        })?);
    }
    let from = if p.switch { PlanState::FailbackInProgress } else { PlanState::PrepareForFailbackInProgress };
    steps.push(conclude(&p, from));
    Ok(Saga {
        steps,
        on_failure: FailurePolicy::Halt,
        on_halt: Some(Box::new(crate::plan_state::PlanHalted {
            tenant: p.tenant_id,
            plan: p.plan_id,
            running: vec![PlanState::FailbackInProgress, PlanState::PrepareForFailbackInProgress],
        })),
        parallel: Default::default(),
    })
}

fn commit_saga(session: &Session, tasks: &[Task]) -> Result<Saga> {
    let p = params(session)?;
    let mut steps = crate::plan_state::per_vm_steps(tasks, 4, |i, vm| Box::new(Commit { p: p.clone(), vm, index: i }))?;
    steps.push(conclude(&p, PlanState::CommitFailbackInProgress));
    Ok(Saga::unwinding(steps))
}

fn undo_saga(session: &Session, tasks: &[Task]) -> Result<Saga> {
    let p = params(session)?;
    let mut steps = crate::plan_state::per_vm_steps(tasks, 4, |i, vm| Box::new(UndoVm { p: p.clone(), vm, index: i }))?;
    steps.push(conclude(&p, PlanState::UndoFailbackInProgress));
    Ok(Saga::unwinding(steps))
}

fn boxed_err(e: Box<dyn std::error::Error + Send + Sync>) -> Error {
    Error::Unavailable(e.to_string())
}

/// Everything a failback step needs to know about one VM.
struct Parts {
    vm: Vm,
    replica: Replica,
    /// Per disk of the VM: production image, the replica's overlay, and the booted point's file.
    disks: Vec<(String, PathBuf, PathBuf, PathBuf)>,
    /// Files of points newer than the booted one, per disk name.
    newer: Vec<(String, PathBuf)>,
    /// Production's and the replica's agents when either runs on a `drover agent`: the data
    /// then moves between the two agents (see [`Across`]).
    across: Option<Across>,
}

/// A failback between two agents: production's (which pulls) and the replica's (whose cut is
/// pulled, over its data listener). The sync compares by hash: each side hashes its own disk and
/// only hashes and the blocks that differ cross between them; the replica's writes, production's
/// own since the last point and the points newer than the booted one are all among those blocks,
/// so production's bitmap is not needed (it may not survive a lost site anyway). The switchover
/// sends the replica's bitmap since the sync's cut (see [`switch_across`]).
struct Across {
    prod: Arc<dyn HostAgent>,
    dr: Arc<dyn HostAgent>,
    /// Production's host: the reader of the replica's cuts.
    prod_host: uuid::Uuid,
}

async fn parts(engine: &Engine, tenant: TenantId, vm_id: VmId) -> Result<Parts> {
    let store = engine.store();
    let vm = store.object_get::<Vm>(tenant, vm_id.0).await?;
    let replica = store
        .object_list::<Replica>(tenant)
        .await?
        .into_iter()
        .find(|r| r.source_vm_id == vm_id)
        .ok_or_else(|| Error::conflict(format!("VM {} has no replica", vm.name)))?;
    let point_id = replica
        .failover_point_id
        .ok_or_else(|| Error::conflict(format!("replica {} is not failed over", replica.name)))?;
    let points = store.restore_points_of(tenant, replica.id).await?;
    let booted = points
        .iter()
        .find(|p| p.id == point_id)
        .ok_or_else(|| Error::conflict(format!("restore point {point_id} of {} is gone", replica.name)))?;
    let ds = store.object_get::<Datastore>(tenant, vm.datastore_id.0).await?;
    let dir = disk_dir(&ds, vm.id);
    let target = store.object_get_any_tenant::<Datastore>(replica.target_datastore_id.0).await?;
    let mut local = true;
    for d in [&ds, &target] {
        local &= store.object_get_any_tenant::<drover_types::Host>(d.host_id.0).await?.address == "local";
    }
    let (spec, across) = if local {
        if engine.hv().kind() != "qemu" {
            // The replica's overlay is read and production written by QEMU's own tools and bitmaps.
            return Err(Error::conflict("failback needs the QEMU driver"));
        }
        (crate::failover::runtime_disks(engine, replica.id.0).await?, None)
    } else {
        let prod = engine.datastore_agent(&ds).await?;
        let dr = engine.datastore_agent(&target).await?;
        let overlays = dr.vm_boot_overlays(replica.id.0).await.map_err(crate::ops::vm_err)?;
        (overlays.into_iter().map(|f| PathBuf::from(f.0)).collect(), Some(Across { prod, dr, prod_host: ds.host_id.0 }))
    };
    let mut disks = Vec::new();
    for (i, d) in vm.disks.iter().enumerate() {
        let point_file = booted
            .disks
            .iter()
            .find(|x| x.disk == d.name)
            .map(|x| PathBuf::from(&x.file))
            .ok_or_else(|| Error::conflict(format!("the booted point has no disk {}", d.name)))?;
        let overlay = spec.get(i).cloned().ok_or_else(|| Error::conflict(format!("the replica has no disk {i}")))?;
        disks.push((d.name.clone(), disk_path(&dir, &d.name), overlay, point_file));
    }
    let newer = points
        .iter()
        .filter(|p| p.sequence > booted.sequence)
        .flat_map(|p| p.disks.iter().map(|d| (d.disk.clone(), PathBuf::from(&d.file))))
        .collect();
    Ok(Parts { vm, replica, disks, newer, across })
}

/// The clusters an image holds itself (not through its backing), from `qemu-img map`. `-U`: the
/// image may be open by a running VM; what changes after this read is caught by a bitmap that
/// was enabled before it.
async fn own_clusters(image: &Path) -> Result<ExtentSet> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["map", "-U", "--output=json"])
        .arg(image)
        .output()
        .await
        .map_err(|e| Error::Unavailable(format!("qemu-img map: {e}")))?;
    if !out.status.success() {
        return Err(Error::Unavailable(format!(
            "qemu-img map {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let entries: Vec<Value> =
        serde_json::from_slice(&out.stdout).map_err(|e| Error::internal(format!("qemu-img map output: {e}")))?;
    let mut set = ExtentSet::new();
    for e in entries {
        let (Some(start), Some(length), Some(depth)) = (e["start"].as_u64(), e["length"].as_u64(), e["depth"].as_u64())
        else {
            continue;
        };
        let present = e["present"].as_bool().unwrap_or(false);
        if depth == 0 && present {
            set.insert(Extent::new(start, length));
        }
    }
    Ok(set)
}

/// Whether two images read the same, guest byte for guest byte (`qemu-img compare`; `-U`: the
/// images may be open elsewhere, nobody writing them).
async fn images_equal(a: &Path, b: &Path) -> Result<bool> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["compare", "-q", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .await
        .map_err(|e| Error::Unavailable(format!("qemu-img compare: {e}")))?;
    // 0: equal, 1: they differ; anything else: it could not tell.
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(Error::Unavailable(format!("qemu-img compare: {}", String::from_utf8_lossy(&out.stderr).trim()))),
    }
}

/// Opens an image in a storage daemon and exports it; `writable` or read-only with `bitmaps`.
async fn export(dir: &Path, image: &Path, writable: bool, bitmaps: &[String]) -> Result<(StorageDaemon, NbdEndpoint)> {
    let daemon = StorageDaemon::start(dir).await.map_err(unavailable)?;
    let r = async {
        daemon.start_nbd_server().await?;
        daemon
            .add_qcow2(&Qcow2Node {
                node_name: "n".into(),
                path: image.to_path_buf(),
                backing: Backing::FromImage,
                read_only: !writable,
            })
            .await?;
        daemon
            .add_nbd_export(&NbdExport {
                id: "e".into(),
                node_name: "n".into(),
                name: "n".into(),
                writable,
                bitmaps: bitmaps.to_vec(),
            })
            .await
    }
    .await;
    match r {
        Ok(ep) => Ok((daemon, ep)),
        Err(e) => {
            let _ = daemon.shutdown().await;
            Err(unavailable(e))
        }
    }
}

/// Production's dirty extents since the last point, or `None` when no bitmap can be trusted.
async fn production_changes(
    ct: &dyn ChangeTracking,
    work: &Path,
    image: &Path,
    size: u64,
) -> Result<Option<ExtentSet>> {
    let states = ct.state_offline(image).await.map_err(unavailable)?;
    let usable: Vec<_> = states
        .iter()
        .filter(|b| b.name.starts_with("drover-") && b.recording && b.persistent && !b.inconsistent)
        .collect();
    let [bitmap] = usable.as_slice() else { return Ok(None) };
    let (daemon, ep) = export(&work.join("prod-map"), image, false, std::slice::from_ref(&bitmap.name)).await?;
    let context = tracking::dirty_bitmap_context(&bitmap.name);
    let r = async {
        let mut c = NbdClient::connect_unix(&ep.socket, &ep.export_name, &[&context]).await?;
        let set = c.dirty_extents(&context, 0, size).await?;
        let _ = c.disconnect().await;
        Ok::<_, drover_block::nbd::NbdError>(set)
    }
    .await;
    let _ = daemon.shutdown().await;
    Ok(Some(r.map_err(unavailable)?))
}

/// Copies `extents` (and the dirty extents of each of the source's `dirty_contexts`) of the
/// source into production, or everything that differs by hash-compare (`None`).
async fn copy_into_production(
    work: &Path,
    source: &NbdEndpoint,
    dirty_contexts: &[&str],
    production: &Path,
    extents: Option<&ExtentSet>,
    size: u64,
) -> Result<(u64, u64)> {
    let (daemon, ep) = export(&work.join("prod"), production, true, &[]).await?;
    let r = async {
        let mut src = NbdClient::connect_unix(&source.socket, &source.export_name, dirty_contexts).await?;
        let mut dst = NbdClient::connect_unix(&ep.socket, &ep.export_name, &[]).await?;
        let mut manifest = Manifest::zeroed(size);
        let stats = match extents {
            Some(set) => {
                let mut set = set.clone();
                for context in dirty_contexts {
                    set = set.union(&src.dirty_extents(context, 0, size).await?);
                }
                copy_extents(&mut src, &mut dst, &set, &mut manifest, |_, _| {}).await?
            }
            None => hash_compare_sync(&mut src, &mut dst, &mut manifest, |_, _| {}).await?,
        };
        dst.disconnect().await?;
        let _ = src.disconnect().await;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>((stats.source_read + stats.target_read, stats.written))
    }
    .await;
    let _ = daemon.shutdown().await;
    r.map_err(boxed_err)
}

fn work_dir(ctx: &StepCtx, what: &str, index: usize) -> PathBuf {
    ctx.engine.config().work_dir.join(format!("{what}{}-{index}", &ctx.session.id.to_string()[..8]))
}

struct SyncStep {
    p: FailbackParams,
    vm: VmId,
    index: usize,
}

#[async_trait]
impl Step for SyncStep {
    fn name(&self) -> String {
        format!("sync:{}", self.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let engine = &ctx.engine;
        let parts = parts(engine, self.p.tenant_id, self.vm).await?;
        // A production VM that still runs (a drill, a partial outage) is powered off, as the
        // product does: its writes since the last point are in its bitmap, which a clean stop
        // writes into its image, so they are part of the union below.
        let powered_off = power_off_production(ctx, &parts.vm).await?;
        if let Some(across) = &parts.across {
            let out = sync_across(ctx, across, &parts, self.index).await?;
            let (event, only_if) = (ReplicaEvent::FailbackSynced, &[ReplicaState::Failover]);
            crate::ops::replica_event(engine, self.p.tenant_id, parts.replica.id, event, only_if).await?;
            return Ok(json!({ "disks": out, "production_powered_off": powered_off }));
        }
        let ct = crate::change_tracking(engine, "failback")?;
        let work = work_dir(ctx, "fb", self.index);
        let replica = parts.replica.id.0;
        // 1. Catch what the replica writes from now on, on every disk.
        for i in 0..parts.disks.len() {
            ct.remove(replica, i, "drover-fb1").await.map_err(unavailable)?;
            ct.enable(replica, i, "drover-fb0").await.map_err(unavailable)?;
        }
        // 2. The union of what can differ, per disk.
        let mut plans = Vec::new();
        for (disk, production, overlay, _point) in &parts.disks {
            let size = drover_qemu::image::info(production).await.map_err(unavailable)?.virtual_size;
            let mut union = own_clusters(overlay).await?;
            for (d, file) in &parts.newer {
                if d == disk {
                    union = union.union(&own_clusters(file).await?);
                }
            }
            let prod = production_changes(ct, &work, production, size).await?;
            plans.push((size, union, prod));
        }
        // 3. A point-in-time cut of the replica, every disk at one instant (a libvirt domain's
        // disks share one backup job, begun when the last disk asks), each copied into
        // production; a cut not copied ends as failed.
        let mut cuts = Vec::new();
        for i in 0..parts.disks.len() {
            match ct.cut_begin(replica, i, "drover-fb0", "drover-fb1", &work.join("live")).await {
                Ok(cut) => cuts.push(cut),
                Err(e) => {
                    for cut in &cuts {
                        let _ = ct.cut_end(cut, false).await;
                    }
                    return Err(unavailable(e));
                }
            }
        }
        let mut out = Vec::new();
        let mut failed = None;
        for (i, (cut, (size, union, prod))) in cuts.iter().zip(plans).enumerate() {
            if failed.is_some() {
                let _ = ct.cut_end(cut, false).await;
                continue;
            }
            let (disk, production, ..) = &parts.disks[i];
            let (mode, extents) = match &prod {
                Some(p) => ("extents", Some(union.union(p))),
                None => ("hash-compare", None),
            };
            // What the replica wrote after `drover-fb0` was enabled is in it, frozen by the cut:
            // among it a cluster first written after the overlay's map was read, which the union
            // does not hold.
            let fb0 = [cut.meta_context.as_str()];
            let result = copy_into_production(&work, &cut.nbd, &fb0, production, extents.as_ref(), size).await;
            ct.cut_end(cut, result.is_ok()).await.map_err(unavailable)?;
            match result {
                Ok((read, sent)) => {
                    let why = if prod.is_none() { " (production has no bitmap that can be trusted)" } else { "" };
                    ctx.log(
                        LogLevel::Info,
                        format!(
                            "{}: disk {disk} synced to production by {mode}{why}: read {read} bytes, sent {sent} bytes",
                            parts.vm.name
                        ),
                    )
                    .await;
                    out.push(json!({ "disk": disk, "mode": mode, "bytes_read": read, "bytes_sent": sent }));
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let _ = tokio::fs::remove_dir_all(&work).await;
        let (event, only_if) = (ReplicaEvent::FailbackSynced, &[ReplicaState::Failover]);
        crate::ops::replica_event(engine, self.p.tenant_id, parts.replica.id, event, only_if).await?;
        Ok(json!({ "disks": out, "production_powered_off": powered_off }))
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        // A production VM this step powered off stays off: its disks may now hold part of the
        // replica's data, so only a finished failback may start it again.
        Ok(())
    }
}

/// Powers a running production VM off before data is copied into it: the guest is asked to
/// shut down, and powered off when it has not after the engine's shutdown timeout. Says so in
/// the session log (on the VM's task) and records the VM off. `None` when it was not running.
async fn power_off_production(ctx: &StepCtx, vm: &Vm) -> Result<Option<drover_hv::ShutdownOutcome>> {
    let engine = &ctx.engine;
    let agent = crate::ops::vm_agent(engine, vm).await?;
    if !matches!(agent.vm_status(vm.id.0).await, Ok(drover_hv::PowerState::Running)) {
        return Ok(None);
    }
    let timeout = engine.config().shutdown_timeout;
    ctx.log(
        LogLevel::Info,
        format!(
            "production VM {} is running: shutting it down to fail back into it (powered off after {} s)",
            vm.name,
            timeout.as_secs()
        ),
    )
    .await;
    let outcome = crate::ops::shut_down(engine, agent.as_ref(), vm).await?;
    let (level, how) = match outcome {
        drover_hv::ShutdownOutcome::ForcedOff => {
            (LogLevel::Warning, format!("did not shut down within {} s; powered off", timeout.as_secs()))
        }
        drover_hv::ShutdownOutcome::Graceful => (LogLevel::Info, "shut down".to_string()),
        drover_hv::ShutdownOutcome::AlreadyOff => (LogLevel::Info, "was already off".to_string()),
    };
    ctx.log(level, format!("production VM {} {how}", vm.name)).await;
    Ok(Some(outcome))
}

/// The id of a failback's cut or transfer of one disk (the same on a rerun of the step).
fn across_id(ctx: &StepCtx, what: &str, index: usize, disk: usize) -> String {
    format!("fb{}-{what}-{index}-{disk}", &ctx.session.id.to_string()[..8])
}

/// Pulls a cut of the replica's disk into production's image on production's agent, by
/// hash-compare (see [`Across`]) or only the blocks of the cut's bitmap, following the transfer
/// to its end; the cut ends either way.
async fn pull_into_production(
    ctx: &StepCtx,
    across: &Across,
    parts: &Parts,
    disk: &str,
    cut_spec: CutSpec,
    mode: TransferMode,
    id: String,
) -> Result<Value> {
    let cut = across.dr.cut_begin(&cut_spec).await.map_err(crate::agent_error)?;
    pull_cut(ctx, across, parts, disk, cut_spec, cut, mode, id).await
}

/// [`pull_into_production`] of a cut already made.
#[allow(clippy::too_many_arguments)]
async fn pull_cut(
    ctx: &StepCtx,
    across: &Across,
    parts: &Parts,
    disk: &str,
    cut_spec: CutSpec,
    cut: drover_agent_api::Cut,
    mode: TransferMode,
    id: String,
) -> Result<Value> {
    if matches!(cut.source, SourceEndpoint::LocalNbd { .. }) && !Arc::ptr_eq(&across.prod, &across.dr) {
        let _ = across.dr.cut_end(&cut_spec, Some(&cut), false).await;
        return Err(Error::conflict(format!(
            "the replica's host serves no data listener for other agents (drover agent --data-listen, or drover \
             serve --data-listen): production's agent cannot pull {} from it",
            parts.replica.name
        )));
    }
    let (index, (_, production, _, _)) = parts
        .disks
        .iter()
        .enumerate()
        .find(|(_, (d, ..))| d == disk)
        .ok_or_else(|| Error::internal(format!("no disk {disk}")))?;
    let transfer = TransferSpec {
        id,
        source: cut.source.clone(),
        source_files: None,
        mode,
        target: PointFile(production.to_string_lossy().into_owned()),
        // Production's agent finds the disk itself: an imported libvirt domain's is not in the
        // datastore.
        target_disk: Some(DiskRef {
            datastore: parts.vm.datastore_id.0,
            vm: parts.vm.id.0,
            disk: disk.to_string(),
            index,
        }),
        prev: None,
        size: cut.size,
        bandwidth_limit: None,
    };
    let result = async {
        let status = across.prod.transfer_ensure(&transfer).await.map_err(crate::agent_error)?;
        crate::replication::follow(ctx, disk, across.prod.as_ref(), &transfer, status).await
    }
    .await;
    across.dr.cut_end(&cut_spec, Some(&cut), result.is_ok()).await.map_err(crate::agent_error)?;
    let status = result?;
    let _ = across.prod.transfer_forget(&transfer.id).await;
    let outcome = status.outcome.unwrap_or_else(|| TransferOutcome {
        manifest_digest: String::new(),
        bytes_read: 0,
        bytes_written: 0,
        note: None,
        peer: None,
    });
    let wire = outcome.peer.map(|p| p.wire_bytes_in + p.wire_bytes_out).unwrap_or(0);
    Ok(json!({
        "disk": disk, "mode": mode.as_str(), "bytes_sent": outcome.bytes_written, "wire_bytes": wire,
        "production_manifest": outcome.manifest_digest,
    }))
}

/// The names of the failback bitmaps a live cut of the replica's disk uses, and whether an
/// earlier attempt's cut is there to resume.
async fn replica_cut(ctx: &StepCtx, across: &Across, parts: &Parts, index: usize, i: usize) -> Result<CutSpec> {
    let disk = DiskRef {
        datastore: parts.replica.target_datastore_id.0,
        vm: parts.replica.id.0,
        disk: parts.disks[i].0.clone(),
        index: i,
    };
    let info = across.dr.disk_info(&disk, true).await.map_err(crate::agent_error)?;
    let has = |name: &str| info.bitmaps.iter().find(|b| b.name == name);
    // fb0 frozen with fb1 recording is an earlier attempt's cut: resume it. Anything else is
    // started afresh (a hash-compare needs no bitmap's content, only a point in time).
    let resume = has("drover-fb0").is_some_and(|b| !b.recording && !b.inconsistent)
        && has("drover-fb1").is_some_and(|b| b.recording && !b.inconsistent);
    let remove = if resume {
        Vec::new()
    } else {
        ["drover-fb0", "drover-fb1"].iter().filter(|n| has(n).is_some()).map(|n| n.to_string()).collect()
    };
    Ok(CutSpec {
        id: across_id(ctx, "sync", index, i),
        disk,
        live: true,
        current: "drover-fb0".into(),
        next: "drover-fb1".into(),
        remove,
        fresh: !resume,
        file: None,
        reader: Some(across.prod_host),
    })
}

/// Phase 1 between agents: while the replica runs, a point-in-time cut of each disk is pulled
/// into production by its agent.
async fn sync_across(ctx: &StepCtx, across: &Across, parts: &Parts, index: usize) -> Result<Vec<Value>> {
    // Every disk is cut at one instant (a libvirt domain's disks share one backup job, begun
    // when the last disk asks), then each is pulled; a cut not pulled ends as failed.
    let mut specs = Vec::new();
    for i in 0..parts.disks.len() {
        specs.push(replica_cut(ctx, across, parts, index, i).await?);
    }
    let mut cuts = Vec::new();
    for spec in &specs {
        match across.dr.cut_begin(spec).await {
            Ok(cut) => cuts.push(cut),
            Err(e) => {
                for (spec, cut) in specs.iter().zip(&cuts) {
                    let _ = across.dr.cut_end(spec, Some(cut), false).await;
                }
                return Err(crate::agent_error(e));
            }
        }
    }
    let mut out = Vec::new();
    let mut failed = None;
    for (i, (spec, cut)) in specs.into_iter().zip(cuts).enumerate() {
        let disk = &parts.disks[i].0;
        if failed.is_some() {
            let _ = across.dr.cut_end(&spec, Some(&cut), false).await;
            continue;
        }
        let id = across_id(ctx, "sync", index, i);
        match pull_cut(ctx, across, parts, disk, spec, cut, TransferMode::HashCompare, id).await {
            Ok(r) => {
                ctx.log(
                    LogLevel::Info,
                    format!(
                        "{}: disk {disk} synced to production by hash-compare between the agents (each side hashed \
                         its own disk): sent {} bytes, {} bytes on the wire",
                        parts.vm.name, r["bytes_sent"], r["wire_bytes"]
                    ),
                )
                .await;
                out.push(r);
            }
            Err(e) => failed = Some(e),
        }
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// An offline cut of disk `i` of the stopped replica's boot overlay `overlay`, with fresh
/// bitmaps `drover-fbs` (cut) and `drover-fbt` (recording after it): a point in time to pull
/// whole or by hash-compare, by the agent of host `reader`.
fn overlay_cut(id: String, parts: &Parts, i: usize, overlay: &Path, reader: uuid::Uuid) -> CutSpec {
    CutSpec {
        id,
        disk: DiskRef {
            datastore: parts.replica.target_datastore_id.0,
            vm: parts.replica.id.0,
            disk: parts.disks[i].0.clone(),
            index: i,
        },
        live: false,
        current: "drover-fbs".into(),
        next: "drover-fbt".into(),
        remove: vec!["drover-fbs".into(), "drover-fbt".into()],
        fresh: true,
        file: Some(PointFile(overlay.to_string_lossy().into_owned())),
        reader: Some(reader),
    }
}

/// Phase 2 between agents, with the replica stopped, so the switchover's downtime is what
/// changed, not the disk's size: what the replica wrote since the sync's cut (its bitmap
/// `drover-fb1`, stored in the overlay by the clean stop) is pulled into production, whose
/// manifest from the sync still describes it. When that cannot be trusted (the replica was
/// killed and its bitmap lost, or production was written since the sync: somebody ran it, or an
/// earlier attempt wrote part of it), the stopped overlay is pulled by hash-compare instead,
/// which sends only what differs all the same. Either way every block sent is checked against
/// its hash on arrival, and production then holds, block for block, what the replica holds.
async fn switch_across(ctx: &StepCtx, across: &Across, parts: &Parts, index: usize) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (i, (disk, _, overlay, _)) in parts.disks.iter().enumerate() {
        let cut = |what: &str, current: &str, next: &str, fresh: bool, remove: &[&str]| CutSpec {
            current: current.into(),
            next: next.into(),
            remove: remove.iter().map(|b| b.to_string()).collect(),
            fresh,
            ..overlay_cut(across_id(ctx, what, index, i), parts, i, overlay, across.prod_host)
        };
        let by_bitmap = cut("switchb", "drover-fb1", "drover-fbt", false, &["drover-fbt"]);
        let id = across_id(ctx, "switchb", index, i);
        let r = match pull_into_production(ctx, across, parts, disk, by_bitmap, TransferMode::Bitmap, id).await {
            Ok(r) => r,
            Err(e) => {
                ctx.log(
                    LogLevel::Warning,
                    format!(
                        "{}: disk {disk}: the replica's writes since the sync cannot be sent by bitmap alone ({e}); \
                         comparing the whole disk by hash instead",
                        parts.vm.name
                    ),
                )
                .await;
                let whole = cut("switch", "drover-fbs", "drover-fbt", true, &["drover-fbs", "drover-fbt"]);
                let id = across_id(ctx, "switch", index, i);
                pull_into_production(ctx, across, parts, disk, whole, TransferMode::HashCompare, id).await?
            }
        };
        ctx.log(
            LogLevel::Info,
            format!(
                "{}: disk {disk} switched over by {} between the agents: sent {} bytes, {} bytes on the wire; \
                 production equals the replica (every block sent checked against its hash)",
                parts.vm.name,
                r["mode"].as_str().unwrap_or("?"),
                r["bytes_sent"],
                r["wire_bytes"]
            ),
        )
        .await;
        out.push(r);
    }
    Ok(out)
}

struct Switch {
    p: FailbackParams,
    vm: VmId,
    index: usize,
}

#[async_trait]
impl Step for Switch {
    fn name(&self) -> String {
        format!("switch:{}", self.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let engine = &ctx.engine;
        let parts = parts(engine, self.p.tenant_id, self.vm).await?;
        // Production is powered on only after it compared equal to the replica, and the replica
        // is stopped before that, so a production that runs beside a stopped replica means an
        // earlier run of this step got that far (then drover died): only the records are left to
        // write. A production that runs beside a running replica was started by somebody after
        // the sync: it is powered off, and what it wrote since travels back too.
        let prod_agent = crate::ops::vm_agent(engine, &parts.vm).await?;
        let dr_agent = crate::failover::replica_agent(engine, &parts.replica).await?;
        let running = |agent: Arc<dyn HostAgent>, id: uuid::Uuid| async move {
            matches!(agent.vm_status(id).await, Ok(drover_hv::PowerState::Running))
        };
        let production_runs = running(prod_agent.clone(), parts.vm.id.0).await;
        let replica_runs = running(dr_agent.clone(), parts.replica.id.0).await;
        let restarted = production_runs && replica_runs;
        if restarted {
            power_off_production(ctx, &parts.vm).await?;
        }
        if production_runs && !restarted {
            ctx.log(LogLevel::Info, format!("production VM {} already runs: the switchover was done", parts.vm.name))
                .await;
            mark_switched(engine, self.p.tenant_id, parts.vm.id, parts.replica.id).await?;
            return Ok(json!({ "already_switched": true }));
        }
        let timeout = engine.config().shutdown_timeout;
        // 1. Stop the replica: a clean stop writes its bitmaps into the overlay.
        let outcome = dr_agent.vm_shutdown(parts.replica.id.0, timeout).await.map_err(crate::ops::vm_err)?;
        ctx.log(LogLevel::Info, format!("{} stopped ({outcome:?})", parts.replica.name)).await;
        if let Some(across) = &parts.across {
            let out = switch_across(ctx, across, &parts, self.index).await?;
            crate::ops::power_on(ctx, prod_agent.as_ref(), &crate::ops::run_spec(&parts.vm)).await?;
            mark_switched(engine, self.p.tenant_id, parts.vm.id, parts.replica.id).await?;
            ctx.log(LogLevel::Info, format!("production VM {} powered on", parts.vm.name)).await;
            return Ok(json!({ "disks": out }));
        }
        let ct = crate::change_tracking(engine, "failback")?;
        let work = work_dir(ctx, "sw", self.index);
        let mut out = Vec::new();
        for (disk, production, overlay, _) in &parts.disks {
            let size = drover_qemu::image::info(production).await.map_err(unavailable)?.virtual_size;
            // 2. The last delta: what the replica wrote since the sync's cut.
            let states = ct.state_offline(overlay).await.map_err(unavailable)?;
            let fb1 = states.iter().find(|b| b.name == "drover-fb1" && !b.inconsistent);
            // What production wrote since the sync, when somebody ran it in between.
            let production_wrote = match restarted {
                true => production_changes(ct, &work, production, size).await?,
                false => Some(ExtentSet::new()),
            };
            let (read, sent, mode) = match (fb1, production_wrote) {
                (Some(b), Some(production_wrote)) => {
                    let (daemon, ep) =
                        export(&work.join("replica"), overlay, false, std::slice::from_ref(&b.name)).await?;
                    let context = tracking::dirty_bitmap_context(&b.name);
                    let dirty = async {
                        let mut c = NbdClient::connect_unix(&ep.socket, &ep.export_name, &[&context]).await?;
                        let set = c.dirty_extents(&context, 0, size).await?;
                        let _ = c.disconnect().await;
                        Ok::<_, drover_block::nbd::NbdError>(set)
                    }
                    .await
                    .map_err(unavailable);
                    let r = match dirty {
                        Ok(set) => {
                            let set = set.union(&production_wrote);
                            copy_into_production(&work, &ep, &[], production, Some(&set), size).await
                        }
                        Err(e) => Err(e),
                    };
                    let _ = daemon.shutdown().await;
                    let (read, sent) = r?;
                    (read, sent, "extents")
                }
                _ => {
                    let (daemon, ep) = export(&work.join("replica"), overlay, false, &[]).await?;
                    let r = copy_into_production(&work, &ep, &[], production, None, size).await;
                    let _ = daemon.shutdown().await;
                    let (read, sent) = r?;
                    (read, sent, "hash-compare")
                }
            };
            // 3. Production must now read exactly as the replica.
            if !images_equal(production, overlay).await? {
                return Err(Error::Unavailable(format!(
                    "disk {disk}: production does not equal the replica after the switchover copy"
                )));
            }
            ctx.log(LogLevel::Info, format!("{}: disk {disk} switched over by {mode}: read {read} bytes, sent {sent} bytes; production equals the replica", parts.vm.name))
                .await;
            out.push(json!({ "disk": disk, "mode": mode, "bytes_read": read, "bytes_sent": sent, "verified": true }));
        }
        let _ = tokio::fs::remove_dir_all(&work).await;
        // 4. Production runs again.
        let agent = crate::ops::vm_agent(engine, &parts.vm).await?;
        crate::ops::power_on(ctx, agent.as_ref(), &crate::ops::run_spec(&parts.vm)).await?;
        mark_switched(engine, self.p.tenant_id, parts.vm.id, parts.replica.id).await?;
        ctx.log(LogLevel::Info, format!("production VM {} powered on", parts.vm.name)).await;
        Ok(json!({ "disks": out }))
    }
    async fn undo(&self, ctx: &StepCtx, _: &Value) -> Result<()> {
        undo_vm(ctx, &self.p, self.vm).await
    }
}

/// Records a finished switchover: the VM that now runs production (the original, or the new VM
/// at another location) Running, the replica `Failback`. Idempotent.
async fn mark_switched(engine: &Engine, tenant: TenantId, running: VmId, replica: ReplicaId) -> Result<()> {
    crate::ops::set_vm_power(engine, tenant, running, VmPowerState::Running).await?;
    set_switched_to(engine, tenant, replica, Some(running)).await?;
    let only_if = &[ReplicaState::Failover, ReplicaState::ReadyToSwitch];
    crate::ops::replica_event(engine, tenant, replica, ReplicaEvent::SwitchedOver, only_if).await
}

/// Records which VM production runs on after a switchover (`None`: back on the replica).
async fn set_switched_to(engine: &Engine, tenant: TenantId, replica: ReplicaId, vm: Option<VmId>) -> Result<()> {
    engine
        .store()
        .object_modify::<Replica, _, _>(tenant, replica.0, |r| {
            r.switched_to_vm_id = vm;
            Ok(())
        })
        .await
        .map(|_| ())
}

/// After a committed failback to another location, the new VM takes the original's place: in
/// the replica's job, in the plan, and as the replica's source, so replication goes on from it
/// into the same restore points (its first run compares it against the newest point's manifest).
/// Idempotent: what already names the new VM is left as it is.
async fn adopt_restored_vm(ctx: &StepCtx, p: &FailbackParams, replica: &Replica, old: VmId, new: VmId) -> Result<()> {
    let store = ctx.engine.store();
    let swap = |ids: &mut Vec<VmId>| {
        let had_new = ids.contains(&new);
        ids.retain(|v| *v != old || !had_new);
        for v in ids.iter_mut().filter(|v| **v == old) {
            *v = new;
        }
    };
    store
        .object_modify::<ReplicationJob, _, _>(p.tenant_id, replica.job_id.0, |j| {
            swap(&mut j.vm_ids);
            j.updated_at = now();
            Ok(())
        })
        .await?;
    store
        .object_modify::<Plan, _, _>(p.tenant_id, p.plan_id.0, |plan| {
            for pvm in plan.groups.iter_mut().flat_map(|g| g.vms.iter_mut()).filter(|v| v.vm_id == old) {
                pvm.vm_id = new;
            }
            plan.updated_at = now();
            Ok(())
        })
        .await?;
    store
        .object_modify::<Replica, _, _>(p.tenant_id, replica.id.0, |r| {
            r.source_vm_id = new;
            r.replaced_source_vm_id = Some(old);
            Ok(())
        })
        .await?;
    let name = store.object_get::<Vm>(p.tenant_id, new.0).await.map(|v| v.name).unwrap_or_else(|_| new.to_string());
    ctx.log(
        LogLevel::Info,
        format!(
            "{name} takes the original VM's place in the replication job and the plan; replication goes on from it"
        ),
    )
    .await;
    Ok(())
}

/// Production off, the replica running again from its overlay, replica `Failover`.
async fn undo_vm(ctx: &StepCtx, p: &FailbackParams, vm_id: VmId) -> Result<()> {
    let engine = &ctx.engine;
    let parts = parts(engine, p.tenant_id, vm_id).await?;
    crate::ops::vm_agent(engine, &parts.vm).await?.vm_power_off(parts.vm.id.0).await.map_err(crate::ops::vm_err)?;
    crate::ops::set_vm_power(engine, p.tenant_id, parts.vm.id, VmPowerState::Off).await?;
    let spec = VmRunSpec {
        id: parts.replica.id.0,
        name: parts.replica.name.clone(),
        vcpus: parts.vm.vcpus,
        memory_mib: parts.vm.memory_mib,
        disks: parts
            .disks
            .iter()
            .map(|(_, _, overlay, _)| drover_agent_api::VmDisk::Overlay {
                file: PointFile(overlay.to_string_lossy().into_owned()),
            })
            .collect(),
        nics: Vec::new(),
        boot: crate::ops::vm_boot(&parts.vm),
        hardware: crate::ops::vm_hardware(&parts.vm),
    };
    let agent = crate::failover::replica_agent(engine, &parts.replica).await?;
    let spec = VmRunSpec {
        nics: crate::networks::failover_nics(ctx, agent.as_ref(), &parts.replica, &parts.vm).await?,
        ..spec
    };
    crate::ops::power_on(ctx, agent.as_ref(), &spec).await?;
    set_switched_to(engine, p.tenant_id, parts.replica.id, None).await?;
    let only_if = &[ReplicaState::Failback, ReplicaState::ReadyToSwitch];
    crate::ops::replica_event(engine, p.tenant_id, parts.replica.id, ReplicaEvent::FailbackUndone, only_if).await?;
    ctx.log(LogLevel::Info, format!("production {} off; {} runs again", parts.vm.name, parts.replica.name)).await;
    Ok(())
}

struct UndoVm {
    p: FailbackParams,
    vm: VmId,
    index: usize,
}

#[async_trait]
impl Step for UndoVm {
    fn name(&self) -> String {
        format!("undo:{}", self.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        remove_restored(ctx, &self.p, self.vm).await?;
        undo_vm(ctx, &self.p, self.vm).await?;
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

struct Commit {
    p: FailbackParams,
    vm: VmId,
    index: usize,
}

#[async_trait]
impl Step for Commit {
    fn name(&self) -> String {
        format!("commit:{}", self.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let engine = &ctx.engine;
        let store = engine.store();
        let replica = store
            .object_list::<Replica>(self.p.tenant_id)
            .await?
            .into_iter()
            .find(|r| r.source_vm_id == self.vm || r.replaced_source_vm_id == Some(self.vm))
            .ok_or_else(|| Error::conflict("no replica"))?;
        // The replica's runtime and overlays go; the restore points stay.
        crate::failover::discard_vm(engine, &replica, replica.id.0).await?;
        if let Some(new) = replica.switched_to_vm_id.filter(|v| *v != replica.source_vm_id) {
            adopt_restored_vm(ctx, &self.p, &replica, self.vm, new).await?;
        }
        store
            .object_modify::<Replica, _, _>(self.p.tenant_id, replica.id.0, |r| {
                if r.state == ReplicaState::Failback {
                    r.state = r.state.apply(ReplicaEvent::FailbackCommitted)?;
                }
                r.failover_point_id = None;
                r.fence_source = false;
                r.switched_to_vm_id = None;
                r.updated_at = now();
                Ok(())
            })
            .await?;
        ctx.log(LogLevel::Info, format!("{}: failback committed; replication resumes from production", replica.name))
            .await;
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> Result<()> {
        Ok(())
    }
}

/// The name of the VM a failback to another location makes from `vm`.
pub(crate) fn restored_name(vm: &str) -> String {
    format!("{vm}_restored")
}

/// Failback into a new VM at another recovery location: the replica stops, its disks (its
/// overlay over its restore point) are copied whole into new images on the location's datastore
/// and checked equal, and a new VM with the original's settings (networks mapped, tags when asked)
/// starts there. The original VM is not touched. Undo removes the new VM and runs the replica again.
struct RestoreToLocation {
    p: FailbackParams,
    vm: VmId,
    index: usize,
    location: RecoveryLocationId,
}

#[async_trait]
impl Step for RestoreToLocation {
    fn name(&self) -> String {
        format!("restore:{}", self.index)
    }
    async fn run(&self, ctx: &StepCtx) -> Result<Value> {
        let engine = &ctx.engine;
        let store = engine.store();
        let parts = parts(engine, self.p.tenant_id, self.vm).await?;
        let loc = store.object_get::<RecoveryLocation>(self.p.tenant_id, self.location.0).await?;
        let (Some(host), Some(ds_id)) = (loc.host_id, loc.datastore_id) else {
            return Err(Error::conflict(format!("recovery location {:?} has no host or datastore", loc.name)));
        };
        let ds = store.object_get::<Datastore>(self.p.tenant_id, ds_id.0).await?;
        let location_host = store.object_get_any_tenant::<drover_types::Host>(ds.host_id.0).await?;
        let through_agents = parts.across.is_some() || location_host.address != "local";
        // The new VM: found again on a rerun, by its name.
        let name = restored_name(&parts.vm.name);
        let existing = store.object_list::<Vm>(self.p.tenant_id).await?.into_iter().find(|v| v.name == name);
        let new_vm = match existing {
            Some(v) => v,
            None => {
                let t = now();
                let id = VmId::new();
                let map = |net: &str| {
                    loc.network_mappings
                        .iter()
                        .find(|m| m.from == net)
                        .map(|m| m.to.clone())
                        .unwrap_or_else(|| net.to_string())
                };
                let v = Vm {
                    id,
                    tenant_id: self.p.tenant_id,
                    name: name.clone(),
                    host_id: host,
                    datastore_id: ds.id,
                    vcpus: parts.vm.vcpus,
                    memory_mib: parts.vm.memory_mib,
                    disks: parts.vm.disks.iter().map(|d| VmDisk { import_from: None, ..d.clone() }).collect(),
                    nics: parts
                        .vm
                        .nics
                        .iter()
                        .enumerate()
                        .map(|(i, n)| VmNic { network: map(&n.network), mac: mac_for(id, i) })
                        .collect(),
                    tags: if self.p.restore_tags { parts.vm.tags.clone() } else { Vec::new() },
                    boot: parts.vm.boot.clone(),
                    power_state: VmPowerState::Off,
                    provisioned: false,
                    libvirt_domain: None,
                    guest_addresses: Vec::new(),
                    created_at: t,
                    updated_at: t,
                    hardware: parts.vm.hardware.clone(),
                };
                store.object_insert(&v).await?;
                v
            }
        };
        let location_agent = crate::ops::vm_agent(engine, &new_vm).await?;
        if matches!(location_agent.vm_status(new_vm.id.0).await, Ok(drover_hv::PowerState::Running)) {
            // An earlier run of this step got to the end (it starts the VM last).
            return Ok(json!({ "vm_id": new_vm.id }));
        }
        // A stopped replica is exact: nothing changes under the copy.
        let dr_agent = crate::failover::replica_agent(engine, &parts.replica).await?;
        dr_agent.vm_shutdown(parts.replica.id.0, engine.config().shutdown_timeout).await.map_err(crate::ops::vm_err)?;
        let sent_total = if through_agents {
            restore_across(ctx, &parts, &new_vm, dr_agent, location_agent.clone(), self.index).await?
        } else {
            restore_local(ctx, &parts, &ds, &new_vm, &loc.name, self.index).await?
        };
        store
            .object_modify::<Vm, _, _>(self.p.tenant_id, new_vm.id.0, |v| {
                v.provisioned = true;
                Ok(())
            })
            .await?;
        crate::ops::power_on(ctx, location_agent.as_ref(), &crate::ops::run_spec(&new_vm)).await?;
        mark_switched(engine, self.p.tenant_id, new_vm.id, parts.replica.id).await?;
        ctx.log(
            LogLevel::Info,
            format!(
                "{}: restored to {:?} as new VM {name} ({sent_total} bytes copied, equal to the replica); it runs",
                parts.vm.name, loc.name
            ),
        )
        .await;
        Ok(json!({ "vm_id": new_vm.id, "bytes_sent": sent_total }))
    }
    async fn undo(&self, ctx: &StepCtx, _: &Value) -> Result<()> {
        remove_restored(ctx, &self.p, self.vm).await?;
        undo_vm(ctx, &self.p, self.vm).await
    }
}

/// The stopped replica's disks copied into the new VM's on this host, checked equal with
/// `qemu-img compare`; the bytes copied.
async fn restore_local(
    ctx: &StepCtx,
    parts: &Parts,
    ds: &Datastore,
    new_vm: &Vm,
    location: &str,
    index: usize,
) -> Result<u64> {
    let dir = disk_dir(ds, new_vm.id);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| Error::Unavailable(format!("creating {}: {e}", dir.display())))?;
    let work = work_dir(ctx, "rl", index);
    let mut sent_total = 0;
    for (disk, _production, overlay, _) in &parts.disks {
        let size = drover_qemu::image::info(overlay).await.map_err(unavailable)?.virtual_size;
        let target = disk_path(&dir, disk);
        drover_qemu::image::create_qcow2(&target, size).await.map_err(unavailable)?;
        let (daemon, ep) = export(&work.join("replica"), overlay, false, &[]).await?;
        let copied = async {
            let mut src = NbdClient::connect_unix(&ep.socket, &ep.export_name, &["base:allocation"]).await?;
            let data = src.data_extents(0, size).await?;
            let _ = src.disconnect().await;
            Ok::<_, drover_block::nbd::NbdError>(data)
        }
        .await
        .map_err(unavailable);
        let r = match copied {
            Ok(data) => copy_into_production(&work, &ep, &[], &target, Some(&data), size).await,
            Err(e) => Err(e),
        };
        let _ = daemon.shutdown().await;
        let (_, sent) = r?;
        sent_total += sent;
        if !images_equal(&target, overlay).await? {
            return Err(Error::Unavailable(format!(
                "disk {disk}: the copy at {location:?} does not equal the replica"
            )));
        }
    }
    let _ = tokio::fs::remove_dir_all(&work).await;
    Ok(sent_total)
}

/// The stopped replica's disks pulled by the location's agent from the replica's (each an
/// offline cut of the replica's boot overlay, seeded into a new empty disk of the new VM, every
/// block checked against its hash on arrival); the bytes sent.
async fn restore_across(
    ctx: &StepCtx,
    parts: &Parts,
    new_vm: &Vm,
    dr: Arc<dyn HostAgent>,
    location: Arc<dyn HostAgent>,
    index: usize,
) -> Result<u64> {
    // Made afresh on every run: a disk an earlier run half wrote is not trusted.
    let (datastore, vm) = (new_vm.datastore_id.0, new_vm.id.0);
    location.vm_disks_remove(datastore, vm).await.map_err(crate::ops::vm_err)?;
    let disks = new_vm.disks.iter().map(|d| NewDisk { name: d.name.clone(), size: d.size_bytes, import_from: None });
    let spec = VmDisksSpec { datastore, vm, disks: disks.collect() };
    location.vm_disks_ensure(&spec).await.map_err(crate::ops::vm_err)?;
    let ds = ctx.engine.store().object_get_any_tenant::<Datastore>(datastore).await?;
    let dir = disk_dir(&ds, new_vm.id);
    let mut sent_total = 0;
    for (i, (disk, _, overlay, _)) in parts.disks.iter().enumerate() {
        let cut_spec = overlay_cut(across_id(ctx, "restore", index, i), parts, i, overlay, ds.host_id.0);
        let cut = dr.cut_begin(&cut_spec).await.map_err(crate::agent_error)?;
        if matches!(cut.source, SourceEndpoint::LocalNbd { .. }) && !Arc::ptr_eq(&dr, &location) {
            let _ = dr.cut_end(&cut_spec, Some(&cut), false).await;
            return Err(Error::conflict(format!(
                "the replica's host serves no data listener for other agents (drover agent --data-listen, or drover \
                 serve --data-listen): the location's agent cannot pull {} from it",
                parts.replica.name
            )));
        }
        let transfer = TransferSpec {
            id: across_id(ctx, "restore", index, i),
            source: cut.source.clone(),
            source_files: None,
            mode: TransferMode::Seed,
            target: PointFile(disk_path(&dir, disk).to_string_lossy().into_owned()),
            target_disk: None,
            prev: None,
            size: cut.size,
            bandwidth_limit: None,
        };
        let result = async {
            let status = location.transfer_ensure(&transfer).await.map_err(crate::agent_error)?;
            crate::replication::follow(ctx, disk, location.as_ref(), &transfer, status).await
        }
        .await;
        dr.cut_end(&cut_spec, Some(&cut), result.is_ok()).await.map_err(crate::agent_error)?;
        let status = result?;
        let _ = location.transfer_forget(&transfer.id).await;
        let sent = status.outcome.map_or(0, |o| o.bytes_written);
        ctx.log(
            LogLevel::Info,
            format!(
                "{}: disk {disk} copied to the new VM by its host's agent from the replica's ({sent} bytes, every \
                 block checked against its hash on arrival)",
                parts.vm.name
            ),
        )
        .await;
        sent_total += sent;
    }
    Ok(sent_total)
}

/// Removes the VM a failback to another location made (powered off, its disks deleted).
async fn remove_restored(ctx: &StepCtx, p: &FailbackParams, vm: VmId) -> Result<()> {
    let engine = &ctx.engine;
    let store = engine.store();
    let original = store.object_get::<Vm>(p.tenant_id, vm.0).await?;
    let name = restored_name(&original.name);
    let Some(new_vm) = store.object_list::<Vm>(p.tenant_id).await?.into_iter().find(|v| v.name == name) else {
        return Ok(());
    };
    let agent = crate::ops::vm_agent(engine, &new_vm).await?;
    agent.vm_forget(new_vm.id.0, false).await.map_err(crate::ops::vm_err)?;
    agent.vm_disks_remove(new_vm.datastore_id.0, new_vm.id.0).await.map_err(crate::ops::vm_err)?;
    match store.object_delete::<Vm>(p.tenant_id, new_vm.id.0).await {
        Ok(()) | Err(Error::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    ctx.log(LogLevel::Info, format!("removed {name}")).await;
    Ok(())
}
