//! Golden documents of every EM representation, XML and JSON, in `tests/golden/em/`: they are
//! the dialect's documentation by example. Seed 002's two documents are reproduced exactly
//! (whitespace between elements aside) from a session of the same content.
//!
//! `UPDATE_GOLDEN=1 cargo test -p drover-compat --test em_golden` rewrites the files; review the
//! diff before committing it.

use std::path::PathBuf;

use chrono::TimeZone;
use drover_compat::em::render::{Element, error_element};
use drover_compat::em::tasks::Tasks;
use drover_compat::em::views::{self, BackupServer, Ctx, PlanKind, PlanView, PointLink, Shape};
use drover_types::*;
use uuid::Uuid;

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/em").join(name)
}

/// Compares a document with its golden file (rewriting it under `UPDATE_GOLDEN=1`).
fn golden(name: &str, actual: &str) {
    let path = golden_path(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, format!("{actual}\n")).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(actual, expected.trim_end(), "{name} differs from its golden file");
}

/// Both renderings of an element.
fn golden_both(stem: &str, e: &Element) {
    golden(&format!("{stem}.xml"), &e.to_xml());
    golden(&format!("{stem}.json"), &serde_json::to_string_pretty(e).unwrap());
}

/// Whitespace between elements and before `/>` does not count.
fn normalise(xml: &str) -> String {
    let mut out = String::new();
    for line in xml.lines() {
        out.push_str(line.trim());
    }
    out.replace(" />", "/>")
}

fn at(s: &str) -> Timestamp {
    chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&chrono::Utc)
}

/// The context of the seed's examples: `localhost:9399` and its backup server.
fn seed_ctx() -> Ctx {
    Ctx {
        base: "http://localhost:9399".into(),
        server: BackupServer {
            id: "8fff3b8e-c3f1-4ef5-aecc-561f07bf9982".parse().unwrap(),
            name: "172.17.53.48".into(),
            port: 9392,
        },
    }
}

fn seed_session() -> Session {
    let mut s = Session::new(
        TenantId(Uuid::nil()),
        SessionKind::PlanFailover,
        "ABC Company Failover Plan",
        SessionTarget::Plan(PlanId(Uuid::nil())),
        serde_json::json!({}),
    );
    s.id = "475420ee-d045-4493-9869-0a970e08f6f9".parse().unwrap();
    s.created_at = at("2015-12-07T17:38:16.250Z");
    s.ended_at = Some(at("2015-12-07T17:39:36.999Z"));
    s.state = SessionState::Stopped;
    s.result = SessionResult::Success;
    s.progress = 100;
    s
}

#[test]
fn seed_002_is_reproduced_exactly() {
    let ctx = seed_ctx();
    let s = seed_session();
    let reference = views::cloud_failover_session(&ctx, &s, &[], &[], Shape::EntityRef).to_xml();
    let entity = views::cloud_failover_session(&ctx, &s, &[], &[], Shape::Entity).to_xml();
    let seed_ref = std::fs::read_to_string(golden_path("seed002_entity_ref.xml")).unwrap();
    let seed_entity = std::fs::read_to_string(golden_path("seed002_entity.xml")).unwrap();
    assert_eq!(normalise(&reference), normalise(&seed_ref));
    assert_eq!(normalise(&entity), normalise(&seed_entity));
    // And the rendering itself is pinned, indentation included.
    golden("cloud_failover_session_seed_ref.xml", &reference);
    golden("cloud_failover_session_seed.xml", &entity);
}

fn tasks_of(s: &Session) -> Vec<Task> {
    let mut web = s.task(Some(VmId(Uuid::from_u128(0xa1))), "web");
    web.id = TaskId(Uuid::from_u128(0xb1));
    web.state = SessionState::Stopped;
    web.result = SessionResult::Success;
    web.progress = 100;
    web.ended_at = Some(at("2026-11-22T10:01:05Z"));
    let mut db = s.task(Some(VmId(Uuid::from_u128(0xa2))), "db");
    db.id = TaskId(Uuid::from_u128(0xb2));
    db.state = SessionState::Working;
    db.progress = 40;
    vec![web, db]
}

fn running_session() -> Session {
    let mut s = Session::new(
        TenantId(Uuid::nil()),
        SessionKind::PlanFailover,
        "ABC Company Failover Plan",
        SessionTarget::Plan(PlanId(Uuid::from_u128(0xc1))),
        serde_json::json!({}),
    );
    s.id = SessionId(Uuid::from_u128(0x5e55));
    s.created_at = at("2026-11-22T10:00:00Z");
    s.state = SessionState::Working;
    s.progress = 70;
    s
}

