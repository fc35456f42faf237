//! Change tracking for one disk: persistent QEMU dirty bitmaps and point-in-time NBD exports.
//!
//! A disk that is replicated carries one *recording* persistent dirty bitmap. A replication
//! cycle freezes it (`current`), starts a new one (`next`), exports a point-in-time view of the
//! disk over NBD with `current` as the `qemu:dirty-bitmap:<current>` meta context, and after the
//! data path has read the dirty extents either drops `current` (the replica has its changes) or
//! folds it back into `next` (it does not, so the next cycle sends them again).
//!
//! # Running VM: through the VM's own QMP
//! ```text
//!   enable_tracking      block-dirty-bitmap-add {node: disk<i>, name, persistent}   once
//!   begin_cycle          qemu-img create <export_dir>/disk<i>-fleece.qcow2 (empty, disk size)
//!                        blockdev-add drover-fleece<i>: qcow2 on that file, backing: disk<i>
//!                        transaction [ block-dirty-bitmap-disable current,
//!                                      block-dirty-bitmap-add next (persistent),
//!                                      blockdev-backup disk<i> -> drover-fleece<i>, sync: none ]
//!                        nbd-server-start <export_dir>/nbd.sock
//!                        block-export-add drover-export<i>: fleece, "disk<i>", read-only, [current]
//!   ... the data path reads the extents of current through the export ...
//!   end_cycle            block-export-del (hard) and wait until it is gone
//!                        nbd-server-stop (when no other export of this VM remains)
//!                        block-job-cancel and wait until the job is gone
//!                        blockdev-del drover-fleece<i>, delete the fleece file
//!                        success: block-dirty-bitmap-remove current
//!                        failure: transaction [merge current into next, remove current]
//! ```
//! Why the point in time holds: the three actions of the transaction take effect together while
//! QEMU has drained the disk's I/O, so every guest write is either before the cut (recorded in
//! `current`, visible in the view) or after it (recorded in `next`; the backup job with
//! `sync: none` copies the old cluster into the fleece before the write lands, and the fleece,
//! backed by the live disk, keeps showing the old data). An *enabled* bitmap cannot be exported
//! read-only, which is one more reason `current` is disabled in the cut.
//!
//! Why end_cycle runs in this order: the export pins the fleece node and makes `current` busy
//! (neither `blockdev-del` nor any bitmap operation succeeds before it is gone); the job holds
//! the fleece as its target, so it goes before the node; the file goes after the node is closed.
//! The bitmap step is last and is the commit point: everything before it is clean-up a retry can
//! redo.
//!
//! # Crash safety
//! The bitmaps are the only durable state; the fleece node, the job, the export and the NBD
//! server live in the QEMU process (plus a temporary file). A cycle's changes leave `current`
//! only in end_cycle, either to the replica (success) or into `next` in one transaction
//! (failure); until then `current` is kept, so a crash of drover anywhere loses nothing:
//! - every step of [`begin_cycle`] and [`end_cycle`] looks at the state first (query-block-jobs,
//!   query-block-exports, query-named-block-nodes) and skips what is done, so both can be rerun;
//! - [`begin_cycle`] finding the backup job alive re-exports the existing view. Finding `next`
//!   without the job means an earlier cut whose view is gone (VM restarted, or a begin that
//!   failed after the transaction): it folds `next` back into `current` in one transaction
//!   (enable current, merge next into it, remove next) and cuts again, with a new empty fleece
//!   (an old fleece holds clusters of an older point in time);
//! - [`end_cycle`] on a VM that stopped meanwhile finishes the bitmap step on the image with
//!   `qemu-img`: QEMU wrote both bitmaps into the qcow2 when it closed it.
//!
//! QEMU writes persistent bitmaps into the image only when it closes it cleanly (shutdown,
//! power-off through QMP `quit`). When QEMU dies instead (SIGKILL, host crash), a bitmap created
//! since the image was opened is simply **missing** afterwards, and one loaded at open is left
//! **in use**, which QEMU reports as `inconsistent` and refuses to export or merge. Both cases
//! surface as [`HvError::BitmapUnusable`] from begin/end, and as a missing or
//! [`BitmapState::inconsistent`] entry from [`bitmap_state`]: the replication layer must then
//! fall back to hash-compare for the disk, remove the broken bitmap and enable a fresh one.
//!
//! # Powered-off VM: through `qemu-storage-daemon`
//! Nothing writes to an image nobody has open, so no fleece is needed: the bitmaps are switched
//! with `qemu-img bitmap` (add `next`, then disable `current`: a crash between leaves two
//! recording bitmaps, which is harmless) and the image is exported **read-only** by a
//! [`StorageDaemon`]. A read-only open does not mark bitmaps in use, so a daemon killed
//! mid-cycle leaves the image exactly as it was. The daemon holds the image lock for the whole
//! cycle: the VM cannot be powered on until [`end_cycle_offline`] (or recovery) has run.
//!
//! # Names
//! One cycle per disk at a time. Per disk `<i>`: fleece node `drover-fleece<i>`, backup job
//! `drover-backup<i>`, export id `drover-export<i>`, NBD export name `disk<i>`. QEMU runs one NBD
//! server per process, so all disks of a VM share `<export_dir>/nbd.sock`: pass the same
//! `export_dir` for every disk of a VM. Offline, `export_dir` is the daemon's runtime directory:
//! one per image.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::process::Command;
use tokio::time::Instant;
use uuid::Uuid;

