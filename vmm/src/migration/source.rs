//! The sending side: a thread that runs precopy while the guest runs, then asks the
//! machine (on its own thread) to stop and hand over its devices' state, sends the rest,
//! and waits for the destination's word before it calls the migration done.

use std::io::{BufWriter, Write};
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use qmp::EventSender;
use serde_json::{json, Map};

use super::destination::READY;
use super::disk::{self, chunk_len, runs, DiskInfo, SourceDisk, TransferBuffer, CHUNK_SIZE};
use super::local::{self, LocalFds};
use super::ram::{is_marked, is_zero, RamPages};
use super::stream::{Header, StreamWriter, MAX_RUN_PAGES, PAGE_SIZE};
use super::uri::{self, Channel, MigrationUri};
use super::{lock, Capabilities, MigrationError, Parameters, Progress, Status, RATE_PERIOD};
use crate::accel::Accelerator;

/// What the sending thread asks of the machine, which only its own thread may touch.
pub trait SourceHost: Send {
    /// Stop the guest (run state finish-migrate) and give every device's state as named
    /// sections.
    fn stop_and_save(&self) -> Result<Vec<(String, Vec<u8>)>, String>;
    /// The migration is over: completed (the source stays stopped, postmigrate), or not
    /// (dirty logging off, and the guest runs again if it was running).
    fn finish(&self, completed: bool);
    /// Slow the vCPUs down to `percent` of their time stolen (auto-converge); 0 to stop.
    fn throttle(&self, percent: u8);
    /// A local migration completed (its events sent): the guest lives on in the
    /// destination, and this process ends.
    fn handed_over(&self, downtime_us: u64);
}

/// Everything the sending thread works with.
pub struct Outgoing {
    /// Where to (connected by the thread: QEMU answers `migrate` before it connects).
    pub uri: MigrationUri,
    pub fd: Option<OwnedFd>,
    /// Where the thread leaves how to shut its connection down (migrate_cancel).
    pub shutdown: super::ShutdownSlot,
    pub ram: RamPages,
    pub accel: Arc<dyn Accelerator>,
    pub host: Box<dyn SourceHost>,
    pub header: Header,
    pub params: Arc<Mutex<Parameters>>,
    pub caps: Capabilities,
    pub progress: Arc<Mutex<Progress>>,
    pub cancel: Arc<std::sync::atomic::AtomicBool>,
    pub events: EventSender,
    /// The log the device processes write.
    pub device_log: Option<Arc<super::log::DeviceDirtyLog>>,
    /// Block migration: the disks whose contents go in the stream (none with shared
    /// storage).
    pub disks: Vec<SourceDisk>,
    /// Local migration (`x-local`): what is handed over as fds instead of being copied.
    pub local: Option<LocalFds>,
}

