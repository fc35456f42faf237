//! What the dialect's integration tests share: the dialect's listener beside the native
//! server, requests in the dialect, a site with a replicated VM and a plan, golden files.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::Server;

/// The Original VM Location.
pub const NIL: &str = "00000000-0000-0000-0000-000000000000";

pub struct Vro {
    pub server: Server,
    pub base: String,
    /// How long `wait_state` waits.
    pub patience: Duration,
    listener: Option<drover_api::Listener>,
}

impl Vro {
    /// The simulated hypervisor's server with the dialect beside it.
    pub async fn start() -> Vro {
        Vro::on(Server::simulated().await).await
    }

    /// The dialect beside this server, on the same `App`.
    pub async fn on(server: Server) -> Vro {
        let listener = drover_api::listen(
            drover_compat::vro::router(server.app.clone()),
            "127.0.0.1:0".parse().unwrap(),
            drover_api::Tls::Plain,
        )
        .await
        .unwrap();
        let base = listener.url();
        Vro { server, base, patience: Duration::from_secs(60), listener: Some(listener) }
    }

    pub async fn stop(mut self) {
        if let Some(l) = self.listener.take() {
            l.stop().await;
        }
        self.server.stop().await;
    }

    /// A raw request to the dialect: the status, the headers and the body as it came.
    pub async fn exchange(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Vec<u8>) {
        let mut req = self.server.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("Content-Type", "application/json").body(b.to_string());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        (status, headers, resp.bytes().await.unwrap().to_vec())
    }

    /// A raw request to the dialect: the status and the body as JSON (Null when empty). Every
    /// answer carries `Content-Type: application/json` and its body's `Content-Length`.
    pub async fn raw(
        &self,
        token: Option<&str>,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> (StatusCode, Value) {
        let (status, headers, bytes) = self.exchange(token, method.clone(), path, body).await;
        assert_content_headers(&headers, bytes.len(), "application/json", &format!("{method} {path}"));
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, v)
    }

    pub async fn call(&self, token: &str, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let text = body.map(|b| b.to_string());
        self.raw(Some(token), method, path, text.as_deref()).await
    }

    pub async fn get(&self, token: &str, path: &str) -> Value {
        let (s, v) = self.call(token, Method::GET, path, None).await;
        assert_eq!(s, StatusCode::OK, "GET {path}: {v}");
        v
    }

    /// Posts an action and expects the dialect's acceptance: 200 with an empty body.
    pub async fn act(&self, token: &str, plan: &str, action: &str, body: Value) {
        let (s, v) = self.call(token, Method::POST, &format!("/api/v3/Plans/{plan}/{action}"), Some(body)).await;
        assert_eq!((s, &v), (StatusCode::OK, &Value::Null), "{action}");
    }

    pub async fn login(&self, user: &str, password: &str) -> (StatusCode, Value) {
        let resp = self
            .server
            .http
            .post(format!("{}/api/token", self.base))
            .form(&[("grant_type", "password"), ("username", user), ("password", password)])
            .send()
            .await
            .unwrap();
        (resp.status(), resp.json().await.unwrap())
    }

    pub async fn token(&self, user: &str, password: &str) -> String {
        let (s, v) = self.login(user, password).await;
        assert_eq!(s, StatusCode::OK, "{v}");
        v["access_token"].as_str().unwrap().to_string()
    }

