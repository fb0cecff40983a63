//! The receiving side (`-incoming URI`): a thread that takes the source's connection,
//! checks the header against this machine before it loads anything, writes RAM pages as
//! they come, keeps the device sections, and at the end marker has the machine (on its own
//! thread) take them. It answers the source on the return path: `OK`, or `ERR` and why.

use std::io::{BufReader, Write};

use super::disk::{self, chunk_len, DiskInfo, DiskIo, TransferBuffer, TRANSFER_CHUNKS};
use super::local::{self, LocalFds};
use super::ram::RamPages;
use super::stream::{Header, Record, StreamReader};
use super::uri::Incoming;
use super::MigrationError;

/// What the receiving thread asks of the machine.
pub trait DestinationHost: Send {
    /// Take every device's state; resume the guest if it ran on the source (and the
    /// destination was not started with -S).
    fn restore(&self, sections: Vec<(String, Vec<u8>)>, running: bool) -> Result<(), String>;
    /// Block migration: check the source's disks against ours (size, backing file), take
    /// their images' locks and mark them incomplete until the migration is done; their I/O.
    fn prepare_disks(&self, disks: Vec<DiskInfo>) -> Result<Vec<Box<dyn DiskIo>>, String>;
    /// Whether a local migration (`x-local`) may come in.
    fn local_allowed(&self) -> bool;
    /// A local migration's handoff: check what the source hands over against this VM and
    /// keep it for [`DestinationHost::restore`].
    fn prepare_local(&self, fds: LocalFds) -> Result<(), String>;
    /// The incoming migration failed: say why and end (QEMU's destination exits).
    fn failed(&self, message: String);
}

/// Everything the receiving thread works with.
pub struct IncomingMigration {
    pub incoming: Incoming,
    pub ram: RamPages,
    /// This machine's own header (`running` is not compared).
    pub expected: Header,
    pub host: Box<dyn DestinationHost>,
}

/// The receiving thread's body.
pub fn run(m: IncomingMigration) {
    let IncomingMigration {
        incoming,
        ram,
        expected,
        host,
    } = m;
    let mut channel = match incoming.accept() {
        Ok(c) => c,
        Err(e) => return host.failed(e.to_string()),
    };
    let Some(reader) = channel.reader.take() else {
        return host.failed("the migration channel cannot be read".into());
    };
    let result = accept_local(host.as_ref(), channel.unix.take()).and_then(|local| {
        receive(
            &ram,
            &expected,
            host.as_ref(),
            reader,
            &mut channel.writer,
            local,
        )
    });
    let reply = match &result {
        Ok(_) => "OK\n".to_string(),
        Err(e) => format!("ERR {}\n", e.to_string().replace('\n', " ")),
    };
    let _ = channel.writer.write_all(reply.as_bytes());
    let _ = channel.writer.flush();
    if let Some(mut child) = channel.child.take() {
        let _ = child.wait();
    }
    if let Err(e) = result {
        host.failed(format!("load of migration failed: {e}"));
    }
}

/// A local migration's handoff, if the source opens with one (on a unix socket): whether
/// it did.
fn accept_local(
    host: &dyn DestinationHost,
    socket: Option<std::os::unix::net::UnixStream>,
) -> Result<bool, MigrationError> {
    let Some(socket) = socket else {
        return Ok(false);
    };
    let local_err = |e: local::LocalError| MigrationError::Refused(e.to_string());
    if !local::offered(&socket).map_err(local_err)? {
        return Ok(false);
    }
    if !host.local_allowed() {
        return Err(MigrationError::Refused(
            "the source offers a local migration, but x-local is not set here".into(),
        ));
    }
    let fds = local::receive_offer(&socket).map_err(local_err)?;
    host.prepare_local(fds).map_err(MigrationError::Refused)?;
    Ok(true)
}

/// Compare the source's header with ours, naming the first difference.
pub fn check_header(got: &Header, want: &Header) -> Result<(), MigrationError> {
    let mismatch = |what: String| Err(MigrationError::Mismatch(what));
    if got.ram_size != want.ram_size {
        return mismatch(format!(
            "the source has {} MiB of RAM, this VM {} MiB",
            got.ram_size >> 20,
            want.ram_size >> 20
        ));
    }
    if got.vcpus != want.vcpus {
        return mismatch(format!(
            "the source has {} vCPUs, this VM {}",
            got.vcpus, want.vcpus
        ));
    }
    // emu and KVM share one machine model and a portable vCPU and platform state.
    let portable = |a: &str| a == "emu" || a == "kvm";
    if got.accel != want.accel && !(portable(&got.accel) && portable(&want.accel)) {
        return mismatch(format!(
            "the source runs under {}, this VM under {}",
            got.accel, want.accel
        ));
    }
    if got.devices != want.devices {
        let missing: Vec<_> = got
            .devices
            .iter()
            .filter(|d| !want.devices.contains(d))
            .collect();
        let extra: Vec<_> = want
            .devices
            .iter()
            .filter(|d| !got.devices.contains(d))
            .collect();
        return mismatch(format!(
            "devices differ (only on the source: {missing:?}; only here: {extra:?})"
        ));
    }
    Ok(())
}

