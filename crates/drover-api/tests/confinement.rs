//! No tenant reaches the host: datastores only inside the configured roots, imports and boot
//! files only from the import directories, sites/hosts/datastores only by system administrators,
//! and a tenant only on the datastores granted to it. Over HTTP, as tenant users.

mod common;

use std::path::Path;
use std::time::Duration;

use common::Server;
use drover_engine::EngineConfig;
use drover_engine::host_paths::HostPaths;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

struct Rig {
    server: Server,
    /// Holds the datastore root and the import directory, apart from the server's own files.
    host: tempfile::TempDir,
    admin: String,
    host_id: String,
    site_id: String,
}

impl Rig {
    async fn new() -> Rig {
        let host = tempfile::tempdir().unwrap();
        let paths = HostPaths::new(&[host.path().join("datastores")], &[host.path().join("imports")]).unwrap();
        let config = EngineConfig { host_paths: paths, ..common::fast_config() };
        let server = Server::start(std::sync::Arc::new(drover_hv::sim::SimulatedHypervisor::new()), config).await;
        let admin = server.admin().await;
        let site =
            server.ok(&admin, Method::POST, "/v1/sites", Some(json!({"name": "prod", "kind": "Production"}))).await;
        let h = server
            .ok(
                &admin,
                Method::POST,
                "/v1/hosts",
                Some(json!({"site_id": site["id"], "name": "h1", "address": "local"})),
            )
            .await;
        Rig {
            server,
            host,
            admin,
            host_id: h["id"].as_str().unwrap().into(),
            site_id: site["id"].as_str().unwrap().into(),
        }
    }

    fn root(&self) -> std::path::PathBuf {
        std::fs::canonicalize(self.host.path().join("datastores")).unwrap()
    }

    fn imports(&self) -> std::path::PathBuf {
        std::fs::canonicalize(self.host.path().join("imports")).unwrap()
    }

    /// A tenant with a user of `role`; returns (tenant id, token).
    async fn tenant(&self, name: &str, role: &str) -> (String, String) {
        let t = self.server.ok(&self.admin, Method::POST, "/v1/tenants", Some(json!({"name": name}))).await;
        let user = format!("{name}-user");
        self.server
            .ok(
                &self.admin,
                Method::POST,
                "/v1/users",
                Some(json!({"name": user, "password": "password1", "role": role, "tenant_id": t["id"]})),
            )
            .await;
        (t["id"].as_str().unwrap().into(), self.server.token(&user, "password1").await)
    }

    async fn datastore(&self, name: &str) -> String {
        let path = self.root().join(name);
        let ds = self
            .server
            .ok(
                &self.admin,
                Method::POST,
                "/v1/datastores",
                Some(json!({"host_id": self.host_id, "name": name, "path": path})),
            )
            .await;
        ds["id"].as_str().unwrap().into()
    }

