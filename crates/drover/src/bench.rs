//! `drover bench replication`: the data path measured on one disk image, with the baselines
//! beside it, all in the same run and on the same data.
//!
//! 1. A source qcow2 of `--size`, filled with random data, is seeded into an empty target (full
//!    copy, the target written at its places with `O_DIRECT` as a seed's point is, and flushed),
//!    the source read through NBD and from its files (and, for comparison, through NBD into a
//!    target exported by a daemon through the page cache), `--baseline-runs` times,
//!    interleaved with `qemu-img convert` of the same source to qcow2: as it runs by default
//!    (`-t unsafe` for the target: no flush, the data is left in the page cache), durable
//!    (`-t writeback`: flushed when closed) and with `O_DIRECT` (`-t none`), each run cold; min
//!    and median, and where the full copy's time went (source map, read, write, hash, flush).
//! 2. A persistent dirty bitmap is added, `--change` of the 64 KiB blocks are rewritten at random.
//! 3. Incremental: the dirty granules go into a new overlay on the seed (bytes read and sent).
//! 4. Hash-compare, as replication falls back to it without a trusted bitmap: a stale overlay on
//!    the seed is brought level by hashing the source against the seed's manifest (the target is
//!    not read), the source read from its files as for a powered-off VM (mapped with `qemu-img
//!    map`, timed with it); the same with the source read through NBD, as for a running VM; then
//!    the same from scratch reading both sides (no manifest to trust), which is what failback
//!    does for a production disk whose bitmap was lost.
//! 5. Failback: a replica boots through an overlay on the new point and writes; production writes
//!    too (tracked by the next bitmap). The union of the two is what must travel back; it is sent
//!    and production is checked equal to the replica.
//! 6. Baselines: reading both images once, and `rsync --inplace --no-whole-file --ignore-times`
//!    between raw copies `--baseline-runs` times, on a fresh target and (as root) with the page
//!    cache dropped before each run; min and median.
//!
//! All other I/O goes through `qemu-storage-daemon` NBD exports and drover's own NBD client: the
//! same path replication uses.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use drover_block::copy::{
    CopyStats, CopyTiming, SyncSource, TargetBefore, copy_extents, copy_extents_into, hash_compare_sync,
    manifest_compare_sync,
};
use drover_block::direct::{DirectImage, PlacedImage};
use drover_block::extents::{Extent, ExtentSet};
use drover_block::hash::{BLOCK_SIZE, Manifest};
use drover_block::nbd::NbdClient;
use drover_qemu::qsd::{Backing, NbdExport, Qcow2Node, StorageDaemon};
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;

mod em_sessions;
mod remote;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Full, incremental and hash-compare replication of one disk, failback bytes, and baselines.
    Replication(ReplicationArgs),
    /// The Enterprise Manager dialect's session collection and query service over a long
    /// history of plan sessions, over HTTP on loopback.
    EmSessions(em_sessions::EmSessionsArgs),
}

