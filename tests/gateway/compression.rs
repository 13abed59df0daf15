//! WebSocket compression (`permessage-deflate`, RFC 7692) on the wire: what is negotiated, what
//! goes compressed, compressed client messages, and the limits on them; and the frame checks of
//! the reader that handles them. The client is the benchmark's own small client
//! (`bench/src/wsraw.rs`), since tungstenite has no compression.

use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::common::*;
use crate::wsraw::{self, Incoming, RawWs};

const RESPONSE: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

async fn connect(app: &TestApp, offer: bool) -> RawWs {
    connect_offering(app, if offer { wsraw::OFFER } else { "" }).await
}

async fn connect_offering(app: &TestApp, offer: &str) -> RawWs {
    let stream = TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    let host = format!("127.0.0.1:{}", app.port);
    RawWs::connect_offering(stream, &host, "/v2/event/subscription", offer)
        .await
        .expect("handshake")
}

/// The next text message as JSON, and whether it came compressed.
async fn recv(ws: &mut RawWs) -> (Value, bool) {
    let next = tokio::time::timeout(WAIT, ws.next(true))
        .await
        .expect("a message in time")
        .expect("a message");
    match next {
        Incoming::Text { data, compressed } => {
            let v = serde_json::from_slice(&data)
                .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&data)));
            (v, compressed)
        }
        other => panic!("expected text, got {other:?}"),
    }
}

/// Reads until the server closes: the messages before, and the close code.
async fn recv_close(ws: &mut RawWs) -> (Vec<Value>, Option<u16>) {
    let mut before = Vec::new();
    loop {
        let next = tokio::time::timeout(WAIT, ws.next(true))
            .await
            .expect("a message in time");
        match next {
            Ok(Incoming::Text { data, .. }) => {
                before.push(serde_json::from_slice(&data).unwrap_or(Value::Null))
            }
            Ok(Incoming::Close(code)) => return (before, code),
            Ok(Incoming::Binary) => {}
            Err(_) => return (before, None),
        }
    }
}

fn batch_subscribe() -> String {
    json!({"action": "subscribe", "hash": ACME, "requests": [
        {"type": "state_batch", "target": {"type": "all"}, "rate_limit": "100ms", "format": "full"}]})
    .to_string()
}

#[tokio::test]
async fn an_offer_is_accepted_and_large_frames_come_compressed() {
    // The default threshold: 1,024 bytes.
    let app = spawn_app().await;
    let mut ws = connect(&app, true).await;
    assert!(ws.deflate);
    assert_eq!(ws.extensions.as_deref(), Some(RESPONSE));

    // The subscribe itself goes compressed, as a browser sends it.
    ws.send_text(batch_subscribe().as_bytes(), true)
        .await
        .expect("send");
    let (resp, _) = recv(&mut ws).await;
    assert_eq!(resp["type"], "response", "{resp}");
    assert_eq!(
        resp["data"]["state_batch"]["value"]["101"], "normal",
        "{resp}"
    );
    let (first, compressed) = recv(&mut ws).await;
    assert_eq!(first["event"], "state_batch", "{first}");
    assert_eq!(first["data"].as_array().map(Vec::len), Some(4), "{first}");
    assert!(first.to_string().len() > 1024);
    assert!(compressed, "a batch of 4 full states is over 1,024 bytes");

    // A change comes in the next batch, compressed or not by its size, and reads the same.
    app.set_speed(&[101], 77).await;
    let (next, _) = recv(&mut ws).await;
    assert_eq!(next["event"], "state_batch", "{next}");
    assert_eq!(next["data"][0]["state"]["gps"]["speed"], 77, "{next}");

    // Small frames go as they are: a state event of a plain subscription.
    let plain =
        json!({"action": "subscribe", "hash": ACME, "events": ["state"], "trackers": [102]});
    ws.send_text(plain.to_string().as_bytes(), false)
        .await
        .expect("send");
    loop {
        let (v, compressed) = recv(&mut ws).await;
        if v["event"] == "state" {
            assert_eq!(v["tracker_id"], 102, "{v}");
            assert!(v.to_string().len() < 1024);
            assert!(!compressed, "a state event is under 1,024 bytes: {v}");
            break;
        }
    }
}

