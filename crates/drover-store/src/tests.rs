//! The store's conformance suite. Written against the facade only, so the same tests can run
//! against every backend.

use super::*;
use drover_types::*;

async fn fresh() -> (Store, tempfile::TempDir, Tenant) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("drover.db")).await.unwrap();
    let tenant = Tenant { id: TenantId::new(), name: "default".into(), is_system: true, created_at: now() };
    store.tenant_create(&tenant).await.unwrap();
    (store, dir, tenant)
}

fn site(tenant: TenantId, name: &str) -> Site {
    Site { id: SiteId::new(), tenant_id: tenant, name: name.into(), kind: SiteKind::Production, created_at: now() }
}

fn host(tenant: TenantId, site: SiteId, name: &str) -> Host {
    Host {
        id: HostId::new(),
        tenant_id: tenant,
        site_id: site,
        name: name.into(),
        address: "local".into(),
        created_at: now(),
    }
}

fn session(tenant: TenantId, kind: SessionKind, at: Timestamp) -> Session {
    Session {
        id: SessionId::new(),
        tenant_id: tenant,
        kind,
        name: "s".into(),
        target: SessionTarget::Vm(VmId::new()),
        state: SessionState::Starting,
        result: SessionResult::None,
        progress: 0,
        failure_message: None,
        params: serde_json::json!({"a": 1}),
        halt_requested: false,
        halted: false,
        created_at: at,
        ended_at: None,
    }
}

#[tokio::test]
async fn objects_round_trip_and_names_are_unique_per_tenant() {
    let (store, _dir, t) = fresh().await;
    let s = site(t.id, "prod");
    store.object_insert(&s).await.unwrap();
    assert_eq!(store.object_get::<Site>(t.id, s.id.0).await.unwrap(), s);
    let dup = store.object_insert(&site(t.id, "prod")).await.unwrap_err();
    assert!(matches!(dup, Error::AlreadyExists(ref m) if m.contains("prod")), "{dup:?}");

    // Another tenant may use the name, and cannot see the first tenant's object.
    let other = Tenant { id: TenantId::new(), name: "acme".into(), is_system: false, created_at: now() };
    store.tenant_create(&other).await.unwrap();
    store.object_insert(&site(other.id, "prod")).await.unwrap();
    assert!(matches!(store.object_get::<Site>(other.id, s.id.0).await, Err(Error::NotFound { .. })));
    assert_eq!(store.object_list::<Site>(t.id).await.unwrap().len(), 1);
}

#[tokio::test]
async fn references_must_exist_and_protect_what_they_point_to() {
    let (store, _dir, t) = fresh().await;
    let orphan = host(t.id, SiteId::new(), "h1");
    assert!(matches!(store.object_insert(&orphan).await, Err(Error::InvalidRequest(_))));
    let s = site(t.id, "prod");
    store.object_insert(&s).await.unwrap();
    let h = host(t.id, s.id, "h1");
    store.object_insert(&h).await.unwrap();
    let err = store.object_delete::<Site>(t.id, s.id.0).await.unwrap_err();
    assert!(matches!(err, Error::Conflict(ref m) if m.contains("h1")), "{err:?}");
    store.object_delete::<Host>(t.id, h.id.0).await.unwrap();
    store.object_delete::<Site>(t.id, s.id.0).await.unwrap();
    assert!(matches!(store.object_delete::<Site>(t.id, s.id.0).await, Err(Error::NotFound { .. })));
}

#[tokio::test]
async fn concurrent_modifications_are_all_applied() {
    let (store, _dir, t) = fresh().await;
    let s = site(t.id, "n0");
    store.object_insert(&s).await.unwrap();
    let mut handles = Vec::new();
    for _ in 0..8 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            store
                .object_modify::<Site, _, _>(t.id, s.id.0, |s| {
                    let n: u32 = s.name[1..].parse().unwrap();
                    s.name = format!("n{}", n + 1);
                    Ok(())
                })
                .await
                .unwrap();
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    assert_eq!(store.object_get::<Site>(t.id, s.id.0).await.unwrap().name, "n8");
    // A refused change changes nothing.
    let err = store
        .object_modify::<Site, _, ()>(t.id, s.id.0, |s| {
            s.name = "changed".into();
            Err(Error::conflict("no"))
        })
        .await
        .unwrap_err();
    assert_eq!(err, Error::conflict("no"));
    assert_eq!(store.object_get::<Site>(t.id, s.id.0).await.unwrap().name, "n8");
}

