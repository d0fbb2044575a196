//! `/v1/completions` and `/v1/chat/completions`: request checks as strict as vLLM's, admission
//! into the engine, prefill (local or pulled over the side channel), and generation, plain or SSE.

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::engine::{estimate_tokens, splitmix64, TextGen, EOS_MARKER};
use super::kv::{self, PullRequest};
use super::respond::{error, respond, Body};
use super::state::{Pending, Shared};

const MAX_BODY: usize = 64 << 20;
const PULL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Completions,
    Chat,
}

pub fn models(shared: &Shared) -> Response<Body> {
    let body = json!({
        "object": "list",
        "data": [{
            "id": shared.cfg.served_model_name,
            "object": "model",
            "created": unix_now(),
            "owned_by": "vllm",
            "root": shared.cfg.model,
            "parent": null,
            "max_model_len": shared.cfg.max_model_len,
        }]
    });
    respond(StatusCode::OK, "application/json", body.to_string())
}

/// What a request asks of the engine, after vLLM-like validation.
struct Job {
    prompt: String,
    prompt_tokens: u32,
    stream: bool,
    include_usage: bool,
    max_tokens: u32,
    ignore_eos: bool,
    role: PdRole,
}

enum PdRole {
    Plain,
    /// `do_remote_decode`: compute the prompt, keep the blocks for a decode to pull.
    Prefill,
    /// `do_remote_prefill`: pull the prompt's blocks; on invalid params, recompute (counted).
    Decode(Result<Remote, String>),
}

struct Remote {
    block_ids: Vec<u64>,
    engine_id: String,
    request_id: String,
    host: String,
    port: u16,
}

type Rejection = Box<Response<Body>>;

fn reject(status: StatusCode, message: &str) -> Rejection {
    Box::new(error(status, message))
}

pub async fn handle(req: Request<Incoming>, shared: Arc<Shared>, api: Api) -> Response<Body> {
    match run(req, shared, api).await {
        Ok(response) => response,
        Err(rejection) => *rejection,
    }
}

