//! PCI bus 0 of segment 0: 32 slots (function 0 only), BAR allocation and BAR routing.
//!
//! The bus owns the mapping between BARs and the machine's MMIO and PIO [`Bus`]es: it places
//! each BAR of a new device, registers a [`BarRouter`] for it, and re-registers it whenever a
//! config write moves a BAR or flips the command register's decode bits.

use std::sync::{Arc, Mutex};

use super::allocator::{first_fit, PciWindow};
use super::configuration::{
    BAR0_REG, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, COMMAND_REG, INTERRUPT_REG,
    NUM_CONFIG_REGISTERS,
};
use super::device::{intx_gsi, PciBar, PciBarKind, PciDevice, PCI_NUM_BARS};
use super::host_bridge::PciHostBridge;
use super::lock;
use crate::arch::layout;
use crate::devices::bus::BusError;
use crate::devices::{Bus, BusDevice, IrqChip, IrqLine};

/// Device numbers on one bus.
pub const PCI_NUM_SLOTS: u8 = 32;
/// The host bridge's slot.
pub const HOST_BRIDGE_SLOT: u8 = 0;
/// 32-bit memory window for BARs.
pub const PCI_MMIO32_WINDOW: PciWindow =
    PciWindow::new(layout::PCI_MMIO32_START.0, layout::PCI_MMIO32_SIZE);
/// I/O port window for BARs: clear of every legacy PC port and of 0xcf8..0xcff.
pub const PCI_IO_WINDOW: PciWindow = PciWindow::new(0xc000, 0x4000);
/// One past the last I/O port.
const IO_SPACE_END: u64 = 0x1_0000;
const ALL_ONES: u32 = 0xffff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("PCI slot {0} does not exist (bus 0 has slots 0..=31)")]
    InvalidSlot(u8),
    #[error("PCI slot {0} is already in use")]
    SlotInUse(u8),
    #[error("no free PCI slot on bus 0")]
    NoFreeSlot,
    #[error("PCI slot {0} is empty")]
    SlotEmpty(u8),
    #[error("PCI slot 0 holds the host bridge, which cannot be removed")]
    HostBridgeRemoval,
    #[error("the {name} PCI window {start:#x}+{size:#x} is empty or wraps around")]
    InvalidWindow {
        name: &'static str,
        start: u64,
        size: u64,
    },
    #[error("PCI device for slot {slot}: invalid BAR {index}: {reason}")]
    InvalidBar {
        slot: u8,
        index: usize,
        reason: &'static str,
    },
    #[error("PCI device for slot {slot}: no room for {kind:?} BAR {index} of {size:#x} bytes")]
    BarAllocation {
        slot: u8,
        index: usize,
        kind: PciBarKind,
        size: u64,
    },
    #[error("PCI device in slot {slot}: mapping BAR {index} at {address:#x} failed: {source}")]
    MapBar {
        slot: u8,
        index: usize,
        address: u64,
        #[source]
        source: BusError,
    },
}

/// Forwards accesses to one BAR's range on the MMIO or PIO bus to its device.
struct BarRouter {
    device: Arc<Mutex<dyn PciDevice>>,
    base: u64,
}

impl BusDevice for BarRouter {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.device).read_bar(self.base, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.device).write_bar(self.base, offset, data);
    }
}

/// The bus's view of one BAR of a device.
struct BarState {
    bar: PciBar,
    /// The address programmed into the BAR (as the device last reported it).
    address: u64,
    /// Where the BAR is registered on the MMIO or PIO bus, if it is decoded.
    mapped_at: Option<u64>,
    /// The last address that could not be mapped, so each failure is logged once.
    failed_at: Option<u64>,
}

impl BarState {
    /// Where the BAR should be decoded given the command register, or `None`.
    fn wanted_mapping(&self, command: u16) -> Option<u64> {
        let enabled = match self.bar.kind {
            PciBarKind::Io => command & COMMAND_IO_SPACE != 0,
            PciBarKind::Mmio32 | PciBarKind::Mmio64 => command & COMMAND_MEMORY_SPACE != 0,
        };
        // Address 0 means "unassigned", as in QEMU; a range past the end of its address space
        // (a half-programmed or bogus value) is not decoded either.
        let limit = match self.bar.kind {
            PciBarKind::Io => IO_SPACE_END,
            PciBarKind::Mmio32 => 1 << 32,
            PciBarKind::Mmio64 => u64::MAX,
        };
        let fits = self
            .address
            .checked_add(self.bar.size)
            .is_some_and(|end| end <= limit);
        (enabled && self.address != 0 && fits).then_some(self.address)
    }
}

struct PciSlot {
    device: Arc<Mutex<dyn PciDevice>>,
    bars: Vec<BarState>,
}

/// One BAR as `query-pci` / `info pci` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciBarReport {
    pub index: usize,
    pub kind: PciBarKind,
    pub prefetchable: bool,
    pub size: u64,
    /// The address programmed into the BAR.
    pub address: u64,
    /// Where the BAR is decoded, or `None` if decoding is off or failed.
    pub mapped_at: Option<u64>,
}

/// One function as `query-pci` / `info pci` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDeviceInfo {
    pub bus: u8,
    pub slot: u8,
    pub function: u8,
    pub vendor_id: u16,
    pub device_id: u16,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    pub revision: u8,
    pub class_code: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub header_type: u8,
    /// Interrupt Line register (the GSI, as programmed by the bus).
    pub irq_line: u8,
    /// Interrupt Pin register: 0 = none, 1 = INTA ... 4 = INTD.
    pub irq_pin: u8,
    /// The device's `id=`.
    pub id: Option<String>,
    pub bars: Vec<PciBarReport>,
}

