//! The host → agent directory, and agent enrolment.
//!
//! A host's `address` says where its agent is: `local` is the agent inside this process
//! ([`drover_agent::LocalAgent`]); `https://name-or-ip:port` is a `drover agent` on that host,
//! reached over mutual TLS with the control plane's certificate. The agent must present the
//! certificate the control plane's CA issued *for that host* (its name is checked, whatever
//! address reaches it), so one agent cannot answer for another. Remote agents need the agent
//! PKI, which `drover serve` sets up with `--agent-listen` ([`Engine::set_agent_pki`]).
//!
//! Every connection attempt is recorded in the store ([`drover_store::Store::agent_seen`]): a host
//! whose agent cannot be reached is shown so, with when it was last seen, and operations that
//! do not need it go on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use drover_agent_api::{
    AgentError, AgentInfo, AgentResult, ChainRef, Cut, CutSpec, DatastoreSpec, DiskInfo, DiskRef, ErrorKind,
    FreezeOutcome, FreezeSpec, Heartbeat, HostAgent, PointFile, PointSpec, PowerState, ShutdownOutcome, TcpPortState,
    ThawOutcome, TransferSpec, TransferStatus, VmDisksSpec, VmPresence, VmRunSpec,
};
use drover_agent_client::RemoteAgent;
use drover_pki::{
    ControlPlaneCa, EnrolmentRecord, EnrolmentToken, IssuedCertificate, LiveIdentity, PresentedToken, SubjectName,
};
use drover_types::{AgentEnrolment, Error, Host, HostId, Result, now};

use crate::Engine;

/// The control plane's CA and its own certificate (issued by that CA), for agents.
#[derive(Debug)]
pub struct AgentPki {
    pub ca: ControlPlaneCa,
    /// The control plane's certificate, as its agent listener and its connections to agents
    /// present it: reissued in its last month by [`Engine::renew_own_certificate`].
    pub identity: LiveIdentity,
    /// The names the control plane's certificate carries.
    names: Vec<SubjectName>,
    /// The URL agents enrol at (the control plane's agent listener, as agents reach it).
    pub enrol_url: String,
    client: Arc<rustls::ClientConfig>,
}

impl AgentPki {
    /// `identity` presents the certificate [`ControlPlaneCa::control_plane_identity`] gave for
    /// `names`.
    pub fn new(
        ca: ControlPlaneCa,
        identity: LiveIdentity,
        names: Vec<SubjectName>,
        enrol_url: String,
    ) -> Result<AgentPki> {
        let client = drover_pki::client_config_live(&identity, ca.trusted_ca())?;
        Ok(AgentPki { ca, identity, names, enrol_url, client: Arc::new(client) })
    }
}

/// What an enrolment gives the agent.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub host_id: HostId,
    pub certificate: IssuedCertificate,
}

/// How long an enrolment token is good for when the administrator does not say.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The longest an enrolment token may be good for.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Default)]
pub(crate) struct Remote {
    by_host: tokio::sync::Mutex<HashMap<HostId, (String, Arc<Watched>)>>,
}

/// How often a remote agent's successful calls are written down as "last seen" (a failure is
/// written at once).
const SEEN_EVERY: Duration = Duration::from_secs(10);

