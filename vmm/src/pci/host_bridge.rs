//! The host bridge at 00:00.0: what Linux expects to find first on a PCIe root bus.

use serde::{Deserialize, Serialize};

use super::configuration::{PciConfiguration, PciIdentity, CLASS_BRIDGE, SUBCLASS_HOST_BRIDGE};
use super::device::{BarReprogram, PciDevice, PciInterruptPin};
use crate::snapshot::{decode, encode, SnapshotError, Snapshottable};

/// Red Hat / QEMU vendor id.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x1b36;
/// QEMU's "PCIe host bridge" (gpex) device id, which Linux knows needs no special handling.
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;

/// A host bridge with no BARs and no interrupt: only its configuration space.
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl PciHostBridge {
    pub fn new() -> Self {
        let identity = PciIdentity {
            vendor_id: HOST_BRIDGE_VENDOR_ID,
            device_id: HOST_BRIDGE_DEVICE_ID,
            class_code: CLASS_BRIDGE,
            subclass: SUBCLASS_HOST_BRIDGE,
            // What QEMU puts in every device's subsystem ids.
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            ..Default::default()
        };
        Self {
            config: PciConfiguration::new(identity, PciInterruptPin::None),
        }
    }
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

/// Name of the host bridge's state in snapshots and their errors.
const SNAPSHOT_NAME: &str = "pci-host-bridge";

#[derive(Serialize, Deserialize)]
struct HostBridgeSnapshot {
    registers: Vec<u32>,
}

impl Snapshottable for PciHostBridge {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        let snapshot = HostBridgeSnapshot {
            registers: self.config.registers().to_vec(),
        };
        encode(SNAPSHOT_NAME, &snapshot)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let snapshot: HostBridgeSnapshot = decode(SNAPSHOT_NAME, state)?;
        self.config
            .set_registers(&snapshot.registers)
            .map_err(|e| SnapshotError::Decode {
                what: SNAPSHOT_NAME,
                message: e.to_string(),
            })
    }
}

impl PciDevice for PciHostBridge {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_register(reg_idx)
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarReprogram> {
        self.config.write_register(reg_idx, offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bridge_header() {
        let mut bridge = PciHostBridge::new();
        assert_eq!(bridge.read_config_register(0), 0x0008_1b36);
        // Class 06/00/00, revision 0.
        assert_eq!(bridge.read_config_register(2), 0x0600_0000);
        // Header type 0, single function.
        assert_eq!(bridge.read_config_register(3) >> 16 & 0xff, 0);
        assert_eq!(bridge.read_config_register(0xf) >> 8 & 0xff, 0);
        assert!(bridge.bars().is_empty());
        assert_eq!(bridge.write_config_register(4, 0, &[0xff; 4]), None);
        assert_eq!(bridge.read_config_register(4), 0);
    }

    #[test]
    fn snapshot_restores_the_guest_written_registers() {
        let mut bridge = PciHostBridge::new();
        bridge.write_config_register(1, 0, &[0x06, 0x01]); // Memory, bus master, SERR.
        bridge.write_config_register(3, 0, &[0x10]); // Cache line size.
        bridge.write_config_register(0xf, 0, &[0x0b]); // Interrupt line.
        let saved = bridge.save().unwrap();

        let mut fresh = PciHostBridge::new();
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh.read_config_register(1) & 0xffff, 0x0106);
        assert_eq!(fresh.read_config_register(3) & 0xff, 0x10);
        assert_eq!(fresh.read_config_register(0xf) & 0xff, 0x0b);
        for reg in 0..1024 {
            assert_eq!(
                fresh.read_config_register(reg),
                bridge.read_config_register(reg),
                "{reg}"
            );
        }
    }

    #[test]
    fn snapshot_refuses_bad_state() {
        let mut bridge = PciHostBridge::new();
        bridge.write_config_register(3, 0, &[0x10]);
        let saved = bridge.save().unwrap();
        let mut fresh = PciHostBridge::new();
        fresh.write_config_register(3, 0, &[0x20]);
        for len in [0, 1, 2, saved.len() / 2, saved.len() - 1] {
            assert!(fresh.restore(&saved[..len]).is_err(), "{len} bytes");
        }
        let short = encode(
            SNAPSHOT_NAME,
            &HostBridgeSnapshot {
                registers: vec![0; 1023],
            },
        )
        .unwrap();
        assert!(matches!(
            fresh.restore(&short),
            Err(SnapshotError::Decode { .. })
        ));
        assert_eq!(
            fresh.read_config_register(3) & 0xff,
            0x20,
            "nothing changed"
        );
    }
}
