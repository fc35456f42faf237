//! Saga tests against a real store and real qcow2 images, with the simulated hypervisor (a test
//! double: no QEMU process). Every VM saga is run with each step twice, with a failure injected
//! at each step, and with a crash after each step followed by recovery in a fresh engine.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_engine::app::{App, Caller, NewDatastore, NewVm, PowerAction};
use drover_engine::saga::{ContinueOption, FailurePolicy, Saga, SagaStep, Step, StepCtx};
use drover_engine::{Engine, EngineConfig};
use drover_hv::sim::SimulatedHypervisor;
use drover_store::Store;
use drover_types::*;
use serde_json::Value;

struct Env {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    ds_path: std::path::PathBuf,
    hv: Arc<SimulatedHypervisor>,
    app: App,
    caller: Caller,
    host: HostId,
    ds: DatastoreId,
}

fn config(root: &std::path::Path) -> EngineConfig {
    drover_engine::testing::fast_config(root)
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("drover.db");
    let hv = Arc::new(SimulatedHypervisor::new());
    let store = Store::open_sqlite(&db).await.unwrap();
    let app = App::new(Engine::new(store, hv.clone(), config(dir.path())));
    app.bootstrap(Some("adminpass".into())).await.unwrap();
    let tokens = app.login("admin", "adminpass", None).await.unwrap();
    let caller = app.authenticate(&tokens.access_token).await.unwrap();
    let (host, datastores) = drover_engine::testing::infrastructure(&app, &caller, dir.path(), &["ds1"]).await;
    let (ds, ds_path) = datastores[0].clone();
    Env { db, ds_path, hv, app, caller, host, ds, _dir: dir }
}

impl Env {
    /// A second engine over the same database: what a restarted `drover serve` is.
    async fn restart(&mut self) {
        self.app.engine().shutdown();
        let store = Store::open_sqlite(&self.db).await.unwrap();
        self.app = App::new(Engine::new(store, self.hv.clone(), config(self._dir.path())));
    }

    fn new_vm(&self, name: &str) -> NewVm {
        NewVm {
            name: name.into(),
            host_id: self.host,
            datastore_id: self.ds,
            vcpus: 1,
            memory_mib: 96,
            disks: vec![VmDisk { name: "data".into(), size_bytes: 64 << 20, import_from: None }],
            nics: vec![("lan".into(), None)],
            tags: vec!["env:test".parse().unwrap()],
            boot: VmBoot { kernel: None, initrd: None, cmdline: None, firmware: Default::default() },
        }
    }

    async fn wait(&self, id: SessionId) -> Session {
        self.app.engine().wait(id, Duration::from_secs(20)).await.unwrap()
    }

    async fn vm(&self, id: VmId) -> Option<Vm> {
        match self.app.get::<Vm>(&self.caller, id.0).await {
            Ok(vm) => Some(vm),
            Err(Error::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    }

    /// Creates a VM and waits for its disks.
    async fn provisioned_vm(&self, name: &str) -> Vm {
        let (vm, s) = self.app.vm_create(&self.caller, self.new_vm(name)).await.unwrap();
        assert_eq!(self.wait(s).await.result, SessionResult::Success);
        self.vm(vm.id).await.unwrap()
    }

    async fn steps(&self, s: SessionId) -> Vec<StepRecord> {
        self.app.engine().store().steps_of(s).await.unwrap()
    }
}

/// Checks what every finished session record must satisfy.
async fn assert_consistent(env: &Env, s: &Session) {
    let (session, tasks) = env.app.session_get(&env.caller, s.id).await.unwrap();
    assert_eq!(session.state, SessionState::Stopped);
    assert_ne!(session.result, SessionResult::None);
    assert!(session.ended_at.is_some());
    assert!(!session.halted);
    for t in &tasks {
        assert_eq!(t.state, SessionState::Stopped, "task {} not stopped", t.name);
        assert_ne!(t.result, SessionResult::None);
    }
    if session.result == SessionResult::Success {
        assert_eq!(session.progress, 100);
        assert!(tasks.iter().all(|t| t.progress == 100 && t.result == SessionResult::Success));
        assert!(env.steps(s.id).await.iter().all(|r| r.state == StepState::Done));
    } else {
        assert!(session.failure_message.is_some());
    }
    let log = env.app.session_log(&env.caller, s.id, 0, 1000).await.unwrap();
    assert!(log.len() >= 2, "a session logs at least its start and end");
    assert!(log.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
}

#[tokio::test]
async fn vm_lifecycle_records_every_session() {
    let env = env().await;
    let vm = env.provisioned_vm("web").await;
    assert!(vm.provisioned);
    assert!(env.ds_path.join(vm.id.to_string()).join("data.qcow2").is_file());

    env.hv.set_guest_addresses(vm.id.0, vec!["10.0.2.15".into()]);
    let s = env.app.vm_power(&env.caller, vm.id, PowerAction::PowerOn).await.unwrap();
    // The state moved before the call returned, so a second request is refused.
    let again = env.app.vm_power(&env.caller, vm.id, PowerAction::PowerOn).await.unwrap_err();
    assert!(matches!(again, Error::Conflict(_)), "{again:?}");
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}", done.failure_message);
    assert_consistent(&env, &done).await;
    assert_eq!(env.vm(vm.id).await.unwrap().power_state, VmPowerState::Running);
    assert_eq!(env.vm(vm.id).await.unwrap().guest_addresses, ["10.0.2.15"], "the heartbeat's addresses are the VM's");

    let s = env.app.vm_power(&env.caller, vm.id, PowerAction::Shutdown).await.unwrap();
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Success);
    assert_eq!(env.vm(vm.id).await.unwrap().power_state, VmPowerState::Off);

    let s = env.app.vm_delete(&env.caller, vm.id).await.unwrap();
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}", done.failure_message);
    assert!(env.vm(vm.id).await.is_none());
    assert!(!env.ds_path.join(vm.id.to_string()).exists());
}

