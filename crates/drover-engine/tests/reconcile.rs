//! Reconciliation on start, against a real store with the simulated hypervisor: a database in
//! which in-progress states have no unfinished session behind them (what an older build, which
//! stored a plan's move and its session in two commits, left after a crash) is repaired by the
//! next engine's `start`, so that every object takes a user's action again.

use std::sync::Arc;
use std::time::Duration;

use drover_engine::app::{App, Caller, NewReplicationJob, PlanInput, PowerAction};
use drover_engine::{Engine, EngineConfig};
use drover_hv::sim::SimulatedHypervisor;
use drover_store::Store;
use drover_types::*;

struct Env {
    _dir: tempfile::TempDir,
    db: std::path::PathBuf,
    hv: Arc<SimulatedHypervisor>,
    app: App,
    caller: Caller,
    host: HostId,
    ds: DatastoreId,
    dr: (DatastoreId, std::path::PathBuf),
}

fn config(root: &std::path::Path) -> EngineConfig {
    drover_engine::testing::fast_config(root)
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("drover.db");
    let hv = Arc::new(SimulatedHypervisor::new());
    let app = App::new(Engine::new(Store::open_sqlite(&db).await.unwrap(), hv.clone(), config(dir.path())));
    app.bootstrap(Some("adminpass".into())).await.unwrap();
    let tokens = app.login("admin", "adminpass", None).await.unwrap();
    let caller = app.authenticate(&tokens.access_token).await.unwrap();
    let (host, mut datastores) =
        drover_engine::testing::infrastructure(&app, &caller, dir.path(), &["ds1", "dr"]).await;
    let dr = datastores.pop().unwrap();
    let ds = datastores.pop().unwrap().0;
    Env { _dir: dir, db, hv, app, caller, host, ds, dr }
}

impl Env {
    /// A new engine over the same database and the same (simulated) VMs, started: what a
    /// restarted `drover serve` is.
    async fn restart(&mut self) {
        self.app.engine().shutdown();
        let store = Store::open_sqlite(&self.db).await.unwrap();
        self.app = App::new(Engine::new(store, self.hv.clone(), config(self._dir.path())));
        self.app.engine().start().await.unwrap();
    }

    fn store(&self) -> &Store {
        self.app.engine().store()
    }

    async fn wait(&self, id: SessionId) -> Session {
        self.app.engine().wait(id, Duration::from_secs(20)).await.unwrap()
    }

    async fn vm(&self, name: &str) -> Vm {
        let new = drover_engine::testing::new_vm(name, self.host, self.ds);
        let (vm, s) = self.app.vm_create(&self.caller, new).await.unwrap();
        assert_eq!(self.wait(s).await.result, SessionResult::Success);
        vm
    }

    /// A VM with a ready replica holding one published point (made by hand: the simulated
    /// hypervisor cannot replicate).
    async fn replicated(&self, name: &str) -> (Vm, Replica) {
        let vm = self.vm(name).await;
        let job = NewReplicationJob {
            name: format!("{name}-job"),
            vm_ids: vec![vm.id],
            target_host_id: self.host,
            target_datastore_id: self.dr.0,
            schedule: Schedule::Manual,
            retention_points: 2,
            bandwidth_limit: None,
            consistency: Default::default(),
            network_mappings: Vec::new(),
        };
        let job = self.app.replication_job_create(&self.caller, job).await.unwrap();
        let (replica, _) = drover_engine::testing::replica_with_point(
            self.store(),
            self.caller.tenant_id,
            job.id,
            (vm.id, name),
            self.dr.0,
            &self.dr.1,
        )
        .await;
        (vm, replica)
    }

    async fn plan(&self, name: &str, vm: VmId) -> Plan {
        let groups = vec![PlanGroup {
            id: PlanGroupId::new(),
            name: "g".into(),
            mode: GroupMode::Sequential,
            delay_secs: 0,
            critical: true,
            restore_tags: false,
            vms: vec![PlanVm { vm_id: vm, steps: vec![] }],
        }];
        let input = PlanInput {
            name: name.into(),
            description: String::new(),
            recovery_location_id: RecoveryLocationId::ORIGINAL,
            groups,
        };
        self.app.plan_create(&self.caller, input).await.unwrap()
    }

    async fn lifecycle(&self, plan: &Plan) -> PlanLifecycle {
        self.app.get::<Plan>(&self.caller, plan.id.0).await.unwrap().lifecycle
    }

    /// Writes a plan's lifecycle straight into the store, as an older build's first commit did.
    async fn set_lifecycle(&self, plan: &Plan, to: PlanLifecycle) {
        self.store()
            .object_modify::<Plan, _, _>(self.caller.tenant_id, plan.id.0, |p| {
                p.lifecycle = to;
                Ok(())
            })
            .await
            .unwrap();
    }

