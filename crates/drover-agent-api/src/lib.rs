//! The host agent's contract: what the control plane asks of the agent that owns a host's disks.
//!
//! One agent per hypervisor host owns its datastores, its VMs' disks and the restore-point chains
//! stored there. The control plane never touches a host file: it names things by reference
//! ([`DiskRef`]: datastore, VM, disk; [`ChainRef`]: datastore, replica, disk) and the agent turns
//! references into paths. Point files come back as opaque [`PointFile`] handles the control plane
//! stores and hands back, never builds.
//!
//! Every call is an *ensure* keyed by an id the caller chooses (the session and step), so a saga
//! step run twice re-attaches to what the first run started instead of starting over:
//! [`HostAgent::cut_begin`] with the same [`CutSpec::id`] resumes the same cut,
//! [`HostAgent::transfer_ensure`] with the same [`TransferSpec::id`] returns the running or
//! finished transfer. Errors carry their class as data ([`ErrorKind`]) so a caller across a
//! network still knows "try again" from "conflict" from "gone".
//!
//! Implementations: `drover_agent::LocalAgent` (in-process, over the hypervisor driver and
//! drover-block: what `drover serve` uses for its own host; over the simulated hypervisor it is
//! the simulated agent of the fast tests). The remote client over HTTPS comes with `drover agent`.
//!
//! VM control ([`HostAgent::vm_power_on`] and the rest) names disks by reference too: a VM's
//! own images ([`VmDisk::Image`]) or the boot overlays the agent made over restore points
//! ([`HostAgent::boot_overlay_ensure`]). Files a VM imports or boots from (a disk image, a
//! kernel) are names the *agent* checks against its own import directories.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The version of this contract. An agent and a control plane with different versions refuse
/// each other at the first call.
pub const API_VERSION: u32 = 2;

/// The longest id a caller may choose (cut and transfer ids).
pub const MAX_ID_LEN: usize = 128;

/// What kind of failure an agent call met: what the caller should do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Transient (a daemon slow to start, a lock held for a moment, a cut link): try again.
    Retry,
    /// The request conflicts with the state of the host (an image in use, a bitmap busy).
    Conflict,
    /// What the request names does not exist on the host (anymore).
    Gone,
    /// The request is malformed (a bad id, an unknown datastore reference).
    Invalid,
    /// The host cannot do this at all (e.g. live change tracking on the simulated hypervisor).
    Unsupported,
    /// Anything else; the message says what.
    Internal,
    /// A resource is held by another process for a while (a disk image a replication cut or a
    /// retention merge has open): wait and try again. Unlike `Retry`, the agent answered.
    Busy,
}

/// An agent's error: its class and a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        AgentError { kind, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }
    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Gone, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    /// The same error with `context: ` in front of its message.
    pub fn context(self, context: impl fmt::Display) -> Self {
        AgentError { kind: self.kind, message: format!("{context}: {}", self.message) }
    }
}

pub type AgentResult<T> = Result<T, AgentError>;

/// Checks a caller-chosen id: 1 to [`MAX_ID_LEN`] characters of `[A-Za-z0-9._:-]`, not starting
/// with a dot (an agent may name files and directories after it).
pub fn check_id(what: &str, id: &str) -> AgentResult<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('.')
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(AgentError::invalid(format!(
            "{what} id {id:?} must be 1 to {MAX_ID_LEN} characters of letters, digits, '.', '_', ':' and '-', not starting with '.'"
        )))
    }
}

/// Checks a disk name taken from the inventory before an agent names a file after it.
pub fn check_disk_name(name: &str) -> AgentResult<()> {
    check_id("disk", name)
        .map_err(|_| AgentError::invalid(format!("disk name {name:?} must be letters, digits, '.', '_', ':' and '-'")))
}

/// Who the agent is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub api_version: u32,
    /// The hypervisor it drives: `qemu` or `simulated`.
    pub hypervisor: String,
    /// Whether the hypervisor tracks changes of running VMs' disks.
    pub live_change_tracking: bool,
}

/// A datastore as the control plane registered it with the agent. Its path was checked against
/// the host's datastore roots when the system administrator created it; nothing else names a
/// host path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreSpec {
    pub id: Uuid,
    pub path: String,
}

