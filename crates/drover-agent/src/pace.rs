//! Bandwidth limits on what a source agent sends (issue 11, item 3): a transfer's own limit
//! ([`drover_agent_api::TransferSpec::bandwidth_limit`], carried in the pull) and the agent's
//! global cap ([`crate::LocalAgent::with_global_bandwidth_cap`]), one bucket shared by every
//! connection its data listener serves. A connection is paced by both.
//!
//! Pacing happens in `poll_write` of the connection, below TLS (what crosses the link): a write
//! is given at most the tokens both buckets hold, and waits (a timer, no buffer of its own) when
//! either is short. So nothing is held here but the caller's frame, which the codec already
//! bounds.
//!
//! Written here rather than taken from a crate: the buckets must be taken from atomically
//! together and partly given back when the socket accepts fewer bytes than offered (or none),
//! which `governor`'s GCRA cells cannot do (no refund, one limiter at a time); what is needed is
//! some forty lines.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The most a bucket holds: a quarter of a second of its rate, between one TLS record and
/// 4 MiB. Bounds a burst after an idle spell.
fn burst_of(rate: u64) -> u64 {
    (rate / 4).clamp(16 << 10, 4 << 20)
}

/// What a waiting write waits for at least (a twentieth of a second, at most 64 KiB, never more
/// than the burst): fewer, larger writes than one per byte, and still a steady trickle at low
/// rates (the receiver gives up a stream that brings nothing for its idle timeout).
fn quantum_of(rate: u64) -> u64 {
    (rate / 20).clamp(1, 64 << 10).min(burst_of(rate))
}

/// A token bucket: `rate` bytes per second, holding at most [`burst_of`] of them. It starts
/// empty, so a connection gets no burst at its start.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: u64,
    burst: u64,
    quantum: u64,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// `rate` in bytes per second; `None` for 0, which would never let a byte through.
    pub(crate) fn new(rate: u64) -> Option<TokenBucket> {
        (rate > 0).then(|| TokenBucket {
            rate,
            burst: burst_of(rate),
            quantum: quantum_of(rate),
            state: Mutex::new(BucketState { tokens: 0.0, at: Instant::now() }),
        })
    }

    /// Takes up to `want` tokens (at least 1), once the bucket holds at least `min(want,
    /// quantum)`; otherwise says how long until it does.
    fn take(&self, want: u64, now: Instant) -> Result<u64, Duration> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = now.saturating_duration_since(s.at).as_secs_f64();
        s.tokens = (s.tokens + elapsed * self.rate as f64).min(self.burst as f64);
        s.at = now;
        let need = want.min(self.quantum).max(1) as f64;
        if s.tokens >= need {
            let granted = (s.tokens.floor() as u64).min(want).max(1);
            s.tokens -= granted as f64;
            Ok(granted)
        } else {
            Err(Duration::from_secs_f64((need - s.tokens) / self.rate as f64))
        }
    }

    /// Returns tokens taken but not used (the socket took fewer bytes, or none).
    fn give_back(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.tokens = (s.tokens + n as f64).min(self.burst as f64);
    }
}

/// The limits one connection is paced by: the agent's global cap from the start, the
/// transfer's own once its pull has been read.
#[derive(Debug)]
pub(crate) struct Pacer {
    global: Option<Arc<TokenBucket>>,
    job: Mutex<Option<Arc<TokenBucket>>>,
    /// Writes held back for want of tokens, over all connections of the listener.
    waits: Arc<AtomicU64>,
}

impl Pacer {
    pub(crate) fn new(global: Option<Arc<TokenBucket>>, waits: Arc<AtomicU64>) -> Pacer {
        Pacer { global, job: Mutex::new(None), waits }
    }

    /// Paces what follows by `bucket` as well: one bucket shared by every stream of a transfer,
    /// so a transfer over several streams keeps to its limit in sum.
    pub(crate) fn set_job_bucket(&self, bucket: Option<Arc<TokenBucket>>) {
        *self.job.lock().unwrap_or_else(|e| e.into_inner()) = bucket;
    }

    fn buckets(&self) -> [Option<Arc<TokenBucket>>; 2] {
        [self.job.lock().unwrap_or_else(|e| e.into_inner()).clone(), self.global.clone()]
    }
}

