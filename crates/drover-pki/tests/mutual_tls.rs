//! Real TLS handshakes on 127.0.0.1 between the control plane and agents, with certificates from
//! the CA, from another CA, self-signed, and none.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{control_plane_identity, enrol};
use drover_pki::{
    CaFingerprint, ControlPlaneCa, PeerIdentity, TlsIdentity, TrustedCa, agent_server_name, client_config,
    crypto_provider, enrolment_client_config, peer_identity, server_config_optional_client_cert,
    server_config_requiring_client_cert,
};
use drover_types::HostId;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const LIMIT: Duration = Duration::from_secs(10);

/// What the server saw of one connection: the peer's identity (None: no certificate), or why
/// the handshake failed.
type Served = Result<Option<PeerIdentity>, String>;

/// Serves one connection: on a completed handshake, reads who connected and answers with it.
async fn serve_once(config: ServerConfig) -> (SocketAddr, JoinHandle<Served>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let identity = match tls.get_ref().1.peer_certificates() {
            Some(certs) => Some(peer_identity(certs).map_err(|e| e.to_string())?),
            None => None,
        };
        tls.write_all(format!("hello {identity:?}\n").as_bytes()).await.map_err(|e| e.to_string())?;
        tls.shutdown().await.map_err(|e| e.to_string())?;
        Ok(identity)
    });
    (addr, task)
}

/// Connects and reads the server's greeting. Under TLS 1.3 the client's handshake completes
/// before the server has checked the client's certificate, so a refusal shows on the read.
async fn connect(config: ClientConfig, addr: SocketAddr, name: ServerName<'static>) -> Result<String, String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(tls).read_line(&mut line).await.map_err(|e| e.to_string())?;
    if line.is_empty() {
        return Err("the server closed the connection".into());
    }
    Ok(line)
}

/// One connection, both ends, with a time limit.
async fn handshake(
    server: ServerConfig,
    client: ClientConfig,
    name: ServerName<'static>,
) -> (Served, Result<String, String>) {
    tokio::time::timeout(LIMIT, async {
        let (addr, served) = serve_once(server).await;
        let client = connect(client, addr, name).await;
        (served.await.unwrap(), client)
    })
    .await
    .expect("the handshake finished in time")
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// A client config trusting `ca` that presents no certificate.
fn anonymous_client(ca: &TrustedCa) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A self-signed certificate that claims to be host `host_id`, the way drover's own would.
fn self_signed_claiming(host_id: HostId) -> TlsIdentity {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![drover_pki::agent_dns_name(host_id)]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(format!("urn:drover:host:{}", host_id.0).try_into().unwrap()));
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.self_signed(&key).unwrap();
    TlsIdentity::from_pem(&cert.pem(), &key.serialize_pem()).unwrap()
}

struct World {
    _dir: tempfile::TempDir,
    ca: ControlPlaneCa,
    control_plane: TlsIdentity,
    agent_a: drover_pki::AgentIdentity,
    agent_b: drover_pki::AgentIdentity,
    /// An agent enrolled with another control plane's CA.
    foreign_agent: drover_pki::AgentIdentity,
    foreign_ca: ControlPlaneCa,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let ca = ControlPlaneCa::create_or_load(&dir.path().join("ca")).unwrap();
    let control_plane = control_plane_identity(&ca);
    let agent_a = enrol(&ca, HostId::new(), &dir.path().join("agent-a"));
    let agent_b = enrol(&ca, HostId::new(), &dir.path().join("agent-b"));
    let foreign_ca = ControlPlaneCa::create_or_load(&dir.path().join("foreign-ca")).unwrap();
    // The same host id as agent A: only the issuer differs.
    let foreign_agent = enrol(&foreign_ca, agent_a.host_id(), &dir.path().join("foreign-agent"));
    World { _dir: dir, ca, control_plane, agent_a, agent_b, foreign_agent, foreign_ca }
}

fn agent_server(w: &World, agent: &drover_pki::AgentIdentity) -> ServerConfig {
    server_config_requiring_client_cert(agent.tls_identity(), w.ca.trusted_ca()).unwrap()
}

fn control_plane_server(w: &World) -> ServerConfig {
    server_config_optional_client_cert(&w.control_plane, w.ca.trusted_ca()).unwrap()
}

#[tokio::test]
async fn an_enrolled_agent_connects_to_the_control_plane_which_sees_its_host_id() {
    let w = world();
    let client = client_config(w.agent_a.tls_identity(), w.agent_a.trusted_ca()).unwrap();
    let (served, answered) = handshake(control_plane_server(&w), client, localhost()).await;
    assert_eq!(served.unwrap(), Some(PeerIdentity::Host(w.agent_a.host_id())));
    assert!(answered.unwrap().starts_with("hello"));
}

#[tokio::test]
async fn the_control_plane_connects_to_an_agent_by_its_host_name_and_the_agent_sees_the_control_plane() {
    let w = world();
    let client = client_config(&w.control_plane, w.ca.trusted_ca()).unwrap();
    let (served, answered) =
        handshake(agent_server(&w, &w.agent_a), client, agent_server_name(w.agent_a.host_id())).await;
    assert_eq!(served.unwrap(), Some(PeerIdentity::ControlPlane));
    answered.unwrap();
}

#[tokio::test]
async fn a_peer_agent_connects_to_an_agent_which_sees_the_peers_host_id() {
    let w = world();
    let client = client_config(w.agent_b.tls_identity(), w.agent_b.trusted_ca()).unwrap();
    let (served, answered) =
        handshake(agent_server(&w, &w.agent_a), client, agent_server_name(w.agent_a.host_id())).await;
    assert_eq!(served.unwrap(), Some(PeerIdentity::Host(w.agent_b.host_id())));
    answered.unwrap();
}

