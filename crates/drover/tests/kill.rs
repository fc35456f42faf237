//! `drover serve` killed with SIGKILL in the middle of multi-step operations on a real QEMU VM,
//! restarted on the same data directory: the sessions resume, their records are consistent, and
//! the VM's QEMU process, which outlived drover, is re-attached rather than restarted.

mod common;

use std::io::{BufRead, BufReader};

use common::{Api, PASSWORD, QemuReaper, qemu_pids};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

struct Serve {
    child: Child,
    base: String,
}

impl Serve {
    fn start(data: &Path) -> Serve {
        Serve::start_killing(data, None)
    }

    /// With `kill_after`, the server kills itself (SIGKILL) right after that saga step ran.
    fn start_killing(data: &Path, kill_after: Option<&str>) -> Serve {
        Serve::start_with(data, kill_after, None)
    }

    /// With `kill_at`, the server kills itself (SIGKILL) at that named point outside the saga
    /// steps (`DROVER_TEST_KILL_AT`, e.g. `before-commit:PlanFailover`).
    fn start_killing_at(data: &Path, kill_at: &str) -> Serve {
        Serve::start_with(data, None, Some(kill_at))
    }

    fn start_with(data: &Path, kill_after: Option<&str>, kill_at: Option<&str>) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_drover"))
            .args(["serve", "--plain-http", "--listen", "127.0.0.1:0", "--heartbeat-timeout-secs", "120"])
            .args(["--vro-listen", "off", "--em-listen", "off"])
            .args(["--accel", "tcg"])
            .arg("--data-dir")
            .arg(data)
            // The tests' datastores live in the data directory; the VMs boot the tiny guest.
            .arg("--datastore-root")
            .arg(data)
            .arg("--import-dir")
            .arg(guest_dir())
            .env("DROVER_ADMIN_PASSWORD", PASSWORD)
            .env("DROVER_TEST_KILL_AFTER_STEP", kill_after.unwrap_or(""))
            .env("DROVER_TEST_KILL_AT", kill_at.unwrap_or(""))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start drover serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no URL in {line:?}"))
            .to_string();
        Serve { child, base }
    }

    fn kill(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    /// Waits for the server to kill itself at its hook; true if it died of SIGKILL.
    fn died_of_sigkill(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.signal() == Some(9);
            }
            assert!(std::time::Instant::now() < deadline, "the server did not die at its kill point");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A site, a host, datastores `prod` and `dr` in `data`, and a VM `db` booting the tiny guest on
/// `prod`, created and waited for. Returns the host, the datastores and the VM's id.
async fn vm_on_prod_and_dr(api: &Api, data: &Path, guest: &Path) -> (Value, Vec<Value>, String) {
    use reqwest::Method as M;
    let site = api.ok(M::POST, "/v1/sites", Some(json!({"name": "s", "kind": "Production"}))).await;
    let host =
        api.ok(M::POST, "/v1/hosts", Some(json!({"site_id": site["id"], "name": "h", "address": "local"}))).await;
    let mut ds = Vec::new();
    for n in ["prod", "dr"] {
        let body = json!({"host_id": host["id"], "name": n, "path": data.join(n)});
        ds.push(api.ok(M::POST, "/v1/datastores", Some(body)).await);
    }
    let vm_body = json!({
        "name": "db", "host_id": host["id"], "datastore_id": ds[0]["id"], "vcpus": 1, "memory_mib": 128,
        "disks": [{"name": "data", "size_bytes": 33554432}],
        "boot": {"kernel": guest.join("vmlinux"), "initrd": guest.join("initramfs.img"), "cmdline": "console=ttyS0 quiet"}
    });
    let created = api.ok(M::POST, "/v1/vms", Some(vm_body)).await;
    let vm = api.wait_session(created["session_id"].as_str().unwrap()).await["target_id"].as_str().unwrap().to_string();
    (host, ds, vm)
}

fn guest_dir() -> PathBuf {
    std::env::var_os("DROVER_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out"))
}

