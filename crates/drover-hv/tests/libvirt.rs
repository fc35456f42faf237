//! The libvirt driver against a real libvirt daemon (started by [`testing::ensure_daemon`] when
//! none runs) and a domain defined outside drover with `virsh define`, booting the tiny guest
//! (`scripts/build-guest`): discovery, power control, drover's channel through the domain's
//! `<channel>`, and change tracking with checkpoints and pull-mode backups — the point in time,
//! the exact dirty extents, a failed cycle that keeps its changes, a cycle while the domain is off
//! and lost libvirt metadata (the checkpoint is redefined), and a `kill -9` of the domain's QEMU
//! that leaves the checkpoint's bitmap broken and is seen as such; a two-disk domain's disks
//! share one backup job; drover's own domains on declared or isolated networks, and under UEFI.
//!
//! Needs libvirt (scripts/install-deps), `qemu-img`, libnbd's `nbdinfo`/`nbdcopy` (they stand in
//! for drover-block's NBD client here) and the built guest.

mod common;

use common::{covered, dirty_extents, found_in, patched, read_view, run, total};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use drover_hv::libvirt::{LibvirtDriver, testing};
use drover_hv::qemu::TinyGuest;
use drover_hv::tracking::BitmapState;
use drover_hv::{ChangeTracking, HvError, Hypervisor, PowerState, VmSpec};
use uuid::Uuid;

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const DISK_BYTES: u64 = 64 << 20;
const SMALL_DIRTY_BYTES: u64 = 4 << 20;

fn tiny_guest() -> TinyGuest {
    let dir = std::env::var_os("DROVER_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out"));
    TinyGuest::load(&dir)
        .unwrap_or_else(|e| panic!("the tiny guest is not built in {} ({e}): run scripts/build-guest", dir.display()))
}

fn virsh(args: &[&str]) -> std::process::Output {
    Command::new("virsh").args(["-c", testing::URI]).args(args).output().unwrap()
}

/// A domain defined outside drover, destroyed and undefined (with its checkpoints' metadata)
/// when dropped.
struct Domain {
    name: String,
    uuid: Uuid,
    dir: tempfile::TempDir,
}

impl Domain {
    fn define(guest: &TinyGuest) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uuid = Uuid::new_v4();
        let name = format!("drover-test-{}", &uuid.to_string()[..8]);
        let disk = dir.path().join("vda.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "compat=1.1"])
            .arg(&disk)
            .arg(DISK_BYTES.to_string()));
        testing::define_tiny_guest_domain(&name, uuid, guest, &disk, dir.path());
        Domain { name, uuid, dir }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    fn qemu_pid(&self) -> i32 {
        let text = std::fs::read_to_string(format!("/run/libvirt/qemu/{}.pid", self.name)).unwrap();
        text.trim().parse().unwrap()
    }

    fn image_bitmaps(&self) -> String {
        let out =
            run(Command::new("qemu-img").args(["info", "-U", "--output=json"]).arg(self.dir.path().join("vda.qcow2")));
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        let _ = virsh(&["undefine", &self.name, "--checkpoints-metadata"]);
    }
}

fn ours(state: &[BitmapState]) -> Vec<&BitmapState> {
    state.iter().filter(|b| b.name.starts_with("drover-") && b.name != drover_hv::libvirt::EXPORT_BITMAP).collect()
}

fn names(state: &[BitmapState]) -> Vec<String> {
    let mut n: Vec<String> = ours(state).iter().map(|b| b.name.clone()).collect();
    n.sort();
    n
}

fn spec(dom: &Domain) -> VmSpec {
    VmSpec {
        id: dom.uuid,
        name: dom.name.clone(),
        vcpus: 1,
        memory_mib: 128,
        disks: vec![],
        nics: vec![],
        boot: drover_hv::BootSpec { kernel: None, initrd: None, cmdline: None, firmware: Default::default() },
        hardware: Default::default(),
    }
}

