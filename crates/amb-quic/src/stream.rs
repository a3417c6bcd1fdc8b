//! quinn streams behind amb's stream traits.

use amb_proto::{Refusal, ResetCode, StreamError, StreamRecv, StreamSend};
use std::future::Future;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use quinn::{ReadError, VarInt, WriteError};

/// Sending half of a QUIC tunnel stream.
pub struct QuicSend(pub(crate) quinn::SendStream);

/// Receiving half of a QUIC tunnel stream. On the client it first reads the status byte.
pub struct QuicRecv {
    pub(crate) stream: quinn::RecvStream,
    pub(crate) awaiting_status: bool,
}

fn code(c: VarInt) -> ResetCode {
    ResetCode(u32::try_from(c.into_inner()).unwrap_or(u32::MAX))
}

fn read_error(e: ReadError) -> StreamError {
    match e {
        ReadError::Reset(c) => StreamError::Reset(code(c)),
        ReadError::ConnectionLost(e) => StreamError::ConnectionLost(e.to_string()),
        other => StreamError::Protocol(other.to_string()),
    }
}

pub(crate) fn write_error(e: WriteError) -> StreamError {
    match e {
        WriteError::Stopped(c) => StreamError::Reset(code(c)),
        WriteError::ConnectionLost(e) => StreamError::ConnectionLost(e.to_string()),
        other => StreamError::Protocol(other.to_string()),
    }
}

impl StreamSend for QuicSend {
    async fn send(&mut self, data: Bytes) -> Result<(), StreamError> {
        self.0.write_chunk(data).await.map_err(write_error)
    }
    async fn finish(&mut self) -> Result<(), StreamError> {
        self.0
            .finish()
            .map_err(|e| StreamError::Protocol(e.to_string()))
    }
    fn reset(&mut self, code: ResetCode) {
        let _ = self.0.reset(VarInt::from_u32(code.0));
    }
    async fn delivered(&mut self) {
        // Resolves when the peer acknowledged all data after our FIN, or stopped the stream.
        let _ = self.0.stopped().await;
    }
}

impl QuicRecv {
    /// Appends up to `want` chunks that already arrived, without waiting. Synchronous, so its
    /// scratch array never becomes part of a stream's future.
    fn take_ready(&mut self, batch: &mut Vec<Bytes>, want: usize) -> Result<(), StreamError> {
        if want == 0 {
            return Ok(());
        }
        let mut more: [Bytes; MAX_BATCH] = Default::default();
        let polled = std::pin::pin!(self.stream.read_chunks(&mut more[..want]))
            .poll(&mut Context::from_waker(Waker::noop()));
        match polled {
            Poll::Ready(Ok(Some(n))) => batch.extend(more.into_iter().take(n)),
            // The end of the stream (quinn answers `None` again on the next read) or no
            // more data yet: the batch is complete either way.
            Poll::Ready(Ok(None)) | Poll::Pending => {}
            Poll::Ready(Err(e)) => return Err(read_error(e)),
        }
        Ok(())
    }

    /// Reads the server's status byte the first time a client stream is read.
    async fn await_status(&mut self) -> Result<(), StreamError> {
        if self.awaiting_status {
            let mut status = [0u8; 1];
            self.stream
                .read_exact(&mut status)
                .await
                .map_err(|e| match e {
                    quinn::ReadExactError::FinishedEarly(_) => {
                        StreamError::Protocol("stream ended before the server's status byte".into())
                    }
                    quinn::ReadExactError::ReadError(e) => read_error(e),
                })?;
            Refusal::from_status_byte(status[0]).map_err(StreamError::Refused)?;
            self.awaiting_status = false;
        }
        Ok(())
    }
}

/// Most chunks one [`StreamRecv::recv_batch`] takes from quinn: a QUIC chunk is at most one
/// packet's payload (about 1.4 KiB), so a batch is up to about 45 KiB.
const MAX_BATCH: usize = 32;

impl StreamRecv for QuicRecv {
    async fn recv(&mut self) -> Result<Option<Bytes>, StreamError> {
        self.await_status().await?;
        match self.stream.read_chunk(usize::MAX, true).await {
            Ok(chunk) => Ok(chunk.map(|c| c.bytes)),
            Err(e) => Err(read_error(e)),
        }
    }
    async fn recv_batch(
        &mut self,
        batch: &mut Vec<Bytes>,
        max: usize,
    ) -> Result<bool, StreamError> {
        let Some(first) = self.recv().await? else {
            return Ok(false);
        };
        batch.push(first);
        self.take_ready(batch, max.saturating_sub(1).min(MAX_BATCH))?;
        Ok(true)
    }
    fn stop(&mut self, code: ResetCode) {
        let _ = self.stream.stop(VarInt::from_u32(code.0));
    }
}
