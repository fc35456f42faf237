//! The host agent's service side: [`LocalAgent`] implements [`HostAgent`] on the host it runs on,
//! over the hypervisor driver (change tracking) and drover-block (chains, NBD, copies).
//!
//! `drover serve` runs one in-process for its own host; over the simulated hypervisor it is the
//! simulated agent of the fast tests (its change tracking is offline only, with real QEMU tools).
//!
//! Paths. The agent turns references into paths and nothing else does: a disk is
//! `<datastore>/<vm>/<disk>.qcow2`, a chain `<datastore>/<replica>/<disk>/`, and a [`PointFile`]
//! handed back by the control plane is accepted only inside a registered datastore. Cuts and
//! transfers work in `<work_dir>/c-<id>` and `<work_dir>/t-<id>`, named after the caller's
//! checked id.
//!
//! State. A transfer runs as a task of the agent; its status is kept in memory until the caller
//! forgets it (bounded: the oldest finished ones go first). An offline cut keeps its storage
//! daemon (the point in time) until it is ended; after a restart of the agent the cut is ended
//! from its names alone, which the tracking layer makes idempotent.
//!
//! Between agents ([`peer`]): an agent with a data listener ([`LocalAgent::serve_data`]) hands
//! out its cuts as [`SourceEndpoint::Peer`]; an agent whose transfer names such a source dials it
//! and pulls the cut, journalling under `<work_dir>/j-<id>` so a re-run resumes.

#[cfg(feature = "test-support")]
pub mod conformance;
pub mod freeze;
pub mod host_paths;
pub mod identity;
mod pace;
pub mod peer;
pub mod server;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use drover_agent_api::*;
use drover_block::chain::{ChainDir, manifest_path};
use drover_block::copy::{
    CopyStats, TargetBefore, copy_extents, copy_extents_into, hash_compare_sync, manifest_compare_sync,
};
use drover_block::direct::{DirectImage, PlacedImage};
use drover_block::extents::ExtentSet;
use drover_block::hash::Manifest;
use drover_block::nbd::NbdClient;
use drover_hv::tracking::{BitmapState, CycleExport, OfflineCycleExport};
use drover_hv::{ChangeTracking, HvError, Hypervisor};
use drover_qemu::qsd::{Backing, NbdEndpoint, NbdExport, Qcow2Node, StorageDaemon};
use peer::{Advert, DataListener, PeerClient, PeerCut, PeerCuts, PeerRetry, PeerStreams};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Finished transfers kept for their callers to read before the oldest are dropped.
const KEEP_FINISHED: usize = 256;

/// The agent of the host this process runs on.
#[derive(Debug)]
pub struct LocalAgent {
    hv: Arc<dyn Hypervisor>,
    work_dir: PathBuf,
    datastores: Mutex<HashMap<Uuid, PathBuf>>,
    offline_cuts: tokio::sync::Mutex<HashMap<String, OfflineCycleExport>>,
    transfers: Mutex<Transfers>,
    /// Where datastores may be (a `drover agent`'s `--datastore-root`); `None` for the agent
    /// inside `drover serve`, whose control plane checks its own roots before it registers one.
    datastore_roots: Option<host_paths::HostPaths>,
    /// Cuts served to other agents by the data listener, with their instances.
    peer_cuts: PeerCuts,
    /// Where other agents reach this one's data listener, once it serves one.
    advert: Mutex<Option<Advert>>,
    /// How this agent dials other agents' data listeners.
    peer: Arc<PeerClient>,
    /// The most this agent's data listener sends, over all the transfers it serves at once.
    global_bandwidth_cap: Option<Arc<pace::TokenBucket>>,
    /// Guest freezes holding now, each with its watchdog.
    freezes: freeze::Freezes,
}

#[derive(Debug, Default)]
struct Transfers {
    by_id: HashMap<String, Arc<TransferEntry>>,
    /// Ids in the order their transfers began, for dropping the oldest finished ones.
    order: VecDeque<String>,
}

#[derive(Debug)]
struct TransferEntry {
    target: PointFile,
    done: AtomicU64,
    total: AtomicU64,
    result: Mutex<Option<AgentResult<TransferOutcome>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl TransferEntry {
    fn status(&self, id: &str) -> TransferStatus {
        let result = self.result.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (state, outcome, error) = match result {
            None => (TransferState::Running, None, None),
            Some(Ok(o)) => (TransferState::Done, Some(o), None),
            Some(Err(e)) => (TransferState::Failed, None, Some(e)),
        };
        TransferStatus {
            id: id.to_string(),
            target: self.target.clone(),
            state,
            bytes_done: self.done.load(Ordering::Relaxed),
            bytes_total: self.total.load(Ordering::Relaxed),
            outcome,
            error,
        }
    }
}

/// What a cut's token holds: enough to end it after a restart of either side.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum CutToken {
    Live(CycleExport),
    Offline,
}

/// The class of a driver error, for the caller across the seam.
pub fn hv_error(e: HvError) -> AgentError {
    let kind = match &e {
        HvError::Timeout(..) => ErrorKind::Retry,
        HvError::ImageLocked(_) => ErrorKind::Busy,
        HvError::NotRunning(_) | HvError::BitmapUnusable { .. } => ErrorKind::Conflict,
        HvError::UnknownVm(_) => ErrorKind::Gone,
        HvError::InvalidSpec(_) => ErrorKind::Invalid,
        HvError::Unsupported(_) => ErrorKind::Unsupported,
        _ => ErrorKind::Internal,
    };
    AgentError::new(kind, drover_types::error_chain(&e))
}

fn internal(e: impl std::error::Error + 'static) -> AgentError {
    AgentError::internal(drover_types::error_chain(&e))
}

impl LocalAgent {
    /// An agent driving `hv`, working (sockets, daemons, fleece images) under `work_dir`.
    pub fn new(hv: Arc<dyn Hypervisor>, work_dir: impl Into<PathBuf>) -> LocalAgent {
        let work_dir = work_dir.into();
        LocalAgent {
            freezes: freeze::Freezes::new(hv.clone(), &work_dir),
            hv,
            work_dir,
            datastores: Mutex::new(HashMap::new()),
            offline_cuts: tokio::sync::Mutex::new(HashMap::new()),
            transfers: Mutex::new(Transfers::default()),
            datastore_roots: None,
            peer_cuts: PeerCuts::default(),
            advert: Mutex::new(None),
            peer: Arc::new(PeerClient::default()),
            global_bandwidth_cap: None,
        }
    }