fn ctx() -> Ctx {
    Ctx {
        base: "https://drover.example:9398".into(),
        server: BackupServer { id: drover_compat::em::default_backup_server_id(), name: "drover".into(), port: 8443 },
    }
}

#[test]
fn a_running_session_has_no_end_and_no_result_and_one_task_per_vm() {
    let s = running_session();
    // The VM that has booted links to its restore point.
    let points = [PointLink {
        task_id: TaskId(Uuid::from_u128(0xb1)),
        point_id: RestorePointId(Uuid::from_u128(0xd1)),
        name: "web_replica".into(),
    }];
    let e = views::cloud_failover_session(&ctx(), &s, &tasks_of(&s), &points, Shape::Entity);
    let xml = e.to_xml();
    assert!(xml.contains("<Result>None</Result>") && !xml.contains("<EndTimeUTC>2026-11-22T10:00"), "{xml}");
    golden_both("cloud_failover_session_running", &e);
    golden_both("cloud_failover_session_ref", &views::cloud_failover_session(&ctx(), &s, &[], &[], Shape::EntityRef));
}

#[test]
fn a_failed_session_says_why() {
    let mut s = running_session();
    s.state = SessionState::Stopped;
    s.result = SessionResult::Failed;
    s.progress = 100;
    s.ended_at = Some(at("2026-11-22T10:02:00Z"));
    s.failure_message = Some("web_replica: TCP port 23 is closed".into());
    let mut tasks = tasks_of(&s);
    tasks[1].state = SessionState::Stopped;
    tasks[1].result = SessionResult::Failed;
    tasks[1].ended_at = s.ended_at;
    tasks[1].failure_message = s.failure_message.clone();
    golden_both(
        "cloud_failover_session_failed",
        &views::cloud_failover_session(&ctx(), &s, &tasks, &[], Shape::Entity),
    );
}

#[test]
fn collections_are_entity_references_or_plural_entities() {
    let s = running_session();
    let refs = vec![views::cloud_failover_session(&ctx(), &s, &[], &[], Shape::Ref)];
    golden_both("cloud_failover_sessions", &views::collection(Shape::Ref, "CloudFailoverSessions", refs));
    let entities = vec![views::cloud_failover_session(&ctx(), &s, &tasks_of(&s), &[], Shape::Entity)];
    golden_both(
        "cloud_failover_sessions_entities",
        &views::collection(Shape::Entity, "CloudFailoverSessions", entities),
    );
}

fn plan_view() -> PlanView {
    let vm = |n: u128| VmId(Uuid::from_u128(n));
    let plan = Plan {
        id: PlanId(Uuid::from_u128(0xc1)),
        tenant_id: TenantId(Uuid::from_u128(0x7e)),
        name: "ABC Company Failover Plan".into(),
        description: "web then db".into(),
        enabled: true,
        lifecycle: PlanLifecycle::default(),
        recovery_location_id: RecoveryLocationId::ORIGINAL,
        groups: vec![PlanGroup {
            id: PlanGroupId(Uuid::from_u128(0x90)),
            name: "g".into(),
            mode: GroupMode::Sequential,
            delay_secs: 0,
            critical: true,
            restore_tags: false,
            vms: vec![PlanVm { vm_id: vm(0xa1), steps: vec![] }, PlanVm { vm_id: vm(0xa2), steps: vec![] }],
        }],
        created_at: chrono::Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
        updated_at: chrono::Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap(),
    };
    PlanView { plan, tenant_name: "ABC Company".into(), vms: vec![(vm(0xa1), "web".into()), (vm(0xa2), "db".into())] }
}

#[test]
fn plans_as_cloud_failover_plans_and_as_failover_plans() {
    let v = plan_view();
    golden_both("cloud_failover_plan", &views::plan(&ctx(), &v, PlanKind::Cloud, Shape::Entity));
    golden_both("cloud_failover_plan_ref", &views::plan(&ctx(), &v, PlanKind::Cloud, Shape::EntityRef));
    golden_both("failover_plan", &views::plan(&ctx(), &v, PlanKind::Plain, Shape::Entity));
    golden_both("failover_plan_ref", &views::plan(&ctx(), &v, PlanKind::Plain, Shape::EntityRef));
    golden_both("cloud_failover_plan_vms", &views::plan_vms(&ctx(), &v, PlanKind::Cloud));
    golden_both("failover_plan_vms", &views::plan_vms(&ctx(), &v, PlanKind::Plain));
    let (vm, name) = &v.vms[1];
    golden_both("cloud_failover_plan_vm", &views::plan_vm(&ctx(), v.plan.id, PlanKind::Cloud, 1, *vm, name));
    golden_both("failover_plan_vm", &views::plan_vm(&ctx(), v.plan.id, PlanKind::Plain, 1, *vm, name));
}

