//! Guest freezes, bounded by a watchdog: the agent thaws a guest itself when a freeze outlasts
//! what its caller asked for, so a control plane that dies, restarts or loses the agent between
//! freeze and thaw never leaves a production guest with its writes stopped.
//!
//! Each freeze is written down (`<work>/freezes/<vm>.json`, 0600, durably) before the guest is
//! frozen and removed once it is thawed; an agent that was killed while a freeze held thaws every
//! guest it finds written down when it starts again ([`Freezes::thaw_leftovers`]). So the thaw
//! happens whichever process dies: the caller's (the watchdog), or the agent's own (at its
//! restart). A freeze's outcome says whether it held until its caller's thaw, which is what
//! makes a point application-consistent.
//!
//! The watchdog task dies with the agent's process, and so does the agent inside `drover serve`
//! when the control plane is killed. So, when the driver has a guest agent socket and the agent
//! was given a program for it ([`crate::LocalAgent::with_thaw_watchdog`]: `drover` itself), a
//! detached process (`drover thaw-watchdog`, its own process group, so killing the agent's
//! does not kill it) is started before each freeze: a little after the bound it thaws the guest
//! itself if the freeze's record is still there with the freeze's id ([`run_detached_watchdog`]).
//! Whichever thaw comes first wins; the others find the guest thawed and do nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use drover_agent_api::{AgentError, AgentResult, FreezeOutcome, FreezeSpec, MAX_FREEZE_MS, ThawOutcome, check_id};
use drover_hv::Hypervisor;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::hv_error;

/// How many times the watchdog tries a thaw that fails (the guest agent busy or restarting),
/// and how long it waits between tries.
const WATCHDOG_TRIES: u32 = 5;
const WATCHDOG_PAUSE: Duration = Duration::from_secs(2);

/// How much later than the bound the detached watchdog acts: the freeze itself (the guest's
/// hooks) may take this long, and the agent's own watchdog should come first.
pub const DETACHED_SLACK: Duration = Duration::from_secs(90);

#[derive(Debug)]
pub(crate) struct Freezes {
    hv: Arc<dyn Hypervisor>,
    dir: PathBuf,
    /// Freezes holding now, by VM. Held across a freeze or a thaw of the guest, so one VM's
    /// freeze and thaw (and its watchdog's) never run at once.
    held: Arc<tokio::sync::Mutex<HashMap<Uuid, Held>>>,
    /// The program started as a detached watchdog (`<program> thaw-watchdog ...`), if any.
    pub(crate) program: Option<PathBuf>,
}

#[derive(Debug)]
struct Held {
    id: String,
    max_ms: u64,
    outcome: FreezeOutcome,
    /// Set by the watchdog when the bound passed (it then thaws the guest).
    expired: Arc<AtomicBool>,
    watchdog: tokio::task::JoinHandle<()>,
}

/// What is written down while a freeze may hold.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    id: String,
    vm: Uuid,
}

impl Freezes {
    pub(crate) fn new(hv: Arc<dyn Hypervisor>, work_dir: &Path) -> Freezes {
        Freezes { hv, dir: work_dir.join("freezes"), held: Arc::default(), program: None }
    }

    fn record_path(&self, vm: Uuid) -> PathBuf {
        self.dir.join(format!("{vm}.json"))
    }

    async fn write_record(&self, vm: Uuid, id: &str) -> AgentResult<()> {
        tokio::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .await
            .map_err(|e| AgentError::internal(format!("creating {}: {e}", self.dir.display())))?;
        let bytes =
            serde_json::to_vec(&Record { id: id.to_string(), vm }).map_err(|e| AgentError::internal(e.to_string()))?;
        drover_qemu::durable::write(&self.record_path(vm), bytes, 0o600)
            .await
            .map_err(|e| AgentError::internal(format!("writing the freeze record of VM {vm}: {e}")))
    }

    async fn remove_record(&self, vm: Uuid) {
        remove_record(&self.record_path(vm)).await;
    }

