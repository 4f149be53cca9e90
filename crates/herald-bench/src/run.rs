//! The orchestrator: starts Redis, each target and the load-generator workers, runs
//! every scenario for every target in one run, and reports figures and ratios.

use std::collections::BTreeMap;

use anyhow::{bail, Context};

use herald_harness::{free_port, RedisServer};

use crate::args::RunArgs;
use crate::procfs;
use crate::report::Row;
use crate::scenarios::{
    auth_costs, burst, churn, closed_loop, connect_rate, drops, history_costs, idle, latency,
};
use crate::target::setup;

pub(crate) fn run(mut args: RunArgs) -> anyhow::Result<()> {
    args.apply_smoke();
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?
        .block_on(main(args))
}

async fn main(args: RunArgs) -> anyhow::Result<()> {
    let machine = procfs::machine();
    eprintln!("herald-bench: {machine}");
    for t in &args.targets {
        setup(t).await.with_context(|| format!("setting up {t}"))?;
    }
    // Pub/sub clients may buffer a lot during the fan-out bursts: raise Redis's limit so
    // it measures Herald, not Redis disconnecting a slow peer.
    let redis = RedisServer::start_with(
        free_port(),
        &[
            "--client-output-buffer-limit",
            "pubsub",
            "256mb",
            "128mb",
            "60",
        ],
    );
    let mut rows: Vec<Row> = Vec::new();
    // Each target's fan-out maximum (publications/s), for the latency scenario.
    let mut max_rate: BTreeMap<String, f64> = BTreeMap::new();
    for scenario in &args.scenarios {
        for target in &args.targets {
            eprintln!("== {scenario} / {target}");
            // Scenarios that measure Herald alone answer `None` for the other targets.
            let row: anyhow::Result<Option<Row>> = match scenario.as_str() {
                "fanout" => closed_loop(&args, &redis, target, scenario, 1, args.subscribers, 1)
                    .await
                    .map(Some),
                "channels" => closed_loop(
                    &args,
                    &redis,
                    target,
                    scenario,
                    1,
                    args.subscribers,
                    args.channels,
                )
                .await
                .map(Some),
                "crossnode" => closed_loop(&args, &redis, target, scenario, 2, args.subscribers, 1)
                    .await
                    .map(Some),
                // 1,000 channels of `subscribers / 1000` each (5 with the default).
                "channels1000" => closed_loop(
                    &args,
                    &redis,
                    target,
                    scenario,
                    1,
                    args.subscribers,
                    1000.min(args.subscribers),
                )
                .await
                .map(Some),
                "latency" => latency(&args, &redis, target, &max_rate).await.map(Some),
                s if s.starts_with("burst") => {
                    let size: usize = s["burst".len()..]
                        .parse()
                        .with_context(|| format!("{s}: burstN, N publications per burst"))?;
                    burst(&args, &redis, target, size).await.map(Some)
                }
                "idle" => idle(&args, &redis, target).await.map(Some),
                "connect" => connect_rate(&args, &redis, target).await.map(Some),
                "drops" => drops(&args, target).await,
                "auth" => auth_costs(&args, &redis, target).await,
                "churn" => churn(&args, &redis, target).await,
                "history" => history_costs(&args, &redis, target).await,
                other => bail!("unknown scenario {other}"),
            };
            let Some(row) = row.with_context(|| format!("{scenario} / {target}"))? else {
                continue;
            };
            if scenario == "fanout" {
                if let Some(r) = row.figures.get("published_per_s") {
                    max_rate.insert(target.clone(), *r);
                }
            }
            eprintln!("   {}", fmt_figures(&row.figures));
            rows.push(row);
        }
    }
    let report = crate::report::Report {
        machine,
        args: format!("{args:?}"),
        rows,
    };
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(args.out.join("chart.svg"), report.svg())?;
    println!("{}", report.table());
    eprintln!(
        "wrote {} and {}",
        args.out.join("results.json").display(),
        args.out.join("chart.svg").display()
    );
    Ok(())
}

fn fmt_figures(f: &BTreeMap<String, f64>) -> String {
    f.iter()
        .map(|(k, v)| format!("{k}={v:.3}"))
        .collect::<Vec<_>>()
        .join(" ")
}
