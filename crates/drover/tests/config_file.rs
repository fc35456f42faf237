//! `drover serve --config FILE`: the file's settings apply, the command line wins over them, and a
//! setting the command does not have is refused before anything starts.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Starts `drover serve` with `args`, collects what it prints in its first two seconds, and stops it.
fn serve_lines(args: &[&str]) -> Vec<String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_drover"))
        .arg("serve")
        .args(args)
        .env("DROVER_ADMIN_PASSWORD", "config-test-password")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let reader = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // The first line, then whatever follows at once.
    while let Ok(l) = rx.recv_timeout(if lines.is_empty() { Duration::from_secs(20) } else { Duration::from_secs(2) }) {
        lines.push(l);
        if std::time::Instant::now() > deadline {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    lines
}

#[test]
fn the_config_file_sets_the_listeners_and_the_command_line_wins() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("drover.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\nvro-listen = \"off\"\nem-listen = \"127.0.0.1:0\"\nem-http-listen = \"127.0.0.1:0\"\n\
         hypervisor = \"simulated\"\nplain-http = true\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let (file, data) = (file.to_str().unwrap(), data.to_str().unwrap());

    let lines = serve_lines(&["--config", file, "--data-dir", data]);
    assert!(lines[0].contains("http://127.0.0.1:") && lines[0].contains("simulated"), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("VRO:")), "vro-listen = off: {lines:?}");
    assert_eq!(lines.iter().filter(|l| l.trim_start().starts_with("EM: http://")).count(), 2, "{lines:?}");

    // The command line over the file.
    let lines =
        serve_lines(&["--config", file, "--data-dir", data, "--vro-listen", "127.0.0.1:0", "--em-http-listen", "off"]);
    assert_eq!(lines.iter().filter(|l| l.contains("VRO: http://")).count(), 1, "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.contains("EM: ")).count(), 1, "{lines:?}");
}

#[test]
fn a_setting_the_command_does_not_have_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("drover.toml");
    std::fs::write(&file, "em-listn = \"127.0.0.1:9398\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["serve", "--config", file.to_str().unwrap(), "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`em-listn` is not a setting of `drover serve`") && err.contains("em-listen"), "{err}");
    assert!(!dir.path().join("data").exists(), "nothing started");
}

/// `em-external-url`: a URL that is not absolute http(s), or has a query or a fragment, is refused
/// before anything starts, from the command line, the environment or the file; a good one is the
/// base of the EM dialect's `Href`s.
#[test]
fn the_em_external_url_is_checked_at_start_and_used_for_every_href() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let refused = |args: &[&str], env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_drover"));
        cmd.arg("serve").args(args).arg("--data-dir").arg(&data).env_remove("DROVER_EM_EXTERNAL_URL");
        if let Some(v) = env {
            cmd.env("DROVER_EM_EXTERNAL_URL", v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused(&["--em-external-url", "ftp://dr.example.com"], None);
    assert!(err.contains("external URL \"ftp://dr.example.com\" has the scheme \"ftp\""), "{err}");
    let err = refused(&[], Some("https://dr.example.com/em?x=1"));
    assert!(err.contains("has a query") && err.contains("https://dr.example.com"), "{err}");
    let file = dir.path().join("drover.toml");
    std::fs::write(&file, "em-external-url = \"dr.example.com\"\n").unwrap();
    let err = refused(&["--config", file.to_str().unwrap()], None);
    assert!(err.contains("is not absolute"), "{err}");
    assert!(!data.exists(), "nothing started");

    // A good one, from the file.
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\nvro-listen = \"off\"\nem-listen = \"127.0.0.1:0\"\nhypervisor = \"simulated\"\n\
         plain-http = true\nem-external-url = \"https://dr.example.com/veeam/\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["serve", "--config", file.to_str().unwrap(), "--data-dir"])
        .arg(&data)
        .env("DROVER_ADMIN_PASSWORD", "config-test-password")
        .env_remove("DROVER_EM_EXTERNAL_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines().map_while(Result::ok);
    let em = lines
        .find_map(|l| l.trim_start().strip_prefix("EM: http://").and_then(|r| r.split('/').next()).map(String::from))
        .expect("an EM listener");
    let body = http_get(&em, "/api/");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(body.contains(r#"Href="https://dr.example.com/veeam/api/""#), "{body}");
    assert!(body.contains(r#"Href="https://dr.example.com/veeam/api/sessionMngr/?v=latest""#), "{body}");
}

/// A plain HTTP/1.1 GET; the whole answer.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}
