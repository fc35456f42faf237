//! LocalAgent against real qcow2 images and `qemu-storage-daemon` (the simulated hypervisor only
//! stands in for VM control: its disks are powered off, so every cut is offline, with QEMU's tools).

use std::sync::Arc;

use drover_agent::LocalAgent;
use drover_agent::conformance::{self, Rig};
use drover_agent_api::*;
use drover_hv::sim::SimulatedHypervisor;

fn agent(dir: &tempfile::TempDir) -> LocalAgent {
    LocalAgent::new(Arc::new(SimulatedHypervisor::new()), dir.path().join("work"))
}

#[tokio::test]
async fn a_seed_then_a_bitmap_delta_by_reference_with_ensures_that_reattach() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(&dir);
    let rig = Rig::new(&agent, &dir.path().join("ds")).await;
    conformance::seed_then_delta(&agent, &rig).await;
}

#[tokio::test]
async fn references_never_reach_outside_the_registered_datastores() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(&dir);
    let rig = Rig::new(&agent, &dir.path().join("ds")).await;
    conformance::refuses_what_leaves_the_datastores(&agent, &rig).await;
    conformance::runs_vms_on_its_own_disks_only(&agent, &rig).await;
}

#[tokio::test]
async fn a_cut_ended_as_failed_keeps_the_changes_for_the_next_run() {
    let dir = tempfile::tempdir().unwrap();
    let first = agent(&dir);
    let r = Rig::new(&first, &dir.path().join("ds")).await;
    let spec = r.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    first.cut_begin(&spec).await.unwrap();
    // The run fails before the point is published; the agent restarts and has no record of the
    // cut: ending it from its names alone folds `current` back into `next`.
    let restarted = agent(&dir);
    restarted.datastore_ensure(&DatastoreSpec { id: r.ds, path: r.root.to_string_lossy().into_owned() }).await.unwrap();
    first.cut_end(&spec, None, false).await.unwrap();
    restarted.cut_end(&spec, None, false).await.unwrap();
    let bitmaps = restarted.disk_info(&r.disk, false).await.unwrap().bitmaps;
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    assert_eq!((bitmaps[0].name.as_str(), bitmaps[0].recording), ("drover-run1", true));
}

#[tokio::test]
async fn freezes_are_bounded_by_a_watchdog_and_thawed() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Arc::new(SimulatedHypervisor::new());
    let agent = LocalAgent::new(sim.clone(), dir.path().join("work"));
    conformance::freezes_are_bounded_and_thawed(&agent, &sim).await;
    // Nothing is left written down once every freeze was thawed.
    let records: Vec<_> = std::fs::read_dir(dir.path().join("work/freezes")).unwrap().flatten().collect();
    assert!(records.is_empty(), "{records:?}");
}

#[tokio::test]
async fn a_guest_an_agent_left_frozen_when_it_was_killed_is_thawed_when_it_starts_again() {
    use drover_hv::Hypervisor;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let sim = Arc::new(SimulatedHypervisor::new());
    let vm = uuid::Uuid::new_v4();
    let spec = drover_hv::VmSpec {
        id: vm,
        name: "db".into(),
        vcpus: 1,
        memory_mib: 64,
        disks: vec![drover_hv::DiskSpec { path: dir.path().join("db.qcow2") }],
        nics: vec![],
        boot: drover_hv::BootSpec { kernel: None, initrd: None, cmdline: None, firmware: Default::default() },
        hardware: Default::default(),
    };
    sim.power_on(&spec).await.unwrap();
    sim.set_guest_agent(vm, true);
    let first = LocalAgent::new(sim.clone(), dir.path().join("work"));
    let o = first.vm_freeze(vm, &FreezeSpec { id: "run1-0".into(), max_ms: MAX_FREEZE_MS }).await.unwrap();
    assert!(o.frozen && sim.frozen(vm));
    let record = dir.path().join(format!("work/freezes/{vm}.json"));
    assert_eq!(std::fs::metadata(&record).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(record.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
    // The agent is "killed" (its watchdog would wait ten minutes); the next one thaws at start.
    drop(first);
    let restarted = LocalAgent::new(sim.clone(), dir.path().join("work"));
    assert_eq!(restarted.thaw_leftover_freezes().await, 1);
    assert!(!sim.frozen(vm));
    assert!(!record.exists());
    assert_eq!(restarted.thaw_leftover_freezes().await, 0, "nothing is thawed twice");
    // The caller's late thaw is answered: the freeze did not hold.
    let t = restarted.vm_thaw(vm, "run1-0").await.unwrap();
    assert!(!t.held && t.reason.unwrap().contains("restarted"));
}
