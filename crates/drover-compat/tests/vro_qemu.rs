//! The seed's endpoint end to end with real QEMU guests (TCG): a VM replicated for real, then,
//! through the Recovery Orchestrator dialect alone, Failover → FailbackToProduction to the
//! Original VM Location → CommitFailback, a second round failing back to another recovery
//! location with the VMs' tags, and a third in two phases (PrepareToFailback, then
//! SwitchoverToProduction). Needs the tiny guest (`scripts/build-guest`, or
//! `DROVER_GUEST_DIR`); fails, never skips, without it.

#[path = "../../drover-api/tests/common/mod.rs"]
mod common;
mod vro_common;

use std::time::Duration;

use drover_hv::Hypervisor;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use vro_common::*;

#[tokio::test]
async fn failback_to_production_with_qemu_to_the_original_vms_and_to_another_location() {
    let (server, driver) = common::with_qemu().await;
    let mut vro = Vro::on(server).await;
    vro.patience = Duration::from_secs(240);
    let server = &vro.server;
    let admin = server.admin().await;
    let (host, ds) = server.infrastructure(&admin).await;
    // The (powered-off) production VM, replicated for real.
    let vm = replicated_for_real(server, &admin, (&host, &ds), "app", json!({"tags": ["tier:web"]})).await;
    let datastore = |name: &str| json!({"host_id": host, "name": name, "path": server.dir.path().join(name)});
    let elsewhere = server.ok(&admin, Method::POST, "/v1/datastores", Some(datastore("elsewhere"))).await;
    let location = server
        .ok(
            &admin,
            Method::POST,
            "/v1/recovery-locations",
            Some(json!({"name": "Elsewhere", "host_id": host, "datastore_id": elsewhere["id"]})),
        )
        .await;
    let plan = server
        .ok(
            &admin,
            Method::POST,
            "/v1/plans",
            Some(json!({"name": "Web", "groups": [{"name": "web", "vms": [{"vm_id": vm}]}]})),
        )
        .await;
    let plan = plan["id"].as_str().unwrap().to_string();
    let replica =
        server.ok(&admin, Method::GET, "/v1/replicas", None).await["items"][0]["id"].as_str().unwrap().to_string();
    let vm_uuid: uuid::Uuid = vm.parse().unwrap();
    let replica_uuid: uuid::Uuid = replica.parse().unwrap();

    // From here on, the dialect alone.
    let t = vro.token("LAB\\admin", common::ADMIN_PASSWORD).await;
    let body = json!({"executeChainedPlans": false, "restorepointDate": null, "protectStorageVolumes": false});
    vro.act(&t, &plan, "Failover", body).await;
    let d = vro.wait_state(&t, &plan, "Failover").await;
    assert_eq!((d["currentRunResult"].as_str(), d["totalProgress"].as_u64()), (Some("Success"), Some(100)), "{d}");
    driver.write_marker(replica_uuid, "written in the replica").await.unwrap();

    // Seed 000: back to the Original VM Location.
    let body = json!({"restoreLocationId": NIL, "failbackRestoreVMTags": false});
    vro.act(&t, &plan, "FailbackToProduction", body).await;
    let d = vro.wait_state(&t, &plan, "Failback").await;
    assert_eq!((d["recoveryToNewLocation"].as_bool(), d["currentRunResult"].as_str()), (Some(false), Some("Success")));
    let hb = driver.wait_heartbeat(vm_uuid, Duration::from_secs(90)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("written in the replica"), "production has the replica's writes");
    vro.act(&t, &plan, "CommitFailback", Value::Null).await;
    let d = vro.wait_state(&t, &plan, "CommitFailback").await;
    assert_eq!(d["resultName"].as_str().map(|r| r.starts_with("Complete, no errors")), Some(true), "{d}");

    // Second round: production stops, fail over again, fail back to another location with tags.
    let (status, off) = server.call(Some(&admin), Method::POST, &format!("/v1/vms/{vm}/shutdown"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{off}");
    server.wait_session(&admin, off["session_id"].as_str().unwrap(), Duration::from_secs(60)).await;
    vro.act(&t, &plan, "Failover", json!({})).await;
    vro.wait_state(&t, &plan, "Failover").await;
    let body = json!({"restoreLocationId": location["id"], "failbackRestoreVMTags": true});
    vro.act(&t, &plan, "FailbackToProduction", body).await;
    let d = vro.wait_state(&t, &plan, "Failback").await;
    assert_eq!(d["recoveryToNewLocation"], true, "{d}");
    let vms = server.ok(&admin, Method::GET, "/v1/vms", None).await;
    let restored = vms["items"].as_array().unwrap().iter().find(|v| v["name"] == "app_restored").expect("the new VM");
    assert_eq!(
        (restored["tags"].clone(), restored["datastore_id"].clone()),
        (json!(["tier:web"]), elsewhere["id"].clone())
    );
    vro.act(&t, &plan, "CommitFailback", Value::Null).await;
    vro.wait_state(&t, &plan, "CommitFailback").await;

    // Third round, in two phases: the restored VM is production now (it took the original's
    // place in the plan). PrepareToFailback syncs it while the replica runs, then
    // SwitchoverToProduction finishes.
    let restored = restored["id"].as_str().unwrap().to_string();
    let group =
        vro.get(&t, &format!("/api/v3/Plans/{plan}/Groups")).await["data"][0]["id"].as_str().unwrap().to_string();
    let members = vro.get(&t, &format!("/api/v3/Plans/{plan}/Groups/{group}/Vms")).await;
    assert_eq!(members["data"][0]["id"], restored.as_str(), "{members}");
    let (status, off) = server.call(Some(&admin), Method::POST, &format!("/v1/vms/{restored}/shutdown"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{off}");
    server.wait_session(&admin, off["session_id"].as_str().unwrap(), Duration::from_secs(60)).await;
    vro.act(&t, &plan, "Failover", json!({})).await;
    vro.wait_state(&t, &plan, "Failover").await;
    driver.write_marker(replica_uuid, "third round").await.unwrap();
    vro.act(&t, &plan, "PrepareToFailback", Value::Null).await;
    let d = vro.wait_state(&t, &plan, "PrepareForFailback").await;
    assert_eq!((d["stateName"].as_str(), d["isUndoPossible"].as_bool()), (Some("PREPARE FOR FAILBACK"), Some(true)));
    vro.act(&t, &plan, "SwitchoverToProduction", Value::Null).await;
    vro.wait_state(&t, &plan, "Failback").await;
    let hb = driver.wait_heartbeat(restored.parse().unwrap(), Duration::from_secs(90)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("third round"));
    vro.act(&t, &plan, "CommitFailback", Value::Null).await;
    vro.wait_state(&t, &plan, "CommitFailback").await;

    // Leave no guest running.
    for v in server.ok(&admin, Method::GET, "/v1/vms", None).await["items"].as_array().unwrap() {
        let _ = driver.power_off(v["id"].as_str().unwrap().parse().unwrap()).await;
    }
    let _ = driver.power_off(replica_uuid).await;
    vro.stop().await;
}

/// Seed 000 in its most ordinary use: the plan fails over while production still runs (a drill,
/// a partial outage), then FailbackToProduction to the Original VM Location. drover shuts the
/// running production VM down itself (the guest answers the power button), sends back only the
/// changed extents, production boots with what was written in the replica, the plan reaches
/// FAILBACK with a clean result, and the commit works.
#[tokio::test]
async fn seed_000_while_production_still_runs() {
    let (server, driver) = common::with_qemu().await;
    let mut vro = Vro::on(server).await;
    vro.patience = Duration::from_secs(240);
    let server = &vro.server;
    let admin = server.admin().await;
    let (host, ds) = server.infrastructure(&admin).await;
    let vm = replicated_for_real(server, &admin, (&host, &ds), "app", json!({})).await;
    let plan = server
        .ok(
            &admin,
            Method::POST,
            "/v1/plans",
            Some(json!({"name": "Drill", "groups": [{"name": "app", "vms": [{"vm_id": vm}]}]})),
        )
        .await;
    let plan = plan["id"].as_str().unwrap().to_string();
    let replica =
        server.ok(&admin, Method::GET, "/v1/replicas", None).await["items"][0]["id"].as_str().unwrap().to_string();
    let (vm_uuid, replica_uuid): (uuid::Uuid, uuid::Uuid) = (vm.parse().unwrap(), replica.parse().unwrap());
    // Production runs, and writes after the last replicated point.
    let (status, on) = server.call(Some(&admin), Method::POST, &format!("/v1/vms/{vm}/power-on"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{on}");
    let on = server.wait_session(&admin, on["session_id"].as_str().unwrap(), Duration::from_secs(120)).await;
    assert_eq!(on["result"], "Success", "{on}");
    driver.write_marker(vm_uuid, "written in production").await.unwrap();

    // The drill: fail over with production still running.
    let t = vro.token("LAB\\admin", common::ADMIN_PASSWORD).await;
    vro.act(&t, &plan, "Failover", json!({})).await;
    let d = vro.wait_state(&t, &plan, "Failover").await;
    assert_eq!(d["currentRunResult"], "Success", "{d}");
    assert_eq!(driver.status(vm_uuid).await.unwrap(), drover_hv::PowerState::Running, "production still runs");
    driver.write_marker(replica_uuid, "written in the replica").await.unwrap();

    // Seed 000 to the Original VM Location.
    let body = json!({"restoreLocationId": NIL, "failbackRestoreVMTags": false});
    vro.act(&t, &plan, "FailbackToProduction", body).await;
    let d = vro.wait_state(&t, &plan, "Failback").await;
    assert_eq!(
        (d["resultName"].as_str(), d["currentRunResult"].as_str()),
        (Some("Complete, no errors"), Some("Success")),
        "{d}"
    );
    let hb = driver.wait_heartbeat(vm_uuid, Duration::from_secs(90)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("written in the replica"), "production has the replica's writes");
    let vm_now = server.ok(&admin, Method::GET, &format!("/v1/vms/{vm}"), None).await;
    assert_eq!(vm_now["power_state"], "Running", "{vm_now}");

    // The session says what drover did: production shut down, then only extents travelled.
    let sessions = server.ok(&admin, Method::GET, &format!("/v1/sessions?target_id={plan}"), None).await;
    let failback = &sessions["items"][0];
    assert_eq!(failback["kind"], "PlanFailback", "{sessions}");
    let id = failback["id"].as_str().unwrap();
    let log = server.ok(&admin, Method::GET, &format!("/v1/sessions/{id}/log"), None).await;
    let lines: Vec<&str> = log["items"].as_array().unwrap().iter().filter_map(|e| e["message"].as_str()).collect();
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(has("production VM app is running: shutting it down"), "{lines:#?}");
    assert!(has("production VM app shut down") || has("production VM app did not shut down"), "{lines:#?}");
    let synced = lines.iter().find(|l| l.contains("synced to production by")).expect("a sync line");
    assert!(synced.contains("by extents"), "only what changed travels: {synced}");
    let sent: u64 = synced.rsplit("sent ").next().unwrap().split(' ').next().unwrap().parse().unwrap();
    let disk = 64 << 20;
    assert!(sent > 0 && sent < disk / 2, "sent {sent} of a {disk}-byte disk: {synced}");
    eprintln!("failback with production running: {synced}");

    vro.act(&t, &plan, "CommitFailback", Value::Null).await;
    let d = vro.wait_state(&t, &plan, "CommitFailback").await;
    assert_eq!(d["resultName"], "Complete, no errors", "{d}");

    // Second round, in two phases, and somebody starts production between them: the
    // switchover powers it off again, and what it wrote after the sync travels back too.
    vro.act(&t, &plan, "Failover", json!({})).await;
    vro.wait_state(&t, &plan, "Failover").await;
    driver.write_marker(replica_uuid, "second round").await.unwrap();
    vro.act(&t, &plan, "PrepareToFailback", Value::Null).await;
    vro.wait_state(&t, &plan, "PrepareForFailback").await;
    assert_ne!(driver.status(vm_uuid).await.unwrap(), drover_hv::PowerState::Running, "the sync stopped it");
    let (status, on) = server.call(Some(&admin), Method::POST, &format!("/v1/vms/{vm}/power-on"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{on}");
    server.wait_session(&admin, on["session_id"].as_str().unwrap(), Duration::from_secs(120)).await;
    driver.write_marker(vm_uuid, "written in production after the sync").await.unwrap();
    vro.act(&t, &plan, "SwitchoverToProduction", Value::Null).await;
    let d = vro.wait_state(&t, &plan, "Failback").await;
    assert_eq!(d["resultName"], "Complete, no errors", "{d}");
    let hb = driver.wait_heartbeat(vm_uuid, Duration::from_secs(90)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("second round"), "production equals the replica again");
    vro.act(&t, &plan, "CommitFailback", Value::Null).await;
    vro.wait_state(&t, &plan, "CommitFailback").await;

    for id in [vm_uuid, replica_uuid] {
        let _ = driver.power_off(id).await;
    }
    vro.stop().await;
}