    /// Starts `program thaw-watchdog` (the `drover` binary) as a detached process before each
    /// freeze of a guest whose driver has a guest agent socket, so the guest is thawed even if
    /// this process dies while the freeze holds (see the freeze module).
    pub fn with_thaw_watchdog(mut self, program: PathBuf) -> LocalAgent {
        self.freezes.program = Some(program);
        self
    }

    /// Thaws every guest a freeze of an earlier run of this agent left frozen (it was killed
    /// while the freeze held): call once at start. Returns how many were thawed.
    pub async fn thaw_leftover_freezes(&self) -> usize {
        self.freezes.thaw_leftovers().await
    }

    /// Caps what this agent's data listener sends, over every transfer it serves at once, in
    /// bytes per second (`None` or 0: no cap). A transfer with a limit of its own
    /// ([`TransferSpec::bandwidth_limit`]) is paced by both. No schedule: the cap holds at all
    /// hours. Set it before [`LocalAgent::serve_data`].
    pub fn with_global_bandwidth_cap(mut self, bytes_per_second: Option<u64>) -> LocalAgent {
        self.global_bandwidth_cap = bytes_per_second.and_then(pace::TokenBucket::new).map(Arc::new);
        self
    }

    /// Dials other agents' data listeners with mutual TLS (`drover_pki::client_config` of this
    /// agent's identity). Without it the agent dials plain TCP, which is for tests only.
    pub fn with_peer_tls(mut self, config: rustls::ClientConfig) -> LocalAgent {
        self.peer = Arc::new(PeerClient { tls: Some(Arc::new(config)), ..(*self.peer).clone() });
        self
    }

    /// How a transfer from another agent retries a broken connection.
    pub fn with_peer_retry(mut self, retry: PeerRetry) -> LocalAgent {
        self.peer = Arc::new(PeerClient { retry, ..(*self.peer).clone() });
        self
    }

    /// How many streams a transfer from another agent is pulled over.
    pub fn with_peer_streams(mut self, streams: PeerStreams) -> LocalAgent {
        self.peer = Arc::new(PeerClient { streams, ..(*self.peer).clone() });
        self
    }

    /// Serves this agent's cuts to other agents on `bind`, and from now on hands out cuts as
    /// [`SourceEndpoint::Peer`] at `advertise` (`host:port`; the bound address when `None`)
    /// under the TLS name `server_name` (`drover_pki::agent_dns_name` of this agent's host).
    /// `tls` is `drover_pki::server_config_requiring_client_cert` of this agent's identity;
    /// `None` serves plain TCP, for tests only (logged as such).
    pub async fn serve_data(
        &self,
        bind: SocketAddr,
        advertise: Option<String>,
        server_name: String,
        tls: Option<rustls::ServerConfig>,
    ) -> std::io::Result<DataListener> {
        let listener = peer::listen(bind, tls, self.peer_cuts.clone(), self.global_bandwidth_cap.clone()).await?;
        let address = advertise.unwrap_or_else(|| listener.local_addr().to_string());
        *self.advert.lock().unwrap_or_else(|e| e.into_inner()) = Some(Advert { address, server_name });
        Ok(listener)
    }

