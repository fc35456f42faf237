//! The agent-to-agent data path's wire protocol (issue 11): what a sending agent and a receiving
//! agent say to each other while a disk's extents move between sites. The control plane never
//! carries disk bytes; it only names the transfer both agents take part in.
//!
//! One transfer runs over one or more TCP (TLS) streams. Each stream opens with [`Hello`]; the
//! receiver answers [`Welcome`] with the extents its journal already holds, so a transfer cut off
//! (a dropped link, a killed agent) resumes from the last acknowledged extent instead of starting
//! over, or [`Refused`] (an unknown transfer, a version it does not speak). Then the sender sends
//! [`Data`] (an extent's bytes, optionally zstd-compressed, with the BLAKE3 of each
//! [`HASH_PIECE`] of the plain bytes, which the receiver checks before it writes anything, and
//! which are the very hashes of a restore point's manifest, so the receiver hashes each byte once) and [`Zero`] (a range that reads as
//! zeroes: sent as a range, not as bytes); the receiver answers [`Ack`] once it has taken an
//! extent (checked; it may gather writes). [`Flush`] asks for everything acknowledged so far to
//! be written, durable and journalled; [`Flushed`] says it is. Hash-compare runs its hashing on each side: the receiver sends [`Hashes`] of its
//! blocks and only the blocks that differ travel. [`Done`] ends a stream.
//!
//! # Pulling
//! Between agents the receiver (the DR agent) dials the sender (the source agent's data
//! listener), so a stream may open with a pull before the hello: the receiver sends [`Pull`]
//! (the cut, its instance, the transfer, the mode, the range of the disk this stream carries,
//! and the transfer's bandwidth limit, which the source paces what it sends by); for
//! hash-compare, the [`Message::Hashes`] of the range's blocks follow, ended by
//! `Done { bytes: 0 }`. A transfer pulled over several streams gives each a disjoint range. The source answers [`Message::Refused`]
//! (no such cut, another instance of it, another size) or [`Message::Offer`] (what it will send
//! before the receiver's journal is taken off), and then speaks as the sender above: hello,
//! data, done. The cut's instance is chosen by the source when it makes the cut, so a
//! restarted source whose new cut has the same id is never spliced into an older transfer.
//!
//! # Surveying
//! Before it splits a seed or a bitmap delta into streams, the receiver asks where the bytes
//! are: [`Message::Survey`] (a pull's fields, the whole disk) is answered by
//! [`Message::Surveyed`], the bytes the source would send in each of at most [`MAX_SURVEY`]
//! equal granules of the disk, and the connection ends. The receiver then gives each stream a
//! range holding about as many of those bytes as the others, so a disk whose data sits in its
//! first tenth still keeps every stream busy; one round trip, whatever the disk's size.
//!
//! # Frames
//! `length: u32` (big-endian, the bytes after it) · `kind: u8` · body. Integers are big-endian,
//! ids are 16 raw bytes, hashes 32. A frame is at most [`MAX_FRAME`] bytes, so a peer can never
//! make the other hold more than one frame's memory; an extent is at most [`MAX_EXTENT`] bytes
//! before compression, and decompression is bounded by the length the frame declares.
//!
//! Written by hand rather than with a serialization crate: the data frames carry up to 4 MiB
//! payloads that must go from the socket to the disk without a copy through a generic format,
//! and a fixed, versioned layout is what both ends of a protocol that outlives one build need.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};
use uuid::Uuid;

/// The protocol version this build speaks. A peer that speaks another is refused in its
/// [`Hello`]: no mixed-version transfer.
///
/// Version 2: a [`Pull`] names the range of the disk its stream carries (several streams per
/// transfer), and a [`Data`] payload is zstd only where that saves at least
/// [`COMPRESSION_WORTH`].
///
/// Version 3: a [`Data`] frame carries the hash of each [`HASH_PIECE`] of its bytes instead of one
/// hash of the whole extent.
///
/// Version 4: [`Message::Survey`] and [`Message::Surveyed`].
pub const PROTOCOL_VERSION: u16 = 4;

/// The piece of an extent's bytes each hash of a [`Data`] frame covers, from the extent's offset
/// (the last piece may be shorter): the block of a restore point's manifest.
pub const HASH_PIECE: u32 = 64 << 10;

