//! The platform devices of our hardware-reduced ACPI model.
//!
//! Hardware-reduced ACPI has no PM1 blocks, GPEs or SCI. Instead:
//! - the Generic Event Device ([`GedDevice`]) raises an ordinary interrupt and the DSDT's `_EVT`
//!   method reads its event register to find out what happened (power button, PCI hot-plug);
//! - the FADT points at one-byte sleep control, sleep status and reset registers, which
//!   [`AcpiPmDevice`] implements to power off and reset the machine.

use serde::{Deserialize, Serialize};

use crate::arch::layout;
use crate::control::{MachineControl, MachineRequest, ResetCause};
use crate::devices::bus::BusDevice;
use crate::devices::interrupt::{InterruptError, IrqLine};
use crate::snapshot::{decode, encode, SnapshotError, Snapshottable};

/// Size in bytes of the GED event register at offset 0 of the GED MMIO range. The DSDT's
/// operation region covers exactly this register.
pub const GED_EVENT_REGISTER_LEN: u64 = 4;

/// Bit of the GED event register that reports a power-button press.
const GED_POWER_BUTTON_BIT: u32 = 1 << 0;
/// Bit of the GED event register that reports a change in the PCI hot-plug registers.
const GED_PCI_HOTPLUG_BIT: u32 = 1 << 1;

/// A platform event that the GED reports to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GedEvent {
    /// The power button was pressed (the guest should shut down cleanly).
    PowerButton,
    /// A device was plugged into a PCI slot or is asked to leave one: the guest's `_EVT`
    /// calls `\_SB.PCI0.PCNT`, which reads the hot-plug registers
    /// ([`crate::devices::pci_hotplug`]) and notifies the slots.
    PciHotplug,
}

impl GedEvent {
    /// The bit this event sets in the GED event register. The DSDT's `_EVT` method tests the
    /// same bits, so both sides take them from here.
    pub fn bit(self) -> u32 {
        match self {
            GedEvent::PowerButton => GED_POWER_BUTTON_BIT,
            GedEvent::PciHotplug => GED_PCI_HOTPLUG_BIT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GedError {
    #[error("failed to raise the GED interrupt for {event:?}: {source}")]
    Interrupt {
        event: GedEvent,
        #[source]
        source: InterruptError,
    },
}

/// The ACPI Generic Event Device: a 32-bit read-to-clear bitmap of pending events at offset 0,
/// and an edge-triggered interrupt that tells the guest to read it.
pub struct GedDevice {
    irq: IrqLine,
    pending: u32,
}

impl GedDevice {
    pub fn new(irq: IrqLine) -> Self {
        Self { irq, pending: 0 }
    }

    /// Record `event` and interrupt the guest. Events that arrive before the guest reads the
    /// register are merged into one bitmap, so none is lost.
    pub fn notify(&mut self, event: GedEvent) -> Result<(), GedError> {
        self.pending |= event.bit();
        self.irq
            .pulse()
            .map_err(|source| GedError::Interrupt { event, source })
    }
}

impl BusDevice for GedDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 0 && data.len() as u64 == GED_EVENT_REGISTER_LEN {
            data.copy_from_slice(&self.pending.to_le_bytes());
            self.pending = 0;
        } else {
            tracing::debug!(offset, len = data.len(), "unsupported GED read");
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The event register is read-only; the guest acknowledges events by reading it.
        tracing::debug!(offset, ?data, "ignored GED write");
    }
}

/// Names of the two devices' states in snapshots and their errors.
const GED_SNAPSHOT_NAME: &str = "ged";
const PM_SNAPSHOT_NAME: &str = "acpi-pm";

#[derive(Serialize, Deserialize)]
struct GedSnapshot {
    pending: u32,
}

/// The pending events only: their interrupt was sent on the source, and the guest reads
/// them with the next one if it is lost.
impl Snapshottable for GedDevice {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        encode(
            GED_SNAPSHOT_NAME,
            &GedSnapshot {
                pending: self.pending,
            },
        )
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let snapshot: GedSnapshot = decode(GED_SNAPSHOT_NAME, state)?;
        self.pending = snapshot.pending;
        Ok(())
    }
}

/// Offsets of the three registers inside the PM port range (see `layout::ACPI_PM_PORT`).
const SLEEP_CONTROL_OFFSET: u64 = (layout::ACPI_SLEEP_CONTROL_PORT - layout::ACPI_PM_PORT) as u64;
const SLEEP_STATUS_OFFSET: u64 = (layout::ACPI_SLEEP_STATUS_PORT - layout::ACPI_PM_PORT) as u64;
const RESET_OFFSET: u64 = (layout::ACPI_RESET_PORT - layout::ACPI_PM_PORT) as u64;
const _: () = assert!(SLEEP_CONTROL_OFFSET < layout::ACPI_PM_PORT_LEN as u64);
const _: () = assert!(SLEEP_STATUS_OFFSET < layout::ACPI_PM_PORT_LEN as u64);
const _: () = assert!(RESET_OFFSET < layout::ACPI_PM_PORT_LEN as u64);

/// Sleep control register: SLP_EN starts the transition to the state in SLP_TYP.
const SLEEP_ENABLE: u8 = 1 << 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0b111;
/// Sleep status register: WAK_STS, set when the machine has woken up; write 1 to clear.
const WAKE_STATUS: u8 = 1 << 7;

/// The hardware-reduced sleep control, sleep status and reset registers.
///
/// Linux writes SLP_TYP|SLP_EN to the control register and then polls the status register
/// until WAK_STS is set (`acpi_hw_extended_sleep`). S5 ends the machine, so the guest never
/// sees WAK_STS again. We do not implement other sleep states (the DSDT only offers `_S5`);
/// if a guest asks for one anyway, we set WAK_STS at once so it "wakes" straight away rather
/// than spinning forever.
pub struct AcpiPmDevice {
    control: MachineControl,
    wake_status: bool,
}

impl AcpiPmDevice {
    pub fn new(control: MachineControl) -> Self {
        Self {
            control,
            wake_status: false,
        }
    }