/// PCI bus 0. Shared as `Arc<Mutex<PciBus>>` by the config accessors and the machine.
///
/// Lock order: `PciConfigIo`/`PciConfigMmio` → `PciBus` → a `PciDevice` → the MMIO/PIO
/// `Bus`'s internal lock. A BAR access takes `BarRouter` → `PciDevice` only, and the `Bus`
/// never holds its lock while calling into a device, so a config write that moves a BAR
/// cannot deadlock with a vCPU accessing that BAR. Devices must never lock the `PciBus`.
pub struct PciBus {
    slots: Vec<Option<PciSlot>>,
    mmio_bus: Arc<Bus>,
    pio_bus: Arc<Bus>,
    mmio32_window: PciWindow,
    mmio64_window: PciWindow,
    io_window: PciWindow,
    irq_chip: Arc<dyn IrqChip>,
    host_bridge: Option<Arc<Mutex<PciHostBridge>>>,
}

impl PciBus {
    /// A bus with the host bridge in slot 0. 32-bit BARs come from [`PCI_MMIO32_WINDOW`],
    /// I/O BARs from [`PCI_IO_WINDOW`], 64-bit BARs from `mmio64_window` (falling back to the
    /// 32-bit window when it is full). INTx lines are raised through `irq_chip`.
    pub fn new(
        mmio_bus: Arc<Bus>,
        pio_bus: Arc<Bus>,
        mmio64_window: PciWindow,
        irq_chip: Arc<dyn IrqChip>,
    ) -> Result<Self, PciError> {
        if mmio64_window.last().is_none() {
            return Err(PciError::InvalidWindow {
                name: "64-bit",
                start: mmio64_window.start,
                size: mmio64_window.size,
            });
        }
        let mut slots = Vec::with_capacity(PCI_NUM_SLOTS.into());
        slots.resize_with(PCI_NUM_SLOTS.into(), || None);
        let mut bus = Self {
            slots,
            mmio_bus,
            pio_bus,
            mmio32_window: PCI_MMIO32_WINDOW,
            mmio64_window,
            io_window: PCI_IO_WINDOW,
            irq_chip,
            host_bridge: None,
        };
        let bridge = Arc::new(Mutex::new(PciHostBridge::new()));
        bus.add_device(Some(HOST_BRIDGE_SLOT), bridge.clone())?;
        bus.host_bridge = Some(bridge);
        Ok(bus)
    }

    /// The host bridge (slot 0), whose configuration moves with the guest.
    pub fn host_bridge(&self) -> Option<Arc<Mutex<PciHostBridge>>> {
        self.host_bridge.clone()
    }

