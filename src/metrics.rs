//! Prometheus metrics (served at `/metrics` by [`crate::http`]). Owns the registry and every
//! metric; the hub holds one [`Metrics`] and the hot paths (the LISTEN loop, the hub's fan-out,
//! socket writes) only touch atomics: counters and gauges are atomics, and histograms are
//! [`AtomicHistogram`]s (fixed buckets, one atomic add per observation, no lock). Values that the
//! hub already knows (watched trackers, subscriptions, queue depth, coalesced states) are sampled
//! when scraped instead of being kept twice.
//!
//! Metric names carry the `fleetgate_` prefix; the encoding is OpenMetrics text, which
//! Prometheus scrapes natively.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::ws::slots::Refused;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A histogram whose observations are atomic adds: a fixed list of upper bounds (seconds), one
/// counter per bucket plus the overflow bucket, and the sum in nanoseconds.
#[derive(Clone, Debug)]
pub struct AtomicHistogram(Arc<HistogramInner>);

#[derive(Debug)]
struct HistogramInner {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    /// `bounds` must be sorted ascending (seconds).
    pub fn new(bounds: &'static [f64]) -> Self {
        AtomicHistogram(Arc::new(HistogramInner {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }))
    }

    pub fn observe(&self, d: Duration) {
        self.0.counts[self.bucket(d)].fetch_add(1, Ordering::Relaxed);
        self.0.sum_ns.fetch_add(nanos(d), Ordering::Relaxed);
    }

    fn bucket(&self, d: Duration) -> usize {
        let secs = d.as_secs_f64();
        self.0.bounds.partition_point(|b| *b < secs)
    }

    /// Records an observation in `local`, to be added with [`AtomicHistogram::add`]: the
    /// shared counters are touched once per batch instead of once per observation.
    pub fn observe_into(&self, local: &mut LocalHistogram, d: Duration) {
        if local.counts.len() != self.0.counts.len() {
            local.counts = vec![0; self.0.counts.len()];
        }
        local.counts[self.bucket(d)] += 1;
        local.sum_ns = local.sum_ns.saturating_add(nanos(d));
        local.any = true;
    }

