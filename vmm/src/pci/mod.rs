//! PCI for the PC machine: one PCIe root bus (segment 0, bus 0) reached through both
//! configuration mechanism #1 (ports 0xcf8..0xcff) and ECAM, with BARs allocated by the bus
//! and routed over the machine's MMIO and PIO buses.
//!
//! Wiring, for the machine:
//! ```text
//! let pci = Arc::new(Mutex::new(PciBus::new(mmio.clone(), pio.clone(), mmio64, irq_chip)?));
//! pio.insert(Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))), 0xcf8, PCI_CONFIG_IO_LEN)?;
//! mmio.insert(Arc::new(Mutex::new(PciConfigMmio::new(pci.clone()))), ECAM start, ECAM size)?;
//! pci.lock().add_device(None, virtio_pci_device)?;
//! ```
//!
//! Lock order (see [`PciBus`]): config accessor → `PciBus` → `PciDevice` → the MMIO/PIO
//! `Bus`'s internal lock. BAR accesses take only `BarRouter` → `PciDevice`.

mod allocator;
pub mod bus;
pub mod config_access;
pub mod configuration;
pub mod device;
pub mod host_bridge;
#[cfg(test)]
pub(crate) mod test_util;

use std::sync::{Mutex, MutexGuard};

pub use allocator::PciWindow;
pub use bus::{
    PciBarReport, PciBus, PciDeviceInfo, PciError, HOST_BRIDGE_SLOT, PCI_IO_WINDOW,
    PCI_MMIO32_WINDOW, PCI_NUM_SLOTS,
};
pub use config_access::{PciConfigIo, PciConfigMmio, PCI_CONFIG_IO_LEN};
pub use configuration::{ConfigurationError, PciConfiguration, PciIdentity};
pub use device::{
    intx_gsi, BarReprogram, PciBar, PciBarKind, PciDevice, PciInterruptPin, PCI_NUM_BARS,
};
pub use host_bridge::PciHostBridge;

/// Lock a mutex, carrying on if a panicking thread poisoned it: device state stays usable,
/// as in `devices::bus`.
pub(crate) fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