use crate::qemu::QemuDriver;
use crate::{HvError, HvResult};
use drover_qemu::image;
use drover_qemu::qmp::QmpClient;
use drover_qemu::qsd::{self, Backing, NbdEndpoint, NbdExport, Qcow2Node, StorageDaemon};

/// Bound on one QMP command (the cut itself takes a few milliseconds).
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for a cancelled job to disappear (it takes a few milliseconds).
const JOB_GONE_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(5);
const QEMU_IMG: &str = "qemu-img";
/// How long a `qemu-img` lock conflict is retried (see [`qemu_img`]).
const LOCK_RETRY: Duration = Duration::from_secs(1);
const LOCK_POLL: Duration = Duration::from_millis(50);
/// Node, export id and export name of the image a [`StorageDaemon`] exports offline.
const OFFLINE_NODE: &str = "disk";
const OFFLINE_EXPORT_ID: &str = "drover-export";

/// The NBD meta context under which QEMU serves a dirty bitmap.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// One dirty bitmap of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapState {
    pub name: String,
    /// Stored in the qcow2 (written when QEMU closes the image cleanly).
    pub persistent: bool,
    /// Enabled: guest writes are being recorded.
    pub recording: bool,
    /// Left "in use" by a QEMU that did not close the image cleanly: its content cannot be
    /// trusted, QEMU refuses to use it, and the disk must fall back to hash-compare.
    pub inconsistent: bool,
    /// In use by an operation (e.g. exported over NBD).
    pub busy: bool,
    /// Bytes covered by one bit (64 KiB by default: a 4 KiB write marks its whole granule).
    pub granularity: u64,
    /// Dirty bytes, when QEMU has the image open (`qemu-img info` does not report it).
    pub dirty_bytes: Option<u64>,
}

impl BitmapState {
    /// Persistent, recording, consistent and not in use: it can carry a cycle.
    pub fn is_sound(&self) -> bool {
        self.persistent && self.recording && !self.inconsistent && !self.busy
    }
}

/// A point-in-time view of a running VM's disk, exported over NBD. Plain data: the engine can
/// persist it in its step log and call [`end_cycle`] with it after a restart of drover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CycleExport {
    pub vm: Uuid,
    pub disk_index: usize,
    /// Frozen at the cut; its extents are what changed since the previous cycle.
    pub current_bitmap: String,
    /// Recording since the cut.
    pub next_bitmap: String,
    pub nbd: NbdEndpoint,
    /// `qemu:dirty-bitmap:<current>`.
    pub meta_context: String,
    /// The disk's size in bytes (the export's size).
    pub virtual_size: u64,
    /// The disk's qcow2 image, for finishing the cycle with `qemu-img` if the VM stops meanwhile.
    pub image: PathBuf,
    /// The temporary qcow2 holding the clusters the guest overwrote since the cut. It grows by
    /// what the guest rewrites while the cycle lasts and is deleted by [`end_cycle`].
    pub fleece_image: PathBuf,
}

/// A point-in-time view of an image nobody has open, exported by a [`StorageDaemon`].
#[derive(Debug)]
pub struct OfflineCycleExport {
    pub image: PathBuf,
    pub current_bitmap: String,
    pub next_bitmap: String,
    pub nbd: NbdEndpoint,
    pub meta_context: String,
    pub virtual_size: u64,
    pub export_dir: PathBuf,
    daemon: StorageDaemon,
}

impl OfflineCycleExport {
    /// The daemon serving the export (its pid, for diagnostics).
    pub fn daemon(&self) -> &StorageDaemon {
        &self.daemon
    }
}

/// QMP names of one disk's cycle objects.
#[derive(Debug)]
struct CycleNames {
    disk: String,
    fleece: String,
    job: String,
    export_id: String,
    export_name: String,
}