    /// Plug `device` into `slot` (or the first free slot), place and program its BARs, wire
    /// its INTx pin, enable decoding as firmware would, and route its BARs. Returns the slot.
    pub fn add_device(
        &mut self,
        slot: Option<u8>,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<u8, PciError> {
        let slot = match slot {
            Some(slot) if slot >= PCI_NUM_SLOTS => return Err(PciError::InvalidSlot(slot)),
            Some(slot) if self.slots[usize::from(slot)].is_some() => {
                return Err(PciError::SlotInUse(slot))
            }
            Some(slot) => slot,
            None => self
                .slots
                .iter()
                .position(Option::is_none)
                .map(|s| s as u8)
                .ok_or(PciError::NoFreeSlot)?,
        };

        let (bars, pin) = {
            let device = lock(&device);
            (device.bars(), device.interrupt_pin())
        };
        self.check_bars(slot, &bars)?;

        // Place every BAR before touching the device, so a failure leaves it untouched.
        let mut placed: Vec<BarState> = Vec::with_capacity(bars.len());
        for bar in bars {
            let address = self
                .allocate(&bar, &placed)
                .ok_or(PciError::BarAllocation {
                    slot,
                    index: bar.index,
                    kind: bar.kind,
                    size: bar.size,
                })?;
            placed.push(BarState {
                bar,
                address,
                mapped_at: None,
                failed_at: None,
            });
        }

        {
            let mut dev = lock(&device);
            let mut decode = 0u16;
            for state in &placed {
                let reg = BAR0_REG + state.bar.index;
                let _ = dev.write_config_register(reg, 0, &(state.address as u32).to_le_bytes());
                if state.bar.kind == PciBarKind::Mmio64 {
                    let high = ((state.address >> 32) as u32).to_le_bytes();
                    let _ = dev.write_config_register(reg + 1, 0, &high);
                }
                decode |= match state.bar.kind {
                    PciBarKind::Io => COMMAND_IO_SPACE,
                    PciBarKind::Mmio32 | PciBarKind::Mmio64 => COMMAND_MEMORY_SPACE,
                };
            }
            if let Some(pin) = pin.index() {
                let gsi = intx_gsi(slot, pin);
                // The line register is only informational for the guest; it is a byte.
                let _ = dev.write_config_register(INTERRUPT_REG, 0, &[gsi as u8]);
                dev.assign_intx(IrqLine::new(self.irq_chip.clone(), gsi));
            }
            if decode != 0 {
                let command = dev.read_config_register(COMMAND_REG) as u16 | decode;
                let _ = dev.write_config_register(COMMAND_REG, 0, &command.to_le_bytes());
            }
        }

        self.slots[usize::from(slot)] = Some(PciSlot {
            device,
            bars: placed,
        });
        if let Err(e) = self.update_mappings(slot, true) {
            self.detach(slot);
            return Err(e);
        }
        Ok(slot)
    }

    /// Unplug the device in `slot`: its BARs stop being decoded and the slot and its address
    /// ranges become free. Returns the device.
    pub fn remove_device(&mut self, slot: u8) -> Result<Arc<Mutex<dyn PciDevice>>, PciError> {
        if slot >= PCI_NUM_SLOTS {
            return Err(PciError::InvalidSlot(slot));
        }
        if slot == HOST_BRIDGE_SLOT {
            return Err(PciError::HostBridgeRemoval);
        }
        self.detach(slot).ok_or(PciError::SlotEmpty(slot))
    }

    /// The device in `slot`, if any.
    pub fn device(&self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        let entry = self.slots.get(usize::from(slot))?.as_ref()?;
        Some(entry.device.clone())
    }

    /// A configuration read of register `reg_idx` of bus:slot.function; all ones for
    /// anything absent.
    pub fn read_config(&self, bus: u8, slot: u8, function: u8, reg_idx: usize) -> u32 {
        if bus != 0 || function != 0 || reg_idx >= NUM_CONFIG_REGISTERS {
            return ALL_ONES;
        }
        match self.slots.get(usize::from(slot)) {
            Some(Some(entry)) => lock(&entry.device).read_config_register(reg_idx),
            _ => ALL_ONES,
        }
    }

    /// A configuration write of `data` at byte `offset` of register `reg_idx`; follows any
    /// BAR move or decode change it causes.
    pub fn write_config(
        &mut self,
        bus: u8,
        slot: u8,
        function: u8,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) {
        if bus != 0 || function != 0 || reg_idx >= NUM_CONFIG_REGISTERS {
            return;
        }
        let Some(Some(entry)) = self.slots.get_mut(usize::from(slot)) else {
            return;
        };
        let moved = lock(&entry.device).write_config_register(reg_idx, offset, data);
        if let Some(moved) = moved {
            match entry.bars.iter_mut().find(|b| b.bar.index == moved.index) {
                Some(state) => state.address = moved.new_address,
                None => tracing::warn!(
                    slot,
                    index = moved.index,
                    "PCI device reported a move of a BAR it did not declare"
                ),
            }
        }
        if moved.is_some() || reg_idx == COMMAND_REG {
            // Not strict, so this cannot fail: unmappable BARs are logged and left unmapped.
            let _ = self.update_mappings(slot, false);
        }
    }

    /// Route every device's BARs where its configuration space now says (after a
    /// migration restored the registers behind the bus's back).
    pub fn reroute_all(&mut self) {
        let slots: Vec<u8> = (0..self.slots.len() as u8).collect();
        for slot in slots {
            let Some(Some(entry)) = self.slots.get_mut(usize::from(slot)) else {
                continue;
            };
            {
                let mut device = lock(&entry.device);
                for state in &mut entry.bars {
                    let reg = BAR0_REG + state.bar.index;
                    let low = u64::from(device.read_config_register(reg));
                    state.address = match state.bar.kind {
                        PciBarKind::Io => low & !0x3,
                        PciBarKind::Mmio32 => low & !0xf,
                        PciBarKind::Mmio64 => {
                            let high = u64::from(device.read_config_register(reg + 1));
                            (high << 32) | (low & !0xf)
                        }
                    };
                }
            }
            let _ = self.update_mappings(slot, false);
        }
    }

    /// Every device on the bus, for `query-pci` / `info pci`.
    pub fn pci_info(&self) -> Vec<PciDeviceInfo> {
        let mut list = Vec::new();
        for (slot, entry) in self.slots.iter().enumerate() {
            let Some(entry) = entry else { continue };
            let mut device = lock(&entry.device);
            let ids = device.read_config_register(0);
            let class = device.read_config_register(2);
            let header = device.read_config_register(3);
            let subsystem = device.read_config_register(0xb);
            let interrupt = device.read_config_register(INTERRUPT_REG);
            let id = device.id();
            drop(device);
            list.push(PciDeviceInfo {
                bus: 0,
                slot: slot as u8,
                function: 0,
                vendor_id: ids as u16,
                device_id: (ids >> 16) as u16,
                subsystem_vendor_id: subsystem as u16,
                subsystem_id: (subsystem >> 16) as u16,
                revision: class as u8,
                prog_if: (class >> 8) as u8,
                subclass: (class >> 16) as u8,
                class_code: (class >> 24) as u8,
                header_type: (header >> 16) as u8,
                irq_line: interrupt as u8,
                irq_pin: (interrupt >> 8) as u8,
                id,
                bars: entry
                    .bars
                    .iter()
                    .map(|b| PciBarReport {
                        index: b.bar.index,
                        kind: b.bar.kind,
                        prefetchable: b.bar.prefetchable,
                        size: b.bar.size,
                        address: b.address,
                        mapped_at: b.mapped_at,
                    })
                    .collect(),
            });
        }
        list
    }

    fn check_bars(&self, slot: u8, bars: &[PciBar]) -> Result<(), PciError> {
        let mut used = [false; PCI_NUM_BARS];
        for bar in bars {
            bar.check().map_err(|reason| PciError::InvalidBar {
                slot,
                index: bar.index,
                reason,
            })?;
            for reg in bar.registers() {
                if std::mem::replace(&mut used[reg], true) {
                    return Err(PciError::InvalidBar {
                        slot,
                        index: bar.index,
                        reason: "the BAR shares a register with another BAR",
                    });
                }
            }
        }
        Ok(())
    }

    /// A naturally aligned free address for `bar`, avoiding every BAR currently programmed
    /// on the bus (wherever the guest moved it) and those already `placed` for the new device.
    fn allocate(&self, bar: &PciBar, placed: &[BarState]) -> Option<u64> {
        let same_space = |b: &&BarState| b.bar.kind.is_io() == bar.kind.is_io() && b.address != 0;
        let used: Vec<(u64, u64)> = self
            .slots
            .iter()
            .flatten()
            .flat_map(|entry| entry.bars.iter())
            .chain(placed.iter())
            .filter(same_space)
            .map(|b| (b.address, b.bar.size))
            .collect();
        match bar.kind {
            PciBarKind::Io => first_fit(self.io_window, bar.size, bar.size, &used),
            PciBarKind::Mmio32 => first_fit(self.mmio32_window, bar.size, bar.size, &used),
            PciBarKind::Mmio64 => first_fit(self.mmio64_window, bar.size, bar.size, &used)
                .or_else(|| first_fit(self.mmio32_window, bar.size, bar.size, &used)),
        }
    }

    /// Bring the MMIO/PIO registrations of `slot`'s BARs in line with their addresses and the
    /// command register. With `strict`, the first mapping failure is returned (for
    /// `add_device`); otherwise it is logged and the BAR stays unmapped, since a guest may
    /// well program overlapping BARs on the way to a valid layout.
    fn update_mappings(&mut self, slot: u8, strict: bool) -> Result<(), PciError> {
        let Some(Some(entry)) = self.slots.get_mut(usize::from(slot)) else {
            return Ok(());
        };
        let command = lock(&entry.device).read_config_register(COMMAND_REG) as u16;
        let before: Vec<Option<u64>> = entry.bars.iter().map(|b| b.mapped_at).collect();

        // Unmap everything that moves first, so a device's BARs can swap places.
        for state in &mut entry.bars {
            let wanted = state.wanted_mapping(command);
            if let Some(old) = state.mapped_at.filter(|old| Some(*old) != wanted) {
                let bus = bus_for(state.bar.kind, &self.mmio_bus, &self.pio_bus);
                if let Err(e) = bus.remove(old) {
                    tracing::warn!(slot, index = state.bar.index, "unmapping BAR: {e}");
                }
                state.mapped_at = None;
            }
        }

        let mut result = Ok(());
        for state in &mut entry.bars {
            let Some(wanted) = state.wanted_mapping(command) else {
                state.failed_at = None;
                continue;
            };
            if state.mapped_at.is_some() {
                continue;
            }
            let router = Arc::new(Mutex::new(BarRouter {
                device: entry.device.clone(),
                base: wanted,
            }));
            let bus = bus_for(state.bar.kind, &self.mmio_bus, &self.pio_bus);
            match bus.insert(router, wanted, state.bar.size) {
                Ok(()) => {
                    state.mapped_at = Some(wanted);
                    state.failed_at = None;
                }
                Err(source) => {
                    if state.failed_at != Some(wanted) {
                        tracing::warn!(
                            slot,
                            index = state.bar.index,
                            "BAR at {wanted:#x}+{:#x} left unmapped: {source}",
                            state.bar.size
                        );
                    }
                    state.failed_at = Some(wanted);
                    if strict && result.is_ok() {
                        result = Err(PciError::MapBar {
                            slot,
                            index: state.bar.index,
                            address: wanted,
                            source,
                        });
                    }
                }
            }
        }

        let changes: Vec<(usize, Option<u64>)> = entry
            .bars
            .iter()
            .zip(before)
            .filter(|(state, before)| state.mapped_at != *before)
            .map(|(state, _)| (state.bar.index, state.mapped_at))
            .collect();
        if !changes.is_empty() {
            let mut device = lock(&entry.device);
            for (index, mapped_at) in changes {
                device.bar_moved(index, mapped_at);
            }
        }
        result
    }

    /// Take the device out of `slot`, unmapping its BARs.
    fn detach(&mut self, slot: u8) -> Option<Arc<Mutex<dyn PciDevice>>> {
        let entry = self.slots.get_mut(usize::from(slot))?.take()?;
        let mut unmapped = Vec::new();
        for state in &entry.bars {
            if let Some(base) = state.mapped_at {
                let bus = bus_for(state.bar.kind, &self.mmio_bus, &self.pio_bus);
                if let Err(e) = bus.remove(base) {
                    tracing::warn!(slot, index = state.bar.index, "unmapping BAR: {e}");
                }
                unmapped.push(state.bar.index);
            }
        }
        if !unmapped.is_empty() {
            let mut device = lock(&entry.device);
            for index in unmapped {
                device.bar_moved(index, None);
            }
        }
        Some(entry.device)
    }
}

fn bus_for<'a>(kind: PciBarKind, mmio_bus: &'a Bus, pio_bus: &'a Bus) -> &'a Bus {
    if kind.is_io() {
        pio_bus
    } else {
        mmio_bus
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::test_util::{
        device_with_bars, test_device, BarAccess, TestDevice, TestMachine, TEST_BARS, TEST_IDS,
        TEST_MMIO64_START,
    };

    const COMMAND: u64 = 0x04;
    const BAR0: u64 = 0x10;

    fn bar(index: usize, kind: PciBarKind, size: u64) -> PciBar {
        PciBar {
            index,
            kind,
            size,
            prefetchable: false,
        }
    }

    fn info(machine: &TestMachine, slot: u8) -> PciDeviceInfo {
        machine
            .pci
            .lock()
            .unwrap()
            .pci_info()
            .into_iter()
            .find(|d| d.slot == slot)
            .unwrap()
    }

    /// (programmed address, decoded address) of each BAR of `slot`, by BAR index.
    fn bar_addresses(machine: &TestMachine, slot: u8) -> Vec<(usize, u64, Option<u64>)> {
        info(machine, slot)
            .bars
            .iter()
            .map(|b| (b.index, b.address, b.mapped_at))
            .collect()
    }

    fn pio_routes(machine: &TestMachine, port: u64) -> bool {
        machine.pio.read(port, &mut [0u8; 1])
    }

    fn mmio_routes(machine: &TestMachine, address: u64) -> bool {
        machine.mmio.read(address, &mut [0u8; 1])
    }

    #[test]
    fn bar_sizing_through_ecam() {
        let machine = TestMachine::new();
        let dev = test_device();
        let slot = machine.add(dev.clone(), None);
        let before = bar_addresses(&machine, slot);
        let moves_before = dev.lock().unwrap().moves.len();
        let expected = [
            0xffff_f000u32, // BAR0: 4 KiB, 32-bit, not prefetchable
            0,              // BAR1: unused
            0xfff0_000c,    // BAR2: 1 MiB, 64-bit, prefetchable
            0xffff_ffff,    // BAR3: upper half of BAR2
            0xffff_ffe1,    // BAR4: 32 I/O ports
            0,              // BAR5: unused
        ];
        for (i, mask) in expected.into_iter().enumerate() {
            let offset = BAR0 + 4 * i as u64;
            let original = machine.config_read(slot, offset);
            machine.config_write(slot, offset, 0xffff_ffff);
            assert_eq!(machine.config_read(slot, offset), mask, "BAR {i}");
            machine.config_write(slot, offset, original);
            assert_eq!(machine.config_read(slot, offset), original, "BAR {i}");
        }
        assert_eq!(bar_addresses(&machine, slot), before);
        assert_eq!(dev.lock().unwrap().moves.len(), moves_before);
        // The flag bits read back with the address.
        let (_, bar0, _) = before[0];
        let (_, bar2, _) = before[1];
        let (_, bar4, _) = before[2];
        assert_eq!(u64::from(machine.config_read(slot, BAR0)), bar0);
        assert_eq!(
            u64::from(machine.config_read(slot, 0x18)),
            bar2 & 0xffff_ffff | 0xc
        );
        assert_eq!(u64::from(machine.config_read(slot, 0x1c)), bar2 >> 32);
        assert_eq!(u64::from(machine.config_read(slot, 0x20)), bar4 | 1);
    }

    #[test]
    fn allocation_is_naturally_aligned_inside_the_windows() {
        let machine = TestMachine::new();
        let mut slots = Vec::new();
        for _ in 0..3 {
            slots.push(machine.add(test_device(), None));
        }
        let big = [
            bar(0, PciBarKind::Mmio32, 0x20_0000),
            bar(1, PciBarKind::Io, 0x100),
            bar(2, PciBarKind::Mmio64, 0x4000_0000),
        ];
        slots.push(machine.add(device_with_bars(&big), None));
        slots.push(machine.add(test_device(), None));
        assert_eq!(slots, vec![1, 2, 3, 4, 5]);

        let mmio64 = PciWindow::new(TEST_MMIO64_START, layout::PCI_MMIO64_SIZE);
        let mut ranges: Vec<(bool, u64, u64)> = Vec::new();
        for device in machine.pci.lock().unwrap().pci_info() {
            for b in device.bars {
                assert_eq!(b.address % b.size, 0, "{b:?}");
                assert_eq!(b.mapped_at, Some(b.address));
                let window = match b.kind {
                    PciBarKind::Io => PCI_IO_WINDOW,
                    PciBarKind::Mmio32 => PCI_MMIO32_WINDOW,
                    PciBarKind::Mmio64 => mmio64,
                };
                assert!(window.contains(b.address, b.size), "{b:?}");
                ranges.push((b.kind.is_io(), b.address, b.size));
            }
        }
        assert_eq!(ranges.len(), 15);
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                let disjoint = a.0 != b.0 || a.1 + a.2 <= b.1 || b.1 + b.2 <= a.1;
                assert!(disjoint, "{a:x?} overlaps {b:x?}");
            }
        }
    }

