//! What a worker says when `accept()` fails: at most one line a second for all its threads (a
//! [`LogBudget`]), with how many failures it did not log and what to do about the cause.
//!
//! A full descriptor table makes every accept on every serving thread fail, each after its own back-off:
//! logged one by one, that is a flood that hides the one line an operator needs (raise the limit).

use std::io;
use std::time::Duration;

use nix::sys::resource::{getrlimit, Resource};
use tracing::error;

use super::log_budget::{left_out, LogBudget};

/// One line a second says all there is to say about a full descriptor table.
const LINES_PER_SECOND: u64 = 1;

/// Shared by a worker's serving threads.
pub(super) struct AcceptErrors(LogBudget);

impl AcceptErrors {
    pub(super) fn new() -> Self {
        Self(LogBudget::new(LINES_PER_SECOND))
    }

    /// Logs `err` if the budget allows (else it is counted into the next line).
    pub(super) fn report(&self, err: &io::Error, retry_in: Duration) {
        if let Some(unlogged) = self.0.admit() {
            let also = left_out(unlogged, "failures");
            error!("accept failed: {err}{also}; {}; accepting again in {retry_in:?}", advice(err));
        }
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
    fn advice_names_the_limit_for_a_full_descriptor_table() {
        let advice = advice(&io::Error::from_raw_os_error(libc::EMFILE));
        assert!(advice.contains("LimitNOFILE"), "{advice}");
        assert!(advice.contains("RLIMIT_NOFILE"), "{advice}");
    }
}
