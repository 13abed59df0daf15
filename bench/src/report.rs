//! Results: one [`Outcome`] per scenario, printed as Markdown tables and written as JSON
//! (`target/bench/<scenario>-<timestamp>.json` and `target/bench/latest.json`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::stats::Latency;

/// A target of the issue and what this run measured against it.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub what: String,
    pub target: String,
    pub measured: String,
    /// `None`: not decidable in this run (e.g. the writers could not produce the load).
    pub met: Option<bool>,
}

/// Everything measured in one scenario.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    pub scenario: String,
    pub title: String,
    pub quick: bool,
    pub params: serde_json::Value,
    pub trackers: i64,
    pub sockets: usize,
    /// Length of the (last) measurement window.
    pub window_s: f64,
    /// States committed by the writers per second, with the gateway running.
    pub written_per_s: Option<f64>,
    /// Tracker ids a bare LISTEN client received per second, same writes, no gateway.
    pub raw_baseline_per_s: Option<f64>,
    /// The same, measured alongside the gateway.
    pub raw_during_per_s: Option<f64>,
    /// Frames (state events, or batch entries) received per second by all clients.
    pub delivered_per_s: Option<f64>,
    /// Distinct states delivered per second: delivered / subscribers per tracker.
    pub delivered_states_per_s: Option<f64>,
    /// delivered_states_per_s / raw_baseline_per_s.
    pub ratio_to_raw: Option<f64>,
    /// Frames received / frames owed (states written × subscribers of each).
    pub delivery_ratio: Option<f64>,
    pub latency: Latency,
    pub raw_latency: Latency,
    /// Subscribe message sent → response received, per client.
    pub subscribe: Latency,
    /// Subscribe message sent → every initial state (or the first batch) received, per client.
    pub subscribe_initial: Latency,
    pub gateway_cpu_s: Option<f64>,
    pub bench_cpu_s: Option<f64>,
    pub postgres_cpu_s: Option<f64>,
    /// Busy CPU of the whole machine during the window, as a share of all cores.
    pub machine_busy: Option<f64>,
    pub rss_idle_kb: Option<u64>,
    pub rss_loaded_kb: Option<u64>,
    pub rss_window_start_kb: Option<u64>,
    pub rss_window_end_kb: Option<u64>,
    pub rss_peak_kb: Option<u64>,
    pub rss_per_socket_kb: Option<f64>,
    pub coalesced: Option<u64>,
    pub errors: u64,
    pub error_detail: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    /// Trackers whose last written state a client never received, of those checked.
    pub stale_final: u64,
    pub checked_final: u64,
    pub extra: BTreeMap<String, serde_json::Value>,
    pub targets: Vec<TargetCheck>,
    pub notes: Vec<String>,
}

/// A rate for humans: 1.2 k, 35 k, 1.05 M.
pub fn num(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v >= 1_000_000.0 => format!("{:.2} M", v / 1_000_000.0),
        Some(v) if v >= 10_000.0 => format!("{:.0} k", v / 1000.0),
        Some(v) if v >= 1000.0 => format!("{:.1} k", v / 1000.0),
        Some(v) => format!("{v:.0}"),
    }
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) if v >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn mib(kb: Option<u64>) -> String {
    kb.map_or("–".into(), |kb| format!("{:.0} MiB", kb as f64 / 1024.0))
}

/// The results table and the targets table.
pub fn markdown(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| scenario | trackers | sockets | written/s | raw LISTEN/s | delivered/s | states/s ÷ raw | p50 ms | p95 ms | p99 ms | max ms | subscribe p99 ms | gateway CPU s | peak RSS | RSS/socket | coalesced | errors |"
    );
    let _ = writeln!(
        s,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for o in outcomes {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            o.scenario,
            num(Some(o.trackers as f64)),
            num(Some(o.sockets as f64)),
            num(o.written_per_s),
            num(o.raw_baseline_per_s),
            num(o.delivered_per_s),
            o.ratio_to_raw
                .map_or("–".into(), |r| format!("{:.0}%", r * 100.0)),
            ms(o.latency.p50_ms),
            ms(o.latency.p95_ms),
            ms(o.latency.p99_ms),
            ms(o.latency.max_ms),
            ms(o.subscribe.p99_ms),
            o.gateway_cpu_s.map_or("–".into(), |c| format!("{c:.1}")),
            mib(o.rss_peak_kb),
            o.rss_per_socket_kb
                .map_or("–".into(), |k| format!("{k:.1} KiB")),
            o.coalesced.map_or("n/a".into(), |c| c.to_string()),
            o.errors + o.stale_final,
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "| scenario | target | measured | met |");
    let _ = writeln!(s, "|---|---|---|---|");
    for o in outcomes {
        for t in &o.targets {
            let met = match t.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "n/a",
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                o.scenario, t.target, t.measured, met
            );
        }
    }
    s
}

/// Notes (contention, bottlenecks) of every scenario, as a list.
pub fn notes(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    for o in outcomes {
        for n in &o.notes {
            let _ = writeln!(s, "- {}: {n}", o.scenario);
        }
        if let Some(e) = &o.first_error {
            let _ = writeln!(s, "- {}: first error: {e}", o.scenario);
        }
    }
    s
}

/// The machine, for the record.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub memory_gib: f64,
    pub cpu: String,
    pub kernel: String,
    pub postgres: String,
    pub load_average_at_start: String,
}

#[derive(Debug, Serialize)]
pub struct Run<'a> {
    pub started: String,
    pub command: String,
    pub quick: bool,
    pub machine: &'a Machine,
    pub results: &'a [Outcome],
}

/// Writes `<name>-<stamp>.json` and `latest.json` into `dir`.
pub fn write_json(dir: &Path, name: &str, stamp: &str, run: &Run<'_>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let text = serde_json::to_string_pretty(run)?;
    std::fs::write(dir.join(format!("{name}-{stamp}.json")), &text)?;
    std::fs::write(dir.join("latest.json"), &text)?;
    Ok(())
}