    #[test]
    fn mmio64_bars_fall_back_to_the_32bit_window() {
        let machine = TestMachine::with_mmio64_window(PciWindow::new(TEST_MMIO64_START, 0x1000));
        let slot = machine.add(test_device(), None);
        let (_, address, _) = bar_addresses(&machine, slot)[1];
        assert!(PCI_MMIO32_WINDOW.contains(address, 0x10_0000));
        assert!(PciBus::new(
            machine.mmio.clone(),
            machine.pio.clone(),
            PciWindow::new(1, 0),
            machine.irq.clone()
        )
        .is_err());
    }

    #[test]
    fn bar_accesses_reach_the_device() {
        let machine = TestMachine::new();
        let dev = test_device();
        let slot = machine.add(dev.clone(), Some(3));
        let bars = bar_addresses(&machine, slot);
        let (bar0, bar2, io) = (bars[0].1, bars[1].1, bars[2].1);
        assert_eq!(
            dev.lock().unwrap().moves,
            vec![(0, Some(bar0)), (2, Some(bar2)), (4, Some(io))]
        );

        assert_eq!(machine.mmio_read(bar0 + 0x10, 4), 0x1312_1110);
        assert!(machine.mmio.write(bar2 + 0x800, &[1, 2]));
        let mut data = [0u8; 2];
        assert!(machine.pio.read(io + 4, &mut data));
        assert_eq!(data, [4, 5]);
        assert!(machine.pio.write(io + 0x1f, &[9]));
        assert_eq!(
            dev.lock().unwrap().accesses,
            vec![
                BarAccess::Read {
                    base: bar0,
                    offset: 0x10,
                    len: 4
                },
                BarAccess::Write {
                    base: bar2,
                    offset: 0x800,
                    data: vec![1, 2]
                },
                BarAccess::Read {
                    base: io,
                    offset: 4,
                    len: 2
                },
                BarAccess::Write {
                    base: io,
                    offset: 0x1f,
                    data: vec![9]
                },
            ]
        );
        // Just past each BAR nothing answers.
        assert!(!mmio_routes(&machine, bar0 + 0x1000));
        assert!(!pio_routes(&machine, io + 0x20));
    }

