//! What a session sends, as WebSocket frames that Herald frames and writes itself.
//!
//! tungstenite reads (and validates) everything a client sends; what the server sends is
//! framed here, with tungstenite's own [`FrameHeader`], and written by the session's
//! writer through [`WsSink`]. Framing our own frames is what lets a *run* of deliveries
//! (a batch's publications of one plain channel, see `hub`) be framed once into one
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{BufMut, Bytes, BytesMut};
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
    /// The frames so far.
    buf: Vec<u8>,
}

impl Frames {
    /// Appends a text frame.
    pub(crate) fn text(&mut self, text: &str) {
        self.push(OpCode::Data(Data::Text), text.as_bytes(), None);
    }

    /// Appends a binary frame.
    pub(crate) fn binary(&mut self, data: &[u8]) {
        self.push(OpCode::Data(Data::Binary), data, None);
    }

    /// Appends a data frame, compressed with `deflate` when that pays (see
    /// [`Deflate`]).
    fn push(&mut self, opcode: OpCode, payload: &[u8], deflate: Option<Deflate>) {
        match deflate.and_then(|d| d.compress(payload)) {
            Some(compressed) => put_frame(opcode, true, &compressed, &mut self.buf),
            None => put_frame(opcode, false, payload, &mut self.buf),
        }
    }

    /// The data messages of `out` framed again, each compressed with `deflate` when
    /// that pays; `None` for a control frame.
    pub(crate) fn deflated(out: &Out, deflate: Deflate) -> Option<Bytes> {
        let all = match out {
            Out::Frames(frames) => messages(frames.clone()),
            Out::Message(m @ (Message::Text(_) | Message::Binary(_))) => vec![m.clone()],
            Out::Message(_) => return None,
        };
        let mut frames = Frames::default();
        for m in all {
            let (opcode, payload) = parts(m);
            frames.push(opcode, &payload, Some(deflate));
        }
        Some(frames.finish())
    }

    /// The frames, as one buffer.
    pub(crate) fn finish(self) -> Bytes {
        Bytes::from(self.buf)
    }
}

/// How a connection that negotiated permessage-deflate compresses what it is sent:
/// messages of at least `min_bytes` (`websocket.deflate_min_bytes`), at `level`
/// (`websocket.deflate_level`), when the result is smaller; with `min_bytes` 0, every
/// data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Deflate {
    /// `websocket.deflate_level`.
    pub(crate) level: u32,
    /// `websocket.deflate_min_bytes`.
    pub(crate) min_bytes: usize,
}

impl Deflate {
    /// `payload` compressed, when it is worth it.
    fn compress(self, payload: &[u8]) -> Option<Vec<u8>> {
        if payload.len() < self.min_bytes {
            return None;
        }
        Some(crate::deflate::compress(payload, self.level))
            .filter(|c| self.min_bytes == 0 || c.len() < payload.len())
    }
}

/// Writes `header` for `len` payload bytes.
fn put_header(header: FrameHeader, len: usize, out: &mut impl BufMut) {
    // Writing into memory cannot fail.
    let _ = header.format(len as u64, &mut out.writer());
}

/// The header of a final, unmasked frame (a server's); RSV1 marks the first frame of a
/// compressed message.
fn server_header(opcode: OpCode, compressed: bool) -> FrameHeader {
    FrameHeader {
        opcode,
        rsv1: compressed,
        ..FrameHeader::default()
    }
}

