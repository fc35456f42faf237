//! The transfer over an in-memory pipe between two in-memory disks (this tests the protocol's
//! logic: BLAKE3 checks, zero ranges, resuming; the disks behind it are the agents' business).
//! A disk here has a volatile and a durable copy, so a killed receiver loses exactly what was not
//! flushed, as a real one would.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use drover_block::extents::ExtentSet;
use drover_proto::{Codec, Data, Hello, Message, PROTOCOL_VERSION, RefusalCode};
use drover_transfer::*;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::codec::Framed;
use uuid::Uuid;

const SIZE: u64 = 32 << 20;
const CHUNK: u32 = 64 << 10;

#[derive(Clone)]
struct Disk {
    volatile: Vec<u8>,
    durable: Vec<u8>,
    flushes: u32,
}

impl Disk {
    fn new(bytes: Vec<u8>) -> Disk {
        Disk { durable: bytes.clone(), volatile: bytes, flushes: 0 }
    }
    /// What survives a crash: the durable copy.
    fn after_crash(&self) -> Disk {
        Disk::new(self.durable.clone())
    }
}

#[async_trait]
impl BlockSource for Disk {
    async fn read(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        buf.copy_from_slice(&self.volatile[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
}

#[async_trait]
impl BlockTarget for Disk {
    async fn write(&mut self, offset: u64, data: &[u8], hashes: &[drover_proto::Hash]) -> std::io::Result<()> {
        // The target is handed the hash of each piece, as a manifest would keep it.
        let pieces: Vec<_> =
            data.chunks(drover_proto::HASH_PIECE as usize).map(|p| *blake3::hash(p).as_bytes()).collect();
        assert_eq!(hashes, pieces.as_slice(), "the piece hashes of the write at {offset}");
        self.volatile[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    async fn write_zeroes(&mut self, offset: u64, length: u64) -> std::io::Result<()> {
        self.volatile[offset as usize..(offset + length) as usize].fill(0);
        Ok(())
    }
    async fn flush(&mut self) -> std::io::Result<()> {
        self.durable.clone_from(&self.volatile);
        self.flushes += 1;
        Ok(())
    }
}

/// A source disk: random data, with a zero hole of 4 MiB and a compressible run.
fn source() -> Disk {
    let mut bytes = vec![0u8; SIZE as usize];
    blake3::Hasher::new().update(b"source").finalize_xof().fill(&mut bytes);
    bytes[8 << 20..12 << 20].fill(0);
    bytes[16 << 20..18 << 20].fill(0x5a);
    Disk::new(bytes)
}

/// A target that held something else (an older point's data shows through a new overlay).
fn target() -> Disk {
    let mut bytes = vec![0u8; SIZE as usize];
    blake3::Hasher::new().update(b"older").finalize_xof().fill(&mut bytes);
    Disk::new(bytes)
}

fn spec(transfer: Uuid, flush_every: u64) -> SendSpec {
    SendSpec {
        transfer,
        disk_size: SIZE,
        extents: ExtentSet::from_range(0, SIZE),
        chunk: CHUNK,
        compress: true,
        flush_every,
    }
}

/// A stream that breaks (as a cut link does) once `budget` bytes have been written through it.
struct CutAfter<S> {
    inner: S,
    budget: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for CutAfter<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CutAfter<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if self.budget == 0 {
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "link cut")));
        }
        let n = buf.len().min(self.budget);
        let r = Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
        if let Poll::Ready(Ok(written)) = r {
            self.budget -= written;
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn journal(dir: &tempfile::TempDir) -> Journal {
    Journal::open(&dir.path().join("transfer.journal")).await.unwrap()
}

#[tokio::test]
async fn a_whole_disk_arrives_checked_with_zero_ranges_as_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, mut dst) = (source(), target());
    let j = journal(&dir).await;
    let id = Uuid::new_v4();
    let (sent, received) = whole(&mut src, &mut dst, &j, id).await;
    let (expect, sp) = (Expect { transfer: id, disk_size: SIZE }, spec(id, 8 << 20));
    assert!(dst.durable == src.volatile, "the target is the source, durably");
    assert_eq!(sent.zero_bytes, 4 << 20, "the hole travelled as a range");
    assert_eq!((received.zero_bytes, received.data_bytes), (sent.zero_bytes, sent.data_bytes));
    assert!(sent.wire_bytes < sent.data_bytes - (1 << 20), "the compressible run went compressed: {sent:?}");
    assert!(dst.flushes >= 4, "flushed every 8 MiB and at the end: {}", dst.flushes);
    assert_eq!(j.durable().total_bytes(), SIZE);
    // The journal survives a reopen; a new stream of the same transfer sends nothing.
    let j = journal(&dir).await;
    assert_eq!(j.durable(), ExtentSet::from_range(0, SIZE));
    let (a, b) = tokio::io::duplex(64 << 10);
    let (again, _) = tokio::join!(send(a, &mut src, &sp), receive(b, &mut dst, &j, &expect));
    let again = again.unwrap();
    assert_eq!((again.already_there, again.data_bytes + again.zero_bytes), (SIZE, 0));
}

/// The target: after a cut link, a resumed transfer sends again at most 1% of what it
/// had sent.
#[tokio::test]
async fn a_cut_link_resumes_after_the_last_acknowledged_extent() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, mut dst) = (source(), target());
    let j = journal(&dir).await;
    let id = Uuid::new_v4();
    let expect = Expect { transfer: id, disk_size: SIZE };
    let (a, b) = tokio::io::duplex(64 << 10);
    let cut_at = 13 << 20;
    let sp = spec(id, 64 << 20);
    let (first, received) =
        tokio::join!(send(CutAfter { inner: a, budget: cut_at }, &mut src, &sp), receive(b, &mut dst, &j, &expect));
    assert!(matches!(first, Err(TransferError::Cut)), "{first:?}");
    assert!(matches!(received, Err(TransferError::Cut)), "{received:?}");
    let held = j.durable().total_bytes();
    assert!(held > 10 << 20, "what arrived before the cut is kept: {held}");

