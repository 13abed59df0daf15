//! Domain types shared by the database layer, the hub and the sockets: a tracker's state as read
//! from `tracker_states`, and its rendering into the protocol's `state` event (full or compact,
//! dates in the session user's time zone). Owns no I/O.

use std::borrow::Cow;
use std::fmt::Write as _;

use chrono::{DateTime, Datelike, Offset, TimeZone, Timelike, Utc};
use chrono_tz::Tz;

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

    /// Appends `t` in this variant's zone and form (see [`Variant::format_date`]).
    pub fn write_date(&self, out: &mut String, t: DateTime<Utc>) {
        match LocalDay::of(self.tz, t.timestamp()) {
            Some(day) if day.steady => day.write(out, t.timestamp(), self.iso),
            _ => out.push_str(self.format_date(t).as_str()),
        }
    }

    /// `t` in this variant's zone and form: `YYYY-MM-DD HH:MM:SS`, or ISO 8601 with the offset
    /// (`YYYY-MM-DDTHH:MM:SS+HH:MM`). A state event holds about ten date-times, so the digits
    /// are written directly instead of through chrono's format-string parser (which was a
    /// tenth of the gateway's CPU time in the benchmark's profile); the rare values outside
    /// that fast path (years beyond 0–9999, offsets with seconds) go through chrono.
    pub fn format_date(&self, t: DateTime<Utc>) -> DateText {
        let local = t.with_timezone(&self.tz);
        let offset = local.offset().fix().local_minus_utc();
        let n = local.naive_local();
        let mut text = DateText {
            bytes: [0; DateText::CAPACITY],
            len: 0,
        };
        if !(0..=9999).contains(&n.year()) || (self.iso && offset % 60 != 0) {
            let f = if self.iso {
                "%Y-%m-%dT%H:%M:%S%:z"
            } else {
                "%Y-%m-%d %H:%M:%S"
            };
            // At most 28 bytes (chrono's years end at ±262,143), all ASCII.
            let s = local.format(f).to_string();
            let len = s.len().min(DateText::CAPACITY);
            text.bytes[..len].copy_from_slice(&s.as_bytes()[..len]);
            text.len = len;
            return text;
        }
        let y = n.year() as u32; // 0..=9999, checked above
        text.two(y / 100);
        text.two(y % 100);
        text.put(b'-');
        text.two(n.month());
        text.put(b'-');
        text.two(n.day());
        text.put(if self.iso { b'T' } else { b' ' });
        text.two(n.hour());
        text.put(b':');
        text.two(n.minute());
        text.put(b':');
        text.two(n.second());
        if self.iso {
            text.put(if offset < 0 { b'-' } else { b'+' });
            let m = offset.unsigned_abs() / 60;
            text.two(m / 60);
            text.put(b':');
            text.two(m % 60);
        }
        text
    }
}

/// A rendered date-time (ASCII, at most 32 bytes), kept without an allocation.
#[derive(Clone, Copy)]
pub struct DateText {
    bytes: [u8; DateText::CAPACITY],
    len: usize,
}

impl DateText {
    const CAPACITY: usize = 32;

    /// Appends a byte (the fast path writes at most 25).
    fn put(&mut self, b: u8) {
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = b;
            self.len += 1;
        }
    }

    /// Appends the last two decimal digits of `v`.
    fn two(&mut self, v: u32) {
        self.put(b'0' + (v / 10 % 10) as u8);
        self.put(b'0' + (v % 10) as u8);
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII is ever written.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

/// A connection or movement status as read: the schema's words borrowed from here (two
/// allocations fewer per state read), anything else owned.
pub fn status_word(s: &str) -> Cow<'static, str> {
    const WORDS: [&str; 9] = [
        "active",
        "idle",
        "offline",
        "signal_lost",
        "just_registered",
        "just_replaced",
        "moving",
        "stopped",
        "parked",
    ];
    match WORDS.iter().find(|w| **w == s) {
        Some(w) => Cow::Borrowed(w),
        None => Cow::Owned(s.to_owned()),
    }
}

/// The latest state of one tracker: one row of `tracker_states` plus the tracker's `source_id`.
/// Read from rows selecting [`STATE_COLUMNS`] (decoded in `db::rows`).
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
    /// One of a few known words (see [`status_word`]), kept without an allocation.
    pub connection_status: Cow<'static, str>,
    pub movement_status: Cow<'static, str>,
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
    /// A JSON object of model-specific values, as PostgreSQL renders the `jsonb` column: each
    /// value `{"value": …, "updated": <timestamptz>}` (see [`write_state_data`]).
    pub additional: Box<str>,
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

/// The columns of [`TrackerState`] that the compact format renders, from `tracker_states s`
/// alone (`source_id` left 0, as in [`STATE_COLUMNS_SOURCE_UNREAD`]); the others are constants
/// (NULL, `{}`), so the rows decode as any other. For readers that render the compact format
/// only (a compact batch group's fill; the event processor, for trackers whose watchers all
/// take it): the other columns, `additional` (`jsonb`, rendered as text) above all, are a good
/// part of what sending a row costs PostgreSQL. A state read this way must never be rendered
/// in the full format.
pub const STATE_COLUMNS_COMPACT: &str = "s.tracker_id, 0::int8 AS source_id, s.change_no, \
    s.gps_updated, s.gps_signal_level, s.lat, s.lng, s.heading, s.speed, s.alt, \
    s.gps_precision, s.gsm_lbs, s.connection_status, s.movement_status, \
    s.movement_status_update, s.ignition, s.ignition_update, NULL::timestamptz AS gsm_updated, \
    NULL::int2 AS gsm_signal_level, NULL::text AS gsm_network_name, NULL::bool AS gsm_roaming, \
    s.last_update, NULL::int2 AS battery_level, NULL::timestamptz AS battery_update, \
    '{}'::bool[] AS inputs, NULL::timestamptz AS inputs_update, '{}'::bool[] AS outputs, \
    NULL::timestamptz AS outputs_update, '{}'::jsonb AS additional, \
    NULL::timestamptz AS actual_track_update";

/// The tables behind [`STATE_COLUMNS`]: each state with its tracker's source id, looked up by
/// primary key. A plain `JOIN trackers t` let the planner hash-join a seq scan of the whole
/// `trackers` table for every chunk the event processor reads: with 100,000 trackers, 21 ms
/// for 2,000 random ids and 31 ms for a subscribe's 10,000, against 9 and 21 ms this way (the
/// `LIMIT` keeps the lateral lookup from being flattened back into that join). Every state has
/// its tracker (foreign key), so the rows are those of the inner join.
pub const STATE_FROM: &str = "tracker_states s CROSS JOIN LATERAL \
    (SELECT tr.source_id FROM trackers tr WHERE tr.id = s.tracker_id LIMIT 1) t";

/// The field names of [`TrackerState`], in the order of [`STATE_COLUMNS`].
pub(crate) const STATE_FIELDS: [&str; 30] = [
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

/// Appends `s` as a JSON string, escaped exactly as serde_json escapes it (`"`, `\` and the
/// control characters; nothing else).
fn push_json_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    let mut start = 0;
    for (i, &b) in s.as_bytes().iter().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x09 => "\\t",
            0x0a => "\\n",
            0x0c => "\\f",
            0x0d => "\\r",
            0x00..=0x1f => "",
            _ => continue,
        };
        // `i` is at an ASCII byte, so on a character boundary.
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

