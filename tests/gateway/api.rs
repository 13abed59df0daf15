//! The HTTP API end to end: user and tracker calls with a session, operator calls with a key, their
//! error codes and HTTP statuses, their effects on live sockets (lifecycle, logout, disallowed),
//! the login rate limit, `/metrics` and `/openapi.json`. Requests are written by hand over a plain
//! TCP connection, as a client would send them.

use std::time::{Duration, Instant};

use fleetgate::service::{self, NewUser, UserRef};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::common::*;

// --- a minimal HTTP/1.1 client ----------------------------------------------------------------------

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("status {}: {:?}: {e}", self.status, self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a failure with this code and HTTP status.
    #[track_caller]
    fn assert_error(&self, code: i64, status: u16) {
        let v = self.json();
        assert_eq!(v["success"], false, "{v}");
        assert_eq!(v["status"]["code"], code, "{v}");
        assert!(v["status"]["description"].is_string(), "{v}");
        assert_eq!(self.status, status, "{v}");
    }

    /// Asserts success and returns the body.
    #[track_caller]
    fn ok(&self) -> Value {
        let v = self.json();
        assert_eq!((self.status, &v["success"]), (200, &json!(true)), "{v}");
        v
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

async fn http(
    app: &TestApp,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &str)>,
) -> Resp {
    let mut s = TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    match body {
        Some((content_type, b)) => req.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => req.push_str("\r\n"),
    }
    // The server may answer (and close) before reading a body it refuses: keep what was read.
    let _ = s.write_all(req.as_bytes()).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("response in time");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Resp {
        status,
        headers,
        body,
    }
}

async fn post(app: &TestApp, path: &str, body: Value) -> Resp {
    http(
        app,
        "POST",
        path,
        &[],
        Some(("application/json", &body.to_string())),
    )
    .await
}

async fn post_form(app: &TestApp, path: &str, form: &str) -> Resp {
    http(
        app,
        "POST",
        path,
        &[],
        Some(("application/x-www-form-urlencoded", form)),
    )
    .await
}

async fn get(app: &TestApp, path: &str) -> Resp {
    http(app, "GET", path, &[], None).await
}

async fn admin(app: &TestApp, key: Option<&str>, path: &str, body: Value) -> Resp {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http(
        app,
        "POST",
        path,
        &headers,
        Some(("application/json", &body.to_string())),
    )
    .await
}

// --- fixtures ----------------------------------------------------------------------------------------

/// Gives a fixture user a password (this ends its fixture sessions, as a password change does).
async fn set_password(app: &TestApp, user_id: i64, password: &str) {
    let hash = fleetgate::commands::hash_password(password).expect("hash");
    sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
        .bind(hash)
        .bind(user_id)
        .execute(&app.pool)
        .await
        .expect("set password");
}

async fn login(app: &TestApp, login: &str, password: &str) -> String {
    let r = post(
        app,
        "/v2/user/auth",
        json!({"login": login, "password": password}),
    )
    .await;
    let hash = r.ok()["hash"].as_str().expect("hash").to_string();
    assert_eq!(hash.len(), 32);
    hash
}

async fn api_key(app: &TestApp) -> String {
    service::create_api_key(&app.pool, "tests")
        .await
        .expect("create key")
        .1
}

async fn tracker_blocked(app: &TestApp, id: i64) -> bool {
    sqlx::query_scalar("SELECT blocked FROM trackers WHERE id = $1")
        .bind(id)
        .fetch_one(&app.pool)
        .await
        .expect("tracker")
}

/// The value of one series in a `/metrics` exposition (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

async fn metrics(app: &TestApp) -> String {
    let r = get(app, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.contains("openmetrics-text")),
        "{:?}",
        r.headers
    );
    r.body
}

/// Polls `/metrics` until `f` holds for it.
async fn until_metrics(app: &TestApp, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = metrics(app).await;
        if f(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await; // poll interval, not a sync
    }
}

// --- user calls --------------------------------------------------------------------------------------

#[tokio::test]
async fn auth_accepts_json_form_and_query_and_refuses_wrong_credentials() {
    let app = spawn_app().await;
    service::create_user(
        &app.pool,
        NewUser {
            login: "alice".into(),
            password: "wonder land".into(),
            time_zone: Some("Asia/Tokyo".into()),
            master: None,
        },
    )
    .await
    .expect("create alice");

    let hash = login(&app, "alice", "wonder land").await;
    let form = post_form(&app, "/v2/user/auth", "login=alice&password=wonder+land").await;
    let query = get(&app, "/v2/user/auth?login=alice&password=wonder%20land").await;
    let (h2, h3) = (form.ok()["hash"].clone(), query.ok()["hash"].clone());
    assert!(
        h2 != json!(hash) && h3 != h2,
        "every login opens a new session"
    );

    let info = post(&app, "/v2/user/get_info", json!({"hash": hash}))
        .await
        .ok();
    assert_eq!(info["user_info"]["login"], "alice");
    assert_eq!(info["user_info"]["time_zone"], "Asia/Tokyo");
    assert_eq!(info["user_info"]["sub_user"], false);
    // The hash may also come as Navixy's `Authorization: NVX <hash>` header.
    let header = format!("NVX {hash}");
    let r = http(
        &app,
        "GET",
        "/v2/user/get_info",
        &[("Authorization", &header)],
        None,
    )
    .await;
    assert_eq!(r.ok()["user_info"]["id"], info["user_info"]["id"]);

    post(
        &app,
        "/v2/user/auth",
        json!({"login": "alice", "password": "nope"}),
    )
    .await
    .assert_error(102, 400);
    post(
        &app,
        "/v2/user/auth",
        json!({"login": "nobody", "password": "nope"}),
    )
    .await
    .assert_error(102, 400);
    // Fixture users have no password at all: never a match.
    post(
        &app,
        "/v2/user/auth",
        json!({"login": "acme", "password": ""}),
    )
    .await
    .assert_error(102, 400);
    post(&app, "/v2/user/auth", json!({"login": "alice"}))
        .await
        .assert_error(7, 400);
    post(
        &app,
        "/v2/user/auth",
        json!({"login": ["alice"], "password": "x"}),
    )
    .await
    .assert_error(7, 400);

    // A blocked user is refused once its password matched.
    service::set_user_blocked(&app.pool, &UserRef::Login("alice".into()), true)
        .await
        .expect("block");
    post(
        &app,
        "/v2/user/auth",
        json!({"login": "alice", "password": "wonder land"}),
    )
    .await
    .assert_error(11, 403);
    // ...and its sessions ended with the block.
    post(&app, "/v2/user/get_info", json!({"hash": hash}))
        .await
        .assert_error(4, 400);
}

/// A role of the test cluster, dropped when this goes (after the app declared after it, whose
/// database it owns).
struct TestRole {
    name: String,
}

