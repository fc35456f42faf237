//! The agent-to-agent data path: two LocalAgents in one process, each with its own datastore and
//! work directory, a source agent serving its cuts on 127.0.0.1 and a DR agent pulling them into
//! restore points, on real qcow2 images and storage daemons (the simulated hypervisor only stands
//! in for VM control: the disks are powered off, so cuts are offline, with QEMU's tools).
//!
//! Run: `cargo test -p drover-agent --test peer -- --nocapture` (the figures are printed).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_agent::LocalAgent;
use drover_agent::peer::{DataListener, PEER_CHUNK, PeerRetry, PeerStreams};
use drover_agent_api::*;
use drover_block::hash::{BLOCK_SIZE, Manifest};
use drover_hv::sim::SimulatedHypervisor;
use drover_pki::{
    AgentIdentity, ControlPlaneCa, EnrolmentToken, PresentedToken, agent_dns_name, client_config,
    server_config_requiring_client_cert,
};
use drover_types::HostId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

const DISK: u64 = 64 << 20;
/// The source disk's random (incompressible) data, from offset 0.
const DATA: u64 = 48 << 20;

fn qemu_io(image: &Path, cmd: &str) {
    let out = Command::new("qemu-io").args(["-f", "qcow2", "-c", cmd]).arg(image).output().unwrap();
    assert!(out.status.success(), "qemu-io {cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Writes `len` random bytes (seeded) into `image` at `offset`, as a guest would.
fn guest_write(image: &Path, offset: u64, len: u64, seed: &str) {
    let file = image.with_extension(format!("{seed}.bin"));
    let mut bytes = vec![0u8; len as usize];
    blake3::Hasher::new().update(seed.as_bytes()).finalize_xof().fill(&mut bytes);
    std::fs::write(&file, &bytes).unwrap();
    qemu_io(image, &format!("write -s {} {offset} {len}", file.display()));
    std::fs::remove_file(&file).unwrap();
}

/// An agent with its own directory and one datastore.
struct Site {
    _dir: tempfile::TempDir,
    work: PathBuf,
    root: PathBuf,
    ds: Uuid,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let (work, root) = (dir.path().join("work"), dir.path().join("ds"));
        std::fs::create_dir_all(&root).unwrap();
        Site { _dir: dir, work, root, ds: Uuid::new_v4() }
    }

    async fn agent(&self, configure: impl FnOnce(LocalAgent) -> LocalAgent) -> LocalAgent {
        let agent = configure(LocalAgent::new(Arc::new(SimulatedHypervisor::new()), &self.work));
        let spec = DatastoreSpec { id: self.ds, path: self.root.to_string_lossy().into_owned() };
        agent.datastore_ensure(&spec).await.unwrap();
        agent
    }
}

/// The production side: a VM disk of 64 MiB with 48 MiB of random data.
struct Source {
    site: Site,
    disk: DiskRef,
    image: PathBuf,
}

impl Source {
    async fn new() -> Source {
        Source::with_data(DATA).await
    }

    /// A source disk of 64 MiB with `data` bytes of random data from offset 0.
    async fn with_data(data: u64) -> Source {
        let site = Site::new();
        let vm = Uuid::new_v4();
        let image = site.root.join(vm.to_string()).join("sda.qcow2");
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        drover_qemu::image::create_qcow2(&image, DISK).await.unwrap();
        guest_write(&image, 0, data, "seed");
        let disk = DiskRef { datastore: site.ds, vm, disk: "sda".into(), index: 0 };
        Source { site, disk, image }
    }

    fn cut_spec(&self, id: &str, current: &str, next: &str, fresh: bool) -> CutSpec {
        CutSpec {
            id: id.into(),
            disk: self.disk.clone(),
            live: false,
            current: current.into(),
            next: next.into(),
            remove: vec![],
            fresh,
            file: None,
            reader: Some(DR_HOST),
        }
    }
}

/// The host of the DR agent that pulls the cuts (the one [`Pki`] enrols as `dr`).
const DR_HOST: Uuid = Uuid::from_u128(0xd7d7_0000_0000_4000_8000_0000_0000_0001);

/// The DR side: a chain of restore points.
struct Dr {
    site: Site,
    chain: ChainRef,
}

impl Dr {
    fn new() -> Dr {
        let site = Site::new();
        let chain = ChainRef { datastore: site.ds, replica: Uuid::new_v4(), disk: "sda".into() };
        Dr { site, chain }
    }
}

async fn serve(agent: &LocalAgent, tls: Option<rustls::ServerConfig>, name: &str) -> DataListener {
    let bind: SocketAddr = "127.0.0.1:0".parse().unwrap();
    agent.serve_data(bind, None, name.to_string(), tls).await.unwrap()
}

fn transfer_spec(
    id: &str,
    cut: &Cut,
    mode: TransferMode,
    target: &PointFile,
    prev: Option<&PointFile>,
) -> TransferSpec {
    TransferSpec {
        id: id.into(),
        source: cut.source.clone(),
        source_files: None,
        mode,
        target: target.clone(),
        target_disk: None,
        prev: prev.cloned(),
        size: cut.size,
        bandwidth_limit: None,
    }
}

/// Runs a transfer to its end (at most 180 s).
async fn run(agent: &LocalAgent, spec: &TransferSpec) -> TransferStatus {
    run_watching(agent, spec).await.0
}

/// [`run`], with the progress (done, total) seen while it ran, which never goes backwards.
async fn run_watching(agent: &LocalAgent, spec: &TransferSpec) -> (TransferStatus, Vec<(u64, u64)>) {
    agent.transfer_ensure(spec).await.unwrap();
    let mut seen: Vec<(u64, u64)> = Vec::new();
    for _ in 0..3600 {
        let s = agent.transfer_status(&spec.id).await.unwrap();
        if s.state != TransferState::Running {
            return (s, seen);
        }
        assert!(s.bytes_done <= s.bytes_total, "{s:?}");
        if let Some(&(done, _)) = seen.last() {
            assert!(s.bytes_done >= done, "progress went back: {seen:?} then {s:?}");
        }
        seen.push((s.bytes_done, s.bytes_total));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("transfer {} did not end in 180 s (progress {seen:?})", spec.id);
}

fn outcome(s: &TransferStatus) -> TransferOutcome {
    assert_eq!(s.state, TransferState::Done, "{:?}", s.error);
    s.outcome.clone().unwrap()
}

/// The point holds what the source holds, and its manifest describes it block by block.
async fn assert_point_is(source: &Path, point: &PointFile) {
    let point = Path::new(&point.0);
    assert!(drover_qemu::image::compare(source, point).await.unwrap(), "the point differs from the source");
    let raw = point.with_extension("check.raw");
    let out = Command::new("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(point).arg(&raw).output();
    assert!(out.unwrap().status.success());
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(&raw).unwrap();
    let mut expected = Manifest::zeroed(bytes.len() as u64);
    expected.set_range(0, &bytes).unwrap();
    let saved = Manifest::load(&drover_block::chain::manifest_path(point)).await.unwrap();
    assert_eq!(saved.digest(), expected.digest(), "the manifest does not describe the point");
}

// ------------------------------------------------------------------------------------------------
// Identities

fn enrol(ca: &ControlPlaneCa, agent_dir: &Path) -> AgentIdentity {
    enrol_as(ca, agent_dir, HostId::new())
}

fn enrol_as(ca: &ControlPlaneCa, agent_dir: &Path, host_id: HostId) -> AgentIdentity {
    let token = EnrolmentToken::new(host_id, Duration::from_secs(600), &ca.fingerprint());
    let mut record = token.record().clone();
    let presented = PresentedToken::parse(token.secret()).unwrap();
    let pending = AgentIdentity::generate(agent_dir).unwrap();
    record.verify(&presented, host_id, drover_types::now()).unwrap();
    record.consume(drover_types::now());
    let issued = ca.sign_agent_csr(host_id, pending.csr_pem(), &[]).unwrap();
    pending.install(&issued.certificate_pem, &issued.ca_pem).unwrap()
}

struct Pki {
    _dir: tempfile::TempDir,
    source: AgentIdentity,
    dr: AgentIdentity,
    /// An agent of another host of the same control plane (a cut names the host that reads it).
    other_host: AgentIdentity,
    /// An agent of another control plane.
    stranger: AgentIdentity,
    /// The control plane's own client config (its certificate is from the same CA).
    control_plane: rustls::ClientConfig,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = ControlPlaneCa::create_or_load(&dir.path().join("ca")).unwrap();
        let other = ControlPlaneCa::create_or_load(&dir.path().join("other-ca")).unwrap();
        let source = enrol(&ca, &dir.path().join("source"));
        let dr = enrol_as(&ca, &dir.path().join("dr"), HostId(DR_HOST));
        let other_host = enrol(&ca, &dir.path().join("other-host"));
        let stranger = enrol(&other, &dir.path().join("stranger"));
        let cp = ca.control_plane_identity(&["localhost".parse().unwrap()]).unwrap();
        let control_plane = client_config(&cp, ca.trusted_ca()).unwrap();
        Pki { _dir: dir, source, dr, other_host, stranger, control_plane }
    }

    fn server(&self) -> rustls::ServerConfig {
        server_config_requiring_client_cert(self.source.tls_identity(), self.source.trusted_ca()).unwrap()
    }

    fn client(identity: &AgentIdentity) -> rustls::ClientConfig {
        client_config(identity.tls_identity(), identity.trusted_ca()).unwrap()
    }

    fn source_name(&self) -> String {
        agent_dns_name(self.source.host_id())
    }
}

// ------------------------------------------------------------------------------------------------
// A link that can be cut

/// A TCP proxy on 127.0.0.1 in front of `target` that cuts its first connection (or the one
/// [`Proxy::cutting_nth`] names) once it has forwarded `cut_after` bytes toward the client, and
/// passes the others; it counts what it
/// forwarded toward the client per connection. At most 16 connections, each bounded by the
/// test's own time limit.
struct Proxy {
    addr: SocketAddr,
    forwarded: Arc<Mutex<Vec<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    async fn new(target: SocketAddr, cut_after: u64) -> Proxy {
        Proxy::failing(target, cut_after, false, 0).await
    }

    /// Cuts connection `nth` (from 0) instead of the first.
    async fn cutting_nth(target: SocketAddr, cut_after: u64, nth: usize) -> Proxy {
        Proxy::failing(target, cut_after, false, nth).await
    }

    /// A proxy whose first connection stalls after `stall_after` bytes instead: nothing more
    /// crosses either way, and nothing tells the client (a link that drops packets).
    async fn stalling(target: SocketAddr, stall_after: u64) -> Proxy {
        Proxy::failing(target, stall_after, true, 0).await
    }

    async fn failing(target: SocketAddr, cut_after: u64, stall: bool, nth: usize) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let forwarded = Arc::new(Mutex::new(Vec::new()));
        let counts = forwarded.clone();
        let task = tokio::spawn(async move {
            for n in 0..16usize {
                let Ok((client, _)) = listener.accept().await else { return };
                let Ok(server) = TcpStream::connect(target).await else { return };
                counts.lock().unwrap().push(0);
                let counts = counts.clone();
                let budget = if n == nth { cut_after } else { u64::MAX };
                tokio::spawn(async move {
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let up = tokio::io::copy(&mut client_read, &mut server_write);
                    // Returns whether the link was cut.
                    let down = async {
                        let mut buf = vec![0u8; 64 << 10];
                        let mut left = budget;
                        while left > 0 {
                            let got = match server_read.read(&mut buf).await {
                                Ok(0) | Err(_) => return false,
                                Ok(got) => got,
                            };
                            let pass = (got as u64).min(left) as usize;
                            if client_write.write_all(&buf[..pass]).await.is_err() {
                                return false;
                            }
                            counts.lock().unwrap()[n] += pass as u64;
                            left -= pass as u64;
                        }
                        true
                    };
                    let cut = tokio::select! {
                        _ = up => false,
                        cut = down => cut,
                    };
                    if cut {
                        // The link is down: nothing more crosses. What already reached the
                        // client's side stays readable there (a reset would throw it away, which
                        // a dead link does not do), and the client sees the end of the stream.
                        drop((server_read, server_write));
                        if !stall {
                            let _ = client_write.shutdown().await;
                        }
                        let drain = async {
                            let mut sink = vec![0u8; 16 << 10];
                            while let Ok(got) = client_read.read(&mut sink).await {
                                if got == 0 {
                                    break;
                                }
                            }
                        };
                        let _ = tokio::time::timeout(Duration::from_secs(20), drain).await;
                    }
                });
            }
        });
        Proxy { addr, forwarded, task }
    }

    fn forwarded(&self) -> Vec<u64> {
        self.forwarded.lock().unwrap().clone()
    }
}

/// The cut, read through `address` instead of the source's own listener.
fn through(cut: &Cut, address: SocketAddr) -> Cut {
    let mut cut = cut.clone();
    if let SourceEndpoint::Peer { address: a, .. } = &mut cut.source {
        *a = address.to_string();
    }
    cut
}

fn fast_retry(attempts: u32) -> PeerRetry {
    PeerRetry {
        attempts,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
        connect_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(20),
    }
}

// ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn seed_bitmap_delta_and_hash_compare_over_mutual_tls() {
    let pki = Pki::new();
    let src = Source::new().await;
    let dr = Dr::new();
    let a = src.site.agent(|a| a).await;
    let listener = serve(&a, Some(pki.server()), &pki.source_name()).await;
    assert!(listener.is_tls());
    let b = dr.site.agent(|b| b.with_peer_tls(Pki::client(&pki.dr))).await;

    // Seed.
    let spec1 = src.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    let cut1 = a.cut_begin(&spec1).await.unwrap();
    assert!(matches!(&cut1.source, SourceEndpoint::Peer { cut, .. } if cut == "run1-0-0"), "{:?}", cut1.source);
    assert_eq!(a.cut_begin(&spec1).await.unwrap(), cut1, "a re-run of the cut keeps its instance");
    let p1 = b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut1.size, prev: None }).await.unwrap();
    let started = std::time::Instant::now();
    let seed = outcome(&run(&b, &transfer_spec("run1-0-0", &cut1, TransferMode::Seed, &p1, None)).await);
    let took = started.elapsed();
    let peer = seed.peer.unwrap();
    println!(
        "seed over mutual TLS: {DATA} data bytes, {} bytes on the wire in, in {took:?} ({:.0} MB/s, debug build, \
         polled every 20 ms); {peer:?}",
        peer.wire_bytes_in,
        DATA as f64 / took.as_secs_f64() / 1e6
    );
    assert!(peer.data_bytes >= DATA && peer.data_bytes < DATA + (1 << 20), "{peer:?}");
    assert!(peer.wire_bytes_in < DATA + DATA / 50, "only the data and a little framing travel: {peer:?}");
    assert_eq!((peer.reconnects, peer.resumed_bytes, peer.received_twice), (0, 0, 0));
    // An offline cut: its bytes were read from the image's files, not through its export.
    let served = listener.stats();
    assert!(served.sent_bytes >= DATA && served.sent_from_files == served.sent_bytes, "{served:?}");
    // A new point without a previous one is preallocated: the streams wrote it at its places.
    assert!(seed.note.as_deref().is_some_and(|n| n.contains("written at its places")), "{seed:?}");
    // The source agent reading its own cut reads it locally, not through its own listener.
    let own_chain = ChainRef { datastore: src.site.ds, replica: Uuid::new_v4(), disk: "sda".into() };
    let own = a.point_create(&PointSpec { chain: own_chain, size: cut1.size, prev: None }).await.unwrap();
    let streams = listener.stats().streams;
    let local = outcome(&run(&a, &transfer_spec("own", &cut1, TransferMode::Seed, &own, None)).await);
    assert_eq!((local.peer, listener.stats().streams), (None, streams), "{local:?}");
    assert_point_is(&src.image, &own).await;
    a.cut_end(&spec1, Some(&cut1), true).await.unwrap();
    assert_point_is(&src.image, &p1).await;
    assert!(!dr.site.work.join("j-run1-0-0").exists(), "the journal goes with the finished point");

    // Bitmap delta: the guest writes 16 scattered 192 KiB runs (3 MiB) of random data.
    let mut changed = 0;
    for i in 0..16u64 {
        guest_write(&src.image, i * (4 << 20) + BLOCK_SIZE, 3 * BLOCK_SIZE, &format!("delta{i}"));
        changed += 3 * BLOCK_SIZE;
    }
    let spec2 = src.cut_spec("run2-0-0", "drover-run1", "drover-run2", false);
    let cut2 = a.cut_begin(&spec2).await.unwrap();
    let p2 =
        b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut2.size, prev: Some(p1.clone()) }).await.unwrap();
    let delta = outcome(&run(&b, &transfer_spec("run2-0-0", &cut2, TransferMode::Bitmap, &p2, Some(&p1))).await);
    let peer = delta.peer.unwrap();
    let ratio = peer.wire_bytes_in as f64 / changed as f64;
    println!(
        "bitmap delta: {changed} bytes changed, {} bytes on the wire in ({ratio:.4}x), {peer:?}",
        peer.wire_bytes_in
    );
    assert_eq!(delta.bytes_written, changed, "{delta:?}");
    assert!(delta.note.as_deref().is_some_and(|n| n.contains("through the point's storage daemon")), "{delta:?}");
    assert!(ratio <= 1.05, "wire bytes {} > 1.05x the changed {changed}", peer.wire_bytes_in);
    a.cut_end(&spec2, Some(&cut2), true).await.unwrap();
    assert_point_is(&src.image, &p2).await;

    // Hash-compare: the guest writes 1 MiB; no bitmap is trusted. Only hashes go to the source.
    guest_write(&src.image, 20 << 20, 1 << 20, "hc");
    let spec3 = src.cut_spec("run3-0-0", "drover-run2", "drover-run3", false);
    let cut3 = a.cut_begin(&spec3).await.unwrap();
    let p3 =
        b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut3.size, prev: Some(p2.clone()) }).await.unwrap();
    let before = listener.stats();
    let hc = outcome(&run(&b, &transfer_spec("run3-0-0", &cut3, TransferMode::HashCompare, &p3, Some(&p2))).await);
    let peer = hc.peer.unwrap();
    let hashes = DISK / BLOCK_SIZE * 32;
    println!(
        "hash-compare: 1 MiB changed, {} bytes in, {} bytes out ({hashes} of them hashes), source hashed {} bytes",
        peer.wire_bytes_in,
        peer.wire_bytes_out,
        listener.stats().hashed_bytes - before.hashed_bytes
    );
    assert_eq!(hc.bytes_written, 1 << 20, "{hc:?}");
    assert!(peer.wire_bytes_in <= (1 << 20) * 105 / 100, "{peer:?}");
    assert!(peer.wire_bytes_out >= hashes && peer.wire_bytes_out < hashes + (64 << 10), "{peer:?}");
    assert_point_is(&src.image, &p3).await;

    // Hash-compare into a file no manifest describes (no `prev`): the DR agent hashes what the
    // file holds itself, and the source sends the blocks that differ (here, all its data).
    let fresh = ChainRef { replica: Uuid::new_v4(), ..dr.chain.clone() };
    let p4 = b.point_create(&PointSpec { chain: fresh, size: cut3.size, prev: None }).await.unwrap();
    let hc = outcome(&run(&b, &transfer_spec("run3-0-1", &cut3, TransferMode::HashCompare, &p4, None)).await);
    let peer = hc.peer.unwrap();
    println!("hash-compare with no manifest: {} bytes read to hash the target, {peer:?}", hc.bytes_read);
    assert_eq!(hc.bytes_read, DISK, "the target was hashed where it is: {hc:?}");
    assert!(peer.data_bytes >= DATA && peer.data_bytes <= DATA + (2 << 20), "{peer:?}");
    assert_point_is(&src.image, &p4).await;
    a.cut_end(&spec3, Some(&cut3), true).await.unwrap();
    assert_eq!(listener.stats().refused, 0);
}

