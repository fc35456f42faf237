//! Hostile requests to the Veeam dialects over real HTTP on loopback: filters and bodies that
//! used to abort the process or burn seconds of CPU are refused quickly with the dialect's own
//! 4xx while other requests are still answered, and an internal error tells the client a
//! reference, not its chain, in all three APIs.

#[path = "../../drover-api/tests/common/mod.rs"]
mod common;
mod em_common;
mod vro_common;

use std::time::{Duration, Instant};

use common::Server;
use em_common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;
use vro_common::Vro;

/// A plan of one VM, made through the native API; returns the admin's token and the plan's id.
async fn plan(server: &Server) -> (String, String) {
    let admin = server.admin().await;
    let (host, ds) = server.infrastructure(&admin).await;
    let vm = server.vm(&admin, &host, &ds, "app", json!({})).await;
    let plan = server
        .ok(
            &admin,
            Method::POST,
            "/v1/plans",
            Some(json!({"name": "p", "groups": [{"name": "g", "vms": [{"vm_id": vm}]}]})),
        )
        .await;
    (admin, plan["id"].as_str().unwrap().to_string())
}

async fn viewer(server: &Server, admin: &str) {
    server
        .ok(
            admin,
            Method::POST,
            "/v1/users",
            Some(json!({"name": "viewer", "password": "viewer-password", "role": "Viewer"})),
        )
        .await;
}

