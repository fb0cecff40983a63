//! `virtio-balloon-pci`: the guest gives pages back (inflate), takes them again (deflate),
//! reports its memory statistics, and with free page reporting hands idle memory back on
//! its own. It lives in the vmm: its work is reading page numbers out of guest memory and
//! punching those pages out of the guest-RAM memfd, which the vmm holds anyway; a device
//! process would add a vhost-user hop and the memfd's write access, and sandbox nothing.
//!
//! Released pages leave the host at once (the memfd's pages, for every process that maps
//! it) and read as zeroes when the guest touches them again; deflating needs no work.
//! Page numbers outside RAM are ignored and counted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use qmp::EventSender;
use serde_json::{json, Map, Value};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{Activation, QueueSetup, VirtioBackend, VirtioError};
use crate::memory::{release_pages, GuestMemoryMmap};

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

/// The guest's statistics tags and the names query-balloon gives them (the seed's).
const STAT_NAMES: [(u16, &str); 6] = [
    (0, "mem_swapped_in"),
    (1, "mem_swapped_out"),
    (2, "major_page_faults"),
    (3, "minor_page_faults"),
    (4, "free_mem"),
    (5, "total_mem"),
];

/// What the balloon counts, for queries and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Bytes punched out of the memfd (inflate and free page reporting).
    pub released: u64,
    /// Pages the guest took back.
    pub deflated: u64,
    /// Page numbers and ranges outside RAM, or buffers that could not be read.
    pub refused: u64,
}

struct ActiveQueue {
    queue: Queue,
    call: EventFd,
}

pub struct VirtioBalloon {
    memory: GuestMemoryMmap,
    ram_size: u64,
    deflate_on_oom: bool,
    reporting: bool,
    features: u64,
    /// The target the vmm set, and what the guest says it holds, in balloon pages.
    num_pages: u32,
    actual: u32,
    queues: BTreeMap<usize, ActiveQueue>,
    /// The stats buffer the guest gave, held until new figures are wanted.
    stats_head: Option<u16>,
    stats: Option<Vec<(u16, u64)>>,
    counters: BalloonCounters,
    events: Arc<Mutex<EventSender>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl VirtioBalloon {
    pub fn new(
        memory: GuestMemoryMmap,
        deflate_on_oom: bool,
        reporting: bool,
        events: Arc<Mutex<EventSender>>,
    ) -> Self {
        let ram_size = memory.iter().map(|r| r.len()).sum();
        VirtioBalloon {
            memory,
            ram_size,
            deflate_on_oom,
            reporting,
            features: 0,
            num_pages: 0,
            actual: 0,
            queues: BTreeMap::new(),
            stats_head: None,
            stats: None,
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

    /// The guest's RAM as the balloon leaves it, in bytes (query-balloon's `actual`).
    pub fn actual(&self) -> u64 {
        self.ram_size - u64::from(self.actual) * BALLOON_PAGE
    }

    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

    /// query-balloon: `actual`, and the guest's last statistics. A stats buffer the guest
    /// gave is handed back, so that it reports again for the next query.
    pub fn query(&mut self) -> Value {
        let mut info = Map::new();
        info.insert("actual".into(), json!(self.actual()));
        if let Some(stats) = &self.stats {
            for (tag, name) in STAT_NAMES {
                if let Some((_, v)) = stats.iter().find(|(t, _)| *t == tag) {
                    info.insert(name.into(), json!(v));
                }
            }
        }
        self.request_stats();
        Value::Object(info)
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
    fn request_stats(&mut self) {
        let Some(head) = self.stats_head.take() else {
            return;
        };
        if let Some(q) = self.queues.get_mut(&STATS) {
            if q.queue.add_used(&self.memory, head, 0).is_ok() {
                let _ = q.call.write(1);
            }
        }
    }

    /// Page frame numbers (le32, in balloon pages) of one inflate or deflate buffer.
    fn page_numbers(&self, addr: GuestAddress, len: u32) -> Option<Vec<u32>> {
        let mut bytes = vec![0u8; len as usize / 4 * 4];
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
            Ok(n) => self.counters.released += n,
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
                    for d in descs.iter().filter(|d| !d.is_write_only()) {
                        match self.page_numbers(d.addr(), d.len()) {
                            Some(p) => pfns.extend(p),
                            None => self.counters.refused += 1,
                        }
                    }
                    if index == INFLATE {
                        self.inflate(pfns);
                    } else {
                        self.counters.deflated += pfns.len() as u64;
                    }
                }
                STATS => {
                    let mut stats = Vec::new();
                    for d in descs.iter().filter(|d| !d.is_write_only()) {
                        let mut bytes = vec![0u8; d.len() as usize / 10 * 10];
                        if memory.read_slice(&mut bytes, d.addr()).is_err() {
                            self.counters.refused += 1;
                            continue;
                        }
                        for e in bytes.chunks_exact(10) {
                            let tag = u16::from_le_bytes([e[0], e[1]]);
                            let mut v = [0u8; 8];
                            v.copy_from_slice(&e[2..10]);
                            stats.push((tag, u64::from_le_bytes(v)));
                        }
                    }
                    self.stats = Some(stats);
                    // Held: given back when new figures are wanted.
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
                        if memory.address_in_range(d.addr()) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_clamped_and_actual_is_reported() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let events = Arc::new(Mutex::new(EventSender::default()));
        let mut b = VirtioBalloon::new(memory, false, true, events);
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
        assert_eq!(b.query()["actual"], (12u64 << 20));
        assert_eq!(b.num_queues(), 4);
        assert_ne!(b.features() & (1 << VIRTIO_BALLOON_F_REPORTING), 0);
    }
}
