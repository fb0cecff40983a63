//! The test side of the qtest harness (QEMU's libqtest, in small): [`Qtest::start`] makes a
//! listening socket, starts the vmm with `-accel qtest -qtest unix:PATH`, accepts its
//! connection and then offers typed port, MMIO and guest-memory accesses. Asynchronous
//! `IRQ` lines are buffered as they arrive, so [`Qtest::wait_irq`] and [`Qtest::wait_msi`]
//! can wait for an interrupt at any time. The vmm is killed when the [`Qtest`] is dropped.
//!
//! See `vmm/src/accel/qtest.rs` for the protocol.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::TempDir;

/// How long a command may take to be answered.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the vmm may take to connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum QtestError {
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the vmm binary {path} is missing: build it first (cargo build --bins)")]
    NoBinary { path: PathBuf },
    #[error("the vmm exited ({status}) before connecting; its stderr:\n{stderr}")]
    VmmExited { status: ExitStatus, stderr: String },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    #[error("`{command}` failed: {reason}")]
    Fail { command: String, reason: String },
    #[error("`{command}`: unexpected reply line {line:?}")]
    Protocol { command: String, line: String },
    #[error("the vmm closed the qtest connection (during `{0}`)")]
    Disconnected(String),
    #[error("the vmm is no longer running")]
    NotRunning,
}

/// An asynchronous interrupt report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IrqEvent {
    Raise(u32),
    Lower(u32),
    Msi { address: u64, data: u32 },
}

impl IrqEvent {
    /// Parse an `IRQ ...` line; None if it is not one.
    pub fn parse(line: &str) -> Option<IrqEvent> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["IRQ", "raise", n] => n.parse().ok().map(IrqEvent::Raise),
            ["IRQ", "lower", n] => n.parse().ok().map(IrqEvent::Lower),
            ["IRQ", "msi", a, d] => Some(IrqEvent::Msi {
                address: parse_hex(a)?,
                data: u32::try_from(parse_hex(d)?).ok()?,
            }),
            _ => None,
        }
    }
}

/// The value of one hex digit.
fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn parse_hex(s: &str) -> Option<u64> {
    let hex = s.strip_prefix("0x")?;
    u64::from_str_radix(hex, 16).ok()
}

/// A running vmm under qtest, and the connection to it.
pub struct Qtest {
    child: Option<Child>,
    writer: UnixStream,
    lines: Receiver<String>,
    irqs: VecDeque<IrqEvent>,
    /// The last level each GSI was reported at.
    levels: Vec<bool>,
    dir: TempDir,
}

impl Qtest {
    /// Start the vmm with `-m mem` and `extra` arguments after the qtest ones.
    pub fn start(mem: &str, extra: &[&str]) -> Result<Qtest, QtestError> {
        Self::start_binary(&crate::vmm_binary_path(), mem, extra)
    }

    /// [`Qtest::start`] with another copy of the vmm binary (whose device programs are
    /// the ones beside it).
    pub fn start_binary(bin: &Path, mem: &str, extra: &[&str]) -> Result<Qtest, QtestError> {
        Self::start_binary_env(bin, mem, extra, &[])
    }

    /// [`Qtest::start`] with `env` added to the vmm's environment (which its device
    /// processes inherit: their test hooks).
    pub fn start_env(mem: &str, extra: &[&str], env: &[(&str, &str)]) -> Result<Qtest, QtestError> {
        Self::start_binary_env(&crate::vmm_binary_path(), mem, extra, env)
    }

