//! The rules of history channels, as pure functions the hub applies under its locks:
//! what to do with a publication that arrives at the node ([`verdict`]), and what a
//! subscriber receives when its subscribe completes ([`merge`]).
//!
//! Invariant: every subscriber of a history channel receives the channel's offsets in
//! order, each once, from the position it was given (`subscribed`) or resumed from
//! (`since`); where the node cannot keep that promise it says so with a `reset`.

use herald_protocol::client::Since;
use herald_protocol::{Publication, StreamPosition};

/// What the node does with an arriving publication, given the last one it delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The next offset (or the first the node sees): deliver it.
    Deliver,
    /// Already delivered (it came twice, or a repair fetched it first): skip it.
    Duplicate,
    /// Offsets after `after` are missing: fetch them from the stream first.
    Gap { after: u64 },
    /// The stream was reset (a new epoch): what came before may be lost.
    NewEpoch,
}

pub(crate) fn verdict(last: Option<StreamPosition>, p: StreamPosition) -> Verdict {
    match last {
        None => Verdict::Deliver,
        Some(l) if l.epoch != p.epoch => Verdict::NewEpoch,
        Some(l) if p.offset <= l.offset => Verdict::Duplicate,
        Some(l) if p.offset == l.offset + 1 => Verdict::Deliver,
        Some(l) => Verdict::Gap { after: l.offset },
    }
}

/// One thing a completing subscriber receives after its `subscribed` reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Out {
    Publication(Publication),
    /// Publications before this position's next one may be missing.
    Reset(StreamPosition),
}

/// How a subscribe on a history channel completes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Merged {
    Ready {
        /// For a resume: whether every missed publication follows.
        recovered: Option<bool>,
        /// What follows the `subscribed` reply, in order.
        out: Vec<Out>,
        /// The last position the subscriber will have received.
        through: StreamPosition,
    },
    /// Publications between the history read and the live ones are missing (they were
    /// lost in transit and are being repaired): read the history again.
    Incomplete,
}

/// Merges a history read (`top` and `history`, all of `top`'s epoch) with what arrived
/// live meanwhile (`pending`, in arrival order, any epoch, duplicates possible) into
/// what the subscriber gets. On the `last_attempt`, a hole left between history and
/// live publications is reported with a `reset` instead of asking for another read.
pub(crate) fn merge(
    top: StreamPosition,
    history: &[Publication],
    pending: &[Publication],
    since: Option<Since>,
    max_recovery: usize,
    last_attempt: bool,
) -> Merged {
    let mut out = Vec::new();
    let recovered = since.map(|s| {
        let missed = top.offset.checked_sub(s.offset);
        s.epoch == Some(top.epoch)
            && missed.is_some_and(|m| m <= max_recovery as u64)
            && covers(history, s.offset, top.offset)
    });
    if recovered == Some(true) {
        let from = since.map_or(top.offset, |s| s.offset);
        out.extend(
            history
                .iter()
                .filter(|p| p.offset().is_some_and(|o| o > from && o <= top.offset))
                .cloned()
                .map(Out::Publication),
        );
    }
    let mut at = top;
    let mut live: Vec<&Publication> = pending
        .iter()
        .filter(|p| {
            p.position
                .is_some_and(|q| q.epoch == top.epoch && q.offset > top.offset)
        })
        .collect();
    live.sort_by_key(|p| p.offset());
    live.dedup_by_key(|p| p.offset());
    for p in live {
        let Some(pos) = p.position else { continue };
        if pos.offset > at.offset + 1 {
            if !last_attempt {
                return Merged::Incomplete;
            }
            out.push(Out::Reset(StreamPosition {
                offset: pos.offset - 1,
                epoch: pos.epoch,
            }));
        }
        out.push(Out::Publication(p.clone()));
        at = pos;
    }
    // A newer epoch began meanwhile: say so, then continue in it.
    let mut newer: Vec<&Publication> = pending
        .iter()
        .filter(|p| p.position.is_some_and(|q| q.epoch != top.epoch))
        .collect();
    newer.dedup_by_key(|p| p.position);
    for p in newer {
        let Some(pos) = p.position else { continue };
        match verdict(Some(at), pos) {
            Verdict::Duplicate => continue,
            Verdict::Deliver => {}
            Verdict::Gap { .. } | Verdict::NewEpoch => out.push(Out::Reset(StreamPosition {
                offset: pos.offset.saturating_sub(1),
                epoch: pos.epoch,
            })),
        }
        out.push(Out::Publication(p.clone()));
        at = pos;
    }
    Merged::Ready {
        recovered,
        out,
        through: at,
    }
}

