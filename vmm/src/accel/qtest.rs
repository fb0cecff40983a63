//! The qtest accelerator: a machine with no CPU, driven by a test program over a socket, in
//! the spirit of QEMU's qtest. The test does what a guest driver would (port I/O, MMIO,
//! guest-memory reads and writes) and watches the interrupts the devices raise, so device
//! models can be tested without a guest OS.
//!
//! `-accel qtest -qtest unix:PATH` makes the vmm connect to a socket the test listens on
//! (as QEMU's libqtest does); `-qtest unix:PATH,server=on[,wait=off]` makes it listen
//! instead, and a bare `-qtest PATH` connects. No `-kernel` is needed: the machine starts
//! with nothing loaded. The vCPU threads exist but only wait to be kicked.
//!
//! # Protocol
//!
//! A subset of QEMU's qtest text protocol: one command per line; every command gets one
//! reply line, `OK` (with a value where there is one) or `FAIL <reason>`. Numbers are
//! `0x`-prefixed hex or decimal.
//!
//! | command | reply |
//! |---|---|
//! | `outb`/`outw`/`outl PORT VAL` | `OK` |
//! | `inb`/`inw`/`inl PORT` | `OK 0xVAL` |
//! | `writeb`/`writew`/`writel`/`writeq ADDR VAL` | `OK` |
//! | `readb`/`readw`/`readl`/`readq ADDR` | `OK 0xVAL` |
//! | `read ADDR SIZE` | `OK 0xHEX` (the bytes in address order) |
//! | `write ADDR SIZE 0xHEX` | `OK` (exactly `2*SIZE` hex digits) |
//! | `memset ADDR SIZE BYTE` | `OK` |
//! | `irq_intercept_in ioapic` | `OK`; from then on GSI level changes are reported |
//!
//! `ADDR` is a guest-physical address. An access that lies wholly in RAM reads or writes
//! guest memory; one that lies wholly outside RAM goes to the MMIO bus (the sized
//! `read*`/`write*` only: `read`, `write` and `memset` are for RAM); one that straddles the
//! end of RAM fails. Port and MMIO writes first meet the registered ioeventfds, as a guest's
//! writes would under KVM. `read`/`write`/`memset` move at most [`MAX_TRANSFER`] bytes.
//!
//! Asynchronous lines, which may come before the reply of the command that caused them:
//!
//! - `IRQ raise N` / `IRQ lower N`: GSI `N` changed level (after `irq_intercept_in`, as in
//!   QEMU; an irqfd's edge shows as a raise followed by a lower).
//! - `IRQ msi 0xADDR 0xDATA`: a device signalled a message-signalled interrupt (our own
//!   extension; always reported, no interception needed).
//!
//! When the test closes a client-mode connection the vmm terminates itself (SIGTERM), so a
//! test that dies does not leave its vmm behind; a listening vmm waits for the next client.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::eventfds::{IoEventTable, IrqFdRouter};
use super::{
    AccelError, AccelKind, Accelerator, IoEventAddress, IoHandler, PagingRegisters, Vcpu, VcpuExit,
    VcpuKicker,
};
use crate::arch::boot::EntryState;
use crate::arch::layout;
use crate::chardev::{self, ChardevSpec, SocketAddress};
use crate::devices::interrupt::{InterruptError, IrqChip};
use crate::memory::{GuestMemoryMmap, MemoryManager};

/// Most bytes one `read`, `write` or `memset` moves.
pub const MAX_TRANSFER: u64 = 16 << 20;
/// Longest command line accepted (a maximal `write` plus slack).
const MAX_LINE: u64 = 2 * MAX_TRANSFER + 256;
/// vCPUs the qtest machine accepts (they never run).
const QTEST_MAX_VCPUS: u32 = 255;

