//! The agent API over HTTP: each [`HostAgent`] call is one route, its body the call's wire type,
//! an error the [`AgentError`] with the status of its kind ([`wire::status_of`]).
//!
//! Every request carries [`wire::VERSION_HEADER`]; another version is refused before anything
//! runs. Bodies are limited to [`wire::MAX_BODY`]; ids in paths are checked like every id.
//! `drover agent` serves this router over HTTPS with mutual TLS only; the plain listener of
//! [`serve_plain`] exists for in-process tests.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use drover_agent_api::wire::*;
use drover_agent_api::*;

use crate::identity::IdentityKeeper;

type Agent = Arc<dyn HostAgent>;

/// An agent error as an HTTP answer.
#[derive(Debug)]
pub struct ErrorResponse(pub AgentError);

impl IntoResponse for ErrorResponse {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(status_of(self.0.kind)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl From<AgentError> for ErrorResponse {
    fn from(e: AgentError) -> Self {
        ErrorResponse(e)
    }
}

type Answer<T> = Result<Json<T>, ErrorResponse>;
type Empty = Result<StatusCode, ErrorResponse>;

/// The agent API's routes over `agent`.
pub fn router(agent: Agent) -> Router {
    router_with_identity(agent, None)
}

/// The agent API's routes over `agent`, and, for a `drover agent` with a certificate, the
/// routes that renew it ([`crate::identity`]).
pub fn router_with_identity(agent: Agent, identity: Option<Arc<IdentityKeeper>>) -> Router {
    let identity_routes = match identity {
        Some(keeper) => Router::new()
            .route("/v1/identity/renewal", post(identity_renewal))
            .route("/v1/identity/certificate", put(identity_install))
            .with_state(keeper),
        None => Router::new(),
    };
    Router::new()
        .route("/v1/info", get(info))
        .route("/v1/datastores/{id}", put(datastore_ensure))
        .route("/v1/disk-info", post(disk_info))
        .route("/v1/cuts/{id}", put(cut_begin))
        .route("/v1/cuts/{id}/end", post(cut_end))
        .route("/v1/points", post(point_create))
        .route("/v1/chains/collect-garbage", post(collect_garbage))
        .route("/v1/chains/retire-oldest", post(retire_oldest))
        .route("/v1/transfers/{id}", put(transfer_ensure).get(transfer_status).delete(transfer_forget))
        .route("/v1/vm-disks", post(vm_disks_ensure))
        .route("/v1/vm-disks/remove", post(vm_disks_remove))
        .route("/v1/vms", get(vm_list))
        .route("/v1/domains", get(domains))
        .route("/v1/networks", get(networks))
        .route("/v1/vms/{id}", get(vm_status))
        .route("/v1/vms/{id}/power-on", post(vm_power_on))
        .route("/v1/vms/{id}/shutdown", post(vm_shutdown))
        .route("/v1/vms/{id}/power-off", post(vm_power_off))
        .route("/v1/vms/{id}/heartbeat", post(vm_heartbeat))
        .route("/v1/vms/{id}/marker", post(vm_marker))
        .route("/v1/vms/{id}/freeze", post(vm_freeze))
        .route("/v1/vms/{id}/thaw", post(vm_thaw))
        .route("/v1/vms/{id}/tcp-port", post(vm_tcp_port))
        .route("/v1/vms/{id}/forget", post(vm_forget))
        .route("/v1/vms/{id}/boot-overlays", get(vm_boot_overlays))
        .route("/v1/boot-overlays", post(boot_overlay_ensure))
        .fallback(|| async { ErrorResponse(AgentError::gone("no such route in this agent's API")) })
        .with_state(agent)
        .merge(identity_routes)
        .layer(axum::middleware::from_fn(check_version))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

async fn identity_renewal(State(k): State<Arc<IdentityKeeper>>) -> Answer<RenewalCsr> {
    Ok(Json(RenewalCsr { csr_pem: k.renewal_csr().await? }))
}

async fn identity_install(
    State(k): State<Arc<IdentityKeeper>>,
    Json(r): Json<InstallCertificate>,
) -> Answer<CertificateInstalled> {
    Ok(Json(CertificateInstalled { not_after: k.install(&r.certificate_pem).await? }))
}

async fn check_version(request: Request, next: Next) -> Response {
    let theirs = request.headers().get(VERSION_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if theirs.as_deref() != Some(API_VERSION.to_string().as_str()) {
        let e = AgentError::invalid(format!(
            "this agent speaks agent API version {API_VERSION}; the request says {}",
            theirs.map_or_else(|| "none".to_string(), |v| format!("{v:?}"))
        ));
        return ErrorResponse(e).into_response();
    }
    next.run(request).await
}

fn same_id(path: &str, body: &str) -> Result<(), ErrorResponse> {
    if path == body {
        Ok(())
    } else {
        Err(AgentError::invalid(format!("the path names {path:?} but the body {body:?}")).into())
    }
}

async fn info(State(a): State<Agent>) -> Json<AgentInfo> {
    Json(a.info())
}

async fn datastore_ensure(
    State(a): State<Agent>,
    Path(id): Path<uuid::Uuid>,
    Json(spec): Json<DatastoreSpec>,
) -> Empty {
    same_id(&id.to_string(), &spec.id.to_string())?;
    a.datastore_ensure(&spec).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn disk_info(State(a): State<Agent>, Json(r): Json<DiskInfoRequest>) -> Answer<DiskInfo> {
    Ok(Json(a.disk_info(&r.disk, r.live).await?))
}

async fn cut_begin(State(a): State<Agent>, Path(id): Path<String>, Json(spec): Json<CutSpec>) -> Answer<Cut> {
    same_id(&id, &spec.id)?;
    Ok(Json(a.cut_begin(&spec).await?))
}

async fn cut_end(State(a): State<Agent>, Path(id): Path<String>, Json(r): Json<CutEndRequest>) -> Empty {
    same_id(&id, &r.spec.id)?;
    a.cut_end(&r.spec, r.cut.as_ref(), r.success).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn point_create(State(a): State<Agent>, Json(spec): Json<PointSpec>) -> Answer<PointFile> {
    Ok(Json(a.point_create(&spec).await?))
}

async fn collect_garbage(State(a): State<Agent>, Json(r): Json<CollectGarbageRequest>) -> Answer<Vec<String>> {
    Ok(Json(a.chain_collect_garbage(&r.chain, &r.keep).await?))
}

async fn retire_oldest(State(a): State<Agent>, Json(r): Json<RetireOldestRequest>) -> Answer<PointFile> {
    Ok(Json(a.chain_retire_oldest(&r.chain, &r.oldest, &r.next, r.after.as_ref()).await?))
}

async fn transfer_ensure(
    State(a): State<Agent>,
    Path(id): Path<String>,
    Json(spec): Json<TransferSpec>,
) -> Answer<TransferStatus> {
    same_id(&id, &spec.id)?;
    Ok(Json(a.transfer_ensure(&spec).await?))
}

async fn transfer_status(State(a): State<Agent>, Path(id): Path<String>) -> Answer<TransferStatus> {
    Ok(Json(a.transfer_status(&id).await?))
}

async fn transfer_forget(State(a): State<Agent>, Path(id): Path<String>) -> Empty {
    a.transfer_forget(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Serves the router on a plain TCP listener: **for in-process tests only** (the product serves
/// the agent API over mutual TLS, see [`serve_tls`]).
pub async fn serve_plain(listener: tokio::net::TcpListener, agent: Agent) -> std::io::Result<()> {
    axum::serve(listener, router(agent)).await
}

/// Serves the router over TLS with `config`, which must require client certificates (mutual
/// TLS: [`drover_pki::server_config_requiring_client_cert`]), until the process ends. Only the
/// control plane may call: a connection whose verified certificate is an agent's (another host,
/// a peer of the data path) is closed after the handshake, before any request is read.
pub async fn serve_tls(
    listener: std::net::TcpListener,
    agent: Agent,
    config: Arc<rustls::ServerConfig>,
    identity: Option<Arc<IdentityKeeper>>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let tls = axum_server::tls_rustls::RustlsConfig::from_config(config);
    let acceptor = ControlPlaneOnly(
        axum_server::tls_rustls::RustlsAcceptor::new(tls).handshake_timeout(std::time::Duration::from_secs(10)),
    );
    axum_server::from_tcp(listener)
        .acceptor(acceptor)
        .serve(router_with_identity(agent, identity).into_make_service())
        .await
}

/// A TLS acceptor that keeps only connections from the control plane.
#[derive(Clone)]
struct ControlPlaneOnly(axum_server::tls_rustls::RustlsAcceptor);

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S: Send + 'static> axum_server::accept::Accept<tokio::net::TcpStream, S> for ControlPlaneOnly {
    type Stream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Service = S;
    type Future = BoxFuture<std::io::Result<(Self::Stream, S)>>;

    fn accept(&self, stream: tokio::net::TcpStream, service: S) -> Self::Future {
        let peer = stream.peer_addr().ok();
        let handshake = self.0.accept(stream, service);
        Box::pin(async move {
            let (stream, service) = handshake.await?;
            let certificates = stream.get_ref().1.peer_certificates().unwrap_or_default();
            match drover_pki::peer_identity(certificates) {
                Ok(drover_pki::PeerIdentity::ControlPlane) => Ok((stream, service)),
                Ok(drover_pki::PeerIdentity::Host(host)) => {
                    tracing::warn!(?peer, %host, "agent API: refused a connection from another host's agent");
                    Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, "only the control plane may call"))
                }
                Err(e) => {
                    tracing::warn!(?peer, "agent API: refused a connection: {e}");
                    Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string()))
                }
            }
        })
    }
}

/// A wait off the wire; the agent refuses one longer than `MAX_WAIT_MS` itself.
fn wait(ms: u64) -> std::time::Duration {
    std::time::Duration::from_millis(ms)
}

async fn vm_disks_ensure(State(a): State<Agent>, Json(spec): Json<VmDisksSpec>) -> Empty {
    a.vm_disks_ensure(&spec).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn vm_disks_remove(State(a): State<Agent>, Json(r): Json<DisksRemoveRequest>) -> Empty {
    a.vm_disks_remove(r.datastore, r.vm).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn vm_list(State(a): State<Agent>) -> Answer<Vec<VmPresence>> {
    Ok(Json(a.vm_list().await?))
}

async fn domains(State(a): State<Agent>) -> Answer<Vec<drover_agent_api::HostDomain>> {
    Ok(Json(a.domains().await?))
}

async fn networks(State(a): State<Agent>) -> Answer<Vec<drover_agent_api::HostNetwork>> {
    Ok(Json(a.networks().await?))
}

async fn vm_status(State(a): State<Agent>, Path(id): Path<uuid::Uuid>) -> Answer<PowerState> {
    Ok(Json(a.vm_status(id).await?))
}

async fn vm_power_on(State(a): State<Agent>, Path(id): Path<uuid::Uuid>, Json(spec): Json<VmRunSpec>) -> Empty {
    same_id(&id.to_string(), &spec.id.to_string())?;
    a.vm_power_on(&spec).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn vm_shutdown(
    State(a): State<Agent>,
    Path(id): Path<uuid::Uuid>,
    Json(r): Json<WaitRequest>,
) -> Answer<ShutdownOutcome> {
    Ok(Json(a.vm_shutdown(id, wait(r.timeout_ms)).await?))
}

async fn vm_power_off(State(a): State<Agent>, Path(id): Path<uuid::Uuid>) -> Empty {
    a.vm_power_off(id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn vm_heartbeat(
    State(a): State<Agent>,
    Path(id): Path<uuid::Uuid>,
    Json(r): Json<WaitRequest>,
) -> Answer<Heartbeat> {
    Ok(Json(a.vm_wait_heartbeat(id, wait(r.timeout_ms)).await?))
}

async fn vm_marker(State(a): State<Agent>, Path(id): Path<uuid::Uuid>, Json(r): Json<MarkerRequest>) -> Empty {
    a.vm_write_marker(id, &r.marker).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn vm_freeze(
    State(a): State<Agent>,
    Path(id): Path<uuid::Uuid>,
    Json(spec): Json<FreezeSpec>,
) -> Answer<FreezeOutcome> {
    Ok(Json(a.vm_freeze(id, &spec).await?))
}

async fn vm_thaw(
    State(a): State<Agent>,
    Path(id): Path<uuid::Uuid>,
    Json(r): Json<ThawRequest>,
) -> Answer<ThawOutcome> {
    Ok(Json(a.vm_thaw(id, &r.id).await?))
}

async fn vm_tcp_port(
    State(a): State<Agent>,
    Path(id): Path<uuid::Uuid>,
    Json(r): Json<TcpPortRequest>,
) -> Answer<TcpPortState> {
    Ok(Json(a.vm_check_tcp_port(id, r.port, wait(r.timeout_ms)).await?))
}

async fn vm_forget(State(a): State<Agent>, Path(id): Path<uuid::Uuid>, Json(r): Json<ForgetRequest>) -> Empty {
    a.vm_forget(id, r.discard_overlays).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn boot_overlay_ensure(State(a): State<Agent>, Json(r): Json<BootOverlayRequest>) -> Answer<PointFile> {
    Ok(Json(a.boot_overlay_ensure(&r.chain, &r.point, &r.label).await?))
}

async fn vm_boot_overlays(State(a): State<Agent>, Path(id): Path<uuid::Uuid>) -> Answer<Vec<PointFile>> {
    Ok(Json(a.vm_boot_overlays(id).await?))
}
