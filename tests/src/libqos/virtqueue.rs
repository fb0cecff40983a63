//! Split virtqueues (virtio 1.x, section 2.7) in guest RAM, driven from the test: a bump
//! allocator over guest RAM, the ring layout, adding descriptor chains, kicking, and
//! collecting used buffers.

use std::time::{Duration, Instant};

use super::GuestAccess;
use crate::qtest::QtestError;

/// Descriptor flags.
pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

/// Bytes of one descriptor and one used-ring element.
pub const DESC_SIZE: u64 = 16;
pub const USED_ELEM_SIZE: u64 = 8;
/// Largest split queue (the spec's limit).
pub const MAX_QUEUE_SIZE: u16 = 32768;

#[derive(Debug, thiserror::Error)]
pub enum VirtqueueError {
    #[error(transparent)]
    Qtest(#[from] QtestError),
    #[error("guest RAM allocator: no room for {size:#x} bytes aligned to {align:#x} (next {next:#x}, end {end:#x})")]
    OutOfMemory {
        size: u64,
        align: u64,
        next: u64,
        end: u64,
    },
    #[error("alignment {0:#x} is not a power of two")]
    BadAlign(u64),
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadQueueSize(u16),
    #[error("a descriptor chain needs at least one buffer")]
    EmptyChain,
    #[error("{need} descriptors needed, {free} free")]
    NoFreeDescriptors { need: usize, free: usize },
    #[error("the device returned id {id}, which is not the head of a chain in flight")]
    UnknownUsedId { id: u32 },
    #[error("the device moved used.idx from {last} to {now}: more than the {size} entries the ring holds")]
    UsedIdxJump { last: u16, now: u16, size: u16 },
    #[error("no used buffer on queue {queue} within {timeout:?}")]
    Timeout { queue: u16, timeout: Duration },
}

/// A bump allocator over guest RAM, for rings and buffers. Nothing is freed.
#[derive(Clone, Debug)]
pub struct GuestAlloc {
    next: u64,
    end: u64,
}

impl GuestAlloc {
    pub fn new(start: u64, end: u64) -> Self {
        Self { next: start, end }
    }

    /// RAM from 1 MiB up to the end of the RAM below the 32-bit hole, for a machine with
    /// `ram_size` bytes (the qtest machine loads nothing there).
    pub fn for_ram(ram_size: u64) -> Self {
        let low_end = vmm::memory::ram_ranges(ram_size)
            .first()
            .map(|r| r.guest_addr.0 + r.size)
            .unwrap_or(0);
        Self::new(vmm::arch::layout::HIMEM_START.0, low_end)
    }

    pub fn alloc(&mut self, size: u64, align: u64) -> Result<u64, VirtqueueError> {
        if !align.is_power_of_two() {
            return Err(VirtqueueError::BadAlign(align));
        }
        let oom = || VirtqueueError::OutOfMemory {
            size,
            align,
            next: self.next,
            end: self.end,
        };
        let addr = self.next.checked_next_multiple_of(align).ok_or_else(oom)?;
        let end = addr.checked_add(size).ok_or_else(oom)?;
        if end > self.end {
            return Err(oom());
        }
        self.next = end;
        Ok(addr)
    }
}

/// Sizes and alignments of the three parts of a split queue of `size` entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VringLayout {
    pub size: u16,
    pub desc_bytes: u64,
    pub avail_bytes: u64,
    pub used_bytes: u64,
}

impl VringLayout {
    pub const DESC_ALIGN: u64 = 16;
    pub const AVAIL_ALIGN: u64 = 2;
    pub const USED_ALIGN: u64 = 4;