/// What the destination says on the return path once it has accepted what the source
/// announced before its guest stops (the disks of a block migration, a local handoff).
pub const READY: &str = "READY";

fn receive(
    ram: &RamPages,
    expected: &Header,
    host: &dyn DestinationHost,
    reader: Box<dyn std::io::Read + Send>,
    reply: &mut dyn Write,
    local: bool,
) -> Result<(), MigrationError> {
    let mut r = StreamReader::new(BufReader::with_capacity(1 << 20, reader))?;
    let header = match r.next_record()? {
        Record::Header(h) => h,
        _ => {
            return Err(MigrationError::Mismatch(
                "the stream does not start with a header".into(),
            ))
        }
    };
    check_header(&header, expected)?;
    if local {
        // The source stops its guest once we say so.
        reply.write_all(format!("{READY}\n").as_bytes())?;
        reply.flush()?;
    }
    let mut sections = Vec::new();
    let mut disks: Option<IncomingDisks> = None;
    loop {
        match r.next_record()? {
            Record::Header(_) => {
                return Err(MigrationError::Mismatch("a second header".into()));
            }
            Record::Disks(infos) => {
                if disks.is_some() {
                    return Err(MigrationError::Mismatch("a second list of disks".into()));
                }
                let io = host
                    .prepare_disks(infos.clone())
                    .map_err(MigrationError::Refused)?;
                let buffer = TransferBuffer::new().map_err(MigrationError::Machine)?;
                disks = Some(IncomingDisks { infos, io, buffer });
                // The source waits for this before it sends a chunk (or stops its guest).
                reply.write_all(format!("{READY}\n").as_bytes())?;
                reply.flush()?;
            }
            Record::Disk {
                disk,
                first,
                chunks,
            } => {
                let Some(d) = disks.as_ref() else {
                    return Err(MigrationError::Mismatch(
                        "disk contents before the list of disks".into(),
                    ));
                };
                d.write(disk, first, chunks)?;
            }
            Record::Ram { first, pages } => {
                for (i, page) in pages.iter().enumerate() {
                    let p = first + i as u64;
                    let ok = match page {
                        Some(data) => ram.write(p, data),
                        None => ram.zero(p, 1),
                    };
                    if !ok {
                        return Err(MigrationError::Mismatch(format!(
                            "page {p} is outside this VM's RAM"
                        )));
                    }
                }
            }
            Record::Section { name, state } => sections.push((name, state)),
            Record::End => break,
        }
    }
    host.restore(sections, header.running)
        .map_err(MigrationError::Machine)
}

/// The disks of an incoming block migration.
struct IncomingDisks {
    infos: Vec<DiskInfo>,
    io: Vec<Box<dyn DiskIo>>,
    buffer: TransferBuffer,
}

impl IncomingDisks {
    /// Write chunks of disk `disk` from chunk `first` through its device process.
    fn write(
        &self,
        disk: u32,
        first: u64,
        chunks: Vec<Option<Vec<u8>>>,
    ) -> Result<(), MigrationError> {
        let bad = |why: String| MigrationError::Mismatch(why);
        let (Some(info), Some(io)) = (self.infos.get(disk as usize), self.io.get(disk as usize))
        else {
            return Err(bad(format!(
                "chunks of disk {disk}, which the source did not name"
            )));
        };
        if chunks.len() > TRANSFER_CHUNKS as usize {
            return Err(bad(format!("{} chunks in one record", chunks.len())));
        }
        let mut zero = Vec::with_capacity(chunks.len());
        for (i, chunk) in chunks.iter().enumerate() {
            let c = first.saturating_add(i as u64);
            let len = chunk_len(c, info.size);
            match chunk {
                Some(data) if data.len() as u64 == len => self.buffer.set_chunk(i, data),
                None if len > 0 => {}
                _ => {
                    return Err(bad(format!(
                        "chunk {c} of drive '{}' does not fit its {} bytes",
                        info.drive, info.size
                    )))
                }
            }
            zero.push(chunk.is_none());
        }
        disk::with_restarts(&|| false, || {
            io.write_chunks(self.buffer.fd(), first, zero.clone())
        })
        .map_err(|e| MigrationError::Machine(format!("drive '{}': {e}", info.drive)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(accel: &str) -> Header {
        Header {
            ram_size: 32 << 20,
            vcpus: 1,
            accel: accel.into(),
            devices: vec!["serial 0".into()],
            running: true,
        }
    }

    #[test]
    fn emu_and_kvm_load_each_other_and_nothing_else_differs() {
        assert!(check_header(&header("emu"), &header("kvm")).is_ok());
        assert!(check_header(&header("kvm"), &header("emu")).is_ok());
        let err = check_header(&header("qtest"), &header("emu")).unwrap_err();
        assert!(err.to_string().contains("runs under qtest"), "{err}");
        let mut other = header("kvm");
        other.vcpus = 2;
        assert!(check_header(&header("emu"), &other).is_err());
    }
}
