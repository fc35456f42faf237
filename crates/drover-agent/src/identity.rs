//! The agent's own certificate, renewed by the control plane over the agent API (see
//! [`drover_pki::AgentIdentity::renewal_csr`] for the files): `POST /v1/identity/renewal`
//! answers the CSR of the agent's next key, `PUT /v1/identity/certificate` installs the
//! certificate signed for it. From then on the agent API's listener, the data listener and the
//! agent's connections to other agents present the new certificate (their configs read it from
//! one [`LiveIdentity`]) without a restart; connections already open keep the old one, which
//! stays valid until it ends.

use drover_agent_api::{AgentError, AgentResult};
use drover_pki::{AgentIdentity, LiveIdentity, PkiError, PkiErrorKind};

/// The identity an agent presents, and the one place that replaces it.
#[derive(Debug)]
pub struct IdentityKeeper {
    current: tokio::sync::Mutex<AgentIdentity>,
    live: LiveIdentity,
}

impl IdentityKeeper {
    pub fn new(identity: AgentIdentity) -> AgentResult<IdentityKeeper> {
        let live = LiveIdentity::new(identity.tls_identity()).map_err(pki_error)?;
        Ok(IdentityKeeper { current: tokio::sync::Mutex::new(identity), live })
    }

    /// What the agent's TLS configs present.
    pub fn live(&self) -> &LiveIdentity {
        &self.live
    }

    /// The CSR of the agent's next key (the same until a certificate for it is installed).
    pub async fn renewal_csr(&self) -> AgentResult<String> {
        let identity = self.current.lock().await;
        blocking(|| identity.renewal_csr())
    }

    /// Installs a renewed certificate and presents it from the next handshake on. Returns when
    /// it ends.
    pub async fn install(&self, certificate_pem: &str) -> AgentResult<chrono::DateTime<chrono::Utc>> {
        let mut identity = self.current.lock().await;
        let renewed = blocking(|| identity.install_renewal(certificate_pem))?;
        self.live.replace(renewed.tls_identity()).map_err(pki_error)?;
        let not_after = renewed.not_after().map_err(pki_error)?;
        *identity = renewed;
        Ok(not_after)
    }
}

/// File I/O of a few KiB, fsynced: on the worker, telling the runtime first.
fn blocking<T>(f: impl FnOnce() -> drover_pki::Result<T>) -> AgentResult<T> {
    drover_block::direct::blocking_here(f).map_err(pki_error)
}

/// A certificate the agent will not take is the caller's mistake (400); a file it cannot write
/// is the agent's (500).
fn pki_error(e: PkiError) -> AgentError {
    match e.kind() {
        PkiErrorKind::Internal => AgentError::internal(format!("the agent's identity: {e}")),
        _ => AgentError::invalid(format!("the renewed certificate: {e}")),
    }
}
