//! `drover bench replication --remote`: one disk replicated between two agents over the
//! agent-to-agent data path (mutual TLS on loopback), as two hosts would: a production agent
//! that cuts the disk and serves the cut on its data listener, and a DR agent that pulls it into
//! a restore point in its own datastore. Both agents run in this process (`LocalAgent`, real
//! QEMU tools); the CPU figure is this process's (both agents' drover work) per GiB sent, the
//! storage daemons' own CPU not included.
//!
//! Baselines, on the same source image, cold and interleaved with the seed runs: `qemu-img
//! convert` from the source's NBD export to a new qcow2 (`-t writeback`: flushed at the end, as
//! drover's points are), and `nbdcopy` (libnbd) from the same export when it is installed.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail};
use drover_agent::LocalAgent;
use drover_agent_api::*;
use drover_block::extents::ExtentSet;
use drover_block::hash::BLOCK_SIZE;
use drover_hv::qemu::{QemuConfig, QemuDriver};
use drover_qemu::qsd::{Backing, StorageDaemon};
use rand::SeedableRng as _;
use serde::Serialize;
use uuid::Uuid;

use super::{ReplicationArgs, Rig, random_blocks, write_random};

#[derive(Debug, Serialize)]
pub struct RemoteReport {
    pub size: u64,
    pub change_fraction: f64,
    pub runs: u32,
    /// The most streams one transfer was pulled over.
    pub streams: u16,
    /// Full seed over the wire, each run into a new point (seconds).
    pub seed_seconds: Vec<f64>,
    pub seed_mb_per_s_median: f64,
    pub seed_wire_bytes: u64,
    pub seed_cpu_seconds_per_gib: f64,
    /// CPU of every process a seed ran (both agents, the cut's and the point's storage daemons),
    /// and of every process a `qemu-img convert` ran (qemu-img and the export's daemon), per
    /// GiB, medians: whether the copies are bound by two cores or wait on something.
    pub seed_cpu_all_seconds_per_gib: f64,
    pub convert_cpu_all_seconds_per_gib: f64,
    /// Where the last seed's receiving streams spent their time: fractions of (streams × the
    /// seed's seconds) in writes to the point file and in its flushes; the rest is waiting for
    /// the source and work on what arrived.
    pub seed_streams: u32,
    pub seed_write_share: f64,
    pub seed_flush_share: f64,
    /// The incremental (`change_fraction` of the blocks changed) over the wire.
    pub incremental_seconds: f64,
    pub incremental_mb_per_s: f64,
    pub changed_bytes: u64,
    pub incremental_data_bytes: u64,
    pub incremental_wire_bytes: u64,
    pub incremental_cpu_seconds_per_gib: f64,
    /// `qemu-img convert -t writeback` from the source's NBD export into a new qcow2.
    pub qemu_img_convert_seconds: Vec<f64>,
    /// `nbdcopy` from the same export into a new raw file, when nbdcopy is installed.
    pub nbdcopy_seconds: Option<Vec<f64>>,
    /// The seed's median time over `qemu-img convert`'s: ≥ 0.8 is the target.
    pub seed_vs_convert: f64,
    /// The same ratio run by run (each seed against the `qemu-img convert` run just before it),
    /// median: steadier than the ratio of medians when the machine's speed drifts during the
    /// benchmark (a shared host).
    pub seed_vs_convert_paired: f64,
}

/// This process's CPU time so far (user + system), in seconds.
fn cpu_seconds() -> f64 {
    process_cpu("self").0
}

/// A process's CPU time so far (user + system) and that of its children it waited for (the
/// storage daemons the agents started and stopped, `qemu-img`), in seconds; zeros if it is gone.
fn process_cpu(pid: &str) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return (0.0, 0.0) };
    // The command may contain spaces; fields after its closing parenthesis are plain.
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0);
    // /proc reports in USER_HZ, which Linux fixes at 100 for user space.
    ((field(11) + field(12)) / 100.0, (field(13) + field(14)) / 100.0)
}

/// CPU seconds of this process and the children it reaped, together.
fn cpu_with_children() -> f64 {
    let (own, children) = process_cpu("self");
    own + children
}

fn median(v: &[f64]) -> f64 {
    super::Spread::of(v).median
}

fn min(v: &[f64]) -> f64 {
    super::Spread::of(v).min
}

struct Side {
    agent: Arc<LocalAgent>,
    ds: Uuid,
    /// The host its certificate names.
    host: Uuid,
}

