//! What the control plane records of the agents of its hosts.

use serde::{Deserialize, Serialize};

use crate::{HostId, Timestamp};

/// The stored record of an enrolment token: its hash, never the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEnrolment {
    pub host_id: HostId,
    /// BLAKE3 of the token's secret, 64 hex digits: the lookup key.
    pub token_hash: String,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    /// Set by the enrolment that used the token; a used token is refused.
    pub consumed_at: Option<Timestamp>,
}

/// A host's agent as the control plane last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    /// When the agent got its certificate; `None`: never enrolled.
    pub enrolled_at: Option<Timestamp>,
    /// When a call to the agent last succeeded.
    pub last_seen: Option<Timestamp>,
    /// Why the last call failed, when it did (cleared by a success).
    pub last_error: Option<String>,
    /// When the agent's certificate stops being valid (set at enrolment).
    pub certificate_expires_at: Option<Timestamp>,
}
