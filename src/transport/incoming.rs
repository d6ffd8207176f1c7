//! Accepting connections, so that clients which connect and then send nothing, or
//! next to nothing, cannot use up the process's connection slots or descriptors:
//!
//! - at most `max_connections` open at once, and at most `max_connections_per_peer`
//!   from one peer IP address; over either cap a new connection is closed at once,
//!   so the ones already open keep working and one host cannot lock out the rest;
//! - a handshake deadline: within [`HANDSHAKE_TIMEOUT`] of accept, a new connection
//!   must finish its TLS handshake (when `[tls]` is on) and deliver
//!   [`HANDSHAKE_BYTES`] (the HTTP/2 client preface and a frame header), or it is
//!   closed. The deadline is counted from accept, not reset by each byte, so a
//!   trickle cannot defeat it. From then on HTTP/2 keepalive pings find peers that
//!   went away.
//!
//! The TLS handshake runs here rather than in tonic so that the bytes counted are
//! the decrypted ones: the ClientHello alone is larger than the threshold, and
//! before the HTTP/2 preface has arrived hyper sends no keepalive pings, so a
//! client that stopped after the TLS handshake would otherwise hold its slot forever.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    task::JoinSet,
    time::{Instant, Sleep},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a new connection has, from accept, to finish its TLS handshake (if any)
/// and send [`HANDSHAKE_BYTES`].
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The HTTP/2 client preface (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of an HTTP/2 frame header (RFC 9113 §4.1).
const FRAME_HEADER_BYTES: usize = 9;
/// What a new connection must deliver within [`HANDSHAKE_TIMEOUT`]: the client
/// preface and the header of its first frame. Until then hyper's HTTP/2 handshake
/// is still waiting and no keepalive ping would ever find a stalled client.
pub const HANDSHAKE_BYTES: usize = HTTP2_PREFACE.len() + FRAME_HEADER_BYTES;

/// Caps and deadline for the listener's connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_peer: usize,
    pub handshake_timeout: Duration,
}

/// The transport under a [`GuardedStream`].
enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(tcp) => tcp,
            Io::Tls(tls) => tls.get_ref().0,
        }
    }
}

macro_rules! delegate {
    ($io:expr, $s:ident => $call:expr) => {
        match $io {
            Io::Plain($s) => $call,
            Io::Tls($s) => $call,
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self.get_mut(), s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self.get_mut(), s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self.get_mut(), s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self.get_mut(), s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self.get_mut(), s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        delegate!(self, s => s.is_write_vectored())
    }
}

/// The part of the handshake deadline still running.
struct Handshake {
    deadline: Pin<Box<Sleep>>,
    /// Bytes still to come before the deadline is dropped.
    remaining: usize,
}

/// A connection that holds its slots (the global one and its peer's) until it is
/// dropped, and fails its reads once the handshake deadline passes before
/// [`HANDSHAKE_BYTES`] have been read.
pub struct GuardedStream {
    io: Io,
    handshake: Option<Handshake>,
    _slot: OwnedSemaphorePermit,
    _peer_slot: PeerSlot,
}

fn handshake_timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the client did not send the HTTP/2 preface within the handshake timeout",
    )
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let Some(handshake) = this.handshake.as_mut() else {
            return polled;
        };
        match polled {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                handshake.remaining = handshake.remaining.saturating_sub(read);
                if handshake.remaining == 0 {
                    this.handshake = None;
                } else if read > 0 && handshake.deadline.is_elapsed() {
                    // A client that keeps a byte ready for every read never makes
                    // us wait, so the deadline is also checked here.
                    return Poll::Ready(Err(handshake_timed_out()));
                }
                Poll::Ready(Ok(()))
            }
            // Registers the deadline's wake-up alongside the socket's.
            Poll::Pending if handshake.deadline.as_mut().poll(cx).is_ready() => {
                Poll::Ready(Err(handshake_timed_out()))
            }
            other => other,
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl Connected for GuardedStream {
    // The TCP addresses also for TLS connections: nothing here asks for the
    // client's certificate after the handshake has checked it.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.tcp().connect_info()
    }
}

