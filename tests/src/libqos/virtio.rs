//! The virtio-pci modern transport (virtio 1.x, section 4.1) as a test driver: find the
//! vendor capabilities, reset, negotiate features, set up queues with MSI-X vectors, and
//! notify. MSI-X table entries are programmed with an address in the local APIC's
//! 0xFEE0_0000 range so the qtest vmm reports each message as `IRQ msi ADDR DATA`.

use super::pci::{self, PciAddress, PciError, PciFunction, CAP_ID_MSIX, CAP_ID_VENDOR};
use super::virtqueue::{GuestAlloc, Virtqueue, VirtqueueError};
use crate::qtest::{Qtest, QtestError};

pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are 0x1040 + the virtio device type.
pub const VIRTIO_PCI_MODERN_DEVICE_BASE: u16 = 0x1040;
pub const VIRTIO_ID_NET: u16 = 1;
pub const VIRTIO_ID_BLOCK: u16 = 2;

// virtio_pci_cap.cfg_type
pub const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
pub const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
pub const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
pub const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;
pub const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;

// Device status bits.
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

// Transport feature bits.
pub const VIRTIO_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;

/// "No MSI-X vector" for config_msix_vector and queue_msix_vector.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Common configuration structure offsets (struct virtio_pci_common_cfg).
pub mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// The MSI address the driver programs: the local APIC's range, destination APIC 0.
pub const MSI_ADDRESS: u64 = 0xfee0_0000;
/// MSI-X table entries and message control.
const MSIX_ENTRY_SIZE: u64 = 16;
const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const MSIX_VECTOR_CONTROL_MASKED: u32 = 1;

/// How often a reset is polled for completion before giving up.
const RESET_POLLS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error(transparent)]
    Qtest(#[from] QtestError),
    #[error(transparent)]
    Queue(#[from] VirtqueueError),
    #[error("{addr} ({vendor:04x}:{device:04x}) is not a modern virtio-pci device")]
    NotModernVirtio {
        addr: PciAddress,
        vendor: u16,
        device: u16,
    },
    #[error("{addr} has no virtio {what} capability")]
    MissingCapability {
        addr: PciAddress,
        what: &'static str,
    },
    #[error("{addr}: a virtio capability names BAR {bar}, which is not an assigned memory BAR")]
    CapabilityBar { addr: PciAddress, bar: u8 },
    #[error("{addr}: virtio capability at {offset:#x} is {len} bytes, too short")]
    ShortCapability {
        addr: PciAddress,
        offset: u8,
        len: u8,
    },
    #[error("the device stays in status {0:#x} after a reset")]
    ResetTimeout(u8),
    #[error("the device does not offer VIRTIO_F_VERSION_1 (offers {0:#x})")]
    NoVersion1(u64),
    #[error("the device did not accept features {0:#x} (FEATURES_OK did not stick)")]
    FeaturesRejected(u64),
    #[error("queue {0} does not exist (the device has {1})")]
    NoSuchQueue(u16, u16),
    #[error("queue {0} is not available (queue_size 0)")]
    QueueUnavailable(u16),
    #[error("the device refused MSI-X vector {vector} for {what}")]
    VectorRejected { what: String, vector: u16 },
    #[error("{addr} has no MSI-X capability")]
    NoMsix { addr: PciAddress },
    #[error("MSI-X vector {vector} is beyond the table's {size} entries")]
    NoSuchVector { vector: u16, size: u16 },
    #[error("device config offset {offset:#x}+{len} is beyond its {size} bytes")]
    ConfigOutOfRange { offset: u64, len: u64, size: u64 },
}

/// A virtio structure in a BAR, from its vendor capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCap {
    pub cap_offset: u8,
    pub cfg_type: u8,
    pub bar: u8,
    pub offset: u32,
    pub length: u32,
    /// Only for the notify capability.
    pub notify_off_multiplier: u32,
}

impl VirtioCap {
    /// Decode struct virtio_pci_cap (and the notify multiplier after it) from the
    /// capability's bytes, starting with cap_vndr.
    pub fn parse(cap_offset: u8, bytes: &[u8]) -> Option<VirtioCap> {
        let le32 = |i: usize| -> Option<u32> {
            Some(u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?))
        };
        if bytes.len() < 16 || bytes[0] != CAP_ID_VENDOR {
            return None;
        }
        let cfg_type = bytes[3];
        let notify_off_multiplier = if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG {
            le32(16)?
        } else {
            0
        };
        Some(VirtioCap {
            cap_offset,
            cfg_type,
            bar: bytes[4],
            offset: le32(8)?,
            length: le32(12)?,
            notify_off_multiplier,
        })
    }
}

