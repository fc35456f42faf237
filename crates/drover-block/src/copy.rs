//! Moving blocks between two NBD exports: the source's point-in-time view and the target's new
//! restore-point file.
//!
//! - [`copy_extents_into`] (and [`copy_extents`], its form for a target of unknown content): the
//!   seed and incremental path. Copies exactly the given extents (the dirty granules of a bitmap,
//!   or the whole disk for a seed), rounded out to manifest blocks, and rehashes those blocks into
//!   the manifest as they pass. Where the source's block status says it reads as zeroes nothing is
//!   read, and blocks that read as zeroes are not written at all when the target is known to read
//!   as zeroes already ([`TargetBefore::Zeroes`]: a new image without a backing file, whose
//!   clusters then stay unallocated), else written as `NBD_CMD_WRITE_ZEROES`.
//! - [`manifest_compare_sync`]: the fallback when no dirty bitmap can be trusted (first cycle
//!   after an unclean shutdown, a changed bitmap set) and the target's content is described by a
//!   manifest (a new point on the newest restore point). The source is read once (its holes not
//!   at all), hashed block by block and compared with the manifest; the target is not read.
//!   The source is any [`SyncSource`]: an NBD export, or the files of an image nobody writes to
//!   ([`DirectImage`]), which is several times cheaper to read.
//! - [`hash_compare_sync`]: the same when the target has no manifest to trust (a production disk
//!   during failback, a resized disk). Both sides are read once, concurrently, blocks are
//!   compared, and only differing blocks are written.
//!
//! Reads and writes are pipelined on each connection ([`NbdClient::read_many_into`],
//! [`NbdClient::write_many`]), a round of `WINDOW_CHUNKS` chunks at a time: the next round is read
//! while the current one is written and hashed, so memory stays at about four rounds.
//!
//! Both end with a flush of the target, so that what they report as written is on disk before
//! the caller publishes the restore point. Progress is reported through a callback, never through
//! the store (the data path knows nothing of sessions).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};

use crate::direct::{DirectBuf, DirectError, DirectImage, PlacedImage, blocking_here, direct_buf};
use crate::extents::{Extent, ExtentSet};
use crate::hash::{BLOCK_SIZE, BlockHash, Manifest, ManifestError, hash_block, zero_hash};
use crate::nbd::{BASE_ALLOCATION, NbdClient, NbdError, WriteOp};

/// How much one read or write moves at most: large enough to amortise a round trip, small
/// enough to keep memory flat.
pub const CHUNK: u64 = 4 << 20;

/// How many chunks are read per round: their requests are pipelined on the connection (see
/// [`crate::nbd::READ_DEPTH`]), and the next round is read while the current one is written and
/// hashed. Memory in use is about `4 * WINDOW_CHUNKS * CHUNK` (two rounds, two sides).
const WINDOW_CHUNKS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("NBD: {0}")]
    Nbd(#[from] NbdError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Direct(#[from] DirectError),
    #[error("a worker thread failed: {0}")]
    Worker(String),
    #[error("source and target differ in size: {source_size} vs {target_size} bytes")]
    SizeMismatch { source_size: u64, target_size: u64 },
}

type Result<T> = std::result::Result<T, CopyError>;

/// What a transfer did, for the session's record and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the source.
    pub source_read: u64,
    /// Bytes read from the target (hash-compare only).
    pub target_read: u64,
    /// Bytes written to the target (data, and ranges written as zeroes): what would travel
    /// between sites.
    pub written: u64,
    /// Bytes to copy that read as zeroes and were left alone, the target reading as zeroes
    /// there already ([`TargetBefore::Zeroes`]).
    pub zeroes_skipped: u64,
    /// Where the time went ([`copy_extents_into`] fills it).
    pub timing: CopyTiming,
}

/// Where the time of a copy went. The stages overlap (the next round is read while the current
/// one is written and hashed), so they add up to more than the wall time; the largest one is
/// what bounds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyTiming {
    /// Asking the source where it holds data (block status, or the image's map).
    pub source_map: Duration,
    /// Waiting for the source's reads.
    pub read: Duration,
    /// Waiting for the target to acknowledge the writes (data and zeroes).
    pub write: Duration,
    /// Hashing blocks for the manifest (on a blocking thread, beside the I/O).
    pub hash: Duration,
    /// The final flush: what the target still had to make durable.
    pub flush: Duration,
}

