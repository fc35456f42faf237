//! The Veeam dialects' logins are the same logins as the native API's: one throttle across the
//! three (a guesser cannot switch APIs to get more tries), refused in each dialect's own error
//! format with `Retry-After`, and the dialects' mutating requests are in the audit log.

#[path = "../../drover-api/tests/common/mod.rs"]
mod common;
mod em_common;
mod vro_common;

use std::time::Duration;

use common::Server;
use em_common::Em;
use reqwest::{Method, StatusCode};
use vro_common::Vro;

#[tokio::test]
async fn one_throttle_for_the_three_logins_in_each_dialects_words() {
    let vro = Vro::on(Server::simulated().await).await;
    let em = Em::start(&vro.server, Duration::from_secs(900)).await;
    let server = &vro.server;
    let admin = server.admin().await;

    // Three wrong passwords through VRO, a fourth through EM: the (admin, 127.0.0.1) pair is
    // now locked for a second, for every API.
    for _ in 0..3 {
        let (s, e) = vro.login("CORP\\admin", "wrong").await;
        assert_eq!((s, e["errorCode"].as_str()), (StatusCode::UNAUTHORIZED, Some("AccessDenied")), "{e}");
    }
    let a = em.logon_as("admin", "wrong").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);

    // The right password is refused while it lasts, in each dialect's format, with Retry-After.
    let (s, e) = vro.login("admin", common::ADMIN_PASSWORD).await;
    assert_eq!((s, e["errorCode"].as_str()), (StatusCode::TOO_MANY_REQUESTS, Some("AccessDenied")), "{e}");
    assert!(e["message"].as_str().unwrap().contains("try again"), "{e}");
    let a = em.logon_as("admin", common::ADMIN_PASSWORD).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    assert!(a.body.contains("StatusCode=\"429\""), "{}", a.body);
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let native = server
        .http
        .post(format!("{}/v1/token", server.base))
        .form(&[("grant_type", "password"), ("username", "admin"), ("password", common::ADMIN_PASSWORD)])
        .send()
        .await
        .unwrap();
    assert_eq!(native.status(), StatusCode::TOO_MANY_REQUESTS);

    // Once the wait is over, the right password works again: the lockout is temporary.
    tokio::time::sleep(Duration::from_secs(retry) + Duration::from_millis(100)).await;
    let token = em.logon().await;

    // The dialects' mutating requests are audited with the caller, refused ones too.
    let unknown = uuid::Uuid::new_v4();
    let vro_token = vro.token("admin", common::ADMIN_PASSWORD).await;
    let (s, _) = vro.raw(Some(&vro_token), Method::POST, &format!("/api/v3/Plans/{unknown}/ResetState"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let logoff = em
        .send(
            Method::DELETE,
            &format!("/api/logonSessions/{}", session_id(&em, &token).await),
            em_common::Token::Header(&token),
            false,
            None,
        )
        .await;
    assert!(logoff.status.is_success(), "{}", logoff.body);

    let log = server.ok(&admin, Method::GET, "/v1/audit?limit=1000", None).await;
    let entries = log["items"].as_array().unwrap();
    let find = |prefix: &str| entries.iter().find(|e| e["action"].as_str().unwrap().starts_with(prefix)).cloned();
    let vro_entry = find(&format!("POST /api/v3/Plans/{unknown}")).expect("the VRO request is audited");
    assert_eq!((vro_entry["user_name"].as_str(), vro_entry["outcome"].as_str()), (Some("admin"), Some("Refused")));
    let em_entry = find("DELETE /api/logonSessions/").expect("the EM logoff is audited");
    assert_eq!((em_entry["user_name"].as_str(), em_entry["outcome"].as_str()), (Some("admin"), Some("Success")));
    let refused_logins = entries.iter().filter(|e| e["action"] == "login" && e["outcome"] == "Refused").count();
    assert_eq!(refused_logins, 4, "each checked wrong password, whichever API");
    assert_eq!(entries.iter().filter(|e| e["action"] == "login_lockout").count(), 1);
    vro.stop().await;
}

/// The id of the logon session a token belongs to (`GET /api/sessionMngr/`).
async fn session_id(em: &Em, token: &str) -> String {
    let xml = em.ok("/api/sessionMngr/", token).await;
    em_common::text(&xml, "SessionId").unwrap_or_else(|| panic!("no SessionId in {xml}"))
}
