//! Application-consistent restore points of a real guest: the Debian guest
//! (`scripts/build-debian-guest`: systemd, the QEMU guest agent, PostgreSQL with a checkpoint
//! fsfreeze hook), replicated while PostgreSQL commits rows without pause. Its file systems are
//! frozen through the guest agent while its disk is cut, each point says which kind it is, and a
//! failover to either kind boots a PostgreSQL that starts, passes `pg_amcheck` and holds every row
//! committed before the cut.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use drover_engine::app::{
    App, Caller, NewDatastore, NewHost, NewReplicationJob, NewVm, PlanInput, PowerAction, ReplicationJobPatch,
};
use drover_engine::{Engine, EngineConfig};
use drover_hv::Hypervisor;
use drover_hv::qemu::{DebianGuest, QemuConfig, QemuDriver};
use drover_qemu::qga::{ExecStatus, GuestAgent};
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
        drover_engine::testing::kill_vms(&self.driver);
    }
}

async fn wait(app: &App, s: SessionId) -> Session {
    app.engine().wait(s, Duration::from_secs(300)).await.unwrap()
}

async fn log(app: &App, caller: &Caller, s: SessionId) -> Vec<String> {
    app.session_log(caller, s, 0, 1000).await.unwrap().into_iter().map(|e| e.message).collect()
}

fn debian() -> DebianGuest {
    let dir = std::env::var_os("DROVER_DEBIAN_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/debian"));
    DebianGuest::load(&dir)
        .unwrap_or_else(|e| panic!("the Debian guest is missing ({e}): run scripts/build-debian-guest"))
}

/// Runs `script` with `sh -c` in the guest through its QEMU guest agent, `input` on its stdin.
async fn sh(driver: &QemuDriver, vm: uuid::Uuid, script: &str, input: Option<&str>) -> ExecStatus {
    let socket = driver.guest_agent_socket_path(vm);
    let mut agent = GuestAgent::connect(&socket, Duration::from_secs(30)).await.unwrap();
    agent.run_shell(script, input.map(str::as_bytes), Duration::from_secs(180)).await.unwrap()
}

/// [`sh`] that must succeed; its standard output.
async fn sh_ok(driver: &QemuDriver, vm: uuid::Uuid, script: &str, input: Option<&str>) -> String {
    let out = sh(driver, vm, script, input).await;
    assert!(out.success(), "{script}: {:?} {}{}", out.exit_code, out.stdout_text(), out.stderr_text());
    out.stdout_text()
}

/// Fails the plan over and waits for it to succeed; the session's log.
async fn fail_over(app: &App, caller: &Caller, plan: PlanId) -> Vec<String> {
    let (_, s) = app.plan_action(caller, plan, PlanAction::Failover, Default::default()).await.unwrap();
    let done = wait(app, s.unwrap()).await;
    let lines = log(app, caller, done.id).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}: {lines:?}", done.failure_message);
    lines
}

