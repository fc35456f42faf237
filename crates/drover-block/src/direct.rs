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
//!
//! The other way round, [`PlacedImage`] writes a seed point straight into its file: its qcow2
//! metadata was preallocated, so every guest byte already has its place (`qemu-img map` says
//! where) and writing there changes no metadata. A receiving agent's streams write through it
//! instead of through the point's storage daemon: one socket hop and the daemon's CPU less for
//! every byte of the seed.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use drover_qemu::image::{HostExtent, HostMap, PlacedExtent, PlacedMap, Placement};

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
        each_piece(&self.0.extents, offset, end, |e, at, n| {
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
            Ok(())
        })
    }
}

/// An extent of a map: where it starts in the guest's view, and how long it is.
trait Span {
    fn span(&self) -> (u64, u64);
}

impl Span for HostExtent {
    fn span(&self) -> (u64, u64) {
        (self.start, self.len)
    }
}

impl Span for PlacedExtent {
    fn span(&self) -> (u64, u64) {
        (self.start, self.len)
    }
}

/// Calls `f(extent, at, n)` for each piece `at..at+n` of `offset..end` within one of `extents`
/// (in order, covering the image), in order.
fn each_piece<T: Span, E>(
    extents: &[T],
    offset: u64,
    end: u64,
    mut f: impl FnMut(&T, u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    // The extent holding `offset`: the last one starting at or before it.
    let mut i = extents.partition_point(|e| e.span().0 <= offset).saturating_sub(1);
    let mut at = offset;
    while at < end {
        let (start, len) = extents[i].span();
        let n = (start + len).min(end) - at;
        f(&extents[i], at, n)?;
        at += n;
        i += 1;
    }
    Ok(())
}

/// Runs `f`, which blocks on file I/O into buffers the caller lends: on a multi-threaded runtime
/// the worker hands its other tasks away first (`block_in_place`); on a single-threaded one
/// (tests) it simply runs.
pub fn blocking_here<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// A buffer [`PlacedImage::write_at`] writes past the page cache (`O_DIRECT` wants the memory
/// aligned, which `Vec` cannot promise).
pub type DirectBuf = aligned_vec::AVec<u8, aligned_vec::ConstAlign<DIRECT_ALIGN>>;

/// What `O_DIRECT` writes are aligned to: memory, file offset and length.
pub const DIRECT_ALIGN: usize = 4096;

/// A new, empty [`DirectBuf`] that holds `capacity` bytes.
pub fn direct_buf(capacity: usize) -> DirectBuf {
    DirectBuf::with_capacity(DIRECT_ALIGN, capacity)
}

/// A one-file image whose every guest byte has its place in the file ([`PlacedMap`]), written
/// there directly, past the page cache where the write is aligned (as the storage daemon writes a
/// seed: buffered writes cost this machine more CPU than the copy, measured), through it where it
/// is not (the disk's last piece). Cheap to clone (shared); every method blocks (call it off the
/// async runtime).
///
/// The caller guarantees nothing else writes the image meanwhile (the point being received: its
/// storage daemon is only read through) and that the map is the image's (taken after it was
/// created; nothing allocates, so the metadata never changes).
#[derive(Debug, Clone)]
pub struct PlacedImage(Arc<Placed>);

#[derive(Debug)]
struct Placed {
    path: PathBuf,
    /// Opened `O_DIRECT`, for aligned writes.
    direct: File,
    /// The same file through the page cache, for the rest.
    buffered: File,
    size: u64,
    extents: Vec<PlacedExtent>,
}

impl PlacedImage {
    /// Opens the map's file for writing; refuses a file system without `O_DIRECT`.
    pub fn open(map: &PlacedMap) -> Result<PlacedImage, DirectError> {
        use std::os::unix::fs::OpenOptionsExt;
        let opening = |source| DirectError::Io { context: format!("opening {}", map.file.display()), source };
        let direct = File::options()
            .read(true)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(&map.file)
            .map_err(opening)?;
        let buffered = File::options().read(true).write(true).open(&map.file).map_err(opening)?;
        Ok(PlacedImage(Arc::new(Placed {
            path: map.file.clone(),
            direct,
            buffered,
            size: map.virtual_size,
            extents: map.extents.clone(),
        })))
    }

    /// The size the guest sees.
    pub fn size(&self) -> u64 {
        self.0.size
    }

    /// Calls `f(host offset, range of 0..len)` for each piece of `offset..offset+len`, in order.
    fn pieces(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, std::ops::Range<usize>) -> std::io::Result<()>,
    ) -> Result<(), DirectError> {
        let end = offset.checked_add(len).filter(|e| *e <= self.0.size).ok_or_else(|| DirectError::Io {
            context: format!("writing {len} bytes at {offset}"),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "past the end of the image"),
        })?;
        each_piece(&self.0.extents, offset, end, |e, at, n| {
            let host = e.offset + (at - e.start);
            f(host, (at - offset) as usize..(at - offset + n) as usize).map_err(|source| DirectError::Io {
                context: format!("writing {n} bytes at {host} of {}", self.0.path.display()),
                source,
            })
        })
    }

    /// Writes `data` as the guest's bytes at `offset`: each piece whose memory, place and length
    /// are [`DIRECT_ALIGN`]ed past the page cache, any other through it.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DirectError> {
        let aligned = |n: usize| n.is_multiple_of(DIRECT_ALIGN);
        self.pieces(offset, data.len() as u64, |host, r| {
            let piece = &data[r];
            if aligned(piece.as_ptr() as usize) && aligned(piece.len()) && host.is_multiple_of(DIRECT_ALIGN as u64) {
                self.0.direct.write_all_at(piece, host)
            } else {
                self.0.buffered.write_all_at(piece, host)
            }
        })
    }

    /// Makes `offset..offset+len` read as zeros: the file's blocks there are deallocated (a hole
    /// punched, as a fresh preallocated image has), or written with zeros where the file system
    /// cannot punch holes.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DirectError> {
        use nix::fcntl::{FallocateFlags, fallocate};
        use std::os::fd::AsRawFd;
        let fd = self.0.buffered.as_raw_fd();
        self.pieces(offset, len, |host, r| {
            let n = (r.end - r.start) as u64;
            let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
            match fallocate(fd, punch, host as i64, n as i64) {
                Ok(()) => Ok(()),
                Err(nix::errno::Errno::EOPNOTSUPP) => {
                    let zeros = vec![0u8; n.min(1 << 20) as usize];
                    let mut at = 0;
                    while at < n {
                        let k = (n - at).min(zeros.len() as u64);
                        self.0.buffered.write_all_at(&zeros[..k as usize], host + at)?;
                        at += k;
                    }
                    Ok(())
                }
                Err(e) => Err(std::io::Error::from(e)),
            }
        })
    }

    /// Makes every write so far durable (`fdatasync`: the file's, through either opening).
    pub fn sync(&self) -> Result<(), DirectError> {
        self.0
            .buffered
            .sync_data()
            .map_err(|source| DirectError::Io { context: format!("syncing {}", self.0.path.display()), source })
    }
}