    fn vm_body(&self, ds: &str, name: &str, extra: Value) -> Value {
        let mut b = json!({"name": name, "host_id": self.host_id, "datastore_id": ds, "vcpus": 1, "memory_mib": 96,
                           "disks": [{"name": "d", "size_bytes": 1048576}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    }
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn datastores_stay_inside_the_roots_and_only_system_administrators_make_them() {
    let rig = Rig::new().await;
    let s = &rig.server;
    let (_, author) = rig.tenant("acme", "PlanAuthor").await;
    let (_, tenant_admin) = rig.tenant("beta", "Administrator").await;

    // Tenant users, even a tenant's administrator, create no site, host or datastore anywhere.
    let inside = rig.root().join("mine");
    for token in [&author, &tenant_admin] {
        for (path, body) in [
            ("/v1/sites", json!({"name": "s", "kind": "Production"})),
            ("/v1/hosts", json!({"site_id": rig.site_id, "name": "h", "address": "local"})),
            ("/v1/datastores", json!({"host_id": rig.host_id, "name": "d", "path": inside})),
            ("/v1/datastores", json!({"host_id": rig.host_id, "name": "d", "path": "/etc"})),
        ] {
            let (status, v) = s.call(Some(token), Method::POST, path, Some(body)).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {v}");
        }
    }
    assert!(!inside.exists());

    // Even a system administrator places datastores only inside the roots: absolute paths
    // elsewhere, `..`, a symlink out, /proc, relative paths. Nothing is created, and the answer
    // is the same whether the path exists or not.
    let outside = rig.host.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, rig.root().join("link")).unwrap();
    let missing = "/drover-test-does-not-exist/deeper";
    let refused = [
        "/etc".to_string(),
        "/root".into(),
        "/".into(),
        missing.into(),
        "/proc/self".into(),
        "/proc/self/root/etc".into(),
        format!("{}/../outside/new", rig.root().display()),
        format!("{}/link", rig.root().display()),
        format!("{}/link/new", rig.root().display()),
        "datastores/relative".into(),
    ];
    let mut messages = Vec::new();
    for path in &refused {
        let (status, v) = s
            .call(
                Some(&rig.admin),
                Method::POST,
                "/v1/datastores",
                Some(json!({"host_id": rig.host_id, "name": "d", "path": path})),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
        let m = v["message"].as_str().unwrap().replace(path.as_str(), "<path>");
        messages.push(m);
    }
    assert!(messages.iter().all(|m| m == &messages[0]), "refusals differ: {messages:#?}");
    assert!(messages[0].contains("is not inside a datastore root"), "{}", messages[0]);
    assert!(!Path::new(missing).parent().unwrap().exists());
    assert!(!outside.join("new").exists());
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    let (_, list) = s.call(Some(&rig.admin), Method::GET, "/v1/datastores", None).await;
    assert_eq!(list["total"], 0);

    // Inside a root it is made, private to the service.
    let id = rig.datastore("fast").await;
    assert_eq!(mode(&rig.root().join("fast")), 0o700);
    // Tenants do not change or delete it.
    for token in [&author, &tenant_admin] {
        let (status, _) = s.call(Some(token), Method::DELETE, &format!("/v1/datastores/{id}"), None).await;
        assert!(status == StatusCode::FORBIDDEN || status == StatusCode::NOT_FOUND, "{status}");
    }
    rig.server.stop().await;
}

#[tokio::test]
async fn imports_and_boot_files_come_only_from_the_import_directory() {
    let rig = Rig::new().await;
    let s = &rig.server;
    let (tenant, author) = rig.tenant("acme", "PlanAuthor").await;
    let ds = rig.datastore("ds1").await;
    s.ok(&rig.admin, Method::POST, &format!("/v1/datastores/{ds}/grants"), Some(json!({"tenant_id": tenant}))).await;

    // A VM of the system tenant, whose disk another tenant must not be able to copy.
    let (status, v) =
        s.call(Some(&rig.admin), Method::POST, "/v1/vms", Some(rig.vm_body(&ds, "theirs", json!({})))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let done = s.wait_session(&rig.admin, v["session_id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(done["result"], "Success", "{done}");
    let their_disk = std::fs::read_dir(rig.root().join("ds1"))
        .unwrap()
        .flat_map(|e| std::fs::read_dir(e.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "qcow2"))
        .expect("the system VM's disk");
    assert_eq!(mode(&their_disk), 0o600);

    let imports = rig.imports();
    std::fs::write(imports.join("vmlinux"), b"a kernel").unwrap();
    std::os::unix::fs::symlink(s.dir.path().join("drover.db"), imports.join("db-link")).unwrap();
    let secrets = [
        "/etc/shadow".to_string(),
        "/etc/passwd".into(),
        s.dir.path().join("drover.db").display().to_string(),
        their_disk.display().to_string(),
        format!("{}/../datastores/ds1", imports.display()),
        imports.join("db-link").display().to_string(),
        "/proc/self/environ".into(),
        "relative.qcow2".into(),
    ];
    let vms_before = s.ok(&author, Method::GET, "/v1/vms", None).await["total"].clone();
    for secret in &secrets {
        for extra in [
            json!({"disks": [{"name": "d", "import_from": secret}]}),
            json!({"boot": {"kernel": secret}}),
            json!({"boot": {"kernel": imports.join("vmlinux"), "initrd": secret}}),
        ] {
            let (status, v) =
                s.call(Some(&author), Method::POST, "/v1/vms", Some(rig.vm_body(&ds, "mine", extra.clone()))).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {v}");
            let m = v["message"].as_str().unwrap();
            assert!(m.contains("inside an import directory") || m.contains("does not exist"), "{extra}: {m}");
            assert!(!m.contains("Permission") && !m.contains("No such file"), "{m}");
        }
    }
    assert_eq!(s.ok(&author, Method::GET, "/v1/vms", None).await["total"], vms_before);

    // What is inside the import directory is imported, and the copy is private.
    let image = imports.join("golden.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("1M")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let body = rig.vm_body(&ds, "mine", json!({"disks": [{"name": "root", "import_from": image}]}));
    let (status, v) = s.call(Some(&author), Method::POST, "/v1/vms", Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let done = s.wait_session(&author, v["session_id"].as_str().unwrap(), Duration::from_secs(30)).await;
    assert_eq!(done["result"], "Success", "{done}");
    let vm = s.ok(&author, Method::GET, &format!("/v1/vms/{}", done["target_id"].as_str().unwrap()), None).await;
    assert_eq!(vm["disks"][0]["import_from"], image.display().to_string());
    rig.server.stop().await;
}

#[tokio::test]
async fn a_tenant_uses_only_the_datastores_granted_to_it() {
    let rig = Rig::new().await;
    let s = &rig.server;
    let (acme, author) = rig.tenant("acme", "PlanAuthor").await;
    let (_, other) = rig.tenant("beta", "PlanAuthor").await;
    let ds = rig.datastore("ds1").await;

    // Before the grant, the tenant sees nothing of the host's resources and cannot use them.
    for path in ["/v1/sites", "/v1/hosts", "/v1/datastores"] {
        assert_eq!(s.ok(&author, Method::GET, path, None).await["total"], 0, "{path}");
    }
    let (status, v) = s.call(Some(&author), Method::POST, "/v1/vms", Some(rig.vm_body(&ds, "app", json!({})))).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    // Only system administrators grant.
    for token in [&author, &other] {
        let (status, _) = s
            .call(Some(token), Method::POST, &format!("/v1/datastores/{ds}/grants"), Some(json!({"tenant_id": acme})))
            .await;
        assert!(status == StatusCode::FORBIDDEN, "{status}");
    }
    let (status, v) = s
        .call(
            Some(&rig.admin),
            Method::POST,
            &format!("/v1/datastores/{ds}/grants"),
            Some(json!({"tenant_id": uuid::Uuid::new_v4()})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");

    let grants =
        s.ok(&rig.admin, Method::POST, &format!("/v1/datastores/{ds}/grants"), Some(json!({"tenant_id": acme}))).await;
    assert_eq!(grants["tenant_ids"], json!([acme]));
    // The grantee sees the datastore, its host and its site, and places a VM there.
    for path in ["/v1/sites", "/v1/hosts", "/v1/datastores"] {
        assert_eq!(s.ok(&author, Method::GET, path, None).await["total"], 1, "{path}");
    }
    let (status, v) = s.call(Some(&author), Method::POST, "/v1/vms", Some(rig.vm_body(&ds, "app", json!({})))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    let done = s.wait_session(&author, v["session_id"].as_str().unwrap(), Duration::from_secs(30)).await;
    let vm = done["target_id"].as_str().unwrap().to_string();
    // ... but does not rename or delete it.
    let (status, _) =
        s.call(Some(&author), Method::PATCH, &format!("/v1/datastores/{ds}"), Some(json!({"name": "x"}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Another tenant still cannot: not for a VM, a replication target or a recovery location.
    for (path, body) in [
        ("/v1/vms", rig.vm_body(&ds, "x", json!({}))),
        ("/v1/recovery-locations", json!({"name": "l", "host_id": rig.host_id, "datastore_id": ds})),
    ] {
        let (status, v) = s.call(Some(&other), Method::POST, path, Some(body)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {v}");
    }
    for path in [format!("/v1/datastores/{ds}"), format!("/v1/hosts/{}", rig.host_id), format!("/v1/vms/{vm}")] {
        assert_eq!(s.call(Some(&other), Method::GET, &path, None).await.0, StatusCode::NOT_FOUND, "{path}");
    }

    // The grant cannot be taken back while the tenant has a VM there; then it can.
    let (status, v) =
        s.call(Some(&rig.admin), Method::DELETE, &format!("/v1/datastores/{ds}/grants/{acme}"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{v}");
    assert!(v["message"].as_str().unwrap().contains("app"), "{v}");
    let (status, v) = s.call(Some(&author), Method::DELETE, &format!("/v1/vms/{vm}"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{v}");
    s.wait_session(&author, v["session_id"].as_str().unwrap(), Duration::from_secs(30)).await;
    let (status, v) =
        s.call(Some(&rig.admin), Method::DELETE, &format!("/v1/datastores/{ds}/grants/{acme}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{v}");
    assert_eq!(
        s.call(Some(&author), Method::GET, &format!("/v1/datastores/{ds}"), None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        s.ok(&rig.admin, Method::GET, &format!("/v1/datastores/{ds}/grants"), None).await["tenant_ids"],
        json!([])
    );
    rig.server.stop().await;
}
