//! Every route refuses a missing, malformed or expired token (401); roles too weak get 403;
//! another tenant's objects are not found (404); refresh tokens are single-use and rotate.

mod common;

use common::{ADMIN_PASSWORD, Server};
use drover_store::{TokenKind, TokenRecord};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Every route behind authentication, with a placeholder id.
fn routes() -> Vec<(Method, String)> {
    let id = uuid::Uuid::new_v4();
    let mut r = vec![
        (Method::GET, "/v1/tenants".to_string()),
        (Method::POST, "/v1/tenants".into()),
        (Method::GET, "/v1/users".into()),
        (Method::POST, "/v1/users".into()),
        (Method::DELETE, format!("/v1/users/{id}")),
    ];
    for coll in ["sites", "hosts", "datastores", "vms", "replication-jobs", "recovery-locations", "plans"] {
        r.push((Method::GET, format!("/v1/{coll}")));
        r.push((Method::POST, format!("/v1/{coll}")));
        r.push((Method::GET, format!("/v1/{coll}/{id}")));
        r.push((Method::DELETE, format!("/v1/{coll}/{id}")));
    }
    for coll in ["users", "sites", "hosts", "datastores", "vms", "replication-jobs", "recovery-locations"] {
        r.push((Method::PATCH, format!("/v1/{coll}/{id}")));
    }
    for a in ["power-on", "shutdown", "power-off"] {
        r.push((Method::POST, format!("/v1/vms/{id}/{a}")));
    }
    r.push((Method::PUT, format!("/v1/plans/{id}")));
    for a in ["enable", "failover", "halt", "reset"] {
        r.push((Method::POST, format!("/v1/plans/{id}/{a}")));
    }
    r.push((Method::POST, format!("/v1/replication-jobs/{id}/run")));
    r.push((Method::GET, "/v1/replicas".into()));
    r.push((Method::GET, format!("/v1/replicas/{id}")));
    r.push((Method::GET, format!("/v1/replicas/{id}/restore-points")));
    r.push((Method::GET, "/v1/sessions".into()));
    for s in ["", "/log", "/events"] {
        r.push((Method::GET, format!("/v1/sessions/{id}{s}")));
    }
    for s in ["halt", "continue", "undo"] {
        r.push((Method::POST, format!("/v1/sessions/{id}/{s}")));
    }
    r
}

#[tokio::test]
async fn every_route_refuses_missing_malformed_and_expired_tokens() {
    let server = Server::simulated().await;
    // An expired token of a real user.
    let admin = server.app.engine().store().user_by_name("admin").await.unwrap().unwrap().0;
    let expired = "expired-token-value";
    let past = drover_types::now() - chrono::Duration::minutes(1);
    server
        .app
        .engine()
        .store()
        .token_insert(&TokenRecord {
            hash: drover_engine::auth::token_hash(expired),
            kind: TokenKind::Access,
            user_id: admin.id,
            family: uuid::Uuid::new_v4(),
            expires_at: past,
            used_at: None,
            created_at: past - chrono::Duration::minutes(15),
        })
        .await
        .unwrap();
    for (method, path) in routes() {
        for token in [None, Some("not-a-token"), Some(expired)] {
            let (status, body) = server.call(token, method.clone(), &path, Some(json!({}))).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path} with {token:?}: {body}");
            assert_eq!(body["error"], "unauthorized");
        }
        // A non-bearer scheme is refused too.
        let resp = server
            .http
            .request(method.clone(), format!("{}{path}", server.base))
            .header("Authorization", "Basic YWRtaW46eA==")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{method} {path} with Basic");
    }
    // The two open routes.
    let (status, doc) = server.call(None, Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(doc["paths"]["/v1/vms/{id}/power-on"].is_object());
    server.stop().await;
}

