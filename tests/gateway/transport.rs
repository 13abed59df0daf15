//! The transport (PROTOCOL.md §1): Atmosphere handshake, `X` heartbeats and length prefixes;
//! plain WebSocket ping/pong; every endpoint path; the idle timeout against a peer that never
//! answers, and a peer that answers staying connected; the closing handshake; `/health` and
//! `/ready`.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

const ATMOSPHERE_QUERY: &str = "X-Atmosphere-tracking-id=0&X-Atmosphere-Framework=2.3.6-javascript\
    &X-Atmosphere-Transport=websocket&X-Atmosphere-TrackMessageSize=true\
    &Content-Type=application/json&X-atmo-protocol=true";

/// The same as atmosphere.js sends it without `trackMessageLength`.
const ATMOSPHERE_QUERY_UNTRACKED: &str =
    "X-Atmosphere-tracking-id=0&X-Atmosphere-Framework=2.3.6-javascript\
    &X-Atmosphere-Transport=websocket&Content-Type=application/json&X-atmo-protocol=true";

async fn connect_raw(url: &str) -> Ws {
    let (ws, response) = tokio_tungstenite::connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    assert_eq!(response.status().as_u16(), 101);
    ws
}

/// The next text frame, skipping pings and pongs; panics on close or after [`WAIT`].
async fn next_text(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time");
        match msg {
            Some(Ok(Message::Text(t))) => return t,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Splits `<length>|<message>` and checks the length, counted in UTF-16 code units.
#[track_caller]
fn unprefix(frame: &str) -> &str {
    let (len, rest) = frame
        .split_once('|')
        .unwrap_or_else(|| panic!("no length prefix: {frame:?}"));
    let len: usize = len
        .parse()
        .unwrap_or_else(|_| panic!("bad length prefix: {frame:?}"));
    assert_eq!(
        len,
        rest.encode_utf16().count(),
        "length prefix of {frame:?}"
    );
    rest
}

/// Checks a handshake body `<uuid>|<heartbeat-ms>|X|`.
#[track_caller]
fn assert_handshake(body: &str, heartbeat_ms: u64) {
    let parts: Vec<&str> = body.split('|').collect();
    assert_eq!(parts.len(), 4, "{body:?}");
    let uuid = uuid::Uuid::parse_str(parts[0]).unwrap_or_else(|e| panic!("{body:?}: {e}"));
    assert_eq!(uuid.hyphenated().to_string(), parts[0], "a hyphenated uuid");
    assert_ne!(uuid, uuid::Uuid::nil());
    assert_eq!(parts[1], heartbeat_ms.to_string());
    assert_eq!(parts[2], "X");
    assert_eq!(parts[3], "");
}

/// Reads text frames until one is not a heartbeat (`skip`), returning it.
async fn next_non_heartbeat(ws: &mut Ws, heartbeat: &str) -> String {
    loop {
        let t = next_text(ws).await;
        if t != heartbeat {
            return t;
        }
    }
}

fn subscribe_101() -> String {
    json!({"action": "subscribe", "hash": ACME, "events": ["state"], "trackers": [101]}).to_string()
}

#[tokio::test]
async fn atmosphere_with_track_message_size_prefixes_every_frame() {
    let app = spawn_app_with(|s| s.websocket.heartbeat_ms = 200).await;
    // A network name outside ASCII and the BMP, so that UTF-16 units, chars and bytes all differ.
    app.exec("UPDATE tracker_states SET gsm_network_name = 'Télé😀Net' WHERE tracker_id = 101")
        .await;
    let url = format!("{}?{ATMOSPHERE_QUERY}", app.ws_url());
    let mut ws = connect_raw(&url).await;

    // The very first frame is the prefixed handshake.
    let first = next_text(&mut ws).await;
    assert_handshake(unprefix(&first), 200);

    ws.send(Message::Text(subscribe_101())).await.unwrap();
    let frame = next_non_heartbeat(&mut ws, "1|X").await;
    let resp: Value = serde_json::from_str(unprefix(&frame)).unwrap();
    assert_eq!(
        resp,
        json!({"type": "response", "action": "subscription/subscribe", "events": ["state"],
               "data": {"state": {"101": "normal"}}})
    );
    let frame = next_non_heartbeat(&mut ws, "1|X").await;
    let body = unprefix(&frame);
    // 'é' twice (1 unit, 2 bytes each) and '😀' (2 units, 4 bytes): units ≠ bytes ≠ chars.
    assert_ne!(body.encode_utf16().count(), body.len());
    assert_ne!(body.encode_utf16().count(), body.chars().count());
    let state: Value = serde_json::from_str(body).unwrap();
    assert!(is_state_of(&state, 101), "{state}");
    assert_eq!(state["data"]["gsm"]["network_name"], "Télé😀Net");

    // A heartbeat arrives, prefixed too.
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no heartbeat within {WAIT:?}");
        if next_text(&mut ws).await == "1|X" {
            break;
        }
    }

    // The client's own `X` heartbeats are never answered: the next non-heartbeat frame is the
    // response to the subscribe sent after them.
    ws.send(Message::Text("X".into())).await.unwrap();
    ws.send(Message::Text("X".into())).await.unwrap();
    ws.send(Message::Text(
        json!({"action": "unsubscribe", "hash": ACME, "events": ["state"], "trackers": [101]})
            .to_string(),
    ))
    .await
    .unwrap();
    let frame = next_non_heartbeat(&mut ws, "1|X").await;
    let resp: Value = serde_json::from_str(unprefix(&frame)).unwrap();
    assert_eq!(
        resp,
        json!({"type": "response", "action": "subscription/unsubscribe", "events": ["state"],
               "data": [101]})
    );

    // Error frames are framed as well.
    ws.send(Message::Text("{oops".into())).await.unwrap();
    let frame = next_non_heartbeat(&mut ws, "1|X").await;
    let err: Value = serde_json::from_str(unprefix(&frame)).unwrap();
    assert_eq!(err["type"], "error");
    assert_eq!(err["status"]["code"], 5);
}

#[tokio::test]
async fn the_atmosphere_handshake_is_counted_as_a_frame_sent() {
    use fleetgate::metrics::FrameKind;
    let app = spawn_app().await;
    let url = format!("{}?{ATMOSPHERE_QUERY_UNTRACKED}", app.ws_url());
    let mut ws = connect_raw(&url).await;
    assert_handshake(&next_text(&mut ws).await, 30_000);
    ws.send(Message::Text(subscribe_101())).await.unwrap();
    next_non_heartbeat(&mut ws, "X").await;
    // The response and the state, and before them the handshake (no heartbeat is due yet).
    app.until("the handshake counted", || {
        app.hub.metrics.frames_sent(FrameKind::Other) == 1
            && app.hub.metrics.frames_sent(FrameKind::Response) == 1
    })
    .await;
}

#[tokio::test]
async fn atmosphere_without_track_message_size_sends_bare_frames() {
    let app = spawn_app_with(|s| s.websocket.heartbeat_ms = 200).await;
    let url = format!("{}?{ATMOSPHERE_QUERY_UNTRACKED}", app.ws_url());
    let mut ws = connect_raw(&url).await;

    let first = next_text(&mut ws).await;
    assert_handshake(&first, 200);

    ws.send(Message::Text(subscribe_101())).await.unwrap();
    let resp: Value = serde_json::from_str(&next_non_heartbeat(&mut ws, "X").await).unwrap();
    assert_eq!(resp["type"], "response");
    assert_eq!(resp["data"]["state"], json!({"101": "normal"}));
    let state: Value = serde_json::from_str(&next_non_heartbeat(&mut ws, "X").await).unwrap();
    assert!(is_state_of(&state, 101), "{state}");

    // Bare `X` heartbeats, at least two of them.
    let mut beats = 0;
    while beats < 2 {
        let t = next_text(&mut ws).await;
        assert_eq!(t, "X", "only heartbeats are expected now");
        beats += 1;
    }
    ws.send(Message::Text("X".into())).await.unwrap();
    app.set_speed(&[101], 7).await;
    let t = next_non_heartbeat(&mut ws, "X").await;
    let state: Value = serde_json::from_str(&t).unwrap();
    assert!(is_state_with_speed(&state, 101, 7), "{state}");
}

#[tokio::test]
async fn a_plain_connection_gets_pings_and_no_x_frames() {
    let app = spawn_app_with(|s| s.websocket.heartbeat_ms = 200).await;
    let mut ws = connect_raw(&app.ws_url()).await;

    // Nothing but pings arrives on an idle plain connection: no handshake, no `X`.
    let mut pings = 0;
    while pings < 2 {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a ping within the timeout");
        match msg {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected only pings, got {other:?}"),
        }
    }

    ws.send(Message::Text(subscribe_101())).await.unwrap();
    let resp: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(resp["data"]["state"], json!({"101": "normal"}));
    let state: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert!(is_state_of(&state, 101), "{state}");
    // And another ping after that, still no text frame.
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a ping within the timeout");
        match msg {
            Some(Ok(Message::Ping(_))) => break,
            Some(Ok(Message::Pong(_))) => continue,
            other => panic!("expected a ping, got {other:?}"),
        }
    }
    // The client may ping too: the server answers with a pong carrying the same payload.
    ws.send(Message::Ping(b"hello".to_vec())).await.unwrap();
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a pong within the timeout");
        match msg {
            Some(Ok(Message::Pong(p))) => {
                assert_eq!(p, b"hello");
                break;
            }
            Some(Ok(Message::Ping(_))) => continue,
            other => panic!("expected a pong, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn every_endpoint_path_serves_the_protocol() {
    let app = spawn_app().await;
    for path in [
        "/event/subscription",
        "/event/subscription/",
        "/v2/event/subscription",
        "/v2/event/subscription/",
    ] {
        let url = format!("ws://127.0.0.1:{}{path}", app.port);
        let mut c = Client::connect(&url).await;
        let (resp, states) = c.subscribe_and_states(ACME, &[101], 1).await;
        assert_eq!(resp["data"]["state"], json!({"101": "normal"}), "{path}");
        assert_eq!(states[0]["data"]["source_id"], 10101, "{path}");
    }
    // Atmosphere on the unversioned path with a trailing slash.
    let url = format!(
        "ws://127.0.0.1:{}/event/subscription/?{ATMOSPHERE_QUERY}",
        app.port
    );
    let mut ws = connect_raw(&url).await;
    assert_handshake(unprefix(&next_text(&mut ws).await), 30_000);

    // Anything else is not a WebSocket endpoint.
    let url = format!("ws://127.0.0.1:{}/v3/event/subscription", app.port);
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 404)
        }
        Err(e) => panic!("expected an HTTP 404, got {e}"),
        Ok(_) => panic!("/v3/event/subscription must not upgrade"),
    }
}

