//! A type-0 PCI configuration space with PCIe's 4 KiB extended area, for devices to embed.
//!
//! It keeps the register contents next to a mask of the bits the guest may change, so the ids,
//! class code, header type and interrupt pin stay read-only, and it implements BAR sizing (a
//! write of all ones reads back the size mask) and the capability list.

use super::device::{BarReprogram, PciBar, PciBarKind, PciInterruptPin, PCI_NUM_BARS};

/// 4 KiB of configuration space, in 32-bit registers.
pub const NUM_CONFIG_REGISTERS: usize = 1024;
/// The conventional 256-byte space, where the capability list lives.
const STANDARD_SPACE_BYTES: usize = 0x100;

/// Register holding the command (low half) and status (high half) registers.
pub const COMMAND_REG: usize = 1;
/// First BAR register; BAR n is register `BAR0_REG + n`.
pub const BAR0_REG: usize = 4;
/// Register holding interrupt line (byte 0) and interrupt pin (byte 1).
pub const INTERRUPT_REG: usize = 0xf;
const ID_REG: usize = 0;
const CLASS_REG: usize = 2;
const HEADER_REG: usize = 3;
const SUBSYSTEM_REG: usize = 0xb;
const CAPABILITY_POINTER: usize = 0x34;
const FIRST_CAPABILITY: usize = 0x40;
const STATUS_OFFSET: usize = 6;

pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_PARITY_ERROR_RESPONSE: u16 = 1 << 6;
pub const COMMAND_SERR_ENABLE: u16 = 1 << 8;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// The command bits our functions implement; the rest are hardwired to zero.
const COMMAND_WRITABLE: u16 = COMMAND_IO_SPACE
    | COMMAND_MEMORY_SPACE
    | COMMAND_BUS_MASTER
    | COMMAND_PARITY_ERROR_RESPONSE
    | COMMAND_SERR_ENABLE
    | COMMAND_INTX_DISABLE;
/// Status: INTx is asserted.
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Status: the capability pointer at 0x34 is valid.
pub const STATUS_CAPABILITY_LIST: u16 = 1 << 4;

/// Class code of bridges, and the host bridge subclass.
pub const CLASS_BRIDGE: u8 = 0x06;
pub const SUBCLASS_HOST_BRIDGE: u8 = 0x00;

const BAR_IO_FLAG: u32 = 0x1;
const BAR_MEM64_FLAG: u32 = 0x4;
const BAR_PREFETCHABLE_FLAG: u32 = 0x8;
const BAR_IO_ADDRESS_MASK: u32 = !0x3;
const BAR_MEM_ADDRESS_MASK: u32 = !0xf;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigurationError {
    #[error("invalid BAR {index}: {reason}")]
    InvalidBar { index: usize, reason: &'static str },
    #[error("BAR register {0} is already used by another BAR")]
    BarInUse(usize),
    #[error("a capability needs at least its id and next-pointer bytes, got {0} bytes")]
    CapabilityTooShort(usize),
    #[error("the capability write mask has {mask} bytes but the capability has {len}")]
    CapabilityMaskLength { len: usize, mask: usize },
    #[error("no room for a {0}-byte capability in the 256-byte configuration space")]
    CapabilitySpace(usize),
    #[error("configuration space access at {offset:#x}+{len:#x} is out of range")]
    OutOfRange { offset: usize, len: usize },
    #[error("{actual} configuration registers given for a space of {expected}")]
    RegisterCount { expected: usize, actual: usize },
}

/// The identity registers of a function: all read-only to the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciIdentity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    pub class_code: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
}

#[derive(Clone, Copy, Debug)]
struct BarState {
    bar: PciBar,
    /// The address last committed by a non-sizing write.
    address: u64,
}

/// The configuration space of one type-0 function.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    registers: Vec<u32>,
    /// Bits the guest may change, per register.
    writable: Vec<u32>,
    /// Indexed by the BAR's first register; `None` for unused and upper-half registers.
    bars: [Option<BarState>; PCI_NUM_BARS],
    /// Byte offset of the last capability, whose next pointer a new one is linked from.
    last_capability: Option<usize>,
    next_capability_offset: usize,
}