async fn run(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    api: Api,
) -> Result<Response<Body>, Rejection> {
    let arrived = Instant::now();
    if !shared.ready() {
        return Err(reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "engine is starting",
        ));
    }
    let number = shared.next_request_number();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| format!("{number:x}"));
    if let Some(status) = forced_error(&req) {
        shared
            .metrics
            .requests_failed_injected
            .fetch_add(1, Relaxed);
        return Err(reject(status, "error forced by the X-Return-Error header"));
    }
    if injected_failure(&shared, number) {
        shared
            .metrics
            .requests_failed_injected
            .fetch_add(1, Relaxed);
        return Err(reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "injected failure (--failure-rate)",
        ));
    }
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| reject(StatusCode::BAD_REQUEST, &format!("reading the body: {e}")))?
        .to_bytes();
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| reject(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")))?;
    let job = parse_job(&value, api, &shared)?;
    shared
        .engine()
        .check_fits(job.prompt_tokens + job.max_tokens)
        .map_err(|t| {
            reject(
                StatusCode::BAD_REQUEST,
                &format!(
                    "request needs {} KV blocks but the cache has {}",
                    t.blocks_needed, t.num_blocks
                ),
            )
        })?;

    let mut admitted = admit(&shared, job.prompt_tokens + job.max_tokens).await;
    let cached = {
        let hits = shared.engine().prefix_lookup_and_insert(&job.prompt);
        hits.min(job.prompt_tokens.saturating_sub(1))
    };
    shared
        .metrics
        .prefix_queries
        .fetch_add(u64::from(job.prompt_tokens), Relaxed);
    shared
        .metrics
        .prefix_hits
        .fetch_add(u64::from(cached), Relaxed);
    let pulled = match &job.role {
        PdRole::Decode(remote) => pull(&shared, remote).await,
        _ => false,
    };
    if pulled {
        shared.metrics.prompt_sources(0, 0, job.prompt_tokens);
    } else {
        let uncached = job.prompt_tokens - cached;
        shared.metrics.prompt_sources(uncached, cached, 0);
        sleep(shared.cfg.prefill_time_per_token * uncached).await;
    }
    shared
        .metrics
        .prompt_tokens
        .fetch_add(u64::from(job.prompt_tokens), Relaxed);
    shared.metrics.observe_ttft(arrived.elapsed().as_secs_f64());

    let eos_first = !job.ignore_eos && job.prompt.contains(EOS_MARKER);
    let mut text = TextGen::new(shared.cfg.seed, &job.prompt);
    let tokens: Vec<&'static str> = if eos_first {
        vec![""]
    } else {
        (0..job.max_tokens).map(|_| text.next_token()).collect()
    };
    let finish = if eos_first { "stop" } else { "length" };
    let ids = Ids::new(api, &request_id, &shared);
    let usage = json!({
        "prompt_tokens": job.prompt_tokens,
        "total_tokens": job.prompt_tokens + tokens.len() as u32,
        "completion_tokens": tokens.len(),
        "prompt_tokens_details": {"cached_tokens": cached},
    });

    if job.stream {
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let itl = shared.cfg.inter_token_latency;
        let include_usage = job.include_usage;
        tokio::spawn(async move {
            let (frames, first_token) =
                stream_frames(&ids, &tokens, finish, include_usage.then_some(&usage));
            for (i, frame) in frames.into_iter().enumerate() {
                if i > first_token && i < first_token + tokens.len() {
                    sleep(itl).await;
                }
                if tx.send(frame).await.is_err() {
                    // The client went away: dropping `admitted` unfinished counts the abort.
                    return;
                }
            }
            admitted.complete(finish, tokens.len());
        });
        let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
        }));
        let mut response = Response::new(BodyExt::boxed(body));
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        with_request_id(&mut response, &request_id);
        return Ok(response);
    }

    sleep(shared.cfg.inter_token_latency * (tokens.len() as u32).saturating_sub(1)).await;
    let kv_params = match (&job.role, finish) {
        (PdRole::Prefill, "length") => Some(keep_for_pull(
            &shared,
            &mut admitted,
            &request_id,
            number,
            job.prompt_tokens,
            cached,
        )),
        _ => None,
    };
    admitted.complete(finish, tokens.len());
    let body = complete_body(&ids, &tokens.concat(), finish, usage, kv_params);
    let mut response = respond(StatusCode::OK, "application/json", body.to_string());
    with_request_id(&mut response, &request_id);
    Ok(response)
}

fn with_request_id(response: &mut Response<Body>, request_id: &str) {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
}

fn forced_error(req: &Request<Incoming>) -> Option<StatusCode> {
    let value = req.headers().get("x-return-error")?.to_str().ok()?;
    StatusCode::from_u16(value.trim().parse().ok()?)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error())
}

