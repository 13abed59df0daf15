//! The server under a client's junk: what a client sends, however malformed (or however slowly),
//! is answered (400) and logged below `warn`, so that no client can fill the log, page an
//! operator who alerts on errors, or hold a connection by sending garbage. Checked on a
//! `fleetgate serve` process of its own.

use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// Sends `bytes` on a fresh connection and reads until the server closes it (after which it has
/// logged whatever it logs for that connection); returns what it answered.
async fn exchange(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .expect("the server closes a connection that sent junk")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A `serve` process of its own whose log (stderr) goes to a file, started with one setting
/// added; its folder is removed when dropped.
struct LoggedServer {
    server: Server,
    log: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl LoggedServer {
    async fn start(app: &TestApp, setting: (&str, &str)) -> LoggedServer {
        let dir = std::env::temp_dir().join(format!("fg_logs_{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a temporary folder");
        let log = dir.join("serve.log");
        let log_path = log.to_string_lossy().into_owned();
        let server = Server::start(app, &[setting, ("FLEETGATE_TEST_LOG", &log_path)]);
        server.wait_started().await;
        LoggedServer { server, log, dir }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for LoggedServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn junk_requests_are_answered_and_not_logged_as_errors() {
    let app = spawn_app().await;
    let logged = LoggedServer::start(&app, ("FLEETGATE_LOG__FORMAT", "json")).await;
    let server = &logged.server;
    // Only what follows the start is judged (a start-up warning, such as a low open-file
    // limit on the machine, is not the junk's).
    let started = logged.text().len();

    for bytes in [
        &b"GARBAGE\x00\x01\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /v2/event/subscription HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
          Content-Length: 3\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", // a TLS client hello
    ] {
        let answer = exchange(server.port, bytes).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
            "{bytes:?} answered {answer:?}"
        );
    }
    // A WebSocket client's garbage: errors in the protocol, then its TCP connection dropped
    // while it is subscribed.
    let mut bad = Client::connect(&server.ws_url()).await;
    for text in [
        "{",
        "[1,2]",
        r#"{"action":"subscribe","hash":"short","trackers":[1]}"#,
    ] {
        bad.send_text(text).await;
        assert_eq!(bad.recv().await["type"], "error");
    }
    bad.ws
        .send(tokio_tungstenite::tungstenite::Message::Binary(vec![
            0, 1, 2,
        ]))
        .await
        .expect("send binary");
    assert_eq!(bad.recv().await["status"]["code"], 5);
    let resp = bad.subscribe(ACME, &[101]).await;
    assert_eq!(resp["type"], "response", "{resp}");
    drop(bad);

    // The server still serves.
    let mut c = Client::connect(&server.ws_url()).await;
    let resp = c.subscribe(ACME, &[101]).await;
    assert_eq!(resp["type"], "response", "{resp}");
    // Once the dropped client's socket is gone, whatever it logged is in the log.
    let metrics = b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    eventually("the dropped client's socket to close", || async {
        exchange(server.port, metrics)
            .await
            .lines()
            .any(|l| l == "fleetgate_open_sockets 1")
    })
    .await;

    let text = logged.text();
    let loud: Vec<&str> = text
        .get(started..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\"") || l.contains("\"level\":\"WARN\""))
        .collect();
    assert!(loud.is_empty(), "junk logged at warn or above: {loud:#?}");
}

#[tokio::test]
async fn a_text_log_to_a_file_has_no_colour_codes() {
    let app = spawn_app().await;
    let logged = LoggedServer::start(&app, ("FLEETGATE_LOG__LEVEL", "info")).await;
    let text = logged.text();
    assert!(text.contains("listening"), "{text}");
    assert!(!text.contains('\u{1b}'), "escape codes in a file: {text:?}");
    // Which files the settings came from.
    assert!(
        text.contains("configuration read") && text.contains("default.toml"),
        "{text}"
    );
}

#[tokio::test]
async fn operator_calls_are_logged_with_their_key() {
    let app = spawn_app().await;
    let (id, key) = fleetgate::service::create_api_key(&app.pool, "audit")
        .await
        .expect("create key");
    let logged = LoggedServer::start(&app, ("FLEETGATE_LOG__LEVEL", "info")).await;
    let body = r#"{"tracker_id": 101}"#;
    let request = format!(
        "POST /v2/admin/tracker/block HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {key}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = exchange(logged.server.port, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let line = format!("operator_key={id}");
    eventually("the audit line", || async {
        logged
            .text()
            .lines()
            .any(|l| l.contains("operator API: tracker blocked") && l.contains(&line))
    })
    .await;
}

#[test]
fn a_rust_log_that_would_log_nothing_is_warned_about() {
    let out = fleetgate_command()
        .arg("check-config")
        .env("RUST_LOG", "inf")
        .output()
        .expect("run fleetgate check-config");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warning: RUST_LOG `inf`"), "{stderr}");
}

/// An operator command whose database refuses connections says so, not only that its pool
/// timed out.
#[test]
fn a_command_tells_why_it_could_not_connect() {
    // A port nothing listens on: bind one, note it, close it.
    let port = free_port();
    let out = fleetgate_command()
        .args(["tracker", "block", "1"])
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{port}/x"),
        )
        .env("FLEETGATE_DATABASE__ACQUIRE_TIMEOUT_SECS", "1")
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run fleetgate tracker block");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("Connection refused"), "{stderr}");
}

/// An operator's mistake is one `error:` line, also with `RUST_BACKTRACE` set (the error used
/// to come with a stack trace of sixty lines), and a database that does not exist is answered
/// with how to make it.
#[test]
fn an_operator_error_is_one_line_that_says_what_to_do() {
    let out = fleetgate_command()
        .args(["tracker", "block", "1"])
        .env(
            "DATABASE_URL",
            with_database(&server_url(), "fleetgate_no_such_database"),
        )
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run fleetgate tracker block");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains("does not exist: run `fleetgate migrate`"),
        "{stderr}"
    );
}

/// `check-config` refuses what `serve` refuses and warns where it warns.
#[test]
fn check_config_judges_the_settings_as_serve_does() {
    // check-config with one variable set: whether it succeeded, its stdout and its stderr.
    let run = |var: &str, value: &str| {
        let out = fleetgate_command()
            .arg("check-config")
            .env(var, value)
            .env("RUST_BACKTRACE", "0")
            .output()
            .expect("run fleetgate check-config");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, stderr) = run("FLEETGATE_SERVER__LISTEN", "foo");
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("server.listen `foo`"), "{stderr}");

    let (ok, _, stderr) = run("FLEETGATE_WEBSOCKET__MAX_SOCKETS", "4000000000");
    assert!(ok, "{stderr}");
    // (Where the hard open-file limit, which serve raises its soft one to, is unlimited there is
    // nothing to warn about.)
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let unlimited = limits.lines().any(|l| {
        l.strip_prefix("Max open files")
            .and_then(|rest| rest.split_whitespace().nth(1))
            == Some("unlimited")
    });
    assert!(
        unlimited || stderr.contains("warning: websocket.max_sockets = 4000000000 is above"),
        "{stderr}"
    );

    // An empty DATABASE_URL counts as unset: the file's URL stands.
    let (ok, stdout, stderr) = run("DATABASE_URL", " ");
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("url = \"postgres://postgres@127.0.0.1:5432/fleetgate\""),
        "{stdout}"
    );

    // The prefix in small letters is an error naming the variable meant.
    let (ok, _, stderr) = run("fleetgate_server__workers", "3");
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("FLEETGATE_SERVER__WORKERS"), "{stderr}");

    // More ids a request than the frame limit can hold: said, not refused.
    let (ok, _, stderr) = run("FLEETGATE_WEBSOCKET__MAX_TRACKERS_PER_REQUEST", "20000");
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("warning: websocket.max_frame_bytes = 262144 may not hold a subscribe"),
        "{stderr}"
    );
}