#[tokio::test]
async fn a_cut_that_cannot_be_read_from_its_files_is_sent_through_its_export() {
    let src = Source::with_data(4 << 20).await;
    // A compressed cluster: only QEMU can read it, so the whole cut goes through the export.
    qemu_io(&src.image, "write -c -P 0x5a 8M 64k");
    let dr = Dr::new();
    let a = src.site.agent(|a| a).await;
    let listener = serve(&a, None, "localhost").await;
    let b = dr.site.agent(|b| b).await;
    let spec = src.cut_spec("c-0-0", "drover-base", "drover-c", true);
    let cut = a.cut_begin(&spec).await.unwrap();
    let p = b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut.size, prev: None }).await.unwrap();
    let seed = outcome(&run(&b, &transfer_spec("c-0-0", &cut, TransferMode::Seed, &p, None)).await);
    let served = listener.stats();
    assert!(served.sent_bytes > 4 << 20 && served.sent_from_files == 0, "{served:?} {seed:?}");
    a.cut_end(&spec, Some(&cut), true).await.unwrap();
    assert_point_is(&src.image, &p).await;
}

#[tokio::test]
async fn a_cut_link_mid_transfer_resumes_and_resends_under_one_percent() {
    let pki = Pki::new();
    let src = Source::new().await;
    let dr = Dr::new();
    let a = src.site.agent(|a| a).await;
    let listener = serve(&a, Some(pki.server()), &pki.source_name()).await;
    let b = dr.site.agent(|b| b.with_peer_tls(Pki::client(&pki.dr)).with_peer_retry(fast_retry(4))).await;
    let spec = src.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    let cut = a.cut_begin(&spec).await.unwrap();

    // The same cut over an unbroken link, for the figure a link carries without a cut.
    let clean_file = b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut.size, prev: None }).await.unwrap();
    let clean = outcome(&run(&b, &transfer_spec("clean", &cut, TransferMode::Seed, &clean_file, None)).await);
    let clean_wire = clean.peer.unwrap().wire_bytes_in;
    let sent_clean = listener.stats().sent_bytes;

    // The link goes down after 40 MiB toward the DR agent; the transfer reconnects and resumes.
    let proxy = Proxy::new(listener.local_addr(), 40 << 20).await;
    let chain2 = ChainRef { replica: Uuid::new_v4(), ..dr.chain.clone() };
    let file = b.point_create(&PointSpec { chain: chain2, size: cut.size, prev: None }).await.unwrap();
    let cut_link = through(&cut, proxy.addr);
    let (status, progress) =
        run_watching(&b, &transfer_spec("cutlink", &cut_link, TransferMode::Seed, &file, None)).await;
    let done = outcome(&status);
    assert!(
        progress.iter().any(|&(d, t)| d > 0 && d < t && t >= DATA),
        "the status showed progress in bytes of the offer: {progress:?}"
    );
    let peer = done.peer.unwrap();
    let forwarded = proxy.forwarded();
    let total: u64 = forwarded.iter().sum();
    let resent = total.saturating_sub(clean_wire);
    let ratio = resent as f64 / forwarded[0] as f64;
    let source_sent = listener.stats().sent_bytes - sent_clean;
    println!(
        "cut link: {} bytes crossed before the cut, {total} in all over {} connections, {clean_wire} without a \
         cut: {resent} bytes sent again = {:.3}% of what had been sent; the source read {source_sent} bytes to \
         send ({} without a cut); {peer:?}",
        forwarded[0],
        forwarded.len(),
        ratio * 100.0,
        sent_clean
    );
    assert_eq!(forwarded.len(), 2, "{forwarded:?}");
    assert_eq!(forwarded[0], 40 << 20);
    assert_eq!(peer.reconnects, 1, "{peer:?}");
    assert!(peer.resumed_bytes >= 39 << 20, "the journal held what arrived before the cut: {peer:?}");
    assert_eq!(peer.received_twice, 0, "nothing that arrived came again: {peer:?}");
    assert!(ratio <= 0.01, "resent {resent} bytes, {:.3}% of {}", ratio * 100.0, forwarded[0]);
    assert_point_is(&src.image, &file).await;
    a.cut_end(&spec, Some(&cut), true).await.unwrap();
}

