//! What a PCI function must offer the bus: its configuration space, its BARs and its INTx pin.
//! virtio-pci, the host bridge and test devices all implement [`PciDevice`].

use crate::arch::layout;
use crate::devices::IrqLine;

/// Number of base address registers in a type-0 header.
pub const PCI_NUM_BARS: usize = 6;

/// The address space a BAR decodes, which decides both its register format and the window the
/// bus allocates it from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PciBarKind {
    /// Memory BAR anywhere below 4 GiB (one register).
    Mmio32,
    /// Memory BAR anywhere in the 64-bit space (two registers: this index and the next).
    Mmio64,
    /// I/O port BAR (one register, bit 0 set).
    Io,
}

impl PciBarKind {
    pub fn is_io(self) -> bool {
        self == PciBarKind::Io
    }

    /// How many of the six BAR registers this kind occupies.
    pub fn register_count(self) -> usize {
        match self {
            PciBarKind::Mmio64 => 2,
            PciBarKind::Mmio32 | PciBarKind::Io => 1,
        }
    }
}

/// One BAR a device implements: enough for the bus to allocate and route it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciBar {
    /// Register index 0..=5; a 64-bit BAR also uses `index + 1`.
    pub index: usize,
    pub kind: PciBarKind,
    /// Size in bytes: a power of two, at least 4 (I/O) or 16 (memory).
    pub size: u64,
    /// Memory BARs only: reads have no side effects.
    pub prefetchable: bool,
}

impl PciBar {
    /// Why this BAR cannot exist in a type-0 header, if it cannot.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.index >= PCI_NUM_BARS {
            return Err("the BAR index is not in 0..=5");
        }
        if self.index + self.kind.register_count() > PCI_NUM_BARS {
            return Err("a 64-bit BAR cannot start in the last BAR register");
        }
        if !self.size.is_power_of_two() {
            return Err("the size is not a power of two");
        }
        let (min, max) = match self.kind {
            PciBarKind::Io => (4, 0x1_0000),
            PciBarKind::Mmio32 => (16, 1 << 31),
            PciBarKind::Mmio64 => (16, 1 << 63),
        };
        if self.size < min {
            return Err("the size is below the minimum (4 bytes for I/O, 16 for memory)");
        }
        if self.size > max {
            return Err("the size is too large for the BAR kind");
        }
        if self.prefetchable && self.kind.is_io() {
            return Err("an I/O BAR cannot be prefetchable");
        }
        Ok(())
    }

    /// The BAR register indices (0..=5) this BAR occupies.
    pub fn registers(&self) -> std::ops::Range<usize> {
        self.index..self.index + self.kind.register_count()
    }
}

/// The legacy interrupt pin a function uses, as in the Interrupt Pin register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PciInterruptPin {
    #[default]
    None,
    IntA,
    IntB,
    IntC,
    IntD,
}

impl PciInterruptPin {
    /// Value of the Interrupt Pin register (0 = none, 1 = INTA ... 4 = INTD).
    pub fn register_value(self) -> u8 {
        match self {
            PciInterruptPin::None => 0,
            PciInterruptPin::IntA => 1,
            PciInterruptPin::IntB => 2,
            PciInterruptPin::IntC => 3,
            PciInterruptPin::IntD => 4,
        }
    }

    /// The inverse of [`register_value`](Self::register_value); out-of-range values are `None`.
    pub fn from_register(value: u8) -> Self {
        match value {
            1 => PciInterruptPin::IntA,
            2 => PciInterruptPin::IntB,
            3 => PciInterruptPin::IntC,
            4 => PciInterruptPin::IntD,
            _ => PciInterruptPin::None,
        }
    }

    /// 0 for INTA ... 3 for INTD, or `None` if the function has no pin.
    pub fn index(self) -> Option<u8> {
        self.register_value().checked_sub(1)
    }
}

/// The GSI that INTx pin `pin` (0 = INTA) of the device in `slot` of bus 0 is wired to.
///
/// The ACPI `_PRT` describes exactly this swizzle, so both must use this function.
pub fn intx_gsi(slot: u8, pin: u8) -> u32 {
    layout::PCI_INTX_GSI_BASE + (u32::from(slot) + u32::from(pin)) % layout::PCI_INTX_GSI_COUNT
}

/// A BAR the guest moved by writing its register, as reported by the device to the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarReprogram {
    pub index: usize,
    pub old_address: u64,
    pub new_address: u64,
}

