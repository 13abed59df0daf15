//! The writers: what an upstream ingestion pipeline does, through the ingest contract of
//! `docs/ingest.md` §3 (b): one `INSERT … SELECT … FROM unnest(…) ON CONFLICT DO UPDATE` per
//! batch, each batch its own transaction, sorted by tracker id, several writer connections each
//! owning a contiguous slice of the fleet (so no two writers ever lock the same rows).
//!
//! Every batch gets a sequence number (`seq`), written into the `alt` column of each of its rows,
//! and the bench-clock time at which its COMMIT returned is kept in the [`Tape`]: a client that
//! receives a state reads `gps.alt` and computes commit → receipt latency from its own clock.
//! Writers run on a thread of their own, so that the commit time stamps are taken as soon as
//! PostgreSQL answers, not when the busy client runtime gets round to it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures_util::future::join_all;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use tokio::sync::watch;

use crate::stats::now_ns;

/// The batched upsert: the statement of `docs/ingest.md` §3 (b) (and of the `simulate`
/// command), with `alt` as a parameter since it carries the batch's sequence number.
pub const BENCH_UPSERT: &str = "INSERT INTO tracker_states AS s (tracker_id, gps_updated, \
    gps_signal_level, lat, lng, heading, speed, alt, connection_status, movement_status, \
    movement_status_update, ignition, ignition_update, last_update, battery_level, battery_update) \
  SELECT u.tracker_id, u.t, 100, u.lat, u.lng, u.heading, u.speed, u.alt, 'active', 'moving', \
         u.t, true, u.t, u.t, 90, u.t \
    FROM unnest($1::bigint[], $2::float8[], $3::float8[], $4::int2[], $5::int4[], $6::int4[], \
                $7::timestamptz[]) AS u(tracker_id, lat, lng, heading, speed, alt, t) \
  ON CONFLICT (tracker_id) DO UPDATE SET gps_updated = EXCLUDED.gps_updated, \
    gps_signal_level = EXCLUDED.gps_signal_level, lat = EXCLUDED.lat, lng = EXCLUDED.lng, \
    heading = EXCLUDED.heading, speed = EXCLUDED.speed, alt = EXCLUDED.alt, \
    connection_status = EXCLUDED.connection_status, movement_status = EXCLUDED.movement_status, \
    movement_status_update = EXCLUDED.movement_status_update, ignition = EXCLUDED.ignition, \
    ignition_update = EXCLUDED.ignition_update, last_update = EXCLUDED.last_update, \
    battery_level = EXCLUDED.battery_level, battery_update = EXCLUDED.battery_update";

/// Most batch sequence numbers one scenario can time (about a million transactions).
const MAX_SEQ: usize = 1 << 20;

/// What the writers of one scenario did: commit time per batch, last batch per tracker, counts,
/// and the measurement windows expressed as batch sequence numbers.
pub struct Tape {
    next_seq: AtomicU32,
    commits: Box<[AtomicU64]>,
    /// Rows of each batch (to count what a window owes exactly, by batch number).
    batch_rows: Box<[AtomicU32]>,
    last_seq: Box<[AtomicU32]>,
    pub rows: AtomicU64,
    pub txs: AtomicU64,
    pub errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    /// Window boundaries: window 0 is `[marks[0], marks[1])`, window 1 `[marks[1], marks[2])`.
    marks: [AtomicU32; 3],
}

impl Tape {
    pub fn new(trackers: i64) -> Arc<Tape> {
        let n = usize::try_from(trackers).unwrap_or(0) + 1;
        Arc::new(Tape {
            next_seq: AtomicU32::new(1),
            commits: (0..MAX_SEQ).map(|_| AtomicU64::new(0)).collect(),
            batch_rows: (0..MAX_SEQ).map(|_| AtomicU32::new(0)).collect(),
            last_seq: (0..n).map(|_| AtomicU32::new(0)).collect(),
            rows: AtomicU64::new(0),
            txs: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
            marks: [
                AtomicU32::new(u32::MAX),
                AtomicU32::new(u32::MAX),
                AtomicU32::new(u32::MAX),
            ],
        })
    }

    /// The sequence number the next batch will get.
    pub fn next_seq(&self) -> u32 {
        self.next_seq.load(Ordering::Acquire)
    }

    /// When batch `seq`'s COMMIT returned, if it has.
    pub fn commit_ns(&self, seq: u32) -> Option<u64> {
        let t = self.commits.get(seq as usize)?.load(Ordering::Acquire);
        (t != 0).then_some(t)
    }

    /// The last batch that wrote `tracker` (0: none since the fleet was created).
    pub fn last_seq(&self, tracker: i64) -> u32 {
        usize::try_from(tracker)
            .ok()
            .and_then(|i| self.last_seq.get(i))
            .map_or(0, |a| a.load(Ordering::Acquire))
    }

