//! The demo (`demo = true`): a page with a live feed and a chat at `/demo`, using the
//! JS client served at `/herald.js`. Both are compiled in from `clients/js`, so the
//! page always speaks this build's protocol.

use hyper::header::{self, HeaderValue};
use hyper::Response;

use super::reply::{full, Body};

const PAGE: &str = include_str!("../../../../clients/js/demo/index.html");
const CLIENT: &str = include_str!("../../../../clients/js/dist/herald.js");

fn typed(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(full(body));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(crate) fn page() -> Response<Body> {
    typed(PAGE, "text/html; charset=utf-8")
}

pub(crate) fn client_js() -> Response<Body> {
    typed(CLIENT, "application/javascript; charset=utf-8")
}
