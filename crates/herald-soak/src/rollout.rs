//! A Kubernetes rolling update, played with processes: the timings come from the
//! rendered manifests (`deploy/kubernetes/check.py` writes them), the pods are `herald`
//! processes behind HAProxy, and "removed from the Service's endpoints" is HAProxy's
//! `drain` state set through its admin socket.
//!
//! One pod at a time, as a Deployment of three with `maxSurge: 1, maxUnavailable: 0`
//! goes: the replacement starts on a spare slot and must become ready; then the old
//! pod is deleted: the endpoint removal reaches the balancer after a lag (drawn from
//! the seed, within the preStop pause, which exists to cover it), the preStop pause
//! runs out, SIGTERM, and the kubelet SIGKILLs whatever is left when
//! `terminationGracePeriodSeconds` ends. With `maxSurge: 0` the old pod goes first.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;
use tokio::time::{sleep, Instant};

use crate::system::{haproxy_server_state, Node};

/// What a rollout needs to know of the manifests.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Rollout {
    /// The preStop hook's pause.
    pub(crate) pre_stop_seconds: f64,
    /// From deletion to SIGKILL (the preStop pause included).
    pub(crate) termination_grace_period_seconds: f64,
    /// The ConfigMap's `shutdown.drain_window` and `shutdown.grace_period`.
    pub(crate) drain_window: String,
    pub(crate) grace_period: String,
    /// The Deployment's strategy.
    pub(crate) max_surge: usize,
    pub(crate) max_unavailable: usize,
}

/// How one pod's replacement went.
pub(crate) struct Replaced {
    /// Whether the old pod exited by itself within the grace period.
    pub(crate) exited: bool,
    /// From deletion to exit (or SIGKILL).
    pub(crate) took: Duration,
}

impl Rollout {
    pub(crate) fn load(path: &Path) -> anyhow::Result<Rollout> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read the rollout timings {}", path.display()))?;
        let r: Rollout = serde_json::from_str(&text)
            .with_context(|| format!("the rollout timings {}", path.display()))?;
        if r.max_surge + r.max_unavailable == 0 {
            bail!("maxSurge and maxUnavailable are both 0: a rollout could never start");
        }
        if r.pre_stop_seconds > r.termination_grace_period_seconds {
            bail!("the preStop pause outlasts terminationGracePeriodSeconds");
        }
        Ok(r)
    }

    /// Slots beyond the replicas: where replacements start.
    pub(crate) fn spare_slots(&self) -> usize {
        self.max_surge.max(1)
    }

    /// Replaces the pod in slot `old` by a new one in slot `new`.
    pub(crate) async fn replace(
        &self,
        nodes: &mut [Node],
        old: usize,
        new: usize,
        admin: &Path,
        lag: Duration,
    ) -> anyhow::Result<Replaced> {
        if self.max_surge > 0 {
            start_ready(nodes, new, admin).await?;
        }
        let deleted = Instant::now();
        let pre_stop = Duration::from_secs_f64(self.pre_stop_seconds);
        let lag = lag.min(pre_stop);
        sleep(lag).await;
        haproxy_server_state(admin, old, "drain").await?;
        sleep(pre_stop - lag).await;
        let left = Duration::from_secs_f64(self.termination_grace_period_seconds)
            .saturating_sub(deleted.elapsed());
        let exited = nodes[old].terminate_within(left).await;
        let took = deleted.elapsed();
        if self.max_surge == 0 {
            start_ready(nodes, new, admin).await?;
        }
        Ok(Replaced { exited, took })
    }
}

/// Starts the pod in slot `i`, waits for its readiness, and puts it in rotation.
async fn start_ready(nodes: &mut [Node], i: usize, admin: &Path) -> anyhow::Result<()> {
    nodes[i].start()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !nodes[i].ready().await {
        if Instant::now() > deadline {
            bail!("the replacement in slot {i} was not ready within 30 s");
        }
        sleep(Duration::from_millis(100)).await;
    }
    // The slot may still be drained from the pod it held before.
    haproxy_server_state(admin, i, "ready").await
}
