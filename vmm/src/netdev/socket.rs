//! `-netdev socket`, `stream` and `dgram`: the vmm makes the socket (listening, connected,
//! or bound and connected for datagrams) and the `vmm-net` process carries the frames on
//! it: with a 4-byte length before each on a stream, one per datagram otherwise.

use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::time::Duration;

use ipc::net::Backend;

use super::{FdSource, NetdevError, NetdevOptions, PreparedNetdev};

/// How long a connecting stream waits for its peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

fn other(message: String) -> NetdevError {
    NetdevError::Other(message)
}

fn strerror(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// `HOST:PORT` (an empty host is every address) as socket addresses.
fn inet(text: &str) -> Result<Vec<SocketAddr>, NetdevError> {
    let Some((host, port)) = text.rsplit_once(':') else {
        return Err(other(format!(
            "host address '{text}' doesn't contain ':' separating host from port"
        )));
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    let port: u16 = port
        .parse()
        .map_err(|_| other(format!("port number '{port}' is invalid")))?;
    (host, port)
        .to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|_| other(format!("can't resolve host address '{host}'")))
}

fn listen_inet(text: &str) -> Result<(OwnedFd, SocketAddr), NetdevError> {
    let addrs = inet(text)?;
    let listener = TcpListener::bind(&addrs[..]).map_err(|e| {
        other(format!(
            "can't bind ip={} to socket: {}",
            addrs.first().map_or(String::new(), |a| a.ip().to_string()),
            strerror(&e)
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| other(format!("socket: {}", strerror(&e))))?;
    Ok((OwnedFd::from(listener), local))
}

/// A connection to `text`; a peer that is not there leaves a socket that is at end of
/// file (QEMU accepts such a netdev and says `connection error`).
fn connect_inet(text: &str) -> Result<(OwnedFd, bool), NetdevError> {
    let addrs = inet(text)?;
    for addr in &addrs {
        if let Ok(stream) = TcpStream::connect_timeout(addr, CONNECT_TIMEOUT) {
            let _ = stream.set_nodelay(true);
            return Ok((OwnedFd::from(stream), true));
        }
    }
    Ok((dead_stream()?, false))
}

/// A stream whose peer is gone.
fn dead_stream() -> Result<OwnedFd, NetdevError> {
    let (ours, _gone) =
        UnixStream::pair().map_err(|e| other(format!("socket: {}", strerror(&e))))?;
    Ok(OwnedFd::from(ours))
}

fn prepared(backend: Backend, fd: OwnedFd, info: String) -> PreparedNetdev {
    PreparedNetdev {
        backend,
        fds: vec![fd],
        queue_pairs: 1,
        info,
        downscript: None,
    }
}

/// The type of socket `fd` is (SOCK_STREAM, SOCK_DGRAM).
fn socket_type(fd: &OwnedFd) -> Result<libc::c_int, NetdevError> {
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_TYPE writes an int of `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            &mut ty as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    if r < 0 {
        return Err(other(format!("fd={} is not a socket", fd.as_raw_fd())));
    }
    Ok(ty)
}

/// `-netdev socket`: exactly one of listen=, connect=, udp= (with localaddr=), or an fd.
pub fn prepare_socket(
    opts: &NetdevOptions,
    fds: &mut dyn FdSource,
) -> Result<PreparedNetdev, NetdevError> {
    if let Some(name) = opts.get("fd") {
        let fd = fds.take(name)?;
        return match socket_type(&fd)? {
            libc::SOCK_DGRAM => Ok(prepared(Backend::Dgram, fd, String::new())),
            _ => Ok(prepared(
                Backend::Stream { listening: false },
                fd,
                String::new(),
            )),
        };
    }
    let modes = ["listen", "connect", "mcast", "udp"]
        .iter()
        .filter(|k| opts.has(k))
        .count();
    if modes != 1 {
        return Err(other(
            "exactly one of listen=, connect=, mcast= or udp= is required".into(),
        ));
    }
    if let Some(listen) = opts.get("listen") {
        let (fd, _) = listen_inet(listen)?;
        return Ok(prepared(
            Backend::Stream { listening: true },
            fd,
            String::new(),
        ));
    }
    if let Some(connect) = opts.get("connect") {
        let (fd, connected) = connect_inet(connect)?;
        let info = if connected {
            format!("socket: connect to {connect}")
        } else {
            String::new()
        };
        return Ok(prepared(Backend::Stream { listening: false }, fd, info));
    }
    if opts.has("mcast") {
        return Err(other(
            "mcast= is not supported: use udp= with localaddr=, or dgram".into(),
        ));
    }
    let udp = opts.get("udp").unwrap_or_default();
    let Some(local) = opts.get("localaddr") else {
        return Err(other("localaddr= is mandatory with udp=".into()));
    };
    let fd = udp_pair(local, udp)?;
    Ok(prepared(Backend::Dgram, fd, format!("socket: udp={udp}")))
}

/// A UDP socket bound to `local` and connected to `remote`.
fn udp_pair(local: &str, remote: &str) -> Result<OwnedFd, NetdevError> {
    let local_addrs = inet(local)?;
    let remote_addrs = inet(remote)?;
    let socket = UdpSocket::bind(&local_addrs[..]).map_err(|e| {
        other(format!(
            "can't bind ip={} to socket: {}",
            local_addrs
                .first()
                .map_or(String::new(), |a| a.ip().to_string()),
            strerror(&e)
        ))
    })?;
    socket
        .connect(&remote_addrs[..])
        .map_err(|e| other(format!("can't connect socket: {}", strerror(&e))))?;
    Ok(OwnedFd::from(socket))
}

/// A SocketAddress of QEMU's (`addr.type=inet|unix|fd` with its members).
enum Address {
    Inet(String),
    Unix(String),
    Fd(String),
}

fn address(opts: &NetdevOptions, key: &str) -> Result<Address, NetdevError> {
    let member = |m: &str| opts.get(&format!("{key}.{m}"));
    let missing = |m: &str| NetdevError::Missing(format!("{key}.{m}"));
    match member("type") {
        None => Err(NetdevError::Missing(format!("{key}.type"))),
        Some("inet") => {
            let host = member("host").ok_or_else(|| missing("host"))?;
            let port = member("port").ok_or_else(|| missing("port"))?;
            Ok(Address::Inet(format!("{host}:{port}")))
        }
        Some("unix") => Ok(Address::Unix(
            member("path").ok_or_else(|| missing("path"))?.to_string(),
        )),
        Some("fd") => Ok(Address::Fd(
            member("str").ok_or_else(|| missing("str"))?.to_string(),
        )),
        Some(other) => Err(NetdevError::Other(format!(
            "Parameter '{key}.type' does not accept value '{other}'"
        ))),
    }
}

/// `-netdev stream`: a listening (`server=on`) or connecting socket.
pub fn prepare_stream(
    opts: &NetdevOptions,
    fds: &mut dyn FdSource,
) -> Result<PreparedNetdev, NetdevError> {
    if !opts.options.iter().any(|(k, _)| k.starts_with("addr.")) {
        return Err(NetdevError::Missing("addr".into()));
    }
    let server = opts.flag("server").unwrap_or(false);
    let addr = address(opts, "addr")?;
    let (fd, info) = match (addr, server) {
        (Address::Inet(text), true) => (listen_inet(&text)?.0, String::new()),
        (Address::Inet(text), false) => match connect_inet(&text)? {
            (fd, true) => (fd, format!("tcp:{text}")),
            (fd, false) => (fd, "connection error".to_string()),
        },
        (Address::Unix(path), true) => {
            let listener = UnixListener::bind(&path)
                .map_err(|e| other(format!("can't bind unix socket {path}: {}", strerror(&e))))?;
            (OwnedFd::from(listener), String::new())
        }
        (Address::Unix(path), false) => match UnixStream::connect(&path) {
            Ok(stream) => (OwnedFd::from(stream), format!("unix:{path}")),
            Err(_) => (dead_stream()?, "connection error".to_string()),
        },
        (Address::Fd(name), _) => (fds.take(&name)?, String::new()),
    };
    Ok(prepared(Backend::Stream { listening: server }, fd, info))
}

/// `-netdev dgram`: a datagram socket bound to `local` and connected to `remote`.
pub fn prepare_dgram(
    opts: &NetdevOptions,
    fds: &mut dyn FdSource,
) -> Result<PreparedNetdev, NetdevError> {
    if !opts.options.iter().any(|(k, _)| k.starts_with("local.")) {
        return Err(other("dgram requires local= parameter".into()));
    }
    let local = address(opts, "local")?;
    let has_remote = opts.options.iter().any(|(k, _)| k.starts_with("remote."));
    let remote = if has_remote {
        Some(address(opts, "remote")?)
    } else {
        None
    };
    let (fd, info) = match (local, remote) {
        (Address::Fd(name), None) => (fds.take(&name)?, String::new()),
        (Address::Fd(_), Some(_)) => return Err(other("don't set remote with local.fd".into())),
        (Address::Inet(_) | Address::Unix(_), None) => {
            return Err(other(
                "type=inet or type=unix requires remote parameter".into(),
            ))
        }
        (Address::Inet(l), Some(Address::Inet(r))) => (udp_pair(&l, &r)?, format!("udp={l}/{r}")),
        (Address::Unix(l), Some(Address::Unix(r))) => {
            let _ = std::fs::remove_file(&l);
            let socket = UnixDatagram::bind(&l)
                .map_err(|e| other(format!("can't bind unix socket {l}: {}", strerror(&e))))?;
            socket
                .connect(&r)
                .map_err(|e| other(format!("can't connect socket: {}", strerror(&e))))?;
            (OwnedFd::from(socket), format!("udp={l}:{r}"))
        }
        _ => return Err(other("remote and local types must be the same".into())),
    };
    Ok(prepared(Backend::Dgram, fd, info))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoFds;
    impl FdSource for NoFds {
        fn take(&mut self, name: &str) -> Result<OwnedFd, NetdevError> {
            Err(other(format!(
                "File descriptor named '{name}' has not been found"
            )))
        }
    }

    fn run(text: &str) -> Result<PreparedNetdev, String> {
        let opts = super::super::parse(text).map_err(|e| e.to_string())?;
        match opts.kind.as_str() {
            "socket" => prepare_socket(&opts, &mut NoFds),
            "stream" => prepare_stream(&opts, &mut NoFds),
            _ => prepare_dgram(&opts, &mut NoFds),
        }
        .map_err(|e| e.to_string())
    }

    #[test]
    fn qemus_errors() {
        assert_eq!(
            run("socket,id=s").err().unwrap(),
            "exactly one of listen=, connect=, mcast= or udp= is required"
        );
        assert_eq!(
            run("socket,id=s,listen=bad").err().unwrap(),
            "host address 'bad' doesn't contain ':' separating host from port"
        );
        assert_eq!(
            run("socket,id=s,udp=127.0.0.1:1").err().unwrap(),
            "localaddr= is mandatory with udp="
        );
        assert_eq!(
            run("dgram,id=d").err().unwrap(),
            "dgram requires local= parameter"
        );
        assert_eq!(
            run("dgram,id=d,local.type=inet,local.host=127.0.0.1,local.port=0")
                .err()
                .unwrap(),
            "type=inet or type=unix requires remote parameter"
        );
        assert_eq!(
            run("stream,id=s,server=on").err().unwrap(),
            "Parameter 'addr' is missing"
        );
    }

    #[test]
    fn listening_connecting_and_datagrams() {
        let l = run("socket,id=s,listen=127.0.0.1:0").unwrap();
        assert_eq!(l.backend, Backend::Stream { listening: true });
        let c = run("stream,id=s,addr.type=inet,addr.host=127.0.0.1,addr.port=1").unwrap();
        assert_eq!(c.info, "connection error");
        let d = run("socket,id=s,udp=127.0.0.1:9,localaddr=127.0.0.1:0").unwrap();
        assert_eq!(d.backend, Backend::Dgram);
        assert_eq!(d.info, "socket: udp=127.0.0.1:9");
    }
}
