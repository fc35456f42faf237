//! Disk images: thin async wrappers around `qemu-img`.
//!
//! `qemu-img` is the reference implementation of qcow2; wrapping the tool keeps drover out of the
//! business of writing qcow2 metadata. Every function runs one `qemu-img` process and maps a
//! failure to [`HvError::Tool`] with its stderr.
//!
//! Locking: QEMU locks the images of a running VM, so `create`/`convert`/`compare` on them fail.
//! [`info`] reads with `-U` (no lock) so it works on images in use; live work on a running VM's
//! disk goes through its QMP instead.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::{HvError, HvResult};

const QEMU_IMG: &str = "qemu-img";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
    /// `qcow2`, `raw`, ...
    pub format: String,
    /// The backing file, resolved to a full path when QEMU can.
    pub backing: Option<PathBuf>,
}

/// Runs `qemu-img` with `args`; returns its stdout. Exit status 0 is success; anything else is a
/// [`HvError::Tool`] naming the subcommand.
async fn qemu_img(args: &[&std::ffi::OsStr]) -> HvResult<Vec<u8>> {
    let output = run_qemu_img(args).await?;
    if output.status.success() { Ok(output.stdout) } else { Err(tool_error(args, &output)) }
}

async fn run_qemu_img(args: &[&std::ffi::OsStr]) -> HvResult<std::process::Output> {
    tracing::debug!(?args, "qemu-img");
    Command::new(QEMU_IMG)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| HvError::io(format!("running {QEMU_IMG}"), e))
}

fn tool_error(args: &[&std::ffi::OsStr], output: &std::process::Output) -> HvError {
    let sub = args.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    HvError::Tool {
        program: format!("{QEMU_IMG} {sub}"),
        stderr: if stderr.is_empty() { format!("exited with {}", output.status) } else { stderr },
    }
}

/// Creates an empty qcow2 image of `size_bytes`.
///
/// Idempotent: if `path` already is a qcow2 image of that size it is left alone (a retried saga
/// step must not wipe a disk that has been written since). Any other existing file is an error,
/// because `qemu-img create` would silently overwrite it.
pub async fn create_qcow2(path: &Path, size_bytes: u64) -> HvResult<()> {
    match tokio::fs::metadata(path).await {
        Ok(_) => {
            let existing = info(path).await?;
            if existing.format == "qcow2" && existing.virtual_size == size_bytes {
                return Ok(());
            }
            return Err(HvError::io(
                format!(
                    "{} exists as {} of {} bytes; refusing to overwrite it with a qcow2 of {size_bytes} bytes",
                    path.display(),
                    existing.format,
                    existing.virtual_size
                ),
                std::io::Error::from(ErrorKind::AlreadyExists),
            ));
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(HvError::io(format!("checking {}", path.display()), e)),
    }
    let size = size_bytes.to_string();
    qemu_img(&["create".as_ref(), "-q".as_ref(), "-f".as_ref(), "qcow2".as_ref(), path.as_os_str(), size.as_ref()])
        .await?;
    Ok(())
}

/// Converts `src` (any format qemu-img detects) into a standalone qcow2 at `dst`.
///
/// Writes to `<dst>.part` and renames, so `dst` either does not exist or is complete, even if
/// drover dies mid-copy. An existing `dst` is replaced.
pub async fn import_qcow2(src: &Path, dst: &Path) -> HvResult<()> {
    let mut part = dst.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let result = qemu_img(&[
        "convert".as_ref(),
        "-q".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        src.as_os_str(),
        part.as_os_str(),
    ])
    .await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&part).await;
        return Err(e);
    }
    tokio::fs::rename(&part, dst)
        .await
        .map_err(|e| HvError::io(format!("renaming {} to {}", part.display(), dst.display()), e))
}

/// Reads an image's metadata without taking its lock (`-U`), so it works while a VM runs.
pub async fn info(path: &Path) -> HvResult<ImageInfo> {
    let stdout =
        qemu_img(&["info".as_ref(), "-U".as_ref(), "--output".as_ref(), "json".as_ref(), path.as_os_str()]).await?;
    parse_info(&stdout)
}

/// The fields of `qemu-img info --output json` that drover uses.
fn parse_info(json: &[u8]) -> HvResult<ImageInfo> {
    #[derive(Deserialize)]
    struct Raw {
        #[serde(rename = "virtual-size")]
        virtual_size: u64,
        format: String,
        #[serde(rename = "full-backing-filename")]
        full_backing: Option<PathBuf>,
        #[serde(rename = "backing-filename")]
        backing: Option<PathBuf>,
    }
    let raw: Raw = serde_json::from_slice(json).map_err(|e| HvError::Tool {
        program: format!("{QEMU_IMG} info"),
        stderr: format!("unexpected JSON output: {e}"),
    })?;
    Ok(ImageInfo { virtual_size: raw.virtual_size, format: raw.format, backing: raw.full_backing.or(raw.backing) })
}

/// Deletes an image. Idempotent: a missing file is success.
pub async fn remove(path: &Path) -> HvResult<()> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(HvError::io(format!("removing {}", path.display()), e)),
    }
}