    pub fn new(size: u16) -> Result<Self, VirtqueueError> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(VirtqueueError::BadQueueSize(size));
        }
        let n = u64::from(size);
        Ok(Self {
            size,
            desc_bytes: DESC_SIZE * n,
            // flags, idx, ring[n], used_event
            avail_bytes: 2 + 2 + 2 * n + 2,
            // flags, idx, ring[n] of (id, len), avail_event
            used_bytes: 2 + 2 + USED_ELEM_SIZE * n + 2,
        })
    }

    /// Offsets inside the driver (available) area.
    pub const AVAIL_FLAGS: u64 = 0;
    pub const AVAIL_IDX: u64 = 2;
    pub fn avail_ring_entry(&self, slot: u16) -> u64 {
        4 + 2 * u64::from(slot % self.size)
    }
    /// Offsets inside the device (used) area.
    pub const USED_FLAGS: u64 = 0;
    pub const USED_IDX: u64 = 2;
    pub fn used_ring_entry(&self, slot: u16) -> u64 {
        4 + USED_ELEM_SIZE * u64::from(slot % self.size)
    }
}

/// One descriptor as it sits in the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Descriptor {
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let le16 = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[0..8]);
        Self {
            addr: u64::from_le_bytes(addr),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            flags: le16(12),
            next: le16(14),
        }
    }
}

/// A buffer to put in a chain: driver-written (device reads) or device-writable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

impl Buffer {
    pub fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            device_writes: false,
        }
    }
    pub fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            device_writes: true,
        }
    }
}

/// A chain the device has finished with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// The head descriptor of the chain.
    pub id: u16,
    /// Bytes the device wrote into the chain's writable buffers.
    pub len: u32,
}

/// A split virtqueue owned by the test driver.
#[derive(Debug)]
pub struct Virtqueue {
    pub index: u16,
    pub layout: VringLayout,
    /// Guest addresses of the descriptor table, the driver area and the device area.
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Where a write of the queue index notifies the device (None: not set up for it).
    pub notify_addr: Option<u64>,
    free: Vec<u16>,
    /// For each head in flight, the descriptors of its chain.
    in_flight: Vec<Option<Vec<u16>>>,
    avail_idx: u16,
    last_used: u16,
}

impl Virtqueue {
    /// Allocate and zero the rings of a `size`-entry queue.
    pub fn new(
        g: &mut impl GuestAccess,
        alloc: &mut GuestAlloc,
        index: u16,
        size: u16,
    ) -> Result<Self, VirtqueueError> {
        let layout = VringLayout::new(size)?;
        let desc = alloc.alloc(layout.desc_bytes, VringLayout::DESC_ALIGN)?;
        let avail = alloc.alloc(layout.avail_bytes, VringLayout::AVAIL_ALIGN)?;
        let used = alloc.alloc(layout.used_bytes, VringLayout::USED_ALIGN)?;
        g.mem_write(desc, &vec![0; layout.desc_bytes as usize])?;
        g.mem_write(avail, &vec![0; layout.avail_bytes as usize])?;
        g.mem_write(used, &vec![0; layout.used_bytes as usize])?;
        Ok(Self {
            index,
            layout,
            desc,
            avail,
            used,
            notify_addr: None,
            // Pop from the end: descriptor 0 is used first.
            free: (0..size).rev().collect(),
            in_flight: vec![None; usize::from(size)],
            avail_idx: 0,
            last_used: 0,
        })
    }

