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
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes written at once rather than at the end of the poll; also the size from
/// which a write bypasses the buffer.
const FLUSH_AT: usize = 32 << 10;
/// A buffer that grew past this is released after a flush of less than a quarter of it, so a
/// connection back to small writes (or idle but for keep-alives) keeps little.
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
    /// A write error met at the end of a poll, for h2 to see at every later call.
    failed: Option<(io::ErrorKind, String)>,
}

fn lock<T>(shared: &Mutex<Buffered<T>>) -> MutexGuard<'_, Buffered<T>> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<T> Buffered<T> {
    fn check_failure(&self) -> io::Result<()> {
        match &self.failed {
            Some((kind, why)) => Err(io::Error::new(*kind, why.clone())),
            None => Ok(()),
        }
    }
}

impl<T: AsyncWrite + Unpin> Buffered<T> {
    /// Writes the whole buffer to the inner writer and flushes it, which also sends what the
    /// inner writer holds itself (rustls takes bytes even when the socket is full).
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        if self.buf.capacity() > KEEP && self.buf.len() < KEEP / 4 {
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        self.written = 0;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Makes room for `len` more bytes; `Ready(false)` when they should bypass the buffer.
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        self.check_failure()?;
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
        b.check_failure()?;
        if b.deferring && b.buf.len() < FLUSH_AT {
            return Poll::Ready(Ok(()));
        }
        b.poll_write_out(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut b = lock(&self.0);
        b.check_failure()?;
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
        b.check_failure()?;
        Pin::new(&mut b.io).poll_read(cx, buf)
    }
}

/// Flushes what the polls of a connection task buffered: see [`Flusher::run`].
pub(crate) struct Flusher<T>(Arc<Mutex<Buffered<T>>>);

impl<T> Flusher<T> {
    /// Polls `task` (which drives the h2 connection) with small flushes put off, and writes
    /// what each poll buffered when it returns. h2 ends a connection only after a shutdown,
    /// which writes everything, or after an I/O error: the task never ends with bytes left.
    pub(crate) fn run<F: Future + Unpin>(self, task: F) -> Flushing<F, T> {
        Flushing {
            task,
            flusher: self,
        }
    }

    /// A handle for [`Lingerer::linger`] once the connection task is over.
    pub(crate) fn lingerer(&self) -> Lingerer<T> {
        Lingerer(self.0.clone())
    }
}

/// Keeps the socket until the peer closes its side too: see [`Lingerer::linger`].
pub(crate) struct Lingerer<T>(Arc<Mutex<Buffered<T>>>);

impl<T: AsyncRead + Unpin> Lingerer<T> {
    /// After h2 shut the connection down (everything written, our end sent), reads and
    /// discards what the peer still sends until its end, an error, or `limit`.
    ///
    /// A TCP socket closed with unread bytes (a late WINDOW_UPDATE, a PING) makes the kernel
    /// send a reset instead of a FIN and drop what it had not sent yet; the peer's h2 then fails
    /// streams whose last bytes it had received but not yet passed on.
    pub(crate) async fn linger(self, limit: Duration) {
        let mut scratch = vec![0u8; 4 << 10];
        let until_end = std::future::poll_fn(|cx| loop {
            let mut b = lock(&self.0);
            let mut read = ReadBuf::new(&mut scratch);
            match ready!(Pin::new(&mut b.io).poll_read(cx, &mut read)) {
                Ok(()) if !read.filled().is_empty() => continue,
                _ => return Poll::Ready(()),
            }
        });
        let _ = tokio::time::timeout(limit, until_end).await;
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
        // Every poll, even with nothing buffered here: rustls may hold bytes from a write-out
        // or a large write the socket could not take. Pending: the socket is full, and its
        // write readiness polls the task again.
        if b.failed.is_none() {
            if let Poll::Ready(Err(e)) = b.poll_write_out(cx) {
                // h2 learns at its next read or write; make sure there is one.
                b.failed = Some((e.kind(), e.to_string()));
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

    /// An inner writer that records each write it is given, and can be made to fail or to
    /// hold bytes it accepted (as rustls does when the socket is full).
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        broken: bool,
        /// Flushes that return Pending before one completes.
        stuck_flushes: usize,
        flushes_done: usize,
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
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.stuck_flushes > 0 {
                self.stuck_flushes -= 1;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.flushes_done += 1;
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
        for _ in 0..2 {
            let err = io.read(&mut buf).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        }
        assert!(io.write_all(b"more").await.is_err());
    }

    #[tokio::test]
    async fn bytes_the_inner_writer_holds_are_flushed_at_the_end_of_the_next_poll() {
        let (mut io, flusher) = coalesce(Recorder::default());
        let shared = Flusher(flusher.0.clone());
        lock(&shared.0).io.stuck_flushes = 1;
        let mut polls = 0;
        let task = poll_fn(|cx| {
            polls += 1;
            if polls == 1 {
                assert!(Pin::new(&mut io).poll_write(cx, b"pong").is_ready());
                assert!(Pin::new(&mut io).poll_flush(cx).is_ready());
                // Stays alive for one more poll, which writes nothing.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(())
        });
        flusher.run(pin!(task)).await;
        let recorder = lock(&shared.0);
        assert_eq!(recorder.io.writes, vec![b"pong".to_vec()]);
        assert_eq!(
            recorder.io.flushes_done, 1,
            "the held bytes were never flushed"
        );
    }

    /// Lingering reads the peer's late bytes away and ends at its end of stream, not before.
    #[tokio::test(start_paused = true)]
    async fn linger_reads_until_the_peer_closes_or_the_limit() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let (_io, flusher) = coalesce(ours);
        let lingering = tokio::spawn(flusher.lingerer().linger(Duration::from_secs(2)));
        // More than the pipe holds: it flows only while someone reads.
        theirs.write_all(&[7u8; 1000]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!lingering.is_finished(), "stopped before the peer closed");
        drop(theirs);
        lingering.await.unwrap();

        let (ours, _theirs_open) = tokio::io::duplex(64);
        let (_io, flusher) = coalesce(ours);
        let started = tokio::time::Instant::now();
        flusher.lingerer().linger(Duration::from_secs(2)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }
}