/// How many hashes a [`Data`] frame of `length` bytes carries.
pub fn pieces(length: u32) -> usize {
    length.div_ceil(HASH_PIECE) as usize
}

/// A chunk is sent compressed only when zstd shrinks it below this fraction (in percent) of its
/// plain size: less than that saving does not pay for the receiver's decompression.
pub const COMPRESSION_WORTH: usize = 95;

/// The longest cut id a [`Pull`] names, in bytes.
pub const MAX_CUT_ID: usize = 128;

/// The largest extent one [`Data`] frame carries, before compression.
pub const MAX_EXTENT: u32 = 4 << 20;

/// The largest frame, after the length prefix: an uncompressed extent of [`MAX_EXTENT`] plus its
/// header, with room to spare for a [`Welcome`] or [`Hashes`] list.
pub const MAX_FRAME: usize = MAX_EXTENT as usize + 4096;

/// The longest message a [`Refused`] carries, in bytes.
pub const MAX_MESSAGE: usize = 1024;

/// The most granules a [`Message::Surveyed`] counts (32 KiB of counts).
pub const MAX_SURVEY: usize = 4096;

/// A range of a disk, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    pub offset: u64,
    pub length: u64,
}

impl Range {
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.length)
    }
}

/// A BLAKE3 hash of plain (uncompressed) bytes.
pub type Hash = [u8; 32];

/// How a [`Data`] payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    /// zstd, one frame per extent.
    Zstd,
}

/// The first frame on a stream, from the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    /// The transfer the control plane created on both agents (session and step).
    pub transfer: Uuid,
    /// This stream's number, from 0, of `streams`.
    pub stream: u16,
    pub streams: u16,
    /// The disk's size in bytes: the receiver refuses a transfer into a disk of another size.
    pub disk_size: u64,
}

/// How the source finds what to send for a [`Pull`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullMode {
    /// The allocated data of the cut.
    Seed,
    /// The extents the cut's dirty bitmap marks.
    Bitmap,
    /// The blocks whose hashes differ from the [`Message::Hashes`] the receiver sends next.
    HashCompare,
}

impl PullMode {
    fn to_u8(self) -> u8 {
        match self {
            PullMode::Seed => 1,
            PullMode::Bitmap => 2,
            PullMode::HashCompare => 3,
        }
    }
    fn from_u8(v: u8) -> Result<Self, ProtoError> {
        Ok(match v {
            1 => PullMode::Seed,
            2 => PullMode::Bitmap,
            3 => PullMode::HashCompare,
            other => return Err(ProtoError::Malformed(format!("unknown pull mode {other}"))),
        })
    }
}

/// The receiver's request to a source agent: send the cut `cut` (of instance `instance`) for
/// the transfer `transfer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pull {
    pub version: u16,
    pub transfer: Uuid,
    /// The cut's id on the source (at most [`MAX_CUT_ID`] bytes).
    pub cut: String,
    /// The cut's instance, as the source made it: another instance is refused.
    pub instance: Uuid,
    pub mode: PullMode,
    /// The disk's size as the receiver expects it.
    pub disk_size: u64,
    /// The part of the disk this stream carries: the source sends only extents within it. Its
    /// offset is block-aligned (as its end, unless that is the disk's end). The whole disk for a
    /// transfer of one stream.
    pub range: Range,
    /// The most the source may send for this transfer, in bytes per second (`None`: no limit of
    /// the transfer's own; the source's global cap, if any, still applies). Never 0.
    ///
    /// On the wire: an optional `u64` after the range, present only when set.
    pub bandwidth_limit: Option<u64>,
}

/// The receiver's answer to [`Hello`]: the extents it already holds (written and journalled),
/// which the sender does not send again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    pub acknowledged: Vec<Range>,
}

/// An extent's bytes. `hashes` are the BLAKE3 of each [`HASH_PIECE`] of the plain bytes;
/// `length` their count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Data {
    pub offset: u64,
    pub length: u32,
    pub hashes: Vec<Hash>,
    pub compression: Compression,
    pub payload: Bytes,
}

