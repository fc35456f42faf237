//! Pipelined reads (`read_many`, `read_many_into`, `read_into` over several requests): the same
//! bytes as one-at-a-time reads on a real export (`qemu-nbd` on a qcow2 image), and the right
//! bytes from a fake server that answers out of order with interleaved chunks. A server error on
//! one of the reads in flight is reported after the others were consumed, and the connection
//! stays usable; a reply for a handle that is not pending breaks it.
//!
//! Pipelined writes (`write_many`, and `write`/`write_zeroes` over several requests): the right
//! bytes on a real export, never more than `WRITE_DEPTH` requests in flight, replies matched by
//! handle whatever their order and kind (simple or structured), a server error reported after the
//! replies in flight were consumed with nothing new sent after it, and a stray handle breaking
//! the connection.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_block::nbd::{NbdClient, NbdError, READ_DEPTH, WRITE_DEPTH, WRITE_REQUEST, WriteOp};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const DONE: u16 = 1;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Bytes that differ at every position, so a misplaced or reordered chunk cannot go unnoticed.
fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| ((offset + i).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 29) as u8).collect()
}

struct QemuNbd {
    child: Child,
    socket: PathBuf,
}

impl QemuNbd {
    fn serve(dir: &Path, image: &Path) -> QemuNbd {
        let socket = dir.join("qemu-nbd.sock");
        let child = Command::new("qemu-nbd")
            .arg(format!("--socket={}", socket.display()))
            .args(["--format=qcow2", "--export-name=disk", "--persistent", "--shared=4"])
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-nbd (scripts/install-deps installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd { child, socket }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn pipelined_reads_return_the_same_bytes_as_sequential_reads() {
    const SIZE: u64 = 48 * MIB;
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("disk.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", image.to_str().unwrap(), &SIZE.to_string()]);
    let server = QemuNbd::serve(dir.path(), &image);
    let mut client = NbdClient::connect_unix(&server.socket, "disk", &[]).await.unwrap();
    // Data with holes between: some reads come back as data and hole chunks mixed.
    for (offset, len) in [(0, 3 * MIB), (5 * MIB, 7 * MIB + 4 * KIB), (20 * MIB, 64 * KIB), (40 * MIB, 8 * MIB)] {
        client.write(offset, &pattern(offset, len as usize)).await.unwrap();
    }
    client.flush().await.unwrap();

    // Many ranges of different sizes, more than READ_DEPTH of them, some across data/hole borders.
    let ranges: Vec<(u64, u64)> = (0..2 * READ_DEPTH as u64 + 3)
        .map(|i| (i * MIB, if i % 3 == 0 { MIB } else { MIB / 2 + 4 * KIB * i }))
        .collect();
    let pipelined = client.read_many(&ranges).await.unwrap();
    assert_eq!(pipelined.len(), ranges.len());
    for (&(offset, len), got) in ranges.iter().zip(&pipelined) {
        let sequential = client.read(offset, len).await.unwrap();
        assert!(got == &sequential, "range {len} bytes at {offset} differs");
    }

    // One buffer larger than the server's maximum request goes out as several pipelined requests.
    let mut whole = vec![0xffu8; SIZE as usize];
    client.read_into(0, &mut whole).await.unwrap();
    let mut expected = Vec::with_capacity(SIZE as usize);
    for offset in (0..SIZE).step_by(MIB as usize) {
        expected.extend_from_slice(&client.read(offset, MIB).await.unwrap());
    }
    assert!(whole == expected, "read_into of the whole export differs from 1 MiB reads");
    assert_eq!(&whole[5 * MIB as usize..12 * MIB as usize], &pattern(5 * MIB, 7 * MIB as usize)[..]);

    // Out-of-range requests are refused before anything is sent; the connection survives.
    assert!(matches!(client.read_many(&[(0, MIB), (SIZE, 1)]).await, Err(NbdError::InvalidRequest(_))));
    assert!(client.read_many(&[]).await.unwrap().is_empty());
    assert_eq!(client.read(40 * MIB, 4 * KIB).await.unwrap(), pattern(40 * MIB, 4 * KIB as usize));
    client.disconnect().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Fake servers.

async fn fake_server<F, Fut>(dir: &Path, serve: F) -> PathBuf
where
    F: FnOnce(UnixStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let path = dir.join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        if let Ok((stream, _)) = listener.accept().await {
            serve(stream).await;
        }
    });
    path
}

/// The server side of a fixed newstyle handshake with structured replies, an export of `size`
/// bytes, no block size constraints.
async fn fake_handshake(s: &mut UnixStream, size: u64) {
    fake_handshake_with_flags(s, size, 1).await;
}

/// As `fake_handshake`, with these transmission flags.
async fn fake_handshake_with_flags(s: &mut UnixStream, size: u64, flags: u16) {
    s.write_u64(0x4e42_444d_4147_4943).await.unwrap();
    s.write_u64(0x4948_4156_454f_5054).await.unwrap();
    s.write_u16(0b11).await.unwrap();
    let _client_flags = s.read_u32().await.unwrap();
    loop {
        assert_eq!(s.read_u64().await.unwrap(), 0x4948_4156_454f_5054);
        let option = s.read_u32().await.unwrap();
        let len = s.read_u32().await.unwrap();
        let mut data = vec![0; len as usize];
        s.read_exact(&mut data).await.unwrap();
        let reply = |kind: u32, payload: Vec<u8>| {
            let mut m = Vec::new();
            m.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
            m.extend_from_slice(&option.to_be_bytes());
            m.extend_from_slice(&kind.to_be_bytes());
            m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
            m.extend_from_slice(&payload);
            m
        };
        match option {
            8 => s.write_all(&reply(1, vec![])).await.unwrap(),
            7 => {
                let mut info = 0u16.to_be_bytes().to_vec();
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&flags.to_be_bytes());
                s.write_all(&reply(3, info)).await.unwrap();
                s.write_all(&reply(1, vec![])).await.unwrap();
                return;
            }
            other => panic!("fake server: unexpected option {other}"),
        }
    }
}