#[derive(Debug, Args)]
pub struct ReplicationArgs {
    /// Disk size, e.g. 256MiB, 1GiB.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub size: u64,
    /// Fraction of 64 KiB blocks changed, e.g. 1% or 0.5%.
    #[arg(long, default_value = "1%", value_parser = parse_percent)]
    pub change: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Work directory (default: a temporary directory, removed afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Seed of the random data and block choice, for repeatable runs.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Runs of the full copy and of each baseline (`qemu-img convert`, `rsync`), interleaved;
    /// min and median printed.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub baseline_runs: u32,
    /// Between two agents over the agent-to-agent data path (mutual TLS on loopback): the full
    /// seed and the incremental in MB/s, bytes on the wire, CPU per GiB, against `qemu-img
    /// convert` and `nbdcopy` over NBD (`--baseline-runs` seeds, interleaved with them).
    #[arg(long)]
    pub remote: bool,
    /// With `--remote`: the most streams (connections) one transfer is pulled over (a disk
    /// below 256 MiB gets one).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub streams: u16,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("G", 1 << 30), ("M", 1 << 20)]
        .iter()
        .find_map(|(suffix, m)| s.strip_suffix(suffix).map(|n| (n, *m)))
        .unwrap_or((s, 1));
    let n: u64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size like 1GiB or 256MiB"))?;
    let bytes = n.checked_mul(mult).ok_or("size overflows")?;
    if bytes < 4 << 20 || bytes % BLOCK_SIZE != 0 {
        return Err(format!("size must be at least 4MiB and a multiple of 64KiB, got {bytes}"));
    }
    Ok(bytes)
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().trim_end_matches('%').parse().map_err(|_| format!("{s:?} is not a percentage like 1%"))?;
    if !(0.0..=100.0).contains(&v) || v == 0.0 {
        return Err("change must be above 0% and at most 100%".into());
    }
    Ok(v / 100.0)
}

#[derive(Debug, Serialize)]
pub struct Phase {
    pub seconds: f64,
    pub bytes_read: u64,
    pub bytes_sent: u64,
}

/// Where a copy's time went, in seconds. The stages overlap; the wall time is `seconds`.
#[derive(Debug, Clone, Serialize)]
pub struct Breakdown {
    pub seconds: f64,
    /// Block status of the source (what holds data).
    pub source_map: f64,
    /// Waiting for the source's reads.
    pub read: f64,
    /// Waiting for the target's writes.
    pub write: f64,
    /// Hashing for the manifest (a thread of its own).
    pub hash: f64,
    /// The final flush of the target.
    pub flush: f64,
}

impl Breakdown {
    fn of(seconds: f64, t: &CopyTiming) -> Breakdown {
        Breakdown {
            seconds,
            source_map: t.source_map.as_secs_f64(),
            read: t.read.as_secs_f64(),
            write: t.write.as_secs_f64(),
            hash: t.hash.as_secs_f64(),
            flush: t.flush.as_secs_f64(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub size_bytes: u64,
    pub change_fraction: f64,
    pub changed_bytes: u64,
    /// The first full copy (the seed the later phases build on).
    pub full_copy: Phase,
    /// Every full copy run, cold, interleaved with the `qemu-img convert` runs.
    pub full_copy_runs: Spread,
    /// Where the time of the median full copy run went.
    pub full_copy_breakdown: Breakdown,
    /// The same full copy with the source read from its files (a powered-off VM's disk).
    pub full_copy_from_files_runs: Spread,
    pub full_copy_from_files_breakdown: Breakdown,
    /// The full copy through NBD with the target through the page cache instead of `O_DIRECT`
    /// (the final flush then writes it all back).
    pub full_copy_page_cache_runs: Spread,
    pub full_copy_page_cache_breakdown: Breakdown,
    /// `qemu-img convert -O qcow2` as it runs by default: the target with `cache=unsafe`, so
    /// nothing is flushed and the data is still in the page cache when it exits.
    pub convert_default: Spread,
    /// `qemu-img convert -t writeback -O qcow2`: flushed at close, durable like the full copy.
    pub convert_durable: Spread,
    /// `qemu-img convert -t none -O qcow2`: the target with `O_DIRECT` (as the full copy's),
    /// flushed at close.
    pub convert_direct: Spread,
    /// `convert_durable.median / full_copy_runs.median`: the full copy's speed relative to a
    /// durable `qemu-img convert` (target ≥ 1.0).
    pub full_copy_speed_vs_convert_durable: f64,
    /// `convert_default.median / full_copy_runs.median`: relative to the default, non-durable one.
    pub full_copy_speed_vs_convert_default: f64,
    /// `convert_durable.median / full_copy_from_files_runs.median`.
    pub from_files_speed_vs_convert_durable: f64,
    pub incremental: Phase,
    /// Replication's fallback: the source hashed against the target point's manifest, read from
    /// its files (a powered-off VM's disk).
    pub hash_compare: Phase,
    /// The same with the source read through NBD (a running VM's disk, read through its QEMU).
    pub hash_compare_through_nbd: Phase,
    /// The fallback with no manifest to trust: both sides read once, concurrently.
    pub hash_compare_reading_target: Phase,
    /// Reading source and target once each, concurrently: the floor for hash-compare.
    pub read_both_seconds: f64,
    pub failback: FailbackReport,
    /// The median of the rsync runs.
    pub rsync_seconds: Option<f64>,
    pub rsync: Option<Spread>,
    /// Every full copy and baseline run started with the page cache dropped (needs root).
    pub baselines_cold: bool,
    /// `incremental.bytes_sent / changed_bytes` (target ≤ 1.05).
    pub incremental_ratio: f64,
    /// `hash_compare.seconds / rsync_seconds` (target ≤ 0.5).
    pub hash_compare_vs_rsync: Option<f64>,
    /// `hash_compare.seconds / read_both_seconds` (target ≤ 1.5).
    pub hash_compare_vs_read_both: f64,
    /// `hash_compare_through_nbd.seconds / rsync_seconds`.
    pub through_nbd_vs_rsync: Option<f64>,
    /// `hash_compare_reading_target.seconds / rsync_seconds`.
    pub reading_target_vs_rsync: Option<f64>,
    /// `hash_compare_reading_target.seconds / read_both_seconds`.
    pub reading_target_vs_read_both: f64,
}

#[derive(Debug, Serialize)]
pub struct FailbackReport {
    /// Bytes the replica changed while failed over, plus bytes production changed since the point.
    pub changed_bytes: u64,
    pub bytes_sent: u64,
    pub seconds: f64,
    /// `bytes_sent / changed_bytes` (target ≤ 1.1).
    pub ratio: f64,
    /// Production equals the replica after the failback (`qemu-img compare`).
    pub equal_after: bool,
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Replication(args) if args.remote => {
            let report = remote::remote(&args).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                remote::print(&report);
            }
            Ok(())
        }
        BenchCommand::Replication(args) => {
            let report = replication(&args).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_report(&report);
            }
            Ok(())
        }
        BenchCommand::EmSessions(args) => {
            let report = em_sessions::em_sessions(&args).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                em_sessions::print_report(&report);
            }
            Ok(())
        }
    }
}

