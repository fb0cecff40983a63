//! virtio-net (virtio 1.x, section 5.1) as a test driver: feature bits, the header, the
//! control queue's commands, and bringing a virtio-net-pci function up with its RX, TX
//! and control queues on MSI-X vectors 1, 2 and 3 (0 is for configuration changes).

use std::time::Duration;

use super::blk::wait_used;
use super::pci::{self, BarAllocator};
use super::virtio::{VirtioPciDevice, VIRTIO_PCI_MODERN_DEVICE_BASE, VIRTIO_PCI_VENDOR_ID};
use super::virtqueue::{Buffer, GuestAlloc, UsedElem, Virtqueue};
use crate::qtest::Qtest;

pub const VIRTIO_ID_NET: u16 = 1;

pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
pub const VIRTIO_NET_F_CTRL_RX: u64 = 1 << 18;
pub const VIRTIO_NET_F_CTRL_VLAN: u64 = 1 << 19;
pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Control classes and commands.
pub const CTRL_RX: u8 = 0;
pub const CTRL_RX_PROMISC: u8 = 0;
pub const CTRL_RX_ALLMULTI: u8 = 1;
pub const CTRL_MAC: u8 = 1;
pub const CTRL_MAC_TABLE_SET: u8 = 0;
pub const CTRL_VLAN: u8 = 2;
pub const CTRL_VLAN_ADD: u8 = 0;
pub const CTRL_MQ: u8 = 4;
pub const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
pub const VIRTIO_NET_OK: u8 = 0;
pub const VIRTIO_NET_ERR: u8 = 1;

/// struct virtio_net_hdr_v1.
pub const HDR_LEN: usize = 12;

/// Offsets in struct virtio_net_config.
pub mod config {
    pub const MAC: u64 = 0;
    pub const STATUS: u64 = 6;
}

pub const RX_VECTOR: u16 = 1;
pub const TX_VECTOR: u16 = 2;
pub const CTRL_VECTOR: u16 = 3;

/// A virtio-net-pci function brought up to DRIVER_OK.
pub struct NetDevice {
    pub dev: VirtioPciDevice,
    pub offered: u64,
    pub features: u64,
    pub rx: Virtqueue,
    pub tx: Virtqueue,
    pub ctrl: Virtqueue,
    /// Queue pairs after the first (RX, TX), on vectors 4, 5, 6, ...
    pub more_pairs: Vec<(Virtqueue, Virtqueue)>,
    pub mac: [u8; 6],
}

impl NetDevice {
    /// Find the first virtio-net function, map it in a machine of `ram_size` bytes,
    /// accept `features` of those offered, and set up RX, TX and the control queue.
    pub fn init(
        qt: &mut Qtest,
        ram_size: u64,
        alloc: &mut GuestAlloc,
        features: u64,
    ) -> Result<NetDevice, String> {
        Self::init_pairs(qt, ram_size, alloc, features, 1)
    }

    /// [`NetDevice::init`] with `pairs` queue pairs set up (the device uses the first
    /// only until [`CTRL_MQ_VQ_PAIRS_SET`]).
    pub fn init_pairs(
        qt: &mut Qtest,
        ram_size: u64,
        alloc: &mut GuestAlloc,
        features: u64,
        pairs: u16,
    ) -> Result<NetDevice, String> {
        let f = pci::enumerate_bus0(qt)
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|f| {
                f.vendor_id == VIRTIO_PCI_VENDOR_ID
                    && f.device_id == VIRTIO_PCI_MODERN_DEVICE_BASE + VIRTIO_ID_NET
            })
            .ok_or("no virtio-net function on bus 0")?;
        let mut bars = BarAllocator::for_ram(ram_size);
        let mut dev = VirtioPciDevice::new(qt, f, Some(&mut bars)).map_err(|e| e.to_string())?;
        dev.reset(qt).map_err(|e| e.to_string())?;
        let offered = dev.device_features(qt).map_err(|e| e.to_string())?;
        let features = dev.negotiate(qt, features).map_err(|e| e.to_string())?;
        dev.enable_msix(qt, 0x5000).map_err(|e| e.to_string())?;
        dev.set_config_vector(qt, 0).map_err(|e| e.to_string())?;
        let queues = dev.num_queues(qt).map_err(|e| e.to_string())?;
        let setup = |qt: &mut Qtest, alloc: &mut GuestAlloc, q, vector| {
            dev.setup_queue(qt, alloc, q, 0, Some(vector))
                .map_err(|e| e.to_string())
        };
        let rx = setup(qt, alloc, 0, RX_VECTOR)?;
        let tx = setup(qt, alloc, 1, TX_VECTOR)?;
        let ctrl = setup(qt, alloc, queues - 1, CTRL_VECTOR)?;
        let mut more_pairs = Vec::new();
        for pair in 1..pairs {
            let vector = CTRL_VECTOR + 2 * pair - 1;
            let rx = setup(qt, alloc, 2 * pair, vector)?;
            let tx = setup(qt, alloc, 2 * pair + 1, vector + 1)?;
            more_pairs.push((rx, tx));
        }
        dev.driver_ok(qt).map_err(|e| e.to_string())?;
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = dev
                .config_readb(qt, config::MAC + i as u64)
                .map_err(|e| e.to_string())?;
        }
        Ok(NetDevice {
            dev,
            offered,
            features,
            rx,
            tx,
            ctrl,
            more_pairs,
            mac,
        })
    }

    /// The link status in the configuration space (VIRTIO_NET_S_LINK_UP).
    pub fn link_up(&self, qt: &mut Qtest) -> bool {
        self.dev
            .config_readw(qt, config::STATUS)
            .map(|s| s & 1 != 0)
            .unwrap_or(false)
    }

    /// Send a control command and wait for its ack.
    pub fn command(
        &mut self,
        qt: &mut Qtest,
        alloc: &mut GuestAlloc,
        class: u8,
        cmd: u8,
        data: &[u8],
    ) -> u8 {
        let hdr = alloc.alloc(2, 2).expect("ctrl header");
        let body = alloc.alloc(data.len().max(1) as u64, 8).expect("ctrl data");
        let ack = alloc.alloc(1, 1).expect("ctrl ack");
        qt.memwrite(hdr, &[class, cmd]).unwrap();
        qt.memwrite(body, data).unwrap();
        qt.writeb(ack, 0xee).unwrap();
        let mut bufs = vec![Buffer::readable(hdr, 2)];
        if !data.is_empty() {
            bufs.push(Buffer::readable(body, data.len() as u32));
        }
        bufs.push(Buffer::writable(ack, 1));
        self.ctrl.add_chain(qt, &bufs).unwrap();
        self.ctrl.kick(qt).unwrap();
        self.ctrl
            .wait_used(qt, Duration::from_secs(10))
            .expect("the control queue answers");
        qt.readb(ack).unwrap()
    }
}

/// Wait for the next used chain of `vq` (an MSI wakes the wait early).
pub fn wait(qt: &mut Qtest, vq: &mut Virtqueue, timeout: Duration) -> Option<UsedElem> {
    wait_used(qt, vq, timeout).ok()
}