/// Why a receiver refuses a stream or gives a transfer up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    /// The peer speaks another protocol version.
    Version,
    /// The transfer is not known to this agent (not created, or already finished).
    UnknownTransfer,
    /// The disk's size differs from the transfer's.
    SizeMismatch,
    /// An extent's bytes did not match its hash.
    HashMismatch,
    /// The receiver could not write (disk full, I/O error); the sender may retry later.
    Unavailable,
    /// Anything else the peer did wrong (an extent past the end, a message out of place).
    Protocol,
    /// The source has no such cut, or another instance of it (it was restarted and cut again).
    UnknownCut,
}

impl RefusalCode {
    fn to_u16(self) -> u16 {
        match self {
            RefusalCode::Version => 1,
            RefusalCode::UnknownTransfer => 2,
            RefusalCode::SizeMismatch => 3,
            RefusalCode::HashMismatch => 4,
            RefusalCode::Unavailable => 5,
            RefusalCode::Protocol => 6,
            RefusalCode::UnknownCut => 7,
        }
    }
    fn from_u16(v: u16) -> Result<Self, ProtoError> {
        Ok(match v {
            1 => RefusalCode::Version,
            2 => RefusalCode::UnknownTransfer,
            3 => RefusalCode::SizeMismatch,
            4 => RefusalCode::HashMismatch,
            5 => RefusalCode::Unavailable,
            6 => RefusalCode::Protocol,
            7 => RefusalCode::UnknownCut,
            other => return Err(ProtoError::Malformed(format!("unknown refusal code {other}"))),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub code: RefusalCode,
    pub message: String,
}

/// One message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Data(Data),
    /// A range that reads as zeroes.
    Zero(Range),
    /// The receiver took this range (checked, and written or about to be); it is durable and
    /// journalled once a later `Flushed` answers.
    Ack(Range),
    /// Make everything acknowledged so far durable; answered by `Flushed` with the same number.
    Flush(u64),
    Flushed(u64),
    /// The receiver's block hashes from `offset`, one per `block_size` bytes (hash-compare).
    Hashes {
        offset: u64,
        block_size: u32,
        hashes: Vec<Hash>,
    },
    /// The sender is done with this stream, having sent `bytes` of data on it.
    Done {
        bytes: u64,
    },
    Refused(Refused),
    /// The receiver asks a source for a cut (see "Pulling" above).
    Pull(Pull),
    /// The source's answer to a pull: `bytes` in `extents` extents will be sent, less what the
    /// receiver's journal already holds.
    Offer {
        bytes: u64,
        extents: u64,
    },
    /// The receiver asks where the bytes of a pull of the whole disk would be (see "Surveying").
    Survey(Pull),
    /// The source's answer to a survey: `bytes[i]` would be sent from
    /// `i * granule..(i + 1) * granule`. `granule` is a whole number of [`HASH_PIECE`]s.
    Surveyed {
        granule: u64,
        bytes: Vec<u64>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME}")]
    FrameTooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("extent at {offset}: its bytes do not match their hash")]
    HashMismatch { offset: u64 },
    #[error("peer speaks protocol version {0}; this agent speaks {PROTOCOL_VERSION}")]
    Version(u16),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const DATA: u8 = 3;
const ZERO: u8 = 4;
const ACK: u8 = 5;
const FLUSH: u8 = 6;
const FLUSHED: u8 = 7;
const HASHES: u8 = 8;
const DONE: u8 = 9;
const REFUSED: u8 = 10;
const PULL: u8 = 11;
const OFFER: u8 = 12;
const SURVEY: u8 = 13;
const SURVEYED: u8 = 14;

impl Data {
    /// The data frame of `bytes` at `offset`, compressed when `compress` and zstd shrinks it
    /// below [`COMPRESSION_WORTH`] percent; otherwise (random data, already compressed data) the
    /// plain bytes, flagged [`Compression::None`].
    ///
    /// # Panics
    /// When `bytes` is longer than [`MAX_EXTENT`]: the sender splits extents first.
    pub fn new(offset: u64, bytes: &[u8], compress: bool) -> Data {
        assert!(bytes.len() <= MAX_EXTENT as usize, "an extent of {} bytes is over {MAX_EXTENT}", bytes.len());
        let hashes = piece_hashes(bytes);
        let length = bytes.len() as u32;
        if compress && let Some(z) = compressed(bytes) {
            return Data { offset, length, hashes, compression: Compression::Zstd, payload: Bytes::from(z) };
        }
        Data { offset, length, hashes, compression: Compression::None, payload: Bytes::copy_from_slice(bytes) }
    }

    /// The plain bytes, decompressed (never more than `length`) and checked against the hashes:
    /// what a receiver may write. Nothing is returned that does not match.
    pub fn verified(&self) -> Result<Bytes, ProtoError> {
        if self.hashes.len() != pieces(self.length) {
            return Err(ProtoError::HashMismatch { offset: self.offset });
        }
        let plain = match self.compression {
            Compression::None => self.payload.clone(),
            Compression::Zstd => Bytes::from(
                zstd::bulk::decompress(&self.payload, self.length as usize)
                    .map_err(|_| ProtoError::HashMismatch { offset: self.offset })?,
            ),
        };
        if plain.len() != self.length as usize || piece_hashes(&plain) != self.hashes {
            return Err(ProtoError::HashMismatch { offset: self.offset });
        }
        Ok(plain)
    }
}

/// The BLAKE3 of each [`HASH_PIECE`] of `bytes`.
fn piece_hashes(bytes: &[u8]) -> Vec<Hash> {
    bytes.chunks(HASH_PIECE as usize).map(|p| *blake3::hash(p).as_bytes()).collect()
}

thread_local! {
    /// One zstd context per thread, kept: making one per chunk costs more than compressing a
    /// small chunk.
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// `bytes` zstd-compressed (level 1), when that saves enough ([`COMPRESSION_WORTH`]).
fn compressed(bytes: &[u8]) -> Option<Vec<u8>> {
    let z = ZSTD.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = zstd::bulk::Compressor::new(1).ok();
        }
        cell.as_mut()?.compress(bytes).ok()
    })?;
    (z.len() * 100 < bytes.len() * COMPRESSION_WORTH).then_some(z)
}