impl TestRole {
    async fn create() -> TestRole {
        let name = format!("fg_role_{}", uuid::Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(&server_url()).await.expect("connect");
        sqlx::query(&format!("CREATE ROLE {name} LOGIN SUPERUSER"))
            .execute(&pool)
            .await
            .expect("create a role");
        TestRole { name }
    }

    /// The server's URL with this role as the user.
    fn url(&self) -> String {
        let url = server_url();
        let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", &url));
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{}@{host}", self.name)
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        exec_on_server_from_drop(format!("DROP ROLE IF EXISTS {}", self.name));
    }
}

/// A database that refuses the gateway's login (a `pg_hba.conf` rule, a rotated password, a
/// role without LOGIN: SQLSTATE class 28) is one the gateway cannot reach now: code 14 (retry)
/// on the socket and over HTTP (503), not an unexpected error.
#[tokio::test]
async fn a_database_that_refuses_the_login_is_unavailable_not_an_error() {
    let role = TestRole::create().await;
    let url = role.url();
    let app = spawn_app_with(|s| {
        let base = s.database.url.split('?').next().unwrap_or_default();
        let db = base.rsplit('/').next().unwrap_or_default().to_owned();
        s.database.url = with_database(&url, &db);
        s.database.acquire_timeout_secs = 2;
    })
    .await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101], 1).await;
    let admin = sqlx::PgPool::connect(&server_url()).await.expect("connect");
    let exec = |sql: String| {
        let admin = admin.clone();
        async move {
            sqlx::raw_sql(&sql)
                .execute(&admin)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
    };
    exec(format!(
        "ALTER ROLE {0} NOLOGIN; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{0}'",
        role.name
    ))
    .await;
    let mut fresh = app.connect().await;
    let resp = fresh.subscribe(ACME, &[102]).await;
    assert_eq!(resp["type"], "error", "{resp}");
    assert_eq!(resp["status"]["code"], 14, "{resp}");
    let r = post(
        &app,
        "/v2/tracker/get_state",
        json!({"hash": ACME, "tracker_id": 101}),
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body.contains(r#""code":14"#), "{}", r.body);
    // Once the login is allowed again, the socket serves.
    exec(format!("ALTER ROLE {} LOGIN", role.name)).await;
    let resp = fresh.subscribe(ACME, &[102]).await;
    assert_eq!(resp["data"]["state"]["102"], "normal", "{resp}");
}

#[tokio::test]
async fn an_unknown_login_costs_as_much_as_a_wrong_password() {
    let app = spawn_app_with(|s| {
        s.api.login_attempts_per_login = 100;
        s.api.login_attempts_per_address = 100;
    })
    .await;
    set_password(&app, 1, "correct horse").await;
    let timed = |login: &'static str| {
        let app = &app;
        async move {
            let mut best = Duration::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                post(
                    app,
                    "/v2/user/auth",
                    json!({"login": login, "password": "wrong"}),
                )
                .await
                .assert_error(102, 400);
                best = best.min(t.elapsed());
            }
            best
        }
    };
    let wrong_password = timed("acme").await;
    let unknown_login = timed("nobody-at-all").await;
    // Both verify one argon2 hash; without the dummy hash an unknown login would answer at once.
    assert!(
        unknown_login * 2 >= wrong_password,
        "unknown login {unknown_login:?} vs wrong password {wrong_password:?}"
    );
}

#[tokio::test]
async fn session_errors_are_codes_3_and_4() {
    let app = spawn_app().await;
    for path in ["/v2/user/get_info", "/v2/tracker/list", "/v2/user/logout"] {
        post(&app, path, json!({})).await.assert_error(3, 400);
        post(&app, path, json!({"hash": "short"}))
            .await
            .assert_error(3, 400);
        post(&app, path, json!({"hash": 12345}))
            .await
            .assert_error(3, 400);
        post(
            &app,
            path,
            json!({"hash": "0123456789abcdef0123456789abcdef"}),
        )
        .await
        .assert_error(4, 400);
        post(&app, path, json!({"hash": EXPIRED}))
            .await
            .assert_error(4, 400);
        post(&app, path, json!({"hash": REVOKED}))
            .await
            .assert_error(4, 400);
    }
}

#[tokio::test]
async fn logout_reaches_a_subscribed_socket() {
    let app = spawn_app().await;
    set_password(&app, 1, "s3cret").await;
    let hash = login(&app, "acme", "s3cret").await;
    let mut c = app.connect().await;
    let (resp, _) = c.subscribe_and_states(&hash, &[101], 1).await;
    assert_eq!(resp["data"]["state"]["101"], "normal");

    post(&app, "/v2/user/logout", json!({"hash": hash}))
        .await
        .ok();
    let (code, before) = c.recv_close().await;
    assert_eq!(
        before.last(),
        Some(&json!({"type": "event", "event": "logout", "data": "session closed"}))
    );
    assert_eq!(code, Some(CloseCode::Normal));
    // The session is gone for the API too.
    post(&app, "/v2/user/logout", json!({"hash": hash}))
        .await
        .assert_error(4, 400);
    post(&app, "/v2/tracker/list", json!({"hash": hash}))
        .await
        .assert_error(4, 400);
}

// --- tracker calls -----------------------------------------------------------------------------------

#[tokio::test]
async fn tracker_list_shows_what_the_session_may_see() {
    let app = spawn_app().await;
    let v = post(&app, "/v2/tracker/list", json!({"hash": ACME}))
        .await
        .ok();
    let list = v["list"].as_array().expect("list");
    let ids: Vec<i64> = list.iter().filter_map(|t| t["id"].as_i64()).collect();
    assert_eq!(
        ids,
        [101, 102, 103, 104, 105],
        "removed and foreign trackers are not listed"
    );
    assert_eq!(list[0]["label"], "Truck 1");
    assert_eq!(list[0]["source"]["id"], 10101);
    assert_eq!(list[0]["source"]["blocked"], false);
    assert_eq!(list[4]["source"]["blocked"], true);
    assert_eq!(list[0]["group_id"], 0);

    let sub = get(&app, &format!("/v2/tracker/list?hash={SUB}"))
        .await
        .ok();
    let ids: Vec<i64> = sub["list"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|t| t["id"].as_i64())
        .collect();
    assert_eq!(ids, [101, 102], "a sub-user sees its grants only");
}

