//! The platform's state in a form another accelerator takes (KVM's in-kernel PICs, IOAPIC
//! and PIT model the same chips): each chip's registers, with times as guest ns. With
//! [`crate::cpu::PortableCpu`], what lets a guest saved here load under KVM and back.

use serde::{Deserialize, Serialize};

use crate::ioapic::IOAPIC_NUM_PINS;

/// One 8259.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortablePic {
    /// Input levels last seen (edge detection).
    pub last_level: u8,
    pub irr: u8,
    pub imr: u8,
    pub isr: u8,
    pub priority_add: u8,
    pub vector_base: u8,
    /// OCW3 selected the ISR for reads (else the IRR).
    pub read_isr: bool,
    pub poll: bool,
    pub special_mask: bool,
    /// 0: ready; 1..=3: expecting ICW2..ICW4.
    pub init_state: u8,
    pub auto_eoi: bool,
    pub rotate_on_auto_eoi: bool,
    pub special_fully_nested: bool,
    pub needs_icw4: bool,
    pub elcr: u8,
    pub elcr_mask: u8,
}

/// The IOAPIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortableIoapic {
    pub id: u32,
    pub select: u32,
    pub entries: [u64; IOAPIC_NUM_PINS],
    /// Input level of each pin, one bit per pin.
    pub lines: u32,
}

/// One 8254 channel (access states: 1 LSB, 2 MSB, 3 word low byte next, 4 high byte).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortablePitChannel {
    /// Reload value, 1..=0x10000.
    pub count: u32,
    /// Guest ns at which counting started; None until a count follows a mode set.
    pub load_ns: Option<u64>,
    pub latched_count: Option<u16>,
    /// Which bytes of the latched count are left to read (an access state).
    pub latched_state: u8,
    pub latched_status: Option<u8>,
    pub read_state: u8,
    pub write_state: u8,
    pub write_low: u8,
    pub access: u8,
    pub mode: u8,
    pub bcd: bool,
    pub gate: bool,
}

/// The whole platform: guest time and the three chips.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortablePlatform {
    pub guest_ns: u64,
    pub pic: [PortablePic; 2],
    pub ioapic: PortableIoapic,
    pub pit: [PortablePitChannel; 3],
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::clock::VirtualClock;
    use crate::ioapic::Ioapic;
    use crate::pic::Pic;
    use crate::pit::Pit;
    use crate::router::ApicRouter;

    /// Each chip programmed as a guest would, exported and imported into a fresh one,
    /// exports the same and answers the guest the same.
    #[test]
    fn the_chips_go_to_the_portable_form_and_back() {
        let mut pic = Pic::new();
        for (port, value) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0x21, 0xfa),
        ] {
            pic.write_port(port, value);
        }
        pic.set_irq(0, true);
        let mut other = Pic::new();
        other.import(&pic.export());
        assert_eq!(other.export(), pic.export());
        assert_eq!(other.read_port(0x21), 0xfa);

        let router = ApicRouter::new(1);
        let mut ioapic = Ioapic::new(router.clone());
        ioapic.write_mmio(0, &0x10u32.to_le_bytes());
        ioapic.write_mmio(0x10, &0x0000_a031u32.to_le_bytes());
        ioapic.set_irq(3, true);
        let mut other = Ioapic::new(router);
        other.import(&ioapic.export());
        assert_eq!(other.export(), ioapic.export());
        let mut low = [0u8; 4];
        other.read_mmio(0x10, &mut low);
        assert_eq!(u32::from_le_bytes(low) & 0xff, 0x31);

        let clock = Arc::new(VirtualClock::new());
        clock.set_now_ns(5_000_000_000);
        let mut pit = Pit::new(clock.clone());
        for (port, value) in [(0x43, 0x34), (0x40, 0x9c), (0x40, 0x2e)] {
            pit.write_port(port, value);
        }
        let mut other = Pit::new(clock);
        other.import(&pit.export());
        let (a, b) = (pit.export(), other.export());
        assert_eq!(a[1..], b[1..]);
        let load = |c: &super::PortablePitChannel| c.load_ns.unwrap_or(0);
        assert!(load(&a[0]).abs_diff(load(&b[0])) < 1_000, "{a:?} {b:?}");
        assert_eq!(b[0].count, 0x2e9c);
        assert_eq!(b[0].mode, 2);
    }
}
