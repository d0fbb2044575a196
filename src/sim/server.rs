//! The simulator's front door: binds its listeners, serves HTTP/1.1 keep-alive (hyper 1) and
//! routes each request to its handler.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use thiserror::Error;
use tokio::net::TcpListener;

use super::args::{ArgsError, SimConfig};
use super::respond::{error, respond, Body};
use super::state::Shared;
use super::{completions, kv};

#[derive(Debug, Error)]
pub enum SimError {
    /// Bad or unknown arguments, or `--help`: the caller shows `args::USAGE`.
    #[error(transparent)]
    Args(#[from] ArgsError),
    #[error("cannot start the async runtime: {source}")]
    Runtime { source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// Binds both listeners first (so a busy port fails fast and loudly), then serves forever.
pub async fn serve(cfg: SimConfig) -> Result<(), SimError> {
    let http_addr = SocketAddr::new(cfg.host, cfg.port);
    let http = TcpListener::bind(http_addr)
        .await
        .map_err(|source| SimError::Bind {
            addr: http_addr.to_string(),
            source,
        })?;
    let side_addr = format!("{}:{}", cfg.side_channel_host, cfg.side_channel_port);
    let side = TcpListener::bind(side_addr.as_str())
        .await
        .map_err(|source| SimError::Bind {
            addr: side_addr.clone(),
            source,
        })?;
    let shared = Shared::new(cfg);
    tracing::info!(
        http = %http_addr,
        side_channel = %side_addr,
        model = %shared.cfg.served_model_name,
        engine_id = %shared.engine_id,
        "simulated vLLM engine listening"
    );
    tokio::spawn(kv::serve(side, shared.clone()));
    tokio::spawn(sweep_expired(shared.clone()));
    loop {
        let (stream, _) = match http.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(req, shared).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn sweep_expired(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.sweep_interval());
    loop {
        tick.tick().await;
        shared.expire_pending(std::time::Instant::now());
    }
}

async fn route(req: Request<Incoming>, shared: Arc<Shared>) -> Response<Body> {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/health") | (&Method::GET | &Method::POST, "/ping") => {
            health(&shared).await
        }
        (&Method::GET, "/metrics") => {
            let page = shared
                .metrics
                .render(&shared.cfg.served_model_name, &shared.gauges());
            respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                page,
            )
        }
        (&Method::GET, "/v1/models") => completions::models(&shared),
        (&Method::POST, "/v1/completions") => {
            completions::handle(req, shared, completions::Api::Completions).await
        }
        (&Method::POST, "/v1/chat/completions") => {
            completions::handle(req, shared, completions::Api::Chat).await
        }
        (_, "/health" | "/metrics" | "/v1/models" | "/v1/completions" | "/v1/chat/completions") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        }
        _ => error(StatusCode::NOT_FOUND, "Not Found"),
    }
}

async fn health(shared: &Shared) -> Response<Body> {
    if shared.health_hung() {
        // A wedged engine: the connection stays open and nothing ever comes back.
        std::future::pending::<()>().await;
    }
    if !shared.ready() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "engine is starting");
    }
    respond(StatusCode::OK, "application/json", String::new())
}