/// A PCI function on our bus.
///
/// The bus calls these methods with its own lock held, so an implementation must never lock
/// the [`PciBus`](super::PciBus) (or call a config accessor) from inside them.
pub trait PciDevice: Send {
    /// The 32-bit configuration register `reg_idx` (byte offset `reg_idx * 4`, 0..1024).
    /// Registers that do not exist read as all ones.
    fn read_config_register(&mut self, reg_idx: usize) -> u32;

    /// A guest write of `data` (1 to 4 bytes) at byte `offset` inside register `reg_idx`.
    /// Returns the BAR the write moved, if it moved one, so the bus can re-route it. A write
    /// that only sizes a BAR (all ones) is not a move.
    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarReprogram>;

    /// The BARs this device implements. Read once, when the device is added to the bus.
    fn bars(&self) -> Vec<PciBar> {
        Vec::new()
    }

    /// A read at `offset` inside the BAR that is decoded at guest address `base`.
    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let _ = (base, offset);
        data.fill(0xff);
    }

    /// A write at `offset` inside the BAR that is decoded at guest address `base`.
    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
        let _ = (base, offset, data);
    }

    /// The bus started (`Some(address)`) or stopped (`None`) decoding BAR `index`; a device
    /// that registers ioeventfds or maps memory inside a BAR follows it here.
    fn bar_moved(&mut self, index: usize, mapped_at: Option<u64>) {
        let _ = (index, mapped_at);
    }

    /// The INTx pin this function uses.
    fn interrupt_pin(&self) -> PciInterruptPin {
        PciInterruptPin::None
    }

    /// Called once when the device is added, if it has an interrupt pin: the line its pin is
    /// wired to (see [`intx_gsi`]).
    fn assign_intx(&mut self, line: IrqLine) {
        let _ = line;
    }

    /// The device's `id=` from the command line, for `query-pci`.
    fn id(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intx_swizzle_matches_the_prt_formula() {
        assert_eq!(intx_gsi(0, 0), 16);
        assert_eq!(intx_gsi(3, 0), 19);
        assert_eq!(intx_gsi(3, 1), 20);
        assert_eq!(intx_gsi(7, 1), 16);
        assert_eq!(intx_gsi(31, 3), 16 + (34 % 8));
        for slot in 0..32 {
            for pin in 0..4 {
                let gsi = intx_gsi(slot, pin);
                assert!((16..24).contains(&gsi));
            }
        }
    }

    #[test]
    fn interrupt_pin_register_round_trip() {
        for pin in [
            PciInterruptPin::None,
            PciInterruptPin::IntA,
            PciInterruptPin::IntB,
            PciInterruptPin::IntC,
            PciInterruptPin::IntD,
        ] {
            assert_eq!(PciInterruptPin::from_register(pin.register_value()), pin);
        }
        assert_eq!(PciInterruptPin::IntA.index(), Some(0));
        assert_eq!(PciInterruptPin::IntD.index(), Some(3));
        assert_eq!(PciInterruptPin::None.index(), None);
        assert_eq!(PciInterruptPin::from_register(0xff), PciInterruptPin::None);
    }

    #[test]
    fn bar_checks() {
        let bar = |index, kind, size, prefetchable| PciBar {
            index,
            kind,
            size,
            prefetchable,
        };
        assert!(bar(0, PciBarKind::Mmio32, 0x1000, false).check().is_ok());
        assert!(bar(4, PciBarKind::Mmio64, 1 << 40, true).check().is_ok());
        assert!(bar(5, PciBarKind::Io, 4, false).check().is_ok());
        assert!(bar(6, PciBarKind::Io, 4, false).check().is_err());
        assert!(bar(5, PciBarKind::Mmio64, 0x1000, false).check().is_err());
        assert!(bar(0, PciBarKind::Mmio32, 0x1800, false).check().is_err());
        assert!(bar(0, PciBarKind::Mmio32, 8, false).check().is_err());
        assert!(bar(0, PciBarKind::Mmio32, 1 << 32, false).check().is_err());
        assert!(bar(0, PciBarKind::Io, 2, false).check().is_err());
        assert!(bar(0, PciBarKind::Io, 16, true).check().is_err());
        assert!(bar(0, PciBarKind::Io, 0, false).check().is_err());
        assert_eq!(bar(2, PciBarKind::Mmio64, 16, false).registers(), 2..4);
    }
}
