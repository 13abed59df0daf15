//! A client that stops reading never delays another one, and catches up with the latest states.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use crate::common::*;

#[tokio::test]
async fn a_stalled_client_does_not_delay_a_fast_one() {
    let app = spawn_app_with(|s| s.websocket.queue_capacity = 4).await;
    // Large states (about 8 KB each) so the stalled socket's kernel buffers fill quickly.
    app.exec(
        "UPDATE tracker_states SET additional = jsonb_build_object('blob', \
         jsonb_build_object('value', repeat('x', 8000), 'updated', now())) \
         WHERE tracker_id IN (101, 102, 103, 104)",
    )
    .await;
    let ids = [101, 102, 103, 104];
    let mut slow = app.connect().await;
    slow.subscribe_and_states(ACME, &ids, 4).await;
    let mut fast = app.connect().await;
    fast.subscribe_and_states(ACME, &ids, 4).await;

    let rounds = 600;
    let writer = {
        let pool = app.pool.clone();
        tokio::spawn(async move {
            for speed in 1..=rounds {
                sqlx::query("UPDATE tracker_states SET speed = $1 WHERE tracker_id = ANY($2)")
                    .bind(speed)
                    .bind(&ids[..])
                    .execute(&pool)
                    .await
                    .expect("write");
            }
        })
    };
    // The fast client sees every tracker reach the last speed, in order, while `slow` reads nothing.
    let mut last: HashMap<i64, i64> = HashMap::new();
    while last.len() < 4 || last.values().any(|s| *s != i64::from(rounds)) {
        let v = fast.recv().await;
        let (id, speed) = (
            v["tracker_id"].as_i64().unwrap(),
            v["data"]["gps"]["speed"].as_i64().unwrap(),
        );
        let prev = last.insert(id, speed).unwrap_or(0);
        assert!(
            speed > prev,
            "fast client: tracker {id} went from {prev} to {speed}"
        );
    }
    writer.await.expect("writer");
    assert!(
        app.hub.stats.coalesced.load(Ordering::Relaxed) > 0,
        "the stalled client's queue should have coalesced states"
    );
    // The stalled client now reads: it skipped states, but ends with the latest of each tracker.
    let mut last: HashMap<i64, i64> = HashMap::new();
    let mut received = 0;
    while last.len() < 4 || last.values().any(|s| *s != i64::from(rounds)) {
        let v = slow.recv().await;
        received += 1;
        let (id, speed) = (
            v["tracker_id"].as_i64().unwrap(),
            v["data"]["gps"]["speed"].as_i64().unwrap(),
        );
        let prev = last.insert(id, speed).unwrap_or(0);
        assert!(
            speed > prev,
            "slow client: tracker {id} went from {prev} to {speed}"
        );
    }
    assert!(
        received < rounds as usize * 4,
        "intermediate states were coalesced"
    );
}

/// Whether the server still holds a TCP connection from `client_port` to `server_port` on the
/// loopback (any state but TIME_WAIT and CLOSE), from `/proc/net/tcp`.
fn server_holds_connection(server_port: u16, client_port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| {
            addr.rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
        };
        f.len() > 3
            && port(f[1]) == Some(server_port)
            && port(f[2]) == Some(client_port)
            && !matches!(f[3], "06" | "07")
    })
}

/// A client that stops reading (its receive window shut) and then sends nothing is dropped at
/// the idle timeout, and so is its TCP connection. The socket's slot used to go while the
/// connection and its descriptor stayed, the gateway's last bytes waiting for a window that
/// never opened, outside every socket limit: a client could hold descriptors without end.
#[tokio::test]
async fn a_client_that_stops_reading_loses_its_connection_too() {
    use futures_util::SinkExt;
    let app = spawn_app_with(|s| s.websocket.idle_timeout_ms = 1000).await;
    app.exec(
        "UPDATE tracker_states SET additional = jsonb_build_object('blob', repeat('x', 8000)) \
         WHERE tracker_id IN (101, 102, 103, 104)",
    )
    .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let stream = socket
        .connect(([127, 0, 0, 1], app.port).into())
        .await
        .unwrap();
    let client_port = stream.local_addr().unwrap().port();
    let (mut ws, _) = tokio_tungstenite::client_async(app.ws_url(), stream)
        .await
        .unwrap();
    let subscribe = serde_json::json!({"action": "subscribe", "hash": ACME,
        "requests": [{"type": "state", "trackers": [101, 102, 103, 104]}]});
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        subscribe.to_string(),
    ))
    .await
    .unwrap();
    for speed in 1..=40 {
        app.set_speed(&[101, 102, 103, 104], speed).await;
    }
    assert!(server_holds_connection(app.port, client_port));
    eventually("the server to drop the connection", || async {
        !server_holds_connection(app.port, client_port)
    })
    .await;
    drop(ws);
}