fn injected_failure(shared: &Shared, number: u64) -> bool {
    if shared.cfg.failure_rate <= 0.0 {
        return false;
    }
    let mut state = shared.cfg.seed ^ number.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let draw = (splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64;
    draw < shared.cfg.failure_rate
}

async fn sleep(duration: Duration) {
    if !duration.is_zero() {
        tokio::time::sleep(duration).await;
    }
}

fn parse_job(value: &Value, api: Api, shared: &Shared) -> Result<Job, Rejection> {
    let bad = |m: &str| reject(StatusCode::BAD_REQUEST, m);
    let obj = value
        .as_object()
        .ok_or_else(|| bad("the body must be a JSON object"))?;
    if let Some(model) = obj.get("model").and_then(Value::as_str) {
        if model != shared.cfg.served_model_name && model != shared.cfg.model {
            return Err(reject(
                StatusCode::NOT_FOUND,
                &format!("The model `{model}` does not exist."),
            ));
        }
    }
    let prompt = match api {
        Api::Completions => completion_prompt(obj.get("prompt"))?,
        Api::Chat => chat_prompt(obj.get("messages"))?,
    };
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("`stream` must be a boolean")),
    };
    let stream_options = obj.get("stream_options").filter(|v| !v.is_null());
    if stream_options.is_some() && !stream {
        return Err(bad(
            "Stream options can only be defined when `stream=True`.",
        ));
    }
    let include_usage = stream_options
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let limit = ["max_tokens", "max_completion_tokens"]
        .iter()
        .filter_map(|k| obj.get(*k).filter(|v| !v.is_null()))
        .next();
    let max_tokens = match limit {
        None => shared.cfg.default_max_tokens,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= u64::from(u32::MAX) => n as u32,
            _ => return Err(bad("max_tokens must be at least 1")),
        },
    };
    if let Some(min) = obj.get("min_tokens").and_then(Value::as_u64) {
        if min > u64::from(max_tokens) {
            return Err(bad(&format!(
                "min_tokens must be less than or equal to max_tokens={max_tokens}, got {min}."
            )));
        }
    }
    let prompt_tokens = estimate_tokens(&prompt);
    let max_len = shared.cfg.max_model_len;
    if prompt_tokens + max_tokens > max_len {
        return Err(bad(&format!(
            "This model's maximum context length is {max_len} tokens. However, you requested \
             {} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion).",
            prompt_tokens + max_tokens
        )));
    }
    let role = pd_role(obj.get("kv_transfer_params"));
    if matches!(role, PdRole::Prefill) && stream {
        return Err(bad("Prefill does not support streaming"));
    }
    Ok(Job {
        prompt,
        prompt_tokens,
        stream,
        include_usage,
        max_tokens,
        ignore_eos: obj
            .get("ignore_eos")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        role,
    })
}

fn completion_prompt(prompt: Option<&Value>) -> Result<String, Rejection> {
    match prompt {
        Some(Value::String(s)) => Ok(s.clone()),
        // A batch of prompts: the simulator answers the first (documented).
        Some(Value::Array(items)) => match items.first() {
            Some(Value::String(s)) => Ok(s.clone()),
            // Token ids: four characters each keeps the chars/4 rule consistent.
            Some(Value::Number(_)) => Ok("tokn".repeat(items.len())),
            _ => Err(reject(StatusCode::BAD_REQUEST, "`prompt` is empty")),
        },
        _ => Err(reject(
            StatusCode::BAD_REQUEST,
            "`prompt` must be a string or a list",
        )),
    }
}

fn chat_prompt(messages: Option<&Value>) -> Result<String, Rejection> {
    let Some(Value::Array(messages)) = messages else {
        return Err(reject(StatusCode::BAD_REQUEST, "`messages` must be a list"));
    };
    let mut prompt = String::new();
    for message in messages {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| reject(StatusCode::BAD_REQUEST, "every message needs a `role`"))?;
        prompt.push_str(role);
        prompt.push_str(": ");
        match message.get("content") {
            Some(Value::String(s)) => prompt.push_str(s),
            Some(Value::Array(parts)) => {
                for part in parts {
                    if let Some(t) = part.get("text").and_then(Value::as_str) {
                        prompt.push_str(t);
                    }
                }
            }
            _ => {}
        }
        prompt.push('\n');
    }
    Ok(prompt)
}

