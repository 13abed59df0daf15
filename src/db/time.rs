//! Timestamps as PostgreSQL sends them, decoded without panicking.
//!
//! `timestamptz` holds `infinity`, `-infinity` and years up to 294276, which chrono cannot
//! represent: sqlx's own decoding panics on them ("`NaiveDateTime + TimeDelta` overflowed"). Any
//! writer of the database may store one (an operator's `expires_at = 'infinity'` for a session
//! that never ends, a pipeline's bad clock), and a panic in the event processor stopped every
//! event of the process. Here every value decodes: those outside years 0001–9999 are clamped to
//! that range (so `infinity` reads as the end of 9999, `-infinity` as the start of year 1),
//! which keeps every rendered date in the documented `YYYY-MM-DD` form and in range for any
//! time zone's offset.

use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use sqlx::postgres::{PgTypeInfo, PgValueFormat, PgValueRef};
use sqlx::{Decode, Postgres, Type};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
pub const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The earliest instant kept: 0001-01-02 00:00:00 UTC (a day inside year 1, for any offset).
fn earliest() -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(1, 1, 2)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(DateTime::<Utc>::MIN_UTC, |d| d.and_utc())
}

/// The latest instant kept: 9999-12-30 23:59:59.999999 UTC.
fn latest() -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(9999, 12, 30)
        .and_then(|d| d.and_hms_micro_opt(23, 59, 59, 999_999))
        .map_or(DateTime::<Utc>::MAX_UTC, |d| d.and_utc())
}

/// [`earliest`] and [`latest`] in PostgreSQL's microseconds (since 2000-01-01 UTC).
const EARLIEST_PG_MICROS: i64 = -63_082_195_200_000_000;
const LATEST_PG_MICROS: i64 = 252_455_529_599_999_999;

/// A binary `timestamptz` (microseconds since 2000-01-01 UTC; `i64::MAX`/`MIN` are
/// ±infinity), clamped to years 0001–9999. On the decoding path of every state: one clamp of
/// the integer, no calendar work beyond chrono's own.
pub fn from_pg_micros(micros: i64) -> DateTime<Utc> {
    let m = micros.clamp(EARLIEST_PG_MICROS, LATEST_PG_MICROS);
    DateTime::from_timestamp_micros(m + PG_EPOCH_MICROS).unwrap_or(DateTime::UNIX_EPOCH)
}

/// [`from_pg_micros`] for the date-times of one row, keeping the date of the last day decoded:
/// a state's ten date-times are mostly of one day, and finding a day's date (chrono's calendar
/// arithmetic) was about half of decoding a date-time.
#[derive(Default)]
pub struct RowDays {
    /// The last day decoded (days since the Unix epoch) and its date.
    last: std::cell::Cell<Option<(i64, NaiveDate)>>,
}

impl RowDays {
    const MICROS_PER_DAY: i64 = 86_400_000_000;

    /// The same instant as [`from_pg_micros`].
    pub fn from_pg_micros(&self, micros: i64) -> DateTime<Utc> {
        let m = micros.clamp(EARLIEST_PG_MICROS, LATEST_PG_MICROS) + PG_EPOCH_MICROS;
        let (day, in_day) = (
            m.div_euclid(Self::MICROS_PER_DAY),
            m.rem_euclid(Self::MICROS_PER_DAY),
        );
        let date = match self.last.get() {
            Some((d, date)) if d == day => Some(date),
            _ => {
                let date = DateTime::from_timestamp(day * 86_400, 0).map(|t| t.date_naive());
                self.last.set(date.map(|date| (day, date)));
                date
            }
        };
        // Both in range: `in_day` is under a day's microseconds.
        let (secs, nanos) = (
            (in_day / 1_000_000) as u32,
            (in_day % 1_000_000) as u32 * 1000,
        );
        date.zip(NaiveTime::from_num_seconds_from_midnight_opt(secs, nanos))
            .map_or_else(|| from_pg_micros(micros), |(d, t)| d.and_time(t).and_utc())
    }
}

/// A `timestamptz` column decoded by [`from_pg_micros`], for `#[sqlx(try_from = "PgTime")]`
/// on `DateTime<Utc>` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgTime(pub DateTime<Utc>);