/// The steps of each VM saga, in order, for the loops below.
const CREATE_STEPS: [&str; 3] = ["reserve", "create_disks", "mark_provisioned"];
const POWER_ON_STEPS: [&str; 4] = ["begin", "power_on", "wait_heartbeat", "mark_state"];
const SHUTDOWN_STEPS: [&str; 3] = ["begin", "shutdown_guest", "mark_state"];
const POWER_OFF_STEPS: [&str; 3] = ["begin", "power_off", "mark_state"];

#[tokio::test]
async fn every_step_is_idempotent() {
    let env = env().await;
    env.app.engine().hooks().run_each_step_twice.store(true, std::sync::atomic::Ordering::Relaxed);
    let vm = env.provisioned_vm("twice").await;
    for action in [PowerAction::PowerOn, PowerAction::Shutdown, PowerAction::PowerOn, PowerAction::PowerOff] {
        let s = env.app.vm_power(&env.caller, vm.id, action).await.unwrap();
        let done = env.wait(s).await;
        assert_eq!(done.result, SessionResult::Success, "{action:?}: {:?}", done.failure_message);
        assert_consistent(&env, &done).await;
    }
    let s = env.app.vm_delete(&env.caller, vm.id).await.unwrap();
    assert_eq!(env.wait(s).await.result, SessionResult::Success);
    assert!(env.vm(vm.id).await.is_none());
}

#[tokio::test]
async fn a_failure_at_any_create_step_unwinds_completely() {
    let env = env().await;
    for step in CREATE_STEPS {
        env.app.engine().hooks().fail(step, 1);
        let (vm, s) = env.app.vm_create(&env.caller, env.new_vm(&format!("fail-{step}"))).await.unwrap();
        let done = env.wait(s).await;
        assert_eq!(done.result, SessionResult::Failed, "failure in {step}");
        assert!(done.failure_message.as_deref().unwrap().contains(step));
        assert_consistent(&env, &done).await;
        // Nothing is left: no record, no disk directory.
        assert!(env.vm(vm.id).await.is_none(), "{step}: VM record left behind");
        assert!(!env.ds_path.join(vm.id.to_string()).exists(), "{step}: disks left behind");
        let states: Vec<_> = env.steps(s).await.iter().map(|r| r.state).collect();
        assert!(states.iter().all(|s| matches!(s, StepState::Undone | StepState::Pending)), "{step}: {states:?}");
    }
}

#[tokio::test]
async fn a_failure_at_any_power_step_leaves_the_true_state() {
    let env = env().await;
    let vm = env.provisioned_vm("p").await;
    for step in POWER_ON_STEPS {
        env.app.engine().hooks().fail(step, 1);
        let s = env.app.vm_power(&env.caller, vm.id, PowerAction::PowerOn).await.unwrap();
        let done = env.wait(s).await;
        assert_eq!(done.result, SessionResult::Failed, "failure in {step}");
        assert_consistent(&env, &done).await;
        // The power-on was undone: the VM is off, and the hypervisor agrees.
        assert_eq!(env.vm(vm.id).await.unwrap().power_state, VmPowerState::Off, "after failing {step}");
        assert_eq!(env.hv.status(vm.id.0).await.unwrap_or(drover_hv::PowerState::Off), drover_hv::PowerState::Off);
    }
    env.app.engine().hooks().fail("none", 1);
    let s = env.app.vm_power(&env.caller, vm.id, PowerAction::PowerOn).await.unwrap();
    assert_eq!(env.wait(s).await.result, SessionResult::Success);
    let stops = SHUTDOWN_STEPS
        .map(|s| (s, PowerAction::Shutdown))
        .into_iter()
        .chain(POWER_OFF_STEPS.map(|s| (s, PowerAction::PowerOff)));
    for (step, action) in stops {
        env.app.engine().hooks().fail(step, 1);
        let s = env.app.vm_power(&env.caller, vm.id, action).await.unwrap();
        let done = env.wait(s).await;
        assert_eq!(done.result, SessionResult::Failed, "failure in {step}");
        assert_consistent(&env, &done).await;
        let observed = env.hv.status(vm.id.0).await.unwrap();
        let recorded = env.vm(vm.id).await.unwrap().power_state;
        let expected =
            if observed == drover_hv::PowerState::Running { VmPowerState::Running } else { VmPowerState::Off };
        assert_eq!(recorded, expected, "after failing {step}: recorded state disagrees with the hypervisor");
        if recorded == VmPowerState::Off {
            env.app.engine().hooks().fail("none", 1);
            let s = env.app.vm_power(&env.caller, vm.id, PowerAction::PowerOn).await.unwrap();
            assert_eq!(env.wait(s).await.result, SessionResult::Success);
        }
    }
}

use drover_hv::Hypervisor as _;

#[tokio::test]
async fn a_crash_after_any_step_is_resumed_by_the_next_engine() {
    let mut env = env().await;
    let vm = env.provisioned_vm("crashy").await;
    for step in POWER_ON_STEPS {
        env.app.engine().hooks().crash_after(step);
        let s = env.app.vm_power(&env.caller, vm.id, PowerAction::PowerOn).await.unwrap();
        // The runner stops as a killed process would: the session is left unfinished.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mid = env.app.engine().store().session_get(None, s).await.unwrap();
        assert_ne!(mid.state, SessionState::Stopped, "crash after {step} should leave the session unfinished");
        env.restart().await;
        env.app.engine().start().await.unwrap();
        let done = env.wait(s).await;
        assert_eq!(done.result, SessionResult::Success, "resume after crash in {step}: {:?}", done.failure_message);
        assert_consistent(&env, &done).await;
        let log = env.app.session_log(&env.caller, s, 0, 100).await.unwrap();
        assert!(log.iter().any(|e| e.message.contains("resumed after a restart")));
        assert_eq!(env.vm(vm.id).await.unwrap().power_state, VmPowerState::Running);
        let s = env.app.vm_power(&env.caller, vm.id, PowerAction::PowerOff).await.unwrap();
        assert_eq!(env.wait(s).await.result, SessionResult::Success);
    }
    // A crash during an unwind: the next engine finishes the unwind.
    env.app.engine().hooks().fail("wait_heartbeat", 1);
    env.app.engine().hooks().crash_after("undo:power_on");
    let s = env.app.vm_power(&env.caller, vm.id, PowerAction::PowerOn).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.restart().await;
    env.app.engine().start().await.unwrap();
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Failed);
    assert_consistent(&env, &done).await;
    assert_eq!(env.vm(vm.id).await.unwrap().power_state, VmPowerState::Off);
}

