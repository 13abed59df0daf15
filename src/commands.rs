//! Commands that write to the database like any other writer would: the demo fleet, the traffic
//! simulator (through the ingest contract of `docs/ingest.md`), and operator actions. The
//! gateway learns of all of them through its LISTEN stream, never directly.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use argon2::password_hash::{rand_core::OsRng, PasswordHasher, SaltString};
use chrono::{DateTime, Utc};
use rand::Rng;
use serde::Serialize;
use sqlx::PgPool;

use crate::config::Settings;
use crate::db;
use crate::service;

/// The pool of the operator commands: the database must exist and be migrated (a misspelt
/// database name is an error, not a new empty database).
pub async fn pool(settings: &Settings) -> anyhow::Result<PgPool> {
    let pool = db::connect(&settings.database).await?;
    db::check_schema(&pool).await?;
    Ok(pool)
}

/// The pool of the demo's commands (`seed-demo`, `simulate`): the database is created and
/// migrated if needed, as `serve` does by default, so that the demo runs on an empty server.
pub async fn demo_pool(settings: &Settings) -> anyhow::Result<PgPool> {
    db::ensure_database(&settings.database.url).await?;
    let pool = db::connect(&settings.database).await?;
    db::migrate(&pool).await?;
    Ok(pool)
}

/// A new random session hash: 32 lowercase hex characters.
pub fn new_session_hash() -> String {
    let bytes: [u8; 16] = rand::thread_rng().gen();
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

pub fn hash_password(password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
}

#[derive(Debug, Serialize)]
pub struct DemoUser {
    pub login: String,
    pub password: String,
    pub session: String,
    pub user_id: i64,
    pub time_zone: String,
}

#[derive(Debug, Serialize)]
pub struct DemoFleet {
    pub master: DemoUser,
    pub sub_user: DemoUser,
    pub other: DemoUser,
    /// Every tracker of the demo account (the blocked one included).
    pub trackers: Vec<i64>,
    /// The trackers granted to the sub-user.
    pub sub_user_trackers: Vec<i64>,
    pub other_account_tracker: i64,
    pub blocked_tracker: i64,
}

impl DemoFleet {
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (what, u) in [
            ("master account", &self.master),
            ("sub-user (partial grant)", &self.sub_user),
            ("another account", &self.other),
        ] {
            let _ = writeln!(
                s,
                "{what:<26} login {:<10} password {:<6} session {}  (zone {})",
                u.login, u.password, u.session, u.time_zone
            );
        }
        let _ = writeln!(s, "demo trackers             {:?}", self.trackers);
        let _ = writeln!(s, "granted to the sub-user   {:?}", self.sub_user_trackers);
        let _ = writeln!(s, "blocked tracker           {}", self.blocked_tracker);
        let _ = writeln!(
            s,
            "other account's tracker   {}",
            self.other_account_tracker
        );
        s
    }
}

const DEMO_PASSWORD: &str = "demo";
const DEMO_TRACKERS: usize = 12;

/// A demo user: its id, and its time zone and password as the demo may print them.
struct Seeded {
    id: i64,
    time_zone: String,
    password: String,
}

/// What `seed-demo` prints as the password of a user that existed with another one.
const PASSWORD_KEPT: &str = "(kept: not demo)";

