//! An 82093AA-style IOAPIC (version 0x11, 24 pins): turns device interrupt lines into APIC
//! messages through the [`ApicRouter`]. Level-triggered pins hold a remote IRR from delivery
//! until the local APIC's EOI comes back via [`Ioapic::end_of_interrupt`], and are delivered
//! again if the line is still asserted then.

use std::sync::Arc;

use crate::router::{ApicMessage, ApicRouter, DeliveryMode, Destination};
use serde::{Deserialize, Serialize};

/// Number of redirection entries (pins).
pub const IOAPIC_NUM_PINS: usize = 24;
/// Default MMIO base and size of the register window.
pub const IOAPIC_DEFAULT_BASE: u64 = 0xfec0_0000;
pub const IOAPIC_MMIO_SIZE: u64 = 0x20;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_REDIRECTION_FIRST: u32 = 0x10;
/// Version 0x11, maximum redirection entry 23.
const IOAPIC_VERSION: u32 = 0x0017_0011;

const ENTRY_DELIVERY_STATUS: u64 = 1 << 12;
const ENTRY_ACTIVE_LOW: u64 = 1 << 13;
const ENTRY_REMOTE_IRR: u64 = 1 << 14;
const ENTRY_LEVEL: u64 = 1 << 15;
const ENTRY_MASKED: u64 = 1 << 16;
const ENTRY_LOGICAL: u64 = 1 << 11;
/// Bits the guest can write (everything but delivery status and remote IRR).
const ENTRY_WRITABLE: u64 = 0xff00_0000_0001_afff;

/// The IOAPIC state.
/// The IOAPIC's registers and pin levels, as a snapshot keeps them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    id: u32,
    select: u32,
    entries: [u64; IOAPIC_NUM_PINS],
    lines: [bool; IOAPIC_NUM_PINS],
}

pub struct Ioapic {
    router: Arc<ApicRouter>,
    id: u32,
    select: u32,
    entries: [u64; IOAPIC_NUM_PINS],
    /// Raw input level of each pin, before polarity.
    lines: [bool; IOAPIC_NUM_PINS],
}

impl Ioapic {
    pub fn save(&self) -> IoapicState {
        IoapicState {
            id: self.id,
            select: self.select,
            entries: self.entries,
            lines: self.lines,
        }
    }

    /// The portable form (for another accelerator).
    pub fn export(&self) -> crate::portable::PortableIoapic {
        crate::portable::PortableIoapic {
            id: self.id,
            select: self.select,
            entries: self.entries,
            lines: self
                .lines
                .iter()
                .enumerate()
                .fold(0, |acc, (pin, &on)| acc | (u32::from(on) << pin)),
        }
    }

    pub fn import(&mut self, p: &crate::portable::PortableIoapic) {
        self.id = p.id;
        self.select = p.select;
        self.entries = p.entries;
        for (pin, line) in self.lines.iter_mut().enumerate() {
            *line = p.lines & (1 << pin) != 0;
        }
    }

    pub fn restore(&mut self, s: &IoapicState) {
        self.id = s.id;
        self.select = s.select;
        self.entries = s.entries;
        self.lines = s.lines;
    }

    pub fn new(router: Arc<ApicRouter>) -> Self {
        Self {
            router,
            id: 0,
            select: 0,
            entries: [ENTRY_MASKED; IOAPIC_NUM_PINS],
            lines: [false; IOAPIC_NUM_PINS],
        }
    }

    /// Back to the power-on state (all pins masked); input line levels are kept.
    pub fn reset(&mut self) {
        self.id = 0;
        self.select = 0;
        self.entries = [ENTRY_MASKED; IOAPIC_NUM_PINS];
    }

    /// The pin's level after polarity: true means "interrupt requested".
    fn asserted(&self, pin: usize) -> bool {
        self.lines[pin] != (self.entries[pin] & ENTRY_ACTIVE_LOW != 0)
    }

    /// Sets the raw level of input `pin` (out-of-range pins are ignored).
    pub fn set_irq(&mut self, pin: u32, level: bool) {
        let pin = pin as usize;
        if pin >= IOAPIC_NUM_PINS {
            return;
        }
        let was = self.asserted(pin);
        self.lines[pin] = level;
        let now = self.asserted(pin);
        if self.entries[pin] & ENTRY_LEVEL != 0 {
            if now {
                self.service_level(pin);
            }
        } else if now && !was {
            self.deliver(pin);
        }
    }

    /// Delivers a level-triggered pin if it is asserted, unmasked and not awaiting EOI.
    fn service_level(&mut self, pin: usize) {
        let entry = self.entries[pin];
        if entry & ENTRY_LEVEL != 0
            && entry & ENTRY_REMOTE_IRR == 0
            && entry & ENTRY_MASKED == 0
            && self.asserted(pin)
        {
            self.entries[pin] |= ENTRY_REMOTE_IRR;
            self.deliver(pin);
        }
    }