#[tokio::test]
async fn an_existing_domain_is_discovered_started_and_tracked_with_checkpoints() {
    testing::ensure_daemon();
    let guest = tiny_guest();
    let dom = Domain::define(&guest);
    let hv = LibvirtDriver::new(testing::URI, dom.dir.path().join("run"));
    let vm = dom.uuid;
    let exports = dom.dir.path().join("exp");

    // Discovery lists it as the administrator defined it: not drover's, one trackable disk.
    let found = hv.discover().await.unwrap();
    let d = found.iter().find(|d| d.uuid == vm).expect("the domain is discovered");
    assert_eq!(d.name, dom.name);
    assert_eq!((d.state, d.vcpus, d.memory_mib), (drover_agent_api::HostDomainState::ShutOff, 1, 128));
    assert!(!d.owned_by_drover);
    assert_eq!(d.disks.len(), 1);
    assert_eq!(d.disks[0].format.as_deref(), Some("qcow2"));
    assert_eq!(d.disks[0].size_bytes, Some(DISK_BYTES));
    assert!(d.unsupported.is_empty(), "{:?}", d.unsupported);
    assert_eq!(hv.disk_location(vm, 0).await.unwrap(), Some(dom.dir.path().join("vda.qcow2")));
    assert!(hv.disk_location(vm, 1).await.is_err(), "it has one disk");
    assert_eq!(hv.disk_location(Uuid::new_v4(), 0).await.unwrap(), None, "not a domain: drover's own");
    assert_eq!(hv.status(vm).await.unwrap(), PowerState::Off);
    assert_eq!(hv.status(Uuid::new_v4()).await.unwrap(), PowerState::Off, "an unknown domain is off");

    hv.power_on(&spec(&dom)).await.unwrap();
    hv.power_on(&spec(&dom)).await.unwrap(); // idempotent
    assert_eq!(hv.status(vm).await.unwrap(), PowerState::Running);
    hv.wait_heartbeat(vm, BOOT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("no heartbeat: {e}; console:\n{}", dom.console()));
    assert_eq!(hv.runtime_disks(vm).await.unwrap(), vec![dom.dir.path().join("vda.qcow2")]);

    // A checkpoint records the disk from here on.
    hv.enable(vm, 0, "drover-a").await.unwrap();
    hv.enable(vm, 0, "drover-a").await.unwrap(); // idempotent
    let state = hv.state(vm, 0).await.unwrap();
    assert_eq!(names(&state), ["drover-a"]);
    let a = ours(&state)[0];
    assert!(a.recording && a.persistent && !a.inconsistent, "{a:?}");

    let first = format!("first-{}", Uuid::new_v4());
    hv.write_marker(vm, &first).await.unwrap();
    let cut = hv.cut_begin(vm, 0, "drover-a", "drover-b", &exports).await.unwrap();
    assert_eq!(hv.cut_begin(vm, 0, "drover-a", "drover-b", &exports).await.unwrap(), cut, "a rerun re-exports the job");
    assert_eq!(cut.virtual_size, DISK_BYTES);
    let extents1 = dirty_extents(&cut.nbd, &cut.meta_context);
    assert!(
        total(&extents1) > 0 && total(&extents1) <= SMALL_DIRTY_BYTES,
        "dirty after one write: {}",
        total(&extents1)
    );
    let view1 = read_view(&cut.nbd, DISK_BYTES);
    assert!(found_in(&view1, &extents1, &first), "the marker is inside the dirty extents");
    // The guest writes during the cut; the export keeps the point in time.
    let second = format!("second-{}", Uuid::new_v4());
    hv.write_marker(vm, &second).await.unwrap();
    assert!(read_view(&cut.nbd, DISK_BYTES) == view1, "the point-in-time view changed while the guest wrote");
    // A cut for another directory while the job runs is another job's (libvirt runs one backup
    // job per domain): refused as busy.
    assert!(matches!(
        hv.cut_begin(vm, 0, "drover-a", "drover-x", &exports.join("other")).await,
        Err(HvError::ImageLocked(_))
    ));
    hv.cut_end(&cut, true).await.unwrap();
    hv.cut_end(&cut, true).await.unwrap(); // idempotent
    assert!(!cut.fleece_image.exists(), "the scratch image is gone");
    assert_eq!(names(&hv.state(vm, 0).await.unwrap()), ["drover-b"]);

    // Cycle 2 carries exactly the change made during cycle 1.
    let cut2 = hv.cut_begin(vm, 0, "drover-b", "drover-c", &exports).await.unwrap();
    let extents2 = dirty_extents(&cut2.nbd, &cut2.meta_context);
    let view2 = read_view(&cut2.nbd, DISK_BYTES);
    assert!(found_in(&view2, &extents2, &second), "the second marker is in the new extents");
    assert!(patched(&view1, &view2, &extents2) == view2, "the checkpoint missed a write made during cycle 1");
    // The transfer fails: the new checkpoint goes, `drover-b` still covers everything.
    hv.cut_end(&cut2, false).await.unwrap();
    assert_eq!(names(&hv.state(vm, 0).await.unwrap()), ["drover-b"]);
    let third = format!("third-{}", Uuid::new_v4());
    hv.write_marker(vm, &third).await.unwrap();
    let cut3 = hv.cut_begin(vm, 0, "drover-b", "drover-d", &exports).await.unwrap();
    let extents3 = dirty_extents(&cut3.nbd, &cut3.meta_context);
    let view3 = read_view(&cut3.nbd, DISK_BYTES);
    assert!(covered(&extents2, &extents3), "the failed cycle's changes are sent again");
    assert!(patched(&view1, &view3, &extents3) == view3);
    assert!(found_in(&view3, &extents3, &third));
    hv.cut_end(&cut3, true).await.unwrap();
    assert_eq!(names(&hv.state(vm, 0).await.unwrap()), ["drover-d"]);

    // A cycle while the domain is off, with QEMU's own tools on its image; then its libvirt
    // metadata is lost (undefined and defined again, as after a migration). The next live cycle
    // finds the offline cycle's bitmap sound, redefines its checkpoint and goes on incrementally.
    hv.power_off(vm).await.unwrap();
    let image = dom.dir.path().join("vda.qcow2");
    let off = hv.cut_begin_offline(&image, "drover-d", "drover-o", &dom.dir.path().join("off")).await.unwrap();
    hv.cut_end_offline(off, true).await.unwrap();
    let xml = String::from_utf8(virsh(&["dumpxml", "--inactive", &dom.name]).stdout).unwrap();
    assert!(virsh(&["undefine", &dom.name, "--checkpoints-metadata"]).status.success());
    let file = dom.dir.path().join("again.xml");
    std::fs::write(&file, xml).unwrap();
    assert!(virsh(&["define", &file.to_string_lossy()]).status.success());
    hv.power_on(&spec(&dom)).await.unwrap();
    hv.wait_heartbeat(vm, BOOT_TIMEOUT).await.unwrap();
    let state = hv.state(vm, 0).await.unwrap();
    assert_eq!(names(&state), ["drover-o"]);
    assert!(!ours(&state)[0].inconsistent && ours(&state)[0].recording, "{state:?}");
    let listed = String::from_utf8_lossy(&virsh(&["checkpoint-list", &dom.name]).stdout).into_owned();
    assert!(listed.contains("drover-o"), "the checkpoint is redefined: {listed}");
    let fourth = format!("fourth-{}", Uuid::new_v4());
    hv.write_marker(vm, &fourth).await.unwrap();
    let cut_o = hv.cut_begin(vm, 0, "drover-o", "drover-d", &exports).await.unwrap();
    let extents_o = dirty_extents(&cut_o.nbd, &cut_o.meta_context);
    assert!(total(&extents_o) > 0 && total(&extents_o) <= SMALL_DIRTY_BYTES, "{}", total(&extents_o));
    assert!(
        found_in(&read_view(&cut_o.nbd, DISK_BYTES), &extents_o, &fourth),
        "the write after the restart is in the extents"
    );
    hv.cut_end(&cut_o, true).await.unwrap();
    assert_eq!(names(&hv.state(vm, 0).await.unwrap()), ["drover-d"]);

    // kill -9 of the domain's QEMU: the bitmap in the image is left in use.
    let pid = dom.qemu_pid();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
    let died = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match hv.status(vm).await.unwrap() {
                PowerState::Died => return,
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    assert!(died.is_ok(), "the killed domain reads as died");
    eprintln!("image after kill -9: {}", dom.image_bitmaps());
    hv.power_on(&spec(&dom)).await.unwrap();
    hv.wait_heartbeat(vm, BOOT_TIMEOUT).await.unwrap_or_else(|e| panic!("no heartbeat after restart: {e}"));
    let state = hv.state(vm, 0).await.unwrap();
    let d_state = ours(&state).into_iter().find(|b| b.name == "drover-d").cloned().expect("drover-d is reported");
    assert!(d_state.inconsistent, "the broken checkpoint reads as inconsistent: {state:?}");
    match hv.cut_begin(vm, 0, "drover-d", "drover-e", &exports).await {
        Err(HvError::BitmapUnusable { bitmap, .. }) => assert_eq!(bitmap, "drover-d"),
        other => panic!("a cut from the broken checkpoint must fail as unusable: {other:?}"),
    }
    // What the engine does then: remove it, start a fresh one (and hash-compare this disk).
    hv.remove(vm, 0, "drover-d").await.unwrap();
    assert_eq!(names(&hv.state(vm, 0).await.unwrap()), Vec::<String>::new());
    assert!(!dom.image_bitmaps().contains("drover-d"), "the broken bitmap left the image");
    hv.enable(vm, 0, "drover-f").await.unwrap();
    let cut4 = hv.cut_begin(vm, 0, "drover-f", "drover-g", &exports).await.unwrap();
    hv.cut_end(&cut4, true).await.unwrap();
    assert_eq!(names(&hv.state(vm, 0).await.unwrap()), ["drover-g"]);

    assert_ne!(hv.shutdown(vm, Duration::from_secs(20)).await.unwrap(), drover_hv::ShutdownOutcome::AlreadyOff);
    assert_eq!(hv.status(vm).await.unwrap(), PowerState::Off);
    assert_eq!(hv.shutdown(vm, Duration::from_secs(1)).await.unwrap(), drover_hv::ShutdownOutcome::AlreadyOff);
}

/// A domain with two disks: one backup job for both (libvirt runs one per domain), begun when
/// the second disk's cut asks, each disk exported since its own checkpoint; the first disk's cut
/// ends while the second's export is still read, and the cycle commits when the last one ends.
/// A failed disk keeps every `current`, so the next cycle sends its changes again.
#[tokio::test]
async fn a_two_disk_domain_is_cut_in_one_job() {
    testing::ensure_daemon();
    let guest = tiny_guest();
    let dir = tempfile::tempdir().unwrap();
    let uuid = Uuid::new_v4();
    let name = format!("drover-test-{}", &uuid.to_string()[..8]);
    let images = [dir.path().join("vda.qcow2"), dir.path().join("vdb.qcow2")];
    for image in &images {
        run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(image).arg(DISK_BYTES.to_string()));
    }
    let refs: Vec<&Path> = images.iter().map(PathBuf::as_path).collect();
    testing::define_tiny_guest_domain_with_disks(&name, uuid, &guest, &refs, dir.path());
    let dom = Domain { name, uuid, dir };
    let hv = LibvirtDriver::new(testing::URI, dom.dir.path().join("run"));
    let vm = dom.uuid;
    let exports = dom.dir.path().join("exp");
    assert_eq!(hv.discover().await.unwrap().iter().find(|d| d.uuid == vm).unwrap().disks.len(), 2);
    hv.power_on(&spec(&dom)).await.unwrap();
    hv.wait_heartbeat(vm, BOOT_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("no heartbeat: {e}; console:\n{}", dom.console()));

    // One checkpoint tracks both disks; the second disk's enable finds it.
    hv.enable(vm, 0, "drover-a").await.unwrap();
    hv.enable(vm, 1, "drover-a").await.unwrap();
    for disk in 0..2 {
        assert_eq!(names(&hv.state(vm, disk).await.unwrap()), ["drover-a"], "disk {disk}");
    }

    let first = format!("first-{}", Uuid::new_v4());
    hv.write_marker(vm, &first).await.unwrap();
    let c0 = hv.cut_begin(vm, 0, "drover-a", "drover-b", &exports).await.unwrap();
    assert!(!c0.nbd.socket.exists(), "no job before the second disk asks");
    let c1 = hv.cut_begin(vm, 1, "drover-a", "drover-b", &exports).await.unwrap();
    assert_eq!(c0.nbd.socket, c1.nbd.socket, "one job, one server");
    assert_eq!(hv.cut_begin(vm, 0, "drover-a", "drover-b", &exports).await.unwrap(), c0, "a rerun re-exports");
    let e0 = dirty_extents(&c0.nbd, &c0.meta_context);
    assert!(found_in(&read_view(&c0.nbd, DISK_BYTES), &e0, &first), "the marker is in disk 0's changes");
    assert!(total(&dirty_extents(&c1.nbd, &c1.meta_context)) <= SMALL_DIRTY_BYTES);
    // Disk 0's transfer ends first: the job runs on for disk 1, nothing is committed yet.
    hv.cut_end(&c0, true).await.unwrap();
    let view1 = read_view(&c1.nbd, DISK_BYTES);
    assert_eq!(view1.len() as u64, DISK_BYTES, "disk 1's export is still read");
    assert_eq!(names(&hv.state(vm, 0).await.unwrap()), ["drover-a", "drover-b"]);
    hv.cut_end(&c1, true).await.unwrap();
    for disk in 0..2 {
        assert_eq!(names(&hv.state(vm, disk).await.unwrap()), ["drover-b"], "committed on disk {disk}");
    }

    // Disk 1's transfer fails: `next` goes, both disks keep `drover-b`, and the next cycle
    // sends disk 0's change again although its own transfer had succeeded.
    let second = format!("second-{}", Uuid::new_v4());
    hv.write_marker(vm, &second).await.unwrap();
    let c0 = hv.cut_begin(vm, 0, "drover-b", "drover-c", &exports).await.unwrap();
    let c1 = hv.cut_begin(vm, 1, "drover-b", "drover-c", &exports).await.unwrap();
    let e0 = dirty_extents(&c0.nbd, &c0.meta_context);
    hv.cut_end(&c1, false).await.unwrap();
    hv.cut_end(&c0, true).await.unwrap();
    assert_eq!(names(&hv.state(vm, 0).await.unwrap()), ["drover-b"]);
    // Disk 1 starts over from a checkpoint of its own (as after a hash-compare), disk 0 goes on
    // from `drover-b`: one job, each disk since its own checkpoint.
    hv.enable(vm, 1, "drover-r-base").await.unwrap();
    let c0 = hv.cut_begin(vm, 0, "drover-b", "drover-d", &exports).await.unwrap();
    let c1 = hv.cut_begin(vm, 1, "drover-r-base", "drover-d", &exports).await.unwrap();
    let again = dirty_extents(&c0.nbd, &c0.meta_context);
    assert!(covered(&e0, &again), "the failed cycle's changes are sent again");
    assert!(found_in(&read_view(&c0.nbd, DISK_BYTES), &again, &second));
    let job = String::from_utf8_lossy(&virsh(&["backup-dumpxml", &dom.name]).stdout).into_owned();
    assert!(job.contains("incremental='drover-b'") && job.contains("incremental='drover-r-base'"), "{job}");
    // Asked under another checkpoint while the job exports it since its own: refused, not mixed up.
    assert!(matches!(hv.cut_begin(vm, 1, "drover-b", "drover-d", &exports).await, Err(HvError::ImageLocked(_))));
    hv.cut_end(&c1, true).await.unwrap();
    hv.cut_end(&c0, true).await.unwrap();
    for disk in 0..2 {
        assert_eq!(names(&hv.state(vm, disk).await.unwrap()), ["drover-d"], "disk {disk}");
    }

    // A cut step that fails before the second disk asked: the first disk's cut ends unexported,
    // nothing changes, and the next attempt starts clean.
    let c0 = hv.cut_begin(vm, 0, "drover-d", "drover-e", &exports).await.unwrap();
    hv.cut_end(&c0, true).await.unwrap();
    assert_eq!(names(&hv.state(vm, 0).await.unwrap()), ["drover-d"], "an unexported cut commits nothing");
    assert!(!exports.join("job.json").exists());
    let c0 = hv.cut_begin(vm, 0, "drover-d", "drover-e", &exports).await.unwrap();
    let c1 = hv.cut_begin(vm, 1, "drover-d", "drover-e", &exports).await.unwrap();
    hv.cut_end(&c0, true).await.unwrap();
    hv.cut_end(&c1, true).await.unwrap();
    assert_eq!(names(&hv.state(vm, 1).await.unwrap()), ["drover-e"]);
    assert!(!exports.join("job.json").exists(), "the ledger goes with the cycle");
    hv.power_off(vm).await.unwrap();
}

