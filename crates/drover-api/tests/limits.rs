//! The listener's limits over real connections on loopback (idle and slow clients are closed,
//! connections beyond the cap are refused and the server still answers), and tenant confinement
//! on every verb: another tenant's objects are 404 whatever the request carries.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use drover_api::{ListenerLimits, Tls};
use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Limits short enough for a test, each distinct so a test can tell which one closed a connection.
fn short_limits() -> ListenerLimits {
    ListenerLimits {
        header_read_timeout: Duration::from_millis(800),
        tls_handshake_timeout: Duration::from_millis(800),
        idle_timeout: Duration::from_millis(2500),
        body_read_timeout: Duration::from_millis(1500),
        max_connections: 1024,
    }
}

/// Reads until the server closes the connection (end of file or reset) and returns when that
/// happened, or `None` if it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = within.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            // A 408 or other bytes before the close are fine; keep reading until the close.
            Ok(Ok(_)) => {}
        }
    }
}

/// Sends one keep-alive request and reads its whole answer (head and `Content-Length` body).
async fn request_on(stream: &mut TcpStream, path: &str) -> String {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        assert!(Instant::now() < deadline, "no whole answer: {text}");
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "closed before the answer was complete: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

async fn wait_for_connections(listener: &drover_api::Listener, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while listener.connection_count() != count {
        assert!(Instant::now() < deadline, "{} connections open, expected {count}", listener.connection_count());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn idle_and_slow_clients_are_closed_after_the_timeouts() {
    let server = Server::simulated().await;
    let limits = short_limits();
    let listener = drover_api::listen_with(
        drover_api::router(server.app.clone()),
        "127.0.0.1:0".parse().unwrap(),
        Tls::Plain,
        limits,
    )
    .await
    .unwrap();
    let margin = Duration::from_secs(2);

    // A connection that sends nothing: closed after the header timeout.
    let mut silent = TcpStream::connect(listener.addr).await.unwrap();
    // Half a request line, then nothing.
    let mut slow = TcpStream::connect(listener.addr).await.unwrap();
    slow.write_all(b"GET /v1/openapi.js").await.unwrap();
    // The start of the HTTP/2 preface, which keeps hyper guessing the protocol.
    let mut preface = TcpStream::connect(listener.addr).await.unwrap();
    preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let (silent, slow, preface) = tokio::join!(
        closed_within(&mut silent, limits.header_read_timeout + margin),
        closed_within(&mut slow, limits.header_read_timeout + margin),
        closed_within(&mut preface, limits.header_read_timeout + margin),
    );
    println!("closed after: silent {silent:?}, half a request line {slow:?}, half a preface {preface:?}");
    for (what, after) in [("silent", silent), ("slow", slow), ("preface", preface)] {
        let after = after.unwrap_or_else(|| panic!("the {what} connection is still open"));
        assert!(after >= limits.header_read_timeout - Duration::from_millis(100), "{what} closed too early: {after:?}");
    }

    // A slow sender that keeps trickling bytes is still held to the header timeout.
    let mut trickle = TcpStream::connect(listener.addr).await.unwrap();
    let started = Instant::now();
    let mut closed = false;
    for byte in b"GET /v1/openapi.json HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
        if trickle.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        if closed_within(&mut trickle, Duration::from_millis(100)).await.is_some() {
            closed = true;
            break;
        }
    }
    println!("trickling sender closed: {closed} after {:?}", started.elapsed());
    assert!(closed, "a sender trickling one byte every 100 ms was never closed");
    assert!(started.elapsed() < limits.header_read_timeout + margin, "{:?}", started.elapsed());

    // A keep-alive connection after an answer: open past the header timeout, closed after the
    // idle timeout.
    let mut idle = TcpStream::connect(listener.addr).await.unwrap();
    let answer = request_on(&mut idle, "/v1/openapi.json").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let open_for = limits.header_read_timeout + Duration::from_millis(400);
    assert_eq!(closed_within(&mut idle, open_for).await, None, "an answered connection was closed as a slow one");
    // It still takes requests.
    let answer = request_on(&mut idle, "/v1/openapi.json").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let after = closed_within(&mut idle, limits.idle_timeout + margin).await;
    println!("idle keep-alive connection closed after {after:?} (idle timeout {:?})", limits.idle_timeout);
    let after = after.expect("an idle keep-alive connection was never closed");
    assert!(after >= limits.idle_timeout - Duration::from_millis(100), "closed too early: {after:?}");

    // A body sent slowly: the handler's read fails at the body timeout, the client hears a 400
    // and the connection is closed.
    let mut slow_body = TcpStream::connect(listener.addr).await.unwrap();
    slow_body
        .write_all(
            b"POST /v1/token HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\n\
              Content-Length: 100\r\n\r\ngrant_type=pass",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < limits.body_read_timeout + margin {
        match tokio::time::timeout(Duration::from_millis(200), slow_body.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            // Keep trickling: one byte every 200 ms, which a per-frame timeout would never stop.
            Err(_) => {
                let _ = slow_body.write_all(b"x").await;
            }
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    println!("slow body: closed after {:?}, answer {:?}", started.elapsed(), answer.lines().next());
    assert!(started.elapsed() < limits.body_read_timeout + margin, "a slow body held its connection");
    assert!(started.elapsed() >= limits.body_read_timeout - Duration::from_millis(100), "{:?}", started.elapsed());
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    wait_for_connections(&listener, 0).await;
    listener.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn tls_handshakes_and_idle_tls_connections_are_timed_out() {
    let server = Server::simulated().await;
    let (cert, key) = drover_api::self_signed(server.dir.path()).unwrap();
    let limits = short_limits();
    let listener = drover_api::listen_with(
        drover_api::router(server.app.clone()),
        "127.0.0.1:0".parse().unwrap(),
        Tls::Files { cert, key },
        limits,
    )
    .await
    .unwrap();
    let margin = Duration::from_secs(2);

    // No ClientHello: closed after the handshake timeout.
    let mut silent = TcpStream::connect(listener.addr).await.unwrap();
    let after = closed_within(&mut silent, limits.tls_handshake_timeout + margin).await;
    println!("TCP connection without a handshake closed after {after:?}");
    assert!(after.is_some(), "a connection that never started its handshake is still open");

    // A finished handshake and one answer, then nothing: the idle timeout closes it.
    let http = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let resp = http.get(format!("{}/v1/openapi.json", listener.url())).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.bytes().await.unwrap();
    assert_eq!(listener.connection_count(), 1, "reqwest keeps its connection");
    let started = Instant::now();
    wait_for_connections(&listener, 0).await;
    println!("idle TLS connection closed after {:?} (idle timeout {:?})", started.elapsed(), limits.idle_timeout);
    assert!(started.elapsed() >= limits.idle_timeout - Duration::from_millis(300), "{:?}", started.elapsed());
    // The client reconnects for its next request.
    assert_eq!(http.get(format!("{}/v1/openapi.json", listener.url())).send().await.unwrap().status(), StatusCode::OK);

    listener.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_and_the_server_still_answers() {
    let server = Server::simulated().await;
    let limits = ListenerLimits { max_connections: 4, header_read_timeout: Duration::from_secs(30), ..short_limits() };
    let listener = drover_api::listen_with(
        drover_api::router(server.app.clone()),
        "127.0.0.1:0".parse().unwrap(),
        Tls::Plain,
        limits,
    )
    .await
    .unwrap();
    let url = format!("{}/v1/openapi.json", listener.url());

    let mut held = Vec::new();
    for _ in 0..limits.max_connections {
        held.push(TcpStream::connect(listener.addr).await.unwrap());
    }
    wait_for_connections(&listener, limits.max_connections).await;
    // Over the cap: accepted by the kernel, closed by the server at once.
    for _ in 0..3 {
        let mut over = TcpStream::connect(listener.addr).await.unwrap();
        let after = closed_within(&mut over, Duration::from_secs(2)).await;
        assert!(after.is_some(), "a connection over the cap was kept open");
    }
    let refused = reqwest::Client::new().get(&url).send().await;
    assert!(refused.is_err(), "a request over the cap was answered: {refused:?}");
    // One held connection goes away; the next request is answered.
    drop(held.pop());
    wait_for_connections(&listener, limits.max_connections - 1).await;
    let started = Instant::now();
    let resp = reqwest::Client::new().get(&url).send().await.unwrap();
    println!("answered {} in {:?} once a slot was free", resp.status(), started.elapsed());
    assert_eq!(resp.status(), StatusCode::OK);
    drop(held);
    listener.stop().await;
    server.stop().await;
}

/// Another tenant's plan, VM, job, location and session are 404 on every verb, even from that
/// tenant's administrator and with bodies that would otherwise be refused for what they contain.
/// (Sites, hosts and datastores are the system administrators'; `confinement.rs` tests those.)
#[tokio::test]
async fn another_tenants_objects_are_not_found_on_every_verb() {
    let server = Server::simulated().await;
    let admin = server.admin().await;
    let (host, ds) = server.infrastructure(&admin).await;
    let vm = server.vm(&admin, &host, &ds, "app", json!({})).await;
    let dr = server
        .ok(
            &admin,
            Method::POST,
            "/v1/datastores",
            Some(json!({"host_id": host, "name": "dr", "path": server.dir.path().join("dr")})),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let job = server
        .ok(
            &admin,
            Method::POST,
            "/v1/replication-jobs",
            Some(json!({"name": "j", "vm_ids": [vm], "target_host_id": host, "target_datastore_id": dr,
                "schedule": {"type": "Manual"}, "retention_points": 3})),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let location = server
        .ok(
            &admin,
            Method::POST,
            "/v1/recovery-locations",
            Some(json!({"name": "loc", "host_id": host, "datastore_id": dr})),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let plan = server
        .ok(
            &admin,
            Method::POST,
            "/v1/plans",
            Some(json!({"name": "p", "groups": [{"name": "g", "vms": [{"vm_id": vm}]}]})),
        )
        .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let sessions = server.ok(&admin, Method::GET, "/v1/sessions", None).await;
    let session = sessions["items"][0]["id"].as_str().unwrap().to_string();

    let acme = server.ok(&admin, Method::POST, "/v1/tenants", Some(json!({"name": "acme"}))).await;
    server
        .ok(
            &admin,
            Method::POST,
            "/v1/users",
            Some(json!({"name": "acme-admin", "password": "password1", "role": "Administrator", "tenant_id": acme["id"]})),
        )
        .await;
    let other = server.token("acme-admin", "password1").await;

    // A plan body that names objects the caller cannot see: checked against the caller's tenant,
    // it would be a 400 ("does not exist"); the plan is not found first.
    let plan_body =
        json!({"name": "p2", "recovery_location_id": location, "groups": [{"name": "g", "vms": [{"vm_id": vm}]}]});
    let mut requests = vec![
        (Method::GET, format!("/v1/plans/{plan}"), None),
        (Method::PUT, format!("/v1/plans/{plan}"), Some(plan_body.clone())),
        (Method::PUT, format!("/v1/plans/{plan}"), Some(json!({"name": "p2", "groups": []}))),
        (Method::DELETE, format!("/v1/plans/{plan}"), None),
    ];
    for action in [
        "enable",
        "disable",
        "test-failover",
        "readiness-check",
        "failover",
        "permanent-failover",
        "prepare-failback",
        "failback",
        "switchover",
        "commit-failback",
        "undo",
        "halt",
        "continue",
        "reset",
    ] {
        requests.push((Method::POST, format!("/v1/plans/{plan}/{action}"), None));
    }
    for (coll, id, patch) in [
        ("vms", &vm, json!({"name": "renamed"})),
        ("replication-jobs", &job, json!({"name": "renamed"})),
        ("recovery-locations", &location, json!({"name": "renamed"})),
    ] {
        requests.push((Method::GET, format!("/v1/{coll}/{id}"), None));
        requests.push((Method::PATCH, format!("/v1/{coll}/{id}"), Some(patch)));
        requests.push((Method::DELETE, format!("/v1/{coll}/{id}"), None));
    }
    for action in ["power-on", "shutdown", "power-off"] {
        requests.push((Method::POST, format!("/v1/vms/{vm}/{action}"), None));
    }
    requests.push((Method::POST, format!("/v1/replication-jobs/{job}/run"), None));
    for path in ["", "/log"] {
        requests.push((Method::GET, format!("/v1/sessions/{session}{path}"), None));
    }
    for action in ["halt", "continue", "undo"] {
        requests.push((Method::POST, format!("/v1/sessions/{session}/{action}"), Some(json!({}))));
    }
    for (method, path, body) in &requests {
        let (status, answer) = server.call(Some(&other), method.clone(), path, body.clone()).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}: {answer}");
        assert_eq!(answer["error"], "not_found", "{method} {path}: {answer}");
    }
    // The events stream too (its answer is not JSON).
    let resp = server
        .http
        .get(format!("{}/v1/sessions/{session}/events", server.base))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    // Nothing changed: the owner still sees every object as it was.
    let p = server.ok(&admin, Method::GET, &format!("/v1/plans/{plan}"), None).await;
    assert_eq!(p["name"], "p");
    assert_eq!(server.ok(&admin, Method::GET, &format!("/v1/vms/{vm}"), None).await["name"], "app");
    server.stop().await;
}
