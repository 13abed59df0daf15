//! Shared test harness: start the real server on a free port against a fresh database loaded
//! with `tests/fixtures/fleet.sql`, and drive it with a real WebSocket client. Every wait is for
//! a condition under a timeout; nothing sleeps to synchronise.

#![allow(dead_code)]

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use fleetgate::config::Settings;
use fleetgate::hub::Hub;
use fleetgate::startup::Application;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const ACME: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
pub const ACME2: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
pub const SUB: &str = "55555555555555555555555555555555";
pub const RIVAL: &str = "rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr";
pub const EXPIRED: &str = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";
pub const REVOKED: &str = "vvvvvvvvvvvvvvvvvvvvvvvvvvvvvvvv";

/// How long any expected message may take.
pub const WAIT: Duration = Duration::from_secs(10);

pub const FLEET_SQL: &str = include_str!("../fixtures/fleet.sql");

pub struct TestApp {
    pub port: u16,
    pub pool: PgPool,
    pub db_url: String,
    pub db_name: String,
    pub hub: Arc<Hub>,
    shutdown: watch::Sender<bool>,
}

pub fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The `fleetgate` binary, reading this repository's `config/` (for the operator commands).
pub fn fleetgate_command() -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fleetgate"));
    command
        .arg("--config-dir")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config"));
    command
}

/// The server URL with another database name.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let slash = base.rfind('/').filter(|i| *i > "postgres://".len());
    let root = match slash {
        Some(i) => &base[..i],
        None => base,
    };
    format!("{root}/{name}{query}")
}

/// Settings for tests: short heartbeats and backoffs, everything else default.
pub fn test_settings() -> Settings {
    let mut s = Settings::default();
    s.server.workers = 2;
    s.server.shutdown_timeout_secs = 1;
    s.database.max_connections = 4;
    s.listen.reconnect_min_ms = 50;
    s.listen.reconnect_max_ms = 500;
    s.sessions.expiry_check_ms = 100;
    s.websocket.messages_per_second = 1000;
    s.websocket.messages_burst = 1000;
    s
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(configure: impl FnOnce(&mut Settings)) -> TestApp {
    let db_name = format!("fg_test_{}", uuid::Uuid::new_v4().simple());
    let db_url = with_database(&server_url(), &db_name);
    let mut settings = test_settings();
    settings.database.url = db_url.clone();
    configure(&mut settings);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let app = Application::build(settings, listener)
        .await
        .expect("build the application");
    sqlx::raw_sql(FLEET_SQL)
        .execute(&app.state.pool)
        .await
        .expect("load the fleet fixture");
    let test = TestApp {
        port: app.port(),
        pool: app.state.pool.clone(),
        db_url,
        db_name,
        hub: app.state.hub.clone(),
        shutdown: app.shutdown_handle(),
    };
    tokio::spawn(app.run_until_stopped());
    test.wait_ready().await;
    test
}

/// Polls `check` until it holds; panics after [`WAIT`], naming `what` was awaited.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, not a sync
    }
}

/// Waits until some query of the test database waits for a lock.
pub async fn until_a_query_waits_for_a_lock(pool: &PgPool) {
    eventually("a query to wait for the lock", || async {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
              WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .expect("pg_stat_activity");
        waiting > 0
    })
    .await;
}

impl TestApp {
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v2/event/subscription", self.port)
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn connect(&self) -> Client {
        Client::connect(&self.ws_url()).await
    }

    /// Plain HTTP GET, returning the status code and body (no HTTP client crate needed).
    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path).await
    }

    pub async fn wait_ready(&self) {
        eventually("the server to become ready", || async {
            self.get("/ready").await.0 == 200
        })
        .await;
    }

    /// Asks the gateway to stop, as SIGTERM would.
    pub fn stop(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Runs SQL on the test database, as any writer would.
    pub async fn exec(&self, sql: &str) {
        sqlx::raw_sql(sql)
            .execute(&self.pool)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// Adds trackers `ids` (each with a state) to ACME's account: a few thousand make a
    /// subscribe response of `all` large enough to be shared between a group's members.
    pub async fn add_vans(&self, ids: std::ops::RangeInclusive<i64>) {
        self.exec(&format!(
            "INSERT INTO trackers (id, account_id, source_id, label) \
               SELECT i, 1, 100000 + i, 'Van ' || i FROM generate_series({lo}, {hi}) i; \
             INSERT INTO tracker_states (tracker_id, speed) \
               SELECT i, 10 FROM generate_series({lo}, {hi}) i;",
            lo = ids.start(),
            hi = ids.end()
        ))
        .await;
    }

    /// Writes a new speed for trackers through the ingest contract (one statement).
    pub async fn set_speed(&self, ids: &[i64], speed: i32) {
        sqlx::query(
            "UPDATE tracker_states SET speed = $2, last_update = now() WHERE tracker_id = ANY($1)",
        )
        .bind(ids)
        .bind(speed)
        .execute(&self.pool)
        .await
        .expect("update state");
    }

    /// Waits until `f` holds, polling; panics after the timeout.
    pub async fn until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !f() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        exec_on_server_from_drop(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.db_name
        ));
    }
}

/// Runs `sql` on the server's own database, from a thread of its own (`Drop` cannot await),
/// ignoring errors: the clean-up of what a test created on the server.
pub fn exec_on_server_from_drop(sql: String) {
    let admin = server_url();
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async move {
            if let Ok(pool) = PgPool::connect(&admin).await {
                let _ = sqlx::query(&sql).execute(&pool).await;
            }
        });
    })
    .join();
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A WebSocket client that reads JSON messages.
pub struct Client {
    pub ws: Ws,
}

