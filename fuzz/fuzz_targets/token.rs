//! A connection token from the network: verification never panics, and whatever it
//! accepts was signed with the configured key (nothing here is signed, so nothing may
//! be accepted).
#![no_main]

use herald_auth::{JwtConfig, Verifier};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = JwtConfig {
        hmac_secret: Some("fuzz-secret-fuzz-secret-fuzz-secret!".into()),
        ..JwtConfig::default()
    };
    let verifier = Verifier::new(&config).unwrap().unwrap();
    if let Ok(token) = std::str::from_utf8(data) {
        assert!(verifier.verify(token).is_err(), "an unsigned input verified: {token:?}");
    }
});
