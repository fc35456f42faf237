//! The agent-to-agent data path (issue 11, item 3): a cut on one agent read into a point file on
//! another, over `drover_proto` and `drover_transfer`. The control plane only names the two ends.
//!
//! ```text
//!  DR agent (transfer_ensure, Peer source)           source agent (serve_data)
//!  ────────────────────────────────────────           ──────────────────────────
//!  seed or bitmap over several streams: one connection first
//!  Survey {cut, instance, mode, whole disk} ───────▶  the same checks as a pull
//!                                     ◀───────────── Surveyed {granule, bytes per granule}
//!  split the disk into N ranges (PeerStreams), each with about 1/N of the bytes (by size for a
//!  hash-compare); per range, one task and one connection:
//!  dial address, TLS as server_name ───────────────▶  accept (client certificate required)
//!  Pull {cut, instance, transfer, mode, range,      ▶  the cut must exist *as this instance*
//!        limit}                                        (the limit: one bucket per transfer)
//!  [Hashes of the range's blocks…, Done] ──────────▶  (hash-compare: hash the range, compare)
//!                                     ◀───────────── Offer {bytes} | Refused
//!  receive_framed_within ◀─ Hello/Welcome/Data/Zero ▶ send_framed (NBD export of the cut,
//!                                                     a batch of reads ahead)
//!  writes the point file (a seed: at its places in the file, `PlacedImage`; else through its
//!  own connection to the storage daemon), frames gathered into writes of a few MiB, one in
//!  flight while the next gathers; hashes the blocks into the shared manifest, journals what
//!  is durable into the shared journal
//! ```
//!
//! - **Several streams.** A transfer runs over [`PeerStreams`] connections at once (8 by default,
//!   1..=16, fewer for a small disk), each carrying a disjoint range of whole blocks: the source
//!   sends only its range's extents, so both sides' CPU work (reading, hashing, zstd, TLS,
//!   writing) spreads over cores. The ranges of a seed or a bitmap delta are cut where the
//!   source's survey says each holds its share of the bytes to send (a disk whose data is in its
//!   first tenth, or a delta in one corner, still keeps every stream busy); a survey that fails
//!   only costs the balance (the ranges are then split by size). Each stream retries on its
//!   own; the first that fails for good ends the others. They share one journal (appends
//!   serialized; a stream journals only what it flushed itself) and one manifest; the
//!   transfer's stats are their sum.
//! - **A seed is written at its places.** A new point without a previous one is created with its
//!   qcow2 metadata preallocated: every guest byte already has its place in the file, which
//!   `qemu-img map` gives, so the streams `pwrite` there (`O_DIRECT`, as the storage daemon
//!   would) instead of sending every byte through a socket to the daemon (measured: 1.57 against
//!   1.77-1.94 CPU-s per GiB over every process, 1.11 against 1.24-1.41 s for 1 GiB). The
//!   metadata never changes (nothing allocates); a few blocks are read back through QEMU at the
//!   end against the manifest.
//! - **A cut for one reader.** The listener serves a cut only to the agent of the host the cut
//!   names (`CutSpec::reader`, the host in the client certificate); anyone else is told the cut
//!   does not exist.
//! - **The receiver dials.** The DR agent runs the transfer (it owns the point file and the
//!   journal), so it is the one that retries: a broken stream is dialled again with a doubling
//!   backoff ([`PeerRetry`]); consecutive failures without progress are bounded. A stream that
//!   stalls longer than the idle timeout (a link that drops packets silently) fails its reads,
//!   so the receiver journals what arrived as it does for a stream that broke. Each stream of a
//!   transfer retries on its own, from what the journal holds in its range.
//! - **Resumable across cut links and killed agents.** The journal lives under the agent's work
//!   dir (`j-<transfer id>/`), bound to the cut *instance*, the target file and the mode
//!   (`binding.json`): a journal of another binding is discarded, never spliced. A re-run of
//!   `transfer_ensure` with the same id resumes from it. The manifest of the point is the
//!   manifest of `prev` with every block that arrived rehashed as it passes; blocks journalled
//!   by an earlier run are read back from the point file and rehashed at the end.
//! - **Cut instances.** A cut registered with the data listener gets a random instance when it
//!   is made (a re-run of the same cut keeps it). A source restarted and cut again under the same
//!   id has another instance, so a stale endpoint is refused and a stale journal discarded.
//! - **Bandwidth.** The source paces what it writes to the connection (below TLS) by the
//!   transfer's limit from the pull (one bucket shared by the transfer's streams) and by the
//!   agent's global cap, one bucket over every connection it serves ([`crate::pace`]); the
//!   receiver needs to do nothing.
//! - **Compression.** Data chunks are zstd-compressed where that saves 5% or more; after a few
//!   chunks that do not shrink, only a 4 KiB sample of each is tried until one does
//!   (`drover_transfer::AdaptiveCompression`), so random data costs next to no zstd CPU.
//! - **TLS.** The product serves and dials with mutual TLS (`drover_pki`'s configs: the CA is
//!   the only root, a client certificate is required, and only an agent's is served: the
//!   control plane never carries disk bytes). Plain TCP exists for tests only and says so in
//!   the log whenever it is used.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use drover_agent_api::*;
use drover_block::copy::{CopyTarget, write_zero_ranges};
use drover_block::direct::{DirectBuf, DirectImage, PlacedImage, blocking_here, direct_buf};
use drover_block::extents::{Extent, ExtentSet};
use drover_block::hash::{BLOCK_SIZE, BlockHash, Manifest, hash_block, zero_hash};
use drover_block::nbd::{BASE_ALLOCATION, NbdClient, WriteOp};
use drover_proto::{Codec, Message, PROTOCOL_VERSION, Pull, PullMode, Range, RefusalCode, Refused};
use drover_transfer::{BlockSource, BlockTarget, Expect, Journal, SendSpec, TransferError};
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio_util::codec::Framed;
use uuid::Uuid;

use crate::pace::{Paced, Pacer, TokenBucket};

/// The largest extent per data frame between agents: what a cut link can lose in flight (a frame
/// half across), so small next to what one transfer sends; large enough that framing is noise.
pub const PEER_CHUNK: u32 = 128 << 10;

/// The sender asks the receiver to make what it holds durable every this many bytes: the most a
/// killed receiving agent has to be sent again.
pub const PEER_FLUSH_EVERY: u64 = 16 << 20;

/// The most data a stream's point target holds before it writes it to the point file: the
/// frames that arrive are gathered into one write of up to this many bytes (one NBD request per
/// few MiB instead of one per chunk, with its round trip to the storage daemon). Written out at
/// every flush point, before anything is journalled. One such write is in flight while the
/// stream gathers the next (see [`PointTarget`]).
const WRITE_GATHER: usize = 4 << 20;

/// Hashes per [`Message::Hashes`] frame (2 MiB of hashes, 4 GiB of disk).
const HASHES_PER_FRAME: usize = 65536;

/// Connections one data listener serves at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

/// How long a connection may take to say what it wants (TLS handshake, pull, hashes).
const PULL_PHASE: Duration = Duration::from_secs(60);

/// How long the receiver waits for the source's offer (the source hashes its whole cut first in
/// a hash-compare).
const OFFER_WAIT: Duration = Duration::from_secs(3600);

/// How a receiving agent retries a broken connection to a source agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRetry {
    /// Consecutive failed connections (no progress between them) before the transfer fails.
    pub attempts: u32,
    /// The first wait after a failure; doubled after each failure up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Connecting and the TLS handshake.
    pub connect_timeout: Duration,
    /// A stream that brings nothing for this long is taken as broken.
    pub idle_timeout: Duration,
}

