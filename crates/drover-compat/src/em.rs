//! The Enterprise Manager dialect (spec `veeam-compat.md` section 2): XML in
//! `http://www.veeam.com/ent/v1.0` by default, JSON on `Accept: application/json`, under `/api`.
//!
//! A thin facade over [`App`]: handlers parse, call the application layer, and build an
//! [`render::Element`] from [`views`]; [`render::negotiate`] writes it (or the `Error`) in the
//! format asked for. The dialect's own state is only its logon sessions ([`logon`]) and its
//! tasks ([`tasks`]), both in memory.
//!
//! Code map: [`handlers`] (routes), [`views`] (representations), [`render`] (XML/JSON and
//! errors, the one place), [`query`] (the query service), [`filter`] (its filter language),
//! [`body`] (request bodies, with their size, depth and attribute limits).

use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use drover_engine::app::App;
use uuid::Uuid;

pub mod body;
pub mod filter;
pub mod handlers;
pub mod logon;
pub mod query;
pub mod render;
pub mod tasks;
pub mod views;

/// How the dialect is served.
#[derive(Debug, Clone)]
pub struct EmConfig {
    /// A logon session ends after this long without a request (15 minutes in the product).
    pub idle_timeout: Duration,
    /// The scheme of the `Href`s: `https` unless the listener is the legacy plain-HTTP one.
    pub scheme: &'static str,
    /// The control plane as the "backup server": a stable id, a name, and the port of its
    /// native API.
    pub backup_server_id: Uuid,
    pub backup_server_name: String,
    pub backup_server_port: u16,
    /// Where clients reach the dialect when it is behind a proxy: every `Href` starts with it
    /// instead of the request's scheme and authority.
    pub external_base_url: Option<ExternalBaseUrl>,
}

impl Default for EmConfig {
    fn default() -> Self {
        EmConfig {
            idle_timeout: Duration::from_secs(15 * 60),
            scheme: "https",
            backup_server_id: default_backup_server_id(),
            backup_server_name: "drover".into(),
            backup_server_port: 8443,
            external_base_url: None,
        }
    }
}

/// The dialect's address as its clients see it behind a proxy (`https://dr.example.com` or
/// `https://proxy.example.com/em`): an absolute `http` or `https` URL with a host, without
/// query, fragment or user information. Kept without its trailing slash; `Href`s append
/// `/api/...` to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalBaseUrl(String);

impl ExternalBaseUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ExternalBaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ExternalBaseUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            Err(format!(
                "the Enterprise Manager external URL {s:?} {why}: give an absolute http or https URL such as \
                 https://dr.example.com or https://proxy.example.com/em"
            ))
        };
        if s.contains('#') {
            return bad("has a fragment");
        }
        let uri: axum::http::Uri = match s.parse() {
            Ok(u) => u,
            Err(e) => return bad(&format!("is not a URL ({e})")),
        };
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            Some(other) => return bad(&format!("has the scheme {other:?}")),
            None => return bad("is not absolute"),
        }
        let Some(authority) = uri.authority() else { return bad("has no host") };
        if authority.host().is_empty() {
            return bad("has no host");
        }
        if authority.as_str().contains('@') {
            return bad("has user information");
        }
        if uri.query().is_some() {
            return bad("has a query");
        }
        let path = uri.path().trim_end_matches('/');
        Ok(ExternalBaseUrl(format!("{}://{}{path}", uri.scheme_str().unwrap_or("https"), authority)))
    }
}

/// The backup server's id: the control plane's ([`crate::CONTROL_PLANE_ID`]).
pub fn default_backup_server_id() -> Uuid {
    crate::CONTROL_PLANE_ID
}

#[derive(Debug, Clone)]
pub struct EmState {
    pub app: App,
    pub config: EmConfig,
    pub logons: logon::LogonSessions,
    pub tasks: tasks::Tasks,
}

/// The dialect with the default configuration.
pub fn router(app: App) -> Router {
    router_with(app, EmConfig::default())
}

