//! `herald-bench`: Herald's benchmark harness.
//!
//! - `herald-bench run` runs every scenario (fan-out, many channels, cross-node,
//!   latency, idle memory, connect rate) for Herald and each peer (the raw-write floor,
//!   Node `ws` + `ioredis`, Python `websockets` + `redis.asyncio`) in one run, prints
//!   Markdown tables with Herald/peer ratios, and writes `results.json` and `chart.svg`.
//! - `herald-bench worker` is a load-generator process the orchestrator spawns (many,
//!   to stay under the per-process open-file limit and to use both cores).
//! - `herald-bench floor` is the raw-write floor server.
//!
//! - `herald-bench drops-client` / `drops-publisher`: the two sides of the
//!   network-drop scenario, run inside network namespaces.
//!
//! Every loop is bounded in count and time; servers bind to loopback, or (the drop
//! scenario) to addresses inside the network namespaces it creates.
//!
//! # Layout
//! Each module uses only those listed after it:
//! - `run`: the orchestrator: every scenario for every target, then the report.
//! - `scenarios`: one function per scenario, each answering a row.
//! - `target`: starting a target and its publisher; the load-generator workers.
//! - `args`: what a run is asked to do, and the sizes scenarios share.
//! - `drops`: the network-drop scenario (namespaces, Rust clients).
//! - `worker`: a load-generator process.
//! - `floor`: the raw-write floor server.
//! - `report`: the rows a run measures and the tables it prints.
//! - `procfs`: CPU and memory of processes, read from `/proc`.

use clap::{Parser, Subcommand};

mod args;
mod drops;
mod floor;
mod procfs;
mod report;
mod run;
mod scenarios;
mod target;
mod worker;

#[derive(Parser)]
#[command(version, about = "Herald's benchmark harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the scenarios for every target and report.
    Run(args::RunArgs),
    /// A load-generator process (spawned by `run`).
    Worker(worker::WorkerArgs),
    /// The raw-write floor server (spawned by `run`).
    Floor(floor::FloorArgs),
    /// The clients of the network-drop scenario (spawned by `run` in a namespace).
    DropsClient(drops::ClientArgs),
    /// The publisher of the network-drop scenario (spawned by `run` in a namespace).
    DropsPublisher(drops::PublisherArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(a) => run::run(a),
        Cmd::Worker(a) => worker::run(a),
        Cmd::Floor(a) => floor::run(a),
        Cmd::DropsClient(a) => drops::client(a),
        Cmd::DropsPublisher(a) => drops::publisher(a),
    }
}