    fn deliver(&mut self, pin: usize) {
        let entry = self.entries[pin];
        if entry & ENTRY_MASKED != 0 {
            return;
        }
        let mode = match (entry >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            7 => DeliveryMode::ExtInt,
            _ => return,
        };
        let dest = (entry >> 56) as u32;
        let dest = if entry & ENTRY_LOGICAL != 0 {
            Destination::Logical(dest)
        } else {
            Destination::Physical(dest)
        };
        self.router.deliver(ApicMessage {
            dest,
            mode,
            vector: entry as u8,
            level_triggered: entry & ENTRY_LEVEL != 0,
        });
    }

    /// A local APIC signalled EOI for a level-triggered `vector`: clear remote IRR of the
    /// pins using it and deliver again those still asserted.
    pub fn end_of_interrupt(&mut self, vector: u8) {
        for pin in 0..IOAPIC_NUM_PINS {
            let entry = self.entries[pin];
            if entry as u8 == vector && entry & ENTRY_REMOTE_IRR != 0 {
                self.entries[pin] &= !ENTRY_REMOTE_IRR;
                self.service_level(pin);
            }
        }
    }

    fn read_register(&self) -> u32 {
        match self.select {
            REG_ID | REG_ARBITRATION => self.id << 24,
            REG_VERSION => IOAPIC_VERSION,
            reg if (REG_REDIRECTION_FIRST..REG_REDIRECTION_FIRST + 2 * 24).contains(&reg) => {
                let index = reg - REG_REDIRECTION_FIRST;
                let entry = self.entries[(index / 2) as usize];
                if index.is_multiple_of(2) {
                    entry as u32
                } else {
                    (entry >> 32) as u32
                }
            }
            _ => 0,
        }
    }

    fn write_register(&mut self, value: u32) {
        match self.select {
            REG_ID => self.id = (value >> 24) & 0xf,
            reg if (REG_REDIRECTION_FIRST..REG_REDIRECTION_FIRST + 2 * 24).contains(&reg) => {
                let index = reg - REG_REDIRECTION_FIRST;
                let pin = (index / 2) as usize;
                let old = self.entries[pin];
                let mut new = if index.is_multiple_of(2) {
                    (old & !0xffff_ffff) | u64::from(value)
                } else {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                };
                new = (new & ENTRY_WRITABLE) | (old & (ENTRY_REMOTE_IRR | ENTRY_DELIVERY_STATUS));
                // Switching to edge clears remote IRR (Linux's EOI trick for version 0x11).
                if new & ENTRY_LEVEL == 0 {
                    new &= !ENTRY_REMOTE_IRR;
                }
                self.entries[pin] = new;
                // A level pin still asserted when unmasked or reprogrammed fires now.
                self.service_level(pin);
            }
            _ => {}
        }
    }

