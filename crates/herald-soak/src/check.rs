//! The delivery checker: reads every client's events as they come and every publish
//! attempt at the end, and names each broken promise.
//!
//! Per subscription (a client on a channel):
//! - **duplicate**: one attempt of a message delivered twice;
//! - **reorder**: a message older than one already delivered (one publisher per
//!   channel publishes message `m + 1` only after `m` was acknowledged), or on a
//!   history channel an offset at or below the last one;
//! - **gap**: on a history channel, an offset that skips some, with no `reset` or
//!   `recovered:false` in between.
//!
//! Against the publishers' record:
//! - **missing**: an acknowledged publication on a history channel that a client
//!   subscribed before it was sent, and still subscribed at the end, never got, with no
//!   `reset` / `recovered:false` announced to it after the publication was sent;
//! - **lie**: an attempt answered "nothing was published" (503, a 4xx) that a client
//!   received;
//! - **wrong offset**: an attempt delivered at another offset than its reply named;
//! - **stalled**: a subscription that stopped receiving (found by the run's final
//!   fence, [`Checker::behind`]);
//! - **refused** / **unexpected**: a subscribe refused, or a publish answered with a
//!   status the soak never provokes;
//! - **corrupt**: a message whose data is not what its publisher sent (half the
//!   clients take Fossil deltas on history channels and rebuild each message).
//!
//! Plain channels promise at most once: their undelivered publications are counted,
//! not violations.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::record::{Kind, Outcome, Record, Sent};

/// Whether a channel keeps history (the soak's rule: `h:*` does).
pub(crate) fn is_history(ch: &str) -> bool {
    ch.starts_with("h:")
}

/// A set of message numbers.
#[derive(Default)]
struct Bits(Vec<u64>);

impl Bits {
    fn set(&mut self, m: u64) {
        let (w, b) = ((m / 64) as usize, m % 64);
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        self.0[w] |= 1 << b;
    }

    fn get(&self, m: u64) -> bool {
        self.0
            .get((m / 64) as usize)
            .is_some_and(|w| w & (1 << (m % 64)) != 0)
    }
}

/// One client's subscription to one channel.
#[derive(Default)]
struct Sub {
    /// When the server first confirmed it.
    confirmed: Option<u64>,
    /// The group stopped it at the end of the run (so it was subscribed throughout).
    ended: bool,
    /// The subscribe was refused.
    refused: bool,
    /// History channels: the last offset delivered since the last announcement.
    last_offset: Option<u64>,
    /// The newest message delivered, and which of its attempts.
    last_m: u64,
    last_attempts: Vec<u32>,
    /// Every message delivered.
    got: Bits,
    /// When gaps were announced (`reset`, `recovered:false`), and the newest message
    /// delivered before each: an announcement covers only messages after that one.
    announced: Vec<(u64, u64)>,
    /// Deliveries.
    messages: u64,
}

impl Sub {
    /// Whether a gap was announced that covers message `m` published at `t`: after the
    /// publication, and before anything newer than `m` was delivered (a client that had
    /// already received a later message was told nothing about `m` by a later reset).
    fn announced_for(&self, m: u64, t: u64) -> bool {
        self.announced
            .iter()
            .any(|&(at, last_m)| at >= t && last_m < m)
    }
}

/// A broken promise.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Violation {
    /// Which (`duplicate`, `reorder`, `gap`, `missing`, `lie`, ...).
    pub(crate) kind: &'static str,
    /// Who and what.
    pub(crate) detail: String,
}

/// What a run delivered and broke.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Report {
    /// Client events read.
    pub(crate) events: u64,
    /// Publications delivered to clients.
    pub(crate) deliveries: u64,
    /// Subscriptions watched.
    pub(crate) subscriptions: usize,
    /// Of which subscribed throughout (checked for `missing`).
    pub(crate) continuous: usize,
    /// Messages published / acknowledged / given up.
    pub(crate) messages: usize,
    pub(crate) acked: usize,
    pub(crate) unacked: usize,
    /// Publish attempts, and how they were answered.
    pub(crate) attempts: usize,
    pub(crate) answered_unknown: usize,
    pub(crate) answered_not_published: usize,
    /// Announced gaps (`reset` + `recovered:false`) seen by clients.
    pub(crate) announcements: u64,
    /// Plain channels: acknowledged publications a subscribed client did not get (at
    /// most once allows it).
    pub(crate) plain_undelivered: u64,
    /// Every violation found, by kind.
    pub(crate) violations_by_kind: BTreeMap<&'static str, usize>,
    /// The first violations of each kind, in detail.
    pub(crate) violations: Vec<Violation>,
}

