//! The vhost-user-net backend: features, and per queue pair a worker thread that moves
//! frames between the guest's rings and the pair's [`Port`].
//!
//! **RX** (host to guest): buffers the guest posted are taken off the ring into a cache
//! and the next frame is read straight into them (readv); with MRG_RXBUF one frame may
//! fill several buffers, and the header's num_buffers says how many. Buffers a frame did
//! not need stay in the cache for the next, and go back to the ring when it stops (the
//! index given back is that of the first of them). While the guest has posted no
//! buffers, the port's fd is not watched (it stays readable): the guest's next kick
//! brings it back. **TX** (guest to host): each chain is written straight from guest
//! memory (writev); a port that would block stops the queue until it may go on.
//!
//! What a port writes into the guest's buffers (and the header written here) goes
//! through raw pointers, behind vm-memory's back: it is marked in the migration dirty log
//! by hand ([`vhost_daemon::mark_dirty`]), byte range by byte range.
//!
//! Everything in a chain is guest input: a chain in the wrong direction, too short for
//! the header, or outside guest memory is completed with nothing done and counted; the
//! worker never stops for it. Frames are dropped (and counted) while the link is down,
//! when they do not pass the guest's RX filter, or when they do not fit its buffers.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ipc::net::{NetInfo, RxFilter};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{Address, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::timerfd::TimerFd;

use super::filter;
use super::port::Port;
use super::tap::VNET_HDR_LEN;
use crate::vhost_daemon::{self, EpollHandler, ExitEvents, GuestMem, Memory, Served, Vring};

/// Most queue pairs (two rings each, one bit each in vhost-user-backend's thread masks).
pub const MAX_QUEUE_PAIRS: u16 = 16;
/// Largest split virtqueue.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// The largest frame a tap hands over with segmentation offloads (64 KiB of payload and
/// headers), plus the virtio-net header.
const MAX_GSO_FRAME: usize = 65550 + VNET_HDR_LEN;
/// The largest frame without them: a full 1500-byte MTU frame with a VLAN tag.
const MAX_PLAIN_FRAME: usize = 1522 + VNET_HDR_LEN;
/// Frames delivered before the guest hears of them even while more come.
const RX_BATCH: usize = 64;
/// TX coalescing: a kick that comes within `TX_BUSY` of the last time the TX ring was
/// drained is served `TX_DELAY` later, with every frame the guest queued meanwhile (it
/// does not kick again while the ring's avail event stays behind). A guest sending
/// steadily then kicks and is interrupted several times less, which is most of what its
/// CPU spends on the device, for 50 us more latency; a lone frame goes at once.
const TX_BUSY: Duration = Duration::from_micros(500);
const TX_DELAY: Duration = Duration::from_micros(50);

/// Ring event ids of a worker: its pair's RX ring, then its TX ring.
const RX_RING: u16 = 0;
const TX_RING: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0} queue pairs: a netdev has 1 to {MAX_QUEUE_PAIRS}")]
    QueuePairs(u16),
    #[error("queue size {0}: a power of two from 2 to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("{ports} ports for {pairs} queue pairs")]
    Ports { ports: usize, pairs: u16 },
}

/// Check a netdev's queue configuration.
pub fn check_queues(pairs: u16, queue_size: u16) -> Result<(), BackendError> {
    if pairs == 0 || pairs > MAX_QUEUE_PAIRS {
        return Err(BackendError::QueuePairs(pairs));
    }
    if !queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&queue_size) {
        return Err(BackendError::QueueSize(queue_size));
    }
    Ok(())
}

/// Counters, as `NetInfo` reports them.
#[derive(Default)]
struct Stats {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    tx_dropped: AtomicU64,
    /// Chains the guest got wrong.
    bad_chains: AtomicU64,
}