#[tokio::test]
async fn sessions_filter_page_and_survive_reopen() {
    let (store, dir, t) = fresh().await;
    let base = now();
    let mut ids = Vec::new();
    for i in 0..5 {
        let kind = if i % 2 == 0 { SessionKind::VmPowerOn } else { SessionKind::VmShutdown };
        let s = session(t.id, kind, base + chrono::Duration::seconds(i));
        let task = Task {
            id: TaskId::new(),
            session_id: s.id,
            vm_id: None,
            name: format!("task {i}"),
            state: SessionState::Starting,
            result: SessionResult::None,
            progress: 0,
            weight: 1,
            failure_message: None,
            created_at: s.created_at,
            ended_at: None,
        };
        store.session_insert(&s, &[task]).await.unwrap();
        ids.push(s.id);
    }
    let f = SessionFilter { kind: Some(SessionKind::VmPowerOn), limit: 2, ..Default::default() };
    let (page, total) = store.session_list(t.id, &f).await.unwrap();
    assert_eq!(total, 3);
    assert_eq!(page.iter().map(|s| s.id).collect::<Vec<_>>(), vec![ids[4], ids[2]]);
    let f = SessionFilter { offset: 4, limit: 10, oldest_first: true, ..Default::default() };
    let (page, total) = store.session_list(t.id, &f).await.unwrap();
    assert_eq!((page.len(), total), (1, 5));
    assert_eq!(page[0].id, ids[4]);

    let mut s = store.session_get(Some(t.id), ids[0]).await.unwrap();
    s.state = SessionState::Stopped;
    s.result = SessionResult::Success;
    s.ended_at = Some(now());
    store.session_update(&s).await.unwrap();
    assert_eq!(store.sessions_unfinished().await.unwrap().len(), 4);
    drop(store);

    let store = Store::open_sqlite(&dir.path().join("drover.db")).await.unwrap();
    assert_eq!(store.session_get(None, ids[0]).await.unwrap(), s);
    assert_eq!(store.tasks_of(ids[1]).await.unwrap()[0].name, "task 1");
    let other_tenant = TenantId::new();
    assert!(store.session_get(Some(other_tenant), ids[0]).await.is_err());
}

/// Twelve sessions of two kinds with names, states, results and end times to filter and sort on,
/// stored in one transaction; returned newest first (the default order).
async fn summaries_fixture(store: &Store, tenant: TenantId) -> Vec<Session> {
    let base = now() - chrono::Duration::hours(1);
    let mut all = Vec::new();
    for i in 0..12i64 {
        let kind = if i % 3 == 0 { SessionKind::Replication } else { SessionKind::PlanFailover };
        let mut s = session(tenant, kind, base + chrono::Duration::seconds(i));
        // Ties on purpose: every pair of sessions shares a name, a state and a result.
        s.name = ["Ärger", "alpha", "Bravo"][(i % 3) as usize].to_string();
        s.target = SessionTarget::Plan(PlanId::new());
        if i % 2 == 0 {
            s.state = SessionState::Stopped;
            s.result = if i % 4 == 0 { SessionResult::Failed } else { SessionResult::Success };
            s.ended_at = Some(s.created_at + chrono::Duration::seconds(100 - i));
        } else {
            s.state = SessionState::Working;
        }
        all.push(s);
    }
    let with_tasks: Vec<(Session, Vec<Task>)> = all.iter().map(|s| (s.clone(), vec![s.task(None, "vm")])).collect();
    store.session_insert_many(&with_tasks).await.unwrap();
    all.reverse();
    all
}

/// What a sort compares, for the expected orders.
type SortKey = dyn Fn(&Session) -> (u8, String, Option<Timestamp>);

fn query(condition: SessionCondition) -> SessionQuery {
    SessionQuery { kinds: Vec::new(), condition, order: None, offset: 0, limit: 1000 }
}

