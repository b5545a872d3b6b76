//! An upstream connection with bytes put back in front of it: the forwarder reads an
//! answer's head itself ([`super::upstream_head`]) and, when the answer is one pingora's
//! client session must frame, hands the session the connection with the bytes it read, to
//! read again from memory. Once the session gives the connection back, [`unwrap`] takes
//! the connection out again, so a pooled connection is never wrapped twice.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::protocols::{Peek, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, whose reads give `before` first.
#[derive(Debug)]
pub struct Rewound {
    inner: Stream,
    before: BytesMut,
}

/// `stream` with `before` to be read again first.
pub fn rewind(stream: Stream, before: BytesMut) -> Stream {
    Box::new(Rewound {
        inner: stream,
        before,
    })
}

/// The connection inside a [`Rewound`] stream whose bytes were all read again (the stream
/// as it is when it is not one); `None` when some were left unread.
pub fn unwrap(stream: Stream) -> Option<Stream> {
    if !stream.as_any().is::<Rewound>() {
        return Some(stream);
    }
    let rewound = stream.into_any().downcast::<Rewound>().ok()?;
    rewound.before.is_empty().then_some(rewound.inner)
}

impl AsyncRead for Rewound {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.before.is_empty() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let n = this.before.len().min(buf.remaining());
        buf.put_slice(&this.before[..n]);
        this.before.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

crate::connections::delegate_stream_traits!(Rewound);

#[async_trait]
impl Peek for Rewound {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if self.before.is_empty() {
            return self.inner.try_peek(buf).await;
        }
        let n = self.before.len().min(buf.len());
        buf[..n].copy_from_slice(&self.before[..n]);
        Ok(n == buf.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front::stream_pair;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_the_bytes_put_back_then_the_connection_and_unwraps() {
        let (mut far, near) = stream_pair().await;
        far.write_all(b" world").await.unwrap();
        let mut stream = rewind(near, BytesMut::from(&b"hello"[..]));
        let mut got = vec![0u8; 11];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
        let inner = unwrap(stream).expect("all bytes were read again");
        assert!(!inner.as_any().is::<Rewound>());
        // A stream that is not rewound comes back as it is; one with bytes unread does not.
        assert!(unwrap(inner).is_some());
        let (_far, near) = stream_pair().await;
        assert!(unwrap(rewind(near, BytesMut::from(&b"x"[..]))).is_none());
    }
}