/// Whether `history` holds exactly the offsets `from + 1 ..= to`.
fn covers(history: &[Publication], from: u64, to: u64) -> bool {
    let mut want = from + 1;
    for o in history.iter().filter_map(Publication::offset) {
        if o <= from {
            continue;
        }
        if o != want || o > to {
            return false;
        }
        want += 1;
    }
    want == to + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use herald_protocol::{ChannelName, Epoch, Payload};

    const E: u64 = 7;

    fn pos(offset: u64) -> StreamPosition {
        StreamPosition {
            offset,
            epoch: Epoch::new(E).unwrap(),
        }
    }

    fn pubs(offsets: impl IntoIterator<Item = u64>) -> Vec<Publication> {
        offsets
            .into_iter()
            .map(|o| Publication {
                position: Some(pos(o)),
                ..Publication::now(
                    ChannelName::new("c").unwrap(),
                    Payload::Json(Bytes::from_static(b"1")),
                )
            })
            .collect()
    }

    fn since(offset: u64) -> Option<Since> {
        Some(Since {
            offset,
            epoch: Epoch::new(E),
        })
    }

    fn offsets(m: &Merged) -> Vec<i64> {
        let Merged::Ready { out, .. } = m else {
            panic!("incomplete")
        };
        out.iter()
            .map(|o| match o {
                Out::Publication(p) => p.offset().unwrap() as i64,
                Out::Reset(p) => -(p.offset as i64),
            })
            .collect()
    }

    #[test]
    fn verdicts() {
        assert_eq!(verdict(None, pos(5)), Verdict::Deliver);
        assert_eq!(verdict(Some(pos(4)), pos(5)), Verdict::Deliver);
        assert_eq!(verdict(Some(pos(5)), pos(5)), Verdict::Duplicate);
        assert_eq!(verdict(Some(pos(4)), pos(7)), Verdict::Gap { after: 4 });
        let other = StreamPosition {
            offset: 1,
            epoch: Epoch::new(E + 1).unwrap(),
        };
        assert_eq!(verdict(Some(pos(4)), other), Verdict::NewEpoch);
    }

    #[test]
    fn resume_replays_history_then_live_without_duplicates() {
        // Read history 42..=57; live arrivals overlap it and continue.
        let m = merge(
            pos(57),
            &pubs(42..=57),
            &pubs(55..=60),
            since(41),
            100,
            false,
        );
        assert_eq!(offsets(&m), (42..=60).collect::<Vec<_>>());
        let Merged::Ready {
            recovered, through, ..
        } = m
        else {
            unreachable!()
        };
        assert_eq!((recovered, through), (Some(true), pos(60)));
    }

    #[test]
    fn resume_is_refused_whole_never_partial() {
        // Trimmed: history starts after what the client missed.
        let m = merge(pos(57), &pubs(50..=57), &[], since(41), 100, false);
        assert_eq!(offsets(&m), Vec::<i64>::new());
        assert!(
            matches!(m, Merged::Ready { recovered: Some(false), through, .. } if through == pos(57))
        );
        // Too many missed.
        let m = merge(pos(57), &pubs(42..=57), &[], since(41), 10, false);
        assert!(matches!(
            m,
            Merged::Ready {
                recovered: Some(false),
                ..
            }
        ));
        // Another epoch.
        let other = Some(Since {
            offset: 41,
            epoch: Epoch::new(E + 1),
        });
        let m = merge(pos(57), &pubs(42..=57), &[], other, 100, false);
        assert!(matches!(
            m,
            Merged::Ready {
                recovered: Some(false),
                ..
            }
        ));
        // An offset from the future (of another run).
        let m = merge(pos(57), &pubs(42..=57), &[], since(90), 100, false);
        assert!(matches!(
            m,
            Merged::Ready {
                recovered: Some(false),
                ..
            }
        ));
        // Nothing missed.
        let m = merge(pos(57), &[], &pubs([58]), since(57), 100, false);
        assert_eq!(offsets(&m), vec![58]);
        assert!(matches!(
            m,
            Merged::Ready {
                recovered: Some(true),
                ..
            }
        ));
    }

    #[test]
    fn a_hole_between_history_and_live_asks_for_another_read_then_resets() {
        let m = merge(
            pos(57),
            &pubs(42..=57),
            &pubs([60, 61]),
            since(41),
            100,
            false,
        );
        assert_eq!(m, Merged::Incomplete);
        let m = merge(
            pos(57),
            &pubs(42..=57),
            &pubs([60, 61]),
            since(41),
            100,
            true,
        );
        let mut want: Vec<i64> = (42..=57).collect();
        want.extend([-59, 60, 61]);
        assert_eq!(offsets(&m), want);
    }

    #[test]
    fn a_plain_subscribe_starts_at_the_top() {
        let m = merge(pos(57), &[], &pubs([56, 57, 58, 59]), None, 100, false);
        assert_eq!(offsets(&m), vec![58, 59]);
        assert!(matches!(m, Merged::Ready { recovered: None, through, .. } if through == pos(59)));
    }

    #[test]
    fn a_new_epoch_meanwhile_is_announced() {
        let mut newer = pubs([1, 2]);
        for p in &mut newer {
            p.position = p.position.map(|q| StreamPosition {
                epoch: Epoch::new(E + 1).unwrap(),
                ..q
            });
        }
        let m = merge(pos(57), &[], &newer, None, 100, false);
        assert_eq!(offsets(&m), vec![0, 1, 2]);
    }
}