#[tokio::test]
async fn sigkill_mid_operation_then_restart_resumes_every_session() {
    let guest = guest_dir();
    assert!(guest.join("guest.json").is_file(), "the tiny guest is missing: run scripts/build-guest first");
    // Short path: QEMU's unix sockets live under it.
    let data = tempfile::Builder::new().prefix("drk").tempdir_in("/tmp").unwrap();
    let _reaper = QemuReaper(data.path().to_path_buf());
    let mut serve = Serve::start(data.path());
    let api = Api::login(&serve.base).await;
    use reqwest::Method as M;
    let site = api.ok(M::POST, "/v1/sites", Some(json!({"name": "prod", "kind": "Production"}))).await;
    let host =
        api.ok(M::POST, "/v1/hosts", Some(json!({"site_id": site["id"], "name": "h", "address": "local"}))).await;
    let ds = api
        .ok(
            M::POST,
            "/v1/datastores",
            Some(json!({"host_id": host["id"], "name": "ds", "path": data.path().join("ds")})),
        )
        .await;
    let vm_body = json!({
        "name": "tiny", "host_id": host["id"], "datastore_id": ds["id"], "vcpus": 1, "memory_mib": 128,
        "disks": [{"name": "data", "size_bytes": 33554432}],
        "boot": {"kernel": guest.join("vmlinux"), "initrd": guest.join("initramfs.img"), "cmdline": "console=ttyS0 quiet"}
    });
    let created = api.ok(M::POST, "/v1/vms", Some(vm_body)).await;
    let s = api.wait_session(created["session_id"].as_str().unwrap()).await;
    assert_eq!(s["result"], "Success");
    let vm = s["target_id"].as_str().unwrap().to_string();

    // 1. Power on; kill drover once QEMU is up and the heartbeat wait has begun.
    let accepted = api.ok(M::POST, &format!("/v1/vms/{vm}/power-on"), None).await;
    let session = accepted["session_id"].as_str().unwrap().to_string();
    for _ in 0..600 {
        if api.log(&session).await.iter().any(|l| l.contains("powered on")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    serve.kill();
    let pids = qemu_pids(data.path());
    assert_eq!(pids.len(), 1, "the VM's QEMU process outlives drover");

    let mut serve = Serve::start(data.path());
    let api = Api::login(&serve.base).await;
    let s = api.wait_session(&session).await;
    assert_eq!(s["result"], "Success", "{s}");
    assert_eq!(s["progress"], 100);
    assert!(s["tasks"].as_array().unwrap().iter().all(|t| t["state"] == "Stopped" && t["result"] == "Success"));
    let log = api.log(&session).await;
    assert!(log.iter().any(|l| l.contains("resumed after a restart")), "{log:?}");
    assert!(log.iter().any(|l| l.starts_with("heartbeat: guest up")), "{log:?}");
    assert_eq!(qemu_pids(data.path()), pids, "re-attached to the same QEMU, not a new one");
    let v = api.ok(M::GET, &format!("/v1/vms/{vm}"), None).await;
    assert_eq!(v["power_state"], "Running");

    // 2. Shutdown, killed right after it was accepted: it resumes and the VM ends Off.
    let accepted = api.ok(M::POST, &format!("/v1/vms/{vm}/shutdown"), None).await;
    let session = accepted["session_id"].as_str().unwrap().to_string();
    serve.kill();
    let mut serve = Serve::start(data.path());
    let api = Api::login(&serve.base).await;
    let s = api.wait_session(&session).await;
    assert_eq!(s["result"], "Success", "{s}");
    let v = api.ok(M::GET, &format!("/v1/vms/{vm}"), None).await;
    assert_eq!(v["power_state"], "Off");
    for _ in 0..50 {
        if qemu_pids(data.path()).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(qemu_pids(data.path()).is_empty());

    // 3. A VM that died while drover was down is recorded as Died on the next start.
    let accepted = api.ok(M::POST, &format!("/v1/vms/{vm}/power-on"), None).await;
    assert_eq!(api.wait_session(accepted["session_id"].as_str().unwrap()).await["result"], "Success");
    serve.kill();
    for pid in qemu_pids(data.path()) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    }
    let serve = Serve::start(data.path());
    let api = Api::login(&serve.base).await;
    let v = api.ok(M::GET, &format!("/v1/vms/{vm}"), None).await;
    assert_eq!(v["power_state"], "Died");

    // Every session is finished, none half-done.
    let all = api.ok(M::GET, "/v1/sessions?limit=100", None).await;
    for s in all["items"].as_array().unwrap() {
        assert_eq!(s["state"], "Stopped", "{s}");
        assert_eq!(s["result"], "Success", "{s}");
    }
    drop(serve);
}

/// What the store says about the replica's points: (sequence, file, manifest digest).
async fn points_on_disk(data: &Path) -> Vec<(u64, PathBuf, String)> {
    let store = drover_store::Store::open_sqlite(&data.join("drover.db")).await.unwrap();
    let tenant = store.tenant_system().await.unwrap().unwrap().id;
    let replicas = store.object_list::<drover_types::Replica>(tenant).await.unwrap();
    let Some(replica) = replicas.first() else { return Vec::new() };
    store
        .restore_points_of(tenant, replica.id)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.sequence, PathBuf::from(&p.disks[0].file), p.disks[0].manifest_digest.clone()))
        .collect()
}