/// Four streams for the tests' 64 MiB disks (16 MiB each).
fn four_streams() -> PeerStreams {
    PeerStreams { streams: 4, min_stream_bytes: 8 << 20 }
}

#[tokio::test]
async fn the_streams_of_a_sparse_disk_are_split_where_its_data_is_not_by_size() {
    // 16 MiB of data at the start of the 64 MiB disk: split by size, the first stream would
    // carry all of it and the other three nothing.
    let src = Source::with_data(16 << 20).await;
    let dr = Dr::new();
    let a = src.site.agent(|a| a).await;
    let listener = serve(&a, None, "localhost").await;
    let b = dr.site.agent(|b| b.with_peer_retry(fast_retry(1)).with_peer_streams(four_streams())).await;
    let spec = src.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    let cut = a.cut_begin(&spec).await.unwrap();
    let file = b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut.size, prev: None }).await.unwrap();
    let done = outcome(&run(&b, &transfer_spec("run1-0-0", &cut, TransferMode::Seed, &file, None)).await);
    let peer = done.peer.unwrap();
    println!("a sparse seed over four streams: {peer:?}");
    assert_eq!(peer.data_bytes, 16 << 20, "{peer:?}");
    assert_eq!(peer.streams, 4, "{peer:?}");
    assert_eq!(peer.largest_stream_bytes, 4 << 20, "each stream carried a quarter of the data: {peer:?}");
    assert_eq!(listener.stats().streams, 4, "the survey is not a pull");
    assert_point_is(&src.image, &file).await;
    a.cut_end(&spec, Some(&cut), true).await.unwrap();

    // A bitmap delta in the last 4 MiB only: the same, by where the dirty blocks are.
    guest_write(&src.image, 60 << 20, 4 << 20, "tail");
    let spec2 = src.cut_spec("run2-0-0", "drover-run1", "drover-run2", false);
    let cut2 = a.cut_begin(&spec2).await.unwrap();
    let p2 = b
        .point_create(&PointSpec { chain: dr.chain.clone(), size: cut2.size, prev: Some(file.clone()) })
        .await
        .unwrap();
    let delta = outcome(&run(&b, &transfer_spec("run2-0-0", &cut2, TransferMode::Bitmap, &p2, Some(&file))).await);
    let peer = delta.peer.unwrap();
    assert_eq!((peer.data_bytes, peer.streams, peer.largest_stream_bytes), (4 << 20, 4, 1 << 20), "{peer:?}");
    assert_point_is(&src.image, &p2).await;
    a.cut_end(&spec2, Some(&cut2), true).await.unwrap();
    assert_eq!(listener.stats().refused, 0);
}

