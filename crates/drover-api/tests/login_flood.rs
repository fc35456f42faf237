//! A flood of wrong passwords against `POST /v1/token` does not hold the server's memory or
//! starve other logins: argon2 runs a few at a time, and the rest are refused with 503 and
//! `Retry-After` instead of queueing without end.
//!
//! Alone in its test binary: it measures the resident memory of this process (the server is
//! in-process), which other tests running beside it would disturb.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Server;
use reqwest::{Method, StatusCode};
use serde_json::json;

/// This process's resident memory (VmRSS), in bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS in /proc/self/status");
    kib * 1024
}

const CLIENTS: usize = 50;
const LOGINS_PER_CLIENT: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flood_of_wrong_logins_neither_holds_memory_nor_locks_out_other_users() {
    let server = Server::simulated().await;
    let admin = server.admin().await;
    server
        .ok(
            &admin,
            Method::POST,
            "/v1/users",
            Some(json!({"name": "alice", "password": "alice-password", "role": "Viewer"})),
        )
        .await;
    // Idle, after one login of each kind has run (so argon2's first allocations are counted in).
    let _ = server.token("alice", "alice-password").await;
    let idle = resident_bytes();

    let peak = Arc::new(AtomicU64::new(idle));
    let flooding = Arc::new(AtomicBool::new(true));
    let sampler = tokio::spawn({
        let (peak, flooding) = (peak.clone(), flooding.clone());
        async move {
            while flooding.load(Ordering::SeqCst) {
                peak.fetch_max(resident_bytes(), Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    let started = Instant::now();
    let url = format!("{}/v1/token", server.base);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            // Each client from its own loopback address and each attempt for another user, so
            // that login throttling (per address, per user and address) lets every attempt reach
            // the password check: the bound on that work is what this test is about.
            let address: std::net::IpAddr = format!("127.0.1.{}", c + 1).parse().unwrap();
            let http = reqwest::Client::builder().local_address(address).build().unwrap();
            let url = url.clone();
            tokio::spawn(async move {
                let mut answers = Vec::new();
                for i in 0..LOGINS_PER_CLIENT {
                    // Unknown users: their check costs what a known user's does.
                    let user = format!("nobody-{c}-{i}");
                    let resp = tokio::time::timeout(
                        Duration::from_secs(60),
                        http.post(&url)
                            .form(&[("grant_type", "password"), ("username", &user), ("password", "wrong-password")])
                            .send(),
                    )
                    .await
                    .expect("a login answered within a minute")
                    .unwrap();
                    let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
                    answers.push((resp.status(), retry_after));
                }
                answers
            })
        })
        .collect();
    let mut answers = Vec::new();
    for c in clients {
        answers.extend(c.await.unwrap());
    }
    let took = started.elapsed();
    flooding.store(false, Ordering::SeqCst);
    sampler.await.unwrap();
    let peak = peak.load(Ordering::SeqCst).max(resident_bytes());

    let count = |s: StatusCode| answers.iter().filter(|(a, _)| *a == s).count();
    let (unauthorized, busy) = (count(StatusCode::UNAUTHORIZED), count(StatusCode::SERVICE_UNAVAILABLE));
    println!(
        "{} wrong logins from {CLIENTS} clients in {took:?}: {unauthorized} × 401, {busy} × 503; \
         resident {} MB idle, {} MB at the peak",
        answers.len(),
        idle >> 20,
        peak >> 20
    );
    assert_eq!(answers.len(), CLIENTS * LOGINS_PER_CLIENT);
    assert!(unauthorized + busy > 0, "no login was refused as wrong or busy");
    for (status, retry_after) in &answers {
        assert!(!status.is_success(), "a wrong password logged in");
        assert!(
            !status.is_server_error() || *status == StatusCode::SERVICE_UNAVAILABLE,
            "a flood of logins made a {status}"
        );
        if *status == StatusCode::SERVICE_UNAVAILABLE {
            let after: u64 = retry_after.as_deref().expect("a 503 without Retry-After").parse().unwrap();
            assert!((1..=60).contains(&after), "Retry-After: {after}");
        }
    }
    assert!(peak.saturating_sub(idle) < 300 << 20, "resident memory grew by {} MB", (peak - idle) >> 20);

    // Another user logs in at once (from an address of its own: throttling is not under test).
    let started = Instant::now();
    let resp = reqwest::Client::builder()
        .local_address("127.0.2.1".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap()
        .post(&url)
        .form(&[("grant_type", "password"), ("username", "alice"), ("password", "alice-password")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    println!("alice logged in {:?} after the flood", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    server.stop().await;
}
