//! The server in-process on a temporary SQLite database, driven over real HTTP on loopback.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use drover_engine::app::App;
use drover_engine::{Engine, EngineConfig};
use drover_hv::Hypervisor;
use drover_store::Store;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

pub const ADMIN_PASSWORD: &str = "admin-password";

pub struct Server {
    pub dir: tempfile::TempDir,
    pub app: App,
    pub base: String,
    pub http: reqwest::Client,
    listener: Option<drover_api::Listener>,
}

impl Server {
    pub async fn start(hv: Arc<dyn Hypervisor>, mut config: EngineConfig) -> Server {
        let dir = tempfile::tempdir().unwrap();
        if config.host_paths == Default::default() {
            config.host_paths = drover_engine::testing::host_paths(dir.path());
        }
        let store = Store::open_sqlite(&dir.path().join("drover.db")).await.unwrap();
        let engine = Engine::new(store, hv, config);
        let app = App::new(engine.clone());
        app.bootstrap(Some(ADMIN_PASSWORD.into())).await.unwrap();
        engine.start().await.unwrap();
        let listener =
            drover_api::listen(drover_api::router(app.clone()), "127.0.0.1:0".parse().unwrap(), drover_api::Tls::Plain)
                .await
                .unwrap();
        let base = listener.url();
        Server { dir, app, base, http: reqwest::Client::new(), listener: Some(listener) }
    }

    pub async fn simulated() -> Server {
        Server::start(Arc::new(drover_hv::sim::SimulatedHypervisor::new()), fast_config()).await
    }

    pub async fn stop(mut self) {
        self.app.engine().shutdown();
        if let Some(l) = self.listener.take() {
            l.stop().await;
        }
    }

    pub async fn token(&self, user: &str, password: &str) -> String {
        let resp = self
            .http
            .post(format!("{}/v1/token", self.base))
            .form(&[("grant_type", "password"), ("username", user), ("password", password)])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "login of {user}");
        resp.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_string()
    }

    pub async fn admin(&self) -> String {
        self.token("admin", ADMIN_PASSWORD).await
    }

    /// Sends a request and returns the status and the JSON body (Null when empty).
    pub async fn call(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, value)
    }

    pub async fn ok(&self, token: &str, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(Some(token), method.clone(), path, body).await;
        assert!(status.is_success(), "{method} {path}: {status} {v}");
        v
    }

    /// Waits for a session to stop (or halt) and returns it with its tasks.
    pub async fn wait_session(&self, token: &str, id: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let s = self.ok(token, Method::GET, &format!("/v1/sessions/{id}"), None).await;
            if s["state"] == "Stopped" || s["halted"] == true {
                return s;
            }
            assert!(tokio::time::Instant::now() < deadline, "session {id} did not finish: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A site, host and datastore; returns (host id, datastore id).
    pub async fn infrastructure(&self, token: &str) -> (String, String) {
        let site = self.ok(token, Method::POST, "/v1/sites", Some(json!({"name": "prod", "kind": "Production"}))).await;
        let host = self
            .ok(
                token,
                Method::POST,
                "/v1/hosts",
                Some(json!({"site_id": site["id"], "name": "h1", "address": "local"})),
            )
            .await;
        let path = self.dir.path().join("ds1");
        let ds = self
            .ok(
                token,
                Method::POST,
                "/v1/datastores",
                Some(json!({"host_id": host["id"], "name": "ds1", "path": path})),
            )
            .await;
        (host["id"].as_str().unwrap().into(), ds["id"].as_str().unwrap().into())
    }

    /// Creates a VM and waits until its disks exist; returns its id.
    pub async fn vm(&self, token: &str, host: &str, ds: &str, name: &str, extra: Value) -> String {
        let mut body = json!({
            "name": name, "host_id": host, "datastore_id": ds, "vcpus": 1, "memory_mib": 96,
            "disks": [{"name": "data", "size_bytes": 67108864}], "nics": [{"network": "lan"}], "tags": ["env:test"]
        });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let (status, accepted) = self.call(Some(token), Method::POST, "/v1/vms", Some(body)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        let s = self.wait_session(token, accepted["session_id"].as_str().unwrap(), Duration::from_secs(30)).await;
        assert_eq!(s["result"], "Success", "{s}");
        s["target_id"].as_str().unwrap().to_string()
    }
}

pub fn fast_config() -> EngineConfig {
    EngineConfig {
        heartbeat_timeout: Duration::from_secs(5),
        shutdown_timeout: Duration::from_secs(2),
        retry_backoff: Duration::from_millis(10),
        monitor_interval: Duration::from_millis(200),
        // These tests create jobs to test the API, not to run them.
        scheduler_interval: Duration::from_secs(3600),
        ..EngineConfig::default()
    }
}

/// The tiny guest built by `scripts/build-guest`. Fails (never skips) when it is missing.
pub fn tiny_guest() -> drover_hv::qemu::TinyGuest {
    let dir = std::env::var_os("DROVER_GUEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/out"));
    drover_hv::qemu::TinyGuest::load(&dir)
        .unwrap_or_else(|e| panic!("the tiny guest is missing ({e}): run scripts/build-guest first"))
}

/// A server whose VMs are real QEMU processes (TCG).
pub async fn with_qemu() -> (Server, Arc<drover_hv::qemu::QemuDriver>) {
    // Keep the runtime directory short: unix socket paths are limited to 107 bytes.
    let run = tempfile::Builder::new().prefix("drv").tempdir_in("/tmp").unwrap().keep();
    let driver = Arc::new(drover_hv::qemu::QemuDriver::new(drover_hv::qemu::QemuConfig::new(run)));
    let config = EngineConfig {
        heartbeat_timeout: Duration::from_secs(90),
        shutdown_timeout: Duration::from_secs(30),
        monitor_interval: Duration::from_millis(500),
        ..EngineConfig::default()
    };
    (Server::start(driver.clone(), config).await, driver)
}
