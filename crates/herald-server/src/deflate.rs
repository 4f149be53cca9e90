//! permessage-deflate (RFC 7692): the handshake's negotiation, and compressing and
//! inflating one message at a time.
//!
//! Herald accepts it with no context takeover either way
//! (`server_no_context_takeover; client_no_context_takeover`): every message is
//! compressed on its own, so a broadcast is compressed once for all of its subscribers
//! (`handle::Item::deflated`), and no connection keeps a compressor or an inflater
//! (32 KiB windows) between messages. The cost is ratio: a message cannot refer to the
//! one before (Fossil deltas, `delta = "fossil"`, cover that for history channels).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The response to an accepted offer (with `server_max_window_bits=15` added when the
/// offer named it: a server accepts that parameter by naming it, section 7.1.2.1).
const ACCEPTED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// What every message ends with once compressed with a sync flush, and what RFC 7692
/// leaves out of the frame (section 7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The `Sec-WebSocket-Extensions` response to the header values, if they hold a
/// permessage-deflate offer Herald can accept (the first one that is valid and does not
/// ask the server for a window under 32 KiB).
pub(crate) fn negotiate<'a>(headers: impl Iterator<Item = &'a str>) -> Option<String> {
    headers
        .flat_map(|h| h.split(','))
        .find(|offer| acceptable(offer.trim()))
        .map(|offer| {
            if offer.contains("server_max_window_bits") {
                format!("{ACCEPTED}; server_max_window_bits=15")
            } else {
                ACCEPTED.to_owned()
            }
        })
}

/// One offer: `permessage-deflate` and its parameters.
fn acceptable(offer: &str) -> bool {
    let mut parts = offer.split(';').map(str::trim);
    if parts.next() != Some("permessage-deflate") {
        return false;
    }
    let mut seen: Vec<&str> = Vec::new();
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        };
        // A parameter twice makes the offer invalid (section 7).
        if seen.contains(&name) {
            return false;
        }
        seen.push(name);
        let bits = |v: Option<&str>| v.and_then(|v| v.parse::<u8>().ok());
        match (name, value) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => {}
            // Herald compresses with the full window: an offer that asks for less
            // is declined (a smaller window is the client's to refuse, not to get).
            ("server_max_window_bits", v) => match bits(v) {
                Some(15) => {}
                _ => return false,
            },
            // The client may use any window: the inflater takes up to 15 bits.
            ("client_max_window_bits", None) => {}
            ("client_max_window_bits", v) if bits(v).is_some_and(|b| (8..=15).contains(&b)) => {}
            _ => return false,
        }
    }
    true
}

/// `data` compressed as one message, without the final `TAIL` (section 7.2.1).
pub(crate) fn compress(data: &[u8], level: u32) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    let room = |out: &mut Vec<u8>| {
        if out.capacity() - out.len() < 1024 {
            out.reserve(out.capacity().max(1024));
        }
    };
    while (c.total_in() as usize) < data.len() {
        room(&mut out);
        let consumed = c.total_in() as usize;
        if c.compress_vec(&data[consumed..], &mut out, FlushCompress::None)
            .is_err()
        {
            break;
        }
    }
    // The sync flush ends with `TAIL`. One call with room left is not always all of
    // it (miniz_oxide's fastest level stopped short, before flate2 ran on zlib-rs: a
    // message then inflated to less than was sent, found by Autobahn 12.5.9); further
    // calls finish it, and cost nothing when the first one did.
    for _ in 0..16 {
        room(&mut out);
        if c.compress_vec(&[], &mut out, FlushCompress::Sync).is_err() {
            break;
        }
        if out.ends_with(&TAIL) && out.len() < out.capacity() {
            break;
        }
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    out
}

/// Why a compressed message could not be inflated.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum InflateError {
    /// It inflates to more than the limit (an inflation bomb, or just too big).
    TooBig,
    /// Not a valid deflate stream.
    Invalid,
}

