//! How each inventory kind is stored: its kind name, tenant, display name and the objects it
//! refers to (which then cannot be deleted while it exists).

use drover_types::{
    Datastore, DatastoreId, Host, HostId, Plan, PlanId, RecoveryLocation, RecoveryLocationId, Replica, ReplicaId,
    ReplicationJob, ReplicationJobId, Site, SiteId, TenantId, Vm, VmId,
};
use serde::{Serialize, de::DeserializeOwned};
use uuid::Uuid;

pub trait Entity: Serialize + DeserializeOwned + Send + Sync + Unpin {
    /// The stored kind; never changes once data exists.
    const KIND: &'static str;
    /// How messages name it.
    const LABEL: &'static str;
    fn id(&self) -> Uuid;
    fn tenant(&self) -> TenantId;
    fn name(&self) -> &str;
    fn set_name(&mut self, name: String);
    /// `(kind, id)` of every object this one refers to.
    fn refs(&self) -> Vec<(&'static str, Uuid)>;
}

macro_rules! entity {
    ($t:ty, $id:ty, $kind:literal, |$s:ident| $refs:expr) => {
        impl Entity for $t {
            const KIND: &'static str = $kind;
            const LABEL: &'static str = <$id>::KIND;
            fn id(&self) -> Uuid {
                self.id.0
            }
            fn tenant(&self) -> TenantId {
                self.tenant_id
            }
            fn name(&self) -> &str {
                &self.name
            }
            fn set_name(&mut self, name: String) {
                self.name = name;
            }
            fn refs(&$s) -> Vec<(&'static str, Uuid)> {
                $refs
            }
        }
    };
}

entity!(Site, SiteId, "site", |self| Vec::new());
entity!(Host, HostId, "host", |self| vec![("site", self.site_id.0)]);
entity!(Datastore, DatastoreId, "datastore", |self| vec![("host", self.host_id.0)]);
entity!(Vm, VmId, "vm", |self| vec![("host", self.host_id.0), ("datastore", self.datastore_id.0)]);
entity!(ReplicationJob, ReplicationJobId, "replication_job", |self| {
    let mut r: Vec<_> = self.vm_ids.iter().map(|v| ("vm", v.0)).collect();
    r.push(("host", self.target_host_id.0));
    r.push(("datastore", self.target_datastore_id.0));
    r
});
entity!(Replica, ReplicaId, "replica", |self| vec![
    ("replication_job", self.job_id.0),
    ("vm", self.source_vm_id.0),
    ("datastore", self.target_datastore_id.0)
]);
entity!(Plan, PlanId, "plan", |self| {
    let mut r: Vec<_> = self.vm_ids().map(|v| ("vm", v.0)).collect();
    if self.recovery_location_id != RecoveryLocationId::ORIGINAL {
        r.push(("recovery_location", self.recovery_location_id.0));
    }
    r
});
entity!(RecoveryLocation, RecoveryLocationId, "recovery_location", |self| {
    let mut r = Vec::new();
    if let Some(h) = self.host_id {
        r.push(("host", h.0));
    }
    if let Some(d) = self.datastore_id {
        r.push(("datastore", d.0));
    }
    r
});

/// The label of a stored kind, for messages.
pub(crate) fn label_of(kind: &str) -> &'static str {
    match kind {
        "site" => SiteId::KIND,
        "host" => HostId::KIND,
        "datastore" => DatastoreId::KIND,
        "vm" => VmId::KIND,
        "replication_job" => ReplicationJobId::KIND,
        "replica" => ReplicaId::KIND,
        "plan" => PlanId::KIND,
        "recovery_location" => RecoveryLocationId::KIND,
        _ => "object",
    }
}
