//! Client shards in worker processes, for more sockets than one process may open.
//!
//! The open-file limit is per process, and it can be lower than the sockets a scenario wants
//! (20,000 on the benchmark machine, where it cannot be raised): each end of a socket costs its
//! process one descriptor. So `connections` can run several gateway processes on one database
//! (as a deployment would) and one worker process per gateway for the clients: the bench binary
//! again, as `fleetgate-bench worker`, which runs the same client tasks as the in-process
//! scenarios.
//!
//! The worker reads its [`Job`] as one JSON line on stdin and prints `P <json>` progress lines
//! (cumulative counters, which the parent adds to its [`Board`]). When the parent is done it
//! writes one more line, the last batch written for every tracker; the worker then checks its
//! final states, closes its sockets and prints `F <json>`: its counters, errors, subscribe times
//! and every timed receipt as (batch, receipt time). Times are on the parent's clock (the
//! epoch is passed in [`stats::EPOCH_ENV`]), so the parent times receipts against its tape as if
//! its own clients had received them. EOF on stdin (the parent is gone) ends the worker too.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{watch, Semaphore};

use crate::client::{self, Board, Control, Spec, Sub};
use crate::stats;
use crate::writer::Tape;

/// One worker's clients.
#[derive(Debug, Serialize, Deserialize)]
pub struct Job {
    pub addr: SocketAddr,
    pub hash: String,
    /// Trackers of the fleet (ids `1..=trackers`).
    pub trackers: i64,
    /// Per client: first tracker, trackers watched, source address (`state` events, format
    /// `full`, recording).
    pub clients: Vec<(i64, usize, Option<Ipv4Addr>)>,
    /// Clients connecting and subscribing at once.
    pub gate: usize,
}

impl Job {
    /// The job for `specs`, which must all be recording `state` clients.
    pub fn of(
        specs: &[Spec],
        addr: SocketAddr,
        hash: &str,
        trackers: i64,
        gate: usize,
    ) -> anyhow::Result<Job> {
        let clients = specs
            .iter()
            .map(|s| match s.sub {
                Sub::State { lo, count, .. } if s.record && !s.slow => Ok((lo, count, s.source)),
                _ => bail!("worker processes run recording state clients only"),
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Job {
            addr,
            hash: hash.to_owned(),
            trackers,
            clients,
            gate,
        })
    }
}

/// Cumulative counters of one worker.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Progress {
    pub connected: usize,
    pub subscribed: usize,
    pub settled: usize,
    pub done: usize,
    pub state_frames: u64,
    pub other_frames: u64,
    pub bytes: u64,
    pub duplicates: u64,
}

impl Progress {
    fn of(board: &Board) -> Progress {
        Progress {
            connected: board.connected.load(Ordering::Relaxed),
            subscribed: board.subscribed.load(Ordering::Relaxed),
            settled: board.settled.load(Ordering::Relaxed),
            done: board.done.load(Ordering::Relaxed),
            state_frames: board.state_frames.load(Ordering::Relaxed),
            other_frames: board.other_frames.load(Ordering::Relaxed),
            bytes: board.bytes.load(Ordering::Relaxed),
            duplicates: board.duplicates.load(Ordering::Relaxed),
        }
    }

    /// Adds what grew since `prev` to the parent's board.
    fn apply(&self, prev: &Progress, board: &Board) {
        let grow = |a: usize, b: usize| b.saturating_sub(a);
        let grow64 = |a: u64, b: u64| b.saturating_sub(a);
        board
            .connected
            .fetch_add(grow(prev.connected, self.connected), Ordering::Relaxed);
        board
            .subscribed
            .fetch_add(grow(prev.subscribed, self.subscribed), Ordering::Relaxed);
        board
            .settled
            .fetch_add(grow(prev.settled, self.settled), Ordering::Relaxed);
        board
            .done
            .fetch_add(grow(prev.done, self.done), Ordering::Relaxed);
        board.state_frames.fetch_add(
            grow64(prev.state_frames, self.state_frames),
            Ordering::Relaxed,
        );
        board.other_frames.fetch_add(
            grow64(prev.other_frames, self.other_frames),
            Ordering::Relaxed,
        );
        board
            .bytes
            .fetch_add(grow64(prev.bytes, self.bytes), Ordering::Relaxed);
        board
            .duplicates
            .fetch_add(grow64(prev.duplicates, self.duplicates), Ordering::Relaxed);
    }
}