/// What the target reads as, before the copy, where the copy writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetBefore {
    /// Zeroes everywhere: a brand-new image without a backing file (a seed's first point). Blocks
    /// that read as zeroes on the source are not written at all, so they stay unallocated.
    Zeroes,
    /// Anything else (an overlay on a restore point, a production disk): blocks that read as
    /// zeroes on the source are written as zeroes.
    Unknown,
}

fn check_sizes(source_size: u64, dst: &impl CopyTarget, manifest: &Manifest) -> Result<u64> {
    if source_size != dst.size() || source_size != manifest.disk_size {
        return Err(CopyError::SizeMismatch { source_size, target_size: dst.size() });
    }
    Ok(source_size)
}

/// What a copy writes its target through: the target's NBD export, or a new image's file at
/// its places ([`PlacedImage`], which skips the storage daemon and a copy of every byte through
/// its socket).
pub trait CopyTarget: Send {
    /// The size the guest sees.
    fn size(&self) -> u64;
    /// The largest write in one request.
    fn max_io_size(&self) -> u32;
    /// Whether zeros can be written without sending them.
    fn can_write_zeroes(&self) -> bool;
    /// The writes, in any order (they do not overlap).
    fn write_many(&mut self, ops: &[WriteOp<'_>]) -> impl Future<Output = Result<()>> + Send;
    /// Makes every write so far durable.
    fn flush(&mut self) -> impl Future<Output = Result<()>> + Send;
}

impl<D: AsyncRead + AsyncWrite + Unpin + Send> CopyTarget for NbdClient<D> {
    fn size(&self) -> u64 {
        NbdClient::size(self)
    }

    fn max_io_size(&self) -> u32 {
        NbdClient::max_io_size(self)
    }

    fn can_write_zeroes(&self) -> bool {
        NbdClient::can_write_zeroes(self)
    }

    async fn write_many(&mut self, ops: &[WriteOp<'_>]) -> Result<()> {
        Ok(NbdClient::write_many(self, ops).await?)
    }

    async fn flush(&mut self) -> Result<()> {
        Ok(NbdClient::flush(self).await?)
    }
}

impl CopyTarget for PlacedImage {
    fn size(&self) -> u64 {
        PlacedImage::size(self)
    }

    fn max_io_size(&self) -> u32 {
        CHUNK as u32
    }

    fn can_write_zeroes(&self) -> bool {
        true
    }

    /// `pwrite`s in place (the buffers are the caller's: on a multi-threaded runtime the worker
    /// hands its other tasks away while it writes).
    async fn write_many(&mut self, ops: &[WriteOp<'_>]) -> Result<()> {
        blocking_here(|| {
            ops.iter().try_for_each(|op| match *op {
                WriteOp::Data { offset, data } => self.write_at(offset, data),
                WriteOp::Zeroes { offset, len } => self.write_zeroes(offset, len),
            })
        })?;
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        let image = self.clone();
        tokio::task::spawn_blocking(move || image.sync())
            .await
            .map_err(|e| CopyError::Worker(format!("syncing: {e}")))??;
        Ok(())
    }
}

/// What a sync reads its source through.
pub trait SyncSource {
    /// The size the guest sees.
    fn size(&self) -> u64;
    /// The largest read in one request.
    fn max_read(&self) -> u64;
    /// Where the source holds data within `within` (everything else reads as zeros), if it can
    /// tell. `within` lies inside the disk and is aligned to manifest blocks but at its end.
    fn data_extents(&mut self, within: Extent) -> impl Future<Output = Result<Option<ExtentSet>>> + Send;
    /// Reads `pieces` into `data` (their lengths summed, in order) and gives the buffer back.
    fn read_pieces(&mut self, pieces: &[Extent], data: DirectBuf) -> impl Future<Output = Result<DirectBuf>> + Send;
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> SyncSource for NbdClient<S> {
    fn size(&self) -> u64 {
        NbdClient::size(self)
    }

    fn max_read(&self) -> u64 {
        u64::from(self.max_io_size())
    }

    async fn data_extents(&mut self, within: Extent) -> Result<Option<ExtentSet>> {
        if !self.meta_contexts().iter().any(|c| c.name == BASE_ALLOCATION) {
            return Ok(None);
        }
        Ok(Some(NbdClient::data_extents(self, within.offset, within.len).await?))
    }

    async fn read_pieces(&mut self, pieces: &[Extent], mut data: DirectBuf) -> Result<DirectBuf> {
        read_batch(self, pieces, &mut data).await?;
        Ok(data)
    }
}

impl SyncSource for DirectImage {
    fn size(&self) -> u64 {
        DirectImage::size(self)
    }

    fn max_read(&self) -> u64 {
        CHUNK
    }

    async fn data_extents(&mut self, within: Extent) -> Result<Option<ExtentSet>> {
        Ok(Some(DirectImage::data_extents(self).clip(within.offset, within.len)))
    }

    /// `pread`s on a blocking thread (the pages are usually cached: a copy, no waiting).
    async fn read_pieces(&mut self, pieces: &[Extent], mut data: DirectBuf) -> Result<DirectBuf> {
        let image = self.clone();
        let pieces = pieces.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut at = 0usize;
            for e in &pieces {
                image.read_at(e.offset, &mut data[at..at + e.len as usize])?;
                at += e.len as usize;
            }
            Ok(data)
        })
        .await
        .map_err(|e| CopyError::Worker(format!("reading: {e}")))?
    }
}

/// A round of chunks and one contiguous buffer holding them in order (aligned, so that a
/// [`PlacedImage`] target writes it past the page cache).
struct Batch {
    pieces: Vec<Extent>,
    data: DirectBuf,
}

impl Default for Batch {
    fn default() -> Batch {
        Batch { pieces: Vec::new(), data: direct_buf(0) }
    }
}

impl Batch {
    /// Takes the next (up to) `WINDOW_CHUNKS` chunks and sizes the buffer for them.
    fn fill(&mut self, chunks: &mut impl Iterator<Item = Extent>) {
        self.pieces.clear();
        self.pieces.extend(chunks.by_ref().take(WINDOW_CHUNKS));
        let total: u64 = self.pieces.iter().map(|e| e.len).sum();
        // Chunks are at most `CHUNK` bytes each, so this fits in memory.
        self.data.resize(total as usize, 0);
    }

    fn bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// Each chunk with its part of the buffer.
    fn iter(&self) -> impl Iterator<Item = (Extent, &[u8])> {
        let mut at = 0usize;
        self.pieces.iter().map(move |e| {
            let piece = &self.data[at..at + e.len as usize];
            at += e.len as usize;
            (*e, piece)
        })
    }
}

/// Reads `pieces` into `data` (their lengths summed), pipelined on the connection.
async fn read_batch<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut NbdClient<S>,
    pieces: &[Extent],
    data: &mut [u8],
) -> Result<()> {
    let mut reads: Vec<(u64, &mut [u8])> = Vec::with_capacity(pieces.len());
    let mut rest = data;
    for e in pieces {
        let (head, tail) = rest.split_at_mut(e.len as usize);
        reads.push((e.offset, head));
        rest = tail;
    }
    client.read_many_into(&mut reads).await?;
    Ok(())
}

fn chunk_size(src_max_read: u64, dst: &impl CopyTarget) -> u64 {
    let chunk = CHUNK.min(src_max_read).min(u64::from(dst.max_io_size())) / BLOCK_SIZE * BLOCK_SIZE;
    chunk.max(BLOCK_SIZE)
}

/// Copies `extents` from `src` to `dst` whose content is unknown: [`copy_extents_into`] with
/// [`TargetBefore::Unknown`].
pub async fn copy_extents<S, D>(
    src: &mut NbdClient<S>,
    dst: &mut D,
    extents: &ExtentSet,
    manifest: &mut Manifest,
    progress: impl FnMut(u64, u64),
) -> Result<CopyStats>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    D: CopyTarget,
{
    copy_extents_into(src, dst, extents, TargetBefore::Unknown, manifest, progress).await
}

/// Copies `extents` from `src` to `dst`, rounded out to whole manifest blocks, records those
/// blocks in `manifest`, and flushes the target. `progress(done, total)` is called after every
/// round.
///
/// What the source's block status (or map) says reads as zeroes is not read: its blocks get the
/// zero hash, and are written as zeroes unless `target` says the target reads as zeroes already.
/// The rest is read in rounds of up to `WINDOW_CHUNKS` chunks, pipelined; the next round is read
/// from `src` while the current one is written to `dst` (pipelined too) and hashed on a blocking
/// thread. Blocks of the data that turn out to be zeroes are treated like the zero ranges.
pub async fn copy_extents_into<S, D>(
    src: &mut S,
    dst: &mut D,
    extents: &ExtentSet,
    target: TargetBefore,
    manifest: &mut Manifest,
    mut progress: impl FnMut(u64, u64),
) -> Result<CopyStats>
where
    S: SyncSource,
    D: CopyTarget,
{
    let size = check_sizes(src.size(), dst, manifest)?;
    let todo = extents.align_out(BLOCK_SIZE).clip(0, size);
    let total = todo.total_bytes();
    let mut stats = CopyStats::default();
    let mut done = 0;

    // Block status only where there is something to copy (a bitmap's few dirty granules need
    // not have the whole disk mapped).
    let started = Instant::now();
    let data = match (todo.iter().next(), todo.iter().last()) {
        (Some(first), Some(last)) => {
            let hull = Extent::new(first.offset, last.end() - first.offset);
            match src.data_extents(hull).await? {
                Some(data) => todo.intersect(&data.align_out(BLOCK_SIZE)),
                None => todo.clone(),
            }
        }
        _ => ExtentSet::new(),
    };
    stats.timing.source_map = started.elapsed();
    let zeroes = todo.subtract(&data);
    if !zeroes.is_empty() {
        let full_zero = zero_hash(BLOCK_SIZE as usize);
        for e in zeroes.iter() {
            // Both sets are aligned to blocks (clipped at the disk's end), so these are whole blocks.
            for block in e.offset / BLOCK_SIZE..e.end().div_ceil(BLOCK_SIZE) {
                let (_, len) = manifest.block_range(block);
                manifest.set_hash(block, if len == BLOCK_SIZE { full_zero } else { zero_hash(len as usize) })?;
            }
        }
        match target {
            TargetBefore::Zeroes => stats.zeroes_skipped += zeroes.total_bytes(),
            TargetBefore::Unknown => {
                let started = Instant::now();
                write_zero_ranges(dst, &zeroes).await?;
                stats.timing.write += started.elapsed();
                stats.written += zeroes.total_bytes();
            }
        }
        done += zeroes.total_bytes();
        progress(done, total);
    }

    let chunk = chunk_size(src.max_read(), dst);
    let mut chunks = data.chunks(chunk);
    let (mut current, mut next) = (Batch::default(), Batch::default());
    current.fill(&mut chunks);
    let started = Instant::now();
    current.data = src.read_pieces(&current.pieces, std::mem::replace(&mut current.data, direct_buf(0))).await?;
    stats.timing.read += started.elapsed();
    stats.source_read += current.bytes();
    while !current.pieces.is_empty() {
        next.fill(&mut chunks);
        // The round is hashed on a blocking thread while it is written and the next is read.
        let round = Arc::new(std::mem::take(&mut current));
        let hashing = spawn_hashing(&round);
        let write = async {
            let started = Instant::now();
            let written = write_round(dst, &round, target).await;
            (written, started.elapsed())
        };
        let buffer = std::mem::replace(&mut next.data, direct_buf(0));
        let read = async {
            let started = Instant::now();
            let read = src.read_pieces(&next.pieces, buffer).await;
            (read, started.elapsed())
        };
        let ((read, read_time), (written, write_time)) = tokio::join!(read, write);
        let (hashes, hash_time) = hashes_of(hashing).await?;
        let (written, skipped) = written?;
        next.data = read?;
        stats.timing.read += read_time;
        stats.timing.write += write_time;
        stats.timing.hash += hash_time;
        stats.written += written;
        stats.zeroes_skipped += skipped;
        stats.source_read += next.bytes();
        for ((e, _), chunk_hashes) in round.iter().zip(hashes) {
            for (i, hash) in chunk_hashes.into_iter().enumerate() {
                manifest.set_hash(e.offset / BLOCK_SIZE + i as u64, hash)?;
            }
        }
        done += round.bytes();
        progress(done, total);
        current = reclaim(round);
        std::mem::swap(&mut current, &mut next);
    }
    let started = Instant::now();
    dst.flush().await?;
    stats.timing.flush = started.elapsed();
    Ok(stats)
}

/// Writes a round to the target, pipelined: see [`plan_writes`]. Returns the bytes written and
/// the bytes of zeroes skipped.
async fn write_round<D: CopyTarget>(dst: &mut D, round: &Batch, target: TargetBefore) -> Result<(u64, u64)> {
    let mut ops = Vec::new();
    let (mut written, mut skipped) = (0, 0);
    for (e, data) in round.iter() {
        let (w, s) = plan_writes(&mut ops, e.offset, data, target, dst.can_write_zeroes());
        written += w;
        skipped += s;
    }
    dst.write_many(&ops).await?;
    Ok((written, skipped))
}

/// What a block of data becomes on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockWrite {
    Data,
    Zeroes,
    Skip,
}

/// Adds to `ops` the writes that make `offset..offset + data.len()` of the target read as
/// `data`, block by block: blocks of zeroes are skipped when the target reads as zeroes already,
/// else written as zeroes where the server takes `NBD_CMD_WRITE_ZEROES` (`zeroes_by_request`),
/// else sent as they are. Runs of blocks treated alike become one op. Returns the bytes
/// written and the bytes skipped.
fn plan_writes<'a>(
    ops: &mut Vec<WriteOp<'a>>,
    offset: u64,
    data: &'a [u8],
    target: TargetBefore,
    zeroes_by_request: bool,
) -> (u64, u64) {
    let block_len = BLOCK_SIZE as usize;
    let kind = |block: &[u8]| match (is_zero(block), target) {
        (false, _) => BlockWrite::Data,
        (true, TargetBefore::Zeroes) => BlockWrite::Skip,
        (true, TargetBefore::Unknown) if zeroes_by_request => BlockWrite::Zeroes,
        (true, TargetBefore::Unknown) => BlockWrite::Data,
    };
    let (mut written, mut skipped) = (0, 0);
    let mut run: Option<(BlockWrite, usize)> = None;
    let mut close = |ops: &mut Vec<WriteOp<'a>>, what: BlockWrite, start: usize, end: usize| {
        let len = (end - start) as u64;
        match what {
            BlockWrite::Data => ops.push(WriteOp::Data { offset: offset + start as u64, data: &data[start..end] }),
            BlockWrite::Zeroes => ops.push(WriteOp::Zeroes { offset: offset + start as u64, len }),
            BlockWrite::Skip => skipped += len,
        }
        if what != BlockWrite::Skip {
            written += len;
        }
    };
    for (i, block) in data.chunks(block_len).enumerate() {
        let what = kind(block);
        match run {
            Some((current, _)) if current == what => {}
            Some((current, start)) => {
                close(ops, current, start, i * block_len);
                run = Some((what, i * block_len));
            }
            None => run = Some((what, i * block_len)),
        }
    }
    if let Some((current, start)) = run {
        close(ops, current, start, data.len());
    }
    (written, skipped)
}