fn qemu_img_ok(args: &[&std::ffi::OsStr]) -> bool {
    Command::new("qemu-img").args(args).status().unwrap().success()
}

/// Every published point is whole: its chain checks clean and its manifest matches its digest.
async fn points_intact(data: &Path) {
    for (seq, file, digest) in points_on_disk(data).await {
        assert!(
            qemu_img_ok(&["check".as_ref(), "-q".as_ref(), "-U".as_ref(), file.as_os_str()]),
            "point {seq} is damaged"
        );
        let m = drover_block::hash::Manifest::load(&drover_block::chain::manifest_path(&file)).await.unwrap();
        assert_eq!(m.digest(), digest, "point {seq}'s manifest");
    }
}

#[tokio::test]
async fn sigkill_at_each_step_of_replication_and_failback_loses_nothing() {
    use reqwest::Method as M;
    let guest = guest_dir();
    assert!(guest.join("guest.json").is_file(), "the tiny guest is missing: run scripts/build-guest first");
    let data = tempfile::Builder::new().prefix("drs").tempdir_in("/tmp").unwrap();
    let _reaper = QemuReaper(data.path().to_path_buf());
    let serve = Serve::start(data.path());
    let api = Api::login(&serve.base).await;
    let (host, ds, vm) = vm_on_prod_and_dr(&api, data.path(), &guest).await;
    let job = api
        .ok(
            M::POST,
            "/v1/replication-jobs",
            Some(json!({"name": "j", "vm_ids": [vm], "target_host_id": host["id"],
            "target_datastore_id": ds[1]["id"], "schedule": {"type": "Manual"}, "retention_points": 3})),
        )
        .await;
    let job = job["id"].as_str().unwrap().to_string();
    let source = data.path().join("prod").join(&vm).join("data.qcow2");
    drop(serve);

    // Replication, killed after each of its steps.
    for (n, step) in ["prepare:0", "transfer:0", "publish:0", "release:0", "retention:0"].iter().enumerate() {
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", &format!("write -P {} {} 4096", 0x20 + n, (n as u64 + 1) << 20)])
            .arg(&source)
            .output()
            .unwrap();
        assert!(out.status.success());
        let mut serve = Serve::start_killing(data.path(), Some(step));
        let api = Api::login(&serve.base).await;
        let run = api.ok(M::POST, &format!("/v1/replication-jobs/{job}/run"), None).await;
        let session = run["session_id"].as_str().unwrap().to_string();
        assert!(serve.died_of_sigkill(), "{step}");
        points_intact(data.path()).await;
        let serve = Serve::start(data.path());
        let api = Api::login(&serve.base).await;
        let s = api.wait_session(&session).await;
        assert_eq!(s["result"], "Success", "after SIGKILL at {step}: {s}");
        assert!(api.log(&session).await.iter().any(|l| l.contains("resumed after a restart")));
        let points = points_on_disk(data.path()).await;
        let newest = &points.last().unwrap().1;
        assert!(
            qemu_img_ok(&["compare".as_ref(), "-q".as_ref(), "-U".as_ref(), source.as_os_str(), newest.as_os_str()]),
            "after {step}"
        );
        points_intact(data.path()).await;
        drop(serve);
    }

    // Failback, killed after each of its steps: it resumes, production ends equal to the replica.
    let plan_body = json!({"name": "p", "groups": [{"name": "g", "critical": true, "vms": [{"vm_id": vm}]}]});
    let serve = Serve::start(data.path());
    let api = Api::login(&serve.base).await;
    let plan = api.ok(M::POST, "/v1/plans", Some(plan_body)).await["id"].as_str().unwrap().to_string();
    drop(serve);
    for step in ["sync:0", "switch:0", "conclude"] {
        let serve = Serve::start(data.path());
        let api = Api::login(&serve.base).await;
        let fo = api.ok(M::POST, &format!("/v1/plans/{plan}/failover"), None).await;
        assert_eq!(api.wait_session(fo["session_id"].as_str().unwrap()).await["result"], "Success");
        drop(serve);
        let mut serve = Serve::start_killing(data.path(), Some(step));
        let api = Api::login(&serve.base).await;
        let fb = api.ok(M::POST, &format!("/v1/plans/{plan}/failback"), None).await;
        let session = fb["session_id"].as_str().unwrap().to_string();
        assert!(serve.died_of_sigkill(), "{step}");
        points_intact(data.path()).await;
        let serve = Serve::start(data.path());
        let api = Api::login(&serve.base).await;
        let s = api.wait_session(&session).await;
        assert_eq!(s["result"], "Success", "failback after SIGKILL at {step}: {s}");
        let log = api.log(&session).await;
        assert!(log.iter().any(|l| l.contains("production equals the replica")), "{step}: {log:?}");
        let plan_now = api.ok(M::GET, &format!("/v1/plans/{plan}"), None).await;
        assert_eq!(plan_now["state"], "Failback", "{step}");
        let commit = api.ok(M::POST, &format!("/v1/plans/{plan}/commit-failback"), None).await;
        assert_eq!(api.wait_session(commit["session_id"].as_str().unwrap()).await["result"], "Success");
        // Production runs after the failback; power it off for the next round.
        let off = api.ok(M::POST, &format!("/v1/vms/{vm}/power-off"), None).await;
        assert_eq!(api.wait_session(off["session_id"].as_str().unwrap()).await["result"], "Success");
        points_intact(data.path()).await;
        drop(serve);
    }
}