/// Whether two images hold the same guest-visible content. Formats and allocation may differ
/// (a zero cluster equals an unallocated one); a different virtual size counts as different,
/// which plain `qemu-img compare` ignores when the extra area reads as zeros, and its strict mode
/// (`-s`) would also fail on allocation differences. Both images must be closed, i.e. not in use
/// by a running VM.
pub async fn compare(a: &Path, b: &Path) -> HvResult<bool> {
    if info(a).await?.virtual_size != info(b).await?.virtual_size {
        return Ok(false);
    }
    let args = ["compare".as_ref(), "-q".as_ref(), a.as_os_str(), b.as_os_str()];
    let output = run_qemu_img(&args).await?;
    // qemu-img compare: 0 identical, 1 different, 2+ error.
    match output.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(tool_error(&args, &output)),
    }
}

/// Creates a qcow2 overlay at `path` whose backing file is `backing` (a qcow2, referenced by its
/// absolute path). The overlay reads as its backing until written. Refuses to overwrite a file.
pub async fn create_overlay(path: &Path, backing: &Path) -> HvResult<()> {
    if tokio::fs::try_exists(path).await.map_err(|e| HvError::io(format!("checking {}", path.display()), e))? {
        return Err(HvError::io(
            format!("{} exists; refusing to overwrite it with an overlay", path.display()),
            std::io::Error::from(ErrorKind::AlreadyExists),
        ));
    }
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-F".as_ref(),
        "qcow2".as_ref(),
        "-b".as_ref(),
        backing.as_os_str(),
        path.as_os_str(),
    ])
    .await?;
    Ok(())
}

/// Writes the clusters of `top` into its backing file, leaving `top` as it was (`-d`), so the view
/// through `top` never changes while this runs and a retry after a crash is harmless.
pub async fn commit_into_backing(top: &Path) -> HvResult<()> {
    qemu_img(&["commit".as_ref(), "-q".as_ref(), "-d".as_ref(), top.as_os_str()]).await?;
    Ok(())
}

/// Points `image` at another backing file without copying anything (`rebase -u`). Only correct
/// when the new backing reads exactly as the old one did; the caller guarantees that.
pub async fn set_backing_unsafe(image: &Path, backing: &Path) -> HvResult<()> {
    qemu_img(&[
        "rebase".as_ref(),
        "-q".as_ref(),
        "-u".as_ref(),
        "-F".as_ref(),
        "qcow2".as_ref(),
        "-b".as_ref(),
        backing.as_os_str(),
        image.as_os_str(),
    ])
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_info_json() {
        let json = br#"{
            "children": [],
            "virtual-size": 1073741824,
            "filename": "/x/top.qcow2",
            "format": "qcow2",
            "backing-filename": "base.qcow2",
            "full-backing-filename": "/x/base.qcow2",
            "dirty-flag": false
        }"#;
        assert_eq!(
            parse_info(json).unwrap(),
            ImageInfo { virtual_size: 1 << 30, format: "qcow2".into(), backing: Some(PathBuf::from("/x/base.qcow2")) }
        );
        let plain = br#"{"virtual-size": 512, "format": "raw"}"#;
        assert_eq!(parse_info(plain).unwrap().backing, None);
        assert!(matches!(parse_info(b"nope"), Err(HvError::Tool { .. })));
    }

    /// Runs the real qemu-img (installed by scripts/install-deps); each call takes ~10 ms.
    #[tokio::test]
    async fn create_info_import_compare_remove() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.qcow2");
        create_qcow2(&a, 64 << 20).await.unwrap();
        create_qcow2(&a, 64 << 20).await.unwrap(); // idempotent
        assert!(create_qcow2(&a, 32 << 20).await.is_err(), "must not overwrite");
        let i = info(&a).await.unwrap();
        assert_eq!((i.virtual_size, i.format.as_str(), i.backing), (64 << 20, "qcow2", None));

        let raw = dir.path().join("b.raw");
        std::fs::write(&raw, vec![7u8; 64 << 20]).unwrap();
        let b = dir.path().join("b.qcow2");
        import_qcow2(&raw, &b).await.unwrap();
        assert_eq!(info(&b).await.unwrap().format, "qcow2");
        assert!(!dir.path().join("b.qcow2.part").exists());
        assert!(!compare(&a, &b).await.unwrap());

        let zeros = dir.path().join("zeros.raw");
        std::fs::write(&zeros, vec![0u8; 64 << 20]).unwrap();
        assert!(compare(&a, &zeros).await.unwrap());
        let bigger = dir.path().join("bigger.qcow2");
        create_qcow2(&bigger, 128 << 20).await.unwrap();
        assert!(!compare(&a, &bigger).await.unwrap(), "sizes differ");

        let missing = dir.path().join("missing.qcow2");
        match compare(&a, &missing).await {
            Err(HvError::Tool { program, stderr }) => {
                assert_eq!(program, "qemu-img info");
                assert!(stderr.contains("missing.qcow2"), "{stderr}");
            }
            other => panic!("{other:?}"),
        }
        assert!(import_qcow2(&missing, &dir.path().join("c.qcow2")).await.is_err());
        assert!(!dir.path().join("c.qcow2.part").exists());

        remove(&a).await.unwrap();
        remove(&a).await.unwrap();
        assert!(!a.exists());
    }
}
