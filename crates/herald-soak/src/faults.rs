//! The faults a run injects, drawn from its seed: which one, on what, for how long,
//! and the pause before the next. One at a time, each undone before the next (a node
//! killed is started again, a cut link restored), so that the run keeps serving and
//! every fault is followed by its recovery.

use std::time::Duration;

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// SIGKILL node `i`, start it again after the pause.
    NodeKill(usize, Duration),
    /// SIGTERM node `i` (it drains), start it again after the pause.
    NodeTerm(usize, Duration),
    /// `kill -9` Redis, start it again from its files after the pause.
    RedisCrash(Duration),
    /// The same, and at once drop this share (permille) of the clients' connections:
    /// they come back while Redis is down, and their subscribes are answered
    /// `unavailable` (faults one at a time never overlap otherwise).
    RedisCrashDrop(Duration, u32),
    /// `kill -9` Redis, cut its AOF's tail (bytes), start again: a rollback.
    RedisAofTail(u64),
    /// `kill -9` Redis, start it from the last RDB snapshot alone: a rollback.
    RedisSnapshot,
    /// `CLIENT KILL TYPE pubsub`: every node's connection.
    ClientKillAll,
    /// `CLIENT KILL ID` of one node's connection (the `n`-th listed, modulo).
    ClientKillOne(u32),
    /// Cut the namespace's link for a while.
    NetCut(Duration),
    /// Drop this share (permille) of every client group's connections.
    ClientDrop(u32),
    /// This share (permille) of every client group's connections reads what the
    /// gateway sends at `rate` bytes per second (0: nothing) for a while, in the
    /// background: later faults come meanwhile. (The JS group stops reading whatever
    /// the rate.)
    SlowReaders {
        permille: u32,
        rate: u32,
        lasts: Duration,
    },
}

impl Fault {
    /// A short name, for the run's log and its counts.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Fault::NodeKill(..) => "node SIGKILL",
            Fault::NodeTerm(..) => "node SIGTERM",
            Fault::RedisCrash(_) => "redis kill -9",
            Fault::RedisCrashDrop(..) => "redis kill -9 + client drops",
            Fault::RedisAofTail(_) => "redis rollback (AOF tail cut)",
            Fault::RedisSnapshot => "redis rollback (RDB snapshot)",
            Fault::ClientKillAll => "CLIENT KILL every node's",
            Fault::ClientKillOne(_) => "CLIENT KILL one node's",
            Fault::NetCut(_) => "network cut",
            Fault::ClientDrop(_) => "client drops",
            Fault::SlowReaders { .. } => "slow readers",
        }
    }
}

/// Every fault's [`Fault::name`].
pub(crate) const NAMES: [&str; 11] = [
    "node SIGKILL",
    "node SIGTERM",
    "redis kill -9",
    "redis kill -9 + client drops",
    "redis rollback (AOF tail cut)",
    "redis rollback (RDB snapshot)",
    "CLIENT KILL every node's",
    "CLIENT KILL one node's",
    "network cut",
    "client drops",
    "slow readers",
];

/// Whether a schedule can draw only faults named in `names` (empty: every kind), with
/// or without the namespace: an unknown name, or only network cuts without the
/// namespace (nothing could be drawn), is an error.
pub(crate) fn check_only(names: &[String], netns: bool) -> anyhow::Result<()> {
    if let Some(unknown) = names.iter().find(|n| !NAMES.contains(&n.as_str())) {
        anyhow::bail!("no fault is named {unknown:?}; the faults: {NAMES:?}");
    }
    if !netns && !names.is_empty() && names.iter().all(|n| n == "network cut") {
        anyhow::bail!("network cuts need the namespace (run without --no-netns)");
    }
    Ok(())
}

/// Draws faults from a seed.
pub(crate) struct Schedule {
    rng: fastrand::Rng,
    nodes: usize,
    netns: bool,
    /// Only these kinds (names); empty: every kind.
    only: Vec<String>,
}

impl Schedule {
    pub(crate) fn new(seed: u64, nodes: usize, netns: bool) -> Schedule {
        Schedule {
            rng: fastrand::Rng::with_seed(seed),
            nodes,
            netns,
            only: Vec::new(),
        }
    }

    /// Draws only faults named in `names` (to aim a run at one path); see
    /// [`check_only`].
    pub(crate) fn only(mut self, names: &[String]) -> anyhow::Result<Schedule> {
        check_only(names, self.netns)?;
        self.only = names.to_vec();
        Ok(self)
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.rng.u64(lo..hi))
    }

    /// The next fault, and the pause after it is undone.
    pub(crate) fn next(&mut self) -> (Fault, Duration) {
        let fault = loop {
            let f = match self.rng.u32(0..100) {
                0..=17 => Fault::NodeKill(self.rng.usize(..self.nodes), self.ms(300, 3000)),
                18..=29 => Fault::NodeTerm(self.rng.usize(..self.nodes), self.ms(300, 2000)),
                30..=35 => Fault::RedisCrash(self.ms(100, 2000)),
                36..=39 => Fault::RedisCrashDrop(self.ms(3000, 6000), self.rng.u32(200..600)),
                40..=47 => Fault::RedisAofTail(self.rng.u64(1..64 * 1024)),
                48..=54 => Fault::RedisSnapshot,
                55..=60 => Fault::ClientKillAll,
                61..=66 => Fault::ClientKillOne(self.rng.u32(..)),
                67..=77 => Fault::NetCut(self.ms(500, 6000)),
                78..=90 => Fault::SlowReaders {
                    permille: self.rng.u32(100..500),
                    rate: match self.rng.u32(0..3) {
                        0 => 0,
                        _ => self.rng.u32(300..4000),
                    },
                    lasts: self.ms(2000, 10_000),
                },
                _ => Fault::ClientDrop(self.rng.u32(50..600)),
            };
            let wanted = self.only.is_empty() || self.only.iter().any(|n| n == f.name());
            if wanted && (self.netns || !matches!(f, Fault::NetCut(_))) {
                break f;
            }
        };
        (fault, self.ms(500, 4000))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_the_same_faults_and_draws_every_kind() {
        let draw = |seed| {
            let mut s = Schedule::new(seed, 3, true);
            (0..400).map(|_| s.next()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let names: std::collections::BTreeSet<&str> =
            draw(7).iter().map(|(f, _)| f.name()).collect();
        assert_eq!(
            names,
            NAMES.into_iter().collect(),
            "every kind drawn, each named"
        );
        let only = ["slow readers".to_owned(), "network cut".to_owned()];
        let mut s = Schedule::new(7, 3, true).only(&only).unwrap();
        for _ in 0..100 {
            let f = s.next().0;
            assert!(only.iter().any(|n| n == f.name()), "{f:?}");
        }
        assert!(Schedule::new(7, 3, true)
            .only(&["nope".to_owned()])
            .is_err());
        // Nothing to draw: an error, not a schedule that never returns.
        let cuts = ["network cut".to_owned()];
        assert!(Schedule::new(7, 3, false).only(&cuts).is_err());
        let mut s = Schedule::new(7, 3, false);
        assert!((0..400).all(|_| !matches!(s.next().0, Fault::NetCut(_))));
    }
}