/// Whether `data` is all zeroes (64 bytes at a time, which the compiler vectorises).
fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(64);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Writes each `(offset, data)` run to `dst`, pipelined; blocks of zeroes as write-zeroes
/// where the server takes them.
async fn write_runs<D: AsyncRead + AsyncWrite + Unpin>(dst: &mut NbdClient<D>, runs: &[(u64, &[u8])]) -> Result<()> {
    let mut ops = Vec::new();
    for &(offset, data) in runs {
        plan_writes(&mut ops, offset, data, TargetBefore::Unknown, dst.can_write_zeroes());
    }
    dst.write_many(&ops).await?;
    Ok(())
}

/// Adds block `i` (of `len` bytes) of a buffer to `runs` of byte ranges into it: adjacent
/// blocks form one run.
fn add_to_runs(runs: &mut Vec<(usize, usize)>, i: usize, len: usize) {
    let start = i * BLOCK_SIZE as usize;
    match runs.last_mut() {
        Some((_, end)) if *end == start => *end += len,
        _ => runs.push((start, start + len)),
    }
}

/// The runs of manifest blocks that differ between `a` and `b` (same length), as byte ranges
/// into them.
fn differing_runs(a: &[u8], b: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, (x, y)) in a.chunks(BLOCK_SIZE as usize).zip(b.chunks(BLOCK_SIZE as usize)).enumerate() {
        if x != y {
            add_to_runs(&mut runs, i, x.len());
        }
    }
    runs
}

