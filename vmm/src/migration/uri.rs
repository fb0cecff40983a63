//! Where a migration goes or comes from, as QEMU 7.2 spells it: `tcp:HOST:PORT`,
//! `unix:PATH`, `exec:CMD` (a shell command that takes the stream on stdin, or gives it
//! on stdout for `-incoming`), and `fd:NAME` (a descriptor passed with getfd).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    Tcp { host: String, port: u16 },
    Unix(String),
    Exec(String),
    Fd(String),
}

#[derive(Debug, thiserror::Error)]
pub enum UriError {
    /// QEMU's words for a scheme it does not know.
    #[error("Parameter 'uri' expects a valid migration protocol")]
    UnknownProtocol(String),
    #[error("Invalid parameter '{0}'")]
    Invalid(String),
    #[error("Failed to connect to '{uri}': {source}")]
    Connect {
        uri: String,
        #[source]
        source: io::Error,
    },
    #[error("Failed to listen on '{uri}': {source}")]
    Listen {
        uri: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot run '{cmd}': {source}")]
    Exec {
        cmd: String,
        #[source]
        source: io::Error,
    },
}

impl MigrationUri {
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        if let Some(rest) = uri.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| UriError::Invalid(uri.to_string()))?;
            let port = port
                .parse()
                .map_err(|_| UriError::Invalid(uri.to_string()))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Ok(MigrationUri::Tcp {
                host: if host.is_empty() { "0.0.0.0" } else { host }.to_string(),
                port,
            })
        } else if let Some(path) = uri.strip_prefix("unix:") {
            Ok(MigrationUri::Unix(path.to_string()))
        } else if let Some(cmd) = uri.strip_prefix("exec:") {
            Ok(MigrationUri::Exec(cmd.to_string()))
        } else if let Some(name) = uri.strip_prefix("fd:") {
            Ok(MigrationUri::Fd(name.to_string()))
        } else {
            Err(UriError::UnknownProtocol(uri.to_string()))
        }
    }
}

/// An open migration channel: the stream one way, and where there is one, the return path
/// the other way (exec has none: a save completes once the command took every byte).
pub struct Channel {
    pub writer: Box<dyn Write + Send>,
    pub reader: Option<Box<dyn Read + Send>>,
    /// An exec: command, waited for at the end.
    pub child: Option<Child>,
    /// The socket, to shut it down when a migration is cancelled.
    pub shutdown: Option<Box<dyn Fn() + Send + Sync>>,
    /// The socket itself when it is a unix one (a local migration passes fds on it).
    pub unix: Option<UnixStream>,
}

impl Channel {
    fn socket<S>(stream: S, shutdown: impl Fn(&S) + Send + Sync + 'static) -> io::Result<Self>
    where
        S: Read + Write + Send + Sync + 'static,
        S: TryCloneStream,
    {
        let reader = stream.try_clone_stream()?;
        let closer = stream.try_clone_stream()?;
        Ok(Channel {
            writer: Box::new(stream),
            reader: Some(Box::new(reader)),
            child: None,
            shutdown: Some(Box::new(move || shutdown(&closer))),
            unix: None,
        })
    }

    fn unix_socket(stream: UnixStream) -> io::Result<Self> {
        let unix = stream.try_clone()?;
        let mut channel = Channel::socket(stream, |s: &UnixStream| {
            let _ = s.shutdown(std::net::Shutdown::Both);
        })?;
        channel.unix = Some(unix);
        Ok(channel)
    }
}

/// Sockets that can be cloned into a reader and a writer half.
pub trait TryCloneStream: Sized {
    fn try_clone_stream(&self) -> io::Result<Self>;
}

impl TryCloneStream for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

impl TryCloneStream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// How long one TCP connection attempt may wait before `cancelled` is asked again.
const CONNECT_ATTEMPT: Duration = Duration::from_millis(500);
/// When the attempts give up: about as long as the kernel's own SYN retries.
const CONNECT_DEADLINE: Duration = Duration::from_secs(127);

/// Connect to `host:port`, in short attempts so that `cancelled` (migrate_cancel) ends a
/// connection that hangs (a destination whose listen queue is full drops our SYNs).
fn tcp_connect(host: &str, port: u16, cancelled: &dyn Fn() -> bool) -> io::Result<TcpStream> {
    let addrs: Vec<std::net::SocketAddr> = (host, port).to_socket_addrs()?.collect();
    let deadline = Instant::now() + CONNECT_DEADLINE;
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    loop {
        for addr in &addrs {
            if cancelled() {
                return Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"));
            }
            match TcpStream::connect_timeout(addr, CONNECT_ATTEMPT) {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => last = e,
                Err(e) => return Err(e),
            }
        }
        if Instant::now() >= deadline {
            return Err(last);
        }
    }
}

/// The source's side: connect (or start the command, or take the descriptor);
/// `cancelled` is asked while a TCP connection waits.
pub fn connect(
    uri: &MigrationUri,
    fd: Option<OwnedFd>,
    cancelled: &dyn Fn() -> bool,
) -> Result<Channel, UriError> {
    let text = uri_text(uri);
    let connect_err = |source| UriError::Connect {
        uri: text.clone(),
        source,
    };
    match uri {
        MigrationUri::Tcp { host, port } => {
            let s = tcp_connect(host, *port, cancelled).map_err(connect_err)?;
            let _ = s.set_nodelay(true);
            Channel::socket(s, |s: &TcpStream| {
                let _ = s.shutdown(std::net::Shutdown::Both);
            })
            .map_err(connect_err)
        }
        MigrationUri::Unix(path) => {
            let s = UnixStream::connect(path).map_err(connect_err)?;
            Channel::unix_socket(s).map_err(connect_err)
        }
        MigrationUri::Exec(cmd) => {
            let mut child = Command::new("/bin/sh")
                .args(["-c", cmd])
                .stdin(Stdio::piped())
                .spawn()
                .map_err(|source| UriError::Exec {
                    cmd: cmd.clone(),
                    source,
                })?;
            let stdin = child.stdin.take().ok_or_else(|| UriError::Exec {
                cmd: cmd.clone(),
                source: io::Error::other("no stdin"),
            })?;
            Ok(Channel {
                writer: Box::new(stdin),
                reader: None,
                child: Some(child),
                shutdown: None,
                unix: None,
            })
        }
        MigrationUri::Fd(_) => {
            let fd = fd.ok_or_else(|| UriError::Invalid(text.clone()))?;
            Channel::unix_socket(UnixStream::from(fd)).map_err(connect_err)
        }
    }
}

/// A destination waiting for its source.
pub enum Incoming {
    Tcp(TcpListener),
    Unix(UnixListener, String),
    Exec(String),
    Fd(OwnedFd),
}

/// The destination's side, first step: listen (at once, so that a source can connect as
/// soon as the vmm is up).
pub fn listen(uri: &MigrationUri, fd: Option<OwnedFd>) -> Result<Incoming, UriError> {
    let text = uri_text(uri);
    let listen_err = |source| UriError::Listen {
        uri: text.clone(),
        source,
    };
    match uri {
        MigrationUri::Tcp { host, port } => TcpListener::bind((host.as_str(), *port))
            .map(Incoming::Tcp)
            .map_err(listen_err),
        MigrationUri::Unix(path) => {
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path)
                .map(|l| Incoming::Unix(l, path.clone()))
                .map_err(listen_err)
        }
        MigrationUri::Exec(cmd) => Ok(Incoming::Exec(cmd.clone())),
        MigrationUri::Fd(_) => fd
            .map(Incoming::Fd)
            .ok_or_else(|| UriError::Invalid(text.clone())),
    }
}

