//! The two ways a guest reaches configuration space: the legacy 0xcf8/0xcfc port pair
//! (mechanism #1) and the memory-mapped ECAM window. Both forward to the [`PciBus`].

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::bus::PciBus;
use super::lock;
use crate::devices::BusDevice;
use crate::snapshot::{decode, encode, SnapshotError, Snapshottable};

/// Ports covered by [`PciConfigIo`]: CONFIG_ADDRESS (0xcf8..0xcfb) and CONFIG_DATA
/// (0xcfc..0xcff).
pub const PCI_CONFIG_IO_LEN: u64 = 8;
const DATA_OFFSET: u64 = 4;
const ENABLE_BIT: u32 = 1 << 31;
/// Buses addressable through ECAM (bits 27:20 of the offset).
const ECAM_SPAN: u64 = 1 << 28;

/// A configuration-space target: bus, device (slot), function and register index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ConfigTarget {
    bus: u8,
    slot: u8,
    function: u8,
    reg_idx: usize,
}

impl ConfigTarget {
    /// Decode a CONFIG_ADDRESS value: bus 23:16, device 15:11, function 10:8, register 7:2.
    fn from_config_address(address: u32) -> Option<Self> {
        (address & ENABLE_BIT != 0).then_some(Self {
            bus: (address >> 16) as u8,
            slot: ((address >> 11) & 0x1f) as u8,
            function: ((address >> 8) & 0x7) as u8,
            reg_idx: ((address >> 2) & 0x3f) as usize,
        })
    }

    /// Decode an ECAM offset: bus 27:20, device 19:15, function 14:12, register 11:2.
    fn from_ecam_offset(offset: u64) -> Option<Self> {
        (offset < ECAM_SPAN).then_some(Self {
            bus: (offset >> 20) as u8,
            slot: ((offset >> 15) & 0x1f) as u8,
            function: ((offset >> 12) & 0x7) as u8,
            reg_idx: ((offset >> 2) & 0x3ff) as usize,
        })
    }
}

/// The byte lane an access at `offset` starts in, if `len` bytes fit inside its dword.
fn dword_lane(offset: u64, len: usize) -> Option<u64> {
    let lane = offset % 4;
    (len > 0 && lane + len as u64 <= 4).then_some(lane)
}

/// Copy the bytes of `value` from byte `lane` on into `data`. Callers checked the lane.
fn copy_lanes(value: u32, lane: u64, data: &mut [u8]) {
    let lane = lane as usize;
    data.copy_from_slice(&value.to_le_bytes()[lane..lane + data.len()]);
}

/// Configuration mechanism #1 at ports 0xcf8..0xcff.
pub struct PciConfigIo {
    /// The CONFIG_ADDRESS register.
    address: u32,
    pci_bus: Arc<Mutex<PciBus>>,
}

impl PciConfigIo {
    pub fn new(pci_bus: Arc<Mutex<PciBus>>) -> Self {
        Self {
            address: 0,
            pci_bus,
        }
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(lane) = dword_lane(offset, data.len()) else {
            data.fill(0xff);
            return;
        };
        let value = match offset {
            0..DATA_OFFSET => self.address,
            DATA_OFFSET..PCI_CONFIG_IO_LEN => match ConfigTarget::from_config_address(self.address)
            {
                Some(t) => lock(&self.pci_bus).read_config(t.bus, t.slot, t.function, t.reg_idx),
                None => 0xffff_ffff,
            },
            _ => 0xffff_ffff,
        };
        copy_lanes(value, lane, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(lane) = dword_lane(offset, data.len()) else {
            return;
        };
        match offset {
            // Like PC chipsets (and QEMU), CONFIG_ADDRESS only latches dword writes; byte
            // writes to 0xcf8..0xcfb belong to other registers (0xcf9 is reset control).
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            DATA_OFFSET..PCI_CONFIG_IO_LEN => {
                if let Some(t) = ConfigTarget::from_config_address(self.address) {
                    lock(&self.pci_bus)
                        .write_config(t.bus, t.slot, t.function, t.reg_idx, lane, data);
                }
            }
            _ => {}
        }
    }
}

/// Name of the CONFIG_ADDRESS latch in snapshots and their errors.
const SNAPSHOT_NAME: &str = "pci-config-io";

#[derive(Serialize, Deserialize)]
struct PciConfigIoSnapshot {
    address: u32,
}

/// Only the CONFIG_ADDRESS latch: the configuration spaces belong to the devices.
impl Snapshottable for PciConfigIo {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        encode(
            SNAPSHOT_NAME,
            &PciConfigIoSnapshot {
                address: self.address,
            },
        )
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let snapshot: PciConfigIoSnapshot = decode(SNAPSHOT_NAME, state)?;
        self.address = snapshot.address;
        Ok(())
    }
}

/// The ECAM (MMCONFIG) window: 4 KiB of configuration space per function.
pub struct PciConfigMmio {
    pci_bus: Arc<Mutex<PciBus>>,
}

