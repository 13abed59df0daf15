//! The LISTEN connection lost mid-stream: reconnect, then resync what changed during the gap.
//!
//! These run the whole path, but a notification committed just before the new connection's
//! `LISTEN` can still reach it (PostgreSQL starts a new listener from the oldest notification
//! it keeps, or from where another listener of the database has read to), so they do not always
//! need the resync to pass. The resync itself is tested directly, on a hub, in `db.rs`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::common::*;

/// Terminates the gateway's LISTEN backend inside `during_gap`'s transaction, before it commits,
/// so the commit's notification is certainly lost: only the resync can deliver it.
async fn terminate_listener_then(app: &TestApp, during_gap: &str) {
    app.exec(&format!(
        "BEGIN; {during_gap}; \
         SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
          WHERE application_name = '{}' AND datname = current_database(); \
         COMMIT;",
        fleetgate::listen::LISTEN_APPLICATION_NAME
    ))
    .await;
}

#[tokio::test]
async fn a_state_missed_during_the_gap_still_arrives() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;
    terminate_listener_then(
        &app,
        "UPDATE tracker_states SET speed = 99 WHERE tracker_id = 101",
    )
    .await;
    let (ev, _) = c.recv_until(|v| is_state_of(v, 101)).await;
    assert_eq!(ev["data"]["gps"]["speed"], 99);
    // And the stream works again afterwards.
    app.set_speed(&[102], 98).await;
    c.recv_until(|v| is_state_with_speed(v, 102, 98)).await;
}

#[tokio::test]
async fn blocks_and_ended_sessions_during_the_gap_take_effect() {
    let app = spawn_app().await;
    let mut a = app.connect().await;
    a.subscribe_and_states(ACME, &[101, 102, 105], 2).await;
    let mut b = app.connect().await;
    b.subscribe_and_states(ACME2, &[103], 1).await;
    terminate_listener_then(
        &app,
        &format!(
            "UPDATE trackers SET blocked = true WHERE id = 101; \
             UPDATE trackers SET blocked = false WHERE id = 105; \
             UPDATE trackers SET removed = true WHERE id = 102; \
             UPDATE sessions SET revoked_at = now() WHERE hash = '{ACME2}'"
        ),
    )
    .await;
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let v = a.recv().await;
        seen.push(v);
        let has = |id: i64, what: &str| {
            seen.iter().any(|v| {
                v["tracker_id"] == id
                    && (v["data"]["lifecycle_event"] == what || v["event"] == what)
            })
        };
        if has(101, "block") && has(102, "corrupt") && has(105, "unblock") && has(105, "state") {
            break;
        }
    }
    let pos = |pred: &dyn Fn(&serde_json::Value) -> bool| seen.iter().position(pred);
    let unblock = pos(&|v| v["tracker_id"] == 105 && v["data"]["lifecycle_event"] == "unblock");
    let state = pos(&|v| is_state_of(v, 105));
    assert!(
        unblock.is_some() && state.is_some() && unblock < state,
        "{seen:?}"
    );
    let (_, before) = b.recv_close().await;
    assert_eq!(
        before.last().map(|v| v["event"].clone()),
        Some("logout".into())
    );
}

/// A tracker moved into an account and blocked there during the gap joins that account's `all`
/// batch as `block` (PROTOCOL.md §5), and its old account's viewer gets `corrupt`.
#[tokio::test]
async fn a_tracker_moved_in_and_blocked_during_the_gap_is_block_for_its_new_batches() {
    let app = spawn_app().await;
    let mut old = app.connect().await;
    old.subscribe_and_states(ACME, &[101], 1).await;
    let mut dashboard = app.connect().await;
    dashboard
        .send(
            serde_json::json!({"action": "subscribe", "hash": RIVAL, "requests": [
            {"type": "state_batch", "target": {"type": "all"}, "rate_limit": "200ms"}]}),
        )
        .await;
    dashboard.recv_until(|v| v["event"] == "state_batch").await;
    terminate_listener_then(
        &app,
        "UPDATE trackers SET account_id = 3 WHERE id = 101;          UPDATE trackers SET blocked = true WHERE id = 101",
    )
    .await;
    let (block, _) = dashboard
        .recv_until(|v| v["event"] == "lifecycle" && v["tracker_id"] == 101)
        .await;
    assert_eq!(block["data"]["lifecycle_event"], "block", "{block}");
    let (corrupt, _) = old.recv_until(|v| v["event"] == "lifecycle").await;
    assert_eq!(corrupt["data"]["lifecycle_event"], "corrupt", "{corrupt}");
}