/// Writes a whole server frame: its header, then `payload`.
fn put_frame(opcode: OpCode, compressed: bool, payload: &[u8], out: &mut impl BufMut) {
    put_header(server_header(opcode, compressed), payload.len(), out);
    out.put_slice(payload);
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
/// Counts the times a session's sink had to wait for its peer and was then taken from
/// again: proof that the peer reads, however slowly. The heartbeat and the write
/// timeout count it as life, so a reader working through a backlog is not taken for
/// dead because the node's ping, or its batch, waits behind that backlog. A write the
/// kernel takes at once proves nothing (a peer that is gone still has a send buffer
/// until it fills), so only a wait followed by progress counts.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress(Arc<AtomicU64>);

impl Progress {
    /// How often the peer took bytes after a wait, so far.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// `waited` says the sink had to wait before this progress: counts it, and clears it.
    pub(crate) fn after_wait(&self, waited: &mut bool) {
        if std::mem::take(waited) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A session's sending half, as its writer drives it: a sink of frames that can give
/// up what it holds when a closing session runs out of time.
pub(crate) trait SessionSink: Sink<Out, Error = WsError> + Send {
    /// Drops the frames held that no write has started (the one partly written is
    /// finished: a frame cannot be cut), so that the close frame goes next.
    fn discard_unsent(self: Pin<&mut Self>);
}

impl<W: AsyncWrite + WriteSocket + Unpin + Send> SessionSink for WsSink<W> {
    fn discard_unsent(self: Pin<&mut Self>) {
        let this = self.get_mut();
        this.discard_unsent();
        // Only for a small rest: the enlarged buffer would hold a large one (kernel
        // memory, also for a peer that reads nothing) and the close frame behind it
        // could not reach a slow reader in time anyway.
        if this.held <= MAKE_ROOM_FOR {
            this.wr.make_room();
        }
    }
}

/// The most a sink that gave up may still have to write (the rest of the frame it had
/// started) for it to enlarge the socket's buffer for the close frame.
const MAKE_ROOM_FOR: usize = 64 * 1024;

/// The socket under a [`WsSink`], for what a closing session needs of it.
pub(crate) trait WriteSocket {
    /// Lets the close frame into a full socket at once. The kernel reports a full TCP
    /// socket writable again only once about a third of its buffer has drained, which
    /// takes a reader at a few KB/s longer than `limits.close_timeout`: enlarging the
    /// buffer wakes the writer now, and the frame goes in behind what the buffer holds.
    /// A no-op where the socket is out of reach (TLS, tests).
    fn make_room(&self) {}
}

impl WriteSocket for tokio::net::tcp::OwnedWriteHalf {
    fn make_room(&self) {
        let socket = socket2::SockRef::from(self.as_ref());
        // The size read is the kernel's (twice what was set); set, it doubles again.
        if let Ok(n) = socket.send_buffer_size() {
            let _ = socket.set_send_buffer_size(n);
        }
    }
}

impl<T> WriteSocket for tokio::io::WriteHalf<T> {}

pub(crate) struct WsSink<W> {
    /// The socket's writing half.
    wr: W,
    /// Counts writes taken after the socket made us wait.
    progress: Progress,
    /// The last write had to wait for the socket.
    waited: bool,
    /// Bytes held (copied or shared) that no write has taken yet.
    held: usize,
    /// `websocket.write_buffer_bytes`: writes start once this much is held.
    limit: usize,
    /// permessage-deflate, if the connection negotiated it: the data messages it frames
    /// are compressed (runs come compressed already, `handle::Item::deflated`).
    deflate: Option<Deflate>,
    /// Small frames framed (copied) here since the last chunk was sealed.
    scratch: BytesMut,
    /// What the next writes send, in order; the front one may be partly written (up to
    /// `front_written`).
    chunks: VecDeque<Chunk>,
    /// How much of the front chunk was written.
    front_written: usize,
}

/// Bytes the sink will write.
struct Chunk {
    /// What to write (all of it: the part written is `WsSink::front_written`).
    bytes: Bytes,
    /// A large message's payload, whose frame header ends the chunk before it: the
    /// chunk starts inside a frame (every other one starts at a frame's beginning).
    payload: bool,
}

/// A chunk of whole frames.
fn whole(bytes: Bytes) -> Chunk {
    Chunk {
        bytes,
        payload: false,
    }
}

impl<W> WsSink<W> {
    pub(crate) fn new(wr: W, limit: usize, deflate: Option<Deflate>, progress: Progress) -> Self {
        WsSink {
            wr,
            progress,
            waited: false,
            held: 0,
            limit,
            deflate,
            scratch: BytesMut::new(),
            chunks: VecDeque::new(),
            front_written: 0,
        }
    }

    /// Moves what `scratch` holds into `chunks`.
    fn seal(&mut self) {
        if !self.scratch.is_empty() {
            self.chunks.push_back(whole(self.scratch.split().freeze()));
        }
    }

    /// Drops every frame held that no write has started, keeping the rest of the one
    /// partly written (a frame cannot be cut): what a closing session that ran out of
    /// time does, so that its close frame goes next.
    fn discard_unsent(&mut self) {
        self.scratch.clear();
        // How many chunks hold the rest of the frame being written.
        let keep = match self.chunks.front() {
            None => 0,
            // A large message's payload: its header went out (with the chunk before),
            // so all of it must follow, even if none of it has yet.
            Some(front) if front.payload => 1,
            _ if self.front_written == 0 => 0,
            // The frame that holds the last byte written.
            Some(front) => match frame_end(&front.bytes, self.front_written - 1) {
                // The socket stopped between two frames: nothing of the chunk is left.
                Some(end) if end == self.front_written => 0,
                Some(end) if end <= front.bytes.len() => {
                    if let Some(front) = self.chunks.front_mut() {
                        front.bytes.truncate(end);
                    }
                    1
                }
                // The frame's header ends the chunk: its payload is the next one.
                Some(_) => 2,
                // Not frames (cannot be: the sink framed them): keep the chunk.
                None => 1,
            },
        };
        self.chunks.truncate(keep);
        if keep == 0 {
            self.front_written = 0;
        }
        self.held = self.chunks.iter().map(|c| c.bytes.len()).sum::<usize>() - self.front_written;
    }
}

/// Where the frame that holds byte `at` of `frames` (which starts with a frame) ends;
/// beyond `frames` when its payload is not in it. `None` if `frames` is not frames.
fn frame_end(frames: &[u8], at: usize) -> Option<usize> {
    let mut start = 0;
    while start < frames.len() {
        let mut cursor = Cursor::new(&frames[start..]);
        let (_, len) = FrameHeader::parse(&mut cursor).ok()??;
        let end = start + cursor.position() as usize + len as usize;
        if end > at {
            return Some(end);
        }
        start = end;
    }
    None
}

impl<W: AsyncWrite + Unpin> WsSink<W> {
    /// Writes every chunk.
    fn poll_write_all(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        self.seal();
        while let Some(front) = self.chunks.front() {
            let wr = Pin::new(&mut self.wr);
            let rest = &front.bytes[self.front_written..];
            // One chunk (the common case: a run, or a few replies): a plain write,
            // which costs the kernel less than a vector of one.
            let written = if self.chunks.len() == 1 {
                wr.poll_write(cx, rest)
            } else {
                let slices: Vec<IoSlice<'_>> = std::iter::once(rest)
                    .chain(self.chunks.iter().skip(1).map(|c| &c.bytes[..]))
                    .take(MAX_SLICES)
                    .map(IoSlice::new)
                    .collect();
                wr.poll_write_vectored(cx, &slices)
            };
            let Poll::Ready(written) = written else {
                self.waited = true;
                return Poll::Pending;
            };
            let mut n = written.map_err(WsError::Io)?;
            self.held = self.held.saturating_sub(n);
            if n == 0 {
                return Poll::Ready(Err(WsError::Io(std::io::ErrorKind::WriteZero.into())));
            }
            self.progress.after_wait(&mut self.waited);
            while n > 0 {
                let Some(front) = self.chunks.front() else {
                    break;
                };
                let left = front.bytes.len() - self.front_written;
                if left <= n {
                    n -= left;
                    self.chunks.pop_front();
                    self.front_written = 0;
                } else {
                    self.front_written += n;
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
                this.chunks.push_back(whole(b));
            }
            Out::Message(m) => {
                let (opcode, payload) = parts(m);
                let data = matches!(opcode, OpCode::Data(Data::Text | Data::Binary));
                if let Some(compressed) = this
                    .deflate
                    .filter(|_| data)
                    .and_then(|d| d.compress(&payload))
                {
                    put_frame(opcode, true, &compressed, &mut this.scratch);
                } else if payload.len() > COPY_LIMIT {
                    put_header(
                        server_header(opcode, false),
                        payload.len(),
                        &mut this.scratch,
                    );
                    this.seal();
                    this.chunks.push_back(Chunk {
                        bytes: payload,
                        payload: true,
                    });
                } else {
                    put_frame(opcode, false, &payload, &mut this.scratch);
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

/// The socket's reading half as tungstenite sees it: reads pass through (inflated, when
/// the connection negotiated permessage-deflate: see [`Inflating`]); what it writes
/// (its automatic pong and close replies) is discarded, since the session sends those
/// itself.
pub(crate) struct ReadHalf<R>(pub(crate) Inflating<R>);

impl<R: AsyncRead + Unpin> AsyncRead for ReadHalf<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

/// A client's frames on their way to tungstenite, which knows no extensions: with
/// permessage-deflate negotiated, each compressed message (RSV1 on its first frame) is
/// gathered, inflated and handed on as one plain frame; everything else passes as it
/// came. A message that inflates past `max` is handed on as a frame header announcing
/// more than `max`, which tungstenite refuses (the session closes with 1009); invalid
/// compressed data, or a new message inside a compressed one, as a continuation with
/// nothing to continue (1002).
pub(crate) struct Inflating<R> {
    /// The socket's reading half.
    inner: R,
    /// permessage-deflate was negotiated; otherwise everything passes as it came.
    on: bool,
    /// `limits.max_message_bytes`.
    max: usize,
    /// Read, not yet a whole frame.
    raw: BytesMut,
    /// For tungstenite.
    out: BytesMut,
    /// A compressed message being gathered: its opcode, and its payload so far.
    gathering: Option<(OpCode, Vec<u8>)>,
    /// A plain message's later fragments are on their way.
    fragmented: bool,
    /// What comes next is passed on as it comes (tungstenite is about to fail the
    /// session on what it has been given).
    passing: bool,
    /// A refusal was handed on: nothing more is read.
    stopped: bool,
}

impl<R> Inflating<R> {
    pub(crate) fn new(inner: R, on: bool, max: usize) -> Self {
        Inflating {
            inner,
            on,
            max,
            raw: BytesMut::new(),
            out: BytesMut::new(),
            gathering: None,
            fragmented: false,
            passing: false,
            stopped: false,
        }
    }

    /// Moves whole frames from `raw` into `out`, inflating compressed messages, until
    /// `out` holds something: one message inflated at a time, so what a read of small
    /// compressed frames can make the node hold is one message (`max`), not every
    /// message the read held inflated at once.
    fn frames(&mut self) {
        while !self.passing && !self.stopped && self.out.is_empty() {
            let mut cursor = Cursor::new(&self.raw[..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(h)) => h,
                Ok(None) => return,
                Err(_) => return self.pass(),
            };
            let at = cursor.position() as usize;
            // A compressed message may be a little larger than what it inflates to
            // (deflate's stored blocks): `max` bounds what it inflates to.
            let bound = if header.rsv1 || self.gathering.is_some() {
                self.max + self.max / 64 + 64
            } else {
                self.max
            };
            if len > bound as u64 {
                // tungstenite refuses the header itself (1009).
                return self.pass();
            }
            let end = at + len as usize;
            if self.raw.len() < end {
                self.raw.reserve(end - self.raw.len());
                return;
            }
            let frame = self.raw.split_to(end);
            let data = matches!(header.opcode, OpCode::Data(Data::Text | Data::Binary));
            let continuation = header.opcode == OpCode::Data(Data::Continue);
            let (Some(mask), false, false) = (header.mask, header.rsv2, header.rsv3) else {
                // Unmasked, or other reserved bits: tungstenite fails it.
                self.out.extend_from_slice(&frame);
                return self.pass();
            };
            let unmasked = || {
                let mut p = frame[at..].to_vec();
                for (i, b) in p.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
                p
            };
            match (&mut self.gathering, data, continuation, header.rsv1) {
                // A compressed message starts.
                (None, true, _, true) if !self.fragmented => {
                    self.gathering = Some((header.opcode, unmasked()));
                }
                // Its next fragment.
                (Some((_, payload)), _, true, false) => {
                    if payload.len() + frame.len() - at > bound {
                        return self.too_big();
                    }
                    payload.extend_from_slice(&unmasked());
                }
                // A new message inside a compressed one.
                (Some(_), true, _, _) => return self.broken(),
                _ => {
                    if data {
                        self.fragmented = !header.is_final;
                    } else if continuation && header.is_final {
                        self.fragmented = false;
                    }
                    self.out.extend_from_slice(&frame);
                    continue;
                }
            }
            if header.is_final {
                let Some((opcode, payload)) = self.gathering.take() else {
                    continue;
                };
                match crate::deflate::inflate(&payload, self.max) {
                    Ok(message) => {
                        put_header(client_header(opcode), message.len(), &mut self.out);
                        self.out.extend_from_slice(&message);
                    }
                    Err(crate::deflate::InflateError::TooBig) => return self.too_big(),
                    Err(crate::deflate::InflateError::Invalid) => return self.broken(),
                }
            }
        }
    }

    /// From now on, everything passes as it comes.
    fn pass(&mut self) {
        self.passing = true;
        let raw = self.raw.split();
        self.out.extend_from_slice(&raw);
    }

    /// A message over `max`: a header announcing more, which tungstenite refuses.
    fn too_big(&mut self) {
        self.refuse(OpCode::Data(Data::Binary), self.max + 1);
    }

    /// Not a valid message: a continuation with nothing to continue, which tungstenite
    /// refuses.
    fn broken(&mut self) {
        self.refuse(OpCode::Data(Data::Continue), 0);
    }

    /// Hands on a header tungstenite refuses (`opcode`, `len`); nothing more is read.
    fn refuse(&mut self, opcode: OpCode, len: usize) {
        put_header(client_header(opcode), len, &mut self.out);
        self.raw.clear();
        self.stopped = true;
    }
}

/// The header of a final frame as tungstenite must see a client's: masked (with a mask
/// of zeros, so the payload reads as it is).
fn client_header(opcode: OpCode) -> FrameHeader {
    FrameHeader {
        opcode,
        mask: Some([0; 4]),
        ..FrameHeader::default()
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Inflating<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.stopped {
                return Poll::Ready(Ok(()));
            }
            if !this.on || this.passing {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            // What was read before comes first; read more only when it holds no whole
            // frame.
            this.frames();
            if !this.out.is_empty() || this.passing || this.stopped {
                continue;
            }
            let mut chunk = [0u8; 4096];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                // The peer is gone: tungstenite sees what there was, then the end.
                let rest = this.raw.split();
                this.out.extend_from_slice(&rest);
                if this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.raw.extend_from_slice(read.filled());
        }
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
        let mut sink = WsSink::new(server, 100, None, Progress::default());
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
        let mut sink = WsSink::new(Counting(0), 1000, None, Progress::default());
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

    /// Takes up to `allow` bytes, then makes the sink wait.
    struct Gate {
        out: Vec<u8>,
        allow: usize,
    }

    impl AsyncWrite for Gate {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let this = self.get_mut();
            let n = buf.len().min(this.allow.saturating_sub(this.out.len()));
            if n == 0 {
                return Poll::Pending;
            }
            this.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A sink giving up where the socket stopped between two frames of a chunk keeps
    /// nothing of it. Should nothing follow, its flush writes nothing more and does not
    /// try an empty write, which a socket answers with 0 bytes, taken for a dead peer.
    /// (The writer sends a close frame after giving up, which hid this: the sink must
    /// not depend on it.)
    #[test]
    fn a_sink_giving_up_between_two_frames_keeps_nothing_of_them() {
        let mut run = Frames::default();
        run.text("one");
        run.text("two");
        let frames = run.finish();
        let first = frame_end(&frames, 0).unwrap();
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let gate = Gate {
            out: vec![],
            allow: first,
        };
        let mut sink = WsSink::new(gate, 1 << 20, None, Progress::default());
        Pin::new(&mut sink)
            .start_send(Out::Frames(frames.clone()))
            .unwrap();
        assert!(Pin::new(&mut sink).poll_flush(&mut cx).is_pending());
        sink.discard_unsent();
        assert_eq!(sink.held, 0);
        sink.wr.allow = usize::MAX;
        assert!(Pin::new(&mut sink).poll_flush(&mut cx).is_ready());
        assert_eq!(sink.wr.out, frames[..first]);
    }

    /// A closing session that ran out of time drops what its sink holds, except the
    /// rest of the frame being written, wherever the socket stopped taking bytes: in a
    /// small frame, in a shared run, in a large message's header or payload. The close
    /// frame follows it, and the peer reads whole frames only.
    #[test]
    fn a_sink_giving_up_finishes_the_frame_it_started_and_nothing_more() {
        let messages = || {
            let mut run = Frames::default();
            run.text("one");
            run.binary(&[1, 2, 3]);
            run.text(&"x".repeat(300));
            vec![
                Out::Message(Message::Text("hello".into())),
                Out::Frames(run.finish()),
                Out::Message(Message::Text("y".repeat(COPY_LIMIT * 3).into())),
                Out::Message(Message::Text("after".into())),
            ]
        };
        let close = Out::Message(Message::Close(Some(CloseFrame {
            code: CloseCode::from(4400),
            reason: "banned".into(),
        })));
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let written = |outs: Vec<Out>, allow: usize| {
            let mut sink = WsSink::new(
                Gate { out: vec![], allow },
                1 << 20,
                None,
                Default::default(),
            );
            for o in outs {
                Pin::new(&mut sink).start_send(o).unwrap();
            }
            sink
        };
        let mut all = written(messages(), usize::MAX);
        assert!(Pin::new(&mut all).poll_flush(&mut cx).is_ready());
        let full = all.wr.out;
        let mut closing = written(vec![close.clone()], usize::MAX);
        assert!(Pin::new(&mut closing).poll_flush(&mut cx).is_ready());
        let close_bytes = closing.wr.out;
        let mut starts = vec![];
        let mut at = 0;
        while at < full.len() {
            starts.push(at);
            at = frame_end(&full, at).unwrap();
        }
        assert_eq!(starts.len(), 6);
        // Every byte the socket could stop at.
        for stop in 0..full.len() {
            let mut sink = written(messages(), stop);
            assert!(Pin::new(&mut sink).poll_flush(&mut cx).is_pending());
            sink.discard_unsent();
            sink.wr.allow = usize::MAX;
            Pin::new(&mut sink).start_send(close.clone()).unwrap();
            assert!(Pin::new(&mut sink).poll_flush(&mut cx).is_ready());
            let cut = if stop == 0 {
                0
            } else {
                frame_end(&full, stop - 1).unwrap()
            };
            let out = &sink.wr.out;
            assert_eq!(&out[..cut], &full[..cut], "stopped at {stop}");
            assert_eq!(&out[cut..], &close_bytes[..], "stopped at {stop}");
        }
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

    /// A client's frame: masked, with `rsv1` when it starts a compressed message.
    fn client_frame(fin: bool, rsv1: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mask = [7, 1, 3, 9];
        let header = FrameHeader {
            is_final: fin,
            rsv1,
            opcode,
            mask: Some(mask),
            ..FrameHeader::default()
        };
        let mut out = Vec::new();
        header.format(payload.len() as u64, &mut out).unwrap();
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// What tungstenite reads from `bytes` (sent in small pieces) through `Inflating`.
    async fn server_reads(bytes: Vec<u8>, max: usize) -> Vec<Result<Message, String>> {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let reading = async {
            let rd = ReadHalf(Inflating::new(server, true, max));
            let mut ws = WebSocketStream::from_raw_socket(rd, Role::Server, Some(config)).await;
            let mut got = Vec::new();
            while let Some(m) = ws.next().await {
                let failed = m.is_err();
                got.push(m.map_err(|e| e.to_string()));
                if failed {
                    break;
                }
            }
            got
        };
        let writing = async move {
            use tokio::io::AsyncWriteExt;
            for piece in bytes.chunks(7) {
                client.write_all(piece).await.unwrap();
            }
            client.shutdown().await.unwrap();
            // Keep the pipe open until the reader is done.
            std::future::pending::<()>().await
        };
        tokio::select! {
            got = reading => got,
            _ = writing => unreachable!(),
        }
    }

    #[tokio::test]
    async fn compressed_messages_reach_tungstenite_inflated() {
        let text = "{\"op\":\"publish\",\"channel\":\"a\",\"data\":1}".repeat(40);
        let compressed = crate::deflate::compress(text.as_bytes(), 6);
        let (first, rest) = compressed.split_at(compressed.len() / 2);
        let mut bytes = client_frame(true, true, OpCode::Data(Data::Text), &compressed);
        // Fragmented, with a ping between its fragments.
        bytes.extend(client_frame(false, true, OpCode::Data(Data::Binary), first));
        bytes.extend(client_frame(
            true,
            false,
            OpCode::Control(Control::Ping),
            b"p",
        ));
        bytes.extend(client_frame(
            true,
            false,
            OpCode::Data(Data::Continue),
            rest,
        ));
        // Plain messages pass as they came, fragmented or not.
        bytes.extend(client_frame(
            true,
            false,
            OpCode::Data(Data::Text),
            b"plain",
        ));
        bytes.extend(client_frame(false, false, OpCode::Data(Data::Text), b"pl"));
        bytes.extend(client_frame(
            true,
            false,
            OpCode::Data(Data::Continue),
            b"ain",
        ));
        let got = server_reads(bytes, 1 << 20).await;
        assert_eq!(got[0], Ok(Message::Text(text.clone().into())));
        assert_eq!(got[1], Ok(Message::Ping(Bytes::from_static(b"p"))));
        assert_eq!(got[2], Ok(Message::Binary(Bytes::from(text.into_bytes()))));
        assert_eq!(got[3], Ok(Message::Text("plain".into())));
        assert_eq!(got[4], Ok(Message::Text("plain".into())));
    }

    /// Small compressed frames that each inflate to a full message, many in one read:
    /// what is held inflated stays one message, however many the read brought.
    #[tokio::test]
    async fn a_read_of_many_small_compressed_frames_holds_one_message_inflated() {
        use tokio::io::AsyncReadExt;
        let max = 64 * 1024;
        let z = crate::deflate::compress(&vec![b'a'; max], 9);
        let mut bytes = Vec::new();
        for _ in 0..40 {
            bytes.extend(client_frame(true, true, OpCode::Data(Data::Binary), &z));
        }
        assert!(bytes.len() < 8 * 1024, "{}", bytes.len());
        let mut inflating = Inflating::new(&bytes[..], true, max);
        let (mut buf, mut total, mut held) = (vec![0u8; 1024], 0, 0);
        loop {
            let n = inflating.read(&mut buf).await.unwrap();
            held = held.max(inflating.out.len());
            if n == 0 {
                break;
            }
            total += n;
        }
        assert_eq!(total, 40 * (max + 14));
        assert!(held <= max + 14, "held {held}");
    }

    #[tokio::test]
    async fn bombs_and_broken_messages_fail_the_session() {
        let max = 64 * 1024;
        let bomb = crate::deflate::compress(&vec![b'a'; 10 << 20], 9);
        let got = server_reads(
            client_frame(true, true, OpCode::Data(Data::Text), &bomb),
            max,
        )
        .await;
        assert!(
            matches!(got.last(), Some(Err(e)) if e.contains("Space limit exceeded")),
            "{got:?}"
        );
        // Garbage that is not deflate data.
        let got = server_reads(
            client_frame(true, true, OpCode::Data(Data::Text), &[0xff; 16]),
            max,
        )
        .await;
        assert!(matches!(got.last(), Some(Err(_))), "{got:?}");
        // A new message while a compressed one is unfinished.
        let mut bytes = client_frame(false, true, OpCode::Data(Data::Text), &[0xf2, 0x48]);
        bytes.extend(client_frame(true, false, OpCode::Data(Data::Text), b"x"));
        let got = server_reads(bytes, max).await;
        assert!(matches!(got.last(), Some(Err(_))), "{got:?}");
        // RSV1 on a control frame, as tungstenite refuses it.
        let got = server_reads(
            client_frame(true, true, OpCode::Control(Control::Ping), b""),
            max,
        )
        .await;
        assert!(matches!(got.last(), Some(Err(_))), "{got:?}");
    }
}