/// A VM's disk on a host: the agent finds its image in the datastore.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DiskRef {
    pub datastore: Uuid,
    pub vm: Uuid,
    pub disk: String,
    /// Its place in the VM's disks (the live tracking of a running VM addresses disks so).
    pub index: usize,
}

/// The restore-point chain of one disk of a replica.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChainRef {
    pub datastore: Uuid,
    pub replica: Uuid,
    pub disk: String,
}

/// A point file of a chain, as the agent that made it named it. Opaque to the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PointFile(pub String);

/// How a disk's changes are found and moved in a replication run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferMode {
    /// No point yet: the allocated data of the disk.
    #[serde(rename = "seed")]
    Seed,
    /// The extents the cut's dirty bitmap marks.
    #[serde(rename = "bitmap")]
    Bitmap,
    /// No bitmap can be trusted: blocks whose hashes differ.
    #[serde(rename = "hash-compare")]
    HashCompare,
}

impl TransferMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TransferMode::Seed => "seed",
            TransferMode::Bitmap => "bitmap",
            TransferMode::HashCompare => "hash-compare",
        }
    }
}

impl fmt::Display for TransferMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One dirty bitmap of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapInfo {
    pub name: String,
    /// Stored in the image.
    pub persistent: bool,
    /// Guest writes are being recorded.
    pub recording: bool,
    /// Left in use by a hypervisor that stopped uncleanly: its content cannot be trusted.
    pub inconsistent: bool,
}

/// A disk as its host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Virtual size in bytes.
    pub size: u64,
    pub bitmaps: Vec<BitmapInfo>,
}

/// A point in time of a disk to cut: its dirty bitmap `current` is frozen and exported with the
/// disk's content as of now, and `next` records from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CutSpec {
    /// The caller's id (session and step); the same id resumes the same cut.
    pub id: String,
    pub disk: DiskRef,
    /// The VM runs: cut through the hypervisor. Otherwise the image is cut with nobody writing it.
    pub live: bool,
    pub current: String,
    pub next: String,
    /// Bitmaps to remove before the cut (inconsistent ones, or ones that cannot be told apart).
    pub remove: Vec<String>,
    /// `current` does not exist yet: create it before the cut.
    pub fresh: bool,
    /// Cut this boot overlay (of a replica's VM that is stopped) instead of the disk's own
    /// image: a failback's last delta. Offline cuts only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PointFile>,
    /// The host whose agent will pull this cut over the data path: the data listener serves the
    /// cut to that agent only (the host named in its certificate), so an agent of another host,
    /// or of a host the control plane has since deleted, cannot read it even if it learnt the
    /// cut's id and instance. Absent: the cut is read on this host only, never served to another
    /// agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reader: Option<Uuid>,
}

/// Where a transfer reads a cut from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceEndpoint {
    /// An NBD export on the same host as the reader, with the cut's bitmap as a meta context.
    LocalNbd { socket: String, export: String, meta_context: String },
    /// A cut on another agent, read over the agent-to-agent data path: the reader dials the
    /// source agent's data listener (mutual TLS in the product) and pulls the cut.
    Peer {
        /// `host:port` of the source agent's data listener.
        address: String,
        /// The TLS name the source agent's certificate carries (`drover_pki::agent_dns_name`).
        server_name: String,
        /// The cut's id on the source.
        cut: String,
        /// The cut's instance, chosen by the source when it made the cut: a source restarted and
        /// cut again under the same id has another, so a transfer is never spliced across them.
        instance: Uuid,
    },
}

/// A cut as the agent made it: plain data the caller keeps (in its step log) and hands back to
/// end the cut, across restarts of either side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cut {
    pub id: String,
    /// The disk's size in bytes.
    pub size: u64,
    pub source: SourceEndpoint,
    /// The agent's own record of the cut; the caller does not read it.
    pub token: serde_json::Value,
}

/// A new point file in a chain, over the chain's newest point (`prev`) or empty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointSpec {
    pub chain: ChainRef,
    pub size: u64,
    pub prev: Option<PointFile>,
}

