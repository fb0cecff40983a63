//! The pair of cascaded 8259A PICs of a PC (master at 0x20/0x21, slave at 0xa0/0xa1 on the
//! master's IRQ2) plus the ELCR edge/level registers at 0x4d0/0x4d1. Its INTR output goes to
//! the BSP's LINT0; the CPU fetches the vector with [`Pic::acknowledge`].

use serde::{Deserialize, Serialize};

/// I/O ports.
pub const PIC_MASTER_COMMAND: u16 = 0x20;
pub const PIC_MASTER_DATA: u16 = 0x21;
pub const PIC_SLAVE_COMMAND: u16 = 0xa0;
pub const PIC_SLAVE_DATA: u16 = 0xa1;
pub const PIC_ELCR_MASTER: u16 = 0x4d0;
pub const PIC_ELCR_SLAVE: u16 = 0x4d1;

/// The master input the slave is cascaded on.
const CASCADE_IRQ: u8 = 2;

/// One 8259A.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Chip {
    irr: u8,
    imr: u8,
    isr: u8,
    /// Input levels last seen, for edge detection.
    last_level: u8,
    /// Level-triggered inputs (ELCR).
    elcr: u8,
    /// Which ELCR bits exist on this chip.
    elcr_mask: u8,
    vector_base: u8,
    /// Lowest-priority rotation: IRQ (priority_add) has the highest priority.
    priority_add: u8,
    /// 0: ready for OCWs; 1..=3: expecting ICW2..ICW4.
    init_state: u8,
    needs_icw4: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_mask: bool,
    special_fully_nested: bool,
    read_isr: bool,
    poll: bool,
}

impl Chip {
    fn new(elcr_mask: u8) -> Self {
        Self {
            elcr_mask,
            ..Self::default()
        }
    }

    fn set_irq(&mut self, irq: u8, level: bool) {
        let mask = 1u8 << irq;
        if self.elcr & mask != 0 {
            if level {
                self.irr |= mask;
            } else {
                self.irr &= !mask;
            }
        } else if level && self.last_level & mask == 0 {
            self.irr |= mask;
        }
        if level {
            self.last_level |= mask;
        } else {
            self.last_level &= !mask;
        }
    }

    /// Priority (0 = highest) of the best request in `mask` given the rotation, 8 if none.
    fn priority_of(&self, mask: u8) -> u8 {
        if mask == 0 {
            return 8;
        }
        (0..8)
            .find(|p| mask & (1 << ((p + self.priority_add) & 7)) != 0)
            .unwrap_or(8)
    }

    /// The IRQ this chip would raise INTR for, given `extra` requests (the cascade).
    fn pending_irq(&self, extra: u8) -> Option<u8> {
        let requests = (self.irr | extra) & !self.imr;
        let priority = self.priority_of(requests);
        if priority == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            in_service &= !self.imr;
        }
        if self.special_fully_nested && extra != 0 {
            in_service &= !extra;
        }
        (priority < self.priority_of(in_service)).then_some((priority + self.priority_add) & 7)
    }

    fn intack(&mut self, irq: u8) {
        let mask = 1u8 << irq;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (irq + 1) & 7;
            }
        } else {
            self.isr |= mask;
        }
        if self.elcr & mask == 0 {
            self.irr &= !mask;
        }
    }

    fn init_reset(&mut self) {
        let elcr = self.elcr;
        let elcr_mask = self.elcr_mask;
        *self = Self {
            elcr,
            elcr_mask,
            irr: self.irr & elcr,
            ..Self::default()
        };
    }

    fn write_command(&mut self, value: u8) {
        if value & 0x10 != 0 {
            // ICW1.
            self.init_reset();
            self.init_state = 1;
            self.needs_icw4 = value & 1 != 0;
            self.single = value & 2 != 0;
        } else if value & 0x08 != 0 {
            // OCW3.
            if value & 0x04 != 0 {
                self.poll = true;
            }
            if value & 0x02 != 0 {
                self.read_isr = value & 1 != 0;
            }
            if value & 0x40 != 0 {
                self.special_mask = value & 0x20 != 0;
            }
        } else {
            // OCW2.
            match value >> 5 {
                0 => self.rotate_on_auto_eoi = false,
                4 => self.rotate_on_auto_eoi = true,
                1 | 5 => {
                    let priority = self.priority_of(self.isr);
                    if priority != 8 {
                        let irq = (priority + self.priority_add) & 7;
                        self.isr &= !(1 << irq);
                        if value >> 5 == 5 {
                            self.priority_add = (irq + 1) & 7;
                        }
                    }
                }
                3 => self.isr &= !(1 << (value & 7)),
                7 => {
                    let irq = value & 7;
                    self.isr &= !(1 << irq);
                    self.priority_add = (irq + 1) & 7;
                }
                6 => self.priority_add = ((value & 7) + 1) & 7,
                _ => {}
            }
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init_state {
            1 => {
                self.vector_base = value & 0xf8;
                self.init_state = if !self.single {
                    2
                } else if self.needs_icw4 {
                    3
                } else {
                    0
                };
            }
            2 => self.init_state = if self.needs_icw4 { 3 } else { 0 },
            3 => {
                self.special_fully_nested = value & 0x10 != 0;
                self.auto_eoi = value & 0x02 != 0;
                self.init_state = 0;
            }
            _ => self.imr = value,
        }
    }
}