    #[test]
    fn intx_pin_is_wired_by_the_swizzle() {
        let machine = TestMachine::new();
        let dev = test_device();
        let slot = machine.add(dev.clone(), Some(11));
        let gsi = intx_gsi(11, 0);
        assert_eq!(gsi, 16 + 11 % 8);
        assert_eq!(machine.config_read(slot, 0x3c) & 0xffff, 0x0100 | gsi);
        let line = dev.lock().unwrap().intx.clone().unwrap();
        assert_eq!(line.gsi(), gsi);
        line.pulse().unwrap();
        assert_eq!(machine.irq.edges(gsi), 1);
        // The line register stays guest-writable, the pin does not.
        machine.config_write(slot, 0x3c, 0xffff_ff05);
        assert_eq!(machine.config_read(slot, 0x3c) & 0xffff, 0x0105);
    }

    #[test]
    fn guest_reprogramming_moves_the_routing() {
        let machine = TestMachine::new();
        let dev = test_device();
        let slot = machine.add(dev.clone(), None);
        let bars = bar_addresses(&machine, slot);
        let (old0, old2, old_io) = (bars[0].1, bars[1].1, bars[2].1);
        dev.lock().unwrap().moves.clear();

        // Linux style: decode off, program, decode on.
        let command = machine.config_read(slot, COMMAND) & 0xffff;
        machine.config_write(slot, COMMAND, command & !0x3);
        assert!(!mmio_routes(&machine, old0));
        assert!(!pio_routes(&machine, old_io));
        machine.config_write(slot, BAR0, 0xd000_0000);
        machine.config_write(slot, 0x18, 0x4000_0000);
        machine.config_write(slot, 0x1c, 0x3);
        machine.config_write(slot, 0x20, 0xd000);
        assert!(!mmio_routes(&machine, 0xd000_0000));
        machine.config_write(slot, COMMAND, command);
        assert_eq!(
            bar_addresses(&machine, slot),
            vec![
                (0, 0xd000_0000, Some(0xd000_0000)),
                (2, 0x3_4000_0000, Some(0x3_4000_0000)),
                (4, 0xd000, Some(0xd000)),
            ]
        );
        assert!(!mmio_routes(&machine, old0));
        assert!(!mmio_routes(&machine, old2));
        assert!(!pio_routes(&machine, old_io));
        assert_eq!(machine.mmio_read(0xd000_0000 + 8, 1), 8);
        assert_eq!(machine.mmio_read(0x3_4000_0000 + 9, 1), 9);
        let mut port = [0u8; 1];
        assert!(machine.pio.read(0xd000 + 3, &mut port));
        assert_eq!(port, [3]);
        assert_eq!(
            dev.lock().unwrap().moves,
            vec![
                (0, None),
                (2, None),
                (4, None),
                (0, Some(0xd000_0000)),
                (2, Some(0x3_4000_0000)),
                (4, Some(0xd000)),
            ]
        );

        // With decoding on, a BAR write moves the routing at once.
        machine.config_write(slot, BAR0, 0xd010_0000);
        assert!(!mmio_routes(&machine, 0xd000_0000));
        assert!(mmio_routes(&machine, 0xd010_0000));
        let last = dev.lock().unwrap().accesses.last().cloned();
        assert_eq!(
            last,
            Some(BarAccess::Read {
                base: 0xd010_0000,
                offset: 0,
                len: 1
            })
        );
        // Address 0 means unassigned: not decoded.
        machine.config_write(slot, BAR0, 0);
        assert_eq!(bar_addresses(&machine, slot)[0], (0, 0, None));
    }

