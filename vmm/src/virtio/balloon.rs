//! `virtio-balloon-pci`: the guest gives pages back (inflate), takes them again (deflate),
//! reports its memory statistics, and with free page reporting hands idle memory back on
//! its own. It lives in the vmm: its work is reading page numbers out of guest memory and
//! punching those pages out of the guest-RAM memfd, which the vmm holds anyway; a device
//! process would add a vhost-user hop and the memfd's write access, and sandbox nothing.
//!
//! Released pages leave the host at once (the memfd's pages, for every process that maps
//! it) and read as zeroes when the guest touches them again; deflating needs no work.
//! Page numbers outside RAM, and buffers that are not what the queue takes, are ignored
//! and counted.
//!
//! Statistics: the driver puts one buffer on the stats queue and refills it each time the
//! device hands it back, which it does every `guest-stats-polling-interval` seconds once
//! that is set (the timer is the device manager's), as QEMU does. The figures are kept by
//! tag, as QEMU's `guest-stats` shows them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use qmp::EventSender;
use serde_json::{json, Map, Value};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, QueueSetup, VirtioBackend, VirtioError};
use crate::accel::Accelerator;
use crate::memory::{release_pages, GuestMemoryMmap};
use crate::snapshot::{decode, encode, SnapshotError};

pub const VIRTIO_ID_BALLOON: u16 = 5;
const QUEUE_SIZE: u16 = 128;
const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
const VIRTIO_BALLOON_F_REPORTING: u32 = 5;
const VIRTIO_RING_F_EVENT_IDX: u32 = 29;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;
const REPORTING: usize = 3;
/// Bytes of configuration: num_pages, actual, free_page_hint_cmd_id, poison_val.
const CONFIG_SIZE: usize = 16;
/// The balloon's page unit (virtio's, whatever the guest's page size).
const BALLOON_PAGE: u64 = 4096;
/// The event `actual` changes are reported with.
pub const EVENT_BALLOON_CHANGE: &str = "BALLOON_CHANGE";

/// The names query-balloon gives the guest's statistics tags 0..6 (the seed's).
const SEED_STAT_NAMES: [&str; 6] = [
    "mem_swapped_in",
    "mem_swapped_out",
    "major_page_faults",
    "minor_page_faults",
    "free_mem",
    "total_mem",
];
/// The names QEMU 7.2's `guest-stats` property gives tags 0..10.
const GUEST_STAT_NAMES: [&str; 10] = [
    "stat-swap-in",
    "stat-swap-out",
    "stat-major-faults",
    "stat-minor-faults",
    "stat-free-memory",
    "stat-total-memory",
    "stat-available-memory",
    "stat-disk-caches",
    "stat-htlb-pgalloc",
    "stat-htlb-pgfail",
];
/// A statistic the guest never reported (QEMU's -1 in a u64).
const NO_STAT: u64 = u64::MAX;
/// The longest page list and stats buffer read (Linux sends 256 page numbers and 10
/// statistics at a time): a longer one is refused unread.
const MAX_LIST_BYTES: u32 = 64 << 10;

/// What the balloon counts, for queries and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Bytes punched out of the memfd (inflate and free page reporting).
    pub released: u64,
    /// Pages the guest took back.
    pub deflated: u64,
    /// Page numbers and ranges outside RAM, and buffers that are not what their queue
    /// takes (a writable inflate list, a readable report, a ragged length, an unreadable
    /// address).
    pub refused: u64,
    /// Statistics buffers the guest filled.
    pub stats_updates: u64,
}

struct ActiveQueue {
    queue: Queue,
    call: EventFd,
}

