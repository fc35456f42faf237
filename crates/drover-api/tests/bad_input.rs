//! Bad input on every endpoint gets a clear 4xx, never a 500, and changes nothing.

mod common;

use common::Server;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// A fingerprint of everything a request could have changed.
async fn snapshot(server: &Server, token: &str) -> Value {
    let mut all = serde_json::Map::new();
    for coll in [
        "sites",
        "hosts",
        "datastores",
        "vms",
        "replication-jobs",
        "recovery-locations",
        "plans",
        "users",
        "tenants",
        "sessions",
    ] {
        all.insert(coll.into(), server.ok(token, Method::GET, &format!("/v1/{coll}"), None).await);
    }
    Value::Object(all)
}

async fn expect(
    server: &Server,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
    want: StatusCode,
    says: &str,
) {
    let (status, v) = server.call(Some(token), method.clone(), path, body.clone()).await;
    assert_eq!(status, want, "{method} {path} {body:?}: {v}");
    let msg = v["message"].as_str().unwrap_or_default();
    assert!(msg.to_lowercase().contains(&says.to_lowercase()), "{method} {path}: message {msg:?} should say {says:?}");
}

/// Sends raw bytes as JSON.
async fn raw(server: &Server, token: &str, method: Method, path: &str, body: &'static str) -> (StatusCode, Value) {
    let resp = server
        .http
        .request(method, format!("{}{path}", server.base))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status(), resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_input_is_refused_clearly_and_changes_nothing() {
    let server = Server::simulated().await;
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let vm = server.vm(&t, &host, &ds, "app", json!({})).await;
    let before = snapshot(&server, &t).await;
    let unknown = uuid::Uuid::new_v4();
    let site = before["sites"]["items"][0]["id"].as_str().unwrap().to_string();

    // Malformed JSON, wrong content, wrong types and unknown fields, on every body-taking endpoint.
    for path in [
        "/v1/sites",
        "/v1/hosts",
        "/v1/datastores",
        "/v1/vms",
        "/v1/replication-jobs",
        "/v1/recovery-locations",
        "/v1/plans",
        "/v1/users",
        "/v1/tenants",
    ] {
        let (status, v) = raw(&server, &t, Method::POST, path, "{not json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {v}");
        assert_eq!(v["error"], "invalid_request");
        let (status, _) = raw(&server, &t, Method::POST, path, "[1,2,3]").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} with an array");
        let (status, _) = raw(&server, &t, Method::POST, path, "{\"name\": 42}").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path} with a number for a name");
        let resp =
            server.http.post(format!("{}{path}", server.base)).bearer_auth(&t).body("name=x").send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{path} without a JSON content type");
    }
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/sites",
        Some(json!({"name": "x", "kind": "Production", "colour": "red"})),
        StatusCode::BAD_REQUEST,
        "colour",
    )
    .await;
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/sites",
        Some(json!({"name": "x", "kind": "Moon"})),
        StatusCode::BAD_REQUEST,
        "kind",
    )
    .await;
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/sites",
        Some(json!({"name": "  ", "kind": "Production"})),
        StatusCode::BAD_REQUEST,
        "empty",
    )
    .await;
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/sites",
        Some(json!({"name": "prod", "kind": "Production"})),
        StatusCode::CONFLICT,
        "already exists",
    )
    .await;

    // Unknown ids: 404 for the object in the path, 400 for a reference in a body.
    for coll in ["sites", "hosts", "datastores", "vms", "replication-jobs", "recovery-locations", "plans", "sessions"] {
        expect(&server, &t, Method::GET, &format!("/v1/{coll}/{unknown}"), None, StatusCode::NOT_FOUND, "not found")
            .await;
        expect(&server, &t, Method::GET, &format!("/v1/{coll}/not-a-uuid"), None, StatusCode::BAD_REQUEST, "").await;
    }
    for coll in ["sites", "hosts", "datastores", "replication-jobs", "recovery-locations", "plans", "users"] {
        expect(&server, &t, Method::DELETE, &format!("/v1/{coll}/{unknown}"), None, StatusCode::NOT_FOUND, "not found")
            .await;
    }
    for action in ["power-on", "shutdown", "power-off"] {
        expect(
            &server,
            &t,
            Method::POST,
            &format!("/v1/vms/{unknown}/{action}"),
            None,
            StatusCode::NOT_FOUND,
            "not found",
        )
        .await;
    }
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/hosts",
        Some(json!({"site_id": unknown, "name": "h", "address": "local"})),
        StatusCode::NOT_FOUND,
        "site",
    )
    .await;
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/datastores",
        Some(json!({"host_id": unknown, "name": "d", "path": "/tmp/x"})),
        StatusCode::NOT_FOUND,
        "host",
    )
    .await;
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/datastores",
        Some(json!({"host_id": host, "name": "d", "path": "relative/dir"})),
        StatusCode::BAD_REQUEST,
        "is not inside a datastore root",
    )
    .await;
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/hosts",
        Some(json!({"site_id": site, "name": "h2", "address": ""})),
        StatusCode::BAD_REQUEST,
        "address",
    )
    .await;

    // VMs: out-of-range values, bad disks, tags, MACs and files.
    let vm_body = |patch: Value| {
        let mut b = json!({"name": "v", "host_id": host, "datastore_id": ds, "vcpus": 1, "memory_mib": 96, "disks": [{"name": "d", "size_bytes": 1048576}]});
        for (k, v) in patch.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    for (patch, says) in [
        (json!({"vcpus": 0}), "vcpus"),
        (json!({"vcpus": 1000}), "vcpus"),
        (json!({"vcpus": -1}), ""),
        (json!({"memory_mib": 1}), "memory_mib"),
        (json!({"disks": []}), "at least one disk"),
        (json!({"disks": [{"name": "../etc", "size_bytes": 1}]}), "disk name"),
        (json!({"disks": [{"name": "d", "size_bytes": 0}]}), "size_bytes"),
        (json!({"disks": [{"name": "d", "size_bytes": 1}, {"name": "d", "size_bytes": 1}]}), "twice"),
        (json!({"disks": [{"name": "d", "import_from": "/nonexistent/image.qcow2"}]}), "inside an import directory"),
        (json!({"disks": [{"name": "d", "import_from": "relative.qcow2"}]}), "inside an import directory"),
        (json!({"tags": ["nocolon"]}), "category:name"),
        (json!({"nics": [{"network": "lan", "mac": "zz:zz"}]}), "MAC"),
        (json!({"boot": {"kernel": "/nonexistent/vmlinux"}}), "boot kernel"),
        (json!({"name": ""}), "empty"),
        (json!({"name": "app"}), "already exists"),
    ] {
        let (status, v) = server.call(Some(&t), Method::POST, "/v1/vms", Some(vm_body(patch.clone()))).await;
        assert!(status == StatusCode::BAD_REQUEST || status == StatusCode::CONFLICT, "{patch}: {status} {v}");
        assert!(v["message"].as_str().unwrap().contains(says), "{patch}: {v}");
    }
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/vms",
        Some(vm_body(json!({"host_id": unknown}))),
        StatusCode::BAD_REQUEST,
        "not on host",
    )
    .await;
    expect(
        &server,
        &t,
        Method::PATCH,
        &format!("/v1/vms/{vm}"),
        Some(json!({"vcpus": 0})),
        StatusCode::BAD_REQUEST,
        "vcpus",
    )
    .await;
    expect(
        &server,
        &t,
        Method::PATCH,
        &format!("/v1/vms/{vm}"),
        Some(json!({"tags": ["x"]})),
        StatusCode::BAD_REQUEST,
        "category:name",
    )
    .await;

    // Actions illegal in the current state: 409.
    expect(&server, &t, Method::POST, &format!("/v1/vms/{vm}/shutdown"), None, StatusCode::CONFLICT, "Off").await;
    expect(&server, &t, Method::DELETE, &format!("/v1/hosts/{host}"), None, StatusCode::CONFLICT, "still used").await;
    expect(
        &server,
        &t,
        Method::DELETE,
        "/v1/recovery-locations/00000000-0000-0000-0000-000000000000",
        None,
        StatusCode::CONFLICT,
        "built in",
    )
    .await;

    // Plans: structure checks and lifecycle checks.
    let plan_body = |groups: Value| json!({"name": "p", "groups": groups});
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/plans",
        Some(plan_body(json!([{"name": "g", "vms": [{"vm_id": unknown}]}]))),
        StatusCode::BAD_REQUEST,
        "does not exist",
    )
    .await;
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/plans",
        Some(plan_body(json!([{"name": "g", "vms": [{"vm_id": vm}, {"vm_id": vm}]}]))),
        StatusCode::BAD_REQUEST,
        "twice",
    )
    .await;
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/plans",
        Some(plan_body(json!([{"name": "g", "max_parallel": 1000, "vms": []}]))),
        StatusCode::BAD_REQUEST,
        "parallel",
    )
    .await;
    expect(&server, &t, Method::POST, "/v1/plans", Some(plan_body(json!([{"name": "g", "vms": [{"vm_id": vm, "steps": [{"name": "s", "kind": {"type": "CheckTcpPort", "port": 0, "timeout_secs": 5}}]}]}]))), StatusCode::BAD_REQUEST, "port").await;
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/plans",
        Some(json!({"name": "p", "recovery_location_id": unknown})),
        StatusCode::BAD_REQUEST,
        "recovery location",
    )
    .await;

    // Sessions: bad filters and paging.
    for q in [
        "limit=0",
        "limit=5000",
        "kind=Nope",
        "state=Sleeping",
        "order=sideways",
        "offset=-1",
        "since=yesterday",
        "bogus=1",
    ] {
        expect(&server, &t, Method::GET, &format!("/v1/sessions?{q}"), None, StatusCode::BAD_REQUEST, "").await;
    }
    let any_session = before["sessions"]["items"][0]["id"].as_str().unwrap().to_string();
    expect(
        &server,
        &t,
        Method::POST,
        &format!("/v1/sessions/{any_session}/halt"),
        None,
        StatusCode::CONFLICT,
        "stopped",
    )
    .await;
    expect(
        &server,
        &t,
        Method::POST,
        &format!("/v1/sessions/{any_session}/continue"),
        Some(json!({})),
        StatusCode::CONFLICT,
        "not halted",
    )
    .await;
    expect(
        &server,
        &t,
        Method::POST,
        &format!("/v1/sessions/{any_session}/continue"),
        Some(json!({"option": "Teleport"})),
        StatusCode::BAD_REQUEST,
        "",
    )
    .await;
    expect(
        &server,
        &t,
        Method::GET,
        &format!("/v1/sessions/{any_session}/log?limit=0"),
        None,
        StatusCode::BAD_REQUEST,
        "limit",
    )
    .await;

    // Users: weak passwords, bad roles, self-deletion.
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/users",
        Some(json!({"name": "u", "password": "short", "role": "Viewer"})),
        StatusCode::BAD_REQUEST,
        "8 characters",
    )
    .await;
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/users",
        Some(json!({"name": "u", "password": "longenough", "role": "God"})),
        StatusCode::BAD_REQUEST,
        "role",
    )
    .await;
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/users",
        Some(json!({"name": "admin", "password": "longenough", "role": "Viewer"})),
        StatusCode::CONFLICT,
        "already exists",
    )
    .await;

    // Unknown routes and methods.
    expect(&server, &t, Method::GET, "/v1/nothing-here", None, StatusCode::NOT_FOUND, "").await;
    let (status, _) = server.call(Some(&t), Method::PUT, "/v1/sessions", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // After all of that, nothing changed.
    let after = snapshot(&server, &t).await;
    assert_eq!(before, after);
    server.stop().await;
}

