//! Copying between real NBD exports (qemu-nbd on qcow2 images): a seed copy of the allocated
//! data, an incremental copy of exactly the dirty granules of a bitmap, and a hash-compare sync
//! that writes only the blocks that differ (reading both sides, or the source against the target's
//! manifest). Each ends with images that `qemu-img compare` finds
//! equal and a manifest equal to one computed from the whole source.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_block::copy::{TargetBefore, copy_extents, copy_extents_into, hash_compare_sync, manifest_compare_sync};
use drover_block::direct::DirectImage;
use drover_block::extents::ExtentSet;
use drover_block::hash::{BLOCK_SIZE, Manifest};
use drover_block::nbd::NbdClient;

const SIZE: u64 = 16 << 20;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn write(image: &Path, pattern: u8, offset: u64, len: u64) {
    run("qemu-io", &["-f", "qcow2", "-c", &format!("write -P {pattern} {offset} {len}"), image.to_str().unwrap()]);
}

struct Nbd {
    child: Child,
    socket: PathBuf,
}

impl Nbd {
    fn serve(image: &Path, extra: &[&str]) -> Nbd {
        let socket = image.with_extension("sock");
        let mut args = vec![
            format!("--socket={}", socket.display()),
            "--format=qcow2".into(),
            "--export-name=disk".into(),
            "--persistent".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push(image.display().to_string());
        let child = Command::new("qemu-nbd").args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "qemu-nbd did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nbd { child, socket }
    }
    async fn client(&self, contexts: &[&str]) -> NbdClient<tokio::net::UnixStream> {
        NbdClient::connect_unix(&self.socket, "disk", contexts).await.unwrap()
    }
}

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn equal(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img").args(["compare", "-q", "-U"]).arg(a).arg(b).status().unwrap().success()
}

async fn full_manifest(image: &Path) -> Manifest {
    let server = Nbd::serve(image, &["--read-only"]);
    let mut c = server.client(&[]).await;
    let data = c.read(0, SIZE).await.unwrap();
    let mut m = Manifest::zeroed(SIZE);
    m.set_range(0, &data).unwrap();
    m
}

#[tokio::test]
async fn seed_incremental_and_hash_compare() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", source.to_str().unwrap(), &SIZE.to_string()]);
    write(&source, 0x11, 0, 1 << 20);
    write(&source, 0x22, 5 << 20, 300 << 10);
    // Tracking starts with the seed: writes from now on are in the bitmap.
    run("qemu-img", &["bitmap", "--add", source.to_str().unwrap(), "bm1"]);