fn pd_role(params: Option<&Value>) -> PdRole {
    let Some(params) = params.and_then(Value::as_object) else {
        return PdRole::Plain;
    };
    let flag = |k: &str| params.get(k).and_then(Value::as_bool).unwrap_or(false);
    if flag("do_remote_decode") {
        return PdRole::Prefill;
    }
    if !flag("do_remote_prefill") {
        return PdRole::Plain;
    }
    let text = |k: &str| {
        params
            .get(k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| format!("`{k}` missing or not a string"))
    };
    let remote = (|| {
        let block_ids = params
            .get("remote_block_ids")
            .and_then(block_ids)
            .ok_or("`remote_block_ids` missing or not a list of block-id lists")?;
        let port = params
            .get("remote_port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or("`remote_port` missing or not a port")?;
        Ok(Remote {
            block_ids,
            engine_id: text("remote_engine_id")?,
            request_id: text("remote_request_id")?,
            host: text("remote_host")?,
            port,
        })
    })();
    PdRole::Decode(remote)
}

/// vLLM sends one list of block ids per KV cache group (`[[1, 2]]`); a flat list (older vLLM,
/// other proxies' tests) is one group.
fn block_ids(value: &Value) -> Option<Vec<u64>> {
    let items = value.as_array()?;
    if items.iter().all(Value::is_u64) {
        return items.iter().map(Value::as_u64).collect();
    }
    let mut ids = Vec::new();
    for group in items {
        for id in group.as_array()? {
            ids.push(id.as_u64()?);
        }
    }
    Some(ids)
}

/// Pulls the remote prefill's blocks; false means the prompt must be recomputed here.
async fn pull(shared: &Shared, remote: &Result<Remote, String>) -> bool {
    let outcome = match remote {
        Err(reason) => Err(format!("invalid kv_transfer_params: {reason}")),
        Ok(r) => {
            let request = PullRequest {
                request_id: r.request_id.clone(),
                engine_id: r.engine_id.clone(),
                block_ids: r.block_ids.clone(),
            };
            sleep(shared.cfg.kv_transfer_latency).await;
            kv::pull(&r.host, r.port, &request, PULL_TIMEOUT)
                .await
                .map_err(|e| e.to_string())
        }
    };
    match outcome {
        Ok(_) => {
            shared.metrics.kv_pulls_ok.fetch_add(1, Relaxed);
            true
        }
        Err(reason) => {
            shared.metrics.kv_pulls_failed.fetch_add(1, Relaxed);
            tracing::warn!(%reason, "KV pull failed; recomputing the prompt locally");
            false
        }
    }
}

fn keep_for_pull(
    shared: &Shared,
    admitted: &mut Admitted,
    request_id: &str,
    number: u64,
    prompt_tokens: u32,
    cached: u32,
) -> Value {
    let blocks = admitted.blocks.take().unwrap_or_default();
    let remote_request_id = format!("{request_id}-{number}");
    // vLLM 0.32's NixlConnector (pull mode) answers exactly these members, its scheduler adds
    // the prefill's own prefix-cache hits; the expiry time is set only on a decode.
    let params = json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_block_ids": [blocks],
        "remote_engine_id": shared.engine_id,
        "remote_request_id": remote_request_id,
        "remote_host": shared.cfg.side_channel_host,
        "remote_port": shared.cfg.side_channel_port,
        "tp_size": shared.cfg.tensor_parallel_size,
        "dcp_size": 1,
        "pp_size": 1,
        "remote_num_tokens": prompt_tokens,
        "remote_blocks_expiry_time": null,
        "transfer_mode": "pull",
        "remote_prefill_cached_tokens": cached,
    });
    shared.pending().insert(
        remote_request_id,
        Pending {
            blocks,
            num_tokens: prompt_tokens,
            expires: Instant::now() + shared.cfg.kv_abort_timeout,
        },
    );
    params
}

/// A running request's slot and blocks; dropping it unfinished is a client abort.
struct Admitted {
    shared: Arc<Shared>,
    blocks: Option<Vec<u32>>,
    finished: bool,
}

impl Admitted {
    fn complete(mut self, finish: &str, generated: usize) {
        self.finished = true;
        let m = &self.shared.metrics;
        m.generation_tokens.fetch_add(generated as u64, Relaxed);
        m.finished(finish);
        let answered = self.shared.answered.fetch_add(1, Relaxed) + 1;
        if self.shared.cfg.crash_after == Some(answered) {
            tokio::spawn(async move {
                // Let the last response reach its client first.
                tokio::time::sleep(Duration::from_millis(100)).await;
                tracing::error!(answered, "--crash-after reached: exiting with status 3");
                std::process::exit(3);
            });
        }
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        {
            let mut engine = self.shared.engine();
            engine.finish_slot();
            if let Some(blocks) = self.blocks.take() {
                engine.free(blocks);
            }
        }
        self.shared.freed.notify_waiters();
        if !self.finished {
            self.shared.metrics.requests_aborted.fetch_add(1, Relaxed);
            self.shared.metrics.finished("abort");
        }
    }
}

