//! Virtio devices: the modern virtio-pci transport ([`pci`]) that the guest driver talks to,
//! and the backends behind it. A backend is usually a device process reached over
//! vhost-user ([`vhost_user`]); the transport does not care which.

pub mod balloon;
pub mod input;
pub mod interrupt;
pub mod msix;
pub mod net;
pub mod pci;
pub mod vhost_user;

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Feature bits of the transport (virtio 1.x, 6).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Device ids (virtio 1.x, 5).
pub const VIRTIO_ID_BLOCK: u16 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("queue {queue}: {what} address {address:#x} is not in guest RAM")]
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

/// Everything a backend needs to start serving the driver.
pub struct Activation<'a> {
    /// The features the driver accepted.
    pub features: u64,
    pub queues: Vec<QueueSetup>,
    pub memory: &'a GuestMemoryMmap,
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
}
