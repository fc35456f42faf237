//! `QemuDriver`: each VM is a `qemu-system-x86_64` process that outlives drover.
//!
//! # Layout
//! One directory per VM, `<runtime_dir>/<uuid>/`:
//! ```text
//!   spec.json     the VmSpec it was last started with (written before the process starts)
//!   qemu.pid      QEMU's -pidfile
//!   qmp.sock      QMP (unix socket server, one client at a time)
//!   agent.sock    the guest channel: virtio-serial port `org.drover.agent` (socket server)
//!   console.log   the guest's serial console (console.prev.log: the boot before)
//!   stopped       present when drover stopped the VM on purpose
//! ```
//! Disks are `-blockdev` qcow2 nodes named `disk0`, `disk1`, ... (files `file0`, ...), each on a
//! virtio-blk device `vblk<i>`; NICs are virtio-net `nic<i>` on netdev `net<i>`. Later QMP work
//! (dirty bitmaps, NBD export) addresses the disks by these node names, and port checks the
//! netdevs. A NIC on a network with a configured bridge gets `-netdev bridge`; any other NIC gets
//! user-mode networking with `restrict=on` (no uplink; the host reaches the guest only through
//! the forwards a port check adds, see [`crate::usernet`]).
//!
//! # Power state, from the outside
//! ```text
//!   process alive (pidfile pid whose /proc cmdline holds our uuid) -> QMP query-status:
//!        running -> Running, anything else -> Paused
//!   no process, spec.json present, no `stopped` file               -> Died
//!   otherwise                                                      -> Off
//! ```
//! `shutdown`/`power_off` write `stopped` *before* they stop the process, so a drover that dies
//! mid-stop still reports Off rather than Died afterwards; `power_on` removes it once QEMU runs.
//! A guest that powers itself off from inside is reported as Died: drover did not ask for it.
//!
//! # Why the process outlives drover
//! QEMU is started with `-daemonize`: it forks, calls `setsid` and is re-parented away from drover,
//! so killing drover (or its process group, or its systemd unit with KillMode=process) leaves the
//! VMs running, and a restarted drover finds them again with [`Hypervisor::reattach`]. Nothing is
//! kept in memory that is not also on disk, so every method works on a fresh `QemuDriver`.
//!
//! # Acceleration
//! On the machines drover is developed on, `/dev/kvm` exists but a normal guest hangs under it.
//! [`Accel::Tcg`] is the default; [`Accel::Auto`] uses KVM only after [`probe_kvm`] booted the
//! tiny guest under it within a timeout.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::Command;
use tokio::sync::{Mutex as AsyncMutex, OnceCell};
use tokio::time::Instant;
use uuid::Uuid;

use crate::{
    BootSpec, DiskBus, FreezeOutcome, Heartbeat, HvError, HvResult, Hypervisor, NicModel, PowerState, ShutdownOutcome,
    TcpPortState, VmSpec, tracking,
};
use drover_qemu::qmp::QmpClient;

/// Name of the virtio-serial port drover's own guest channel listens on (the tiny guest's).
pub const AGENT_CHANNEL: &str = "org.drover.agent";
/// Name of the virtio-serial port the standard QEMU guest agent (`qemu-ga`) listens on. Every VM
/// gets both ports; a heartbeat is an answer on either ([`QemuDriver`]'s `wait_heartbeat`).
pub const GUEST_AGENT_CHANNEL: &str = "org.qemu.guest_agent.0";
/// The longest line taken from drover's guest channel (a pong with a marker is under 1 KiB).
const MAX_GUEST_LINE: usize = 64 << 10;

/// Bound on one QMP connection + command; QEMU answers in milliseconds unless wedged.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on `qemu-system-x86_64 -daemonize` returning (it returns once the VM is set up).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// After QMP `quit`, how long before SIGKILL.
const QUIT_WAIT: Duration = Duration::from_secs(3);
/// After SIGKILL, how long until we call the process unkillable.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// One request/reply on the guest channel; a booted guest answers in milliseconds.
const AGENT_ATTEMPT: Duration = Duration::from_secs(3);
/// `write_marker` has no timeout parameter; this bounds its retries.
const WRITE_MARKER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the guest agent has to answer before a freeze (it runs in the guest, and a busy
/// guest under TCG is slow).
const GUEST_AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a freeze or a thaw may take: the guest's fsfreeze hooks run first (a database
/// checkpoint), then every file system is synced.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(60);
/// The tiny guest reaches its ready line in about 3 s under TCG and faster under a working KVM;
/// a guest that has not after 10 s under KVM is hanging (the trap this probe exists for), and
/// every start of drover with `--accel auto` pays this much on such a host.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Markers travel as one hex line; keep them small.
pub(crate) const MAX_MARKER_BYTES: usize = 4096;
/// Poll interval while waiting for a process to exit (a graceful guest stops in ~60 ms).
const EXIT_POLL: Duration = Duration::from_millis(25);
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Emulation. Slow but works everywhere; the default.
    #[default]
    Tcg,
    /// Hardware virtualisation, unconditionally.
    Kvm,
    /// KVM if [`probe_kvm`] succeeds with [`QemuConfig::kvm_probe_guest`], else TCG.
    Auto,
}

/// How the driver is set up. [`QemuConfig::new`] gives the defaults.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Parent of the per-VM directories. Keep it short: unix socket paths are limited to 107
    /// bytes (`<runtime_dir>/<36-char uuid>/agent.sock`).
    pub runtime_dir: PathBuf,
    pub qemu_binary: PathBuf,
    pub accel: Accel,
    /// The guest [`Accel::Auto`] boots to probe KVM (normally the tiny guest). Without one,
    /// `Auto` means TCG.
    pub kvm_probe_guest: Option<BootSpec>,
    /// Network name → host bridge. A NIC on a network listed here gets `-netdev bridge`
    /// (needs qemu-bridge-helper set up for that bridge) unless it is marked `no_uplink`; any
    /// other NIC has user-mode networking with `restrict=on`: no uplink, reachable from the host
    /// only through the forward a port check adds.
    pub bridges: BTreeMap<String, String>,
}

impl QemuConfig {
    pub fn new(runtime_dir: impl Into<PathBuf>) -> Self {
        QemuConfig {
            runtime_dir: runtime_dir.into(),
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Tcg,
            kvm_probe_guest: None,
            bridges: BTreeMap::new(),
        }
    }
}

/// The real guest built by `scripts/build-debian-guest` (Debian with systemd, the QEMU guest
/// agent and PostgreSQL): its disk image to import and how to boot it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebianGuest {
    /// The directory it was loaded from (canonical).
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The root file system's qcow2 image, to import or to put an overlay on (never to boot).
    pub disk: PathBuf,
    pub cmdline: String,
}

impl DebianGuest {
    /// Reads `<dir>/guest.json` and checks that the files it names exist.
    pub fn load(dir: &Path) -> HvResult<Self> {
        #[derive(Deserialize)]
        struct Manifest {
            kernel: PathBuf,
            initrd: PathBuf,
            disk: PathBuf,
            cmdline: String,
        }
        let dir = std::fs::canonicalize(dir).map_err(|e| HvError::io(format!("reading {}", dir.display()), e))?;
        let path = dir.join("guest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| HvError::io(format!("reading {}", path.display()), e))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| HvError::InvalidSpec(format!("{} is not a guest manifest: {e}", path.display())))?;
        let guest = DebianGuest {
            kernel: dir.join(m.kernel),
            initrd: dir.join(m.initrd),
            disk: dir.join(m.disk),
            cmdline: m.cmdline,
            dir,
        };
        for file in [&guest.kernel, &guest.initrd, &guest.disk] {
            if !file.is_file() {
                return Err(HvError::InvalidSpec(format!("{} is missing", file.display())));
            }
        }
        Ok(guest)
    }

    pub fn boot_spec(&self) -> BootSpec {
        BootSpec {
            kernel: Some(self.kernel.clone()),
            initrd: Some(self.initrd.clone()),
            cmdline: Some(self.cmdline.clone()),
            firmware: Default::default(),
        }
    }
}

/// The tiny guest built by `scripts/build-guest`: where its files are and how to boot it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TinyGuest {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub kernel_version: String,
}