/// Open connections per peer IP address, shared with the [`PeerSlot`]s that
/// release them.
#[derive(Clone, Default)]
struct PeerSlots(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl PeerSlots {
    fn try_acquire(&self, ip: IpAddr, limit: usize) -> Option<PeerSlot> {
        let mut open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            slots: self.clone(),
            ip,
        })
    }

    #[cfg(test)]
    fn open(&self, ip: IpAddr) -> usize {
        let open = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&ip).copied().unwrap_or(0)
    }
}

/// One connection's place in its peer's count; given back on drop, and the peer
/// forgotten when it has none left (the map only holds peers with open connections).
struct PeerSlot {
    slots: PeerSlots,
    ip: IpAddr,
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self.slots.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Refusals come as fast as a client can connect: at most one log line a second
/// per kind, each saying how many were refused without one since the last.
#[derive(Default)]
struct RefusalLog {
    quiet_until: Option<Instant>,
    unlogged: u64,
}

impl RefusalLog {
    /// Some(refusals not logged since the last line) when this one is to be logged.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        if self.quiet_until.is_some_and(|until| now < until) {
            self.unlogged += 1;
            return None;
        }
        self.quiet_until = Some(now + Duration::from_secs(1));
        Some(std::mem::take(&mut self.unlogged))
    }
}

struct Acceptor {
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    slots: Arc<Semaphore>,
    peers: PeerSlots,
    /// TLS handshakes in progress; run as tasks so a slow one holds up nobody.
    /// Dropped with the stream (at shutdown), which aborts them.
    handshakes: JoinSet<Option<GuardedStream>>,
    refused_total: RefusalLog,
    refused_peer: RefusalLog,
}

impl Acceptor {
    async fn next(&mut self) -> GuardedStream {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if let Some(guarded) = self.admit(stream, peer) {
                            return guarded;
                        }
                    }
                    // Per-connection errors (reset before accept, out of
                    // descriptors): keep accepting rather than end the server.
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(guarded)) = done {
                        return guarded;
                    }
                }
            }
        }
    }

    /// Takes the connection's slots, or closes it when a cap is reached. A
    /// plaintext connection is returned at once; a TLS one once its handshake is done.
    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) -> Option<GuardedStream> {
        let Limits {
            max_connections,
            max_connections_per_peer,
            handshake_timeout,
        } = self.limits;
        // IPv4 clients of a dual-stack listener arrive as ::ffff:a.b.c.d.
        let ip = peer.ip().to_canonical();
        // The peer's cap first, so that one host's flood is logged as such.
        let Some(peer_slot) = self.peers.try_acquire(ip, max_connections_per_peer) else {
            if let Some(unlogged) = self.refused_peer.admit(Instant::now()) {
                tracing::warn!(
                    %peer,
                    max_connections_per_peer,
                    refused_unlogged_before = unlogged,
                    "connection refused: too many open connections from this peer"
                );
            }
            return None;
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            if let Some(unlogged) = self.refused_total.admit(Instant::now()) {
                tracing::warn!(
                    %peer,
                    max_connections,
                    refused_unlogged_before = unlogged,
                    "connection refused: too many open connections"
                );
            }
            return None;
        };
        let _ = stream.set_nodelay(true);
        let deadline = Instant::now() + handshake_timeout;
        let guard = move |io| GuardedStream {
            io,
            handshake: Some(Handshake {
                deadline: Box::pin(tokio::time::sleep_until(deadline)),
                remaining: HANDSHAKE_BYTES,
            }),
            _slot: slot,
            _peer_slot: peer_slot,
        };
        let Some(tls) = self.tls.clone() else {
            return Some(guard(Io::Plain(stream)));
        };
        self.handshakes.spawn(async move {
            match tokio::time::timeout_at(deadline, tls.accept(stream)).await {
                Ok(Ok(tls)) => Some(guard(Io::Tls(Box::new(tls)))),
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    None
                }
            }
        });
        None
    }
}