    /// Checks a transfer's source, and reads a cut of this very agent locally rather than
    /// through its own data listener.
    fn source_view(&self, source: &SourceEndpoint) -> AgentResult<SourceEndpoint> {
        let SourceEndpoint::Peer { address, server_name, cut, instance } = source else {
            return Ok(source.clone());
        };
        check_id("cut", cut)?;
        if address.is_empty() || address.len() > 255 {
            return Err(AgentError::invalid(format!("peer address {address:?} must be host:port")));
        }
        if rustls::pki_types::ServerName::try_from(server_name.as_str()).is_err() {
            return Err(AgentError::invalid(format!("peer server name {server_name:?} is not a DNS name or address")));
        }
        let own = self.peer_cuts.lock().unwrap_or_else(|e| e.into_inner()).get(cut).cloned();
        let mine =
            self.advert.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|a| &a.address == address);
        Ok(match own {
            Some(c) if mine && c.instance == *instance => SourceEndpoint::LocalNbd {
                socket: c.socket.to_string_lossy().into_owned(),
                export: c.export,
                meta_context: c.meta_context,
            },
            _ => source.clone(),
        })
    }

    /// The endpoint a cut is read from: over the data listener when this agent serves one and
    /// the cut names the host that reads it (`reader`); else on this host.
    fn cut_endpoint(
        &self,
        spec: &CutSpec,
        nbd: &NbdEndpoint,
        meta_context: &str,
        size: u64,
        image: Option<&Path>,
    ) -> SourceEndpoint {
        let (socket, export) = (&nbd.socket, &nbd.export_name);
        let cut = PeerCut {
            instance: Uuid::nil(),
            socket: socket.to_owned(),
            export: export.to_string(),
            meta_context: meta_context.to_string(),
            size,
            reader: spec.reader,
            image: image.map(Path::to_owned),
            files: Default::default(),
        };
        let id = spec.id.as_str();
        let instance = peer::register_cut(&self.peer_cuts, id, cut);
        match self.advert.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            Some(a) if spec.reader.is_some() => {
                SourceEndpoint::Peer { address: a.address, server_name: a.server_name, cut: id.to_string(), instance }
            }
            _ => SourceEndpoint::LocalNbd {
                socket: socket.to_string_lossy().into_owned(),
                export: export.to_string(),
                meta_context: meta_context.to_string(),
            },
        }
    }

    /// Confines datastores to `roots`: a datastore outside them is refused, one inside is created
    /// (private, 0700) when missing. What a standalone agent does: the control plane that names
    /// the datastore is not trusted with the host's whole file system.
    pub fn with_datastore_roots(mut self, roots: host_paths::HostPaths) -> LocalAgent {
        self.datastore_roots = Some(roots);
        self
    }

    fn tracking(&self) -> AgentResult<&dyn ChangeTracking> {
        self.hv.change_tracking().ok_or_else(|| {
            AgentError::new(
                ErrorKind::Unsupported,
                format!("replication needs change tracking, which the {} hypervisor does not have", self.hv.kind()),
            )
        })
    }

    fn datastore(&self, id: Uuid) -> AgentResult<PathBuf> {
        self.datastores
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
            .ok_or_else(|| AgentError::invalid(format!("datastore {id} is not registered with this agent")))
    }

    /// A VM's disk image: where the hypervisor holds it (an imported libvirt domain's disk, at
    /// the path its definition gives), else in the VM's datastore.
    async fn disk_image(&self, disk: &DiskRef) -> AgentResult<PathBuf> {
        check_disk_name(&disk.disk)?;
        if let Some(path) = self.hv.disk_location(disk.vm, disk.index).await.map_err(hv_error)? {
            return Ok(path);
        }
        Ok(self.datastore(disk.datastore)?.join(disk.vm.to_string()).join(format!("{}.qcow2", disk.disk)))
    }

    /// A VM's own disk as a failback's target, and where its manifest is kept: beside a disk in
    /// a datastore; for a disk the hypervisor holds elsewhere (an imported libvirt domain's), in
    /// the VM's directory of its datastore (0700), so nothing is added beside the
    /// administrator's image.
    async fn disk_target(&self, disk: &DiskRef) -> AgentResult<(PathBuf, PathBuf)> {
        check_disk_name(&disk.disk)?;
        let dir = self.datastore(disk.datastore)?.join(disk.vm.to_string());
        let Some(image) = self.hv.disk_location(disk.vm, disk.index).await.map_err(hv_error)? else {
            let image = dir.join(format!("{}.qcow2", disk.disk));
            let manifest = manifest_path(&image);
            return Ok((image, manifest));
        };
        let made = dir.clone();
        tokio::task::spawn_blocking(move || host_paths::create_private_dir_all(&made))
            .await
            .map_err(internal)?
            .map_err(|e| AgentError::internal(format!("creating {}: {e}", dir.display())))?;
        Ok((image, dir.join(format!("{}.manifest", disk.disk))))
    }

    /// The image a cut reads: the disk's own, or a boot overlay it names (offline only).
    async fn cut_image(&self, spec: &CutSpec) -> AgentResult<PathBuf> {
        match &spec.file {
            None => self.disk_image(&spec.disk).await,
            Some(_) if spec.live => Err(AgentError::invalid("a boot overlay is cut with its VM stopped (offline)")),
            Some(file) => {
                let path = self.point_path(file)?;
                if !is_boot_overlay(&path) {
                    return Err(AgentError::invalid(format!("{:?} is not a boot overlay", file.0)));
                }
                Ok(path)
            }
        }
    }

    fn chain_dir(&self, chain: &ChainRef) -> AgentResult<ChainDir> {
        check_disk_name(&chain.disk)?;
        Ok(ChainDir::new(self.datastore(chain.datastore)?.join(chain.replica.to_string()).join(&chain.disk)))
    }

    /// The path of a point file, which must lie inside a registered datastore: the handle comes
    /// back from the control plane, and nothing but this agent's own files may be opened by it.
    fn point_path(&self, file: &PointFile) -> AgentResult<PathBuf> {
        let path = Path::new(&file.0);
        let plain =
            path.is_absolute() && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        let inside = self.datastores.lock().unwrap_or_else(|e| e.into_inner()).values().any(|d| path.starts_with(d));
        if plain && inside {
            Ok(path.to_owned())
        } else {
            Err(AgentError::invalid(format!("point file {:?} is not in a datastore of this agent", file.0)))
        }
    }

    /// A file a VM imports or boots from. A standalone agent checks it against its own import
    /// directories (the control plane is not trusted with the host's files); the agent inside
    /// `drover serve` takes the path its control plane already resolved against its own.
    async fn import_file(&self, what: &str, requested: &str) -> AgentResult<PathBuf> {
        match &self.datastore_roots {
            Some(roots) => {
                let (roots, what, requested) = (roots.clone(), what.to_string(), requested.to_string());
                tokio::task::spawn_blocking(move || roots.import_file(&what, &requested))
                    .await
                    .map_err(internal)?
                    .map_err(|e| AgentError::invalid(e.to_string()))
            }
            None => {
                let path = Path::new(requested);
                if path.is_absolute()
                    && path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
                {
                    Ok(path.to_owned())
                } else {
                    Err(AgentError::invalid(format!("{what} {requested:?} must be an absolute, plain path")))
                }
            }
        }
    }

    /// The directory of a VM's own disks in a datastore.
    fn vm_dir(&self, datastore: Uuid, vm: Uuid) -> AgentResult<PathBuf> {
        Ok(self.datastore(datastore)?.join(vm.to_string()))
    }

    /// The driver's spec of a VM to run: references turned into this host's paths.
    async fn hv_spec(&self, spec: &VmRunSpec) -> AgentResult<drover_hv::VmSpec> {
        spec.check()?;
        let mut disks = Vec::with_capacity(spec.disks.len());
        for d in &spec.disks {
            let path = match d {
                VmDisk::Image(r) => self.disk_image(r).await?,
                VmDisk::Overlay { file } => {
                    let path = self.point_path(file)?;
                    if !is_boot_overlay(&path) {
                        return Err(AgentError::invalid(format!("{:?} is not a boot overlay", file.0)));
                    }
                    path
                }
            };
            disks.push(drover_hv::DiskSpec { path });
        }
        let kernel = match &spec.boot.kernel {
            Some(k) => Some(self.import_file("boot kernel", k).await?),
            None => None,
        };
        let initrd = match &spec.boot.initrd {
            Some(k) => Some(self.import_file("boot initrd", k).await?),
            None => None,
        };
        Ok(drover_hv::VmSpec {
            id: spec.id,
            name: spec.name.clone(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disks,
            nics: spec
                .nics
                .iter()
                .map(|n| drover_hv::NicSpec { network: n.network.clone(), mac: n.mac.clone(), no_uplink: n.no_uplink })
                .collect(),
            boot: drover_hv::BootSpec {
                kernel,
                initrd,
                cmdline: spec.boot.cmdline.clone(),
                firmware: spec.boot.firmware,
            },
            hardware: spec.hardware.clone(),
        })
    }

    fn cut_dir(&self, id: &str) -> PathBuf {
        self.work_dir.join(format!("c-{id}"))
    }

    /// Where a running VM's live cuts are exported: one directory per VM, since QEMU runs one
    /// NBD server per process and every disk of the VM shares its socket (see
    /// `drover_hv::tracking`).
    fn live_cut_dir(&self, vm: Uuid) -> PathBuf {
        self.work_dir.join(format!("v-{vm}"))
    }

    fn entry(&self, id: &str) -> Option<Arc<TransferEntry>> {
        self.transfers.lock().unwrap_or_else(|e| e.into_inner()).by_id.get(id).cloned()
    }
}