/// Sends a request and, at the same time, an ordinary one (`GET /api/failoverPlans`); returns
/// the hostile request's answer, how long it took, and how long the ordinary one took.
async fn beside_an_ordinary_request(
    em: &Em,
    token: &str,
    method: Method,
    path: &str,
    body: Option<String>,
) -> (Answer, Duration, Duration) {
    let hostile = async {
        let started = Instant::now();
        let a = em
            .send(method, path, Token::Header(token), false, body.as_ref().map(|b| ("application/xml", b.clone())))
            .await;
        (a, started.elapsed())
    };
    let ordinary = async {
        let started = Instant::now();
        let a = tokio::time::timeout(Duration::from_secs(10), em.get("/api/failoverPlans", token))
            .await
            .expect("an ordinary request was not answered within 10 s");
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        started.elapsed()
    };
    let ((answer, took), ordinary) = tokio::join!(hostile, ordinary);
    (answer, took, ordinary)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn em_refuses_deep_filters_and_hostile_xml_quickly_and_keeps_answering() {
    let server = Server::simulated().await;
    let (admin, plan) = plan(&server).await;
    viewer(&server, &admin).await;
    let em = Em::start(&server, Duration::from_secs(900)).await;
    let admin = em.logon().await;
    let viewer = em.logon_as("viewer", "viewer-password").await;
    assert_eq!(viewer.status, StatusCode::CREATED, "{}", viewer.body);
    let viewer = viewer.headers["X-RestSvcSessionId"].to_str().unwrap().to_string();

    // What aborted the process: 3,000 nested parentheses in a Viewer's query (6 KB). Now a 400
    // naming what is wrong; within the length limit, deep nesting is named as such.
    for (depth, says) in [(3000, "longer than 4096 characters"), (2000, "nested more than 32 deep")] {
        let filter = format!("{}Name%3D%3Dx{}", "(".repeat(depth), ")".repeat(depth));
        let (a, took, ordinary) = beside_an_ordinary_request(
            &em,
            &viewer,
            Method::GET,
            &format!("/api/query?type=FailoverPlan&filter={filter}"),
            None,
        )
        .await;
        println!("filter nested {depth} deep: {} in {took:?}; an ordinary request beside it: {ordinary:?}", a.status);
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
        assert_eq!(attr(&a.body, "Error", None, "Status").as_deref(), Some("BadRequest"), "{}", a.body);
        assert!(attr(&a.body, "Error", None, "Message").unwrap().contains(says), "{}", a.body);
        assert!(ordinary < Duration::from_secs(2), "{ordinary:?}");
    }
    // And the process is still there, answering.
    let fine = em.get("/api/query?type=FailoverPlan&filter=(Name%3D%3Dp)", &viewer).await;
    assert_eq!(fine.status, StatusCode::OK, "{}", fine.body);

    let put = format!("/api/failoverPlans/{plan}");
    let deep = format!("<FailoverPlan>{}{}</FailoverPlan>", "<a>".repeat(100_000), "</a>".repeat(100_000));
    let attributes = format!(
        "<FailoverPlan><Description {}/></FailoverPlan>",
        (0..100_000).map(|i| format!("a{i:x}=''")).collect::<Vec<_>>().join(" ")
    );
    for (what, body, says) in [
        ("100,000 levels", &deep, "nested more than 32 deep"),
        ("100,000 attributes", &attributes, "more than 32 attributes"),
    ] {
        // A caller who may edit hears what is wrong with the body.
        let (a, took, ordinary) = beside_an_ordinary_request(&em, &admin, Method::PUT, &put, Some(body.clone())).await;
        println!(
            "{what} ({} KB) from an administrator: {} in {took:?}; an ordinary request beside it: {ordinary:?}",
            body.len() >> 10,
            a.status
        );
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
        assert!(attr(&a.body, "Error", None, "Message").unwrap().contains(says), "{}", a.body);
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(ordinary < Duration::from_secs(2), "{ordinary:?}");
        // A Viewer may not edit: 403 without the body being parsed.
        let (a, took, _) = beside_an_ordinary_request(&em, &viewer, Method::PUT, &put, Some(body.clone())).await;
        println!("{what} from a Viewer: {} in {took:?}", a.status);
        assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);
    }
    // A body over the size limit: 413 in the dialect's format.
    let huge = format!("<FailoverPlan><Description>{}</Description></FailoverPlan>", "x".repeat(2 << 20));
    let a = em.send(Method::PUT, &put, Token::Header(&admin), false, Some(("application/xml", huge))).await;
    assert_eq!(a.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", a.body);
    assert_eq!(attr(&a.body, "Error", None, "Status").as_deref(), Some("PayloadTooLarge"), "{}", a.body);
    // Nothing changed, and an ordinary edit still works.
    let a = em
        .send(
            Method::PUT,
            &put,
            Token::Header(&admin),
            false,
            Some(("application/xml", "<FailoverPlan><Description>edited</Description></FailoverPlan>".into())),
        )
        .await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    em.listener.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn vro_refuses_deep_json_with_its_own_400() {
    let vro = Vro::start().await;
    let (_, plan) = plan(&vro.server).await;
    let token = vro.token("admin", common::ADMIN_PASSWORD).await;
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let started = Instant::now();
    let (status, body) =
        vro.raw(Some(&token), Method::POST, &format!("/api/v3/Plans/{plan}/Failover"), Some(&deep)).await;
    println!("100,000 nested JSON arrays: {status} in {:?}", started.elapsed());
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["errorCode"], "UnexpectedContent", "{body}");
    vro.stop().await;
}

/// Checks an answer's message: a reference and nothing of the chain.
fn assert_reference_only(api: &str, message: &str) {
    let reference = message
        .strip_prefix("internal error; reference ")
        .unwrap_or_else(|| panic!("{api}: the message is not a reference: {message}"));
    assert!(uuid::Uuid::parse_str(reference).is_ok(), "{api}: {message}");
    for leak in ["inventory", "table", "sqlite", "database", "store"] {
        assert!(!message.to_ascii_lowercase().contains(leak), "{api}: {message}");
    }
}

/// An unclassified error through real requests: the table the plans are kept in disappears
/// under the running server (as a corrupt or foreign database would make it), so listing plans
/// fails in the store with an error no layer classifies.
#[tokio::test]
async fn an_internal_error_answers_a_reference_and_not_its_chain_in_every_api() {
    let vro = Vro::start().await;
    let (admin, _) = plan(&vro.server).await;
    let em = Em::start(&vro.server, Duration::from_secs(900)).await;
    let em_token = em.logon().await;
    let vro_token = vro.token("admin", common::ADMIN_PASSWORD).await;

    use sqlx::Connection;
    let db = vro.server.dir.path().join("drover.db");
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display())).await.unwrap();
    sqlx::query("ALTER TABLE inventory RENAME TO inventory_gone").execute(&mut conn).await.unwrap();

    let (status, body) = vro.server.call(Some(&admin), Method::GET, "/v1/plans", None).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"], "internal");
    assert_reference_only("native", body["message"].as_str().unwrap());

    let (status, body) = vro.raw(Some(&vro_token), Method::GET, "/api/v3/Plans", None).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["errorCode"], "UnknownError");
    assert_reference_only("Recovery Orchestrator", body["message"].as_str().unwrap());

    for json in [false, true] {
        let a = em.send(Method::GET, "/api/failoverPlans", Token::Header(&em_token), json, None).await;
        assert_eq!(a.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", a.body);
        let message = if json {
            a.json()["Message"].as_str().unwrap().to_string()
        } else {
            attr(&a.body, "Error", None, "Message").unwrap()
        };
        assert_reference_only("Enterprise Manager", &message);
    }

    sqlx::query("ALTER TABLE inventory_gone RENAME TO inventory").execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    let (status, _) = vro.server.call(Some(&admin), Method::GET, "/v1/plans", None).await;
    assert_eq!(status, StatusCode::OK);
    em.listener.stop().await;
    vro.stop().await;
}
