//! What the change-tracking tests of the QEMU and libvirt drivers share: reading an NBD export
//! with libnbd's tools (they stand in for drover-block's NBD client) and the replication
//! property's arithmetic on extents.
#![allow(dead_code)]

use std::process::Command;

use drover_qemu::qsd::NbdEndpoint;

pub fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Dirty `(offset, length)` ranges of `context` on the export, from `nbdinfo --map`.
pub fn dirty_extents(nbd: &NbdEndpoint, context: &str) -> Vec<(u64, u64)> {
    let out = run(Command::new("nbdinfo").arg(format!("--map={context}")).arg(nbd.uri()));
    let mut extents = Vec::new();
    for line in String::from_utf8(out).unwrap().lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() >= 3 && fields[2] == "1" {
            extents.push((fields[0].parse().unwrap(), fields[1].parse().unwrap()));
        }
    }
    extents
}

pub fn total(extents: &[(u64, u64)]) -> u64 {
    extents.iter().map(|(_, len)| len).sum()
}

/// The whole exported view, which must be `size` bytes.
pub fn read_view(nbd: &NbdEndpoint, size: u64) -> Vec<u8> {
    let view = run(Command::new("nbdcopy").arg(nbd.uri()).arg("-"));
    assert_eq!(view.len() as u64, size);
    view
}

/// Whether `needle` occurs inside one of `extents` of `view`.
pub fn found_in(view: &[u8], extents: &[(u64, u64)], needle: &str) -> bool {
    extents.iter().any(|&(off, len)| {
        let range = &view[off as usize..(off + len) as usize];
        range.windows(needle.len()).any(|w| w == needle.as_bytes())
    })
}

/// `base` patched with `extents` of `update`: what a replica holds after applying a cycle.
pub fn patched(base: &[u8], update: &[u8], extents: &[(u64, u64)]) -> Vec<u8> {
    let mut out = base.to_vec();
    for &(off, len) in extents {
        let range = off as usize..(off + len) as usize;
        out[range.clone()].copy_from_slice(&update[range]);
    }
    out
}

/// Every byte range of `inner` lies inside `outer`.
pub fn covered(inner: &[(u64, u64)], outer: &[(u64, u64)]) -> bool {
    inner.iter().all(|&(off, len)| {
        let mut pos = off;
        while pos < off + len {
            match outer.iter().find(|&&(o, l)| o <= pos && pos < o + l) {
                Some(&(o, l)) => pos = o + l,
                None => return false,
            }
        }
        true
    })
}