/// A remote agent whose calls are watched: a call that fails because the agent cannot be
/// reached (class `Retry`) records the host as unreachable, with why; a success records it seen
/// (at most every [`SEEN_EVERY`]), clearing the error.
#[derive(Debug)]
struct Watched {
    host: HostId,
    name: String,
    agent: RemoteAgent,
    store: drover_store::Store,
    last_recorded: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Watched {
    async fn record<T>(&self, result: AgentResult<T>) -> AgentResult<T> {
        match result {
            Err(e) if e.kind == ErrorKind::Retry => {
                *self.last_recorded.lock().unwrap_or_else(|p| p.into_inner()) = None;
                let _ = self.store.agent_seen(self.host, now(), Some(&e.message)).await;
                Err(AgentError::new(
                    ErrorKind::Retry,
                    format!("host {}'s agent is unreachable: {}", self.name, e.message),
                ))
            }
            _ => {
                let due = {
                    let mut last = self.last_recorded.lock().unwrap_or_else(|p| p.into_inner());
                    let due = last.is_none_or(|t| t.elapsed() >= SEEN_EVERY);
                    if due {
                        *last = Some(std::time::Instant::now());
                    }
                    due
                };
                if due {
                    let _ = self.store.agent_seen(self.host, now(), None).await;
                }
                result
            }
        }
    }
}

#[async_trait::async_trait]
impl HostAgent for Watched {
    fn info(&self) -> AgentInfo {
        self.agent.info()
    }
    async fn datastore_ensure(&self, spec: &DatastoreSpec) -> AgentResult<()> {
        self.record(self.agent.datastore_ensure(spec).await).await
    }
    async fn disk_info(&self, disk: &DiskRef, live: bool) -> AgentResult<DiskInfo> {
        self.record(self.agent.disk_info(disk, live).await).await
    }
    async fn cut_begin(&self, spec: &CutSpec) -> AgentResult<Cut> {
        self.record(self.agent.cut_begin(spec).await).await
    }
    async fn cut_end(&self, spec: &CutSpec, cut: Option<&Cut>, success: bool) -> AgentResult<()> {
        self.record(self.agent.cut_end(spec, cut, success).await).await
    }
    async fn point_create(&self, spec: &PointSpec) -> AgentResult<PointFile> {
        self.record(self.agent.point_create(spec).await).await
    }
    async fn chain_collect_garbage(&self, chain: &ChainRef, keep: &[PointFile]) -> AgentResult<Vec<String>> {
        self.record(self.agent.chain_collect_garbage(chain, keep).await).await
    }
    async fn chain_retire_oldest(
        &self,
        chain: &ChainRef,
        oldest: &PointFile,
        next: &PointFile,
        after: Option<&PointFile>,
    ) -> AgentResult<PointFile> {
        self.record(self.agent.chain_retire_oldest(chain, oldest, next, after).await).await
    }
    async fn transfer_ensure(&self, spec: &TransferSpec) -> AgentResult<TransferStatus> {
        self.record(self.agent.transfer_ensure(spec).await).await
    }
    async fn transfer_status(&self, id: &str) -> AgentResult<TransferStatus> {
        self.record(self.agent.transfer_status(id).await).await
    }
    async fn transfer_forget(&self, id: &str) -> AgentResult<()> {
        self.record(self.agent.transfer_forget(id).await).await
    }
    async fn vm_disks_ensure(&self, spec: &VmDisksSpec) -> AgentResult<()> {
        self.record(self.agent.vm_disks_ensure(spec).await).await
    }
    async fn vm_disks_remove(&self, datastore: uuid::Uuid, vm: uuid::Uuid) -> AgentResult<()> {
        self.record(self.agent.vm_disks_remove(datastore, vm).await).await
    }
    async fn vm_power_on(&self, spec: &VmRunSpec) -> AgentResult<()> {
        self.record(self.agent.vm_power_on(spec).await).await
    }
    async fn vm_shutdown(&self, vm: uuid::Uuid, timeout: std::time::Duration) -> AgentResult<ShutdownOutcome> {
        self.record(self.agent.vm_shutdown(vm, timeout).await).await
    }
    async fn vm_power_off(&self, vm: uuid::Uuid) -> AgentResult<()> {
        self.record(self.agent.vm_power_off(vm).await).await
    }
    async fn vm_status(&self, vm: uuid::Uuid) -> AgentResult<PowerState> {
        self.record(self.agent.vm_status(vm).await).await
    }
    async fn vm_wait_heartbeat(&self, vm: uuid::Uuid, timeout: std::time::Duration) -> AgentResult<Heartbeat> {
        self.record(self.agent.vm_wait_heartbeat(vm, timeout).await).await
    }
    async fn vm_write_marker(&self, vm: uuid::Uuid, marker: &str) -> AgentResult<()> {
        self.record(self.agent.vm_write_marker(vm, marker).await).await
    }
    async fn vm_freeze(&self, vm: uuid::Uuid, spec: &FreezeSpec) -> AgentResult<FreezeOutcome> {
        self.record(self.agent.vm_freeze(vm, spec).await).await
    }
    async fn vm_thaw(&self, vm: uuid::Uuid, id: &str) -> AgentResult<ThawOutcome> {
        self.record(self.agent.vm_thaw(vm, id).await).await
    }
    async fn vm_check_tcp_port(
        &self,
        vm: uuid::Uuid,
        port: u16,
        timeout: std::time::Duration,
    ) -> AgentResult<TcpPortState> {
        self.record(self.agent.vm_check_tcp_port(vm, port, timeout).await).await
    }
    async fn vm_forget(&self, vm: uuid::Uuid, discard_overlays: bool) -> AgentResult<()> {
        self.record(self.agent.vm_forget(vm, discard_overlays).await).await
    }
    async fn vm_list(&self) -> AgentResult<Vec<VmPresence>> {
        self.record(self.agent.vm_list().await).await
    }
    async fn domains(&self) -> AgentResult<Vec<drover_agent_api::HostDomain>> {
        self.record(self.agent.domains().await).await
    }
    async fn networks(&self) -> AgentResult<Vec<drover_agent_api::HostNetwork>> {
        self.record(self.agent.networks().await).await
    }
    async fn vm_boot_overlays(&self, vm: uuid::Uuid) -> AgentResult<Vec<PointFile>> {
        self.record(self.agent.vm_boot_overlays(vm).await).await
    }
    async fn boot_overlay_ensure(&self, chain: &ChainRef, point: &PointFile, label: &str) -> AgentResult<PointFile> {
        self.record(self.agent.boot_overlay_ensure(chain, point, label).await).await
    }
}

/// The agent's certificate ends within [`drover_pki::RENEW_BEFORE_DAYS`] (or has ended): what
/// the renewal task renews and the host's agent view shows.
pub fn certificate_renewal_due(status: &drover_types::AgentStatus) -> bool {
    let soon = now() + chrono::Duration::days(drover_pki::RENEW_BEFORE_DAYS);
    status.certificate_expires_at.is_some_and(|at| at < soon)
}

/// Where a remote agent listens: `https://host:port`.
fn agent_address(address: &str) -> Option<&str> {
    let rest = address.strip_prefix("https://")?.trim_end_matches('/');
    (!rest.is_empty()
        && !rest.contains('/')
        && rest.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()))
    .then_some(rest)
}