/// Whether zstd saves enough on `sample` ([`COMPRESSION_WORTH`]): a cheap look at a part of a
/// chunk before the whole is compressed.
pub fn compresses(sample: &[u8]) -> bool {
    !sample.is_empty() && compressed(sample).is_some()
}

impl Hello {
    /// The receiver's check of a sender's hello: the version it speaks.
    pub fn check_version(&self) -> Result<(), ProtoError> {
        if self.version != PROTOCOL_VERSION {
            return Err(ProtoError::Version(self.version));
        }
        Ok(())
    }
}

/// The codec of [`Message`] frames (see the module documentation), for `tokio_util`'s `Framed`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Codec;

impl Decoder for Codec {
    type Item = Message;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, ProtoError> {
        if src.len() < 4 {
            src.reserve(4 - src.len());
            return Ok(None);
        }
        let len = u32::from_be_bytes([src[0], src[1], src[2], src[3]]) as usize;
        if len > MAX_FRAME {
            return Err(ProtoError::FrameTooLarge(len));
        }
        if len == 0 {
            return Err(ProtoError::Malformed("an empty frame".into()));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        let frame = src.split_to(len).freeze();
        decode_frame(frame).map(Some)
    }
}

impl Encoder<Message> for Codec {
    type Error = ProtoError;

