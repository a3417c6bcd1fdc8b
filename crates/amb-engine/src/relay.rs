//! The copy loops between a socket (TCP, or Unix for a local upstream) and a tunnel stream,
//! written once for both transports and both kinds of socket; and the same over any byte
//! stream ([`relay_io`]), for upstreams that are not a bare socket.
//!
//! - Half-close travels both ways: the socket's FIN finishes the stream, the stream's end
//!   shuts the socket's write side.
//! - Backpressure: one chunk in flight per direction; the transport's `send` waits for
//!   flow-control credit and the socket write waits for the kernel.
//! - Any failure resets both sides: the stream with a reset code, a TCP socket with an RST, so
//!   data loss is never disguised as a clean end, except to a Unix-socket upstream, which has
//!   no RST and sees a close.
//! - A connection that carries small messages holds no read buffer: it reads into a scratch
//!   buffer of its thread and copies each read out. It gets a buffer of its own (growing to
//!   256 KiB) after a read of 4 KiB or more, and keeps it (`ReadBuffer`). The other direction
//!   keeps the batch vector's capacity, at most 32 chunk handles (1 KiB).

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::Shutdown;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};

use amb_proto::{ResetCode, StreamError, StreamRecv, StreamSend};
use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};

/// A connected stream socket the relay carries: a TCP connection, or a Unix socket to an
/// upstream on the same host. The methods are tokio's own, named as there.
pub trait Socket: AsFd + Send + Sync {
    /// Waits until the socket may be read.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Waits until the socket may be written.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// One non-blocking read into `buf`'s spare capacity.
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize>;
    /// One non-blocking vectored write.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Runs `f`, clearing `interest`'s readiness if it returns `WouldBlock`.
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
    /// Makes the socket's close an abort: a TCP RST. A Unix socket has none: its peer sees a
    /// plain end, or a reset if amb leaves data of the peer's unread.
    fn abort_on_close(&self);
}

/// Implements [`Socket`] for one of tokio's stream sockets by calling its own methods, and
/// `$abort` to make its close an abort.
macro_rules! socket_of_tokio {
    ($type:ty, $abort:expr) => {
        impl Socket for $type {
            fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$type>::readable(self)
            }
            fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$type>::writable(self)
            }
            fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
                <$type>::try_read_buf(self, buf)
            }
            fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                <$type>::try_write_vectored(self, bufs)
            }
            fn try_io<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                <$type>::try_io(self, interest, f)
            }
            fn abort_on_close(&self) {
                ($abort)(self)
            }
        }
    };
}

socket_of_tokio!(TcpStream, abort_tcp_on_close);
socket_of_tokio!(UnixStream, |_: &UnixStream| ());

/// First read buffer size; it doubles while reads fill it.
const MIN_BUFFER: usize = 16 << 10;
/// Largest read buffer.
const MAX_BUFFER: usize = 256 << 10;

/// Most tunnel chunks written to a socket in one vectored write (QUIC hands over one chunk per
/// packet; one syscall per packet was most of the receive side's cost).
const MAX_WRITE_BATCH: usize = 32;

/// Writes every chunk of `batch` to `socket` with as few `writev` calls as the kernel allows.
async fn write_all_vectored(socket: &impl Socket, batch: &mut [Bytes]) -> io::Result<()> {
    let mut first = 0;
    loop {
        // Empty chunks (an end-of-stream frame carries none) never cost a syscall.
        while batch.get(first).is_some_and(Bytes::is_empty) {
            first += 1;
        }
        if first == batch.len() {
            return Ok(());
        }
        socket.writable().await?;
        let mut written = match write_vectored_now(socket, &batch[first..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        while written > 0 {
            let chunk = &mut batch[first];
            if written >= chunk.len() {
                written -= chunk.len();
                first += 1;
            } else {
                chunk.advance(written);
                written = 0;
            }
        }
    }
}

/// One non-blocking `writev` of up to [`MAX_WRITE_BATCH`] chunks. Synchronous, so the slice
/// array never becomes part of a connection's future.
fn write_vectored_now(socket: &impl Socket, chunks: &[Bytes]) -> io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); MAX_WRITE_BATCH];
    let count = chunks.len().min(MAX_WRITE_BATCH);
    for (slice, chunk) in slices.iter_mut().zip(chunks) {
        *slice = IoSlice::new(chunk);
    }
    socket.try_write_vectored(&slices[..count])
}

