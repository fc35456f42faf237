//! An agent's identity: its key, the certificate the control plane signed for it, and the CA
//! it trusts.
//!
//! Its directory (0700) holds `agent.key.pem` (0600), `agent.cert.pem` and `ca.cert.pem` once
//! enrolled; while enrolling, `pending.key.pem` (0600) and `pending.csr.pem`. The pending key is
//! kept apart so that re-enrolling an agent leaves its working identity in place until the new
//! certificate is installed.

use std::path::{Path, PathBuf};

use drover_types::HostId;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

use crate::ca::spki_key;
use crate::error::{PkiError, Result};
use crate::files;
use crate::names::{PeerIdentity, certificate_identity};
use crate::tls::{TlsIdentity, TrustedCa, parse_certificates};

const KEY: &str = "agent.key.pem";
const CERT: &str = "agent.cert.pem";
const CA_CERT: &str = "ca.cert.pem";
const PENDING_KEY: &str = "pending.key.pem";
const PENDING_CSR: &str = "pending.csr.pem";

/// An enrolled agent's identity.
#[derive(Debug, Clone)]
pub struct AgentIdentity {
    dir: PathBuf,
    host_id: HostId,
    tls: TlsIdentity,
    ca: TrustedCa,
}

/// A key and its CSR, waiting for the control plane's signature.
pub struct PendingAgentIdentity {
    dir: PathBuf,
    key: KeyPair,
    csr_pem: String,
}

impl std::fmt::Debug for PendingAgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAgentIdentity").field("dir", &self.dir).finish_non_exhaustive()
    }
}

impl AgentIdentity {
    /// Makes a new key pair in `dir` (created 0700 if missing; the key 0600) and its CSR, to
    /// send with the enrolment token. A pending key from an earlier attempt is replaced; an
    /// installed identity is left alone until [`PendingAgentIdentity::install`].
    pub fn generate(dir: &Path) -> Result<PendingAgentIdentity> {
        files::ensure_private_dir(dir)?;
        let key = KeyPair::generate().map_err(PkiError::Certificate)?;
        let mut params = CertificateParams::default();
        // The control plane ignores every name in the request (it writes its own); this one is
        // for people reading it.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "drover agent");
        params.distinguished_name = dn;
        let csr_pem = params.serialize_request(&key).and_then(|csr| csr.pem()).map_err(PkiError::Certificate)?;
        files::write_private(&dir.join(PENDING_KEY), key.serialize_pem().as_bytes())?;
        files::write_public(&dir.join(PENDING_CSR), csr_pem.as_bytes())?;
        Ok(PendingAgentIdentity { dir: dir.to_path_buf(), key, csr_pem })
    }

    /// Loads the enrolled identity in `dir`, checking that the certificate is the key's, was
    /// issued by the stored CA, is valid now and names a host.
    pub fn load(dir: &Path) -> Result<Self> {
        files::ensure_private_dir(dir)?;
        let key_pem = files::read_private(&dir.join(KEY))?;
        let cert_pem = files::read_bounded(&dir.join(CERT))?;
        let ca_pem = files::read_bounded(&dir.join(CA_CERT))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|_| PkiError::CorruptFile { path: dir.join(KEY), reason: "not a PEM private key".into() })?;
        let ca = TrustedCa::from_pem(&ca_pem)
            .map_err(|e| PkiError::CorruptFile { path: dir.join(CA_CERT), reason: e.to_string() })?;
        let (host_id, tls) = checked_identity(&key, &key_pem, &cert_pem, &ca).map_err(|e| match e {
            PkiError::Malformed { reason, .. } => PkiError::CorruptFile { path: dir.join(CERT), reason },
            other => other,
        })?;
        Ok(AgentIdentity { dir: dir.to_path_buf(), host_id, tls, ca })
    }

    pub fn host_id(&self) -> HostId {
        self.host_id
    }
    /// What the agent presents, as a server and as a client.
    pub fn tls_identity(&self) -> &TlsIdentity {
        &self.tls
    }
    /// The control plane's CA.
    pub fn trusted_ca(&self) -> &TrustedCa {
        &self.ca
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl PendingAgentIdentity {
    /// The pending key and CSR in `dir`, from an earlier [`AgentIdentity::generate`].
    pub fn load(dir: &Path) -> Result<Self> {
        files::ensure_private_dir(dir)?;
        let key_pem = files::read_private(&dir.join(PENDING_KEY))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|_| PkiError::CorruptFile {
            path: dir.join(PENDING_KEY),
            reason: "not a PEM private key".into(),
        })?;
        let csr_pem = files::read_bounded(&dir.join(PENDING_CSR))?;
        Ok(PendingAgentIdentity { dir: dir.to_path_buf(), key, csr_pem })
    }

    /// The CSR, in PEM, to send to the control plane.
    pub fn csr_pem(&self) -> &str {
        &self.csr_pem
    }

    /// Installs the certificate the control plane signed, with its CA: refused unless the
    /// certificate is for this key, issued by that CA, valid now, and names a host. The caller
    /// has checked `ca_pem` against the token's pin ([`TrustedCa::from_pem_pinned`]), or got it
    /// over a connection made with [`crate::enrolment_client_config`].
    pub fn install(self, signed_cert_pem: &str, ca_pem: &str) -> Result<AgentIdentity> {
        let ca = TrustedCa::from_pem(ca_pem)?;
        let key_pem = self.key.serialize_pem();
        let (host_id, tls) = checked_identity(&self.key, &key_pem, signed_cert_pem, &ca)?;
        // Key first: a crash part-way leaves a key that does not match the old certificate,
        // which `load` refuses, never a certificate that others could take for ours.
        files::write_private(&self.dir.join(KEY), key_pem.as_bytes())?;
        files::write_public(&self.dir.join(CA_CERT), ca.pem().as_bytes())?;
        files::write_public(&self.dir.join(CERT), signed_cert_pem.as_bytes())?;
        files::remove_if_present(&self.dir.join(PENDING_KEY))?;
        files::remove_if_present(&self.dir.join(PENDING_CSR))?;
        tracing::info!(host = %host_id, dir = %self.dir.display(), "installed the agent's certificate");
        Ok(AgentIdentity { dir: self.dir, host_id, tls, ca })
    }
}

/// Checks a signed certificate against our key and the CA, and reads the host it names.
fn checked_identity(key: &KeyPair, key_pem: &str, cert_pem: &str, ca: &TrustedCa) -> Result<(HostId, TlsIdentity)> {
    let certs = parse_certificates("agent certificate", cert_pem)?;
    let [cert] = certs.as_slice() else {
        return Err(PkiError::malformed("agent certificate", format!("{} certificates, expected one", certs.len())));
    };
    if spki_key(cert)? != key.public_key_raw() {
        return Err(PkiError::Untrusted("the certificate is not for this agent's key".into()));
    }
    ca.verify_client_certificate(cert)?;
    let PeerIdentity::Host(host_id) = certificate_identity(cert)? else {
        return Err(PkiError::Untrusted("the certificate does not name a host".into()));
    };
    let tls = TlsIdentity::from_pem(cert_pem, key_pem)?;
    Ok((host_id, tls))
}
