//! The command-line client against a real `drover serve` (simulated hypervisor), both run as
//! the built binary: what a user types, what comes out, and the exit codes.

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_drover");
const ADMIN_PASSWORD: &str = "correct-horse-battery";

/// Environment a developer's shell might carry that would change what the client does.
const CLIENT_ENV: [&str; 8] = [
    "DROVER_URL",
    "DROVER_TOKEN",
    "DROVER_OUTPUT",
    "DROVER_INSECURE",
    "DROVER_CA_CERT",
    "DROVER_PASSWORD",
    "DROVER_NEW_PASSWORD",
    "DROVER_LOG",
];

/// A `drover serve` child, killed when dropped (also when a test panics).
struct Server {
    child: Child,
    url: String,
    data_dir: tempfile::TempDir,
    log: PathBuf,
}

impl Server {
    fn start(tls: bool) -> Server {
        let data_dir = tempfile::tempdir().unwrap();
        let log = data_dir.path().join("server.log");
        let mut cmd = Command::new(BIN);
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--vro-listen",
            "off",
            "--em-listen",
            "off",
            "--hypervisor",
            "simulated",
            "--data-dir",
        ])
        .arg(data_dir.path().join("data"))
        // The tests' datastores live beside the data directory.
        .arg("--datastore-root")
        .arg(data_dir.path())
        .env("DROVER_ADMIN_PASSWORD", ADMIN_PASSWORD)
        .env_remove("DROVER_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap());
        if !tls {
            cmd.arg("--plain-http");
        }
        let mut child = cmd.spawn().expect("start drover serve");
        let stdout = child.stdout.take().unwrap();
        // Read the banner on a thread so a server that never prints it fails the test in time
        // rather than hanging it; the thread then keeps draining stdout.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("drover serving on ") {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or_default().to_string());
                }
            }
        });
        let mut server = Server { child, url: String::new(), data_dir, log };
        server.url = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(url) => url,
            Err(_) => {
                panic!("drover serve did not start:\n{}", std::fs::read_to_string(&server.log).unwrap_or_default())
            }
        };
        assert!(server.url.starts_with(if tls { "https://127.0.0.1:" } else { "http://127.0.0.1:" }), "{}", server.url);
        server
    }

    fn data(&self) -> PathBuf {
        self.data_dir.path().join("data")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- server log ---\n{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
    }
}

/// The client with its own config directory (so its own saved login).
struct Client {
    server_url: String,
    config: tempfile::TempDir,
    extra: Vec<String>,
    env: Vec<(&'static str, &'static str)>,
}

impl Client {
    fn new(server: &Server) -> Client {
        Client {
            server_url: server.url.clone(),
            config: tempfile::tempdir().unwrap(),
            extra: Vec::new(),
            env: Vec::new(),
        }
    }

    fn credentials(&self) -> PathBuf {
        self.config.path().join("credentials.json")
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        for var in CLIENT_ENV {
            cmd.env_remove(var);
        }
        cmd.arg("--server")
            .arg(&self.server_url)
            .args(&self.extra)
            .args(args)
            .env("DROVER_CONFIG_DIR", self.config.path())
            .envs(self.env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run drover")
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "drover {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command with `--output json` that must succeed; stdout must be one JSON document.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let stdout = self.ok(&all);
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("drover {args:?}: stdout is not JSON ({e}): {stdout}"))
    }

    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            !out.status.success(),
            "drover {args:?} should have failed; stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    fn login(&self) {
        let out = self.ok(&["login", "--user", "admin", "--password", ADMIN_PASSWORD]);
        assert!(out.contains("logged in"), "{out}");
    }

    fn edit_credentials(&self, edit: impl FnOnce(&mut Value)) {
        let mut creds = read_json(&self.credentials());
        edit(&mut creds);
        std::fs::write(self.credentials(), creds.to_string()).unwrap();
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}")).to_string()
}

