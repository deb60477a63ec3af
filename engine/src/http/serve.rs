//! Serving a router on a listener the way the API and the admin socket need it: HTTP/1.1 and
//! HTTP/2 with prior knowledge on the same port (the first bytes of a connection tell which,
//! as Corrosion serves them and its client expects), TCP_NODELAY on every accepted socket, a
//! cap on open connections, and idle connections closed.
//!
//! Why TCP_NODELAY: an answer leaves as a head and a body; with Nagle's algorithm the second
//! small segment waits for the ACK of the first, which a client with delayed ACKs holds for
//! ~40 ms, so every request on a kept-alive connection paid 40 ms.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{watch, Semaphore};

/// What bounds the connections of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ServeLimits {
    /// Open connections; a connection beyond it is closed at once.
    pub connections_max: usize,
    /// A connection with no request in flight and no bytes either way for this long is closed
    /// (also one kept alive and waiting for its next request); so is one with an answer the
    /// client has taken nothing of for this long (it stopped reading).
    pub idle_timeout: Duration,
    /// An HTTP/1.1 request head begun must be complete within this, else the connection is
    /// closed (a client sending its head a byte at a time holds nothing longer).
    pub header_timeout: Duration,
}

/// A listener [`serve`] accepts from: TCP (with TCP_NODELAY set) or a unix socket.
pub trait Listener: Send + 'static {
    /// The accepted socket.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection.
    fn accept(&self) -> impl std::future::Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        stream.set_nodelay(true)?;
        tracing::debug!(%peer, "API connection accepted");
        Ok(stream)
    }
}

impl Listener for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        Ok(tokio::net::UnixListener::accept(self).await?.0)
    }
}