impl TinyGuest {
    /// Reads `<dir>/guest.json` and checks that the files it names exist.
    pub fn load(dir: &Path) -> HvResult<Self> {
        #[derive(Deserialize)]
        struct Manifest {
            vmlinux: PathBuf,
            initramfs: PathBuf,
            cmdline: String,
            kernel_version: String,
        }
        let path = dir.join("guest.json");
        let text = std::fs::read_to_string(&path).map_err(|e| HvError::io(format!("reading {}", path.display()), e))?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| HvError::InvalidSpec(format!("{} is not a guest manifest: {e}", path.display())))?;
        let guest = TinyGuest {
            vmlinux: dir.join(m.vmlinux),
            initramfs: dir.join(m.initramfs),
            cmdline: m.cmdline,
            kernel_version: m.kernel_version,
        };
        for file in [&guest.vmlinux, &guest.initramfs] {
            if !file.is_file() {
                return Err(HvError::InvalidSpec(format!("{} is missing", file.display())));
            }
        }
        Ok(guest)
    }

    pub fn boot_spec(&self) -> BootSpec {
        BootSpec {
            kernel: Some(self.vmlinux.clone()),
            initrd: Some(self.initramfs.clone()),
            cmdline: Some(self.cmdline.clone()),
            firmware: Default::default(),
        }
    }

    /// The kernel command line with `drover.listen=<ports>`: the guest's init starts a TCP
    /// listener on each port, which greets every connection with one line.
    pub fn cmdline_listening(&self, ports: &[u16]) -> String {
        if ports.is_empty() {
            return self.cmdline.clone();
        }
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        format!("{} drover.listen={}", self.cmdline, ports.join(","))
    }

    /// [`TinyGuest::boot_spec`] with a guest that listens on `ports`.
    pub fn boot_spec_listening(&self, ports: &[u16]) -> BootSpec {
        BootSpec { cmdline: Some(self.cmdline_listening(ports)), ..self.boot_spec() }
    }
}

/// The files of one VM's runtime directory.
#[derive(Debug, Clone)]
struct VmPaths {
    dir: PathBuf,
    spec: PathBuf,
    pidfile: PathBuf,
    qmp: PathBuf,
    agent: PathBuf,
    /// The QEMU guest agent's port.
    qga: PathBuf,
    console: PathBuf,
    console_prev: PathBuf,
    stopped: PathBuf,
    /// The VM's own UEFI variables (a copy of OVMF's template, made at its first UEFI start).
    uefi_vars: PathBuf,
}

impl VmPaths {
    fn new(runtime_dir: &Path, vm: Uuid) -> Self {
        let dir = runtime_dir.join(vm.to_string());
        VmPaths {
            spec: dir.join("spec.json"),
            pidfile: dir.join("qemu.pid"),
            qmp: dir.join("qmp.sock"),
            agent: dir.join("agent.sock"),
            qga: dir.join("qga.sock"),
            console: dir.join("console.log"),
            console_prev: dir.join("console.prev.log"),
            stopped: dir.join("stopped"),
            uefi_vars: dir.join("uefi-vars.fd"),
            dir,
        }
    }
}

/// The accelerator after `Auto` is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResolvedAccel {
    Tcg,
    Kvm,
}

/// The product's hypervisor driver. See the module documentation.
#[derive(Debug)]
pub struct QemuDriver {
    config: QemuConfig,
    accel: OnceCell<ResolvedAccel>,
    /// Serialises power_on/shutdown/power_off/forget per VM inside this process, so concurrent
    /// saga steps cannot start two QEMUs for one VM. Heartbeats and status do not take it: they
    /// only read, and must not wait behind a long shutdown.
    vm_locks: StdMutex<HashMap<Uuid, Arc<AsyncMutex<()>>>>,
}

impl QemuDriver {
    pub fn new(config: QemuConfig) -> Self {
        QemuDriver { config, accel: OnceCell::new(), vm_locks: StdMutex::new(HashMap::new()) }
    }

    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// The accelerator VMs are started with (runs the KVM probe once under [`Accel::Auto`]).
    pub async fn effective_accel(&self) -> Accel {
        match self.resolved_accel().await {
            ResolvedAccel::Tcg => Accel::Tcg,
            ResolvedAccel::Kvm => Accel::Kvm,
        }
    }

    /// The VM's runtime directory (it may not exist).
    pub fn vm_dir(&self, vm: Uuid) -> PathBuf {
        self.paths(vm).dir
    }

    /// The guest's serial console log of the current (or last) boot.
    pub fn console_log_path(&self, vm: Uuid) -> PathBuf {
        self.paths(vm).console
    }

    /// The VM's QMP socket, for commands beyond the trait (dirty bitmaps, NBD export). QEMU
    /// serves one QMP client at a time: connect with [`QemuDriver::qmp`] and drop it soon.
    pub fn qmp_socket_path(&self, vm: Uuid) -> PathBuf {
        self.paths(vm).qmp
    }

    /// The VM's socket of the QEMU guest agent's port, for commands beyond the trait (a test
    /// running a workload in the guest). One client at a time, like QMP.
    pub fn guest_agent_socket_path(&self, vm: Uuid) -> PathBuf {
        self.paths(vm).qga
    }

    /// A negotiated QMP connection to a running VM.
    pub async fn qmp(&self, vm: Uuid) -> HvResult<QmpClient> {
        let paths = self.paths(vm);
        if running_pid(&paths, vm).is_none() {
            return Err(self.not_running(vm));
        }
        Ok(QmpClient::connect_timeout(&paths.qmp, QMP_TIMEOUT).await?)
    }

    /// The QEMU process id, when the VM's process is alive.
    pub fn pid(&self, vm: Uuid) -> Option<u32> {
        running_pid(&self.paths(vm), vm).and_then(|p| u32::try_from(p.as_raw()).ok())
    }

    fn paths(&self, vm: Uuid) -> VmPaths {
        VmPaths::new(&self.config.runtime_dir, vm)
    }

    fn not_running(&self, vm: Uuid) -> HvError {
        if self.paths(vm).spec.exists() { HvError::NotRunning(vm) } else { HvError::UnknownVm(vm) }
    }

    fn vm_lock(&self, vm: Uuid) -> Arc<AsyncMutex<()>> {
        let mut locks = self.vm_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(vm).or_default().clone()
    }

    async fn resolved_accel(&self) -> ResolvedAccel {
        *self
            .accel
            .get_or_init(|| async {
                match self.config.accel {
                    Accel::Tcg => ResolvedAccel::Tcg,
                    Accel::Kvm => ResolvedAccel::Kvm,
                    Accel::Auto => match &self.config.kvm_probe_guest {
                        Some(guest) => {
                            let ok = probe_kvm(&self.config.qemu_binary, guest, KVM_PROBE_TIMEOUT).await;
                            tracing::info!(kvm = ok, "KVM probe finished; VMs use {}", if ok { "KVM" } else { "TCG" });
                            if ok { ResolvedAccel::Kvm } else { ResolvedAccel::Tcg }
                        }
                        None => {
                            tracing::warn!("accel=auto without a probe guest: using TCG");
                            ResolvedAccel::Tcg
                        }
                    },
                }
            })
            .await
    }