    #[test]
    fn command_register_decode_bits_map_and_unmap() {
        let machine = TestMachine::new();
        let slot = machine.add(test_device(), None);
        let bars = bar_addresses(&machine, slot);
        let (bar0, bar2, io) = (bars[0].1, bars[1].1, bars[2].1);
        let command = machine.config_read(slot, COMMAND) & 0xffff;
        assert_eq!(command & 0x3, 0x3, "the bus enables decoding like firmware");

        machine.config_write(slot, COMMAND, u32::from(COMMAND_IO_SPACE));
        assert!(!mmio_routes(&machine, bar0));
        assert!(!mmio_routes(&machine, bar2));
        assert!(pio_routes(&machine, io));
        machine.config_write(slot, COMMAND, u32::from(COMMAND_MEMORY_SPACE));
        assert!(mmio_routes(&machine, bar0));
        assert!(mmio_routes(&machine, bar2));
        assert!(!pio_routes(&machine, io));
        // A byte write to the command register counts too.
        assert!(machine.mmio.write(TestMachine::ecam(slot, COMMAND), &[0]));
        assert!(!mmio_routes(&machine, bar0));
        assert!(machine.mmio.write(TestMachine::ecam(slot, COMMAND), &[3]));
        assert!(mmio_routes(&machine, bar0));
        assert!(pio_routes(&machine, io));
        assert_eq!(bar_addresses(&machine, slot), bars);
    }