/// The sending thread's body: connect, run the migration and record how it ended.
pub fn run(mut o: Outgoing) {
    let started = Instant::now();
    event(&o, Status::Setup);
    let mut channel = None;
    let cancel = o.cancel.clone();
    let cancelled = move || cancel.load(Ordering::SeqCst);
    let local = o.local.is_some();
    let result = uri::connect(&o.uri, o.fd.take(), &cancelled)
        .map_err(MigrationError::from)
        .and_then(|mut c| {
            *lock(&o.shutdown) = c.shutdown.take();
            let result = migrate(&mut o, &mut c, started);
            channel = Some(c);
            result
        });
    *lock(&o.shutdown) = None;
    let cancelled = o.cancel.load(Ordering::SeqCst);
    let status = match &result {
        Ok(()) => Status::Completed,
        Err(_) if cancelled => Status::Cancelled,
        Err(_) => Status::Failed,
    };
    {
        let mut p = lock(&o.progress);
        p.status = status;
        p.total_time_ms = Some(started.elapsed().as_millis() as u64);
        if let Err(e) = &result {
            tracing::warn!("migration: {e}");
            if !cancelled {
                p.error = Some(e.to_string());
            }
        }
    }
    if let Some(mut child) = channel.and_then(|mut c| c.child.take()) {
        if status != Status::Completed {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
    o.host.throttle(0);
    o.host.finish(status == Status::Completed);
    event(&o, status);
    if local && status == Status::Completed {
        let downtime = lock(&o.progress).downtime_us.unwrap_or(0);
        o.host.handed_over(downtime);
    }
}

fn event(o: &Outgoing, status: Status) {
    if o.caps.events {
        let mut data = Map::new();
        data.insert("status".into(), json!(status.as_str()));
        o.events.emit("MIGRATION", Some(data));
    }
}

fn check_cancel(o: &Outgoing) -> Result<(), MigrationError> {
    if o.cancel.load(Ordering::SeqCst) {
        Err(MigrationError::Cancelled)
    } else {
        Ok(())
    }
}

/// Sends pages and keeps to the bandwidth limit.
struct Sender<'a> {
    w: StreamWriter<BufWriter<Box<dyn Write + Send>>>,
    ram: &'a RamPages,
    buf: Vec<[u8; PAGE_SIZE]>,
    window_start: Instant,
    window_bytes: u64,
    /// Bytes of disk records sent (the rest of the stream is RAM and state).
    disk_bytes: u64,
    /// The guest has stopped: what is left goes as fast as it can (as in QEMU, the limit
    /// is precopy's).
    unlimited: bool,
}

impl<'a> Sender<'a> {
    fn new(writer: Box<dyn Write + Send>, ram: &'a RamPages) -> Result<Self, MigrationError> {
        Ok(Sender {
            w: StreamWriter::new(BufWriter::with_capacity(1 << 20, writer))?,
            ram,
            buf: vec![[0u8; PAGE_SIZE]; MAX_RUN_PAGES as usize],
            window_start: Instant::now(),
            window_bytes: 0,
            disk_bytes: 0,
            unlimited: false,
        })
    }

    /// Send `count` pages from `first`; `allocated` says which may hold data (the others
    /// are holes, sent as zero without being read).
    fn run(
        &mut self,
        o: &Outgoing,
        first: u64,
        count: u64,
        allocated: Option<&[u64]>,
    ) -> Result<(), MigrationError> {
        let mut page = first;
        while page < first + count {
            let n = (first + count - page).min(u64::from(MAX_RUN_PAGES));
            let mut zero = vec![false; n as usize];
            for i in 0..n {
                let p = page + i;
                let holds_data = allocated.is_none_or(|bits| is_marked(bits, p));
                let buf = &mut self.buf[i as usize];
                zero[i as usize] = !holds_data || !self.ram.read(p, buf) || is_zero(buf);
            }
            let pages: Vec<Option<&[u8]>> = (0..n as usize)
                .map(|i| (!zero[i]).then_some(&self.buf[i][..]))
                .collect();
            let before = self.w.bytes;
            self.w.ram(page, &pages)?;
            let zeros = zero.iter().filter(|z| **z).count() as u64;
            {
                let mut p = lock(&o.progress);
                p.duplicate += zeros;
                p.normal += n - zeros;
                p.transferred = self.w.bytes - self.disk_bytes;
            }
            self.limit(o, self.w.bytes - before)?;
            page += n;
        }
        Ok(())
    }

    /// Every page set in `bits`, in runs.
    fn dirty(&mut self, o: &Outgoing, bits: &[u64]) -> Result<(), MigrationError> {
        let total = self.ram.count();
        let mut page = 0u64;
        while page < total {
            let set = |p: u64| is_marked(bits, p);
            if !set(page) {
                page += 1;
                continue;
            }
            let mut end = page + 1;
            while end < total && set(end) && end - page < u64::from(MAX_RUN_PAGES) {
                end += 1;
            }
            self.run(o, page, end - page, None)?;
            check_cancel(o)?;
            page = end;
        }
        Ok(())
    }

    /// Every disk's chunks marked since the last pass (the first pass: the bulk, what the
    /// processes marked when tracking started), read by its process and sent.
    fn disk_pass(&mut self, o: &Outgoing, buffer: &TransferBuffer) -> Result<(), MigrationError> {
        let cancelled = || o.cancel.load(Ordering::SeqCst);
        for (index, d) in o.disks.iter().enumerate() {
            let chunks = d.bitmap.take();
            let mut left = chunks.len() as u64;
            for (first, count) in runs(&chunks) {
                check_cancel(o)?;
                let drive = &d.info.drive;
                let zero =
                    disk::with_restarts(&cancelled, || d.io.read_chunks(buffer.fd(), first, count))
                        .map_err(|e| MigrationError::Machine(format!("drive '{drive}': {e}")))?;
                if zero.len() != count as usize {
                    return Err(MigrationError::Machine(format!(
                        "drive '{drive}': {} chunks read, {count} asked for",
                        zero.len()
                    )));
                }
                let data: Vec<Option<Vec<u8>>> = zero
                    .iter()
                    .enumerate()
                    .map(|(i, &z)| {
                        let len = chunk_len(first + i as u64, d.info.size) as usize;
                        (!z).then(|| buffer.chunk(i, len))
                    })
                    .collect();
                let refs: Vec<Option<&[u8]>> = data.iter().map(Option::as_deref).collect();
                let before = self.w.bytes;
                self.w.disk_chunks(index as u32, first, &refs)?;
                let sent = self.w.bytes - before;
                self.disk_bytes += sent;
                left -= u64::from(count);
                {
                    let mut p = lock(&o.progress);
                    p.disk_transferred = self.disk_bytes;
                    p.disk_remaining = (left + disk_dirty(o)) * CHUNK_SIZE;
                }
                self.limit(o, sent)?;
            }
        }
        lock(&o.progress).disk_remaining = disk_dirty(o) * CHUNK_SIZE;
        Ok(())
    }

    /// Sleep as long as the bandwidth limit wants after `sent` more bytes.
    fn limit(&mut self, o: &Outgoing, sent: u64) -> Result<(), MigrationError> {
        if self.unlimited {
            return check_cancel(o);
        }
        self.window_bytes += sent;
        let rate = lock(&o.params).max_bandwidth.max(1) as f64;
        let per_window = (rate * RATE_PERIOD.as_secs_f64()) as u64;
        if self.window_bytes >= per_window.max(PAGE_SIZE as u64) {
            // As long as the bytes of this window take at the limit (a record may hold
            // more than one window's worth).
            let due = std::time::Duration::from_secs_f64(self.window_bytes as f64 / rate);
            let elapsed = self.window_start.elapsed();
            if elapsed < due {
                std::thread::sleep(due - elapsed);
            }
            self.window_start = Instant::now();
            self.window_bytes = 0;
            check_cancel(o)?;
        }
        Ok(())
    }
}

/// Every writer's log since the last call, in one bitmap: the CPU's (the accelerator's)
/// and the vmm's own writes.
fn take_dirty(o: &Outgoing, ram: &RamPages) -> Result<Vec<u64>, MigrationError> {
    let mut bits = o
        .accel
        .take_dirty_log(ram.count() as usize)
        .map_err(|e| MigrationError::DirtyLog(e.to_string()))?;
    bits.resize(ram.count().div_ceil(64) as usize, 0);
    ram.take_vmm_dirty(&mut bits);
    if let Some(log) = &o.device_log {
        log.take(ram, &mut bits);
    }
    Ok(bits)
}

/// Chunks of every disk marked and not yet taken.
fn disk_dirty(o: &Outgoing) -> u64 {
    o.disks.iter().map(|d| d.bitmap.count()).sum()
}

/// The disk passes before RAM moves: the bulk pass, then passes over what the guest
/// wrote meanwhile until what is left would fit the downtime (or the guest writes as fast
/// as we send: the RAM passes go on sending it).
const MAX_DISK_PASSES: u32 = 5;

fn popcount(bits: &[u64]) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

fn migrate(
    o: &mut Outgoing,
    channel: &mut Channel,
    started: Instant,
) -> Result<(), MigrationError> {
    let writer = std::mem::replace(&mut channel.writer, Box::new(std::io::sink()));
    let mut reader = channel.reader.take();
    let sent = match o.local.take() {
        Some(fds) => send_local(o, fds, writer, reader.as_mut(), channel.unix.take()),
        None => send(o, writer, reader.as_mut(), started),
    };
    let sent = match (sent, reader.as_mut()) {
        // The destination stopped reading: it may have said why.
        (Err(MigrationError::Io(_) | MigrationError::Stream(_)), Some(r)) => {
            Err(match read_reply(r) {
                Ok(Some(why)) => MigrationError::Refused(why),
                _ => MigrationError::Refused("the destination closed the connection".into()),
            })
        }
        (other, _) => other,
    };
    let stopped = sent?;
    if let Some(reader) = reader.as_mut() {
        if let Some(why) = read_reply(reader)? {
            return Err(MigrationError::Refused(why));
        }
    } else if let Some(child) = channel.child.as_mut() {
        let status = child.wait()?;
        if !status.success() {
            return Err(MigrationError::Refused(format!(
                "the command exited with {status}"
            )));
        }
    }
    let mut p = lock(&o.progress);
    p.downtime_ms = Some(stopped.elapsed().as_millis() as u64);
    p.downtime_us = Some(stopped.elapsed().as_micros() as u64);
    p.remaining = 0;
    Ok(())
}

/// The destination's answer: None for OK, or why it refused.
fn read_reply(
    reader: &mut Box<dyn std::io::Read + Send>,
) -> Result<Option<String>, MigrationError> {
    expect_line(reader, "OK")
}

/// Read one line of the return path (byte by byte: nothing after it is consumed): None if
/// it is `want`, or why the destination refused.
fn expect_line(
    reader: &mut Box<dyn std::io::Read + Send>,
    want: &str,
) -> Result<Option<String>, MigrationError> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 4096 {
        if reader.read(&mut byte)? == 0 || byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&line);
    Ok(match line.trim_end() {
        l if l == want => None,
        "" => Some("the destination closed the connection".into()),
        other => Some(other.strip_prefix("ERR ").unwrap_or(other).to_string()),
    })
}

