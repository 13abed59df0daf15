//! [`TrackerState`] rows decoded straight from PostgreSQL's binary format.
//!
//! The event processor decodes every state it publishes (tens of thousands a second), and
//! sqlx's typed `try_get` was 30% of the gateway's CPU in the benchmark's `ingest` profile: per
//! column a type-compatibility check that clones type descriptors, a `Result` the size of
//! `sqlx::Error` moved through every layer, integers read through a generic variable-width
//! reader, timestamps built by calendar arithmetic from 2000-01-01, and `additional` parsed into
//! a `serde_json::Value` (a map and a string per key) only to be written out again. Here a
//! result's column names and types are checked once (by OID, at its first row), each value's
//! bytes are read as what that type says they are, and `additional` stays the JSON text
//! PostgreSQL sent (rendered in [`crate::model`]).

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use sqlx::postgres::{PgArguments, PgRow, PgValueFormat};
use sqlx::query::Query;
use sqlx::{Column, PgPool, Postgres, Row, TypeInfo, ValueRef};

use crate::model::{self, TrackerState, STATE_FIELDS};

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

/// A column that could not be decoded: its index and what was wrong. Boxed so that the
/// `Result` of every column read stays small (`sqlx::Error`'s size, moved through each `?`, was
/// a fifth of the decoding time).
struct Bad(Box<(usize, String)>);

fn bad(i: usize, what: impl std::fmt::Display) -> Bad {
    Bad(Box::new((i, what.to_string())))
}

impl Bad {
    fn into_sqlx(self, row: &PgRow) -> sqlx::Error {
        let (i, what) = *self.0;
        let name = row.columns().get(i).map(|c| c.name()).unwrap_or("?");
        sqlx::Error::ColumnDecode {
            index: format!("{i} ({name})"),
            source: what.into(),
        }
    }
}

/// The types each column of [`crate::model::STATE_COLUMNS`] may have, in order.
const TYPES: [&[u32]; 30] = [
    &[INT8],
    &[INT8],
    &[INT8],
    &[TIMESTAMPTZ],
    &[INT2],
    &[FLOAT8],
    &[FLOAT8],
    &[INT2],
    &[INT4],
    &[INT4],
    &[INT4],
    &[BOOL],
    &[TEXT, VARCHAR],
    &[TEXT, VARCHAR],
    &[TIMESTAMPTZ],
    &[BOOL],
    &[TIMESTAMPTZ],
    &[TIMESTAMPTZ],
    &[INT2],
    &[TEXT, VARCHAR],
    &[BOOL],
    &[TIMESTAMPTZ],
    &[INT2],
    &[TIMESTAMPTZ],
    &[BOOL_ARRAY],
    &[TIMESTAMPTZ],
    &[BOOL_ARRAY],
    &[TIMESTAMPTZ],
    &[JSONB, JSON],
    &[TIMESTAMPTZ],
];

/// The checked columns of a result: every row of one result shares them, so a result is
/// checked once, at its first row.
pub struct Layout {
    additional_is_jsonb: bool,
}

impl Layout {
    /// Checks that `row` has the names, types and (binary) format of [`crate::model::STATE_COLUMNS`].
    pub fn of(row: &PgRow) -> Result<Layout, sqlx::Error> {
        let columns = row.columns();
        if columns.len() != STATE_FIELDS.len()
            || columns.iter().zip(STATE_FIELDS).any(|(c, f)| c.name() != f)
        {
            return Err(sqlx::Error::ColumnNotFound(
                "a TrackerState row must select STATE_COLUMNS".into(),
            ));
        }
        for (i, (column, want)) in columns.iter().zip(TYPES).enumerate() {
            let info = column.type_info();
            if !info.oid().is_some_and(|oid| want.contains(&oid.0)) {
                return Err(bad(
                    i,
                    format!("unexpected column type {} (want OID {want:?})", info.name()),
                )
                .into_sqlx(row));
            }
        }
        if row.try_get_raw(0)?.format() != PgValueFormat::Binary {
            return Err(bad(0, "values in text format; binary expected").into_sqlx(row));
        }
        let additional_is_jsonb = columns[28]
            .type_info()
            .oid()
            .is_some_and(|oid| oid.0 == JSONB);
        Ok(Layout {
            additional_is_jsonb,
        })
    }
}

fn fixed<const N: usize>(i: usize, bytes: &[u8]) -> Result<[u8; N], Bad> {
    bytes
        .try_into()
        .map_err(|_| bad(i, format!("{} bytes, want {N}", bytes.len())))
}

// The binary forms, by type: big-endian integers and floats, one byte per boolean, UTF-8 text,
// and microseconds since 2000-01-01 UTC for a timestamptz.

