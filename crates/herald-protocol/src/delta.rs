//! Fossil delta compression of deliveries on channels whose rule says
//! `delta = "fossil"`, for subscriptions that ask for it.
//!
//! A delta turns the previous publication's data (the subscriber's *base*) into the
//! next one's, in Fossil's delta format (<https://fossil-scm.org/home/doc/tip/www/delta_format.wiki>),
//! which the `fossil-delta` packages for JavaScript and other languages read. The node
//! computes it once per publication and channel, and sends it only where it is smaller
//! than the data and is UTF-8 (it travels in a JSON string: a delta copies byte ranges
//! of the data, which may split a character).

/// The one delta format there is, as subscribe requests and rules name it.
pub const FOSSIL: &str = "fossil";

/// The delta turning `base` into `target`, as text; `None` when it would not be UTF-8.
pub fn fossil(base: &[u8], target: &[u8]) -> Option<String> {
    // (`fossil_delta::delta(a, b)` is the delta that turns `b` into `a`.)
    String::from_utf8(fossil_delta::delta(target, base)).ok()
}

/// Why a delta could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed or mismatched fossil delta")]
pub struct DeltaError;

/// Applies a Fossil `delta` to `base`: the target's bytes, checked against the delta's
/// checksum. A malformed delta, one made for another base, or one whose target would
/// be longer than `max_len` is an error (never a panic, whatever the bytes).
pub fn apply_fossil(base: &[u8], delta: &[u8], max_len: usize) -> Result<Vec<u8>, DeltaError> {
    // The header is the target's size in base-64 digits and a newline. The crate
    // reserves that size before reading on (reading it into 32 bits, where the
    // reservation takes all of it): at most 5 digits (under 2^30), and at most
    // `max_len`. The last command is the checksum (`;`): without it the crate would
    // return what it built unchecked.
    let digits = delta.iter().position(|&b| b == b'\n').ok_or(DeltaError)?;
    let size = fossil_delta::delta_output_size(delta);
    if digits == 0 || digits > 5 || size > max_len || delta.last() != Some(&b';') {
        return Err(DeltaError);
    }
    // The crate indexes past the end of a truncated delta instead of failing; such a
    // delta is an error like any other.
    let out = std::panic::catch_unwind(|| fossil_delta::apply(base, delta))
        .map_err(|_| DeltaError)?
        .map_err(|_| DeltaError)?;
    if out.len() != size {
        return Err(DeltaError);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_small_change_in_a_document_is_a_small_delta() {
        let base = br#"{"match":"A-B","score":[1,0],"minute":41,"events":["goal 12'","card 30'"],"venue":"Stadium of Light, Sunderland"}"#;
        let next = br#"{"match":"A-B","score":[1,1],"minute":42,"events":["goal 12'","card 30'","goal 42'"],"venue":"Stadium of Light, Sunderland"}"#;
        let d = fossil(base, next).unwrap();
        assert!(d.len() < next.len() / 2, "{} bytes: {d}", d.len());
        assert_eq!(apply_fossil(base, d.as_bytes(), 1 << 20).unwrap(), next);
    }

    /// The example in PROTOCOL.md ("Deltas").
    #[test]
    fn the_documented_example_holds() {
        let base = br#"{"match":"Sunderland - Newcastle","minute":41,"score":[1,0],"possession":[54,46],"venue":"Stadium of Light"}"#;
        let next = br#"{"match":"Sunderland - Newcastle","minute":42,"score":[1,1],"possession":[53,47],"venue":"Stadium of Light"}"#;
        let delta: String =
            serde_json::from_str(r#""1h\nh@0,E:2,\"score\":[1,1H@v,4:3,47T@1F,1_7qqz;""#).unwrap();
        assert_eq!(fossil(base, next).unwrap(), delta);
        assert_eq!(apply_fossil(base, delta.as_bytes(), 1 << 10).unwrap(), next);
        assert_eq!((delta.len(), next.len()), (45, 108));
    }

    #[test]
    fn a_bad_delta_is_an_error_not_a_panic() {
        let base = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let good = fossil(base, b"0123456789abcdefghijklmnopqrstuvwxyz!").unwrap();
        for cut in 0..good.len() {
            let _ = apply_fossil(base, &good.as_bytes()[..cut], 1 << 20);
        }
        assert!(apply_fossil(
            b"another base entirely, not the one",
            good.as_bytes(),
            1 << 20
        )
        .is_err());
        assert!(apply_fossil(base, b"", 1 << 20).is_err());
        assert!(apply_fossil(base, b"5\n9@99999,0;", 1 << 20).is_err());
        // A header naming a huge target is refused before anything is reserved: over
        // the limit, or past 32 bits (which the crate would read truncated).
        assert!(apply_fossil(base, b"zzzzz\n1:a0;", 1 << 20).is_err());
        assert!(apply_fossil(base, b"4000005\n1:a0;", 1 << 26).is_err());
        // No checksum, or a result of another size than the header says.
        assert!(apply_fossil(base, b"3\n3:abc", 1 << 20).is_err());
        let abc = fossil(b"", b"abc").unwrap();
        assert_eq!(apply_fossil(b"", abc.as_bytes(), 1 << 20).unwrap(), b"abc");
        let longer = abc.replacen('3', "4", 1);
        assert!(apply_fossil(b"", longer.as_bytes(), 1 << 20).is_err());
    }

    proptest! {
        #[test]
        fn applying_the_delta_gives_the_target(
            base in proptest::collection::vec(any::<u8>(), 0..300),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..20, proptest::collection::vec(any::<u8>(), 0..10)), 0..5),
        ) {
            let mut target = base.clone();
            for (at, cut, insert) in edits {
                let i = if target.is_empty() { 0 } else { at.index(target.len()) };
                let end = (i + cut).min(target.len());
                target.splice(i..end, insert);
            }
            let d = fossil_delta::delta(&target, &base);
            prop_assert_eq!(apply_fossil(&base, &d, 1 << 20).unwrap(), target);
        }

        #[test]
        fn any_bytes_as_a_delta_never_panic(
            base in proptest::collection::vec(any::<u8>(), 0..64),
            delta in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = apply_fossil(&base, &delta, 1 << 20);
        }
    }
}