impl Default for PeerRetry {
    fn default() -> Self {
        PeerRetry {
            attempts: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// The most streams one transfer is pulled over.
pub const MAX_STREAMS: u16 = 16;

/// How many streams (connections) a receiving agent pulls one transfer over. Each stream
/// carries a disjoint range of the disk, so the source reads, hashes, compresses and encrypts,
/// and the receiver decrypts, checks and writes, on several cores at once, and one TCP
/// connection's window does not bound the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerStreams {
    /// At most this many streams (clamped to 1..=[`MAX_STREAMS`]).
    pub streams: u16,
    /// Each stream carries at least this much of the disk: a smaller disk gets fewer streams
    /// (one for a disk below twice this), as a stream costs a connection, a TLS handshake and
    /// a flush of its own.
    pub min_stream_bytes: u64,
}

/// Eight streams: more than the cores, so that while some streams wait (on the source's reads,
/// on writes and flushes at the receiver) others work. Measured on cold 1 GiB seeds between two
/// agents on one two-core host: 1.10-1.12 s median with eight, 1.22 s with four.
impl Default for PeerStreams {
    fn default() -> Self {
        PeerStreams { streams: 8, min_stream_bytes: 128 << 20 }
    }
}

impl PeerStreams {
    /// As [`PeerStreams::ranges`] (as many streams, or fewer), the ranges cut where each holds
    /// about as many of the bytes to send as the others: `bytes[i]` are in the `granule`-sized
    /// piece `i` of the disk (a survey of the source's cut). Without any bytes, by size.
    pub fn ranges_by_bytes(&self, size: u64, granule: u64, bytes: &[u64]) -> Vec<Range> {
        let by_size = self.ranges(size);
        let n = by_size.len() as u64;
        let total: u64 = bytes.iter().sum();
        if n <= 1 || total == 0 || granule == 0 || !granule.is_multiple_of(BLOCK_SIZE) {
            return by_size;
        }
        let mut ranges = Vec::new();
        let (mut start, mut seen, mut seen_at_start) = (0u64, 0u64, 0u64);
        for (i, b) in bytes.iter().enumerate() {
            seen += b;
            let end = ((i as u64 + 1) * granule).min(size);
            // Cut once this range holds its share (the k-th range ends past k/n of the bytes)
            // and some bytes: a range with none would be a stream with nothing to carry.
            let k = ranges.len() as u64 + 1;
            let share = u128::from(seen) * u128::from(n) >= u128::from(total) * u128::from(k);
            if k < n && share && seen > seen_at_start && end < size {
                ranges.push(Range { offset: start, length: end - start });
                (start, seen_at_start) = (end, seen);
            }
        }
        ranges.push(Range { offset: start, length: size - start });
        ranges
    }

    /// The ranges of a disk of `size` bytes, one per stream: disjoint, in whole blocks (the last
    /// ends at the disk's end), covering it all. At least one range, empty for an empty disk.
    pub fn ranges(&self, size: u64) -> Vec<Range> {
        let by_size = size / self.min_stream_bytes.max(1);
        let n = u64::from(self.streams.clamp(1, MAX_STREAMS)).min(by_size).max(1);
        let per = size.div_ceil(BLOCK_SIZE).div_ceil(n).max(1) * BLOCK_SIZE;
        let mut ranges = Vec::new();
        let mut at = 0;
        while at < size && (ranges.len() as u64) < n {
            let length = per.min(size - at);
            ranges.push(Range { offset: at, length });
            at += length;
        }
        if ranges.is_empty() {
            ranges.push(Range { offset: 0, length: size });
        }
        ranges
    }
}

/// How the receiving side dials: TLS (the product) or plain TCP (tests).
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerClient {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub retry: PeerRetry,
    pub streams: PeerStreams,
}

// ------------------------------------------------------------------------------------------------
// The source side: cuts registered for pulling, and the listener.

/// A cut this agent serves to peers.
#[derive(Debug, Clone)]
pub(crate) struct PeerCut {
    pub instance: Uuid,
    pub socket: PathBuf,
    pub export: String,
    pub meta_context: String,
    pub size: u64,
    /// The host whose agent may pull the cut ([`drover_agent_api::CutSpec::reader`]); none:
    /// no other agent may.
    pub reader: Option<Uuid>,
    /// The image of an offline cut (nobody writes it while the cut holds it): pulls read its
    /// bytes from its files, not through the cut's export (see [`FileSource`]). None: a live
    /// cut, read through its VM's export.
    pub image: Option<PathBuf>,
    /// The image's files and map, taken by the first pull that reads them and shared by the
    /// cut's other streams; or why the image cannot be read from its files.
    pub files: Arc<tokio::sync::OnceCell<Result<DirectImage, String>>>,
}

pub(crate) type PeerCuts = Arc<Mutex<HashMap<String, PeerCut>>>;

/// Registers a cut, keeping the instance of the same cut made before (a re-run of `cut_begin`)
/// and choosing a new one otherwise.
pub(crate) fn register_cut(cuts: &PeerCuts, id: &str, mut cut: PeerCut) -> Uuid {
    let mut cuts = cuts.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(old) = cuts.get_mut(id)
        && old.socket == cut.socket
        && old.export == cut.export
        && old.size == cut.size
        && old.image == cut.image
    {
        old.reader = cut.reader;
        return old.instance;
    }
    cut.instance = Uuid::new_v4();
    let instance = cut.instance;
    cuts.insert(id.to_string(), cut);
    instance
}

/// Where peers reach this agent's data listener.
#[derive(Debug, Clone)]
pub(crate) struct Advert {
    pub address: String,
    pub server_name: String,
}

#[derive(Debug, Default)]
struct ListenerCounters {
    streams: AtomicU64,
    refused: AtomicU64,
    sent_bytes: AtomicU64,
    sent_from_files: AtomicU64,
    hashed_bytes: AtomicU64,
    paced_waits: Arc<AtomicU64>,
    /// The bucket of each transfer with a limit of its own, shared by its streams; an entry
    /// whose streams are all gone is dropped at the next lookup.
    job_buckets: Mutex<HashMap<(Uuid, u64), std::sync::Weak<TokenBucket>>>,
}

impl ListenerCounters {
    /// The bucket every stream of `transfer` is paced by for its `limit`.
    fn job_bucket(&self, transfer: Uuid, limit: Option<u64>) -> Option<Arc<TokenBucket>> {
        let limit = limit?;
        let mut buckets = self.job_buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.retain(|_, b| b.strong_count() > 0);
        if let Some(b) = buckets.get(&(transfer, limit)).and_then(|b| b.upgrade()) {
            return Some(b);
        }
        let bucket = Arc::new(TokenBucket::new(limit)?);
        buckets.insert((transfer, limit), Arc::downgrade(&bucket));
        Some(bucket)
    }
}

/// What a data listener served so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataListenerStats {
    /// Pulls accepted.
    pub streams: u64,
    /// Pulls refused (unknown cut, another instance, another size, a bad request).
    pub refused: u64,
    /// Bytes of cuts read to be sent (data and zero chunks), over all streams: what a resumed
    /// transfer sent again shows here.
    pub sent_bytes: u64,
    /// Of those, bytes read from an offline cut's files rather than through its export.
    pub sent_from_files: u64,
    /// Bytes of cuts read to hash them (hash-compare).
    pub hashed_bytes: u64,
    /// Writes held back for a bandwidth limit or the global cap, over all streams: 0 when
    /// nothing was paced.
    pub paced_waits: u64,
}

/// A running data listener; dropping it stops accepting (streams in progress go on).
#[derive(Debug)]
pub struct DataListener {
    local_addr: SocketAddr,
    tls: bool,
    counters: Arc<ListenerCounters>,
    task: tokio::task::JoinHandle<()>,
}

impl DataListener {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Whether connections are TLS (the product) or plain TCP (tests only).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn stats(&self) -> DataListenerStats {
        DataListenerStats {
            streams: self.counters.streams.load(Ordering::Relaxed),
            refused: self.counters.refused.load(Ordering::Relaxed),
            sent_bytes: self.counters.sent_bytes.load(Ordering::Relaxed),
            sent_from_files: self.counters.sent_from_files.load(Ordering::Relaxed),
            hashed_bytes: self.counters.hashed_bytes.load(Ordering::Relaxed),
            paced_waits: self.counters.paced_waits.load(Ordering::Relaxed),
        }
    }
}

impl Drop for DataListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) async fn listen(
    bind: SocketAddr,
    tls: Option<rustls::ServerConfig>,
    cuts: PeerCuts,
    global_cap: Option<Arc<TokenBucket>>,
) -> std::io::Result<DataListener> {
    let listener = TcpListener::bind(bind).await?;
    let local_addr = listener.local_addr()?;
    let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    if acceptor.is_none() {
        tracing::warn!(%local_addr, "agent data listener on plain TCP: for tests only, never in the product");
    }
    let counters = Arc::new(ListenerCounters::default());
    let tls = acceptor.is_some();
    let task = tokio::spawn(accept_loop(listener, acceptor, cuts, counters.clone(), global_cap));
    Ok(DataListener { local_addr, tls, counters, task })
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    cuts: PeerCuts,
    counters: Arc<ListenerCounters>,
    global_cap: Option<Arc<TokenBucket>>,
) {
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "data listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "data listener: {MAX_CONNECTIONS} connections already; closing this one");
            continue;
        };
        let (acceptor, cuts, counters) = (acceptor.clone(), cuts.clone(), counters.clone());
        // Paced below TLS, so the limits count what crosses the link; the transfer's own limit
        // joins the global cap once its pull is read.
        let pacer = Arc::new(Pacer::new(global_cap.clone(), counters.paced_waits.clone()));
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tcp.set_nodelay(true);
            let tcp = Paced::new(tcp, pacer.clone());
            let result = match acceptor {
                Some(a) => match tokio::time::timeout(PULL_PHASE, a.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        // Disk bytes go from agent to agent only: not to the control plane,
                        // whose certificate the same CA signed.
                        let certificates = stream.get_ref().1.peer_certificates().unwrap_or_default();
                        match drover_pki::peer_identity(certificates) {
                            Ok(drover_pki::PeerIdentity::Host(host)) => {
                                tracing::debug!(%peer, %host, "data listener: an agent connected");
                                serve_pull(stream, Some(host.0), &cuts, &counters, &pacer).await
                            }
                            Ok(drover_pki::PeerIdentity::ControlPlane) => {
                                Err("refused the control plane: disk bytes go between agents only".into())
                            }
                            Err(e) => Err(format!("refused: {e}")),
                        }
                    }
                    Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                    Err(_) => Err("TLS handshake timed out".into()),
                },
                // Plain TCP (tests only): nobody to check a cut's reader against.
                None => serve_pull(tcp, None, &cuts, &counters, &pacer).await,
            };
            if let Err(e) = result {
                tracing::warn!(%peer, error = %e, "data listener: stream ended");
            }
        });
    }
}

