//! Logging set-up: human-readable lines on a terminal, or one JSON object per line for
//! log collectors (`--log-format json`). `RUST_LOG` overrides the level filter.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, writing to stderr so stdout stays machine-readable
/// (`list-models --json`, `config show`); `json` writes one JSON object per line. Calling it
/// twice is harmless.
pub fn init(json: bool, verbose: bool) {
    let default = if verbose { "debug" } else { "info" };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colour codes only on a terminal: piped or redirected logs stay plain `key=value` text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.with_target(false).try_init()
    };
}
