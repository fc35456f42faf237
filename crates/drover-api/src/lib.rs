//! drover's native REST API under `/v1`, its OpenAPI document, and the HTTPS listener.
//!
//! Only this crate (and later the Veeam dialects) knows HTTP. Handlers are thin: they parse,
//! call [`drover_engine::app::App`], and render the wire types of [`views`]. Errors become HTTP
//! in exactly one place, [`error`]. Nothing but `POST /v1/token` and `GET /v1/openapi.json`
//! answers without a bearer token.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::routing::{get, post};
use drover_engine::app::{App, Caller};
use drover_types::Error;
use utoipa::OpenApi;

pub mod agents;
pub mod audit;
pub mod error;
pub mod handlers;
pub mod limits;
pub mod openapi;
pub mod views;

use error::ApiError;
pub use limits::ListenerLimits;
use openapi::ErrorResponses;

#[derive(Clone, Debug)]
pub struct ApiState {
    pub app: App,
}

/// The client's address, as the listener saw the connection (`None` when the router runs without
/// a listener, as in-process tests do). No forwarded-for header is trusted: a client could claim any
/// address with one, and login throttling keys on this address.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(
            parts
                .extensions
                .get::<axum::extract::ConnectInfo<SocketAddr>>()
                .map(|axum::extract::ConnectInfo(a)| a.ip()),
        ))
    }
}

/// The authenticated caller, from `Authorization: Bearer <token>`.
#[derive(Debug, Clone)]
pub struct Auth(pub Caller);

impl FromRequestParts<ApiState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| Error::Unauthorized("missing Authorization: Bearer <token>".into()))?;
        let value = header.to_str().map_err(|_| Error::Unauthorized("malformed Authorization header".into()))?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Unauthorized("Authorization must be Bearer <token>".into()))?;
        let caller = state.app.authenticate(token).await?;
        audit::note_caller(parts, &caller);
        Ok(Auth(caller))
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "drover", description = "drover's native API: inventory, operations and sessions of a disaster-recovery orchestrator for KVM/QEMU."),
    paths(
        handlers::token,
        handlers::tenants_list, handlers::tenants_create,
        handlers::users_list, handlers::users_create, handlers::users_delete, handlers::users_patch,
        handlers::sites_list, handlers::sites_create, handlers::sites_get, handlers::sites_patch, handlers::sites_delete,
        handlers::hosts_list, handlers::hosts_create, handlers::hosts_get, handlers::hosts_patch, handlers::hosts_delete,
        handlers::hosts_enrolment, handlers::hosts_agent, handlers::hosts_agent_certificate, handlers::hosts_domains, handlers::hosts_networks,
        handlers::datastores_list, handlers::datastores_create, handlers::datastores_get, handlers::datastores_patch, handlers::datastores_delete,
        handlers::datastores_grant, handlers::datastores_grants, handlers::datastores_revoke,
        handlers::vms_list, handlers::vms_create, handlers::vms_import, handlers::vms_get, handlers::vms_patch, handlers::vms_delete,
        handlers::vms_power_on, handlers::vms_shutdown, handlers::vms_power_off,
        handlers::jobs_list, handlers::jobs_create, handlers::jobs_get, handlers::jobs_patch, handlers::jobs_delete,
        handlers::jobs_run, handlers::replicas_list, handlers::replicas_get, handlers::replicas_points,
        handlers::locations_list, handlers::locations_create, handlers::locations_get, handlers::locations_patch, handlers::locations_delete,
        handlers::plans_list, handlers::plans_create, handlers::plans_get, handlers::plans_put, handlers::plans_delete,
        handlers::plans_action,
        handlers::audit_list,
        handlers::sessions_list, handlers::sessions_get, handlers::sessions_log, handlers::sessions_events,
        handlers::sessions_halt, handlers::sessions_continue, handlers::sessions_undo,
    ),
    modifiers(&BearerScheme, &ErrorResponses)
)]
#[derive(Debug)]
pub struct ApiDoc;

