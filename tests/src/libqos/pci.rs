//! PCI for qtest: configuration mechanism #1 (ports 0xCF8/0xCFC), enumeration of bus 0,
//! BAR sizing and assignment from the machine's windows, command register bits, and the
//! capability list.

use vmm::arch::layout;
use vmm::pci::bus::PCI_IO_WINDOW;

use crate::qtest::{Qtest, QtestError};

pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const CONFIG_DATA_PORT: u16 = 0xcfc;

// Configuration header offsets and bits.
pub const VENDOR_ID: u8 = 0x00;
pub const DEVICE_ID: u8 = 0x02;
pub const COMMAND: u8 = 0x04;
pub const STATUS: u8 = 0x06;
pub const REVISION_ID: u8 = 0x08;
pub const HEADER_TYPE: u8 = 0x0e;
pub const BAR0: u8 = 0x10;
pub const SUBSYSTEM_VENDOR_ID: u8 = 0x2c;
pub const SUBSYSTEM_ID: u8 = 0x2e;
pub const CAPABILITIES_POINTER: u8 = 0x34;
pub const INTERRUPT_LINE: u8 = 0x3c;
pub const INTERRUPT_PIN: u8 = 0x3d;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

pub const CAP_ID_MSI: u8 = 0x05;
pub const CAP_ID_VENDOR: u8 = 0x09;
pub const CAP_ID_MSIX: u8 = 0x11;

/// BARs in a type 0 header.
pub const NUM_BARS: u8 = 6;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error(transparent)]
    Qtest(#[from] QtestError),
    #[error("no PCI function at {0}")]
    NoFunction(PciAddress),
    #[error("config offset {offset:#x} of width {width} is not naturally aligned")]
    Unaligned { offset: u8, width: u8 },
    #[error("{addr}: BAR {index} is the upper half of a 64-bit BAR or not implemented")]
    NoSuchBar { addr: PciAddress, index: u8 },
    #[error("{addr}: 64-bit BAR {index} has no upper half (it is the last BAR)")]
    TruncatedBar64 { addr: PciAddress, index: u8 },
    #[error("no room for a {kind:?} BAR of {size:#x} bytes in its window")]
    WindowFull { kind: BarKind, size: u64 },
    #[error("{addr}: the capability list loops or leaves the header (at {offset:#x})")]
    BadCapabilityList { addr: PciAddress, offset: u8 },
}

/// Bus, device and function numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PciAddress {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciAddress {
    pub fn new(bus: u8, device: u8, function: u8) -> Self {
        Self {
            bus,
            device: device & 0x1f,
            function: function & 0x7,
        }
    }

    /// The value for the CONFIG_ADDRESS port selecting the dword that holds `offset`.
    pub fn config_address(self, offset: u8) -> u32 {
        (1 << 31)
            | (u32::from(self.bus) << 16)
            | (u32::from(self.device) << 11)
            | (u32::from(self.function) << 8)
            | u32::from(offset & 0xfc)
    }
}

impl std::fmt::Display for PciAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

fn check_aligned(offset: u8, width: u8) -> Result<(), PciError> {
    if !offset.is_multiple_of(width) {
        return Err(PciError::Unaligned { offset, width });
    }
    Ok(())
}

fn data_port(offset: u8) -> u16 {
    CONFIG_DATA_PORT + u16::from(offset & 3)
}

pub fn config_readb(qt: &mut Qtest, addr: PciAddress, offset: u8) -> Result<u8, PciError> {
    qt.outl(CONFIG_ADDRESS_PORT, addr.config_address(offset))?;
    Ok(qt.inb(data_port(offset))?)
}

pub fn config_readw(qt: &mut Qtest, addr: PciAddress, offset: u8) -> Result<u16, PciError> {
    check_aligned(offset, 2)?;
    qt.outl(CONFIG_ADDRESS_PORT, addr.config_address(offset))?;
    Ok(qt.inw(data_port(offset))?)
}

pub fn config_readl(qt: &mut Qtest, addr: PciAddress, offset: u8) -> Result<u32, PciError> {
    check_aligned(offset, 4)?;
    qt.outl(CONFIG_ADDRESS_PORT, addr.config_address(offset))?;
    Ok(qt.inl(CONFIG_DATA_PORT)?)
}

pub fn config_writeb(qt: &mut Qtest, addr: PciAddress, offset: u8, v: u8) -> Result<(), PciError> {
    qt.outl(CONFIG_ADDRESS_PORT, addr.config_address(offset))?;
    Ok(qt.outb(data_port(offset), v)?)
}

