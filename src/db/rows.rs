//! [`TrackerState`] rows decoded straight from PostgreSQL's binary format.
//!
//! The event processor decodes every state it publishes (tens of thousands a second), and
//! sqlx's typed `try_get` was 30% of the gateway's CPU in the benchmark's `ingest` profile: per
//! column a type-compatibility check that clones type descriptors, a `Result` the size of
//! `sqlx::Error` moved through every layer, integers read through a generic variable-width
//! reader, timestamps built by calendar arithmetic from 2000-01-01, and `additional` parsed into
//! a `serde_json::Value` (a map and a string per key) only to be written out again. Here each
//! column's type is checked by its OID, its bytes are read as what that OID says they are, and
//! `additional` stays the JSON text PostgreSQL sent (rendered in [`crate::model`]).

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgRow, PgValueFormat};
use sqlx::{Column, Row, TypeInfo, ValueRef};

use crate::model::{TrackerState, STATE_FIELDS};

// Type OIDs (pg_type.dat): stable across PostgreSQL versions.
const BOOL: u32 = 16;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const TEXT: u32 = 25;
const JSON: u32 = 114;
const FLOAT8: u32 = 701;
const BOOL_ARRAY: u32 = 1000;
const VARCHAR: u32 = 1043;
const TIMESTAMPTZ: u32 = 1184;
const JSONB: u32 = 3802;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

type BoxDynError = Box<dyn std::error::Error + Send + Sync>;

/// One row being decoded: column `i`'s bytes, after checking its type.
struct Columns<'r> {
    row: &'r PgRow,
}

impl<'r> Columns<'r> {
    fn error(&self, i: usize, source: impl Into<BoxDynError>) -> sqlx::Error {
        let name = self.row.columns().get(i).map(|c| c.name()).unwrap_or("?");
        sqlx::Error::ColumnDecode {
            index: format!("{i} ({name})"),
            source: source.into(),
        }
    }

    /// The bytes of column `i`, or `None` for NULL, if its type is one of `oids`.
    fn raw(&self, i: usize, oids: &[u32]) -> Result<Option<&'r [u8]>, sqlx::Error> {
        let Some(column) = self.row.columns().get(i) else {
            return Err(sqlx::Error::ColumnIndexOutOfBounds {
                index: i,
                len: self.row.columns().len(),
            });
        };
        let info = column.type_info();
        if !info.oid().is_some_and(|oid| oids.contains(&oid.0)) {
            return Err(self.error(
                i,
                format!("unexpected column type {} (want OID {oids:?})", info.name()),
            ));
        }
        let value = self.row.try_get_raw(i)?;
        if value.is_null() {
            return Ok(None);
        }
        if value.format() != PgValueFormat::Binary {
            return Err(self.error(i, "value in text format; binary expected"));
        }
        value.as_bytes().map(Some).map_err(|e| self.error(i, e))
    }

    fn required(&self, i: usize, oids: &[u32]) -> Result<&'r [u8], sqlx::Error> {
        self.raw(i, oids)?
            .ok_or_else(|| self.error(i, "unexpected NULL"))
    }

    fn fixed<const N: usize>(&self, i: usize, bytes: &[u8]) -> Result<[u8; N], sqlx::Error> {
        bytes
            .try_into()
            .map_err(|_| self.error(i, format!("{} bytes, want {N}", bytes.len())))
    }

    fn opt_i16(&self, i: usize) -> Result<Option<i16>, sqlx::Error> {
        self.raw(i, &[INT2])?
            .map(|b| self.fixed(i, b).map(i16::from_be_bytes))
            .transpose()
    }

    fn opt_i32(&self, i: usize) -> Result<Option<i32>, sqlx::Error> {
        self.raw(i, &[INT4])?
            .map(|b| self.fixed(i, b).map(i32::from_be_bytes))
            .transpose()
    }

    fn i16(&self, i: usize) -> Result<i16, sqlx::Error> {
        self.fixed(i, self.required(i, &[INT2])?)
            .map(i16::from_be_bytes)
    }

    fn i32(&self, i: usize) -> Result<i32, sqlx::Error> {
        self.fixed(i, self.required(i, &[INT4])?)
            .map(i32::from_be_bytes)
    }

    fn i64(&self, i: usize) -> Result<i64, sqlx::Error> {
        self.fixed(i, self.required(i, &[INT8])?)
            .map(i64::from_be_bytes)
    }

    fn f64(&self, i: usize) -> Result<f64, sqlx::Error> {
        self.fixed(i, self.required(i, &[FLOAT8])?)
            .map(f64::from_be_bytes)
    }

    fn opt_bool(&self, i: usize) -> Result<Option<bool>, sqlx::Error> {
        self.raw(i, &[BOOL])?
            .map(|b| self.fixed::<1>(i, b).map(|[b]| b != 0))
            .transpose()
    }

    fn bool(&self, i: usize) -> Result<bool, sqlx::Error> {
        self.fixed::<1>(i, self.required(i, &[BOOL])?)
            .map(|[b]| b != 0)
    }

    fn text(&self, i: usize, bytes: &'r [u8]) -> Result<&'r str, sqlx::Error> {
        std::str::from_utf8(bytes).map_err(|e| self.error(i, e))
    }

    fn opt_string(&self, i: usize) -> Result<Option<String>, sqlx::Error> {
        self.raw(i, &[TEXT, VARCHAR])?
            .map(|b| self.text(i, b).map(str::to_owned))
            .transpose()
    }

    fn string(&self, i: usize) -> Result<String, sqlx::Error> {
        self.text(i, self.required(i, &[TEXT, VARCHAR])?)
            .map(str::to_owned)
    }

    fn timestamp(&self, i: usize, bytes: &[u8]) -> Result<DateTime<Utc>, sqlx::Error> {
        let micros = i64::from_be_bytes(self.fixed(i, bytes)?);
        micros
            .checked_add(PG_EPOCH_MICROS)
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(|| self.error(i, format!("timestamp out of range ({micros} µs)")))
    }

    fn opt_time(&self, i: usize) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        self.raw(i, &[TIMESTAMPTZ])?
            .map(|b| self.timestamp(i, b))
            .transpose()
    }

    fn time(&self, i: usize) -> Result<DateTime<Utc>, sqlx::Error> {
        self.timestamp(i, self.required(i, &[TIMESTAMPTZ])?)
    }

    /// A one-dimensional `boolean[]` without NULL elements (what sqlx's `Vec<bool>` accepted).
    fn bools(&self, i: usize) -> Result<Vec<bool>, sqlx::Error> {
        let bytes = self.required(i, &[BOOL_ARRAY])?;
        let bad = |what: &str| self.error(i, format!("boolean[]: {what}"));
        let word = |at: usize| -> Result<i32, sqlx::Error> {
            bytes
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(i32::from_be_bytes)
                .ok_or_else(|| bad("truncated"))
        };
        let dims = word(0)?;
        if dims == 0 {
            return Ok(Vec::new());
        }
        if dims != 1 {
            return Err(bad("only one-dimensional arrays are supported"));
        }
        if word(8)? as u32 != BOOL {
            return Err(bad("element type is not boolean"));
        }
        let len = usize::try_from(word(12)?).map_err(|_| bad("negative length"))?;
        // Header: dims, flags, element OID, then (length, lower bound) for the one dimension.
        let mut at = 20;
        let mut out = Vec::with_capacity(len.min(bytes.len()));
        for _ in 0..len {
            if word(at)? != 1 {
                return Err(bad("NULL or malformed element"));
            }
            let b = *bytes.get(at + 4).ok_or_else(|| bad("truncated"))?;
            out.push(b != 0);
            at += 5;
        }
        Ok(out)
    }

    /// A `jsonb` (or `json`) value's JSON text.
    fn json(&self, i: usize) -> Result<Box<str>, sqlx::Error> {
        let bytes = self.required(i, &[JSONB, JSON])?;
        let is_jsonb = self
            .row
            .columns()
            .get(i)
            .and_then(|c| c.type_info().oid())
            .is_some_and(|oid| oid.0 == JSONB);
        let text = if is_jsonb {
            // jsonb's binary form: a version byte (1), then the text.
            match bytes.split_first() {
                Some((1, text)) => text,
                _ => return Err(self.error(i, "unknown jsonb format version")),
            }
        } else {
            bytes
        };
        self.text(i, text).map(Box::from)
    }
}