#[tokio::test]
async fn tokens_refresh_once_and_bad_logins_are_refused() {
    let server = Server::simulated().await;
    let login = |user: &'static str, pw: &'static str| {
        let http = server.http.clone();
        let base = server.base.clone();
        async move {
            http.post(format!("{base}/v1/token"))
                .form(&[("grant_type", "password"), ("username", user), ("password", pw)])
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(login("admin", "wrong").await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(login("nobody", "x").await.status(), StatusCode::UNAUTHORIZED);
    let pair: Value = login("admin", ADMIN_PASSWORD).await.json().await.unwrap();
    assert_eq!(pair["token_type"], "bearer");
    assert!(pair["expires_in"].as_i64().unwrap() > 800 && pair["expires_in"].as_i64().unwrap() <= 900);
    // DOMAIN\user is accepted, JSON bodies too.
    let (status, _) = server
        .call(
            None,
            Method::POST,
            "/v1/token",
            Some(json!({"grant_type": "password", "username": "CORP\\admin", "password": ADMIN_PASSWORD})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    let refresh = |token: String| {
        let http = server.http.clone();
        let base = server.base.clone();
        async move {
            http.post(format!("{base}/v1/token"))
                .form(&[("grant_type", "refresh_token"), ("refresh_token", token.as_str())])
                .send()
                .await
                .unwrap()
        }
    };
    let first = pair["refresh_token"].as_str().unwrap().to_string();
    let resp = refresh(first.clone()).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let rotated: Value = resp.json().await.unwrap();
    assert_ne!(rotated["refresh_token"], pair["refresh_token"]);
    // Reuse of the first one is refused and revokes the login: the rotated tokens die too.
    assert_eq!(refresh(first).await.status(), StatusCode::UNAUTHORIZED);
    let (status, _) = server.call(rotated["access_token"].as_str(), Method::GET, "/v1/sites", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(refresh(rotated["refresh_token"].as_str().unwrap().into()).await.status(), StatusCode::UNAUTHORIZED);

    for body in [json!({"grant_type": "client_magic"}), json!({"grant_type": "password", "username": "admin"})] {
        let (status, v) = server.call(None, Method::POST, "/v1/token", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    }
    server.stop().await;
}

#[tokio::test]
async fn roles_are_enforced_and_tenants_are_isolated() {
    let server = Server::simulated().await;
    let admin = server.admin().await;
    let (host, ds) = server.infrastructure(&admin).await;
    let vm = server.vm(&admin, &host, &ds, "app", json!({})).await;

    for (name, role) in [("viewer", "Viewer"), ("operator", "PlanOperator"), ("author", "PlanAuthor")] {
        server
            .ok(&admin, Method::POST, "/v1/users", Some(json!({"name": name, "password": "password1", "role": role})))
            .await;
    }
    let viewer = server.token("viewer", "password1").await;
    let operator = server.token("operator", "password1").await;
    let author = server.token("author", "password1").await;

    // Viewers read, and change nothing.
    assert_eq!(server.call(Some(&viewer), Method::GET, &format!("/v1/vms/{vm}"), None).await.0, StatusCode::OK);
    let writes = [
        (Method::POST, "/v1/sites".to_string(), json!({"name": "x", "kind": "Production"})),
        (Method::POST, format!("/v1/vms/{vm}/power-on"), json!({})),
        (Method::DELETE, format!("/v1/vms/{vm}"), json!({})),
        (Method::POST, "/v1/users".into(), json!({"name": "y", "password": "password1", "role": "Viewer"})),
    ];
    for (m, p, b) in &writes {
        let (status, body) = server.call(Some(&viewer), m.clone(), p, Some(b.clone())).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "viewer {m} {p}: {body}");
        assert!(body["message"].as_str().unwrap().contains("role"));
    }
    // Operators run operations but do not edit the inventory or manage users.
    let (status, _) = server.call(Some(&operator), Method::POST, "/v1/sites", Some(writes[0].2.clone())).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = server.call(Some(&operator), Method::POST, format!("/v1/vms/{vm}/power-on").as_str(), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    // Authors edit the inventory but do not manage users, nor the host's resources (sites, hosts
    // and datastores are the system administrators').
    let (status, _) = server
        .call(Some(&author), Method::POST, "/v1/sites", Some(json!({"name": "dr", "kind": "DisasterRecovery"})))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) =
        server.call(Some(&author), Method::PATCH, &format!("/v1/vms/{vm}"), Some(json!({"tags": ["env:prod"]}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = server.call(Some(&author), Method::GET, "/v1/users", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Only the system tenant's administrators create tenants.
    let (status, _) = server.call(Some(&author), Method::POST, "/v1/tenants", Some(json!({"name": "acme"}))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // Another tenant sees nothing of ours.
    let acme = server.ok(&admin, Method::POST, "/v1/tenants", Some(json!({"name": "acme"}))).await;
    server
        .ok(&admin, Method::POST, "/v1/users", Some(json!({"name": "acme-admin", "password": "password1", "role": "Administrator", "tenant_id": acme["id"]})))
        .await;
    let other = server.token("acme-admin", "password1").await;
    for path in [format!("/v1/vms/{vm}"), format!("/v1/hosts/{host}"), format!("/v1/datastores/{ds}")] {
        let (status, body) = server.call(Some(&other), Method::GET, &path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    for (m, p) in [(Method::POST, format!("/v1/vms/{vm}/power-off")), (Method::DELETE, format!("/v1/vms/{vm}"))] {
        assert_eq!(server.call(Some(&other), m, &p, None).await.0, StatusCode::NOT_FOUND);
    }
    let (_, list) = server.call(Some(&other), Method::GET, "/v1/vms", None).await;
    assert_eq!(list["total"], 0);
    let (_, sessions) = server.call(Some(&other), Method::GET, "/v1/sessions", None).await;
    assert_eq!(sessions["total"], 0);
    // A VM in another tenant cannot be placed on our host.
    let (status, _) = server
        .call(Some(&other), Method::POST, "/v1/vms", Some(json!({"name": "x", "host_id": host, "datastore_id": ds, "vcpus": 1, "memory_mib": 96, "disks": [{"name": "d", "size_bytes": 1024}]})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

/// Every `$ref` in the OpenAPI document names a schema the document defines.
#[tokio::test]
async fn the_openapi_document_is_self_contained() {
    let server = Server::simulated().await;
    let (status, doc) = server.call(None, Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|x| refs(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(all.len() > 20);
    for r in all {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("unexpected ref {r}"));
        assert!(doc["components"]["schemas"][name].is_object(), "{r} is not defined");
    }
    // Every route of the router is documented.
    for (method, path) in routes() {
        let templated = path
            .split('/')
            .map(|seg| if uuid::Uuid::parse_str(seg).is_ok() { "{id}" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        let templated = if templated.starts_with("/v1/plans/{id}/") && method == Method::POST {
            "/v1/plans/{id}/{action}".to_string()
        } else {
            templated
        };
        let op = &doc["paths"][&templated][method.as_str().to_lowercase()];
        assert!(op.is_object(), "{method} {templated} is not in the OpenAPI document");
    }
    server.stop().await;
}
