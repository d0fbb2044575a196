//! The NIXL-v2 exchange: prefill first (one token, `kv_transfer_params` asked for), then decode
//! with the prefill's params verbatim, streamed back. Failure policy and retries live here.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use crate::spec::proxy::{PickPolicy, PrefillFailurePolicy};
use crate::spec::Role;

use super::json::Object;
use super::metrics::PathTaken;
use super::pick::{InFlight, Upstream};
use super::relay;
use super::respond::{error, full, respond, Body};
use super::rewrite::{
    decode_body, estimate_prompt_tokens, prefill_body, prefix_key, read_prefill, rewrite_json_body,
    Api, PrefillResult,
};
use super::sse::SseUsageRewriter;
use super::state::{PrefillChoice, Proxy};
use super::upstream::{
    self, clean_response_headers, Failure, PooledBody, UpstreamClient, PREFILLER_HEADER,
};

/// Response header naming the path a request took: `pd`, `decode_only` or `fallback`.
pub const PATH_HEADER: &str = "x-pdctl-path";
/// Characters of the prompt that identify its prefix for decode affinity (≈ 4 blocks of 16).
const PREFIX_CHARS: usize = 256;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

fn route_name(api: Api) -> &'static str {
    match api {
        Api::Completions => "completions",
        Api::Chat => "chat_completions",
        Api::Responses => "responses",
    }
}

pub struct DecodeLeg {
    pub route: &'static str,
    pub path: PathTaken,
    /// The prefill's cached-token count to show the client instead of the decode's.
    pub cached_tokens: Option<u64>,
    pub prefix: Option<u64>,
    pub start: Instant,
}

enum Choice {
    Prefill(Arc<Upstream>),
    DecodeOnly,
    Refuse(Response<Body>),
}

enum Prefilled {
    Ok(PrefillResult),
    Fallback,
    Respond(Response<Body>),
}

pub async fn handle(
    proxy: Arc<Proxy>,
    engines: &UpstreamClient,
    parts: Parts,
    body: Bytes,
    api: Api,
    start: Instant,
) -> Response<Body> {
    let route = route_name(api);
    let client = match Object::parse(&body) {
        Ok(object) => object,
        Err(_) => {
            proxy.count(route, StatusCode::BAD_REQUEST, PathTaken::Local);
            return error(
                StatusCode::BAD_REQUEST,
                "the request body is not a JSON object",
            );
        }
    };
    let request_id = client_request_id(&parts.headers).unwrap_or_else(|| proxy.request_id());
    let prefix = (proxy.cfg.section.decode_policy == PickPolicy::PrefixAffinity)
        .then(|| prefix_key(&client, api, PREFIX_CHARS))
        .flatten();
    let leg = |path, cached_tokens| DecodeLeg {
        route,
        path,
        cached_tokens,
        prefix,
        start,
    };
    let first = match choose_prefill(&proxy, &parts.headers, &client, api) {
        Choice::Prefill(target) => target,
        Choice::DecodeOnly => {
            return to_decode(
                proxy,
                engines,
                &parts,
                body,
                &request_id,
                leg(PathTaken::DecodeOnly, None),
            )
            .await
        }
        Choice::Refuse(response) => {
            proxy.count(route, response.status(), PathTaken::Local);
            return response;
        }
    };
    let prefill = Bytes::from(prefill_body(&client, api));
    match run_prefill(&proxy, engines, &parts, prefill, &request_id, first, route).await {
        Prefilled::Ok(result) => {
            if result.kv_transfer_params.is_none() {
                tracing::warn!(%request_id, "prefill returned no kv_transfer_params; the decode will recompute the prompt");
            }
            let decode = Bytes::from(decode_body(&client, result.kv_transfer_params.as_deref()));
            let cached = Some(result.cached_tokens);
            to_decode(
                proxy,
                engines,
                &parts,
                decode,
                &request_id,
                leg(PathTaken::Pd, cached),
            )
            .await
        }
        Prefilled::Fallback => {
            proxy.metrics.fallbacks.inc();
            tracing::warn!(%request_id, "prefill leg failed; serving decode-only (fallback policy)");
            to_decode(
                proxy,
                engines,
                &parts,
                body,
                &request_id,
                leg(PathTaken::Fallback, None),
            )
            .await
        }
        Prefilled::Respond(mut response) => {
            proxy.count(route, response.status(), PathTaken::Pd);
            mark(response.headers_mut(), &request_id, PathTaken::Pd);
            response
        }
    }
}

