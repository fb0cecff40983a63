//! A small machine (MMIO and PIO buses, PCI bus, both config accessors) and a PCI device with
//! one BAR of each kind, for the PCI unit tests.

use std::sync::{Arc, Mutex};

use super::configuration::{PciConfiguration, PciIdentity};
use super::device::{BarReprogram, PciBar, PciBarKind, PciDevice, PciInterruptPin};
use super::{PciBus, PciConfigIo, PciConfigMmio, PciWindow, PCI_CONFIG_IO_LEN};
use crate::arch::layout;
use crate::devices::interrupt::test_util::RecordingIrqChip;
use crate::devices::{Bus, IrqLine};

/// Vendor 0xabcd, device 0x1234, as register 0 reads.
pub const TEST_IDS: u32 = 0x1234_abcd;
/// Where the tests' 64-bit window starts (as if the guest had 4 GiB above 4 GiB).
pub const TEST_MMIO64_START: u64 = 0x2_0000_0000;
pub const TEST_BARS: [PciBar; 3] = [
    PciBar {
        index: 0,
        kind: PciBarKind::Mmio32,
        size: 0x1000,
        prefetchable: false,
    },
    PciBar {
        index: 2,
        kind: PciBarKind::Mmio64,
        size: 0x10_0000,
        prefetchable: true,
    },
    PciBar {
        index: 4,
        kind: PciBarKind::Io,
        size: 0x20,
        prefetchable: false,
    },
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BarAccess {
    Read {
        base: u64,
        offset: u64,
        len: usize,
    },
    Write {
        base: u64,
        offset: u64,
        data: Vec<u8>,
    },
}

pub struct TestDevice {
    pub config: PciConfiguration,
    pub accesses: Vec<BarAccess>,
    pub moves: Vec<(usize, Option<u64>)>,
    pub intx: Option<IrqLine>,
    /// What `bars()` reports instead of the configuration's BARs, to feed the bus bad input.
    pub reported_bars: Option<Vec<PciBar>>,
}

/// Reads of a BAR return `offset + i` in byte `i`, so a test can tell where a read landed.
impl PciDevice for TestDevice {
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

    fn bars(&self) -> Vec<PciBar> {
        self.reported_bars
            .clone()
            .unwrap_or_else(|| self.config.bars())
    }

    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = (offset as u8).wrapping_add(i as u8);
        }
        self.accesses.push(BarAccess::Read {
            base,
            offset,
            len: data.len(),
        });
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.accesses.push(BarAccess::Write {
            base,
            offset,
            data: data.to_vec(),
        });
    }

    fn bar_moved(&mut self, index: usize, mapped_at: Option<u64>) {
        self.moves.push((index, mapped_at));
    }

    fn interrupt_pin(&self) -> PciInterruptPin {
        self.config.interrupt_pin()
    }

    fn assign_intx(&mut self, line: IrqLine) {
        self.intx = Some(line);
    }

    fn id(&self) -> Option<String> {
        Some("test0".to_string())
    }
}

/// A device with [`TEST_BARS`], pin INTA and two capabilities (ids 0x09 and 0x11).
pub fn test_device() -> Arc<Mutex<TestDevice>> {
    device_with_bars(&TEST_BARS)
}

/// Like [`test_device`], with other BARs.
pub fn device_with_bars(bars: &[PciBar]) -> Arc<Mutex<TestDevice>> {
    let identity = PciIdentity {
        vendor_id: TEST_IDS as u16,
        device_id: (TEST_IDS >> 16) as u16,
        class_code: 0xff,
        ..Default::default()
    };
    let mut config = PciConfiguration::new(identity, PciInterruptPin::IntA);
    for bar in bars {
        config.add_bar(*bar).unwrap();
    }
    config.add_capability(&[0x09, 0, 8, 1, 2, 3, 4, 5]).unwrap();
    config
        .add_capability(&[0x11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        .unwrap();
    Arc::new(Mutex::new(TestDevice {
        config,
        accesses: Vec::new(),
        moves: Vec::new(),
        intx: None,
        reported_bars: None,
    }))
}

pub struct TestMachine {
    pub mmio: Arc<Bus>,
    pub pio: Arc<Bus>,
    pub pci: Arc<Mutex<PciBus>>,
    pub irq: Arc<RecordingIrqChip>,
}

impl TestMachine {
    pub fn new() -> Self {
        Self::with_mmio64_window(PciWindow::new(TEST_MMIO64_START, layout::PCI_MMIO64_SIZE))
    }

    pub fn with_mmio64_window(window: PciWindow) -> Self {
        let mmio = Arc::new(Bus::new());
        let pio = Arc::new(Bus::new());
        let irq = Arc::new(RecordingIrqChip::default());
        let pci = PciBus::new(mmio.clone(), pio.clone(), window, irq.clone()).unwrap();
        let pci = Arc::new(Mutex::new(pci));
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(pci.clone()))),
            u64::from(layout::PCI_CONFIG_ADDRESS_PORT),
            PCI_CONFIG_IO_LEN,
        )
        .unwrap();
        mmio.insert(
            Arc::new(Mutex::new(PciConfigMmio::new(pci.clone()))),
            layout::PCI_MMCONFIG_START.0,
            layout::PCI_MMCONFIG_SIZE,
        )
        .unwrap();
        Self {
            mmio,
            pio,
            pci,
            irq,
        }
    }

    pub fn add(&self, device: Arc<Mutex<TestDevice>>, slot: Option<u8>) -> u8 {
        self.pci.lock().unwrap().add_device(slot, device).unwrap()
    }

    pub fn mmio_read(&self, address: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.mmio.read(address, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    /// ECAM address of byte `offset` of `slot`'s configuration space.
    pub fn ecam(slot: u8, offset: u64) -> u64 {
        layout::PCI_MMCONFIG_START.0 + (u64::from(slot) << 15) + offset
    }

    pub fn config_read(&self, slot: u8, offset: u64) -> u32 {
        self.mmio_read(Self::ecam(slot, offset), 4) as u32
    }

    pub fn config_write(&self, slot: u8, offset: u64, value: u32) {
        assert!(self
            .mmio
            .write(Self::ecam(slot, offset), &value.to_le_bytes()));
    }
}
