//! The audit of mutating requests, the same for every API (the native one and both dialects).
//!
//! A middleware gives every request that may change something (any method but GET, HEAD and
//! OPTIONS) a [`CallerSlot`]; the API's authentication puts the caller it established there
//! ([`note_caller`]); after the handler has answered, the middleware records who did what, the
//! status and from where through [`App::audit_request`]. Requests no caller was established for
//! (a missing or bad token) change nothing and are not recorded here; logins are recorded by
//! [`App::login`] itself.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::Method;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::Response;
use drover_engine::app::{App, Caller};

/// Where authentication leaves the caller of a mutating request for the audit.
#[derive(Debug, Clone, Default)]
pub struct CallerSlot(Arc<Mutex<Option<Caller>>>);

/// Called by each API's authentication once it knows the caller.
pub fn note_caller(parts: &Parts, caller: &Caller) {
    if let Some(slot) = parts.extensions.get::<CallerSlot>() {
        *slot.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(caller.clone());
    }
}

/// The middleware: `axum::middleware::from_fn_with_state(app, audit::record)` on a router.
pub async fn record(State(app): State<App>, mut req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let from = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(a)| a.ip());
    let mut action = format!("{} {}", req.method(), req.uri().path());
    if action.len() > 512 {
        let mut end = 512;
        while !action.is_char_boundary(end) {
            end -= 1;
        }
        action.truncate(end);
    }
    let slot = CallerSlot::default();
    req.extensions_mut().insert(slot.clone());
    let resp = next.run(req).await;
    let caller = slot.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(caller) = caller {
        app.audit_request(&caller, action, resp.status().as_u16(), from).await;
    }
    resp
}