#[tokio::test]
async fn the_monitor_notices_a_vm_that_died() {
    let env = env().await;
    env.app.engine().start().await.unwrap();
    let vm = env.provisioned_vm("fragile").await;
    let s = env.app.vm_power(&env.caller, vm.id, PowerAction::PowerOn).await.unwrap();
    assert_eq!(env.wait(s).await.result, SessionResult::Success);
    assert!(env.hv.crash(vm.id.0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if env.vm(vm.id).await.unwrap().power_state == VmPowerState::Died {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "monitor did not record the death");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A died VM can be powered on again.
    let s = env.app.vm_power(&env.caller, vm.id, PowerAction::PowerOn).await.unwrap();
    assert_eq!(env.wait(s).await.result, SessionResult::Success);
}

/// A step that counts its runs and undos, for the halt and continue tests.
struct Counting {
    name: String,
    runs: Arc<std::sync::atomic::AtomicU32>,
    undos: Arc<std::sync::atomic::AtomicU32>,
    pause: Duration,
}

#[async_trait]
impl Step for Counting {
    fn name(&self) -> String {
        self.name.clone()
    }
    async fn run(&self, _: &StepCtx) -> drover_types::Result<Value> {
        tokio::time::sleep(self.pause).await;
        self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> drover_types::Result<()> {
        self.undos.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

type Counter = Arc<std::sync::atomic::AtomicU32>;

/// Registers, for a kind no product saga uses yet, two groups of two steps under the halt policy.
fn install_halting_saga(env: &Env, pause: Duration) -> (Counter, Counter) {
    let runs: Counter = Default::default();
    let undos: Counter = Default::default();
    let (r, u) = (runs.clone(), undos.clone());
    env.app.engine().register_saga(
        SessionKind::PlanTestFailover,
        Arc::new(move |_, _| {
            let step = |task: usize, n: &str| SagaStep {
                task: Some(0),
                group: Some(task as u32),
                weight: 1,
                critical: true,
                step: Box::new(Counting { name: n.into(), runs: r.clone(), undos: u.clone(), pause }),
            };
            Ok(Saga {
                steps: vec![step(0, "a1"), step(0, "a2"), step(1, "b1"), step(1, "b2")],
                on_failure: FailurePolicy::Halt,
                on_halt: None,
                parallel: Default::default(),
            })
        }),
    );
    (runs, undos)
}

async fn start_test_session(env: &Env) -> SessionId {
    start_session_with_tasks(env, 1).await
}

#[tokio::test]
async fn halt_on_failure_then_retry_or_skip() {
    let env = env().await;
    let (runs, _) = install_halting_saga(&env, Duration::ZERO);

    // Retry: the failed step runs again and the session succeeds.
    env.app.engine().hooks().fail("a2", 1);
    let s = start_test_session(&env).await;
    let halted = env.wait(s).await;
    assert!(halted.halted && halted.state == SessionState::Working, "{halted:?}");
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    env.app.session_continue(&env.caller, s, ContinueOption::RetryFailedStep).await.unwrap();
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Success);
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 4);

    // Proceed to the next group: the rest of group 0 is skipped, group 1 runs, result Warning.
    runs.store(0, std::sync::atomic::Ordering::SeqCst);
    env.app.engine().hooks().fail("a1", 1);
    let s = start_test_session(&env).await;
    assert!(env.wait(s).await.halted);
    env.app.session_continue(&env.caller, s, ContinueOption::ProceedToNextGroup).await.unwrap();
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Warning);
    let states: Vec<_> = env.steps(s).await.iter().map(|r| (r.name.clone(), r.state)).collect();
    assert_eq!(
        states,
        vec![
            ("a1".into(), StepState::Skipped),
            ("a2".into(), StepState::Skipped),
            ("b1".into(), StepState::Done),
            ("b2".into(), StepState::Done)
        ]
    );
    // Continue on a session that is not halted is a conflict.
    let err = env.app.session_continue(&env.caller, s, ContinueOption::RetryFailedStep).await.unwrap_err();
    assert!(matches!(err, Error::Conflict(_)));
}

#[tokio::test]
async fn halt_on_request_lets_the_running_step_finish_then_undo_unwinds() {
    let env = env().await;
    let (runs, undos) = install_halting_saga(&env, Duration::from_millis(300));
    let s = start_test_session(&env).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    env.app.session_halt(&env.caller, s).await.unwrap();
    let halted = env.wait(s).await;
    assert!(halted.halted);
    // The step that was running when the halt came finished; nothing after it started.
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    let states: Vec<_> = env.steps(s).await.iter().map(|r| r.state).collect();
    // Steps that never started have no record yet.
    assert_eq!(states, vec![StepState::Done]);
    // Undo unwinds what ran.
    env.app.session_undo(&env.caller, s).await.unwrap();
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Failed);
    assert_eq!(undos.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_consistent(&env, &done).await;
}

#[tokio::test]
async fn a_halted_session_stays_halted_across_a_restart() {
    let mut env = env().await;
    install_halting_saga(&env, Duration::ZERO);
    env.app.engine().hooks().fail("b1", 1);
    let s = start_test_session(&env).await;
    assert!(env.wait(s).await.halted);
    env.restart().await;
    let (runs, _) = install_halting_saga(&env, Duration::ZERO);
    env.app.engine().start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 0, "a halted session must wait for Continue");
    env.app.session_continue(&env.caller, s, ContinueOption::RetryFailedStep).await.unwrap();
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Success);
    // Only the failed step and the one after it ran in the new engine.
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
}

const DELETE_STEPS: [&str; 5] = ["power_off", "check_unreferenced", "forget_runtime", "delete_disks", "remove_record"];