    /// Runs a plan action to its session's end; returns the session.
    async fn act(&self, plan: &Plan, action: PlanAction) -> Session {
        let (_, s) = self.app.plan_action(&self.caller, plan.id, action, Default::default()).await.unwrap();
        self.wait(s.expect("the action runs as a session")).await
    }

    async fn sessions_of(&self, target: uuid::Uuid) -> Vec<Session> {
        let filter = SessionFilter { target_id: Some(target), limit: 100, ..Default::default() };
        self.app.session_list(&self.caller, &filter).await.unwrap().0
    }

    async fn power_state(&self, vm: VmId) -> VmPowerState {
        self.app.get::<Vm>(&self.caller, vm.0).await.unwrap().power_state
    }

    async fn set_power_state(&self, vm: VmId, to: VmPowerState) {
        self.store()
            .object_modify::<Vm, _, _>(self.caller.tenant_id, vm.0, |v| {
                v.power_state = to;
                Ok(())
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn in_progress_states_without_a_session_land_where_the_user_can_act_again() {
    use PlanAction as A;
    let mut env = env().await;

    // 1. A failover whose plan moved but whose session was never recorded.
    let (a, _) = env.replicated("a").await;
    let moved = env.plan("moved", a.id).await;
    let before = env.lifecycle(&moved).await;
    let stuck = before.apply(PlanEvent::Requested(A::Failover), true).unwrap();
    env.set_lifecycle(&moved, stuck).await;
    assert_eq!(stuck.state, PlanState::FailoverInProgress);
    // Every action is refused while it sits there: the gap this repairs.
    let refused = env.app.plan_action(&env.caller, moved.id, A::Failover, Default::default()).await.unwrap_err();
    assert!(matches!(refused, Error::Conflict(_)), "{refused}");

    // 2. A halt that came after the session's last step: the failover completed.
    let (b, _) = env.replicated("b").await;
    let raced = env.plan("raced", b.id).await;
    assert_eq!(env.act(&raced, A::Failover).await.result, SessionResult::Success);
    let failed_over = env.lifecycle(&raced).await;
    assert_eq!(failed_over.state, PlanState::Failover);
    let halting = PlanLifecycle {
        state: PlanState::Halting,
        interrupted: Some(PlanState::FailoverInProgress),
        last_stable: PlanState::NeedsVerified,
    };
    env.set_lifecycle(&raced, halting).await;

    // 3. Undo of a halted failover whose plan moved but whose session never heard of it.
    let (c, _) = env.replicated("c").await;
    let halted = env.plan("halted", c.id).await;
    env.app.engine().hooks().fail("boot:0", 1);
    let s = env.act(&halted, A::Failover).await;
    assert!(s.halted, "{s:?}");
    let halted_lifecycle = env.lifecycle(&halted).await;
    assert_eq!(halted_lifecycle.state, PlanState::Halted);
    env.set_lifecycle(&halted, halted_lifecycle.apply(PlanEvent::Requested(A::Undo), true).unwrap()).await;

    // 4. A replica left Processing by a replication run that is gone.
    let (_, processing) = env.replicated("d").await;
    env.store()
        .object_modify::<Replica, _, _>(env.caller.tenant_id, processing.id.0, |r| {
            r.state = r.state.apply(ReplicaEvent::ReplicationStarted)?;
            Ok(())
        })
        .await
        .unwrap();

    // 5. VMs in transitional power states with no session: one that never came up, one that
    //    the hypervisor still runs.
    let starting = env.vm("starting").await;
    env.set_power_state(starting.id, VmPowerState::Starting).await;
    let stopping = env.vm("stopping").await;
    let on = env.app.vm_power(&env.caller, stopping.id, PowerAction::PowerOn).await.unwrap();
    assert_eq!(env.wait(on).await.result, SessionResult::Success);
    env.set_power_state(stopping.id, VmPowerState::Stopping).await;

    env.restart().await;

    // 1: nothing of the failover happened, so the plan is back where it was, and fails over.
    let now = env.lifecycle(&moved).await;
    assert_eq!(now, before, "back to the state it left");
    assert!(env.sessions_of(moved.id.0).await.is_empty());
    let s = env.act(&moved, A::Failover).await;
    assert_eq!(s.result, SessionResult::Success, "{s:?}");
    assert_eq!(env.lifecycle(&moved).await.state, PlanState::Failover);
    assert_eq!(env.act(&moved, A::Undo).await.result, SessionResult::Success);
    assert_eq!(env.lifecycle(&moved).await.state, PlanState::UndoFailover);

    // 2: the failover's session completed it: FAILOVER, and it can be undone.
    assert_eq!(env.lifecycle(&raced).await, failed_over);
    assert_eq!(env.act(&raced, A::Undo).await.result, SessionResult::Success);
    assert_eq!(env.lifecycle(&raced).await.state, PlanState::UndoFailover);

    // 3: HALTED on the failover again, so Undo unwinds the halted session.
    let now = env.lifecycle(&halted).await;
    assert_eq!((now.state, now.interrupted), (PlanState::Halted, Some(PlanState::FailoverInProgress)));
    let s = env.act(&halted, A::Undo).await;
    assert_eq!(s.state, SessionState::Stopped, "{s:?}");
    assert_eq!(env.lifecycle(&halted).await.state, PlanState::UndoFailover);

    // 4: the replica is Ready again.
    let r = env.app.get::<Replica>(&env.caller, processing.id.0).await.unwrap();
    assert_eq!(r.state, ReplicaState::Ready);

    // 5: the hypervisor's truth: the first is off and powers on; the second still runs.
    assert_eq!(env.power_state(starting.id).await, VmPowerState::Off);
    assert_eq!(env.power_state(stopping.id).await, VmPowerState::Running);
    let on = env.app.vm_power(&env.caller, starting.id, PowerAction::PowerOn).await.unwrap();
    assert_eq!(env.wait(on).await.result, SessionResult::Success);
    let off = env.app.vm_power(&env.caller, stopping.id, PowerAction::PowerOff).await.unwrap();
    assert_eq!(env.wait(off).await.result, SessionResult::Success);
    assert_eq!(env.power_state(stopping.id).await, VmPowerState::Off);
}

/// A plan whose session runs is left to it, and a session that is resumed moves the plan as
/// usual: reconciliation touches only what no session will move.
#[tokio::test]
async fn a_plan_with_a_resumable_session_is_left_to_it() {
    let mut env = env().await;
    let (a, _) = env.replicated("a").await;
    let plan = env.plan("p", a.id).await;
    // The runner stops after booting, before recording it: the session is unfinished.
    env.app.engine().hooks().crash_after("boot:0");
    let (_, s) = env.app.plan_action(&env.caller, plan.id, PlanAction::Failover, Default::default()).await.unwrap();
    let s = s.unwrap();
    for _ in 0..200 {
        if !env.app.engine().is_running(s) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(env.lifecycle(&plan).await.state, PlanState::FailoverInProgress);
    env.restart().await;
    assert_eq!(env.wait(s).await.result, SessionResult::Success);
    assert_eq!(env.lifecycle(&plan).await.state, PlanState::Failover);
}

/// A VM power request that is refused records no session, and the VM's state does not move.
#[tokio::test]
async fn a_refused_power_request_records_nothing() {
    let env = env().await;
    let vm = env.vm("v").await;
    let off = env.app.vm_power(&env.caller, vm.id, PowerAction::PowerOff).await.unwrap_err();
    assert!(matches!(off, Error::Conflict(_)), "{off}");
    assert_eq!(env.power_state(vm.id).await, VmPowerState::Off);
    let kinds: Vec<SessionKind> = env.sessions_of(vm.id.0).await.into_iter().map(|s| s.kind).collect();
    assert_eq!(kinds, [SessionKind::VmCreate]);
}

/// A halt that reaches the plan while its session runs its last step: the session ends in
/// success and the plan lands where the action completes, not in HALTING. Made deterministic by
/// stopping the runner before the last step and moving the plan as such a halt does.
#[tokio::test]
async fn a_halt_during_the_last_step_lands_the_plan_where_the_action_completes() {
    let mut env = env().await;
    let (a, _) = env.replicated("a").await;
    let plan = env.plan("p", a.id).await;
    env.app.engine().hooks().crash_after("boot:0");
    let (_, s) = env.app.plan_action(&env.caller, plan.id, PlanAction::Failover, Default::default()).await.unwrap();
    let s = s.unwrap();
    for _ in 0..200 {
        if !env.app.engine().is_running(s) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let running = env.lifecycle(&plan).await;
    env.set_lifecycle(&plan, running.apply(PlanEvent::Requested(PlanAction::Halt), true).unwrap()).await;
    env.restart().await;
    assert_eq!(env.wait(s).await.result, SessionResult::Success);
    assert_eq!(env.lifecycle(&plan).await.state, PlanState::Failover);
    assert_eq!(env.act(&plan, PlanAction::Undo).await.result, SessionResult::Success);
}