#[tokio::test]
async fn ready_reports_the_stream_down_during_the_gap() {
    let app = spawn_app_with(|s| s.listen.reconnect_min_ms = 1500).await;
    terminate_listener_then(&app, "SELECT 1").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, body) = app.get("/ready").await;
        if code == 503 {
            assert!(body.contains("\"listen_stream\":false"), "{body}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/ready never reported the gap"
        );
    }
    app.wait_ready().await;
}

/// The LISTEN connection and the event processor run on a thread of their own
/// (`startup::spawn_event_thread`): stopping the gateway ends them, and their connections with
/// them, rather than leaving a thread that keeps reconnecting to the database.
#[tokio::test]
async fn stopping_the_gateway_ends_the_listen_and_event_connections() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    // A change read by the processor: its pool has a connection open now.
    app.set_speed(&[101], 77).await;
    c.recv_until(|v| is_state_with_speed(v, 101, 77)).await;

    // Watched from the server's own database, since the gateway's pool closes as it stops.
    let admin = sqlx::PgPool::connect(&server_url())
        .await
        .expect("connect to the server");
    let names = [
        fleetgate::listen::LISTEN_APPLICATION_NAME,
        fleetgate::db::EVENTS_APPLICATION_NAME,
    ];
    let count = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
              WHERE datname = $1 AND application_name = ANY($2)",
        )
        .bind(&app.db_name)
        .bind(&names[..])
        .fetch_one(&admin)
        .await
        .expect("pg_stat_activity")
    };
    eventually("the LISTEN and event connections", || async {
        count().await >= 2
    })
    .await;
    app.stop();
    eventually("the LISTEN and event connections to close", || async {
        count().await == 0
    })
    .await;
}

/// The server drops every connection of the gateway's (a restart, a failover): the LISTEN
/// connection comes back after its backoff, and the resync must not then wait a backoff more for
/// each dead connection of the event processor's pool (they are not tested before use). With a
/// backoff of 5 s, the missed state took 10 s and more; it now comes right after the LISTEN.
#[tokio::test]
async fn a_resync_after_every_connection_dropped_does_not_wait_for_each_dead_one() {
    let app = spawn_app_with(|s| {
        s.listen.reconnect_min_ms = 5_000;
        s.listen.reconnect_max_ms = 5_000;
    })
    .await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;
    // The event processor's pool has connections open.
    app.set_speed(&[101, 102], 41).await;
    c.recv_until(|v| is_state_with_speed(v, 102, 41)).await;
    app.exec(&format!(
        "BEGIN; UPDATE tracker_states SET speed = 42 WHERE tracker_id = 101; \
         SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
          WHERE application_name IN ('{}', '{}') AND datname = current_database(); \
         COMMIT;",
        fleetgate::listen::LISTEN_APPLICATION_NAME,
        fleetgate::db::EVENTS_APPLICATION_NAME,
    ))
    .await;
    // The LISTEN's 5 s, then the resync at once (it took a 5 s backoff more per dead one).
    let arrived = tokio::time::timeout(
        std::time::Duration::from_secs(8),
        c.recv_until(|v| is_state_with_speed(v, 101, 42)),
    )
    .await;
    assert!(arrived.is_ok(), "the missed state came after 8 s");
}

