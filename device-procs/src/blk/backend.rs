//! The vhost-user-blk backend: features, configuration space, and the queue handler that
//! pops descriptor chains, runs them (see [`super::request`]) and completes them.
//!
//! A request the host fails goes through the drive's error policy (QEMU's `rerror` and
//! `werror`): reported to the guest as VIRTIO_BLK_S_IOERR, completed as if it had worked,
//! or held. With `stop` the failed request is not completed (no used-ring entry) and from
//! then on every request of the disk is held untouched, in order, until
//! [`BlkBackend::resume`] carries them out again; each failure is told to the vmm
//! ([`BlkEvent::RequestFailed`]), for `stop` only the one that stops the disk. Held
//! requests need nothing to survive a restart of the process: the vmm replays from the used
//! index, which they never reached.
//!
//! One worker thread per queue (vhost-user-backend's `queues_per_thread`); connection
//! after connection is served by [`crate::vhost_daemon::serve`].

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock};

use ipc::blk::{BlkEvent, ErrorAction, ErrorPolicy};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::config::BlkConfig;
use super::request::{self, Completion, Disk, GuestMem, Outcome, Request};
pub use crate::vhost_daemon::Memory;
use crate::vhost_daemon::{self, ExitEvents, Served, Vring};

/// Most queues a disk may have (one bit each in vhost-user-backend's thread masks).
pub const MAX_QUEUES: u16 = 64;
/// Largest split virtqueue.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Sends an event to the vmm (supervised mode).
pub type EventHook = Box<dyn Fn(BlkEvent) + Send + Sync>;

/// A request held by the error policy `stop`, with what it takes to complete it later.
struct HeldRequest {
    queue: u16,
    vring: Vring,
    mem: Memory,
    req: Request,
}

/// The requests held by an error policy of `stop`.
#[derive(Default)]
struct Held {
    /// A failure stopped the disk (and the vmm was told): hold every request.
    stopped: bool,
    /// A resume is carrying out the held requests: new ones queue up behind them.
    resuming: bool,
    /// In the order they are to be carried out; on each queue, the last ones taken off it.
    requests: VecDeque<HeldRequest>,
}

impl Held {
    fn holding(&self) -> bool {
        self.stopped || self.resuming
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0} queues: a disk has 1 to {MAX_QUEUES}")]
    NumQueues(u16),
    #[error("queue size {0}: a power of two from 1 to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
}

/// The device: one disk and its queues.
pub struct BlkBackend {
    disk: Disk,
    num_queues: u16,
    queue_size: u16,
    event_idx: AtomicBool,
    mem: RwLock<Option<Memory>>,
    exit_events: ExitEvents,
    policy: ErrorPolicy,
    held: Mutex<Held>,
    on_event: Option<EventHook>,
    work: vhost_daemon::QueueWork,
}

impl BlkBackend {
    pub fn new(
        disk: Disk,
        num_queues: u16,
        queue_size: u16,
        policy: ErrorPolicy,
        on_event: Option<EventHook>,
    ) -> Result<Self, BackendError> {
        if num_queues == 0 || num_queues > MAX_QUEUES {
            return Err(BackendError::NumQueues(num_queues));
        }
        if !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
            return Err(BackendError::QueueSize(queue_size));
        }
        Ok(BlkBackend {
            disk,
            num_queues,
            queue_size,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            exit_events: ExitEvents::default(),
            policy,
            held: Mutex::default(),
            on_event,
            work: vhost_daemon::QueueWork::new(usize::from(num_queues)),
        })
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    pub fn config(&self) -> BlkConfig {
        BlkConfig {
            capacity: self.disk.capacity(),
            // As QEMU: room for the header and status descriptors in a full queue.
            seg_max: u32::from(self.queue_size).saturating_sub(2).max(1),
            num_queues: self.num_queues,
            discard: !self.disk.readonly(),
        }
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, event: BlkEvent) {
        if let Some(hook) = &self.on_event {
            hook(event);
        }
    }

