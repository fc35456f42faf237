//! Which host paths a request may reach. They are host configuration, never tenant input.
//!
//! The system administrator configures (the config file, `--datastore-root`, `--import-dir`):
//! - **datastore roots**: the directories under which datastores may be created;
//! - **import directories**: where disk images to import and boot files (kernel, initrd) may
//!   come from.
//!
//! A requested path is accepted only when it resolves, after symlinks, inside one of them.
//! Refusals say the same thing whether or not the path exists outside, so a request cannot probe
//! the host's file system. Both lists are canonicalized once, when the configuration is made.

use std::path::{Component, Path, PathBuf};

use drover_types::{Error, Result};

/// The host directories requests may reach. Empty (the default) allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPaths {
    datastore_roots: Vec<PathBuf>,
    import_dirs: Vec<PathBuf>,
}

impl HostPaths {
    /// The roots and import directories, each created (private, 0700) when missing and then
    /// canonicalized. A path that cannot be made or resolved is a configuration error.
    pub fn new(datastore_roots: &[PathBuf], import_dirs: &[PathBuf]) -> std::io::Result<HostPaths> {
        let resolve = |dirs: &[PathBuf]| -> std::io::Result<Vec<PathBuf>> {
            let mut out: Vec<PathBuf> = Vec::new();
            for d in dirs {
                if !d.is_absolute() {
                    return Err(std::io::Error::other(format!("{} must be an absolute path", d.display())));
                }
                create_private_dir_all(d)?;
                let c = std::fs::canonicalize(d)
                    .map_err(|e| std::io::Error::other(format!("cannot resolve {}: {e}", d.display())))?;
                if c == Path::new("/") {
                    return Err(std::io::Error::other(format!("{} resolves to / : name a directory", d.display())));
                }
                if !out.contains(&c) {
                    out.push(c);
                }
            }
            Ok(out)
        };
        Ok(HostPaths { datastore_roots: resolve(datastore_roots)?, import_dirs: resolve(import_dirs)? })
    }

    pub fn datastore_roots(&self) -> &[PathBuf] {
        &self.datastore_roots
    }

    pub fn import_dirs(&self) -> &[PathBuf] {
        &self.import_dirs
    }

    /// Where a datastore at `requested` lives on the host: the path itself, checked to resolve
    /// inside a datastore root (its existing part after symlinks, the rest free of `.` and `..`).
    pub fn datastore_dir(&self, requested: &str) -> Result<PathBuf> {
        let refuse = || {
            Error::invalid(format!(
                "datastore path {requested:?} is not inside a datastore root of this host (the host's administrator \
                 sets them: --datastore-root)"
            ))
        };
        let path = plain_absolute(requested).ok_or_else(refuse)?;
        if !self.datastore_roots.iter().any(|r| path.starts_with(r)) {
            return Err(refuse());
        }
        let resolved = resolve_existing_prefix(&path).ok_or_else(refuse)?;
        if !self.datastore_roots.iter().any(|r| resolved.starts_with(r)) {
            return Err(refuse());
        }
        Ok(resolved)
    }

    /// The file an import or boot setting names: it must resolve, after symlinks, to a regular
    /// file inside an import directory. Returns the resolved path, which is what gets used.
    pub fn import_file(&self, what: &str, requested: &str) -> Result<PathBuf> {
        let refuse = || {
            Error::invalid(format!(
                "{what} {requested:?} must name a file inside an import directory of this host (the host's \
                 administrator sets them: --import-dir)"
            ))
        };
        let path = lexically_normal(requested).ok_or_else(refuse)?;
        // Lexically inside first: only then may the answer say whether the file is there. What
        // decides is where the path really leads (below), `..` and symlinks resolved.
        if !self.import_dirs.iter().any(|d| path.starts_with(d)) {
            return Err(refuse());
        }
        let resolved = match std::fs::canonicalize(&path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::invalid(format!("{what} {requested:?} does not exist in the import directory")));
            }
            Err(_) => return Err(refuse()),
        };
        if !self.import_dirs.iter().any(|d| resolved.starts_with(d)) {
            return Err(refuse());
        }
        match std::fs::metadata(&resolved) {
            Ok(m) if m.is_file() => Ok(resolved),
            Ok(_) => Err(Error::invalid(format!("{what} {requested:?} is not a file"))),
            Err(_) => Err(refuse()),
        }
    }
}