fn choose_prefill(proxy: &Proxy, headers: &HeaderMap, client: &Object<'_>, api: Api) -> Choice {
    let threshold = u64::from(proxy.cfg.section.pd_threshold_tokens);
    if threshold > 0 && estimate_prompt_tokens(client, api) < threshold {
        return Choice::DecodeOnly;
    }
    match proxy.choose_prefill(header_target(headers)) {
        PrefillChoice::Target(target) => Choice::Prefill(target),
        PrefillChoice::DecodeOnly => Choice::DecodeOnly,
        PrefillChoice::NoneReady => Choice::Refuse(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no ready prefill endpoint",
        )),
        PrefillChoice::Forbidden => Choice::Refuse(respond(
            StatusCode::FORBIDDEN,
            "text/plain; charset=utf-8",
            Bytes::from_static(b"Forbidden: prefill target not allowed by SSRF protection"),
        )),
    }
}

/// llm-d's rules: one header line is split on commas, several lines are one candidate each; the
/// first non-empty candidate wins; a leading `http://` is accepted.
fn header_target(headers: &HeaderMap) -> Option<String> {
    let values: Vec<&str> = headers
        .get_all(PREFILLER_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let candidates: Vec<&str> = match values.as_slice() {
        [one] => one.split(',').collect(),
        many => many.to_vec(),
    };
    candidates
        .into_iter()
        .map(|c| c.trim().trim_start_matches("http://").trim_end_matches('/'))
        .find(|c| !c.is_empty())
        .map(str::to_string)
}

enum LastFailure {
    Transport(Failure),
    Status(StatusCode, HeaderMap, Bytes),
}

fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 502..=504)
}

async fn run_prefill(
    proxy: &Arc<Proxy>,
    engines: &UpstreamClient,
    parts: &Parts,
    body: Bytes,
    request_id: &str,
    first: Arc<Upstream>,
    route: &'static str,
) -> Prefilled {
    let section = &proxy.cfg.section;
    let policy = section.prefill_failure;
    let attempts = match policy {
        PrefillFailurePolicy::Fail => 1,
        _ => 1 + section.prefill_max_retries,
    };
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut tried: Vec<String> = Vec::new();
    let mut target = first;
    let mut last = LastFailure::Transport(Failure::Connect);
    for attempt in 0..attempts {
        if attempt > 0 {
            proxy.metrics.retries.inc();
            let backoff = section
                .prefill_retry_backoff
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(MAX_BACKOFF);
            tokio::time::sleep(backoff).await;
            if let Some(other) = proxy.another_prefill(&tried) {
                target = other;
            }
        }
        tried.push(target.endpoint.url.clone());
        let _in_flight = proxy.in_flight(Role::Prefill, target.clone());
        let started = Instant::now();
        let request = upstream::build(
            parts.method.clone(),
            &target.authority,
            path_and_query,
            &parts.headers,
            request_id,
            body.clone(),
        );
        // One deadline for the whole leg, head and body: a second timer around the head alone
        // would cost a timer-wheel entry per request and decide nothing.
        let exchange = async {
            let response = engines.request(&target.authority, request).await?;
            let (head, body) = response.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|_| Failure::Transport)?
                .to_bytes();
            Ok::<_, Failure>((head.status, head.headers, bytes))
        };
        let outcome = tokio::time::timeout(section.prefill_timeout, exchange)
            .await
            .unwrap_or(Err(Failure::Timeout));
        proxy
            .metrics
            .prefill_seconds
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            Err(failure) => {
                proxy.metrics.error("prefill", failure.kind());
                tracing::warn!(target = %target.endpoint.url, kind = failure.kind(), attempt, "prefill leg failed");
                last = LastFailure::Transport(failure);
            }
            Ok((status, _, bytes)) if status.is_success() => {
                return match read_prefill(&bytes) {
                    Some(answer) => Prefilled::Ok(answer),
                    None => {
                        proxy.metrics.error("prefill", "bad_response");
                        Prefilled::Respond(error(
                            StatusCode::BAD_REQUEST,
                            "the prefill engine answered with a body that is not JSON",
                        ))
                    }
                };
            }
            Ok((status, headers, bytes)) => {
                proxy.metrics.error("prefill", "status");
                tracing::warn!(target = %target.endpoint.url, %status, attempt, route, "prefill leg answered an error");
                if !retryable(status) {
                    if policy == PrefillFailurePolicy::Fallback && status.is_server_error() {
                        return Prefilled::Fallback;
                    }
                    return Prefilled::Respond(pass_on(status, &headers, bytes));
                }
                last = LastFailure::Status(status, headers, bytes);
            }
        }
    }
    if policy == PrefillFailurePolicy::Fallback {
        return Prefilled::Fallback;
    }
    Prefilled::Respond(match last {
        LastFailure::Status(status, headers, bytes) => pass_on(status, &headers, bytes),
        LastFailure::Transport(Failure::Timeout) => error(
            StatusCode::GATEWAY_TIMEOUT,
            &format!(
                "the prefill leg timed out after {:?}",
                section.prefill_timeout
            ),
        ),
        LastFailure::Transport(kind) => error(
            StatusCode::BAD_GATEWAY,
            &format!("the prefill engine could not be reached ({})", kind.kind()),
        ),
    })
}

