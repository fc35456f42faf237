//! Change tracking and point-in-time exports against real QEMU: the tiny guest
//! (`scripts/build-guest`) for running VMs, `qemu-storage-daemon` for powered-off images.
//!
//! Needs `qemu-system-x86_64`, `qemu-img`, `qemu-storage-daemon` (scripts/install-deps), the
//! built guest (`$DROVER_GUEST_DIR` or `<workspace>/guest/out`; missing is a failure, not a
//! skip) and libnbd's `nbdinfo`/`nbdcopy`, which stand in for drover-block's NBD client: they
//! list the `qemu:dirty-bitmap:<name>` extents and read the exported view.
//!
//! The central check is the replication property: the previous point in time, patched with the
//! dirty extents of the next cycle, equals the next point in time. If a bitmap missed a write,
//! the patched copy would differ.

mod common;

use common::{covered, dirty_extents, found_in, patched, read_view, run, total};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use drover_hv::qemu::{Accel, QemuConfig, QemuDriver, TinyGuest};
use drover_hv::tracking::{self, BitmapState};
use drover_hv::{DiskSpec, HvError, Hypervisor, VmSpec};
use drover_qemu::image;
use drover_qemu::qsd::{Backing, NbdExport, Qcow2Node, StorageDaemon};
use serde_json::json;
use uuid::Uuid;

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
const DISK_BYTES: u64 = 64 << 20;
/// One small marker write touches a few 64 KiB granules (data, inode, journal); anything near
/// this bound would mean the bitmap tracks far more than what was written.
const SMALL_DIRTY_BYTES: u64 = 4 << 20;

fn guest_dir() -> PathBuf {
    std::env::var_os("DROVER_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out"))
}

fn tiny_guest() -> TinyGuest {
    let dir = guest_dir();
    TinyGuest::load(&dir).unwrap_or_else(|e| {
        panic!(
            "the tiny guest is not built in {} ({e}); run scripts/build-guest (or set DROVER_GUEST_DIR)",
            dir.display()
        )
    })
}

/// Pids of live processes whose command line mentions `needle` and `program`.
fn processes_mentioning(program: &str, needle: &Path) -> Vec<i32> {
    let needle = needle.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains(program) && cmdline.contains(&needle) {
            pids.push(pid);
        }
    }
    pids
}

