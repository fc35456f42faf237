//! The Recovery Orchestrator dialect over real HTTP on loopback: the in-process server on SQLite
//! with the simulated hypervisor, the dialect's router on its own listener over the same `App`.
//! Plans, replicas and locations are set up through the native API (and a hand-made restore
//! point, as the simulated hypervisor cannot replicate); everything under test goes through the
//! dialect alone.

#[path = "../../drover-api/tests/common/mod.rs"]
mod common;
mod vro_common;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use vro_common::*;

// ------------------------------------------------------------------------------------------------
// Tests

/// A request and the status it gets: token, method, path, body, status.
type Request<'a> = (Option<&'a str>, Method, String, Option<&'a str>, StatusCode);

/// A request that must be refused: name, token, method, path, body, status, errorCode.
type Refusal<'a> = (&'a str, Option<&'a str>, Method, String, Option<&'a str>, StatusCode, &'a str);

/// Token → plans → Failover → RuntimeDetails → FailbackToProduction to the Original VM Location
/// (the simulated hypervisor cannot copy disks, so the failback halts, as the dialect shows) →
/// Undo (back to FAILOVER) → Undo (UNDO FAILOVER) → ResetState; every representation on the way
/// is compared with its golden file. The whole failback runs with QEMU in `vro_qemu.rs`.
#[tokio::test]
async fn story_failover_failback_commit_through_the_dialect_alone() {
    let vro = Vro::start().await;
    let site = site(&vro).await;

    // Token, with a DOMAIN\USER name.
    let (status, tok) = vro.login("CORP\\admin", common::ADMIN_PASSWORD).await;
    assert_eq!(status, StatusCode::OK, "{tok}");
    assert_eq!(keys(&tok), ["access_token", "expires_in", "refresh_token", "token_type"]);
    golden("token", &tok);
    let t = tok["access_token"].as_str().unwrap().to_string();

    // Plans, found by a filter on the name.
    let filter = r#"[{"property":"name","operator":"==","value":"Web"}]"#;
    let plans = vro
        .server
        .http
        .get(format!("{}/api/v3/Plans", vro.base))
        .bearer_auth(&t)
        .query(&[("filter", filter), ("onlyEnabled", "true")])
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(plans["total"], 1, "{plans}");
    golden("plans_list", &plans);
    let plan = plans["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(plan, site.plan);
    let info = vro.get(&t, &format!("/api/v3/Plans/{plan}")).await;
    assert_has_fields(
        &info,
        "id, planType, recoveryLocationId, recoveryLocationName, serverId, siteScopeId, siteScopeName, name, state, \
         stateName, resultName, lastStableState, lastStableStateName, previousExecutionState, reportTemplateId, \
         description",
    );
    assert_eq!(
        (info["recoveryLocationId"].as_str(), info["recoveryLocationName"].as_str()),
        (Some(NIL), Some("Original VM Location"))
    );
    assert_eq!((info["state"].as_str(), info["stateName"].as_str()), (Some("NeedsVerified"), Some("NEEDS VERIFIED")));
    assert_eq!(info["siteScopeName"], "default");
    golden("plan_info", &info);
    let before = vro.get(&t, &format!("/api/v3/RuntimeDetails/Plans/{plan}")).await;
    golden("runtime_before", &before);

    // Failover to the newest point (null date), then poll the runtime details.
    let body = json!({"executeChainedPlans": false, "restorePointDate": null, "protectStorageVolumes": false});
    vro.act(&t, &plan, "Failover", body).await;
    let after = vro.wait_state(&t, &plan, "Failover").await;
    assert_has_fields(
        &after,
        "id, planType, state, stateName, stateOrder, resultName, lastStableState, lastStableStateName, \
         totalProgress, isRunningState, isStableState, currentRunResult, currentTestResult, currentCheckResult, \
         recoveryLocationId, siteScopeId, siteScopeName, recoveryToNewLocation, isUndoPossible, \
         isReversePossible, isEditingByCurrentUser, currentEditingUser, roles",
    );
    assert_eq!((after["totalProgress"].as_u64(), after["currentRunResult"].as_str()), (Some(100), Some("Success")));
    assert!(after["resultName"].as_str().unwrap().starts_with("Complete, no errors"), "{after}");
    golden("runtime_failover", &after);
    golden("runtime_groups", &vro.get(&t, &format!("/api/v3/RuntimeDetails/Plans/{plan}/Groups")).await);
    let steps = vro.get(&t, &format!("/api/v3/RuntimeDetails/Plans/{plan}/Vms/{}/Steps", site.vm)).await;
    let states: Vec<_> = steps["data"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["Success", "Success"], "{steps}");
    golden("runtime_vm_steps", &steps);
    let second = steps["data"][1]["id"].as_str().unwrap();
    assert_eq!(vro.get(&t, &format!("/api/v3/RuntimeDetails/Plans/{plan}/Steps/{second}")).await, steps["data"][1]);

    // Failover again in the FAILOVER state: 409 in the dialect's body, and nothing changes.
    let plan_before = vro.get(&t, &format!("/api/v3/Plans/{plan}")).await;
    let (s, err) = vro.call(&t, Method::POST, &format!("/api/v3/Plans/{plan}/Failover"), Some(json!({}))).await;
    assert_eq!((s, err["errorCode"].as_str()), (StatusCode::CONFLICT, Some("Conflict")), "{err}");
    assert_eq!(vro.get(&t, &format!("/api/v3/Plans/{plan}")).await, plan_before);

    // Failback to the Original VM Location: accepted and run as the sync back into the original
    // VMs; the simulated hypervisor has no disks to sync, so the plan halts and says so.
    let body = json!({"restoreLocationId": NIL, "failbackRestoreVMTags": false});
    vro.act(&t, &plan, "FailbackToProduction", body).await;
    let halted = vro.wait_state(&t, &plan, "Halted").await;
    assert_eq!(halted["currentRunResult"], "Error", "{halted}");
    assert!(halted["resultName"].as_str().unwrap().starts_with("Halted"), "{halted}");
    assert_eq!(halted["recoveryToNewLocation"], false);
    let info = vro.get(&t, &format!("/api/v3/Plans/{plan}")).await;
    assert_eq!(info["previousExecutionState"], "FailbackInProgress");
    let admin = vro.server.admin().await;
    let sessions = vro.server.ok(&admin, Method::GET, &format!("/v1/sessions?target_id={plan}"), None).await;
    let failback = &sessions["items"][0];
    assert_eq!(failback["kind"], "PlanFailback", "{sessions}");
    let id = failback["id"].as_str().unwrap();
    let log = vro.server.ok(&admin, Method::GET, &format!("/v1/sessions/{id}/log"), None).await;
    assert!(log.to_string().contains("step sync:0 failed: failback needs the QEMU driver"), "{log}");
    // Undo of the halted failback: back to FAILOVER.
    vro.act(&t, &plan, "Undo", json!({})).await;
    vro.wait_state(&t, &plan, "Failover").await;

    // Undo once more: FAILOVER → UNDO FAILOVER (replicas off); then reset: a default state,
    // DISABLED.
    vro.act(&t, &plan, "Undo", Value::Null).await;
    let undone = vro.wait_state(&t, &plan, "UndoFailover").await;
    assert_eq!(
        (undone["currentRunResult"].as_str(), undone["isUndoPossible"].as_bool()),
        (Some("Success"), Some(false))
    );
    vro.act(&t, &plan, "ResetState", json!({"executeReadinessCheck": false})).await;
    let info = vro.get(&t, &format!("/api/v3/Plans/{plan}")).await;
    assert_eq!((info["state"].as_str(), info["mode"].as_str()), (Some("NeedsVerified"), Some("DISABLED")));
    let (s, e) = vro.call(&t, Method::POST, &format!("/api/v3/Plans/{plan}/Failover"), None).await;
    assert_eq!((s, e["errorCode"].as_str()), (StatusCode::CONFLICT, Some("Conflict")), "a disabled plan does not run");
    vro.stop().await;
}

/// Plan structure, recovery locations and the collection parameters.
#[tokio::test]
async fn plan_structure_locations_and_collection_parameters() {
    let vro = Vro::start().await;
    let site = site(&vro).await;
    let t = vro.token("admin", common::ADMIN_PASSWORD).await;
    let plan = &site.plan;

    let groups = vro.get(&t, &format!("/api/v3/Plans/{plan}/Groups")).await;
    golden("plan_groups", &groups);
    let group = groups["data"][0]["id"].as_str().unwrap();
    let vms = vro.get(&t, &format!("/api/v3/Plans/{plan}/Groups/{group}/Vms")).await;
    assert_eq!((vms["total"].as_u64(), vms["data"][0]["name"].as_str()), (Some(1), Some("app")));
    golden("plan_group_vms", &vms);
    let steps = vro.get(&t, &format!("/api/v3/Plans/{plan}/Vms/{}/Steps", site.vm)).await;
    assert_eq!(steps, vro.get(&t, &format!("/api/v3/Plans/{plan}/Groups/{group}/Steps")).await);
    golden("plan_vm_steps", &steps);
    let wait = steps["data"].as_array().unwrap().iter().find(|s| s["type"] == "WaitHeartbeat").unwrap();
    let params = vro.get(&t, &format!("/api/v3/Plans/{plan}/Steps/{}/Parameters", wait["id"].as_str().unwrap())).await;
    golden("step_parameters", &params);
    for path in [
        format!("/api/v3/Plans/{plan}/Groups/{}/Vms", uuid::Uuid::new_v4()),
        format!("/api/v3/Plans/{plan}/Vms/{}/Steps", uuid::Uuid::new_v4()),
        format!("/api/v3/Plans/{plan}/Steps/{}/Parameters", uuid::Uuid::new_v4()),
        format!("/api/v3/RuntimeDetails/Plans/{plan}/Groups/{}", uuid::Uuid::new_v4()),
        format!("/api/v3/RuntimeDetails/Plans/{plan}/Vms/{}/Steps", uuid::Uuid::new_v4()),
        format!("/api/v3/RuntimeDetails/Plans/{plan}/Steps/{}", uuid::Uuid::new_v4()),
    ] {
        let (s, e) = vro.call(&t, Method::GET, &path, None).await;
        assert_eq!((s, e["errorCode"].as_str()), (StatusCode::NOT_FOUND, Some("NotFound")), "{path}: {e}");
    }
    let rsteps = vro.get(&t, &format!("/api/v3/RuntimeDetails/Plans/{plan}/Vms/{}/Steps", site.vm)).await;
    assert_eq!((rsteps["total"].as_u64(), rsteps["data"][0]["state"].as_str()), (Some(2), Some("Pending")));
    let rvms = vro.get(&t, &format!("/api/v3/RuntimeDetails/Plans/{plan}/Groups/{group}")).await;
    assert_eq!(
        (rvms["data"][0]["state"].as_str(), rvms["data"][0]["result"].as_str()),
        (Some("Pending"), Some("Undefined"))
    );

    // Recovery locations: the built-in one first, always.
    let locations = vro.get(&t, "/api/v3/RecoveryLocations").await;
    assert_eq!(locations["total"], 2);
    assert_eq!(
        (locations["data"][0]["id"].as_str(), locations["data"][0]["isOriginal"].as_bool()),
        (Some(NIL), Some(true))
    );
    for l in locations["data"].as_array().unwrap() {
        assert_has_fields(
            l,
            "id, type, name, description, useReIp, useNetworkMapping, computeGroups, reIpRules, \
             networkMappingRules, availability, isOriginal",
        );
    }
    golden("recovery_locations", &locations);
    assert_eq!(vro.get(&t, &format!("/api/v3/RecoveryLocations/{NIL}")).await, locations["data"][0]);
    assert_eq!(vro.get(&t, &format!("/api/v3/RecoveryLocations/{}", site.location)).await, locations["data"][1]);
    let (s, e) = vro.call(&t, Method::GET, &format!("/api/v3/RecoveryLocations/{}", uuid::Uuid::new_v4()), None).await;
    assert_eq!((s, e["errorCode"].as_str()), (StatusCode::NOT_FOUND, Some("NotFound")));

    // Three more plans: filter and sort apply before start and limit.
    for name in ["Db", "Cache", "Auth"] {
        vro.server
            .ok(&vro.server.admin().await, Method::POST, "/v1/plans", Some(json!({"name": name, "groups": []})))
            .await;
    }
    let names = |v: &Value| -> Vec<String> {
        v["data"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_string()).collect()
    };
    let q = |query: &[(&str, &str)]| {
        let req = vro.server.http.get(format!("{}/api/v3/Plans", vro.base)).bearer_auth(&t).query(query);
        async move {
            let r = req.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let sort_asc = r#"[{"property":"name","direction":"ASC"}]"#;
    let (_, all) = q(&[("sort", sort_asc)]).await;
    assert_eq!(names(&all), ["Auth", "Cache", "Db", "Web"]);
    let (_, page) = q(&[("sort", r#"[{"property":"name","direction":"DESC"}]"#), ("start", "1"), ("limit", "2")]).await;
    assert_eq!((page["total"].as_u64(), names(&page)), (Some(4), vec!["Db".to_string(), "Cache".to_string()]));
    vro.act(&t, &site.plan, "Disable", Value::Null).await;
    let (_, enabled) = q(&[("onlyEnabled", "true"), ("sort", sort_asc)]).await;
    assert_eq!(names(&enabled), ["Auth", "Cache", "Db"]);
    let (_, disabled) = q(&[("filter", r#"[{"property":"mode","operator":"==","value":"DISABLED"}]"#)]).await;
    assert_eq!(names(&disabled), ["Web"]);
    vro.act(&t, &site.plan, "Enable", Value::Null).await;
    for bad in [("limit", "many"), ("filter", "name=Web"), ("sort", r#"[{"property":"name","direction":"UP"}]"#)] {
        let (s, e) = q(&[bad]).await;
        assert_eq!((s, e["errorCode"].as_str()), (StatusCode::BAD_REQUEST, Some("InvalidURI")), "{bad:?}: {e}");
    }

    // Every version alias serves the same handlers.
    for v in drover_compat::vro::VERSION_ALIASES {
        assert_eq!(vro.get(&t, &format!("/api/{v}/Plans?sort={sort_asc}")).await, all, "{v}");
    }

    // The readiness check: CHECKING, then VERIFIED (the replica is there), as a check result.
    // Its answer is JSON (clients parse it): the session that runs the check.
    let path = format!("/api/v3/Plans/{plan}/ReadinessCheck");
    let (s, started) = vro.call(&t, Method::POST, &path, Some(json!({"generateReport": true}))).await;
    assert_eq!(s, StatusCode::OK, "{started}");
    assert_eq!(keys(&started), ["planId", "reportGenerated", "sessionId", "state"]);
    assert_eq!((started["planId"].as_str(), started["state"].as_str()), (Some(plan.as_str()), Some("Checking")));
    assert_eq!(started["reportGenerated"], false);
    let native = vro.server.admin().await;
    let session = format!("/v1/sessions/{}", started["sessionId"].as_str().unwrap());
    let session = vro.server.ok(&native, Method::GET, &session, None).await;
    assert_eq!(
        (session["kind"].as_str(), session["target_id"].as_str()),
        (Some("PlanReadinessCheck"), Some(plan.as_str())),
        "{session}"
    );
    let checked = vro.wait_state(&t, plan, "Verified").await;
    assert_eq!(
        (checked["currentCheckResult"].as_str(), checked["currentRunResult"].as_str()),
        (Some("Success"), Some("Undefined"))
    );
    assert_eq!(checked["resultName"], "Complete, no errors", "{checked}");
    vro.stop().await;
}

/// Grants: password as a form and as multipart, refresh (single use, rotating),
/// client_credentials with clients made by an administrator; the older `/token` path.
#[tokio::test]
async fn token_grants_and_clients() {
    let vro = Vro::start().await;
    let http = &vro.server.http;
    let url = format!("{}/api/token", vro.base);

    let form = reqwest::multipart::Form::new()
        .text("grant_type", "password")
        .text("username", "admin")
        .text("password", common::ADMIN_PASSWORD);
    let r = http.post(&url).multipart(form).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let pair: Value = r.json().await.unwrap();
    assert_eq!((pair["token_type"].as_str(), pair["expires_in"].as_i64()), (Some("bearer"), Some(899)));

    // Refresh: a new pair; the old refresh token is spent.
    let refresh = |token: String| {
        let req = http
            .post(format!("{}/token", vro.base))
            .form(&[("grant_type", "refresh_token"), ("refresh_token", &token)]);
        async move {
            let r = req.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let old = pair["refresh_token"].as_str().unwrap().to_string();
    let (s, next) = refresh(old.clone()).await;
    assert_eq!(s, StatusCode::OK, "{next}");
    assert_ne!(next["refresh_token"], pair["refresh_token"]);
    assert_eq!(vro.get(next["access_token"].as_str().unwrap(), "/api/v3/Plans").await["total"], 0);
    let (s, e) = refresh(old).await;
    assert_eq!((s, e["errorCode"].as_str()), (StatusCode::UNAUTHORIZED, Some("InvalidToken")), "{e}");
    golden("error_401_refresh_reused", &e);

    // Bad token requests.
    for (body, code) in [
        (vec![("grant_type", "password"), ("username", "admin"), ("password", "wrong")], StatusCode::UNAUTHORIZED),
        (vec![("grant_type", "password"), ("username", "nobody"), ("password", "wrong")], StatusCode::UNAUTHORIZED),
        (vec![("grant_type", "password"), ("username", "admin")], StatusCode::BAD_REQUEST),
        (vec![("grant_type", "magic")], StatusCode::BAD_REQUEST),
        (
            vec![("grant_type", "client_credentials"), ("client_id", "x"), ("client_secret", "y")],
            StatusCode::UNAUTHORIZED,
        ),
    ] {
        let r = http.post(&url).form(&body).send().await.unwrap();
        let status = r.status();
        let e: Value = r.json().await.unwrap();
        assert_eq!(status, code, "{body:?}: {e}");
        let want = if code == StatusCode::UNAUTHORIZED { "AccessDenied" } else { "UnexpectedContent" };
        assert_eq!(e["errorCode"], want, "{body:?}");
    }
    let r = http.post(&url).header("Content-Type", "text/plain").body("grant_type=password").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // Clients: an administrator makes one; it logs in with client_credentials and acts with its role.
    let admin = vro.token("admin", common::ADMIN_PASSWORD).await;
    let (s, client) = vro.call(&admin, Method::POST, "/api/v3/Clients", Some(json!({"role": "Viewer"}))).await;
    assert_eq!(s, StatusCode::OK, "{client}");
    golden("client", &client);
    let login = |id: String, secret: String| {
        let req = http.post(&url).form(&[
            ("grant_type", "client_credentials"),
            ("client_id", id.as_str()),
            ("client_secret", secret.as_str()),
        ]);
        async move {
            let r = req.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let id = client["client_id"].as_str().unwrap().to_string();
    let (s, e) = login(id.clone(), "not the secret".into()).await;
    assert_eq!((s, e["errorCode"].as_str()), (StatusCode::UNAUTHORIZED, Some("AccessDenied")));
    let (s, ct) = login(id.clone(), client["client_secret"].as_str().unwrap().into()).await;
    assert_eq!(s, StatusCode::OK, "{ct}");
    let viewer = ct["access_token"].as_str().unwrap();
    assert_eq!(vro.get(viewer, "/api/v3/RecoveryLocations").await["total"], 1);
    // Only the secret's hash is stored.
    let (_, hash) = vro.server.app.engine().store().user_by_name(&format!("client:{id}")).await.unwrap().unwrap();
    assert!(hash.starts_with("$argon2") && !hash.contains(client["client_secret"].as_str().unwrap()));
    // A viewer (the client) may not make clients; a bad role is 400.
    let (s, e) = vro.call(viewer, Method::POST, "/api/v3/Clients", None).await;
    assert_eq!((s, e["errorCode"].as_str()), (StatusCode::FORBIDDEN, Some("AccessDenied")), "{e}");
    let (s, e) = vro.call(&admin, Method::POST, "/api/v3/Clients", Some(json!({"role": "King"}))).await;
    assert_eq!((s, e["errorCode"].as_str()), (StatusCode::BAD_REQUEST, Some("UnexpectedContent")), "{e}");
    vro.stop().await;
}

/// Every refusal is the dialect's error body, with the right status and code, and changes nothing.
#[tokio::test]
async fn refusals_are_the_dialects_errors_and_change_nothing() {
    let vro = Vro::start().await;
    let site = site(&vro).await;
    let plan = &site.plan;
    let admin = vro.token("admin", common::ADMIN_PASSWORD).await;
    let native = vro.server.admin().await;
    vro.server
        .ok(
            &native,
            Method::POST,
            "/v1/users",
            Some(json!({"name": "watcher", "password": "password1", "role": "Viewer"})),
        )
        .await;
    let viewer = vro.token("CORP\\watcher", "password1").await;
    // An expired token, as the store holds it.
    let expired = "expired-token-value";
    let user = vro.server.app.engine().store().user_by_name("admin").await.unwrap().unwrap().0;
    vro.server
        .app
        .engine()
        .store()
        .token_insert(&drover_store::TokenRecord {
            hash: drover_engine::auth::token_hash(expired),
            kind: drover_store::TokenKind::Access,
            user_id: user.id,
            family: uuid::Uuid::new_v4(),
            expires_at: drover_types::now() - chrono::Duration::seconds(5),
            used_at: None,
            created_at: drover_types::now() - chrono::Duration::seconds(905),
        })
        .await
        .unwrap();

    let snapshot = || async {
        let p = vro.server.ok(&native, Method::GET, &format!("/v1/plans/{plan}"), None).await;
        let s = vro.server.ok(&native, Method::GET, "/v1/sessions?limit=1000", None).await;
        let c = vro.server.ok(&native, Method::GET, "/v1/users", None).await;
        (p, s["total"].clone(), c["total"].clone())
    };
    let before = snapshot().await;

    let unknown = uuid::Uuid::new_v4().to_string();
    let (admin, viewer) = (admin.as_str(), viewer.as_str());
    let nil_body = format!("{{\"restoreLocationId\": \"{NIL}\"}}");
    let failover = format!("/api/v3/Plans/{plan}/Failover");
    let cases: Vec<Refusal> = vec![
        ("no_token", None, Method::GET, "/api/v3/Plans".into(), None, StatusCode::UNAUTHORIZED, "InvalidToken"),
        (
            "garbage_token",
            Some("garbage"),
            Method::POST,
            failover.clone(),
            Some("{}"),
            StatusCode::UNAUTHORIZED,
            "InvalidToken",
        ),
        (
            "expired_token",
            Some(expired),
            Method::GET,
            format!("/api/v3/Plans/{plan}"),
            None,
            StatusCode::UNAUTHORIZED,
            "ExpiredToken",
        ),
        (
            "viewer_failover",
            Some(viewer),
            Method::POST,
            failover.clone(),
            Some("{}"),
            StatusCode::FORBIDDEN,
            "AccessDenied",
        ),
        (
            "viewer_disable",
            Some(viewer),
            Method::POST,
            format!("/api/v3/Plans/{plan}/Disable"),
            None,
            StatusCode::FORBIDDEN,
            "AccessDenied",
        ),
        (
            "unknown_plan",
            Some(admin),
            Method::GET,
            format!("/api/v3/Plans/{unknown}"),
            None,
            StatusCode::NOT_FOUND,
            "NotFound",
        ),
        (
            "unknown_plan_action",
            Some(admin),
            Method::POST,
            format!("/api/v3/Plans/{unknown}/Failover"),
            Some("{}"),
            StatusCode::NOT_FOUND,
            "NotFound",
        ),
        (
            "not_a_uuid",
            Some(admin),
            Method::GET,
            "/api/v3/RuntimeDetails/Plans/web".into(),
            None,
            StatusCode::NOT_FOUND,
            "NotFound",
        ),
        ("unknown_route", Some(admin), Method::GET, "/api/v3/Nothing".into(), None, StatusCode::NOT_FOUND, "NotFound"),
        (
            "malformed_json",
            Some(admin),
            Method::POST,
            failover.clone(),
            Some("{\"restorePointDate\":"),
            StatusCode::BAD_REQUEST,
            "UnexpectedContent",
        ),
        (
            "wrong_type",
            Some(admin),
            Method::POST,
            failover.clone(),
            Some("{\"restorePointDate\": 5}"),
            StatusCode::BAD_REQUEST,
            "UnexpectedContent",
        ),
        (
            "bad_continue_option",
            Some(admin),
            Method::POST,
            format!("/api/v3/Plans/{plan}/Continue"),
            Some("{\"executionContinueOptions\": \"Sideways\"}"),
            StatusCode::BAD_REQUEST,
            "UnexpectedContent",
        ),
        (
            "bad_location",
            Some(admin),
            Method::POST,
            format!("/api/v3/Plans/{plan}/FailbackToProduction"),
            Some("{\"restoreLocationId\": \"nowhere\"}"),
            StatusCode::BAD_REQUEST,
            "UnexpectedContent",
        ),
        (
            "commit_in_wrong_state",
            Some(admin),
            Method::POST,
            format!("/api/v3/Plans/{plan}/CommitFailback"),
            None,
            StatusCode::CONFLICT,
            "Conflict",
        ),
        (
            "failback_in_wrong_state",
            Some(admin),
            Method::POST,
            format!("/api/v3/Plans/{plan}/FailbackToProduction"),
            Some(nil_body.as_str()),
            StatusCode::CONFLICT,
            "Conflict",
        ),
        (
            "halt_nothing_running",
            Some(admin),
            Method::POST,
            format!("/api/v3/Plans/{plan}/Halt"),
            Some("{\"fullstop\": true}"),
            StatusCode::CONFLICT,
            "Conflict",
        ),
        (
            "restore_on_a_replica_plan",
            Some(admin),
            Method::POST,
            format!("/api/v3/Plans/{plan}/Restore"),
            Some(nil_body.as_str()),
            StatusCode::CONFLICT,
            "Conflict",
        ),
        (
            "clone_not_served",
            Some(admin),
            Method::POST,
            format!("/api/v3/Plans/{plan}/Clone"),
            None,
            StatusCode::CONFLICT,
            "Conflict",
        ),
        (
            "malware_scan_on_an_unknown_plan",
            Some(admin),
            Method::POST,
            format!("/api/v3/Plans/{unknown}/MalwareScan"),
            None,
            StatusCode::NOT_FOUND,
            "NotFound",
        ),
        (
            "unknown_action",
            Some(admin),
            Method::POST,
            format!("/api/v3/Plans/{plan}/Frobnicate"),
            Some("{}"),
            StatusCode::BAD_REQUEST,
            "InvalidURI",
        ),
        (
            "misspelt_action",
            Some(admin),
            Method::POST,
            format!("/api/v3/Plans/{plan}/failover"),
            Some("{}"),
            StatusCode::BAD_REQUEST,
            "InvalidURI",
        ),
        (
            "unknown_action_without_token",
            None,
            Method::POST,
            format!("/api/v3/Plans/{plan}/Frobnicate"),
            None,
            StatusCode::UNAUTHORIZED,
            "InvalidToken",
        ),
        (
            "get_on_an_unknown_action",
            Some(admin),
            Method::GET,
            format!("/api/v3/Plans/{plan}/Frobnicate"),
            None,
            StatusCode::NOT_FOUND,
            "NotFound",
        ),
        (
            "post_on_a_collection_of_the_plan",
            Some(admin),
            Method::POST,
            format!("/api/v3/Plans/{plan}/Groups"),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
        ),
        (
            "wrong_method",
            Some(admin),
            Method::GET,
            failover.clone(),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
        ),
        (
            "wrong_method_collection",
            Some(admin),
            Method::DELETE,
            "/api/v3/Plans".into(),
            None,
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
        ),
    ];
    let mut bodies = serde_json::Map::new();
    for (name, token, method, path, body, status, code) in cases {
        let (s, e) = vro.raw(token, method, &path, body).await;
        assert_eq!((s, e["errorCode"].as_str()), (status, Some(code)), "{name}: {e}");
        assert_eq!(keys(&e), ["errorCode", "message", "resourceId"], "{name}");
        assert!(!e["message"].as_str().unwrap().is_empty(), "{name}");
        bodies.insert(name.to_string(), e);
        assert_eq!(snapshot().await, before, "{name} changed something");
    }
    assert_eq!(bodies["unknown_plan"]["resourceId"], unknown.as_str());
    // An action of the product that drover's replica plans do not take names the plan; an
    // unknown one says it is none, and a misspelt one how it is spelled.
    assert_eq!(bodies["restore_on_a_replica_plan"]["resourceId"], plan.as_str());
    let restore = bodies["restore_on_a_replica_plan"]["message"].as_str().unwrap();
    assert!(restore.contains("Restore applies only to restore plans") && restore.contains("replica plan"), "{restore}");
    let unknown_action = bodies["unknown_action"]["message"].as_str().unwrap();
    assert!(unknown_action.contains("\"Frobnicate\" is not an action of a plan"), "{unknown_action}");
    let misspelt = bodies["misspelt_action"]["message"].as_str().unwrap();
    assert!(misspelt.ends_with("(names are spelled as documented: Failover)"), "{misspelt}");
    golden("errors", &Value::Object(bodies));

    // Wrong credentials: 401 in the dialect's body, and nothing changes.
    let (s, e) = vro.login("CORP\\admin", "not the password").await;
    assert_eq!((s, e["errorCode"].as_str()), (StatusCode::UNAUTHORIZED, Some("AccessDenied")), "{e}");
    assert_eq!(keys(&e), ["errorCode", "message", "resourceId"]);
    assert_eq!(snapshot().await, before);

    // A body over the limit (1 MiB) is refused in the dialect's words too.
    let big = format!("{{\"generateReport\": false, \"pad\": \"{}\"}}", "x".repeat(2 << 20));
    let (s, e) = vro.raw(Some(admin), Method::POST, &format!("/api/v3/Plans/{plan}/ReadinessCheck"), Some(&big)).await;
    assert_eq!((s, e["errorCode"].as_str()), (StatusCode::BAD_REQUEST, Some("UnexpectedContent")), "{e}");
    assert_eq!(snapshot().await, before);

    // The viewer reads what it may.
    assert_eq!(vro.get(viewer, "/api/v3/Plans").await["total"], 1);
    vro.stop().await;
}

/// The OpenAPI document covers the dialect, the seed's request body included.
#[tokio::test]
async fn the_openapi_document_covers_the_dialect() {
    let vro = Vro::start().await;
    let r = vro.server.http.get(format!("{}/api/v3/openapi.json", vro.base)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let doc: Value = r.json().await.unwrap();
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/token",
        "/api/v3/Clients",
        "/api/v3/Plans",
        "/api/v3/Plans/{planId}",
        "/api/v3/Plans/{planId}/Failover",
        "/api/v3/Plans/{planId}/FailbackToProduction",
        "/api/v3/Plans/{planId}/CommitFailback",
        "/api/v3/Plans/{planId}/Halt",
        "/api/v3/RuntimeDetails/Plans/{planId}",
        "/api/v3/RuntimeDetails/Plans/{planId}/Vms/{vmId}/Steps",
        "/api/v3/RuntimeDetails/Plans/{planId}/Steps/{stepId}",
        "/api/v3/Plans/{planId}/Steps/{stepId}/Parameters",
        "/api/v3/RecoveryLocations",
        "/api/v3/Scopes",
        "/api/v3/LicenseUsage/Server",
        "/api/v3/License/Usage/Server",
        "/api/v3/Plans/{planId}/LicenseUsage",
    ] {
        assert!(paths.contains_key(p), "{p} missing");
    }
    let started = &doc["paths"]["/api/v3/Plans/{planId}/ReadinessCheck"]["post"]["responses"]["200"];
    assert_eq!(
        started["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/ReadinessCheckStarted",
        "{started}"
    );
    let body = &doc["components"]["schemas"]["FailbackBody"]["properties"];
    assert!(body.get("restoreLocationId").is_some() && body.get("failbackRestoreVMTags").is_some(), "{body}");
    let info = &doc["components"]["schemas"]["RecoveryPlanInfo"];
    assert!(info["properties"].get("previousExecutionState").is_some(), "{info}");
    assert_eq!(info["properties"]["recoveryLocationName"]["type"], "string", "{info}");
    assert!(info["required"].as_array().unwrap().contains(&json!("recoveryLocationName")), "{info}");
    vro.stop().await;
}

/// Halt (with the documented `fullstop` spelling) lets the running step finish, then HALTED;
/// Continue goes on to FAILOVER; PermanentFailover ends the way back. Another tenant sees none
/// of the plan.
#[tokio::test]
async fn halt_continue_permanent_failover_and_tenants() {
    let hv = std::sync::Arc::new(drover_hv::sim::SimulatedHypervisor::new());
    let vro = Vro::on(common::Server::start(hv.clone(), common::fast_config()).await).await;
    let site = site(&vro).await;
    let plan = &site.plan;
    let t = vro.token("admin", common::ADMIN_PASSWORD).await;
    // The replica takes 2 s to send its heartbeat: the failover is running meanwhile.
    hv.set_heartbeat_delay(std::time::Duration::from_secs(2));
    let later = (drover_types::now() + chrono::Duration::hours(1)).to_rfc3339();
    vro.act(&t, plan, "Failover", json!({"restorePointDate": later})).await;
    let running = vro.get(&t, &format!("/api/v3/RuntimeDetails/Plans/{plan}")).await;
    assert_eq!(
        (running["state"].as_str(), running["stateName"].as_str(), running["isRunningState"].as_bool()),
        (Some("FailoverInProgress"), Some("FAILOVER"), Some(true)),
        "{running}"
    );
    assert_eq!(running["resultName"], "In progress");
    golden("runtime_running", &running);
    // Only Halt is accepted while running.
    let (s, e) = vro.call(&t, Method::POST, &format!("/api/v3/Plans/{plan}/Undo"), None).await;
    assert_eq!((s, e["errorCode"].as_str()), (StatusCode::CONFLICT, Some("Conflict")), "{e}");
    vro.act(&t, plan, "Halt", json!({"fullstop": true})).await;
    let halted = vro.wait_state(&t, plan, "Halted").await;
    assert_eq!(
        (halted["isStableState"].as_bool(), halted["currentRunResult"].as_str()),
        (Some(true), Some("Undefined"))
    );
    let info = vro.get(&t, &format!("/api/v3/Plans/{plan}")).await;
    assert_eq!(info["previousExecutionState"], "FailoverInProgress", "{info}");
    hv.set_heartbeat_delay(std::time::Duration::ZERO);
    vro.act(&t, plan, "Continue", json!({"executionContinueOptions": "ProceedToNextStep"})).await;
    let done = vro.wait_state(&t, plan, "Failover").await;
    assert_eq!(done["currentRunResult"], "Success", "{done}");
    assert_eq!(vro.get(&t, &format!("/api/v3/Plans/{plan}")).await["previousExecutionState"], Value::Null);

    vro.act(&t, plan, "PermanentFailover", Value::Null).await;
    let permanent = vro.wait_state(&t, plan, "PermanentFailover").await;
    assert_eq!(
        (permanent["isReversePossible"].as_bool(), permanent["isUndoPossible"].as_bool()),
        (Some(false), Some(false))
    );
    let body = json!({"restoreLocationId": NIL, "failbackRestoreVMTags": false});
    let (s, e) = vro.call(&t, Method::POST, &format!("/api/v3/Plans/{plan}/FailbackToProduction"), Some(body)).await;
    assert_eq!((s, e["errorCode"].as_str()), (StatusCode::CONFLICT, Some("Conflict")), "{e}");

    // Another tenant: nothing of it is visible, and unknown is 404, not 403.
    let native = vro.server.admin().await;
    let acme = vro.server.ok(&native, Method::POST, "/v1/tenants", Some(json!({"name": "acme"}))).await;
    vro.server
        .ok(
            &native,
            Method::POST,
            "/v1/users",
            Some(json!({"name": "acme-admin", "password": "password1", "role": "Administrator", "tenant_id": acme["id"]})),
        )
        .await;
    let other = vro.token("ACME\\acme-admin", "password1").await;
    assert_eq!(vro.get(&other, "/api/v3/Plans").await["total"], 0);
    assert_eq!(vro.get(&other, "/api/v3/RecoveryLocations").await["total"], 1, "only the built-in location");
    for (method, path) in [
        (Method::GET, format!("/api/v3/Plans/{plan}")),
        (Method::GET, format!("/api/v3/RuntimeDetails/Plans/{plan}")),
        (Method::POST, format!("/api/v3/Plans/{plan}/ResetState")),
        (Method::GET, format!("/api/v3/RecoveryLocations/{}", site.location)),
    ] {
        let (s, e) = vro.call(&other, method, &path, None).await;
        assert_eq!((s, e["errorCode"].as_str()), (StatusCode::NOT_FOUND, Some("NotFound")), "{path}: {e}");
    }
    assert_eq!(vro.get(&t, &format!("/api/v3/Plans/{plan}")).await["state"], "PermanentFailover");
    vro.stop().await;
}

/// A plan halted by a failed step reads as halted with one error, its VM and group not
/// `Running`; after a Continue that retries the step and succeeds, the plan, its group and its VM
/// read as succeeded ("Complete, no errors"): the result is the steps' final outcomes, not the
/// log's error and warning lines.
#[tokio::test]
async fn a_plan_that_succeeds_on_retry_reads_as_succeeded() {
    let hv = std::sync::Arc::new(drover_hv::sim::SimulatedHypervisor::new());
    let vro = Vro::on(common::Server::start(hv.clone(), common::fast_config()).await).await;
    let site = site(&vro).await;
    let plan = &site.plan;
    let t = vro.token("admin", common::ADMIN_PASSWORD).await;
    hv.fail_next("power_on");
    vro.act(&t, plan, "Failover", json!({})).await;
    let halted = vro.wait_state(&t, plan, "Halted").await;
    assert_eq!(
        (halted["resultName"].as_str(), halted["currentRunResult"].as_str()),
        (Some("Halted, 1 error"), Some("Error")),
        "{halted}"
    );
    let groups = vro.get(&t, &format!("/api/v3/RuntimeDetails/Plans/{plan}/Groups")).await;
    let group = &groups["data"][0];
    assert_eq!((group["state"].as_str(), group["result"].as_str()), (Some("Complete"), Some("Error")), "{groups}");
    let gid = group["id"].as_str().unwrap();
    let vms = vro.get(&t, &format!("/api/v3/RuntimeDetails/Plans/{plan}/Groups/{gid}")).await;
    let vm = &vms["data"][0];
    assert_eq!((vm["state"].as_str(), vm["result"].as_str()), (Some("Complete"), Some("Error")), "{vms}");
    assert!(vm["failureMessage"].as_str().is_some_and(|m| m.contains("injected")), "{vms}");

    vro.act(&t, plan, "Continue", json!({"executionContinueOptions": "RetryFailedStep"})).await;
    let done = vro.wait_state(&t, plan, "Failover").await;
    assert_eq!(
        (done["resultName"].as_str(), done["currentRunResult"].as_str()),
        (Some("Complete, no errors"), Some("Success")),
        "{done}"
    );
    let groups = vro.get(&t, &format!("/api/v3/RuntimeDetails/Plans/{plan}/Groups")).await;
    assert_eq!(
        (groups["data"][0]["state"].as_str(), groups["data"][0]["result"].as_str()),
        (Some("Complete"), Some("Success")),
        "{groups}"
    );
    let vms = vro.get(&t, &format!("/api/v3/RuntimeDetails/Plans/{plan}/Groups/{gid}")).await;
    assert_eq!(
        (vms["data"][0]["state"].as_str(), vms["data"][0]["result"].as_str(), &vms["data"][0]["failureMessage"]),
        (Some("Complete"), Some("Success"), &Value::Null),
        "{vms}"
    );
    // The log still tells the whole story.
    let admin = vro.server.admin().await;
    let sessions = vro.server.ok(&admin, Method::GET, &format!("/v1/sessions?target_id={plan}"), None).await;
    let id = sessions["items"][0]["id"].as_str().unwrap();
    let log = vro.server.ok(&admin, Method::GET, &format!("/v1/sessions/{id}/log"), None).await.to_string();
    assert!(log.contains("failed") && log.contains("continuing: RetryFailedStep"), "{log}");
    vro.stop().await;
}

/// Scopes: the caller's tenant, with the name of the disaster-recovery site it sees. License
/// usage counts the distinct VMs of the caller's plans, at both paths the product has used, and
/// of one plan. A plan names its recovery location.
#[tokio::test]
async fn scopes_license_usage_and_the_recovery_location_name() {
    let vro = Vro::start().await;
    let site = site(&vro).await;
    let t = vro.token("admin", common::ADMIN_PASSWORD).await;
    let native = vro.server.admin().await;
    vro.server
        .ok(&native, Method::POST, "/v1/sites", Some(json!({"name": "Ontario", "kind": "DisasterRecovery"})))
        .await;

    let scopes = vro.get(&t, "/api/v3/Scopes").await;
    assert_eq!(scopes["total"], 1, "{scopes}");
    let scope = &scopes["data"][0];
    assert_eq!(keys(scope), ["description", "id", "isDefault", "name", "serverId", "siteName", "state"]);
    let info = vro.get(&t, &format!("/api/v3/Plans/{}", site.plan)).await;
    assert_eq!((&scope["id"], &scope["name"]), (&info["siteScopeId"], &info["siteScopeName"]));
    assert_eq!(
        (scope["isDefault"].as_bool(), scope["state"].as_str(), scope["siteName"].as_str()),
        (Some(true), Some("Active"), Some("Ontario")),
        "the disaster-recovery site, before the production one: {scope}"
    );
    assert_eq!(scope["serverId"], drover_compat::vro::views::SERVER_ID.to_string());
    golden("scopes", &scopes);
    let (s, e) = vro.call(&t, Method::GET, "/api/v3/Scopes?sort=name", None).await;
    assert_eq!((s, e["errorCode"].as_str()), (StatusCode::BAD_REQUEST, Some("InvalidURI")), "{e}");
    let page = vro.get(&t, "/api/v3/Scopes?start=1").await;
    assert_eq!((page["total"].as_u64(), page["data"].as_array().map(Vec::len)), (Some(1), Some(0)));
    assert_eq!(vro.get(&t, "/api/v13.1/Scopes").await, scopes);

    // One VM in one plan; a second plan of the same VM at the other location counts it once; an
    // empty plan counts nothing.
    let usage = |v: &Value| (v["newInstances"].as_u64(), v["managedInstances"].as_u64());
    for path in ["/api/v3/LicenseUsage/Server", "/api/v3/License/Usage/Server"] {
        let u = vro.get(&t, path).await;
        assert_eq!(keys(&u), ["managedInstances", "newInstances"]);
        assert_eq!(usage(&u), (Some(0), Some(1)), "{path}: {u}");
    }
    let again = vro
        .server
        .ok(
            &native,
            Method::POST,
            "/v1/plans",
            Some(json!({"name": "Again", "recovery_location_id": site.location,
                "groups": [{"name": "g", "vms": [{"vm_id": site.vm}]}]})),
        )
        .await;
    let again = again["id"].as_str().unwrap();
    let empty = vro.server.ok(&native, Method::POST, "/v1/plans", Some(json!({"name": "Empty", "groups": []}))).await;
    let empty = empty["id"].as_str().unwrap();
    assert_eq!(usage(&vro.get(&t, "/api/v3/License/Usage/Server").await), (Some(0), Some(1)));
    assert_eq!(usage(&vro.get(&t, &format!("/api/v3/Plans/{again}/LicenseUsage")).await), (Some(0), Some(1)));
    assert_eq!(usage(&vro.get(&t, &format!("/api/v3/Plans/{empty}/LicenseUsage")).await), (Some(0), Some(0)));
    let first_id = |list: Value| list["items"][0]["id"].as_str().unwrap().to_string();
    let host = first_id(vro.server.ok(&native, Method::GET, "/v1/hosts", None).await);
    let ds = first_id(vro.server.ok(&native, Method::GET, "/v1/datastores", None).await);
    let second = vro.server.vm(&native, &host, &ds, "second", json!({})).await;
    let both = vro
        .server
        .ok(
            &native,
            Method::POST,
            "/v1/plans",
            Some(json!({"name": "Both", "groups": [{"name": "g", "vms": [{"vm_id": site.vm}, {"vm_id": second}]}]})),
        )
        .await;
    assert_eq!(usage(&vro.get(&t, "/api/v3/LicenseUsage/Server").await), (Some(0), Some(2)));
    let both = both["id"].as_str().unwrap();
    assert_eq!(usage(&vro.get(&t, &format!("/api/v3/Plans/{both}/LicenseUsage")).await), (Some(0), Some(2)));
    let unknown = uuid::Uuid::new_v4();
    let (s, e) = vro.call(&t, Method::GET, &format!("/api/v3/Plans/{unknown}/LicenseUsage"), None).await;
    assert_eq!((s, e["resourceId"].as_str()), (StatusCode::NOT_FOUND, Some(unknown.to_string().as_str())), "{e}");
    let (s, e) = vro.raw(None, Method::GET, "/api/v3/License/Usage/Server", None).await;
    assert_eq!((s, e["errorCode"].as_str()), (StatusCode::UNAUTHORIZED, Some("InvalidToken")), "{e}");

    // The plan at the other location names it.
    let info = vro.get(&t, &format!("/api/v3/Plans/{again}")).await;
    assert_eq!(
        (info["recoveryLocationId"].as_str(), info["recoveryLocationName"].as_str()),
        (Some(site.location.as_str()), Some("Elsewhere"))
    );
    let (_, filtered) = {
        let filter = r#"[{"property":"recoveryLocationName","operator":"==","value":"Elsewhere"}]"#;
        let r = vro.server.http.get(format!("{}/api/v3/Plans", vro.base)).bearer_auth(&t).query(&[("filter", filter)]);
        let r = r.send().await.unwrap();
        (r.status(), r.json::<Value>().await.unwrap())
    };
    assert_eq!((filtered["total"].as_u64(), filtered["data"][0]["name"].as_str()), (Some(1), Some("Again")));

    // Another tenant: its own scope, not the default one, and it sees no site; no VMs.
    let acme = vro.server.ok(&native, Method::POST, "/v1/tenants", Some(json!({"name": "acme"}))).await;
    vro.server
        .ok(
            &native,
            Method::POST,
            "/v1/users",
            Some(json!({"name": "acme-admin", "password": "password1", "role": "Viewer", "tenant_id": acme["id"]})),
        )
        .await;
    let other = vro.token("ACME\\acme-admin", "password1").await;
    let scopes = vro.get(&other, "/api/v3/Scopes").await;
    assert_eq!(scopes["total"], 1);
    assert_eq!(
        (
            scopes["data"][0]["id"].as_str(),
            scopes["data"][0]["name"].as_str(),
            scopes["data"][0]["isDefault"].as_bool()
        ),
        (acme["id"].as_str(), Some("acme"), Some(false))
    );
    assert_eq!(scopes["data"][0]["siteName"], Value::Null);
    assert_eq!(usage(&vro.get(&other, "/api/v3/LicenseUsage/Server").await), (Some(0), Some(0)));
    let (s, _) = vro.call(&other, Method::GET, &format!("/api/v3/Plans/{both}/LicenseUsage"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    vro.stop().await;
}

/// Every kind of answer carries `Content-Type` and `Content-Length` (the length of the body
/// received): documents, errors of every status, the fallback's 404, 405, the token endpoint,
/// the OpenAPI document, the actions' empty 200 and seed 000's above all.
#[tokio::test]
async fn every_answer_carries_content_type_and_content_length() {
    let vro = Vro::start().await;
    let site = site(&vro).await;
    let t = vro.token("admin", common::ADMIN_PASSWORD).await;
    let plan = &site.plan;
    let unknown = uuid::Uuid::new_v4();
    let failback = format!("/api/v3/Plans/{plan}/FailbackToProduction");
    let cases: Vec<Request> = vec![
        (Some(&t), Method::GET, "/api/v3/Plans".into(), None, StatusCode::OK),
        (Some(&t), Method::GET, format!("/api/v7.2/Plans/{plan}"), None, StatusCode::OK),
        (None, Method::GET, "/api/v3/openapi.json".into(), None, StatusCode::OK),
        (Some(&t), Method::GET, "/api/v3/Scopes".into(), None, StatusCode::OK),
        (Some(&t), Method::GET, "/api/v3/LicenseUsage/Server".into(), None, StatusCode::OK),
        (Some(&t), Method::POST, format!("/api/v3/Plans/{plan}/Enable"), None, StatusCode::OK),
        (None, Method::GET, "/api/v3/Plans".into(), None, StatusCode::UNAUTHORIZED),
        (Some(&t), Method::GET, format!("/api/v3/Plans/{unknown}"), None, StatusCode::NOT_FOUND),
        (Some(&t), Method::GET, "/api/v3/Nothing/Here".into(), None, StatusCode::NOT_FOUND),
        (None, Method::GET, "/elsewhere".into(), None, StatusCode::NOT_FOUND),
        (Some(&t), Method::DELETE, "/api/v3/Plans".into(), None, StatusCode::METHOD_NOT_ALLOWED),
        (Some(&t), Method::POST, failback.clone(), Some("{"), StatusCode::BAD_REQUEST),
        (Some(&t), Method::POST, failback.clone(), Some("{}"), StatusCode::CONFLICT),
        (Some(&t), Method::POST, format!("/api/v3/Plans/{plan}/Frobnicate"), None, StatusCode::BAD_REQUEST),
        (Some(&t), Method::POST, format!("/api/v3/Plans/{plan}/Restore"), None, StatusCode::CONFLICT),
    ];
    for (token, method, path, body, status) in cases {
        let what = format!("{method} {path}");
        let (s, headers, bytes) = vro.exchange(token, method, &path, body).await;
        assert_eq!(s, status, "{what}: {}", String::from_utf8_lossy(&bytes));
        assert_content_headers(&headers, bytes.len(), "application/json", &what);
        if !bytes.is_empty() {
            serde_json::from_slice::<Value>(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }
    // The token endpoint, with a form body.
    let r = vro
        .server
        .http
        .post(format!("{}/api/token", vro.base))
        .form(&[("grant_type", "password"), ("username", "admin"), ("password", common::ADMIN_PASSWORD)])
        .send()
        .await
        .unwrap();
    let headers = r.headers().clone();
    assert_content_headers(&headers, r.bytes().await.unwrap().len(), "application/json", "POST /api/token");

    // Seed 000: FailbackToProduction answers 200 with no body, typed JSON, of length 0.
    vro.act(&t, plan, "Failover", json!({})).await;
    vro.wait_state(&t, plan, "Failover").await;
    let body = format!(r#"{{"restoreLocationId": "{NIL}", "failbackRestoreVMTags": false}}"#);
    let (s, headers, bytes) = vro.exchange(Some(&t), Method::POST, &failback, Some(&body)).await;
    assert_eq!((s, bytes.len()), (StatusCode::OK, 0));
    assert_eq!(
        (headers["content-type"].to_str().unwrap(), headers["content-length"].to_str().unwrap()),
        ("application/json", "0")
    );
    vro.stop().await;
}
