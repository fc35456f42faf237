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
pub mod headers;
pub mod vro;

/// The control plane as both dialects name it: the Recovery Orchestrator's `serverId` and the
/// Enterprise Manager's backup server. The same on every start and every installation, so saved
/// links and UIDs stay valid; a fixed random UUID (v4 layout), chosen once for drover.
pub const CONTROL_PLANE_ID: uuid::Uuid = uuid::Uuid::from_u128(0x3f5e_0c2a_9b7d_4e61_8a43_d2f0_6c19_b7e5);