/// Whether a file is a boot overlay of a chain (`boot-<label>.qcow2`, see `ChainDir::boot_overlay`).
fn is_boot_overlay(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("boot-") && n.ends_with(".qcow2"))
}

async fn remove_dir_if_there(dir: &Path) -> AgentResult<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AgentError::internal(format!("cannot remove {}: {e}", dir.display()))),
    }
}

fn wait_of(timeout: std::time::Duration) -> AgentResult<std::time::Duration> {
    if timeout.as_millis() > u128::from(wire::MAX_WAIT_MS) {
        return Err(AgentError::invalid(format!("a wait is at most {} s", wire::MAX_WAIT_MS / 1000)));
    }
    Ok(timeout)
}

fn bitmap_info(states: Vec<BitmapState>) -> Vec<BitmapInfo> {
    states
        .into_iter()
        .map(|b| BitmapInfo {
            name: b.name,
            persistent: b.persistent,
            recording: b.recording,
            inconsistent: b.inconsistent,
        })
        .collect()
}

#[async_trait]
impl HostAgent for LocalAgent {
    fn info(&self) -> AgentInfo {
        AgentInfo {
            api_version: API_VERSION,
            hypervisor: self.hv.kind().to_string(),
            live_change_tracking: matches!(self.hv.kind(), "qemu" | "libvirt"),
        }
    }

