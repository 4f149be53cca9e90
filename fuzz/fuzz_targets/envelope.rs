//! A body received from Redis: decoding never panics; a JSON payload is one JSON value
//! whatever the body claimed, so the delivery frame built from it is valid JSON; a
//! Herald envelope encodes back to a body that decodes to the same publication.
#![no_main]

use bytes::Bytes;
use herald_protocol::envelope::{decode, encode, Origin};
use herald_protocol::server::{encode_delivery, Delivery};
use herald_protocol::{ChannelName, Payload};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let channel = ChannelName::new("fuzz").unwrap();
    let (p, origin) = decode(channel.clone(), Bytes::copy_from_slice(data));
    if let Payload::Json(d) = &p.payload {
        assert!(serde_json::from_slice::<serde::de::IgnoredAny>(d).is_ok());
        match encode_delivery(&p) {
            // Valid by the JSON grammar (a number like 2e5555 is, though it overflows
            // an f64: JSON.parse reads it as Infinity), as the publisher's bytes were.
            Delivery::Text(t) => {
                assert!(
                    serde_json::from_str::<serde::de::IgnoredAny>(&t).is_ok(),
                    "{t}"
                )
            }
            Delivery::Binary(_) => panic!("JSON delivered as binary"),
        }
    }
    if origin == Origin::Herald {
        let (q, o) = decode(channel, encode(&p));
        assert_eq!((q, o), (p, Origin::Herald));
    }
});