/// One daemon, the nodes and exports of the benchmark, and clients to them.
struct Rig {
    qsd: StorageDaemon,
    counter: u32,
}

type Client = NbdClient<tokio::net::UnixStream>;

impl Rig {
    async fn export(
        &mut self,
        path: &Path,
        backing: Backing,
        writable: bool,
        bitmaps: &[&str],
    ) -> anyhow::Result<(String, String)> {
        self.counter += 1;
        let node = format!("n{}", self.counter);
        self.qsd
            .add_qcow2(&Qcow2Node { node_name: node.clone(), path: path.to_path_buf(), backing, read_only: !writable })
            .await?;
        let endpoint = self
            .qsd
            .add_nbd_export(&NbdExport {
                id: format!("e{}", self.counter),
                node_name: node.clone(),
                name: node.clone(),
                writable,
                bitmaps: bitmaps.iter().map(|b| b.to_string()).collect(),
            })
            .await?;
        Ok((node, endpoint.export_name))
    }

    /// A new image to write once, exported by a daemon of its own (`targets`), `O_DIRECT` where
    /// possible (`direct`; else through the page cache).
    async fn export_new_target(
        &mut self,
        targets: &StorageDaemon,
        path: &Path,
        direct: bool,
    ) -> anyhow::Result<(String, String)> {
        self.counter += 1;
        let node = format!("n{}", self.counter);
        let qcow2 =
            Qcow2Node { node_name: node.clone(), path: path.to_path_buf(), backing: Backing::None, read_only: false };
        if direct {
            targets.add_qcow2_direct(&qcow2).await?;
        } else {
            targets.add_qcow2(&qcow2).await?;
        }
        let export = NbdExport {
            id: format!("e{}", self.counter),
            node_name: node.clone(),
            name: node.clone(),
            writable: true,
            bitmaps: vec![],
        };
        let endpoint = targets.add_nbd_export(&export).await?;
        Ok((node, endpoint.export_name))
    }

    async fn client(&self, export: &str, contexts: &[&str]) -> anyhow::Result<Client> {
        Ok(NbdClient::connect_unix(self.qsd.nbd_socket_path(), export, contexts).await?)
    }

    async fn close(&self, node: &str) -> anyhow::Result<()> {
        close_on(&self.qsd, node).await
    }
}

async fn close_on(daemon: &StorageDaemon, node: &str) -> anyhow::Result<()> {
    let id = format!("e{}", node.trim_start_matches('n'));
    daemon.remove_nbd_export(&id).await?;
    daemon.remove_node(node).await?;
    Ok(())
}

