//! The HTTP side of the client: one `reqwest` client, bearer tokens that refresh themselves, and
//! the API's error bodies turned into `error: <message> (HTTP <status>)`.

use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use chrono::Utc;
use drover_api::views::TokenResponse;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::credentials::{CredentialStore, Credentials};

/// Ordinary requests; the event stream has none (it is watched for idleness instead).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An error the API answered with.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (HTTP {})", self.message, self.status.as_u16())
    }
}

impl std::error::Error for ApiError {}

/// How requests are authenticated.
#[derive(Debug)]
enum Auth {
    /// `--token`: used as given, never refreshed.
    Token(String),
    /// The saved login, refreshed when it expires.
    Saved { store: CredentialStore, creds: Credentials },
    /// No usable credentials; the reason is the error every authenticated call reports.
    Missing(String),
}

/// TLS and address settings for reaching the server.
#[derive(Debug, Clone)]
pub struct Connection {
    pub server: String,
    pub insecure: bool,
    pub ca_cert: Option<std::path::PathBuf>,
}

#[derive(Debug)]
pub struct Api {
    http: reqwest::Client,
    server: String,
    auth: Mutex<Auth>,
}

/// A successful answer.
#[derive(Debug)]
pub struct ApiResponse {
    pub location: Option<String>,
    pub body: Vec<u8>,
}

impl ApiResponse {
    pub fn parse<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "unexpected answer from the server: {}",
                String::from_utf8_lossy(&self.body[..self.body.len().min(300)])
            )
        })
    }
}

/// One request, rebuilt for a retry after a token refresh.
#[derive(Debug)]
pub struct Request<'a> {
    method: Method,
    path: &'a str,
    query: Vec<(&'static str, String)>,
    body: Option<Value>,
    timeout: Option<Duration>,
}

impl<'a> Request<'a> {
    pub fn new(method: Method, path: &'a str) -> Self {
        Request { method, path, query: Vec::new(), body: None, timeout: Some(REQUEST_TIMEOUT) }
    }
    pub fn get(path: &'a str) -> Self {
        Self::new(Method::GET, path)
    }
    pub fn post(path: &'a str) -> Self {
        Self::new(Method::POST, path)
    }
    pub fn delete(path: &'a str) -> Self {
        Self::new(Method::DELETE, path)
    }
    pub fn json(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }
    pub fn query(mut self, key: &'static str, value: impl ToString) -> Self {
        self.query.push((key, value.to_string()));
        self
    }
    pub fn no_timeout(mut self) -> Self {
        self.timeout = None;
        self
    }
}

/// Builds the HTTP client for `conn`.
pub fn http_client(conn: &Connection) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("drover-cli/", env!("CARGO_PKG_VERSION")));
    if conn.insecure {
        builder = builder.danger_accept_invalid_certs(true);
    }
    if let Some(path) = &conn.ca_cert {
        let pem = std::fs::read(path).with_context(|| format!("cannot read --ca-cert {}", path.display()))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("--ca-cert {} is not a PEM certificate", path.display()))?;
        builder = builder.add_root_certificate(cert);
    }
    builder.build().context("cannot set up the HTTP client")
}

/// Checks `--server` and returns it without a trailing slash, so paths append cleanly.
pub fn normalize_server(server: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(server)
        .with_context(|| format!("--server {server:?} is not a URL (expected e.g. https://127.0.0.1:8443)"))?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("--server {server:?} must start with https:// (or http:// with `drover serve --plain-http`)");
    }
    Ok(server.trim_end_matches('/').to_string())
}

