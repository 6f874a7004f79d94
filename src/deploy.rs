//! What running under an init system needs: systemd socket activation and readiness notification, the
//! pidfile, socket ownership, privilege drop, and the listen-backlog check.
//!
//! Plain system calls through libc; no tokio, no pyo3.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::config::SocketSpec;
use crate::server::BoundSocket;

/// systemd passes activated sockets from this descriptor on (`SD_LISTEN_FDS_START`).
const SD_LISTEN_FDS_START: RawFd = 3;
/// Where Linux keeps the largest backlog `listen()` really grants.
const SOMAXCONN_PATH: &str = "/proc/sys/net/core/somaxconn";

/// The sockets systemd passed (`LISTEN_FDS`, for this process per `LISTEN_PID`), if any. The variables
/// are removed, so that processes this one starts do not take the sockets for theirs.
pub fn systemd_sockets() -> io::Result<Option<Vec<BoundSocket>>> {
    let for_us =
        std::env::var("LISTEN_PID").ok().and_then(|pid| pid.parse::<u32>().ok()) == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<RawFd>().ok());
    // SAFETY (both): removing variables while no other thread runs (this is called at start-up).
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        unsafe { std::env::remove_var(name) };
    }
    let (true, Some(count)) = (for_us, count) else { return Ok(None) };
    (SD_LISTEN_FDS_START..SD_LISTEN_FDS_START + count)
        // SAFETY: systemd hands this process (LISTEN_PID said so) descriptors 3..3+LISTEN_FDS, which
        // nothing else here owns, and each is taken once.
        .map(|fd| adopt(unsafe { OwnedFd::from_raw_fd(fd) }))
        .collect::<io::Result<_>>()
        .map(Some)
}

/// A listening socket handed to this process, whose address says where it listens.
pub fn adopt(socket: OwnedFd) -> io::Result<BoundSocket> {
    let spec = spec_of(socket.as_fd())?;
    BoundSocket::inherited(socket, spec)
}

fn spec_of(socket: BorrowedFd<'_>) -> io::Result<SocketSpec> {
    let address = socket2::SockRef::from(&socket).local_addr()?;
    if let Some(address) = address.as_socket() {
        return Ok(SocketSpec::Tcp(address));
    }
    match address.as_pathname() {
        Some(path) => Ok(SocketSpec::Unix(path.to_path_buf())),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an activated socket is neither TCP nor a Unix path",
        )),
    }
}

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

/// A user and group, resolved from names or numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub uid: Option<libc::uid_t>,
    pub gid: Option<libc::gid_t>,
}

/// `USER[:GROUP]`, names or numbers.
pub fn parse_owner(text: &str) -> Result<Owner, String> {
    let (user, group) = text.split_once(':').map_or((text, None), |(u, g)| (u, Some(g)));
    let uid = (!user.is_empty()).then(|| resolve_user(user)).transpose()?;
    let gid = group.filter(|g| !g.is_empty()).map(resolve_group).transpose()?;
    Ok(Owner { uid, gid })
}

pub fn resolve_user(name: &str) -> Result<libc::uid_t, String> {
    if let Ok(uid) = name.parse() {
        return Ok(uid);
    }
    let c_name = CString::new(name).map_err(|_| format!("no such user: {name:?}"))?;
    // SAFETY: getpwnam with a NUL-terminated name; the result is read at once, before any other call.
    let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
    if entry.is_null() {
        return Err(format!("no such user: {name:?}"));
    }
    // SAFETY: non-null result of getpwnam.
    Ok(unsafe { (*entry).pw_uid })
}

pub fn resolve_group(name: &str) -> Result<libc::gid_t, String> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let c_name = CString::new(name).map_err(|_| format!("no such group: {name:?}"))?;
    // SAFETY: getgrnam with a NUL-terminated name; the result is read at once, before any other call.
    let entry = unsafe { libc::getgrnam(c_name.as_ptr()) };
    if entry.is_null() {
        return Err(format!("no such group: {name:?}"));
    }
    // SAFETY: non-null result of getgrnam.
    Ok(unsafe { (*entry).gr_gid })
}

/// chown of a socket file (`--chown-socket`), so nginx's user can connect.
pub fn chown(path: &Path, owner: Owner) -> io::Result<()> {
    std::os::unix::fs::chown(path, owner.uid, owner.gid)
}

/// Drops to `owner` (group first, then user, as root must), after the sockets are bound and before the app
/// is loaded, so the app never runs as root. With a user and no group, the user's primary group is used, and
/// root's supplementary groups are always cleared: nothing of root's group access is kept.
pub fn drop_privileges(owner: Owner) -> io::Result<()> {
    let gid = owner.gid.or_else(|| owner.uid.and_then(primary_group));
    if owner.uid.is_none() && gid.is_none() {
        return Ok(());
    }
    // SAFETY: setgroups with an empty list; it fails with EPERM only when not root, and then there is
    // nothing to clear.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0
        && io::Error::last_os_error().raw_os_error() != Some(libc::EPERM)
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY (both): plain system calls.
    if gid.is_some_and(|gid| unsafe { libc::setgid(gid) } != 0)
        || owner.uid.is_some_and(|uid| unsafe { libc::setuid(uid) } != 0)
    {
        return Err(io::Error::last_os_error());
    }
    info!("running as uid {:?}, gid {gid:?}", owner.uid);
    Ok(())
}

/// The primary group of user `uid`, from the password database.
fn primary_group(uid: libc::uid_t) -> Option<libc::gid_t> {
    // SAFETY: getpwuid; the result is read at once, before any other call.
    let entry = unsafe { libc::getpwuid(uid) };
    // SAFETY: non-null result of getpwuid.
    (!entry.is_null()).then(|| unsafe { (*entry).pw_gid })
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
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: setrlimit reads a valid rlimit; raising the soft limit up to the hard one is always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } < 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(raised.rlim_cur);
    }
    Ok(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_by_name_and_number() {
        assert_eq!(parse_owner("root"), Ok(Owner { uid: Some(0), gid: None }));
        assert_eq!(parse_owner("0:0"), Ok(Owner { uid: Some(0), gid: Some(0) }));
        assert_eq!(parse_owner("root:root"), Ok(Owner { uid: Some(0), gid: Some(0) }));
        assert_eq!(parse_owner(":0"), Ok(Owner { uid: None, gid: Some(0) }));
        assert!(parse_owner("no-such-user-here").is_err());
        assert!(parse_owner("root:no-such-group-here").is_err());
    }
}
