//! Renewing an enrolled agent's certificate: the key and CSR it answers, what it refuses to
//! install, what a process killed part-way leaves, and a listener that serves the new
//! certificate without restarting.

mod common;

use std::sync::Arc;

use common::{control_plane_identity, enrol, mode};
use drover_pki::{
    AgentIdentity, ControlPlaneCa, LiveIdentity, PeerIdentity, agent_server_name, client_config, client_config_live,
    peer_identity, server_config_requiring_client_cert, server_config_requiring_client_cert_live,
};
use drover_types::HostId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn read(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn a_renewal_installs_a_new_key_and_certificate_for_the_same_host() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ControlPlaneCa::create_or_load(&dir.path().join("ca")).unwrap();
    let host = HostId::new();
    let agent_dir = dir.path().join("agent");
    let agent = enrol(&ca, host, &agent_dir);
    let (old_key, old_cert) = (read(&agent_dir.join("agent.key.pem")), read(&agent_dir.join("agent.cert.pem")));

    // The same CSR until it is used: a renewal retried after a lost answer signs the held key.
    let csr = agent.renewal_csr().unwrap();
    assert_eq!(agent.renewal_csr().unwrap(), csr);
    assert_eq!(mode(&agent_dir.join("renew.key.pem")), 0o600);
    assert_eq!(read(&agent_dir.join("agent.key.pem")), old_key, "the working key is untouched until installed");

    let issued = ca.sign_agent_csr(host, &csr, &[]).unwrap();
    let renewed = agent.install_renewal(&issued.certificate_pem).unwrap();
    assert_eq!(renewed.host_id(), host);
    assert_ne!(read(&agent_dir.join("agent.key.pem")), old_key, "a new key");
    assert_ne!(read(&agent_dir.join("agent.cert.pem")), old_cert);
    assert_eq!(mode(&agent_dir.join("agent.key.pem")), 0o600);
    for gone in ["renew.key.pem", "renew.csr.pem", "next.key.pem", "next.cert.pem"] {
        assert!(!agent_dir.join(gone).exists(), "{gone} is left behind");
    }
    let loaded = AgentIdentity::load(&agent_dir).unwrap();
    assert_eq!(loaded.host_id(), host);
    assert_eq!(loaded.tls_identity().certificate_chain(), renewed.tls_identity().certificate_chain());
    assert_eq!(loaded.not_after().unwrap().timestamp(), issued.not_after.timestamp());
    // A certificate is installed once: its renewal key is gone.
    assert!(renewed.install_renewal(&issued.certificate_pem).is_err());
    // A next renewal makes another key.
    assert_ne!(renewed.renewal_csr().unwrap(), csr);
}