    let (a, b) = tokio::io::duplex(64 << 10);
    let (second, received) = tokio::join!(send(a, &mut src, &sp), receive(b, &mut dst, &j, &expect));
    let second = second.unwrap();
    received.unwrap();
    assert!(dst.durable == src.volatile, "the resumed transfer completes the disk");
    assert_eq!(second.already_there, held);
    // What the first stream wrote into the pipe (before compression, at most `cut_at` bytes of
    // frames) beyond what the receiver kept is what travels twice.
    let sent_twice = (second.data_bytes + second.zero_bytes + held).saturating_sub(SIZE);
    assert_eq!(sent_twice, 0, "a cut link loses nothing acknowledged");
}

#[tokio::test]
async fn a_killed_receiver_resends_at_most_since_its_last_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, mut dst) = (source(), target());
    let id = Uuid::new_v4();
    let expect = Expect { transfer: id, disk_size: SIZE };
    let flush_every = 2 << 20;
    let sp = spec(id, flush_every);
    {
        let j = journal(&dir).await;
        let (a, b) = tokio::io::duplex(64 << 10);
        let recv = receive(b, &mut dst, &j, &expect);
        let killed = async {
            // The receiver is dropped mid-transfer, as a killed process stops: no flush.
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        };
        let mut src2 = src.clone();
        let sender = send(a, &mut src2, &sp);
        tokio::select! {
            _ = async { tokio::join!(sender, recv) } => panic!("the transfer finished before the kill; make the disk bigger"),
            () = killed => {}
        }
    }
    let mut dst = dst.after_crash();
    let j = journal(&dir).await;
    let held = j.durable().total_bytes();
    let (a, b) = tokio::io::duplex(64 << 10);
    let (second, received) = tokio::join!(send(a, &mut src, &sp), receive(b, &mut dst, &j, &expect));
    let second = second.unwrap();
    received.unwrap();
    assert!(dst.durable == src.volatile, "nothing the crash lost is skipped");
    assert_eq!(second.already_there, held, "only journalled extents are skipped");
}

