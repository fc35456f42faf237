//! Typed ids: a `VmId` cannot be passed where a `PlanId` is expected.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! typed_id {
    ($($name:ident => $label:literal),* $(,)?) => {$(
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// What the id names, for error messages ("VM 1234... not found").
            pub const KIND: &'static str = $label;
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }
        }
        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
        impl std::str::FromStr for $name {
            type Err = crate::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s)
                    .map(Self)
                    .map_err(|_| crate::Error::invalid(format!("{s:?} is not a valid {} id (a UUID)", $label)))
            }
        }
        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }
    )*};
}

typed_id! {
    TenantId => "tenant",
    UserId => "user",
    SiteId => "site",
    HostId => "host",
    DatastoreId => "datastore",
    VmId => "VM",
    ReplicationJobId => "replication job",
    ReplicaId => "replica",
    RestorePointId => "restore point",
    PlanId => "plan",
    PlanGroupId => "plan group",
    PlanStepId => "plan step",
    RecoveryLocationId => "recovery location",
    SessionId => "session",
    TaskId => "task",
}

impl RecoveryLocationId {
    /// The built-in "Original VM Location". It always exists and cannot be edited; the nil UUID
    /// makes it the same in every tenant and every installation.
    pub const ORIGINAL: RecoveryLocationId = RecoveryLocationId(Uuid::nil());
}