fn push_int(out: &mut String, n: impl itoa::Integer) {
    out.push_str(itoa::Buffer::new().format(n));
}

fn push_opt_int(out: &mut String, n: Option<impl itoa::Integer>) {
    match n {
        Some(n) => push_int(out, n),
        None => out.push_str("null"),
    }
}

/// As serde_json writes an `f64`: the shortest representation that reads back the same, `null`
/// for NaN and the infinities.
fn push_f64(out: &mut String, x: f64) {
    if x.is_finite() {
        out.push_str(ryu::Buffer::new().format_finite(x));
    } else {
        out.push_str("null");
    }
}

fn push_bool(out: &mut String, b: bool) {
    out.push_str(if b { "true" } else { "false" });
}

fn push_opt_bool(out: &mut String, b: Option<bool>) {
    match b {
        Some(b) => push_bool(out, b),
        None => out.push_str("null"),
    }
}

fn push_bools(out: &mut String, bs: &[bool]) {
    out.push('[');
    for (i, &b) in bs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_bool(out, b);
    }
    out.push(']');
}

/// The date-times of one state. Most of them fall on the same local day (one message from a
/// tracker updates its position, signal and `last_update` at once, and the others are older
/// updates of the same day), so the day found for one is kept for the next: a date-time of that
/// day is then written without looking at the zone at all.
struct Dates {
    variant: Variant,
    day: Option<LocalDay>,
    /// The last second rendered, and its text (several date-times are often the same second).
    last: Option<(i64, DateText)>,
}

impl Dates {
    fn new(variant: Variant) -> Dates {
        Dates {
            variant,
            day: None,
            last: None,
        }
    }

    /// `"<date>"`; no escaping is needed.
    fn push(&mut self, out: &mut String, t: DateTime<Utc>) {
        let second = t.timestamp();
        let text = match self.last {
            Some((s, text)) if s == second => text,
            _ => {
                let day = match self.day {
                    Some(day) if day.holds(second) => Some(day),
                    _ => {
                        self.day = LocalDay::of(self.variant.tz, second);
                        self.day
                    }
                };
                let text = match day {
                    Some(day) if day.steady => day.text(second, self.variant.iso),
                    _ => self.variant.format_date(t),
                };
                self.last = Some((second, text));
                text
            }
        };
        out.push('"');
        out.push_str(text.as_str());
        out.push('"');
    }

    fn push_opt(&mut self, out: &mut String, t: Option<DateTime<Utc>>) {
        match t {
            Some(t) => self.push(out, t),
            None => out.push_str("null"),
        }
    }
}

/// One local day of a zone on which the zone's offset does not change: the UTC seconds
/// `[start, start + 86,400)` are local midnight to midnight, so a date-time in it is the day's
/// date and the seconds since `start`. Rendering a date through chrono and chrono-tz (a search
/// of the zone's transitions, calendar arithmetic) was a fifth of rendering a whole state event;
/// through a known day it is a few divisions. Each thread keeps the last few days it used
/// ([`DAYS`]). A day on which the offset changes is kept too, as not `steady`: its date-times go
/// through [`Variant::format_date`] as before (finding a day looks at the zone 49 times, so such
/// a day must not be looked for again at every date-time).
#[derive(Clone, Copy)]
struct LocalDay {
    tz: Tz,
    /// The UTC seconds `[start, start + 86,400)`: local midnight to midnight when `steady`.
    start: i64,
    /// The offset holds all day, the year is 0–9999 and the offset whole minutes: the
    /// template below is right for every second of the day.
    steady: bool,
    /// The day's date-times in ISO form at midnight, `YYYY-MM-DDT00:00:00+HH:MM`: a date-time
    /// is this with its time of day written in.
    template: [u8; 25],
}

/// Days kept per thread: a few days each of the few zones in use at a time.
const DAYS_KEPT: usize = 8;

thread_local! {
    static DAYS: std::cell::RefCell<([Option<LocalDay>; DAYS_KEPT], usize)> =
        const { std::cell::RefCell::new(([None; DAYS_KEPT], 0)) };
}

impl LocalDay {
    const SECONDS: i64 = 86_400;

    fn holds(&self, second: i64) -> bool {
        (self.start..self.start + Self::SECONDS).contains(&second)
    }

    /// The day of `tz` that holds `second` (UTC), from this thread's cache or found and kept;
    /// `None` only where chrono has no date-time for `second`.
    fn of(tz: Tz, second: i64) -> Option<LocalDay> {
        let kept = DAYS.with(|days| {
            days.borrow()
                .0
                .iter()
                .flatten()
                .find(|d| d.tz == tz && d.holds(second))
                .copied()
        });
        if kept.is_some() {
            return kept;
        }
        let day = Self::find(tz, second)?;
        DAYS.with(|days| {
            let (days, next) = &mut *days.borrow_mut();
            // The oldest entry gives way. Not the zone's previous day first: date-times on
            // both sides of a local midnight (or of an offset change) are common in one state,
            // and each day would push the other out.
            days[*next % DAYS_KEPT] = Some(day);
            *next = (*next + 1) % DAYS_KEPT;
        });
        Some(day)
    }

    fn find(tz: Tz, second: i64) -> Option<LocalDay> {
        let offset_at = |s: i64| {
            DateTime::from_timestamp(s, 0).map(|t| {
                tz.offset_from_utc_datetime(&t.naive_utc())
                    .fix()
                    .local_minus_utc()
            })
        };
        let offset = offset_at(second)?;
        let start = (second + i64::from(offset)).div_euclid(Self::SECONDS) * Self::SECONDS
            - i64::from(offset);
        let unsteady = LocalDay {
            tz,
            start,
            steady: false,
            template: [0; 25],
        };
        // The offset must hold all day. Zones change it at most a few times a year and never
        // twice within half an hour, so looking every half hour (and at the last second) finds
        // any change.
        let steady = offset % 60 == 0
            && (0..Self::SECONDS / 1800)
                .map(|k| start + k * 1800)
                .chain([start + Self::SECONDS - 1])
                .all(|s| offset_at(s) == Some(offset));
        let date = DateTime::from_timestamp(start + i64::from(offset), 0)?.date_naive();
        let year = match u32::try_from(date.year()) {
            Ok(year) if steady && year <= 9999 => year,
            _ => return Some(unsteady),
        };
        let minutes = offset.unsigned_abs() / 60;
        let mut template = *b"0000-00-00T00:00:00+00:00";
        put_two(&mut template, 0, year / 100);
        put_two(&mut template, 2, year % 100);
        put_two(&mut template, 5, date.month());
        put_two(&mut template, 8, date.day());
        if offset < 0 {
            template[19] = b'-';
        }
        put_two(&mut template, 20, minutes / 60);
        put_two(&mut template, 23, minutes % 60);
        Some(LocalDay {
            steady: true,
            template,
            ..unsteady
        })
    }

