//! h2 streams behind amb's stream traits, with flow control giving backpressure.

use std::future::poll_fn;

use amb_proto::{Refusal, ResetCode, StreamError, StreamRecv, StreamSend};
use bytes::Bytes;
use h2::client::ResponseFuture;
use h2::{Reason, RecvStream, SendStream};
use tokio::sync::OwnedSemaphorePermit;

pub(crate) fn h2_error(e: h2::Error) -> StreamError {
    if e.is_go_away() {
        // Streams the server never took (above its GOAWAY's last stream), and opens after a
        // GOAWAY: the connection is over for them, and an open may be tried on another one.
        return StreamError::ConnectionLost(match e.reason() {
            Some(h2::Reason::NO_ERROR) if e.is_remote() => {
                "the server is draining the connection (GOAWAY)".to_owned()
            }
            _ => e.to_string(),
        });
    }
    match e.reason() {
        Some(reason) if e.is_reset() || e.is_remote() => {
            StreamError::Reset(ResetCode(reason.into()))
        }
        _ if e.is_io() => StreamError::ConnectionLost(e.to_string()),
        Some(reason) => StreamError::Reset(ResetCode(reason.into())),
        // A local misuse h2 refused, in practice sending on a stream the server already ended
        // (e.g. right after it refused the open): the stream is over, not the connection.
        None => StreamError::Protocol(format!("stream already closed by the server ({e})")),
    }
}

/// Largest first chunk handed to h2 before it granted flow-control credit (a typical first
/// read). h2 still sends it only within the peer's windows, holding it meanwhile: one bounded
/// chunk per stream, never more, since later sends wait for credit.
const UNCREDITED_FIRST_CHUNK: usize = 16 << 10;

/// Sending half of an HTTP/2 CONNECT stream.
pub struct H2Send {
    stream: SendStream<Bytes>,
    sent_any: bool,
    /// On the client, the stream's place under the server's concurrent-stream limit, held
    /// for the stream's life.
    _slot: Option<OwnedSemaphorePermit>,
}

impl H2Send {
    pub(crate) fn new(stream: SendStream<Bytes>, slot: Option<OwnedSemaphorePermit>) -> Self {
        H2Send {
            stream,
            sent_any: false,
            _slot: slot,
        }
    }
}

impl StreamSend for H2Send {
    async fn send(&mut self, mut data: Bytes) -> Result<(), StreamError> {
        let first = !std::mem::replace(&mut self.sent_any, true);
        if first && data.len() <= UNCREDITED_FIRST_CHUNK {
            // A client stream gets credit only once the connection task has sent its HEADERS,
            // so waiting for it would send the HEADERS and the first bytes in two TLS records
            // and two writes. Queued now, both leave in one.
            return self.stream.send_data(data, false).map_err(h2_error);
        }
        while !data.is_empty() {
            self.stream.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| self.stream.poll_capacity(cx)).await {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Err(h2_error(e)),
                None => {
                    // The stream closed under us: report why.
                    return Err(match poll_fn(|cx| self.stream.poll_reset(cx)).await {
                        Ok(reason) => StreamError::Reset(ResetCode(reason.into())),
                        Err(e) => h2_error(e),
                    });
                }
            };
            let chunk = data.split_to(granted.min(data.len()));
            self.stream.send_data(chunk, false).map_err(h2_error)?;
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<(), StreamError> {
        self.stream.send_data(Bytes::new(), true).map_err(h2_error)
    }

    fn reset(&mut self, code: ResetCode) {
        self.stream.send_reset(Reason::from(code.0));
    }

    async fn delivered(&mut self) {
        // HTTP/2 has no per-stream acknowledgement: the connection writes out queued frames
        // before it closes, and both sides' shutdown waits for that (the client's in
        // `TlsTunnel::close`).
    }
}

/// Receiving half of an HTTP/2 CONNECT stream; on the client it first awaits the response.
pub enum H2Recv {
    /// Client side, before the server answered.
    Pending(ResponseFuture),
    /// Body bytes flow.
    Body(RecvStream),
    /// Stopped locally.
    Stopped,
}

impl StreamRecv for H2Recv {
    async fn recv(&mut self) -> Result<Option<Bytes>, StreamError> {
        if let H2Recv::Pending(response) = self {
            let response = response.await.map_err(h2_error)?;
            let header = response.headers().get(amb_proto::REFUSAL_HEADER);
            let status = response.status().as_u16();
            if let Some(refusal) = Refusal::from_http(status, header.map(|h| h.as_bytes())) {
                *self = H2Recv::Stopped;
                return Err(StreamError::Refused(refusal));
            }
            *self = H2Recv::Body(response.into_body());
        }
        let H2Recv::Body(body) = self else {
            return Ok(None);
        };
        match body.data().await {
            Some(Ok(chunk)) => {
                // Hand the window back at once: the copy into the socket is the backpressure.
                let _ = body.flow_control().release_capacity(chunk.len());
                Ok(Some(chunk))
            }
            Some(Err(e)) => Err(h2_error(e)),
            None => Ok(None),
        }
    }

    fn stop(&mut self, _code: ResetCode) {
        // HTTP/2 has no STOP_SENDING; the sending half's RST_STREAM ends both directions.
        *self = H2Recv::Stopped;
    }
}
