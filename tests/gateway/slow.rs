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
