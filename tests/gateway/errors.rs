//! Every error path of PROTOCOL.md §6 over a real socket: the full error frame (type, action,
//! code, description, data echo), and after every error that does not close the connection, proof
//! that the socket still serves a valid subscribe.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

/// A 32-character hash that is in no table.
const UNKNOWN: &str = "0123456789abcdef0123456789abcdef";

/// Asserts `v` is an error frame with this code and action, a non-empty description and exactly
/// this `data` (`None`: no `data` key at all).
#[track_caller]
fn assert_error(v: &Value, code: u64, action: Option<&str>, data: Option<Value>) {
    assert_eq!(v["type"], "error", "{v}");
    match action {
        Some(a) => assert_eq!(v["action"], a, "{v}"),
        None => {
            let obj = v.as_object().expect("an object");
            assert_eq!(
                obj.get("action"),
                Some(&Value::Null),
                "action must be null: {v}"
            );
        }
    }
    assert_eq!(v["status"]["code"], code, "{v}");
    let description = v["status"]["description"].as_str().unwrap_or("");
    assert!(!description.trim().is_empty(), "empty description: {v}");
    assert_eq!(v.get("data").cloned(), data, "data echo: {v}");
}

/// Proves the connection still serves: a subscribe with ACME to 101 is answered with `normal`,
/// followed by 101's current state.
async fn assert_usable(c: &mut Client) {
    let resp = c.subscribe(ACME, &[101]).await;
    assert_eq!(
        resp,
        json!({"type": "response", "action": "subscription/subscribe", "events": ["state"],
               "data": {"state": {"101": "normal"}}}),
        "the connection must still serve a subscribe"
    );
    let state = c.recv().await;
    assert!(is_state_of(&state, 101), "{state}");
    assert_eq!(state["data"]["source_id"], 10101);
}

/// Sends one text frame, checks the error it gets, then proves the connection still works.
async fn rejects(c: &mut Client, text: &str, code: u64, action: Option<&str>, data: Option<Value>) {
    c.send_text(text).await;
    let v = c.recv().await;
    assert_error(&v, code, action, data);
    assert_usable(c).await;
}

const SUBSCRIBE: Option<&str> = Some("subscription/subscribe");

#[tokio::test]
async fn not_json_or_not_an_object_is_code_5_with_null_action() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    for text in [
        "{not json",
        r#"{"action":"subscribe","hash":"#,
        "[1,2,3]",
        r#"[{"action":"subscribe"}]"#,
        "42",
        "-1.5e3",
        r#""subscribe""#,
        "null",
        "true",
    ] {
        c.send_text(text).await;
        let v = c.recv().await;
        assert_error(&v, 5, None, None);
        assert_usable(&mut c).await;
    }
}

#[tokio::test]
async fn missing_or_unknown_action_is_code_5() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let params = json!({"hash": ACME, "events": ["state"], "trackers": [101]});
    // No action at all, and actions that are not strings: no readable action, so null.
    rejects(&mut c, &params.to_string(), 5, None, None).await;
    let mut numeric = params.clone();
    numeric["action"] = json!(1);
    rejects(&mut c, &numeric.to_string(), 5, None, None).await;
    let mut null = params.clone();
    null["action"] = Value::Null;
    rejects(&mut c, &null.to_string(), 5, None, None).await;
    rejects(&mut c, "{}", 5, None, None).await;
    // An unknown action is readable: it is named in the error.
    rejects(
        &mut c,
        r#"{"action":"dance"}"#,
        5,
        Some("subscription/dance"),
        None,
    )
    .await;
}

#[tokio::test]
async fn unknown_action_echoes_its_parameters() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    // PROTOCOL §6: `data` echoes the request's parameters where there were any.
    rejects(
        &mut c,
        &json!({"action": "dance", "hash": ACME, "events": ["state"], "trackers": [101]})
            .to_string(),
        5,
        Some("subscription/dance"),
        Some(json!({"events": ["state"], "trackers": [101]})),
    )
    .await;
}