/// Reads one request: `(command, handle, offset, length)`.
async fn fake_request(s: &mut UnixStream) -> (u16, u64, u64, u32) {
    assert_eq!(s.read_u32().await.unwrap(), 0x2560_9513);
    let _flags = s.read_u16().await.unwrap();
    let command = s.read_u16().await.unwrap();
    let handle = s.read_u64().await.unwrap();
    let offset = s.read_u64().await.unwrap();
    let len = s.read_u32().await.unwrap();
    (command, handle, offset, len)
}

async fn fake_chunk(s: &mut UnixStream, flags: u16, kind: u16, handle: u64, payload: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&0x668e_33efu32.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m).await.unwrap();
}

fn data_chunk(at: u64, data: &[u8]) -> Vec<u8> {
    let mut p = at.to_be_bytes().to_vec();
    p.extend_from_slice(data);
    p
}

/// Bytes the fake server holds at `offset`.
fn fake_data(offset: u64, len: u32) -> Vec<u8> {
    pattern(offset, len as usize)
}

#[tokio::test]
async fn out_of_order_interleaved_replies_land_in_the_right_buffers() {
    let dir = TempDir::new().unwrap();
    let path = fake_server(dir.path(), |mut s| async move {
        fake_handshake(&mut s, MIB).await;
        // Every round: take as many requests as the client keeps in flight, then answer them in
        // reverse order, each in two halves, the halves of all requests interleaved, the second
        // half first, with a hole in place of the first 512 bytes of every request.
        let mut total = 0;
        while total < 3 * READ_DEPTH {
            let mut round = Vec::new();
            for _ in 0..READ_DEPTH.min(3 * READ_DEPTH - total) {
                let (command, handle, offset, len) = fake_request(&mut s).await;
                assert_eq!(command, 0);
                round.push((handle, offset, len));
            }
            total += round.len();
            round.reverse();
            for &(handle, offset, len) in &round {
                let half = len / 2;
                fake_chunk(
                    &mut s,
                    0,
                    1,
                    handle,
                    &data_chunk(offset + u64::from(half), &fake_data(offset + u64::from(half), len - half)),
                )
                .await;
            }
            for &(handle, offset, len) in &round {
                let mut hole = offset.to_be_bytes().to_vec();
                hole.extend_from_slice(&512u32.to_be_bytes());
                fake_chunk(&mut s, 0, 2, handle, &hole).await;
                let head = offset + 512;
                let half = len / 2;
                fake_chunk(&mut s, DONE, 1, handle, &data_chunk(head, &fake_data(head, half - 512))).await;
            }
        }
        assert_eq!(fake_request(&mut s).await.0, 2);
    })
    .await;
    let mut client = NbdClient::connect_unix(&path, "disk", &[]).await.expect("connect");
    let ranges: Vec<(u64, u64)> = (0..3 * READ_DEPTH as u64).map(|i| (i * 8 * KIB, 4 * KIB + 1024 * (i % 4))).collect();
    let got = client.read_many(&ranges).await.expect("pipelined read");
    for (&(offset, len), buf) in ranges.iter().zip(&got) {
        let mut expected = fake_data(offset, len as u32);
        expected[..512].fill(0);
        assert!(buf == &expected, "range {len} bytes at {offset}");
    }
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn an_error_on_one_pipelined_read_is_reported_after_the_others_and_keeps_the_connection() {
    let dir = TempDir::new().unwrap();
    let path = fake_server(dir.path(), |mut s| async move {
        fake_handshake(&mut s, MIB).await;
        let mut requests = Vec::new();
        for _ in 0..4 {
            requests.push(fake_request(&mut s).await);
        }
        // The second request fails; the others (answered after it) succeed.
        let (_, handle, _, _) = requests[1];
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&4u16.to_be_bytes());
        p.extend_from_slice(b"oops");
        fake_chunk(&mut s, DONE, 0x8001, handle, &p).await;
        for &(_, handle, offset, len) in [requests[3], requests[0], requests[2]].iter() {
            fake_chunk(&mut s, DONE, 1, handle, &data_chunk(offset, &fake_data(offset, len))).await;
        }
        // The connection is still in step: one more read, answered normally.
        let (_, handle, offset, len) = fake_request(&mut s).await;
        fake_chunk(&mut s, DONE, 1, handle, &data_chunk(offset, &fake_data(offset, len))).await;
        // Then a read answered for a handle that was never sent.
        let (_, handle, offset, len) = fake_request(&mut s).await;
        fake_chunk(&mut s, DONE, 1, handle + 1000, &data_chunk(offset, &fake_data(offset, len))).await;
        // The client gives up on the connection; it may or may not say goodbye.
        let _ = s.read_u8().await;
    })
    .await;
    let mut client = NbdClient::connect_unix(&path, "disk", &[]).await.expect("connect");
    let ranges: Vec<(u64, u64)> = (0..4).map(|i| (i * 4 * KIB, 4 * KIB)).collect();
    match client.read_many(&ranges).await {
        Err(NbdError::Server { errno: 5, message, .. }) => assert_eq!(message, "oops"),
        other => panic!("expected EIO, got {other:?}"),
    }
    assert_eq!(client.read(64 * KIB, 4 * KIB).await.expect("the connection is usable"), fake_data(64 * KIB, 4096));
    assert!(matches!(client.read(0, 4 * KIB).await, Err(NbdError::Protocol(_))));
    assert!(matches!(client.read(0, 4 * KIB).await, Err(NbdError::ConnectionBroken)));
}