#[tokio::test]
async fn session_summaries_filter_sort_and_page_in_the_store() {
    let (store, dir, t) = fresh().await;
    let all = summaries_fixture(&store, t.id).await;
    let ids = |list: &[SessionSummary]| list.iter().map(|s| s.id).collect::<Vec<_>>();
    let expect = |f: &dyn Fn(&Session) -> bool| all.iter().filter(|s| f(s)).map(|s| s.id).collect::<Vec<_>>();

    // Everything, newest first, and a summary is the session without its parameters.
    let (page, total) = store.session_summaries(t.id, &query(SessionCondition::TRUE)).await.unwrap();
    assert_eq!((ids(&page), total), (expect(&|_| true), 12));
    assert_eq!(page[0], SessionSummary::from(&all[0]));
    assert_eq!(store.session_summaries(t.id, &query(SessionCondition::FALSE)).await.unwrap().1, 0);

    // Kinds, then a page of them: the total counts every match, the page only its share.
    let plans =
        SessionQuery { kinds: vec![SessionKind::PlanFailover], offset: 3, limit: 2, ..query(SessionCondition::TRUE) };
    let (page, total) = store.session_summaries(t.id, &plans).await.unwrap();
    let plan_ids = expect(&|s| s.kind == SessionKind::PlanFailover);
    assert_eq!((ids(&page), total), (plan_ids[3..5].to_vec(), 8));

    // Names compare lower-cased as Rust lower-cases them, beyond ASCII too.
    let c = SessionCondition::NameLowercase(CompareOp::Eq, "ärger".into());
    assert_eq!(ids(&store.session_summaries(t.id, &query(c)).await.unwrap().0), expect(&|s| s.name == "Ärger"));
    let c = SessionCondition::NameLowercase(CompareOp::Lt, "b".into());
    assert_eq!(ids(&store.session_summaries(t.id, &query(c)).await.unwrap().0), expect(&|s| s.name == "alpha"));

    // Absent end times equal nothing: only <> holds for running sessions.
    let cut = all[5].ended_at.unwrap();
    for (op, f) in [
        (CompareOp::Ne, Box::new(|e: Option<Timestamp>| e != Some(cut)) as Box<dyn Fn(Option<Timestamp>) -> bool>),
        (CompareOp::Eq, Box::new(|e| e == Some(cut))),
        (CompareOp::Ge, Box::new(|e| e.is_some_and(|e| e >= cut))),
    ] {
        let c = SessionCondition::EndedAt(op, cut);
        assert_eq!(
            ids(&store.session_summaries(t.id, &query(c)).await.unwrap().0),
            expect(&|s| f(s.ended_at)),
            "{op:?}"
        );
    }

    // And/Or, states, results, creation times, ids, targets.
    let c = SessionCondition::Or(vec![
        SessionCondition::And(vec![
            SessionCondition::StateIn(vec![SessionState::Stopped]),
            SessionCondition::ResultIn(vec![SessionResult::Failed]),
        ]),
        SessionCondition::CreatedAt(CompareOp::Gt, all[2].created_at),
        SessionCondition::Id(CompareOp::Eq, all[7].id.to_string()),
        SessionCondition::Target(match all[9].target {
            SessionTarget::Plan(p) => p.0,
            _ => unreachable!(),
        }),
    ]);
    let want = expect(&|s| {
        s.result == SessionResult::Failed || s.created_at > all[2].created_at || s.id == all[7].id || s.id == all[9].id
    });
    assert_eq!(ids(&store.session_summaries(t.id, &query(c)).await.unwrap().0), want);
    assert_eq!(store.session_summaries(t.id, &query(SessionCondition::StateIn(vec![]))).await.unwrap().1, 0);

    // Sorts keep newest-first among ties, in both directions, as a stable sort of the default
    // order does; states and results sort in their domain order, missing end times first.
    let sorted = |key: &SortKey, asc: bool| {
        let mut v: Vec<&Session> = all.iter().collect();
        v.sort_by(|a, b| if asc { key(a).cmp(&key(b)) } else { key(b).cmp(&key(a)) });
        v.iter().map(|s| s.id).collect::<Vec<_>>()
    };
    let cases: [(SessionOrder, Box<SortKey>); 5] = [
        (SessionOrder::NameLowercase, Box::new(|s| (0, s.name.to_lowercase(), None))),
        (SessionOrder::State, Box::new(|s| (s.state as u8, String::new(), None))),
        (SessionOrder::Result, Box::new(|s| (s.result as u8, String::new(), None))),
        (SessionOrder::EndedAt, Box::new(|s| (0, String::new(), s.ended_at))),
        (SessionOrder::CreatedAt, Box::new(|s| (0, String::new(), Some(s.created_at)))),
    ];
    for (order, key) in &cases {
        for asc in [true, false] {
            let q = SessionQuery { order: Some((*order, asc)), ..query(SessionCondition::TRUE) };
            let got = ids(&store.session_summaries(t.id, &q).await.unwrap().0);
            assert_eq!(got, sorted(key.as_ref(), asc), "{order:?} ascending {asc}");
        }
    }

    // Another tenant sees none of them.
    let other = Tenant { id: TenantId::new(), name: "acme".into(), is_system: false, created_at: now() };
    store.tenant_create(&other).await.unwrap();
    assert_eq!(store.session_summaries(other.id, &query(SessionCondition::TRUE)).await.unwrap(), (vec![], 0));

    // Sessions stored before the lower-cased name existed get it when the store opens.
    sqlx::query("UPDATE sessions SET name_lower = NULL").execute(&store.pool).await.unwrap();
    drop(store);
    let store = Store::open_sqlite(&dir.path().join("drover.db")).await.unwrap();
    let c = SessionCondition::NameLowercase(CompareOp::Eq, "bravo".into());
    assert_eq!(ids(&store.session_summaries(t.id, &query(c)).await.unwrap().0), expect(&|s| s.name == "Bravo"));
}