    pub(crate) async fn freeze(&self, vm: Uuid, spec: &FreezeSpec) -> AgentResult<FreezeOutcome> {
        check_id("freeze", &spec.id)?;
        if spec.max_ms == 0 || spec.max_ms > MAX_FREEZE_MS {
            return Err(AgentError::invalid(format!("a freeze lasts 1 to {MAX_FREEZE_MS} ms, not {} ms", spec.max_ms)));
        }
        let mut held = self.held.lock().await;
        if let Some(h) = held.get(&vm) {
            match (h.id == spec.id, h.expired.load(Ordering::SeqCst)) {
                (true, false) => return Ok(h.outcome.clone()),
                (false, false) => {
                    return Err(AgentError::conflict(format!("VM {vm} is held frozen by another freeze ({})", h.id)));
                }
                // Thawed by the watchdog and never asked about since: a new freeze replaces it.
                (_, true) => {
                    if let Some(old) = held.remove(&vm) {
                        old.watchdog.abort();
                    }
                }
            }
        }
        // Written down first: an agent killed from here on thaws the guest when it starts again.
        self.write_record(vm, &spec.id).await?;
        if let (Some(program), Some(socket)) = (&self.program, self.hv.guest_agent_socket(vm)) {
            let after = Duration::from_millis(spec.max_ms) + DETACHED_SLACK;
            if let Err(e) = spawn_detached(program, &socket, &self.record_path(vm), &spec.id, after) {
                // Still bounded by this process's watchdog and by the record at its next start.
                tracing::warn!(%vm, program = %program.display(), error = %e,
                    "cannot start the detached thaw watchdog; the freeze is bounded by this process alone");
            }
        }
        let outcome = match self.hv.guest_freeze(vm).await {
            Ok(o) => o,
            Err(e) => {
                // Whatever failed may have frozen something first: undo it.
                if let Err(t) = self.hv.guest_thaw(vm).await {
                    tracing::warn!(%vm, error = %t, "thaw after a failed freeze failed");
                } else {
                    self.remove_record(vm).await;
                }
                return Err(hv_error(e).context(format!("freezing VM {vm}")));
            }
        };
        if !outcome.frozen {
            self.remove_record(vm).await;
            return Ok(outcome);
        }
        let expired = Arc::new(AtomicBool::new(false));
        let watchdog = tokio::spawn(watchdog(
            self.hv.clone(),
            self.held.clone(),
            self.record_path(vm),
            vm,
            spec.id.clone(),
            Duration::from_millis(spec.max_ms),
            expired.clone(),
        ));
        held.insert(vm, Held { id: spec.id.clone(), max_ms: spec.max_ms, outcome: outcome.clone(), expired, watchdog });
        tracing::info!(%vm, id = %spec.id, max_ms = spec.max_ms, filesystems = outcome.filesystems, "guest frozen");
        Ok(outcome)
    }

    pub(crate) async fn thaw(&self, vm: Uuid, id: &str) -> AgentResult<ThawOutcome> {
        check_id("freeze", id)?;
        let mut held = self.held.lock().await;
        match held.get(&vm) {
            Some(h) if h.id == id => {
                let (expired, max_ms, froze) = (h.expired.load(Ordering::SeqCst), h.max_ms, h.outcome.filesystems);
                // The thaw first: if it fails, the watchdog stays armed and the caller may retry.
                // After the watchdog (which thawed, or tried and failed) it is harmless.
                let thawed =
                    self.hv.guest_thaw(vm).await.map_err(|e| hv_error(e).context(format!("thawing VM {vm}")))?;
                if let Some(h) = held.remove(&vm) {
                    h.watchdog.abort();
                }
                self.remove_record(vm).await;
                tracing::info!(%vm, %id, thawed, expired, "guest thawed");
                let reason = if expired {
                    format!("the freeze outlasted its bound of {max_ms} ms and the agent's watchdog thawed the guest")
                } else if thawed == 0 && froze > 0 {
                    // Someone thawed it first: the detached watchdog, the guest agent restarted,
                    // or the guest rebooted. Since when is unknown.
                    "the guest was no longer frozen when it was thawed (thawed by someone else, or its guest agent \
                     or the guest restarted)"
                        .to_string()
                } else {
                    return Ok(ThawOutcome { held: true, reason: None });
                };
                Ok(ThawOutcome { held: false, reason: Some(reason) })
            }
            Some(h) => Ok(ThawOutcome {
                held: false,
                reason: Some(format!("VM {vm} is held frozen by another freeze ({}), not this one", h.id)),
            }),
            None => {
                // Not held in this process: it restarted (and thawed what it had written down)
                // or never froze the guest. A record of this very freeze is still honoured.
                let path = self.record_path(vm);
                if let Some(r) = read_record(&path).await
                    && r.id == id
                {
                    self.hv.guest_thaw(vm).await.map_err(|e| hv_error(e).context(format!("thawing VM {vm}")))?;
                    remove_record(&path).await;
                }
                Ok(ThawOutcome {
                    held: false,
                    reason: Some(
                        "the agent holds no such freeze (it restarted meanwhile, or the guest was never frozen)".into(),
                    ),
                })
            }
        }
    }