/// Counts the request in `vllm:num_requests_waiting` for as long as it waits.
struct Waiting<'a>(&'a Shared);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Relaxed);
    }
}

async fn admit(shared: &Arc<Shared>, tokens: u32) -> Admitted {
    let mut waiting = None;
    loop {
        let notified = shared.freed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(blocks) = shared.engine().try_admit(tokens) {
            drop(waiting);
            return Admitted {
                shared: shared.clone(),
                blocks: Some(blocks),
                finished: false,
            };
        }
        if waiting.is_none() {
            shared.waiting.fetch_add(1, Relaxed);
            waiting = Some(Waiting(shared));
        }
        notified.await;
    }
}

struct Ids {
    api: Api,
    id: String,
    created: u64,
    model: String,
}

impl Ids {
    fn new(api: Api, request_id: &str, shared: &Shared) -> Self {
        let prefix = match api {
            Api::Completions => "cmpl",
            Api::Chat => "chatcmpl",
        };
        Ids {
            api,
            id: format!("{prefix}-{request_id}"),
            created: unix_now(),
            model: shared.cfg.served_model_name.clone(),
        }
    }
}

fn complete_body(ids: &Ids, text: &str, finish: &str, usage: Value, kv: Option<Value>) -> Value {
    match ids.api {
        Api::Completions => json!({
            "id": ids.id, "object": "text_completion", "created": ids.created, "model": ids.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish,
                         "stop_reason": null, "prompt_logprobs": null}],
            "usage": usage,
            "kv_transfer_params": kv,
        }),
        Api::Chat => json!({
            "id": ids.id, "object": "chat.completion", "created": ids.created, "model": ids.model,
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": text, "reasoning_content": null,
                                     "tool_calls": []},
                         "logprobs": null, "finish_reason": finish, "stop_reason": null}],
            "usage": usage,
            "prompt_logprobs": null,
            "kv_transfer_params": kv,
        }),
    }
}

/// Every SSE frame of a streamed answer, in order: (chat: a role frame,) one frame per token
/// (the last carrying `finish_reason`), the usage frame if asked for, and `[DONE]`; with the
/// index of the first token frame.
fn stream_frames(
    ids: &Ids,
    tokens: &[&str],
    finish: &str,
    usage: Option<&Value>,
) -> (Vec<Bytes>, usize) {
    let (object, text_key) = match ids.api {
        Api::Completions => ("text_completion", "text"),
        Api::Chat => ("chat.completion.chunk", "content"),
    };
    let chunk = |choices: Value, usage: Value| {
        let v = json!({"id": ids.id, "object": object, "created": ids.created, "model": ids.model,
                       "choices": choices, "usage": usage});
        Bytes::from(format!("data: {v}\n\n"))
    };
    let choice = |token: &str, finish: Value| match ids.api {
        Api::Completions => json!([{"index": 0, text_key: token, "logprobs": null,
                                    "finish_reason": finish, "stop_reason": null}]),
        Api::Chat => json!([{"index": 0, "delta": {text_key: token}, "logprobs": null,
                             "finish_reason": finish}]),
    };
    let mut frames = Vec::with_capacity(tokens.len() + 3);
    if ids.api == Api::Chat {
        frames.push(chunk(
            json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                    "logprobs": null, "finish_reason": null}]),
            Value::Null,
        ));
    }
    let first_token = frames.len();
    for (i, token) in tokens.iter().enumerate() {
        let last = i + 1 == tokens.len();
        let finish = if last { json!(finish) } else { Value::Null };
        frames.push(chunk(choice(token, finish), Value::Null));
    }
    if let Some(usage) = usage {
        frames.push(chunk(json!([]), usage.clone()));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    (frames, first_token)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
