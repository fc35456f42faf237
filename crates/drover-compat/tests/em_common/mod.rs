//! What the EM dialect's integration tests share: its listener beside the native server,
//! requests with a logon session in the header or the cookie, reading XML answers, following a
//! session until it stops, and walking every `Href` reachable from a document.

#![allow(dead_code)]

use std::collections::{BTreeSet, VecDeque};
use std::time::Duration;

use drover_compat::em::EmConfig;
use quick_xml::events::Event;
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{self, Server};

pub const NS: &str = "http://www.veeam.com/ent/v1.0";

pub struct Em {
    pub base: String,
    pub http: reqwest::Client,
    pub listener: drover_api::Listener,
}

/// An answer: status, headers, body text.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// How a request names its logon session.
#[derive(Clone, Copy)]
pub enum Token<'a> {
    None,
    Header(&'a str),
    Cookie(&'a str),
    Both { header: &'a str, cookie: &'a str },
}

impl Em {
    pub async fn start(server: &Server, idle_timeout: Duration) -> Em {
        let config = EmConfig { idle_timeout, scheme: "http", ..EmConfig::default() };
        let listener = drover_api::listen(
            drover_compat::em::router_with(server.app.clone(), config),
            "127.0.0.1:0".parse().unwrap(),
            drover_api::Tls::Plain,
        )
        .await
        .unwrap();
        Em { base: listener.url(), http: reqwest::Client::new(), listener }
    }

    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http") { path.to_string() } else { format!("{}{path}", self.base) }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Token<'_>,
        json: bool,
        body: Option<(&str, String)>,
    ) -> Answer {
        let mut req = self.http.request(method, self.url(path));
        match token {
            Token::None => {}
            Token::Header(t) => req = req.header("X-RestSvcSessionId", t),
            Token::Cookie(t) => req = req.header("Cookie", format!("X-RestSvcSessionId={t}")),
            Token::Both { header, cookie } => {
                req = req.header("X-RestSvcSessionId", header).header("Cookie", format!("X-RestSvcSessionId={cookie}"))
            }
        }
        if json {
            req = req.header("Accept", "application/json");
        }
        if let Some((content_type, b)) = body {
            req = req.header("Content-Type", content_type).body(b);
        }
        let resp = tokio::time::timeout(Duration::from_secs(30), req.send()).await.unwrap().unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap();
        Answer { status, headers, body }
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        self.send(Method::GET, path, Token::Header(token), false, None).await
    }

    /// A GET that must succeed, as XML in the namespace.
    pub async fn ok(&self, path: &str, token: &str) -> String {
        let a = self.get(path, token).await;
        assert_eq!(a.status, StatusCode::OK, "GET {path}: {}", a.body);
        assert!(a.body.contains(&format!("xmlns=\"{NS}\"")), "{}", a.body);
        a.body
    }

    pub async fn logon_as(&self, user: &str, password: &str) -> Answer {
        let req = self.http.post(self.url("/api/sessionMngr/?v=latest")).basic_auth(user, Some(password));
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        Answer { status, headers, body: resp.text().await.unwrap() }
    }

    pub async fn logon(&self) -> String {
        let a = self.logon_as("admin", common::ADMIN_PASSWORD).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        a.headers["X-RestSvcSessionId"].to_str().unwrap().to_string()
    }
}

/// Every `Href` in a document.
pub fn hrefs(xml: &str) -> Vec<String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut out = Vec::new();
    loop {
        match reader.read_event().unwrap() {
            Event::Start(e) | Event::Empty(e) => {
                for a in e.attributes() {
                    let a = a.unwrap();
                    if a.key.as_ref() == b"Href" {
                        out.push(a.unescape_value().unwrap().into_owned());
                    }
                }
            }
            Event::Eof => return out,
            _ => {}
        }
    }
}

/// The text of the first element with this name.
pub fn text(xml: &str, name: &str) -> Option<String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut inside = false;
    loop {
        match reader.read_event().unwrap() {
            Event::Start(e) if e.name().as_ref() == name.as_bytes() => inside = true,
            Event::Text(t) if inside => return Some(t.unescape().unwrap().into_owned()),
            Event::End(_) if inside => return Some(String::new()),
            Event::Eof => return None,
            _ => {}
        }
    }
}

/// The value of an attribute on the first element with this name (and `Rel`, for links).
pub fn attr(xml: &str, element: &str, rel: Option<&str>, name: &str) -> Option<String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    loop {
        match reader.read_event().unwrap() {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == element.as_bytes() => {
                let get = |key: &str| {
                    e.attributes()
                        .map(|a| a.unwrap())
                        .find(|a| a.key.as_ref() == key.as_bytes())
                        .map(|a| a.unescape_value().unwrap().into_owned())
                };
                if rel.is_none() || get("Rel").as_deref() == rel {
                    return get(name);
                }
            }
            Event::Eof => return None,
            _ => {}
        }
    }
}

