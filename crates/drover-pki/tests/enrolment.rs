//! Enrolment without the network: tokens, CSRs, certificates and the files they live in.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use base64::Engine as _;
use common::{control_plane_names, enrol, mode};
use drover_pki::{
    AgentIdentity, ControlPlaneCa, EnrolmentToken, PeerIdentity, PendingAgentIdentity, PkiError, PkiErrorKind,
    PresentedToken, SubjectName, TrustedCa, peer_identity,
};
use drover_types::HostId;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

fn minutes(n: i64) -> chrono::TimeDelta {
    chrono::TimeDelta::minutes(n)
}

fn ca_in(dir: &tempfile::TempDir) -> ControlPlaneCa {
    ControlPlaneCa::create_or_load(&dir.path().join("ca")).unwrap()
}

#[test]
fn a_token_enrols_its_host_once_and_before_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(&dir);
    let host = HostId::new();
    let now = drover_types::now();
    let token = EnrolmentToken::new_at(host, Duration::from_secs(15 * 60), &ca.fingerprint(), now);
    let presented = PresentedToken::parse(token.secret()).unwrap();
    let mut record = token.record().clone();

    // Expired: exactly at the expiry and after.
    let err = record.verify(&presented, host, now + minutes(15)).unwrap_err();
    assert!(matches!(err, PkiError::TokenExpired(_)), "{err}");
    assert_eq!(err.kind(), PkiErrorKind::Expired);
    assert_eq!(record.verify(&presented, host, now + minutes(60)).unwrap_err().kind(), PkiErrorKind::Expired);

    // A token for host A cannot enrol another host.
    let err = record.verify(&presented, HostId::new(), now).unwrap_err();
    assert!(matches!(err, PkiError::TokenHostMismatch), "{err}");
    assert_eq!(err.kind(), PkiErrorKind::Unauthorized);

    // Another token (even for the same host) does not match this record.
    let other = EnrolmentToken::new_at(host, Duration::from_secs(600), &ca.fingerprint(), now);
    let err = record.verify(&PresentedToken::parse(other.secret()).unwrap(), host, now).unwrap_err();
    assert!(matches!(err, PkiError::TokenInvalid), "{err}");

    // Good once; then consumed.
    record.verify(&presented, host, now + minutes(14)).unwrap();
    record.consume(now + minutes(14));
    let err = record.verify(&presented, host, now + minutes(14)).unwrap_err();
    assert!(matches!(err, PkiError::TokenConsumed), "{err}");
    assert_eq!(err.kind(), PkiErrorKind::Unauthorized);

    // The domain error the HTTP layer may use instead.
    assert!(matches!(drover_types::Error::from(err), drover_types::Error::Unauthorized(_)));
}

#[test]
fn key_files_are_0600_and_directories_0700() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("nested/ca");
    let ca = ControlPlaneCa::create_or_load(&ca_dir).unwrap();
    ca.control_plane_identity(&control_plane_names()).unwrap();
    assert_eq!(mode(&ca_dir), 0o700);
    assert_eq!(mode(&ca_dir.join("ca.key.pem")), 0o600);
    assert_eq!(mode(&ca_dir.join("control-plane.key.pem")), 0o600);
    assert_eq!(mode(&ca_dir.join("ca.cert.pem")) & 0o077, 0o044, "certificates are public");

    let agent_dir = dir.path().join("agent");
    let pending = AgentIdentity::generate(&agent_dir).unwrap();
    assert_eq!(mode(&agent_dir), 0o700);
    assert_eq!(mode(&agent_dir.join("pending.key.pem")), 0o600);
    let issued = ca.sign_agent_csr(HostId::new(), pending.csr_pem(), &[]).unwrap();
    pending.install(&issued.certificate_pem, &issued.ca_pem).unwrap();
    assert_eq!(mode(&agent_dir.join("agent.key.pem")), 0o600);
    assert!(!agent_dir.join("pending.key.pem").exists());
    let loaded = AgentIdentity::load(&agent_dir).unwrap();
    assert_eq!(mode(&agent_dir), 0o700);
    assert_eq!(loaded.trusted_ca().fingerprint(), ca.fingerprint());
}

