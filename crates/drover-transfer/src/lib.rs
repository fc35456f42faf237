//! One disk's extents from a sending agent to a receiving agent, over [`drover_proto`] (issue 11,
//! item 3). The transport is any byte stream (TLS over TCP between agents; an in-memory pipe in
//! tests); the disks are behind [`BlockSource`] and [`BlockTarget`] (an NBD export of a
//! point-in-time cut, the new restore point's file).
//!
//! - Every extent carries the BLAKE3 of its plain bytes; the receiver checks it before it writes
//!   anything, and refuses the stream on a mismatch.
//! - A chunk that reads as zeroes travels as a [`Message::Zero`] range, not as bytes; data may be
//!   zstd-compressed, chunk by chunk where it pays ([`drover_proto::COMPRESSION_WORTH`]); after a
//!   run of chunks that do not shrink the sender only tries a sample of each until one shrinks
//!   ([`AdaptiveCompression`]), so random data costs next to no compression CPU.
//! - The sender reads the source a batch of chunks ahead: the next batch's reads are in flight
//!   while this one is hashed and sent.
//! - A transfer may run over several streams at once, each carrying a disjoint range of the disk
//!   ([`receive_framed_within`]), into one [`Journal`].
//! - **Resumable.** The receiver writes what arrives and acknowledges it, and at every flush
//!   point (the sender asks every `flush_every` bytes, and the receiver flushes by itself when the
//!   stream ends or breaks) makes it durable *then* records it in its [`Journal`]. A resumed
//!   transfer (same transfer id, a new stream) is told the journalled extents in the
//!   [`drover_proto::Welcome`] and sends only the rest: after a cut link nothing acknowledged is
//!   sent again; after a killed receiver, at most what arrived since its last flush point.
//!   The journal never names an extent whose data is not durable, so a resumed transfer cannot
//!   skip data a crash lost.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use drover_block::extents::{Extent, ExtentSet};
use drover_proto::{
    Codec, Compression, Data, Hello, MAX_EXTENT, Message, PROTOCOL_VERSION, ProtoError, Range, RefusalCode, Refused,
    Welcome,
};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Framed;
use uuid::Uuid;

/// Where the sender reads the disk (the source's point-in-time view).
#[async_trait]
pub trait BlockSource: Send {
    /// Fills `buf` with the disk's bytes at `offset`.
    async fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;

    /// Fills each `(offset, buffer)`: a source that can keep several reads in flight (NBD)
    /// overrides this; the default reads one after the other.
    async fn read_many(&mut self, reads: &mut [(u64, &mut [u8])]) -> std::io::Result<()> {
        for (offset, buf) in reads.iter_mut() {
            self.read(*offset, buf).await?;
        }
        Ok(())
    }
}

/// Where the receiver writes the disk (the new restore point).
#[async_trait]
pub trait BlockTarget: Send {
    /// `hashes` are the BLAKE3 of each [`drover_proto::HASH_PIECE`] of `data` from `offset`,
    /// checked against the bytes already: a target that keeps block hashes takes them as they are.
    async fn write(&mut self, offset: u64, data: &[u8], hashes: &[drover_proto::Hash]) -> std::io::Result<()>;
    async fn write_zeroes(&mut self, offset: u64, length: u64) -> std::io::Result<()>;
    /// Makes every write so far durable.
    async fn flush(&mut self) -> std::io::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error(transparent)]
    Proto(#[from] ProtoError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer refused: {0:?}: {1}")]
    Refused(RefusalCode, String),
    /// The stream ended or broke before the transfer was done: connect again to resume.
    #[error("the stream ended before the transfer was done")]
    Cut,
    #[error("protocol: {0}")]
    Protocol(String),
}

type Result<T> = std::result::Result<T, TransferError>;

// ------------------------------------------------------------------------------------------------
// The receiver's journal