/// How long connections get to finish their requests once the agent stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `router` on `listener` until `shutdown` turns true; then stops accepting, asks every
/// connection to finish (HTTP/2: GOAWAY; HTTP/1.1: close after the request in flight) and
/// waits for them at most [`DRAIN_TIMEOUT`].
pub async fn serve<L: Listener>(
    listener: L,
    router: Router,
    limits: ServeLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let connections_max = limits.connections_max.min(open_files_allowed() / 2).max(1);
    let slots = Arc::new(Semaphore::new(connections_max));
    loop {
        let io = tokio::select! {
            _ = stopped(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(io) => io,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: back off briefly
                    // rather than spin.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("connection refused: {connections_max} open already");
            drop(io);
            continue;
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        crate::logging::spawn(async move {
            serve_connection(io, router, limits, shutdown).await;
            drop(slot);
        });
    }
    let all = u32::try_from(connections_max).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(all)).await;
}

/// Resolves once `shutdown` turns true (the watch guard stays inside, so callers stay Send).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Activity of one connection, shared by its socket, its requests and its watchdog.
#[derive(Debug)]
struct Activity {
    started: Instant,
    /// Milliseconds after `started` of the last byte read or written.
    last_ms: AtomicU64,
    /// Requests whose answer has not been fully sent (streams included).
    in_flight: AtomicUsize,
    /// 1 + milliseconds after `started` of the first byte of an HTTP/1.1 request head not yet
    /// complete; 0 when none is.
    head_since_ms: AtomicU64,
    /// The connection speaks HTTP/2 (its first bytes were the preface): its frames are no
    /// request heads, and hyper bounds them.
    http2: AtomicBool,
    /// One cell per answer body still alive: 1 + milliseconds after `started` when the body
    /// last handed a frame over and has not been asked for the next since (the client is not
    /// taking what it was sent); 0 while hyper waits on the body instead.
    answers: std::sync::Mutex<Vec<std::sync::Weak<AtomicU64>>>,
}

impl Activity {
    fn touch(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Bytes arrived: outside a request they begin a request head (HTTP/1.1).
    fn read(&self) {
        self.touch();
        if !self.http2.load(Ordering::Relaxed)
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_since_ms.load(Ordering::Relaxed) == 0
        {
            self.head_since_ms.store(self.now_cell(), Ordering::Relaxed);
        }
    }

    /// How long a request head has been arriving, if one is.
    fn head_for(&self) -> Option<Duration> {
        match self.head_since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(self.since_cell(since)),
        }
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn now_cell(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// Time since a cell's moment (1 + ms after `started`; 0 counts from `started`).
    fn since_cell(&self, cell: u64) -> Duration {
        self.started
            .elapsed()
            .saturating_sub(Duration::from_millis(cell.saturating_sub(1)))
    }

    /// Whether the client has stopped taking what it is sent: an answer handed a piece over
    /// that hyper has not asked to follow for `limit` (see [`Watched`]).
    fn stopped_reading(&self, limit: Duration) -> bool {
        self.stalled_for().is_some_and(|t| t >= limit)
    }

    /// A cell for a new answer body.
    fn answer(&self) -> Arc<AtomicU64> {
        let cell = Arc::new(AtomicU64::new(0));
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        // A kept-alive connection answers many requests: forget the finished ones first.
        if answers.len() >= ANSWERS_PRUNE_AT {
            answers.retain(|a| a.strong_count() > 0);
        }
        answers.push(Arc::downgrade(&cell));
        cell
    }

    /// How long the answer the client has been slowest to take has waited, if one waits.
    fn stalled_for(&self) -> Option<Duration> {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        answers.retain(|a| a.strong_count() > 0);
        let since = answers
            .iter()
            .filter_map(|a| a.upgrade())
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|&since| since != 0)
            .min()?;
        Some(self.since_cell(since))
    }
}

/// Past this many answer cells a connection drops those of finished answers.
const ANSWERS_PRUNE_AT: usize = 64;

/// An answer's frames are handed to hyper in pieces of at most this size, so that being asked
/// for the next piece tracks what the client takes: hyper asks once a piece is written out
/// (HTTP/1.1) or the stream's window has room again (HTTP/2), which a reader that keeps reading
/// gives often, however large the frames its answer is made of.
const PIECE_BYTES: usize = 16 * 1024;

/// An answer's body as hyper pulls it, in pieces of at most [`PIECE_BYTES`], marking when it
/// handed a piece over and was not asked for the next. An answer marked for long has a client
/// that stopped reading: neither the socket's buffers nor HTTP/2 flow control would ever free
/// what it holds (a stream slot, its queue, the connection). A quiet stream is never marked:
/// hyper asked for its next piece, and it has none yet.
struct Watched<B> {
    inner: B,
    /// What is left of the frame being handed over in pieces.
    rest: Bytes,
    cell: Arc<AtomicU64>,
    activity: Arc<Activity>,
    /// Counts the request in flight until the body is dropped (sent or abandoned).
    _in_flight: InFlight,
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for Watched<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let poll = if this.rest.is_empty() {
            match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
                std::task::Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.rest = data;
                        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(
                            this.next_piece(),
                        ))))
                    }
                    Err(frame) => std::task::Poll::Ready(Some(Ok(frame))),
                },
                other => other,
            }
        } else {
            std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(this.next_piece()))))
        };
        let handed = match &poll {
            std::task::Poll::Ready(Some(Ok(_))) => this.activity.now_cell(),
            _ => 0,
        };
        this.cell.store(handed, Ordering::Relaxed);
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = hyper::body::SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

impl<B> Watched<B> {
    fn next_piece(&mut self) -> Bytes {
        let take = self.rest.len().min(PIECE_BYTES);
        self.rest.split_to(take)
    }
}

