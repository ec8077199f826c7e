//! Logs as a cluster's log pipeline reads them: colour only when stderr is a terminal (and
//! never with `NO_COLOR` set), plain text or one JSON object per line (`--log-format`), and
//! values a client controls bounded before they reach a log line.
//!
//! Per-request lines (routed, answered by the picker, finished, evicted) carry the request id
//! (`x-request-id`, as the proxy sent it) and the endpoint picked as fields. Fields are only
//! evaluated when their level is enabled, so a quiet server pays nothing per request.

use std::ffi::OsStr;
use std::io::IsTerminal;

use crate::cli::LogFormat;

/// Longest client-controlled value (request id, model name) written into a log line, in
/// characters; longer values are cut.
pub const MAX_LOGGED_CHARS: usize = 128;

/// The most verbose level logged for `-v` given `verbose` times: warnings by default, then
/// info, debug, and trace from three on.
pub fn level(verbose: u8) -> tracing::Level {
    match verbose {
        0 => tracing::Level::WARN,
        1 => tracing::Level::INFO,
        2 => tracing::Level::DEBUG,
        _ => tracing::Level::TRACE,
    }
}

/// Whether text logs are coloured: only on a terminal, and not when `NO_COLOR` is set to a
/// non-empty value (<https://no-color.org>).
pub fn colour(is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// `value` cut to at most [`MAX_LOGGED_CHARS`] characters (on a character boundary). Escaping
/// is the formatter's: text logs quote and escape string fields, JSON logs escape them.
pub fn bounded(value: &str) -> &str {
    match value.char_indices().nth(MAX_LOGGED_CHARS) {
        Some((end, _)) => &value[..end],
        None => value,
    }
}

/// Installs the process's log subscriber, writing to stderr. Panics if one is installed
/// already (the binary calls it once, first thing).
pub fn init(verbose: u8, format: LogFormat) {
    let builder =
        tracing_subscriber::fmt().with_max_level(level(verbose)).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let no_color = std::env::var_os("NO_COLOR");
            let ansi = colour(std::io::stderr().is_terminal(), no_color.as_deref());
            builder.with_ansi(ansi).init();
        }
        // Fields sit at the top level of each object, next to `timestamp`, `level`, `target`
        // and `message`, as log collectors index them.
        LogFormat::Json => builder.with_ansi(false).json().flatten_event(true).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))), "an empty NO_COLOR does not count");
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new("1"))));
    }

    #[test]
    fn verbosity_levels() {
        let levels = [0, 1, 2, 3, 9].map(level);
        use tracing::Level;
        assert_eq!(levels, [Level::WARN, Level::INFO, Level::DEBUG, Level::TRACE, Level::TRACE]);
    }

    #[test]
    fn logged_values_are_bounded_on_a_character_boundary() {
        assert_eq!(bounded("r-1"), "r-1");
        let exact = "x".repeat(MAX_LOGGED_CHARS);
        assert_eq!(bounded(&exact), exact);
        assert_eq!(bounded(&format!("{exact}tail")), exact);
        let wide = "é".repeat(MAX_LOGGED_CHARS + 5);
        assert_eq!(bounded(&wide).chars().count(), MAX_LOGGED_CHARS);
        assert_eq!(bounded(""), "");
    }
}
