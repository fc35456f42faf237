//! `SimulatedHypervisor`: **a simulation for tests**, not a hypervisor.
//!
//! It keeps VMs in memory (a `Mutex<HashMap>`), never starts a process and never touches a disk
//! image, except that offline change tracking (of images nobody has open) is the real one, on the
//! real images the engine creates. It exists so the engine's sagas and reconcilers can be tested in milliseconds, with
//! faults injected on demand. [`Hypervisor::kind`] returns `"simulated"` so it is visible wherever
//! it is used; the product never falls back to it.
//!
//! What it models, because engine tests depend on it:
//! - power state per VM with the same idempotence rules as the QEMU driver (power off a stopped VM
//!   succeeds, power on a running VM leaves it running, status of an unknown VM is `Off`);
//! - the marker file, kept per **first disk path**, so it survives power cycles and `forget` like
//!   data on a real disk would, and tests can seed or read "disk" content with
//!   [`SimulatedHypervisor::set_disk_marker`] / [`SimulatedHypervisor::disk_marker`];
//! - a guest that needs time to boot ([`SimulatedHypervisor::set_heartbeat_delay`]), ignores the
//!   ACPI button ([`SimulatedHypervisor::set_ignore_acpi`]), or dies from outside
//!   ([`SimulatedHypervisor::crash`]);
//! - TCP ports a guest listens on: those named by `drover.listen=<port>,...` on the kernel
//!   command line, like the tiny guest, or set per VM with [`SimulatedHypervisor::set_open_ports`];
//!   a port check needs a NIC, like the QEMU driver's;
//! - a guest agent that freezes and thaws file systems ([`SimulatedHypervisor::set_guest_agent`],
//!   [`SimulatedHypervisor::frozen`]);
//! - one-shot failures of any operation ([`SimulatedHypervisor::fail_next`]).
//!
//! Time is measured with `tokio::time`, so tests may run with a paused clock (tokio `test-util`).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use uuid::Uuid;

use crate::{Heartbeat, HvError, HvResult, Hypervisor, PowerState, ShutdownOutcome, TcpPortState, VmSpec};

/// Names accepted by [`SimulatedHypervisor::fail_next`]: one per trait method.
pub const SIM_OPS: &[&str] = &[
    "power_on",
    "shutdown",
    "power_off",
    "status",
    "wait_heartbeat",
    "write_marker",
    "check_tcp_port",
    "forget",
    "reattach",
    "guest_freeze",
    "guest_thaw",
];

#[derive(Debug, Clone)]
struct SimVm {
    spec: VmSpec,
    state: PowerState,
    /// When the current boot started; `None` unless running or paused.
    booted_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct SimInner {
    vms: HashMap<Uuid, SimVm>,
    /// Marker content per disk image path (the first disk of a VM holds its marker).
    disk_markers: HashMap<PathBuf, String>,
    /// Pending injected failures: op name → number of upcoming calls that fail.
    failures: HashMap<&'static str, u32>,
    heartbeat_delay: Duration,
    ignore_acpi: bool,
    /// Calls per op, for tests that assert a step ran (or did not run) again.
    calls: HashMap<&'static str, u64>,
    /// Open TCP ports per VM, overriding the kernel command line's `drover.listen=`.
    open_ports: HashMap<Uuid, BTreeSet<u16>>,
    /// VMs whose simulated guest agent answers, and whether it holds their file systems frozen.
    guest_agents: HashMap<Uuid, bool>,
    /// The addresses a VM's guest reports in its heartbeats.
    guest_addresses: HashMap<Uuid, Vec<String>>,
    /// The host's networks, as [`SimulatedHypervisor::set_networks`] declared them.
    networks: Vec<drover_agent_api::HostNetwork>,
    /// Every spec a VM was started with, kept after it is forgotten.
    started: HashMap<Uuid, Vec<VmSpec>>,
}

/// In-memory hypervisor for tests. See the module documentation.
#[derive(Debug, Default)]
pub struct SimulatedHypervisor {
    inner: Mutex<SimInner>,
}

impl SimulatedHypervisor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares the host's networks (name, whether available), as `--network` does for a real
    /// driver.
    pub fn set_networks(&self, networks: &[(&str, bool)]) {
        self.lock().networks = networks
            .iter()
            .map(|(name, available)| drover_agent_api::HostNetwork {
                name: (*name).to_string(),
                target: format!("simulated network {name}"),
                available: *available,
                problem: (!available).then(|| "simulated: not available".to_string()),
            })
            .collect();
    }

