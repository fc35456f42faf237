//! The whole story through the two Veeam dialects alone, against real QEMU guests (TCG): a VM
//! replicated for real (set up through the native API, which the dialects do not replace), then
//! logon to both dialects, the plan listed by both, failover started through Enterprise Manager
//! and watched through its task, its session and the Recovery Orchestrator's RuntimeDetails,
//! failback to the Original VM Location with `FailbackToProduction` (seed 000), commit, and every
//! session read back through `/api/cloud/failoverSessions` (seed 002) and the query service.
//! Every `Href` the EM dialect emitted along the way answers 200. Needs the tiny guest
//! (`scripts/build-guest`, or `DROVER_GUEST_DIR`); fails, never skips, without it.

#[path = "../../drover-api/tests/common/mod.rs"]
mod common;
mod em_common;
mod vro_common;

use std::time::Duration;

use drover_hv::Hypervisor;
use em_common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use vro_common::{NIL, Vro, replicated_for_real};

#[tokio::test]
async fn a_whole_story_through_the_dialects_alone_with_qemu() {
    let (server, driver) = common::with_qemu().await;
    let mut vro = Vro::on(server).await;
    vro.patience = Duration::from_secs(240);
    let em = Em::start(&vro.server, Duration::from_secs(15 * 60)).await;
    let server = &vro.server;

    // Set-up through the native API: a VM with the tiny guest, replicated for real, in a plan.
    let admin = server.admin().await;
    let (host, ds) = server.infrastructure(&admin).await;
    let vm = replicated_for_real(server, &admin, (&host, &ds), "shop", json!({})).await;
    let plan = server
        .ok(
            &admin,
            Method::POST,
            "/v1/plans",
            Some(json!({"name": "Shop", "description": "the shop", "groups": [{"name": "shop", "vms": [{"vm_id": vm}]}]})),
        )
        .await;
    let plan = plan["id"].as_str().unwrap().to_string();
    let replica: uuid::Uuid =
        server.ok(&admin, Method::GET, "/v1/replicas", None).await["items"][0]["id"].as_str().unwrap().parse().unwrap();
    let vm_uuid: uuid::Uuid = vm.parse().unwrap();

    // From here on, the dialects alone. Logon to both.
    let t = vro.token("SHOP\\admin", common::ADMIN_PASSWORD).await;
    let em_token = em.logon().await;
    let mut emitted = Vec::new();
    let root = em.send(Method::GET, "/api/", Token::None, false, None).await;
    assert_eq!(root.status, StatusCode::OK);
    emitted.extend(hrefs(&root.body));

    // The plan, listed by both.
    let plans = vro.get(&t, "/api/v3/Plans").await;
    assert_eq!((plans["total"].as_u64(), plans["data"][0]["id"].as_str()), (Some(1), Some(plan.as_str())), "{plans}");
    let cloud_plans = em.ok("/api/cloud/cloudFailoverPlans?format=Entity", &em_token).await;
    assert_eq!(count(&cloud_plans, "CloudFailoverPlan"), 1, "{cloud_plans}");
    assert_eq!(attr(&cloud_plans, "CloudFailoverPlan", None, "Name").as_deref(), Some("Shop"));
    emitted.extend(hrefs(&cloud_plans));

    // Fail over through Enterprise Manager: 202 and a Task that leads to the session.
    let start = attr(&cloud_plans, "Link", Some("Start"), "Href").unwrap();
    let body = format!(
        r#"<CloudFailoverPlanManagementSpec xmlns="{NS}"><StartNow>true</StartNow></CloudFailoverPlanManagementSpec>"#
    );
    let task = em.send(Method::POST, &start, Token::Header(&em_token), false, Some(("application/xml", body))).await;
    assert_eq!(task.status, StatusCode::ACCEPTED, "{}", task.body);
    emitted.extend(hrefs(&task.body));
    let failover_href = attr(&task.body, "Link", Some("Related"), "Href").unwrap();
    // Watched both ways until done: the dialect's RuntimeDetails and the EM session.
    let details = vro.wait_state(&t, &plan, "Failover").await;
    assert_eq!((details["currentRunResult"].as_str(), details["totalProgress"].as_u64()), (Some("Success"), Some(100)));
    let failover = until_stopped(&em, &failover_href, &em_token).await;
    assert_eq!(text(&failover, "Result").as_deref(), Some("Success"), "{failover}");
    let failover_vms = vm_tasks(&failover);
    assert_eq!(failover_vms.len(), 1, "{failover}");
    assert_eq!(failover_vms[0].vm_name, "shop", "{failover}");
    assert_eq!(failover_vms[0].point_type, "VmReplicaPointReference", "{failover}");
    emitted.extend(hrefs(&failover));
    // The replica runs at DR; what it writes must come back.
    driver.write_marker(replica, "written at DR").await.unwrap();

    // Seed 000: back to the Original VM Location, then commit.
    vro.act(&t, &plan, "FailbackToProduction", json!({"restoreLocationId": NIL, "failbackRestoreVMTags": false})).await;
    let details = vro.wait_state(&t, &plan, "Failback").await;
    assert_eq!(details["currentRunResult"], "Success", "{details}");
    let hb = driver.wait_heartbeat(vm_uuid, Duration::from_secs(90)).await.unwrap();
    assert_eq!(hb.marker.as_deref(), Some("written at DR"), "production has the replica's writes");
    vro.act(&t, &plan, "CommitFailback", Value::Null).await;
    let details = vro.wait_state(&t, &plan, "CommitFailback").await;
    assert!(details["resultName"].as_str().is_some_and(|r| r.starts_with("Complete, no errors")), "{details}");

    // Every session, read back through the collection, each entity, and the query service.
    let list = em.ok("/api/cloud/failoverSessions", &em_token).await;
    let refs: Vec<String> = hrefs(&list).into_iter().filter(|h| h.contains("/api/cloud/failoverSessions/")).collect();
    let mut seen = std::collections::BTreeSet::new();
    for r in &refs {
        let id = r.rsplit('/').next().unwrap().trim_end_matches("?format=Entity").to_string();
        if !seen.insert(id.clone()) {
            continue;
        }
        let entity = until_stopped(&em, &format!("/api/cloud/failoverSessions/{id}?format=Entity"), &em_token).await;
        assert_eq!(text(&entity, "Result").as_deref(), Some("Success"), "{entity}");
        assert_eq!(text(&entity, "JobType").as_deref(), Some("FailoverPlan"));
        // One VM, and each session (failover, failback, commit) names the point it booted from.
        assert_eq!(vm_tasks(&entity), failover_vms, "one task per VM: {entity}");
        emitted.extend(hrefs(&entity));
    }
    assert_eq!(seen.len(), 3, "failover, failback and commit: {list}");
    emitted.extend(hrefs(&list));
    let query = em
        .ok(
            "/api/query?type=CloudFailoverSession&format=Entities&filter=Result%3D%3DSuccess&sortAsc=CreationTime",
            &em_token,
        )
        .await;
    assert_eq!(count(&query, "CloudFailoverSession"), 3, "{query}");
    emitted.extend(hrefs(&query));
    let failed = em.ok("/api/query?type=CloudFailoverSession&filter=Result%3E%3DWarning", &em_token).await;
    assert_eq!(count(&failed, "Ref"), 0, "{failed}");

    // Every Href the dialect emitted in the story, and every one reachable from them, answers 200.
    let walked = walk(&em, &em_token, emitted).await;
    assert!(walked >= 15, "only {walked} links");

    // Leave no guest running.
    for v in server.ok(&admin, Method::GET, "/v1/vms", None).await["items"].as_array().unwrap() {
        let _ = driver.power_off(v["id"].as_str().unwrap().parse().unwrap()).await;
    }
    let _ = driver.power_off(replica).await;
    em.listener.stop().await;
    vro.stop().await;
}
