//! Sensor readings for `readings_batch`: the rows of `sensor_values`, `state_readings` and
//! `counter_readings` (migration 0004) as one typed row, read in one batched query, the filters of
//! a `readings_batch` request, and the rendering of one tracker's readings batch item
//! (PROTOCOL.md §4). Owns no state; the groups in [`crate::batch`] keep the latest rows.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::model::{TrackerId, Variant};

/// Which list of a readings item a row belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Category {
    Input,
    Virtual,
    State,
    Counter,
}

/// One reading's identity within its tracker.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReadingKey {
    pub category: Category,
    /// The sensor id for sensors (0 otherwise).
    pub sensor_id: i64,
    /// The state field or counter type ("" for sensors).
    pub name: String,
}

/// One reading: a row of one of the three readings tables, with its sensor's description.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ReadingRow {
    pub tracker_id: TrackerId,
    pub change_no: i64,
    /// `input`, `virtual`, `state` or `counter`.
    pub category: String,
    pub sensor_id: Option<i64>,
    /// Sensor name, state field or counter type.
    pub name: String,
    pub label: Option<String>,
    pub sensor_type: Option<String>,
    pub units: Option<String>,
    pub units_type: Option<String>,
    pub converted_units_type: Option<String>,
    pub min_value: Option<f64>,
    pub max_value: Option<f64>,
    pub composite_sensor_ids: Option<Vec<i64>>,
    pub part_of: Option<i64>,
    pub value: Option<f64>,
    pub converted_value: Option<f64>,
    pub json_value: Option<serde_json::Value>,
    /// Clamped to years 0001–9999 (see [`crate::db::time`]).
    #[sqlx(try_from = "crate::db::time::PgTime")]
    pub update_time: DateTime<Utc>,
}

impl ReadingRow {
    pub fn category(&self) -> Category {
        match self.category.as_str() {
            "input" => Category::Input,
            "virtual" => Category::Virtual,
            "state" => Category::State,
            _ => Category::Counter,
        }
    }

    pub fn key(&self) -> ReadingKey {
        let category = self.category();
        match category {
            Category::Input | Category::Virtual => ReadingKey {
                category,
                sensor_id: self.sensor_id.unwrap_or_default(),
                name: String::new(),
            },
            Category::State | Category::Counter => ReadingKey {
                category,
                sensor_id: 0,
                name: self.name.clone(),
            },
        }
    }
}

/// A reading of input sensor 1 for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn test_reading(tracker_id: TrackerId, change_no: i64) -> ReadingRow {
    ReadingRow {
        tracker_id,
        change_no,
        category: "input".into(),
        sensor_id: Some(1),
        name: "input".into(),
        label: None,
        sensor_type: None,
        units: None,
        units_type: None,
        converted_units_type: None,
        min_value: None,
        max_value: None,
        composite_sensor_ids: None,
        part_of: None,
        value: Some(1.0),
        converted_value: None,
        json_value: None,
        update_time: chrono::Utc::now(),
    }
}

/// The filters of a `readings_batch` request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReadingsFilter {
    /// Only sensors of this type (states and counters are dropped).
    pub sensor_type: Option<String>,
    /// Whether sensors that are parts of a composite sensor are included.
    pub include_components: bool,
}

impl ReadingsFilter {
    pub fn accepts(&self, r: &ReadingRow) -> bool {
        match r.category() {
            Category::Input | Category::Virtual => {
                (self.include_components || r.part_of.is_none())
                    && self
                        .sensor_type
                        .as_deref()
                        .is_none_or(|t| r.sensor_type.as_deref() == Some(t))
            }
            Category::State | Category::Counter => self.sensor_type.is_none(),
        }
    }
}