/// Decrements the in-flight count when an answer's body is dropped (sent or abandoned).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection<Io: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: Io,
    router: Router,
    limits: ServeLimits,
    mut shutdown: watch::Receiver<bool>,
) {
    let ServeLimits {
        idle_timeout,
        header_timeout,
        ..
    } = limits;
    let activity = Arc::new(Activity {
        started: Instant::now(),
        last_ms: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        head_since_ms: AtomicU64::new(0),
        http2: AtomicBool::new(false),
        answers: std::sync::Mutex::new(Vec::new()),
    });
    let io = Tracked {
        inner: io,
        activity: activity.clone(),
        first: Some(Vec::with_capacity(HTTP2_PREFACE.len())),
    };
    let service_activity = activity.clone();
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let activity = service_activity.clone();
            let router = router.clone();
            async move {
                activity.in_flight.fetch_add(1, Ordering::Relaxed);
                // The head is complete.
                activity.head_since_ms.store(0, Ordering::Relaxed);
                let guard = InFlight(activity.clone());
                let response = tower::ServiceExt::oneshot(router, request.map(Body::new)).await?;
                // The guard lives as long as the body: a stream counts as work until it ends.
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    Body::new(Watched {
                        inner: body,
                        rest: Bytes::new(),
                        cell: activity.answer(),
                        activity,
                        _in_flight: guard,
                    })
                }))
            }
        });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(idle_timeout)
        .keep_alive(true);
    // No HTTP/2 keep-alive pings: they are traffic, so an idle connection would never look
    // idle to the watchdog below.
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let mut check = tokio::time::interval(
        (idle_timeout.min(header_timeout) / 4).max(Duration::from_millis(10)),
    );
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
                return;
            }
            _ = stopped(&mut shutdown), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = check.tick() => {
                if activity.head_for().is_some_and(|t| t >= header_timeout) {
                    tracing::debug!("closing a connection whose request head took over {header_timeout:?}");
                    return;
                }
                // Not graceful: a client that does not read would not take a GOAWAY either.
                if activity.stopped_reading(idle_timeout) {
                    tracing::debug!("closing a connection whose client took none of an answer for {idle_timeout:?}");
                    return;
                }
                let idle = activity.in_flight.load(Ordering::Relaxed) == 0
                    && activity.idle_for() >= idle_timeout;
                if idle && !closing {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                } else if idle && activity.idle_for() >= idle_timeout * 2 {
                    // Asked to close and still silent: drop it.
                    return;
                }
            }
        }
    }
}

/// The first bytes of an HTTP/2 connection with prior knowledge, enough to tell it from an
/// HTTP/1.1 request line.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// A socket that records when bytes last moved.
struct Tracked<Io> {
    inner: Io,
    activity: Arc<Activity>,
    /// The connection's first bytes, until they tell HTTP/2 from HTTP/1.1 (then None).
    first: Option<Vec<u8>>,
}

impl<Io: AsyncRead + Unpin> AsyncRead for Tracked<Io> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            let Tracked {
                first, activity, ..
            } = &mut *self;
            if let Some(seen) = first {
                let new = &buf.filled()[before..];
                let take = new.len().min(HTTP2_PREFACE.len() - seen.len());
                seen.extend_from_slice(&new[..take]);
                if !HTTP2_PREFACE.starts_with(seen) {
                    *first = None;
                } else if seen.len() == HTTP2_PREFACE.len() {
                    activity.http2.store(true, Ordering::Relaxed);
                    activity.head_since_ms.store(0, Ordering::Relaxed);
                    *first = None;
                }
            }
            activity.read();
        }
        poll
    }
}

impl<Io> Tracked<Io> {
    fn written(&self, poll: &std::task::Poll<std::io::Result<usize>>) {
        if matches!(poll, std::task::Poll::Ready(Ok(n)) if *n > 0) {
            self.activity.touch();
        }
    }
}