/// Reads events as they come; judges at the end.
#[derive(Default)]
pub(crate) struct Checker {
    subs: HashMap<(String, String), Sub>,
    /// The offset each delivered attempt came with (0 without history): `(ch, m, a)`.
    delivered: HashMap<(String, u64, u32), u64>,
    events: u64,
    deliveries: u64,
    announcements: u64,
    found: Vec<Violation>,
    /// Whether an announced gap is itself a violation: in a run whose only disruption
    /// is a rolling update nothing is lost, so `recovered:false` or `reset` would be a
    /// message lost and merely admitted.
    gaps_forbidden: bool,
}

/// Violations kept in detail per kind (all are counted).
const DETAIL_PER_KIND: usize = 20;

impl Checker {
    /// A checker for a run where every gap, even announced, is a loss.
    pub(crate) fn forbidding_gaps() -> Checker {
        Checker {
            gaps_forbidden: true,
            ..Checker::default()
        }
    }

    fn violation(&mut self, kind: &'static str, detail: String) {
        self.found.push(Violation { kind, detail });
    }

    /// One client event.
    pub(crate) fn record(&mut self, r: &Record) {
        self.events += 1;
        let key = (r.c.clone(), r.ch.clone());
        let sub = self.subs.entry(key).or_default();
        let mut found = Vec::new();
        match r.k {
            Kind::Start | Kind::Rec => {}
            Kind::Sub => {
                sub.confirmed.get_or_insert(r.t);
            }
            Kind::Lost | Kind::Reset => {
                sub.announced.push((r.t, sub.last_m));
                sub.last_offset = None;
                self.announcements += 1;
                if self.gaps_forbidden {
                    found.push((
                        "announced_gap",
                        format!(
                            "{} on {}: {:?} after message {}",
                            r.c, r.ch, r.k, sub.last_m
                        ),
                    ));
                }
            }
            Kind::Refused => {
                sub.refused = true;
                found.push((
                    "refused",
                    format!(
                        "{} on {}: subscribe refused ({})",
                        r.c,
                        r.ch,
                        r.why.as_deref().unwrap_or("no reason given")
                    ),
                ));
            }
            Kind::End => sub.ended = true,
            Kind::Corrupt => found.push((
                "corrupt",
                format!(
                    "{} on {} at offset {:?}: {}",
                    r.c,
                    r.ch,
                    r.o,
                    r.why.as_deref().unwrap_or("")
                ),
            )),
            Kind::Msg => {
                self.deliveries += 1;
                sub.messages += 1;
                let (Some(m), Some(a)) = (r.m, r.a) else {
                    found.push((
                        "unexpected",
                        format!("{} on {}: a message without m/a", r.c, r.ch),
                    ));
                    return self.push(found);
                };
                if let Some(o) = r.o.filter(|_| is_history(&r.ch)) {
                    match sub.last_offset {
                        Some(l) if o <= l => found.push((
                            "reorder",
                            format!("{} on {}: offset {o} after {l} (m {m})", r.c, r.ch),
                        )),
                        Some(l) if o > l + 1 => found.push((
                            "gap",
                            format!(
                                "{} on {}: offset {o} after {l} with no reset or recovered:false (m {m})",
                                r.c, r.ch
                            ),
                        )),
                        _ => {}
                    }
                    sub.last_offset = Some(o);
                } else if is_history(&r.ch) {
                    found.push((
                        "unexpected",
                        format!("{} on {}: m {m} without an offset", r.c, r.ch),
                    ));
                }
                if m < sub.last_m {
                    found.push((
                        "reorder",
                        format!("{} on {}: m {m} after m {}", r.c, r.ch, sub.last_m),
                    ));
                } else if m == sub.last_m && sub.last_attempts.contains(&a) {
                    found.push((
                        "duplicate",
                        format!("{} on {}: m {m} attempt {a} twice", r.c, r.ch),
                    ));
                } else if m == sub.last_m {
                    sub.last_attempts.push(a);
                } else {
                    sub.last_m = m;
                    sub.last_attempts = vec![a];
                }
                sub.got.set(m);
                self.delivered
                    .entry((r.ch.clone(), m, a))
                    .or_insert(r.o.unwrap_or(0));
            }
        }
        self.push(found);
    }

