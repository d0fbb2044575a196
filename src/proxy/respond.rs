//! Answers the proxy writes itself: the body type every response shares, local answers and
//! vLLM-shaped errors. Depends on nothing else in the proxy.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(body: Bytes) -> Body {
    Full::new(body).map_err(|never| match never {}).boxed()
}

pub fn respond(status: StatusCode, content_type: &'static str, body: Bytes) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// vLLM's error body: `{"error":{"message","type","param","code"}}`.
pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    let kind = match status.as_u16() {
        400 | 413 => "BadRequestError",
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        405 => "MethodNotAllowed",
        502 => "BadGateway",
        503 => "ServiceUnavailable",
        504 => "GatewayTimeout",
        _ => "InternalServerError",
    };
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}
    });
    respond(status, "application/json", Bytes::from(body.to_string()))
}
