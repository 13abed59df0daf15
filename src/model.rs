//! Domain types shared by the database layer, the hub and the sockets: a tracker's state as read
//! from `tracker_states`, and its rendering into the protocol's `state` event (full or compact,
//! dates in the session user's time zone). Owns no I/O.

use std::fmt::Write as _;

use chrono::{DateTime, Datelike, Offset, Timelike, Utc};
use chrono_tz::Tz;
use serde::ser::{Serialize, SerializeMap, Serializer};

pub type TrackerId = i64;

/// The output format of a state subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Full,
    Compact,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "full" => Some(Format::Full),
            "compact" => Some(Format::Compact),
            _ => None,
        }
    }
}

/// Everything that changes the bytes of a state event besides the state itself. Events are
/// serialized once per distinct variant, and the same bytes go to every subscriber of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Variant {
    pub format: Format,
    pub tz: Tz,
    pub iso: bool,
}

impl Variant {
    pub fn date(&self, t: DateTime<Utc>) -> String {
        let mut out = String::with_capacity(25);
        self.write_date(&mut out, t);
        out
    }

    /// Appends `t` in this variant's zone and form: `YYYY-MM-DD HH:MM:SS`, or ISO 8601 with the
    /// offset (`YYYY-MM-DDTHH:MM:SS+HH:MM`). A state event holds about ten date-times, so the
    /// digits are written directly instead of through chrono's format-string parser (which
    /// was a tenth of the gateway's CPU time in the benchmark's profile); the rare values
    /// outside that fast path (years beyond 0–9999, offsets with seconds) go through chrono.
    pub fn write_date(&self, out: &mut String, t: DateTime<Utc>) {
        let local = t.with_timezone(&self.tz);
        let offset = local.offset().fix().local_minus_utc();
        let n = local.naive_local();
        if !(0..=9999).contains(&n.year()) || (self.iso && offset % 60 != 0) {
            let f = if self.iso {
                "%Y-%m-%dT%H:%M:%S%:z"
            } else {
                "%Y-%m-%d %H:%M:%S"
            };
            let _ = write!(out, "{}", local.format(f));
            return;
        }
        fn two(out: &mut String, v: u32) {
            out.push(char::from(b'0' + (v / 10 % 10) as u8));
            out.push(char::from(b'0' + (v % 10) as u8));
        }
        let y = n.year() as u32; // 0..=9999, checked above
        two(out, y / 100);
        two(out, y % 100);
        out.push('-');
        two(out, n.month());
        out.push('-');
        two(out, n.day());
        out.push(if self.iso { 'T' } else { ' ' });
        two(out, n.hour());
        out.push(':');
        two(out, n.minute());
        out.push(':');
        two(out, n.second());
        if self.iso {
            out.push(if offset < 0 { '-' } else { '+' });
            let m = offset.unsigned_abs() / 60;
            two(out, m / 60);
            out.push(':');
            two(out, m % 60);
        }
    }

    fn opt_date(&self, t: Option<DateTime<Utc>>) -> Option<String> {
        t.map(|t| self.date(t))
    }
}

/// The latest state of one tracker: one row of `tracker_states` plus the tracker's `source_id`.
/// Read from rows selecting [`STATE_COLUMNS`] (see the `FromRow` impl below).
#[derive(Debug, Clone, PartialEq)]
pub struct TrackerState {
    pub tracker_id: i64,
    pub source_id: i64,
    pub change_no: i64,
    pub gps_updated: Option<DateTime<Utc>>,
    pub gps_signal_level: Option<i16>,
    pub lat: f64,
    pub lng: f64,
    pub heading: i16,
    pub speed: i32,
    pub alt: i32,
    pub gps_precision: Option<i32>,
    pub gsm_lbs: Option<bool>,
    pub connection_status: String,
    pub movement_status: String,
    pub movement_status_update: Option<DateTime<Utc>>,
    pub ignition: bool,
    pub ignition_update: Option<DateTime<Utc>>,
    pub gsm_updated: Option<DateTime<Utc>>,
    pub gsm_signal_level: Option<i16>,
    pub gsm_network_name: Option<String>,
    pub gsm_roaming: Option<bool>,
    pub last_update: DateTime<Utc>,
    pub battery_level: Option<i16>,
    pub battery_update: Option<DateTime<Utc>>,
    pub inputs: Vec<bool>,
    pub inputs_update: Option<DateTime<Utc>>,
    pub outputs: Vec<bool>,
    pub outputs_update: Option<DateTime<Utc>>,
    pub additional: serde_json::Value,
    pub actual_track_update: Option<DateTime<Utc>>,
}

