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
//! Everything in a chain is guest input: a chain in the wrong direction, too short for
//! the header, or outside guest memory is completed with nothing done and counted; the
//! worker never stops for it. Frames are dropped (and counted) while the link is down,
//! when they do not pass the guest's RX filter, or when they do not fit its buffers.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ipc::net::{NetInfo, RxFilter};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

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

/// An RX chain taken off the ring and not used yet: its head and its buffers.
struct CachedChain {
    head: u16,
    buffers: Vec<(GuestAddress, usize)>,
    len: usize,
}

/// What a pair's worker keeps between events.
#[derive(Default)]
struct PairState {
    rx_cache: VecDeque<CachedChain>,
    /// The RX ring the cache came from (to give the chains back when it stops).
    rx_ring: Option<Vring>,
    /// The port's fd is in the worker's epoll (see the module docs).
    watching_rx: bool,
    /// The port would block: TX waits for its fd.
    tx_blocked: bool,
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
        let features = bits.iter().fold(0u64, |f, b| f | 1 << b)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
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
        self.features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
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

    /// Event ids of a pair's port fds in its worker's epoll (above the rings and the
    /// exit event).
    fn rx_port_event(&self, pair: usize) -> u64 {
        (self.num_queues() + 1 + 2 * pair) as u64
    }

