//! ACPI PCI hot-plug for the slots of PCI bus 0, in the manner of QEMU's `hw/acpi/pcihp.c`.
//!
//! The guest learns of changes through the Generic Event Device: the vmm records a change in
//! the registers below and raises [`GedEvent::PciHotplug`]; the DSDT's `_EVT` then calls
//! `\_SB.PCI0.PCNT`, which reads PCIU and PCID and sends `Notify(Sxx, 1)` (device check: scan
//! the slot) for each slot set in PCIU and `Notify(Sxx, 3)` (eject request) for each slot set
//! in PCID. When the guest has let go of a device it runs the slot's `_EJ0`, which writes the
//! slot's bit to B0EJ; the vmm is told with [`MachineRequest::PciEject`].
//!
//! Registers (32 bits each, little-endian, 4-byte accesses at `layout::PCI_HOTPLUG_PORT`):
//!
//! | offset | name | access | meaning |
//! |---|---|---|---|
//! | 0x00 | PCIU | read, clears | slots a device was plugged into since the last read |
//! | 0x04 | PCID | read, clears | slots whose device was asked to leave since the last read |
//! | 0x08 | B0EJ | write | the guest ejected the devices of these slots (reads as 0) |
//! | 0x0c | RMV  | read | slots whose devices can be removed (1 to 31) |
//! | 0x10 | SEL  | read, write | bus select; only bus 0 has hot-plug, the others read as 0 |
//!
//! Unlike QEMU, PCID is cleared by reading it; whether an unplug request is still waiting for
//! the guest's eject is kept apart ([`PciHotplug::is_unplug_pending`]).

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::arch::layout;
use crate::control::{MachineControl, MachineRequest};
use crate::devices::acpi::{GedDevice, GedError, GedEvent};
use crate::devices::bus::BusDevice;
use crate::snapshot::{decode, encode, SnapshotError, Snapshottable};

/// Offsets of the registers in the port range.
pub const PCIU_OFFSET: u64 = 0x0;
pub const PCID_OFFSET: u64 = 0x4;
pub const B0EJ_OFFSET: u64 = 0x8;
pub const RMV_OFFSET: u64 = 0xc;
pub const SEL_OFFSET: u64 = 0x10;
const REGISTER_LEN: usize = 4;
const _: () = assert!(SEL_OFFSET + REGISTER_LEN as u64 == layout::PCI_HOTPLUG_PORT_LEN as u64);

/// The slots of bus 0 that take hot-plugged devices: all but slot 0, the host bridge.
pub const HOTPLUG_SLOTS: u32 = !1;