/// Makes `dst` equal to `src` block by block: each side is read once (concurrently, over two
/// connections, pipelined on each), and only blocks that differ are written. `manifest` ends as
/// the source's manifest. `progress(done, total)` counts bytes compared.
///
/// Both sides are in memory here, so blocks are compared byte for byte (exact, and cheaper than
/// hashing the target too); the source is hashed once, for the manifest.
pub async fn hash_compare_sync<S, D>(
    src: &mut NbdClient<S>,
    dst: &mut NbdClient<D>,
    manifest: &mut Manifest,
    mut progress: impl FnMut(u64, u64),
) -> Result<CopyStats>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin + Send,
{
    let size = check_sizes(src.size(), dst, manifest)?;
    let chunk = chunk_size(u64::from(src.max_io_size()), dst);
    let whole = ExtentSet::from_range(0, size);
    let mut chunks = whole.chunks(chunk);
    let mut stats = CopyStats::default();
    let (mut a, mut b) = (Batch::default(), Batch::default());
    let mut done = 0;
    loop {
        a.fill(&mut chunks);
        if a.pieces.is_empty() {
            break;
        }
        b.pieces.clone_from(&a.pieces);
        b.data.resize(a.data.len(), 0);
        let (ra, rb) = tokio::join!(read_batch(src, &a.pieces, &mut a.data), read_batch(dst, &b.pieces, &mut b.data));
        ra?;
        rb?;
        stats.source_read += a.bytes();
        stats.target_read += b.bytes();
        // The batch is contiguous: chunks of one range, in order.
        let offset = a.pieces[0].offset;
        let runs: Vec<(u64, &[u8])> =
            differing_runs(&a.data, &b.data).into_iter().map(|(s, e)| (offset + s as u64, &a.data[s..e])).collect();
        write_runs(dst, &runs).await?;
        stats.written += runs.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        for (e, data) in a.iter() {
            manifest.set_range(e.offset, data)?;
            done += e.len;
            progress(done, size);
        }
    }
    dst.flush().await?;
    Ok(stats)
}

