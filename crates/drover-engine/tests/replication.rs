//! Replication end to end on one machine with real QEMU and the tiny guest: a seed while the VM
//! is off, an incremental run while it runs (through its own QMP and a point-in-time export), a
//! run after it shut down, retention, and a VM booted from the newest point that sees the
//! marker written in production.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drover_engine::app::{
    App, Caller, NewDatastore, NewHost, NewReplicationJob, NewVm, PowerAction, ReplicationJobPatch,
};
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
        drover_engine::testing::kill_vms(&self.driver);
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
        host_paths: drover_engine::testing::host_paths(dir.path()),
        retry_backoff: Duration::from_millis(100),
        ..EngineConfig::default()
    };
    let app = App::new(Engine::new(store, driver.clone(), config));
    app.bootstrap(Some("password1".into())).await.unwrap();
    let tokens = app.login("admin", "password1", None).await.unwrap();
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
        firmware: Default::default(),
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
                bandwidth_limit: None,
                consistency: Default::default(),
                network_mappings: Vec::new(),
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
    // A VM that is not running is cut as it was left: crash-consistent, and the job's `try`
    // does not warn about it.
    assert_eq!(points[0].consistency.kind, ConsistencyKind::Crash);
    assert!(points[0].consistency.reason.as_deref().unwrap().contains("not running"), "{:?}", points[0].consistency);

    // 2. The VM runs and writes a marker; the run is incremental through its dirty bitmap.
    let s = app.vm_power(caller, vm.id, PowerAction::PowerOn).await.unwrap();
    let done = wait(app, s).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}: {:?}", done.failure_message, log(app, caller, s).await);
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
    // The tiny guest has no QEMU guest agent: `try` makes a crash-consistent point and says why.
    assert_eq!(points[1].consistency.kind, ConsistencyKind::Crash);
    let why = points[1].consistency.reason.clone().unwrap();
    assert!(why.contains("no guest agent runs in the guest"), "{why}");
    assert!(lines.iter().any(|l| l.contains("crash-consistent cut") && l.contains("no guest agent")), "{lines:?}");

    // `require` gives the VM no point, says why, and keeps its changes for the next run.
    let set = |c: ConsistencyMode| ReplicationJobPatch { consistency: Some(c), ..Default::default() };
    app.replication_job_update(caller, job.id, set(ConsistencyMode::Require)).await.unwrap();
    env.driver.write_marker(vm.id.0, "written while require failed").await.unwrap();
    let s = app.replication_job_run(caller, job.id).await.unwrap();
    let done = wait(app, s).await;
    assert_eq!(done.result, SessionResult::Failed, "{:?}", log(app, caller, s).await);
    let lines = log(app, caller, s).await;
    assert!(
        lines.iter().any(|l| l.contains("requires application-consistent points") && l.contains("no guest agent")),
        "{lines:?}"
    );
    assert_eq!(app.restore_points(caller, replica.id).await.unwrap().len(), 2, "no point was published");
    // `off` does not ask the guest at all, and the changes of the failed run arrive.
    app.replication_job_update(caller, job.id, set(ConsistencyMode::Off)).await.unwrap();
    let s = app.replication_job_run(caller, job.id).await.unwrap();
    let done = wait(app, s).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}: {:?}", done.failure_message, log(app, caller, s).await);
    assert!(log(app, caller, s).await.iter().any(|l| l.contains("bitmap mode")));
    let points = app.restore_points(caller, replica.id).await.unwrap();
    let newest = points.last().unwrap();
    assert!(newest.consistency.reason.as_deref().unwrap().contains("consistency is off"), "{:?}", newest.consistency);
    app.replication_job_update(caller, job.id, set(ConsistencyMode::Try)).await.unwrap();

    // 3. Shut down; the next run reads the image offline, still incrementally; retention keeps 2.
    let s = app.vm_power(caller, vm.id, PowerAction::Shutdown).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    let s3 = app.replication_job_run(caller, job.id).await.unwrap();
    let done = wait(app, s3).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}: {:?}", done.failure_message, log(app, caller, s3).await);
    assert!(log(app, caller, s3).await.iter().any(|l| l.contains("bitmap mode")));
    let points = app.restore_points(caller, replica.id).await.unwrap();
    assert_eq!(points.iter().map(|p| p.sequence).collect::<Vec<_>>(), vec![3, 4], "retention kept the newest 2");
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
            firmware: Default::default(),
        },
        hardware: Default::default(),
    };
    env.driver.power_on(&spec).await.unwrap();
    let hb = env.driver.wait_heartbeat(spec.id, Duration::from_secs(90)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("written while require failed"));
    env.driver.power_off(spec.id).await.unwrap();
    env.driver.forget(spec.id).await.unwrap();
    // The point itself was never written.
    assert!(compare(&source, &newest));
}

/// An offline rig: a VM that never runs, whose image is written with `qemu-io` between runs.
struct Rig {
    dir: tempfile::TempDir,
    app: App,
    caller: Caller,
    driver: Arc<QemuDriver>,
    job: ReplicationJobId,
    source: PathBuf,
}

impl Rig {
    fn config(root: &Path) -> EngineConfig {
        EngineConfig {
            heartbeat_timeout: Duration::from_secs(60),
            shutdown_timeout: Duration::from_secs(10),
            retry_backoff: Duration::from_millis(10),
            monitor_interval: Duration::from_secs(1),
            work_dir: root.join("w"),
            scheduler_interval: Duration::from_millis(200),
            host_paths: drover_engine::testing::host_paths(root),
            agent_wait: Duration::from_secs(30),
        }
    }

    async fn new() -> Rig {
        Rig::with_agent(|agent| Arc::new(agent)).await
    }

    /// A rig whose local agent is `wrap` of the real one (to inject faults).
    async fn with_agent(wrap: impl FnOnce(drover_agent::LocalAgent) -> Arc<dyn drover_agent_api::HostAgent>) -> Rig {
        let dir = tempfile::Builder::new().prefix("drf").tempdir_in("/tmp").unwrap();
        let driver = Arc::new(QemuDriver::new(QemuConfig::new(dir.path().join("run"))));
        let store = Store::open_sqlite(&dir.path().join("drover.db")).await.unwrap();
        let config = Rig::config(dir.path());
        let agent = wrap(drover_agent::LocalAgent::new(driver.clone(), config.work_dir.clone()));
        let app = App::new(Engine::with_local_agent(store, driver.clone(), config, agent));
        app.bootstrap(Some("password1".into())).await.unwrap();
        let caller =
            app.authenticate(&app.login("admin", "password1", None).await.unwrap().access_token).await.unwrap();
        let site = app.site_create(&caller, "s", SiteKind::Production).await.unwrap();
        let host = app
            .host_create(&caller, NewHost { site_id: site.id, name: "h".into(), address: "local".into() })
            .await
            .unwrap();
        let root = dir.path();
        let ds =
            |n: &str| NewDatastore { host_id: host.id, name: n.into(), path: root.join(n).to_string_lossy().into() };
        let prod = app.datastore_create(&caller, ds("prod")).await.unwrap();
        let dr = app.datastore_create(&caller, ds("dr")).await.unwrap();
        let new_vm = NewVm {
            name: "db".into(),
            host_id: host.id,
            datastore_id: prod.id,
            vcpus: 1,
            memory_mib: 96,
            disks: vec![VmDisk { name: "data".into(), size_bytes: 16 << 20, import_from: None }],
            nics: vec![],
            tags: vec![],
            boot: VmBoot { kernel: None, initrd: None, cmdline: None, firmware: Default::default() },
        };
        let (vm, s) = app.vm_create(&caller, new_vm).await.unwrap();
        assert_eq!(wait(&app, s).await.result, SessionResult::Success);
        let job = app
            .replication_job_create(
                &caller,
                NewReplicationJob {
                    name: "j".into(),
                    vm_ids: vec![vm.id],
                    target_host_id: host.id,
                    target_datastore_id: dr.id,
                    schedule: Schedule::Manual,
                    retention_points: 3,
                    bandwidth_limit: None,
                    consistency: Default::default(),
                    network_mappings: Vec::new(),
                },
            )
            .await
            .unwrap();
        let source = root.join("prod").join(vm.id.to_string()).join("data.qcow2");
        Rig { app, caller, driver, job: job.id, source, dir }
    }

