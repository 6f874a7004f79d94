//! What running under an init system needs at run time: systemd readiness notification, the pidfile,
//! privilege drop, the open-files limit and the listen-backlog check. (Socket activation is beside the
//! listening sockets, in `server`; user and group lookups beside the config.)
//!
//! Plain system calls through libc; no tokio, no pyo3.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::unistd::{self, Gid, Uid};
use tracing::{info, warn};

use crate::config::owner::{primary_group, Owner};

/// Where Linux keeps the largest backlog `listen()` really grants.
const SOMAXCONN_PATH: &str = "/proc/sys/net/core/somaxconn";

/// Tells systemd (`Type=notify`) about the service's state, e.g. `READY=1`; does nothing without
/// `NOTIFY_SOCKET`.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &address)
            }
            None => socket.send_to(state.as_bytes(), Path::new(&path)),
        }
    });
    if let Err(err) = sent {
        warn!("cannot notify systemd ({state}): {err}");
    }
}

/// The pidfile, removed when dropped.
pub struct Pidfile(PathBuf);

impl Pidfile {
    pub fn create(path: &Path) -> io::Result<Self> {
        std::fs::write(path, format!("{}\n", std::process::id()))?;
        Ok(Self(path.to_path_buf()))
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.0) {
            warn!("cannot remove the pidfile {}: {err}", self.0.display());
        }
    }
}

/// Drops to `owner` (group first, then user, as root must), after the sockets are bound and before the app
/// is loaded, so the app never runs as root. With a user and no group, the user's primary group is used, and
/// root's supplementary groups are always cleared: nothing of root's group access is kept.
pub fn drop_privileges(owner: Owner) -> io::Result<()> {
    let gid = owner.gid.or_else(|| owner.uid.and_then(primary_group));
    if owner.uid.is_none() && gid.is_none() {
        return Ok(());
    }
    // Fails with EPERM only when not root, and then there is nothing to clear.
    match unistd::setgroups(&[]) {
        Ok(()) | Err(Errno::EPERM) => {}
        Err(err) => return Err(err.into()),
    }
    if let Some(gid) = gid {
        unistd::setgid(Gid::from_raw(gid))?;
    }
    if let Some(uid) = owner.uid {
        unistd::setuid(Uid::from_raw(uid))?;
    }
    info!("running as uid {:?}, gid {gid:?}", owner.uid);
    Ok(())
}

/// Warns when `--listen` asks for more than the kernel grants (`net.core.somaxconn` caps it silently).
pub fn check_backlog(backlog: u32) {
    let Some(limit) = std::fs::read_to_string(SOMAXCONN_PATH).ok().and_then(|s| s.trim().parse::<u32>().ok())
    else {
        return;
    };
    if backlog > limit {
        warn!(
            "--listen {backlog} is over net.core.somaxconn ({limit}): the kernel caps the backlog at {limit}; \
             raise it with `sysctl -w net.core.somaxconn={backlog}`"
        );
    }
}

/// Raises the open-file soft limit to the hard one, as nginx (`worker_rlimit_nofile`) and Go programs do:
/// every connection holds a descriptor, idle and slow ones included, and the usual soft default (1024) is a
/// few hundred idle clients away. Returns the limit in force.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        // Raising the soft limit up to the hard one is always allowed.
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        return Ok(hard);
    }
    Ok(soft)
}
