//! The native API's wire types: what goes over HTTP as JSON, separate from the domain types and
//! converted with explicit `From`s. Request bodies refuse unknown fields, so a misspelt field is
//! a 400 rather than silently ignored.

use drover_types as d;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// A started operation: follow it at `/v1/sessions/{session_id}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Accepted {
    pub session_id: Uuid,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub total: u64,
    pub items: Vec<T>,
}

// ------------------------------------------------------------------------------------------------
// Auth

/// `POST /v1/token`, as a form (`application/x-www-form-urlencoded`) or as JSON.
#[derive(Debug, Deserialize, ToSchema)]
pub struct TokenRequest {
    /// `password` or `refresh_token`.
    #[schema(schema_with = grant_type)]
    pub grant_type: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub refresh_token: Option<String>,
}

fn grant_type() -> utoipa::openapi::schema::Object {
    crate::openapi::string_enum(["password", "refresh_token"])
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `bearer`.
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    /// Single use: each refresh returns a new one.
    pub refresh_token: String,
}

impl From<drover_engine::auth::TokenPair> for TokenResponse {
    fn from(p: drover_engine::auth::TokenPair) -> Self {
        TokenResponse {
            access_token: p.access_token,
            token_type: "bearer".into(),
            expires_in: p.expires_in,
            refresh_token: p.refresh_token,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Tenants and users

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TenantView {
    pub id: Uuid,
    pub name: String,
    pub is_system: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl From<d::Tenant> for TenantView {
    fn from(t: d::Tenant) -> Self {
        TenantView { id: t.id.0, name: t.name, is_system: t.is_system, created_at: t.created_at }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenant {
    #[schema(schema_with = crate::openapi::name)]
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub tenant_id: Uuid,
    pub name: String,
    #[schema(schema_with = crate::openapi::role)]
    pub role: d::Role,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl From<d::User> for UserView {
    fn from(u: d::User) -> Self {
        UserView { id: u.id.0, tenant_id: u.tenant_id.0, name: u.name, role: u.role, created_at: u.created_at }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    #[schema(schema_with = crate::openapi::user_name)]
    pub name: String,
    #[schema(schema_with = crate::openapi::password)]
    pub password: String,
    /// `Viewer`, `PlanOperator`, `PlanAuthor` or `Administrator` ("Plan Author" also accepted).
    #[schema(schema_with = crate::openapi::role)]
    pub role: String,
    /// Another tenant: only for administrators of the system tenant.
    pub tenant_id: Option<Uuid>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchUser {
    /// At least 8 characters. Users may change their own; administrators anyone's in their tenant.
    #[schema(schema_with = crate::openapi::password_or_null)]
    pub password: Option<String>,
    #[schema(schema_with = crate::openapi::role_or_null)]
    pub role: Option<String>,
}

/// A new name: for sites and datastores.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchName {
    #[schema(schema_with = crate::openapi::name_or_null)]
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchHost {
    #[schema(schema_with = crate::openapi::name_or_null)]
    pub name: Option<String>,
    #[schema(schema_with = crate::openapi::not_blank_or_null)]
    pub address: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchRecoveryLocation {
    #[schema(schema_with = crate::openapi::name_or_null)]
    pub name: Option<String>,
    pub description: Option<String>,
    pub network_mappings: Option<Vec<NetworkMappingBody>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchReplicationJob {
    #[schema(schema_with = crate::openapi::name_or_null)]
    pub name: Option<String>,
    pub schedule: Option<ScheduleBody>,
    #[schema(minimum = 1, maximum = 10000)]
    pub retention_points: Option<u32>,
    pub enabled: Option<bool>,
    /// Bytes per second the job's transfers may send between agents (at least 65536); 0
    /// removes the limit.
    pub bandwidth_limit: Option<u64>,
    #[schema(schema_with = crate::openapi::consistency_mode_or_null)]
    pub consistency: Option<d::ConsistencyMode>,
    /// Replaces the job's network mapping table (`[]` empties it).
    #[schema(max_items = 64)]
    pub network_mappings: Option<Vec<NetworkMappingBody>>,
}

// ------------------------------------------------------------------------------------------------
// Sites, hosts, datastores

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SiteView {
    pub id: Uuid,
    pub name: String,
    #[schema(schema_with = crate::openapi::site_kind)]
    pub kind: d::SiteKind,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl From<d::Site> for SiteView {
    fn from(s: d::Site) -> Self {
        SiteView { id: s.id.0, name: s.name, kind: s.kind, created_at: s.created_at }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSite {
    #[schema(schema_with = crate::openapi::name)]
    pub name: String,
    #[schema(schema_with = crate::openapi::site_kind)]
    pub kind: d::SiteKind,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    pub id: Uuid,
    pub site_id: Uuid,
    pub name: String,
    pub address: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl From<d::Host> for HostView {
    fn from(h: d::Host) -> Self {
        HostView { id: h.id.0, site_id: h.site_id.0, name: h.name, address: h.address, created_at: h.created_at }
    }
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrolmentRequest {
    /// Seconds the token is good for: 60 to 604800 (a week); default 3600.
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EnrolmentView {
    pub host_id: Uuid,
    /// The one-time token. Shown once: drover keeps only its hash.
    pub token: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
    /// Where the agent enrols.
    pub enrol_url: String,
    /// What to run on the host.
    pub command: String,
}

impl From<drover_engine::app::HostEnrolment> for EnrolmentView {
    fn from(e: drover_engine::app::HostEnrolment) -> Self {
        EnrolmentView {
            host_id: e.host_id.0,
            token: e.token,
            expires_at: e.expires_at,
            enrol_url: e.enrol_url,
            command: e.command,
        }
    }
}

/// A host's agent as the control plane last saw it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    pub state: AgentStateView,
    pub enrolled_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When a call to the agent last succeeded.
    pub last_seen: Option<chrono::DateTime<chrono::Utc>>,
    /// Why the last call failed, while it is the latest.
    pub last_error: Option<String>,
    /// When the agent's certificate stops being valid; the control plane can no longer reach
    /// the agent after that.
    pub certificate_expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The certificate ends within 30 days: enrol the agent again (a new token, then
    /// `drover agent --enroll URL TOKEN --re-enroll` on its host).
    pub certificate_renewal_due: bool,
}

/// `local`: the agent inside drover serve; `not_enrolled`: a `drover agent` that has not enrolled;
/// `enrolled`: not contacted since; `connected`: the last call succeeded; `unreachable`: it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentStateView {
    Local,
    NotEnrolled,
    Enrolled,
    Connected,
    Unreachable,
}

impl From<drover_engine::app::AgentState> for AgentStateView {
    fn from(s: drover_engine::app::AgentState) -> Self {
        use drover_engine::app::AgentState as S;
        match s {
            S::Local => AgentStateView::Local,
            S::NotEnrolled => AgentStateView::NotEnrolled,
            S::Enrolled => AgentStateView::Enrolled,
            S::Connected => AgentStateView::Connected,
            S::Unreachable => AgentStateView::Unreachable,
        }
    }
}

impl From<drover_engine::app::HostAgentState> for AgentView {
    fn from(a: drover_engine::app::HostAgentState) -> Self {
        AgentView {
            state: a.state.into(),
            certificate_renewal_due: a.certificate_renewal_due(),
            enrolled_at: a.status.enrolled_at,
            last_seen: a.status.last_seen,
            last_error: a.status.last_error,
            certificate_expires_at: a.status.certificate_expires_at,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateHost {
    pub site_id: Uuid,
    #[schema(schema_with = crate::openapi::name)]
    pub name: String,
    /// `local` for the agent inside `drover serve`.
    #[schema(schema_with = crate::openapi::not_blank)]
    pub address: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DatastoreView {
    pub id: Uuid,
    pub host_id: Uuid,
    pub name: String,
    pub path: String,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl From<d::Datastore> for DatastoreView {
    fn from(x: d::Datastore) -> Self {
        DatastoreView { id: x.id.0, host_id: x.host_id.0, name: x.name, path: x.path, created_at: x.created_at }
    }
}

/// The tenants a datastore is granted to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DatastoreGrants {
    pub datastore_id: Uuid,
    pub tenant_ids: Vec<Uuid>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantDatastore {
    /// The tenant whose users may then place VMs, replicas and recovery locations on the datastore.
    pub tenant_id: Uuid,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDatastore {
    pub host_id: Uuid,
    #[schema(schema_with = crate::openapi::name)]
    pub name: String,
    /// An absolute directory on the host, inside one of the host's datastore roots (the
    /// `--datastore-root` settings); created, private to the service, when missing.
    #[schema(schema_with = crate::openapi::absolute_path)]
    pub path: String,
}

// ------------------------------------------------------------------------------------------------
// VMs

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskBody {
    #[schema(schema_with = crate::openapi::disk_name)]
    pub name: String,
    /// Size of an empty disk.
    #[serde(default)]
    #[schema(schema_with = crate::openapi::disk_size)]
    pub size_bytes: u64,
    /// An existing image to copy (never moved): an absolute path of a file on the host.
    #[schema(schema_with = crate::openapi::absolute_path_or_null)]
    pub import_from: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicBody {
    #[schema(schema_with = crate::openapi::name)]
    pub network: String,
    /// Derived from the VM id when absent.
    #[schema(schema_with = crate::openapi::mac_or_null)]
    pub mac: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootBody {
    /// A file on the host.
    #[schema(schema_with = crate::openapi::absolute_path_or_null)]
    pub kernel: Option<String>,
    /// A file on the host.
    #[schema(schema_with = crate::openapi::absolute_path_or_null)]
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    /// The firmware a VM that boots from its disk starts with (`uefi`: OVMF).
    #[serde(default)]
    pub firmware: FirmwareBody,
}

/// `bios` (SeaBIOS) or `uefi` (OVMF).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FirmwareBody {
    #[default]
    Bios,
    Uefi,
}

impl From<d::Firmware> for FirmwareBody {
    fn from(f: d::Firmware) -> Self {
        match f {
            d::Firmware::Bios => FirmwareBody::Bios,
            d::Firmware::Uefi => FirmwareBody::Uefi,
        }
    }
}

impl From<FirmwareBody> for d::Firmware {
    fn from(f: FirmwareBody) -> Self {
        match f {
            FirmwareBody::Bios => d::Firmware::Bios,
            FirmwareBody::Uefi => d::Firmware::Uefi,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    #[schema(schema_with = crate::openapi::name)]
    pub name: String,
    pub host_id: Uuid,
    /// On the host `host_id`.
    pub datastore_id: Uuid,
    #[schema(minimum = 1, maximum = 64)]
    pub vcpus: u32,
    #[schema(minimum = 64, maximum = 1048576)]
    pub memory_mib: u32,
    /// Names unique within the VM.
    #[schema(min_items = 1)]
    pub disks: Vec<DiskBody>,
    #[serde(default)]
    pub nics: Vec<NicBody>,
    /// `category:name`.
    #[serde(default)]
    #[schema(schema_with = crate::openapi::tags)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub boot: BootBody,
}

/// A libvirt domain of a host to take into the inventory as a VM, as it is.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportVm {
    pub host_id: Uuid,
    /// The domain's name or UUID (`GET /v1/hosts/{id}/domains` lists them).
    #[schema(min_length = 1, max_length = 256)]
    pub domain: String,
    /// Where drover keeps the VM's work files on the host; default: the host's only datastore.
    #[serde(default)]
    pub datastore_id: Option<Uuid>,
    /// The VM's name in drover; default: the domain's.
    #[serde(default)]
    #[schema(schema_with = crate::openapi::name_or_null)]
    pub name: Option<String>,
    /// `category:name`.
    #[serde(default)]
    #[schema(schema_with = crate::openapi::tags)]
    pub tags: Vec<String>,
}

/// A libvirt domain of a host, as its agent sees it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostDomainView {
    /// An imported domain's VM id.
    pub uuid: Uuid,
    pub name: String,
    pub state: HostDomainStateView,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disks: Vec<HostDomainDiskView>,
    pub nics: Vec<HostDomainNicView>,
    /// Direct kernel boot, when the domain boots so.
    pub kernel: Option<String>,
    /// The machine type, disk buses and NIC models its replica would get.
    pub hardware: HardwareView,
    pub owned_by_drover: bool,
    /// Why drover cannot protect it as it is; empty when it can be imported.
    pub unsupported: Vec<String>,
    /// The VM it is imported as, if it is.
    pub imported_as: Option<Uuid>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostDomainDiskView {
    pub target: String,
    pub format: Option<String>,
    /// The image on the host.
    pub source: Option<String>,
    pub size_bytes: Option<u64>,
}

/// A libvirt domain's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostDomainStateView {
    Running,
    Paused,
    ShutOff,
    /// Shut off because its QEMU died.
    Crashed,
    Other,
}

impl From<drover_agent_api::HostDomainState> for HostDomainStateView {
    fn from(s: drover_agent_api::HostDomainState) -> Self {
        use drover_agent_api::HostDomainState as S;
        match s {
            S::Running => Self::Running,
            S::Paused => Self::Paused,
            S::ShutOff => Self::ShutOff,
            S::Crashed => Self::Crashed,
            S::Other => Self::Other,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HostDomainNicView {
    /// libvirt's interface type (`network`, `bridge`, `user`, `direct`, ...).
    pub interface_type: String,
    pub mac: Option<String>,
    pub source: Option<String>,
}

impl HostDomainView {
    pub fn new(d: drover_agent_api::HostDomain, imported_as: Option<Uuid>) -> Self {
        let h = &d.hardware;
        let hardware = HardwareView {
            machine: h.machine.to_string(),
            disk_buses: (0..d.disks.len()).map(|i| h.disk_bus(i).to_string()).collect(),
            nic_models: (0..d.nics.len()).map(|i| h.nic_model(i).to_string()).collect(),
        };
        HostDomainView {
            hardware,
            uuid: d.uuid,
            name: d.name,
            state: d.state.into(),
            vcpus: d.vcpus,
            memory_mib: d.memory_mib,
            disks: d
                .disks
                .into_iter()
                .map(|x| HostDomainDiskView {
                    target: x.target,
                    format: x.format,
                    source: x.source,
                    size_bytes: x.size_bytes,
                })
                .collect(),
            nics: d
                .nics
                .into_iter()
                .map(|n| HostDomainNicView { interface_type: n.kind, mac: n.mac, source: n.source })
                .collect(),
            kernel: d.kernel,
            owned_by_drover: d.owned_by_drover,
            unsupported: d.unsupported,
            imported_as,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchVm {
    #[schema(schema_with = crate::openapi::name_or_null)]
    pub name: Option<String>,
    /// Only while the VM is off.
    #[schema(minimum = 1, maximum = 64)]
    pub vcpus: Option<u32>,
    /// Only while the VM is off.
    #[schema(minimum = 64, maximum = 1048576)]
    pub memory_mib: Option<u32>,
    #[schema(schema_with = crate::openapi::tags_or_null)]
    pub tags: Option<Vec<String>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    pub id: Uuid,
    pub name: String,
    pub host_id: Uuid,
    pub datastore_id: Uuid,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disks: Vec<DiskBody>,
    pub nics: Vec<NicBody>,
    pub tags: Vec<String>,
    pub boot: BootBody,
    #[schema(schema_with = crate::openapi::vm_power_state)]
    pub power_state: d::VmPowerState,
    /// False until the create session has made the disks.
    pub provisioned: bool,
    /// The libvirt domain this VM is, when it was imported from its host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub libvirt_domain: Option<String>,
    /// Where the guest is: the addresses its guest agent reported when it was last powered on,
    /// while it runs (empty otherwise, or when the guest has no guest agent).
    #[serde(default)]
    pub guest_addresses: Vec<String>,
    /// The virtual hardware its guest was installed on (an imported domain's), which its
    /// replica gets too.
    pub hardware: HardwareView,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// A VM's machine type, disk buses and NIC models.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HardwareView {
    /// `pc` (i440FX) or `q35`.
    pub machine: String,
    /// Per disk, in order: `virtio`, `sata`, `scsi` or `ide`.
    pub disk_buses: Vec<String>,
    /// Per NIC, in order: `virtio`, `e1000`, `e1000e` or `rtl8139`.
    pub nic_models: Vec<String>,
}

impl HardwareView {
    fn of(v: &d::Vm) -> Self {
        fn wire<T: Serialize>(t: &T) -> String {
            serde_json::to_value(t).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
        }
        let h = &v.hardware;
        HardwareView {
            machine: wire(&h.machine),
            disk_buses: (0..v.disks.len()).map(|i| wire(&h.disk_bus(i))).collect(),
            nic_models: (0..v.nics.len()).map(|i| wire(&h.nic_model(i))).collect(),
        }
    }
}

impl From<d::Vm> for VmView {
    fn from(v: d::Vm) -> Self {
        let hardware = HardwareView::of(&v);
        VmView {
            hardware,
            id: v.id.0,
            name: v.name,
            host_id: v.host_id.0,
            datastore_id: v.datastore_id.0,
            vcpus: v.vcpus,
            memory_mib: v.memory_mib,
            disks: v
                .disks
                .into_iter()
                .map(|x| DiskBody { name: x.name, size_bytes: x.size_bytes, import_from: x.import_from })
                .collect(),
            nics: v.nics.into_iter().map(|n| NicBody { network: n.network, mac: Some(n.mac) }).collect(),
            tags: v.tags.iter().map(ToString::to_string).collect(),
            boot: BootBody {
                kernel: v.boot.kernel,
                initrd: v.boot.initrd,
                cmdline: v.boot.cmdline,
                firmware: v.boot.firmware.into(),
            },
            power_state: v.power_state,
            provisioned: v.provisioned,
            libvirt_domain: v.libvirt_domain,
            guest_addresses: if v.power_state == d::VmPowerState::Running { v.guest_addresses } else { Vec::new() },
            created_at: v.created_at,
            updated_at: v.updated_at,
        }
    }
}

pub fn parse_tags(tags: &[String]) -> d::Result<Vec<d::Tag>> {
    tags.iter().map(|t| t.parse()).collect()
}

impl CreateVm {
    pub fn into_new_vm(self) -> d::Result<drover_engine::app::NewVm> {
        Ok(drover_engine::app::NewVm {
            name: self.name,
            host_id: self.host_id.into(),
            datastore_id: self.datastore_id.into(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            disks: self
                .disks
                .into_iter()
                .map(|x| d::VmDisk { name: x.name, size_bytes: x.size_bytes, import_from: x.import_from })
                .collect(),
            nics: self.nics.into_iter().map(|n| (n.network, n.mac)).collect(),
            tags: parse_tags(&self.tags)?,
            boot: d::VmBoot {
                kernel: self.boot.kernel,
                initrd: self.boot.initrd,
                cmdline: self.boot.cmdline,
                firmware: self.boot.firmware.into(),
            },
        })
    }
}

// ------------------------------------------------------------------------------------------------
// Replication jobs and recovery locations

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum ScheduleBody {
    Manual,
    Interval {
        /// At least 10.
        #[schema(minimum = 10)]
        secs: u32,
    },
    Continuous,
}

impl From<ScheduleBody> for d::Schedule {
    fn from(s: ScheduleBody) -> Self {
        match s {
            ScheduleBody::Manual => d::Schedule::Manual,
            ScheduleBody::Interval { secs } => d::Schedule::Interval { secs },
            ScheduleBody::Continuous => d::Schedule::Continuous,
        }
    }
}

impl From<d::Schedule> for ScheduleBody {
    fn from(s: d::Schedule) -> Self {
        match s {
            d::Schedule::Manual => ScheduleBody::Manual,
            d::Schedule::Interval { secs } => ScheduleBody::Interval { secs },
            d::Schedule::Continuous => ScheduleBody::Continuous,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateReplicationJob {
    #[schema(schema_with = crate::openapi::name)]
    pub name: String,
    #[schema(schema_with = crate::openapi::unique_ids)]
    pub vm_ids: Vec<Uuid>,
    pub target_host_id: Uuid,
    /// On the host `target_host_id`.
    pub target_datastore_id: Uuid,
    pub schedule: ScheduleBody,
    #[schema(minimum = 1, maximum = 10000)]
    pub retention_points: u32,
    /// Bytes per second each of the job's transfers may send between agents (at least 65536);
    /// absent or 0: no limit (a source agent's global cap still applies).
    #[serde(default)]
    pub bandwidth_limit: Option<u64>,
    /// Whether each running VM's point is taken with its guest frozen by the QEMU guest agent:
    /// `require` (no point without it: the VM's task fails), `try` (the default: crash-consistent
    /// with a warning when the guest cannot be frozen) or `off`.
    #[serde(default)]
    #[schema(schema_with = crate::openapi::consistency_mode)]
    pub consistency: d::ConsistencyMode,
    /// Source network → network of the target host for the replicas' NICs at failover. A source
    /// network not listed goes to the target host's network of the same name when it has one;
    /// any other NIC is isolated. The target host's networks: `GET /v1/hosts/{id}/networks`.
    #[serde(default)]
    #[schema(max_items = 64)]
    pub network_mappings: Vec<NetworkMappingBody>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReplicationJobView {
    pub id: Uuid,
    pub name: String,
    pub vm_ids: Vec<Uuid>,
    pub target_host_id: Uuid,
    pub target_datastore_id: Uuid,
    pub schedule: ScheduleBody,
    pub retention_points: u32,
    /// Bytes per second; absent: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<u64>,
    /// `require`, `try` or `off`: see the job's creation.
    #[schema(schema_with = crate::openapi::consistency_mode)]
    pub consistency: d::ConsistencyMode,
    /// Source network → network of the target host, for failover.
    #[serde(default)]
    pub network_mappings: Vec<NetworkMappingBody>,
    pub enabled: bool,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl From<d::ReplicationJob> for ReplicationJobView {
    fn from(j: d::ReplicationJob) -> Self {
        ReplicationJobView {
            id: j.id.0,
            name: j.name,
            vm_ids: j.vm_ids.into_iter().map(|v| v.0).collect(),
            target_host_id: j.target_host_id.0,
            target_datastore_id: j.target_datastore_id.0,
            schedule: j.schedule.into(),
            retention_points: j.retention_points,
            bandwidth_limit: j.bandwidth_limit,
            consistency: j.consistency,
            network_mappings: j
                .network_mappings
                .into_iter()
                .map(|m| NetworkMappingBody { from: m.from, to: m.to })
                .collect(),
            enabled: j.enabled,
            created_at: j.created_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReplicaView {
    pub id: Uuid,
    /// `<source VM>_replica`.
    pub name: String,
    pub job_id: Uuid,
    pub source_vm_id: Uuid,
    pub target_datastore_id: Uuid,
    #[schema(schema_with = crate::openapi::replica_state)]
    pub state: d::ReplicaState,
    /// The point a failed-over replica booted from.
    pub failover_point_id: Option<Uuid>,
    /// The VM production runs on since a failback's switchover (the source VM, or the new VM of
    /// a failback to another recovery location), until the failback is committed or undone.
    pub switched_to_vm_id: Option<Uuid>,
    /// The VM this replica protected before a committed failback to another location made the
    /// new VM its source.
    pub replaced_source_vm_id: Option<Uuid>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

impl From<d::Replica> for ReplicaView {
    fn from(r: d::Replica) -> Self {
        ReplicaView {
            id: r.id.0,
            name: r.name,
            job_id: r.job_id.0,
            source_vm_id: r.source_vm_id.0,
            target_datastore_id: r.target_datastore_id.0,
            state: r.state,
            failover_point_id: r.failover_point_id.map(|p| p.0),
            switched_to_vm_id: r.switched_to_vm_id.map(|v| v.0),
            replaced_source_vm_id: r.replaced_source_vm_id.map(|v| v.0),
            created_at: r.created_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RestorePointDiskView {
    pub disk: String,
    pub size_bytes: u64,
    pub manifest_digest: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RestorePointView {
    pub id: Uuid,
    pub replica_id: Uuid,
    pub sequence: u64,
    /// The replication session that made it.
    pub session_id: Uuid,
    /// `Published`, or `Retiring` while retention merges it away.
    #[schema(schema_with = crate::openapi::restore_point_state)]
    pub state: d::RestorePointState,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub bytes_written: u64,
    pub verified: bool,
    /// `application` (cut while the guest agent held the guest's file systems frozen) or
    /// `crash` (cut without the guest's cooperation: it boots as after a power cut).
    #[schema(schema_with = crate::openapi::consistency_kind)]
    pub consistency: d::ConsistencyKind,
    /// Why the point is crash-consistent, or what froze it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency_reason: Option<String>,
    pub disks: Vec<RestorePointDiskView>,
}

impl From<d::RestorePoint> for RestorePointView {
    fn from(p: d::RestorePoint) -> Self {
        RestorePointView {
            id: p.id.0,
            replica_id: p.replica_id.0,
            sequence: p.sequence,
            session_id: p.session_id.0,
            state: p.state,
            created_at: p.created_at,
            bytes_written: p.bytes_written,
            verified: p.verified,
            consistency: p.consistency.kind,
            consistency_reason: p.consistency.reason,
            disks: p
                .disks
                .into_iter()
                .map(|x| RestorePointDiskView {
                    disk: x.disk,
                    size_bytes: x.size_bytes,
                    manifest_digest: x.manifest_digest,
                })
                .collect(),
        }
    }
}

/// A network of a host that VMs may be connected to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HostNetworkView {
    /// The name network mappings use.
    pub name: String,
    /// What it is on the host (`libvirt network default`, `bridge br0`).
    pub target: String,
    /// Whether a NIC can be connected to it now.
    pub available: bool,
    /// Why not, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl From<drover_agent_api::HostNetwork> for HostNetworkView {
    fn from(n: drover_agent_api::HostNetwork) -> Self {
        HostNetworkView { name: n.name, target: n.target, available: n.available, problem: n.problem }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkMappingBody {
    #[schema(schema_with = crate::openapi::name)]
    pub from: String,
    #[schema(schema_with = crate::openapi::name)]
    pub to: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRecoveryLocation {
    /// Not "Original VM Location" (built in: 409).
    #[schema(schema_with = crate::openapi::name)]
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub host_id: Uuid,
    /// On the host `host_id`.
    pub datastore_id: Uuid,
    #[serde(default)]
    pub network_mappings: Vec<NetworkMappingBody>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct RecoveryLocationView {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    /// `Original` (the built-in "Original VM Location") or `Restore`.
    #[schema(schema_with = crate::openapi::recovery_location_kind)]
    pub kind: d::RecoveryLocationKind,
    pub is_original: bool,
    pub host_id: Option<Uuid>,
    pub datastore_id: Option<Uuid>,
    pub network_mappings: Vec<NetworkMappingBody>,
}

impl From<d::RecoveryLocation> for RecoveryLocationView {
    fn from(l: d::RecoveryLocation) -> Self {
        RecoveryLocationView {
            id: l.id.0,
            name: l.name,
            description: l.description,
            kind: l.kind,
            is_original: l.kind == d::RecoveryLocationKind::Original,
            host_id: l.host_id.map(|h| h.0),
            datastore_id: l.datastore_id.map(|x| x.0),
            network_mappings: l
                .network_mappings
                .into_iter()
                .map(|m| NetworkMappingBody { from: m.from, to: m.to })
                .collect(),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Plans

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum StepKindBody {
    PowerOn,
    WaitHeartbeat {
        #[schema(maximum = 86400)]
        timeout_secs: u32,
    },
    CheckTcpPort {
        #[schema(minimum = 1)]
        port: u16,
        #[schema(maximum = 86400)]
        timeout_secs: u32,
    },
    RunScript {
        #[schema(schema_with = crate::openapi::not_blank)]
        path: String,
        #[serde(default)]
        args: Vec<String>,
        #[schema(maximum = 86400)]
        timeout_secs: u32,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanStepBody {
    /// Assigned when absent.
    pub id: Option<Uuid>,
    #[schema(schema_with = crate::openapi::name)]
    pub name: String,
    pub kind: StepKindBody,
    #[serde(default = "yes")]
    pub critical: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanVmBody {
    pub vm_id: Uuid,
    /// When absent: power on, then wait for the heartbeat (120 s).
    pub steps: Option<Vec<PlanStepBody>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanGroupBody {
    /// Assigned when absent.
    pub id: Option<Uuid>,
    #[schema(schema_with = crate::openapi::name)]
    pub name: String,
    /// VMs of the group started at once; 1 (the default) or 0 means one after another.
    #[serde(default = "one")]
    #[schema(maximum = 256)]
    pub max_parallel: u32,
    #[serde(default)]
    #[schema(maximum = 86400)]
    pub delay_secs: u32,
    #[serde(default)]
    pub critical: bool,
    #[serde(default)]
    pub restore_tags: bool,
    /// Each VM once in the whole plan.
    pub vms: Vec<PlanVmBody>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanBody {
    #[schema(schema_with = crate::openapi::name)]
    pub name: String,
    /// At most 4096 bytes (UTF-8).
    #[serde(default)]
    #[schema(max_length = 4096)]
    pub description: String,
    /// Defaults to the Original VM Location.
    pub recovery_location_id: Option<Uuid>,
    #[serde(default)]
    pub groups: Vec<PlanGroupBody>,
}

impl PlanBody {
    pub fn into_input(self) -> drover_engine::app::PlanInput {
        drover_engine::app::PlanInput {
            name: self.name,
            description: self.description,
            recovery_location_id: self.recovery_location_id.map(Into::into).unwrap_or(d::RecoveryLocationId::ORIGINAL),
            groups: self.groups.into_iter().map(group_from_body).collect(),
        }
    }
}

fn group_from_body(g: PlanGroupBody) -> d::PlanGroup {
    d::PlanGroup {
        id: g.id.map(Into::into).unwrap_or_default(),
        name: g.name,
        mode: if g.max_parallel <= 1 {
            d::GroupMode::Sequential
        } else {
            d::GroupMode::Parallel { max: g.max_parallel }
        },
        delay_secs: g.delay_secs,
        critical: g.critical,
        restore_tags: g.restore_tags,
        vms: g
            .vms
            .into_iter()
            .map(|v| d::PlanVm {
                vm_id: v.vm_id.into(),
                steps: match v.steps {
                    Some(steps) => steps.into_iter().map(step_from_body).collect(),
                    None => default_steps(),
                },
            })
            .collect(),
    }
}

fn default_steps() -> Vec<d::PlanStep> {
    vec![
        d::PlanStep {
            id: d::PlanStepId::new(),
            name: "Power on".into(),
            kind: d::PlanStepKind::PowerOn,
            critical: true,
        },
        d::PlanStep {
            id: d::PlanStepId::new(),
            name: "Wait for heartbeat".into(),
            kind: d::PlanStepKind::WaitHeartbeat { timeout_secs: 120 },
            critical: true,
        },
    ]
}

fn step_from_body(s: PlanStepBody) -> d::PlanStep {
    d::PlanStep {
        id: s.id.map(Into::into).unwrap_or_default(),
        name: s.name,
        kind: match s.kind {
            StepKindBody::PowerOn => d::PlanStepKind::PowerOn,
            StepKindBody::WaitHeartbeat { timeout_secs } => d::PlanStepKind::WaitHeartbeat { timeout_secs },
            StepKindBody::CheckTcpPort { port, timeout_secs } => d::PlanStepKind::CheckTcpPort { port, timeout_secs },
            StepKindBody::RunScript { path, args, timeout_secs } => {
                d::PlanStepKind::RunScript { path, args, timeout_secs }
            }
        },
        critical: s.critical,
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PlanView {
    pub id: Uuid,
    pub name: String,
    pub description: String,
    pub enabled: bool,
    #[schema(schema_with = crate::openapi::plan_mode)]
    pub mode: d::PlanMode,
    /// API identifier of the state, e.g. `Failover`, `FailbackInProgress`.
    #[schema(schema_with = crate::openapi::plan_state)]
    pub state: d::PlanState,
    /// The UI name, e.g. `FAILOVER`.
    pub state_name: String,
    #[schema(schema_with = crate::openapi::plan_state)]
    pub last_stable_state: d::PlanState,
    /// What was running when the plan halted.
    #[schema(schema_with = crate::openapi::plan_state_or_null)]
    pub interrupted_state: Option<d::PlanState>,
    pub recovery_location_id: Uuid,
    pub groups: Vec<PlanGroupBody>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl From<d::Plan> for PlanView {
    fn from(p: d::Plan) -> Self {
        let mode = p.mode();
        PlanView {
            id: p.id.0,
            name: p.name,
            description: p.description,
            enabled: p.enabled,
            mode,
            state: p.lifecycle.state,
            state_name: p.lifecycle.state.display_name().into(),
            last_stable_state: p.lifecycle.last_stable,
            interrupted_state: p.lifecycle.interrupted,
            recovery_location_id: p.recovery_location_id.0,
            groups: p
                .groups
                .into_iter()
                .map(|g| PlanGroupBody {
                    id: Some(g.id.0),
                    name: g.name,
                    max_parallel: match g.mode {
                        d::GroupMode::Sequential => 1,
                        d::GroupMode::Parallel { max } => max,
                    },
                    delay_secs: g.delay_secs,
                    critical: g.critical,
                    restore_tags: g.restore_tags,
                    vms: g
                        .vms
                        .into_iter()
                        .map(|v| PlanVmBody {
                            vm_id: v.vm_id.0,
                            steps: Some(
                                v.steps
                                    .into_iter()
                                    .map(|s| PlanStepBody {
                                        id: Some(s.id.0),
                                        name: s.name,
                                        kind: match s.kind {
                                            d::PlanStepKind::PowerOn => StepKindBody::PowerOn,
                                            d::PlanStepKind::WaitHeartbeat { timeout_secs } => {
                                                StepKindBody::WaitHeartbeat { timeout_secs }
                                            }
                                            d::PlanStepKind::CheckTcpPort { port, timeout_secs } => {
                                                StepKindBody::CheckTcpPort { port, timeout_secs }
                                            }
                                            d::PlanStepKind::RunScript { path, args, timeout_secs } => {
                                                StepKindBody::RunScript { path, args, timeout_secs }
                                            }
                                        },
                                        critical: s.critical,
                                    })
                                    .collect(),
                            ),
                        })
                        .collect(),
                })
                .collect(),
            created_at: p.created_at,
            updated_at: p.updated_at,
        }
    }
}

/// The answer to a plan action: the plan as it is once the action was accepted, and the session
/// the action started or acted on (absent for enable, disable and reset, which run no session).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PlanActionView {
    #[serde(flatten)]
    pub plan: PlanView,
    pub session_id: Option<Uuid>,
}

/// The `{action}` of `POST /v1/plans/{id}/{action}`: a schema only, for the document (the handler
/// matches the path segment; any other is a 404).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PlanActionName {
    Enable,
    Disable,
    ReadinessCheck,
    Failover,
    TestFailover,
    PermanentFailover,
    PrepareFailback,
    Failback,
    Switchover,
    CommitFailback,
    Undo,
    Halt,
    Continue,
    Reset,
}

/// The optional body of a plan action.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanActionBody {
    /// For `continue`: as in `ContinueBody`.
    #[schema(schema_with = crate::openapi::continue_option_or_null)]
    pub option: Option<drover_engine::saga::ContinueOption>,
    /// For `failover`: the newest restore point at or before this time (default: the newest).
    pub restore_point_date: Option<chrono::DateTime<chrono::Utc>>,
    /// For `failback` and `prepare-failback`: the recovery location (default: the plan's).
    pub recovery_location_id: Option<Uuid>,
    /// For `failback` to another location: give the new VMs the original VMs' tags.
    #[serde(default)]
    pub restore_tags: bool,
    /// For `failover`: a planned failover. Production (which must be reachable) is shut down,
    /// its last changes are replicated, then the plan fails over to that point: nothing written
    /// before the command is lost. Takes no `restore_point_date`.
    #[serde(default)]
    pub planned: bool,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContinueBody {
    /// Default `RetryFailedStep`.
    #[schema(schema_with = crate::openapi::continue_option_or_null)]
    pub option: Option<drover_engine::saga::ContinueOption>,
}

// ------------------------------------------------------------------------------------------------
// Sessions

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TaskView {
    pub id: Uuid,
    pub vm_id: Option<Uuid>,
    pub name: String,
    #[schema(schema_with = crate::openapi::session_state)]
    pub state: d::SessionState,
    #[schema(schema_with = crate::openapi::session_result)]
    pub result: d::SessionResult,
    pub progress: u8,
    pub failure_message: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub ended_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl From<d::Task> for TaskView {
    fn from(t: d::Task) -> Self {
        TaskView {
            id: t.id.0,
            vm_id: t.vm_id.map(|v| v.0),
            name: t.name,
            state: t.state,
            result: t.result,
            progress: t.progress,
            failure_message: t.failure_message,
            created_at: t.created_at,
            ended_at: t.ended_at,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    pub id: Uuid,
    #[schema(schema_with = crate::openapi::session_kind)]
    pub kind: d::SessionKind,
    pub name: String,
    #[schema(schema_with = target_kind)]
    pub target_kind: String,
    pub target_id: Uuid,
    #[schema(schema_with = crate::openapi::session_state)]
    pub state: d::SessionState,
    /// `None` while running, then `Success`, `Warning` or `Failed`.
    #[schema(schema_with = crate::openapi::session_result)]
    pub result: d::SessionResult,
    pub progress: u8,
    /// Halted and waiting for continue or undo.
    pub halted: bool,
    pub failure_message: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub ended_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Present on `GET /v1/sessions/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tasks: Option<Vec<TaskView>>,
}

fn target_kind() -> utoipa::openapi::schema::Object {
    crate::openapi::string_enum(["vm", "plan", "replication_job"])
}

impl From<d::Session> for SessionView {
    fn from(s: d::Session) -> Self {
        let (target_kind, target_id) = match s.target {
            d::SessionTarget::Vm(v) => ("vm", v.0),
            d::SessionTarget::Plan(p) => ("plan", p.0),
            d::SessionTarget::ReplicationJob(j) => ("replication_job", j.0),
        };
        SessionView {
            id: s.id.0,
            kind: s.kind,
            name: s.name,
            target_kind: target_kind.into(),
            target_id,
            state: s.state,
            result: s.result,
            progress: s.progress,
            halted: s.halted,
            failure_message: s.failure_message,
            created_at: s.created_at,
            ended_at: s.ended_at,
            tasks: None,
        }
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LogEntryView {
    pub seq: i64,
    pub task_id: Option<Uuid>,
    pub at: chrono::DateTime<chrono::Utc>,
    #[schema(schema_with = crate::openapi::log_level)]
    pub level: d::LogLevel,
    pub message: String,
}

impl From<d::LogEntry> for LogEntryView {
    fn from(e: d::LogEntry) -> Self {
        LogEntryView { seq: e.seq, task_id: e.task_id.map(|t| t.0), at: e.at, level: e.level, message: e.message }
    }
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SessionQuery {
    /// Session kind (any case).
    #[param(schema_with = crate::openapi::session_kind)]
    pub kind: Option<String>,
    #[param(schema_with = crate::openapi::session_state)]
    pub state: Option<String>,
    #[param(schema_with = crate::openapi::session_result)]
    pub result: Option<String>,
    /// Only sessions of this VM, plan or job.
    pub target_id: Option<Uuid>,
    /// Only sessions created at or after this time.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// `newest` (default) or `oldest` first.
    #[param(schema_with = order)]
    pub order: Option<String>,
    #[serde(default)]
    pub offset: u64,
    /// Default 100.
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u64>,
}

fn order() -> utoipa::openapi::schema::Object {
    crate::openapi::string_enum(["newest", "oldest"])
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    /// Entries after this sequence number (default 0: from the start).
    #[serde(default)]
    pub after: i64,
    /// Default 1000.
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<u64>,
}

/// Which audit entries to read, newest first.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only entries older than this position (paging backwards: the `seq` of the last entry seen).
    pub before_seq: Option<i64>,
    /// Only this action, e.g. `login`, `login_lockout`, `POST /v1/vms`.
    pub action: Option<String>,
    /// At most this many (1 to 1000, default 100).
    pub limit: Option<u64>,
}

/// One audit entry: who did what, when, from where.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AuditView {
    /// Its position in the log (newer entries have larger ones).
    pub seq: i64,
    pub at: chrono::DateTime<chrono::Utc>,
    pub tenant_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    /// The user name given (for a failed login, what was tried).
    pub user_name: String,
    /// `login`, `login_lockout`, or a request such as `POST /v1/vms`.
    pub action: String,
    /// `Success`, `Refused` (4xx, wrong password) or `Failed` (5xx).
    pub outcome: String,
    /// The client's address; empty for in-process callers.
    pub address: Option<String>,
    pub detail: String,
}

impl From<d::AuditEntry> for AuditView {
    fn from(e: d::AuditEntry) -> Self {
        let r = e.record;
        AuditView {
            seq: e.seq,
            at: r.at,
            tenant_id: r.tenant_id.map(|t| t.0),
            user_id: r.user_id.map(|u| u.0),
            user_name: r.user_name,
            action: r.action,
            outcome: format!("{:?}", r.outcome),
            address: r.address,
            detail: r.detail,
        }
    }
}
