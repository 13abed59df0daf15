//! The raw LISTEN baseline: a bare `LISTEN fleetgate` client (sqlx `PgListener`) that counts the
//! tracker ids in each payload (`s|id,id,…`; the range form `S|lo|hi` counts `hi - lo + 1`). Run
//! with the same writes as the gateway, it shows what PostgreSQL itself delivers on this machine.
//!
//! It also times each notification: the tracker ids of a payload name the writer (each writer
//! owns a slice of the fleet), and a writer's notifications arrive in its commit order, so the
//! k-th notification of writer w belongs to w's k-th commit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sqlx::postgres::PgListener;
use tokio::sync::watch;

use crate::stats::{now_ns, Histogram};

/// Counters shared with the orchestrator.
#[derive(Default)]
pub struct RawCounts {
    pub ids: AtomicU64,
    pub notifications: AtomicU64,
    pub errors: AtomicU64,
}

/// One notification: (writer, its ordinal for that writer, receipt time).
type Receipt = (usize, usize, u64);

pub struct RawListener {
    pub counts: Arc<RawCounts>,
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<Vec<Receipt>>,
}

impl RawListener {
    /// Connects and LISTENs on its own thread; returns once the LISTEN is in place.
    pub async fn start(url: &str, partitions: Vec<(i64, i64)>) -> anyhow::Result<RawListener> {
        let counts = Arc::new(RawCounts::default());
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        let url = url.to_string();
        let c = counts.clone();
        let thread = std::thread::Builder::new()
            .name("bench-raw-listen".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return Vec::new();
                    }
                };
                rt.block_on(run(url, partitions, c, stop_rx, ready_tx))
            })?;
        ready_rx.await??;
        Ok(RawListener {
            counts,
            stop,
            thread,
        })
    }

    /// Stops listening; returns every timed receipt.
    pub async fn stop(self) -> Vec<Receipt> {
        let _ = self.stop.send(true);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join().unwrap_or_default())
            .await
            .unwrap_or_default()
    }
}

/// Parses one payload: (tracker ids it announces, the smallest listed id if listed).
pub fn parse_payload(payload: &str) -> (u64, Option<i64>) {
    let Some((kind, body)) = payload.split_once('|') else {
        return (0, None);
    };
    match kind {
        "s" => {
            let mut n = 0u64;
            let mut min: Option<i64> = None;
            for id in body.split(',') {
                if let Ok(id) = id.parse::<i64>() {
                    n += 1;
                    min = Some(min.map_or(id, |m| m.min(id)));
                }
            }
            (n, min)
        }
        "S" => {
            let mut parts = body.split('|');
            let lo = parts.next().and_then(|v| v.parse::<i64>().ok());
            let hi = parts.next().and_then(|v| v.parse::<i64>().ok());
            match (lo, hi) {
                (Some(lo), Some(hi)) if hi >= lo => ((hi - lo + 1) as u64, None),
                _ => (0, None),
            }
        }
        _ => (0, None),
    }
}

async fn run(
    url: String,
    partitions: Vec<(i64, i64)>,
    counts: Arc<RawCounts>,
    mut stop: watch::Receiver<bool>,
    ready: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
) -> Vec<Receipt> {
    let mut listener = match PgListener::connect(&url).await {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("raw LISTEN connection: {e}")));
            return Vec::new();
        }
    };
    if let Err(e) = listener.listen(fleetgate::listen::CHANNEL).await {
        let _ = ready.send(Err(anyhow::anyhow!("LISTEN: {e}")));
        return Vec::new();
    }
    let _ = ready.send(Ok(()));
    let mut per_writer = vec![0usize; partitions.len()];
    let mut receipts = Vec::new();
    loop {
        tokio::select! {
            r = listener.try_recv() => match r {
                Ok(Some(n)) => {
                    let at = now_ns();
                    let (ids, min) = parse_payload(n.payload());
                    counts.ids.fetch_add(ids, Ordering::Relaxed);
                    counts.notifications.fetch_add(1, Ordering::Relaxed);
                    if let Some(min) = min {
                        if let Some(w) = partitions.iter().position(|(lo, hi)| (*lo..=*hi).contains(&min)) {
                            receipts.push((w, per_writer[w], at));
                            per_writer[w] += 1;
                        }
                    }
                }
                // The connection was lost (and sqlx reconnects): notifications were dropped.
                Ok(None) | Err(_) => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
            },
            _ = stop.changed() => break,
        }
    }
    receipts
}

/// Commit → NOTIFY receipt latency of the receipts whose commit time lies in `[from, to)`.
pub fn latency(receipts: &[Receipt], commits: &[Vec<u64>], from: u64, to: u64) -> Histogram {
    let h = Histogram::default();
    for &(w, k, at) in receipts {
        if let Some(&c) = commits.get(w).and_then(|c| c.get(k)) {
            if c >= from && c < to {
                h.record_ns(at.saturating_sub(c));
            }
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_counted() {
        assert_eq!(parse_payload("s|5,3,9"), (3, Some(3)));
        assert_eq!(parse_payload("S|100|199"), (100, None));
        assert_eq!(parse_payload("t|1:2:block"), (0, None));
        assert_eq!(parse_payload("garbage"), (0, None));
    }
}