pub struct VirtioBalloon {
    memory: GuestMemoryMmap,
    /// Told about released ranges: a CPU that caches decoded code must not run stale
    /// instructions from a page that reads as zeroes now.
    accel: Arc<dyn Accelerator>,
    ram_size: u64,
    deflate_on_oom: bool,
    reporting: bool,
    features: u64,
    /// The target the vmm set, and what the guest says it holds, in balloon pages.
    num_pages: u32,
    actual: u32,
    queues: BTreeMap<usize, ActiveQueue>,
    /// The stats buffer the guest gave, held until the polling timer wants new figures.
    stats_head: Option<u16>,
    /// The guest's figures by tag ([`NO_STAT`] until it reports one), and when they came
    /// (seconds since the epoch; 0 before the first).
    stats: [u64; GUEST_STAT_NAMES.len()],
    last_update: u64,
    counters: BalloonCounters,
    events: Arc<Mutex<EventSender>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VirtioBalloon {
    pub fn new(
        memory: GuestMemoryMmap,
        accel: Arc<dyn Accelerator>,
        deflate_on_oom: bool,
        reporting: bool,
        events: Arc<Mutex<EventSender>>,
    ) -> Self {
        let ram_size = memory.iter().map(|r| r.len()).sum();
        VirtioBalloon {
            memory,
            accel,
            ram_size,
            deflate_on_oom,
            reporting,
            features: 0,
            num_pages: 0,
            actual: 0,
            queues: BTreeMap::new(),
            stats_head: None,
            stats: [NO_STAT; GUEST_STAT_NAMES.len()],
            last_update: 0,
            counters: BalloonCounters::default(),
            events,
        }
    }

    /// Ask the guest to leave it `target` bytes of RAM (clamped to the RAM it has, as
    /// QEMU does). Returns true when the request changed (the caller tells the driver).
    pub fn set_target(&mut self, target: u64) -> bool {
        let target = target.min(self.ram_size);
        let pages = ((self.ram_size - target) / BALLOON_PAGE) as u32;
        let changed = pages != self.num_pages;
        self.num_pages = pages;
        changed
    }

    /// The guest's RAM as the balloon leaves it, in bytes (query-balloon's `actual`). The
    /// driver writes its page count: one claiming more than the RAM leaves none.
    pub fn actual(&self) -> u64 {
        self.ram_size
            .saturating_sub(u64::from(self.actual) * BALLOON_PAGE)
    }

    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

    /// query-balloon: `actual`, and with `with_stats` (polling is on, so they are recent)
    /// the guest's last statistics, those of the seed's that it reported.
    pub fn query(&self, with_stats: bool) -> Value {
        let mut info = Map::new();
        info.insert("actual".into(), json!(self.actual()));
        if with_stats {
            for (name, &value) in SEED_STAT_NAMES.iter().zip(&self.stats) {
                if value != NO_STAT {
                    info.insert((*name).into(), json!(value));
                }
            }
        }
        Value::Object(info)
    }

    /// QEMU 7.2's `guest-stats` property: every statistic it names (-1 as a u64 for one
    /// never reported) and when the last report came.
    pub fn guest_stats(&self) -> Value {
        let stats: Map<String, Value> = GUEST_STAT_NAMES
            .iter()
            .zip(&self.stats)
            .map(|(name, value)| ((*name).to_string(), json!(value)))
            .collect();
        json!({ "stats": stats, "last-update": self.last_update })
    }

    fn has(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }

    /// What each queue index is: the indices follow the features the driver took (Linux
    /// numbers only the queues it uses): inflate, deflate, then stats and reporting.
    fn queue_kinds(&self) -> Vec<usize> {
        let mut kinds = vec![INFLATE, DEFLATE];
        if self.has(VIRTIO_BALLOON_F_STATS_VQ) {
            kinds.push(STATS);
        }
        if self.has(VIRTIO_BALLOON_F_REPORTING) {
            kinds.push(REPORTING);
        }
        kinds
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        c[4..8].copy_from_slice(&self.actual.to_le_bytes());
        c
    }

    /// Give the held stats buffer back: the driver refills it with fresh figures.
    pub fn request_stats(&mut self) {
        let Some(head) = self.stats_head.take() else {
            return;
        };
        if let Some(q) = self.queues.get_mut(&STATS) {
            if q.queue.add_used(&self.memory, head, 0).is_ok() {
                let _ = q.call.write(1);
            }
        }
    }

    /// Page frame numbers (le32, in balloon pages) of one inflate or deflate buffer; None
    /// for a buffer that is not whole page numbers in RAM.
    fn page_numbers(&self, addr: GuestAddress, len: u32) -> Option<Vec<u32>> {
        if !len.is_multiple_of(4) || len > MAX_LIST_BYTES {
            return None;
        }
        let mut bytes = vec![0u8; len as usize];
        self.memory.read_slice(&mut bytes, addr).ok()?;
        Some(
            bytes
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        )
    }

    /// Punch `pfns` (coalesced into runs) out of guest RAM.
    fn inflate(&mut self, mut pfns: Vec<u32>) {
        pfns.sort_unstable();
        pfns.dedup();
        let mut run: Option<(u64, u64)> = None;
        for pfn in pfns {
            let gpa = u64::from(pfn) * BALLOON_PAGE;
            if gpa.checked_add(BALLOON_PAGE).is_none()
                || !self.memory.address_in_range(GuestAddress(gpa))
            {
                self.counters.refused += 1;
                continue;
            }
            run = match run {
                Some((start, len)) if start + len == gpa => Some((start, len + BALLOON_PAGE)),
                Some((start, len)) => {
                    self.release(start, len);
                    Some((gpa, BALLOON_PAGE))
                }
                None => Some((gpa, BALLOON_PAGE)),
            };
        }
        if let Some((start, len)) = run {
            self.release(start, len);
        }
    }

    fn release(&mut self, gpa: u64, len: u64) {
        match release_pages(&self.memory, gpa, len) {
            Ok(n) => {
                self.counters.released += n;
                self.accel.ram_changed(gpa, len);
            }
            Err(e) => {
                tracing::warn!("balloon: cannot release {len} bytes at {gpa:#x}: {e}");
                self.counters.refused += 1;
            }
        }
    }

    /// Serve every buffer the driver queued on `index`.
    fn serve(&mut self, index: usize) {
        let Some(mut q) = self.queues.remove(&index) else {
            return;
        };
        let memory = self.memory.clone();
        let mut used_any = false;
        while let Some(chain) = q.queue.pop_descriptor_chain(&memory) {
            let head = chain.head_index();
            let descs: Vec<_> = chain.collect();
            match index {
                INFLATE | DEFLATE => {
                    let mut pfns = Vec::new();
                    for d in &descs {
                        match self.page_numbers(d.addr(), d.len()) {
                            Some(p) if !d.is_write_only() => pfns.extend(p),
                            _ => self.counters.refused += 1,
                        }
                    }
                    if index == INFLATE {
                        self.inflate(pfns);
                    } else {
                        self.counters.deflated += pfns.len() as u64;
                    }
                }
                STATS => {
                    for d in &descs {
                        self.read_stats(d.addr(), d.len(), d.is_write_only());
                    }
                    self.counters.stats_updates += 1;
                    self.last_update = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    // Held until the polling timer wants new figures.
                    if let Some(old) = self.stats_head.replace(head) {
                        let _ = q.queue.add_used(&memory, old, 0);
                        used_any = true;
                    }
                    continue;
                }
                _ => {
                    // Free page reporting: writable buffers of free memory.
                    for d in &descs {
                        let gpa = d.addr().0;
                        let end = gpa.checked_add(u64::from(d.len()).saturating_sub(1));
                        let in_ram = end.is_some_and(|end| {
                            memory.address_in_range(d.addr())
                                && memory.address_in_range(GuestAddress(end))
                        });
                        if d.is_write_only() && in_ram {
                            self.release(gpa, u64::from(d.len()));
                        } else {
                            self.counters.refused += 1;
                        }
                    }
                }
            }
            if let Err(e) = q.queue.add_used(&memory, head, 0) {
                tracing::debug!("balloon: queue {index}: {e}");
            }
            used_any = true;
        }
        if used_any {
            let _ = q.call.write(1);
        }
        self.queues.insert(index, q);
    }

    /// One stats buffer: (le16 tag, le64 value) entries. Tags past those QEMU names are
    /// skipped; a buffer that is not whole entries, or not readable, is refused.
    fn read_stats(&mut self, addr: GuestAddress, len: u32, write_only: bool) {
        if write_only || !len.is_multiple_of(10) || len > MAX_LIST_BYTES {
            self.counters.refused += 1;
            return;
        }
        let mut bytes = vec![0u8; len as usize];
        if self.memory.read_slice(&mut bytes, addr).is_err() {
            self.counters.refused += 1;
            return;
        }
        for e in bytes.chunks_exact(10) {
            let tag = usize::from(u16::from_le_bytes([e[0], e[1]]));
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..10]);
            if let Some(slot) = self.stats.get_mut(tag) {
                *slot = u64::from_le_bytes(v);
            }
        }
    }
}