/// Serves one pull: checks the cut (and that it is for `host`, the agent's host that pulls it,
/// known on a TLS stream), finds what to send, and sends it.
async fn serve_pull<S>(
    stream: S,
    host: Option<Uuid>,
    cuts: &PeerCuts,
    counters: &ListenerCounters,
    pacer: &Pacer,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut framed = Framed::new(stream, Codec);
    let (pull, survey) = match tokio::time::timeout(PULL_PHASE, framed.next()).await {
        Ok(Some(Ok(Message::Pull(p)))) => (p, false),
        Ok(Some(Ok(Message::Survey(p)))) => (p, true),
        Ok(Some(Ok(_))) => {
            return refuse(&mut framed, counters, RefusalCode::Protocol, "expected a pull or a survey".into()).await;
        }
        Ok(Some(Err(e))) => return Err(e.to_string()),
        Ok(None) => return Err("closed before a pull".into()),
        Err(_) => return Err("no pull in time".into()),
    };
    if pull.version != PROTOCOL_VERSION {
        let why = format!("this agent speaks protocol version {PROTOCOL_VERSION}, not {}", pull.version);
        return refuse(&mut framed, counters, RefusalCode::Version, why).await;
    }
    // Every stream of the transfer shares one bucket: the limit holds for the transfer, not
    // for each stream.
    pacer.set_job_bucket(counters.job_bucket(pull.transfer, pull.bandwidth_limit));
    let cut = cuts.lock().unwrap_or_else(|e| e.into_inner()).get(&pull.cut).cloned();
    let cut = match cut {
        // Not said apart from a cut that does not exist: another host learns nothing of it.
        Some(c) if host.is_some() && c.reader != host => {
            let why = format!("this agent has no cut {} for this host", pull.cut);
            return refuse(&mut framed, counters, RefusalCode::UnknownCut, why).await;
        }
        Some(c) if c.instance == pull.instance => c,
        Some(c) => {
            let why = format!(
                "cut {} here is instance {}, not {} (the source agent cut it again)",
                pull.cut, c.instance, pull.instance
            );
            return refuse(&mut framed, counters, RefusalCode::UnknownCut, why).await;
        }
        None => {
            let why = format!("this agent has no cut {}", pull.cut);
            return refuse(&mut framed, counters, RefusalCode::UnknownCut, why).await;
        }
    };
    if pull.disk_size != cut.size {
        let why = format!("cut {} is {} bytes, not {}", pull.cut, cut.size, pull.disk_size);
        return refuse(&mut framed, counters, RefusalCode::SizeMismatch, why).await;
    }
    let range = pull.range;
    let end = range.end().unwrap_or(u64::MAX);
    if !range.offset.is_multiple_of(BLOCK_SIZE)
        || end > cut.size
        || !(end.is_multiple_of(BLOCK_SIZE) || end == cut.size)
    {
        let why = format!("{range:?} is not whole blocks of the cut's {} bytes", cut.size);
        return refuse(&mut framed, counters, RefusalCode::Protocol, why).await;
    }
    if survey && pull.mode == PullMode::HashCompare {
        let why = "a hash-compare sends what differs, which only the hashes tell: nothing to survey".to_string();
        return refuse(&mut framed, counters, RefusalCode::Protocol, why).await;
    }
    let theirs = if pull.mode == PullMode::HashCompare {
        match tokio::time::timeout(PULL_PHASE, read_hashes(&mut framed, range)).await {
            Ok(Ok(h)) => Some(h),
            Ok(Err(why)) => return refuse(&mut framed, counters, RefusalCode::Protocol, why).await,
            Err(_) => return Err("the receiver's hashes did not arrive in time".into()),
        }
    } else {
        None
    };
    let mut src = match NbdClient::connect_unix(&cut.socket, &cut.export, &[&cut.meta_context, BASE_ALLOCATION]).await {
        Ok(c) => c,
        Err(e) => {
            let why = format!("cut {} cannot be read: {e}", pull.cut);
            return refuse(&mut framed, counters, RefusalCode::Unavailable, why).await;
        }
    };
    let extents = match find_extents(&mut src, &cut, pull.mode, range, theirs.as_deref(), counters).await {
        Ok(e) => e,
        Err(why) => return refuse(&mut framed, counters, RefusalCode::Unavailable, why).await,
    };
    if survey {
        // Where the bytes are, not the bytes: the receiver splits its streams by it.
        let _ = src.disconnect().await;
        let (granule, bytes) = survey_of(&extents, range);
        return framed.send(Message::Surveyed { granule, bytes }).await.map_err(|e| e.to_string());
    }
    // An offline cut's bytes are read from its files: through the export, the storage daemon
    // would spend about as much CPU serving them as this whole side spends sending them
    // (measured: 0.5-0.8 CPU-s per GiB). The export still told what to send (its bitmap and
    // block status).
    let files = match &cut.image {
        Some(image) => match cut.files.get_or_init(|| crate::direct_source(image)).await {
            Ok(files) => Some(files.clone()),
            Err(why) => {
                tracing::debug!(cut = pull.cut, %why, "peer transfer: the cut is read through its export");
                None
            }
        },
        None => None,
    };
    counters.streams.fetch_add(1, Ordering::Relaxed);
    let offer = Message::Offer { bytes: extents.total_bytes(), extents: extents.len() as u64 };
    framed.send(offer).await.map_err(|e| e.to_string())?;
    let spec = SendSpec {
        transfer: pull.transfer,
        disk_size: cut.size,
        extents,
        chunk: PEER_CHUNK,
        compress: true,
        flush_every: PEER_FLUSH_EVERY,
    };
    let result = match files {
        Some(image) => {
            let _ = src.disconnect().await;
            drover_transfer::send_framed(framed, &mut FileSource { image, counters }, &spec).await
        }
        None => {
            let mut source = NbdSource { client: src, counters };
            let result = drover_transfer::send_framed(framed, &mut source, &spec).await;
            let _ = source.client.disconnect().await;
            result
        }
    };
    result.map(|_| ()).map_err(|e| e.to_string())
}

async fn refuse<S>(
    framed: &mut Framed<S, Codec>,
    counters: &ListenerCounters,
    code: RefusalCode,
    message: String,
) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    counters.refused.fetch_add(1, Ordering::Relaxed);
    let _ = framed.send(Message::Refused(Refused { code, message: message.clone() })).await;
    Err(format!("refused: {message}"))
}

/// The receiver's block hashes of `range` (whole blocks), in order, every block of it once, then
/// `Done`.
async fn read_hashes<S>(framed: &mut Framed<S, Codec>, range: Range) -> Result<Vec<BlockHash>, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let blocks = range.length.div_ceil(BLOCK_SIZE) as usize;
    let mut hashes = Vec::with_capacity(blocks.min(1 << 20));
    // Bounded: every frame adds at least one hash or ends the loop, and at most `blocks` fit.
    loop {
        match framed.next().await {
            Some(Ok(Message::Hashes { offset, block_size, hashes: part })) => {
                if u64::from(block_size) != BLOCK_SIZE || offset != range.offset + hashes.len() as u64 * BLOCK_SIZE {
                    return Err(format!("hashes at {offset} of {block_size}-byte blocks out of place"));
                }
                if part.is_empty() || hashes.len() + part.len() > blocks {
                    return Err(format!("none, or more than the range's {blocks} block hashes"));
                }
                hashes.extend(part);
            }
            Some(Ok(Message::Done { .. })) if hashes.len() == blocks => return Ok(hashes),
            Some(Ok(Message::Done { .. })) => return Err(format!("{} block hashes of {blocks}", hashes.len())),
            Some(Ok(_)) => return Err("expected block hashes".into()),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("closed while sending hashes".into()),
        }
    }
}

