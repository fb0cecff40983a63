//! Devices shared by both accelerators.

pub mod acpi;
pub mod bochs_display;
pub mod bus;
pub mod debug_exit;
pub mod edid;
pub mod i8042;
pub mod interrupt;
pub mod pci_hotplug;
pub mod rtc;
pub mod serial;

pub use bus::{Bus, BusDevice, SharedDevice};
pub use interrupt::{IrqChip, IrqLine};
