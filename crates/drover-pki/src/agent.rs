//! An agent's identity: its key, the certificate the control plane signed for it, and the CA
//! it trusts.
//!
//! Its directory (0700) holds `agent.key.pem` (0600), `agent.cert.pem` and `ca.cert.pem` once
//! enrolled; while enrolling, `pending.key.pem` (0600) and `pending.csr.pem`. The pending key is
//! kept apart so that re-enrolling an agent leaves its working identity in place until the new
//! certificate is installed.
//!
//! # Renewal
//! The control plane renews an enrolled agent's certificate over the mutual-TLS connection it
//! already has, no token needed: the agent makes a new key and a CSR
//! ([`AgentIdentity::renewal_csr`]: `renew.key.pem`, `renew.csr.pem`; asked again, it answers the
//! same CSR until one is installed), the control plane signs it for the host it knows the agent
//! as, and the agent installs the certificate ([`AgentIdentity::install_renewal`]). The new key
//! and certificate are first written whole as `next.key.pem` and `next.cert.pem`, then renamed
//! over the working pair, key first. A process killed at any point leaves either the old pair,
//! or the new key with `next.cert.pem` beside it, which [`AgentIdentity::load`] finishes
//! installing: never a key without its certificate.

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
const RENEW_KEY: &str = "renew.key.pem";
const RENEW_CSR: &str = "renew.csr.pem";
const NEXT_KEY: &str = "next.key.pem";
const NEXT_CERT: &str = "next.cert.pem";

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
        let (key, csr_pem) = new_key_and_csr()?;
        files::write_private(&dir.join(PENDING_KEY), key.serialize_pem().as_bytes())?;
        files::write_public(&dir.join(PENDING_CSR), csr_pem.as_bytes())?;
        Ok(PendingAgentIdentity { dir: dir.to_path_buf(), key, csr_pem })
    }

    /// The CSR of this agent's next key, for the control plane to renew its certificate with
    /// (see the module documentation). The key is made on the first call and kept (0600) until a
    /// certificate for it is installed; later calls answer its CSR again, so a renewal retried
    /// after a lost answer signs the key the agent holds.
    pub fn renewal_csr(&self) -> Result<String> {
        let (key_path, csr_path) = (self.dir.join(RENEW_KEY), self.dir.join(RENEW_CSR));
        if files::exists(&key_path)? && files::exists(&csr_path)? {
            let csr_pem = files::read_bounded(&csr_path)?;
            if read_key(&key_path).is_ok() && csr_pem.contains("CERTIFICATE REQUEST") {
                return Ok(csr_pem);
            }
            tracing::warn!(dir = %self.dir.display(), "replacing an unreadable renewal key");
        }
        let (key, csr_pem) = new_key_and_csr()?;
        files::write_private(&key_path, key.serialize_pem().as_bytes())?;
        files::write_public(&csr_path, csr_pem.as_bytes())?;
        Ok(csr_pem)
    }

    /// Installs a renewed certificate for the key of [`AgentIdentity::renewal_csr`]: refused
    /// unless it is for that key, issued by the CA this agent trusts, valid now, and names this
    /// agent's host. Returns the new identity; the files hold it (durably) before this returns.
    pub fn install_renewal(&self, signed_cert_pem: &str) -> Result<AgentIdentity> {
        let key_path = self.dir.join(RENEW_KEY);
        if !files::exists(&key_path)? {
            return Err(PkiError::Untrusted("this agent has no renewal key waiting for a certificate".into()));
        }
        let (key, key_pem) = read_key(&key_path)?;
        let (host_id, tls) = checked_identity(&key, &key_pem, signed_cert_pem, &self.ca)?;
        if host_id != self.host_id {
            return Err(PkiError::Untrusted(format!(
                "the certificate names host {host_id}, and this agent is host {}",
                self.host_id
            )));
        }
        files::write_private(&self.dir.join(NEXT_KEY), key_pem.as_bytes())?;
        files::write_public(&self.dir.join(NEXT_CERT), signed_cert_pem.as_bytes())?;
        finish_renewal(&self.dir)?;
        files::remove_if_present(&self.dir.join(RENEW_CSR))?;
        files::remove_if_present(&key_path)?;
        tracing::info!(host = %host_id, dir = %self.dir.display(), "installed the agent's renewed certificate");
        Ok(AgentIdentity { dir: self.dir.clone(), host_id, tls, ca: self.ca.clone() })
    }

    /// When the certificate ends.
    pub fn not_after(&self) -> Result<chrono::DateTime<chrono::Utc>> {
        let cert = self.tls.chain.first().ok_or_else(|| PkiError::malformed("agent certificate", "no certificate"))?;
        crate::ca::not_after(cert)
    }

    /// Loads the enrolled identity in `dir`, checking that the certificate is the key's, was
    /// issued by the stored CA, is valid now and names a host.
    pub fn load(dir: &Path) -> Result<Self> {
        files::ensure_private_dir(dir)?;
        recover_renewal(dir)?;
        let (key, key_pem) = read_key(&dir.join(KEY))?;
        let cert_pem = files::read_bounded(&dir.join(CERT))?;
        let ca_pem = files::read_bounded(&dir.join(CA_CERT))?;
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
        recover_renewal(dir)?;
        let (key, _) = read_key(&dir.join(PENDING_KEY))?;
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

/// A private key file (0600, bounded): the key, and its PEM as read.
fn read_key(path: &Path) -> Result<(KeyPair, String)> {
    let pem = files::read_private(path)?;
    let key = KeyPair::from_pem(&pem)
        .map_err(|_| PkiError::CorruptFile { path: path.to_path_buf(), reason: "not a PEM private key".into() })?;
    Ok((key, pem))
}

/// A new key pair and its CSR.
fn new_key_and_csr() -> Result<(KeyPair, String)> {
    let key = KeyPair::generate().map_err(PkiError::Certificate)?;
    let mut params = CertificateParams::default();
    // The control plane ignores every name in the request (it writes its own); this one is
    // for people reading it.
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "drover agent");
    params.distinguished_name = dn;
    let csr_pem = params.serialize_request(&key).and_then(|csr| csr.pem()).map_err(PkiError::Certificate)?;
    Ok((key, csr_pem))
}