    /// Writes the clean-stop marker (only if the VM has a runtime directory).
    async fn mark_stopped(&self, paths: &VmPaths) -> HvResult<()> {
        match tokio::fs::write(&paths.stopped, b"").await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(HvError::io(format!("writing {}", paths.stopped.display()), e)),
        }
    }

    /// Stops the process now: QMP `quit`, then SIGKILL. Returns once the process is gone.
    async fn force_off(&self, paths: &VmPaths, vm: Uuid, pid: Pid) -> HvResult<()> {
        match QmpClient::connect_timeout(&paths.qmp, QMP_TIMEOUT).await {
            Ok(mut qmp) => {
                // QEMU may close the socket before its reply arrives; the exit is what counts.
                if let Err(e) = qmp.execute_timeout("quit", Value::Null, QMP_TIMEOUT).await {
                    tracing::debug!(%vm, error = %e, "QMP quit");
                }
            }
            Err(e) => tracing::warn!(%vm, error = %e, "no QMP for quit; killing QEMU"),
        }
        if wait_exit(pid, vm, QUIT_WAIT).await {
            return Ok(());
        }
        tracing::warn!(%vm, pid = pid.as_raw(), "QEMU did not quit; sending SIGKILL");
        match kill(pid, Signal::SIGKILL) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(HvError::io(format!("killing QEMU pid {pid}"), e.into())),
        }
        if wait_exit(pid, vm, KILL_WAIT).await {
            Ok(())
        } else {
            Err(HvError::Timeout(KILL_WAIT, "QEMU to exit after SIGKILL"))
        }
    }

    /// Power state as described in the module documentation. Takes no lock.
    async fn read_status(&self, vm: Uuid) -> HvResult<PowerState> {
        let paths = self.paths(vm);
        if running_pid(&paths, vm).is_some() {
            return Ok(self.query_running_state(&paths, vm).await);
        }
        if !paths.spec.exists() || paths.stopped.exists() { Ok(PowerState::Off) } else { Ok(PowerState::Died) }
    }

    /// Running or Paused from QMP. The process is alive, so when QMP cannot tell (another
    /// client holds the socket, QEMU is busy) it is reported Running rather than failing.
    async fn query_running_state(&self, paths: &VmPaths, vm: Uuid) -> PowerState {
        let status = async {
            let mut qmp = QmpClient::connect_timeout(&paths.qmp, QMP_TIMEOUT).await?;
            qmp.execute_timeout("query-status", Value::Null, QMP_TIMEOUT).await
        }
        .await;
        match status {
            Ok(s) if s.get("running").and_then(Value::as_bool) == Some(true) => PowerState::Running,
            Ok(s) => {
                tracing::debug!(%vm, status = %s, "VM not running");
                PowerState::Paused
            }
            Err(e) => {
                tracing::warn!(%vm, error = %e, "query-status failed; process alive, assuming running");
                PowerState::Running
            }
        }
    }

    /// One request line on the guest channel, reading reply lines until `accept` recognises
    /// one. Lines it does not recognise (e.g. a late answer to an earlier, timed-out request) are
    /// skipped. The outer error is the transport (worth retrying: the guest may still be
    /// booting); the inner result is the guest's answer (final).
    async fn agent_exchange<T>(
        paths: &VmPaths,
        request: &str,
        accept: impl Fn(&str) -> Option<HvResult<T>>,
    ) -> HvResult<HvResult<T>> {
        channel_exchange(&paths.agent, request, accept).await
    }

    /// Runs `attempt` (given its time budget, at most [`AGENT_ATTEMPT`]) until it answers, the
    /// VM stops, or `timeout` passes (`what` names the wait in the timeout error).
    async fn retry_until<T, Fut>(
        &self,
        vm: Uuid,
        timeout: Duration,
        what: &'static str,
        attempt: impl Fn(Duration) -> Fut,
    ) -> HvResult<T>
    where
        Fut: std::future::Future<Output = Option<HvResult<T>>>,
    {
        let paths = self.paths(vm);
        let deadline = Instant::now() + timeout;
        loop {
            if running_pid(&paths, vm).is_none() {
                return Err(self.not_running(vm));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(HvError::Timeout(timeout, what));
            }
            let budget = remaining.min(AGENT_ATTEMPT);
            match tokio::time::timeout(budget, attempt(budget)).await {
                Ok(Some(answer)) => return answer,
                Ok(None) => {}
                Err(_) => tracing::debug!(%vm, what, "no answer yet"),
            }
            let pause = Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(pause).await;
        }
    }
}

#[async_trait]
impl Hypervisor for QemuDriver {
    fn change_tracking(&self) -> Option<&dyn crate::ChangeTracking> {
        Some(self)
    }