    /// What a restarted drover is: a new engine over the same database and the same VMs.
    async fn restart(&mut self) {
        self.app.engine().shutdown();
        let store = Store::open_sqlite(&self.dir.path().join("drover.db")).await.unwrap();
        self.app = App::new(Engine::new(store, self.driver.clone(), Rig::config(self.dir.path())));
    }

    fn write(&self, pattern: u8, offset: u64) {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("write -P {pattern} {offset} 4096")])
            .arg(&self.source)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    async fn run(&self) -> Session {
        let s = self.app.replication_job_run(&self.caller, self.job).await.unwrap();
        wait(&self.app, s).await
    }

    async fn points(&self) -> Vec<RestorePoint> {
        match self.app.list::<Replica>(&self.caller).await.unwrap().pop() {
            Some(r) => self.app.restore_points(&self.caller, r.id).await.unwrap(),
            None => Vec::new(),
        }
    }

    /// Every published point's chain reads as a whole disk, the newest equals the source, the
    /// chain directory holds nothing else, and the replica is Ready.
    async fn assert_consistent(&self) {
        let points = self.points().await;
        let newest = points.last().expect("a point");
        assert!(compare(&self.source, Path::new(&newest.disks[0].file)), "the newest point equals the source");
        let dir = Path::new(&newest.disks[0].file).parent().unwrap().to_path_buf();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
            .collect();
        files.sort();
        let mut expected: Vec<PathBuf> = points.iter().map(|p| PathBuf::from(&p.disks[0].file)).collect();
        expected.sort();
        assert_eq!(files, expected, "only published points' files are kept");
        for p in &points {
            let m =
                drover_block::hash::Manifest::load(&drover_block::chain::manifest_path(Path::new(&p.disks[0].file)))
                    .await
                    .unwrap();
            assert_eq!(m.digest(), p.disks[0].manifest_digest, "point {} manifest", p.sequence);
        }
        let replica = self.app.list::<Replica>(&self.caller).await.unwrap().pop().unwrap();
        assert_eq!(replica.state, ReplicaState::Ready);
    }
}

const STEPS: [&str; 5] = ["prepare:0", "transfer:0", "publish:0", "release:0", "retention:0"];

/// The real local agent, except that once a transfer has begun its agent "goes away": the
/// next status calls cannot reach it, then it "restarts" (the transfer is dropped, its task
/// stopped) and says it has no such transfer.
#[derive(Debug)]
struct Flaky {
    inner: drover_agent::LocalAgent,
    began: std::sync::atomic::AtomicBool,
    status_calls: std::sync::atomic::AtomicU32,
    ensures: std::sync::atomic::AtomicU32,
    /// The bandwidth limit of every transfer asked for.
    limits: std::sync::Mutex<Vec<Option<u64>>>,
}

#[async_trait::async_trait]
impl drover_agent_api::HostAgent for Flaky {
    fn info(&self) -> drover_agent_api::AgentInfo {
        self.inner.info()
    }
    async fn datastore_ensure(&self, spec: &drover_agent_api::DatastoreSpec) -> drover_agent_api::AgentResult<()> {
        self.inner.datastore_ensure(spec).await
    }
    async fn disk_info(
        &self,
        disk: &drover_agent_api::DiskRef,
        live: bool,
    ) -> drover_agent_api::AgentResult<drover_agent_api::DiskInfo> {
        self.inner.disk_info(disk, live).await
    }
    async fn cut_begin(
        &self,
        spec: &drover_agent_api::CutSpec,
    ) -> drover_agent_api::AgentResult<drover_agent_api::Cut> {
        self.inner.cut_begin(spec).await
    }
    async fn cut_end(
        &self,
        spec: &drover_agent_api::CutSpec,
        cut: Option<&drover_agent_api::Cut>,
        success: bool,
    ) -> drover_agent_api::AgentResult<()> {
        self.inner.cut_end(spec, cut, success).await
    }
    async fn point_create(
        &self,
        spec: &drover_agent_api::PointSpec,
    ) -> drover_agent_api::AgentResult<drover_agent_api::PointFile> {
        self.inner.point_create(spec).await
    }
    async fn chain_collect_garbage(
        &self,
        chain: &drover_agent_api::ChainRef,
        keep: &[drover_agent_api::PointFile],
    ) -> drover_agent_api::AgentResult<Vec<String>> {
        self.inner.chain_collect_garbage(chain, keep).await
    }
    async fn chain_retire_oldest(
        &self,
        chain: &drover_agent_api::ChainRef,
        oldest: &drover_agent_api::PointFile,
        next: &drover_agent_api::PointFile,
        after: Option<&drover_agent_api::PointFile>,
    ) -> drover_agent_api::AgentResult<drover_agent_api::PointFile> {
        self.inner.chain_retire_oldest(chain, oldest, next, after).await
    }
    async fn transfer_ensure(
        &self,
        spec: &drover_agent_api::TransferSpec,
    ) -> drover_agent_api::AgentResult<drover_agent_api::TransferStatus> {
        self.began.store(true, std::sync::atomic::Ordering::SeqCst);
        self.ensures.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.limits.lock().unwrap().push(spec.bandwidth_limit);
        self.inner.transfer_ensure(spec).await
    }
    async fn transfer_status(&self, id: &str) -> drover_agent_api::AgentResult<drover_agent_api::TransferStatus> {
        use drover_agent_api::{AgentError, ErrorKind};
        if self.began.load(std::sync::atomic::Ordering::SeqCst) {
            match self.status_calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
                0..3 => {
                    return Err(AgentError::new(ErrorKind::Retry, "the agent at 127.0.0.1:1 cannot be reached (test)"));
                }
                3 => {
                    self.inner.transfer_forget(id).await?;
                    return Err(AgentError::gone(format!("this agent has no transfer {id}")));
                }
                _ => {}
            }
        }
        self.inner.transfer_status(id).await
    }
    async fn transfer_forget(&self, id: &str) -> drover_agent_api::AgentResult<()> {
        self.inner.transfer_forget(id).await
    }
    async fn vm_disks_ensure(&self, spec: &drover_agent_api::VmDisksSpec) -> drover_agent_api::AgentResult<()> {
        self.inner.vm_disks_ensure(spec).await
    }
    async fn vm_disks_remove(&self, datastore: uuid::Uuid, vm: uuid::Uuid) -> drover_agent_api::AgentResult<()> {
        self.inner.vm_disks_remove(datastore, vm).await
    }
    async fn vm_power_on(&self, spec: &drover_agent_api::VmRunSpec) -> drover_agent_api::AgentResult<()> {
        self.inner.vm_power_on(spec).await
    }
    async fn vm_shutdown(
        &self,
        vm: uuid::Uuid,
        timeout: std::time::Duration,
    ) -> drover_agent_api::AgentResult<drover_agent_api::ShutdownOutcome> {
        self.inner.vm_shutdown(vm, timeout).await
    }
    async fn vm_power_off(&self, vm: uuid::Uuid) -> drover_agent_api::AgentResult<()> {
        self.inner.vm_power_off(vm).await
    }
    async fn vm_status(&self, vm: uuid::Uuid) -> drover_agent_api::AgentResult<drover_agent_api::PowerState> {
        self.inner.vm_status(vm).await
    }
    async fn vm_wait_heartbeat(
        &self,
        vm: uuid::Uuid,
        timeout: std::time::Duration,
    ) -> drover_agent_api::AgentResult<drover_agent_api::Heartbeat> {
        self.inner.vm_wait_heartbeat(vm, timeout).await
    }
    async fn vm_write_marker(&self, vm: uuid::Uuid, marker: &str) -> drover_agent_api::AgentResult<()> {
        self.inner.vm_write_marker(vm, marker).await
    }
    async fn vm_freeze(
        &self,
        vm: uuid::Uuid,
        spec: &drover_agent_api::FreezeSpec,
    ) -> drover_agent_api::AgentResult<drover_agent_api::FreezeOutcome> {
        self.inner.vm_freeze(vm, spec).await
    }
    async fn vm_thaw(&self, vm: uuid::Uuid, id: &str) -> drover_agent_api::AgentResult<drover_agent_api::ThawOutcome> {
        self.inner.vm_thaw(vm, id).await
    }
    async fn vm_check_tcp_port(
        &self,
        vm: uuid::Uuid,
        port: u16,
        timeout: std::time::Duration,
    ) -> drover_agent_api::AgentResult<drover_agent_api::TcpPortState> {
        self.inner.vm_check_tcp_port(vm, port, timeout).await
    }
    async fn vm_forget(&self, vm: uuid::Uuid, discard_overlays: bool) -> drover_agent_api::AgentResult<()> {
        self.inner.vm_forget(vm, discard_overlays).await
    }
    async fn vm_list(&self) -> drover_agent_api::AgentResult<Vec<drover_agent_api::VmPresence>> {
        self.inner.vm_list().await
    }
    async fn domains(&self) -> drover_agent_api::AgentResult<Vec<drover_agent_api::HostDomain>> {
        self.inner.domains().await
    }
    async fn networks(&self) -> drover_agent_api::AgentResult<Vec<drover_agent_api::HostNetwork>> {
        self.inner.networks().await
    }
    async fn vm_boot_overlays(
        &self,
        vm: uuid::Uuid,
    ) -> drover_agent_api::AgentResult<Vec<drover_agent_api::PointFile>> {
        self.inner.vm_boot_overlays(vm).await
    }
    async fn boot_overlay_ensure(
        &self,
        chain: &drover_agent_api::ChainRef,
        point: &drover_agent_api::PointFile,
        label: &str,
    ) -> drover_agent_api::AgentResult<drover_agent_api::PointFile> {
        self.inner.boot_overlay_ensure(chain, point, label).await
    }
}

