//! `App::session_boot_points`: which restore point each VM of a failover booted from, read back
//! from the session's step records (the simulated hypervisor; points made by hand).

use std::sync::Arc;
use std::time::Duration;

use drover_engine::Engine;
use drover_engine::app::{App, NewReplicationJob, PlanInput};
use drover_hv::sim::SimulatedHypervisor;
use drover_store::Store;
use drover_types::*;

#[tokio::test]
async fn a_failover_reports_the_point_each_vm_booted_from_and_other_sessions_none() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("drover.db")).await.unwrap();
    let config = drover_engine::testing::fast_config(dir.path());
    let app = App::new(Engine::new(store, Arc::new(SimulatedHypervisor::new()), config));
    app.bootstrap(Some("adminpass".into())).await.unwrap();
    let caller = app.authenticate(&app.login("admin", "adminpass", None).await.unwrap().access_token).await.unwrap();
    let wait = |s: SessionId| {
        let app = app.clone();
        async move { app.engine().wait(s, Duration::from_secs(20)).await.unwrap() }
    };
    let (host, datastores) = drover_engine::testing::infrastructure(&app, &caller, dir.path(), &["prod", "dr"]).await;
    let (prod, (dr, dr_path)) = (datastores[0].0, datastores[1].clone());
    let (vm, created) = app.vm_create(&caller, drover_engine::testing::new_vm("web", host, prod)).await.unwrap();
    assert_eq!(wait(created).await.result, SessionResult::Success);
    let job = app
        .replication_job_create(
            &caller,
            NewReplicationJob {
                name: "j".into(),
                vm_ids: vec![vm.id],
                target_host_id: host,
                target_datastore_id: dr,
                schedule: Schedule::Manual,
                retention_points: 2,
                bandwidth_limit: None,
                consistency: Default::default(),
                network_mappings: Vec::new(),
            },
        )
        .await
        .unwrap();
    let (replica, point) = drover_engine::testing::replica_with_point(
        app.engine().store(),
        caller.tenant_id,
        job.id,
        (vm.id, "web"),
        dr,
        &dr_path,
    )
    .await;
    let on = PlanStep { id: PlanStepId::new(), name: "on".into(), kind: PlanStepKind::PowerOn, critical: true };
    let plan = app
        .plan_create(
            &caller,
            PlanInput {
                name: "p".into(),
                description: String::new(),
                recovery_location_id: RecoveryLocationId::ORIGINAL,
                groups: vec![PlanGroup {
                    id: PlanGroupId::new(),
                    name: "g".into(),
                    mode: GroupMode::Sequential,
                    delay_secs: 0,
                    critical: true,
                    restore_tags: false,
                    vms: vec![PlanVm { vm_id: vm.id, steps: vec![on] }],
                }],
            },
        )
        .await
        .unwrap();

    let (_, s) = app.plan_action(&caller, plan.id, PlanAction::Failover, Default::default()).await.unwrap();
    let s = wait(s.unwrap()).await;
    assert_eq!(s.result, SessionResult::Success, "{:?}", s.failure_message);
    let (_, tasks) = app.session_get(&caller, s.id).await.unwrap();
    let points = app.session_boot_points(&caller, s.id).await.unwrap();
    assert_eq!(points, vec![(tasks[0].id, replica.id, point.id)]);

    // Sessions that boot nothing report nothing; an unknown session is not found.
    assert!(app.session_boot_points(&caller, created).await.unwrap().is_empty());
    let (_, undo) = app.plan_action(&caller, plan.id, PlanAction::Undo, Default::default()).await.unwrap();
    let undo = wait(undo.unwrap()).await;
    assert!(app.session_boot_points(&caller, undo.id).await.unwrap().is_empty());
    assert!(matches!(app.session_boot_points(&caller, SessionId::new()).await, Err(Error::NotFound { .. })));
    app.engine().shutdown();
}