/// Kills every process mentioning the test directory when dropped (VMs are daemonized and would
/// outlive a failing test).
struct KillOnDrop {
    dir: PathBuf,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for program in ["qemu-system", "qemu-storage-daemon"] {
            for pid in processes_mentioning(program, &self.dir) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

struct Fixture {
    // Field order matters: processes die before the directory is removed.
    _guard: KillOnDrop,
    dir: tempfile::TempDir,
    guest: Option<TinyGuest>,
}

impl Fixture {
    fn new() -> Self {
        Self::with_guest(Some(tiny_guest()))
    }

    fn with_guest(guest: Option<TinyGuest>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        Fixture { _guard: KillOnDrop { dir: dir.path().to_owned() }, dir, guest }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn driver(&self) -> QemuDriver {
        let mut config = QemuConfig::new(self.path("run"));
        config.accel = Accel::Tcg;
        QemuDriver::new(config)
    }

    async fn boot(&self, hv: &QemuDriver, name: &str) -> VmSpec {
        let disk = self.path(&format!("{name}.qcow2"));
        image::create_qcow2(&disk, DISK_BYTES).await.unwrap();
        let spec = VmSpec {
            id: Uuid::new_v4(),
            name: name.into(),
            vcpus: 1,
            memory_mib: 96,
            disks: vec![DiskSpec { path: disk }],
            nics: vec![],
            boot: self.guest.as_ref().expect("a guest").boot_spec(),
            hardware: Default::default(),
        };
        hv.power_on(&spec).await.unwrap();
        hv.wait_heartbeat(spec.id, BOOT_TIMEOUT).await.unwrap_or_else(|e| {
            panic!(
                "no heartbeat: {e}; console:\n{}",
                std::fs::read_to_string(hv.console_log_path(spec.id)).unwrap_or_default()
            )
        });
        spec
    }

    /// Nothing of ours is left: no storage daemon, no QEMU, no fleece file.
    fn assert_clean(&self) {
        assert_eq!(
            processes_mentioning("qemu-storage-daemon", self.dir.path()),
            Vec::<i32>::new(),
            "storage daemon left"
        );
        assert_eq!(processes_mentioning("qemu-system", self.dir.path()), Vec::<i32>::new(), "QEMU left");
        let fleeces: Vec<_> =
            walk(self.dir.path()).into_iter().filter(|p| p.to_string_lossy().contains("fleece")).collect();
        assert!(fleeces.is_empty(), "fleece files left: {fleeces:?}");
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn bitmap<'a>(bitmaps: &'a [BitmapState], name: &str) -> Option<&'a BitmapState> {
    bitmaps.iter().find(|b| b.name == name)
}

fn names(bitmaps: &[BitmapState]) -> Vec<&str> {
    let mut names: Vec<&str> = bitmaps.iter().map(|b| b.name.as_str()).collect();
    names.sort_unstable();
    names
}

#[tokio::test]
async fn running_vm_cycle_is_a_point_in_time_and_next_holds_later_writes() {
    let fx = Fixture::new();
    let hv = fx.driver();
    let spec = fx.boot(&hv, "live").await;
    let vm = spec.id;
    let exports = fx.path("exp");

    tracking::enable_tracking(&hv, vm, 0, "bm-a").await.unwrap();
    tracking::enable_tracking(&hv, vm, 0, "bm-a").await.unwrap(); // idempotent
    let state = tracking::bitmap_state(&hv, vm, 0).await.unwrap();
    let a = bitmap(&state, "bm-a").expect("bm-a exists");
    assert!(a.recording && a.persistent && !a.inconsistent, "{a:?}");

    let first = format!("first-marker-{}", Uuid::new_v4());
    hv.write_marker(vm, &first).await.unwrap();

    let t = Instant::now();
    let cycle = tracking::begin_cycle(&hv, vm, 0, "bm-a", "bm-b", &exports).await.unwrap();
    let begin_ms = t.elapsed().as_millis();
    // A retried begin (e.g. after a crash of drover) finds the cut in place and reuses it.
    let again = tracking::begin_cycle(&hv, vm, 0, "bm-a", "bm-b", &exports).await.unwrap();
    assert_eq!(again, cycle);
    assert_eq!(cycle.meta_context, "qemu:dirty-bitmap:bm-a");
    assert_eq!(cycle.virtual_size, DISK_BYTES);
    assert!(cycle.fleece_image.exists());

    let extents1 = dirty_extents(&cycle.nbd, &cycle.meta_context);
    let dirty1 = total(&extents1);
    assert!(dirty1 > 0 && dirty1 <= SMALL_DIRTY_BYTES, "dirty bytes after one marker write: {dirty1}");
    let view1 = read_view(&cycle.nbd, DISK_BYTES);
    assert!(found_in(&view1, &extents1, &first), "the first marker is inside the dirty extents");

    // The guest writes again during the cycle; the export keeps showing the point in time.
    let second = format!("second-marker-{}", Uuid::new_v4());
    hv.write_marker(vm, &second).await.unwrap();
    assert_eq!(hv.wait_heartbeat(vm, BOOT_TIMEOUT).await.unwrap().marker.as_deref(), Some(second.as_str()));
    let view1_later = read_view(&cycle.nbd, DISK_BYTES);
    for &(off, len) in &extents1 {
        let r = off as usize..(off + len) as usize;
        assert!(view1[r.clone()] == view1_later[r], "dirty range {off}+{len} changed in the point-in-time view");
    }
    assert!(view1 == view1_later, "the point-in-time view changed while the guest wrote");

    let t = Instant::now();
    tracking::end_cycle(&hv, &cycle, true).await.unwrap();
    let end_ms = t.elapsed().as_millis();
    tracking::end_cycle(&hv, &cycle, true).await.unwrap(); // idempotent
    assert!(!cycle.fleece_image.exists());
    assert!(!cycle.nbd.socket.exists(), "the NBD server is stopped");
    let state = tracking::bitmap_state(&hv, vm, 0).await.unwrap();
    assert_eq!(names(&state), ["bm-b"]);
    let b = bitmap(&state, "bm-b").unwrap();
    assert!(b.recording && b.persistent && b.dirty_bytes.unwrap() > 0, "{b:?}");

    // Cycle 2 carries exactly what changed since cut 1: cut-1 view + its extents = cut-2 view.
    let cycle2 = tracking::begin_cycle(&hv, vm, 0, "bm-b", "bm-c", &exports).await.unwrap();
    let extents2 = dirty_extents(&cycle2.nbd, &cycle2.meta_context);
    let dirty2 = total(&extents2);
    assert!(dirty2 > 0 && dirty2 <= SMALL_DIRTY_BYTES, "dirty bytes after the second write: {dirty2}");
    let view2 = read_view(&cycle2.nbd, DISK_BYTES);
    assert!(view2 != view1);
    assert!(found_in(&view2, &extents2, &second), "the second marker is inside the new dirty extents");
    assert!(patched(&view1, &view2, &extents2) == view2, "next missed a write made during cycle 1");
    tracking::end_cycle(&hv, &cycle2, true).await.unwrap();

    eprintln!(
        "begin_cycle {begin_ms} ms, end_cycle {end_ms} ms; dirty after one marker write: {dirty1} bytes in {} \
         extents; after the second: {dirty2} bytes",
        extents1.len()
    );
    hv.power_off(vm).await.unwrap();
    hv.forget(vm).await.unwrap();
    fx.assert_clean();
}

#[tokio::test]
async fn a_failed_cycle_leaves_its_changes_for_the_next_one() {
    let fx = Fixture::new();
    let hv = fx.driver();
    let spec = fx.boot(&hv, "fail").await;
    let vm = spec.id;
    let exports = fx.path("exp");

    tracking::enable_tracking(&hv, vm, 0, "a").await.unwrap();
    hv.write_marker(vm, "written in cycle 1").await.unwrap();
    let cycle1 = tracking::begin_cycle(&hv, vm, 0, "a", "b", &exports).await.unwrap();
    let extents1 = dirty_extents(&cycle1.nbd, &cycle1.meta_context);
    assert!(!extents1.is_empty());
    let view1 = read_view(&cycle1.nbd, DISK_BYTES);
    tracking::end_cycle(&hv, &cycle1, false).await.unwrap();
    tracking::end_cycle(&hv, &cycle1, false).await.unwrap(); // idempotent
    assert_eq!(names(&tracking::bitmap_state(&hv, vm, 0).await.unwrap()), ["b"]);

    hv.write_marker(vm, "written in cycle 2").await.unwrap();
    let cycle2 = tracking::begin_cycle(&hv, vm, 0, "b", "c", &exports).await.unwrap();
    let extents2 = dirty_extents(&cycle2.nbd, &cycle2.meta_context);
    assert!(covered(&extents1, &extents2), "cycle 2 {extents2:?} must include cycle 1 {extents1:?}");
    let view2 = read_view(&cycle2.nbd, DISK_BYTES);
    assert!(patched(&view1, &view2, &extents2) == view2, "cycle 2 misses a write");
    tracking::end_cycle(&hv, &cycle2, true).await.unwrap();

    // A cut whose view was lost (here the job is cancelled behind drover's back, as when QEMU
    // restarts mid-cycle): a retried begin folds `next` back into `current` and cuts again, so
    // writes made after the lost cut are still sent.
    let cycle3 = tracking::begin_cycle(&hv, vm, 0, "c", "d", &exports).await.unwrap();
    let extents3 = dirty_extents(&cycle3.nbd, &cycle3.meta_context);
    {
        let mut qmp = hv.qmp(vm).await.unwrap();
        qmp.execute("block-export-del", json!({"id": "drover-export0", "mode": "hard"})).await.unwrap();
        qmp.execute("block-job-cancel", json!({"device": "drover-backup0"})).await.unwrap();
    }
    hv.write_marker(vm, "written after the lost cut").await.unwrap();
    let retried = tracking::begin_cycle(&hv, vm, 0, "c", "d", &exports).await.unwrap();
    let extents3b = dirty_extents(&retried.nbd, &retried.meta_context);
    assert!(covered(&extents3, &extents3b));
    let view3 = read_view(&retried.nbd, DISK_BYTES);
    assert!(patched(&view2, &view3, &extents3b) == view3, "the re-cut misses a write");
    assert!(view3 != view2);
    tracking::end_cycle(&hv, &retried, true).await.unwrap();
    let state = tracking::bitmap_state(&hv, vm, 0).await.unwrap();
    assert_eq!(names(&state), ["d"]);
    assert!(bitmap(&state, "d").unwrap().recording);

    // Undoing a begin that failed before its cut (no `next` yet) is a no-op that succeeds.
    let never_cut = tracking::CycleExport { current_bitmap: "d".into(), next_bitmap: "e".into(), ..retried.clone() };
    tracking::end_cycle(&hv, &never_cut, false).await.unwrap();
    assert_eq!(names(&tracking::bitmap_state(&hv, vm, 0).await.unwrap()), ["d"]);

    hv.power_off(vm).await.unwrap();
    hv.forget(vm).await.unwrap();
    fx.assert_clean();
}

#[tokio::test]
async fn powered_off_vm_cycles_through_a_storage_daemon() {
    let fx = Fixture::new();
    let hv = fx.driver();
    let spec = fx.boot(&hv, "off").await;
    let vm = spec.id;
    let disk = spec.disks[0].path.clone();
    let exports = fx.path("exp-off");

    tracking::enable_tracking(&hv, vm, 0, "a").await.unwrap();
    let marker = format!("written-while-running-{}", Uuid::new_v4());
    hv.write_marker(vm, &marker).await.unwrap();
    // A power-off is QMP `quit`: QEMU closes the image cleanly and stores the bitmap in it.
    hv.power_off(vm).await.unwrap();

    let state = tracking::bitmap_state_offline(&disk).await.unwrap();
    let a = bitmap(&state, "a").expect("the bitmap was stored on power-off");
    assert!(a.recording && !a.inconsistent, "{a:?}");

    let t = Instant::now();
    let cycle = tracking::begin_cycle_offline(&disk, "a", "b", &exports).await.unwrap();
    let begin_ms = t.elapsed().as_millis();
    let extents = dirty_extents(&cycle.nbd, &cycle.meta_context);
    let dirty = total(&extents);
    assert!(dirty > 0 && dirty <= SMALL_DIRTY_BYTES, "{dirty}");
    let view = read_view(&cycle.nbd, DISK_BYTES);
    assert!(found_in(&view, &extents, &marker));
    // The daemon holds the image: nobody can open it for writing meanwhile (a VM neither).
    let locked = tracking::enable_tracking_offline(&disk, "not-now").await.unwrap_err();
    assert!(locked.to_string().contains("lock"), "{locked}");
    let pid = cycle.daemon().pid();
    let t = Instant::now();
    tracking::end_cycle_offline(cycle, true).await.unwrap();
    let end_ms = t.elapsed().as_millis();
    assert!(processes_mentioning("qemu-storage-daemon", &exports).is_empty(), "daemon {pid} still runs");
    let state = tracking::bitmap_state_offline(&disk).await.unwrap();
    assert_eq!(names(&state), ["b"]);
    assert!(bitmap(&state, "b").unwrap().recording);
    eprintln!("offline: begin_cycle_offline {begin_ms} ms, end_cycle_offline {end_ms} ms, {dirty} dirty bytes");

    // Failure folds current into next.
    let cycle = tracking::begin_cycle_offline(&disk, "b", "c", &exports).await.unwrap();
    tracking::end_cycle_offline(cycle, false).await.unwrap();
    assert_eq!(names(&tracking::bitmap_state_offline(&disk).await.unwrap()), ["c"]);

    // drover dies mid-cycle without unwinding (simulated by leaking the export and its daemon):
    // the next begin in that directory kills the leftover daemon, folds `next` back and cuts again.
    let cycle = tracking::begin_cycle_offline(&disk, "c", "d", &exports).await.unwrap();
    let leaked = cycle.daemon().pid();
    std::mem::forget(cycle);
    let cycle = tracking::begin_cycle_offline(&disk, "c", "d", &exports).await.unwrap();
    assert_ne!(cycle.daemon().pid(), leaked);
    drop(cycle); // the Drop guard kills the daemon; recovery commits the bitmaps
    tracking::recover_cycle_offline(&disk, "c", "d", &exports, true).await.unwrap();
    assert_eq!(names(&tracking::bitmap_state_offline(&disk).await.unwrap()), ["d"]);

    // QEMU dying with the image open leaves its bitmaps in use: reported, refused, replaceable.
    hv.power_on(&spec).await.unwrap();
    let pid = hv.pid(vm).expect("QEMU runs");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while hv.pid(vm).is_some() {
        assert!(Instant::now() < deadline, "QEMU did not die");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let state = tracking::bitmap_state_offline(&disk).await.unwrap();
    assert!(bitmap(&state, "d").unwrap().inconsistent, "{state:?}");
    let err = tracking::begin_cycle_offline(&disk, "d", "e", &exports).await.unwrap_err();
    assert!(matches!(err, HvError::BitmapUnusable { ref bitmap, .. } if bitmap == "d"), "{err}");
    tracking::remove_tracking_offline(&disk, "d").await.unwrap();
    tracking::enable_tracking_offline(&disk, "fresh").await.unwrap();
    tracking::enable_tracking_offline(&disk, "fresh").await.unwrap();
    let state = tracking::bitmap_state_offline(&disk).await.unwrap();
    assert_eq!(names(&state), ["fresh"]);
    assert!(!bitmap(&state, "fresh").unwrap().inconsistent);

    hv.power_off(vm).await.unwrap();
    hv.forget(vm).await.unwrap();
    fx.assert_clean();
}

/// The target side's use: a restore-point overlay exported writable on its own (`backing: null`),
/// written over NBD, closed cleanly; plus the guards that keep daemons from being left behind.
#[tokio::test]
async fn storage_daemon_exports_an_overlay_writable_and_leaves_nothing() {
    let fx = Fixture::with_guest(None);
    let base = fx.path("base.qcow2");
    let overlay = fx.path("overlay.qcow2");
    image::create_qcow2(&base, DISK_BYTES).await.unwrap();
    run(Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x11 0 1M"]).arg(&base));
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"]).arg(&base).arg(&overlay));

    let t = Instant::now();
    let daemon = StorageDaemon::start(&fx.path("qsd")).await.unwrap();
    let start_ms = t.elapsed().as_millis();
    let node = Qcow2Node { node_name: "point".into(), path: overlay.clone(), backing: Backing::None, read_only: false };
    daemon.add_qcow2(&node).await.unwrap();
    daemon.add_qcow2(&node).await.unwrap(); // idempotent
    let export = NbdExport {
        id: "point".into(),
        node_name: "point".into(),
        name: "point".into(),
        writable: true,
        bitmaps: vec![],
    };
    let nbd = daemon.add_nbd_export(&export).await.unwrap();
    assert_eq!(daemon.add_nbd_export(&export).await.unwrap(), nbd);
    // Without its backing file the overlay reads zeros where the base has 0x11.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0 0 64k", "-c", "write -P 0x5a 64k 64k"])
        .arg(nbd.uri()));
    daemon.remove_nbd_export("point").await.unwrap();
    daemon.remove_nbd_export("point").await.unwrap();
    daemon.remove_node("point").await.unwrap();
    daemon.remove_node("point").await.unwrap();
    let pid = daemon.pid();
    let t = Instant::now();
    daemon.shutdown().await.unwrap();
    let stop_ms = t.elapsed().as_millis();
    assert!(processes_mentioning("qemu-storage-daemon", fx.dir.path()).is_empty(), "pid {pid} still runs");
    // Through the chain: the base below, the overlay's write on top.
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x11 0 64k", "-c", "read -P 0x5a 64k 64k", "-c", "read -P 0x11 128k 64k"])
        .arg(&overlay));
    eprintln!("storage daemon: start {start_ms} ms, shutdown {stop_ms} ms");

    // Dropped without shutdown (an error path): killed.
    let daemon = StorageDaemon::start(&fx.path("qsd")).await.unwrap();
    let pid = daemon.pid();
    drop(daemon);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_mentioning("qemu-storage-daemon", fx.dir.path()).is_empty() {
        assert!(Instant::now() < deadline, "pid {pid} survived its Drop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A daemon that cannot start is an error, not a hang.
    let err = StorageDaemon::start_with(Path::new("/nonexistent/qemu-storage-daemon"), &fx.path("qsd")).await;
    assert!(err.is_err());
    fx.assert_clean();
}