    async fn runtime_disks(&self, vm: Uuid) -> HvResult<Vec<PathBuf>> {
        let path = self.vm_dir(vm).join("spec.json");
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HvError::io(format!("reading {}", path.display()), e)),
        };
        let spec: VmSpec =
            serde_json::from_str(&text).map_err(|e| HvError::InvalidSpec(format!("{}: {e}", path.display())))?;
        Ok(spec.disks.into_iter().map(|d| d.path).collect())
    }

    fn kind(&self) -> &'static str {
        "qemu"
    }

    /// The configured bridges (`--network NAME=BRIDGE`), each available when the host has a
    /// bridge of that name.
    async fn networks(&self) -> HvResult<Vec<drover_agent_api::HostNetwork>> {
        Ok(self
            .config
            .bridges
            .iter()
            .map(|(name, bridge)| {
                let there = Path::new("/sys/class/net").join(bridge).join("bridge").is_dir();
                drover_agent_api::HostNetwork {
                    name: name.clone(),
                    target: format!("bridge {bridge}"),
                    available: there,
                    problem: (!there).then(|| format!("this host has no bridge {bridge}")),
                }
            })
            .collect())
    }

    async fn power_on(&self, spec: &VmSpec) -> HvResult<()> {
        validate_spec(spec)?;
        let lock = self.vm_lock(spec.id);
        let _guard = lock.lock().await;
        let paths = self.paths(spec.id);
        for socket in [&paths.qmp, &paths.agent] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(HvError::InvalidSpec(format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter runtime_dir",
                    socket.display()
                )));
            }
        }
        if running_pid(&paths, spec.id).is_some() {
            tracing::debug!(vm = %spec.id, "power_on: already running");
            return Ok(());
        }
        let accel = self.resolved_accel().await;

        tokio::fs::create_dir_all(&paths.dir)
            .await
            .map_err(|e| HvError::io(format!("creating {}", paths.dir.display()), e))?;
        // Leftovers of a previous run (a killed QEMU leaves its sockets and pidfile).
        for stale in [&paths.qmp, &paths.agent, &paths.pidfile] {
            remove_if_present(stale).await?;
        }
        if tokio::fs::metadata(&paths.console).await.is_ok() {
            tokio::fs::rename(&paths.console, &paths.console_prev)
                .await
                .map_err(|e| HvError::io("rotating console.log", e))?;
        }
        let spec_json = serde_json::to_vec_pretty(spec)
            .map_err(|e| HvError::InvalidSpec(format!("spec does not serialise: {e}")))?;
        write_atomic(&paths.spec, &spec_json).await?;
        if spec.boot.firmware == crate::Firmware::Uefi && tokio::fs::metadata(&paths.uefi_vars).await.is_err() {
            // The VM's UEFI variables (boot entries) are its own and persist across its starts.
            let template = tokio::fs::read(OVMF_VARS)
                .await
                .map_err(|e| HvError::io(format!("reading {OVMF_VARS} (Debian's ovmf package)"), e))?;
            write_atomic(&paths.uefi_vars, &template).await?;
        }

        let args = qemu_args(spec, &paths, accel, &self.config.bridges)?;
        tracing::info!(vm = %spec.id, name = %spec.name, ?accel, "starting QEMU");
        tracing::debug!(vm = %spec.id, ?args, "QEMU command line");
        let start =
            Command::new(&self.config.qemu_binary).args(&args).stdin(Stdio::null()).kill_on_drop(false).output();
        let output = tokio::time::timeout(START_TIMEOUT, start)
            .await
            .map_err(|_| HvError::Timeout(START_TIMEOUT, "QEMU to start"))?
            .map_err(|e| HvError::io(format!("running {}", self.config.qemu_binary.display()), e))?;
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        if !output.status.success() {
            self.mark_stopped(&paths).await?;
            // QEMU's words when another process has the image open for writing (file-posix
            // image locking); the caller may wait for it.
            if stderr.contains("Failed to get \"write\" lock") || stderr.contains("Failed to get shared \"write\" lock")
            {
                return Err(HvError::ImageLocked(stderr));
            }
            return Err(HvError::Tool {
                program: self.config.qemu_binary.display().to_string(),
                stderr: if stderr.is_empty() { format!("exited with {}", output.status) } else { stderr },
            });
        }
        if !stderr.is_empty() {
            tracing::debug!(vm = %spec.id, stderr, "QEMU warnings");
        }
        if running_pid(&paths, spec.id).is_none() {
            self.mark_stopped(&paths).await?;
            return Err(HvError::Tool {
                program: self.config.qemu_binary.display().to_string(),
                stderr: format!("QEMU exited right after starting; see {}", paths.console.display()),
            });
        }
        // From here on, a vanished process means Died.
        remove_if_present(&paths.stopped).await?;
        Ok(())
    }

    async fn shutdown(&self, vm: Uuid, timeout: Duration) -> HvResult<ShutdownOutcome> {
        let lock = self.vm_lock(vm);
        let _guard = lock.lock().await;
        let paths = self.paths(vm);
        self.mark_stopped(&paths).await?;
        let Some(pid) = running_pid(&paths, vm) else {
            return Ok(ShutdownOutcome::AlreadyOff);
        };
        let deadline = Instant::now() + timeout;
        let ask = async {
            let mut qmp = QmpClient::connect(&paths.qmp).await?;
            qmp.execute("system_powerdown", Value::Null).await
        };
        let budget = timeout.min(QMP_TIMEOUT);
        match tokio::time::timeout(budget, ask).await {
            Ok(Ok(_)) => {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if wait_exit(pid, vm, remaining).await {
                    tracing::info!(%vm, "guest shut down");
                    return Ok(ShutdownOutcome::Graceful);
                }
                tracing::warn!(%vm, ?timeout, "guest ignored the power button; powering off");
            }
            Ok(Err(e)) => tracing::warn!(%vm, error = %e, "system_powerdown failed; powering off"),
            Err(_) => tracing::warn!(%vm, "system_powerdown timed out; powering off"),
        }
        self.force_off(&paths, vm, pid).await?;
        Ok(ShutdownOutcome::ForcedOff)
    }

    async fn power_off(&self, vm: Uuid) -> HvResult<()> {
        let lock = self.vm_lock(vm);
        let _guard = lock.lock().await;
        let paths = self.paths(vm);
        self.mark_stopped(&paths).await?;
        match running_pid(&paths, vm) {
            Some(pid) => {
                self.force_off(&paths, vm, pid).await?;
                tracing::info!(%vm, "powered off");
                Ok(())
            }
            None => Ok(()),
        }
    }

    async fn status(&self, vm: Uuid) -> HvResult<PowerState> {
        self.read_status(vm).await
    }

    /// An answer on drover's channel (`ping`, with the guest's uptime and marker) or from the
    /// QEMU guest agent (`guest-ping`; it says neither, so the uptime is the VM's QEMU's and
    /// there is no marker), whichever comes first.
    async fn wait_heartbeat(&self, vm: Uuid, timeout: Duration) -> HvResult<Heartbeat> {
        let paths = self.paths(vm);
        self.retry_until(vm, timeout, "guest heartbeat", |budget| heartbeat_once(&paths, vm, budget)).await
    }

    /// Asks QEMU first whether anything in the guest has the guest agent's port open (QMP
    /// `query-chardev`, `frontend-open`), so a guest without `qemu-ga` is told apart at once
    /// instead of after a timeout; then the guest agent itself: it must answer, have
    /// `guest-fsfreeze-freeze` enabled, and not be frozen already (by someone else: drover's
    /// own freezes are the agent's to track).
    async fn guest_freeze(&self, vm: Uuid) -> HvResult<FreezeOutcome> {
        let paths = self.paths(vm);
        let not = |reason: String| Ok(FreezeOutcome { frozen: false, filesystems: 0, reason });
        let mut qmp = self.qmp(vm).await?;
        let chardevs = qmp.execute_timeout("query-chardev", Value::Null, QMP_TIMEOUT).await?;
        drop(qmp);
        let open = chardevs.as_array().and_then(|list| {
            list.iter()
                .find(|c| c.get("label").and_then(Value::as_str) == Some("qga"))
                .and_then(|c| c.get("frontend-open").and_then(Value::as_bool))
        });
        match open {
            None => return not("the VM has no guest agent port (it was started before drover gave VMs one)".into()),
            Some(false) => {
                return not(
                    "no guest agent runs in the guest (its port is closed: qemu-guest-agent is not installed or not \
                     started)"
                        .into(),
                );
            }
            Some(true) => {}
        }
        let mut agent = match drover_qemu::qga::GuestAgent::connect(&paths.qga, GUEST_AGENT_TIMEOUT).await {
            Ok(a) => a,
            Err(e) => return not(format!("the guest agent does not answer: {e}")),
        };
        // The status first: a frozen guest agent disables most of its commands, freezing among them.
        match agent.fsfreeze_status().await {
            Ok(drover_qemu::qga::FreezeStatus::Thawed) => {}
            Ok(drover_qemu::qga::FreezeStatus::Frozen) => {
                return not("the guest's file systems are already frozen by someone else".into());
            }
            Err(e) => return not(format!("the guest agent does not say whether it is frozen: {e}")),
        }
        let info = match agent.info().await {
            Ok(i) => i,
            Err(e) => return not(format!("the guest agent does not say what it can do: {e}")),
        };
        if !info.can("guest-fsfreeze-freeze") || !info.can("guest-fsfreeze-thaw") {
            return not(format!(
                "the guest agent {} cannot freeze file systems (guest-fsfreeze-freeze is disabled or missing)",
                info.version
            ));
        }
        agent.set_timeout(FREEZE_TIMEOUT);
        match agent.fsfreeze_freeze().await {
            Ok(n) => Ok(FreezeOutcome {
                frozen: true,
                filesystems: n,
                reason: format!("{n} file systems frozen by the guest agent {}", info.version),
            }),
            Err(e) => {
                // A freeze that failed part-way (a hook refused, a file system would not freeze)
                // or did not answer in time may hold some file systems: thaw on a new
                // connection, which the guest agent serves after the freeze it is still running.
                drop(agent);
                let thawed = self.guest_thaw(vm).await;
                tracing::warn!(%vm, error = %e, ?thawed, "guest freeze failed; thawed");
                not(format!("the guest agent's freeze failed and was undone: {e}"))
            }
        }
    }

    fn guest_agent_socket(&self, vm: Uuid) -> Option<PathBuf> {
        Some(self.paths(vm).qga)
    }

    async fn guest_thaw(&self, vm: Uuid) -> HvResult<u64> {
        let paths = self.paths(vm);
        if running_pid(&paths, vm).is_none() {
            // A guest that is not running holds nothing frozen: the next boot starts thawed.
            return Ok(0);
        }
        Ok(drover_qemu::qga::thaw(&paths.qga, FREEZE_TIMEOUT).await?)
    }

    async fn write_marker(&self, vm: Uuid, marker: &str) -> HvResult<()> {
        if marker.len() > MAX_MARKER_BYTES {
            return Err(HvError::InvalidSpec(format!("marker is {} bytes; at most {MAX_MARKER_BYTES}", marker.len())));
        }
        let request = format!("marker-write {}", hex_encode(marker.as_bytes()));
        let paths = self.paths(vm);
        self.retry_until(vm, WRITE_MARKER_TIMEOUT, "marker write", |budget| {
            write_marker_once(&paths, vm, &request, marker, budget)
        })
        .await
    }

    async fn check_tcp_port(&self, vm: Uuid, guest_port: u16, timeout: Duration) -> HvResult<TcpPortState> {
        let paths = self.paths(vm);
        if running_pid(&paths, vm).is_none() {
            return Err(self.not_running(vm));
        }
        let text = tokio::fs::read_to_string(&paths.spec)
            .await
            .map_err(|e| HvError::io(format!("reading {}", paths.spec.display()), e))?;
        let spec: VmSpec = serde_json::from_str(&text)
            .map_err(|e| HvError::InvalidSpec(format!("{} does not parse: {e}", paths.spec.display())))?;
        let netdev = user_netdev(&spec, &self.config.bridges).ok_or_else(|| {
            HvError::InvalidSpec(format!(
                "VM {} has no NIC on a network without a bridge; its ports cannot be checked from the host",
                spec.name
            ))
        })?;
        crate::usernet::check_tcp_port(&paths.qmp, &netdev, guest_port, timeout).await
    }

    async fn forget(&self, vm: Uuid) -> HvResult<()> {
        self.power_off(vm).await?;
        let lock = self.vm_lock(vm);
        let _guard = lock.lock().await;
        let dir = self.paths(vm).dir;
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(HvError::io(format!("removing {}", dir.display()), e)),
        }
        self.vm_locks.lock().unwrap_or_else(|p| p.into_inner()).remove(&vm);
        Ok(())
    }

    async fn reattach(&self) -> HvResult<Vec<(Uuid, PowerState)>> {
        let root = &self.config.runtime_dir;
        let mut entries = match tokio::fs::read_dir(root).await {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(HvError::io(format!("reading {}", root.display()), e)),
        };
        let mut vms = Vec::new();
        while let Some(entry) =
            entries.next_entry().await.map_err(|e| HvError::io(format!("reading {}", root.display()), e))?
        {
            let Some(vm) = entry.file_name().to_str().and_then(|n| Uuid::parse_str(n).ok()) else {
                continue;
            };
            if !entry.path().join("spec.json").exists() {
                tracing::warn!(%vm, "runtime directory without spec.json; ignoring it");
                continue;
            }
            let state = self.read_status(vm).await?;
            tracing::info!(%vm, ?state, "reattached");
            vms.push((vm, state));
        }
        vms.sort_by_key(|(vm, _)| *vm);
        Ok(vms)
    }
}

/// Boots `guest` under KVM and reports whether its init printed a `drover-guest:` line on the
/// serial console within `timeout`. Used by [`Accel::Auto`]: on some hosts `/dev/kvm` exists but
/// guests hang under it, so its presence proves nothing. The probe VM is a child process with a
/// scratch disk in a temporary directory; both are gone when this returns.
pub async fn probe_kvm(qemu_binary: &Path, guest: &BootSpec, timeout: Duration) -> bool {
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        tracing::info!("KVM probe: /dev/kvm is not usable");
        return false;
    }
    let dir = std::env::temp_dir().join(format!("drover-kvm-probe-{}", Uuid::new_v4()));
    let result = probe_kvm_in(qemu_binary, guest, timeout, &dir).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    match result {
        Ok(ok) => ok,
        Err(e) => {
            tracing::info!(error = %e, "KVM probe failed");
            false
        }
    }
}