impl PciConfiguration {
    pub fn new(identity: PciIdentity, interrupt_pin: PciInterruptPin) -> Self {
        let mut config = Self {
            registers: vec![0; NUM_CONFIG_REGISTERS],
            writable: vec![0; NUM_CONFIG_REGISTERS],
            bars: [None; PCI_NUM_BARS],
            last_capability: None,
            next_capability_offset: FIRST_CAPABILITY,
        };
        config.registers[ID_REG] =
            u32::from(identity.device_id) << 16 | u32::from(identity.vendor_id);
        config.registers[CLASS_REG] = u32::from(identity.class_code) << 24
            | u32::from(identity.subclass) << 16
            | u32::from(identity.prog_if) << 8
            | u32::from(identity.revision_id);
        // Header type 0 (single function) in byte 2; cache line size in byte 0 is writable
        // because Linux programs it, the latency timer is fixed at zero as on PCIe.
        config.registers[HEADER_REG] = 0;
        config.writable[HEADER_REG] = 0xff;
        config.registers[SUBSYSTEM_REG] =
            u32::from(identity.subsystem_id) << 16 | u32::from(identity.subsystem_vendor_id);
        config.writable[COMMAND_REG] = u32::from(COMMAND_WRITABLE);
        config.registers[INTERRUPT_REG] = u32::from(interrupt_pin.register_value()) << 8;
        config.writable[INTERRUPT_REG] = 0xff;
        config
    }

    /// The guest-visible value of register `reg_idx`; all ones beyond the 4 KiB space.
    pub fn read_register(&self, reg_idx: usize) -> u32 {
        self.registers.get(reg_idx).copied().unwrap_or(0xffff_ffff)
    }

    /// A guest write of `data` at byte `offset` of register `reg_idx`. Only the writable bits of
    /// the bytes written change; anything out of range is ignored. Returns the BAR the write
    /// moved, if any.
    pub fn write_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarReprogram> {
        if reg_idx >= NUM_CONFIG_REGISTERS || data.is_empty() || offset >= 4 {
            return None;
        }
        // offset < 4 here, so the conversion and the arithmetic cannot overflow.
        let offset = offset as usize;
        if data.len() > 4 - offset {
            return None;
        }
        let mut bytes = [0u8; 4];
        bytes[offset..offset + data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(bytes);
        let lanes = (u64::from(u32::MAX) >> (32 - 8 * data.len()) << (8 * offset)) as u32;
        let writable = self.writable[reg_idx] & lanes;
        self.registers[reg_idx] = (self.registers[reg_idx] & !writable) | (value & writable);

        if (BAR0_REG..BAR0_REG + PCI_NUM_BARS).contains(&reg_idx) {
            self.bar_register_written(reg_idx - BAR0_REG)
        } else {
            None
        }
    }

    /// Implement `bar` (its registers read back its type flags; its address starts at 0).
    pub fn add_bar(&mut self, bar: PciBar) -> Result<(), ConfigurationError> {
        bar.check()
            .map_err(|reason| ConfigurationError::InvalidBar {
                index: bar.index,
                reason,
            })?;
        for reg in bar.registers() {
            if self.bar_owning_register(reg).is_some() {
                return Err(ConfigurationError::BarInUse(reg));
            }
        }
        let size_mask = !(bar.size - 1);
        let reg = BAR0_REG + bar.index;
        let (flags, address_mask) = match bar.kind {
            PciBarKind::Io => (BAR_IO_FLAG, BAR_IO_ADDRESS_MASK),
            PciBarKind::Mmio32 => (0, BAR_MEM_ADDRESS_MASK),
            PciBarKind::Mmio64 => (BAR_MEM64_FLAG, BAR_MEM_ADDRESS_MASK),
        };
        let flags = flags
            | if bar.prefetchable {
                BAR_PREFETCHABLE_FLAG
            } else {
                0
            };
        self.registers[reg] = flags;
        self.writable[reg] = size_mask as u32 & address_mask;
        if bar.kind == PciBarKind::Mmio64 {
            self.registers[reg + 1] = 0;
            self.writable[reg + 1] = (size_mask >> 32) as u32;
        }
        self.bars[bar.index] = Some(BarState { bar, address: 0 });
        Ok(())
    }

    /// The BARs added so far, in index order.
    pub fn bars(&self) -> Vec<PciBar> {
        self.bars.iter().flatten().map(|state| state.bar).collect()
    }

    /// The address the guest (or the bus) last programmed into BAR `index`, ignoring the
    /// transient all-ones value of a sizing probe. `None` if there is no such BAR.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        self.bars.get(index)?.map(|state| state.address)
    }