    // Seed: the allocated data of the source into a fresh file.
    let seed = dir.path().join("seed.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", seed.to_str().unwrap(), &SIZE.to_string()]);
    let mut manifest = Manifest::zeroed(SIZE);
    {
        let src = Nbd::serve(&source, &["--read-only"]);
        let dst = Nbd::serve(&seed, &[]);
        let (mut s, mut d) = (src.client(&["base:allocation"]).await, dst.client(&[]).await);
        let data = s.data_extents(0, SIZE).await.unwrap();
        let mut calls = 0;
        let stats = copy_extents(&mut s, &mut d, &data, &mut manifest, |done, total| {
            assert!(done <= total);
            calls += 1;
        })
        .await
        .unwrap();
        assert!(calls > 0);
        assert!(stats.written < SIZE / 2, "the seed moves the allocated data, not the whole disk: {stats:?}");
        d.disconnect().await.unwrap();
    }
    assert!(equal(&source, &seed));
    assert_eq!(manifest, full_manifest(&source).await);
    let seed_manifest = manifest.clone();

    // Changes after the seed: three 4 KiB writes in three granules.
    for (pattern, offset) in [(0x33u8, 64u64 << 10), (0x44, 8 << 20), (0x55, (16 << 20) - 4096)] {
        write(&source, pattern, offset, 4096);
    }
    let changed_granules = 3 * BLOCK_SIZE;

    // Incremental: a new point over the seed receives exactly the dirty granules.
    let point2 = dir.path().join("point2.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", seed.to_str().unwrap(), point2.to_str().unwrap()],
    );
    {
        let src = Nbd::serve(&source, &["--read-only", "-B", "bm1"]);
        let dst = Nbd::serve(&point2, &[]);
        let (mut s, mut d) = (src.client(&["qemu:dirty-bitmap:bm1"]).await, dst.client(&[]).await);
        let dirty = s.dirty_extents("qemu:dirty-bitmap:bm1", 0, SIZE).await.unwrap();
        let stats = copy_extents(&mut s, &mut d, &dirty, &mut manifest, |_, _| {}).await.unwrap();
        assert_eq!(stats.written, changed_granules, "only the changed granules move: {stats:?}");
        assert_eq!(stats.source_read, changed_granules);
        d.disconnect().await.unwrap();
    }
    assert!(equal(&source, &point2));
    assert!(equal(&seed, &seed), "sanity");
    assert!(!equal(&source, &seed), "the seed itself was not written");
    assert_eq!(manifest, full_manifest(&source).await);
    assert_eq!(seed_manifest.diff(&manifest).unwrap().len(), 3);

    // Hash-compare: a stale overlay on the seed is brought level, writing only the differing blocks.
    let stale = dir.path().join("stale.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", seed.to_str().unwrap(), stale.to_str().unwrap()],
    );
    let mut hc_manifest = Manifest::zeroed(SIZE);
    {
        let src = Nbd::serve(&source, &["--read-only"]);
        let dst = Nbd::serve(&stale, &[]);
        let (mut s, mut d) = (src.client(&[]).await, dst.client(&[]).await);
        let stats = hash_compare_sync(&mut s, &mut d, &mut hc_manifest, |_, _| {}).await.unwrap();
        assert_eq!((stats.source_read, stats.target_read), (SIZE, SIZE), "each side is read once");
        assert_eq!(stats.written, changed_granules, "only differing blocks are written: {stats:?}");
        d.disconnect().await.unwrap();
    }
    assert!(equal(&source, &stale));
    assert_eq!(hc_manifest, manifest);

    // A second hash-compare finds nothing to write.
    {
        let src = Nbd::serve(&source, &["--read-only"]);
        let dst = Nbd::serve(&stale, &[]);
        let (mut s, mut d) = (src.client(&[]).await, dst.client(&[]).await);
        let stats = hash_compare_sync(&mut s, &mut d, &mut hc_manifest, |_, _| {}).await.unwrap();
        assert_eq!(stats.written, 0);
    }

    // Sizes must agree.
    let other = dir.path().join("other.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", other.to_str().unwrap(), &(SIZE * 2).to_string()]);
    let src = Nbd::serve(&source, &["--read-only"]);
    let dst = Nbd::serve(&other, &[]);
    let (mut s, mut d) = (src.client(&[]).await, dst.client(&[]).await);
    assert!(hash_compare_sync(&mut s, &mut d, &mut Manifest::zeroed(SIZE), |_, _| {}).await.is_err());
}

/// The fallback of replication: the target is a new overlay on a restore point whose manifest
/// is known. Only the source is read, its holes not at all; changed blocks are written and
/// blocks that became zeros on the source are zeroed on the target.
#[tokio::test]
async fn manifest_compare_reads_only_the_source_and_skips_its_holes() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", source.to_str().unwrap(), &SIZE.to_string()]);
    write(&source, 0x11, 0, 1 << 20);
    write(&source, 0x22, 5 << 20, 320 << 10);
    // The restore point: a whole copy, with its manifest.
    let point = dir.path().join("point.qcow2");
    run("qemu-img", &["convert", "-O", "qcow2", source.to_str().unwrap(), point.to_str().unwrap()]);
    let point_manifest = full_manifest(&point).await;

    // Production changes with no bitmap to tell: three blocks written, two zeroed (unmapped).
    for (pattern, offset) in [(0x33u8, 64u64 << 10), (0x44, 8 << 20), (0x55, (16 << 20) - 4096)] {
        write(&source, pattern, offset, 4096);
    }
    run("qemu-io", &["-f", "qcow2", "-c", &format!("write -z -u {} {}", 5 << 20, 128 << 10), source.to_str().unwrap()]);

    // `contexts` None: the source is read from its files, not through NBD.
    let sync = |name: &'static str, contexts: Option<&'static [&'static str]>| {
        let new_point = dir.path().join(name);
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", point.to_str().unwrap(), new_point.to_str().unwrap()],
        );
        let source = source.clone();
        let mut manifest = point_manifest.clone();
        async move {
            let dst = Nbd::serve(&new_point, &[]);
            let mut d = dst.client(&[]).await;
            let stats = match contexts {
                Some(contexts) => {
                    let src = Nbd::serve(&source, &["--read-only"]);
                    let mut s = src.client(contexts).await;
                    manifest_compare_sync(&mut s, &mut d, &mut manifest, |_, _| {}).await.unwrap()
                }
                None => {
                    let map = drover_qemu::image::host_map(&source).await.unwrap();
                    let mut s = DirectImage::open(&map).unwrap();
                    manifest_compare_sync(&mut s, &mut d, &mut manifest, |_, _| {}).await.unwrap()
                }
            };
            d.disconnect().await.unwrap();
            drop(dst);
            assert!(equal(&source, &new_point), "{name} equals the source");
            (stats, manifest)
        }
    };
    let truth = full_manifest(&source).await;

    let (stats, manifest) = sync("a.qcow2", Some(&["base:allocation"])).await;
    assert_eq!(manifest, truth);
    assert_eq!(stats.target_read, 0, "the target is never read");
    assert_eq!(stats.written, 3 * BLOCK_SIZE + 2 * BLOCK_SIZE, "changed and zeroed blocks only: {stats:?}");
    assert!(stats.source_read < SIZE / 4, "the source's holes are not read: {stats:?}");
    let allocation_aware = stats;

    // Without allocation status the whole source is read; the outcome is the same.
    let (stats, manifest) = sync("b.qcow2", Some(&[])).await;
    assert_eq!(manifest, truth);
    assert_eq!((stats.source_read, stats.target_read), (SIZE, 0));
    assert_eq!(stats.written, 5 * BLOCK_SIZE);

    // Read from the source's files (mapped by qemu-img): the same, its holes not read either.
    let (direct, manifest) = sync("c.qcow2", None).await;
    assert_eq!(manifest, truth);
    assert_eq!(direct, allocation_aware, "the same blocks read and written as through NBD with base:allocation");
}

