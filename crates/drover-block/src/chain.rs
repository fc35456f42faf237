//! Restore points on the target: per replica disk, a chain of qcow2 files.
//!
//! The first point (the seed) is a standalone qcow2; every later point is an overlay whose
//! backing file is the previous point's file, and holds only what changed in its cycle. Files
//! have random names: the store, not the file name, says which file is which point, so
//! retention never renames anything.
//!
//! ```text
//!   point 1        point 2        point 3
//!   a.qcow2  ◀──  b.qcow2  ◀──  c.qcow2          (◀── : "is the backing file of")
//! ```
//!
//! Retiring the oldest point (retention) writes point 2's clusters into `a.qcow2`
//! (`qemu-img commit -d`, which leaves `b.qcow2` untouched), points `c.qcow2` at `a.qcow2`, and from
//! then on `a.qcow2` is point 2's file. At every moment of that sequence every remaining point
//! reads the same through its file: `b` over `a` is point 2 before and after the commit, and `a`
//! alone is point 2 after it. So a crash anywhere is repaired by running the same steps again.
//! Point 1 is gone from the moment the commit starts: the caller marks it retiring in the store
//! first, so nothing offers it for failover meanwhile.
//!
//! A failover boots through a throwaway overlay on the chosen point's file, so restore points
//! themselves are never written by a VM.

use std::path::{Path, PathBuf};

use drover_qemu::image;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(transparent)]
    Image(#[from] drover_qemu::ToolError),
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the chain is not as expected: {0}")]
    Shape(String),
}

type Result<T> = std::result::Result<T, ChainError>;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ChainError {
    let context = context.into();
    move |source| ChainError::Io { context, source }
}

/// The directory of one replica disk's chain.
#[derive(Debug, Clone)]
pub struct ChainDir {
    dir: PathBuf,
}

/// Where a point's manifest lives: beside its file, so it follows the file through retention.
pub fn manifest_path(point_file: &Path) -> PathBuf {
    point_file.with_extension("manifest")
}

impl ChainDir {
    pub fn new(dir: impl Into<PathBuf>) -> ChainDir {
        ChainDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    async fn ensure(&self) -> Result<()> {
        tokio::fs::create_dir_all(&self.dir).await.map_err(io(format!("creating {}", self.dir.display())))
    }

    /// A new file for the next point: standalone of `size` bytes for the seed (its metadata
    /// preallocated, as a seed is written whole: [`image::create_qcow2_preallocated`]), else an
    /// overlay on the previous point's file. It is not a restore point until the caller
    /// publishes it.
    pub async fn new_point_file(&self, size: u64, backing: Option<&Path>) -> Result<PathBuf> {
        self.ensure().await?;
        let path = self.dir.join(format!("{}.qcow2", uuid::Uuid::new_v4()));
        match backing {
            None => image::create_qcow2_preallocated(&path, size).await?,
            Some(b) => {
                let info = image::info(b).await?;
                if info.virtual_size != size {
                    return Err(ChainError::Shape(format!(
                        "{} is {} bytes, the new point wants {size}",
                        b.display(),
                        info.virtual_size
                    )));
                }
                image::create_overlay(&path, b).await?
            }
        }
        Ok(path)
    }

    /// Retires the oldest point. `oldest` has no backing; `next` is backed by it; `after`, if
    /// any, is backed by `next` (or already by `oldest`, when an earlier run got that far).
    /// Returns the file that holds `next`'s point from now on (`oldest`'s file); the caller records
    /// that, then removes `next`'s old file with [`ChainDir::collect_garbage`].
    pub async fn retire_oldest(&self, oldest: &Path, next: &Path, after: Option<&Path>) -> Result<PathBuf> {
        let next_backing = image::info(next).await?.backing;
        if next_backing.as_deref() != Some(oldest) {
            return Err(ChainError::Shape(format!(
                "{} is backed by {:?}, not by {}",
                next.display(),
                next_backing,
                oldest.display()
            )));
        }
        image::commit_into_backing(next).await?;
        if let Some(after) = after {
            let backing = image::info(after).await?.backing;
            if backing.as_deref() == Some(next) {
                image::set_backing_unsafe(after, oldest).await?;
            } else if backing.as_deref() != Some(oldest) {
                return Err(ChainError::Shape(format!("{} is backed by {backing:?}", after.display())));
            }
        }
        // The manifest follows the data: `oldest`'s file now holds `next`'s point.
        let from = manifest_path(next);
        if tokio::fs::try_exists(&from).await.map_err(io(format!("checking {}", from.display())))? {
            let to = manifest_path(oldest);
            let tmp = drover_qemu::durable::temp_path(&to);
            tokio::fs::copy(&from, &tmp).await.map_err(io(format!("copying {}", from.display())))?;
            // Durable before the caller retires the point: a power cut must not leave the kept
            // point with a manifest whose data never reached the disk.
            drover_qemu::durable::publish(&tmp, &to).await.map_err(io(format!("publishing {}", to.display())))?;
        }
        Ok(oldest.to_path_buf())
    }

    /// A throwaway overlay on a point's file for a VM to boot from. Idempotent for the same label.
    pub async fn boot_overlay(&self, point_file: &Path, label: &str) -> Result<PathBuf> {
        self.ensure().await?;
        let path = self.dir.join(format!("boot-{label}.qcow2"));
        if tokio::fs::try_exists(&path).await.map_err(io(format!("checking {}", path.display())))? {
            let backing = image::info(&path).await?.backing;
            if backing.as_deref() == Some(point_file) {
                return Ok(path);
            }
            return Err(ChainError::Shape(format!("{} exists on another point ({backing:?})", path.display())));
        }
        image::create_overlay(&path, point_file).await?;
        Ok(path)
    }

    /// Removes the boot overlay of `label` (the VM on it must be stopped). Idempotent.
    pub async fn discard_boot_overlay(&self, label: &str) -> Result<()> {
        let path = self.dir.join(format!("boot-{label}.qcow2"));
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("removing {}", path.display()))(e)),
        }
    }

    /// Removes every image and manifest in the directory that is not in `keep` (unpublished
    /// points left by a crash, files merged away by retention). Boot overlays are left alone:
    /// a VM may be running on one; [`ChainDir::discard_boot_overlay`] removes them. Returns what
    /// it removed.
    pub async fn collect_garbage(&self, keep: &[PathBuf]) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let mut entries = match tokio::fs::read_dir(&self.dir).await {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(io(format!("listing {}", self.dir.display()))(e)),
        };
        let kept: Vec<PathBuf> = keep.iter().flat_map(|k| [k.clone(), manifest_path(k)]).collect();
        while let Some(entry) = entries.next_entry().await.map_err(io(format!("listing {}", self.dir.display())))? {
            let path = entry.path();
            let boot = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("boot-"));
            let ours = !boot && matches!(path.extension().and_then(|e| e.to_str()), Some("qcow2" | "manifest" | "tmp"));
            if ours && !kept.contains(&path) {
                tokio::fs::remove_file(&path).await.map_err(io(format!("removing {}", path.display())))?;
                removed.push(path);
            }
        }
        Ok(removed)
    }
}
