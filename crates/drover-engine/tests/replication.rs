//! Replication end to end on one machine with real QEMU and the tiny guest: a seed while the VM
//! is off, an incremental run while it runs (through its own QMP and a point-in-time export), a
//! run after it shut down, retention, and a VM booted from the newest point that sees the
//! marker written in production.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drover_engine::app::{App, Caller, NewDatastore, NewHost, NewReplicationJob, NewVm, PowerAction};
use drover_engine::{Engine, EngineConfig};
use drover_hv::Hypervisor;
use drover_hv::qemu::{QemuConfig, QemuDriver, TinyGuest};
use drover_store::Store;
use drover_types::*;

fn guest() -> TinyGuest {
    let dir = std::env::var_os("DROVER_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out"));
    TinyGuest::load(&dir).unwrap_or_else(|e| panic!("the tiny guest is missing ({e}): run scripts/build-guest first"))
}

struct Env {
    _dir: tempfile::TempDir,
    app: App,
    caller: Caller,
    driver: Arc<QemuDriver>,
}

impl Drop for Env {
    fn drop(&mut self) {
        // VMs outlive drover by design; a test must not leave them behind.
        for vm in std::fs::read_dir(self.driver.config().runtime_dir.clone()).into_iter().flatten().flatten() {
            if let Ok(id) = vm.file_name().to_string_lossy().parse::<uuid::Uuid>()
                && let Some(pid) = self.driver.pid(id)
            {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

async fn wait(app: &App, s: SessionId) -> Session {
    app.engine().wait(s, Duration::from_secs(180)).await.unwrap()
}

async fn log(app: &App, caller: &Caller, s: SessionId) -> Vec<String> {
    app.session_log(caller, s, 0, 1000).await.unwrap().into_iter().map(|e| e.message).collect()
}

fn compare(a: &Path, b: &Path) -> bool {
    std::process::Command::new("qemu-img").args(["compare", "-q", "-U"]).arg(a).arg(b).status().unwrap().success()
}

#[tokio::test]
async fn replicate_off_running_and_off_again_then_boot_the_newest_point() {
    let guest = guest();
    let dir = tempfile::Builder::new().prefix("drr").tempdir_in("/tmp").unwrap();
    let driver = Arc::new(QemuDriver::new(QemuConfig::new(dir.path().join("run"))));
    let store = Store::open_sqlite(&dir.path().join("drover.db")).await.unwrap();
    let config = EngineConfig {
        heartbeat_timeout: Duration::from_secs(90),
        shutdown_timeout: Duration::from_secs(30),
        monitor_interval: Duration::from_secs(1),
        work_dir: dir.path().join("w"),
    };
    let app = App::new(Engine::new(store, driver.clone(), config));
    app.bootstrap(Some("password1".into())).await.unwrap();
    let tokens = app.login("admin", "password1").await.unwrap();
    let caller = app.authenticate(&tokens.access_token).await.unwrap();
    let env = Env { _dir: dir, app, caller, driver };
    let (app, caller) = (&env.app, &env.caller);
    let root = env._dir.path();

    let site = app.site_create(caller, "prod", SiteKind::Production).await.unwrap();
    let host =
        app.host_create(caller, NewHost { site_id: site.id, name: "h".into(), address: "local".into() }).await.unwrap();
    let ds = |name: &str| NewDatastore {
        host_id: host.id,
        name: name.into(),
        path: root.join(name).to_string_lossy().into(),
    };
    let prod = app.datastore_create(caller, ds("prod")).await.unwrap();
    let dr = app.datastore_create(caller, ds("dr")).await.unwrap();
    let boot = VmBoot {
        kernel: Some(guest.vmlinux.to_string_lossy().into()),
        initrd: Some(guest.initramfs.to_string_lossy().into()),
        cmdline: Some(guest.cmdline.clone()),
    };
    let new_vm = NewVm {
        name: "web".into(),
        host_id: host.id,
        datastore_id: prod.id,
        vcpus: 1,
        memory_mib: 128,
        disks: vec![VmDisk { name: "data".into(), size_bytes: 64 << 20, import_from: None }],
        nics: vec![],
        tags: vec![],
        boot: boot.clone(),
    };
    let (vm, s) = app.vm_create(caller, new_vm).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    let source = root.join("prod").join(vm.id.to_string()).join("data.qcow2");
    let job = app
        .replication_job_create(
            caller,
            NewReplicationJob {
                name: "job".into(),
                vm_ids: vec![vm.id],
                target_host_id: host.id,
                target_datastore_id: dr.id,
                schedule: Schedule::Manual,
                retention_points: 2,
            },
        )
        .await
        .unwrap();

    // 1. Seed, while the VM has never run.
    let s1 = app.replication_job_run(caller, job.id).await.unwrap();
    // A second run while one is under way is refused.
    assert!(matches!(app.replication_job_run(caller, job.id).await, Err(Error::Conflict(_))));
    let done = wait(app, s1).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}", done.failure_message);
    assert!(log(app, caller, s1).await.iter().any(|l| l.contains("seed mode")), "{:?}", log(app, caller, s1).await);
    let replica = app.list::<Replica>(caller).await.unwrap().pop().unwrap();
    assert_eq!((replica.name.as_str(), replica.state), ("web_replica", ReplicaState::Ready));
    let points = app.restore_points(caller, replica.id).await.unwrap();
    assert_eq!(points.len(), 1);
    assert!(compare(&source, Path::new(&points[0].disks[0].file)));

    // 2. The VM runs and writes a marker; the run is incremental through its dirty bitmap.
    let s = app.vm_power(caller, vm.id, PowerAction::PowerOn).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    env.driver.write_marker(vm.id.0, "written in production").await.unwrap();
    let s2 = app.replication_job_run(caller, job.id).await.unwrap();
    let done = wait(app, s2).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}: {:?}", done.failure_message, log(app, caller, s2).await);
    let lines = log(app, caller, s2).await;
    assert!(lines.iter().any(|l| l.contains("bitmap mode")), "{lines:?}");
    let points = app.restore_points(caller, replica.id).await.unwrap();
    assert_eq!(points.len(), 2);
    assert!(
        points[1].bytes_written > 0 && points[1].bytes_written < 16 << 20,
        "incremental: {} bytes",
        points[1].bytes_written
    );

    // 3. Shut down; the next run reads the image offline, still incrementally; retention keeps 2.
    let s = app.vm_power(caller, vm.id, PowerAction::Shutdown).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    let s3 = app.replication_job_run(caller, job.id).await.unwrap();
    let done = wait(app, s3).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}: {:?}", done.failure_message, log(app, caller, s3).await);
    assert!(log(app, caller, s3).await.iter().any(|l| l.contains("bitmap mode")));
    let points = app.restore_points(caller, replica.id).await.unwrap();
    assert_eq!(points.iter().map(|p| p.sequence).collect::<Vec<_>>(), vec![2, 3], "retention kept the newest 2");
    let newest = PathBuf::from(&points[1].disks[0].file);
    assert!(compare(&source, &newest), "the newest point equals the source disk");
    // Nothing but the points' files is left in the chain directory.
    let chain_dir = newest.parent().unwrap();
    let files: Vec<_> = std::fs::read_dir(chain_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(app.get::<Replica>(caller, replica.id.0).await.unwrap().state, ReplicaState::Ready);

    // 4. Boot a VM from the newest point through a throwaway overlay: the marker is there.
    let overlay = drover_block::chain::ChainDir::new(chain_dir).boot_overlay(&newest, "test").await.unwrap();
    let spec = drover_hv::VmSpec {
        id: uuid::Uuid::new_v4(),
        name: "web-replica".into(),
        vcpus: 1,
        memory_mib: 128,
        disks: vec![drover_hv::DiskSpec { path: overlay.clone() }],
        nics: vec![],
        boot: drover_hv::BootSpec {
            kernel: boot.kernel.map(Into::into),
            initrd: boot.initrd.map(Into::into),
            cmdline: boot.cmdline,
        },
    };
    env.driver.power_on(&spec).await.unwrap();
    let hb = env.driver.wait_heartbeat(spec.id, Duration::from_secs(90)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("written in production"));
    env.driver.power_off(spec.id).await.unwrap();
    env.driver.forget(spec.id).await.unwrap();
    // The point itself was never written.
    assert!(compare(&source, &newest));
}
