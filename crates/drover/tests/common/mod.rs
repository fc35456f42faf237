//! What several of drover's end-to-end tests share. Each test crate includes this module and
//! uses a part of it.
#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::Method as M;
use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_drover");
pub const PASSWORD: &str = "correct-horse-battery";

/// A child process, killed when dropped (also when a test panics), with the lines it printed.
pub struct Proc {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with its stdout read line by line and its stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        cmd.env_remove("DROVER_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap());
        let mut child = cmd.spawn().expect("start drover");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines, log }
    }

    /// The rest of the first printed line that starts with `prefix` (after trimming), within 60 s.
    pub fn line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.trim().strip_prefix(prefix) {
                        return rest.to_string();
                    }
                }
                Err(_) => break,
            }
        }
        let _ = self.child.kill();
        panic!("no line {prefix:?}; stderr:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
    }

    /// SIGKILL, then reaped.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The native API as the administrator.
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    pub async fn login(base: &str) -> Api {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let v: Value = http
            .post(format!("{base}/v1/token"))
            .form(&[("grant_type", "password"), ("username", "admin"), ("password", PASSWORD)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Api { http, base: base.into(), token: v["access_token"].as_str().unwrap().into() }
    }

    pub async fn send(&self, method: M, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn ok(&self, method: M, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.send(method.clone(), path, body).await;
        assert!((200..300).contains(&status), "{method} {path}: {status} {v}");
        v
    }

    /// Sends a request to a server that is about to kill itself: no answer is expected.
    pub async fn unanswered(&self, method: M, path: &str) {
        let sent = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token).send().await;
        assert!(sent.is_err(), "{path}: the server answered {:?} instead of dying", sent.map(|r| r.status()));
    }

    pub async fn session(&self, id: &str) -> Value {
        self.ok(M::GET, &format!("/v1/sessions/{id}"), None).await
    }

    /// Waits (up to 3 minutes) for a session to stop or halt.
    pub async fn wait_session(&self, id: &str) -> Value {
        for _ in 0..1800 {
            let s = self.session(id).await;
            if s["state"] == "Stopped" || s["halted"] == true {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("session {id} did not finish (or halt)");
    }

    /// Sites `prod` and `dr`, each with a host for a `drover agent` (its address set once it
    /// serves); the two hosts' ids.
    pub async fn prod_and_dr_hosts(&self) -> (String, String) {
        let mut hosts = Vec::new();
        for (name, kind) in [("prod", "Production"), ("dr", "DisasterRecovery")] {
            let site = self.ok(M::POST, "/v1/sites", Some(serde_json::json!({"name": name, "kind": kind}))).await;
            let body = serde_json::json!({"site_id": site["id"], "name": name, "address": "https://127.0.0.1:1"});
            let h = self.ok(M::POST, "/v1/hosts", Some(body)).await;
            hosts.push(h["id"].as_str().unwrap().to_string());
        }
        let dr = hosts.pop().unwrap();
        (hosts.pop().unwrap(), dr)
    }

    /// A one-time enrolment token for a host's agent.
    pub async fn enrolment_token(&self, host: &str) -> String {
        let v = self.ok(M::POST, &format!("/v1/hosts/{host}/enrolment"), None).await;
        v["token"].as_str().unwrap().to_string()
    }

    /// Datastores `p` on `prod` and `d` on `dr`, in the agents' data directories `pa` and `da`
    /// under `root`.
    pub async fn prod_and_dr_datastores(&self, root: &Path, prod: &str, dr: &str) -> (Value, Value) {
        let mut made = Vec::new();
        for (host, name, dir) in [(prod, "p", "pa"), (dr, "d", "da")] {
            let path = root.join(dir).join("datastores/ds");
            let body = serde_json::json!({"host_id": host, "name": name, "path": path});
            made.push(self.ok(M::POST, "/v1/datastores", Some(body)).await);
        }
        let dr = made.pop().unwrap();
        (made.pop().unwrap(), dr)
    }

    /// Runs a plan action (`POST /v1/plans/{plan}/{action}`), waits for its session, asserts it
    /// succeeded and returns its log.
    pub async fn plan_action(&self, plan: &str, action: &str, body: Option<Value>) -> Vec<String> {
        let started = self.ok(M::POST, &format!("/v1/plans/{plan}/{action}"), body).await;
        let session = started["session_id"].as_str().unwrap().to_string();
        let s = self.wait_session(&session).await;
        let lines = self.log(&session).await;
        assert_eq!(s["result"], "Success", "{action}: {s}: {lines:?}");
        lines
    }

    /// Creates a VM (`POST /v1/vms` with `body`), waits for its creation to succeed; its id.
    pub async fn create_vm(&self, body: Value) -> String {
        let vm = self.ok(M::POST, "/v1/vms", Some(body)).await;
        let s = self.wait_session(vm["session_id"].as_str().unwrap()).await;
        assert_eq!(s["result"], "Success", "{s}");
        s["target_id"].as_str().unwrap().to_string()
    }

    /// A manually run replication job of `vm` to datastore `ds` (on host `host`), keeping
    /// `retention` points; its id.
    pub async fn manual_job(&self, vm: &str, host: &str, ds: &Value, retention: u32) -> String {
        let body = serde_json::json!({"name": "j", "vm_ids": [vm], "target_host_id": host,
            "target_datastore_id": ds["id"], "schedule": {"type": "Manual"}, "retention_points": retention});
        self.ok(M::POST, "/v1/replication-jobs", Some(body)).await["id"].as_str().unwrap().to_string()
    }

    /// A plan with `vm` that waits for its heartbeat (up to 120 s); its id.
    pub async fn heartbeat_plan(&self, vm: &str) -> String {
        let body = serde_json::json!({"name": "p", "groups": [{"name": "g", "critical": true, "vms": [{"vm_id": vm,
            "steps": [{"name": "up", "kind": {"type": "WaitHeartbeat", "timeout_secs": 120}}]}]}]});
        self.ok(M::POST, "/v1/plans", Some(body)).await["id"].as_str().unwrap().to_string()
    }

    /// A session's log messages, oldest first.
    pub async fn log(&self, id: &str) -> Vec<String> {
        let v = self.ok(M::GET, &format!("/v1/sessions/{id}/log"), None).await;
        v["items"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap().to_string()).collect()
    }
}

/// The tiny guest (`scripts/build-guest`), which real-QEMU tests boot.
pub fn guest_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out");
    assert!(dir.join("vmlinux").exists(), "build the tiny guest first: scripts/build-guest");
    dir.canonicalize().unwrap()
}

/// Whether two images read the same (`qemu-img compare`; they may be open elsewhere).
pub fn same(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img").args(["compare", "-q", "-U"]).arg(a).arg(b).status().unwrap().success()
}

/// Kills every QEMU process whose command line names `dir` when dropped: VMs are daemonized and
/// outlive drover and its agents by design, so a test that ends with a VM running (or fails
/// half-way) would leave it burning CPU for the rest of the run. Declare it after the temporary
/// directory, so it is dropped first.
pub struct QemuReaper(pub PathBuf);

impl Drop for QemuReaper {
    fn drop(&mut self) {
        for pid in qemu_pids(&self.0) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// The QEMU processes whose command line names `dir`.
pub fn qemu_pids(dir: &Path) -> Vec<u32> {
    let needle = dir.to_string_lossy().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c = String::from_utf8_lossy(&c);
                    c.contains("qemu-system") && c.contains(&needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The control plane's own client of an agent (its certificate, from its CA, in `cp_data`), for
/// what the API does not do: writing and reading a guest's marker.
pub async fn agent_client(cp_data: &Path, host: &str, url: &str) -> drover_agent_client::RemoteAgent {
    let ca = drover_pki::ControlPlaneCa::load(&cp_data.join("ca")).unwrap();
    let identity = ca.control_plane_identity(&["localhost".parse().unwrap()]).unwrap();
    let tls = drover_pki::client_config(&identity, ca.trusted_ca()).unwrap();
    let name = drover_pki::agent_dns_name(drover_types::HostId(host.parse::<uuid::Uuid>().unwrap()));
    let addr: std::net::SocketAddr = url.strip_prefix("https://").unwrap().parse().unwrap();
    drover_agent_client::RemoteAgent::connect_named(&name, addr, std::sync::Arc::new(tls)).await.unwrap()
}

/// Waits up to `secs` for `check` to hold.
pub async fn wait_for(what: &str, secs: u64, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Starts production VM `vm` (the tiny guest on `disks` in `datastore`, a datastore as the API
/// shows it) straight through its agent, behind drover's back, as somebody on the host would.
/// Returns how it was started.
pub async fn start_behind_drovers_back(
    agent: &drover_agent_client::RemoteAgent,
    datastore: &Value,
    vm: uuid::Uuid,
    disks: &[&str],
) -> drover_agent_api::VmRunSpec {
    use drover_agent_api::HostAgent as _;
    let ds: uuid::Uuid = datastore["id"].as_str().unwrap().parse().unwrap();
    let guest = guest_dir();
    let spec = drover_agent_api::VmRunSpec {
        id: vm,
        name: "db".into(),
        vcpus: 1,
        memory_mib: 128,
        disks: disks
            .iter()
            .enumerate()
            .map(|(index, disk)| {
                drover_agent_api::VmDisk::Image(drover_agent_api::DiskRef {
                    datastore: ds,
                    vm,
                    disk: disk.to_string(),
                    index,
                })
            })
            .collect(),
        nics: vec![],
        boot: drover_agent_api::VmBoot {
            kernel: Some(guest.join("vmlinux").to_string_lossy().into_owned()),
            initrd: Some(guest.join("initramfs.img").to_string_lossy().into_owned()),
            cmdline: Some("console=ttyS0 quiet".into()),
            firmware: Default::default(),
        },
        hardware: Default::default(),
    };
    // A restarted agent learns its datastores again from the control plane's next call.
    let path = datastore["path"].as_str().unwrap().into();
    agent.datastore_ensure(&drover_agent_api::DatastoreSpec { id: ds, path }).await.unwrap();
    agent.vm_power_on(&spec).await.unwrap();
    spec
}

/// Waits until `agent` shows VM `vm` off (fenced by the control plane's monitor), then until the
/// control plane records it off too (the same monitor pass, once the agent has done it).
pub async fn wait_fenced(api: &Api, agent: &drover_agent_client::RemoteAgent, vm: uuid::Uuid) {
    use drover_agent_api::HostAgent as _;
    wait_for("the production VM to be fenced", 60, async || {
        matches!(agent.vm_status(vm).await, Ok(drover_agent_api::PowerState::Off | drover_agent_api::PowerState::Died))
    })
    .await;
    wait_for("the control plane to record the fenced VM off", 30, async || {
        api.ok(M::GET, &format!("/v1/vms/{vm}"), None).await["power_state"] == "Off"
    })
    .await;
}

/// `drover serve` with an agent listener and the SIMULATED hypervisor for its own agent (the
/// hosts under test have `drover agent`s), on loopback.
pub struct ControlPlane {
    /// Killed when the control plane is dropped.
    _proc: Proc,
    pub api: String,
    pub agent_url: String,
    pub data: PathBuf,
}

pub fn serve(dir: &Path) -> ControlPlane {
    let data = dir.join("cp");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--vro-listen", "off", "--em-listen", "off"])
        .args(["--agent-listen", "127.0.0.1:0", "--plain-http", "--hypervisor", "simulated", "--data-dir"])
        .arg(&data)
        .env("DROVER_ADMIN_PASSWORD", PASSWORD);
    let mut proc = Proc::spawn(cmd, dir.join("serve.log"));
    let api = proc.line("drover serving on ").split_whitespace().next().unwrap().to_string();
    let agent_url = proc.line("agents: ").split_whitespace().next().unwrap().to_string();
    ControlPlane { _proc: proc, api, agent_url, data }
}