fn count(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// An RX chain taken off the ring and not used yet: its head and its buffers, already
/// translated to host memory (once, when it is taken: a frame reads into them at once).
struct CachedChain {
    head: u16,
    buffers: Vec<HostBuffer>,
    len: usize,
}

/// A guest buffer in the host's mapping of guest memory (and where it is in the guest,
/// to log what is written into it).
#[derive(Clone, Copy)]
struct HostBuffer {
    addr: GuestAddress,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the pointer is into the guest memory mapping that `PairState::rx_mem` keeps
// mapped for as long as the chain is cached; whichever worker holds the pair's lock may
// use it.
unsafe impl Send for HostBuffer {}

/// What a pair's worker keeps between events.
#[derive(Default)]
struct PairState {
    rx_cache: VecDeque<CachedChain>,
    /// The bytes the cached chains hold.
    rx_cached_len: usize,
    /// The guest memory the cached chains point into (kept mapped while they are cached).
    rx_mem: Option<Arc<GuestMem>>,
    /// Where the part of a frame too large for the guest's buffers goes.
    rx_overflow: Option<Vec<u8>>,
    /// The RX ring the cache came from (to give the chains back when it stops).
    rx_ring: Option<Vring>,
    /// The port's fd is in the worker's epoll (see the module docs).
    watching_rx: bool,
    /// The port would block: TX waits for its fd.
    tx_blocked: bool,
    /// When TX last drained the ring (see [`TX_BUSY`]).
    last_tx: Option<Instant>,
    /// Fires [`TX_DELAY`] after a kick that is left for it.
    tx_timer: Option<TimerFd>,
    tx_timer_armed: bool,
    /// A multiqueue tap queue detached because the guest disabled the pair.
    detached: bool,
}

/// The device: a port per queue pair.
pub struct NetBackend {
    ports: Vec<Arc<dyn Port>>,
    queue_size: u16,
    features: u64,
    acked: AtomicU64,
    event_idx: AtomicBool,
    mem: RwLock<Option<Memory>>,
    exit_events: ExitEvents,
    /// The current connection's worker event loops, one per pair.
    workers: RwLock<Vec<Arc<EpollHandler<Self>>>>,
    pairs: Vec<Mutex<PairState>>,
    link_up: AtomicBool,
    /// None: everything passes (no guest filter yet, or a frontend without one).
    filter: RwLock<Option<RxFilter>>,
    stats: Stats,
}

impl NetBackend {
    /// A device over `ports` (one per queue pair). `offloads`: the ports carry the
    /// virtio-net header and the host can take checksum and segmentation offloads (and
    /// `ufo` UDP fragmentation offload too).
    pub fn new(
        ports: Vec<Arc<dyn Port>>,
        queue_size: u16,
        offloads: bool,
        ufo: bool,
    ) -> Result<Self, BackendError> {
        let pairs = u16::try_from(ports.len()).unwrap_or(u16::MAX);
        check_queues(pairs, queue_size)?;
        let mut bits = vec![
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_MRG_RXBUF,
        ];
        if offloads {
            bits.extend([
                VIRTIO_NET_F_CSUM,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
                VIRTIO_NET_F_HOST_ECN,
            ]);
            if ufo {
                bits.extend([VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_UFO]);
            }
        }
        if pairs > 1 {
            bits.push(VIRTIO_NET_F_MQ);
        }
        // LOG_ALL: our writes to guest memory are logged, so the vmm may migrate.
        let features = bits.iter().fold(0u64, |f, b| f | 1 << b)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | vhost_daemon::LOG_ALL;
        Ok(NetBackend {
            pairs: (0..pairs).map(|_| Mutex::default()).collect(),
            ports,
            queue_size,
            features,
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            exit_events: ExitEvents::default(),
            workers: RwLock::new(Vec::new()),
            link_up: AtomicBool::new(true),
            filter: RwLock::new(None),
            stats: Stats::default(),
        })
    }

    /// The virtio-net feature bits served (without vhost-user's own).
    pub fn features_offered(&self) -> u64 {
        self.features & !(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | vhost_daemon::LOG_ALL)
    }

    /// Link up or down (set_link): while down, nothing crosses.
    pub fn set_link(&self, up: bool) {
        self.link_up.store(up, Ordering::Release);
    }

    /// The guest's RX filter.
    pub fn set_filter(&self, filter: RxFilter) {
        *self.filter.write().unwrap_or_else(|e| e.into_inner()) = Some(filter);
    }

    /// The counters.
    pub fn info(&self) -> NetInfo {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let s = &self.stats;
        NetInfo {
            rx_frames: get(&s.rx_frames),
            rx_bytes: get(&s.rx_bytes),
            tx_frames: get(&s.tx_frames),
            tx_bytes: get(&s.tx_bytes),
            rx_dropped: get(&s.rx_dropped),
            tx_dropped: get(&s.tx_dropped) + get(&s.bad_chains),
        }
    }

    fn pair(&self, pair: usize) -> std::sync::MutexGuard<'_, PairState> {
        self.pairs[pair].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn has(&self, bit: u32) -> bool {
        self.acked.load(Ordering::Acquire) & (1u64 << bit) != 0
    }

    /// Event ids of a pair's port fds and TX timer in its worker's epoll (above the
    /// rings and the exit event).
    fn rx_port_event(&self, pair: usize) -> u64 {
        (self.num_queues() + 1 + 3 * pair) as u64
    }

    fn tx_port_event(&self, pair: usize) -> u64 {
        self.rx_port_event(pair) + 1
    }

    fn tx_timer_event(&self, pair: usize) -> u64 {
        self.rx_port_event(pair) + 2
    }

    /// Whether to leave a TX kick for [`TX_DELAY`] (see [`TX_BUSY`]): the timer is set.
    fn defer_tx(&self, pair: usize) -> bool {
        let mut state = self.pair(pair);
        if state.tx_timer_armed {
            return true;
        }
        if state.last_tx.is_none_or(|t| t.elapsed() >= TX_BUSY) {
            return false;
        }
        if state.tx_timer.is_none() {
            let timer = match TimerFd::new() {
                Ok(timer) => timer,
                Err(e) => {
                    tracing::debug!("pair {pair}: no TX timer: {e}");
                    return false;
                }
            };
            let workers = self.workers.read().unwrap_or_else(|e| e.into_inner());
            let Some(worker) = workers.get(pair) else {
                return false;
            };
            let event = self.tx_timer_event(pair);
            if let Err(e) = worker.register_listener(timer.as_raw_fd(), EventSet::IN, event) {
                tracing::debug!("pair {pair}: cannot watch the TX timer: {e}");
                return false;
            }
            state.tx_timer = Some(timer);
        }
        let Some(timer) = state.tx_timer.as_mut() else {
            return false;
        };
        match timer.reset(TX_DELAY, None) {
            Ok(()) => {
                state.tx_timer_armed = true;
                true
            }
            Err(_) => false,
        }
    }

    /// Send what the guest queued (see [`vhost_daemon::drain`]).
    fn drain_tx(&self, pair: usize, tx: &Vring, event_idx: bool) {
        vhost_daemon::drain(tx, event_idx, true, || self.transmit(pair, tx));
        self.pair(pair).last_tx = Some(Instant::now());
    }

    /// Watch (or stop watching) the pair's port for frames.
    fn watch_rx(&self, pair: usize, state: &mut PairState, on: bool) {
        if state.watching_rx == on {
            return;
        }
        let workers = self.workers.read().unwrap_or_else(|e| e.into_inner());
        let Some(worker) = workers.get(pair) else {
            return;
        };
        let fd = self.ports[pair].rx_fd();
        let event = self.rx_port_event(pair);
        let result = if on {
            worker.register_listener(fd, EventSet::IN, event)
        } else {
            worker.unregister_listener(fd, EventSet::IN, event)
        };
        match result {
            Ok(()) => state.watching_rx = on,
            Err(e) => tracing::warn!("pair {pair}: cannot watch the port: {e}"),
        }
    }

    /// Wait (or stop waiting) for the pair's port to take frames again.
    fn watch_tx(&self, pair: usize, on: bool) {
        let Some((fd, events)) = self.ports[pair].tx_wait() else {
            return;
        };
        let workers = self.workers.read().unwrap_or_else(|e| e.into_inner());
        let Some(worker) = workers.get(pair) else {
            return;
        };
        let event = self.tx_port_event(pair);
        let result = if on {
            worker.register_listener(fd, events, event)
        } else {
            worker.unregister_listener(fd, events, event)
        };
        if let Err(e) = result {
            tracing::warn!("pair {pair}: cannot wait for the port: {e}");
        }
    }

    /// The largest frame the port may hand over, header included.
    fn max_frame(&self) -> usize {
        let gso = [
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
        ];
        if gso.iter().any(|&b| self.has(b)) {
            MAX_GSO_FRAME
        } else {
            MAX_PLAIN_FRAME
        }
    }

    /// Deliver frames from the port into the RX ring until one of them runs out.
    fn receive(&self, pair: usize, vring: &Vring) {
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return;
        };
        let mem = atomic.memory().into_inner();
        let port = &*self.ports[pair];
        let mut state = self.pair(pair);
        if !vring.get_ref().get_queue().ready() {
            // Stopped (GET_VRING_BASE) or not started: frames wait in the port until the
            // ring runs again, and the port is not watched meanwhile (it would wake us
            // for nothing, for ever).
            self.watch_rx(pair, &mut state, false);
            return;
        }
        if !vring.get_ref().is_enabled() {
            // The guest does not use this pair: the host should not send to it.
            if pair > 0 && !state.detached {
                port.set_attached(false);
                state.detached = true;
            }
            self.drop_rx(port);
            return;
        }
        if state.detached {
            port.set_attached(true);
            state.detached = false;
        }
        if !state.rx_mem.as_ref().is_some_and(|m| Arc::ptr_eq(m, &mem)) {
            // The guest memory changed under the cache: take its chains again.
            uncache_rx(&mut state, vring);
            state.rx_mem = Some(mem.clone());
        }
        state.rx_ring = Some(vring.clone());
        let mergeable = self.has(VIRTIO_NET_F_MRG_RXBUF);
        let need = if mergeable { self.max_frame() } else { 1 };
        let mut iovs = Vec::new();
        let mut delivered = 0;
        let mut looked_again = 0;
        loop {
            if !self.link_up.load(Ordering::Acquire) {
                self.drop_rx(port);
                self.watch_rx(pair, &mut state, true);
                break;
            }
            self.refill(&mut state, vring, &mem, need);
            if state.rx_cached_len < need || state.rx_cache.is_empty() {
                // Out of buffers: ask the guest to kick when it posts more, and look again
                // in case it did meanwhile (a few times: an avail index that is garbage
                // says "more" while nothing can be taken).
                if matches!(vring.enable_notification(), Ok(true)) && looked_again < 3 {
                    looked_again += 1;
                    continue;
                }
                self.watch_rx(pair, &mut state, false);
                break;
            }
            looked_again = 0;
            match self.receive_one(port, &mut state, vring, &mem, mergeable, &mut iovs) {
                Ok(Received::Delivered) => {
                    delivered += 1;
                    if delivered % RX_BATCH == 0 {
                        vhost_daemon::notify(vring);
                    }
                }
                Ok(Received::Filtered) => count(&self.stats.rx_dropped, 1),
                Ok(Received::Nothing) => {
                    self.watch_rx(pair, &mut state, true);
                    break;
                }
                Err(e) => {
                    tracing::debug!("pair {pair}: a frame from the host is dropped: {e}");
                    count(&self.stats.rx_dropped, 1);
                }
            }
        }
        if delivered % RX_BATCH != 0 {
            vhost_daemon::notify(vring);
        }
    }

    /// Read and drop what the port holds (link down, or a pair the guest does not use).
    fn drop_rx(&self, port: &dyn Port) {
        let mut scratch = vec![0u8; MAX_GSO_FRAME];
        let iov = [libc::iovec {
            iov_base: scratch.as_mut_ptr().cast(),
            iov_len: scratch.len(),
        }];
        while let Ok(Some(_)) | Err(_) = port.recv(&iov) {
            count(&self.stats.rx_dropped, 1);
        }
    }

    /// Take chains off the ring into the cache until they hold `need` bytes (mergeable)
    /// or there is one.
    fn refill(&self, state: &mut PairState, vring: &Vring, mem: &GuestMem, need: usize) {
        while state.rx_cached_len < need || state.rx_cache.is_empty() {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
            let Some(chain) = chain else { return };
            let head = chain.head_index();
            let mut buffers = Vec::new();
            let mut len = 0usize;
            let mut bad = false;
            for desc in chain {
                if !desc.is_write_only()
                    || desc.len() == 0
                    || host_buffers(mem, desc.addr(), desc.len() as usize, &mut buffers).is_err()
                {
                    bad = true;
                    break;
                }
                len += desc.len() as usize;
            }
            if bad || len < VNET_HDR_LEN {
                // Device-readable buffers in an RX chain, no room for the header, or a
                // buffer outside guest memory.
                count(&self.stats.bad_chains, 1);
                vhost_daemon::complete(vring, head, 0);
                continue;
            }
            state.rx_cached_len += len;
            state.rx_cache.push_back(CachedChain { head, buffers, len });
        }
    }

    /// Read one frame into the cached chains (which point into `mem`) and deliver it.
    /// `iovs`: scratch space.
    fn receive_one(
        &self,
        port: &dyn Port,
        state: &mut PairState,
        vring: &Vring,
        mem: &GuestMem,
        mergeable: bool,
        iovs: &mut Vec<libc::iovec>,
    ) -> io::Result<Received> {
        let chains = if mergeable { state.rx_cache.len() } else { 1 };
        // Without a header from the port the frame goes after the one written here.
        let header = if port.vnet_hdr() { 0 } else { VNET_HDR_LEN };
        iovs.clear();
        for (i, c) in state.rx_cache.iter().take(chains).enumerate() {
            iovecs_after(&c.buffers, if i == 0 { header } else { 0 }, iovs);
        }
        let room: usize = iovs.iter().map(|iov| iov.iov_len).sum();
        // Past the guest's buffers, room for the rest of any frame: a tap cuts a frame to
        // the buffers it is given without saying so, and one too large must be dropped
        // rather than delivered cut.
        let overflow = state
            .rx_overflow
            .get_or_insert_with(|| vec![0; MAX_GSO_FRAME]);
        iovs.push(libc::iovec {
            iov_base: overflow.as_mut_ptr().cast(),
            iov_len: overflow.len(),
        });
        let received = port.recv(iovs);
        // The port wrote the frame straight into the guest's buffers: log the bytes.
        // A port that fails may have filled them all first (a datagram or a queued frame
        // too large for them): those are logged whole.
        let written = match &received {
            Ok(Some(n)) => (*n).min(room),
            Ok(None) => 0,
            Err(_) => room,
        };
        mark_chains(mem, state.rx_cache.iter().take(chains), header, written);
        let Some(n) = received? else {
            return Ok(Received::Nothing);
        };
        if n > room {
            // The chains stay cached for the next frame.
            return Err(io::Error::other(format!(
                "a {n}-byte frame does not fit the guest's {room}-byte buffers"
            )));
        }
        let len = n + header;
        if len < VNET_HDR_LEN {
            // A port that carries the header handed over less than one: not a frame (a
            // tap never does this, but the header's num_buffers and the counters below
            // need one). The chains stay cached for the next frame.
            return Err(io::Error::other(format!(
                "a {n}-byte frame is shorter than its virtio-net header"
            )));
        }
        let Some(first) = state.rx_cache.front() else {
            return Ok(Received::Nothing);
        };
        if !self.accepts(&first.buffers) {
            // The chains stay cached for the next frame.
            return Ok(Received::Filtered);
        }
        // How many chains the frame filled.
        let mut used = 0;
        let mut left = len;
        while left > 0 || used == 0 {
            let Some(c) = state.rx_cache.get(used) else {
                break;
            };
            left = left.saturating_sub(c.len);
            used += 1;
        }
        // The port wrote the header but for num_buffers, or wrote none (then it is all
        // zero: no offloads).
        let num_buffers = (used as u16).to_le_bytes();
        if header == 0 {
            write_host(mem, &first.buffers, 10, &num_buffers);
        } else {
            let mut hdr = [0u8; VNET_HDR_LEN];
            hdr[10..].copy_from_slice(&num_buffers);
            write_host(mem, &first.buffers, 0, &hdr);
        }
        let mut left = len;
        for c in state.rx_cache.drain(..used) {
            let this = left.min(c.len);
            vhost_daemon::complete(vring, c.head, this as u32);
            state.rx_cached_len -= c.len;
            left -= this;
        }
        count(&self.stats.rx_frames, 1);
        count(&self.stats.rx_bytes, (len - VNET_HDR_LEN) as u64);
        Ok(Received::Delivered)
    }

    /// Whether the guest's RX filter takes the frame in the buffers `first` (after the
    /// virtio-net header).
    fn accepts(&self, first: &[HostBuffer]) -> bool {
        let filter = self.filter.read().unwrap_or_else(|e| e.into_inner());
        let Some(filter) = filter.as_ref() else {
            return true;
        };
        let mut head = [0u8; VNET_HDR_LEN + 16];
        let n = read_host(first, &mut head);
        filter::accepts(filter, &head[VNET_HDR_LEN.min(n)..n])
    }

    /// Send what the guest queued on the TX ring.
    fn transmit(&self, pair: usize, vring: &Vring) -> usize {
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return 0;
        };
        let mem = atomic.memory();
        let port = &*self.ports[pair];
        let header = if port.vnet_hdr() { 0 } else { VNET_HDR_LEN };
        let mut sent = 0;
        let mut iovs = Vec::new();
        let mut buffers = Vec::new();
        loop {
            if self.pair(pair).tx_blocked {
                break;
            }
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            buffers.clear();
            let mut len = 0usize;
            let mut bad = false;
            for desc in chain {
                if desc.is_write_only()
                    || host_buffers(&*mem, desc.addr(), desc.len() as usize, &mut buffers).is_err()
                {
                    bad = true;
                    break;
                }
                len += desc.len() as usize;
            }
            sent += 1;
            if bad || len < VNET_HDR_LEN {
                count(&self.stats.bad_chains, 1);
                vhost_daemon::complete(vring, head, 0);
                continue;
            }
            iovs.clear();
            iovecs_after(&buffers, header, &mut iovs);
            if !self.link_up.load(Ordering::Acquire) {
                count(&self.stats.tx_dropped, 1);
                vhost_daemon::complete(vring, head, 0);
                continue;
            }
            match port.send(&iovs) {
                Ok(Some(_)) => {
                    count(&self.stats.tx_frames, 1);
                    count(&self.stats.tx_bytes, (len - VNET_HDR_LEN) as u64);
                }
                Ok(None) if port.tx_wait().is_some() => {
                    // Not taken: back on the ring, and wait for the port.
                    let next = vring.queue_next_avail().wrapping_sub(1);
                    vring.set_queue_next_avail(next);
                    self.pair(pair).tx_blocked = true;
                    self.watch_tx(pair, true);
                    sent -= 1;
                    break;
                }
                Ok(None) => count(&self.stats.tx_dropped, 1),
                Err(e) => {
                    tracing::debug!("pair {pair}: a frame from the guest is dropped: {e}");
                    count(&self.stats.tx_dropped, 1);
                }
            }
            vhost_daemon::complete(vring, head, 0);
        }
        if sent > 0 {
            vhost_daemon::notify(vring);
        }
        sent
    }
}