async fn probe_kvm_in(qemu_binary: &Path, guest: &BootSpec, timeout: Duration, dir: &Path) -> HvResult<bool> {
    tokio::fs::create_dir_all(dir).await.map_err(|e| HvError::io("creating the probe directory", e))?;
    // A data disk, so the guest does not wait for one before it prints.
    let disk = dir.join("probe.qcow2");
    drover_qemu::image::create_qcow2(&disk, 16 << 20).await?;
    let mut cmd = Command::new(qemu_binary);
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none", "-machine", "pc"])
        .args(["-accel", "kvm", "-cpu", "host", "-m", "128M", "-serial", "stdio"])
        .arg("-blockdev")
        .arg(format!("driver=file,node-name=file0,filename={}", qemu_opt_path(&disk)?))
        .args(["-blockdev", "driver=qcow2,node-name=disk0,file=file0", "-device", "virtio-blk-pci,drive=disk0"]);
    if let Some(kernel) = &guest.kernel {
        cmd.arg("-kernel").arg(kernel);
    }
    if let Some(initrd) = &guest.initrd {
        cmd.arg("-initrd").arg(initrd);
    }
    if let Some(cmdline) = &guest.cmdline {
        cmd.arg("-append").arg(cmdline);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| HvError::io(format!("running {}", qemu_binary.display()), e))?;
    let stdout = child.stdout.take().ok_or_else(|| HvError::GuestChannel("no probe stdout".into()))?;
    let mut lines = BufReader::new(stdout).lines();
    let seen = tokio::time::timeout(timeout, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("drover-guest:") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    let _ = child.kill().await;
    Ok(seen)
}

/// The pid of the VM's QEMU if it is alive. A pid is only trusted when `/proc/<pid>/cmdline`
/// mentions the VM's uuid (QEMU runs with `-uuid <vm>`), because after a reboot of the host or a
/// crash the pidfile may name an unrelated process that reused the number. A zombie has an
/// empty cmdline and so counts as gone.
fn running_pid(paths: &VmPaths, vm: Uuid) -> Option<Pid> {
    let text = std::fs::read_to_string(&paths.pidfile).ok()?;
    let pid: i32 = text.trim().parse().ok()?;
    process_is_vm(pid, vm).then(|| Pid::from_raw(pid))
}

fn process_is_vm(pid: i32, vm: Uuid) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = vm.to_string();
    cmdline.split(|b| *b == 0).any(|arg| arg.windows(needle.len()).any(|w| w == needle.as_bytes()))
}

/// Polls until the process is gone; true if it went within `timeout`.
async fn wait_exit(pid: Pid, vm: Uuid, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !process_is_vm(pid.as_raw(), vm) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(EXIT_POLL).await;
    }
}

async fn remove_if_present(path: &Path) -> HvResult<()> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HvError::io(format!("removing {}", path.display()), e)),
    }
}

/// Published durably, so neither a crash nor a power cut leaves a half-written spec.json.
async fn write_atomic(path: &Path, bytes: &[u8]) -> HvResult<()> {
    drover_qemu::durable::write(path, bytes.to_vec(), 0o600)
        .await
        .map_err(|e| HvError::io(format!("writing {}", path.display()), e))
}

/// OVMF as Debian's `ovmf` package installs it: the firmware (read-only) and the template of a
/// VM's variables (copied per VM).
const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

pub(crate) fn validate_spec(spec: &VmSpec) -> HvResult<()> {
    if spec.vcpus == 0 {
        return Err(HvError::InvalidSpec("vcpus must be at least 1".into()));
    }
    if spec.memory_mib < 16 {
        return Err(HvError::InvalidSpec(format!("memory_mib {} is too small", spec.memory_mib)));
    }
    for disk in &spec.disks {
        if !disk.path.is_absolute() {
            return Err(HvError::InvalidSpec(format!("disk path {} is not absolute", disk.path.display())));
        }
        if !disk.path.is_file() {
            return Err(HvError::InvalidSpec(format!("disk {} does not exist", disk.path.display())));
        }
    }
    for nic in &spec.nics {
        if !is_mac(&nic.mac) {
            return Err(HvError::InvalidSpec(format!("{:?} is not a MAC address", nic.mac)));
        }
    }
    if spec.boot.firmware == crate::Firmware::Uefi && !Path::new(OVMF_CODE).is_file() {
        return Err(HvError::InvalidSpec(format!(
            "VM {} boots with UEFI, which needs OVMF: {OVMF_CODE} is missing (Debian's ovmf package; scripts/install-deps)",
            spec.name
        )));
    }
    if spec.boot.kernel.is_none() && (spec.boot.initrd.is_some() || spec.boot.cmdline.is_some()) {
        return Err(HvError::InvalidSpec("initrd or cmdline given without a kernel".into()));
    }
    Ok(())
}

fn is_mac(mac: &str) -> bool {
    let parts: Vec<_> = mac.split(':').collect();
    parts.len() == 6 && parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// QEMU's option syntax separates `key=value` pairs with commas; a comma inside a value is
/// written twice.
fn qemu_opt_escape(value: &str) -> String {
    value.replace(',', ",,")
}

fn qemu_opt_path(path: &Path) -> HvResult<String> {
    path.to_str()
        .map(qemu_opt_escape)
        .ok_or_else(|| HvError::InvalidSpec(format!("path {} is not UTF-8", path.display())))
}

/// The QEMU command line for `spec`. Pure, so it is tested against a golden string.
fn qemu_args(
    spec: &VmSpec,
    paths: &VmPaths,
    accel: ResolvedAccel,
    bridges: &BTreeMap<String, String>,
) -> HvResult<Vec<OsString>> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&["-name", &format!("guest={},process=drover-qemu", qemu_opt_escape(&spec.name))]);
    push(&["-uuid", &spec.id.to_string()]);
    push(&["-daemonize", "-pidfile", &qemu_opt_path(&paths.pidfile)?]);
    let h = &spec.hardware;
    h.check(spec.disks.len(), spec.nics.len()).map_err(HvError::InvalidSpec)?;
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-machine", &h.machine.to_string()]);
    match accel {
        ResolvedAccel::Tcg => push(&["-accel", "tcg"]),
        ResolvedAccel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
    }
    push(&["-m", &format!("{}M", spec.memory_mib), "-smp", &spec.vcpus.to_string()]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", qemu_opt_path(&paths.qmp)?)]);
    push(&["-chardev", &format!("file,id=serial0,path={}", qemu_opt_path(&paths.console)?)]);
    push(&["-serial", "chardev:serial0"]);
    push(&["-device", "virtio-serial-pci,id=vser0"]);
    push(&["-chardev", &format!("socket,id=agent,path={},server=on,wait=off", qemu_opt_path(&paths.agent)?)]);
    push(&["-device", &format!("virtserialport,bus=vser0.0,chardev=agent,name={AGENT_CHANNEL}")]);
    push(&["-chardev", &format!("socket,id=qga,path={},server=on,wait=off", qemu_opt_path(&paths.qga)?)]);
    push(&["-device", &format!("virtserialport,bus=vser0.0,chardev=qga,name={GUEST_AGENT_CHANNEL}")]);
    // The guest's disk buses (a replica's are its source's): an AHCI controller for SATA disks,
    // a virtio-scsi one for SCSI disks, the machine's own IDE channels (pc only).
    let buses: Vec<DiskBus> = (0..spec.disks.len()).map(|i| h.disk_bus(i)).collect();
    if buses.contains(&DiskBus::Sata) {
        push(&["-device", "ahci,id=ahci0"]);
    }
    if buses.contains(&DiskBus::Scsi) {
        push(&["-device", "virtio-scsi-pci,id=scsi0"]);
    }
    let mut on_bus: BTreeMap<DiskBus, usize> = BTreeMap::new();
    for (i, disk) in spec.disks.iter().enumerate() {
        push(&["-blockdev", &format!("driver=file,node-name=file{i},filename={}", qemu_opt_path(&disk.path)?)]);
        push(&["-blockdev", &format!("driver=qcow2,node-name=disk{i},file=file{i},discard=unmap")]);
        let boot = if i == 0 && spec.boot.kernel.is_none() { ",bootindex=0" } else { "" };
        let n = on_bus.entry(buses[i]).or_default();
        let device = match buses[i] {
            DiskBus::Virtio => format!("virtio-blk-pci,drive=disk{i},id=vblk{i}{boot}"),
            DiskBus::Sata => format!("ide-hd,drive=disk{i},bus=ahci0.{n},id=sata{i}{boot}"),
            DiskBus::Scsi => format!("scsi-hd,drive=disk{i},bus=scsi0.0,id=scsi{i}{boot}"),
            DiskBus::Ide => format!("ide-hd,drive=disk{i},bus=ide.{},unit={},id=ide{i}{boot}", *n / 2, *n % 2),
        };
        *n += 1;
        push(&["-device", &device]);
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        // Without a bridge: user-mode networking with restrict=on. The guest reaches nothing
        // outside (no uplink); the host reaches it only through forwards drover adds to check a
        // port (see crate::usernet). The netdev id is what those forwards name.
        let netdev = match bridges.get(&nic.network).filter(|_| !nic.no_uplink) {
            Some(bridge) => format!("bridge,id=net{i},br={}", qemu_opt_escape(bridge)),
            None => format!("user,id=net{i},restrict=on"),
        };
        push(&["-netdev", &netdev]);
        let model = match h.nic_model(i) {
            NicModel::Virtio => "virtio-net-pci",
            NicModel::E1000 => "e1000",
            NicModel::E1000e => "e1000e",
            NicModel::Rtl8139 => "rtl8139",
        };
        push(&["-device", &format!("{model},netdev=net{i},mac={},id=nic{i}", nic.mac)]);
    }
    if spec.boot.firmware == crate::Firmware::Uefi {
        push(&[
            "-drive",
            &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", qemu_opt_path(Path::new(OVMF_CODE))?),
        ]);
        push(&["-drive", &format!("if=pflash,format=raw,unit=1,file={}", qemu_opt_path(&paths.uefi_vars)?)]);
    }
    if let Some(kernel) = &spec.boot.kernel {
        args.push("-kernel".into());
        args.push(kernel.clone().into_os_string());
    }
    if let Some(initrd) = &spec.boot.initrd {
        args.push("-initrd".into());
        args.push(initrd.clone().into_os_string());
    }
    if let Some(cmdline) = &spec.boot.cmdline {
        args.push("-append".into());
        args.push(cmdline.into());
    }
    Ok(args)
}

