//! The hypervisor driver: the one seam between drover and the thing that runs VMs.
//!
//! The engine drives VMs only through [`Hypervisor`]. There are two implementations:
//! - [`qemu::QemuDriver`] — the product path. Each VM is a `qemu-system-x86_64` process that outlives
//!   drover, controlled over QMP on a unix socket; the guest talks back over a virtio-serial channel.
//! - [`sim::SimulatedHypervisor`] — **a simulation for fast tests**. It keeps VMs in memory and
//!   never starts a process. The product never falls back to it: `drover serve` builds it only when
//!   asked with `--hypervisor simulated`, and it reports `kind() == "simulated"` everywhere.
//!
//! Every method is idempotent, because the session engine may run a saga step twice after a crash:
//! powering on a running VM returns the running VM, powering off a stopped VM succeeds, deleting a
//! deleted VM succeeds.

use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub mod libvirt;
pub mod qemu;
pub mod sim;
pub mod tracking;
pub mod usernet;

/// What the driver needs to know to run one VM. Built by the engine from the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub id: Uuid,
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// In boot order; the first disk is the guest's data disk for the tiny guest.
    pub disks: Vec<DiskSpec>,
    pub nics: Vec<NicSpec>,
    pub boot: BootSpec,
    /// The machine type, disk buses and NIC models (a replica's are its source's).
    #[serde(default)]
    pub hardware: Hardware,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Absolute path of a qcow2 image.
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// The network name from the inventory. Without a configured bridge the NIC has no uplink.
    pub network: String,
    pub mac: String,
    /// Never connects the NIC to its network, whatever networks the driver has: the guest keeps
    /// its NIC (and MAC) and reaches nothing. Test VMs always get this, so a failover drill
    /// cannot reach production's network, and a replica's NIC that maps to no network of its
    /// host.
    #[serde(default)]
    pub no_uplink: bool,
}

/// Direct kernel boot (what the tiny guest uses) or boot from the first disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSpec {
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    #[serde(default)]
    pub firmware: Firmware,
}

// The plain vocabulary of VM control is the agent contract's: the driver speaks it as it is.
pub use drover_agent_api::{
    DiskBus, Firmware, FreezeOutcome, Hardware, Heartbeat, Machine, NicModel, PowerState, ShutdownOutcome, TcpPortState,
};

#[derive(Debug, thiserror::Error)]
pub enum HvError {
    #[error("VM {0} is not known to the driver")]
    UnknownVm(Uuid),
    #[error("VM {0} is not running")]
    NotRunning(Uuid),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("QMP command {command} failed: {class}: {desc}")]
    Qmp { command: String, class: String, desc: String },
    #[error("QMP protocol: {0}")]
    QmpProtocol(String),
    #[error("guest channel: {0}")]
    GuestChannel(String),
    #[error("{program} failed: {stderr}")]
    Tool { program: String, stderr: String },
    /// Another process holds a disk image's write lock (e.g. a replication cut of the powered-off
    /// VM has it open in a storage daemon); it is usually released soon.
    #[error("a disk image is in use by another process: {0}")]
    ImageLocked(String),
    #[error("invalid VM specification: {0}")]
    InvalidSpec(String),
    /// The driver cannot do this at all (e.g. live change tracking in the simulated hypervisor).
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A dirty bitmap is missing or cannot be trusted (QEMU did not close the image cleanly):
    /// the disk must fall back to hash-compare. See [`tracking`].
    #[error("dirty bitmap {bitmap:?} {reason}")]
    BitmapUnusable { bitmap: String, reason: String },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl HvError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        HvError::Io { context: context.into(), source }
    }
}

/// A tool's error keeps its class as the driver's.
impl From<drover_qemu::ToolError> for HvError {
    fn from(e: drover_qemu::ToolError) -> Self {
        use drover_qemu::ToolError as T;
        match e {
            T::Timeout(after, what) => HvError::Timeout(after, what),
            T::Qmp { command, class, desc } => HvError::Qmp { command, class, desc },
            T::QmpProtocol(m) => HvError::QmpProtocol(m),
            e @ (T::GuestAgent { .. } | T::GuestAgentProtocol(_)) => HvError::GuestChannel(e.to_string()),
            T::Tool { program, stderr } => HvError::Tool { program, stderr },
            T::InvalidArgument(m) => HvError::InvalidSpec(m),
            T::Io { context, source } => HvError::Io { context, source },
        }
    }
}