/// Name the disks whose contents follow, and (where the channel has a return path) wait
/// for the destination to accept them: a refusal comes before the guest stops. The
/// buffer their chunks go through.
fn announce_disks(
    o: &Outgoing,
    s: &mut Sender<'_>,
    reader: Option<&mut Box<dyn std::io::Read + Send>>,
) -> Result<TransferBuffer, MigrationError> {
    let infos: Vec<DiskInfo> = o.disks.iter().map(|d| d.info.clone()).collect();
    s.w.disks(&infos)?;
    s.w.flush()?;
    if let Some(reader) = reader {
        if let Some(why) = expect_line(reader, READY)? {
            return Err(MigrationError::Refused(why));
        }
    }
    TransferBuffer::new().map_err(MigrationError::Machine)
}

/// Local migration: hand the guest's memory and host resources over as fds, then (once
/// the destination has accepted them and our header) stop and send only the devices'
/// state. No page is copied. The instant the source stopped.
fn send_local(
    o: &mut Outgoing,
    fds: LocalFds,
    writer: Box<dyn Write + Send>,
    reader: Option<&mut Box<dyn std::io::Read + Send>>,
    socket: Option<std::os::unix::net::UnixStream>,
) -> Result<Instant, MigrationError> {
    let (Some(socket), Some(reader)) = (socket, reader) else {
        return Err(MigrationError::Machine(
            "a local migration (x-local) needs a unix socket".into(),
        ));
    };
    // A destination that refuses the offer closes while we send it: the error is an I/O
    // one, so that the caller reads the destination's reason.
    local::send_offer(&socket, &fds)
        .map_err(|e| MigrationError::Io(std::io::Error::other(e.to_string())))?;
    // Our copies of the fds: the originals stay with their devices until we exit.
    drop(fds);
    let ram = o.ram.clone();
    let mut s = Sender::new(writer, &ram)?;
    s.w.header(&o.header)?;
    s.w.flush()?;
    if let Some(why) = expect_line(reader, READY)? {
        return Err(MigrationError::Refused(why));
    }
    {
        let mut p = lock(&o.progress);
        p.status = Status::Active;
        p.total = ram.count() * PAGE_SIZE as u64;
    }
    event(o, Status::Active);
    check_cancel(o)?;
    let stopped = Instant::now();
    let sections = o.host.stop_and_save().map_err(MigrationError::Machine)?;
    let saved = stopped.elapsed();
    for (name, state) in &sections {
        s.w.section(name, state)?;
    }
    s.w.end()?;
    tracing::info!(
        "local migration: stopped and saved in {saved:?}, {} bytes of state sent in {:?}",
        s.w.bytes,
        stopped.elapsed() - saved
    );
    lock(&o.progress).transferred = s.w.bytes;
    drop(s);
    Ok(stopped)
}