/// The listener's connections, within `limits`, over TLS when `tls` is given.
pub fn guarded_incoming(
    listener: TcpListener,
    limits: Limits,
    tls: Option<TlsAcceptor>,
) -> impl Stream<Item = io::Result<GuardedStream>> + Send + 'static {
    let acceptor = Acceptor {
        listener,
        tls,
        limits,
        slots: Arc::new(Semaphore::new(limits.max_connections)),
        peers: PeerSlots::default(),
        handshakes: JoinSet::new(),
        refused_total: RefusalLog::default(),
        refused_peer: RefusalLog::default(),
    };
    futures::stream::unfold(acceptor, |mut acceptor| async move {
        let guarded = acceptor.next().await;
        Some((Ok(guarded), acceptor))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_is_the_preface_and_a_frame_header() {
        assert_eq!(HANDSHAKE_BYTES, 24 + 9);
    }

    #[test]
    fn peer_slots_are_counted_per_address_and_given_back_on_drop() {
        let slots = PeerSlots::default();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let held: Vec<_> = (0..2).map(|_| slots.try_acquire(a, 2).unwrap()).collect();
        assert!(slots.try_acquire(a, 2).is_none(), "over the cap");
        let other = slots.try_acquire(b, 2).expect("another peer is unaffected");
        assert_eq!(slots.open(a), 2);
        drop(held);
        assert_eq!(slots.open(a), 0);
        assert!(
            !slots.0.lock().unwrap().contains_key(&a),
            "forgotten when idle"
        );
        assert!(slots.try_acquire(a, 2).is_some());
        drop(other);
        assert!(slots.0.lock().unwrap().is_empty());
    }

    #[test]
    fn refusal_log_admits_one_line_a_second_and_counts_the_rest() {
        let mut log = RefusalLog::default();
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        assert_eq!(log.admit(at(0)), Some(0));
        assert_eq!(log.admit(at(10)), None);
        assert_eq!(log.admit(at(999)), None);
        assert_eq!(log.admit(at(1000)), Some(2));
        assert_eq!(log.admit(at(1500)), None);
        assert_eq!(log.admit(at(5000)), Some(1));
    }

    /// A guarded plaintext connection over a real socket pair, with `timeout`.
    async fn guarded_pair(timeout: Duration) -> (GuardedStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let slot = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        let peer_slot = PeerSlots::default()
            .try_acquire("127.0.0.1".parse().unwrap(), 1)
            .unwrap();
        let guarded = GuardedStream {
            io: Io::Plain(server),
            handshake: Some(Handshake {
                deadline: Box::pin(tokio::time::sleep(timeout)),
                remaining: HANDSHAKE_BYTES,
            }),
            _slot: slot,
            _peer_slot: peer_slot,
        };
        (guarded, client)
    }

    #[tokio::test]
    async fn a_trickle_does_not_reset_the_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut server, mut client) = guarded_pair(Duration::from_millis(400)).await;
        let trickle = tokio::spawn(async move {
            for &byte in HTTP2_PREFACE {
                if client.write_all(&[byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            client
        });
        let mut buf = [0u8; 64];
        let mut read = 0;
        let err = loop {
            match server.read(&mut buf).await {
                Ok(0) => panic!("unexpected EOF"),
                Ok(n) => read += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(read < HANDSHAKE_BYTES, "{read} bytes");
        drop(server);
        trickle.await.unwrap();
    }

    #[tokio::test]
    async fn the_deadline_is_dropped_once_the_preface_and_a_frame_header_are_in() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut server, mut client) = guarded_pair(Duration::from_millis(200)).await;
        let mut hello = HTTP2_PREFACE.to_vec();
        hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]); // empty SETTINGS
        client.write_all(&hello).await.unwrap();
        let mut buf = vec![0u8; hello.len()];
        server.read_exact(&mut buf).await.unwrap();
        assert!(server.handshake.is_none());
        // Idle well past the deadline: the stream still works.
        tokio::time::sleep(Duration::from_millis(400)).await;
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        server.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"x");
    }
}