/// Adds the `bearer` security scheme to an OpenAPI document (this API's and the Recovery
/// Orchestrator dialect's).
#[derive(Debug)]
pub struct BearerScheme;

impl utoipa::Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

async fn openapi_json() -> axum::Json<utoipa::openapi::OpenApi> {
    axum::Json(ApiDoc::openapi())
}

async fn not_found() -> ApiError {
    ApiError(Error::not_found("route", "for this method and path"))
}

pub fn router(app: App) -> Router {
    use handlers as h;
    let v1 = Router::new()
        .route("/token", post(h::token))
        .route("/openapi.json", get(openapi_json))
        .route("/tenants", get(h::tenants_list).post(h::tenants_create))
        .route("/users", get(h::users_list).post(h::users_create))
        .route("/users/{id}", axum::routing::delete(h::users_delete).patch(h::users_patch))
        .route("/sites", get(h::sites_list).post(h::sites_create))
        .route("/sites/{id}", get(h::sites_get).patch(h::sites_patch).delete(h::sites_delete))
        .route("/hosts", get(h::hosts_list).post(h::hosts_create))
        .route("/hosts/{id}", get(h::hosts_get).patch(h::hosts_patch).delete(h::hosts_delete))
        .route("/hosts/{id}/enrolment", post(h::hosts_enrolment))
        .route("/hosts/{id}/agent", get(h::hosts_agent))
        .route("/hosts/{id}/domains", get(h::hosts_domains))
        .route("/hosts/{id}/networks", get(h::hosts_networks))
        .route("/hosts/{id}/agent/certificate", post(h::hosts_agent_certificate))
        .route("/datastores", get(h::datastores_list).post(h::datastores_create))
        .route("/datastores/{id}", get(h::datastores_get).patch(h::datastores_patch).delete(h::datastores_delete))
        .route("/datastores/{id}/grants", get(h::datastores_grants).post(h::datastores_grant))
        .route("/datastores/{id}/grants/{tenant_id}", axum::routing::delete(h::datastores_revoke))
        .route("/vms", get(h::vms_list).post(h::vms_create))
        .route("/vms/import", post(h::vms_import))
        .route("/vms/{id}", get(h::vms_get).patch(h::vms_patch).delete(h::vms_delete))
        .route("/vms/{id}/power-on", post(h::vms_power_on))
        .route("/vms/{id}/shutdown", post(h::vms_shutdown))
        .route("/vms/{id}/power-off", post(h::vms_power_off))
        .route("/replication-jobs", get(h::jobs_list).post(h::jobs_create))
        .route("/replication-jobs/{id}", get(h::jobs_get).patch(h::jobs_patch).delete(h::jobs_delete))
        .route("/replication-jobs/{id}/run", post(h::jobs_run))
        .route("/replicas", get(h::replicas_list))
        .route("/replicas/{id}", get(h::replicas_get))
        .route("/replicas/{id}/restore-points", get(h::replicas_points))
        .route("/recovery-locations", get(h::locations_list).post(h::locations_create))
        .route("/recovery-locations/{id}", get(h::locations_get).patch(h::locations_patch).delete(h::locations_delete))
        .route("/plans", get(h::plans_list).post(h::plans_create))
        .route("/plans/{id}", get(h::plans_get).put(h::plans_put).delete(h::plans_delete))
        .route("/plans/{id}/{action}", post(h::plans_action))
        .route("/audit", get(h::audit_list))
        .route("/sessions", get(h::sessions_list))
        .route("/sessions/{id}", get(h::sessions_get))
        .route("/sessions/{id}/log", get(h::sessions_log))
        .route("/sessions/{id}/events", get(h::sessions_events))
        .route("/sessions/{id}/halt", post(h::sessions_halt))
        .route("/sessions/{id}/continue", post(h::sessions_continue))
        .route("/sessions/{id}/undo", post(h::sessions_undo));
    Router::new()
        .nest("/v1", v1)
        .fallback(not_found)
        .method_not_allowed_fallback(|| async {
            (
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                axum::Json(error::ErrorBody {
                    error: "method_not_allowed",
                    message: "this path does not take that method".into(),
                }),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(4 << 20))
        .layer(axum::middleware::from_fn_with_state(app.clone(), audit::record))
        .with_state(ApiState { app })
}

/// How a listener speaks.
#[derive(Debug, Clone)]
pub enum Tls {
    /// HTTPS with this certificate and key (PEM files).
    Files { cert: PathBuf, key: PathBuf },
    /// Plain HTTP: only when asked for explicitly.
    Plain,
    /// HTTPS with a ready rustls configuration (the agent listener: the control plane's
    /// certificate from its own CA, client certificates optional).
    Config(std::sync::Arc<rustls::ServerConfig>),
}

/// Makes (once) a self-signed certificate for `localhost` and the machine's name in `dir`, and
/// returns the paths of its certificate and key.
pub fn self_signed(dir: &Path) -> std::io::Result<(PathBuf, PathBuf)> {
    let cert = dir.join("tls-cert.pem");
    let key = dir.join("tls-key.pem");
    if cert.is_file() && key.is_file() {
        return Ok((cert, key));
    }
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_string());
        }
    }
    let generated = rcgen::generate_simple_self_signed(names).map_err(std::io::Error::other)?;
    std::fs::create_dir_all(dir)?;
    // Key first and private from its creation: a crash between the two writes leaves no
    // certificate without its key. Each is published durably, so a crash or a power cut never
    // leaves a half-written file that the check above would take for a whole one.
    drover_qemu::durable::write_blocking(&key, generated.key_pair.serialize_pem().as_bytes(), 0o600)?;
    drover_qemu::durable::write_blocking(&cert, generated.cert.pem().as_bytes(), 0o600)?;
    Ok((cert, key))
}