/// Master and slave 8259A (a snapshot keeps it whole).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pic {
    master: Chip,
    slave: Chip,
}

impl Chip {
    fn export(&self) -> crate::portable::PortablePic {
        crate::portable::PortablePic {
            last_level: self.last_level,
            irr: self.irr,
            imr: self.imr,
            isr: self.isr,
            priority_add: self.priority_add,
            vector_base: self.vector_base,
            read_isr: self.read_isr,
            poll: self.poll,
            special_mask: self.special_mask,
            init_state: self.init_state,
            auto_eoi: self.auto_eoi,
            rotate_on_auto_eoi: self.rotate_on_auto_eoi,
            special_fully_nested: self.special_fully_nested,
            needs_icw4: self.needs_icw4,
            elcr: self.elcr,
            elcr_mask: self.elcr_mask,
        }
    }

    fn import(p: &crate::portable::PortablePic) -> Self {
        Chip {
            irr: p.irr,
            imr: p.imr,
            isr: p.isr,
            last_level: p.last_level,
            elcr: p.elcr & p.elcr_mask,
            elcr_mask: p.elcr_mask,
            vector_base: p.vector_base,
            priority_add: p.priority_add & 7,
            init_state: p.init_state.min(3),
            needs_icw4: p.needs_icw4,
            single: false,
            auto_eoi: p.auto_eoi,
            rotate_on_auto_eoi: p.rotate_on_auto_eoi,
            special_mask: p.special_mask,
            special_fully_nested: p.special_fully_nested,
            read_isr: p.read_isr,
            poll: p.poll,
        }
    }
}

impl Pic {
    /// Both chips in the portable form (master first).
    pub fn export(&self) -> [crate::portable::PortablePic; 2] {
        [self.master.export(), self.slave.export()]
    }

    pub fn import(&mut self, chips: &[crate::portable::PortablePic; 2]) {
        self.master = Chip::import(&chips[0]);
        self.slave = Chip::import(&chips[1]);
    }
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

impl Pic {
    pub fn new() -> Self {
        Self {
            // IRQ 0, 1, 2 and 8, 13 are always edge-triggered.
            master: Chip::new(0xf8),
            slave: Chip::new(0xde),
        }
    }

    /// Back to the power-on state (ELCR cleared too).
    pub fn reset(&mut self) {
        *self = Self::new();
    }

    /// Sets the level of input `irq` (0..=15; others ignored).
    pub fn set_irq(&mut self, irq: u32, level: bool) {
        match irq {
            0..=7 => self.master.set_irq(irq as u8, level),
            8..=15 => self.slave.set_irq((irq - 8) as u8, level),
            _ => {}
        }
    }

    /// The slave's INTR as seen on the master's IRQ2.
    fn cascade(&self) -> u8 {
        if self.slave.pending_irq(0).is_some() {
            1 << CASCADE_IRQ
        } else {
            0
        }
    }

    /// INTR: an unmasked request beats the in-service priority.
    pub fn output(&self) -> bool {
        self.master.pending_irq(self.cascade()).is_some()
    }

    /// INTA cycle: returns the vector of the best request (7 / 15 of the chip when the
    /// request vanished: the spurious interrupt).
    pub fn acknowledge(&mut self) -> u8 {
        let cascade = self.cascade();
        let Some(irq) = self.master.pending_irq(cascade) else {
            return self.master.vector_base | 7;
        };
        self.master.intack(irq);
        if irq != CASCADE_IRQ || cascade == 0 {
            return self.master.vector_base | irq;
        }
        match self.slave.pending_irq(0) {
            Some(slave_irq) => {
                self.slave.intack(slave_irq);
                self.slave.vector_base | slave_irq
            }
            None => self.slave.vector_base | 7,
        }
    }

    /// Poll-mode read (OCW3 poll): acknowledges like INTA and returns 0x80 | irq, or 0.
    fn poll_read(&mut self, slave: bool) -> u8 {
        if slave {
            self.slave.poll = false;
            match self.slave.pending_irq(0) {
                Some(irq) => {
                    self.slave.intack(irq);
                    0x80 | irq
                }
                None => 0,
            }
        } else {
            self.master.poll = false;
            match self.master.pending_irq(self.cascade()) {
                Some(irq) => {
                    self.master.intack(irq);
                    0x80 | irq
                }
                None => 0,
            }
        }
    }

