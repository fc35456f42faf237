//! The NBD client against real servers (`qemu-nbd`, `qemu-storage-daemon`) and against small
//! fake servers that break the protocol on purpose.
//!
//! Needs `qemu-img`, `qemu-io`, `qemu-nbd`, `qemu-storage-daemon` (Debian `qemu-utils`) and
//! `nbdinfo` (`libnbd-bin`), all installed by `scripts/install-deps`. A missing tool is a
//! failure, not a skip. Every server runs on a Unix socket in a temporary directory and is
//! stopped by a guard, also when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_block::extents::{Extent, ExtentSet};
use drover_block::nbd::{NbdClient, NbdError, STATE_DIRTY};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const GRANULE: u64 = 64 * KIB;

// ---------------------------------------------------------------------------------------------
// Helpers: images, servers, the byte pattern.

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/install-deps installs it): {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn create_qcow2(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    run("qemu-img", &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), &size.to_string()]);
    path
}

/// Writes through `qemu-io` directly into the image (no server running on it).
fn qemu_io_write(image: &Path, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("write -P {pattern:#x} {offset} {len}");
    run("qemu-io", &["-f", "qcow2", "-c", &cmd, image.to_str().unwrap()]);
}

/// Checks through `qemu-io` that `len` bytes at `offset` all equal `pattern`.
fn qemu_io_verify(image: &Path, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("read -P {pattern:#x} {offset} {len}");
    let out = run("qemu-io", &["-f", "qcow2", "-r", "-c", &cmd, image.to_str().unwrap()]);
    assert!(!out.contains("Pattern verification failed"), "qemu-io sees other bytes at {offset}+{len}: {out}");
    assert!(out.contains(&format!("read {len}/{len} bytes")), "qemu-io read: {out}");
}

/// A server process, stopped (SIGTERM, then SIGKILL) when dropped.
struct Server {
    child: Child,
    socket: PathBuf,
}

impl Server {
    fn start(program: &str, args: &[String], socket: PathBuf, log: PathBuf) -> Server {
        let log_file = std::fs::File::create(&log).expect("server log");
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} (scripts/install-deps installs it): {e}"));
        let mut server = Server { child, socket };
        let deadline = Instant::now() + Duration::from_secs(10);
        // The socket file appears at bind(); connecting proves listen() happened too.
        while std::os::unix::net::UnixStream::connect(&server.socket).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{program} exited with {status}: {}", std::fs::read_to_string(&log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "{program} did not listen on {:?} in 10 s", server.socket);
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// `qemu-nbd` serving `image` as export `disk`, many clients allowed one after another.
    fn qemu_nbd(dir: &Path, image: &Path, extra: &[&str]) -> Server {
        let socket = dir.join("qemu-nbd.sock");
        let mut args: Vec<String> = vec![
            format!("--socket={}", socket.display()),
            "--format=qcow2".into(),
            "--export-name=disk".into(),
            "--persistent".into(),
            "--shared=4".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(image.display().to_string());
        Server::start("qemu-nbd", &args, socket, dir.join("qemu-nbd.log"))
    }

    /// `qemu-storage-daemon` serving `image` writable as export `disk`.
    fn storage_daemon(dir: &Path, image: &Path) -> Server {
        let socket = dir.join("qsd.sock");
        let args: Vec<String> = vec![
            "--blockdev".into(),
            format!("driver=file,filename={},node-name=file0", image.display()),
            "--blockdev".into(),
            "driver=qcow2,file=file0,node-name=disk0".into(),
            "--nbd-server".into(),
            format!("addr.type=unix,addr.path={}", socket.display()),
            "--export".into(),
            "type=nbd,id=export0,node-name=disk0,name=disk,writable=on".into(),
        ];
        Server::start("qemu-storage-daemon", &args, socket, dir.join("qsd.log"))
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.socket.display())
    }

    /// Stops the server and waits for it, so the image lock is released.
    fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SIGTERM lets QEMU close the image cleanly (qcow2 metadata, bitmaps).
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Bytes that differ at every position and from one call to the next (by `seed`), so a
/// misplaced or reordered chunk cannot go unnoticed.
fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| {
            let x = (offset + i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.wrapping_mul(0xff51_afd7_ed55_8ccd);
            (x >> 29) as u8
        })
        .collect()
}