/// The bytes of `extents` in each granule of `range`: granules of whole blocks, as few as make
/// at most [`drover_proto::MAX_SURVEY`] of them.
fn survey_of(extents: &ExtentSet, range: Range) -> (u64, Vec<u64>) {
    let blocks = range.length.div_ceil(BLOCK_SIZE).max(1);
    let granule = blocks.div_ceil(drover_proto::MAX_SURVEY as u64) * BLOCK_SIZE;
    let mut bytes = vec![0u64; range.length.div_ceil(granule) as usize];
    for e in extents.iter() {
        // Bounded by the extent's granules (at most MAX_SURVEY in all).
        let mut at = e.offset;
        while at < e.end() {
            let i = ((at - range.offset) / granule) as usize;
            let granule_end = range.offset + (i as u64 + 1) * granule;
            let n = e.end().min(granule_end) - at;
            if let Some(b) = bytes.get_mut(i) {
                *b += n;
            }
            at += n;
        }
    }
    (granule, bytes)
}

/// What of `range` of the cut to send, in whole manifest blocks (`theirs`: the receiver's hashes
/// of the range's blocks).
async fn find_extents(
    src: &mut NbdClient<UnixStream>,
    cut: &PeerCut,
    mode: PullMode,
    range: Range,
    theirs: Option<&[BlockHash]>,
    counters: &ListenerCounters,
) -> Result<ExtentSet, String> {
    let (from, len) = (range.offset, range.length);
    let first_block = from / BLOCK_SIZE;
    let found = match (mode, theirs) {
        (PullMode::Seed, _) if len == 0 => ExtentSet::new(),
        (PullMode::Seed, _) => src.data_extents(from, len).await.map_err(|e| e.to_string())?,
        (PullMode::Bitmap, _) if len == 0 => ExtentSet::new(),
        (PullMode::Bitmap, _) => src.dirty_extents(&cut.meta_context, from, len).await.map_err(|e| e.to_string())?,
        (PullMode::HashCompare, Some(theirs)) => {
            // Hashed here, on the source's side: only the hashes crossed the link. Each stream
            // hashes its own range, so the streams of a transfer hash in parallel.
            let data = match len {
                0 => ExtentSet::new(),
                _ => src.data_extents(from, len).await.map_err(|e| e.to_string())?,
            };
            let data = data.align_out(BLOCK_SIZE).clip(from, len);
            let mut differ = ExtentSet::new();
            let mut buf = Vec::new();
            let mut hashed = ExtentSet::new();
            for e in data.chunks(4 << 20) {
                buf.resize(e.len as usize, 0);
                src.read_into(e.offset, &mut buf).await.map_err(|e| e.to_string())?;
                counters.hashed_bytes.fetch_add(e.len, Ordering::Relaxed);
                for (i, block) in buf.chunks(BLOCK_SIZE as usize).enumerate() {
                    let b = (e.offset / BLOCK_SIZE) as usize + i;
                    if theirs.get(b - first_block as usize) != Some(&hash_block(block)) {
                        differ.insert(Extent::new(b as u64 * BLOCK_SIZE, block.len() as u64));
                    }
                }
                hashed.insert(e);
            }
            // Holes read as zeroes: the receiver's block differs where it is not zeroes.
            let zero_full = zero_hash(BLOCK_SIZE as usize);
            for (i, h) in theirs.iter().enumerate() {
                let offset = (first_block + i as u64) * BLOCK_SIZE;
                if hashed.contains(offset) {
                    continue;
                }
                let len = BLOCK_SIZE.min(cut.size - offset);
                let zero = if len == BLOCK_SIZE { zero_full } else { zero_hash(len as usize) };
                if *h != zero {
                    differ.insert(Extent::new(offset, len));
                }
            }
            differ
        }
        (PullMode::HashCompare, None) => return Err("a hash-compare without hashes".into()),
    };
    Ok(found.align_out(BLOCK_SIZE).clip(from, len))
}

/// The cut, read through its NBD export.
struct NbdSource<'a> {
    client: NbdClient<UnixStream>,
    counters: &'a ListenerCounters,
}

#[async_trait]
impl BlockSource for NbdSource<'_> {
    async fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.client.read_into(offset, buf).await.map_err(std::io::Error::other)?;
        self.counters.sent_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn read_many(&mut self, reads: &mut [(u64, &mut [u8])]) -> std::io::Result<()> {
        self.client.read_many_into(reads).await.map_err(std::io::Error::other)?;
        let bytes: usize = reads.iter().map(|(_, b)| b.len()).sum();
        self.counters.sent_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// An offline cut, read from its image's files (see [`DirectImage`]).
struct FileSource<'a> {
    image: DirectImage,
    counters: &'a ListenerCounters,
}

impl FileSource<'_> {
    fn sent(&self, bytes: usize) {
        self.counters.sent_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.counters.sent_from_files.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

#[async_trait]
impl BlockSource for FileSource<'_> {
    async fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        blocking_here(|| self.image.read_at(offset, buf)).map_err(std::io::Error::other)?;
        self.sent(buf.len());
        Ok(())
    }

    async fn read_many(&mut self, reads: &mut [(u64, &mut [u8])]) -> std::io::Result<()> {
        let image = &self.image;
        blocking_here(|| reads.iter_mut().try_for_each(|(offset, buf)| image.read_at(*offset, buf)))
            .map_err(std::io::Error::other)?;
        self.sent(reads.iter().map(|(_, b)| b.len()).sum());
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// The receiving side.

/// What the receiving job needs to pull one cut.
pub(crate) struct PullJob<'a> {
    pub address: &'a str,
    pub server_name: &'a str,
    pub cut: &'a str,
    pub instance: Uuid,
    pub spec: &'a TransferSpec,
    /// The point file's path (the journal is bound to it).
    pub target_path: &'a Path,
    /// The point file's NBD export: each stream writes through a connection of its own.
    pub target_socket: &'a Path,
    pub target_export: &'a str,
    /// The point file written straight at its places by the streams (a seed into a file whose
    /// metadata is preallocated: see [`PlacedImage`]), skipping its export and a copy of every
    /// byte through a socket.
    pub placed: Option<PlacedImage>,
    pub journal_dir: PathBuf,
    /// The manifest the point starts from (`prev`'s, or a zeroed one).
    pub manifest: Manifest,
    /// `true` when no manifest describes what the target holds: it is read and hashed here.
    pub hash_target: bool,
    pub progress: Arc<dyn Fn(u64, u64) + Send + Sync>,
}

/// What a pull did.
pub(crate) struct Pulled {
    pub manifest: Manifest,
    /// Bytes read back from the point file (rehashing, or hashing an undescribed target).
    pub read_back: u64,
    /// Bytes written to the point file by this run.
    pub written: u64,
    pub stats: PeerTransferStats,
}

/// What binds a journal to one transfer: another binding's journal is discarded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Binding {
    cut: String,
    instance: Uuid,
    target: String,
    mode: TransferMode,
    size: u64,
}

/// The transfer id as the wire's 16 bytes.
fn transfer_uuid(id: &str) -> Uuid {
    let h = blake3::hash(id.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.as_bytes()[..16]);
    Uuid::from_bytes(b)
}

fn pull_mode(mode: TransferMode) -> PullMode {
    match mode {
        TransferMode::Seed => PullMode::Seed,
        TransferMode::Bitmap => PullMode::Bitmap,
        TransferMode::HashCompare => PullMode::HashCompare,
    }
}

fn io_error(what: &str, e: impl std::fmt::Display) -> AgentError {
    AgentError::internal(format!("{what}: {e}"))
}

/// Opens the journal bound to this transfer, discarding one bound to anything else.
async fn open_journal(dir: &Path, binding: &Binding) -> AgentResult<Journal> {
    let path = dir.join("binding.json");
    let same = match tokio::fs::read(&path).await {
        Ok(b) => serde_json::from_slice::<Binding>(&b).ok().as_ref() == Some(binding),
        Err(_) => false,
    };
    if !same {
        if tokio::fs::try_exists(dir).await.unwrap_or(false) {
            tracing::info!(dir = %dir.display(), "a journal of another cut instance, target or mode: discarded");
        }
        let _ = tokio::fs::remove_dir_all(dir).await;
        let mut builder = tokio::fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        builder.create(dir).await.map_err(|e| io_error("creating the transfer's journal directory", e))?;
        let bytes = serde_json::to_vec(binding).map_err(|e| io_error("the journal's binding", e))?;
        drover_qemu::durable::write(&path, bytes, 0o600).await.map_err(|e| io_error("writing the binding", e))?;
    }
    Journal::open(&dir.join("extents")).await.map_err(|e| io_error("opening the transfer's journal", e))
}

/// The progress of a transfer's streams together: bytes arrived (or held by the journal when the
/// run began) out of the sum of the streams' offers (a stream not offered yet counts its range).
struct StreamsProgress {
    done: AtomicU64,
    totals: Vec<AtomicU64>,
    report: Arc<dyn Fn(u64, u64) + Send + Sync>,
}

impl StreamsProgress {
    fn set_total(&self, stream: usize, total: u64) {
        if let Some(t) = self.totals.get(stream) {
            t.store(total, Ordering::Relaxed);
        }
        self.tell();
    }

    fn add(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
        self.tell();
    }

