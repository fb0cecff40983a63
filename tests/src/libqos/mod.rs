//! Mini drivers for device tests under qtest, in the spirit of QEMU's libqos: PCI
//! enumeration and BAR assignment ([`pci`]), the virtio-pci modern transport ([`virtio`]),
//! split virtqueues in guest RAM ([`virtqueue`]) and virtio-blk requests and bring-up
//! ([`blk`]). They drive the machine through a [`Qtest`](crate::qtest::Qtest) exactly as a
//! guest driver would.

pub mod blk;
pub mod net;
pub mod pci;
pub mod virtio;
pub mod virtqueue;

use crate::qtest::{Qtest, QtestError};

/// What the virtqueue code needs of the machine: guest RAM and a 16-bit MMIO write (the
/// queue notification). [`Qtest`] implements it; unit tests use a simulated machine.
pub trait GuestAccess {
    fn mem_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), QtestError>;
    fn mem_write(&mut self, addr: u64, data: &[u8]) -> Result<(), QtestError>;
    fn mmio_write16(&mut self, addr: u64, value: u16) -> Result<(), QtestError>;
}

impl GuestAccess for Qtest {
    fn mem_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), QtestError> {
        let data = self.memread(addr, buf.len())?;
        buf.copy_from_slice(&data);
        Ok(())
    }
    fn mem_write(&mut self, addr: u64, data: &[u8]) -> Result<(), QtestError> {
        self.memwrite(addr, data)
    }
    fn mmio_write16(&mut self, addr: u64, value: u16) -> Result<(), QtestError> {
        self.writew(addr, value)
    }
}
