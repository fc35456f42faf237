//! LocalAgent against real qcow2 images and `qemu-storage-daemon` (the simulated hypervisor only
//! stands in for VM control: its disks are powered off, so every cut is offline, with QEMU's tools).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use drover_agent::LocalAgent;
use drover_agent_api::*;
use drover_hv::sim::SimulatedHypervisor;
use uuid::Uuid;

fn qemu_io(image: &Path, cmd: &str) {
    let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd]).arg(image).output().unwrap();
    assert!(out.status.success(), "qemu-io {cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

struct Rig {
    _dir: tempfile::TempDir,
    agent: LocalAgent,
    ds: Uuid,
    disk: DiskRef,
    image: std::path::PathBuf,
    chain: ChainRef,
}

async fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let agent = LocalAgent::new(Arc::new(SimulatedHypervisor::new()), dir.path().join("work"));
    let ds = Uuid::new_v4();
    let root = dir.path().join("ds");
    agent.datastore_ensure(&DatastoreSpec { id: ds, path: root.to_string_lossy().into_owned() }).await.unwrap();
    let vm = Uuid::new_v4();
    let image = root.join(vm.to_string()).join("sda.qcow2");
    std::fs::create_dir_all(image.parent().unwrap()).unwrap();
    drover_qemu::image::create_qcow2(&image, 16 << 20).await.unwrap();
    qemu_io(&image, "write -P 0xab 1M 2M");
    qemu_io(&image, "write -P 0xcd 9M 64k");
    let disk = DiskRef { datastore: ds, vm, disk: "sda".into(), index: 0 };
    let chain = ChainRef { datastore: ds, replica: Uuid::new_v4(), disk: "sda".into() };
    Rig { _dir: dir, agent, ds, disk, image, chain }
}

