//! Tracing subscriber set-up. The sink is injectable so tests can silence or capture logs.

use tracing_subscriber::{fmt::MakeWriter, EnvFilter};

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber; a second call (as in tests) is a no-op.
pub fn init<W>(settings: &LogSettings, sink: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{},sqlx::postgres::notice=warn", settings.level)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(sink);
    let _ = match settings.format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