/// One VM of a session entity (an item of `CloudFailoverTasks`, itself named
/// `CloudFailoverTasks`): its `VmName` and the `Type` and `Href` of its `VmReplicaPointLink`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmTask {
    pub vm_name: String,
    pub point_type: String,
    pub point_href: String,
}

/// The VMs of a session entity, in order.
pub fn vm_tasks(xml: &str) -> Vec<VmTask> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut out: Vec<VmTask> = Vec::new();
    let value = |e: &quick_xml::events::BytesStart, key: &str| {
        e.attributes()
            .map(|a| a.unwrap())
            .find(|a| a.key.as_ref() == key.as_bytes())
            .map(|a| a.unescape_value().unwrap().into_owned())
    };
    loop {
        match reader.read_event().unwrap() {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"CloudFailoverTasks" => {
                if let Some(vm_name) = value(&e, "VmName") {
                    out.push(VmTask { vm_name, point_type: String::new(), point_href: String::new() });
                }
            }
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"VmReplicaPointLink" => {
                let last = out.last_mut().expect("a VmReplicaPointLink outside a VM's CloudFailoverTasks");
                last.point_type = value(&e, "Type").unwrap_or_default();
                last.point_href = value(&e, "Href").unwrap_or_default();
            }
            Event::Eof => return out,
            _ => {}
        }
    }
}

pub fn count(xml: &str, element: &str) -> usize {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut n = 0;
    loop {
        match reader.read_event().unwrap() {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == element.as_bytes() => n += 1,
            Event::Eof => return n,
            _ => {}
        }
    }
}

/// Polls a session's entity (as JSON, where the session's own fields are easy to tell from its
/// tasks') until it is Stopped, checking that a running session has no end and no result; then
/// returns the XML. Bounded in count and time.
pub async fn until_stopped(em: &Em, href: &str, token: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for _ in 0..600 {
        let a = em.send(Method::GET, href, Token::Header(token), true, None).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        let j = a.json();
        if j["State"] == "Stopped" {
            assert!(j["EndTimeUTC"].is_string(), "{j}");
            return em.ok(href, token).await;
        }
        assert!(j.get("EndTimeUTC").is_none(), "a running session has no end: {j}");
        assert_eq!(j["Result"], "None", "a running session has no result: {j}");
        assert!(tokio::time::Instant::now() < deadline, "session did not stop: {j}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("session did not stop after 600 polls");
}

/// Gets every `Href` reachable from `start` (breadth first, bounded) and asserts 200 for each.
pub async fn walk(em: &Em, token: &str, start: Vec<String>) -> usize {
    let mut seen = BTreeSet::new();
    let mut queue: VecDeque<String> = start.into();
    while let Some(href) = queue.pop_front() {
        if !seen.insert(href.clone()) {
            continue;
        }
        assert!(seen.len() < 500, "too many links to walk");
        assert!(href.starts_with(&em.base), "{href} is not absolute on this host ({})", em.base);
        let a = em.get(&href, token).await;
        assert_eq!(a.status, StatusCode::OK, "GET {href}: {}", a.body);
        queue.extend(hrefs(&a.body));
    }
    seen.len()
}

/// A VM with a ready replica and one published point (the simulated hypervisor cannot
/// replicate): a real qcow2 file, so failover's boot overlay works. Returns the VM id.
pub async fn replicated_vm(server: &Server, t: &str, host: &str, ds: &str, name: &str) -> String {
    let vm = server.vm(t, host, ds, name, json!({})).await;
    let dr_path = server.dir.path().join(format!("dr-{name}"));
    let dr = server
        .ok(
            t,
            Method::POST,
            "/v1/datastores",
            Some(json!({"host_id": host, "name": format!("dr-{name}"), "path": dr_path})),
        )
        .await;
    let job = server
        .ok(
            t,
            Method::POST,
            "/v1/replication-jobs",
            Some(json!({"name": format!("{name}-job"), "vm_ids": [vm], "target_host_id": host,
                "target_datastore_id": dr["id"], "schedule": {"type": "Manual"}, "retention_points": 2})),
        )
        .await;
    let store = server.app.engine().store();
    let tenant = store.user_by_name("admin").await.unwrap().unwrap().0.tenant_id;
    drover_engine::testing::replica_with_point(
        store,
        tenant,
        job["id"].as_str().unwrap().parse().unwrap(),
        (vm.parse().unwrap(), name),
        dr["id"].as_str().unwrap().parse().unwrap(),
        &dr_path,
    )
    .await;
    vm
}

/// A plan of these VMs whose steps only power them on; returns its id.
pub async fn plan(server: &Server, t: &str, name: &str, vms: &[&str]) -> String {
    let vms: Vec<Value> = vms
        .iter()
        .map(|v| json!({"vm_id": v, "steps": [{"name": "on", "kind": {"type": "PowerOn"}, "critical": true}]}))
        .collect();
    let p = server
        .ok(
            t,
            Method::POST,
            "/v1/plans",
            Some(json!({"name": name, "description": "web tier", "groups": [{"name": "g", "vms": vms}]})),
        )
        .await;
    p["id"].as_str().unwrap().to_string()
}
