//! A client's binary frame `[L][channel][payload]`: parsing never panics, and what it
//! accepts encodes back to the same bytes.
#![no_main]

use bytes::Bytes;
use herald_protocol::client::parse_binary;
use herald_protocol::server::binary_frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    if let Ok((channel, payload)) = parse_binary(&frame) {
        assert_eq!(&binary_frame(channel.as_str(), &payload)[..], data);
    }
});