    fn write_sleep_control(&mut self, value: u8) {
        if value & SLEEP_ENABLE == 0 {
            return;
        }
        let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
        if sleep_type == layout::ACPI_S5_SLEEP_TYPE {
            tracing::info!("guest entered ACPI S5, powering off");
            self.control.request(MachineRequest::Shutdown);
        } else {
            tracing::warn!(
                sleep_type,
                "ignoring request for an unsupported ACPI sleep state"
            );
            self.wake_status = true;
        }
    }

    fn write_byte(&mut self, offset: u64, value: u8) {
        match offset {
            SLEEP_CONTROL_OFFSET => self.write_sleep_control(value),
            SLEEP_STATUS_OFFSET => {
                if value & WAKE_STATUS != 0 {
                    self.wake_status = false;
                }
            }
            RESET_OFFSET => {
                if value == layout::ACPI_RESET_VALUE {
                    tracing::info!("guest wrote the ACPI reset register");
                    self.control
                        .request(MachineRequest::Reset(ResetCause::AcpiResetRegister));
                } else {
                    tracing::debug!(value, "ignored ACPI reset register value");
                }
            }
            _ => tracing::debug!(offset, value, "ignored write to unused ACPI PM port"),
        }
    }

    fn read_byte(&self, offset: u64) -> u8 {
        match offset {
            SLEEP_STATUS_OFFSET if self.wake_status => WAKE_STATUS,
            // The control and reset registers are write-only and read as zero.
            SLEEP_CONTROL_OFFSET | SLEEP_STATUS_OFFSET | RESET_OFFSET => 0,
            _ => 0xff,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct AcpiPmSnapshot {
    wake_status: bool,
}

impl Snapshottable for AcpiPmDevice {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        encode(
            PM_SNAPSHOT_NAME,
            &AcpiPmSnapshot {
                wake_status: self.wake_status,
            },
        )
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let snapshot: AcpiPmSnapshot = decode(PM_SNAPSHOT_NAME, state)?;
        self.wake_status = snapshot.wake_status;
        Ok(())
    }
}

impl BusDevice for AcpiPmDevice {
    // The registers are one byte wide; a wider access touches consecutive registers.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (byte_offset, byte) in (offset..).zip(data.iter_mut()) {
            *byte = self.read_byte(byte_offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (byte_offset, byte) in (offset..).zip(data.iter()) {
            self.write_byte(byte_offset, *byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::interrupt::test_util::RecordingIrqChip;
    use std::sync::mpsc::TryRecvError;
    use std::sync::Arc;

    fn ged() -> (GedDevice, Arc<RecordingIrqChip>) {
        let chip = Arc::new(RecordingIrqChip::default());
        let irq = IrqLine::new(chip.clone(), layout::GED_GSI);
        (GedDevice::new(irq), chip)
    }

    fn read_events(ged: &mut GedDevice) -> u32 {
        let mut data = [0u8; 4];
        ged.read(0, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn ged_power_button_sets_bit_and_pulses_irq() {
        let (mut ged, chip) = ged();
        assert_eq!(read_events(&mut ged), 0);
        ged.notify(GedEvent::PowerButton).unwrap();
        assert_eq!(chip.edges(layout::GED_GSI), 1);
        // A pulse is a rising then a falling edge, leaving the line low.
        assert_eq!(
            *chip.events.lock().unwrap(),
            vec![(layout::GED_GSI, true), (layout::GED_GSI, false)]
        );
        assert_eq!(read_events(&mut ged), 1);
    }

    #[test]
    fn ged_read_clears_and_events_merge() {
        let (mut ged, chip) = ged();
        ged.notify(GedEvent::PowerButton).unwrap();
        ged.notify(GedEvent::PowerButton).unwrap();
        assert_eq!(chip.edges(layout::GED_GSI), 2);
        assert_eq!(read_events(&mut ged), GedEvent::PowerButton.bit());
        assert_eq!(read_events(&mut ged), 0);
    }

    #[test]
    fn ged_events_have_distinct_bits() {
        let (mut ged, chip) = ged();
        assert_ne!(GedEvent::PowerButton.bit(), GedEvent::PciHotplug.bit());
        ged.notify(GedEvent::PciHotplug).unwrap();
        ged.notify(GedEvent::PowerButton).unwrap();
        assert_eq!(chip.edges(layout::GED_GSI), 2);
        assert_eq!(read_events(&mut ged), 0b11);
        assert_eq!(read_events(&mut ged), 0);
    }

    #[test]
    fn ged_ignores_writes_and_odd_reads() {
        let (mut ged, _chip) = ged();
        ged.notify(GedEvent::PowerButton).unwrap();
        ged.write(0, &0u32.to_le_bytes());
        let mut byte = [0u8; 1];
        ged.read(0, &mut byte);
        assert_eq!(byte, [0xff]);
        let mut data = [0u8; 4];
        ged.read(4, &mut data);
        assert_eq!(data, [0xff; 4]);
        // Neither the write nor the unsupported reads consumed the pending event.
        assert_eq!(read_events(&mut ged), 1);
    }

    fn pm() -> (AcpiPmDevice, std::sync::mpsc::Receiver<MachineRequest>) {
        let (control, rx) = MachineControl::new();
        (AcpiPmDevice::new(control), rx)
    }

    fn sleep_command(sleep_type: u8) -> u8 {
        (sleep_type << SLEEP_TYPE_SHIFT) | SLEEP_ENABLE
    }

    #[test]
    fn pm_s5_requests_shutdown() {
        let (mut pm, rx) = pm();
        // Linux first clears WAK_STS, then writes SLP_TYP|SLP_EN.
        pm.write(SLEEP_STATUS_OFFSET, &[WAKE_STATUS]);
        pm.write(
            SLEEP_CONTROL_OFFSET,
            &[sleep_command(layout::ACPI_S5_SLEEP_TYPE)],
        );
        assert_eq!(rx.try_recv(), Ok(MachineRequest::Shutdown));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn pm_sleep_type_without_enable_does_nothing() {
        let (mut pm, rx) = pm();
        pm.write(
            SLEEP_CONTROL_OFFSET,
            &[layout::ACPI_S5_SLEEP_TYPE << SLEEP_TYPE_SHIFT],
        );
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn pm_other_sleep_states_wake_immediately() {
        let (mut pm, rx) = pm();
        let mut status = [0u8; 1];
        pm.read(SLEEP_STATUS_OFFSET, &mut status);
        assert_eq!(status, [0]);
        // S3 is SLP_TYP 1 in most firmware; anything but our S5 value is ignored.
        pm.write(SLEEP_CONTROL_OFFSET, &[sleep_command(1)]);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        pm.read(SLEEP_STATUS_OFFSET, &mut status);
        assert_eq!(status, [WAKE_STATUS]);
        // WAK_STS is write-one-to-clear.
        pm.write(SLEEP_STATUS_OFFSET, &[0]);
        pm.read(SLEEP_STATUS_OFFSET, &mut status);
        assert_eq!(status, [WAKE_STATUS]);
        pm.write(SLEEP_STATUS_OFFSET, &[WAKE_STATUS]);
        pm.read(SLEEP_STATUS_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }

    #[test]
    fn pm_reset_register() {
        let (mut pm, rx) = pm();
        pm.write(RESET_OFFSET, &[layout::ACPI_RESET_VALUE.wrapping_add(1)]);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        pm.write(RESET_OFFSET, &[layout::ACPI_RESET_VALUE]);
        assert_eq!(
            rx.try_recv(),
            Ok(MachineRequest::Reset(ResetCause::AcpiResetRegister))
        );
    }

    #[test]
    fn pm_wide_write_reaches_each_register() {
        let (mut pm, rx) = pm();
        // One 4-byte write covering control, status, reset and the unused port.
        pm.write(
            0,
            &[
                sleep_command(layout::ACPI_S5_SLEEP_TYPE),
                0,
                layout::ACPI_RESET_VALUE,
                0,
            ],
        );
        assert_eq!(rx.try_recv(), Ok(MachineRequest::Shutdown));
        assert_eq!(
            rx.try_recv(),
            Ok(MachineRequest::Reset(ResetCause::AcpiResetRegister))
        );
        let mut data = [0u8; 4];
        pm.read(0, &mut data);
        assert_eq!(data, [0, 0, 0, 0xff]);
    }

    #[test]
    fn ged_snapshot_keeps_pending_events() {
        let (mut ged, _chip) = ged();
        ged.notify(GedEvent::PciHotplug).unwrap();
        ged.notify(GedEvent::PowerButton).unwrap();
        let saved = ged.save().unwrap();
        let (mut fresh, chip) = self::ged();
        fresh.restore(&saved).unwrap();
        assert_eq!(chip.edges(layout::GED_GSI), 0);
        assert_eq!(read_events(&mut fresh), 0b11);
        assert_eq!(read_events(&mut fresh), 0);
        // A drained register restores as drained, over an event the device had.
        assert_eq!(read_events(&mut ged), 0b11);
        fresh.notify(GedEvent::PowerButton).unwrap();
        fresh.restore(&ged.save().unwrap()).unwrap();
        assert_eq!(read_events(&mut fresh), 0);
    }

    #[test]
    fn ged_snapshot_refuses_bad_state() {
        let (mut ged, _chip) = ged();
        ged.notify(GedEvent::PowerButton).unwrap();
        for bad in [&[][..], &[0xff; 5][..], &[0x80][..]] {
            assert!(matches!(
                ged.restore(bad),
                Err(SnapshotError::Decode { .. })
            ));
        }
        assert_eq!(read_events(&mut ged), 1, "a refused state changes nothing");
    }

    #[test]
    fn pm_snapshot_keeps_wake_status() {
        let (mut pm, _rx) = pm();
        pm.write(SLEEP_CONTROL_OFFSET, &[sleep_command(1)]);
        let saved = pm.save().unwrap();
        let (mut fresh, rx) = self::pm();
        fresh.restore(&saved).unwrap();
        let mut status = [0u8; 1];
        fresh.read(SLEEP_STATUS_OFFSET, &mut status);
        assert_eq!(status, [WAKE_STATUS]);
        fresh.write(SLEEP_STATUS_OFFSET, &[WAKE_STATUS]);
        fresh.read(SLEEP_STATUS_OFFSET, &mut status);
        assert_eq!(status, [0]);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        for bad in [&[][..], &[2][..]] {
            assert!(fresh.restore(bad).is_err());
        }
        fresh.restore(&saved).unwrap();
        fresh.read(SLEEP_STATUS_OFFSET, &mut status);
        assert_eq!(status, [WAKE_STATUS]);
    }
}
