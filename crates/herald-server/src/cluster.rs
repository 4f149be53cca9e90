//! What a node knows of its cluster, for the control plane: which nodes are alive (each
//! says so on the control channel every `control.heartbeat_interval`) and which surveys
//! it is waiting on; and, for presence, which members are this node's own. Plain state;
//! the `control` and `presence` modules run the tasks that feed it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herald_protocol::control::{reply_channel, Answer};
use herald_protocol::presence::Member;
use herald_protocol::ChannelName;
use parking_lot::Mutex;
use tokio::sync::mpsc;

/// This node's presence members, per channel (what it refreshes).
pub(crate) struct LocalMembers {
    /// Channel → connection id → member.
    pub(crate) channels: Mutex<HashMap<ChannelName, HashMap<String, Member>>>,
    /// Turns: one presence change (join, leave, refresh) at a time per channel, by
    /// channel hash.
    turns: Box<[tokio::sync::Mutex<()>]>,
    /// Picks a channel's turn.
    hasher: std::hash::RandomState,
    /// A refresh is running.
    pub(crate) refreshing: std::sync::atomic::AtomicBool,
}

impl Default for LocalMembers {
    fn default() -> Self {
        LocalMembers {
            channels: Mutex::default(),
            turns: (0..64).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: std::hash::RandomState::new(),
            refreshing: Default::default(),
        }
    }
}

impl LocalMembers {
    /// Waits for `channel`'s turn.
    pub(crate) async fn turn(&self, channel: &ChannelName) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::BuildHasher;
        let i = self.hasher.hash_one(channel.as_str()) as usize % self.turns.len();
        self.turns[i].lock().await
    }
}

/// A node not heard from for this many heartbeat intervals is no longer waited for...
const MISSED_HEARTBEATS: u32 = 3;
/// ...and after this many, no longer named missing either (it is gone).
const FORGET_AFTER: u32 = 30;

/// One node's view of the cluster.
pub(crate) struct Cluster {
    /// Where other nodes answer this node's surveys (random per process).
    pub(crate) reply: ChannelName,
    /// Other nodes, by id, and when each last said it is alive.
    members: Mutex<HashMap<String, Instant>>,
    /// Surveys waiting for answers, by id.
    surveys: Mutex<HashMap<u64, mpsc::UnboundedSender<(String, Answer)>>>,
    /// The next survey's id.
    next_survey: AtomicU64,
    /// `control.heartbeat_interval`.
    heartbeat: Duration,
}

/// A survey this node is running: answers arrive on `answers` until it is dropped.
pub(crate) struct Open<'c> {
    /// The survey's id.
    pub(crate) id: u64,
    /// Each answering node's id and answer.
    pub(crate) answers: mpsc::UnboundedReceiver<(String, Answer)>,
    /// Whose survey (to close it on drop).
    cluster: &'c Cluster,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.cluster.surveys.lock().remove(&self.id);
    }
}

impl Cluster {
    pub(crate) fn new(heartbeat: Duration) -> Self {
        Cluster {
            reply: reply_channel(fastrand::u64(..)),
            members: Mutex::default(),
            surveys: Mutex::default(),
            next_survey: AtomicU64::new(1),
            heartbeat,
        }
    }

    /// `node` said it is alive; whether it was new to this node (then it should hear
    /// from this node at once, not a heartbeat later).
    pub(crate) fn alive(&self, node: &str) -> bool {
        self.members
            .lock()
            .insert(node.to_owned(), Instant::now())
            .is_none()
    }

    /// `node` said it is leaving.
    pub(crate) fn gone(&self, node: &str) {
        self.members.lock().remove(node);
    }

    /// The other nodes heard from recently (within [`MISSED_HEARTBEATS`] intervals),
    /// sorted: a survey waits for these.
    pub(crate) fn members(&self) -> Vec<String> {
        self.heard(|age| age <= self.heartbeat * MISSED_HEARTBEATS)
    }

    /// Nodes that went silent without saying they leave (not heard from for
    /// [`MISSED_HEARTBEATS`] intervals, but within [`FORGET_AFTER`]): a survey does not
    /// wait for them but names them missing, since a node frozen or cut off from the
    /// broker may still hold connections a command was meant for.
    pub(crate) fn silent(&self) -> Vec<String> {
        let recent = self.heartbeat * MISSED_HEARTBEATS;
        self.heard(|age| age > recent)
    }

    fn heard(&self, keep: impl Fn(Duration) -> bool) -> Vec<String> {
        let forget = self.heartbeat * FORGET_AFTER;
        let mut m = self.members.lock();
        m.retain(|_, seen| seen.elapsed() <= forget);
        let mut ids: Vec<String> = m
            .iter()
            .filter(|(_, seen)| keep(seen.elapsed()))
            .map(|(id, _)| id.clone())
            .collect();
        ids.sort();
        ids
    }

    /// Starts waiting for a survey's answers.
    pub(crate) fn open(&self) -> Open<'_> {
        let id = self.next_survey.fetch_add(1, Ordering::Relaxed);
        let (tx, answers) = mpsc::unbounded_channel();
        self.surveys.lock().insert(id, tx);
        Open {
            id,
            answers,
            cluster: self,
        }
    }

    /// An answer arrived (one for a survey no longer waiting is dropped).
    pub(crate) fn answer(&self, id: u64, node: String, answer: Answer) {
        if let Some(tx) = self.surveys.lock().get(&id) {
            let _ = tx.send((node, answer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_expire_and_leave() {
        let c = Cluster::new(Duration::from_millis(20));
        assert!(c.alive("b"));
        assert!(c.alive("a"));
        assert!(!c.alive("a"), "known already");
        assert_eq!(c.members(), ["a", "b"]);
        c.gone("a");
        assert_eq!(c.members(), ["b"]);
        std::thread::sleep(Duration::from_millis(80));
        assert!(c.members().is_empty(), "not heard from for three intervals");
        assert_eq!(c.silent(), ["b"], "silent, still named");
        std::thread::sleep(Duration::from_millis(600));
        assert!(c.silent().is_empty(), "forgotten after thirty");
    }

    #[test]
    fn answers_reach_only_open_surveys() {
        let c = Cluster::new(Duration::from_secs(1));
        let mut s = c.open();
        c.answer(s.id, "a".into(), Answer::Affected { connections: 2 });
        c.answer(s.id + 1, "b".into(), Answer::Affected { connections: 9 });
        assert_eq!(s.answers.try_recv().unwrap().0, "a");
        assert!(s.answers.try_recv().is_err());
        let id = s.id;
        drop(s);
        c.answer(id, "c".into(), Answer::Affected { connections: 1 });
        assert!(c.surveys.lock().is_empty());
    }
}
