//! Restore-point chains on real qcow2 images: points read as they were written, retention keeps
//! every remaining point intact (also when it is run twice, as after a crash), boot overlays
//! never write into a point, and garbage collection removes only what no point uses.

use std::path::Path;
use std::process::Command;

use drover_block::chain::{ChainDir, manifest_path};
use drover_block::hash::{BLOCK_SIZE, Manifest};

const SIZE: u64 = 1 << 20;

fn qemu_io_write(image: &Path, pattern: u8, offset: u64, len: u64) {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", &format!("write -P {pattern} {offset} {len}")])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// What a guest sees through `image` (its whole chain), as raw bytes.
fn read_all(image: &Path) -> Vec<u8> {
    let raw = image.with_extension("raw-view");
    let out = Command::new("qemu-img").args(["convert", "-U", "-O", "raw"]).arg(image).arg(&raw).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    bytes
}

fn expect(points: &[(u8, u64, u64)]) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    for (pattern, off, len) in points {
        v[*off as usize..(*off + *len) as usize].fill(*pattern);
    }
    v
}

#[tokio::test]
async fn points_retention_and_boot_overlays() {
    let dir = tempfile::tempdir().unwrap();
    let chain = ChainDir::new(dir.path().join("disk0"));
    // Three points, each changing one block.
    let p1 = chain.new_point_file(SIZE, None).await.unwrap();
    qemu_io_write(&p1, 0x11, 0, BLOCK_SIZE);
    let p2 = chain.new_point_file(SIZE, Some(&p1)).await.unwrap();
    qemu_io_write(&p2, 0x22, BLOCK_SIZE, BLOCK_SIZE);
    let p3 = chain.new_point_file(SIZE, Some(&p2)).await.unwrap();
    qemu_io_write(&p3, 0x33, 0, 4096);
    let want1 = expect(&[(0x11, 0, BLOCK_SIZE)]);
    let want2 = expect(&[(0x11, 0, BLOCK_SIZE), (0x22, BLOCK_SIZE, BLOCK_SIZE)]);
    let want3 = expect(&[(0x11, 0, BLOCK_SIZE), (0x22, BLOCK_SIZE, BLOCK_SIZE), (0x33, 0, 4096)]);
    assert_eq!(read_all(&p1), want1);
    assert_eq!(read_all(&p2), want2);
    assert_eq!(read_all(&p3), want3);

    // Manifests follow the data through retention.
    let mut m2 = Manifest::zeroed(SIZE);
    m2.set_range(0, &want2).unwrap();
    m2.save(&manifest_path(&p2)).await.unwrap();

    // A point of the wrong size is refused.
    assert!(chain.new_point_file(SIZE * 2, Some(&p3)).await.is_err());

    // Retire point 1, twice (a crash after the first run is repaired by a second).
    let holder = chain.retire_oldest(&p1, &p2, Some(&p3)).await.unwrap();
    assert_eq!(holder, p1);
    assert_eq!(read_all(&p1), want2, "the oldest file now holds point 2");
    assert_eq!(read_all(&p2), want2, "point 2's old file still reads as point 2");
    assert_eq!(read_all(&p3), want3, "point 3 is untouched");
    let again = chain.retire_oldest(&p1, &p2, Some(&p3)).await.unwrap();
    assert_eq!(again, p1);
    assert_eq!(read_all(&p3), want3);
    assert_eq!(drover_qemu::image::info(&p3).await.unwrap().backing.as_deref(), Some(p1.as_path()));
    assert_eq!(Manifest::load(&manifest_path(&p1)).await.unwrap(), m2);

    // Garbage: the merged-away file goes, the points stay, and still read the same.
    let removed = chain.collect_garbage(&[p1.clone(), p3.clone()]).await.unwrap();
    assert!(removed.contains(&p2) && removed.contains(&manifest_path(&p2)), "{removed:?}");
    assert!(!p2.exists());
    assert_eq!(read_all(&p1), want2);
    assert_eq!(read_all(&p3), want3);

    // A VM boots through an overlay: its writes never reach the point.
    let boot = chain.boot_overlay(&p3, "failover-1").await.unwrap();
    assert_eq!(chain.boot_overlay(&p3, "failover-1").await.unwrap(), boot, "idempotent");
    assert!(chain.boot_overlay(&p1, "failover-1").await.is_err(), "same label on another point");
    qemu_io_write(&boot, 0x44, 2 * BLOCK_SIZE, BLOCK_SIZE);
    assert_eq!(read_all(&p3), want3);
    assert_eq!(
        read_all(&boot),
        expect(&[
            (0x11, 0, BLOCK_SIZE),
            (0x22, BLOCK_SIZE, BLOCK_SIZE),
            (0x33, 0, 4096),
            (0x44, 2 * BLOCK_SIZE, BLOCK_SIZE)
        ])
    );
    // Garbage collection leaves a boot overlay alone (a VM may run on it); discarding it
    // (undo failover) removes it and leaves the points.
    chain.collect_garbage(&[p1.clone(), p3.clone()]).await.unwrap();
    assert!(boot.exists());
    chain.discard_boot_overlay("failover-1").await.unwrap();
    chain.discard_boot_overlay("failover-1").await.unwrap();
    assert!(!boot.exists());
    assert_eq!(read_all(&p3), want3);

    // Retiring against a chain that is not shaped as claimed is refused and changes nothing.
    let err = chain.retire_oldest(&p3, &p1, None).await.unwrap_err();
    assert!(err.to_string().contains("not by"), "{err}");
    assert_eq!(read_all(&p1), want2);
}