#[tokio::test]
async fn a_transfer_over_four_streams_cut_mid_way_resumes_that_stream_and_deltas_use_them_too() {
    let pki = Pki::new();
    // Data over the whole disk, so each of the four streams carries 16 MiB.
    let src = Source::with_data(DISK).await;
    let dr = Dr::new();
    let a = src.site.agent(|a| a).await;
    let listener = serve(&a, Some(pki.server()), &pki.source_name()).await;
    let b = dr
        .site
        .agent(|b| {
            b.with_peer_tls(Pki::client(&pki.dr)).with_peer_retry(fast_retry(4)).with_peer_streams(four_streams())
        })
        .await;
    let spec = src.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    let cut = a.cut_begin(&spec).await.unwrap();

    // Unbroken, for the figure four streams carry without a cut.
    let clean_file = b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut.size, prev: None }).await.unwrap();
    let clean = outcome(&run(&b, &transfer_spec("clean", &cut, TransferMode::Seed, &clean_file, None)).await);
    let clean_peer = clean.peer.unwrap();
    assert_eq!(listener.stats().streams, 4, "one pull per stream");
    assert_eq!(clean_peer.data_bytes, DISK, "the streams' stats sum to the whole disk: {clean_peer:?}");
    assert_eq!((clean_peer.streams, clean_peer.largest_stream_bytes), (4, DISK / 4), "{clean_peer:?}");
    // Where the receiving streams' time went: 64 MiB of writes take some.
    assert!(clean_peer.write_ms > 0, "{clean_peer:?}");
    assert!(clean_peer.write_ms + clean_peer.flush_ms < 4 * 60_000, "{clean_peer:?}");
    assert_eq!((clean_peer.reconnects, clean_peer.resumed_bytes, clean_peer.received_twice), (0, 0, 0));
    assert!(clean_peer.wire_bytes_in >= DISK && clean_peer.wire_bytes_in < DISK + DISK / 50, "{clean_peer:?}");
    assert_point_is(&src.image, &clean_file).await;

    // The first stream's connection (after the survey's) goes down after 8 MiB toward the DR
    // agent: that stream resumes, the other three are not disturbed.
    let proxy = Proxy::cutting_nth(listener.local_addr(), 8 << 20, 1).await;
    let chain2 = ChainRef { replica: Uuid::new_v4(), ..dr.chain.clone() };
    let file = b.point_create(&PointSpec { chain: chain2.clone(), size: cut.size, prev: None }).await.unwrap();
    let (status, progress) =
        run_watching(&b, &transfer_spec("cutlink", &through(&cut, proxy.addr), TransferMode::Seed, &file, None)).await;
    let done = outcome(&status);
    let peer = done.peer.unwrap();
    let forwarded = proxy.forwarded();
    let total: u64 = forwarded.iter().sum();
    let resent = total.saturating_sub(clean_peer.wire_bytes_in);
    println!(
        "four streams, one cut after {} bytes: {total} bytes in all over {} connections, {} without a cut: {resent} \
         bytes sent again; {peer:?}",
        forwarded[1],
        forwarded.len(),
        clean_peer.wire_bytes_in
    );
    assert!(progress.iter().any(|&(d, t)| d > 0 && d < t && t >= DISK), "{progress:?}");
    assert_eq!(forwarded.len(), 6, "the survey, four streams and one reconnect: {forwarded:?}");
    assert!(forwarded[0] < 64 << 10, "the survey's answer is small: {forwarded:?}");
    assert_eq!(forwarded[1], 8 << 20);
    assert_eq!(peer.reconnects, 1, "{peer:?}");
    assert!(peer.resumed_bytes >= 7 << 20, "the journal held what arrived before the cut: {peer:?}");
    assert_eq!(peer.received_twice, 0, "nothing that arrived came again: {peer:?}");
    assert_eq!(peer.data_bytes, DISK, "every byte arrived once, over the streams together: {peer:?}");
    assert!(resent <= 2 * u64::from(PEER_CHUNK), "{resent} bytes sent again: at most the frame in flight");
    assert_point_is(&src.image, &file).await;
    a.cut_end(&spec, Some(&cut), true).await.unwrap();

    // A bitmap delta and a hash-compare over four streams: the guest writes into three of the
    // four ranges.
    let mut changed = 0;
    for at in [BLOCK_SIZE, (20 << 20) + BLOCK_SIZE, (63 << 20) - 2 * BLOCK_SIZE] {
        guest_write(&src.image, at, 2 * BLOCK_SIZE, &format!("delta{at}"));
        changed += 2 * BLOCK_SIZE;
    }
    let spec2 = src.cut_spec("run2-0-0", "drover-run1", "drover-run2", false);
    let cut2 = a.cut_begin(&spec2).await.unwrap();
    let p2 =
        b.point_create(&PointSpec { chain: chain2.clone(), size: cut2.size, prev: Some(file.clone()) }).await.unwrap();
    let delta = outcome(&run(&b, &transfer_spec("run2-0-0", &cut2, TransferMode::Bitmap, &p2, Some(&file))).await);
    assert_eq!(delta.bytes_written, changed, "{delta:?}");
    assert_point_is(&src.image, &p2).await;
    a.cut_end(&spec2, Some(&cut2), true).await.unwrap();

    guest_write(&src.image, 40 << 20, 1 << 20, "hc");
    let spec3 = src.cut_spec("run3-0-0", "drover-run2", "drover-run3", false);
    let cut3 = a.cut_begin(&spec3).await.unwrap();
    let p3 = b.point_create(&PointSpec { chain: chain2, size: cut3.size, prev: Some(p2.clone()) }).await.unwrap();
    let before = listener.stats();
    let hc = outcome(&run(&b, &transfer_spec("run3-0-0", &cut3, TransferMode::HashCompare, &p3, Some(&p2))).await);
    let peer = hc.peer.unwrap();
    let hashes = DISK / BLOCK_SIZE * 32;
    assert_eq!(hc.bytes_written, 1 << 20, "{hc:?}");
    assert_eq!(listener.stats().hashed_bytes - before.hashed_bytes, DISK, "each block hashed once, by its stream");
    assert!(peer.wire_bytes_out >= hashes && peer.wire_bytes_out < hashes + (64 << 10), "{peer:?}");
    assert_point_is(&src.image, &p3).await;
    a.cut_end(&spec3, Some(&cut3), true).await.unwrap();
    assert_eq!(listener.stats().refused, 0);
}

