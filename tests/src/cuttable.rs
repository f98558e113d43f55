//! An axum [`Listener`] over a loopback TCP listener that remembers its open connections, so
//! that a server going "down" can cut every one of them, idle keep-alive connections included.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The open connections of a [`CuttableListener`]: a second handle on each socket.
#[derive(Clone, Default)]
pub(crate) struct Connections(Arc<Mutex<Vec<Weak<std::net::TcpStream>>>>);

impl Connections {
    /// Shuts every open connection down in both directions: the peer sees it closed at once.
    pub(crate) fn cut_all(&self) {
        let conns = std::mem::take(&mut *self.0.lock().expect("connections lock"));
        for conn in conns.iter().filter_map(Weak::upgrade) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }

    fn track(&self, stream: TcpStream) -> io::Result<CuttableStream> {
        let std_stream = stream.into_std()?;
        let handle = Arc::new(std_stream.try_clone()?);
        let inner = TcpStream::from_std(std_stream)?;
        let mut conns = self.0.lock().expect("connections lock");
        conns.retain(|c| c.strong_count() > 0);
        conns.push(Arc::downgrade(&handle));
        Ok(CuttableStream { inner, handle })
    }
}

/// A TCP listener whose accepted connections are tracked in [`Connections`].
pub(crate) struct CuttableListener {
    pub(crate) listener: TcpListener,
    pub(crate) connections: Connections,
}

impl Listener for CuttableListener {
    type Io = CuttableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => match self.connections.track(stream) {
                    Ok(stream) => return (stream, addr),
                    Err(e) => eprintln!("flaky server: dropping a connection: {e}"),
                },
                Err(e) => {
                    eprintln!("flaky server: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// One accepted connection. `handle` is a duplicate of the socket for [`Connections::cut_all`];
/// since the socket closes only when both are closed, dropping the stream shuts it down first,
/// so a normal close still reaches the peer.
pub(crate) struct CuttableStream {
    inner: TcpStream,
    handle: Arc<std::net::TcpStream>,
}

impl Drop for CuttableStream {
    fn drop(&mut self) {
        let _ = self.handle.shutdown(Shutdown::Both);
    }
}

impl AsyncRead for CuttableStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for CuttableStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
