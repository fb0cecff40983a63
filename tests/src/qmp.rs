//! A minimal blocking QMP client for tests: one JSON message per line, as the server
//! writes them.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long connecting and each read may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A minimal QMP client: one JSON message per line.
pub struct Qmp<S: std::io::Read + Write> {
    reader: BufReader<S>,
    writer: S,
}

impl Qmp<UnixStream> {
    /// Connect to a unix socket monitor, retrying while the vmm starts.
    pub fn unix(path: &Path) -> Self {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(start.elapsed() < TIMEOUT, "connect {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }
}

impl Qmp<UnixStream> {
    /// Send a command with `fd` attached (SCM_RIGHTS), as getfd wants it.
    pub fn send_with_fd(&mut self, command: &str, args: Option<Value>, fd: RawFd) {
        let mut msg = json!({ "execute": command });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        let bytes = msg.to_string();
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // SAFETY: CMSG_SPACE only computes a size.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        let mut control = vec![0u8; space];
        // SAFETY: msghdr is plain data; all zeroes is valid before we fill it in.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        hdr.msg_controllen = space as _;
        // SAFETY: the control buffer is large enough for one fd (CMSG_SPACE above), so
        // CMSG_FIRSTHDR is non-null and CMSG_DATA points inside it; sendmsg reads the
        // iovec and control buffers, which live until it returns.
        let sent = unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::copy_nonoverlapping(
                &fd as *const RawFd as *const u8,
                libc::CMSG_DATA(cmsg),
                std::mem::size_of::<RawFd>(),
            );
            libc::sendmsg(self.writer.as_raw_fd(), &hdr, 0)
        };
        assert_eq!(sent, bytes.len() as isize, "sendmsg with an fd");
    }

    /// Connect to a unix socket monitor and negotiate capabilities.
    pub fn connect(path: &Path) -> Self {
        let mut qmp = Self::unix(path);
        qmp.negotiate();
        qmp
    }
}

impl Qmp<TcpStream> {
    pub fn tcp(port: u16) -> Self {
        let start = Instant::now();
        let stream = loop {
            match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(start.elapsed() < TIMEOUT, "connect tcp {port}: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }
}

impl<S: std::io::Read + Write> Qmp<S> {
    /// The next message, or None at EOF.
    pub fn next_message(&mut self) -> Option<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .expect("read from the monitor");
        if n == 0 {
            return None;
        }
        assert!(line.ends_with("\r\n"), "messages end with CRLF: {line:?}");
        Some(serde_json::from_str(&line).expect("a JSON message"))
    }

    pub fn message(&mut self) -> Value {
        self.next_message().expect("a message before EOF")
    }

    pub fn send(&mut self, command: &str, args: Option<Value>) {
        let mut msg = json!({ "execute": command });
        if let Some(args) = args {
            msg["arguments"] = args;
        }
        self.writer.write_all(msg.to_string().as_bytes()).unwrap();
    }

    /// Write raw bytes to the monitor (malformed input, ids, split messages).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).expect("write to the monitor");
    }

    /// Greeting plus qmp_capabilities.
    pub fn negotiate(&mut self) -> Value {
        let greeting = self.message();
        self.send("qmp_capabilities", None);
        assert_eq!(self.message(), json!({ "return": {} }));
        greeting
    }

    /// Runs a command whose reply must come next (no event in between).
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Value {
        self.send(command, args);
        let reply = self.message();
        assert!(
            reply.get("return").is_some() || reply.get("error").is_some(),
            "{command}: expected the reply, got {reply}"
        );
        reply
    }

    /// Runs a command and returns its reply, skipping any events before it.
    pub fn request(&mut self, command: &str, args: Option<Value>) -> Value {
        self.send(command, args);
        loop {
            let reply = self.message();
            if reply.get("event").is_none() {
                return reply;
            }
        }
    }

    /// The `return` value of a command that must succeed (events before it skipped).
    pub fn ok(&mut self, command: &str, args: Option<Value>) -> Value {
        let reply = self.request(command, args);
        reply
            .get("return")
            .unwrap_or_else(|| panic!("{command}: {reply}"))
            .clone()
    }

    /// human-monitor-command's text for `line`.
    pub fn hmp(&mut self, line: &str) -> String {
        let reply = self.ok(
            "human-monitor-command",
            Some(json!({ "command-line": line })),
        );
        reply.as_str().unwrap_or_default().to_string()
    }

    /// Runs a command that must first send `event`, then succeed.
    pub fn execute_with_event(&mut self, command: &str, args: Option<Value>, event: &str) -> Value {
        self.send(command, args);
        let first = self.message();
        assert_eq!(
            first["event"], event,
            "{command}: the event precedes the reply"
        );
        assert!(first["timestamp"]["seconds"].as_u64().is_some());
        assert!(first["timestamp"]["microseconds"].as_u64().is_some());
        assert_eq!(self.message(), json!({ "return": {} }), "{command}");
        first
    }

    pub fn wait_event(&mut self, event: &str) -> Value {
        loop {
            let msg = self.message();
            if msg["event"] == event {
                return msg;
            }
            assert!(
                msg.get("event").is_some(),
                "unexpected message while waiting for {event}: {msg}"
            );
        }
    }

    pub fn status(&mut self) -> Value {
        self.execute("query-status", None)["return"].clone()
    }
}

/// A monitor client for long-running checkers (fuzzers, fault suites), which report a
/// monitor that fails them as an error rather than panicking: a reply that is an error
/// is an `Err` too.
pub struct Checked {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Checked {
    /// Connect (retrying for 10 s while the socket is not there yet) and negotiate.
    pub fn connect(path: &Path) -> Result<Self, String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(format!("QMP connect: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut m = Checked {
            reader: BufReader::new(stream),
            writer,
        };
        m.line()?;
        m.execute("qmp_capabilities", None)?;
        Ok(m)
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("the monitor closed".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}")),
            Err(e) => Err(format!("the monitor did not answer: {e}")),
        }
    }

    /// A command's `return` (events before the reply are skipped).
    pub fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let text = msg.to_string() + "\n";
        self.writer
            .write_all(text.as_bytes())
            .map_err(|e| format!("write to the monitor: {e}"))?;
        loop {
            let v = self.line()?;
            if v.get("event").is_some() {
                continue;
            }
            return match v.get("return") {
                Some(r) => Ok(r.clone()),
                None => Err(format!("{command}: {v}")),
            };
        }
    }

    /// The event `name`, within `timeout`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Value, String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let v = self.line()?;
            if v["event"] == name {
                return Ok(v);
            }
        }
        Err(format!("no {name} event"))
    }
}