/// An engine's own error answer, relayed to the client as it was.
fn pass_on(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Response<Body> {
    let content_type = headers.get(header::CONTENT_TYPE).cloned();
    let mut response = respond(status, "application/json", body);
    if let Some(ct) = content_type {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response
}

/// The client's own `X-Request-Id`, when it sent one: both legs and the answer carry it.
pub fn client_request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

fn mark(headers: &mut HeaderMap, request_id: &str, path: PathTaken) {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert("x-request-id", v);
    }
    headers.insert(PATH_HEADER, HeaderValue::from_static(path.as_str()));
}

/// Sends `body` to a ready decode and relays its answer. A decode that cannot be connected to
/// is replaced by another ready one: nothing has reached the client yet.
pub async fn to_decode(
    proxy: Arc<Proxy>,
    engines: &UpstreamClient,
    parts: &Parts,
    body: Bytes,
    request_id: &str,
    leg: DecodeLeg,
) -> Response<Body> {
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let timeout = proxy.cfg.section.decode_first_byte_timeout;
    let mut tried: Vec<String> = Vec::new();
    loop {
        let exclude: Vec<&str> = tried.iter().map(String::as_str).collect();
        let Some(target) = proxy.pick(Role::Decode, &exclude, leg.prefix) else {
            let message = if tried.is_empty() {
                "no ready decode endpoint"
            } else {
                "The decode node is not ready. Please check that the vLLM service is running and the port configuration is correct."
            };
            proxy.count(leg.route, StatusCode::SERVICE_UNAVAILABLE, leg.path);
            let mut response = error(StatusCode::SERVICE_UNAVAILABLE, message);
            mark(response.headers_mut(), request_id, leg.path);
            return response;
        };
        tried.push(target.endpoint.url.clone());
        let in_flight = proxy.in_flight(Role::Decode, target.clone());
        let request = upstream::build(
            parts.method.clone(),
            &target.authority,
            path_and_query,
            &parts.headers,
            request_id,
            body.clone(),
        );
        match upstream::send(engines, &target.authority, request, timeout).await {
            Ok(answer) => {
                proxy
                    .metrics
                    .first_byte_seconds
                    .observe(leg.start.elapsed().as_secs_f64());
                let status = answer.status();
                let cached = leg.cached_tokens.filter(|_| status.is_success());
                let format = Format::of(answer.headers());
                let rewrite_json = cached.filter(|_| format == Format::Json);
                let mut response = match answer_kind(answer.headers(), format, rewrite_json) {
                    Answer::Json => buffered(&proxy, answer, rewrite_json, &leg, in_flight).await,
                    Answer::Stream => {
                        let event_stream = format == Format::EventStream;
                        let rewrite = cached.filter(|_| event_stream).map(SseUsageRewriter::new);
                        proxy.count(leg.route, status, leg.path);
                        relay::to_client(
                            &proxy,
                            answer,
                            event_stream,
                            rewrite,
                            leg.start,
                            vec![in_flight],
                        )
                    }
                };
                mark(response.headers_mut(), request_id, leg.path);
                return response;
            }
            Err(Failure::Connect) => {
                proxy.metrics.error("decode", "connect");
                tracing::warn!(target = %target.endpoint.url, "decode unreachable; trying another");
                proxy.metrics.retries.inc();
            }
            Err(failure) => {
                proxy.metrics.error("decode", failure.kind());
                let (status, message) = match failure {
                    Failure::Timeout => (
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("the decode engine sent nothing within {timeout:?}"),
                    ),
                    _ => (
                        StatusCode::BAD_GATEWAY,
                        "the decode engine failed before answering".to_string(),
                    ),
                };
                proxy.count(leg.route, status, leg.path);
                let mut response = error(status, &message);
                mark(response.headers_mut(), request_id, leg.path);
                return response;
            }
        }
    }
}

/// Answers bigger than this, or of unknown length, are relayed frame by frame...
const MAX_BUFFERED: u64 = 1 << 20;
/// ...unless their usage must be rewritten, which needs the whole JSON document.
const MAX_REWRITTEN: usize = 64 << 20;

enum Answer {
    /// Complete only at its end and small (a non-streaming completion): collected, rewritten
    /// once and sent with its head in one write.
    Json,
    /// Relayed as it arrives, never held back.
    Stream,
}

fn answer_kind(headers: &HeaderMap, format: Format, rewrite_json: Option<u64>) -> Answer {
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        _ if rewrite_json.is_some() => Answer::Json,
        Some(n) if n <= MAX_BUFFERED && format != Format::EventStream => Answer::Json,
        _ => Answer::Stream,
    }
}

