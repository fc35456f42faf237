//! Shared set-up: a control plane's CA and enrolled agents in temporary directories.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use drover_pki::{AgentIdentity, ControlPlaneCa, EnrolmentToken, PresentedToken, SubjectName, TlsIdentity};
use drover_types::HostId;

/// What the control plane does for one enrolment, and what the agent does with the answer.
pub fn enrol(ca: &ControlPlaneCa, host_id: HostId, agent_dir: &Path) -> AgentIdentity {
    let token = EnrolmentToken::new(host_id, Duration::from_secs(600), &ca.fingerprint());
    let mut record = token.record().clone();
    // The agent.
    let presented = PresentedToken::parse(token.secret()).unwrap();
    assert_eq!(presented.ca_fingerprint(), ca.fingerprint());
    let pending = AgentIdentity::generate(agent_dir).unwrap();
    // The control plane.
    assert_eq!(presented.hash(), record.token_hash);
    record.verify(&presented, host_id, drover_types::now()).unwrap();
    record.consume(drover_types::now());
    let issued = ca.sign_agent_csr(host_id, pending.csr_pem(), &[]).unwrap();
    // The agent again.
    let identity = pending.install(&issued.certificate_pem, &issued.ca_pem).unwrap();
    assert_eq!(identity.host_id(), host_id);
    identity
}

pub fn control_plane_names() -> Vec<SubjectName> {
    vec!["localhost".parse().unwrap(), "127.0.0.1".parse().unwrap()]
}

pub fn control_plane_identity(ca: &ControlPlaneCa) -> TlsIdentity {
    ca.control_plane_identity(&control_plane_names()).unwrap()
}

pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}
