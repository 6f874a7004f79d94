//! What a worker says when `accept()` fails: at most one line a second for all its threads, with how many
//! failures it did not log and what to do about the cause.
//!
//! A full descriptor table makes every accept on every serving thread fail, each after its own back-off:
//! logged one by one, that is a flood that hides the one line an operator needs (raise the limit).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::resource::{getrlimit, Resource};
use tracing::error;

/// At most one accept failure is logged per interval; the others are counted into the next line.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Shared by a worker's serving threads.
pub(super) struct AcceptErrors {
    epoch: Instant,
    /// Milliseconds since `epoch` before which nothing more is logged.
    quiet_until: AtomicU64,
    /// Failures since the last line.
    unlogged: AtomicU64,
}

impl AcceptErrors {
    pub(super) fn new() -> Self {
        Self { epoch: Instant::now(), quiet_until: AtomicU64::new(0), unlogged: AtomicU64::new(0) }
    }

    /// Logs `err`, unless a line went out less than [`LOG_INTERVAL`] ago (then it is counted).
    pub(super) fn report(&self, err: &io::Error, retry_in: Duration) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let quiet_until = self.quiet_until.load(Ordering::Relaxed);
        let next = now.saturating_add(u64::try_from(LOG_INTERVAL.as_millis()).unwrap_or(u64::MAX));
        if now < quiet_until
            || self
                .quiet_until
                .compare_exchange(quiet_until, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let unlogged = self.unlogged.swap(0, Ordering::Relaxed);
        let also =
            if unlogged > 0 { format!(" ({unlogged} more since the last such line)") } else { String::new() };
        error!("accept failed: {err}{also}; {}; accepting again in {retry_in:?}", advice(err));
    }
}

/// What to do about an accept failure.
fn advice(err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::EMFILE) => {
            let limit = getrlimit(Resource::RLIMIT_NOFILE)
                .map_or_else(|_| "?".to_owned(), |(soft, _)| soft.to_string());
            format!(
                "this process has used all {limit} file descriptors it may open (RLIMIT_NOFILE): raise the limit \
                 (LimitNOFILE= in the systemd unit, `ulimit -n` in the shell that starts oxwsgi) or lower \
                 --socket-timeout so idle connections are closed sooner"
            )
        }
        Some(libc::ENFILE) => {
            "the whole system is out of file descriptors: raise fs.file-max or find the process holding them"
                .to_owned()
        }
        Some(libc::ENOBUFS | libc::ENOMEM) => "the kernel is short of memory for sockets".to_owned(),
        _ => "the listening socket may be broken".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_within_the_interval_are_counted_not_logged() {
        let errors = AcceptErrors::new();
        let err = io::Error::from_raw_os_error(libc::EMFILE);
        errors.report(&err, Duration::from_millis(5));
        assert!(errors.quiet_until.load(Ordering::Relaxed) >= 1000);
        for _ in 0..10 {
            errors.report(&err, Duration::from_millis(5));
        }
        assert_eq!(errors.unlogged.load(Ordering::Relaxed), 10);
        // Once the interval is over, the next failure is logged and the count starts again.
        errors.quiet_until.store(0, Ordering::Relaxed);
        errors.report(&err, Duration::from_millis(5));
        assert_eq!(errors.unlogged.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn advice_names_the_limit_for_a_full_descriptor_table() {
        let advice = advice(&io::Error::from_raw_os_error(libc::EMFILE));
        assert!(advice.contains("LimitNOFILE"), "{advice}");
        assert!(advice.contains("RLIMIT_NOFILE"), "{advice}");
    }
}
