//! QEMU's `isa-debug-exit`: a guest write ends the VMM with status `(value << 1) | 1`,
//! which lets test guests report a result through the exit code.

use crate::control::{MachineControl, MachineRequest};
use crate::devices::bus::BusDevice;

/// QEMU's default I/O base of `isa-debug-exit` (hw/misc/debugexit.c).
pub const DEFAULT_IOBASE: u16 = 0x501;
/// QEMU's default size of the port range.
pub const DEFAULT_IOSIZE: u16 = 0x02;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DebugExitError {
    #[error("isa-debug-exit: unsupported property '{0}'")]
    UnknownProperty(String),
    #[error("isa-debug-exit: property '{name}' expects a number, not '{value}'")]
    InvalidNumber { name: String, value: String },
    #[error("isa-debug-exit: ports {base:#x}+{size:#x} do not fit in the I/O space")]
    InvalidRange { base: u32, size: u32 },
}

/// Parse the properties of `-device isa-debug-exit,iobase=0xf4,iosize=0x04` into
/// `(iobase, iosize)`. `opts` may start with the driver name or be only the properties;
/// numbers are C-style (`0x` hex, leading `0` octal, else decimal), as QEMU takes them.
pub fn parse_debug_exit_device(opts: &str) -> Result<(u16, u16), DebugExitError> {
    let mut base = u32::from(DEFAULT_IOBASE);
    let mut size = u32::from(DEFAULT_IOSIZE);
    for (i, part) in opts.split(',').enumerate() {
        if part.is_empty() || (i == 0 && part == "isa-debug-exit") {
            continue;
        }
        let (name, value) = part.split_once('=').unwrap_or((part, ""));
        let number = || {
            parse_c_number(value).ok_or_else(|| DebugExitError::InvalidNumber {
                name: name.to_string(),
                value: value.to_string(),
            })
        };
        match name {
            "iobase" => base = number()?,
            "iosize" => size = number()?,
            "id" => {}
            _ => return Err(DebugExitError::UnknownProperty(name.to_string())),
        }
    }
    if size == 0 || size > 0xffff || u64::from(base) + u64::from(size) > 0x1_0000 {
        return Err(DebugExitError::InvalidRange { base, size });
    }
    Ok((base as u16, size as u16))
}

/// A number as strtoul(base 0) reads it, limited to 32 bits.
fn parse_c_number(s: &str) -> Option<u32> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u32::from_str_radix(hex, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') {
        u32::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

/// The debug-exit port device. Place it on the I/O bus at `iobase` covering `iosize`.
pub struct DebugExit {
    control: MachineControl,
}

impl DebugExit {
    pub fn new(control: MachineControl) -> Self {
        Self { control }
    }
}

impl BusDevice for DebugExit {
    /// Reads return 0, as in QEMU 7.2.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// Any write, at any offset and of any size up to 4 bytes, is the exit value
    /// (little-endian; wider accesses keep the low 4 bytes).
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        self.control
            .request(MachineRequest::DebugExit(u32::from_le_bytes(bytes)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_request_debug_exit_with_the_value() {
        let (control, rx) = MachineControl::new();
        let mut dev = DebugExit::new(control);
        dev.write(0, &[0x10]);
        assert_eq!(rx.try_recv().unwrap(), MachineRequest::DebugExit(0x10));
        dev.write(0, &[0x34, 0x12]);
        assert_eq!(rx.try_recv().unwrap(), MachineRequest::DebugExit(0x1234));
        dev.write(1, &0xdead_beefu32.to_le_bytes());
        assert_eq!(
            rx.try_recv().unwrap(),
            MachineRequest::DebugExit(0xdead_beef)
        );
        assert!(rx.try_recv().is_err());
        let mut data = [0xaau8; 4];
        dev.read(0, &mut data);
        assert_eq!(data, [0; 4]);
        assert!(rx.try_recv().is_err(), "reads do not exit");
    }

    #[test]
    fn parses_device_properties() {
        assert_eq!(parse_debug_exit_device(""), Ok((0x501, 2)));
        assert_eq!(parse_debug_exit_device("isa-debug-exit"), Ok((0x501, 2)));
        assert_eq!(
            parse_debug_exit_device("isa-debug-exit,iobase=0xf4,iosize=0x04"),
            Ok((0xf4, 4))
        );
        assert_eq!(
            parse_debug_exit_device("iobase=244,iosize=4"),
            Ok((0xf4, 4))
        );
        assert_eq!(parse_debug_exit_device("iosize=010,id=x"), Ok((0x501, 8)));
        assert!(matches!(
            parse_debug_exit_device("iobase=0xzz"),
            Err(DebugExitError::InvalidNumber { .. })
        ));
        assert!(matches!(
            parse_debug_exit_device("bus=isa.0"),
            Err(DebugExitError::UnknownProperty(_))
        ));
        assert!(parse_debug_exit_device("iobase=0xffff,iosize=2").is_err());
        assert!(parse_debug_exit_device("iosize=0").is_err());
        assert_eq!(
            parse_debug_exit_device("iobase=0xffff,iosize=1"),
            Ok((0xffff, 1))
        );
    }
}