/// Moves a cut's changes into a point file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferSpec {
    /// The caller's id (session and step); the same id re-attaches to the same transfer.
    pub id: String,
    pub source: SourceEndpoint,
    /// The source disk, when it may be read from its files directly (a powered-off disk whose
    /// cut holds it still) and the reader is on its host.
    pub source_files: Option<DiskRef>,
    pub mode: TransferMode,
    /// The point file to write, made by [`HostAgent::point_create`]; or, for a failback, the
    /// image of a VM's disk in a datastore of the agent (with `prev` `None` and mode
    /// hash-compare: what it holds is hashed, and only the blocks that differ are written).
    pub target: PointFile,
    /// For a failback into a VM's own disk: the disk, which the agent finds (an imported libvirt
    /// domain's disk is where its definition says, outside any datastore; its manifest is kept
    /// in the VM's datastore). When given, `target` is not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_disk: Option<DiskRef>,
    /// The point `target` is over, whose manifest says what the target holds.
    pub prev: Option<PointFile>,
    pub size: u64,
    /// The most this transfer may send between agents, in bytes per second; `None` for no limit
    /// of its own (a source agent's global cap still applies). Carried in the pull to the source
    /// agent, which paces what it writes to the connection; a source read on the agent's own
    /// host crosses no link and is not paced. 0 is refused as invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_limit: Option<u64>,
}

/// Where a transfer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferState {
    Running,
    Done,
    Failed,
}

/// What a finished transfer did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferOutcome {
    /// The BLAKE3 digest of the point's manifest (written beside the point file).
    pub manifest_digest: String,
    pub bytes_read: u64,
    /// Bytes written to the target: what travels between sites.
    pub bytes_written: u64,
    /// How the data was read, when it is worth saying (e.g. "source read from its files").
    pub note: Option<String>,
    /// What crossed the link, when the source was another agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<PeerTransferStats>,
}

/// What a transfer from another agent sent over the link, over all its connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerTransferStats {
    /// Bytes read off the connections (TLS records and framing included).
    pub wire_bytes_in: u64,
    /// Bytes written to the connections (pulls, hashes, acknowledgements).
    pub wire_bytes_out: u64,
    /// Bytes that arrived as data (before compression; `wire_bytes_in` is what they took).
    pub data_bytes: u64,
    /// Bytes that arrived as zero ranges (no payload).
    pub zero_bytes: u64,
    /// Bytes the source did not send because the journal already held them (resumed streams).
    pub resumed_bytes: u64,
    /// Extents of the journal a resumed stream started from, summed over streams.
    pub resumed_extents: u64,
    /// Bytes that arrived more than once (sent again after a cut link or a killed agent).
    pub received_twice: u64,
    /// Connections after the first.
    pub reconnects: u32,
    /// Streams the transfer was pulled over.
    #[serde(default)]
    pub streams: u32,
    /// The most bytes (data and zero ranges) one stream carried: near `(data_bytes +
    /// zero_bytes) / streams` when the streams' ranges were split by where the bytes are.
    #[serde(default)]
    pub largest_stream_bytes: u64,
    /// Milliseconds the receiving streams spent writing into the point file, summed over the
    /// streams: with `flush_ms`, where a transfer's time goes at the receiving end (the rest is
    /// waiting for the source, or work on the received bytes).
    #[serde(default)]
    pub write_ms: u64,
    /// Milliseconds the receiving streams spent making the point file durable (flushes), summed
    /// over the streams.
    #[serde(default)]
    pub flush_ms: u64,
}

/// A transfer's state and progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStatus {
    pub id: String,
    /// The point file it writes.
    pub target: PointFile,
    pub state: TransferState,
    /// Bytes of the work done so far, out of `bytes_total` (extents to copy or blocks to compare).
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub outcome: Option<TransferOutcome>,
    pub error: Option<AgentError>,
}

// --- VMs -------------------------------------------------------------------------------------

/// The longest VM name, boot command line or marker an agent accepts.
pub const MAX_TEXT_LEN: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    /// No process (never started, shut down, or powered off).
    Off,
    Running,
    Paused,
    /// The process is gone but drover did not stop it (crash, OOM, killed from outside).
    Died,
}

/// What the guest reports over its channel.
// No `Eq`: `uptime_secs` is an `f64`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Seconds since the guest booted, as the guest counts them.
    pub uptime_secs: f64,
    /// Content of the marker file on the data disk, when there is one.
    pub marker: Option<String>,
    /// The guest's IP addresses (neither loopback nor link-local), as the QEMU guest agent
    /// reports them; empty when the guest did not say.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
}

