//! Moving blocks between two NBD exports: the source's point-in-time view and the target's new
//! restore-point file.
//!
//! - [`copy_extents`]: the incremental path. Copies exactly the given extents (the dirty
//!   granules of a bitmap, or the allocated ranges of a seed), rounded out to manifest blocks,
//!   and rehashes those blocks into the manifest as they pass.
//! - [`hash_compare_sync`]: the fallback when no dirty bitmap can be trusted (first cycle after
//!   an unclean shutdown, a new or resized disk). Both sides are read once, concurrently, block
//!   hashes are compared, and only differing blocks are written.
//!
//! Both end with a flush of the target, so that what they report as written is on disk before
//! the caller publishes the restore point. Progress is reported through a callback, never through
//! the store (the data path knows nothing of sessions).

use tokio::io::{AsyncRead, AsyncWrite};

use crate::extents::{Extent, ExtentSet};
use crate::hash::{BLOCK_SIZE, Manifest, ManifestError, hash_block};
use crate::nbd::{NbdClient, NbdError};

/// How much one read or write moves at most: large enough to amortise a round trip, small
/// enough to keep memory flat.
pub const CHUNK: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("NBD: {0}")]
    Nbd(#[from] NbdError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("source and target differ in size: {source_size} vs {target_size} bytes")]
    SizeMismatch { source_size: u64, target_size: u64 },
}

type Result<T> = std::result::Result<T, CopyError>;

/// What a transfer did, for the session's record and the benchmark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the source.
    pub source_read: u64,
    /// Bytes read from the target (hash-compare only).
    pub target_read: u64,
    /// Bytes written to the target: what would travel between sites.
    pub written: u64,
}

fn check_sizes<A, B>(src: &NbdClient<A>, dst: &NbdClient<B>, manifest: &Manifest) -> Result<u64>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    if src.size() != dst.size() || src.size() != manifest.disk_size {
        return Err(CopyError::SizeMismatch { source_size: src.size(), target_size: dst.size() });
    }
    Ok(src.size())
}

/// Copies `extents` from `src` to `dst`, rounded out to whole manifest blocks, and records those
/// blocks in `manifest`. `progress(done, total)` is called after every chunk.
pub async fn copy_extents<S, D>(
    src: &mut NbdClient<S>,
    dst: &mut NbdClient<D>,
    extents: &ExtentSet,
    manifest: &mut Manifest,
    mut progress: impl FnMut(u64, u64),
) -> Result<CopyStats>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    let size = check_sizes(src, dst, manifest)?;
    let todo = extents.align_out(BLOCK_SIZE).clip(0, size);
    let total = todo.total_bytes();
    let chunk = CHUNK.min(u64::from(src.max_io_size())).min(u64::from(dst.max_io_size())) / BLOCK_SIZE * BLOCK_SIZE;
    let chunk = chunk.max(BLOCK_SIZE);
    let mut stats = CopyStats::default();
    for Extent { offset, len } in todo.chunks(chunk) {
        let data = src.read(offset, len).await?;
        stats.source_read += len;
        write_block_data(dst, offset, &data).await?;
        stats.written += len;
        manifest.set_range(offset, &data)?;
        progress(stats.written, total);
    }
    dst.flush().await?;
    Ok(stats)
}

/// Writes data to the target; all-zero data goes as a write-zeroes request where the server
/// takes one (the target file is an overlay, so zeros must be written, not skipped).
async fn write_block_data<D: AsyncRead + AsyncWrite + Unpin>(
    dst: &mut NbdClient<D>,
    offset: u64,
    data: &[u8],
) -> Result<()> {
    if dst.can_write_zeroes() && data.iter().all(|b| *b == 0) {
        dst.write_zeroes(offset, data.len() as u64).await?;
    } else {
        dst.write(offset, data).await?;
    }
    Ok(())
}

/// Makes `dst` equal to `src` by comparing block hashes: each side is read once (concurrently,
/// over two connections), and only blocks whose hashes differ are written. `manifest` ends as the
/// source's manifest. `progress(done, total)` counts bytes compared.
pub async fn hash_compare_sync<S, D>(
    src: &mut NbdClient<S>,
    dst: &mut NbdClient<D>,
    manifest: &mut Manifest,
    mut progress: impl FnMut(u64, u64),
) -> Result<CopyStats>
where
    S: AsyncRead + AsyncWrite + Unpin,
    D: AsyncRead + AsyncWrite + Unpin,
{
    let size = check_sizes(src, dst, manifest)?;
    let chunk = CHUNK.min(u64::from(src.max_io_size())).min(u64::from(dst.max_io_size())) / BLOCK_SIZE * BLOCK_SIZE;
    let chunk = chunk.max(BLOCK_SIZE);
    let mut stats = CopyStats::default();
    let mut offset = 0;
    while offset < size {
        let len = chunk.min(size - offset);
        let (a, b) = tokio::join!(src.read(offset, len), dst.read(offset, len));
        let (a, b) = (a?, b?);
        stats.source_read += len;
        stats.target_read += len;
        // Walk the chunk block by block; write runs of differing blocks in one request each.
        let mut run: Option<(usize, usize)> = None;
        let mut at = 0usize;
        while at < a.len() {
            let end = (at + BLOCK_SIZE as usize).min(a.len());
            let differs = hash_block(&a[at..end]) != hash_block(&b[at..end]);
            match (&mut run, differs) {
                (Some((_, run_end)), true) => *run_end = end,
                (None, true) => run = Some((at, end)),
                (Some((s, e)), false) => {
                    write_block_data(dst, offset + *s as u64, &a[*s..*e]).await?;
                    stats.written += (*e - *s) as u64;
                    run = None;
                }
                (None, false) => {}
            }
            at = end;
        }
        if let Some((s, e)) = run {
            write_block_data(dst, offset + s as u64, &a[s..e]).await?;
            stats.written += (e - s) as u64;
        }
        manifest.set_range(offset, &a)?;
        offset += len;
        progress(offset, size);
    }
    dst.flush().await?;
    Ok(stats)
}
