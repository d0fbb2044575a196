//! What to do when a prefill leg fails: the `fail | retry | fallback` policy of protocol.md
//! Part 1, with llm-d RT's retry rules (502/503/504 and connection errors are retried).

use std::time::Duration;

use http::StatusCode;

use crate::spec::proxy::PrefillFailurePolicy;

/// How a leg failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Connect,
    Timeout,
    Status(StatusCode),
    /// The connection broke mid-response, or the response could not be read.
    Io,
    /// 2xx whose body is not JSON.
    BadResponse,
}

impl Failure {
    pub fn kind(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Timeout => "timeout",
            Failure::Status(_) => "status",
            Failure::Io => "io",
            Failure::BadResponse => "bad_response",
        }
    }

    fn retryable(self) -> bool {
        match self {
            Failure::Connect => true,
            Failure::Status(s) => matches!(s.as_u16(), 502..=504),
            _ => false,
        }
    }

    /// A client error (4xx) would fail on decode too: never fall back on it.
    fn client_error(self) -> bool {
        matches!(self, Failure::Status(s) if s.is_client_error())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Retry(Duration),
    Fail,
    Fallback,
}

/// `attempt` counts from 0 (the first try). Backoff doubles per retry, capped at 32× the base.
pub fn decide(
    policy: PrefillFailurePolicy,
    failure: Failure,
    attempt: u32,
    max_retries: u32,
    backoff: Duration,
) -> Decision {
    let may_retry =
        policy != PrefillFailurePolicy::Fail && failure.retryable() && attempt < max_retries;
    if may_retry {
        return Decision::Retry(backoff * 2u32.pow(attempt.min(5)));
    }
    if policy == PrefillFailurePolicy::Fallback && !failure.client_error() {
        Decision::Fallback
    } else {
        Decision::Fail
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use PrefillFailurePolicy::*;

    const B: Duration = Duration::from_millis(10);

    fn st(s: u16) -> Failure {
        Failure::Status(StatusCode::from_u16(s).unwrap())
    }

    /// §12 cases 21-24 (RT's retry option).
    #[test]
    fn retry_policy() {
        for s in [502, 503, 504] {
            assert_eq!(decide(Retry, st(s), 0, 2, B), Decision::Retry(B));
            assert_eq!(decide(Retry, st(s), 1, 2, B), Decision::Retry(B * 2));
            assert_eq!(decide(Retry, st(s), 2, 2, B), Decision::Fail);
        }
        assert_eq!(decide(Retry, st(502), 0, 0, B), Decision::Fail);
        assert_eq!(decide(Retry, st(500), 0, 2, B), Decision::Fail);
        assert_eq!(decide(Retry, Failure::Connect, 0, 1, B), Decision::Retry(B));
        assert_eq!(decide(Retry, Failure::Timeout, 0, 1, B), Decision::Fail);
    }

    #[test]
    fn fail_policy_never_retries() {
        assert_eq!(decide(Fail, st(503), 0, 5, B), Decision::Fail);
        assert_eq!(decide(Fail, Failure::Connect, 0, 5, B), Decision::Fail);
    }

    #[test]
    fn fallback_policy_retries_then_falls_back_but_not_on_4xx() {
        assert_eq!(decide(Fallback, st(503), 0, 1, B), Decision::Retry(B));
        assert_eq!(decide(Fallback, st(503), 1, 1, B), Decision::Fallback);
        assert_eq!(decide(Fallback, st(500), 0, 1, B), Decision::Fallback);
        assert_eq!(
            decide(Fallback, Failure::Timeout, 0, 1, B),
            Decision::Fallback
        );
        assert_eq!(
            decide(Fallback, Failure::BadResponse, 0, 1, B),
            Decision::Fallback
        );
        assert_eq!(decide(Fallback, st(400), 0, 1, B), Decision::Fail);
        assert_eq!(decide(Fallback, st(429), 0, 1, B), Decision::Fail);
    }

    #[test]
    fn backoff_is_capped() {
        assert_eq!(decide(Retry, st(502), 9, 20, B), Decision::Retry(B * 32));
    }
}
