//! Network backends (netdevs) as `-netdev`, HMP `netdev_add` and QMP `netdev_add`
//! describe them, checked with QEMU 7.2's words, and what the vmm opens on the host for
//! each before a `vmm-net` process gets it: taps ([`tap`]) and sockets ([`socket`]).

pub mod legacy;
pub mod socket;
pub mod tap;

use std::os::fd::OwnedFd;

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetdevError {
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    #[error("Parameter 'id' expects an identifier")]
    BadId,
    #[error("Parameter 'type' does not accept value '{0}'")]
    UnknownType(String),
    #[error("network backend '{0}' is not compiled into this binary")]
    NotCompiled(String),
    /// An option the type does not have (QMP's words).
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    /// An option the type does not have (the command line's words).
    #[error("Invalid parameter '{0}'")]
    InvalidParameter(String),
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    BadType {
        name: String,
        expected: &'static str,
    },
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    BadBool(String),
    #[error("Parameter '{name}' expects {what}")]
    BadValue { name: String, what: &'static str },
    #[error("Duplicate ID '{0}'")]
    Duplicate(String),
    #[error("{0}")]
    Other(String),
}

/// A netdev's options as QEMU's option parser keeps them: the type, the id, and the rest
/// as `key=value` (lists repeat their key; objects are flattened as `addr.host=...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetdevOptions {
    pub kind: String,
    pub id: String,
    pub options: Vec<(String, String)>,
}

/// How an option's value is checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Bool,
    Int,
    /// A list of `{"str": ...}` in QMP; repeated on the command line.
    StrList,
    /// A SocketAddress object in QMP; dotted keys on the command line.
    Address,
}

use Kind::*;

/// The options of each type we serve (QEMU 7.2's qapi/net.json).
const TYPES: &[(&str, &[(&str, Kind)])] = &[
    (
        "tap",
        &[
            ("ifname", Str),
            ("fd", Str),
            ("fds", Str),
            ("script", Str),
            ("downscript", Str),
            ("br", Str),
            ("helper", Str),
            ("sndbuf", Int),
            ("vnet_hdr", Bool),
            ("vhost", Bool),
            ("vhostfd", Str),
            ("vhostfds", Str),
            ("vhostforce", Bool),
            ("queues", Int),
            ("poll-us", Int),
        ],
    ),
    (
        "user",
        &[
            ("hostname", Str),
            ("restrict", Bool),
            ("ipv4", Bool),
            ("ipv6", Bool),
            ("ip", Str),
            ("net", Str),
            ("host", Str),
            ("tftp", Str),
            ("bootfile", Str),
            ("dhcpstart", Str),
            ("dns", Str),
            ("dnssearch", StrList),
            ("domainname", Str),
            ("ipv6-prefix", Str),
            ("ipv6-prefixlen", Int),
            ("ipv6-host", Str),
            ("ipv6-dns", Str),
            ("smb", Str),
            ("smbserver", Str),
            ("hostfwd", StrList),
            ("guestfwd", StrList),
            ("tftp-server-name", Str),
        ],
    ),
    (
        "socket",
        &[
            ("fd", Str),
            ("listen", Str),
            ("connect", Str),
            ("mcast", Str),
            ("localaddr", Str),
            ("udp", Str),
        ],
    ),
    ("stream", &[("server", Bool), ("addr", Address)]),
    ("dgram", &[("local", Address), ("remote", Address)]),
    (
        "vhost-user",
        &[("chardev", Str), ("vhostforce", Bool), ("queues", Int)],
    ),
];

/// Types QEMU 7.2 knows but this binary does not serve.
const NOT_COMPILED: &[&str] = &[
    "none",
    "nic",
    "l2tpv3",
    "vde",
    "bridge",
    "hubport",
    "netmap",
    "vhost-vdpa",
];

/// QEMU's identifiers: a letter, then letters, digits, `-`, `.` and `_`.
pub fn valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn options_of(kind: &str) -> Result<&'static [(&'static str, Kind)], NetdevError> {
    if let Some((_, opts)) = TYPES.iter().find(|(t, _)| *t == kind) {
        return Ok(opts);
    }
    if NOT_COMPILED.contains(&kind) {
        return Err(NetdevError::NotCompiled(kind.to_string()));
    }
    Err(NetdevError::UnknownType(kind.to_string()))
}

/// The kind of `key` among `opts`: the key itself, or an address's dotted member.
fn kind_of(opts: &[(&str, Kind)], key: &str) -> Option<Kind> {
    let base = key.split_once('.').map_or(key, |(b, _)| b);
    opts.iter()
        .find(|(name, _)| *name == base)
        .map(|(_, k)| *k)
        .filter(|k| (*k == Address) == (base != key))
}

