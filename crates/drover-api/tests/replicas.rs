//! Replicas and their restore points as the API shows them. (Replication itself creates them;
//! here they are put in the store directly, so only the read side is under test.)

mod common;

use common::Server;
use drover_types::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn replicas_and_restore_points_are_listed_per_tenant() {
    let server = Server::simulated().await;
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let vm = server.vm(&t, &host, &ds, "app", json!({})).await;
    let dr = server.dir.path().join("dr");
    let dr =
        server.ok(&t, Method::POST, "/v1/datastores", Some(json!({"host_id": host, "name": "dr", "path": dr}))).await;
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
    let replica = Replica::new(
        admin.tenant_id,
        job["id"].as_str().unwrap().parse().unwrap(),
        (vm.parse().unwrap(), "app"),
        dr["id"].as_str().unwrap().parse().unwrap(),
    );
    store.object_insert(&replica).await.unwrap();
    for i in 0..2 {
        let p = RestorePoint {
            id: RestorePointId::new(),
            replica_id: replica.id,
            sequence: 0,
            session_id: SessionId::new(),
            state: RestorePointState::Published,
            created_at: now(),
            bytes_written: 1000 * (i + 1),
            disks: vec![RestorePointDisk {
                disk: "data".into(),
                file: format!("/x/{i}.qcow2"),
                size_bytes: 1 << 26,
                manifest_digest: "ab".into(),
                tracking_bitmap: None,
            }],
            verified: false,
            consistency: if i == 0 {
                PointConsistency::crash("no guest agent runs in the guest")
            } else {
                PointConsistency::application("1 file systems frozen by the guest agent 7.2")
            },
        };
        store.restore_point_publish(admin.tenant_id, &p).await.unwrap();
    }

    let list = server.ok(&t, Method::GET, "/v1/replicas", None).await;
    assert_eq!(list["total"], 1);
    assert_eq!(list["items"][0]["name"], "app_replica");
    assert_eq!(list["items"][0]["state"], "Ready");
    let id = replica.id.to_string();
    let one = server.ok(&t, Method::GET, &format!("/v1/replicas/{id}"), None).await;
    assert_eq!(one["source_vm_id"], vm.as_str());
    assert!(one["switched_to_vm_id"].is_null() && one["replaced_source_vm_id"].is_null(), "{one}");
    let points = server.ok(&t, Method::GET, &format!("/v1/replicas/{id}/restore-points"), None).await;
    assert_eq!(points["total"], 2);
    assert_eq!(points["items"][0]["sequence"], 1);
    assert_eq!(points["items"][1]["bytes_written"], 2000);
    assert_eq!(
        (points["items"][0]["consistency"].as_str(), points["items"][0]["consistency_reason"].as_str()),
        (Some("crash"), Some("no guest agent runs in the guest"))
    );
    assert_eq!(points["items"][1]["consistency"], "application");

    // A job's consistency: `try` unless asked, changed by an update; anything else is a 400
    // that changes nothing.
    let job_path = format!("/v1/replication-jobs/{}", job["id"].as_str().unwrap());
    assert_eq!(job["consistency"], "try", "{job}");
    let updated = server.ok(&t, Method::PATCH, &job_path, Some(json!({"consistency": "require"}))).await;
    assert_eq!(updated["consistency"], "require");
    let (status, body) = server.call(Some(&t), Method::PATCH, &job_path, Some(json!({"consistency": "always"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(server.ok(&t, Method::GET, &job_path, None).await["consistency"], "require");
    // File paths on the target are not shown to API users.
    assert!(points["items"][0]["disks"][0].get("file").is_none());

    // The VM cannot be deleted while a replica refers to it.
    let (status, body) = server
        .call(Some(&t), Method::DELETE, &format!("/v1/replication-jobs/{}", job["id"].as_str().unwrap()), None)
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // Another tenant sees none of it.
    let acme = server.ok(&t, Method::POST, "/v1/tenants", Some(json!({"name": "acme"}))).await;
    server
        .ok(
            &t,
            Method::POST,
            "/v1/users",
            Some(json!({"name": "a", "password": "password1", "role": "Viewer", "tenant_id": acme["id"]})),
        )
        .await;
    let other = server.token("a", "password1").await;
    assert_eq!(server.call(Some(&other), Method::GET, "/v1/replicas", None).await.1["total"], 0);
    for path in [format!("/v1/replicas/{id}"), format!("/v1/replicas/{id}/restore-points")] {
        assert_eq!(server.call(Some(&other), Method::GET, &path, None).await.0, StatusCode::NOT_FOUND);
    }
    let unknown = uuid::Uuid::new_v4();
    assert_eq!(
        server.call(Some(&t), Method::GET, &format!("/v1/replicas/{unknown}/restore-points"), None).await.0,
        StatusCode::NOT_FOUND
    );
    server.stop().await;
}