    /// Appends `second` (which this day holds) as `YYYY-MM-DD HH:MM:SS`, or in ISO 8601 with
    /// the offset.
    fn write(&self, out: &mut String, second: i64, iso: bool) {
        out.push_str(self.text(second, iso).as_str());
    }

    /// `second` (which this day holds) as [`Self::write`] writes it.
    fn text(&self, second: i64, iso: bool) -> DateText {
        let of_day = (second - self.start).clamp(0, Self::SECONDS - 1) as u32;
        let mut bytes = [0u8; DateText::CAPACITY];
        bytes[..25].copy_from_slice(&self.template);
        put_two(&mut bytes, 11, of_day / 3600);
        put_two(&mut bytes, 14, of_day / 60 % 60);
        put_two(&mut bytes, 17, of_day % 60);
        if !iso {
            bytes[10] = b' ';
        }
        DateText {
            bytes,
            len: if iso { 25 } else { 19 },
        }
    }
}

/// Writes `v` (below 100) as two decimal digits at `at`.
fn put_two<const N: usize>(bytes: &mut [u8; N], at: usize, v: u32) {
    const DIGITS: &[u8; 200] = b"0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839404142434445464748495051525354555657585960616263\
        646566676869707172737475767778798081828384858687888990919293949596979899";
    let i = (v % 100) as usize * 2;
    if let (Some(slot), Some(digits)) = (bytes.get_mut(at..at + 2), DIGITS.get(i..i + 2)) {
        slot.copy_from_slice(digits);
    }
}