/// The receiver's record of the extents that are durable in the target: a file of 16-byte
/// records (offset, length; big-endian), appended and synced after the target was flushed. A torn
/// last record (a crash while appending) is dropped when the journal is opened.
///
/// One journal serves every stream of a transfer at once (`&Journal`): appends are serialized,
/// and each stream records only extents it flushed itself, so a record never names data that is
/// not durable whichever stream wrote it.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: tokio::sync::Mutex<tokio::fs::File>,
    durable: std::sync::Mutex<ExtentSet>,
}

impl Journal {
    /// Opens (or creates, private to the service user) the journal at `path`.
    pub async fn open(path: &Path) -> std::io::Result<Journal> {
        let bytes = match tokio::fs::read(path).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let whole = bytes.len() / 16 * 16;
        let mut durable = ExtentSet::new();
        for r in bytes[..whole].chunks_exact(16) {
            let offset = u64::from_be_bytes(r[..8].try_into().unwrap_or_default());
            let len = u64::from_be_bytes(r[8..].try_into().unwrap_or_default());
            durable.insert(Extent::new(offset, len));
        }
        let mut options = tokio::fs::OpenOptions::new();
        options.create(true).append(true).mode(0o600);
        let file = options.open(path).await?;
        if whole != bytes.len() {
            file.set_len(whole as u64).await?;
        }
        Ok(Journal { path: path.to_path_buf(), file: tokio::sync::Mutex::new(file), durable: durable.into() })
    }