/// The columns of [`TrackerState`] after `tracker_id` and `source_id`.
macro_rules! state_columns_after_source {
    () => {
        "s.change_no, s.gps_updated, \
    s.gps_signal_level, s.lat, s.lng, s.heading, s.speed, s.alt, s.gps_precision, s.gsm_lbs, \
    s.connection_status, s.movement_status, s.movement_status_update, s.ignition, \
    s.ignition_update, s.gsm_updated, s.gsm_signal_level, s.gsm_network_name, s.gsm_roaming, \
    s.last_update, s.battery_level, s.battery_update, s.inputs, s.inputs_update, s.outputs, \
    s.outputs_update, s.additional, s.actual_track_update"
    };
}

/// The columns of [`TrackerState`], for queries over [`STATE_FROM`].
pub const STATE_COLUMNS: &str =
    concat!("s.tracker_id, t.source_id, ", state_columns_after_source!());

/// The columns of [`TrackerState`] from `tracker_states s` alone, `source_id` left 0.
pub const STATE_COLUMNS_SOURCE_UNREAD: &str = concat!(
    "s.tracker_id, 0::int8 AS source_id, ",
    state_columns_after_source!()
);

/// The tables behind [`STATE_COLUMNS`]: each state with its tracker's source id, looked up by
/// primary key. A plain `JOIN trackers t` let the planner hash-join a seq scan of the whole
/// `trackers` table for every chunk the event processor reads: with 100,000 trackers, 21 ms
/// for 2,000 random ids and 31 ms for a subscribe's 10,000, against 9 and 21 ms this way (the
/// `LIMIT` keeps the lateral lookup from being flattened back into that join). Every state has
/// its tracker (foreign key), so the rows are those of the inner join.
pub const STATE_FROM: &str = "tracker_states s CROSS JOIN LATERAL \
    (SELECT tr.source_id FROM trackers tr WHERE tr.id = s.tracker_id LIMIT 1) t";

/// The field names of [`TrackerState`], in the order of [`STATE_COLUMNS`].
const STATE_FIELDS: [&str; 30] = [
    "tracker_id",
    "source_id",
    "change_no",
    "gps_updated",
    "gps_signal_level",
    "lat",
    "lng",
    "heading",
    "speed",
    "alt",
    "gps_precision",
    "gsm_lbs",
    "connection_status",
    "movement_status",
    "movement_status_update",
    "ignition",
    "ignition_update",
    "gsm_updated",
    "gsm_signal_level",
    "gsm_network_name",
    "gsm_roaming",
    "last_update",
    "battery_level",
    "battery_update",
    "inputs",
    "inputs_update",
    "outputs",
    "outputs_update",
    "additional",
    "actual_track_update",
];

/// Reads a row of [`STATE_COLUMNS`] by position. The derived impl looked every column up by
/// name (a hash of the name per column per row), a measurable share of the processor's time
/// when a round reads tens of thousands of rows. A row whose columns are not
/// [`STATE_COLUMNS`] is refused rather than misread.
impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for TrackerState {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        use sqlx::{Column, Row};
        let columns = row.columns();
        if columns.len() != STATE_FIELDS.len()
            || columns[0].name() != STATE_FIELDS[0]
            || columns[29].name() != STATE_FIELDS[29]
        {
            return Err(sqlx::Error::ColumnNotFound(
                "a TrackerState row must select STATE_COLUMNS".into(),
            ));
        }
        Ok(TrackerState {
            tracker_id: row.try_get(0)?,
            source_id: row.try_get(1)?,
            change_no: row.try_get(2)?,
            gps_updated: row.try_get(3)?,
            gps_signal_level: row.try_get(4)?,
            lat: row.try_get(5)?,
            lng: row.try_get(6)?,
            heading: row.try_get(7)?,
            speed: row.try_get(8)?,
            alt: row.try_get(9)?,
            gps_precision: row.try_get(10)?,
            gsm_lbs: row.try_get(11)?,
            connection_status: row.try_get(12)?,
            movement_status: row.try_get(13)?,
            movement_status_update: row.try_get(14)?,
            ignition: row.try_get(15)?,
            ignition_update: row.try_get(16)?,
            gsm_updated: row.try_get(17)?,
            gsm_signal_level: row.try_get(18)?,
            gsm_network_name: row.try_get(19)?,
            gsm_roaming: row.try_get(20)?,
            last_update: row.try_get(21)?,
            battery_level: row.try_get(22)?,
            battery_update: row.try_get(23)?,
            inputs: row.try_get(24)?,
            inputs_update: row.try_get(25)?,
            outputs: row.try_get(26)?,
            outputs_update: row.try_get(27)?,
            additional: row.try_get(28)?,
            actual_track_update: row.try_get(29)?,
        })
    }
}

