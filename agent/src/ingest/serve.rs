//! Serves the ingest router on its listener: axum's `serve`, plus the one thing it lacks, a
//! limit on the time a client may take to send a request's headers.
//!
//! `axum::serve` gives hyper no timer, so hyper cannot time out a request head: a client that
//! opens connections and sends headers a byte at a time (slowloris) would hold each connection
//! and its task for as long as it likes. Here hyper-util's connection builder gets tokio's timer
//! and `header_read_timeout` (`INGEST_BODY_TIMEOUT_SECS`, the same patience as for a body); the
//! rest is what `axum::serve` does: accept (riding out transient accept errors), serve each
//! connection on its own task, and on shutdown stop accepting, ask every connection to finish its
//! request in progress, and wait for them.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// Serves `app` on `listener` until `stop` is cancelled, then waits for the open connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    accept_error(err).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let service = app
            .clone()
            .map_request(|req: axum::http::Request<Incoming>| req.map(Body::new));
        let conn = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::trace!(error = %err, "Connection ended with an error.");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A failed accept: a connection reset before it was taken is nothing; anything else (out of
/// file descriptors, most often) is logged and waited out, as `axum::serve` does.
async fn accept_error(err: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        err.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %err, "Could not accept a connection on the ingest port; trying again in 1 s.");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