    /// The extents recorded as durable (so far: other streams may be adding to them).
    pub fn durable(&self) -> ExtentSet {
        self.durable.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records `extents` as durable: call only after the target was flushed.
    async fn record(&self, extents: &ExtentSet) -> std::io::Result<()> {
        if extents.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(extents.len() * 16);
        for e in extents.iter() {
            buf.extend_from_slice(&e.offset.to_be_bytes());
            buf.extend_from_slice(&e.len.to_be_bytes());
        }
        let mut file = self.file.lock().await;
        file.write_all(&buf).await?;
        file.sync_data().await?;
        let mut durable = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        *durable = durable.union(extents);
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Receiving

/// What the receiver expects of a stream: the transfer the control plane created on this agent.
#[derive(Debug, Clone)]
pub struct Expect {
    pub transfer: Uuid,
    pub disk_size: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiveStats {
    /// Bytes written from data frames.
    pub data_bytes: u64,
    /// Bytes written as zero ranges.
    pub zero_bytes: u64,
    /// Bytes on the wire in data frames' payloads (after compression).
    pub wire_bytes: u64,
}

/// Serves one stream of a transfer into `target`: answers the hello with what `journal` holds,
/// writes and acknowledges what arrives, and makes it durable at each flush point. `Ok` once the
/// sender says it is done (everything it sent is then durable and journalled); [`TransferError::Cut`]
/// when the stream ends or breaks first (what arrived is made durable and journalled first, so
/// the sender's next stream resumes after it).
pub async fn receive<S>(
    stream: S,
    target: &mut dyn BlockTarget,
    journal: &Journal,
    expect: &Expect,
) -> Result<ReceiveStats>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    receive_framed(Framed::new(stream, Codec), target, journal, expect).await
}

/// [`receive_framed_within`] the whole disk.
pub async fn receive_framed<S>(
    framed: Framed<S, Codec>,
    target: &mut dyn BlockTarget,
    journal: &Journal,
    expect: &Expect,
) -> Result<ReceiveStats>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let whole = Range { offset: 0, length: expect.disk_size };
    receive_framed_within(framed, target, journal, expect, whole).await
}

/// [`receive`] on a stream already framed, where other messages came first (a receiver that
/// dialled the sender and pulled: see `drover_proto`'s "Pulling"), for a stream that carries
/// `within` of the disk (one of several streams of a transfer): the welcome names what the
/// journal holds there, and an extent outside it is refused. A refusal in place of the hello is
/// the sender's answer, returned as [`TransferError::Refused`].
pub async fn receive_framed_within<S>(
    mut framed: Framed<S, Codec>,
    target: &mut dyn BlockTarget,
    journal: &Journal,
    expect: &Expect,
    within: Range,
) -> Result<ReceiveStats>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let hello = match framed.next().await {
        Some(Ok(Message::Hello(h))) => h,
        Some(Ok(Message::Refused(r))) => return Err(TransferError::Refused(r.code, r.message)),
        Some(Ok(other)) => {
            return refuse(&mut framed, RefusalCode::Protocol, format!("expected hello, got {}", kind(&other))).await;
        }
        Some(Err(e)) => return Err(e.into()),
        None => return Err(TransferError::Cut),
    };
    if hello.check_version().is_err() {
        let why = format!("this agent speaks protocol version {PROTOCOL_VERSION}, not {}", hello.version);
        return refuse(&mut framed, RefusalCode::Version, why).await;
    }
    if hello.transfer != expect.transfer {
        return refuse(&mut framed, RefusalCode::UnknownTransfer, format!("no transfer {} here", hello.transfer)).await;
    }
    if hello.disk_size != expect.disk_size {
        let why = format!("the disk is {} bytes, not {}", expect.disk_size, hello.disk_size);
        return refuse(&mut framed, RefusalCode::SizeMismatch, why).await;
    }
    let (lo, hi) = (within.offset, within.end().unwrap_or(u64::MAX).min(expect.disk_size));
    let acknowledged = journal
        .durable()
        .clip(lo, hi.saturating_sub(lo))
        .iter()
        .map(|e| Range { offset: e.offset, length: e.len })
        .collect();
    framed.send(Message::Welcome(Welcome { version: PROTOCOL_VERSION, acknowledged })).await.map_err(cut)?;

    let mut stats = ReceiveStats::default();
    let mut pending = ExtentSet::new();
    loop {
        let m = match framed.next().await {
            Some(Ok(m)) => m,
            // A broken or ended stream: keep what arrived, for the next stream to resume after.
            Some(Err(ProtoError::Io(_))) | None => {
                make_durable(target, journal, &mut pending).await?;
                return Err(TransferError::Cut);
            }
            Some(Err(e)) => {
                make_durable(target, journal, &mut pending).await?;
                return refuse(&mut framed, RefusalCode::Protocol, e.to_string()).await;
            }
        };
        match m {
            Message::Data(d) => {
                let range = Range { offset: d.offset, length: u64::from(d.length) };
                if !inside(&range, lo, hi) {
                    make_durable(target, journal, &mut pending).await?;
                    let why = format!("{range:?} is outside this stream's {within:?} of the disk");
                    return refuse(&mut framed, RefusalCode::Protocol, why).await;
                }
                let plain = match d.verified() {
                    Ok(p) => p,
                    Err(e) => {
                        make_durable(target, journal, &mut pending).await?;
                        return refuse(&mut framed, RefusalCode::HashMismatch, e.to_string()).await;
                    }
                };
                target.write(d.offset, &plain, &d.hashes).await?;
                stats.data_bytes += plain.len() as u64;
                stats.wire_bytes += d.payload.len() as u64;
                pending.insert(Extent::new(range.offset, range.length));
                if let Err(e) = framed.send(Message::Ack(range)).await {
                    make_durable(target, journal, &mut pending).await?;
                    return Err(cut(e));
                }
            }
            Message::Zero(range) => {
                if !inside(&range, lo, hi) {
                    make_durable(target, journal, &mut pending).await?;
                    let why = format!("{range:?} is outside this stream's {within:?} of the disk");
                    return refuse(&mut framed, RefusalCode::Protocol, why).await;
                }
                target.write_zeroes(range.offset, range.length).await?;
                stats.zero_bytes += range.length;
                pending.insert(Extent::new(range.offset, range.length));
                if let Err(e) = framed.send(Message::Ack(range)).await {
                    make_durable(target, journal, &mut pending).await?;
                    return Err(cut(e));
                }
            }
            Message::Flush(n) => {
                make_durable(target, journal, &mut pending).await?;
                if let Err(e) = framed.send(Message::Flushed(n)).await {
                    make_durable(target, journal, &mut pending).await?;
                    return Err(cut(e));
                }
            }
            Message::Done { .. } => {
                make_durable(target, journal, &mut pending).await?;
                return Ok(stats);
            }
            other => {
                make_durable(target, journal, &mut pending).await?;
                return refuse(&mut framed, RefusalCode::Protocol, format!("unexpected {}", kind(&other))).await;
            }
        }
    }
}

fn inside(r: &Range, lo: u64, hi: u64) -> bool {
    r.offset >= lo && r.end().is_some_and(|end| end <= hi)
}

/// Flushes the target, then journals what it now durably holds.
async fn make_durable(target: &mut dyn BlockTarget, journal: &Journal, pending: &mut ExtentSet) -> Result<()> {
    if pending.is_empty() {
        return Ok(());
    }
    target.flush().await?;
    journal.record(pending).await?;
    *pending = ExtentSet::new();
    Ok(())
}

async fn refuse<S, T>(framed: &mut Framed<S, Codec>, code: RefusalCode, message: String) -> Result<T>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = framed.send(Message::Refused(Refused { code, message: message.clone() })).await;
    Err(TransferError::Refused(code, message))
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "hello",
        Message::Welcome(_) => "welcome",
        Message::Data(_) => "data",
        Message::Zero(_) => "zero",
        Message::Ack(_) => "ack",
        Message::Flush(_) => "flush",
        Message::Flushed(_) => "flushed",
        Message::Hashes { .. } => "hashes",
        Message::Done { .. } => "done",
        Message::Refused(_) => "refusal",
        Message::Pull(_) => "pull",
        Message::Offer { .. } => "offer",
        Message::Survey(_) => "survey",
        Message::Surveyed { .. } => "survey answer",
    }
}