/// A source state rendered for one [`Variant`].
pub struct SourceState<'a> {
    pub state: &'a TrackerState,
    pub variant: Variant,
}

struct Gps<'a>(&'a TrackerState, Variant);
struct Location(f64, f64);
struct Gsm<'a>(&'a TrackerState, Variant);
struct Additional<'a>(&'a serde_json::Value, Variant);

impl Serialize for Location {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("lat", &self.0)?;
        m.serialize_entry("lng", &self.1)?;
        m.end()
    }
}

impl Serialize for Gps<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (st, v) = (self.0, self.1);
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("updated", &v.opt_date(st.gps_updated))?;
        m.serialize_entry("signal_level", &st.gps_signal_level)?;
        m.serialize_entry("location", &Location(st.lat, st.lng))?;
        m.serialize_entry("heading", &st.heading)?;
        m.serialize_entry("speed", &st.speed)?;
        m.serialize_entry("alt", &st.alt)?;
        if let Some(p) = st.gps_precision {
            m.serialize_entry("precision", &p)?;
        }
        if let Some(lbs) = st.gsm_lbs {
            m.serialize_entry("gsm_lbs", &lbs)?;
        }
        m.end()
    }
}

impl Serialize for Gsm<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (st, v) = (self.0, self.1);
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("updated", &v.opt_date(st.gsm_updated))?;
        m.serialize_entry("signal_level", &st.gsm_signal_level)?;
        m.serialize_entry("network_name", &st.gsm_network_name)?;
        m.serialize_entry("roaming", &st.gsm_roaming)?;
        m.end()
    }
}

impl Serialize for Additional<'_> {
    // Each value is {"value": …, "updated": <timestamptz>}; `updated` is re-rendered in the
    // user's zone when it parses as a date-time and passed through otherwise.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Some(map) = self.0.as_object() else {
            return s.serialize_map(Some(0))?.end();
        };
        let mut m = s.serialize_map(Some(map.len()))?;
        for (key, item) in map {
            match item.as_object() {
                Some(obj) => m.serialize_entry(key, &AdditionalItem(obj, self.1))?,
                None => m.serialize_entry(key, item)?,
            }
        }
        m.end()
    }
}

/// One `additional` value, serialized in place (no copy of the map): `updated` re-rendered
/// when it parses as an RFC 3339 date-time, every other field as stored.
struct AdditionalItem<'a>(&'a serde_json::Map<String, serde_json::Value>, Variant);

impl Serialize for AdditionalItem<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (key, value) in self.0 {
            if key == "updated" {
                if let serde_json::Value::String(u) = value {
                    if let Ok(t) = DateTime::parse_from_rfc3339(u) {
                        m.serialize_entry(key, &self.1.date(t.with_timezone(&Utc)))?;
                        continue;
                    }
                }
            }
            m.serialize_entry(key, value)?;
        }
        m.end()
    }
}

impl Serialize for SourceState<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (st, v) = (self.state, self.variant);
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("source_id", &st.source_id)?;
        m.serialize_entry("gps", &Gps(st, v))?;
        m.serialize_entry("connection_status", &st.connection_status)?;
        m.serialize_entry("movement_status", &st.movement_status)?;
        m.serialize_entry(
            "movement_status_update",
            &v.opt_date(st.movement_status_update),
        )?;
        m.serialize_entry("ignition", &st.ignition)?;
        m.serialize_entry("ignition_update", &v.opt_date(st.ignition_update))?;
        if v.format == Format::Full {
            m.serialize_entry("gsm", &Gsm(st, v))?;
        }
        m.serialize_entry("last_update", &v.date(st.last_update))?;
        if v.format == Format::Full {
            m.serialize_entry("battery_level", &st.battery_level)?;
            m.serialize_entry("battery_update", &v.opt_date(st.battery_update))?;
            m.serialize_entry("inputs", &st.inputs)?;
            m.serialize_entry("inputs_update", &v.opt_date(st.inputs_update))?;
            m.serialize_entry("outputs", &st.outputs)?;
            m.serialize_entry("outputs_update", &v.opt_date(st.outputs_update))?;
            m.serialize_entry("additional", &Additional(&st.additional, v))?;
            m.serialize_entry("actual_track_update", &v.opt_date(st.actual_track_update))?;
        }
        m.end()
    }
}