fn active_queue(q: QueueSetup, event_idx: bool) -> Result<ActiveQueue, VirtioError> {
    Ok(ActiveQueue {
        queue: super::inline_queue(&q, QUEUE_SIZE, event_idx, "balloon queue")?,
        call: q.call,
    })
}

impl VirtioBackend for VirtioBalloon {
    fn device_type(&self) -> u16 {
        VIRTIO_ID_BALLOON
    }

    fn num_queues(&self) -> usize {
        if self.reporting {
            4
        } else {
            3
        }
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = 1u64 << VIRTIO_BALLOON_F_STATS_VQ;
        if self.deflate_on_oom {
            f |= 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if self.reporting {
            f |= 1 << VIRTIO_BALLOON_F_REPORTING;
        }
        f | super::VIRTIO_F_VERSION_1
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's.
        let mut c = self.config();
        for (i, b) in data.iter().enumerate() {
            if let Some(at) = usize::try_from(offset).ok().map(|o| o + i) {
                if (4..8).contains(&at) {
                    c[at] = *b;
                }
            }
        }
        let actual = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        if actual != self.actual {
            self.actual = actual;
            let mut data = Map::new();
            data.insert("actual".into(), json!(self.actual()));
            lock(&self.events).emit(EVENT_BALLOON_CHANGE, Some(data));
        }
    }

    fn activate(&mut self, activation: Activation<'_>) -> Result<(), VirtioError> {
        self.features = activation.features;
        let event_idx = self.has(VIRTIO_RING_F_EVENT_IDX);
        let kinds = self.queue_kinds();
        self.queues.clear();
        for q in activation.queues {
            if let Some(&kind) = kinds.get(q.index) {
                self.queues.insert(kind, active_queue(q, event_idx)?);
            }
        }
        // Linux primes the stats queue with its first figures before DRIVER_OK, and that
        // kick came before the queues were ours: take what is already there (unless the
        // queues come from a migration: their positions come with the state).
        if !activation.resume {
            for kind in kinds {
                self.serve(kind);
            }
        }
        Ok(())
    }

    /// A reset (the driver's, or the machine's): the balloon starts empty again and the
    /// guest has all its memory (released pages come back as it touches them).
    fn reset(&mut self) {
        self.queues.clear();
        self.features = 0;
        self.stats_head = None;
        self.num_pages = 0;
        self.actual = 0;
    }

    fn inline_queue(&self, _queue: usize) -> bool {
        true
    }

    fn queue_notify(&mut self, queue: usize) {
        if let Some(&kind) = self.queue_kinds().get(queue) {
            self.serve(kind);
        }
    }

    fn as_balloon(&mut self) -> Option<&mut VirtioBalloon> {
        Some(self)
    }

    fn save_state(&mut self) -> Result<Vec<u8>, SnapshotError> {
        encode(
            SNAPSHOT,
            &BalloonState {
                num_pages: self.num_pages,
                actual: self.actual,
                stats: self.stats.to_vec(),
                last_update: self.last_update,
                stats_head: self.stats_head,
                queues: self
                    .queues
                    .iter()
                    .map(|(kind, q)| (*kind, q.queue.next_avail(), q.queue.next_used()))
                    .collect(),
            },
        )
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let s: BalloonState = decode(SNAPSHOT, state)?;
        if s.stats.len() != self.stats.len() {
            return Err(SnapshotError::Decode {
                what: SNAPSHOT,
                message: format!("{} statistics", s.stats.len()),
            });
        }
        self.num_pages = s.num_pages;
        self.actual = s.actual;
        self.stats.copy_from_slice(&s.stats);
        self.last_update = s.last_update;
        self.stats_head = s.stats_head;
        for (kind, avail, used) in s.queues {
            if let Some(q) = self.queues.get_mut(&kind) {
                q.queue.set_next_avail(avail);
                q.queue.set_next_used(used);
            }
        }
        Ok(())
    }
}

const SNAPSHOT: &str = "the balloon";

/// What moves with the guest: the target, the guest's answer, its last statistics, the
/// stats buffer it holds, and where each queue is.
#[derive(serde::Serialize, serde::Deserialize)]
struct BalloonState {
    num_pages: u32,
    actual: u32,
    stats: Vec<u64>,
    last_update: u64,
    stats_head: Option<u16>,
    queues: Vec<(usize, u16, u16)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_claiming_more_pages_than_ram_leaves_none() {
        // Found by the hostile-guest fuzzer: this panicked the vCPU's thread.
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let events = Arc::new(Mutex::new(EventSender::default()));
        let accel = Arc::new(crate::accel::test_util::RecordingAccel::default());
        let mut b = VirtioBalloon::new(memory, accel, false, true, events);
        b.write_config(4, &u32::MAX.to_le_bytes());
        assert_eq!(b.actual(), 0);
        assert_eq!(b.query(false)["actual"], 0);
    }

