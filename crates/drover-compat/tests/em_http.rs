//! The EM dialect over real HTTP on loopback: the in-process server on SQLite with the simulated
//! hypervisor, set up through the native API, driven through the dialect's own listener.

#[path = "../../drover-api/tests/common/mod.rs"]
mod common;
mod em_common;

use std::time::Duration;

use common::Server;
use drover_compat::em::EmConfig;
use drover_types::*;
use em_common::*;
use reqwest::header::HeaderValue;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn start_a_plan_follow_its_task_to_the_session_and_every_href_resolves() {
    let server = Server::simulated().await;
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let web = replicated_vm(&server, &t, &host, &ds, "web").await;
    let db = replicated_vm(&server, &t, &host, &ds, "db").await;
    let plan_id = plan(&server, &t, "ABC Company Failover Plan", &[&web, &db]).await;
    let em = Em::start(&server, Duration::from_secs(900)).await;
    let mut emitted = Vec::new();

    // Logon: the entry point needs no session.
    let root = em.send(Method::GET, "/api/", Token::None, false, None).await;
    assert_eq!(root.status, StatusCode::OK);
    assert_eq!(count(&root.body, "SupportedVersion"), 5);
    emitted.extend(hrefs(&root.body));
    let logon = em.logon_as("admin", common::ADMIN_PASSWORD).await;
    assert_eq!(logon.status, StatusCode::CREATED);
    let token = logon.headers["X-RestSvcSessionId"].to_str().unwrap().to_string();
    assert_eq!(text(&logon.body, "UserName").as_deref(), Some("admin"));
    emitted.extend(hrefs(&logon.body));

    // The plan, both ways.
    let plans = em.ok("/api/cloud/cloudFailoverPlans", &token).await;
    assert_eq!(count(&plans, "Ref"), 1);
    let plan_href = attr(&plans, "Ref", None, "Href").unwrap();
    assert!(plan_href.ends_with(&format!("/api/cloud/cloudFailoverPlans/{plan_id}")), "{plan_href}");
    let entity = em.ok(&format!("{plan_href}?format=Entity"), &token).await;
    assert_eq!(count(&entity, "CloudFailoveredVm"), 2);
    // Each VM of the plan is a resource of its own under the plan's includes.
    let vm_href = attr(&entity, "CloudFailoveredVm", None, "Href").unwrap();
    assert!(vm_href.ends_with(&format!("/api/cloud/cloudFailoverPlans/{plan_id}/includes/{web}")), "{vm_href}");
    let vm = em.ok(&vm_href, &token).await;
    assert_eq!((text(&vm, "Name").as_deref(), text(&vm, "Order").as_deref()), (Some("web"), Some("0")), "{vm}");
    assert_eq!(count(&em.ok(&format!("{plan_href}/includes"), &token).await, "CloudFailoveredVm"), 2);
    assert_eq!(text(&entity, "Description").as_deref(), Some("web tier"));
    assert_eq!(text(&entity, "TenantName").as_deref(), Some("default"));
    emitted.extend(hrefs(&plans));
    emitted.extend(hrefs(&entity));
    let plain = em.ok(&format!("/api/failoverPlans/{plan_id}?format=Entity"), &token).await;
    assert_eq!(count(&plain, "FailoveredVm"), 2);
    emitted.extend(hrefs(&plain));

    // Start it: 202 and a finished Task that links to the session.
    let start = attr(&entity, "Link", Some("Start"), "Href").unwrap();
    let body = format!(
        r#"<CloudFailoverPlanManagementSpec xmlns="{NS}"><StartNow>true</StartNow></CloudFailoverPlanManagementSpec>"#
    );
    let task = em.send(Method::POST, &start, Token::Header(&token), false, Some(("application/xml", body))).await;
    assert_eq!(task.status, StatusCode::ACCEPTED, "{}", task.body);
    assert_eq!(text(&task.body, "TaskId").as_deref(), Some("task-1"));
    assert_eq!(text(&task.body, "Operation").as_deref(), Some("StartCloudFailoverPlan"));
    assert_eq!(text(&task.body, "State").as_deref(), Some("Finished"));
    assert_eq!(attr(&task.body, "Result", None, "Success").as_deref(), Some("true"));
    emitted.extend(hrefs(&task.body));
    let task_again = em.ok(&attr(&task.body, "Task", None, "Href").unwrap(), &token).await;
    let session_href = attr(&task_again, "Link", Some("Related"), "Href").unwrap();
    assert!(session_href.contains("/api/cloud/failoverSessions/") && session_href.ends_with("?format=Entity"));

    // The session, until it is finished.
    let done = until_stopped(&em, &session_href, &token).await;
    assert_eq!(text(&done, "Result").as_deref(), Some("Success"), "{done}");
    assert_eq!(text(&done, "JobType").as_deref(), Some("FailoverPlan"));
    assert_eq!(text(&done, "Progress").as_deref(), Some("100"));
    assert!(text(&done, "EndTimeUTC").is_some_and(|t| t.len() == 20 && t.ends_with('Z')), "{done}");
    let booted = vm_tasks(&done);
    assert_eq!(booted.len(), 2, "{done}");
    // Each VM links to the restore point it booted from (walked below with the rest).
    assert!(booted.iter().all(|t| t.point_type == "VmReplicaPointReference"), "{done}");
    let point = em.ok(&attr(&done, "VmReplicaPointLink", None, "Href").unwrap(), &token).await;
    assert_eq!(attr(&point, "EntityRef", None, "Type").as_deref(), Some("VmReplicaPointReference"));
    let mut vm_names: Vec<_> = booted.iter().map(|t| t.vm_name.as_str()).collect();
    vm_names.sort();
    assert_eq!(vm_names, ["db", "web"], "{done}");
    emitted.extend(hrefs(&done));
    let session_id = session_href.rsplit('/').next().unwrap().trim_end_matches("?format=Entity").to_string();

    // The same session through the collection, the reference and the query service.
    let list = em.ok("/api/cloud/failoverSessions", &token).await;
    assert_eq!(count(&list, "Ref"), 1);
    assert!(list.contains(&session_id));
    emitted.extend(hrefs(&list));
    let reference = em.ok(&format!("/api/cloud/failoverSessions/{session_id}"), &token).await;
    assert_eq!(attr(&reference, "EntityRef", None, "Type").as_deref(), Some("CloudFailoverSessionReference"));
    emitted.extend(hrefs(&reference));
    let query = em
        .ok(
            "/api/query?type=CloudFailoverSession&format=Entities&filter=Name%3D%3D%22ABC%20Company%20Failover%20Plan%22%3BState%3D%3DStopped%3BResult%3C%3DWarning",
            &token,
        )
        .await;
    assert_eq!(count(&query, "CloudFailoverSession"), 1, "{query}");
    emitted.extend(hrefs(&query));
    let none = em.ok("/api/query?type=CloudFailoverSession&filter=Result%3E%3DWarning", &token).await;
    assert_eq!(count(&none, "Ref"), 0, "{none}");

    // JSON mirrors the XML.
    let j = em.send(Method::GET, &session_href, Token::Header(&token), true, None).await;
    assert_eq!(j.status, StatusCode::OK);
    assert!(j.headers["content-type"].to_str().unwrap().starts_with("application/json"));
    let j = j.json();
    assert_eq!(j["State"], "Stopped");
    assert_eq!(j["Links"][0]["Rel"], "Up");
    assert_eq!(j["CloudFailoverTasks"].as_array().unwrap().len(), 2);

    // Undo through the non-cloud view: another task, another session.
    let undo = em
        .send(Method::POST, &format!("/api/failoverPlans/{plan_id}?action=undo"), Token::Cookie(&token), false, None)
        .await;
    assert_eq!(undo.status, StatusCode::ACCEPTED, "{}", undo.body);
    assert_eq!(text(&undo.body, "Operation").as_deref(), Some("UndoFailoverPlan"));
    let undo_session = attr(&undo.body, "Link", Some("Related"), "Href").unwrap();
    let undone = until_stopped(&em, &undo_session, &token).await;
    assert_eq!(text(&undone, "Result").as_deref(), Some("Success"), "{undone}");
    // An undo boots nothing: its VMs link to the points the failover it undoes booted from.
    assert_eq!(vm_tasks(&undone), booted, "{undone}");
    emitted.extend(hrefs(&undo.body));
    let tasks = em.ok("/api/tasks", &token).await;
    assert_eq!(count(&tasks, "Task"), 2);
    emitted.extend(hrefs(&tasks));
    assert_eq!(count(&em.ok("/api/cloud/failoverSessions", &token).await, "Ref"), 2);

    // Every Href emitted along the way, and every one reachable from them, answers 200.
    let walked = walk(&em, &token, emitted).await;
    assert!(walked >= 20, "only {walked} links");

    // A finished task can be deleted; then it is gone.
    let del = em.send(Method::DELETE, "/api/tasks/task-1", Token::Header(&token), false, None).await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    assert_eq!(em.get("/api/tasks/task-1", &token).await.status, StatusCode::NOT_FOUND);

    em.listener.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn logon_sessions_take_the_token_from_header_or_cookie_and_end_on_delete_or_idleness() {
    let server = Server::simulated().await;
    let em = Em::start(&server, Duration::from_millis(1500)).await;
    let logon = em.logon_as("DOMAIN\\admin", common::ADMIN_PASSWORD).await;
    assert_eq!(logon.status, StatusCode::CREATED, "{}", logon.body);
    let token = logon.headers["X-RestSvcSessionId"].to_str().unwrap().to_string();
    assert_eq!(
        logon.headers["set-cookie"],
        HeaderValue::from_str(&format!("X-RestSvcSessionId={token}; Path=/api")).unwrap()
    );
    let id = text(&logon.body, "SessionId").unwrap();
    assert!(attr(&logon.body, "Link", Some("Delete"), "Href").unwrap().ends_with(&format!("/api/logonSessions/{id}")));

    // Header, cookie, both (the cookie wins).
    let path = "/api/logonSessions";
    let get = |token| em.send(Method::GET, path, token, false, None);
    assert_eq!(get(Token::Header(&token)).await.status, StatusCode::OK);
    assert_eq!(get(Token::Cookie(&token)).await.status, StatusCode::OK);
    assert_eq!(get(Token::Both { header: "bogus", cookie: &token }).await.status, StatusCode::OK);
    assert_eq!(get(Token::Both { header: &token, cookie: "bogus" }).await.status, StatusCode::UNAUTHORIZED);
    let list = em.ok(path, &token).await;
    assert_eq!(count(&list, "LogonSession"), 1);
    assert_eq!(text(&em.ok(&format!("/api/logonSessions/{id}"), &token).await, "SessionId"), Some(id.clone()));

    // Idleness ends a session; requests keep it alive.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(em.get(path, &token).await.status, StatusCode::OK);
    }
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let expired = em.get(path, &token).await;
    assert_eq!(expired.status, StatusCode::UNAUTHORIZED);
    assert!(expired.body.contains("expired"), "{}", expired.body);

    // Delete logs off.
    let token = em.logon().await;
    let id = text(&em.ok("/api/sessionMngr/", &token).await, "SessionId").unwrap();
    let other = em.logon().await;
    let del = em.send(Method::DELETE, &format!("/api/logonSessions/{id}"), Token::Header(&token), false, None).await;
    assert_eq!(del.status, StatusCode::NO_CONTENT);
    assert_eq!(em.get(path, &token).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(em.get(path, &other).await.status, StatusCode::OK);
    let again = em.send(Method::DELETE, &format!("/api/logonSessions/{id}"), Token::Header(&other), false, None).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);

    em.listener.stop().await;
    server.stop().await;
}