    async fn datastore_ensure(&self, spec: &DatastoreSpec) -> AgentResult<()> {
        let path = Path::new(&spec.path);
        if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
            return Err(AgentError::invalid(format!("datastore path {:?} must be absolute and plain", spec.path)));
        }
        let path = match &self.datastore_roots {
            None => path.to_owned(),
            Some(roots) => {
                let (roots, requested) = (roots.clone(), spec.path.clone());
                tokio::task::spawn_blocking(move || -> AgentResult<PathBuf> {
                    let dir = roots.datastore_dir(&requested).map_err(|e| AgentError::invalid(e.to_string()))?;
                    host_paths::create_private_dir_all(&dir).map_err(|e| {
                        AgentError::internal(format!("cannot make the datastore directory {requested:?}: {e}"))
                    })?;
                    Ok(dir)
                })
                .await
                .map_err(internal)??
            }
        };
        self.datastores.lock().unwrap_or_else(|e| e.into_inner()).insert(spec.id, path);
        Ok(())
    }

    async fn disk_info(&self, disk: &DiskRef, live: bool) -> AgentResult<DiskInfo> {
        let mut image = self.disk_image(disk).await?;
        if live {
            // A running VM's disk is the file it was started on (a replica's: its boot overlay).
            let runtime = self.hv.runtime_disks(disk.vm).await.map_err(hv_error)?;
            if let Some(file) = runtime.get(disk.index) {
                image = file.clone();
            }
        }
        let size = drover_qemu::image::info(&image).await.map_err(|e| hv_error(e.into()))?.virtual_size;
        let ct = self.tracking()?;
        let states = if live { ct.state(disk.vm, disk.index).await } else { ct.state_offline(&image).await }
            .map_err(hv_error)?;
        Ok(DiskInfo { size, bitmaps: bitmap_info(states) })
    }

    async fn cut_begin(&self, spec: &CutSpec) -> AgentResult<Cut> {
        check_id("cut", &spec.id)?;
        let image = self.cut_image(spec).await?;
        let ct = self.tracking()?;
        let dir = self.cut_dir(&spec.id);
        let ctx = |e: HvError| hv_error(e).context(format!("disk {}", spec.disk.disk));
        if spec.live {
            for b in &spec.remove {
                ct.remove(spec.disk.vm, spec.disk.index, b).await.map_err(ctx)?;
            }
            if spec.fresh {
                ct.enable(spec.disk.vm, spec.disk.index, &spec.current).await.map_err(ctx)?;
            }
            let dir = self.live_cut_dir(spec.disk.vm);
            let x = ct.cut_begin(spec.disk.vm, spec.disk.index, &spec.current, &spec.next, &dir).await.map_err(ctx)?;
            return Ok(Cut {
                id: spec.id.clone(),
                size: x.virtual_size,
                source: self.cut_endpoint(spec, &x.nbd, &x.meta_context, x.virtual_size, None),
                token: serde_json::to_value(CutToken::Live(x)).map_err(internal)?,
            });
        }
        let mut cuts = self.offline_cuts.lock().await;
        if !cuts.contains_key(&spec.id) {
            for b in &spec.remove {
                ct.remove_offline(&image, b).await.map_err(ctx)?;
            }
            if spec.fresh {
                ct.enable_offline(&image, &spec.current).await.map_err(ctx)?;
            }
            let x = ct.cut_begin_offline(&image, &spec.current, &spec.next, &dir).await.map_err(ctx)?;
            cuts.insert(spec.id.clone(), x);
        }
        let x = &cuts[&spec.id];
        Ok(Cut {
            id: spec.id.clone(),
            size: x.virtual_size,
            source: self.cut_endpoint(spec, &x.nbd, &x.meta_context, x.virtual_size, Some(&image)),
            token: serde_json::to_value(CutToken::Offline).map_err(internal)?,
        })
    }

    async fn cut_end(&self, spec: &CutSpec, cut: Option<&Cut>, success: bool) -> AgentResult<()> {
        check_id("cut", &spec.id)?;
        let ct = self.tracking()?;
        let ctx = |e: HvError| hv_error(e).context(format!("disk {}", spec.disk.disk));
        // No peer may pull it any more.
        self.peer_cuts.lock().unwrap_or_else(|e| e.into_inner()).remove(&spec.id);
        if spec.live {
            // Without the cut's record (its step failed before returning it) there is nothing to
            // end here: a rerun's cut with the same names resumes it.
            let token = cut.map(|c| serde_json::from_value::<CutToken>(c.token.clone()));
            if let Some(Ok(CutToken::Live(x))) = token {
                ct.cut_end(&x, success).await.map_err(ctx)?;
            }
            // Removed once the VM's last cut has ended (its other disks' may still be exported).
            let _ = tokio::fs::remove_dir(self.live_cut_dir(spec.disk.vm)).await;
        } else {
            let image = self.cut_image(spec).await?;
            let held = self.offline_cuts.lock().await.remove(&spec.id);
            let result = match held {
                Some(x) => ct.cut_end_offline(x, success).await,
                None => {
                    ct.cut_recover_offline(&image, &spec.current, &spec.next, &self.cut_dir(&spec.id), success).await
                }
            };
            match result {
                // Nothing left to end: the bitmap is gone (a cut ended before, or never begun).
                Ok(()) | Err(HvError::BitmapUnusable { .. }) => {}
                Err(e) => return Err(ctx(e)),
            }
        }
        let _ = tokio::fs::remove_dir_all(self.cut_dir(&spec.id)).await;
        Ok(())
    }

    async fn point_create(&self, spec: &PointSpec) -> AgentResult<PointFile> {
        let chain = self.chain_dir(&spec.chain)?;
        let prev = spec.prev.as_ref().map(|p| self.point_path(p)).transpose()?;
        let file = chain.new_point_file(spec.size, prev.as_deref()).await.map_err(internal)?;
        Ok(PointFile(file.to_string_lossy().into_owned()))
    }

    async fn chain_collect_garbage(&self, chain: &ChainRef, keep: &[PointFile]) -> AgentResult<Vec<String>> {
        let dir = self.chain_dir(chain)?;
        let keep: Vec<PathBuf> = keep.iter().map(|k| PathBuf::from(&k.0)).collect();
        let gone = dir.collect_garbage(&keep).await.map_err(internal)?;
        Ok(gone.into_iter().map(|p| p.to_string_lossy().into_owned()).collect())
    }

    async fn chain_retire_oldest(
        &self,
        chain: &ChainRef,
        oldest: &PointFile,
        next: &PointFile,
        after: Option<&PointFile>,
    ) -> AgentResult<PointFile> {
        let dir = self.chain_dir(chain)?;
        let (oldest, next) = (self.point_path(oldest)?, self.point_path(next)?);
        let after = after.map(|a| self.point_path(a)).transpose()?;
        let holder = dir.retire_oldest(&oldest, &next, after.as_deref()).await.map_err(internal)?;
        Ok(PointFile(holder.to_string_lossy().into_owned()))
    }

    async fn transfer_ensure(&self, spec: &TransferSpec) -> AgentResult<TransferStatus> {
        check_id("transfer", &spec.id)?;
        if spec.bandwidth_limit == Some(0) {
            return Err(AgentError::invalid("a bandwidth limit of 0 bytes per second would never finish"));
        }
        if let Some(e) = self.entry(&spec.id) {
            let status = e.status(&spec.id);
            if status.state != TransferState::Failed {
                return Ok(status);
            }
        }
        let (target, target_manifest) = match &spec.target_disk {
            None => {
                let target = self.point_path(&spec.target)?;
                let manifest = manifest_path(&target);
                (target, manifest)
            }
            Some(disk) => self.disk_target(disk).await?,
        };
        if spec.target_disk.is_some() && spec.prev.is_some() {
            return Err(AgentError::invalid("a transfer into a VM's own disk is over no point"));
        }
        let prev = spec.prev.as_ref().map(|p| self.point_path(p)).transpose()?;
        // What the target holds before the transfer, as a manifest: the previous point's (the
        // target is an empty overlay on it), or, for the blocks of a bitmap written straight into a
        // file (a failback's last delta into production), the file's own, which must describe it
        // still.
        let base_manifest = match (&prev, spec.mode) {
            (Some(prev), _) => Some(manifest_path(prev)),
            (None, TransferMode::Bitmap) => {
                check_manifest_current(&target, &target_manifest).await?;
                Some(target_manifest.clone())
            }
            (None, _) => None,
        };
        let direct = match &spec.source_files {
            Some(d) => Some(self.disk_image(d).await?),
            None => None,
        };
        let mut spec = spec.clone();
        spec.source = self.source_view(&spec.source)?;
        let spec = &spec;
        let entry = Arc::new(TransferEntry {
            target: spec.target.clone(),
            done: AtomicU64::new(0),
            total: AtomicU64::new(spec.size),
            result: Mutex::new(None),
            task: Mutex::new(None),
        });
        let job = Job {
            spec: spec.clone(),
            target,
            target_manifest,
            prev,
            base_manifest,
            direct,
            work: self.work_dir.join(format!("t-{}", spec.id)),
            journal: self.work_dir.join(format!("j-{}", spec.id)),
            peer: self.peer.clone(),
            entry: entry.clone(),
        };
        {
            let mut t = self.transfers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(old) = t.by_id.insert(spec.id.clone(), entry.clone())
                && let Some(h) = old.task.lock().unwrap_or_else(|e| e.into_inner()).take()
            {
                h.abort();
            }
            t.order.retain(|x| x != &spec.id);
        }
        let handle = tokio::spawn(async move {
            let entry = job.entry.clone();
            let result = job.run().await;
            *entry.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        });
        *entry.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        {
            let mut t = self.transfers.lock().unwrap_or_else(|e| e.into_inner());
            t.order.push_back(spec.id.clone());
            // Bounded memory: drop the oldest finished transfers nobody forgot.
            while t.order.len() > KEEP_FINISHED {
                let Some(old) = t.order.pop_front() else { break };
                let gone =
                    t.by_id.get(&old).is_some_and(|e| e.result.lock().unwrap_or_else(|p| p.into_inner()).is_some());
                if gone {
                    t.by_id.remove(&old);
                } else {
                    t.order.push_back(old);
                    break;
                }
            }
        }
        Ok(entry.status(&spec.id))
    }

    async fn transfer_status(&self, id: &str) -> AgentResult<TransferStatus> {
        check_id("transfer", id)?;
        self.entry(id).map(|e| e.status(id)).ok_or_else(|| AgentError::gone(format!("this agent has no transfer {id}")))
    }

    async fn transfer_forget(&self, id: &str) -> AgentResult<()> {
        check_id("transfer", id)?;
        let entry = {
            let mut t = self.transfers.lock().unwrap_or_else(|e| e.into_inner());
            t.order.retain(|x| x != id);
            t.by_id.remove(id)
        };
        if let Some(h) = entry.and_then(|e| e.task.lock().unwrap_or_else(|p| p.into_inner()).take()) {
            h.abort();
        }
        let _ = tokio::fs::remove_dir_all(self.work_dir.join(format!("t-{id}"))).await;
        peer::remove_journal(&self.work_dir.join(format!("j-{id}"))).await;
        Ok(())
    }

    async fn vm_disks_ensure(&self, spec: &VmDisksSpec) -> AgentResult<()> {
        let dir = self.vm_dir(spec.datastore, spec.vm)?;
        if spec.disks.len() > 64 {
            return Err(AgentError::invalid("a VM has at most 64 disks"));
        }
        for d in &spec.disks {
            check_disk_name(&d.name)?;
        }
        tokio::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .await
            .map_err(|e| AgentError::internal(format!("cannot create {}: {e}", dir.display())))?;
        for d in &spec.disks {
            let path = dir.join(format!("{}.qcow2", d.name));
            // Idempotent: an image that is there and readable was made by an earlier attempt,
            // which wrote it under a temporary name and renamed it only when complete.
            if drover_qemu::image::info(&path).await.is_ok() {
                continue;
            }
            let partial = path.with_extension("qcow2.partial");
            let _ = drover_qemu::image::remove(&partial).await;
            let made = match &d.import_from {
                Some(src) => {
                    let src = self.import_file(&format!("disk {:?} import_from", d.name), src).await?;
                    drover_qemu::image::import_qcow2(&src, &partial).await
                }
                None => drover_qemu::image::create_qcow2(&partial, d.size).await,
            };
            made.map_err(|e| hv_error(e.into()).context(format!("disk {}", d.name)))?;
            // Private whatever the process's umask: a disk image is the tenant's data.
            tokio::fs::set_permissions(&partial, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .await
                .map_err(|e| AgentError::internal(format!("cannot make {} private: {e}", partial.display())))?;
            drover_qemu::durable::publish(&partial, &path)
                .await
                .map_err(|e| AgentError::internal(format!("cannot move {} into place: {e}", path.display())))?;
        }
        Ok(())
    }

    async fn vm_disks_remove(&self, datastore: Uuid, vm: Uuid) -> AgentResult<()> {
        remove_dir_if_there(&self.vm_dir(datastore, vm)?).await
    }

    async fn vm_power_on(&self, spec: &VmRunSpec) -> AgentResult<()> {
        let spec = self.hv_spec(spec).await?;
        self.hv.power_on(&spec).await.map_err(hv_error)
    }

    async fn vm_shutdown(&self, vm: Uuid, timeout: std::time::Duration) -> AgentResult<ShutdownOutcome> {
        self.hv.shutdown(vm, wait_of(timeout)?).await.map_err(hv_error)
    }

    async fn vm_power_off(&self, vm: Uuid) -> AgentResult<()> {
        self.hv.power_off(vm).await.map_err(hv_error)
    }

    async fn vm_status(&self, vm: Uuid) -> AgentResult<PowerState> {
        match self.hv.status(vm).await {
            Err(HvError::UnknownVm(_)) => Ok(PowerState::Off),
            other => other.map_err(hv_error),
        }
    }

    async fn vm_wait_heartbeat(&self, vm: Uuid, timeout: std::time::Duration) -> AgentResult<Heartbeat> {
        self.hv.wait_heartbeat(vm, wait_of(timeout)?).await.map_err(hv_error)
    }

    async fn vm_write_marker(&self, vm: Uuid, marker: &str) -> AgentResult<()> {
        if marker.len() > MAX_TEXT_LEN {
            return Err(AgentError::invalid(format!("a marker is at most {MAX_TEXT_LEN} bytes")));
        }
        self.hv.write_marker(vm, marker).await.map_err(hv_error)
    }

    async fn vm_check_tcp_port(&self, vm: Uuid, port: u16, timeout: std::time::Duration) -> AgentResult<TcpPortState> {
        self.hv.check_tcp_port(vm, port, wait_of(timeout)?).await.map_err(hv_error)
    }

    async fn vm_forget(&self, vm: Uuid, discard_overlays: bool) -> AgentResult<()> {
        let disks = if discard_overlays { self.hv.runtime_disks(vm).await.map_err(hv_error)? } else { Vec::new() };
        self.hv.forget(vm).await.map_err(hv_error)?;
        for d in disks {
            // Only this agent's own boot overlays, whatever the runtime record says.
            let file = PointFile(d.to_string_lossy().into_owned());
            if is_boot_overlay(&d) && self.point_path(&file).is_ok() {
                match tokio::fs::remove_file(&d).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(AgentError::internal(format!("removing {}: {e}", d.display()))),
                }
            }
        }
        Ok(())
    }

    async fn domains(&self) -> AgentResult<Vec<drover_agent_api::HostDomain>> {
        self.hv.domains().await.map_err(hv_error)
    }

    async fn networks(&self) -> AgentResult<Vec<drover_agent_api::HostNetwork>> {
        self.hv.networks().await.map_err(hv_error)
    }

    async fn vm_list(&self) -> AgentResult<Vec<VmPresence>> {
        let vms = self.hv.reattach().await.map_err(hv_error)?;
        Ok(vms.into_iter().map(|(vm, power)| VmPresence { vm, power }).collect())
    }

    async fn vm_freeze(&self, vm: Uuid, spec: &FreezeSpec) -> AgentResult<FreezeOutcome> {
        self.freezes.freeze(vm, spec).await
    }

    async fn vm_thaw(&self, vm: Uuid, id: &str) -> AgentResult<ThawOutcome> {
        self.freezes.thaw(vm, id).await
    }

    async fn vm_boot_overlays(&self, vm: Uuid) -> AgentResult<Vec<PointFile>> {
        let disks = self.hv.runtime_disks(vm).await.map_err(hv_error)?;
        let files: Vec<PointFile> = disks.iter().map(|d| PointFile(d.to_string_lossy().into_owned())).collect();
        // Only this agent's own boot overlays; a VM that ran on anything else has none.
        if files.iter().zip(&disks).all(|(f, d)| is_boot_overlay(d) && self.point_path(f).is_ok()) {
            Ok(files)
        } else {
            Ok(Vec::new())
        }
    }

    async fn boot_overlay_ensure(&self, chain: &ChainRef, point: &PointFile, label: &str) -> AgentResult<PointFile> {
        check_id("boot overlay label", label)?;
        let dir = self.chain_dir(chain)?;
        let file = self.point_path(point)?;
        if file.parent() != Some(dir.path()) {
            return Err(AgentError::invalid(format!("point file {:?} is not in chain {}", point.0, chain.disk)));
        }
        let overlay = dir.boot_overlay(&file, label).await.map_err(|e| AgentError::conflict(e.to_string()))?;
        Ok(PointFile(overlay.to_string_lossy().into_owned()))
    }
}

