//! `StorageDaemon`: a managed `qemu-storage-daemon` for images that no VM has open.
//!
//! The data path needs QEMU's block layer without a VM: on the source, to export a powered-off
//! VM's disk with its dirty bitmap over NBD; on the target, to export a fresh restore-point
//! overlay writable. `qemu-storage-daemon` is that block layer as a process, driven over QMP like
//! a VM, so the same commands (`blockdev-add`, `nbd-server-start`, `block-export-add`) apply.
//!
//! # Lifecycle
//! ```text
//!   start(dir)  reap a leftover daemon of `dir` (pidfile), spawn, wait for QMP
//!     -> add_qcow2 / add_nbd_export / remove_nbd_export / remove_node   (any order, idempotent)
//!     -> shutdown()   QMP `quit` (closes every image cleanly: bitmaps and caches are written),
//!                     SIGKILL if it has not exited after QUIT_WAIT
//!   drop without shutdown: SIGKILL (a Drop cannot wait; images are closed uncleanly)
//! ```
//! The daemon is a child of drover, not daemonized: it must not outlive the cycle that needs it,
//! because it holds the image lock (a VM cannot start on a disk a daemon has open). Three layers
//! keep a process from being left behind:
//! 1. `shutdown()` on the normal path, SIGKILL from `Drop` on every other path (errors, panics);
//! 2. when `setpriv` (util-linux) is installed, the daemon runs under `setpriv --pdeathsig KILL`,
//!    so the kernel kills it when drover dies without unwinding (SIGKILL, OOM). The signal fires
//!    when the *thread* that spawned it exits, so call [`StorageDaemon::start`] from an async task
//!    (tokio's worker threads live as long as the runtime), not from a `spawn_blocking` thread;
//! 3. the next `start` in the same directory kills a daemon named by the pidfile there, if its
//!    command line proves it is ours.
//!
//! # Files in the runtime directory
//! ```text
//!   qmp.sock   QMP monitor (we hold the one connection for the daemon's lifetime)
//!   nbd.sock   the NBD server, once an export was added
//!   qsd.pid    --pidfile (QEMU removes it on a clean exit)
//!   qsd.log    the daemon's stderr
//! ```

use std::ffi::OsString;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::sync::Mutex as AsyncMutex;
use tokio::time::Instant;

use crate::qmp::QmpClient;
use crate::{ToolError, ToolResult};

/// The binary, found on `PATH`.
pub const QEMU_STORAGE_DAEMON: &str = "qemu-storage-daemon";
/// Bound on one QMP command; the block layer answers in milliseconds unless wedged.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a fresh daemon may take to open its QMP socket (it takes ~20 ms) when it is the only
/// one starting; see [`start_timeout`].
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// What each other daemon starting at the same time adds to [`START_TIMEOUT`]: fifty VMs of one
/// replication run start fifty daemons at once on a machine with two cores, and a fixed bound
/// failed whole runs that way (issue 11, item 6).
const START_TIMEOUT_PER_PEER: Duration = Duration::from_secs(2);

/// Daemons of this process starting right now.
static STARTING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How long a daemon may take to start when `concurrent` start at once (itself included): the
/// bound grows with what it waits behind.
fn start_timeout(concurrent: usize) -> Duration {
    let others = u32::try_from(concurrent.saturating_sub(1)).unwrap_or(u32::MAX);
    START_TIMEOUT.saturating_add(START_TIMEOUT_PER_PEER.saturating_mul(others))
}

/// Counts a daemon as starting while it lives.
struct Starting;

impl Starting {
    fn new() -> Starting {
        STARTING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Starting
    }
}

