//! A minimal stderr logger: one line per event, UTC timestamp, level, and the thread's tag
//! (a worker's `[w1]` when there are several). `-v` shows debug lines, `-q` only warnings
//! and errors.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

struct Stderr;

thread_local! {
    /// Put in front of every line this thread logs (a worker's `[w1] `).
    static TAG: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Every line this thread logs from now on starts with `tag`.
pub fn set_thread_tag(tag: String) {
    TAG.with(|t| *t.borrow_mut() = tag);
}

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level() && m.target().starts_with("wsnic")
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let line =
                TAG.with(|t| format!("{} {:<5} {}{}\n", timestamp(SystemTime::now()), r.level(), t.borrow(), r.args()));
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        }
    }

    fn flush(&self) {}
}

/// `2026-11-25T10:12:22.123Z`
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Install the logger: verbosity -1 (quiet), 0 (default) or 1 (verbose).
pub fn init(verbosity: i8) {
    let level = match verbosity {
        i8::MIN..=-1 => log::LevelFilter::Warn,
        0 => log::LevelFilter::Info,
        _ => log::LevelFilter::Debug,
    };
    let _ = log::set_logger(&Stderr);
    log::set_max_level(level);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(timestamp(UNIX_EPOCH + Duration::from_millis(1_795_602_742_123)), "2026-11-25T10:32:22.123Z");
        assert_eq!(timestamp(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
    }
}

/// At most one log line per `interval` for a noisy event; the next line says how many were
/// held back. (Refusals and drops can come at the rate an attacker chooses.)
#[derive(Debug)]
pub struct RateLimited {
    interval: std::time::Duration,
    last: Option<std::time::Instant>,
    held: u64,
}

impl RateLimited {
    pub const fn new(interval: std::time::Duration) -> RateLimited {
        RateLimited { interval, last: None, held: 0 }
    }

    /// `Some(held back since the last line)` if a line may be logged now.
    pub fn allow(&mut self, now: std::time::Instant) -> Option<u64> {
        if self.last.is_some_and(|t| now.saturating_duration_since(t) < self.interval) {
            self.held += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held))
    }
}

#[cfg(test)]
mod rate_tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn holds_back_and_counts() {
        let mut r = RateLimited::new(Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(r.allow(t), Some(0));
        assert_eq!(r.allow(t + Duration::from_secs(1)), None);
        assert_eq!(r.allow(t + Duration::from_secs(2)), None);
        assert_eq!(r.allow(t + Duration::from_secs(10)), Some(2));
    }
}
