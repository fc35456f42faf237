//! Writing a preallocated qcow2 at the places of its guest bytes: what QEMU reads back is what
//! was written (aligned pieces past the page cache, an unaligned tail through it, zeros as holes).

use drover_block::direct::{PlacedImage, direct_buf};

fn qemu_io(image: &std::path::Path, cmd: &str) {
    let out = std::process::Command::new("qemu-io").arg("-c").arg(cmd).arg(image).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The guest's bytes as QEMU reads them.
fn guest_bytes(image: &std::path::Path) -> Vec<u8> {
    let raw = image.with_extension("raw");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-O", "raw"])
        .arg(image)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(raw).unwrap()
}

#[tokio::test]
async fn bytes_written_at_their_places_are_what_qemu_reads() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("seed.qcow2");
    // Not a whole number of pages: the last piece cannot go past the page cache.
    let size = (3 << 20) + 512;
    drover_qemu::image::create_qcow2_preallocated(&image, size).await.unwrap();
    let map = drover_qemu::image::placed_map(&image).await.unwrap().unwrap();
    let placed = PlacedImage::open(&map).unwrap();
    assert_eq!(placed.size(), size);

    let mut expect = vec![0u8; size as usize];
    let mut fill = |at: usize, len: usize, seed: u8| {
        let mut buf = direct_buf(len);
        buf.extend_from_slice(&(0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect::<Vec<_>>());
        expect[at..at + len].copy_from_slice(&buf);
        placed.write_at(at as u64, &buf).unwrap();
    };
    fill(0, 1 << 20, 1);
    fill((2 << 20) + 4096, (1 << 20) - 4096 + 512, 2); // to the unaligned end
    fill(1 << 20, 64 << 10, 3);
    // A range that had data reads as zeros again.
    placed.write_zeroes(4096, 8192).unwrap();
    expect[4096..4096 + 8192].fill(0);
    placed.sync().unwrap();
    assert!(guest_bytes(&image) == expect, "QEMU reads what was written at the places");
    // Nothing allocated: the metadata is what `qemu-img create` left.
    assert_eq!(drover_qemu::image::placed_map(&image).await.unwrap().unwrap().extents, map.extents);
    qemu_io(&image, "read -P 0 4096 8192");

    let err = placed.write_at(size - 512, &[7u8; 1024]).unwrap_err();
    assert!(err.to_string().contains("past the end"), "{err}");
}

/// A seed's copy into a new image written at its places: the image equals its source, and the
/// zero ranges of the source were never written (the file stays sparse there).
#[tokio::test]
async fn a_full_copy_into_a_placed_image_equals_its_source() {
    use drover_block::copy::{TargetBefore, copy_extents_into};
    use drover_block::direct::DirectImage;
    use drover_block::extents::ExtentSet;
    use drover_block::hash::Manifest;
    let dir = tempfile::tempdir().unwrap();
    let (source, seed) = (dir.path().join("source.qcow2"), dir.path().join("seed.qcow2"));
    let size = 16 << 20;
    drover_qemu::image::create_qcow2(&source, size).await.unwrap();
    qemu_io(&source, "write -P 0x42 0 3M");
    qemu_io(&source, "write -P 0x17 9M 2M");
    drover_qemu::image::create_qcow2_preallocated(&seed, size).await.unwrap();
    let mut src = DirectImage::open(&drover_qemu::image::host_map(&source).await.unwrap()).unwrap();
    let mut dst = PlacedImage::open(&drover_qemu::image::placed_map(&seed).await.unwrap().unwrap()).unwrap();
    let mut manifest = Manifest::zeroed(size);
    let whole = ExtentSet::from_range(0, size);
    let stats =
        copy_extents_into(&mut src, &mut dst, &whole, TargetBefore::Zeroes, &mut manifest, |_, _| {}).await.unwrap();
    assert_eq!(stats.written, 5 << 20, "{stats:?}");
    assert!(drover_qemu::image::compare(&source, &seed).await.unwrap());
    let mut expect = Manifest::zeroed(size);
    expect.set_range(0, &guest_bytes(&source)).unwrap();
    assert_eq!(manifest.digest(), expect.digest());
}