/// `nbdinfo --map=CONTEXT` parsed into `(offset, length, flags)`.
fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let out = run("nbdinfo", &[&format!("--map={context}"), uri]);
    out.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let offset = fields.next()?.parse().ok()?;
            let len = fields.next()?.parse().ok()?;
            let flags = fields.next()?.parse().ok()?;
            Some((offset, len, flags))
        })
        .collect()
}

fn set_of(ranges: &[(u64, u64)]) -> ExtentSet {
    ranges.iter().map(|&(offset, len)| Extent::new(offset, len)).collect()
}

// ---------------------------------------------------------------------------------------------
// Against real QEMU servers.

#[tokio::test]
async fn write_flush_reconnect_and_read_back_through_qemu_storage_daemon() {
    let dir = TempDir::new().unwrap();
    let image = create_qcow2(dir.path(), "disk.qcow2", 64 * MIB);
    let server = Server::storage_daemon(dir.path(), &image);

    let mut client = NbdClient::connect_unix(&server.socket, "disk", &[]).await.expect("connect");
    assert_eq!(client.size(), 64 * MIB);
    assert!(!client.is_read_only());
    assert!(client.structured_replies());
    assert!(client.can_flush());

    // Aligned and unaligned writes, one across a cluster boundary.
    let writes: [(u64, usize); 4] = [(0, 4096), (12_345, 1000), (GRANULE - 512, 4096), (63 * MIB, MIB as usize)];
    for (i, &(offset, len)) in writes.iter().enumerate() {
        client.write(offset, &pattern(i as u64, offset, len)).await.expect("write");
    }
    for (i, &(offset, len)) in writes.iter().enumerate() {
        assert_eq!(client.read(offset, len as u64).await.expect("read"), pattern(i as u64, offset, len));
    }
    // Unwritten space reads as zeroes (served as holes).
    assert_eq!(client.read(8 * MIB, MIB).await.unwrap(), vec![0; MIB as usize]);

    // Whole-byte patterns that qemu-io can check after the server is gone.
    client.write(2 * MIB, &vec![0xab; 128 * KIB as usize]).await.unwrap();
    client.write(5 * MIB + 4096, &vec![0xcd; 8192]).await.unwrap();
    if client.can_write_zeroes() {
        client.write_zeroes(2 * MIB + 64 * KIB, 32 * KIB).await.expect("write zeroes");
    } else {
        panic!("qemu-storage-daemon offers NBD_CMD_WRITE_ZEROES; the flag was not parsed");
    }
    client.flush().await.expect("flush");
    client.disconnect().await.expect("disconnect");

    // A new connection sees the same bytes.
    let mut client = NbdClient::connect_unix(&server.socket, "disk", &[]).await.expect("reconnect");
    for (i, &(offset, len)) in writes.iter().enumerate() {
        assert_eq!(client.read(offset, len as u64).await.unwrap(), pattern(i as u64, offset, len));
    }
    let zeroed = client.read(2 * MIB, 128 * KIB).await.unwrap();
    assert!(zeroed[..64 * KIB as usize].iter().all(|&b| b == 0xab));
    assert!(zeroed[64 * KIB as usize..96 * KIB as usize].iter().all(|&b| b == 0));
    assert!(zeroed[96 * KIB as usize..].iter().all(|&b| b == 0xab));
    client.disconnect().await.unwrap();
    server.stop();

    // And so does QEMU reading the file directly.
    qemu_io_verify(&image, 0xab, 2 * MIB, 64 * KIB);
    qemu_io_verify(&image, 0x00, 2 * MIB + 64 * KIB, 32 * KIB);
    qemu_io_verify(&image, 0xab, 2 * MIB + 96 * KIB, 32 * KIB);
    qemu_io_verify(&image, 0xcd, 5 * MIB + 4096, 8192);
    qemu_io_verify(&image, 0x00, 5 * MIB, 4096);
    run("qemu-img", &["check", "-q", image.to_str().unwrap()]);
}