async fn ensure_user(
    tx: &mut sqlx::PgConnection,
    login: &str,
    master: Option<i64>,
    tz: &str,
) -> anyhow::Result<Seeded> {
    if let Some((id, time_zone, stored)) = sqlx::query_as::<_, (i64, String, String)>(
        "SELECT id, time_zone, password_hash FROM users WHERE login = $1",
    )
    .bind(login)
    .fetch_optional(&mut *tx)
    .await?
    {
        // A demo user someone blocked or removed is restored, so the demo works again.
        sqlx::query(
            "UPDATE users SET blocked = false, removed = false WHERE id = $1 AND (blocked OR removed)",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        // Its zone and password are left as they are, and told as they are.
        let password = if crate::service::verify_password(DEMO_PASSWORD, Some(&stored)) {
            DEMO_PASSWORD
        } else {
            PASSWORD_KEPT
        };
        return Ok(Seeded {
            id,
            time_zone,
            password: password.into(),
        });
    }
    let id = sqlx::query_scalar(
        "INSERT INTO users (login, password_hash, master_id, time_zone) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(login)
    .bind(hash_password(DEMO_PASSWORD)?)
    .bind(master)
    .bind(tz)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Seeded {
        id,
        time_zone: tz.into(),
        password: DEMO_PASSWORD.into(),
    })
}

async fn ensure_session(tx: &mut sqlx::PgConnection, user_id: i64) -> anyhow::Result<String> {
    let live: Option<String> = sqlx::query_scalar(
        "SELECT hash FROM sessions WHERE user_id = $1 AND revoked_at IS NULL \
           AND api_key_name IS NULL AND expires_at > now() + interval '1 day' \
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(user_id)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(h) = live {
        return Ok(h);
    }
    let hash = new_session_hash();
    sqlx::query("INSERT INTO sessions (hash, user_id) VALUES ($1, $2)")
        .bind(&hash)
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
    Ok(hash)
}

async fn ensure_trackers(
    tx: &mut sqlx::PgConnection,
    account: i64,
    prefix: &str,
    count: usize,
    source_base: i64,
    center: (f64, f64),
) -> anyhow::Result<Vec<i64>> {
    let mut ids: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM trackers WHERE account_id = $1 AND NOT removed ORDER BY id",
    )
    .bind(account)
    .fetch_all(&mut *tx)
    .await?;
    // Labels in use, so that a tracker added after one was removed takes the free number
    // instead of repeating the last one.
    let labels: Vec<String> =
        sqlx::query_scalar("SELECT label FROM trackers WHERE account_id = $1 AND NOT removed")
            .bind(account)
            .fetch_all(&mut *tx)
            .await?;
    let mut free = (1..).filter(|n| !labels.contains(&format!("{prefix} {n:02}")));
    let mut rng = rand::thread_rng();
    while ids.len() < count {
        let n = free.next().unwrap_or(ids.len() + 1);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO trackers (account_id, source_id, label) \
             VALUES ($1, (SELECT GREATEST($2, COALESCE(max(source_id), 0) + 1) FROM trackers), $3) RETURNING id",
        )
        .bind(account)
        .bind(source_base)
        .bind(format!("{prefix} {n:02}"))
        .fetch_one(&mut *tx)
        .await?;
        let lat = center.0 + rng.gen_range(-0.08..0.08);
        let lng = center.1 + rng.gen_range(-0.12..0.12);
        sqlx::query(
            "INSERT INTO tracker_states (tracker_id, gps_updated, gps_signal_level, lat, lng, heading, \
               speed, alt, connection_status, movement_status, movement_status_update, ignition, \
               ignition_update, gsm_updated, gsm_signal_level, gsm_network_name, gsm_roaming, \
               last_update, battery_level, battery_update, inputs, inputs_update, outputs, \
               outputs_update, additional) \
             VALUES ($1, now(), 100, $2, $3, $4, 0, 34, 'active', 'parked', now(), false, now(), \
               now(), 80, 'Demo GSM', false, now(), 97, now(), '{false,false,true}', now(), \
               '{true,false}', now(), jsonb_build_object('hardware_key', \
               jsonb_build_object('value', $5::text, 'updated', now())))",
        )
        .bind(id)
        .bind(lat)
        .bind(lng)
        .bind(rng.gen_range(0..360) as i16)
        .bind(format!("{:020}", rng.gen::<u64>()))
        .execute(&mut *tx)
        .await?;
        ids.push(id);
    }
    Ok(ids)
}