    /// The last batch of every tracker, indexed by tracker id (index 0 unused).
    pub fn last_seqs(&self) -> Vec<u32> {
        self.last_seq
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .collect()
    }

    /// Sets what [`Tape::last_seq`] answers (a worker process is told the parent's tape).
    pub fn set_last_seqs(&self, last: &[u32]) {
        for (a, v) in self.last_seq.iter().zip(last) {
            a.store(*v, Ordering::Release);
        }
    }

    /// Starts window `i` (0 or 1) at the next batch; also ends the previous one.
    pub fn mark(&self, i: usize) {
        if let Some(m) = self.marks.get(i) {
            m.store(self.next_seq(), Ordering::Release);
        }
    }

    /// Ends the windows from `i` on at the next batch (the last window's end).
    pub fn end(&self, i: usize) {
        let next = self.next_seq();
        for m in self.marks.iter().skip(i) {
            m.store(next, Ordering::Release);
        }
    }

    /// Rows committed by the batches of window `w` (by batch number, so a batch committed
    /// late still counts in its own window).
    pub fn rows_in_window(&self, w: usize) -> u64 {
        let lo = self.marks[w].load(Ordering::Acquire) as usize;
        let hi = self
            .marks
            .get(w + 1)
            .map_or(lo, |m| m.load(Ordering::Acquire) as usize);
        (lo.min(MAX_SEQ)..hi.min(MAX_SEQ))
            .map(|i| u64::from(self.batch_rows[i].load(Ordering::Acquire)))
            .sum()
    }

    /// The measurement window a batch belongs to.
    pub fn window_of(&self, seq: u32) -> Option<usize> {
        let m0 = self.marks[0].load(Ordering::Relaxed);
        if seq < m0 {
            return None;
        }
        let m1 = self.marks[1].load(Ordering::Relaxed);
        if seq < m1 {
            return Some(0);
        }
        let m2 = self.marks[2].load(Ordering::Relaxed);
        (seq < m2).then_some(1)
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn error(&self, e: &sqlx::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(e.to_string());
        }
    }
}

/// How the writers write.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WritePlan {
    /// Writer connections.
    pub writers: usize,
    /// Trackers per statement (= per transaction).
    pub batch: usize,
    /// Total states per second over all writers; `None`: as fast as PostgreSQL commits.
    pub rate: Option<f64>,
    /// Trackers `1..=trackers` are written, round robin.
    pub trackers: i64,
}

impl WritePlan {
    /// Each writer's slice of tracker ids, `[lo, hi]`.
    pub fn partitions(&self) -> Vec<(i64, i64)> {
        let w = self.writers.max(1) as i64;
        let per = (self.trackers + w - 1) / w;
        (0..w)
            .map(|i| (i * per + 1, ((i + 1) * per).min(self.trackers)))
            .filter(|(lo, hi)| lo <= hi)
            .collect()
    }
}

/// Writers running on their own thread.
pub struct Writers {
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<Vec<Vec<u64>>>,
}

impl Writers {
    /// Starts the writers; returns once every writer is connected.
    pub async fn start(url: &str, plan: &WritePlan, tape: &Arc<Tape>) -> anyhow::Result<Writers> {
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        let url = url.to_string();
        let plan = plan.clone();
        let tape = tape.clone();
        let thread = std::thread::Builder::new()
            .name("bench-writers".into())
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
                rt.block_on(run(url, plan, tape, stop_rx, ready_tx))
            })?;
        ready_rx.await??;
        Ok(Writers { stop, thread })
    }

    /// Stops the writers after their current batch; returns each writer's commit times, in
    /// commit order (for the raw LISTEN latency).
    pub async fn stop(self) -> Vec<Vec<u64>> {
        let _ = self.stop.send(true);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join().unwrap_or_default())
            .await
            .unwrap_or_default()
    }
}

async fn connect(url: &str) -> Result<PgConnection, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    options
        .application_name("fleetgate-bench-writer")
        .disable_statement_logging()
        .connect()
        .await
}

async fn run(
    url: String,
    plan: WritePlan,
    tape: Arc<Tape>,
    stop: watch::Receiver<bool>,
    ready: tokio::sync::oneshot::Sender<anyhow::Result<()>>,
) -> Vec<Vec<u64>> {
    let parts = plan.partitions();
    let mut conns = Vec::with_capacity(parts.len());
    for _ in &parts {
        match connect(&url).await {
            Ok(c) => conns.push(c),
            Err(e) => {
                let _ = ready.send(Err(anyhow::anyhow!("writer connection: {e}")));
                return Vec::new();
            }
        }
    }
    let _ = ready.send(Ok(()));
    let writers = parts.len();
    let interval = plan.rate.map(|r| {
        Duration::from_secs_f64((plan.batch as f64 * writers as f64 / r.max(0.001)).max(0.0005))
    });
    let start = tokio::time::Instant::now();
    let tasks = conns
        .into_iter()
        .zip(parts)
        .enumerate()
        .map(|(w, (conn, part))| {
            // Fixed-rate writers are staggered over one interval, so batches arrive evenly.
            let first = interval.map(|d| start + d.mul_f64(w as f64 / writers as f64));
            writer(
                conn,
                url.clone(),
                part,
                plan.batch,
                interval.zip(first),
                tape.clone(),
                stop.clone(),
            )
        });
    join_all(tasks).await
}