impl From<PgTime> for DateTime<Utc> {
    fn from(t: PgTime) -> Self {
        t.0
    }
}

impl Type<Postgres> for PgTime {
    fn type_info() -> PgTypeInfo {
        <DateTime<Utc> as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <DateTime<Utc> as Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for PgTime {
    fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        match value.format() {
            PgValueFormat::Binary => {
                let bytes: [u8; 8] = value
                    .as_bytes()?
                    .try_into()
                    .map_err(|_| "timestamptz: not 8 bytes")?;
                Ok(PgTime(from_pg_micros(i64::from_be_bytes(bytes))))
            }
            PgValueFormat::Text => match value.as_str()? {
                "infinity" => Ok(PgTime(latest())),
                "-infinity" => Ok(PgTime(earliest())),
                _ => Ok(PgTime(<DateTime<Utc> as Decode<Postgres>>::decode(value)?)),
            },
        }
    }
}

/// A nullable `timestamptz` column decoded as [`PgTime`], for `#[sqlx(try_from =
/// "OptPgTime")]` on `Option<DateTime<Utc>>` fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptPgTime(pub Option<DateTime<Utc>>);

impl From<OptPgTime> for Option<DateTime<Utc>> {
    fn from(t: OptPgTime) -> Self {
        t.0
    }
}

impl Type<Postgres> for OptPgTime {
    fn type_info() -> PgTypeInfo {
        <PgTime as Type<Postgres>>::type_info()
    }

    fn compatible(ty: &PgTypeInfo) -> bool {
        <PgTime as Type<Postgres>>::compatible(ty)
    }
}

impl<'r> Decode<'r, Postgres> for OptPgTime {
    fn decode(value: PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        if sqlx::ValueRef::is_null(&value) {
            return Ok(OptPgTime(None));
        }
        Ok(OptPgTime(Some(PgTime::decode(value)?.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_timestamp_decodes_within_years_1_to_9999() {
        assert_eq!(from_pg_micros(0).to_rfc3339(), "2000-01-01T00:00:00+00:00");
        assert_eq!(from_pg_micros(i64::MAX), latest());
        assert_eq!(from_pg_micros(i64::MIN), earliest());
        // Year 270000 is a valid timestamptz; chrono's range ends near 262143.
        let far = (270_000i64 - 2000) * 365 * 86_400 * 1_000_000;
        assert_eq!(from_pg_micros(far), latest());
        assert_eq!(from_pg_micros(-far), earliest());
        // The constants are the ends' instants.
        assert_eq!(from_pg_micros(EARLIEST_PG_MICROS), earliest());
        assert_eq!(from_pg_micros(LATEST_PG_MICROS), latest());
        assert_eq!(from_pg_micros(EARLIEST_PG_MICROS - 1), earliest());
        // Any zone's offset keeps the clamped ends inside chrono's range.
        let berlin = latest().with_timezone(&chrono_tz::Pacific::Kiritimati);
        assert_eq!(berlin.format("%Y").to_string(), "9999");
    }

    #[test]
    fn a_rows_days_decode_as_each_timestamp_alone() {
        use rand::Rng;
        let days = RowDays::default();
        let mut rng = rand::thread_rng();
        let day = 86_400_000_000i64;
        let mut values = vec![
            i64::MIN,
            i64::MAX,
            0,
            -1,
            1,
            day - 1,
            day,
            -day,
            -day - 1,
            EARLIEST_PG_MICROS,
            EARLIEST_PG_MICROS - 1,
            LATEST_PG_MICROS,
            LATEST_PG_MICROS + 1,
            -PG_EPOCH_MICROS - 1,
        ];
        // Runs of the same day (the cache's case) and random instants across the whole range.
        let now = 850_000_000_000_000i64;
        values.extend((0..2_000).map(|_| now + rng.gen_range(-day..day)));
        values.extend((0..2_000).map(|_| rng.gen::<i64>()));
        values.extend((0..2_000).map(|_| rng.gen_range(EARLIEST_PG_MICROS..=LATEST_PG_MICROS)));
        for m in values {
            assert_eq!(days.from_pg_micros(m), from_pg_micros(m), "{m}");
        }
    }
}