/// Checks a host address as the administrator gives it.
pub fn check_host_address(address: &str) -> Result<()> {
    if address == "local" || agent_address(address).is_some() {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "host address {address:?} must be \"local\" (the agent inside drover serve) or https://host:port (a drover agent)"
        )))
    }
}

impl Engine {
    /// Sets the agent PKI: from now on hosts with an `https://` address are reached over mutual TLS.
    pub fn set_agent_pki(&self, pki: AgentPki) {
        let _ = self.inner.agent_pki.set(Arc::new(pki));
    }

    pub fn agent_pki(&self) -> Option<&Arc<AgentPki>> {
        self.inner.agent_pki.get()
    }

    /// The agent of a host (see the module documentation). A remote agent that cannot be
    /// reached is `Unavailable`, recorded as the host's last error.
    pub async fn agent(&self, host: &Host) -> Result<Arc<dyn HostAgent>> {
        if host.address == "local" {
            return Ok(self.inner.local_agent.clone());
        }
        Ok(self.remote_agent(host).await?)
    }

    /// A `drover agent`'s connection, connected if it is not yet.
    async fn remote_agent(&self, host: &Host) -> Result<Arc<Watched>> {
        let Some(hostport) = agent_address(&host.address) else {
            return Err(Error::Unavailable(format!(
                "host {} has no agent address drover can use: {:?}",
                host.name, host.address
            )));
        };
        let Some(pki) = self.agent_pki() else {
            return Err(Error::Unavailable(format!(
                "host {}'s agent is at {}, but this control plane has no agent PKI (serve it with --agent-listen)",
                host.name, host.address
            )));
        };
        let mut cache = self.inner.remote.by_host.lock().await;
        if let Some((address, agent)) = cache.get(&host.id)
            && *address == host.address
        {
            return Ok(agent.clone());
        }
        let connected = async {
            let addr: SocketAddr = tokio::net::lookup_host(hostport)
                .await
                .map_err(|e| format!("cannot resolve {hostport}: {e}"))?
                .next()
                .ok_or_else(|| format!("{hostport} resolves to no address"))?;
            RemoteAgent::connect_named(&drover_pki::agent_dns_name(host.id), addr, pki.client.clone())
                .await
                .map_err(|e| e.message)
        }
        .await;
        match connected {
            Ok(agent) => {
                let _ = self.store().agent_seen(host.id, now(), None).await;
                let agent = Arc::new(Watched {
                    host: host.id,
                    name: host.name.clone(),
                    agent,
                    store: self.store().clone(),
                    last_recorded: std::sync::Mutex::new(Some(std::time::Instant::now())),
                });
                cache.insert(host.id, (host.address.clone(), agent.clone()));
                Ok(agent)
            }
            Err(why) => {
                let _ = self.store().agent_seen(host.id, now(), Some(&why)).await;
                Err(Error::Unavailable(format!("host {}'s agent is unreachable: {why}", host.name)))
            }
        }
    }

