//! The log setup every process of the vmm shares.
//!
//! Many log lines are triggered by something outside our trust boundary: a guest that
//! writes a bad value to a device register, reads an unknown MSR or sets up a ring outside
//! RAM; a host disk that fails every request. Each such line is worth seeing once, but a
//! guest can trigger it a million times a second. So every call site that logs at `info`,
//! `warn` or `error` may print a burst of lines per window; beyond that its lines are
//! counted, one line says so, and the count is printed when the site may log again.
//! `debug` and `trace` are never limited: whoever turns them on wants every line (the
//! instruction trace of `-d in_asm` among them).

mod rate_limit;

pub use rate_limit::{Admission, RateLimit};

use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Lines one call site may print per [`WINDOW`] before it is limited.
pub const BURST: u32 = 10;
/// The window over which [`BURST`] applies.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Logs to stderr (which the vmm shares with its device processes) through the `VMM_LOG`
/// filter (tracing's EnvFilter syntax; default `warn`) plus `directives`, each call site
/// limited as the crate's documentation says. Does nothing if a logger is already set.
pub fn init(directives: &[&str]) {
    let mut filter = EnvFilter::try_from_env("VMM_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    for d in directives {
        if let Ok(d) = d.parse() {
            filter = filter.add_directive(d);
        }
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(RateLimit::new(BURST, WINDOW, std::io::stderr))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .try_init();
}
