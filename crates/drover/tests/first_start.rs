//! First start of `drover serve`: HTTPS with a generated certificate by default, a random admin
//! password printed once (and never again), and that password works.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn start(data: &std::path::Path) -> (std::process::Child, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["serve", "--listen", "127.0.0.1:0", "--hypervisor", "simulated"])
        .arg("--data-dir")
        .arg(data)
        .env_remove("DROVER_ADMIN_PASSWORD")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut lines = Vec::new();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    lines.push(line.trim().to_string());
    // The password line, when there is one, follows at once; give it a moment.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut l = String::new();
        if reader.read_line(&mut l).is_ok() {
            let _ = tx.send(l);
        }
    });
    if let Ok(l) = rx.recv_timeout(std::time::Duration::from_secs(2)) {
        lines.push(l.trim().to_string());
    }
    (child, lines)
}

#[tokio::test]
async fn first_start_prints_a_password_once_and_serves_https() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, lines) = start(data.path());
    assert!(lines[0].contains("https://127.0.0.1:") && lines[0].contains("simulated"), "{lines:?}");
    let url = lines[0].split_whitespace().find(|w| w.starts_with("https://")).unwrap().to_string();
    let password = lines
        .get(1)
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or_else(|| panic!("no password line: {lines:?}"))
        .to_string();
    assert!(password.len() >= 16);
    let cert = std::fs::read(data.path().join("tls-cert.pem")).unwrap();
    let key = std::fs::metadata(data.path().join("tls-key.pem")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&key.permissions()) & 0o077, 0, "the key is private");
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&cert).unwrap())
        .build()
        .unwrap();
    let login = |pw: String| {
        let http = http.clone();
        let url = url.clone();
        async move {
            http.post(format!("{url}/v1/token"))
                .form(&[("grant_type", "password"), ("username", "admin"), ("password", pw.as_str())])
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(login(password.clone()).await, reqwest::StatusCode::OK);
    assert_eq!(login("wrong".into()).await, reqwest::StatusCode::UNAUTHORIZED);
    // Plain HTTP is not served on the HTTPS port.
    let plain = reqwest::get(url.replace("https://", "http://") + "/v1/openapi.json").await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
    child.kill().unwrap();
    child.wait().unwrap();

    // Second start: same certificate, no new password, the old one still works.
    let (mut child, lines) = start(data.path());
    assert_eq!(lines.len(), 1, "the password is printed only on the first start: {lines:?}");
    assert_eq!(std::fs::read(data.path().join("tls-cert.pem")).unwrap(), cert);
    let url = lines[0].split_whitespace().find(|w| w.starts_with("https://")).unwrap().to_string();
    let status = http
        .post(format!("{url}/v1/token"))
        .form(&[("grant_type", "password"), ("username", "admin"), ("password", password.as_str())])
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, reqwest::StatusCode::OK);
    child.kill().unwrap();
    child.wait().unwrap();
}