#[tokio::test]
async fn a_failure_at_any_delete_step_fails_clearly_and_a_retry_finishes() {
    let env = env().await;
    for step in DELETE_STEPS {
        let vm = env.provisioned_vm(&format!("del-{step}")).await;
        env.app.engine().hooks().fail(step, 1);
        let s = env.app.vm_delete(&env.caller, vm.id).await.unwrap();
        let done = env.wait(s).await;
        assert_eq!(done.result, SessionResult::Failed, "failure in {step}");
        assert_consistent(&env, &done).await;
        // Deleting is not undone, but the record goes last: it is still there, and a second
        // delete finishes the job and leaves no disk behind.
        let left = env.vm(vm.id).await.expect("the record outlives a failed delete");
        let dir = env.ds_path.join(vm.id.to_string());
        assert!(left.provisioned || dir.exists() || step == "remove_record", "{step}");
        env.app.engine().hooks().fail("none", 1);
        let s = env.app.vm_delete(&env.caller, vm.id).await.unwrap();
        assert_eq!(env.wait(s).await.result, SessionResult::Success, "retry after {step}");
        assert!(env.vm(vm.id).await.is_none());
        assert!(!dir.exists(), "{step}: disks left behind");
    }
}

async fn plan_with(env: &Env, vms: &[VmId]) -> Plan {
    let groups = vec![PlanGroup {
        id: PlanGroupId::new(),
        name: "g".into(),
        mode: GroupMode::Sequential,
        delay_secs: 0,
        critical: true,
        restore_tags: false,
        vms: vms.iter().map(|v| PlanVm { vm_id: *v, steps: vec![] }).collect(),
    }];
    env.app
        .plan_create(
            &env.caller,
            drover_engine::app::PlanInput {
                name: format!("plan-{}", uuid::Uuid::new_v4()),
                description: String::new(),
                recovery_location_id: RecoveryLocationId::ORIGINAL,
                groups,
            },
        )
        .await
        .unwrap()
}

async fn readiness(env: &Env, plan: &Plan) -> (Session, Plan) {
    let (_, session) =
        env.app.plan_action(&env.caller, plan.id, PlanAction::ReadinessCheck, Default::default()).await.unwrap();
    let s = env.wait(session.expect("the check runs as a session")).await;
    let p = env.app.get::<Plan>(&env.caller, plan.id.0).await.unwrap();
    (s, p)
}

#[tokio::test]
async fn the_readiness_check_saga_twice_and_with_failures() {
    let env = env().await;
    let a = env.provisioned_vm("a").await;
    let b = env.provisioned_vm("b").await;
    let plan = plan_with(&env, &[a.id, b.id]).await;

    env.app.engine().hooks().run_each_step_twice.store(true, std::sync::atomic::Ordering::Relaxed);
    let (s, p) = readiness(&env, &plan).await;
    assert_eq!(s.result, SessionResult::Success);
    assert_consistent(&env, &s).await;
    // No replicas exist yet: the check passes as a session and finds the plan not verified.
    assert_eq!(p.lifecycle.state, PlanState::NotVerified);
    env.app.engine().hooks().run_each_step_twice.store(false, std::sync::atomic::Ordering::Relaxed);

    for step in ["begin", "check_vm:0", "check_vm:1", "conclude"] {
        env.app.engine().hooks().fail(step, 1);
        let (s, p) = readiness(&env, &plan).await;
        assert_eq!(s.result, SessionResult::Failed, "failure in {step}");
        assert_consistent(&env, &s).await;
        // Never left busy: a failed check lands in NotVerified.
        assert_eq!(p.lifecycle.state, PlanState::NotVerified, "after failing {step}");
    }
}

#[tokio::test]
async fn an_imported_disk_is_a_copy_of_its_source() {
    let env = env().await;
    let source = env.ds_path.join("source.qcow2");
    drover_qemu::image::create_qcow2(&source, 8 << 20).await.unwrap();
    let mut new = env.new_vm("imported");
    new.disks = vec![VmDisk { name: "boot".into(), size_bytes: 0, import_from: Some(source.to_string_lossy().into()) }];
    let (vm, s) = env.app.vm_create(&env.caller, new).await.unwrap();
    assert_eq!(env.wait(s).await.result, SessionResult::Success);
    let copy = env.ds_path.join(vm.id.to_string()).join("boot.qcow2");
    assert!(drover_qemu::image::compare(&source, &copy).await.unwrap());
    assert!(source.is_file(), "the source is copied, never moved");
    let info = drover_qemu::image::info(&copy).await.unwrap();
    assert_eq!((info.format.as_str(), info.virtual_size), ("qcow2", 8 << 20));
}

/// A step that records when it starts and ends, and how many of its kind run at once.
struct Tracked {
    name: String,
    pause: Duration,
    in_flight: Counter,
    peak: Counter,
    events: Arc<std::sync::Mutex<Vec<String>>>,
}

#[async_trait]
impl Step for Tracked {
    fn name(&self) -> String {
        self.name.clone()
    }
    async fn run(&self, _: &StepCtx) -> drover_types::Result<Value> {
        use std::sync::atomic::Ordering::SeqCst;
        let now = self.in_flight.fetch_add(1, SeqCst) + 1;
        self.peak.fetch_max(now, SeqCst);
        self.events.lock().unwrap().push(format!("start {}", self.name));
        tokio::time::sleep(self.pause).await;
        self.events.lock().unwrap().push(format!("end {}", self.name));
        self.in_flight.fetch_sub(1, SeqCst);
        Ok(Value::Null)
    }
    async fn undo(&self, _: &StepCtx, _: &Value) -> drover_types::Result<()> {
        Ok(())
    }
}

/// A plan-like saga: a parallel group of three tasks (two steps each, at most `max` tasks at
/// once), then a step of its own.
fn install_parallel_saga(env: &Env, max: usize) -> (Counter, Arc<std::sync::Mutex<Vec<String>>>) {
    let peak: Counter = Default::default();
    let events: Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let in_flight: Counter = Default::default();
    let (p, e) = (peak.clone(), events.clone());
    env.app.engine().register_saga(
        SessionKind::PlanTestFailover,
        Arc::new(move |_, _| {
            let step = |task: Option<usize>, group: u32, n: String| SagaStep {
                task,
                group: Some(group),
                weight: 1,
                critical: true,
                step: Box::new(Tracked {
                    name: n,
                    pause: Duration::from_millis(150),
                    in_flight: in_flight.clone(),
                    peak: p.clone(),
                    events: e.clone(),
                }),
            };
            let mut steps = Vec::new();
            for t in 0..3 {
                for k in 0..2 {
                    steps.push(step(Some(t), 0, format!("vm{t}.{k}")));
                }
            }
            steps.push(step(None, 1, "after".into()));
            Ok(Saga {
                steps,
                on_failure: FailurePolicy::Halt,
                on_halt: None,
                parallel: [(0, max)].into_iter().collect(),
            })
        }),
    );
    (peak, events)
}