#[tokio::test]
async fn log_sequence_is_dense_under_concurrent_appends() {
    let (store, _dir, t) = fresh().await;
    let s = session(t.id, SessionKind::VmCreate, now());
    store.session_insert(&s, &[]).await.unwrap();
    let mut handles = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            store.log_append(s.id, None, LogLevel::Info, &format!("line {i}")).await.unwrap()
        }));
    }
    let mut seqs: Vec<i64> = Vec::new();
    for h in handles {
        seqs.push(h.await.unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    let tail = store.log_list(s.id, 18, 100).await.unwrap();
    assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![19, 20]);
}

#[tokio::test]
async fn refresh_tokens_are_single_use_and_reuse_revokes_the_family() {
    let (store, _dir, t) = fresh().await;
    let user =
        User { id: UserId::new(), tenant_id: t.id, name: "admin".into(), role: Role::Administrator, created_at: now() };
    store.user_create(&user, "hash").await.unwrap();
    let family = Uuid::new_v4();
    let mk = |hash: &str, kind| TokenRecord {
        hash: hash.into(),
        kind,
        user_id: user.id,
        family,
        expires_at: now() + chrono::Duration::minutes(10),
        used_at: None,
        created_at: now(),
    };
    store.token_insert(&mk("r1", TokenKind::Refresh)).await.unwrap();
    store.token_insert(&mk("a1", TokenKind::Access)).await.unwrap();
    assert!(matches!(store.refresh_token_consume("r1", now()).await.unwrap(), RefreshOutcome::Consumed(_)));
    assert_eq!(store.refresh_token_consume("r1", now()).await.unwrap(), RefreshOutcome::Reused);
    // The reuse revoked the access token of the same login.
    assert!(store.access_token_get("a1", now()).await.unwrap().is_none());
    assert_eq!(store.refresh_token_consume("nope", now()).await.unwrap(), RefreshOutcome::Invalid);
    // An access token is not a refresh token.
    store.token_insert(&mk("a2", TokenKind::Access)).await.unwrap();
    assert_eq!(store.refresh_token_consume("a2", now()).await.unwrap(), RefreshOutcome::Invalid);
    assert!(store.access_token_get("a2", now() + chrono::Duration::minutes(11)).await.unwrap().is_none());
}