/// A site, a host and a datastore; returns the host and datastore ids.
fn inventory(cli: &Client, server: &Server) -> (String, String) {
    let site = cli.json(&["site", "create", "production", "--kind", "production"]);
    assert_eq!(site["kind"], "Production");
    let host = cli.json(&["host", "create", "host-1", "--site", &id(&site)]);
    assert_eq!(host["address"], "local");
    let path = server.data_dir.path().join("datastore");
    let ds = cli.json(&["datastore", "create", "fast", "--host", &id(&host), "--path", path.to_str().unwrap()]);
    assert_eq!(ds["path"], path.to_str().unwrap());
    (id(&host), id(&ds))
}

#[test]
fn cli_over_plain_http() {
    let server = Server::start(false);
    let cli = Client::new(&server);

    // Nothing works before a login, and the message says what to do.
    let err = cli.fails(&["site", "list"]);
    assert!(err.contains("not logged in") && err.contains("drover login"), "{err}");
    let err = cli.fails(&["login", "--user", "admin", "--password", "wrong-password"]);
    assert!(err.contains("error: wrong user name or password (HTTP 401)"), "{err}");

    cli.login();
    let mode = std::fs::metadata(cli.credentials()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the credentials file must be private");

    let (host, ds) = inventory(&cli, &server);
    let table = cli.ok(&["datastore", "list"]);
    assert!(table.starts_with("ID ") && table.contains("fast"), "{table}");
    // The audit log has the wrong password and the changes, newest first.
    let audit = cli.ok(&["audit"]);
    assert!(audit.starts_with("SEQ ") && audit.contains("POST /v1/datastores"), "{audit}");
    let logins = cli.json(&["audit", "--action", "login", "--limit", "10"]);
    let outcomes: Vec<_> = logins["items"].as_array().unwrap().iter().map(|e| e["outcome"].clone()).collect();
    assert_eq!(outcomes, [serde_json::json!("Success"), serde_json::json!("Refused")], "{logins}");

    // A create is followed to its end; --output json prints the final session.
    let session = cli.json(&[
        "vm",
        "create",
        "web-1",
        "--host",
        &host,
        "--datastore",
        &ds,
        "--disk",
        "root:64MiB",
        "--tag",
        "tier:web",
    ]);
    assert_eq!(session["kind"], "VmCreate");
    assert_eq!(session["state"], "Stopped");
    assert_eq!(session["result"], "Success");
    assert!(session["tasks"].as_array().is_some_and(|t| !t.is_empty()), "{session}");
    let vm_id = session["target_id"].as_str().unwrap().to_string();

    let vm = cli.json(&["vm", "get", &vm_id]);
    assert_eq!(vm["name"], "web-1");
    assert_eq!(vm["provisioned"], true);
    assert_eq!(vm["power_state"], "Off");
    assert_eq!(vm["disks"][0]["size_bytes"], 64u64 << 20);
    assert_eq!(vm["tags"][0], "tier:web");

    // Human output: a one-line summary, and the log on stderr since this is not a terminal.
    let out = cli.run(&["vm", "power-on", &vm_id]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("VmPowerOn web-1: Success (100%)"), "{stdout}");
    assert!(stderr.contains("VmPowerOn finished"), "{stderr}");
    assert_eq!(cli.json(&["vm", "get", &vm_id])["power_state"], "Running");
    let table = cli.ok(&["vm", "list"]);
    assert!(table.contains("web-1") && table.contains("Running"), "{table}");

    // Sizes only change while off (the server says so); tags any time.
    let err = cli.fails(&["vm", "update", &vm_id, "--memory-mib", "128"]);
    assert!(err.contains("power it off") && err.contains("(HTTP 409)"), "{err}");
    let updated = cli.json(&["vm", "update", &vm_id, "--tag", "tier:db", "--tag", "env:test"]);
    assert_eq!(updated["tags"].as_array().map(Vec::len), Some(2), "{updated}");

    // Sessions: both operations are listed, filters reach the server.
    let sessions = cli.json(&["session", "list"]);
    let kinds: Vec<&str> = sessions["items"].as_array().unwrap().iter().filter_map(|s| s["kind"].as_str()).collect();
    assert!(kinds.contains(&"VmCreate") && kinds.contains(&"VmPowerOn"), "{kinds:?}");
    let only = cli.json(&["session", "list", "--kind", "VmPowerOn", "--target", &vm_id]);
    assert_eq!(only["total"], 1, "{only}");
    let table = cli.ok(&["session", "list"]);
    assert!(table.contains("VmCreate") && table.contains("VmPowerOn"), "{table}");
    let power_on = id(&only["items"][0]);
    let log = cli.ok(&["session", "log", &power_on]);
    assert!(log.contains("VmPowerOn finished"), "{log}");
    assert!(cli.ok(&["session", "get", &power_on]).contains("TASK"));

    // --no-wait returns the session at once; `session watch` follows it afterwards.
    let started = cli.json(&["vm", "shutdown", &vm_id, "--no-wait"]);
    let shutdown = started["session_id"].as_str().unwrap().to_string();
    let watched = cli.json(&["session", "watch", &shutdown]);
    assert_eq!((watched["kind"].as_str(), watched["result"].as_str()), (Some("VmShutdown"), Some("Success")));

    // Following by polling (the fallback when the event stream breaks) ends the same way.
    let polling = Client { env: vec![("DROVER_FOLLOW", "poll")], ..Client::new(&server) };
    std::fs::copy(cli.credentials(), polling.credentials()).unwrap();
    let out = polling.run(&["vm", "power-on", &vm_id]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("VmPowerOn web-1: Success (100%)"), "{stdout}");
    assert!(stderr.contains("VmPowerOn started") && stderr.contains("VmPowerOn finished"), "{stderr}");

    // Bad input: the API's message, its status, a non-zero exit.
    let nowhere = "00000000-0000-0000-0000-000000000001";
    let err = cli.fails(&["vm", "create", "bad", "--host", nowhere, "--datastore", &ds, "--disk", "root:1MiB"]);
    assert!(err.contains("error: ") && err.contains("is not on host") && err.contains("(HTTP 400)"), "{err}");
    let err = cli.fails(&["vm", "get", nowhere]);
    assert!(err.contains("not found (HTTP 404)"), "{err}");
    let err = cli.fails(&["vm", "create", "bad", "--host", &host, "--datastore", &ds, "--disk", "root"]);
    assert!(err.contains("NAME:SIZE"), "{err}");

    // A session that fails makes the command fail with its reason: the datastore's directory
    // is replaced by a file, so the disks cannot be made.
    let broken = server.data_dir.path().join("broken");
    let broken_ds = cli.json(&["datastore", "create", "broken", "--host", &host, "--path", broken.to_str().unwrap()]);
    std::fs::remove_dir_all(&broken).unwrap();
    std::fs::write(&broken, b"not a directory").unwrap();
    let err =
        cli.fails(&["vm", "create", "doomed", "--host", &host, "--datastore", &id(&broken_ds), "--disk", "r:1MiB"]);
    assert!(err.contains("failed:"), "{err}");

    assert!(cli.fails(&["vm", "delete", &vm_id]).contains("power it off first (HTTP 409)"));
    assert!(cli.ok(&["vm", "power-off", &vm_id]).contains("VmPowerOff web-1: Success"));
    assert!(cli.ok(&["vm", "delete", &vm_id]).contains("VmDelete web-1: Success"));
    assert!(cli.fails(&["vm", "get", &vm_id]).contains("(HTTP 404)"));
}

#[test]
fn cli_refreshes_tokens_and_logs_out() {
    let server = Server::start(false);
    let cli = Client::new(&server);
    cli.login();
    let first = read_json(&cli.credentials());

    // An expired access token is refreshed before the call, and the new pair is saved.
    cli.edit_credentials(|c| c["expires_at"] = "2000-01-01T00:00:00Z".into());
    cli.ok(&["site", "list"]);
    let second = read_json(&cli.credentials());
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    assert_ne!(second["access_token"], first["access_token"]);

    // A rejected access token (401) is refreshed once and the call retried.
    cli.edit_credentials(|c| c["access_token"] = "not-a-token".into());
    cli.ok(&["site", "list"]);
    let after_401 = read_json(&cli.credentials());
    assert_ne!(after_401["refresh_token"], second["refresh_token"]);

    // Several processes finding the token expired at once refresh it once between them: a
    // second use of the single-use refresh token would revoke the whole login.
    cli.edit_credentials(|c| c["expires_at"] = "2000-01-01T00:00:00Z".into());
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..4).map(|_| scope.spawn(|| cli.run(&["site", "list"]))).collect();
        for run in runs {
            let out = run.join().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
    });
    cli.ok(&["site", "list"]);
    let third = read_json(&cli.credentials());

    // --token works without any saved login.
    let other = Client::new(&server);
    let token = third["access_token"].as_str().unwrap();
    assert!(other.json(&["site", "list", "--token", token])["items"].is_array());

    // Reusing a spent refresh token revokes the login; the message says to log in again.
    cli.edit_credentials(|c| {
        c["access_token"] = "not-a-token".into();
        c["refresh_token"] = second["refresh_token"].clone();
    });
    let err = cli.fails(&["site", "list"]);
    assert!(err.contains("drover login"), "{err}");

    assert!(cli.ok(&["logout"]).contains("logged out"));
    assert!(!cli.credentials().exists());
    assert!(cli.fails(&["site", "list"]).contains("not logged in"));
}