/// An agent with an identity from `ca` for a new host id, working under `dir`.
async fn side(
    ca: &drover_pki::ControlPlaneCa,
    dir: &Path,
    serve: bool,
    streams: u16,
) -> anyhow::Result<(Side, Option<drover_agent::peer::DataListener>)> {
    let pending = drover_pki::AgentIdentity::generate(&dir.join("identity"))?;
    let host = drover_types::HostId::new();
    let issued = ca.sign_agent_csr(host, pending.csr_pem(), &[])?;
    let identity = pending.install(&issued.certificate_pem, &issued.ca_pem)?;
    let hv = Arc::new(QemuDriver::new(QemuConfig::new(dir.join("run"))));
    let streams = drover_agent::peer::PeerStreams { streams, ..Default::default() };
    let agent = LocalAgent::new(hv, dir.join("w"))
        .with_peer_tls(drover_pki::client_config(identity.tls_identity(), identity.trusted_ca())?)
        .with_peer_streams(streams);
    let data = if serve {
        let tls = drover_pki::server_config_requiring_client_cert(identity.tls_identity(), identity.trusted_ca())?;
        let name = drover_pki::agent_dns_name(identity.host_id());
        Some(agent.serve_data("127.0.0.1:0".parse()?, None, name, Some(tls)).await?)
    } else {
        None
    };
    let ds = Uuid::new_v4();
    let root = dir.join("ds");
    std::fs::create_dir_all(&root)?;
    agent
        .datastore_ensure(&DatastoreSpec { id: ds, path: root.to_string_lossy().into_owned() })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((Side { agent: Arc::new(agent), ds, host: host.0 }, data))
}

