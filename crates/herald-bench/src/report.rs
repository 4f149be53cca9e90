//! Tables (Markdown, with Herald/peer ratios) and a chart (SVG) from one run.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

/// One measured figure set.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Row {
    pub(crate) scenario: String,
    pub(crate) target: String,
    pub(crate) figures: BTreeMap<String, f64>,
    pub(crate) note: String,
}

#[derive(Serialize)]
pub(crate) struct Report {
    pub(crate) machine: String,
    pub(crate) args: String,
    pub(crate) rows: Vec<Row>,
}

/// The figures shown per scenario, and whether higher is better.
fn columns(scenario: &str) -> &'static [(&'static str, bool)] {
    match scenario {
        s if s.starts_with("burst") => &[
            ("delivered_per_s", true),
            ("cpu_us_per_delivery", false),
            ("p50_us", false),
            ("p99_us", false),
            ("rss_growth_mib", false),
            ("lost", false),
        ],
        "fanout" | "channels" | "channels1000" | "crossnode" => &[
            ("delivered_per_s", true),
            ("cpu_us_per_delivery", false),
            ("server_cpu_cores", false),
            ("lost", false),
        ],
        "latency" => &[
            ("p50_us", false),
            ("p99_us", false),
            ("p999_us", false),
            ("lost", false),
        ],
        "idle" => &[
            ("kib_per_connection", false),
            ("base_rss_mib", false),
            ("after_churn_mib_over_base", false),
        ],
        "connect" => &[("handshakes_per_s", true), ("cpu_us_per_handshake", false)],
        "churn" => &[
            ("bystander_p50_us_quiet", false),
            ("bystander_p50_us_churn", false),
            ("bystander_p99_us_quiet", false),
            ("bystander_p99_us_churn", false),
            ("bystander_lost_churn", false),
        ],
        "history" => &[
            ("publish_per_s_history_off", true),
            ("publish_per_s_history_on", true),
            ("redis_cpu_us_per_pub_history_off", false),
            ("redis_cpu_us_per_pub_history_on", false),
            ("redis_cpu_on_over_off", false),
            ("replay_1000_ms_median", false),
            ("replay_1000_ms_max", false),
        ],
        _ => &[],
    }
}

impl Report {
    /// Markdown tables, one per scenario, each row with Herald/target ratios.
    pub(crate) fn table(&self) -> String {
        let mut out = format!("Machine: {}\n", self.machine);
        let mut scenarios: Vec<&str> = Vec::new();
        for r in &self.rows {
            if !scenarios.contains(&r.scenario.as_str()) {
                scenarios.push(&r.scenario);
            }
        }
        for s in scenarios {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.scenario == s).collect();
            let herald = rows.iter().find(|r| r.target == "herald");
            let cols = columns(s);
            let _ = writeln!(out, "\n### {s}\n");
            for r in &rows {
                let _ = writeln!(out, "- {}: {}", r.target, r.note);
            }
            out.push('\n');
            let mut header = String::from("| target |");
            let mut rule = String::from("|---|");
            for (c, higher) in cols {
                let _ = write!(
                    header,
                    " {c} ({}) |",
                    if *higher {
                        "higher is better"
                    } else {
                        "lower is better"
                    }
                );
                rule.push_str("---|");
            }
            header.push_str(" Herald / target |");
            rule.push_str("---|");
            let _ = writeln!(out, "{header}\n{rule}");
            for r in &rows {
                let mut line = format!("| {} |", r.target);
                for (c, _) in cols {
                    let v = r.figures.get(*c).copied().unwrap_or(f64::NAN);
                    let _ = write!(line, " {} |", human(v));
                }
                let ratios: Vec<String> = match herald {
                    Some(h) if r.target != "herald" => cols
                        .iter()
                        .filter(|(c, _)| *c != "lost")
                        .filter_map(|(c, _)| {
                            let (a, b) = (h.figures.get(*c)?, r.figures.get(*c)?);
                            (*b != 0.0).then(|| format!("{c}: {:.2}x", a / b))
                        })
                        .collect(),
                    _ => vec!["—".into()],
                };
                let _ = writeln!(line, " {} |", ratios.join(", "));
                out.push_str(&line);
            }
        }
        out
    }

    /// Grouped bars: each scenario's first figure, per target, scaled to the best.
    pub(crate) fn svg(&self) -> String {
        let mut groups: Vec<Group> = Vec::new();
        for r in &self.rows {
            let Some((metric, higher)) = columns(&r.scenario).first().copied() else {
                continue;
            };
            let v = r.figures.get(metric).copied().unwrap_or(0.0);
            match groups.iter_mut().find(|g| g.0 == r.scenario) {
                Some(g) => g.3.push((r.target.clone(), v)),
                None => groups.push((
                    r.scenario.clone(),
                    metric,
                    higher,
                    vec![(r.target.clone(), v)],
                )),
            }
        }
        let colors = ["#2b6cb0", "#718096", "#dd6b20", "#38a169", "#805ad5"];
        let (w, row_h, bar_h) = (900.0, 26.0, 20.0);
        let height: f64 = groups
            .iter()
            .map(|g| 40.0 + g.3.len() as f64 * row_h)
            .sum::<f64>()
            + 40.0;
        let mut s = format!(
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="13"><rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">herald-bench — {}</text>"#,
            xml(&self.machine)
        );
        let mut y = 50.0;
        for (scenario, metric, higher, bars) in &groups {
            let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9);
            let _ = write!(
                s,
                r#"<text x="10" y="{}" font-weight="bold">{} — {} ({})</text>"#,
                y + 4.0,
                xml(scenario),
                metric,
                if *higher {
                    "longer is better"
                } else {
                    "shorter is better"
                }
            );
            y += 14.0;
            for (i, (target, v)) in bars.iter().enumerate() {
                let len = (v / max) * 560.0;
                let _ = write!(
                    s,
                    r#"<text x="20" y="{}">{}</text><rect x="110" y="{}" width="{len:.1}" height="{bar_h}" fill="{}"/><text x="{}" y="{}">{}</text>"#,
                    y + 15.0,
                    xml(target),
                    y,
                    colors[i % colors.len()],
                    115.0 + len,
                    y + 15.0,
                    human(*v)
                );
                y += row_h;
            }
            y += 26.0;
        }
        s.push_str("</svg>\n");
        s
    }
}

/// A chart group: scenario, metric, whether higher is better, bars (target, value).
type Group = (String, &'static str, bool, Vec<(String, f64)>);

fn human(v: f64) -> String {
    if v.is_nan() {
        "—".into()
    } else if v.abs() >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