/// HTTP states are the socket's bytes: numbers are not parsed into 64-bit floats on the way
/// (which moved coordinates by one unit in the last place, wrote `1.50` as `1.5` and a big
/// integer in exponent form, and answered `null` for a state holding a number beyond a
/// float's range).
#[tokio::test]
async fn http_states_are_the_sockets_bytes() {
    let app = spawn_app().await;
    app.exec(
        r#"UPDATE tracker_states SET lat = -18.183216676054286, lng = 13.431338020322405,
             additional = '{"fuel": {"value": 1.50, "updated": null},
                            "odometer": {"value": 123456789012345678901234567890, "updated": null},
                            "huge": {"value": 1e400, "updated": null}}'
            WHERE tracker_id = 101"#,
    )
    .await;
    let mut c = app.connect().await;
    c.send(json!({"action": "subscribe", "hash": ACME, "events": ["state"], "trackers": [101]}))
        .await;
    let event = loop {
        match c.next().await {
            Received::Text(t) if t.contains(r#""event":"state""#) => break t,
            Received::Text(_) => {}
            Received::Closed(c) => panic!("closed: {c:?}"),
        }
    };
    let data = event
        .split_once(r#","data":"#)
        .and_then(|(_, d)| d.strip_suffix('}'))
        .expect("a state event ends with its data");
    for digits in [
        "-18.183216676054286",
        "13.431338020322405",
        "1.50",
        "123456789012345678901234567890",
        // (jsonb writes 1e400 out in full.)
        r#""huge":{"value":10000000000000000000000"#,
    ] {
        assert!(
            data.contains(digits),
            "{digits} in the socket's state: {data}"
        );
    }
    let one = post(
        &app,
        "/v2/tracker/get_state",
        json!({"hash": ACME, "tracker_id": 101}),
    )
    .await;
    assert_eq!(one.status, 200, "{}", one.body);
    assert!(
        one.body.contains(&format!(r#""state":{data}"#)),
        "get_state holds the socket's bytes:\n{data}\n{}",
        one.body
    );
    let many = post(
        &app,
        "/v2/tracker/get_states",
        json!({"hash": ACME, "trackers": [101, 102]}),
    )
    .await;
    assert_eq!(many.status, 200, "{}", many.body);
    assert!(
        many.body.contains(&format!(r#""101":{data}"#)),
        "get_states holds the socket's bytes:\n{data}\n{}",
        many.body
    );
    assert!(
        many.body.contains(r#""102":{"source_id":10102,"#),
        "{}",
        many.body
    );
}

#[tokio::test]
async fn get_state_matches_the_websocket_state_and_has_the_error_codes() {
    let app = spawn_app().await;
    let v = post(
        &app,
        "/v2/tracker/get_state",
        json!({"hash": ACME, "tracker_id": 101}),
    )
    .await
    .ok();
    let user_time = v["user_time"].as_str().expect("user_time");
    assert_eq!(user_time.len(), 19, "{user_time}");
    assert_eq!(v["state"]["source_id"], 10101);
    assert_eq!(
        v["state"]["gps"]["updated"], "2018-10-17 12:51:43",
        "Berlin time"
    );

    let mut c = app.connect().await;
    let (_, states) = c.subscribe_and_states(ACME, &[101], 1).await;
    assert_eq!(
        v["state"], states[0]["data"],
        "the same full format as the socket"
    );

    // Form fields and numbers as strings work too.
    let form = post_form(
        &app,
        "/v2/tracker/get_state",
        &format!("hash={ACME}&tracker_id=101"),
    )
    .await;
    assert_eq!(form.ok()["state"], v["state"]);
    // A JSON body sent as a form (`curl -d '{…}'` without a content type) is read as JSON.
    let curl = post_form(
        &app,
        "/v2/tracker/get_state",
        &json!({"hash": ACME, "tracker_id": 101}).to_string(),
    )
    .await;
    assert_eq!(curl.ok()["state"], v["state"]);
    post_form(&app, "/v2/tracker/get_state", "{not json")
        .await
        .assert_error(5, 400);

    let call = |id: Value, hash: &'static str| {
        let app = &app;
        async move {
            post(
                app,
                "/v2/tracker/get_state",
                json!({"hash": hash, "tracker_id": id}),
            )
            .await
        }
    };
    call(json!(105), ACME).await.assert_error(208, 403);
    call(json!(106), ACME).await.assert_error(201, 400);
    call(json!(201), ACME).await.assert_error(201, 400);
    call(json!(999), ACME).await.assert_error(201, 400);
    call(json!(103), SUB).await.assert_error(11, 403);
    call(json!("abc"), ACME).await.assert_error(7, 400);
    post(&app, "/v2/tracker/get_state", json!({"hash": ACME}))
        .await
        .assert_error(7, 400);
}

#[tokio::test]
async fn get_states_gives_the_subscribe_statuses_and_navixy_errors() {
    let app = spawn_app_with(|s| {
        s.websocket.max_trackers_per_request = 20;
        s.api.max_body_bytes = 4096;
    })
    .await;
    let ids = [101, 102, 105, 106, 201, 999];
    let v = post(
        &app,
        "/v2/tracker/get_states",
        json!({"hash": ACME, "trackers": ids, "list_blocked": true, "allow_not_exist": true}),
    )
    .await
    .ok();
    let mut c = app.connect().await;
    let ws = c.subscribe(ACME, &ids).await;
    assert_eq!(
        v["statuses"], ws["data"]["state"],
        "the same statuses as subscribe"
    );
    let keys: Vec<&String> = v["states"].as_object().expect("states").keys().collect();
    assert_eq!(keys, ["101", "102"]);
    assert_eq!(v["states"]["102"]["source_id"], 10102);
    assert_eq!(v["blocked"], json!([105]));
    assert_eq!(v["not_exist"], json!([106, 201, 999]));

    // A sub-user's ungranted tracker is `disallowed` (and does not exist for Navixy's lists).
    let sub = get(
        &app,
        &format!("/v2/tracker/get_states?hash={SUB}&trackers=[101,103]&allow_not_exist=true"),
    )
    .await
    .ok();
    assert_eq!(
        sub["statuses"],
        json!({"101": "normal", "103": "disallowed"})
    );
    assert_eq!(sub["not_exist"], json!([103]));

    let call = |body: Value| {
        let app = &app;
        async move { post(app, "/v2/tracker/get_states", body).await }
    };
    call(json!({"hash": ACME, "trackers": [101, 999]}))
        .await
        .assert_error(217, 400);
    call(json!({"hash": ACME, "trackers": [101, 105]}))
        .await
        .assert_error(208, 403);
    call(json!({"hash": ACME, "trackers": [101, null]}))
        .await
        .assert_error(7, 400);
    call(json!({"hash": ACME})).await.assert_error(7, 400);
    call(json!({"hash": ACME, "trackers": (1..=21).collect::<Vec<i64>>()}))
        .await
        .assert_error(9, 412);

    // Request format and size.
    let big = json!({"hash": ACME, "trackers": [101], "pad": "x".repeat(5000)});
    call(big).await.assert_error(9, 412);
    http(
        &app,
        "POST",
        "/v2/tracker/get_states",
        &[],
        Some(("application/json", "{not json")),
    )
    .await
    .assert_error(5, 400);
    http(
        &app,
        "POST",
        "/v2/tracker/get_states",
        &[],
        Some(("application/json", "[1, 2]")),
    )
    .await
    .assert_error(5, 400);
    // Bodies that are neither JSON nor a form are refused for what they are (they were read
    // as forms, and the call answered "wrong hash").
    for (content_type, body) in [
        ("application/xml", "<hash>x</hash>"),
        ("multipart/form-data; boundary=b", "--b\r\n\r\nx\r\n--b--"),
    ] {
        let r = http(
            &app,
            "POST",
            "/v2/tracker/get_states",
            &[],
            Some((content_type, body)),
        )
        .await;
        r.assert_error(5, 400);
        assert!(r.body.contains("is not read"), "{}", r.body);
    }
    // A form says so, or says nothing, or is `text/plain`.
    for content_type in [
        "application/x-www-form-urlencoded; charset=UTF-8",
        "text/plain",
        "",
    ] {
        let form = format!("hash={ACME}&trackers=[101]");
        let r = http(
            &app,
            "POST",
            "/v2/tracker/get_states",
            &[],
            Some((content_type, &form)),
        )
        .await;
        assert_eq!(
            r.ok()["states"]["101"]["source_id"],
            10101,
            "{content_type}"
        );
    }
    http(&app, "PUT", "/v2/tracker/get_states", &[], None)
        .await
        .assert_error(112, 400);
}

#[tokio::test]
async fn unknown_paths_answer_wrong_handler() {
    let app = spawn_app().await;
    // Navixy answers an unknown API call with code 111 and the default status.
    get(&app, "/v2/tracker/get_stat")
        .await
        .assert_error(111, 400);
    post(&app, "/v2/nothing/here", json!({}))
        .await
        .assert_error(111, 400);
    // Elsewhere the same body, with 404 so that a mistyped URL reads as one.
    get(&app, "/healthz").await.assert_error(111, 404);
    get(&app, "/web/missing.js").await.assert_error(111, 404);
    // A known path with a method it does not take is not an unknown path.
    for path in [
        "/health",
        "/metrics",
        "/",
        "/web/app.js",
        "/v2/event/subscription",
    ] {
        http(&app, "POST", path, &[], None)
            .await
            .assert_error(112, 400);
    }
    let head = http(&app, "HEAD", "/web/app.js", &[], None).await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    // The routes themselves still answer.
    assert_eq!(get(&app, "/health").await.status, 200);
    assert_eq!(get(&app, "/").await.status, 200);
}

// --- operator calls ----------------------------------------------------------------------------------

#[tokio::test]
async fn operator_calls_refuse_missing_wrong_and_revoked_keys() {
    let app = spawn_app().await;
    let block = json!({"tracker_id": 101});
    admin(&app, None, "/v2/admin/tracker/block", block.clone())
        .await
        .assert_error(2, 403);
    admin(
        &app,
        Some("fgk_not-a-key"),
        "/v2/admin/tracker/block",
        block.clone(),
    )
    .await
    .assert_error(11, 403);
    let (id, revoked) = service::create_api_key(&app.pool, "old")
        .await
        .expect("create key");
    service::revoke_api_key(&app.pool, id)
        .await
        .expect("revoke");
    admin(
        &app,
        Some(&revoked),
        "/v2/admin/tracker/block",
        block.clone(),
    )
    .await
    .assert_error(11, 403);
    // A session hash is not an operator key.
    let nvx = format!("NVX {ACME}");
    http(
        &app,
        "POST",
        "/v2/admin/user/block",
        &[("Authorization", &nvx)],
        Some(("application/json", r#"{"user_id": 1}"#)),
    )
    .await
    .assert_error(2, 403);
    assert!(!tracker_blocked(&app, 101).await, "nothing changed");

    // The key is checked before anything else, even before parameters, and before the body
    // is read: a malformed or oversized body without a key is still code 2 (11 with a wrong
    // one).
    admin(&app, None, "/v2/admin/user/create", json!({}))
        .await
        .assert_error(2, 403);
    let big = format!("{{\"x\": \"{}\"}}", "y".repeat(70_000));
    for body in ["{bad", big.as_str()] {
        http(
            &app,
            "POST",
            "/v2/admin/tracker/block",
            &[],
            Some(("application/json", body)),
        )
        .await
        .assert_error(2, 403);
        http(
            &app,
            "POST",
            "/v2/admin/tracker/block",
            &[("Authorization", "Bearer fgk_not-a-key")],
            Some(("application/json", body)),
        )
        .await
        .assert_error(11, 403);
    }
    // Operator calls are POST only.
    let key = api_key(&app).await;
    let bearer = format!("Bearer {key}");
    http(
        &app,
        "GET",
        "/v2/admin/tracker/block?tracker_id=101",
        &[("Authorization", &bearer)],
        None,
    )
    .await
    .assert_error(112, 400);
    assert!(!tracker_blocked(&app, 101).await);

    admin(&app, Some(&key), "/v2/admin/tracker/block", block)
        .await
        .ok();
    assert!(tracker_blocked(&app, 101).await);
}

#[tokio::test]
async fn a_block_through_the_api_reaches_a_socket_as_lifecycle() {
    let app = spawn_app().await;
    let key = api_key(&app).await;
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;

    admin(
        &app,
        Some(&key),
        "/v2/admin/tracker/block",
        json!({"tracker_id": 101}),
    )
    .await
    .ok();
    let (ev, _) = c.recv_until(|v| v["event"] == "lifecycle").await;
    assert_eq!(
        ev,
        json!({"type": "event", "event": "lifecycle", "tracker_id": 101,
               "data": {"source_id": 10101, "lifecycle_event": "block"}})
    );
    admin(
        &app,
        Some(&key),
        "/v2/admin/tracker/unblock",
        json!({"tracker_id": "101"}),
    )
    .await
    .ok();
    let (ev, _) = c.recv_until(|v| v["event"] == "lifecycle").await;
    assert_eq!(ev["data"]["lifecycle_event"], "unblock");
    let (state, _) = c.recv_until(|v| is_state_of(v, 101)).await;
    assert_eq!(
        state["data"]["source_id"], 10101,
        "the current state follows an unblock"
    );

    admin(
        &app,
        Some(&key),
        "/v2/admin/tracker/remove",
        json!({"tracker_id": 102}),
    )
    .await
    .ok();
    let (ev, _) = c.recv_until(|v| v["event"] == "lifecycle").await;
    assert_eq!(
        (
            ev["tracker_id"].clone(),
            ev["data"]["lifecycle_event"].clone()
        ),
        (json!(102), json!("corrupt"))
    );

    for (path, body) in [
        ("/v2/admin/tracker/block", json!({"tracker_id": 999})),
        ("/v2/admin/tracker/remove", json!({"tracker_id": 102})),
        ("/v2/admin/session/revoke", json!({"session_hash": REVOKED})),
    ] {
        admin(&app, Some(&key), path, body)
            .await
            .assert_error(201, 400);
    }
    admin(&app, Some(&key), "/v2/admin/tracker/block", json!({}))
        .await
        .assert_error(7, 400);
}

#[tokio::test]
async fn operators_manage_users_sessions_and_grants() {
    let app = spawn_app().await;
    let key = api_key(&app).await;
    let call = |path: &'static str, body: Value| {
        let app = &app;
        let key = key.clone();
        async move { admin(app, Some(&key), path, body).await }
    };

    // Users.
    let id = call(
        "/v2/admin/user/create",
        json!({"login": "fleet2", "password": "pw-fleet2", "time_zone": "Europe/Paris"}),
    )
    .await
    .ok()["id"]
        .as_i64()
        .expect("id");
    call(
        "/v2/admin/user/create",
        json!({"login": "fleet2", "password": "x"}),
    )
    .await
    .assert_error(206, 400);
    call(
        "/v2/admin/user/create",
        json!({"login": "x", "password": "x", "time_zone": "Mars/Olympus"}),
    )
    .await
    .assert_error(7, 400);
    // A number names a user by id in the commands: such a login could not be named.
    for login in ["12345", "+7", "-5"] {
        let r = call(
            "/v2/admin/user/create",
            json!({"login": login, "password": "x"}),
        )
        .await;
        r.assert_error(7, 400);
        assert!(r.body.contains("number"), "{}", r.body);
    }
    call(
        "/v2/admin/user/create",
        json!({"login": "x", "password": "x", "master_login": "nobody"}),
    )
    .await
    .assert_error(201, 400);
    call(
        "/v2/admin/user/create",
        json!({"login": "x", "password": "x", "master_id": 2}),
    )
    .await
    .assert_error(7, 400);
    // A misspelt field is refused, not ignored (`master` here would have made a master account).
    let r = call(
        "/v2/admin/user/create",
        json!({"login": "x", "password": "x", "master": "fleet2"}),
    )
    .await;
    r.assert_error(7, 400);
    assert!(r.body.contains("unknown field `master`"), "{}", r.body);
    let sub_id = call(
        "/v2/admin/user/create",
        json!({"login": "acme-driver", "password": "pw-driver", "master_login": "acme"}),
    )
    .await
    .ok()["id"]
        .as_i64()
        .expect("id");
    assert!(sub_id > id);

    // Grants.
    let granted = call(
        "/v2/admin/user/grant",
        json!({"login": "acme-driver", "trackers": [103, 104]}),
    )
    .await
    .ok();
    assert_eq!(granted["count"], 2);
    call(
        "/v2/admin/user/grant",
        json!({"user_id": sub_id, "trackers": [103, 201]}),
    )
    .await
    .assert_error(217, 400);
    call(
        "/v2/admin/user/grant",
        json!({"user_id": id, "trackers": [103]}),
    )
    .await
    .assert_error(7, 400);
    call(
        "/v2/admin/user/grant",
        json!({"user_id": 424242, "trackers": [103]}),
    )
    .await
    .assert_error(201, 400);
    call(
        "/v2/admin/user/grant",
        json!({"user_id": sub_id, "trackers": []}),
    )
    .await
    .assert_error(7, 400);
    call(
        "/v2/admin/user/grant",
        json!({"user_id": sub_id, "login": "acme-driver", "trackers": [103]}),
    )
    .await
    .assert_error(7, 400);

    let hash = login(&app, "acme-driver", "pw-driver").await;
    let mut driver = app.connect().await;
    let (resp, _) = driver.subscribe_and_states(&hash, &[103, 104], 2).await;
    assert_eq!(
        resp["data"]["state"],
        json!({"103": "normal", "104": "normal"})
    );
    let revoked = call(
        "/v2/admin/user/revoke_grant",
        json!({"user_id": sub_id, "trackers": [104, 105]}),
    )
    .await
    .ok();
    assert_eq!(revoked["count"], 1);
    let (ev, _) = driver.recv_until(|v| v["event"] == "lifecycle").await;
    assert_eq!(ev["data"]["lifecycle_event"], "disallowed");
    assert_eq!(ev["tracker_id"], 104);

    // Blocking a user logs its sockets out; unblocking lets it log in again.
    call("/v2/admin/user/block", json!({"login": "acme-driver"}))
        .await
        .ok();
    let (code, before) = driver.recv_close().await;
    assert_eq!(
        before.last().map(|v| v["event"].clone()),
        Some(json!("logout"))
    );
    assert_eq!(code, Some(CloseCode::Normal));
    post(
        &app,
        "/v2/user/auth",
        json!({"login": "acme-driver", "password": "pw-driver"}),
    )
    .await
    .assert_error(11, 403);
    call("/v2/admin/user/unblock", json!({"user_id": sub_id}))
        .await
        .ok();
    login(&app, "acme-driver", "pw-driver").await;
    call("/v2/admin/user/block", json!({"user_id": 999}))
        .await
        .assert_error(201, 400);
    call("/v2/admin/user/block", json!({}))
        .await
        .assert_error(7, 400);

    // Revoking a session logs its socket out.
    let mut c = app.connect().await;
    c.subscribe_and_states(ACME2, &[101], 1).await;
    call("/v2/admin/session/revoke", json!({"session_hash": ACME2}))
        .await
        .ok();
    let (_, before) = c.recv_close().await;
    assert_eq!(
        before.last().map(|v| v["event"].clone()),
        Some(json!("logout"))
    );
}

// --- grants on live subscriptions --------------------------------------------------------------------

#[tokio::test]
async fn revoking_a_grant_stops_a_live_subscription() {
    let app = spawn_app().await;
    let mut sub = app.connect().await;
    sub.subscribe_and_states(SUB, &[101, 102], 2).await;
    let mut master = app.connect().await;
    master.subscribe_and_states(ACME, &[101], 1).await;

    // The command line's path: the same service call as the operator API.
    let n = service::revoke_grant(&app.pool, &UserRef::Login("acme-sub".into()), &[101])
        .await
        .expect("revoke");
    assert_eq!(n, 1);
    let (ev, _) = sub.recv_until(|v| v["event"] == "lifecycle").await;
    assert_eq!(
        ev,
        json!({"type": "event", "event": "lifecycle", "tracker_id": 101,
               "data": {"source_id": 10101, "lifecycle_event": "disallowed"}})
    );

    app.set_speed(&[101, 102], 42).await;
    let (_, skipped) = sub.recv_until(|v| is_state_with_speed(v, 102, 42)).await;
    assert!(
        !skipped.iter().any(|v| is_state_of(v, 101)),
        "101 stopped flowing: {skipped:?}"
    );
    // The master account is not affected.
    master.recv_until(|v| is_state_with_speed(v, 101, 42)).await;
    // Subscribing again answers `disallowed`.
    let resp = sub.subscribe(SUB, &[101]).await;
    assert_eq!(resp["data"]["state"]["101"], "disallowed");

    // A grant deleted and re-inserted in one transaction changes nothing.
    app.exec(
        "BEGIN; DELETE FROM tracker_grants WHERE user_id = 2 AND tracker_id = 102; \
         INSERT INTO tracker_grants VALUES (2, 102); COMMIT;",
    )
    .await;
    app.set_speed(&[102], 43).await;
    let (_, skipped) = sub.recv_until(|v| is_state_with_speed(v, 102, 43)).await;
    assert!(
        !skipped.iter().any(|v| v["event"] == "lifecycle"),
        "{skipped:?}"
    );
}

#[tokio::test]
async fn a_grant_revoked_during_a_listen_gap_takes_effect_on_resync() {
    let app = spawn_app().await;
    let mut sub = app.connect().await;
    sub.subscribe_and_states(SUB, &[101, 102], 2).await;
    app.exec(&format!(
        "BEGIN; DELETE FROM tracker_grants WHERE user_id = 2 AND tracker_id = 102; \
         SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
          WHERE application_name = '{}' AND datname = current_database(); \
         COMMIT;",
        fleetgate::listen::LISTEN_APPLICATION_NAME
    ))
    .await;
    let (ev, _) = sub
        .recv_until(|v| v["event"] == "lifecycle" && v["tracker_id"] == 102)
        .await;
    assert_eq!(ev["data"]["lifecycle_event"], "disallowed");
    app.set_speed(&[101, 102], 7).await;
    let (_, skipped) = sub.recv_until(|v| is_state_with_speed(v, 101, 7)).await;
    assert!(!skipped.iter().any(|v| is_state_of(v, 102)), "{skipped:?}");
}

// --- limits, metrics, documents ----------------------------------------------------------------------

#[tokio::test]
async fn login_attempts_are_rate_limited_per_login_and_per_address() {
    let app = spawn_app_with(|s| {
        s.api.login_attempts_per_login = 3;
        s.api.login_attempts_per_address = 5;
        s.api.login_window_secs = 600;
    })
    .await;
    set_password(&app, 1, "right").await;
    let attempt = |login: &'static str, password: &'static str| {
        let app = &app;
        async move {
            post(
                app,
                "/v2/user/auth",
                json!({"login": login, "password": password}),
            )
            .await
        }
    };
    for _ in 0..3 {
        attempt("acme", "wrong").await.assert_error(102, 400);
    }
    let limited = attempt("acme", "right").await;
    limited.assert_error(15, 429);
    let retry: u64 = limited
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=600).contains(&retry), "{retry}");
    // Another login from the same address still has the address's last attempt...
    attempt("rival", "wrong").await.assert_error(102, 400);
    // ...and then the address is spent too.
    attempt("acme-ops", "wrong").await.assert_error(15, 429);
}

/// A user API key from the operator API works as a session hash in the HTTP API, is listed,
/// and ends with `session/revoke`.
#[tokio::test]
async fn an_operator_creates_a_user_api_key_that_works_as_a_session_hash() {
    let app = spawn_app().await;
    let key = api_key(&app).await;
    let made = admin(
        &app,
        Some(&key),
        "/v2/admin/user/api_key",
        json!({"login": "acme", "name": "fleet sync"}),
    )
    .await
    .ok();
    let hash = made["hash"].as_str().expect("hash").to_string();
    assert_eq!(hash.len(), 32);
    let states = post(
        &app,
        "/v2/tracker/get_states",
        json!({"hash": hash, "trackers": [101]}),
    )
    .await
    .ok();
    assert!(states["states"]["101"].is_object(), "{states}");
    let listed = admin(
        &app,
        Some(&key),
        "/v2/admin/user/api_keys",
        json!({"user_id": 1}),
    )
    .await
    .ok();
    assert_eq!(listed["list"][0]["hash"], json!(hash), "{listed}");
    assert_eq!(listed["list"][0]["name"], "fleet sync", "{listed}");
    assert!(listed["list"][0].get("ended").is_none(), "{listed}");
    admin(
        &app,
        Some(&key),
        "/v2/admin/session/revoke",
        json!({"session_hash": hash}),
    )
    .await
    .ok();
    post(&app, "/v2/tracker/list", json!({"hash": hash}))
        .await
        .assert_error(4, 400);
    // A name is required, and no key goes to a blocked user.
    admin(
        &app,
        Some(&key),
        "/v2/admin/user/api_key",
        json!({"login": "acme", "name": " "}),
    )
    .await
    .assert_error(7, 400);
    app.exec("UPDATE users SET blocked = true WHERE id = 1")
        .await;
    admin(
        &app,
        Some(&key),
        "/v2/admin/user/api_key",
        json!({"login": "acme", "name": "x"}),
    )
    .await
    .assert_error(11, 403);
}

/// The socket's URL asked for something that is no WebSocket handshake answers with the API's
/// JSON error body, keeping the status and headers the handshake's rules give.
#[tokio::test]
async fn what_is_no_websocket_handshake_gets_a_json_error() {
    let app = spawn_app().await;
    let path = "/v2/event/subscription";
    http(&app, "GET", path, &[], None)
        .await
        .assert_error(5, 400);
    // An upgrade as given (the helper above adds `Connection: close`), whole response as text.
    let upgrade = |http_version: &'static str, ws_version: &'static str| async move {
        let mut s = TcpStream::connect(("127.0.0.1", app.port))
            .await
            .expect("connect");
        let req = format!(
            "GET {path} HTTP/{http_version}\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: {ws_version}\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("response in time");
        String::from_utf8_lossy(&buf).to_lowercase()
    };
    let old = upgrade("1.1", "8").await;
    assert!(old.starts_with("http/1.1 426"), "{old}");
    assert!(old.contains("sec-websocket-version: 13"), "{old}");
    assert!(old.contains(r#""code":5"#), "{old}");
    // HTTP/1.0 cannot upgrade (RFC 6455 §4.1).
    let ancient = upgrade("1.0", "13").await;
    assert!(ancient.contains(" 400 "), "{ancient}");
    assert!(ancient.contains("needs http/1.1"), "{ancient}");
}

#[tokio::test]
async fn calls_with_a_session_are_rate_limited_per_session() {
    let app = spawn_app_with(|s| {
        s.api.requests_per_second = 1;
        s.api.requests_burst = 3;
    })
    .await;
    let list = |hash: &'static str| {
        let app = &app;
        async move { post(app, "/v2/tracker/list", json!({ "hash": hash })).await }
    };
    // The burst is shared by every call made with the session, whatever the route.
    let started = std::time::Instant::now();
    list(ACME).await.ok();
    post(&app, "/v2/user/get_info", json!({ "hash": ACME }))
        .await
        .ok();
    post(
        &app,
        "/v2/tracker/get_states",
        json!({ "hash": ACME, "trackers": [101] }),
    )
    .await
    .ok();
    // Spent (a slow machine may have earned a call back for each second taken).
    let mut more = 0;
    let limited = loop {
        let r = list(ACME).await;
        if r.status != 200 {
            break r;
        }
        more += 1;
        assert!(
            more <= started.elapsed().as_secs() + 1,
            "{more} calls past the burst"
        );
    };
    limited.assert_error(15, 429);
    let retry: u64 = limited
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=2).contains(&retry), "{retry}");
    // Another session of the same user has its own allowance.
    list(ACME2).await.ok();
    // A malformed hash is refused for what it is.
    post(&app, "/v2/tracker/list", json!({ "hash": "short" }))
        .await
        .assert_error(3, 400);
}

#[tokio::test]
async fn metrics_move_when_events_flow() {
    let app = spawn_app().await;
    let before = metrics(&app).await;
    for series in [
        "fleetgate_open_sockets",
        "fleetgate_subscriptions",
        "fleetgate_subscribed_trackers",
        "fleetgate_batch_groups",
        "fleetgate_outbound_queue_depth",
        "fleetgate_coalesced_states_total",
        "fleetgate_batches_skipped_total",
        "fleetgate_notifications_total",
        "fleetgate_listen_reconnects_total",
        "fleetgate_listen_gap_seconds_count",
        "fleetgate_subscribe_latency_seconds_count",
        "fleetgate_notify_to_send_seconds_count",
        "fleetgate_socket_sent_bytes_total",
        r#"fleetgate_events_sent_total{kind="state"}"#,
    ] {
        assert!(
            before.lines().any(|l| l.starts_with(series)),
            "{series} missing:\n{before}"
        );
    }
    assert_eq!(metric(&before, "fleetgate_open_sockets"), 0.0);
    let notifications = metric(&before, "fleetgate_notifications_total");

    let mut c = app.connect().await;
    c.subscribe_and_states(ACME, &[101, 102], 2).await;
    app.set_speed(&[101], 55).await;
    c.recv_until(|v| is_state_with_speed(v, 101, 55)).await;
    let text = until_metrics(&app, "events to be counted", |t| {
        metric(t, "fleetgate_notify_to_send_seconds_count") >= 1.0
    })
    .await;
    assert_eq!(metric(&text, "fleetgate_open_sockets"), 1.0);
    assert_eq!(metric(&text, "fleetgate_subscribed_trackers"), 2.0);
    assert_eq!(metric(&text, "fleetgate_subscriptions"), 2.0);
    assert_eq!(metric(&text, "fleetgate_sessions"), 1.0);
    assert!(metric(&text, "fleetgate_notifications_total") > notifications);
    assert_eq!(
        metric(&text, "fleetgate_subscribe_latency_seconds_count"),
        1.0
    );
    assert!(metric(&text, r#"fleetgate_events_sent_total{kind="state"}"#) >= 3.0);
    assert_eq!(
        metric(&text, r#"fleetgate_events_sent_total{kind="response"}"#),
        1.0
    );
    assert!(metric(&text, "fleetgate_socket_sent_bytes_total") > 500.0);

    // A lost LISTEN connection is counted, with its gap.
    app.exec(&format!(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
          WHERE application_name = '{}' AND datname = current_database()",
        fleetgate::listen::LISTEN_APPLICATION_NAME
    ))
    .await;
    let text = until_metrics(&app, "the reconnect to be counted", |t| {
        metric(t, "fleetgate_listen_reconnects_total") >= 1.0
    })
    .await;
    assert_eq!(metric(&text, "fleetgate_listen_gap_seconds_count"), 1.0);

    drop(c);
    until_metrics(&app, "the socket to close", |t| {
        metric(t, "fleetgate_open_sockets") == 0.0 && metric(t, "fleetgate_subscriptions") == 0.0
    })
    .await;
}

#[tokio::test]
async fn the_openapi_document_describes_every_endpoint() {
    let app = spawn_app().await;
    let r = get(&app, "/openapi.json").await;
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    for path in [
        "/v2/user/auth",
        "/v2/user/logout",
        "/v2/user/get_info",
        "/v2/tracker/list",
        "/v2/tracker/get_state",
        "/v2/tracker/get_states",
        "/v2/admin/tracker/block",
        "/v2/admin/tracker/unblock",
        "/v2/admin/tracker/remove",
        "/v2/admin/session/revoke",
        "/v2/admin/user/block",
        "/v2/admin/user/unblock",
        "/v2/admin/user/create",
        "/v2/admin/user/grant",
        "/v2/admin/user/revoke_grant",
    ] {
        assert!(doc["paths"][path]["post"].is_object(), "{path} missing");
    }
    for path in ["/health", "/ready", "/metrics"] {
        assert!(doc["paths"][path]["get"].is_object(), "{path} missing");
    }
    // What /ready answers is what the document says it answers.
    let ready = get(&app, "/ready").await.json();
    let schema = &doc["components"]["schemas"]["ReadyBody"]["properties"];
    let fields = |v: &Value| {
        let mut k: Vec<String> = v
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k.clone())
            .collect();
        k.sort();
        k
    };
    assert_eq!(fields(&ready), fields(schema), "{ready} {schema}");
    assert_eq!(
        doc["paths"]["/v2/admin/tracker/block"]["post"]["security"],
        json!([{"operator_key": []}])
    );
    // A tracker that never reported has `state: null`.
    let state = &doc["components"]["schemas"]["GetStateResponse"]["properties"]["state"];
    assert_eq!(state["type"], json!(["object", "null"]), "{state}");
}

#[tokio::test]
async fn seed_demo_reuses_its_fleet_and_replaces_a_removed_tracker() {
    let app = spawn_app().await;
    let seed = || fleetgate::commands::seed_demo(&app.pool);
    // A `demo` user made before, with its own password and zone: they are kept, and told.
    service::create_user(
        &app.pool,
        NewUser {
            login: "demo".into(),
            password: "secret".into(),
            time_zone: Some("Asia/Tokyo".into()),
            master: None,
        },
    )
    .await
    .expect("user");
    let first = seed().await.expect("seed");
    assert_eq!(
        (
            first.master.time_zone.as_str(),
            first.master.password.as_str()
        ),
        ("Asia/Tokyo", "(kept: not demo)")
    );
    assert_eq!(
        (
            first.sub_user.time_zone.as_str(),
            first.sub_user.password.as_str()
        ),
        ("Europe/Berlin", "demo")
    );
    // An API key made since is no session of the demo's (a demo logout would end it).
    service::create_user_api_key(&app.pool, &UserRef::Login("demo".into()), "sync")
        .await
        .expect("key");
    let again = seed().await.expect("seed again");
    assert_eq!(first.trackers, again.trackers);
    assert_eq!(first.master.session, again.master.session);
    assert_eq!(again.sub_user.password, "demo");
    let labels = |account: i64| {
        sqlx::query_scalar::<_, String>(
            "SELECT label FROM trackers WHERE account_id = $1 AND NOT removed ORDER BY label",
        )
        .bind(account)
        .fetch_all(&app.pool)
    };
    let before = labels(first.master.user_id).await.expect("labels");
    app.exec(&format!(
        "UPDATE trackers SET removed = true WHERE id = {}",
        first.trackers[2]
    ))
    .await;
    let third = seed().await.expect("seed after a removal");
    assert_eq!(third.trackers.len(), first.trackers.len());
    assert!(!third.trackers.contains(&first.trackers[2]));
    // The new tracker takes the removed one's label, not a second copy of the last.
    assert_eq!(labels(first.master.user_id).await.expect("labels"), before);
    // The sub-user's grants follow the labels too: the re-created tracker is granted.
    let granted_labels: Vec<String> = sqlx::query_scalar(
        "SELECT t.label FROM tracker_grants g JOIN trackers t ON t.id = g.tracker_id \
          WHERE g.user_id = $1 AND NOT t.removed ORDER BY t.label",
    )
    .bind(third.sub_user.user_id)
    .fetch_all(&app.pool)
    .await
    .expect("grants");
    assert_eq!(granted_labels, before[..6].to_vec());
    let mut sub = third.sub_user_trackers.clone();
    sub.sort();
    assert!(sub.iter().all(|id| third.trackers.contains(id)), "{sub:?}");
    // And the blocked one is still the same tracker, the only one blocked.
    assert_eq!(third.blocked_tracker, first.blocked_tracker);
    let blocked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM trackers WHERE account_id = $1 AND blocked AND NOT removed",
    )
    .bind(first.master.user_id)
    .fetch_one(&app.pool)
    .await
    .expect("count");
    assert_eq!(blocked, 1);
}

#[tokio::test]
async fn commands_share_the_operator_code_path() {
    use clap::Parser;
    let app = spawn_app().await;
    let run = |args: &[&str]| {
        let mut settings = fleetgate::config::Settings::default();
        settings.database.url = app.db_url.clone();
        settings.database.max_connections = 2;
        let cli = fleetgate::cli::Cli::parse_from(
            std::iter::once("fleetgate").chain(args.iter().copied()),
        );
        fleetgate::cli::run(cli, settings)
    };
    run(&[
        "user",
        "create",
        "bob",
        "--password",
        "pw-bob",
        "--master",
        "acme",
    ])
    .await
    .expect("user create");
    run(&["grant", "bob", "103", "104"]).await.expect("grant");
    run(&["revoke-grant", "bob", "104"])
        .await
        .expect("revoke-grant");
    let grants: Vec<i64> = sqlx::query_scalar(
        "SELECT g.tracker_id FROM tracker_grants g JOIN users u ON u.id = g.user_id \
          WHERE u.login = 'bob' ORDER BY 1",
    )
    .fetch_all(&app.pool)
    .await
    .expect("grants");
    assert_eq!(grants, [103]);
    let err = run(&["grant", "bob", "201"])
        .await
        .expect_err("foreign tracker");
    assert!(err.to_string().contains("201"), "{err}");
    run(&["user", "block", "bob"]).await.expect("block");
    post(
        &app,
        "/v2/user/auth",
        json!({"login": "bob", "password": "pw-bob"}),
    )
    .await
    .assert_error(11, 403);
    run(&["user", "unblock", "bob"]).await.expect("unblock");
    login(&app, "bob", "pw-bob").await;
    run(&["api-key", "list"]).await.expect("api-key list");
}

#[tokio::test]
async fn a_nul_character_in_a_parameter_is_code_7_not_a_database_error() {
    let app = spawn_app().await;
    post(
        &app,
        "/v2/user/auth",
        json!({"login": "a\u{0}b", "password": "x"}),
    )
    .await
    .assert_error(7, 400);
    let hash = format!("{}%00{}", &ACME[..15], &ACME[..16]);
    get(&app, &format!("/v2/user/get_info?hash={hash}"))
        .await
        .assert_error(7, 400);
    let key = api_key(&app).await;
    for (path, body) in [
        (
            "/v2/admin/session/revoke",
            json!({"session_hash": "a\u{0}"}),
        ),
        ("/v2/admin/user/block", json!({"login": "a\u{0}"})),
        (
            "/v2/admin/user/create",
            json!({"login": "nul_master", "password": "secret-pass", "master_login": "\u{0}"}),
        ),
    ] {
        admin(&app, Some(&key), path, body)
            .await
            .assert_error(7, 400);
    }
    // On a socket, a hash with one is an unknown session (code 4), not a database error.
    let mut c = app.connect().await;
    let nul_hash = format!("{}\u{0}{}", &ACME[..15], &ACME[..16]);
    let resp = c.subscribe(&nul_hash, &[101]).await;
    assert_eq!(resp["status"]["code"], 4, "{resp}");
}

#[tokio::test]
async fn an_expired_session_cannot_be_revoked() {
    let app = spawn_app().await;
    let key = api_key(&app).await;
    admin(
        &app,
        Some(&key),
        "/v2/admin/session/revoke",
        json!({"session_hash": EXPIRED}),
    )
    .await
    .assert_error(201, 400);
    admin(
        &app,
        Some(&key),
        "/v2/admin/session/revoke",
        json!({"session_hash": ACME}),
    )
    .await
    .ok();
}

#[tokio::test]
async fn health_and_ready_answer_head_requests() {
    let app = spawn_app().await;
    for path in ["/health", "/ready"] {
        let r = http(&app, "HEAD", path, &[], None).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.body.is_empty(), "{path}: {:?}", r.body);
    }
}

#[tokio::test]
async fn operator_commands_and_a_serve_that_does_not_migrate_refuse_an_unmigrated_database() {
    use clap::Parser;
    let app = spawn_app().await; // for its server
    let name = format!("fg_test_empty_{}", uuid::Uuid::new_v4().simple());
    app.exec(&format!("CREATE DATABASE {name}")).await;
    let url = app.db_url.replace(&app.db_name, &name);
    let mut settings = fleetgate::config::Settings::default();
    settings.database.url = url.clone();
    settings.database.max_connections = 2;
    settings.database.migrate_on_start = false;

    let cli = fleetgate::cli::Cli::parse_from(["fleetgate", "tracker", "block", "1"]);
    let err = fleetgate::cli::run(cli, settings.clone())
        .await
        .expect_err("an unmigrated database");
    assert!(err.to_string().contains("fleetgate migrate"), "{err}");

    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let err = match fleetgate::startup::Application::build(settings.clone(), listener).await {
        Ok(_) => panic!("serve started on an unmigrated database"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("fleetgate migrate"), "{err}");

    // Nothing was created in it; a misspelt database name is an error, not a new database.
    let pool = sqlx::PgPool::connect(&url).await.expect("connect");
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&pool)
    .await
    .expect("tables");
    assert_eq!(tables, 0);
    pool.close().await;
    settings.database.url = app.db_url.replace(&app.db_name, &format!("{name}_typo"));
    let cli = fleetgate::cli::Cli::parse_from(["fleetgate", "api-key", "list"]);
    fleetgate::cli::run(cli, settings)
        .await
        .expect_err("a database that does not exist");
    app.exec(&format!("DROP DATABASE {name}")).await;
}
