//! Inventory: tenants, users, sites, hosts, datastores, VMs and recovery locations.
//!
//! Every inventory object belongs to one tenant; a user sees nothing of another tenant's objects.

use serde::{Deserialize, Serialize};

use crate::{DatastoreId, Error, HostId, RecoveryLocationId, Result, SiteId, TenantId, Timestamp, UserId, VmId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    /// The tenant created on first start. Its administrators may create other tenants.
    pub is_system: bool,
    pub created_at: Timestamp,
}

/// Roles in increasing power. Each includes what the ones before it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Role {
    /// Reads everything of its tenant.
    Viewer,
    /// Runs, halts, continues and undoes plans; powers VMs on and off.
    PlanOperator,
    /// Creates and edits plans, VMs, sites and the rest of the inventory.
    PlanAuthor,
    /// Manages users, clients and (in the system tenant) tenants.
    Administrator,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::PlanOperator, Role::PlanAuthor, Role::Administrator];

    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "Viewer",
            Role::PlanOperator => "PlanOperator",
            Role::PlanAuthor => "PlanAuthor",
            Role::Administrator => "Administrator",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        // Accept the spaced forms the Veeam products show ("Plan Author").
        let folded: String = s.chars().filter(|c| !c.is_whitespace()).collect::<String>().to_ascii_lowercase();
        Role::ALL.into_iter().find(|r| r.as_str().to_ascii_lowercase() == folded).ok_or_else(|| {
            Error::invalid(format!(
                "unknown role {s:?}: expected one of Viewer, PlanOperator, PlanAuthor, Administrator"
            ))
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    pub id: UserId,
    pub tenant_id: TenantId,
    pub name: String,
    pub role: Role,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SiteKind {
    Production,
    DisasterRecovery,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Site {
    pub id: SiteId,
    pub tenant_id: TenantId,
    pub name: String,
    pub kind: SiteKind,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub id: HostId,
    pub tenant_id: TenantId,
    pub site_id: SiteId,
    pub name: String,
    /// Where its agent listens; `local` for the agent that runs inside `drover serve`.
    pub address: String,
    pub created_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Datastore {
    pub id: DatastoreId,
    pub tenant_id: TenantId,
    pub host_id: HostId,
    pub name: String,
    /// A directory on the host that holds disk images.
    pub path: String,
    pub created_at: Timestamp,
}

/// A VM tag, written `category:name`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Tag {
    pub category: String,
    pub name: String,
}

impl std::str::FromStr for Tag {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once(':') {
            Some((c, n)) if !c.trim().is_empty() && !n.trim().is_empty() => {
                Ok(Tag { category: c.trim().to_string(), name: n.trim().to_string() })
            }
            _ => Err(Error::invalid(format!("tag {s:?} must be written category:name"))),
        }
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.category, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisk {
    /// Unique within the VM; also the image's file name (`<name>.qcow2`).
    pub name: String,
    pub size_bytes: u64,
    /// Import this existing image instead of creating an empty one. Copied, never moved.
    pub import_from: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNic {
    pub network: String,
    pub mac: String,
}

/// How the VM boots: a kernel and initramfs given directly (the tiny guest), or from its first disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmBoot {
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    /// The firmware a VM that boots from its disk starts with.
    #[serde(default)]
    pub firmware: Firmware,
}

/// BIOS (SeaBIOS) or UEFI (OVMF, from Debian's `ovmf` package).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

/// VM power lifecycle as drover sees it.
///
/// ```text
///   Off ──power_on──▶ Starting ──up──▶ Running ──shutdown──▶ Stopping ──down──▶ Off
///    ▲                  │                 │  └────────died────▶ Died ──power_on──▶ Starting
///    └────── failed ────┘                 └──power_off──▶ Stopping
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmPowerState {
    Off,
    Starting,
    Running,
    Stopping,
    /// The process went away without drover stopping it.
    Died,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmPowerEvent {
    PowerOnRequested,
    CameUp,
    StartFailed,
    StopRequested,
    WentDown,
    DiedUnexpectedly,
}

impl VmPowerState {
    pub fn apply(self, event: VmPowerEvent) -> Result<VmPowerState> {
        use VmPowerEvent as E;
        use VmPowerState as S;
        let next = match (self, event) {
            (S::Off | S::Died, E::PowerOnRequested) => S::Starting,
            (S::Starting, E::CameUp) => S::Running,
            (S::Starting, E::StartFailed) => S::Off,
            (S::Running | S::Starting, E::StopRequested) => S::Stopping,
            (S::Stopping, E::WentDown) => S::Off,
            // Idempotent re-delivery after a crash: the step ran, its event is replayed.
            (S::Running, E::CameUp) => S::Running,
            (S::Off, E::WentDown) => S::Off,
            (S::Running | S::Starting | S::Stopping, E::DiedUnexpectedly) => S::Died,
            (s, e) => {
                return Err(Error::conflict(format!("a VM that is {s:?} cannot take {e:?}")));
            }
        };
        Ok(next)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vm {
    pub id: VmId,
    pub tenant_id: TenantId,
    pub name: String,
    pub host_id: HostId,
    pub datastore_id: DatastoreId,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disks: Vec<VmDisk>,
    pub nics: Vec<VmNic>,
    pub tags: Vec<Tag>,
    pub boot: VmBoot,
    pub power_state: VmPowerState,
    /// Set once the VM's disks exist; a VM whose create session failed is never provisioned.
    pub provisioned: bool,
    /// The libvirt domain this VM is, when it was imported from its host's libvirt (its id is
    /// the domain's UUID, its disks are the domain's): drover starts, stops and replicates it
    /// but never redefines it or removes its disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libvirt_domain: Option<String>,
    /// The guest's addresses as its guest agent reported them in the heartbeat of its last
    /// power-on (neither loopback nor link-local; at most 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guest_addresses: Vec<String>,
    /// The machine type, disk buses and NIC models its guest was installed on (an imported
    /// domain's); its replica gets the same.
    #[serde(default, skip_serializing_if = "VmHardware::is_default")]
    pub hardware: VmHardware,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A VM's virtual hardware: the machine type, and per disk and per NIC (in their order; past
/// the end: virtio) the bus and model. The default is what drover's own VMs get.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHardware {
    #[serde(default)]
    pub machine: MachineType,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_buses: Vec<DiskBus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nic_models: Vec<NicModel>,
}

impl VmHardware {
    pub fn is_default(&self) -> bool {
        *self == VmHardware::default()
    }
    pub fn disk_bus(&self, i: usize) -> DiskBus {
        self.disk_buses.get(i).copied().unwrap_or_default()
    }
    pub fn nic_model(&self, i: usize) -> NicModel {
        self.nic_models.get(i).copied().unwrap_or_default()
    }
}

/// QEMU's `pc` (i440FX) or `q35` machine type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    #[default]
    Pc,
    Q35,
}

/// The bus a VM's disk is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    #[default]
    Virtio,
    Sata,
    Scsi,
    Ide,
}

/// A VM's NIC model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    #[default]
    Virtio,
    E1000,
    E1000e,
    Rtl8139,
}

pub const VM_MAX_VCPUS: u32 = 64;
pub const VM_MIN_MEMORY_MIB: u32 = 64;
pub const VM_MAX_MEMORY_MIB: u32 = 1024 * 1024;
pub const DISK_MAX_BYTES: u64 = 64 << 40;

/// Checks a name used for any inventory object: what a user sees and what file names may hold.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    if name.trim().is_empty() {
        return Err(Error::invalid(format!("{what} name must not be empty")));
    }
    if name.chars().count() > 128 {
        return Err(Error::invalid(format!("{what} name is longer than 128 characters")));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::invalid(format!("{what} name contains control characters")));
    }
    Ok(())
}

impl Vm {
    /// Checks everything that can be checked without the store. Called on create and update.
    pub fn validate(&self) -> Result<()> {
        validate_name("VM", &self.name)?;
        if self.vcpus == 0 || self.vcpus > VM_MAX_VCPUS {
            return Err(Error::invalid(format!("vcpus must be between 1 and {VM_MAX_VCPUS}, got {}", self.vcpus)));
        }
        if !(VM_MIN_MEMORY_MIB..=VM_MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(Error::invalid(format!(
                "memory_mib must be between {VM_MIN_MEMORY_MIB} and {VM_MAX_MEMORY_MIB}, got {}",
                self.memory_mib
            )));
        }
        if self.disks.is_empty() {
            return Err(Error::invalid("a VM needs at least one disk"));
        }
        let mut seen = std::collections::HashSet::new();
        for d in &self.disks {
            let file_safe = !d.name.is_empty()
                && d.name.len() <= 64
                && d.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !file_safe {
                return Err(Error::invalid(format!(
                    "disk name {:?} must be 1-64 characters of letters, digits, '-' or '_'",
                    d.name
                )));
            }
            if !seen.insert(d.name.as_str()) {
                return Err(Error::invalid(format!("disk name {:?} is used twice", d.name)));
            }
            if d.import_from.is_none() && (d.size_bytes == 0 || d.size_bytes > DISK_MAX_BYTES) {
                return Err(Error::invalid(format!(
                    "disk {:?} size_bytes must be between 1 and {DISK_MAX_BYTES}",
                    d.name
                )));
            }
        }
        for n in &self.nics {
            validate_name("network", &n.network)?;
            validate_mac(&n.mac)?;
        }
        Ok(())
    }
}

pub fn validate_mac(mac: &str) -> Result<()> {
    let parts: Vec<&str> = mac.split(':').collect();
    let ok = parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok());
    if ok { Ok(()) } else { Err(Error::invalid(format!("{mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))) }
}

/// A locally administered unicast MAC derived from the VM id, so it is stable across restarts.
pub fn mac_for(vm: VmId, index: usize) -> String {
    let b = vm.0.as_bytes();
    format!("52:54:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], (b[3] as usize).wrapping_add(index) as u8)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecoveryLocationKind {
    /// The built-in "Original VM Location": failback syncs back into the original VMs.
    Original,
    /// Another place: failback makes full copies there as new VMs.
    Restore,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkMapping {
    pub from: String,
    pub to: String,
}

/// The most rules a network mapping table holds.
pub const MAX_NETWORK_MAPPINGS: usize = 64;

/// Checks a network mapping table: valid names, each source network once, at most
/// [`MAX_NETWORK_MAPPINGS`] rules.
pub fn validate_network_mappings(mappings: &[NetworkMapping]) -> Result<()> {
    if mappings.len() > MAX_NETWORK_MAPPINGS {
        return Err(Error::invalid(format!("at most {MAX_NETWORK_MAPPINGS} network mappings, got {}", mappings.len())));
    }
    let mut seen = std::collections::BTreeSet::new();
    for m in mappings {
        validate_name("network", &m.from)?;
        validate_name("network", &m.to)?;
        if !seen.insert(m.from.as_str()) {
            return Err(Error::invalid(format!("network {:?} is mapped twice", m.from)));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryLocation {
    pub id: RecoveryLocationId,
    pub tenant_id: TenantId,
    pub name: String,
    pub description: String,
    pub kind: RecoveryLocationKind,
    pub host_id: Option<HostId>,
    pub datastore_id: Option<DatastoreId>,
    pub network_mappings: Vec<NetworkMapping>,
    pub created_at: Timestamp,
}

impl RecoveryLocation {
    pub const ORIGINAL_NAME: &'static str = "Original VM Location";

    /// The built-in location as every tenant sees it.
    pub fn original(tenant_id: TenantId) -> RecoveryLocation {
        RecoveryLocation {
            id: RecoveryLocationId::ORIGINAL,
            tenant_id,
            name: Self::ORIGINAL_NAME.to_string(),
            description: "Failback into the original production VMs".to_string(),
            kind: RecoveryLocationKind::Original,
            host_id: None,
            datastore_id: None,
            network_mappings: Vec::new(),
            created_at: chrono::DateTime::UNIX_EPOCH,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_power_state() -> impl Strategy<Value = VmPowerState> {
        prop_oneof![
            Just(VmPowerState::Off),
            Just(VmPowerState::Starting),
            Just(VmPowerState::Running),
            Just(VmPowerState::Stopping),
            Just(VmPowerState::Died),
        ]
    }
    fn any_power_event() -> impl Strategy<Value = VmPowerEvent> {
        prop_oneof![
            Just(VmPowerEvent::PowerOnRequested),
            Just(VmPowerEvent::CameUp),
            Just(VmPowerEvent::StartFailed),
            Just(VmPowerEvent::StopRequested),
            Just(VmPowerEvent::WentDown),
            Just(VmPowerEvent::DiedUnexpectedly),
        ]
    }

    proptest! {
        #[test]
        fn power_on_is_only_accepted_when_nothing_runs(s in any_power_state()) {
            let r = s.apply(VmPowerEvent::PowerOnRequested);
            prop_assert_eq!(r.is_ok(), matches!(s, VmPowerState::Off | VmPowerState::Died));
        }

        #[test]
        fn every_walk_stays_in_legal_states(events in proptest::collection::vec(any_power_event(), 0..40)) {
            let mut s = VmPowerState::Off;
            for e in events {
                if let Ok(next) = s.apply(e) {
                    // A VM never becomes Running without having been Starting or Running.
                    if next == VmPowerState::Running {
                        prop_assert!(matches!(s, VmPowerState::Starting | VmPowerState::Running));
                    }
                    s = next;
                }
            }
        }
    }

    #[test]
    fn roles_are_ordered_and_parse_spaced_names() {
        assert!(Role::Administrator.allows(Role::PlanAuthor));
        assert!(!Role::Viewer.allows(Role::PlanOperator));
        assert_eq!("Plan Author".parse::<Role>().unwrap(), Role::PlanAuthor);
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn tags_and_macs_validate() {
        assert_eq!("env:prod".parse::<Tag>().unwrap().to_string(), "env:prod");
        assert!("noseparator".parse::<Tag>().is_err());
        assert!(validate_mac("52:54:00:12:34:56").is_ok());
        assert!(validate_mac("52:54:00:12:34").is_err());
        assert!(validate_mac(&mac_for(VmId::new(), 3)).is_ok());
    }
}