#[tokio::test]
async fn bad_hash_is_code_3_with_the_parameters_echoed() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let echo = json!({"events": ["state"], "trackers": [101]});
    let hashes = [
        None,
        Some(json!(12345678901234567890_u64)),
        Some(Value::Null),
        Some(json!([ACME])),
        Some(json!("a".repeat(31))),
        Some(json!("a".repeat(33))),
        Some(json!("")),
    ];
    for hash in hashes {
        let mut msg = json!({"action": "subscribe", "events": ["state"], "trackers": [101]});
        if let Some(h) = hash {
            msg["hash"] = h;
        }
        rejects(&mut c, &msg.to_string(), 3, SUBSCRIBE, Some(echo.clone())).await;
    }
    // The same for unsubscribe, which names its own action.
    rejects(
        &mut c,
        r#"{"action":"unsubscribe","hash":"short","events":["state"],"trackers":[101]}"#,
        3,
        Some("subscription/unsubscribe"),
        Some(echo.clone()),
    )
    .await;
}

#[tokio::test]
async fn unknown_expired_and_revoked_sessions_are_code_4() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let echo = json!({"events": ["state"], "trackers": [101, 102]});
    for hash in [UNKNOWN, EXPIRED, REVOKED] {
        let msg = json!({"action": "subscribe", "hash": hash, "events": ["state"],
                         "trackers": [101, 102]});
        rejects(&mut c, &msg.to_string(), 4, SUBSCRIBE, Some(echo.clone())).await;
    }
    // None of the refused sessions was kept by the hub.
    assert!(!app.hub.has_session(UNKNOWN));
    assert!(!app.hub.has_session(EXPIRED));
    assert!(!app.hub.has_session(REVOKED));
    assert!(app.hub.has_session(ACME));
    // The requests form gets the same answer and echo.
    let requests = json!([{"type": "state", "trackers": [101]}]);
    rejects(
        &mut c,
        &json!({"action": "subscribe", "hash": EXPIRED, "requests": requests}).to_string(),
        4,
        SUBSCRIBE,
        Some(json!({"requests": requests})),
    )
    .await;
}

#[tokio::test]
async fn unsubscribe_with_a_session_this_socket_does_not_hold_is_code_4_only_when_it_has_ended() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    for hash in [EXPIRED, REVOKED, "0123456789abcdef0123456789abcdef"] {
        rejects(
            &mut c,
            &json!({"action": "unsubscribe", "hash": hash, "events": ["state"], "trackers": [101]})
                .to_string(),
            4,
            Some("subscription/unsubscribe"),
            Some(json!({"events": ["state"], "trackers": [101]})),
        )
        .await;
    }
    // A live session this socket never subscribed with: nothing to remove, and no error that
    // would tell the dashboard its session has ended.
    let unsubscribe =
        json!({"action": "unsubscribe", "hash": ACME2, "events": ["state"], "trackers": [101]});
    c.send(unsubscribe.clone()).await;
    assert_eq!(
        c.recv().await,
        json!({"type": "response", "action": "subscription/unsubscribe", "events": ["state"],
               "data": [101]})
    );
    // Nor does it touch what the socket holds under another session.
    c.subscribe_and_states(ACME, &[101], 1).await;
    c.send(unsubscribe).await;
    assert_eq!(c.recv().await["type"], "response");
    app.exec("UPDATE tracker_states SET speed = 77 WHERE tracker_id = 101")
        .await;
    let ev = c.recv().await;
    assert!(is_state_with_speed(&ev, 101, 77), "{ev}");
}

#[tokio::test]
async fn invalid_legacy_parameters_are_code_7_with_the_parameters_echoed() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let cases = [
        json!({"events": ["state"], "trackers": [101, null]}),
        json!({"events": ["state"], "trackers": [null]}),
        json!({"events": ["state"], "trackers": ["101"]}),
        json!({"events": ["state"], "trackers": [101.5]}),
        json!({"events": ["state"], "trackers": [{"id": 101}]}),
        json!({"events": ["state"], "trackers": "101"}),
        json!({"events": ["state"], "trackers": 101}),
        json!({"events": ["state"], "trackers": null}),
        json!({"events": ["state"]}),
        json!({"events": ["dance"], "trackers": [101]}),
        json!({"events": ["state", "dance"], "trackers": [101]}),
        json!({"events": [null], "trackers": [101]}),
        json!({"events": [1], "trackers": [101]}),
        json!({"events": [], "trackers": [101]}),
        json!({"events": "state", "trackers": [101]}),
        json!({"trackers": [101]}),
        json!({"events": ["state"], "trackers": [101], "iso_datetime": "yes"}),
    ];
    for params in cases {
        let mut msg = params.clone();
        msg["action"] = json!("subscribe");
        msg["hash"] = json!(ACME);
        rejects(&mut c, &msg.to_string(), 7, SUBSCRIBE, Some(params)).await;
    }
}