/// Creates the demo fleet, or finds it again: running it twice gives the same accounts and
/// trackers (and the same sessions while they are live).
pub async fn seed_demo(pool: &PgPool) -> anyhow::Result<DemoFleet> {
    let mut tx = pool.begin().await?;
    // Serialise concurrent seeders.
    sqlx::query("SELECT pg_advisory_xact_lock(727274)")
        .execute(&mut *tx)
        .await?;
    let master_user = ensure_user(&mut tx, "demo", None, "Europe/Berlin").await?;
    let master = master_user.id;
    let sub_user = ensure_user(&mut tx, "demo-sub", Some(master), "Europe/Berlin").await?;
    let sub = sub_user.id;
    let other_user = ensure_user(&mut tx, "other", None, "America/New_York").await?;
    let other = other_user.id;
    let trackers = ensure_trackers(
        &mut tx,
        master,
        "Truck",
        DEMO_TRACKERS,
        100_001,
        (52.52, 13.405),
    )
    .await?;
    let others = ensure_trackers(&mut tx, other, "Van", 1, 900_001, (40.73, -73.99)).await?;
    // A fuel and a temperature sensor with a reading on every demo tracker (once).
    let all: Vec<i64> = trackers.iter().chain(&others).copied().collect();
    sqlx::query(
        "WITH added AS ( \
           INSERT INTO sensors (tracker_id, name, label, type, units, units_type, min_value, max_value) \
           SELECT t.id, x.name, x.label, x.type, x.units, x.units_type, x.lo, x.hi \
             FROM unnest($1::bigint[]) AS t(id) \
            CROSS JOIN (VALUES ('fuel_1', 'Fuel tank', 'fuel', 'l', 'litre', 0.0::float8, 400.0::float8), \
                               ('temp_1', 'Engine', 'temperature', 'C', 'celsius', -40.0, 150.0)) \
                  AS x(name, label, type, units, units_type, lo, hi) \
            WHERE NOT EXISTS (SELECT 1 FROM sensors s WHERE s.tracker_id = t.id AND s.type = x.type) \
           RETURNING id, tracker_id, type) \
         INSERT INTO sensor_values (tracker_id, sensor_id, value) \
         SELECT tracker_id, id, CASE type WHEN 'fuel' THEN 300 ELSE 20 END FROM added",
    )
    .bind(&all)
    .execute(&mut *tx)
    .await?;
    // The first half by label, so that a tracker re-created after a removal takes its place.
    let granted: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM trackers WHERE account_id = $1 AND NOT removed ORDER BY label, id LIMIT $2",
    )
    .bind(master)
    .bind((DEMO_TRACKERS / 2) as i64)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO tracker_grants (user_id, tracker_id) SELECT $1, unnest($2::bigint[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(sub)
    .bind(&granted)
    .execute(&mut *tx)
    .await?;
    // The blocked one is the last by label, so that it stays the same tracker when an earlier
    // one was removed and re-created.
    let last_label = format!("Truck {DEMO_TRACKERS:02}");
    let blocked: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM trackers WHERE account_id = $1 AND NOT removed AND label = $2 \
         ORDER BY id LIMIT 1",
    )
    .bind(master)
    .bind(&last_label)
    .fetch_optional(&mut *tx)
    .await?;
    let blocked = match blocked {
        Some(id) => id,
        None => *trackers.last().context("demo account has no trackers")?,
    };
    sqlx::query("UPDATE trackers SET blocked = true WHERE id = $1 AND NOT blocked")
        .bind(blocked)
        .execute(&mut *tx)
        .await?;
    let user = |login: &str, seeded: Seeded, session: String| DemoUser {
        login: login.into(),
        password: seeded.password,
        session,
        user_id: seeded.id,
        time_zone: seeded.time_zone,
    };
    let fleet = DemoFleet {
        master: user("demo", master_user, ensure_session(&mut tx, master).await?),
        sub_user: user("demo-sub", sub_user, ensure_session(&mut tx, sub).await?),
        other: user("other", other_user, ensure_session(&mut tx, other).await?),
        trackers,
        sub_user_trackers: granted,
        other_account_tracker: others[0],
        blocked_tracker: blocked,
    };
    tx.commit().await?;
    Ok(fleet)
}

// --- simulator -----------------------------------------------------------------------------------

/// One simulated vehicle.
#[derive(Debug, Clone)]
struct Vehicle {
    id: i64,
    lat: f64,
    lng: f64,
    heading: f64,
    speed: f64,
    moving: bool,
    since: DateTime<Utc>,
    last: Instant,
    battery: f64,
    /// The tracker's fuel and temperature sensors (seed-demo) and their values.
    fuel_sensor: Option<i64>,
    temp_sensor: Option<i64>,
    fuel: f64,
    temp: f64,
}

