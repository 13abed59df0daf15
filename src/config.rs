//! Typed settings. Owns loading and layering: built-in defaults → `config/default.toml` →
//! `config/local.toml` → `$FLEETGATE_CONFIG` → `FLEETGATE_*` environment variables, with
//! `DATABASE_URL` overriding `database.url`. Every key is documented in `config/default.toml`.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub websocket: WebSocketSettings,
    pub listen: ListenSettings,
    pub sessions: SessionSettings,
    pub log: LogSettings,
    pub api: ApiSettings,
    pub web: WebSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: String,
    pub workers: usize,
    pub shutdown_timeout_secs: u64,
    /// Whether the kernel may back the process's memory with transparent huge pages (Linux).
    pub transparent_huge_pages: bool,
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
    pub event_connections: u32,
    pub acquire_timeout_secs: u64,
    pub migrate_on_start: bool,
    /// How long `serve` waits at start for a database it cannot reach yet (0: not at all).
    pub startup_wait_secs: u64,
}

/// `url` with its password (in the user info or a `password=` parameter) replaced, so that
/// an operator sees which server and database are used and nothing secret.
pub fn redact_password(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(start) = out.find("://").map(|i| i + 3) {
        // The user info ends at the last `@`: a password may hold `/` or `?` unencoded (the
        // URL then does not parse, and its error would show it). An `@` in a parameter makes
        // this hide more than the password, never less.
        if let Some(at) = out[start..].rfind('@').map(|i| start + i) {
            if let Some(colon) = out[start..at].find(':').map(|i| start + i) {
                out.replace_range(colon + 1..at, "<redacted>");
            }
        }
    }
    if let Some(q) = out.find('?') {
        let (base, query) = out.split_at(q + 1);
        let query: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=<redacted>"),
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{base}{}", query.join("&"));
    }
    out
}

impl std::fmt::Debug for DatabaseSettings {
    // The URL may carry a password: never log it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &redact_password(&self.url))
            .field("max_connections", &self.max_connections)
            .field("event_connections", &self.event_connections)
            .field("acquire_timeout_secs", &self.acquire_timeout_secs)
            .field("migrate_on_start", &self.migrate_on_start)
            .field("startup_wait_secs", &self.startup_wait_secs)
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSocketSettings {
    pub max_frame_bytes: usize,
    pub max_trackers_per_request: usize,
    /// Most batch groups (`state_batch` and `readings_batch` together) one connection may be
    /// in; a batch item that would join one more fails in its slot with code 9.
    pub max_batch_subscriptions: usize,
    pub queue_capacity: usize,
    pub write_buffer_bytes: usize,
    pub heartbeat_ms: u64,
    pub idle_timeout_ms: u64,
    pub messages_per_second: u32,
    pub messages_burst: u32,
    /// Accept `permessage-deflate` when a client offers it.
    pub compression: bool,
    /// With compression negotiated, the smallest frame sent compressed.
    pub compression_min_bytes: usize,
    /// Most WebSockets the process holds; 0 (the default) is the open-file limit less a reserve
    /// for the database connections and HTTP requests (see [`crate::ws::slots`]).
    pub max_sockets: usize,
    /// Most WebSockets from one client address (the peer, or the forwarded address with
    /// `api.trust_forwarded_for`); 0 (the default) is no limit.
    pub max_sockets_per_address: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenSettings {
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub probe_interval_ms: u64,
    /// A round of the event processor still running after this long is abandoned: its
    /// connections are dropped with its pool, and a resync on new ones follows.
    pub round_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    pub expiry_check_ms: u64,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// The live fleet page served at `/` (see `src/web/`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebSettings {
    /// Map tiles drawn under the graticule, e.g. `https://tile.example/{z}/{x}/{y}.png`; empty
    /// (the default) draws no tiles, so the page loads nothing from outside the gateway.
    pub tile_url: String,
}

/// The HTTP API (`/v2/user/…`, `/v2/tracker/…`, `/v2/admin/…`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    pub max_body_bytes: usize,
    pub session_lifetime_secs: i64,
    pub login_attempts_per_login: u32,
    pub login_attempts_per_address: u32,
    pub login_window_secs: u64,
    pub requests_per_second: u32,
    pub requests_burst: u32,
    pub trust_forwarded_for: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase", try_from = "String")]
pub enum LogFormat {
    Text,
    Json,
}

impl TryFrom<String> for LogFormat {
    type Error = String;

    /// With a message naming the values (the derived one spoke of "variant constructors").
    fn try_from(s: String) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("`{s}` is not a log format: `text` or `json`")),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: "127.0.0.1:8080".into(),
            workers: 0,
            shutdown_timeout_secs: 5,
            transparent_huge_pages: false,
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: "postgres://postgres@127.0.0.1:5432/fleetgate".into(),
            max_connections: 8,
            event_connections: 4,
            acquire_timeout_secs: 5,
            migrate_on_start: true,
            startup_wait_secs: 60,
        }
    }
}

impl Default for WebSocketSettings {
    fn default() -> Self {
        WebSocketSettings {
            max_frame_bytes: 262_144,
            max_trackers_per_request: 10_000,
            max_batch_subscriptions: 16,
            queue_capacity: 1024,
            write_buffer_bytes: 65_536,
            heartbeat_ms: 30_000,
            idle_timeout_ms: 90_000,
            messages_per_second: 20,
            messages_burst: 100,
            compression: true,
            compression_min_bytes: 1024,
            max_sockets: 0,
            max_sockets_per_address: 0,
        }
    }
}

