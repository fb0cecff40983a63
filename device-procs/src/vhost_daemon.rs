//! The vhost-user half of every device process: guest memory as the frontend shares it,
//! a fresh `VhostUserDaemon` for each connection on the listener (so a frontend that
//! reconnects after a reset or a restart of this process finds the device again), the
//! workers' exit events, and the queue-draining loop with EVENT_IDX.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{
    VhostUserBackend, VhostUserDaemon, VringEpollHandler, VringRwLock, VringT,
};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

/// Guest RAM as mapped from the frontend's memory table.
pub type GuestMem = GuestMemoryMmap<()>;
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

/// A backend served connection after connection.
pub trait Served: VhostUserBackend<Bitmap = (), Vring = Vring> + 'static {
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