pub fn config_writew(qt: &mut Qtest, addr: PciAddress, offset: u8, v: u16) -> Result<(), PciError> {
    check_aligned(offset, 2)?;
    qt.outl(CONFIG_ADDRESS_PORT, addr.config_address(offset))?;
    Ok(qt.outw(data_port(offset), v)?)
}

pub fn config_writel(qt: &mut Qtest, addr: PciAddress, offset: u8, v: u32) -> Result<(), PciError> {
    check_aligned(offset, 4)?;
    qt.outl(CONFIG_ADDRESS_PORT, addr.config_address(offset))?;
    Ok(qt.outl(CONFIG_DATA_PORT, v)?)
}

/// One function found on the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciFunction {
    pub addr: PciAddress,
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision: u8,
    /// Base class, subclass and programming interface.
    pub class: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub header_type: u8,
}

impl PciFunction {
    /// Read a present function's identity; None if nothing answers there.
    pub fn probe(qt: &mut Qtest, addr: PciAddress) -> Result<Option<PciFunction>, PciError> {
        let id = config_readl(qt, addr, VENDOR_ID)?;
        let vendor_id = id as u16;
        if vendor_id == 0xffff || vendor_id == 0 {
            return Ok(None);
        }
        let class_rev = config_readl(qt, addr, REVISION_ID)?;
        let header_type = config_readb(qt, addr, HEADER_TYPE)?;
        Ok(Some(PciFunction {
            addr,
            vendor_id,
            device_id: (id >> 16) as u16,
            revision: class_rev as u8,
            prog_if: (class_rev >> 8) as u8,
            subclass: (class_rev >> 16) as u8,
            class: (class_rev >> 24) as u8,
            header_type,
        }))
    }

    pub fn is_multifunction(&self) -> bool {
        self.header_type & 0x80 != 0
    }
}

/// Every function on bus 0, in slot order.
pub fn enumerate_bus0(qt: &mut Qtest) -> Result<Vec<PciFunction>, PciError> {
    let mut found = Vec::new();
    for device in 0..32 {
        let Some(f0) = PciFunction::probe(qt, PciAddress::new(0, device, 0))? else {
            continue;
        };
        let multi = f0.is_multifunction();
        found.push(f0);
        if multi {
            for function in 1..8 {
                if let Some(f) = PciFunction::probe(qt, PciAddress::new(0, device, function))? {
                    found.push(f);
                }
            }
        }
    }
    Ok(found)
}

/// The first function on bus 0 with these ids.
pub fn find_device(
    qt: &mut Qtest,
    vendor_id: u16,
    device_id: u16,
) -> Result<Option<PciFunction>, PciError> {
    Ok(enumerate_bus0(qt)?
        .into_iter()
        .find(|f| f.vendor_id == vendor_id && f.device_id == device_id))
}

pub fn command(qt: &mut Qtest, addr: PciAddress) -> Result<u16, PciError> {
    config_readw(qt, addr, COMMAND)
}

pub fn set_command(qt: &mut Qtest, addr: PciAddress, v: u16) -> Result<(), PciError> {
    config_writew(qt, addr, COMMAND, v)
}

/// Turn on memory decoding, I/O decoding and bus mastering as asked (others unchanged).
pub fn enable(
    qt: &mut Qtest,
    addr: PciAddress,
    io: bool,
    memory: bool,
    bus_master: bool,
) -> Result<(), PciError> {
    let mut cmd = command(qt, addr)?;
    for (on, bit) in [
        (io, COMMAND_IO),
        (memory, COMMAND_MEMORY),
        (bus_master, COMMAND_BUS_MASTER),
    ] {
        if on {
            cmd |= bit;
        }
    }
    set_command(qt, addr, cmd)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

/// One implemented BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub index: u8,
    pub kind: BarKind,
    pub prefetchable: bool,
    pub size: u64,
    /// Where it is programmed now.
    pub address: u64,
}

/// The size a BAR answers to an all-ones write: `readback` is the value read back (both
/// halves for a 64-bit BAR), with the type bits still in it. 0 for an unimplemented BAR.
pub fn bar_size_from_mask(kind: BarKind, readback: u64) -> u64 {
    let mask = match kind {
        BarKind::Io => (readback & !0x3) | 0xffff_ffff_0000_0000,
        BarKind::Mem32 => (readback & !0xf) | 0xffff_ffff_0000_0000,
        BarKind::Mem64 => readback & !0xf,
    };
    if mask == 0xffff_ffff_0000_0000 || mask == 0 {
        return 0;
    }
    let size = (!mask).wrapping_add(1);
    // An I/O BAR decodes at most 16 address bits.
    if kind == BarKind::Io {
        size & 0xffff_ffff
    } else {
        size
    }
}

