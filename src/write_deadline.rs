//! A connection whose writes must make progress: a client that stops reading (its socket's
//! buffers full) is cut off once a write has waited longer than a deadline, instead of holding the
//! connection, and whatever the server holds for it, for as long as it likes. Idle time with
//! nothing to write is not waiting.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `inner`, its writes bounded by `deadline`.
pub struct WriteDeadline<S> {
    inner: S,
    deadline: Duration,
    /// Armed while a write waits; disarmed when one makes progress.
    waiting: Option<Pin<Box<Sleep>>>,
}

impl<S> WriteDeadline<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, deadline: Duration) -> WriteDeadline<S> {
        WriteDeadline {
            inner,
            deadline,
            waiting: None,
        }
    }

    /// The inner write's `poll`, bounded: progress disarms the deadline, waiting arms it.
    fn bounded<T>(
        &mut self,
        context: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Pending => self.waited(context),
            done => {
                self.waiting = None;
                done
            }
        }
    }

    /// `Pending` from the inner write: arms the deadline, and fails once it has passed.
    fn waited<T>(&mut self, context: &mut Context<'_>) -> Poll<io::Result<T>> {
        let deadline = self.deadline;
        let waiting = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + deadline)));
        ready!(waiting.as_mut().poll(context));
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client read nothing for {}s; closed",
                deadline.as_secs()
            ),
        )))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(context, buffer)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(context, bytes);
        self.bounded(context, poll)
    }

    fn poll_flush(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(context);
        self.bounded(context, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(context)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(context, buffers);
        self.bounded(context, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_peer_that_reads_nothing_is_cut_off_and_one_that_reads_is_not() {
        // The other end stays open, and unread.
        let (ours, _theirs) = tokio::io::duplex(1024);
        let mut bounded = WriteDeadline::new(ours, Duration::from_millis(200));
        let chunk = vec![b'a'; 512];
        // Within the buffer: no wait at all.
        bounded.write_all(&chunk).await.unwrap();
        // The buffer is full and nobody reads: cut off after the deadline.
        let error = bounded.write_all(&vec![b'a'; 4096]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);

        // A reader that keeps reading, slower than the writer but within the deadline.
        let (ours, mut theirs_again) = tokio::io::duplex(1024);
        let mut bounded = WriteDeadline::new(ours, Duration::from_millis(500));
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buffer = vec![0u8; 256];
            let mut total = 0;
            while total < 8192 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                total += theirs_again.read(&mut buffer).await.unwrap();
            }
            total
        });
        bounded.write_all(&vec![b'a'; 8192]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 8192);
    }
}