    fn tell(&self) {
        let done = self.done.load(Ordering::Relaxed);
        let total: u64 = self.totals.iter().map(|t| t.load(Ordering::Relaxed)).sum::<u64>().max(1);
        (self.report)(done.min(total), total.max(done));
    }
}

/// One stream of a pull: its range of the disk and everything it shares with the others.
struct StreamJob {
    index: usize,
    range: Range,
    address: String,
    server_name: String,
    client: PeerClient,
    pull: Pull,
    /// The receiver's hashes of the whole disk (hash-compare); the stream sends its range's.
    hashes: Option<Arc<Vec<BlockHash>>>,
    journal: Arc<Journal>,
    manifest: Arc<Mutex<Manifest>>,
    target_socket: PathBuf,
    target_export: String,
    /// The point file written at its places, not through its export (see [`PullJob::placed`]).
    placed: Option<PlacedImage>,
    progress: Arc<StreamsProgress>,
}

/// What one stream did.
#[derive(Default)]
struct StreamPulled {
    /// Writes that were not whole blocks: hashed from the point file at the end.
    rehash: ExtentSet,
    data_bytes: u64,
    zero_bytes: u64,
    received_twice: u64,
    write_time: Duration,
    flush_time: Duration,
    reconnects: u32,
    resumed_bytes: u64,
    resumed_extents: u64,
    wire_in: u64,
    wire_out: u64,
}

/// Pulls the cut into the point file over [`PeerStreams`] streams at once, each resuming from
/// the shared journal and reconnecting with backoff on its own; returns the point's manifest.
/// `target` is a connection to the point file's export, used before the streams (hashing an
/// undescribed target) and after them (rehashing).
pub(crate) async fn pull(
    job: PullJob<'_>,
    client: &PeerClient,
    target: &mut NbdClient<UnixStream>,
) -> AgentResult<Pulled> {
    let spec = job.spec;
    let size = spec.size;
    let binding = Binding {
        cut: job.cut.to_string(),
        instance: job.instance,
        target: job.target_path.to_string_lossy().into_owned(),
        mode: spec.mode,
        size,
    };
    let journal = Arc::new(open_journal(&job.journal_dir, &binding).await?);
    let held_at_start = journal.durable();
    let mut manifest = job.manifest;
    let mut read_back = 0u64;
    if job.hash_target {
        read_back += rehash(target, &mut manifest, &ExtentSet::from_range(0, size)).await?;
    }
    let hashes: Option<Arc<Vec<BlockHash>>> = (spec.mode == TransferMode::HashCompare)
        .then(|| Arc::new((0..manifest.blocks()).filter_map(|b| manifest.hash(b).copied()).collect()));
    if client.tls.is_none() {
        tracing::warn!(
            address = job.address,
            "pulling from a peer over plain TCP: for tests only, never in the product"
        );
    }
    let pull = Pull {
        version: PROTOCOL_VERSION,
        transfer: transfer_uuid(&spec.id),
        cut: job.cut.to_string(),
        instance: job.instance,
        mode: pull_mode(spec.mode),
        disk_size: size,
        range: Range { offset: 0, length: size },
        bandwidth_limit: spec.bandwidth_limit,
    };
    let mut stats = PeerTransferStats::default();
    let by_size = client.streams.ranges(size);
    let ranges = match spec.mode {
        // Every block is hashed on both sides: the work is the disk's size, split by size.
        TransferMode::HashCompare => by_size,
        _ if by_size.len() <= 1 => by_size,
        _ => {
            let wire = Arc::new(WireCounters::default());
            let surveyed = survey_cut(job.address, job.server_name, client, &pull, wire.clone()).await;
            stats.wire_bytes_in += wire.read.load(Ordering::Relaxed);
            stats.wire_bytes_out += wire.written.load(Ordering::Relaxed);
            match surveyed {
                Ok((granule, bytes)) => client.streams.ranges_by_bytes(size, granule, &bytes),
                Err(e) => {
                    tracing::warn!(address = job.address, error = %e, "peer transfer: no survey of the cut; streams split by size");
                    by_size
                }
            }
        }
    };
    let progress = Arc::new(StreamsProgress {
        done: AtomicU64::new(held_at_start.total_bytes()),
        totals: ranges.iter().map(|r| AtomicU64::new(r.length)).collect(),
        report: job.progress.clone(),
    });
    let manifest = Arc::new(Mutex::new(manifest));
    tracing::debug!(address = job.address, streams = ranges.len(), "peer transfer: pulling");
    let mut streams = tokio::task::JoinSet::new();
    for (index, range) in ranges.iter().enumerate() {
        // Spawned, not joined here: the streams' TLS, hashing and writes run on all cores.
        streams.spawn(pull_stream(StreamJob {
            index,
            range: *range,
            address: job.address.to_string(),
            server_name: job.server_name.to_string(),
            client: client.clone(),
            pull: Pull { range: *range, ..pull.clone() },
            hashes: hashes.clone(),
            journal: journal.clone(),
            manifest: manifest.clone(),
            target_socket: job.target_socket.to_path_buf(),
            target_export: job.target_export.to_string(),
            placed: job.placed.clone(),
            progress: progress.clone(),
        }));
    }
    stats.streams = ranges.len() as u32;
    let mut rehash_set = held_at_start;
    // Bounded by the streams spawned; the first that fails ends the others (dropping the set
    // aborts them: what they journalled stays for the next run).
    while let Some(done) = streams.join_next().await {
        let s = match done {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(AgentError::internal(format!("a stream of the transfer: {e}"))),
        };
        rehash_set = rehash_set.union(&s.rehash);
        stats.data_bytes += s.data_bytes;
        stats.zero_bytes += s.zero_bytes;
        stats.largest_stream_bytes = stats.largest_stream_bytes.max(s.data_bytes + s.zero_bytes);
        stats.received_twice += s.received_twice;
        stats.write_ms += s.write_time.as_millis() as u64;
        stats.flush_ms += s.flush_time.as_millis() as u64;
        stats.reconnects += s.reconnects;
        stats.resumed_bytes += s.resumed_bytes;
        stats.resumed_extents += s.resumed_extents;
        stats.wire_bytes_in += s.wire_in;
        stats.wire_bytes_out += s.wire_out;
    }
    let mut manifest = match Arc::try_unwrap(manifest) {
        Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()),
        Err(shared) => shared.lock().unwrap_or_else(|e| e.into_inner()).clone(),
    };
    // Blocks journalled by an earlier run (a killed agent) did not pass through here: read them
    // back from the point file and hash them; likewise any write that was not whole blocks.
    read_back += rehash(target, &mut manifest, &rehash_set).await?;
    if job.placed.is_some() {
        read_back += check_placed(target, &manifest).await?;
    }
    let written = stats.data_bytes + stats.zero_bytes;
    Ok(Pulled { manifest, read_back, written, stats })
}

/// Asks the source where the bytes of the pull are (see `drover_proto`'s "Surveying"), over a
/// connection of its own: the granule and the bytes in each, checked to describe the disk.
async fn survey_cut(
    address: &str,
    server_name: &str,
    client: &PeerClient,
    pull: &Pull,
    wire: Arc<WireCounters>,
) -> Result<(u64, Vec<u64>), String> {
    let size = pull.disk_size;
    let asked = async {
        let conn = connect(address, server_name, client, wire).await.map_err(|e| e.to_string())?;
        let mut framed = Framed::new(conn, Codec);
        framed.send(Message::Survey(pull.clone())).await.map_err(|e| e.to_string())?;
        match framed.next().await {
            Some(Ok(Message::Surveyed { granule, bytes })) => Ok((granule, bytes)),
            Some(Ok(Message::Refused(r))) => Err(format!("refused: {}", r.message)),
            Some(Ok(_)) => Err("the source answered something else".to_string()),
            Some(Err(e)) => Err(e.to_string()),
            None => Err("the source closed the connection".to_string()),
        }
    };
    let (granule, bytes) =
        tokio::time::timeout(PULL_PHASE, asked).await.map_err(|_| "no answer in time".to_string())??;
    let fits = granule.is_multiple_of(BLOCK_SIZE)
        && bytes.len() as u64 == size.div_ceil(granule)
        && bytes.iter().enumerate().all(|(i, b)| *b <= granule.min(size - i as u64 * granule));
    if !fits {
        return Err(format!(
            "a survey of {} granules of {granule} bytes does not describe a disk of {size}",
            bytes.len()
        ));
    }
    Ok((granule, bytes))
}