impl Drop for Starting {
    fn drop(&mut self) {
        STARTING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}
/// After QMP `quit`, how long before SIGKILL. Closing flushes qcow2 caches and writes bitmaps.
const QUIT_WAIT: Duration = Duration::from_secs(10);
/// After SIGKILL, how long until we call the process unkillable.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Poll interval while waiting for a socket, an export or a process to come or go.
const POLL: Duration = Duration::from_millis(10);
/// glibc's allocator settings for the daemon (unless the environment sets its own). The NBD
/// server takes a fresh buffer for every request and frees it after; above glibc's mmap
/// threshold each one is a new mapping, so every byte written or read through NBD also costs a
/// page fault, a page clearing and an unmap. Measured on a 1 GiB seed (1 MiB writes, 8 in
/// flight): the target daemon's system time fell from 0.80-0.97 s to 0.47-0.53 s and the copy
/// from 2.0-2.2 s to 1.44-1.56 s with buffers up to 32 MiB (the largest NBD request) taken from
/// the heap and up to 64 MiB of freed heap kept.
const MALLOC_TUNABLES: &str = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=67108864";
/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
/// QEMU keeps node names in a 32-byte buffer.
const MAX_NODE_NAME: usize = 31;

/// Where an NBD client finds one export: a unix socket and an export name. This is what the data
/// path (drover-block) connects to, for a VM's own NBD server and for a [`StorageDaemon`] alike.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdEndpoint {
    pub socket: PathBuf,
    pub export_name: String,
}

impl NbdEndpoint {
    /// The NBD URI (`nbd+unix:///<name>?socket=<path>`), as `nbdinfo`, `nbdcopy` and `qemu-img`
    /// accept it. For tools and logs; the path is not percent-encoded.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///{}?socket={}", self.export_name, self.socket.display())
    }
}

/// What a qcow2 node uses as its backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backing {
    /// The chain named in the image header (what a VM would see).
    FromImage,
    /// No backing file, even if the header names one (`backing: null`): e.g. a restore-point
    /// overlay written on its own, whose unallocated clusters must read as "not here".
    None,
    /// An existing node of this daemon.
    Node(String),
}

/// A qcow2 image to open as a node (`file` node plus `qcow2` node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Node {
    /// The qcow2 node's name; the file node is `<node_name>-file`.
    pub node_name: String,
    pub path: PathBuf,
    pub backing: Backing,
    /// Read-only nodes do not modify the image at all (no bitmap is marked in use), so a killed
    /// daemon leaves a read-only image exactly as it found it.
    pub read_only: bool,
}

/// One NBD export of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdExport {
    /// The export's QMP id (for `block-export-del`).
    pub id: String,
    pub node_name: String,
    /// The name NBD clients ask for.
    pub name: String,
    pub writable: bool,
    /// Dirty bitmaps (of the node or its backing chain) offered as `qemu:dirty-bitmap:<name>`
    /// meta contexts. A bitmap must be disabled (or the node read-only) to be exported.
    pub bitmaps: Vec<String>,
}

/// A running `qemu-storage-daemon`. See the module documentation.
/// Whether the storage daemons of this process can open files with `aio=io_uring`: learnt from
/// the first `blockdev-add` that tries.
static IO_URING: AtomicU8 = AtomicU8::new(IO_URING_UNKNOWN);
const IO_URING_UNKNOWN: u8 = 0;
const IO_URING_YES: u8 = 1;
const IO_URING_NO: u8 = 2;

#[derive(Debug)]
pub struct StorageDaemon {
    dir: PathBuf,
    qmp_socket: PathBuf,
    nbd_socket: PathBuf,
    pidfile: PathBuf,
    log: PathBuf,
    /// `None` once shut down.
    child: Option<Child>,
    pid: u32,
    /// Held for the daemon's lifetime: nobody else talks to it, and one connection keeps the
    /// commands of concurrent callers in order.
    qmp: AsyncMutex<QmpClient>,
}

impl StorageDaemon {
    /// Starts a daemon with its sockets in `dir` (created if missing). A daemon left behind in
    /// `dir` by an earlier drover is killed first.
    pub async fn start(dir: &Path) -> ToolResult<Self> {
        Self::start_with(Path::new(QEMU_STORAGE_DAEMON), dir).await
    }