#[tokio::test]
async fn the_listen_backend_drops_a_vanished_gateway_within_a_minute() {
    let app = spawn_app().await;
    // The settings the listener applies to its session are ones this server takes, with the
    // values shown back (over TCP; over a Unix socket PostgreSQL keeps them without effect).
    let mut conn = app.pool.acquire().await.expect("a connection");
    for (name, value) in fleetgate::listen::LISTEN_TCP_SETTINGS {
        sqlx::query(&format!("SET {name} = {value}"))
            .execute(&mut *conn)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let tcp: bool = sqlx::query_scalar("SELECT inet_server_addr() IS NOT NULL")
        .fetch_one(&mut *conn)
        .await
        .expect("inet_server_addr");
    if tcp {
        let shown: Vec<String> = sqlx::query_scalar(
            "SELECT current_setting(n) FROM unnest(ARRAY['tcp_keepalives_idle', \
             'tcp_keepalives_interval', 'tcp_keepalives_count', 'tcp_user_timeout']) n",
        )
        .fetch_all(&mut *conn)
        .await
        .expect("current_setting");
        assert_eq!(shown, ["30", "10", "3", "60000"]);
    }
    sqlx::query("RESET ALL")
        .execute(&mut *conn)
        .await
        .expect("reset");
    // And the listener is connected with them.
    let listening: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
          WHERE application_name = $1 AND datname = current_database()",
    )
    .bind(fleetgate::listen::LISTEN_APPLICATION_NAME)
    .fetch_one(&mut *conn)
    .await
    .expect("pg_stat_activity");
    assert_eq!(listening, 1);
}

#[tokio::test]
async fn the_probe_reports_how_full_the_notification_queue_is() {
    let app = spawn_app_with(|s| s.listen.probe_interval_ms = 100).await;
    // A listener that reads nothing (its transaction stays open) holds PostgreSQL's queue: what
    // is notified from now on stays in it.
    let mut held = app.pool.acquire().await.expect("a connection");
    for sql in ["LISTEN fg_test_filler", "BEGIN", "SELECT 1"] {
        sqlx::query(sql).execute(&mut *held).await.expect(sql);
    }
    // More than a page (8 KB) of the queue: its usage counts whole pages.
    app.exec(
        "SELECT pg_notify('fg_test_filler', repeat('x', 1000) || g) FROM generate_series(1, 40) g",
    )
    .await;
    let usage = &app.hub.metrics.notify_queue_usage;
    app.until("the probe to read a queue in use", || usage.get() > 0.0)
        .await;
    let (code, text) = app.get("/metrics").await;
    assert_eq!(code, 200);
    assert!(
        text.lines()
            .any(|l| l.starts_with("fleetgate_notify_queue_usage ") && !l.ends_with(" 0.0")),
        "{text}"
    );
    // Closed without reading on (its transaction aborts): the notifications it would be sent
    // at a commit are not what this connection type expects.
    let _ = sqlx::Connection::close(held.detach()).await;
}

/// A TCP proxy in front of PostgreSQL that can freeze the event processor's connections
/// (`fleetgate-events` in their startup message): bytes stop flowing both ways while both
/// sockets stay open, as when the server's host vanished or the network was cut after a
/// failover (neither end is told). Connections accepted after a freeze flow normally.
struct FreezingProxy {
    port: u16,
    /// Connections accepted before this generation are frozen (if they are the processor's).
    frozen_below: Arc<AtomicU64>,
    generation: Arc<AtomicU64>,
}

