//! The vhost-user half of every device process: guest memory as the frontend shares it,
//! a fresh `VhostUserDaemon` for each connection on the listener (so a frontend that
//! reconnects after a reset or a restart of this process finds the device again), the
//! workers' exit events, the queue-draining loop with EVENT_IDX, and the migration dirty
//! log ([`mark_dirty`]).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{
    VhostUserBackend, VhostUserDaemon, VringEpollHandler, VringRwLock, VringT,
};
use vm_memory::bitmap::Bitmap;
use vm_memory::{
    Address, GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Guest RAM as mapped from the frontend's memory table. Each region carries its window
/// on the frontend's dirty log (vhost-user-backend fills it in on SET_LOG_BASE; until
/// then marking costs a lock and a check), so that writes through vm-memory are logged
/// for live migration by themselves, and [`mark_dirty`] logs the others.
pub type GuestMem = GuestMemoryMmap<BitmapMmapRegion>;
/// Guest memory as vhost-user-backend shares it with us.
pub type Memory = GuestMemoryAtomic<GuestMem>;
pub type Vring = VringRwLock<Memory>;
/// The event loop of one worker thread, where a backend may watch fds of its own.
pub type EpollHandler<B> = VringEpollHandler<Arc<B>>;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot set up a vhost-user connection: {0}")]
    Daemon(String),
    #[error("cannot accept a vhost-user connection: {0}")]
    Accept(String),
}

/// The exit events handed to a daemon's worker threads.
///
/// vhost-user-backend 0.24 (pinned in Cargo.toml) registers each exit consumer in its
/// epoll with `into_raw_fd` and never closes it (`VringEpollHandler::new`); without
/// [`VhostUserBackend::exit_event`] dropping the daemon hangs. So backends hand out events
/// from here, and [`serve`] closes them once the daemon is gone.
#[derive(Default)]
pub struct ExitEvents(Mutex<Vec<RawFd>>);

