//! Passwords and tokens.
//!
//! Passwords are stored as argon2id hashes. Logins get an opaque bearer token (about 15 minutes)
//! and a single-use refresh token that rotates on every use; the store keeps only their BLAKE3
//! hashes, so a copy of the database holds no usable credential. Reusing a refresh token revokes
//! the whole login (a stolen token is worth nothing once the rightful client refreshes).
//!
//! Every argon2 computation goes through one bound ([`PasswordWork`], one per `App`, which all the
//! APIs of a process share): on threads of its own, a few at once, a short queue, and a 503
//! beyond it.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use base64::Engine as _;
use drover_store::{TokenKind, TokenRecord};
use drover_types::{Error, Result, Timestamp, UserId};
use rand::RngCore;
use tokio::sync::Semaphore;

/// Access tokens live 15 minutes; `expires_in` reports one second less so a client refreshes in time.
pub const ACCESS_TOKEN_SECS: i64 = 900;
pub const REFRESH_TOKEN_SECS: i64 = 24 * 3600;

/// What a login of an unknown user is checked against: a well-formed hash with the default
/// parameters, so the check costs what a real one costs.
pub const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";

fn hash_password_now(password: &str) -> Result<String> {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::internal(format!("cannot hash password: {e}")))
}

/// Checks a password with the calling thread's own argon2 memory (see [`PasswordWork`]); what
/// `Argon2::verify_password` does, but without allocating 19 MiB each time.
fn verify_password_now(password: &str, hash: &str) -> bool {
    thread_local! {
        static MEMORY: std::cell::RefCell<Vec<argon2::Block>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let Ok(hash) = PasswordHash::new(hash) else { return false };
    let (Some(salt), Some(expected)) = (hash.salt, hash.hash) else { return false };
    let Ok(algorithm) = argon2::Algorithm::try_from(hash.algorithm) else { return false };
    let Ok(version) = hash.version.map(argon2::Version::try_from).transpose() else { return false };
    let Ok(params) = argon2::Params::try_from(&hash) else { return false };
    let mut salt_buffer = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buffer) else { return false };
    let blocks = params.block_count();
    let argon2 = Argon2::new(algorithm, version.unwrap_or_default(), params);
    MEMORY.with_borrow_mut(|memory| {
        if memory.len() < blocks {
            memory.resize(blocks, argon2::Block::default());
        }
        // Output's comparison is constant-time.
        argon2::password_hash::Output::init_with(expected.len(), |out| {
            argon2
                .hash_password_into_with_memory(password.as_bytes(), salt, out, &mut memory[..blocks])
                .map_err(Into::into)
        })
        .is_ok_and(|computed| computed == expected)
    })
}

/// The bound on argon2 work (hashing and verifying passwords and client secrets).
///
/// Each argon2id computation takes about 19 MiB and tens of milliseconds of one core. Run
/// unbounded, a flood of wrong passwords held hundreds of them at once (4.8 GB resident, never
/// given back to the system) and, run on an async worker, stalled every other request. So every
/// computation runs on one of `workers` threads of its own (about the number of cores: more would
/// only share the same cores), with at most `queue` more waiting; a request beyond that is
/// refused at once with `Unavailable` (503 and `Retry-After`) rather than queued without end.
///
/// Threads of its own rather than tokio's blocking pool, each verifying with the same memory
/// every time: glibc's allocator keeps freed memory in per-thread arenas, and a fresh 19 MiB for
/// each check left most of them behind (a flood of 500 logins grew the process by 600 MB on
/// tokio's pool, by 210 MB on two threads that allocated afresh; by the two threads' 2 × 19 MiB
/// now). Hashing a new password (rare, and only for callers who are logged in) allocates.
#[derive(Debug, Clone)]
pub struct PasswordWork {
    admitted: Arc<Semaphore>,
    jobs: std::sync::mpsc::Sender<Job>,
}

type Job = Box<dyn FnOnce() + Send>;