impl FreezingProxy {
    async fn start(upstream: (String, u16)) -> FreezingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let frozen_below = Arc::new(AtomicU64::new(0));
        let generation = Arc::new(AtomicU64::new(0));
        let (fb, gen) = (frozen_below.clone(), generation.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(upstream.clone()).await else {
                    continue;
                };
                let born = gen.load(Ordering::SeqCst);
                let events = Arc::new(AtomicBool::new(false));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let frozen = {
                    let (fb, events) = (fb.clone(), events.clone());
                    move || events.load(Ordering::SeqCst) && born < fb.load(Ordering::SeqCst)
                };
                tokio::spawn(pump(cr, sw, Some(events), frozen.clone()));
                tokio::spawn(pump(sr, cw, None, frozen));
            }
        });
        FreezingProxy {
            port,
            frozen_below,
            generation,
        }
    }

    /// Freezes the processor's connections open now.
    fn freeze(&self) {
        let next = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.frozen_below.store(next, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    sniff: Option<Arc<AtomicBool>>,
    frozen: impl Fn() -> bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let name = fleetgate::db::EVENTS_APPLICATION_NAME.as_bytes();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(events) = &sniff {
            if buf[..n].windows(name.len()).any(|w| w == name) {
                events.store(true, Ordering::SeqCst);
            }
        }
        if frozen() {
            // Hold both sockets open and pass nothing on, for the rest of the test.
            let _keep = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The database server's TCP address, for a proxy to forward to; None (and the test skipped)
/// where `DATABASE_URL` names a Unix socket.
fn tcp_upstream() -> Option<(String, u16)> {
    let direct: sqlx::postgres::PgConnectOptions = server_url().parse().expect("DATABASE_URL");
    let upstream = (direct.get_host().to_string(), direct.get_port());
    if upstream.0.starts_with('/') {
        eprintln!("skipped: DATABASE_URL names a Unix socket; the proxy needs TCP");
        return None;
    }
    Some(upstream)
}

/// Points the settings' database URL at a proxy on `port` instead of `upstream`, in the clear
/// (so that a proxy can read the application names).
fn through_proxy(s: &mut fleetgate::config::Settings, upstream: &(String, u16), port: u16) {
    let authority = format!("{}:{}", upstream.0, upstream.1);
    assert!(s.database.url.contains(&authority), "{}", s.database.url);
    let url = s
        .database
        .url
        .replacen(&authority, &format!("127.0.0.1:{port}"), 1);
    let sep = if url.contains('?') { '&' } else { '?' };
    s.database.url = format!("{url}{sep}sslmode=disable");
}

/// A gateway whose database connections go through a [`FreezingProxy`], with rounds given up
/// after a second and one processor connection (the next round needs the frozen one, whether
/// it froze in its query or in the check the pool makes as each connection comes back to it),
/// and a client watching tracker 101 that has had a change through the processor's connection
/// (open, then, for the proxy to freeze).
async fn spawn_behind_a_proxy() -> Option<(FreezingProxy, TestApp, Client)> {
    let upstream = tcp_upstream()?;
    let proxy = FreezingProxy::start(upstream.clone()).await;
    let app = spawn_app_with(|s| {
        through_proxy(s, &upstream, proxy.port);
        s.listen.round_timeout_secs = 1;
        s.database.event_connections = 1;
    })
    .await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    app.set_speed(&[101], 31).await;
    c.recv_until(|v| is_state_with_speed(v, 101, 31)).await;
    Some((proxy, app, c))
}

#[tokio::test]
async fn a_read_on_a_connection_that_went_silent_is_abandoned_and_the_event_still_arrives() {
    let Some((proxy, app, mut c)) = spawn_behind_a_proxy().await else {
        return;
    };
    proxy.freeze();
    // The LISTEN connection still works: the change is notified, and the processor's read of
    // it goes out on a connection that will never answer.
    app.set_speed(&[101], 32).await;
    c.recv_until(|v| is_state_with_speed(v, 101, 32)).await;
    assert!(app.hub.metrics.rounds_abandoned.get() >= 1);
    // And the processor works on after it.
    app.set_speed(&[101], 33).await;
    c.recv_until(|v| is_state_with_speed(v, 101, 33)).await;
}

#[tokio::test]
async fn a_block_and_its_unblock_notified_to_an_abandoned_round_both_arrive() {
    let Some((proxy, app, mut c)) = spawn_behind_a_proxy().await else {
        return;
    };
    proxy.freeze();
    // Both are notified while the round reading the first hangs; the round is given up and a
    // resync follows, which alone would find the tracker as it was and say nothing.
    app.exec("UPDATE trackers SET blocked = true WHERE id = 101")
        .await;
    app.exec("UPDATE trackers SET blocked = false WHERE id = 101")
        .await;
    let is = |v: &serde_json::Value, what: &str| {
        v["tracker_id"] == 101 && v["data"]["lifecycle_event"] == what
    };
    c.recv_until(|v| is(v, "block")).await;
    c.recv_until(|v| is(v, "unblock")).await;
    assert!(app.hub.metrics.rounds_abandoned.get() >= 1);
    // And the tracker's states flow again.
    app.set_speed(&[101], 34).await;
    c.recv_until(|v| is_state_with_speed(v, 101, 34)).await;
}

/// A TCP proxy to the database that can be cut: every connection through it closed and the
/// port closed, so that connecting is refused, as when the server stops.
struct CuttingProxy {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
}

impl CuttingProxy {
    async fn start(upstream: (String, u16)) -> CuttingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (cut, mut watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(_) => return,
                    },
                    _ = watch.changed() => return,
                };
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream.clone()).await else {
                    continue;
                };
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.changed() => {}
                    }
                });
            }
        });
        CuttingProxy { port, cut }
    }

    fn cut(&self) {
        let _ = self.cut.send(true);
    }
}