#[derive(Debug, thiserror::Error)]
pub enum QtestError {
    #[error("expected unix:PATH[,server=on[,wait=off]] or PATH")]
    BadEndpoint,
    #[error("-qtest: cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("-qtest: cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("-qtest: {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Where the qtest connection comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QtestEndpoint {
    /// Connect to a socket the test listens on (QEMU's libqtest way).
    Connect(PathBuf),
    /// Listen; with `wait`, accept the first client before the machine is built.
    Listen { path: PathBuf, wait: bool },
}

/// Parse the `-qtest` value: `unix:PATH[,server=on[,wait=off]]` or a bare `PATH`.
pub fn parse_endpoint(v: &str) -> Result<QtestEndpoint, QtestError> {
    let bad = || QtestError::BadEndpoint;
    let special = ["stdio", "pty", "null", "none"].contains(&v);
    if !v.contains(':') && !v.contains(',') && !v.is_empty() && !special {
        return Ok(QtestEndpoint::Connect(PathBuf::from(v)));
    }
    match chardev::parse_chardev(v).map_err(|_| bad())? {
        ChardevSpec::Socket {
            address: SocketAddress::Unix(path),
            server,
            wait,
            ..
        } => Ok(if server {
            QtestEndpoint::Listen { path, wait }
        } else {
            QtestEndpoint::Connect(path)
        }),
        _ => Err(bad()),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// State shared by the accelerator, its irqchip, the irqfd thread and the server thread.
struct Shared {
    /// Where replies and asynchronous lines go; None while no client is connected.
    out: Mutex<Option<Box<dyn Write + Send>>>,
    /// `irq_intercept_in` was given: report GSI level changes.
    intercept: AtomicBool,
    /// The last level of every GSI.
    levels: Mutex<Vec<bool>>,
    ioevents: IoEventTable,
}

impl Shared {
    fn new() -> Self {
        Self {
            out: Mutex::new(None),
            intercept: AtomicBool::new(false),
            levels: Mutex::new(vec![false; layout::IOAPIC_NUM_PINS as usize]),
            ioevents: IoEventTable::new(),
        }
    }

    /// Write one line (a newline is added) to the client, if there is one.
    fn send_line(&self, line: &str) {
        let mut out = lock(&self.out);
        if let Some(w) = out.as_mut() {
            let mut buf = Vec::with_capacity(line.len() + 1);
            buf.extend_from_slice(line.as_bytes());
            buf.push(b'\n');
            if let Err(e) = w.write_all(&buf).and_then(|()| w.flush()) {
                tracing::debug!("qtest: write to the client failed: {e}");
                *out = None;
            }
        }
    }

    fn set_level(&self, gsi: u32, level: bool) -> Result<(), InterruptError> {
        let mut levels = lock(&self.levels);
        let slot = levels
            .get_mut(gsi as usize)
            .ok_or(InterruptError::InvalidGsi(gsi))?;
        if *slot == level {
            return Ok(());
        }
        *slot = level;
        // Under the levels lock, so that lines about one GSI keep their order.
        if self.intercept.load(Ordering::SeqCst) {
            let what = if level { "raise" } else { "lower" };
            self.send_line(&format!("IRQ {what} {gsi}"));
        }
        Ok(())
    }
}

/// Device interrupt lines: levels are recorded and, once intercepted, reported.
struct QtestIrqChip(Arc<Shared>);

impl IrqChip for QtestIrqChip {
    fn set_irq_level(&self, gsi: u32, level: bool) -> Result<(), InterruptError> {
        self.0.set_level(gsi, level)
    }
}

/// The connection before the server thread takes it.
enum Pending {
    Stream(UnixStream),
    Listener(UnixListener, PathBuf),
}

pub struct QtestAccel {
    mem: GuestMemoryMmap,
    shared: Arc<Shared>,
    irqfds: IrqFdRouter,
    /// Taken by the first `create_vcpu`, which brings the buses the server needs.
    pending: Mutex<Option<Pending>>,
}

impl QtestAccel {
    /// Connect (or listen) as `endpoint` says; with None the machine has no test driving it.
    pub fn new(mem: &MemoryManager, endpoint: Option<&QtestEndpoint>) -> Result<Self, AccelError> {
        let shared = Arc::new(Shared::new());
        let weak = Arc::downgrade(&shared);
        let irqfds = IrqFdRouter::new(
            "qtest-irqfd",
            layout::IOAPIC_NUM_PINS,
            Arc::new(move |gsi| match weak.upgrade() {
                Some(s) => {
                    let _ = s.set_level(gsi, true);
                    let _ = s.set_level(gsi, false);
                    true
                }
                None => false,
            }),
        )
        .map_err(|e| AccelError::Qtest(e.to_string()))?;
        let pending = match endpoint {
            None => None,
            Some(ep) => Some(open_endpoint(ep).map_err(|e| AccelError::Qtest(e.to_string()))?),
        };
        Ok(Self {
            mem: mem.guest_memory().clone(),
            shared,
            irqfds,
            pending: Mutex::new(pending),
        })
    }

    fn start_server(&self, io: Arc<dyn IoHandler + Send>) -> Result<(), AccelError> {
        let Some(pending) = lock(&self.pending).take() else {
            return Ok(());
        };
        let server = Server {
            mem: self.mem.clone(),
            io,
            shared: self.shared.clone(),
        };
        std::thread::Builder::new()
            .name("qtest".into())
            .spawn(move || server.serve(pending))
            .map_err(|e| AccelError::Qtest(format!("start the qtest thread: {e}")))?;
        Ok(())
    }
}

fn open_endpoint(ep: &QtestEndpoint) -> Result<Pending, QtestError> {
    match ep {
        QtestEndpoint::Connect(path) => {
            UnixStream::connect(path)
                .map(Pending::Stream)
                .map_err(|source| QtestError::Connect {
                    path: path.clone(),
                    source,
                })
        }
        QtestEndpoint::Listen { path, wait } => {
            let listen_err = |source| QtestError::Listen {
                path: path.clone(),
                source,
            };
            // A socket file left over from an earlier run would make bind fail.
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                let _ = std::fs::remove_file(path);
            }
            let listener = UnixListener::bind(path).map_err(listen_err)?;
            if *wait {
                let (stream, _) = listener.accept().map_err(|source| QtestError::Io {
                    what: "accept the first client",
                    source,
                })?;
                return Ok(Pending::Stream(stream));
            }
            Ok(Pending::Listener(listener, path.clone()))
        }
    }
}

impl Accelerator for QtestAccel {
    fn kind(&self) -> AccelKind {
        AccelKind::Qtest
    }

    fn max_vcpus(&self) -> u32 {
        QTEST_MAX_VCPUS
    }

    fn create_vcpu(
        &self,
        id: u32,
        _num_vcpus: u32,
        io: Arc<dyn IoHandler + Send>,
    ) -> Result<Box<dyn Vcpu>, AccelError> {
        self.start_server(io)?;
        Ok(Box::new(QtestVcpu {
            id,
            kicker: Arc::new(QtestKicker::default()),
        }))
    }

    fn irq_chip(&self) -> Arc<dyn IrqChip> {
        Arc::new(QtestIrqChip(self.shared.clone()))
    }

    fn signal_msi(&self, address: u64, data: u32) -> Result<(), AccelError> {
        self.shared
            .send_line(&format!("IRQ msi {address:#x} {data:#x}"));
        Ok(())
    }

    fn reset(&self) -> Result<(), AccelError> {
        Ok(())
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), AccelError> {
        self.shared
            .ioevents
            .register(fd, addr, datamatch)
            .map_err(|e| AccelError::Qtest(e.to_string()))
    }

    fn unregister_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), AccelError> {
        self.shared
            .ioevents
            .unregister(fd, addr, datamatch)
            .map_err(|e| AccelError::Qtest(e.to_string()))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), AccelError> {
        self.irqfds
            .register(fd, gsi)
            .map_err(|e| AccelError::Qtest(e.to_string()))
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), AccelError> {
        self.irqfds
            .unregister(fd, gsi)
            .map_err(|e| AccelError::Qtest(e.to_string()))
    }
}

