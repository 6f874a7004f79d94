//! Users and groups, as the config names them (`--uid`, `--gid`, `--chown-socket`): resolved once, at
//! start-up, from names or numbers through the system's user database.

use std::ffi::CString;

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

/// The primary group of user `uid`, from the password database.
pub(crate) fn primary_group(uid: libc::uid_t) -> Option<libc::gid_t> {
    // SAFETY: getpwuid; the result is read at once, before any other call.
    let entry = unsafe { libc::getpwuid(uid) };
    // SAFETY: non-null result of getpwuid.
    (!entry.is_null()).then(|| unsafe { (*entry).pw_gid })
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