/// Asserts an `Error` document with this status (XML) and returns its message.
fn error(a: &Answer, status: StatusCode) -> String {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(attr(&a.body, "Error", None, "StatusCode"), Some(status.as_u16().to_string()), "{}", a.body);
    assert!(a.body.contains(&format!("xmlns=\"{NS}\"")), "{}", a.body);
    attr(&a.body, "Error", None, "Message").unwrap()
}

#[tokio::test]
async fn bad_input_gets_the_dialects_errors_and_changes_nothing() {
    let server = Server::simulated().await;
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let web = replicated_vm(&server, &t, &host, &ds, "web").await;
    let lone = server.vm(&t, &host, &ds, "lone", json!({})).await;
    let ready = plan(&server, &t, "ready", &[&web]).await;
    let unreplicated = plan(&server, &t, "unreplicated", &[&lone]).await;
    server
        .ok(
            &t,
            Method::POST,
            "/v1/users",
            Some(json!({"name": "viewer", "password": "viewer-password", "role": "Viewer"})),
        )
        .await;
    let em = Em::start(&server, Duration::from_secs(900)).await;

    // Credentials.
    let none = em.send(Method::POST, "/api/sessionMngr/?v=latest", Token::None, false, None).await;
    error(&none, StatusCode::UNAUTHORIZED);
    assert_eq!(none.headers["www-authenticate"], "Basic Realm=RestSvc");
    let wrong = em.logon_as("admin", "wrong-password").await;
    error(&wrong, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.headers["www-authenticate"], "Basic Realm=RestSvc");
    error(&em.logon_as("nobody", "whatever-password").await, StatusCode::UNAUTHORIZED);
    let version = em.http.post(em.url("/api/sessionMngr/?v=v0_1")).basic_auth("admin", Some(common::ADMIN_PASSWORD));
    let version = version.send().await.unwrap();
    assert_eq!(version.status(), StatusCode::BAD_REQUEST);
    for path in ["/api/cloud/failoverSessions", "/api/tasks", "/api/query?type=Task", "/api/logonSessions"] {
        error(&em.send(Method::GET, path, Token::None, false, None).await, StatusCode::UNAUTHORIZED);
        error(&em.get(path, "not-a-session").await, StatusCode::UNAUTHORIZED);
    }

    let token = em.logon().await;
    // Unknown ids, malformed ids, a session that is not a plan's, unknown routes.
    let vm_session =
        server.ok(&t, Method::GET, "/v1/sessions", None).await["items"][0]["id"].as_str().unwrap().to_string();
    let unknown = uuid::Uuid::new_v4();
    for path in [
        format!("/api/cloud/failoverSessions/{unknown}"),
        "/api/cloud/failoverSessions/not-a-uuid".to_string(),
        format!("/api/cloud/failoverSessions/{vm_session}"),
        format!("/api/cloud/cloudFailoverPlans/{unknown}"),
        format!("/api/failoverPlans/{unknown}?format=Entity"),
        format!("/api/backupServers/{unknown}"),
        "/api/tasks/task-99".to_string(),
        "/api/tasks/99".to_string(),
        format!("/api/logonSessions/{unknown}"),
        format!("/api/vmReplicaPoints/{unknown}"),
        "/api/nothing/here".to_string(),
    ] {
        error(&em.get(&path, &token).await, StatusCode::NOT_FOUND);
    }
    let post_unknown = em
        .send(
            Method::POST,
            &format!("/api/cloud/cloudFailoverPlans/{unknown}?action=start"),
            Token::Header(&token),
            false,
            None,
        )
        .await;
    error(&post_unknown, StatusCode::NOT_FOUND);
    error(
        &em.send(Method::PUT, "/api/tasks", Token::Header(&token), false, None).await,
        StatusCode::METHOD_NOT_ALLOWED,
    );
    error(&em.get("/api/cloud/failoverSessions?format=Everything", &token).await, StatusCode::BAD_REQUEST);

    // Malformed bodies and actions.
    let start = format!("/api/cloud/cloudFailoverPlans/{ready}?action=start");
    for (content_type, body) in [
        (
            "application/xml",
            "<CloudFailoverPlanManagementSpec><StartNow>maybe</StartNow></CloudFailoverPlanManagementSpec>",
        ),
        ("application/xml", "<CloudFailoverPlanManagementSpec><StartNow>true</StartNo"),
        ("application/xml", "<FailoverPlanSpec><StartNow>true</StartNow></FailoverPlanSpec>"),
        ("text/plain", "start please"),
        (
            "application/xml",
            "<CloudFailoverPlanManagementSpec><StartDate>yesterday</StartDate></CloudFailoverPlanManagementSpec>",
        ),
        (
            "application/xml",
            "<CloudFailoverPlanManagementSpec><StartNow>false</StartNow></CloudFailoverPlanManagementSpec>",
        ),
        ("application/json", "{\"StartNow\": "),
        ("application/json", "{\"StartNow\": \"yes\"}"),
    ] {
        let a =
            em.send(Method::POST, &start, Token::Header(&token), false, Some((content_type, body.to_string()))).await;
        let message = error(&a, StatusCode::BAD_REQUEST);
        assert!(
            message.contains("StartNow") || message.contains("StartDate") || message.contains("malformed"),
            "{message}"
        );
    }
    for action in ["", "?action=fly", "?action=test"] {
        let path = format!("/api/failoverPlans/{ready}{action}");
        error(&em.send(Method::POST, &path, Token::Header(&token), false, None).await, StatusCode::BAD_REQUEST);
    }

    // Malformed filters say where they broke; bad query parameters are 400.
    let q = |query: &str| {
        let path = format!("/api/query?{query}");
        let (em, token) = (&em, &token);
        async move { em.get(&path, token).await }
    };
    let message =
        error(&q("type=CloudFailoverSession&filter=State%3D%3DWorking%3B(Name%3D%3Dx").await, StatusCode::BAD_REQUEST);
    assert!(message.contains("character 24"), "{message}");
    let message = error(&q("type=CloudFailoverSession&filter=Colour%3D%3Dred").await, StatusCode::BAD_REQUEST);
    assert!(message.contains("character 1") && message.contains("Colour"), "{message}");
    let message = error(&q("type=CloudFailoverSession&filter=Result%3D%3DGreat").await, StatusCode::BAD_REQUEST);
    assert!(message.contains("character 9"), "{message}");
    for query in
        ["", "type=Vm", "type=Task&format=All", "type=Task&sortAsc=Colour", "type=Task&pageSize=0", "type=Task&page=2"]
    {
        error(&q(query).await, StatusCode::BAD_REQUEST);
    }

    // Actions illegal in the plan's state, or without replicas: 409.
    for (plan, action) in [(&ready, "undo"), (&unreplicated, "start"), (&unreplicated, "test")] {
        let path = format!("/api/cloud/cloudFailoverPlans/{plan}?action={action}");
        error(&em.send(Method::POST, &path, Token::Header(&token), false, None).await, StatusCode::CONFLICT);
    }

    // A viewer may look but not act: 403, in JSON when asked for.
    let viewer = em.logon_as("viewer", "viewer-password").await;
    let viewer = viewer.headers["X-RestSvcSessionId"].to_str().unwrap().to_string();
    assert_eq!(em.get("/api/cloud/cloudFailoverPlans", &viewer).await.status, StatusCode::OK);
    let forbidden = em.send(Method::POST, &start, Token::Header(&viewer), true, None).await;
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    let j = forbidden.json();
    assert_eq!((j["StatusCode"].clone(), j["Status"].clone()), (json!(403), json!("Forbidden")), "{j}");
    assert!(j["Message"].as_str().unwrap().contains("PlanOperator"));
    let deleted =
        em.send(Method::DELETE, &format!("/api/failoverPlans/{ready}"), Token::Header(&viewer), false, None).await;
    error(&deleted, StatusCode::FORBIDDEN);

    // After all of that, nothing changed: no plan session, no task, both plans as they were.
    assert_eq!(count(&em.ok("/api/cloud/failoverSessions", &token).await, "Ref"), 0);
    assert_eq!(count(&em.ok("/api/tasks", &token).await, "Task"), 0);
    for id in [&ready, &unreplicated] {
        let p = server.ok(&t, Method::GET, &format!("/v1/plans/{id}"), None).await;
        assert_eq!(p["state"], "NeedsVerified", "{p}");
    }

    em.listener.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn the_query_service_filters_sorts_and_pages_with_links_that_resolve() {
    let server = Server::simulated().await;
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let vm = server.vm(&t, &host, &ds, "app", json!({})).await;
    for name in ["alpha", "bravo", "charlie"] {
        plan(&server, &t, name, &[&vm]).await;
    }
    let em = Em::start(&server, Duration::from_secs(900)).await;
    let token = em.logon().await;

    let page1 = em.ok("/api/query?type=FailoverPlan&sortDesc=Name&pageSize=2&page=1", &token).await;
    assert_eq!(count(&page1, "Ref"), 2);
    assert!(page1.find("charlie").unwrap() < page1.find("bravo").unwrap(), "{page1}");
    assert_eq!(attr(&page1, "PagingInfo", None, "PagesCount").as_deref(), Some("2"));
    assert!(attr(&page1, "Link", Some("Previous"), "Href").is_none());
    let next = attr(&page1, "Link", Some("Next"), "Href").unwrap();
    let page2 = em.ok(&next, &token).await;
    assert_eq!(count(&page2, "Ref"), 1);
    assert!(page2.contains("alpha") && !page2.contains("bravo"), "{page2}");
    assert!(attr(&page2, "Link", Some("Next"), "Href").is_none());
    assert_eq!(attr(&page2, "Link", Some("Last"), "Href"), Some(next));
    walk(&em, &token, hrefs(&page1)).await;

    let filtered = em
        .ok("/api/query?type=CloudFailoverPlan&format=Entities&filter=(Name%3D%3Dalpha%2CName%3D%3D%22CHARLIE%22)&sortAsc=Name", &token)
        .await;
    assert_eq!(count(&filtered, "CloudFailoverPlan"), 2, "{filtered}");
    assert!(filtered.find("alpha").unwrap() < filtered.find("charlie").unwrap());
    let j = em
        .send(Method::GET, "/api/query?type=FailoverPlan&filter=Name!%3Dalpha", Token::Header(&token), true, None)
        .await
        .json();
    assert_eq!(j["Refs"].as_array().unwrap().len(), 2, "{j}");
    assert_eq!(count(&em.ok("/api/query?type=Task", &token).await, "Ref"), 0);

    em.listener.stop().await;
    server.stop().await;
}

/// Whitespace between elements and before `/>` does not count.
fn normalise(xml: &str) -> String {
    xml.lines().map(str::trim).collect::<String>().replace(" />", "/>")
}

/// Seed 002 end to end: a session of the seed's content, stored, served on `localhost:9399` by a
/// dialect configured with the seed's backup server, reproduces both documents of the seed.
/// Older than 30 days, it is not in the collection, but the query service finds it.
#[tokio::test]
async fn seed_002_is_served_exactly() {
    let server = Server::simulated().await;
    let store = server.app.engine().store();
    let tenant = store.user_by_name("admin").await.unwrap().unwrap().0.tenant_id;
    let mut s = Session::new(
        tenant,
        SessionKind::PlanFailover,
        "ABC Company Failover Plan",
        SessionTarget::Plan(PlanId::new()),
        json!({}),
    );
    s.id = "475420ee-d045-4493-9869-0a970e08f6f9".parse().unwrap();
    let at = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&chrono::Utc);
    s.created_at = at("2015-12-07T17:38:16.123Z");
    s.ended_at = Some(at("2015-12-07T17:39:36.500Z"));
    s.state = SessionState::Stopped;
    s.result = SessionResult::Success;
    s.progress = 100;
    store.session_insert(&s, &[]).await.unwrap();

    let config = EmConfig {
        scheme: "http",
        backup_server_id: "8fff3b8e-c3f1-4ef5-aecc-561f07bf9982".parse().unwrap(),
        backup_server_name: "172.17.53.48".into(),
        ..EmConfig::default()
    };
    let listener = drover_api::listen(
        drover_compat::em::router_with(server.app.clone(), config),
        "127.0.0.1:0".parse().unwrap(),
        drover_api::Tls::Plain,
    )
    .await
    .unwrap();
    let em = Em { base: listener.url(), http: reqwest::Client::new(), listener };
    let token = em.logon().await;
    let golden = |name: &str| {
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/em").join(name))
            .unwrap()
    };
    for (path, seed) in [
        ("/api/cloud/failoverSessions/475420ee-d045-4493-9869-0a970e08f6f9", "seed002_entity_ref.xml"),
        ("/api/cloud/failoverSessions/475420ee-d045-4493-9869-0a970e08f6f9?format=Entity", "seed002_entity.xml"),
    ] {
        let resp = em
            .http
            .get(em.url(path))
            .header("Host", "localhost:9399")
            .header("X-RestSvcSessionId", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/xml"));
        assert_eq!(normalise(&resp.text().await.unwrap()), normalise(&golden(seed)), "{path}");
    }
    assert_eq!(count(&em.ok("/api/cloud/failoverSessions", &token).await, "Ref"), 0);
    let found = em.ok("/api/query?type=CloudFailoverSession&filter=CreationTime%3C2016-01-01", &token).await;
    assert_eq!(count(&found, "Ref"), 1, "{found}");

    em.listener.stop().await;
    server.stop().await;
}

/// A test failover asked for in JSON answers in JSON, and its session is a failover session too.
#[tokio::test]
async fn a_test_failover_in_json() {
    let server = Server::simulated().await;
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let web = replicated_vm(&server, &t, &host, &ds, "web").await;
    let plan_id = plan(&server, &t, "p", &[&web]).await;
    let em = Em::start(&server, Duration::from_secs(900)).await;
    let token = em.logon().await;

    let path = format!("/api/cloud/cloudFailoverPlans/{plan_id}?action=test");
    let body = Some(("application/json", r#"{"StartNow": true}"#.to_string()));
    let task = em.send(Method::POST, &path, Token::Header(&token), true, body).await;
    assert_eq!(task.status, StatusCode::ACCEPTED, "{}", task.body);
    let task = task.json();
    assert_eq!(task["Operation"], "TestCloudFailoverPlan");
    assert_eq!(task["Result"]["Success"], true);
    let related = task["Links"].as_array().unwrap().iter().find(|l| l["Rel"] == "Related").unwrap();
    let done = until_stopped(&em, related["Href"].as_str().unwrap(), &token).await;
    assert_eq!(text(&done, "Result").as_deref(), Some("Success"), "{done}");
    assert_eq!(text(&done, "JobType").as_deref(), Some("FailoverPlan"));
    let vms = vm_tasks(&done);
    assert_eq!(vms.len(), 1, "{done}");
    assert_eq!(vms[0].point_type, "VmReplicaPointReference", "{done}");
    // A test leaves the plan as it was.
    let p = server.ok(&t, Method::GET, &format!("/v1/plans/{plan_id}"), None).await;
    assert_eq!(p["state"], "NeedsVerified", "{p}");
    let list = em.send(Method::GET, "/api/cloud/failoverSessions", Token::Header(&token), true, None).await.json();
    assert_eq!(list["Refs"].as_array().unwrap().len(), 1, "{list}");

    em.listener.stop().await;
    server.stop().await;
}

/// The HTTPS listener and the legacy plain-HTTP one are one service: a logon on one works on the
/// other, and each writes its own scheme into its links.
#[tokio::test]
async fn both_listeners_share_logon_sessions_and_differ_only_in_their_links() {
    let server = Server::simulated().await;
    let state = drover_compat::em::EmState::new(server.app.clone(), EmConfig::default());
    let mut ems = Vec::new();
    for scheme in ["https", "http"] {
        let listener =
            drover_api::listen(state.router_for_scheme(scheme), "127.0.0.1:0".parse().unwrap(), drover_api::Tls::Plain)
                .await
                .unwrap();
        ems.push(Em { base: listener.url(), http: reqwest::Client::new(), listener });
    }
    let token = ems[0].logon().await;
    for (em, scheme) in ems.iter().zip(["https", "http"]) {
        let body = em.ok("/api/logonSessions", &token).await;
        assert_eq!(count(&body, "LogonSession"), 1, "{body}");
        let links = hrefs(&body);
        assert!(!links.is_empty() && links.iter().all(|h| h.starts_with(&format!("{scheme}://"))), "{links:?}");
    }
    let other = ems[1].logon().await;
    assert_eq!(count(&ems[0].ok("/api/logonSessions", &other).await, "LogonSession"), 2, "both of admin's logons");
    for em in ems {
        em.listener.stop().await;
    }
    server.stop().await;
}

/// A PUT on a plan's Edit link changes its description (XML or JSON), answers 202 with no body,
/// and refuses plan commands drover would not run, changing nothing.
#[tokio::test]
async fn a_plan_is_edited_through_its_edit_link() {
    let server = Server::simulated().await;
    let em = Em::start(&server, Duration::from_secs(60)).await;
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let vm = server.vm(&t, &host, &ds, "web", json!({})).await;
    let plan_id = plan(&server, &t, "Web", &[&vm]).await;
    let token = em.logon().await;
    let entity = em.ok(&format!("/api/cloud/cloudFailoverPlans/{plan_id}?format=Entity"), &token).await;
    let edit = attr(&entity, "Link", Some("Edit"), "Href").unwrap();
    assert!(edit.ends_with(&format!("/api/cloud/cloudFailoverPlans/{plan_id}")), "{edit}");
    let description = |path: String| {
        let em = &em;
        let token = token.clone();
        async move { text(&em.ok(&format!("{path}?format=Entity"), &token).await, "Description") }
    };
    let put = |path: String, content_type: &'static str, body: String| {
        let em = &em;
        let token = token.clone();
        async move { em.send(Method::PUT, &path, Token::Header(&token), false, Some((content_type, body))).await }
    };

    // XML on the plain view, JSON on the cloud one.
    let plain = format!("/api/failoverPlans/{plan_id}");
    let xml = format!(r#"<FailoverPlan xmlns="{NS}"><Description>the shop's web tier</Description></FailoverPlan>"#);
    let a = put(plain.clone(), "application/xml", xml).await;
    assert_eq!((a.status, a.body.as_str()), (StatusCode::ACCEPTED, ""));
    assert_eq!(description(plain.clone()).await.as_deref(), Some("the shop's web tier"));
    let body = json!({"Description": "web", "CloudFailoverPlanOptions": {"PreFailoverPlanCommandEnabled": false}});
    let a = put(edit.clone(), "application/json", body.to_string()).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "{}", a.body);
    assert_eq!(description(edit.clone()).await.as_deref(), Some("web"));

    // Refused, and nothing changes: a plan command, the wrong document, an unknown plan.
    let commands = format!(
        r#"<CloudFailoverPlan xmlns="{NS}"><Description>x</Description><CloudFailoverPlanOptions><PreFailoverPlanCommandEnabled>true</PreFailoverPlanCommandEnabled><PreFailoverPlanCommand>C:\pre.bat</PreFailoverPlanCommand></CloudFailoverPlanOptions></CloudFailoverPlan>"#
    );
    let a = put(edit.clone(), "application/xml", commands).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.body.contains("pre- or post-failover plan commands"), "{}", a.body);
    let wrong = format!(
        r#"<CloudFailoverPlanManagementSpec xmlns="{NS}"><StartNow>true</StartNow></CloudFailoverPlanManagementSpec>"#
    );
    let a = put(edit.clone(), "application/xml", wrong).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    assert!(a.body.contains("not CloudFailoverPlan"), "{}", a.body);
    let unknown = format!("/api/failoverPlans/{}", uuid::Uuid::new_v4());
    assert_eq!(put(unknown, "application/xml", "<FailoverPlan/>".into()).await.status, StatusCode::NOT_FOUND);
    assert_eq!(description(edit).await.as_deref(), Some("web"));
    let sessions = em.ok("/api/cloud/failoverSessions", &token).await;
    assert_eq!(count(&sessions, "Ref"), 0, "an edit starts nothing");

    em.listener.stop().await;
    server.stop().await;
}

/// Paths match in any case, as Enterprise Manager's do (clients generated from its schema call
/// `/api/Tasks`); and `Href`s are built from the request's authority over HTTP/2 as over
/// HTTP/1.1 (HTTP/2 sends `:authority`, no `Host`).
#[tokio::test]
async fn paths_match_in_any_case_and_hrefs_follow_the_authority_over_http2() {
    let server = Server::simulated().await;
    let em = Em::start(&server, Duration::from_secs(900)).await;
    let token = em.logon().await;
    for path in [
        "/api/Tasks",
        "/API/BackupServers",
        "/api/FailoverPlans",
        "/api/Cloud/CloudFailoverPlans",
        "/Api/LogonSessions",
    ] {
        let a = em.get(path, &token).await;
        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.body);
    }
    let a = em.get("/api/NoSuchThing", &token).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.body);

    // HTTP/2 with prior knowledge on the plain listener (curl: reqwest is built without HTTP/2).
    let out = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--http2-prior-knowledge", "--max-time", "20"])
        .args(["--write-out", "\n%{http_version} %{http_code}"])
        .arg("--header")
        .arg(format!("X-RestSvcSessionId: {token}"))
        .arg(em.url("/api/BackupServers"))
        .output()
        .await
        .expect("curl (scripts/install-deps installs it)");
    assert!(out.status.success(), "{out:?}");
    let body = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(body.trim_end().ends_with("2 200"), "not an HTTP/2 200: {body}");
    let hrefs = hrefs(&body);
    assert!(!hrefs.is_empty(), "{body}");
    for href in &hrefs {
        assert!(href.starts_with(&format!("{}/api/", em.base)), "{href} does not name {}", em.base);
    }
    em.listener.stop().await;
    server.stop().await;
}