/// The netdev id of the VM's first NIC on user-mode networking (a network without a bridge), as
/// [`qemu_args`] names it.
fn user_netdev(spec: &VmSpec, bridges: &BTreeMap<String, String>) -> Option<String> {
    spec.nics.iter().position(|nic| nic.no_uplink || !bridges.contains_key(&nic.network)).map(|i| format!("net{i}"))
}

/// One try at a heartbeat on both channels at once: the first answer, or `None` when neither
/// answered (the caller tries again).
/// One request line on drover's guest channel at `socket`, reading reply lines until `accept`
/// recognises one. Lines it does not recognise (e.g. a late answer to an earlier, timed-out
/// request) are skipped. The outer error is the transport (worth retrying: the guest may still be
/// booting); the inner result is the guest's answer (final).
pub(crate) async fn channel_exchange<T>(
    socket: &Path,
    request: &str,
    accept: impl Fn(&str) -> Option<HvResult<T>>,
) -> HvResult<HvResult<T>> {
    let stream =
        UnixStream::connect(socket).await.map_err(|e| HvError::io(format!("connecting to {}", socket.display()), e))?;
    let (read, mut write) = stream.into_split();
    write
        .write_all(format!("{request}\n").as_bytes())
        .await
        .map_err(|e| HvError::io("writing to the guest channel", e))?;
    // The guest is not trusted: a line is bounded before it is held whole.
    let mut read = BufReader::new(read);
    loop {
        let line = drover_qemu::qga::read_line_bounded(&mut read, MAX_GUEST_LINE)
            .await
            .map_err(|e| HvError::io("reading from the guest channel", e))?
            .ok_or_else(|| HvError::GuestChannel("channel closed".into()))?;
        let line = String::from_utf8_lossy(&line);
        match accept(line.trim_end()) {
            Some(answer) => return Ok(answer),
            None => tracing::debug!(line = %line, "skipping unexpected guest line"),
        }
    }
}

async fn heartbeat_once(paths: &VmPaths, vm: Uuid, attempt: Duration) -> Option<HvResult<Heartbeat>> {
    let drover = QemuDriver::agent_exchange(paths, "ping", parse_pong);
    let qga = async {
        let mut agent = drover_qemu::qga::GuestAgent::connect(&paths.qga, attempt).await?;
        agent.ping().await?;
        let started = std::fs::metadata(&paths.pidfile).and_then(|m| m.modified()).ok();
        let uptime_secs = started.and_then(|t| t.elapsed().ok()).map_or(0.0, |d| d.as_secs_f64());
        // The addresses are extra: an agent that will not say (an old one, the command
        // disabled by the guest's administrator) is still a heartbeat.
        let addresses = match agent.network_interfaces().await {
            Ok(interfaces) => guest_addresses(&interfaces),
            Err(e) => {
                tracing::debug!(%vm, error = %e, "the guest agent does not list its interfaces");
                Vec::new()
            }
        };
        let marker = match agent.run_shell(READ_MARKER, None, attempt).await {
            Ok(out) if out.success() && out.stdout.len() <= MAX_MARKER_BYTES => {
                Some(String::from_utf8_lossy(&out.stdout).into_owned())
            }
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(%vm, error = %e, "the guest agent does not read the marker");
                None
            }
        };
        Ok::<_, HvError>(Heartbeat { uptime_secs, marker, addresses })
    };
    first_answer(vm, drover, qga, |_| false).await
}

/// The first answer of drover's channel (`drover`: an outer error means it did not answer) and
/// of the QEMU guest agent (`qga`: an error means it did not answer, unless `answered` says the
/// error is its answer), tried at once; `None` when neither answered (the caller tries again).
pub(crate) async fn first_answer<T>(
    vm: Uuid,
    drover: impl std::future::Future<Output = HvResult<HvResult<T>>>,
    qga: impl std::future::Future<Output = HvResult<T>>,
    answered: impl Fn(&HvError) -> bool,
) -> Option<HvResult<T>> {
    tokio::pin!(drover, qga);
    let (mut drover_done, mut qga_done) = (false, false);
    loop {
        tokio::select! {
            r = &mut drover, if !drover_done => match r {
                Ok(answer) => return Some(answer),
                Err(e) => {
                    tracing::debug!(%vm, error = %e, "guest channel not ready");
                    drover_done = true;
                }
            },
            r = &mut qga, if !qga_done => match r {
                Ok(answer) => return Some(Ok(answer)),
                Err(e) if answered(&e) => return Some(Err(e)),
                Err(e) => {
                    tracing::debug!(%vm, error = %e, "guest agent not ready");
                    qga_done = true;
                }
            },
            else => return None,
        }
    }
}

/// Where a guest with the QEMU guest agent (and no drover channel) keeps its marker: on its root
/// file system, written with `guest-exec` and synced.
const GUEST_MARKER: &str = "/var/lib/drover/marker";
const READ_MARKER: &str = "exec cat /var/lib/drover/marker";
const WRITE_MARKER: &str = "mkdir -p /var/lib/drover && cat > /var/lib/drover/marker.tmp && sync /var/lib/drover/marker.tmp \
                            && mv /var/lib/drover/marker.tmp /var/lib/drover/marker && sync /var/lib/drover";

/// One try at writing the marker, on drover's channel and through the QEMU guest agent at once
/// (a guest has one or the other): the first that answers, or `None` when neither did.
async fn write_marker_once(
    paths: &VmPaths,
    vm: Uuid,
    request: &str,
    marker: &str,
    attempt: Duration,
) -> Option<HvResult<()>> {
    let drover = QemuDriver::agent_exchange(paths, request, parse_write_reply);
    let qga = async {
        let mut agent = drover_qemu::qga::GuestAgent::connect(&paths.qga, attempt).await?;
        let out = agent.run_shell(WRITE_MARKER, Some(marker.as_bytes()), WRITE_MARKER_TIMEOUT).await?;
        if out.success() {
            Ok(())
        } else {
            Err(HvError::GuestChannel(format!(
                "writing {GUEST_MARKER} in the guest failed ({:?}): {}",
                out.exit_code,
                out.stderr_text().chars().take(500).collect::<String>()
            )))
        }
    };
    // The guest agent answered and the write failed: that is the answer.
    first_answer(vm, drover, qga, |e| matches!(e, HvError::GuestChannel(_))).await
}

/// The most addresses a heartbeat carries (the guest chooses how many it reports).
const MAX_GUEST_ADDRESSES: usize = 32;

