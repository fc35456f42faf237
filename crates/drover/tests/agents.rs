//! `drover serve --agent-listen` and `drover agent`, both run as the built binary on loopback:
//! enrolment with a one-time token, the agent API over mutual TLS, who may call it, and a host
//! whose agent goes away. The hypervisor is the SIMULATED one: what is under test is the
//! control plane ↔ agent seam, not QEMU.

mod common;

use common::{
    Api, BIN, PASSWORD, Proc, QemuReaper, agent_client, guest_dir, same, serve, start_behind_drovers_back, wait_fenced,
};

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::Method as M;
use serde_json::{Value, json};

fn agent_command(data: &Path) -> Command {
    agent_command_with(data, "simulated")
}

fn agent_command_with(data: &Path, hypervisor: &str) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["agent", "--listen", "127.0.0.1:0", "--hypervisor", hypervisor, "--data-dir"]).arg(data);
    cmd
}

/// Starts an agent (enrolling it when `enroll` says where and with what); returns it, the host
/// id it says it is, and its URL.
fn agent(dir: &Path, name: &str, enroll: Option<(&str, &str)>) -> (Proc, String, String) {
    let mut cmd = agent_command(&dir.join(name));
    if let Some((url, token)) = enroll {
        cmd.args(["--enroll", url, token]);
    }
    let mut proc = Proc::spawn(cmd, dir.join(format!("{name}.log")));
    let rest = proc.line("drover agent for host ");
    let (host, url) = rest.split_once(" serving on ").unwrap();
    (proc, host.to_string(), url.to_string())
}

/// A client of an agent's API that presents `identity` (or nothing) and trusts `ca`.
async fn call_agent(
    url: &str,
    host: &str,
    ca: &drover_pki::TrustedCa,
    identity: Option<&drover_pki::TlsIdentity>,
) -> Result<u16, String> {
    let provider = drover_pki::crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates({
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.der().clone()).unwrap();
            roots
        });
    let config = match identity {
        Some(id) => drover_pki::client_config(id, ca).unwrap(),
        None => builder.with_no_client_auth(),
    };
    let name = drover_pki::agent_dns_name(drover_types::HostId(host.parse::<uuid::Uuid>().unwrap()));
    let addr: std::net::SocketAddr = url.strip_prefix("https://").unwrap().parse().unwrap();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .resolve(&name, addr)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    http.get(format!("https://{name}:{}/v1/info", addr.port()))
        .header("drover-agent-api", drover_agent_api::API_VERSION.to_string())
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"))
}