/// A VM that is no domain yet (a replica on its boot overlay) is defined as drover's own, runs,
/// shows as drover's in discovery, is redefined from its specification on its next start, and
/// is undefined when forgotten; an administrator's domain is never undefined. Its NICs are on
/// the libvirt networks the driver was given for their (mapped) networks, and on drover's
/// isolated network otherwise.
#[tokio::test]
async fn a_replica_runs_as_a_domain_of_drovers_and_is_undefined_when_forgotten() {
    testing::ensure_daemon();
    let guest = tiny_guest();
    let admins = Domain::define(&guest);
    let dir = tempfile::tempdir().unwrap();
    // A libvirt network of the host's ("dr-lan" to drover), and one declared but not there.
    let net = testing::TestNetwork::start();
    let mut hv = LibvirtDriver::new(testing::URI, dir.path().join("run"));
    let missing = format!("{}-missing", net.0);
    hv.set_networks([("dr-lan".to_string(), net.0.clone()), ("gone".to_string(), missing.clone())].into());
    let networks = hv.networks().await.unwrap();
    assert_eq!(networks.len(), 2, "{networks:?}");
    let dr_lan = networks.iter().find(|n| n.name == "dr-lan").unwrap();
    assert!(dr_lan.available && dr_lan.target == format!("libvirt network {}", net.0), "{dr_lan:?}");
    let gone = networks.iter().find(|n| n.name == "gone").unwrap();
    assert!(!gone.available, "{gone:?}");
    assert_eq!(gone.problem.as_deref(), Some(format!("libvirt has no network {missing}").as_str()));
    let disk = dir.path().join("overlay.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&disk).arg(DISK_BYTES.to_string()));
    let id = Uuid::new_v4();
    let spec = VmSpec {
        id,
        name: "db replica".into(),
        vcpus: 1,
        memory_mib: 128,
        disks: vec![drover_hv::DiskSpec { path: disk.clone() }],
        nics: vec![
            drover_hv::NicSpec { network: "nowhere".into(), mac: "52:54:00:12:34:56".into(), no_uplink: false },
            drover_hv::NicSpec { network: "lan".into(), mac: "52:54:00:12:34:57".into(), no_uplink: true },
            drover_hv::NicSpec { network: "dr-lan".into(), mac: "52:54:00:12:34:58".into(), no_uplink: false },
            drover_hv::NicSpec { network: "dr-lan".into(), mac: "52:54:00:12:34:59".into(), no_uplink: true },
            drover_hv::NicSpec { network: "gone".into(), mac: "52:54:00:12:34:5a".into(), no_uplink: false },
        ],
        boot: guest.boot_spec(),
        hardware: Default::default(),
    };
    struct Undefine(Uuid);
    impl Drop for Undefine {
        fn drop(&mut self) {
            let _ = virsh(&["destroy", &self.0.to_string()]);
            let _ = virsh(&["undefine", &self.0.to_string(), "--checkpoints-metadata"]);
        }
    }
    let _undefine = Undefine(id);
    hv.power_on(&spec).await.unwrap();
    hv.wait_heartbeat(id, BOOT_TIMEOUT).await.unwrap();
    hv.write_marker(id, "at DR").await.unwrap();
    let found = hv.discover().await.unwrap();
    let d = found.iter().find(|d| d.uuid == id).expect("the replica is a domain");
    assert!(d.owned_by_drover && d.name.starts_with("drover-db_replica-"), "{d:?}");
    assert!(d.unsupported.iter().any(|u| u.contains("drover defined it")), "{d:?}");
    // Only the NIC on a declared, active network is on it; the others (a network not declared,
    // no uplink, a declared network libvirt does not have) are on drover's isolated network,
    // whose ports reach nothing, not even each other. Every NIC keeps its MAC.
    let isolated = Some(drover_hv::libvirt::ISOLATED_NETWORK);
    let placed: Vec<(Option<&str>, &str, Option<&str>)> =
        d.nics.iter().map(|n| (n.mac.as_deref(), n.kind.as_str(), n.source.as_deref())).collect();
    assert_eq!(
        placed,
        [
            (Some("52:54:00:12:34:56"), "network", isolated),
            (Some("52:54:00:12:34:57"), "network", isolated),
            (Some("52:54:00:12:34:58"), "network", Some(net.0.as_str())),
            (Some("52:54:00:12:34:59"), "network", isolated),
            (Some("52:54:00:12:34:5a"), "network", isolated),
        ]
    );
    let net =
        String::from_utf8_lossy(&virsh(&["net-dumpxml", drover_hv::libvirt::ISOLATED_NETWORK]).stdout).into_owned();
    assert!(net.contains("<port isolated='yes'/>") && !net.contains("<forward") && !net.contains("<ip"), "{net}");
    let active =
        String::from_utf8_lossy(&virsh(&["net-info", drover_hv::libvirt::ISOLATED_NETWORK]).stdout).into_owned();
    assert!(active.lines().any(|l| l.starts_with("Active:") && l.ends_with("yes")), "{active}");
    assert_eq!(hv.disk_location(id, 0).await.unwrap(), None, "drover finds its own files itself");
    // Changes persist in the overlay across a restart; a second disk given on the next start is
    // there (the domain is redefined from the specification while it is off).
    hv.power_off(id).await.unwrap();
    let disk2 = dir.path().join("second.qcow2");
    run(Command::new("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&disk2).arg("1048576"));
    let spec2 =
        VmSpec { disks: vec![drover_hv::DiskSpec { path: disk }, drover_hv::DiskSpec { path: disk2.clone() }], ..spec };
    hv.power_on(&spec2).await.unwrap();
    assert_eq!(hv.wait_heartbeat(id, BOOT_TIMEOUT).await.unwrap().marker.as_deref(), Some("at DR"));
    assert_eq!(hv.runtime_disks(id).await.unwrap()[1], disk2);

    hv.forget(id).await.unwrap();
    hv.forget(id).await.unwrap(); // idempotent
    assert!(virsh(&["dominfo", &id.to_string()]).status.code() != Some(0), "the replica's domain is undefined");
    assert!(!hv.vm_dir(id).exists());
    // The administrator's domain is left as it is.
    hv.forget(admins.uuid).await.unwrap();
    assert!(virsh(&["dominfo", &admins.name]).status.success(), "an imported domain is never undefined");
}

/// The Debian guest (`scripts/build-debian-guest`), or a panic saying how to build it.
fn debian_guest() -> drover_hv::qemu::DebianGuest {
    let debian = std::env::var_os("DROVER_DEBIAN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/debian"));
    drover_hv::qemu::DebianGuest::load(&debian)
        .unwrap_or_else(|e| panic!("the Debian guest is missing ({e}): run scripts/build-debian-guest"))
}

/// A replica of a VM installed on other hardware than drover's own is a domain of drover's
/// with that hardware, and the guest boots its disk there, heard through the guest agent:
/// under UEFI (`<os firmware='efi'>`: libvirt picks OVMF, without Secure Boot, and gives the
/// domain its own variables store, removed with the domain), and on a q35 machine with its disk
/// on SATA and an e1000 NIC under BIOS. Discovery reads the same hardware back.
#[tokio::test]
async fn a_replica_boots_on_its_sources_hardware_as_a_domain_of_drovers() {
    testing::ensure_daemon();
    let debian = debian_guest();
    let dir = tempfile::tempdir().unwrap();
    let hv = LibvirtDriver::new(testing::URI, dir.path().join("run"));
    struct Undefine(Uuid);
    impl Drop for Undefine {
        fn drop(&mut self) {
            let _ = virsh(&["destroy", &self.0.to_string()]);
            let _ = virsh(&["undefine", &self.0.to_string(), "--nvram"]);
        }
    }
    let uefi = drover_hv::BootSpec { kernel: None, initrd: None, cmdline: None, firmware: drover_hv::Firmware::Uefi };
    let bios = drover_hv::BootSpec { firmware: drover_hv::Firmware::Bios, ..uefi.clone() };
    let q35_sata = drover_hv::Hardware {
        machine: drover_hv::Machine::Q35,
        disk_buses: vec![drover_hv::DiskBus::Sata],
        nic_models: vec![drover_hv::NicModel::E1000],
    };
    for (what, boot, hardware) in [("uefi", uefi, drover_hv::Hardware::default()), ("q35-sata", bios, q35_sata)] {
        let disk = dir.path().join(format!("{what}.qcow2"));
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&debian.disk)
            .arg(&disk));
        let id = Uuid::new_v4();
        let _undefine = Undefine(id);
        let nics = if hardware.nic_models.is_empty() {
            vec![]
        } else {
            vec![drover_hv::NicSpec { network: "lan".into(), mac: "52:54:00:12:34:60".into(), no_uplink: true }]
        };
        let spec = VmSpec {
            id,
            name: format!("{what} replica"),
            vcpus: 1,
            memory_mib: 512,
            disks: vec![drover_hv::DiskSpec { path: disk }],
            nics,
            boot,
            hardware,
        };
        let started = std::time::Instant::now();
        hv.power_on(&spec).await.unwrap();
        hv.wait_heartbeat(id, Duration::from_secs(300)).await.unwrap_or_else(|e| {
            let console = std::fs::read_to_string(hv.vm_dir(id).join("console.log")).unwrap_or_default();
            panic!("no heartbeat from the {what} domain: {e}; console:\n{console}")
        });
        println!("the {what} domain answered {:.1} s after it was started", started.elapsed().as_secs_f64());
        let xml = String::from_utf8_lossy(&virsh(&["dumpxml", &id.to_string()]).stdout).into_owned();
        let found = hv.discover().await.unwrap();
        let d = found.iter().find(|d| d.uuid == id).expect("the replica is a domain");
        assert_eq!(d.hardware, spec.hardware, "{d:?}");
        if spec.boot.firmware == drover_hv::Firmware::Uefi {
            assert_eq!(d.firmware, drover_agent_api::Firmware::Uefi, "{d:?}");
            // libvirt resolved `firmware='efi'` into OVMF's code and a variables store of the
            // domain's.
            assert!(xml.contains("<loader") && xml.contains("OVMF_CODE"), "OVMF as the loader: {xml}");
            let nvram = xml
                .lines()
                .find_map(|l| {
                    l.trim().strip_prefix("<nvram")?.split_once('>')?.1.strip_suffix("</nvram>").map(PathBuf::from)
                })
                .unwrap_or_else(|| panic!("no variables store: {xml}"));
            assert!(nvram.exists(), "{}", nvram.display());
            hv.forget(id).await.unwrap();
            assert!(!nvram.exists(), "its variables store is removed with it: {}", nvram.display());
        } else {
            assert!(xml.contains("machine='pc-q35"), "{xml}");
            assert_eq!(d.disks[0].target, "sda");
            assert!(xml.contains("<model type='e1000'/>"), "{xml}");
            hv.forget(id).await.unwrap();
        }
        assert!(virsh(&["dominfo", &id.to_string()]).status.code() != Some(0), "undefined");
    }
}

