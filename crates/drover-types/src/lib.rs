//! drover's domain: ids, inventory values, lifecycles and the domain error.
//!
//! This crate does no I/O. Every lifecycle (plan, replica, session, VM power) is an enum with one
//! transition function that refuses illegal moves; the engine persists the result of a transition
//! before it reports it.

pub mod agent;
pub mod audit;
pub mod error;
pub mod ids;
pub mod inventory;
pub mod plan;
pub mod replica;
pub mod session;

pub use agent::*;
pub use audit::*;
pub use error::{Error, Result, error_chain};
pub use ids::*;
pub use inventory::*;
pub use plan::*;
pub use replica::*;
pub use session::*;

/// Timestamps are UTC everywhere.
pub type Timestamp = chrono::DateTime<chrono::Utc>;

pub fn now() -> Timestamp {
    // Whole milliseconds: what every store can hold exactly, so a value read back equals the one written.
    let now = chrono::Utc::now();
    chrono::DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}