// ---------------------------------------------------------------------------------------------
// Pipelined writes.

#[tokio::test]
async fn pipelined_writes_put_the_right_bytes_on_a_real_export() {
    const SIZE: u64 = 48 * MIB;
    let dir = TempDir::new().unwrap();
    let image = dir.path().join("disk.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", image.to_str().unwrap(), &SIZE.to_string()]);
    let server = QemuNbd::serve(dir.path(), &image);
    let mut client = NbdClient::connect_unix(&server.socket, "disk", &[]).await.unwrap();
    assert!(client.can_write_zeroes());
    // Something under the zero ranges first, so zeroes must really be written.
    client.write(0, &vec![0xee; SIZE as usize]).await.unwrap();

    // Data ranges larger than one request, small ones, and zero ranges, more than WRITE_DEPTH
    // requests in all, not in offset order.
    let big = 3 * u64::from(WRITE_REQUEST) + 4 * KIB;
    let data: Vec<(u64, Vec<u8>)> = [(20 * MIB, big), (0, 64 * KIB), (MIB, 4 * KIB), (40 * MIB, 2 * MIB)]
        .iter()
        .chain((0..2 * WRITE_DEPTH as u64).map(|i| (8 * MIB + i * 128 * KIB, 64 * KIB)).collect::<Vec<_>>().iter())
        .map(|&(offset, len)| (offset, pattern(offset, len as usize)))
        .collect();
    let zeroes = [(2 * MIB, 3 * MIB), (30 * MIB, 64 * KIB)];
    let mut ops: Vec<WriteOp<'_>> = data.iter().map(|(offset, d)| WriteOp::Data { offset: *offset, data: d }).collect();
    ops.extend(zeroes.iter().map(|&(offset, len)| WriteOp::Zeroes { offset, len }));
    client.write_many(&ops).await.expect("pipelined writes");
    client.flush().await.unwrap();

    let mut expected = vec![0xeeu8; SIZE as usize];
    for (offset, d) in &data {
        expected[*offset as usize..*offset as usize + d.len()].copy_from_slice(d);
    }
    for &(offset, len) in &zeroes {
        expected[offset as usize..(offset + len) as usize].fill(0);
    }
    let back = client.read(0, SIZE).await.unwrap();
    assert!(back == expected, "what was written differs from what reads back");

    // Refused before anything is sent; the connection survives.
    let bad = [WriteOp::Data { offset: 0, data: &data[1].1 }, WriteOp::Zeroes { offset: SIZE - 512, len: 4096 }];
    assert!(matches!(client.write_many(&bad).await, Err(NbdError::InvalidRequest(_))));
    client.write_many(&[]).await.unwrap();
    assert_eq!(client.read(0, 64 * KIB).await.unwrap(), pattern(0, 64 * KIB as usize));
    client.disconnect().await.unwrap();
    drop(server);
    let check = Command::new("qemu-img").args(["check", "-q"]).arg(&image).status().unwrap();
    assert!(check.success(), "qemu-img check");
}