impl Default for ListenSettings {
    fn default() -> Self {
        ListenSettings {
            reconnect_min_ms: 100,
            reconnect_max_ms: 5000,
            probe_interval_ms: 10_000,
            round_timeout_secs: 30,
        }
    }
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            expiry_check_ms: 1000,
        }
    }
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            max_body_bytes: 65536,
            session_lifetime_secs: 30 * 24 * 3600,
            login_attempts_per_login: 5,
            login_attempts_per_address: 20,
            login_window_secs: 60,
            requests_per_second: 20,
            requests_burst: 100,
            trust_forwarded_for: false,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

impl WebSocketSettings {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.max(10))
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.max(10))
    }
}

/// The environment layer: only `FLEETGATE_<SECTION>__<KEY>` variables. Other `FLEETGATE_*`
/// variables (`FLEETGATE_CONFIG`, the scripts' `FLEETGATE_LISTEN`, …) are not settings.
fn env_source(vars: impl Iterator<Item = (String, String)>) -> config::Environment {
    let map: std::collections::HashMap<String, String> = vars
        .filter(|(k, _)| k.starts_with("FLEETGATE_") && k.contains("__"))
        .collect();
    config::Environment::with_prefix("FLEETGATE")
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .source(Some(map))
}

/// The words a true/false setting takes (case aside) from the environment or a string.
const BOOLEAN_WORDS: [&str; 8] = ["true", "false", "1", "0", "yes", "no", "on", "off"];

/// A `FLEETGATE_<SECTION>__<KEY>` variable that the environment layer would take wrongly or
/// reject without naming it: a section or key no setting has (the config crate's error names
/// neither the variable nor the environment), a true/false setting given anything but a
/// true/false word (the config crate reads any number but 0 as true, so `=2` would pass as
/// `true` without a word), or a whole-number setting given anything else (it rounds `2.5` to 3).
fn unclear_variable(vars: impl Iterator<Item = (String, String)>) -> Option<String> {
    let defaults = serde_json::to_value(Settings::default()).ok()?;
    let sections = defaults.as_object()?;
    vars.filter_map(|(name, value)| {
        let rest = name.strip_prefix("FLEETGATE_")?.to_ascii_lowercase();
        let (section, key) = rest.split_once("__")?;
        let Some(keys) = sections.get(section).and_then(|v| v.as_object()) else {
            return Some(format!(
                "{name}: no section `{section}`, expected one of {}",
                quoted(sections.keys())
            ));
        };
        let Some(default) = keys.get(key) else {
            return Some(format!(
                "{name}: no key `{key}` in [{section}], expected one of {}",
                quoted(keys.keys())
            ));
        };
        let word = value.trim().to_ascii_lowercase();
        if default.is_boolean() && !BOOLEAN_WORDS.contains(&word.as_str()) {
            return Some(format!(
                "{name} = `{value}`: {section}.{key} takes true or false"
            ));
        }
        if (default.is_u64() || default.is_i64()) && word.parse::<i64>().is_err() {
            return Some(format!(
                "{name} = `{value}`: {section}.{key} takes a whole number"
            ));
        }
        if default.is_u64() && word.parse::<i64>().is_ok_and(|n| n < 0) {
            return Some(format!(
                "{name} = `{value}`: {section}.{key} takes a whole number, not a negative one"
            ));
        }
        None
    })
    .next()
}