#[tokio::test]
async fn mutual_tls_serves_a_cut_to_its_readers_agent_only_not_other_hosts_cas_or_the_control_plane() {
    let pki = Pki::new();
    let src = Source::new().await;
    let a = src.site.agent(|a| a).await;
    let listener = serve(&a, Some(pki.server()), &pki.source_name()).await;
    let spec = src.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    let cut = a.cut_begin(&spec).await.unwrap();

    // An agent of another control plane (which trusts this one's CA: the source must refuse its
    // certificate), the control plane itself (disk bytes go between agents only), one with no
    // certificate, one on plain TCP.
    let stranger = client_config(pki.stranger.tls_identity(), pki.dr.trusted_ca()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.dr.trusted_ca().der().clone()).unwrap();
    let no_cert = rustls::ClientConfig::builder_with_provider(drover_pki::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let clients: Vec<(&str, Option<rustls::ClientConfig>)> = vec![
        // Enrolled with the same control plane, but the cut is not for its host (as an agent of
        // a host the control plane deleted, whose certificate is still in date).
        ("another host", Some(Pki::client(&pki.other_host))),
        ("another CA", Some(stranger)),
        ("the control plane", Some(pki.control_plane.clone())),
        ("no certificate", Some(no_cert)),
        ("plain TCP", None),
    ];
    for (what, tls) in clients {
        let dr = Dr::new();
        let b = dr
            .site
            .agent(|b| {
                let b = b.with_peer_retry(fast_retry(1));
                match tls {
                    Some(t) => b.with_peer_tls(t),
                    None => b,
                }
            })
            .await;
        let file = b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut.size, prev: None }).await.unwrap();
        let s = run(&b, &transfer_spec("refused", &cut, TransferMode::Seed, &file, None)).await;
        assert_eq!(s.state, TransferState::Failed, "{what}: {s:?}");
        let e = s.error.unwrap();
        println!("{what}: refused: {e:?}");
        let said = match what {
            "another host" => "no cut run1-0-0 for this host",
            "another CA" => "UnknownCA",
            "no certificate" => "CertificateRequired",
            "plain TCP" => "TLS",
            _ => "",
        };
        assert!(e.message.contains(said), "{what}: {e:?}");
    }
    assert_eq!(listener.stats().streams, 0, "no pull was served to any of them");
    assert_eq!(listener.stats().refused, 1, "the other host's pull was refused by the listener");

    // The DR agent of the same control plane is served, under the source's name only.
    let dr = Dr::new();
    let b = dr.site.agent(|b| b.with_peer_tls(Pki::client(&pki.dr)).with_peer_retry(fast_retry(1))).await;
    let file = b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut.size, prev: None }).await.unwrap();
    let mut impostor = cut.clone();
    if let SourceEndpoint::Peer { server_name, .. } = &mut impostor.source {
        *server_name = agent_dns_name(pki.dr.host_id());
    }
    let s = run(&b, &transfer_spec("impostor", &impostor, TransferMode::Seed, &file, None)).await;
    assert_eq!(s.state, TransferState::Failed, "a source answering for another host is refused: {s:?}");
    outcome(&run(&b, &transfer_spec("served", &cut, TransferMode::Seed, &file, None)).await);
    assert_eq!(listener.stats().streams, 1);
    a.cut_end(&spec, Some(&cut), true).await.unwrap();

    // A cut that names no reader is not offered to other agents at all.
    let local = CutSpec { reader: None, ..src.cut_spec("run2-0-0", "drover-run1", "drover-run2", false) };
    let cut = a.cut_begin(&local).await.unwrap();
    assert!(matches!(cut.source, SourceEndpoint::LocalNbd { .. }), "{:?}", cut.source);
    a.cut_end(&local, Some(&cut), true).await.unwrap();
}