pub fn router_with(app: App, config: EmConfig) -> Router {
    routes(EmState::new(app, config))
}

impl EmState {
    /// The dialect's state: its logon sessions and tasks, shared by every router made from it.
    pub fn new(app: App, config: EmConfig) -> EmState {
        EmState { app, logons: logon::LogonSessions::new(config.idle_timeout), config, tasks: Default::default() }
    }

    /// The dialect on a listener whose `Href`s use `scheme`: the HTTPS listener and the legacy
    /// plain-HTTP one are one service (a logon on either works on both), only their links differ.
    pub fn router_for_scheme(&self, scheme: &'static str) -> Router {
        let mut state = self.clone();
        state.config.scheme = scheme;
        routes(state)
    }
}

/// The literal segments of the dialect's paths, as the product spells them. Enterprise Manager
/// matches paths without regard to case (clients generated from its schema call `/api/Tasks`,
/// `/api/FailoverPlans`), so a request's segments are put in this spelling before routing.
const PATH_SEGMENTS: &[&str] = &[
    "api",
    "sessionMngr",
    "logonSessions",
    "backupServers",
    "cloud",
    "failoverSessions",
    "vmReplicaPoints",
    "cloudFailoverPlans",
    "failoverPlans",
    "tasks",
    "query",
    "includes",
];

/// `path` with each segment that is one of [`PATH_SEGMENTS`] in any case spelled as the product
/// does; other segments (ids) are left as they are.
fn canonical_path(path: &str) -> std::borrow::Cow<'_, str> {
    let needs = path.split('/').any(|seg| PATH_SEGMENTS.iter().any(|c| c.eq_ignore_ascii_case(seg) && *c != seg));
    if !needs {
        return std::borrow::Cow::Borrowed(path);
    }
    let segments: Vec<&str> = path
        .split('/')
        .map(|seg| PATH_SEGMENTS.iter().find(|c| c.eq_ignore_ascii_case(seg)).copied().unwrap_or(seg))
        .collect();
    std::borrow::Cow::Owned(segments.join("/"))
}

