//! Limits on the connections of every listener (the native API's and both Veeam dialects'):
//! how many at once, how long a TLS handshake may take, how long a client may take to send a
//! request head and body, and how long a connection may sit idle.
//!
//! hyper alone bounds none of this here: the listener serves HTTP/1.1 and HTTP/2 through
//! hyper-util's `auto` builder, which first waits, without any timeout, for enough bytes to tell
//! the two apart, so a connection that sends nothing (or the start of the HTTP/2 preface) is held
//! for ever; and hyper's own header-read timeout, where it applies, counts a keep-alive
//! connection's idle wait as header time. So each connection carries a small state machine,
//! shared by its stream (which sees bytes) and its service (which sees requests):
//!
//! ```text
//!  accepted ──▶ Waiting ──first byte──▶ Head ──request head complete──▶ Busy(n)
//!                  ▲                                                      │
//!                  └────────────── last request answered ─────────────────┘
//!
//!  Waiting  the next request must start by the deadline: the header timeout on a new
//!           connection, the idle timeout after an answer (renewed by each write of its body)
//!  Head     the head must be complete within the header timeout of its first byte
//!  Busy     no deadline of ours; the request's body has its own (TimedBody)
//! ```
//!
//! When the deadline of `Waiting` or `Head` passes while the connection waits for bytes, its
//! stream fails and hyper closes the connection. A request's body must arrive whole within
//! [`ListenerLimits::body_read_timeout`] of its head, so a client cannot hold a handler by
//! sending its body slowly. A connection over the cap is closed as soon as it is accepted,
//! before its TLS handshake; the permit is held by the stream, so it is given back when hyper
//! drops the connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::Request;
use axum_server::accept::Accept;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// The limits of one listener. The defaults are what a server on the internet is expected to
/// have; tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// A request head must arrive within this time of its first byte (and a new connection must
    /// start its first request within this time).
    pub header_read_timeout: Duration,
    /// The TLS handshake must finish within this time.
    pub tls_handshake_timeout: Duration,
    /// A connection with no request in progress is closed after this long without a new one.
    pub idle_timeout: Duration,
    /// A request's body must have arrived within this time of its head (the handler then fails
    /// to read it: 400, and the connection is closed).
    pub body_read_timeout: Duration,
    /// Connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            header_read_timeout: Duration::from_secs(10),
            tls_handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No request in progress; the next must start before the deadline.
    Waiting { deadline: Instant },
    /// Bytes of a request have come; its head must be complete before the deadline.
    Head { deadline: Instant },
    /// This many requests are being handled (HTTP/2 runs several at once).
    Busy(usize),
}

/// One connection's phase, shared by its stream and its service.
#[derive(Debug)]
struct Conn {
    phase: Mutex<Phase>,
    limits: ListenerLimits,
}

impl Conn {
    fn new(limits: ListenerLimits) -> Conn {
        Conn { phase: Mutex::new(Phase::Waiting { deadline: Instant::now() + limits.header_read_timeout }), limits }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Phase) -> T) -> T {
        // A poisoned lock only means a panic elsewhere; the phase itself is always whole.
        let mut phase = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut phase)
    }

    fn bytes_read(&self) {
        self.with(|p| {
            if let Phase::Waiting { .. } = p {
                *p = Phase::Head { deadline: Instant::now() + self.limits.header_read_timeout };
            }
        })
    }

    /// Writing a response's body (a long download, server-sent events) keeps an answered
    /// connection alive; a client that stops reading it stops the writes, and the idle timeout
    /// ends it.
    fn bytes_written(&self) {
        self.with(|p| {
            if let Phase::Waiting { .. } = p {
                *p = Phase::Waiting { deadline: Instant::now() + self.limits.idle_timeout };
            }
        })
    }

    fn request_started(&self) {
        self.with(|p| {
            *p = match *p {
                Phase::Busy(n) => Phase::Busy(n + 1),
                _ => Phase::Busy(1),
            }
        })
    }

    fn request_finished(&self) {
        self.with(|p| {
            *p = match *p {
                Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
                _ => Phase::Waiting { deadline: Instant::now() + self.limits.idle_timeout },
            }
        })
    }

    fn deadline(&self) -> Option<Instant> {
        self.with(|p| match *p {
            Phase::Waiting { deadline } | Phase::Head { deadline } => Some(deadline),
            Phase::Busy(_) => None,
        })
    }
}

/// An acceptor that caps a listener's connections and gives each the deadlines above, around
/// another acceptor (TLS, or none).
#[derive(Debug, Clone)]
pub struct LimitedAcceptor<A> {
    inner: A,
    limits: ListenerLimits,
    connections: Arc<Semaphore>,
}

