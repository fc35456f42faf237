//! Private directories (0700) and files (0600), and bounded reads.
//!
//! Every file this crate writes is published durably through `drover_qemu::durable` and created
//! with its final mode, so a key is never readable by others, not even for a moment. A private
//! file or directory found with wider permissions is refused rather than silently narrowed: it
//! means someone else may already have read the key, which a `chmod` does not undo.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::error::{PkiError, Result};

pub(crate) const PRIVATE_DIR_MODE: u32 = 0o700;
pub(crate) const PRIVATE_FILE_MODE: u32 = 0o600;
/// Public files (certificates, CSRs) are written 0644: nothing secret is in them.
pub(crate) const PUBLIC_FILE_MODE: u32 = 0o644;

/// The largest PEM file (a key, a certificate, a chain) this crate reads from disk.
pub(crate) const MAX_PEM_FILE: usize = 64 * 1024;

/// Creates `dir` (and its parents) if it is missing and makes sure it is 0700. A directory we
/// create ourselves is created 0700; an existing one with group or other bits is refused.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => check_private(dir, meta.permissions().mode(), PRIVATE_DIR_MODE),
        Ok(_) => Err(PkiError::CorruptFile { path: dir.to_path_buf(), reason: "not a directory".into() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(PRIVATE_DIR_MODE)
                .create(dir)
                .map_err(PkiError::io("creating", dir))?;
            // The umask may have taken bits away; set exactly 0700 (never more than asked).
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE))
                .map_err(PkiError::io("setting the mode of", dir))
        }
        Err(e) => Err(PkiError::io("reading", dir)(e)),
    }
}

fn check_private(path: &Path, mode: u32, expected: u32) -> Result<()> {
    if mode & 0o077 != 0 {
        return Err(PkiError::InsecurePermissions { path: path.to_path_buf(), mode: mode & 0o7777, expected });
    }
    Ok(())
}

pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    drover_qemu::durable::write_blocking(path, bytes, PRIVATE_FILE_MODE).map_err(PkiError::io("writing", path))
}

pub(crate) fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    drover_qemu::durable::write_blocking(path, bytes, PUBLIC_FILE_MODE).map_err(PkiError::io("writing", path))
}

/// Reads a private file: refused if others may read it, or if it is larger than [`MAX_PEM_FILE`].
pub(crate) fn read_private(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(PkiError::io("reading", path))?;
    check_private(path, meta.permissions().mode(), PRIVATE_FILE_MODE)?;
    read_bounded(path)
}

/// Reads a file of at most [`MAX_PEM_FILE`] bytes as text.
pub(crate) fn read_bounded(path: &Path) -> Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(PkiError::io("opening", path))?;
    let mut bytes = Vec::new();
    // One byte more than allowed tells "too large" from "exactly the limit".
    file.take(MAX_PEM_FILE as u64 + 1).read_to_end(&mut bytes).map_err(PkiError::io("reading", path))?;
    if bytes.len() > MAX_PEM_FILE {
        return Err(PkiError::CorruptFile {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_PEM_FILE} bytes"),
        });
    }
    String::from_utf8(bytes).map_err(|_| PkiError::CorruptFile { path: path.to_path_buf(), reason: "not text".into() })
}

pub(crate) fn exists(path: &Path) -> Result<bool> {
    path.try_exists().map_err(PkiError::io("looking for", path))
}

pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PkiError::io("removing", path)(e)),
    }
}
