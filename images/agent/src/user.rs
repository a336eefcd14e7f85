//! Resolving an image's `User` against its own `/etc/passwd` and `/etc/group`,
//! as the OCI image spec describes.

/// Who a step runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
    pub name: Option<String>,
}

impl Identity {
    pub fn root() -> Self {
        Identity {
            uid: 0,
            gid: 0,
            groups: vec![],
            home: "/root".into(),
            name: Some("root".into()),
        }
    }
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 7 {
            return None;
        }
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        let members = f[3].split(',').filter(|m| !m.is_empty()).collect();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// The image's `User` names someone its own files do not know.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("user '{0}' is not in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("group '{0}' is not in the image's /etc/group")]
    UnknownGroup(String),
}

/// Resolve `spec` (`""`, `name`, `uid`, `name:group`, `uid:gid`, ...) given the
/// contents of the image's passwd and group files.
pub fn resolve(spec: &str, passwd: &str, group: &str) -> Result<Identity, UserError> {
    let spec = spec.trim();
    if spec.is_empty() {
        return Ok(Identity::root());
    }
    let (user, grp) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = passwd_entries(passwd).find(|e| e.name == user || user.parse() == Ok(e.uid));
    let (uid, mut gid, home, name) = match (&entry, user.parse::<u32>()) {
        (Some(e), _) => (e.uid, e.gid, e.home.to_string(), Some(e.name.to_string())),
        (None, Ok(uid)) => (uid, 0, "/".to_string(), None),
        (None, Err(_)) => return Err(UserError::UnknownUser(user.into())),
    };
    let mut groups = Vec::new();
    match grp {
        Some(g) => {
            gid = match group_entries(group).find(|(n, id, _)| *n == g || g.parse() == Ok(*id)) {
                Some((_, id, _)) => id,
                None => g.parse().map_err(|_| UserError::UnknownGroup(g.into()))?,
            };
        }
        None => {
            if let Some(n) = &name {
                groups = group_entries(group)
                    .filter(|(_, _, members)| members.contains(&n.as_str()))
                    .map(|(_, id, _)| id)
                    .collect();
            }
        }
    }
    if !groups.contains(&gid) {
        groups.insert(0, gid);
    }
    Ok(Identity {
        uid,
        gid,
        groups,
        home,
        name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000::/home/builder:/bin/sh\nbroken line\n";
    const GROUP: &str =
        "root:x:0:\nbuilder:x:1000:\ndocker:x:999:builder,other\nwheel:x:10:other\n";

    #[test]
    fn empty_is_root() {
        assert_eq!(resolve("", PASSWD, GROUP).unwrap(), Identity::root());
    }

    #[test]
    fn names_and_ids_resolve_with_supplementary_groups() {
        let id = resolve("builder", PASSWD, GROUP).unwrap();
        assert_eq!(
            (id.uid, id.gid, id.home.as_str()),
            (1000, 1000, "/home/builder")
        );
        assert_eq!(id.groups, vec![1000, 999]);
        assert_eq!(
            resolve("1000", PASSWD, GROUP).unwrap().name.as_deref(),
            Some("builder")
        );
    }

    #[test]
    fn explicit_groups_by_name_or_number() {
        let id = resolve("builder:docker", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid), (1000, 999));
        let id = resolve("4242:4343", PASSWD, GROUP).unwrap();
        assert_eq!((id.uid, id.gid, id.home.as_str()), (4242, 4343, "/"));
    }

    #[test]
    fn unknown_names_are_errors() {
        let e = resolve("nobody", PASSWD, GROUP).unwrap_err();
        assert_eq!(e, UserError::UnknownUser("nobody".into()));
        assert!(e.to_string().contains("nobody"));
        let e = resolve("builder:nogroup", PASSWD, GROUP).unwrap_err();
        assert!(e.to_string().contains("nogroup"), "{e}");
    }
}