#[tokio::test]
async fn saga_steps_upsert_by_position() {
    let (store, _dir, t) = fresh().await;
    let s = session(t.id, SessionKind::VmCreate, now());
    store.session_insert(&s, &[]).await.unwrap();
    let mut rec = StepRecord {
        session_id: s.id,
        task_id: None,
        index: 0,
        name: "create_disks".into(),
        state: StepState::Started,
        attempts: 1,
        output: serde_json::Value::Null,
        error: None,
        updated_at: now(),
    };
    store.step_put(&rec).await.unwrap();
    rec.state = StepState::Done;
    rec.output = serde_json::json!({"paths": ["/a"]});
    store.step_put(&rec).await.unwrap();
    assert_eq!(store.steps_of(s.id).await.unwrap(), vec![rec]);
}

#[tokio::test]
async fn a_point_published_before_consistency_was_recorded_reads_as_crash_consistent() {
    let (store, _dir, t) = fresh().await;
    let replica = ReplicaId::new();
    sqlx::query(
        "INSERT INTO restore_points (id, replica_id, tenant_id, sequence, session_id, state, created_at,
                                     bytes_written, disks, verified)
         VALUES ($1, $2, $3, 1, $4, 'Published', 0, 0, '[]', 0)",
    )
    .bind(RestorePointId::new().to_string())
    .bind(replica.to_string())
    .bind(t.id.to_string())
    .bind(SessionId::new().to_string())
    .execute(&store.pool)
    .await
    .unwrap();
    let points = store.restore_points_of(t.id, replica).await.unwrap();
    assert_eq!(points.len(), 1);
    assert_eq!(points[0].consistency.kind, drover_types::ConsistencyKind::Crash);
    assert!(points[0].consistency.reason.as_deref().unwrap().contains("before drover recorded"));
}

#[tokio::test]
async fn restore_points_publish_once_and_retire_atomically() {
    let (store, _dir, t) = fresh().await;
    let replica = ReplicaId::new();
    let point = |session: SessionId, file: &str| RestorePoint {
        id: RestorePointId::new(),
        replica_id: replica,
        sequence: 0,
        session_id: session,
        state: RestorePointState::Published,
        created_at: now(),
        bytes_written: 65536,
        disks: vec![RestorePointDisk {
            disk: "data".into(),
            file: file.into(),
            size_bytes: 1 << 20,
            manifest_digest: "d".into(),
            tracking_bitmap: Some("drover-r1".into()),
        }],
        verified: false,
        consistency: drover_types::PointConsistency::application("2 file systems frozen"),
    };
    let s1 = SessionId::new();
    let p1 = store.restore_point_publish(t.id, &point(s1, "/a.qcow2")).await.unwrap();
    assert_eq!(p1.sequence, 1);
    // Publishing again from the same session (a retried step) returns the same point.
    let again = store.restore_point_publish(t.id, &point(s1, "/other.qcow2")).await.unwrap();
    assert_eq!(again, p1);
    let p2 = store.restore_point_publish(t.id, &point(SessionId::new(), "/b.qcow2")).await.unwrap();
    let p3 = store.restore_point_publish(t.id, &point(SessionId::new(), "/c.qcow2")).await.unwrap();
    assert_eq!((p2.sequence, p3.sequence), (2, 3));
    let listed = store.restore_points_of(t.id, replica).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert_eq!(listed[0].consistency, point(s1, "/a.qcow2").consistency, "the consistency is stored with the point");
    assert_eq!(listed[0].disks[0].tracking_bitmap.as_deref(), Some("drover-r1"), "the bitmap ledger is stored too");
    assert!(store.restore_points_of(TenantId::new(), replica).await.unwrap().is_empty(), "tenant-scoped");

    // Retire refuses a point that was not marked retiring, and changes nothing.
    let moved = vec![RestorePointDisk { file: "/a.qcow2".into(), ..p2.disks[0].clone() }];
    assert!(matches!(store.restore_point_retire(p1.id, p2.id, &moved).await, Err(Error::Conflict(_))));
    store.restore_point_set_state(p1.id, RestorePointState::Retiring).await.unwrap();
    store.restore_point_retire(p1.id, p2.id, &moved).await.unwrap();
    // A second run (after a crash) is a no-op.
    store.restore_point_retire(p1.id, p2.id, &moved).await.unwrap();
    let left = store.restore_points_of(t.id, replica).await.unwrap();
    assert_eq!(left.iter().map(|p| p.sequence).collect::<Vec<_>>(), vec![2, 3]);
    assert_eq!(left[0].disks[0].file, "/a.qcow2");
    // Sequences keep growing after retention.
    let p4 = store.restore_point_publish(t.id, &point(SessionId::new(), "/d.qcow2")).await.unwrap();
    assert_eq!(p4.sequence, 4);
}

