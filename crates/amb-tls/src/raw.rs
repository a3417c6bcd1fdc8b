//! A standard TLS client straight to the server (`redis-cli --tls`, stunnel in client mode):
//! no ALPN, so no tunnel protocol. Its one TLS connection is one app connection, to the route
//! its SNI names when one exists, else the server's `tls-route`; the same handshake, the same
//! client-certificate verification and allow-lists as a tunnel connection's.

use std::io;
use std::os::fd::AsFd;
use std::sync::Arc;

use amb_proto::{ResetCode, RouteName, StreamError, StreamRecv, StreamSend};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;

/// Which route a standard TLS client's connection goes to.
#[derive(Clone)]
pub struct RawTls {
    /// The route when the SNI names none (`tls-route`).
    pub default: RouteName,
    /// Whether a route of this name exists now.
    pub exists: Arc<dyn Fn(&RouteName) -> bool + Send + Sync>,
}

impl RawTls {
    /// The route for a client that sent `sni`.
    pub(crate) fn route_for(&self, sni: Option<&str>) -> RouteName {
        sni.and_then(|name| name.parse::<RouteName>().ok())
            .filter(|route| (self.exists)(route))
            .unwrap_or_else(|| self.default.clone())
    }
}

/// The largest chunk one read hands on.
const READ_CHUNK: usize = 64 << 10;

/// The connection's socket, duplicated so a reset can make its close a TCP RST after the TLS
/// stream is split.
pub(crate) fn socket_of(tls: &TlsStream<TcpStream>) -> Option<socket2::Socket> {
    let fd = tls.get_ref().0.as_fd().try_clone_to_owned().ok()?;
    Some(socket2::Socket::from(fd))
}

/// Makes the socket's close a TCP RST.
pub(crate) fn abort(socket: &Option<socket2::Socket>) {
    if let Some(socket) = socket {
        let _ = socket.set_linger(Some(std::time::Duration::ZERO));
    }
}

/// Sending half of a standard TLS client's connection.
pub struct RawSend {
    pub(crate) writer: WriteHalf<TlsStream<TcpStream>>,
    pub(crate) socket: Option<socket2::Socket>,
    /// Held while the stream lives: its connection ends when both halves are gone.
    pub(crate) _live: mpsc::Sender<()>,
}

impl StreamSend for RawSend {
    async fn send(&mut self, data: Bytes) -> Result<(), StreamError> {
        self.writer.write_all(&data).await.map_err(lost)?;
        self.writer.flush().await.map_err(lost)
    }

    async fn finish(&mut self) -> Result<(), StreamError> {
        // close_notify, then the TCP FIN.
        self.writer.shutdown().await.map_err(lost)
    }

    fn reset(&mut self, _code: ResetCode) {
        abort(&self.socket);
    }

    async fn delivered(&mut self) {
        // TCP has no acknowledgement to wait for here: the kernel delivers what was written.
    }
}

/// Receiving half of a standard TLS client's connection.
pub struct RawRecv {
    pub(crate) reader: ReadHalf<TlsStream<TcpStream>>,
    pub(crate) buf: BytesMut,
    /// Turns true when the server closes the connection at once (a drain cut short).
    pub(crate) killed: watch::Receiver<bool>,
    pub(crate) _live: mpsc::Sender<()>,
}

impl StreamRecv for RawRecv {
    async fn recv(&mut self) -> Result<Option<Bytes>, StreamError> {
        if self.buf.capacity() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        let read = tokio::select! {
            read = self.reader.read_buf(&mut self.buf) => read,
            _ = self.killed.wait_for(|k| *k) => {
                return Err(StreamError::ConnectionLost("closed by the server".into()));
            }
        };
        match read {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(self.buf.split().freeze())),
            // A client that closes without TLS's close_notify ends its stream as a FIN would
            // (the app's own framing tells a cut-off request, as over plain TCP).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(lost(e)),
        }
    }

    fn stop(&mut self, _code: ResetCode) {}
}

fn lost(e: io::Error) -> StreamError {
    StreamError::ConnectionLost(e.to_string())
}