/// A message's payload inflated, at most `limit` bytes.
pub(crate) fn inflate(compressed: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    let mut d = Decompress::new(false);
    let mut out: Vec<u8> = Vec::with_capacity((compressed.len() * 3).min(limit) + 64);
    let (mut input, mut tail) = (compressed, false);
    loop {
        // Room for a good step each time; the limit is checked after every step, so
        // what a bomb can make us hold is bounded by twice the limit.
        if out.capacity() - out.len() < 16 * 1024 {
            out.reserve(out.len().clamp(16 * 1024, 1 << 20));
        }
        let (before_in, before_out) = (d.total_in(), d.total_out());
        let status = d
            .decompress_vec(input, &mut out, FlushDecompress::Sync)
            .map_err(|_| InflateError::Invalid)?;
        input = &input[(d.total_in() - before_in) as usize..];
        if out.len() > limit {
            return Err(InflateError::TooBig);
        }
        if status == Status::StreamEnd {
            // A final block (section 7.2.3.4): the message ends there; what follows it
            // (the appended tail, padding) is not inflated.
            return Ok(out);
        }
        let progressed = d.total_in() > before_in || d.total_out() > before_out;
        if progressed {
            continue;
        }
        // Nothing more comes out of what went in: on to the tail, then done.
        if !input.is_empty() {
            return Err(InflateError::Invalid);
        }
        if tail {
            return Ok(out);
        }
        (input, tail) = (&TAIL[..], true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers() {
        let ok = |h: &str| negotiate([h].into_iter()).is_some();
        assert!(ok("permessage-deflate"));
        assert!(ok("permessage-deflate; client_max_window_bits"));
        assert!(ok(
            "permessage-deflate; client_no_context_takeover; server_no_context_takeover"
        ));
        assert!(ok("permessage-deflate; server_max_window_bits=15"));
        assert!(ok("permessage-deflate; client_max_window_bits=10"));
        assert!(ok("x-webkit-deflate-frame, permessage-deflate"));
        // A smaller server window, then an offer without it: the second is taken.
        assert!(ok(
            "permessage-deflate; server_max_window_bits=9, permessage-deflate"
        ));
        assert!(!ok("permessage-deflate; server_max_window_bits=9"));
        assert!(!ok("permessage-deflate; server_max_window_bits"));
        assert!(!ok("permessage-deflate; client_max_window_bits=7"));
        assert!(!ok("permessage-deflate; client_max_window_bits=16"));
        assert!(!ok("permessage-deflate; server_no_context_takeover=1"));
        assert!(!ok(
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover"
        ));
        assert!(!ok("permessage-deflate; unknown"));
        assert!(!ok("deflate-frame"));
        assert!(!ok(""));
        assert_eq!(
            negotiate(["permessage-deflate; server_max_window_bits=15"].into_iter()).unwrap(),
            format!("{ACCEPTED}; server_max_window_bits=15")
        );
        assert_eq!(
            negotiate(["permessage-deflate; client_max_window_bits"].into_iter()).unwrap(),
            ACCEPTED
        );
    }

    /// Bytes deflate cannot shrink (a xorshift stream).
    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_message_inflates_to_what_was_compressed() {
        for data in [
            Vec::new(),
            b"a".to_vec(),
            br#"{"op":"message","channel":"prices","data":{"x":1}}"#.repeat(50),
            (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect(),
            noise(65_536),
            noise(131_072),
            noise(1 << 20),
        ] {
            let out = compress(&data, 1);
            assert!(!out.ends_with(&TAIL));
            assert_eq!(inflate(&out, 1 << 20).unwrap(), data);
        }
        // Known bytes: RFC 7692 section 7.2.3.1's "Hello", and 7.2.3.4's, in a final
        // block with a 0x00 after it.
        assert_eq!(
            inflate(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00], 100).unwrap(),
            b"Hello"
        );
        assert_eq!(
            inflate(&[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00, 0x00], 100).unwrap(),
            b"Hello"
        );
    }

    /// A message compressed against the one before (context takeover, which the
    /// negotiation ruled out) refers to bytes a fresh inflater does not have: refused,
    /// not inflated with zeros in their place.
    #[test]
    fn a_message_that_needs_the_one_before_is_refused() {
        let mut c = Compress::new(Compression::new(6), false);
        let mut z = Vec::with_capacity(1 << 16);
        let msg = br#"{"op":"publish","channel":"prices","data":{"bid":101,"ask":102}}"#;
        for _ in 0..2 {
            z.clear();
            c.compress_vec(msg, &mut z, FlushCompress::Sync).unwrap();
        }
        assert!(z.ends_with(&TAIL));
        z.truncate(z.len() - TAIL.len());
        assert!(z.len() < msg.len() / 2, "{}", z.len());
        assert_eq!(inflate(&z, 1 << 20), Err(InflateError::Invalid));
    }

    #[test]
    fn bombs_and_garbage_are_refused() {
        let bomb = compress(&vec![0u8; 10 << 20], 9);
        assert!(bomb.len() < 20_000, "{}", bomb.len());
        assert_eq!(inflate(&bomb, 64 * 1024), Err(InflateError::TooBig));
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff, 0xff], 100),
            Err(InflateError::Invalid)
        );
    }
}