#[tokio::test]
async fn without_an_offer_or_with_compression_off_nothing_is_compressed() {
    for (offer, on) in [(false, true), (true, false)] {
        let app = spawn_app_with(|s| {
            s.websocket.compression = on;
            s.websocket.compression_min_bytes = 64;
        })
        .await;
        let mut ws = connect(&app, offer).await;
        assert!(!ws.deflate);
        assert_eq!(ws.extensions, None);
        ws.send_text(batch_subscribe().as_bytes(), false)
            .await
            .expect("send");
        let (resp, compressed) = recv(&mut ws).await;
        assert_eq!(resp["type"], "response");
        assert!(!compressed);
        let (first, compressed) = recv(&mut ws).await;
        assert_eq!(first["event"], "state_batch");
        assert!(!compressed);
    }
}

#[tokio::test]
async fn a_batch_shared_by_dashboards_reads_the_same_compressed_or_not() {
    let app = spawn_app_with(|s| s.websocket.compression_min_bytes = 64).await;
    let mut zipped = connect(&app, true).await;
    let mut plain = connect(&app, false).await;
    for ws in [&mut zipped, &mut plain] {
        ws.send_text(batch_subscribe().as_bytes(), false)
            .await
            .expect("send");
        let (resp, _) = recv(ws).await;
        assert_eq!(resp["type"], "response");
    }
    let (a, a_compressed) = recv(&mut zipped).await;
    let (b, b_compressed) = recv(&mut plain).await;
    assert!(a_compressed && !b_compressed);
    assert_eq!(a, b);
}

#[tokio::test]
async fn a_large_subscribe_response_shared_by_dashboards_reads_the_same_compressed_or_not() {
    let app = spawn_app().await;
    app.add_vans(10_000..=14_999).await;
    let mut responses = Vec::new();
    for offer in [true, true, false] {
        let mut ws = connect(&app, offer).await;
        ws.send_text(batch_subscribe().as_bytes(), false)
            .await
            .expect("send");
        let (resp, compressed) = recv(&mut ws).await;
        assert_eq!(resp["type"], "response");
        assert_eq!(compressed, offer);
        responses.push(resp);
    }
    assert!(responses.windows(2).all(|w| w[0] == w[1]));
    let statuses = responses[0]["data"]["state_batch"]["value"]
        .as_object()
        .map_or(0, |m| m.len());
    assert!(statuses > 5_000, "{statuses} statuses");
}

#[tokio::test]
async fn a_compressed_message_that_inflates_past_the_limit_gets_code_9_then_close_1009() {
    let app = spawn_app_with(|s| s.websocket.max_frame_bytes = 1024).await;
    let mut other = app.connect().await;
    other.subscribe_and_states(ACME, &[101], 1).await;

    let mut ws = connect(&app, true).await;
    // Under the limit once inflated: served.
    let ok = json!({"action": "subscribe", "hash": ACME, "events": ["state"], "trackers": [101],
                    "padding": "p".repeat(800)});
    ws.send_text(ok.to_string().as_bytes(), true)
        .await
        .expect("send");
    let (resp, _) = recv(&mut ws).await;
    assert_eq!(resp["data"]["state"], json!({"101": "normal"}), "{resp}");
    // A hundred kilobytes in a few hundred: refused before it is all inflated.
    let bomb = json!({"action": "subscribe", "hash": ACME, "events": ["state"], "trackers": [102],
                      "padding": "q".repeat(100_000)});
    let z = wsraw::deflate(bomb.to_string().as_bytes());
    assert!(z.len() < 1024, "{}", z.len());
    ws.send_frame(0xC1, &z).await.expect("send");
    let (before, code) = recv_close(&mut ws).await;
    let errors: Vec<&Value> = before.iter().filter(|v| v["type"] == "error").collect();
    assert_eq!(
        errors.len(),
        1,
        "one error frame before the close: {before:?}"
    );
    assert_eq!(errors[0]["status"]["code"], 9, "{:?}", errors[0]);
    assert_eq!(code, Some(1009));
    assert!(!app.hub.is_watched(102));

    // The other client is not disturbed.
    app.set_speed(&[101], 55).await;
    other.recv_until(|v| is_state_with_speed(v, 101, 55)).await;
}