impl Api {
    /// A client for `conn.server`. `token` (from `--token`) wins over the saved login; saved
    /// credentials are only used for the server they were issued by.
    pub fn new(conn: &Connection, token: Option<String>, store: CredentialStore) -> anyhow::Result<Self> {
        let http = http_client(conn)?;
        let auth = match token {
            Some(t) => Auth::Token(t),
            None => match store.load()? {
                Some(creds) if creds.server == conn.server => Auth::Saved { store, creds },
                Some(creds) => Auth::Missing(format!(
                    "the saved login is for {}, not {}: run `drover login --server {} --user <name>`",
                    creds.server, conn.server, conn.server
                )),
                None => Auth::Missing(format!(
                    "not logged in to {}: run `drover login --user <name>` (or pass --token / set DROVER_TOKEN)",
                    conn.server
                )),
            },
        };
        Ok(Api { http, server: conn.server.clone(), auth: Mutex::new(auth) })
    }

    /// A client for `POST /v1/token` only: it holds no credentials.
    pub fn anonymous(conn: &Connection) -> anyhow::Result<Self> {
        let auth = Auth::Missing("log in first".into());
        Ok(Api { http: http_client(conn)?, server: conn.server.clone(), auth: Mutex::new(auth) })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v1{path}", self.server)
    }

    fn auth(&self) -> std::sync::MutexGuard<'_, Auth> {
        // A panic while holding this lock cannot leave the enum half-written; keep going.
        self.auth.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends `req` and returns the answer when it is a success; an error answer becomes
    /// [`ApiError`].
    pub async fn send(&self, req: Request<'_>) -> anyhow::Result<ApiResponse> {
        let resp = self.send_raw(req).await?;
        let location = resp.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = resp.bytes().await.map_err(|e| self.transport_error(e))?.to_vec();
        Ok(ApiResponse { location, body })
    }

    /// Sends `req` with a bearer token, refreshing once on 401, and returns the response unread
    /// when its status is a success.
    pub async fn send_raw(&self, req: Request<'_>) -> anyhow::Result<reqwest::Response> {
        let mut token = self.bearer().await?;
        let mut refreshed = false;
        loop {
            let mut rb = self.http.request(req.method.clone(), self.url(req.path)).bearer_auth(&token);
            if !req.query.is_empty() {
                rb = rb.query(&req.query);
            }
            if let Some(body) = &req.body {
                rb = rb.json(body);
            }
            if let Some(t) = req.timeout {
                rb = rb.timeout(t);
            }
            let resp = rb.send().await.map_err(|e| self.transport_error(e))?;
            // The access token may have been revoked or expired early (a clock skew): one refresh.
            if resp.status() == StatusCode::UNAUTHORIZED && !refreshed && self.can_refresh() {
                token = self.refresh(&token).await?;
                refreshed = true;
                continue;
            }
            return check(resp).await;
        }
    }

    fn can_refresh(&self) -> bool {
        matches!(*self.auth(), Auth::Saved { .. })
    }

    /// The access token to use now, refreshed first when it has expired.
    async fn bearer(&self) -> anyhow::Result<String> {
        let (token, expired) = match &*self.auth() {
            Auth::Token(t) => return Ok(t.clone()),
            Auth::Missing(why) => bail!("{why}"),
            Auth::Saved { creds, .. } => (creds.access_token.clone(), creds.access_expired(Utc::now())),
        };
        if expired { self.refresh(&token).await } else { Ok(token) }
    }

    /// Trades the refresh token for a new pair and saves it; returns the new access token.
    /// `stale` is the access token that was found wanting.
    async fn refresh(&self, stale: &str) -> anyhow::Result<String> {
        let store = match &*self.auth() {
            Auth::Saved { store, .. } => store.clone(),
            _ => bail!("cannot refresh a token given with --token"),
        };
        let _lock = store.lock().await?;
        // The file is the truth: another drover process may have refreshed since we read it.
        let Some(on_disk) = store.load()? else {
            bail!("the saved login was removed (drover logout?); run `drover login` again")
        };
        if on_disk.server != self.server {
            bail!("the saved login changed to {} meanwhile; run `drover login` again", on_disk.server);
        }
        let creds = if on_disk.access_token != stale && !on_disk.access_expired(Utc::now()) {
            on_disk
        } else {
            let pair = self
                .token_request(&[("grant_type", "refresh_token"), ("refresh_token", &on_disk.refresh_token)])
                .await
                .map_err(|e| match e.downcast_ref::<ApiError>() {
                    Some(api) if api.status == StatusCode::UNAUTHORIZED => {
                        anyhow!("the saved login is no longer valid ({}): run `drover login` again", api.message)
                    }
                    _ => e.context("cannot refresh the access token"),
                })?;
            let creds = credentials_from(&self.server, pair);
            store.save(&creds)?;
            creds
        };
        let token = creds.access_token.clone();
        if let Auth::Saved { creds: current, .. } = &mut *self.auth() {
            *current = creds;
        }
        Ok(token)
    }