impl Vehicle {
    /// Advances the vehicle to now: drive along the heading with a gently wandering course and
    /// speed; now and then stop (a delivery) and start again.
    fn step(&mut self, rng: &mut impl Rng) {
        let dt = self.last.elapsed().as_secs_f64().min(30.0);
        self.last = Instant::now();
        if self.moving {
            self.heading = (self.heading + rng.gen_range(-20.0..20.0)).rem_euclid(360.0);
            self.speed = (self.speed + rng.gen_range(-8.0..8.0)).clamp(15.0, 90.0);
            let meters = self.speed / 3.6 * dt;
            let rad = self.heading.to_radians();
            self.lat += meters * rad.cos() / 111_320.0;
            self.lng += meters * rad.sin() / (111_320.0 * self.lat.to_radians().cos().max(0.01));
            self.lat = self.lat.clamp(-85.0, 85.0);
            self.lng = (self.lng + 180.0).rem_euclid(360.0) - 180.0;
            if rng.gen_bool(0.03) {
                self.moving = false;
                self.speed = 0.0;
                self.since = Utc::now();
            }
        } else if rng.gen_bool(0.15) {
            self.moving = true;
            self.speed = rng.gen_range(20.0..50.0);
            self.since = Utc::now();
        }
        self.battery = (self.battery - 0.01).max(20.0);
        self.fuel = if self.fuel < 40.0 {
            380.0
        } else {
            self.fuel - self.speed * dt / 3600.0 * 0.3
        };
        self.temp = (self.temp + rng.gen_range(-0.5..0.5) + if self.moving { 0.5 } else { -0.5 })
            .clamp(15.0, 95.0);
    }
}

/// The batched ingest statement of `docs/ingest.md`: one upsert for many trackers.
pub const INGEST_UPSERT: &str = "INSERT INTO tracker_states AS s (tracker_id, gps_updated, \
    gps_signal_level, lat, lng, heading, speed, alt, connection_status, movement_status, \
    movement_status_update, ignition, ignition_update, last_update, battery_level, battery_update) \
  SELECT u.tracker_id, u.t, 100, u.lat, u.lng, u.heading, u.speed, 34, 'active', u.movement, \
         u.movement_since, u.ignition, u.movement_since, u.t, u.battery, u.t \
    FROM unnest($1::bigint[], $2::float8[], $3::float8[], $4::int2[], $5::int4[], $6::text[], \
                $7::timestamptz[], $8::bool[], $9::int2[], $10::timestamptz[]) \
         AS u(tracker_id, lat, lng, heading, speed, movement, movement_since, ignition, battery, t) \
  ON CONFLICT (tracker_id) DO UPDATE SET gps_updated = EXCLUDED.gps_updated, \
    gps_signal_level = EXCLUDED.gps_signal_level, lat = EXCLUDED.lat, lng = EXCLUDED.lng, \
    heading = EXCLUDED.heading, speed = EXCLUDED.speed, alt = EXCLUDED.alt, \
    connection_status = EXCLUDED.connection_status, movement_status = EXCLUDED.movement_status, \
    movement_status_update = EXCLUDED.movement_status_update, ignition = EXCLUDED.ignition, \
    ignition_update = EXCLUDED.ignition_update, last_update = EXCLUDED.last_update, \
    battery_level = EXCLUDED.battery_level, battery_update = EXCLUDED.battery_update";

/// The batched readings statement of `docs/ingest.md` ("Readings"): one upsert for many sensors.
pub const READINGS_UPSERT: &str = "INSERT INTO sensor_values AS v (tracker_id, sensor_id, value, \
    converted_value, update_time) \
  SELECT s.tracker_id, u.sensor_id, u.value, u.converted_value, u.t \
    FROM unnest($1::bigint[], $2::float8[], $3::float8[], $4::timestamptz[]) \
         AS u(sensor_id, value, converted_value, t) \
    JOIN sensors s ON s.id = u.sensor_id \
  ON CONFLICT (tracker_id, sensor_id) DO UPDATE SET value = EXCLUDED.value, \
    converted_value = EXCLUDED.converted_value, update_time = EXCLUDED.update_time";

/// Whether a write failed on a foreign key (SQLSTATE 23503): a row it names is gone.
fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.code().as_deref() == Some("23503"))
}