/// Whether a short read proves the socket drained, so its readiness may be cleared without an
/// `EAGAIN`: with epoll and kqueue, as tokio assumes; not on Windows, where mio re-arms
/// readiness only after a read would block.
const SHORT_READ_DRAINS: bool = cfg!(any(
    target_os = "linux",
    target_os = "android",
    target_vendor = "apple",
    target_os = "freebsd",
    target_os = "netbsd",
    target_os = "openbsd",
    target_os = "dragonfly"
));

/// One non-blocking read into `buf`'s spare capacity. A read that leaves capacity unused
/// emptied the socket's receive queue, so it also clears the socket's read readiness (as
/// tokio's own `poll_read` does): the next read waits for the kernel's next event instead of
/// spending a syscall to learn `EAGAIN`, one syscall saved per request on request/response
/// traffic. The readiness is cleared only if no event arrived since it was observed before
/// the read, so data that lands meanwhile is never missed. A Linux Unix stream socket reads
/// across queued buffers as TCP does; only passed descriptors (`SCM_RIGHTS`, which an upstream
/// has no reason to send amb) would end a read early.
fn read_buf_now(socket: &impl Socket, buf: &mut BytesMut) -> io::Result<usize> {
    if !SHORT_READ_DRAINS {
        return socket.try_read_buf(buf);
    }
    let mut drained = None;
    let read = socket.try_io(Interest::READABLE, || {
        let spare = buf.capacity() - buf.len();
        let n = socket.try_read_buf(buf)?;
        if n > 0 && n < spare {
            drained = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match drained {
        Some(n) => Ok(n),
        None => read,
    }
}

/// How a relayed connection failed. Either way both sides were reset.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The socket side (the app's or the upstream's) failed, e.g. it reset the connection.
    #[error("app or upstream side: {0}")]
    Socket(#[source] io::Error),
    /// The tunnel stream failed: reset by the peer, refused, or the tunnel was lost.
    #[error("{0}")]
    Tunnel(#[from] StreamError),
}

/// Bytes carried each way by a relay, however it ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// From the socket into the tunnel.
    pub to_tunnel: u64,
    /// From the tunnel to the socket.
    pub from_tunnel: u64,
}

/// What a relay did: the bytes it carried, and how it ended.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes carried each way, up to the end or the failure.
    pub bytes: RelayStats,
    /// `Err` if it failed (both sides were reset).
    pub result: Result<(), RelayError>,
}

/// Relays until both directions end cleanly, or resets both sides at the first failure.
///
/// A relay dropped before both directions ended (its task cut off from outside) resets both
/// sides too, rather than letting them end as if the data were complete.
pub async fn relay<T: Socket, S: StreamSend, R: StreamRecv>(
    socket: T,
    send: S,
    recv: R,
) -> Relayed {
    match relay_keeping(socket, send, recv, None, |_| false).await {
        Ok(relayed) | Err(Unanswered { relayed, .. }) => relayed,
    }
}

/// The most app bytes a client keeps while a stream is unanswered; a first flight larger
/// than this is not kept, and its app connection is not carried again.
pub const MAX_FIRST_FLIGHT: usize = 64 << 10;

/// A client stream's first flight: the app's bytes (and its end, if it came) sent before the
/// server answered, kept so that the app connection can be carried again on another tunnel
/// connection if this one is lost before answering.
#[derive(Debug, Default)]
pub struct FirstFlight {
    chunks: Vec<Bytes>,
    size: usize,
    /// The app's end (its FIN) was sent too.
    ended: bool,
    /// More than [`MAX_FIRST_FLIGHT`] went out unanswered: nothing is kept.
    overflowed: bool,
}

impl FirstFlight {
    fn keep(&mut self, chunk: &Bytes) {
        self.size += chunk.len();
        if self.size > MAX_FIRST_FLIGHT {
            self.overflowed = true;
            self.chunks = Vec::new();
        } else if !self.overflowed {
            self.chunks.push(chunk.clone());
        }
    }

    /// Sends what was kept on a new stream, the app's end too if it came.
    pub async fn resend<S: StreamSend>(&self, send: &mut S) -> Result<(), StreamError> {
        for chunk in &self.chunks {
            send.send(chunk.clone()).await?;
        }
        if self.ended {
            send.finish().await?;
        }
        Ok(())
    }

    /// The bytes kept.
    pub fn len(&self) -> usize {
        self.size
    }

    /// Whether nothing was kept.
    pub fn is_empty(&self) -> bool {
        self.size == 0 && !self.ended
    }
}

/// A relay whose tunnel connection was lost before the server answered the stream, handed
/// back with the app's socket untouched (not reset) and what it sent, to be carried again.
pub struct Unanswered<T> {
    /// The app's socket.
    pub socket: T,
    /// The app's bytes sent so far, to send again.
    pub flight: Box<FirstFlight>,
    /// What the relay carried, and the loss.
    pub relayed: Relayed,
}

/// [`relay`] for a client's stream that may be carried again: with `first` (what an earlier,
/// unanswered stream of this app connection sent, already sent again on this one), the app's
/// bytes are kept until the server answers; if the tunnel connection is then lost with the
/// stream unanswered, nothing came back from it, the first flight fits [`MAX_FIRST_FLIGHT`]
/// and `may_retry` agrees, the socket is handed back untouched instead of reset.
pub async fn relay_keeping<T: Socket, S: StreamSend, R: StreamRecv>(
    socket: T,
    send: S,
    recv: R,
    first: Option<Box<FirstFlight>>,
    may_retry: impl FnOnce(&RelayError) -> bool,
) -> Result<Relayed, Unanswered<T>> {
    let socket = ResetOnDrop {
        socket: Some(socket),
        clean: false,
    };
    let mut tunnel = TunnelHalves {
        send,
        recv,
        running: true,
    };
    let app_ended = first.as_ref().is_some_and(|f| f.ended);
    let socket_ended = AtomicBool::new(app_ended);
    let flight = Flight {
        keeping: AtomicBool::new(first.is_some()),
        kept: std::sync::Mutex::new(first),
    };
    let mut bytes = RelayStats::default();
    let outcome = {
        let Some(io) = socket.socket.as_ref() else {
            unreachable!("the socket is taken only below")
        };
        tokio::try_join!(
            socket_to_tunnel(
                io,
                &mut tunnel.send,
                (&socket_ended, &flight),
                &mut bytes.to_tunnel
            ),
            tunnel_to_socket(
                io,
                &mut tunnel.recv,
                (&socket_ended, &flight),
                &mut bytes.from_tunnel
            )
        )
    };
    tunnel.running = false;
    let unanswered = match (&outcome, flight.kept.into_inner()) {
        (Err(e @ RelayError::Tunnel(StreamError::ConnectionLost(_))), Ok(Some(flight)))
            if !flight.overflowed && bytes.from_tunnel == 0 && may_retry(e) =>
        {
            Some(flight)
        }
        _ => None,
    };
    let kept = match unanswered {
        Some(_) => socket.keep(),
        None => {
            // Both directions done: the close sends the socket's FIN (if the stream's end did
            // not already), without waiting for the tunnel peer's acknowledgement. On a
            // failure, an RST.
            socket.close(outcome.is_ok());
            None
        }
    };
    let result = settle(outcome, &mut tunnel.send, &mut tunnel.recv).await;
    let relayed = Relayed { bytes, result };
    match (kept, unanswered) {
        (Some(socket), Some(flight)) => Err(Unanswered {
            socket,
            flight,
            relayed,
        }),
        _ => Ok(relayed),
    }
}

/// A socket that is reset, not closed, if dropped before [`close`](Self::close) says it ended
/// cleanly (or [`keep`](Self::keep) takes it back).
struct ResetOnDrop<T: Socket> {
    socket: Option<T>,
    clean: bool,
}

impl<T: Socket> ResetOnDrop<T> {
    fn close(mut self, clean: bool) {
        self.clean = clean;
    }

    /// The socket, untouched, to be carried again.
    fn keep(mut self) -> Option<T> {
        self.socket.take()
    }
}

impl<T: Socket> Drop for ResetOnDrop<T> {
    fn drop(&mut self) {
        if let Some(socket) = self.socket.as_ref().filter(|_| !self.clean) {
            socket.abort_on_close();
        }
    }
}

/// A tunnel stream's halves, reset if dropped while the relay still runs.
struct TunnelHalves<S: StreamSend, R: StreamRecv> {
    send: S,
    recv: R,
    running: bool,
}

impl<S: StreamSend, R: StreamRecv> Drop for TunnelHalves<S, R> {
    fn drop(&mut self) {
        if self.running {
            self.send.reset(ResetCode::CANCEL);
            self.recv.stop(ResetCode::CANCEL);
        }
    }
}

/// After both directions: waits for the tunnel peer to have everything sent, or on a failure
/// resets both halves of the tunnel stream.
async fn settle<S: StreamSend, R: StreamRecv>(
    outcome: Result<((), ()), RelayError>,
    send: &mut S,
    recv: &mut R,
) -> Result<(), RelayError> {
    match outcome {
        Ok(((), ())) => {
            send.delivered().await;
            Ok(())
        }
        Err(e) => {
            let code = match &e {
                RelayError::Socket(_) => ResetCode::CANCEL,
                RelayError::Tunnel(_) => ResetCode::CONNECT_ERROR,
            };
            send.reset(code);
            recv.stop(code);
            Err(e)
        }
    }
}

/// Relays over any byte stream (`AsyncRead + AsyncWrite`: a TLS connection to the upstream,
/// say) as [`relay`] does over a socket: half-close both ways, one chunk in flight per
/// direction, both sides aborted at the first failure (the stream is dropped unflushed: a
/// stream has no RST of its own). Sockets keep [`relay`], whose non-blocking reads and
/// vectored writes measured faster.
pub async fn relay_io<IO, S, R>(io: IO, send: S, recv: R) -> Relayed
where
    IO: AsyncRead + AsyncWrite + Send,
    S: StreamSend,
    R: StreamRecv,
{
    let mut tunnel = TunnelHalves {
        send,
        recv,
        running: true,
    };
    let (reader, writer) = tokio::io::split(io);
    let mut bytes = RelayStats::default();
    let outcome = tokio::try_join!(
        io_to_tunnel(reader, &mut tunnel.send, &mut bytes.to_tunnel),
        tunnel_to_io(writer, &mut tunnel.recv, &mut bytes.from_tunnel)
    );
    tunnel.running = false;
    let result = settle(outcome, &mut tunnel.send, &mut tunnel.recv).await;
    Relayed { bytes, result }
}

/// Copies a byte stream into the tunnel stream, reading into a buffer that grows toward
/// [`MAX_BUFFER`] while reads fill it; its end finishes the tunnel stream.
async fn io_to_tunnel<S: StreamSend>(
    mut reader: impl AsyncRead + Unpin,
    send: &mut S,
    total: &mut u64,
) -> Result<(), RelayError> {
    let mut size = MIN_BUFFER;
    let mut buf = BytesMut::new();
    loop {
        make_room(&mut buf, size);
        let n = reader
            .read_buf(&mut buf)
            .await
            .map_err(RelayError::Socket)?;
        if n == 0 {
            send.finish().await?;
            return Ok(());
        }
        *total += n as u64;
        if n >= size && size < MAX_BUFFER {
            size *= 2;
        }
        send.send(take_chunk(&mut buf, size)).await?;
    }
}

/// Copies the tunnel stream into a byte stream; the stream's clean end shuts its write side.
async fn tunnel_to_io<R: StreamRecv>(
    mut writer: impl AsyncWrite + Unpin,
    recv: &mut R,
    total: &mut u64,
) -> Result<(), RelayError> {
    let mut batch = Vec::with_capacity(MAX_WRITE_BATCH);
    while recv.recv_batch(&mut batch, MAX_WRITE_BATCH).await? {
        for chunk in batch.drain(..) {
            *total += chunk.len() as u64;
            writer.write_all(&chunk).await.map_err(RelayError::Socket)?;
        }
        writer.flush().await.map_err(RelayError::Socket)?;
    }
    writer.shutdown().await.map_err(RelayError::Socket)?;
    Ok(())
}

/// Closes a socket with a TCP RST instead of a FIN, so the other end sees an abort.
pub fn reset_tcp(tcp: TcpStream) {
    abort_tcp_on_close(&tcp);
}

/// Makes the socket's close send a TCP RST instead of a FIN.
fn abort_tcp_on_close(tcp: &TcpStream) {
    let _ = tcp.set_zero_linger();
}

/// Copies the socket into the stream; sets `socket_ended` once the socket's FIN has finished
/// the stream.
/// A first flight while it is kept: until the server answers, and only for a stream that may
/// be carried again.
struct Flight {
    /// Read on every chunk, so that an answered stream takes no lock.
    keeping: AtomicBool,
    kept: std::sync::Mutex<Option<Box<FirstFlight>>>,
}

impl Flight {
    /// Keeps `chunk` (or, with `None`, the app's end) while the stream is unanswered.
    fn keep(&self, chunk: Option<&Bytes>) {
        if !self.keeping.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(mut kept) = self.kept.lock() {
            if let Some(flight) = kept.as_mut() {
                match chunk {
                    Some(chunk) => flight.keep(chunk),
                    None => flight.ended = true,
                }
                // Too much to send again: nothing more is kept (and the stream is not).
                if flight.overflowed {
                    self.keeping.store(false, Ordering::Relaxed);
                }
            }
        }
    }

    /// The server answered: nothing more is kept, and what was is let go.
    fn answered(&self) {
        if self.keeping.load(Ordering::Relaxed) && self.keeping.swap(false, Ordering::Relaxed) {
            if let Ok(mut kept) = self.kept.lock() {
                *kept = None;
            }
        }
    }
}

/// What both directions of a relay share: whether the socket's read side ended, and the first
/// flight.
type Shared<'a> = (&'a AtomicBool, &'a Flight);

async fn socket_to_tunnel<S: StreamSend>(
    socket: &impl Socket,
    send: &mut S,
    (socket_ended, flight): Shared<'_>,
    total: &mut u64,
) -> Result<(), RelayError> {
    if socket_ended.load(Ordering::Relaxed) {
        // The app's end was passed on already (on an earlier stream, sent again on this one).
        return Ok(());
    }
    let mut reads = ReadBuffer::default();
    loop {
        socket.readable().await.map_err(RelayError::Socket)?;
        match reads.read(socket) {
            Ok((0, _)) => {
                flight.keep(None);
                send.finish().await?;
                socket_ended.store(true, Ordering::Relaxed);
                return Ok(());
            }
            Ok((n, chunk)) => {
                *total += n as u64;
                flight.keep(Some(&chunk));
                send.send(chunk).await?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(RelayError::Socket(e)),
        }
    }
}

/// What the relay reads a socket into. While reads are small, the thread's scratch buffer, each
/// read copied out (as [`take_chunk`] copies small reads anyway), so an idle connection holds
/// no buffer. From a read of a quarter buffer (4 KiB) on, the connection's own buffer, doubling
/// up to [`MAX_BUFFER`] while reads fill it, large reads handed over without a copy; kept from
/// then on (giving it back after 16 short reads in a row lowered the bulk medians by 2–5% in
/// A/B rounds, for a saving no benchmark here shows).
#[derive(Debug)]
struct ReadBuffer {
    own: Option<BytesMut>,
    size: usize,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        ReadBuffer {
            own: None,
            size: MIN_BUFFER,
        }
    }
}

impl ReadBuffer {
    /// One non-blocking read, as a chunk for the tunnel; `Ok((0, _))` at the socket's end.
    fn read(&mut self, socket: &impl Socket) -> io::Result<(usize, Bytes)> {
        let (n, chunk) = match &mut self.own {
            Some(buf) => {
                make_room(buf, self.size);
                let n = read_buf_now(socket, buf)?;
                (n, take_chunk(buf, self.size))
            }
            None => read_into_scratch(socket)?,
        };
        self.note(n);
        Ok((n, chunk))
    }

    /// Sizes the next read after one of `n` bytes.
    fn note(&mut self, n: usize) {
        if n >= self.size / 4 {
            self.own.get_or_insert_with(BytesMut::new);
        }
        if n >= self.size && self.size < MAX_BUFFER {
            self.size *= 2;
        }
    }

    /// Whether the connection holds a read buffer of its own.
    #[cfg(test)]
    fn holds_buffer(&self) -> bool {
        self.own.is_some()
    }
}

thread_local! {
    /// Where connections carrying small messages read (see [`ReadBuffer`]).
    static SCRATCH: RefCell<BytesMut> = RefCell::new(BytesMut::with_capacity(MIN_BUFFER));
}

/// One non-blocking read of up to [`MIN_BUFFER`] bytes into the thread's scratch buffer,
/// returned as its own chunk.
fn read_into_scratch(socket: &impl Socket) -> io::Result<(usize, Bytes)> {
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        make_room(scratch, MIN_BUFFER);
        let n = read_buf_now(socket, scratch)?;
        Ok((n, Bytes::copy_from_slice(&scratch[..n])))
    })
}

