//! [`Client`]: a WebSocket client whose expectations time out instead of hanging.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::http::WAIT;

/// A WebSocket client.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The welcome frame.
    pub welcome: Value,
    next_id: u64,
}

/// How the server ended a session, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The close code, if a close frame arrived.
    pub code: Option<u16>,
    /// Its reason text.
    pub reason: String,
}

impl Client {
    /// Connects and reads the welcome frame.
    pub async fn connect(url: &str) -> Result<Client, tungstenite::Error> {
        let (ws, _resp) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .map_err(|_| tungstenite::Error::Io(std::io::ErrorKind::TimedOut.into()))??;
        Ok(Client::from_stream(ws).await)
    }

    /// Wraps a WebSocket the test opened itself (e.g. with extra request headers) and
    /// reads its welcome frame.
    pub async fn from_stream(ws: WebSocketStream<MaybeTlsStream<TcpStream>>) -> Client {
        let mut c = Client {
            ws,
            welcome: Value::Null,
            next_id: 1,
        };
        c.welcome = c.recv_json().await;
        assert_eq!(c.welcome["op"], "welcome", "first frame: {}", c.welcome);
        c
    }

    /// Connects over a socket with a small receive buffer, so that a client that stops
    /// reading backs up into the server quickly (slow-consumer tests).
    pub async fn connect_with_small_buffer(addr: SocketAddr) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("connect");
        let url = format!("ws://{addr}/ws");
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .expect("upgrade");
        let mut c = Client {
            ws,
            welcome: Value::Null,
            next_id: 1,
        };
        c.welcome = c.recv_json().await;
        c
    }

    /// Sends a text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.into()))
            .await
            .expect("send text");
    }

    /// Sends a JSON value as a text frame.
    pub async fn send_json(&mut self, v: &Value) {
        self.send_text(&v.to_string()).await;
    }

    /// Sends a binary frame.
    pub async fn send_binary(&mut self, b: Vec<u8>) {
        self.ws
            .send(Message::Binary(b.into()))
            .await
            .expect("send binary");
    }

    /// The next data frame (pings and pongs skipped); panics on close or timeout.
    pub async fn recv(&mut self) -> Message {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a frame within the wait")
                .expect("stream still open")
                .expect("no protocol error");
            match msg {
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Close(f) => panic!("unexpected close: {f:?}"),
                m => return m,
            }
        }
    }

    /// The next frame, parsed as JSON.
    pub async fn recv_json(&mut self) -> Value {
        match self.recv().await {
            Message::Text(t) => serde_json::from_str(&t).expect("server sent JSON"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next binary frame.
    pub async fn recv_binary(&mut self) -> Bytes {
        match self.recv().await {
            Message::Binary(b) => b,
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }

    /// Sends `{"op":op, "channel":channel, "id":N}` and returns the reply.
    pub async fn request(&mut self, op: &str, channel: &str) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send_json(&json!({"op": op, "channel": channel, "id": id}))
            .await;
        let reply = self.recv_json().await;
        assert_eq!(reply["id"], id, "reply to request {id}: {reply}");
        reply
    }

    /// Subscribes and asserts the acknowledgement.
    pub async fn subscribe(&mut self, channel: &str) {
        let r = self.request("subscribe", channel).await;
        assert_eq!(r["op"], "subscribed", "{r}");
    }

    /// Subscribes, resuming after `since` (offset, epoch) when given, and returns the
    /// `subscribed` reply (panics on anything else).
    pub async fn subscribe_since(&mut self, channel: &str, since: Option<(u64, &str)>) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"op": "subscribe", "channel": channel, "id": id, "recover": true});
        if let Some((offset, epoch)) = since {
            req["since"] = json!({"offset": offset, "epoch": epoch});
        }
        self.send_json(&req).await;
        let reply = self.recv_json().await;
        assert_eq!(reply["op"], "subscribed", "{reply}");
        assert_eq!(reply["id"], id, "{reply}");
        reply
    }

    /// The next `n` text frames, each asserted to be a `message` (or, where the server
    /// said so, a `reset`: those are returned too).
    pub async fn messages(&mut self, n: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let v = self.recv_json().await;
            assert!(
                v["op"] == "message" || v["op"] == "reset",
                "not a delivery: {v}"
            );
            out.push(v);
        }
        out
    }

    /// Reads until the server closes; returns the close code and reason. Data frames
    /// before the close are counted in the second value.
    pub async fn closed(&mut self) -> (Closed, usize) {
        let mut frames = 0;
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("the server closed within the wait")
            {
                Some(Ok(Message::Close(f))) => {
                    let (code, reason) = f
                        .map_or((None, String::new()), |CloseFrame { code, reason }| {
                            (Some(u16::from(code)), reason.to_string())
                        });
                    return (Closed { code, reason }, frames);
                }
                Some(Ok(Message::Text(_) | Message::Binary(_))) => frames += 1,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    return (
                        Closed {
                            code: None,
                            reason: String::new(),
                        },
                        frames,
                    )
                }
            }
        }
    }

    /// Asserts that no data frame arrives for `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return,
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                Ok(other) => panic!("expected silence, got {other:?}"),
            }
        }
    }

    /// Closes the connection normally.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        // Read until the server's reply so the session really ended.
        while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, self.ws.next()).await {}
    }

    /// The underlying stream, for tests that need raw control.
    pub fn ws(&mut self) -> &mut WebSocketStream<MaybeTlsStream<TcpStream>> {
        &mut self.ws
    }
}
