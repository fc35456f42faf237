//! [`RemoteAgent`]: the [`HostAgent`] of another host, reached over its agent API (HTTPS with
//! mutual TLS in the product; see `drover_agent::server`).
//!
//! Errors keep their class across the wire: the agent's [`AgentError`] body is returned as it
//! is; an agent that cannot be reached, times out or answers with something that is not an
//! agent error is [`ErrorKind::Retry`] (the host may come back) or [`ErrorKind::Internal`]
//! (it answered nonsense), with the agent's address in the message.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use drover_agent_api::wire::*;
use drover_agent_api::*;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How long connecting to an agent may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one call may take: cuts start storage daemons and may wait for a busy image.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest answer read from an agent.
const MAX_ANSWER: usize = 4 << 20;

/// The agent of another host.
#[derive(Debug, Clone)]
pub struct RemoteAgent {
    base: String,
    http: reqwest::Client,
    /// What [`HostAgent::info`] answers without a round trip: learnt by [`RemoteAgent::connect`].
    info: AgentInfo,
}

impl RemoteAgent {
    /// Connects to the agent at `base` (`https://host:port`) with `tls` (which presents this
    /// side's certificate and trusts the CA that signed the agent's), and reads who it is. A
    /// different API version is refused here.
    pub async fn connect(base: &str, tls: Option<Arc<rustls::ClientConfig>>) -> AgentResult<RemoteAgent> {
        Self::connect_with(base, tls, None).await
    }

    /// [`RemoteAgent::connect`] to `https://<server_name>:<port>` at the address `addr`: the
    /// agent's certificate is checked for its host's own name (`drover_pki::agent_dns_name`)
    /// whatever address reaches it, so one agent cannot answer for another.
    pub async fn connect_named(
        server_name: &str,
        addr: std::net::SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> AgentResult<RemoteAgent> {
        let base = format!("https://{server_name}:{}", addr.port());
        Self::connect_with(&base, Some(tls), Some((server_name, addr))).await
    }

    async fn connect_with(
        base: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
        resolve: Option<(&str, std::net::SocketAddr)>,
    ) -> AgentResult<RemoteAgent> {
        let mut builder = reqwest::Client::builder().connect_timeout(CONNECT_TIMEOUT).timeout(CALL_TIMEOUT);
        if let Some((name, addr)) = resolve {
            builder = builder.resolve(name, addr);
        }
        if let Some(tls) = tls {
            builder = builder.use_preconfigured_tls((*tls).clone());
        }
        let http = builder.build().map_err(|e| AgentError::internal(format!("agent client: {e}")))?;
        let placeholder =
            AgentInfo { api_version: API_VERSION, hypervisor: String::new(), live_change_tracking: false };
        let mut agent = RemoteAgent { base: base.trim_end_matches('/').to_string(), http, info: placeholder };
        let info: AgentInfo = agent.call(Method::GET, "/v1/info", None::<&()>).await?;
        if info.api_version != API_VERSION {
            return Err(AgentError::invalid(format!(
                "the agent at {} speaks agent API version {}; this control plane speaks {API_VERSION}",
                agent.base, info.api_version
            )));
        }
        agent.info = info;
        Ok(agent)
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The CSR of the agent's next key, to renew its certificate with (a `drover agent` only:
    /// an agent without a certificate answers `Gone`).
    pub async fn renewal_csr(&self) -> AgentResult<String> {
        let answer: wire::RenewalCsr = self.call(Method::POST, "/v1/identity/renewal", None::<&()>).await?;
        Ok(answer.csr_pem)
    }

    /// Installs the certificate signed for [`RemoteAgent::renewal_csr`]; returns when it ends.
    pub async fn install_certificate(&self, certificate_pem: &str) -> AgentResult<chrono::DateTime<chrono::Utc>> {
        let body = wire::InstallCertificate { certificate_pem: certificate_pem.to_string() };
        let answer: wire::CertificateInstalled =
            self.call(Method::PUT, "/v1/identity/certificate", Some(&body)).await?;
        Ok(answer.not_after)
    }

    async fn send<B: Serialize>(&self, method: Method, path: &str, body: Option<&B>) -> AgentResult<reqwest::Response> {
        self.send_waiting(method, path, body, None).await
    }

    /// [`RemoteAgent::send`] of a call that waits on the agent for up to `wait` (a heartbeat, a
    /// shutdown): its own timeout is the wait plus [`CALL_TIMEOUT`].
    async fn send_waiting<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        wait: Option<Duration>,
    ) -> AgentResult<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url).header(VERSION_HEADER, API_VERSION.to_string());
        if let Some(wait) = wait {
            request = request.timeout(wait.saturating_add(CALL_TIMEOUT));
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            let what = if e.is_timeout() { "did not answer in time" } else { "cannot be reached" };
            AgentError::new(ErrorKind::Retry, format!("the agent at {} {what}: {}", self.base, chain(&e)))
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = read_limited(response, &self.base).await?;
        Err(match serde_json::from_slice::<AgentError>(&bytes) {
            Ok(e) => e,
            Err(_) if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::BAD_GATEWAY => {
                AgentError::new(ErrorKind::Retry, format!("the agent at {} answered {status}", self.base))
            }
            Err(_) => {
                AgentError::internal(format!("the agent at {} answered {status} without an agent error", self.base))
            }
        })
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> AgentResult<T> {
        let response = self.send(method, path, body).await?;
        let bytes = read_limited(response, &self.base).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| AgentError::internal(format!("the agent at {} answered {path} unreadably: {e}", self.base)))
    }