#[tokio::test]
async fn plan_lifecycle_conflicts_are_409_and_the_readiness_check_runs() {
    let server = Server::simulated().await;
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let vm = server.vm(&t, &host, &ds, "app", json!({})).await;
    let plan = server
        .ok(
            &t,
            Method::POST,
            "/v1/plans",
            Some(json!({"name": "p", "groups": [{"name": "web", "vms": [{"vm_id": vm}]}]})),
        )
        .await;
    let id = plan["id"].as_str().unwrap();
    assert_eq!(plan["state"], "NeedsVerified");
    assert_eq!(plan["groups"][0]["vms"][0]["steps"].as_array().unwrap().len(), 2, "default steps");

    for action in ["commit-failback", "switchover", "permanent-failover", "continue", "halt", "undo"] {
        expect(&server, &t, Method::POST, &format!("/v1/plans/{id}/{action}"), None, StatusCode::CONFLICT, "").await;
    }
    // Failover needs replicas, which this VM does not have yet.
    expect(&server, &t, Method::POST, &format!("/v1/plans/{id}/failover"), None, StatusCode::CONFLICT, "replica").await;
    expect(&server, &t, Method::POST, &format!("/v1/plans/{id}/fly"), None, StatusCode::NOT_FOUND, "").await;
    expect(
        &server,
        &t,
        Method::POST,
        &format!("/v1/plans/{id}/continue"),
        Some(json!({"option": "Sideways"})),
        StatusCode::BAD_REQUEST,
        "",
    )
    .await;
    let unchanged = server.ok(&t, Method::GET, &format!("/v1/plans/{id}"), None).await;
    assert_eq!(unchanged["state"], "NeedsVerified");

    // The readiness check runs as a session and finds the missing replica.
    let checking = server.ok(&t, Method::POST, &format!("/v1/plans/{id}/readiness-check"), None).await;
    assert!(checking["state"] == "Checking" || checking["state"] == "NotVerified", "{checking}");
    let (_, sessions) = server.call(Some(&t), Method::GET, &format!("/v1/sessions?target_id={id}"), None).await;
    let s =
        server.wait_session(&t, sessions["items"][0]["id"].as_str().unwrap(), std::time::Duration::from_secs(10)).await;
    assert_eq!(s["kind"], "PlanReadinessCheck");
    assert_eq!(s["result"], "Success");
    let checked = server.ok(&t, Method::GET, &format!("/v1/plans/{id}"), None).await;
    assert_eq!(checked["state"], "NotVerified");
    let (_, log) =
        server.call(Some(&t), Method::GET, &format!("/v1/sessions/{}/log", s["id"].as_str().unwrap()), None).await;
    assert!(
        log["items"].as_array().unwrap().iter().any(|e| e["message"].as_str().unwrap().contains("no ready replica"))
    );

    // A plan in use cannot be deleted; disabled plans do not run; reset disables.
    server.ok(&t, Method::POST, &format!("/v1/plans/{id}/disable"), None).await;
    expect(
        &server,
        &t,
        Method::POST,
        &format!("/v1/plans/{id}/readiness-check"),
        None,
        StatusCode::CONFLICT,
        "disabled",
    )
    .await;
    let reset = server.ok(&t, Method::POST, &format!("/v1/plans/{id}/reset"), None).await;
    assert_eq!((reset["state"].as_str(), reset["enabled"].as_bool()), (Some("NeedsVerified"), Some(false)));
    // The VM is referenced by the plan: its delete session is refused at the store.
    let (status, _) = server.call(Some(&t), Method::DELETE, &format!("/v1/plans/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    server.stop().await;
}

#[tokio::test]
async fn updates_apply_and_bad_updates_change_nothing() {
    let server = Server::simulated().await;
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let vm = server.vm(&t, &host, &ds, "app", json!({})).await;
    let site = server.ok(&t, Method::GET, "/v1/sites", None).await["items"][0]["id"].as_str().unwrap().to_string();
    // Replicating onto the VM's own datastore is refused.
    let body = |target: &str| {
        json!({
            "name": "j", "vm_ids": [vm], "target_host_id": host, "target_datastore_id": target,
            "schedule": {"type": "Interval", "secs": 600}, "retention_points": 7
        })
    };
    expect(
        &server,
        &t,
        Method::POST,
        "/v1/replication-jobs",
        Some(body(&ds)),
        StatusCode::BAD_REQUEST,
        "target datastore",
    )
    .await;
    let dr_path = server.dir.path().join("dr");
    let dr = server
        .ok(&t, Method::POST, "/v1/datastores", Some(json!({"host_id": host, "name": "dr", "path": dr_path})))
        .await;
    let job = server
        .ok(
            &t,
            Method::POST,
            "/v1/replication-jobs",
            Some(json!({
                "name": "j", "vm_ids": [vm], "target_host_id": host, "target_datastore_id": dr["id"],
                "schedule": {"type": "Interval", "secs": 600}, "retention_points": 7
            })),
        )
        .await;
    assert_eq!(server.call(Some(&t), Method::GET, "/v1/replication-jobs", None).await.1["total"], 1);
    let job = job["id"].as_str().unwrap().to_string();

    // Good updates apply.
    let v = server.ok(&t, Method::PATCH, &format!("/v1/sites/{site}"), Some(json!({"name": "production"}))).await;
    assert_eq!(v["name"], "production");
    let v = server.ok(&t, Method::PATCH, &format!("/v1/hosts/{host}"), Some(json!({"address": "local"}))).await;
    assert_eq!(v["address"], "local");
    let v = server
        .ok(
            &t,
            Method::PATCH,
            &format!("/v1/replication-jobs/{job}"),
            Some(json!({"retention_points": 3, "enabled": false})),
        )
        .await;
    assert_eq!((v["retention_points"].as_u64(), v["enabled"].as_bool()), (Some(3), Some(false)));
    let v = server
        .ok(&t, Method::PATCH, &format!("/v1/vms/{vm}"), Some(json!({"name": "app2", "tags": ["tier:web"]})))
        .await;
    assert_eq!((v["name"].as_str(), v["tags"][0].as_str()), (Some("app2"), Some("tier:web")));

    let before = snapshot(&server, &t).await;
    expect(
        &server,
        &t,
        Method::PATCH,
        &format!("/v1/sites/{site}"),
        Some(json!({"name": ""})),
        StatusCode::BAD_REQUEST,
        "empty",
    )
    .await;
    expect(
        &server,
        &t,
        Method::PATCH,
        &format!("/v1/sites/{site}"),
        Some(json!({"nom": "x"})),
        StatusCode::BAD_REQUEST,
        "nom",
    )
    .await;
    expect(
        &server,
        &t,
        Method::PATCH,
        &format!("/v1/hosts/{host}"),
        Some(json!({"address": " "})),
        StatusCode::BAD_REQUEST,
        "address",
    )
    .await;
    expect(
        &server,
        &t,
        Method::PATCH,
        &format!("/v1/datastores/{ds}"),
        Some(json!({"name": 7})),
        StatusCode::BAD_REQUEST,
        "",
    )
    .await;
    expect(
        &server,
        &t,
        Method::PATCH,
        &format!("/v1/replication-jobs/{job}"),
        Some(json!({"retention_points": 0})),
        StatusCode::BAD_REQUEST,
        "retention_points",
    )
    .await;
    let twice = json!({"network_mappings": [{"from": "lan", "to": "a"}, {"from": "lan", "to": "b"}]});
    let path = format!("/v1/replication-jobs/{job}");
    expect(&server, &t, Method::PATCH, &path, Some(twice), StatusCode::BAD_REQUEST, "\"lan\" is mapped twice").await;
    let many: Vec<_> = (0..65).map(|i| json!({"from": format!("n{i}"), "to": "dr"})).collect();
    let many = json!({ "network_mappings": many });
    expect(&server, &t, Method::PATCH, &path, Some(many), StatusCode::BAD_REQUEST, "at most 64 network mappings").await;
    let unnamed = json!({"network_mappings": [{"from": "lan", "to": ""}]});
    expect(&server, &t, Method::PATCH, &path, Some(unnamed), StatusCode::BAD_REQUEST, "network name").await;
    expect(
        &server,
        &t,
        Method::PATCH,
        &format!("/v1/replication-jobs/{job}"),
        Some(json!({"schedule": {"type": "Interval", "secs": 1}})),
        StatusCode::BAD_REQUEST,
        "interval",
    )
    .await;
    expect(
        &server,
        &t,
        Method::PATCH,
        "/v1/recovery-locations/00000000-0000-0000-0000-000000000000",
        Some(json!({"name": "x"})),
        StatusCode::CONFLICT,
        "built in",
    )
    .await;
    expect(
        &server,
        &t,
        Method::PATCH,
        &format!("/v1/sites/{}", uuid::Uuid::new_v4()),
        Some(json!({"name": "x"})),
        StatusCode::NOT_FOUND,
        "not found",
    )
    .await;
    // Two sites cannot share a name.
    server.ok(&t, Method::POST, "/v1/sites", Some(json!({"name": "dr", "kind": "DisasterRecovery"}))).await;
    let before = {
        let mut b = before;
        b["sites"] = server.ok(&t, Method::GET, "/v1/sites", None).await;
        b
    };
    expect(
        &server,
        &t,
        Method::PATCH,
        &format!("/v1/sites/{site}"),
        Some(json!({"name": "dr"})),
        StatusCode::CONFLICT,
        "already exists",
    )
    .await;
    // Users: the password rule is checked before the role changes.
    let u = server
        .ok(&t, Method::POST, "/v1/users", Some(json!({"name": "op", "password": "password1", "role": "PlanOperator"})))
        .await;
    let before = {
        let mut b = before;
        b["users"] = server.ok(&t, Method::GET, "/v1/users", None).await;
        b
    };
    let uid = u["id"].as_str().unwrap();
    expect(
        &server,
        &t,
        Method::PATCH,
        &format!("/v1/users/{uid}"),
        Some(json!({"role": "Viewer", "password": "short"})),
        StatusCode::BAD_REQUEST,
        "8 characters",
    )
    .await;
    expect(
        &server,
        &t,
        Method::PATCH,
        &format!("/v1/users/{uid}"),
        Some(json!({"role": "Overlord"})),
        StatusCode::BAD_REQUEST,
        "role",
    )
    .await;
    assert_eq!(before, snapshot(&server, &t).await);

    // A user changes their own password, not their role; the old password stops working.
    let op = server.token("op", "password1").await;
    let (status, _) = server
        .call(Some(&op), Method::PATCH, &format!("/v1/users/{uid}"), Some(json!({"role": "Administrator"})))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    server.ok(&op, Method::PATCH, &format!("/v1/users/{uid}"), Some(json!({"password": "password2"}))).await;
    let (status, _) = server.call(Some(&op), Method::GET, "/v1/vms", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a new password ends the old logins");
    server.token("op", "password2").await;
    server.stop().await;
}