/// One transfer, run as a task of the agent.
struct Job {
    spec: TransferSpec,
    target: PathBuf,
    /// Where the target's manifest is written (beside a point file; in the VM's datastore for
    /// an imported domain's disk, not beside the administrator's image).
    target_manifest: PathBuf,
    prev: Option<PathBuf>,
    /// The manifest the target's starts from (see `transfer_ensure`); none: the target is new.
    base_manifest: Option<PathBuf>,
    direct: Option<PathBuf>,
    work: PathBuf,
    /// The journal of a transfer from another agent (kept across failures, for resuming).
    journal: PathBuf,
    peer: Arc<PeerClient>,
    entry: Arc<TransferEntry>,
}

impl Job {
    async fn run(self) -> AgentResult<TransferOutcome> {
        // The target: the new point file, written through a storage daemon of its own.
        let daemon = StorageDaemon::start(&self.work).await.map_err(|e| hv_error(e.into()))?;
        let result = async {
            daemon.start_nbd_server().await?;
            let node = Qcow2Node {
                node_name: "target".into(),
                path: self.target.clone(),
                backing: Backing::FromImage,
                read_only: false,
            };
            // A seed writes a new image once: past the page cache, as `add_qcow2_direct` says.
            if self.prev.is_none() {
                daemon.add_qcow2_direct(&node).await?;
            } else {
                daemon.add_qcow2(&node).await?;
            }
            daemon
                .add_nbd_export(&NbdExport {
                    id: "target".into(),
                    node_name: "target".into(),
                    name: "target".into(),
                    writable: true,
                    bitmaps: vec![],
                })
                .await
        }
        .await;
        let target = match result {
            Ok(t) => t,
            Err(e) => {
                let _ = daemon.shutdown().await;
                return Err(hv_error(e.into()));
            }
        };
        let result = self.copy(&target.socket, &target.export_name).await;
        let _ = daemon.shutdown().await;
        let _ = tokio::fs::remove_dir_all(&self.work).await;
        // The manifest is saved once the daemon has closed the target (closing writes its header),
        // so a manifest newer than its file describes it (see `check_manifest_current`).
        let (outcome, manifest) = result?;
        manifest.save(&self.target_manifest).await.map_err(internal)?;
        // The point is whole and described: a peer transfer's journal has done its work.
        if outcome.peer.is_some() {
            peer::remove_journal(&self.journal).await;
        }
        Ok(outcome)
    }