/// Where a full copy reads its source.
enum FullCopySource<'a> {
    Nbd(&'a mut Client),
    /// The source image's files (a powered-off VM's disk).
    Files(&'a Path),
}

/// Where a full copy writes.
enum Target {
    Placed(PlacedImage),
    /// A connection to the target's export, and its node in the daemon.
    Nbd(Client, String),
}

/// `copy_extents_into` a new image (zeros not written) at `dst`, whichever way it is written.
async fn seed_into(
    src: &mut impl SyncSource,
    dst: &mut Target,
    whole: &ExtentSet,
    manifest: &mut Manifest,
) -> anyhow::Result<CopyStats> {
    let z = TargetBefore::Zeroes;
    Ok(match dst {
        Target::Placed(d) => copy_extents_into(src, d, whole, z, manifest, |_, _| {}).await?,
        Target::Nbd(d, _) => copy_extents_into(src, d, whole, z, manifest, |_, _| {}).await?,
    })
}

/// One cold full copy into a new image at `file`, as a seed's: the whole disk asked for, the
/// source's block status or map deciding what is read, the target written at its places
/// (`PlacedImage`, `O_DIRECT`) as an agent writes a seed if `direct`, else exported by `targets`
/// through the page cache; flushed at the end.
async fn full_copy_once(
    rig: &mut Rig,
    targets: &StorageDaemon,
    src: FullCopySource<'_>,
    file: &Path,
    direct: bool,
    size: u64,
    cold: &mut bool,
) -> anyhow::Result<(f64, CopyStats, Manifest)> {
    let _ = std::fs::remove_file(file);
    // Made as a seed's point file is (`ChainDir::new_point_file`).
    drover_qemu::image::create_qcow2_preallocated(file, size).await?;
    let mut dst = if direct {
        let map = drover_qemu::image::placed_map(file).await?.map_err(|why| anyhow::anyhow!("{why}"))?;
        Target::Placed(PlacedImage::open(&map)?)
    } else {
        let (node, export) = rig.export_new_target(targets, file, false).await?;
        Target::Nbd(NbdClient::connect_unix(targets.nbd_socket_path(), &export, &[]).await?, node)
    };
    let mut manifest = Manifest::zeroed(size);
    let whole = ExtentSet::from_range(0, size);
    *cold &= drop_caches();
    let start = Instant::now();
    let stats = match src {
        FullCopySource::Nbd(s) => seed_into(s, &mut dst, &whole, &mut manifest).await?,
        FullCopySource::Files(source_file) => {
            let mut image = DirectImage::open(&drover_qemu::image::host_map(source_file).await?)?;
            seed_into(&mut image, &mut dst, &whole, &mut manifest).await?
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    if let Target::Nbd(d, node) = dst {
        d.disconnect().await?;
        close_on(targets, &node).await?;
    }
    Ok((seconds, stats, manifest))
}

fn qemu_img(args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("qemu-img").args(args).output().context("running qemu-img")?;
    if !out.status.success() {
        bail!("qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A new qcow2 overlay `file` on `backing`.
fn overlay(backing: &Path, file: &Path) -> anyhow::Result<()> {
    let (b, f) = (backing.to_str().unwrap_or_default(), file.to_str().unwrap_or_default());
    qemu_img(&["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", b, f])
}

fn timed<T>(start: Instant, v: T) -> (T, f64) {
    (v, start.elapsed().as_secs_f64())
}

/// `count` distinct random 64 KiB blocks of the disk.
fn random_blocks(rng: &mut impl Rng, size: u64, count: u64) -> ExtentSet {
    let blocks = size / BLOCK_SIZE;
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < count.min(blocks) {
        picked.insert(rng.gen_range(0..blocks));
    }
    let mut set = ExtentSet::new();
    for b in picked {
        set.insert(Extent::new(b * BLOCK_SIZE, BLOCK_SIZE));
    }
    set
}

async fn write_random(client: &mut Client, rng: &mut impl RngCore, extents: &ExtentSet) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 4 << 20];
    for e in extents.chunks(buf.len() as u64) {
        let chunk = &mut buf[..e.len as usize];
        rng.fill_bytes(chunk);
        client.write(e.offset, chunk).await?;
    }
    client.flush().await?;
    Ok(())
}

pub async fn replication(args: &ReplicationArgs) -> anyhow::Result<Report> {
    let temp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            // Short path: the daemon's sockets live in it.
            temp = tempfile::Builder::new().prefix("drb").tempdir_in("/tmp")?;
            temp.path().to_path_buf()
        }
    };
    let size = args.size;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let path = |n: &str| dir.join(n);
    let size_s = size.to_string();
    for f in ["source.qcow2", "seed.qcow2"] {
        qemu_img(&["create", "-q", "-f", "qcow2", path(f).to_str().unwrap_or_default(), &size_s])?;
    }
    let mut rig = Rig { qsd: StorageDaemon::start(&dir.join("qsd")).await?, counter: 0 };
    rig.qsd.start_nbd_server().await?;

    // The source: random data everywhere, so that every byte is real work.
    let (src_node, src_export) = rig.export(&path("source.qcow2"), Backing::None, true, &[]).await?;
    let mut src = rig.client(&src_export, &["base:allocation"]).await?;
    write_random(&mut src, &mut rng, &ExtentSet::from_range(0, size)).await?;
    src.disconnect().await?;
    rig.close(&src_node).await?;

    // 1. Full copies into empty images, as a seed's, the target written at its places as a
    // transfer's is (or, for comparison, exported by a daemon of its own): the source through NBD (a running VM's disk, read through its QEMU) and from
    // its files (a powered-off VM's), interleaved with `qemu-img convert` of the same source,
    // each run cold. The source is exported read-only, so `qemu-img` may open it meanwhile.
    let targets = StorageDaemon::start(&dir.join("qsd-t")).await?;
    targets.start_nbd_server().await?;
    let (src_node, src_export) = rig.export(&path("source.qcow2"), Backing::None, false, &[]).await?;
    let mut src = rig.client(&src_export, &["base:allocation"]).await?;
    let mut cold = true;
    let (mut nbd_runs, mut file_runs, mut page_cache_runs) = (Vec::new(), Vec::new(), Vec::new());
    let (mut convert_runs, mut durable_runs, mut direct_runs) = (Vec::new(), Vec::new(), Vec::new());
    let mut first: Option<(CopyStats, Manifest)> = None;
    let source_file = path("source.qcow2");
    for run in 0..args.baseline_runs {
        let file = path(if run == 0 { "seed.qcow2" } else { "seed-again.qcow2" });
        let via_nbd = FullCopySource::Nbd(&mut src);
        let (secs, stats, m) = full_copy_once(&mut rig, &targets, via_nbd, &file, true, size, &mut cold).await?;
        nbd_runs.push((secs, stats.timing));
        if first.is_none() {
            first = Some((stats, m));
        }
        let again = path("seed-again.qcow2");
        let from_files = FullCopySource::Files(&source_file);
        let (secs, stats, m) = full_copy_once(&mut rig, &targets, from_files, &again, true, size, &mut cold).await?;
        file_runs.push((secs, stats.timing));
        if first.as_ref().is_some_and(|(_, first)| *first != m) {
            bail!("the full copies from the files and through NBD disagree on the source's content");
        }
        let via_nbd = FullCopySource::Nbd(&mut src);
        let (secs, stats, _) = full_copy_once(&mut rig, &targets, via_nbd, &again, false, size, &mut cold).await?;
        page_cache_runs.push((secs, stats.timing));
        for (cache, runs) in [
            (&[][..], &mut convert_runs),
            (&["-t", "writeback"][..], &mut durable_runs),
            (&["-t", "none"][..], &mut direct_runs),
        ] {
            let _ = std::fs::remove_file(path("convert.qcow2"));
            cold &= drop_caches();
            let start = Instant::now();
            let (from, to) = (path("source.qcow2"), path("convert.qcow2"));
            let mut convert_args = vec!["convert"];
            convert_args.extend_from_slice(cache);
            convert_args.extend_from_slice(&[
                "-O",
                "qcow2",
                from.to_str().unwrap_or_default(),
                to.to_str().unwrap_or_default(),
            ]);
            qemu_img(&convert_args)?;
            runs.push(start.elapsed().as_secs_f64());
        }
    }
    targets.shutdown().await?;
    let _ = std::fs::remove_file(path("seed-again.qcow2"));
    let _ = std::fs::remove_file(path("convert.qcow2"));
    let Some((stats, mut manifest)) = first else { bail!("no full copy ran") };
    let full_copy = Phase { seconds: nbd_runs[0].0, bytes_read: stats.source_read, bytes_sent: stats.written };
    let (full_copy_runs, full_copy_breakdown) = spread_and_median(&nbd_runs);
    let (full_copy_from_files_runs, full_copy_from_files_breakdown) = spread_and_median(&file_runs);
    let (full_copy_page_cache_runs, full_copy_page_cache_breakdown) = spread_and_median(&page_cache_runs);
    let convert_default = Spread::of(&convert_runs);
    let convert_durable = Spread::of(&durable_runs);
    let convert_direct = Spread::of(&direct_runs);
    let seed_manifest = manifest.clone();
    src.disconnect().await?;
    rig.close(&src_node).await?;
    let (src_node, src_export) = rig.export(&path("source.qcow2"), Backing::None, true, &[]).await?;
    let mut src = rig.client(&src_export, &[]).await?;

    // 2. Tracking from here: a persistent bitmap on the source; then random blocks change.
    rig.qsd
        .execute("block-dirty-bitmap-add", serde_json::json!({"node": src_node, "name": "bm1", "persistent": true}))
        .await?;
    let changed = random_blocks(&mut rng, size, ((size / BLOCK_SIZE) as f64 * args.change).ceil() as u64);
    write_random(&mut src, &mut rng, &changed).await?;
    let changed_bytes = changed.total_bytes();
    src.disconnect().await?;
    rig.close(&src_node).await?;
    // A read-only export may only carry a disabled bitmap; the next bitmap tracks what follows.
    let (src_node, src_export) = rig.export(&path("source.qcow2"), Backing::None, true, &[]).await?;
    rig.qsd
        .execute(
            "transaction",
            serde_json::json!({"actions": [
                {"type": "block-dirty-bitmap-disable", "data": {"node": src_node, "name": "bm1"}},
                {"type": "block-dirty-bitmap-add", "data": {"node": src_node, "name": "bm2", "persistent": true}}
            ]}),
        )
        .await?;
    rig.close(&src_node).await?;
    let (src_node, src_export) = {
        let _ = src_export;
        rig.export(&path("source.qcow2"), Backing::None, false, &["bm1"]).await?
    };

    // 3. Incremental: only the dirty granules, into a new point on the seed.
    overlay(&path("seed.qcow2"), &path("point2.qcow2"))?;
    let (p2_node, p2_export) = rig.export(&path("point2.qcow2"), Backing::FromImage, true, &[]).await?;
    let mut src = rig.client(&src_export, &["qemu:dirty-bitmap:bm1"]).await?;
    let mut p2 = rig.client(&p2_export, &[]).await?;
    let start = Instant::now();
    let dirty = src.dirty_extents("qemu:dirty-bitmap:bm1", 0, size).await?;
    let (stats, incr_secs) = timed(start, copy_extents(&mut src, &mut p2, &dirty, &mut manifest, |_, _| {}).await?);
    let incremental = Phase { seconds: incr_secs, bytes_read: stats.source_read, bytes_sent: stats.written };
    p2.disconnect().await?;
    rig.close(&p2_node).await?;

    // 4. Hash-compare into stale overlays on the seed: against the seed's manifest, then reading
    // both sides.
    enum Hc {
        Direct,
        Nbd,
        ReadingTarget,
    }
    let mut hash_compare_into = async |name: &str, how: Hc| -> anyhow::Result<(Phase, Manifest)> {
        let file = path(name);
        overlay(&path("seed.qcow2"), &file)?;
        let (node, export) = rig.export(&file, Backing::FromImage, true, &[]).await?;
        let mut stale = rig.client(&export, &[]).await?;
        let mut m = seed_manifest.clone();
        let start = Instant::now();
        let stats = match how {
            Hc::Direct => {
                let mut image = DirectImage::open(&drover_qemu::image::host_map(&path("source.qcow2")).await?)?;
                manifest_compare_sync(&mut image, &mut stale, &mut m, |_, _| {}).await?
            }
            Hc::Nbd => manifest_compare_sync(&mut src, &mut stale, &mut m, |_, _| {}).await?,
            Hc::ReadingTarget => hash_compare_sync(&mut src, &mut stale, &mut m, |_, _| {}).await?,
        };
        let seconds = start.elapsed().as_secs_f64();
        stale.disconnect().await?;
        rig.close(&node).await?;
        Ok((Phase { seconds, bytes_read: stats.source_read + stats.target_read, bytes_sent: stats.written }, m))
    };
    let (hash_compare, hc_manifest) = hash_compare_into("stale.qcow2", Hc::Direct).await?;
    let (hash_compare_through_nbd, nbd_manifest) = hash_compare_into("stale1.qcow2", Hc::Nbd).await?;
    let (hash_compare_reading_target, rt_manifest) = hash_compare_into("stale2.qcow2", Hc::ReadingTarget).await?;
    if hc_manifest != manifest || nbd_manifest != manifest || rt_manifest != manifest {
        bail!("hash-compare and the incremental path disagree on the source's content");
    }
    let (st_node, st_export) = rig.export(&path("stale.qcow2"), Backing::FromImage, false, &[]).await?;
    let mut stale = rig.client(&st_export, &[]).await?;
    // The floor: read both once, concurrently.
    let start = Instant::now();
    let mut off = 0;
    while off < size {
        let len = (4u64 << 20).min(size - off);
        let (a, b) = tokio::join!(src.read(off, len), stale.read(off, len));
        a?;
        b?;
        off += len;
    }
    let read_both_seconds = start.elapsed().as_secs_f64();
    stale.disconnect().await?;
    rig.close(&st_node).await?;
    src.disconnect().await?;
    rig.close(&src_node).await?;

    // 5. Failback. The replica boots from point 2 through an overlay and writes; production writes
    // too (bm2 tracks it). What must travel back is the union; production must end equal.
    overlay(&path("point2.qcow2"), &path("failover.qcow2"))?;
    let n = ((size / BLOCK_SIZE) as f64 * args.change / 2.0).ceil() as u64;
    let replica_writes = random_blocks(&mut rng, size, n);
    let prod_writes = random_blocks(&mut rng, size, n);
    let (fo_node, fo_export) = rig.export(&path("failover.qcow2"), Backing::FromImage, true, &[]).await?;
    let mut fo = rig.client(&fo_export, &[]).await?;
    write_random(&mut fo, &mut rng, &replica_writes).await?;
    fo.disconnect().await?;
    rig.close(&fo_node).await?;
    let (pr_node, pr_export) = rig.export(&path("source.qcow2"), Backing::None, true, &[]).await?;
    let mut prod = rig.client(&pr_export, &[]).await?;
    write_random(&mut prod, &mut rng, &prod_writes).await?;
    prod.disconnect().await?;
    rig.close(&pr_node).await?;
    let really_changed = replica_writes.union(&prod_writes).total_bytes();

    let start = Instant::now();
    // (a) What the replica wrote: the failover overlay's own clusters (opened without its backing).
    let (ov_node, ov_export) = rig.export(&path("failover.qcow2"), Backing::None, false, &[]).await?;
    let mut ov = rig.client(&ov_export, &["base:allocation"]).await?;
    let replica_changed = ov.data_extents(0, size).await?;
    ov.disconnect().await?;
    rig.close(&ov_node).await?;
    // (b) What production wrote since the point: bm2.
    let (pr_node, _) = rig.export(&path("source.qcow2"), Backing::None, true, &[]).await?;
    rig.qsd.execute("block-dirty-bitmap-disable", serde_json::json!({"node": pr_node, "name": "bm2"})).await?;
    rig.close(&pr_node).await?;
    let (pr_node, pr_export) = rig.export(&path("source.qcow2"), Backing::None, true, &["bm2"]).await?;
    let mut prod = rig.client(&pr_export, &["qemu:dirty-bitmap:bm2"]).await?;
    let prod_changed = prod.dirty_extents("qemu:dirty-bitmap:bm2", 0, size).await?;
    let union = replica_changed.union(&prod_changed);
    // Send the union from the replica's view (the failover overlay over its chain) to production.
    let (fv_node, fv_export) = rig.export(&path("failover.qcow2"), Backing::FromImage, false, &[]).await?;
    let mut replica = rig.client(&fv_export, &[]).await?;
    let mut fb_manifest = manifest.clone();
    let stats = copy_extents(&mut replica, &mut prod, &union, &mut fb_manifest, |_, _| {}).await?;
    let fb_secs = start.elapsed().as_secs_f64();
    replica.disconnect().await?;
    prod.disconnect().await?;
    rig.close(&fv_node).await?;
    rig.close(&pr_node).await?;
    rig.qsd.shutdown().await?;
    let equal_after = std::process::Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(path("source.qcow2"))
        .arg(path("failover.qcow2"))
        .status()?
        .success();
    let failback = FailbackReport {
        changed_bytes: really_changed,
        bytes_sent: stats.written,
        seconds: fb_secs,
        ratio: stats.written as f64 / really_changed.max(1) as f64,
        equal_after,
    };

    // 6. Baselines on the same data.
    let raw = |n: &str| path(n).with_extension("raw");
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        path("source.qcow2").to_str().unwrap_or_default(),
        raw("source").to_str().unwrap_or_default(),
    ])?;
    // Each baseline runs `--baseline-runs` times, interleaved (rsync, convert, rsync, ...), each
    // run on a fresh target and, where this process may, with the page cache dropped first, so
    // neither profits from the other's writes or reads. rsync gets `--ignore-times`: two raw
    // files of equal size and mtime would otherwise be taken as equal and nothing compared.
    let has_rsync = matches!(
        std::process::Command::new("rsync").arg("--version").output(),
        Ok(o) if o.status.success()
    );
    let mut rsync_runs = Vec::new();
    for _ in 0..args.baseline_runs {
        if has_rsync {
            let _ = std::fs::remove_file(raw("seed"));
            qemu_img(&[
                "convert",
                "-O",
                "raw",
                path("seed.qcow2").to_str().unwrap_or_default(),
                raw("seed").to_str().unwrap_or_default(),
            ])?;
            cold &= drop_caches();
            let start = Instant::now();
            let ok = std::process::Command::new("rsync")
                .args(["--inplace", "--no-whole-file", "--ignore-times"])
                .arg(raw("source"))
                .arg(raw("seed"))
                .status()?
                .success();
            if !ok {
                bail!("rsync failed");
            }
            rsync_runs.push(start.elapsed().as_secs_f64());
        }
    }
    let rsync = (!rsync_runs.is_empty()).then(|| Spread::of(&rsync_runs));
    let rsync_seconds = rsync.as_ref().map(|r| r.median);
    for f in ["source.raw", "seed.raw"] {
        let _ = std::fs::remove_file(path(f));
    }

    Ok(Report {
        size_bytes: size,
        change_fraction: args.change,
        changed_bytes,
        incremental_ratio: incremental.bytes_sent as f64 / changed_bytes.max(1) as f64,
        hash_compare_vs_rsync: rsync_seconds.map(|r| hash_compare.seconds / r.max(1e-9)),
        hash_compare_vs_read_both: hash_compare.seconds / read_both_seconds.max(1e-9),
        through_nbd_vs_rsync: rsync_seconds.map(|r| hash_compare_through_nbd.seconds / r.max(1e-9)),
        reading_target_vs_rsync: rsync_seconds.map(|r| hash_compare_reading_target.seconds / r.max(1e-9)),
        reading_target_vs_read_both: hash_compare_reading_target.seconds / read_both_seconds.max(1e-9),
        full_copy_speed_vs_convert_durable: convert_durable.median / full_copy_runs.median.max(1e-9),
        full_copy_speed_vs_convert_default: convert_default.median / full_copy_runs.median.max(1e-9),
        from_files_speed_vs_convert_durable: convert_durable.median / full_copy_from_files_runs.median.max(1e-9),
        full_copy_from_files_runs,
        full_copy_from_files_breakdown,
        full_copy_page_cache_runs,
        full_copy_page_cache_breakdown,
        full_copy,
        full_copy_runs,
        full_copy_breakdown,
        convert_default,
        convert_durable,
        convert_direct,
        incremental,
        hash_compare,
        hash_compare_through_nbd,
        hash_compare_reading_target,
        read_both_seconds,
        failback,
        rsync_seconds,
        rsync,
        baselines_cold: cold,
    })
}