    /// Makes the next call of `op` (one of [`SIM_OPS`]) fail with an injected error. Calling it
    /// `n` times makes the next `n` calls fail.
    ///
    /// # Panics
    /// On an unknown op name, so a typo in a test does not silently inject nothing.
    pub fn fail_next(&self, op: &'static str) {
        assert!(SIM_OPS.contains(&op), "unknown simulated op {op:?}; expected one of {SIM_OPS:?}");
        *self.lock().failures.entry(op).or_default() += 1;
    }

    /// Removes every pending injected failure.
    pub fn clear_failures(&self) {
        self.lock().failures.clear();
    }

    /// Gives the VM's guest a guest agent that freezes and thaws its file systems (or takes it
    /// away). Without one, a freeze answers `frozen: false`, like a guest without `qemu-ga`.
    pub fn set_guest_agent(&self, vm: Uuid, present: bool) {
        let mut inner = self.lock();
        if present {
            inner.guest_agents.entry(vm).or_insert(false);
        } else {
            inner.guest_agents.remove(&vm);
        }
    }

    /// The addresses the VM's guest reports in its heartbeats (as a guest agent would).
    pub fn set_guest_addresses(&self, vm: Uuid, addresses: Vec<String>) {
        self.lock().guest_addresses.insert(vm, addresses);
    }

    /// Whether the VM's guest agent holds its file systems frozen.
    pub fn frozen(&self, vm: Uuid) -> bool {
        self.lock().guest_agents.get(&vm).copied().unwrap_or(false)
    }

    /// How long after power-on the guest starts answering heartbeats (default: at once).
    pub fn set_heartbeat_delay(&self, delay: Duration) {
        self.lock().heartbeat_delay = delay;
    }

    /// When set, `shutdown` behaves like a guest that ignores the ACPI power button: it waits the
    /// whole timeout and then powers the VM off (`ForcedOff`).
    pub fn set_ignore_acpi(&self, ignore: bool) {
        self.lock().ignore_acpi = ignore;
    }

    /// Simulates the VM's process dying without drover asking (crash, OOM, `kill -9`).
    /// The VM reports [`PowerState::Died`] afterwards. Returns false if it was not running.
    pub fn crash(&self, vm: Uuid) -> bool {
        let mut inner = self.lock();
        match inner.vms.get_mut(&vm) {
            Some(v) if matches!(v.state, PowerState::Running | PowerState::Paused) => {
                v.state = PowerState::Died;
                v.booted_at = None;
                // A guest that stops is no longer frozen: the next boot starts thawed.
                if let Some(frozen) = inner.guest_agents.get_mut(&vm) {
                    *frozen = false;
                }
                true
            }
            _ => false,
        }
    }

    /// Simulates a pause (QMP `stop`). Returns false if the VM was not running.
    pub fn pause(&self, vm: Uuid) -> bool {
        let mut inner = self.lock();
        match inner.vms.get_mut(&vm) {
            Some(v) if v.state == PowerState::Running => {
                v.state = PowerState::Paused;
                true
            }
            _ => false,
        }
    }

    /// Declares the TCP ports the VM's guest listens on, instead of those its kernel command line
    /// names with `drover.listen=`. Kept across power cycles.
    pub fn set_open_ports(&self, vm: Uuid, ports: &[u16]) {
        self.lock().open_ports.insert(vm, ports.iter().copied().collect());
    }

    /// The marker stored on a simulated disk, as the guest would read it.
    pub fn disk_marker(&self, disk: &Path) -> Option<String> {
        self.lock().disk_markers.get(disk).cloned()
    }

    /// Seeds (or with `None` clears) the marker on a simulated disk, e.g. to model data that
    /// replication copied to a replica image.
    pub fn set_disk_marker(&self, disk: &Path, marker: Option<&str>) {
        let mut inner = self.lock();
        match marker {
            Some(m) => inner.disk_markers.insert(disk.to_path_buf(), m.to_owned()),
            None => inner.disk_markers.remove(disk),
        };
    }

    /// The spec a VM was last powered on with, if the driver knows the VM.
    pub fn spec(&self, vm: Uuid) -> Option<VmSpec> {
        self.lock().vms.get(&vm).map(|v| v.spec.clone())
    }

    /// Every spec `vm` was started with (from off), oldest first; kept after it is forgotten.
    pub fn started_with(&self, vm: Uuid) -> Vec<VmSpec> {
        self.lock().started.get(&vm).cloned().unwrap_or_default()
    }