    #[test]
    fn overlapping_bars_are_left_unmapped() {
        let machine = TestMachine::new();
        let a = test_device();
        let b = test_device();
        let slot_a = machine.add(a.clone(), None);
        let slot_b = machine.add(b.clone(), None);
        let a0 = bar_addresses(&machine, slot_a)[0].1;
        let b0 = bar_addresses(&machine, slot_b)[0].1;

        machine.config_write(slot_b, BAR0, a0 as u32);
        assert_eq!(bar_addresses(&machine, slot_b)[0], (0, a0, None));
        a.lock().unwrap().accesses.clear();
        assert_eq!(machine.mmio_read(a0 + 1, 1), 1);
        assert_eq!(a.lock().unwrap().accesses.len(), 1);
        assert!(!b
            .lock()
            .unwrap()
            .accesses
            .iter()
            .any(|x| matches!(x, BarAccess::Read { base, .. } if *base == a0)));
        // Onto ECAM, and onto the middle of another BAR: refused the same way.
        machine.config_write(slot_b, BAR0, layout::PCI_MMCONFIG_START.0 as u32);
        assert_eq!(bar_addresses(&machine, slot_b)[0].2, None);
        assert_eq!(machine.config_read(0, 0), 0x0008_1b36);
        // Half-programmed 64-bit BAR landing on a 32-bit one.
        let a2 = bar_addresses(&machine, slot_a)[1].1;
        machine.config_write(slot_a, 0x1c, 0);
        machine.config_write(slot_a, 0x18, (a0 as u32) | 0xc);
        assert_eq!(bar_addresses(&machine, slot_a)[1], (2, a0, None));
        machine.config_write(slot_a, 0x1c, (a2 >> 32) as u32);
        machine.config_write(slot_a, 0x18, a2 as u32);
        assert_eq!(bar_addresses(&machine, slot_a)[1], (2, a2, Some(a2)));

        // Moving back to a free range maps it again.
        machine.config_write(slot_b, BAR0, b0 as u32);
        assert_eq!(bar_addresses(&machine, slot_b)[0], (0, b0, Some(b0)));
        assert_eq!(machine.mmio_read(b0 + 2, 1), 2);
    }

    #[test]
    fn capability_chain_walk() {
        let machine = TestMachine::new();
        let slot = machine.add(test_device(), None);
        let status = machine.config_read(slot, COMMAND) >> 16;
        assert_ne!(status & 0x10, 0, "capability list bit");
        let mut pointer = machine.config_read(slot, 0x34) & 0xfc;
        let mut found = Vec::new();
        while pointer != 0 && found.len() < 48 {
            let header = machine.config_read(slot, u64::from(pointer));
            found.push((header & 0xff, pointer));
            pointer = (header >> 8) & 0xfc;
        }
        assert_eq!(found, vec![(0x09, 0x40), (0x11, 0x48)]);
        // Capabilities are read-only unless the device says otherwise.
        machine.config_write(slot, 0x40, 0);
        assert_eq!(machine.config_read(slot, 0x40) & 0xffff, 0x4809);
        // The host bridge has none.
        assert_eq!(machine.config_read(0, COMMAND) >> 16 & 0x10, 0);
    }

    #[test]
    fn slot_management() {
        let machine = TestMachine::new();
        let mut pci = machine.pci.lock().unwrap();
        assert!(matches!(
            pci.add_device(Some(0), test_device()),
            Err(PciError::SlotInUse(0))
        ));
        assert_eq!(pci.add_device(Some(3), test_device()).unwrap(), 3);
        assert!(matches!(
            pci.add_device(Some(3), test_device()),
            Err(PciError::SlotInUse(3))
        ));
        assert!(matches!(
            pci.add_device(Some(32), test_device()),
            Err(PciError::InvalidSlot(32))
        ));
        assert_eq!(pci.add_device(None, test_device()).unwrap(), 1);
        assert!(matches!(
            pci.remove_device(0),
            Err(PciError::HostBridgeRemoval)
        ));
        assert!(matches!(pci.remove_device(7), Err(PciError::SlotEmpty(7))));
        assert!(matches!(
            pci.remove_device(40),
            Err(PciError::InvalidSlot(40))
        ));
        for _ in 0..29 {
            pci.add_device(None, test_device()).unwrap();
        }
        assert!(matches!(
            pci.add_device(None, test_device()),
            Err(PciError::NoFreeSlot)
        ));
        assert!(pci.device(31).is_some());
        assert!(pci.device(32).is_none());
        assert_eq!(pci.pci_info().len(), 32);
    }

    #[test]
    fn removal_frees_the_slot_and_its_ranges() {
        let machine = TestMachine::new();
        let dev = test_device();
        let slot = machine.add(dev.clone(), Some(2));
        let bars = bar_addresses(&machine, slot);
        dev.lock().unwrap().moves.clear();

        let removed = machine.pci.lock().unwrap().remove_device(slot).unwrap();
        let dev_dyn: Arc<Mutex<dyn PciDevice>> = dev.clone();
        assert!(Arc::ptr_eq(&removed, &dev_dyn));
        assert!(!mmio_routes(&machine, bars[0].1));
        assert!(!mmio_routes(&machine, bars[1].1));
        assert!(!pio_routes(&machine, bars[2].1));
        assert_eq!(
            dev.lock().unwrap().moves,
            vec![(0, None), (2, None), (4, None)]
        );
        assert_eq!(machine.config_read(slot, 0), 0xffff_ffff);

        // The slot and the address ranges are reused.
        let again = test_device();
        assert_eq!(machine.add(again.clone(), Some(slot)), slot);
        assert_eq!(bar_addresses(&machine, slot), bars);
        assert_eq!(machine.mmio_read(bars[0].1 + 5, 1), 5);
        assert_eq!(again.lock().unwrap().accesses.len(), 1);
    }