/// A server frame read from a raw socket: (opcode, payload). `None` at EOF.
async fn read_frame(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 2];
    if s.read_exact(&mut head).await.is_err() {
        return None;
    }
    assert_eq!(head[1] & 0x80, 0, "server frames are never masked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.ok()?;
            u64::from(u16::from_be_bytes(b))
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.ok()?;
            u64::from_be_bytes(b)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; usize::try_from(len).expect("frame length")];
    s.read_exact(&mut payload).await.ok()?;
    Some((head[0] & 0x0f, payload))
}

/// A gateway that pings every 100 ms and closes a peer idle for 400 ms.
async fn quick_idle_app() -> TestApp {
    spawn_app_with(|s| {
        s.websocket.heartbeat_ms = 100;
        s.websocket.idle_timeout_ms = 400;
    })
    .await
}

/// A WebSocket upgrade over a bare TCP stream (the 101 response head read byte by byte, so
/// no frame byte is consumed with it): the stream and that head.
async fn raw_upgrade(app: &TestApp) -> (TcpStream, String) {
    let mut s = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    let request = format!(
        "GET /v2/event/subscription HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        app.port
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await;
    (s, head)
}

/// An HTTP response head, read byte by byte so that nothing after it is consumed.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    tokio::time::timeout(WAIT, async {
        while !head.ends_with(b"\r\n\r\n") {
            head.push(s.read_u8().await.expect("a response head"));
        }
    })
    .await
    .expect("a response head in time");
    String::from_utf8(head).expect("an ASCII response head")
}