    /// How many times `op` was called (including calls that failed by injection).
    pub fn calls(&self, op: &'static str) -> u64 {
        self.lock().calls.get(op).copied().unwrap_or(0)
    }

    /// The mutex only guards plain data, so a panic in another test thread cannot leave it
    /// inconsistent; recover from poisoning instead of cascading the panic.
    fn lock(&self) -> MutexGuard<'_, SimInner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts the call and consumes one injected failure for `op`, if any.
    fn enter(&self, op: &'static str) -> HvResult<()> {
        let mut inner = self.lock();
        *inner.calls.entry(op).or_default() += 1;
        if let Some(n) = inner.failures.get_mut(op)
            && *n > 0
        {
            *n -= 1;
            return Err(HvError::Tool {
                program: "simulated-hypervisor".into(),
                stderr: format!("injected failure in {op}"),
            });
        }
        Ok(())
    }
}

/// The ports `drover.listen=22,80` on the kernel command line names, as the tiny guest reads it.
fn listen_ports(spec: &VmSpec) -> BTreeSet<u16> {
    let cmdline = spec.boot.cmdline.as_deref().unwrap_or_default();
    cmdline
        .split_whitespace()
        .filter_map(|arg| arg.strip_prefix("drover.listen="))
        .flat_map(|ports| ports.split(','))
        .filter_map(|port| port.parse().ok())
        .collect()
}

fn first_disk(spec: &VmSpec) -> Option<PathBuf> {
    spec.disks.first().map(|d| d.path.clone())
}

#[async_trait]
impl Hypervisor for SimulatedHypervisor {
    fn change_tracking(&self) -> Option<&dyn crate::ChangeTracking> {
        Some(self)
    }