/// A freeze of a guest's file systems, asked for by the caller that will cut its disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeSpec {
    /// The caller's id (session and step); asking again with the same id while the freeze holds
    /// answers what the first ask did.
    pub id: String,
    /// The longest the guest stays frozen, in milliseconds from when it is frozen: then the agent
    /// thaws it itself, whether or not the caller ever asks (its watchdog), so a caller that
    /// dies or loses the agent never leaves a guest frozen. At most [`MAX_FREEZE_MS`].
    pub max_ms: u64,
}

/// The longest freeze a caller may ask for. Writes in the guest wait while it holds.
pub const MAX_FREEZE_MS: u64 = 10 * 60 * 1000;

/// Whether the guest's file systems were frozen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FreezeOutcome {
    pub frozen: bool,
    /// How many file systems the guest agent froze.
    pub filesystems: u64,
    /// Why the guest was not frozen (no guest agent answers, it cannot freeze, the freeze
    /// failed), or what froze it.
    pub reason: String,
}

/// What a thaw found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ThawOutcome {
    /// The freeze asked for with this id held until this thaw: everything cut since the freeze
    /// answered `frozen` was cut while the guest was frozen. False when the watchdog thawed it
    /// first, the agent restarted meanwhile, or it was never frozen.
    pub held: bool,
    /// Why it did not hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a guest's TCP port did when the host connected to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcpPortState {
    /// The guest accepted the connection.
    Open,
    /// The guest refused it: nothing listens on the port.
    Closed,
    /// The guest did not answer at all: not booted yet, no address, or its packets are dropped.
    NoAnswer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShutdownOutcome {
    /// The guest shut itself down when asked (ACPI power button).
    Graceful,
    /// The guest did not stop within the timeout and was powered off.
    ForcedOff,
    /// It was not running.
    AlreadyOff,
}

/// A disk to make for a VM in a datastore of the agent: empty, or a copy of an image file the
/// agent's administrator put in one of its import directories.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDisk {
    pub name: String,
    /// Virtual size in bytes (an import keeps the image's own).
    pub size: u64,
    /// A qcow2 image on the agent's host, inside one of its import directories.
    pub import_from: Option<String>,
}

/// The disks of one VM in one datastore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDisksSpec {
    pub datastore: Uuid,
    pub vm: Uuid,
    pub disks: Vec<NewDisk>,
}

/// A disk a VM runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VmDisk {
    /// The VM's own image in a datastore.
    Image(DiskRef),
    /// A boot overlay over a restore point ([`HostAgent::boot_overlay_ensure`]).
    Overlay { file: PointFile },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNic {
    /// The host network ([`HostNetwork::name`]) to connect it to.
    pub network: String,
    pub mac: String,
    /// Not connected, whatever networks the host has: test VMs, and a replica's NIC that maps
    /// to no network of its host.
    pub no_uplink: bool,
}

/// Direct kernel boot, or from the first disk. The kernel and initrd are files on the agent's
/// host, inside one of its import directories.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmBoot {
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    #[serde(default, skip_serializing_if = "Firmware::is_bios")]
    pub firmware: Firmware,
}

/// The firmware a VM starts with: BIOS (SeaBIOS) or UEFI (OVMF).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    #[default]
    Bios,
    Uefi,
}

impl Firmware {
    pub fn is_bios(&self) -> bool {
        *self == Firmware::Bios
    }
}

/// The virtual hardware a guest was installed on, which its replica gets too: a guest without
/// virtio drivers (Windows as installed, an old Linux) boots only from the disk bus and talks
/// only through the NIC model it knows. The default is what drover's own VMs get.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hardware {
    #[serde(default)]
    pub machine: Machine,
    /// Per disk, in the VM's disk order; a disk past the end is on virtio.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_buses: Vec<DiskBus>,
    /// Per NIC, in order; a NIC past the end is virtio.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nic_models: Vec<NicModel>,
}