async fn start_session_with_tasks(env: &Env, n: usize) -> SessionId {
    let session = Session::new(
        env.caller.tenant_id,
        SessionKind::PlanTestFailover,
        "test",
        SessionTarget::Plan(PlanId::new()),
        serde_json::json!({}),
    );
    let tasks = (0..n).map(|i| session.task(None, format!("t{i}"))).collect();
    env.app.engine().submit(session, tasks).await.unwrap()
}

#[tokio::test]
async fn a_parallel_group_runs_up_to_its_maximum_of_vms_at_once() {
    let env = env().await;
    let (peak, events) = install_parallel_saga(&env, 2);
    let s = start_session_with_tasks(&env, 3).await;
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Success, "{done:?}");
    assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 2, "two VMs at once, never three");
    let events = events.lock().unwrap().clone();
    let at = |e: &str| events.iter().position(|x| x == e).unwrap_or_else(|| panic!("{e} in {events:?}"));
    for t in 0..3 {
        assert!(at(&format!("end vm{t}.0")) < at(&format!("start vm{t}.1")), "a VM's steps in order: {events:?}");
    }
    // The first two VMs started together; the third waited for one of them to finish.
    assert!(at("start vm1.0") < at("end vm0.0"), "{events:?}");
    assert!(at("start vm2.0") > at("end vm0.1").min(at("end vm1.1")), "{events:?}");
    // The step after the group waited for the whole group.
    assert!(events.iter().take(events.len() - 2).all(|e| !e.contains("after")), "{events:?}");
    assert_eq!(&events[events.len() - 2..], ["start after", "end after"]);
    assert!(env.app.engine().store().tasks_of(s).await.unwrap().iter().all(|t| t.result == SessionResult::Success));
    assert_consistent(&env, &done).await;

    // Sequential is the same block with a maximum of one.
    let env = self::env().await;
    let (peak, _) = install_parallel_saga(&env, 1);
    let s = start_session_with_tasks(&env, 3).await;
    assert_eq!(env.wait(s).await.result, SessionResult::Success);
    assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failure_in_a_parallel_group_lets_the_others_finish_their_step_then_halts() {
    let env = env().await;
    let (_, events) = install_parallel_saga(&env, 3);
    env.app.engine().hooks().fail("vm1.0", 1);
    let s = start_session_with_tasks(&env, 3).await;
    let halted = env.wait(s).await;
    assert!(halted.halted, "{halted:?}");
    assert!(halted.failure_message.as_deref().unwrap_or_default().contains("vm1.0"), "{halted:?}");
    let records = env.steps(s).await;
    let state = |n: &str| records.iter().find(|r| r.name == n).map(|r| r.state);
    // vm0 was running its first step when vm1 failed: it finished, and nothing new began (vm2
    // either had started its first step too, and finished it, or never started).
    assert_eq!(state("vm0.0"), Some(StepState::Done));
    assert!(matches!(state("vm2.0"), None | Some(StepState::Pending | StepState::Done)), "{records:?}");
    assert_eq!(state("vm1.0"), Some(StepState::Failed));
    for n in ["vm0.1", "vm1.1", "vm2.1", "after"] {
        assert!(matches!(state(n), None | Some(StepState::Pending)), "{n}: {records:?}");
    }
    assert!(!events.lock().unwrap().iter().any(|e| e == "start after"));

    env.app.session_continue(&env.caller, s, ContinueOption::RetryFailedStep).await.unwrap();
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Success, "{done:?}");
    let events = events.lock().unwrap().clone();
    assert_eq!(events.iter().filter(|e| *e == "start vm0.0").count(), 1, "done steps do not run again: {events:?}");
    assert_consistent(&env, &done).await;
}

/// A VM with a replica and one published restore point, made by hand (the simulated hypervisor
/// cannot replicate): a real qcow2 file in a chain directory, so failover's boot overlay works.
async fn replicated_vm(env: &Env, name: &str, cmdline: &str) -> (Vm, Replica) {
    let mut new = env.new_vm(name);
    new.boot.cmdline = Some(cmdline.into());
    replicated(env, new).await
}