impl VhostUserBackend for NetBackend {
    /// Guest memory carries the migration dirty log (see [`vhost_daemon::GuestMem`]).
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 * self.ports.len()
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn acked_features(&self, features: u64) {
        self.acked.store(features, Ordering::Release);
        for port in &self.ports {
            port.set_features(features);
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | vhost_daemon::LOG_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    /// One worker per pair, serving its RX and TX rings.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.ports.len()).map(|p| 0b11u64 << (2 * p)).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.new_event()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // RX chains taken off the ring but not used go back: the index the frontend gets
        // is that of the first of them.
        let queue = queue_index as usize;
        let Some(state) = self.pairs.get(queue / 2) else {
            return Ok(());
        };
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        if queue % 2 == usize::from(RX_RING) {
            if let Some(vring) = state.rx_ring.take() {
                uncache_rx(&mut state, &vring);
            }
            state.rx_cache.clear();
            state.rx_cached_len = 0;
            state.rx_mem = None;
            // The next start watches it again (and would find it watched already).
            self.watch_rx(queue / 2, &mut state, false);
        } else {
            state.tx_blocked = false;
            state.last_tx = None;
            if state.tx_timer_armed {
                if let Some(timer) = state.tx_timer.as_mut() {
                    let _ = timer.clear();
                }
                state.tx_timer_armed = false;
            }
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Never an error: that would end the worker thread and with it the queues.
        let pair = thread_id;
        let (Some(rx), Some(tx)) = (vrings.get(RX_RING as usize), vrings.get(TX_RING as usize))
        else {
            return Ok(());
        };
        let event_idx = self.event_idx.load(Ordering::Acquire);
        match device_event {
            RX_RING => self.receive(pair, rx),
            TX_RING => {
                if self.pair(pair).detached {
                    // The guest uses the pair again: its tap queue takes frames again.
                    self.receive(pair, rx);
                }
                if !self.defer_tx(pair) {
                    self.drain_tx(pair, tx, event_idx);
                }
            }
            e if u64::from(e) == self.tx_timer_event(pair) => {
                {
                    let mut state = self.pair(pair);
                    if let Some(timer) = state.tx_timer.as_mut() {
                        // Readable: this does not block.
                        let _ = timer.wait();
                    }
                    state.tx_timer_armed = false;
                }
                let ring = tx.get_ref();
                let live = ring.get_queue().ready() && ring.is_enabled();
                drop(ring);
                if live {
                    self.drain_tx(pair, tx, event_idx);
                }
            }
            e if u64::from(e) == self.rx_port_event(pair) => self.receive(pair, rx),
            e if u64::from(e) == self.tx_port_event(pair) => {
                self.ports[pair].tx_woken();
                self.watch_tx(pair, false);
                self.pair(pair).tx_blocked = false;
                self.drain_tx(pair, tx, event_idx);
            }
            _ => {}
        }
        Ok(())
    }
}

impl Served for NetBackend {
    const NAME: &'static str = "vmm-net";

    fn exit_events(&self) -> &ExitEvents {
        &self.exit_events
    }

    fn connection_starts(&self) {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.event_idx.store(false, Ordering::Release);
        self.acked.store(0, Ordering::Release);
        for p in 0..self.pairs.len() {
            *self.pair(p) = PairState::default();
        }
    }

    fn connection_ended(&self) {
        *self.workers.write().unwrap_or_else(|e| e.into_inner()) = Vec::new();
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = None;
        // Frames from the host wait in the ports for the next frontend.
        for p in 0..self.pairs.len() {
            *self.pair(p) = PairState::default();
        }
    }

    fn workers_started(&self, workers: Vec<Arc<EpollHandler<Self>>>) {
        *self.workers.write().unwrap_or_else(|e| e.into_inner()) = workers;
    }
}

/// Give the cached RX chains back to the ring: the next index to take is that of the
/// first of them.
fn uncache_rx(state: &mut PairState, vring: &Vring) {
    let cached = state.rx_cache.len() as u16;
    if cached > 0 {
        vring.set_queue_next_avail(vring.queue_next_avail().wrapping_sub(cached));
    }
    state.rx_cache.clear();
    state.rx_cached_len = 0;
}

/// The host memory of the guest buffer at `addr`, appended to `out`.
fn host_buffers<M: GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    len: usize,
    out: &mut Vec<HostBuffer>,
) -> io::Result<()> {
    let mut at = addr;
    for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
        let slice = slice.map_err(|e| io::Error::other(format!("guest buffer: {e}")))?;
        let guard = slice.ptr_guard_mut();
        out.push(HostBuffer {
            addr: at,
            ptr: guard.as_ptr(),
            len: slice.len(),
        });
        // Inside the buffer get_slices just accepted, so no overflow.
        at = at.unchecked_add(slice.len() as u64);
    }
    Ok(())
}

