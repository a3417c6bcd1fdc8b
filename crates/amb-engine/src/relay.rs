//! The copy loops between a TCP socket and a tunnel stream, written once for both transports.
//!
//! - Half-close travels both ways: the socket's FIN finishes the stream, the stream's end
//!   shuts the socket's write side.
//! - Backpressure: one chunk in flight per direction; the transport's `send` waits for
//!   flow-control credit and the socket write waits for the kernel.
//! - Any failure resets both sides: the stream with a reset code, the socket with a TCP RST, so
//!   data loss is never disguised as a clean end.
//! - An idle connection holds no buffer: one is allocated only once the socket is readable.

use std::io;
use std::net::Shutdown;

use amb_proto::{ResetCode, StreamError, StreamRecv, StreamSend};
use bytes::BytesMut;
use tokio::net::TcpStream;

/// First read buffer size; it doubles while reads fill it.
const MIN_BUFFER: usize = 16 << 10;
/// Largest read buffer.
const MAX_BUFFER: usize = 256 << 10;

/// How a relayed connection failed. Either way both sides were reset.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The TCP side (app or upstream) failed, e.g. it reset the connection.
    #[error("TCP side: {0}")]
    Tcp(#[source] io::Error),
    /// The tunnel stream failed: reset by the peer, refused, or the tunnel was lost.
    #[error("{0}")]
    Tunnel(#[from] StreamError),
}

/// Bytes carried each way by a finished relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RelayStats {
    /// From the TCP socket into the tunnel.
    pub to_tunnel: u64,
    /// From the tunnel to the TCP socket.
    pub from_tunnel: u64,
}

/// Relays until both directions end cleanly, or resets both sides at the first failure.
pub async fn relay<S: StreamSend, R: StreamRecv>(
    tcp: TcpStream,
    mut send: S,
    mut recv: R,
) -> Result<RelayStats, RelayError> {
    let outcome = tokio::try_join!(
        tcp_to_tunnel(&tcp, &mut send),
        tunnel_to_tcp(&tcp, &mut recv)
    );
    match outcome {
        Ok((to_tunnel, from_tunnel)) => {
            send.delivered().await;
            Ok(RelayStats {
                to_tunnel,
                from_tunnel,
            })
        }
        Err(e) => {
            let code = match &e {
                RelayError::Tcp(_) => ResetCode::CANCEL,
                RelayError::Tunnel(_) => ResetCode::CONNECT_ERROR,
            };
            send.reset(code);
            recv.stop(code);
            reset_tcp(tcp);
            Err(e)
        }
    }
}

/// Closes a socket with a TCP RST instead of a FIN, so the other end sees an abort.
pub fn reset_tcp(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

async fn tcp_to_tunnel<S: StreamSend>(tcp: &TcpStream, send: &mut S) -> Result<u64, RelayError> {
    let mut total = 0u64;
    let mut size = MIN_BUFFER;
    let mut buf = BytesMut::new();
    loop {
        tcp.readable().await.map_err(RelayError::Tcp)?;
        if buf.capacity() < size {
            buf.reserve(size);
        }
        match tcp.try_read_buf(&mut buf) {
            Ok(0) => {
                send.finish()?;
                return Ok(total);
            }
            Ok(n) => {
                total += n as u64;
                if n >= size && size < MAX_BUFFER {
                    size *= 2;
                }
                send.send(buf.split().freeze()).await?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(RelayError::Tcp(e)),
        }
    }
}

async fn tunnel_to_tcp<R: StreamRecv>(tcp: &TcpStream, recv: &mut R) -> Result<u64, RelayError> {
    let mut total = 0u64;
    while let Some(chunk) = recv.recv().await? {
        total += chunk.len() as u64;
        let mut rest = &chunk[..];
        while !rest.is_empty() {
            tcp.writable().await.map_err(RelayError::Tcp)?;
            match tcp.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(RelayError::Tcp(e)),
            }
        }
    }
    match socket2::SockRef::from(tcp).shutdown(Shutdown::Write) {
        // The socket may already be gone; its own error will surface on the other direction.
        Ok(()) | Err(_) => Ok(total),
    }
}
