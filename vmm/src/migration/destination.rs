//! The receiving side (`-incoming URI`): a thread that takes the source's connection,
//! checks the header against this machine before it loads anything, writes RAM pages as
//! they come, keeps the device sections, and at the end marker has the machine (on its own
//! thread) take them. It answers the source on the return path: `OK`, or `ERR` and why.

use std::io::{BufReader, Write};

use super::ram::RamPages;
use super::stream::{Header, Record, StreamReader};
use super::uri::Incoming;
use super::MigrationError;

/// What the receiving thread asks of the machine.
pub trait DestinationHost: Send {
    /// Take every device's state; resume the guest if it ran on the source (and the
    /// destination was not started with -S).
    fn restore(&self, sections: Vec<(String, Vec<u8>)>, running: bool) -> Result<(), String>;
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
    let result = receive(&ram, &expected, host.as_ref(), reader);
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

fn receive(
    ram: &RamPages,
    expected: &Header,
    host: &dyn DestinationHost,
    reader: Box<dyn std::io::Read + Send>,
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
    let mut sections = Vec::new();
    loop {
        match r.next_record()? {
            Record::Header(_) => {
                return Err(MigrationError::Mismatch("a second header".into()));
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
