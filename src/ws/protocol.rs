//! The client side of the wire protocol (PROTOCOL.md §2, §3, §6): parsing a text frame into a
//! typed [`ClientMessage`], and rendering responses and error frames. Pure functions, no I/O.

use std::borrow::Cow;
use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::batch::{self, Target};
use crate::model::{Format, TrackerId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Unsubscribe,
}

impl Action {
    pub fn wire(self) -> &'static str {
        match self {
            Action::Subscribe => "subscription/subscribe",
            Action::Unsubscribe => "subscription/unsubscribe",
        }
    }
}

/// Which of the two message shapes the client used; the response mirrors it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Legacy,
    Requests,
}

/// A `state` request: trackers and their format.
#[derive(Debug, Clone, PartialEq)]
pub struct StateRequest {
    pub trackers: Vec<TrackerId>,
    pub format: Format,
}

/// A `state_batch` request. `target` is required to subscribe; to unsubscribe, a missing target
/// means every `state_batch` of the session on this connection.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRequest {
    pub target: Option<Target>,
    pub rate: Duration,
    pub format: Format,
}

/// A `readings_batch` request. As for `state_batch`, a missing target on unsubscribe means
/// every `readings_batch` of the session on this connection.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingsRequest {
    pub target: Option<Target>,
    pub rate: Duration,
    pub sensor_type: Option<String>,
    pub include_components: bool,
}

/// One entry of a `requests` array (or the single implied entry of the legacy form).
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    State(StateRequest),
    StateBatch(BatchRequest),
    ReadingsBatch(ReadingsRequest),
    /// A request this server could not accept; answered in its slot of the response.
    Failed {
        kind: String,
        error: ProtoError,
    },
}