    async fn call_waiting<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
        wait: Duration,
    ) -> AgentResult<T> {
        let response = self.send_waiting(Method::POST, path, Some(body), Some(wait)).await?;
        let bytes = read_limited(response, &self.base).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| AgentError::internal(format!("the agent at {} answered {path} unreadably: {e}", self.base)))
    }

    async fn call_empty<B: Serialize>(&self, method: Method, path: &str, body: Option<&B>) -> AgentResult<()> {
        self.send(method, path, body).await.map(drop)
    }
}

/// Reads an answer's body, refusing one over [`MAX_ANSWER`].
async fn read_limited(mut response: reqwest::Response, base: &str) -> AgentResult<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let chunk = response.chunk().await.map_err(|e| {
            AgentError::new(ErrorKind::Retry, format!("the agent at {base}: reading its answer: {}", chain(&e)))
        })?;
        let Some(chunk) = chunk else { return Ok(body) };
        if body.len() + chunk.len() > MAX_ANSWER {
            return Err(AgentError::internal(format!("the agent at {base} answered more than {MAX_ANSWER} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// An id checked here too, so a bad one never reaches a URL.
fn id_path(what: &str, prefix: &str, id: &str, suffix: &str) -> AgentResult<String> {
    check_id(what, id)?;
    Ok(format!("{prefix}{id}{suffix}"))
}

#[async_trait]
impl HostAgent for RemoteAgent {
    fn info(&self) -> AgentInfo {
        self.info.clone()
    }

    async fn datastore_ensure(&self, spec: &DatastoreSpec) -> AgentResult<()> {
        self.call_empty(Method::PUT, &format!("/v1/datastores/{}", spec.id), Some(spec)).await
    }

    async fn disk_info(&self, disk: &DiskRef, live: bool) -> AgentResult<DiskInfo> {
        self.call(Method::POST, "/v1/disk-info", Some(&DiskInfoRequest { disk: disk.clone(), live })).await
    }

    async fn cut_begin(&self, spec: &CutSpec) -> AgentResult<Cut> {
        self.call(Method::PUT, &id_path("cut", "/v1/cuts/", &spec.id, "")?, Some(spec)).await
    }

    async fn cut_end(&self, spec: &CutSpec, cut: Option<&Cut>, success: bool) -> AgentResult<()> {
        let body = CutEndRequest { spec: spec.clone(), cut: cut.cloned(), success };
        self.call_empty(Method::POST, &id_path("cut", "/v1/cuts/", &spec.id, "/end")?, Some(&body)).await
    }

    async fn point_create(&self, spec: &PointSpec) -> AgentResult<PointFile> {
        self.call(Method::POST, "/v1/points", Some(spec)).await
    }

    async fn chain_collect_garbage(&self, chain: &ChainRef, keep: &[PointFile]) -> AgentResult<Vec<String>> {
        let body = CollectGarbageRequest { chain: chain.clone(), keep: keep.to_vec() };
        self.call(Method::POST, "/v1/chains/collect-garbage", Some(&body)).await
    }

    async fn chain_retire_oldest(
        &self,
        chain: &ChainRef,
        oldest: &PointFile,
        next: &PointFile,
        after: Option<&PointFile>,
    ) -> AgentResult<PointFile> {
        let body = RetireOldestRequest {
            chain: chain.clone(),
            oldest: oldest.clone(),
            next: next.clone(),
            after: after.cloned(),
        };
        self.call(Method::POST, "/v1/chains/retire-oldest", Some(&body)).await
    }

    async fn transfer_ensure(&self, spec: &TransferSpec) -> AgentResult<TransferStatus> {
        self.call(Method::PUT, &id_path("transfer", "/v1/transfers/", &spec.id, "")?, Some(spec)).await
    }

    async fn transfer_status(&self, id: &str) -> AgentResult<TransferStatus> {
        self.call(Method::GET, &id_path("transfer", "/v1/transfers/", id, "")?, None::<&()>).await
    }

    async fn transfer_forget(&self, id: &str) -> AgentResult<()> {
        self.call_empty(Method::DELETE, &id_path("transfer", "/v1/transfers/", id, "")?, None::<&()>).await
    }

    async fn vm_disks_ensure(&self, spec: &VmDisksSpec) -> AgentResult<()> {
        // Imports copy whole images: as long as a wait.
        let response = self.send_waiting(Method::POST, "/v1/vm-disks", Some(spec), Some(IMPORT_WAIT)).await;
        response.map(drop)
    }

    async fn vm_disks_remove(&self, datastore: uuid::Uuid, vm: uuid::Uuid) -> AgentResult<()> {
        self.call_empty(Method::POST, "/v1/vm-disks/remove", Some(&DisksRemoveRequest { datastore, vm })).await
    }

    async fn vm_power_on(&self, spec: &VmRunSpec) -> AgentResult<()> {
        self.call_empty(Method::POST, &format!("/v1/vms/{}/power-on", spec.id), Some(spec)).await
    }

    async fn vm_shutdown(&self, vm: uuid::Uuid, timeout: Duration) -> AgentResult<ShutdownOutcome> {
        self.call_waiting(&format!("/v1/vms/{vm}/shutdown"), &WaitRequest { timeout_ms: millis(timeout) }, timeout)
            .await
    }

    async fn vm_power_off(&self, vm: uuid::Uuid) -> AgentResult<()> {
        self.call_empty(Method::POST, &format!("/v1/vms/{vm}/power-off"), None::<&()>).await
    }

    async fn vm_status(&self, vm: uuid::Uuid) -> AgentResult<PowerState> {
        self.call(Method::GET, &format!("/v1/vms/{vm}"), None::<&()>).await
    }

    async fn vm_wait_heartbeat(&self, vm: uuid::Uuid, timeout: Duration) -> AgentResult<Heartbeat> {
        self.call_waiting(&format!("/v1/vms/{vm}/heartbeat"), &WaitRequest { timeout_ms: millis(timeout) }, timeout)
            .await
    }

    async fn vm_freeze(&self, vm: uuid::Uuid, spec: &FreezeSpec) -> AgentResult<FreezeOutcome> {
        self.call_waiting(&format!("/v1/vms/{vm}/freeze"), spec, GUEST_FREEZE_WAIT).await
    }

    async fn vm_thaw(&self, vm: uuid::Uuid, id: &str) -> AgentResult<ThawOutcome> {
        self.call_waiting(&format!("/v1/vms/{vm}/thaw"), &ThawRequest { id: id.to_string() }, GUEST_FREEZE_WAIT).await
    }

    async fn vm_write_marker(&self, vm: uuid::Uuid, marker: &str) -> AgentResult<()> {
        let body = MarkerRequest { marker: marker.to_string() };
        self.call_empty(Method::POST, &format!("/v1/vms/{vm}/marker"), Some(&body)).await
    }

    async fn vm_check_tcp_port(&self, vm: uuid::Uuid, port: u16, timeout: Duration) -> AgentResult<TcpPortState> {
        let body = TcpPortRequest { port, timeout_ms: millis(timeout) };
        self.call_waiting(&format!("/v1/vms/{vm}/tcp-port"), &body, timeout).await
    }

    async fn vm_forget(&self, vm: uuid::Uuid, discard_overlays: bool) -> AgentResult<()> {
        let body = ForgetRequest { discard_overlays };
        self.call_empty(Method::POST, &format!("/v1/vms/{vm}/forget"), Some(&body)).await
    }

    async fn vm_list(&self) -> AgentResult<Vec<VmPresence>> {
        self.call(Method::GET, "/v1/vms", None::<&()>).await
    }

    async fn domains(&self) -> AgentResult<Vec<drover_agent_api::HostDomain>> {
        self.call(Method::GET, "/v1/domains", None::<&()>).await
    }

    async fn networks(&self) -> AgentResult<Vec<drover_agent_api::HostNetwork>> {
        self.call(Method::GET, "/v1/networks", None::<&()>).await
    }

    async fn vm_boot_overlays(&self, vm: uuid::Uuid) -> AgentResult<Vec<PointFile>> {
        self.call(Method::GET, &format!("/v1/vms/{vm}/boot-overlays"), None::<&()>).await
    }

    async fn boot_overlay_ensure(&self, chain: &ChainRef, point: &PointFile, label: &str) -> AgentResult<PointFile> {
        let body = BootOverlayRequest { chain: chain.clone(), point: point.clone(), label: label.to_string() };
        self.call(Method::POST, "/v1/boot-overlays", Some(&body)).await
    }
}

/// How long making a VM's disks may take (an import copies a whole image).
const IMPORT_WAIT: Duration = Duration::from_secs(3600);
/// How long a freeze or a thaw may take on the agent: the guest agent must answer, then run its
/// fsfreeze hooks and sync every file system (the QEMU driver allows a minute for that).
const GUEST_FREEZE_WAIT: Duration = Duration::from_secs(180);

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