impl Hardware {
    pub fn is_default(&self) -> bool {
        *self == Hardware::default()
    }
    /// The bus of disk `i`.
    pub fn disk_bus(&self, i: usize) -> DiskBus {
        self.disk_buses.get(i).copied().unwrap_or_default()
    }
    /// The model of NIC `i`.
    pub fn nic_model(&self, i: usize) -> NicModel {
        self.nic_models.get(i).copied().unwrap_or_default()
    }
    /// Checks the combination QEMU can build: q35 has no IDE bus.
    pub fn check(&self, disks: usize, nics: usize) -> Result<(), String> {
        if self.disk_buses.len() > disks || self.nic_models.len() > nics {
            return Err("more disk buses or NIC models than disks or NICs".into());
        }
        if self.machine == Machine::Q35 && self.disk_buses.contains(&DiskBus::Ide) {
            return Err("a q35 machine has no IDE bus".into());
        }
        if self.disk_buses.iter().filter(|b| **b == DiskBus::Ide).count() > 4 {
            return Err("the IDE channels take at most 4 disks".into());
        }
        if self.disk_buses.iter().filter(|b| **b == DiskBus::Sata).count() > 6 {
            return Err("an AHCI controller takes at most 6 SATA disks".into());
        }
        Ok(())
    }
}

/// The machine type: QEMU's `pc` (i440FX) or `q35` (ICH9, PCIe), each the newest version the
/// host's QEMU has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    #[default]
    Pc,
    Q35,
}

/// The bus a disk is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    #[default]
    Virtio,
    Sata,
    Scsi,
    Ide,
}

/// A NIC's model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    #[default]
    Virtio,
    E1000,
    E1000e,
    Rtl8139,
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Machine::Pc => "pc",
            Machine::Q35 => "q35",
        })
    }
}

impl std::fmt::Display for DiskBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Sata => "sata",
            DiskBus::Scsi => "scsi",
            DiskBus::Ide => "ide",
        })
    }
}

impl std::fmt::Display for NicModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NicModel::Virtio => "virtio",
            NicModel::E1000 => "e1000",
            NicModel::E1000e => "e1000e",
            NicModel::Rtl8139 => "rtl8139",
        })
    }
}

/// A VM to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRunSpec {
    /// The VM's id on the host (a VM's, a replica's or a test VM's).
    pub id: Uuid,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disks: Vec<VmDisk>,
    pub nics: Vec<VmNic>,
    pub boot: VmBoot,
    #[serde(default, skip_serializing_if = "Hardware::is_default")]
    pub hardware: Hardware,
}

impl VmRunSpec {
    /// Checks what an agent would otherwise pass on to its hypervisor.
    pub fn check(&self) -> AgentResult<()> {
        if self.name.is_empty() || self.name.len() > 255 || self.name.chars().any(char::is_control) {
            return Err(AgentError::invalid("a VM name must be 1 to 255 printable characters"));
        }
        if self.disks.len() > 64 || self.nics.len() > 64 {
            return Err(AgentError::invalid("a VM has at most 64 disks and 64 NICs"));
        }
        self.hardware.check(self.disks.len(), self.nics.len()).map_err(AgentError::invalid)?;
        if self.boot.cmdline.as_ref().is_some_and(|c| c.len() > MAX_TEXT_LEN) {
            return Err(AgentError::invalid(format!("a boot command line is at most {MAX_TEXT_LEN} bytes")));
        }
        for d in &self.disks {
            if let VmDisk::Image(r) = d {
                check_disk_name(&r.disk)?;
            }
        }
        Ok(())
    }
}

/// A network of the agent's host that VMs may be connected to: declared by the host's
/// administrator (`drover agent --network NAME=TARGET`), never named by a request. Replicas are
/// connected to these by name (a replication job's network mapping, or the source network's own
/// name); anything else gets an isolated NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostNetwork {
    /// The name the inventory and network mappings use.
    pub name: String,
    /// What it is on the host: `libvirt network default`, `bridge br0`.
    pub target: String,
    /// Whether a NIC can be connected to it now (the libvirt network active, the bridge there).
    pub available: bool,
    /// Why not, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// A libvirt domain of the agent's host, as discovery shows it to an administrator choosing what