    /// Thaws every guest a freeze was written down for (an agent killed while it held) and
    /// forgets the records. A guest that cannot be thawed now keeps its record, for the next start
    /// (a VM that is not running holds nothing frozen and is forgotten).
    pub(crate) async fn thaw_leftovers(&self) -> usize {
        let _held = self.held.lock().await;
        let mut thawed = 0;
        let Ok(mut entries) = tokio::fs::read_dir(&self.dir).await else { return 0 };
        while let Ok(Some(entry)) = entries.next_entry().await {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                // A temporary file of a record being written when the agent was killed.
                let _ = tokio::fs::remove_file(&path).await;
                continue;
            }
            let Some(record) = read_record(&path).await else {
                tracing::warn!(path = %path.display(), "unreadable freeze record removed");
                remove_record(&path).await;
                continue;
            };
            match self.hv.guest_thaw(record.vm).await {
                Ok(n) => {
                    tracing::warn!(vm = %record.vm, id = %record.id, filesystems = n,
                        "thawed a guest frozen before the agent restarted");
                    remove_record(&path).await;
                    thawed += 1;
                }
                Err(e) => tracing::error!(vm = %record.vm, error = %e,
                    "a guest frozen before the agent restarted could not be thawed; trying again at the next start"),
            }
        }
        thawed
    }
}

/// Starts `<program> thaw-watchdog` detached (its own process group, no standard streams), and
/// reaps it when it ends.
fn spawn_detached(program: &Path, socket: &Path, record: &Path, id: &str, after: Duration) -> std::io::Result<()> {
    let mut child = tokio::process::Command::new(program)
        .arg("thaw-watchdog")
        .arg("--socket")
        .arg(socket)
        .arg("--record")
        .arg(record)
        .arg("--id")
        .arg(id)
        .arg("--after-ms")
        .arg(after.as_millis().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()?;
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    Ok(())
}

/// How long the detached watchdog keeps trying to reach the guest agent (whose socket serves one
/// client at a time) once its time has come.
const DETACHED_TRYING: Duration = Duration::from_secs(300);

/// The detached watchdog (`drover thaw-watchdog`): waits `after`, then, if the freeze record at
/// `record` still names freeze `id` (it was not thawed), thaws the guest through the guest agent
/// at `socket` and removes the record. Returns whether it found the freeze still written down.
pub async fn run_detached_watchdog(socket: &Path, record: &Path, id: &str, after: Duration) -> Result<bool, String> {
    tokio::time::sleep(after).await;
    if read_record(record).await.is_none_or(|r| r.id != id) {
        return Ok(false);
    }
    let deadline = tokio::time::Instant::now() + DETACHED_TRYING;
    loop {
        match drover_qemu::qga::thaw(socket, Duration::from_secs(60)).await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "the thaw watchdog cannot reach the guest agent yet");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(format!("the guest agent at {} did not thaw: {e}", socket.display())),
        }
    }
    // Only this freeze's record: a newer freeze of the VM writes its own.
    if read_record(record).await.is_some_and(|r| r.id == id) {
        remove_record(record).await;
    }
    Ok(true)
}

/// A freeze record, if `path` holds one (at most 4 KiB is read: a record is a few dozen bytes).
async fn read_record(path: &Path) -> Option<Record> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::new();
    tokio::fs::File::open(path).await.ok()?.take(4096).read_to_end(&mut bytes).await.ok()?;
    serde_json::from_slice(&bytes).ok()
}

async fn remove_record(path: &Path) {
    match tokio::fs::remove_file(path).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(path = %path.display(), error = %e, "removing a freeze record"),
    }
}