/// An answer's content type, as far as the relay cares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    EventStream,
    Other,
}

impl Format {
    fn of(headers: &HeaderMap) -> Format {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if content_type.starts_with("application/json") {
            Format::Json
        } else if content_type.starts_with("text/event-stream") {
            Format::EventStream
        } else {
            Format::Other
        }
    }
}

/// Collects a complete answer, rewrites its usage when `cached` is set, and answers with a fixed
/// length. A decode that breaks off mid-body is a 502 instead of a truncated answer.
async fn buffered(
    proxy: &Arc<Proxy>,
    answer: Response<PooledBody>,
    cached: Option<u64>,
    leg: &DecodeLeg,
    in_flight: InFlight,
) -> Response<Body> {
    let (mut parts, body) = answer.into_parts();
    let bytes = match Limited::new(body, MAX_REWRITTEN).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            proxy.metrics.error("decode", "transport");
            proxy.count(leg.route, StatusCode::BAD_GATEWAY, leg.path);
            return error(
                StatusCode::BAD_GATEWAY,
                "the decode engine's answer broke off",
            );
        }
    };
    drop(in_flight);
    let bytes = match cached {
        Some(cached) => rewrite_json_body(&bytes, cached)
            .map(Bytes::from)
            .unwrap_or(bytes),
        None => bytes,
    };
    clean_response_headers(&mut parts.headers);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    proxy.count(leg.route, parts.status, leg.path);
    proxy
        .metrics
        .request_seconds
        .observe(leg.start.elapsed().as_secs_f64());
    Response::from_parts(parts, full(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(PREFILLER_HEADER, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn header_parsing_follows_llm_d() {
        assert_eq!(header_target(&headers(&[])), None);
        assert_eq!(header_target(&headers(&["a:1"])).as_deref(), Some("a:1"));
        assert_eq!(
            header_target(&headers(&["a:1,b:2"])).as_deref(),
            Some("a:1")
        );
        assert_eq!(
            header_target(&headers(&[" a:1 , b:2"])).as_deref(),
            Some("a:1")
        );
        assert_eq!(
            header_target(&headers(&["a:1", "b:2"])).as_deref(),
            Some("a:1")
        );
        assert_eq!(
            header_target(&headers(&["http://a:1"])).as_deref(),
            Some("a:1")
        );
        assert_eq!(header_target(&headers(&[""])), None);
        assert_eq!(header_target(&headers(&["", ""])), None);
    }

    #[test]
    fn only_gateway_errors_are_retried() {
        for s in [502, 503, 504] {
            assert!(retryable(StatusCode::from_u16(s).unwrap()));
        }
        for s in [400, 404, 500, 501] {
            assert!(!retryable(StatusCode::from_u16(s).unwrap()));
        }
    }
}