/// A masked client frame (mask key 0, so the payload goes as it is).
fn client_frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126, "short frames only");
    let mut f = vec![
        if fin { 0x80 } else { 0 } | opcode,
        0x80 | payload.len() as u8,
    ];
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn a_peer_sending_a_message_slowly_is_not_idle() {
    let app = quick_idle_app().await;
    let (mut s, _) = raw_upgrade(&app).await;
    // A subscribe in 8 fragments, one every 150 ms (1.2 s in all), and no pong: the peer is
    // sending all along, so it must not be closed as idle mid-message.
    let msg = json!({"action": "subscribe", "hash": ACME, "events": ["state"], "trackers": [101]})
        .to_string();
    let parts: Vec<&[u8]> = msg.as_bytes().chunks(msg.len().div_ceil(8)).collect();
    let mut pace = tokio::time::interval(Duration::from_millis(150));
    for (n, part) in parts.iter().enumerate() {
        pace.tick().await;
        let opcode = if n == 0 { 0x1 } else { 0x0 };
        s.write_all(&client_frame(opcode, n + 1 == parts.len(), part))
            .await
            .expect("the server still reads");
    }
    let response = tokio::time::timeout(WAIT, async {
        loop {
            match read_frame(&mut s).await {
                Some((0x1, payload)) => return serde_json::from_slice::<Value>(&payload).unwrap(),
                Some((0x9, _)) => continue,
                other => panic!("closed before the response: {other:?}"),
            }
        }
    })
    .await
    .expect("the response in time");
    assert_eq!(
        response["data"]["state"],
        json!({"101": "normal"}),
        "{response}"
    );
}

