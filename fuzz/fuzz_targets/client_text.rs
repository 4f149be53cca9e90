//! A client's text frame: parsing never panics, a publish's `data` is one JSON value
//! (it is spliced into delivery frames as is), and a subscribe encodes back to itself.
#![no_main]

use bytes::Bytes;
use herald_protocol::client::{encode_subscribe, parse_text, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = Bytes::copy_from_slice(data);
    match parse_text(&frame) {
        Ok(Request::Publish { data, .. }) => {
            assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&data).is_ok());
        }
        Ok(Request::Subscribe {
            channel, id, since, ..
        }) => {
            let again = Bytes::from(encode_subscribe(&channel, id, None));
            match parse_text(&again) {
                Ok(Request::Subscribe {
                    channel: c,
                    id: i,
                    since: None,
                    ..
                }) => {
                    assert_eq!((c, i), (channel, id));
                }
                other => panic!("re-encoded subscribe parsed as {other:?}"),
            }
            let _ = since;
        }
        Ok(_) => {}
        Err(e) => assert!(!e.message.is_empty()),
    }
});