#[derive(Debug)]
pub enum Received {
    Text(String),
    Closed(Option<(CloseCode, String)>),
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket connect");
        Client { ws }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_string()))
            .await
            .expect("send");
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    /// The next text frame or the close, skipping pings/pongs.
    pub async fn next(&mut self) -> Received {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("a message in time");
            match msg {
                Some(Ok(Message::Text(t))) => return Received::Text(t),
                Some(Ok(Message::Close(frame))) => {
                    return Received::Closed(frame.map(|f| (f.code, f.reason.to_string())))
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Received::Closed(None),
            }
        }
    }

    pub async fn recv(&mut self) -> Value {
        match self.next().await {
            Received::Text(t) => serde_json::from_str(&t).unwrap_or_else(|e| panic!("{t}: {e}")),
            Received::Closed(c) => panic!("connection closed: {c:?}"),
        }
    }

    /// Reads until a message matches; returns it and everything skipped before it.
    pub async fn recv_until(&mut self, pred: impl Fn(&Value) -> bool) -> (Value, Vec<Value>) {
        let mut skipped = Vec::new();
        loop {
            let v = self.recv().await;
            if pred(&v) {
                return (v, skipped);
            }
            skipped.push(v);
        }
    }

    /// Reads until the server closes; returns the close code and the messages before it.
    pub async fn recv_close(&mut self) -> (Option<CloseCode>, Vec<Value>) {
        let mut before = Vec::new();
        loop {
            match self.next().await {
                Received::Text(t) => before.push(serde_json::from_str(&t).unwrap_or(Value::Null)),
                Received::Closed(c) => return (c.map(|c| c.0), before),
            }
        }
    }

    pub async fn subscribe(&mut self, hash: &str, trackers: &[i64]) -> Value {
        self.send(
            json!({"action": "subscribe", "hash": hash, "events": ["state"], "trackers": trackers}),
        )
        .await;
        self.recv().await
    }

    /// Subscribes (legacy form) and collects the response plus the initial states that follow.
    pub async fn subscribe_and_states(
        &mut self,
        hash: &str,
        trackers: &[i64],
        expect_states: usize,
    ) -> (Value, Vec<Value>) {
        let response = self.subscribe(hash, trackers).await;
        let mut states = Vec::new();
        while states.len() < expect_states {
            let v = self.recv().await;
            assert_eq!(v["event"], "state", "expected an initial state, got {v}");
            states.push(v);
        }
        (response, states)
    }
}

pub fn is_state_of(v: &Value, tracker: i64) -> bool {
    v["event"] == "state" && v["tracker_id"] == tracker
}

pub fn is_state_with_speed(v: &Value, tracker: i64, speed: i64) -> bool {
    is_state_of(v, tracker) && v["data"]["gps"]["speed"] == speed
}

/// A gateway process of its own (`fleetgate serve`, the binary cargo built for these tests)
/// against `app`'s database, for what only a process shows (its memory, its log); killed when
/// dropped, however the test ends. `FLEETGATE_TEST_GATEWAY` runs another build instead (to
/// check that a test fails without a change).
pub struct Server {
    child: std::process::Child,
    pub port: u16,
}

impl Server {
    /// Starts it with `env` added (log level `warn` unless `env` says otherwise; its log, on
    /// stderr, is discarded unless `env` names a file as `FLEETGATE_TEST_LOG`); see
    /// [`Server::wait_started`].
    pub fn start(app: &TestApp, env: &[(&str, &str)]) -> Server {
        use std::process::{Command, Stdio};
        let port = free_port();
        let bin = std::env::var("FLEETGATE_TEST_GATEWAY")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_fleetgate").to_string());
        let mut cmd = Command::new(bin);
        cmd.arg("--config-dir")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("DATABASE_URL", &app.db_url)
            .env("FLEETGATE_LOG__LEVEL", "warn")
            .env("FLEETGATE_DATABASE__MIGRATE_ON_START", "false")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            if *k == "FLEETGATE_TEST_LOG" {
                let file = std::fs::File::create(v).expect("create the log file");
                cmd.stderr(file);
            } else {
                cmd.env(k, v);
            }
        }
        let child = cmd.spawn().expect("start fleetgate serve");
        Server { child, port }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path).await
    }

    /// Waits for it to exit (`what` names the wait), and returns its exit status.
    pub async fn exit_status(&mut self, what: &str) -> std::process::ExitStatus {
        let mut status = None;
        eventually(what, || {
            status = status.or_else(|| self.child.try_wait().ok().flatten());
            let done = status.is_some();
            async move { done }
        })
        .await;
        status.expect("it exited")
    }

    /// Sends it SIGTERM and returns its exit status (`what` names the wait).
    #[cfg(unix)]
    pub async fn terminate(&mut self, what: &str) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) };
        self.exit_status(what).await
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/v2/event/subscription", self.port)
    }

    /// Waits until it accepts WebSocket connections.
    pub async fn wait_started(&self) {
        let url = self.ws_url();
        eventually("the gateway to start", || async {
            tokio_tungstenite::connect_async(&url).await.is_ok()
        })
        .await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on now (bound, noted, closed).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Plain HTTP GET to the gateway on `port`, returning the status code and body.
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    let (code, _, body) = http_request(port, "GET", path, None).await;
    (code, body)
}

/// A plain HTTP/1.1 request to the gateway on `port` (a JSON body when given, with its length;
/// no HTTP client crate needed): the status code, the head (lower-cased) and the body.
pub async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let req = match body {
        Some(body) => format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
        None => format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    };
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(2 * WAIT, s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (code, head.to_ascii_lowercase(), body.to_string())
}
