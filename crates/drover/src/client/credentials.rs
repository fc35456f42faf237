//! The saved login: `credentials.json` in `$DROVER_CONFIG_DIR`, else
//! `$XDG_CONFIG_HOME/drover` or `~/.config/drover`.
//!
//! The file holds bearer tokens, so it is written private (0600, in a 0700 directory) and
//! replaced atomically: a reader never sees half a file. Refresh tokens are single use and the
//! server revokes the whole login when one is reused, so two `drover` processes that both find
//! the access token expired must not both refresh: the refresh happens under an exclusive lock on
//! `credentials.lock`, and whoever gets the lock second re-reads the file and adopts the new pair.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Refresh this long before the access token expires, so a request does not race the expiry.
const EXPIRY_MARGIN_SECS: i64 = 30;

#[derive(Clone, Serialize, Deserialize)]
pub struct Credentials {
    /// The server these tokens belong to; they are never sent anywhere else.
    pub server: String,
    pub access_token: String,
    pub refresh_token: String,
    pub expires_at: DateTime<Utc>,
}

// By hand so that a debug print never shows a token.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("server", &self.server)
            .field("access_token", &"<redacted>")
            .field("refresh_token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl Credentials {
    /// True when the access token is expired or about to be.
    pub fn access_expired(&self, now: DateTime<Utc>) -> bool {
        now + chrono::Duration::seconds(EXPIRY_MARGIN_SECS) >= self.expires_at
    }
}

/// Where the credentials live.
#[derive(Debug, Clone)]
pub struct CredentialStore {
    dir: PathBuf,
}

impl CredentialStore {
    /// The store named by the environment.
    pub fn from_env() -> anyhow::Result<Self> {
        if let Some(dir) = std::env::var_os("DROVER_CONFIG_DIR").filter(|d| !d.is_empty()) {
            return Ok(CredentialStore { dir: PathBuf::from(dir) });
        }
        if let Some(xdg) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
            return Ok(CredentialStore { dir: Path::new(&xdg).join("drover") });
        }
        match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
            Some(home) => Ok(CredentialStore { dir: Path::new(&home).join(".config/drover") }),
            None => bail!("cannot tell where to keep credentials: set DROVER_CONFIG_DIR or HOME"),
        }
    }

    #[cfg(test)]
    pub fn in_dir(dir: &Path) -> Self {
        CredentialStore { dir: dir.to_path_buf() }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("credentials.json")
    }

    /// The saved credentials, or `None` when nobody logged in.
    pub fn load(&self) -> anyhow::Result<Option<Credentials>> {
        let path = self.path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let creds = serde_json::from_str(&text)
            .with_context(|| format!("{} is damaged; run `drover logout` and log in again", path.display()))?;
        Ok(Some(creds))
    }

    /// Writes the credentials privately and atomically.
    pub fn save(&self, creds: &Credentials) -> anyhow::Result<()> {
        self.create_dir()?;
        let path = self.path();
        let tmp = self.dir.join(format!(".credentials.json.{}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            // A left-over from a crashed run of this pid may exist with any mode: replace it, so
            // the file holding the tokens is always created here, private from the start.
            let _ = std::fs::remove_file(&tmp);
            let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            f.write_all(serde_json::to_string_pretty(creds).map_err(std::io::Error::other)?.as_bytes())?;
            f.write_all(b"\n")?;
            drop(f);
            drover_qemu::durable::publish_blocking(&tmp, &path)
        };
        write()
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })
            .with_context(|| format!("cannot save the credentials to {}", path.display()))
    }

    /// Removes the saved credentials; false when there were none.
    pub fn delete(&self) -> anyhow::Result<bool> {
        let path = self.path();
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
    }

    /// Takes the exclusive refresh lock; it is released when the file is dropped.
    pub async fn lock(&self) -> anyhow::Result<File> {
        self.create_dir()?;
        let path = self.dir.join("credentials.lock");
        // `File::lock` blocks; keep it off the async workers.
        tokio::task::spawn_blocking(move || -> anyhow::Result<File> {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            f.lock().with_context(|| format!("cannot lock {}", path.display()))?;
            Ok(f)
        })
        .await
        .context("the credential lock task failed")?
    }

    fn create_dir(&self) -> anyhow::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn sample() -> Credentials {
        Credentials {
            server: "http://127.0.0.1:1".into(),
            access_token: "secret-access".into(),
            refresh_token: "secret-refresh".into(),
            expires_at: Utc::now(),
        }
    }

    #[test]
    fn save_load_delete_round_trip_privately() {
        let dir = tempfile::tempdir().unwrap();
        let store = CredentialStore::in_dir(&dir.path().join("nested"));
        assert!(store.load().unwrap().is_none());
        store.save(&sample()).unwrap();
        let mode = std::fs::metadata(store.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = store.load().unwrap().unwrap();
        assert_eq!(back.refresh_token, "secret-refresh");
        assert!(store.delete().unwrap());
        assert!(!store.delete().unwrap());
    }

    #[test]
    fn debug_hides_tokens() {
        let text = format!("{:?}", sample());
        assert!(!text.contains("secret"), "{text}");
    }

    #[test]
    fn expiry_has_a_margin() {
        let mut c = sample();
        let now = Utc::now();
        c.expires_at = now + chrono::Duration::seconds(10);
        assert!(c.access_expired(now));
        c.expires_at = now + chrono::Duration::seconds(600);
        assert!(!c.access_expired(now));
    }
}