#[test]
fn private_files_that_others_can_read_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    ControlPlaneCa::create_or_load(&ca_dir).unwrap();

    std::fs::set_permissions(ca_dir.join("ca.key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = ControlPlaneCa::load(&ca_dir).unwrap_err();
    assert!(matches!(err, PkiError::InsecurePermissions { mode: 0o644, .. }), "{err}");
    std::fs::set_permissions(ca_dir.join("ca.key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();

    std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = ControlPlaneCa::create_or_load(&ca_dir).unwrap_err();
    assert!(matches!(err, PkiError::InsecurePermissions { mode: 0o755, .. }), "{err}");
    std::fs::set_permissions(&ca_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    ControlPlaneCa::load(&ca_dir).unwrap();

    let agent_dir = dir.path().join("agent");
    enrol(&ControlPlaneCa::load(&ca_dir).unwrap(), HostId::new(), &agent_dir);
    std::fs::set_permissions(agent_dir.join("agent.key.pem"), std::fs::Permissions::from_mode(0o640)).unwrap();
    assert!(matches!(AgentIdentity::load(&agent_dir).unwrap_err(), PkiError::InsecurePermissions { .. }));
}

#[test]
fn a_reloaded_ca_signs_certificates_that_chain_to_the_stored_one() {
    let dir = tempfile::tempdir().unwrap();
    let first = ca_in(&dir);
    let original_pem = first.certificate_pem().to_string();
    drop(first);
    let reloaded = ca_in(&dir);
    assert_eq!(reloaded.certificate_pem(), original_pem);
    let host = HostId::new();
    let pending = AgentIdentity::generate(&dir.path().join("agent")).unwrap();
    let issued = reloaded.sign_agent_csr(host, pending.csr_pem(), &[]).unwrap();
    let identity = pending.install(&issued.certificate_pem, &original_pem).unwrap();
    assert_eq!(identity.host_id(), host);
}

/// The CSR's DER, with one byte of its subject changed, back in PEM.
fn tampered(csr_pem: &str) -> String {
    let der = rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).unwrap();
    let mut bytes = der.as_ref().to_vec();
    let at = bytes.windows(b"drover agent".len()).position(|w| w == b"drover agent").expect("the CN is in the CSR");
    bytes[at] = b'D';
    let body = base64::engine::general_purpose::STANDARD.encode(&bytes);
    format!("-----BEGIN CERTIFICATE REQUEST-----\n{body}\n-----END CERTIFICATE REQUEST-----\n")
}

#[test]
fn a_tampered_oversized_or_malformed_csr_is_refused_as_a_bad_request() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(&dir);
    let pending = AgentIdentity::generate(&dir.path().join("agent")).unwrap();
    let host = HostId::new();

    let err = ca.sign_agent_csr(host, &tampered(pending.csr_pem()), &[]).unwrap_err();
    assert!(matches!(err, PkiError::CsrRefused(_)), "{err}");
    assert_eq!(err.kind(), PkiErrorKind::BadRequest);

    let huge = format!("{}{}", pending.csr_pem(), " ".repeat(drover_pki::MAX_CSR_PEM));
    let err = ca.sign_agent_csr(host, &huge, &[]).unwrap_err();
    assert!(matches!(err, PkiError::TooLarge { .. }), "{err}");
    assert_eq!(err.kind(), PkiErrorKind::BadRequest);

    for garbage in ["", "hello", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"] {
        assert_eq!(ca.sign_agent_csr(host, garbage, &[]).unwrap_err().kind(), PkiErrorKind::BadRequest, "{garbage:?}");
    }
    // A certificate is not a CSR.
    assert_eq!(ca.sign_agent_csr(host, ca.certificate_pem(), &[]).unwrap_err().kind(), PkiErrorKind::BadRequest);

    // The untampered one is fine.
    ca.sign_agent_csr(host, pending.csr_pem(), &[]).unwrap();
}

#[test]
fn the_ca_ignores_every_name_a_csr_asks_for() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(&dir);
    let victim = HostId::new();
    // A CSR asking to be the control plane and another host.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![drover_pki::agent_dns_name(victim)]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI("urn:drover:control-plane".try_into().unwrap()));
    params.subject_alt_names.push(rcgen::SanType::URI(format!("urn:drover:host:{}", victim.0).try_into().unwrap()));
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();

    let host = HostId::new();
    let extra: SubjectName = "10.1.2.3".parse().unwrap();
    let issued = ca.sign_agent_csr(host, &csr, std::slice::from_ref(&extra)).unwrap();
    let der = CertificateDer::from_pem_slice(issued.certificate_pem.as_bytes()).unwrap();
    assert_eq!(peer_identity(std::slice::from_ref(&der)).unwrap(), PeerIdentity::Host(host));
    let text = String::from_utf8_lossy(der.as_ref()).into_owned();
    assert!(!text.contains("urn:drover:control-plane"));
    assert!(!text.contains(&victim.0.to_string()));
    assert!(text.contains(&drover_pki::agent_dns_name(host)));
}

#[test]
fn an_agent_installs_only_a_certificate_for_its_key_from_the_given_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(&dir);
    let other_ca = ControlPlaneCa::create_or_load(&dir.path().join("other-ca")).unwrap();
    let host = HostId::new();
    let agent_dir = dir.path().join("agent");
    let pending = AgentIdentity::generate(&agent_dir).unwrap();

    // A certificate for another agent's key.
    let someone_else = AgentIdentity::generate(&dir.path().join("someone-else")).unwrap();
    let theirs = ca.sign_agent_csr(host, someone_else.csr_pem(), &[]).unwrap();
    let err = pending.install(&theirs.certificate_pem, &theirs.ca_pem).unwrap_err();
    assert!(matches!(err, PkiError::Untrusted(_)), "{err}");

    // Our key, but another CA's signature, presented with our CA.
    let pending = PendingAgentIdentity::load(&agent_dir).unwrap();
    let foreign = other_ca.sign_agent_csr(host, pending.csr_pem(), &[]).unwrap();
    let err = pending.install(&foreign.certificate_pem, ca.certificate_pem()).unwrap_err();
    assert!(matches!(err, PkiError::Untrusted(_)), "{err}");
    assert!(!agent_dir.join("agent.key.pem").exists(), "nothing installed");

    // Resumed after a restart, the right one installs.
    let pending = PendingAgentIdentity::load(&agent_dir).unwrap();
    let ours = ca.sign_agent_csr(host, pending.csr_pem(), &[]).unwrap();
    let identity = pending.install(&ours.certificate_pem, &ours.ca_pem).unwrap();
    assert_eq!(AgentIdentity::load(&agent_dir).unwrap().host_id(), identity.host_id());
}