    fn start_binary_env(
        bin: &Path,
        mem: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Qtest, QtestError> {
        let bin = bin.to_path_buf();
        if !bin.exists() {
            return Err(QtestError::NoBinary { path: bin });
        }
        let dir = TempDir::try_new("qtest").map_err(|source| QtestError::Io {
            what: "create a temporary directory",
            source,
        })?;
        let sock = dir.join("qtest.sock");
        let listener = UnixListener::bind(&sock).map_err(|source| QtestError::Io {
            what: "listen for the vmm",
            source,
        })?;
        let stderr_path = dir.join("vmm.stderr");
        let stderr = std::fs::File::create(&stderr_path).map_err(|source| QtestError::Io {
            what: "create the vmm's stderr file",
            source,
        })?;
        let qtest_arg = format!("unix:{}", sock.display());
        let mut child = Command::new(&bin)
            .args(["-accel", "qtest", "-qtest", &qtest_arg, "-m", mem])
            .args(["-nodefaults", "-display", "none"])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|source| QtestError::Io {
                what: "spawn the vmm",
                source,
            })?;
        let stream = match accept(&listener, &mut child) {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(match e {
                    QtestError::VmmExited { status, .. } => QtestError::VmmExited {
                        status,
                        stderr: crate::read_file(&stderr_path),
                    },
                    other => other,
                });
            }
        };
        let reader = stream.try_clone().map_err(|source| QtestError::Io {
            what: "duplicate the qtest socket",
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("qtest-reader".into())
            .spawn(move || {
                for line in BufReader::new(reader).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })
            .map_err(|source| QtestError::Io {
                what: "start the reader thread",
                source,
            })?;
        Ok(Qtest {
            child: Some(child),
            writer: stream,
            lines: rx,
            irqs: VecDeque::new(),
            levels: vec![false; 256],
            dir,
        })
    }

    /// The vmm's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The vmm's stderr so far.
    pub fn stderr(&self) -> String {
        crate::read_file(&self.dir.join("vmm.stderr"))
    }

    /// A fresh path in this harness's temporary directory (for a QMP socket, say).
    pub fn temp_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Send one command line; the text after `OK` (trimmed), or the `FAIL` as an error.
    pub fn command(&mut self, line: &str) -> Result<String, QtestError> {
        let mut bytes = line.as_bytes().to_vec();
        bytes.push(b'\n');
        self.writer
            .write_all(&bytes)
            .map_err(|_| QtestError::Disconnected(line.to_string()))?;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            let reply = self.next_line(deadline, line)?;
            if let Some(ev) = IrqEvent::parse(&reply) {
                self.record(ev);
                continue;
            }
            if reply == "OK" {
                return Ok(String::new());
            }
            if let Some(rest) = reply.strip_prefix("OK ") {
                return Ok(rest.trim().to_string());
            }
            if let Some(reason) = reply.strip_prefix("FAIL") {
                return Err(QtestError::Fail {
                    command: line.to_string(),
                    reason: reason.trim().to_string(),
                });
            }
            return Err(QtestError::Protocol {
                command: line.to_string(),
                line: reply,
            });
        }
    }

