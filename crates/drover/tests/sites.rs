//! Three sites on three network namespaces the test makes: the control plane, the production
//! host and the DR host, each its own `drover` process (`ip netns exec`), joined by veth pairs
//! through a bridge in a fourth namespace, addresses in 10.213.0.0/24 that exist only there. The
//! test's own client (HTTP API and the control plane's agent client) runs on a thread inside the
//! control plane's namespace. Real QEMU (TCG) and the tiny guest (`scripts/build-guest`).
//!
//! The story: enrolment and a seed; a link cut between production and DR in the middle of a
//! transfer, which resumes; the production agent SIGKILLed at each step of a replication run and
//! restarted; the production site lost and the plan failed over to DR; production returning
//! fenced; undo; failback of what was written at DR, and its commit.

mod common;

use common::{
    Api, BIN, PASSWORD, Proc, QemuReaper, agent_client, guest_dir, same, start_behind_drovers_back, wait_fenced,
    wait_for,
};

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_agent_api::HostAgent as _;
use reqwest::Method as M;
use serde_json::json;

const CP_ADDR: &str = "10.213.0.1";
const PROD_ADDR: &str = "10.213.0.2";
const DR_ADDR: &str = "10.213.0.3";
/// What the production agent sends to other agents, at most, per second: slow enough that a
/// few MiB take seconds, so a cut link or a kill lands in the middle of a transfer.
const PROD_CAP: &str = "4MiB";
const MIB: u64 = 1 << 20;

/// Runs a command to success; panics with what it printed otherwise.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// The test's network namespaces: `hub` holds a bridge, and `cp`, `prod` and `dr` each a veth
/// into it. Dropped (also on a panic): every process still inside one is killed (only the
/// test's own: the namespaces are its) and the namespaces are deleted, with their veths and
/// nftables tables.
struct Net {
    hub: String,
    cp: String,
    prod: String,
    dr: String,
}