#[tokio::test]
async fn a_transfer_waits_for_an_unreachable_agent_and_is_asked_again_after_it_restarts() {
    let flaky = Arc::new(std::sync::OnceLock::<Arc<Flaky>>::new());
    let keep = flaky.clone();
    let rig = Rig::with_agent(move |inner| {
        let agent = Arc::new(Flaky {
            inner,
            began: Default::default(),
            status_calls: Default::default(),
            ensures: Default::default(),
            limits: Default::default(),
        });
        let _ = keep.set(agent.clone());
        agent
    })
    .await;
    // The job's bandwidth limit goes with each of its transfers; a limit too low to be meant
    // is refused and changes nothing.
    let limit =
        |b: u64| drover_engine::app::ReplicationJobPatch { bandwidth_limit: Some(Some(b)), ..Default::default() };
    let too_low = rig.app.replication_job_update(&rig.caller, rig.job, limit(1000)).await;
    assert!(matches!(too_low, Err(drover_types::Error::InvalidRequest(_))), "{too_low:?}");
    rig.app.replication_job_update(&rig.caller, rig.job, limit(64 << 20)).await.unwrap();
    rig.write(0x21, 0);
    rig.write(0x22, 5 << 20);
    let s = rig.run().await;
    let lines = log(&rig.app, &rig.caller, s.id).await;
    assert_eq!(s.result, SessionResult::Success, "{:?}: {lines:?}", s.failure_message);
    let agent = flaky.get().unwrap();
    assert_eq!(agent.ensures.load(std::sync::atomic::Ordering::SeqCst), 2, "asked once, then again after the restart");
    assert_eq!(*agent.limits.lock().unwrap(), [Some(64 << 20), Some(64 << 20)], "the job's limit");
    assert!(lines.iter().any(|l| l.contains("cannot be reached (test); waiting for it")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("reachable again")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("no longer knows its transfer")), "{lines:?}");
    // One point, whole, equal to the source, its chain directory holding nothing else.
    assert_eq!(rig.points().await.len(), 1);
    rig.assert_consistent().await;
}