/// A kick is remembered until the next [`Vcpu::run`] takes it.
#[derive(Default)]
struct QtestKicker {
    kicked: Mutex<bool>,
    cv: Condvar,
}

impl VcpuKicker for QtestKicker {
    fn kick(&self) {
        *lock(&self.kicked) = true;
        self.cv.notify_all();
    }
    fn retire(&self) {}
}

/// A vCPU that never executes anything: it waits to be kicked.
struct QtestVcpu {
    id: u32,
    kicker: Arc<QtestKicker>,
}

impl Vcpu for QtestVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn reset(&mut self, _entry: Option<&EntryState>) -> Result<(), AccelError> {
        Ok(())
    }

    fn bind_to_current_thread(&mut self) {}

    fn run(&mut self, _io: &dyn IoHandler) -> Result<VcpuExit, AccelError> {
        let mut kicked = lock(&self.kicker.kicked);
        while !*kicked {
            kicked = self
                .kicker
                .cv
                .wait(kicked)
                .unwrap_or_else(|e| e.into_inner());
        }
        *kicked = false;
        Ok(VcpuExit::Interrupted)
    }

    fn kicker(&self) -> Arc<dyn VcpuKicker> {
        self.kicker.clone()
    }

    fn instruction_pointer(&mut self) -> Result<u64, AccelError> {
        Ok(0)
    }

    fn dump_registers(&mut self) -> String {
        "qtest: this vCPU has no register state\n".into()
    }

    fn is_halted(&mut self) -> bool {
        true
    }

    fn paging_registers(&mut self) -> Result<PagingRegisters, AccelError> {
        Ok(PagingRegisters::default())
    }
}