#[test]
fn a_renewal_refuses_a_certificate_for_another_key_host_or_ca_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ControlPlaneCa::create_or_load(&dir.path().join("ca")).unwrap();
    let host = HostId::new();
    let agent_dir = dir.path().join("agent");
    let agent = enrol(&ca, host, &agent_dir);
    let before = (read(&agent_dir.join("agent.key.pem")), read(&agent_dir.join("agent.cert.pem")));

    // No renewal asked for: nothing waits for a certificate.
    let other = enrol(&ca, host, &dir.path().join("other"));
    let stray = ca.sign_agent_csr(host, &other.renewal_csr().unwrap(), &[]).unwrap();
    assert!(agent.install_renewal(&stray.certificate_pem).unwrap_err().to_string().contains("no renewal key"));

    let csr = agent.renewal_csr().unwrap();
    // Another key's certificate (the other agent's renewal).
    let err = agent.install_renewal(&stray.certificate_pem).unwrap_err();
    assert!(err.to_string().contains("not for this agent's key"), "{err}");
    // This key, signed for another host.
    let err = agent.install_renewal(&ca.sign_agent_csr(HostId::new(), &csr, &[]).unwrap().certificate_pem).unwrap_err();
    assert!(err.to_string().contains("names host"), "{err}");
    // This key, signed by another CA.
    let foreign = ControlPlaneCa::create_or_load(&dir.path().join("foreign-ca")).unwrap();
    assert!(agent.install_renewal(&foreign.sign_agent_csr(host, &csr, &[]).unwrap().certificate_pem).is_err());
    // Not a certificate at all.
    assert!(agent.install_renewal("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err());

    assert_eq!((read(&agent_dir.join("agent.key.pem")), read(&agent_dir.join("agent.cert.pem"))), before);
    assert_eq!(AgentIdentity::load(&agent_dir).unwrap().host_id(), host);
    // The right one still installs.
    agent.install_renewal(&ca.sign_agent_csr(host, &csr, &[]).unwrap().certificate_pem).unwrap();
}

/// The states a process killed during `install_renewal` leaves, each loaded as one whole
/// identity: the new one once its certificate is staged, else the old one.
#[test]
fn a_renewal_killed_part_way_loads_as_the_old_or_the_new_identity_never_a_mix() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ControlPlaneCa::create_or_load(&dir.path().join("ca")).unwrap();
    let host = HostId::new();
    let cert_of = |d: &std::path::Path| read(&d.join("agent.cert.pem"));
    for killed_after in ["next.key written", "next.cert written", "key renamed"] {
        let agent_dir = dir.path().join(killed_after.replace(' ', "-"));
        let agent = enrol(&ca, host, &agent_dir);
        let old = cert_of(&agent_dir);
        let csr = agent.renewal_csr().unwrap();
        let new = ca.sign_agent_csr(host, &csr, &[]).unwrap().certificate_pem;
        let key = read(&agent_dir.join("renew.key.pem"));
        // What `install_renewal` writes, in its order, up to the kill.
        let write = |name: &str, text: &str| {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::File::options()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(agent_dir.join(name))
                .unwrap();
            std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        };
        write("next.key.pem", &key);
        if killed_after != "next.key written" {
            write("next.cert.pem", &new);
        }
        if killed_after == "key renamed" {
            std::fs::rename(agent_dir.join("next.key.pem"), agent_dir.join("agent.key.pem")).unwrap();
        }
        let loaded = AgentIdentity::load(&agent_dir).unwrap_or_else(|e| panic!("{killed_after}: {e}"));
        assert_eq!(loaded.host_id(), host);
        let expected = if killed_after == "next.key written" { &old } else { &new };
        assert_eq!(&cert_of(&agent_dir), expected, "{killed_after}");
        assert!(!agent_dir.join("next.key.pem").exists() && !agent_dir.join("next.cert.pem").exists());
        // Loaded again, the same.
        assert_eq!(&cert_of(&agent_dir), expected);
        AgentIdentity::load(&agent_dir).unwrap();
    }
    // A staged certificate that does not check (another host's) is forgotten, not installed.
    let agent_dir = dir.path().join("bad-stage");
    let agent = enrol(&ca, host, &agent_dir);
    let old = cert_of(&agent_dir);
    let csr = agent.renewal_csr().unwrap();
    std::fs::write(
        agent_dir.join("next.cert.pem"),
        ca.sign_agent_csr(HostId::new(), &csr, &[]).unwrap().certificate_pem,
    )
    .unwrap();
    AgentIdentity::load(&agent_dir).unwrap();
    assert_eq!(cert_of(&agent_dir), old);
    assert!(!agent_dir.join("next.cert.pem").exists());
}

/// Serves `connections` connections with `config`, answering each with the certificate the
/// client presented, and returns what the client saw of the server's.
async fn serve(config: rustls::ServerConfig, connections: usize) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        for _ in 0..connections {
            let (tcp, _) = listener.accept().await.unwrap();
            let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
            let certs = tls.get_ref().1.peer_certificates().unwrap_or_default().to_vec();
            let who = peer_identity(&certs).map(|p| p == PeerIdentity::ControlPlane).unwrap_or(false);
            let _ = tls.write_all(if who { &certs[0][..] } else { b"" }).await;
            let _ = tls.shutdown().await;
        }
    });
    addr
}