/// `new` created, in a replication job to a datastore `dr` of the same host, with one point.
async fn replicated(env: &Env, new: NewVm) -> (Vm, Replica) {
    let name = new.name.clone();
    let name = name.as_str();
    let (vm, s) = env.app.vm_create(&env.caller, new).await.unwrap();
    assert_eq!(env.wait(s).await.result, SessionResult::Success);
    let dr_path = env.ds_path.with_file_name("dr");
    let dr = env
        .app
        .datastore_create(
            &env.caller,
            NewDatastore { host_id: env.host, name: "dr".into(), path: dr_path.to_string_lossy().into() },
        )
        .await
        .unwrap();
    let job = env
        .app
        .replication_job_create(
            &env.caller,
            drover_engine::app::NewReplicationJob {
                name: format!("{name}-job"),
                vm_ids: vec![vm.id],
                target_host_id: env.host,
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
    let (replica, _) = drover_engine::testing::replica_with_point(
        env.app.engine().store(),
        env.caller.tenant_id,
        job.id,
        (vm.id, name),
        dr.id,
        &dr_path,
    )
    .await;
    (env.vm(vm.id).await.unwrap(), replica)
}

fn port_check_groups(vm: VmId, port: u16, timeout_secs: u32) -> Vec<PlanGroup> {
    let step = |name: &str, kind| PlanStep { id: PlanStepId::new(), name: name.into(), kind, critical: true };
    vec![PlanGroup {
        id: PlanGroupId::new(),
        name: "g".into(),
        mode: GroupMode::Sequential,
        delay_secs: 0,
        critical: true,
        restore_tags: false,
        vms: vec![PlanVm {
            vm_id: vm,
            steps: vec![
                step("on", PlanStepKind::PowerOn),
                step("port", PlanStepKind::CheckTcpPort { port, timeout_secs }),
            ],
        }],
    }]
}

async fn log_lines(env: &Env, s: SessionId) -> Vec<String> {
    env.app.session_log(&env.caller, s, 0, 1000).await.unwrap().into_iter().map(|e| e.message).collect()
}

/// `CheckTcpPort` asks the hypervisor about the VM being started (the replica, or the test VM):
/// an open port passes; a closed one halts a failover and fails a test failover, naming the VM,
/// the port and the timeout. The guest listens where its kernel command line says, as the tiny
/// guest does.
#[tokio::test]
async fn a_check_tcp_port_step_passes_when_open_and_halts_when_closed() {
    let env = env().await;
    let (vm, replica) = replicated_vm(&env, "web", "console=ttyS0 drover.listen=22").await;
    let (app, caller) = (&env.app, &env.caller);
    let input = |port| drover_engine::app::PlanInput {
        name: "ports".into(),
        description: String::new(),
        recovery_location_id: RecoveryLocationId::ORIGINAL,
        groups: port_check_groups(vm.id, port, 1),
    };
    let plan = app.plan_create(caller, input(22)).await.unwrap();

    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Failover, Default::default()).await.unwrap();
    let done = env.wait(s.unwrap()).await;
    let lines = log_lines(&env, done.id).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}: {lines:?}", done.failure_message);
    assert!(lines.iter().any(|l| l.contains("web_replica: TCP port 22 is open")), "{lines:?}");
    let spec = env.hv.spec(replica.id.0).unwrap();
    assert_eq!(spec.nics.len(), 1);
    assert!(spec.nics[0].no_uplink && spec.nics[0].mac == vm.nics[0].mac, "{spec:?}");
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Undo, Default::default()).await.unwrap();
    assert_eq!(env.wait(s.unwrap()).await.result, SessionResult::Success);

    // Port 23: nothing listens. The failover halts on the step; Undo unwinds it.
    app.plan_action(caller, plan.id, PlanAction::ResetState, Default::default()).await.unwrap();
    app.plan_set_enabled(caller, plan.id, true).await.unwrap();
    app.plan_update(caller, plan.id, input(23)).await.unwrap();
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Failover, Default::default()).await.unwrap();
    let halted = env.wait(s.unwrap()).await;
    assert!(halted.halted, "{halted:?}");
    let message = "web_replica: TCP port 23 is closed: the guest refused connections for 1 s";
    let lines = log_lines(&env, halted.id).await;
    assert!(lines.iter().any(|l| l.contains(message)), "{lines:?}");
    assert_eq!(app.get::<Plan>(caller, plan.id.0).await.unwrap().lifecycle.state, PlanState::Halted);
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Undo, Default::default()).await.unwrap();
    let undone = env.wait(s.unwrap()).await;
    assert_eq!(undone.result, SessionResult::Failed);
    assert_eq!(app.get::<Replica>(caller, replica.id.0).await.unwrap().state, ReplicaState::Ready);

    // A test failover checks its own throwaway VM and fails with the same kind of message.
    let s = app.plan_test_failover(caller, plan.id, Default::default()).await.unwrap();
    let failed = env.wait(s).await;
    assert_eq!(failed.result, SessionResult::Failed);
    let text = failed.failure_message.clone().unwrap_or_default();
    assert!(text.contains("test VM web_test: TCP port 23 is closed"), "{failed:?}");
    // The simulated guest opens 23 too: the test failover passes and leaves nothing running.
    let task_vm = |s: SessionId| async move {
        let (_, tasks) = app.session_get(caller, s).await.unwrap();
        tasks[0].id.0
    };
    let s = app.plan_test_failover(caller, plan.id, Default::default()).await.unwrap();
    env.hv.set_open_ports(task_vm(s).await, &[23]);
    let done = env.wait(s).await;
    let lines = log_lines(&env, s).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}: {lines:?}", done.failure_message);
    assert!(lines.iter().any(|l| l.contains("test VM web_test: TCP port 23 is open")), "{lines:?}");
    assert_eq!(env.hv.status(task_vm(s).await).await.unwrap(), drover_hv::PowerState::Off);
}