/// What `check-config` prints is a settings file: saved as another folder's local.toml, it
/// gives the same settings without the variables that made them.
#[test]
fn check_config_prints_a_file_that_reads_back_the_same() {
    let out = fleetgate_command()
        .arg("check-config")
        .env("FLEETGATE_WEBSOCKET__QUEUE_CAPACITY", "77")
        .env("FLEETGATE_LOG__FORMAT", "json")
        .output()
        .expect("run fleetgate check-config");
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.starts_with("[server]\n") && printed.contains("\nqueue_capacity = 77\n"),
        "{printed}"
    );
    let dir = std::env::temp_dir().join(format!("fleetgate-check-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary config folder");
    std::fs::write(dir.join("local.toml"), &printed).expect("write local.toml");
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .arg("--config-dir")
        .arg(&dir)
        .arg("check-config")
        .output()
        .expect("run fleetgate check-config on the printed file");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&again.stdout), printed);
}

#[tokio::test]
async fn a_client_subscribing_in_a_loop_does_not_grow_its_log_lines() {
    let app = spawn_app().await;
    let logged = LoggedServer::start(&app, ("FLEETGATE_LOG__LEVEL", "info")).await;
    let server = &logged.server;
    let mut c = Client::connect(&server.ws_url()).await;
    for i in 0..30 {
        let hash = if i % 2 == 0 { ACME } else { ACME2 };
        c.send(
            serde_json::json!({"action": "subscribe", "hash": hash, "events": ["state"],
                                  "trackers": [101]}),
        )
        .await;
        c.recv_until(|v| v["type"] == "response").await;
    }
    // Each "subscribed" line follows its answer (after the initial states).
    let subscribed = |text: &str| text.matches(": subscribed ").count();
    eventually("30 subscribed lines", || async {
        subscribed(&logged.text()) == 30
    })
    .await;
    let text = logged.text();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(": subscribed "))
        .collect();
    assert_eq!(lines.len(), 30, "{text}");
    let fields = lines[29].matches("session=").count();
    // The span's session and the line's own.
    assert!(fields <= 2, "{fields} session fields: {}", lines[29]);
}