/// A real guest as users have them: the Debian guest booting from its own disk (no kernel in
/// the definition), with a guest agent channel, defined outside drover. It is heard through the
/// guest agent by way of libvirt (which holds the agent's port), and frozen and thawed through
/// libvirt's `virDomainFSFreeze`; a domain without the channel says why it cannot be frozen.
#[tokio::test]
async fn a_debian_domain_is_heard_and_frozen_through_libvirt() {
    testing::ensure_daemon();
    let debian = debian_guest();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("debian.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&debian.disk)
        .arg(&disk));
    let uuid = Uuid::new_v4();
    let name = format!("drover-test-debian-{}", &uuid.to_string()[..8]);
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>512</memory><vcpu>1</vcpu>
           <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
           <features><acpi/></features><on_poweroff>destroy</on_poweroff>
           <devices>
             <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/></disk>
             <serial type='file'><source path='{d}/console.log'/><target port='0'/></serial>
             <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
             <memballoon model='none'/>
           </devices></domain>",
        disk = disk.display(),
        d = dir.path().display(),
    );
    let file = dir.path().join("domain.xml");
    std::fs::write(&file, xml).unwrap();
    run(Command::new("virsh").args(["-c", testing::URI, "define"]).arg(&file));
    struct Undefine(String);
    impl Drop for Undefine {
        fn drop(&mut self) {
            let _ = virsh(&["destroy", &self.0]);
            let _ = virsh(&["undefine", &self.0, "--checkpoints-metadata"]);
        }
    }
    let _undefine = Undefine(name.clone());
    let hv = LibvirtDriver::new(testing::URI, dir.path().join("run"));
    let spec = VmSpec {
        id: uuid,
        name: name.clone(),
        vcpus: 1,
        memory_mib: 512,
        disks: vec![],
        nics: vec![],
        boot: drover_hv::BootSpec { kernel: None, initrd: None, cmdline: None, firmware: Default::default() },
        hardware: Default::default(),
    };
    let started = std::time::Instant::now();
    hv.power_on(&spec).await.unwrap();
    hv.wait_heartbeat(uuid, Duration::from_secs(300)).await.unwrap_or_else(|e| {
        let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap_or_default();
        panic!("no heartbeat through libvirt's guest agent: {e}; console:\n{console}")
    });
    println!(
        "the Debian domain answered through libvirt {:.1} s after it was started",
        started.elapsed().as_secs_f64()
    );
    let frozen = hv.guest_freeze(uuid).await.unwrap();
    assert!(frozen.frozen && frozen.filesystems >= 1, "{frozen:?}");
    println!("{}", frozen.reason);
    assert_eq!(hv.guest_thaw(uuid).await.unwrap(), frozen.filesystems);
    // Thawed: the guest answers again and can be frozen again.
    hv.wait_heartbeat(uuid, Duration::from_secs(30)).await.unwrap();
    assert!(hv.guest_freeze(uuid).await.unwrap().frozen);
    assert!(hv.guest_thaw(uuid).await.unwrap() >= 1);
    hv.power_off(uuid).await.unwrap();
}