/// Size every BAR of `addr` (decoding is switched off meanwhile and the addresses kept).
pub fn probe_bars(qt: &mut Qtest, addr: PciAddress) -> Result<Vec<Bar>, PciError> {
    let cmd = command(qt, addr)?;
    set_command(qt, addr, cmd & !(COMMAND_IO | COMMAND_MEMORY))?;
    let result = size_bars(qt, addr);
    set_command(qt, addr, cmd)?;
    result
}

fn size_bars(qt: &mut Qtest, addr: PciAddress) -> Result<Vec<Bar>, PciError> {
    let mut bars = Vec::new();
    let mut index = 0;
    while index < NUM_BARS {
        let off = BAR0 + 4 * index;
        let orig = config_readl(qt, addr, off)?;
        config_writel(qt, addr, off, 0xffff_ffff)?;
        let lo = config_readl(qt, addr, off)?;
        config_writel(qt, addr, off, orig)?;
        let kind = if orig & 1 == 1 {
            BarKind::Io
        } else if (orig >> 1) & 3 == 2 {
            BarKind::Mem64
        } else {
            BarKind::Mem32
        };
        let (readback, address, width) = if kind == BarKind::Mem64 {
            if index + 1 >= NUM_BARS {
                return Err(PciError::TruncatedBar64 { addr, index });
            }
            let hi_off = off + 4;
            let orig_hi = config_readl(qt, addr, hi_off)?;
            config_writel(qt, addr, hi_off, 0xffff_ffff)?;
            let hi = config_readl(qt, addr, hi_off)?;
            config_writel(qt, addr, hi_off, orig_hi)?;
            (
                u64::from(lo) | (u64::from(hi) << 32),
                u64::from(orig & !0xf) | (u64::from(orig_hi) << 32),
                2,
            )
        } else if kind == BarKind::Io {
            (u64::from(lo), u64::from(orig & !0x3), 1)
        } else {
            (u64::from(lo), u64::from(orig & !0xf), 1)
        };
        let size = bar_size_from_mask(kind, readback);
        if size != 0 {
            bars.push(Bar {
                index,
                kind,
                prefetchable: kind != BarKind::Io && orig & 0x8 != 0,
                size,
                address,
            });
        }
        index += width;
    }
    Ok(bars)
}

/// One address window that BARs are carved from, first fit, naturally aligned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub next: u64,
    pub end: u64,
}

impl Window {
    pub fn new(start: u64, size: u64) -> Self {
        Self {
            next: start,
            end: start.saturating_add(size),
        }
    }

    fn alloc(&mut self, size: u64) -> Option<u64> {
        if size == 0 || !size.is_power_of_two() {
            return None;
        }
        let addr = self.next.checked_next_multiple_of(size)?;
        let end = addr.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(addr)
    }
}

/// Hands out BAR addresses from the machine's PCI windows (vmm/src/arch/layout.rs).
#[derive(Clone, Debug)]
pub struct BarAllocator {
    pub io: Window,
    pub mmio32: Window,
    pub mmio64: Window,
}

impl BarAllocator {
    /// The windows of a machine with `ram_size` bytes of RAM: the 64-bit window starts
    /// past RAM and 4 GiB, 1 GiB aligned, as the vmm places it.
    pub fn for_ram(ram_size: u64) -> Self {
        let ram_end = vmm::memory::ram_ranges(ram_size)
            .last()
            .map(|r| r.guest_addr.0 + r.size)
            .unwrap_or(0);
        let mmio64_start = ram_end
            .max(layout::RAM_64BIT_START.0)
            .next_multiple_of(1 << 30);
        Self {
            io: Window::new(PCI_IO_WINDOW.start, PCI_IO_WINDOW.size),
            mmio32: Window::new(layout::PCI_MMIO32_START.0, layout::PCI_MMIO32_SIZE),
            mmio64: Window::new(mmio64_start, layout::PCI_MMIO64_SIZE),
        }
    }

    /// An address for a BAR of `kind` and `size`. 64-bit BARs go above 4 GiB.
    pub fn alloc(&mut self, kind: BarKind, size: u64) -> Result<u64, PciError> {
        let window = match kind {
            BarKind::Io => &mut self.io,
            BarKind::Mem32 => &mut self.mmio32,
            BarKind::Mem64 => &mut self.mmio64,
        };
        window
            .alloc(size)
            .ok_or(PciError::WindowFull { kind, size })
    }
}

