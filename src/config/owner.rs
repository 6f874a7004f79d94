//! Users and groups, as the config names them (`--uid`, `--gid`, `--chown-socket`): resolved once, at
//! start-up, from names or numbers through the system's user database (nix's reentrant `getpwnam_r` and
//! friends).

use nix::unistd::{Group, Uid, User};

/// A user and group, resolved from names or numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Owner {
    pub uid: Option<libc::uid_t>,
    pub gid: Option<libc::gid_t>,
}

/// A user or group that cannot be resolved, by kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LookupError {
    #[error("no such user: {0:?}")]
    NoSuchUser(String),
    #[error("no such group: {0:?}")]
    NoSuchGroup(String),
    /// The user database itself failed (NSS, a file that cannot be read).
    #[error("cannot look up {what} {name:?}: {errno}")]
    Database { what: &'static str, name: String, errno: nix::errno::Errno },
}

/// `USER[:GROUP]`, names or numbers.
pub fn parse_owner(text: &str) -> Result<Owner, LookupError> {
    let (user, group) = text.split_once(':').map_or((text, None), |(u, g)| (u, Some(g)));
    let uid = (!user.is_empty()).then(|| resolve_user(user)).transpose()?;
    let gid = group.filter(|g| !g.is_empty()).map(resolve_group).transpose()?;
    Ok(Owner { uid, gid })
}

/// A user by name or number (`--uid`, the user of `--chown-socket`).
pub fn resolve_user(name: &str) -> Result<libc::uid_t, LookupError> {
    if let Ok(uid) = name.parse() {
        return Ok(uid);
    }
    match User::from_name(name) {
        Ok(Some(user)) => Ok(user.uid.as_raw()),
        Ok(None) => Err(LookupError::NoSuchUser(name.to_owned())),
        Err(errno) => Err(LookupError::Database { what: "user", name: name.to_owned(), errno }),
    }
}

/// A group by name or number (`--gid`, the group of `--chown-socket`).
pub fn resolve_group(name: &str) -> Result<libc::gid_t, LookupError> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    match Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(LookupError::NoSuchGroup(name.to_owned())),
        Err(errno) => Err(LookupError::Database { what: "group", name: name.to_owned(), errno }),
    }
}

/// The primary group of user `uid`, from the password database.
pub(crate) fn primary_group(uid: libc::uid_t) -> Option<libc::gid_t> {
    let user = User::from_uid(Uid::from_raw(uid)).ok()??;
    Some(user.gid.as_raw())
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
        assert_eq!(
            parse_owner("no-such-user-here"),
            Err(LookupError::NoSuchUser("no-such-user-here".into()))
        );
        assert_eq!(
            parse_owner("root:no-such-group-here"),
            Err(LookupError::NoSuchGroup("no-such-group-here".into()))
        );
    }
}
