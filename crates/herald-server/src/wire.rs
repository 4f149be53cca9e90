//! What a session sends, as WebSocket frames that Herald frames and writes itself.
//!
//! tungstenite reads (and validates) everything a client sends; what the server sends is
//! framed here, with tungstenite's own [`FrameHeader`], and written by the session's
//! writer through [`WsSink`]. Framing our own frames is what lets a *run* of deliveries
//! (consecutive publications of one plain channel, see `hub`) be framed once into one
//! buffer that every subscriber shares: one queue entry, one reference count and one
//! contiguous write per subscriber per run, where tungstenite's `Sink` takes, frames and
//! copies every message for every subscriber.
//!
//! tungstenite's own replies are not used: it answers pings and closes by writing into
//! [`ReadHalf`], which throws them away. The session answers instead, through its queue,
//! so the answers are ordered with everything else it sends, share its budget, and are
//! never written after its close frame.

use std::collections::VecDeque;
use std::io::{Cursor, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_util::Sink;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

/// One entry of a session's outbound queue, as its writer's sink takes it.
#[derive(Clone, Debug)]
pub(crate) enum Out {
    /// One message, framed by the sink.
    Message(Message),
    /// Complete WebSocket frames, framed once ([`Frames`]) and shared by every
    /// subscriber they go to.
    Frames(Bytes),
}

impl Out {
    /// The messages it holds, for a transport that does not speak WebSocket (SSE).
    pub(crate) fn into_messages(self) -> Vec<Message> {
        match self {
            Out::Message(m) => vec![m],
            Out::Frames(b) => messages(b),
        }
    }
}

/// The data messages in `frames` (as [`Frames`] wrote them: whole, unmasked text and
/// binary frames).
fn messages(frames: Bytes) -> Vec<Message> {
    let mut out = Vec::new();
    let mut cursor = Cursor::new(&frames[..]);
    while let Ok(Some((header, len))) = FrameHeader::parse(&mut cursor) {
        let at = cursor.position() as usize;
        let Some(end) = at.checked_add(len as usize).filter(|e| *e <= frames.len()) else {
            break;
        };
        let payload = frames.slice(at..end);
        cursor.set_position(end as u64);
        match header.opcode {
            OpCode::Data(Data::Text) => {
                if let Ok(t) = Utf8Bytes::try_from(payload) {
                    out.push(Message::Text(t));
                }
            }
            OpCode::Data(Data::Binary) => out.push(Message::Binary(payload)),
            _ => {}
        }
    }
    out
}

/// Frames data messages into one buffer, each a whole unmasked frame.
#[derive(Default)]
pub(crate) struct Frames {
    buf: Vec<u8>,
}

impl Frames {
    /// Appends a text frame.
    pub(crate) fn text(&mut self, text: &str) {
        self.push(OpCode::Data(Data::Text), text.as_bytes());
    }

    /// Appends a binary frame.
    pub(crate) fn binary(&mut self, data: &[u8]) {
        self.push(OpCode::Data(Data::Binary), data);
    }

    fn push(&mut self, opcode: OpCode, payload: &[u8]) {
        header(opcode, payload.len(), &mut self.buf);
        self.buf.extend_from_slice(payload);
    }

    /// The frames, as one buffer.
    pub(crate) fn finish(self) -> Bytes {
        Bytes::from(self.buf)
    }
}

/// Writes the header of a final, unmasked frame (a server's) of `len` payload bytes.
fn header(opcode: OpCode, len: usize, out: &mut impl BufMut) {
    let header = FrameHeader {
        opcode,
        ..FrameHeader::default()
    };
    // Writing into memory cannot fail.
    let _ = header.format(len as u64, &mut out.writer());
}

/// The opcode and payload of a message.
fn parts(m: Message) -> (OpCode, Bytes) {
    match m {
        Message::Text(t) => (OpCode::Data(Data::Text), Bytes::from(t)),
        Message::Binary(b) => (OpCode::Data(Data::Binary), b),
        Message::Ping(b) => (OpCode::Control(Control::Ping), b),
        Message::Pong(b) => (OpCode::Control(Control::Pong), b),
        Message::Close(c) => {
            let mut p = BytesMut::new();
            if let Some(c) = c {
                p.put_u16(c.code.into());
                p.put_slice(c.reason.as_bytes());
            }
            (OpCode::Control(Control::Close), p.freeze())
        }
        // A raw frame is never queued; a continuation opcode keeps the match total.
        Message::Frame(f) => (OpCode::Data(Data::Continue), f.into_payload()),
    }
}

/// Payloads larger than this are written from where they are rather than copied next
/// to their header.
const COPY_LIMIT: usize = 4096;

/// The iovecs one write takes at most.
const MAX_SLICES: usize = 64;

/// The socket's sending half: frames what it is given and writes it, vectored, on
/// flush, or as soon as it holds `websocket.write_buffer_bytes`.
pub(crate) struct WsSink<W> {
    wr: W,
    /// Bytes held (copied or shared) that no write has taken yet.
    held: usize,
    /// `websocket.write_buffer_bytes`: writes start once this much is held.
    limit: usize,
    /// Small frames framed (copied) here since the last chunk was sealed.
    scratch: BytesMut,
    /// What the next writes send, in order; the front one may be partly written
    /// (advanced past what was).
    chunks: VecDeque<Bytes>,
}

impl<W> WsSink<W> {
    pub(crate) fn new(wr: W, limit: usize) -> Self {
        WsSink {
            wr,
            held: 0,
            limit,
            scratch: BytesMut::new(),
            chunks: VecDeque::new(),
        }
    }

    /// Moves what `scratch` holds into `chunks`.
    fn seal(&mut self) {
        if !self.scratch.is_empty() {
            self.chunks.push_back(self.scratch.split().freeze());
        }
    }
}

impl<W: AsyncWrite + Unpin> WsSink<W> {
    /// Writes every chunk.
    fn poll_write_all(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.seal();
        while let Some(front) = self.chunks.front() {
            let wr = Pin::new(&mut self.wr);
            // One chunk (the common case: a run, or a few replies): a plain write,
            // which costs the kernel less than a vector of one.
            let written = if self.chunks.len() == 1 {
                wr.poll_write(cx, front)
            } else {
                let slices: Vec<IoSlice<'_>> = self
                    .chunks
                    .iter()
                    .take(MAX_SLICES)
                    .map(|c| IoSlice::new(c))
                    .collect();
                wr.poll_write_vectored(cx, &slices)
            };
            let mut n = ready!(written).map_err(WsError::Io)?;
            self.held = self.held.saturating_sub(n);
            if n == 0 {
                return Poll::Ready(Err(WsError::Io(std::io::ErrorKind::WriteZero.into())));
            }
            while n > 0 {
                let Some(front) = self.chunks.front_mut() else {
                    break;
                };
                if front.len() <= n {
                    n -= front.len();
                    self.chunks.pop_front();
                } else {
                    front.advance(n);
                    n = 0;
                }
            }
        }
        // Exact again, whatever a partial write left uncounted.
        self.held = 0;
        Poll::Ready(Ok(()))
    }
}

impl<W: AsyncWrite + Unpin> Sink<Out> for WsSink<W> {
    type Error = WsError;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        if this.held >= this.limit {
            ready!(this.poll_write_all(cx))?;
        }
        Poll::Ready(Ok(()))
    }

    fn start_send(self: Pin<&mut Self>, out: Out) -> Result<(), WsError> {
        let this = self.get_mut();
        this.held += match &out {
            Out::Frames(b) => b.len(),
            Out::Message(m) => m.len() + FrameHeader::default().len(m.len() as u64),
        };
        match out {
            Out::Frames(b) => {
                this.seal();
                this.chunks.push_back(b);
            }
            Out::Message(m) => {
                let (opcode, payload) = parts(m);
                header(opcode, payload.len(), &mut this.scratch);
                if payload.len() > COPY_LIMIT {
                    this.seal();
                    this.chunks.push_back(payload);
                } else {
                    this.scratch.extend_from_slice(&payload);
                }
            }
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        ready!(this.poll_write_all(cx))?;
        Pin::new(&mut this.wr).poll_flush(cx).map_err(WsError::Io)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let this = self.get_mut();
        ready!(this.poll_write_all(cx))?;
        Pin::new(&mut this.wr)
            .poll_shutdown(cx)
            .map_err(WsError::Io)
    }
}

/// The socket's reading half as tungstenite sees it: reads pass through; what it writes
/// (its automatic pong and close replies) is discarded, since the session sends those
/// itself.
pub(crate) struct ReadHalf<R>(pub(crate) R);

impl<R: AsyncRead + Unpin> AsyncRead for ReadHalf<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<R: Unpin> AsyncWrite for ReadHalf<R> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role};
    use tokio_tungstenite::WebSocketStream;

    /// What the sink writes is what a WebSocket client reads, in order: small and large
    /// messages, shared runs between them, control frames and the close.
    #[tokio::test]
    async fn a_client_reads_what_the_sink_writes() {
        let (server, client) = tokio::io::duplex(1 << 10);
        // A small limit: writes start before the flush, partial writes happen.
        let mut sink = WsSink::new(server, 100);
        let mut run = Frames::default();
        run.text("one");
        run.binary(&[1, 2, 3]);
        run.text(&"x".repeat(70_000));
        let big = "y".repeat(COPY_LIMIT * 3);
        let writing = async move {
            sink.feed(Out::Message(Message::Text("hello".into())))
                .await
                .unwrap();
            sink.feed(Out::Frames(run.finish())).await.unwrap();
            sink.feed(Out::Message(Message::Ping(Bytes::from_static(b"p"))))
                .await
                .unwrap();
            sink.feed(Out::Message(Message::Text(big.clone().into())))
                .await
                .unwrap();
            sink.send(Out::Message(Message::Close(Some(CloseFrame {
                code: CloseCode::Again,
                reason: "bye".into(),
            }))))
            .await
            .unwrap();
        };
        let reading = async {
            let mut ws = WebSocketStream::from_raw_socket(client, Role::Client, None).await;
            let mut got = Vec::new();
            while let Some(Ok(m)) = ws.next().await {
                let end = m.is_close();
                got.push(m);
                if end {
                    break;
                }
            }
            got
        };
        let ((), got) = tokio::join!(writing, reading);
        assert_eq!(got.len(), 7, "{got:?}");
        assert_eq!(got[0], Message::Text("hello".into()));
        assert_eq!(got[1], Message::Text("one".into()));
        assert_eq!(got[2], Message::Binary(Bytes::from_static(&[1, 2, 3])));
        assert_eq!(got[3].len(), 70_000);
        assert_eq!(got[4], Message::Ping(Bytes::from_static(b"p")));
        assert_eq!(got[5].len(), COPY_LIMIT * 3);
        assert_eq!(
            got[6],
            Message::Close(Some(CloseFrame {
                code: CloseCode::Again,
                reason: "bye".into()
            }))
        );
    }

    /// Counts the writes it takes.
    struct Counting(usize);

    impl AsyncWrite for Counting {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.get_mut().0 += 1;
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes start at the limit, however many small frames went before: what the
    /// sink counts for a header it did not need must not pile up.
    #[tokio::test]
    async fn small_frames_keep_gathering_up_to_the_limit() {
        let mut sink = WsSink::new(Counting(0), 1000);
        let small = || Out::Message(Message::Text("a".into()));
        for _ in 0..500 {
            sink.send(small()).await.unwrap();
        }
        assert_eq!(sink.wr.0, 500, "one write per flush");
        // 100 frames of 3 bytes: far below the limit, so no write before the flush.
        for _ in 0..100 {
            sink.feed(small()).await.unwrap();
        }
        assert_eq!(sink.wr.0, 500, "nothing written before the limit");
        sink.flush().await.unwrap();
        assert_eq!(sink.wr.0, 501);
    }

    #[test]
    fn frames_read_back_as_their_messages() {
        let mut run = Frames::default();
        run.text("{\"a\":1}");
        run.binary(b"\x01\x02");
        run.text(&"z".repeat(300));
        let got = Out::Frames(run.finish()).into_messages();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], Message::Text("{\"a\":1}".into()));
        assert_eq!(got[1], Message::Binary(Bytes::from_static(b"\x01\x02")));
        assert_eq!(got[2].len(), 300);
    }
}