async fn write_batch(pool: &PgPool, batch: &[&Vehicle]) -> Result<(), sqlx::Error> {
    let now = Utc::now();
    let ids: Vec<i64> = batch.iter().map(|v| v.id).collect();
    let lat: Vec<f64> = batch.iter().map(|v| v.lat).collect();
    let lng: Vec<f64> = batch.iter().map(|v| v.lng).collect();
    let heading: Vec<i16> = batch
        .iter()
        .map(|v| v.heading.round() as i16 % 360)
        .collect();
    let speed: Vec<i32> = batch.iter().map(|v| v.speed.round() as i32).collect();
    let movement: Vec<&str> = batch
        .iter()
        .map(|v| if v.moving { "moving" } else { "parked" })
        .collect();
    let since: Vec<DateTime<Utc>> = batch.iter().map(|v| v.since).collect();
    let ignition: Vec<bool> = batch.iter().map(|v| v.moving).collect();
    let battery: Vec<i16> = batch.iter().map(|v| v.battery.round() as i16).collect();
    let t: Vec<DateTime<Utc>> = vec![now; batch.len()];
    let mut tx = pool.begin().await?;
    sqlx::query(INGEST_UPSERT)
        .bind(&ids)
        .bind(&lat)
        .bind(&lng)
        .bind(&heading)
        .bind(&speed)
        .bind(&movement)
        .bind(&since)
        .bind(&ignition)
        .bind(&battery)
        .bind(&t)
        .execute(&mut *tx)
        .await?;
    let readings: Vec<(i64, f64)> = batch
        .iter()
        .flat_map(|v| [(v.fuel_sensor, v.fuel), (v.temp_sensor, v.temp)])
        .filter_map(|(s, value)| Some((s?, (value * 10.0).round() / 10.0)))
        .collect();
    if !readings.is_empty() {
        let (sensors, values): (Vec<i64>, Vec<f64>) = readings.into_iter().unzip();
        sqlx::query(READINGS_UPSERT)
            .bind(&sensors)
            .bind(&values)
            .bind(vec![None::<f64>; sensors.len()])
            .bind(vec![now; sensors.len()])
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Moves trackers at `rate` updates a second (over all trackers), in batches every 100 ms.
pub async fn simulate(
    pool: &PgPool,
    rate: f64,
    account: Option<&str>,
    seconds: Option<f64>,
) -> anyhow::Result<()> {
    if !(rate > 0.0 && rate.is_finite()) {
        bail!("--rate must be a positive number");
    }
    if seconds.is_some_and(|s| !(s > 0.0 && s.is_finite())) {
        bail!("--seconds must be a positive number");
    }
    #[derive(sqlx::FromRow)]
    struct Start {
        id: i64,
        lat: Option<f64>,
        lng: Option<f64>,
        heading: Option<i16>,
        fuel_sensor: Option<i64>,
        temp_sensor: Option<i64>,
    }
    let rows: Vec<Start> = sqlx::query_as(
        "SELECT t.id, s.lat, s.lng, s.heading, \
           (SELECT min(id) FROM sensors WHERE tracker_id = t.id AND type = 'fuel') AS fuel_sensor, \
           (SELECT min(id) FROM sensors WHERE tracker_id = t.id AND type = 'temperature') AS temp_sensor \
           FROM trackers t \
           JOIN users u ON u.id = t.account_id \
           LEFT JOIN tracker_states s ON s.tracker_id = t.id \
          WHERE NOT t.removed AND ($1::text IS NULL OR u.login = $1) ORDER BY t.id",
    )
    .bind(account)
    .fetch_all(pool)
    .await?;
    if rows.is_empty() {
        match account {
            Some(login) => bail!(
                "no trackers to simulate in account `{login}` (the login of a master account \
                 that has trackers)"
            ),
            None => bail!("no trackers to simulate (run `fleetgate seed-demo` first)"),
        }
    }
    let mut rng = rand::thread_rng();
    let mut fleet: Vec<Vehicle> = rows
        .into_iter()
        .map(|r| Vehicle {
            id: r.id,
            lat: r.lat.unwrap_or(52.52),
            lng: r.lng.unwrap_or(13.405),
            heading: f64::from(r.heading.unwrap_or(0)),
            speed: rng.gen_range(20.0..60.0),
            moving: rng.gen_bool(0.8),
            since: Utc::now(),
            last: Instant::now(),
            battery: 97.0,
            fuel_sensor: r.fuel_sensor,
            temp_sensor: r.temp_sensor,
            fuel: rng.gen_range(100.0..380.0),
            temp: rng.gen_range(20.0..80.0),
        })
        .collect();
    let tick = Duration::from_millis(100);
    // Each tracker moves at most once a tick.
    let most = fleet.len() as f64 / tick.as_secs_f64();
    if rate > most {
        eprintln!(
            "simulating {} trackers at {most} updates/s, not {rate}: each tracker moves at most \
             once every {} ms (Ctrl-C to stop)",
            fleet.len(),
            tick.as_millis()
        );
    } else {
        eprintln!(
            "simulating {} trackers at {rate} updates/s (Ctrl-C to stop)",
            fleet.len()
        );
    }
    let started = Instant::now();
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut owed = 0.0f64;
    let mut cursor = 0usize;
    let mut written = 0u64;
    // SIGTERM as Ctrl-C: stop and say what was written.
    let stop = crate::cli::wait_for_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = &mut stop => break,
        }
        if seconds.is_some_and(|s| started.elapsed().as_secs_f64() >= s) {
            break;
        }
        owed += rate * tick.as_secs_f64();
        let n = (owed.floor() as usize).min(fleet.len());
        if n == 0 {
            continue;
        }
        owed -= n as f64;
        let mut picked = Vec::with_capacity(n);
        for _ in 0..n {
            let i = cursor % fleet.len();
            cursor += 1;
            fleet[i].step(&mut rng);
            picked.push(i);
        }
        let batch: Vec<&Vehicle> = picked.iter().map(|&i| &fleet[i]).collect();
        match write_batch(pool, &batch).await {
            Ok(()) => written += n as u64,
            Err(e) if is_foreign_key_violation(&e) => {
                // A tracker or a sensor deleted meanwhile: every batch naming it would fail.
                // Carry on with what is left.
                let before = fleet.len();
                let ids: Vec<i64> = fleet.iter().map(|v| v.id).collect();
                let left: Vec<(i64, Option<i64>, Option<i64>)> = match sqlx::query_as(
                    "SELECT t.id, \
                       (SELECT min(id) FROM sensors WHERE tracker_id = t.id AND type = 'fuel'), \
                       (SELECT min(id) FROM sensors WHERE tracker_id = t.id AND type = 'temperature') \
                       FROM trackers t WHERE t.id = ANY($1)",
                )
                .bind(&ids)
                .fetch_all(pool)
                .await
                {
                    Ok(rows) => rows,
                    Err(e) => {
                        eprintln!("write failed (will keep trying): {e}");
                        continue;
                    }
                };
                let left: std::collections::HashMap<i64, (Option<i64>, Option<i64>)> = left
                    .into_iter()
                    .map(|(id, fuel, temp): (i64, Option<i64>, Option<i64>)| (id, (fuel, temp)))
                    .collect();
                fleet.retain_mut(|v| match left.get(&v.id) {
                    Some(&(fuel, temp)) => {
                        v.fuel_sensor = fuel;
                        v.temp_sensor = temp;
                        true
                    }
                    None => false,
                });
                if fleet.is_empty() {
                    bail!("every simulated tracker was deleted");
                }
                eprintln!(
                    "a tracker or sensor was deleted ({} tracker(s) gone); simulating {}",
                    before - fleet.len(),
                    fleet.len()
                );
            }
            Err(e) => eprintln!("write failed (will keep trying): {e}"),
        }
    }
    eprintln!("wrote {written} states");
    Ok(())
}

// --- operator actions ------------------------------------------------------------------------------
// The rules live in `service`, shared with the HTTP operator API; these keep the command-line
// signatures.

pub use crate::service::TrackerOp;

pub async fn tracker_op(pool: &PgPool, id: i64, op: TrackerOp) -> anyhow::Result<()> {
    Ok(service::tracker_op(pool, id, op).await?)
}

pub async fn revoke_session(pool: &PgPool, hash: &str) -> anyhow::Result<()> {
    Ok(service::revoke_session(pool, hash).await?)
}