impl Item {
    /// The request type name, as used for `events` and the response's `data` keys.
    pub fn kind(&self) -> &str {
        match self {
            Item::State(_) => "state",
            Item::StateBatch(_) => "state_batch",
            Item::ReadingsBatch(_) => "readings_batch",
            Item::Failed { kind, .. } => kind,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientMessage {
    pub action: Action,
    pub hash: String,
    pub form: Form,
    /// The event/request type names, in order, for the response's `events`.
    pub events: Vec<String>,
    pub items: Vec<Item>,
    pub iso_datetime: bool,
    /// The request's parameters (without `action` and `hash`), echoed in error frames.
    pub echo: Value,
    /// Tracker ids named in the message, a repeated one each time (see [`Self::tracker_count`]).
    named: usize,
}

impl ClientMessage {
    /// The tracker ids the message names, as it names them (a repeated id counts each time,
    /// in a batch's target as in `trackers`, and as the HTTP API counts them): what
    /// `websocket.max_trackers_per_request` bounds.
    pub fn tracker_count(&self) -> usize {
        self.named
    }
}

/// A protocol error code with its description (PROTOCOL.md §6).
#[derive(Debug, Clone, PartialEq)]
pub struct ProtoError {
    pub code: u16,
    pub description: Cow<'static, str>,
}

impl ProtoError {
    pub fn new(code: u16, description: impl Into<Cow<'static, str>>) -> Self {
        ProtoError {
            code,
            description: description.into(),
        }
    }
    pub fn wrong_hash() -> Self {
        Self::new(3, "Wrong hash")
    }
    pub fn session_not_found() -> Self {
        Self::new(4, "User or API key not found or session ended")
    }
    pub fn bad_format() -> Self {
        Self::new(5, "Wrong request format")
    }
    pub fn unexpected() -> Self {
        Self::new(6, "Unexpected error")
    }
    pub fn invalid(detail: impl Into<Cow<'static, str>>) -> Self {
        let detail = detail.into();
        Self::new(7, format!("Invalid parameters: {detail}"))
    }
    pub fn too_many_trackers(limit: usize) -> Self {
        Self::new(
            9,
            format!("Too many trackers in one request (limit {limit})"),
        )
    }
    pub fn too_many_batches(limit: usize) -> Self {
        Self::new(
            9,
            format!("Too many batch subscriptions on this connection (limit {limit})"),
        )
    }
    pub fn frame_too_large(limit: usize) -> Self {
        Self::new(9, format!("Message too large (limit {limit} bytes)"))
    }
    pub fn db_unavailable() -> Self {
        Self::new(14, "Database is unavailable, try again")
    }
    /// A failed read while answering `what`, logged as the HTTP API logs it: unavailability
    /// (code 14, the client may retry) at warn, anything else (code 6) at error.
    pub fn db(what: &str, e: &sqlx::Error) -> Self {
        if crate::db::is_unavailable(e) {
            tracing::warn!(error = %e, "{what}: database unavailable");
            Self::db_unavailable()
        } else {
            tracing::error!(error = %e, "{what} failed");
            Self::unexpected()
        }
    }
    pub fn rate_limited() -> Self {
        Self::new(15, "Too many requests (rate limit exceeded)")
    }
}

/// A parse failure: the error plus what the error frame should say of the request.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub action: Option<String>,
    pub error: ProtoError,
    pub data: Option<Value>,
}

/// Renders an error frame.
pub fn error_frame(action: Option<&str>, error: &ProtoError, data: Option<&Value>) -> String {
    let mut v = json!({
        "type": "error",
        "action": action,
        "status": {"code": error.code, "description": error.description},
    });
    if let (Some(d), Some(obj)) = (data, v.as_object_mut()) {
        obj.insert("data".into(), d.clone());
    }
    v.to_string()
}

pub fn rejection_frame(r: &Rejection) -> String {
    error_frame(r.action.as_deref(), &r.error, r.data.as_ref())
}

fn tracker_ids(v: Option<&Value>, field: &str) -> Result<Vec<TrackerId>, ProtoError> {
    let Some(v) = v else {
        return Err(ProtoError::invalid(format!("`{field}` is required")));
    };
    let Some(arr) = v.as_array() else {
        return Err(ProtoError::invalid(format!(
            "`{field}` must be an array of integers"
        )));
    };
    let mut out = Vec::with_capacity(arr.len());
    for item in arr {
        match item.as_i64() {
            Some(id) => out.push(id),
            None if item.is_null() => {
                return Err(ProtoError::invalid(format!(
                    "`{field}` must not hold nulls"
                )))
            }
            None => {
                return Err(ProtoError::invalid(format!(
                    "`{field}` must hold integer ids only"
                )))
            }
        }
    }
    Ok(out)
}

fn format_of(obj: &Map<String, Value>) -> Result<Format, ProtoError> {
    match obj.get("format") {
        None | Some(Value::Null) => Ok(Format::Full),
        Some(Value::String(s)) => Format::parse(s)
            .ok_or_else(|| ProtoError::invalid("`format` must be \"full\" or \"compact\"")),
        Some(_) => Err(ProtoError::invalid(
            "`format` must be \"full\" or \"compact\"",
        )),
    }
}

const KNOWN_TYPES: [&str; 4] = ["state", "state_batch", "readings_batch", "iot_monitor"];

fn target_of(v: Option<&Value>) -> Result<Option<Target>, ProtoError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let bad = || {
        ProtoError::invalid(
            "`target` must be {\"type\":\"all\"} or {\"type\":\"selected\",\"tracker_ids\":[…]}",
        )
    };
    let obj = v.as_object().ok_or_else(bad)?;
    match obj.get("type").and_then(Value::as_str) {
        Some("all") => Ok(Some(Target::All)),
        Some("selected") => {
            let mut ids = tracker_ids(obj.get("tracker_ids"), "tracker_ids")?;
            ids.sort_unstable();
            ids.dedup();
            Ok(Some(Target::Selected(ids)))
        }
        _ => Err(bad()),
    }
}

fn rate_of(obj: &Map<String, Value>) -> Result<Duration, ProtoError> {
    match obj.get("rate_limit") {
        None | Some(Value::Null) => Ok(batch::DEFAULT_RATE),
        Some(Value::String(s)) => batch::parse_rate(s).ok_or_else(|| {
            ProtoError::invalid(format!(
                "`rate_limit` must be a timespan like \"500ms\", \"5s\" or \"1m\", between {}ms and {}s",
                batch::MIN_RATE.as_millis(),
                batch::MAX_RATE.as_secs()
            ))
        }),
        Some(_) => Err(ProtoError::invalid("`rate_limit` must be a timespan string")),
    }
}

fn reject(action: Option<String>, error: ProtoError, data: Option<Value>) -> Box<Rejection> {
    Box::new(Rejection {
        action,
        error,
        data,
    })
}

/// The action and the hash that every message needs, judged in that order: the action (with
/// its wire name for the answer) and the hash, or the rejection, echoing `data`. An `action`
/// that is not a string is answered with a null action and no echo.
fn judge_head(
    action: Option<&Value>,
    hash: Option<&Value>,
    data: impl FnOnce() -> Option<Value>,
) -> Result<(Action, Option<String>, String), Box<Rejection>> {
    let Some(Value::String(name)) = action else {
        return Err(reject(None, ProtoError::bad_format(), None));
    };
    let wire = Some(format!("subscription/{name}"));
    let action = match name.as_str() {
        "subscribe" => Action::Subscribe,
        "unsubscribe" => Action::Unsubscribe,
        _ => return Err(reject(wire, ProtoError::bad_format(), data())),
    };
    match hash {
        Some(Value::String(h)) if h.chars().count() == 32 => Ok((action, wire, h.clone())),
        _ => Err(reject(wire, ProtoError::wrong_hash(), data())),
    }
}

/// The rejection of a message that does not parse: not JSON (code 5), or JSON with a value
/// this server cannot hold, such as a number beyond a double's range (`1e400`). The latter is
/// judged as far as its `action` and `hash` allow, as a message that parses is, and is then
/// code 7 naming what failed; its parameters are not echoed, since they could not be read.
fn unreadable(text: &str, error: &serde_json::Error) -> Box<Rejection> {
    /// The two fields read past any other value, unconverted.
    #[derive(serde::Deserialize)]
    struct Head {
        action: Option<Value>,
        hash: Option<Value>,
    }
    let Ok(head) = serde_json::from_str::<Head>(text) else {
        return reject(None, ProtoError::bad_format(), None);
    };
    match judge_head(head.action.as_ref(), head.hash.as_ref(), || None) {
        Ok((_, wire, _)) => reject(
            wire,
            ProtoError::invalid(format!("a value cannot be read ({error})")),
            None,
        ),
        Err(rejection) => rejection,
    }
}

fn parse_item(v: &Value) -> Result<Item, ProtoError> {
    let Some(obj) = v.as_object() else {
        return Err(ProtoError::invalid("each request must be an object"));
    };
    let kind = match obj.get("type") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(ProtoError::invalid("each request needs a string `type`")),
    };
    match kind {
        "state" => {
            let trackers = tracker_ids(obj.get("trackers"), "trackers")?;
            let format = format_of(obj)?;
            Ok(Item::State(StateRequest { trackers, format }))
        }
        "state_batch" => Ok(Item::StateBatch(BatchRequest {
            target: target_of(obj.get("target"))?,
            rate: rate_of(obj)?,
            format: format_of(obj)?,
        })),
        "readings_batch" => Ok(Item::ReadingsBatch(ReadingsRequest {
            target: target_of(obj.get("target"))?,
            rate: rate_of(obj)?,
            sensor_type: match obj.get("sensor_type") {
                None | Some(Value::Null) => None,
                Some(Value::String(t)) => Some(t.clone()),
                Some(_) => return Err(ProtoError::invalid("`sensor_type` must be a string")),
            },
            include_components: match obj.get("include_components") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ProtoError::invalid(
                        "`include_components` must be a boolean",
                    ))
                }
            },
        })),
        k if KNOWN_TYPES.contains(&k) => Ok(Item::Failed {
            kind: k.to_owned(),
            error: ProtoError::invalid(format!("request type `{k}` is not supported yet")),
        }),
        k => Err(ProtoError::invalid(format!("unknown request type `{k}`"))),
    }
}