/// to import (only an agent on the libvirt driver has domains).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDomain {
    /// The domain's UUID: an imported domain's VM id.
    pub uuid: Uuid,
    pub name: String,
    pub state: HostDomainState,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// In drover's disk order (the domain's `<disk device='disk'>` elements).
    pub disks: Vec<HostDomainDisk>,
    pub nics: Vec<HostDomainNic>,
    /// Direct kernel boot, when the domain boots so (else it boots from its disk).
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    /// UEFI when its definition names EFI firmware (`<os firmware='efi'>` or an OVMF loader).
    #[serde(default)]
    pub firmware: Firmware,
    /// Its machine type, disk buses and NIC models, as its replica gets them.
    #[serde(default, skip_serializing_if = "Hardware::is_default")]
    pub hardware: Hardware,
    /// Defined by drover (a replica run as a domain): not for import.
    pub owned_by_drover: bool,
    /// Why drover cannot protect the domain as it is; empty when it can.
    pub unsupported: Vec<String>,
}

/// A libvirt domain's state as drover reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostDomainState {
    Running,
    Paused,
    ShutOff,
    /// Shut off because its QEMU died (killed, crashed).
    Crashed,
    /// Shutting down, being started, suspended.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDomainDisk {
    /// The guest's name for it (`vda`): an imported VM's disk name.
    pub target: String,
    pub format: Option<String>,
    /// The image on the host (shown to the administrator; never taken from a request).
    pub source: Option<String>,
    pub size_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDomainNic {
    /// `network`, `bridge`, `user`...
    pub kind: String,
    pub mac: Option<String>,
    /// The libvirt network or bridge.
    pub source: Option<String>,
    pub model: Option<String>,
}

/// A VM the agent runs or keeps state for, with its power state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPresence {
    pub vm: Uuid,
    pub power: PowerState,
}

/// The bodies of the agent's HTTP routes that are not one of the types above.
pub mod wire {
    use super::*;

    /// The request header that carries [`API_VERSION`]; an agent refuses a request without it
    /// or with another version.
    pub const VERSION_HEADER: &str = "drover-agent-api";

    /// The largest request body an agent reads.
    pub const MAX_BODY: usize = 1 << 20;