    pub fn read_port(&mut self, port: u16) -> u8 {
        match port {
            PIC_MASTER_COMMAND | PIC_SLAVE_COMMAND => {
                let slave = port == PIC_SLAVE_COMMAND;
                let chip = if slave { &self.slave } else { &self.master };
                if chip.poll {
                    return self.poll_read(slave);
                }
                if chip.read_isr {
                    chip.isr
                } else {
                    chip.irr
                }
            }
            PIC_MASTER_DATA => self.master.imr,
            PIC_SLAVE_DATA => self.slave.imr,
            PIC_ELCR_MASTER => self.master.elcr,
            PIC_ELCR_SLAVE => self.slave.elcr,
            _ => 0xff,
        }
    }

    pub fn write_port(&mut self, port: u16, value: u8) {
        match port {
            PIC_MASTER_COMMAND => self.master.write_command(value),
            PIC_MASTER_DATA => self.master.write_data(value),
            PIC_SLAVE_COMMAND => self.slave.write_command(value),
            PIC_SLAVE_DATA => self.slave.write_data(value),
            PIC_ELCR_MASTER => self.master.elcr = value & self.master.elcr_mask,
            PIC_ELCR_SLAVE => self.slave.elcr = value & self.slave.elcr_mask,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence Linux's init_8259A uses (vectors 0x30 / 0x38).
    fn init(pic: &mut Pic, auto_eoi: bool) {
        pic.write_port(0x21, 0xff);
        pic.write_port(0xa1, 0xff);
        pic.write_port(0x20, 0x11);
        pic.write_port(0x21, 0x30);
        pic.write_port(0x21, 0x04);
        pic.write_port(0x21, if auto_eoi { 0x03 } else { 0x01 });
        pic.write_port(0xa0, 0x11);
        pic.write_port(0xa1, 0x38);
        pic.write_port(0xa1, 0x02);
        pic.write_port(0xa1, if auto_eoi { 0x03 } else { 0x01 });
        pic.write_port(0x21, 0x00);
        pic.write_port(0xa1, 0x00);
    }

    #[test]
    fn init_mask_ack_and_eoi() {
        let mut pic = Pic::new();
        init(&mut pic, false);
        assert_eq!(pic.read_port(0x21), 0);
        pic.write_port(0x21, 0x01);
        pic.set_irq(0, true);
        assert!(!pic.output(), "IRQ0 masked");
        pic.write_port(0x21, 0x00);
        assert!(pic.output());
        pic.set_irq(3, true);
        assert_eq!(pic.acknowledge(), 0x30);
        // IRQ3 is lower priority than in-service IRQ0.
        assert!(!pic.output());
        pic.write_port(0x20, 0x0b);
        assert_eq!(pic.read_port(0x20), 0x01, "ISR via OCW3");
        pic.write_port(0x20, 0x20);
        assert_eq!(pic.read_port(0x20), 0x00);
        pic.write_port(0x20, 0x0a);
        assert_eq!(pic.read_port(0x20), 0x08, "IRR via OCW3");
        assert_eq!(pic.acknowledge(), 0x33);
        pic.write_port(0x20, 0x63); // specific EOI IRQ3
        pic.write_port(0x20, 0x0b);
        assert_eq!(pic.read_port(0x20), 0);
        // Edge: held high, no new request.
        assert!(!pic.output());
    }

    #[test]
    fn slave_cascade_and_spurious() {
        let mut pic = Pic::new();
        init(&mut pic, false);
        pic.set_irq(12, true);
        assert!(pic.output());
        assert_eq!(pic.acknowledge(), 0x3c);
        pic.write_port(0x20, 0x0b);
        assert_eq!(pic.read_port(0x20), 0x04);
        pic.write_port(0xa0, 0x20);
        pic.write_port(0x20, 0x20);
        assert_eq!(pic.read_port(0x20), 0);
        // Nothing pending: spurious IRQ7.
        assert_eq!(pic.acknowledge(), 0x37);
    }

    #[test]
    fn level_triggered_with_elcr_and_auto_eoi() {
        let mut pic = Pic::new();
        init(&mut pic, true);
        pic.write_port(0x4d1, 0xff);
        assert_eq!(pic.read_port(0x4d1), 0xde);
        pic.set_irq(10, true);
        assert_eq!(pic.acknowledge(), 0x3a);
        // Auto-EOI and level: still requesting.
        assert!(pic.output());
        pic.set_irq(10, false);
        assert!(!pic.output());
    }

    #[test]
    fn poll_mode() {
        let mut pic = Pic::new();
        init(&mut pic, false);
        pic.set_irq(5, true);
        pic.write_port(0x20, 0x0c);
        assert_eq!(pic.read_port(0x20), 0x85);
        pic.write_port(0x20, 0x0c);
        assert_eq!(pic.read_port(0x20), 0x00);
    }
}
