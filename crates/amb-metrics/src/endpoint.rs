//! The metrics endpoint: plain HTTP/1.1 on its own listener, answering `GET /metrics`,
//! `/healthz` and `/readyz`; anything else is 404, any other method 405. It shares the runtime
//! with the data path but only reads atomics and short locks, and bounds its own work: a few
//! connections at once, each given seconds to send its request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tracing::{info, warn};

use crate::{Metrics, CONTENT_TYPE};

/// Connections the endpoint serves at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 16;
/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source} (is another process using it?)")]
pub struct EndpointError {
    /// The address given.
    pub addr: SocketAddr,
    /// The OS error.
    pub source: std::io::Error,
}

/// Binds the endpoint's listener (before anything else starts, so that a bad address stops
/// the process at once).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, EndpointError> {
    let err = |source| EndpointError { addr, source };
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

/// Serves `listener` until `stop` turns true. Must be polled within a Tokio runtime.
pub async fn serve(
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let listener = match listener
        .local_addr()
        .and_then(|local| TcpListener::from_std(listener).map(|listener| (listener, local)))
    {
        Ok(bound) => bound,
        Err(e) => return warn!("metrics endpoint not served: {e}"),
    };
    let (listener, local) = listener;
    {
        info!(addr = %local, "metrics endpoint listening");
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .keep_alive(true);
        loop {
            let Ok(slot) = (tokio::select! {
                slot = slots.clone().acquire_owned() => slot,
                _ = stop.wait_for(|s| *s) => return,
            }) else {
                return;
            };
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    warn!(addr = %local, "metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            let service = service_fn(move |request| {
                let answer = answer(&metrics, &request);
                async move { Ok::<_, Infallible>(answer) }
            });
            let connection = http.serve_connection(TokioIo::new(tcp), service);
            tokio::spawn(async move {
                let _ = connection.await;
                drop(slot);
            });
        }
    }
}

fn answer(metrics: &Metrics, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if !known {
        return text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /readyz\n",
        );
    }
    if request.method() != Method::GET {
        let mut refused = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
        refused
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return refused;
    }
    match path {
        "/metrics" => {
            let mut scraped = Response::new(Full::new(Bytes::from(metrics.encode())));
            scraped.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(CONTENT_TYPE),
            );
            scraped
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        _ => match metrics.ready() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