/// Behind a proxy: with an external base URL configured, every `Href` starts with it (path
/// included), whatever the request's `Host` says, on both listeners; and a path that the proxy
/// maps back resolves on the dialect.
#[tokio::test]
async fn a_configured_external_url_is_the_base_of_every_href() {
    let server = Server::simulated().await;
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let web = replicated_vm(&server, &t, &host, &ds, "web").await;
    plan(&server, &t, "p", &[&web]).await;
    let external = "https://dr.example.com:4443/veeam";
    let config = EmConfig { external_base_url: Some(format!("{external}/").parse().unwrap()), ..EmConfig::default() };
    let state = drover_compat::em::EmState::new(server.app.clone(), config);
    let listener =
        drover_api::listen(state.router_for_scheme("http"), "127.0.0.1:0".parse().unwrap(), drover_api::Tls::Plain)
            .await
            .unwrap();
    let em = Em { base: listener.url(), http: reqwest::Client::new(), listener };
    let token = em.logon().await;
    let mut links = Vec::new();
    for path in [
        "/api/",
        "/api/sessionMngr/",
        "/api/cloud/cloudFailoverPlans?format=Entity",
        "/api/failoverPlans?format=Entity",
        "/api/backupServers?format=Entity",
        "/api/query?type=CloudFailoverPlan&format=Entities",
    ] {
        let a = em
            .http
            .get(em.url(path))
            .header("Host", "internal.invalid:9398")
            .header("X-RestSvcSessionId", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(a.status(), StatusCode::OK, "{path}");
        links.extend(hrefs(&a.text().await.unwrap()));
    }
    assert!(links.len() > 20, "{links:?}");
    for link in &links {
        let rest = link.strip_prefix(&format!("{external}/api/")).unwrap_or_else(|| panic!("{link}"));
        // What the proxy forwards: the path after the external base, on the dialect's listener.
        if !rest.contains("action=") {
            let a = em.get(&format!("/api/{rest}"), &token).await;
            assert_eq!(a.status, StatusCode::OK, "{link}: {}", a.body);
        }
    }
    // The root names itself with the external URL too.
    let root = em.send(Method::GET, "/api/", Token::None, false, None).await;
    assert_eq!(attr(&root.body, "EnterpriseManager", None, "Href").as_deref(), Some(&*format!("{external}/api/")));
    em.listener.stop().await;
    server.stop().await;
}

/// A request and the status it gets: method, path, logon session, body, status.
type EmRequest<'a> = (Method, String, Token<'a>, Option<(&'a str, String)>, StatusCode);

/// Every kind of answer carries `Content-Type` (the format `Accept` chose) and `Content-Length`
/// (the length of the body received): documents, the logon's 201, errors of every status, the
/// fallback's 404, 405, an accepted edit's empty 202. A 204 carries neither, nor a body (RFC 9110
/// forbids `Content-Length` on it).
#[tokio::test]
async fn every_answer_carries_content_type_and_content_length() {
    let server = Server::simulated().await;
    let em = Em::start(&server, Duration::from_secs(60)).await;
    let t = server.admin().await;
    let (host, ds) = server.infrastructure(&t).await;
    let vm = server.vm(&t, &host, &ds, "web", json!({})).await;
    let plan_id = plan(&server, &t, "Web", &[&vm]).await;
    let check = |a: &Answer, status: StatusCode, json: bool, what: &str| {
        assert_eq!(a.status, status, "{what}: {}", a.body);
        let media = if json { "application/json" } else { "application/xml" };
        let content_type = a.headers.get("content-type").map(|v| v.to_str().unwrap());
        assert!(content_type.is_some_and(|t| t.starts_with(media)), "{what}: Content-Type {content_type:?}");
        let length = a.headers.get("content-length").map(|v| v.to_str().unwrap().parse::<usize>().unwrap());
        assert_eq!(length, Some(a.body.len()), "{what}: Content-Length");
    };

    let logon = em.logon_as("admin", common::ADMIN_PASSWORD).await;
    check(&logon, StatusCode::CREATED, false, "logon");
    let token = logon.headers["X-RestSvcSessionId"].to_str().unwrap().to_string();
    let xml = format!(r#"<FailoverPlan xmlns="{NS}"><Description>shop</Description></FailoverPlan>"#);
    for json in [false, true] {
        let cases: Vec<EmRequest> = vec![
            (Method::GET, "/api/".into(), Token::None, None, StatusCode::OK),
            (Method::GET, "/api/backupServers".into(), Token::Header(&token), None, StatusCode::OK),
            (Method::GET, "/api/Tasks".into(), Token::Header(&token), None, StatusCode::OK),
            (Method::GET, "/api/backupServers".into(), Token::None, None, StatusCode::UNAUTHORIZED),
            (Method::GET, "/api/nothing/here".into(), Token::Header(&token), None, StatusCode::NOT_FOUND),
            (Method::GET, "/elsewhere".into(), Token::None, None, StatusCode::NOT_FOUND),
            (Method::DELETE, "/api/backupServers".into(), Token::Header(&token), None, StatusCode::METHOD_NOT_ALLOWED),
            (
                Method::PUT,
                format!("/api/failoverPlans/{plan_id}"),
                Token::Header(&token),
                Some(("application/xml", xml.clone())),
                StatusCode::ACCEPTED,
            ),
            (
                Method::PUT,
                format!("/api/failoverPlans/{plan_id}"),
                Token::Header(&token),
                Some(("application/xml", "<FailoverPlan".into())),
                StatusCode::BAD_REQUEST,
            ),
        ];
        for (method, path, token, body, status) in cases {
            let what = format!("{method} {path} (JSON: {json})");
            let a = em.send(method, &path, token, json, body).await;
            check(&a, status, json, &what);
            if status == StatusCode::ACCEPTED {
                assert_eq!(a.body, "", "{what}");
            }
        }
    }

    // 204: no body, no Content-Length, no Content-Type.
    let id = text(&em.ok("/api/sessionMngr/", &token).await, "SessionId").unwrap();
    let del = em.send(Method::DELETE, &format!("/api/logonSessions/{id}"), Token::Header(&token), false, None).await;
    assert_eq!((del.status, del.body.as_str()), (StatusCode::NO_CONTENT, ""));
    assert!(
        del.headers.get("content-length").is_none() && del.headers.get("content-type").is_none(),
        "{:?}",
        del.headers
    );

    em.listener.stop().await;
    server.stop().await;
}