/// Starts hashing a round's blocks on a blocking thread, while the caller goes on with the round
/// (writing it, reading the next). The result is, per chunk of the round, its blocks' hashes in
/// order: chunks are whole blocks (only the disk's last block may be short), so hash `i` of a
/// chunk is manifest block `offset / BLOCK_SIZE + i`.
///
/// Blocks of zeroes (common in disks) get the zero hash without hashing them.
fn spawn_hashing(round: &Arc<Batch>) -> tokio::task::JoinHandle<(Vec<Vec<BlockHash>>, Duration)> {
    let round = round.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let full_zero = zero_hash(BLOCK_SIZE as usize);
        let hash = |block: &[u8]| match is_zero(block) {
            true if block.len() == BLOCK_SIZE as usize => full_zero,
            _ => hash_block(block),
        };
        let hashes = round.iter().map(|(_, data)| data.chunks(BLOCK_SIZE as usize).map(hash).collect()).collect();
        (hashes, started.elapsed())
    })
}

type Hashing = tokio::task::JoinHandle<(Vec<Vec<BlockHash>>, Duration)>;

/// The hashes of a round and the time they took.
async fn hashes_of(hashing: Hashing) -> Result<(Vec<Vec<BlockHash>>, Duration)> {
    hashing.await.map_err(|e| CopyError::Worker(format!("hashing: {e}")))
}

