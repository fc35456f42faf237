//! The control plane renews an agent's certificate by itself in its last month, over the
//! mutual-TLS agent API: a real CA, a real agent API listener on 127.0.0.1 (its VMs on the
//! simulated hypervisor, which renewal does not touch), a real store.

use std::sync::Arc;

use drover_agent::identity::IdentityKeeper;
use drover_engine::Engine;
use drover_engine::agents::AgentPki;
use drover_engine::app::{App, NewHost};
use drover_hv::sim::SimulatedHypervisor;
use drover_pki::{AgentIdentity, ControlPlaneCa};
use drover_store::Store;
use drover_types::SiteKind;

fn certificate_file(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("agent.cert.pem")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_certificate_in_its_last_month_is_renewed_by_the_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let hv = Arc::new(SimulatedHypervisor::new());
    let store = Store::open_sqlite(&dir.path().join("drover.db")).await.unwrap();
    let app = App::new(Engine::new(store, hv.clone(), drover_engine::testing::fast_config(dir.path())));
    app.bootstrap(Some("adminpass".into())).await.unwrap();
    let tokens = app.login("admin", "adminpass", None).await.unwrap();
    let admin = app.authenticate(&tokens.access_token).await.unwrap();
    let engine = app.engine().clone();

    // The control plane's CA, as `drover serve --agent-listen` sets it up.
    let ca = ControlPlaneCa::create_or_load(&dir.path().join("ca")).unwrap();
    let names = vec!["localhost".parse().unwrap()];
    let cp_identity = drover_pki::LiveIdentity::new(&ca.control_plane_identity(&names).unwrap()).unwrap();
    engine.set_agent_pki(AgentPki::new(ca, cp_identity.clone(), names, "https://127.0.0.1:1".into()).unwrap());
    // Its own certificate has a year to go: kept.
    let own = cp_identity.certificate();
    engine.renew_own_certificate().unwrap();
    assert_eq!(cp_identity.certificate(), own);

    // A host, its agent enrolled with a token, serving the agent API on loopback.
    let site = app.site_create(&admin, "prod", SiteKind::Production).await.unwrap();
    let host = app
        .host_create(&admin, NewHost { site_id: site.id, name: "h1".into(), address: "https://127.0.0.1:1".into() })
        .await
        .unwrap();
    let enrolment = app.host_enrolment(&admin, host.id, None).await.unwrap();
    let agent_dir = dir.path().join("agent");
    let pending = AgentIdentity::generate(&agent_dir).unwrap();
    let enrolled = engine.enrol(&enrolment.token, pending.csr_pem()).await.unwrap();
    let identity = pending.install(&enrolled.certificate.certificate_pem, &enrolled.certificate.ca_pem).unwrap();
    let keeper = Arc::new(IdentityKeeper::new(identity.clone()).unwrap());
    let config = drover_pki::server_config_requiring_client_cert_live(keeper.live(), identity.trusted_ca()).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("https://{}", listener.local_addr().unwrap());
    let local = Arc::new(drover_agent::LocalAgent::new(hv.clone(), dir.path().join("work")));
    let server = tokio::spawn(drover_agent::server::serve_tls(listener, local, Arc::new(config), Some(keeper.clone())));
    let host = app.host_update(&admin, host.id, None, Some(address)).await.unwrap();
    assert!(engine.agent(&host).await.unwrap().vm_list().await.is_ok());
    let enrolled_cert = certificate_file(&agent_dir);

    // A year to go: nothing to do.
    assert!(engine.renew_due_agent_certificates().await.unwrap().is_empty());
    assert_eq!(certificate_file(&agent_dir), enrolled_cert);
    assert!(!app.host_agent(&admin, host.id).await.unwrap().certificate_renewal_due());

    // In its last month (as the store would say eleven months on): renewed, with a new key, and
    // the control plane records the new end.
    let soon = drover_types::now() + chrono::Duration::days(10);
    engine.store().agent_certificate_renewed(host.id, soon).await.unwrap();
    assert!(app.host_agent(&admin, host.id).await.unwrap().certificate_renewal_due());
    assert_eq!(engine.renew_due_agent_certificates().await.unwrap(), vec![host.id]);
    let renewed_cert = certificate_file(&agent_dir);
    assert_ne!(renewed_cert, enrolled_cert);
    let renewed = AgentIdentity::load(&agent_dir).unwrap();
    assert_eq!(renewed.host_id(), host.id);
    assert_ne!(
        renewed.tls_identity().certificate_chain(),
        identity.tls_identity().certificate_chain(),
        "the working identity changed"
    );
    assert_eq!(keeper.live().certificate(), renewed.tls_identity().certificate_chain()[0], "and it is presented");
    let state = app.host_agent(&admin, host.id).await.unwrap();
    assert!(!state.certificate_renewal_due(), "{state:?}");
    let until = state.status.certificate_expires_at.unwrap();
    assert_eq!(until.timestamp(), renewed.not_after().unwrap().timestamp());
    assert!((until - drover_types::now()).num_days() >= 360);
    // A new connection: the control plane accepts the renewed certificate for this host.
    engine.agent_disconnect(host.id).await;
    assert!(engine.agent(&host).await.unwrap().vm_list().await.is_ok());
    assert!(engine.renew_due_agent_certificates().await.unwrap().is_empty(), "nothing due any more");

    // The control plane's own certificate, once its stored one will not do (here: a certificate
    // for another key, as a broken or replaced file would be), is issued again and presented
    // to the agents from the next connection on.
    let pki = engine.agent_pki().unwrap().clone();
    let stray = pki.ca.issue_control_plane_identity(&["localhost".parse().unwrap()]).unwrap();
    std::fs::write(dir.path().join("ca/control-plane.cert.pem"), stray.chain_pem).unwrap();
    engine.renew_own_certificate().unwrap();
    assert_ne!(cp_identity.certificate(), own, "a new certificate for the control plane");
    let reloaded = pki.ca.control_plane_identity(&["localhost".parse().unwrap()]).unwrap();
    assert_eq!(reloaded.certificate_chain()[0], cp_identity.certificate(), "the stored one is presented");
    engine.agent_disconnect(host.id).await;
    assert!(engine.agent(&host).await.unwrap().vm_list().await.is_ok(), "the agent takes it");

    // Due again while the agent is gone: it is tried, reported unreachable, left due, and
    // nothing on the agent's side changes.
    server.abort();
    let _ = server.await;
    engine.agent_disconnect(host.id).await;
    engine.store().agent_certificate_renewed(host.id, soon).await.unwrap();
    assert!(engine.renew_due_agent_certificates().await.unwrap().is_empty());
    let state = app.host_agent(&admin, host.id).await.unwrap();
    assert!(state.certificate_renewal_due(), "{state:?}");
    assert!(state.status.last_error.is_some(), "{state:?}");
    assert_eq!(certificate_file(&agent_dir), renewed_cert);

    // The administrator's own renewal of a host without an agent is refused, naming why.
    let local = app
        .host_create(&admin, NewHost { site_id: site.id, name: "here".into(), address: "local".into() })
        .await
        .unwrap();
    let e = app.host_agent_certificate_renew(&admin, local.id).await.unwrap_err();
    assert!(matches!(e, drover_types::Error::Conflict(_)), "{e}");
    let fresh = app
        .host_create(&admin, NewHost { site_id: site.id, name: "new".into(), address: "https://127.0.0.1:1".into() })
        .await
        .unwrap();
    let e = app.host_agent_certificate_renew(&admin, fresh.id).await.unwrap_err();
    assert!(e.to_string().contains("has not enrolled"), "{e}");
}
