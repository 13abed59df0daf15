//! Tracing subscriber set-up. The sink is injectable so tests can silence or capture logs.

use tracing_subscriber::{fmt::MakeWriter, EnvFilter};

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber; a second call (as in tests) is a no-op.
pub fn init<W>(settings: &LogSettings, sink: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let (spec, _) = filter_spec(&settings.level, rust_log().as_deref());
    let filter = EnvFilter::try_new(spec).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal: in a file or the journal the escape codes are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(sink);
    let _ = match settings.format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// `RUST_LOG`, unless unset or empty (as a filter, an empty one would log nothing).
pub fn rust_log() -> Option<String> {
    std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty())
}

/// What became of `RUST_LOG` (see [`filter_spec`]).
#[derive(Debug, PartialEq, Eq)]
pub enum RustLog {
    Unset,
    /// It overrides `log.level`, with a warning if it has a bare word that is no level.
    Used(Option<String>),
    /// It does not parse: `log.level` is used, and this says so.
    Ignored(String),
}

/// The filter logs go through, and what became of `rust_log` (`RUST_LOG`, which overrides
/// `level`): a filter that does not parse is ignored for `level`, and one with a bare word that
/// is no level (a target name to the filter) is taken with a warning. sqlx's notices
/// (`relation … already exists` at every start) stay at `warn` unless the filter names sqlx.
pub fn filter_spec(level: &str, rust_log: Option<&str>) -> (String, RustLog) {
    // (Not under a filter that names sqlx, nor one quieter than `warn` for everything, which
    // the directive would raise.)
    let quiet = |spec: &str| {
        let hushed = spec
            .split(',')
            .any(|d| matches!(d.trim().to_ascii_lowercase().as_str(), "off" | "error"));
        if spec.contains("sqlx") || hushed {
            spec.to_string()
        } else {
            format!("{spec},sqlx::postgres::notice=warn")
        }
    };
    let Some(env) = rust_log else {
        return (quiet(level), RustLog::Unset);
    };
    if let Err(e) = EnvFilter::try_new(env) {
        return (
            quiet(level),
            RustLog::Ignored(format!(
                "RUST_LOG `{env}` is not a filter ({e}): ignored, logging at log.level `{level}`"
            )),
        );
    }
    let warning = crate::config::check_filter("RUST_LOG", env)
        .err()
        .map(|e| format!("{e} (as it is, it turns on every level of a target by that name)"));
    (quiet(env), RustLog::Used(warning))
}

/// How logs name a session: its hash's first six characters, never the whole hash (which is a
/// credential). Characters, not bytes: a hash written by hand may hold any.
pub fn session_tag(hash: &str) -> &str {
    let end = hash.char_indices().nth(6).map_or(hash.len(), |(i, _)| i);
    &hash[..end]
}

/// Lets a warning through once a second at most, for events a client can repeat in a loop (a
/// refused socket, a refused login), which would otherwise flood the log. Each line counts the
/// events it stands for (`also`: those left unlogged since the last line).
pub struct LogGate {
    epoch: std::time::Instant,
    /// When a line was last let through, in seconds since `epoch` (plus one).
    at: std::sync::atomic::AtomicU64,
    held: std::sync::atomic::AtomicU64,
}

impl Default for LogGate {
    fn default() -> LogGate {
        LogGate {
            epoch: std::time::Instant::now(),
            at: std::sync::atomic::AtomicU64::new(0),
            held: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl LogGate {
    /// `Some(n)` when a line may be logged now, `n` the events not logged since the last one;
    /// `None` (and the event counted) otherwise.
    pub fn pass(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.epoch.elapsed().as_secs() + 1;
        let last = self.at.load(Relaxed);
        if now > last
            && self
                .at
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            Some(self.held.swap(0, Relaxed))
        } else {
            self.held.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LogGate;

    #[test]
    fn rust_log_overrides_the_level_unless_it_does_not_parse() {
        use super::{filter_spec, RustLog};
        assert_eq!(
            filter_spec("warn", None),
            ("warn,sqlx::postgres::notice=warn".into(), RustLog::Unset)
        );
        assert_eq!(
            filter_spec("warn", Some("debug")),
            (
                "debug,sqlx::postgres::notice=warn".into(),
                RustLog::Used(None)
            )
        );
        // A filter that names sqlx, or is quieter than `warn`, is the operator's to the letter.
        assert_eq!(
            filter_spec("warn", Some("info,sqlx=debug")).0,
            "info,sqlx=debug"
        );
        assert_eq!(filter_spec("warn", Some("off")).0, "off");
        assert_eq!(filter_spec("error", None).0, "error");
        let (spec, said) = filter_spec("warn", Some("debug,fleetgate=loud"));
        assert_eq!(spec, "warn,sqlx::postgres::notice=warn");
        assert!(
            matches!(&said, RustLog::Ignored(w) if w.ends_with("ignored, logging at log.level `warn`")),
            "{said:?}"
        );
        let (spec, said) = filter_spec("warn", Some("fleetgate"));
        assert_eq!(spec, "fleetgate,sqlx::postgres::notice=warn");
        assert!(
            matches!(&said, RustLog::Used(Some(w)) if w.contains("`fleetgate` is not a level")),
            "{said:?}"
        );
    }

    #[test]
    fn a_session_tag_is_six_characters_of_any_width() {
        assert_eq!(super::session_tag("abcdef0123"), "abcdef");
        assert_eq!(super::session_tag("äöüßéèxyz"), "äöüßéè");
        assert_eq!(super::session_tag("abc"), "abc");
    }

    #[test]
    fn the_log_gate_lets_one_line_a_second_through_and_counts_the_rest() {
        let gate = LogGate::default();
        assert_eq!(gate.pass(), Some(0));
        for _ in 0..5 {
            assert_eq!(gate.pass(), None);
        }
        // A second later (as if): the next line says five were not logged.
        gate.at.store(0, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(gate.pass(), Some(5));
        assert_eq!(gate.pass(), None);
    }
}