    fn push(&mut self, found: Vec<(&'static str, String)>) {
        for (kind, detail) in found {
            self.violation(kind, detail);
        }
    }

    /// Subscriptions the server has confirmed at least once.
    pub(crate) fn confirmed(&self) -> usize {
        self.subs.values().filter(|s| s.confirmed.is_some()).count()
    }

    /// Subscriptions (client, channel) that have not yet received message `upto[ch]` or
    /// a later one (refused and ended ones excepted): the final fence waits for none to
    /// be left. An announced gap does not count: publishing goes on meanwhile, so a
    /// live subscription gets later messages whatever it lost.
    pub(crate) fn behind(&self, upto: &HashMap<String, u64>) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .subs
            .iter()
            .filter(|(_, s)| !s.refused && !s.ended)
            .filter(|((_, ch), s)| upto.get(ch).is_some_and(|&m| s.last_m < m))
            .map(|(k, _)| k.clone())
            .collect();
        out.sort();
        out
    }

    /// Marks subscriptions the final fence found stalled.
    pub(crate) fn stalled(&mut self, subs: &[(String, String)]) {
        for (c, ch) in subs {
            self.violation(
                "stalled",
                format!("{c} on {ch}: received nothing new by the end of the final fence"),
            );
        }
    }

    /// A pod still running at the end of its termination grace period (SIGKILLed): the
    /// manifests promise a drain within it.
    pub(crate) fn grace_exceeded(&mut self, detail: String) {
        self.violation("grace_exceeded", detail);
    }

    /// A publish answered with a status the soak never provokes.
    pub(crate) fn unexpected(&mut self, detail: String) {
        self.violation("unexpected", detail);
    }