#[tokio::test]
async fn a_peer_that_never_answers_is_closed_after_the_idle_timeout() {
    let app = quick_idle_app().await;
    let (mut s, head) = raw_upgrade(&app).await;
    let upgraded = Instant::now();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );

    // Never send anything (not even a pong): the server must give up on us.
    let (frames, eof) = tokio::time::timeout(Duration::from_secs(10), async {
        let mut frames = Vec::new();
        loop {
            match read_frame(&mut s).await {
                None => return (frames, true),
                Some((op, payload)) => {
                    let close = op == 0x8;
                    frames.push((op, payload));
                    if close {
                        return (frames, false);
                    }
                }
            }
        }
    })
    .await
    .expect("the server must close an idle peer within 10 s");
    let elapsed = upgraded.elapsed();
    let pings = frames.iter().filter(|(op, _)| *op == 0x9).count();
    assert!(pings >= 1, "pings were sent before giving up: {frames:?}");
    assert!(
        frames.iter().all(|(op, _)| *op == 0x9 || *op == 0x8),
        "only pings and a close: {frames:?}"
    );
    if !eof {
        let (_, payload) = frames.last().unwrap();
        assert!(payload.len() >= 2, "the close frame carries a code");
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        assert_eq!(code, 1001, "closed as going away");
        assert_eq!(&payload[2..], b"idle timeout");
    }
    // Not before the idle timeout (less a margin for when our clock started).
    assert!(
        elapsed >= Duration::from_millis(300),
        "closed after only {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "closed only after {elapsed:?}"
    );
}