/// The sessions that act on an object, newest first.
async fn sessions_of(api: &Api, target: &str) -> Vec<Value> {
    let v = api.ok(reqwest::Method::GET, &format!("/v1/sessions?target_id={target}&limit=100"), None).await;
    v["items"].as_array().unwrap().clone()
}

/// The moments around the one transaction that records a plan's move (or a VM's) with the
/// session that carries it out: killed just before its commit, nothing of the request is stored
/// and the plan is where it was; killed right after, before the runner starts, the session is
/// resumed on the restart. Either way the plan takes the next action.
#[tokio::test]
async fn sigkill_around_the_commit_of_a_plan_move_and_its_session_leaves_a_plan_that_acts() {
    use reqwest::Method as M;
    let guest = guest_dir();
    assert!(guest.join("guest.json").is_file(), "the tiny guest is missing: run scripts/build-guest first");
    let data = tempfile::Builder::new().prefix("drc").tempdir_in("/tmp").unwrap();
    let _reaper = QemuReaper(data.path().to_path_buf());
    let serve = Serve::start(data.path());
    let api = Api::login(&serve.base).await;
    let (host, ds, vm) = vm_on_prod_and_dr(&api, data.path(), &guest).await;
    let job_body = json!({"name": "j", "vm_ids": [vm], "target_host_id": host["id"],
        "target_datastore_id": ds[1]["id"], "schedule": {"type": "Manual"}, "retention_points": 3});
    let job = api.ok(M::POST, "/v1/replication-jobs", Some(job_body)).await["id"].as_str().unwrap().to_string();
    let run = api.ok(M::POST, &format!("/v1/replication-jobs/{job}/run"), None).await;
    assert_eq!(api.wait_session(run["session_id"].as_str().unwrap()).await["result"], "Success");
    let plan_body = json!({"name": "p", "groups": [{"name": "g", "critical": true, "vms": [{"vm_id": vm}]}]});
    let plan = api.ok(M::POST, "/v1/plans", Some(plan_body)).await["id"].as_str().unwrap().to_string();
    let state_before = api.ok(M::GET, &format!("/v1/plans/{plan}"), None).await["state"].clone();
    drop(serve);

    // 1. Killed just before the commit of the failover's plan move and session: neither is
    //    stored, and the failover can be started again and runs to its end.
    let mut serve = Serve::start_killing_at(data.path(), "before-commit:PlanFailover");
    let api = Api::login(&serve.base).await;
    api.unanswered(M::POST, &format!("/v1/plans/{plan}/failover")).await;
    assert!(serve.died_of_sigkill());
    let serve = Serve::start(data.path());
    let api = Api::login(&serve.base).await;
    assert_eq!(api.ok(M::GET, &format!("/v1/plans/{plan}"), None).await["state"], state_before);
    assert!(sessions_of(&api, &plan).await.is_empty(), "no session was recorded");
    let fo = api.ok(M::POST, &format!("/v1/plans/{plan}/failover"), None).await;
    assert_eq!(api.wait_session(fo["session_id"].as_str().unwrap()).await["result"], "Success");
    assert_eq!(api.ok(M::GET, &format!("/v1/plans/{plan}"), None).await["state"], "Failover");
    drop(serve);

    // 2. Killed right after the commit of the undo's plan move and session, before its runner
    //    started: the restart resumes the session, which lands the plan in UNDO FAILOVER.
    let mut serve = Serve::start_killing_at(data.path(), "after-commit:PlanUndoFailover");
    let api = Api::login(&serve.base).await;
    api.unanswered(M::POST, &format!("/v1/plans/{plan}/undo")).await;
    assert!(serve.died_of_sigkill());
    let serve = Serve::start(data.path());
    let api = Api::login(&serve.base).await;
    let undo = sessions_of(&api, &plan).await[0].clone();
    assert_eq!(undo["kind"], "PlanUndoFailover", "{undo}");
    let undo = undo["id"].as_str().unwrap().to_string();
    let s = api.wait_session(&undo).await;
    assert_eq!(s["result"], "Success", "{s}");
    assert!(api.log(&undo).await.iter().any(|l| l.contains("resumed after a restart")));
    assert_eq!(api.ok(M::GET, &format!("/v1/plans/{plan}"), None).await["state"], "UndoFailover");
    // And it fails over again from there.
    let fo = api.ok(M::POST, &format!("/v1/plans/{plan}/failover"), None).await;
    assert_eq!(api.wait_session(fo["session_id"].as_str().unwrap()).await["result"], "Success");
    let undo = api.ok(M::POST, &format!("/v1/plans/{plan}/undo"), None).await;
    assert_eq!(api.wait_session(undo["session_id"].as_str().unwrap()).await["result"], "Success");
    drop(serve);

    // 3. A VM's power-on, killed just before its commit: the VM stays Off with no session, and
    //    powers on and off again.
    let mut serve = Serve::start_killing_at(data.path(), "before-commit:VmPowerOn");
    let api = Api::login(&serve.base).await;
    api.unanswered(M::POST, &format!("/v1/vms/{vm}/power-on")).await;
    assert!(serve.died_of_sigkill());
    let serve = Serve::start(data.path());
    let api = Api::login(&serve.base).await;
    assert_eq!(api.ok(M::GET, &format!("/v1/vms/{vm}"), None).await["power_state"], "Off");
    let kinds: Vec<Value> = sessions_of(&api, &vm).await.iter().map(|s| s["kind"].clone()).collect();
    assert_eq!(kinds, [json!("VmCreate")]);
    let on = api.ok(M::POST, &format!("/v1/vms/{vm}/power-on"), None).await;
    assert_eq!(api.wait_session(on["session_id"].as_str().unwrap()).await["result"], "Success");
    let off = api.ok(M::POST, &format!("/v1/vms/{vm}/power-off"), None).await;
    assert_eq!(api.wait_session(off["session_id"].as_str().unwrap()).await["result"], "Success");

    // Every session is finished, none half-done.
    let all = api.ok(M::GET, "/v1/sessions?limit=100", None).await;
    for s in all["items"].as_array().unwrap() {
        assert_eq!(s["state"], "Stopped", "{s}");
        assert_eq!(s["result"], "Success", "{s}");
    }
    drop(serve);
}