#[tokio::test]
async fn invalid_requests_form_is_code_7_with_the_parameters_echoed() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let cases = [
        json!({"requests": [{"type": "state", "trackers": [101], "format": "tiny"}]}),
        json!({"requests": [{"type": "state", "trackers": [101], "format": 1}]}),
        json!({"requests": [{"type": "bogus", "trackers": [101]}]}),
        json!({"requests": [{"type": "state", "trackers": [101]}, {"type": "bogus"}]}),
        json!({"requests": [{"trackers": [101]}]}),
        json!({"requests": [{"type": "state", "trackers": [null]}]}),
        json!({"requests": ["state"]}),
        json!({"requests": []}),
        json!({"requests": {"type": "state", "trackers": [101]}}),
    ];
    for params in cases {
        let mut msg = params.clone();
        msg["action"] = json!("subscribe");
        msg["hash"] = json!(ACME);
        rejects(&mut c, &msg.to_string(), 7, SUBSCRIBE, Some(params)).await;
    }
}

#[tokio::test]
async fn too_many_trackers_is_code_9_and_the_connection_stays_usable() {
    let app = spawn_app_with(|s| s.websocket.max_trackers_per_request = 5).await;
    let mut c = app.connect().await;
    let six = json!({"events": ["state"], "trackers": [101, 102, 103, 104, 105, 106]});
    let mut msg = six.clone();
    msg["action"] = json!("subscribe");
    msg["hash"] = json!(ACME);
    rejects(&mut c, &msg.to_string(), 9, SUBSCRIBE, Some(six)).await;
    // The limit counts trackers across the items of a requests-form message too.
    let split = json!({"requests": [{"type": "state", "trackers": [101, 102, 103]},
                                    {"type": "state", "trackers": [104, 105, 106], "format": "compact"}]});
    let mut msg = split.clone();
    msg["action"] = json!("subscribe");
    msg["hash"] = json!(ACME);
    rejects(&mut c, &msg.to_string(), 9, SUBSCRIBE, Some(split)).await;
    // Exactly at the limit is fine.
    let resp = c.subscribe(ACME, &[101, 102, 103, 104, 105]).await;
    assert_eq!(resp["type"], "response", "{resp}");
    assert_eq!(
        resp["data"]["state"],
        json!({"101": "normal", "102": "normal", "103": "normal", "104": "normal",
               "105": "blocked"})
    );
    // Nothing of the refused subscribe was registered beyond what the last one holds.
    assert!(!app.hub.is_watched(106));
}

#[tokio::test]
async fn a_frame_over_the_size_limit_gets_code_9_then_close_1009() {
    let app = spawn_app_with(|s| s.websocket.max_frame_bytes = 1024).await;
    let mut c = app.connect().await;
    // A frame just under the limit is served normally.
    let padding = "p".repeat(800);
    c.send(
        json!({"action": "subscribe", "hash": ACME, "events": ["state"], "trackers": [101],
                  "padding": padding}),
    )
    .await;
    let resp = c.recv().await;
    assert_eq!(resp["data"]["state"], json!({"101": "normal"}), "{resp}");
    assert!(is_state_of(&c.recv().await, 101));

    let big = json!({"action": "subscribe", "hash": ACME, "events": ["state"], "trackers": [102],
                     "padding": "q".repeat(4096)});
    c.send(big).await;
    let (code, before) = c.recv_close().await;
    assert_eq!(
        before.len(),
        1,
        "exactly one error frame before the close: {before:?}"
    );
    assert_error(&before[0], 9, None, None);
    let description = before[0]["status"]["description"].as_str().unwrap();
    assert!(description.contains("1024"), "{description}");
    assert_eq!(code, Some(CloseCode::Size));
    // The socket's subscriptions are gone from the hub once it closed.
    app.until("the closed socket's watch to be dropped", || {
        !app.hub.is_watched(101)
    })
    .await;
}

#[tokio::test]
async fn a_binary_frame_is_code_5() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    let subscribe = json!({"action": "subscribe", "hash": ACME, "events": ["state"],
                           "trackers": [101]});
    // Even a valid subscribe is refused when sent as binary: frames are text only.
    for payload in [
        subscribe.to_string().into_bytes(),
        vec![0xff, 0xfe, 0x00, 0x80],
        Vec::new(),
    ] {
        c.ws.send(Message::Binary(payload)).await.expect("send");
        let v = c.recv().await;
        assert_error(&v, 5, None, None);
        assert_usable(&mut c).await;
    }
}