/// The command interpreter, on its own thread.
struct Server {
    mem: GuestMemoryMmap,
    io: Arc<dyn IoHandler + Send>,
    shared: Arc<Shared>,
}

/// Where a guest-physical range lies.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Ram,
    Mmio,
}

impl Server {
    fn serve(self, pending: Pending) {
        match pending {
            Pending::Stream(stream) => {
                self.serve_client(stream);
                // The test went away: end the vmm in the orderly way a signal does.
                tracing::info!("qtest: the client closed the connection; terminating");
                // SAFETY: kill on our own pid has no memory-safety preconditions.
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
            }
            Pending::Listener(listener, path) => loop {
                match listener.accept() {
                    Ok((stream, _)) => self.serve_client(stream),
                    Err(e) => {
                        tracing::warn!("qtest: accept on {}: {e}", path.display());
                        return;
                    }
                }
            },
        }
    }

    fn serve_client(&self, stream: UnixStream) {
        let writer = match stream.try_clone() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("qtest: duplicate the client socket: {e}");
                return;
            }
        };
        *lock(&self.shared.out) = Some(Box::new(writer));
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = match (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line) {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!("qtest: read from the client: {e}");
                    break;
                }
            };
            if n == 0 {
                break;
            }
            let reply = if line.last() != Some(&b'\n') && n as u64 == MAX_LINE {
                if !skip_to_newline(&mut reader) {
                    break;
                }
                format!("FAIL command longer than {MAX_LINE} bytes")
            } else {
                match std::str::from_utf8(&line) {
                    Ok(text) => self.execute(text.trim_end_matches(['\n', '\r'])),
                    Err(_) => "FAIL the command is not UTF-8".into(),
                }
            };
            self.shared.send_line(&reply);
        }
        *lock(&self.shared.out) = None;
        self.shared.intercept.store(false, Ordering::SeqCst);
    }

    /// Run one command; the reply line without its newline.
    fn execute(&self, line: &str) -> String {
        match self.command(line) {
            Ok(reply) => reply,
            Err(reason) => format!("FAIL {reason}"),
        }
    }

    fn command(&self, line: &str) -> Result<String, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&cmd, args)) = words.split_first() else {
            return Err("empty command".into());
        };
        let want = |n: usize| -> Result<(), String> {
            if args.len() == n {
                Ok(())
            } else {
                Err(format!(
                    "{cmd} takes {n} argument{}, got {}",
                    if n == 1 { "" } else { "s" },
                    args.len()
                ))
            }
        };
        match cmd {
            "outb" | "outw" | "outl" => {
                want(2)?;
                let size = access_size(cmd);
                let port = parse_port(args[0])?;
                let value = parse_value(args[1], size)?;
                let data = value.to_le_bytes();
                let data = &data[..size];
                if !self.shared.ioevents.signal(IoEventAddress::Pio(port), data) {
                    self.io.pio_write(port, data);
                }
                Ok("OK".into())
            }
            "inb" | "inw" | "inl" => {
                want(1)?;
                let size = access_size(cmd);
                let port = parse_port(args[0])?;
                let mut data = [0u8; 8];
                self.io.pio_read(port, &mut data[..size]);
                Ok(format!(
                    "OK {}",
                    format_value(u64::from_le_bytes(data), size)
                ))
            }
            "writeb" | "writew" | "writel" | "writeq" => {
                want(2)?;
                let size = access_size(cmd);
                let addr = parse_u64(args[0])?;
                let value = parse_value(args[1], size)?;
                let data = value.to_le_bytes();
                self.write_phys(addr, &data[..size])?;
                Ok("OK".into())
            }
            "readb" | "readw" | "readl" | "readq" => {
                want(1)?;
                let size = access_size(cmd);
                let addr = parse_u64(args[0])?;
                let mut data = [0u8; 8];
                self.read_phys(addr, &mut data[..size])?;
                Ok(format!(
                    "OK {}",
                    format_value(u64::from_le_bytes(data), size)
                ))
            }
            "read" => {
                want(2)?;
                let addr = parse_u64(args[0])?;
                let size = parse_transfer_size(args[1])?;
                self.require_ram(addr, size)?;
                let mut data = vec![0u8; size as usize];
                self.mem
                    .read_slice(&mut data, GuestAddress(addr))
                    .map_err(|e| format!("read {addr:#x}+{size:#x}: {e}"))?;
                let mut reply = String::with_capacity(5 + data.len() * 2);
                reply.push_str("OK 0x");
                for b in data {
                    reply.push_str(&format!("{b:02x}"));
                }
                Ok(reply)
            }
            "write" => {
                want(3)?;
                let addr = parse_u64(args[0])?;
                let size = parse_transfer_size(args[1])?;
                let data = parse_hex_bytes(args[2], size)?;
                self.require_ram(addr, size)?;
                self.mem
                    .write_slice(&data, GuestAddress(addr))
                    .map_err(|e| format!("write {addr:#x}+{size:#x}: {e}"))?;
                Ok("OK".into())
            }
            "memset" => {
                want(3)?;
                let addr = parse_u64(args[0])?;
                let size = parse_transfer_size(args[1])?;
                let byte = parse_value(args[2], 1)? as u8;
                self.require_ram(addr, size)?;
                let data = vec![byte; size as usize];
                self.mem
                    .write_slice(&data, GuestAddress(addr))
                    .map_err(|e| format!("memset {addr:#x}+{size:#x}: {e}"))?;
                Ok("OK".into())
            }
            "irq_intercept_in" => {
                want(1)?;
                let name = args[0];
                if name.rsplit('/').next() != Some("ioapic") {
                    return Err(format!(
                        "no interrupt controller '{name}' (this machine has 'ioapic')"
                    ));
                }
                self.shared.intercept.store(true, Ordering::SeqCst);
                Ok("OK".into())
            }
            other => Err(format!("unknown command '{other}'")),
        }
    }

    /// Is `[addr, addr+len)` wholly RAM, wholly outside it, or (an error) both?
    fn classify(&self, addr: u64, len: u64) -> Result<Target, String> {
        let end = addr
            .checked_add(len)
            .ok_or_else(|| format!("{addr:#x}+{len:#x} wraps around the address space"))?;
        if len == 0 || self.mem.check_range(GuestAddress(addr), len as usize) {
            return Ok(Target::Ram);
        }
        let touches_ram = self.mem.iter().any(|r| {
            let start = r.start_addr().0;
            start < end && addr < start.saturating_add(r.len())
        });
        if touches_ram {
            return Err(format!("{addr:#x}+{len:#x} is partly RAM and partly not"));
        }
        Ok(Target::Mmio)
    }

    fn require_ram(&self, addr: u64, len: u64) -> Result<(), String> {
        match self.classify(addr, len)? {
            Target::Ram => Ok(()),
            Target::Mmio => Err(format!("{addr:#x}+{len:#x} is not RAM")),
        }
    }

    fn read_phys(&self, addr: u64, data: &mut [u8]) -> Result<(), String> {
        match self.classify(addr, data.len() as u64)? {
            Target::Ram => self
                .mem
                .read_slice(data, GuestAddress(addr))
                .map_err(|e| format!("read {addr:#x}: {e}")),
            Target::Mmio => {
                self.io.mmio_read(addr, data);
                Ok(())
            }
        }
    }

    fn write_phys(&self, addr: u64, data: &[u8]) -> Result<(), String> {
        match self.classify(addr, data.len() as u64)? {
            Target::Ram => self
                .mem
                .write_slice(data, GuestAddress(addr))
                .map_err(|e| format!("write {addr:#x}: {e}")),
            Target::Mmio => {
                if !self
                    .shared
                    .ioevents
                    .signal(IoEventAddress::Mmio(addr), data)
                {
                    self.io.mmio_write(addr, data);
                }
                Ok(())
            }
        }
    }
}