fn int2(i: usize, b: &[u8]) -> Result<i16, Bad> {
    fixed(i, b).map(i16::from_be_bytes)
}

fn int4(i: usize, b: &[u8]) -> Result<i32, Bad> {
    fixed(i, b).map(i32::from_be_bytes)
}

fn int8(i: usize, b: &[u8]) -> Result<i64, Bad> {
    fixed(i, b).map(i64::from_be_bytes)
}

fn float8(i: usize, b: &[u8]) -> Result<f64, Bad> {
    fixed(i, b).map(f64::from_be_bytes)
}

fn boolean(i: usize, b: &[u8]) -> Result<bool, Bad> {
    fixed::<1>(i, b).map(|[b]| b != 0)
}

fn text(i: usize, bytes: &[u8]) -> Result<&str, Bad> {
    std::str::from_utf8(bytes).map_err(|e| bad(i, e))
}

fn string(i: usize, bytes: &[u8]) -> Result<String, Bad> {
    text(i, bytes).map(str::to_owned)
}

fn status(i: usize, bytes: &[u8]) -> Result<Cow<'static, str>, Bad> {
    text(i, bytes).map(model::status_word)
}

/// One row being decoded, its columns already checked by a [`Layout`]: each column's bytes
/// (`None` for NULL), taken from the row in one pass. Taking them column by column as each
/// field was decoded (`try_get_raw`, a `Result` of sqlx's error through every field) was a
/// sixth of the event processor's instructions per state.
struct Columns<'r> {
    values: [Option<&'r [u8]>; STATE_FIELDS.len()],
    days: super::time::RowDays,
}

impl<'r> Columns<'r> {
    fn of(row: &'r PgRow) -> Result<Columns<'r>, Bad> {
        let mut values = [None; STATE_FIELDS.len()];
        for (i, v) in values.iter_mut().enumerate() {
            let value = row.try_get_raw(i).map_err(|e| bad(i, e))?;
            if !value.is_null() {
                *v = Some(value.as_bytes().map_err(|e| bad(i, e))?);
            }
        }
        Ok(Columns {
            values,
            days: Default::default(),
        })
    }

    /// The bytes of column `i`, or `None` for NULL.
    #[inline]
    fn raw(&self, i: usize) -> Result<Option<&'r [u8]>, Bad> {
        self.values
            .get(i)
            .copied()
            .ok_or_else(|| bad(i, "no such column"))
    }

    /// A `timestamptz`, clamped to years 0001–9999 (`infinity` included): see [`super::time`]
    /// (through the row's [`super::time::RowDays`]).
    fn time(&self, i: usize, bytes: &[u8]) -> Result<DateTime<Utc>, Bad> {
        Ok(self
            .days
            .from_pg_micros(i64::from_be_bytes(fixed(i, bytes)?)))
    }