#[tokio::test]
async fn a_server_that_stops_is_seen_at_once() {
    let Some(upstream) = tcp_upstream() else {
        return;
    };
    let proxy = CuttingProxy::start(upstream.clone()).await;
    let app = spawn_app_with(|s| {
        through_proxy(s, &upstream, proxy.port);
        // The probe would notice too, at its next tick: not within this test.
        s.listen.probe_interval_ms = 3_600_000;
    })
    .await;
    app.wait_ready().await;
    proxy.cut();
    // The connection's end is the news: no reconnecting to a server that refuses first
    // (sqlx's default, which kept `listen_stream` true for up to its acquire timeout).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    app.until("the stream reported down", || !app.hub.stream_up())
        .await;
    assert!(std::time::Instant::now() < deadline);
    // And /ready says so within a probe's usual timeout (1 s), not after waiting out the
    // database it already knows is gone.
    let asked = std::time::Instant::now();
    let (code, _) = app.get("/ready").await;
    assert_eq!(code, 503);
    assert!(
        asked.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
}

#[tokio::test]
async fn ready_says_so_while_the_event_processor_cannot_read() {
    let app = spawn_app().await;
    let ready = || async {
        let (code, body) = app.get("/ready").await;
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        (code, v["events_current"].clone())
    };
    assert_eq!(ready().await, (200, true.into()));
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    // The change is notified, but the processor's read of it fails (the table it reads is
    // away for a while): the database answers and the stream is up, yet nothing is delivered.
    app.exec(
        "ALTER TABLE tracker_states RENAME TO tracker_states_away; \
         UPDATE tracker_states_away SET speed = 61 WHERE tracker_id = 101",
    )
    .await;
    eventually("/ready to say the processor is behind", || async {
        ready().await == (503, false.into())
    })
    .await;
    app.exec("ALTER TABLE tracker_states_away RENAME TO tracker_states")
        .await;
    // The resync delivers the change, and the gateway is ready again.
    c.recv_until(|v| is_state_with_speed(v, 101, 61)).await;
    eventually("/ready to recover", || async {
        ready().await == (200, true.into())
    })
    .await;
}

#[tokio::test]
async fn the_event_processors_statements_end_on_the_server_after_the_longest_round() {
    let app = spawn_app().await;
    let settings = test_settings();
    // The processor's pool as startup builds it: eight times the round timeout.
    let pool = fleetgate::db::events_pool(
        &app.pool,
        &settings.database,
        std::time::Duration::from_secs(settings.listen.round_timeout_secs * 8),
    );
    let shown: String = sqlx::query_scalar("SHOW statement_timeout")
        .fetch_one(&pool)
        .await
        .expect("show");
    assert_eq!(shown, "4min");
    pool.close().await;
}

/// `serve` started before its database waits for it (`database.startup_wait_secs`) and comes
/// up with it, instead of exiting: here the database's port answers nothing until a proxy to
/// the real server starts listening on it.
#[tokio::test]
async fn serve_started_before_its_database_comes_up_with_it() {
    let Some(upstream) = tcp_upstream() else {
        return;
    };
    let app = spawn_app().await;
    let port = free_port();
    let mut s = test_settings();
    s.database.url = app.db_url.clone();
    through_proxy(&mut s, &upstream, port);
    let log = std::env::temp_dir().join(format!("fleetgate-startup-wait-{}.log", app.port));
    let log_path = log.to_string_lossy().into_owned();
    let server = Server::start(
        &app,
        &[
            ("DATABASE_URL", &s.database.url),
            ("FLEETGATE_DATABASE__STARTUP_WAIT_SECS", "120"),
            ("FLEETGATE_LISTEN__RECONNECT_MAX_MS", "500"),
            ("FLEETGATE_TEST_LOG", &log_path),
        ],
    );
    eventually("serve to say it waits for the database", || async {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("waiting for it"))
    })
    .await;
    // Meanwhile the address answers: alive, not ready, anything else code 14.
    let (code, body) = server.get("/health").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = server.get("/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(r#""database":false"#), "{body}");
    let (code, body) = server.get("/v2/tracker/list?hash=x").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(r#""code":14"#), "{body}");
    // The database comes up.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the database's port");
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    });
    server.wait_started().await;
    let mut c = Client::connect(&server.ws_url()).await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    drop(server);
    let _ = std::fs::remove_file(&log);
}