impl PciConfigMmio {
    pub fn new(pci_bus: Arc<Mutex<PciBus>>) -> Self {
        Self { pci_bus }
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let target = ConfigTarget::from_ecam_offset(offset);
        let (Some(lane), Some(t)) = (dword_lane(offset, data.len()), target) else {
            data.fill(0xff);
            return;
        };
        let value = lock(&self.pci_bus).read_config(t.bus, t.slot, t.function, t.reg_idx);
        copy_lanes(value, lane, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let target = ConfigTarget::from_ecam_offset(offset);
        if let (Some(lane), Some(t)) = (dword_lane(offset, data.len()), target) {
            lock(&self.pci_bus).write_config(t.bus, t.slot, t.function, t.reg_idx, lane, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout;
    use crate::pci::test_util::{test_device, TestMachine};

    const CF8: u64 = layout::PCI_CONFIG_ADDRESS_PORT as u64;
    const CFC: u64 = layout::PCI_CONFIG_DATA_PORT as u64;

    fn config_address(slot: u8, function: u8, reg_offset: u8) -> u32 {
        0x8000_0000 | u32::from(slot) << 11 | u32::from(function) << 8 | u32::from(reg_offset)
    }

    fn pio_read(machine: &TestMachine, port: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        machine.pio.read(port, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    fn select(machine: &TestMachine, address: u32) {
        assert!(machine.pio.write(CF8, &address.to_le_bytes()));
    }

    #[test]
    fn host_bridge_ids_through_ports() {
        let machine = TestMachine::new();
        select(&machine, config_address(0, 0, 0));
        assert_eq!(pio_read(&machine, CF8, 4), 0x8000_0000);
        assert_eq!(pio_read(&machine, CFC, 4), 0x0008_1b36);
        assert_eq!(pio_read(&machine, CFC, 2), 0x1b36);
        assert_eq!(pio_read(&machine, CFC + 2, 2), 0x0008);
        let bytes: Vec<u64> = (0..4).map(|i| pio_read(&machine, CFC + i, 1)).collect();
        assert_eq!(bytes, vec![0x36, 0x1b, 0x08, 0x00]);
        // Class code via register 2, upper word.
        select(&machine, config_address(0, 0, 8));
        assert_eq!(pio_read(&machine, CFC + 2, 2), 0x0600);
        // Accesses that straddle the data dword read as ones.
        assert_eq!(pio_read(&machine, CFC + 3, 2), 0xffff);
    }

    #[test]
    fn host_bridge_ids_through_ecam() {
        let machine = TestMachine::new();
        let ecam = layout::PCI_MMCONFIG_START.0;
        assert_eq!(machine.mmio_read(ecam, 4), 0x0008_1b36);
        assert_eq!(machine.mmio_read(ecam, 2), 0x1b36);
        assert_eq!(machine.mmio_read(ecam + 2, 2), 0x0008);
        let bytes: Vec<u64> = (0..4).map(|i| machine.mmio_read(ecam + i, 1)).collect();
        assert_eq!(bytes, vec![0x36, 0x1b, 0x08, 0x00]);
        assert_eq!(machine.mmio_read(ecam + 0xa, 2), 0x0600);
        assert_eq!(machine.mmio_read(ecam + 1, 4), 0xffff_ffff);
        assert_eq!(machine.mmio_read(ecam, 8), u64::MAX);
    }

    #[test]
    fn absent_targets_read_all_ones() {
        let machine = TestMachine::new();
        let ecam = layout::PCI_MMCONFIG_START.0;
        // Empty slot, function 1 of a present device, bus 1.
        for address in [
            config_address(5, 0, 0),
            config_address(0, 1, 0),
            config_address(0, 0, 0) | 1 << 16,
        ] {
            select(&machine, address);
            assert_eq!(pio_read(&machine, CFC, 4), 0xffff_ffff, "{address:#x}");
            assert_eq!(pio_read(&machine, CFC + 1, 1), 0xff);
        }
        for offset in [5 << 15, 1 << 12, 1 << 20, 255 << 20 | 31 << 15 | 7 << 12] {
            assert_eq!(machine.mmio_read(ecam + offset, 4), 0xffff_ffff);
            assert_eq!(machine.mmio_read(ecam + offset + 2, 2), 0xffff);
        }
        // Enable bit clear: the data port reads ones.
        select(&machine, 0);
        assert_eq!(pio_read(&machine, CFC, 4), 0xffff_ffff);
    }

    #[test]
    fn config_address_only_latches_dword_writes() {
        let machine = TestMachine::new();
        select(&machine, config_address(0, 0, 8));
        machine.pio.write(CF8 + 1, &[0xff]);
        machine.pio.write(CF8, &[0x12, 0x34]);
        machine.pio.write(CF8 + 2, &[0x12, 0x34]);
        assert_eq!(
            pio_read(&machine, CF8, 4),
            u64::from(config_address(0, 0, 8))
        );
        assert_eq!(pio_read(&machine, CF8 + 3, 1), 0x80);
        assert_eq!(pio_read(&machine, CF8 + 1, 2), 0x0000);
    }

    #[test]
    fn config_writes_reach_the_device_on_both_paths() {
        let machine = TestMachine::new();
        let slot = machine.add(test_device(), Some(4));
        // Interrupt line (byte 0 of register 0xf) through ports, byte access at lane 0.
        select(&machine, config_address(slot, 0, 0x3c));
        machine.pio.write(CFC, &[0x42]);
        assert_eq!(pio_read(&machine, CFC, 1), 0x42);
        // Cache line size through ports at lane 0 of register 3, then through ECAM.
        select(&machine, config_address(slot, 0, 0x0c));
        machine.pio.write(CFC, &[0x10]);
        let ecam = layout::PCI_MMCONFIG_START.0 + (u64::from(slot) << 15);
        assert_eq!(machine.mmio_read(ecam + 0xc, 1), 0x10);
        machine.mmio.write(ecam + 0x3c, &[0x07]);
        select(&machine, config_address(slot, 0, 0x3c));
        assert_eq!(pio_read(&machine, CFC, 4) & 0xffff, 0x0107);
        // A word write at lane 2 of CONFIG_DATA lands in the upper half of the register.
        select(&machine, config_address(slot, 0, 0x04));
        let command = pio_read(&machine, CFC, 2);
        machine.pio.write(CFC + 2, &[0xff, 0xff]);
        assert_eq!(pio_read(&machine, CFC, 2), command);
    }

    #[test]
    fn garbage_config_accesses_never_panic() {
        let machine = TestMachine::new();
        let slot = machine.add(test_device(), None);
        let ecam = layout::PCI_MMCONFIG_START.0;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        // Every offset and size of the host bridge's and the device's space.
        for dev in [0u64, u64::from(slot)] {
            for offset in 0..0x1000u64 {
                for len in [1usize, 2, 3, 4, 8] {
                    let value = next().to_le_bytes();
                    let address = ecam + (dev << 15) + offset;
                    machine.mmio.write(address, &value[..len]);
                    let mut data = [0u8; 8];
                    machine.mmio.read(address, &mut data[..len]);
                }
            }
        }
        // Random CONFIG_ADDRESS values and data accesses at every port offset.
        for _ in 0..4000 {
            let address = next() as u32;
            select(&machine, address | 0x8000_0000);
            let port = CF8 + next() % 8;
            let len = [1usize, 2, 4, 8][(next() % 4) as usize];
            let value = next().to_le_bytes();
            machine.pio.write(port, &value[..len]);
            let mut data = [0u8; 8];
            machine.pio.read(port, &mut data[..len]);
        }
        // Random ECAM offsets anywhere, random sizes.
        for _ in 0..4000 {
            let offset = next() % layout::PCI_MMCONFIG_SIZE;
            let len = [1usize, 2, 4, 8][(next() % 4) as usize];
            machine
                .mmio
                .write(ecam + offset, &next().to_le_bytes()[..len]);
        }
        // Direct calls with offsets the Bus would never produce.
        let mut io = PciConfigIo::new(machine.pci.clone());
        let mut mmio = PciConfigMmio::new(machine.pci.clone());
        for offset in [8, 9, 12, u64::MAX, u64::MAX - 3, ECAM_SPAN, ECAM_SPAN + 4] {
            let mut data = [0u8; 4];
            io.read(offset, &mut data);
            assert_eq!(data, [0xff; 4]);
            io.write(offset, &[1, 2, 3, 4]);
            io.read(offset, &mut []);
            io.write(offset, &[]);
        }
        for offset in [u64::MAX, u64::MAX - 3, ECAM_SPAN, ECAM_SPAN + 4] {
            let mut data = [0u8; 4];
            mmio.read(offset, &mut data);
            assert_eq!(data, [0xff; 4]);
            mmio.write(offset, &[1, 2, 3, 4]);
            mmio.read(offset, &mut []);
            mmio.write(offset, &[]);
        }
        // The identities survived.
        assert_eq!(machine.mmio_read(ecam, 4), 0x0008_1b36);
        assert_eq!(
            machine.mmio_read(ecam + (u64::from(slot) << 15), 4),
            u64::from(crate::pci::test_util::TEST_IDS)
        );
    }

    #[test]
    fn snapshot_keeps_the_config_address_latch() {
        let machine = TestMachine::new();
        let mut io = PciConfigIo::new(machine.pci.clone());
        // A guest that selected the class code register and was stopped before reading it.
        io.write(0, &config_address(0, 0, 8).to_le_bytes());
        let saved = io.save().unwrap();

        let mut fresh = PciConfigIo::new(machine.pci.clone());
        fresh.restore(&saved).unwrap();
        let mut data = [0u8; 4];
        fresh.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), config_address(0, 0, 8));
        fresh.read(DATA_OFFSET + 2, &mut data[..2]);
        assert_eq!(
            &data[..2],
            &[0x00, 0x06],
            "class 06/00 through the restored latch"
        );

        for bad in [&[][..], &[0x80][..], &[0xff; 5][..]] {
            assert!(fresh.restore(bad).is_err());
        }
        fresh.read(0, &mut data);
        assert_eq!(u32::from_le_bytes(data), config_address(0, 0, 8));
    }
}