    /// Judges the run against every message sent.
    pub(crate) fn finish(mut self, sent: &[Sent]) -> Report {
        let mut report = Report {
            events: self.events,
            deliveries: self.deliveries,
            subscriptions: self.subs.len(),
            continuous: self
                .subs
                .values()
                .filter(|s| s.ended && !s.refused && s.confirmed.is_some())
                .count(),
            messages: sent.len(),
            announcements: self.announcements,
            ..Report::default()
        };
        // Subscriptions by channel, for the per-message pass.
        let mut by_channel: HashMap<&str, Vec<(&str, &Sub)>> = HashMap::new();
        for ((c, ch), s) in &self.subs {
            by_channel.entry(ch).or_default().push((c, s));
        }
        let mut found = Vec::new();
        for msg in sent {
            report.attempts += msg.attempts.len();
            for at in &msg.attempts {
                let got = self.delivered.get(&(msg.ch.clone(), msg.m, at.a));
                match at.outcome {
                    Outcome::NotPublished(status) => {
                        report.answered_not_published += 1;
                        if got.is_some() {
                            found.push((
                                "lie",
                                format!(
                                    "{} m {} attempt {}: answered {status} (nothing published) but delivered",
                                    msg.ch, msg.m, at.a
                                ),
                            ));
                        }
                    }
                    Outcome::Unknown => report.answered_unknown += 1,
                    Outcome::Acked {
                        offset,
                        duplicate: false,
                    } => {
                        if let Some(&o) = got.filter(|&&o| o != offset) {
                            found.push((
                                "wrong offset",
                                format!(
                                    "{} m {} attempt {}: answered offset {offset}, delivered at {o}",
                                    msg.ch, msg.m, at.a
                                ),
                            ));
                        }
                    }
                    Outcome::Acked { .. } | Outcome::NotSent => {}
                }
            }
            if !msg.acked() {
                report.unacked += 1;
                continue;
            }
            report.acked += 1;
            let start = msg.published_from();
            for (c, s) in by_channel.get(msg.ch.as_str()).into_iter().flatten() {
                let continuous = s.ended && !s.refused && s.confirmed.is_some_and(|t| t < start);
                if !continuous || s.got.get(msg.m) || s.announced_for(msg.m, start) {
                    continue;
                }
                if is_history(&msg.ch) {
                    found.push((
                        "missing",
                        format!(
                            "{c} on {}: acknowledged m {} (sent at {start}) never delivered, no gap announced after it",
                            msg.ch, msg.m
                        ),
                    ));
                } else {
                    report.plain_undelivered += 1;
                }
            }
        }
        self.push(found);
        for v in self.found {
            let n = report.violations_by_kind.entry(v.kind).or_default();
            *n += 1;
            if *n <= DETAIL_PER_KIND {
                report.violations.push(v);
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Attempt;

    fn ev(c: &str, ch: &str, t: u64, k: Kind) -> Record {
        Record {
            c: c.into(),
            ch: ch.into(),
            t,
            k,
            m: None,
            a: None,
            o: None,
            why: None,
        }
    }

    fn msg(c: &str, ch: &str, t: u64, m: u64, a: u32, o: Option<u64>) -> Record {
        Record {
            m: Some(m),
            a: Some(a),
            o,
            ..ev(c, ch, t, Kind::Msg)
        }
    }

    fn acked(ch: &str, m: u64, start: u64, offset: u64) -> Sent {
        Sent {
            ch: ch.into(),
            m,
            attempts: vec![Attempt {
                a: 1,
                start,
                outcome: Outcome::Acked {
                    offset,
                    duplicate: false,
                },
            }],
        }
    }

    /// A client subscribed at t=10 to `h:0`, then `events`, then ended; judged against
    /// messages 1..=n acknowledged at t = 100 * m with offset m.
    fn judge(events: &[Record], n: u64) -> Report {
        let mut c = Checker::default();
        c.record(&ev("r1", "h:0", 5, Kind::Start));
        c.record(&ev("r1", "h:0", 10, Kind::Sub));
        for e in events {
            c.record(e);
        }
        c.record(&ev("r1", "h:0", 10_000, Kind::End));
        let sent: Vec<Sent> = (1..=n).map(|m| acked("h:0", m, 100 * m, m)).collect();
        c.finish(&sent)
    }

    fn kinds(r: &Report) -> Vec<&'static str> {
        r.violations_by_kind.keys().copied().collect()
    }

    #[test]
    fn a_clean_run_has_no_violation() {
        let events: Vec<Record> = (1..=3)
            .map(|m| msg("r1", "h:0", 100 * m + 5, m, 1, Some(m)))
            .collect();
        let r = judge(&events, 3);
        assert!(r.violations.is_empty(), "{r:?}");
        assert_eq!((r.deliveries, r.acked, r.continuous), (3, 3, 1));
    }

    #[test]
    fn each_broken_promise_is_named() {
        let m = |m, o| msg("r1", "h:0", 100 * m + 5, m, 1, Some(o));
        // Duplicate: the same attempt twice (at a higher offset, so only that).
        let dup = msg("r1", "h:0", 205, 1, 1, Some(2));
        assert!(kinds(&judge(&[m(1, 1), dup], 1)).contains(&"duplicate"));
        // Reorder by offset, and by message number.
        assert!(kinds(&judge(&[m(1, 2), m(2, 1)], 2)).contains(&"reorder"));
        // A gap without an announcement, and the acknowledged message it skipped.
        let r = judge(&[m(1, 1), m(3, 3)], 3);
        assert_eq!(kinds(&r), vec!["gap", "missing"]);
        // Missing at the end: acknowledged, never delivered.
        assert_eq!(kinds(&judge(&[m(1, 1)], 2)), vec!["missing"]);
    }

    #[test]
    fn an_announced_gap_is_no_violation() {
        let events = [
            msg("r1", "h:0", 105, 1, 1, Some(1)),
            ev("r1", "h:0", 250, Kind::Reset),
            msg("r1", "h:0", 305, 3, 1, Some(3)),
        ];
        let r = judge(&events, 3);
        assert!(r.violations.is_empty(), "{r:?}");
        // ...but an announcement before a message was sent does not excuse it,
        let events = [
            msg("r1", "h:0", 105, 1, 1, Some(1)),
            ev("r1", "h:0", 150, Kind::Lost),
            msg("r1", "h:0", 305, 3, 1, Some(3)),
        ];
        assert_eq!(kinds(&judge(&events, 3)), vec!["missing"]);
        // nor one made after something newer was delivered (m 2 is lost silently,
        // then a reset comes late),
        let events = [
            msg("r1", "h:0", 105, 1, 1, Some(1)),
            ev("r1", "h:0", 150, Kind::Reset),
            msg("r1", "h:0", 305, 3, 1, Some(3)),
            ev("r1", "h:0", 400, Kind::Reset),
        ];
        assert_eq!(kinds(&judge(&events, 3)), vec!["missing"]);
        let mut c = Checker::default();
        c.record(&ev("r1", "h:0", 10, Kind::Sub));
        c.record(&ev("r1", "h:0", 150, Kind::Reset));
        c.record(&ev("r1", "h:0", 10_000, Kind::End));
        // nor one made before the attempt that published it (the first was refused).
        let sent = Sent {
            ch: "h:0".into(),
            m: 1,
            attempts: vec![
                Attempt {
                    a: 1,
                    start: 100,
                    outcome: Outcome::NotPublished(503),
                },
                Attempt {
                    a: 2,
                    start: 200,
                    outcome: Outcome::Acked {
                        offset: 1,
                        duplicate: false,
                    },
                },
            ],
        };
        assert_eq!(kinds(&c.finish(&[sent])), vec!["missing"]);
    }

    #[test]
    fn a_reply_that_lied_is_named() {
        let mut c = Checker::default();
        c.record(&ev("r1", "p:0", 10, Kind::Sub));
        c.record(&msg("r1", "p:0", 120, 1, 1, None));
        c.record(&msg("r1", "p:0", 130, 1, 2, None));
        let sent = Sent {
            ch: "p:0".into(),
            m: 1,
            attempts: vec![
                Attempt {
                    a: 1,
                    start: 100,
                    outcome: Outcome::NotPublished(503),
                },
                Attempt {
                    a: 2,
                    start: 110,
                    outcome: Outcome::Acked {
                        offset: 0,
                        duplicate: false,
                    },
                },
            ],
        };
        let r = c.finish(&[sent]);
        assert_eq!(kinds(&r), vec!["lie"], "{r:?}");
    }

    #[test]
    fn a_wrong_offset_is_named() {
        let r = judge(
            &[
                msg("r1", "h:0", 105, 1, 1, Some(1)),
                msg("r1", "h:0", 205, 2, 1, Some(2)),
            ],
            1,
        );
        assert!(r.violations.is_empty(), "{r:?}");
        let mut c = Checker::default();
        c.record(&ev("r1", "h:0", 10, Kind::Sub));
        c.record(&msg("r1", "h:0", 105, 1, 1, Some(4)));
        c.record(&ev("r1", "h:0", 10_000, Kind::End));
        let r = c.finish(&[acked("h:0", 1, 100, 1)]);
        assert_eq!(kinds(&r), vec!["wrong offset"]);
    }

    #[test]
    fn plain_channels_count_losses_and_late_subscribers_are_not_judged() {
        let mut c = Checker::default();
        c.record(&ev("r1", "p:0", 10, Kind::Sub));
        c.record(&ev("r1", "p:0", 10_000, Kind::End));
        // Subscribed after the message was sent: not owed it.
        c.record(&ev("r2", "h:0", 500, Kind::Sub));
        c.record(&ev("r2", "h:0", 10_000, Kind::End));
        let r = c.finish(&[acked("p:0", 1, 100, 0), acked("h:0", 1, 100, 1)]);
        assert!(r.violations.is_empty(), "{r:?}");
        assert_eq!(r.plain_undelivered, 1);
    }

    #[test]
    fn the_fence_finds_who_is_behind() {
        let mut c = Checker::default();
        c.record(&ev("r1", "h:0", 10, Kind::Sub));
        c.record(&ev("r2", "h:0", 10, Kind::Sub));
        c.record(&msg("r1", "h:0", 105, 7, 1, Some(7)));
        let upto = HashMap::from([("h:0".to_owned(), 7)]);
        assert_eq!(c.behind(&upto), vec![("r2".to_owned(), "h:0".to_owned())]);
        c.record(&ev("r2", "h:0", 60, Kind::Reset));
        assert_eq!(c.behind(&upto).len(), 1, "a reset is not progress");
        c.record(&msg("r2", "h:0", 205, 8, 1, Some(1)));
        assert!(c.behind(&upto).is_empty());
    }
}