/// Log `len` bytes written into `buffers` from byte `skip` on (as [`iovecs_after`] lays
/// them out) in the migration dirty log.
fn mark_buffers<M: GuestMemoryBackend>(
    mem: &M,
    buffers: &[HostBuffer],
    mut skip: usize,
    mut len: usize,
) {
    for b in buffers {
        if len == 0 {
            return;
        }
        if skip >= b.len {
            skip -= b.len;
            continue;
        }
        let n = (b.len - skip).min(len);
        // `skip` is inside the buffer, which is inside guest memory.
        vhost_daemon::mark_dirty(mem, b.addr.unchecked_add(skip as u64), n);
        len -= n;
        skip = 0;
    }
}

/// Log the first `len` bytes a port wrote into the iovecs of `chains` (the first without
/// its first `header` bytes, as [`NetBackend::receive_one`] builds them).
fn mark_chains<'a, M: GuestMemoryBackend>(
    mem: &M,
    chains: impl Iterator<Item = &'a CachedChain>,
    header: usize,
    mut len: usize,
) {
    let mut skip = header;
    for c in chains {
        if len == 0 {
            return;
        }
        let n = c.len.saturating_sub(skip).min(len);
        mark_buffers(mem, &c.buffers, skip, n);
        len -= n;
        skip = 0;
    }
}