/// Discard input up to and including the next newline; false at end of input or error.
fn skip_to_newline(reader: &mut impl BufRead) -> bool {
    loop {
        let (done, used) = match reader.fill_buf() {
            Ok([]) | Err(_) => return false,
            Ok(buf) => match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (true, i + 1),
                None => (false, buf.len()),
            },
        };
        reader.consume(used);
        if done {
            return true;
        }
    }
}

/// The access size a sized command's last letter names.
fn access_size(cmd: &str) -> usize {
    match cmd.as_bytes().last() {
        Some(b'w') => 2,
        Some(b'l') => 4,
        Some(b'q') => 8,
        _ => 1,
    }
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse::<u64>(),
    };
    parsed.map_err(|_| format!("'{s}' is not a number (use 0x hex or decimal)"))
}

fn parse_value(s: &str, size: usize) -> Result<u64, String> {
    let v = parse_u64(s)?;
    if size < 8 && v >> (size * 8) != 0 {
        return Err(format!("value {v:#x} does not fit in {size} byte(s)"));
    }
    Ok(v)
}

fn parse_port(s: &str) -> Result<u16, String> {
    let v = parse_u64(s)?;
    u16::try_from(v).map_err(|_| format!("port {v:#x} is above 0xffff"))
}

fn parse_transfer_size(s: &str) -> Result<u64, String> {
    let v = parse_u64(s)?;
    if v > MAX_TRANSFER {
        return Err(format!(
            "size {v:#x} is above the limit of {MAX_TRANSFER:#x}"
        ));
    }
    Ok(v)
}

