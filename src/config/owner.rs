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

/// `USER[:GROUP]`, names or numbers.
pub fn parse_owner(text: &str) -> Result<Owner, String> {
    let (user, group) = text.split_once(':').map_or((text, None), |(u, g)| (u, Some(g)));
    let uid = (!user.is_empty()).then(|| resolve_user(user)).transpose()?;
    let gid = group.filter(|g| !g.is_empty()).map(resolve_group).transpose()?;
    Ok(Owner { uid, gid })
}

/// A user by name or number (`--uid`, the user of `--chown-socket`).
pub fn resolve_user(name: &str) -> Result<libc::uid_t, String> {
    if let Ok(uid) = name.parse() {
        return Ok(uid);
    }
    match User::from_name(name) {
        Ok(Some(user)) => Ok(user.uid.as_raw()),
        Ok(None) => Err(format!("no such user: {name:?}")),
        Err(err) => Err(format!("cannot look up user {name:?}: {err}")),
    }
}

/// A group by name or number (`--gid`, the group of `--chown-socket`).
pub fn resolve_group(name: &str) -> Result<libc::gid_t, String> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    match Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!("no such group: {name:?}")),
        Err(err) => Err(format!("cannot look up group {name:?}: {err}")),
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
        assert!(parse_owner("no-such-user-here").is_err());
        assert!(parse_owner("root:no-such-group-here").is_err());
    }
}