/// Connects with `client` and returns the server's certificate and the client's, as the server
/// echoed it.
async fn exchange(client: rustls::ClientConfig, addr: std::net::SocketAddr, host: HostId) -> (Vec<u8>, Vec<u8>) {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector.connect(agent_server_name(host), tcp).await.unwrap();
    let server = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let mut echoed = Vec::new();
    tls.read_to_end(&mut echoed).await.unwrap();
    (server, echoed)
}

#[tokio::test]
async fn a_live_identity_serves_the_renewed_certificate_from_the_next_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ControlPlaneCa::create_or_load(&dir.path().join("ca")).unwrap();
    let host = HostId::new();
    let agent = enrol(&ca, host, &dir.path().join("agent"));
    let live = LiveIdentity::new(agent.tls_identity()).unwrap();
    let addr = serve(server_config_requiring_client_cert_live(&live, agent.trusted_ca()).unwrap(), 2).await;
    let cp = control_plane_identity(&ca);
    let client = || client_config(&cp, ca.trusted_ca()).unwrap();
    let (before, _) =
        tokio::time::timeout(std::time::Duration::from_secs(10), exchange(client(), addr, host)).await.unwrap();
    assert_eq!(before, agent.tls_identity().certificate_chain()[0].to_vec());

    let renewed =
        agent.install_renewal(&ca.sign_agent_csr(host, &agent.renewal_csr().unwrap(), &[]).unwrap().certificate_pem);
    let renewed = renewed.unwrap();
    live.replace(renewed.tls_identity()).unwrap();
    assert_eq!(live.certificate(), renewed.tls_identity().certificate_chain()[0]);
    let (after, _) =
        tokio::time::timeout(std::time::Duration::from_secs(10), exchange(client(), addr, host)).await.unwrap();
    assert_eq!(after, renewed.tls_identity().certificate_chain()[0].to_vec());
    assert_ne!(after, before);

    // A mismatched key and certificate is refused, and the live identity keeps what it had.
    let other = enrol(&ca, HostId::new(), &dir.path().join("other"));
    let mixed = drover_pki::TlsIdentity::from_pem(
        &read(&dir.path().join("agent/agent.cert.pem")),
        &read(&dir.path().join("other/agent.key.pem")),
    )
    .unwrap();
    assert!(live.replace(&mixed).is_err());
    assert_eq!(live.certificate(), renewed.tls_identity().certificate_chain()[0]);
    drop(other);
}

#[tokio::test]
async fn a_live_client_identity_presents_the_renewed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ControlPlaneCa::create_or_load(&dir.path().join("ca")).unwrap();
    let (a, b) = (HostId::new(), HostId::new());
    let server_agent = enrol(&ca, a, &dir.path().join("a"));
    let client_agent = enrol(&ca, b, &dir.path().join("b"));
    // The server answers with the client's certificate only to the control plane; here we read
    // which certificate the client presented from the server's side instead.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        server_config_requiring_client_cert(server_agent.tls_identity(), ca.trusted_ca()).unwrap(),
    ));
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            seen.push(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec());
            tls.shutdown().await.unwrap();
        }
        seen
    });
    let live = LiveIdentity::new(client_agent.tls_identity()).unwrap();
    let mut client = client_config_live(&live, client_agent.trusted_ca()).unwrap();
    // A resumed TLS 1.3 session carries the client authentication of the handshake it resumes
    // (the old certificate, still valid): only a full handshake shows which one is presented now.
    client.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(client);
    let connect = || async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls =
            tokio_rustls::TlsConnector::from(client.clone()).connect(agent_server_name(a), tcp).await.unwrap();
        let mut rest = Vec::new();
        let _ = tls.read_to_end(&mut rest).await;
    };
    connect().await;
    let renewed = client_agent
        .install_renewal(&ca.sign_agent_csr(b, &client_agent.renewal_csr().unwrap(), &[]).unwrap().certificate_pem)
        .unwrap();
    live.replace(renewed.tls_identity()).unwrap();
    connect().await;
    let seen = tokio::time::timeout(std::time::Duration::from_secs(10), seen).await.unwrap().unwrap();
    assert_eq!(seen[0], client_agent.tls_identity().certificate_chain()[0].to_vec());
    assert_eq!(seen[1], renewed.tls_identity().certificate_chain()[0].to_vec());
}