async fn wait(agent: &LocalAgent, id: &str) -> TransferStatus {
    for _ in 0..600 {
        let s = agent.transfer_status(id).await.unwrap();
        if s.state != TransferState::Running {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("transfer {id} did not end in 30 s");
}

fn cut_spec(r: &Rig, id: &str, current: &str, next: &str, fresh: bool) -> CutSpec {
    CutSpec {
        id: id.into(),
        disk: r.disk.clone(),
        live: false,
        current: current.into(),
        next: next.into(),
        remove: vec![],
        fresh,
    }
}

#[tokio::test]
async fn a_seed_then_a_bitmap_delta_by_reference_with_ensures_that_reattach() {
    let r = rig().await;
    let info = r.agent.disk_info(&r.disk, false).await.unwrap();
    assert_eq!((info.size, info.bitmaps.len()), (16 << 20, 0));

    // Seed: a fresh bitmap, the allocated data into a new point.
    let spec = cut_spec(&r, "run1-0-0", "drover-base", "drover-run1", true);
    let cut = r.agent.cut_begin(&spec).await.unwrap();
    assert_eq!(r.agent.cut_begin(&spec).await.unwrap(), cut, "a second begin resumes the same cut");
    let file = r.agent.point_create(&PointSpec { chain: r.chain.clone(), size: cut.size, prev: None }).await.unwrap();
    let t = TransferSpec {
        id: spec.id.clone(),
        source: cut.source.clone(),
        source_files: None,
        mode: TransferMode::Seed,
        target: file.clone(),
        prev: None,
        size: cut.size,
    };
    r.agent.transfer_ensure(&t).await.unwrap();
    let done = wait(&r.agent, &t.id).await;
    assert_eq!(done.state, TransferState::Done, "{:?}", done.error);
    let seed = done.outcome.clone().unwrap();
    assert!(seed.bytes_written >= (2 << 20) + (64 << 10), "{seed:?}");
    assert!(seed.bytes_written < 4 << 20, "only allocated data travels: {seed:?}");
    assert_eq!(done.target, file);
    // Ensuring it again re-attaches to the finished transfer: nothing runs twice.
    let again = r.agent.transfer_ensure(&t).await.unwrap();
    assert_eq!((again.state, again.outcome), (TransferState::Done, Some(seed.clone())));
    r.agent.cut_end(&spec, Some(&cut), true).await.unwrap();
    r.agent.cut_end(&spec, Some(&cut), true).await.unwrap();
    r.agent.transfer_forget(&t.id).await.unwrap();
    assert_eq!(r.agent.transfer_status(&t.id).await.unwrap_err().kind, ErrorKind::Gone);
    assert!(drover_qemu::image::compare(&r.image, Path::new(&file.0)).await.unwrap(), "the seed equals the source");

    // The guest writes 64 KiB; the next run sends only that, into a point over the first.
    qemu_io(&r.image, "write -P 0xef 5M 64k");
    let names: Vec<String> =
        r.agent.disk_info(&r.disk, false).await.unwrap().bitmaps.into_iter().map(|b| b.name).collect();
    assert_eq!(names, vec!["drover-run1".to_string()]);
    let spec2 = cut_spec(&r, "run2-0-0", "drover-run1", "drover-run2", false);
    let cut2 = r.agent.cut_begin(&spec2).await.unwrap();
    let file2 = r
        .agent
        .point_create(&PointSpec { chain: r.chain.clone(), size: cut2.size, prev: Some(file.clone()) })
        .await
        .unwrap();
    let t2 = TransferSpec {
        id: spec2.id.clone(),
        source: cut2.source.clone(),
        source_files: Some(r.disk.clone()),
        mode: TransferMode::Bitmap,
        target: file2.clone(),
        prev: Some(file.clone()),
        size: cut2.size,
    };
    r.agent.transfer_ensure(&t2).await.unwrap();
    let done2 = wait(&r.agent, &t2.id).await;
    assert_eq!(done2.outcome.as_ref().map(|o| o.bytes_written), Some(64 << 10), "{done2:?}");
    r.agent.cut_end(&spec2, Some(&cut2), true).await.unwrap();
    assert!(drover_qemu::image::compare(&r.image, Path::new(&file2.0)).await.unwrap());

    // Retention merges the first point into the second.
    let holder = r.agent.chain_retire_oldest(&r.chain, &file, &file2, None).await.unwrap();
    assert!(drover_qemu::image::compare(&r.image, Path::new(&holder.0)).await.unwrap());
    let removed = r.agent.chain_collect_garbage(&r.chain, std::slice::from_ref(&holder)).await.unwrap();
    assert!(!removed.iter().any(|f| *f == holder.0), "{removed:?}");
}

#[tokio::test]
async fn a_cut_ended_as_failed_keeps_the_changes_for_the_next_run() {
    let r = rig().await;
    let spec = cut_spec(&r, "run1-0-0", "drover-base", "drover-run1", true);
    r.agent.cut_begin(&spec).await.unwrap();
    // The run fails before the point is published; the agent restarts and has no record of the
    // cut: ending it from its names alone folds `current` back into `next`.
    let restarted = LocalAgent::new(Arc::new(SimulatedHypervisor::new()), r._dir.path().join("work"));
    restarted
        .datastore_ensure(&DatastoreSpec { id: r.ds, path: r._dir.path().join("ds").to_string_lossy().into_owned() })
        .await
        .unwrap();
    r.agent.cut_end(&spec, None, false).await.unwrap();
    restarted.cut_end(&spec, None, false).await.unwrap();
    let bitmaps = restarted.disk_info(&r.disk, false).await.unwrap().bitmaps;
    assert_eq!(bitmaps.len(), 1, "{bitmaps:?}");
    assert_eq!((bitmaps[0].name.as_str(), bitmaps[0].recording), ("drover-run1", true));
}

#[tokio::test]
async fn references_never_reach_outside_the_registered_datastores() {
    let r = rig().await;
    let outside = r._dir.path().join("elsewhere.qcow2");
    drover_qemu::image::create_qcow2(&outside, 1 << 20).await.unwrap();
    let sneaky = [
        PointFile(outside.to_string_lossy().into_owned()),
        PointFile("/etc/passwd".into()),
        PointFile(format!("{}/../elsewhere.qcow2", r._dir.path().join("ds").display())),
        PointFile("relative/file.qcow2".into()),
    ];
    for f in &sneaky {
        let e = r.agent.point_create(&PointSpec { chain: r.chain.clone(), size: 1 << 20, prev: Some(f.clone()) }).await;
        assert_eq!(e.unwrap_err().kind, ErrorKind::Invalid, "{f:?}");
        let e = r.agent.chain_retire_oldest(&r.chain, f, f, None).await;
        assert_eq!(e.unwrap_err().kind, ErrorKind::Invalid, "{f:?}");
    }
    let unknown = DiskRef { datastore: Uuid::new_v4(), ..r.disk.clone() };
    assert_eq!(r.agent.disk_info(&unknown, false).await.unwrap_err().kind, ErrorKind::Invalid);
    let escaping = DiskRef { disk: "../../x".into(), ..r.disk.clone() };
    assert_eq!(r.agent.disk_info(&escaping, false).await.unwrap_err().kind, ErrorKind::Invalid);
    let bad_id = cut_spec(&r, "../x", "drover-a", "drover-b", true);
    assert_eq!(r.agent.cut_begin(&bad_id).await.unwrap_err().kind, ErrorKind::Invalid);
    assert_eq!(r.agent.transfer_status("a/b").await.unwrap_err().kind, ErrorKind::Invalid);
    let relative = DatastoreSpec { id: Uuid::new_v4(), path: "data/ds".into() };
    assert_eq!(r.agent.datastore_ensure(&relative).await.unwrap_err().kind, ErrorKind::Invalid);
    // The simulated hypervisor cannot track a running VM's disk: said as such, not as a failure.
    assert_eq!(r.agent.disk_info(&r.disk, true).await.unwrap_err().kind, ErrorKind::Unsupported);
}