/// Renames the staged pair over the working one, key first (each rename durable): see the
/// module documentation.
fn finish_renewal(dir: &Path) -> Result<()> {
    let publish = |from: &str, to: &str| {
        let (from, to) = (dir.join(from), dir.join(to));
        drover_qemu::durable::publish_blocking(&from, &to).map_err(PkiError::io("installing", &to))
    };
    if files::exists(&dir.join(NEXT_KEY))? {
        publish(NEXT_KEY, KEY)?;
    }
    publish(NEXT_CERT, CERT)
}

/// Finishes or forgets a renewal a killed process left staged. `next.cert.pem` is written after
/// `next.key.pem`, so without it the staged key is an unfinished write, forgotten (the renewal
/// key stays, and the control plane's next try installs it). With it, the staged certificate is
/// installed if it is for the staged key (or, that one already renamed, for the working key).
fn recover_renewal(dir: &Path) -> Result<()> {
    let (next_key, next_cert) = (dir.join(NEXT_KEY), dir.join(NEXT_CERT));
    if !files::exists(&next_cert)? {
        return files::remove_if_present(&next_key);
    }
    let key_path = if files::exists(&next_key)? { next_key.clone() } else { dir.join(KEY) };
    let ca = TrustedCa::from_pem(&files::read_bounded(&dir.join(CA_CERT))?)?;
    let staged = (|| {
        let (key, key_pem) = read_key(&key_path)?;
        checked_identity(&key, &key_pem, &files::read_bounded(&next_cert)?, &ca)
    })();
    match staged {
        Ok((host, _)) => {
            finish_renewal(dir)?;
            tracing::info!(%host, dir = %dir.display(), "finished installing a renewed certificate");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "forgetting a staged renewal that does not check: {e}");
            files::remove_if_present(&next_key)?;
            files::remove_if_present(&next_cert)
        }
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
