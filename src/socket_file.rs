//! Unix socket files, for every socket the server binds (serving, `--stats`): making way for a new one,
//! where a stale file is replaced and a live one refused, and removing them at exit.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use tracing::warn;

/// Makes way for a Unix socket at `path`: a socket file nobody accepts on (left by a dead process) is
/// removed; a live one, or a path that is not a socket, is an error.
pub fn remove_stale_socket(path: &Path) -> io::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "the path exists and is not a socket"));
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(io::Error::new(io::ErrorKind::AddrInUse, "another server is listening on this socket"));
    }
    std::fs::remove_file(path)
}

/// Removes Unix socket files at exit (uWSGI's `--vacuum`), so nginx gets "no such file" rather than
/// "connection refused" and a restart finds a clean path.
pub fn remove_socket_files(paths: &[PathBuf]) {
    for path in paths {
        match std::fs::remove_file(path) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                warn!("cannot remove socket file {}: {err}", path.display());
            }
            _ => {}
        }
    }
}
