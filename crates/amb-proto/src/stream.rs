//! The contract every transport stream fulfils, so the relay is written once for both.

use std::future::Future;

use bytes::Bytes;

use crate::status::{Refusal, ResetCode};

/// Why a tunnel stream stopped other than by a clean end of stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The server refused to open the stream.
    #[error("refused by server: {0}")]
    Refused(Refusal),
    /// The peer reset the stream, or asked us to stop sending.
    #[error("reset by peer: {0}")]
    Reset(ResetCode),
    /// The tunnel connection carrying the stream is gone.
    #[error("tunnel connection lost: {0}")]
    ConnectionLost(String),
    /// The peer broke the protocol on this stream.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// The sending half of a tunnel stream.
pub trait StreamSend: Send + 'static {
    /// Sends `data`, waiting for flow-control credit: this is where backpressure comes from.
    fn send(&mut self, data: Bytes) -> impl Future<Output = Result<(), StreamError>> + Send;
    /// Half-closes: the peer reads a clean end of stream after what was sent.
    fn finish(&mut self) -> Result<(), StreamError>;
    /// Aborts: the peer sees a reset carrying `code`; unsent bytes are dropped.
    fn reset(&mut self, code: ResetCode);
}

/// The receiving half of a tunnel stream.
pub trait StreamRecv: Send + 'static {
    /// The next chunk of bytes, or `Ok(None)` at the peer's clean end of stream.
    ///
    /// On a client stream the first call also surfaces the server's answer to the open:
    /// [`StreamError::Refused`] if it refused.
    fn recv(&mut self) -> impl Future<Output = Result<Option<Bytes>, StreamError>> + Send;
    /// Tells the peer to stop sending: nothing more will be read.
    fn stop(&mut self, code: ResetCode);
}