/// An image read from its files (a two-layer chain, zeros and holes among the data) reads as
/// QEMU reads it, at any offset and length; an image with a compressed cluster is refused.
#[tokio::test]
async fn a_direct_image_reads_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top, raw) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"), dir.path().join("top.raw"));
    run("qemu-img", &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), &SIZE.to_string()]);
    write(&base, 0x11, 0, 3 << 20);
    write(&base, 0x12, 7 << 20, 100 << 10);
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base.to_str().unwrap(), top.to_str().unwrap()],
    );
    write(&top, 0x21, (1 << 20) + 4096, 200 << 10);
    run("qemu-io", &["-f", "qcow2", "-c", &format!("write -z {} {}", 2 << 20, 128 << 10), top.to_str().unwrap()]);
    run("qemu-img", &["convert", "-O", "raw", top.to_str().unwrap(), raw.to_str().unwrap()]);
    let truth = std::fs::read(&raw).unwrap();

    let image = DirectImage::open(&drover_qemu::image::host_map(&top).await.unwrap()).unwrap();
    assert_eq!(image.size(), SIZE);
    let mut whole = vec![0xeeu8; SIZE as usize];
    image.read_at(0, &mut whole).unwrap();
    assert!(whole == truth, "the whole image reads as qemu-img convert writes it");
    // Odd offsets and lengths that cross extents of both layers, zeros and holes.
    for (offset, len) in [(0u64, 1u64), ((1 << 20) + 4095, 9000), ((2 << 20) - 7, (5 << 20) + 13), (SIZE - 3, 3)] {
        let mut buf = vec![0xeeu8; len as usize];
        image.read_at(offset, &mut buf).unwrap();
        assert!(buf[..] == truth[offset as usize..(offset + len) as usize], "{offset}+{len}");
    }
    assert!(image.read_at(SIZE - 3, &mut [0u8; 4]).is_err(), "past the end");
    let data: u64 = image.data_extents().total_bytes();
    assert!(data < SIZE / 4, "holes are not data: {data}");

    run("qemu-io", &["-f", "qcow2", "-c", &format!("write -c -P 0x33 {} 65536", 12 << 20), top.to_str().unwrap()]);
    let err = DirectImage::open(&drover_qemu::image::host_map(&top).await.unwrap()).unwrap_err();
    assert!(err.to_string().contains("compressed"), "{err}");
}

