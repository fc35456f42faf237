//! The libvirt driver: VMs that are libvirt domains on the agent's host (`qemu:///system`), the
//! ones users already have. A VM's id is its domain's UUID; its disk `i` is the domain's `i`-th
//! `<disk device='disk'>`. drover starts, stops and tracks these domains but never redefines or
//! undefines one it did not define (a domain drover defined carries drover's element in its
//! `<metadata>`).
//!
//! # Change tracking: checkpoints and pull-mode backups
//! The engine's bitmap names are libvirt checkpoint names, each checkpoint tracking every
//! trackable disk of the domain (its bitmap in each disk's qcow2 has the same name). libvirt
//! (since 6.x) keeps every checkpoint's bitmap recording from its creation on, so a checkpoint
//! covers every write since it was made, whatever checkpoints came after it:
//! ```text
//!   enable       virDomainCheckpointCreateXML <name>, a bitmap on every disk
//!   cut_begin    the disk asks (JobLedger, <export_dir>/job.json); when every disk has asked:
//!                virDomainBackupBegin pull, unix socket <export_dir>/nbd.sock, export disk<i>
//!                  each since its own `current` (per-disk backupmode='incremental'),
//!                  exportbitmap drover-export, scratch <export_dir>/scratch-<target>.qcow2
//!                + checkpoint `next` over every disk, created at the same instant
//!   ... the data path reads qemu:dirty-bitmap:drover-export through each disk's export ...
//!   cut_end      the disk has ended; when every disk that asked has ended:
//!                virDomainAbortJob (how a pull job ends: libvirt calls it "canceled"), wait
//!                all succeeded: delete each `current` (their changes arrived; `next` records)
//!                any failed: delete `next` (each `current` still covers everything)
//! ```
//! The commit point is the checkpoint deletion. Before it, a rerun of cut_begin finds the job
//! and re-exports the disk; `next` without a job (drover or libvirt restarted) is deleted and the
//! cut made again. A failed transfer deletes `next`, so no change is ever skipped (libvirt itself
//! keeps the checkpoint of an "aborted" pull job). The engine cuts every disk of a VM before it
//! reads any (a cut that never got its job ends as failed, and commits nothing).
//!
//! # Broken bitmaps
//! When QEMU dies (`kill -9`, a host crash) the bitmaps in the image are left "in use" or are
//! missing, while libvirt still lists the checkpoints. [`ChangeTracking::state`] reads the
//! bitmaps QEMU really has (QMP `query-block` through libvirt, read-only; libvirt marks the
//! domain "tainted: custom-monitor" for it) and reports a checkpoint whose bitmap is missing or
//! inconsistent as inconsistent, and a `drover-*` bitmap libvirt has no checkpoint for as
//! inconsistent too (libvirt cannot back up from it): the engine then hash-compares that disk
//! and removes them, which deletes the checkpoint's metadata and the bitmap through QMP
//! `block-dirty-bitmap-remove` (libvirt cannot delete a broken checkpoint for real).
//!
//! Limits of this driver today: a shut-off domain is tracked through its images with QEMU's
//! tools (the provided `_offline` methods), and the next live cycle redefines the checkpoint of
//! the bitmap they left.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use drover_libvirt::xml::{self, DomainDescription};
use drover_libvirt::{DomainState, ErrorClass, Libvirt, LibvirtError, ffi, virt_err};
use drover_qemu::qsd::NbdEndpoint;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use tokio::time::Instant;
use uuid::Uuid;

use crate::qemu::{AGENT_CHANNEL, MAX_MARKER_BYTES};
use crate::tracking::{self, BitmapState, CycleExport};
use drover_agent_api::{HostDomain, HostDomainDisk, HostDomainNic, HostDomainState};

use crate::{
    ChangeTracking, FreezeOutcome, Heartbeat, HvError, HvResult, Hypervisor, PowerState, ShutdownOutcome, TcpPortState,
    VmSpec,
};

/// The libvirt network the NICs of replicas and test VMs without an uplink are on (see
/// [`LibvirtDriver::ensure_isolated_network`]).
pub const ISOLATED_NETWORK: &str = "drover-isolated";
/// The bitmap libvirt exports the changes since `current` under.
pub const EXPORT_BITMAP: &str = "drover-export";
/// How long one guest agent command may take (libvirt's own bound, in seconds).
const AGENT_COMMAND_SECS: i32 = 10;
const AGENT_ATTEMPT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(200);
/// Bound on waiting for an ended backup job to disappear.
const JOB_GONE_TIMEOUT: Duration = Duration::from_secs(30);
const WRITE_MARKER_TIMEOUT: Duration = Duration::from_secs(30);

/// The libvirt hypervisor driver. See the module documentation.
#[derive(Debug, Clone)]
pub struct LibvirtDriver {
    libvirt: Libvirt,
    /// Where the domains drover defines keep their console log and channel sockets.
    run_dir: PathBuf,
    /// The domains drover defines run under KVM (else TCG).
    kvm: bool,
    /// Held while a cut reads or changes a domain's [`JobLedger`].
    jobs: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// The networks the domains drover defines may be on: drover's name → libvirt network
    /// (`--network NAME=LIBVIRT_NETWORK`; a host bridge is a libvirt network with
    /// `<forward mode='bridge'/>`).
    networks: BTreeMap<String, String>,
}

fn lv(e: LibvirtError) -> HvError {
    match e.class {
        ErrorClass::NoDomain => HvError::InvalidSpec(format!("{}: no such domain ({})", e.what, e.message)),
        ErrorClass::Unsupported => HvError::Unsupported(e.to_string()),
        ErrorClass::CheckpointInconsistent => {
            HvError::BitmapUnusable { bitmap: String::new(), reason: format!("is unusable: {}", e.message) }
        }
        _ => HvError::Tool { program: "libvirt".into(), stderr: e.to_string() },
    }
}

impl LibvirtDriver {
    /// A driver for the libvirt daemon at `uri` (`qemu:///system`); the domains drover defines
    /// keep their files under `run_dir`. Nothing is connected yet.
    pub fn new(uri: impl Into<String>, run_dir: impl Into<PathBuf>) -> Self {
        LibvirtDriver {
            libvirt: Libvirt::new(uri),
            run_dir: run_dir.into(),
            kvm: false,
            jobs: Default::default(),
            networks: BTreeMap::new(),
        }
    }

    /// The networks the domains drover defines may be connected to: drover's name → libvirt
    /// network. Without any, every NIC of those domains is on [`ISOLATED_NETWORK`].
    pub fn set_networks(&mut self, networks: BTreeMap<String, String>) {
        self.networks = networks;
    }

    /// Runs the domains drover defines under KVM instead of TCG.
    pub fn set_kvm(&mut self, kvm: bool) {
        self.kvm = kvm;
    }

    /// The directory of a domain drover defines (console log, drover's channel).
    pub fn vm_dir(&self, vm: Uuid) -> PathBuf {
        self.run_dir.join(vm.to_string())
    }

