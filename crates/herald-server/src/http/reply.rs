//! HTTP responses: JSON bodies (from `herald_protocol::api`) with their status codes.

use bytes::Bytes;
use herald_protocol::{api, ErrorCode};
use std::convert::Infallible;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

/// Every response body: whole (JSON, metrics) or streamed (SSE).
pub(crate) type Body = BoxBody<Bytes, Infallible>;

/// A body sent whole.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A request the gateway refuses: status, code and message, rendered as the API's
/// error body.
#[derive(Debug)]
pub(crate) struct Refusal {
    /// The HTTP status.
    pub(crate) status: StatusCode,
    /// The error code in the JSON body (the same names as error frames).
    pub(crate) code: ErrorCode,
    /// What the client should know, in words; never internals.
    pub(crate) message: String,
    /// For a 405: the methods the resource takes (the `Allow` header RFC 9110 asks
    /// for).
    pub(crate) allow: Option<&'static str>,
    /// For a refusal by the application's backend (`refused`): its code.
    pub(crate) hook_code: Option<i64>,
}

impl Refusal {
    pub(crate) fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            status,
            code,
            message: message.into(),
            allow: None,
            hook_code: None,
        }
    }

    /// The application's backend (a hook) refused with `hook_code`: `refused`.
    pub(crate) fn by_hook(status: StatusCode, hook_code: i64, message: impl Into<String>) -> Self {
        Refusal {
            hook_code: Some(hook_code),
            ..Refusal::new(status, ErrorCode::Refused, message)
        }
    }

    /// A refused request body: the status follows from the code.
    pub(crate) fn body(e: api::BodyError) -> Self {
        let status = match e.code {
            ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::BAD_REQUEST,
        };
        Refusal::new(status, e.code, e.message)
    }

    /// `405 method_not_allowed`, with `Allow: allow`.
    pub(crate) fn method_not_allowed(allow: &'static str) -> Self {
        Refusal {
            allow: Some(allow),
            ..Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                format!("use {allow}"),
            )
        }
    }

    /// `404 not_found`.
    pub(crate) fn not_found() -> Self {
        Refusal::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such endpoint",
        )
    }

    pub(crate) fn into_response(self) -> Response<Body> {
        let body = match self.hook_code {
            Some(code) => api::refused(code, &self.message),
            None => api::error(self.code, &self.message),
        };
        let mut r = json(self.status, body);
        if let Some(allow) = self.allow {
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        r
    }
}