/// A plan over one VM: power on, wait for its heartbeat.
async fn plan_of(app: &App, caller: &Caller, vm: VmId) -> Plan {
    app.plan_create(
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
                    vm_id: vm,
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
    .unwrap()
}

/// Waits (up to 4 minutes) until PostgreSQL in the guest accepts connections.
async fn wait_postgres(driver: &QemuDriver, vm: uuid::Uuid) {
    let wait = "for i in $(seq 1 240); do su postgres -c 'pg_isready -q' && exit 0; sleep 1; done; exit 1";
    sh_ok(driver, vm, wait, None).await;
}

/// What PostgreSQL holds in a booted point, and how it started.
#[derive(Debug)]
struct Recovered {
    count: u64,
    max: u64,
    /// What the server log says of its start.
    start_log: Vec<String>,
}

/// Waits for PostgreSQL in a VM booted from a point, reads table `t`, and checks every relation
/// with `pg_amcheck` (which must find nothing).
async fn recovered(driver: &QemuDriver, vm: uuid::Uuid) -> Recovered {
    wait_postgres(driver, vm).await;
    let rows = sh_ok(driver, vm, "su postgres -c \"psql -XAt -F ' ' -c 'select count(*), max(n) from t'\"", None).await;
    let mut it = rows.split_whitespace().map(|x| x.parse::<u64>().unwrap());
    let (count, max) = (it.next().unwrap(), it.next().unwrap());
    let log =
        sh_ok(driver, vm, "grep -h 'database system\\|redo' /var/log/postgresql/postgresql-*-main.log", None).await;
    // The log is on the disk, with the starts before the point's: only the last start counts.
    let lines: Vec<&str> = log.lines().collect();
    let last = lines
        .iter()
        .rposition(|l| l.contains("database system was interrupted") || l.contains("database system was shut down at"))
        .unwrap_or(0);
    let amcheck = sh(
        driver,
        vm,
        "su postgres -c '/usr/lib/postgresql/*/bin/pg_amcheck --install-missing --heapallindexed postgres'",
        None,
    )
    .await;
    assert!(amcheck.success(), "pg_amcheck: {} {}", amcheck.stdout_text(), amcheck.stderr_text());
    Recovered { count, max, start_log: lines[last..].iter().map(|l| l.to_string()).collect() }
}

/// The Debian guest's PostgreSQL commits numbered rows without pause (a procedure that inserts
/// and commits in a loop); an application-consistent point (a hook in the guest records the
/// newest committed row at the freeze) and a crash-consistent one (the guest agent stopped) are
/// each failed over to, and PostgreSQL there starts, passes `pg_amcheck`, and holds every row
/// committed before the cut, with no gap.
#[tokio::test]
async fn postgresql_holds_every_row_committed_before_the_cut_of_either_kind_of_point() {
    let (env, host, dr, vm) = debian_site("drp").await;
    let (app, caller, driver) = (&env.app, &env.caller, &*env.driver);
    let prod_vm = vm.id.0;
    wait_postgres(driver, prod_vm).await;
    sh_ok(
        driver,
        prod_vm,
        "su postgres -c 'psql -XAtq -v ON_ERROR_STOP=1 -f -'",
        Some(
            "create table t (n bigint primary key);
             create procedure w() language plpgsql as $$
             declare i bigint := 0;
             begin loop i := i + 1; insert into t values (i); commit; end loop; end $$;",
        ),
    )
    .await;
    // Run by the guest agent before a freeze (after the image's own checkpoint hook): the newest
    // committed row, written to the disk that is about to be frozen.
    sh_ok(
        driver,
        prod_vm,
        "cat > /etc/qemu/fsfreeze-hook.d/zz-mark && chmod 755 /etc/qemu/fsfreeze-hook.d/zz-mark",
        Some(
            "#!/bin/sh\n[ \"$1\" = freeze ] || exit 0\n\
             su postgres -c \"psql -XAtq -c 'select max(n) from t'\" > /var/lib/postgresql/freeze-mark\n",
        ),
    )
    .await;
    sh_ok(driver, prod_vm, "(setsid su postgres -c \"psql -XAtq -c 'call w()'\" > /dev/null 2>&1 &)", None).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let job = app
        .replication_job_create(
            caller,
            NewReplicationJob {
                name: "db-job".into(),
                vm_ids: vec![vm.id],
                target_host_id: host,
                target_datastore_id: dr,
                schedule: Schedule::Manual,
                retention_points: 3,
                bandwidth_limit: None,
                consistency: ConsistencyMode::Require,
                network_mappings: Vec::new(),
            },
        )
        .await
        .unwrap();
    let plan = plan_of(app, caller, vm.id).await;
    let replica_vm = || async { app.list::<Replica>(caller).await.unwrap().pop().unwrap().id.0 };

    // 1. Application-consistent (`require`): a seed and an increment, each cut inside a freeze.
    for run in 1..=2 {
        let s = app.replication_job_run(caller, job.id).await.unwrap();
        let done = wait(app, s).await;
        let lines = log(app, caller, s).await;
        assert_eq!(done.result, SessionResult::Success, "run {run}: {:?}: {lines:?}", done.failure_message);
        assert!(lines.iter().any(|l| l.contains("application-consistent cut")), "run {run}: {lines:?}");
        let mode = if run == 1 { "seed mode" } else { "bitmap mode" };
        assert!(lines.iter().any(|l| l.contains(mode)), "run {run}: {lines:?}");
        // The guest was thawed: it can be frozen again (and is thawed again at once).
        let again = driver.guest_freeze(prod_vm).await.unwrap();
        assert!(again.frozen, "run {run}: the guest was left frozen: {again:?}");
        driver.guest_thaw(prod_vm).await.unwrap();
    }
    // The detached watchdog (what thaws a guest when the agent's process died while it was
    // frozen) thaws this real guest through its guest agent.
    let frozen = driver.guest_freeze(prod_vm).await.unwrap();
    assert!(frozen.frozen, "{frozen:?}");
    let record = env.dir.path().join("freeze-record.json");
    std::fs::write(&record, serde_json::json!({"id": "lost-agent", "vm": prod_vm}).to_string()).unwrap();
    let socket = driver.guest_agent_socket_path(prod_vm);
    let thawed = drover_agent::freeze::run_detached_watchdog(&socket, &record, "lost-agent", Duration::ZERO).await;
    assert_eq!(thawed, Ok(true));
    assert!(!record.exists());
    let again = driver.guest_freeze(prod_vm).await.unwrap();
    assert!(again.frozen, "the detached watchdog left the guest frozen: {again:?}");
    driver.guest_thaw(prod_vm).await.unwrap();
    let points = app.restore_points(caller, app.list::<Replica>(caller).await.unwrap()[0].id).await.unwrap();
    assert_eq!(points.len(), 2);
    for p in &points {
        assert_eq!(p.consistency.kind, ConsistencyKind::Application, "{:?}", p.consistency);
        assert!(p.consistency.reason.as_deref().unwrap().contains("frozen by the guest agent"), "{:?}", p.consistency);
    }
    let running = sh_ok(driver, prod_vm, "su postgres -c \"psql -XAtc 'select max(n) from t'\"", None).await;
    let lines = fail_over(app, caller, plan.id).await;
    let booted = format!("booted from restore point {} (application-consistent)", points[1].sequence);
    assert!(lines.iter().any(|l| l.contains(&booted)), "{lines:?}");
    let replica = replica_vm().await;
    let mark: u64 = sh_ok(driver, replica, "cat /var/lib/postgresql/freeze-mark", None).await.trim().parse().unwrap();
    let r = recovered(driver, replica).await;
    println!(
        "application-consistent point: {} rows (the freeze hook saw {mark}; production had {} after the run); \
         PostgreSQL's start: {:?}",
        r.count,
        running.trim(),
        r.start_log
    );
    assert_eq!(r.count, r.max, "no gap: {r:?}");
    assert!(r.max >= mark && mark > 0, "every row committed before the freeze: {r:?}, mark {mark}");
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Undo, Default::default()).await.unwrap();
    assert_eq!(wait(app, s.unwrap()).await.result, SessionResult::Success);

    // 2. The guest agent stopped: `try` makes a crash-consistent point; PostgreSQL recovers
    // through its WAL and holds every row committed before the run began.
    let before: u64 = sh_ok(driver, prod_vm, "su postgres -c \"psql -XAtc 'select max(n) from t'\"", None)
        .await
        .trim()
        .parse()
        .unwrap();
    sh(driver, prod_vm, "(setsid sh -c 'sleep 1; systemctl stop qemu-guest-agent' > /dev/null 2>&1 &)", None).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let patch = ReplicationJobPatch { consistency: Some(ConsistencyMode::Try), ..Default::default() };
    app.replication_job_update(caller, job.id, patch).await.unwrap();
    let s = app.replication_job_run(caller, job.id).await.unwrap();
    let done = wait(app, s).await;
    let lines = log(app, caller, s).await;
    assert_eq!(done.result, SessionResult::Success, "{:?}: {lines:?}", done.failure_message);
    assert!(lines.iter().any(|l| l.contains("crash-consistent cut") && l.contains("no guest agent")), "{lines:?}");
    let points = app.restore_points(caller, app.list::<Replica>(caller).await.unwrap()[0].id).await.unwrap();
    assert_eq!(points.last().unwrap().consistency.kind, ConsistencyKind::Crash);
    let lines = fail_over(app, caller, plan.id).await;
    assert!(lines.iter().any(|l| l.contains("(crash-consistent: ")), "{lines:?}");
    let r = recovered(driver, replica_vm().await).await;
    println!(
        "crash-consistent point: {} rows (production had {before} before the run); PostgreSQL's start: {:?}",
        r.count, r.start_log
    );
    assert_eq!(r.count, r.max, "no gap: {r:?}");
    assert!(r.max >= before, "every row committed before the cut: {r:?}, {before} before the run");
    assert!(
        r.start_log.iter().any(|l| l.contains("not properly shut down") || l.contains("automatic recovery")),
        "a crash-consistent point recovers through the WAL: {r:?}"
    );
    let (_, s) = app.plan_action(caller, plan.id, PlanAction::Undo, Default::default()).await.unwrap();
    assert_eq!(wait(app, s.unwrap()).await.result, SessionResult::Success);
}

/// The engine on QEMU with a production and a DR datastore on one host, and the Debian guest
/// imported into production and running (its guest agent answering). Returns the host, the DR
/// datastore and the VM.
async fn debian_site(prefix: &str) -> (Env, HostId, DatastoreId, Vm) {
    let guest = debian();
    let dir = tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").unwrap();
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
    let file = |f: &Path| Some(f.to_string_lossy().into_owned());
    let new_vm = NewVm {
        name: "db".into(),
        host_id: host.id,
        datastore_id: prod.id,
        vcpus: 1,
        memory_mib: 512,
        disks: vec![VmDisk { name: "root".into(), size_bytes: 0, import_from: file(&guest.disk) }],
        nics: vec![("lan".into(), None)],
        tags: vec![],
        boot: VmBoot {
            kernel: file(&guest.kernel),
            initrd: file(&guest.initrd),
            cmdline: Some(guest.cmdline.clone()),
            firmware: Default::default(),
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
    (env, host.id, dr.id, vm)
}
