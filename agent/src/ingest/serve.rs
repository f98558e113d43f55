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
//!
//! With `INGEST_TLS_CERT` the listener is HTTPS only ([`crate::api_tls`]): each connection's TLS
//! handshake runs on the connection's task, bounded by the same timeout (a client that opens
//! a connection and never finishes its handshake is dropped), and is abandoned at shutdown.
//! A client speaking clear HTTP to it fails the handshake and gets nothing.

use std::time::Duration;

use axum::Router;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// Serves `app` on `listener` (over TLS when `tls` is given) until `stop` is cancelled, then
/// waits for the open connections.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    tls: Option<TlsAcceptor>,
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
        let Some(acceptor) = &tls else {
            let conn = builder
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(err) = conn.await {
                    tracing::trace!(error = %err, "Connection ended with an error.");
                }
            });
            continue;
        };
        let (acceptor, builder, watcher, stop) = (
            acceptor.clone(),
            builder.clone(),
            graceful.watcher(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(header_timeout, acceptor.accept(stream));
            let stream = tokio::select! {
                done = handshake => match done {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(err)) => {
                        // Most often a client speaking clear HTTP or not trusting the
                        // certificate: its side says why.
                        tracing::debug!(error = %err, "TLS handshake with an ingest client failed.");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(timeout_secs = header_timeout.as_secs_f64(), "An ingest client did not finish its TLS handshake in time; disconnected.");
                        return;
                    }
                },
                // Shutting down: a connection not yet open is dropped, not waited for.
                () = stop.cancelled() => return,
            };
            let conn = builder
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
                .into_owned();
            if let Err(err) = watcher.watch(conn).await {
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