impl<Io: AsyncWrite + Unpin> AsyncWrite for Tracked<Io> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.written(&poll);
        poll
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.written(&poll);
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The soft limit on open files of this process (from /proc; 1,024 where it cannot be read):
/// connections beyond half of it would starve the store, the transport and accept itself.
fn open_files_allowed() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            let soft = line.split_whitespace().nth(3)?;
            Some(if soft == "unlimited" {
                usize::MAX
            } else {
                soft.parse().ok()?
            })
        })
        .unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;
    use tokio_stream::StreamExt as _;

    const IDLE: Duration = Duration::from_millis(300);

    /// Says when it is dropped: the answer holding it was let go.
    struct Dropped(Option<oneshot::Sender<()>>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }

    type Chunk = Result<axum::body::Bytes, std::io::Error>;

    /// A router with one answer, made by `body` with a guard that reports its drop.
    fn router_with<S>(
        body: impl Fn() -> S + Clone + Send + Sync + 'static,
    ) -> (Router, oneshot::Receiver<()>)
    where
        S: tokio_stream::Stream<Item = Chunk> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
        let router = Router::new().route(
            "/answer",
            get(move || {
                let guard = Dropped(tx.lock().unwrap().take());
                let stream = body().map(move |chunk| {
                    let _ = &guard;
                    chunk
                });
                async move { Body::from_stream(stream) }
            }),
        );
        (router, rx)
    }

    /// 16 KiB chunks without end.
    fn endless() -> impl tokio_stream::Stream<Item = Chunk> {
        tokio_stream::iter(std::iter::repeat_with(|| {
            Ok(axum::body::Bytes::from(vec![b'x'; 16 * 1024]))
        }))
    }

    /// 1 MiB chunks without end: hyper takes the next only once one is written out.
    fn endless_large() -> impl tokio_stream::Stream<Item = Chunk> {
        tokio_stream::iter(std::iter::repeat_with(|| {
            Ok(axum::body::Bytes::from(vec![b'x'; 1024 * 1024]))
        }))
    }

    /// One line, then nothing for ever: a subscription with no changes.
    fn quiet() -> impl tokio_stream::Stream<Item = Chunk> {
        tokio_stream::once(Ok(axum::body::Bytes::from_static(b"{}\n")))
            .chain(tokio_stream::pending())
    }

    /// Serves one connection over an in-memory pipe of 64 KiB; returns the client's end and
    /// the connection's task.
    fn connect(router: Router) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let limits = ServeLimits {
            connections_max: 8,
            idle_timeout: IDLE,
            header_timeout: IDLE,
        };
        let (_stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(async move {
            let _stop = _stop;
            serve_connection(server, router, limits, shutdown).await;
        });
        (client, task)
    }

    const GET: &[u8] = b"GET /answer HTTP/1.1\r\nHost: patina\r\n\r\n";

    /// The answer is let go and its connection closed within seconds.
    async fn closed_soon(dropped: oneshot::Receiver<()>, task: tokio::task::JoinHandle<()>) {
        tokio::time::timeout(Duration::from_secs(10), dropped)
            .await
            .expect("the answer was still held 10 s after its client stopped reading")
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the connection stayed open")
            .unwrap();
    }

    #[tokio::test]
    async fn an_http1_client_that_stops_reading_loses_its_connection() {
        let (router, dropped) = router_with(endless);
        let (mut client, task) = connect(router);
        client.write_all(GET).await.unwrap();
        // Never read: the pipe and hyper's buffer fill, and the answer waits.
        closed_soon(dropped, task).await;
    }

    #[tokio::test]
    async fn an_http2_stream_whose_client_stops_reading_loses_its_connection() {
        let (router, dropped) = router_with(endless);
        let (client, task) = connect(router);
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                .await
                .unwrap();
        // The client's connection goes on (it answers pings and settings): only the stream's
        // window stays shut, because its body is never read.
        tokio::spawn(connection);
        let request = hyper::Request::get("http://patina/answer")
            .body(http_body_util::Empty::<axum::body::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        closed_soon(dropped, task).await;
        drop(response);
    }

    #[tokio::test]
    async fn a_quiet_stream_and_a_slow_reader_keep_their_connections() {
        // A stream with nothing to send is not a client that does not read.
        let (router, mut dropped) = router_with(quiet);
        let (mut client, task) = connect(router);
        client.write_all(GET).await.unwrap();
        let mut head = [0u8; 256];
        let n = client.read(&mut head).await.unwrap();
        assert!(head[..n].starts_with(b"HTTP/1.1 200"));
        tokio::time::sleep(IDLE * 5).await;
        assert!(dropped.try_recv().is_err(), "a quiet stream was cut");
        assert!(
            !task.is_finished(),
            "a quiet stream's connection was closed"
        );

        // A client that reads slowly but steadily keeps its answer, even when one piece of the
        // answer takes it far longer than the limit to read (1 MiB at 16 KiB a tenth of the
        // limit: hyper asks for the next piece only after 6 s).
        let (router, mut dropped) = router_with(endless_large);
        let (mut client, task) = connect(router);
        client.write_all(GET).await.unwrap();
        let mut buffer = vec![0u8; 16 * 1024];
        let mut taken = 0usize;
        for _ in 0..15 {
            tokio::time::sleep(IDLE / 3).await;
            taken += client.read(&mut buffer).await.unwrap();
        }
        assert!(taken > 0);
        assert!(
            dropped.try_recv().is_err(),
            "a slow reader's answer was cut"
        );
        assert!(!task.is_finished(), "a slow reader's connection was closed");
    }
}
