//! Login abuse: a flood of wrong passwords is throttled per (user, address) and per address,
//! cannot lock a user out from everywhere, and every login, lockout and mutating request is in
//! the audit log.

mod common;

use std::net::IpAddr;

use common::Server;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

fn client_from(addr: &str) -> reqwest::Client {
    reqwest::Client::builder().local_address(addr.parse::<IpAddr>().unwrap()).build().unwrap()
}

async fn login(http: &reqwest::Client, base: &str, user: &str, password: &str) -> (StatusCode, Option<u64>) {
    let resp = http
        .post(format!("{base}/v1/token"))
        .form(&[("grant_type", "password"), ("username", user), ("password", password)])
        .send()
        .await
        .unwrap();
    let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    (resp.status(), retry)
}

async fn audit(server: &Server, token: &str, query: &str) -> Vec<Value> {
    let v = server.ok(token, Method::GET, &format!("/v1/audit?{query}"), None).await;
    v["items"].as_array().unwrap().clone()
}

#[tokio::test]
async fn a_flood_of_wrong_passwords_is_throttled_and_audited() {
    let server = Server::simulated().await;
    let admin = server.admin().await;
    for name in ["victim", "bystander"] {
        server
            .ok(
                &admin,
                Method::POST,
                "/v1/users",
                Some(json!({"name": name, "password": "right-password", "role": "Viewer"})),
            )
            .await;
    }
    // 500 wrong passwords for one user from 50 concurrent clients on one address.
    let attacker = client_from("127.0.0.1");
    let statuses = futures::future::join_all((0..50).map(|_| {
        let (http, base) = (attacker.clone(), server.base.clone());
        async move {
            let mut out = Vec::new();
            for _ in 0..10 {
                out.push(login(&http, &base, "victim", "wrong-password").await);
            }
            out
        }
    }))
    .await
    .concat();
    assert_eq!(statuses.len(), 500);
    let unauthorized = statuses.iter().filter(|(s, _)| *s == StatusCode::UNAUTHORIZED).count();
    let throttled: Vec<_> = statuses.iter().filter(|(s, _)| *s == StatusCode::TOO_MANY_REQUESTS).collect();
    // The first wave can find the bounded queue of password checks full (503, refused before
    // any argon2 work too).
    let busy: Vec<_> = statuses.iter().filter(|(s, _)| *s == StatusCode::SERVICE_UNAVAILABLE).collect();
    println!(
        "flood: {unauthorized} answered 401 (password checked), {} answered 429, {} answered 503",
        throttled.len(),
        busy.len()
    );
    assert_eq!(unauthorized + throttled.len() + busy.len(), 500, "only 401, 429 and 503: {statuses:?}");
    assert!(busy.iter().all(|(_, retry)| retry.is_some_and(|r| r >= 1)), "503 without Retry-After");
    // Only the first wave reaches the password check; the rest is refused before any argon2 work.
    assert!(unauthorized <= 60, "{unauthorized} password checks");
    assert!(throttled.iter().all(|(_, retry)| retry.is_some_and(|r| r >= 1)), "429 without Retry-After");

    // The bounded queue of password checks may have refused most of the first wave with 503
    // before they counted as failures; a few more guesses, one at a time, lock the address.
    let mut locked = false;
    for i in 0..30 {
        if login(&attacker, &server.base, &format!("guess-{i}"), "wrong-password").await.0
            == StatusCode::TOO_MANY_REQUESTS
        {
            locked = true;
            break;
        }
    }
    assert!(locked, "the address was not locked after 30 more wrong logins");

    // The right password does not get through from the flooded pair, nor from the flooded address...
    assert_eq!(login(&attacker, &server.base, "victim", "right-password").await.0, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(login(&attacker, &server.base, "bystander", "right-password").await.0, StatusCode::TOO_MANY_REQUESTS);
    // ... but the same user and another user log in at once from elsewhere: no one is locked out
    // for good by someone else's guessing.
    let started = std::time::Instant::now();
    assert_eq!(login(&client_from("127.0.0.2"), &server.base, "bystander", "right-password").await.0, StatusCode::OK);
    assert_eq!(login(&client_from("127.0.0.3"), &server.base, "victim", "right-password").await.0, StatusCode::OK);
    println!("two logins from other addresses after the flood: {:?}", started.elapsed());

    // The audit log has each checked failure, the lockout and the successes, with the address.
    let failures = audit(&server, &admin, "action=login&limit=1000").await;
    let refused: Vec<_> = failures.iter().filter(|e| e["outcome"] == "Refused" && e["user_name"] == "victim").collect();
    assert_eq!(refused.len(), unauthorized, "one entry per checked wrong password");
    assert!(refused.iter().all(|e| e["address"] == "127.0.0.1" && e["user_id"].is_string()), "{refused:?}");
    let ok: Vec<_> = failures.iter().filter(|e| e["outcome"] == "Success").map(|e| e["address"].clone()).collect();
    assert!(ok.contains(&json!("127.0.0.2")) && ok.contains(&json!("127.0.0.3")), "{ok:?}");
    let lockouts = audit(&server, &admin, "action=login_lockout").await;
    assert!(!lockouts.is_empty(), "no lockout recorded");
    assert!(lockouts.iter().any(|e| e["detail"].as_str().unwrap().contains("locked")), "{lockouts:?}");
    // An unknown user's failure is recorded too, without a tenant.
    assert_eq!(login(&client_from("127.0.0.4"), &server.base, "nobody", "x").await.0, StatusCode::UNAUTHORIZED);
    let nobody = audit(&server, &admin, "action=login&limit=1").await;
    assert_eq!(nobody[0]["user_name"], "nobody");
    assert!(nobody[0]["tenant_id"].is_null());
    // What was tried is recorded clipped: failed logins cannot fill the disk.
    let long = "x".repeat(100_000);
    assert_eq!(login(&client_from("127.0.0.5"), &server.base, &long, "x").await.0, StatusCode::UNAUTHORIZED);
    let clipped = audit(&server, &admin, "action=login&limit=1").await;
    assert_eq!(clipped[0]["user_name"].as_str().unwrap().chars().count(), 129, "the name is not clipped");
    server.stop().await;
}

#[tokio::test]
async fn mutating_requests_are_audited_and_only_administrators_read_the_log() {
    let server = Server::simulated().await;
    let admin = server.admin().await;
    server
        .ok(
            &admin,
            Method::POST,
            "/v1/users",
            Some(json!({"name": "viewer", "password": "password1", "role": "Viewer"})),
        )
        .await;
    let viewer = server.token("viewer", "password1").await;

    let site = server.ok(&admin, Method::POST, "/v1/sites", Some(json!({"name": "p", "kind": "Production"}))).await;
    let (status, _) =
        server.call(Some(&viewer), Method::POST, "/v1/sites", Some(json!({"name": "q", "kind": "Production"}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Reads are not audited; a request with no valid token is not a caller's request.
    server.ok(&viewer, Method::GET, "/v1/sites", None).await;
    let (status, _) = server.call(Some("bogus"), Method::POST, "/v1/sites", Some(json!({}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let entries = audit(&server, &admin, "action=POST%20%2Fv1%2Fsites").await;
    assert_eq!(entries.len(), 2, "{entries:#?}");
    // Newest first.
    assert_eq!((entries[0]["user_name"].as_str(), entries[0]["outcome"].as_str()), (Some("viewer"), Some("Refused")));
    assert_eq!((entries[1]["user_name"].as_str(), entries[1]["outcome"].as_str()), (Some("admin"), Some("Success")));
    assert!(entries[1]["detail"].as_str().unwrap().contains("201"));
    assert!(entries[0]["seq"].as_i64() > entries[1]["seq"].as_i64());
    let all = audit(&server, &admin, "").await;
    assert!(all.iter().all(|e| !e["action"].as_str().unwrap().starts_with("GET")), "{all:#?}");
    // Paging backwards.
    let older = audit(&server, &admin, &format!("before_seq={}&limit=1", entries[0]["seq"])).await;
    assert_eq!(older[0]["seq"], entries[1]["seq"]);

    // Only administrators read it; a tenant's administrator sees only its tenant.
    let (status, _) = server.call(Some(&viewer), Method::GET, "/v1/audit", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let acme = server.ok(&admin, Method::POST, "/v1/tenants", Some(json!({"name": "acme"}))).await;
    server
        .ok(&admin, Method::POST, "/v1/users", Some(json!({"name": "acme-admin", "password": "password1", "role": "Administrator", "tenant_id": acme["id"]})))
        .await;
    let acme_admin = server.token("acme-admin", "password1").await;
    let theirs = audit(&server, &acme_admin, "limit=1000").await;
    assert!(!theirs.is_empty());
    assert!(theirs.iter().all(|e| e["tenant_id"] == acme["id"]), "{theirs:#?}");
    let (status, _) = server.call(Some(&admin), Method::GET, "/v1/audit?limit=0", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let _ = site;
    server.stop().await;
}