    fn kind(&self) -> &'static str {
        "simulated"
    }

    async fn networks(&self) -> HvResult<Vec<drover_agent_api::HostNetwork>> {
        Ok(self.lock().networks.clone())
    }

    async fn power_on(&self, spec: &VmSpec) -> HvResult<()> {
        self.enter("power_on")?;
        if spec.memory_mib == 0 || spec.vcpus == 0 {
            return Err(HvError::InvalidSpec("vcpus and memory_mib must be positive".into()));
        }
        let mut inner = self.lock();
        let now = Instant::now();
        match inner.vms.get_mut(&spec.id) {
            Some(v) if matches!(v.state, PowerState::Running | PowerState::Paused) => {}
            Some(v) => {
                v.spec = spec.clone();
                v.state = PowerState::Running;
                v.booted_at = Some(now);
                inner.started.entry(spec.id).or_default().push(spec.clone());
            }
            None => {
                inner
                    .vms
                    .insert(spec.id, SimVm { spec: spec.clone(), state: PowerState::Running, booted_at: Some(now) });
                inner.started.entry(spec.id).or_default().push(spec.clone());
            }
        }
        Ok(())
    }

    async fn shutdown(&self, vm: Uuid, timeout: Duration) -> HvResult<ShutdownOutcome> {
        self.enter("shutdown")?;
        let ignore_acpi = {
            let inner = self.lock();
            match inner.vms.get(&vm) {
                Some(v) if matches!(v.state, PowerState::Running | PowerState::Paused) => {}
                _ => return Ok(ShutdownOutcome::AlreadyOff),
            }
            inner.ignore_acpi
        };
        if ignore_acpi {
            tokio::time::sleep(timeout).await;
        }
        let mut inner = self.lock();
        if let Some(v) = inner.vms.get_mut(&vm) {
            // Re-check: the VM may have been crashed or powered off while we slept.
            if !matches!(v.state, PowerState::Running | PowerState::Paused) {
                return Ok(ShutdownOutcome::AlreadyOff);
            }
            v.state = PowerState::Off;
            v.booted_at = None;
        }
        Ok(if ignore_acpi { ShutdownOutcome::ForcedOff } else { ShutdownOutcome::Graceful })
    }

    async fn power_off(&self, vm: Uuid) -> HvResult<()> {
        self.enter("power_off")?;
        let mut inner = self.lock();
        if let Some(v) = inner.vms.get_mut(&vm) {
            v.state = PowerState::Off;
            v.booted_at = None;
        }
        if let Some(frozen) = inner.guest_agents.get_mut(&vm) {
            *frozen = false;
        }
        Ok(())
    }

    async fn status(&self, vm: Uuid) -> HvResult<PowerState> {
        self.enter("status")?;
        Ok(self.lock().vms.get(&vm).map_or(PowerState::Off, |v| v.state))
    }

    async fn guest_freeze(&self, vm: Uuid) -> HvResult<crate::FreezeOutcome> {
        self.enter("guest_freeze")?;
        let mut inner = self.lock();
        if !matches!(inner.vms.get(&vm).map(|v| v.state), Some(PowerState::Running)) {
            return Err(HvError::NotRunning(vm));
        }
        let outcome = |frozen, reason: &str| crate::FreezeOutcome {
            frozen,
            filesystems: u64::from(frozen),
            reason: reason.to_string(),
        };
        match inner.guest_agents.get_mut(&vm) {
            None => Ok(outcome(false, "the simulated guest has no guest agent")),
            Some(true) => Ok(outcome(false, "the guest's file systems are already frozen")),
            Some(frozen) => {
                *frozen = true;
                Ok(outcome(true, "frozen by the simulated guest agent"))
            }
        }
    }

    async fn guest_thaw(&self, vm: Uuid) -> HvResult<u64> {
        self.enter("guest_thaw")?;
        let mut inner = self.lock();
        match inner.guest_agents.get_mut(&vm) {
            Some(frozen) if *frozen => {
                *frozen = false;
                Ok(1)
            }
            _ => Ok(0),
        }
    }

    async fn wait_heartbeat(&self, vm: Uuid, timeout: Duration) -> HvResult<Heartbeat> {
        self.enter("wait_heartbeat")?;
        let deadline = Instant::now() + timeout;
        loop {
            let ready_at = {
                let inner = self.lock();
                let v = inner.vms.get(&vm).ok_or(HvError::UnknownVm(vm))?;
                // A paused guest does not answer, like a real one; keep waiting for a resume.
                match (v.state, v.booted_at) {
                    (PowerState::Running, Some(booted)) => {
                        let ready_at = booted + inner.heartbeat_delay;
                        if Instant::now() >= ready_at {
                            let marker = first_disk(&v.spec).and_then(|d| inner.disk_markers.get(&d).cloned());
                            return Ok(Heartbeat {
                                uptime_secs: booted.elapsed().as_secs_f64(),
                                marker,
                                addresses: inner.guest_addresses.get(&vm).cloned().unwrap_or_default(),
                            });
                        }
                        ready_at
                    }
                    (PowerState::Paused, _) => Instant::now() + Duration::from_millis(10),
                    _ => return Err(HvError::NotRunning(vm)),
                }
            };
            if ready_at > deadline {
                tokio::time::sleep_until(deadline).await;
                return Err(HvError::Timeout(timeout, "guest heartbeat"));
            }
            tokio::time::sleep_until(ready_at).await;
        }
    }

    async fn write_marker(&self, vm: Uuid, marker: &str) -> HvResult<()> {
        self.enter("write_marker")?;
        let mut inner = self.lock();
        let v = inner.vms.get(&vm).ok_or(HvError::UnknownVm(vm))?;
        if v.state != PowerState::Running {
            return Err(HvError::NotRunning(vm));
        }
        let disk = first_disk(&v.spec)
            .ok_or_else(|| HvError::GuestChannel("the VM has no data disk for the marker".into()))?;
        inner.disk_markers.insert(disk, marker.to_owned());
        Ok(())
    }

    async fn check_tcp_port(&self, vm: Uuid, guest_port: u16, timeout: Duration) -> HvResult<TcpPortState> {
        self.enter("check_tcp_port")?;
        let deadline = Instant::now() + timeout;
        loop {
            let state = {
                let inner = self.lock();
                let v = inner.vms.get(&vm).ok_or(HvError::UnknownVm(vm))?;
                if !matches!(v.state, PowerState::Running | PowerState::Paused) {
                    return Err(HvError::NotRunning(vm));
                }
                if v.spec.nics.is_empty() {
                    return Err(HvError::InvalidSpec(format!("VM {} has no NIC to check a port through", v.spec.name)));
                }
                match (v.state, v.booted_at) {
                    (PowerState::Running, Some(booted)) if Instant::now() >= booted + inner.heartbeat_delay => {
                        let open = match inner.open_ports.get(&vm) {
                            Some(ports) => ports.contains(&guest_port),
                            None => listen_ports(&v.spec).contains(&guest_port),
                        };
                        if open { TcpPortState::Open } else { TcpPortState::Closed }
                    }
                    // Booting or paused: the guest does not answer yet.
                    _ => TcpPortState::NoAnswer,
                }
            };
            if state == TcpPortState::Open || Instant::now() >= deadline {
                return Ok(state);
            }
            tokio::time::sleep(Duration::from_millis(10).min(deadline - Instant::now())).await;
        }
    }

    async fn forget(&self, vm: Uuid) -> HvResult<()> {
        self.enter("forget")?;
        // Disk content (markers) stays: disks are the engine's to delete.
        self.lock().vms.remove(&vm);
        Ok(())
    }

    async fn reattach(&self) -> HvResult<Vec<(Uuid, PowerState)>> {
        self.enter("reattach")?;
        let mut all: Vec<_> = self.lock().vms.iter().map(|(id, v)| (*id, v.state)).collect();
        all.sort_by_key(|(id, _)| *id);
        Ok(all)
    }
}