/// One stream: dials, pulls its range, receives, and on a broken stream dials again with a
/// doubling backoff until the range is done or the failures in a row without progress run out.
async fn pull_stream(job: StreamJob) -> AgentResult<StreamPulled> {
    let retry_kind = |e: drover_block::nbd::NbdError| AgentError::new(ErrorKind::Retry, format!("the point file: {e}"));
    let dst = match &job.placed {
        Some(image) => PointFile::Placed(image.clone()),
        None => PointFile::Nbd(
            NbdClient::connect_unix(&job.target_socket, &job.target_export, &[]).await.map_err(retry_kind)?,
        ),
    };
    let (lo, len) = (job.range.offset, job.range.length);
    let disk_size = job.pull.disk_size;
    let mut sink = PointTarget {
        dst: Some(dst),
        in_flight: None,
        spare: direct_buf(WRITE_GATHER),
        gathered: direct_buf(WRITE_GATHER),
        gathered_at: 0,
        manifest: &job.manifest,
        disk_size,
        received: job.journal.durable().clip(lo, len),
        rehash: ExtentSet::new(),
        data_bytes: 0,
        zero_bytes: 0,
        received_twice: 0,
        write_time: Duration::ZERO,
        flush_time: Duration::ZERO,
        progress: &job.progress,
        zero_block: zero_hash(BLOCK_SIZE as usize),
    };
    let hashes = job.hashes.as_deref().map(|all| {
        let first = (lo / BLOCK_SIZE) as usize;
        let end = (lo + len).div_ceil(BLOCK_SIZE) as usize;
        all.get(first..end.min(all.len())).unwrap_or_default()
    });
    let expect = Expect { transfer: job.pull.transfer, disk_size };
    let retry = job.client.retry;
    let wire = Arc::new(WireCounters::default());
    let mut out = StreamPulled::default();
    let (mut failures, mut backoff) = (0u32, retry.initial_backoff);
    // Every connection that brings progress resets `failures`; this bounds the whole loop.
    let max_connections = u64::from(retry.attempts.max(1)) * 1000;
    let mut connections = 0u64;
    loop {
        connections += 1;
        if connections > 1 {
            out.reconnects += 1;
        }
        let held_here = job.journal.durable().clip(lo, len);
        let held = held_here.total_bytes();
        if held > 0 {
            out.resumed_bytes += held;
            out.resumed_extents += held_here.len() as u64;
        }
        // The idle timeout applies once the source streams (it may hash its range for long
        // first).
        wire.idle_ms.store(0, Ordering::Relaxed);
        let result = match connect(&job.address, &job.server_name, &job.client, wire.clone()).await {
            Ok(conn) => {
                let stream = Stream { index: job.index, range: job.range, journal: &job.journal, expect: &expect };
                attempt(conn, &job.pull, hashes, &mut sink, &stream, &wire, retry.idle_timeout).await
            }
            Err(e) => Err(TransferError::Io(e)),
        };
        let e = match result {
            Ok(()) => break,
            Err(e) => e,
        };
        let from = format!("the source agent at {}", job.address);
        match &e {
            TransferError::Cut | TransferError::Io(_) | TransferError::Refused(RefusalCode::Unavailable, _) => {}
            TransferError::Refused(RefusalCode::UnknownCut, m) => {
                return Err(AgentError::gone(format!("{from}: {m}")));
            }
            TransferError::Refused(RefusalCode::SizeMismatch | RefusalCode::Version, m) => {
                return Err(AgentError::new(ErrorKind::Conflict, format!("{from}: {m}")));
            }
            other => return Err(AgentError::internal(format!("{from}: {other}"))),
        }
        if job.journal.durable().clip(lo, len).total_bytes() > held {
            failures = 0;
            backoff = retry.initial_backoff;
        }
        failures += 1;
        if failures > retry.attempts || connections >= max_connections {
            return Err(AgentError::new(
                ErrorKind::Retry,
                format!("{from}: {e} ({failures} connections in a row without progress)"),
            ));
        }
        tracing::warn!(address = %job.address, stream = job.index, error = %e, failures, ?backoff, "peer transfer: reconnecting");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(retry.max_backoff);
    }
    (out.rehash, out.data_bytes, out.zero_bytes, out.received_twice) =
        (std::mem::take(&mut sink.rehash), sink.data_bytes, sink.zero_bytes, sink.received_twice);
    (out.write_time, out.flush_time) = (sink.write_time, sink.flush_time);
    // The stream ended with a flush: nothing is in flight.
    let dst = sink.settle().await.map_err(|e| io_error("the point file", e))?.take();
    match dst.ok_or_else(|| AgentError::internal("the point file's connection is gone"))? {
        PointFile::Nbd(nbd) => nbd.disconnect().await.map_err(retry_kind)?,
        PointFile::Placed(_) => {}
    }
    out.wire_in = wire.read.load(Ordering::Relaxed);
    out.wire_out = wire.written.load(Ordering::Relaxed);
    Ok(out)
}

/// Removes a transfer's journal (the point is done, or the transfer forgotten).
pub(crate) async fn remove_journal(dir: &Path) {
    let _ = tokio::fs::remove_dir_all(dir).await;
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// How much a receiving stream reads from its socket at once (see [`connect`]).
const RECEIVE_BUFFER: usize = 256 << 10;

async fn connect(
    address: &str,
    server_name: &str,
    client: &PeerClient,
    wire: Arc<WireCounters>,
) -> std::io::Result<Box<dyn Conn>> {
    let limit = client.retry.connect_timeout;
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connecting to {address} timed out"));
    let tcp = tokio::time::timeout(limit, TcpStream::connect(address)).await.map_err(|_| timed_out())??;
    tcp.set_nodelay(true)?;
    // Read in large pieces beneath TLS: rustls asks for 4 KiB at a time, which unbuffered is a
    // system call per 4 KiB of disk (a quarter of a million per GiB) on the receiving side.
    let counted = tokio::io::BufReader::with_capacity(RECEIVE_BUFFER, Counted::new(tcp, wire));
    match &client.tls {
        Some(config) => {
            let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("server name {server_name:?}: {e}"))
            })?;
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            let tls =
                tokio::time::timeout(limit, connector.connect(name, counted)).await.map_err(|_| timed_out())??;
            Ok(Box::new(tls))
        }
        None => Ok(Box::new(counted)),
    }
}

/// Which stream a connection serves, and what it shares with the others.
struct Stream<'a> {
    index: usize,
    range: Range,
    journal: &'a Journal,
    expect: &'a Expect,
}

/// One connection: pull, wait for the offer, receive.
async fn attempt(
    conn: Box<dyn Conn>,
    pull: &Pull,
    hashes: Option<&[BlockHash]>,
    sink: &mut PointTarget<'_>,
    stream: &Stream<'_>,
    wire: &WireCounters,
    idle: Duration,
) -> Result<(), TransferError> {
    let mut framed = Framed::new(conn, Codec);
    let cut = |e: drover_proto::ProtoError| match e {
        drover_proto::ProtoError::Io(_) => TransferError::Cut,
        other => TransferError::Proto(other),
    };
    framed.send(Message::Pull(pull.clone())).await.map_err(cut)?;
    if let Some(hashes) = hashes {
        for (i, part) in hashes.chunks(HASHES_PER_FRAME).enumerate() {
            let offset = stream.range.offset + (i * HASHES_PER_FRAME) as u64 * BLOCK_SIZE;
            let m = Message::Hashes { offset, block_size: BLOCK_SIZE as u32, hashes: part.to_vec() };
            framed.send(m).await.map_err(cut)?;
        }
        framed.send(Message::Done { bytes: 0 }).await.map_err(cut)?;
    }
    let offer = match tokio::time::timeout(OFFER_WAIT, framed.next()).await {
        Ok(Some(Ok(Message::Offer { bytes, .. }))) => bytes,
        Ok(Some(Ok(Message::Refused(r)))) => return Err(TransferError::Refused(r.code, r.message)),
        Ok(Some(Ok(_))) => return Err(TransferError::Protocol("expected the source's offer".into())),
        // A TLS refusal (a certificate the source does not accept) shows here, on the first read.
        Ok(Some(Err(drover_proto::ProtoError::Io(e)))) => return Err(TransferError::Io(e)),
        Ok(Some(Err(e))) => {
            return Err(TransferError::Protocol(format!(
                "the source does not answer in the agents' protocol ({e}): a TLS listener dialled without TLS?"
            )));
        }
        Ok(None) | Err(_) => return Err(TransferError::Cut),
    };
    sink.progress.set_total(stream.index, offer);
    // From here the source streams: a link that drops packets silently never errors, so a
    // stream that brings nothing for `idle` fails its reads (see `Counted`), and the receiver
    // makes durable and journals what arrived before it gives the stream up.
    wire.idle_ms.store(idle.as_millis().max(1) as u64, Ordering::Relaxed);
    drover_transfer::receive_framed_within(framed, sink, stream.journal, stream.expect, stream.range).await.map(|_| ())
}

/// Reads `extents` (rounded out to whole blocks) back from the target and hashes them into the
/// manifest. Returns the bytes read.
async fn rehash(target: &mut NbdClient<UnixStream>, manifest: &mut Manifest, extents: &ExtentSet) -> AgentResult<u64> {
    let size = manifest.disk_size;
    let blocks = extents.align_out(BLOCK_SIZE).clip(0, size);
    let mut buf = Vec::new();
    for e in blocks.chunks(4 << 20) {
        buf.resize(e.len as usize, 0);
        target.read_into(e.offset, &mut buf).await.map_err(|e| io_error("reading the point file back", e))?;
        manifest.set_range(e.offset, &buf).map_err(|e| io_error("the point's manifest", e))?;
    }
    Ok(blocks.total_bytes())
}