#[tokio::test]
async fn every_replication_step_is_idempotent_and_survives_failures_and_crashes() {
    let mut rig = Rig::new().await;
    rig.write(0x11, 0);
    // Each step twice.
    rig.app.engine().hooks().run_each_step_twice.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(rig.run().await.result, SessionResult::Success);
    rig.write(0x12, 1 << 20);
    assert_eq!(rig.run().await.result, SessionResult::Success);
    rig.app.engine().hooks().run_each_step_twice.store(false, std::sync::atomic::Ordering::Relaxed);
    rig.assert_consistent().await;

    // A step that fails once runs again within the run, which then succeeds and says so.
    rig.write(0x13, 2 << 20);
    rig.app.engine().hooks().fail("transfer:0", 1);
    let retried = rig.run().await;
    assert_eq!(retried.result, SessionResult::Success, "{:?}", retried.failure_message);
    let lines = log(&rig.app, &rig.caller, retried.id).await;
    assert!(lines.iter().any(|l| l.contains("step transfer:0 failed (attempt 1 of 3): trying again")), "{lines:?}");
    rig.app.engine().hooks().fail("none", 1);
    rig.assert_consistent().await;

    // A failure at each step, on every attempt, before it runs and after it ran: the VM is given
    // up (the run fails: it is the only VM), no change is lost, and the next run catches up.
    let cases = STEPS.iter().map(|s| (*s, false)).chain(STEPS.iter().map(|s| (*s, true)));
    for (n, (step, after_it_ran)) in cases.enumerate() {
        rig.write(0x20 + n as u8, (2 + (n as u64 % 8)) << 20);
        let before = rig.points().await.len();
        if after_it_ran {
            rig.app.engine().hooks().fail_after_every(step);
        } else {
            rig.app.engine().hooks().fail_every(step);
        }
        let failed = rig.run().await;
        // A point stands once `publish` has run (a failure after it does not take it back).
        let published_anyway = matches!(step, "release:0" | "retention:0") || (after_it_ran && step == "publish:0");
        if step == "retention:0" {
            // Retention is not critical: the point stands, the run warns.
            assert_eq!(failed.result, SessionResult::Warning, "{step}");
        } else {
            assert_eq!(failed.result, SessionResult::Failed, "{step}: {:?}", failed.failure_message);
        }
        let after = rig.points().await.len();
        assert!(
            after == before || (published_anyway && after == before + 1) || after == 3,
            "{step}: {before} -> {after}"
        );
        rig.app.engine().hooks().fail("none", 1);
        rig.app.engine().hooks().fail_after("none", 1);
        let ok = rig.run().await;
        assert_eq!(ok.result, SessionResult::Success, "after failing {step}: {:?}", ok.failure_message);
        // The failed run's changes are still tracked: the catch-up is incremental, not a
        // hash-compare of the whole disk (which would also converge, but by reading everything).
        let lines = log(&rig.app, &rig.caller, ok.id).await;
        assert!(
            lines.iter().any(|l| l.contains("bitmap mode")),
            "after failing {step} (ran: {after_it_ran}): {lines:?}"
        );
        rig.assert_consistent().await;
    }

    // A crash after each step: the next engine resumes the run to success.
    for (n, step) in STEPS.iter().enumerate() {
        rig.write(0x40 + n as u8, (10 + n as u64) << 20);
        rig.app.engine().hooks().crash_after(step);
        let s = rig.app.replication_job_run(&rig.caller, rig.job).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_ne!(rig.app.engine().store().session_get(None, s).await.unwrap().state, SessionState::Stopped, "{step}");
        rig.restart().await;
        rig.app.engine().start().await.unwrap();
        let done = wait(&rig.app, s).await;
        assert_eq!(done.result, SessionResult::Success, "resumed after a crash in {step}: {:?}", done.failure_message);
        rig.assert_consistent().await;
        // And the run after that is still incremental.
        rig.write(0x50 + n as u8, (10 + n as u64) << 20);
        let next = rig.run().await;
        assert!(
            log(&rig.app, &rig.caller, next.id).await.iter().any(|l| l.contains("bitmap mode")),
            "after a crash in {step}"
        );
        rig.assert_consistent().await;
    }
    assert_eq!(rig.points().await.len(), 3, "retention holds");
}

/// A disk whose tracking bitmaps are gone (as after an unclean shutdown or a tool that dropped
/// them) is brought level by hash-compare against the newest point's manifest: only the source
/// is read, and only its allocated data; then tracking starts afresh and the next run is
/// incremental again.
#[tokio::test]
async fn a_lost_bitmap_falls_back_to_hash_compare_against_the_manifest() {
    let rig = Rig::new().await;
    rig.write(0x11, 0);
    assert_eq!(rig.run().await.result, SessionResult::Success);
    rig.write(0x12, 1 << 20);
    assert_eq!(rig.run().await.result, SessionResult::Success);
    // Drop every bitmap of the production disk, then change it.
    let info =
        std::process::Command::new("qemu-img").args(["info", "--output=json", "-U"]).arg(&rig.source).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    let bitmaps: Vec<String> = info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["name"].as_str().map(String::from)).collect())
        .unwrap_or_default();
    assert!(!bitmaps.is_empty(), "replication tracks the disk with a bitmap: {info}");
    for b in &bitmaps {
        let out = std::process::Command::new("qemu-img")
            .args(["bitmap", "--remove"])
            .arg(&rig.source)
            .arg(b)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    rig.write(0x13, 3 << 20);
    rig.write(0x14, 9 << 20);

    let s = rig.run().await;
    assert_eq!(s.result, SessionResult::Success, "{:?}", s.failure_message);
    let lines = log(&rig.app, &rig.caller, s.id).await;
    let line = lines.iter().find(|l| l.contains("hash-compare mode")).unwrap_or_else(|| panic!("{lines:?}"));
    assert!(line.contains("newest point's manifest"), "{line}");
    assert!(line.contains("source read from its files"), "a powered-off disk is read from its files: {line}");
    // Four 4 KiB writes in four 64 KiB clusters: that is all there is to read, out of 16 MiB.
    let read: u64 = line.split(", read ").nth(1).and_then(|r| r.split(' ').next()).unwrap().parse().unwrap();
    assert_eq!(read, 4 * 64 * 1024, "{line}");
    assert!(line.contains("sent 131072 bytes"), "only the two changed blocks travel: {line}");
    rig.assert_consistent().await;

    rig.write(0x15, 4 << 20);
    let next = rig.run().await;
    assert!(log(&rig.app, &rig.caller, next.id).await.iter().any(|l| l.contains("bitmap mode")));
    rig.assert_consistent().await;
}

/// The newest point records which bitmap tracks each disk since it (the ledger). A sound
/// bitmap of another name (a tool replaced the disk's bitmaps, a run that published nothing made
/// it) misses what changed before it existed: the disk is hash-compared, with the reason, the
/// stray removed, and the replica holds every change.
#[tokio::test]
async fn a_bitmap_that_is_not_the_recorded_one_is_not_trusted() {
    let rig = Rig::new().await;
    rig.write(0x21, 0);
    assert_eq!(rig.run().await.result, SessionResult::Success);
    let recorded = rig.points().await.last().unwrap().disks[0].tracking_bitmap.clone().expect("the ledger");
    let qemu_img = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img").args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let source = rig.source.to_string_lossy().into_owned();
    // A change the recorded bitmap holds; then the bitmaps are replaced by a sound one that
    // records only what follows.
    rig.write(0x22, 2 << 20);
    qemu_img(&["bitmap", "--remove", &source, &recorded]);
    qemu_img(&["bitmap", "--add", &source, "drover-stray"]);
    rig.write(0x23, 5 << 20);

    let s = rig.run().await;
    assert_eq!(s.result, SessionResult::Success, "{:?}", s.failure_message);
    let lines = log(&rig.app, &rig.caller, s.id).await;
    let line = lines.iter().find(|l| l.contains("hash-compare mode")).unwrap_or_else(|| panic!("{lines:?}"));
    assert!(line.contains(&format!("the bitmap recorded since the newest point: {recorded} is gone")), "{line}");
    assert!(line.contains("drover-stray"), "{line}");
    rig.assert_consistent().await;
    let info = std::process::Command::new("qemu-img").args(["info", "-U"]).arg(&rig.source).output().unwrap();
    assert!(!String::from_utf8_lossy(&info.stdout).contains("drover-stray"), "the stray bitmap is removed");

    rig.write(0x24, 7 << 20);
    let next = rig.run().await;
    assert!(log(&rig.app, &rig.caller, next.id).await.iter().any(|l| l.contains("bitmap mode")), "incremental again");
    rig.assert_consistent().await;
}

