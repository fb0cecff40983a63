//! Character device backends, as QEMU's `-serial`, `-chardev` and `-qmp` name them.
//!
//! A [`Chardev`] has an output side, a cloneable [`ChardevWriter`] that a device writes its
//! bytes to, and an input side: a background thread that reads from the backend and pushes
//! the bytes into a [`ChardevInput`] (the device). The input side waits while the device is
//! full instead of dropping bytes, so a guest console that is fed long pasted lines loses
//! nothing; the wait reaches back to the source (the terminal, the socket peer) through the
//! kernel's buffers, because the thread stops reading.
//!
//! Backends: `stdio`, `file:PATH`, `unix:PATH[,server=on][,wait=off]`,
//! `tcp:HOST:PORT[,server=on][,wait=off][,nodelay=on]`, `pty`, `null`, and `none` (no
//! device at all; the caller leaves the device out).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum ChardevError {
    #[error("'{0}' is not a valid char driver name")]
    UnknownBackend(String),
    #[error("{backend}: unsupported option '{option}'")]
    UnsupportedOption { backend: String, option: String },
    #[error("{backend}: option '{option}' expects on or off, not '{value}'")]
    InvalidBool {
        backend: String,
        option: String,
        value: String,
    },
    #[error("{0}: a path is required")]
    MissingPath(&'static str),
    #[error("invalid socket address '{address}': {reason}")]
    InvalidAddress {
        address: String,
        reason: &'static str,
    },
    #[error("chardev: the 'id' option is required")]
    MissingId,
    #[error("chardev '{0}' is a reference that the caller must resolve")]
    Unresolved(String),
    #[error("cannot use stdio by multiple character devices")]
    StdioInUse,
    #[error("could not open '{path}': {source}")]
    OpenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to listen on '{address}': {source}")]
    Listen {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to connect to '{address}': {source}")]
    Connect {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to accept a connection on '{address}': {source}")]
    Accept {
        address: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to create PTY: {0}")]
    Pty(#[source] io::Error),
    #[error("failed to set up the terminal on stdin: {0}")]
    Terminal(#[source] io::Error),
    #[error("failed to create the chardev stop event: {0}")]
    StopEvent(#[source] io::Error),
    #[error("failed to start the chardev input thread: {0}")]
    Thread(#[source] io::Error),
}

/// Where a socket chardev listens or connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    Unix(PathBuf),
    /// An empty host means every address when listening and `localhost` when connecting.
    Tcp {
        host: String,
        port: u16,
    },
}

/// A parsed chardev description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevSpec {
    /// The process's stdin and stdout. `signal`: keep Ctrl-C delivering SIGINT (QEMU's
    /// default, `signal=on`).
    Stdio { signal: bool },
    /// Output to a file, truncated on open unless `append`. No input.
    File { path: PathBuf, append: bool },
    /// A stream socket. `server`: listen and serve one client at a time; `wait`: with
    /// `server`, block in [`Chardev::open`] until the first client connects.
    Socket {
        address: SocketAddress,
        server: bool,
        wait: bool,
        nodelay: bool,
    },
    /// A new pseudo-terminal; its name is printed and shown by [`Chardev::filename`].
    Pty,
    /// Output discarded, no input.
    Null,
    /// `-serial none`: no device at all.
    None,
    /// `chardev:ID`: a reference to a `-chardev` with that id, resolved by the caller.
    Named(String),
}

/// Parse QEMU's `-serial`/`-qmp` chardev syntax, such as `stdio`, `file:PATH`,
/// `unix:PATH,server=on,wait=off`, `unix:PATH,server,nowait`, `tcp::4444,server`, `pty`,
/// `null`, `none` or `chardev:ID`.
pub fn parse_chardev(s: &str) -> Result<ChardevSpec, ChardevError> {
    match s {
        "stdio" => return Ok(ChardevSpec::Stdio { signal: true }),
        "pty" => return Ok(ChardevSpec::Pty),
        "null" => return Ok(ChardevSpec::Null),
        "none" => return Ok(ChardevSpec::None),
        _ => {}
    }
    if let Some(path) = s.strip_prefix("file:") {
        // QEMU takes everything after "file:" as the path, commas included.
        if path.is_empty() {
            return Err(ChardevError::MissingPath("file"));
        }
        return Ok(ChardevSpec::File {
            path: PathBuf::from(path),
            append: false,
        });
    }
    if let Some(id) = s.strip_prefix("chardev:") {
        return Ok(ChardevSpec::Named(id.to_string()));
    }
    if let Some(rest) = s.strip_prefix("unix:") {
        let mut parts = split_options(rest).into_iter();
        let path = parts.next().unwrap_or_default();
        if path.is_empty() {
            return Err(ChardevError::MissingPath("unix"));
        }
        let mut opts = SocketOptions::new("unix");
        for part in parts {
            let (key, value) = split_key_value(&part);
            opts.apply(key, value)?;
        }
        return Ok(opts.finish(SocketAddress::Unix(PathBuf::from(path))));
    }
    if let Some(rest) = s.strip_prefix("tcp:") {
        let mut parts = split_options(rest).into_iter();
        let address = parse_host_port(&parts.next().unwrap_or_default())?;
        let mut opts = SocketOptions::new("tcp");
        for part in parts {
            let (key, value) = split_key_value(&part);
            opts.apply(key, value)?;
        }
        return Ok(opts.finish(address));
    }
    let backend = s.split([':', ',']).next().unwrap_or(s);
    Err(ChardevError::UnknownBackend(backend.to_string()))
}

/// Parse QEMU's `-chardev BACKEND,id=ID[,...]` syntax into the id and the spec.
/// Backends: `stdio[,signal=on|off]`, `file,path=P[,append=on]`,
/// `socket,path=P|host=H,port=N[,server=on][,wait=off][,nodelay=on]`, `pty`, `null`.
pub fn parse_chardev_option(s: &str) -> Result<(String, ChardevSpec), ChardevError> {
    let mut parts = split_options(s).into_iter();
    let first = parts.next().unwrap_or_default();
    let backend = first.strip_prefix("backend=").unwrap_or(&first).to_string();
    let mut id = None;
    let mut path = None;
    let mut host = None;
    let mut port = None;
    let mut signal = true;
    let mut append = false;
    let mut socket = SocketOptions::new("socket");
    for part in parts {
        let (key, value) = split_key_value(&part);
        match (backend.as_str(), key) {
            (_, "id") => id = value.map(str::to_string),
            ("stdio", "signal") => signal = parse_bool(&backend, key, value)?,
            ("file", "path") | ("socket", "path") => path = value.map(PathBuf::from),
            ("file", "append") => append = parse_bool(&backend, key, value)?,
            ("socket", "host") => host = value.map(str::to_string),
            ("socket", "port") => port = value.map(str::to_string),
            ("socket", _) => socket.apply(key, value)?,
            _ => {
                return Err(ChardevError::UnsupportedOption {
                    backend,
                    option: key.to_string(),
                })
            }
        }
    }
    let id = id
        .filter(|i| !i.is_empty())
        .ok_or(ChardevError::MissingId)?;
    let spec = match backend.as_str() {
        "stdio" => ChardevSpec::Stdio { signal },
        "pty" => ChardevSpec::Pty,
        "null" => ChardevSpec::Null,
        "file" => ChardevSpec::File {
            path: path.ok_or(ChardevError::MissingPath("file"))?,
            append,
        },
        "socket" => {
            let address = match (path, port) {
                (Some(p), None) if host.is_none() => SocketAddress::Unix(p),
                (None, Some(p)) => SocketAddress::Tcp {
                    host: host.unwrap_or_default(),
                    port: parse_port(&p)?,
                },
                _ => {
                    return Err(ChardevError::InvalidAddress {
                        address: s.to_string(),
                        reason: "give either path= or host= and port=",
                    })
                }
            };
            socket.finish(address)
        }
        _ => return Err(ChardevError::UnknownBackend(backend)),
    };
    Ok((id, spec))
}

/// Split a QEMU option string at commas; a doubled comma stands for a literal one.
pub(crate) fn split_options(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' && chars.peek() == Some(&',') {
            chars.next();
            current.push(',');
        } else if c == ',' {
            parts.push(std::mem::take(&mut current));
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    parts
}

pub(crate) fn split_key_value(part: &str) -> (&str, Option<&str>) {
    match part.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (part, None),
    }
}

/// QEMU's boolean option values. A bare flag (`server`) means on.
fn parse_bool(backend: &str, option: &str, value: Option<&str>) -> Result<bool, ChardevError> {
    match value {
        None | Some("on") | Some("yes") | Some("true") | Some("y") => Ok(true),
        Some("off") | Some("no") | Some("false") | Some("n") => Ok(false),
        Some(v) => Err(ChardevError::InvalidBool {
            backend: backend.to_string(),
            option: option.to_string(),
            value: v.to_string(),
        }),
    }
}

fn parse_port(s: &str) -> Result<u16, ChardevError> {
    s.parse().map_err(|_| ChardevError::InvalidAddress {
        address: s.to_string(),
        reason: "the port must be a number from 0 to 65535",
    })
}

/// `HOST:PORT`, `:PORT` or `[V6]:PORT`.
fn parse_host_port(s: &str) -> Result<SocketAddress, ChardevError> {
    let (host, port) = s.rsplit_once(':').ok_or(ChardevError::InvalidAddress {
        address: s.to_string(),
        reason: "expected HOST:PORT",
    })?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Ok(SocketAddress::Tcp {
        host: host.to_string(),
        port: parse_port(port)?,
    })
}

/// The options shared by the socket spellings.
struct SocketOptions {
    backend: &'static str,
    server: bool,
    wait: Option<bool>,
    nodelay: bool,
}

impl SocketOptions {
    fn new(backend: &'static str) -> Self {
        Self {
            backend,
            server: false,
            wait: None,
            nodelay: false,
        }
    }

    fn apply(&mut self, key: &str, value: Option<&str>) -> Result<(), ChardevError> {
        match (key, value) {
            // The old "no" prefix spelling: `nowait`, `noserver`; `nodelay` is an option
            // of its own (QEMU's "delay=off").
            ("nowait", None) => self.wait = Some(false),
            ("noserver", None) => self.server = false,
            ("server", _) => self.server = parse_bool(self.backend, key, value)?,
            ("wait", _) => self.wait = Some(parse_bool(self.backend, key, value)?),
            ("nodelay", _) => self.nodelay = parse_bool(self.backend, key, value)?,
            ("delay", _) => self.nodelay = !parse_bool(self.backend, key, value)?,
            _ => {
                return Err(ChardevError::UnsupportedOption {
                    backend: self.backend.to_string(),
                    option: key.to_string(),
                })
            }
        }
        Ok(())
    }

    fn finish(self, address: SocketAddress) -> ChardevSpec {
        ChardevSpec::Socket {
            address,
            server: self.server,
            // QEMU's command line waits for the first client unless told otherwise.
            wait: self.server && self.wait.unwrap_or(true),
            nodelay: self.nodelay,
        }
    }
}

/// The device side of a chardev's input.
///
/// The chardev's thread offers received bytes; when the device takes fewer than offered it
/// waits for room and offers the rest again, so bytes are never dropped.
pub trait ChardevInput: Send + Sync {
    /// Take as many leading bytes of `bytes` as there is room for now; return how many.
    fn offer(&self, bytes: &[u8]) -> usize;
    /// Block until there may be room again, or until `timeout` has passed.
    fn wait_for_room(&self, timeout: Duration);
}

/// How long the input thread sleeps at most before it re-checks for a stop request.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Tells the background thread to finish, both as a flag and as a pollable fd.
struct StopSignal {
    stopped: AtomicBool,
    event: EventFd,
}

impl StopSignal {
    fn new() -> Result<Self, ChardevError> {
        Ok(Self {
            stopped: AtomicBool::new(false),
            event: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(ChardevError::StopEvent)?,
        })
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Err(e) = self.event.write(1) {
            tracing::warn!("failed to signal the chardev thread to stop: {e}");
        }
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Sleep for `d` unless stopped first. Returns false if stopped.
    fn sleep(&self, d: Duration) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.event.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let timeout = i32::try_from(d.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
        unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout) };
        !self.is_stopped()
    }
}

/// Where the device's input goes, set once the device exists.
#[derive(Default)]
struct InputSlot {
    sink: Mutex<Option<Arc<dyn ChardevInput>>>,
    changed: Condvar,
}

impl InputSlot {
    /// The current sink; waits for one to be set. None if stopped meanwhile.
    fn wait_sink(&self, stop: &StopSignal) -> Option<Arc<dyn ChardevInput>> {
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if stop.is_stopped() {
                return None;
            }
            if let Some(s) = sink.as_ref() {
                return Some(s.clone());
            }
            sink = self
                .changed
                .wait_timeout(sink, POLL_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Hand `bytes` to the sink, waiting for room as often as needed. False if stopped first.
fn deliver(sink: &dyn ChardevInput, mut bytes: &[u8], stop: &StopSignal) -> bool {
    while !bytes.is_empty() {
        let taken = sink.offer(bytes).min(bytes.len());
        bytes = &bytes[taken..];
        if bytes.is_empty() {
            break;
        }
        if stop.is_stopped() {
            return false;
        }
        if taken == 0 {
            sink.wait_for_room(POLL_INTERVAL);
        }
    }
    true
}

/// Why a read loop ended.
#[derive(Debug, PartialEq, Eq)]
enum PumpEnd {
    Stopped,
    /// End of file or connection closed.
    Eof,
    /// Nobody on the other end of a pty right now.
    Hangup,
}

enum Readiness {
    Readable,
    Hangup,
    Stopped,
}

/// Wait until `fd` is readable (or hung up), or a stop is requested.
fn wait_readable(fd: RawFd, stop: &StopSignal) -> Readiness {
    loop {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.event.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ret < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Readiness::Hangup;
        }
        if stop.is_stopped() || fds[1].revents != 0 {
            return Readiness::Stopped;
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Readiness::Readable;
        }
        if fds[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            return Readiness::Hangup;
        }
    }
}

/// Read from `fd` and deliver to the input sink until end of file, hangup or stop.
fn pump(fd: RawFd, slot: &InputSlot, stop: &StopSignal) -> PumpEnd {
    let mut buf = [0u8; 4096];
    loop {
        let Some(sink) = slot.wait_sink(stop) else {
            return PumpEnd::Stopped;
        };
        match wait_readable(fd, stop) {
            Readiness::Readable => {}
            Readiness::Hangup => return PumpEnd::Hangup,
            Readiness::Stopped => return PumpEnd::Stopped,
        }
        // SAFETY: `buf` is valid for writes of its length; `fd` is open for the call.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock => continue,
                // A pty master reads EIO while no one has the slave open.
                _ if err.raw_os_error() == Some(libc::EIO) => return PumpEnd::Hangup,
                _ => {
                    tracing::debug!("chardev input read failed: {err}");
                    return PumpEnd::Eof;
                }
            }
        }
        if n == 0 {
            return PumpEnd::Eof;
        }
        let n = n as usize;
        if !deliver(sink.as_ref(), &buf[..n], stop) {
            return PumpEnd::Stopped;
        }
    }
}

/// Send all of `buf` on a socket without raising SIGPIPE when the peer is gone.
fn send_all(fd: RawFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for reads of its length; `fd` is open for the call.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// The connected peer of a socket chardev.
struct Connection {
    fd: Arc<OwnedFd>,
    /// The peer's part of the QEMU-style filename (" <-> 127.0.0.1:5555" for tcp).
    description: String,
}

/// The socket chardev's current client, shared by the writer and the accept thread.
#[derive(Default)]
struct ClientSlot {
    client: Mutex<Option<Connection>>,
}

impl ClientSlot {
    fn set(&self, conn: Connection) {
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
    }

    /// Forget the client if it is still `fd` (a newer client is left alone).
    fn clear_if(&self, fd: &Arc<OwnedFd>) {
        let mut client = self.client.lock().unwrap_or_else(|e| e.into_inner());
        if client.as_ref().is_some_and(|c| Arc::ptr_eq(&c.fd, fd)) {
            *client = None;
        }
    }

    fn description(&self) -> Option<String> {
        let client = self.client.lock().unwrap_or_else(|e| e.into_inner());
        client.as_ref().map(|c| c.description.clone())
    }

    fn is_connected(&self) -> bool {
        self.client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Send to the current client, blocking while it is slow. Without a client the bytes
    /// are dropped, as QEMU does. A client that fails is disconnected.
    fn write(&self, buf: &[u8]) {
        let fd = match self
            .client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            Some(conn) => conn.fd.clone(),
            None => return,
        };
        if let Err(e) = send_all(fd.as_raw_fd(), buf) {
            tracing::debug!("chardev client write failed, disconnecting it: {e}");
            // SAFETY: shutting down an open socket fd; the reader then sees end of file
            // and goes back to accepting.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
            self.clear_if(&fd);
        }
    }

    /// Cut the current client off (on close), which also unblocks a pending send.
    fn disconnect(&self) {
        if let Some(conn) = self.client.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // SAFETY: shutting down an open socket fd.
            unsafe { libc::shutdown(conn.fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }
}

/// Most output a socket chardev holds for a client that is not reading; beyond it, output
/// is dropped rather than stalling the guest.
const SOCKET_OUTPUT_LIMIT: usize = 4 << 20;

/// Output on its way to a socket client. Devices append without blocking; a writer
/// thread sends. A vCPU writing the serial port must never wait for a slow peer: a unix
/// socket accepts only a few hundred unread one-byte writes before `send` would block.
#[derive(Default)]
struct OutputQueue {
    state: Mutex<QueueState>,
    ready: Condvar,
}

#[derive(Default)]
struct QueueState {
    bytes: std::collections::VecDeque<u8>,
    closed: bool,
    overflow_logged: bool,
}

impl OutputQueue {
    fn push(&self, buf: &[u8]) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.bytes.len() + buf.len() > SOCKET_OUTPUT_LIMIT {
            if !state.overflow_logged {
                state.overflow_logged = true;
                tracing::warn!("chardev client is not reading; dropping output");
            }
            return;
        }
        state.overflow_logged = false;
        state.bytes.extend(buf);
        self.ready.notify_one();
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
        self.ready.notify_all();
    }

    /// The next chunk to send; None once closed.
    fn next_chunk(&self) -> Option<Vec<u8>> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if state.closed {
                return None;
            }
            if !state.bytes.is_empty() {
                let n = state.bytes.len().min(64 * 1024);
                return Some(state.bytes.drain(..n).collect());
            }
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The socket writer thread: send queued output to whichever client is connected.
fn send_queued(queue: &OutputQueue, slot: &ClientSlot) {
    while let Some(chunk) = queue.next_chunk() {
        slot.write(&chunk);
    }
}

/// The output side of each backend.
enum Output {
    Null,
    Stdout,
    File(Mutex<std::fs::File>),
    Socket {
        slot: Arc<ClientSlot>,
        queue: Arc<OutputQueue>,
    },
    /// Non-blocking pty master: output is dropped when no one reads it.
    Pty(Arc<OwnedFd>),
}

impl Output {
    fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Output::Null => Ok(()),
            Output::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()
            }
            Output::File(file) => file
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_all(buf),
            Output::Socket { slot, queue } => {
                // Without a client, output is dropped, as QEMU does.
                if slot.is_connected() {
                    queue.push(buf);
                }
                Ok(())
            }
            Output::Pty(fd) => {
                // While no one has the slave open the master reports a hangup; the kernel
                // would still buffer what we write and replay it stale to the next user,
                // so drop it here, as QEMU does.
                let mut pfd = [libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                }];
                // SAFETY: `pfd` is a valid array of one pollfd; zero timeout.
                let ready = unsafe { libc::poll(pfd.as_mut_ptr(), 1, 0) };
                if ready > 0 && pfd[0].revents & libc::POLLHUP != 0 {
                    return Ok(());
                }
                // SAFETY: `buf` is valid for reads of its length; `fd` is open.
                let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
                if n < 0 {
                    // EAGAIN (nobody reading) or EIO (nobody has it open): drop the bytes
                    // rather than stall the guest.
                    let err = io::Error::last_os_error();
                    tracing::trace!("pty output dropped: {err}");
                }
                Ok(())
            }
        }
    }
}

/// The output sink of a chardev that devices write to. Each write reaches the backend
/// before it returns (a serial port writes one byte at a time and flushes each).
#[derive(Clone)]
pub struct ChardevWriter {
    output: Arc<Output>,
}

impl Write for ChardevWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What [`Chardev::filename`] reports.
enum Identity {
    Fixed(String),
    Socket {
        /// `unix:PATH,server=on` or `tcp:HOST:PORT,server=on`, used while disconnected.
        address: String,
        /// The local part shown while a client is connected.
        connected: String,
        slot: Arc<ClientSlot>,
    },
}

/// An open character device backend.
pub struct Chardev {
    label: String,
    identity: Identity,
    output: Arc<Output>,
    input: Arc<InputSlot>,
    stop: Arc<StopSignal>,
    threads: Vec<JoinHandle<()>>,
    owns_stdio: bool,
    /// A listening unix socket file to remove when the chardev goes away.
    socket_path: Option<PathBuf>,
}

impl Chardev {
    /// Open the backend described by `spec`. `label` names it in messages and in
    /// `query-chardev` (QEMU labels `-serial` backends `serial0`, `serial1`, ...).
    ///
    /// [`ChardevSpec::None`] opens like `null`; the caller is expected to create no device.
    pub fn open(spec: &ChardevSpec, label: &str) -> Result<Chardev, ChardevError> {
        let mut chardev = Chardev {
            label: label.to_string(),
            identity: Identity::Fixed("null".to_string()),
            output: Arc::new(Output::Null),
            input: Arc::new(InputSlot::default()),
            stop: Arc::new(StopSignal::new()?),
            threads: Vec::new(),
            owns_stdio: false,
            socket_path: None,
        };
        match spec {
            ChardevSpec::Null | ChardevSpec::None => {}
            ChardevSpec::Named(id) => return Err(ChardevError::Unresolved(id.clone())),
            ChardevSpec::Stdio { signal } => chardev.open_stdio(*signal)?,
            ChardevSpec::File { path, append } => {
                let mut options = OpenOptions::new();
                options.create(true);
                if *append {
                    options.append(true);
                } else {
                    options.write(true).truncate(true);
                }
                let file = options
                    .open(path)
                    .map_err(|source| ChardevError::OpenFile {
                        path: path.clone(),
                        source,
                    })?;
                chardev.output = Arc::new(Output::File(Mutex::new(file)));
                chardev.identity = Identity::Fixed("file".to_string());
            }
            ChardevSpec::Pty => chardev.open_pty()?,
            ChardevSpec::Socket {
                address,
                server: true,
                wait,
                nodelay,
            } => chardev.open_server(address, *wait, *nodelay)?,
            ChardevSpec::Socket {
                address,
                server: false,
                nodelay,
                ..
            } => chardev.open_client(address, *nodelay)?,
        }
        Ok(chardev)
    }

    /// The label given to [`Chardev::open`].
    pub fn label(&self) -> &str {
        &self.label
    }

    /// A sink for device output.
    pub fn writer(&self) -> ChardevWriter {
        ChardevWriter {
            output: self.output.clone(),
        }
    }

    /// Connect the device that receives this chardev's input. Until one is connected the
    /// backend is not read at all, so nothing is lost.
    pub fn set_input(&self, sink: Arc<dyn ChardevInput>) {
        *self.input.sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
        self.input.changed.notify_all();
    }

    /// Disconnect the input device (for example before the device is removed).
    pub fn clear_input(&self) {
        *self.input.sink.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.input.changed.notify_all();
    }

    /// The backend as QEMU's `query-chardev` shows it: `stdio`, `file`, `null`,
    /// `pty:/dev/pts/N`, `unix:PATH,server=on` (prefixed with `disconnected:` while no
    /// client is connected), `tcp:LOCAL,server=on <-> PEER`.
    pub fn filename(&self) -> String {
        match &self.identity {
            Identity::Fixed(name) => name.clone(),
            Identity::Socket {
                address,
                connected,
                slot,
            } => match slot.description() {
                Some(peer) => format!("{connected}{peer}"),
                None => format!("disconnected:{address}"),
            },
        }
    }

    fn spawn(&mut self, name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), ChardevError> {
        let handle = std::thread::Builder::new()
            .name(format!("chardev-{name}"))
            .spawn(f)
            .map_err(ChardevError::Thread)?;
        self.threads.push(handle);
        Ok(())
    }

    /// Socket output: a queue and the thread that drains it into `slot`.
    fn socket_output(&mut self, slot: &Arc<ClientSlot>) -> Result<(), ChardevError> {
        let queue = Arc::new(OutputQueue::default());
        self.output = Arc::new(Output::Socket {
            slot: slot.clone(),
            queue: queue.clone(),
        });
        let slot = slot.clone();
        self.spawn("socket-out", move || send_queued(&queue, &slot))
    }

    fn open_stdio(&mut self, signal: bool) -> Result<(), ChardevError> {
        if STDIO_IN_USE.swap(true, Ordering::SeqCst) {
            return Err(ChardevError::StdioInUse);
        }
        self.owns_stdio = true;
        if let Err(e) = enter_raw_mode(signal) {
            return Err(ChardevError::Terminal(e));
        }
        self.output = Arc::new(Output::Stdout);
        self.identity = Identity::Fixed("stdio".to_string());
        let (slot, stop) = (self.input.clone(), self.stop.clone());
        self.spawn("stdio", move || {
            pump(libc::STDIN_FILENO, &slot, &stop);
        })
    }

    fn open_pty(&mut self) -> Result<(), ChardevError> {
        let (master, name) = open_raw_pty().map_err(ChardevError::Pty)?;
        // QEMU 7.2 prints this with qemu_printf, which goes to stdout.
        let mut out = io::stdout().lock();
        let _ = writeln!(
            out,
            "char device redirected to {name} (label {})",
            self.label
        );
        let _ = out.flush();
        let master = Arc::new(master);
        self.output = Arc::new(Output::Pty(master.clone()));
        self.identity = Identity::Fixed(format!("pty:{name}"));
        let (slot, stop) = (self.input.clone(), self.stop.clone());
        self.spawn("pty", move || loop {
            match pump(master.as_raw_fd(), &slot, &stop) {
                PumpEnd::Stopped => return,
                // Nobody has the pty open (or they closed it): look again shortly.
                PumpEnd::Hangup | PumpEnd::Eof => {
                    if !stop.sleep(Duration::from_millis(200)) {
                        return;
                    }
                }
            }
        })
    }

    fn open_server(
        &mut self,
        address: &SocketAddress,
        wait: bool,
        nodelay: bool,
    ) -> Result<(), ChardevError> {
        let listener = Listener::bind(address)?;
        if let SocketAddress::Unix(path) = address {
            self.socket_path = Some(path.clone());
        }
        let address_text = listener.address_text();
        let slot = Arc::new(ClientSlot::default());
        self.socket_output(&slot)?;
        self.identity = Identity::Socket {
            address: format!("{address_text},server=on"),
            connected: listener.connected_prefix(),
            slot: slot.clone(),
        };
        if wait {
            crate::report!("info: QEMU waiting for connection on: {}", self.filename());
            let conn = listener
                .accept(nodelay)
                .map_err(|source| ChardevError::Accept {
                    address: address_text.clone(),
                    source,
                })?;
            slot.set(conn);
        }
        let (input, stop) = (self.input.clone(), self.stop.clone());
        self.spawn("socket", move || {
            serve_clients(listener, slot, input, stop, nodelay)
        })
    }

    fn open_client(&mut self, address: &SocketAddress, nodelay: bool) -> Result<(), ChardevError> {
        let (fd, text) = match address {
            SocketAddress::Unix(path) => {
                let stream = UnixStream::connect(path).map_err(|source| ChardevError::Connect {
                    address: path.display().to_string(),
                    source,
                })?;
                (OwnedFd::from(stream), format!("unix:{}", path.display()))
            }
            SocketAddress::Tcp { host, port } => {
                let host = if host.is_empty() { "localhost" } else { host };
                let stream =
                    TcpStream::connect((host, *port)).map_err(|source| ChardevError::Connect {
                        address: format!("{host}:{port}"),
                        source,
                    })?;
                let _ = stream.set_nodelay(nodelay);
                let local = stream
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                (OwnedFd::from(stream), format!("tcp:{local} <-> {peer}"))
            }
        };
        let fd = Arc::new(fd);
        let slot = Arc::new(ClientSlot::default());
        slot.set(Connection {
            fd: fd.clone(),
            description: String::new(),
        });
        self.socket_output(&slot)?;
        self.identity = Identity::Socket {
            address: text.clone(),
            connected: text,
            slot: slot.clone(),
        };
        let (input, stop) = (self.input.clone(), self.stop.clone());
        self.spawn("socket", move || {
            pump(fd.as_raw_fd(), &input, &stop);
            slot.clear_if(&fd);
        })
    }
}

impl Drop for Chardev {
    fn drop(&mut self) {
        self.stop.stop();
        self.input.changed.notify_all();
        if let Output::Socket { slot, queue } = self.output.as_ref() {
            queue.close();
            slot.disconnect();
        }
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::warn!(label = %self.label, "chardev thread panicked");
            }
        }
        if self.owns_stdio {
            restore_terminal();
            STDIO_IN_USE.store(false, Ordering::SeqCst);
        }
        if let Some(path) = &self.socket_path {
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// A listening socket of either family.
enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    fn bind(address: &SocketAddress) -> Result<Self, ChardevError> {
        match address {
            SocketAddress::Unix(path) => {
                remove_stale_socket(path);
                UnixListener::bind(path)
                    .map(|l| Listener::Unix(l, path.clone()))
                    .map_err(|source| ChardevError::Listen {
                        address: path.display().to_string(),
                        source,
                    })
            }
            SocketAddress::Tcp { host, port } => {
                let host = if host.is_empty() { "0.0.0.0" } else { host };
                TcpListener::bind((host, *port))
                    .map(Listener::Tcp)
                    .map_err(|source| ChardevError::Listen {
                        address: format!("{host}:{port}"),
                        source,
                    })
            }
        }
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    /// `unix:PATH` or `tcp:HOST:PORT` for the filename.
    fn address_text(&self) -> String {
        match self {
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => format!("tcp:{a}"),
                Err(_) => "tcp:".to_string(),
            },
        }
    }

    /// The filename while connected, before the peer's part.
    fn connected_prefix(&self) -> String {
        format!("{},server=on", self.address_text())
    }

    /// Accept one client (blocking).
    fn accept(&self, nodelay: bool) -> io::Result<Connection> {
        match self {
            Listener::Unix(l, _) => {
                let (stream, _) = l.accept()?;
                stream.set_nonblocking(false)?;
                Ok(Connection {
                    fd: Arc::new(OwnedFd::from(stream)),
                    description: String::new(),
                })
            }
            Listener::Tcp(l) => {
                let (stream, peer) = l.accept()?;
                stream.set_nonblocking(false)?;
                let _ = stream.set_nodelay(nodelay);
                Ok(Connection {
                    fd: Arc::new(OwnedFd::from(stream)),
                    description: format!(" <-> {peer}"),
                })
            }
        }
    }
}

/// Remove a leftover socket file at `path` so that bind succeeds. Anything that is not a
/// socket is left alone (bind then fails and says so).
fn remove_stale_socket(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// The socket server thread: serve one client at a time, accept the next when it leaves.
fn serve_clients(
    listener: Listener,
    slot: Arc<ClientSlot>,
    input: Arc<InputSlot>,
    stop: Arc<StopSignal>,
    nodelay: bool,
) {
    loop {
        let current = slot
            .client
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.fd.clone());
        let fd = match current {
            Some(fd) => fd,
            None => {
                match wait_readable(listener.raw_fd(), &stop) {
                    Readiness::Stopped => return,
                    Readiness::Hangup => {
                        tracing::warn!("chardev listening socket failed");
                        return;
                    }
                    Readiness::Readable => {}
                }
                match listener.accept(nodelay) {
                    Ok(conn) => {
                        let fd = conn.fd.clone();
                        slot.set(conn);
                        fd
                    }
                    Err(e) => {
                        tracing::debug!("chardev accept failed: {e}");
                        if !stop.sleep(POLL_INTERVAL) {
                            return;
                        }
                        continue;
                    }
                }
            }
        };
        let end = pump(fd.as_raw_fd(), &input, &stop);
        slot.clear_if(&fd);
        if end == PumpEnd::Stopped {
            return;
        }
    }
}

/// Create a pty pair in raw mode; return the non-blocking master and the slave's name.
fn open_raw_pty() -> io::Result<(OwnedFd, String)> {
    // SAFETY: posix_openpt has no memory-safety preconditions.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `master` is a fresh fd that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: grantpt/unlockpt take an open pty master fd.
    if unsafe { libc::grantpt(master.as_raw_fd()) } < 0
        || unsafe { libc::unlockpt(master.as_raw_fd()) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: `name` is valid for writes of its length.
    let ret = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
    let name_string = name.to_string_lossy().into_owned();
    // Put the line discipline in raw mode through the slave, as QEMU does, so that bytes
    // pass unchanged and without echo.
    // SAFETY: `name` is a valid C string.
    let slave = unsafe {
        libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `slave` is a fresh fd that nothing else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    // SAFETY: an all-zero termios is a valid value for tcgetattr to fill in.
    let mut tio: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `tio` is valid for writes; `slave` is an open tty.
    if unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut tio) } == 0 {
        // SAFETY: `tio` is a valid termios.
        unsafe { libc::cfmakeraw(&mut tio) };
        // SAFETY: `tio` is a valid termios; `slave` is an open tty.
        unsafe { libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio) };
    }
    drop(slave);
    set_nonblocking(master.as_raw_fd())?;
    Ok((master, name_string))
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an open fd with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Only one chardev may own stdio at a time (QEMU refuses a second one too).
static STDIO_IN_USE: AtomicBool = AtomicBool::new(false);
/// The terminal settings of stdin before we changed them.
static SAVED_TERMIOS: OnceLock<libc::termios> = OnceLock::new();
/// Whether stdin is currently in our raw mode.
static TERMINAL_RAW: AtomicBool = AtomicBool::new(false);
static REGISTER_ATEXIT: Once = Once::new();

extern "C" fn restore_terminal_at_exit() {
    restore_terminal();
}

/// Put stdin (if it is a terminal) in raw mode: bytes pass through unbuffered and
/// unechoed; with `signal`, Ctrl-C and friends still raise signals. The old settings are
/// restored by [`restore_terminal`], which also runs at process exit.
fn enter_raw_mode(signal: bool) -> io::Result<()> {
    // SAFETY: isatty has no memory-safety preconditions.
    if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
        return Ok(());
    }
    // SAFETY: an all-zero termios is a valid value for tcgetattr to fill in.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `saved` is valid for writes.
    if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let saved = *SAVED_TERMIOS.get_or_init(|| saved);
    let mut raw = saved;
    raw.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::IEXTEN);
    if signal {
        raw.c_lflag |= libc::ISIG;
    } else {
        raw.c_lflag &= !libc::ISIG;
    }
    raw.c_cflag = (raw.c_cflag & !(libc::CSIZE | libc::PARENB)) | libc::CS8;
    raw.c_cc[libc::VMIN] = 1;
    raw.c_cc[libc::VTIME] = 0;
    REGISTER_ATEXIT.call_once(|| {
        // SAFETY: registering a plain extern "C" function with no captured state.
        if unsafe { libc::atexit(restore_terminal_at_exit) } != 0 {
            tracing::warn!("could not register the terminal restore at exit");
        }
    });
    // SAFETY: `raw` is a valid termios.
    if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } < 0 {
        return Err(io::Error::last_os_error());
    }
    TERMINAL_RAW.store(true, Ordering::SeqCst);
    Ok(())
}

