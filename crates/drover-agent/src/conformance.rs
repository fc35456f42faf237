//! The behaviour every [`HostAgent`] must show, as scenarios any implementation can be run
//! through (the in-process agent, the same agent behind its HTTP API). For tests only
//! (feature `test-support`): they create images with `qemu-io` and panic on a failed check.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use drover_agent_api::*;
use uuid::Uuid;

fn qemu_io(image: &Path, cmd: &str) {
    let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd]).arg(image).output().unwrap();
    assert!(out.status.success(), "qemu-io {cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A datastore at `root` with one VM disk of 16 MiB holding some data, registered with `agent`.
#[derive(Debug)]
pub struct Rig {
    pub root: PathBuf,
    pub ds: Uuid,
    pub disk: DiskRef,
    pub image: PathBuf,
    pub chain: ChainRef,
}

impl Rig {
    pub async fn new(agent: &dyn HostAgent, root: &Path) -> Rig {
        let ds = Uuid::new_v4();
        agent.datastore_ensure(&DatastoreSpec { id: ds, path: root.to_string_lossy().into_owned() }).await.unwrap();
        let vm = Uuid::new_v4();
        let image = root.join(vm.to_string()).join("sda.qcow2");
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        drover_qemu::image::create_qcow2(&image, 16 << 20).await.unwrap();
        qemu_io(&image, "write -P 0xab 1M 2M");
        qemu_io(&image, "write -P 0xcd 9M 64k");
        let disk = DiskRef { datastore: ds, vm, disk: "sda".into(), index: 0 };
        let chain = ChainRef { datastore: ds, replica: Uuid::new_v4(), disk: "sda".into() };
        Rig { root: root.to_owned(), ds, disk, image, chain }
    }

    pub fn cut_spec(&self, id: &str, current: &str, next: &str, fresh: bool) -> CutSpec {
        CutSpec {
            id: id.into(),
            disk: self.disk.clone(),
            live: false,
            current: current.into(),
            next: next.into(),
            remove: vec![],
            fresh,
            file: None,
            // Read by this same agent.
            reader: None,
        }
    }
}

/// Waits (up to 30 s) for a transfer to end.
pub async fn wait(agent: &dyn HostAgent, id: &str) -> TransferStatus {
    for _ in 0..600 {
        let s = agent.transfer_status(id).await.unwrap();
        if s.state != TransferState::Running {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("transfer {id} did not end in 30 s");
}

/// A seed, then a bitmap delta into a point over it, by reference, with ensures that
/// re-attach; then retention and garbage collection of the chain.
pub async fn seed_then_delta(agent: &dyn HostAgent, r: &Rig) {
    let info = agent.disk_info(&r.disk, false).await.unwrap();
    assert_eq!((info.size, info.bitmaps.len()), (16 << 20, 0));

    // Seed: a fresh bitmap, the allocated data into a new point.
    let spec = r.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    let cut = agent.cut_begin(&spec).await.unwrap();
    assert_eq!(agent.cut_begin(&spec).await.unwrap(), cut, "a second begin resumes the same cut");
    let file = agent.point_create(&PointSpec { chain: r.chain.clone(), size: cut.size, prev: None }).await.unwrap();
    let t = TransferSpec {
        id: spec.id.clone(),
        source: cut.source.clone(),
        source_files: None,
        mode: TransferMode::Seed,
        target: file.clone(),
        target_disk: None,
        prev: None,
        size: cut.size,
        bandwidth_limit: None,
    };
    agent.transfer_ensure(&t).await.unwrap();
    let done = wait(agent, &t.id).await;
    assert_eq!(done.state, TransferState::Done, "{:?}", done.error);
    let seed = done.outcome.clone().unwrap();
    assert!(seed.bytes_written >= (2 << 20) + (64 << 10), "{seed:?}");
    assert!(seed.bytes_written < 4 << 20, "only allocated data travels: {seed:?}");
    assert_eq!(done.target, file);
    // Ensuring it again re-attaches to the finished transfer: nothing runs twice.
    let again = agent.transfer_ensure(&t).await.unwrap();
    assert_eq!((again.state, again.outcome), (TransferState::Done, Some(seed.clone())));
    agent.cut_end(&spec, Some(&cut), true).await.unwrap();
    agent.cut_end(&spec, Some(&cut), true).await.unwrap();
    agent.transfer_forget(&t.id).await.unwrap();
    assert_eq!(agent.transfer_status(&t.id).await.unwrap_err().kind, ErrorKind::Gone);
    assert!(drover_qemu::image::compare(&r.image, Path::new(&file.0)).await.unwrap(), "the seed equals the source");

    // The guest writes 64 KiB; the next run sends only that, into a point over the first.
    qemu_io(&r.image, "write -P 0xef 5M 64k");
    let names: Vec<String> =
        agent.disk_info(&r.disk, false).await.unwrap().bitmaps.into_iter().map(|b| b.name).collect();
    assert_eq!(names, vec!["drover-run1".to_string()]);
    let spec2 = r.cut_spec("run2-0-0", "drover-run1", "drover-run2", false);
    let cut2 = agent.cut_begin(&spec2).await.unwrap();
    let file2 = agent
        .point_create(&PointSpec { chain: r.chain.clone(), size: cut2.size, prev: Some(file.clone()) })
        .await
        .unwrap();
    let t2 = TransferSpec {
        id: spec2.id.clone(),
        source: cut2.source.clone(),
        source_files: Some(r.disk.clone()),
        mode: TransferMode::Bitmap,
        target: file2.clone(),
        target_disk: None,
        prev: Some(file.clone()),
        size: cut2.size,
        bandwidth_limit: None,
    };
    agent.transfer_ensure(&t2).await.unwrap();
    let done2 = wait(agent, &t2.id).await;
    assert_eq!(done2.outcome.as_ref().map(|o| o.bytes_written), Some(64 << 10), "{done2:?}");
    agent.cut_end(&spec2, Some(&cut2), true).await.unwrap();
    assert!(drover_qemu::image::compare(&r.image, Path::new(&file2.0)).await.unwrap());

    // Retention merges the first point into the second.
    let holder = agent.chain_retire_oldest(&r.chain, &file, &file2, None).await.unwrap();
    assert!(drover_qemu::image::compare(&r.image, Path::new(&holder.0)).await.unwrap());
    let removed = agent.chain_collect_garbage(&r.chain, std::slice::from_ref(&holder)).await.unwrap();
    assert!(!removed.contains(&holder.0), "{removed:?}");
}

/// References and ids that would leave the registered datastores are refused as invalid.
pub async fn refuses_what_leaves_the_datastores(agent: &dyn HostAgent, r: &Rig) {
    let outside = r.root.parent().unwrap().join("elsewhere.qcow2");
    drover_qemu::image::create_qcow2(&outside, 1 << 20).await.unwrap();
    let sneaky = [
        PointFile(outside.to_string_lossy().into_owned()),
        PointFile("/etc/passwd".into()),
        PointFile(format!("{}/../elsewhere.qcow2", r.root.display())),
        PointFile("relative/file.qcow2".into()),
    ];
    for f in &sneaky {
        let e = agent.point_create(&PointSpec { chain: r.chain.clone(), size: 1 << 20, prev: Some(f.clone()) }).await;
        assert_eq!(e.unwrap_err().kind, ErrorKind::Invalid, "{f:?}");
        let e = agent.chain_retire_oldest(&r.chain, f, f, None).await;
        assert_eq!(e.unwrap_err().kind, ErrorKind::Invalid, "{f:?}");
    }
    let unknown = DiskRef { datastore: Uuid::new_v4(), ..r.disk.clone() };
    assert_eq!(agent.disk_info(&unknown, false).await.unwrap_err().kind, ErrorKind::Invalid);
    let escaping = DiskRef { disk: "../../x".into(), ..r.disk.clone() };
    assert_eq!(agent.disk_info(&escaping, false).await.unwrap_err().kind, ErrorKind::Invalid);
    let bad_id = r.cut_spec("../x", "drover-a", "drover-b", true);
    assert_eq!(agent.cut_begin(&bad_id).await.unwrap_err().kind, ErrorKind::Invalid);
    assert_eq!(agent.transfer_status("a/b").await.unwrap_err().kind, ErrorKind::Invalid);
    let relative = DatastoreSpec { id: Uuid::new_v4(), path: "data/ds".into() };
    assert_eq!(agent.datastore_ensure(&relative).await.unwrap_err().kind, ErrorKind::Invalid);
    // The simulated hypervisor cannot track a running VM's disk: said as such, not as a failure.
    assert_eq!(agent.disk_info(&r.disk, true).await.unwrap_err().kind, ErrorKind::Unsupported);
}

/// VM control: a VM's disks made in a datastore (private), run, seen, stopped, forgotten; what
/// would run a VM on a file outside this agent's datastores, or on one that is not a boot
/// overlay, is refused as invalid.
pub async fn runs_vms_on_its_own_disks_only(agent: &dyn HostAgent, r: &Rig) {
    let vm = Uuid::new_v4();
    let spec = VmDisksSpec {
        datastore: r.ds,
        vm,
        disks: vec![NewDisk { name: "root".into(), size: 4 << 20, import_from: None }],
    };
    agent.vm_disks_ensure(&spec).await.unwrap();
    agent.vm_disks_ensure(&spec).await.unwrap();
    let image = r.root.join(vm.to_string()).join("root.qcow2");
    assert_eq!(drover_qemu::image::info(&image).await.unwrap().virtual_size, 4 << 20);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(std::fs::metadata(&image).unwrap().permissions().mode() & 0o777, 0o600);
    let bad_name =
        VmDisksSpec { disks: vec![NewDisk { name: "../x".into(), size: 1 << 20, import_from: None }], ..spec.clone() };
    assert_eq!(agent.vm_disks_ensure(&bad_name).await.unwrap_err().kind, ErrorKind::Invalid);

    assert_eq!(agent.vm_status(vm).await.unwrap(), PowerState::Off, "a VM never started is off");
    let run = VmRunSpec {
        id: vm,
        name: "t".into(),
        vcpus: 1,
        memory_mib: 64,
        disks: vec![VmDisk::Image(DiskRef { datastore: r.ds, vm, disk: "root".into(), index: 0 })],
        nics: vec![],
        boot: VmBoot::default(),
        hardware: Default::default(),
    };
    agent.vm_power_on(&run).await.unwrap();
    assert_eq!(agent.vm_status(vm).await.unwrap(), PowerState::Running);
    assert!(agent.vm_list().await.unwrap().contains(&VmPresence { vm, power: PowerState::Running }));
    agent.vm_power_off(vm).await.unwrap();
    assert_eq!(agent.vm_status(vm).await.unwrap(), PowerState::Off);
    agent.vm_forget(vm, false).await.unwrap();
    agent.vm_forget(vm, false).await.unwrap();

    let outside = r.root.parent().unwrap().join("not-ours.qcow2");
    drover_qemu::image::create_qcow2(&outside, 1 << 20).await.unwrap();
    for file in [
        PointFile(outside.to_string_lossy().into_owned()),
        PointFile(image.to_string_lossy().into_owned()),
        PointFile("/etc/passwd".into()),
    ] {
        let sneaky = VmRunSpec { disks: vec![VmDisk::Overlay { file: file.clone() }], ..run.clone() };
        assert_eq!(agent.vm_power_on(&sneaky).await.unwrap_err().kind, ErrorKind::Invalid, "{file:?}");
    }
    let relative = VmRunSpec { boot: VmBoot { kernel: Some("vmlinux".into()), ..VmBoot::default() }, ..run.clone() };
    assert_eq!(agent.vm_power_on(&relative).await.unwrap_err().kind, ErrorKind::Invalid);
    let long = VmRunSpec { name: "x".repeat(300), ..run.clone() };
    assert_eq!(agent.vm_power_on(&long).await.unwrap_err().kind, ErrorKind::Invalid);
    let far = r.chain.clone();
    let e = agent.boot_overlay_ensure(&far, &PointFile(outside.to_string_lossy().into_owned()), "l").await;
    assert_eq!(e.unwrap_err().kind, ErrorKind::Invalid);
    let e = agent.boot_overlay_ensure(&far, &PointFile(image.to_string_lossy().into_owned()), "../l").await;
    assert_eq!(e.unwrap_err().kind, ErrorKind::Invalid);

    agent.vm_disks_remove(r.ds, vm).await.unwrap();
    agent.vm_disks_remove(r.ds, vm).await.unwrap();
    assert!(!image.exists());
}

/// Freezes of a running guest (through `sim`, the agent's simulated hypervisor, whose guest agent
/// this turns on): refused bounds, a guest without a guest agent, the same freeze asked twice,
/// another freeze while one holds, thaws by the wrong id and twice, and the watchdog thawing a
/// freeze that outlasts its bound.
pub async fn freezes_are_bounded_and_thawed(agent: &dyn HostAgent, sim: &drover_hv::sim::SimulatedHypervisor) {
    use drover_hv::Hypervisor;
    let vm = Uuid::new_v4();
    let vm_spec = drover_hv::VmSpec {
        id: vm,
        name: "frozen".into(),
        vcpus: 1,
        memory_mib: 64,
        disks: vec![drover_hv::DiskSpec { path: PathBuf::from(format!("/nonexistent/{vm}.qcow2")) }],
        nics: vec![],
        boot: drover_hv::BootSpec { kernel: None, initrd: None, cmdline: None, firmware: Default::default() },
        hardware: Default::default(),
    };
    sim.power_on(&vm_spec).await.unwrap();
    let spec = |id: &str, max_ms: u64| FreezeSpec { id: id.into(), max_ms };

    // A guest without a guest agent is not frozen, and says why; nothing holds.
    let o = agent.vm_freeze(vm, &spec("f1", 60_000)).await.unwrap();
    assert!(!o.frozen && o.reason.contains("no guest agent"), "{o:?}");
    let t = agent.vm_thaw(vm, "f1").await.unwrap();
    assert!(!t.held, "{t:?}");
    for bad in [spec("f1", 0), spec("f1", MAX_FREEZE_MS + 1), spec("../f1", 1000), spec("", 1000)] {
        assert_eq!(agent.vm_freeze(vm, &bad).await.unwrap_err().kind, ErrorKind::Invalid, "{bad:?}");
    }

    sim.set_guest_agent(vm, true);
    let o = agent.vm_freeze(vm, &spec("f2", 60_000)).await.unwrap();
    assert!(o.frozen && o.filesystems > 0, "{o:?}");
    assert!(sim.frozen(vm));
    assert_eq!(agent.vm_freeze(vm, &spec("f2", 60_000)).await.unwrap(), o, "asked again: the same freeze");
    let e = agent.vm_freeze(vm, &spec("f3", 60_000)).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Conflict, "{e:?}");
    let t = agent.vm_thaw(vm, "f3").await.unwrap();
    assert!(!t.held && sim.frozen(vm), "another freeze's thaw leaves this one holding: {t:?}");
    let t = agent.vm_thaw(vm, "f2").await.unwrap();
    assert!(t.held && !sim.frozen(vm), "{t:?}");
    let t = agent.vm_thaw(vm, "f2").await.unwrap();
    assert!(!t.held && !sim.frozen(vm), "thawing again holds nothing and fails nothing: {t:?}");

    // A freeze that outlasts its bound is thawed by the agent's watchdog, and its thaw says so.
    let o = agent.vm_freeze(vm, &spec("f4", 300)).await.unwrap();
    assert!(o.frozen);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while sim.frozen(vm) {
        assert!(std::time::Instant::now() < deadline, "the watchdog never thawed the guest");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = agent.vm_thaw(vm, "f4").await.unwrap();
    assert!(!t.held && t.reason.as_deref().is_some_and(|r| r.contains("watchdog")), "{t:?}");
    // And the VM can be frozen again afterwards.
    assert!(agent.vm_freeze(vm, &spec("f5", 60_000)).await.unwrap().frozen);
    assert!(agent.vm_thaw(vm, "f5").await.unwrap().held);
    // Thawed behind the agent's back (the guest agent restarted, a detached watchdog): the freeze
    // did not hold, and the thaw says so.
    assert!(agent.vm_freeze(vm, &spec("f6", 60_000)).await.unwrap().frozen);
    sim.guest_thaw(vm).await.unwrap();
    let t = agent.vm_thaw(vm, "f6").await.unwrap();
    assert!(!t.held && t.reason.as_deref().is_some_and(|r| r.contains("no longer frozen")), "{t:?}");
    sim.power_off(vm).await.unwrap();
}