/// The addresses of a guest's interfaces that reach beyond it: not loopback, not link-local,
/// and only what parses as an IP address (the guest is not trusted to send one).
pub(crate) fn guest_addresses(interfaces: &[drover_qemu::qga::GuestInterface]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in interfaces.iter().flat_map(|i| &i.ip_addresses) {
        let Ok(ip) = a.address.parse::<std::net::IpAddr>() else { continue };
        let link_local = match ip {
            std::net::IpAddr::V4(v4) => v4.is_link_local(),
            std::net::IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        if ip.is_loopback() || ip.is_unspecified() || link_local || out.contains(&ip.to_string()) {
            continue;
        }
        out.push(ip.to_string());
        if out.len() == MAX_GUEST_ADDRESSES {
            break;
        }
    }
    out
}

/// `pong <uptime> <marker-hex or ->` → Heartbeat. An empty hex field is an empty marker.
pub(crate) fn parse_pong(line: &str) -> Option<HvResult<Heartbeat>> {
    let rest = line.strip_prefix("pong ")?;
    let mut fields = rest.splitn(2, ' ');
    let uptime = fields.next().unwrap_or("");
    let marker = fields.next();
    let parsed = (|| {
        let uptime_secs: f64 = uptime.parse().map_err(|_| HvError::GuestChannel(format!("bad uptime in {line:?}")))?;
        let marker = match marker {
            None => {
                return Err(HvError::GuestChannel(format!("no marker field in {line:?}")));
            }
            Some("-") => None,
            Some(hex) => {
                let bytes =
                    hex_decode(hex).ok_or_else(|| HvError::GuestChannel(format!("bad marker hex in {line:?}")))?;
                Some(String::from_utf8_lossy(&bytes).into_owned())
            }
        };
        Ok(Heartbeat { uptime_secs, marker, addresses: Vec::new() })
    })();
    Some(parsed)
}

/// `ok` or `err <reason>` (a refusal from the guest, final); anything else is skipped.
pub(crate) fn parse_write_reply(line: &str) -> Option<HvResult<()>> {
    if line == "ok" {
        Some(Ok(()))
    } else {
        line.strip_prefix("err ")
            .map(|reason| Err(HvError::GuestChannel(format!("guest refused the marker write: {reason}"))))
    }
}

pub(crate) fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect()
}

/// Change tracking through the VM's QMP (live) and `qemu-img` + `qemu-storage-daemon` (offline):
/// see [`crate::tracking`].
#[async_trait]
impl crate::ChangeTracking for QemuDriver {
    async fn enable(&self, vm: Uuid, disk: usize, bitmap: &str) -> HvResult<()> {
        tracking::enable_tracking(self, vm, disk, bitmap).await
    }
    async fn state(&self, vm: Uuid, disk: usize) -> HvResult<Vec<tracking::BitmapState>> {
        tracking::bitmap_state(self, vm, disk).await
    }
    async fn remove(&self, vm: Uuid, disk: usize, bitmap: &str) -> HvResult<()> {
        tracking::remove_tracking(self, vm, disk, bitmap).await
    }
    async fn cut_begin(
        &self,
        vm: Uuid,
        disk: usize,
        current: &str,
        next: &str,
        export_dir: &Path,
    ) -> HvResult<tracking::CycleExport> {
        tracking::begin_cycle(self, vm, disk, current, next, export_dir).await
    }
    async fn cut_end(&self, cut: &tracking::CycleExport, success: bool) -> HvResult<()> {
        tracking::end_cycle(self, cut, success).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DiskSpec, NicSpec};

    #[test]
    fn a_guests_addresses_are_the_ones_that_reach_beyond_it() {
        use drover_qemu::qga::{GuestInterface, GuestIpAddress};
        let ip = |a: &str, prefix| GuestIpAddress { kind: "ipv4".into(), address: a.into(), prefix };
        let interfaces = vec![
            GuestInterface {
                name: "lo".into(),
                hardware_address: None,
                ip_addresses: vec![ip("127.0.0.1", 8), ip("::1", 128)],
            },
            GuestInterface {
                name: "ens3".into(),
                hardware_address: Some("52:54:00:12:34:56".into()),
                ip_addresses: vec![ip("10.0.2.15", 24), ip("fe80::5054:ff:fe12:3456", 64), ip("169.254.1.2", 16)],
            },
            GuestInterface {
                name: "evil".into(),
                hardware_address: None,
                ip_addresses: vec![ip("not an address; rm -rf /", 8), ip("10.0.2.15", 24), ip("2001:db8::7", 64)],
            },
        ];
        assert_eq!(guest_addresses(&interfaces), vec!["10.0.2.15".to_string(), "2001:db8::7".to_string()]);
        let many = GuestInterface {
            name: "many".into(),
            hardware_address: None,
            ip_addresses: (0..1000).map(|i| ip(&format!("10.1.{}.{}", i / 250, i % 250 + 1), 24)).collect(),
        };
        assert_eq!(guest_addresses(&[many]).len(), MAX_GUEST_ADDRESSES, "a guest cannot make it carry more");
    }

    #[test]
    fn pong_lines() {
        let hb = parse_pong("pong 4.19 -").unwrap().unwrap();
        assert_eq!(hb, Heartbeat { uptime_secs: 4.19, marker: None, addresses: vec![] });
        let hb = parse_pong("pong 12.5 68656c6c6f").unwrap().unwrap();
        assert_eq!(hb.marker.as_deref(), Some("hello"));
        assert_eq!(parse_pong("pong 1.0 ").unwrap().unwrap().marker.as_deref(), Some(""));
        assert!(parse_pong("ok").is_none());
        assert!(parse_pong("pong x -").unwrap().is_err());
        assert!(parse_pong("pong 1.0").unwrap().is_err());
        assert!(parse_pong("pong 1.0 6").unwrap().is_err());
        assert!(parse_pong("pong 1.0 zz").unwrap().is_err());
    }

    #[test]
    fn write_replies() {
        assert!(parse_write_reply("ok").unwrap().is_ok());
        assert!(matches!(parse_write_reply("err no-data-disk"), Some(Err(HvError::GuestChannel(_)))));
        assert!(parse_write_reply("pong 1 -").is_none());
    }

    #[test]
    fn hex_round_trip() {
        let s = "marker: ünïcode, spaces\tand tabs";
        assert_eq!(hex_decode(&hex_encode(s.as_bytes())).unwrap(), s.as_bytes());
        assert_eq!(hex_encode(b""), "");
        assert_eq!(hex_decode("").unwrap(), b"");
    }

    #[test]
    fn macs() {
        assert!(is_mac("52:54:00:12:34:56"));
        assert!(!is_mac("52:54:00:12:34"));
        assert!(!is_mac("52:54:00:12:34:5g"));
    }

    #[test]
    fn command_line_golden() {
        let id = Uuid::parse_str("6f1c1c9e-0000-4000-8000-000000000001").unwrap();
        let spec = VmSpec {
            id,
            name: "web,1".into(),
            vcpus: 2,
            memory_mib: 96,
            disks: vec![DiskSpec { path: "/images/a.qcow2".into() }, DiskSpec { path: "/images/b,c.qcow2".into() }],
            nics: vec![
                NicSpec { network: "lan".into(), mac: "52:54:00:00:00:01".into(), no_uplink: false },
                NicSpec { network: "dmz".into(), mac: "52:54:00:00:00:02".into(), no_uplink: false },
            ],
            boot: BootSpec {
                kernel: Some("/g/vmlinux".into()),
                initrd: Some("/g/initramfs.img".into()),
                cmdline: Some("console=ttyS0 quiet".into()),
                firmware: Default::default(),
            },
            hardware: Default::default(),
        };
        let paths = VmPaths::new(Path::new("/run/drover"), id);
        let bridges = BTreeMap::from([("dmz".to_owned(), "br-dmz".to_owned())]);
        let args = qemu_args(&spec, &paths, ResolvedAccel::Tcg, &bridges).unwrap();
        let line = args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
        let d = "/run/drover/6f1c1c9e-0000-4000-8000-000000000001";
        let expected = format!(
            "-name guest=web,,1,process=drover-qemu -uuid {id} -daemonize -pidfile {d}/qemu.pid \
             -nodefaults -no-user-config -display none -machine pc -accel tcg -m 96M -smp 2 \
             -qmp unix:{d}/qmp.sock,server=on,wait=off -chardev file,id=serial0,path={d}/console.log \
             -serial chardev:serial0 -device virtio-serial-pci,id=vser0 \
             -chardev socket,id=agent,path={d}/agent.sock,server=on,wait=off \
             -device virtserialport,bus=vser0.0,chardev=agent,name=org.drover.agent \
             -chardev socket,id=qga,path={d}/qga.sock,server=on,wait=off \
             -device virtserialport,bus=vser0.0,chardev=qga,name=org.qemu.guest_agent.0 \
             -blockdev driver=file,node-name=file0,filename=/images/a.qcow2 \
             -blockdev driver=qcow2,node-name=disk0,file=file0,discard=unmap \
             -device virtio-blk-pci,drive=disk0,id=vblk0 \
             -blockdev driver=file,node-name=file1,filename=/images/b,,c.qcow2 \
             -blockdev driver=qcow2,node-name=disk1,file=file1,discard=unmap \
             -device virtio-blk-pci,drive=disk1,id=vblk1 \
             -netdev user,id=net0,restrict=on -device virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01,id=nic0 \
             -netdev bridge,id=net1,br=br-dmz -device virtio-net-pci,netdev=net1,mac=52:54:00:00:00:02,id=nic1 \
             -kernel /g/vmlinux -initrd /g/initramfs.img -append console=ttyS0 quiet"
        );
        assert_eq!(line, expected);

        let kvm = qemu_args(&spec, &paths, ResolvedAccel::Kvm, &BTreeMap::new()).unwrap();
        let kvm = kvm.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
        assert!(kvm.contains("-accel kvm -cpu host"));
        assert!(kvm.contains("-netdev user,id=net1,restrict=on"));

        assert_eq!(user_netdev(&spec, &bridges).as_deref(), Some("net0"));
        let lan_bridged = BTreeMap::from([("lan".to_owned(), "br0".to_owned())]);
        assert_eq!(user_netdev(&spec, &lan_bridged).as_deref(), Some("net1"));
        let all_bridged = BTreeMap::from([("lan".to_owned(), "br0".to_owned()), ("dmz".to_owned(), "br1".to_owned())]);
        assert_eq!(user_netdev(&spec, &all_bridged), None);

        // A NIC with no uplink is never bridged.
        let mut isolated = spec.clone();
        isolated.nics[1].no_uplink = true;
        let line = qemu_args(&isolated, &paths, ResolvedAccel::Tcg, &bridges).unwrap();
        let line = line.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
        assert!(line.contains("-netdev user,id=net1,restrict=on"), "{line}");
        assert_eq!(user_netdev(&isolated, &all_bridged).as_deref(), Some("net1"));
    }