    /// Renews a host's agent certificate now, over the mutual-TLS connection the control plane
    /// has with it (no token, no restart): the agent makes a new key and sends its CSR, the CA
    /// signs it for this host (whatever the request names), the agent installs it and presents
    /// it from its next handshake on, and the store records when it ends. Returns that time. A
    /// renewal cut short is simply run again: the agent answers the same CSR until a certificate
    /// for it is installed.
    pub async fn renew_agent_certificate(&self, host: &Host) -> Result<drover_types::Timestamp> {
        let pki = self.agent_pki().ok_or_else(|| {
            Error::conflict("this control plane has no agent PKI (serve it with --agent-listen): nothing to renew")
        })?;
        if host.address == "local" {
            return Err(Error::conflict(format!(
                "host {} is this control plane's own (address \"local\"): it has no certificate",
                host.name
            )));
        }
        if self.store().agent_status(host.id).await?.enrolled_at.is_none() {
            return Err(Error::conflict(format!("host {}'s agent has not enrolled: enrol it first", host.name)));
        }
        self.renew_enrolled(pki, host).await
    }

    /// [`Engine::renew_agent_certificate`] of a remote host whose agent has enrolled.
    async fn renew_enrolled(&self, pki: &AgentPki, host: &Host) -> Result<drover_types::Timestamp> {
        let agent = self.remote_agent(host).await?;
        let csr = agent.record(agent.agent.renewal_csr().await).await.map_err(crate::agent_error)?;
        let issued = pki.ca.sign_agent_csr(host.id, &csr, &[])?;
        let installed = agent.agent.install_certificate(&issued.certificate_pem).await;
        let not_after = agent.record(installed).await.map_err(crate::agent_error)?;
        self.store().agent_certificate_renewed(host.id, not_after).await?;
        tracing::info!(host = %host.name, %not_after, "renewed the agent's certificate");
        Ok(not_after)
    }

    /// The control plane's own certificate, issued again by its CA when it ends within
    /// [`drover_pki::RENEW_BEFORE_DAYS`] (the store of the CA directory decides: see
    /// [`ControlPlaneCa::control_plane_identity`]) and presented from the next connection on, so
    /// a control plane that runs for more than a year keeps reaching its agents.
    pub fn renew_own_certificate(&self) -> Result<()> {
        let Some(pki) = self.agent_pki() else { return Ok(()) };
        let identity = pki.ca.control_plane_identity(&pki.names)?;
        if identity.certificate_chain().first() != Some(&pki.identity.certificate()) {
            pki.identity.replace(&identity)?;
            tracing::info!("the control plane presents its renewed certificate");
        }
        Ok(())
    }