    /// Adds what `local` recorded, and empties it.
    pub fn add(&self, local: &mut LocalHistogram) {
        if !local.any {
            return;
        }
        for (shared, n) in self.0.counts.iter().zip(local.counts.iter_mut()) {
            if *n > 0 {
                shared.fetch_add(*n, Ordering::Relaxed);
                *n = 0;
            }
        }
        self.0.sum_ns.fetch_add(local.sum_ns, Ordering::Relaxed);
        local.sum_ns = 0;
        local.any = false;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.0
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Observations of an [`AtomicHistogram`] not yet added to it (see
/// [`AtomicHistogram::observe_into`]).
#[derive(Debug, Default)]
pub struct LocalHistogram {
    counts: Vec<u64>,
    sum_ns: u64,
    any: bool,
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let buckets: Vec<(f64, u64)> = self
            .0
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.0.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.0.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// What a frame written to a socket was, by its leading bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    State,
    StateBatch,
    ReadingsBatch,
    IotMonitor,
    Lifecycle,
    Logout,
    Response,
    Error,
    Other,
}

/// Frames a socket wrote, counted locally and added to the shared counters once per batch
/// ([`Metrics::add_sent`]): at a million frames a second, four shared atomics per frame were
/// cache lines bouncing between the socket threads.
#[derive(Debug, Default)]
pub struct SentTally {
    frames: [u64; FrameKind::ALL.len()],
    bytes: u64,
    notify_to_send: LocalHistogram,
    any: bool,
}

impl SentTally {
    pub fn frame(&mut self, kind: FrameKind, wire_len: usize) {
        if let Some(n) = self.frames.get_mut(kind.index()) {
            *n += 1;
        }
        self.bytes += wire_len as u64;
        self.any = true;
    }

    /// A state frame written `d` after the notification that announced it.
    pub fn notify_to_send(&mut self, m: &Metrics, d: Duration) {
        m.notify_to_send.observe_into(&mut self.notify_to_send, d);
        self.any = true;
    }
}

impl FrameKind {
    const ALL: [FrameKind; 9] = [
        FrameKind::State,
        FrameKind::StateBatch,
        FrameKind::ReadingsBatch,
        FrameKind::IotMonitor,
        FrameKind::Lifecycle,
        FrameKind::Logout,
        FrameKind::Response,
        FrameKind::Error,
        FrameKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FrameKind::State => "state",
            FrameKind::StateBatch => "state_batch",
            FrameKind::ReadingsBatch => "readings_batch",
            FrameKind::IotMonitor => "iot_monitor",
            FrameKind::Lifecycle => "lifecycle",
            FrameKind::Logout => "logout",
            FrameKind::Response => "response",
            FrameKind::Error => "error",
            FrameKind::Other => "other",
        }
    }

    /// Classifies a frame as rendered by `model` and `ws::protocol` (their objects start with
    /// `"type"`, then `"event"` for events). Looks at a few dozen bytes at most.
    pub fn of(frame: &str) -> FrameKind {
        if let Some(rest) = frame.strip_prefix(r#"{"type":"event","event":""#) {
            let name = rest.split('"').next().unwrap_or("");
            return match name {
                "state" => FrameKind::State,
                "state_batch" => FrameKind::StateBatch,
                "readings_batch" => FrameKind::ReadingsBatch,
                "iot_monitor" => FrameKind::IotMonitor,
                "lifecycle" => FrameKind::Lifecycle,
                "logout" => FrameKind::Logout,
                _ => FrameKind::Other,
            };
        }
        if frame.starts_with(r#"{"type":"response""#) {
            FrameKind::Response
        } else if frame.starts_with(r#"{"type":"error""#) {
            FrameKind::Error
        } else {
            FrameKind::Other
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Values the hub knows, sampled at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub subscribed_trackers: u64,
    pub subscriptions: u64,
    pub sessions: u64,
    /// `state_batch` and `readings_batch` groups alive.
    pub batch_groups: u64,
    pub queue_depth: u64,
    pub queue_depth_max: u64,
    pub coalesced: u64,
}

const SUBSCRIBE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const SEND_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
const GAP_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0];

/// Every metric of one gateway process.
pub struct Metrics {
    registry: Registry,
    epoch: Instant,
    round_notified_ns: AtomicU64,
    /// Open WebSocket connections.
    pub open_sockets: Gauge,
    /// Open WebSocket connections that negotiated `permessage-deflate`.
    pub compressed_sockets: Gauge,
    /// WebSocket upgrades refused at `websocket.max_sockets` (`[0]`) and at
    /// `websocket.max_sockets_per_address` (`[1]`).
    pub sockets_refused: [Counter; 2],
    frames: Vec<Counter>,
    /// Payload bytes of text frames written to sockets (after Atmosphere framing, and compressed
    /// where the socket negotiated it).
    pub bytes_sent: Counter,
    /// NOTIFY messages received on the LISTEN connection.
    pub notifications: Counter,
    /// Times the LISTEN stream was restored after a loss.
    pub listen_reconnects: Counter,
    /// Event processor rounds abandoned at `listen.round_timeout_secs`.
    pub rounds_abandoned: Counter,
    /// PostgreSQL's notification queue in use (0 to 1), as the LISTEN connection's last probe
    /// read it (`pg_notification_queue_usage()`).
    pub notify_queue_usage: Gauge<f64, AtomicU64>,
    /// How long each LISTEN outage lasted.
    pub listen_gap: AtomicHistogram,
    /// From a subscribe message read to its response and initial states written.
    pub subscribe_latency: AtomicHistogram,
    /// From the NOTIFY that announced a state to its `state` frame written to a socket.
    pub notify_to_send: AtomicHistogram,
    subscribed_trackers: Gauge,
    subscriptions: Gauge,
    sessions: Gauge,
    batch_groups: Gauge,
    queue_depth: Gauge,
    queue_depth_max: Gauge,
    coalesced: Counter,
    /// Batches not sent to a member whose previous batch was still waiting in its queue (it
    /// catches up at a later period).
    pub batches_skipped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fleetgate");
        let open_sockets = Gauge::default();
        let compressed_sockets = Gauge::default();
        registry.register(
            "compressed_sockets",
            "Open WebSocket connections with permessage-deflate negotiated",
            compressed_sockets.clone(),
        );
        registry.register(
            "open_sockets",
            "Open WebSocket connections",
            open_sockets.clone(),
        );
        let refused = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let sockets_refused = [Refused::Full, Refused::Address]
            .map(|limit| refused.get_or_create_owned(&[("limit", limit.label())]));
        registry.register(
            "sockets_refused",
            "WebSocket upgrades refused at the process's socket limit or at one address's",
            refused,
        );
        let family = Family::<[(&'static str, &'static str); 1], Counter>::default();
        let frames = FrameKind::ALL
            .iter()
            .map(|k| family.get_or_create_owned(&[("kind", k.as_str())]))
            .collect();
        registry.register(
            "events_sent",
            "Frames written to sockets, by kind: events (state, state_batch, lifecycle, logout, …), responses and errors",
            family,
        );
        let bytes_sent = Counter::default();
        registry.register_with_unit(
            "socket_sent",
            "Payload bytes of text frames written to sockets (compressed where the socket negotiated it)",
            Unit::Bytes,
            bytes_sent.clone(),
        );
        let subscribed_trackers = Gauge::default();
        registry.register(
            "subscribed_trackers",
            "Trackers watched by at least one socket or batch group",
            subscribed_trackers.clone(),
        );
        let subscriptions = Gauge::default();
        registry.register(
            "subscriptions",
            "Tracker subscriptions: (socket or batch group, tracker) pairs",
            subscriptions.clone(),
        );
        let sessions = Gauge::default();
        registry.register(
            "sessions",
            "Distinct sessions held by open sockets",
            sessions.clone(),
        );
        let batch_groups = Gauge::default();
        registry.register(
            "batch_groups",
            "state_batch and readings_batch groups: one per distinct request and account or \
             sub-user, shared by its sockets",
            batch_groups.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "outbound_queue_depth",
            "Items waiting in the outbound queues of all sockets: queued events, and one mark per tracker whose newest state a full queue left to the hub",
            queue_depth.clone(),
        );
        let queue_depth_max = Gauge::default();
        registry.register(
            "outbound_queue_depth_max",
            "Items waiting in the fullest outbound queue (up to websocket.queue_capacity events plus one mark per tracker the socket is behind on)",
            queue_depth_max.clone(),
        );
        let coalesced = Counter::default();
        registry.register(
            "coalesced_states",
            "States dropped from full outbound queues because a newer state of the same tracker replaced them",
            coalesced.clone(),
        );
        let batches_skipped = Counter::default();
        registry.register(
            "batches_skipped",
            "Periods a batch member missed because its previous batch was still queued (it gets a catch-up at a later period)",
            batches_skipped.clone(),
        );
        let notifications = Counter::default();
        registry.register(
            "notifications",
            "NOTIFY messages received on the LISTEN connection",
            notifications.clone(),
        );
        let listen_reconnects = Counter::default();
        registry.register(
            "listen_reconnects",
            "Times the LISTEN stream was restored after a loss (each followed by a resync)",
            listen_reconnects.clone(),
        );
        let rounds_abandoned = Counter::default();
        registry.register(
            "event_rounds_abandoned",
            "Event processor rounds abandoned at listen.round_timeout_secs (their connections dropped, a resync following)",
            rounds_abandoned.clone(),
        );
        let notify_queue_usage = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "notify_queue_usage",
            "PostgreSQL's notification queue in use, 0 to 1, at the LISTEN connection's last probe (writes fail at 1)",
            notify_queue_usage.clone(),
        );
        let listen_gap = AtomicHistogram::new(GAP_BUCKETS);
        registry.register_with_unit(
            "listen_gap",
            "Duration of each LISTEN outage, from loss to restored stream",
            Unit::Seconds,
            listen_gap.clone(),
        );
        let subscribe_latency = AtomicHistogram::new(SUBSCRIBE_BUCKETS);
        registry.register_with_unit(
            "subscribe_latency",
            "From a subscribe message read to its response and initial states written",
            Unit::Seconds,
            subscribe_latency.clone(),
        );
        let notify_to_send = AtomicHistogram::new(SEND_BUCKETS);
        registry.register_with_unit(
            "notify_to_send",
            "From the NOTIFY announcing a state change to its state event written to a socket",
            Unit::Seconds,
            notify_to_send.clone(),
        );
        Metrics {
            registry,
            epoch: Instant::now(),
            round_notified_ns: AtomicU64::new(0),
            open_sockets,
            compressed_sockets,
            sockets_refused,
            frames,
            bytes_sent,
            notifications,
            listen_reconnects,
            rounds_abandoned,
            notify_queue_usage,
            listen_gap,
            subscribe_latency,
            notify_to_send,
            subscribed_trackers,
            subscriptions,
            sessions,
            batch_groups,
            queue_depth,
            queue_depth_max,
            coalesced,
            batches_skipped,
        }
    }

    /// Counts one frame written to a socket, `wire_len` bytes after transport framing.
    pub fn frame_sent(&self, kind: FrameKind, wire_len: usize) {
        if let Some(c) = self.frames.get(kind.index()) {
            c.inc();
        }
        self.bytes_sent.inc_by(wire_len as u64);
    }

    /// Adds what a socket counted in `tally` since the last call, and empties it.
    pub fn add_sent(&self, tally: &mut SentTally) {
        if !tally.any {
            return;
        }
        for (kind, n) in tally.frames.iter_mut().enumerate() {
            if *n > 0 {
                if let Some(c) = self.frames.get(kind) {
                    c.inc_by(*n);
                }
                *n = 0;
            }
        }
        self.bytes_sent.inc_by(tally.bytes);
        tally.bytes = 0;
        self.notify_to_send.add(&mut tally.notify_to_send);
        tally.any = false;
    }

    /// Frames of this kind written so far.
    pub fn frames_sent(&self, kind: FrameKind) -> u64 {
        self.frames.get(kind.index()).map_or(0, |c| c.get())
    }

    /// Marks the start of a processing round whose earliest notification arrived at `at`; states
    /// published in the round carry [`Metrics::round_notified`] for the notify-to-send latency.
    pub fn round_started(&self, at: Instant) {
        let ns = at.saturating_duration_since(self.epoch).as_nanos();
        self.round_notified_ns
            .store(u64::try_from(ns).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// When the notification behind the current processing round arrived.
    pub fn round_notified(&self) -> Instant {
        self.epoch + Duration::from_nanos(self.round_notified_ns.load(Ordering::Relaxed))
    }

    /// The exposition: `sample` fills the values the hub knows, then every metric is encoded.
    pub fn render(&self, sample: Sample) -> String {
        let gauge = |g: &Gauge, v: u64| {
            g.set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        gauge(&self.subscribed_trackers, sample.subscribed_trackers);
        gauge(&self.subscriptions, sample.subscriptions);
        gauge(&self.sessions, sample.sessions);
        gauge(&self.batch_groups, sample.batch_groups);
        gauge(&self.queue_depth, sample.queue_depth);
        gauge(&self.queue_depth_max, sample.queue_depth_max);
        self.coalesced
            .inner()
            .store(sample.coalesced, Ordering::Relaxed);
        let mut out = String::with_capacity(8192);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_classified_by_their_leading_bytes() {
        assert_eq!(
            FrameKind::of(r#"{"type":"event","event":"state","user_time":"x"}"#),
            FrameKind::State
        );
        assert_eq!(FrameKind::of(crate::model::LOGOUT_EVENT), FrameKind::Logout);
        assert_eq!(
            FrameKind::of(&crate::model::lifecycle_event(
                1,
                2,
                crate::model::Lifecycle::Block
            )),
            FrameKind::Lifecycle
        );
        assert_eq!(
            FrameKind::of(r#"{"type":"response","action":"subscription/subscribe"}"#),
            FrameKind::Response
        );
        assert_eq!(FrameKind::of(r#"{"type":"error"}"#), FrameKind::Error);
        assert_eq!(FrameKind::of("X"), FrameKind::Other);
    }

    #[test]
    fn a_tally_adds_what_direct_counting_would() {
        let (direct, tallied) = (Metrics::new(), Metrics::new());
        let mut tally = SentTally::default();
        for (kind, len, ms) in [
            (FrameKind::State, 300, 1),
            (FrameKind::State, 310, 40),
            (FrameKind::Response, 50, 0),
        ] {
            direct.frame_sent(kind, len);
            tally.frame(kind, len);
            if kind == FrameKind::State {
                direct.notify_to_send.observe(Duration::from_millis(ms));
                tally.notify_to_send(&tallied, Duration::from_millis(ms));
            }
        }
        assert_eq!(
            tallied.frames_sent(FrameKind::State),
            0,
            "nothing added yet"
        );
        tallied.add_sent(&mut tally);
        tallied.add_sent(&mut tally); // emptied: adds nothing twice
        let sent = |m: &Metrics| -> Vec<String> {
            m.render(Sample::default())
                .lines()
                .filter(|l| l.contains("_sent") || l.contains("notify_to_send"))
                .map(str::to_string)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        assert!(sent(&direct).len() > 10, "{:?}", sent(&direct));
        assert_eq!(sent(&tallied), sent(&direct));
        assert_eq!(tallied.frames_sent(FrameKind::State), 2);
        assert_eq!(tallied.notify_to_send.count(), 2);
    }

    #[test]
    fn exposition_has_every_metric_and_histogram_buckets() {
        let m = Metrics::new();
        m.subscribe_latency.observe(Duration::from_millis(3));
        m.subscribe_latency.observe(Duration::from_secs(60));
        m.frame_sent(FrameKind::of(crate::model::LOGOUT_EVENT), 60);
        let text = m.render(Sample {
            subscribed_trackers: 3,
            coalesced: 7,
            ..Sample::default()
        });
        for needle in [
            "fleetgate_open_sockets 0",
            "fleetgate_compressed_sockets 0",
            "fleetgate_batch_groups 0",
            r#"fleetgate_sockets_refused_total{limit="address"} 0"#,
            "fleetgate_subscribed_trackers 3",
            "fleetgate_coalesced_states_total 7",
            "fleetgate_batches_skipped_total 0",
            r#"fleetgate_events_sent_total{kind="logout"} 1"#,
            "fleetgate_socket_sent_bytes_total 60",
            "fleetgate_subscribe_latency_seconds_count 2",
            r#"fleetgate_subscribe_latency_seconds_bucket{le="0.005"} 1"#,
            r#"fleetgate_subscribe_latency_seconds_bucket{le="+Inf"} 2"#,
            "fleetgate_notify_to_send_seconds_count 0",
            "fleetgate_listen_reconnects_total 0",
            "fleetgate_notify_queue_usage 0.0",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle} missing from\n{text}");
        }
    }

    #[test]
    fn the_readme_lists_every_metric_and_only_those() {
        let readme = include_str!("../README.md");
        let table = readme
            .split_once("`GET /metrics` exposes")
            .and_then(|(_, rest)| rest.split_once("## Commands"))
            .map(|(table, _)| table)
            .expect("README's metrics table");
        // First column: `name`, `name{label}`, … (names without the prefix).
        let mut listed: Vec<String> = table
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split(" |").next())
            .flat_map(|cell| cell.split(", "))
            .map(|n| {
                let n = n.trim_matches('`');
                format!("fleetgate_{}", n.split('{').next().unwrap_or(n))
            })
            .collect();
        listed.sort();
        let text = Metrics::new().render(Sample::default());
        // `# TYPE name type`; OpenMetrics names counters without `_total` there.
        let mut exposed: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| {
                let (name, kind) = l.split_once(' ')?;
                Some(match kind {
                    "counter" => format!("{name}_total"),
                    _ => name.to_string(),
                })
            })
            .collect();
        exposed.sort();
        assert!(exposed.len() >= 19, "{exposed:?}");
        assert_eq!(listed, exposed);
    }
}