/// Reads a row of [`crate::model::STATE_COLUMNS`] by position. A row whose columns are not
/// those is refused rather than misread.
impl<'r> sqlx::FromRow<'r, PgRow> for TrackerState {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        let columns = row.columns();
        if columns.len() != STATE_FIELDS.len()
            || columns[0].name() != STATE_FIELDS[0]
            || columns[29].name() != STATE_FIELDS[29]
        {
            return Err(sqlx::Error::ColumnNotFound(
                "a TrackerState row must select STATE_COLUMNS".into(),
            ));
        }
        let c = Columns { row };
        Ok(TrackerState {
            tracker_id: c.i64(0)?,
            source_id: c.i64(1)?,
            change_no: c.i64(2)?,
            gps_updated: c.opt_time(3)?,
            gps_signal_level: c.opt_i16(4)?,
            lat: c.f64(5)?,
            lng: c.f64(6)?,
            heading: c.i16(7)?,
            speed: c.i32(8)?,
            alt: c.i32(9)?,
            gps_precision: c.opt_i32(10)?,
            gsm_lbs: c.opt_bool(11)?,
            connection_status: c.string(12)?,
            movement_status: c.string(13)?,
            movement_status_update: c.opt_time(14)?,
            ignition: c.bool(15)?,
            ignition_update: c.opt_time(16)?,
            gsm_updated: c.opt_time(17)?,
            gsm_signal_level: c.opt_i16(18)?,
            gsm_network_name: c.opt_string(19)?,
            gsm_roaming: c.opt_bool(20)?,
            last_update: c.time(21)?,
            battery_level: c.opt_i16(22)?,
            battery_update: c.opt_time(23)?,
            inputs: c.bools(24)?,
            inputs_update: c.opt_time(25)?,
            outputs: c.bools(26)?,
            outputs_update: c.opt_time(27)?,
            additional: c.json(28)?,
            actual_track_update: c.opt_time(29)?,
        })
    }
}