    fn required(&self, i: usize) -> Result<&'r [u8], Bad> {
        self.raw(i)?.ok_or_else(|| bad(i, "unexpected NULL"))
    }

    /// Column `i` decoded by `decode`, or `None` for NULL.
    fn opt<T>(
        &self,
        i: usize,
        decode: impl Fn(usize, &'r [u8]) -> Result<T, Bad>,
    ) -> Result<Option<T>, Bad> {
        self.raw(i)?.map(|b| decode(i, b)).transpose()
    }

    /// Column `i`, which must not be NULL, decoded by `decode`.
    fn req<T>(
        &self,
        i: usize,
        decode: impl Fn(usize, &'r [u8]) -> Result<T, Bad>,
    ) -> Result<T, Bad> {
        decode(i, self.required(i)?)
    }
    /// A one-dimensional `boolean[]`; a NULL element (an input not reported) reads as `false`.
    fn bools(&self, i: usize) -> Result<Vec<bool>, Bad> {
        let bytes = self.required(i)?;
        let word = |at: usize| -> Result<i32, Bad> {
            bytes
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(i32::from_be_bytes)
                .ok_or_else(|| bad(i, "boolean[]: truncated"))
        };
        let dims = word(0)?;
        if dims == 0 {
            return Ok(Vec::new());
        }
        if dims != 1 {
            return Err(bad(
                i,
                "boolean[]: only one-dimensional arrays are supported",
            ));
        }
        if word(8)? as u32 != BOOL {
            return Err(bad(i, "boolean[]: element type is not boolean"));
        }
        let len = usize::try_from(word(12)?).map_err(|_| bad(i, "boolean[]: negative length"))?;
        // Header: dims, flags, element OID, then (length, lower bound) for the one dimension.
        let mut at = 20;
        let mut out = Vec::with_capacity(len.min(bytes.len()));
        for _ in 0..len {
            match word(at)? {
                1 => {}
                -1 => {
                    out.push(false);
                    at += 4;
                    continue;
                }
                _ => return Err(bad(i, "boolean[]: malformed element")),
            }
            let b = *bytes
                .get(at + 4)
                .ok_or_else(|| bad(i, "boolean[]: truncated"))?;
            out.push(b != 0);
            at += 5;
        }
        Ok(out)
    }

    /// A `jsonb` (or `json`) value's JSON text.
    fn json(&self, i: usize, jsonb: bool) -> Result<Box<str>, Bad> {
        let bytes = self.required(i)?;
        let json = if jsonb {
            // jsonb's binary form: a version byte (1), then the text.
            match bytes.split_first() {
                Some((1, json)) => json,
                _ => return Err(bad(i, "unknown jsonb format version")),
            }
        } else {
            bytes
        };
        text(i, json).map(Box::from)
    }

    fn state(&self, layout: &Layout) -> Result<TrackerState, Bad> {
        Ok(TrackerState {
            tracker_id: self.req(0, int8)?,
            source_id: self.req(1, int8)?,
            change_no: self.req(2, int8)?,
            gps_updated: self.opt(3, |i, b| self.time(i, b))?,
            gps_signal_level: self.opt(4, int2)?,
            lat: self.req(5, float8)?,
            lng: self.req(6, float8)?,
            heading: self.req(7, int2)?,
            speed: self.req(8, int4)?,
            alt: self.req(9, int4)?,
            gps_precision: self.opt(10, int4)?,
            gsm_lbs: self.opt(11, boolean)?,
            connection_status: self.req(12, status)?,
            movement_status: self.req(13, status)?,
            movement_status_update: self.opt(14, |i, b| self.time(i, b))?,
            ignition: self.req(15, boolean)?,
            ignition_update: self.opt(16, |i, b| self.time(i, b))?,
            gsm_updated: self.opt(17, |i, b| self.time(i, b))?,
            gsm_signal_level: self.opt(18, int2)?,
            gsm_network_name: self.opt(19, string)?,
            gsm_roaming: self.opt(20, boolean)?,
            last_update: self.req(21, |i, b| self.time(i, b))?,
            battery_level: self.opt(22, int2)?,
            battery_update: self.opt(23, |i, b| self.time(i, b))?,
            inputs: self.bools(24)?,
            inputs_update: self.opt(25, |i, b| self.time(i, b))?,
            outputs: self.bools(26)?,
            outputs_update: self.opt(27, |i, b| self.time(i, b))?,
            additional: self.json(28, layout.additional_is_jsonb)?,
            actual_track_update: self.opt(29, |i, b| self.time(i, b))?,
        })
    }
}

/// Decodes a row of a result whose columns `layout` checked.
pub fn decode(row: &PgRow, layout: &Layout) -> Result<TrackerState, sqlx::Error> {
    Columns::of(row)
        .and_then(|c| c.state(layout))
        .map_err(|e| e.into_sqlx(row))
}

/// Runs `query`, which selects [`crate::model::STATE_COLUMNS`], and decodes its rows as they
/// arrive, checking the columns once. On a connection taken from the pool first: a query run on
/// the pool itself passes every row through one more stream of sqlx's (the pool's, around the
/// connection's): 2% of the event processor's instructions per state.
pub async fn fetch_states(
    pool: &PgPool,
    query: Query<'_, Postgres, PgArguments>,
) -> Result<Vec<TrackerState>, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut rows = query.fetch(&mut *conn);
    let mut states = Vec::new();
    let mut layout: Option<Layout> = None;
    while let Some(row) = rows.try_next().await? {
        let layout = match &layout {
            Some(layout) => layout,
            None => layout.insert(Layout::of(&row)?),
        };
        // One row that cannot be decoded (a value the gateway cannot render, written by any
        // writer of the table) is left out, not the whole read: failing it failed every round
        // and every resync, and no tracker's state was delivered until that row was rewritten.
        match decode(&row, layout) {
            Ok(state) => states.push(state),
            Err(e) => skipped_row(&row, &e),
        }
    }
    Ok(states)
}

/// Logs a row left out of a read because it could not be decoded.
pub(crate) fn skipped_row(row: &PgRow, e: &sqlx::Error) {
    let tracker = row.try_get::<i64, _>(0).ok();
    tracing::error!(
        tracker = ?tracker,
        error = %e,
        "a row that cannot be decoded is left out (it is delivered once it is written again)"
    );
}

/// A single row, checked on its own (queries decoding many rows use [`fetch_states`]).
impl<'r> sqlx::FromRow<'r, PgRow> for TrackerState {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        decode(row, &Layout::of(row)?)
    }
}