    /// The point file to write at its places: a seed into a new file (its metadata
    /// preallocated, `ChainDir::new_point_file`), locally or pulled from another agent. Anything
    /// else, or a file that is not placed whole, is written through its storage daemon.
    async fn placed_target(&self) -> Option<PlacedImage> {
        if self.spec.mode != TransferMode::Seed || self.prev.is_some() {
            return None;
        }
        let placed = async {
            let map = drover_qemu::image::placed_map(&self.target).await.map_err(|e| e.to_string())??;
            PlacedImage::open(&map).map_err(|e| e.to_string())
        };
        match placed.await {
            Ok(p) => Some(p),
            Err(why) => {
                tracing::info!(%why, "transfer: the seed is written through the point's storage daemon");
                None
            }
        }
    }

    async fn base_manifest(&self) -> Result<Manifest, drover_block::hash::ManifestError> {
        match &self.base_manifest {
            Some(path) => Manifest::load(path).await,
            None => Ok(Manifest::zeroed(self.spec.size)),
        }
    }

    async fn copy(&self, target_socket: &Path, target_export: &str) -> AgentResult<(TransferOutcome, Manifest)> {
        let (socket, export, meta_context) = match &self.spec.source {
            SourceEndpoint::LocalNbd { socket, export, meta_context } => (socket, export, meta_context),
            SourceEndpoint::Peer { address, server_name, cut, instance } => {
                return self.copy_from_peer(target_socket, target_export, address, server_name, cut, *instance).await;
            }
        };
        let entry = self.entry.clone();
        let progress = move |done: u64, total: u64| {
            entry.done.store(done, Ordering::Relaxed);
            entry.total.store(total, Ordering::Relaxed);
        };
        let size = self.spec.size;
        let against_manifest = self.spec.mode == TransferMode::HashCompare && self.prev.is_some();
        // A powered-off disk read whole (a seed, or compared against the manifest) may be read
        // from its files: its cut holds it (nothing writes it), and reading through NBD would
        // cost the daemon as much CPU as the whole comparison. Anything only QEMU can decode is
        // read through NBD.
        let reads_whole = self.spec.mode == TransferMode::Seed || against_manifest;
        let (direct, note) = match &self.direct {
            Some(image) if reads_whole => match direct_source(image).await {
                Ok(d) => (Some(d), Some("source read from its files".to_string())),
                Err(why) => (None, Some(format!("source read through NBD: {why}"))),
            },
            _ => (None, None),
        };
        let mut placed = self.placed_target().await;
        let note = match (note, &placed) {
            (Some(n), Some(_)) => Some(format!("{n}, written at its places in the point file")),
            (n, _) => n,
        };
        let copy = async {
            let mut src = NbdClient::connect_unix(socket, export, &[meta_context, "base:allocation"]).await?;
            let mut dst = NbdClient::connect_unix(target_socket, target_export, &[]).await?;
            let mut manifest = self.base_manifest().await?;
            let stats: CopyStats = match self.spec.mode {
                TransferMode::Seed => {
                    // The source's block status decides what is read; a new point without a
                    // backing file reads as zeroes, so zeroes are not written into it at all.
                    let target = if self.prev.is_none() { TargetBefore::Zeroes } else { TargetBefore::Unknown };
                    let whole = ExtentSet::from_range(0, size);
                    let m = &mut manifest;
                    let stats = match (direct, placed.as_mut()) {
                        (Some(mut i), Some(p)) => copy_extents_into(&mut i, p, &whole, target, m, progress).await?,
                        (Some(mut i), None) => copy_extents_into(&mut i, &mut dst, &whole, target, m, progress).await?,
                        (None, Some(p)) => copy_extents_into(&mut src, p, &whole, target, m, progress).await?,
                        (None, None) => copy_extents_into(&mut src, &mut dst, &whole, target, m, progress).await?,
                    };
                    if placed.is_some() {
                        peer::check_placed(&mut dst, &manifest).await?;
                    }
                    stats
                }
                TransferMode::Bitmap => {
                    let dirty = src.dirty_extents(meta_context, 0, size).await?;
                    copy_extents(&mut src, &mut dst, &dirty, &mut manifest, progress).await?
                }
                // The new point is an empty overlay on the newest one, which its manifest
                // describes: only the source needs reading.
                TransferMode::HashCompare if against_manifest => match direct {
                    Some(mut image) => manifest_compare_sync(&mut image, &mut dst, &mut manifest, progress).await?,
                    None => manifest_compare_sync(&mut src, &mut dst, &mut manifest, progress).await?,
                },
                TransferMode::HashCompare => hash_compare_sync(&mut src, &mut dst, &mut manifest, progress).await?,
            };
            dst.disconnect().await?;
            let _ = src.disconnect().await;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((stats, manifest))
        }
        .await;
        let (stats, manifest) = copy.map_err(|e| AgentError::new(ErrorKind::Retry, e.to_string()))?;
        let outcome = TransferOutcome {
            manifest_digest: manifest.digest(),
            bytes_read: stats.source_read + stats.target_read,
            bytes_written: stats.written,
            note,
            peer: None,
        };
        Ok((outcome, manifest))
    }

