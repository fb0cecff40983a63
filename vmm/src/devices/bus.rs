//! The address buses that vCPU exits are dispatched through: one for port I/O and one for
//! MMIO. Both accelerators send every PIO and MMIO access here, so a device is written once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device that answers reads and writes on a range of a bus.
///
/// `offset` is relative to the start of the range the device was inserted at, so one device
/// type can be placed at any base. Accesses are 1, 2, 4 or 8 bytes, little-endian.
pub trait BusDevice: Send {
    /// Fill `data` with the value read at `offset`. Unhandled reads should leave `data` as
    /// all ones, which is what a PC returns for an unclaimed address.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handle a write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range at {0:#x} has zero length or wraps around")]
    InvalidRange(u64),
    #[error("no device at {0:#x}")]
    NotFound(u64),
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// An address space of devices, each covering `[base, base + len)`.
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Insert `device` at `[base, base + len)`. Ranges may not overlap.
    pub fn insert(&self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange(base));
        }
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        let overlaps_prev = devices
            .range(..=base)
            .next_back()
            .is_some_and(|(b, e)| b + (e.len - 1) >= base);
        let overlaps_next = devices
            .range(base..)
            .next()
            .is_some_and(|(b, _)| *b <= base + (len - 1));
        if overlaps_prev || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        devices.insert(base, Entry { len, device });
        Ok(())
    }

    /// Remove the device whose range starts at `base`.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        let mut devices = self.devices.write().unwrap_or_else(|e| e.into_inner());
        devices
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    /// The device covering `addr`, with the offset of `addr` inside its range.
    fn resolve(&self, addr: u64) -> Option<(SharedDevice, u64)> {
        let devices = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (base, entry) = devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then(|| (entry.device.clone(), offset))
    }

    /// Dispatch a read. Returns false (and fills `data` with ones) if nothing is mapped.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatch a write. Returns false if nothing is mapped (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((dev, offset)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo {
        last: Vec<u8>,
        last_offset: u64,
    }

    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = data.to_vec();
            self.last_offset = offset;
        }
    }

    fn echo() -> Arc<Mutex<Echo>> {
        Arc::new(Mutex::new(Echo {
            last: vec![],
            last_offset: 0,
        }))
    }

    #[test]
    fn dispatch_by_range_with_offsets() {
        let bus = Bus::new();
        let dev = echo();
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        let mut data = [0u8; 2];
        assert!(bus.read(0x105, &mut data));
        assert_eq!(data, [5, 5]);
        assert!(bus.write(0x10f, &[1, 2, 3, 4]));
        assert_eq!(dev.lock().unwrap().last, vec![1, 2, 3, 4]);
        assert_eq!(dev.lock().unwrap().last_offset, 0xf);
        assert!(!bus.read(0x110, &mut data));
        assert_eq!(data, [0xff, 0xff]);
        assert!(!bus.write(0xff, &[0]));
    }

    #[test]
    fn overlaps_are_refused() {
        let bus = Bus::new();
        bus.insert(echo(), 0x100, 0x10).unwrap();
        assert!(bus.insert(echo(), 0x10f, 1).is_err());
        assert!(bus.insert(echo(), 0xf0, 0x11).is_err());
        assert!(bus.insert(echo(), 0x0, 0x1000).is_err());
        bus.insert(echo(), 0x110, 1).unwrap();
        bus.insert(echo(), 0xf0, 0x10).unwrap();
        assert!(bus.insert(echo(), 0, 0).is_err());
        assert!(bus.insert(echo(), u64::MAX, 2).is_err());
        bus.insert(echo(), u64::MAX, 1).unwrap();
    }

    #[test]
    fn remove_frees_the_range() {
        let bus = Bus::new();
        bus.insert(echo(), 0x100, 0x10).unwrap();
        bus.remove(0x100).unwrap();
        assert!(bus.remove(0x100).is_err());
        assert!(!bus.write(0x100, &[0]));
        bus.insert(echo(), 0x100, 0x10).unwrap();
    }
}
