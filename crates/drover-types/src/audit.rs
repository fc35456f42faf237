//! The audit log: who did what, when, from where. Logins (successful, failed, locked out) and
//! every mutating request that an authenticated caller made are recorded; entries are never
//! changed.

use serde::{Deserialize, Serialize};

use crate::{TenantId, Timestamp, UserId};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditOutcome {
    /// It was done (a 2xx answer, a login that succeeded).
    Success,
    /// It was refused: bad input, not allowed, a wrong password (a 4xx answer).
    Refused,
    /// It failed on drover's side (a 5xx answer).
    Failed,
}

impl AuditOutcome {
    /// The outcome an HTTP status stands for.
    pub fn of_status(status: u16) -> AuditOutcome {
        match status {
            200..=399 => AuditOutcome::Success,
            400..=499 => AuditOutcome::Refused,
            _ => AuditOutcome::Failed,
        }
    }
}

/// One entry as it is recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub at: Timestamp,
    /// The tenant the caller (or the named user) belongs to; none for an unknown user name.
    pub tenant_id: Option<TenantId>,
    pub user_id: Option<UserId>,
    /// The user name as given (for a login of an unknown name, what was tried).
    pub user_name: String,
    /// `login`, `login_lockout`, or the request: `POST /v1/vms`.
    pub action: String,
    pub outcome: AuditOutcome,
    /// The client's address; none for in-process callers.
    pub address: Option<String>,
    /// What happened, for a person (the status and the error message).
    pub detail: String,
}

/// A recorded entry: its position in the log, then the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: i64,
    #[serde(flatten)]
    pub record: AuditRecord,
}

/// Which entries to read, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only this tenant's entries (a tenant administrator's view); `None` reads all.
    pub tenant_id: Option<TenantId>,
    /// Only entries older than this position (paging backwards).
    pub before_seq: Option<i64>,
    pub action: Option<String>,
    pub limit: u64,
}