/// The simulated VMs never run a QEMU, so there is nothing to track live: a live call is refused
/// (a running simulated VM is replicated whole or by hash-compare). Their disks are real qcow2
/// images, though, and offline tracking works on the images with the real tools, exactly as for
/// the QEMU driver.
#[async_trait]
impl crate::ChangeTracking for SimulatedHypervisor {
    async fn enable(&self, vm: Uuid, _: usize, _: &str) -> HvResult<()> {
        Err(no_live_tracking(vm))
    }
    async fn state(&self, vm: Uuid, _: usize) -> HvResult<Vec<crate::tracking::BitmapState>> {
        Err(no_live_tracking(vm))
    }
    async fn remove(&self, vm: Uuid, _: usize, _: &str) -> HvResult<()> {
        Err(no_live_tracking(vm))
    }
    async fn cut_begin(
        &self,
        vm: Uuid,
        _: usize,
        _: &str,
        _: &str,
        _: &Path,
    ) -> HvResult<crate::tracking::CycleExport> {
        Err(no_live_tracking(vm))
    }
    async fn cut_end(&self, cut: &crate::tracking::CycleExport, _: bool) -> HvResult<()> {
        Err(no_live_tracking(cut.vm))
    }
}

fn no_live_tracking(vm: Uuid) -> HvError {
    HvError::Unsupported(format!("VM {vm}: the simulated hypervisor has no live change tracking"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BootSpec, DiskSpec};

    fn spec(disk: &str) -> VmSpec {
        VmSpec {
            id: Uuid::new_v4(),
            name: "vm".into(),
            vcpus: 1,
            memory_mib: 96,
            disks: vec![DiskSpec { path: PathBuf::from(disk) }],
            nics: vec![],
            boot: BootSpec { kernel: None, initrd: None, cmdline: None, firmware: Default::default() },
            hardware: Default::default(),
        }
    }

    #[tokio::test]
    async fn lifecycle_is_idempotent() {
        let hv = SimulatedHypervisor::new();
        let s = spec("/d/a.qcow2");
        assert_eq!(hv.kind(), "simulated");
        assert_eq!(hv.status(s.id).await.unwrap(), PowerState::Off);
        hv.power_off(s.id).await.unwrap();
        assert_eq!(hv.shutdown(s.id, Duration::from_secs(1)).await.unwrap(), ShutdownOutcome::AlreadyOff);
        hv.power_on(&s).await.unwrap();
        hv.power_on(&s).await.unwrap();
        assert_eq!(hv.status(s.id).await.unwrap(), PowerState::Running);
        assert_eq!(hv.shutdown(s.id, Duration::from_secs(1)).await.unwrap(), ShutdownOutcome::Graceful);
        assert_eq!(hv.status(s.id).await.unwrap(), PowerState::Off);
        hv.power_off(s.id).await.unwrap();
        hv.forget(s.id).await.unwrap();
        hv.forget(s.id).await.unwrap();
        assert!(hv.reattach().await.unwrap().is_empty());
        assert_eq!(hv.calls("forget"), 2);
    }

    #[tokio::test]
    async fn marker_persists_on_the_disk_across_power_cycles_and_forget() {
        let hv = SimulatedHypervisor::new();
        let s = spec("/d/b.qcow2");
        hv.power_on(&s).await.unwrap();
        assert_eq!(hv.wait_heartbeat(s.id, Duration::from_secs(1)).await.unwrap().marker, None);
        hv.write_marker(s.id, "m1").await.unwrap();
        hv.power_off(s.id).await.unwrap();
        assert!(matches!(hv.write_marker(s.id, "x").await, Err(HvError::NotRunning(_))));
        hv.forget(s.id).await.unwrap();
        hv.power_on(&s).await.unwrap();
        let hb = hv.wait_heartbeat(s.id, Duration::from_secs(1)).await.unwrap();
        assert_eq!(hb.marker.as_deref(), Some("m1"));
        assert_eq!(hv.disk_marker(Path::new("/d/b.qcow2")).as_deref(), Some("m1"));
    }

    #[tokio::test]
    async fn injected_failures_are_one_shot() {
        let hv = SimulatedHypervisor::new();
        let s = spec("/d/c.qcow2");
        hv.fail_next("power_on");
        hv.fail_next("power_on");
        assert!(hv.power_on(&s).await.is_err());
        assert!(hv.power_on(&s).await.is_err());
        hv.power_on(&s).await.unwrap();
        assert_eq!(hv.calls("power_on"), 3);
    }

    #[test]
    #[should_panic(expected = "unknown simulated op")]
    fn unknown_fault_name_panics() {
        SimulatedHypervisor::new().fail_next("powr_on");
    }

    #[tokio::test]
    async fn heartbeat_delay_and_timeout() {
        let hv = SimulatedHypervisor::new();
        hv.set_heartbeat_delay(Duration::from_millis(300));
        let s = spec("/d/d.qcow2");
        hv.power_on(&s).await.unwrap();
        assert!(matches!(hv.wait_heartbeat(s.id, Duration::from_millis(50)).await, Err(HvError::Timeout(..))));
        let hb = hv.wait_heartbeat(s.id, Duration::from_secs(10)).await.unwrap();
        assert!(hb.uptime_secs >= 0.3);
        assert!(matches!(hv.wait_heartbeat(Uuid::new_v4(), Duration::from_secs(1)).await, Err(HvError::UnknownVm(_))));
    }

    #[tokio::test]
    async fn tcp_ports_from_the_command_line_or_declared() {
        let hv = SimulatedHypervisor::new();
        let mut s = spec("/d/f.qcow2");
        let short = Duration::from_millis(30);
        hv.power_on(&s).await.unwrap();
        assert!(matches!(hv.check_tcp_port(s.id, 22, short).await, Err(HvError::InvalidSpec(_))), "no NIC");
        hv.power_off(s.id).await.unwrap();
        s.nics = vec![crate::NicSpec { network: "lan".into(), mac: "52:54:00:00:00:01".into(), no_uplink: false }];
        s.boot.cmdline = Some("console=ttyS0 drover.listen=22,80".into());
        assert!(matches!(hv.check_tcp_port(s.id, 22, short).await, Err(HvError::NotRunning(_))));
        hv.set_heartbeat_delay(Duration::from_millis(100));
        hv.power_on(&s).await.unwrap();
        assert_eq!(hv.check_tcp_port(s.id, 22, short).await.unwrap(), TcpPortState::NoAnswer, "still booting");
        assert_eq!(hv.check_tcp_port(s.id, 22, Duration::from_secs(5)).await.unwrap(), TcpPortState::Open);
        assert_eq!(hv.check_tcp_port(s.id, 80, short).await.unwrap(), TcpPortState::Open);
        assert_eq!(hv.check_tcp_port(s.id, 443, short).await.unwrap(), TcpPortState::Closed);
        hv.set_open_ports(s.id, &[443]);
        assert_eq!(hv.check_tcp_port(s.id, 443, short).await.unwrap(), TcpPortState::Open);
        assert_eq!(hv.check_tcp_port(s.id, 22, short).await.unwrap(), TcpPortState::Closed);
    }

    #[tokio::test]
    async fn ignored_acpi_forces_off_and_crash_is_died() {
        let hv = SimulatedHypervisor::new();
        let s = spec("/d/e.qcow2");
        hv.power_on(&s).await.unwrap();
        hv.set_ignore_acpi(true);
        assert_eq!(hv.shutdown(s.id, Duration::from_millis(20)).await.unwrap(), ShutdownOutcome::ForcedOff);
        hv.power_on(&s).await.unwrap();
        assert!(hv.crash(s.id));
        assert_eq!(hv.status(s.id).await.unwrap(), PowerState::Died);
        assert_eq!(hv.reattach().await.unwrap(), vec![(s.id, PowerState::Died)]);
        assert!(matches!(hv.wait_heartbeat(s.id, Duration::from_secs(1)).await, Err(HvError::NotRunning(_))));
        hv.power_on(&s).await.unwrap();
        assert_eq!(hv.status(s.id).await.unwrap(), PowerState::Running);
    }
}
