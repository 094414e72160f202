//! The answers the layer makes itself: RFC 9457 `application/problem+json`.

use std::time::Duration;

use crate::response::StoredResponse;

/// The start of every problem `type` URI this crate writes.
pub(crate) const TYPE_PREFIX: &str = "urn:idempotency-rs:problem:";

/// One kind of answer the idempotency layer gives on its own, without running the handler.
/// Each has a stable `type` URI (`urn:idempotency-rs:problem:<slug>`), an HTTP status and a
/// title; the `detail` tells the client what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// 400 `key-missing`: the route requires an `Idempotency-Key` and none was sent.
    KeyMissing,
    /// 400 `key-invalid`: the key is empty, too long, not printable ASCII, a malformed quoted
    /// string, or not a UUID under the UUID policy.
    KeyInvalid,
    /// 400 `key-repeated`: the `Idempotency-Key` header was sent more than once.
    KeyRepeated,
    /// 400 `scope-missing`: the scope extractor found no tenant/user for the request.
    ScopeMissing,
    /// 400 `scope-invalid`: the request names a tenant/user that cannot be a scope (over 1024
    /// bytes, or holding a NUL byte).
    ScopeInvalid,
    /// 413 `body-too-large`: the request body is over the configured limit.
    BodyTooLarge,
    /// 422 `key-reused`: the key was used before with a different request.
    KeyReused,
    /// 409 `request-in-flight`: the first request with this key is still running.
    InFlight,
    /// 503 `store-unavailable`: the idempotency store is closed, overloaded or failing; the
    /// request was not run.
    StoreUnavailable,
    /// 410 `response-not-stored`: the operation ran, but its response was larger than the
    /// store limit and cannot be replayed.
    ResponseNotStored,
}

impl ProblemKind {
    /// The HTTP status.
    pub fn status(self) -> u16 {
        match self {
            ProblemKind::KeyMissing
            | ProblemKind::KeyInvalid
            | ProblemKind::KeyRepeated
            | ProblemKind::ScopeMissing
            | ProblemKind::ScopeInvalid => 400,
            ProblemKind::BodyTooLarge => 413,
            ProblemKind::KeyReused => 422,
            ProblemKind::InFlight => 409,
            ProblemKind::StoreUnavailable => 503,
            ProblemKind::ResponseNotStored => 410,
        }
    }

    /// The stable slug at the end of the `type` URI.
    pub fn slug(self) -> &'static str {
        match self {
            ProblemKind::KeyMissing => "key-missing",
            ProblemKind::KeyInvalid => "key-invalid",
            ProblemKind::KeyRepeated => "key-repeated",
            ProblemKind::ScopeMissing => "scope-missing",
            ProblemKind::ScopeInvalid => "scope-invalid",
            ProblemKind::BodyTooLarge => "body-too-large",
            ProblemKind::KeyReused => "key-reused",
            ProblemKind::InFlight => "request-in-flight",
            ProblemKind::StoreUnavailable => "store-unavailable",
            ProblemKind::ResponseNotStored => "response-not-stored",
        }
    }

    /// The `type` URI.
    pub fn type_uri(self) -> String {
        format!("{TYPE_PREFIX}{}", self.slug())
    }

    /// The short, fixed title.
    pub fn title(self) -> &'static str {
        match self {
            ProblemKind::KeyMissing => "Idempotency-Key header required",
            ProblemKind::KeyInvalid => "Invalid Idempotency-Key",
            ProblemKind::KeyRepeated => "Idempotency-Key header sent more than once",
            ProblemKind::ScopeMissing => "Request scope missing",
            ProblemKind::ScopeInvalid => "Request scope invalid",
            ProblemKind::BodyTooLarge => "Request body too large",
            ProblemKind::KeyReused => "Idempotency-Key reused with a different request",
            ProblemKind::InFlight => "A request with this Idempotency-Key is in progress",
            ProblemKind::StoreUnavailable => "Idempotency store unavailable",
            ProblemKind::ResponseNotStored => "Original response not available",
        }
    }
}

/// A problem answer: kind, detail, and for 409/503 a `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What went wrong.
    pub kind: ProblemKind,
    /// What the client should do, in words.
    pub detail: String,
    /// Seconds for the `Retry-After` header (at least 1), when retrying makes sense.
    pub retry_after: Option<u64>,
}

impl Problem {
    /// A problem with a detail and no `Retry-After`.
    pub fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Problem {
            kind,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// Adds a `Retry-After`, rounded up to whole seconds and at least 1.
    pub fn retry_after(mut self, after: Duration) -> Self {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        self.retry_after = Some(secs.max(1));
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        let mut doc = serde_json::json!({
            "type": self.kind.type_uri(),
            "title": self.kind.title(),
            "status": self.kind.status(),
            "detail": self.detail,
        });
        if let Some(secs) = self.retry_after {
            doc["retry_after"] = secs.into();
        }
        serde_json::to_vec(&doc).unwrap_or_default()
    }

    /// The full response: status, `Content-Type: application/problem+json`, `Retry-After` when
    /// set, and the body.
    pub fn to_response(&self) -> StoredResponse {
        let mut r = StoredResponse::new(self.status(), self.body())
            .with_header("content-type", "application/problem+json");
        if let Some(secs) = self.retry_after {
            r = r.with_header("retry-after", secs.to_string());
        }
        r
    }
}