    fn tx_port_event(&self, pair: usize) -> u64 {
        self.rx_port_event(pair) + 1
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
        let mem = atomic.memory();
        let port = &*self.ports[pair];
        let mut state = self.pair(pair);
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
        let mergeable = self.has(VIRTIO_NET_F_MRG_RXBUF);
        let need = if mergeable { self.max_frame() } else { 1 };
        state.rx_ring = Some(vring.clone());
        let mut delivered = 0;
        let mut looked_again = 0;
        loop {
            if !self.link_up.load(Ordering::Acquire) {
                self.drop_rx(port);
                self.watch_rx(pair, &mut state, true);
                break;
            }
            self.refill(&mut state, vring, &mem, need);
            let enough = if mergeable {
                state.rx_cache.iter().map(|c| c.len).sum::<usize>() >= need
            } else {
                !state.rx_cache.is_empty()
            };
            if !enough {
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
            match self.receive_one(port, &mut state, vring, &mem, mergeable) {
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
        loop {
            let have = state.rx_cache.iter().map(|c| c.len).sum::<usize>();
            if (need > 1 && have >= need) || (need == 1 && !state.rx_cache.is_empty()) {
                return;
            }
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(mem);
            let Some(chain) = chain else { return };
            let head = chain.head_index();
            let mut buffers = Vec::new();
            let mut len = 0usize;
            let mut bad = false;
            for desc in chain {
                if !desc.is_write_only() || desc.len() == 0 {
                    bad = true;
                    break;
                }
                buffers.push((desc.addr(), desc.len() as usize));
                len += desc.len() as usize;
            }
            let mut iovs = Vec::new();
            if bad
                || len < VNET_HDR_LEN
                || buffers.is_empty()
                || host_iovecs(mem, &buffers, &mut iovs).is_err()
            {
                // Device-readable buffers in an RX chain, no room for the header, or a
                // buffer outside guest memory.
                count(&self.stats.bad_chains, 1);
                vhost_daemon::complete(vring, head, 0);
                continue;
            }
            state.rx_cache.push_back(CachedChain { head, buffers, len });
        }
    }

    /// Read one frame into the cached chains and deliver it.
    fn receive_one(
        &self,
        port: &dyn Port,
        state: &mut PairState,
        vring: &Vring,
        mem: &GuestMem,
        mergeable: bool,
    ) -> io::Result<Received> {
        let chains = if mergeable { state.rx_cache.len() } else { 1 };
        let mut iovs = Vec::with_capacity(chains * 2);
        for c in state.rx_cache.iter().take(chains) {
            host_iovecs(mem, &c.buffers, &mut iovs)?;
        }
        let header = if port.vnet_hdr() { 0 } else { VNET_HDR_LEN };
        let Some(n) = port.recv(skip(&iovs, header).as_slice())? else {
            return Ok(Received::Nothing);
        };
        let len = n + header;
        let first = state
            .rx_cache
            .front()
            .map(|c| c.buffers.clone())
            .unwrap_or_default();
        if !self.accepts(mem, &first) {
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
            write_buffers(mem, &first, 10, &num_buffers)?;
        } else {
            let mut hdr = [0u8; VNET_HDR_LEN];
            hdr[10..].copy_from_slice(&num_buffers);
            write_buffers(mem, &first, 0, &hdr)?;
        }
        let mut left = len;
        for c in state.rx_cache.drain(..used) {
            let this = left.min(c.len);
            vhost_daemon::complete(vring, c.head, this as u32);
            left -= this;
        }
        count(&self.stats.rx_frames, 1);
        count(&self.stats.rx_bytes, (len - VNET_HDR_LEN) as u64);
        Ok(Received::Delivered)
    }

    /// Whether the guest's RX filter takes the frame in the buffers `first` (after the
    /// virtio-net header).
    fn accepts(&self, mem: &GuestMem, first: &[(GuestAddress, usize)]) -> bool {
        let filter = self.filter.read().unwrap_or_else(|e| e.into_inner());
        let Some(filter) = filter.as_ref() else {
            return true;
        };
        let mut head = [0u8; VNET_HDR_LEN + 16];
        if read_buffers(mem, first, &mut head).is_err() {
            return true;
        }
        filter::accepts(filter, &head[VNET_HDR_LEN..])
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
        loop {
            if self.pair(pair).tx_blocked {
                break;
            }
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let mut buffers = Vec::new();
            let mut len = 0usize;
            let mut bad = false;
            for desc in chain {
                if desc.is_write_only() {
                    bad = true;
                    break;
                }
                buffers.push((desc.addr(), desc.len() as usize));
                len += desc.len() as usize;
            }
            sent += 1;
            let mut iovs = Vec::with_capacity(buffers.len());
            if bad || len < VNET_HDR_LEN || host_iovecs(&mem, &buffers, &mut iovs).is_err() {
                count(&self.stats.bad_chains, 1);
                vhost_daemon::complete(vring, head, 0);
                continue;
            }
            if !self.link_up.load(Ordering::Acquire) {
                count(&self.stats.tx_dropped, 1);
                vhost_daemon::complete(vring, head, 0);
                continue;
            }
            match port.send(skip(&iovs, header).as_slice()) {
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
    type Bitmap = ();
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
            let cached = state.rx_cache.len() as u16;
            if let Some(vring) = state.rx_ring.take() {
                vring.set_queue_next_avail(vring.queue_next_avail().wrapping_sub(cached));
            }
            state.rx_cache.clear();
            state.watching_rx = false;
        } else {
            state.tx_blocked = false;
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
                vhost_daemon::drain(tx, event_idx, true, || self.transmit(pair, tx));
            }
            e if u64::from(e) == self.rx_port_event(pair) => self.receive(pair, rx),
            e if u64::from(e) == self.tx_port_event(pair) => {
                self.ports[pair].tx_woken();
                self.watch_tx(pair, false);
                self.pair(pair).tx_blocked = false;
                vhost_daemon::drain(tx, event_idx, true, || self.transmit(pair, tx));
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

/// The host memory of `buffers`, as iovecs appended to `out`.
fn host_iovecs(
    mem: &GuestMem,
    buffers: &[(GuestAddress, usize)],
    out: &mut Vec<libc::iovec>,
) -> io::Result<()> {
    for &(addr, len) in buffers {
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let slice = slice.map_err(|e| io::Error::other(format!("guest buffer: {e}")))?;
            let guard = slice.ptr_guard_mut();
            out.push(libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
    }
    Ok(())
}

/// `iovs` without their first `bytes` bytes.
fn skip(iovs: &[libc::iovec], mut bytes: usize) -> Vec<libc::iovec> {
    let mut out = Vec::with_capacity(iovs.len());
    for iov in iovs {
        if bytes >= iov.iov_len {
            bytes -= iov.iov_len;
            continue;
        }
        out.push(libc::iovec {
            // SAFETY: `bytes` is less than the buffer's length: still inside it.
            iov_base: unsafe { (iov.iov_base as *mut u8).add(bytes) }.cast(),
            iov_len: iov.iov_len - bytes,
        });
        bytes = 0;
    }
    out
}

/// Read the first `buf.len()` bytes of `buffers` from guest memory.
fn read_buffers(
    mem: &GuestMem,
    buffers: &[(GuestAddress, usize)],
    buf: &mut [u8],
) -> io::Result<()> {
    let mut done = 0;
    for &(addr, len) in buffers {
        if done == buf.len() {
            break;
        }
        let n = len.min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], addr)
            .map_err(|e| io::Error::other(format!("guest buffer: {e}")))?;
        done += n;
    }
    Ok(())
}

/// Write `data` at byte `at` of `buffers` in guest memory.
fn write_buffers(
    mem: &GuestMem,
    buffers: &[(GuestAddress, usize)],
    mut at: usize,
    data: &[u8],
) -> io::Result<()> {
    let mut done = 0;
    for &(addr, len) in buffers {
        if done == data.len() {
            break;
        }
        if at >= len {
            at -= len;
            continue;
        }
        let n = (len - at).min(data.len() - done);
        let addr = addr
            .checked_add(at as u64)
            .ok_or_else(|| io::Error::other("guest buffer address overflows"))?;
        mem.write_slice(&data[done..done + n], addr)
            .map_err(|e| io::Error::other(format!("guest buffer: {e}")))?;
        done += n;
        at = 0;
    }
    if done < data.len() {
        return Err(io::Error::other("guest buffers too short for the header"));
    }
    Ok(())
}

/// What became of a frame from the host.
enum Received {
    Delivered,
    /// The guest's RX filter does not take it.
    Filtered,
    /// There was none.
    Nothing,
}