/// Frames up to the close frame (not counting pings): the close frame's payload, and the text
/// frames before it.
async fn read_until_close(s: &mut TcpStream) -> (Vec<u8>, Vec<String>) {
    let mut texts = Vec::new();
    let close = tokio::time::timeout(WAIT, async {
        loop {
            match read_frame(s).await {
                Some((0x8, payload)) => return payload,
                Some((0x1, payload)) => texts.push(String::from_utf8(payload).unwrap()),
                Some((0x9, _)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame in time");
    (close, texts)
}

/// Whether the server closes the connection (EOF, or a reset) within `limit`.
async fn hung_up_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    let hang_up = async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::time::timeout(limit, hang_up).await.is_ok()
}

/// A raw socket subscribed to tracker 101 with `hash` (its response read).
async fn raw_subscribed(app: &TestApp, hash: &str) -> TcpStream {
    let (mut s, head) = raw_upgrade(app).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let subscribe =
        json!({"action": "subscribe", "hash": hash, "events": ["state"], "trackers": [101]});
    s.write_all(&client_frame(0x1, true, subscribe.to_string().as_bytes()))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            match read_frame(&mut s).await {
                Some((0x1, payload)) => {
                    let v: Value = serde_json::from_slice(&payload).unwrap();
                    if v["type"] == "response" {
                        break;
                    }
                }
                Some(_) => continue,
                None => panic!("closed before the subscribe response"),
            }
        }
    })
    .await
    .expect("the subscribe response in time");
    s
}

/// RFC 6455 §7.1.1: once the closing handshake is done the server closes the TCP connection,
/// and clients wait for it (browsers, Python's `websockets`). actix instead waited for the
/// client to hang up first, up to its disconnect timeout of 1 s: every clean close took a
/// second on the client's side, and every shutdown with a socket open. (The bound below is
/// under that second, with room for a busy machine; the server hangs up at once.)
#[tokio::test]
async fn the_server_hangs_up_once_the_closing_handshake_is_done() {
    const AT_ONCE: Duration = Duration::from_millis(800);
    let app = spawn_app().await;

    // The client closes; the server answers and hangs up.
    let mut s = raw_subscribed(&app, ACME).await;
    s.write_all(&client_frame(0x8, true, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    let (close, _) = read_until_close(&mut s).await;
    assert_eq!(close[..2], 1000u16.to_be_bytes(), "{close:?}");
    assert!(
        hung_up_within(&mut s, AT_ONCE).await,
        "hung up after answering"
    );

    // The server closes (the session ended), the client answers, and the server hangs up.
    let mut answering = raw_subscribed(&app, ACME).await;
    let mut silent = raw_subscribed(&app, ACME).await;
    app.exec(&format!(
        "UPDATE sessions SET revoked_at = now() WHERE hash = '{ACME}'"
    ))
    .await;
    let (close, texts) = read_until_close(&mut answering).await;
    assert_eq!(close, b"\x03\xe8session closed", "{close:?}");
    assert!(
        texts.last().is_some_and(|t| t.contains("logout")),
        "{texts:?}"
    );
    answering
        .write_all(&client_frame(0x8, true, &1000u16.to_be_bytes()))
        .await
        .unwrap();
    assert!(
        hung_up_within(&mut answering, AT_ONCE).await,
        "hung up once the close was answered"
    );

    // A client that never answers is hung up on all the same, after a moment.
    let (close, _) = read_until_close(&mut silent).await;
    assert_eq!(close, b"\x03\xe8session closed", "{close:?}");
    assert!(
        hung_up_within(&mut silent, WAIT).await,
        "hung up without an answer"
    );
}

/// SIGTERM: sockets get close 1001 ("going away"), and the process exits as soon as its
/// connections have closed, within `server.shutdown_timeout_secs`; with 0 it waits for none.
/// (actix looked at its connections once a second, so any stop with one open took a second
/// whatever the setting.)
#[cfg(unix)]
#[tokio::test]
async fn a_shutdown_waits_for_the_connections_until_its_timeout() {
    let app = spawn_app().await;
    for timeout in ["5", "0"] {
        let log =
            std::env::temp_dir().join(format!("fleetgate-shutdown-{}-{timeout}.log", app.port));
        let log_path = log.to_string_lossy().into_owned();
        let mut server = Server::start(
            &app,
            &[
                ("FLEETGATE_SERVER__SHUTDOWN_TIMEOUT_SECS", timeout),
                ("FLEETGATE_LOG__LEVEL", "info"),
                ("FLEETGATE_TEST_LOG", &log_path),
            ],
        );
        server.wait_started().await;
        let mut c = Client::connect(&server.ws_url()).await;
        c.subscribe_and_states(ACME, &[101], 1).await;
        // With no timeout, an idle keep-alive HTTP connection is not waited for either.
        let mut idle = None;
        if timeout == "0" {
            let mut s = TcpStream::connect(("127.0.0.1", server.port))
                .await
                .unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                .await
                .unwrap();
            let head = read_head(&mut s).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            idle = Some(s);
        }
        let closed = tokio::spawn(async move { c.recv_close().await });
        let status = server.terminate("serve to stop on SIGTERM").await;
        assert!(status.success(), "{status:?}");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let _ = std::fs::remove_file(&log);
        if timeout == "0" {
            assert!(
                text.contains("shutdown timeout: dropping the connections still open"),
                "{text}"
            );
            drop(idle);
        } else {
            let (code, _) = closed.await.expect("the client's task");
            assert_eq!(code, Some(CloseCode::Away), "{text}");
            assert!(text.contains("connections closed"), "{text}");
            assert!(!text.contains("dropping the connections"), "{text}");
        }
    }
}

#[tokio::test]
async fn a_peer_that_answers_pings_stays_connected_past_the_idle_timeout() {
    let app = quick_idle_app().await;
    let mut c = app.connect().await;
    let (resp, _) = c.subscribe_and_states(ACME, &[101], 1).await;
    assert_eq!(resp["data"]["state"], json!({"101": "normal"}));

    // Read continuously for more than three idle periods; tungstenite answers each ping.
    let until = Instant::now() + Duration::from_millis(1500);
    let mut pings = 0;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, c.ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(other) => panic!("only pings are expected while idle, got {other:?}"),
        }
    }
    assert!(pings >= 5, "heartbeats every 100 ms, got {pings} in 1.5 s");

    app.set_speed(&[101], 42).await;
    let (state, skipped) = c.recv_until(|v| is_state_with_speed(v, 101, 42)).await;
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(state["data"]["source_id"], 10101);
    assert!(app.hub.has_session(ACME));
}

#[tokio::test]
async fn health_and_ready() {
    let app = spawn_app().await;
    let (code, body) = app.get("/health").await;
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
    assert_eq!(v["status"], "ok");

    let (code, body) = app.get("/ready").await;
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{body}: {e}"));
    assert_eq!(v["ready"], true, "{v}");
    assert_eq!(v["database"], true, "{v}");
    assert_eq!(v["listen_stream"], true, "{v}");
    assert_eq!(v["watched_trackers"], 0, "{v}");

    // A subscription shows in the counters.
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;
    let (code, body) = app.get("/ready").await;
    assert_eq!(code, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["watched_trackers"], 2, "{v}");
    assert_eq!(v["sockets_sessions"], 1, "{v}");
}

/// An upgrade request, with `X-Forwarded-For` when given.
fn upgrade_request(
    url: &str,
    forwarded_for: Option<&str>,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().expect("a request");
    if let Some(address) = forwarded_for {
        request
            .headers_mut()
            .insert("x-forwarded-for", address.parse().expect("a header value"));
    }
    request
}

/// The upgrade's refusal: HTTP status, `Retry-After` and the error code of its JSON body.
async fn refused_upgrade(url: &str, forwarded_for: Option<&str>) -> (u16, Option<String>, Value) {
    use tokio_tungstenite::tungstenite::Error;
    match tokio_tungstenite::connect_async(upgrade_request(url, forwarded_for)).await {
        Err(Error::Http(response)) => {
            let retry = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = response.body().clone().unwrap_or_default();
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            (response.status().as_u16(), retry, body)
        }
        Ok(_) => panic!("the upgrade was accepted"),
        Err(e) => panic!("the upgrade failed otherwise: {e}"),
    }
}

async fn forwarded_client(url: &str, address: &str) -> Client {
    let (ws, _) = tokio_tungstenite::connect_async(upgrade_request(url, Some(address)))
        .await
        .expect("WebSocket connect");
    Client { ws }
}

/// Past `websocket.max_sockets` an upgrade is refused (HTTP 503, code 15) while the sockets
/// held keep working and the HTTP API still answers: a process out of file descriptors
/// answered nothing at all, not even `/health`.
#[tokio::test]
async fn past_the_socket_limit_upgrades_are_refused_and_the_rest_keeps_working() {
    let app = spawn_app_with(|s| s.websocket.max_sockets = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = app.connect().await;
        c.subscribe_and_states(ACME, &[101], 1).await;
        held.push(c);
    }
    let (status, retry, body) = refused_upgrade(&app.ws_url(), None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry.as_deref(), Some("5"));
    assert_eq!(body["success"], false);
    assert_eq!(body["status"]["code"], 15, "{body}");
    assert_eq!(app.get("/health").await.0, 200);
    // The sockets held still get their events.
    app.set_speed(&[101], 77).await;
    for c in &mut held {
        c.recv_until(|v| is_state_with_speed(v, 101, 77)).await;
    }
    let (_, metrics) = app.get("/metrics").await;
    assert!(
        metrics.contains(r#"fleetgate_sockets_refused_total{limit="process"} 1"#),
        "{metrics}"
    );
    // A socket that leaves frees its slot.
    drop(held.pop());
    eventually("a slot to be free", || async {
        tokio_tungstenite::connect_async(app.ws_url()).await.is_ok()
    })
    .await;
}

/// `websocket.max_sockets_per_address` counts each client address (here the one a trusted
/// proxy forwards) on its own: one address at its limit leaves the others unaffected.
#[tokio::test]
async fn one_address_at_its_limit_does_not_stop_another() {
    let app = spawn_app_with(|s| {
        s.websocket.max_sockets_per_address = 2;
        s.api.trust_forwarded_for = true;
    })
    .await;
    let url = app.ws_url();
    let mut first = forwarded_client(&url, "203.0.113.7").await;
    let _second = forwarded_client(&url, "203.0.113.7").await;
    let (status, retry, body) = refused_upgrade(&url, Some("203.0.113.7")).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(retry.as_deref(), Some("5"));
    assert_eq!(body["status"]["code"], 15, "{body}");
    let mut other = forwarded_client(&url, "198.51.100.1").await;
    other.subscribe_and_states(ACME, &[102], 1).await;
    // Closing one of the address's sockets lets it open another.
    first.ws.close(None).await.expect("close");
    eventually("the address to have a slot again", || async {
        let request = upgrade_request(&url, Some("203.0.113.7"));
        tokio_tungstenite::connect_async(request).await.is_ok()
    })
    .await;
}