#[tokio::test]
async fn grants_show_objects_to_a_tenant_that_only_their_owner_changes() {
    let (store, _dir, system) = fresh().await;
    let acme = Tenant { id: TenantId::new(), name: "acme".into(), is_system: false, created_at: now() };
    store.tenant_create(&acme).await.unwrap();
    let s = site(system.id, "prod");
    let h = host(system.id, s.id, "h1");
    store.object_insert(&s).await.unwrap();
    store.object_insert(&h).await.unwrap();
    let ds = Datastore {
        id: DatastoreId::new(),
        tenant_id: system.id,
        host_id: h.id,
        name: "ds1".into(),
        path: "/srv/ds1".into(),
        created_at: now(),
    };
    store.object_insert(&ds).await.unwrap();
    assert!(store.object_get::<Datastore>(acme.id, ds.id.0).await.is_err());
    assert!(store.object_list::<Host>(acme.id).await.unwrap().is_empty());

    let objects = [("datastore", ds.id.0), ("host", h.id.0), ("site", s.id.0)];
    store.grant_insert(acme.id, ds.id.0, &objects).await.unwrap();
    store.grant_insert(acme.id, ds.id.0, &objects).await.unwrap();
    assert_eq!(store.grant_tenants(ds.id.0).await.unwrap(), vec![acme.id]);
    assert_eq!(store.object_get::<Datastore>(acme.id, ds.id.0).await.unwrap(), ds);
    assert_eq!(store.object_list::<Site>(acme.id).await.unwrap(), vec![s.clone()]);
    // Seen, not owned: the grantee cannot change or delete it.
    assert!(matches!(
        store
            .object_modify::<Datastore, _, _>(acme.id, ds.id.0, |d| {
                d.name = "mine".into();
                Ok(())
            })
            .await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(store.object_delete::<Datastore>(acme.id, ds.id.0).await, Err(Error::NotFound { .. })));

    // An object of the grantee may refer to it; then the grant cannot be taken back.
    let loc = RecoveryLocation {
        id: RecoveryLocationId::new(),
        tenant_id: acme.id,
        name: "dr".into(),
        description: String::new(),
        kind: RecoveryLocationKind::Restore,
        host_id: Some(h.id),
        datastore_id: Some(ds.id),
        network_mappings: Vec::new(),
        created_at: now(),
    };
    store.object_insert(&loc).await.unwrap();
    let refused = store.grant_delete(acme.id, ds.id.0).await.unwrap_err();
    assert!(matches!(refused, Error::Conflict(ref m) if m.contains("\"dr\"")), "{refused:?}");
    assert_eq!(store.grant_tenants(ds.id.0).await.unwrap(), vec![acme.id]);
    store.object_delete::<RecoveryLocation>(acme.id, loc.id.0).await.unwrap();
    store.grant_delete(acme.id, ds.id.0).await.unwrap();
    assert!(store.object_get::<Host>(acme.id, h.id.0).await.is_err());
    assert!(matches!(store.grant_delete(acme.id, ds.id.0).await, Err(Error::NotFound { .. })));
}

#[tokio::test]
async fn the_audit_log_appends_pages_filters_and_purges() {
    let (store, _dir, t) = fresh().await;
    let record = |action: &str, tenant: Option<TenantId>, at: Timestamp| AuditRecord {
        at,
        tenant_id: tenant,
        user_id: None,
        user_name: "admin".into(),
        action: action.into(),
        outcome: AuditOutcome::Success,
        address: Some("127.0.0.1".into()),
        detail: String::new(),
    };
    let old = now() - chrono::Duration::days(500);
    let first = store.audit_append(&record("login", Some(t.id), old)).await.unwrap();
    let second = store.audit_append(&record("POST /v1/sites", Some(t.id), now())).await.unwrap();
    let third = store.audit_append(&record("login", None, now())).await.unwrap();
    assert!(first < second && second < third);
    let all = store.audit_list(&AuditFilter { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![third, second, first]);
    assert_eq!(all[1].record, record("POST /v1/sites", Some(t.id), all[1].record.at));
    let mine = store.audit_list(&AuditFilter { tenant_id: Some(t.id), limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(mine.len(), 2);
    let logins =
        store.audit_list(&AuditFilter { action: Some("login".into()), limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(logins.len(), 2);
    let page =
        store.audit_list(&AuditFilter { before_seq: Some(third), limit: 1, ..Default::default() }).await.unwrap();
    assert_eq!(page[0].seq, second);
    assert_eq!(store.audit_purge_before(now() - chrono::Duration::days(400)).await.unwrap(), 1);
    assert_eq!(store.audit_list(&AuditFilter { limit: 10, ..Default::default() }).await.unwrap().len(), 2);
}

#[tokio::test]
async fn an_object_change_and_its_session_commit_together_or_not_at_all() {
    let (store, _dir, t) = fresh().await;
    let s = site(t.id, "prod");
    store.object_insert(&s).await.unwrap();
    let noop = || {};
    let rename = |to: &'static str| {
        move |x: &mut Site| -> drover_types::Result<()> {
            x.name = to.into();
            Ok(())
        }
    };
    let name_now = || async { store.object_get::<Site>(t.id, s.id.0).await.unwrap().name };
    let exists = |id: SessionId| {
        let store = store.clone();
        async move { store.session_get(None, id).await.is_ok() }
    };

    // Both are stored.
    let first = session(t.id, SessionKind::VmPowerOn, now());
    let (site_after, ()) = store
        .object_modify_with_session::<Site, _, _>(t.id, s.id.0, rename("a"), SessionWrite::Insert(&first, &[]), &noop)
        .await
        .unwrap();
    assert_eq!(site_after.name, "a");
    assert!(exists(first.id).await);

    // A refused change stores no session.
    let refused = session(t.id, SessionKind::VmPowerOn, now());
    let err = store
        .object_modify_with_session::<Site, _, ()>(
            t.id,
            s.id.0,
            |_| Err(Error::conflict("no")),
            SessionWrite::Insert(&refused, &[]),
            &noop,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)));
    assert!(!exists(refused.id).await);

    // A session write that is refused (a halt of a stopped session) undoes the change.
    let mut stopped = first.clone();
    stopped.state = SessionState::Stopped;
    stopped.result = SessionResult::Success;
    store
        .object_modify_with_session::<Site, _, _>(t.id, s.id.0, rename("b"), SessionWrite::Update(&stopped), &noop)
        .await
        .unwrap();
    assert_eq!((name_now().await, store.session_get(None, first.id).await.unwrap()), ("b".to_string(), stopped));
    let err = store
        .object_modify_with_session::<Site, _, _>(t.id, s.id.0, rename("c"), SessionWrite::RequestHalt(first.id), &noop)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    assert_eq!(name_now().await, "b");

    // A process that dies just before the commit (here: a panic in the hook) leaves neither.
    let lost = session(t.id, SessionKind::VmPowerOn, now());
    let crashed = tokio::spawn({
        let (store, lost) = (store.clone(), lost.clone());
        async move {
            let die = || panic!("killed before the commit");
            store
                .object_modify_with_session::<Site, _, _>(
                    t.id,
                    s.id.0,
                    rename("d"),
                    SessionWrite::Insert(&lost, &[]),
                    &die,
                )
                .await
        }
    })
    .await;
    assert!(crashed.is_err_and(|e| e.is_panic()));
    assert_eq!(name_now().await, "b");
    assert!(!exists(lost.id).await);

    // A new object and its session: both, or (name taken) neither.
    let created = session(t.id, SessionKind::VmCreate, now());
    let h = host(t.id, s.id, "h1");
    store.object_insert_with_session(&h, &created, &[], &noop).await.unwrap();
    assert!(exists(created.id).await);
    let again = session(t.id, SessionKind::VmCreate, now());
    let err = store.object_insert_with_session(&host(t.id, s.id, "h1"), &again, &[], &noop).await.unwrap_err();
    assert!(matches!(err, Error::AlreadyExists(_)), "{err}");
    assert!(!exists(again.id).await);
}
