//! Request parameters the way Navixy's API takes them: a JSON object body, form fields, or the
//! query string (merged; the body wins), read under the configured body size limit. Handlers
//! deserialize them into typed request structs; the lenient field readers in [`de`] accept what
//! forms and query strings can carry (`"101"` for 101, `"true"`, `"[1,2]"` or `"1,2"` for a list).
//! Also owns the two credentials: the session `hash` (parameter, or `Authorization: NVX <hash>`)
//! and the operator key (`Authorization: Bearer <key>`).

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};
use futures_util::future::LocalBoxFuture;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::db::queries::{self, SessionRow};
use crate::service;
use crate::startup::AppState;

/// The merged parameters of one request.
#[derive(Debug, Default)]
pub struct Params {
    map: Map<String, Value>,
    authorization: Option<String>,
}

impl Params {
    /// The parameters as a typed request; a missing or mistyped field is code 7.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        serde_json::from_value(Value::Object(self.map.clone()))
            .map_err(|e| ApiError::Invalid(e.to_string()))
    }

    /// The session hash: the `hash` parameter, or `Authorization: NVX <hash>`. Code 3 unless it is
    /// a string of exactly 32 characters.
    pub fn session_hash(&self) -> Result<&str, ApiError> {
        let hash = match self.map.get("hash") {
            Some(Value::String(h)) => Some(h.as_str()),
            Some(_) => None,
            None => self
                .authorization
                .as_deref()
                .and_then(|a| credential_of(a, "NVX")),
        };
        match hash {
            Some(h) if h.chars().count() == 32 => Ok(h),
            _ => Err(ApiError::WrongHash),
        }
    }

    fn add_pairs(&mut self, text: &str) -> Result<(), ApiError> {
        let pairs = web::Query::<Vec<(String, String)>>::from_query(text)
            .map_err(|e| ApiError::BadFormat(e.to_string()))?;
        for (k, v) in pairs.into_inner() {
            self.map.insert(k, Value::String(v));
        }
        Ok(())
    }
}

/// How long a request's body may take to arrive, in all. actix-http times out slow headers
/// (5 s) but not a body: a connection that declared a body and sent nothing (or a byte now and
/// then) held its descriptor for good, and a thousand of them kept the process from accepting.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl FromRequest for Params {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let mut payload = payload.take();
        Box::pin(async move {
            let limit = req
                .app_data::<web::Data<AppState>>()
                .map_or(65536, |s| s.settings.api.max_body_bytes);
            let too_large = || ApiError::TooLarge(format!("the body is over {limit} bytes"));
            let mut params = Params {
                map: Map::new(),
                authorization: req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            };
            params.add_pairs(req.query_string())?;
            let declared = req
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<usize>().ok());
            if declared.is_some_and(|n| n > limit) {
                return Err(too_large());
            }
            let read = async {
                let mut body = web::BytesMut::new();
                while let Some(chunk) = payload.next().await {
                    let chunk = chunk.map_err(|e| ApiError::BadFormat(e.to_string()))?;
                    if body.len() + chunk.len() > limit {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(body)
            };
            let body = tokio::time::timeout(BODY_TIMEOUT, read)
                .await
                .map_err(|_| {
                    ApiError::BadFormat(format!(
                        "the body did not arrive within {} s",
                        BODY_TIMEOUT.as_secs()
                    ))
                })??;
            let text = std::str::from_utf8(&body)
                .map_err(|_| ApiError::BadFormat("the body is not UTF-8".into()))?;
            if text.trim().is_empty() {
                params.refuse_nul()?;
                return Ok(params);
            }
            let content_type = req.content_type().to_ascii_lowercase();
            // A body that starts with `{` is JSON whatever its declared type: `curl -d '{…}'`
            // sends a JSON body as a form, whose one nonsense field then read as a missing hash
            // (code 3) instead of the parameters it holds.
            let json = content_type.ends_with("json") || text.trim_start().starts_with('{');
            // Anything else is read as a form when it says it is one, or says nothing of
            // itself (or `text/plain`, which some HTTP clients put on any string): an XML or
            // multipart body read as a form lost its parameters and answered "wrong hash".
            let form = content_type.is_empty()
                || content_type == "application/x-www-form-urlencoded"
                || content_type == "text/plain";
            if !json && !form {
                return Err(ApiError::BadFormat(format!(
                    "a body of type `{content_type}` is not read: send JSON or \
                     application/x-www-form-urlencoded"
                )));
            }
            if json {
                match serde_json::from_str::<Value>(text) {
                    Ok(Value::Object(fields)) => params.map.extend(fields),
                    Ok(_) => {
                        return Err(ApiError::BadFormat("the body must be a JSON object".into()))
                    }
                    Err(e) => return Err(ApiError::BadFormat(format!("invalid JSON: {e}"))),
                }
            } else {
                params.add_pairs(text)?;
            }
            params.refuse_nul()?;
            Ok(params)
        })
    }
}