    #[test]
    fn failed_adds_leave_no_trace() {
        let machine = TestMachine::new();
        // A 32-bit BAR larger than the whole window.
        let huge = device_with_bars(&[bar(0, PciBarKind::Mmio32, 1 << 30)]);
        let err = machine
            .pci
            .lock()
            .unwrap()
            .add_device(Some(4), huge)
            .unwrap_err();
        assert!(matches!(
            err,
            PciError::BarAllocation {
                slot: 4,
                index: 0,
                ..
            }
        ));
        // A device that reports nonsense BARs.
        let liar = test_device();
        liar.lock().unwrap().reported_bars = Some(vec![
            bar(0, PciBarKind::Mmio32, 0x1000),
            bar(0, PciBarKind::Io, 0x10),
        ]);
        let err = machine
            .pci
            .lock()
            .unwrap()
            .add_device(Some(4), liar.clone())
            .unwrap_err();
        assert!(matches!(
            err,
            PciError::InvalidBar {
                slot: 4,
                index: 0,
                ..
            }
        ));
        liar.lock().unwrap().reported_bars = Some(vec![bar(0, PciBarKind::Mmio32, 0x1001)]);
        assert!(machine
            .pci
            .lock()
            .unwrap()
            .add_device(Some(4), liar.clone())
            .is_err());
        assert!(liar.lock().unwrap().moves.is_empty());
        assert!(machine.pci.lock().unwrap().device(4).is_none());
        assert_eq!(machine.config_read(4, 0), 0xffff_ffff);

        // A BAR range already taken on the MMIO bus by something else.
        let squatter = device_with_bars(&[]);
        machine
            .mmio
            .insert(
                Arc::new(Mutex::new(BarRouter {
                    device: squatter,
                    base: PCI_MMIO32_WINDOW.start,
                })),
                PCI_MMIO32_WINDOW.start,
                0x1000,
            )
            .unwrap();
        let blocked = test_device();
        let err = machine
            .pci
            .lock()
            .unwrap()
            .add_device(Some(4), blocked.clone())
            .unwrap_err();
        assert!(matches!(
            err,
            PciError::MapBar {
                slot: 4,
                index: 0,
                ..
            }
        ));
        assert!(machine.pci.lock().unwrap().device(4).is_none());
        // Its other BARs were unmapped again.
        let mapped_then_unmapped: Vec<_> = blocked.lock().unwrap().moves.clone();
        assert_eq!(mapped_then_unmapped.len(), 4);
        assert!(mapped_then_unmapped[2..].iter().all(|(_, at)| at.is_none()));
    }

    #[test]
    fn pci_info_lists_devices() {
        let machine = TestMachine::new();
        let slot = machine.add(test_device(), Some(6));
        let list = machine.pci.lock().unwrap().pci_info();
        assert_eq!(list.len(), 2);
        let bridge = &list[0];
        assert_eq!(
            (bridge.slot, bridge.vendor_id, bridge.device_id),
            (0, 0x1b36, 0x0008)
        );
        assert_eq!((bridge.class_code, bridge.subclass), (0x06, 0x00));
        assert_eq!((bridge.irq_pin, bridge.header_type), (0, 0));
        assert!(bridge.bars.is_empty());
        assert_eq!(bridge.id, None);

        let dev = &list[1];
        assert_eq!(dev.slot, slot);
        assert_eq!(
            u32::from(dev.device_id) << 16 | u32::from(dev.vendor_id),
            TEST_IDS
        );
        assert_eq!(dev.class_code, 0xff);
        assert_eq!(dev.irq_pin, 1);
        assert_eq!(u32::from(dev.irq_line), intx_gsi(slot, 0));
        assert_eq!(dev.id.as_deref(), Some("test0"));
        let kinds: Vec<_> = dev.bars.iter().map(|b| (b.index, b.kind, b.size)).collect();
        let expected: Vec<_> = TEST_BARS
            .iter()
            .map(|b| (b.index, b.kind, b.size))
            .collect();
        assert_eq!(kinds, expected);
        assert!(dev.bars[1].prefetchable);
        assert!(dev.bars.iter().all(|b| b.mapped_at == Some(b.address)));
    }

    /// A vCPU hammering a BAR while another moves it through ECAM (which itself sits on the
    /// same MMIO bus) must neither deadlock nor panic.
    #[test]
    fn moving_a_bar_while_it_is_accessed() {
        let machine = Arc::new(TestMachine::new());
        let dev: Arc<Mutex<TestDevice>> = test_device();
        let slot = machine.add(dev, None);
        let first = bar_addresses(&machine, slot)[0].1;
        let second = 0xd000_0000u64;
        let reader = {
            let machine = machine.clone();
            std::thread::spawn(move || {
                let mut reads = 0;
                for i in 0..20_000u64 {
                    let address = if i % 2 == 0 { first } else { second };
                    let _ = machine.mmio.read(address + 4, &mut [0u8; 4]);
                    reads += 1;
                }
                reads
            })
        };
        for i in 0..2_000 {
            let address = if i % 2 == 0 { second } else { first };
            machine.config_write(slot, BAR0, address as u32);
        }
        // The reader and the mover can fall into lockstep (each read lands on the address the
        // BAR just left), so the number of hits says nothing; finishing does, and afterwards the
        // BAR answers at its final address only.
        let reads = reader.join().unwrap();
        assert_eq!(reads, 20_000);
        assert_eq!(bar_addresses(&machine, slot)[0], (0, first, Some(first)));
        assert!(machine.mmio.read(first + 4, &mut [0u8; 4]));
        assert!(!machine.mmio.read(second + 4, &mut [0u8; 4]));
    }
}