    /// Run every available request of queue `queue`; how many were taken off it.
    fn process_queue(&self, queue: u16, vring: &Vring) -> usize {
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return 0;
        };
        let mem = atomic.memory();
        let (mut taken, mut completed) = (0, 0);
        loop {
            let mut held = self.held();
            if held.holding() {
                // Taken off under the lock, so that `stop_vring` counts it.
                let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
                let Some(chain) = chain else { break };
                held.requests.push_back(HeldRequest {
                    queue,
                    vring: vring.clone(),
                    mem: atomic.clone(),
                    req: Request::new(chain),
                });
                taken += 1;
                continue;
            }
            drop(held);
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
            let Some(chain) = chain else { break };
            taken += 1;
            let req = Request::new(chain);
            if let Some(c) = self.execute(queue, vring, &atomic, &mem, req, false) {
                complete(vring, c);
                completed += 1;
            }
        }
        if completed > 0 {
            notify(vring);
        }
        taken
    }

    /// Run `req` and apply the error policy to a host failure: its completion, or None
    /// when it is held (at the front of the held requests if `first`, else at the back).
    fn execute(
        &self,
        queue: u16,
        vring: &Vring,
        atomic: &Memory,
        mem: &GuestMem,
        req: Request,
        first: bool,
    ) -> Option<Completion> {
        let f = match request::run(&self.disk, mem, &req) {
            Outcome::Done(c) => {
                if let Some(e) = &c.error {
                    tracing::debug!("guest request refused: {e}");
                }
                return Some(c);
            }
            Outcome::Failed(f) => f,
        };
        let write = !f.error.is_read();
        let nospace = f.error.errno() == Some(libc::ENOSPC);
        let action = match (
            if write {
                self.policy.write
            } else {
                self.policy.read
            },
            nospace,
        ) {
            (ErrorAction::Enospc, true) => ErrorAction::Stop,
            (ErrorAction::Enospc, false) => ErrorAction::Report,
            (a, _) => a,
        };
        tracing::warn!("request failed ({action:?}): {}", f.error);
        let event = BlkEvent::RequestFailed {
            write,
            action,
            nospace,
            reason: reason(&f.error),
        };
        match action {
            ErrorAction::Stop => {
                let newly = {
                    let mut held = self.held();
                    let newly = !held.stopped;
                    held.stopped = true;
                    let h = HeldRequest {
                        queue,
                        vring: vring.clone(),
                        mem: atomic.clone(),
                        req,
                    };
                    if first {
                        held.requests.push_front(h);
                    } else {
                        held.requests.push_back(h);
                    }
                    newly
                };
                if newly {
                    self.emit(event);
                }
                None
            }
            ErrorAction::Ignore => {
                self.emit(event);
                Some(f.complete(mem, true))
            }
            ErrorAction::Report | ErrorAction::Enospc => {
                self.emit(event);
                Some(f.complete(mem, false))
            }
        }
    }

    /// Carry out the requests held by an error policy of `stop`, in order; how many were
    /// tried. One that fails again goes through the policy again: if that stops the disk
    /// anew, it and the ones after it stay held.
    pub fn resume(&self) -> u32 {
        {
            let mut held = self.held();
            if !held.holding() && held.requests.is_empty() {
                return 0;
            }
            held.stopped = false;
            held.resuming = true;
        }
        let mut retried = 0;
        loop {
            let next = {
                let mut held = self.held();
                let next = if held.stopped {
                    None
                } else {
                    held.requests.pop_front()
                };
                if next.is_none() {
                    held.resuming = false;
                }
                next
            };
            let Some(h) = next else { break };
            retried += 1;
            let mem = h.mem.memory();
            if let Some(c) = self.execute(h.queue, &h.vring, &h.mem, &mem, h.req, true) {
                complete(&h.vring, c);
                notify(&h.vring);
            }
        }
        retried
    }

    /// Grow the disk to `size` bytes; the new size in bytes. The vmm asked for it over the
    /// control channel and tells the driver itself once we reply (vhost 0.18's backend
    /// side cannot send CONFIG_CHANGE_MSG on the backend channel).
    pub fn resize(&self, size: u64) -> Result<u64, super::image::ImageError> {
        self.disk.grow(size)
    }

    /// Drop the held requests of a connection that ended: the frontend replays them from
    /// the used index when it comes back. The disk stays stopped until a resume.
    fn drop_held_requests(&self) {
        let dropped = std::mem::take(&mut self.held().requests);
        if !dropped.is_empty() {
            tracing::info!(
                "{} held requests dropped with the connection",
                dropped.len()
            );
        }
    }
}

impl VhostUserBackend for BlkBackend {
    /// Guest memory carries the migration dirty log (see [`vhost_daemon::GuestMem`]).
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
        ]
        .iter()
        .fold(0u64, |f, b| f | 1 << b);
        if self.disk.readonly() {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            bits |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        if self.num_queues > 1 {
            bits |= 1 << VIRTIO_BLK_F_MQ;
        }
        // LOG_ALL: our writes to guest memory are logged, so the vmm may migrate.
        bits | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | vhost_daemon::LOG_ALL
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | vhost_daemon::LOG_SHMFD
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The frontend stops the ring (a reset, or to move it): the requests held on it go,
        // and the index it gets back is that of the first of them, so that a frontend
        // which goes on from there runs them again.
        self.work.wait_idle(queue_index as usize);
        let mut vring = None;
        let mut count = 0u16;
        self.held().requests.retain(|h| {
            if u32::from(h.queue) != queue_index {
                return true;
            }
            count = count.wrapping_add(1);
            vring = Some(h.vring.clone());
            false
        });
        if let Some(vring) = vring {
            vring.set_queue_next_avail(vring.queue_next_avail().wrapping_sub(count));
            tracing::info!("queue {queue_index} stopped: {count} held requests dropped");
        }
        Ok(())
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.config().read(offset, size)
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        // Nothing in our configuration space is writable (no CONFIG_WCE): ignored, as
        // the specification says for read-only fields.
        Ok(())
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.new_event()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Never an error: that would end the worker thread and with it the queue.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let _serving = self.work.serving(usize::from(device_event));
        vhost_daemon::drain(vring, event_idx, true, || {
            self.process_queue(device_event, vring)
        });
        Ok(())
    }
}

impl Served for BlkBackend {
    const NAME: &'static str = "vmm-blk";

    fn exit_events(&self) -> &ExitEvents {
        &self.exit_events
    }

    fn connection_starts(&self) {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.event_idx.store(false, Ordering::Release);
    }

    fn connection_ended(&self) {
        self.drop_held_requests();
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Put a completed request in the used ring.
fn complete(vring: &Vring, c: Completion) {
    vhost_daemon::complete(vring, c.head, c.used_len);
}

use vhost_daemon::notify;

/// What QMP's BLOCK_IO_ERROR calls the reason: the error's text (strerror's, for an errno).
fn reason(e: &request::RequestError) -> String {
    match e {
        request::RequestError::Host { source, .. } => {
            let text = source.to_string();
            match source.raw_os_error() {
                Some(n) => text
                    .strip_suffix(&format!(" (os error {n})"))
                    .map(str::to_string)
                    .unwrap_or(text),
                None => text,
            }
        }
        other => other.to_string(),
    }
}