/// The round's buffer, for the next round to reuse (the hashing thread is done with it).
fn reclaim(round: Arc<Batch>) -> Batch {
    Arc::try_unwrap(round).unwrap_or_default()
}

/// Writes zeros over `ranges` of the target, pipelined: write-zeroes requests where the server
/// takes them, else zero-filled writes (from one shared buffer).
pub async fn write_zero_ranges<D: CopyTarget>(dst: &mut D, ranges: &ExtentSet) -> Result<()> {
    if dst.can_write_zeroes() {
        let ops: Vec<WriteOp<'_>> = ranges.iter().map(|e| WriteOp::Zeroes { offset: e.offset, len: e.len }).collect();
        dst.write_many(&ops).await?;
        return Ok(());
    }
    let zeros = vec![0u8; CHUNK.min(ranges.iter().map(|e| e.len).max().unwrap_or(0)) as usize];
    // A bounded number of writes at a time, so a large range does not make a large list.
    let mut pieces = ranges.chunks(CHUNK).peekable();
    while pieces.peek().is_some() {
        let ops: Vec<WriteOp<'_>> = pieces
            .by_ref()
            .take(WINDOW_CHUNKS)
            .map(|e| WriteOp::Data { offset: e.offset, data: &zeros[..e.len as usize] })
            .collect();
        dst.write_many(&ops).await?;
    }
    Ok(())
}