impl<A> LimitedAcceptor<A> {
    pub fn new(inner: A, limits: ListenerLimits) -> LimitedAcceptor<A> {
        LimitedAcceptor { inner, limits, connections: Arc::new(Semaphore::new(limits.max_connections)) }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<A, S> Accept<TcpStream, S> for LimitedAcceptor<A>
where
    A: Accept<TcpStream, S> + Clone + Send + Sync + 'static,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
    S: Send + 'static,
{
    type Stream = Guarded<A::Stream>;
    type Service = Counted<A::Service>;
    type Future = BoxFuture<io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        // Taken before the handshake: a client must not hold handshakes open beyond the cap.
        let permit = self.connections.clone().try_acquire_owned();
        let (inner, limits) = (self.inner.clone(), self.limits);
        Box::pin(async move {
            let permit = permit.map_err(|_| {
                tracing::debug!("connection refused: {} connections are open", limits.max_connections);
                io::Error::other("too many connections")
            })?;
            let (stream, service) = inner.accept(stream, service).await?;
            let conn = Arc::new(Conn::new(limits));
            let sleep = Box::pin(tokio::time::sleep(limits.header_read_timeout));
            Ok((
                Guarded { inner: stream, conn: conn.clone(), sleep, _permit: permit },
                Counted { inner: service, conn },
            ))
        })
    }
}

/// A connection's stream: fails a read or write that waits past the connection's deadline.
#[derive(Debug)]
pub struct Guarded<S> {
    inner: S,
    conn: Arc<Conn>,
    sleep: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl<S> Guarded<S> {
    /// Called when the inner stream is not ready: ready with an error once the deadline passed.
    fn poll_deadline<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let Some(deadline) = self.conn.deadline() else { return Poll::Pending };
        if self.sleep.deadline() != deadline {
            self.sleep.as_mut().reset(deadline);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client sent no complete request in time; connection closed",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.conn.bytes_read();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.poll_deadline(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.conn.bytes_written();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.poll_deadline(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.conn.bytes_written();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.poll_deadline(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.poll_deadline(cx),
            ready => ready,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection's service: tells the connection when requests start and finish (a request
/// counts until its response head is ready; its body's writes renew the idle deadline).
#[derive(Debug, Clone)]
pub struct Counted<S> {
    inner: S,
    conn: Arc<Conn>,
}

/// Marks a request finished when dropped, so a request whose future is dropped (the client
/// went away) counts as finished too.
struct InFlight(Arc<Conn>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

impl<S, B> tower::Service<Request<B>> for Counted<S>
where
    S: tower::Service<Request<TimedBody<B>>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.conn.request_started();
        let in_flight = InFlight(self.conn.clone());
        let deadline = Box::pin(tokio::time::sleep(self.conn.limits.body_read_timeout));
        let response = self.inner.call(request.map(|inner| TimedBody { inner, deadline }));
        Box::pin(async move {
            let response = response.await;
            drop(in_flight);
            response
        })
    }
}

/// A request body that must arrive whole before a deadline. A per-frame timeout would not do: a
/// client trickling one byte at a time makes a frame each time.
#[derive(Debug)]
pub struct TimedBody<B> {
    inner: B,
    deadline: Pin<Box<Sleep>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<B> http_body::Body for TimedBody<B>
where
    B: http_body::Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => Poll::Ready(frame.map(|f| f.map_err(Into::into))),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err("the request body did not arrive in time".into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deadline, as a time from now in whole seconds (rounded up: the checks run in far less
    /// than a second).
    fn secs_left(conn: &Conn) -> Option<u64> {
        conn.deadline().map(|d| d.saturating_duration_since(Instant::now()).as_secs_f64().ceil() as u64)
    }

    #[tokio::test]
    async fn the_phases_set_the_deadlines() {
        let limits = ListenerLimits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            ..ListenerLimits::default()
        };
        let conn = Conn::new(limits);
        // A new connection must start a request within the header timeout.
        assert_eq!(secs_left(&conn), Some(10));
        // Its head must be complete within the header timeout of its first byte; more bytes,
        // and the server's own writes (HTTP/2 settings), do not extend that.
        conn.bytes_read();
        let head = conn.deadline();
        conn.bytes_read();
        conn.bytes_written();
        assert_eq!(conn.deadline(), head);
        // While requests run, no deadline; the last one done starts the idle timeout.
        conn.request_started();
        conn.request_started();
        assert_eq!(conn.deadline(), None);
        conn.request_finished();
        assert_eq!(conn.deadline(), None);
        conn.request_finished();
        assert_eq!(secs_left(&conn), Some(60));
        // Writing the answer's body renews it; the next request's first byte starts the header
        // timeout again.
        let idle = conn.deadline().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        conn.bytes_written();
        assert!(conn.deadline().unwrap() > idle);
        conn.bytes_read();
        assert_eq!(secs_left(&conn), Some(10));
    }
}