/// `requested` as an absolute path with only normal components (no `.`, `..`, NUL or empty
/// name), or `None`.
fn plain_absolute(requested: &str) -> Option<PathBuf> {
    if requested.contains('\0') || requested.len() > 4096 {
        return None;
    }
    let path = Path::new(requested);
    if !path.is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n),
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// `requested` as an absolute path with `.` and `..` folded away lexically, or `None`.
fn lexically_normal(requested: &str) -> Option<PathBuf> {
    if requested.contains('\0') || requested.len() > 4096 || !Path::new(requested).is_absolute() {
        return None;
    }
    let mut out = PathBuf::from("/");
    for c in Path::new(requested).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// `path` with its longest existing prefix resolved (symlinks followed) and the rest appended.
fn resolve_existing_prefix(path: &Path) -> Option<PathBuf> {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    loop {
        match std::fs::canonicalize(&existing) {
            Ok(resolved) => {
                let mut out = resolved;
                for n in rest.iter().rev() {
                    out.push(n);
                }
                return Some(out);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // A dangling symlink is not "missing": it points somewhere we cannot check.
                if std::fs::symlink_metadata(&existing).is_ok() {
                    return None;
                }
                rest.push(existing.file_name()?.to_os_string());
                existing = existing.parent()?.to_path_buf();
            }
            Err(_) => return None,
        }
    }
}

/// `create_dir_all`, with every directory it creates private to the service user (0700).
pub fn create_private_dir_all(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, HostPaths) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("stores");
        let imports = dir.path().join("imports");
        let paths = HostPaths::new(std::slice::from_ref(&root), std::slice::from_ref(&imports)).unwrap();
        std::fs::write(imports.join("disk.qcow2"), b"x").unwrap();
        std::fs::create_dir(dir.path().join("outside")).unwrap();
        std::fs::write(dir.path().join("outside/secret"), b"s").unwrap();
        (dir, paths)
    }

    #[test]
    fn datastores_stay_inside_their_roots() {
        let (dir, paths) = setup();
        let root = paths.datastore_roots()[0].clone();
        let ok = paths.datastore_dir(&format!("{}/a/b", root.display())).unwrap();
        assert_eq!(ok, root.join("a/b"));
        // Absolute elsewhere, `..`, relative, /proc and a symlink that escapes are refused alike.
        std::os::unix::fs::symlink(dir.path().join("outside"), root.join("link")).unwrap();
        for bad in [
            "/etc".to_string(),
            "/".into(),
            "/proc/self".into(),
            format!("{}/../outside", root.display()),
            "relative/dir".into(),
            format!("{}/link", root.display()),
            format!("{}/link/deeper", root.display()),
            format!("{}/x\0y", root.display()),
        ] {
            let e = paths.datastore_dir(&bad).unwrap_err().to_string();
            assert!(e.contains("is not inside a datastore root"), "{bad:?}: {e}");
        }
        // Nothing configured: nothing allowed.
        assert!(HostPaths::default().datastore_dir(&format!("{}/a", root.display())).is_err());
    }

    #[test]
    fn imports_come_only_from_the_import_directory() {
        let (dir, paths) = setup();
        let imports = paths.import_dirs()[0].clone();
        let good = imports.join("disk.qcow2");
        assert_eq!(paths.import_file("import_from", good.to_str().unwrap()).unwrap(), good);
        // `..` that stays inside is the same file.
        std::fs::create_dir(imports.join("d")).unwrap();
        let roundabout = format!("{}/d/../disk.qcow2", imports.display());
        assert_eq!(paths.import_file("import_from", &roundabout).unwrap(), good);
        std::os::unix::fs::symlink(dir.path().join("outside/secret"), imports.join("escape")).unwrap();
        let outside_missing = dir.path().join("outside/missing");
        for bad in [
            "/etc/shadow".to_string(),
            dir.path().join("outside/secret").display().to_string(),
            outside_missing.display().to_string(),
            imports.join("escape").display().to_string(),
            format!("{}/../outside/secret", imports.display()),
        ] {
            let e = paths.import_file("import_from", &bad).unwrap_err().to_string();
            assert!(e.contains("must name a file inside an import directory"), "{bad:?}: {e}");
        }
        // Inside the directory, the answer may be precise.
        let e = paths.import_file("import_from", imports.join("nope").to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        std::fs::create_dir(imports.join("sub")).unwrap();
        let e = paths.import_file("import_from", imports.join("sub").to_str().unwrap()).unwrap_err();
        assert!(e.to_string().contains("is not a file"), "{e}");
    }

    #[test]
    fn configured_directories_are_made_private_and_must_be_absolute() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("new/root");
        HostPaths::new(std::slice::from_ref(&root), &[]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&root).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(HostPaths::new(&[PathBuf::from("relative")], &[]).is_err());
        assert!(HostPaths::new(&[PathBuf::from("/")], &[]).is_err());
    }
}