/// The spread of timed copies, and the breakdown of the median one.
fn spread_and_median(runs: &[(f64, CopyTiming)]) -> (Spread, Breakdown) {
    let spread = Spread::of(&runs.iter().map(|(s, _)| *s).collect::<Vec<_>>());
    let mut by_time = runs.to_vec();
    by_time.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (seconds, timing) = by_time[by_time.len() / 2];
    (spread, Breakdown::of(seconds, &timing))
}

/// The minimum and median of repeated runs, in seconds.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    pub runs: usize,
    pub min: f64,
    pub median: f64,
}

impl Spread {
    fn of(runs: &[f64]) -> Spread {
        let mut v = runs.to_vec();
        v.sort_by(f64::total_cmp);
        let median = if v.is_empty() {
            0.0
        } else if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        Spread { runs: v.len(), min: v.first().copied().unwrap_or(0.0), median }
    }
}

/// Writes dirty pages back and drops the page cache, so the next timed run reads from the disk.
/// Only root may; returns whether it was done.
fn drop_caches() -> bool {
    let synced = std::process::Command::new("sync").status().is_ok_and(|s| s.success());
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn print_report(r: &Report) {
    let d = |s: f64| format!("{:.3} s", Duration::from_secs_f64(s).as_secs_f64());
    println!(
        "disk {} , {:.2}% of blocks changed ({})",
        mib(r.size_bytes),
        r.change_fraction * 100.0,
        mib(r.changed_bytes)
    );
    let footing = if r.baselines_cold { "page cache dropped before each run" } else { "warm page cache" };
    println!(
        "  full copy      {:>10}  read {:>12}  sent {:>12}",
        d(r.full_copy.seconds),
        mib(r.full_copy.bytes_read),
        mib(r.full_copy.bytes_sent)
    );
    let runs = |label: &str, spread: &Spread, b: &Breakdown| {
        println!(
            "    {label:<36} min {:>9}  median {:>9}  ({} runs, {footing}, interleaved with convert)",
            d(spread.min),
            d(spread.median),
            spread.runs
        );
        println!(
            "      the median run's {} (stages overlap): source map {}, read {}, write {}, hash {}, flush {}",
            d(b.seconds),
            d(b.source_map),
            d(b.read),
            d(b.write),
            d(b.hash),
            d(b.flush)
        );
    };
    runs("full copy, source through NBD", &r.full_copy_runs, &r.full_copy_breakdown);
    runs("full copy, source from its files", &r.full_copy_from_files_runs, &r.full_copy_from_files_breakdown);
    runs("full copy, NBD, target in page cache", &r.full_copy_page_cache_runs, &r.full_copy_page_cache_breakdown);
    println!(
        "    {:<36} min {:>9}  median {:>9}  (durable; full copy speed {:.2}x through NBD, {:.2}x from files)",
        "qemu-img convert -t writeback",
        d(r.convert_durable.min),
        d(r.convert_durable.median),
        r.full_copy_speed_vs_convert_durable,
        r.from_files_speed_vs_convert_durable
    );
    println!(
        "    {:<36} min {:>9}  median {:>9}  (durable, O_DIRECT target as the full copy's)",
        "qemu-img convert -t none",
        d(r.convert_direct.min),
        d(r.convert_direct.median)
    );
    println!(
        "    {:<36} min {:>9}  median {:>9}  (default cache=unsafe: no flush, data left in the page cache; full copy speed {:.2}x)",
        "qemu-img convert",
        d(r.convert_default.min),
        d(r.convert_default.median),
        r.full_copy_speed_vs_convert_default
    );
    println!(
        "  incremental    {:>10}  read {:>12}  sent {:>12}  sent/changed {:.3}",
        d(r.incremental.seconds),
        mib(r.incremental.bytes_read),
        mib(r.incremental.bytes_sent),
        r.incremental_ratio
    );
    println!(
        "  hash-compare   {:>10}  read {:>12}  sent {:>12}",
        d(r.hash_compare.seconds),
        mib(r.hash_compare.bytes_read),
        mib(r.hash_compare.bytes_sent)
    );
    println!(
        "  hash-compare, source through NBD (running VM) {:>10}  read {:>12}  sent {:>12}",
        d(r.hash_compare_through_nbd.seconds),
        mib(r.hash_compare_through_nbd.bytes_read),
        mib(r.hash_compare_through_nbd.bytes_sent)
    );
    println!(
        "  hash-compare reading the target too {:>10}  read {:>12}  sent {:>12}",
        d(r.hash_compare_reading_target.seconds),
        mib(r.hash_compare_reading_target.bytes_read),
        mib(r.hash_compare_reading_target.bytes_sent)
    );
    println!(
        "  read both once {:>10}  (hash-compare / read-both {:.2}; reading the target too {:.2})",
        d(r.read_both_seconds),
        r.hash_compare_vs_read_both,
        r.reading_target_vs_read_both
    );
    match (&r.rsync, r.hash_compare_vs_rsync, r.through_nbd_vs_rsync, r.reading_target_vs_rsync) {
        (Some(s), Some(x), Some(n), Some(y)) => println!(
            "  rsync --inplace --no-whole-file --ignore-times  min {:>10}  median {:>10}  ({} runs, {footing}; hash-compare / rsync median {:.2}; through NBD {:.2}; reading the target too {:.2})",
            d(s.min),
            d(s.median),
            s.runs,
            x,
            n,
            y
        ),
        _ => println!("  rsync: not installed"),
    }
    println!(
        "  failback       {:>10}  sent {:>12} for {} really changed (ratio {:.3}); production equals replica: {}",
        d(r.failback.seconds),
        mib(r.failback.bytes_sent),
        mib(r.failback.changed_bytes),
        r.failback.ratio,
        r.failback.equal_after
    );
}