/// Appends a state's `data` object (the `state` of a batch item) for `variant`, in the
/// protocol's field order:
///
/// `{"source_id":…,"gps":{"updated":…,"signal_level":…,"location":{"lat":…,"lng":…},"heading":…,
/// "speed":…,"alt":…[,"precision":…][,"gsm_lbs":…]},"connection_status":…,"movement_status":…,
/// "movement_status_update":…,"ignition":…,"ignition_update":…[,"gsm":{…}],"last_update":…
/// [,"battery_level":…,…,"additional":{…},"actual_track_update":…]}` (the bracketed fields of
/// `gsm` onwards in the full format only).
///
/// Written field by field into one buffer, with the keys as literals: through serde's
/// serializer each key went through the string escaper and each date through a `String` of its
/// own, 16% of the gateway's CPU in the benchmark's `ingest` profile. The bytes are the same
/// (the tests hold them).
pub fn write_state_data(out: &mut String, st: &TrackerState, v: Variant) {
    let mut dates = Dates::new(v);
    out.push_str(r#"{"source_id":"#);
    push_int(out, st.source_id);
    out.push_str(r#","gps":{"updated":"#);
    dates.push_opt(out, st.gps_updated);
    out.push_str(r#","signal_level":"#);
    push_opt_int(out, st.gps_signal_level);
    out.push_str(r#","location":{"lat":"#);
    push_f64(out, st.lat);
    out.push_str(r#","lng":"#);
    push_f64(out, st.lng);
    out.push_str(r#"},"heading":"#);
    push_int(out, st.heading);
    out.push_str(r#","speed":"#);
    push_int(out, st.speed);
    out.push_str(r#","alt":"#);
    push_int(out, st.alt);
    if let Some(p) = st.gps_precision {
        out.push_str(r#","precision":"#);
        push_int(out, p);
    }
    if let Some(lbs) = st.gsm_lbs {
        out.push_str(r#","gsm_lbs":"#);
        push_bool(out, lbs);
    }
    out.push_str(r#"},"connection_status":"#);
    push_json_str(out, &st.connection_status);
    out.push_str(r#","movement_status":"#);
    push_json_str(out, &st.movement_status);
    out.push_str(r#","movement_status_update":"#);
    dates.push_opt(out, st.movement_status_update);
    out.push_str(r#","ignition":"#);
    push_bool(out, st.ignition);
    out.push_str(r#","ignition_update":"#);
    dates.push_opt(out, st.ignition_update);
    let full = v.format == Format::Full;
    if full {
        out.push_str(r#","gsm":{"updated":"#);
        dates.push_opt(out, st.gsm_updated);
        out.push_str(r#","signal_level":"#);
        push_opt_int(out, st.gsm_signal_level);
        out.push_str(r#","network_name":"#);
        match &st.gsm_network_name {
            Some(name) => push_json_str(out, name),
            None => out.push_str("null"),
        }
        out.push_str(r#","roaming":"#);
        push_opt_bool(out, st.gsm_roaming);
        out.push('}');
    }
    out.push_str(r#","last_update":"#);
    dates.push(out, st.last_update);
    if full {
        out.push_str(r#","battery_level":"#);
        push_opt_int(out, st.battery_level);
        out.push_str(r#","battery_update":"#);
        dates.push_opt(out, st.battery_update);
        out.push_str(r#","inputs":"#);
        push_bools(out, &st.inputs);
        out.push_str(r#","inputs_update":"#);
        dates.push_opt(out, st.inputs_update);
        out.push_str(r#","outputs":"#);
        push_bools(out, &st.outputs);
        out.push_str(r#","outputs_update":"#);
        dates.push_opt(out, st.outputs_update);
        out.push_str(r#","additional":"#);
        additional::write(out, &st.additional, v);
        out.push_str(r#","actual_track_update":"#);
        dates.push_opt(out, st.actual_track_update);
    }
    out.push('}');
}

/// A state's `data` object alone (see [`write_state_data`]).
pub fn state_data(state: &TrackerState, variant: Variant) -> String {
    let mut out = String::with_capacity(if variant.format == Format::Full {
        800
    } else {
        360
    });
    write_state_data(&mut out, state, variant);
    out
}

/// The `additional` map rendered from the JSON text PostgreSQL sent: every value as stored,
/// except that each value's `updated`, when it parses as an RFC 3339 date-time, is re-rendered
/// in the variant's zone and form. The text is walked without building a tree (keys borrowed
/// where they need no unescaping, values as raw slices): parsing it into a `serde_json::Value`
/// for every state read was 8% of the gateway's CPU in `ingest`.
mod additional {
    use std::borrow::Cow;
    use std::fmt;

    use chrono::{DateTime, Utc};
    use serde::de::{Deserializer as _, MapAccess, Visitor};
    use serde_json::value::RawValue;

    use super::{push_json_str, Variant};

    /// Appends the map; `{}` if `raw` is not a JSON object.
    pub(super) fn write(out: &mut String, raw: &str, v: Variant) {
        let len = out.len();
        if Scan::write(out, raw, v) {
            return;
        }
        out.truncate(len);
        if !write_object(out, raw, v, true) {
            out.truncate(len);
            out.push_str("{}");
        }
    }

    /// The usual shape of `additional`, read in one pass: an object whose values are objects
    /// of plain values (strings, numbers, `true`, `false`, `null`) or plain values themselves,
    /// keys without escapes. What it does not know (arrays, deeper nesting, escaped keys,
    /// anything that is not JSON) it leaves to the general walk below by returning false, so
    /// what it writes is always what that walk writes (the tests compare both). The general
    /// walk, through serde_json's deserializer, was half of rendering a full state event.
    struct Scan<'a> {
        raw: &'a str,
        at: usize,
        v: Variant,
    }

    impl<'a> Scan<'a> {
        fn write(out: &mut String, raw: &'a str, v: Variant) -> bool {
            let mut scan = Scan { raw, at: 0, v };
            scan.object(out, true).is_some() && {
                scan.space();
                scan.at == raw.len()
            }
        }

        fn peek(&self) -> Option<u8> {
            self.raw.as_bytes().get(self.at).copied()
        }

        fn space(&mut self) {
            while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
                self.at += 1;
            }
        }

        /// Skips whitespace, then takes `c`.
        fn eat(&mut self, c: u8) -> Option<()> {
            self.space();
            (self.peek() == Some(c)).then(|| self.at += 1)
        }

        /// An object; its values may be objects (of plain values) if `outer`. In an inner
        /// object, an `updated` that is a date-time is rendered in the variant's zone.
        fn object(&mut self, out: &mut String, outer: bool) -> Option<()> {
            self.eat(b'{')?;
            out.push('{');
            self.space();
            if self.peek() == Some(b'}') {
                self.at += 1;
                out.push('}');
                return Some(());
            }
            loop {
                self.space();
                let key = self.string()?;
                if key.contains('\\') {
                    return None;
                }
                self.eat(b':')?;
                self.space();
                out.push_str(key);
                out.push(':');
                if outer && self.peek() == Some(b'{') {
                    self.object(out, false)?;
                } else {
                    let value = self.plain()?;
                    let updated = !outer && key == "\"updated\"";
                    match if updated { rfc3339(value) } else { None } {
                        Some(t) => {
                            out.push('"');
                            self.v.write_date(out, t);
                            out.push('"');
                        }
                        None => out.push_str(value),
                    }
                }
                self.space();
                let next = self.peek().filter(|c| matches!(c, b',' | b'}'))?;
                self.at += 1;
                out.push(char::from(next));
                if next == b'}' {
                    return Some(());
                }
            }
        }

        /// A string, number, `true`, `false` or `null`, as written.
        fn plain(&mut self) -> Option<&'a str> {
            match self.peek()? {
                b'"' => self.string(),
                b'-' | b'0'..=b'9' => self.number(),
                _ => ["true", "false", "null"].into_iter().find_map(|word| {
                    let end = self.at + word.len();
                    (self.raw.get(self.at..end) == Some(word)).then(|| {
                        self.at = end;
                        word
                    })
                }),
            }
        }

        /// A string with its quotes, its escapes checked as JSON's.
        fn string(&mut self) -> Option<&'a str> {
            let start = self.at;
            let b = self.raw.as_bytes();
            if b.get(self.at) != Some(&b'"') {
                return None;
            }
            self.at += 1;
            loop {
                match *b.get(self.at)? {
                    b'"' => {
                        self.at += 1;
                        return self.raw.get(start..self.at);
                    }
                    b'\\' => match *b.get(self.at + 1)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 2,
                        b'u' => {
                            let hex = b.get(self.at + 2..self.at + 6)?;
                            if !hex.iter().all(u8::is_ascii_hexdigit) {
                                return None;
                            }
                            self.at += 6;
                        }
                        _ => return None,
                    },
                    0x00..=0x1f => return None,
                    _ => self.at += 1,
                }
            }
        }

        /// A number in JSON's grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
        fn number(&mut self) -> Option<&'a str> {
            let start = self.at;
            let b = self.raw.as_bytes();
            let digits = |at: &mut usize| {
                let from = *at;
                while b.get(*at).is_some_and(u8::is_ascii_digit) {
                    *at += 1;
                }
                *at > from
            };
            let mut at = self.at;
            if b.get(at) == Some(&b'-') {
                at += 1;
            }
            if b.get(at) == Some(&b'0') {
                at += 1;
            } else if !digits(&mut at) {
                return None;
            }
            if b.get(at) == Some(&b'.') {
                at += 1;
                if !digits(&mut at) {
                    return None;
                }
            }
            if matches!(b.get(at), Some(b'e' | b'E')) {
                at += 1;
                if matches!(b.get(at), Some(b'+' | b'-')) {
                    at += 1;
                }
                if !digits(&mut at) {
                    return None;
                }
            }
            self.at = at;
            self.raw.get(start..at)
        }
    }

    /// Writes the object `raw`, whose values are themselves objects to rewrite if `outer`, or
    /// whose `updated` is rewritten if not. False (with part of it written) if `raw` is not an
    /// object.
    fn write_object(out: &mut String, raw: &str, v: Variant, outer: bool) -> bool {
        if !raw.trim_start().starts_with('{') {
            return false;
        }
        let mut de = serde_json::Deserializer::from_str(raw);
        de.deserialize_map(Entries { out, v, outer }).is_ok() && de.end().is_ok()
    }

    struct Entries<'o> {
        out: &'o mut String,
        v: Variant,
        outer: bool,
    }

    impl<'de> Visitor<'de> for Entries<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let Entries { out, v, outer } = self;
            out.push('{');
            let mut first = true;
            while let Some(key) = map.next_key::<Key<'de>>()? {
                let value: &'de RawValue = map.next_value()?;
                if !first {
                    out.push(',');
                }
                first = false;
                push_json_str(out, &key.0);
                out.push(':');
                let value = value.get();
                if outer {
                    let len = out.len();
                    if !write_object(out, value, v, false) {
                        out.truncate(len);
                        push_compact(out, value);
                    }
                } else if key.0 == "updated" {
                    match rfc3339(value) {
                        Some(t) => {
                            out.push('"');
                            v.write_date(out, t);
                            out.push('"');
                        }
                        None => push_compact(out, value),
                    }
                } else {
                    push_compact(out, value);
                }
            }
            out.push('}');
            Ok(())
        }
    }

    /// A JSON string that is an RFC 3339 date-time.
    fn rfc3339(raw: &str) -> Option<DateTime<Utc>> {
        if let Some(t) = postgres_rfc3339(raw) {
            return Some(t);
        }
        if !raw.starts_with('"') {
            return None;
        }
        let text: Cow<str> = match serde_json::from_str::<&str>(raw) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => Cow::Owned(serde_json::from_str::<String>(raw).ok()?),
        };
        DateTime::parse_from_rfc3339(&text)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The common shape of [`rfc3339`]'s input, read directly: `"YYYY-MM-DDTHH:MM:SS`, an
    /// optional fraction of 1–9 digits, then `Z` or `±HH:MM`, and the closing quote (what
    /// PostgreSQL writes for a `timestamptz` in JSON). Anything else (other separators, a leap
    /// second, `-00:00`, an invalid date) is `None` and left to chrono, so the result is
    /// always chrono's. chrono's general parser was a fifth of rendering `additional`.
    pub(super) fn postgres_rfc3339(raw: &str) -> Option<DateTime<Utc>> {
        let b = raw.as_bytes();
        let num = |at: usize, len: usize| -> Option<u32> {
            b.get(at..at + len)?.iter().try_fold(0u32, |n, &c| {
                c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
            })
        };
        let at = |i: usize, c: u8| b.get(i) == Some(&c);
        if !(at(0, b'"')
            && at(5, b'-')
            && at(8, b'-')
            && at(11, b'T')
            && at(14, b':')
            && at(17, b':'))
        {
            return None;
        }
        let (year, month, day) = (num(1, 4)?, num(6, 2)?, num(9, 2)?);
        let (hour, minute, second) = (num(12, 2)?, num(15, 2)?, num(18, 2)?);
        let mut i = 20;
        if at(i, b'.') {
            let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
            if !(1..=9).contains(&digits) {
                return None;
            }
            i += 1 + digits;
        }
        let offset = match b.get(i)? {
            b'Z' => {
                i += 1;
                0
            }
            sign @ (b'+' | b'-') if at(i + 3, b':') => {
                let (h, m) = (num(i + 1, 2)?, num(i + 4, 2)?);
                if h > 23 || m > 59 || (*sign == b'-' && h == 0 && m == 0) {
                    return None;
                }
                i += 6;
                let minutes = (h * 60 + m) as i64;
                if *sign == b'-' {
                    -minutes
                } else {
                    minutes
                }
            }
            _ => return None,
        };
        if i + 1 != b.len() || !at(i, b'"') || hour > 23 || minute > 59 || second > 59 {
            return None;
        }
        let local = chrono::NaiveDate::from_ymd_opt(year as i32, month, day)?
            .and_hms_opt(hour, minute, second)?
            .and_utc()
            .timestamp();
        // The fraction is dropped: dates are rendered to the second, which it cannot change.
        DateTime::from_timestamp(local - offset * 60, 0)
    }

    /// A map key, borrowed from the text unless it holds escapes.
    struct Key<'a>(Cow<'a, str>);

    impl<'de> serde::Deserialize<'de> for Key<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct KeyVisitor;
            impl<'de> Visitor<'de> for KeyVisitor {
                type Value = Key<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Borrowed(s)))
                }
                fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Owned(s.to_owned())))
                }
                fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Owned(s)))
                }
            }
            d.deserialize_str(KeyVisitor)
        }
    }

    /// Appends a JSON value without the whitespace between its tokens (PostgreSQL writes
    /// `{"a": 1, "b": 2}`; events are compact). Strings, numbers and literals are copied as
    /// PostgreSQL wrote them: its escapes are serde_json's, and a number keeps its digits.
    fn push_compact(out: &mut String, raw: &str) {
        if !raw
            .bytes()
            .any(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        {
            out.push_str(raw);
            return;
        }
        let (mut in_string, mut escaped) = (false, false);
        for c in raw.chars() {
            if in_string {
                out.push(c);
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                }
            } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
                out.push(c);
                in_string = c == '"';
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use rand::{Rng, SeedableRng};

        use super::*;
        use crate::model::Format;

        /// What the general walk writes for `raw` (as `write` without the scan).
        fn general(raw: &str, v: Variant) -> String {
            let mut out = String::new();
            if !write_object(&mut out, raw, v, true) {
                out.clear();
                out.push_str("{}");
            }
            out
        }

        /// The scan's output, if it took `raw`.
        fn scanned(raw: &str, v: Variant) -> Option<String> {
            let mut out = String::new();
            Scan::write(&mut out, raw, v).then_some(out)
        }

        const TAKEN: &[&str] = &[
            r#"{}"#,
            r#" { } "#,
            r#"{"hardware_key": {"value": "123", "updated": "2026-12-06T13:00:00.123456+00:00"}}"#,
            r#"{"a": {"updated": "2026-12-06T13:00:00+01:00", "value": -1.5e+3}, "b": 0, "c": "x"}"#,
            r#"{"fw": {"updated": "not a date", "value": null}, "t": true, "f": false}"#,
            r#"{"k": {"updated": 17, "value": "\"q\" \\ \/ \b\f\n\r\t \u00e9 ü ✓"}}"#,
            "{\n  \"a\" :\t{ \"updated\" : \"2024-02-29T23:59:59Z\" } ,\r\"b\":{}\n}",
            r#"{"updated": "2026-12-06T13:00:00+00:00"}"#,
            r#"{"a": {"x": 0.25, "y": -0, "z": 1E5, "w": 10e-2}}"#,
            r#"{"dup": 1, "dup": {"updated": "1999-12-31T23:59:59-03:30"}}"#,
        ];

        const LEFT: &[&str] = &[
            r#"{"a": [1, 2]}"#,
            r#"{"a": {"b": {"c": 1}}}"#,
            r#"{"a": {"b": [1]}}"#,
            r#"{"k\u0065y": 1}"#,
            r#"{"a": {"upd\u0061ted": "2026-12-06T13:00:00Z"}}"#,
            r#"[]"#,
            r#""text""#,
            r#"{"a": 01}"#,
            r#"{"a": 1.}"#,
            r#"{"a": .5}"#,
            r#"{"a": 1e}"#,
            r#"{"a": +1}"#,
            r#"{"a": tru}"#,
            r#"{"a": "\x"}"#,
            r#"{"a": "\u12"}"#,
            "{\"a\": \"tab\there\"}",
            r#"{"a": 1,}"#,
            r#"{"a" 1}"#,
            r#"{"a": 1} x"#,
            r#"{"a": 1"#,
            r#"{a: 1}"#,
            "",
        ];

        fn variants() -> [Variant; 2] {
            [
                Variant {
                    format: Format::Full,
                    tz: chrono_tz::Europe::Berlin,
                    iso: false,
                },
                Variant {
                    format: Format::Full,
                    tz: chrono_tz::Asia::Kathmandu,
                    iso: true,
                },
            ]
        }

        #[test]
        fn the_scan_takes_the_usual_shapes_and_writes_what_the_general_walk_writes() {
            for v in variants() {
                for raw in TAKEN {
                    assert_eq!(scanned(raw, v), Some(general(raw, v)), "{raw}");
                }
                for raw in LEFT {
                    assert_eq!(scanned(raw, v), None, "{raw}");
                    let mut out = String::new();
                    write(&mut out, raw, v);
                    assert_eq!(out, general(raw, v), "{raw}");
                }
            }
        }

        /// Texts a few edits away from the usual shapes: whatever the scan takes, it writes as
        /// the general walk does (which decides whatever the scan leaves).
        #[test]
        fn the_scan_never_takes_what_the_general_walk_would_write_otherwise() {
            let mut rng = rand::rngs::StdRng::seed_from_u64(6);
            let alphabet: Vec<char> = "{}[]:,\"\\ 0123456789.-+eEtrufalsn\n\tu".chars().collect();
            let (mut taken, mut total) = (0, 0);
            for v in variants() {
                for base in TAKEN.iter().chain(LEFT) {
                    for _ in 0..400 {
                        let mut chars: Vec<char> = base.chars().collect();
                        for _ in 0..rng.gen_range(1..=3) {
                            let at = rng.gen_range(0..=chars.len());
                            match rng.gen_range(0..3) {
                                0 if at < chars.len() => {
                                    chars.remove(at);
                                }
                                1 if at < chars.len() => {
                                    chars[at] = alphabet[rng.gen_range(0..alphabet.len())];
                                }
                                _ => chars.insert(at, alphabet[rng.gen_range(0..alphabet.len())]),
                            }
                        }
                        let raw: String = chars.into_iter().collect();
                        total += 1;
                        if let Some(out) = scanned(&raw, v) {
                            taken += 1;
                            assert_eq!(out, general(&raw, v), "{raw}");
                        }
                    }
                }
            }
            // Both kinds were tried: edits the scan takes and edits it leaves.
            assert!(taken > total / 20 && taken < total, "{taken} of {total}");
        }
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
    out.push_str(r#"{"type":"event","event":"state","user_time":"#);
    Dates::new(variant).push(&mut out, now);
    out.push_str(r#","tracker_id":"#);
    push_int(&mut out, state.tracker_id);
    out.push_str(r#","data":"#);
    write_state_data(&mut out, state, variant);
    out.push('}');
    out
}

/// Appends one `state_batch` item, `{"type":"source_state_event","tracker_id":…,"state":{…}}`
/// (`tracker_id` is an extension, as in `state` events), to a batch being rendered in place.
pub fn write_batch_item(out: &mut String, state: &TrackerState, variant: Variant) {
    out.push_str(r#"{"type":"source_state_event","tracker_id":"#);
    push_int(out, state.tracker_id);
    out.push_str(r#","state":"#);
    write_state_data(out, state, variant);
    out.push('}');
}

/// The start of a batch event frame, up to its `data` array: `{"type":"event","event":…,
/// "user_time":…,"data":`. The caller appends the array and the closing `}`.
pub fn write_batch_head(out: &mut String, event: &str, variant: Variant, now: DateTime<Utc>) {
    out.push_str(r#"{"type":"event","event":"#);
    push_json_str(out, event);
    out.push_str(r#","user_time":"#);
    Dates::new(variant).push(out, now);
    out.push_str(r#","data":"#);
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
            additional: r#"{"hardware_key": {"value": "2091", "updated": "2018-10-17T08:47:09Z"}}"#
                .into(),
            actual_track_update: None,
        }
    }

    /// A state with every optional field empty or unusual, and an `additional` map holding
    /// what a jsonb column may: non-object values, escapes, `updated` that is not a date.
    fn odd() -> TrackerState {
        let t = Utc.with_ymd_and_hms(2020, 3, 29, 0, 59, 59).unwrap();
        TrackerState {
            tracker_id: 9_007_199_254_740_993,
            source_id: -1,
            change_no: 5,
            gps_updated: None,
            gps_signal_level: None,
            lat: -0.000_000_1,
            lng: 0.0,
            heading: 0,
            speed: 250,
            alt: -30,
            gps_precision: Some(5),
            gsm_lbs: Some(true),
            connection_status: "signal_lost".into(),
            movement_status: "moving".into(),
            movement_status_update: None,
            ignition: true,
            ignition_update: None,
            gsm_updated: None,
            gsm_signal_level: None,
            gsm_network_name: Some("Q\"uote\\ back\u{1} ctl \u{e9}\u{1F600}\n".into()),
            gsm_roaming: None,
            last_update: t,
            battery_level: None,
            battery_update: None,
            inputs: vec![],
            inputs_update: None,
            outputs: vec![true],
            outputs_update: Some(t),
            additional: r#"{"a": 1, "b\"k": "x", "arr": [1, {"y": null}], "item": {"value": "v", "updated": "2020-03-29T02:30:00+05:30", "extra": [true, false]}, "bad": {"updated": "not a date"}, "num": {"updated": 17}, "empty": {}}"#.into(),
            actual_track_update: Some(t),
        }
    }

    /// The frames, byte for byte, as the serde-based renderer this one replaced wrote them.
    #[test]
    fn frames_are_byte_identical_to_the_serde_rendering() {
        let now = Utc.with_ymd_and_hms(2018, 10, 17, 11, 0, 0).unwrap();
        let full = Variant {
            format: Format::Full,
            tz: chrono_tz::Europe::Berlin,
            iso: false,
        };
        let compact = Variant {
            format: Format::Compact,
            tz: chrono_tz::UTC,
            iso: true,
        };
        let kolkata = Variant {
            format: Format::Full,
            tz: chrono_tz::Asia::Kolkata,
            iso: true,
        };
        let cases = [
            (
                sample(),
                full,
                r##"{"type":"event","event":"state","user_time":"2018-10-17 13:00:00","tracker_id":7,"data":{"source_id":10284,"gps":{"updated":"2018-10-17 12:51:43","signal_level":100,"location":{"lat":14.330065796228606,"lng":-90.99037259141691},"heading":248,"speed":0,"alt":431},"connection_status":"active","movement_status":"parked","movement_status_update":"2018-10-17 12:51:43","ignition":false,"ignition_update":"2018-10-17 12:51:43","gsm":{"updated":"2018-10-17 12:51:43","signal_level":80,"network_name":"T-Mobile","roaming":false},"last_update":"2018-10-17 12:51:43","battery_level":97,"battery_update":"2018-10-17 12:51:43","inputs":[false,false,true],"inputs_update":"2018-10-17 12:51:43","outputs":[true,false],"outputs_update":"2018-10-17 12:51:43","additional":{"hardware_key":{"value":"2091","updated":"2018-10-17 10:47:09"}},"actual_track_update":null}}"##,
            ),
            (
                sample(),
                compact,
                r##"{"type":"event","event":"state","user_time":"2018-10-17T11:00:00+00:00","tracker_id":7,"data":{"source_id":10284,"gps":{"updated":"2018-10-17T10:51:43+00:00","signal_level":100,"location":{"lat":14.330065796228606,"lng":-90.99037259141691},"heading":248,"speed":0,"alt":431},"connection_status":"active","movement_status":"parked","movement_status_update":"2018-10-17T10:51:43+00:00","ignition":false,"ignition_update":"2018-10-17T10:51:43+00:00","last_update":"2018-10-17T10:51:43+00:00"}}"##,
            ),
            (
                odd(),
                kolkata,
                r##"{"type":"event","event":"state","user_time":"2018-10-17T16:30:00+05:30","tracker_id":9007199254740993,"data":{"source_id":-1,"gps":{"updated":null,"signal_level":null,"location":{"lat":-1e-7,"lng":0.0},"heading":0,"speed":250,"alt":-30,"precision":5,"gsm_lbs":true},"connection_status":"signal_lost","movement_status":"moving","movement_status_update":null,"ignition":true,"ignition_update":null,"gsm":{"updated":null,"signal_level":null,"network_name":"Q\"uote\\ back\u0001 ctl é😀\n","roaming":null},"last_update":"2020-03-29T06:29:59+05:30","battery_level":null,"battery_update":null,"inputs":[],"inputs_update":null,"outputs":[true],"outputs_update":"2020-03-29T06:29:59+05:30","additional":{"a":1,"b\"k":"x","arr":[1,{"y":null}],"item":{"value":"v","updated":"2020-03-29T02:30:00+05:30","extra":[true,false]},"bad":{"updated":"not a date"},"num":{"updated":17},"empty":{}},"actual_track_update":"2020-03-29T06:29:59+05:30"}}"##,
            ),
            (
                odd(),
                full,
                r##"{"type":"event","event":"state","user_time":"2018-10-17 13:00:00","tracker_id":9007199254740993,"data":{"source_id":-1,"gps":{"updated":null,"signal_level":null,"location":{"lat":-1e-7,"lng":0.0},"heading":0,"speed":250,"alt":-30,"precision":5,"gsm_lbs":true},"connection_status":"signal_lost","movement_status":"moving","movement_status_update":null,"ignition":true,"ignition_update":null,"gsm":{"updated":null,"signal_level":null,"network_name":"Q\"uote\\ back\u0001 ctl é😀\n","roaming":null},"last_update":"2020-03-29 01:59:59","battery_level":null,"battery_update":null,"inputs":[],"inputs_update":null,"outputs":[true],"outputs_update":"2020-03-29 01:59:59","additional":{"a":1,"b\"k":"x","arr":[1,{"y":null}],"item":{"value":"v","updated":"2020-03-28 22:00:00","extra":[true,false]},"bad":{"updated":"not a date"},"num":{"updated":17},"empty":{}},"actual_track_update":"2020-03-29 01:59:59"}}"##,
            ),
            (
                odd(),
                compact,
                r##"{"type":"event","event":"state","user_time":"2018-10-17T11:00:00+00:00","tracker_id":9007199254740993,"data":{"source_id":-1,"gps":{"updated":null,"signal_level":null,"location":{"lat":-1e-7,"lng":0.0},"heading":0,"speed":250,"alt":-30,"precision":5,"gsm_lbs":true},"connection_status":"signal_lost","movement_status":"moving","movement_status_update":null,"ignition":true,"ignition_update":null,"last_update":"2020-03-29T00:59:59+00:00"}}"##,
            ),
        ];
        for (state, variant, want) in cases {
            assert_eq!(state_event(&state, variant, now), want);
            let parsed: serde_json::Value = serde_json::from_str(want).unwrap();
            let data: serde_json::Value =
                serde_json::from_str(&state_data(&state, variant)).unwrap();
            assert_eq!(data, parsed["data"]);
        }
        let mut item = String::new();
        write_batch_item(&mut item, &odd(), full);
        assert_eq!(
            item,
            r##"{"type":"source_state_event","tracker_id":9007199254740993,"state":{"source_id":-1,"gps":{"updated":null,"signal_level":null,"location":{"lat":-1e-7,"lng":0.0},"heading":0,"speed":250,"alt":-30,"precision":5,"gsm_lbs":true},"connection_status":"signal_lost","movement_status":"moving","movement_status_update":null,"ignition":true,"ignition_update":null,"gsm":{"updated":null,"signal_level":null,"network_name":"Q\"uote\\ back\u0001 ctl é😀\n","roaming":null},"last_update":"2020-03-29 01:59:59","battery_level":null,"battery_update":null,"inputs":[],"inputs_update":null,"outputs":[true],"outputs_update":"2020-03-29 01:59:59","additional":{"a":1,"b\"k":"x","arr":[1,{"y":null}],"item":{"value":"v","updated":"2020-03-28 22:00:00","extra":[true,false]},"bad":{"updated":"not a date"},"num":{"updated":17},"empty":{}},"actual_track_update":"2020-03-29 01:59:59"}}"##
        );
    }

    #[test]
    fn additional_values_keep_their_digits_and_lose_only_whitespace() {
        let v = Variant {
            format: Format::Full,
            tz: chrono_tz::UTC,
            iso: false,
        };
        let render = |raw: &str| {
            let mut out = String::new();
            additional::write(&mut out, raw, v);
            out
        };
        assert_eq!(
            render(r#"{"n": {"value": 1.50, "big": 123456789012345678901234567890}}"#),
            r#"{"n":{"value":1.50,"big":123456789012345678901234567890}}"#
        );
        assert_eq!(
            render(r#"{"s": {"value": "a b\" c", "updated": "2020-01-01T00:00:00.123456+00:00"}}"#),
            r#"{"s":{"value":"a b\" c","updated":"2020-01-01 00:00:00"}}"#
        );
        assert_eq!(
            render(r#"{"k\u0041": {"updated": "2020-01-01T00:00:00Z"}}"#),
            r#"{"kA":{"updated":"2020-01-01 00:00:00"}}"#
        );
        for not_an_object in [
            "[1, 2]",
            "3",
            "\"x\"",
            "null",
            "",
            "{",
            "{\"a\": 1} trailing",
        ] {
            assert_eq!(render(not_an_object), "{}", "{not_an_object}");
        }
    }

    #[test]
    fn a_cached_date_is_reused_only_within_its_second() {
        let v = Variant {
            format: Format::Full,
            tz: chrono_tz::Europe::Berlin,
            iso: true,
        };
        // 2020-03-29 01:59:59.9 UTC is the last second before Berlin's clocks go forward.
        let t = Utc.with_ymd_and_hms(2020, 3, 29, 0, 59, 59).unwrap();
        let mut dates = Dates::new(v);
        let mut out = String::new();
        for t in [
            t,
            t + chrono::Duration::milliseconds(900),
            t + chrono::Duration::seconds(1),
            t - chrono::Duration::milliseconds(1),
        ] {
            dates.push(&mut out, t);
            out.push(',');
        }
        assert_eq!(
            out,
            r#""2020-03-29T01:59:59+01:00","2020-03-29T01:59:59+01:00","2020-03-29T03:00:00+02:00","2020-03-29T01:59:58+01:00","#
        );
    }

    #[test]
    fn json_strings_are_escaped_as_serde_json_escapes_them() {
        let all: String = (0u32..0x80)
            .filter_map(char::from_u32)
            .chain("é😀".chars())
            .collect();
        let mut out = String::new();
        push_json_str(&mut out, &all);
        assert_eq!(out, serde_json::to_string(&all).unwrap());
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

    /// A full-format variant and the chrono format string its dates must match.
    fn full_and_chrono_format(tz: Tz, iso: bool) -> (Variant, &'static str) {
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
        (v, f)
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
                let (v, f) = full_and_chrono_format(tz, iso);
                for step in 0..2000i64 {
                    // Every ~4.4 days over 24 years, at varying times of day (DST changes too).
                    let t = start + chrono::Duration::seconds(step * 379_417);
                    let want = t.with_timezone(&tz).format(f).to_string();
                    assert_eq!(v.date(t), want, "{tz} iso={iso}");
                }
            }
        }
    }

    /// Date-times through a day kept by the thread (consecutive ones share it) read as chrono
    /// formats them, on days the zone's offset changes too: every 7 minutes 13 seconds through
    /// the weeks around both of a year's changes, in zones with unusual offsets and changes.
    #[test]
    fn kept_days_render_as_chrono_around_offset_changes() {
        let zones = [
            chrono_tz::Europe::Berlin,
            chrono_tz::America::Sao_Paulo,
            chrono_tz::Australia::Lord_Howe,
            chrono_tz::Pacific::Chatham,
            chrono_tz::America::St_Johns,
            chrono_tz::Asia::Kathmandu,
        ];
        for tz in zones {
            for iso in [false, true] {
                let (v, f) = full_and_chrono_format(tz, iso);
                for (month, day) in [(3, 20), (9, 20), (10, 20)] {
                    let start = Utc.with_ymd_and_hms(2024, month, day, 0, 0, 0).unwrap();
                    let mut dates = Dates::new(v);
                    for step in 0..(21 * 24 * 60 / 7) {
                        let t = start + chrono::Duration::seconds(step * 433);
                        let want = t.with_timezone(&tz).format(f).to_string();
                        assert_eq!(v.date(t), want, "{tz} iso={iso}");
                        let mut out = String::new();
                        dates.push(&mut out, t);
                        assert_eq!(out, format!("\"{want}\""), "{tz} iso={iso}");
                    }
                }
            }
        }
    }

    /// A day on which the zone's offset changes is kept too (as not steady), so its
    /// date-times do not look for it again (49 looks at the zone each), and days on both sides
    /// of a midnight stay kept together.
    #[test]
    fn days_with_offset_changes_and_both_sides_of_midnight_stay_kept() {
        let kept = |tz: Tz, second: i64| {
            DAYS.with(|days| {
                days.borrow()
                    .0
                    .iter()
                    .flatten()
                    .find(|d| d.tz == tz && d.holds(second))
                    .map(|d| d.steady)
            })
        };
        let berlin = chrono_tz::Europe::Berlin;
        // Berlin's clocks went forward at 01:00 UTC on 2020-03-29.
        let change = Utc
            .with_ymd_and_hms(2020, 3, 29, 0, 30, 0)
            .unwrap()
            .timestamp();
        let before = Utc
            .with_ymd_and_hms(2020, 3, 28, 22, 59, 59)
            .unwrap()
            .timestamp();
        let after = Utc
            .with_ymd_and_hms(2020, 3, 28, 23, 0, 0)
            .unwrap()
            .timestamp();
        for second in [change, before, after] {
            assert!(LocalDay::of(berlin, second).is_some());
        }
        assert_eq!(kept(berlin, change), Some(false));
        assert_eq!(kept(berlin, before), Some(true));
        assert_eq!(kept(berlin, change + 3600), Some(false));
        let v = Variant {
            format: Format::Full,
            tz: berlin,
            iso: true,
        };
        assert_eq!(
            v.date(DateTime::from_timestamp(change + 3600, 0).unwrap()),
            "2020-03-29T03:30:00+02:00"
        );
    }

    /// The direct reading of PostgreSQL's date-times in `additional` gives chrono's instant (to
    /// the second, all a date is rendered to), and leaves what it does not know to chrono.
    #[test]
    fn postgres_dates_in_additional_read_as_chrono_reads_them() {
        let chrono_reads = |raw: &str| {
            let text: String = serde_json::from_str(raw).ok()?;
            DateTime::parse_from_rfc3339(&text)
                .ok()
                .and_then(|t| DateTime::from_timestamp(t.timestamp(), 0))
        };
        let direct = [
            r#""2026-12-06T13:00:00.123456+00:00""#,
            r#""2026-12-06T13:00:00+01:00""#,
            r#""2024-02-29T23:59:59.9-03:30""#,
            r#""1999-12-31T00:00:00Z""#,
            r#""2026-12-06T13:00:00.1+23:59""#,
            r#""0001-01-01T00:00:00+05:45""#,
            r#""2026-06-30T12:34:56.123456789-09:00""#,
        ];
        for raw in direct {
            let t = additional::postgres_rfc3339(raw);
            assert!(t.is_some(), "{raw} should be read directly");
            assert_eq!(t, chrono_reads(raw), "{raw}");
        }
        let left_to_chrono = [
            r#""2026-12-06 13:00:00+00:00""#,
            r#""2026-12-06t13:00:00Z""#,
            r#""2026-12-06T13:00:60Z""#,
            r#""2026-12-06T13:00:00-00:00""#,
            r#""2026-12-06T13:00:00.+00:00""#,
            r#""2026-12-06T13:00:00.1234567890Z""#,
            r#""2023-02-29T13:00:00Z""#,
            r#""2026-13-06T13:00:00Z""#,
            r#""2026-12-06T24:00:00Z""#,
            r#""2026-12-06T13:00:00+24:00""#,
            r#""2026-12-06T13:00:00+01""#,
            r#""2026-12-06T13:00:00Z "#,
            r#""2026-12-06T13:00:00Zx""#,
            r#""2026-12-06T13:00:00""#,
            r#""2026-12-0\u0036T13:00:00Z""#,
            r#"2026-12-06T13:00:00Z"#,
            r#""+2026-12-06T13:00:00Z""#,
            "",
            "\"",
        ];
        for raw in left_to_chrono {
            assert_eq!(additional::postgres_rfc3339(raw), None, "{raw}");
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

/// What rendering costs, for profiling (not a check: it asserts nothing and is ignored by
/// default). `cargo test --release --lib render_cost -- --ignored --nocapture` prints the time
/// per event; under `valgrind --tool=callgrind` (with `N=1`) it gives instructions, which do
/// not drift with the machine. The states are the benchmark's (`bench/src/db.rs`, `writer.rs`).
#[cfg(test)]
mod render_cost {
    use super::*;
    use chrono::TimeZone;

    #[test]
    #[ignore]
    fn render_cost_per_state_event() {
        let base = Utc.with_ymd_and_hms(2026, 12, 6, 14, 0, 0).unwrap();
        let seed = base - chrono::Duration::seconds(3600);
        let state = |i: i64| {
            let t = base + chrono::Duration::milliseconds(i * 7);
            TrackerState {
                tracker_id: i % 100_000,
                change_no: i,
                gps_updated: Some(t),
                movement_status_update: Some(t),
                ignition_update: Some(t),
                gsm_updated: Some(seed),
                last_update: t,
                battery_update: Some(t),
                inputs_update: Some(seed),
                outputs_update: Some(seed),
                additional: format!(
                    r#"{{"hardware_key": {{"value": "{i}", "updated": "2026-12-06T13:00:00.123456+00:00"}}}}"#
                )
                .into(),
                actual_track_update: None,
                ..tests::sample()
            }
        };
        let states: Vec<TrackerState> = (0..20_000).map(state).collect();
        let rounds: usize = std::env::var("N")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10);
        let berlin = chrono_tz::Europe::Berlin;
        for (name, format, tz) in [
            ("full, Europe/Berlin", Format::Full, berlin),
            ("compact, Europe/Berlin", Format::Compact, berlin),
            ("full, UTC", Format::Full, chrono_tz::UTC),
        ] {
            let variant = Variant {
                format,
                tz,
                iso: false,
            };
            let start = std::time::Instant::now();
            let mut bytes = 0;
            for _ in 0..rounds {
                for s in &states {
                    bytes += state_event(s, variant, base).len();
                }
            }
            let events = rounds * states.len();
            println!(
                "{name}: {:.0} ns per event, {} bytes",
                start.elapsed().as_nanos() as f64 / events as f64,
                bytes / events
            );
        }
    }
}