    #[test]
    fn targets_are_clamped_and_actual_is_reported() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let events = Arc::new(Mutex::new(EventSender::default()));
        let accel = Arc::new(crate::accel::test_util::RecordingAccel::default());
        let mut b = VirtioBalloon::new(memory, accel, false, true, events);
        assert_eq!(b.actual(), 16 << 20);
        assert!(b.set_target(8 << 20));
        let mut c = [0u8; 8];
        b.read_config(0, &mut c);
        assert_eq!(u32::from_le_bytes([c[0], c[1], c[2], c[3]]), 2048);
        assert!(!b.set_target(8 << 20), "unchanged");
        b.set_target(1 << 40);
        b.read_config(0, &mut c[..4]);
        assert_eq!(c[..4], [0; 4], "more than the guest has: nothing to give");
        b.write_config(4, &1024u32.to_le_bytes());
        assert_eq!(b.actual(), (16 << 20) - (4 << 20));
        assert_eq!(b.query(false)["actual"], (12u64 << 20));
        assert_eq!(b.num_queues(), 4);
        assert_ne!(b.features() & (1 << VIRTIO_BALLOON_F_REPORTING), 0);
    }

    #[test]
    fn released_ranges_reach_the_accelerator_and_stats_are_kept_by_tag() {
        let ram = crate::memory::MemoryManager::new(16 << 20).unwrap();
        let memory = ram.guest_memory().clone();
        let events = Arc::new(Mutex::new(EventSender::default()));
        let accel = Arc::new(crate::accel::test_util::RecordingAccel::default());
        let mut b = VirtioBalloon::new(memory.clone(), accel.clone(), false, false, events);
        b.inflate(vec![3, 1, 2, 2, 100_000, 9]);
        assert_eq!(
            *accel.ram_changes.lock().unwrap(),
            vec![(4096, 3 * 4096), (9 * 4096, 4096)],
            "runs coalesced, the duplicate once, the page outside RAM skipped"
        );
        assert_eq!(b.counters().refused, 1);
        assert_eq!(b.counters().released, 4 * 4096);

        // Two entries and a tag QEMU does not name; then a ragged buffer.
        let mut buf = Vec::new();
        for (tag, value) in [(4u16, 11u64), (9, 22), (40, 33)] {
            buf.extend_from_slice(&tag.to_le_bytes());
            buf.extend_from_slice(&value.to_le_bytes());
        }
        memory.write_slice(&buf, GuestAddress(0x8000)).unwrap();
        b.read_stats(GuestAddress(0x8000), 30, false);
        b.read_stats(GuestAddress(0x8000), 29, false);
        b.read_stats(GuestAddress(0x8000), 30, true);
        assert_eq!(b.counters().refused, 3);
        let stats = b.guest_stats();
        assert_eq!(stats["stats"]["stat-free-memory"], 11);
        assert_eq!(stats["stats"]["stat-htlb-pgfail"], 22);
        assert_eq!(stats["stats"]["stat-swap-in"], u64::MAX);
        assert_eq!(stats["stats"].as_object().unwrap().len(), 10);
        assert_eq!(
            b.query(false).as_object().unwrap().len(),
            1,
            "no polling: actual only"
        );
        let info = b.query(true);
        assert_eq!(info["free_mem"], 11);
        assert!(
            info.get("mem_swapped_in").is_none(),
            "never reported: absent"
        );
        assert!(b.page_numbers(GuestAddress(0), 6).is_none(), "ragged list");
        assert!(b
            .page_numbers(GuestAddress(0), MAX_LIST_BYTES + 4)
            .is_none());
    }
}