/// Send the whole stream: precopy, then the stop and the rest. The instant the source
/// stopped (downtime counts from there).
fn send(
    o: &mut Outgoing,
    writer: Box<dyn Write + Send>,
    reader: Option<&mut Box<dyn std::io::Read + Send>>,
    started: Instant,
) -> Result<Instant, MigrationError> {
    let ram = o.ram.clone();
    let mut s = Sender::new(writer, &ram)?;
    s.w.header(&o.header)?;
    let buffer = if o.disks.is_empty() {
        None
    } else {
        Some(announce_disks(o, &mut s, reader)?)
    };
    {
        let mut p = lock(&o.progress);
        p.status = Status::Active;
        p.setup_time_ms = started.elapsed().as_millis() as u64;
        p.total = ram.count() * PAGE_SIZE as u64;
        p.remaining = p.total;
        p.block = buffer.is_some();
        p.disk_total = disk_dirty(o) * CHUNK_SIZE;
        p.disk_remaining = p.disk_total;
    }
    event(o, Status::Active);

    // The disks first: the bulk pass and passes over what the guest wrote meanwhile.
    if let Some(buffer) = &buffer {
        let disk_start = Instant::now();
        for _ in 0..MAX_DISK_PASSES {
            let t = Instant::now();
            let before = s.w.bytes;
            s.disk_pass(o, buffer)?;
            let bandwidth = (s.w.bytes - before) as f64 / t.elapsed().as_secs_f64().max(1e-3);
            let limit_ms = lock(&o.params).downtime_limit_ms as f64;
            if (disk_dirty(o) * CHUNK_SIZE) as f64 <= bandwidth * limit_ms / 1000.0 {
                break;
            }
        }
        tracing::info!(
            "block migration: {} MiB of disk records in {:?} before RAM",
            s.disk_bytes >> 20,
            disk_start.elapsed()
        );
    }

    // The bulk pass: every page (holes as zero pages, unread); the vmm's own log starts
    // clean with it.
    let pass_start = Instant::now();
    let mut discarded = ram.bitmap();
    ram.take_vmm_dirty(&mut discarded);
    if let Some(log) = &o.device_log {
        log.take(&ram, &mut discarded);
    }
    let allocated = ram.allocated();
    s.run(o, 0, ram.count(), Some(&allocated))?;
    let mut pass_bytes = s.w.bytes;
    let mut pass_time = pass_start.elapsed();
    let mut pass = 1u64;
    let mut throttle = 0u8;
    let mut fast_dirtying = 0;

    // Passes over what the guest wrote meanwhile, until the rest fits the downtime.
    let dirty = loop {
        check_cancel(o)?;
        if let Some(buffer) = &buffer {
            s.disk_pass(o, buffer)?;
        }
        let dirty = take_dirty(o, &ram)?;
        let remaining = popcount(&dirty) * PAGE_SIZE as u64 + disk_dirty(o) * CHUNK_SIZE;
        // Bytes per second the link carried in the last pass (at least one page's worth
        // in its time, so that an idle guest converges).
        let secs = pass_time.as_secs_f64().max(1e-3);
        let bandwidth = (pass_bytes as f64 / secs).max(1.0);
        let params = *lock(&o.params);
        let threshold = bandwidth * params.downtime_limit_ms as f64 / 1000.0;
        {
            let mut p = lock(&o.progress);
            p.dirty_sync_count = pass;
            p.remaining = remaining;
            p.dirty_pages_rate = (remaining as f64 / PAGE_SIZE as f64 / secs) as u64;
            p.mbps = bandwidth * 8.0 / 1e6;
            p.expected_downtime_ms = (remaining as f64 / bandwidth * 1000.0) as u64;
            p.transferred = s.w.bytes - s.disk_bytes;
        }
        if o.caps.events {
            let mut data = Map::new();
            data.insert("pass".into(), json!(pass));
            o.events.emit("MIGRATION_PASS", Some(data));
        }
        if (remaining as f64) <= threshold {
            break dirty;
        }
        // Auto-converge: the guest dirtied more than half of what went out, twice in a
        // row: steal more of its time (20% first, 10% more each step, 99% at most).
        if o.caps.auto_converge {
            if remaining * 2 > pass_bytes {
                fast_dirtying += 1;
            } else {
                fast_dirtying = 0;
            }
            if fast_dirtying >= 2 {
                throttle = if throttle == 0 {
                    20
                } else {
                    (throttle + 10).min(99)
                };
                fast_dirtying = 0;
                o.host.throttle(throttle);
                lock(&o.progress).cpu_throttle = throttle;
            }
        }
        let before = s.w.bytes;
        let t = Instant::now();
        s.dirty(o, &dirty)?;
        pass_bytes = s.w.bytes - before;
        pass_time = t.elapsed();
        pass += 1;
    };

    // Stop, send the rest and every device's state.
    check_cancel(o)?;
    let stopped = Instant::now();
    let sections = o.host.stop_and_save().map_err(MigrationError::Machine)?;
    s.unlimited = true;
    // The queues have stopped: the disks' last chunks.
    if let Some(buffer) = &buffer {
        s.disk_pass(o, buffer)?;
    }
    let disk_done = stopped.elapsed();
    let last = take_dirty(o, &ram)?;
    let both: Vec<u64> = dirty.iter().zip(&last).map(|(a, b)| a | b).collect();
    s.dirty(o, &both)?;
    for (name, state) in &sections {
        s.w.section(name, state)?;
    }
    s.w.end()?;
    tracing::info!(
        "stopped: the disks' last chunks by {disk_done:?}, {} pages of RAM and the state \
         by {:?}",
        popcount(&both),
        stopped.elapsed()
    );
    lock(&o.progress).transferred = s.w.bytes - s.disk_bytes;
    // The write half is done: exec's command sees the end of its input.
    drop(s);
    Ok(stopped)
}