/// Where a stream writes the point file.
enum PointFile {
    /// Through the stream's own connection to the point file's NBD export.
    Nbd(NbdClient<UnixStream>),
    /// Straight into the file, at the places of the guest's bytes (a seed: see [`PullJob`]).
    Placed(PlacedImage),
}

/// Both are a copy's [`CopyTarget`]: these go through it.
impl PointFile {
    /// Writes `data` at `offset`; gives itself and the buffer back with the result.
    async fn write(mut self, offset: u64, data: DirectBuf) -> (PointFile, DirectBuf, std::io::Result<()>) {
        let op = [WriteOp::Data { offset, data: &data[..] }];
        let written = match &mut self {
            PointFile::Nbd(nbd) => CopyTarget::write_many(nbd, &op).await,
            PointFile::Placed(image) => image.write_many(&op).await,
        };
        (self, data, written.map_err(std::io::Error::other))
    }

    async fn write_zeroes(&mut self, offset: u64, length: u64) -> std::io::Result<()> {
        let range = ExtentSet::from_range(offset, length);
        let written = match self {
            PointFile::Nbd(nbd) => write_zero_ranges(nbd, &range).await,
            PointFile::Placed(image) => write_zero_ranges(image, &range).await,
        };
        written.map_err(std::io::Error::other)
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        let flushed = match self {
            PointFile::Nbd(nbd) => CopyTarget::flush(nbd).await,
            PointFile::Placed(image) => image.flush().await,
        };
        flushed.map_err(std::io::Error::other)
    }
}

/// How many blocks of a point written at its places are read back through QEMU (see
/// [`check_placed`]).
const PLACED_SAMPLES: u64 = 16;

/// Reads back, through the point file's storage daemon (QEMU's reading of the qcow2), up to
/// [`PLACED_SAMPLES`] blocks that hold data, spread over the disk, and checks them against the
/// manifest. Writing a qcow2 at its places relies on QEMU's metadata preallocation leaving the
/// clusters allocated but not marked zero (reading as zeros only because the file has holes
/// there): a QEMU that marked them zero would make the bytes written there invisible, and this
/// fails the transfer instead of publishing a point that reads otherwise than its manifest says.
/// Returns the bytes read.
pub(crate) async fn check_placed(target: &mut NbdClient<UnixStream>, manifest: &Manifest) -> AgentResult<u64> {
    let zero_block = zero_hash(BLOCK_SIZE as usize);
    let with_data: Vec<u64> = (0..manifest.blocks())
        .filter(|b| {
            let (_, len) = manifest.block_range(*b);
            let zero = if len == BLOCK_SIZE { zero_block } else { zero_hash(len as usize) };
            manifest.hash(*b).is_some_and(|h| *h != zero)
        })
        .collect();
    let step = (with_data.len() as u64).div_ceil(PLACED_SAMPLES).max(1) as usize;
    let mut buf = Vec::new();
    let mut read = 0;
    for b in with_data.iter().step_by(step) {
        let (offset, len) = manifest.block_range(*b);
        buf.resize(len as usize, 0);
        target.read_into(offset, &mut buf).await.map_err(|e| io_error("reading the point file back", e))?;
        read += len;
        if Some(&hash_block(&buf)) != manifest.hash(*b) {
            return Err(AgentError::internal(format!(
                "the point file does not read back what was written at its places (the block at {offset}): \
                 this QEMU's preallocated qcow2 metadata is not what drover expects"
            )));
        }
    }
    Ok(read)
}

/// A write to the point file on its way: the destination and the buffer come back with its
/// result.
type WriteInFlight = tokio::task::JoinHandle<(PointFile, DirectBuf, std::io::Result<()>)>;

/// The point file as one stream's target: writes go to the stream's own connection to its NBD
/// export (or straight into the file: [`PointFile`]), gathered while contiguous into writes of up to [`WRITE_GATHER`] bytes (written out
/// before a zero range, a flush or a write elsewhere), and into the shared manifest (hashed as
/// they arrive, outside its lock). One gathered write is in flight (a task of its own, holding
/// the connection) while the stream receives, checks and gathers the next: the stream waits for
/// a write only when the next one is ready, or at a zero range or a flush point, which is when
/// the write's error, if any, shows.
struct PointTarget<'a> {
    /// The destination, while no write holds it.
    dst: Option<PointFile>,
    in_flight: Option<WriteInFlight>,
    /// The buffer of the last write, for the next gathering.
    spare: DirectBuf,
    /// Data taken but not written yet: contiguous from `gathered_at`.
    gathered: DirectBuf,
    gathered_at: u64,
    manifest: &'a Mutex<Manifest>,
    disk_size: u64,
    /// What arrived in this stream's range (and what the journal held there when this run
    /// began).
    received: ExtentSet,
    /// Writes that were not whole blocks: hashed from the file at the end.
    rehash: ExtentSet,
    data_bytes: u64,
    zero_bytes: u64,
    received_twice: u64,
    /// Time spent waiting for writes to the point file, and in flushes of it.
    write_time: Duration,
    flush_time: Duration,
    progress: &'a StreamsProgress,
    zero_block: BlockHash,
}

impl PointTarget<'_> {
    /// Whether `offset..offset+len` is whole blocks (the last one may end at the disk's end).
    fn whole_blocks(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        offset.is_multiple_of(BLOCK_SIZE) && (end.is_multiple_of(BLOCK_SIZE) || end == self.disk_size)
    }

    fn arrived(&mut self, offset: u64, len: u64) {
        let twice = self.received.intersect(&ExtentSet::from_range(offset, len)).total_bytes();
        self.received_twice += twice;
        self.received.insert(Extent::new(offset, len));
        self.progress.add(len - twice);
    }

    /// Waits for the write in flight, if any; returns the connection (`None` in it only once the
    /// stream is done with it).
    async fn settle(&mut self) -> std::io::Result<&mut Option<PointFile>> {
        if let Some(write) = self.in_flight.take() {
            let start = std::time::Instant::now();
            let done = write.await;
            self.write_time += start.elapsed();
            let (dst, buffer, written) = done.map_err(std::io::Error::other)?;
            self.dst = Some(dst);
            self.spare = buffer;
            written?;
        }
        Ok(&mut self.dst)
    }

    /// The connection, once no write holds it.
    async fn connection(&mut self) -> std::io::Result<&mut PointFile> {
        self.settle().await?.as_mut().ok_or_else(|| std::io::Error::other("the point file's connection is gone"))
    }

    /// Sends what was gathered on its way, once the write before it is done.
    async fn write_gathered(&mut self) -> std::io::Result<()> {
        if !self.gathered.is_empty() {
            self.connection().await?;
            let Some(dst) = self.dst.take() else { unreachable!("settled just now") };
            let mut data = std::mem::replace(&mut self.spare, direct_buf(0));
            data.clear();
            std::mem::swap(&mut data, &mut self.gathered);
            self.in_flight = Some(tokio::spawn(dst.write(self.gathered_at, data)));
        }
        Ok(())
    }

    fn set_hashes(&self, hashes: impl IntoIterator<Item = (u64, BlockHash)>) -> std::io::Result<()> {
        let mut manifest = self.manifest.lock().unwrap_or_else(|e| e.into_inner());
        for (b, h) in hashes {
            manifest.set_hash(b, h).map_err(std::io::Error::other)?;
        }
        Ok(())
    }
}

impl Drop for PointTarget<'_> {
    /// A stream given up (its transfer failed elsewhere) leaves no write behind it.
    fn drop(&mut self) {
        if let Some(write) = self.in_flight.take() {
            write.abort();
        }
    }
}

