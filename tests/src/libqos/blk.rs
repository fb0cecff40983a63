//! virtio-blk (virtio 1.x, section 5.2) as a test driver: request types, status codes,
//! feature bits and configuration offsets, the request header, and bringing a
//! virtio-blk-pci function up with every queue on its own MSI-X vector.

use std::time::{Duration, Instant};

use super::pci::{self, BarAllocator, PciError};
use super::virtio::{
    VirtioError, VirtioPciDevice, VIRTIO_ID_BLOCK, VIRTIO_PCI_MODERN_DEVICE_BASE,
    VIRTIO_PCI_VENDOR_ID,
};
use super::virtqueue::{GuestAlloc, UsedElem, Virtqueue, VirtqueueError};
use crate::qtest::{Qtest, QtestError};

// Request types.
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

// Status byte values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

// Feature bits.
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;

/// Offsets in struct virtio_blk_config.
pub mod config {
    pub const CAPACITY: u64 = 0;
    pub const SEG_MAX: u64 = 12;
    pub const NUM_QUEUES: u64 = 34;
}

pub const SECTOR_SIZE: u64 = 512;
/// Bytes of a request header (type, reserved, sector) and of GET_ID's answer.
pub const HEADER_LEN: u32 = 16;
pub const ID_BYTES: u32 = 20;

/// The MSI-X vector queue `q` is given by [`BlkDevice::init`] (0 is for config changes).
pub fn queue_vector(q: u16) -> u16 {
    q + 1
}

/// struct virtio_blk_outhdr: type, reserved (ioprio), sector.
pub fn header(kind: u32, sector: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    #[error(transparent)]
    Queue(#[from] VirtqueueError),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error(transparent)]
    Qtest(#[from] QtestError),
    #[error("no virtio-blk function on bus 0")]
    NotFound,
    #[error("no used buffer on queue {queue} within {timeout:?}")]
    Timeout { queue: u16, timeout: Duration },
}

/// How [`BlkDevice::init`] sets the device up.
#[derive(Clone, Copy, Debug)]
pub struct BlkOptions {
    /// Features to accept when offered (VERSION_1 always).
    pub features: u64,
    /// Queues to set up (at most what the device has; 0: all of them).
    pub queues: u16,
    /// Largest queue size (0: the device's).
    pub queue_size: u16,
    /// MSI-X data of vector 0; vector `v` gets `msi_data_base + v`.
    pub msi_data_base: u32,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            features: 0,
            queues: 0,
            queue_size: 0,
            msi_data_base: 0x4000,
        }
    }
}

/// A virtio-blk-pci function brought up to DRIVER_OK.
#[derive(Debug)]
pub struct BlkDevice {
    pub dev: VirtioPciDevice,
    /// Every feature the device offered.
    pub offered: u64,
    /// The features accepted.
    pub features: u64,
    pub queues: Vec<Virtqueue>,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
}

impl BlkDevice {
    /// Find the first virtio-blk function on bus 0, map its BARs in a machine of
    /// `ram_size` bytes, negotiate, give config changes MSI-X vector 0 and queue `q`
    /// vector `q + 1`, set up the queues with rings from `alloc`, and set DRIVER_OK.
    pub fn init(
        qt: &mut Qtest,
        ram_size: u64,
        alloc: &mut GuestAlloc,
        opts: BlkOptions,
    ) -> Result<BlkDevice, BlkError> {
        let f = pci::enumerate_bus0(qt)?
            .into_iter()
            .find(|f| {
                f.vendor_id == VIRTIO_PCI_VENDOR_ID
                    && f.device_id == VIRTIO_PCI_MODERN_DEVICE_BASE + VIRTIO_ID_BLOCK
            })
            .ok_or(BlkError::NotFound)?;
        let mut bars = BarAllocator::for_ram(ram_size);
        let mut dev = VirtioPciDevice::new(qt, f, Some(&mut bars))?;
        dev.reset(qt)?;
        let offered = dev.device_features(qt)?;
        let features = dev.negotiate(qt, opts.features)?;
        dev.enable_msix(qt, opts.msi_data_base)?;
        dev.set_config_vector(qt, 0)?;
        let available = dev.num_queues(qt)?;
        let count = if opts.queues == 0 {
            available
        } else {
            opts.queues.min(available)
        };
        let mut queues = Vec::with_capacity(usize::from(count));
        for q in 0..count {
            queues.push(dev.setup_queue(qt, alloc, q, opts.queue_size, Some(queue_vector(q)))?);
        }
        dev.driver_ok(qt)?;
        let capacity = dev.config_readq(qt, config::CAPACITY)?;
        Ok(BlkDevice {
            dev,
            offered,
            features,
            queues,
            capacity,
        })
    }
}

/// Wait for the next used buffer of `vq`. The used index in guest memory is the signal;
/// an MSI only wakes the wait early (one may be lost or doubled when a backend restarts,
/// and an MSI of another queue is taken too, which costs at most one `nap`).
pub fn wait_used(
    qt: &mut Qtest,
    vq: &mut Virtqueue,
    timeout: Duration,
) -> Result<UsedElem, BlkError> {
    const NAP: Duration = Duration::from_millis(2);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(e) = vq.pop_used(qt)? {
            return Ok(e);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(BlkError::Timeout {
                queue: vq.index,
                timeout,
            });
        }
        match qt.wait_msi(NAP.min(deadline - now)) {
            Ok(_) | Err(QtestError::Timeout(..)) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let h = header(VIRTIO_BLK_T_OUT, 0x0102_0304_0506_0708);
        assert_eq!(h, [1, 0, 0, 0, 0, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(queue_vector(1), 2);
    }
}