#[test]
fn cli_over_tls() {
    let server = Server::start(true);
    let cert = server.data().join("tls-cert.pem");
    let cli = Client::new(&server);

    // The self-signed certificate is refused unless trusted, with a hint how.
    let err = cli.fails(&["login", "--user", "admin", "--password", ADMIN_PASSWORD]);
    assert!(err.contains("certificate") && err.contains("--ca-cert"), "{err}");

    let trusted = Client { extra: vec!["--ca-cert".into(), cert.to_str().unwrap().into()], ..Client::new(&server) };
    trusted.login();
    let site = trusted.json(&["site", "create", "dr", "--kind", "dr"]);
    assert_eq!(site["kind"], "DisasterRecovery");
    assert!(trusted.ok(&["site", "list"]).contains("DisasterRecovery"));

    let insecure = Client { extra: vec!["--insecure".into()], ..Client::new(&server) };
    insecure.login();
    assert_eq!(insecure.json(&["site", "get", &id(&site)])["name"], "dr");

    // The environment variable reads like a shell flag: 1 means yes, 0 means no.
    let by_env = Client { env: vec![("DROVER_INSECURE", "1")], ..Client::new(&server) };
    by_env.login();
    let not_by_env = Client { env: vec![("DROVER_INSECURE", "0")], ..Client::new(&server) };
    assert!(not_by_env.fails(&["login", "--user", "admin", "--password", ADMIN_PASSWORD]).contains("certificate"));
}