#[tokio::test]
async fn a_cut_of_another_instance_is_refused_and_never_spliced_into_an_old_journal() {
    let src = Source::new().await;
    let dr = Dr::new();
    let a = src.site.agent(|a| a).await;
    let listener = serve(&a, None, "localhost").await;
    assert!(!listener.is_tls(), "plain TCP: tests only");
    let b = dr.site.agent(|b| b.with_peer_retry(fast_retry(0))).await;
    let spec = src.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    let cut = a.cut_begin(&spec).await.unwrap();
    let file = b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut.size, prev: None }).await.unwrap();

    // A stale or forged instance is refused as gone.
    let mut forged = cut.clone();
    if let SourceEndpoint::Peer { instance, .. } = &mut forged.source {
        *instance = Uuid::new_v4();
    }
    let s = run(&b, &transfer_spec("forged", &forged, TransferMode::Seed, &file, None)).await;
    let e = s.error.unwrap();
    assert_eq!(e.kind, ErrorKind::Gone, "{e:?}");
    assert!(e.message.contains("instance"), "{e:?}");
    assert_eq!(listener.stats().refused, 1);

    // The link goes down after 24 MiB and the DR agent gives up (no retries): a journal is left.
    let proxy = Proxy::new(listener.local_addr(), 24 << 20).await;
    let t = transfer_spec("run1-0-0", &through(&cut, proxy.addr), TransferMode::Seed, &file, None);
    let s = run(&b, &t).await;
    assert_eq!(s.state, TransferState::Failed, "{s:?}");
    assert!(dr.site.work.join("j-run1-0-0").join("extents").metadata().unwrap().len() > 0);

    // The source agent restarts; the run's cut is made again under the same id, after the guest
    // rewrote the first MiB (which had already arrived).
    a.cut_end(&spec, Some(&cut), false).await.unwrap();
    drop(listener);
    drop(a);
    guest_write(&src.image, 0, 1 << 20, "after-restart");
    let a2 = src.site.agent(|a| a).await;
    let listener2 = serve(&a2, None, "localhost").await;
    let spec2 = src.cut_spec("run1-0-0", "drover-run1", "drover-run2", false);
    let cut2 = a2.cut_begin(&spec2).await.unwrap();
    let (SourceEndpoint::Peer { instance: old, .. }, SourceEndpoint::Peer { instance: new, .. }) =
        (&cut.source, &cut2.source)
    else {
        panic!("peer endpoints expected")
    };
    assert_ne!(old, new, "a cut made again is another instance");
    let t2 = transfer_spec("run1-0-0", &cut2, TransferMode::Seed, &file, None);
    let done = outcome(&run(&b, &t2).await);
    let peer = done.peer.unwrap();
    println!("after the source's restart: {peer:?}");
    assert_eq!(peer.resumed_bytes, 0, "the old instance's journal was discarded: {peer:?}");
    assert_point_is(&src.image, &file).await;
    assert_eq!(listener2.stats().streams, 1);
    a2.cut_end(&spec2, Some(&cut2), true).await.unwrap();
}