/// A connection whose writes are paced by a [`Pacer`]; reads pass through.
pub(crate) struct Paced<S> {
    inner: S,
    pacer: Arc<Pacer>,
    wait: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Paced<S> {
    pub(crate) fn new(inner: S, pacer: Arc<Pacer>) -> Paced<S> {
        Paced { inner, pacer, wait: None }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Paced<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Paced<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        let buckets = self.pacer.buckets();
        // Bounded: each round either writes or waits on a timer that has not fired yet.
        for _ in 0..64 {
            if let Some(wait) = self.wait.as_mut() {
                if wait.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.wait = None;
            }
            // Take from each bucket in turn, no more than the one before granted; on a shortage
            // give back what was taken and wait for the bucket that is short.
            let now = Instant::now();
            let mut granted = buf.len() as u64;
            let mut taken: Vec<(&TokenBucket, u64)> = Vec::with_capacity(2);
            let mut short = None;
            for bucket in buckets.iter().flatten() {
                match bucket.take(granted, now) {
                    Ok(n) => {
                        granted = n;
                        taken.push((bucket, n));
                    }
                    Err(wait) => {
                        short = Some(wait);
                        break;
                    }
                }
            }
            if let Some(wait) = short {
                for (bucket, n) in taken {
                    bucket.give_back(n);
                }
                self.pacer.waits.fetch_add(1, Ordering::Relaxed);
                let wait = wait.max(Duration::from_millis(1));
                self.wait = Some(Box::pin(tokio::time::sleep(wait)));
                continue;
            }
            let result = Pin::new(&mut self.inner).poll_write(cx, &buf[..granted as usize]);
            let used = match &result {
                Poll::Ready(Ok(n)) => *n as u64,
                _ => 0,
            };
            for (bucket, n) in taken {
                bucket.give_back(n.saturating_sub(used));
            }
            return result;
        }
        // Timers that keep firing early (should not happen): let the task be polled again.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_starts_empty_refills_at_its_rate_and_holds_at_most_its_burst() {
        let b = TokenBucket::new(4 << 20).unwrap();
        assert!(TokenBucket::new(0).is_none(), "0 bytes per second never lets a byte through");
        let t0 = b.state.lock().unwrap().at;
        let wait = b.take(1 << 20, t0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(20), "{wait:?}");
        // 100 ms: 0.4 MiB.
        let got = b.take(1 << 20, t0 + Duration::from_millis(100)).unwrap();
        assert!((419_000..=420_000).contains(&got), "{got}");
        // An hour idle fills it to its burst, no more.
        let got = b.take(u64::MAX, t0 + Duration::from_secs(3600)).unwrap();
        assert_eq!(got, burst_of(4 << 20));
        assert_eq!(burst_of(4 << 20), 1 << 20);
        // Tokens not used come back, up to the burst.
        b.give_back(got);
        b.give_back(got);
        assert_eq!(b.take(u64::MAX, t0 + Duration::from_secs(3600)).unwrap(), 1 << 20);
    }

    #[test]
    fn bursts_and_quanta_stay_in_their_bounds() {
        for rate in [1, 1000, 16 << 10, 1 << 20, 100 << 20, u64::MAX] {
            let (burst, quantum) = (burst_of(rate), quantum_of(rate));
            assert!((16 << 10..=4 << 20).contains(&burst), "{rate}: {burst}");
            assert!(quantum >= 1 && quantum <= burst && quantum <= 64 << 10, "{rate}: {quantum}");
        }
    }

    #[tokio::test]
    async fn writes_through_a_paced_connection_take_their_time() {
        let waits = Arc::new(AtomicU64::new(0));
        let pacer = Arc::new(Pacer::new(None, waits.clone()));
        pacer.set_job_bucket(TokenBucket::new(1 << 20).map(Arc::new));
        let (client, mut server) = tokio::io::duplex(64 << 10);
        let mut paced = Paced::new(client, pacer);
        let reader = tokio::spawn(async move {
            let mut sink = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut server, &mut sink).await.map(|_| sink.len())
        });
        let started = std::time::Instant::now();
        let bytes = vec![7u8; 512 << 10];
        tokio::io::AsyncWriteExt::write_all(&mut paced, &bytes).await.unwrap();
        tokio::io::AsyncWriteExt::shutdown(&mut paced).await.unwrap();
        drop(paced);
        assert_eq!(reader.await.unwrap().unwrap(), 512 << 10);
        let took = started.elapsed();
        // Half a second of a bucket that starts empty; a lower bound only.
        assert!(took >= Duration::from_millis(375), "{took:?}");
        assert!(waits.load(Ordering::Relaxed) > 0);
    }
}
