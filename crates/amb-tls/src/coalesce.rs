//! Gathers h2's writes into full TLS records and one `writev` per poll of the connection task.
//!
//! h2 writes every DATA frame over 256 bytes on its own and flushes before it encodes the
//! next one; tokio-rustls turns each write into a TLS record and a `writev`. With many streams
//! sending small chunks (pipelined requests), that is a record and a syscall per chunk.
//!
//! [`Coalesce`] buffers h2's writes. While the connection task is inside [`Flushing`], a flush
//! of a small buffer is put off until the task's poll returns; then everything that poll wrote
//! leaves at once. Outside it (the handshakes), and once the buffer holds [`FLUSH_AT`] bytes,
//! a flush writes at once; writes of that size or more pass straight through.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes written at once rather than at the end of the poll; also the size from
/// which a write bypasses the buffer.
const FLUSH_AT: usize = 32 << 10;
/// A buffer that grew past this is released once written, so idle connections keep little.
const KEEP: usize = 16 << 10;

/// Wraps `io`: the I/O object for h2, and the handle that flushes what h2's polls buffered.
pub(crate) fn coalesce<T>(io: T) -> (Coalesce<T>, Flusher<T>) {
    let shared = Arc::new(Mutex::new(Buffered {
        io,
        buf: Vec::new(),
        written: 0,
        deferring: false,
        failed: None,
    }));
    (Coalesce(shared.clone()), Flusher(shared))
}

struct Buffered<T> {
    io: T,
    buf: Vec<u8>,
    /// How much of `buf` the inner writer took so far.
    written: usize,
    /// Inside a [`Flushing`] poll: small flushes wait for its end.
    deferring: bool,
    /// A write error met at the end of a poll, for h2 to see at its next call.
    failed: Option<io::Error>,
}

fn lock<T>(shared: &Mutex<Buffered<T>>) -> MutexGuard<'_, Buffered<T>> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<T: AsyncWrite + Unpin> Buffered<T> {
    fn take_failure(&mut self) -> io::Result<()> {
        self.failed.take().map_or(Ok(()), Err)
    }

    /// Writes the whole buffer to the inner writer and flushes it.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.written = 0;
        if self.buf.capacity() > KEEP {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Makes room for `len` more bytes; `Ready(false)` when they should bypass the buffer.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        self.take_failure()?;
        if self.buf.len() + len > FLUSH_AT {
            ready!(self.poll_write_out(cx))?;
        }
        Poll::Ready(Ok(len < FLUSH_AT))
    }
}

/// The I/O object h2 runs on (see the module docs).
pub(crate) struct Coalesce<T>(Arc<Mutex<Buffered<T>>>);

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut b = lock(&self.0);
        if !ready!(b.poll_room(cx, data.len()))? {
            return Pin::new(&mut b.io).poll_write(cx, data);
        }
        b.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut b = lock(&self.0);
        let len = slices.iter().map(|s| s.len()).sum();
        if !ready!(b.poll_room(cx, len))? {
            return Pin::new(&mut b.io).poll_write_vectored(cx, slices);
        }
        for slice in slices {
            b.buf.extend_from_slice(slice);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut b = lock(&self.0);
        b.take_failure()?;
        if b.deferring && b.buf.len() < FLUSH_AT {
            return Poll::Ready(Ok(()));
        }
        b.poll_write_out(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut b = lock(&self.0);
        b.take_failure()?;
        ready!(b.poll_write_out(cx))?;
        Pin::new(&mut b.io).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut b = lock(&self.0);
        if let Some(e) = b.failed.take() {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut b.io).poll_read(cx, buf)
    }
}

/// Flushes what the polls of a connection task buffered: see [`Flusher::run`].
pub(crate) struct Flusher<T>(Arc<Mutex<Buffered<T>>>);

impl<T> Flusher<T> {
    /// Polls `task` (which drives the h2 connection) with small flushes put off, and writes
    /// what each poll buffered when it returns.
    pub(crate) fn run<F: Future + Unpin>(self, task: F) -> Flushing<F, T> {
        Flushing {
            task,
            flusher: self,
        }
    }
}

/// A connection task whose writes leave at the end of each poll.
pub(crate) struct Flushing<F, T> {
    task: F,
    flusher: Flusher<T>,
}

impl<F: Future + Unpin, T: AsyncWrite + Unpin> Future for Flushing<F, T> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        lock(&self.flusher.0).deferring = true;
        let out = Pin::new(&mut self.task).poll(cx);
        let mut b = lock(&self.flusher.0);
        b.deferring = false;
        if b.failed.is_none() && !b.buf.is_empty() {
            // Pending: the socket is full, and its write readiness polls the task again.
            if let Poll::Ready(Err(e)) = b.poll_write_out(cx) {
                // h2 learns at its next read or write; make sure there is one.
                b.failed = Some(e);
                cx.waker().wake_by_ref();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::pin::pin;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An inner writer that records each write it is given, and can be made to fail.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        broken: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.broken {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            self.writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn writes(flusher: &Flusher<Recorder>) -> Vec<Vec<u8>> {
        lock(&flusher.0).io.writes.clone()
    }

    /// Polls `io` once inside a [`Flushing`] poll: writes and flushes each chunk.
    async fn one_poll(io: &mut Coalesce<Recorder>, flusher: Flusher<Recorder>, chunks: &[&[u8]]) {
        let task = poll_fn(|cx| {
            for chunk in chunks {
                assert!(Pin::new(&mut *io).poll_write(cx, chunk).is_ready());
                assert!(Pin::new(&mut *io).poll_flush(cx).is_ready());
            }
            Poll::Ready(())
        });
        flusher.run(pin!(task)).await;
    }

    #[tokio::test]
    async fn flushes_within_a_poll_become_one_write_at_its_end() {
        let (mut io, flusher) = coalesce(Recorder::default());
        let shared = Flusher(flusher.0.clone());
        one_poll(&mut io, flusher, &[b"one ", b"two ", b"three"]).await;
        assert_eq!(writes(&shared), vec![b"one two three".to_vec()]);
    }

    #[tokio::test]
    async fn outside_a_poll_a_flush_writes_at_once() {
        let (mut io, flusher) = coalesce(Recorder::default());
        io.write_all(b"settings").await.unwrap();
        assert!(writes(&flusher).is_empty());
        io.flush().await.unwrap();
        assert_eq!(writes(&flusher), vec![b"settings".to_vec()]);
    }

    #[tokio::test]
    async fn large_writes_pass_through_after_what_was_buffered() {
        let (mut io, flusher) = coalesce(Recorder::default());
        let large = vec![1u8; FLUSH_AT];
        io.write_all(b"small").await.unwrap();
        io.write_all(&large).await.unwrap();
        assert_eq!(writes(&flusher), vec![b"small".to_vec(), large]);
    }

    #[tokio::test]
    async fn a_failed_write_at_the_end_of_a_poll_surfaces_at_the_next_call() {
        let (mut io, flusher) = coalesce(Recorder::default());
        let shared = Flusher(flusher.0.clone());
        lock(&shared.0).io.broken = true;
        one_poll(&mut io, flusher, &[b"lost"]).await;
        let mut buf = [0u8; 1];
        let err = io.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