    /// Append a read-only capability. `data[0]` is the capability id; `data[1]` (the next
    /// pointer) is filled in by the list. Returns its offset in configuration space.
    pub fn add_capability(&mut self, data: &[u8]) -> Result<usize, ConfigurationError> {
        self.add_capability_with_mask(data, &[])
    }

    /// Like [`add_capability`](Self::add_capability), with a per-byte mask of the bits the guest
    /// may write (`writable` is empty or as long as `data`; the first two bytes stay read-only).
    pub fn add_capability_with_mask(
        &mut self,
        data: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigurationError> {
        if data.len() < 2 {
            return Err(ConfigurationError::CapabilityTooShort(data.len()));
        }
        if !writable.is_empty() && writable.len() != data.len() {
            return Err(ConfigurationError::CapabilityMaskLength {
                len: data.len(),
                mask: writable.len(),
            });
        }
        let offset = self.next_capability_offset;
        let end = offset + data.len();
        if end > STANDARD_SPACE_BYTES {
            return Err(ConfigurationError::CapabilitySpace(data.len()));
        }
        self.set_bytes(offset, data)?;
        self.set_byte(offset + 1, 0);
        for (i, mask) in writable.iter().enumerate().skip(2) {
            self.set_writable_byte(offset + i, *mask);
        }
        match self.last_capability {
            Some(previous) => self.set_byte(previous + 1, offset as u8),
            None => self.set_byte(CAPABILITY_POINTER, offset as u8),
        }
        let status = self.status() | STATUS_CAPABILITY_LIST;
        self.set_bytes(STATUS_OFFSET, &status.to_le_bytes())?;
        self.last_capability = Some(offset);
        self.next_capability_offset = end.next_multiple_of(4);
        Ok(offset)
    }

    /// The capability list as (id, offset) pairs, walked the way a guest walks it.
    pub fn capabilities(&self) -> Vec<(u8, usize)> {
        let mut list = Vec::new();
        if self.status() & STATUS_CAPABILITY_LIST == 0 {
            return list;
        }
        let mut offset = usize::from(self.byte(CAPABILITY_POINTER) & !0x3);
        // A list cannot hold more than 48 entries in 192 bytes; stop there on a loop.
        while offset >= FIRST_CAPABILITY && list.len() < 48 {
            list.push((self.byte(offset), offset));
            offset = usize::from(self.byte(offset + 1) & !0x3);
        }
        list
    }

    /// Device-side write that ignores the writable mask: for the device's own registers, such
    /// as capability contents or status bits.
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) -> Result<(), ConfigurationError> {
        self.check_range(offset, data.len())?;
        for (i, value) in data.iter().enumerate() {
            self.set_byte(offset + i, *value);
        }
        Ok(())
    }

    /// Device-side read of any bytes of the space.
    pub fn read_bytes(&self, offset: usize, data: &mut [u8]) -> Result<(), ConfigurationError> {
        self.check_range(offset, data.len())?;
        for (i, value) in data.iter_mut().enumerate() {
            *value = self.byte(offset + i);
        }
        Ok(())
    }

    /// The raw register contents, for snapshots.
    pub fn registers(&self) -> &[u32] {
        &self.registers
    }

