//! The gateway under test: the real `fleetgate serve` process, started on a free loopback port
//! against the bench database, watched through `/proc`, scraped at `/metrics`, and killed when
//! its guard is dropped (on success, error or panic; and by the kernel if the bench dies, through
//! `PR_SET_PDEATHSIG`).

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::procfs;
use crate::stats::now_ns;

/// The repository root (the workspace holding this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Where cargo puts build output.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Builds the release gateway (`cargo build --release --bin fleetgate`) and returns its path.
pub fn build() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("bench: building the gateway (cargo build --release -p fleetgate --bin fleetgate)");
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "fleetgate",
            "--bin",
            "fleetgate",
        ])
        .current_dir(repo_root())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of the gateway failed ({status})");
    }
    let bin = target_dir().join("release").join("fleetgate");
    if !bin.exists() {
        bail!("{} not found after the build", bin.display());
    }
    Ok(bin)
}

/// A configuration folder holding only the repository's `config/default.toml`, so that a
/// developer's `config/local.toml` does not change what is measured.
pub fn config_dir(out: &Path) -> anyhow::Result<PathBuf> {
    let dir = out.join("config");
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(
        repo_root().join("config").join("default.toml"),
        dir.join("default.toml"),
    )
    .context("copying config/default.toml")?;
    Ok(dir)
}

/// A free port on 127.0.0.1 (bound, read, released: the gateway binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

pub struct Gateway {
    child: Child,
    pub pid: u32,
    pub port: u16,
    pub log: PathBuf,
    rss: Arc<Mutex<Vec<(u64, u64)>>>,
    sampler: Option<tokio::task::JoinHandle<()>>,
    /// Set (to the RSS in KiB) when the guard killed the gateway for using too much memory.
    pub killed_at_kb: Arc<AtomicU64>,
}

/// The gateway is killed if its RSS passes this share of the machine's memory (or 8 GiB): the
/// machine is shared, and an out-of-memory kill could hit someone else's process.
fn rss_limit_kb() -> u64 {
    let total = (procfs::mem_total_gib() * 1024.0 * 1024.0) as u64;
    (total * 2 / 5).clamp(1 << 20, 8 << 20)
}