    /// [`StorageDaemon::start`] with an explicit binary.
    pub async fn start_with(binary: &Path, dir: &Path) -> ToolResult<Self> {
        tokio::fs::create_dir_all(dir).await.map_err(|e| ToolError::io(format!("creating {}", dir.display()), e))?;
        let qmp_socket = dir.join("qmp.sock");
        let nbd_socket = dir.join("nbd.sock");
        let pidfile = dir.join("qsd.pid");
        let log = dir.join("qsd.log");
        for socket in [&qmp_socket, &nbd_socket] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(ToolError::InvalidArgument(format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter directory",
                    socket.display()
                )));
            }
        }
        reap_stale(dir).await?;
        for stale in [&qmp_socket, &nbd_socket, &pidfile] {
            remove_if_present(stale).await?;
        }

        let log_file =
            std::fs::File::create(&log).map_err(|e| ToolError::io(format!("creating {}", log.display()), e))?;
        let mut args: Vec<OsString> = Vec::new();
        args.push("--chardev".into());
        args.push(format!("socket,id=qmp0,path={},server=on,wait=off", opt_path(&qmp_socket)?).into());
        args.extend(["--monitor".into(), "chardev=qmp0".into(), "--pidfile".into(), pidfile.clone().into()]);
        let mut command = match find_in_path("setpriv") {
            Some(setpriv) => {
                let mut c = Command::new(setpriv);
                c.args(["--pdeathsig", "KILL", "--"]).arg(binary);
                c
            }
            None => {
                tracing::debug!("setpriv not found: the storage daemon will not die with drover");
                Command::new(binary)
            }
        };
        command.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log_file).kill_on_drop(true);
        if std::env::var_os("GLIBC_TUNABLES").is_none() {
            command.env("GLIBC_TUNABLES", MALLOC_TUNABLES);
        }
        let mut child = command.spawn().map_err(|e| ToolError::io(format!("running {}", binary.display()), e))?;
        let pid = child.id().ok_or_else(|| ToolError::Tool {
            program: QEMU_STORAGE_DAEMON.into(),
            stderr: "exited before it could be watched".into(),
        })?;
        tracing::debug!(pid, dir = %dir.display(), "qemu-storage-daemon started");

        // The daemon writes its pidfile once its chardevs and monitor are set up, before it
        // accepts connections (qemu-storage-daemon(1) documents the order); a client that
        // connects as soon as the socket appears can meet a monitor not attached yet (seen: a
        // second greeting, then its commands misparsed). Poll for both, and give up early if
        // the process has exited (bad options, missing binary behind setpriv).
        let _starting = Starting::new();
        let began = Instant::now();
        // The most daemons seen starting together while this one waited: its bound.
        let mut crowd = 1usize;
        let qmp = loop {
            crowd = crowd.max(STARTING.load(std::sync::atomic::Ordering::SeqCst));
            let timeout = start_timeout(crowd);
            if let Ok(Some(status)) = child.try_wait() {
                let stderr = std::fs::read_to_string(&log).unwrap_or_default().trim().to_owned();
                return Err(ToolError::Tool {
                    program: QEMU_STORAGE_DAEMON.into(),
                    stderr: if stderr.is_empty() { format!("exited with {status}") } else { stderr },
                });
            }
            if pidfile.exists() && qmp_socket.exists() {
                match QmpClient::connect_timeout(&qmp_socket, QMP_TIMEOUT).await {
                    Ok(qmp) => break qmp,
                    Err(e) => tracing::debug!(error = %e, "storage daemon QMP not ready"),
                }
            }
            if began.elapsed() >= timeout {
                let _ = child.start_kill();
                return Err(ToolError::Timeout(timeout, "qemu-storage-daemon QMP socket"));
            }
            tokio::time::sleep(POLL).await;
        };
        Ok(StorageDaemon {
            dir: dir.to_owned(),
            qmp_socket,
            nbd_socket,
            pidfile,
            log,
            child: Some(child),
            pid,
            qmp: AsyncMutex::new(qmp),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn qmp_socket_path(&self) -> &Path {
        &self.qmp_socket
    }

    /// The NBD server's socket (it exists once an export was added).
    pub fn nbd_socket_path(&self) -> &Path {
        &self.nbd_socket
    }

    /// Runs one QMP command on the daemon.
    pub async fn execute(&self, command: &str, args: Value) -> ToolResult<Value> {
        self.qmp.lock().await.execute_timeout(command, args, QMP_TIMEOUT).await
    }

    /// `query-named-block-nodes` entry of `node_name`, if the node exists.
    pub async fn node(&self, node_name: &str) -> ToolResult<Option<Value>> {
        let nodes = self.execute("query-named-block-nodes", json!({"flat": true})).await?;
        Ok(find_node(&nodes, node_name).cloned())
    }

    /// Opens a qcow2 image as `node.node_name`. Idempotent: an existing node of that name is
    /// left as it is (it is not checked to be the same image).
    pub async fn add_qcow2(&self, node: &Qcow2Node) -> ToolResult<()> {
        self.add_qcow2_cached(node, false).await
    }

    /// As [`StorageDaemon::add_qcow2`], with the host's page cache bypassed (`cache.direct`,
    /// `O_DIRECT`) where the file system allows it; returns whether it does. For an image that
    /// is written once and must then be durable (a seed's new point): its data goes straight to
    /// the disk instead of being copied into the page cache by the daemon's one thread and
    /// written back by the flush at the end. Measured on cold 1 GiB seeds here (two cores shared
    /// with other work): 1.3-1.7 s with `O_DIRECT`, 2.0-2.7 s through the page cache (0.15 s of
    /// it the final flush); `aio=native` was slower still (3.0 s: qcow2 appends clusters, and
    /// extending `O_DIRECT` writes block), io_uring and the thread pool alike, a `preallocate`
    /// filter no better. A file system without `O_DIRECT` (tmpfs) gets the page cache, as with
    /// `add_qcow2`.
    pub async fn add_qcow2_direct(&self, node: &Qcow2Node) -> ToolResult<bool> {
        if self.node(&node.node_name).await?.is_some() {
            return Ok(false);
        }
        match self.add_qcow2_cached(node, true).await {
            Ok(()) => Ok(true),
            Err(ToolError::Qmp { desc, .. }) => {
                tracing::info!(error = %desc, path = %node.path.display(), "storage daemon: no O_DIRECT here; using the page cache");
                self.add_qcow2_cached(node, false).await?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn add_qcow2_cached(&self, node: &Qcow2Node, direct: bool) -> ToolResult<()> {
        let file_node = format!("{}-file", node.node_name);
        check_node_name(&file_node)?;
        if self.node(&node.node_name).await?.is_some() {
            return Ok(());
        }
        let filename = node
            .path
            .to_str()
            .ok_or_else(|| ToolError::InvalidArgument(format!("path {} is not UTF-8", node.path.display())))?;
        let mut args = json!({
            "driver": "qcow2",
            "node-name": node.node_name,
            "read-only": node.read_only,
            "file": {"driver": "file", "node-name": file_node, "filename": filename, "read-only": node.read_only},
        });
        if direct {
            args["cache"] = json!({"direct": true});
            args["file"]["cache"] = json!({"direct": true});
        }

        match &node.backing {
            Backing::FromImage => {}
            Backing::None => args["backing"] = Value::Null,
            Backing::Node(name) => args["backing"] = json!(name),
        }
        // io_uring where the kernel and QEMU have it: measured on a 1 GiB qcow2 in the page cache
        // read over NBD, it serves the same reads with about 60% of the daemon's CPU time of the
        // default thread pool (0.59-0.62 s instead of 0.74-0.82 s). Else the thread pool.
        if IO_URING.load(Ordering::Relaxed) != IO_URING_NO {
            let mut with_uring = args.clone();
            with_uring["file"]["aio"] = json!("io_uring");
            match self.execute("blockdev-add", with_uring).await {
                Ok(_) => {
                    IO_URING.store(IO_URING_YES, Ordering::Relaxed);
                    return Ok(());
                }
                Err(ToolError::Qmp { desc, .. }) if IO_URING.load(Ordering::Relaxed) == IO_URING_UNKNOWN => {
                    // Not known yet whether io_uring or the node itself was refused: the thread
                    // pool decides.
                    self.execute("blockdev-add", args).await?;
                    tracing::info!(error = %desc, "storage daemon: no io_uring here; using its thread pool");
                    IO_URING.store(IO_URING_NO, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        self.execute("blockdev-add", args).await?;
        Ok(())
    }

    /// Closes a node added with [`StorageDaemon::add_qcow2`] (its file node goes with it).
    /// Exports of the node must be removed first. Idempotent.
    pub async fn remove_node(&self, node_name: &str) -> ToolResult<()> {
        if self.node(node_name).await?.is_none() {
            return Ok(());
        }
        self.execute("blockdev-del", json!({"node-name": node_name})).await?;
        Ok(())
    }

    /// Starts the NBD server on [`StorageDaemon::nbd_socket_path`]. Idempotent.
    pub async fn start_nbd_server(&self) -> ToolResult<()> {
        start_nbd_server(&mut *self.qmp.lock().await, &self.nbd_socket).await
    }

    /// Exports a node over NBD (starting the server if needed). Idempotent: an export with the
    /// same id is taken to be this one.
    pub async fn add_nbd_export(&self, export: &NbdExport) -> ToolResult<NbdEndpoint> {
        let mut qmp = self.qmp.lock().await;
        start_nbd_server(&mut qmp, &self.nbd_socket).await?;
        add_nbd_export(&mut qmp, export).await?;
        Ok(NbdEndpoint { socket: self.nbd_socket.clone(), export_name: export.name.clone() })
    }

    /// Removes an export, dropping connected clients, and returns once QEMU has let go of the
    /// node and its bitmaps. Idempotent.
    pub async fn remove_nbd_export(&self, id: &str) -> ToolResult<()> {
        remove_export(&mut *self.qmp.lock().await, id).await
    }

    /// Stops the daemon: QMP `quit`, which closes every node cleanly (qcow2 metadata and
    /// persistent bitmaps are written), then SIGKILL if it does not exit in time.
    pub async fn shutdown(mut self) -> ToolResult<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // QEMU may close the socket before its reply arrives; the exit is what counts.
        if let Err(e) = self.qmp.get_mut().execute_timeout("quit", Value::Null, QMP_TIMEOUT).await {
            tracing::debug!(error = %e, "storage daemon quit");
        }
        match tokio::time::timeout(QUIT_WAIT, child.wait()).await {
            Ok(Ok(status)) => {
                if !status.success() {
                    tracing::warn!(%status, log = %self.log.display(), "qemu-storage-daemon exited with an error");
                }
            }
            Ok(Err(e)) => return Err(ToolError::io("waiting for qemu-storage-daemon", e)),
            Err(_) => {
                tracing::warn!(pid = self.pid, "qemu-storage-daemon did not quit; killing it");
                let _ = child.start_kill();
                tokio::time::timeout(KILL_WAIT, child.wait())
                    .await
                    .map_err(|_| ToolError::Timeout(KILL_WAIT, "qemu-storage-daemon to exit after SIGKILL"))?
                    .map_err(|e| ToolError::io("waiting for qemu-storage-daemon", e))?;
            }
        }
        // A clean exit removes these; a killed daemon does not.
        for leftover in [&self.qmp_socket, &self.nbd_socket, &self.pidfile] {
            remove_if_present(leftover).await?;
        }
        Ok(())
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            tracing::warn!(pid = self.pid, "storage daemon dropped without shutdown; killing it");
            // tokio reaps the killed child in the background (kill_on_drop does the same; this
            // makes the intent explicit and logs it). The pidfile stays: the process may take a
            // moment to die, and `reap_stale` (next start, recovery) finds it through the file.
            let _ = child.start_kill();
        }
    }
}

/// Kills a daemon that an earlier drover left in `dir`, if the pidfile names one whose command
/// line holds this directory's QMP socket (a reused pid of some other process is left alone).
/// Used by [`StorageDaemon::start`] and by recovery after a crash.
pub async fn reap_stale(dir: &Path) -> ToolResult<()> {
    let Ok(text) = tokio::fs::read_to_string(dir.join("qsd.pid")).await else {
        return Ok(());
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(());
    };
    let needle = dir.join("qmp.sock");
    if !process_mentions(pid, &needle) {
        return Ok(());
    }
    tracing::warn!(pid, dir = %dir.display(), "killing a qemu-storage-daemon left behind");
    match kill(Pid::from_raw(pid), Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => return Err(ToolError::io(format!("killing qemu-storage-daemon pid {pid}"), e.into())),
    }
    let deadline = Instant::now() + KILL_WAIT;
    while process_mentions(pid, &needle) {
        if Instant::now() >= deadline {
            return Err(ToolError::Timeout(KILL_WAIT, "a stale qemu-storage-daemon to exit"));
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// Whether `/proc/<pid>/cmdline` contains `needle`. A zombie has an empty cmdline: gone.
fn process_mentions(pid: i32, needle: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = needle.as_os_str().as_encoded_bytes();
    cmdline.windows(needle.len()).any(|w| w == needle)
}

/// The `query-named-block-nodes` entry named `node_name`.
pub fn find_node<'a>(nodes: &'a Value, node_name: &str) -> Option<&'a Value> {
    nodes.as_array()?.iter().find(|n| n.get("node-name").and_then(Value::as_str) == Some(node_name))
}

/// `nbd-server-start` on a unix socket. QMP wants the `SocketAddressLegacy` form here, with the
/// `data` wrapper (the flat form is refused). QEMU allows one NBD server per process; a running
/// one is accepted when our socket exists, since then it is ours (a retry, or another disk of
/// the same VM); otherwise it belongs to someone else and reusing it would hand out the wrong
/// socket.
pub async fn start_nbd_server(qmp: &mut QmpClient, socket: &Path) -> ToolResult<()> {
    let path = check_socket_path(socket)?;
    let args = json!({"addr": {"type": "unix", "data": {"path": path}}});
    match qmp.execute_timeout("nbd-server-start", args, QMP_TIMEOUT).await {
        Ok(_) => Ok(()),
        Err(ToolError::Qmp { desc, .. }) if desc.contains("already running") && socket.exists() => Ok(()),
        Err(e) => Err(e),
    }
}

/// `nbd-server-stop`, unless other NBD exports still use the server. Idempotent.
pub async fn stop_nbd_server_if_unused(qmp: &mut QmpClient) -> ToolResult<()> {
    let exports = qmp.execute_timeout("query-block-exports", Value::Null, QMP_TIMEOUT).await?;
    let nbd_exports = exports
        .as_array()
        .map(|list| list.iter().filter(|e| e.get("type").and_then(Value::as_str) == Some("nbd")).count())
        .unwrap_or(0);
    if nbd_exports > 0 {
        return Ok(());
    }
    match qmp.execute_timeout("nbd-server-stop", Value::Null, QMP_TIMEOUT).await {
        Ok(_) => Ok(()),
        Err(ToolError::Qmp { desc, .. }) if desc.contains("not running") => Ok(()),
        Err(e) => Err(e),
    }
}

pub async fn export_exists(qmp: &mut QmpClient, id: &str) -> ToolResult<bool> {
    let exports = qmp.execute_timeout("query-block-exports", Value::Null, QMP_TIMEOUT).await?;
    Ok(exports.as_array().is_some_and(|list| list.iter().any(|e| e.get("id").and_then(Value::as_str) == Some(id))))
}

pub async fn add_nbd_export(qmp: &mut QmpClient, export: &NbdExport) -> ToolResult<()> {
    if export_exists(qmp, &export.id).await? {
        return Ok(());
    }
    let args = json!({
        "type": "nbd",
        "id": export.id,
        "node-name": export.node_name,
        "name": export.name,
        "writable": export.writable,
        "bitmaps": export.bitmaps,
    });
    qmp.execute_timeout("block-export-add", args, QMP_TIMEOUT).await?;
    Ok(())
}

/// `block-export-del` in `hard` mode (connected clients are dropped: whoever ends the export is
/// done with it), then waits until the export is gone from `query-block-exports`: the command
/// returns before QEMU has released the node, and until then the exported bitmaps are busy and
/// the node cannot be deleted. Idempotent.
pub async fn remove_export(qmp: &mut QmpClient, id: &str) -> ToolResult<()> {
    if !export_exists(qmp, id).await? {
        return Ok(());
    }
    match qmp.execute_timeout("block-export-del", json!({"id": id, "mode": "hard"}), QMP_TIMEOUT).await {
        Ok(_) => {}
        // Already shutting down (a retry): wait for it below.
        Err(ToolError::Qmp { desc, .. }) if desc.contains("not found") || desc.contains("shutting down") => {}
        Err(e) => return Err(e),
    }
    let deadline = Instant::now() + QMP_TIMEOUT;
    while export_exists(qmp, id).await? {
        if Instant::now() >= deadline {
            return Err(ToolError::Timeout(QMP_TIMEOUT, "NBD export to go away"));
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

/// A socket path QEMU can bind: UTF-8 (it goes into JSON) and short enough for `sun_path`.
pub fn check_socket_path(socket: &Path) -> ToolResult<&str> {
    let path =
        socket.to_str().ok_or_else(|| ToolError::InvalidArgument(format!("path {} is not UTF-8", socket.display())))?;
    if path.len() > MAX_SOCKET_PATH {
        return Err(ToolError::InvalidArgument(format!(
            "socket path {path} is longer than {MAX_SOCKET_PATH} bytes; use a shorter directory"
        )));
    }
    Ok(path)
}

fn check_node_name(name: &str) -> ToolResult<()> {
    let well_formed = name.len() <= MAX_NODE_NAME
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if well_formed {
        Ok(())
    } else {
        Err(ToolError::InvalidArgument(format!(
            "{name:?} is not a QEMU node name (a letter, then letters, digits, '-', '.', '_'; at most {} \
             characters, including the '-file' suffix of the file node)",
            MAX_NODE_NAME
        )))
    }
}

/// QEMU's option syntax separates `key=value` pairs with commas; a comma inside a value is
/// written twice.
fn opt_path(path: &Path) -> ToolResult<String> {
    path.to_str()
        .map(|p| p.replace(',', ",,"))
        .ok_or_else(|| ToolError::InvalidArgument(format!("path {} is not UTF-8", path.display())))
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file())
}

async fn remove_if_present(path: &Path) -> ToolResult<()> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ToolError::io(format!("removing {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_timeout_grows_with_the_daemons_starting_together() {
        assert_eq!(start_timeout(0), START_TIMEOUT);
        assert_eq!(start_timeout(1), START_TIMEOUT);
        assert_eq!(start_timeout(50), Duration::from_secs(10 + 2 * 49));
        assert!(start_timeout(usize::MAX) >= start_timeout(50));
    }

    #[test]
    fn node_names() {
        check_node_name("disk-file").unwrap();
        check_node_name("a.b_c-1").unwrap();
        assert!(check_node_name("1disk").is_err());
        assert!(check_node_name("disk 0").is_err());
        assert!(check_node_name(&"d".repeat(32)).is_err());
    }

    #[test]
    fn uri() {
        let e = NbdEndpoint { socket: "/run/x/nbd.sock".into(), export_name: "disk0".into() };
        assert_eq!(e.uri(), "nbd+unix:///disk0?socket=/run/x/nbd.sock");
    }

    #[test]
    fn finds_nodes() {
        let nodes = json!([{"node-name": "a"}, {"node-name": "b", "x": 1}]);
        assert_eq!(find_node(&nodes, "b").unwrap()["x"], 1);
        assert!(find_node(&nodes, "c").is_none());
    }
}