impl Incoming {
    /// Second step: the source's connection (or the command's output).
    pub fn accept(self) -> Result<Channel, UriError> {
        let err = |source| UriError::Listen {
            uri: "incoming".into(),
            source,
        };
        match self {
            Incoming::Tcp(l) => {
                let (s, _) = l.accept().map_err(err)?;
                Channel::socket(s, |s: &TcpStream| {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                })
                .map_err(err)
            }
            Incoming::Unix(l, path) => {
                let accepted = l.accept().map_err(err);
                let _ = std::fs::remove_file(&path);
                let (s, _) = accepted?;
                Channel::unix_socket(s).map_err(err)
            }
            Incoming::Exec(cmd) => {
                let mut child = Command::new("/bin/sh")
                    .args(["-c", &cmd])
                    .stdout(Stdio::piped())
                    .spawn()
                    .map_err(|source| UriError::Exec {
                        cmd: cmd.clone(),
                        source,
                    })?;
                let stdout = child.stdout.take().ok_or_else(|| UriError::Exec {
                    cmd: cmd.clone(),
                    source: io::Error::other("no stdout"),
                })?;
                Ok(Channel {
                    // Nothing goes back to a file.
                    writer: Box::new(io::sink()),
                    reader: Some(Box::new(stdout)),
                    child: Some(child),
                    shutdown: None,
                    unix: None,
                })
            }
            Incoming::Fd(fd) => Channel::unix_socket(UnixStream::from(fd)).map_err(err),
        }
    }
}

fn uri_text(uri: &MigrationUri) -> String {
    match uri {
        MigrationUri::Tcp { host, port } => format!("tcp:{host}:{port}"),
        MigrationUri::Unix(p) => format!("unix:{p}"),
        MigrationUri::Exec(c) => format!("exec:{c}"),
        MigrationUri::Fd(n) => format!("fd:{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_as_qemu_spells_them() {
        assert_eq!(
            MigrationUri::parse("tcp:127.0.0.1:4444").unwrap(),
            MigrationUri::Tcp {
                host: "127.0.0.1".into(),
                port: 4444
            }
        );
        assert_eq!(
            MigrationUri::parse("tcp:[::1]:4444").unwrap(),
            MigrationUri::Tcp {
                host: "::1".into(),
                port: 4444
            }
        );
        assert_eq!(
            MigrationUri::parse("unix:/tmp/m.sock").unwrap(),
            MigrationUri::Unix("/tmp/m.sock".into())
        );
        assert_eq!(
            MigrationUri::parse("exec:cat > /tmp/x").unwrap(),
            MigrationUri::Exec("cat > /tmp/x".into())
        );
        assert_eq!(
            MigrationUri::parse("fd:mig").unwrap(),
            MigrationUri::Fd("mig".into())
        );
        assert_eq!(
            MigrationUri::parse("bogus:x").unwrap_err().to_string(),
            "Parameter 'uri' expects a valid migration protocol"
        );
        assert!(MigrationUri::parse("tcp:host").is_err());
        assert!(MigrationUri::parse("tcp:host:99999").is_err());
    }
}
