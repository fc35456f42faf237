//! Publishing files durably: the one helper every crate that writes a file others rely on uses
//! (manifests, restore-point bookkeeping, VM specs and disks, saved logins, TLS files). It lives
//! here because this is the lowest crate that does I/O; `drover-types` does none.
//!
//! A file is published by writing it under a temporary name, fsyncing it, renaming it over its
//! final name and fsyncing the directory. A rename alone is atomic under a killed process but not
//! under a power cut: without the first fsync the new name can point at a file whose data never
//! reached the disk, and without the second the rename itself can be lost.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Publishes the complete file `tmp` as `path`, durably (see the module doc). `tmp` must be in
/// the same directory as `path` (a rename does not cross file systems).
pub fn publish_blocking(tmp: &Path, path: &Path) -> std::io::Result<()> {
    let context = |what: String| move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"));
    std::fs::File::open(tmp).and_then(|f| f.sync_all()).map_err(context(format!("syncing {}", tmp.display())))?;
    std::fs::rename(tmp, path).map_err(context(format!("renaming {} to {}", tmp.display(), path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(context(format!("syncing the directory {}", dir.display())))
}

/// [`publish_blocking`] off the async runtime's threads.
pub async fn publish(tmp: &Path, path: &Path) -> std::io::Result<()> {
    let (tmp, path) = (tmp.to_path_buf(), path.to_path_buf());
    tokio::task::spawn_blocking(move || publish_blocking(&tmp, &path)).await.map_err(std::io::Error::other)?
}

/// The temporary name a file is written under before it is published: beside it, so the rename
/// stays in one directory, and ending in `.tmp`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// Writes `bytes` as the whole content of `path`, published durably. The temporary file is
/// created fresh with permissions `mode` (so a private file is never readable by others, not
/// even for a moment); it is removed again if anything fails.
pub fn write_blocking(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = temp_path(path);
    // A left-over of a crashed write may exist with any mode: replace it.
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(bytes)?;
        drop(f);
        publish_blocking(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// [`write_blocking`] off the async runtime's threads.
pub async fn write(path: &Path, bytes: Vec<u8>, mode: u32) -> std::io::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || write_blocking(&path, &bytes, mode)).await.map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn a_write_replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec.json");
        std::fs::write(&path, vec![b'o'; 10_000]).unwrap();
        // A stale temporary of a crashed write, with the wrong mode, is replaced.
        std::fs::write(temp_path(&path), b"stale").unwrap();
        write(&path, b"new".to_vec(), 0o600).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(names_in(dir.path()), ["spec.json"]);
    }

    #[tokio::test]
    async fn publish_renames_a_complete_file_into_place() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, path) = (dir.path().join("m.manifest.tmp"), dir.path().join("m.manifest"));
        std::fs::write(&path, b"old").unwrap();
        std::fs::write(&tmp, b"whole new content").unwrap();
        publish(&tmp, &path).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole new content");
        assert_eq!(names_in(dir.path()), ["m.manifest"]);
    }

    #[tokio::test]
    async fn a_failed_publish_leaves_the_target_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"old").unwrap();
        let err = publish(&dir.path().join("missing.tmp"), &path).await.unwrap_err();
        assert!(err.to_string().contains("missing.tmp"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        // A write into a directory that does not exist fails and leaves nothing behind.
        let nowhere = dir.path().join("no").join("f");
        assert!(write(&nowhere, b"x".to_vec(), 0o644).await.is_err());
        assert_eq!(names_in(dir.path()), ["f"]);
    }
}