impl Gateway {
    /// Starts `bin serve` with `DATABASE_URL=db_url` and the given `FLEETGATE_*` overrides, and
    /// waits until `/ready` answers 200 (the database answers and the LISTEN stream is up).
    pub async fn start(
        bin: &Path,
        config_dir: &Path,
        db_url: &str,
        env: &[(String, String)],
        log: PathBuf,
    ) -> anyhow::Result<Gateway> {
        let port = free_port()?;
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config-dir")
            .arg(config_dir)
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .current_dir(repo_root())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // Only our settings: nothing inherited from the caller's FLEETGATE_* or RUST_LOG.
        for (k, _) in std::env::vars_os() {
            if let Some(k) = k.to_str() {
                if k.starts_with("FLEETGATE_") || k == "RUST_LOG" {
                    cmd.env_remove(k);
                }
            }
        }
        // The gateway logs warnings only, unless FLEETGATE_BENCH_GATEWAY_LOG names another
        // level (`info` shows each subscribe's time, for instance).
        let level = std::env::var("FLEETGATE_BENCH_GATEWAY_LOG").unwrap_or_else(|_| "warn".into());
        cmd.env("DATABASE_URL", db_url)
            .env("FLEETGATE_LOG__LEVEL", level)
            .env("FLEETGATE_DATABASE__MIGRATE_ON_START", "false");
        for (k, v) in env {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the child when
        // the bench dies, so no gateway outlives an interrupted run.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let rss = Arc::new(Mutex::new(Vec::new()));
        let mut gw = Gateway {
            child,
            pid,
            port,
            log,
            rss: rss.clone(),
            sampler: None,
            killed_at_kb: Arc::new(AtomicU64::new(0)),
        };
        let killed = gw.killed_at_kb.clone();
        let limit = rss_limit_kb();
        gw.sampler = Some(tokio::spawn(async move {
            while let Some(kb) = procfs::rss_kb(pid) {
                rss.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((now_ns(), kb));
                if kb > limit {
                    eprintln!(
                        "bench: the gateway's RSS reached {} MiB (limit {} MiB): killing it",
                        kb / 1024,
                        limit / 1024
                    );
                    killed.store(kb, Ordering::Relaxed);
                    // SAFETY: our own child, not reaped yet (the guard waits for it).
                    unsafe {
                        libc::kill(pid as libc::pid_t, libc::SIGKILL);
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
        gw.wait_ready(Duration::from_secs(60)).await?;
        Ok(gw)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!(
                    "the gateway exited during start-up ({status}); last log lines:\n{}",
                    self.log_tail(20)
                );
            }
            if let Ok((200, _)) = self.get("/ready").await {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!(
                    "the gateway was not ready within {timeout:?}; last log lines:\n{}",
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `n` lines of the gateway's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `GET path` over a fresh connection: (status, body).
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let fetch = async {
            let mut s = TcpStream::connect(("127.0.0.1", self.port)).await?;
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        let buf = tokio::time::timeout(Duration::from_secs(10), fetch).await??;
        let text = String::from_utf8_lossy(&buf);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .context("no HTTP status")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// `fleetgate_coalesced_states_total` from `/metrics`, if the gateway serves it.
    pub async fn coalesced(&self) -> Option<u64> {
        let (status, body) = self.get("/metrics").await.ok()?;
        if status != 200 {
            return None;
        }
        body.lines()
            .find(|l| l.starts_with("fleetgate_coalesced_states_total "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
    }

    pub fn cpu_seconds(&self) -> f64 {
        procfs::cpu_seconds(self.pid).unwrap_or(0.0)
    }

    pub fn rss_kb(&self) -> u64 {
        procfs::rss_kb(self.pid).unwrap_or(0)
    }

    pub fn hwm_kb(&self) -> u64 {
        procfs::hwm_kb(self.pid).unwrap_or(0)
    }

    /// Peak of the sampled RSS between two bench-clock times (KiB).
    pub fn rss_peak_between(&self, from: u64, to: u64) -> u64 {
        self.rss
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .map(|(_, kb)| *kb)
            .max()
            .unwrap_or(0)
    }

    /// The sampled RSS (KiB) between two bench-clock times, one sample per `step_ns`, with
    /// seconds since `from`.
    pub fn rss_series(&self, from: u64, to: u64, step_ns: u64) -> Vec<(f64, u64)> {
        let samples = self.rss.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        let mut next = from;
        for &(t, kb) in samples.iter() {
            if t >= next && t <= to {
                out.push(((t - from) as f64 / 1e9, kb));
                next = t + step_ns;
            }
        }
        out
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops the gateway: SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self) {
        if let Some(s) = self.sampler.take() {
            s.abort();
        }
        if !self.alive() {
            return;
        }
        // SAFETY: sending a signal to our own child, whose pid has not been reaped yet.
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if !self.alive() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One or more gateway processes serving the same database, measured as one: CPU, RSS and
/// coalesced states are sums over the processes. More than one is how a deployment holds more
/// sockets than one process may open (see `worker.rs`).
pub struct Gateways(pub Vec<Gateway>);

impl Gateways {
    /// Starts `n` gateways (at least one); logs go to `log`, or `log` with `-<i>` before its
    /// extension for the i-th when there are several.
    pub async fn start(
        n: usize,
        bin: &Path,
        config_dir: &Path,
        db_url: &str,
        env: &[(String, String)],
        log: PathBuf,
    ) -> anyhow::Result<Gateways> {
        let n = n.max(1);
        let mut all = Vec::with_capacity(n);
        for i in 0..n {
            let log = if n == 1 {
                log.clone()
            } else {
                let stem = log
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("gateway");
                log.with_file_name(format!("{stem}-{i}.log"))
            };
            all.push(Gateway::start(bin, config_dir, db_url, env, log).await?);
        }
        Ok(Gateways(all))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn ports(&self) -> Vec<u16> {
        self.0.iter().map(|g| g.port).collect()
    }

    pub fn cpu_seconds(&self) -> f64 {
        self.0.iter().map(Gateway::cpu_seconds).sum()
    }

    pub fn rss_kb(&self) -> u64 {
        self.0.iter().map(Gateway::rss_kb).sum()
    }

    /// The sum of each process's peak (an upper bound of the peak of the sum).
    pub fn hwm_kb(&self) -> u64 {
        self.0.iter().map(Gateway::hwm_kb).sum()
    }

    pub fn rss_peak_between(&self, from: u64, to: u64) -> u64 {
        self.0.iter().map(|g| g.rss_peak_between(from, to)).sum()
    }

    /// The processes' series summed sample by sample (each samples every 50 ms, so the i-th
    /// samples of each are within that of each other).
    pub fn rss_series(&self, from: u64, to: u64, step_ns: u64) -> Vec<(f64, u64)> {
        let series: Vec<Vec<(f64, u64)>> = self
            .0
            .iter()
            .map(|g| g.rss_series(from, to, step_ns))
            .collect();
        let len = series.iter().map(Vec::len).min().unwrap_or(0);
        (0..len)
            .map(|i| (series[0][i].0, series.iter().map(|s| s[i].1).sum()))
            .collect()
    }

    /// Summed over the processes; none if one does not serve the metric.
    pub async fn coalesced(&self) -> Option<u64> {
        let mut sum = 0;
        for g in &self.0 {
            sum += g.coalesced().await?;
        }
        Some(sum)
    }

    /// The RSS at which the memory guard killed a process (0: none was).
    pub fn killed_kb(&self) -> u64 {
        self.0
            .iter()
            .map(|g| g.killed_at_kb.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }

    /// Whether every process is still running.
    pub fn alive(&mut self) -> bool {
        self.0.iter_mut().all(|g| g.alive())
    }

    pub fn stop(&mut self) {
        for g in &mut self.0 {
            g.stop();
        }
    }
}