#[tokio::test]
async fn an_agent_server_refuses_a_client_without_any_certificate() {
    let w = world();
    let client = anonymous_client(w.ca.trusted_ca());
    let (served, answered) =
        handshake(agent_server(&w, &w.agent_a), client, agent_server_name(w.agent_a.host_id())).await;
    let refusal = served.unwrap_err();
    assert!(refusal.contains("no certificates"), "{refusal}");
    answered.unwrap_err();
}

#[tokio::test]
async fn an_agent_server_refuses_a_client_whose_certificate_another_ca_signed() {
    let w = world();
    // The client trusts our CA for the server, but presents the other CA's certificate.
    let client = client_config(w.foreign_agent.tls_identity(), w.ca.trusted_ca()).unwrap();
    let (served, answered) =
        handshake(agent_server(&w, &w.agent_a), client, agent_server_name(w.agent_a.host_id())).await;
    let refusal = served.unwrap_err();
    assert!(refusal.contains("UnknownIssuer"), "{refusal}");
    answered.unwrap_err();
}

#[tokio::test]
async fn an_agent_server_refuses_a_self_signed_client_certificate_that_claims_a_host() {
    let w = world();
    let client = client_config(&self_signed_claiming(w.agent_b.host_id()), w.ca.trusted_ca()).unwrap();
    let (served, answered) =
        handshake(agent_server(&w, &w.agent_a), client, agent_server_name(w.agent_a.host_id())).await;
    let refusal = served.unwrap_err();
    assert!(refusal.contains("UnknownIssuer"), "{refusal}");
    answered.unwrap_err();
}

#[tokio::test]
async fn the_control_plane_refuses_an_agent_certificate_another_ca_signed() {
    let w = world();
    let client = client_config(w.foreign_agent.tls_identity(), w.ca.trusted_ca()).unwrap();
    let (served, answered) = handshake(control_plane_server(&w), client, localhost()).await;
    let refusal = served.unwrap_err();
    assert!(refusal.contains("UnknownIssuer"), "{refusal}");
    answered.unwrap_err();
}

#[tokio::test]
async fn the_control_plane_refuses_a_self_signed_agent_certificate() {
    let w = world();
    let client = client_config(&self_signed_claiming(w.agent_a.host_id()), w.ca.trusted_ca()).unwrap();
    let (served, answered) = handshake(control_plane_server(&w), client, localhost()).await;
    let refusal = served.unwrap_err();
    assert!(refusal.contains("UnknownIssuer"), "{refusal}");
    answered.unwrap_err();
}

#[tokio::test]
async fn the_control_plane_lets_a_client_without_a_certificate_in_but_it_has_no_identity() {
    let w = world();
    let (served, answered) =
        handshake(control_plane_server(&w), anonymous_client(w.ca.trusted_ca()), localhost()).await;
    assert_eq!(served.unwrap(), None);
    answered.unwrap();
}

#[tokio::test]
async fn one_agent_cannot_answer_for_another() {
    let w = world();
    // The control plane means to reach agent B but lands on agent A.
    let client = client_config(&w.control_plane, w.ca.trusted_ca()).unwrap();
    let (_, answered) = handshake(agent_server(&w, &w.agent_a), client, agent_server_name(w.agent_b.host_id())).await;
    let refusal = answered.unwrap_err();
    assert!(refusal.contains("not valid for name"), "{refusal}");
}

#[tokio::test]
async fn an_agent_refuses_a_control_plane_whose_certificate_another_ca_signed() {
    let w = world();
    let impostor = control_plane_identity(&w.foreign_ca);
    let server = server_config_optional_client_cert(&impostor, w.foreign_ca.trusted_ca()).unwrap();
    let client = client_config(w.agent_a.tls_identity(), w.agent_a.trusted_ca()).unwrap();
    let (_, answered) = handshake(server, client, localhost()).await;
    let refusal = answered.unwrap_err();
    assert!(refusal.contains("UnknownIssuer"), "{refusal}");
}

#[tokio::test]
async fn an_enrolling_agent_trusts_only_the_control_plane_its_token_pins() {
    let w = world();
    // The right pin: the handshake completes without a client certificate.
    let client = enrolment_client_config(&w.ca.fingerprint()).unwrap();
    let (served, answered) = handshake(control_plane_server(&w), client, localhost()).await;
    assert_eq!(served.unwrap(), None);
    answered.unwrap();

    // Another control plane (a man in the middle with a CA of its own) is refused before the
    // token is sent.
    let impostor = control_plane_identity(&w.foreign_ca);
    let server = server_config_optional_client_cert(&impostor, w.foreign_ca.trusted_ca()).unwrap();
    let client = enrolment_client_config(&w.ca.fingerprint()).unwrap();
    let (_, answered) = handshake(server, client, localhost()).await;
    let refusal = answered.unwrap_err();
    assert!(refusal.contains("UnknownIssuer"), "{refusal}");

    // The right CA, but a certificate for another name.
    let client = enrolment_client_config(&w.ca.fingerprint()).unwrap();
    let (_, answered) =
        handshake(control_plane_server(&w), client, ServerName::try_from("elsewhere.example").unwrap()).await;
    answered.unwrap_err();

    // A pin that matches nothing.
    let client = enrolment_client_config(&CaFingerprint::of_der(b"nothing")).unwrap();
    let (_, answered) = handshake(control_plane_server(&w), client, localhost()).await;
    let refusal = answered.unwrap_err();
    assert!(refusal.contains("UnknownIssuer"), "{refusal}");
}