/// Makes room for a read of up to `size` bytes.
fn make_room(buf: &mut BytesMut, size: usize) {
    if buf.capacity() < size {
        buf.reserve(size);
    }
}

/// Takes what the last read put in `buf` as one chunk for the tunnel. A chunk split off the
/// buffer shares its allocation for as long as the chunk lives, and quinn keeps each chunk
/// until the peer acknowledges it: small chunks would each pin a whole read buffer (up to
/// [`MAX_BUFFER`]) for a round trip. So a read that filled less than a quarter of the buffer is
/// copied out, and the buffer stays free for the next read.
fn take_chunk(buf: &mut BytesMut, size: usize) -> Bytes {
    if buf.len() < size / 4 {
        let chunk = Bytes::copy_from_slice(buf);
        buf.clear();
        chunk
    } else {
        buf.split().freeze()
    }
}

/// Copies the stream into the socket; at the stream's end, shuts the socket's write side unless
/// the socket already ended its own (then the caller's close sends the FIN, one syscall
/// instead of two: the usual order for a client that closes after its last reply).
async fn tunnel_to_socket<R: StreamRecv>(
    socket: &impl Socket,
    recv: &mut R,
    (socket_ended, flight): Shared<'_>,
    total: &mut u64,
) -> Result<(), RelayError> {
    // Reused for every batch; emptied after each write so no received buffer stays pinned
    // while the connection idles (what stays is its capacity: at most 32 handles, 1 KiB).
    let mut batch = Vec::new();
    loop {
        let received = recv.recv_batch(&mut batch, MAX_WRITE_BATCH).await;
        // Anything but a lost connection is the server's answer (a refusal too): what the app
        // sent is no longer kept.
        if !matches!(received, Err(StreamError::ConnectionLost(_))) {
            flight.answered();
        }
        if !received? {
            break;
        }
        *total += batch.iter().map(|c| c.len() as u64).sum::<u64>();
        write_all_vectored(socket, &mut batch)
            .await
            .map_err(RelayError::Socket)?;
        batch.clear();
    }
    if socket_ended.load(Ordering::Relaxed) {
        return Ok(());
    }
    match socket2::SockRef::from(socket).shutdown(Shutdown::Write) {
        // The socket may already be gone; its own error will surface on the other direction.
        Ok(()) | Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_read_leaves_the_buffer_free_while_its_chunk_lives() {
        let mut buf = BytesMut::new();
        make_room(&mut buf, MAX_BUFFER);
        let buffer = buf.as_ptr();
        buf.extend_from_slice(b"PING\r\n");
        // The chunk stays alive, as in quinn until the peer acknowledges it.
        let chunk = take_chunk(&mut buf, MAX_BUFFER);
        assert_eq!(&chunk[..], b"PING\r\n");
        make_room(&mut buf, MAX_BUFFER);
        assert_eq!(buf.as_ptr(), buffer, "the next read needed a new buffer");
        assert!(buf.is_empty());
    }

    #[test]
    fn small_reads_need_no_buffer_of_the_connections_own() {
        let mut reads = ReadBuffer::default();
        for _ in 0..100 {
            reads.note(100);
        }
        assert!(!reads.holds_buffer());
        reads.note(MIN_BUFFER / 4);
        assert!(reads.holds_buffer());
        assert_eq!(reads.size, MIN_BUFFER);
        reads.note(MIN_BUFFER);
        assert_eq!(reads.size, 2 * MIN_BUFFER, "a full read doubles the next");
    }

    #[tokio::test]
    async fn reads_carry_exactly_the_bytes_sent_in_either_mode() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut writer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (reader, _) = listener.accept().await.unwrap();
        let mut reads = ReadBuffer::default();
        let mut receive = async |len: usize| {
            let mut got = Vec::new();
            while got.len() < len {
                reader.readable().await.unwrap();
                match reads.read(&reader) {
                    Ok((n, chunk)) => {
                        assert_eq!(chunk.len(), n);
                        got.extend_from_slice(&chunk);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            got
        };
        let small = b"*1\r\n$4\r\nPING\r\n".to_vec();
        writer.write_all(&small).await.unwrap();
        assert_eq!(receive(small.len()).await, small);
        let large: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
        let (sent, got) = tokio::join!(writer.write_all(&large), receive(large.len()));
        sent.unwrap();
        assert_eq!(got, large);
        writer.write_all(&small).await.unwrap();
        assert_eq!(receive(small.len()).await, small);
        assert!(
            reads.holds_buffer(),
            "64 KiB came in reads of 4 KiB or more"
        );
    }

    #[test]
    fn a_large_read_is_handed_over_without_a_copy() {
        let mut buf = BytesMut::new();
        make_room(&mut buf, MIN_BUFFER);
        let buffer = buf.as_ptr();
        buf.extend_from_slice(&[7u8; MIN_BUFFER / 4]);
        let chunk = take_chunk(&mut buf, MIN_BUFFER);
        assert_eq!(chunk.as_ptr(), buffer);
        assert_eq!(chunk.len(), MIN_BUFFER / 4);
        assert!(buf.is_empty());
    }

    /// One direction of a tunnel stream as an in-memory channel; `None` is a clean end.
    struct ChanSend(tokio::sync::mpsc::UnboundedSender<Option<Bytes>>, ResetSeen);
    struct ChanRecv(
        tokio::sync::mpsc::UnboundedReceiver<Option<Bytes>>,
        ResetSeen,
    );
    /// Set once the relay reset (or stopped) the half that holds it.
    type ResetSeen = std::sync::Arc<AtomicBool>;

    impl StreamSend for ChanSend {
        async fn send(&mut self, data: Bytes) -> Result<(), StreamError> {
            self.0
                .send(Some(data))
                .map_err(|_| StreamError::ConnectionLost("gone".into()))
        }
        async fn finish(&mut self) -> Result<(), StreamError> {
            let _ = self.0.send(None);
            Ok(())
        }
        fn reset(&mut self, _code: ResetCode) {
            self.1.store(true, Ordering::Relaxed);
        }
        async fn delivered(&mut self) {}
    }

    impl StreamRecv for ChanRecv {
        async fn recv(&mut self) -> Result<Option<Bytes>, StreamError> {
            match self.0.recv().await {
                Some(chunk) => Ok(chunk),
                None => Err(StreamError::ConnectionLost("gone".into())),
            }
        }
        fn stop(&mut self, _code: ResetCode) {
            self.1.store(true, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn a_byte_stream_is_relayed_exactly_with_half_close_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::sync::mpsc::unbounded_channel;
        let (ours, mut upstream) = tokio::io::duplex(64 << 10);
        let (to_relay, from_tunnel) = unbounded_channel();
        let (to_tunnel, mut tunnel_gets) = unbounded_channel();
        let relayed = tokio::spawn(relay_io(
            ours,
            ChanSend(to_tunnel, ResetSeen::default()),
            ChanRecv(from_tunnel, ResetSeen::default()),
        ));

        let down: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for piece in down.chunks(10_000) {
            to_relay.send(Some(Bytes::copy_from_slice(piece))).unwrap();
        }
        to_relay.send(None).unwrap();
        let up: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let upstream_side = async {
            // Reads to the end first: the tunnel's half-close must arrive on its own.
            let mut got = Vec::new();
            upstream.read_to_end(&mut got).await.unwrap();
            upstream.write_all(&up).await.unwrap();
            upstream.shutdown().await.unwrap();
            got
        };
        let tunnel_side = async {
            let mut got = Vec::new();
            while let Some(Some(chunk)) = tunnel_gets.recv().await {
                got.extend_from_slice(&chunk);
            }
            got
        };
        let (upstream_got, tunnel_got) = tokio::join!(upstream_side, tunnel_side);
        assert_eq!(
            upstream_got, down,
            "the tunnel's end reached the upstream as EOF"
        );
        assert_eq!(
            tunnel_got, up,
            "the upstream's end finished the tunnel stream"
        );
        let relayed = relayed.await.unwrap();
        relayed.result.unwrap();
        assert_eq!(
            (relayed.bytes.to_tunnel, relayed.bytes.from_tunnel),
            (up.len() as u64, down.len() as u64)
        );
    }

    /// A TCP connection: (the relay's end, the app's end).
    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap());
        let (app, accepted) = tokio::join!(app, listener.accept());
        (accepted.unwrap().0, app.unwrap())
    }

    #[tokio::test]
    async fn a_stream_lost_unanswered_hands_back_the_socket_and_its_first_flight() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tokio::sync::mpsc::unbounded_channel;
        let (ours, mut app) = tcp_pair().await;
        let (to_relay, from_tunnel) = unbounded_channel::<Option<Bytes>>();
        let (to_tunnel, mut tunnel_gets) = unbounded_channel();
        app.write_all(b"INCR hits").await.unwrap();
        app.shutdown().await.unwrap();
        let relayed = tokio::spawn(relay_keeping(
            ours,
            ChanSend(to_tunnel, ResetSeen::default()),
            ChanRecv(from_tunnel, ResetSeen::default()),
            Some(Box::default()),
            |_| true,
        ));
        // The tunnel got the app's bytes and end, then is lost before any answer.
        let mut sent = Vec::new();
        while let Some(Some(chunk)) = tunnel_gets.recv().await {
            sent.extend_from_slice(&chunk);
        }
        assert_eq!(sent, b"INCR hits");
        drop(to_relay);
        let Err(Unanswered { socket, flight, .. }) = relayed.await.unwrap() else {
            panic!("a stream lost unanswered was not handed back");
        };
        // Sent again on a new stream: the same bytes and the end.
        let (again, mut again_gets) = unbounded_channel();
        let mut send = ChanSend(again, ResetSeen::default());
        flight.resend(&mut send).await.unwrap();
        assert_eq!(
            again_gets.recv().await,
            Some(Some(Bytes::from_static(b"INCR hits")))
        );
        assert_eq!(again_gets.recv().await, Some(None));
        // The socket was not reset: the answer of a second relay reaches the app.
        let (to_relay, from_tunnel) = unbounded_channel();
        let (to_tunnel, _gets) = unbounded_channel();
        to_relay.send(Some(Bytes::from_static(b":1\r\n"))).unwrap();
        to_relay.send(None).unwrap();
        let second = relay_keeping(
            socket,
            ChanSend(to_tunnel, ResetSeen::default()),
            ChanRecv(from_tunnel, ResetSeen::default()),
            Some(flight),
            |_| true,
        );
        assert!(second.await.is_ok_and(|r| r.result.is_ok()));
        let mut answer = Vec::new();
        app.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b":1\r\n");
    }

    #[tokio::test]
    async fn an_answered_stream_is_never_handed_back() {
        use tokio::io::AsyncWriteExt;
        use tokio::sync::mpsc::unbounded_channel;
        let (ours, mut app) = tcp_pair().await;
        let (to_relay, from_tunnel) = unbounded_channel();
        let (to_tunnel, mut tunnel_gets) = unbounded_channel();
        app.write_all(b"INCR hits").await.unwrap();
        let relayed = tokio::spawn(relay_keeping(
            ours,
            ChanSend(to_tunnel, ResetSeen::default()),
            ChanRecv(from_tunnel, ResetSeen::default()),
            Some(Box::default()),
            |_| true,
        ));
        assert!(tunnel_gets.recv().await.is_some());
        // Answered (an empty chunk stands for the server's status), then lost.
        to_relay.send(Some(Bytes::new())).unwrap();
        tokio::task::yield_now().await;
        drop(to_relay);
        let relayed = relayed.await.unwrap();
        assert!(
            matches!(
                relayed,
                Ok(Relayed {
                    result: Err(RelayError::Tunnel(StreamError::ConnectionLost(_))),
                    ..
                })
            ),
            "an answered stream was handed back"
        );
    }

    #[tokio::test]
    async fn a_lost_tunnel_fails_the_byte_stream_relay() {
        let (ours, _upstream) = tokio::io::duplex(1024);
        let (to_relay, from_tunnel) = tokio::sync::mpsc::unbounded_channel();
        let (to_tunnel, _tunnel_gets) = tokio::sync::mpsc::unbounded_channel();
        drop(to_relay);
        let relayed = relay_io(
            ours,
            ChanSend(to_tunnel, ResetSeen::default()),
            ChanRecv(from_tunnel, ResetSeen::default()),
        )
        .await
        .result;
        assert!(
            matches!(
                relayed,
                Err(RelayError::Tunnel(StreamError::ConnectionLost(_)))
            ),
            "{relayed:?}"
        );
    }

    #[tokio::test]
    async fn a_relay_dropped_midway_resets_both_sides() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut upstream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (ours, _) = listener.accept().await.unwrap();
        let (to_relay, from_tunnel) = tokio::sync::mpsc::unbounded_channel();
        let (to_tunnel, _tunnel_gets) = tokio::sync::mpsc::unbounded_channel();
        let (send_reset, recv_stopped) = (ResetSeen::default(), ResetSeen::default());
        let relayed = tokio::spawn(relay(
            ours,
            ChanSend(to_tunnel, send_reset.clone()),
            ChanRecv(from_tunnel, recv_stopped.clone()),
        ));
        to_relay.send(Some(Bytes::from_static(b"PING"))).unwrap();
        let mut got = [0u8; 4];
        upstream.read_exact(&mut got).await.unwrap();
        relayed.abort();
        assert!(relayed.await.unwrap_err().is_cancelled());
        let mut rest = Vec::new();
        let read = upstream.read_to_end(&mut rest).await;
        assert_eq!(
            read.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "the upstream saw an abort, not a clean end"
        );
        assert!(send_reset.load(Ordering::Relaxed), "the stream was reset");
        assert!(recv_stopped.load(Ordering::Relaxed), "and told to stop");
    }
}
