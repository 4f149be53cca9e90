//! `herald-soak`: Herald's fault-injection soak with a delivery checker.
//!
//! Three `herald` nodes behind HAProxy on one `redis-server` (AOF `everysec` and RDB
//! snapshots); a publisher per channel retrying through the HTTP API with idempotency
//! keys; Rust clients (on loopback, and in a network namespace whose link is cut) and
//! the JS client under Node, on history and plain channels, with tokens that expire
//! (every few seconds, but for the loopback Rust group's, which live an hour).
//! Faults drawn from a seed: nodes killed (SIGKILL, SIGTERM), Redis killed and
//! restarted from its files, rolled back (a cut AOF tail, the RDB snapshot alone),
//! `CLIENT KILL`, network cuts, clients dropping their connections. Or, with
//! `--rolling-update`, no faults but Kubernetes rolling updates with the manifests'
//! timings, where even an announced gap counts as a loss. The checker reads
//! every delivery and every publish reply and names each broken promise (see
//! `check`). The seed is printed first; `--seed` replays the schedule.
//!
//! - `herald-soak run` runs it (`--seconds`, clients, channels, rates);
//! - `herald-soak clients` is a Rust client group the run spawns.
//!
//! # Layout
//! Each module uses only those listed after it:
//! - `run`: the orchestrator: system, groups, publishers, faults, fence, report.
//! - `rollout`: a rolling update with the manifests' timings.
//! - `group`: a Rust client group process.
//! - `publisher`: one channel's publisher and the ledger of every attempt.
//! - `check`: the delivery checker.
//! - `faults`: the faults, drawn from the seed.
//! - `system`: Redis, the nodes, HAProxy and the namespace, as processes.
//! - `record`: what client groups and publishers tell the checker.

use clap::{Parser, Subcommand};

mod check;
mod faults;
mod group;
mod publisher;
mod record;
mod rollout;
mod run;
mod system;

#[derive(Parser)]
#[command(
    version,
    about = "Herald's fault-injection soak with a delivery checker"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the soak and check every delivery.
    Run(run::RunArgs),
    /// A group of Rust clients (spawned by `run`).
    Clients(group::GroupArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Clients(a) => group::run(a),
    }
}