/// A bound listener, ready to serve.
#[derive(Debug)]
pub struct Listener {
    pub addr: SocketAddr,
    pub tls: bool,
    handle: axum_server::Handle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Listener {
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }
    /// Connections open now (those in their TLS handshake included).
    pub fn connection_count(&self) -> usize {
        self.handle.connection_count()
    }
    /// Stops accepting and ends open connections within a grace period.
    pub async fn stop(self) {
        self.handle.graceful_shutdown(Some(std::time::Duration::from_secs(2)));
        let _ = self.task.await;
    }
    /// Serves until the listener fails.
    pub async fn wait(self) -> std::io::Result<()> {
        self.task.await.map_err(std::io::Error::other)?
    }
}

/// Binds `addr` and serves `router` on it in the background, with the default [`ListenerLimits`].
pub async fn listen(router: Router, addr: SocketAddr, tls: Tls) -> std::io::Result<Listener> {
    listen_with(router, addr, tls, ListenerLimits::default()).await
}

/// Binds `addr` and serves `router` on it in the background, within `limits`.
pub async fn listen_with(
    router: Router,
    addr: SocketAddr,
    tls: Tls,
    limits: ListenerLimits,
) -> std::io::Result<Listener> {
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let handle = axum_server::Handle::new();
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    let server = axum_server::from_tcp(std_listener).handle(handle.clone());
    let (task, is_tls) = match tls {
        Tls::Plain => {
            let server = server.acceptor(limits::LimitedAcceptor::new(axum_server::accept::DefaultAcceptor, limits));
            (tokio::spawn(async move { server.serve(service).await }), false)
        }
        Tls::Files { .. } | Tls::Config(_) => {
            // One process-wide crypto provider; installing it twice is harmless.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let config = match tls {
                Tls::Config(config) => axum_server::tls_rustls::RustlsConfig::from_config(config),
                Tls::Files { cert, key } => axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key).await?,
                Tls::Plain => unreachable!("matched above"),
            };
            let tls =
                axum_server::tls_rustls::RustlsAcceptor::new(config).handshake_timeout(limits.tls_handshake_timeout);
            let server = server.acceptor(limits::LimitedAcceptor::new(tls, limits));
            (tokio::spawn(async move { server.serve(service).await }), true)
        }
    };
    Ok(Listener { addr, tls: is_tls, handle, task })
}