/// QMP netdev_add's arguments (QEMU's order of checks: the arguments' shape, the id, and
/// the backend's own checks later).
pub fn from_qmp(args: &Map<String, Value>) -> Result<NetdevOptions, NetdevError> {
    let id = match args.get("id") {
        None => return Err(NetdevError::Missing("id".into())),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(NetdevError::BadType {
                name: "id".into(),
                expected: "string",
            })
        }
    };
    let kind = match args.get("type") {
        None => return Err(NetdevError::Missing("type".into())),
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(NetdevError::BadType {
                name: "type".into(),
                expected: "string",
            })
        }
    };
    let opts = options_of(&kind)?;
    let mut options = Vec::new();
    for (key, value) in args {
        if key == "id" || key == "type" {
            continue;
        }
        let Some((_, k)) = opts.iter().find(|(name, _)| name == key) else {
            return Err(NetdevError::Unexpected(key.clone()));
        };
        flatten(key, *k, value, &mut options)?;
    }
    if !valid_id(&id) {
        return Err(NetdevError::BadId);
    }
    Ok(NetdevOptions { kind, id, options })
}

/// One QMP member as `key=value` pairs.
fn flatten(
    key: &str,
    kind: Kind,
    value: &Value,
    out: &mut Vec<(String, String)>,
) -> Result<(), NetdevError> {
    let bad = |expected| NetdevError::BadType {
        name: key.to_string(),
        expected,
    };
    match (kind, value) {
        (Str, Value::String(s)) => out.push((key.into(), s.clone())),
        (Str, _) => return Err(bad("string")),
        (Bool, Value::Bool(b)) => out.push((key.into(), on_off(*b).into())),
        (Bool, _) => return Err(bad("boolean")),
        (Int, Value::Number(n)) if n.is_u64() || n.is_i64() => {
            out.push((key.into(), n.to_string()))
        }
        (Int, _) => return Err(bad("integer")),
        (StrList, Value::Array(items)) => {
            for item in items {
                match item.get("str") {
                    Some(Value::String(s)) => out.push((key.into(), s.clone())),
                    _ => return Err(NetdevError::Missing(format!("{key}.str"))),
                }
            }
        }
        (StrList, _) => return Err(bad("array")),
        (Address, Value::Object(members)) => {
            for (member, v) in members {
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => on_off(*b).to_string(),
                    _ => {
                        return Err(NetdevError::BadType {
                            name: format!("{key}.{member}"),
                            expected: "string",
                        })
                    }
                };
                out.push((format!("{key}.{member}"), text));
            }
        }
        (Address, _) => return Err(bad("object")),
    }
    Ok(())
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// `-netdev TYPE,id=ID,key=value,...` and HMP `netdev_add` (QemuOpts syntax: a leading
/// `type=` may be left out, `,,` escapes a comma).
pub fn parse(text: &str) -> Result<NetdevOptions, NetdevError> {
    let mut parts = crate::chardev::split_options(text).into_iter();
    let first = parts.next().unwrap_or_default();
    let kind = first.strip_prefix("type=").unwrap_or(&first).to_string();
    let mut id = None;
    let mut options = Vec::new();
    for part in parts.filter(|p| !p.is_empty()) {
        let (key, value) = crate::chardev::split_key_value(&part);
        if key == "id" {
            id = value.map(str::to_string);
            continue;
        }
        options.push((key.to_string(), value.unwrap_or("on").to_string()));
    }
    let id = id.ok_or_else(|| NetdevError::Missing("id".into()))?;
    if !valid_id(&id) {
        return Err(NetdevError::BadId);
    }
    let opts = options_of(&kind)?;
    for (key, value) in &options {
        match kind_of(opts, key) {
            None => return Err(NetdevError::InvalidParameter(key.clone())),
            Some(Bool) if value != "on" && value != "off" => {
                return Err(NetdevError::BadBool(key.clone()))
            }
            Some(Int) if value.parse::<u64>().is_err() => {
                return Err(NetdevError::BadValue {
                    name: key.clone(),
                    what: "a number",
                })
            }
            _ => {}
        }
    }
    Ok(NetdevOptions { kind, id, options })
}

impl NetdevOptions {
    /// The last value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn flag(&self, key: &str) -> Option<bool> {
        self.get(key).map(|v| v == "on")
    }

    pub fn number(&self, key: &str) -> Result<Option<u64>, NetdevError> {
        self.get(key)
            .map(|v| {
                v.parse().map_err(|_| NetdevError::BadValue {
                    name: key.to_string(),
                    what: "a number",
                })
            })
            .transpose()
    }
}

/// Where a netdev's fds come from: descriptors passed with getfd (QMP), or inherited fd
/// numbers on the command line.
pub trait FdSource {
    /// The descriptor named `name` (a getfd name, or an fd number).
    fn take(&mut self, name: &str) -> Result<OwnedFd, NetdevError>;
}

/// Descriptors on the command line and in HMP: fd numbers this process inherited.
pub struct InheritedFds;

impl FdSource for InheritedFds {
    fn take(&mut self, name: &str) -> Result<OwnedFd, NetdevError> {
        let Ok(fd) = name.parse::<i32>() else {
            return Err(NetdevError::Other(format!(
                "Invalid file descriptor number '{name}'"
            )));
        };
        // SAFETY: F_GETFD only asks whether the fd is open.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(NetdevError::Other(format!(
                "Can't use file descriptor {fd}: Bad file descriptor"
            )));
        }
        // SAFETY: management handed this fd to the vmm for this netdev, as the command line
        // says; nothing else in the process owns it, and it is taken once.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }
}