    pub fn size(&self) -> u16 {
        self.layout.size
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Put a chain of `bufs` in the descriptor table and offer it in the available ring.
    /// Returns the head descriptor's index (the id the device will give back).
    pub fn add_chain(
        &mut self,
        g: &mut impl GuestAccess,
        bufs: &[Buffer],
    ) -> Result<u16, VirtqueueError> {
        if bufs.is_empty() {
            return Err(VirtqueueError::EmptyChain);
        }
        if bufs.len() > self.free.len() {
            return Err(VirtqueueError::NoFreeDescriptors {
                need: bufs.len(),
                free: self.free.len(),
            });
        }
        let split = self.free.len() - bufs.len();
        let mut ids: Vec<u16> = self.free.split_off(split);
        ids.reverse();
        for (i, (buf, id)) in bufs.iter().zip(&ids).enumerate() {
            let next = ids.get(i + 1).copied();
            let mut flags = 0;
            if buf.device_writes {
                flags |= VRING_DESC_F_WRITE;
            }
            if next.is_some() {
                flags |= VRING_DESC_F_NEXT;
            }
            let d = Descriptor {
                addr: buf.addr,
                len: buf.len,
                flags,
                next: next.unwrap_or(0),
            };
            g.mem_write(self.desc + DESC_SIZE * u64::from(*id), &d.to_bytes())?;
        }
        let head = ids[0];
        self.publish(g, head)?;
        self.in_flight[usize::from(head)] = Some(ids);
        Ok(head)
    }

    /// Offer a hand-made (possibly malformed) chain: `descs` go into free descriptors as
    /// they are, flags included, except that a `next` below `descs.len()` names the
    /// descriptor at that position in `descs` (so `next: 0` loops back to the head); a
    /// larger `next` is written unchanged. Returns the head's index.
    pub fn add_raw_chain(
        &mut self,
        g: &mut impl GuestAccess,
        descs: &[Descriptor],
    ) -> Result<u16, VirtqueueError> {
        if descs.is_empty() {
            return Err(VirtqueueError::EmptyChain);
        }
        if descs.len() > self.free.len() {
            return Err(VirtqueueError::NoFreeDescriptors {
                need: descs.len(),
                free: self.free.len(),
            });
        }
        let split = self.free.len() - descs.len();
        let mut ids: Vec<u16> = self.free.split_off(split);
        ids.reverse();
        for (d, id) in descs.iter().zip(&ids) {
            let next = ids.get(usize::from(d.next)).copied().unwrap_or(d.next);
            let d = Descriptor { next, ..*d };
            g.mem_write(self.desc + DESC_SIZE * u64::from(*id), &d.to_bytes())?;
        }
        let head = ids[0];
        self.publish(g, head)?;
        self.in_flight[usize::from(head)] = Some(ids);
        Ok(head)
    }

    /// Put `head` in the available ring, then move the index that publishes it (the ring
    /// entry is in place before the index).
    fn publish(&mut self, g: &mut impl GuestAccess, head: u16) -> Result<(), VirtqueueError> {
        let slot = self.layout.avail_ring_entry(self.avail_idx);
        g.mem_write(self.avail + slot, &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        g.mem_write(
            self.avail + VringLayout::AVAIL_IDX,
            &self.avail_idx.to_le_bytes(),
        )?;
        Ok(())
    }

    /// Tell the device there is work (a write of the queue index to its notify address).
    pub fn kick(&self, g: &mut impl GuestAccess) -> Result<(), VirtqueueError> {
        if let Some(addr) = self.notify_addr {
            g.mmio_write16(addr, self.index)?;
        }
        Ok(())
    }

    /// Ask the device not to interrupt for this queue (VRING_AVAIL_F_NO_INTERRUPT), or to.
    pub fn set_no_interrupt(
        &self,
        g: &mut impl GuestAccess,
        no_interrupt: bool,
    ) -> Result<(), VirtqueueError> {
        g.mem_write(
            self.avail + VringLayout::AVAIL_FLAGS,
            &u16::from(no_interrupt).to_le_bytes(),
        )?;
        Ok(())
    }

    /// The device's used.idx.
    pub fn used_idx(&self, g: &mut impl GuestAccess) -> Result<u16, VirtqueueError> {
        let mut b = [0u8; 2];
        g.mem_read(self.used + VringLayout::USED_IDX, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// The next used chain, if the device has returned one; its descriptors become free.
    pub fn pop_used(
        &mut self,
        g: &mut impl GuestAccess,
    ) -> Result<Option<UsedElem>, VirtqueueError> {
        let now = self.used_idx(g)?;
        if now == self.last_used {
            return Ok(None);
        }
        if now.wrapping_sub(self.last_used) > self.layout.size {
            return Err(VirtqueueError::UsedIdxJump {
                last: self.last_used,
                now,
                size: self.layout.size,
            });
        }
        let mut b = [0u8; 8];
        g.mem_read(
            self.used + self.layout.used_ring_entry(self.last_used),
            &mut b,
        )?;
        let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let chain = usize::try_from(id)
            .ok()
            .and_then(|i| self.in_flight.get_mut(i))
            .and_then(Option::take)
            .ok_or(VirtqueueError::UnknownUsedId { id })?;
        self.free.extend(chain.into_iter().rev());
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(UsedElem { id: id as u16, len }))
    }

    /// Poll until the device returns a chain, or `timeout`.
    pub fn wait_used(
        &mut self,
        g: &mut impl GuestAccess,
        timeout: Duration,
    ) -> Result<UsedElem, VirtqueueError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.pop_used(g)? {
                return Ok(e);
            }
            if Instant::now() >= deadline {
                return Err(VirtqueueError::Timeout {
                    queue: self.index,
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest RAM as a vector, with the notifications it received.
    struct FakeGuest {
        ram: Vec<u8>,
        notifies: Vec<(u64, u16)>,
    }

    impl FakeGuest {
        fn new(size: usize) -> Self {
            Self {
                ram: vec![0xa5; size],
                notifies: Vec::new(),
            }
        }
        fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, QtestError> {
            let start = usize::try_from(addr).unwrap_or(usize::MAX);
            match start.checked_add(len) {
                Some(end) if end <= self.ram.len() => Ok(start..end),
                _ => Err(QtestError::Fail {
                    command: format!("access {addr:#x}+{len:#x}"),
                    reason: "outside the fake RAM".into(),
                }),
            }
        }
        fn u16_at(&self, addr: u64) -> u16 {
            let a = addr as usize;
            u16::from_le_bytes([self.ram[a], self.ram[a + 1]])
        }
        fn desc(&self, table: u64, i: u16) -> Descriptor {
            let a = (table + DESC_SIZE * u64::from(i)) as usize;
            let mut b = [0u8; 16];
            b.copy_from_slice(&self.ram[a..a + 16]);
            Descriptor::from_bytes(&b)
        }
    }

    impl GuestAccess for FakeGuest {
        fn mem_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), QtestError> {
            let r = self.range(addr, buf.len())?;
            buf.copy_from_slice(&self.ram[r]);
            Ok(())
        }
        fn mem_write(&mut self, addr: u64, data: &[u8]) -> Result<(), QtestError> {
            let r = self.range(addr, data.len())?;
            self.ram[r].copy_from_slice(data);
            Ok(())
        }
        fn mmio_write16(&mut self, addr: u64, value: u16) -> Result<(), QtestError> {
            self.notifies.push((addr, value));
            Ok(())
        }
    }

    /// A device that, per available entry, walks the chain, writes `fill` into every
    /// writable buffer and returns the chain with the bytes written.
    struct FakeDevice {
        last_avail: u16,
        used_idx: u16,
    }

    impl FakeDevice {
        fn process(&mut self, g: &mut FakeGuest, vq: &Virtqueue, fill: u8) -> Vec<Vec<u8>> {
            let mut seen = Vec::new();
            let avail_idx = g.u16_at(vq.avail + VringLayout::AVAIL_IDX);
            while self.last_avail != avail_idx {
                let head = g.u16_at(vq.avail + vq.layout.avail_ring_entry(self.last_avail));
                self.last_avail = self.last_avail.wrapping_add(1);
                let mut i = head;
                let mut written = 0u32;
                let mut readable = Vec::new();
                loop {
                    let d = g.desc(vq.desc, i);
                    let r = d.addr as usize..d.addr as usize + d.len as usize;
                    if d.flags & VRING_DESC_F_WRITE != 0 {
                        g.ram[r].fill(fill);
                        written += d.len;
                    } else {
                        readable.extend_from_slice(&g.ram[r]);
                    }
                    if d.flags & VRING_DESC_F_NEXT == 0 {
                        break;
                    }
                    i = d.next;
                }
                seen.push(readable);
                let e = (vq.used + vq.layout.used_ring_entry(self.used_idx)) as usize;
                g.ram[e..e + 4].copy_from_slice(&u32::from(head).to_le_bytes());
                g.ram[e + 4..e + 8].copy_from_slice(&written.to_le_bytes());
                self.used_idx = self.used_idx.wrapping_add(1);
                let u = (vq.used + VringLayout::USED_IDX) as usize;
                g.ram[u..u + 2].copy_from_slice(&self.used_idx.to_le_bytes());
            }
            seen
        }
    }

    #[test]
    fn layout_math() {
        let l = VringLayout::new(256).unwrap();
        assert_eq!(l.desc_bytes, 4096);
        assert_eq!(l.avail_bytes, 6 + 512);
        assert_eq!(l.used_bytes, 6 + 2048);
        assert_eq!(l.avail_ring_entry(0), 4);
        assert_eq!(l.avail_ring_entry(257), 6);
        assert_eq!(l.used_ring_entry(1), 12);
        for bad in [0, 3, 100, 65535] {
            assert!(VringLayout::new(bad).is_err(), "{bad}");
        }
        assert!(VringLayout::new(32768).is_ok());
    }

    #[test]
    fn descriptor_encoding() {
        let d = Descriptor {
            addr: 0x1122_3344_5566_7788,
            len: 0x200,
            flags: VRING_DESC_F_NEXT | VRING_DESC_F_WRITE,
            next: 7,
        };
        let b = d.to_bytes();
        assert_eq!(
            b,
            [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0, 2, 0, 0, 3, 0, 7, 0]
        );
        assert_eq!(Descriptor::from_bytes(&b), d);
    }

    #[test]
    fn allocator_aligns_and_runs_out() {
        let mut a = GuestAlloc::new(0x1001, 0x3000);
        assert_eq!(a.alloc(0x10, 0x1000).unwrap(), 0x2000);
        assert_eq!(a.alloc(1, 1).unwrap(), 0x2010);
        assert_eq!(a.alloc(2, 2).unwrap(), 0x2012);
        assert!(a.alloc(0x1000, 1).is_err());
        assert!(matches!(a.alloc(1, 3), Err(VirtqueueError::BadAlign(3))));
        let r = GuestAlloc::for_ram(64 << 20);
        assert_eq!((r.next, r.end), (0x10_0000, 64 << 20));
    }

    #[test]
    fn chains_round_trip_through_a_device() {
        let mut g = FakeGuest::new(0x10000);
        let mut alloc = GuestAlloc::new(0x100, 0x10000);
        let mut vq = Virtqueue::new(&mut g, &mut alloc, 1, 4).unwrap();
        vq.notify_addr = Some(0xc000_3004);
        // The rings start zeroed.
        assert_eq!(g.u16_at(vq.avail + VringLayout::AVAIL_IDX), 0);
        assert_eq!(vq.used_idx(&mut g).unwrap(), 0);
        let req = alloc.alloc(16, 8).unwrap();
        let resp = alloc.alloc(32, 8).unwrap();
        g.mem_write(req, b"request-bytes-16").unwrap();
        let head = vq
            .add_chain(
                &mut g,
                &[Buffer::readable(req, 16), Buffer::writable(resp, 32)],
            )
            .unwrap();
        assert_eq!(head, 0);
        assert_eq!(vq.num_free(), 2);
        let d0 = g.desc(vq.desc, 0);
        assert_eq!(d0.flags, VRING_DESC_F_NEXT);
        assert_eq!(d0.next, 1);
        assert_eq!(g.desc(vq.desc, 1).flags, VRING_DESC_F_WRITE);
        vq.kick(&mut g).unwrap();
        assert_eq!(g.notifies, [(0xc000_3004, 1)]);
        assert_eq!(vq.pop_used(&mut g).unwrap(), None);

        let mut dev = FakeDevice {
            last_avail: 0,
            used_idx: 0,
        };
        assert_eq!(
            dev.process(&mut g, &vq, 0x5a),
            [b"request-bytes-16".to_vec()]
        );
        let used = vq.wait_used(&mut g, Duration::from_secs(1)).unwrap();
        assert_eq!(used, UsedElem { id: 0, len: 32 });
        assert_eq!(vq.num_free(), 4);
        let mut out = [0u8; 32];
        g.mem_read(resp, &mut out).unwrap();
        assert_eq!(out, [0x5a; 32]);

        // Many more round trips wrap the ring indices and reuse descriptors.
        for round in 0..10u8 {
            let a = vq.add_chain(&mut g, &[Buffer::writable(resp, 4)]).unwrap();
            let b = vq
                .add_chain(
                    &mut g,
                    &[
                        Buffer::readable(req, 1),
                        Buffer::readable(req, 2),
                        Buffer::writable(resp + 4, 4),
                    ],
                )
                .unwrap();
            assert!(matches!(
                vq.add_chain(
                    &mut g,
                    &[Buffer::readable(req, 1), Buffer::readable(req, 1)]
                ),
                Err(VirtqueueError::NoFreeDescriptors { need: 2, free: 0 })
            ));
            assert_eq!(dev.process(&mut g, &vq, round).len(), 2);
            assert_eq!(
                vq.pop_used(&mut g).unwrap(),
                Some(UsedElem { id: a, len: 4 })
            );
            assert_eq!(
                vq.pop_used(&mut g).unwrap(),
                Some(UsedElem { id: b, len: 4 })
            );
            assert_eq!(vq.pop_used(&mut g).unwrap(), None);
        }
        assert_eq!(vq.num_free(), 4);
        assert!(matches!(
            vq.add_chain(&mut g, &[]),
            Err(VirtqueueError::EmptyChain)
        ));
    }

    #[test]
    fn raw_chains_keep_their_flags_and_relative_links() {
        let mut g = FakeGuest::new(0x10000);
        let mut alloc = GuestAlloc::new(0x100, 0x10000);
        let mut vq = Virtqueue::new(&mut g, &mut alloc, 0, 4).unwrap();
        let d = |flags, next| Descriptor {
            addr: 0x8000,
            len: 16,
            flags,
            next,
        };
        // A loop back to the head, then a link beyond the table.
        let head = vq
            .add_raw_chain(
                &mut g,
                &[
                    d(VRING_DESC_F_NEXT, 1),
                    d(VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 0),
                ],
            )
            .unwrap();
        assert_eq!(head, 0);
        assert_eq!(g.desc(vq.desc, 0).next, 1);
        assert_eq!(g.desc(vq.desc, 1).next, 0);
        assert_eq!(
            g.desc(vq.desc, 1).flags,
            VRING_DESC_F_NEXT | VRING_DESC_F_WRITE
        );
        let second = vq
            .add_raw_chain(&mut g, &[d(VRING_DESC_F_NEXT, 0x7fff)])
            .unwrap();
        assert_eq!(g.desc(vq.desc, second).next, 0x7fff);
        assert_eq!(g.u16_at(vq.avail + VringLayout::AVAIL_IDX), 2);
        assert_eq!(g.u16_at(vq.avail + vq.layout.avail_ring_entry(1)), second);
        assert_eq!(vq.num_free(), 1);
        assert!(matches!(
            vq.add_raw_chain(&mut g, &[d(0, 0), d(0, 0)]),
            Err(VirtqueueError::NoFreeDescriptors { need: 2, free: 1 })
        ));
    }

    #[test]
    fn a_misbehaving_device_is_reported() {
        let mut g = FakeGuest::new(0x10000);
        let mut alloc = GuestAlloc::new(0x100, 0x10000);
        let mut vq = Virtqueue::new(&mut g, &mut alloc, 0, 8).unwrap();
        // used.idx moves, but the element names a descriptor that was never offered.
        let e = (vq.used + vq.layout.used_ring_entry(0)) as usize;
        g.ram[e..e + 4].copy_from_slice(&5u32.to_le_bytes());
        g.mem_write(vq.used + VringLayout::USED_IDX, &1u16.to_le_bytes())
            .unwrap();
        assert!(matches!(
            vq.pop_used(&mut g),
            Err(VirtqueueError::UnknownUsedId { id: 5 })
        ));
        g.mem_write(vq.used + VringLayout::USED_IDX, &100u16.to_le_bytes())
            .unwrap();
        assert!(matches!(
            vq.pop_used(&mut g),
            Err(VirtqueueError::UsedIdxJump { .. })
        ));
        assert!(matches!(
            vq.wait_used(&mut FakeGuest::new(0x10), Duration::from_millis(5)),
            Err(VirtqueueError::Qtest(_))
        ));
    }
}