/// A client retrying a refused login in a loop gets code 15 every time, and the log a line a
/// second at most, counting the refusals it stands for (it used to get a line per refusal).
#[tokio::test]
async fn a_login_retried_in_a_loop_is_logged_once_a_second() {
    let app = spawn_app().await;
    let logged = LoggedServer::start(&app, ("FLEETGATE_API__LOGIN_ATTEMPTS_PER_LOGIN", "1")).await;
    let body = r#"{"login": "acme", "password": "wrong"}"#;
    let request = format!(
        "POST /v2/user/auth HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let started = std::time::Instant::now();
    let mut refused = 0;
    for _ in 0..40 {
        let answer = exchange(logged.server.port, request.as_bytes()).await;
        if answer.starts_with("HTTP/1.1 429") {
            refused += 1;
        }
    }
    let seconds = started.elapsed().as_secs() + 1;
    assert!(refused >= 39, "{refused} of 40 refused");
    eventually("the first refusal's line", || async {
        logged.text().contains("login rate limit exceeded")
    })
    .await;
    let lines = logged
        .text()
        .lines()
        .filter(|l| l.contains("login rate limit exceeded"))
        .count() as u64;
    assert!(
        (1..=seconds).contains(&lines),
        "{lines} lines for {refused} refusals in {seconds} s"
    );
}

/// A request that declares a body and never sends it is answered (code 5) and its connection
/// closed once the body timeout has passed; it used to hold the connection for good.
#[tokio::test]
async fn a_body_that_never_comes_is_answered_and_the_connection_closed() {
    let app = spawn_app().await;
    let mut s = TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    s.write_all(
        b"POST /v2/user/auth HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 60000\r\n\r\n{\"login\"",
    )
    .await
    .expect("write");
    let mut answer = Vec::new();
    let wait = fleetgate::http::params::BODY_TIMEOUT + WAIT;
    tokio::time::timeout(wait, s.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("\"code\":5"), "{answer}");
    assert!(answer.contains("did not arrive"), "{answer}");
}

/// A request that declares a chunked body and never sends it, on a route that reads no body
/// and on one that does: answered, and the connection closed. actix-http used to drain an
/// unread chunked body, with no timer, holding the connection for good on any route.
#[tokio::test]
async fn a_chunked_body_that_never_comes_does_not_hold_the_connection() {
    let app = spawn_app().await;
    for (head, status) in [
        (
            "GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200",
        ),
        (
            "POST /nope HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 404",
        ),
        (
            "POST /v2/user/auth HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n5\r\n{\"log\r\n",
            "HTTP/1.1 400",
        ),
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", app.port))
            .await
            .expect("connect");
        s.write_all(head.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        let wait = fleetgate::http::params::BODY_TIMEOUT + WAIT;
        tokio::time::timeout(wait, s.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("still open: {head}"))
            .ok();
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with(status), "{head}: {answer}");
    }
}