impl Net {
    fn new() -> Net {
        let pid = std::process::id();
        let name = |s: &str| format!("drover-{pid}-{s}");
        let net = Net { hub: name("hub"), cp: name("cp"), prod: name("prod"), dr: name("dr") };
        for ns in net.all() {
            // A name left by an earlier run of this pid (a crash) is not ours to keep.
            if Path::new("/run/netns").join(ns).exists() {
                ip(&["netns", "del", ns]);
            }
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&["-n", &net.hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &net.hub, "link", "set", "br0", "up"]);
        for (ns, port, addr) in [(&net.cp, "cp", CP_ADDR), (&net.prod, "prod", PROD_ADDR), (&net.dr, "dr", DR_ADDR)] {
            ip(&["-n", &net.hub, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns]);
            ip(&["-n", &net.hub, "link", "set", port, "master", "br0", "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
        }
        net
    }

    fn all(&self) -> [&String; 4] {
        [&self.hub, &self.cp, &self.prod, &self.dr]
    }

    /// The processes inside a namespace.
    fn pids(ns: &str) -> Vec<i32> {
        let out = Command::new("ip").args(["netns", "pids", ns]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Drops everything from and to `peer` in namespace `ns` (nftables, both directions) until
    /// the returned guard is dropped.
    fn cut(ns: &str, peer: &str) -> Cut {
        let script = format!(
            "table inet drover_cut {{\n chain input {{ type filter hook input priority -10; policy accept; ip saddr {peer} drop; }}\n \
             chain output {{ type filter hook output priority -10; policy accept; ip daddr {peer} drop; }}\n}}\n"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft (apt-get install nftables)");
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft refused {script}");
        Cut { ns: ns.to_string() }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.all() {
            for pid in Net::pids(ns) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        for ns in self.all() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A link cut by an nftables table; dropping it deletes the table (the link is back).
struct Cut {
    ns: String,
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.ns, "nft", "delete", "table", "inet", "drover_cut"])
            .status();
    }
}

/// What the replication scenarios add to the API client.
trait Replication {
    async fn start_run(&self, job: &str) -> String;
    async fn run_job(&self, job: &str) -> Vec<String>;
    async fn task_progress(&self, session: &str) -> (bool, u64);
}

impl Replication for Api {
    /// Starts a run of a replication job; its session id.
    async fn start_run(&self, job: &str) -> String {
        let run = self.ok(M::POST, &format!("/v1/replication-jobs/{job}/run"), None).await;
        run["session_id"].as_str().unwrap().to_string()
    }

    /// Runs a replication job to success; returns its session's log.
    async fn run_job(&self, job: &str) -> Vec<String> {
        let session = self.start_run(job).await;
        let s = self.wait_session(&session).await;
        let lines = self.log(&session).await;
        assert_eq!(s["result"], "Success", "{s}: {lines:?}");
        lines
    }

    /// The VM task's progress in a running session: which of its steps has ended.
    async fn task_progress(&self, session: &str) -> (bool, u64) {
        let s = self.session(session).await;
        let running = s["state"] != "Stopped";
        let p = s["tasks"].as_array().and_then(|t| t.first()).and_then(|t| t["progress"].as_u64()).unwrap_or(0);
        (running, p)
    }
}

/// A replication task's progress after each of its steps (weights 1, 8, 1, 1, 1 of 12):
/// `prepare` done at 8 %, `transfer` at 75 %, `publish` at 83 %, `release` at 91 %.
const AFTER_PREPARE: u64 = 8;
const AFTER_TRANSFER: u64 = 75;
const AFTER_PUBLISH: u64 = 83;

/// Writes `len` bytes of incompressible data at `offset` of a qcow2 image (not in use).
fn write_random(image: &Path, scratch: &Path, seed: u64, offset: u64, len: u64) {
    let mut x = seed | 1;
    let mut buf = Vec::with_capacity(len as usize);
    while (buf.len() as u64) < len {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        buf.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    buf.truncate(len as usize);
    std::fs::write(scratch, &buf).unwrap();
    run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c"])
        .arg(format!("write -q -s {} {offset} {len}", scratch.display()))
        .arg(image));
    std::fs::remove_file(scratch).unwrap();
}

fn readable(point: &Path) -> bool {
    Command::new("qemu-img").args(["check", "-q", "-U"]).arg(point).status().unwrap().success()
}

/// A replica disk's point files, oldest first.
fn points(chain: &Path) -> Vec<PathBuf> {
    let mut found: Vec<_> = std::fs::read_dir(chain)
        .unwrap_or_else(|e| panic!("{}: {e}", chain.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "qcow2")
                && !p.file_name().unwrap().to_string_lossy().starts_with("boot-")
        })
        .map(|p| (std::fs::metadata(&p).unwrap().modified().unwrap(), p))
        .collect();
    found.sort();
    found.into_iter().map(|(_, p)| p).collect()
}

/// The production agent's command line: fixed ports in its namespace, so a restart keeps its
/// address.
fn prod_args(root: &Path, enroll: Option<(&str, &str)>) -> Vec<String> {
    let mut a: Vec<String> =
        ["agent", "--listen", &format!("{PROD_ADDR}:7000"), "--hypervisor", "qemu", "--accel", "tcg"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    a.extend(["--data-listen".into(), format!("{PROD_ADDR}:7001"), "--bandwidth-cap".into(), PROD_CAP.into()]);
    a.extend(["--import-dir".into(), guest_dir().to_string_lossy().into_owned()]);
    a.extend(["--data-dir".into(), root.join("pa").to_string_lossy().into_owned()]);
    if let Some((url, token)) = enroll {
        a.extend(["--enroll".into(), url.into(), token.into()]);
    }
    a
}

/// `drover args…` inside namespace `ns` (`ip netns exec` execs it: the child is drover itself).
fn in_netns_cmd(ns: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, BIN]).args(args).env("DROVER_ADMIN_PASSWORD", PASSWORD);
    cmd
}

fn start_agent(ns: &str, args: &[String], log: PathBuf) -> (Proc, String, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut proc = Proc::spawn(in_netns_cmd(ns, &args), log);
    let rest = proc.line("drover agent for host ");
    let (host, url) = rest.split_once(" serving on ").unwrap();
    (proc, host.to_string(), url.to_string())
}

/// The control plane's own client of an agent (its certificate, from its CA), for what the API
/// does not do: writing and reading a guest's marker, starting a VM behind drover's back.
/// SIGKILLs the QEMU processes of a VM inside a namespace (the VM's uuid is on their command
/// line): the host is lost.
fn kill_vm(ns: &str, vm: &str) -> usize {
    let mut killed = 0;
    for pid in Net::pids(ns) {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("qemu-system") && cmdline.contains(vm) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

/// Runs `f` on a thread inside network namespace `ns`, on its own runtime; re-raises its panic.
fn in_netns<T: Send + 'static>(ns: &str, f: impl AsyncFnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(f())
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

#[test]
fn three_sites_on_network_namespaces_survive_a_cut_link_killed_agents_and_the_loss_of_production() {
    let started = Instant::now();
    // Dropped after `net` (also on a panic): the QEMU processes writing into it are gone first.
    let dir = tempfile::Builder::new().prefix("sites").tempdir_in("/tmp").unwrap();
    let _reaper = QemuReaper(dir.path().to_path_buf());
    let net = Net::new();
    let (cp_ns, prod_ns, dr_ns) = (net.cp.clone(), net.prod.clone(), net.dr.clone());
    let root = dir.path().to_path_buf();
    in_netns(&net.cp.clone(), async move || story(root, cp_ns, prod_ns, dr_ns).await);
    drop(net);
    drop(dir);
    println!("sites: {:.1} s", started.elapsed().as_secs_f64());
}

async fn story(root: PathBuf, cp_ns: String, prod_ns: String, dr_ns: String) {
    let cp_data = root.join("cp");
    let cp_data_s = cp_data.to_string_lossy().into_owned();
    let listen = format!("{CP_ADDR}:8080");
    let agent_listen = format!("{CP_ADDR}:8443");
    let mut serve = Proc::spawn(
        in_netns_cmd(
            &cp_ns,
            &[
                "serve",
                "--listen",
                &listen,
                "--vro-listen",
                "off",
                "--em-listen",
                "off",
                "--agent-listen",
                &agent_listen,
            ]
            .into_iter()
            .chain(["--plain-http", "--hypervisor", "simulated", "--data-dir", &cp_data_s])
            .collect::<Vec<_>>(),
        ),
        root.join("serve.log"),
    );
    let base = serve.line("drover serving on ").split_whitespace().next().unwrap().to_string();
    let enrol_url = serve.line("agents: ").split_whitespace().next().unwrap().to_string();
    assert!(base.contains(CP_ADDR) && enrol_url.contains(CP_ADDR), "{base} {enrol_url}");
    let api = Api::login(&base).await;

    // 1. Enrolment over the veths: each agent reaches the control plane at its namespace's
    // address, and is reached at its own.
    let (prod_id, dr_id) = api.prod_and_dr_hosts().await;
    let prod_token = api.enrolment_token(&prod_id).await;
    let (mut prod_agent, host, prod_url) =
        start_agent(&prod_ns, &prod_args(&root, Some((&enrol_url, &prod_token))), root.join("pa.log"));
    assert_eq!(host, prod_id);
    assert_eq!(prod_url, format!("https://{PROD_ADDR}:7000"));
    let dr_token = api.enrolment_token(&dr_id).await;
    let dr_args: Vec<String> =
        ["agent", "--listen", &format!("{DR_ADDR}:7000"), "--hypervisor", "qemu", "--accel", "tcg"]
            .iter()
            .map(|s| s.to_string())
            .chain(["--import-dir".into(), guest_dir().to_string_lossy().into_owned()])
            .chain(["--data-listen".into(), format!("{DR_ADDR}:7001")])
            .chain(["--data-dir".into(), root.join("da").to_string_lossy().into_owned()])
            .chain(["--enroll".into(), enrol_url.clone(), dr_token])
            .collect();
    let (_dr_agent, host, dr_url) = start_agent(&dr_ns, &dr_args, root.join("da.log"));
    assert_eq!(host, dr_id);
    api.ok(M::PATCH, &format!("/v1/hosts/{prod_id}"), Some(json!({"address": prod_url}))).await;
    api.ok(M::PATCH, &format!("/v1/hosts/{dr_id}"), Some(json!({"address": dr_url}))).await;
    let (prod_ds, dr_ds) = api.prod_and_dr_datastores(root.as_ref(), &prod_id, &dr_id).await;
    for id in [&prod_id, &dr_id] {
        let state = api.ok(M::GET, &format!("/v1/hosts/{id}/agent"), None).await;
        assert_eq!(state["state"], "connected", "{state}");
    }

    // A VM on the production agent: `data` is the guest's filesystem (its marker), `bulk` a
    // disk the guest leaves alone, which the test fills while the VM is off.
    let guest = guest_dir();
    let vm_id = api.create_vm(json!({"name": "db", "host_id": prod_id, "datastore_id": prod_ds["id"], "vcpus": 1,
                "memory_mib": 128, "disks": [{"name": "data", "size_bytes": 32 * MIB}, {"name": "bulk", "size_bytes": 64 * MIB}],
                "boot": {"kernel": guest.join("vmlinux"), "initrd": guest.join("initramfs.img"),
                    "cmdline": "console=ttyS0 quiet"}})).await;
    let source = |disk: &str| root.join("pa/datastores/ds").join(&vm_id).join(format!("{disk}.qcow2"));
    let scratch = root.join("random.bin");
    write_random(&source("bulk"), &scratch, 1, 0, MIB);
    let job = api.manual_job(&vm_id, &dr_id, &dr_ds, 20).await;

    // The seed, pulled by the DR agent from the production agent across the bridge; each
    // disk's point equals its source.
    let lines = api.run_job(&job).await;
    assert!(lines.iter().any(|l| l.contains("seed") && l.contains("pulled by the target's agent")), "{lines:?}");
    let replicas = api.ok(M::GET, "/v1/replicas", None).await;
    let replica = replicas["items"][0].clone();
    let replica_id = replica["id"].as_str().unwrap().to_string();
    let chain = |disk: &str| root.join("da/datastores/ds").join(&replica_id).join(disk);
    // After each run while the VM is off: the newest point of each disk equals its source, and
    // a copy of the source is kept; every point published so far still equals the copy taken
    // when it was published, and every point file passes `qemu-img check`.
    let copies = root.join("copies");
    std::fs::create_dir_all(&copies).unwrap();
    let mut published: Vec<(PathBuf, PathBuf)> = Vec::new();
    let mut verify = |what: &str| {
        for disk in ["data", "bulk"] {
            let all = points(&chain(disk));
            let newest = all.last().unwrap().clone();
            assert!(
                same(&source(disk), &newest),
                "{what}: {disk}: the newest point {} equals the source",
                newest.display()
            );
            if !published.iter().any(|(p, _)| *p == newest) {
                let copy = copies.join(format!("{disk}-{}.qcow2", published.len()));
                std::fs::copy(source(disk), &copy).unwrap();
                published.push((newest, copy));
            }
            for p in &all {
                assert!(readable(p), "{what}: {disk}: the point {} is readable", p.display());
            }
        }
        for (point, copy) in &published {
            assert!(same(copy, point), "{what}: the point {} still holds what it was published with", point.display());
        }
        println!("{what}: {} points verified", published.len());
    };
    verify("seed");

    // 2. The link between production and DR is cut in the middle of a transfer (nftables in
    // the production namespace drops everything to and from DR) and restored a few seconds
    // later: the transfer goes on and the run succeeds.
    write_random(&source("bulk"), &scratch, 2, 4 * MIB, 24 * MIB);
    let files = points(&chain("bulk")).len();
    let session = api.start_run(&job).await;
    // The new point file on DR: the pull of `bulk` begins (24 MiB at 4 MiB/s: about 6 s).
    wait_for("the transfer to start", 60, async || points(&chain("bulk")).len() > files).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (running, progress) = api.task_progress(&session).await;
    assert!(running && (AFTER_PREPARE..AFTER_TRANSFER).contains(&progress), "the transfer runs ({progress} %)");
    let cut = Net::cut(&prod_ns, DR_ADDR);
    // While it is cut, the DR host cannot reach production's data listener (bounded by timeout).
    let reached = Command::new("ip")
        .args(["netns", "exec", &dr_ns, "timeout", "2", "bash", "-c", &format!("exec 3<>/dev/tcp/{PROD_ADDR}/7001")])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!reached.success(), "the DR host reached production through the cut");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (running, progress) = api.task_progress(&session).await;
    assert!(running && progress < AFTER_TRANSFER, "the cut landed in the middle of the transfer ({progress} %)");
    drop(cut);
    let s = api.wait_session(&session).await;
    let lines = api.log(&session).await;
    assert_eq!(s["result"], "Success", "{s}: {lines:?}");
    for l in lines.iter().filter(|l| l.contains("pulled by") || l.contains("reach") || l.contains("resum")) {
        println!("cut link: {l}");
    }
    // Only what changed crossed, once: what the wire carried beyond it is framing (and any
    // resend after the cut), printed above.
    let bulk = lines.iter().find(|l| l.starts_with("disk bulk:") && l.contains("pulled by")).unwrap();
    assert!(bulk.contains(&format!("for {} bytes of data", 24 * MIB)), "{bulk}");
    verify("cut link");

    // 3. The production agent SIGKILLed at each step of a run, and restarted (same data dir,
    // same ports, no new enrolment): the run succeeds or fails cleanly, the next one succeeds,
    // and every point still verifies.
    //  - prepare: killed before the run; the first step finds it unreachable.
    //  - transfer: killed while the DR agent pulls the cut from it.
    //  - release (`publish` only writes the control plane's store): the control plane is cut
    //    off from production once the transfer is under way (the pull between the agents goes
    //    on), so `release` (ending the cut on production) hangs; the agent is killed there and
    //    the link restored.
    for (i, at) in ["prepare", "transfer", "release"].into_iter().enumerate() {
        write_random(&source("bulk"), &scratch, 10 + i as u64, (30 + 8 * i as u64) * MIB, 8 * MIB);
        let files = points(&chain("bulk")).len();
        let session = match at {
            "prepare" => {
                prod_agent.kill();
                let session = api.start_run(&job).await;
                wait_for("the run to try production", 30, async || {
                    api.log(&session).await.iter().any(|l| l.contains("step prepare:0 failed"))
                })
                .await;
                session
            }
            "transfer" => {
                let session = api.start_run(&job).await;
                wait_for("the transfer to start", 60, async || points(&chain("bulk")).len() > files).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                prod_agent.kill();
                session
            }
            _ => {
                let session = api.start_run(&job).await;
                // The new point file on DR: the cut on production has begun.
                wait_for("the transfer to start", 60, async || points(&chain("bulk")).len() > files).await;
                let cut = Net::cut(&prod_ns, CP_ADDR);
                wait_for("the run to publish", 60, async || api.task_progress(&session).await.1 >= AFTER_PUBLISH).await;
                prod_agent.kill();
                drop(cut);
                session
            }
        };
        let (running, progress) = api.task_progress(&session).await;
        println!("kill at {at}: the run was at {progress} % (running: {running})");
        let (again, host, _) = start_agent(&prod_ns, &prod_args(&root, None), root.join("pa.log"));
        prod_agent = again;
        assert_eq!(host, prod_id, "the restarted agent is the same host, no new enrolment");
        let s = api.wait_session(&session).await;
        let lines = api.log(&session).await;
        println!("kill at {at}: {} ({})", s["result"], s["failure_message"]);
        assert!(s["result"] == "Success" || s["state"] == "Stopped", "{s}: {lines:?}");
        let felt = match at {
            "prepare" => lines.iter().any(|l| l.contains("step prepare:0 failed")),
            "transfer" => lines
                .iter()
                .any(|l| l.contains("step transfer:0 failed") || l.contains("reconnection") || l.contains("restarted")),
            _ => lines.iter().any(|l| l.contains("step release:0 failed")),
        };
        assert!(felt, "the kill at {at} shows in the session: {lines:?}");
        for l in lines.iter().filter(|l| !l.contains("bitmap mode") || l.contains("reconnect")) {
            println!("kill at {at}: {l}");
        }
        if s["result"] != "Success" {
            api.run_job(&job).await;
        }
        verify(&format!("kill at {at}"));
    }

    // 4. The site is lost while the VM runs: the VM is powered on, a marker written, a point
    // taken live; then the production agent and its QEMU are SIGKILLed and the plan fails over.
    let on = api.ok(M::POST, &format!("/v1/vms/{vm_id}/power-on"), None).await;
    let s = api.wait_session(on["session_id"].as_str().unwrap()).await;
    let lines = api.log(on["session_id"].as_str().unwrap()).await;
    assert_eq!(s["result"], "Success", "{s}: {lines:?}");
    let vm_uuid: uuid::Uuid = vm_id.parse().unwrap();
    let prod = agent_client(&cp_data, &prod_id, &prod_url).await;
    prod.vm_write_marker(vm_uuid, "before the disaster").await.unwrap();
    api.run_job(&job).await;
    let plan_id = api.heartbeat_plan(&vm_id).await;
    prod_agent.kill();
    assert_eq!(kill_vm(&prod_ns, &vm_id), 1, "the production VM's QEMU was running");
    let lines = api.plan_action(&plan_id, "failover", None).await;
    assert!(lines.iter().any(|l| l.contains("production host cannot be reached")), "{lines:?}");
    let replica = api.ok(M::GET, &format!("/v1/replicas/{replica_id}"), None).await;
    assert_eq!(replica["state"], "Failover", "{replica}");
    let replica_uuid: uuid::Uuid = replica_id.parse().unwrap();
    let dr = agent_client(&cp_data, &dr_id, &dr_url).await;
    let hb = dr.vm_wait_heartbeat(replica_uuid, Duration::from_secs(120)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("before the disaster"), "the replica shows production's marker");

    // 5. Production returns (its agent, same identity and address) and its VM is started behind
    // drover's back: the control plane's monitor powers it off, and replication is refused.
    let (again, _, _) = start_agent(&prod_ns, &prod_args(&root, None), root.join("pa.log"));
    prod_agent = again;
    let prod = agent_client(&cp_data, &prod_id, &prod_url).await;
    start_behind_drovers_back(&prod, &prod_ds, vm_uuid, &["data", "bulk"]).await;
    let behind = Instant::now();
    wait_fenced(&api, &prod, vm_uuid).await;
    // The control plane says it fenced it.
    println!("fenced after {:.1} s", behind.elapsed().as_secs_f64());
    let serve_log = std::fs::read_to_string(root.join("serve.log")).unwrap();
    assert!(serve_log.contains("fencing: production VM runs while its replica is failed over"), "{serve_log}");
    let session = api.start_run(&job).await;
    let s = api.wait_session(&session).await;
    assert_ne!(s["result"], "Success", "replication from a fenced production ran: {s}");
    println!("refused: {}", s["failure_message"]);

    // Undo: the replica's VM goes, replication resumes and its point verifies.
    api.plan_action(&plan_id, "undo", None).await;
    assert_eq!(dr.vm_status(replica_uuid).await.unwrap(), drover_agent_api::PowerState::Off);
    api.run_job(&job).await;
    verify("after undo");

    // Failover again, production reachable this time; the replica writes at DR; failback brings
    // that back to production (pulled by production's agent from the DR agent's data listener,
    // across the bridge), and the commit returns the replica to Ready.
    let lines = api.plan_action(&plan_id, "failover", None).await;
    assert!(!lines.iter().any(|l| l.contains("cannot be reached")), "{lines:?}");
    dr.vm_wait_heartbeat(replica_uuid, Duration::from_secs(120)).await.unwrap();
    dr.vm_write_marker(replica_uuid, "written at DR").await.unwrap();
    let lines = api.plan_action(&plan_id, "failback", None).await;
    assert!(lines.iter().any(|l| l.contains("synced to production by hash-compare between the agents")), "{lines:?}");
    // The switchover, with the replica stopped cleanly and production untouched since the sync,
    // sends only what the replica's bitmap recorded after the sync's cut.
    assert!(lines.iter().any(|l| l.contains("switched over by bitmap between the agents")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("production equals the replica")), "{lines:?}");
    let hb = prod.vm_wait_heartbeat(vm_uuid, Duration::from_secs(120)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("written at DR"), "production shows what was written at DR");
    api.plan_action(&plan_id, "commit-failback", None).await;
    let replica = api.ok(M::GET, &format!("/v1/replicas/{replica_id}"), None).await;
    assert_eq!(replica["state"], "Ready", "{replica}");
    assert_eq!(dr.vm_status(replica_uuid).await.unwrap(), drover_agent_api::PowerState::Off);
    api.run_job(&job).await;
    println!("failback and commit: ok");
    drop(prod_agent);
    drop(serve);
}