#[tokio::test]
async fn the_scheduler_runs_continuous_jobs_and_stops_when_disabled() {
    let rig = Rig::new().await;
    rig.write(0x61, 0);
    let patch = drover_engine::app::ReplicationJobPatch { schedule: Some(Schedule::Continuous), ..Default::default() };
    rig.app.replication_job_update(&rig.caller, rig.job, patch).await.unwrap();
    rig.app.engine().start().await.unwrap();
    let finished = || async {
        let (s, _) = rig
            .app
            .session_list(&rig.caller, &SessionFilter { target_id: Some(rig.job.0), limit: 100, ..Default::default() })
            .await
            .unwrap();
        s
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while finished().await.iter().filter(|s| s.result == SessionResult::Success).count() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the scheduler did not run the job twice");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Runs never overlap.
    let runs = finished().await;
    assert!(runs.iter().filter(|s| s.state != SessionState::Stopped).count() <= 1);
    // Disabled: the running one ends, nothing new starts.
    let patch = drover_engine::app::ReplicationJobPatch { enabled: Some(false), ..Default::default() };
    rig.app.replication_job_update(&rig.caller, rig.job, patch).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while finished().await.iter().any(|s| s.state != SessionState::Stopped) {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let count = finished().await.len();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(finished().await.len(), count, "a disabled job does not run");
    rig.assert_consistent().await;
    rig.app.engine().shutdown();
}

/// A real-QEMU site: the engine on a temporary database, a host with a production and a DR
/// datastore, and the boot settings of the tiny guest.
async fn qemu_site(prefix: &str) -> (Env, Host, Datastore, Datastore, VmBoot) {
    let guest = guest();
    let dir = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").unwrap();
    let driver = Arc::new(QemuDriver::new(QemuConfig::new(dir.path().join("run"))));
    let store = Store::open_sqlite(&dir.path().join("drover.db")).await.unwrap();
    let config = EngineConfig {
        heartbeat_timeout: Duration::from_secs(90),
        shutdown_timeout: Duration::from_secs(30),
        work_dir: dir.path().join("w"),
        host_paths: drover_engine::testing::host_paths(dir.path()),
        ..EngineConfig::default()
    };
    let app = App::new(Engine::new(store, driver.clone(), config));
    app.bootstrap(Some("password1".into())).await.unwrap();
    let caller = app.authenticate(&app.login("admin", "password1", None).await.unwrap().access_token).await.unwrap();
    let root = dir.path().to_path_buf();
    let site = app.site_create(&caller, "prod", SiteKind::Production).await.unwrap();
    let host = app
        .host_create(&caller, NewHost { site_id: site.id, name: "h".into(), address: "local".into() })
        .await
        .unwrap();
    let ds = |n: &str| NewDatastore { host_id: host.id, name: n.into(), path: root.join(n).to_string_lossy().into() };
    let prod = app.datastore_create(&caller, ds("prod")).await.unwrap();
    let dr = app.datastore_create(&caller, ds("dr")).await.unwrap();
    let boot = VmBoot {
        kernel: Some(guest.vmlinux.to_string_lossy().into()),
        initrd: Some(guest.initramfs.to_string_lossy().into()),
        cmdline: Some(guest.cmdline.clone()),
        firmware: Default::default(),
    };
    (Env { _dir: dir, app, caller, driver }, host, prod, dr, boot)
}

/// A power-on while another process holds the VM's disk (as an offline replication cut does)
/// waits for the disk instead of failing, and says so in the session's log.
#[tokio::test]
async fn a_power_on_waits_for_a_disk_held_by_another_process() {
    let (env, host, prod, _, boot) = qemu_site("drl").await;
    let (app, caller) = (&env.app, &env.caller);
    let new_vm = NewVm {
        name: "lk".into(),
        host_id: host.id,
        datastore_id: prod.id,
        vcpus: 1,
        memory_mib: 128,
        disks: vec![VmDisk { name: "data".into(), size_bytes: 16 << 20, import_from: None }],
        nics: vec![],
        tags: vec![],
        boot,
    };
    let (vm, s) = app.vm_create(caller, new_vm).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    let image = Path::new(&prod.path).join(vm.id.to_string()).join("data.qcow2");
    // A storage daemon with the image open for writing, for two seconds.
    // Killed when dropped, so a failing assertion does not leave it behind.
    struct Holder(std::process::Child);
    impl Drop for Holder {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut holder = Holder(
        std::process::Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!("driver=file,filename={},node-name=f", image.display()))
            .arg("--blockdev")
            .arg("driver=qcow2,file=f,node-name=d")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(holder.0.try_wait().unwrap().is_none(), "the storage daemon holds the image");
    let s = app.vm_power(caller, vm.id, PowerAction::PowerOn).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lines = log(app, caller, s).await;
    assert!(lines.iter().any(|l| l.contains("in use by another process")), "{lines:?}");
    assert_ne!(app.engine().store().session_get(None, s).await.unwrap().state, SessionState::Stopped, "still waiting");
    drop(holder);
    let done = wait(app, s).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}", done.failure_message);
    assert!(log(app, caller, s).await.iter().any(|l| l.contains("the disk was released")));
    let s = app.vm_power(caller, vm.id, PowerAction::PowerOff).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
}

#[tokio::test]
async fn failover_boots_the_replica_and_undo_discards_its_changes() {
    let (env, host, prod, dr, boot) = qemu_site("drv").await;
    let (app, caller, root) = (&env.app, &env.caller, env._dir.path().to_path_buf());
    // The guest listens on port 22, which the plan checks through the replica's NIC.
    let boot = VmBoot { cmdline: boot.cmdline.map(|c| format!("{c} drover.listen=22")), ..boot };
    let new_vm = NewVm {
        name: "app".into(),
        host_id: host.id,
        datastore_id: prod.id,
        vcpus: 1,
        memory_mib: 128,
        disks: vec![VmDisk { name: "data".into(), size_bytes: 64 << 20, import_from: None }],
        nics: vec![("lan".into(), None)],
        tags: vec!["tier:web".parse().unwrap()],
        boot,
    };
    let (vm, s) = app.vm_create(caller, new_vm).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    let job = app
        .replication_job_create(
            caller,
            NewReplicationJob {
                name: "j".into(),
                vm_ids: vec![vm.id],
                target_host_id: host.id,
                target_datastore_id: dr.id,
                schedule: Schedule::Manual,
                retention_points: 5,
                bandwidth_limit: None,
                consistency: Default::default(),
                network_mappings: Vec::new(),
            },
        )
        .await
        .unwrap();
    // Point 1: the VM booted once (its disk formatted), no marker. Point 2: with the marker.
    let s = app.vm_power(caller, vm.id, PowerAction::PowerOn).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    assert_eq!(wait(app, app.replication_job_run(caller, job.id).await.unwrap()).await.result, SessionResult::Success);
    let between = now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    env.driver.write_marker(vm.id.0, "production").await.unwrap();
    assert_eq!(wait(app, app.replication_job_run(caller, job.id).await.unwrap()).await.result, SessionResult::Success);
    let s = app.vm_power(caller, vm.id, PowerAction::PowerOff).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    let replica = app.list::<Replica>(caller).await.unwrap().pop().unwrap();
    let points_before = app.restore_points(caller, replica.id).await.unwrap();
    assert_eq!(points_before.len(), 2);

    let plan = app
        .plan_create(
            caller,
            drover_engine::app::PlanInput {
                name: "p".into(),
                description: String::new(),
                recovery_location_id: RecoveryLocationId::ORIGINAL,
                groups: vec![PlanGroup {
                    id: PlanGroupId::new(),
                    name: "web".into(),
                    mode: GroupMode::Sequential,
                    delay_secs: 0,
                    critical: true,
                    restore_tags: true,
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
                                kind: PlanStepKind::WaitHeartbeat { timeout_secs: 90 },
                                critical: true,
                            },
                            PlanStep {
                                id: PlanStepId::new(),
                                name: "ssh".into(),
                                kind: PlanStepKind::CheckTcpPort { port: 22, timeout_secs: 30 },
                                critical: true,
                            },
                        ],
                    }],
                }],
            },
        )
        .await
        .unwrap();

    // Failover to the newest point: the replica runs and sees production's marker.
    let (p, s) = app.plan_action(caller, plan.id, PlanAction::Failover, Default::default()).await.unwrap();
    assert_eq!(p.lifecycle.state, PlanState::FailoverInProgress);
    let done = wait(app, s.unwrap()).await;
    assert_eq!(
        done.result,
        SessionResult::Success,
        "{:?}: {:?}",
        done.failure_message,
        log(app, caller, done.id).await
    );
    assert_eq!(app.get::<Plan>(caller, plan.id.0).await.unwrap().lifecycle.state, PlanState::Failover);
    let r = app.get::<Replica>(caller, replica.id.0).await.unwrap();
    assert_eq!((r.state, r.failover_point_id), (ReplicaState::Failover, Some(points_before[1].id)));
    let hb = env.driver.wait_heartbeat(replica.id.0, Duration::from_secs(30)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("production"));
    assert!(log(app, caller, done.id).await.iter().any(|l| l.contains("tags tier:web")));
    assert!(log(app, caller, done.id).await.iter().any(|l| l.contains("app_replica: TCP port 22 is open")));
    // Failover again is a conflict; a replication run does not touch a failed-over replica.
    assert!(matches!(
        app.plan_action(caller, plan.id, PlanAction::Failover, Default::default()).await,
        Err(Error::Conflict(_))
    ));
    let refused = wait(app, app.replication_job_run(caller, job.id).await.unwrap()).await;
    assert_eq!(refused.result, SessionResult::Failed);
    assert!(refused.failure_message.as_deref().unwrap_or_default().contains("Failover"), "{refused:?}");
    assert_eq!(app.get::<Replica>(caller, replica.id.0).await.unwrap().state, ReplicaState::Failover);
    // The replica writes; undo throws that away and leaves the points as they were.
    env.driver.write_marker(replica.id.0, "written in the replica").await.unwrap();
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Undo, Default::default()).await.unwrap();
    let done = wait(app, s.unwrap()).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}", done.failure_message);
    assert_eq!(app.get::<Plan>(caller, plan.id.0).await.unwrap().lifecycle.state, PlanState::UndoFailover);
    assert_eq!(app.get::<Replica>(caller, replica.id.0).await.unwrap().state, ReplicaState::Ready);
    assert_eq!(env.driver.status(replica.id.0).await.unwrap(), drover_hv::PowerState::Off);
    let points_after = app.restore_points(caller, replica.id).await.unwrap();
    assert_eq!(points_after, points_before, "restore points are never written by a failover");
    let chain_dir = Path::new(&points_after[1].disks[0].file).parent().unwrap().to_path_buf();
    assert_eq!(
        std::fs::read_dir(&chain_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "qcow2"))
            .count(),
        2,
        "the overlay is gone"
    );

    // Failover to a date before point 2 boots point 1: no marker there.
    let opts = drover_engine::app::PlanActionOptions { point_date: Some(between), ..Default::default() };
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Failover, opts).await.unwrap();
    assert_eq!(wait(app, s.unwrap()).await.result, SessionResult::Success);
    assert_eq!(app.get::<Replica>(caller, replica.id.0).await.unwrap().failover_point_id, Some(points_before[0].id));
    let hb = env.driver.wait_heartbeat(replica.id.0, Duration::from_secs(30)).await.unwrap();
    assert_eq!(hb.marker, None);
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Undo, Default::default()).await.unwrap();
    assert_eq!(wait(app, s.unwrap()).await.result, SessionResult::Success);

    // A test failover boots throwaway VMs, runs the plan's steps, discards them, and touches
    // neither the plan's state nor the replica.
    let state_before = app.get::<Plan>(caller, plan.id.0).await.unwrap().lifecycle;
    let s = app.plan_test_failover(caller, plan.id, Default::default()).await.unwrap();
    let done = wait(app, s).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}", log(app, caller, s).await);
    let lines = log(app, caller, s).await;
    // The tiny guest has no guest agent: its points are crash-consistent, and the boot says so.
    assert!(
        lines.iter().any(|l| l.starts_with("test VM app_test booted from restore point 2 (crash-consistent: ")
            && l.ends_with("; no uplink)")),
        "{lines:?}"
    );
    assert!(lines.iter().any(|l| l.contains("heartbeat")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("test VM app_test: TCP port 22 is open")), "{lines:?}");
    assert_eq!(app.get::<Plan>(caller, plan.id.0).await.unwrap().lifecycle, state_before);
    assert_eq!(app.get::<Replica>(caller, replica.id.0).await.unwrap().state, ReplicaState::Ready);
    assert_eq!(
        std::fs::read_dir(&chain_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("boot-"))
            .count(),
        0
    );
    assert_eq!(app.restore_points(caller, replica.id).await.unwrap(), points_before);

    // A critical step that fails halts the plan; Undo unwinds it.
    let script = root.join("fail.sh");
    std::fs::write(&script, "#!/bin/sh\necho no >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut input_plan = app.get::<Plan>(caller, plan.id.0).await.unwrap();
    input_plan.groups[0].vms[0].steps.push(PlanStep {
        id: PlanStepId::new(),
        name: "check".into(),
        kind: PlanStepKind::RunScript { path: script.to_string_lossy().into(), args: vec![], timeout_secs: 10 },
        critical: true,
    });
    app.plan_action(caller, plan.id, PlanAction::ResetState, Default::default()).await.unwrap();
    app.plan_set_enabled(caller, plan.id, true).await.unwrap();
    app.plan_update(
        caller,
        plan.id,
        drover_engine::app::PlanInput {
            name: "p".into(),
            description: String::new(),
            recovery_location_id: RecoveryLocationId::ORIGINAL,
            groups: input_plan.groups,
        },
    )
    .await
    .unwrap();
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Failover, Default::default()).await.unwrap();
    let halted = wait(app, s.unwrap()).await;
    assert!(halted.halted, "{halted:?}");
    let p = app.get::<Plan>(caller, plan.id.0).await.unwrap();
    assert_eq!((p.lifecycle.state, p.lifecycle.interrupted), (PlanState::Halted, Some(PlanState::FailoverInProgress)));
    assert!(log(app, caller, halted.id).await.iter().any(|l| l.contains("exited with")));
    let (_, s2) = app.plan_action(caller, plan.id, PlanAction::Undo, Default::default()).await.unwrap();
    assert_eq!(s2, Some(halted.id), "undo acts on the halted session");
    let done = wait(app, halted.id).await;
    assert_eq!(done.result, SessionResult::Failed);
    assert_eq!(app.get::<Plan>(caller, plan.id.0).await.unwrap().lifecycle.state, PlanState::UndoFailover);
    assert_eq!(app.get::<Replica>(caller, replica.id.0).await.unwrap().state, ReplicaState::Ready);
    assert_eq!(env.driver.status(replica.id.0).await.unwrap(), drover_hv::PowerState::Off);
    assert_eq!(app.restore_points(caller, replica.id).await.unwrap(), points_before);
}