    /// MMIO read at `offset` within the window (IOREGSEL at 0, IOWIN at 0x10).
    pub fn read_mmio(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset & !3 {
            IOREGSEL => self.select,
            IOWIN => self.read_register(),
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let start = (offset & 3) as usize;
        for (i, out) in data.iter_mut().enumerate() {
            *out = bytes.get(start + i).copied().unwrap_or(0);
        }
    }

    /// MMIO write at `offset` (32-bit accesses; a byte write to IOREGSEL is accepted too).
    pub fn write_mmio(&mut self, offset: u64, data: &[u8]) {
        if offset & 3 != 0 || data.is_empty() {
            return;
        }
        let mut bytes = [0u8; 4];
        let n = data.len().min(4);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(bytes);
        match offset {
            IOREGSEL => self.select = value & 0xff,
            IOWIN if data.len() >= 4 => self.write_register(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::InboxContents;

    fn write_reg(io: &mut Ioapic, reg: u32, value: u32) {
        io.write_mmio(0, &reg.to_le_bytes());
        io.write_mmio(0x10, &value.to_le_bytes());
    }

    fn read_reg(io: &mut Ioapic, reg: u32) -> u32 {
        io.write_mmio(0, &reg.to_le_bytes());
        let mut buf = [0u8; 4];
        io.read_mmio(0x10, &mut buf);
        u32::from_le_bytes(buf)
    }

    fn program(io: &mut Ioapic, pin: u32, low: u32, dest: u8) {
        write_reg(io, 0x11 + 2 * pin, u32::from(dest) << 24);
        write_reg(io, 0x10 + 2 * pin, low);
    }

    fn has(c: &InboxContents, vector: u8) -> bool {
        c.fixed[usize::from(vector >> 6)] & (1 << (vector & 63)) != 0
    }

    #[test]
    fn registers() {
        let router = ApicRouter::new(1);
        let mut io = Ioapic::new(router);
        assert_eq!(read_reg(&mut io, 1), 0x0017_0011);
        write_reg(&mut io, 0, 0x0300_0000);
        assert_eq!(read_reg(&mut io, 0), 0x0300_0000);
        assert_eq!(read_reg(&mut io, 0x10), 0x0001_0000);
        program(&mut io, 5, 0x0001_a035, 0x01);
        assert_eq!(read_reg(&mut io, 0x1a), 0x0001_a035);
        assert_eq!(read_reg(&mut io, 0x1b), 0x0100_0000);
    }

    #[test]
    fn edge_triggered_delivers_on_rising_edge_only() {
        let router = ApicRouter::new(2);
        let mut io = Ioapic::new(router.clone());
        program(&mut io, 4, 0x24, 1);
        io.set_irq(4, true);
        assert!(has(&router.inbox(1).take(), 0x24));
        assert!(!router.inbox(0).has_work());
        io.set_irq(4, true);
        assert!(!router.inbox(1).has_work());
        io.set_irq(4, false);
        io.set_irq(4, true);
        assert!(router.inbox(1).has_work());
    }

    #[test]
    fn masked_pin_does_not_deliver() {
        let router = ApicRouter::new(1);
        let mut io = Ioapic::new(router.clone());
        program(&mut io, 3, 0x0001_0023, 0);
        io.set_irq(3, true);
        assert!(!router.inbox(0).has_work());
    }

    #[test]
    fn level_active_low_with_remote_irr() {
        let router = ApicRouter::new(1);
        let mut io = Ioapic::new(router.clone());
        // Level, active low, masked first.
        program(&mut io, 16, 0x0001_a041, 0);
        io.set_irq(16, true); // deasserted (active low)
        io.set_irq(16, false); // asserted, but masked
        assert!(!router.inbox(0).has_work());
        // Unmasking an asserted level pin delivers.
        program(&mut io, 16, 0x0000_a041, 0);
        let got = router.inbox(0).take();
        assert!(has(&got, 0x41));
        assert_eq!(got.level[1] & 2, 2);
        assert_ne!(read_reg(&mut io, 0x30) & (1 << 14), 0, "remote IRR set");
        // Still asserted: nothing more until EOI.
        io.set_irq(16, false);
        assert!(!router.inbox(0).has_work());
        io.end_of_interrupt(0x41);
        assert!(
            has(&router.inbox(0).take(), 0x41),
            "redelivered while asserted"
        );
        // Deassert, then EOI: remote IRR clears and nothing is sent.
        io.set_irq(16, true);
        io.end_of_interrupt(0x41);
        assert!(!router.inbox(0).has_work());
        assert_eq!(read_reg(&mut io, 0x30) & (1 << 14), 0);
    }

    #[test]
    fn switching_to_edge_clears_remote_irr() {
        let router = ApicRouter::new(1);
        let mut io = Ioapic::new(router.clone());
        program(&mut io, 10, 0x0000_8050, 0);
        io.set_irq(10, true);
        router.inbox(0).take();
        assert_ne!(read_reg(&mut io, 0x24) & (1 << 14), 0);
        program(&mut io, 10, 0x0001_0050, 0);
        assert_eq!(read_reg(&mut io, 0x24) & (1 << 14), 0);
    }

    #[test]
    fn level_interrupt_round_trip_through_a_local_apic() {
        use crate::clock::VirtualClock;
        use crate::lapic::LocalApic;
        use std::sync::Mutex;

        let router = ApicRouter::new(1);
        let io = Arc::new(Mutex::new(Ioapic::new(router.clone())));
        let listener_io = io.clone();
        router.set_eoi_listener(Box::new(move |vector| {
            listener_io.lock().unwrap().end_of_interrupt(vector);
        }));
        let clock = Arc::new(VirtualClock::new_manual());
        let mut apic = LocalApic::new(0, true, router.inbox(0), router.clone(), clock);
        apic.write_mmio(0xf0, &0x1ffu32.to_le_bytes());
        program(&mut io.lock().unwrap(), 16, 0x0000_a051, 0);
        io.lock().unwrap().set_irq(16, false); // active low: asserted
        apic.poll();
        assert_eq!(apic.acknowledge(), Some(0x51));
        // EOI while still asserted: delivered again.
        apic.write_mmio(0xb0, &0u32.to_le_bytes());
        apic.poll();
        assert_eq!(apic.acknowledge(), Some(0x51));
        io.lock().unwrap().set_irq(16, true);
        apic.write_mmio(0xb0, &0u32.to_le_bytes());
        apic.poll();
        assert!(!apic.has_interrupt());
        assert_eq!(read_reg(&mut io.lock().unwrap(), 0x30) & (1 << 14), 0);
    }
}