    #[test]
    fn disk_boot_without_kernel_sets_bootindex() {
        let id = Uuid::new_v4();
        let spec = VmSpec {
            id,
            name: "vm".into(),
            vcpus: 1,
            memory_mib: 256,
            disks: vec![DiskSpec { path: "/images/a.qcow2".into() }],
            nics: vec![],
            boot: BootSpec { kernel: None, initrd: None, cmdline: None, firmware: Default::default() },
            hardware: Default::default(),
        };
        let args = qemu_args(&spec, &VmPaths::new(Path::new("/r"), id), ResolvedAccel::Tcg, &BTreeMap::new()).unwrap();
        assert!(args.iter().any(|a| a == "virtio-blk-pci,drive=disk0,id=vblk0,bootindex=0"));
        assert!(!args.iter().any(|a| a == "-kernel"));
    }

    /// Another guest's hardware, as a replica of an imported domain has it: the machine type,
    /// each disk on its bus (the first one booting), each NIC of its model.
    #[test]
    fn a_guests_own_hardware_is_what_qemu_gets() {
        let id = Uuid::new_v4();
        let disk = |i: usize| DiskSpec { path: format!("/images/{i}.qcow2").into() };
        let nic = |i: u8| NicSpec { network: "n".into(), mac: format!("52:54:00:00:00:0{i}"), no_uplink: true };
        let mut spec = VmSpec {
            id,
            name: "vm".into(),
            vcpus: 1,
            memory_mib: 256,
            disks: (0..6).map(disk).collect(),
            nics: vec![nic(1), nic(2), nic(3)],
            boot: BootSpec { kernel: None, initrd: None, cmdline: None, firmware: Default::default() },
            hardware: crate::Hardware {
                machine: crate::Machine::Pc,
                disk_buses: vec![
                    DiskBus::Sata,
                    DiskBus::Virtio,
                    DiskBus::Scsi,
                    DiskBus::Ide,
                    DiskBus::Ide,
                    DiskBus::Sata,
                ],
                nic_models: vec![NicModel::E1000, NicModel::Rtl8139],
            },
        };
        let paths = VmPaths::new(Path::new("/r"), id);
        let line = |spec: &VmSpec| {
            let args = qemu_args(spec, &paths, ResolvedAccel::Tcg, &BTreeMap::new())?;
            Ok::<_, HvError>(args.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" "))
        };
        let l = line(&spec).unwrap();
        for part in [
            "-machine pc ",
            "-device ahci,id=ahci0 -device virtio-scsi-pci,id=scsi0 ",
            "-device ide-hd,drive=disk0,bus=ahci0.0,id=sata0,bootindex=0 ",
            "-device virtio-blk-pci,drive=disk1,id=vblk1 ",
            "-device scsi-hd,drive=disk2,bus=scsi0.0,id=scsi2 ",
            "-device ide-hd,drive=disk3,bus=ide.0,unit=0,id=ide3 ",
            "-device ide-hd,drive=disk4,bus=ide.0,unit=1,id=ide4 ",
            "-device ide-hd,drive=disk5,bus=ahci0.1,id=sata5 ",
            "-device e1000,netdev=net0,mac=52:54:00:00:00:01,id=nic0 ",
            "-device rtl8139,netdev=net1,mac=52:54:00:00:00:02,id=nic1 ",
            "-device virtio-net-pci,netdev=net2,mac=52:54:00:00:00:03,id=nic2",
        ] {
            assert!(l.contains(part), "{part:?} in {l}");
        }
        // q35 has no IDE channels.
        spec.hardware.machine = crate::Machine::Q35;
        assert!(matches!(line(&spec), Err(HvError::InvalidSpec(m)) if m.contains("no IDE")));
        spec.hardware.disk_buses.retain(|b| *b != DiskBus::Ide);
        assert!(line(&spec).unwrap().contains("-machine q35 "));
    }

    #[test]
    fn specs_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.qcow2");
        std::fs::write(&disk, b"").unwrap();
        let ok = VmSpec {
            id: Uuid::new_v4(),
            name: "vm".into(),
            vcpus: 1,
            memory_mib: 96,
            disks: vec![DiskSpec { path: disk }],
            nics: vec![NicSpec { network: "n".into(), mac: "52:54:00:00:00:01".into(), no_uplink: false }],
            boot: BootSpec { kernel: None, initrd: None, cmdline: None, firmware: Default::default() },
            hardware: Default::default(),
        };
        validate_spec(&ok).unwrap();
        let bad = |f: &dyn Fn(&mut VmSpec)| {
            let mut s = ok.clone();
            f(&mut s);
            assert!(matches!(validate_spec(&s), Err(HvError::InvalidSpec(_))));
        };
        bad(&|s| s.vcpus = 0);
        bad(&|s| s.memory_mib = 1);
        bad(&|s| s.disks[0].path = "relative.qcow2".into());
        bad(&|s| s.disks[0].path = "/nonexistent/x.qcow2".into());
        bad(&|s| s.nics[0].mac = "nope".into());
        bad(&|s| s.boot.cmdline = Some("x".into()));
    }

    #[tokio::test]
    async fn unknown_vm_is_off_and_stops_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let hv = QemuDriver::new(QemuConfig::new(dir.path()));
        let vm = Uuid::new_v4();
        assert_eq!(hv.kind(), "qemu");
        assert_eq!(hv.status(vm).await.unwrap(), PowerState::Off);
        hv.power_off(vm).await.unwrap();
        assert_eq!(hv.shutdown(vm, Duration::from_secs(1)).await.unwrap(), ShutdownOutcome::AlreadyOff);
        assert!(matches!(hv.wait_heartbeat(vm, Duration::from_secs(1)).await, Err(HvError::UnknownVm(_))));
        hv.forget(vm).await.unwrap();
        assert!(hv.reattach().await.unwrap().is_empty());
        assert!(!hv.vm_dir(vm).exists());
    }

    #[tokio::test]
    async fn a_vanished_process_is_died_unless_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let hv = QemuDriver::new(QemuConfig::new(dir.path()));
        let vm = Uuid::new_v4();
        let paths = hv.paths(vm);
        std::fs::create_dir_all(&paths.dir).unwrap();
        std::fs::write(&paths.spec, b"{}").unwrap();
        // A pidfile naming a live process that is not ours (pid reuse) does not count.
        std::fs::write(&paths.pidfile, std::process::id().to_string()).unwrap();
        assert_eq!(hv.status(vm).await.unwrap(), PowerState::Died);
        assert_eq!(hv.reattach().await.unwrap(), vec![(vm, PowerState::Died)]);
        hv.power_off(vm).await.unwrap();
        assert_eq!(hv.status(vm).await.unwrap(), PowerState::Off);
    }
}