/// Size the BARs of `addr` and program each at an address from `alloc`. Decoding stays
/// off; turn it on with [`enable`]. Returns the BARs at their new addresses.
pub fn assign_bars(
    qt: &mut Qtest,
    addr: PciAddress,
    alloc: &mut BarAllocator,
) -> Result<Vec<Bar>, PciError> {
    let cmd = command(qt, addr)?;
    set_command(qt, addr, cmd & !(COMMAND_IO | COMMAND_MEMORY))?;
    let mut bars = size_bars(qt, addr)?;
    for bar in &mut bars {
        let at = alloc.alloc(bar.kind, bar.size)?;
        let off = BAR0 + 4 * bar.index;
        let low_flags =
            config_readl(qt, addr, off)? & if bar.kind == BarKind::Io { 0x3 } else { 0xf };
        config_writel(qt, addr, off, (at as u32) | low_flags)?;
        if bar.kind == BarKind::Mem64 {
            config_writel(qt, addr, off + 4, (at >> 32) as u32)?;
        }
        bar.address = at;
    }
    Ok(bars)
}

/// One entry of the capability list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub id: u8,
    pub offset: u8,
}

/// Walk the capability list (empty when the status register says there is none).
pub fn capabilities(qt: &mut Qtest, addr: PciAddress) -> Result<Vec<Capability>, PciError> {
    let status = config_readw(qt, addr, STATUS)?;
    if status & STATUS_CAPABILITIES == 0 {
        return Ok(Vec::new());
    }
    let mut caps = Vec::new();
    let mut ptr = config_readb(qt, addr, CAPABILITIES_POINTER)? & !0x3;
    while ptr != 0 {
        // Capabilities live after the standard header; at most 48 fit in 256 bytes.
        if ptr < 0x40 || caps.len() >= 48 || caps.iter().any(|c: &Capability| c.offset == ptr) {
            return Err(PciError::BadCapabilityList { addr, offset: ptr });
        }
        let id = config_readb(qt, addr, ptr)?;
        caps.push(Capability { id, offset: ptr });
        ptr = config_readb(qt, addr, ptr + 1)? & !0x3;
    }
    Ok(caps)
}

/// The offset of the first capability with `id`.
pub fn find_capability(qt: &mut Qtest, addr: PciAddress, id: u8) -> Result<Option<u8>, PciError> {
    Ok(capabilities(qt, addr)?
        .into_iter()
        .find(|c| c.id == id)
        .map(|c| c.offset))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_address_encoding() {
        let a = PciAddress::new(0, 3, 1);
        assert_eq!(a.config_address(0x10), 0x8000_1910);
        assert_eq!(a.config_address(0x13), 0x8000_1910);
        assert_eq!(a.to_string(), "00:03.1");
    }

    #[test]
    fn bar_sizes() {
        assert_eq!(bar_size_from_mask(BarKind::Mem32, 0xffff_f000), 0x1000);
        assert_eq!(bar_size_from_mask(BarKind::Mem32, 0xffff_f008), 0x1000);
        assert_eq!(bar_size_from_mask(BarKind::Io, 0xffff_ffe1), 0x20);
        assert_eq!(
            bar_size_from_mask(BarKind::Mem64, 0xffff_ffff_ffff_c00c),
            0x4000
        );
        assert_eq!(
            bar_size_from_mask(BarKind::Mem64, 0xffff_fff0_0000_000c),
            0x10_0000_0000
        );
        assert_eq!(bar_size_from_mask(BarKind::Mem32, 0), 0);
        assert_eq!(bar_size_from_mask(BarKind::Mem64, 0), 0);
    }

    #[test]
    fn allocation_is_aligned_and_bounded() {
        let mut a = BarAllocator::for_ram(128 << 20);
        assert_eq!(a.mmio64.next, 1 << 32);
        assert_eq!(a.alloc(BarKind::Mem32, 0x100).unwrap(), 0xc000_0000);
        assert_eq!(a.alloc(BarKind::Mem32, 0x4000).unwrap(), 0xc000_4000);
        assert_eq!(a.alloc(BarKind::Io, 0x20).unwrap(), 0xc000);
        assert_eq!(a.alloc(BarKind::Mem64, 0x8000).unwrap(), 1 << 32);
        assert!(a.alloc(BarKind::Mem32, 0x3000).is_err());
        assert!(a.alloc(BarKind::Mem32, 0x4000_0000).is_err());
        assert!(a.alloc(BarKind::Io, 0x8000).is_err());
        let big = BarAllocator::for_ram(6 << 30);
        // 3 GiB below the hole, 3 GiB from 4 GiB: RAM ends at 7 GiB.
        assert_eq!(big.mmio64.next, 7 << 30);
    }
}
