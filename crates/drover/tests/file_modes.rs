//! What `drover serve` writes is the service user's alone: the data directory, the database and
//! its WAL, the TLS key, datastores, VM directories and disk images are 0700 / 0600, whatever
//! umask it was started with; and files an older build left world-readable are made private.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Api, PASSWORD};
use reqwest::Method as M;
use serde_json::json;

struct Serve {
    child: std::process::Child,
    url: String,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(data: &Path) -> Serve {
    let mut child = Command::new(env!("CARGO_BIN_EXE_drover"))
        .args(["serve", "--listen", "127.0.0.1:0", "--vro-listen", "off", "--em-listen", "off"])
        .args(["--hypervisor", "simulated", "--plain-http"])
        .arg("--data-dir")
        .arg(data)
        .env("DROVER_ADMIN_PASSWORD", PASSWORD)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .trim_end_matches("/v1")
        .to_string();
    Serve { child, url }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every file and directory under `dir` that others (group or world) may read, write or enter.
fn not_private(dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.file_type().is_symlink() {
            continue;
        }
        if meta.permissions().mode() & 0o077 != 0 {
            out.push(format!("{} {:o}", path.display(), meta.permissions().mode() & 0o777));
        }
        if meta.is_dir() {
            not_private(&path, out);
        }
    }
}

#[tokio::test]
async fn everything_drover_writes_is_private() {
    let top = tempfile::tempdir().unwrap();
    let data = top.path().join("data");
    // An older build's leftovers: a world-readable data directory and database.
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(data.join("drover.db"), b"").unwrap();
    std::fs::set_permissions(data.join("drover.db"), std::fs::Permissions::from_mode(0o644)).unwrap();

    let server = serve(&data);
    let api = Api::login(&server.url).await;
    let site = api.ok(M::POST, "/v1/sites", Some(json!({"name": "p", "kind": "Production"}))).await;
    let host =
        api.ok(M::POST, "/v1/hosts", Some(json!({"site_id": site["id"], "name": "h", "address": "local"}))).await;
    let ds_path = data.join("datastores/ds1");
    let body = json!({"host_id": host["id"], "name": "ds1", "path": ds_path});
    let ds = api.ok(M::POST, "/v1/datastores", Some(body)).await;
    let body = json!({"name": "app", "host_id": host["id"], "datastore_id": ds["id"], "vcpus": 1, "memory_mib": 96,
        "disks": [{"name": "root", "size_bytes": 1048576}]});
    let accepted = api.ok(M::POST, "/v1/vms", Some(body)).await;
    let session = accepted["session_id"].as_str().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = api.session(session).await;
        if s["state"] == "Stopped" {
            assert_eq!(s["result"], "Success", "{s}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the VM was not created: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("drover.db")), 0o600);
    assert_eq!(mode(&ds_path), 0o700);
    let disks: Vec<_> = walk_files(&ds_path);
    assert!(disks.iter().any(|p| p.extension().is_some_and(|e| e == "qcow2")), "no disk image in {disks:?}");
    let mut open = Vec::new();
    not_private(&data, &mut open);
    assert!(open.is_empty(), "readable by others: {open:#?}");
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}