#[tokio::test]
async fn a_killed_dr_agent_resumes_from_its_journal() {
    let src = Source::new().await;
    let dr = Dr::new();
    let a = src.site.agent(|a| a).await;
    let listener = serve(&a, None, "localhost").await;
    let spec = src.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    let cut = a.cut_begin(&spec).await.unwrap();

    // The link goes down after 32 MiB; the first DR agent gives up, and is then dropped (its
    // transfer task with it), as a killed agent would be.
    let proxy = Proxy::new(listener.local_addr(), 32 << 20).await;
    let b = dr.site.agent(|b| b.with_peer_retry(fast_retry(0))).await;
    let file = b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut.size, prev: None }).await.unwrap();
    let t = transfer_spec("run1-0-0", &through(&cut, proxy.addr), TransferMode::Seed, &file, None);
    assert_eq!(run(&b, &t).await.state, TransferState::Failed);
    drop(b);

    // A new DR agent process, same work directory: the same transfer resumes from the journal
    // and the point's manifest covers what the first agent wrote.
    let b2 = dr.site.agent(|b| b).await;
    let done = outcome(&run(&b2, &transfer_spec("run1-0-0", &cut, TransferMode::Seed, &file, None)).await);
    let peer = done.peer.unwrap();
    println!("resumed by a new DR agent: {peer:?}, {} bytes read back to rehash", done.bytes_read);
    assert!(peer.resumed_bytes >= 31 << 20, "{peer:?}");
    assert!(peer.data_bytes <= DATA - (31 << 20), "only the rest was sent: {peer:?}");
    assert!(done.bytes_read >= 31 << 20, "the journalled blocks were rehashed: {done:?}");
    assert_point_is(&src.image, &file).await;
    a.cut_end(&spec, Some(&cut), true).await.unwrap();
}

#[tokio::test]
async fn a_stalled_link_is_given_up_after_the_idle_timeout_and_resumed() {
    let src = Source::new().await;
    let dr = Dr::new();
    let a = src.site.agent(|a| a).await;
    let listener = serve(&a, None, "localhost").await;
    let spec = src.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    let cut = a.cut_begin(&spec).await.unwrap();
    let retry = PeerRetry { idle_timeout: Duration::from_secs(1), ..fast_retry(2) };
    let b = dr.site.agent(|b| b.with_peer_retry(retry)).await;
    let file = b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut.size, prev: None }).await.unwrap();

    // After 24 MiB the link drops everything silently: no reset, no end of stream.
    let proxy = Proxy::stalling(listener.local_addr(), 24 << 20).await;
    let started = std::time::Instant::now();
    let done =
        outcome(&run(&b, &transfer_spec("stall", &through(&cut, proxy.addr), TransferMode::Seed, &file, None)).await);
    let peer = done.peer.unwrap();
    let forwarded = proxy.forwarded();
    let lost = forwarded[0] - peer.resumed_bytes.min(forwarded[0]);
    println!(
        "stalled link: {} bytes crossed before the stall, {} journalled when it was given up ({lost} not, {:.3}%), \
         done in {:?}; {peer:?}",
        forwarded[0],
        peer.resumed_bytes,
        lost as f64 * 100.0 / forwarded[0] as f64,
        started.elapsed()
    );
    // One reconnect for the stall (a machine too loaded to move a byte for a second may add one).
    assert!((1..=3).contains(&peer.reconnects), "{peer:?}");
    assert!(lost * 100 <= forwarded[0], "what arrived before the stall was journalled: {peer:?}");
    assert_point_is(&src.image, &file).await;
    a.cut_end(&spec, Some(&cut), true).await.unwrap();
}

