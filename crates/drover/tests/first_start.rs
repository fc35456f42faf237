//! First start of `drover serve`: HTTPS with a generated certificate by default, a random admin
//! password printed once (and never again), and that password works.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn start(data: &std::path::Path) -> (std::process::Child, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["serve", "--listen", "127.0.0.1:0", "--vro-listen", "127.0.0.1:0", "--em-listen", "127.0.0.1:0"])
        .args(["--hypervisor", "simulated"])
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
    // The password line (when there is one) and the dialects' lines follow at once; give them a
    // moment.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut l = String::new();
        while reader.read_line(&mut l).is_ok_and(|n| n > 0) {
            if tx.send(std::mem::take(&mut l)).is_err() {
                break;
            }
        }
    });
    while let Ok(l) = rx.recv_timeout(std::time::Duration::from_secs(2)) {
        lines.push(l.trim().to_string());
    }
    (child, lines)
}

/// The URL printed on the line that starts with `what`.
fn endpoint(lines: &[String], what: &str) -> String {
    let line = lines.iter().find(|l| l.starts_with(what)).unwrap_or_else(|| panic!("no {what} line: {lines:?}"));
    line.split_whitespace().find(|w| w.starts_with("https://")).unwrap().to_string()
}

#[tokio::test]
async fn first_start_prints_a_password_once_and_serves_https() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, lines) = start(data.path());
    assert!(lines[0].contains("https://127.0.0.1:") && lines[0].contains("simulated"), "{lines:?}");
    let url = lines[0].split_whitespace().find(|w| w.starts_with("https://")).unwrap().to_string();
    let password = lines
        .iter()
        .find(|l| l.starts_with("admin password"))
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
    // The Veeam dialects are up, over HTTPS with the same certificate, with the same admin.
    let vro = endpoint(&lines, "VRO:");
    assert!(vro.ends_with("/api/v3"), "{vro}");
    let token = http
        .post(vro.replace("/api/v3", "/api/token"))
        .form(&[("grant_type", "password"), ("username", "admin"), ("password", password.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(token.status(), reqwest::StatusCode::OK);
    let em = endpoint(&lines, "EM:");
    let logon = http
        .post(format!("{em}sessionMngr/?v=latest"))
        .basic_auth("admin", Some(password.as_str()))
        .send()
        .await
        .unwrap();
    assert_eq!(logon.status(), reqwest::StatusCode::CREATED);
    let body = logon.text().await.unwrap();
    assert!(body.contains("<LogonSession") && body.contains("https://127.0.0.1:"), "{body}");
    child.kill().unwrap();
    child.wait().unwrap();

    // Second start: same certificate, no new password, the old one still works.
    let (mut child, lines) = start(data.path());
    assert!(
        !lines.iter().any(|l| l.contains("password")),
        "the password is printed only on the first start: {lines:?}"
    );
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