    /// `POST /v1/token` (form encoded); needs no bearer token.
    pub async fn token_request(&self, form: &[(&str, &str)]) -> anyhow::Result<TokenResponse> {
        let resp = self
            .http
            .post(self.url("/token"))
            .form(form)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let resp = check(resp).await?;
        let body = resp.bytes().await.map_err(|e| self.transport_error(e))?;
        serde_json::from_slice(&body).context("unexpected answer to the token request")
    }

    /// Explains a failure to talk to the server at all, with a hint for the usual TLS mistake.
    pub fn transport_error(&self, e: reqwest::Error) -> anyhow::Error {
        let chain = error_chain(&e);
        if e.is_timeout() {
            return anyhow!("the server at {} did not answer in time ({chain})", self.server);
        }
        let lower = chain.to_lowercase();
        if lower.contains("certificate") || lower.contains("unknownissuer") {
            return anyhow!(
                "cannot connect to {}: the server's TLS certificate is not trusted ({chain}); pass \
                 --ca-cert <data-dir>/tls-cert.pem to trust drover's self-signed certificate, or \
                 --insecure to skip the check",
                self.server
            );
        }
        if lower.contains("invalidcontenttype") || lower.contains("corrupt message") {
            return anyhow!(
                "cannot connect to {}: TLS failed ({chain}); is the server serving plain HTTP? then use http://",
                self.server
            );
        }
        anyhow!("cannot reach the drover server at {}: {chain}", self.server)
    }
}

/// The credentials to save for a fresh token pair.
pub fn credentials_from(server: &str, pair: TokenResponse) -> Credentials {
    Credentials {
        server: server.to_string(),
        access_token: pair.access_token,
        refresh_token: pair.refresh_token,
        expires_at: Utc::now() + chrono::Duration::seconds(pair.expires_in.max(0)),
    }
}

/// Passes a success through; turns an error answer into [`ApiError`].
async fn check(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = resp.bytes().await.unwrap_or_default();
    Err(api_error(status, &body).into())
}

pub fn api_error(status: StatusCode, body: &[u8]) -> ApiError {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        message: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => ApiError { status, message: b.message },
        // Not ours (a proxy, a wrong port): show what came back, briefly.
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_string();
            let reason = status.canonical_reason().unwrap_or("error");
            let message = if text.is_empty() { reason.to_string() } else { format!("{reason}: {text}") };
            ApiError { status, message }
        }
    }
}

/// `e` and its sources, joined, since reqwest's top-level message alone rarely says what failed.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_render_message_and_status() {
        let e = api_error(StatusCode::NOT_FOUND, br#"{"error":"not_found","message":"host 1 not found"}"#);
        assert_eq!(e.to_string(), "host 1 not found (HTTP 404)");
        let e = api_error(StatusCode::BAD_GATEWAY, b"<html>upstream</html>");
        assert_eq!(e.to_string(), "Bad Gateway: <html>upstream</html> (HTTP 502)");
        let e = api_error(StatusCode::BAD_GATEWAY, b"");
        assert_eq!(e.to_string(), "Bad Gateway (HTTP 502)");
    }

    #[test]
    fn server_urls_are_checked_and_trimmed() {
        assert_eq!(normalize_server("https://127.0.0.1:8443/").unwrap(), "https://127.0.0.1:8443");
        assert!(normalize_server("127.0.0.1:8443").is_err());
        assert!(normalize_server("ftp://127.0.0.1").is_err());
    }
}
