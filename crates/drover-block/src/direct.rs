//! Reading an image that nobody writes to straight from its files.
//!
//! The hash-compare of a powered-off disk must read every allocated byte of it. Through an NBD
//! server that costs the server about as much CPU as the bytes are worth (measured: 0.6 CPU-s per
//! GiB for `qemu-storage-daemon`, the whole floor of the sync on two cores), while the bytes are
//! plain ranges of the qcow2 files. `qemu-img map` (the reference qcow2 implementation, see
//! [`drover_qemu::image::host_map`]) says where each guest range is; this module only reads those
//! ranges with `pread`. An image with anything QEMU must decode (compressed clusters, encryption,
//! an external data file) is refused, and the caller reads it through NBD as before.
//!
//! The caller guarantees the image does not change while it is read: a powered-off VM's disk is
//! held open (and its write lock taken) by the storage daemon of the replication cut, which only
//! reads it and keeps its bitmaps.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use drover_qemu::image::{HostExtent, HostMap, Placement};

use crate::extents::{Extent, ExtentSet};

#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("the image cannot be read from its files: {0}")]
    NotDirect(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// An image's files and where its bytes are in them. Cheap to clone (shared).
#[derive(Debug, Clone)]
pub struct DirectImage(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    size: u64,
    files: Vec<(PathBuf, File)>,
    extents: Vec<HostExtent>,
}

impl DirectImage {
    /// Opens the files of `map` read-only. Refuses a map with anything only QEMU can read.
    pub fn open(map: &HostMap) -> Result<DirectImage, DirectError> {
        if let Some(why) = map.why_not_direct() {
            return Err(DirectError::NotDirect(why));
        }
        let files = map
            .files
            .iter()
            .map(|p| match File::open(p) {
                Ok(f) => Ok((p.clone(), f)),
                Err(source) => Err(DirectError::Io { context: format!("opening {}", p.display()), source }),
            })
            .collect::<Result<_, _>>()?;
        Ok(DirectImage(Arc::new(Inner { size: map.virtual_size, files, extents: map.extents.clone() })))
    }

    /// The size the guest sees.
    pub fn size(&self) -> u64 {
        self.0.size
    }

    /// Where the image holds data; everything else reads as zeros.
    pub fn data_extents(&self) -> ExtentSet {
        self.0
            .extents
            .iter()
            .filter(|e| matches!(e.at, Placement::File { .. }))
            .map(|e| Extent::new(e.start, e.len))
            .collect()
    }

    /// Fills `buf` with the guest's bytes at `offset` (blocking: call it off the async runtime).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DirectError> {
        let end = offset + buf.len() as u64;
        if end > self.0.size {
            return Err(DirectError::Io {
                context: format!("reading {} bytes at {offset}", buf.len()),
                source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the end of the image"),
            });
        }
        let extents = &self.0.extents;
        // The extent holding `offset`: the last one starting at or before it.
        let mut i = extents.partition_point(|e| e.start <= offset).saturating_sub(1);
        let mut at = offset;
        while at < end {
            let e = &extents[i];
            let n = (e.start + e.len).min(end) - at;
            let piece = &mut buf[(at - offset) as usize..(at - offset + n) as usize];
            match e.at {
                Placement::Zero => piece.fill(0),
                Placement::File { layer, offset: host } => {
                    let (path, file) = &self.0.files[layer];
                    let from = host + (at - e.start);
                    file.read_exact_at(piece, from).map_err(|source| DirectError::Io {
                        context: format!("reading {n} bytes at {from} of {}", path.display()),
                        source,
                    })?;
                }
                // Refused by `open`.
                Placement::Opaque => unreachable!("an opaque extent in a direct image"),
            }
            at += n;
            i += 1;
        }
        Ok(())
    }
}