    /// `POST /v1/vms/{vm}/thaw`.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ThawRequest {
        pub id: String,
    }

    /// The agent's answer to `POST /v1/identity/renewal`: the CSR of its next key.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct RenewalCsr {
        pub csr_pem: String,
    }

    /// `PUT /v1/identity/certificate`: the certificate the control plane signed for that CSR.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct InstallCertificate {
        pub certificate_pem: String,
    }

    /// The agent's answer once it presents the new certificate.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CertificateInstalled {
        pub not_after: chrono::DateTime<chrono::Utc>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct DiskInfoRequest {
        pub disk: DiskRef,
        pub live: bool,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct CutEndRequest {
        pub spec: CutSpec,
        pub cut: Option<Cut>,
        pub success: bool,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CollectGarbageRequest {
        pub chain: ChainRef,
        pub keep: Vec<PointFile>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct RetireOldestRequest {
        pub chain: ChainRef,
        pub oldest: PointFile,
        pub next: PointFile,
        pub after: Option<PointFile>,
    }

    /// A wait's length on the wire, in milliseconds.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    pub struct WaitRequest {
        pub timeout_ms: u64,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MarkerRequest {
        pub marker: String,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    pub struct TcpPortRequest {
        pub port: u16,
        pub timeout_ms: u64,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct BootOverlayRequest {
        pub chain: ChainRef,
        pub point: PointFile,
        pub label: String,
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ForgetRequest {
        pub discard_overlays: bool,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct DisksRemoveRequest {
        pub datastore: Uuid,
        pub vm: Uuid,
    }

    /// The longest wait one call may ask for (a heartbeat, a shutdown, a port check).
    pub const MAX_WAIT_MS: u64 = 3600 * 1000;

    /// The HTTP status an error of this kind is answered with (the body is the [`AgentError`]).
    pub fn status_of(kind: ErrorKind) -> u16 {
        match kind {
            ErrorKind::Invalid => 400,
            ErrorKind::Gone => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Internal => 500,
            ErrorKind::Unsupported => 501,
            ErrorKind::Retry => 503,
            ErrorKind::Busy => 423,
        }
    }
}

/// The host agent. Every method is idempotent (see the crate documentation).
#[async_trait]
pub trait HostAgent: Send + Sync + fmt::Debug {
    fn info(&self) -> AgentInfo;

    /// Registers a datastore (idempotent; a changed path replaces the old one).
    async fn datastore_ensure(&self, spec: &DatastoreSpec) -> AgentResult<()>;

    // --- change tracking -------------------------------------------------------------------

    /// The disk's size and dirty bitmaps; `live` reads them from the running VM.
    async fn disk_info(&self, disk: &DiskRef, live: bool) -> AgentResult<DiskInfo>;

    /// Cuts a point in time of a disk and exports it for a transfer. Re-running with the same
    /// id resumes the same cut.
    async fn cut_begin(&self, spec: &CutSpec) -> AgentResult<Cut>;

    /// Ends a cut: `success` drops its frozen bitmap (its changes arrived), otherwise they are
    /// folded into `next` so the next run still has them. `cut` is what [`cut_begin`] returned,
    /// when the caller has it (a step that failed may not). Idempotent.
    ///
    /// [`cut_begin`]: HostAgent::cut_begin
    async fn cut_end(&self, spec: &CutSpec, cut: Option<&Cut>, success: bool) -> AgentResult<()>;

    // --- the disk store --------------------------------------------------------------------

    /// Creates a new, empty point file in a chain.
    async fn point_create(&self, spec: &PointSpec) -> AgentResult<PointFile>;

    /// Removes from a chain every file that none of `keep` uses (interrupted attempts, retired
    /// points). Returns what it removed.
    async fn chain_collect_garbage(&self, chain: &ChainRef, keep: &[PointFile]) -> AgentResult<Vec<String>>;

    /// Merges the chain's oldest point into the next one (retention). Returns the file that now
    /// holds the next point's content.
    async fn chain_retire_oldest(
        &self,
        chain: &ChainRef,
        oldest: &PointFile,
        next: &PointFile,
        after: Option<&PointFile>,
    ) -> AgentResult<PointFile>;

    // --- transfers -------------------------------------------------------------------------

    /// Starts the transfer, or returns the one with this id (running, done, or failed: a failed
    /// one is started again).
    async fn transfer_ensure(&self, spec: &TransferSpec) -> AgentResult<TransferStatus>;

    /// The transfer's state and progress; `Gone` when the agent has no such transfer.
    async fn transfer_status(&self, id: &str) -> AgentResult<TransferStatus>;

    /// Forgets a finished transfer, or stops a running one. Idempotent.
    async fn transfer_forget(&self, id: &str) -> AgentResult<()>;

    // --- VMs ---------------------------------------------------------------------------------

    /// Makes the VM's disks in a datastore (empty or imported) when they are not there yet; a
    /// disk that is there is kept as it is. Each appears whole or not at all.
    async fn vm_disks_ensure(&self, spec: &VmDisksSpec) -> AgentResult<()>;

    /// Removes a VM's disks from a datastore. Idempotent.
    async fn vm_disks_remove(&self, datastore: Uuid, vm: Uuid) -> AgentResult<()>;

    /// Starts the VM; a running one is left as it is. A disk held by another process for a
    /// while is `Busy`.
    async fn vm_power_on(&self, spec: &VmRunSpec) -> AgentResult<()>;

    /// Asks the guest to shut down, waits up to `timeout`, then powers it off.
    async fn vm_shutdown(&self, vm: Uuid, timeout: std::time::Duration) -> AgentResult<ShutdownOutcome>;

    /// Stops the VM at once. Idempotent.
    async fn vm_power_off(&self, vm: Uuid) -> AgentResult<()>;

    /// The VM's power state; `Off` for a VM the agent does not know.
    async fn vm_status(&self, vm: Uuid) -> AgentResult<PowerState>;

    /// Waits until the guest answers on its channel.
    async fn vm_wait_heartbeat(&self, vm: Uuid, timeout: std::time::Duration) -> AgentResult<Heartbeat>;

    /// Writes the marker file on the guest's data disk and syncs it.
    async fn vm_write_marker(&self, vm: Uuid, marker: &str) -> AgentResult<()>;

    /// Checks from the host whether the guest accepts TCP connections on `port`.
    async fn vm_check_tcp_port(&self, vm: Uuid, port: u16, timeout: std::time::Duration) -> AgentResult<TcpPortState>;

    /// Powers the VM off and forgets what the agent keeps for it; with `discard_overlays`, the
    /// boot overlays it ran on are removed too (a replica's or test VM's changes thrown away).
    /// Idempotent.
    async fn vm_forget(&self, vm: Uuid, discard_overlays: bool) -> AgentResult<()>;

    /// Every VM the agent runs or keeps state for (after a restart of either side).
    async fn vm_list(&self) -> AgentResult<Vec<VmPresence>>;

    /// The host's libvirt domains, for import (`Unsupported` from an agent whose hypervisor has
    /// none).
    async fn domains(&self) -> AgentResult<Vec<HostDomain>>;

    /// The networks this host's administrator lets VMs be connected to (`--network`), each
    /// with whether it is there now. A replica's NIC is connected only to one of these.
    async fn networks(&self) -> AgentResult<Vec<HostNetwork>>;

    /// Freezes the guest's file systems through its guest agent, for at most `spec.max_ms`
    /// (then the agent thaws them itself). A guest that cannot be frozen is an outcome with
    /// `frozen: false` and the reason, not an error. See [`FreezeSpec`].
    async fn vm_freeze(&self, vm: Uuid, spec: &FreezeSpec) -> AgentResult<FreezeOutcome>;

    /// Thaws what [`vm_freeze`](HostAgent::vm_freeze) with this id froze, and says whether the
    /// freeze held until now. Idempotent: thawing a thawed guest holds nothing and fails nothing.
    async fn vm_thaw(&self, vm: Uuid, id: &str) -> AgentResult<ThawOutcome>;

    /// The boot overlays a VM was last started on, in the order of its disks (empty when it
    /// ran on none, or the agent has no record of it).
    async fn vm_boot_overlays(&self, vm: Uuid) -> AgentResult<Vec<PointFile>>;

    /// A boot overlay over a restore point of a chain, named by `label` (the same label gives
    /// the same overlay, with what a VM wrote on it).
    async fn boot_overlay_ensure(&self, chain: &ChainRef, point: &PointFile, label: &str) -> AgentResult<PointFile>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_safe_names() {
        for ok in ["r1234abcd-0-d0", "a", "s:1.step_2-x", &"x".repeat(MAX_ID_LEN)] {
            assert!(check_id("cut", ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "../x", "a b", "é", "a\0b", &"x".repeat(MAX_ID_LEN + 1)] {
            let e = check_id("cut", bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Invalid, "{bad:?}");
        }
    }

    #[test]
    fn wire_shapes() {
        assert_eq!(serde_json::to_value(TransferMode::HashCompare).unwrap(), "hash-compare");
        assert_eq!(serde_json::from_value::<TransferMode>("seed".into()).unwrap(), TransferMode::Seed);
        let e = AgentError::new(ErrorKind::Retry, "daemon slow").context("disk sda");
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"kind": "retry", "message": "disk sda: daemon slow"})
        );
        let s = SourceEndpoint::LocalNbd { socket: "/s".into(), export: "e".into(), meta_context: "m".into() };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::json!({"kind": "local_nbd", "socket": "/s", "export": "e", "meta_context": "m"})
        );
        assert_eq!(serde_json::to_value(PointFile("f".into())).unwrap(), "f");
        let p = SourceEndpoint::Peer {
            address: "10.0.0.1:7420".into(),
            server_name: "x.host.drover.internal".into(),
            cut: "c1".into(),
            instance: Uuid::nil(),
        };
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            serde_json::json!({"kind": "peer", "address": "10.0.0.1:7420", "server_name": "x.host.drover.internal",
                "cut": "c1", "instance": "00000000-0000-0000-0000-000000000000"})
        );
        // An outcome without peer statistics reads as before.
        let o: TransferOutcome = serde_json::from_value(serde_json::json!(
            {"manifest_digest": "d", "bytes_read": 1, "bytes_written": 2, "note": null}
        ))
        .unwrap();
        assert_eq!(o.peer, None);
        // A transfer without a bandwidth limit is written and read as before the limit existed.
        let old = serde_json::json!({
            "id": "t", "source": {"kind": "local_nbd", "socket": "/s", "export": "e", "meta_context": "m"},
            "source_files": null, "mode": "seed", "target": "/p", "prev": null, "size": 1
        });
        let mut t: TransferSpec = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(t.bandwidth_limit, None);
        assert_eq!(serde_json::to_value(&t).unwrap(), old);
        t.bandwidth_limit = Some(4 << 20);
        assert_eq!(serde_json::to_value(&t).unwrap()["bandwidth_limit"], 4 << 20);
    }
}