async fn writer(
    mut conn: PgConnection,
    url: String,
    (lo, hi): (i64, i64),
    batch: usize,
    pace: Option<(Duration, tokio::time::Instant)>,
    tape: Arc<Tape>,
    mut stop: watch::Receiver<bool>,
) -> Vec<u64> {
    let mut commits = Vec::new();
    let mut ticker = pace.map(|(every, first)| {
        let mut t = tokio::time::interval_at(first, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut cursor = lo;
    let mut failures = 0u32;
    loop {
        // Stop when told, or when the bench dropped the sender (an interrupted scenario).
        if *stop.borrow() || stop.has_changed().is_err() {
            break;
        }
        if let Some(t) = ticker.as_mut() {
            tokio::select! {
                _ = t.tick() => {}
                _ = stop.changed() => break,
            }
        }
        let n = (batch as i64).min(hi - cursor + 1).max(1);
        let ids: Vec<i64> = (cursor..cursor + n).collect();
        cursor += n;
        if cursor > hi {
            cursor = lo;
        }
        let seq = tape.next_seq.fetch_add(1, Ordering::AcqRel);
        let alt = i32::try_from(seq).unwrap_or(i32::MAX);
        let lat: Vec<f64> = ids
            .iter()
            .map(|id| 52.4 + (id % 1000) as f64 * 0.0002 + f64::from(seq % 100) * 0.00001)
            .collect();
        let lng: Vec<f64> = ids
            .iter()
            .map(|id| 13.3 + (id / 1000 % 1000) as f64 * 0.0002)
            .collect();
        let heading: Vec<i16> = ids
            .iter()
            .map(|id| ((id + i64::from(seq)) % 360) as i16)
            .collect();
        let speed: Vec<i32> = ids
            .iter()
            .map(|id| ((id + i64::from(seq)) % 120) as i32)
            .collect();
        let alts: Vec<i32> = vec![alt; ids.len()];
        let t = vec![Utc::now(); ids.len()];
        let result = sqlx::query(BENCH_UPSERT)
            .bind(&ids)
            .bind(&lat)
            .bind(&lng)
            .bind(&heading)
            .bind(&speed)
            .bind(&alts)
            .bind(&t)
            .execute(&mut conn)
            .await;
        match result {
            Ok(_) => {
                let at = now_ns();
                if let Some(c) = tape.commits.get(seq as usize) {
                    c.store(at, Ordering::Release);
                }
                if let Some(r) = tape.batch_rows.get(seq as usize) {
                    r.store(ids.len() as u32, Ordering::Release);
                }
                for id in &ids {
                    if let Some(s) = usize::try_from(*id).ok().and_then(|i| tape.last_seq.get(i)) {
                        s.store(seq, Ordering::Release);
                    }
                }
                tape.rows.fetch_add(ids.len() as u64, Ordering::Relaxed);
                tape.txs.fetch_add(1, Ordering::Relaxed);
                commits.push(at);
                failures = 0;
            }
            Err(e) => {
                tape.error(&e);
                failures += 1;
                if failures > 20 {
                    break; // the database is gone: give up, the run reports it
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Ok(c) = connect(&url).await {
                    conn = c;
                }
            }
        }
    }
    commits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_cover_the_fleet_once() {
        let plan = WritePlan {
            writers: 3,
            batch: 10,
            rate: None,
            trackers: 100,
        };
        let p = plan.partitions();
        assert_eq!(p, vec![(1, 34), (35, 68), (69, 100)]);
    }

    #[test]
    fn windows_follow_marks() {
        let tape = Tape::new(10);
        assert_eq!(tape.window_of(5), None);
        tape.next_seq.store(10, Ordering::Release);
        tape.mark(0);
        tape.next_seq.store(20, Ordering::Release);
        tape.mark(1);
        assert_eq!(tape.window_of(9), None);
        assert_eq!(tape.window_of(10), Some(0));
        assert_eq!(tape.window_of(25), Some(1));
        tape.next_seq.store(30, Ordering::Release);
        tape.end(2);
        assert_eq!(tape.window_of(30), None);
    }
}
