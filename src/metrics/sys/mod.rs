//! What the kernel says about the server's processes and sockets, read by the master for the metrics and its
//! checks: a process's memory (`/proc/PID/statm`) and a listening socket's accept queue
//! ([`listen_queue`]: `TCP_INFO`, or `NETLINK_SOCK_DIAG` for Unix sockets). Plain, short, blocking reads;
//! nothing here outlives a call.

mod listen_queue;

pub use listen_queue::{listen_queue, QueueDepth};

/// A process's memory, from `/proc/PID/statm`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Memory {
    /// Virtual size, bytes.
    pub size: u64,
    /// Resident set, bytes.
    pub resident: u64,
}

/// The memory of process `pid`; `None` if it is gone (or `/proc` cannot say).
pub fn memory(pid: u32) -> Option<Memory> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let mut pages = statm.split_whitespace().map(|field| field.parse::<u64>().ok());
    let (size, resident) = (pages.next()??, pages.next()??);
    let page_size = u64::try_from(nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??).ok()?;
    Some(Memory { size: size * page_size, resident: resident * page_size })
}