/// `buffers` without their first `skip` bytes, as iovecs appended to `out`.
fn iovecs_after(buffers: &[HostBuffer], mut skip: usize, out: &mut Vec<libc::iovec>) {
    for buffer in buffers {
        if skip >= buffer.len {
            skip -= buffer.len;
            continue;
        }
        out.push(libc::iovec {
            // SAFETY: `skip` is less than the buffer's length: still inside it.
            iov_base: unsafe { buffer.ptr.add(skip) }.cast(),
            iov_len: buffer.len - skip,
        });
        skip = 0;
    }
}

/// Read the first bytes of `buffers` into `buf`; how many there were.
fn read_host(buffers: &[HostBuffer], buf: &mut [u8]) -> usize {
    let mut done = 0;
    for b in buffers {
        for i in 0..b.len.min(buf.len() - done) {
            // SAFETY: `i` is inside the buffer, which is mapped (see `HostBuffer`); guest
            // memory is read volatile as the guest may write it meanwhile.
            buf[done] = unsafe { b.ptr.add(i).read_volatile() };
            done += 1;
        }
        if done == buf.len() {
            break;
        }
    }
    done
}

/// Write `data` at byte `at` of `buffers` (as far as they reach: a chain holds at least
/// the header, which is all that is written), and log what was written in `mem`'s
/// migration dirty log (the buffers point into `mem`).
fn write_host<M: GuestMemoryBackend>(mem: &M, buffers: &[HostBuffer], at: usize, data: &[u8]) {
    let mut bytes = data.iter();
    let mut skip = at;
    let mut written = 0;
    for b in buffers {
        if written == data.len() {
            break;
        }
        if skip >= b.len {
            skip -= b.len;
            continue;
        }
        for i in skip..b.len {
            let Some(&byte) = bytes.next() else { break };
            // SAFETY: `i` is inside the buffer, which is mapped (see `HostBuffer`).
            unsafe { b.ptr.add(i).write_volatile(byte) };
            written += 1;
        }
        skip = 0;
    }
    mark_buffers(mem, buffers, at, written);
}