// ------------------------------------------------------------------------------------------------
// Sending

/// What to send.
#[derive(Debug, Clone)]
pub struct SendSpec {
    pub transfer: Uuid,
    pub disk_size: u64,
    /// The extents that must reach the target (the dirty granules, the allocated data of a seed).
    pub extents: ExtentSet,
    /// The largest extent per frame (at most [`MAX_EXTENT`]).
    pub chunk: u32,
    pub compress: bool,
    /// Ask the receiver to make what it has durable every this many bytes (the most a killed
    /// receiver makes the sender send again).
    pub flush_every: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Bytes of `extents` the receiver already held (journalled by an earlier stream).
    pub already_there: u64,
    /// Bytes sent as data (before compression).
    pub data_bytes: u64,
    /// Bytes of data frames' payloads on the wire (after compression).
    pub wire_bytes: u64,
    /// Bytes sent as zero ranges.
    pub zero_bytes: u64,
    /// Data chunks sent zstd-compressed.
    pub compressed_chunks: u64,
    /// Data chunks zstd was tried on whole and did not shrink enough: sent plain.
    pub incompressible_chunks: u64,
    /// Data chunks sent plain without trying zstd on the whole (compression off, or only a
    /// sample tried: see [`AdaptiveCompression`]).
    pub untried_chunks: u64,
}

/// Consecutive chunks zstd does not shrink before the sender stops trying whole chunks.
pub const COMPRESSION_MISSES: u32 = 4;

/// The bytes of a chunk (from its middle) zstd looks at first once whole chunks stopped
/// shrinking: 1/32 of a 128 KiB chunk's compression CPU.
pub const COMPRESSION_SAMPLE: usize = 4096;

/// How much zstd the sender tries on the next data chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionTry {
    /// Compression is off.
    No,
    /// Compress the whole chunk; sent compressed if that saves enough.
    Whole,
    /// Compress [`COMPRESSION_SAMPLE`] bytes of it first; the whole only if the sample shrinks.
    Sample,
}

/// Whether to spend CPU on zstd for the next chunk. Random or already compressed data does not
/// shrink, and compressing it costs more CPU than the rest of the sender's work: after
/// [`COMPRESSION_MISSES`] chunks in a row that did not shrink, the sender only compresses a
/// sample of each chunk ([`CompressionTry::Sample`]), and the whole chunk only when the sample
/// shrinks; a chunk that shrinks whole returns it to trying whole chunks. So a disk of random
/// data costs a thirty-second of the compression CPU, and a compressible region after a random
/// one is still found at its first chunk.
#[derive(Debug, Clone)]
pub struct AdaptiveCompression {
    enabled: bool,
    misses: u32,
}