#[tokio::test]
async fn failback_sends_only_what_changed_then_commit_resumes_replication() {
    let (env, host, prod, dr, boot) = qemu_site("drb").await;
    let (app, caller) = (&env.app, &env.caller);
    let new_vm = NewVm {
        name: "app".into(),
        host_id: host.id,
        datastore_id: prod.id,
        vcpus: 1,
        memory_mib: 128,
        disks: vec![VmDisk { name: "data".into(), size_bytes: 64 << 20, import_from: None }],
        nics: vec![],
        tags: vec![],
        boot,
    };
    let (vm, s) = app.vm_create(caller, new_vm).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    let job = app
        .replication_job_create(
            caller,
            NewReplicationJob {
                name: "j".into(),
                vm_ids: vec![vm.id],
                target_host_id: host.id,
                target_datastore_id: dr.id,
                schedule: Schedule::Manual,
                retention_points: 5,
                bandwidth_limit: None,
                consistency: Default::default(),
                network_mappings: Vec::new(),
            },
        )
        .await
        .unwrap();
    let run = |expect: &'static str| async move {
        let s = wait(app, app.replication_job_run(caller, job.id).await.unwrap()).await;
        assert_eq!(s.result, SessionResult::Success, "{:?}", s.failure_message);
        let lines = log(app, caller, s.id).await;
        assert!(lines.iter().any(|l| l.contains(expect)), "expected {expect}: {lines:?}");
    };
    let power = |action: PowerAction| async move {
        let s = app.vm_power(caller, vm.id, action).await.unwrap();
        assert_eq!(wait(app, s).await.result, SessionResult::Success);
    };
    power(PowerAction::PowerOn).await;
    run("seed mode").await;
    env.driver.write_marker(vm.id.0, "replicated").await.unwrap();
    run("bitmap mode").await;
    // Production writes after the last point, then goes down: only its bitmap knows.
    env.driver.write_marker(vm.id.0, "lost at the disaster").await.unwrap();
    power(PowerAction::Shutdown).await;

    let step = |name: &str, kind| PlanStep { id: PlanStepId::new(), name: name.into(), kind, critical: true };
    let plan = app
        .plan_create(
            caller,
            drover_engine::app::PlanInput {
                name: "p".into(),
                description: String::new(),
                recovery_location_id: RecoveryLocationId::ORIGINAL,
                groups: vec![PlanGroup {
                    id: PlanGroupId::new(),
                    name: "g".into(),
                    mode: GroupMode::Sequential,
                    delay_secs: 0,
                    critical: true,
                    restore_tags: false,
                    vms: vec![PlanVm {
                        vm_id: vm.id,
                        steps: vec![
                            step("on", PlanStepKind::PowerOn),
                            step("hb", PlanStepKind::WaitHeartbeat { timeout_secs: 90 }),
                        ],
                    }],
                }],
            },
        )
        .await
        .unwrap();
    let act = |action: PlanAction| async move {
        let (_, s) = app.plan_action(caller, plan.id, action, Default::default()).await.unwrap();
        let done = wait(app, s.unwrap()).await;
        assert_eq!(
            done.result,
            SessionResult::Success,
            "{action:?}: {:?} {:?}",
            done.failure_message,
            log(app, caller, done.id).await
        );
        (done, app.get::<Plan>(caller, plan.id.0).await.unwrap().lifecycle.state)
    };
    let replica = || async { app.list::<Replica>(caller).await.unwrap().pop().unwrap() };

    // Fail over: the replica has the replicated marker; it writes its own.
    assert_eq!(act(PlanAction::Failover).await.1, PlanState::Failover);
    let r = replica().await;
    assert_eq!(
        env.driver.wait_heartbeat(r.id.0, Duration::from_secs(30)).await.unwrap().marker.as_deref(),
        Some("replicated")
    );
    env.driver.write_marker(r.id.0, "written in the replica").await.unwrap();

    // Fail back: production becomes the replica (its post-point write is overwritten), moving
    // only changed extents, and runs again.
    let (done, state) = act(PlanAction::FailbackToProduction).await;
    assert_eq!(state, PlanState::Failback);
    let lines = log(app, caller, done.id).await;
    assert!(lines.iter().any(|l| l.contains("synced to production by extents")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("production equals the replica")), "{lines:?}");
    let sent: u64 = lines.iter().filter_map(|l| l.split("sent ").nth(1)?.split(' ').next()?.parse::<u64>().ok()).sum();
    assert!(sent > 0 && sent < 16 << 20, "failback sent {sent} bytes of a 64 MiB disk: {lines:?}");
    assert_eq!(replica().await.state, ReplicaState::Failback);
    assert_eq!(app.get::<Vm>(caller, vm.id.0).await.unwrap().power_state, VmPowerState::Running);
    let hb = env.driver.wait_heartbeat(vm.id.0, Duration::from_secs(60)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("written in the replica"));

    // Commit: the replica is Ready, its overlay gone; replication resumes incrementally.
    assert_eq!(act(PlanAction::CommitFailback).await.1, PlanState::CommitFailback);
    let r = replica().await;
    assert_eq!((r.state, r.failover_point_id), (ReplicaState::Ready, None));
    run("bitmap mode").await;

    // Once more, and this time undo the failback: production off, the replica runs on.
    power(PowerAction::Shutdown).await;
    assert_eq!(act(PlanAction::Failover).await.1, PlanState::Failover);
    let r = replica().await;
    env.driver.write_marker(r.id.0, "second failover").await.unwrap();
    assert_eq!(act(PlanAction::FailbackToProduction).await.1, PlanState::Failback);
    assert_eq!(act(PlanAction::Undo).await.1, PlanState::Failover);
    assert_eq!(replica().await.state, ReplicaState::Failover);
    assert_eq!(app.get::<Vm>(caller, vm.id.0).await.unwrap().power_state, VmPowerState::Off);
    let hb = env.driver.wait_heartbeat(r.id.0, Duration::from_secs(60)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("second failover"));
    assert_eq!(act(PlanAction::Undo).await.1, PlanState::UndoFailover);
    assert_eq!(replica().await.state, ReplicaState::Ready);

    // Permanent failover: the replica stays up as production; failback is refused from then on.
    assert_eq!(act(PlanAction::Failover).await.1, PlanState::Failover);
    assert_eq!(act(PlanAction::PermanentFailover).await.1, PlanState::PermanentFailover);
    assert_eq!(replica().await.state, ReplicaState::PermanentFailover);
    let refused = app.plan_action(caller, plan.id, PlanAction::FailbackToProduction, Default::default()).await;
    assert!(matches!(refused, Err(Error::Conflict(_))), "{refused:?}");
    let r = replica().await;
    assert!(env.driver.wait_heartbeat(r.id.0, Duration::from_secs(30)).await.is_ok(), "the replica runs on");
}