/// Runs one transfer to its end; returns its outcome and the seconds it took.
async fn transfer(dr: &LocalAgent, spec: &TransferSpec) -> anyhow::Result<(TransferOutcome, f64)> {
    let start = Instant::now();
    dr.transfer_ensure(spec).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let deadline = start + std::time::Duration::from_secs(3600);
    loop {
        let s = dr.transfer_status(&spec.id).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        match s.state {
            TransferState::Done => {
                let secs = start.elapsed().as_secs_f64();
                return Ok((s.outcome.context("a finished transfer without an outcome")?, secs));
            }
            TransferState::Failed => bail!("transfer {} failed: {:?}", spec.id, s.error),
            TransferState::Running => {}
        }
        if Instant::now() > deadline {
            bail!("transfer {} did not end within an hour", spec.id);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn run_timed(program: &str, args: &[&str]) -> anyhow::Result<f64> {
    super::drop_caches();
    let start = Instant::now();
    let out = std::process::Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(start.elapsed().as_secs_f64())
}

pub async fn remote(args: &ReplicationArgs) -> anyhow::Result<RemoteReport> {
    let temp = tempfile::Builder::new().prefix("drm").tempdir_in("/tmp")?;
    let dir = temp.path();
    let size = args.size;
    let runs = args.baseline_runs;
    let ca = drover_pki::ControlPlaneCa::create_or_load(&dir.join("ca"))?;
    let (prod, _data) = side(&ca, &dir.join("p"), true, args.streams).await?;
    let (dr, _) = side(&ca, &dir.join("d"), false, args.streams).await?;

    // The source disk: random data everywhere (nothing for zstd to shrink), written through a
    // storage daemon of the benchmark's own.
    let vm = Uuid::new_v4();
    let image = dir.join("p/ds").join(vm.to_string()).join("data.qcow2");
    std::fs::create_dir_all(image.parent().context("image directory")?)?;
    super::qemu_img(&["create", "-q", "-f", "qcow2", image.to_str().unwrap_or_default(), &size.to_string()])?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut rig = Rig { qsd: StorageDaemon::start(&dir.join("qsd")).await?, counter: 0 };
    rig.qsd.start_nbd_server().await?;
    {
        let (node, export) = rig.export(&image, Backing::None, true, &[]).await?;
        let mut c = rig.client(&export, &[]).await?;
        write_random(&mut c, &mut rng, &ExtentSet::from_range(0, size)).await?;
        c.disconnect().await?;
        rig.close(&node).await?;
    }
    let disk = DiskRef { datastore: prod.ds, vm, disk: "data".into(), index: 0 };
    let cut_spec = |id: &str, current: &str, next: &str, fresh: bool| CutSpec {
        id: id.into(),
        disk: disk.clone(),
        live: false,
        current: current.into(),
        next: next.into(),
        remove: vec![],
        fresh,
        file: None,
        reader: Some(dr.host),
    };
    let e = |e: AgentError| anyhow::anyhow!("{e}");

    // Seeds and the baselines, interleaved, each from a cold page cache where allowed.
    let mut seed_seconds = Vec::new();
    let mut convert_seconds = Vec::new();
    let nbdcopy = crate::serve::which("nbdcopy");
    let mut nbdcopy_seconds = nbdcopy.as_ref().map(|_| Vec::new());
    let (mut seed_wire, mut seed_cpu) = (0, 0.0);
    let (mut seed_cpu_all, mut convert_cpu_all) = (Vec::new(), Vec::new());
    let (mut seed_streams, mut seed_write_share, mut seed_flush_share) = (0, 0.0, 0.0);
    let mut seed_file = None;
    for run in 0..runs {
        // The baselines read the source through an NBD export of the same image.
        let (node, export) = rig.export(&image, Backing::None, false, &[]).await?;
        let url = format!("nbd+unix:///{export}?socket={}", rig.qsd.nbd_socket_path().display());
        let out = dir.join(format!("convert-{run}.qcow2"));
        let rig_pid = rig.qsd.pid().to_string();
        let cpu = cpu_with_children() + process_cpu(&rig_pid).0;
        let secs = run_timed(
            "qemu-img",
            &["convert", "-t", "writeback", "-f", "raw", "-O", "qcow2", &url, out.to_str().unwrap_or_default()],
        )?;
        convert_seconds.push(secs);
        convert_cpu_all.push(cpu_with_children() + process_cpu(&rig_pid).0 - cpu);
        std::fs::remove_file(&out)?;
        if let (Some(program), Some(times)) = (&nbdcopy, nbdcopy_seconds.as_mut()) {
            let out = dir.join(format!("nbdcopy-{run}.raw"));
            std::fs::File::create(&out)?.set_len(size)?;
            let secs =
                run_timed(program.to_str().unwrap_or("nbdcopy"), &["--flush", &url, out.to_str().unwrap_or_default()])?;
            times.push(secs);
            std::fs::remove_file(&out)?;
        }
        rig.close(&node).await?;

        // drover: a cut on the production agent, pulled by the DR agent into a new point.
        let id = format!("seed{run}");
        let spec = cut_spec(&id, "drover-base", &format!("drover-{id}"), true);
        let cut = prod.agent.cut_begin(&spec).await.map_err(e)?;
        let chain = ChainRef { datastore: dr.ds, replica: Uuid::new_v4(), disk: "data".into() };
        let file = dr.agent.point_create(&PointSpec { chain: chain.clone(), size, prev: None }).await.map_err(e)?;
        let t = TransferSpec {
            id: id.clone(),
            source: cut.source.clone(),
            source_files: None,
            mode: TransferMode::Seed,
            target: file.clone(),
            target_disk: None,
            prev: None,
            size,
            bandwidth_limit: None,
        };
        super::drop_caches();
        let (cpu, cpu_all) = (cpu_seconds(), cpu_with_children());
        let (outcome, secs) = transfer(&dr.agent, &t).await?;
        seed_cpu = cpu_seconds() - cpu;
        seed_seconds.push(secs);
        seed_wire = outcome.peer.as_ref().map_or(0, |p| p.wire_bytes_in);
        if let Some(p) = &outcome.peer {
            let stream_ms = f64::from(p.streams.max(1)) * secs * 1000.0;
            seed_streams = p.streams;
            seed_write_share = p.write_ms as f64 / stream_ms;
            seed_flush_share = p.flush_ms as f64 / stream_ms;
        }
        dr.agent.transfer_forget(&id).await.map_err(e)?;
        let last = run + 1 == runs;
        prod.agent.cut_end(&spec, Some(&cut), last).await.map_err(e)?;
        // The cut's daemon is reaped once the cut ends; the point's when its transfer did.
        seed_cpu_all.push(cpu_with_children() - cpu_all);
        if last {
            seed_file = Some((chain, file, format!("drover-{id}")));
        }
    }
    let (chain, seed_file, tracking) = seed_file.context("no seed run")?;

    // The incremental: random blocks change; the next cut sends only them.
    let changed = random_blocks(&mut rng, size, ((size / BLOCK_SIZE) as f64 * args.change).ceil() as u64);
    {
        let (node, export) = rig.export(&image, Backing::None, true, &[]).await?;
        let mut c = rig.client(&export, &[]).await?;
        write_random(&mut c, &mut rng, &changed).await?;
        c.disconnect().await?;
        rig.close(&node).await?;
    }
    let spec = cut_spec("incr", &tracking, "drover-incr", false);
    let cut = prod.agent.cut_begin(&spec).await.map_err(e)?;
    let file = dr
        .agent
        .point_create(&PointSpec { chain: chain.clone(), size, prev: Some(seed_file.clone()) })
        .await
        .map_err(e)?;
    let t = TransferSpec {
        id: "incr".into(),
        source: cut.source.clone(),
        source_files: None,
        mode: TransferMode::Bitmap,
        target: file.clone(),
        target_disk: None,
        prev: Some(seed_file),
        size,
        bandwidth_limit: None,
    };
    super::drop_caches();
    let cpu = cpu_seconds();
    let (outcome, incremental_seconds) = transfer(&dr.agent, &t).await?;
    let incremental_cpu = cpu_seconds() - cpu;
    prod.agent.cut_end(&spec, Some(&cut), true).await.map_err(e)?;
    rig.qsd.shutdown().await?;
    if !drover_qemu::image::compare(&image, Path::new(&file.0)).await? {
        bail!("the incremental point does not equal the source");
    }
    let peer = outcome.peer.unwrap_or_default();
    let changed_bytes = changed.total_bytes();
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let seed_median = median(&seed_seconds);
    Ok(RemoteReport {
        size,
        change_fraction: args.change,
        runs,
        streams: args.streams,
        seed_mb_per_s_median: size as f64 / 1e6 / seed_median,
        seed_wire_bytes: seed_wire,
        seed_cpu_seconds_per_gib: seed_cpu / gib(size),
        seed_cpu_all_seconds_per_gib: median(&seed_cpu_all) / gib(size),
        convert_cpu_all_seconds_per_gib: median(&convert_cpu_all) / gib(size),
        seed_streams,
        seed_write_share,
        seed_flush_share,
        incremental_mb_per_s: changed_bytes as f64 / 1e6 / incremental_seconds,
        incremental_seconds,
        changed_bytes,
        incremental_data_bytes: peer.data_bytes,
        incremental_wire_bytes: peer.wire_bytes_in,
        incremental_cpu_seconds_per_gib: incremental_cpu / gib(changed_bytes.max(1)),
        seed_vs_convert: median(&convert_seconds) / seed_median,
        seed_vs_convert_paired: median(
            &convert_seconds.iter().zip(&seed_seconds).map(|(c, s)| c / s).collect::<Vec<_>>(),
        ),
        seed_seconds,
        qemu_img_convert_seconds: convert_seconds,
        nbdcopy_seconds,
    })
}

pub fn print(r: &RemoteReport) {
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "replication between two agents over mutual TLS on loopback: {:.0} MiB disk, {:.1}% of blocks changed, {} runs, up to {} streams",
        mib(r.size),
        r.change_fraction * 100.0,
        r.runs,
        r.streams
    );
    println!(
        "  full seed over the wire:   min {:.2} s, median {:.2} s ({:.0} MB/s), {} bytes on the wire, {:.2} CPU s/GiB (drover, both agents)",
        min(&r.seed_seconds),
        median(&r.seed_seconds),
        r.seed_mb_per_s_median,
        r.seed_wire_bytes,
        r.seed_cpu_seconds_per_gib
    );
    println!(
        "    the last seed's {} receiving streams: {:.0}% of their time writing the point file, {:.0}% flushing it, \
         the rest waiting for the source or checking what arrived",
        r.seed_streams,
        r.seed_write_share * 100.0,
        r.seed_flush_share * 100.0
    );
    println!(
        "  qemu-img convert over NBD: min {:.2} s, median {:.2} s (-t writeback, flushed)",
        min(&r.qemu_img_convert_seconds),
        median(&r.qemu_img_convert_seconds)
    );
    println!(
        "  CPU of every process:      seed {:.2} s/GiB (both agents and storage daemons), qemu-img convert {:.2} s/GiB \
         (with its export's daemon); {} cores here",
        r.seed_cpu_all_seconds_per_gib,
        r.convert_cpu_all_seconds_per_gib,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    match &r.nbdcopy_seconds {
        Some(t) => println!("  nbdcopy over NBD:          min {:.2} s, median {:.2} s (--flush)", min(t), median(t)),
        None => println!("  nbdcopy:                   not installed (Debian package libnbd-bin)"),
    }
    println!(
        "  seed / qemu-img convert:   {:.2}x (target ≥ 0.8x); run by run {:.2}x (median of each seed against the \
         convert just before it)",
        r.seed_vs_convert, r.seed_vs_convert_paired
    );
    println!(
        "  incremental:               {:.2} s ({:.0} MB/s of changed data), {} bytes changed, {} sent as data, {} on the wire ({:.3}x), {:.2} CPU s/GiB",
        r.incremental_seconds,
        r.incremental_mb_per_s,
        r.changed_bytes,
        r.incremental_data_bytes,
        r.incremental_wire_bytes,
        r.incremental_wire_bytes as f64 / r.changed_bytes.max(1) as f64,
        r.incremental_cpu_seconds_per_gib
    );
}