    /// Load contents [`registers`](Self::registers) gave, into a function built the same way
    /// (same BARs and capabilities): as saved, past the guest's write masks. BAR addresses
    /// follow the restored BAR registers, except that a BAR caught mid-sizing keeps the
    /// address it had here.
    pub fn set_registers(&mut self, registers: &[u32]) -> Result<(), ConfigurationError> {
        if registers.len() != self.registers.len() {
            return Err(ConfigurationError::RegisterCount {
                expected: self.registers.len(),
                actual: registers.len(),
            });
        }
        self.registers.copy_from_slice(registers);
        for index in 0..PCI_NUM_BARS {
            let Some(state) = self.bars[index] else {
                continue;
            };
            if !self.is_sizing(&state.bar) {
                let address = self.decode_bar_address(&state.bar);
                self.bars[index] = Some(BarState { address, ..state });
            }
        }
        Ok(())
    }

    pub fn command(&self) -> u16 {
        self.registers[COMMAND_REG] as u16
    }

    pub fn status(&self) -> u16 {
        (self.registers[COMMAND_REG] >> 16) as u16
    }

    /// Reflect the INTx state in the status register, as devices with a pin should.
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        let bit = u32::from(STATUS_INTERRUPT) << 16;
        if asserted {
            self.registers[COMMAND_REG] |= bit;
        } else {
            self.registers[COMMAND_REG] &= !bit;
        }
    }

    pub fn interrupt_line(&self) -> u8 {
        self.registers[INTERRUPT_REG] as u8
    }

    pub fn interrupt_pin(&self) -> PciInterruptPin {
        PciInterruptPin::from_register((self.registers[INTERRUPT_REG] >> 8) as u8)
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<(), ConfigurationError> {
        match offset.checked_add(len) {
            Some(end) if end <= NUM_CONFIG_REGISTERS * 4 => Ok(()),
            _ => Err(ConfigurationError::OutOfRange { offset, len }),
        }
    }

    /// Callers keep `offset` inside the space.
    fn byte(&self, offset: usize) -> u8 {
        (self.registers[offset / 4] >> (8 * (offset % 4))) as u8
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = 8 * (offset % 4);
        let reg = &mut self.registers[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    fn set_writable_byte(&mut self, offset: usize, mask: u8) {
        let shift = 8 * (offset % 4);
        let reg = &mut self.writable[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(mask) << shift);
    }

    /// The BAR whose registers include BAR register `bar_reg` (0..=5).
    fn bar_owning_register(&self, bar_reg: usize) -> Option<usize> {
        if self.bars.get(bar_reg)?.is_some() {
            return Some(bar_reg);
        }
        let below = bar_reg.checked_sub(1)?;
        match self.bars[below] {
            Some(state) if state.bar.kind == PciBarKind::Mmio64 => Some(below),
            _ => None,
        }
    }

    /// Whether a register of the BAR holds all its writable bits set: the guest is sizing it.
    fn is_sizing(&self, bar: &PciBar) -> bool {
        bar.registers().any(|i| {
            let writable = self.writable[BAR0_REG + i];
            writable != 0 && self.registers[BAR0_REG + i] & writable == writable
        })
    }

    fn decode_bar_address(&self, bar: &PciBar) -> u64 {
        let low = self.registers[BAR0_REG + bar.index];
        match bar.kind {
            PciBarKind::Io => u64::from(low & BAR_IO_ADDRESS_MASK),
            PciBarKind::Mmio32 => u64::from(low & BAR_MEM_ADDRESS_MASK),
            PciBarKind::Mmio64 => {
                let high = self.registers[BAR0_REG + bar.index + 1];
                u64::from(high) << 32 | u64::from(low & BAR_MEM_ADDRESS_MASK)
            }
        }
    }

    fn bar_register_written(&mut self, bar_reg: usize) -> Option<BarReprogram> {
        let index = self.bar_owning_register(bar_reg)?;
        let state = self.bars[index]?;
        if self.is_sizing(&state.bar) {
            return None;
        }
        let new_address = self.decode_bar_address(&state.bar);
        if new_address == state.address {
            return None;
        }
        self.bars[index] = Some(BarState {
            address: new_address,
            ..state
        });
        Some(BarReprogram {
            index,
            old_address: state.address,
            new_address,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> PciIdentity {
        PciIdentity {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            revision_id: 1,
            class_code: 0x02,
            subclass: 0x00,
            prog_if: 0x00,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
        }
    }

    fn write_u32(config: &mut PciConfiguration, reg: usize, value: u32) -> Option<BarReprogram> {
        config.write_register(reg, 0, &value.to_le_bytes())
    }

    #[test]
    fn identity_registers_are_read_only() {
        let mut config = PciConfiguration::new(identity(), PciInterruptPin::IntA);
        assert_eq!(config.read_register(0), 0x1041_1af4);
        assert_eq!(config.read_register(2), 0x0200_0001);
        assert_eq!(config.read_register(0xb), 0x1100_1af4);
        for reg in [0, 2, 0xb] {
            let before = config.read_register(reg);
            write_u32(&mut config, reg, 0x1234_5678);
            config.write_register(reg, 1, &[0xaa, 0xbb]);
            assert_eq!(config.read_register(reg), before);
        }
        // Header type stays 0; cache line size is writable.
        write_u32(&mut config, 3, 0xffff_ffff);
        assert_eq!(config.read_register(3), 0xff);
    }

    #[test]
    fn command_status_and_interrupt_registers() {
        let mut config = PciConfiguration::new(identity(), PciInterruptPin::IntB);
        write_u32(&mut config, COMMAND_REG, 0xffff_ffff);
        assert_eq!(config.command(), COMMAND_WRITABLE);
        assert_eq!(config.status(), 0);
        config.set_interrupt_status(true);
        assert_eq!(config.status(), STATUS_INTERRUPT);
        config.set_interrupt_status(false);
        assert_eq!(config.status(), 0);

        assert_eq!(config.read_register(INTERRUPT_REG), 0x0200);
        config.write_register(INTERRUPT_REG, 0, &[17]);
        config.write_register(INTERRUPT_REG, 1, &[4]);
        assert_eq!(config.interrupt_line(), 17);
        assert_eq!(config.interrupt_pin(), PciInterruptPin::IntB);
    }

    #[test]
    fn bar_sizing_and_programming() {
        let mut config = PciConfiguration::new(identity(), PciInterruptPin::None);
        let bars = [
            PciBar {
                index: 0,
                kind: PciBarKind::Mmio32,
                size: 0x1000,
                prefetchable: false,
            },
            PciBar {
                index: 1,
                kind: PciBarKind::Mmio64,
                size: 0x10_0000,
                prefetchable: true,
            },
            PciBar {
                index: 3,
                kind: PciBarKind::Io,
                size: 0x20,
                prefetchable: false,
            },
            PciBar {
                index: 4,
                kind: PciBarKind::Mmio64,
                size: 1 << 33,
                prefetchable: false,
            },
        ];
        for bar in bars {
            config.add_bar(bar).unwrap();
        }
        assert_eq!(config.bars(), bars.to_vec());
        // Type flags before any write.
        assert_eq!(config.read_register(BAR0_REG), 0);
        assert_eq!(config.read_register(BAR0_REG + 1), 0xc);
        assert_eq!(config.read_register(BAR0_REG + 3), 0x1);
        assert_eq!(config.read_register(BAR0_REG + 4), 0x4);

        // Sizing: all ones reads back the size mask and is not a move.
        let sizes = [
            (0, 0xffff_f000),
            (1, 0xfff0_000c),
            (2, 0xffff_ffff),
            (3, 0xffff_ffe1),
            (4, 0x0000_0004),
            (5, 0xffff_fffe),
        ];
        for (reg, expected) in sizes {
            let old = config.read_register(BAR0_REG + reg);
            assert_eq!(write_u32(&mut config, BAR0_REG + reg, 0xffff_ffff), None);
            assert_eq!(
                config.read_register(BAR0_REG + reg),
                expected,
                "BAR reg {reg}"
            );
            assert_eq!(write_u32(&mut config, BAR0_REG + reg, old), None);
        }
        assert_eq!(config.bar_address(0), Some(0));

        // Programming an address is a move, with the flags kept and low bits masked.
        assert_eq!(
            write_u32(&mut config, BAR0_REG, 0xc000_1fff),
            Some(BarReprogram {
                index: 0,
                old_address: 0,
                new_address: 0xc000_1000
            })
        );
        assert_eq!(config.read_register(BAR0_REG), 0xc000_1000);
        write_u32(&mut config, BAR0_REG + 1, 0x8010_0000);
        let moved = write_u32(&mut config, BAR0_REG + 2, 0x12).unwrap();
        assert_eq!(moved.index, 1);
        assert_eq!(moved.new_address, 0x12_8010_0000);
        assert_eq!(config.read_register(BAR0_REG + 1), 0x8010_000c);
        assert_eq!(config.bar_address(1), Some(0x12_8010_0000));
        assert_eq!(
            write_u32(&mut config, BAR0_REG + 3, 0xc020).unwrap().index,
            3
        );
        assert_eq!(config.read_register(BAR0_REG + 3), 0xc021);

        // Sizing a programmed BAR and restoring it reports nothing and keeps the address.
        write_u32(&mut config, BAR0_REG + 1, 0xffff_ffff);
        write_u32(&mut config, BAR0_REG + 2, 0xffff_ffff);
        assert_eq!(config.bar_address(1), Some(0x12_8010_0000));
        assert_eq!(write_u32(&mut config, BAR0_REG + 1, 0x8010_0000), None);
        assert_eq!(write_u32(&mut config, BAR0_REG + 2, 0x12), None);

        // Unused BAR registers are hardwired to zero.
        let mut bare = PciConfiguration::new(identity(), PciInterruptPin::None);
        write_u32(&mut bare, BAR0_REG + 2, 0xffff_ffff);
        assert_eq!(bare.read_register(BAR0_REG + 2), 0);
        assert_eq!(bare.bar_address(2), None);
    }

    #[test]
    fn bar_conflicts_are_refused() {
        let mut config = PciConfiguration::new(identity(), PciInterruptPin::None);
        let bar = |index, kind| PciBar {
            index,
            kind,
            size: 0x1000,
            prefetchable: false,
        };
        config.add_bar(bar(0, PciBarKind::Mmio64)).unwrap();
        assert_eq!(
            config.add_bar(bar(1, PciBarKind::Mmio32)),
            Err(ConfigurationError::BarInUse(1))
        );
        assert_eq!(
            config.add_bar(bar(0, PciBarKind::Io)),
            Err(ConfigurationError::BarInUse(0))
        );
        assert!(matches!(
            config.add_bar(bar(5, PciBarKind::Mmio64)),
            Err(ConfigurationError::InvalidBar { index: 5, .. })
        ));
        config.add_bar(bar(2, PciBarKind::Mmio64)).unwrap();
    }

    #[test]
    fn capability_list_is_chained() {
        let mut config = PciConfiguration::new(identity(), PciInterruptPin::None);
        assert!(config.capabilities().is_empty());
        let first = config.add_capability(&[0x09, 0xee, 1, 2, 3]).unwrap();
        let second = config
            .add_capability_with_mask(&[0x11, 0, 0, 0], &[0xff, 0xff, 0x0f, 0])
            .unwrap();
        assert_eq!(first, 0x40);
        assert_eq!(second, 0x48);
        assert_eq!(
            config.status() & STATUS_CAPABILITY_LIST,
            STATUS_CAPABILITY_LIST
        );
        assert_eq!(config.read_register(0x34 / 4) & 0xff, 0x40);
        // The next pointer the caller passed is replaced by the chain.
        assert_eq!(config.read_register(0x40 / 4), 0x0201_4809);
        assert_eq!(config.capabilities(), vec![(0x09, 0x40), (0x11, 0x48)]);
        // Only the masked bits of the second capability are writable.
        config.write_register(0x48 / 4, 0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(config.read_register(0x48 / 4), 0x000f_0011);

        assert_eq!(
            config.add_capability(&[0x05]),
            Err(ConfigurationError::CapabilityTooShort(1))
        );
        assert!(matches!(
            config.add_capability_with_mask(&[0x05, 0, 0], &[0]),
            Err(ConfigurationError::CapabilityMaskLength { .. })
        ));
        assert_eq!(
            config.add_capability(&[0x05; 0xc0]),
            Err(ConfigurationError::CapabilitySpace(0xc0))
        );
        config.add_capability(&[0x05; 0xb0]).unwrap();
        assert_eq!(config.capabilities().len(), 3);
    }

    #[test]
    fn out_of_range_accesses_are_harmless() {
        let mut config = PciConfiguration::new(identity(), PciInterruptPin::IntA);
        config
            .add_bar(PciBar {
                index: 0,
                kind: PciBarKind::Mmio32,
                size: 0x100,
                prefetchable: false,
            })
            .unwrap();
        let before = config.clone();
        assert_eq!(config.read_register(NUM_CONFIG_REGISTERS), 0xffff_ffff);
        assert_eq!(config.read_register(usize::MAX), 0xffff_ffff);
        for reg in [NUM_CONFIG_REGISTERS, usize::MAX] {
            assert_eq!(write_u32(&mut config, reg, 0), None);
        }
        for offset in [3, 4, 5, u64::MAX] {
            assert_eq!(config.write_register(0x10, offset, &[0, 0]), None);
        }
        assert_eq!(config.write_register(1, 0, &[]), None);
        assert_eq!(config.write_register(1, 0, &[1, 2, 3, 4, 5]), None);
        assert_eq!(config.registers, before.registers);
        // The extended space exists and reads as zero (no extended capabilities).
        assert_eq!(config.read_register(0x100 / 4), 0);
        assert!(config.set_bytes(0xffe, &[1, 2]).is_ok());
        assert!(config.set_bytes(0xfff, &[1, 2]).is_err());
        assert!(config.set_bytes(usize::MAX, &[1]).is_err());
        let mut buf = [0u8; 2];
        assert!(config.read_bytes(0xffe, &mut buf).is_ok());
        assert_eq!(buf, [1, 2]);
        assert!(config.read_bytes(0x1000, &mut buf).is_err());
    }

    #[test]
    fn set_registers_loads_raw_values_and_bar_addresses() {
        let build = || {
            let mut config = PciConfiguration::new(identity(), PciInterruptPin::IntA);
            for (index, kind) in [(0, PciBarKind::Mmio32), (2, PciBarKind::Mmio64)] {
                config
                    .add_bar(PciBar {
                        index,
                        kind,
                        size: 0x1000,
                        prefetchable: false,
                    })
                    .unwrap();
            }
            config
        };
        let mut source = build();
        write_u32(&mut source, COMMAND_REG, u32::from(COMMAND_MEMORY_SPACE));
        write_u32(&mut source, BAR0_REG, 0xfebf_0000);
        write_u32(&mut source, BAR0_REG + 2, 0x8000_0000);
        write_u32(&mut source, BAR0_REG + 3, 0x2);
        write_u32(&mut source, INTERRUPT_REG, 11);
        source.set_interrupt_status(true);

        let mut dest = build();
        dest.set_registers(source.registers()).unwrap();
        for reg in 0..NUM_CONFIG_REGISTERS {
            assert_eq!(dest.read_register(reg), source.read_register(reg), "{reg}");
        }
        assert_eq!(dest.status() & STATUS_INTERRUPT, STATUS_INTERRUPT);
        assert_eq!(dest.bar_address(0), Some(0xfebf_0000));
        assert_eq!(dest.bar_address(2), Some(0x2_8000_0000));
        // The guest moving a BAR afterwards is a move from where it was restored.
        assert_eq!(
            write_u32(&mut dest, BAR0_REG, 0xfeb0_0000),
            Some(BarReprogram {
                index: 0,
                old_address: 0xfebf_0000,
                new_address: 0xfeb0_0000
            })
        );

        // Raw values, read-only bits included; a BAR mid-sizing keeps its address.
        let mut raw = source.registers().to_vec();
        raw[0] = 0x5678_1234;
        raw[BAR0_REG] = 0xffff_f000;
        dest.set_registers(&raw).unwrap();
        assert_eq!(dest.read_register(0), 0x5678_1234);
        assert_eq!(dest.bar_address(0), Some(0xfeb0_0000));

        assert_eq!(
            dest.set_registers(&raw[1..]),
            Err(ConfigurationError::RegisterCount {
                expected: NUM_CONFIG_REGISTERS,
                actual: NUM_CONFIG_REGISTERS - 1
            })
        );
        assert_eq!(
            dest.read_register(0),
            0x5678_1234,
            "a refused load changes nothing"
        );
    }
}