/// A netdev ready for its process: what it serves, with the host fds it needs.
pub struct PreparedNetdev {
    pub backend: ipc::net::Backend,
    pub fds: Vec<OwnedFd>,
    pub queue_pairs: u16,
    /// What `info network` says of it, if the vmm knows (the process says it for `user`).
    pub info: String,
    /// The tap's down script and interface, run when the netdev goes.
    pub downscript: Option<(String, String)>,
}

/// Open what netdev `opts` needs on the host. `vhost-user` is not prepared here: it has no
/// process of ours.
pub fn prepare(
    opts: &NetdevOptions,
    fds: &mut dyn FdSource,
) -> Result<PreparedNetdev, NetdevError> {
    match opts.kind.as_str() {
        "tap" => tap::prepare(opts, fds),
        "user" => Ok(PreparedNetdev {
            backend: ipc::net::Backend::User {
                options: opts.options.clone(),
            },
            fds: Vec::new(),
            queue_pairs: 1,
            info: String::new(),
            downscript: None,
        }),
        "socket" => socket::prepare_socket(opts, fds),
        "stream" => socket::prepare_stream(opts, fds),
        "dgram" => socket::prepare_dgram(opts, fds),
        other => Err(NetdevError::NotCompiled(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_fd_that_is_not_open_is_refused() {
        let e = InheritedFds.take("1000000").err().unwrap().to_string();
        assert_eq!(e, "Can't use file descriptor 1000000: Bad file descriptor");
        let e = InheritedFds.take("x").err().unwrap().to_string();
        assert_eq!(e, "Invalid file descriptor number 'x'");
    }
    use serde_json::json;

    fn qmp(v: Value) -> Result<NetdevOptions, String> {
        from_qmp(v.as_object().unwrap()).map_err(|e| e.to_string())
    }

    #[test]
    fn qmp_arguments_are_checked_in_qemus_order() {
        assert_eq!(qmp(json!({})).unwrap_err(), "Parameter 'id' is missing");
        assert_eq!(
            qmp(json!({"id": "n"})).unwrap_err(),
            "Parameter 'type' is missing"
        );
        assert_eq!(
            qmp(json!({"type": "foo", "id": "1x"})).unwrap_err(),
            "Parameter 'type' does not accept value 'foo'"
        );
        assert_eq!(
            qmp(json!({"type": "user", "id": "1x", "bogus": 1})).unwrap_err(),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            qmp(json!({"type": "user", "id": "a b"})).unwrap_err(),
            "Parameter 'id' expects an identifier"
        );
        assert_eq!(
            qmp(json!({"type": "user", "id": "u", "restrict": "on"})).unwrap_err(),
            "Invalid parameter type for 'restrict', expected: boolean"
        );
        assert_eq!(
            qmp(json!({"type": "user", "id": "u", "hostfwd": "tcp::1-:2"})).unwrap_err(),
            "Invalid parameter type for 'hostfwd', expected: array"
        );
        assert_eq!(
            qmp(json!({"type": "nic", "id": "n"})).unwrap_err(),
            "network backend 'nic' is not compiled into this binary"
        );
        let ok = qmp(json!({"type": "user", "id": "a.b-c_d", "restrict": true,
            "hostfwd": [{"str": "tcp::1-:2"}, {"str": "udp::3-:4"}]}))
        .unwrap();
        assert_eq!(ok.flag("restrict"), Some(true));
        assert_eq!(ok.options.iter().filter(|(k, _)| k == "hostfwd").count(), 2);
        let s = qmp(json!({"type": "stream", "id": "s", "server": false,
            "addr": {"type": "inet", "host": "127.0.0.1", "port": "5"}}))
        .unwrap();
        assert_eq!(s.get("addr.port"), Some("5"));
    }

    #[test]
    fn command_line_options() {
        let t = parse("tap,id=t0,ifname=tap0,script=no,vnet_hdr=on,queues=2").unwrap();
        assert_eq!((t.kind.as_str(), t.id.as_str()), ("tap", "t0"));
        assert_eq!(t.number("queues").unwrap(), Some(2));
        assert_eq!(
            parse("user,id=u,bogus=1").unwrap_err().to_string(),
            "Invalid parameter 'bogus'"
        );
        assert_eq!(
            parse("user,id=u,restrict=yes").unwrap_err().to_string(),
            "Parameter 'restrict' expects 'on' or 'off'"
        );
        assert_eq!(
            parse("user").unwrap_err().to_string(),
            "Parameter 'id' is missing"
        );
        assert_eq!(
            parse("user,id=1x").unwrap_err().to_string(),
            "Parameter 'id' expects an identifier"
        );
        let s = parse("stream,id=s,server=on,addr.type=unix,addr.path=/tmp/x").unwrap();
        assert_eq!(s.get("addr.path"), Some("/tmp/x"));
        assert_eq!(
            parse("stream,id=s,addr=x").unwrap_err().to_string(),
            "Invalid parameter 'addr'"
        );
    }
}