#[tokio::test]
async fn compressed_frames_where_the_extension_does_not_allow_them_close_1002() {
    let app = spawn_app().await;
    // Not negotiated.
    let mut ws = connect(&app, false).await;
    let z = wsraw::deflate(batch_subscribe().as_bytes());
    ws.send_frame(0xC1, &z).await.expect("send");
    let (before, code) = recv_close(&mut ws).await;
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(code, Some(1002));

    // Negotiated, but on a control frame.
    let mut ws = connect(&app, true).await;
    ws.send_frame(0xC9, b"").await.expect("send");
    let (_, code) = recv_close(&mut ws).await;
    assert_eq!(code, Some(1002));

    // Negotiated, but not a deflate stream.
    let mut ws = connect(&app, true).await;
    ws.send_frame(0xC1, &[0xff; 16]).await.expect("send");
    let (_, code) = recv_close(&mut ws).await;
    assert_eq!(code, Some(1002));
}

#[tokio::test]
async fn offers_get_the_answer_their_parameters_call_for() {
    let app = spawn_app().await;
    // A window the server must keep to is accepted by naming it back (RFC 7692 §7.1.2.1).
    let ws = connect_offering(&app, "permessage-deflate; server_max_window_bits=15").await;
    assert_eq!(
        ws.extensions.as_deref(),
        Some(format!("{RESPONSE}; server_max_window_bits=15").as_str())
    );
    // A smaller one cannot be kept to: that offer is declined, the next one taken.
    let ws = connect_offering(
        &app,
        "permessage-deflate; server_max_window_bits=10, permessage-deflate; client_max_window_bits",
    )
    .await;
    assert_eq!(ws.extensions.as_deref(), Some(RESPONSE));
    let ws = connect_offering(&app, "permessage-deflate; server_max_window_bits=10").await;
    assert_eq!(ws.extensions, None);
}

#[tokio::test]
async fn compressed_messages_count_against_the_message_rate_before_they_are_inflated() {
    let app = spawn_app_with(|s| {
        s.websocket.messages_burst = 3;
        s.websocket.messages_per_second = 1;
    })
    .await;
    let mut ws = connect(&app, true).await;
    // Blank messages are free uncompressed; compressed, each one is inflated, so each counts.
    let blank = " ".repeat(100_000);
    for _ in 0..4 {
        ws.send_text(blank.as_bytes(), true).await.expect("send");
    }
    let (err, _) = recv(&mut ws).await;
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["status"]["code"], 15, "{err}");
}

#[tokio::test]
async fn a_frame_declaring_more_than_the_limit_is_refused_before_it_arrives() {
    let app = spawn_app().await;
    let mut ws = connect(&app, false).await;
    // The header of a 1 TB text frame and its mask; the payload never comes.
    let mut head = vec![0x81, 0x80 | 127];
    head.extend_from_slice(&(1u64 << 40).to_be_bytes());
    head.extend_from_slice(&[1, 2, 3, 4]);
    ws.send_raw(&head).await.expect("send");
    let (before, code) = recv_close(&mut ws).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["status"]["code"], 9, "{before:?}");
    assert_eq!(code, Some(1009));
}

#[tokio::test]
async fn a_malformed_close_frame_is_answered_with_1002() {
    let app = spawn_app().await;
    for payload in [vec![0x03], 999u16.to_be_bytes().to_vec()] {
        let mut ws = connect(&app, false).await;
        ws.send_frame(0x88, &payload).await.expect("send");
        let (_, code) = recv_close(&mut ws).await;
        assert_eq!(code, Some(1002), "{payload:?}");
    }
    let mut ws = connect(&app, false).await;
    ws.close().await.expect("send");
    let (_, code) = recv_close(&mut ws).await;
    assert_eq!(code, Some(1000));
}
