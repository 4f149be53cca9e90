//! [`SseClient`]: a Server-Sent Events client that reads events as a browser would.

use bytes::Bytes;
use serde_json::Value;
use std::net::SocketAddr;
use tokio::net::TcpStream;

use crate::http::WAIT;

/// One Server-Sent Event.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    /// `id:`, if the event had one.
    pub id: Option<String>,
    /// `event:`, if named.
    pub event: Option<String>,
    /// The `data:` lines joined with "\n".
    pub data: String,
}

impl SseEvent {
    /// `data` as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {}", self.data))
    }
}

/// A Server-Sent Events client over a real HTTP/1.1 connection.
pub struct SseClient {
    /// The response status.
    pub status: u16,
    /// The response headers.
    pub headers: hyper::HeaderMap,
    body: hyper::body::Incoming,
    buf: String,
}

impl SseClient {
    /// `GET path` (with its query) on `addr`, with extra headers.
    pub async fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .expect("handshake");
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .uri(path)
            .header("host", addr.to_string())
            .header("accept", "text/event-stream");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .expect("a response within the wait")
            .expect("a response");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        SseClient {
            status,
            headers,
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next block of the stream as written (an event, a comment or a `retry:`),
    /// or `None` when the stream ended.
    pub async fn next_block(&mut self) -> Option<String> {
        use http_body_util::BodyExt;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block = self.buf[..end].to_owned();
                self.buf.drain(..end + 2);
                return Some(block);
            }
            let frame = tokio::time::timeout(WAIT, self.body.frame())
                .await
                .expect("an SSE block within the wait");
            match frame {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf
                            .push_str(std::str::from_utf8(&data).expect("UTF-8"));
                    }
                }
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next event with data (comments and `retry:` skipped), or `None` at the end.
    pub async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            let block = self.next_block().await?;
            let mut e = SseEvent::default();
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("data: ") {
                    data.push(v);
                } else if let Some(v) = line.strip_prefix("id: ") {
                    e.id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    e.event = Some(v.to_owned());
                }
            }
            if !data.is_empty() {
                e.data = data.join("\n");
                return Some(e);
            }
        }
    }

    /// The next event, asserted to exist.
    pub async fn event(&mut self) -> SseEvent {
        self.next_event().await.expect("the stream ended")
    }
}