/// Renders a complete `state` event frame:
/// `{"type":"event","event":"state","user_time":…,"tracker_id":…,"data":{…}}`.
pub fn state_event(state: &TrackerState, variant: Variant, now: DateTime<Utc>) -> String {
    let mut out = String::with_capacity(if variant.format == Format::Full {
        900
    } else {
        420
    });
    out.push_str(r#"{"type":"event","event":"state","user_time":""#);
    out.push_str(&variant.date(now));
    let _ = write!(out, r#"","tracker_id":{},"data":"#, state.tracker_id);
    // Serializing plain structs of numbers, strings and JSON values cannot fail.
    if let Ok(data) = serde_json::to_string(&SourceState { state, variant }) {
        out.push_str(&data);
    }
    out.push('}');
    out
}

/// Appends one `state_batch` item, `{"type":"source_state_event","tracker_id":…,"state":{…}}`
/// (`tracker_id` is an extension, as in `state` events), to a batch being rendered. Written in
/// place: a batch of 100,000 items allocated and copied each item twice more before.
pub fn write_batch_item(out: &mut Vec<u8>, state: &TrackerState, variant: Variant) {
    use std::io::Write as _;
    let _ = write!(
        out,
        r#"{{"type":"source_state_event","tracker_id":{},"state":"#,
        state.tracker_id
    );
    if serde_json::to_writer(&mut *out, &SourceState { state, variant }).is_err() {
        out.extend_from_slice(b"null");
    }
    out.push(b'}');
}

/// The start of a batch event frame, up to its `data` array: `{"type":"event","event":…,
/// "user_time":…,"data":`. The caller appends the array and the closing `}`.
pub fn write_batch_head(out: &mut Vec<u8>, event: &str, variant: Variant, now: DateTime<Utc>) {
    use std::io::Write as _;
    let _ = write!(
        out,
        r#"{{"type":"event","event":"{event}","user_time":"{}","data":"#,
        variant.date(now)
    );
}

/// A batch event frame around an already rendered JSON array of items.
pub fn batch_event(event: &str, items: &str, variant: Variant, now: DateTime<Utc>) -> String {
    let mut out = String::with_capacity(items.len() + 96);
    let _ = write!(
        out,
        r#"{{"type":"event","event":"{event}","user_time":"{}","data":"#,
        variant.date(now)
    );
    out.push_str(items);
    out.push('}');
    out
}

/// A lifecycle event kind, as written by the database triggers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Block,
    Unblock,
    Corrupt,
}

impl Lifecycle {
    pub fn parse(s: &str) -> Option<Lifecycle> {
        match s {
            "block" => Some(Lifecycle::Block),
            "unblock" => Some(Lifecycle::Unblock),
            "corrupt" => Some(Lifecycle::Corrupt),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Block => "block",
            Lifecycle::Unblock => "unblock",
            Lifecycle::Corrupt => "corrupt",
        }
    }
}

/// `{"type":"event","event":"lifecycle","data":{"source_id":…,"lifecycle_event":…}}`. Extension:
/// `tracker_id` at the top level, as for `state`.
pub fn lifecycle_event(tracker_id: TrackerId, source_id: i64, kind: Lifecycle) -> String {
    format!(
        r#"{{"type":"event","event":"lifecycle","tracker_id":{tracker_id},"data":{{"source_id":{source_id},"lifecycle_event":"{}"}}}}"#,
        kind.as_str()
    )
}

/// `{"type":"event","event":"lifecycle","tracker_id":…,"data":{"source_id":…,"lifecycle_event":"disallowed"}}`:
/// extension (PROTOCOL.md §8): the session's user lost its grant for the tracker, whose events stop.
pub fn disallowed_event(tracker_id: TrackerId, source_id: i64) -> String {
    format!(
        r#"{{"type":"event","event":"lifecycle","tracker_id":{tracker_id},"data":{{"source_id":{source_id},"lifecycle_event":"disallowed"}}}}"#
    )
}

pub const LOGOUT_EVENT: &str = r#"{"type":"event","event":"logout","data":"session closed"}"#;

/// A complete state for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn test_state(tracker_id: TrackerId, change_no: i64) -> TrackerState {
    TrackerState {
        tracker_id,
        change_no,
        ..tests::sample()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    pub(super) fn sample() -> TrackerState {
        let t = Utc.with_ymd_and_hms(2018, 10, 17, 10, 51, 43).unwrap();
        TrackerState {
            tracker_id: 7,
            source_id: 10284,
            change_no: 1,
            gps_updated: Some(t),
            gps_signal_level: Some(100),
            lat: 14.330065796228606,
            lng: -90.99037259141691,
            heading: 248,
            speed: 0,
            alt: 431,
            gps_precision: None,
            gsm_lbs: None,
            connection_status: "active".into(),
            movement_status: "parked".into(),
            movement_status_update: Some(t),
            ignition: false,
            ignition_update: Some(t),
            gsm_updated: Some(t),
            gsm_signal_level: Some(80),
            gsm_network_name: Some("T-Mobile".into()),
            gsm_roaming: Some(false),
            last_update: t,
            battery_level: Some(97),
            battery_update: Some(t),
            inputs: vec![false, false, true],
            inputs_update: Some(t),
            outputs: vec![true, false],
            outputs_update: Some(t),
            additional: serde_json::json!({"hardware_key": {"value": "2091", "updated": "2018-10-17T08:47:09Z"}}),
            actual_track_update: None,
        }
    }

    #[test]
    fn full_state_matches_protocol_shape_in_user_zone() {
        let v = Variant {
            format: Format::Full,
            tz: chrono_tz::Europe::Berlin,
            iso: false,
        };
        let now = Utc.with_ymd_and_hms(2018, 10, 17, 11, 0, 0).unwrap();
        let ev: serde_json::Value = serde_json::from_str(&state_event(&sample(), v, now)).unwrap();
        assert_eq!(ev["type"], "event");
        assert_eq!(ev["event"], "state");
        assert_eq!(ev["tracker_id"], 7);
        assert_eq!(ev["user_time"], "2018-10-17 13:00:00");
        let d = &ev["data"];
        assert_eq!(d["source_id"], 10284);
        assert_eq!(d["gps"]["updated"], "2018-10-17 12:51:43");
        assert_eq!(d["gps"]["location"]["lat"], 14.330065796228606);
        assert_eq!(d["gps"]["heading"], 248);
        assert_eq!(d["gsm"]["network_name"], "T-Mobile");
        assert_eq!(d["inputs"], serde_json::json!([false, false, true]));
        assert_eq!(
            d["additional"]["hardware_key"]["updated"],
            "2018-10-17 10:47:09"
        );
        assert_eq!(d["actual_track_update"], serde_json::Value::Null);
        assert!(d.get("battery_level").is_some());
    }

    #[test]
    fn compact_state_has_only_the_compact_fields() {
        let v = Variant {
            format: Format::Compact,
            tz: chrono_tz::UTC,
            iso: true,
        };
        let ev: serde_json::Value =
            serde_json::from_str(&state_event(&sample(), v, Utc::now())).unwrap();
        let keys: Vec<&str> = ev["data"]
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            [
                "connection_status",
                "gps",
                "ignition",
                "ignition_update",
                "last_update",
                "movement_status",
                "movement_status_update",
                "source_id"
            ]
        );
        assert_eq!(ev["data"]["last_update"], "2018-10-17T10:51:43+00:00");
    }

    #[test]
    fn state_columns_are_read_in_field_order() {
        let names: Vec<&str> = STATE_COLUMNS
            .split(',')
            .map(|c| c.trim().split('.').nth(1).unwrap_or(""))
            .collect();
        assert_eq!(names, STATE_FIELDS);
    }

    #[test]
    fn fast_dates_match_chrono_formatting() {
        let zones = [
            chrono_tz::UTC,
            chrono_tz::Europe::Berlin,
            chrono_tz::America::Guatemala,
            chrono_tz::Asia::Kolkata,
            chrono_tz::Australia::Lord_Howe,
            chrono_tz::Pacific::Chatham,
        ];
        let start = Utc.with_ymd_and_hms(1999, 12, 31, 23, 59, 59).unwrap();
        for tz in zones {
            for iso in [false, true] {
                let v = Variant {
                    format: Format::Full,
                    tz,
                    iso,
                };
                let f = if iso {
                    "%Y-%m-%dT%H:%M:%S%:z"
                } else {
                    "%Y-%m-%d %H:%M:%S"
                };
                for step in 0..2000i64 {
                    // Every ~4.4 days over 24 years, at varying times of day (DST changes too).
                    let t = start + chrono::Duration::seconds(step * 379_417);
                    let want = t.with_timezone(&tz).format(f).to_string();
                    assert_eq!(v.date(t), want, "{tz} iso={iso}");
                }
            }
        }
    }

    #[test]
    fn lifecycle_frame_is_valid_json() {
        let ev: serde_json::Value =
            serde_json::from_str(&lifecycle_event(3, 1003, Lifecycle::Block)).unwrap();
        assert_eq!(ev["data"]["source_id"], 1003);
        assert_eq!(ev["data"]["lifecycle_event"], "block");
    }
}