impl AdaptiveCompression {
    pub fn new(enabled: bool) -> AdaptiveCompression {
        AdaptiveCompression { enabled, misses: 0 }
    }

    /// How much to try on the next chunk.
    pub fn next(&self) -> CompressionTry {
        match (self.enabled, self.misses >= COMPRESSION_MISSES) {
            (false, _) => CompressionTry::No,
            (true, false) => CompressionTry::Whole,
            (true, true) => CompressionTry::Sample,
        }
    }

    /// What compressing a whole chunk did: `shrank` when it travelled compressed.
    pub fn learn(&mut self, shrank: bool) {
        self.misses = if shrank { 0 } else { (self.misses + 1).min(COMPRESSION_MISSES) };
    }

    /// The data frame of `bytes` at `offset`, compressed as far as this says; learns from it.
    /// Returns the frame and whether zstd ran on the whole chunk.
    pub fn frame(&mut self, offset: u64, bytes: &[u8]) -> (Data, bool) {
        let whole = match self.next() {
            CompressionTry::No => false,
            CompressionTry::Whole => true,
            CompressionTry::Sample => {
                let at = (bytes.len() / 2).saturating_sub(COMPRESSION_SAMPLE / 2);
                drover_proto::compresses(&bytes[at..(at + COMPRESSION_SAMPLE).min(bytes.len())])
            }
        };
        let d = Data::new(offset, bytes, whole);
        if whole {
            self.learn(d.compression != Compression::None);
        }
        (d, whole)
    }
}

/// Chunks read from the source in one go (their reads in flight together), while the chunks
/// read before are hashed and sent.
const READ_BATCH: usize = 16;

/// Sends what of `spec.extents` the receiver does not hold yet, over one stream, and waits until
/// the receiver has made it durable. [`TransferError::Cut`] when the stream breaks: call again
/// with a new stream to resume.
pub async fn send<S>(stream: S, source: &mut dyn BlockSource, spec: &SendSpec) -> Result<SendStats>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    send_framed(Framed::new(stream, Codec), source, spec).await
}