/// The current readings of these trackers, in one query over the three tables. A row that
/// cannot be decoded is left out (and logged), not the whole read (see `db::rows::fetch_states`).
pub async fn readings_by_ids(
    pool: &PgPool,
    ids: &[TrackerId],
) -> Result<Vec<ReadingRow>, sqlx::Error> {
    use futures_util::TryStreamExt;
    use sqlx::FromRow;
    let mut rows = sqlx::query(
        "SELECT v.tracker_id, v.change_no, s.kind AS category, s.id AS sensor_id, s.name, \
                s.label, s.type AS sensor_type, s.units, s.units_type, s.converted_units_type, \
                s.min_value, s.max_value, s.composite_sensor_ids, s.part_of, v.value, \
                v.converted_value, NULL::jsonb AS json_value, v.update_time \
           FROM sensor_values v JOIN sensors s ON s.id = v.sensor_id \
          WHERE v.tracker_id = ANY($1) \
         UNION ALL \
         SELECT tracker_id, change_no, 'state', NULL, field, NULL, NULL, NULL, NULL, NULL, \
                NULL, NULL, NULL, NULL, NULL, NULL, value, update_time \
           FROM state_readings WHERE tracker_id = ANY($1) \
         UNION ALL \
         SELECT tracker_id, change_no, 'counter', NULL, type, NULL, NULL, NULL, NULL, NULL, \
                NULL, NULL, NULL, NULL, value, NULL, NULL, update_time \
           FROM counter_readings WHERE tracker_id = ANY($1)",
    )
    .bind(ids)
    .fetch(pool);
    let mut out = Vec::new();
    while let Some(row) = rows.try_next().await? {
        match ReadingRow::from_row(&row) {
            Ok(r) => out.push(r),
            Err(e) => crate::db::rows::skipped_row(&row, &e),
        }
    }
    Ok(out)
}

#[derive(Serialize)]
struct InputItem<'a> {
    sensor_id: i64,
    label: &'a str,
    units: &'a str,
    name: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    min_value: Option<f64>,
    max_value: Option<f64>,
    value: Option<f64>,
    units_type: Option<&'a str>,
    converted_units_type: Option<&'a str>,
    converted_value: Option<f64>,
    update_time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    composite_sensor_ids: Option<&'a [i64]>,
}

#[derive(Serialize)]
struct VirtualItem<'a> {
    sensor_id: i64,
    label: &'a str,
    value: Option<f64>,
    #[serde(rename = "type")]
    kind: &'a str,
    update_time: String,
}

#[derive(Serialize)]
struct StateItem<'a> {
    field: &'a str,
    value: &'a serde_json::Value,
    update_time: String,
}

#[derive(Serialize)]
struct CounterItem<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    value: Option<f64>,
    update_time: String,
}

#[derive(Serialize)]
struct Item<'a> {
    tracker_id: TrackerId,
    inputs: Vec<InputItem<'a>>,
    states: Vec<StateItem<'a>>,
    virtual_sensors: Vec<VirtualItem<'a>>,
    counters: Vec<CounterItem<'a>>,
}

/// One tracker's readings batch item:
/// `{"tracker_id":N,"inputs":[…],"states":[…],"virtual_sensors":[…],"counters":[…]}`.
pub fn render_item<'a>(
    tracker_id: TrackerId,
    rows: impl IntoIterator<Item = &'a ReadingRow>,
    variant: Variant,
) -> String {
    static NULL: serde_json::Value = serde_json::Value::Null;
    let mut item = Item {
        tracker_id,
        inputs: Vec::new(),
        states: Vec::new(),
        virtual_sensors: Vec::new(),
        counters: Vec::new(),
    };
    for r in rows {
        let update_time = variant.date(r.update_time);
        match r.category() {
            Category::Input => item.inputs.push(InputItem {
                sensor_id: r.sensor_id.unwrap_or_default(),
                label: r.label.as_deref().unwrap_or_default(),
                units: r.units.as_deref().unwrap_or_default(),
                name: &r.name,
                kind: r.sensor_type.as_deref().unwrap_or_default(),
                min_value: r.min_value,
                max_value: r.max_value,
                value: r.value,
                units_type: r.units_type.as_deref(),
                converted_units_type: r.converted_units_type.as_deref(),
                converted_value: r.converted_value,
                update_time,
                composite_sensor_ids: r.composite_sensor_ids.as_deref(),
            }),
            Category::Virtual => item.virtual_sensors.push(VirtualItem {
                sensor_id: r.sensor_id.unwrap_or_default(),
                label: r.label.as_deref().unwrap_or_default(),
                value: r.value,
                kind: r.sensor_type.as_deref().unwrap_or_default(),
                update_time,
            }),
            Category::State => item.states.push(StateItem {
                field: &r.name,
                value: r.json_value.as_ref().unwrap_or(&NULL),
                update_time,
            }),
            Category::Counter => item.counters.push(CounterItem {
                kind: &r.name,
                value: r.value,
                update_time,
            }),
        }
    }
    // Serializing plain structs of numbers, strings and JSON values cannot fail.
    serde_json::to_string(&item).unwrap_or_default()
}