/// `NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_WRITE_ZEROES`.
const WRITABLE: u16 = 1 | (1 << 2) | (1 << 6);

/// A simple reply: `error` 0 for success.
async fn fake_simple_reply(s: &mut UnixStream, error: u32, handle: u64) {
    let mut m = 0x6744_6698u32.to_be_bytes().to_vec();
    m.extend_from_slice(&error.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    s.write_all(&m).await.unwrap();
}

/// Reads one request and, for a write, its payload: `(command, handle, offset, payload or length)`.
async fn fake_write_request(s: &mut UnixStream) -> (u16, u64, u64, u32, Vec<u8>) {
    let (command, handle, offset, len) = fake_request(s).await;
    let mut payload = Vec::new();
    if command == 1 {
        payload.resize(len as usize, 0);
        s.read_exact(&mut payload).await.unwrap();
    }
    (command, handle, offset, len, payload)
}

/// Whether the client sent anything more within a short while (it should not while it waits
/// for replies). Consumes what it finds, so only a failing check leaves the stream out of step.
async fn sends_more(s: &mut UnixStream) -> bool {
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut byte = [0u8; 1];
    matches!(s.try_read(&mut byte), Ok(n) if n > 0)
}

#[tokio::test]
async fn pipelined_writes_stay_within_the_depth_and_match_replies_out_of_order() {
    let dir = TempDir::new().unwrap();
    let total = 3 * WRITE_DEPTH;
    let path = fake_server(dir.path(), move |mut s| async move {
        fake_handshake_with_flags(&mut s, MIB, WRITABLE).await;
        let mut received: Vec<(u16, u64, u32, Vec<u8>)> = Vec::new();
        while received.len() < total + 1 {
            // Take what the client keeps in flight; it must then wait for replies.
            let mut round = Vec::new();
            for _ in 0..WRITE_DEPTH.min(total + 1 - received.len()) {
                round.push(fake_write_request(&mut s).await);
            }
            if received.len() + round.len() < total + 1 {
                assert!(!sends_more(&mut s).await, "more than WRITE_DEPTH requests in flight");
            }
            // Answer in reverse, alternating simple replies and structured NONE chunks.
            for (i, (_, handle, _, _, _)) in round.iter().rev().enumerate() {
                if i % 2 == 0 {
                    fake_simple_reply(&mut s, 0, *handle).await;
                } else {
                    fake_chunk(&mut s, DONE, 0, *handle, &[]).await;
                }
            }
            received.extend(round.into_iter().map(|(c, _, o, l, p)| (c, o, l, p)));
        }
        // The data went where it was meant to, once each; the zeroes as one request.
        let mut writes: Vec<_> = received.iter().filter(|r| r.0 == 1).collect();
        writes.sort_by_key(|r| r.1);
        assert_eq!(writes.len(), total);
        for (i, (_, offset, len, payload)) in writes.iter().enumerate() {
            assert_eq!((*offset, *len), (i as u64 * 8 * KIB, 4096));
            assert!(*payload == pattern(*offset, 4096), "payload of the write at {offset}");
        }
        assert!(received.iter().any(|r| (r.0, r.1, r.2) == (6, 512 * KIB, 64 * 1024)));
        assert_eq!(fake_request(&mut s).await.0, 2);
    })
    .await;
    let mut client = NbdClient::connect_unix(&path, "disk", &[]).await.expect("connect");
    let data: Vec<(u64, Vec<u8>)> = (0..total as u64).map(|i| (i * 8 * KIB, pattern(i * 8 * KIB, 4096))).collect();
    let mut ops: Vec<WriteOp<'_>> = data.iter().map(|(offset, d)| WriteOp::Data { offset: *offset, data: d }).collect();
    ops.insert(WRITE_DEPTH + 3, WriteOp::Zeroes { offset: 512 * KIB, len: 64 * KIB });
    client.write_many(&ops).await.expect("pipelined writes");
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn an_error_on_one_pipelined_write_is_reported_after_the_others_and_stops_sending() {
    let dir = TempDir::new().unwrap();
    let path = fake_server(dir.path(), |mut s| async move {
        fake_handshake_with_flags(&mut s, MIB, WRITABLE).await;
        let mut round = Vec::new();
        for _ in 0..WRITE_DEPTH {
            round.push(fake_write_request(&mut s).await);
        }
        // The third write fails with ENOSPC (an error chunk with its offset); the others succeed,
        // answered after it.
        let (_, handle, offset, _, _) = round[2];
        let mut p = 28u32.to_be_bytes().to_vec();
        p.extend_from_slice(&4u16.to_be_bytes());
        p.extend_from_slice(b"full");
        p.extend_from_slice(&offset.to_be_bytes());
        fake_chunk(&mut s, DONE, 0x8002, handle, &p).await;
        for (i, r) in round.iter().enumerate().rev() {
            if i != 2 {
                fake_simple_reply(&mut s, 0, r.1).await;
            }
        }
        // Nothing of the failed batch follows: the next request is the client's next call.
        let (command, handle, offset, len, _) = fake_write_request(&mut s).await;
        assert_eq!(
            (command, offset, len),
            (1, 900 * KIB, 4096),
            "a write of the failed batch was sent after the error"
        );
        fake_chunk(&mut s, DONE, 0, handle, &[]).await;
        // Then a reply for a handle that was never sent.
        let (_, handle, _, _, _) = fake_write_request(&mut s).await;
        fake_simple_reply(&mut s, 0, handle + 1000).await;
        let _ = s.read_u8().await;
    })
    .await;
    let mut client = NbdClient::connect_unix(&path, "disk", &[]).await.expect("connect");
    let data: Vec<(u64, Vec<u8>)> =
        (0..2 * WRITE_DEPTH as u64).map(|i| (i * 8 * KIB, pattern(i * 8 * KIB, 4096))).collect();
    let ops: Vec<WriteOp<'_>> = data.iter().map(|(offset, d)| WriteOp::Data { offset: *offset, data: d }).collect();
    match client.write_many(&ops).await {
        Err(NbdError::Server { command: "NBD_CMD_WRITE", errno: 28, message, offset, .. }) => {
            assert_eq!(message, "full");
            assert_eq!(offset, Some(16 * KIB));
        }
        other => panic!("expected ENOSPC, got {other:?}"),
    }
    client.write(900 * KIB, &pattern(900 * KIB, 4096)).await.expect("the connection is usable");
    assert!(matches!(client.write(0, &[1; 4096]).await, Err(NbdError::Protocol(_))));
    assert!(matches!(client.write(0, &[1; 4096]).await, Err(NbdError::ConnectionBroken)));
}