#[test]
fn tasks_link_to_their_session_once_finished() {
    let tasks = Tasks::default();
    let t = tasks.finished(
        TenantId(Uuid::nil()),
        "StartCloudFailoverPlan",
        "ABC Company Failover Plan",
        SessionId(Uuid::from_u128(0x5e55)),
    );
    let e = views::task(&ctx(), &t);
    assert!(e.to_xml().contains(r#"Rel="Related" Type="CloudFailoverSession""#));
    golden_both("task", &e);
    golden_both("tasks", &views::tasks(&ctx(), std::slice::from_ref(&t)));
    golden_both("task_ref", &views::task_ref(&ctx(), &t));
}

#[test]
fn logon_documents() {
    golden_both("enterprise_manager", &views::enterprise_manager(&ctx()));
    let id = Uuid::from_u128(0x10);
    golden_both("logon_session", &views::logon_session(&ctx(), id, "admin"));
    golden_both("logon_sessions", &views::logon_sessions(&ctx(), &[(id, "admin".into())]));
}

#[test]
fn the_backup_server_is_the_control_plane() {
    golden_both("backup_server_ref", &views::backup_server(&ctx(), Shape::EntityRef));
    golden_both("backup_server", &views::backup_server(&ctx(), Shape::Entity));
    golden_both(
        "backup_servers",
        &views::collection(Shape::Ref, "BackupServers", vec![views::backup_server(&ctx(), Shape::Ref)]),
    );
}

#[test]
fn replica_points() {
    let mut replica = Replica::new(
        TenantId(Uuid::nil()),
        ReplicationJobId(Uuid::from_u128(0x10b)),
        (VmId(Uuid::from_u128(0xa1)), "web"),
        DatastoreId(Uuid::from_u128(0xd5)),
    );
    replica.id = ReplicaId(Uuid::from_u128(0x4e));
    let point = RestorePoint {
        id: RestorePointId(Uuid::from_u128(0xd1)),
        replica_id: replica.id,
        sequence: 3,
        session_id: SessionId(Uuid::from_u128(0x5e)),
        state: RestorePointState::Published,
        created_at: at("2026-11-22T09:30:00.250Z"),
        bytes_written: 1 << 20,
        disks: vec![],
        verified: true,
        consistency: Default::default(),
    };
    golden_both("vm_replica_point", &views::vm_replica_point(&ctx(), &replica, &point, false, Shape::Entity));
    golden_both("vm_replica_point_ref", &views::vm_replica_point(&ctx(), &replica, &point, false, Shape::EntityRef));
    // The oldest point holds the whole disk.
    let oldest = views::vm_replica_point(&ctx(), &replica, &point, true, Shape::Entity).to_xml();
    assert!(
        oldest.contains("<Algorithm>Full</Algorithm>") && oldest.contains("<PointType>Full</PointType>"),
        "{oldest}"
    );
}

#[test]
fn errors() {
    golden_both(
        "error_not_found",
        &error_element(reqwest::StatusCode::NOT_FOUND, "plan 00000000-0000-0000-0000-0000000000c1 not found"),
    );
    golden_both(
        "error_bad_filter",
        &error_element(reqwest::StatusCode::BAD_REQUEST, "malformed filter at character 9: expected ')'"),
    );
}

#[test]
fn query_results_with_paging() {
    let s = running_session();
    let path = |n: u64| {
        format!("/query?type=CloudFailoverSession&format=References&sortDesc=CreationTime&pageSize=1&page={n}")
    };
    let paging = views::paging_info(&ctx(), 2, 1, 3, path);
    let xml = paging.to_xml();
    for rel in ["First", "Previous", "Next", "Last"] {
        assert!(xml.contains(&format!("Rel=\"{rel}\"")), "{rel}: {xml}");
    }
    let refs = vec![views::cloud_failover_session(&ctx(), &s, &[], &[], Shape::Ref)];
    golden_both("query_result", &views::query_result(Shape::Ref, "CloudFailoverSessions", refs, paging));
    // Without pageSize, one page holds everything.
    let entities = vec![views::cloud_failover_session(&ctx(), &s, &tasks_of(&s), &[], Shape::Entity)];
    let one_page = views::paging_info(&ctx(), 1, 1, 1, |_| "/query?type=CloudFailoverSession&format=Entities".into());
    golden_both(
        "query_result_entities",
        &views::query_result(Shape::Entity, "CloudFailoverSessions", entities, one_page),
    );
    // The first page has no Previous link, the last no Next.
    let first = views::paging_info(&ctx(), 1, 1, 3, path).to_xml();
    let last = views::paging_info(&ctx(), 3, 1, 3, path).to_xml();
    assert!(!first.contains("Previous") && first.contains("Next"));
    assert!(last.contains("Previous") && !last.contains("\"Next\""));
}