/// What became of a frame from the host.
enum Received {
    Delivered,
    /// The guest's RX filter does not take it.
    Filtered,
    /// There was none.
    Nothing,
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::bitmap::{AtomicBitmap, Bitmap};
    use vm_memory::{Bytes, GuestMemoryMmap, GuestMemoryRegion};

    /// Two adjacent regions; vm-memory's page bitmap stands in for the migration log.
    fn memory() -> GuestMemoryMmap<AtomicBitmap> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .unwrap()
    }

    fn dirty_pages(mem: &GuestMemoryMmap<AtomicBitmap>) -> Vec<u64> {
        let mut pages = Vec::new();
        for region in mem.iter() {
            for offset in (0..region.len()).step_by(0x1000) {
                if region.bitmap().dirty_at(offset as usize) {
                    pages.push(region.start_addr().raw_value() + offset);
                }
            }
        }
        pages
    }

    fn chain(mem: &GuestMemoryMmap<AtomicBitmap>, bufs: &[(u64, usize)]) -> CachedChain {
        let mut buffers = Vec::new();
        for &(addr, len) in bufs {
            host_buffers(mem, GuestAddress(addr), len, &mut buffers).unwrap();
        }
        CachedChain {
            head: 0,
            len: bufs.iter().map(|b| b.1).sum(),
            buffers,
        }
    }

    #[test]
    fn the_header_written_by_hand_is_logged_where_it_lands() {
        let mem = memory();
        // A buffer across the two regions: num_buffers (bytes 10..12) lands in the second.
        let c = chain(&mem, &[(0xfff6, 0x100)]);
        assert_eq!(c.buffers.len(), 2, "split at the region boundary");
        write_host(&mem, &c.buffers, 10, &[2, 0]);
        assert_eq!(dirty_pages(&mem), [0x1_0000]);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(0x1_0000)).unwrap(), 2);
        // The whole header: both pages.
        write_host(&mem, &c.buffers, 0, &[0u8; VNET_HDR_LEN]);
        assert_eq!(dirty_pages(&mem), [0xf000, 0x1_0000]);
    }

    #[test]
    fn a_frame_is_logged_across_chains_after_the_header() {
        let mem = memory();
        let chains = [
            chain(&mem, &[(0x1fd0, 0x20), (0x5000, 0x1000)]),
            chain(&mem, &[(0x1_3ff0, 0x1000)]),
            chain(&mem, &[(0x1_8000, 0x1000)]),
        ];
        // After a 12-byte header: 0x14 bytes of the first buffer (page 1), 0x1000 of the
        // second (page 5), and 0x10 of the next chain (page 0x13, not 0x14); the third
        // chain is untouched.
        mark_chains(&mem, chains.iter(), VNET_HDR_LEN, 0x14 + 0x1000 + 0x10);
        assert_eq!(dirty_pages(&mem), [0x1000, 0x5000, 0x1_3000]);
        // Nothing written: nothing logged.
        let mem = memory();
        mark_chains(&mem, chains.iter(), VNET_HDR_LEN, 0);
        assert!(dirty_pages(&mem).is_empty());
    }
}
