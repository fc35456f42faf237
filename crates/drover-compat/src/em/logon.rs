//! EM logon sessions: `POST /api/sessionMngr/?v=...` with Basic credentials makes one; every later
//! request names it by `X-RestSvcSessionId`, in a header or a cookie (the cookie wins).
//!
//! ```text
//!  (logon) ─▶ Active ─request within the idle timeout─▶ Active
//!               ├─ no request for the idle timeout ─▶ gone (401 "expired")
//!               └─ DELETE /api/logonSessions/{id} ─▶ gone
//! ```
//!
//! Logon sessions live in memory, in the dialect (the spec allows it: they are the dialect's own
//! state, not the application's). A restart logs every client off, which EM clients handle by
//! logging on again. Each holds the user, not a frozen [`Caller`]: the caller is looked up on
//! every request, so a deleted user or a changed role takes effect at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use drover_engine::app::{App, Caller};
use drover_types::{Error, UserId};
use uuid::Uuid;

/// The header and cookie that carry the token.
pub const SESSION_HEADER: &str = "X-RestSvcSessionId";

#[derive(Debug, Clone)]
pub struct LogonSession {
    pub id: Uuid,
    pub token: String,
    pub user_id: UserId,
    pub user_name: String,
    last_seen: Instant,
}

#[derive(Debug, Clone)]
pub struct LogonSessions {
    idle_timeout: Duration,
    /// By token.
    inner: Arc<Mutex<HashMap<String, LogonSession>>>,
}

impl LogonSessions {
    pub fn new(idle_timeout: Duration) -> LogonSessions {
        LogonSessions { idle_timeout, inner: Arc::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, LogonSession>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks the credentials with the application layer and opens a logon session.
    pub async fn logon(
        &self,
        app: &App,
        user: &str,
        password: &str,
        from: Option<std::net::IpAddr>,
    ) -> Result<(LogonSession, Caller), Error> {
        let tokens = app.login(user, password, from).await?;
        let caller = app.authenticate(&tokens.access_token).await?;
        let session = LogonSession {
            id: Uuid::new_v4(),
            token: drover_engine::auth::random_secret(32),
            user_id: caller.user_id,
            user_name: caller.name.clone(),
            last_seen: Instant::now(),
        };
        let mut inner = self.lock();
        let idle = self.idle_timeout;
        inner.retain(|_, s| s.last_seen.elapsed() < idle);
        inner.insert(session.token.clone(), session.clone());
        Ok((session, caller))
    }

    /// The logon session of a token, touched; an idle one is ended here.
    pub fn touch(&self, token: &str) -> Result<LogonSession, Error> {
        let mut inner = self.lock();
        let Some(s) = inner.get_mut(token) else {
            return Err(Error::Unauthorized("no such logon session; log on at /api/sessionMngr/".into()));
        };
        if s.last_seen.elapsed() >= self.idle_timeout {
            inner.remove(token);
            return Err(Error::Unauthorized("the logon session expired; log on again".into()));
        }
        s.last_seen = Instant::now();
        Ok(s.clone())
    }

    /// The live logon sessions of a user.
    pub fn of_user(&self, user: UserId) -> Vec<LogonSession> {
        let idle = self.idle_timeout;
        let mut list: Vec<_> =
            self.lock().values().filter(|s| s.user_id == user && s.last_seen.elapsed() < idle).cloned().collect();
        list.sort_by_key(|s| s.id);
        list
    }

    /// Ends a logon session of this user; another user's is not found.
    pub fn end(&self, user: UserId, id: Uuid) -> bool {
        let mut inner = self.lock();
        let token = inner.iter().find(|(_, s)| s.id == id && s.user_id == user).map(|(t, _)| t.clone());
        token.and_then(|t| inner.remove(&t)).is_some()
    }
}

/// The token of a request: the cookie when there is one, else the header.
pub fn token_of(headers: &axum::http::HeaderMap) -> Option<String> {
    let from_cookie = headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| k.trim() == SESSION_HEADER)
        .map(|(_, v)| v.trim().to_string());
    from_cookie
        .or_else(|| headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()).map(|v| v.trim().to_string()))
        .filter(|t| !t.is_empty())
}

/// `Authorization: Basic base64(user:password)`.
pub fn basic_credentials(headers: &axum::http::HeaderMap) -> Result<(String, String), Error> {
    use base64::Engine as _;
    let bad = |m: &str| Error::Unauthorized(m.to_string());
    let value = headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| bad("log on with Authorization: Basic <credentials>"))?
        .to_str()
        .map_err(|_| bad("malformed Authorization header"))?;
    let (scheme, encoded) = value.trim().split_once(' ').ok_or_else(|| bad("Authorization must be Basic"))?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(bad("Authorization must be Basic"));
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| bad("Basic credentials are not base64 of user:password"))?;
    let (user, password) = decoded.split_once(':').ok_or_else(|| bad("Basic credentials lack ':'"))?;
    Ok((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    #[test]
    fn the_cookie_wins_over_the_header() {
        let mut h = HeaderMap::new();
        assert_eq!(token_of(&h), None);
        h.insert(SESSION_HEADER, HeaderValue::from_static("from-header"));
        assert_eq!(token_of(&h).as_deref(), Some("from-header"));
        h.insert("cookie", HeaderValue::from_static("a=b; X-RestSvcSessionId=from-cookie"));
        assert_eq!(token_of(&h).as_deref(), Some("from-cookie"));
    }

    #[test]
    fn basic_credentials_are_decoded_and_checked() {
        let mut h = HeaderMap::new();
        assert!(basic_credentials(&h).is_err());
        h.insert("authorization", HeaderValue::from_static("Basic YWRtaW46cGE6c3M="));
        assert_eq!(basic_credentials(&h).unwrap(), ("admin".into(), "pa:ss".into()));
        h.insert("authorization", HeaderValue::from_static("Bearer YWRtaW46cGFzcw=="));
        assert!(basic_credentials(&h).is_err());
        h.insert("authorization", HeaderValue::from_static("Basic !!!"));
        assert!(basic_credentials(&h).is_err());
    }
}