/// The bus whose slots the registers describe (SEL); only the root bus has hot-plug.
const ROOT_BUS_SELECT: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum PciHotplugError {
    #[error("PCI slot {0} is not hot-pluggable (slots 1 to 31 of bus 0 are)")]
    NotHotpluggable(u8),
    #[error("the device in PCI slot {slot} is already in the process of unplug")]
    UnplugPending { slot: u8 },
    /// The change was recorded, but the guest could not be interrupted; it sees the change
    /// with the next GED event.
    #[error("{0}")]
    Ged(#[from] GedError),
}

/// The hot-plug registers and the state behind them, shared (as `Arc<Mutex<PciHotplug>>`)
/// between the PIO bus and the vmm, which calls [`PciHotplug::plug`] and
/// [`PciHotplug::request_unplug`].
pub struct PciHotplug {
    ged: Arc<Mutex<GedDevice>>,
    control: MachineControl,
    /// PCIU: slots plugged since the guest last read the register.
    up: u32,
    /// PCID: slots asked to unplug since the guest last read the register.
    down: u32,
    /// Slots asked to unplug whose device the guest has not ejected yet.
    unplug_pending: u32,
    /// SEL.
    select: u32,
}

fn slot_bit(slot: u8) -> Result<u32, PciHotplugError> {
    let bit = 1u32
        .checked_shl(u32::from(slot))
        .ok_or(PciHotplugError::NotHotpluggable(slot))?;
    if bit & HOTPLUG_SLOTS == 0 {
        return Err(PciHotplugError::NotHotpluggable(slot));
    }
    Ok(bit)
}

impl PciHotplug {
    /// Registers that raise their events through `ged` and report ejects to `control`.
    pub fn new(ged: Arc<Mutex<GedDevice>>, control: MachineControl) -> Self {
        Self {
            ged,
            control,
            up: 0,
            down: 0,
            unplug_pending: 0,
            select: ROOT_BUS_SELECT,
        }
    }

    fn notify_guest(&self) -> Result<(), PciHotplugError> {
        let mut ged = self.ged.lock().unwrap_or_else(|e| e.into_inner());
        Ok(ged.notify(GedEvent::PciHotplug)?)
    }

    /// A device was added to `slot` (already on the `PciBus`): tell the guest to scan it.
    /// An unplug request left over for the slot is dropped, as it concerned another device.
    pub fn plug(&mut self, slot: u8) -> Result<(), PciHotplugError> {
        let bit = slot_bit(slot)?;
        self.up |= bit;
        self.down &= !bit;
        self.unplug_pending &= !bit;
        self.notify_guest()
    }

    /// Ask the guest to release the device in `slot`; it answers by ejecting the slot
    /// ([`MachineRequest::PciEject`]), or never. A second request before that eject fails
    /// with [`PciHotplugError::UnplugPending`] and changes nothing (QEMU 7.2: "Device %s is
    /// already in the process of unplug").
    pub fn request_unplug(&mut self, slot: u8) -> Result<(), PciHotplugError> {
        let bit = slot_bit(slot)?;
        if self.unplug_pending & bit != 0 {
            return Err(PciHotplugError::UnplugPending { slot });
        }
        self.unplug_pending |= bit;
        self.down |= bit;
        self.up &= !bit;
        self.notify_guest()
    }

    /// Whether `slot` was asked to unplug and the guest has not ejected it yet.
    pub fn is_unplug_pending(&self, slot: u8) -> bool {
        slot_bit(slot).is_ok_and(|bit| self.unplug_pending & bit != 0)
    }

    /// The guest wrote `slots` to B0EJ: it has released the devices in those slots.
    fn eject(&mut self, slots: u32) {
        let ignored = slots & !HOTPLUG_SLOTS;
        if ignored != 0 {
            tracing::debug!(ignored, "B0EJ write for slots without hot-plug");
        }
        let slots = slots & HOTPLUG_SLOTS;
        self.up &= !slots;
        self.down &= !slots;
        self.unplug_pending &= !slots;
        for slot in 0..32u8 {
            if slots & (1 << slot) != 0 {
                tracing::info!(slot, "guest ejected PCI slot");
                self.control.request(MachineRequest::PciEject { slot });
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let root = self.select == ROOT_BUS_SELECT;
        match offset {
            PCIU_OFFSET if root => std::mem::take(&mut self.up),
            PCID_OFFSET if root => std::mem::take(&mut self.down),
            RMV_OFFSET if root => HOTPLUG_SLOTS,
            PCIU_OFFSET | PCID_OFFSET | RMV_OFFSET | B0EJ_OFFSET => 0,
            SEL_OFFSET => self.select,
            _ => u32::MAX,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            B0EJ_OFFSET if self.select == ROOT_BUS_SELECT => self.eject(value),
            SEL_OFFSET => self.select = value,
            _ => tracing::debug!(offset, value, "ignored PCI hot-plug register write"),
        }
    }
}

/// Name of the registers' state in snapshots and their errors.
const SNAPSHOT_NAME: &str = "pci-hotplug";

#[derive(Serialize, Deserialize)]
struct PciHotplugSnapshot {
    up: u32,
    down: u32,
    unplug_pending: u32,
    select: u32,
}

/// The registers only: the GED event that announced a change travels with the GED.
impl Snapshottable for PciHotplug {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        let snapshot = PciHotplugSnapshot {
            up: self.up,
            down: self.down,
            unplug_pending: self.unplug_pending,
            select: self.select,
        };
        encode(SNAPSHOT_NAME, &snapshot)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let s: PciHotplugSnapshot = decode(SNAPSHOT_NAME, state)?;
        let stray = (s.up | s.down | s.unplug_pending) & !HOTPLUG_SLOTS;
        if stray != 0 {
            return Err(SnapshotError::Decode {
                what: SNAPSHOT_NAME,
                message: format!("slots without hot-plug in the state: {stray:#x}"),
            });
        }
        self.up = s.up;
        self.down = s.down;
        self.unplug_pending = s.unplug_pending;
        self.select = s.select;
        Ok(())
    }
}

fn is_register_access(offset: u64, len: usize) -> bool {
    len == REGISTER_LEN && offset.is_multiple_of(REGISTER_LEN as u64)
}

impl BusDevice for PciHotplug {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if !is_register_access(offset, data.len()) {
            tracing::debug!(offset, len = data.len(), "unsupported PCI hot-plug read");
            data.fill(0xff);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match <[u8; REGISTER_LEN]>::try_from(data) {
            Ok(bytes) if is_register_access(offset, data.len()) => {
                self.write_register(offset, u32::from_le_bytes(bytes))
            }
            _ => tracing::debug!(offset, ?data, "unsupported PCI hot-plug write"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::interrupt::test_util::RecordingIrqChip;
    use crate::devices::IrqLine;
    use std::sync::mpsc::{Receiver, TryRecvError};

    struct Rig {
        hp: PciHotplug,
        ged: Arc<Mutex<GedDevice>>,
        chip: Arc<RecordingIrqChip>,
        requests: Receiver<MachineRequest>,
    }

    fn rig() -> Rig {
        let chip = Arc::new(RecordingIrqChip::default());
        let ged = Arc::new(Mutex::new(GedDevice::new(IrqLine::new(
            chip.clone(),
            layout::GED_GSI,
        ))));
        let (control, requests) = MachineControl::new();
        Rig {
            hp: PciHotplug::new(ged.clone(), control),
            ged,
            chip,
            requests,
        }
    }

    fn read(hp: &mut PciHotplug, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        hp.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(hp: &mut PciHotplug, offset: u64, value: u32) {
        hp.write(offset, &value.to_le_bytes());
    }

    fn ged_events(ged: &Arc<Mutex<GedDevice>>) -> u32 {
        let mut data = [0u8; 4];
        ged.lock().unwrap().read(0, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn plug_sets_pciu_until_read_and_raises_the_ged_event() {
        let mut r = rig();
        assert_eq!(read(&mut r.hp, PCIU_OFFSET), 0);
        r.hp.plug(5).unwrap();
        r.hp.plug(31).unwrap();
        assert_eq!(r.chip.edges(layout::GED_GSI), 2);
        assert_eq!(ged_events(&r.ged), GedEvent::PciHotplug.bit());
        assert_eq!(read(&mut r.hp, PCID_OFFSET), 0);
        assert_eq!(read(&mut r.hp, PCIU_OFFSET), (1 << 5) | (1 << 31));
        assert_eq!(read(&mut r.hp, PCIU_OFFSET), 0, "PCIU is read-to-clear");
        assert!(!r.hp.is_unplug_pending(5));
        assert_eq!(r.requests.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn request_unplug_sets_pcid_until_read_and_stays_pending_until_eject() {
        let mut r = rig();
        r.hp.request_unplug(7).unwrap();
        assert_eq!(r.chip.edges(layout::GED_GSI), 1);
        assert_eq!(ged_events(&r.ged), GedEvent::PciHotplug.bit());
        assert!(r.hp.is_unplug_pending(7));
        assert!(!r.hp.is_unplug_pending(6));
        assert_eq!(read(&mut r.hp, PCIU_OFFSET), 0);
        assert_eq!(read(&mut r.hp, PCID_OFFSET), 1 << 7);
        assert_eq!(read(&mut r.hp, PCID_OFFSET), 0, "PCID is read-to-clear");
        // Reading PCID does not end the request: only the guest's eject does.
        assert!(r.hp.is_unplug_pending(7));
        assert!(matches!(
            r.hp.request_unplug(7),
            Err(PciHotplugError::UnplugPending { slot: 7 })
        ));
        // The refused request changed nothing and did not interrupt the guest.
        assert_eq!(read(&mut r.hp, PCID_OFFSET), 0);
        assert_eq!(r.chip.edges(layout::GED_GSI), 1);

        write(&mut r.hp, B0EJ_OFFSET, 1 << 7);
        assert_eq!(
            r.requests.try_recv(),
            Ok(MachineRequest::PciEject { slot: 7 })
        );
        assert_eq!(r.requests.try_recv(), Err(TryRecvError::Empty));
        assert!(!r.hp.is_unplug_pending(7));
        // A new request for the slot is accepted again.
        r.hp.request_unplug(7).unwrap();
    }

    #[test]
    fn b0ej_reports_each_ejected_slot_and_clears_its_state() {
        let mut r = rig();
        r.hp.plug(3).unwrap();
        r.hp.request_unplug(4).unwrap();
        // Bit 0 (the host bridge) is not a hot-plug slot and is ignored.
        write(&mut r.hp, B0EJ_OFFSET, (1 << 3) | (1 << 4) | (1 << 9) | 1);
        let ejected: Vec<MachineRequest> = r.requests.try_iter().collect();
        assert_eq!(
            ejected,
            vec![
                MachineRequest::PciEject { slot: 3 },
                MachineRequest::PciEject { slot: 4 },
                MachineRequest::PciEject { slot: 9 },
            ]
        );
        assert_eq!(read(&mut r.hp, PCIU_OFFSET), 0);
        assert_eq!(read(&mut r.hp, PCID_OFFSET), 0);
        assert!(!r.hp.is_unplug_pending(4));
        assert_eq!(read(&mut r.hp, B0EJ_OFFSET), 0, "B0EJ reads as zero");
    }

    #[test]
    fn plug_drops_a_stale_unplug_request() {
        let mut r = rig();
        r.hp.request_unplug(2).unwrap();
        r.hp.plug(2).unwrap();
        assert!(!r.hp.is_unplug_pending(2));
        assert_eq!(read(&mut r.hp, PCID_OFFSET), 0);
        assert_eq!(read(&mut r.hp, PCIU_OFFSET), 1 << 2);
        // And an unplug request cancels a plug report the guest has not read.
        r.hp.plug(2).unwrap();
        r.hp.request_unplug(2).unwrap();
        assert_eq!(read(&mut r.hp, PCIU_OFFSET), 0);
        assert_eq!(read(&mut r.hp, PCID_OFFSET), 1 << 2);
    }

    #[test]
    fn slot_0_and_slots_beyond_31_are_refused() {
        let mut r = rig();
        for slot in [0u8, 32, 255] {
            assert!(matches!(
                r.hp.plug(slot),
                Err(PciHotplugError::NotHotpluggable(s)) if s == slot
            ));
            assert!(matches!(
                r.hp.request_unplug(slot),
                Err(PciHotplugError::NotHotpluggable(s)) if s == slot
            ));
            assert!(!r.hp.is_unplug_pending(slot));
        }
        assert_eq!(r.chip.edges(layout::GED_GSI), 0);
    }

    #[test]
    fn rmv_sel_and_odd_accesses() {
        let mut r = rig();
        assert_eq!(read(&mut r.hp, RMV_OFFSET), 0xffff_fffe);
        assert_eq!(read(&mut r.hp, SEL_OFFSET), 0);
        r.hp.plug(1).unwrap();
        // Another bus selected: no hot-plug there, and the root bus's state is kept.
        write(&mut r.hp, SEL_OFFSET, 1);
        assert_eq!(read(&mut r.hp, SEL_OFFSET), 1);
        assert_eq!(read(&mut r.hp, PCIU_OFFSET), 0);
        assert_eq!(read(&mut r.hp, RMV_OFFSET), 0);
        write(&mut r.hp, B0EJ_OFFSET, 1 << 1);
        assert_eq!(r.requests.try_recv(), Err(TryRecvError::Empty));
        write(&mut r.hp, SEL_OFFSET, 0);
        // Narrow, misaligned and out-of-range accesses are ignored and read as all ones.
        let mut word = [0u8; 2];
        r.hp.read(PCIU_OFFSET, &mut word);
        assert_eq!(word, [0xff; 2]);
        let mut dword = [0u8; 4];
        r.hp.read(PCIU_OFFSET + 1, &mut dword);
        assert_eq!(dword, [0xff; 4]);
        r.hp.read(0x14, &mut dword);
        assert_eq!(dword, [0xff; 4]);
        r.hp.write(B0EJ_OFFSET, &[0x02, 0]);
        assert_eq!(r.requests.try_recv(), Err(TryRecvError::Empty));
        // None of that consumed the pending plug report; writes to PCIU do not clear it.
        write(&mut r.hp, PCIU_OFFSET, 0);
        assert_eq!(read(&mut r.hp, PCIU_OFFSET), 1 << 1);
    }

    #[test]
    fn snapshot_keeps_reports_pending_unplugs_and_select() {
        let mut r = rig();
        r.hp.request_unplug(6).unwrap();
        assert_eq!(read(&mut r.hp, PCID_OFFSET), 1 << 6);
        r.hp.request_unplug(5).unwrap();
        r.hp.plug(3).unwrap();
        write(&mut r.hp, SEL_OFFSET, 1);
        let saved = r.hp.save().unwrap();

        let mut fresh = rig();
        fresh.hp.restore(&saved).unwrap();
        assert_eq!(fresh.chip.edges(layout::GED_GSI), 0);
        assert_eq!(read(&mut fresh.hp, SEL_OFFSET), 1);
        assert_eq!(
            read(&mut fresh.hp, PCIU_OFFSET),
            0,
            "another bus is selected"
        );
        write(&mut fresh.hp, SEL_OFFSET, 0);
        assert_eq!(read(&mut fresh.hp, PCIU_OFFSET), 1 << 3);
        assert_eq!(read(&mut fresh.hp, PCID_OFFSET), 1 << 5);
        assert!(fresh.hp.is_unplug_pending(5));
        assert!(fresh.hp.is_unplug_pending(6));
        assert!(!fresh.hp.is_unplug_pending(3));
        assert!(matches!(
            fresh.hp.request_unplug(6),
            Err(PciHotplugError::UnplugPending { slot: 6 })
        ));
        write(&mut fresh.hp, B0EJ_OFFSET, 1 << 6);
        assert_eq!(
            fresh.requests.try_recv(),
            Ok(MachineRequest::PciEject { slot: 6 })
        );
        assert_eq!(r.requests.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn snapshot_refuses_bad_state() {
        let mut r = rig();
        r.hp.plug(4).unwrap();
        let saved = r.hp.save().unwrap();
        let mut fresh = rig();
        fresh.hp.plug(9).unwrap();
        for len in 0..saved.len() {
            assert!(fresh.hp.restore(&saved[..len]).is_err(), "{len} bytes");
        }
        // Slot 0, the host bridge, has no hot-plug.
        let slot0 = encode(
            SNAPSHOT_NAME,
            &PciHotplugSnapshot {
                up: 1,
                down: 0,
                unplug_pending: 0,
                select: 0,
            },
        )
        .unwrap();
        assert!(fresh.hp.restore(&slot0).is_err());
        assert_eq!(read(&mut fresh.hp, PCIU_OFFSET), 1 << 9, "nothing changed");
    }
}