#[tokio::test]
async fn large_reads_and_writes_are_split_by_the_block_size_limit() {
    let dir = TempDir::new().unwrap();
    let image = create_qcow2(dir.path(), "disk.qcow2", 96 * MIB);
    qemu_io_write(&image, 0x11, 0, MIB);
    qemu_io_write(&image, 0x22, 40 * MIB, MIB);
    qemu_io_write(&image, 0x33, 95 * MIB, MIB);
    let server = Server::qemu_nbd(dir.path(), &image, &[]);
    let mut client = NbdClient::connect_unix(&server.socket, "disk", &[]).await.expect("connect");
    // QEMU advertises 32 MiB; a 64 MiB read needs at least three requests from offset 31 MiB.
    assert_eq!(client.block_size().maximum, 32 * MIB as u32);
    assert_eq!(client.max_io_size(), 32 * MIB as u32);

    let whole = client.read(0, 96 * MIB).await.expect("read all");
    let expect_at = |offset: u64, value: u8| {
        assert!(whole[offset as usize..(offset + MIB) as usize].iter().all(|&b| b == value), "at {offset}");
    };
    expect_at(0, 0x11);
    expect_at(40 * MIB, 0x22);
    expect_at(95 * MIB, 0x33);
    assert!(whole[MIB as usize..40 * MIB as usize].iter().all(|&b| b == 0));

    let mut buf = vec![0xff; 64 * MIB as usize];
    client.read_into(31 * MIB, &mut buf).await.expect("read 64 MiB");
    assert_eq!(buf[..], whole[31 * MIB as usize..95 * MIB as usize]);

    // A 40 MiB write goes out as two requests and reads back intact.
    let data = pattern(7, 50 * MIB, 40 * MIB as usize);
    client.write(50 * MIB, &data).await.expect("write 40 MiB");
    assert_eq!(client.read(50 * MIB, 40 * MIB).await.unwrap(), data);
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn out_of_range_requests_are_refused_and_the_connection_survives() {
    let dir = TempDir::new().unwrap();
    let image = create_qcow2(dir.path(), "disk.qcow2", 4 * MIB);
    let server = Server::qemu_nbd(dir.path(), &image, &[]);
    let mut client = NbdClient::connect_unix(&server.socket, "disk", &["base:allocation"]).await.expect("connect");
    let size = client.size();

    for result in [
        client.read(size - 512, 1024).await.map(drop),
        client.read(size, 1).await.map(drop),
        client.read(u64::MAX - 10, 100).await.map(drop),
        client.write(size - 1, &[1, 2]).await,
        client.block_status("base:allocation", size - 4096, 8192).await.map(drop),
    ] {
        assert!(matches!(result, Err(NbdError::InvalidRequest(_))), "{result:?}");
    }
    let unknown = client.block_status("qemu:dirty-bitmap:nope", 0, 4096).await;
    assert!(matches!(unknown, Err(NbdError::InvalidRequest(_))), "{unknown:?}");

    // Reading up to the very end is fine, and the connection was never disturbed.
    assert_eq!(client.read(size - 512, 512).await.unwrap(), vec![0; 512]);
    client.disconnect().await.unwrap();

    // A missing export is reported as such.
    let missing = NbdClient::connect_unix(&server.socket, "no-such-export", &[]).await;
    assert!(matches!(missing, Err(NbdError::ExportNotFound(ref name)) if name == "no-such-export"), "{missing:?}");
}

#[tokio::test]
async fn read_only_export_refuses_writes_before_sending() {
    let dir = TempDir::new().unwrap();
    let image = create_qcow2(dir.path(), "disk.qcow2", 4 * MIB);
    let server = Server::qemu_nbd(dir.path(), &image, &["--read-only"]);
    let mut client = NbdClient::connect_unix(&server.socket, "disk", &[]).await.expect("connect");
    assert!(client.is_read_only());
    assert!(matches!(client.write(0, &[0; 512]).await, Err(NbdError::ReadOnly)));
    assert!(client.read(0, 4096).await.is_ok());
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn dirty_bitmap_extents_are_the_written_granules() {
    let dir = TempDir::new().unwrap();
    let size = 64 * MIB;
    let image = create_qcow2(dir.path(), "disk.qcow2", size);
    run("qemu-img", &["bitmap", "--add", image.to_str().unwrap(), "bm1"]);
    // Scattered 4 KiB writes: two in one granule, one straddling two granules, one in the last.
    let writes =
        [(0, 4 * KIB), (8 * KIB, 4 * KIB), (MIB, 4 * KIB), (10 * MIB + 62 * KIB, 4 * KIB), (size - 4 * KIB, 4 * KIB)];
    for &(offset, len) in &writes {
        qemu_io_write(&image, 0xab, offset, len);
    }
    let expected = set_of(&writes).align_out(GRANULE);
    assert_eq!(
        expected.iter().collect::<Vec<_>>(),
        vec![
            Extent::new(0, GRANULE),
            Extent::new(MIB, GRANULE),
            Extent::new(10 * MIB, 2 * GRANULE),
            Extent::new(size - GRANULE, GRANULE)
        ]
    );

    let server = Server::qemu_nbd(dir.path(), &image, &["--bitmap=bm1"]);
    let context = "qemu:dirty-bitmap:bm1";
    let mut client =
        NbdClient::connect_unix(&server.socket, "disk", &[context, "base:allocation"]).await.expect("connect");
    let names: Vec<&str> = client.meta_contexts().iter().map(|c| c.name.as_str()).collect();
    assert!(names.contains(&context) && names.contains(&"base:allocation"), "{names:?}");

    // The status covers the whole disk, contiguously, in absolute offsets.
    let status = client.block_status(context, 0, size).await.expect("block status");
    assert_eq!(status.first().map(|e| e.offset), Some(0));
    for pair in status.windows(2) {
        assert_eq!(pair[0].offset + pair[0].len, pair[1].offset);
    }
    assert_eq!(status.iter().map(|e| e.len).sum::<u64>(), size);

    let dirty = client.dirty_extents(context, 0, size).await.expect("dirty extents");
    assert_eq!(dirty, expected);
    assert_eq!(dirty.total_bytes(), 5 * GRANULE);

    // nbdinfo (libnbd) reads the same bitmap the same way.
    let from_nbdinfo: ExtentSet = nbdinfo_map(&server.uri(), context)
        .into_iter()
        .filter(|&(_, _, flags)| flags & STATE_DIRTY != 0)
        .map(|(offset, len, _)| Extent::new(offset, len))
        .collect();
    assert_eq!(from_nbdinfo, dirty);

    // A query of a sub-range is clipped to it.
    let part = client.dirty_extents(context, 10 * MIB + 32 * KIB, 64 * KIB).await.unwrap();
    assert_eq!(part, ExtentSet::from_range(10 * MIB + 32 * KIB, 64 * KIB));

    // The bitmap is live while the export is writable: a write through NBD dirties its granule.
    client.write(30 * MIB + 4 * KIB, &[0x5a; 4096]).await.unwrap();
    let after = client.dirty_extents(context, 0, size).await.unwrap();
    assert_eq!(after, expected.union(&ExtentSet::from_range(30 * MIB, GRANULE)));
    client.disconnect().await.unwrap();

    // A bitmap that is not exported is refused at connect time, not read as "all clean".
    let missing = NbdClient::connect_unix(&server.socket, "disk", &["qemu:dirty-bitmap:bm2"]).await;
    assert!(matches!(missing, Err(NbdError::MetaContextUnavailable(ref name)) if name.ends_with("bm2")), "{missing:?}");
}

#[tokio::test]
async fn base_allocation_reports_what_was_written() {
    let dir = TempDir::new().unwrap();
    let size = 32 * MIB;
    let image = create_qcow2(dir.path(), "disk.qcow2", size);
    let writes = [(0, 4 * KIB), (MIB, 8 * KIB), (5 * MIB, 68 * KIB), (size - GRANULE, GRANULE)];
    for &(offset, len) in &writes {
        qemu_io_write(&image, 0x77, offset, len);
    }
    let server = Server::qemu_nbd(dir.path(), &image, &["--read-only"]);
    let mut client = NbdClient::connect_unix(&server.socket, "disk", &["base:allocation"]).await.expect("connect");

    // qcow2 allocates whole 64 KiB clusters.
    let written = set_of(&writes);
    let allocated = client.allocated_extents(0, size).await.expect("allocated");
    assert_eq!(allocated, written.align_out(GRANULE));
    // The data ranges hold every written byte and lie within the allocated clusters (how much
    // of a cluster's unwritten tail reads as "zero" depends on the host file system).
    let data = client.data_extents(0, size).await.expect("data");
    assert_eq!(data.intersect(&written), written);
    assert_eq!(data.subtract(&allocated), ExtentSet::new());

    // Exactly what libnbd reports.
    let map = nbdinfo_map(&server.uri(), "base:allocation");
    let status = client.block_status("base:allocation", 0, size).await.unwrap();
    let ours: Vec<(u64, u64, u32)> = status.iter().map(|e| (e.offset, e.len, e.flags)).collect();
    assert_eq!(ours, map);
    client.disconnect().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// Against fake servers that misbehave.

/// Spawns a one-connection fake server; `serve` gets the accepted stream.
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

/// The server side of a fixed newstyle handshake that grants structured replies, the given
/// contexts (ids as given) and an export of `size` bytes with `flags`.
async fn fake_handshake(s: &mut UnixStream, size: u64, flags: u16, contexts: &[(u32, &str)]) {
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
            10 => {
                for &(id, name) in contexts {
                    let mut p = id.to_be_bytes().to_vec();
                    p.extend_from_slice(name.as_bytes());
                    s.write_all(&reply(4, p)).await.unwrap();
                }
                s.write_all(&reply(1, vec![])).await.unwrap();
            }
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

const DONE: u16 = 1;

#[tokio::test]
async fn bad_greeting_magic_is_a_protocol_error() {
    let dir = TempDir::new().unwrap();
    let path = fake_server(dir.path(), |mut s| async move {
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
    })
    .await;
    let result = NbdClient::connect_unix(&path, "disk", &[]).await;
    assert!(matches!(result, Err(NbdError::Protocol(_))), "{result:?}");
}

#[tokio::test]
async fn oldstyle_and_truncated_greetings_are_refused() {
    let dir = TempDir::new().unwrap();
    let path = fake_server(dir.path(), |mut s| async move {
        let _ = s.write_u64(0x4e42_444d_4147_4943).await;
        let _ = s.write_u64(0x0000_4202_8186_1253).await;
    })
    .await;
    let result = NbdClient::connect_unix(&path, "disk", &[]).await;
    assert!(matches!(result, Err(NbdError::Unsupported(_))), "{result:?}");

    let dir = TempDir::new().unwrap();
    let path = fake_server(dir.path(), |mut s| async move {
        let _ = s.write_all(&0x4e42_444d_4147_4943u64.to_be_bytes()[..5]).await;
    })
    .await;
    let result = NbdClient::connect_unix(&path, "disk", &[]).await;
    assert!(matches!(result, Err(NbdError::Io(_))), "{result:?}");
}

#[tokio::test]
async fn oversized_option_reply_is_refused_without_allocating_it() {
    let dir = TempDir::new().unwrap();
    let path = fake_server(dir.path(), |mut s| async move {
        s.write_u64(0x4e42_444d_4147_4943).await.unwrap();
        s.write_u64(0x4948_4156_454f_5054).await.unwrap();
        s.write_u16(0b11).await.unwrap();
        let mut request = [0u8; 4 + 16];
        s.read_exact(&mut request).await.unwrap();
        // A reply to NBD_OPT_STRUCTURED_REPLY claiming 4 GiB of data.
        let mut m = 0x0003_e889_0455_65a9u64.to_be_bytes().to_vec();
        m.extend_from_slice(&8u32.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&u32::MAX.to_be_bytes());
        let _ = s.write_all(&m).await;
    })
    .await;
    let result = NbdClient::connect_unix(&path, "disk", &[]).await;
    assert!(matches!(result, Err(NbdError::Protocol(_))), "{result:?}");
}

#[tokio::test]
async fn server_error_chunk_is_reported_and_the_connection_stays_usable() {
    let dir = TempDir::new().unwrap();
    let path = fake_server(dir.path(), |mut s| async move {
        fake_handshake(&mut s, MIB, 1, &[]).await;
        // First read: an EIO error chunk with a message.
        let (command, handle, _, _) = fake_request(&mut s).await;
        assert_eq!(command, 0);
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&(12u16).to_be_bytes());
        p.extend_from_slice(b"disk on fire");
        fake_chunk(&mut s, DONE, 0x8001, handle, &p).await;
        // Second read: data in two chunks out of order, with a hole between, then NONE.
        let (_, handle, offset, len) = fake_request(&mut s).await;
        assert_eq!(len, 3 * 512);
        let mut tail = (offset + 1024).to_be_bytes().to_vec();
        tail.extend_from_slice(&[0xbb; 512]);
        fake_chunk(&mut s, 0, 1, handle, &tail).await;
        let mut head = offset.to_be_bytes().to_vec();
        head.extend_from_slice(&[0xaa; 512]);
        fake_chunk(&mut s, 0, 1, handle, &head).await;
        let mut hole = (offset + 512).to_be_bytes().to_vec();
        hole.extend_from_slice(&512u32.to_be_bytes());
        fake_chunk(&mut s, 0, 2, handle, &hole).await;
        fake_chunk(&mut s, DONE, 0, handle, &[]).await;
        // Then NBD_CMD_DISC.
        assert_eq!(fake_request(&mut s).await.0, 2);
    })
    .await;
    let mut client = NbdClient::connect_unix(&path, "disk", &[]).await.expect("connect");
    match client.read(0, 512).await {
        Err(NbdError::Server { errno: 5, errno_name: "EIO", message, .. }) => assert_eq!(message, "disk on fire"),
        other => panic!("expected EIO, got {other:?}"),
    }
    // Poison the buffer: the hole must be written as zeroes, not left alone.
    let mut buf = vec![0xff; 1536];
    client.read_into(4096, &mut buf).await.expect("second read");
    assert!(buf[..512].iter().all(|&b| b == 0xaa));
    assert!(buf[512..1024].iter().all(|&b| b == 0));
    assert!(buf[1024..].iter().all(|&b| b == 0xbb));
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn chunk_outside_the_request_breaks_the_connection() {
    let dir = TempDir::new().unwrap();
    let path = fake_server(dir.path(), |mut s| async move {
        fake_handshake(&mut s, MIB, 1, &[]).await;
        let (_, handle, offset, _) = fake_request(&mut s).await;
        // Data for bytes after the requested range: a buffer overflow if trusted.
        let mut p = (offset + 4096).to_be_bytes().to_vec();
        p.extend_from_slice(&[0xee; 4096]);
        fake_chunk(&mut s, DONE, 1, handle, &p).await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    })
    .await;
    let mut client = NbdClient::connect_unix(&path, "disk", &[]).await.expect("connect");
    let result = client.read(0, 4096).await;
    assert!(matches!(result, Err(NbdError::Protocol(_))), "{result:?}");
    // The stream is out of step now; every later call says so instead of misreading it.
    let again = client.read(0, 4096).await;
    assert!(matches!(again, Err(NbdError::ConnectionBroken)), "{again:?}");
}

#[tokio::test]
async fn short_and_overlong_block_status_answers_are_stitched_and_clipped() {
    let dir = TempDir::new().unwrap();
    let path = fake_server(dir.path(), |mut s| async move {
        fake_handshake(&mut s, MIB, 1, &[(7, "base:allocation"), (9, "qemu:dirty-bitmap:bm1")]).await;
        let mut requests = 0;
        loop {
            let (command, handle, offset, len) = fake_request(&mut s).await;
            if command == 2 {
                break;
            }
            assert_eq!(command, 7);
            requests += 1;
            // Answer for both contexts; for the bitmap only 16 KiB at a time, alternating dirty
            // and clean, and the last descriptor may run past the request.
            let mut other = 7u32.to_be_bytes().to_vec();
            other.extend_from_slice(&len.to_be_bytes());
            other.extend_from_slice(&0u32.to_be_bytes());
            fake_chunk(&mut s, 0, 5, handle, &other).await;
            let dirty = u32::from((offset / (16 * KIB)).is_multiple_of(2));
            let mut ours = 9u32.to_be_bytes().to_vec();
            ours.extend_from_slice(&(16 * KIB as u32).to_be_bytes());
            ours.extend_from_slice(&dirty.to_be_bytes());
            fake_chunk(&mut s, DONE, 5, handle, &ours).await;
            assert!(requests < 100, "client does not make progress");
        }
    })
    .await;
    let mut client =
        NbdClient::connect_unix(&path, "disk", &["base:allocation", "qemu:dirty-bitmap:bm1"]).await.expect("connect");
    // 4 KiB .. 68 KiB: answers come 16 KiB at a time from wherever the client asks.
    let status = client.block_status("qemu:dirty-bitmap:bm1", 4 * KIB, 64 * KIB).await.expect("block status");
    assert_eq!(status.iter().map(|e| e.len).sum::<u64>(), 64 * KIB);
    assert_eq!(status.first().map(|e| e.offset), Some(4 * KIB));
    let dirty = client.dirty_extents("qemu:dirty-bitmap:bm1", 0, 64 * KIB).await.unwrap();
    assert_eq!(dirty, set_of(&[(0, 16 * KIB), (32 * KIB, 16 * KIB)]));
    client.disconnect().await.unwrap();
}

#[tokio::test]
async fn block_status_with_zero_length_descriptor_is_a_protocol_error() {
    let dir = TempDir::new().unwrap();
    let path = fake_server(dir.path(), |mut s| async move {
        fake_handshake(&mut s, MIB, 1, &[(1, "base:allocation")]).await;
        let (_, handle, _, _) = fake_request(&mut s).await;
        let mut p = 1u32.to_be_bytes().to_vec();
        p.extend_from_slice(&0u32.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        fake_chunk(&mut s, DONE, 5, handle, &p).await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    })
    .await;
    let mut client = NbdClient::connect_unix(&path, "disk", &["base:allocation"]).await.expect("connect");
    let result = client.block_status("base:allocation", 0, MIB).await;
    assert!(matches!(result, Err(NbdError::Protocol(_))), "{result:?}");
}

#[tokio::test]
async fn write_errors_keep_the_connection_but_a_stray_handle_breaks_it() {
    let dir = TempDir::new().unwrap();
    let path = fake_server(dir.path(), |mut s| async move {
        // Only NBD_FLAG_HAS_FLAGS: no flush, no write zeroes.
        fake_handshake(&mut s, MIB, 1, &[]).await;
        // First write: a simple reply with ENOSPC.
        let (command, handle, _, len) = fake_request(&mut s).await;
        assert_eq!((command, len), (1, 512));
        let mut payload = vec![0; len as usize];
        s.read_exact(&mut payload).await.unwrap();
        let mut m = 0x6744_6698u32.to_be_bytes().to_vec();
        m.extend_from_slice(&28u32.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        s.write_all(&m).await.unwrap();
        // Second write: an error chunk with an offset.
        let (_, handle, offset, len) = fake_request(&mut s).await;
        let mut payload = vec![0; len as usize];
        s.read_exact(&mut payload).await.unwrap();
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&3u16.to_be_bytes());
        p.extend_from_slice(b"bad");
        p.extend_from_slice(&(offset + 512).to_be_bytes());
        fake_chunk(&mut s, DONE, 0x8002, handle, &p).await;
        // Third write: a reply for a handle that was never sent.
        let (_, handle, _, len) = fake_request(&mut s).await;
        let mut payload = vec![0; len as usize];
        s.read_exact(&mut payload).await.unwrap();
        fake_chunk(&mut s, DONE, 0, handle + 1000, &[]).await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    })
    .await;
    let mut client = NbdClient::connect_unix(&path, "disk", &[]).await.expect("connect");
    assert!(!client.can_flush() && !client.can_write_zeroes());
    // Nothing is sent for these: the server would see them as the first write otherwise.
    assert!(matches!(client.write_zeroes(0, 4096).await, Err(NbdError::Unsupported(_))));
    client.flush().await.expect("flush without server support is a no-op");

    let first = client.write(0, &[1; 512]).await;
    assert!(matches!(first, Err(NbdError::Server { errno: 28, errno_name: "ENOSPC", .. })), "{first:?}");
    let second = client.write(4096, &[2; 1024]).await;
    assert!(
        matches!(second, Err(NbdError::Server { errno: 5, offset: Some(4608), ref message, .. }) if message == "bad"),
        "{second:?}"
    );
    let third = client.write(8192, &[3; 512]).await;
    assert!(matches!(third, Err(NbdError::Protocol(_))), "{third:?}");
    assert!(matches!(client.read(0, 512).await, Err(NbdError::ConnectionBroken)));
}
