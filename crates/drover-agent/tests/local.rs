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
