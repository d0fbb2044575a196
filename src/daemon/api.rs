//! The control API: HTTP/1.1 with JSON over the project's Unix socket (mode 0600, so only the
//! user who started the daemon can drive it).
//!
//! | method, path | body | answer |
//! |---|---|---|
//! | `GET /v1/status` | | [`StatusReport`] |
//! | `POST /v1/scale` | [`Scale`] | [`StatusReport`] once the plan changed, 400 with `{"error"}` if it cannot |
//! | `POST /v1/down` | | 202; the daemon drains the proxy, stops and removes every engine, exits |

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::{Deserialize, Serialize};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use super::state::Scale;
use super::{ClientError, DaemonError};
use crate::reconcile::InstanceStatus;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub project: String,
    pub runtime: String,
    pub pid: u32,
    /// The OpenAI-compatible endpoint (the embedded proxy).
    pub endpoint: String,
    pub served_model: String,
    /// `[proxy] api_key_env`: clients must send `Authorization: Bearer $VAR`.
    pub api_key_env: Option<String>,
    pub prefill_replicas: u32,
    pub decode_replicas: u32,
    pub instances: Vec<InstanceStatus>,
}

impl StatusReport {
    /// Every desired instance is ready.
    pub fn all_ready(&self) -> bool {
        let desired: Vec<_> = self.instances.iter().filter(|i| i.desired).collect();
        !desired.is_empty() && desired.iter().all(|i| i.ready)
    }
}

/// What the server needs from the daemon.
pub trait Control: Send + Sync + 'static {
    fn status(&self) -> StatusReport;
    fn scale(&self, s: Scale) -> Result<StatusReport, DaemonError>;
    fn down(&self);
}

fn json(status: StatusCode, v: &impl Serialize) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(v).expect("API types serialise"),
        )))
        .expect("valid response")
}

async fn handle(ctl: Arc<dyn Control>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let err = |status, msg: String| json(status, &serde_json::json!({ "error": msg }));
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/v1/status") => json(StatusCode::OK, &ctl.status()),
        (Method::POST, "/v1/down") => {
            ctl.down();
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({ "stopping": true }),
            )
        }
        (Method::POST, "/v1/scale") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return err(StatusCode::BAD_REQUEST, e.to_string()),
            };
            match serde_json::from_slice::<Scale>(&body) {
                Ok(s) => match ctl.scale(s) {
                    Ok(r) => json(StatusCode::OK, &r),
                    // The wire carries the message; the client shows it as the daemon's refusal.
                    Err(e @ DaemonError::Plan(_)) => err(StatusCode::BAD_REQUEST, e.to_string()),
                    Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
                },
                Err(e) => err(StatusCode::BAD_REQUEST, e.to_string()),
            }
        }
        _ => err(StatusCode::NOT_FOUND, "no such endpoint".into()),
    }
}

/// Binds the socket (replacing a stale one: the caller holds the project lock) as 0600.
pub fn bind(path: &Path) -> Result<UnixListener, DaemonError> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| DaemonError::io("bind", path, e))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| DaemonError::io("chmod", path, e))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, ctl: Arc<dyn Control>, shutdown: CancellationToken) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    continue;
                }
            },
        };
        let ctl = ctl.clone();
        let svc = hyper::service::service_fn(move |req| {
            let ctl = ctl.clone();
            async move { Ok::<_, std::convert::Infallible>(handle(ctl, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// The daemon's status report (`GET /v1/status`).
pub async fn status(socket: &Path) -> Result<StatusReport, ClientError> {
    call(socket, Method::GET, "/v1/status", None).await
}

/// Asks the daemon to re-plan with these replica counts (`POST /v1/scale`).
pub async fn scale(socket: &Path, want: Scale) -> Result<StatusReport, ClientError> {
    let body = serde_json::to_vec(&want).expect("scale serialises");
    call(socket, Method::POST, "/v1/scale", Some(body)).await
}

/// Asks the daemon to go down (`POST /v1/down`); it answers before it has finished.
pub async fn down(socket: &Path) -> Result<(), ClientError> {
    call::<serde_json::Value>(socket, Method::POST, "/v1/down", None)
        .await
        .map(drop)
}

/// One request to the daemon of the project whose socket is `path`.
async fn call<T: serde::de::DeserializeOwned>(
    path: &Path,
    method: Method,
    uri: &str,
    body: Option<Vec<u8>>,
) -> Result<T, ClientError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::NotRunning {
            path: path.display().to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "pdctl")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .expect("valid request");
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        let msg = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or_else(|| format!("HTTP {status}"));
        return Err(ClientError::Refused(msg));
    }
    Ok(serde_json::from_slice(&bytes)?)
}
