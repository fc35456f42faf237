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

use std::collections::HashMap;
use std::path::PathBuf;
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

#[derive(Debug)]
pub(crate) struct Freezes {
    hv: Arc<dyn Hypervisor>,
    dir: PathBuf,
    /// Freezes holding now, by VM. Held across a freeze or a thaw of the guest, so one VM's
    /// freeze and thaw (and its watchdog's) never run at once.
    held: Arc<tokio::sync::Mutex<HashMap<Uuid, Held>>>,
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
    pub(crate) fn new(hv: Arc<dyn Hypervisor>, work_dir: &std::path::Path) -> Freezes {
        Freezes { hv, dir: work_dir.join("freezes"), held: Arc::default() }
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
                if h.expired.load(Ordering::SeqCst) {
                    let max_ms = h.max_ms;
                    // The watchdog thawed it, or tried and failed: thawing again is harmless.
                    self.hv.guest_thaw(vm).await.map_err(|e| hv_error(e).context(format!("thawing VM {vm}")))?;
                    if let Some(h) = held.remove(&vm) {
                        h.watchdog.abort();
                    }
                    self.remove_record(vm).await;
                    return Ok(ThawOutcome {
                        held: false,
                        reason: Some(format!(
                            "the freeze outlasted its bound of {max_ms} ms and the agent's watchdog thawed the guest"
                        )),
                    });
                }
                // The thaw first: if it fails, the watchdog stays armed and the caller may retry.
                self.hv.guest_thaw(vm).await.map_err(|e| hv_error(e).context(format!("thawing VM {vm}")))?;
                if let Some(h) = held.remove(&vm) {
                    h.watchdog.abort();
                }
                self.remove_record(vm).await;
                tracing::info!(%vm, %id, "guest thawed");
                Ok(ThawOutcome { held: true, reason: None })
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

async fn read_record(path: &std::path::Path) -> Option<Record> {
    let bytes = tokio::fs::read(path).await.ok()?;
    if bytes.len() > 4096 {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

async fn remove_record(path: &std::path::Path) {
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
    drop(map);
}