/// What a worker reports at the end.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Final {
    pub progress: Progress,
    pub receipts: Vec<(u32, u64)>,
    pub subscribe_ns: Vec<u64>,
    pub initial_ns: Vec<u64>,
    pub answered_at: Vec<u64>,
    pub errors: BTreeMap<String, u64>,
    pub first_error: Option<String>,
    pub stale: u64,
    pub checked: u64,
}

/// The parent's closing line: the last batch of every tracker, indexed by id.
#[derive(Debug, Serialize, Deserialize)]
struct Closing {
    last: Vec<u32>,
}

fn emit(tag: &str, value: &impl Serialize) {
    use std::io::Write;
    let line = match serde_json::to_string(value) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench worker: cannot encode its report: {e}");
            return;
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{tag} {line}");
    let _ = out.flush();
}

/// `fleetgate-bench worker`: runs one [`Job`] (see the module's comment).
pub async fn run() -> anyhow::Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let job: Job = serde_json::from_str(&lines.next_line().await?.context("no job on stdin")?)
        .context("reading the job")?;
    let tape = Tape::new(job.trackers);
    let board = Board::logging(tape.clone());
    let (_go_tx, go) = watch::channel(true);
    let (_slow_tx, slow) = watch::channel(false);
    let (stop_tx, stop) = watch::channel(false);
    let ctl = Control { go, slow, stop };
    let gate = Arc::new(Semaphore::new(job.gate.max(1)));
    let hash: Arc<str> = Arc::from(job.hash.as_str());
    let n = job.clients.len();
    let handles: Vec<_> = job
        .clients
        .iter()
        .map(|&(lo, count, source)| {
            let spec = Spec {
                sub: Sub::State {
                    lo,
                    count,
                    format: "full",
                },
                source,
                slow: false,
                record: true,
                parse_batches: false,
                deflate: false,
            };
            tokio::spawn(client::run(
                spec,
                job.addr,
                hash.clone(),
                board.clone(),
                ctl.clone(),
                Some(gate.clone()),
            ))
        })
        .collect();
    let b = board.clone();
    let progress = tokio::spawn(async move {
        loop {
            emit("P", &Progress::of(&b));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });

    // Run until the parent sends the closing line, or goes away.
    if let Ok(Some(line)) = lines.next_line().await {
        match serde_json::from_str::<Closing>(&line) {
            Ok(c) => tape.set_last_seqs(&c.last),
            Err(e) => eprintln!("bench worker: unreadable closing line: {e}"),
        }
    }
    let _ = stop_tx.send(true);
    let started = Instant::now();
    while board.done.load(Ordering::Relaxed) < n && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for h in handles {
        h.abort();
    }
    progress.abort();
    let take = |m: &std::sync::Mutex<Vec<u64>>| {
        std::mem::take(&mut *m.lock().unwrap_or_else(|e| e.into_inner()))
    };
    let report = Final {
        progress: Progress::of(&board),
        receipts: std::mem::take(&mut *board.receipts.lock().unwrap_or_else(|e| e.into_inner())),
        subscribe_ns: take(&board.subscribe_ns),
        initial_ns: take(&board.initial_ns),
        answered_at: take(&board.answered_at),
        errors: board
            .errors
            .snapshot()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        first_error: board
            .first_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        stale: board.stale.load(Ordering::Relaxed),
        checked: board.checked.load(Ordering::Relaxed),
    };
    emit("F", &report);
    Ok(())
}

/// A worker process, seen from the parent.
pub struct Shard {
    child: Child,
    stdin: ChildStdin,
    reader: tokio::task::JoinHandle<anyhow::Result<Final>>,
}

