//! The agent API across HTTP: the conformance scenarios through RemoteAgent → the agent's
//! router → LocalAgent, and what the wire itself must refuse. (Plain HTTP on loopback, in
//! process: the TLS layer is tested on its own in drover-pki and with `drover agent`.)

use std::sync::Arc;

use drover_agent::LocalAgent;
use drover_agent::conformance::{self, Rig};
use drover_agent_api::wire::VERSION_HEADER;
use drover_agent_api::*;
use drover_agent_client::RemoteAgent;
use drover_hv::sim::SimulatedHypervisor;

async fn serve(dir: &tempfile::TempDir) -> (RemoteAgent, String) {
    let local: Arc<dyn HostAgent> =
        Arc::new(LocalAgent::new(Arc::new(SimulatedHypervisor::new()), dir.path().join("work")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(drover_agent::server::serve_plain(listener, local));
    (RemoteAgent::connect(&base, None).await.unwrap(), base)
}

#[tokio::test]
async fn the_conformance_scenarios_pass_over_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, _) = serve(&dir).await;
    assert_eq!((agent.info().api_version, agent.info().hypervisor.as_str()), (API_VERSION, "simulated"));
    let rig = Rig::new(&agent, &dir.path().join("ds")).await;
    conformance::seed_then_delta(&agent, &rig).await;
    // Error classes survive the wire.
    conformance::refuses_what_leaves_the_datastores(&agent, &rig).await;
    conformance::runs_vms_on_its_own_disks_only(&agent, &rig).await;
    assert_eq!(agent.transfer_status("nothing-here").await.unwrap_err().kind, ErrorKind::Gone);
}

#[tokio::test]
async fn freezes_and_thaws_pass_over_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Arc::new(SimulatedHypervisor::new());
    let local: Arc<dyn HostAgent> = Arc::new(LocalAgent::new(sim.clone(), dir.path().join("work")));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(drover_agent::server::serve_plain(listener, local));
    let agent = RemoteAgent::connect(&base, None).await.unwrap();
    conformance::freezes_are_bounded_and_thawed(&agent, &sim).await;
}

#[tokio::test]
async fn the_wire_refuses_other_versions_mismatched_ids_and_big_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let (_, base) = serve(&dir).await;
    let http = reqwest::Client::new();
    // No version, another version: refused before anything runs, as an agent error.
    for version in [None, Some("0"), Some("1"), Some("3"), Some("2; drop")] {
        let mut r = http.get(format!("{base}/v1/info"));
        if let Some(v) = version {
            r = r.header(VERSION_HEADER, v);
        }
        let answer = r.send().await.unwrap();
        assert_eq!(answer.status(), 400, "{version:?}");
        let e: AgentError = answer.json().await.unwrap();
        assert_eq!(e.kind, ErrorKind::Invalid);
        assert!(e.message.contains("version"), "{}", e.message);
    }
    let v = API_VERSION.to_string();
    // The path and the body name different transfers.
    let spec = serde_json::json!({
        "id": "b", "source": {"kind": "local_nbd", "socket": "/x", "export": "e", "meta_context": "m"},
        "source_files": null, "mode": "seed", "target": "/x", "prev": null, "size": 1
    });
    let answer =
        http.put(format!("{base}/v1/transfers/a")).header(VERSION_HEADER, &v).json(&spec).send().await.unwrap();
    assert_eq!(answer.status(), 400);
    // A body over the limit; an unknown route is an agent error too.
    let big = vec![b' '; wire::MAX_BODY + 1];
    let answer = http
        .post(format!("{base}/v1/points"))
        .header(VERSION_HEADER, &v)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 413);
    let answer = http.get(format!("{base}/v1/nothing")).header(VERSION_HEADER, &v).send().await.unwrap();
    assert_eq!(answer.status(), 404);
    assert_eq!(answer.json::<AgentError>().await.unwrap().kind, ErrorKind::Gone);
}

#[tokio::test]
async fn an_agent_that_is_not_there_is_a_retry_naming_it() {
    // A port nothing listens on: bind, note it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let e = RemoteAgent::connect(&base, None).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Retry);
    assert!(e.message.contains(&base), "{}", e.message);
}
