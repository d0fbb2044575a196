//! The KV side channel: where a decode engine pulls a prefill engine's blocks, like NIXL's
//! side channel at `VLLM_NIXL_SIDE_CHANNEL_HOST:PORT`. One JSON line each way per pull:
//!
//! ```text
//! → {"request_id":"cmpl-…","engine_id":"sim-…","block_ids":[3,4,5]}
//! ← {"ok":true,"num_tokens":40}            or   {"ok":false,"error":"unknown request …"}
//! ```
//! The prefill frees the blocks once pulled. A pull of an unknown, already pulled or expired
//! request, with another engine's id or other block ids, is refused — so a proxy that mangles
//! `kv_transfer_params` shows up as a failed pull on the decode.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

use super::state::Shared;

const MAX_LINE: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullRequest {
    pub request_id: String,
    pub engine_id: String,
    pub block_ids: Vec<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Error)]
pub enum PullError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("talking to {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr} timed out")]
    Timeout { addr: String },
    #[error("{addr} answered garbage: {detail}")]
    Protocol { addr: String, detail: String },
    #[error("{addr} refused the pull: {reason}")]
    Refused { addr: String, reason: String },
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, &shared).await {
                tracing::debug!(error = %e, "side channel connection ended");
            }
        });
    }
}

async fn serve_connection(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut lines)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let response = match serde_json::from_str::<PullRequest>(line.trim_end()) {
            Ok(request) => answer(shared, &request),
            Err(e) => PullResponse {
                ok: false,
                num_tokens: None,
                error: Some(format!("bad pull request: {e}")),
            },
        };
        let mut out = serde_json::to_vec(&response).expect("plain struct serializes");
        out.push(b'\n');
        write.write_all(&out).await?;
    }
}

fn answer(shared: &Shared, request: &PullRequest) -> PullResponse {
    match take(shared, request) {
        Ok(num_tokens) => {
            shared.metrics.kv_transfers_served.fetch_add(1, Relaxed);
            PullResponse {
                ok: true,
                num_tokens: Some(num_tokens),
                error: None,
            }
        }
        Err(reason) => {
            shared.metrics.kv_transfers_rejected.fetch_add(1, Relaxed);
            tracing::warn!(request_id = %request.request_id, %reason, "refused a KV pull");
            PullResponse {
                ok: false,
                num_tokens: None,
                error: Some(reason),
            }
        }
    }
}

fn take(shared: &Shared, request: &PullRequest) -> Result<u32, String> {
    if request.engine_id != shared.engine_id {
        return Err(format!(
            "engine id {:?} is not this engine ({})",
            request.engine_id, shared.engine_id
        ));
    }
    let pending = {
        let mut table = shared.pending();
        let Some(entry) = table.get(&request.request_id) else {
            return Err(format!(
                "unknown request {:?} (never prefilled here, already pulled, or expired)",
                request.request_id
            ));
        };
        let expected: Vec<u64> = entry.blocks.iter().map(|b| u64::from(*b)).collect();
        if expected != request.block_ids {
            return Err(format!(
                "block ids {:?} do not match the prefilled blocks",
                request.block_ids
            ));
        }
        table.remove(&request.request_id).expect("present above")
    };
    let tokens = pending.num_tokens;
    shared.free_blocks(pending.blocks);
    Ok(tokens)
}

/// The decode side: pulls the blocks a prefill announced. Returns the prefilled token count.
pub async fn pull(
    host: &str,
    port: u16,
    request: &PullRequest,
    timeout: Duration,
) -> Result<u32, PullError> {
    let addr = format!("{host}:{port}");
    let exchange = async {
        let stream =
            TcpStream::connect((host, port))
                .await
                .map_err(|source| PullError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(request).expect("plain struct serializes");
        line.push(b'\n');
        let io = |source| PullError::Io {
            addr: addr.clone(),
            source,
        };
        write.write_all(&line).await.map_err(io)?;
        let mut answer = String::new();
        BufReader::new(read)
            .take(MAX_LINE as u64)
            .read_line(&mut answer)
            .await
            .map_err(|source| PullError::Io {
                addr: addr.clone(),
                source,
            })?;
        let response: PullResponse =
            serde_json::from_str(answer.trim_end()).map_err(|e| PullError::Protocol {
                addr: addr.clone(),
                detail: e.to_string(),
            })?;
        match (response.ok, response.num_tokens) {
            (true, Some(tokens)) => Ok(tokens),
            _ => Err(PullError::Refused {
                addr: addr.clone(),
                reason: response.error.unwrap_or_else(|| "no reason given".into()),
            }),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(PullError::Timeout { addr: addr.clone() }))
}