/// The certificate the agent at `url` presents to a new connection from the control plane.
async fn presented_certificate(
    url: &str,
    host: &str,
    ca: &drover_pki::TrustedCa,
    cp: &drover_pki::TlsIdentity,
) -> Vec<u8> {
    let config = std::sync::Arc::new(drover_pki::client_config(cp, ca).unwrap());
    let name = drover_pki::agent_server_name(drover_types::HostId(host.parse::<uuid::Uuid>().unwrap()));
    let tcp = tokio::net::TcpStream::connect(url.strip_prefix("https://").unwrap()).await.unwrap();
    let tls =
        tokio::time::timeout(Duration::from_secs(20), tokio_rustls::TlsConnector::from(config).connect(name, tcp))
            .await
            .unwrap()
            .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn pem_der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem).unwrap().to_vec()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_enrols_once_serves_only_its_control_plane_and_is_shown_unreachable_when_gone() {
    let dir = tempfile::tempdir().unwrap();
    let cp = serve(dir.path());
    let api = Api::login(&cp.api).await;
    let site = api.ok(M::POST, "/v1/sites", Some(json!({"name": "prod", "kind": "Production"}))).await;
    // A host's address is `local` or an agent's https://host:port; anything else is refused.
    for bad in ["10.0.0.2:7000", "http://127.0.0.1:1", "https://127.0.0.1", "https://h:1/x"] {
        let (status, v) =
            api.send(M::POST, "/v1/hosts", Some(json!({"site_id": site["id"], "name": "x", "address": bad}))).await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v["message"].as_str().unwrap().contains("https://host:port"), "{v}");
    }
    let host = api
        .ok(
            M::POST,
            "/v1/hosts",
            Some(json!({"site_id": site["id"], "name": "prod-1", "address": "https://127.0.0.1:1"})),
        )
        .await;
    let host_id = host["id"].as_str().unwrap().to_string();
    let state = api.ok(M::GET, &format!("/v1/hosts/{host_id}/agent"), None).await;
    assert_eq!(state["state"], "not_enrolled", "{state}");

    // The token: shown once, with the command to run; the store keeps only its hash.
    let (status, v) = api.send(M::POST, &format!("/v1/hosts/{host_id}/enrolment"), Some(json!({"ttl_secs": 5}))).await;
    assert_eq!(status, 400, "a 5 s token is refused: {v}");
    let enrolment = api.ok(M::POST, &format!("/v1/hosts/{host_id}/enrolment"), None).await;
    let token = enrolment["token"].as_str().unwrap().to_string();
    assert_eq!(enrolment["enrol_url"], cp.agent_url.as_str());
    assert_eq!(enrolment["command"], format!("drover agent --enroll {} {token}", cp.agent_url));
    let db = std::fs::read(cp.data.join("drover.db")).unwrap();
    assert!(!db.windows(token.len()).any(|w| w == token.as_bytes()), "the token is stored in the clear");
    // `local` hosts have no agent to enrol.
    let local =
        api.ok(M::POST, "/v1/hosts", Some(json!({"site_id": site["id"], "name": "cp", "address": "local"}))).await;
    let (status, _) = api.send(M::POST, &format!("/v1/hosts/{}/enrolment", local["id"].as_str().unwrap()), None).await;
    assert_eq!(status, 409);

    // A wrong token is refused and leaves nothing behind that later loads.
    let mut wrong = agent_command(&dir.path().join("wrong"));
    // Another secret, the same CA pin: the control plane is reached and says no.
    let at = "drover-enrol-".len() + 3;
    let flipped = if &token[at..at + 1] == "A" { "B" } else { "A" };
    let forged = format!("{}{flipped}{}", &token[..at], &token[at + 1..]);
    let out = wrong.args(["--enroll", &cp.agent_url, &forged, "--enroll-only"]).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refused the enrolment") && stderr.contains("not valid"), "{stderr}");
    assert!(!dir.path().join("wrong/identity/agent.cert.pem").exists());

    // Enrolment: the agent's certificate names the host the token was made for.
    let (mut prod, agent_host, agent_url) = agent(dir.path(), "prod", Some((&cp.agent_url, &token)));
    assert_eq!(agent_host, host_id);
    let identity_dir = dir.path().join("prod/identity");
    assert_eq!(mode(&identity_dir), 0o700);
    assert_eq!(mode(&identity_dir.join("agent.key.pem")), 0o600);
    // The token is used up: a second agent cannot enrol with it.
    let out = agent_command(&dir.path().join("second"))
        .args(["--enroll", &cp.agent_url, &token, "--enroll-only"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid"), "{}", String::from_utf8_lossy(&out.stderr));

    // The control plane reaches the agent once the host's address says where it is: a datastore
    // is registered through it, inside the agent's own datastore root only.
    api.ok(M::PATCH, &format!("/v1/hosts/{host_id}"), Some(json!({"address": agent_url}))).await;
    let root = dir.path().join("prod/datastores");
    let ds = api
        .ok(M::POST, "/v1/datastores", Some(json!({"host_id": host_id, "name": "prod-ds", "path": root.join("a")})))
        .await;
    assert_eq!(mode(&root.join("a")), 0o700, "the agent made the datastore, private");
    assert_eq!(ds["path"], root.join("a").to_str().unwrap());
    let (status, v) = api
        .send(M::POST, "/v1/datastores", Some(json!({"host_id": host_id, "name": "etc", "path": "/etc/drover-x"})))
        .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("datastore root"), "{v}");
    assert!(!Path::new("/etc/drover-x").exists());
    let state = api.ok(M::GET, &format!("/v1/hosts/{host_id}/agent"), None).await;
    assert_eq!(state["state"], "connected", "{state}");
    assert!(state["enrolled_at"].is_string() && state["last_seen"].is_string(), "{state}");
    // The certificate is good for a year from enrolment, so no renewal is due.
    let until: chrono::DateTime<chrono::Utc> = state["certificate_expires_at"].as_str().unwrap().parse().unwrap();
    let days = (until - chrono::Utc::now()).num_days();
    assert!((363..=366).contains(&days), "{state}");
    assert_eq!(state["certificate_renewal_due"], false, "{state}");

    // Who may call the agent: the control plane (its certificate from its CA) and no one else.
    let ca =
        drover_pki::TrustedCa::from_pem(&std::fs::read_to_string(identity_dir.join("ca.cert.pem")).unwrap()).unwrap();
    let cp_ca = drover_pki::ControlPlaneCa::load(&cp.data.join("ca")).unwrap();
    let cp_identity = cp_ca.control_plane_identity(&["localhost".parse().unwrap()]).unwrap();
    assert_eq!(call_agent(&agent_url, &host_id, &ca, Some(&cp_identity)).await, Ok(200), "the control plane may call");
    let no_cert = call_agent(&agent_url, &host_id, &ca, None).await;
    assert!(no_cert.is_err(), "a client without a certificate got {no_cert:?}");
    let other_ca = drover_pki::ControlPlaneCa::create_or_load(&dir.path().join("other-ca")).unwrap();
    let stranger = other_ca.control_plane_identity(&["localhost".parse().unwrap()]).unwrap();
    let r = call_agent(&agent_url, &host_id, &ca, Some(&stranger)).await;
    assert!(r.is_err(), "a control plane of another CA got {r:?}");
    let own = drover_pki::AgentIdentity::load(&identity_dir).unwrap();
    let r = call_agent(&agent_url, &host_id, &ca, Some(own.tls_identity())).await;
    assert!(r.is_err(), "an agent's certificate (not the control plane's) got {r:?}");

    // One agent cannot answer for another host: a host whose address leads to prod's agent is
    // refused by name, whatever the address.
    let impostor =
        api.ok(M::POST, "/v1/hosts", Some(json!({"site_id": site["id"], "name": "dr-1", "address": agent_url}))).await;
    let impostor_id = impostor["id"].as_str().unwrap();
    let (status, v) = api
        .send(M::POST, "/v1/datastores", Some(json!({"host_id": impostor_id, "name": "x", "path": root.join("b")})))
        .await;
    assert_eq!(status, 503, "{v}");
    assert!(!root.join("b").exists());
    let state = api.ok(M::GET, &format!("/v1/hosts/{impostor_id}/agent"), None).await;
    assert_eq!(state["state"], "not_enrolled", "{state}");

    // The agent goes away: what needs it fails with a clear 503, the host reads unreachable with
    // when it was last seen, and what does not need it goes on.
    prod.kill();
    let (status, v) = api
        .send(M::POST, "/v1/datastores", Some(json!({"host_id": host_id, "name": "c", "path": root.join("c")})))
        .await;
    assert_eq!(status, 503, "{v}");
    assert!(v["message"].as_str().unwrap().contains("unreachable"), "{v}");
    let state = api.ok(M::GET, &format!("/v1/hosts/{host_id}/agent"), None).await;
    assert_eq!(state["state"], "unreachable", "{state}");
    assert!(state["last_seen"].is_string() && state["last_error"].is_string(), "{state}");
    api.ok(M::GET, "/v1/datastores", None).await;

    // It comes back with its identity (no new enrolment) and is reached again.
    let (mut prod, again, url) = agent(dir.path(), "prod", None);
    assert_eq!(again, host_id);
    api.ok(M::PATCH, &format!("/v1/hosts/{host_id}"), Some(json!({"address": url}))).await;
    api.ok(M::POST, "/v1/datastores", Some(json!({"host_id": host_id, "name": "d", "path": root.join("d")}))).await;
    let state = api.ok(M::GET, &format!("/v1/hosts/{host_id}/agent"), None).await;
    assert_eq!(state["state"], "connected", "{state}");

    // Renewal without a token or a restart: the control plane renews the running agent's
    // certificate over the agent API (by itself in its last month; here, asked to). The agent
    // presents the new one to the next connection, and is reached with it.
    let cert = identity_dir.join("agent.cert.pem");
    let before = std::fs::read(&cert).unwrap();
    assert_eq!(presented_certificate(&url, &host_id, &ca, &cp_identity).await, pem_der(&before));
    let renewed = api.ok(M::POST, &format!("/v1/hosts/{host_id}/agent/certificate"), None).await;
    assert_eq!(renewed["state"], "connected", "{renewed}");
    assert_eq!(renewed["certificate_renewal_due"], false, "{renewed}");
    let after = std::fs::read(&cert).unwrap();
    assert_ne!(after, before, "a new certificate");
    assert_eq!(mode(&identity_dir.join("agent.key.pem")), 0o600);
    assert_eq!(presented_certificate(&url, &host_id, &ca, &cp_identity).await, pem_der(&after));
    api.ok(M::POST, "/v1/datastores", Some(json!({"host_id": host_id, "name": "r", "path": root.join("r")}))).await;
    let (status, v) = api.send(M::POST, &format!("/v1/hosts/{impostor_id}/agent/certificate"), None).await;
    assert_eq!(status, 409, "a host whose agent never enrolled: {v}");

    // Renewal: with a new token, `--re-enroll` replaces the agent's certificate, and the control
    // plane records the new one's end; without it, an enrolled agent keeps its identity.
    prod.kill();
    let renew = api.ok(M::POST, &format!("/v1/hosts/{host_id}/enrolment"), None).await;
    let renew = renew["token"].as_str().unwrap().to_string();
    let before = after;
    let out =
        agent_command(&dir.path().join("prod")).args(["--enroll", &cp.agent_url, &renew, "--enroll-only"]).output();
    let out = out.unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--re-enroll"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&cert).unwrap(), before);
    let out = agent_command(&dir.path().join("prod"))
        .args(["--enroll", &cp.agent_url, &renew, "--enroll-only", "--re-enroll"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(std::fs::read(&cert).unwrap(), before, "a new certificate");
    assert_eq!(mode(&identity_dir.join("agent.key.pem")), 0o600);
    let renewed = api.ok(M::GET, &format!("/v1/hosts/{host_id}/agent"), None).await;
    let at = |v: &Value, k: &str| v[k].as_str().unwrap().parse::<chrono::DateTime<chrono::Utc>>().unwrap();
    assert!(at(&renewed, "enrolled_at") > at(&state, "enrolled_at"), "{renewed}");
    assert!(at(&renewed, "certificate_expires_at") >= at(&state, "certificate_expires_at"), "{renewed}");
    let (_prod, again, url) = agent(dir.path(), "prod", None);
    assert_eq!(again, host_id);
    api.ok(M::PATCH, &format!("/v1/hosts/{host_id}"), Some(json!({"address": url}))).await;
    api.ok(M::POST, "/v1/datastores", Some(json!({"host_id": host_id, "name": "e", "path": root.join("e")}))).await;
    drop(cp);
}

fn qemu_io_write(image: &Path, pattern: u8, offset: u64, len: u64) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &format!("write -P {pattern} {offset} {len}")])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The newest qcow2 file under `dir` (a replica's chain directories).
fn newest_point(dir: &Path) -> PathBuf {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "qcow2") {
                found.push((e.metadata().unwrap().modified().unwrap(), p));
            }
        }
    }
    found.sort();
    found.pop().unwrap_or_else(|| panic!("no point under {}", dir.display())).1
}