/// [`send`] on a stream already framed, where other messages came first (a pull).
pub async fn send_framed<S>(
    mut framed: Framed<S, Codec>,
    source: &mut dyn BlockSource,
    spec: &SendSpec,
) -> Result<SendStats>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let chunk = spec.chunk.clamp(4096, MAX_EXTENT);
    let hello =
        Hello { version: PROTOCOL_VERSION, transfer: spec.transfer, stream: 0, streams: 1, disk_size: spec.disk_size };
    framed.send(Message::Hello(hello)).await.map_err(cut)?;
    let welcome = match framed.next().await {
        Some(Ok(Message::Welcome(w))) => w,
        Some(Ok(Message::Refused(r))) => return Err(TransferError::Refused(r.code, r.message)),
        Some(Ok(other)) => return Err(TransferError::Protocol(format!("expected welcome, got {}", kind(&other)))),
        Some(Err(e)) => return Err(cut(e)),
        None => return Err(TransferError::Cut),
    };
    if welcome.version != PROTOCOL_VERSION {
        return Err(TransferError::Protocol(format!("the receiver answered with version {}", welcome.version)));
    }
    let mut held = ExtentSet::new();
    for r in &welcome.acknowledged {
        held.insert(Extent::new(r.offset, r.length));
    }
    let todo = spec.extents.subtract(&held);
    let mut stats = SendStats { already_there: spec.extents.total_bytes() - todo.total_bytes(), ..Default::default() };

    let (mut sink, mut incoming) = framed.split();
    // Acknowledgements are read while data is sent: a receiver blocked on sending an ack would
    // otherwise stop reading, and both ends would wait for ever.
    let final_flush = u64::MAX;
    let acks = async {
        loop {
            match incoming.next().await {
                Some(Ok(Message::Ack(_))) => {}
                Some(Ok(Message::Flushed(n))) if n == final_flush => return Ok(()),
                Some(Ok(Message::Flushed(_))) => {}
                Some(Ok(Message::Refused(r))) => return Err(TransferError::Refused(r.code, r.message)),
                Some(Ok(other)) => return Err(TransferError::Protocol(format!("unexpected {}", kind(&other)))),
                Some(Err(e)) => return Err(cut(e)),
                None => return Err(TransferError::Cut),
            }
        }
    };
    let data = async {
        let mut compression = AdaptiveCompression::new(spec.compress);
        let (mut since_flush, mut flushes) = (0u64, 0u64);
        // Two buffers: the next batch is read from the source while this one is hashed and sent.
        let batch_bytes = chunk as usize * READ_BATCH;
        let (mut current, mut next) = (vec![0u8; batch_bytes], vec![0u8; batch_bytes]);
        let mut chunks = todo.chunks(u64::from(chunk));
        let mut this: Vec<Extent> = chunks.by_ref().take(READ_BATCH).collect();
        read_batch(source, &this, &mut current).await?;
        // Bounded by the chunks of `todo`: every round takes up to READ_BATCH of them.
        while !this.is_empty() {
            let following: Vec<Extent> = chunks.by_ref().take(READ_BATCH).collect();
            let send_this = async {
                let mut at = 0usize;
                for e in &this {
                    let part = &current[at..at + e.len as usize];
                    at += e.len as usize;
                    let m = if part.iter().all(|b| *b == 0) {
                        stats.zero_bytes += e.len;
                        Message::Zero(Range { offset: e.offset, length: e.len })
                    } else {
                        let (d, tried) = compression.frame(e.offset, part);
                        match (tried, d.compression != Compression::None) {
                            (_, true) => stats.compressed_chunks += 1,
                            (true, false) => stats.incompressible_chunks += 1,
                            (false, _) => stats.untried_chunks += 1,
                        }
                        stats.data_bytes += e.len;
                        stats.wire_bytes += d.payload.len() as u64;
                        Message::Data(d)
                    };
                    sink.feed(m).await.map_err(cut)?;
                    since_flush += e.len;
                    if spec.flush_every > 0 && since_flush >= spec.flush_every {
                        flushes += 1;
                        sink.feed(Message::Flush(flushes)).await.map_err(cut)?;
                        since_flush = 0;
                    }
                }
                sink.flush().await.map_err(cut)?;
                Ok::<_, TransferError>(())
            };
            tokio::try_join!(send_this, read_batch(source, &following, &mut next))?;
            std::mem::swap(&mut current, &mut next);
            this = following;
        }
        sink.send(Message::Flush(final_flush)).await.map_err(cut)?;
        Ok::<_, TransferError>(())
    };
    tokio::try_join!(data, acks)?;
    sink.send(Message::Done { bytes: stats.data_bytes }).await.map_err(cut)?;
    Ok(stats)
}

/// Reads `extents` (at most [`READ_BATCH`] chunks) into `buf`, one after the other: chunks that
/// follow each other on the disk in one read (a whole batch of a seed is one request of
/// [`READ_BATCH`] chunks instead of as many requests).
async fn read_batch(source: &mut dyn BlockSource, extents: &[Extent], buf: &mut [u8]) -> Result<()> {
    let mut reads: Vec<(u64, &mut [u8])> = Vec::with_capacity(extents.len());
    let mut rest = buf;
    let mut i = 0;
    // Bounded by `extents`: every round takes at least one.
    while i < extents.len() {
        let offset = extents[i].offset;
        let mut len = extents[i].len;
        i += 1;
        while i < extents.len() && extents[i].offset == offset + len {
            len += extents[i].len;
            i += 1;
        }
        let (part, tail) = rest.split_at_mut(len as usize);
        reads.push((offset, part));
        rest = tail;
    }
    if !reads.is_empty() {
        source.read_many(&mut reads).await?;
    }
    Ok(())
}

/// An I/O error on the stream is a cut (resume with a new stream); anything else is what it is.
fn cut(e: ProtoError) -> TransferError {
    match e {
        ProtoError::Io(_) => TransferError::Cut,
        other => TransferError::Proto(other),
    }
}