impl PasswordWork {
    pub fn new(workers: usize, queue: usize) -> PasswordWork {
        let workers = workers.max(1);
        let (jobs, receiver) = std::sync::mpsc::channel::<Job>();
        let receiver = Arc::new(std::sync::Mutex::new(receiver));
        for i in 0..workers {
            let receiver = receiver.clone();
            let spawned = std::thread::Builder::new().name(format!("drover-argon2-{i}")).spawn(move || {
                loop {
                    // The lock is held only while waiting for a job, not while running it.
                    let job = match receiver.lock() {
                        Ok(r) => r.recv(),
                        Err(_) => return,
                    };
                    match job {
                        // A panic fails that one job (its caller gets an error), not the thread.
                        Ok(job) => {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                        // Every PasswordWork is gone.
                        Err(_) => return,
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::error!("cannot start a password-hashing thread: {e}");
            }
        }
        PasswordWork { admitted: Arc::new(Semaphore::new(workers + queue)), jobs }
    }

    /// An argon2id hash of `password`.
    pub async fn hash(&self, password: &str) -> Result<String> {
        let password = password.to_string();
        self.run(move || hash_password_now(&password)).await?
    }

    /// Whether `password` matches `hash` (`Err(Unavailable)` when the queue is full).
    pub async fn verify(&self, password: &str, hash: &str) -> Result<bool> {
        let (password, hash) = (password.to_string(), hash.to_string());
        self.run(move || verify_password_now(&password, &hash)).await
    }

    /// Runs `work` on one of the bound's threads.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let admitted =
            self.admitted.clone().try_acquire_owned().map_err(|_| {
                Error::Unavailable("too many password checks are waiting; try again in a moment".into())
            })?;
        let (done, result) = tokio::sync::oneshot::channel();
        // The permit moves into the job: a client that hangs up does not free a place in the
        // queue while its computation is still to run.
        let job: Job = Box::new(move || {
            let _admitted = admitted;
            let _ = done.send(work());
        });
        self.jobs.send(job).map_err(|_| Error::internal("the password-hashing threads are gone"))?;
        result.await.map_err(|_| Error::internal("a password-hashing thread failed"))
    }
}

/// As many threads as cores, each with [`QUEUE_PER_WORKER`] places in the queue. One per `App`,
/// which every API of a process shares: the limit is on the cores and memory they all share.
impl Default for PasswordWork {
    fn default() -> Self {
        let workers = std::thread::available_parallelism().map_or(2, usize::from);
        PasswordWork::new(workers, workers * QUEUE_PER_WORKER)
    }
}

/// Waiting password checks per worker: enough to absorb a burst of logins (a few hundred
/// milliseconds of work), few enough that a queued login still answers within about a second.
const QUEUE_PER_WORKER: usize = 8;

/// A fresh random secret, URL-safe.
pub fn random_secret(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

pub fn token_hash(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub expires_in: i64,
}

/// Makes a token pair and the records to store for it.
pub fn issue(user: UserId, family: uuid::Uuid, now: Timestamp) -> (TokenPair, [TokenRecord; 2]) {
    let access = random_secret(32);
    let refresh = random_secret(32);
    let rec = |token: &str, kind, secs| TokenRecord {
        hash: token_hash(token),
        kind,
        user_id: user,
        family,
        expires_at: now + chrono::Duration::seconds(secs),
        used_at: None,
        created_at: now,
    };
    let records =
        [rec(&access, TokenKind::Access, ACCESS_TOKEN_SECS), rec(&refresh, TokenKind::Refresh, REFRESH_TOKEN_SECS)];
    (TokenPair { access_token: access, refresh_token: refresh, expires_in: ACCESS_TOKEN_SECS - 1 }, records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn passwords_verify_and_tokens_hash_stably() {
        let work = PasswordWork::default();
        let h = work.hash("s3cret").await.unwrap();
        assert!(work.verify("s3cret", &h).await.unwrap());
        assert!(!work.verify("S3cret", &h).await.unwrap());
        assert!(!work.verify("s3cret", "not a hash").await.unwrap());
        // The unknown user's check must really run argon2 with the real parameters.
        let dummy = PasswordHash::new(DUMMY_HASH).unwrap();
        assert_eq!(dummy.params, PasswordHash::new(&h).unwrap().params);
        assert!(!work.verify("s3cret", DUMMY_HASH).await.unwrap());
        assert_eq!(token_hash("a"), token_hash("a"));
        assert_ne!(random_secret(32), random_secret(32));
    }

    #[test]
    fn the_reused_memory_check_agrees_with_argon2s_own() {
        use argon2::password_hash::PasswordVerifier;
        // Other parameters and algorithms than the default, and the same thread's memory reused
        // across sizes.
        let salt = SaltString::from_b64("c2FsdHNhbHRzYWx0").unwrap();
        let hashes: Vec<String> = [
            (argon2::Algorithm::Argon2id, argon2::Params::new(4096, 3, 1, None).unwrap()),
            (argon2::Algorithm::Argon2i, argon2::Params::new(8192, 2, 2, Some(16)).unwrap()),
            (argon2::Algorithm::Argon2d, argon2::Params::default()),
        ]
        .into_iter()
        .map(|(a, p)| Argon2::new(a, argon2::Version::V0x13, p).hash_password(b"right", &salt).unwrap().to_string())
        .collect();
        for hash in &hashes {
            let parsed = PasswordHash::new(hash).unwrap();
            for password in ["right", "wrong", ""] {
                let theirs = Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok();
                assert_eq!(verify_password_now(password, hash), theirs, "{password} against {hash}");
            }
            assert!(verify_password_now("right", hash));
        }
        assert!(!verify_password_now("right", "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA"));
    }

    #[tokio::test]
    async fn password_work_runs_a_few_at_once_and_refuses_beyond_its_queue() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let work = PasswordWork::new(2, 3);
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(std::sync::Mutex::new(gate));
        let job = || {
            let (running, most, gate) = (running.clone(), most.clone(), gate.clone());
            move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Held until the test lets one job go.
                let _ = gate.lock().unwrap().recv();
                running.fetch_sub(1, Ordering::SeqCst);
            }
        };
        // Five fit (two running, three waiting); the sixth is refused at once.
        let admitted: Vec<_> = (0..5)
            .map(|_| {
                tokio::spawn({
                    let (work, job) = (work.clone(), job());
                    async move { work.run(job).await }
                })
            })
            .collect();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while work.admitted.available_permits() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "the five jobs were not admitted");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        while running.load(Ordering::SeqCst) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "two jobs did not start");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let refused = work.run(|| ()).await.unwrap_err();
        assert!(matches!(refused, Error::Unavailable(_)), "{refused:?}");
        for _ in 0..5 {
            release.send(()).unwrap();
        }
        for a in admitted {
            a.await.unwrap().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 2, "never more than two ran at once");
        // Once the queue has drained, work is admitted again.
        assert_eq!(work.run(|| 7).await.unwrap(), 7);
    }
}