/// Failover puts each NIC of the replica on the network the job's mapping names, else on the
/// recovery host's network of the same name, else isolates it, and the session says which; an
/// undone failback runs the replica on the same networks; a test failover's VM is always
/// isolated. The job's table is checked and replaced whole.
#[tokio::test]
async fn a_failover_maps_the_replicas_networks_and_a_test_failover_isolates_them() {
    let env = env().await;
    let (app, caller) = (&env.app, &env.caller);
    let mut new = env.new_vm("web");
    new.nics = vec![("lan".into(), None), ("dmz".into(), None), ("mgmt".into(), None), ("backup".into(), None)];
    let (vm, replica) = replicated(&env, new).await;
    env.hv.set_networks(&[("dr-lan", true), ("lan", true), ("dmz", true), ("dr-backup", false)]);
    // The source's hardware (as an imported domain's is recorded) goes to its replica.
    let hardware = VmHardware {
        machine: MachineType::Q35,
        disk_buses: vec![DiskBus::Sata],
        nic_models: vec![NicModel::E1000, NicModel::Rtl8139],
    };
    let h = hardware.clone();
    app.engine()
        .store()
        .object_modify::<Vm, _, _>(caller.tenant_id, vm.id.0, move |v| {
            v.hardware = h.clone();
            Ok(())
        })
        .await
        .unwrap();
    let map = |from: &str, to: &str| NetworkMapping { from: from.into(), to: to.into() };
    let patch = |m: Vec<NetworkMapping>| drover_engine::app::ReplicationJobPatch {
        network_mappings: Some(m),
        ..Default::default()
    };

    // Refused, and nothing changed: a network mapped twice, an empty name.
    let twice = vec![map("lan", "dr-lan"), map("lan", "dmz")];
    let e = app.replication_job_update(caller, replica.job_id, patch(twice)).await.unwrap_err();
    assert!(matches!(&e, Error::InvalidRequest(m) if m.contains("network \"lan\" is mapped twice")), "{e:?}");
    let e = app.replication_job_update(caller, replica.job_id, patch(vec![map("lan", " ")])).await.unwrap_err();
    assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");
    let job = app.get::<ReplicationJob>(caller, replica.job_id.0).await.unwrap();
    assert!(job.network_mappings.is_empty());
    let table = vec![map("lan", "dr-lan"), map("mgmt", "dr-mgmt"), map("backup", "dr-backup")];
    let job = app.replication_job_update(caller, replica.job_id, patch(table.clone())).await.unwrap();
    assert_eq!(job.network_mappings, table);
    let listed = app.host_networks(caller, env.host).await.unwrap();
    assert_eq!(listed.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["dr-lan", "lan", "dmz", "dr-backup"]);

    let plan = app
        .plan_create(
            caller,
            drover_engine::app::PlanInput {
                name: "nets".into(),
                description: String::new(),
                recovery_location_id: RecoveryLocationId::ORIGINAL,
                groups: port_check_groups(vm.id, 22, 1),
            },
        )
        .await
        .unwrap();
    // The readiness check reports the mappings the recovery host cannot honour.
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::ReadinessCheck, Default::default()).await.unwrap();
    let checked = env.wait(s.unwrap()).await;
    let lines = log_lines(&env, checked.id).await;
    assert_eq!(app.get::<Plan>(caller, plan.id.0).await.unwrap().lifecycle.state, PlanState::NotVerified, "{lines:?}");
    let warned = |text: &str| lines.iter().any(|l| l.contains("web_replica: at failover, NIC") && l.contains(text));
    assert!(warned("(mgmt): isolated: the job maps it to network dr-mgmt"), "{lines:?}");
    assert!(warned("(backup): isolated: network dr-backup of host"), "{lines:?}");
    assert!(warned("(lan): on network dr-lan"), "{lines:?}");

    env.hv.set_open_ports(replica.id.0, &[22]);
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Failover, Default::default()).await.unwrap();
    let done = env.wait(s.unwrap()).await;
    let lines = log_lines(&env, done.id).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}: {lines:?}", done.failure_message);
    let spec = env.hv.spec(replica.id.0).unwrap();
    let expected = drover_hv::Hardware {
        machine: drover_hv::Machine::Q35,
        disk_buses: vec![drover_hv::DiskBus::Sata],
        nic_models: vec![drover_hv::NicModel::E1000, drover_hv::NicModel::Rtl8139],
    };
    assert_eq!(spec.hardware, expected);
    let placed: Vec<(&str, bool, &str)> =
        spec.nics.iter().map(|n| (n.network.as_str(), n.no_uplink, n.mac.as_str())).collect();
    let macs: Vec<&str> = vm.nics.iter().map(|n| n.mac.as_str()).collect();
    assert_eq!(
        placed,
        [("dr-lan", false, macs[0]), ("dmz", false, macs[1]), ("mgmt", true, macs[2]), ("backup", true, macs[3])],
        "lan mapped (though the host has a lan too), dmz by its name, mgmt mapped to nothing offered, backup to a \
         network not available: {lines:?}"
    );
    let said = |text: &str| lines.iter().any(|l| l.starts_with("web_replica: ") && l.contains(text));
    assert!(said("(lan): on network dr-lan of host"), "{lines:?}");
    assert!(said("(dmz): on network dmz of host") && said("the same name"), "{lines:?}");
    assert!(said("(mgmt): isolated: the job maps it to network dr-mgmt, which host"), "{lines:?}");
    assert!(said("(backup): isolated: network dr-backup of host"), "{lines:?}");
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Undo, Default::default()).await.unwrap();
    assert_eq!(env.wait(s.unwrap()).await.result, SessionResult::Success);

    // A test failover's VM reaches nothing, whatever the mapping.
    let s = app.plan_test_failover(caller, plan.id, Default::default()).await.unwrap();
    let (_, tasks) = app.session_get(caller, s).await.unwrap();
    let test_vm = tasks[0].id.0;
    env.hv.set_open_ports(test_vm, &[22]);
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}", done.failure_message);
    let spec = env.hv.started_with(test_vm).pop().unwrap();
    assert_eq!(spec.hardware, expected, "a test VM has the source's hardware too");
    assert_eq!(spec.nics.len(), 4);
    assert!(spec.nics.iter().all(|n| n.no_uplink), "{spec:?}");

    // With every mapping honoured the check passes.
    let job = patch(vec![map("lan", "dr-lan")]);
    app.replication_job_update(caller, replica.job_id, job).await.unwrap();
    app.plan_action(caller, plan.id, PlanAction::ResetState, Default::default()).await.unwrap();
    app.plan_set_enabled(caller, plan.id, true).await.unwrap();
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::ReadinessCheck, Default::default()).await.unwrap();
    let checked = env.wait(s.unwrap()).await;
    let lines = log_lines(&env, checked.id).await;
    assert_eq!(app.get::<Plan>(caller, plan.id.0).await.unwrap().lifecycle.state, PlanState::Verified, "{lines:?}");
}

#[tokio::test]
async fn a_crash_in_a_parallel_group_is_resumed_by_the_next_engine() {
    let mut env = env().await;
    install_parallel_saga(&env, 3);
    env.app.engine().hooks().crash_after("vm1.0");
    let s = start_session_with_tasks(&env, 3).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let mid = env.app.engine().store().session_get(None, s).await.unwrap();
    assert_ne!(mid.state, SessionState::Stopped, "the crash leaves the session unfinished");
    let before: Vec<_> = env.steps(s).await.iter().map(|r| (r.name.clone(), r.state)).collect();
    assert!(before.contains(&("vm1.0".into(), StepState::Started)), "{before:?}");

    env.restart().await;
    let (_, events) = install_parallel_saga(&env, 3);
    env.app.engine().start().await.unwrap();
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}", done.failure_message);
    assert_consistent(&env, &done).await;
    let events = events.lock().unwrap().clone();
    // The step that was running when the process died runs again; steps recorded done do not.
    assert!(events.contains(&"start vm1.0".to_string()), "{events:?}");
    for (name, state) in before.iter().filter(|(_, st)| *st == StepState::Done) {
        assert!(!events.contains(&format!("start {name}")), "{name} was {state:?} and ran again: {events:?}");
    }
    assert!(env.steps(s).await.iter().all(|r| r.state == StepState::Done));
}