/// The middleware that respells a request's path before it is routed ([`canonical_path`]).
async fn case_insensitive_paths(mut req: axum::extract::Request) -> axum::extract::Request {
    let path = req.uri().path();
    if let std::borrow::Cow::Owned(canon) = canonical_path(path) {
        let with_query = match req.uri().query() {
            Some(q) => format!("{canon}?{q}"),
            None => canon,
        };
        let mut parts = req.uri().clone().into_parts();
        if let Ok(pq) = with_query.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = axum::http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
    req
}

fn routes(state: EmState) -> Router {
    // Paths are respelled before the router sees them: a layer on an outer router whose only
    // route is the dialect's router runs before that router routes.
    Router::new()
        .fallback_service(dialect_routes(state))
        .layer(axum::middleware::map_request(case_insensitive_paths))
        .layer(axum::middleware::from_fn_with_state(
            default_content_type as crate::headers::DefaultContentType,
            crate::headers::complete,
        ))
}

/// The type of an answer that has none (an accepted edit's empty 202): the format the request's
/// `Accept` chose, as [`render::Format::render`] writes it.
fn default_content_type(headers: &axum::http::HeaderMap) -> axum::http::HeaderValue {
    use axum::http::HeaderValue;
    match render::Format::from_accept(headers.get(axum::http::header::ACCEPT).and_then(|v| v.to_str().ok())) {
        render::Format::Xml => HeaderValue::from_static("application/xml; charset=utf-8"),
        render::Format::Json => HeaderValue::from_static("application/json; charset=utf-8"),
    }
}

fn dialect_routes(state: EmState) -> Router {
    use handlers as h;
    // Full paths rather than `nest`: `/api/` and `/api/sessionMngr/` end in a slash, as the
    // product writes them, and must match exactly that.
    Router::new()
        .route("/api", get(h::enterprise_manager))
        .route("/api/", get(h::enterprise_manager))
        .route("/api/sessionMngr/", post(h::logon).get(h::logon_current))
        .route("/api/logonSessions", get(h::logon_sessions))
        .route("/api/logonSessions/{id}", get(h::logon_session_get).delete(h::logon_session_delete))
        .route("/api/backupServers", get(h::backup_servers))
        .route("/api/backupServers/{id}", get(h::backup_server_get))
        .route("/api/cloud/failoverSessions", get(h::sessions_list))
        .route("/api/cloud/failoverSessions/{id}", get(h::session_get))
        .route("/api/vmReplicaPoints/{id}", get(h::replica_point_get))
        .route("/api/cloud/cloudFailoverPlans", get(h::cloud_plans_list))
        .route(
            "/api/cloud/cloudFailoverPlans/{id}",
            get(h::cloud_plan_get).post(h::cloud_plan_action).put(h::cloud_plan_put).delete(h::cloud_plan_delete),
        )
        .route("/api/cloud/cloudFailoverPlans/{id}/includes", get(h::cloud_plan_vms))
        .route("/api/cloud/cloudFailoverPlans/{id}/includes/{vm}", get(h::cloud_plan_vm))
        .route("/api/failoverPlans", get(h::plans_list))
        .route("/api/failoverPlans/{id}/includes", get(h::plan_vms))
        .route("/api/failoverPlans/{id}/includes/{vm}", get(h::plan_vm))
        .route("/api/failoverPlans/{id}", get(h::plan_get).post(h::plan_action).put(h::plan_put).delete(h::plan_delete))
        .route("/api/tasks", get(h::tasks_list))
        .route("/api/tasks/{id}", get(h::task_get).delete(h::task_delete))
        .route("/api/query", get(h::query))
        .fallback(h::not_found)
        .layer(axum::middleware::from_fn(render::negotiate))
        .layer(axum::middleware::from_fn_with_state(state.app.clone(), drover_api::audit::record))
        .layer(axum::extract::DefaultBodyLimit::max(body::MAX_BODY_BYTES))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::canonical_path;

    #[test]
    fn paths_are_respelled_as_the_product_spells_them_and_ids_are_left_alone() {
        assert_eq!(canonical_path("/api/Tasks"), "/api/tasks");
        assert_eq!(canonical_path("/API/FailoverPlans/ABC-def"), "/api/failoverPlans/ABC-def");
        assert_eq!(canonical_path("/api/Cloud/CLOUDFAILOVERPLANS/x"), "/api/cloud/cloudFailoverPlans/x");
        assert_eq!(canonical_path("/api/SessionMngr/"), "/api/sessionMngr/");
        assert!(matches!(canonical_path("/api/tasks/Tasks-1"), std::borrow::Cow::Borrowed(_)));
        assert!(matches!(canonical_path("/api/query"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(canonical_path("/api/failoverPlans/x/Includes/y"), "/api/failoverPlans/x/includes/y");
    }

    #[test]
    fn the_external_url_is_an_absolute_http_url_without_query_or_fragment() {
        use super::ExternalBaseUrl;
        let ok = |s: &str| s.parse::<ExternalBaseUrl>().unwrap().to_string();
        assert_eq!(ok("https://dr.example.com"), "https://dr.example.com");
        assert_eq!(ok("https://dr.example.com/"), "https://dr.example.com");
        assert_eq!(ok("http://10.0.0.5:9399/em/"), "http://10.0.0.5:9399/em");
        for (bad, why) in [
            ("dr.example.com", "is not absolute"),
            ("/em", "is not absolute"),
            ("ftp://dr.example.com", "scheme"),
            ("https://dr.example.com/?a=b", "has a query"),
            ("https://dr.example.com/#top", "has a fragment"),
            ("https://user:pw@dr.example.com", "user information"),
            ("https://", "not a URL"),
            ("", "not a URL"),
        ] {
            let e = bad.parse::<ExternalBaseUrl>().unwrap_err();
            assert!(e.contains(why) && e.contains("external URL"), "{bad}: {e}");
        }
    }
}