/// The one file under `dir` (recursively) whose name ends with `.{ext}`.
fn find_file(dir: &Path, ext: &str) -> PathBuf {
    let mut found = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == ext) {
                found.push(path);
            }
        }
    }
    assert_eq!(found.len(), 1, "one .{ext} file expected under {}: {found:?}", dir.display());
    found.pop().unwrap()
}

/// The restore points' sequence numbers of `replica`, oldest first.
fn sequences(cli: &Client, replica: &str) -> Vec<u64> {
    let points = cli.json(&["replica", "points", replica]);
    points["items"].as_array().unwrap().iter().map(|p| p["sequence"].as_u64().unwrap()).collect()
}

#[test]
fn cli_replicates_and_keeps_restore_points() {
    let server = Server::start(false);
    let cli = Client::new(&server);
    cli.login();

    // One host with a production and a recovery datastore; a powered-off VM on production (the
    // simulated hypervisor still makes its disk a real qcow2, which replication reads).
    let (host, prod) = inventory(&cli, &server);
    let dr_path = server.data_dir.path().join("dr-datastore");
    let dr = id(&cli.json(&["datastore", "create", "dr", "--host", &host, "--path", dr_path.to_str().unwrap()]));
    let session = cli.json(&["vm", "create", "web-1", "--host", &host, "--datastore", &prod, "--disk", "root:16MiB"]);
    let vm = session["target_id"].as_str().unwrap().to_string();
    let job = cli.json(&[
        "job",
        "create",
        "nightly",
        "--vm",
        &vm,
        "--target-host",
        &host,
        "--target-datastore",
        &dr,
        "--manual",
        "--retention",
        "3",
    ]);
    let job = id(&job);
    let before = cli.run(&["replica", "list"]);
    assert!(before.status.success() && before.stdout.is_empty(), "no replica before the first run");
    assert!(String::from_utf8_lossy(&before.stderr).contains("no replicas"));

    // The first run seeds the replica; it is followed like any session.
    let out = cli.run(&["job", "run", &job]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("Replication nightly: Success (100%)"), "{stdout}");
    assert!(stdout.contains("web-1_replica") && stdout.contains("1 restore point, newest #1"), "{stdout}");
    assert!(stderr.contains("restore point 1 published") && stderr.contains("Replication finished"), "{stderr}");

    let replicas = cli.json(&["replica", "list"]);
    let items = replicas["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{replicas}");
    assert_eq!(items[0]["state"], "Ready");
    assert_eq!(items[0]["source_vm_id"], vm.as_str());
    assert_eq!(items[0]["job_id"], job.as_str());
    let replica = id(&items[0]);
    let table = cli.ok(&["replica", "list"]);
    assert!(table.contains("web-1_replica") && table.contains("Ready"), "{table}");
    let details = cli.ok(&["replica", "get", &replica]);
    assert!(details.contains("Ready") && details.contains(&dr), "{details}");

    let table = cli.ok(&["replica", "points", &replica]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("SEQUENCE") && lines[0].contains("BYTES WRITTEN"), "{table}");
    assert_eq!(lines.len(), 2, "{table}");
    assert!(lines[1].starts_with("1 ") && lines[1].contains("Published"), "{table}");
    assert_eq!(sequences(&cli, &replica), [1]);

    // The VM's disk changes while it is off; a second run adds a point with those bytes, and
    // --output json prints the final session.
    let disk = find_file(&server.data_dir.path().join("datastore"), "qcow2");
    let write = Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x5a 0 1M"]).arg(&disk).output().unwrap();
    assert!(write.status.success(), "qemu-io: {}", String::from_utf8_lossy(&write.stderr));
    let session = cli.json(&["job", "run", &job]);
    assert_eq!((session["kind"].as_str(), session["result"].as_str()), (Some("Replication"), Some("Success")));
    assert_eq!(session["target_id"], job.as_str());
    assert_eq!(session["tasks"].as_array().map(Vec::len), Some(1), "one task per VM: {session}");
    assert_eq!(sequences(&cli, &replica), [1, 2]);
    let points = cli.json(&["replica", "points", &replica]);
    assert!(points["items"][1]["bytes_written"].as_u64().unwrap() >= 1 << 20, "{points}");
    let table = cli.ok(&["replica", "points", &replica]);
    assert!(table.lines().nth(2).is_some_and(|l| l.starts_with("2 ") && l.contains(" MiB")), "{table}");

    // A disabled job does not run; the API says why.
    assert_eq!(cli.json(&["job", "update", &job, "--disable"])["enabled"], false);
    let err = cli.fails(&["job", "run", &job]);
    assert!(err.contains("disabled") && err.contains("(HTTP 409)"), "{err}");

    // Retention 1: the third run merges the older points away.
    let updated = cli.json(&["job", "update", &job, "--retention", "1", "--enable", "--interval", "3600"]);
    assert_eq!(updated["retention_points"], 1, "{updated}");
    assert_eq!(updated["enabled"], true, "{updated}");
    assert_eq!(updated["schedule"]["type"], "Interval", "{updated}");
    let shown = cli.ok(&["job", "update", &job, "--manual", "--name", "nightly"]);
    assert!(shown.contains("manual") && shown.contains("1 restore points"), "{shown}");
    let out = cli.ok(&["job", "run", &job]);
    assert!(out.contains("1 restore point, newest #3"), "{out}");
    assert_eq!(sequences(&cli, &replica), [3]);

    // --no-wait hands back the session; nothing changes meanwhile for the replica list.
    let started = cli.json(&["job", "run", &job, "--no-wait"]);
    let run = started["session_id"].as_str().unwrap().to_string();
    assert_eq!(cli.json(&["session", "watch", &run])["result"], "Success");
    assert_eq!(sequences(&cli, &replica), [4]);

    // Unknown ids: the API's message and a non-zero exit.
    let nowhere = "00000000-0000-0000-0000-000000000001";
    let err = cli.fails(&["job", "run", nowhere]);
    assert!(err.contains("not found (HTTP 404)"), "{err}");
    assert!(cli.fails(&["replica", "points", nowhere]).contains("(HTTP 404)"));
    assert!(cli.fails(&["job", "update", &job]).contains("nothing to update"));
}