#[tokio::test]
async fn an_x_heartbeat_frame_gets_no_reply() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    c.send_text("X").await;
    c.send_text("X").await;
    // The very next message is the subscribe's response: the heartbeats were not answered.
    assert_usable(&mut c).await;
}

#[tokio::test]
async fn too_many_messages_are_code_15() {
    let app = spawn_app_with(|s| {
        s.websocket.messages_per_second = 1;
        s.websocket.messages_burst = 3;
    })
    .await;
    let mut c = app.connect().await;
    for _ in 0..5 {
        c.send_text("not json").await;
    }
    let mut codes = Vec::new();
    for _ in 0..5 {
        let v = c.recv().await;
        let code = v["status"]["code"].as_u64().expect("an error code");
        assert_error(&v, code, None, None);
        codes.push(code);
    }
    // The burst allowance answers the first three normally; the rest are rate limited.
    assert_eq!(codes, [5, 5, 5, 15, 15]);
    // Heartbeats are never rate limited: they get no reply at all.
    c.send_text("X").await;

    // Tokens refill at one per second: poll until a subscribe is accepted again.
    let deadline = tokio::time::Instant::now() + WAIT;
    let msg = json!({"action": "subscribe", "hash": ACME, "events": ["state"], "trackers": [101]});
    loop {
        c.send(msg.clone()).await;
        let v = c.recv().await;
        if v["type"] == "error" {
            assert_error(&v, 15, None, None);
            assert!(
                tokio::time::Instant::now() < deadline,
                "never accepted again"
            );
            tokio::time::sleep(Duration::from_millis(200)).await; // poll interval, not a sync
            continue;
        }
        assert_eq!(v["data"]["state"], json!({"101": "normal"}), "{v}");
        break;
    }
    assert!(is_state_of(&c.recv().await, 101));
}