/// Replication from the control plane's machine (its own agent, serving its cuts on a data
/// listener) to a `drover agent` on the "DR host": the DR agent pulls each cut over mutual TLS
/// and writes the restore point into its own datastore; the control plane carries no disk bytes.
/// Real QEMU tools (no VM needs to boot: the disk is replicated powered off).
#[tokio::test(flavor = "multi_thread")]
async fn a_dr_agent_pulls_the_restore_points_from_the_production_agent() {
    let dir = tempfile::Builder::new().prefix("dra").tempdir_in("/tmp").unwrap();
    let _reaper = QemuReaper(dir.path().to_path_buf());
    let root = dir.path();
    let data = root.join("cp");
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--vro-listen", "off", "--em-listen", "off"])
        .args(["--agent-listen", "127.0.0.1:0", "--data-listen", "127.0.0.1:0", "--plain-http"])
        .args(["--hypervisor", "qemu", "--accel", "tcg", "--datastore-root"])
        .arg(root.join("prod"))
        .arg("--data-dir")
        .arg(&data)
        .env("DROVER_ADMIN_PASSWORD", PASSWORD);
    let mut serve = Proc::spawn(cmd, root.join("serve.log"));
    let base = serve.line("drover serving on ").split_whitespace().next().unwrap().to_string();
    let agent_url = serve.line("agents: ").split_whitespace().next().unwrap().to_string();
    serve.line("data: ");
    let api = Api::login(&base).await;
    let site = api.ok(M::POST, "/v1/sites", Some(json!({"name": "prod", "kind": "Production"}))).await;
    let dr_site = api.ok(M::POST, "/v1/sites", Some(json!({"name": "dr", "kind": "DisasterRecovery"}))).await;
    let prod =
        api.ok(M::POST, "/v1/hosts", Some(json!({"site_id": site["id"], "name": "prod", "address": "local"}))).await;
    let dr = api
        .ok(
            M::POST,
            "/v1/hosts",
            Some(json!({"site_id": dr_site["id"], "name": "dr", "address": "https://127.0.0.1:1"})),
        )
        .await;
    let dr_id = dr["id"].as_str().unwrap();
    let token =
        api.ok(M::POST, &format!("/v1/hosts/{dr_id}/enrolment"), None).await["token"].as_str().unwrap().to_string();
    let mut cmd = agent_command_with(&root.join("dra"), "qemu");
    cmd.args(["--accel", "tcg", "--enroll", &agent_url, &token]);
    let mut dr_agent = Proc::spawn(cmd, root.join("dra.log"));
    let rest = dr_agent.line("drover agent for host ");
    let dr_url = rest.split_once(" serving on ").unwrap().1.to_string();
    api.ok(M::PATCH, &format!("/v1/hosts/{dr_id}"), Some(json!({"address": dr_url}))).await;
    let prod_ds = api
        .ok(M::POST, "/v1/datastores", Some(json!({"host_id": prod["id"], "name": "p", "path": root.join("prod/ds")})))
        .await;
    let dr_root = root.join("dra/datastores");
    let dr_ds = api
        .ok(M::POST, "/v1/datastores", Some(json!({"host_id": dr_id, "name": "d", "path": dr_root.join("ds")})))
        .await;
    let vm_id = api
        .create_vm(json!({"name": "db", "host_id": prod["id"], "datastore_id": prod_ds["id"], "vcpus": 1,
                "memory_mib": 128, "disks": [{"name": "data", "size_bytes": 33554432}]}))
        .await;
    let source = root.join("prod/ds").join(&vm_id).join("data.qcow2");
    qemu_io_write(&source, 0x5a, 0, 1 << 20);
    qemu_io_write(&source, 0x5b, 8 << 20, 1 << 20);
    let job = api.manual_job(&vm_id, dr_id, &dr_ds, 3).await;

    // The seed: pulled by the DR agent, into its datastore, equal to the source.
    let line = run_job(&api, &job).await;
    assert!(line.contains("seed mode"), "{line}");
    println!("seed: {line}");
    let point = newest_point(&dr_root.join("ds"));
    assert!(same(&source, &point), "the DR agent's point equals the source");

    // An incremental: only the changed blocks cross between the agents.
    qemu_io_write(&source, 0x5c, 16 << 20, 64 << 10);
    let line = run_job(&api, &job).await;
    assert!(line.contains("bitmap mode"), "{line}");
    println!("incremental: {line}");
    let data: u64 = line
        .split(" bytes on the wire for ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert_eq!(data, 64 << 10, "only the changed 64 KiB crossed: {line}");
    let newest = newest_point(&dr_root.join("ds"));
    assert_ne!(newest, point);
    assert!(same(&source, &newest), "the newest point equals the source");

    drop(dr_agent);
    drop(serve);
}

/// Runs a replication job to success; returns its session's line about what was pulled.
async fn run_job(api: &Api, job: &str) -> String {
    let run = api.ok(M::POST, &format!("/v1/replication-jobs/{job}/run"), None).await;
    let session = run["session_id"].as_str().unwrap().to_string();
    let s = api.wait_session(&session).await;
    let lines = api.log(&session).await;
    assert_eq!(s["result"], "Success", "{s}: {lines:?}");
    lines.into_iter().find(|l| l.contains("pulled by the target's agent")).unwrap_or_else(|| panic!("no pull in {s}"))
}

/// Starts a QEMU agent for `name` under `root`, enrolling it when `token` is given; returns it
/// and its URL.
fn qemu_agent(root: &Path, name: &str, enroll: Option<(&str, &str)>, data_listen: bool) -> (Proc, String) {
    let mut cmd = agent_command_with(&root.join(name), "qemu");
    cmd.args(["--accel", "tcg", "--import-dir"]).arg(guest_dir());
    if data_listen {
        cmd.args(["--data-listen", "127.0.0.1:0"]);
    }
    if let Some((url, token)) = enroll {
        cmd.args(["--enroll", url, token]);
    }
    let mut proc = Proc::spawn(cmd, root.join(format!("{name}.log")));
    let rest = proc.line("drover agent for host ");
    let url = rest.split_once(" serving on ").unwrap().1.to_string();
    (proc, url)
}

/// Kills every QEMU process of a VM (its uuid is on QEMU's command line): the host is lost.
fn kill_vm(vm: &str) {
    let _ = Command::new("pkill").args(["-KILL", "-f", &format!("qemu-system.*{vm}")]).status();
}

/// Production and DR each on a `drover agent` with real QEMU (TCG): a VM runs on the
/// production agent, its restore points are pulled by the DR agent; the production site is lost
/// (agent and VM killed); the plan fails over on the DR agent from the newest point, the
/// session says production was unreachable, and the replica shows the marker written before
/// that point; production comes back and is fenced (its VM powered off, replication refused);
/// undo brings the replica back to Ready and replication resumes.
#[tokio::test(flavor = "multi_thread")]
async fn vms_run_on_agents_and_a_lost_production_site_fails_over_to_the_dr_agent() {
    let dir = tempfile::Builder::new().prefix("two").tempdir_in("/tmp").unwrap();
    let _reaper = QemuReaper(dir.path().to_path_buf());
    let root = dir.path();
    let cp = serve(root);
    let api = Api::login(&cp.api).await;
    let (prod_id, dr_id) = api.prod_and_dr_hosts().await;
    let prod_token = api.enrolment_token(&prod_id).await;
    let (mut prod_agent, prod_url) = qemu_agent(root, "pa", Some((&cp.agent_url, &prod_token)), true);
    let dr_token = api.enrolment_token(&dr_id).await;
    let (_dr_agent, dr_url) = qemu_agent(root, "da", Some((&cp.agent_url, &dr_token)), true);
    api.ok(M::PATCH, &format!("/v1/hosts/{prod_id}"), Some(json!({"address": prod_url}))).await;
    api.ok(M::PATCH, &format!("/v1/hosts/{dr_id}"), Some(json!({"address": dr_url}))).await;
    let (prod_ds, dr_ds) = api.prod_and_dr_datastores(root.as_ref(), &prod_id, &dr_id).await;

    // A boot file outside the agent's import directories is refused by the agent.
    let guest = guest_dir();
    let bad = api
        .ok(
            M::POST,
            "/v1/vms",
            Some(json!({"name": "bad", "host_id": prod_id, "datastore_id": prod_ds["id"], "vcpus": 1,
                "memory_mib": 128, "disks": [{"name": "data", "size_bytes": 1048576, "import_from": "/etc/passwd"}]})),
        )
        .await;
    let s = api.wait_session(bad["session_id"].as_str().unwrap()).await;
    assert_ne!(s["result"], "Success", "{s}");
    let lines = api.log(bad["session_id"].as_str().unwrap()).await;
    assert!(lines.iter().any(|l| l.contains("import")), "{lines:?}");

    // A VM on the production agent: its disk made there, powered on there, heartbeating.
    let vm_id = api
        .create_vm(json!({"name": "db", "host_id": prod_id, "datastore_id": prod_ds["id"], "vcpus": 1,
                "memory_mib": 128, "disks": [{"name": "data", "size_bytes": 33554432}],
                "boot": {"kernel": guest.join("vmlinux"), "initrd": guest.join("initramfs.img"),
                    "cmdline": "console=ttyS0 quiet"}}))
        .await;
    assert!(root.join("pa/datastores/ds").join(&vm_id).join("data.qcow2").exists(), "the disk is the agent's");
    assert_eq!(mode(&root.join("pa/datastores/ds").join(&vm_id).join("data.qcow2")), 0o600);
    let on = api.ok(M::POST, &format!("/v1/vms/{vm_id}/power-on"), None).await;
    let s = api.wait_session(on["session_id"].as_str().unwrap()).await;
    let lines = api.log(on["session_id"].as_str().unwrap()).await;
    assert_eq!(s["result"], "Success", "{s}: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("heartbeat")), "{lines:?}");
    let vm_uuid: uuid::Uuid = vm_id.parse().unwrap();
    let prod = agent_client(&cp.data, &prod_id, &prod_url).await;
    use drover_agent_api::HostAgent as _;
    prod.vm_write_marker(vm_uuid, "before the disaster").await.unwrap();

    // Replication: the DR agent pulls the running VM's cut from the production agent, within
    // the job's bandwidth limit (one too low to be meant is refused).
    let body = |limit: u64| {
        json!({"name": "j", "vm_ids": [vm_id], "target_host_id": dr_id, "target_datastore_id": dr_ds["id"],
            "schedule": {"type": "Manual"}, "retention_points": 3, "bandwidth_limit": limit})
    };
    let (status, v) = api.send(M::POST, "/v1/replication-jobs", Some(body(1000))).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("bandwidth_limit"), "{v}");
    let job = api.ok(M::POST, "/v1/replication-jobs", Some(body(256 << 20))).await;
    assert_eq!(job["bandwidth_limit"], 256 << 20, "{job}");
    let job = job["id"].as_str().unwrap().to_string();
    let line = run_job(&api, &job).await;
    assert!(line.contains("seed mode"), "{line}");
    let plan_id = api.heartbeat_plan(&vm_id).await;

    // The production site is lost: its agent and its VM are killed.
    prod_agent.kill();
    kill_vm(&vm_id);
    let lines = api.plan_action(&plan_id, "failover", None).await;
    assert!(lines.iter().any(|l| l.contains("production host cannot be reached")), "{lines:?}");
    let replica = api.ok(M::GET, "/v1/replicas", None).await;
    let replica = &replica["items"].as_array().unwrap_or_else(|| panic!("{replica}"))[0];
    assert_eq!(replica["state"], "Failover", "{replica}");
    let replica_id: uuid::Uuid = replica["id"].as_str().unwrap().parse().unwrap();
    let dr = agent_client(&cp.data, &dr_id, &dr_url).await;
    let hb = dr.vm_wait_heartbeat(replica_id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("before the disaster"), "the replica shows production's marker");

    // Production comes back (its agent with its identity, no new enrolment) and its VM is
    // started behind drover's back: it is fenced, and replication from it is refused.
    let (_prod_agent, prod_url) = qemu_agent(root, "pa", None, true);
    api.ok(M::PATCH, &format!("/v1/hosts/{prod_id}"), Some(json!({"address": prod_url}))).await;
    let prod = agent_client(&cp.data, &prod_id, &prod_url).await;
    let spec = start_behind_drovers_back(&prod, &prod_ds, vm_uuid, &["data"]).await;
    wait_fenced(&api, &prod, vm_uuid).await;
    let v = api.ok(M::GET, &format!("/v1/vms/{vm_id}"), None).await;
    assert_eq!(v["power_state"], "Off", "{v}");
    let run = api.ok(M::POST, &format!("/v1/replication-jobs/{job}/run"), None).await;
    let s = api.wait_session(run["session_id"].as_str().unwrap()).await;
    assert_ne!(s["result"], "Success", "replication from a fenced production ran: {s}");

    // Undo: the replica's VM is discarded on the DR agent, and replication resumes.
    api.plan_action(&plan_id, "undo", None).await;
    assert_eq!(dr.vm_status(replica_id).await.unwrap(), drover_agent_api::PowerState::Off);
    let overlays: Vec<_> = std::fs::read_dir(root.join("da/datastores/ds").join(replica_id.to_string()).join("data"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("boot-"))
        .collect();
    assert!(overlays.is_empty(), "the replica's overlay was discarded: {overlays:?}");
    let line = run_job(&api, &job).await;
    println!("after undo: {line}");

    // Failover again, with production reachable this time; the replica writes at DR; failback
    // brings that back to production (pulled by production's agent from the DR agent), and the
    // commit returns the replica to Ready.
    let lines = api.plan_action(&plan_id, "failover", None).await;
    assert!(!lines.iter().any(|l| l.contains("cannot be reached")), "{lines:?}");
    dr.vm_wait_heartbeat(replica_id, Duration::from_secs(120)).await.unwrap();
    dr.vm_write_marker(replica_id, "written at DR").await.unwrap();
    let lines = api.plan_action(&plan_id, "prepare-failback", None).await;
    assert!(lines.iter().any(|l| l.contains("synced to production by hash-compare between the agents")), "{lines:?}");
    println!("prepare-failback: {lines:#?}");
    // Between the sync and the switchover the replica writes again, and somebody runs production
    // behind drover's back, which writes its disk: the switchover cannot trust production's
    // manifest from the sync, so it compares by hash, and production ends as the replica.
    dr.vm_write_marker(replica_id, "written at DR after the sync").await.unwrap();
    prod.vm_power_on(&spec).await.unwrap();
    prod.vm_wait_heartbeat(vm_uuid, Duration::from_secs(120)).await.unwrap();
    prod.vm_write_marker(vm_uuid, "production's own").await.unwrap();
    let lines = api.plan_action(&plan_id, "switchover", None).await;
    assert!(lines.iter().any(|l| l.contains("cannot be sent by bitmap alone")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("switched over by hash-compare between the agents")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("production equals the replica")), "{lines:?}");
    println!("switchover: {lines:#?}");
    let hb = prod.vm_wait_heartbeat(vm_uuid, Duration::from_secs(120)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("written at DR after the sync"), "production shows what was written at DR");
    api.plan_action(&plan_id, "commit-failback", None).await;
    let replica = api.ok(M::GET, "/v1/replicas", None).await;
    assert_eq!(replica["items"][0]["state"], "Ready", "{replica}");
    assert_eq!(dr.vm_status(replica_id).await.unwrap(), drover_agent_api::PowerState::Off);
    let line = run_job(&api, &job).await;
    println!("after the failback: {line}");

    // A planned failover: production, reachable and running, is shut down and its last
    // changes replicated first, so what it wrote just before the command is at DR.
    prod.vm_write_marker(vm_uuid, "the last words").await.unwrap();
    let (status, v) = api
        .send(
            M::POST,
            &format!("/v1/plans/{plan_id}/failover"),
            Some(json!({"planned": true, "restore_point_date": "2026-01-01T00:00:00Z"})),
        )
        .await;
    assert_eq!(status, 400, "a planned failover takes no date: {v}");
    let lines = api.plan_action(&plan_id, "failover", Some(json!({"planned": true}))).await;
    assert!(lines.iter().any(|l| l.contains("production VM db shut down")), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("nothing written before the failover is lost")), "{lines:?}");
    assert_eq!(prod.vm_status(vm_uuid).await.unwrap(), drover_agent_api::PowerState::Off);
    let hb = dr.vm_wait_heartbeat(replica_id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("the last words"), "the replica has what production wrote last");

    // Failback to another recovery location on the production host: a new VM there, its disks
    // pulled by production's agent from the DR agent's stopped replica; the original VM is not
    // touched. Undo removes the new VM and its disks, and the replica runs again.
    let loc = api
        .ok(
            M::POST,
            "/v1/recovery-locations",
            Some(json!({"name": "elsewhere", "host_id": prod_id, "datastore_id": prod_ds["id"]})),
        )
        .await;
    let body = json!({"recovery_location_id": loc["id"]});
    let lines = api.plan_action(&plan_id, "failback", Some(body)).await;
    assert!(lines.iter().any(|l| l.contains("copied to the new VM by its host's agent")), "{lines:?}");
    let vms = api.ok(M::GET, "/v1/vms", None).await;
    let restored = vms["items"].as_array().unwrap().iter().find(|v| v["name"] == "db_restored").cloned();
    let restored = restored.unwrap_or_else(|| panic!("a new VM at the location: {vms}"));
    let restored_id: uuid::Uuid = restored["id"].as_str().unwrap().parse().unwrap();
    let hb = prod.vm_wait_heartbeat(restored_id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("the last words"), "the new VM holds the replica's data");
    assert_eq!(prod.vm_status(vm_uuid).await.unwrap(), drover_agent_api::PowerState::Off, "the original stays off");
    assert_eq!(dr.vm_status(replica_id).await.unwrap(), drover_agent_api::PowerState::Off);
    api.plan_action(&plan_id, "undo", None).await;
    let vms = api.ok(M::GET, "/v1/vms", None).await;
    assert!(!vms["items"].as_array().unwrap().iter().any(|v| v["name"] == "db_restored"), "{vms}");
    assert_eq!(prod.vm_status(restored_id).await.unwrap(), drover_agent_api::PowerState::Off);
    assert!(!root.join("pa/datastores/ds").join(restored_id.to_string()).exists(), "the new VM's disks are gone");
    let hb = dr.vm_wait_heartbeat(replica_id, Duration::from_secs(120)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("the last words"), "the replica runs again with its data");
    drop(cp);
}
