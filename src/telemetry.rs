//! Tracing subscriber set-up. The sink is injectable so tests can silence or capture logs.

use tracing_subscriber::{fmt::MakeWriter, EnvFilter};

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber; a second call (as in tests) is a no-op.
pub fn init<W>(settings: &LogSettings, sink: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    // An empty RUST_LOG counts as unset (as a filter it would log nothing).
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let filter = env
        .map_or_else(|| Err(()), |v| EnvFilter::try_new(v).map_err(drop))
        .or_else(|_| EnvFilter::try_new(format!("{},sqlx::postgres::notice=warn", settings.level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
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

/// How logs name a session: its hash's first six characters, never the whole hash (which is a
/// credential). Characters, not bytes: a hash written by hand may hold any.
pub fn session_tag(hash: &str) -> &str {
    let end = hash.char_indices().nth(6).map_or(hash.len(), |(i, _)| i);
    &hash[..end]
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_session_tag_is_six_characters_of_any_width() {
        assert_eq!(super::session_tag("abcdef0123"), "abcdef");
        assert_eq!(super::session_tag("äöüßéèxyz"), "äöüßéè");
        assert_eq!(super::session_tag("abc"), "abc");
    }
}