/// Parses one text frame.
pub fn parse(text: &str) -> Result<ClientMessage, Box<Rejection>> {
    let value: Value = serde_json::from_str(text).map_err(|e| unreadable(text, &e))?;
    let Value::Object(obj) = value else {
        return Err(reject(None, ProtoError::bad_format(), None));
    };
    let mut echo = obj.clone();
    // `shift_remove` keeps the request's key order (`remove` swaps the last key into the gap).
    echo.shift_remove("action");
    echo.shift_remove("hash");
    let echo = Value::Object(echo);
    let data = (!echo.as_object().is_some_and(|o| o.is_empty())).then(|| echo.clone());
    let (action, wire, hash) = judge_head(obj.get("action"), obj.get("hash"), || data.clone())?;
    let iso_datetime = match obj.get("iso_datetime") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(reject(
                wire,
                ProtoError::invalid("`iso_datetime` must be a boolean"),
                data,
            ))
        }
    };

    let invalid = |e: ProtoError| reject(wire.clone(), e, data.clone());
    if let Some(requests) = obj.get("requests") {
        let Some(list) = requests.as_array().filter(|l| !l.is_empty()) else {
            return Err(invalid(ProtoError::invalid(
                "`requests` must be a non-empty array",
            )));
        };
        let mut items = Vec::with_capacity(list.len());
        let mut events = Vec::with_capacity(list.len());
        for r in list {
            let item = match parse_item(r) {
                Ok(item) => item,
                // A malformed `state` item fails alone; the others still proceed.
                Err(e) => match r.get("type").and_then(Value::as_str) {
                    Some(k) if KNOWN_TYPES.contains(&k) => Item::Failed {
                        kind: k.to_owned(),
                        error: e,
                    },
                    _ => return Err(invalid(e)),
                },
            };
            // A batch's target may be left out to unsubscribe (every batch of its type), never
            // to subscribe.
            let item = match item {
                Item::StateBatch(BatchRequest { target: None, .. })
                | Item::ReadingsBatch(ReadingsRequest { target: None, .. })
                    if action == Action::Subscribe =>
                {
                    Item::Failed {
                        kind: item.kind().to_owned(),
                        error: ProtoError::invalid("`target` is required"),
                    }
                }
                item => item,
            };
            let kind = item.kind();
            if !events.iter().any(|e| e == kind) {
                events.push(kind.to_owned());
            }
            items.push(item);
        }
        if items.iter().all(|i| matches!(i, Item::Failed { .. })) {
            // Nothing could be accepted: answer with a plain error, as for the legacy form.
            if let Some(Item::Failed { error, .. }) = items.first() {
                return Err(invalid(error.clone()));
            }
        }
        let ids_in = |v: Option<&Value>| v.and_then(Value::as_array).map_or(0, Vec::len);
        let named = list
            .iter()
            .map(|r| {
                ids_in(r.get("trackers"))
                    + ids_in(r.get("target").and_then(|t| t.get("tracker_ids")))
            })
            .sum();
        return Ok(ClientMessage {
            action,
            hash,
            form: Form::Requests,
            events,
            items,
            iso_datetime,
            echo,
            named,
        });
    }

    // Legacy form: `events` and `trackers`.
    let events: Vec<String> = match obj.get("events") {
        Some(Value::Array(list)) if !list.is_empty() => {
            let mut out = Vec::with_capacity(list.len());
            for e in list {
                match e.as_str() {
                    Some("state") => {
                        if !out.iter().any(|x| x == "state") {
                            out.push("state".to_owned());
                        }
                    }
                    Some(other) => {
                        return Err(invalid(ProtoError::invalid(format!(
                            "unknown event `{other}`"
                        ))))
                    }
                    None if e.is_null() => {
                        return Err(invalid(ProtoError::invalid("`events` must not hold nulls")))
                    }
                    None => {
                        return Err(invalid(ProtoError::invalid(
                            "`events` must hold event names",
                        )))
                    }
                }
            }
            out
        }
        _ => {
            return Err(invalid(ProtoError::invalid(
                "`events` must be a non-empty array of event names",
            )))
        }
    };
    let trackers = tracker_ids(obj.get("trackers"), "trackers").map_err(invalid)?;
    Ok(ClientMessage {
        action,
        hash,
        form: Form::Legacy,
        named: trackers.len(),
        events,
        items: vec![Item::State(StateRequest {
            trackers,
            format: Format::Full,
        })],
        iso_datetime,
        echo,
    })
}