#[test]
fn re_enrolling_keeps_the_working_identity_until_the_new_one_is_installed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(&dir);
    let host = HostId::new();
    let agent_dir = dir.path().join("agent");
    let first = enrol(&ca, host, &agent_dir);
    let _pending = AgentIdentity::generate(&agent_dir).unwrap();
    let still = AgentIdentity::load(&agent_dir).unwrap();
    assert_eq!(still.tls_identity().certificate_chain(), first.tls_identity().certificate_chain());
}

#[test]
fn an_enrolling_agent_checks_the_ca_against_its_pin() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(&dir);
    let other = ControlPlaneCa::create_or_load(&dir.path().join("other")).unwrap();
    TrustedCa::from_pem_pinned(ca.certificate_pem(), &ca.fingerprint()).unwrap();
    let err = TrustedCa::from_pem_pinned(other.certificate_pem(), &ca.fingerprint()).unwrap_err();
    assert!(matches!(err, PkiError::CaPinMismatch));
    assert_eq!(err.kind(), PkiErrorKind::Unauthorized);
    assert_ne!(ca.fingerprint(), other.fingerprint());
    assert!(ca.fingerprint().to_string().starts_with("blake3:"));
}

#[test]
fn the_control_plane_identity_is_kept_while_its_names_stay_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(&dir);
    let first = ca.control_plane_identity(&control_plane_names()).unwrap();
    assert_eq!(first.certificate_chain().len(), 2, "the CA travels in the chain");
    assert_eq!(peer_identity(first.certificate_chain()).unwrap(), PeerIdentity::ControlPlane);
    let mut reordered = control_plane_names();
    reordered.reverse();
    let again = ca.control_plane_identity(&reordered).unwrap();
    assert_eq!(again.certificate_chain(), first.certificate_chain());
    let mut more = control_plane_names();
    more.push("cp.example.com".parse().unwrap());
    let renamed = ca.control_plane_identity(&more).unwrap();
    assert_ne!(renamed.certificate_chain()[0], first.certificate_chain()[0]);
}

#[test]
fn private_keys_stay_out_of_debug_output() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(&dir);
    let issued = ca.issue_control_plane_identity(&control_plane_names()).unwrap();
    let key_body: String = issued.key_pem().lines().nth(1).unwrap().to_string();
    assert!(!format!("{issued:?}").contains(&key_body));
    let identity = issued.tls_identity().unwrap();
    assert!(format!("{identity:?}").contains("redacted"));
    let agent = enrol(&ca, HostId::new(), &dir.path().join("agent"));
    let agent_key = std::fs::read_to_string(dir.path().join("agent/agent.key.pem")).unwrap();
    assert!(!format!("{agent:?}").contains(agent_key.lines().nth(1).unwrap()));
    let pending = AgentIdentity::generate(&dir.path().join("agent")).unwrap();
    let pending_key = std::fs::read_to_string(dir.path().join("agent/pending.key.pem")).unwrap();
    assert!(!format!("{pending:?}").contains(pending_key.lines().nth(1).unwrap()));
    assert!(!format!("{ca:?}").contains("PRIVATE"));
}

#[test]
fn an_agent_certificate_is_a_one_year_leaf_for_client_and_server_authentication() {
    use x509_parser::extensions::ParsedExtension;
    let dir = tempfile::tempdir().unwrap();
    let ca = ca_in(&dir);
    let host = HostId::new();
    let agent = enrol(&ca, host, &dir.path().join("agent"));
    let chain = agent.tls_identity().certificate_chain();
    assert_eq!(drover_pki::peer_host_id(chain).unwrap(), host);
    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let validity = cert.validity();
    let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86_400;
    assert_eq!(days, drover_pki::LEAF_VALIDITY_DAYS);
    assert!(!cert.is_ca());
    assert_eq!(cert.subject().iter_common_name().next().unwrap().as_str().unwrap(), host.0.to_string());
    let eku = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::ExtendedKeyUsage(eku) => Some(eku.clone()),
            _ => None,
        })
        .unwrap();
    assert!(eku.client_auth && eku.server_auth && !eku.any);

    // The control plane is not an agent.
    let control_plane = ca.control_plane_identity(&control_plane_names()).unwrap();
    assert_eq!(
        drover_pki::peer_host_id(control_plane.certificate_chain()).unwrap_err().kind(),
        PkiErrorKind::Unauthorized
    );
    assert!(drover_pki::peer_identity(&[]).is_err());
}