#[tokio::test]
async fn a_dr_agent_killed_mid_stream_resumes_from_its_last_flush_point() {
    let src = Source::new().await;
    let dr = Dr::new();
    let a = src.site.agent(|a| a).await;
    let listener = serve(&a, None, "localhost").await;
    let spec = src.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    let cut = a.cut_begin(&spec).await.unwrap();

    // The first DR agent runs its transfer on a runtime of its own, which is then shut down
    // mid-stream: its tasks and the point's storage daemon die where they are, nothing is
    // flushed or journalled on the way out, as with a killed process.
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let b = Arc::new(dr.site.agent(|b| b).await);
    let file = b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut.size, prev: None }).await.unwrap();
    let t = transfer_spec("run1-0-0", &cut, TransferMode::Seed, &file, None);
    let (handle, agent, spec_t) = (runtime.handle().clone(), b.clone(), t.clone());
    std::thread::spawn(move || handle.block_on(async move { agent.transfer_ensure(&spec_t).await.unwrap() }))
        .join()
        .unwrap();
    let mut at_kill = 0;
    for _ in 0..3000 {
        let s = b.transfer_status(&t.id).await.unwrap();
        assert_eq!(s.state, TransferState::Running, "the transfer ended before it could be killed: {s:?}");
        if s.bytes_done >= 36 << 20 {
            at_kill = s.bytes_done;
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(at_kill > 0, "the transfer never got to 36 MiB");
    runtime.shutdown_background();
    drop(b);

    // A new DR agent on the same work directory resumes the same transfer. The point file may
    // still be locked by the dying daemon for a moment: a failed start is ensured again.
    let b2 = dr.site.agent(|b| b).await;
    let mut status = run(&b2, &t).await;
    for _ in 0..5 {
        if status.state == TransferState::Done {
            break;
        }
        println!("after the kill, the transfer failed ({:?}); ensured again", status.error);
        tokio::time::sleep(Duration::from_millis(500)).await;
        status = run(&b2, &t).await;
    }
    let done = outcome(&status);
    let peer = done.peer.unwrap();
    let lost = at_kill.saturating_sub(peer.resumed_bytes);
    println!(
        "killed DR agent: {at_kill} bytes had arrived, {} were journalled (flush point every {} bytes): {lost} sent \
         again ({:.2}%); {peer:?}; the source read {} bytes to send in all",
        peer.resumed_bytes,
        drover_agent::peer::PEER_FLUSH_EVERY,
        lost as f64 * 100.0 / at_kill as f64,
        listener.stats().sent_bytes
    );
    assert!(peer.resumed_bytes > 0, "something was journalled before the kill: {peer:?}");
    assert!(lost <= drover_agent::peer::PEER_FLUSH_EVERY + (4 << 20), "{lost} bytes sent again");
    assert_point_is(&src.image, &file).await;
    a.cut_end(&spec, Some(&cut), true).await.unwrap();
}

// ------------------------------------------------------------------------------------------------
// Bandwidth limits

/// The seed of the bandwidth tests: 16 MiB of random (incompressible) data.
const PACED_DATA: u64 = 16 << 20;
const LIMIT: u64 = 4 << 20;

/// Pulls a seed of `src`'s cut through agent `a`'s listener into a new point of a fresh DR site,
/// with the transfer's own `limit`; returns how long it took and what crossed the link.
async fn timed_seed(src: &Source, cut: &Cut, id: &str, limit: Option<u64>) -> (Duration, PeerTransferStats) {
    timed_seed_over(src, cut, id, limit, PeerStreams::default()).await
}

/// [`timed_seed`] by a DR agent that pulls over `streams`.
async fn timed_seed_over(
    src: &Source,
    cut: &Cut,
    id: &str,
    limit: Option<u64>,
    streams: PeerStreams,
) -> (Duration, PeerTransferStats) {
    let dr = Dr::new();
    let b = dr.site.agent(|b| b.with_peer_streams(streams)).await;
    let file = b.point_create(&PointSpec { chain: dr.chain.clone(), size: cut.size, prev: None }).await.unwrap();
    let spec = TransferSpec { bandwidth_limit: limit, ..transfer_spec(id, cut, TransferMode::Seed, &file, None) };
    let started = std::time::Instant::now();
    let done = outcome(&run(&b, &spec).await);
    let took = started.elapsed();
    assert_point_is(&src.image, &file).await;
    let peer = done.peer.unwrap();
    assert!(peer.wire_bytes_in >= PACED_DATA, "random data crossed whole: {peer:?}");
    (took, peer)
}

/// The least time `bytes` can take at `limit` bytes per second, less a quarter for the bucket's
/// burst and the clock: a lower bound only (a loaded machine only makes it slower).
fn at_least(bytes: u64, limit: u64) -> Duration {
    Duration::from_secs_f64(0.75 * bytes as f64 / limit as f64)
}

#[tokio::test]
async fn a_transfer_with_a_bandwidth_limit_is_paced_by_the_source_and_one_without_is_not() {
    let src = Source::with_data(PACED_DATA).await;
    let a = src.site.agent(|a| a).await;
    let listener = serve(&a, None, "localhost").await;
    let spec = src.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    let cut = a.cut_begin(&spec).await.unwrap();

    // Without a limit nothing waits for tokens.
    let (free, free_peer) = timed_seed(&src, &cut, "free", None).await;
    assert_eq!(listener.stats().paced_waits, 0, "an unlimited transfer is not paced");

    let (paced, paced_peer) = timed_seed(&src, &cut, "paced", Some(LIMIT)).await;
    let floor = at_least(paced_peer.wire_bytes_in, LIMIT);
    println!(
        "bandwidth limit {LIMIT} B/s: {} bytes on the wire in {paced:?} ({:.2} MB/s; at least {floor:?}); \
         unlimited: {} bytes in {free:?}; {} writes held back",
        paced_peer.wire_bytes_in,
        paced_peer.wire_bytes_in as f64 / paced.as_secs_f64() / 1e6,
        free_peer.wire_bytes_in,
        listener.stats().paced_waits
    );
    assert!(paced >= floor, "{paced:?} for {} bytes at {LIMIT} B/s", paced_peer.wire_bytes_in);
    assert!(listener.stats().paced_waits > 0);

    // A limit of 0 would never finish: refused.
    let e = a
        .transfer_ensure(&TransferSpec {
            bandwidth_limit: Some(0),
            ..transfer_spec("zero", &cut, TransferMode::Seed, &PointFile("/nowhere".into()), None)
        })
        .await
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Invalid, "{e:?}");
    a.cut_end(&spec, Some(&cut), true).await.unwrap();
}

#[tokio::test]
async fn the_global_cap_paces_a_transfer_without_a_limit_of_its_own() {
    let src = Source::with_data(PACED_DATA).await;
    let a = src.site.agent(|a| a.with_global_bandwidth_cap(Some(LIMIT))).await;
    let listener = serve(&a, None, "localhost").await;
    let spec = src.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    let cut = a.cut_begin(&spec).await.unwrap();

    // No limit of its own (and a looser one): the agent's cap paces it all the same.
    for (id, limit) in [("capped", None), ("loose", Some(64 * LIMIT))] {
        let (took, peer) = timed_seed(&src, &cut, id, limit).await;
        let floor = at_least(peer.wire_bytes_in, LIMIT);
        println!(
            "global cap {LIMIT} B/s, the transfer's own limit {limit:?}: {} bytes on the wire in {took:?} \
             ({:.2} MB/s; at least {floor:?})",
            peer.wire_bytes_in,
            peer.wire_bytes_in as f64 / took.as_secs_f64() / 1e6
        );
        assert!(took >= floor, "{took:?} for {} bytes under a cap of {LIMIT} B/s", peer.wire_bytes_in);
    }
    assert!(listener.stats().paced_waits > 0);
    a.cut_end(&spec, Some(&cut), true).await.unwrap();
}

#[tokio::test]
async fn a_transfer_limit_holds_over_all_its_streams_together() {
    // 16 MiB of data, 4 MiB in each of the four streams' ranges.
    let src = Source::with_data(PACED_DATA / 4).await;
    for i in 1..4u64 {
        guest_write(&src.image, i * (DISK / 4), PACED_DATA / 4, &format!("part{i}"));
    }
    let a = src.site.agent(|a| a).await;
    let listener = serve(&a, None, "localhost").await;
    let spec = src.cut_spec("run1-0-0", "drover-base", "drover-run1", true);
    let cut = a.cut_begin(&spec).await.unwrap();
    let (paced, peer) = timed_seed_over(&src, &cut, "paced4", Some(LIMIT), four_streams()).await;
    let floor = at_least(peer.wire_bytes_in, LIMIT);
    println!(
        "bandwidth limit {LIMIT} B/s over four streams: {} bytes in {paced:?} ({:.2} MB/s; at least {floor:?})",
        peer.wire_bytes_in,
        peer.wire_bytes_in as f64 / paced.as_secs_f64() / 1e6
    );
    assert_eq!(listener.stats().streams, 4, "pulled over four streams");
    assert!(paced >= floor, "{paced:?} for {} bytes at {LIMIT} B/s: the limit is the transfer's", peer.wire_bytes_in);
    a.cut_end(&spec, Some(&cut), true).await.unwrap();
}