impl Params {
    /// Code 7 for a parameter holding the NUL character anywhere (PostgreSQL's text cannot hold
    /// it: a lookup with one failed as a database error, HTTP 500).
    fn refuse_nul(&self) -> Result<(), ApiError> {
        fn has_nul(v: &Value) -> bool {
            match v {
                Value::String(s) => s.contains('\0'),
                Value::Array(items) => items.iter().any(has_nul),
                Value::Object(fields) => fields.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
                _ => false,
            }
        }
        match self
            .map
            .iter()
            .find(|(k, v)| k.contains('\0') || has_nul(v))
        {
            Some((k, _)) => Err(ApiError::Invalid(format!(
                "parameter `{}` contains a NUL character",
                k.replace('\0', "\\0")
            ))),
            None => Ok(()),
        }
    }
}

/// The live session named by the request: code 3 for a missing or malformed hash, 15 when the
/// hash is over its rate limit (`api.requests_per_second`; before the lookup, so that a hash
/// over it costs no query), 4 for an unknown or ended session.
pub async fn session(state: &AppState, params: &Params) -> Result<SessionRow, ApiError> {
    let hash = params.session_hash()?;
    if let Err(wait) = state.session_limiter.request(hash) {
        if let Some(also) = state.session_limiter.log_gate.pass() {
            tracing::warn!(
                session = crate::telemetry::session_tag(hash),
                also,
                "API rate limit exceeded"
            );
        }
        return Err(ApiError::RateLimited(wait));
    }
    match queries::session(&state.pool, hash).await? {
        Some(s) if s.live => Ok(s),
        _ => Err(ApiError::SessionNotFound),
    }
}

/// The parameters of an operator call, extracted once its key is accepted: code 2 when none is
/// presented, 11 when it is wrong or revoked. Both are refused before the body is read, so a
/// caller without a key learns nothing from how its body is judged.
pub struct OperatorParams(pub Params, pub OperatorKey);

/// The id of the operator key a call came with (as `fleetgate api-key list` shows it), for the
/// audit log.
#[derive(Debug, Clone, Copy)]
pub struct OperatorKey(pub i64);

impl FromRequest for OperatorParams {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let req = req.clone();
        let mut payload = payload.take();
        Box::pin(async move {
            let key = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(bearer_of)
                .ok_or(ApiError::ServiceAuth)?;
            let Some(state) = req.app_data::<web::Data<AppState>>() else {
                tracing::error!("operator call without the application state");
                return Err(ApiError::Unexpected);
            };
            let Some(key) = service::check_api_key(&state.pool, key).await? else {
                return Err(ApiError::AccessDenied(
                    "wrong or revoked operator key".into(),
                ));
            };
            Ok(OperatorParams(
                Params::from_request(&req, &mut payload).await?,
                OperatorKey(key),
            ))
        })
    }
}

/// The key of an `Authorization: Bearer <key>` value.
fn bearer_of(authorization: &str) -> Option<&str> {
    credential_of(authorization, "bearer")
}

/// The credential of an `Authorization` value with this scheme (named in any case, as HTTP's
/// schemes are).
fn credential_of<'a>(authorization: &'a str, scheme: &str) -> Option<&'a str> {
    let (given, credential) = authorization.trim_start().split_once(' ')?;
    let credential = credential.trim();
    (given.eq_ignore_ascii_case(scheme) && !credential.is_empty()).then_some(credential)
}

/// Lenient field readers for `#[serde(deserialize_with = …)]`: JSON values as such, and the
/// strings that forms and query strings carry.
pub mod de {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    fn int_of(v: &Value) -> Option<i64> {
        match v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }

    /// An integer, or a string holding one.
    pub fn int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        let v = Value::deserialize(d)?;
        int_of(&v).ok_or_else(|| D::Error::custom(format!("expected an integer, got {v}")))
    }

    /// A boolean, or `"true"`/`"false"`/`"1"`/`"0"`; absent means false (use with `default`).
    pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(b) => Ok(b),
            Value::String(s) if s == "true" || s == "1" => Ok(true),
            Value::String(s) if s == "false" || s == "0" || s.is_empty() => Ok(false),
            Value::Number(n) if n.as_i64() == Some(1) => Ok(true),
            Value::Number(n) if n.as_i64() == Some(0) => Ok(false),
            v => Err(D::Error::custom(format!("expected a boolean, got {v}"))),
        }
    }

    /// A string, or a number written as one (a numeric login or password in JSON).
    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        match Value::deserialize(d)? {
            Value::String(s) => Ok(s),
            Value::Number(n) => Ok(n.to_string()),
            v => Err(D::Error::custom(format!("expected a string, got {v}"))),
        }
    }

    /// An optional string (absent or null: none).
    pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(None),
            Value::String(s) => Ok(Some(s)),
            Value::Number(n) => Ok(Some(n.to_string())),
            v => Err(D::Error::custom(format!("expected a string, got {v}"))),
        }
    }

    /// An optional integer (absent or null: none).
    pub fn opt_int<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(None),
            v => int_of(&v)
                .map(Some)
                .ok_or_else(|| D::Error::custom(format!("expected an integer, got {v}"))),
        }
    }

    /// A list of integers: a JSON array, or a string holding one (`"[1,2]"`) or a comma list
    /// (`"1,2"`). Nulls and non-integers are refused.
    pub fn int_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
        let v = Value::deserialize(d)?;
        let items: Vec<Value> = match v {
            Value::Array(items) => items,
            Value::String(s) => {
                let s = s.trim();
                if s.starts_with('[') {
                    match serde_json::from_str::<Value>(s) {
                        Ok(Value::Array(items)) => items,
                        _ => return Err(D::Error::custom("expected a list of integers")),
                    }
                } else if s.is_empty() {
                    Vec::new()
                } else {
                    s.split(',').map(|p| Value::String(p.to_owned())).collect()
                }
            }
            Value::Number(_) => vec![v],
            other => {
                return Err(D::Error::custom(format!(
                    "expected a list of integers, got {other}"
                )))
            }
        };
        items
            .iter()
            .map(|i| {
                int_of(i).ok_or_else(|| {
                    D::Error::custom(format!("expected a list of integers, found {i}"))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    struct Sample {
        #[serde(deserialize_with = "de::int")]
        id: i64,
        #[serde(default, deserialize_with = "de::int_list")]
        ids: Vec<i64>,
        #[serde(default, deserialize_with = "de::boolean")]
        flag: bool,
        #[serde(deserialize_with = "de::string")]
        name: String,
    }

    fn parse(v: Value) -> Result<Sample, ApiError> {
        let Value::Object(map) = v else {
            unreachable!("tests pass objects")
        };
        Params {
            map,
            authorization: None,
        }
        .parse()
    }

    #[test]
    fn form_strings_and_json_values_both_parse() {
        let a = parse(json!({"id": "7", "ids": "[1, 2]", "flag": "true", "name": 12})).unwrap();
        assert_eq!(
            (a.id, a.ids, a.flag, a.name.as_str()),
            (7, vec![1, 2], true, "12")
        );
        let b = parse(json!({"id": 7, "ids": "3,4", "name": "x"})).unwrap();
        assert_eq!((b.ids, b.flag), (vec![3, 4], false));
        let c = parse(json!({"id": 7, "ids": [5], "name": "x"})).unwrap();
        assert_eq!(c.ids, vec![5]);
    }

    #[test]
    fn bad_values_are_code_7() {
        for v in [
            json!({"name": "x"}),
            json!({"id": "x", "name": "x"}),
            json!({"id": 1, "ids": [1, null], "name": "x"}),
            json!({"id": 1, "flag": "maybe", "name": "x"}),
        ] {
            assert_eq!(parse(v).unwrap_err().code(), 7);
        }
    }

    #[test]
    fn hash_comes_from_the_parameter_or_the_nvx_header() {
        let mut p = Params::default();
        assert_eq!(p.session_hash(), Err(ApiError::WrongHash));
        p.authorization = Some(format!("NVX {}", "a".repeat(32)));
        assert_eq!(p.session_hash().map(str::len), Ok(32));
        // Schemes are case-insensitive in HTTP.
        p.authorization = Some(format!("nvx  {} ", "a".repeat(32)));
        assert_eq!(p.session_hash().map(str::len), Ok(32));
        p.map.insert("hash".into(), json!("short"));
        assert_eq!(p.session_hash(), Err(ApiError::WrongHash));
        assert_eq!(bearer_of("Bearer fgk_x"), Some("fgk_x"));
        assert_eq!(bearer_of("bearer  fgk_x "), Some("fgk_x"));
        assert_eq!(bearer_of("Bearer "), None);
        assert_eq!(bearer_of("NVX fgk_x"), None);
    }

    #[test]
    fn a_nul_character_anywhere_is_code_7() {
        for (k, v) in [
            ("login", json!("a\u{0}b")),
            ("trackers", json!([1, "\u{0}"])),
            ("x\u{0}", json!(1)),
            ("nested", json!({"k": "\u{0}"})),
        ] {
            let mut p = Params::default();
            p.map.insert(k.into(), v);
            assert_eq!(p.refuse_nul().unwrap_err().code(), 7, "{k}");
        }
        let mut p = Params::default();
        p.map.insert("login".into(), json!("plain"));
        assert_eq!(p.refuse_nul(), Ok(()));
    }
}