    /// Polls RuntimeDetails until the plan is in `state` (bounded in count and time).
    pub async fn wait_state(&self, token: &str, plan: &str, state: &str) -> Value {
        let deadline = tokio::time::Instant::now() + self.patience;
        let polls = self.patience.as_millis() / 50 + 1;
        for _ in 0..polls {
            let d = self.get(token, &format!("/api/v3/RuntimeDetails/Plans/{plan}")).await;
            if d["state"] == state {
                return d;
            }
            if d["state"] == "Halted" {
                let admin = self.server.admin().await;
                let sessions =
                    self.server.ok(&admin, Method::GET, &format!("/v1/sessions?target_id={plan}"), None).await;
                let id = sessions["items"][0]["id"].as_str().unwrap();
                let log = self.server.ok(&admin, Method::GET, &format!("/v1/sessions/{id}/log"), None).await;
                panic!("plan halted while waiting for {state}: {d}\n{log}");
            }
            assert!(tokio::time::Instant::now() < deadline, "plan never reached {state}: {d}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("plan never reached {state}");
    }
}

pub struct Site {
    pub plan: String,
    pub vm: String,
    pub location: String,
}

/// A VM with a ready replica (one published point, a real qcow2 file), another recovery location,
/// and a plan "Web" of the VM, all through the native API.
pub async fn site(vro: &Vro) -> Site {
    let server = &vro.server;
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let vm = server.vm(&t, &host, &ds, "app", json!({"tags": ["env:test", "tier:web"]})).await;
    let datastore = |name: &str| {
        let path = server.dir.path().join(name);
        json!({"host_id": host, "name": name, "path": path})
    };
    let dr = server.ok(&t, Method::POST, "/v1/datastores", Some(datastore("dr"))).await;
    let dr_path = PathBuf::from(dr["path"].as_str().unwrap());
    let job = server
        .ok(
            &t,
            Method::POST,
            "/v1/replication-jobs",
            Some(json!({"name": "j", "vm_ids": [vm], "target_host_id": host,
                "target_datastore_id": dr["id"], "schedule": {"type": "Manual"}, "retention_points": 3})),
        )
        .await;
    let store = server.app.engine().store();
    let admin = store.user_by_name("admin").await.unwrap().unwrap().0;
    drover_engine::testing::replica_with_point(
        store,
        admin.tenant_id,
        job["id"].as_str().unwrap().parse().unwrap(),
        (vm.parse().unwrap(), "app"),
        dr["id"].as_str().unwrap().parse().unwrap(),
        &dr_path,
    )
    .await;
    let elsewhere = server.ok(&t, Method::POST, "/v1/datastores", Some(datastore("elsewhere"))).await;
    let location = server
        .ok(
            &t,
            Method::POST,
            "/v1/recovery-locations",
            Some(json!({"name": "Elsewhere", "description": "the other room", "host_id": host,
                "datastore_id": elsewhere["id"], "network_mappings": [{"from": "lan", "to": "dr-lan"}]})),
        )
        .await;
    let plan = server
        .ok(
            &t,
            Method::POST,
            "/v1/plans",
            Some(json!({"name": "Web", "description": "the web tier",
                "groups": [{"name": "web", "critical": true, "vms": [{"vm_id": vm}]}]})),
        )
        .await;
    Site { plan: plan["id"].as_str().unwrap().into(), vm, location: location["id"].as_str().unwrap().into() }
}

/// A VM booting the tiny guest (128 MiB, with `extra` fields such as tags) on `host`/`ds`,
/// replicated for real by a first run of a manual job to a new datastore `dr`. Returns the VM's id.
pub async fn replicated_for_real(
    server: &Server,
    admin: &str,
    (host, ds): (&str, &str),
    name: &str,
    extra: Value,
) -> String {
    let guest = crate::common::tiny_guest();
    let mut fields = json!({"boot": {"kernel": guest.vmlinux, "initrd": guest.initramfs, "cmdline": guest.cmdline},
        "memory_mib": 128});
    if let (Some(f), Value::Object(extra)) = (fields.as_object_mut(), extra) {
        f.extend(extra);
    }
    let vm = server.vm(admin, host, ds, name, fields).await;
    let dr = json!({"host_id": host, "name": "dr", "path": server.dir.path().join("dr")});
    let dr = server.ok(admin, Method::POST, "/v1/datastores", Some(dr)).await;
    let job = server
        .ok(
            admin,
            Method::POST,
            "/v1/replication-jobs",
            Some(json!({"name": format!("{name}-job"), "vm_ids": [vm], "target_host_id": host,
                "target_datastore_id": dr["id"], "schedule": {"type": "Manual"}, "retention_points": 3})),
        )
        .await;
    let run = format!("/v1/replication-jobs/{}/run", job["id"].as_str().unwrap());
    let (status, run) = server.call(Some(admin), Method::POST, &run, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    let s = server.wait_session(admin, run["session_id"].as_str().unwrap(), Duration::from_secs(180)).await;
    assert_eq!(s["result"], "Success", "{s}");
    vm
}

// ------------------------------------------------------------------------------------------------
// Golden files

/// Replaces what changes from run to run (ids, times, secrets) by placeholders. The nil UUID
/// (the Original VM Location, the report template) and the fixed server id stay: they are part
/// of the contract.
pub fn normalize(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| {
                    let secret = matches!(k.as_str(), "access_token" | "refresh_token" | "client_secret");
                    (k.clone(), if secret && v.is_string() { json!("<secret>") } else { normalize(v) })
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(normalize).collect()),
        Value::String(s) => {
            let keep = [NIL, &drover_compat::vro::views::SERVER_ID.to_string()];
            if keep.contains(&s.as_str()) {
                v.clone()
            } else if uuid::Uuid::parse_str(s).is_ok() {
                json!("<uuid>")
            } else if chrono::DateTime::parse_from_rfc3339(s).is_ok() {
                json!("<time>")
            } else {
                json!(mask_uuids(s))
            }
        }
        _ => v.clone(),
    }
}

/// Replaces the UUIDs inside a text (a message naming an id) by `<uuid>`.
pub fn mask_uuids(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while !rest.is_empty() {
        if rest.len() >= 36 && rest.is_char_boundary(36) && uuid::Uuid::parse_str(&rest[..36]).is_ok() {
            out.push_str("<uuid>");
            rest = &rest[36..];
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Compares with `tests/golden/vro/<name>.json`; `UPDATE_GOLDEN=1` rewrites the file.
pub fn golden(name: &str, v: &Value) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/vro").join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(&normalize(v)).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(text, want, "{name} differs from {}", path.display());
}

pub fn keys(v: &Value) -> Vec<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

/// `Content-Type` starts with `media` and `Content-Length` is the length of the body received.
pub fn assert_content_headers(headers: &reqwest::header::HeaderMap, body_len: usize, media: &str, what: &str) {
    let content_type = headers.get("content-type").map(|v| v.to_str().unwrap());
    assert!(content_type.is_some_and(|t| t.starts_with(media)), "{what}: Content-Type {content_type:?}");
    let length = headers.get("content-length").map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
    assert_eq!(length, Some(body_len), "{what}: Content-Length");
}

pub fn assert_has_fields(v: &Value, fields: &str) {
    for f in fields.split(", ") {
        assert!(v.get(f).is_some(), "missing {f} in {v}");
    }
}