#[async_trait]
impl BlockTarget for PointTarget<'_> {
    async fn write(&mut self, offset: u64, data: &[u8], hashes: &[drover_proto::Hash]) -> std::io::Result<()> {
        let follows = offset == self.gathered_at + self.gathered.len() as u64;
        if !self.gathered.is_empty() && (!follows || self.gathered.len() + data.len() > WRITE_GATHER) {
            self.write_gathered().await?;
        }
        if self.gathered.is_empty() {
            self.gathered_at = offset;
        }
        self.gathered.extend_from_slice(data);
        let len = data.len() as u64;
        if self.whole_blocks(offset, len) {
            // The frame's piece hashes are the blocks' (checked on arrival): no second pass.
            const _: () = assert!(drover_proto::HASH_PIECE as u64 == BLOCK_SIZE);
            let first = offset / BLOCK_SIZE;
            self.set_hashes(hashes.iter().enumerate().map(|(i, h)| (first + i as u64, *h)))?;
        } else {
            self.rehash.insert(Extent::new(offset, len));
        }
        self.data_bytes += len;
        self.arrived(offset, len);
        Ok(())
    }

    async fn write_zeroes(&mut self, offset: u64, length: u64) -> std::io::Result<()> {
        self.write_gathered().await?;
        let start = std::time::Instant::now();
        self.connection().await?.write_zeroes(offset, length).await?;
        self.write_time += start.elapsed();
        if self.whole_blocks(offset, length) {
            let blocks = offset / BLOCK_SIZE..(offset + length).div_ceil(BLOCK_SIZE);
            let hashes: Vec<_> = blocks
                .map(|b| {
                    let len = BLOCK_SIZE.min(self.disk_size - b * BLOCK_SIZE);
                    (b, if len == BLOCK_SIZE { self.zero_block } else { zero_hash(len as usize) })
                })
                .collect();
            self.set_hashes(hashes)?;
        } else {
            self.rehash.insert(Extent::new(offset, length));
        }
        self.zero_bytes += length;
        self.arrived(offset, length);
        Ok(())
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.write_gathered().await?;
        let dst = self.connection().await?;
        let start = std::time::Instant::now();
        let flushed = dst.flush().await;
        self.flush_time += start.elapsed();
        flushed
    }
}

/// Bytes read from and written to a connection, below TLS: what crossed the link.
#[derive(Debug, Default)]
struct WireCounters {
    read: AtomicU64,
    written: AtomicU64,
    /// Once set (milliseconds), a connection that reads nothing for this long fails its reads
    /// and writes with `TimedOut`.
    idle_ms: AtomicU64,
}

struct Counted<S> {
    inner: S,
    wire: Arc<WireCounters>,
    /// When the connection is taken as dead, once `idle_ms` is set; pushed back by every read.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Counted<S> {
    fn new(inner: S, wire: Arc<WireCounters>) -> Counted<S> {
        Counted { inner, wire, deadline: None }
    }

    /// On a pending read or write: whether the idle time is up (and the waker registered if not).
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let ms = self.wire.idle_ms.load(Ordering::Relaxed);
        if ms == 0 {
            return false;
        }
        let deadline = self.deadline.get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(ms))));
        deadline.as_mut().poll(cx).is_ready()
    }

    fn idle_error() -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "the link brought nothing for the idle timeout")
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                self.wire.read.fetch_add(n as u64, Ordering::Relaxed);
                let ms = self.wire.idle_ms.load(Ordering::Relaxed);
                if let Some(d) = self.deadline.as_mut() {
                    d.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(ms));
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.idle_expired(cx) => Poll::Ready(Err(Self::idle_error())),
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                self.wire.written.fetch_add(n as u64, Ordering::Relaxed);
                Poll::Ready(Ok(n))
            }
            Poll::Pending if self.idle_expired(cx) => Poll::Ready(Err(Self::idle_error())),
            other => other,
        }
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending if self.idle_expired(cx) => Poll::Ready(Err(Self::idle_error())),
            other => other,
        }
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_made_again_keeps_its_instance_and_another_cut_gets_a_new_one() {
        let cuts = PeerCuts::default();
        let cut = |socket: &str| PeerCut {
            instance: Uuid::nil(),
            socket: socket.into(),
            export: "e".into(),
            meta_context: "m".into(),
            size: 1 << 20,
            reader: None,
            image: None,
            files: Default::default(),
        };
        let first = register_cut(&cuts, "c1", cut("/a"));
        assert_ne!(first, Uuid::nil());
        assert_eq!(register_cut(&cuts, "c1", cut("/a")), first, "a re-run of the same cut");
        // A re-run that names the reader (a retried step of a newer plan) keeps the instance
        // and records the reader.
        let reader = Uuid::new_v4();
        assert_eq!(register_cut(&cuts, "c1", PeerCut { reader: Some(reader), ..cut("/a") }), first);
        assert_eq!(cuts.lock().unwrap()["c1"].reader, Some(reader));
        let again = register_cut(&cuts, "c1", cut("/b"));
        assert_ne!(again, first, "the same id over another export is another instance");
    }

    #[test]
    fn a_survey_counts_the_bytes_of_each_granule_and_streams_are_split_by_them() {
        let gib = 1u64 << 30;
        // Granules of whole blocks, at most MAX_SURVEY of them.
        let mut data = ExtentSet::new();
        data.insert(Extent::new(0, 100 << 20));
        data.insert(Extent::new(gib - BLOCK_SIZE, BLOCK_SIZE));
        let (granule, bytes) = survey_of(&data, Range { offset: 0, length: gib });
        assert_eq!(granule, 4 * BLOCK_SIZE);
        assert_eq!(bytes.len(), drover_proto::MAX_SURVEY);
        assert_eq!(bytes.iter().sum::<u64>(), (100 << 20) + BLOCK_SIZE);
        assert_eq!((bytes[0], bytes[399], bytes[400], bytes[4095]), (granule, granule, 0, BLOCK_SIZE));
        // A small disk: one granule per block, the last one short.
        let (g, b) =
            survey_of(&ExtentSet::from_range(0, 3 * BLOCK_SIZE + 7), Range { offset: 0, length: 3 * BLOCK_SIZE + 7 });
        assert_eq!((g, b), (BLOCK_SIZE, vec![BLOCK_SIZE, BLOCK_SIZE, BLOCK_SIZE, 7]));

        // Eight streams over 1 GiB whose data is its first 100 MiB: each holds an eighth of it,
        // the last one the rest of the disk.
        let eight = PeerStreams { streams: 8, min_stream_bytes: 128 << 20 };
        let r = eight.ranges_by_bytes(gib, granule, &bytes);
        assert_eq!(r.len(), 8, "{r:?}");
        let mut at = 0;
        for x in &r {
            assert_eq!(x.offset, at, "{r:?}");
            assert!(x.offset.is_multiple_of(BLOCK_SIZE) && x.length > 0, "{r:?}");
            at += x.length;
            let held = data.clip(x.offset, x.length).total_bytes();
            assert!(held.abs_diff((100 << 20) / 8) <= granule, "{held} bytes in {x:?}: {r:?}");
        }
        assert_eq!(at, gib);
        // Nothing to send: by size. All of it in one granule: as many ranges as can be cut.
        assert_eq!(eight.ranges_by_bytes(gib, granule, &vec![0; bytes.len()]), eight.ranges(gib));
        let mut one = vec![0; bytes.len()];
        one[10] = granule;
        assert_eq!(
            eight.ranges_by_bytes(gib, granule, &one),
            vec![Range { offset: 0, length: 11 * granule }, Range { offset: 11 * granule, length: gib - 11 * granule }]
        );
        // A disk that gets one stream is one range, whatever the survey.
        assert_eq!(eight.ranges_by_bytes(64 << 20, BLOCK_SIZE, &[BLOCK_SIZE; 1024]).len(), 1);
    }

    #[test]
    fn a_disk_is_split_into_disjoint_block_ranges_fewer_for_a_small_disk() {
        let streams = |n, min| PeerStreams { streams: n, min_stream_bytes: min };
        let covers = |ranges: &[Range], size: u64| {
            let mut at = 0;
            for r in ranges {
                assert_eq!(r.offset, at, "{ranges:?}");
                assert!(r.offset.is_multiple_of(BLOCK_SIZE) && r.length > 0, "{ranges:?}");
                at += r.length;
            }
            assert_eq!(at, size, "{ranges:?}");
        };
        let gib = 1u64 << 30;
        let r = PeerStreams::default().ranges(gib);
        assert_eq!(r.len(), 8);
        covers(&r, gib);
        assert!(r.iter().all(|r| r.length == gib / 8));
        // A small disk: one stream, the whole of it.
        assert_eq!(PeerStreams::default().ranges(64 << 20), vec![Range { offset: 0, length: 64 << 20 }]);
        assert_eq!(PeerStreams::default().ranges(0), vec![Range { offset: 0, length: 0 }]);
        // Bounded 1..=16 whatever is asked.
        assert_eq!(streams(0, 1).ranges(gib).len(), 1);
        assert_eq!(streams(100, 1).ranges(gib).len(), MAX_STREAMS as usize);
        // A size that is not whole blocks: the last range ends at the disk's end.
        let odd = 5 * BLOCK_SIZE + 100;
        let r = streams(3, 1).ranges(odd);
        covers(&r, odd);
        assert_eq!(r.len(), 3);
        // Fewer blocks than streams: one block each.
        let r = streams(16, 1).ranges(3 * BLOCK_SIZE);
        covers(&r, 3 * BLOCK_SIZE);
        assert_eq!(r.len(), 3);
    }

    #[test]
    fn transfer_ids_map_to_stable_wire_ids() {
        assert_eq!(transfer_uuid("run1-0-0"), transfer_uuid("run1-0-0"));
        assert_ne!(transfer_uuid("run1-0-0"), transfer_uuid("run1-0-1"));
    }
}