/// `serve` gives up on a database that stays down once `database.startup_wait_secs` is up (not
/// before: the last try is made at the deadline), with an error; stopped by a signal while it
/// waits, it exits cleanly. On a database that never answers, its address answers `/health`
/// while the first try is still running.
#[cfg(unix)]
#[tokio::test]
async fn serve_waits_for_its_database_until_the_deadline_or_a_signal() {
    let app = spawn_app().await;
    let down = free_port();
    let url = format!("postgres://postgres@127.0.0.1:{down}/nothing");
    let started = std::time::Instant::now();
    let mut server = Server::start(
        &app,
        &[
            ("DATABASE_URL", &url),
            ("FLEETGATE_DATABASE__STARTUP_WAIT_SECS", "3"),
            ("FLEETGATE_LISTEN__RECONNECT_MAX_MS", "10000"),
        ],
    );
    let status = server.exit_status("serve to give up on its database").await;
    assert!(!status.success(), "{status:?}");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(3),
        "gave up after {:?}",
        started.elapsed()
    );

    let log = std::env::temp_dir().join(format!("fleetgate-startup-signal-{}.log", app.port));
    let log_path = log.to_string_lossy().into_owned();
    // Started with two minutes to wait, logging to `log`.
    let waiting = |url: &str, more: &[(&str, &str)]| {
        let mut env = vec![
            ("DATABASE_URL", url),
            ("FLEETGATE_DATABASE__STARTUP_WAIT_SECS", "120"),
            ("FLEETGATE_TEST_LOG", log_path.as_str()),
        ];
        env.extend_from_slice(more);
        Server::start(&app, &env)
    };
    let said_it_waits =
        || std::fs::read_to_string(&log).is_ok_and(|t| t.contains("waiting for it"));

    let mut server = waiting(&url, &[]);
    eventually("serve to say it waits for the database", || async {
        said_it_waits()
    })
    .await;
    let status = server.terminate("serve to stop on SIGTERM").await;
    assert!(status.success(), "{status:?}");

    // A database that takes connections and never answers (a listener nobody accepts from: the
    // kernel completes the handshakes): a try fails only at the connect timeout, 15 s. The
    // address answers before that, and a signal stops the try.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let silent_port = silent.local_addr().expect("its address").port();
    let mut server = waiting(
        &format!("postgres://postgres@127.0.0.1:{silent_port}/nothing"),
        &[],
    );
    // Asked as soon as the address is bound, the request waits in the listening socket's
    // queue until something serves it.
    eventually("serve to bind its address", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", server.port))
            .await
            .is_ok()
    })
    .await;
    let (code, body) = server.get("/health").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = server.get("/ready").await;
    assert_eq!(code, 503, "{body}");
    assert!(
        !said_it_waits(),
        "the first try was over before /health answered: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let status = server
        .terminate("serve to stop on SIGTERM during a try")
        .await;
    assert!(status.success(), "{status:?}");
    drop(silent);

    // A later try hangs the same way (the database's port refused, then takes connections and
    // says nothing): a signal during it stops serve too, rather than being lost until the wait
    // is up.
    let port = free_port();
    let mut server = waiting(
        &format!("postgres://postgres@127.0.0.1:{port}/nothing"),
        &[("FLEETGATE_LISTEN__RECONNECT_MAX_MS", "200")],
    );
    eventually("serve to say it waits for the database", || async {
        said_it_waits()
    })
    .await;
    let silent = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the port again");
    silent
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    let mut held = Vec::new();
    eventually("a try to connect to the silent database", || {
        if let Ok((stream, _)) = silent.accept() {
            held.push(stream);
        }
        let connected = !held.is_empty();
        async move { connected }
    })
    .await;
    let status = server
        .terminate("serve to stop on SIGTERM during a later try")
        .await;
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_file(&log);
}