pub type HvResult<T> = Result<T, HvError>;

#[async_trait]
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// `"qemu"` or `"simulated"`; shown in `drover serve`'s start-up line and in the API.
    fn kind(&self) -> &'static str;

    /// Starts the VM. Idempotent: a running VM is left as it is.
    async fn power_on(&self, spec: &VmSpec) -> HvResult<()>;

    /// Asks the guest to shut down (ACPI), waits up to `timeout`, then powers off.
    async fn shutdown(&self, vm: Uuid, timeout: Duration) -> HvResult<ShutdownOutcome>;

    /// Stops the VM at once. Idempotent.
    async fn power_off(&self, vm: Uuid) -> HvResult<()>;

    async fn status(&self, vm: Uuid) -> HvResult<PowerState>;

    /// Waits until the guest answers on its channel.
    async fn wait_heartbeat(&self, vm: Uuid, timeout: Duration) -> HvResult<Heartbeat>;

    /// Writes the marker file on the guest's data disk and syncs it.
    async fn write_marker(&self, vm: Uuid, marker: &str) -> HvResult<()>;

    /// Checks from the host whether the guest accepts TCP connections on `guest_port`, retrying
    /// until it does or `timeout` passes: `Open` as soon as it is, otherwise what the last attempt
    /// saw. The QEMU driver checks through a NIC on a network without a bridge (user-mode
    /// networking, see [`usernet`]); a VM without one is an error.
    async fn check_tcp_port(&self, vm: Uuid, guest_port: u16, timeout: Duration) -> HvResult<TcpPortState>;

    /// Freezes the guest's file systems through the QEMU guest agent (`guest-fsfreeze-freeze`,
    /// which runs the guest's fsfreeze hooks first, so applications flush). A guest that cannot
    /// be frozen (no guest agent answers, freezing is disabled, the freeze failed and was
    /// undone) is `frozen: false` with the reason. The driver does not thaw by itself: the
    /// caller (the agent, with its watchdog) does, with [`Hypervisor::guest_thaw`].
    async fn guest_freeze(&self, vm: Uuid) -> HvResult<FreezeOutcome> {
        let _ = vm;
        Ok(FreezeOutcome {
            frozen: false,
            filesystems: 0,
            reason: format!("the {} hypervisor has no guest agent", self.kind()),
        })
    }

    /// The host-side unix socket of the VM's QEMU guest agent port, when the driver has one: a
    /// watchdog outside the agent's process thaws through it (see `drover_agent`'s freezes).
    fn guest_agent_socket(&self, vm: Uuid) -> Option<PathBuf> {
        let _ = vm;
        None
    }

    /// Thaws the guest's file systems; returns how many were thawed (0 when none were frozen).
    async fn guest_thaw(&self, vm: Uuid) -> HvResult<u64> {
        let _ = vm;
        Ok(0)
    }

    /// Removes what the driver keeps for the VM (runtime directory). Powers it off first.
    /// Idempotent. Disk images are the engine's to delete, through [`drover_qemu::image`].
    async fn forget(&self, vm: Uuid) -> HvResult<()>;

    /// The driver's change tracking, when it has one (see [`ChangeTracking`]). `None` for the
    /// simulated hypervisor: replication then copies whole disks or compares hashes.
    fn change_tracking(&self) -> Option<&dyn ChangeTracking> {
        None
    }

    /// The disk files a VM was last started with (from the driver's runtime record), in the
    /// order of its spec; empty when the driver keeps no such record or never started it.
    async fn runtime_disks(&self, _vm: Uuid) -> HvResult<Vec<PathBuf>> {
        Ok(Vec::new())
    }

    /// The host's libvirt domains, for import. Only the libvirt driver has any.
    async fn domains(&self) -> HvResult<Vec<drover_agent_api::HostDomain>> {
        Err(HvError::Unsupported(format!(
            "the {} hypervisor runs drover's own VMs; only an agent on the libvirt driver (--hypervisor libvirt) has \
             domains to import",
            self.kind()
        )))
    }

    /// The networks VMs may be connected to on this host (the administrator's `--network`
    /// declarations), each with whether it is there now. None by default: every NIC isolated.
    async fn networks(&self) -> HvResult<Vec<drover_agent_api::HostNetwork>> {
        Ok(Vec::new())
    }

    /// Where disk `index` of VM `vm` lives when the hypervisor, not a drover datastore, holds it
    /// (an imported libvirt domain's disk); `None` for drover's own VMs.
    async fn disk_location(&self, _vm: Uuid, _index: usize) -> HvResult<Option<PathBuf>> {
        Ok(None)
    }

    /// Finds VMs that outlived a restart of drover and re-attaches to them.
    /// Returns every VM the driver has state for, with its power state.
    async fn reattach(&self) -> HvResult<Vec<(Uuid, PowerState)>>;
}