impl ExitEvents {
    /// A new exit event for a worker (what `VhostUserBackend::exit_event` returns).
    pub fn new_event(&self) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                self.0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(consumer.as_raw_fd());
                Some((consumer, notifier))
            }
            Err(e) => {
                tracing::error!("cannot create a worker's exit event: {e}");
                None
            }
        }
    }

    /// Close the exit events of a daemon that has been dropped.
    fn close(&self) {
        let fds = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for fd in fds {
            // SAFETY: see the type's docs: the daemon that registered this fd was dropped,
            // which joined its worker threads and closed their epoll; the fd is still open,
            // nobody else owns it, and nothing uses it any more.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

/// The feature bit every backend offers so that the frontend may migrate with it:
/// VHOST_F_LOG_ALL, "the device logs its writes to guest memory" (bit 26). It is
/// vhost-user's own, not the guest's: a frontend does not offer it to the driver.
pub const LOG_ALL: u64 = VhostUserVirtioFeatures::LOG_ALL.bits();
/// The protocol feature every backend offers with [`LOG_ALL`]: the log comes as a shared
/// memory fd (SET_LOG_BASE), the only way vhost-user-backend takes it.
pub const LOG_SHMFD: VhostUserProtocolFeatures = VhostUserProtocolFeatures::LOG_SHMFD;

/// A backend served connection after connection. Its memory carries the dirty log (see
/// [`GuestMem`]): it offers [`LOG_ALL`] and [`LOG_SHMFD`], and marks what it writes
/// into guest memory behind vm-memory's back with [`mark_dirty`].
pub trait Served: VhostUserBackend<Bitmap = BitmapMmapRegion, Vring = Vring> + 'static {
    /// The name the daemon logs under.
    const NAME: &'static str;
    fn exit_events(&self) -> &ExitEvents;
    /// A frontend is about to connect: back to what a fresh device looks like.
    fn connection_starts(&self) {}
    /// The frontend went away (the daemon's workers have stopped).
    fn connection_ended(&self) {}
    /// The worker threads of the new connection's daemon, one event loop each (in the
    /// order of `queues_per_thread`), for fds the backend watches besides the queues.
    fn workers_started(&self, _workers: Vec<Arc<EpollHandler<Self>>>)
    where
        Self: Sized,
    {
    }
}

/// Serve vhost-user connections on `listener` one after another, each with a fresh daemon,
/// for as long as the listener works.
pub fn serve<B: Served>(backend: Arc<B>, listener: UnixListener) -> Result<(), DaemonError> {
    if let Some((prepared, hostile)) = crate::hostile::take_prepared_relay() {
        return crate::vhost_relay::serve_hostile(backend, listener, prepared, hostile);
    }
    let mut listener = Listener::from(listener);
    loop {
        serve_one(&backend, &mut listener)?;
    }
}

/// Accept one connection and serve it until the frontend goes away.
pub fn serve_one<B: Served>(backend: &Arc<B>, listener: &mut Listener) -> Result<(), DaemonError> {
    backend.connection_starts();
    let mem: Memory = GuestMemoryAtomic::new(GuestMem::new());
    let result = {
        let mut daemon = VhostUserDaemon::new(B::NAME.into(), backend.clone(), mem)
            .map_err(|e| DaemonError::Daemon(e.to_string()))?;
        backend.workers_started(daemon.get_epoll_handlers());
        match daemon.start(listener) {
            Ok(()) => {
                tracing::info!("vhost-user frontend connected");
                match daemon.wait() {
                    Ok(())
                    | Err(vhost_user_backend::Error::HandleRequest(
                        VhostUserError::Disconnected | VhostUserError::PartialMessage,
                    )) => tracing::info!("vhost-user frontend disconnected"),
                    Err(e) => tracing::warn!("vhost-user connection ended: {e}"),
                }
                Ok(())
            }
            Err(e) => Err(DaemonError::Accept(e.to_string())),
        }
        // The daemon drops here: its worker threads are told to exit and joined.
    };
    backend.exit_events().close();
    backend.connection_ended();
    result
}

/// One lock per queue that its worker holds while it serves requests, so that stopping
/// the queue (GET_VRING_BASE) waits for the request in progress: once the frontend has the
/// ring's index, nothing more lands in guest memory or in the image from that queue (the
/// guest may be running on another host by then, writing the same blocks).
pub struct QueueWork(Vec<Mutex<()>>);

impl QueueWork {
    pub fn new(queues: usize) -> Self {
        QueueWork((0..queues).map(|_| Mutex::new(())).collect())
    }

    /// Held by the worker while it serves queue `queue`.
    pub fn serving(&self, queue: usize) -> Option<std::sync::MutexGuard<'_, ()>> {
        self.0
            .get(queue)
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Wait until queue `queue`'s worker has finished what it was serving (the ring is
    /// already stopped, so it takes nothing more).
    pub fn wait_idle(&self, queue: usize) {
        drop(self.serving(queue));
    }
}

/// Take requests off `vring` with `process` (which returns how many it took) until there
/// are none. With EVENT_IDX: work with notifications off, then turn them on and look
/// again, so a request made in between is not missed. A guest whose avail index is
/// garbage makes "more" true while nothing can be popped: give up after a few empty
/// rounds rather than spin. `look_again` false: one round only (a queue the device fills
/// itself, such as an event queue, is not worth waiting on).
pub fn drain(vring: &Vring, event_idx: bool, look_again: bool, mut process: impl FnMut() -> usize) {
    if !event_idx {
        process();
        return;
    }
    let mut empty_rounds = 0;
    loop {
        if let Err(e) = vring.disable_notification() {
            tracing::debug!("cannot disable notifications: {e}");
        }
        if process() == 0 {
            empty_rounds += 1;
        } else {
            empty_rounds = 0;
        }
        match vring.enable_notification() {
            Ok(true) if look_again && empty_rounds < 3 => continue,
            Ok(true) if look_again => {
                tracing::debug!("avail ring index ahead of anything poppable");
                break;
            }
            Ok(_) => break,
            Err(e) => {
                tracing::debug!("cannot enable notifications: {e}");
                break;
            }
        }
    }
}

/// Mark guest-physical bytes `addr..addr + len` dirty in the migration log, in every
/// memory region they touch (at region-relative offsets, as the regions' bitmaps count).
///
/// Writes through vm-memory (`Bytes`, `VolatileSlice`, imago's I/O vectors, the queue's
/// used ring) mark themselves; a write through a raw host pointer (pread, readv into an
/// iovec, a copy into a host buffer) does not, and must be followed by this call with
/// exactly the range written, or the destination of a migration keeps stale bytes there.
/// Bytes outside guest RAM are ignored; without a log this does nothing.
pub fn mark_dirty<M: GuestMemoryBackend>(mem: &M, addr: GuestAddress, len: usize) {
    if len == 0 {
        return;
    }
    let start = addr.raw_value();
    // Exclusive end; a range running past the address space stops at its end.
    let end = start.saturating_add(len as u64);
    for region in mem.iter() {
        let region_start = region.start_addr().raw_value();
        let region_end = region_start.saturating_add(region.len());
        let (from, to) = (start.max(region_start), end.min(region_end));
        if from >= to {
            continue;
        }
        let (Ok(offset), Ok(count)) = (
            usize::try_from(from - region_start),
            usize::try_from(to - from),
        ) else {
            continue;
        };
        region.bitmap().mark_dirty(offset, count);
    }
}

/// Put a completed chain (its head, and how many bytes were written) in the used ring.
pub fn complete(vring: &Vring, head: u16, used_len: u32) {
    if let Err(e) = vring.add_used(head, used_len) {
        tracing::debug!("cannot complete descriptor {head}: {e}");
    }
}

/// Tell the driver about used entries, if it wants to hear.
pub fn notify(vring: &Vring) {
    match vring.needs_notification() {
        Ok(true) => {
            if let Err(e) = vring.signal_used_queue() {
                tracing::warn!("cannot signal the guest: {e}");
            }
        }
        Ok(false) => {}
        Err(e) => tracing::debug!("used ring: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::AtomicBitmap;

    const PAGE: u64 = 0x1000;

    #[test]
    fn stopping_a_queue_waits_for_the_request_in_progress() {
        let work = Arc::new(QueueWork::new(2));
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (started_tx, started) = std::sync::mpsc::channel();
        let worker = {
            let (work, done) = (work.clone(), done.clone());
            std::thread::spawn(move || {
                let _serving = work.serving(1);
                started_tx.send(()).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(100));
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        started.recv().unwrap();
        work.wait_idle(0);
        assert!(
            !done.load(std::sync::atomic::Ordering::SeqCst),
            "another queue"
        );
        work.wait_idle(1);
        assert!(done.load(std::sync::atomic::Ordering::SeqCst));
        worker.join().unwrap();
        work.wait_idle(7);
    }

    /// Two adjacent regions, a hole, and a third region (vm-memory's page bitmap stands in
    /// for the log: it counts region-relative pages as the log's windows do).
    fn memory() -> GuestMemoryMmap<AtomicBitmap> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
            (GuestAddress(0x4_0000), 0x1_0000),
        ])
        .unwrap()
    }

    /// The guest-physical addresses of the dirty pages, in order.
    fn dirty_pages(mem: &GuestMemoryMmap<AtomicBitmap>) -> Vec<u64> {
        let mut pages = Vec::new();
        for region in mem.iter() {
            for offset in (0..region.len()).step_by(PAGE as usize) {
                if region.bitmap().dirty_at(offset as usize) {
                    pages.push(region.start_addr().raw_value() + offset);
                }
            }
        }
        pages
    }

    #[test]
    fn a_range_across_two_regions_marks_its_pages_in_both() {
        let mem = memory();
        mark_dirty(&mem, GuestAddress(0xff00), 0x200);
        assert_eq!(dirty_pages(&mem), [0xf000, 0x1_0000]);
        // One byte is one page; the next page stays clean.
        mark_dirty(&mem, GuestAddress(0x1_2fff), 1);
        assert_eq!(dirty_pages(&mem), [0xf000, 0x1_0000, 0x1_2000]);
    }

    #[test]
    fn the_parts_outside_ram_are_ignored() {
        let mem = memory();
        // Across the hole: the end of the second region and the start of the third.
        mark_dirty(&mem, GuestAddress(0x1_f800), 0x2_1000);
        assert_eq!(dirty_pages(&mem), [0x1_f000, 0x4_0000]);
        // Wholly in the hole, past the end of RAM, at the top of the address space, and
        // empty: nothing, and no panic.
        let mem = memory();
        mark_dirty(&mem, GuestAddress(0x3_0000), 0x1000);
        mark_dirty(&mem, GuestAddress(0x5_0000), 0x10_0000);
        mark_dirty(&mem, GuestAddress(u64::MAX - 10), 100);
        mark_dirty(&mem, GuestAddress(0x1000), 0);
        assert!(dirty_pages(&mem).is_empty());
        // A range over everything marks everything.
        mark_dirty(&mem, GuestAddress(0), usize::MAX);
        assert_eq!(dirty_pages(&mem).len(), 48);
    }

    #[test]
    fn without_a_log_marking_does_nothing() {
        // The daemon's own memory type before SET_LOG_BASE: regions without a log.
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        mark_dirty(&mem, GuestAddress(0), 0x1_0000);
        let region = mem.iter().next().unwrap();
        assert!(!region.bitmap().dirty_at(0));
    }
}