    fn next_line(&mut self, deadline: Instant, context: &str) -> Result<String, QtestError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.lines.recv_timeout(left) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => Err(QtestError::Timeout(
                REPLY_TIMEOUT,
                format!("the reply to `{context}`"),
            )),
            Err(RecvTimeoutError::Disconnected) => {
                Err(QtestError::Disconnected(context.to_string()))
            }
        }
    }

    fn record(&mut self, ev: IrqEvent) {
        match ev {
            IrqEvent::Raise(n) | IrqEvent::Lower(n) => {
                if let Some(l) = self.levels.get_mut(n as usize) {
                    *l = matches!(ev, IrqEvent::Raise(_));
                }
            }
            IrqEvent::Msi { .. } => {}
        }
        self.irqs.push_back(ev);
    }

    /// Take IRQ lines that have arrived without waiting.
    fn drain(&mut self) -> Result<(), QtestError> {
        while let Ok(line) = self.lines.try_recv() {
            match IrqEvent::parse(&line) {
                Some(ev) => self.record(ev),
                None => {
                    return Err(QtestError::Protocol {
                        command: "(no command)".into(),
                        line,
                    })
                }
            }
        }
        Ok(())
    }

    /// Command whose reply is a number.
    fn value(&mut self, line: &str) -> Result<u64, QtestError> {
        let reply = self.command(line)?;
        parse_hex(&reply).ok_or_else(|| QtestError::Protocol {
            command: line.to_string(),
            line: format!("OK {reply}"),
        })
    }

    pub fn outb(&mut self, port: u16, v: u8) -> Result<(), QtestError> {
        self.command(&format!("outb {port:#x} {v:#x}")).map(drop)
    }
    pub fn outw(&mut self, port: u16, v: u16) -> Result<(), QtestError> {
        self.command(&format!("outw {port:#x} {v:#x}")).map(drop)
    }
    pub fn outl(&mut self, port: u16, v: u32) -> Result<(), QtestError> {
        self.command(&format!("outl {port:#x} {v:#x}")).map(drop)
    }
    pub fn inb(&mut self, port: u16) -> Result<u8, QtestError> {
        Ok(self.value(&format!("inb {port:#x}"))? as u8)
    }
    pub fn inw(&mut self, port: u16) -> Result<u16, QtestError> {
        Ok(self.value(&format!("inw {port:#x}"))? as u16)
    }
    pub fn inl(&mut self, port: u16) -> Result<u32, QtestError> {
        Ok(self.value(&format!("inl {port:#x}"))? as u32)
    }
    pub fn readb(&mut self, addr: u64) -> Result<u8, QtestError> {
        Ok(self.value(&format!("readb {addr:#x}"))? as u8)
    }
    pub fn readw(&mut self, addr: u64) -> Result<u16, QtestError> {
        Ok(self.value(&format!("readw {addr:#x}"))? as u16)
    }
    pub fn readl(&mut self, addr: u64) -> Result<u32, QtestError> {
        Ok(self.value(&format!("readl {addr:#x}"))? as u32)
    }
    pub fn readq(&mut self, addr: u64) -> Result<u64, QtestError> {
        self.value(&format!("readq {addr:#x}"))
    }
    pub fn writeb(&mut self, addr: u64, v: u8) -> Result<(), QtestError> {
        self.command(&format!("writeb {addr:#x} {v:#x}")).map(drop)
    }
    pub fn writew(&mut self, addr: u64, v: u16) -> Result<(), QtestError> {
        self.command(&format!("writew {addr:#x} {v:#x}")).map(drop)
    }
    pub fn writel(&mut self, addr: u64, v: u32) -> Result<(), QtestError> {
        self.command(&format!("writel {addr:#x} {v:#x}")).map(drop)
    }
    pub fn writeq(&mut self, addr: u64, v: u64) -> Result<(), QtestError> {
        self.command(&format!("writeq {addr:#x} {v:#x}")).map(drop)
    }

    /// Read `len` bytes of guest RAM.
    pub fn memread(&mut self, addr: u64, len: usize) -> Result<Vec<u8>, QtestError> {
        let line = format!("read {addr:#x} {len:#x}");
        let reply = self.command(&line)?;
        let bad = |reply: &str| QtestError::Protocol {
            command: line.clone(),
            line: format!("OK {reply}"),
        };
        let hex = reply.strip_prefix("0x").ok_or_else(|| bad(&reply))?;
        if hex.len() != len * 2 {
            return Err(bad(&reply));
        }
        hex.as_bytes()
            .chunks_exact(2)
            .map(|p| match (hex_value(p[0]), hex_value(p[1])) {
                (Some(hi), Some(lo)) => Ok(hi << 4 | lo),
                _ => Err(bad(&reply)),
            })
            .collect()
    }

    /// Write `data` to guest RAM.
    pub fn memwrite(&mut self, addr: u64, data: &[u8]) -> Result<(), QtestError> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut line = format!("write {addr:#x} {:#x} 0x", data.len());
        line.reserve(data.len() * 2);
        for b in data {
            line.push(char::from(DIGITS[usize::from(b >> 4)]));
            line.push(char::from(DIGITS[usize::from(b & 15)]));
        }
        self.command(&line).map(drop)
    }

    /// Fill `len` bytes of guest RAM with `byte`.
    pub fn memset(&mut self, addr: u64, len: usize, byte: u8) -> Result<(), QtestError> {
        self.command(&format!("memset {addr:#x} {len:#x} {byte:#x}"))
            .map(drop)
    }

    /// Report GSI level changes of the IOAPIC from now on.
    pub fn irq_intercept_in(&mut self, name: &str) -> Result<(), QtestError> {
        self.command(&format!("irq_intercept_in {name}")).map(drop)
    }

    /// The last reported level of `gsi` (after [`Qtest::irq_intercept_in`]).
    pub fn get_irq(&mut self, gsi: u32) -> Result<bool, QtestError> {
        self.drain()?;
        Ok(self.levels.get(gsi as usize).copied().unwrap_or(false))
    }

    /// Every interrupt report received so far, oldest first; they are consumed.
    pub fn take_irqs(&mut self) -> Result<Vec<IrqEvent>, QtestError> {
        self.drain()?;
        Ok(self.irqs.drain(..).collect())
    }

    /// Wait for an interrupt report that `pick` accepts, consuming it (and only it).
    fn wait_for(
        &mut self,
        what: String,
        timeout: Duration,
        pick: impl Fn(&IrqEvent) -> bool,
    ) -> Result<IrqEvent, QtestError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.drain()?;
            if let Some(i) = self.irqs.iter().position(&pick) {
                if let Some(ev) = self.irqs.remove(i) {
                    return Ok(ev);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => match IrqEvent::parse(&line) {
                    Some(ev) => self.record(ev),
                    None => {
                        return Err(QtestError::Protocol {
                            command: format!("(waiting for {what})"),
                            line,
                        })
                    }
                },
                Err(RecvTimeoutError::Timeout) => return Err(QtestError::Timeout(timeout, what)),
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(QtestError::Disconnected(format!("waiting for {what}")))
                }
            }
        }
    }

    /// Wait for an MSI; its address and data.
    pub fn wait_msi(&mut self, timeout: Duration) -> Result<(u64, u32), QtestError> {
        match self.wait_for("an MSI".into(), timeout, |e| {
            matches!(e, IrqEvent::Msi { .. })
        })? {
            IrqEvent::Msi { address, data } => Ok((address, data)),
            _ => Err(QtestError::Timeout(timeout, "an MSI".into())),
        }
    }

    /// Wait for GSI `gsi` to be raised (a level going high, or the first half of an edge).
    pub fn wait_irq(&mut self, gsi: u32, timeout: Duration) -> Result<(), QtestError> {
        self.wait_for(format!("GSI {gsi} to be raised"), timeout, |e| {
            *e == IrqEvent::Raise(gsi)
        })
        .map(drop)
    }

    /// Close the qtest connection (the vmm then terminates itself); the vmm may still be
    /// waited for with [`Qtest::wait_exit`].
    pub fn disconnect(&mut self) -> Result<(), QtestError> {
        self.writer
            .shutdown(std::net::Shutdown::Both)
            .map_err(|source| QtestError::Io {
                what: "close the qtest socket",
                source,
            })
    }

    /// Wait for the vmm to exit on its own; its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, QtestError> {
        let child = self.child.as_mut().ok_or(QtestError::NotRunning)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().map_err(|source| QtestError::Io {
                what: "wait for the vmm",
                source,
            })? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(QtestError::Timeout(timeout, "the vmm to exit".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Qtest {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Accept the vmm's connection, giving up if it exits or takes too long.
fn accept(listener: &UnixListener, child: &mut Child) -> Result<UnixStream, QtestError> {
    listener
        .set_nonblocking(true)
        .map_err(|source| QtestError::Io {
            what: "make the listener non-blocking",
            source,
        })?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(|source| QtestError::Io {
                        what: "make the qtest socket blocking",
                        source,
                    })?;
                return Ok(stream);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(source) => {
                return Err(QtestError::Io {
                    what: "accept the vmm's connection",
                    source,
                })
            }
        }
        if let Some(status) = child.try_wait().map_err(|source| QtestError::Io {
            what: "wait for the vmm",
            source,
        })? {
            return Err(QtestError::VmmExited {
                status,
                stderr: String::new(),
            });
        }
        if Instant::now() >= deadline {
            return Err(QtestError::Timeout(
                CONNECT_TIMEOUT,
                "the vmm to connect".into(),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_lines_parse() {
        assert_eq!(IrqEvent::parse("IRQ raise 16"), Some(IrqEvent::Raise(16)));
        assert_eq!(IrqEvent::parse("IRQ lower 4"), Some(IrqEvent::Lower(4)));
        assert_eq!(
            IrqEvent::parse("IRQ msi 0xfee00000 0x4021"),
            Some(IrqEvent::Msi {
                address: 0xfee0_0000,
                data: 0x4021
            })
        );
        assert_eq!(IrqEvent::parse("IRQ msi 0xfee00000 0x100000000"), None);
        assert_eq!(IrqEvent::parse("OK"), None);
        assert_eq!(IrqEvent::parse("IRQ raise x"), None);
    }
}