    fn encode(&mut self, m: Message, dst: &mut BytesMut) -> Result<(), ProtoError> {
        let start = dst.len();
        dst.put_u32(0);
        encode_body(&m, dst)?;
        let len = dst.len() - start - 4;
        if len > MAX_FRAME {
            dst.truncate(start);
            return Err(ProtoError::FrameTooLarge(len));
        }
        dst[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

fn put_range(dst: &mut BytesMut, r: &Range) {
    dst.put_u64(r.offset);
    dst.put_u64(r.length);
}

fn encode_body(m: &Message, dst: &mut BytesMut) -> Result<(), ProtoError> {
    match m {
        Message::Hello(h) => {
            dst.put_u8(HELLO);
            dst.put_u16(h.version);
            dst.put_slice(h.transfer.as_bytes());
            dst.put_u16(h.stream);
            dst.put_u16(h.streams);
            dst.put_u64(h.disk_size);
        }
        Message::Welcome(w) => {
            dst.put_u8(WELCOME);
            dst.put_u16(w.version);
            dst.put_u32(w.acknowledged.len() as u32);
            for r in &w.acknowledged {
                put_range(dst, r);
            }
        }
        Message::Data(d) => {
            if d.length > MAX_EXTENT {
                return Err(ProtoError::Malformed(format!("an extent of {} bytes", d.length)));
            }
            if d.hashes.len() != pieces(d.length) {
                return Err(ProtoError::Malformed(format!("{} hashes for an extent of {}", d.hashes.len(), d.length)));
            }
            dst.reserve(1 + 8 + 4 + 32 * d.hashes.len() + 1 + d.payload.len());
            dst.put_u8(DATA);
            dst.put_u64(d.offset);
            dst.put_u32(d.length);
            for h in &d.hashes {
                dst.put_slice(h);
            }
            dst.put_u8(match d.compression {
                Compression::None => 0,
                Compression::Zstd => 1,
            });
            dst.put_slice(&d.payload);
        }
        Message::Zero(r) => {
            dst.put_u8(ZERO);
            put_range(dst, r);
        }
        Message::Ack(r) => {
            dst.put_u8(ACK);
            put_range(dst, r);
        }
        Message::Flush(n) => {
            dst.put_u8(FLUSH);
            dst.put_u64(*n);
        }
        Message::Flushed(n) => {
            dst.put_u8(FLUSHED);
            dst.put_u64(*n);
        }
        Message::Hashes { offset, block_size, hashes } => {
            dst.put_u8(HASHES);
            dst.put_u64(*offset);
            dst.put_u32(*block_size);
            dst.put_u32(hashes.len() as u32);
            for h in hashes {
                dst.put_slice(h);
            }
        }
        Message::Done { bytes } => {
            dst.put_u8(DONE);
            dst.put_u64(*bytes);
        }
        Message::Refused(r) => {
            dst.put_u8(REFUSED);
            dst.put_u16(r.code.to_u16());
            let msg = clip(&r.message, MAX_MESSAGE);
            dst.put_u16(msg.len() as u16);
            dst.put_slice(msg.as_bytes());
        }
        Message::Pull(p) | Message::Survey(p) => {
            if p.cut.is_empty() || p.cut.len() > MAX_CUT_ID {
                return Err(ProtoError::Malformed(format!("a cut id of {} bytes", p.cut.len())));
            }
            dst.put_u8(if matches!(m, Message::Pull(_)) { PULL } else { SURVEY });
            dst.put_u16(p.version);
            dst.put_slice(p.transfer.as_bytes());
            dst.put_slice(p.instance.as_bytes());
            dst.put_u8(p.mode.to_u8());
            dst.put_u64(p.disk_size);
            dst.put_u16(p.cut.len() as u16);
            dst.put_slice(p.cut.as_bytes());
            put_range(dst, &p.range);
            match p.bandwidth_limit {
                None => {}
                Some(0) => return Err(ProtoError::Malformed("a bandwidth limit of 0 bytes per second".into())),
                Some(limit) => dst.put_u64(limit),
            }
        }
        Message::Offer { bytes, extents } => {
            dst.put_u8(OFFER);
            dst.put_u64(*bytes);
            dst.put_u64(*extents);
        }
        Message::Surveyed { granule, bytes } => {
            if *granule == 0 || !granule.is_multiple_of(u64::from(HASH_PIECE)) || bytes.len() > MAX_SURVEY {
                return Err(ProtoError::Malformed(format!("a survey of {} granules of {granule} bytes", bytes.len())));
            }
            dst.put_u8(SURVEYED);
            dst.put_u64(*granule);
            dst.put_u32(bytes.len() as u32);
            for b in bytes {
                dst.put_u64(*b);
            }
        }
    }
    Ok(())
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Reads a frame's body; every length is checked against what is left, and nothing may be left
/// over.
struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &str) -> Result<(), ProtoError> {
        if self.buf.remaining() < n {
            return Err(ProtoError::Malformed(format!("truncated {what}")));
        }
        Ok(())
    }
    fn u8(&mut self, what: &str) -> Result<u8, ProtoError> {
        self.need(1, what)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self, what: &str) -> Result<u16, ProtoError> {
        self.need(2, what)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self, what: &str) -> Result<u32, ProtoError> {
        self.need(4, what)?;
        Ok(self.buf.get_u32())
    }
    fn u64(&mut self, what: &str) -> Result<u64, ProtoError> {
        self.need(8, what)?;
        Ok(self.buf.get_u64())
    }
    fn bytes(&mut self, n: usize, what: &str) -> Result<Bytes, ProtoError> {
        self.need(n, what)?;
        Ok(self.buf.split_to(n))
    }
    fn hash(&mut self, what: &str) -> Result<Hash, ProtoError> {
        let b = self.bytes(32, what)?;
        let mut h = [0u8; 32];
        h.copy_from_slice(&b);
        Ok(h)
    }
    fn range(&mut self, what: &str) -> Result<Range, ProtoError> {
        let r = Range { offset: self.u64(what)?, length: self.u64(what)? };
        if r.end().is_none() {
            return Err(ProtoError::Malformed(format!("{what} past the end of any disk")));
        }
        Ok(r)
    }
    fn end(self, what: &str) -> Result<(), ProtoError> {
        if self.buf.has_remaining() {
            return Err(ProtoError::Malformed(format!("{} bytes after {what}", self.buf.remaining())));
        }
        Ok(())
    }
}

fn uuid(r: &mut Reader, what: &str) -> Result<Uuid, ProtoError> {
    let id = r.bytes(16, what)?;
    Uuid::from_slice(&id).map_err(|e| ProtoError::Malformed(e.to_string()))
}

fn decode_frame(frame: Bytes) -> Result<Message, ProtoError> {
    let mut r = Reader { buf: frame };
    let kind = r.u8("frame kind")?;
    let m = match kind {
        HELLO => {
            let version = r.u16("hello")?;
            let id = r.bytes(16, "hello")?;
            let transfer = Uuid::from_slice(&id).map_err(|e| ProtoError::Malformed(e.to_string()))?;
            let (stream, streams, disk_size) = (r.u16("hello")?, r.u16("hello")?, r.u64("hello")?);
            if streams == 0 || stream >= streams {
                return Err(ProtoError::Malformed(format!("stream {stream} of {streams}")));
            }
            r.end("hello")?;
            Message::Hello(Hello { version, transfer, stream, streams, disk_size })
        }
        WELCOME => {
            let version = r.u16("welcome")?;
            let n = r.u32("welcome")? as usize;
            // Checked against what is left before anything is allocated.
            r.need(n.saturating_mul(16), "welcome's ranges")?;
            let acknowledged = (0..n).map(|_| r.range("acknowledged range")).collect::<Result<Vec<_>, _>>()?;
            r.end("welcome")?;
            Message::Welcome(Welcome { version, acknowledged })
        }
        DATA => {
            let offset = r.u64("data")?;
            let length = r.u32("data")?;
            if length > MAX_EXTENT {
                return Err(ProtoError::Malformed(format!("an extent of {length} bytes (at most {MAX_EXTENT})")));
            }
            if offset.checked_add(u64::from(length)).is_none() {
                return Err(ProtoError::Malformed("an extent past the end of any disk".into()));
            }
            // The count follows from the length (at most MAX_EXTENT / HASH_PIECE).
            let hashes = (0..pieces(length)).map(|_| r.hash("data")).collect::<Result<Vec<_>, _>>()?;
            let compression = match r.u8("data")? {
                0 => Compression::None,
                1 => Compression::Zstd,
                other => return Err(ProtoError::Malformed(format!("unknown compression {other}"))),
            };
            let payload = r.buf.split_to(r.buf.remaining());
            if compression == Compression::None && payload.len() != length as usize {
                return Err(ProtoError::Malformed(format!(
                    "{} bytes of data for an extent of {length}",
                    payload.len()
                )));
            }
            Message::Data(Data { offset, length, hashes, compression, payload })
        }
        ZERO => {
            let range = r.range("zero")?;
            r.end("zero")?;
            Message::Zero(range)
        }
        ACK => {
            let range = r.range("ack")?;
            r.end("ack")?;
            Message::Ack(range)
        }
        FLUSH | FLUSHED => {
            let n = r.u64("flush")?;
            r.end("flush")?;
            if kind == FLUSH { Message::Flush(n) } else { Message::Flushed(n) }
        }
        HASHES => {
            let offset = r.u64("hashes")?;
            let block_size = r.u32("hashes")?;
            if block_size == 0 {
                return Err(ProtoError::Malformed("hashes of 0-byte blocks".into()));
            }
            let n = r.u32("hashes")? as usize;
            r.need(n.saturating_mul(32), "hashes")?;
            let hashes = (0..n).map(|_| r.hash("hash")).collect::<Result<Vec<_>, _>>()?;
            r.end("hashes")?;
            Message::Hashes { offset, block_size, hashes }
        }
        DONE => {
            let bytes = r.u64("done")?;
            r.end("done")?;
            Message::Done { bytes }
        }
        REFUSED => {
            let code = RefusalCode::from_u16(r.u16("refusal")?)?;
            let n = r.u16("refusal")? as usize;
            if n > MAX_MESSAGE {
                return Err(ProtoError::Malformed(format!("a refusal message of {n} bytes")));
            }
            let text = r.bytes(n, "refusal message")?;
            let message = String::from_utf8(text.to_vec())
                .map_err(|_| ProtoError::Malformed("a refusal message not UTF-8".into()))?;
            r.end("refusal")?;
            Message::Refused(Refused { code, message })
        }
        PULL | SURVEY => {
            let wrap = if kind == PULL { Message::Pull } else { Message::Survey };
            let version = r.u16("pull")?;
            let transfer = uuid(&mut r, "pull")?;
            let instance = uuid(&mut r, "pull")?;
            let mode = PullMode::from_u8(r.u8("pull")?)?;
            let disk_size = r.u64("pull")?;
            let n = r.u16("pull")? as usize;
            if n == 0 || n > MAX_CUT_ID {
                return Err(ProtoError::Malformed(format!("a cut id of {n} bytes")));
            }
            let text = r.bytes(n, "cut id")?;
            let cut =
                String::from_utf8(text.to_vec()).map_err(|_| ProtoError::Malformed("a cut id not UTF-8".into()))?;
            if version != PROTOCOL_VERSION {
                // Another version's pull is read as far as its version, so the source can refuse
                // it for that rather than as malformed.
                let whole = Range { offset: 0, length: disk_size };
                return Ok(wrap(Pull {
                    version,
                    transfer,
                    cut,
                    instance,
                    mode,
                    disk_size,
                    range: whole,
                    bandwidth_limit: None,
                }));
            }
            let range = r.range("pull's range")?;
            let bandwidth_limit = match r.buf.remaining() {
                0 => None,
                _ => match r.u64("pull's bandwidth limit")? {
                    0 => return Err(ProtoError::Malformed("a bandwidth limit of 0 bytes per second".into())),
                    limit => Some(limit),
                },
            };
            r.end("pull")?;
            wrap(Pull { version, transfer, cut, instance, mode, disk_size, range, bandwidth_limit })
        }
        OFFER => {
            let (bytes, extents) = (r.u64("offer")?, r.u64("offer")?);
            r.end("offer")?;
            Message::Offer { bytes, extents }
        }
        SURVEYED => {
            let granule = r.u64("survey")?;
            if granule == 0 || !granule.is_multiple_of(u64::from(HASH_PIECE)) {
                return Err(ProtoError::Malformed(format!("survey granules of {granule} bytes")));
            }
            let n = r.u32("survey")? as usize;
            if n > MAX_SURVEY {
                return Err(ProtoError::Malformed(format!("a survey of {n} granules (at most {MAX_SURVEY})")));
            }
            r.need(n * 8, "survey")?;
            let bytes = (0..n).map(|_| r.u64("survey")).collect::<Result<Vec<_>, _>>()?;
            r.end("survey")?;
            Message::Surveyed { granule, bytes }
        }
        other => return Err(ProtoError::Malformed(format!("unknown frame kind {other}"))),
    };
    Ok(m)
}

#[cfg(test)]
mod tests;