    /// Renews the certificate of every enrolled agent whose certificate ends within
    /// [`drover_pki::RENEW_BEFORE_DAYS`] (the monitor calls this now and then). An agent that
    /// cannot be reached is tried again next time (its certificate stays valid meanwhile, and the
    /// host's agent state says renewal is due). Returns the hosts renewed.
    pub async fn renew_due_agent_certificates(&self) -> Result<Vec<HostId>> {
        let Some(pki) = self.agent_pki() else { return Ok(Vec::new()) };
        let mut renewed = Vec::new();
        for host in self.store().object_list_all::<Host>().await? {
            if host.address == "local" {
                continue;
            }
            let status = self.store().agent_status(host.id).await?;
            if status.enrolled_at.is_none() || !certificate_renewal_due(&status) {
                continue;
            }
            match self.renew_enrolled(pki, &host).await {
                Ok(_) => renewed.push(host.id),
                Err(e) => tracing::warn!(host = %host.name, error = %e, "cannot renew the agent's certificate yet"),
            }
        }
        Ok(renewed)
    }

    /// Forgets the connection to a host's agent (the next call connects again).
    pub async fn agent_disconnect(&self, host: HostId) {
        self.inner.remote.by_host.lock().await.remove(&host);
    }

    /// A new enrolment token for a host: the secret (show it once) and when it expires.
    pub async fn enrolment_token(&self, host: &Host, ttl: Duration) -> Result<(String, drover_types::Timestamp)> {
        let pki = self.agent_pki().ok_or_else(|| {
            Error::conflict(
                "agents cannot enrol: this control plane has no agent listener (serve it with --agent-listen)",
            )
        })?;
        if host.address == "local" {
            return Err(Error::conflict(format!(
                "host {} is this control plane's own (address \"local\"): it has no agent to enrol",
                host.name
            )));
        }
        let ttl = ttl.min(MAX_TOKEN_TTL);
        let token = EnrolmentToken::new(host.id, ttl, &pki.ca.fingerprint());
        let r = token.record();
        self.store()
            .enrolment_insert(&AgentEnrolment {
                host_id: r.host_id,
                token_hash: r.token_hash.to_hex(),
                created_at: r.created_at,
                expires_at: r.expires_at,
                consumed_at: None,
            })
            .await?;
        Ok((token.secret().to_string(), r.expires_at))
    }

    /// Enrols a host's agent: finds the token's host, checks and uses up the token (once: a
    /// second enrolment with it is refused), signs the agent's CSR for that host. Every refusal
    /// reads the same, so a caller learns nothing about other hosts' tokens.
    pub async fn enrol(&self, token: &str, csr_pem: &str) -> Result<Enrolled> {
        let pki = self.agent_pki().ok_or_else(|| Error::conflict("this control plane does not enrol agents"))?;
        let refused = || Error::Unauthorized("the enrolment token is not valid (unknown, used or expired)".into());
        let presented = PresentedToken::parse(token).map_err(|_| refused())?;
        if presented.ca_fingerprint() != pki.ca.fingerprint() {
            return Err(refused());
        }
        let hash = presented.hash().to_hex();
        let stored = self.store().enrolment_get(&hash).await?.ok_or_else(refused)?;
        let host = stored.host_id;
        let record = EnrolmentRecord {
            host_id: stored.host_id,
            token_hash: drover_pki::TokenHash::from_hex(&stored.token_hash)?,
            created_at: stored.created_at,
            expires_at: stored.expires_at,
            consumed_at: stored.consumed_at,
        };
        record.verify(&presented, host, now()).map_err(|_| refused())?;
        // The CSR is checked before the token is used up: a bad request leaves the token good.
        let issued = pki.ca.sign_agent_csr(host, csr_pem, &[])?;
        if !self.store().enrolment_consume(&hash, host, now(), issued.not_after).await? {
            return Err(refused());
        }
        self.agent_disconnect(host).await;
        tracing::info!(host = %host, "agent enrolled");
        Ok(Enrolled { host_id: host, certificate: issued })
    }
}