fn parse_hex_bytes(s: &str, size: u64) -> Result<Vec<u8>, String> {
    let hex = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .ok_or_else(|| "data must start with 0x".to_string())?;
    if hex.len() as u64 != size * 2 {
        return Err(format!(
            "{} hex digits of data for a size of {size} (need {})",
            hex.len(),
            size * 2
        ));
    }
    hex.as_bytes()
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| "data is not hex".to_string())
        })
        .collect()
}

fn format_value(v: u64, size: usize) -> String {
    format!("0x{:0width$x}", v, width = size * 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A bus that records writes and answers reads with a fixed pattern.
    #[derive(Default)]
    struct FakeIo {
        writes: Mutex<Vec<(bool, u64, Vec<u8>)>>,
        reads: AtomicUsize,
    }

    impl IoHandler for FakeIo {
        fn pio_read(&self, port: u16, data: &mut [u8]) {
            self.reads.fetch_add(1, Ordering::SeqCst);
            for (i, b) in data.iter_mut().enumerate() {
                *b = (port as u8).wrapping_add(i as u8);
            }
        }
        fn pio_write(&self, port: u16, data: &[u8]) {
            lock(&self.writes).push((true, u64::from(port), data.to_vec()));
        }
        fn mmio_read(&self, addr: u64, data: &mut [u8]) {
            self.reads.fetch_add(1, Ordering::SeqCst);
            for (i, b) in data.iter_mut().enumerate() {
                *b = (addr as u8).wrapping_add(i as u8);
            }
        }
        fn mmio_write(&self, addr: u64, data: &[u8]) {
            lock(&self.writes).push((false, addr, data.to_vec()));
        }
    }

    /// Collects what the server sends.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn lines(&self) -> Vec<String> {
            String::from_utf8_lossy(&lock(&self.0))
                .lines()
                .map(str::to_string)
                .collect()
        }
    }

    fn server() -> (Server, Arc<FakeIo>, Sink) {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory");
        let io = Arc::new(FakeIo::default());
        let shared = Arc::new(Shared::new());
        let sink = Sink::default();
        *lock(&shared.out) = Some(Box::new(sink.clone()));
        (
            Server {
                mem,
                io: io.clone(),
                shared,
            },
            io,
            sink,
        )
    }

    #[test]
    fn memory_round_trip_and_formats() {
        let (s, _, _) = server();
        assert_eq!(s.execute("writel 0x1000 0xdeadbeef"), "OK");
        assert_eq!(s.execute("readl 0x1000"), "OK 0xdeadbeef");
        assert_eq!(s.execute("readw 0x1002"), "OK 0xdead");
        assert_eq!(s.execute("readb 4096"), "OK 0xef");
        assert_eq!(s.execute("read 0x1000 4"), "OK 0xefbeadde");
        assert_eq!(s.execute("write 0x2000 3 0x010203"), "OK");
        assert_eq!(s.execute("readq 0x2000"), "OK 0x0000000000030201");
        assert_eq!(s.execute("memset 0x2000 2 0xaa"), "OK");
        assert_eq!(s.execute("read 0x2000 4"), "OK 0xaaaa0300");
        assert_eq!(s.execute("read 0x2000 0"), "OK 0x");
    }

    #[test]
    fn mmio_and_pio_go_to_the_bus() {
        let (s, io, _) = server();
        assert_eq!(s.execute("writew 0xc0000000 0x1234"), "OK");
        assert_eq!(s.execute("outb 0x80 0x5"), "OK");
        assert_eq!(
            *lock(&io.writes),
            vec![
                (false, 0xc000_0000, vec![0x34, 0x12]),
                (true, 0x80, vec![5])
            ]
        );
        assert_eq!(s.execute("readl 0xc0000010"), "OK 0x13121110");
        assert_eq!(s.execute("inw 0x20"), "OK 0x2120");
    }

    #[test]
    fn bad_input_fails_without_panicking() {
        let (s, _, _) = server();
        for bad in [
            "",
            "bogus 1 2",
            "outb 0x80",
            "outb 0x10000 1",
            "outb 0x80 0x100",
            "writel 0x1000 zz",
            "read 0xffffffffffffffff 2",
            "read 0xffff0 0x20",
            "read 0x1000 0x7fffffffffffffff",
            "read 0xc0000000 4",
            "write 0x1000 2 0x01",
            "write 0x1000 2 0x0g00",
            "write 0x1000 2 0102",
            "memset 0x1000 1 0x100",
            "irq_intercept_in pic",
            "readq 0xffffc",
        ] {
            let reply = s.execute(bad);
            assert!(reply.starts_with("FAIL "), "{bad:?} gave {reply:?}");
        }
    }

    #[test]
    fn ioevents_take_matching_writes() {
        let (s, io, _) = server();
        let pio = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mmio = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        s.shared
            .ioevents
            .register(&pio, IoEventAddress::Pio(0x510), None)
            .unwrap();
        s.shared
            .ioevents
            .register(&mmio, IoEventAddress::Mmio(0xc000_1000), Some(3))
            .unwrap();
        assert_eq!(s.execute("outw 0x510 0x1"), "OK");
        assert_eq!(pio.read().unwrap(), 1);
        assert_eq!(s.execute("writel 0xc0001000 0x2"), "OK");
        assert!(mmio.read().is_err(), "datamatch 3 must not match 2");
        assert_eq!(s.execute("writel 0xc0001000 0x3"), "OK");
        assert_eq!(mmio.read().unwrap(), 1);
        // Only the non-matching write reached the bus.
        assert_eq!(
            *lock(&io.writes),
            vec![(false, 0xc000_1000, vec![2, 0, 0, 0])]
        );
    }

    #[test]
    fn irq_levels_are_reported_once_intercepted() {
        let (s, _, sink) = server();
        let chip = QtestIrqChip(s.shared.clone());
        chip.set_irq_level(4, true).unwrap();
        assert!(sink.lines().is_empty());
        assert_eq!(s.execute("irq_intercept_in ioapic"), "OK");
        chip.set_irq_level(4, true).unwrap();
        chip.set_irq_level(4, false).unwrap();
        chip.set_irq_level(16, true).unwrap();
        assert!(chip.set_irq_level(24, true).is_err());
        assert_eq!(sink.lines(), ["IRQ lower 4", "IRQ raise 16"]);
    }

    #[test]
    fn irqfd_and_msi_reach_the_client() {
        let mem = MemoryManager::new(4 << 20).unwrap();
        let accel = QtestAccel::new(&mem, None).unwrap();
        let sink = Sink::default();
        *lock(&accel.shared.out) = Some(Box::new(sink.clone()));
        accel.shared.intercept.store(true, Ordering::SeqCst);
        accel.signal_msi(0xfee0_0000, 0x4041).unwrap();
        let fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        accel.register_irqfd(&fd, 10).unwrap();
        fd.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while sink.lines().len() < 3 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            sink.lines(),
            ["IRQ msi 0xfee00000 0x4041", "IRQ raise 10", "IRQ lower 10"]
        );
    }

    #[test]
    fn kicked_vcpu_returns_interrupted() {
        let mut vcpu = QtestVcpu {
            id: 0,
            kicker: Arc::new(QtestKicker::default()),
        };
        let kicker = vcpu.kicker();
        kicker.kick();
        let io = FakeIo::default();
        assert_eq!(vcpu.run(&io).unwrap(), VcpuExit::Interrupted);
        let k2 = kicker.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            k2.kick();
        });
        assert_eq!(vcpu.run(&io).unwrap(), VcpuExit::Interrupted);
        t.join().unwrap();
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            parse_endpoint("unix:/tmp/q.sock").unwrap(),
            QtestEndpoint::Connect("/tmp/q.sock".into())
        );
        assert_eq!(
            parse_endpoint("/tmp/q.sock").unwrap(),
            QtestEndpoint::Connect("/tmp/q.sock".into())
        );
        assert_eq!(
            parse_endpoint("unix:/tmp/q.sock,server=on,wait=off").unwrap(),
            QtestEndpoint::Listen {
                path: "/tmp/q.sock".into(),
                wait: false
            }
        );
        assert!(parse_endpoint("tcp:localhost:4444").is_err());
        assert!(parse_endpoint("stdio").is_err());
        assert!(parse_endpoint("").is_err());
        assert!(parse_endpoint("file:/x").is_err());
    }
}