/// The MSI-X capability of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msix {
    pub cap_offset: u8,
    pub table_size: u16,
    /// Guest-physical address of the table.
    pub table: u64,
}

/// A modern virtio-pci function, found and mapped.
#[derive(Debug)]
pub struct VirtioPciDevice {
    pub pci: PciFunction,
    pub bars: Vec<pci::Bar>,
    pub caps: Vec<VirtioCap>,
    /// Guest-physical addresses of the structures.
    pub common: u64,
    pub notify_base: u64,
    pub notify_off_multiplier: u32,
    pub isr: u64,
    pub device_cfg: Option<(u64, u32)>,
    pub msix: Option<Msix>,
    /// The features accepted by [`VirtioPciDevice::negotiate`].
    pub features: u64,
}

fn bar_address(bars: &[pci::Bar], index: u8) -> Option<u64> {
    bars.iter()
        .find(|b| b.index == index && b.kind != pci::BarKind::Io)
        .map(|b| b.address)
}

impl VirtioPciDevice {
    /// Map a virtio-pci function: assign its BARs from `alloc` (None: keep where the vmm
    /// placed them), enable memory decoding and bus mastering, and find the common,
    /// notify, ISR and device structures and the MSI-X table.
    pub fn new(
        qt: &mut Qtest,
        f: PciFunction,
        alloc: Option<&mut pci::BarAllocator>,
    ) -> Result<Self, VirtioError> {
        let addr = f.addr;
        if f.vendor_id != VIRTIO_PCI_VENDOR_ID || f.device_id < VIRTIO_PCI_MODERN_DEVICE_BASE {
            return Err(VirtioError::NotModernVirtio {
                addr,
                vendor: f.vendor_id,
                device: f.device_id,
            });
        }
        let bars = match alloc {
            Some(a) => pci::assign_bars(qt, addr, a)?,
            None => pci::probe_bars(qt, addr)?,
        };
        pci::enable(qt, addr, false, true, true)?;

        let mut caps = Vec::new();
        let mut msix = None;
        for cap in pci::capabilities(qt, addr)? {
            match cap.id {
                CAP_ID_VENDOR => {
                    let len = pci::config_readb(qt, addr, cap.offset.saturating_add(2))?;
                    if len < 16 {
                        return Err(VirtioError::ShortCapability {
                            addr,
                            offset: cap.offset,
                            len,
                        });
                    }
                    let mut bytes = Vec::with_capacity(20);
                    for i in 0..len.min(20) {
                        bytes.push(pci::config_readb(qt, addr, cap.offset.saturating_add(i))?);
                    }
                    if let Some(vc) = VirtioCap::parse(cap.offset, &bytes) {
                        caps.push(vc);
                    }
                }
                CAP_ID_MSIX => {
                    let control = pci::config_readw(qt, addr, cap.offset + 2)?;
                    let table = pci::config_readl(qt, addr, cap.offset + 4)?;
                    let bir = (table & 7) as u8;
                    let base = bar_address(&bars, bir)
                        .ok_or(VirtioError::CapabilityBar { addr, bar: bir })?;
                    msix = Some(Msix {
                        cap_offset: cap.offset,
                        table_size: (control & 0x7ff) + 1,
                        table: base + u64::from(table & !7),
                    });
                }
                _ => {}
            }
        }
        // The first capability of each type is the one to use (spec 4.1.4).
        let find = |t: u8, what: &'static str| {
            let c = caps
                .iter()
                .find(|c| c.cfg_type == t)
                .copied()
                .ok_or(VirtioError::MissingCapability { addr, what })?;
            let base =
                bar_address(&bars, c.bar).ok_or(VirtioError::CapabilityBar { addr, bar: c.bar })?;
            Ok::<_, VirtioError>((c, base + u64::from(c.offset)))
        };
        let (_, common) = find(VIRTIO_PCI_CAP_COMMON_CFG, "common")?;
        let (notify_cap, notify_base) = find(VIRTIO_PCI_CAP_NOTIFY_CFG, "notify")?;
        let (_, isr) = find(VIRTIO_PCI_CAP_ISR_CFG, "ISR")?;
        let device_cfg = find(VIRTIO_PCI_CAP_DEVICE_CFG, "device")
            .ok()
            .map(|(c, at)| (at, c.length));
        Ok(Self {
            pci: f,
            bars,
            caps,
            common,
            notify_base,
            notify_off_multiplier: notify_cap.notify_off_multiplier,
            isr,
            device_cfg,
            msix,
            features: 0,
        })
    }

    /// The virtio device type (1 net, 2 block, ...).
    pub fn device_type(&self) -> u16 {
        self.pci
            .device_id
            .wrapping_sub(VIRTIO_PCI_MODERN_DEVICE_BASE)
    }

    pub fn status(&self, qt: &mut Qtest) -> Result<u8, VirtioError> {
        Ok(qt.readb(self.common + common::DEVICE_STATUS)?)
    }

    pub fn set_status(&self, qt: &mut Qtest, status: u8) -> Result<(), VirtioError> {
        Ok(qt.writeb(self.common + common::DEVICE_STATUS, status)?)
    }

    /// Add `bits` to the device status.
    pub fn add_status(&self, qt: &mut Qtest, bits: u8) -> Result<(), VirtioError> {
        let s = self.status(qt)?;
        self.set_status(qt, s | bits)
    }

    /// Write 0 to device_status and wait until the device reads back 0 (spec 4.1.4.3.2).
    pub fn reset(&mut self, qt: &mut Qtest) -> Result<(), VirtioError> {
        self.set_status(qt, 0)?;
        let mut last = 0;
        for _ in 0..RESET_POLLS {
            last = self.status(qt)?;
            if last == 0 {
                self.features = 0;
                return Ok(());
            }
        }
        Err(VirtioError::ResetTimeout(last))
    }

    /// All 64 feature bits the device offers.
    pub fn device_features(&self, qt: &mut Qtest) -> Result<u64, VirtioError> {
        qt.writel(self.common + common::DEVICE_FEATURE_SELECT, 0)?;
        let lo = qt.readl(self.common + common::DEVICE_FEATURE)?;
        qt.writel(self.common + common::DEVICE_FEATURE_SELECT, 1)?;
        let hi = qt.readl(self.common + common::DEVICE_FEATURE)?;
        Ok(u64::from(lo) | (u64::from(hi) << 32))
    }

    pub fn write_driver_features(&self, qt: &mut Qtest, features: u64) -> Result<(), VirtioError> {
        qt.writel(self.common + common::DRIVER_FEATURE_SELECT, 0)?;
        qt.writel(self.common + common::DRIVER_FEATURE, features as u32)?;
        qt.writel(self.common + common::DRIVER_FEATURE_SELECT, 1)?;
        qt.writel(
            self.common + common::DRIVER_FEATURE,
            (features >> 32) as u32,
        )?;
        Ok(())
    }

    /// The initialization sequence up to FEATURES_OK (spec 3.1.1): reset, ACKNOWLEDGE,
    /// DRIVER, accept the offered features that are in `wanted` (VERSION_1 always), and
    /// check that FEATURES_OK stuck. Returns the negotiated features.
    pub fn negotiate(&mut self, qt: &mut Qtest, wanted: u64) -> Result<u64, VirtioError> {
        self.reset(qt)?;
        self.add_status(qt, STATUS_ACKNOWLEDGE)?;
        self.add_status(qt, STATUS_DRIVER)?;
        let offered = self.device_features(qt)?;
        if offered & VIRTIO_F_VERSION_1 == 0 {
            self.add_status(qt, STATUS_FAILED)?;
            return Err(VirtioError::NoVersion1(offered));
        }
        let features = offered & (wanted | VIRTIO_F_VERSION_1);
        self.write_driver_features(qt, features)?;
        self.add_status(qt, STATUS_FEATURES_OK)?;
        if self.status(qt)? & STATUS_FEATURES_OK == 0 {
            self.add_status(qt, STATUS_FAILED)?;
            return Err(VirtioError::FeaturesRejected(features));
        }
        self.features = features;
        Ok(features)
    }

    /// Set DRIVER_OK: the device is live.
    pub fn driver_ok(&self, qt: &mut Qtest) -> Result<(), VirtioError> {
        self.add_status(qt, STATUS_DRIVER_OK)
    }

    pub fn num_queues(&self, qt: &mut Qtest) -> Result<u16, VirtioError> {
        Ok(qt.readw(self.common + common::NUM_QUEUES)?)
    }

    pub fn config_generation(&self, qt: &mut Qtest) -> Result<u8, VirtioError> {
        Ok(qt.readb(self.common + common::CONFIG_GENERATION)?)
    }

    /// Enable MSI-X and program every table entry `i` with [`MSI_ADDRESS`] and data
    /// `data_base + i`, unmasked.
    pub fn enable_msix(&self, qt: &mut Qtest, data_base: u32) -> Result<(), VirtioError> {
        let addr = self.pci.addr;
        let m = self.msix.ok_or(VirtioError::NoMsix { addr })?;
        let control = pci::config_readw(qt, addr, m.cap_offset + 2)?;
        // Mask the whole function while the table is written.
        pci::config_writew(
            qt,
            addr,
            m.cap_offset + 2,
            control | MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK,
        )?;
        for i in 0..m.table_size {
            self.set_msix_entry(
                qt,
                i,
                MSI_ADDRESS,
                data_base.wrapping_add(u32::from(i)),
                false,
            )?;
        }
        pci::config_writew(
            qt,
            addr,
            m.cap_offset + 2,
            (control | MSIX_CONTROL_ENABLE) & !MSIX_CONTROL_FUNCTION_MASK,
        )?;
        Ok(())
    }

    /// Program one MSI-X table entry.
    pub fn set_msix_entry(
        &self,
        qt: &mut Qtest,
        vector: u16,
        address: u64,
        data: u32,
        masked: bool,
    ) -> Result<(), VirtioError> {
        let m = self.msix.ok_or(VirtioError::NoMsix {
            addr: self.pci.addr,
        })?;
        if vector >= m.table_size {
            return Err(VirtioError::NoSuchVector {
                vector,
                size: m.table_size,
            });
        }
        let entry = m.table + MSIX_ENTRY_SIZE * u64::from(vector);
        qt.writel(entry + 12, MSIX_VECTOR_CONTROL_MASKED)?;
        qt.writel(entry, address as u32)?;
        qt.writel(entry + 4, (address >> 32) as u32)?;
        qt.writel(entry + 8, data)?;
        let control = if masked {
            MSIX_VECTOR_CONTROL_MASKED
        } else {
            0
        };
        qt.writel(entry + 12, control)?;
        Ok(())
    }

    /// The data [`VirtioPciDevice::enable_msix`] gave `vector`.
    pub fn msi_data(data_base: u32, vector: u16) -> u32 {
        data_base.wrapping_add(u32::from(vector))
    }

    /// Route configuration-change interrupts to `vector` (or [`VIRTIO_MSI_NO_VECTOR`]).
    pub fn set_config_vector(&self, qt: &mut Qtest, vector: u16) -> Result<(), VirtioError> {
        let reg = self.common + common::CONFIG_MSIX_VECTOR;
        qt.writew(reg, vector)?;
        if qt.readw(reg)? != vector {
            return Err(VirtioError::VectorRejected {
                what: "configuration changes".into(),
                vector,
            });
        }
        Ok(())
    }

    /// Set up queue `index` (after [`VirtioPciDevice::negotiate`], before
    /// [`VirtioPciDevice::driver_ok`]): size at most `max_size` (the device's size if 0),
    /// rings from `alloc`, interrupts to MSI-X `vector` (if any), then enable it.
    pub fn setup_queue(
        &self,
        qt: &mut Qtest,
        alloc: &mut GuestAlloc,
        index: u16,
        max_size: u16,
        vector: Option<u16>,
    ) -> Result<Virtqueue, VirtioError> {
        let n = self.num_queues(qt)?;
        if index >= n {
            return Err(VirtioError::NoSuchQueue(index, n));
        }
        let c = self.common;
        qt.writew(c + common::QUEUE_SELECT, index)?;
        let dev_size = qt.readw(c + common::QUEUE_SIZE)?;
        if dev_size == 0 {
            return Err(VirtioError::QueueUnavailable(index));
        }
        let mut size = if max_size == 0 {
            dev_size
        } else {
            dev_size.min(max_size)
        };
        // A split ring's size is a power of two: round down.
        if !size.is_power_of_two() {
            size = 1 << (15 - size.leading_zeros().min(15));
        }
        let mut vq = Virtqueue::new(qt, alloc, index, size)?;
        qt.writew(c + common::QUEUE_SIZE, size)?;
        qt.writeq(c + common::QUEUE_DESC, vq.desc)?;
        qt.writeq(c + common::QUEUE_DRIVER, vq.avail)?;
        qt.writeq(c + common::QUEUE_DEVICE, vq.used)?;
        if let Some(v) = vector {
            qt.writew(c + common::QUEUE_MSIX_VECTOR, v)?;
            if qt.readw(c + common::QUEUE_MSIX_VECTOR)? != v {
                return Err(VirtioError::VectorRejected {
                    what: format!("queue {index}"),
                    vector: v,
                });
            }
        }
        let notify_off = qt.readw(c + common::QUEUE_NOTIFY_OFF)?;
        vq.notify_addr =
            Some(self.notify_base + u64::from(notify_off) * u64::from(self.notify_off_multiplier));
        qt.writew(c + common::QUEUE_ENABLE, 1)?;
        Ok(vq)
    }

    /// Read and clear the ISR status (bit 0: queue interrupt, bit 1: config change).
    pub fn read_isr(&self, qt: &mut Qtest) -> Result<u8, VirtioError> {
        Ok(qt.readb(self.isr)?)
    }

    fn config_addr(&self, offset: u64, len: u64) -> Result<u64, VirtioError> {
        let (base, size) = self.device_cfg.ok_or(VirtioError::MissingCapability {
            addr: self.pci.addr,
            what: "device",
        })?;
        let size = u64::from(size);
        let inside = matches!(offset.checked_add(len), Some(end) if end <= size);
        if !inside {
            return Err(VirtioError::ConfigOutOfRange { offset, len, size });
        }
        Ok(base + offset)
    }

    pub fn config_readb(&self, qt: &mut Qtest, offset: u64) -> Result<u8, VirtioError> {
        Ok(qt.readb(self.config_addr(offset, 1)?)?)
    }
    pub fn config_readw(&self, qt: &mut Qtest, offset: u64) -> Result<u16, VirtioError> {
        Ok(qt.readw(self.config_addr(offset, 2)?)?)
    }
    pub fn config_readl(&self, qt: &mut Qtest, offset: u64) -> Result<u32, VirtioError> {
        Ok(qt.readl(self.config_addr(offset, 4)?)?)
    }
    /// A 64-bit field, read as two 32-bit halves under a stable config generation
    /// (spec 4.1.3.1).
    pub fn config_readq(&self, qt: &mut Qtest, offset: u64) -> Result<u64, VirtioError> {
        let at = self.config_addr(offset, 8)?;
        loop {
            let before = self.config_generation(qt)?;
            let lo = qt.readl(at)?;
            let hi = qt.readl(at + 4)?;
            if self.config_generation(qt)? == before {
                return Ok(u64::from(lo) | (u64::from(hi) << 32));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_virtio_capabilities() {
        // cap_vndr, next, len, cfg_type, bar, id, pad, pad, offset, length, multiplier
        let notify = [
            0x09, 0x50, 20, 2, 4, 0, 0, 0, 0x00, 0x30, 0, 0, 0x00, 0x10, 0, 0, 4, 0, 0, 0,
        ];
        assert_eq!(
            VirtioCap::parse(0x40, &notify),
            Some(VirtioCap {
                cap_offset: 0x40,
                cfg_type: VIRTIO_PCI_CAP_NOTIFY_CFG,
                bar: 4,
                offset: 0x3000,
                length: 0x1000,
                notify_off_multiplier: 4,
            })
        );
        let common = [0x09, 0, 16, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0x38, 0, 0, 0];
        let c = VirtioCap::parse(0x60, &common).unwrap();
        assert_eq!((c.cfg_type, c.offset, c.length), (1, 0, 0x38));
        // Too short, wrong id, notify without its multiplier.
        assert_eq!(VirtioCap::parse(0x40, &common[..12]), None);
        let mut msix = common;
        msix[0] = 0x11;
        assert_eq!(VirtioCap::parse(0x40, &msix), None);
        assert_eq!(VirtioCap::parse(0x40, &notify[..16]), None);
    }

    #[test]
    fn common_layout_matches_the_spec() {
        assert_eq!(common::DEVICE_STATUS, 20);
        assert_eq!(common::QUEUE_SELECT, 22);
        assert_eq!(common::QUEUE_NOTIFY_OFF, 30);
        assert_eq!(common::QUEUE_DEVICE, 48);
        assert_eq!(VirtioPciDevice::msi_data(0x40, 3), 0x43);
    }
}