/// Put the terminal back the way it was before a stdio chardev changed it. Safe to call
/// any number of times, from exit paths, and from a signal handler (it only does an atomic
/// swap and `tcsetattr`).
pub fn restore_terminal() {
    if TERMINAL_RAW.swap(false, Ordering::SeqCst) {
        if let Some(saved) = SAVED_TERMIOS.get() {
            // SAFETY: `saved` is a valid termios captured from this terminal.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, saved) };
        }
    }
}

extern "C" fn restore_terminal_and_reraise(signal: libc::c_int) {
    restore_terminal();
    // SAFETY: signal() and raise() are async-signal-safe; the default action then ends
    // the process the way the signal would have.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

/// For binaries that do not handle SIGINT, SIGTERM, SIGHUP and SIGQUIT themselves: restore
/// the terminal before such a signal ends the process. Signals that already have a
/// handler are left alone.
pub fn restore_terminal_on_fatal_signals() {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: an all-zero sigaction is valid for sigaction() to fill in.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: querying the current disposition into a valid struct.
        if unsafe { libc::sigaction(signal, std::ptr::null(), &mut old) } != 0 {
            continue;
        }
        if old.sa_sigaction != libc::SIG_DFL {
            continue;
        }
        // SAFETY: an all-zero sigaction is a valid starting point.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = restore_terminal_and_reraise as extern "C" fn(libc::c_int) as usize;
        // SAFETY: installing a handler that only calls async-signal-safe functions.
        unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn parses_serial_syntax() {
        assert_eq!(
            parse_chardev("stdio").unwrap(),
            ChardevSpec::Stdio { signal: true }
        );
        assert_eq!(parse_chardev("pty").unwrap(), ChardevSpec::Pty);
        assert_eq!(parse_chardev("null").unwrap(), ChardevSpec::Null);
        assert_eq!(parse_chardev("none").unwrap(), ChardevSpec::None);
        assert_eq!(
            parse_chardev("file:/tmp/a,b").unwrap(),
            ChardevSpec::File {
                path: "/tmp/a,b".into(),
                append: false
            }
        );
        let unix = |path: &str, server, wait| ChardevSpec::Socket {
            address: SocketAddress::Unix(path.into()),
            server,
            wait,
            nodelay: false,
        };
        assert_eq!(
            parse_chardev("unix:/tmp/s,server=on,wait=off").unwrap(),
            unix("/tmp/s", true, false)
        );
        assert_eq!(
            parse_chardev("unix:/tmp/s,server,nowait").unwrap(),
            unix("/tmp/s", true, false)
        );
        assert_eq!(
            parse_chardev("unix:/tmp/s,server").unwrap(),
            unix("/tmp/s", true, true)
        );
        assert_eq!(
            parse_chardev("unix:/tmp/s,server=on,wait=on").unwrap(),
            unix("/tmp/s", true, true)
        );
        assert_eq!(
            parse_chardev("unix:/tmp/a,,b").unwrap(),
            unix("/tmp/a,b", false, false)
        );
        assert_eq!(
            parse_chardev("tcp::4444,server,nowait,nodelay").unwrap(),
            ChardevSpec::Socket {
                address: SocketAddress::Tcp {
                    host: String::new(),
                    port: 4444
                },
                server: true,
                wait: false,
                nodelay: true,
            }
        );
        assert_eq!(
            parse_chardev("tcp:[::1]:5555,server=on,wait=off").unwrap(),
            ChardevSpec::Socket {
                address: SocketAddress::Tcp {
                    host: "::1".into(),
                    port: 5555
                },
                server: true,
                wait: false,
                nodelay: false,
            }
        );
        assert_eq!(
            parse_chardev("chardev:ser0").unwrap(),
            ChardevSpec::Named("ser0".into())
        );
    }

    #[test]
    fn parse_errors_name_the_bad_part() {
        let err = parse_chardev("vc:80x24").unwrap_err().to_string();
        assert!(err.contains("'vc'"), "{err}");
        let err = parse_chardev("bogus").unwrap_err().to_string();
        assert!(err.contains("'bogus'"), "{err}");
        let err = parse_chardev("unix:/tmp/s,server,telnet")
            .unwrap_err()
            .to_string();
        assert!(err.contains("'telnet'"), "{err}");
        let err = parse_chardev("unix:/tmp/s,server=maybe")
            .unwrap_err()
            .to_string();
        assert!(err.contains("'maybe'"), "{err}");
        assert!(parse_chardev("file:").is_err());
        assert!(parse_chardev("unix:").is_err());
        assert!(parse_chardev("tcp:host").is_err());
        assert!(parse_chardev("tcp:host:99999").is_err());
    }

    #[test]
    fn parses_chardev_option_syntax() {
        assert_eq!(
            parse_chardev_option("socket,id=mon0,path=/tmp/m,server=on,wait=off").unwrap(),
            (
                "mon0".to_string(),
                ChardevSpec::Socket {
                    address: SocketAddress::Unix("/tmp/m".into()),
                    server: true,
                    wait: false,
                    nodelay: false,
                }
            )
        );
        assert_eq!(
            parse_chardev_option("socket,id=t,host=127.0.0.1,port=4000,server=on").unwrap(),
            (
                "t".to_string(),
                ChardevSpec::Socket {
                    address: SocketAddress::Tcp {
                        host: "127.0.0.1".into(),
                        port: 4000
                    },
                    server: true,
                    wait: true,
                    nodelay: false,
                }
            )
        );
        assert_eq!(
            parse_chardev_option("stdio,id=s,signal=off").unwrap(),
            ("s".to_string(), ChardevSpec::Stdio { signal: false })
        );
        assert_eq!(
            parse_chardev_option("file,id=f,path=/tmp/x,append=on").unwrap(),
            (
                "f".to_string(),
                ChardevSpec::File {
                    path: "/tmp/x".into(),
                    append: true
                }
            )
        );
        assert!(matches!(
            parse_chardev_option("pty"),
            Err(ChardevError::MissingId)
        ));
        assert!(parse_chardev_option("socket,id=x").is_err());
        assert!(parse_chardev_option("null,id=n,foo=bar").is_err());
        assert!(parse_chardev_option("spice,id=n").is_err());
    }

    /// Records offered bytes, taking at most `room` per offer until it is "read".
    struct SlowSink {
        taken: Mutex<Vec<u8>>,
        room: usize,
    }

    impl ChardevInput for SlowSink {
        fn offer(&self, bytes: &[u8]) -> usize {
            let n = bytes.len().min(self.room);
            self.taken.lock().unwrap().extend_from_slice(&bytes[..n]);
            n
        }
        fn wait_for_room(&self, timeout: Duration) {
            std::thread::sleep(timeout.min(Duration::from_millis(1)));
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmm-chardev-{}-{name}", std::process::id()))
    }

    fn wait_until(mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("condition not reached");
    }

    #[test]
    fn file_backend_truncates_and_writes() {
        let path = temp_path("file");
        std::fs::write(&path, b"old contents").unwrap();
        let dev = Chardev::open(
            &ChardevSpec::File {
                path: path.clone(),
                append: false,
            },
            "serial0",
        )
        .unwrap();
        let mut w = dev.writer();
        w.write_all(b"hello").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        assert_eq!(dev.filename(), "file");
        drop(dev);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn null_backend_discards() {
        let dev = Chardev::open(&ChardevSpec::Null, "serial0").unwrap();
        dev.writer().write_all(b"x").unwrap();
        assert_eq!(dev.filename(), "null");
        assert!(matches!(
            Chardev::open(&ChardevSpec::Named("a".into()), "serial0"),
            Err(ChardevError::Unresolved(_))
        ));
    }

    #[test]
    fn unix_server_serves_clients_in_turn() {
        let path = temp_path("sock");
        // A stale socket file from an earlier run is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let spec = parse_chardev(&format!("unix:{},server=on,wait=off", path.display())).unwrap();
        let dev = Chardev::open(&spec, "serial0").unwrap();
        let sink = Arc::new(SlowSink {
            taken: Mutex::new(Vec::new()),
            room: 3,
        });
        dev.set_input(sink.clone());
        assert_eq!(
            dev.filename(),
            format!("disconnected:unix:{},server=on", path.display())
        );
        // No client: output is dropped without blocking.
        dev.writer().write_all(b"dropped").unwrap();

        let mut client = UnixStream::connect(&path).unwrap();
        wait_until(|| !dev.filename().starts_with("disconnected:"));
        assert_eq!(dev.filename(), format!("unix:{},server=on", path.display()));
        dev.writer().write_all(b"to client").unwrap();
        let mut buf = [0u8; 9];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to client");
        client.write_all(b"from client 1").unwrap();
        wait_until(|| sink.taken.lock().unwrap().len() == 13);
        drop(client);
        wait_until(|| dev.filename().starts_with("disconnected:"));

        let mut second = UnixStream::connect(&path).unwrap();
        second.write_all(b"+2").unwrap();
        wait_until(|| sink.taken.lock().unwrap().len() == 15);
        assert_eq!(&sink.taken.lock().unwrap()[..], b"from client 1+2");
        drop(second);
        drop(dev);
        assert!(!path.exists(), "socket file removed on close");
    }

    #[test]
    fn unix_server_wait_blocks_until_a_client_connects() {
        let path = temp_path("wait");
        let spec = parse_chardev(&format!("unix:{},server", path.display())).unwrap();
        let connector = {
            let path = path.clone();
            std::thread::spawn(move || {
                wait_until(|| path.exists());
                let mut c = UnixStream::connect(&path).unwrap();
                let mut buf = [0u8; 5];
                c.read_exact(&mut buf).unwrap();
                buf
            })
        };
        let dev = Chardev::open(&spec, "serial0").unwrap();
        // The client is connected as soon as open returns: nothing written is lost.
        dev.writer().write_all(b"early").unwrap();
        assert_eq!(&connector.join().unwrap(), b"early");
    }

    #[test]
    fn tcp_server_reports_peer() {
        let dev = Chardev::open(
            &parse_chardev("tcp:127.0.0.1:0,server,nowait").unwrap(),
            "s",
        )
        .unwrap();
        let name = dev.filename();
        assert!(name.starts_with("disconnected:tcp:127.0.0.1:"), "{name}");
        let port: u16 = name
            .trim_end_matches(",server=on")
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        wait_until(|| dev.filename().contains(" <-> "));
        dev.writer().write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn pty_backend_round_trip() {
        let dev = Chardev::open(&ChardevSpec::Pty, "serial0").unwrap();
        let name = dev.filename();
        let pts = name.strip_prefix("pty:").unwrap().to_string();
        // Nobody has it open: output must not block.
        for _ in 0..100 {
            dev.writer().write_all(&[b'x'; 1024]).unwrap();
        }
        let sink = Arc::new(SlowSink {
            taken: Mutex::new(Vec::new()),
            room: usize::MAX,
        });
        dev.set_input(sink.clone());
        let mut slave = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pts)
            .unwrap();
        slave.write_all(b"typed\r").unwrap();
        wait_until(|| sink.taken.lock().unwrap().len() == 6);
        assert_eq!(&sink.taken.lock().unwrap()[..], b"typed\r");
        dev.writer().write_all(b"out\n").unwrap();
        let mut buf = [0u8; 4];
        slave.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"out\n", "raw mode: no newline translation");
    }

    #[test]
    fn deliver_waits_for_room_without_losing_bytes() {
        let stop = StopSignal::new().unwrap();
        let sink = SlowSink {
            taken: Mutex::new(Vec::new()),
            room: 7,
        };
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        assert!(deliver(&sink, &data, &stop));
        assert_eq!(*sink.taken.lock().unwrap(), data);
    }
}