#[tokio::test]
async fn failback_to_another_location_makes_a_new_vm_and_undo_removes_it() {
    let (env, host, prod, dr, boot) = qemu_site("drl").await;
    let (app, caller, root) = (&env.app, &env.caller, env._dir.path().to_path_buf());
    let elsewhere = app
        .datastore_create(
            caller,
            NewDatastore {
                host_id: host.id,
                name: "elsewhere".into(),
                path: root.join("elsewhere").to_string_lossy().into(),
            },
        )
        .await
        .unwrap();
    let new_vm = NewVm {
        name: "app".into(),
        host_id: host.id,
        datastore_id: prod.id,
        vcpus: 1,
        memory_mib: 128,
        disks: vec![VmDisk { name: "data".into(), size_bytes: 64 << 20, import_from: None }],
        nics: vec![("lan".into(), None)],
        tags: vec!["tier:web".parse().unwrap()],
        boot,
    };
    let (vm, s) = app.vm_create(caller, new_vm).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    let job = app
        .replication_job_create(
            caller,
            NewReplicationJob {
                name: "j".into(),
                vm_ids: vec![vm.id],
                target_host_id: host.id,
                target_datastore_id: dr.id,
                schedule: Schedule::Manual,
                retention_points: 3,
                bandwidth_limit: None,
                consistency: Default::default(),
                network_mappings: Vec::new(),
            },
        )
        .await
        .unwrap();
    let s = app.vm_power(caller, vm.id, PowerAction::PowerOn).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    assert_eq!(wait(app, app.replication_job_run(caller, job.id).await.unwrap()).await.result, SessionResult::Success);
    let s = app.vm_power(caller, vm.id, PowerAction::PowerOff).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    let loc = app
        .recovery_location_create(
            caller,
            drover_engine::app::NewRecoveryLocation {
                name: "elsewhere".into(),
                description: String::new(),
                host_id: host.id,
                datastore_id: elsewhere.id,
                network_mappings: vec![NetworkMapping { from: "lan".into(), to: "dr-lan".into() }],
            },
        )
        .await
        .unwrap();
    let step = |name: &str, kind| PlanStep { id: PlanStepId::new(), name: name.into(), kind, critical: true };
    let plan = app
        .plan_create(
            caller,
            drover_engine::app::PlanInput {
                name: "p".into(),
                description: String::new(),
                recovery_location_id: RecoveryLocationId::ORIGINAL,
                groups: vec![PlanGroup {
                    id: PlanGroupId::new(),
                    name: "g".into(),
                    mode: GroupMode::Sequential,
                    delay_secs: 0,
                    critical: true,
                    restore_tags: false,
                    vms: vec![PlanVm {
                        vm_id: vm.id,
                        steps: vec![
                            step("on", PlanStepKind::PowerOn),
                            step("hb", PlanStepKind::WaitHeartbeat { timeout_secs: 90 }),
                        ],
                    }],
                }],
            },
        )
        .await
        .unwrap();
    let act = |action: PlanAction, opts: drover_engine::app::PlanActionOptions| async move {
        let (_, s) = app.plan_action(caller, plan.id, action, opts).await.unwrap();
        let done = wait(app, s.unwrap()).await;
        assert_eq!(
            done.result,
            SessionResult::Success,
            "{action:?}: {:?} {:?}",
            done.failure_message,
            log(app, caller, done.id).await
        );
        app.get::<Plan>(caller, plan.id.0).await.unwrap().lifecycle.state
    };
    let to_location = || drover_engine::app::PlanActionOptions {
        recovery_location_id: Some(loc.id),
        restore_tags: true,
        ..Default::default()
    };
    let restored = || async { app.list::<Vm>(caller).await.unwrap().into_iter().find(|v| v.name == "app_restored") };

    assert_eq!(act(PlanAction::Failover, Default::default()).await, PlanState::Failover);
    let replica = app.list::<Replica>(caller).await.unwrap().pop().unwrap();
    env.driver.write_marker(replica.id.0, "at DR").await.unwrap();

    // Fail back to the other location: a new VM there, a copy of the replica, with the tags and
    // mapped networks; the original VM is not touched.
    assert_eq!(act(PlanAction::FailbackToProduction, to_location()).await, PlanState::Failback);
    let new = restored().await.expect("a new VM at the location");
    assert_eq!((new.datastore_id, new.power_state, new.provisioned), (elsewhere.id, VmPowerState::Running, true));
    assert_eq!(new.tags, vec!["tier:web".parse::<Tag>().unwrap()]);
    assert_eq!(new.nics[0].network, "dr-lan");
    assert_ne!(new.nics[0].mac, vm.nics[0].mac);
    let hb = env.driver.wait_heartbeat(new.id.0, Duration::from_secs(60)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("at DR"));
    assert_eq!(app.get::<Vm>(caller, vm.id.0).await.unwrap().power_state, VmPowerState::Off);

    // Undo: the new VM and its disks go; the replica runs again with its data.
    assert_eq!(act(PlanAction::Undo, Default::default()).await, PlanState::Failover);
    assert!(restored().await.is_none());
    assert!(!root.join("elsewhere").join(new.id.to_string()).exists());
    let hb = env.driver.wait_heartbeat(replica.id.0, Duration::from_secs(60)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("at DR"));

    // Again, and commit: the new VM stays, the replica is Ready.
    assert_eq!(act(PlanAction::FailbackToProduction, to_location()).await, PlanState::Failback);
    assert_eq!(act(PlanAction::CommitFailback, Default::default()).await, PlanState::CommitFailback);
    let committed = app.get::<Replica>(caller, replica.id.0).await.unwrap();
    assert_eq!(committed.state, ReplicaState::Ready);
    let new = restored().await.expect("the new VM stays");

    // The new VM takes the original's place: in the job, in the plan, as the replica's source.
    assert_eq!((committed.source_vm_id, committed.replaced_source_vm_id), (new.id, Some(vm.id)));
    assert_eq!(app.get::<ReplicationJob>(caller, job.id.0).await.unwrap().vm_ids, vec![new.id]);
    let plan_vms: Vec<VmId> =
        app.get::<Plan>(caller, plan.id.0).await.unwrap().groups[0].vms.iter().map(|v| v.vm_id).collect();
    assert_eq!(plan_vms, vec![new.id]);
    // Nothing refers to the original VM any more: it can go.
    let s = app.vm_delete(caller, vm.id).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
    assert!(app.get::<Vm>(caller, vm.id.0).await.is_err());
    // Replication goes on from it into the same chain: the first run has no bitmap to trust and
    // compares against the newest point's manifest; the next is incremental.
    let points_before = app.restore_points(caller, replica.id).await.unwrap().len();
    let s = wait(app, app.replication_job_run(caller, job.id).await.unwrap()).await;
    assert_eq!(s.result, SessionResult::Success, "{:?}", s.failure_message);
    let lines = log(app, caller, s.id).await;
    assert!(lines.iter().any(|l| l.contains("hash-compare mode") && l.contains("manifest")), "{lines:?}");
    assert_eq!(app.list::<Replica>(caller).await.unwrap().len(), 1, "no new replica: the same chain goes on");
    let points = app.restore_points(caller, replica.id).await.unwrap();
    assert_eq!(points.len(), points_before + 1, "a new point in the same chain");
    let s = wait(app, app.replication_job_run(caller, job.id).await.unwrap()).await;
    assert_eq!(s.result, SessionResult::Success, "{:?}", s.failure_message);
    assert!(log(app, caller, s.id).await.iter().any(|l| l.contains("bitmap mode")));
    let s = app.vm_power(caller, new.id, PowerAction::PowerOff).await.unwrap();
    assert_eq!(wait(app, s).await.result, SessionResult::Success);
}
