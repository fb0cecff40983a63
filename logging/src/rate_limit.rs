//! A per-call-site limit on log lines, as a tracing layer.

use std::collections::HashMap;
use std::hash::Hash;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::callsite::Identifier;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, Layer};

/// What becomes of one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Print it; `suppressed` lines from the same site were dropped since the last one.
    Pass { suppressed: u64 },
    /// Drop it: the first dropped since the site was last allowed to print.
    FirstSuppressed,
    /// Drop it.
    Suppressed,
}

/// The count for one call site.
struct Site {
    window_start: Instant,
    passed: u32,
    suppressed: u64,
}

/// Up to `burst` lines per `window` for each key. Keys are call sites, which are static and
/// few, so the table stays small.
struct Limiter<K> {
    burst: u32,
    window: Duration,
    sites: HashMap<K, Site>,
}

impl<K: Hash + Eq> Limiter<K> {
    fn new(burst: u32, window: Duration) -> Self {
        Limiter {
            burst,
            window,
            sites: HashMap::new(),
        }
    }

    fn admit(&mut self, key: K, now: Instant) -> Admission {
        let site = self.sites.entry(key).or_insert(Site {
            window_start: now,
            passed: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(site.window_start) >= self.window {
            site.window_start = now;
            site.passed = 0;
        }
        if site.passed < self.burst {
            site.passed += 1;
            Admission::Pass {
                suppressed: std::mem::take(&mut site.suppressed),
            }
        } else {
            site.suppressed += 1;
            if site.suppressed == 1 {
                Admission::FirstSuppressed
            } else {
                Admission::Suppressed
            }
        }
    }
}

/// A layer that drops `info`, `warn` and `error` lines beyond `burst` per `window` from any
/// one call site, and says so on `writer`: once when a site starts being limited, and with
/// the count of lines dropped before the site's next line.
pub struct RateLimit<W> {
    limiter: Mutex<Limiter<Identifier>>,
    writer: W,
}

impl<W> RateLimit<W> {
    pub fn new(burst: u32, window: Duration, writer: W) -> Self {
        RateLimit {
            limiter: Mutex::new(Limiter::new(burst, window)),
            writer,
        }
    }
}

impl<W: for<'w> MakeWriter<'w> + 'static> RateLimit<W> {
    /// One line in the shape of the fmt layer's (time, level, target), so it reads like the
    /// lines around it.
    fn note(&self, meta: &Metadata<'_>, text: std::fmt::Arguments<'_>) {
        let mut time = String::new();
        let _ = SystemTime.format_time(&mut Writer::new(&mut time));
        let line = format!(
            "{time} {:>5} {}: {text} (from {}:{})\n",
            meta.level(),
            meta.target(),
            meta.file().unwrap_or("?"),
            meta.line().unwrap_or(0)
        );
        let _ = self.writer.make_writer().write_all(line.as_bytes());
    }
}

impl<S: Subscriber, W: for<'w> MakeWriter<'w> + 'static> Layer<S> for RateLimit<W> {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let meta = event.metadata();
        if *meta.level() > Level::INFO {
            return true;
        }
        let (admission, window) = {
            let mut limiter = self.limiter.lock().unwrap_or_else(|e| e.into_inner());
            (
                limiter.admit(meta.callsite(), Instant::now()),
                limiter.window,
            )
        };
        match admission {
            Admission::Pass { suppressed: 0 } => true,
            Admission::Pass { suppressed } => {
                self.note(
                    meta,
                    format_args!("{suppressed} more lines like the next were suppressed"),
                );
                true
            }
            Admission::FirstSuppressed => {
                self.note(
                    meta,
                    format_args!(
                        "this line repeats too often; more are suppressed for up to {} s",
                        window.as_secs()
                    ),
                );
                false
            }
            Admission::Suppressed => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn a_site_gets_a_burst_per_window_then_a_count() {
        let mut l = Limiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        for i in 0..3 {
            assert_eq!(l.admit("a", at(i)), Admission::Pass { suppressed: 0 });
        }
        assert_eq!(l.admit("a", at(5)), Admission::FirstSuppressed);
        assert_eq!(l.admit("a", at(6)), Admission::Suppressed);
        assert_eq!(l.admit("a", at(7)), Admission::Suppressed);
        // Another site has its own budget.
        assert_eq!(l.admit("b", at(8)), Admission::Pass { suppressed: 0 });
        // A new window: the count of dropped lines comes with the first line let through.
        assert_eq!(l.admit("a", at(10_005)), Admission::Pass { suppressed: 3 });
        assert_eq!(l.admit("a", at(10_006)), Admission::Pass { suppressed: 0 });
        assert_eq!(l.admit("a", at(10_007)), Admission::Pass { suppressed: 0 });
        assert_eq!(l.admit("a", at(10_008)), Admission::FirstSuppressed);
    }

    /// A writer into a shared buffer, to see what the layers print.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Captured {
            self.clone()
        }
    }

    #[test]
    fn a_flood_from_one_site_is_cut_to_the_burst_and_a_note() {
        let out = Captured::default();
        let subscriber = tracing_subscriber::registry()
            .with(RateLimit::new(5, Duration::from_secs(3600), out.clone()))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .with_writer(out.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..100_000 {
                tracing::warn!("guest wrote {i} to a register");
                tracing::debug!("never limited {i}");
            }
            tracing::error!("another site");
        });
        let text =
            String::from_utf8_lossy(&out.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        let warned = lines.iter().filter(|l| l.contains("guest wrote")).count();
        assert_eq!(warned, 5, "{text}");
        assert_eq!(
            lines
                .iter()
                .filter(|l| l.contains("suppressed for up to 3600 s"))
                .count(),
            1
        );
        assert!(lines
            .iter()
            .any(|l| l.contains("ERROR") && l.contains("another site")));
        // The registry has no level filter here, so debug lines reach the fmt layer: all of them.
        assert_eq!(
            lines.iter().filter(|l| l.contains("never limited")).count(),
            100_000
        );
        let note = lines
            .iter()
            .find(|l| l.contains("suppressed for"))
            .copied()
            .unwrap_or_default();
        assert!(
            note.contains(" WARN ")
                && note.contains("logging::rate_limit")
                && note.contains("rate_limit.rs:"),
            "{note}"
        );
    }
}