    /// The transfer from another agent's cut: pulled over the data path, journalled, resumed.
    async fn copy_from_peer(
        &self,
        target_socket: &Path,
        target_export: &str,
        address: &str,
        server_name: &str,
        cut: &str,
        instance: Uuid,
    ) -> AgentResult<(TransferOutcome, Manifest)> {
        let retry = |e: drover_block::nbd::NbdError| AgentError::new(ErrorKind::Retry, format!("the point file: {e}"));
        let mut dst = NbdClient::connect_unix(target_socket, target_export, &[]).await.map_err(retry)?;
        let manifest = self.base_manifest().await.map_err(internal)?;
        // A hash-compare into a file no manifest describes hashes what it holds; otherwise the
        // target starts as its manifest says (empty, for a new point without a previous one).
        let hash_target = self.base_manifest.is_none() && self.spec.mode == TransferMode::HashCompare;
        let entry = self.entry.clone();
        let progress = Arc::new(move |done: u64, total: u64| {
            entry.done.store(done, Ordering::Relaxed);
            entry.total.store(total, Ordering::Relaxed);
        });
        let placed = self.placed_target().await;
        let written_how = match placed {
            Some(_) => "written at its places in the point file",
            None => "written through the point's storage daemon",
        };
        let job = peer::PullJob {
            address,
            server_name,
            cut,
            instance,
            spec: &self.spec,
            target_path: &self.target,
            target_socket,
            target_export,
            placed,
            journal_dir: self.journal.clone(),
            manifest,
            hash_target,
            progress,
        };
        let pulled = peer::pull(job, &self.peer, &mut dst).await?;
        dst.flush().await.map_err(retry)?;
        dst.disconnect().await.map_err(retry)?;
        let outcome = TransferOutcome {
            manifest_digest: pulled.manifest.digest(),
            bytes_read: pulled.read_back,
            bytes_written: pulled.written,
            note: Some(format!("pulled from the agent at {address}, {written_how}")),
            peer: Some(pulled.stats),
        };
        Ok((outcome, pulled.manifest))
    }
}

/// A bitmap's blocks written into a file keep its manifest true only if nothing wrote the file
/// since the manifest was saved (a production VM started after a failback's sync): its manifest
/// must be newer than the file. The manifest is saved after the storage daemon that wrote the
/// file closed it; a VM or daemon that opens the file for writing later changes its time.
async fn check_manifest_current(file: &Path, manifest: &Path) -> AgentResult<()> {
    let modified = |p: &Path| {
        let p = p.to_owned();
        async move { tokio::fs::metadata(&p).await.and_then(|m| m.modified()) }
    };
    let stale = |why: String| {
        AgentError::conflict(format!(
            "disk image {} cannot take a bitmap's blocks alone: {why}; a hash-compare brings it level",
            file.file_name().unwrap_or_default().to_string_lossy()
        ))
    };
    let written = modified(file).await.map_err(|e| stale(format!("{e}")))?;
    let described = modified(manifest).await.map_err(|_| stale("no manifest describes it".into()))?;
    if written > described {
        return Err(stale("it was written after its manifest was saved".into()));
    }
    Ok(())
}

/// The files of `image` to read it from directly, or why they cannot be.
pub(crate) async fn direct_source(image: &Path) -> Result<DirectImage, String> {
    let map = drover_qemu::image::host_map(image).await.map_err(|e| e.to_string())?;
    DirectImage::open(&map).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bitmap_goes_into_a_file_only_while_its_manifest_is_newer_than_it() {
        let dir = tempfile::tempdir().unwrap();
        let (file, manifest) = (dir.path().join("data.qcow2"), dir.path().join("data.manifest"));
        std::fs::write(&file, b"disk").unwrap();
        let e = check_manifest_current(&file, &manifest).await.unwrap_err();
        assert!(e.message.contains("no manifest describes it") && e.kind == ErrorKind::Conflict, "{e:?}");
        std::fs::write(&manifest, b"hashes").unwrap();
        check_manifest_current(&file, &manifest).await.unwrap();
        // Written after its manifest (a VM ran on it): a timestamp later than the manifest's.
        let later = std::fs::metadata(&manifest).unwrap().modified().unwrap() + std::time::Duration::from_secs(1);
        std::fs::File::options().write(true).open(&file).unwrap().set_modified(later).unwrap();
        let e = check_manifest_current(&file, &manifest).await.unwrap_err();
        assert!(e.message.contains("written after its manifest") && !e.message.contains('/'), "{e:?}");
    }
}