    /// Defines (or redefines, while it is shut off) a domain of drover's own from `spec`: a
    /// replica or test VM. A NIC is on the libvirt network its (mapped) network names in
    /// [`LibvirtDriver::set_networks`] when that network is active; any other NIC (no uplink,
    /// a network not declared here, or not active) is on [`ISOLATED_NETWORK`]: the guest keeps
    /// its NIC, with its MAC, and reaches nothing. A request never names a libvirt network.
    async fn define_own(&self, spec: &VmSpec) -> HvResult<()> {
        let dir = self.vm_dir(spec.id);
        tokio::fs::create_dir_all(&dir).await.map_err(|e| HvError::io(format!("creating {}", dir.display()), e))?;
        let mut nics = Vec::new();
        for n in &spec.nics {
            let target = match self.networks.get(&n.network).filter(|_| !n.no_uplink) {
                Some(target) => {
                    let name = target.clone();
                    let active = self
                        .libvirt
                        .call("looking up a network", move |conn| {
                            Ok(drover_libvirt::virt::network::Network::lookup_by_name(conn, &name)
                                .and_then(|net| net.is_active())
                                .unwrap_or(false))
                        })
                        .await
                        .map_err(lv)?;
                    if !active {
                        tracing::warn!(vm = %spec.id, network = %n.network, libvirt_network = %target,
                            "NIC isolated: its libvirt network is not there or not active");
                    }
                    active.then(|| target.clone())
                }
                None => None,
            };
            let target = match target {
                Some(t) => t,
                None => {
                    self.ensure_isolated_network().await?;
                    ISOLATED_NETWORK.to_string()
                }
            };
            let model = spec.hardware.nic_model(nics.len()).to_string();
            nics.push(xml::NewNic { mac: n.mac.clone(), network: target, model });
        }
        let safe: String = spec
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .take(48)
            .collect();
        let new = xml::NewDomain {
            uuid: spec.id,
            name: format!("drover-{safe}-{}", &spec.id.simple().to_string()[..8]),
            domain_type: if self.kvm { "kvm" } else { "qemu" }.into(),
            memory_mib: spec.memory_mib,
            vcpus: spec.vcpus,
            kernel: spec.boot.kernel.clone(),
            initrd: spec.boot.initrd.clone(),
            cmdline: spec.boot.cmdline.clone(),
            uefi: spec.boot.firmware == crate::Firmware::Uefi,
            machine: spec.hardware.machine.to_string(),
            disks: spec
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| xml::NewDisk { image: d.path.clone(), bus: spec.hardware.disk_bus(i).to_string() })
                .collect(),
            nics,
            console_log: dir.join("console.log"),
            drover_channel: dir.join("agent.sock"),
        };
        let text = new.xml();
        self.libvirt
            .call("defining the domain", move |conn| {
                drover_libvirt::virt::domain::Domain::define_xml(conn, &text)
                    .map(|_| ())
                    .map_err(virt_err("defining the domain"))
            })
            .await
            .map_err(lv)
    }

    /// Makes sure [`ISOLATED_NETWORK`] is defined and active on this host: no forwarding, no
    /// address or DHCP of the host's, every port isolated from every other (libvirt's
    /// `<port isolated='yes'/>`), so a VM on it reaches neither the host, nor another VM on it,
    /// nor any network: a test failover's VM cannot reach production, nor another tenant's VM.
    async fn ensure_isolated_network(&self) -> HvResult<()> {
        use drover_libvirt::virt::network::Network;
        self.libvirt
            .call("ensuring drover's isolated network", |conn| {
                let net = match Network::lookup_by_name(conn, ISOLATED_NETWORK) {
                    Ok(net) => net,
                    Err(_) => {
                        let xml = format!(
                            "<network><name>{ISOLATED_NETWORK}</name><bridge stp='off'/><port isolated='yes'/></network>"
                        );
                        match Network::define_xml(conn, &xml) {
                            Ok(net) => net,
                            // Defined meanwhile by another call.
                            Err(_) => Network::lookup_by_name(conn, ISOLATED_NETWORK)
                                .map_err(virt_err("defining drover's isolated network"))?,
                        }
                    }
                };
                if !net.is_active().map_err(virt_err("reading drover's isolated network"))?
                    && let Err(e) = net.create()
                    // Started meanwhile by another call.
                    && !net.is_active().unwrap_or(false)
                {
                    return Err(virt_err("starting drover's isolated network")(e));
                }
                let _ = net.set_autostart(true);
                Ok(())
            })
            .await
            .map_err(lv)
    }

    pub fn libvirt(&self) -> &Libvirt {
        &self.libvirt
    }

    /// Every domain of the host, with what stops drover from protecting it.
    pub async fn discover(&self) -> HvResult<Vec<HostDomain>> {
        let domains = self.libvirt.list_domains().await.map_err(lv)?;
        let mut out = Vec::with_capacity(domains.len());
        for (d, state) in domains {
            let mut unsupported: Vec<String> = d.disks.iter().filter_map(|d| d.untrackable()).collect();
            let hardware = hardware_of(&d, &mut unsupported);
            if d.disks.is_empty() {
                unsupported.push("it has no disk".into());
            }
            if d.owned_by_drover {
                unsupported.push("drover defined it (a replica or test VM)".into());
            }
            let mut disks = Vec::with_capacity(d.disks.len());
            for disk in &d.disks {
                let size_bytes = match &disk.source {
                    Some(p) if disk.source_type == "file" => {
                        drover_qemu::image::info(p).await.ok().map(|i| i.virtual_size)
                    }
                    _ => None,
                };
                disks.push(HostDomainDisk {
                    target: disk.target.clone(),
                    format: disk.format.clone(),
                    source: disk.source.as_ref().map(|p| p.to_string_lossy().into_owned()),
                    size_bytes,
                });
            }
            out.push(HostDomain {
                uuid: d.uuid,
                name: d.name.clone(),
                state: match state {
                    DomainState::Running => HostDomainState::Running,
                    DomainState::Paused => HostDomainState::Paused,
                    DomainState::ShutOff => HostDomainState::ShutOff,
                    DomainState::Crashed => HostDomainState::Crashed,
                    DomainState::Other => HostDomainState::Other,
                },
                vcpus: d.vcpus,
                memory_mib: u32::try_from(d.memory_kib / 1024).unwrap_or(u32::MAX),
                disks,
                nics: d
                    .nics
                    .iter()
                    .map(|n| HostDomainNic {
                        kind: n.kind.clone(),
                        mac: n.mac.clone(),
                        source: n.source.clone(),
                        model: n.model.clone(),
                    })
                    .collect(),
                kernel: d.kernel.as_ref().map(|p| p.to_string_lossy().into_owned()),
                initrd: d.initrd.as_ref().map(|p| p.to_string_lossy().into_owned()),
                cmdline: d.cmdline.clone(),
                firmware: if d.uefi { crate::Firmware::Uefi } else { crate::Firmware::Bios },
                owned_by_drover: d.owned_by_drover,
                unsupported,
                hardware,
            });
        }
        Ok(out)
    }

    async fn describe(&self, vm: Uuid) -> HvResult<(DomainDescription, DomainState)> {
        self.libvirt.describe(vm).await.map_err(|e| match e.class {
            ErrorClass::NoDomain => HvError::UnknownVm(vm),
            _ => lv(e),
        })
    }

    async fn domain_call<T, F>(&self, vm: Uuid, what: &str, f: F) -> HvResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&drover_libvirt::virt::domain::Domain) -> Result<T, LibvirtError> + Send + 'static,
    {
        self.libvirt.with_domain(vm, what, f).await.map_err(|e| match e.class {
            ErrorClass::NoDomain => HvError::UnknownVm(vm),
            _ => lv(e),
        })
    }

    /// A guest agent command through libvirt (which holds the guest agent's port); the answer's
    /// `return` value.
    async fn agent_command(&self, vm: Uuid, command: Value) -> HvResult<Value> {
        let text = command.to_string();
        let answer = self
            .domain_call(vm, "asking the guest agent", move |dom| {
                dom.qemu_agent_command(&text, AGENT_COMMAND_SECS, 0).map_err(virt_err("asking the guest agent"))
            })
            .await
            .map_err(|e| HvError::GuestChannel(e.to_string()))?;
        // The guest is not trusted; libvirt bounds its messages, and this one more.
        if answer.len() > 1 << 20 {
            return Err(HvError::GuestChannel(format!("the guest agent answered {} bytes", answer.len())));
        }
        let v: Value = serde_json::from_str(&answer)
            .map_err(|e| HvError::GuestChannel(format!("the guest agent's answer does not parse: {e}")))?;
        Ok(v.get("return").cloned().unwrap_or(Value::Null))
    }

    /// The guest agent's heartbeat: it answers `guest-ping`, and says its addresses if it will.
    async fn qga_heartbeat(&self, vm: Uuid) -> HvResult<Heartbeat> {
        self.agent_command(vm, json!({"execute": "guest-ping"})).await?;
        let addresses = match self.agent_command(vm, json!({"execute": "guest-network-get-interfaces"})).await {
            Ok(v) => serde_json::from_value::<Vec<drover_qemu::qga::GuestInterface>>(v)
                .map(|i| crate::qemu::guest_addresses(&i))
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        Ok(Heartbeat { uptime_secs: 0.0, marker: None, addresses })
    }

    /// The QEMU monitor through libvirt (read what QEMU really has; remove a broken bitmap).
    async fn monitor(&self, vm: Uuid, command: Value) -> HvResult<Value> {
        let text = command.to_string();
        let answer = self
            .domain_call(vm, "asking QEMU through libvirt", move |dom| {
                dom.qemu_monitor_command(&text, 0).map_err(virt_err("asking QEMU through libvirt"))
            })
            .await?;
        let v: Value = serde_json::from_str(&answer)
            .map_err(|e| HvError::QmpProtocol(format!("QEMU's answer through libvirt does not parse: {e}")))?;
        if let Some(err) = v.get("error") {
            return Err(HvError::Qmp {
                command: command.get("execute").and_then(Value::as_str).unwrap_or("?").to_string(),
                class: err.get("class").and_then(Value::as_str).unwrap_or("").to_string(),
                desc: err.get("desc").and_then(Value::as_str).unwrap_or("").to_string(),
            });
        }
        Ok(v.get("return").cloned().unwrap_or(Value::Null))
    }

    /// The node name and the bitmaps QEMU has on the disk whose image is `image`.
    async fn qemu_bitmaps(&self, vm: Uuid, image: &Path) -> HvResult<(String, Vec<BitmapState>)> {
        let image = image.to_string_lossy();
        self.qemu_block_bitmaps(vm)
            .await?
            .into_iter()
            .find(|(file, _, _)| *file == image)
            .map(|(_, node, bitmaps)| (node, bitmaps))
            .ok_or_else(|| HvError::Unsupported(format!("QEMU has no block device for {image}")))
    }

    /// Every block device QEMU has open (one `query-block`): its image, node name and bitmaps.
    async fn qemu_block_bitmaps(&self, vm: Uuid) -> HvResult<Vec<(String, String, Vec<BitmapState>)>> {
        let blocks = self.monitor(vm, json!({"execute": "query-block"})).await?;
        let mut out = Vec::new();
        for b in blocks.as_array().into_iter().flatten() {
            let Some(inserted) = b.get("inserted") else { continue };
            let file = inserted.get("file").and_then(Value::as_str).unwrap_or_default().to_string();
            let node = inserted.get("node-name").and_then(Value::as_str).unwrap_or_default().to_string();
            let bitmaps = inserted
                .get("dirty-bitmaps")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|m| BitmapState {
                    name: m.get("name").and_then(Value::as_str).unwrap_or_default().to_string(),
                    persistent: m.get("persistent").and_then(Value::as_bool).unwrap_or(false),
                    recording: m.get("recording").and_then(Value::as_bool).unwrap_or(false),
                    inconsistent: m.get("inconsistent").and_then(Value::as_bool).unwrap_or(false),
                    busy: m.get("busy").and_then(Value::as_bool).unwrap_or(false),
                    granularity: m.get("granularity").and_then(Value::as_u64).unwrap_or(0),
                    dirty_bytes: m.get("count").and_then(Value::as_u64),
                })
                .collect();
            out.push((file, node, bitmaps));
        }
        Ok(out)
    }

    /// The checkpoints tracking disk `target`, by name.
    async fn checkpoints_of(&self, vm: Uuid, target: String) -> HvResult<Vec<String>> {
        let all = self.checkpoints(vm).await?;
        Ok(all.into_iter().filter(|(_, disks)| disks.contains(&target)).map(|(name, _)| name).collect())
    }

    /// Every checkpoint of the domain, by name, with the disks it tracks (a bitmap of its name
    /// in each).
    async fn checkpoints(&self, vm: Uuid) -> HvResult<Vec<(String, Vec<String>)>> {
        self.domain_call(vm, "listing the checkpoints", move |dom| {
            let mut out = Vec::new();
            for name in ffi::checkpoint_names(dom)? {
                let xml = ffi::checkpoint_xml(dom, &name)?;
                let disks = xml::checkpoint_disks(&xml)?
                    .into_iter()
                    .filter(|(_, bitmap)| *bitmap == name)
                    .map(|(d, _)| d)
                    .collect();
                out.push((name, disks));
            }
            Ok(out)
        })
        .await
    }

    /// Records in libvirt a checkpoint for the bitmap `name` already in the images of disks
    /// `tracked` (`VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE`: nothing in the images changes).
    async fn redefine_checkpoint(&self, vm: Uuid, tracked: &[&str], targets: &[String], name: &str) -> HvResult<()> {
        let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
        let created =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|t| t.as_secs()).unwrap_or_default();
        let text = xml::checkpoint_xml(name, tracked, &targets).replacen(
            "</name>",
            &format!("</name><creationTime>{created}</creationTime>"),
            1,
        );
        self.domain_call(vm, "redefining a checkpoint", move |dom| ffi::checkpoint_create(dom, &text, true)).await
    }

    /// Deletes checkpoint `name` if it exists: for real, or when libvirt cannot (a bitmap of it
    /// is broken), its metadata and then its bitmaps through QMP, on every disk.
    async fn delete_checkpoint(&self, vm: Uuid, name: &str) -> HvResult<()> {
        let n = name.to_string();
        let deleted = self
            .domain_call(vm, "deleting a checkpoint", move |dom| match ffi::checkpoint_delete(dom, &n, false) {
                Ok(()) => Ok(true),
                Err(e) if e.class == ErrorClass::NoCheckpoint => Ok(true),
                Err(e) => {
                    tracing::warn!(checkpoint = %n, error = %e, "checkpoint not deleted; deleting its metadata only");
                    match ffi::checkpoint_delete(dom, &n, true) {
                        Ok(()) => Ok(false),
                        Err(e) if e.class == ErrorClass::NoCheckpoint => Ok(false),
                        Err(e) => Err(e),
                    }
                }
            })
            .await?;
        if !deleted {
            let (d, _) = self.describe(vm).await?;
            for disk in Disks::of(&d).tracked {
                self.remove_qemu_bitmap(vm, &disk.image, name).await?;
            }
        }
        Ok(())
    }

    async fn remove_qemu_bitmap(&self, vm: Uuid, image: &Path, name: &str) -> HvResult<()> {
        let (node, bitmaps) = self.qemu_bitmaps(vm, image).await?;
        if bitmaps.iter().any(|b| b.name == name) {
            self.monitor(
                vm,
                json!({"execute": "block-dirty-bitmap-remove", "arguments": {"node": node, "name": name}}),
            )
            .await?;
        }
        Ok(())
    }

    /// The tracked disk `index` of a running domain, with the domain's disks.
    async fn tracked_disk(&self, vm: Uuid, index: usize) -> HvResult<(xml::DomainDisk, Disks, DomainState)> {
        let (d, state) = self.describe(vm).await?;
        let disk = d.disk(index).map_err(|e| HvError::InvalidSpec(e.message))?.clone();
        if let Some(why) = disk.untrackable() {
            return Err(HvError::Unsupported(format!("domain {}: {why}", d.name)));
        }
        Ok((disk, Disks::of(&d), state))
    }

    async fn wait_job_gone(&self, vm: Uuid) -> HvResult<()> {
        let deadline = Instant::now() + JOB_GONE_TIMEOUT;
        loop {
            let job = self.domain_call(vm, "reading the backup job", ffi::backup_xml).await?;
            if job.is_none() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HvError::Timeout(JOB_GONE_TIMEOUT, "the backup job to end"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn power_state(s: DomainState) -> PowerState {
    match s {
        DomainState::Running | DomainState::Other => PowerState::Running,
        DomainState::Paused => PowerState::Paused,
        DomainState::ShutOff => PowerState::Off,
        DomainState::Crashed => PowerState::Died,
    }
}

/// The hardware a domain's replica gets: its machine family (`q35` in its machine type, else
/// `pc`), its disks' buses and its NICs' models (libvirt's default, `rtl8139`, when it names
/// none). A bus or model drover cannot give a replica goes into `unsupported`.
fn hardware_of(d: &DomainDescription, unsupported: &mut Vec<String>) -> crate::Hardware {
    use crate::{DiskBus, Machine, NicModel};
    let machine = match d.machine.as_deref() {
        Some(m) if m.contains("q35") => Machine::Q35,
        Some(m) if m == "pc" || m.contains("i440fx") => Machine::Pc,
        None => Machine::Pc,
        Some(other) => {
            unsupported.push(format!("machine type {other} (drover runs replicas as pc or q35)"));
            Machine::Pc
        }
    };
    let disk_buses = d
        .disks
        .iter()
        .map(|disk| match disk.bus.as_deref() {
            None | Some("virtio") => DiskBus::Virtio,
            Some("sata") => DiskBus::Sata,
            Some("scsi") => DiskBus::Scsi,
            Some("ide") => DiskBus::Ide,
            Some(other) => {
                unsupported.push(format!("disk {} is on bus {other} (virtio, sata, scsi or ide)", disk.target));
                DiskBus::Virtio
            }
        })
        .collect();
    let nic_models = d
        .nics
        .iter()
        .map(|n| match n.model.as_deref() {
            Some("virtio") => NicModel::Virtio,
            Some("e1000") => NicModel::E1000,
            Some("e1000e") => NicModel::E1000e,
            None | Some("rtl8139") => NicModel::Rtl8139,
            Some(other) => {
                let mac = n.mac.as_deref().unwrap_or("?");
                unsupported.push(format!("NIC {mac} is a {other} (virtio, e1000, e1000e or rtl8139)"));
                NicModel::Virtio
            }
        })
        .collect();
    let mut h = crate::Hardware { machine, disk_buses, nic_models };
    // The defaults say nothing: a plain virtio pc VM keeps an empty record.
    if h.disk_buses.iter().all(|b| *b == DiskBus::Virtio) {
        h.disk_buses.clear();
    }
    if h.nic_models.iter().all(|m| *m == NicModel::Virtio) {
        h.nic_models.clear();
    }
    if let Err(e) = h.check(d.disks.len(), d.nics.len()) {
        unsupported.push(e);
    }
    h
}

#[async_trait]
impl Hypervisor for LibvirtDriver {
    fn kind(&self) -> &'static str {
        "libvirt"
    }

    async fn domains(&self) -> HvResult<Vec<HostDomain>> {
        self.discover().await
    }

    /// The declared networks, each available when its libvirt network is active.
    async fn networks(&self) -> HvResult<Vec<drover_agent_api::HostNetwork>> {
        let declared = self.networks.clone();
        self.libvirt
            .call("listing networks", move |conn| {
                use drover_libvirt::virt::network::Network;
                Ok(declared
                    .into_iter()
                    .map(|(name, target)| {
                        let problem = match Network::lookup_by_name(conn, &target) {
                            Err(_) => Some(format!("libvirt has no network {target}")),
                            Ok(net) if !net.is_active().unwrap_or(false) => {
                                Some(format!("libvirt network {target} is not active"))
                            }
                            Ok(_) => None,
                        };
                        drover_agent_api::HostNetwork {
                            name,
                            target: format!("libvirt network {target}"),
                            available: problem.is_none(),
                            problem,
                        }
                    })
                    .collect())
            })
            .await
            .map_err(lv)
    }

    /// An imported domain's disks are where its definition says; a domain drover defined runs on
    /// drover's files, which drover finds itself.
    async fn disk_location(&self, vm: Uuid, index: usize) -> HvResult<Option<PathBuf>> {
        match self.describe(vm).await {
            Ok((d, _)) if !d.owned_by_drover => {
                let disk = d.disk(index).map_err(|e| HvError::InvalidSpec(e.message))?;
                match (&disk.source, disk.untrackable()) {
                    (Some(p), None) => Ok(Some(p.clone())),
                    (_, why) => Err(HvError::Unsupported(format!(
                        "domain {}: {}",
                        d.name,
                        why.unwrap_or_else(|| "the disk has no file".into())
                    ))),
                }
            }
            Ok(_) | Err(HvError::UnknownVm(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn runtime_disks(&self, vm: Uuid) -> HvResult<Vec<PathBuf>> {
        let (d, _) = self.describe(vm).await?;
        Ok(d.disks.iter().filter_map(|d| d.source.clone()).collect())
    }

    /// Starts the domain whose UUID is the VM's id. A domain of the administrator's is started
    /// as it is defined (the specification is not applied); a VM that is no domain yet, or a
    /// domain drover defined, is (re)defined from the specification first.
    async fn power_on(&self, spec: &VmSpec) -> HvResult<()> {
        let (d, state) = match self.describe(spec.id).await {
            Ok((d, state)) if !d.owned_by_drover || state.is_active() => (d, state),
            Ok(_) | Err(HvError::UnknownVm(_)) => {
                crate::qemu::validate_spec(spec)?;
                self.define_own(spec).await?;
                self.describe(spec.id).await?
            }
            Err(e) => return Err(e),
        };
        if state.is_active() {
            return Ok(());
        }
        tracing::info!(domain = %d.name, "starting the libvirt domain");
        self.domain_call(spec.id, "starting the domain", |dom| dom.create().map_err(virt_err("starting the domain")))
            .await?;
        Ok(())
    }

    async fn shutdown(&self, vm: Uuid, timeout: Duration) -> HvResult<ShutdownOutcome> {
        let (_, state) = self.describe(vm).await?;
        if !state.is_active() {
            return Ok(ShutdownOutcome::AlreadyOff);
        }
        // The guest may refuse or ignore the request; it is repeated until the timeout.
        let deadline = Instant::now() + timeout;
        loop {
            let asked = self
                .domain_call(vm, "asking the guest to shut down", |dom| {
                    dom.shutdown().map_err(virt_err("asking the guest to shut down"))
                })
                .await;
            if let Err(e) = asked {
                tracing::debug!(%vm, error = %e, "shutdown request not taken");
            }
            let next = (Instant::now() + Duration::from_secs(2)).min(deadline);
            while Instant::now() < next {
                if !self.describe(vm).await?.1.is_active() {
                    return Ok(ShutdownOutcome::Graceful);
                }
                tokio::time::sleep(POLL).await;
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        self.power_off(vm).await?;
        Ok(ShutdownOutcome::ForcedOff)
    }

    async fn power_off(&self, vm: Uuid) -> HvResult<()> {
        let (_, state) = self.describe(vm).await?;
        if !state.is_active() {
            return Ok(());
        }
        self.domain_call(vm, "powering the domain off", |dom| match dom.destroy() {
            Ok(()) => Ok(()),
            // Stopped meanwhile.
            Err(e) if e.code() == drover_libvirt::virt::error::ErrorNumber::OperationInvalid => Ok(()),
            Err(e) => Err(virt_err("powering the domain off")(e)),
        })
        .await
    }

    async fn status(&self, vm: Uuid) -> HvResult<PowerState> {
        match self.describe(vm).await {
            Ok((_, s)) => Ok(power_state(s)),
            Err(HvError::UnknownVm(_)) => Ok(PowerState::Off),
            Err(e) => Err(e),
        }
    }

    /// drover's channel (`org.drover.agent`, the tiny guest) or the QEMU guest agent through
    /// libvirt, whichever answers first.
    async fn wait_heartbeat(&self, vm: Uuid, timeout: Duration) -> HvResult<Heartbeat> {
        let deadline = Instant::now() + timeout;
        loop {
            let (d, state) = self.describe(vm).await?;
            if !state.is_active() {
                return Err(HvError::NotRunning(vm));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(HvError::Timeout(timeout, "guest heartbeat"));
            }
            let budget = remaining.min(AGENT_ATTEMPT);
            let channel = d.channel_path(AGENT_CHANNEL).map(Path::to_path_buf);
            let drover = async {
                match &channel {
                    Some(p) => crate::qemu::channel_exchange(p, "ping", crate::qemu::parse_pong).await,
                    None => Err(HvError::GuestChannel("no drover channel".into())),
                }
            };
            let qga = self.qga_heartbeat(vm);
            if let Ok(Some(answer)) =
                tokio::time::timeout(budget, crate::qemu::first_answer(vm, drover, qga, |_| false)).await
            {
                return answer;
            }
            tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    async fn write_marker(&self, vm: Uuid, marker: &str) -> HvResult<()> {
        if marker.len() > MAX_MARKER_BYTES {
            return Err(HvError::InvalidSpec(format!("marker is {} bytes; at most {MAX_MARKER_BYTES}", marker.len())));
        }
        let request = format!("marker-write {}", crate::qemu::hex_encode(marker.as_bytes()));
        let deadline = Instant::now() + WRITE_MARKER_TIMEOUT;
        loop {
            let (d, state) = self.describe(vm).await?;
            if !state.is_active() {
                return Err(HvError::NotRunning(vm));
            }
            let Some(channel) = d.channel_path(AGENT_CHANNEL).map(Path::to_path_buf) else {
                return Err(HvError::Unsupported(format!(
                    "domain {} has no drover channel ({AGENT_CHANNEL}); markers are written through it",
                    d.name
                )));
            };
            match crate::qemu::channel_exchange(&channel, &request, crate::qemu::parse_write_reply).await {
                Ok(answer) => return answer,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(%vm, error = %e, "guest channel not ready");
                    tokio::time::sleep(POLL).await;
                }
                Err(_) => return Err(HvError::Timeout(WRITE_MARKER_TIMEOUT, "marker write")),
            }
        }
    }

    async fn check_tcp_port(&self, vm: Uuid, _guest_port: u16, _timeout: Duration) -> HvResult<TcpPortState> {
        Err(HvError::Unsupported(format!(
            "VM {vm} is a libvirt domain: drover checks guest ports only on its own VMs' user-mode networks"
        )))
    }

    /// Freezes through libvirt's `virDomainFSFreeze` (the guest agent, whose fsfreeze hooks run).
    async fn guest_freeze(&self, vm: Uuid) -> HvResult<FreezeOutcome> {
        let (d, _) = self.describe(vm).await?;
        if !d.channels.iter().any(|c| c.name == crate::qemu::GUEST_AGENT_CHANNEL) {
            return Ok(FreezeOutcome {
                frozen: false,
                filesystems: 0,
                reason: format!(
                    "domain {} has no guest agent channel ({}): add one to its definition and install qemu-guest-agent",
                    d.name,
                    crate::qemu::GUEST_AGENT_CHANNEL
                ),
            });
        }
        let r = self.domain_call(vm, "freezing the guest", ffi::fs_freeze).await;
        Ok(match r {
            Ok(n) => FreezeOutcome {
                frozen: true,
                filesystems: n.into(),
                reason: format!("{n} file systems frozen by the guest agent (through libvirt)"),
            },
            Err(e) => {
                // A freeze that failed part-way may hold some file systems.
                let thawed = self.guest_thaw(vm).await;
                tracing::warn!(%vm, error = %e, ?thawed, "guest freeze failed; thawed");
                FreezeOutcome { frozen: false, filesystems: 0, reason: format!("the guest was not frozen: {e}") }
            }
        })
    }

    async fn guest_thaw(&self, vm: Uuid) -> HvResult<u64> {
        if !self.describe(vm).await?.1.is_active() {
            return Ok(0);
        }
        Ok(self.domain_call(vm, "thawing the guest", ffi::fs_thaw).await?.into())
    }

    /// A domain drover defined is powered off and undefined, with its checkpoints' metadata and
    /// the UEFI variables store libvirt made for it; one of the administrator's is left exactly
    /// as it is.
    async fn forget(&self, vm: Uuid) -> HvResult<()> {
        match self.describe(vm).await {
            Ok((d, _)) if d.owned_by_drover => {
                self.power_off(vm).await?;
                self.domain_call(vm, "undefining the domain", |dom| {
                    use drover_libvirt::virt::sys::{
                        VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA, VIR_DOMAIN_UNDEFINE_NVRAM,
                    };
                    dom.undefine_flags(VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA | VIR_DOMAIN_UNDEFINE_NVRAM)
                        .map_err(virt_err("undefining the domain"))
                })
                .await?;
            }
            Ok(_) | Err(HvError::UnknownVm(_)) => {}
            Err(e) => return Err(e),
        }
        match tokio::fs::remove_dir_all(self.vm_dir(vm)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(HvError::io(format!("removing {}", self.vm_dir(vm).display()), e)),
        }
    }

    fn change_tracking(&self) -> Option<&dyn ChangeTracking> {
        Some(self)
    }

    async fn reattach(&self) -> HvResult<Vec<(Uuid, PowerState)>> {
        let domains = self.libvirt.list_domains().await.map_err(lv)?;
        Ok(domains.into_iter().map(|(d, s)| (d.uuid, power_state(s))).collect())
    }
}

/// A domain's disks: every target, and the trackable ones (qcow2 files).
struct Disks {
    all: Vec<String>,
    tracked: Vec<TrackedDisk>,
}

/// A trackable disk of a domain: its index among the domain's disks, target and image.
struct TrackedDisk {
    index: usize,
    target: String,
    image: PathBuf,
}

impl Disks {
    fn of(d: &DomainDescription) -> Disks {
        Disks {
            all: d.disks.iter().map(|d| d.target.clone()).collect(),
            tracked: d
                .disks
                .iter()
                .enumerate()
                .filter(|(_, d)| d.untrackable().is_none())
                .map(|(index, d)| TrackedDisk {
                    index,
                    target: d.target.clone(),
                    image: d.source.clone().unwrap_or_default(),
                })
                .collect(),
        }
    }

    fn all(&self) -> Vec<&str> {
        self.all.iter().map(String::as_str).collect()
    }

    fn tracked(&self) -> Vec<&str> {
        self.tracked.iter().map(|t| t.target.as_str()).collect()
    }

    fn target(&self, index: usize) -> Option<&str> {
        self.tracked.iter().find(|t| t.index == index).map(|t| t.target.as_str())
    }
}

/// The cuts of one domain's disks and its one backup job (libvirt runs one per domain). The
/// engine cuts a VM's disks one after the other and ends each cut when that disk's transfer
/// ends; libvirt wants every disk of the job, and each disk's checkpoint, when the job begins.
/// So a cut only asks (this ledger records it) until every trackable disk of the domain has
/// asked: then the job begins for all of them at one instant, each disk exported since its own
/// checkpoint, and checkpoint `next` is created over all of them. Likewise the job ends, and
/// the cycle commits, when the last cut has ended: every disk succeeded → each `current` is
/// deleted; any failed → `next` is deleted (every `current` still covers everything, so no
/// change is skipped; disks that did succeed send their changes again next time).
///
/// Kept as `job.json` in the VM's cut directory (0600, written whole and renamed), so an agent
/// restarted in the middle of a run knows which disks still read the job.
#[derive(Debug, Default, Serialize, Deserialize)]
struct JobLedger {
    /// The checkpoint the job creates.
    next: String,
    /// Each disk that asked, by index: the checkpoint its changes are exported since.
    asked: BTreeMap<usize, String>,
    /// Each disk whose cut ended, by index: whether its transfer succeeded.
    ended: BTreeMap<usize, bool>,
    /// The job was begun.
    begun: bool,
}

impl JobLedger {
    fn path(dir: &Path) -> PathBuf {
        dir.join("job.json")
    }

    async fn load(dir: &Path) -> HvResult<Option<JobLedger>> {
        let path = JobLedger::path(dir);
        match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| HvError::Unsupported(format!("{} cannot be read: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(HvError::io(format!("reading {}", path.display()), e)),
        }
    }

    async fn save(&self, dir: &Path) -> HvResult<()> {
        let path = JobLedger::path(dir);
        let bytes = serde_json::to_vec(self).map_err(|e| HvError::Unsupported(e.to_string()))?;
        drover_qemu::durable::write(&path, bytes, 0o600)
            .await
            .map_err(|e| HvError::io(format!("writing {}", path.display()), e))
    }

    async fn remove(dir: &Path) -> HvResult<()> {
        let path = JobLedger::path(dir);
        match tokio::fs::remove_file(&path).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(HvError::io(format!("removing {}", path.display()), e))
            }
            _ => Ok(()),
        }
    }

    /// Every disk that asked has ended its cut.
    fn all_ended(&self) -> bool {
        self.asked.keys().all(|i| self.ended.contains_key(i))
    }
}

fn scratch_path(dir: &Path, target: &str) -> PathBuf {
    dir.join(format!("scratch-{target}.qcow2"))
}

#[async_trait]
impl ChangeTracking for LibvirtDriver {
    /// A checkpoint over every trackable disk of the domain (so the disks' bitmaps are made at
    /// one instant, and a second disk's `enable` of the same name finds it).
    async fn enable(&self, vm: Uuid, disk: usize, bitmap: &str) -> HvResult<()> {
        let (d, disks, state) = self.tracked_disk(vm, disk).await?;
        if !state.is_active() {
            return Err(HvError::NotRunning(vm));
        }
        if let Some((_, tracked)) = self.checkpoints(vm).await?.into_iter().find(|(name, _)| name == bitmap) {
            if tracked.contains(&d.target) {
                return Ok(());
            }
            return Err(HvError::BitmapUnusable {
                bitmap: bitmap.to_string(),
                reason: format!("libvirt's checkpoint of that name does not track disk {} (added since?)", d.target),
            });
        }
        let x = xml::checkpoint_xml(bitmap, &disks.tracked(), &disks.all());
        self.domain_call(vm, "creating a checkpoint", move |dom| ffi::checkpoint_create(dom, &x, false)).await
    }

    async fn state(&self, vm: Uuid, disk: usize) -> HvResult<Vec<BitmapState>> {
        let (d, disks, state) = self.tracked_disk(vm, disk).await?;
        if !state.is_active() {
            return Err(HvError::NotRunning(vm));
        }
        let checkpoints = self.checkpoints_of(vm, d.target.clone()).await?;
        let (_, qemu) = self.qemu_bitmaps(vm, d.source.as_deref().unwrap_or(Path::new(""))).await?;
        let mut out = Vec::new();
        for name in &checkpoints {
            match qemu.iter().find(|b| &b.name == name) {
                Some(b) => out.push(b.clone()),
                // libvirt lists it, the image does not have it: it was only in the memory of a
                // QEMU that died.
                None => out.push(BitmapState {
                    name: name.clone(),
                    persistent: true,
                    recording: false,
                    inconsistent: true,
                    busy: false,
                    granularity: 0,
                    dirty_bytes: None,
                }),
            }
        }
        for b in qemu {
            if checkpoints.contains(&b.name) || b.name == EXPORT_BITMAP {
                continue;
            }
            let ours = b.name.starts_with("drover-");
            // A sound bitmap of ours libvirt has no record of: made by an offline cycle (QEMU's
            // own tools), or libvirt's metadata was lost (the domain was redefined, migrated).
            // Its record is redefined, so libvirt backs up from it.
            if ours && b.is_sound() {
                let tracked = self.disks_with_sound_bitmap(vm, &disks, &b.name).await?;
                let tracked: Vec<&str> = tracked.iter().map(String::as_str).collect();
                match self.redefine_checkpoint(vm, &tracked, &disks.all, &b.name).await {
                    Ok(()) => {
                        tracing::info!(%vm, disks = ?tracked, bitmap = %b.name, "checkpoint record redefined for a bitmap libvirt did not know");
                        out.push(b);
                        continue;
                    }
                    Err(e) => tracing::warn!(%vm, bitmap = %b.name, error = %e, "checkpoint record not redefined"),
                }
            }
            // A bitmap of ours libvirt does not know cannot be backed up from: unusable.
            out.push(BitmapState { inconsistent: b.inconsistent || ours, ..b });
        }
        Ok(out)
    }

    /// Deletes the checkpoint (of every disk: a checkpoint is the domain's), or this disk's
    /// bitmap libvirt has no checkpoint for.
    async fn remove(&self, vm: Uuid, disk: usize, bitmap: &str) -> HvResult<()> {
        let (d, _, _) = self.tracked_disk(vm, disk).await?;
        if self.checkpoints(vm).await?.iter().any(|(c, _)| c == bitmap) {
            self.delete_checkpoint(vm, bitmap).await
        } else {
            self.remove_qemu_bitmap(vm, d.source.as_deref().unwrap_or(Path::new("")), bitmap).await
        }
    }

    /// See [`JobLedger`]: the export exists once every trackable disk of the domain has asked.
    async fn cut_begin(
        &self,
        vm: Uuid,
        disk: usize,
        current: &str,
        next: &str,
        export_dir: &Path,
    ) -> HvResult<CycleExport> {
        let _jobs = self.jobs.lock().await;
        let (d, disks, state) = self.tracked_disk(vm, disk).await?;
        if !state.is_active() {
            return Err(HvError::NotRunning(vm));
        }
        let image = d.source.clone().unwrap_or_default();
        let socket = export_dir.join("nbd.sock");
        let export_name = format!("disk{disk}");
        let target = d.target.clone();
        let capacity = self
            .domain_call(vm, "reading the disk's size", move |dom| {
                dom.get_block_info(&target, 0).map(|i| i.capacity).map_err(virt_err("reading the disk's size"))
            })
            .await?;
        let cut = CycleExport {
            vm,
            disk_index: disk,
            current_bitmap: current.to_string(),
            next_bitmap: next.to_string(),
            nbd: NbdEndpoint { socket: socket.clone(), export_name: export_name.clone() },
            meta_context: tracking::dirty_bitmap_context(EXPORT_BITMAP),
            virtual_size: capacity,
            image,
            fleece_image: scratch_path(export_dir, &d.target),
        };
        let checkpoints = self.checkpoints(vm).await?;
        let has = |name: &str| checkpoints.iter().find(|(c, _)| c == name);
        let job = self.domain_call(vm, "reading the backup job", ffi::backup_xml).await?;
        if let Some(job) = job {
            // Ours, begun by an earlier attempt of this cut or when the last disk asked: this
            // disk is re-exported as it is, if the job exports it since the checkpoint asked.
            if job.contains(&*socket.to_string_lossy()) && has(next).is_some() {
                let exported = xml::backup_job_disk(&job, &d.target).map_err(lv)?;
                match exported {
                    Some((name, Some(since))) if name == export_name && since == current => return Ok(cut),
                    Some((name, since)) if name == export_name => {
                        return Err(HvError::ImageLocked(format!(
                            "the backup job running on the domain of VM {vm} exports disk {} {}, not since {current}",
                            d.target,
                            since.map(|s| format!("since checkpoint {s}")).unwrap_or_else(|| "whole".into()),
                        )));
                    }
                    _ => {}
                }
            }
            return Err(HvError::ImageLocked(format!(
                "another backup job runs on the domain of VM {vm} (libvirt runs one per domain); disk {} waits",
                d.target
            )));
        }
        if !has(current).is_some_and(|(_, tracked)| tracked.contains(&d.target)) {
            return Err(HvError::BitmapUnusable {
                bitmap: current.to_string(),
                reason: format!("has no libvirt checkpoint on disk {}", d.target),
            });
        }
        tokio::fs::create_dir_all(export_dir)
            .await
            .map_err(|e| HvError::io(format!("creating {}", export_dir.display()), e))?;
        let mut ledger = match JobLedger::load(export_dir).await? {
            // Another cycle's, or a job that is gone (libvirt or QEMU restarted): started over.
            Some(l) if l.next == next && !l.begun => l,
            _ => JobLedger { next: next.to_string(), ..Default::default() },
        };
        if ledger.asked.is_empty() && has(next).is_some() {
            // An earlier cut whose job is gone: `current` still covers everything since it.
            self.delete_checkpoint(vm, next).await?;
        }
        ledger.asked.insert(disk, current.to_string());
        ledger.ended.remove(&disk);
        if disks.tracked.iter().any(|t| !ledger.asked.contains_key(&t.index)) {
            ledger.save(export_dir).await?;
            return Ok(cut);
        }

        // Every disk asked: the job begins for all of them.
        let mut stale = vec![socket.clone()];
        stale.extend(disks.tracked.iter().map(|t| scratch_path(export_dir, &t.target)));
        for path in &stale {
            if let Err(e) = tokio::fs::remove_file(path).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                return Err(HvError::io(format!("removing {}", path.display()), e));
            }
        }
        let names: Vec<(String, PathBuf, &str, &str)> = ledger
            .asked
            .iter()
            .filter_map(|(i, since)| {
                disks.target(*i).map(|t| (format!("disk{i}"), scratch_path(export_dir, t), t, since.as_str()))
            })
            .collect();
        let backup_disks: Vec<xml::BackupDisk<'_>> = names
            .iter()
            .map(|(export_name, scratch, target, since)| xml::BackupDisk {
                target,
                export_name,
                scratch,
                incremental: Some(since),
            })
            .collect();
        let backup = xml::backup_xml(&socket, &backup_disks, &disks.all(), EXPORT_BITMAP);
        let checkpoint = xml::checkpoint_xml(next, &disks.tracked(), &disks.all());
        let begun = self
            .domain_call(vm, "beginning the backup", move |dom| ffi::backup_begin(dom, &backup, Some(&checkpoint)))
            .await;
        match begun {
            Ok(()) => {
                ledger.begun = true;
                ledger.save(export_dir).await?;
                Ok(cut)
            }
            Err(e) => {
                // This disk did not get its cut; the others' end as failed (the engine ends them).
                ledger.asked.remove(&disk);
                ledger.save(export_dir).await?;
                match e {
                    HvError::BitmapUnusable { reason, .. } => {
                        Err(HvError::BitmapUnusable { bitmap: current.to_string(), reason })
                    }
                    e => Err(e),
                }
            }
        }
    }

    /// See [`JobLedger`]: the job ends, and the cycle commits, when the last disk's cut ends.
    async fn cut_end(&self, cut: &CycleExport, success: bool) -> HvResult<()> {
        let _jobs = self.jobs.lock().await;
        let vm = cut.vm;
        let dir = cut.nbd.socket.parent().unwrap_or(Path::new("/")).to_path_buf();
        let mut ledger = JobLedger::load(&dir)
            .await?
            .filter(|l| l.next == cut.next_bitmap && l.asked.contains_key(&cut.disk_index))
            // No record (ended already, or lost): this disk's cut alone, as exported.
            .unwrap_or_else(|| JobLedger {
                next: cut.next_bitmap.clone(),
                asked: [(cut.disk_index, cut.current_bitmap.clone())].into(),
                ended: Default::default(),
                begun: true,
            });
        // A cut whose job never began was never exported: it cannot have succeeded.
        ledger.ended.insert(cut.disk_index, success && ledger.begun);
        let job = self.domain_call(vm, "reading the backup job", ffi::backup_xml).await?;
        let ours = job.is_some_and(|j| j.contains(&*cut.nbd.socket.to_string_lossy()));
        if !ledger.all_ended() {
            if !ledger.begun && !ours {
                // Ended before every disk asked (the cut step failed): this disk asks no more.
                ledger.asked.remove(&cut.disk_index);
                ledger.ended.remove(&cut.disk_index);
            }
            // Other disks still read the job (or may still ask): it runs on.
            return match ledger.asked.is_empty() {
                true => JobLedger::remove(&dir).await,
                false => ledger.save(&dir).await,
            };
        }
        if ours {
            self.domain_call(vm, "ending the backup job", |dom| match ffi::abort_job(dom) {
                Ok(()) => Ok(()),
                // It ended meanwhile.
                Err(e) if e.class == ErrorClass::OperationInvalid => Ok(()),
                Err(e) => Err(e),
            })
            .await?;
            self.wait_job_gone(vm).await?;
        }
        if ledger.ended.values().all(|ok| *ok) {
            let currents: std::collections::BTreeSet<&String> = ledger.asked.values().collect();
            for current in currents {
                self.delete_checkpoint(vm, current).await?;
            }
        } else {
            self.delete_checkpoint(vm, &ledger.next).await?;
        }
        let (d, _) = self.describe(vm).await?;
        for disk in Disks::of(&d).tracked {
            let scratch = scratch_path(&dir, &disk.target);
            if let Err(e) = tokio::fs::remove_file(&scratch).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %scratch.display(), error = %e, "scratch image not removed");
            }
        }
        JobLedger::remove(&dir).await
    }
}

impl LibvirtDriver {
    /// The disks whose image has a sound bitmap `name` (see [`BitmapState::is_sound`]).
    async fn disks_with_sound_bitmap(&self, vm: Uuid, disks: &Disks, name: &str) -> HvResult<Vec<String>> {
        let blocks = self.qemu_block_bitmaps(vm).await?;
        let sound_in = |image: &Path| {
            let image = image.to_string_lossy();
            blocks
                .iter()
                .any(|(file, _, bitmaps)| *file == image && bitmaps.iter().any(|b| b.name == name && b.is_sound()))
        };
        Ok(disks.tracked.iter().filter(|t| sound_in(&t.image)).map(|t| t.target.clone()).collect())
    }
}

/// Running a libvirt daemon for tests on a machine without systemd as PID 1 (these CI machines):
/// starts `virtlogd` and `libvirtd` as daemons when `qemu:///system` does not answer, and waits
/// until it does. `scripts/install-deps` installs them and sets `user`/`group` in
/// `/etc/libvirt/qemu.conf` (see `../shared/notes/libvirt-on-these-machines.md`, trap 1).
pub mod testing {
    use std::process::Command;
    use std::time::{Duration, Instant};

    /// The URI tests use.
    pub const URI: &str = "qemu:///system";
    /// libvirtd answers in ~8 s here (its first QEMU capabilities probe).
    const START_TIMEOUT: Duration = Duration::from_secs(90);

    fn answers() -> bool {
        Command::new("virsh").args(["-c", URI, "version"]).output().map(|o| o.status.success()).unwrap_or(false)
    }

    /// A libvirt network of a test's (no forward, no address), defined and started under a
    /// fresh name (its `.0`); destroyed and undefined when dropped.
    #[derive(Debug)]
    pub struct TestNetwork(pub String);

    impl TestNetwork {
        /// # Panics
        /// When libvirt refuses it.
        pub fn start() -> Self {
            let name = format!("drover-t-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
            let dir = std::env::temp_dir().join(format!("{name}.xml"));
            std::fs::write(&dir, format!("<network><name>{name}</name><bridge stp='off'/></network>")).unwrap();
            let virsh = |args: &[&str]| Command::new("virsh").args(["-c", URI]).args(args).output().unwrap();
            let net = TestNetwork(name);
            let defined = virsh(&["net-define", &dir.to_string_lossy()]);
            let _ = std::fs::remove_file(&dir);
            assert!(defined.status.success(), "defining {}: {}", net.0, String::from_utf8_lossy(&defined.stderr));
            assert!(virsh(&["net-start", &net.0]).status.success(), "starting {}", net.0);
            net
        }
    }

    impl Drop for TestNetwork {
        fn drop(&mut self) {
            for what in ["net-destroy", "net-undefine"] {
                let _ = Command::new("virsh").args(["-c", URI, what, &self.0]).output();
            }
        }
    }

    /// Defines, with `virsh define`, as an administrator would outside drover, a domain named
    /// `name` that boots the tiny guest (`guest`) directly with `image` as its disk `vda` and
    /// drover's channel as a socket in `dir` (where its console log and definition go too).
    pub fn define_tiny_guest_domain(
        name: &str,
        uuid: uuid::Uuid,
        guest: &crate::qemu::TinyGuest,
        image: &std::path::Path,
        dir: &std::path::Path,
    ) {
        define_tiny_guest_domain_with_disks(name, uuid, guest, &[image], dir)
    }

    /// [`define_tiny_guest_domain`] with `images` as disks `vda`, `vdb`...
    pub fn define_tiny_guest_domain_with_disks(
        name: &str,
        uuid: uuid::Uuid,
        guest: &crate::qemu::TinyGuest,
        images: &[&std::path::Path],
        dir: &std::path::Path,
    ) {
        let disks: String = images
            .iter()
            .enumerate()
            .map(|(i, image)| {
                format!(
                    "<disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>
                       <source file='{}'/><target dev='vd{}' bus='virtio'/></disk>",
                    image.display(),
                    (b'a' + i as u8) as char
                )
            })
            .collect();
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid><memory unit='MiB'>128</memory><vcpu>1</vcpu>
               <os><type arch='x86_64' machine='pc'>hvm</type><kernel>{k}</kernel><initrd>{i}</initrd><cmdline>{c}</cmdline></os>
               <features><acpi/></features><on_poweroff>destroy</on_poweroff><on_crash>destroy</on_crash>
               <devices>
                 {disks}
                 <serial type='file'><source path='{d}/console.log'/><target port='0'/></serial>
                 <channel type='unix'><source mode='bind' path='{d}/agent.sock'/><target type='virtio' name='org.drover.agent'/></channel>
                 <memballoon model='none'/>
               </devices></domain>",
            k = guest.vmlinux.display(),
            i = guest.initramfs.display(),
            c = guest.cmdline,
            d = dir.display(),
        );
        let file = dir.join("domain.xml");
        std::fs::write(&file, xml).unwrap();
        let out = Command::new("virsh").args(["-c", URI, "define"]).arg(&file).output().unwrap();
        assert!(out.status.success(), "virsh define: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Makes sure a libvirt daemon answers at [`URI`], starting one if needed. Panics with what
    /// to do when it cannot.
    pub fn ensure_daemon() {
        if answers() {
            return;
        }
        for (daemon, args) in [("virtlogd", &["-d"][..]), ("libvirtd", &["-d"][..])] {
            let status = Command::new(daemon).args(args).status();
            match status {
                Ok(s) if s.success() => {}
                Ok(s) => eprintln!("{daemon} -d exited with {s} (it may be running already)"),
                Err(e) => panic!("{daemon} cannot be started ({e}): run scripts/install-deps"),
            }
        }
        let started = Instant::now();
        while started.elapsed() < START_TIMEOUT {
            if answers() {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("libvirtd started but {URI} did not answer within {START_TIMEOUT:?}");
    }
}