impl Shard {
    /// Starts a worker on `job`; its progress is added to `board` as it comes.
    pub async fn spawn(job: &Job, board: Arc<Board>) -> anyhow::Result<Shard> {
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("worker")
            .env(stats::EPOCH_ENV, stats::epoch_ns().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the worker when
        // the bench dies.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("starting a worker process")?;
        let mut stdin = child.stdin.take().context("the worker's stdin")?;
        let stdout = child.stdout.take().context("the worker's stdout")?;
        let mut line = serde_json::to_string(job)?;
        line.push('\n');
        stdin.write_all(line.as_bytes()).await?;
        stdin.flush().await?;
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let mut prev = Progress::default();
            while let Some(line) = lines.next_line().await? {
                if let Some(p) = line.strip_prefix("P ") {
                    let p: Progress = serde_json::from_str(p)?;
                    p.apply(&prev, &board);
                    prev = p;
                } else if let Some(f) = line.strip_prefix("F ") {
                    let f: Final = serde_json::from_str(f)?;
                    f.progress.apply(&prev, &board);
                    return Ok(f);
                }
            }
            bail!("the worker process ended without its report")
        });
        Ok(Shard {
            child,
            stdin,
            reader,
        })
    }

    /// Whether the worker has stopped reporting (it ended or failed before being told to).
    pub fn ended(&self) -> bool {
        self.reader.is_finished()
    }

    /// Stops the worker: sends the tape's last batches, waits for its report and adds it to
    /// `board` (receipts timed against the board's tape).
    pub async fn finish(mut self, board: &Board) -> anyhow::Result<()> {
        let mut line = serde_json::to_string(&Closing {
            last: board.tape.last_seqs(),
        })?;
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        let f = tokio::time::timeout(Duration::from_secs(120), &mut self.reader)
            .await
            .context("the worker did not report within 120 s")???;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        for (seq, at) in f.receipts {
            board.time(seq, at);
        }
        for (dst, src) in [
            (&board.subscribe_ns, f.subscribe_ns),
            (&board.initial_ns, f.initial_ns),
            (&board.answered_at, f.answered_at),
        ] {
            dst.lock().unwrap_or_else(|e| e.into_inner()).extend(src);
        }
        for (kind, v) in &f.errors {
            if !board.errors.add(kind, *v) {
                board.note_error(&format!("worker: {v} errors of unknown kind {kind}"));
            }
        }
        if let Some(e) = &f.first_error {
            board.note_error(e);
        }
        board.stale.fetch_add(f.stale, Ordering::Relaxed);
        board.checked.fetch_add(f.checked, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_adds_only_what_grew() {
        let board = Board::new(Tape::new(10));
        let first = Progress {
            connected: 5,
            subscribed: 3,
            state_frames: 100,
            bytes: 1000,
            ..Progress::default()
        };
        first.apply(&Progress::default(), &board);
        let second = Progress {
            connected: 5,
            subscribed: 5,
            done: 2,
            state_frames: 150,
            bytes: 1500,
            ..Progress::default()
        };
        second.apply(&first, &board);
        assert_eq!(board.connected.load(Ordering::Relaxed), 5);
        assert_eq!(board.subscribed.load(Ordering::Relaxed), 5);
        assert_eq!(board.done.load(Ordering::Relaxed), 2);
        assert_eq!(board.state_frames.load(Ordering::Relaxed), 150);
        assert_eq!(board.bytes.load(Ordering::Relaxed), 1500);
    }

    #[test]
    fn jobs_take_recording_state_clients_only() {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let state = Spec {
            sub: Sub::State {
                lo: 11,
                count: 10,
                format: "full",
            },
            source: Some(Ipv4Addr::new(127, 0, 0, 3)),
            slow: false,
            record: true,
            parse_batches: false,
            deflate: false,
        };
        let job = Job::of(std::slice::from_ref(&state), addr, "h", 20, 4).map(|j| j.clients);
        assert_eq!(
            job.ok(),
            Some(vec![(11, 10, Some(Ipv4Addr::new(127, 0, 0, 3)))])
        );
        let slow = Spec {
            slow: true,
            ..state
        };
        assert!(Job::of(&[slow], addr, "h", 20, 4).is_err());
    }

    #[test]
    fn a_logging_board_keeps_receipts_for_the_parent() {
        let board = Board::logging(Tape::new(10));
        board.time(7, 1234);
        assert_eq!(
            *board.receipts.lock().unwrap_or_else(|e| e.into_inner()),
            vec![(7, 1234)]
        );
        assert_eq!(board.hist[0].summary().samples, 0);
    }
}
