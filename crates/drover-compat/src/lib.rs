//! The Veeam-compatible dialects, each on its own listener, both thin facades over
//! [`drover_engine::app::App`] (see `../shared/spec/veeam-compat.md` for what they serve):
//!
//! - [`vro`]: the Recovery Orchestrator dialect (JSON, `/api/v3` and its version aliases).
//! - [`em`]: the Enterprise Manager dialect (XML in `http://www.veeam.com/ent/v1.0` by default,
//!   JSON on `Accept: application/json`).
//!
//! A dialect holds no state of its own beyond its logon sessions and tasks; plans, sessions and
//! their state machines are the application layer's.

pub mod em;
pub mod vro;
