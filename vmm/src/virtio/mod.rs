//! Virtio devices: the modern virtio-pci transport ([`pci`]) that the guest driver talks to,
//! and the backends behind it. A backend is usually a device process reached over
//! vhost-user ([`vhost_user`]); the transport does not care which.

pub mod balloon;
pub mod deadline;
pub mod input;
pub mod interrupt;
pub mod msix;
pub mod net;
pub mod pci;
pub mod vhost_user;

use crate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Feature bits of the transport (virtio 1.x, 6).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device ids (virtio 1.x, 5).
pub const VIRTIO_ID_BLOCK: u16 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error(
        "queue {queue}: the {what} ring at {address:#x} is misaligned or not wholly in guest RAM"
    )]
    QueueAddress {
        queue: usize,
        what: &'static str,
        address: u64,
    },
    #[error("{0}")]
    Backend(String),
}

/// One queue as the driver set it up, with the eventfds that carry its notifications.
pub struct QueueSetup {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The guest's notifications (the ioeventfd of the queue's notify address).
    pub kick: EventFd,
    /// The backend's used-buffer notifications, relayed to the guest as interrupts.
    pub call: EventFd,
}

/// A device's configuration space `config` read at `offset` into `data` (zeroes past
/// its end).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

/// A queue the vmm serves itself (an inline queue: virtio-net's control queue, the
/// balloon's), over the rings the driver set up; `min_size` is the size it is created
/// with when the driver's is smaller. `what` names it in errors.
pub fn inline_queue(
    q: &QueueSetup,
    min_size: u16,
    event_idx: bool,
    what: &str,
) -> Result<virtio_queue::Queue, VirtioError> {
    use virtio_queue::QueueT;
    use vm_memory::GuestAddress;
    let err = |e: virtio_queue::Error| VirtioError::Backend(format!("{what}: {e}"));
    let mut queue = virtio_queue::Queue::new(min_size.max(q.size)).map_err(err)?;
    queue.set_size(q.size);
    queue
        .try_set_desc_table_address(GuestAddress(q.desc))
        .map_err(err)?;
    queue
        .try_set_avail_ring_address(GuestAddress(q.avail))
        .map_err(err)?;
    queue
        .try_set_used_ring_address(GuestAddress(q.used))
        .map_err(err)?;
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    Ok(queue)
}

/// Everything a backend needs to start serving the driver.
pub struct Activation<'a> {
    /// The features the driver accepted.
    pub features: u64,
    pub queues: Vec<QueueSetup>,
    pub memory: &'a GuestMemoryMmap,
    /// The queues were running elsewhere (a migrated device): they go on from where the
    /// used rings in guest memory say, not from zero.
    pub resume: bool,
}

/// The device behind a virtio transport.
pub trait VirtioBackend: Send {
    fn device_type(&self) -> u16;
    /// Queues the device offers, and the largest size of each.
    fn num_queues(&self) -> usize;
    fn queue_max_size(&self) -> u16;
    /// The largest size of queue `queue`, where queues differ.
    fn queue_size(&self, _queue: usize) -> u16 {
        self.queue_max_size()
    }
    /// Device feature bits, as offered to the driver (transport bits included).
    fn features(&self) -> u64;
    /// Device configuration space accesses.
    fn read_config(&mut self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start the queues.
    fn activate(&mut self, activation: Activation<'_>) -> Result<(), VirtioError>;
    /// The driver reset the device: stop every queue and forget the activation.
    fn reset(&mut self);
    /// The vhost-user backend behind this device, if that is what it is (for restarts).
    fn as_vhost_user(&mut self) -> Option<&mut vhost_user::VhostUserDevice> {
        None
    }
    /// The network card, if that is what this is (set_link, query-rx-filter).
    fn as_net(&mut self) -> Option<&mut net::VirtioNet> {
        None
    }
    /// The balloon, if that is what this is (balloon, query-balloon).
    fn as_balloon(&mut self) -> Option<&mut balloon::VirtioBalloon> {
        None
    }
    /// The input device, if that is what this is (its backend connects late).
    fn as_input(&mut self) -> Option<&mut input::VirtioInput> {
        None
    }
    /// Whether the device serves queue `queue` itself when the driver notifies it (the
    /// transport then calls [`VirtioBackend::queue_notify`] instead of signalling an
    /// ioeventfd).
    fn inline_queue(&self, _queue: usize) -> bool {
        false
    }
    /// The driver notified inline queue `queue`.
    fn queue_notify(&mut self, _queue: usize) {}
    /// Why this device cannot move with a live migration yet, if it cannot.
    fn migration_blocker(&self) -> Option<String> {
        None
    }
    /// The device's own state for a migration, taken with the vCPUs stopped: its queues
    /// stop here (a backend in another process finishes or gives back what it holds).
    fn save_state(&mut self) -> Result<Vec<u8>, crate::snapshot::SnapshotError> {
        Ok(Vec::new())
    }
    /// Take [`VirtioBackend::save_state`]'s state, after a resumed activation.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), crate::snapshot::SnapshotError> {
        let _ = state;
        Ok(())
    }
    /// A migration failed after [`VirtioBackend::save_state`] stopped the queues: start
    /// them again where they were.
    fn resume_after_save(&mut self) {}
    /// After [`VirtioBackend::restore_state`]: whether the driver must read the
    /// configuration again once it runs (a NIC asking the guest to announce itself).
    fn config_changed_after_restore(&self) -> bool {
        false
    }
}