/// `a`, `b`, `c`: names for an error message.
fn quoted<'a>(names: impl Iterator<Item = &'a String>) -> String {
    names
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What is wrong with a config file on its own, named with the file: a key or section no setting
/// has (the error of the merged layers cannot say which file gave it), a setting above every
/// section header, or a true/false or whole-number setting given another kind of value: the
/// config crate reads any number but 0 as true, so `compression = 2` would pass as `true`
/// without a word, and rounds `queue_capacity = 1.5` to 2, as in [`unclear_variable`]. Strings
/// take the same words (or digits) as there.
/// (Each of `default.toml`, `local.toml` and `$FLEETGATE_CONFIG`: a `default.toml` in another
/// folder, given with `--config-dir`, is the operator's.)
fn check_file(
    name: &str,
    file: impl config::Source + Send + Sync + 'static,
) -> Result<(), config::ConfigError> {
    let Some(defaults) = serde_json::to_value(Settings::default()).ok() else {
        return Ok(());
    };
    let Some(sections) = defaults.as_object() else {
        return Ok(());
    };
    let parsed = config::Config::builder().add_source(file).build()?;
    // Keys no setting has, named with the file (the merged layers' error cannot say which).
    if let Ok(table) = parsed
        .clone()
        .try_deserialize::<HashMap<String, config::Value>>()
    {
        for (section, value) in table {
            // A setting written above every section header (`listen = "0.0.0.0:8080"`, meant
            // for [server]): where it belongs.
            let owners: Vec<String> = sections
                .iter()
                .filter(|(_, keys)| keys.get(&section).is_some())
                .map(|(owner, _)| format!("[{owner}]"))
                .collect();
            let hint = if owners.is_empty() {
                String::new()
            } else {
                format!(
                    "; the setting `{section}` goes under {}",
                    owners.join(" or ")
                )
            };
            let Some(known) = sections.get(&section).and_then(|v| v.as_object()) else {
                return Err(config::ConfigError::Message(format!(
                    "{name}: unknown section `{section}`, expected one of {}{hint}",
                    quoted(sections.keys())
                )));
            };
            let Ok(keys) = value.into_table() else {
                return Err(config::ConfigError::Message(format!(
                    "{name}: `{section}` is a section, not a setting: its settings go under a \
                     [{section}] header{hint}"
                )));
            };
            if let Some(key) = keys.keys().find(|k| !known.contains_key(*k)) {
                return Err(config::ConfigError::Message(format!(
                    "{name}: unknown key `{key}` in [{section}], expected one of {}",
                    quoted(known.keys())
                )));
            }
        }
    }
    for (section, keys) in sections {
        let Some(keys) = keys.as_object() else {
            continue;
        };
        for (key, default) in keys {
            let Ok(value) = parsed.get::<config::Value>(&format!("{section}.{key}")) else {
                continue;
            };
            if default.is_u64() || default.is_i64() {
                // The config crate rounds `2.5` to 3 (and `0.4` to 0, then refused as 0).
                let whole = match &value.kind {
                    config::ValueKind::I64(_)
                    | config::ValueKind::U64(_)
                    | config::ValueKind::I128(_)
                    | config::ValueKind::U128(_) => true,
                    config::ValueKind::String(s) => s.trim().parse::<i64>().is_ok(),
                    _ => false,
                };
                if !whole {
                    return Err(config::ConfigError::Message(format!(
                        "{name}: {section}.{key} = {value}: takes a whole number"
                    )));
                }
                continue;
            }
            if !default.is_boolean() {
                continue;
            }
            let clear = match &value.kind {
                // 0 and 1 as the environment takes them.
                config::ValueKind::Boolean(_)
                | config::ValueKind::I64(0 | 1)
                | config::ValueKind::U64(0 | 1) => true,
                config::ValueKind::String(s) => {
                    BOOLEAN_WORDS.contains(&s.trim().to_ascii_lowercase().as_str())
                }
                _ => false,
            };
            if !clear {
                return Err(config::ConfigError::Message(format!(
                    "{name}: {section}.{key} = {value}: takes true or false"
                )));
            }
        }
    }
    Ok(())
}

/// A `FLEETGATE_<SECTION>_<KEY>` variable naming a setting with one underscore (or none) where
/// the environment layer takes two, or a `FLEETGATE_<KEY>` naming a setting without its section
/// (`FLEETGATE_WORKERS`): it would be ignored, the setting left at its value, so it is an error
/// naming the variable meant. (Other `FLEETGATE_*` variables are not settings; nor is
/// `FLEETGATE_LISTEN`, the address `scripts/demo.sh` serves on, which `serve` warns about
/// instead: see [`listen_variable_ignored`].)
fn misspelt_variable(vars: impl Iterator<Item = (String, String)>) -> Option<String> {
    let sections = serde_json::to_value(Settings::default()).ok()?;
    let sections = sections.as_object()?;
    let meant = |name: &str, section: &str, key: &str| {
        format!(
            "{name} is not read: a setting is named by its section and key with two \
             underscores between them, FLEETGATE_{}__{}",
            section.to_ascii_uppercase(),
            key.to_ascii_uppercase()
        )
    };
    vars.filter_map(|(name, _)| {
        if !name.starts_with("FLEETGATE_") {
            // The prefix in other letters (`fleetgate_server__workers`): section and key take
            // any case, the prefix only capitals.
            let rest = name
                .get(..10)
                .filter(|p| p.eq_ignore_ascii_case("FLEETGATE_"))
                .and(name.get(10..))?
                .to_ascii_lowercase();
            let (section, key) = rest.split_once("__")?;
            sections.get(section)?.get(key)?;
            return Some(format!(
                "{name} is not read: the prefix of a setting's variable is FLEETGATE_ in \
                 capitals, FLEETGATE_{}__{}",
                section.to_ascii_uppercase(),
                key.to_ascii_uppercase()
            ));
        }
        let rest = name.strip_prefix("FLEETGATE_")?.to_ascii_lowercase();
        if rest.contains("__") || rest == "listen" {
            return None;
        }
        sections
            .iter()
            .find_map(|(section, keys)| {
                // One underscore, or none (`FLEETGATE_LOGFORMAT`).
                let key = rest.strip_prefix(section.as_str())?;
                let key = key.strip_prefix('_').unwrap_or(key);
                keys.get(key)?;
                Some(meant(&name, section, key))
            })
            .or_else(|| {
                // No section at all: the first section with such a key.
                sections.iter().find_map(|(section, keys)| {
                    keys.get(rest.as_str())?;
                    Some(meant(&name, section, &rest))
                })
            })
    })
    .next()
}

/// The bytes a subscribe naming `ids` tracker ids of up to 19 digits takes at most: each id
/// with its comma, and the message around them.
fn largest_subscribe_bytes(ids: usize) -> usize {
    ids.saturating_mul(20).saturating_add(512)
}

/// The warning `serve` logs and `check-config` prints when `websocket.max_frame_bytes` cannot
/// hold a subscribe naming `websocket.max_trackers_per_request` ids of up to 19 digits: such a
/// subscribe, allowed by the one limit, is refused with error 9 by the other.
pub fn frame_limit_warning(ws: &WebSocketSettings) -> Option<String> {
    let needed = largest_subscribe_bytes(ws.max_trackers_per_request);
    (ws.max_frame_bytes < needed).then(|| {
        format!(
            "websocket.max_frame_bytes = {} may not hold a subscribe naming \
             websocket.max_trackers_per_request = {} tracker ids (up to {needed} bytes with \
             19-digit ids): such a subscribe would get error 9; raise max_frame_bytes to {needed}",
            ws.max_frame_bytes, ws.max_trackers_per_request
        )
    })
}

/// The warning `serve` logs when `FLEETGATE_LISTEN` (the variable of `scripts/demo.sh`, which
/// passes it on as `--listen`) is set to another address than the one served, without
/// `--listen`: the setting is `server.listen` (`FLEETGATE_SERVER__LISTEN`).
pub fn listen_variable_ignored(value: Option<&str>, serving: &str) -> Option<String> {
    let value = value?.trim();
    (!value.is_empty() && value != serving).then(|| {
        format!(
            "FLEETGATE_LISTEN={value} is not read by serve (it is scripts/demo.sh's): serving on \
             {serving}; set server.listen (FLEETGATE_SERVER__LISTEN) or pass --listen"
        )
    })
}

/// Refuses a log filter (`log.level`, or `RUST_LOG` which overrides it) that would quietly log
/// nothing: a bare word is a target name to the filter, not a level, so `inf` would enable one
/// target nobody uses and leave everything else, errors included, unlogged.
pub fn check_filter(name: &str, value: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    if value.split(',').all(|d| d.trim().is_empty()) {
        return Err(format!(
            "{name} is empty: give a level (trace, debug, info, warn, error, off)"
        ));
    }
    for directive in value.split(',').map(str::trim) {
        if !directive.is_empty()
            && !directive.contains('=')
            && !LEVELS.contains(&directive.to_ascii_lowercase().as_str())
        {
            return Err(format!(
                "{name} `{value}`: `{directive}` is not a level (trace, debug, info, warn, error, \
                 off); name a module as `target=level`"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(value)
        .map(drop)
        .map_err(|e| format!("{name} `{value}`: {e}"))
}

/// Refuses a listen address that is not `host:port` with a port number, naming the setting
/// (binding would otherwise fail later with the value alone). `serve` checks it, after
/// `--listen`; the other commands bind nothing.
pub fn check_listen(name: &str, value: &str) -> Result<(), String> {
    match value.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => Err(format!(
            "{name} `{value}`: not an address and port such as 0.0.0.0:8080 or [::]:8080"
        )),
    }
}

/// The file `FLEETGATE_CONFIG` names, unless it is unset or empty (an empty one, easily left in
/// a systemd `EnvironmentFile`, is no file, as an empty `RUST_LOG` is no filter).
pub fn extra_file() -> Option<String> {
    std::env::var("FLEETGATE_CONFIG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

impl Settings {
    /// Loads the layered configuration from `dir` (normally `config/`) and the environment.
    pub fn load(dir: &Path) -> Result<Settings, config::ConfigError> {
        if let Some(e) = misspelt_variable(std::env::vars()) {
            return Err(config::ConfigError::Message(e));
        }
        if let Some(e) = unclear_variable(std::env::vars()) {
            return Err(config::ConfigError::Message(e));
        }
        // default.toml too: the one of another folder (--config-dir) is the operator's.
        for name in ["default.toml", "local.toml"] {
            let file = dir.join(name);
            check_file(
                &file.display().to_string(),
                config::File::from(file.as_path()).required(false),
            )?;
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from(dir.join("default.toml")).required(false))
            .add_source(config::File::from(dir.join("local.toml")).required(false));
        if let Some(extra) = extra_file() {
            // The config crate names the format by the extension, and reads TOML alone here. (A
            // name without it may have a dot of its own: `gw.eu` for `gw.eu.toml`.)
            let path = Path::new(&extra);
            let ext = path.extension().and_then(|e| e.to_str());
            if path.is_file() && ext.is_some_and(|e| !e.eq_ignore_ascii_case("toml")) {
                return Err(config::ConfigError::Message(format!(
                    "FLEETGATE_CONFIG={extra}: settings files are TOML, named *.toml (or given \
                     without the extension)"
                )));
            }
            builder = builder.add_source(config::File::with_name(&extra).required(true));
            check_file(&extra, config::File::with_name(&extra).required(true))?;
        }
        builder = builder.add_source(env_source(std::env::vars()));
        // An empty one (easily left in a unit or compose file) counts as unset, as an empty
        // FLEETGATE_CONFIG or RUST_LOG does.
        if let Some(url) = std::env::var("DATABASE_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
        {
            builder = builder.set_override("database.url", url)?;
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate().map_err(config::ConfigError::Message)?;
        Ok(settings)
    }

    /// The settings as a TOML file (sections in the order of default.toml), the database
    /// password redacted: what `check-config` prints, readable back as local.toml.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        let mut shown = self.clone();
        shown.database.url = redact_password(&shown.database.url);
        toml::to_string(&shown)
    }

    /// Refuses values that would be accepted and then fail quietly: a log level that turns off
    /// every line, a URL of another database, sessions that expire as they are made.
    pub fn validate(&self) -> Result<(), String> {
        check_filter("log.level", &self.log.level)?;
        let url = self.database.url.to_ascii_lowercase();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(
                "database.url (or DATABASE_URL) must start with postgres:// or postgresql://"
                    .into(),
            );
        }
        let tiles = self.web.tile_url.trim();
        if !(tiles.is_empty() || tiles.starts_with('/') || crate::web::tile_origin(tiles).is_some())
        {
            return Err(format!(
                "web.tile_url = {tiles:?}: must be empty, a path on the gateway (/tiles/{{z}}/{{x}}/{{y}}.png) \
                 or an http(s) URL such as https://tile.example/{{z}}/{{x}}/{{y}}.png"
            ));
        }
        if !tiles.is_empty() && !["{z}", "{x}", "{y}"].iter().all(|p| tiles.contains(p)) {
            return Err(format!(
                "web.tile_url = {tiles:?}: must hold the placeholders {{z}}, {{x}} and {{y}}"
            ));
        }
        if !(60..=10 * 365 * 24 * 3600).contains(&self.api.session_lifetime_secs) {
            return Err(format!(
                "api.session_lifetime_secs = {}: must be between 60 and 315360000 (ten years)",
                self.api.session_lifetime_secs
            ));
        }
        // Values the code would otherwise raise to a floor without a word (or that make no
        // sense at zero).
        let d = &self.database;
        let w = &self.websocket;
        let l = &self.listen;
        let floors: [(&str, u64, u64); 20] = [
            ("database.max_connections", d.max_connections.into(), 1),
            ("database.event_connections", d.event_connections.into(), 1),
            ("database.acquire_timeout_secs", d.acquire_timeout_secs, 1),
            ("websocket.max_frame_bytes", w.max_frame_bytes as u64, 256),
            (
                "websocket.max_trackers_per_request",
                w.max_trackers_per_request as u64,
                1,
            ),
            ("websocket.queue_capacity", w.queue_capacity as u64, 1),
            (
                "websocket.write_buffer_bytes",
                w.write_buffer_bytes as u64,
                1024,
            ),
            ("websocket.heartbeat_ms", w.heartbeat_ms, 100),
            ("websocket.idle_timeout_ms", w.idle_timeout_ms, 100),
            (
                "websocket.messages_per_second",
                w.messages_per_second.into(),
                1,
            ),
            ("websocket.messages_burst", w.messages_burst.into(), 1),
            ("listen.probe_interval_ms", l.probe_interval_ms, 100),
            ("listen.reconnect_min_ms", l.reconnect_min_ms, 1),
            (
                "api.login_attempts_per_login",
                self.api.login_attempts_per_login.into(),
                1,
            ),
            (
                "api.login_attempts_per_address",
                self.api.login_attempts_per_address.into(),
                1,
            ),
            ("api.login_window_secs", self.api.login_window_secs, 1),
            (
                "api.requests_per_second",
                self.api.requests_per_second.into(),
                1,
            ),
            ("api.requests_burst", self.api.requests_burst.into(), 1),
            ("listen.round_timeout_secs", l.round_timeout_secs, 1),
            (
                "sessions.expiry_check_ms",
                self.sessions.expiry_check_ms,
                10,
            ),
        ];
        for (name, value, floor) in floors {
            if value < floor {
                return Err(format!("{name} = {value}: must be at least {floor}"));
            }
        }
        // Values no deployment means, which fail later and far from the setting: eight round
        // timeouts are the event connections' `statement_timeout`, which PostgreSQL caps at
        // about 24 days (it refused the setting, and reads were left unbounded).
        let ceilings: [(&str, u64, u64); 3] = [
            ("listen.round_timeout_secs", l.round_timeout_secs, 86_400),
            (
                "database.acquire_timeout_secs",
                d.acquire_timeout_secs,
                86_400,
            ),
            ("server.workers", self.server.workers as u64, 1_024),
        ];
        for (name, value, ceiling) in ceilings {
            if value > ceiling {
                return Err(format!("{name} = {value}: must be at most {ceiling}"));
            }
        }
        if l.reconnect_max_ms < l.reconnect_min_ms {
            return Err(format!(
                "listen.reconnect_max_ms = {} is below listen.reconnect_min_ms = {}",
                l.reconnect_max_ms, l.reconnect_min_ms
            ));
        }
        let w = &self.websocket;
        if w.heartbeat_ms.saturating_mul(2) > w.idle_timeout_ms {
            return Err(format!(
                "websocket.heartbeat_ms = {} is more than half of websocket.idle_timeout_ms = \
                 {}: a client that only answers the gateway's pings (a round trip after each) \
                 would be closed as idle",
                w.heartbeat_ms, w.idle_timeout_ms
            ));
        }
        if self.api.max_body_bytes < 1024 {
            return Err(format!(
                "api.max_body_bytes = {}: must be at least 1024",
                self.api.max_body_bytes
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(vars: &[(&str, &str)]) -> Settings {
        let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        config::Config::builder()
            .add_source(env_source(vars.collect::<Vec<_>>().into_iter()))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("settings")
    }

    #[test]
    fn a_url_is_shown_without_its_password() {
        assert_eq!(
            redact_password("postgres://app:s3cret@db:5432/fleet?sslmode=require"),
            "postgres://app:<redacted>@db:5432/fleet?sslmode=require"
        );
        assert_eq!(
            redact_password("postgres://app@db/fleet?password=x&sslmode=disable"),
            "postgres://app@db/fleet?password=<redacted>&sslmode=disable"
        );
        assert_eq!(
            redact_password("postgres://u:pa/ss?x@h/d"),
            "postgres://u:<redacted>@h/d"
        );
        assert_eq!(
            redact_password("postgres://postgres@127.0.0.1:5432/fleetgate"),
            "postgres://postgres@127.0.0.1:5432/fleetgate"
        );
        let s = Settings {
            database: DatabaseSettings {
                url: "postgres://u:pw@h/d".into(),
                ..DatabaseSettings::default()
            },
            ..Settings::default()
        };
        let shown = format!("{s:?}");
        assert!(shown.contains("postgres://u:<redacted>@h/d") && !shown.contains("pw"));
    }

    #[test]
    fn values_that_would_fail_quietly_are_refused() {
        assert_eq!(Settings::default().validate(), Ok(()));
        let mut s = Settings::default();
        s.log.level = "info,sqlx=warn,fleetgate::listen=DEBUG".into();
        assert_eq!(s.validate(), Ok(()));
        for level in ["inf", "verbose", "info,fleetgate"] {
            s.log.level = level.into();
            let e = s.validate().expect_err(level);
            assert!(e.contains("is not a level"), "{e}");
        }
        let mut s = Settings::default();
        s.database.url = "mysql://root@127.0.0.1/x".into();
        assert!(s.validate().is_err());
        let with_tiles = |url: &str| {
            let mut s = Settings::default();
            s.web.tile_url = url.into();
            s.validate()
        };
        for ok in [
            "",
            "https://tile.example/{z}/{x}/{y}.png",
            "https://{s}.tile.example/{z}/{x}/{y}.png?key=k",
            "/tiles/{z}/{x}/{y}.png",
        ] {
            assert_eq!(with_tiles(ok), Ok(()), "{ok}");
        }
        for bad in [
            "foo",
            "javascript:alert(1)",
            "ftp://tile.example/{z}/{x}/{y}.png",
            "https://tile.example/tiles.png",
        ] {
            let e = with_tiles(bad).expect_err(bad);
            assert!(e.contains("web.tile_url"), "{e}");
        }
        let mut s = Settings::default();
        s.api.session_lifetime_secs = -5;
        assert!(s.validate().is_err());
        s.api.session_lifetime_secs = i64::MAX;
        assert!(s.validate().is_err());
        let mut s = Settings::default();
        s.api.max_body_bytes = 0;
        assert!(s.validate().is_err());
        let mut s = Settings::default();
        s.listen.round_timeout_secs = 99_999_999_999;
        let e = s.validate().expect_err("a ceiling");
        assert!(
            e.contains("listen.round_timeout_secs") && e.contains("at most"),
            "{e}"
        );
        let mut s = Settings::default();
        s.server.workers = 100_000;
        assert!(s.validate().is_err());
        let mut s = Settings::default();
        s.database.max_connections = 0;
        assert_eq!(
            s.validate(),
            Err("database.max_connections = 0: must be at least 1".into())
        );
        let mut s = Settings::default();
        s.websocket.heartbeat_ms = 0;
        assert!(s.validate().is_err());
        // Pings no more often than the idle timeout: every quiet client would be closed.
        let mut s = Settings::default();
        s.websocket.idle_timeout_ms = 2000;
        s.websocket.heartbeat_ms = 1999;
        assert!(s
            .validate()
            .is_err_and(|e| e.starts_with("websocket.heartbeat_ms = 1999 is more than half")));
        s.websocket.heartbeat_ms = 1000;
        assert_eq!(s.validate(), Ok(()));
        // Zeros the code used to raise to one without a word.
        let mut s = Settings::default();
        s.api.login_window_secs = 0;
        assert_eq!(
            s.validate(),
            Err("api.login_window_secs = 0: must be at least 1".into())
        );
        let mut s = Settings::default();
        s.api.login_attempts_per_login = 0;
        assert!(s.validate().is_err());
        let mut s = Settings::default();
        s.listen.reconnect_min_ms = 0;
        assert!(s.validate().is_err());
        // An address serve could not bind is refused naming the setting.
        for listen in ["notanaddress", "127.0.0.1:99999", ":8080", "127.0.0.1:", ""] {
            let e = check_listen("server.listen", listen).expect_err(listen);
            assert!(e.starts_with("server.listen"), "{e}");
        }
        for listen in ["0.0.0.0:8080", "[::]:8080", "localhost:80", "[::1]:0"] {
            assert_eq!(check_listen("server.listen", listen), Ok(()), "{listen}");
        }
        let mut s = Settings::default();
        for empty in ["", " ", ","] {
            s.log.level = empty.into();
            assert!(s.validate().is_err(), "{empty:?}");
        }
    }

    #[test]
    fn a_boolean_variable_takes_a_boolean_word() {
        let vars = |v: &str| {
            vec![
                (
                    "FLEETGATE_WEBSOCKET__COMPRESSION".to_string(),
                    v.to_string(),
                ),
                (
                    "FLEETGATE_WEBSOCKET__QUEUE_CAPACITY".to_string(),
                    "2".to_string(),
                ),
            ]
            .into_iter()
        };
        for ok in ["true", "FALSE", "1", "0", "yes", "off"] {
            assert_eq!(unclear_variable(vars(ok)), None, "{ok}");
        }
        for bad in ["2", "maybe", ""] {
            let e = unclear_variable(vars(bad)).expect(bad);
            assert!(
                e.contains("websocket.compression takes true or false"),
                "{e}"
            );
        }
    }

    /// [`check_file`] of a TOML text named `name`.
    fn check_text(name: &str, text: &str) -> Result<(), config::ConfigError> {
        check_file(name, config::File::from_str(text, config::FileFormat::Toml))
    }

    #[test]
    fn a_config_file_with_a_key_no_setting_has_is_refused_naming_the_file() {
        let check = |text: &str| check_text("extra.toml", text).map_err(|e| e.to_string());
        assert!(check("[websocket]\nheartbeat_ms = 5000").is_ok());
        let e = check("[websocket]\nheartbeat = 5000").unwrap_err();
        assert!(
            e.starts_with("extra.toml: unknown key `heartbeat` in [websocket], expected one of")
                && e.contains("`heartbeat_ms`"),
            "{e}"
        );
        let e = check("[websockets]\nheartbeat_ms = 5000").unwrap_err();
        assert!(
            e.starts_with("extra.toml: unknown section `websockets`"),
            "{e}"
        );
    }

    #[test]
    fn a_whole_number_setting_given_a_fraction_or_a_word_is_refused() {
        let check = |text: &str| check_text("local.toml", text).map_err(|e| e.to_string());
        for ok in [
            "[websocket]\nqueue_capacity = 2",
            "[websocket]\nqueue_capacity = \"12\"",
        ] {
            assert!(check(ok).is_ok(), "{ok}");
        }
        for bad in [
            "[websocket]\nqueue_capacity = 1.5",
            "[websocket]\nqueue_capacity = 0.4",
            "[server]\nshutdown_timeout_secs = \"soon\"",
        ] {
            let e = check(bad).expect_err(bad);
            assert!(e.starts_with("local.toml: "), "{e}");
            assert!(e.ends_with("takes a whole number"), "{e}");
        }
        let vars = |v: &str| {
            vec![(
                "FLEETGATE_WEBSOCKET__QUEUE_CAPACITY".to_string(),
                v.to_string(),
            )]
            .into_iter()
        };
        assert_eq!(unclear_variable(vars("2048")), None);
        let e = unclear_variable(vars("-1")).expect("-1");
        assert!(
            e.starts_with("FLEETGATE_WEBSOCKET__QUEUE_CAPACITY = `-1`")
                && e.contains("not a negative one"),
            "{e}"
        );
        let e = unclear_variable(vars("2.5")).expect("2.5");
        assert!(
            e.starts_with("FLEETGATE_WEBSOCKET__QUEUE_CAPACITY = `2.5`")
                && e.ends_with("takes a whole number"),
            "{e}"
        );
    }

    #[test]
    fn a_variable_for_no_setting_is_refused_naming_it() {
        let var = |name: &str| vec![(name.to_string(), "5".to_string())].into_iter();
        let e = unclear_variable(var("FLEETGATE_WEBSOCKET__QUEUE_CAPACTY")).expect("key");
        assert!(
            e.starts_with(
                "FLEETGATE_WEBSOCKET__QUEUE_CAPACTY: no key `queue_capacty` in [websocket]"
            ) && e.contains("`queue_capacity`"),
            "{e}"
        );
        let e = unclear_variable(var("FLEETGATE_WEBSOCKT__QUEUE_CAPACITY")).expect("section");
        assert!(
            e.starts_with("FLEETGATE_WEBSOCKT__QUEUE_CAPACITY: no section `websockt`"),
            "{e}"
        );
    }

    #[test]
    fn a_setting_above_every_section_is_refused_naming_its_section() {
        let e = check_text("local.toml", "listen = \"0.0.0.0:8080\"")
            .expect_err("listen")
            .to_string();
        assert!(
            e.starts_with("local.toml: `listen` is a section, not a setting")
                && e.ends_with("the setting `listen` goes under [server]"),
            "{e}"
        );
        let e = check_text("local.toml", "url = \"postgres://x/y\"")
            .expect_err("url")
            .to_string();
        assert!(
            e.ends_with("the setting `url` goes under [database]"),
            "{e}"
        );
    }

    #[test]
    fn a_config_file_giving_a_true_false_setting_a_number_is_refused() {
        let check = |text: &str| check_text("local.toml", text);
        for ok in [
            "[websocket]\ncompression = false",
            "[websocket]\ncompression = \"on\"",
            "[websocket]\ncompression = 0",
            "[websocket]\nqueue_capacity = 2",
            "",
        ] {
            assert!(check(ok).is_ok(), "{ok}");
        }
        for bad in [
            "[websocket]\ncompression = 2",
            "[websocket]\ncompression = \"maybe\"",
            "[database]\nmigrate_on_start = 0.5",
        ] {
            let e = check(bad).expect_err(bad).to_string();
            assert!(e.starts_with("local.toml: "), "{e}");
            assert!(e.ends_with("takes true or false"), "{e}");
        }
    }

    #[test]
    fn rust_log_gets_the_log_level_check() {
        assert_eq!(check_filter("RUST_LOG", "debug,hyper=info"), Ok(()));
        let e = check_filter("RUST_LOG", "inf").expect_err("inf");
        assert!(e.starts_with("RUST_LOG `inf`"), "{e}");
        assert!(check_filter("RUST_LOG", "sqlx=loud").is_err());
    }

    #[test]
    fn the_default_frame_limit_holds_a_subscribe_of_the_most_trackers() {
        // A subscribe naming max_trackers_per_request ids of 19 digits (plus commas and the
        // message around them) fits in one frame (config/default.toml matches these defaults,
        // as the test above checks).
        let ws = WebSocketSettings::default();
        assert!(
            ws.max_frame_bytes >= largest_subscribe_bytes(ws.max_trackers_per_request),
            "{} bytes for {} ids",
            ws.max_frame_bytes,
            ws.max_trackers_per_request
        );
        assert_eq!(frame_limit_warning(&ws), None);
        // More ids allowed without a larger frame: said, with the size that would do.
        let more = WebSocketSettings {
            max_trackers_per_request: 20_000,
            ..WebSocketSettings::default()
        };
        let w = frame_limit_warning(&more).expect("a warning");
        assert!(w.contains("max_trackers_per_request = 20000"), "{w}");
        assert!(w.contains("raise max_frame_bytes to 400512"), "{w}");
        let both = WebSocketSettings {
            max_frame_bytes: 400_512,
            ..more
        };
        assert_eq!(frame_limit_warning(&both), None);
    }

    #[test]
    fn environment_overrides_sections_and_ignores_other_variables() {
        let s = load_with(&[
            ("FLEETGATE_SERVER__LISTEN", "0.0.0.0:9000"),
            ("FLEETGATE_WEBSOCKET__QUEUE_CAPACITY", "77"),
            ("FLEETGATE_LOG__FORMAT", "json"),
            ("FLEETGATE_LISTEN", "127.0.0.1:18090"),
            ("FLEETGATE_CONFIG_DIR", "elsewhere"),
        ]);
        assert_eq!(s.server.listen, "0.0.0.0:9000");
        assert_eq!(s.websocket.queue_capacity, 77);
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(
            s.listen.reconnect_min_ms,
            ListenSettings::default().reconnect_min_ms
        );
    }

    #[test]
    fn the_default_file_matches_the_built_in_defaults() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let file: Settings = config::Config::builder()
            .add_source(config::File::from(dir.join("default.toml")))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("config/default.toml parses");
        let built_in = Settings::default();
        assert_eq!(format!("{file:?}"), format!("{built_in:?}"));
    }

    /// `check-config` prints a file an operator can copy: every setting, read back as the same
    /// settings by the checks and the loader, the password left out.
    #[test]
    fn the_printed_settings_read_back_as_the_same_settings() {
        let mut s = load_with(&[
            ("FLEETGATE_WEBSOCKET__QUEUE_CAPACITY", "77"),
            ("FLEETGATE_LOG__FORMAT", "json"),
            (
                "FLEETGATE_WEB__TILE_URL",
                "https://tile.example/{z}/{x}/{y}.png?k=\"a\"",
            ),
        ]);
        s.database.url = "postgres://app:s3cret@db:5432/fleet".into();
        let text = s.to_toml().expect("settings print as TOML");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("[websocket]\n") && text.contains("queue_capacity = 77\n"));
        check_text("printed.toml", &text).expect("the printed file passes the file checks");
        let back: Settings = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("the printed file loads");
        s.database.url = redact_password(&s.database.url);
        assert_eq!(format!("{back:?}"), format!("{s:?}"));
    }

    #[test]
    fn a_misspelt_setting_is_an_error_not_ignored() {
        let err = |vars: &[(&str, &str)]| {
            let vars = vars.iter().map(|(k, v)| (k.to_string(), v.to_string()));
            config::Config::builder()
                .add_source(env_source(vars.collect::<Vec<_>>().into_iter()))
                .build()
                .and_then(|c| c.try_deserialize::<Settings>())
                .expect_err("an unknown setting")
                .to_string()
        };
        let e = err(&[("FLEETGATE_WEBSOCKET__MAX_SOCKET", "100")]);
        assert!(e.contains("max_socket") && e.contains("max_sockets"), "{e}");
        let e = err(&[("FLEETGATE_SERVR__LISTEN", "0.0.0.0:9000")]);
        assert!(e.contains("servr"), "{e}");
        let file = config::Config::builder()
            .add_source(config::File::from_str(
                "[websocket]\nqueue_capacity = 10\nheartbeat = 5\n",
                config::FileFormat::Toml,
            ))
            .build()
            .and_then(|c| c.try_deserialize::<Settings>());
        let e = file.expect_err("an unknown key in a file").to_string();
        assert!(e.contains("heartbeat"), "{e}");
    }

    #[test]
    fn a_setting_variable_with_one_underscore_is_an_error_naming_the_right_one() {
        let vars = |names: &[&str]| {
            names
                .iter()
                .map(|n| (n.to_string(), "x".to_string()))
                .collect::<Vec<_>>()
                .into_iter()
        };
        let e = misspelt_variable(vars(&["FLEETGATE_LOG_FORMAT"])).expect("an error");
        assert!(e.contains("FLEETGATE_LOG__FORMAT"), "{e}");
        let e = misspelt_variable(vars(&["FLEETGATE_WEB_TILE_URL"])).expect("an error");
        assert!(e.contains("FLEETGATE_WEB__TILE_URL"), "{e}");
        let e = misspelt_variable(vars(&["FLEETGATE_LOGFORMAT"])).expect("an error");
        assert!(e.contains("FLEETGATE_LOG__FORMAT"), "{e}");
        // A key without its section.
        let e = misspelt_variable(vars(&["FLEETGATE_WORKERS"])).expect("an error");
        assert!(e.contains("FLEETGATE_SERVER__WORKERS"), "{e}");
        let e = misspelt_variable(vars(&["FLEETGATE_MAX_SOCKETS"])).expect("an error");
        assert!(e.contains("__MAX_SOCKETS"), "{e}");
        // The prefix in other letters: read as nothing, so an error naming the variable meant;
        // not for a variable naming no setting.
        for name in ["fleetgate_server__workers", "Fleetgate_SERVER__WORKERS"] {
            let e = misspelt_variable(vars(&[name])).expect(name);
            assert!(
                e.starts_with(name) && e.ends_with("FLEETGATE_SERVER__WORKERS"),
                "{e}"
            );
        }
        assert_eq!(
            misspelt_variable(vars(&["fleetgate_pg_port", "fleetgate_server__nothing"])),
            None
        );
        // The scripts' and tools' own variables, and settings spelt right, are not settings
        // misspelt.
        assert_eq!(
            misspelt_variable(vars(&[
                "FLEETGATE_LISTEN",
                "FLEETGATE_CONFIG",
                "FLEETGATE_CONFIG_DIR",
                "FLEETGATE_DEMO_RATE",
                "FLEETGATE_PG_PORT",
                "FLEETGATE_SKIP_BROWSER",
                "FLEETGATE_BENCH_GATEWAY_LOG",
                "FLEETGATE_LOG__FORMAT",
                "FLEETGATE_LISTEN_ADDRESS",
                "FLEETGATE_PG_DIR",
                "FLEETGATE_PG_BINDIR",
                "FLEETGATE_PG_DB",
                "FLEETGATE_PG_FORCE_PRIVATE",
                "FLEETGATE_CHROMIUM",
                "FLEETGATE_CHROMEDRIVER",
                "FLEETGATE_TEST_LOG",
                "FLEETGATE_TEST_GATEWAY",
                "FLEETGATE_USER_PASSWORD",
                "FLEETGATE_DEMO_READY_TIMEOUT",
                "FLEETGATE_BENCH_GATEWAY",
                "FLEETGATE_BENCH_EPOCH_NS",
            ])),
            None
        );
    }

    #[test]
    fn serve_warns_of_the_demo_scripts_listen_variable_only_when_it_would_differ() {
        assert_eq!(listen_variable_ignored(None, "127.0.0.1:8080"), None);
        assert_eq!(listen_variable_ignored(Some(""), "127.0.0.1:8080"), None);
        assert_eq!(
            listen_variable_ignored(Some("127.0.0.1:8080"), "127.0.0.1:8080"),
            None
        );
        let w = listen_variable_ignored(Some("0.0.0.0:9000"), "127.0.0.1:8080").expect("a warning");
        assert!(
            w.contains("FLEETGATE_SERVER__LISTEN") && w.contains("127.0.0.1:8080"),
            "{w}"
        );
    }
}