/// The guest ranges `qemu-img map` says hold data in the image itself (its own clusters, not a
/// backing file's; zero clusters excluded), merged.
fn allocated_data(image: &Path) -> ExtentSet {
    let out = Command::new("qemu-img").args(["map", "--output=json", "-U"]).arg(image).output().unwrap();
    assert!(out.status.success(), "qemu-img map: {}", String::from_utf8_lossy(&out.stderr));
    let map: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    map.iter()
        .filter(|e| e["data"] == true && e["depth"] == 0)
        .map(|e| drover_block::extents::Extent::new(e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

/// A seed into a brand-new image: the source's block status says where its holes are (not
/// read), and blocks that read as zeroes among its data (written zeroes, allocated) are read
/// but not written: the target's clusters stay unallocated there.
#[tokio::test]
async fn a_seed_into_a_new_image_leaves_zero_blocks_unallocated() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.qcow2");
    run("qemu-img", &["create", "-q", "-f", "qcow2", source.to_str().unwrap(), &SIZE.to_string()]);
    write(&source, 0x11, 0, 1 << 20);
    // Allocated, reads as zeroes: data to the source's block status.
    write(&source, 0x00, 2 << 20, 1 << 20);
    // 4 KiB of data in the middle of a block: the whole block is copied.
    write(&source, 0x22, (5 << 20) + 4096, 4096);
    // A hole the source reports as zeroes.
    run("qemu-io", &["-f", "qcow2", "-c", &format!("write -z {} {}", 9 << 20, 1 << 20), source.to_str().unwrap()]);

    for (name, contexts) in [("seed-a.qcow2", &["base:allocation"][..]), ("seed-b.qcow2", &[][..])] {
        let seed = dir.path().join(name);
        run("qemu-img", &["create", "-q", "-f", "qcow2", seed.to_str().unwrap(), &SIZE.to_string()]);
        let mut manifest = Manifest::zeroed(SIZE);
        let stats = {
            let src = Nbd::serve(&source, &["--read-only"]);
            let dst = Nbd::serve(&seed, &[]);
            let (mut s, mut d) = (src.client(contexts).await, dst.client(&[]).await);
            let whole = ExtentSet::from_range(0, SIZE);
            let stats = copy_extents_into(&mut s, &mut d, &whole, TargetBefore::Zeroes, &mut manifest, |_, _| {})
                .await
                .unwrap();
            d.disconnect().await.unwrap();
            stats
        };
        assert!(equal(&source, &seed), "{name} equals the source");
        assert_eq!(manifest, full_manifest(&source).await);
        let data = (1 << 20) + BLOCK_SIZE;
        assert_eq!(stats.written, data, "only blocks with data are written: {stats:?}");
        assert_eq!(stats.zeroes_skipped, SIZE - data, "{stats:?}");
        let expected: ExtentSet = [(0, 1 << 20), (5 << 20, BLOCK_SIZE)]
            .iter()
            .map(|&(o, l)| drover_block::extents::Extent::new(o, l))
            .collect();
        assert_eq!(allocated_data(&seed), expected, "{name}: only clusters with data are allocated");
        if contexts.is_empty() {
            assert_eq!(stats.source_read, SIZE, "without block status the whole source is read");
        } else {
            assert!(stats.source_read <= (4 << 20), "the source's holes are not read: {stats:?}");
        }
    }
}

/// Into a target that is not known to read as zeroes (an overlay on older data), zeroes on the
/// source, holes or written zeroes, are written as zeroes; the images end equal. The source
/// may be read from its files as well.
#[tokio::test]
async fn a_copy_into_an_overlay_writes_zeroes_over_older_data() {
    let dir = tempfile::tempdir().unwrap();
    let (base, source) = (dir.path().join("base.qcow2"), dir.path().join("source.qcow2"));
    for image in [&base, &source] {
        run("qemu-img", &["create", "-q", "-f", "qcow2", image.to_str().unwrap(), &SIZE.to_string()]);
    }
    write(&base, 0x77, 0, SIZE);
    write(&source, 0x11, 0, 1 << 20);
    write(&source, 0x00, 3 << 20, 256 << 10);
    write(&source, 0x22, 12 << 20, 64 << 10);

    for (name, direct) in [("a.qcow2", false), ("b.qcow2", true)] {
        let overlay = dir.path().join(name);
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base.to_str().unwrap(), overlay.to_str().unwrap()],
        );
        let mut manifest = Manifest::zeroed(SIZE);
        let whole = ExtentSet::from_range(0, SIZE);
        let dst = Nbd::serve(&overlay, &[]);
        let mut d = dst.client(&[]).await;
        let stats = if direct {
            let mut s = DirectImage::open(&drover_qemu::image::host_map(&source).await.unwrap()).unwrap();
            copy_extents_into(&mut s, &mut d, &whole, TargetBefore::Unknown, &mut manifest, |_, _| {}).await.unwrap()
        } else {
            let src = Nbd::serve(&source, &["--read-only"]);
            let mut s = src.client(&["base:allocation"]).await;
            copy_extents_into(&mut s, &mut d, &whole, TargetBefore::Unknown, &mut manifest, |_, _| {}).await.unwrap()
        };
        d.disconnect().await.unwrap();
        drop(dst);
        assert!(equal(&source, &overlay), "{name} equals the source");
        assert_eq!(manifest, full_manifest(&source).await);
        assert_eq!((stats.written, stats.zeroes_skipped), (SIZE, 0), "{name}: {stats:?}");
        assert!(stats.source_read < SIZE / 2, "{name}: the source's holes are not read: {stats:?}");
    }
}
