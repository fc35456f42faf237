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