/// Change tracking of VM disks: persistent dirty bitmaps and point-in-time exports of a disk over
/// NBD, as a capability of the hypervisor rather than of one driver (a libvirt driver does it with
/// checkpoints and pull-mode backups). Live methods work through the running VM; the `_offline`
/// ones on an image nobody has open. Every method is idempotent, and what a cut returns is plain
/// data the caller may persist to end the cut after a restart. The semantics, the crash safety and
/// the names are those of [`tracking`], which the QEMU driver implements this with.
#[async_trait]
pub trait ChangeTracking: Send + Sync + std::fmt::Debug {
    /// Starts recording the changes of disk `disk` of a running VM into the persistent `bitmap`.
    async fn enable(&self, vm: Uuid, disk: usize, bitmap: &str) -> HvResult<()>;
    /// The bitmaps of disk `disk` of a running VM.
    async fn state(&self, vm: Uuid, disk: usize) -> HvResult<Vec<tracking::BitmapState>>;
    /// Removes `bitmap` from disk `disk` of a running VM.
    async fn remove(&self, vm: Uuid, disk: usize, bitmap: &str) -> HvResult<()>;
    /// Freezes `current`, starts `next`, and exports a point-in-time view of the disk with
    /// `current` as its dirty-bitmap context, in `export_dir`.
    async fn cut_begin(
        &self,
        vm: Uuid,
        disk: usize,
        current: &str,
        next: &str,
        export_dir: &std::path::Path,
    ) -> HvResult<tracking::CycleExport>;
    /// Ends a cut: `success` drops `current` (its changes arrived), otherwise folds it into `next`.
    async fn cut_end(&self, cut: &tracking::CycleExport, success: bool) -> HvResult<()>;

    // Offline: the same for every driver whose disks are qcow2 images (QEMU's own tools on an
    // image nobody has open), so these are provided; a driver with other disks overrides them.
    async fn enable_offline(&self, image: &std::path::Path, bitmap: &str) -> HvResult<()> {
        tracking::enable_tracking_offline(image, bitmap).await
    }
    async fn state_offline(&self, image: &std::path::Path) -> HvResult<Vec<tracking::BitmapState>> {
        tracking::bitmap_state_offline(image).await
    }
    async fn remove_offline(&self, image: &std::path::Path, bitmap: &str) -> HvResult<()> {
        tracking::remove_tracking_offline(image, bitmap).await
    }
    async fn cut_begin_offline(
        &self,
        image: &std::path::Path,
        current: &str,
        next: &str,
        export_dir: &std::path::Path,
    ) -> HvResult<tracking::OfflineCycleExport> {
        tracking::begin_cycle_offline(image, current, next, export_dir).await
    }
    async fn cut_end_offline(&self, cut: tracking::OfflineCycleExport, success: bool) -> HvResult<()> {
        tracking::end_cycle_offline(cut, success).await
    }
    /// Ends an offline cut whose export was lost (a restart): idempotent.
    async fn cut_recover_offline(
        &self,
        image: &std::path::Path,
        current: &str,
        next: &str,
        export_dir: &std::path::Path,
        success: bool,
    ) -> HvResult<()> {
        tracking::recover_cycle_offline(image, current, next, export_dir, success).await
    }
}