#[tokio::test]
async fn tampered_bytes_unknown_transfers_and_other_versions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut dst = target();
    let before = dst.volatile.clone();
    let j = journal(&dir).await;
    let id = Uuid::new_v4();
    let expect = Expect { transfer: id, disk_size: SIZE };

    // Bytes that do not match their hash are never written.
    let (a, b) = tokio::io::duplex(64 << 10);
    let peer = async move {
        let mut f = tokio_util::codec::Framed::new(a, Codec);
        f.send(Message::Hello(Hello {
            version: PROTOCOL_VERSION,
            transfer: id,
            stream: 0,
            streams: 1,
            disk_size: SIZE,
        }))
        .await
        .unwrap();
        assert!(matches!(f.next().await, Some(Ok(Message::Welcome(_)))));
        let mut d = Data::new(4096, &[7u8; 4096], false);
        d.hashes[0][0] ^= 1;
        f.send(Message::Data(d)).await.unwrap();
        f.next().await
    };
    let (answer, received) = tokio::join!(peer, receive(b, &mut dst, &j, &expect));
    assert!(matches!(received, Err(TransferError::Refused(RefusalCode::HashMismatch, _))), "{received:?}");
    assert!(matches!(answer, Some(Ok(Message::Refused(r))) if r.code == RefusalCode::HashMismatch));
    assert!(dst.volatile == before && j.durable().is_empty(), "nothing written, nothing journalled");

    // Another transfer, another size, another version: refused with a reason the sender sees.
    for (transfer, disk_size, code) in
        [(Uuid::new_v4(), SIZE, RefusalCode::UnknownTransfer), (id, SIZE + 4096, RefusalCode::SizeMismatch)]
    {
        let (a, b) = tokio::io::duplex(64 << 10);
        let mut src = source();
        let s = SendSpec { transfer, disk_size, ..spec(id, 0) };
        let (sent, received) = tokio::join!(send(a, &mut src, &s), receive(b, &mut dst, &j, &expect));
        assert!(matches!(sent, Err(TransferError::Refused(c, _)) if c == code), "{sent:?}");
        assert!(matches!(received, Err(TransferError::Refused(c, _)) if c == code), "{received:?}");
    }
    let (a, b) = tokio::io::duplex(64 << 10);
    let peer = async move {
        let mut f = tokio_util::codec::Framed::new(a, Codec);
        let hello = Hello { version: PROTOCOL_VERSION + 1, transfer: id, stream: 0, streams: 1, disk_size: SIZE };
        f.send(Message::Hello(hello)).await.unwrap();
        f.next().await
    };
    let (answer, received) = tokio::join!(peer, receive(b, &mut dst, &j, &expect));
    assert!(matches!(received, Err(TransferError::Refused(RefusalCode::Version, _))));
    assert!(
        matches!(answer, Some(Ok(Message::Refused(r))) if r.code == RefusalCode::Version && r.message.contains("version"))
    );
    assert!(dst.volatile == before);
}

#[tokio::test]
async fn a_torn_journal_record_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("j");
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&0u64.to_be_bytes());
    bytes.extend_from_slice(&65536u64.to_be_bytes());
    bytes.extend_from_slice(&[1, 2, 3]);
    std::fs::write(&path, bytes).unwrap();
    let j = Journal::open(&path).await.unwrap();
    assert_eq!(j.durable(), ExtentSet::from_range(0, 65536));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 16, "the torn tail is cut off");
    // A new journal is private to the service user.
    let fresh = dir.path().join("fresh");
    Journal::open(&fresh).await.unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777, 0o600);
}

/// A receiver that dialled the sender and pulled first (between agents) frames the stream
/// itself: the sender's refusal in place of the hello comes back as the refusal it is, and an
/// accepted pull goes on as any stream.
#[tokio::test]
async fn framed_streams_after_a_pull_carry_the_senders_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, mut dst) = (source(), target());
    let j = journal(&dir).await;
    let id = Uuid::new_v4();
    let expect = Expect { transfer: id, disk_size: SIZE };

    let (a, b) = tokio::io::duplex(64 << 10);
    let (mut sender, receiver) = (Framed::new(a, Codec), Framed::new(b, Codec));
    let refusal = Message::Refused(drover_proto::Refused { code: RefusalCode::UnknownCut, message: "no cut".into() });
    sender.send(refusal).await.unwrap();
    let e = receive_framed(receiver, &mut dst, &j, &expect).await.unwrap_err();
    assert!(matches!(e, TransferError::Refused(RefusalCode::UnknownCut, ref m) if m == "no cut"), "{e:?}");

    let (a, b) = tokio::io::duplex(256 << 10);
    let (mut sender, mut receiver) = (Framed::new(a, Codec), Framed::new(b, Codec));
    receiver.send(Message::Offer { bytes: SIZE, extents: 1 }).await.unwrap();
    assert!(matches!(sender.next().await, Some(Ok(Message::Offer { bytes: SIZE, .. }))));
    let sp = spec(id, 8 << 20);
    let (sent, received) =
        tokio::join!(send_framed(sender, &mut src, &sp), receive_framed(receiver, &mut dst, &j, &expect));
    assert_eq!(sent.unwrap().data_bytes, received.unwrap().data_bytes);
    assert!(dst.durable == src.volatile);
}

