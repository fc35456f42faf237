//! Application-consistent restore points of a real guest: the Debian guest
//! (`scripts/build-debian-guest`: systemd, the QEMU guest agent, PostgreSQL), replicated while it
//! runs. Its file systems are frozen through the guest agent while its disk is cut, each point
//! says so, and a failover boots it and says which kind of point it booted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drover_engine::app::{App, Caller, NewDatastore, NewHost, NewReplicationJob, NewVm, PlanInput, PowerAction};
use drover_engine::{Engine, EngineConfig};
use drover_hv::Hypervisor;
use drover_hv::qemu::{QemuConfig, QemuDriver};
use drover_store::Store;
use drover_types::*;

struct Env {
    dir: tempfile::TempDir,
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
    app.engine().wait(s, Duration::from_secs(300)).await.unwrap()
}

async fn log(app: &App, caller: &Caller, s: SessionId) -> Vec<String> {
    app.session_log(caller, s, 0, 1000).await.unwrap().into_iter().map(|e| e.message).collect()
}

fn debian() -> (PathBuf, serde_json::Value) {
    let dir = std::env::var_os("DROVER_DEBIAN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/debian"));
    let dir = std::fs::canonicalize(&dir)
        .unwrap_or_else(|e| panic!("the Debian guest is missing ({e}): run scripts/build-debian-guest"));
    let manifest = serde_json::from_str(&std::fs::read_to_string(dir.join("guest.json")).unwrap()).unwrap();
    (dir, manifest)
}

#[tokio::test]
async fn a_running_debian_guest_gets_application_consistent_points_and_fails_over_to_one() {
    let (guest, manifest) = debian();
    let dir = tempfile::Builder::new().prefix("drc").tempdir_in("/tmp").unwrap();
    let driver = Arc::new(QemuDriver::new(QemuConfig::new(dir.path().join("run"))));
    let store = Store::open_sqlite(&dir.path().join("drover.db")).await.unwrap();
    let config = EngineConfig {
        heartbeat_timeout: Duration::from_secs(240),
        shutdown_timeout: Duration::from_secs(60),
        work_dir: dir.path().join("w"),
        host_paths: drover_engine::testing::host_paths(dir.path()),
        retry_backoff: Duration::from_millis(100),
        ..EngineConfig::default()
    };
    let app = App::new(Engine::new(store, driver.clone(), config));
    app.bootstrap(Some("password1".into())).await.unwrap();
    let caller = app.authenticate(&app.login("admin", "password1", None).await.unwrap().access_token).await.unwrap();
    let env = Env { dir, app, caller, driver };
    let (app, caller, root) = (&env.app, &env.caller, env.dir.path());

    let site = app.site_create(caller, "prod", SiteKind::Production).await.unwrap();
    let host =
        app.host_create(caller, NewHost { site_id: site.id, name: "h".into(), address: "local".into() }).await.unwrap();
    let ds = |n: &str| NewDatastore { host_id: host.id, name: n.into(), path: root.join(n).to_string_lossy().into() };
    let prod = app.datastore_create(caller, ds("prod")).await.unwrap();
    let dr = app.datastore_create(caller, ds("dr")).await.unwrap();
    let file = |key: &str| Some(guest.join(manifest[key].as_str().unwrap()).to_string_lossy().into_owned());
    let new_vm = NewVm {
        name: "db".into(),
        host_id: host.id,
        datastore_id: prod.id,
        vcpus: 1,
        memory_mib: 512,
        disks: vec![VmDisk {
            name: "root".into(),
            size_bytes: 0,
            import_from: Some(guest.join("disk.qcow2").to_string_lossy().into_owned()),
        }],
        nics: vec![("lan".into(), None)],
        tags: vec![],
        boot: VmBoot {
            kernel: file("kernel"),
            initrd: file("initrd"),
            cmdline: Some(manifest["cmdline"].as_str().unwrap().to_string()),
        },
    };
    let (vm, s) = app.vm_create(caller, new_vm).await.unwrap();
    let done = wait(app, s).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}", done.failure_message);
    let s = app.vm_power(caller, vm.id, PowerAction::PowerOn).await.unwrap();
    let done = wait(app, s).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}: {:?}", done.failure_message, log(app, caller, s).await);
    // The power-on is done once the guest answered: its guest agent runs.
    env.driver.wait_heartbeat(vm.id.0, Duration::from_secs(240)).await.unwrap();

    let job = app
        .replication_job_create(
            caller,
            NewReplicationJob {
                name: "db-job".into(),
                vm_ids: vec![vm.id],
                target_host_id: host.id,
                target_datastore_id: dr.id,
                schedule: Schedule::Manual,
                retention_points: 3,
                bandwidth_limit: None,
                consistency: ConsistencyMode::Require,
            },
        )
        .await
        .unwrap();
    // Two runs while it runs: a seed, then an increment; both cut inside a freeze.
    for run in 1..=2 {
        let s = app.replication_job_run(caller, job.id).await.unwrap();
        let done = wait(app, s).await;
        let lines = log(app, caller, s).await;
        assert_eq!(done.result, SessionResult::Success, "run {run}: {:?}: {lines:?}", done.failure_message);
        assert!(lines.iter().any(|l| l.contains("application-consistent cut")), "run {run}: {lines:?}");
        // The guest was thawed: it can be frozen again (and is thawed again at once).
        let again = env.driver.guest_freeze(vm.id.0).await.unwrap();
        assert!(again.frozen, "run {run}: the guest was left frozen: {again:?}");
        env.driver.guest_thaw(vm.id.0).await.unwrap();
    }
    let replica = app.list::<Replica>(caller).await.unwrap().pop().unwrap();
    let points = app.restore_points(caller, replica.id).await.unwrap();
    assert_eq!(points.len(), 2);
    for p in &points {
        assert_eq!(p.consistency.kind, ConsistencyKind::Application, "{:?}", p.consistency);
        assert!(p.consistency.reason.as_deref().unwrap().contains("frozen by the guest agent"), "{:?}", p.consistency);
    }

    // Failover to the newest point: the log says which kind of point it booted.
    let plan = app
        .plan_create(
            caller,
            PlanInput {
                name: "db-plan".into(),
                description: String::new(),
                recovery_location_id: RecoveryLocationId::ORIGINAL,
                groups: vec![PlanGroup {
                    id: PlanGroupId::new(),
                    name: "db".into(),
                    mode: GroupMode::Sequential,
                    delay_secs: 0,
                    critical: true,
                    restore_tags: false,
                    vms: vec![PlanVm {
                        vm_id: vm.id,
                        steps: vec![
                            PlanStep {
                                id: PlanStepId::new(),
                                name: "on".into(),
                                kind: PlanStepKind::PowerOn,
                                critical: true,
                            },
                            PlanStep {
                                id: PlanStepId::new(),
                                name: "hb".into(),
                                kind: PlanStepKind::WaitHeartbeat { timeout_secs: 240 },
                                critical: true,
                            },
                        ],
                    }],
                }],
            },
        )
        .await
        .unwrap();
    let s = app.vm_power(caller, vm.id, PowerAction::PowerOff).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Failover, Default::default()).await.unwrap();
    let done = wait(app, s.unwrap()).await;
    let lines = log(app, caller, done.id).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}: {lines:?}", done.failure_message);
    assert!(
        lines
            .iter()
            .any(|l| l.contains(&format!("booted from restore point {} (application-consistent)", points[1].sequence))),
        "{lines:?}"
    );
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Undo, Default::default()).await.unwrap();
    assert_eq!(wait(app, s.unwrap()).await.result, SessionResult::Success);
}