#[tokio::test]
async fn deeply_nested_json_is_an_error_not_a_crash() {
    let app = spawn_app().await;
    let mut c = app.connect().await;
    rejects(&mut c, &"[".repeat(10_000), 5, None, None).await;
    let nested = format!("{}{}", "[".repeat(5_000), "]".repeat(5_000));
    rejects(&mut c, &nested, 5, None, None).await;
    let deep_object = format!(
        r#"{{"action":"subscribe","hash":"{ACME}","events":["state"],"trackers":[101],"x":{}{}}}"#,
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    // Deep inside a message whose action and hash read: invalid parameters (code 7), with
    // nothing echoed, since the parameters could not be read.
    rejects(&mut c, &deep_object, 7, SUBSCRIBE, None).await;
}

#[tokio::test]
async fn a_garbage_sending_client_never_disturbs_another() {
    let app = spawn_app().await;
    let mut good = app.connect().await;
    let (resp, _) = good.subscribe_and_states(ACME, &[101], 1).await;
    assert_eq!(resp["data"]["state"], json!({"101": "normal"}));

    let mut bad = app.connect().await;
    let garbage: Vec<Message> = vec![
        Message::Binary(vec![0xc3, 0x28, 0xa0, 0xa1, 0xe2, 0x28, 0xa1]),
        Message::Text("[".repeat(10_000)),
        Message::Text("{not json".into()),
        Message::Text("[]".into()),
        Message::Text(r#"{"action":"dance"}"#.into()),
        Message::Text(r#"{"action":"subscribe","hash":"short"}"#.into()),
        Message::Text(format!(
            r#"{{"action":"subscribe","hash":"{UNKNOWN}","events":["state"],"trackers":[101]}}"#
        )),
        Message::Text(format!(
            r#"{{"action":"subscribe","hash":"{ACME}","events":["state"],"trackers":[null]}}"#
        )),
        Message::Binary(vec![0; 2048]),
    ];
    let rounds = 10;
    for _ in 0..rounds {
        for m in &garbage {
            bad.ws.send(m.clone()).await.expect("send garbage");
        }
    }
    // Every piece of garbage got its error, in order.
    let expected = [5, 5, 5, 5, 5, 3, 4, 7, 5];
    for round in 0..rounds {
        for want in expected {
            let v = bad.recv().await;
            assert_eq!(v["type"], "error", "round {round}: {v}");
            assert_eq!(v["status"]["code"], want, "round {round}: {v}");
        }
    }

    app.set_speed(&[101], 42).await;
    let (state, skipped) = good.recv_until(|v| is_state_with_speed(v, 101, 42)).await;
    assert!(
        skipped.is_empty(),
        "nothing else reached the good client: {skipped:?}"
    );
    assert_eq!(state["data"]["source_id"], 10101);
    assert_eq!(state["data"]["gps"]["speed"], 42);
    // The garbage sender never subscribed to anything, so it got no state event; and it still
    // works.
    assert_usable(&mut bad).await;
}

/// A raw data frame: tungstenite masks it, but sends its bytes and flags as given.
fn raw_frame(payload: &[u8], opcode: Data, is_final: bool) -> Message {
    Message::Frame(Frame::message(
        payload.to_vec(),
        OpCode::Data(opcode),
        is_final,
    ))
}

#[tokio::test]
async fn a_fragmented_message_within_the_size_limit_is_served() {
    let app = spawn_app_with(|s| s.websocket.max_frame_bytes = 1024).await;
    let mut c = app.connect().await;
    let text = json!({"action": "subscribe", "hash": ACME, "events": ["state"], "trackers": [101],
                      "padding": "p".repeat(600)})
    .to_string();
    let (a, b) = text.as_bytes().split_at(text.len() / 2);
    c.ws.send(raw_frame(a, Data::Text, false)).await.unwrap();
    c.ws.send(raw_frame(b, Data::Continue, true)).await.unwrap();
    let resp = c.recv().await;
    assert_eq!(resp["data"]["state"], json!({"101": "normal"}), "{resp}");
    assert!(is_state_of(&c.recv().await, 101));
}

#[tokio::test]
async fn a_fragmented_message_over_the_size_limit_gets_code_9_then_close_1009() {
    let app = spawn_app_with(|s| s.websocket.max_frame_bytes = 1024).await;
    let mut c = app.connect().await;
    // Fragments of at most 600 bytes: each under the limit, the message (~1800 bytes) over it.
    let text = json!({"action": "subscribe", "hash": ACME, "events": ["state"], "trackers": [101],
                      "padding": "p".repeat(1700)})
    .to_string();
    let bytes = text.as_bytes();
    assert!(bytes.len() > 1024, "{}", bytes.len());
    let chunks: Vec<&[u8]> = bytes.chunks(600).collect();
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.iter().enumerate() {
        let opcode = if i == 0 { Data::Text } else { Data::Continue };
        // The server may close before the last fragment: a failed send is fine then.
        if c.ws
            .send(raw_frame(chunk, opcode, i == last))
            .await
            .is_err()
        {
            break;
        }
    }
    let (code, before) = c.recv_close().await;
    assert_eq!(
        before.len(),
        1,
        "exactly one error frame before the close: {before:?}, close code {code:?}"
    );
    assert_error(&before[0], 9, None, None);
    assert_eq!(code, Some(CloseCode::Size));
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_fails_only_that_connection() {
    let app = spawn_app().await;
    let mut good = app.connect().await;
    good.subscribe_and_states(ACME, &[101], 1).await;

    let mut bad = app.connect().await;
    bad.ws
        .send(raw_frame(&[b'{', 0xc3, 0x28, 0xff, b'}'], Data::Text, true))
        .await
        .unwrap();
    // RFC 6455 §8.1: the connection is failed (1007 is the precise code for non-UTF-8 text;
    // a protocol error, 1002, is accepted too).
    let (code, before) = bad.recv_close().await;
    assert!(
        before.is_empty(),
        "no text frame before the close: {before:?}"
    );
    assert!(
        matches!(code, Some(CloseCode::Invalid | CloseCode::Protocol)),
        "closed with {code:?}"
    );

    app.set_speed(&[101], 42).await;
    let (state, skipped) = good.recv_until(|v| is_state_with_speed(v, 101, 42)).await;
    assert!(skipped.is_empty(), "{skipped:?}");
    assert_eq!(state["data"]["source_id"], 10101);
}

#[tokio::test]
async fn binary_frames_count_against_the_rate_limit() {
    let app = spawn_app_with(|s| {
        s.websocket.messages_per_second = 1;
        s.websocket.messages_burst = 3;
    })
    .await;
    let mut c = app.connect().await;
    for _ in 0..5 {
        c.ws.send(Message::Binary(vec![1, 2, 3])).await.unwrap();
    }
    let mut codes = Vec::new();
    for _ in 0..5 {
        let v = c.recv().await;
        let code = v["status"]["code"].as_u64().expect("an error code");
        assert_error(&v, code, None, None);
        codes.push(code);
    }
    assert_eq!(
        codes,
        [5, 5, 5, 15, 15],
        "a binary flood is limited like any message"
    );
}