/// Transfer `id` of the whole of `src` into `dst` over one stream, flushing every 8 MiB.
async fn whole(src: &mut Disk, dst: &mut Disk, j: &Journal, id: Uuid) -> (SendStats, ReceiveStats) {
    let (a, b) = tokio::io::duplex(256 << 10);
    let (expect, sp) = (Expect { transfer: id, disk_size: SIZE }, spec(id, 8 << 20));
    let (sent, received) = tokio::join!(send(a, src, &sp), receive(b, dst, j, &expect));
    (sent.unwrap(), received.unwrap())
}

/// Sends `bytes` whole into a target of other bytes; returns what the sender counted, after
/// checking the target holds `bytes`.
async fn send_whole(bytes: Vec<u8>) -> SendStats {
    let dir = tempfile::tempdir().unwrap();
    let (mut src, mut dst) = (Disk::new(bytes), target());
    let j = journal(&dir).await;
    let (sent, received) = whole(&mut src, &mut dst, &j, Uuid::new_v4()).await;
    assert!(dst.durable == src.volatile, "the target holds the source's bytes");
    assert_eq!((received.data_bytes, received.wire_bytes), (sent.data_bytes, sent.wire_bytes));
    sent
}

#[tokio::test]
async fn random_data_travels_raw_and_zstd_stops_trying_it_whole_after_a_few_chunks() {
    let mut bytes = vec![0u8; SIZE as usize];
    blake3::Hasher::new().update(b"noise").finalize_xof().fill(&mut bytes);
    let sent = send_whole(bytes).await;
    let chunks = SIZE / u64::from(CHUNK);
    println!("random: {sent:?}");
    assert_eq!(sent.wire_bytes, SIZE, "sent raw: {sent:?}");
    assert_eq!(sent.compressed_chunks, 0, "{sent:?}");
    assert_eq!(sent.incompressible_chunks, u64::from(COMPRESSION_MISSES), "only the first chunks were tried whole");
    assert_eq!(sent.untried_chunks, chunks - u64::from(COMPRESSION_MISSES), "{sent:?}");
}

#[tokio::test]
async fn compressible_data_travels_compressed_even_after_random_data() {
    // Text-like: a short alphabet, repeated with variation.
    let text: Vec<u8> =
        (0..SIZE).map(|i| b"drover replicates disks "[(i * 7 % 24) as usize] ^ ((i / 4096) % 3) as u8).collect();
    let sent = send_whole(text.clone()).await;
    let chunks = SIZE / u64::from(CHUNK);
    println!("compressible: {sent:?}");
    assert_eq!(sent.compressed_chunks, chunks, "{sent:?}");
    assert!(sent.wire_bytes < SIZE / 4, "{sent:?}");
    // Random first, then the same text: zstd stops trying random chunks whole, and finds the
    // text again from its first chunk (its sample shrinks).
    let mut mixed = vec![0u8; SIZE as usize];
    blake3::Hasher::new().update(b"noise").finalize_xof().fill(&mut mixed);
    let half = SIZE as usize / 2;
    mixed[half..].copy_from_slice(&text[half..]);
    let sent = send_whole(mixed).await;
    println!("random then compressible: {sent:?}");
    assert_eq!(sent.compressed_chunks, chunks / 2, "{sent:?}");
    assert_eq!(sent.incompressible_chunks, u64::from(COMPRESSION_MISSES), "{sent:?}");
    assert!(sent.wire_bytes < SIZE / 2 + SIZE / 8, "{sent:?}");
}