/// `Undo` of a HALTED failback lands the plan in FAILOVER, for both kinds of failback: the
/// failback saga's first step is the last one undone, and moves the plan out of UNDO FAILBACK.
/// (The simulated hypervisor cannot copy disks, so every failback halts on its first VM step.)
#[tokio::test]
async fn undo_of_a_halted_failback_lands_in_failover() {
    let env = env().await;
    let (vm, _) = replicated_vm(&env, "web", "console=ttyS0 drover.listen=22").await;
    let (app, caller) = (&env.app, &env.caller);
    let input = drover_engine::app::PlanInput {
        name: "fb".into(),
        description: String::new(),
        recovery_location_id: RecoveryLocationId::ORIGINAL,
        groups: port_check_groups(vm.id, 22, 1),
    };
    let plan = app.plan_create(caller, input).await.unwrap();
    let state = || async { app.get::<Plan>(caller, plan.id.0).await.unwrap().lifecycle.state };
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Failover, Default::default()).await.unwrap();
    assert_eq!(env.wait(s.unwrap()).await.result, SessionResult::Success);
    let location = app
        .recovery_location_create(
            caller,
            drover_engine::app::NewRecoveryLocation {
                name: "elsewhere".into(),
                description: String::new(),
                host_id: env.host,
                datastore_id: vm.datastore_id,
                network_mappings: Vec::new(),
            },
        )
        .await
        .unwrap();
    for to in [None, Some(location.id)] {
        let opts = drover_engine::app::PlanActionOptions { recovery_location_id: to, ..Default::default() };
        let (_, s) = app.plan_action(caller, plan.id, PlanAction::FailbackToProduction, opts).await.unwrap();
        let halted = env.wait(s.unwrap()).await;
        assert!(halted.halted, "{to:?}: {halted:?}");
        assert_eq!(state().await, PlanState::Halted);
        let (_, s) = app.plan_action(caller, plan.id, PlanAction::Undo, Default::default()).await.unwrap();
        env.wait(s.unwrap()).await;
        assert_eq!(state().await, PlanState::Failover, "{to:?}");
    }
}

/// Registers, for a kind no product saga uses yet, two counting steps per task under
/// the isolating policy (replication's): a task's failing step runs again, then the task alone is
/// given up.
fn install_isolating_saga(env: &Env) -> (Counter, Counter) {
    let runs: Counter = Default::default();
    let undos: Counter = Default::default();
    let (r, u) = (runs.clone(), undos.clone());
    env.app.engine().register_saga(
        SessionKind::PlanTestFailover,
        Arc::new(move |_, tasks: &[Task]| {
            let step = |task: usize, n: String| SagaStep {
                task: Some(task),
                group: Some(task as u32),
                weight: 1,
                critical: true,
                step: Box::new(Counting { name: n, runs: r.clone(), undos: u.clone(), pause: Duration::ZERO }),
            };
            let steps = (0..tasks.len()).flat_map(|t| [step(t, format!("a{t}")), step(t, format!("b{t}"))]).collect();
            let mut saga = Saga::unwinding(steps);
            saga.on_failure = FailurePolicy::IsolateTasks { retries: 2 };
            Ok(saga)
        }),
    );
    (runs, undos)
}

/// Isolated tasks: a step that fails once runs again and the session succeeds; a task whose step
/// keeps failing is given up alone (its steps undone, the others done) and the session warns;
/// when every task is given up, the session fails.
#[tokio::test]
async fn isolated_tasks_retry_then_give_up_one_task_alone() {
    use std::sync::atomic::Ordering::SeqCst;
    let env = env().await;
    let (runs, undos) = install_isolating_saga(&env);

    env.app.engine().hooks().fail("b1", 1);
    let s = start_session_with_tasks(&env, 3).await;
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Success, "{done:?}");
    assert_eq!((runs.load(SeqCst), undos.load(SeqCst)), (6, 0), "b1 ran again, nothing undone");
    let log: Vec<String> =
        env.app.session_log(&env.caller, s, 0, 100).await.unwrap().into_iter().map(|e| e.message).collect();
    assert!(log.iter().any(|l| l.contains("step b1 failed (attempt 1 of 3): trying again")), "{log:?}");

    runs.store(0, SeqCst);
    env.app.engine().hooks().fail_every("b1");
    let s = start_session_with_tasks(&env, 3).await;
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Warning, "{done:?}");
    let states: Vec<_> = env.steps(s).await.iter().map(|r| (r.name.clone(), r.state)).collect();
    assert_eq!(
        states,
        vec![
            ("a0".into(), StepState::Done),
            ("b0".into(), StepState::Done),
            ("a1".into(), StepState::Undone),
            ("b1".into(), StepState::Undone),
            ("a2".into(), StepState::Done),
            ("b2".into(), StepState::Done),
        ]
    );
    assert_eq!(env.steps(s).await[3].attempts, 3, "b1 ran three times");
    assert_eq!(undos.load(SeqCst), 2, "a1 and b1 undone, nothing else");
    let (_, tasks) = env.app.session_get(&env.caller, s).await.unwrap();
    let results: Vec<_> = tasks.iter().map(|t| (t.state, t.result)).collect();
    assert_eq!(
        results,
        vec![
            (SessionState::Stopped, SessionResult::Success),
            (SessionState::Stopped, SessionResult::Failed),
            (SessionState::Stopped, SessionResult::Success),
        ]
    );
    assert!(tasks[1].failure_message.as_deref().is_some_and(|m| m.contains("injected")), "{tasks:?}");

    // Every task given up: the session fails.
    env.app.engine().hooks().fail_every("a0");
    let s = start_session_with_tasks(&env, 1).await;
    let done = env.wait(s).await;
    assert_eq!(done.result, SessionResult::Failed, "{done:?}");
    env.app.engine().hooks().fail("none", 1);
}