#[test]
fn cli_updates_inventory_locations_and_users() {
    let server = Server::start(false);
    let cli = Client::new(&server);
    cli.login();
    let (host, ds) = inventory(&cli, &server);

    let site = cli.json(&["host", "get", &host])["site_id"].as_str().unwrap().to_string();
    assert_eq!(cli.json(&["site", "update", &site, "--name", "main"])["name"], "main");
    assert!(cli.ok(&["site", "get", &site]).contains("main"));
    let h = cli.json(&["host", "update", &host, "--name", "host-a"]);
    assert_eq!((h["name"].as_str(), h["address"].as_str()), (Some("host-a"), Some("local")));
    assert!(cli.ok(&["datastore", "update", &ds, "--name", "slow"]).contains("slow"));
    assert_eq!(cli.json(&["datastore", "get", &ds])["name"], "slow");

    let loc = cli.json(&["location", "create", "far", "--host", &host, "--datastore", &ds, "--network", "lan=dr-lan"]);
    let loc = id(&loc);
    let updated = cli.json(&["location", "update", &loc, "--description", "the far one", "--network", "a=b"]);
    assert_eq!(updated["description"], "the far one");
    assert_eq!(updated["network_mappings"], serde_json::json!([{"from": "a", "to": "b"}]));
    let cleared = cli.json(&["location", "update", &loc, "--clear-networks"]);
    assert_eq!(cleared["network_mappings"], serde_json::json!([]));
    assert_eq!(cleared["name"], "far");

    // A new password from the environment (kept out of the process list), then a new role.
    let user = cli.json(&["user", "create", "olive", "--role", "Viewer", "--password", "first-password"]);
    let user = id(&user);
    let with_env = Client { env: vec![("DROVER_NEW_PASSWORD", "second-password")], ..Client::new(&server) };
    std::fs::copy(cli.credentials(), with_env.credentials()).unwrap();
    assert_eq!(with_env.json(&["user", "update", &user])["name"], "olive");
    let table = cli.ok(&["user", "update", &user, "--role", "PlanOperator"]);
    assert!(table.contains("PlanOperator"), "{table}");
    let olive = Client::new(&server);
    let err = olive.fails(&["login", "--user", "olive", "--password", "first-password"]);
    assert!(err.contains("(HTTP 401)"), "{err}");
    olive.ok(&["login", "--user", "olive", "--password", "second-password"]);
    // The new role holds: an operator may not create users, and says so.
    let err = olive.fails(&["user", "create", "x", "--role", "Viewer", "--password", "whatever-password"]);
    assert!(err.contains("(HTTP 403)"), "{err}");
    assert!(cli.fails(&["user", "update", &user, "--password", "short"]).contains("(HTTP 400)"));
    assert!(cli.fails(&["user", "update", &user]).contains("--password"));
}

/// The detached thaw watchdog an agent starts before a freeze is this binary, and a hidden
/// command: with no freeze record left (the agent thawed the guest) it does nothing and ends.
#[test]
fn the_thaw_watchdog_command_does_nothing_once_the_freeze_record_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["thaw-watchdog", "--id", "run1-0", "--after-ms", "10", "--socket"])
        .arg(dir.path().join("qga.sock"))
        .arg("--record")
        .arg(dir.path().join("vm.json"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let help = std::process::Command::new(BIN).arg("--help").output().unwrap();
    assert!(!String::from_utf8_lossy(&help.stdout).contains("thaw-watchdog"), "an internal command stays hidden");
}