impl CycleNames {
    fn new(disk_index: usize) -> Self {
        CycleNames {
            disk: format!("disk{disk_index}"),
            fleece: format!("drover-fleece{disk_index}"),
            job: format!("drover-backup{disk_index}"),
            export_id: format!("drover-export{disk_index}"),
            export_name: format!("disk{disk_index}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running VM
// ---------------------------------------------------------------------------------------------

/// Starts recording changes of disk `disk_index` into the persistent bitmap `bitmap`.
/// Idempotent: an existing bitmap of that name is left as it is (check [`bitmap_state`] for
/// whether it can be trusted).
pub async fn enable_tracking(hv: &QemuDriver, vm: Uuid, disk_index: usize, bitmap: &str) -> HvResult<()> {
    check_bitmap_name(bitmap)?;
    let names = CycleNames::new(disk_index);
    let mut qmp = hv.qmp(vm).await?;
    let node = disk_node(&mut qmp, &names.disk).await?;
    if live_bitmaps(&node).iter().any(|b| b.name == bitmap) {
        return Ok(());
    }
    exec(&mut qmp, "block-dirty-bitmap-add", json!({"node": names.disk, "name": bitmap, "persistent": true})).await?;
    Ok(())
}

/// The dirty bitmaps of disk `disk_index` of a running VM.
pub async fn bitmap_state(hv: &QemuDriver, vm: Uuid, disk_index: usize) -> HvResult<Vec<BitmapState>> {
    let names = CycleNames::new(disk_index);
    let mut qmp = hv.qmp(vm).await?;
    Ok(live_bitmaps(&disk_node(&mut qmp, &names.disk).await?))
}

/// Removes a bitmap (e.g. an inconsistent one, before tracking starts afresh). Idempotent.
pub async fn remove_tracking(hv: &QemuDriver, vm: Uuid, disk_index: usize, bitmap: &str) -> HvResult<()> {
    let names = CycleNames::new(disk_index);
    let mut qmp = hv.qmp(vm).await?;
    let node = disk_node(&mut qmp, &names.disk).await?;
    if !live_bitmaps(&node).iter().any(|b| b.name == bitmap) {
        return Ok(());
    }
    exec(&mut qmp, "block-dirty-bitmap-remove", json!({"node": names.disk, "name": bitmap})).await?;
    Ok(())
}

/// Cuts a point in time of a running VM's disk and exports it over NBD (see the module
/// documentation for the steps and why they are safe). `current` must exist and be usable;
/// `next` is created. Safe to call again after a failure or a crash.
pub async fn begin_cycle(
    hv: &QemuDriver,
    vm: Uuid,
    disk_index: usize,
    current: &str,
    next: &str,
    export_dir: &Path,
) -> HvResult<CycleExport> {
    check_cycle_bitmaps(current, next)?;
    let names = CycleNames::new(disk_index);
    tokio::fs::create_dir_all(export_dir)
        .await
        .map_err(|e| HvError::io(format!("creating {}", export_dir.display()), e))?;
    let socket = export_dir.join("nbd.sock");
    // Checked before anything changes: a cut followed by a failing export only costs a retry.
    qsd::check_socket_path(&socket)?;
    let fleece_image = export_dir.join(format!("disk{disk_index}-fleece.qcow2"));

    let mut qmp = hv.qmp(vm).await?;
    let node = disk_node(&mut qmp, &names.disk).await?;
    let virtual_size = node["image"]["virtual-size"]
        .as_u64()
        .ok_or_else(|| HvError::QmpProtocol(format!("{} has no virtual-size", names.disk)))?;
    let image = node["image"]["filename"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| HvError::QmpProtocol(format!("{} has no filename", names.disk)))?;
    let bitmaps = live_bitmaps(&node);
    let cur = usable_bitmap(&bitmaps, current)?;
    let nxt = bitmaps.iter().find(|b| b.name == next);
    if let Some(nxt) = nxt
        && nxt.inconsistent
    {
        return Err(unusable(next, "is inconsistent"));
    }

    if job_exists(&mut qmp, &names.job).await? {
        // A retry of a begin that got as far as the cut: the view is intact, export it.
        if nxt.is_none() {
            return Err(unusable(next, "is missing while the point-in-time view exists; writes since are untracked"));
        }
    } else {
        // No view: clear what an earlier attempt left, so the cut starts from a known state.
        qsd::remove_export(&mut qmp, &names.export_id).await?;
        if node_exists(&mut qmp, &names.fleece).await? {
            exec(&mut qmp, "blockdev-del", json!({"node-name": names.fleece})).await?;
        }
        if nxt.is_some() {
            // An earlier cut whose view is gone. Fold `next` back into `current` atomically (no
            // write can fall between them) and cut again below.
            tracing::info!(%vm, disk_index, current, next, "earlier cut lost its view; folding next into current");
            let actions = json!([
                {"type": "block-dirty-bitmap-enable", "data": {"node": names.disk, "name": current}},
                {"type": "block-dirty-bitmap-merge",
                 "data": {"node": names.disk, "target": current, "bitmaps": [next]}},
                {"type": "block-dirty-bitmap-remove", "data": {"node": names.disk, "name": next}},
            ]);
            exec(&mut qmp, "transaction", json!({"actions": actions})).await?;
        } else if !cur.recording {
            return Err(unusable(current, "is not recording and no next bitmap exists; writes may be untracked"));
        }

        // The fleece must start empty: whatever it holds is shown instead of the disk.
        image::remove(&fleece_image).await?;
        image::create_qcow2(&fleece_image, virtual_size).await?;
        let fleece_path = utf8(&fleece_image)?;
        exec(
            &mut qmp,
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": names.fleece,
                "file": {"driver": "file", "filename": fleece_path},
                "backing": names.disk,
            }),
        )
        .await?;

        let actions = json!([
            {"type": "block-dirty-bitmap-disable", "data": {"node": names.disk, "name": current}},
            {"type": "block-dirty-bitmap-add", "data": {"node": names.disk, "name": next, "persistent": true}},
            {"type": "blockdev-backup",
             "data": {"device": names.disk, "target": names.fleece, "sync": "none", "job-id": names.job}},
        ]);
        exec(&mut qmp, "transaction", json!({"actions": actions})).await?;
    }

    qsd::start_nbd_server(&mut qmp, &socket).await?;
    let export = NbdExport {
        id: names.export_id.clone(),
        node_name: names.fleece.clone(),
        name: names.export_name.clone(),
        writable: false,
        bitmaps: vec![current.to_owned()],
    };
    qsd::add_nbd_export(&mut qmp, &export).await?;
    Ok(CycleExport {
        vm,
        disk_index,
        current_bitmap: current.to_owned(),
        next_bitmap: next.to_owned(),
        nbd: NbdEndpoint { socket, export_name: names.export_name },
        meta_context: dirty_bitmap_context(current),
        virtual_size,
        image,
        fleece_image,
    })
}

/// Ends a cycle: removes the export, the job and the fleece, then commits the bitmaps. With
/// `success`, the replica holds the changes of `current` (durably: call this only after the
/// target has flushed and recorded them) and `current` is dropped; without, `current` is merged
/// into `next` so the next cycle sends its changes again. Safe to call again after a failure or
/// a crash, and after the VM stopped. `end_cycle(.., false)` is also the undo of a
/// [`begin_cycle`] that failed part-way (before or after the cut).
pub async fn end_cycle(hv: &QemuDriver, export: &CycleExport, success: bool) -> HvResult<()> {
    let names = CycleNames::new(export.disk_index);
    let mut qmp = match hv.qmp(export.vm).await {
        Ok(qmp) => qmp,
        Err(HvError::NotRunning(_) | HvError::UnknownVm(_)) => {
            // QEMU is gone and took the export, the job and the fleece node with it; a clean
            // exit wrote both bitmaps into the image, so finish there.
            tracing::info!(vm = %export.vm, disk = export.disk_index, "VM stopped during the cycle; ending it on the image");
            image::remove(&export.fleece_image).await?;
            return finish_bitmaps_offline(&export.image, &export.current_bitmap, &export.next_bitmap, success).await;
        }
        Err(e) => return Err(e),
    };
    qsd::remove_export(&mut qmp, &names.export_id).await?;
    qsd::stop_nbd_server_if_unused(&mut qmp).await?;
    cancel_job(&mut qmp, &names.job).await?;
    if node_exists(&mut qmp, &names.fleece).await? {
        exec(&mut qmp, "blockdev-del", json!({"node-name": names.fleece})).await?;
    }
    image::remove(&export.fleece_image).await?;

    let node = disk_node(&mut qmp, &names.disk).await?;
    let bitmaps = live_bitmaps(&node);
    let (current, next) = (export.current_bitmap.as_str(), export.next_bitmap.as_str());
    let Some(cur) = bitmaps_to_commit(&bitmaps, current, next, success)? else {
        return Ok(());
    };
    if success {
        exec(&mut qmp, "block-dirty-bitmap-remove", json!({"node": names.disk, "name": current})).await?;
    } else {
        if cur.inconsistent {
            return Err(unusable(current, "is inconsistent and cannot be merged back"));
        }
        // One transaction: `current` disappears only together with its bits landing in `next`.
        let actions = json!([
            {"type": "block-dirty-bitmap-merge", "data": {"node": names.disk, "target": next, "bitmaps": [current]}},
            {"type": "block-dirty-bitmap-remove", "data": {"node": names.disk, "name": current}},
        ]);
        exec(&mut qmp, "transaction", json!({"actions": actions})).await?;
    }
    Ok(())
}

async fn exec(qmp: &mut QmpClient, command: &str, args: Value) -> HvResult<Value> {
    Ok(qmp.execute_timeout(command, args, QMP_TIMEOUT).await?)
}

/// The `query-named-block-nodes` entry of a disk; a VM without that disk is a bad request.
async fn disk_node(qmp: &mut QmpClient, node_name: &str) -> HvResult<Value> {
    let nodes = exec(qmp, "query-named-block-nodes", json!({"flat": true})).await?;
    qsd::find_node(&nodes, node_name)
        .cloned()
        .ok_or_else(|| HvError::InvalidSpec(format!("the VM has no block node {node_name}")))
}

async fn node_exists(qmp: &mut QmpClient, node_name: &str) -> HvResult<bool> {
    let nodes = exec(qmp, "query-named-block-nodes", json!({"flat": true})).await?;
    Ok(qsd::find_node(&nodes, node_name).is_some())
}

async fn job_exists(qmp: &mut QmpClient, job: &str) -> HvResult<bool> {
    let jobs = exec(qmp, "query-block-jobs", Value::Null).await?;
    Ok(jobs.as_array().is_some_and(|list| list.iter().any(|j| j.get("device").and_then(Value::as_str) == Some(job))))
}

/// Cancels the backup job and waits until QEMU has dismissed it (it releases the fleece node
/// only then). Idempotent.
async fn cancel_job(qmp: &mut QmpClient, job: &str) -> HvResult<()> {
    if !job_exists(qmp, job).await? {
        return Ok(());
    }
    match exec(qmp, "block-job-cancel", json!({"device": job})).await {
        Ok(_) => {}
        // Finished or cancelled between the query and the command.
        Err(HvError::Qmp { class, .. }) if class == "DeviceNotActive" => {}
        Err(e) => return Err(e),
    }
    let deadline = Instant::now() + JOB_GONE_TIMEOUT;
    while job_exists(qmp, job).await? {
        if Instant::now() >= deadline {
            return Err(HvError::Timeout(JOB_GONE_TIMEOUT, "the fleecing job to end"));
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// The `dirty-bitmaps` of a `query-named-block-nodes` entry.
fn live_bitmaps(node: &Value) -> Vec<BitmapState> {
    let Some(list) = node.get("dirty-bitmaps").and_then(Value::as_array) else {
        return Vec::new();
    };
    let flag = |b: &Value, name: &str| b.get(name).and_then(Value::as_bool).unwrap_or(false);
    list.iter()
        .filter_map(|b| {
            // Unnamed bitmaps are QEMU's own (e.g. of a copy-before-write filter).
            let name = b.get("name")?.as_str()?;
            Some(BitmapState {
                name: name.to_owned(),
                persistent: flag(b, "persistent"),
                recording: flag(b, "recording"),
                inconsistent: flag(b, "inconsistent"),
                busy: flag(b, "busy"),
                granularity: b.get("granularity").and_then(Value::as_u64).unwrap_or(0),
                dirty_bytes: b.get("count").and_then(Value::as_u64),
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Powered-off VM
// ---------------------------------------------------------------------------------------------

/// Adds the persistent bitmap `bitmap` to an image nobody has open. Idempotent.
pub async fn enable_tracking_offline(image: &Path, bitmap: &str) -> HvResult<()> {
    check_bitmap_name(bitmap)?;
    if offline_info(image).await?.bitmaps.iter().any(|b| b.name == bitmap) {
        return Ok(());
    }
    qemu_img_bitmap(image, &["--add"], bitmap).await
}

/// The bitmaps of an image nobody has open. Fails if a process has the image open for writing
/// (its bitmaps would show as in use, which would be wrong; ask the VM with [`bitmap_state`]).
pub async fn bitmap_state_offline(image: &Path) -> HvResult<Vec<BitmapState>> {
    Ok(offline_info(image).await?.bitmaps)
}

/// Removes a bitmap from an image nobody has open. Idempotent.
pub async fn remove_tracking_offline(image: &Path, bitmap: &str) -> HvResult<()> {
    if !offline_info(image).await?.bitmaps.iter().any(|b| b.name == bitmap) {
        return Ok(());
    }
    qemu_img_bitmap(image, &["--remove"], bitmap).await
}

/// Begins a cycle on an image nobody has open: switches the bitmaps with `qemu-img` and exports
/// the image read-only, with `current`, from a [`StorageDaemon`] in `export_dir`. Safe to call
/// again after a failure or a crash (a daemon left in `export_dir` is killed first).
pub async fn begin_cycle_offline(
    image: &Path,
    current: &str,
    next: &str,
    export_dir: &Path,
) -> HvResult<OfflineCycleExport> {
    check_cycle_bitmaps(current, next)?;
    qsd::reap_stale(export_dir).await?;
    let info = offline_info(image).await?;
    let cur = usable_bitmap(&info.bitmaps, current)?;
    match info.bitmaps.iter().find(|b| b.name == next) {
        Some(nxt) if nxt.inconsistent => return Err(unusable(next, "is inconsistent")),
        Some(_) => {
            // An earlier begin, or a cut after which the VM ran: fold `next` back so `current`
            // covers everything, then cut again. Offline nothing writes between the two steps,
            // and rerunning either is harmless (a merge is a union).
            tracing::info!(image = %image.display(), current, next, "folding next into current before the cut");
            qemu_img_bitmap(image, &["--merge", next], current).await?;
            qemu_img_bitmap(image, &["--remove"], next).await?;
        }
        None if !cur.recording => {
            return Err(unusable(current, "is not recording and no next bitmap exists; writes may be untracked"));
        }
        None => {}
    }
    // `next` first: a crash between the two leaves two recording bitmaps, never none.
    qemu_img_bitmap(image, &["--add"], next).await?;
    qemu_img_bitmap(image, &["--disable"], current).await?;

    let daemon = StorageDaemon::start(export_dir).await?;
    daemon
        .add_qcow2(&Qcow2Node {
            node_name: OFFLINE_NODE.into(),
            path: image.to_owned(),
            backing: Backing::FromImage,
            read_only: true,
        })
        .await?;
    let nbd = daemon
        .add_nbd_export(&NbdExport {
            id: OFFLINE_EXPORT_ID.into(),
            node_name: OFFLINE_NODE.into(),
            name: OFFLINE_NODE.into(),
            writable: false,
            bitmaps: vec![current.to_owned()],
        })
        .await?;
    Ok(OfflineCycleExport {
        image: image.to_owned(),
        current_bitmap: current.to_owned(),
        next_bitmap: next.to_owned(),
        nbd,
        meta_context: dirty_bitmap_context(current),
        virtual_size: info.virtual_size,
        export_dir: export_dir.to_owned(),
        daemon,
    })
}

/// Ends an offline cycle: stops the daemon (releasing the image), then commits the bitmaps as
/// [`end_cycle`] does.
pub async fn end_cycle_offline(export: OfflineCycleExport, success: bool) -> HvResult<()> {
    let OfflineCycleExport { image, current_bitmap, next_bitmap, daemon, .. } = export;
    daemon.shutdown().await?;
    finish_bitmaps_offline(&image, &current_bitmap, &next_bitmap, success).await
}

/// Ends an offline cycle whose [`OfflineCycleExport`] was lost (drover restarted): kills a
/// daemon left in `export_dir`, then commits the bitmaps. Idempotent.
pub async fn recover_cycle_offline(
    image: &Path,
    current: &str,
    next: &str,
    export_dir: &Path,
    success: bool,
) -> HvResult<()> {
    qsd::reap_stale(export_dir).await?;
    finish_bitmaps_offline(image, current, next, success).await
}

/// The bitmap step of end_cycle on an image, with `qemu-img`. Not one transaction here, but
/// each step is idempotent (merge is a union, remove checks first) and nothing writes to the
/// image in between, so a rerun after a crash gives the same result.
async fn finish_bitmaps_offline(image: &Path, current: &str, next: &str, success: bool) -> HvResult<()> {
    let bitmaps = offline_info(image).await?.bitmaps;
    let Some(cur) = bitmaps_to_commit(&bitmaps, current, next, success)? else {
        return Ok(());
    };
    if !success {
        if cur.inconsistent {
            return Err(unusable(current, "is inconsistent and cannot be merged back"));
        }
        qemu_img_bitmap(image, &["--merge", current], next).await?;
    }
    qemu_img_bitmap(image, &["--remove"], current).await
}

#[derive(Debug)]
struct OfflineInfo {
    virtual_size: u64,
    bitmaps: Vec<BitmapState>,
}

/// `qemu-img info` **without** `-U`: it takes the image's shared lock, so it fails while a
/// process has the image open for writing, instead of reporting that process's in-use flags.
async fn offline_info(image: &Path) -> HvResult<OfflineInfo> {
    let stdout =
        qemu_img(&["info".as_ref(), "-f".as_ref(), "qcow2".as_ref(), "--output=json".as_ref(), image.as_ref()]).await?;
    parse_offline_info(&stdout)
}

fn parse_offline_info(json: &[u8]) -> HvResult<OfflineInfo> {
    let bad = |what: String| HvError::Tool { program: format!("{QEMU_IMG} info"), stderr: what };
    let info: Value = serde_json::from_slice(json).map_err(|e| bad(format!("unexpected JSON output: {e}")))?;
    let virtual_size = info["virtual-size"].as_u64().ok_or_else(|| bad("no virtual-size".into()))?;
    let list = info["format-specific"]["data"]["bitmaps"].as_array().cloned().unwrap_or_default();
    let bitmaps = list
        .iter()
        .filter_map(|b| {
            let flags: Vec<&str> =
                b.get("flags").and_then(Value::as_array).map(|f| f.iter().filter_map(Value::as_str).collect())?;
            Some(BitmapState {
                name: b.get("name")?.as_str()?.to_owned(),
                persistent: true,
                recording: flags.contains(&"auto"),
                inconsistent: flags.contains(&"in-use"),
                busy: false,
                granularity: b.get("granularity").and_then(Value::as_u64).unwrap_or(0),
                dirty_bytes: None,
            })
        })
        .collect();
    Ok(OfflineInfo { virtual_size, bitmaps })
}

/// `qemu-img bitmap -f qcow2 <ops> <image> <bitmap>`.
async fn qemu_img_bitmap(image: &Path, ops: &[&str], bitmap: &str) -> HvResult<()> {
    let mut args: Vec<&OsStr> = vec!["bitmap".as_ref(), "-f".as_ref(), "qcow2".as_ref()];
    args.extend(ops.iter().map(OsStr::new));
    args.push(image.as_os_str());
    args.push(bitmap.as_ref());
    qemu_img(&args).await.map(drop)
}

/// Runs `qemu-img`. A lock conflict is retried for [`LOCK_RETRY`]: a QEMU that was just stopped
/// or killed is reported gone (its `/proc/<pid>/cmdline` empties) a moment before the kernel
/// closes its files and so releases its image locks.
async fn qemu_img(args: &[&OsStr]) -> HvResult<Vec<u8>> {
    let deadline = Instant::now() + LOCK_RETRY;
    loop {
        tracing::debug!(?args, "qemu-img");
        let output = Command::new(QEMU_IMG)
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|e| HvError::io(format!("running {QEMU_IMG}"), e))?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if stderr.contains("lock") && Instant::now() < deadline {
            tokio::time::sleep(LOCK_POLL).await;
            continue;
        }
        let sub = args.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
        return Err(HvError::Tool {
            program: format!("{QEMU_IMG} {sub}"),
            stderr: if stderr.is_empty() { format!("exited with {}", output.status) } else { stderr },
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Shared
// ---------------------------------------------------------------------------------------------

fn unusable(bitmap: &str, reason: &str) -> HvError {
    HvError::BitmapUnusable { bitmap: bitmap.to_owned(), reason: reason.to_owned() }
}

/// The bitmap named `name`, if it exists and QEMU can use it.
fn usable_bitmap<'a>(bitmaps: &'a [BitmapState], name: &str) -> HvResult<&'a BitmapState> {
    let bitmap = bitmaps.iter().find(|b| b.name == name).ok_or_else(|| {
        unusable(name, "does not exist (tracking was never enabled, or QEMU did not close the image cleanly)")
    })?;
    if bitmap.inconsistent {
        return Err(unusable(name, "is inconsistent (QEMU did not close the image cleanly)"));
    }
    Ok(bitmap)
}

/// Decides the bitmap step of end_cycle from the bitmaps found: `Some(current)` when there is
/// something to commit, `None` when there is nothing to do.
fn bitmaps_to_commit<'a>(
    bitmaps: &'a [BitmapState],
    current: &str,
    next: &str,
    success: bool,
) -> HvResult<Option<&'a BitmapState>> {
    let cur = bitmaps.iter().find(|b| b.name == current);
    let nxt = bitmaps.iter().find(|b| b.name == next);
    match (cur, nxt) {
        // Committed by an earlier attempt.
        (None, Some(_)) => usable_bitmap(bitmaps, next).map(|_| None),
        // The cut never happened (a begin that failed early, undone): `current` still records
        // everything, so there is nothing to fold back.
        (Some(cur), None) if cur.recording && !success => Ok(None),
        (_, None) => Err(unusable(next, "is missing: changes since the cycle began are untracked")),
        (Some(cur), Some(_)) => usable_bitmap(bitmaps, next).map(|_| Some(cur)),
    }
}

fn check_bitmap_name(name: &str) -> HvResult<()> {
    // QEMU's limit is 1023 bytes; the NBD meta context name (with its prefix) must stay < 4 KiB.
    if name.is_empty() || name.len() > 1023 {
        return Err(HvError::InvalidSpec(format!("{name:?} is not a usable bitmap name")));
    }
    Ok(())
}

fn check_cycle_bitmaps(current: &str, next: &str) -> HvResult<()> {
    check_bitmap_name(current)?;
    check_bitmap_name(next)?;
    if current == next {
        return Err(HvError::InvalidSpec(format!("current and next bitmap are both {current:?}")));
    }
    Ok(())
}

fn utf8(path: &Path) -> HvResult<&str> {
    path.to_str().ok_or_else(|| HvError::InvalidSpec(format!("path {} is not UTF-8", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_live_bitmaps() {
        let node = json!({"node-name": "disk0", "dirty-bitmaps": [
            {"name": "bm1", "recording": false, "persistent": true, "busy": true, "granularity": 65536, "count": 196608},
            {"name": "bm2", "recording": true, "persistent": true, "busy": false, "granularity": 65536, "count": 0,
             "inconsistent": true},
            {"recording": false, "persistent": false, "busy": false, "granularity": 65536, "count": 0},
        ]});
        let bitmaps = live_bitmaps(&node);
        assert_eq!(
            bitmaps,
            vec![
                BitmapState {
                    name: "bm1".into(),
                    persistent: true,
                    recording: false,
                    inconsistent: false,
                    busy: true,
                    granularity: 65536,
                    dirty_bytes: Some(196608),
                },
                BitmapState {
                    name: "bm2".into(),
                    persistent: true,
                    recording: true,
                    inconsistent: true,
                    busy: false,
                    granularity: 65536,
                    dirty_bytes: Some(0),
                },
            ]
        );
        assert!(live_bitmaps(&json!({"node-name": "disk0"})).is_empty());
        assert!(usable_bitmap(&bitmaps, "bm1").is_ok());
        assert!(matches!(usable_bitmap(&bitmaps, "bm2"), Err(HvError::BitmapUnusable { .. })));
        assert!(matches!(usable_bitmap(&bitmaps, "bm3"), Err(HvError::BitmapUnusable { .. })));
    }

    #[test]
    fn parses_offline_info() {
        let json = br#"{"virtual-size": 67108864, "format": "qcow2", "format-specific": {"type": "qcow2",
            "data": {"compat": "1.1", "bitmaps": [{"flags": ["in-use", "auto"], "name": "a", "granularity": 65536},
                                                 {"flags": [], "name": "b", "granularity": 65536}]}}}"#;
        let info = parse_offline_info(json).unwrap();
        assert_eq!(info.virtual_size, 64 << 20);
        assert_eq!(info.bitmaps.len(), 2);
        assert!(info.bitmaps[0].recording && info.bitmaps[0].inconsistent && info.bitmaps[0].dirty_bytes.is_none());
        assert!(!info.bitmaps[1].recording && !info.bitmaps[1].inconsistent);
        let plain = br#"{"virtual-size": 512, "format": "qcow2", "format-specific": {"type": "qcow2", "data": {}}}"#;
        assert!(parse_offline_info(plain).unwrap().bitmaps.is_empty());
        assert!(parse_offline_info(b"nope").is_err());
    }

    #[test]
    fn decides_the_commit() {
        let bm = |name: &str, recording: bool, inconsistent: bool| BitmapState {
            name: name.into(),
            persistent: true,
            recording,
            inconsistent,
            busy: false,
            granularity: 65536,
            dirty_bytes: None,
        };
        let cut = [bm("cur", false, false), bm("next", true, false)];
        assert_eq!(bitmaps_to_commit(&cut, "cur", "next", true).unwrap().unwrap().name, "cur");
        assert_eq!(bitmaps_to_commit(&cut, "cur", "next", false).unwrap().unwrap().name, "cur");
        let done = [bm("next", true, false)];
        assert!(bitmaps_to_commit(&done, "cur", "next", true).unwrap().is_none());
        let never_cut = [bm("cur", true, false)];
        assert!(bitmaps_to_commit(&never_cut, "cur", "next", false).unwrap().is_none());
        assert!(matches!(bitmaps_to_commit(&never_cut, "cur", "next", true), Err(HvError::BitmapUnusable { .. })));
        let lost_next = [bm("cur", false, false)];
        assert!(bitmaps_to_commit(&lost_next, "cur", "next", false).is_err());
        let broken_next = [bm("cur", false, false), bm("next", true, true)];
        assert!(bitmaps_to_commit(&broken_next, "cur", "next", true).is_err());
        assert!(bitmaps_to_commit(&[], "cur", "next", false).is_err());
    }

    #[test]
    fn names_and_contexts() {
        assert_eq!(dirty_bitmap_context("drover-1"), "qemu:dirty-bitmap:drover-1");
        let n = CycleNames::new(3);
        assert_eq!((n.disk.as_str(), n.fleece.as_str(), n.job.as_str()), ("disk3", "drover-fleece3", "drover-backup3"));
        assert!(check_cycle_bitmaps("a", "a").is_err());
        assert!(check_cycle_bitmaps("", "a").is_err());
        check_cycle_bitmaps("a", "b").unwrap();
    }
}