/// A status map `{"<id>": "<status>", …}` as JSON text. Rendered straight to text (and shared:
/// a batch group keeps its target's map, see `BatchGroup::status_map`), since a hundred
/// dashboards joining a group of 100,000 trackers each built the map as a `serde_json` object
/// and serialized it again, about 20 ms apiece.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusMap(Arc<str>);

impl StatusMap {
    /// The map of `statuses` (distinct ids, each with one of the `access` statuses) in their
    /// order.
    pub fn new(statuses: impl IntoIterator<Item = (TrackerId, &'static str)>) -> StatusMap {
        let statuses = statuses.into_iter();
        let mut out = String::with_capacity(2 + statuses.size_hint().0 * 22);
        out.push('{');
        for (n, (id, status)) in statuses.enumerate() {
            if n > 0 {
                out.push(',');
            }
            // Ids are integers and statuses plain words: nothing to escape.
            let _ = write!(out, "\"{id}\":\"{status}\"");
        }
        out.push('}');
        StatusMap(out.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// This map with `later`'s entries added (an id in both keeps `later`'s status, in this
    /// map's place). Two items of one type in one request; rare, so done through `serde_json`.
    fn merged(&self, later: &StatusMap) -> StatusMap {
        if self == later {
            // Items answered alike (the same batch target asked twice): nothing to merge, and
            // parsing a fleet-sized map again for each would cost tens of milliseconds.
            return later.clone();
        }
        let parse = |m: &StatusMap| serde_json::from_str::<Map<String, Value>>(m.as_str());
        match (parse(self), parse(later)) {
            (Ok(mut map), Ok(more)) => {
                map.extend(more);
                StatusMap(Value::Object(map).to_string().into())
            }
            // Both were rendered by `new`; keep the later one should that ever not hold.
            _ => later.clone(),
        }
    }
}

/// Adds one item's result to the response's entry for its type (`per_type`, in request order).
/// Several items of one type share the entry: a success wins over a failure, and the status
/// maps of successful items are merged (an id in two items keeps the later status).
pub fn add_result(
    per_type: &mut Vec<(String, Result<StatusMap, ProtoError>)>,
    kind: &str,
    result: Result<StatusMap, ProtoError>,
) {
    let Some((_, entry)) = per_type.iter_mut().find(|(k, _)| k == kind) else {
        per_type.push((kind.to_owned(), result));
        return;
    };
    match (entry, result) {
        (Ok(map), Ok(more)) => *map = map.merged(&more),
        (entry @ Err(_), Ok(v)) => *entry = Ok(v),
        // A failure beside a success, or a second failure: the entry stands.
        _ => {}
    }
}

/// The subscribe response. `per_type` holds, for each event type of the request, either the
/// status map or the error that item got. Written as text around the maps, which are JSON
/// already; the bytes are those `serde_json` gives for the same object.
pub fn subscribe_response(
    form: Form,
    events: &[String],
    per_type: Vec<(String, Result<StatusMap, ProtoError>)>,
) -> String {
    let maps: usize = per_type
        .iter()
        .map(|(_, r)| r.as_ref().map_or(0, |m| m.as_str().len()))
        .sum();
    let mut out = String::with_capacity(128 + maps);
    out.push_str(r#"{"type":"response","action":"#);
    out.push_str(&Value::from(Action::Subscribe.wire()).to_string());
    out.push_str(r#","events":"#);
    out.push_str(&json!(events).to_string());
    out.push_str(r#","data":{"#);
    for (n, (kind, result)) in per_type.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str(&Value::from(kind.as_str()).to_string());
        out.push(':');
        match (form, result) {
            (Form::Legacy, Ok(map)) => out.push_str(map.as_str()),
            (_, Ok(map)) => {
                out.push_str(r#"{"success":true,"value":"#);
                out.push_str(map.as_str());
                out.push('}');
            }
            (_, Err(e)) => out.push_str(
                &json!({
                    "success": false,
                    "status": {"code": e.code, "description": e.description}
                })
                .to_string(),
            ),
        }
    }
    out.push_str("}}");
    out
}

/// The answer to `unsubscribe`: `ids` are the `state` trackers named; in the requests form each
/// type named has its entry, a batch's with no trackers (it left a whole group). A type whose
/// items all failed to parse (`items`) left nothing: its entry is the first one's error, as in
/// the subscribe response (a type with one good item is a success, as there).
pub fn unsubscribe_response(
    form: Form,
    events: &[String],
    items: &[Item],
    ids: &[TrackerId],
) -> String {
    let data = match form {
        Form::Legacy => json!(ids),
        Form::Requests => {
            let mut m = Map::new();
            for e in events {
                let of_kind: Vec<&Item> = items.iter().filter(|i| i.kind() == e).collect();
                let all_failed = of_kind.iter().all(|i| matches!(i, Item::Failed { .. }));
                let entry = match of_kind.first() {
                    Some(Item::Failed { error, .. }) if all_failed => json!({
                        "success": false,
                        "status": {"code": error.code, "description": error.description}
                    }),
                    _ => {
                        let value: &[TrackerId] = if e == "state" { ids } else { &[] };
                        json!({"success": true, "value": value})
                    }
                };
                m.insert(e.clone(), entry);
            }
            Value::Object(m)
        }
    };
    json!({
        "type": "response",
        "action": Action::Unsubscribe.wire(),
        "events": events,
        "data": data,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "f4bf1b75403d851653dad99c78c4b237";

    #[test]
    fn an_unsubscribe_item_that_failed_is_answered_with_its_error() {
        let m = parse(&format!(
            r#"{{"action":"unsubscribe","hash":"{HASH}","requests":[{{"type":"state","trackers":[2]}},{{"type":"state_batch","target":{{"type":"selected","tracker_ids":"oops"}}}},{{"type":"iot_monitor"}}]}}"#
        ))
        .unwrap();
        let r: Value =
            serde_json::from_str(&unsubscribe_response(m.form, &m.events, &m.items, &[2])).unwrap();
        assert_eq!(r["data"]["state"], json!({"success": true, "value": [2]}));
        assert_eq!(r["data"]["state_batch"]["success"], json!(false), "{r}");
        assert_eq!(r["data"]["state_batch"]["status"]["code"], json!(7), "{r}");
        assert_eq!(r["data"]["iot_monitor"]["success"], json!(false), "{r}");
        // One good item of a type makes its entry a success, as in the subscribe response.
        let m = parse(&format!(
            r#"{{"action":"unsubscribe","hash":"{HASH}","requests":[{{"type":"state","trackers":"x"}},{{"type":"state","trackers":[3]}}]}}"#
        ))
        .unwrap();
        let r: Value =
            serde_json::from_str(&unsubscribe_response(m.form, &m.events, &m.items, &[3])).unwrap();
        assert_eq!(r["data"]["state"], json!({"success": true, "value": [3]}));
    }

    #[test]
    fn legacy_subscribe_from_seed_004() {
        let m = parse(&format!(
            r#"{{"action":"subscribe","hash":"{HASH}","events":["state"],"trackers":[15564,15565,15568]}}"#
        ))
        .unwrap();
        assert_eq!(m.action, Action::Subscribe);
        assert_eq!(m.form, Form::Legacy);
        assert_eq!(m.events, ["state"]);
        assert_eq!(
            m.items,
            [Item::State(StateRequest {
                trackers: vec![15564, 15565, 15568],
                format: Format::Full
            })]
        );
    }

    #[test]
    fn requests_form_with_compact_format() {
        let m = parse(&format!(
            r#"{{"action":"subscribe","hash":"{HASH}","requests":[{{"type":"state","trackers":[1701976,1701975],"format":"compact"}}]}}"#
        ))
        .unwrap();
        assert_eq!(m.form, Form::Requests);
        assert_eq!(
            m.items,
            [Item::State(StateRequest {
                trackers: vec![1701976, 1701975],
                format: Format::Compact
            })]
        );
    }

    fn code_of(text: &str) -> (u16, Option<String>) {
        let r = parse(text).unwrap_err();
        (r.error.code, r.action)
    }

    #[test]
    fn errors_get_the_protocol_codes() {
        assert_eq!(code_of("not json"), (5, None));
        assert_eq!(code_of("[1,2]"), (5, None));
        assert_eq!(code_of(r#"{"hash":"x"}"#), (5, None));
        assert_eq!(
            code_of(r#"{"action":"dance"}"#),
            (5, Some("subscription/dance".into()))
        );
        assert_eq!(
            code_of(r#"{"action":"subscribe","hash":"short","events":["state"],"trackers":[1]}"#).0,
            3
        );
        assert_eq!(
            code_of(r#"{"action":"subscribe","hash":5,"events":["state"],"trackers":[1]}"#).0,
            3
        );
        let bad = [
            r#""events":["state"],"trackers":[1,null]"#,
            r#""events":["state"],"trackers":["1"]"#,
            r#""events":["state"],"trackers":[1.5]"#,
            r#""events":["state"],"trackers":null"#,
            r#""events":["states"],"trackers":[1]"#,
            r#""events":[null],"trackers":[1]"#,
            r#""events":[],"trackers":[1]"#,
            r#""requests":[{"type":"state","trackers":[1],"format":"tiny"}]"#,
            r#""requests":[{"type":"bogus"}]"#,
            r#""requests":[{"type":"state_batch","target":{"type":"all"},"rate_limit":"fast"}]"#,
            r#""requests":[{"type":"state_batch","target":{"type":"all"},"rate_limit":"10ms"}]"#,
            r#""requests":[{"type":"state_batch","target":{"type":"some"}}]"#,
            r#""requests":[{"type":"state_batch","target":{"type":"selected","tracker_ids":[null]}}]"#,
            r#""requests":[]"#,
        ];
        for b in bad {
            let text = format!(r#"{{"action":"subscribe","hash":"{HASH}",{b}}}"#);
            assert_eq!(code_of(&text).0, 7, "{text}");
        }
    }

    #[test]
    fn json_with_a_value_out_of_range_is_judged_as_far_as_it_reads() {
        let sub = Some("subscription/subscribe".to_owned());
        let r = parse(&format!(
            r#"{{"action":"subscribe","hash":"{HASH}","events":["state"],"trackers":[1e400]}}"#
        ))
        .unwrap_err();
        assert!(r.error.description.contains("out of range"), "{r:?}");
        assert_eq!((r.error.code, r.action), (7, sub.clone()));
        assert_eq!(
            code_of(r#"{"action":"subscribe","hash":"short","trackers":[1e400]}"#),
            (3, sub)
        );
        assert_eq!(
            code_of(r#"{"action":"dance","trackers":[1e400]}"#),
            (5, Some("subscription/dance".into()))
        );
        assert_eq!(code_of(r#"{"trackers":[1e400]}"#), (5, None));
        assert_eq!(
            code_of(r#"{"action":"subscribe","trackers":[1e400"#),
            (5, None)
        );
    }

    #[test]
    fn error_frame_echoes_parameters() {
        let r = parse(r#"{"action":"subscribe","hash":"x","events":["state"],"trackers":[15564]}"#)
            .unwrap_err();
        let v: Value = serde_json::from_str(&rejection_frame(&r)).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["action"], "subscription/subscribe");
        assert_eq!(v["status"]["code"], 3);
        assert_eq!(v["data"], json!({"events": ["state"], "trackers": [15564]}));
        // In the request's order, as seed 004's sample shows it.
        assert!(rejection_frame(&r).ends_with(r#""data":{"events":["state"],"trackers":[15564]}}"#));
    }

    #[test]
    fn a_failing_item_does_not_sink_the_others() {
        let m = parse(&format!(
            r#"{{"action":"subscribe","hash":"{HASH}","requests":[{{"type":"state","trackers":[1]}},{{"type":"state_batch","target":{{"type":"all"}},"rate_limit":"1y"}}]}}"#
        ))
        .unwrap();
        assert_eq!(m.events, ["state", "state_batch"]);
        assert!(matches!(m.items[1], Item::Failed { .. }));
    }

    /// A batch without a target is a malformed item when subscribing (a plain error frame when
    /// it is the only item, as for any other malformed item), and means "every batch of this
    /// type" when unsubscribing.
    #[test]
    fn a_batch_without_target_fails_to_subscribe_and_unsubscribes_all() {
        for kind in ["state_batch", "readings_batch"] {
            for target in ["", r#","target":null"#] {
                let alone = format!(
                    r#"{{"action":"subscribe","hash":"{HASH}","requests":[{{"type":"{kind}"{target}}}]}}"#
                );
                let r = parse(&alone).expect_err("a plain error");
                assert_eq!(r.error.code, 7, "{r:?}");
                assert!(r.error.description.contains("target"), "{r:?}");

                let with_state = format!(
                    r#"{{"action":"subscribe","hash":"{HASH}","requests":[{{"type":"state","trackers":[1]}},{{"type":"{kind}"{target}}}]}}"#
                );
                let m = parse(&with_state).unwrap();
                assert!(
                    matches!(&m.items[1], Item::Failed { kind: k, error } if k == kind && error.code == 7),
                    "{:?}",
                    m.items
                );

                let unsubscribe = alone.replace(r#""subscribe""#, r#""unsubscribe""#);
                let m = parse(&unsubscribe).unwrap();
                assert!(!matches!(&m.items[0], Item::Failed { .. }), "{:?}", m.items);
            }
        }
    }

    #[test]
    fn items_of_one_type_share_an_entry_where_a_success_wins() {
        let map = |m: &[(TrackerId, &'static str)]| StatusMap::new(m.iter().copied());
        let mut per_type = Vec::new();
        add_result(&mut per_type, "state", Err(ProtoError::invalid("x")));
        add_result(&mut per_type, "state_batch", Ok(map(&[(1, "normal")])));
        add_result(&mut per_type, "state", Ok(map(&[(2, "normal")])));
        add_result(&mut per_type, "state", Err(ProtoError::bad_format()));
        add_result(
            &mut per_type,
            "state_batch",
            Err(ProtoError::too_many_batches(2)),
        );
        add_result(
            &mut per_type,
            "state_batch",
            Ok(map(&[(3, "unknown"), (1, "blocked")])),
        );
        add_result(
            &mut per_type,
            "readings_batch",
            Err(ProtoError::invalid("y")),
        );
        add_result(
            &mut per_type,
            "readings_batch",
            Err(ProtoError::unexpected()),
        );
        assert_eq!(
            per_type,
            [
                ("state".to_owned(), Ok(map(&[(2, "normal")]))),
                (
                    "state_batch".to_owned(),
                    // The first item's ids keep their place; the later status wins.
                    Ok(map(&[(1, "blocked"), (3, "unknown")]))
                ),
                ("readings_batch".to_owned(), Err(ProtoError::invalid("y"))),
            ]
        );
    }

    #[test]
    fn a_status_map_is_the_json_object_of_its_statuses_in_order() {
        assert_eq!(StatusMap::new([]).as_str(), "{}");
        let m = StatusMap::new([(7, "normal"), (-3, "unknown"), (1, "disallowed")]);
        assert_eq!(
            m.as_str(),
            r#"{"7":"normal","-3":"unknown","1":"disallowed"}"#
        );
    }

    #[test]
    fn the_subscribe_response_is_what_serde_json_writes_for_it() {
        let per_type = vec![
            (
                "state".to_owned(),
                Ok(StatusMap::new([(2, "normal"), (1, "blocked")])),
            ),
            (
                "state_batch".to_owned(),
                Err(ProtoError::too_many_batches(2)),
            ),
        ];
        let events = ["state".to_owned(), "state_batch".to_owned()];
        let got = subscribe_response(Form::Requests, &events, per_type.clone());
        let want = json!({
            "type": "response",
            "action": Action::Subscribe.wire(),
            "events": events,
            "data": {
                "state": {"success": true, "value": {"2": "normal", "1": "blocked"}},
                "state_batch": {"success": false, "status": {
                    "code": ProtoError::too_many_batches(2).code,
                    "description": ProtoError::too_many_batches(2).description,
                }},
            }
        });
        assert_eq!(got, want.to_string());
        let legacy = subscribe_response(Form::Legacy, &events[..1], per_type[..1].to_vec());
        assert_eq!(
            legacy,
            r#"{"type":"response","action":"subscription/subscribe","events":["state"],"data":{"state":{"2":"normal","1":"blocked"}}}"#
        );
    }

    #[test]
    fn state_batch_request() {
        let m = parse(&format!(
            r#"{{"action":"subscribe","hash":"{HASH}","requests":[{{"type":"state_batch","target":{{"type":"selected","tracker_ids":[3,1,3]}},"rate_limit":"500ms","format":"compact"}}]}}"#
        ))
        .unwrap();
        assert_eq!(
            m.items,
            [Item::StateBatch(BatchRequest {
                target: Some(Target::Selected(vec![1, 3])),
                rate: Duration::from_millis(500),
                format: Format::Compact
            })]
        );
        assert_eq!(m.tracker_count(), 3, "ids count as named, as in `trackers`");
    }

    #[test]
    fn every_id_named_counts_against_the_limit() {
        let m = parse(&format!(
            r#"{{"action":"subscribe","hash":"{HASH}","events":["state"],"trackers":[1,1,2]}}"#
        ))
        .unwrap();
        assert_eq!(m.tracker_count(), 3);
        let m = parse(&format!(
            r#"{{"action":"subscribe","hash":"{HASH}","requests":[{{"type":"state","trackers":[1,1]}},{{"type":"state_batch","target":{{"type":"selected","tracker_ids":[1,2,2]}}}},{{"type":"readings_batch","target":{{"type":"selected","tracker_ids":[4]}}}},{{"type":"state_batch","target":{{"type":"all"}}}}]}}"#
        ))
        .unwrap();
        assert_eq!(m.tracker_count(), 6);
    }

    #[test]
    fn readings_batch_request() {
        let m = parse(&format!(
            r#"{{"action":"subscribe","hash":"{HASH}","requests":[{{"type":"readings_batch","target":{{"type":"all"}},"rate_limit":"2s","sensor_type":"fuel","include_components":false}},{{"type":"readings_batch","target":{{"type":"selected","tracker_ids":[2]}}}}]}}"#
        ))
        .unwrap();
        assert_eq!(
            m.items,
            [
                Item::ReadingsBatch(ReadingsRequest {
                    target: Some(Target::All),
                    rate: Duration::from_secs(2),
                    sensor_type: Some("fuel".into()),
                    include_components: false,
                }),
                Item::ReadingsBatch(ReadingsRequest {
                    target: Some(Target::Selected(vec![2])),
                    rate: Duration::from_secs(1),
                    sensor_type: None,
                    include_components: true,
                })
            ]
        );
        for bad in [
            r#"{"type":"readings_batch","target":{"type":"all"},"sensor_type":5}"#,
            r#"{"type":"readings_batch","target":{"type":"all"},"include_components":"no"}"#,
            r#"{"type":"readings_batch","target":{"type":"all"},"rate_limit":"1ms"}"#,
        ] {
            let m = parse(&format!(
                r#"{{"action":"subscribe","hash":"{HASH}","requests":[{{"type":"state","trackers":[1]}},{bad}]}}"#
            ))
            .unwrap();
            assert!(
                matches!(&m.items[1], Item::Failed { kind, error } if kind == "readings_batch" && error.code == 7),
                "{bad}"
            );
        }
    }

    #[test]
    fn rate_limits_parse_within_bounds() {
        use crate::batch::parse_rate;
        assert_eq!(parse_rate("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_rate("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_rate("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_rate("1h"), Some(Duration::from_secs(3600)));
        for bad in [
            "",
            "5",
            "s",
            "-1s",
            "1.5s",
            "99ms",
            "2h",
            "1 d",
            "10x",
            "99999999999999999999s",
        ] {
            assert_eq!(parse_rate(bad), None, "{bad}");
        }
    }
}