/// Thaws the guest when its freeze outlasts `max`, unless the freeze was thawed (this task is
/// then aborted) or replaced meanwhile.
async fn watchdog(
    hv: Arc<dyn Hypervisor>,
    held: Arc<tokio::sync::Mutex<HashMap<Uuid, Held>>>,
    record: PathBuf,
    vm: Uuid,
    id: String,
    max: Duration,
    expired: Arc<AtomicBool>,
) {
    tokio::time::sleep(max).await;
    // Not holding the map's lock while thawing would let a new freeze of the VM start in between.
    let map = held.lock().await;
    if map.get(&vm).is_none_or(|h| h.id != id) {
        return;
    }
    expired.store(true, Ordering::SeqCst);
    for attempt in 1..=WATCHDOG_TRIES {
        match hv.guest_thaw(vm).await {
            Ok(n) => {
                tracing::warn!(%vm, %id, ?max, filesystems = n, "freeze outlasted its bound: the watchdog thawed the guest");
                remove_record(&record).await;
                return;
            }
            Err(e) => {
                tracing::error!(%vm, %id, attempt, error = %e, "the watchdog could not thaw the guest");
                tokio::time::sleep(WATCHDOG_PAUSE).await;
            }
        }
    }
    // Still frozen as far as anyone knows: the record stays, so the caller's thaw or the next
    // start of the agent tries again.
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// **A simulated guest agent** on a unix socket, for the detached watchdog's protocol only:
    /// it answers `guest-sync-delimited`, `guest-fsfreeze-status` and `guest-fsfreeze-thaw`, and
    /// counts thaws. (The real one is tested with the Debian guest.)
    async fn fake_guest_agent(socket: PathBuf, frozen: Arc<AtomicBool>, thaws: Arc<AtomicU32>) {
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (frozen, thaws) = (frozen.clone(), thaws.clone());
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut lines = BufReader::new(read).split(b'\n');
                    while let Ok(Some(line)) = lines.next_segment().await {
                        let line: Vec<u8> = line.into_iter().skip_while(|b| *b == 0xFF).collect();
                        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else { continue };
                        let reply = match v["execute"].as_str() {
                            Some("guest-sync-delimited") => {
                                let mut r = vec![0xFF];
                                r.extend(serde_json::json!({"return": v["arguments"]["id"]}).to_string().bytes());
                                r
                            }
                            Some("guest-fsfreeze-status") => {
                                let s = if frozen.load(Ordering::SeqCst) { "frozen" } else { "thawed" };
                                serde_json::json!({"return": s}).to_string().into_bytes()
                            }
                            Some("guest-fsfreeze-thaw") => {
                                frozen.store(false, Ordering::SeqCst);
                                thaws.fetch_add(1, Ordering::SeqCst);
                                serde_json::json!({"return": 1}).to_string().into_bytes()
                            }
                            _ => serde_json::json!({"error": {"class": "CommandNotFound", "desc": "no"}})
                                .to_string()
                                .into_bytes(),
                        };
                        if write.write_all(&[reply, b"\n".to_vec()].concat()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }

    #[tokio::test]
    async fn the_detached_watchdog_thaws_only_a_freeze_still_written_down_under_its_id() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qga.sock");
        let (frozen, thaws) = (Arc::new(AtomicBool::new(true)), Arc::new(AtomicU32::new(0)));
        fake_guest_agent(socket.clone(), frozen.clone(), thaws.clone()).await;
        let record = dir.path().join("vm.json");
        let write =
            |id: &str| std::fs::write(&record, serde_json::to_vec(&Record { id: id.into(), vm: Uuid::nil() }).unwrap());
        let after = Duration::from_millis(50);

        // Thawed by the agent meanwhile (its record gone): nothing is done.
        assert_eq!(run_detached_watchdog(&socket, &record, "f1", after).await, Ok(false));
        // A newer freeze of the VM wrote its own record: not this watchdog's to thaw.
        write("f2").unwrap();
        assert_eq!(run_detached_watchdog(&socket, &record, "f1", after).await, Ok(false));
        assert_eq!((frozen.load(Ordering::SeqCst), thaws.load(Ordering::SeqCst)), (true, 0));
        assert!(record.exists());
        // Its own freeze, never thawed (the agent died): thawed, and the record removed.
        assert_eq!(run_detached_watchdog(&socket, &record, "f2", after).await, Ok(true));
        assert_eq!((frozen.load(Ordering::SeqCst), thaws.load(Ordering::SeqCst)), (false, 1));
        assert!(!record.exists());
    }
}
