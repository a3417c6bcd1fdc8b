//! The connector: turns an upstream endpoint into a connected stream, TCP or a Unix socket,
//! on which TLS, credentials and PROXY headers may follow.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use super::Endpoint;

/// A connected upstream.
#[derive(Debug)]
pub enum UpstreamStream {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
    /// TLS over one of the others.
    Tls(Box<tokio_rustls::client::TlsStream<UpstreamStream>>),
}

impl UpstreamStream {
    /// Drops the connection with a TCP RST where TCP is underneath: a FIN would tell the
    /// service the app finished cleanly.
    pub fn abort(self) {
        if let Some(tcp) = self.tcp() {
            let _ = tcp.set_zero_linger();
        }
    }

    /// A guard that makes this connection's close a TCP RST unless it is told the relay
    /// finished cleanly: for a stream handed away whole (a TLS upstream's relay), which may
    /// fail or be dropped (its stream cut off) with no other way to reset it.
    pub fn reset_unless_finished(&self) -> ResetUnlessFinished {
        use std::os::fd::AsFd;
        let socket = self
            .tcp()
            .and_then(|tcp| tcp.as_fd().try_clone_to_owned().ok())
            .map(socket2::Socket::from);
        ResetUnlessFinished(socket)
    }

    /// The TCP connection underneath, if any.
    fn tcp(&self) -> Option<&TcpStream> {
        match self {
            UpstreamStream::Tcp(tcp) => Some(tcp),
            UpstreamStream::Unix(_) => None,
            UpstreamStream::Tls(tls) => tls.get_ref().0.tcp(),
        }
    }
}

/// See [`UpstreamStream::reset_unless_finished`]; holds a duplicate of the socket's descriptor.
pub struct ResetUnlessFinished(Option<socket2::Socket>);

impl ResetUnlessFinished {
    /// The relay finished cleanly: the connection closes as it would.
    pub fn finished(mut self) {
        self.0 = None;
    }
}

impl Drop for ResetUnlessFinished {
    fn drop(&mut self) {
        if let Some(socket) = &self.0 {
            let _ = socket.set_linger(Some(Duration::ZERO));
        }
    }
}

/// Calls `$call` on whichever stream this is.
macro_rules! each_stream {
    ($self:expr, $stream:ident => $call:expr) => {
        match $self.get_mut() {
            UpstreamStream::Tcp($stream) => $call,
            UpstreamStream::Unix($stream) => $call,
            UpstreamStream::Tls($stream) => $call,
        }
    };
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            // A service that closes without TLS's close_notify (Redis does) ends its stream as
            // a FIN would, as stunnel and HAProxy take it: the service's own framing, not TLS,
            // tells a cut-off reply, as over plain TCP.
            UpstreamStream::Tls(s) => match Pin::new(s).poll_read(cx, buf) {
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    Poll::Ready(Ok(()))
                }
                other => other,
            },
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each_stream!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each_stream!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Tcp(s) => s.is_write_vectored(),
            UpstreamStream::Unix(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_stream!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each_stream!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// How far one dial got, so a timeout can say which step ran out.
#[derive(Debug, Default)]
pub struct DialProgress {
    /// Waiting for the source's endpoints.
    pub waiting_for_source: AtomicBool,
    /// A Unix socket's listen queue was full at the last try.
    pub queue_full: AtomicBool,
}

/// Longest pause between two tries of a Unix socket whose listen queue is full.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(50);

/// Connects to upstream endpoints.
#[derive(Debug, Default)]
pub struct Connector;

impl Connector {
    /// Connects to `endpoint`. The caller bounds the time.
    pub async fn connect(
        &self,
        endpoint: &Endpoint,
        progress: &DialProgress,
    ) -> Result<UpstreamStream, String> {
        match endpoint {
            Endpoint::Tcp(addr) => {
                let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                let _ = tcp.set_nodelay(true);
                Ok(UpstreamStream::Tcp(tcp))
            }
            Endpoint::Unix(path) => connect_unix(path, &progress.queue_full)
                .await
                .map(UpstreamStream::Unix),
        }
    }
}

/// Connects to a Unix socket. Its listen queue being full fails a non-blocking connect at once,
/// where a TCP SYN would be retried, so that is tried again (pausing 1 ms, doubling up to
/// [`QUEUE_FULL_PAUSE`]) until the dial's own timeout.
async fn connect_unix(path: &Path, queue_full: &AtomicBool) -> Result<UnixStream, String> {
    let mut pause = Duration::from_millis(1);
    loop {
        match UnixStream::connect(path).await {
            Ok(unix) => return Ok(unix),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                queue_full.store(true, Ordering::Relaxed);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(QUEUE_FULL_PAUSE);
            }
            Err(e) => {
                return Err(format!(
                    "{e}: is the service listening on that socket, and may amb open it?"
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_tcp_endpoint_is_connected_with_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = Endpoint::Tcp(listener.local_addr().unwrap());
        let progress = DialProgress::default();
        let (dialed, accepted) =
            tokio::join!(Connector.connect(&endpoint, &progress), listener.accept());
        let Ok(UpstreamStream::Tcp(tcp)) = dialed else {
            panic!("a TCP stream: {dialed:?}");
        };
        assert!(tcp.nodelay().unwrap());
        assert_eq!(tcp.local_addr().unwrap(), accepted.unwrap().1);
        drop(listener);
        assert!(Connector.connect(&endpoint, &progress).await.is_err());
    }

    #[tokio::test]
    async fn a_unix_endpoint_is_connected_and_a_missing_one_is_named() {
        let path = std::env::temp_dir().join(format!("amb-connector-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let endpoint = Endpoint::Unix(Arc::from(path.as_path()));
        let progress = DialProgress::default();
        let missing = Connector.connect(&endpoint, &progress).await.unwrap_err();
        assert!(missing.contains("listening on that socket"), "{missing}");

        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (dialed, accepted) =
            tokio::join!(Connector.connect(&endpoint, &progress), listener.accept());
        assert!(matches!(dialed, Ok(UpstreamStream::Unix(_))), "{dialed:?}");
        accepted.unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