/// Makes `dst` equal to `src` when `manifest` describes what `dst` holds now (the new point's
/// file is an empty overlay on the restore point the manifest belongs to). The target is not
/// read: its hashes are the manifest's, recorded when its blocks were written and flushed.
///
/// The source is read once, pipelined; each round is hashed on a blocking thread while the next
/// one is read. Where `src` negotiated `base:allocation`, its holes are not read at all: a hole
/// block differs only when the manifest says the target's block is not zeros, and is then
/// zeroed. Only differing blocks are written; `manifest` ends as the source's manifest.
/// `progress(done, total)` counts source bytes read.
pub async fn manifest_compare_sync<S, D>(
    src: &mut S,
    dst: &mut NbdClient<D>,
    manifest: &mut Manifest,
    mut progress: impl FnMut(u64, u64),
) -> Result<CopyStats>
where
    S: SyncSource,
    D: AsyncRead + AsyncWrite + Unpin + Send,
{
    let size = check_sizes(src.size(), dst, manifest)?;
    let whole = ExtentSet::from_range(0, size);
    let data = match src.data_extents(Extent::new(0, size)).await? {
        Some(data) => data.align_out(BLOCK_SIZE).clip(0, size),
        None => whole.clone(),
    };
    let mut stats = CopyStats::default();

    // Holes: zeros on the source; the target's block differs only if its hash is not zeros'.
    let full_zero = zero_hash(BLOCK_SIZE as usize);
    let mut zeroed = ExtentSet::new();
    for hole in whole.subtract(&data).iter() {
        for block in hole.offset / BLOCK_SIZE..hole.end().div_ceil(BLOCK_SIZE) {
            let (offset, len) = manifest.block_range(block);
            let zero = if len == BLOCK_SIZE { full_zero } else { zero_hash(len as usize) };
            if manifest.hash(block) != Some(&zero) {
                zeroed.insert(Extent::new(offset, len));
                manifest.set_hash(block, zero)?;
            }
        }
    }
    write_zero_ranges(dst, &zeroed).await?;
    stats.written += zeroed.total_bytes();

    // Data, in three stages at once: round N+1 is read while round N is hashed on a blocking
    // thread and what differed in round N-1 is written (copied out of its buffer: a small share).
    let total = data.total_bytes();
    let mut chunks = data.chunks(chunk_size(src.max_read(), dst));
    let (mut current, mut next) = (Batch::default(), Batch::default());
    let mut differing: Vec<(u64, Vec<u8>)> = Vec::new();
    current.fill(&mut chunks);
    current.data = src.read_pieces(&current.pieces, std::mem::replace(&mut current.data, direct_buf(0))).await?;
    stats.source_read += current.bytes();
    while !current.pieces.is_empty() {
        next.fill(&mut chunks);
        let round = Arc::new(std::mem::take(&mut current));
        let hashing = spawn_hashing(&round);
        let to_write = std::mem::take(&mut differing);
        let runs: Vec<(u64, &[u8])> = to_write.iter().map(|(offset, data)| (*offset, data.as_slice())).collect();
        let buffer = std::mem::replace(&mut next.data, direct_buf(0));
        let (read, write) = tokio::join!(src.read_pieces(&next.pieces, buffer), write_runs(dst, &runs));
        let (hashes, _) = hashes_of(hashing).await?;
        next.data = read?;
        write?;
        stats.written += to_write.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
        stats.source_read += next.bytes();
        for ((e, data), chunk_hashes) in round.iter().zip(hashes) {
            let first = e.offset / BLOCK_SIZE;
            // Runs of differing blocks within this chunk, as byte ranges into `data`.
            let mut runs: Vec<(usize, usize)> = Vec::new();
            for (i, (piece, hash)) in data.chunks(BLOCK_SIZE as usize).zip(chunk_hashes).enumerate() {
                let block = first + i as u64;
                if manifest.hash(block) == Some(&hash) {
                    continue;
                }
                manifest.set_hash(block, hash)?;
                add_to_runs(&mut runs, i, piece.len());
            }
            differing.extend(runs.into_iter().map(|(s, t)| (e.offset + s as u64, data[s..t].to_vec())));
        }
        progress(stats.source_read, total);
        current = reclaim(round);
        std::mem::swap(&mut current, &mut next);
    }
    let runs: Vec<(u64, &[u8])> = differing.iter().map(|(offset, data)| (*offset, data.as_slice())).collect();
    write_runs(dst, &runs).await?;
    stats.written += runs.iter().map(|(_, d)| d.len() as u64).sum::<u64>();
    dst.flush().await?;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of `pattern` (0 = zeroes), plus a short tail of data.
    fn blocks(pattern: &[u8]) -> Vec<u8> {
        let mut data: Vec<u8> = pattern.iter().flat_map(|&b| vec![b; BLOCK_SIZE as usize]).collect();
        data.extend_from_slice(&[9; 100]);
        data
    }

    fn describe(ops: &[WriteOp<'_>]) -> Vec<(char, u64, u64)> {
        ops.iter()
            .map(|op| match *op {
                WriteOp::Data { offset, data } => ('d', offset, data.len() as u64),
                WriteOp::Zeroes { offset, len } => ('z', offset, len),
            })
            .collect()
    }

    #[test]
    fn writes_are_planned_by_runs_of_blocks() {
        let b = BLOCK_SIZE;
        let data = blocks(&[1, 1, 0, 0, 0, 2, 0]);
        let at = 10 * b;

        let mut ops = Vec::new();
        let (written, skipped) = plan_writes(&mut ops, at, &data, TargetBefore::Zeroes, true);
        assert_eq!(describe(&ops), [('d', at, 2 * b), ('d', at + 5 * b, b), ('d', at + 7 * b, 100)]);
        assert_eq!((written, skipped), (3 * b + 100, 4 * b));

        let mut ops = Vec::new();
        let (written, skipped) = plan_writes(&mut ops, at, &data, TargetBefore::Unknown, true);
        assert_eq!(
            describe(&ops),
            [
                ('d', at, 2 * b),
                ('z', at + 2 * b, 3 * b),
                ('d', at + 5 * b, b),
                ('z', at + 6 * b, b),
                ('d', at + 7 * b, 100)
            ]
        );
        assert_eq!((written, skipped), (data.len() as u64, 0));

        // Without NBD_CMD_WRITE_ZEROES the zeroes are sent as they are, in one run with the rest.
        let mut ops = Vec::new();
        plan_writes(&mut ops, at, &data, TargetBefore::Unknown, false);
        assert_eq!(describe(&ops), [('d', at, data.len() as u64)]);
        let WriteOp::Data { data: sent, .. } = ops[0] else { panic!("data") };
        assert!(std::ptr::eq(sent, &data[..]), "sent from the caller's buffer, not a copy");

        // All zeroes into zeroes: nothing at all.
        let zeroes = vec![0; 3 * b as usize];
        let mut ops = Vec::new();
        assert_eq!(plan_writes(&mut ops, 0, &zeroes, TargetBefore::Zeroes, true), (0, 3 * b));
        assert!(ops.is_empty());
    }

    #[test]
    fn zero_detection_sees_every_byte() {
        let mut data = vec![0u8; 64 * 1024 + 37];
        assert!(is_zero(&data));
        assert!(is_zero(&[]));
        for at in [0, 63, 64, 4095, 65535, data.len() - 1] {
            data[at] = 1;
            assert!(!is_zero(&data), "a byte at {at}");
            data[at] = 0;
        }
    }
}
