//! Interrupt messages between APICs. Each vCPU thread owns its local APIC; everything that
//! wants to interrupt a vCPU (IOAPIC, MSIs, other vCPUs' IPIs) posts into that vCPU's
//! [`ApicInbox`] with atomics, and the owning thread drains the inbox into its APIC state.
//! The router also keeps what routing needs from each local APIC (enabled, x2APIC mode,
//! logical destination registers), published by the APIC itself.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Instant;

/// Where a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// One APIC by id; 0xff (with at most 255 CPUs) and 0xffff_ffff mean every APIC.
    Physical(u32),
    /// APICs whose logical destination register matches (flat/cluster xAPIC, x2APIC
    /// cluster); 0xff / 0xffff_ffff mean every APIC.
    Logical(u32),
    /// Every APIC including the sender.
    AllIncludingSelf,
    /// Every APIC except `source`.
    AllExcludingSelf { source: u32 },
    /// Only `source` (the sender).
    OnlySelf { source: u32 },
}

/// How the target handles a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryMode {
    Fixed,
    /// Delivered to the lowest-numbered matching APIC.
    LowestPriority,
    /// Ignored: there is no SMM.
    Smi,
    Nmi,
    Init,
    /// Start-up IPI; the vector is the start page number.
    StartUp,
    /// The 8259's vector is fetched by the CPU (INTA to the PIC).
    ExtInt,
}

/// One interrupt message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApicMessage {
    pub dest: Destination,
    pub mode: DeliveryMode,
    pub vector: u8,
    /// Level-triggered fixed interrupt: the target's EOI is reported back to the IOAPIC.
    pub level_triggered: bool,
}

impl ApicMessage {
    /// Decode a message-signalled interrupt: a device's 32-bit write of `data` to `address`
    /// in the 0xFEE0_0000 window (Intel SDM vol. 3, 11.11). `None` if the address is not an
    /// interrupt message or the delivery mode is reserved.
    pub fn from_msi(address: u64, data: u32) -> Option<Self> {
        if address >> 20 != 0xfee {
            return None;
        }
        let dest_id = ((address >> 12) & 0xff) as u32;
        let logical = address & (1 << 2) != 0;
        let mode = match (data >> 8) & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            7 => DeliveryMode::ExtInt,
            _ => return None,
        };
        Some(ApicMessage {
            dest: if logical {
                Destination::Logical(dest_id)
            } else {
                Destination::Physical(dest_id)
            },
            mode,
            vector: data as u8,
            level_triggered: data & (1 << 15) != 0,
        })
    }
}

/// What the owning LAPIC takes out of its inbox in one go.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InboxContents {
    /// Fixed vectors, one bit each.
    pub fixed: [u64; 4],
    /// Of those, the level-triggered ones.
    pub level: [u64; 4],
    pub nmi: bool,
    pub init: bool,
    pub sipi: Option<u8>,
    pub extint: bool,
}

/// Pending SIPI marker bit in [`ApicInbox::sipi`] (the low byte holds the vector).
const SIPI_PENDING: u32 = 0x100;

/// The pending-message mailbox of one vCPU, written by any thread and drained by the owner.
#[derive(Default)]
pub struct ApicInbox {
    fixed: [AtomicU64; 4],
    level: [AtomicU64; 4],
    nmi: AtomicBool,
    init: AtomicBool,
    sipi: AtomicU32,
    extint: AtomicBool,
    /// The PIC's INTR output as wired to LINT0 (a level, not a message).
    extint_line: AtomicBool,
    has_work: AtomicBool,
    kicked: AtomicBool,
    sleeping: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl ApicInbox {
    pub fn new() -> Self {
        Self::default()
    }

    /// Something was posted since the owner last drained the inbox.
    pub fn has_work(&self) -> bool {
        self.has_work.load(Ordering::Acquire)
    }

    /// Sleeps (HLT) until a message arrives, [`ApicInbox::kick`] is called or `deadline`
    /// passes. A kick that came while the vCPU was not waiting makes the next wait return at
    /// once, so a stop request can never be lost between the check and the sleep.
    pub fn wait(&self, deadline: Option<Instant>) {
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.sleeping.store(true, Ordering::SeqCst);
        loop {
            if self.has_work.load(Ordering::SeqCst) || self.kicked.swap(false, Ordering::SeqCst) {
                break;
            }
            match deadline {
                None => guard = self.wake.wait(guard).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    guard = self
                        .wake
                        .wait_timeout(guard, deadline - now)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
        }
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// Wakes the vCPU from [`ApicInbox::wait`] (or makes its next wait return at once).
    pub fn kick(&self) {
        self.kicked.store(true, Ordering::SeqCst);
        self.wake_sleeper();
    }

    fn wake_sleeper(&self) {
        // The waiter sets `sleeping` before checking for work under the lock; taking the lock
        // here means the notify cannot fall between its check and its sleep.
        if self.sleeping.load(Ordering::SeqCst) {
            let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_all();
        }
    }

    fn signal(&self) {
        self.has_work.store(true, Ordering::SeqCst);
        self.wake_sleeper();
    }

    /// Posts a message for this vCPU (the router has already decided it is a target).
    pub fn post(&self, mode: DeliveryMode, vector: u8, level_triggered: bool) {
        match mode {
            DeliveryMode::Fixed | DeliveryMode::LowestPriority => {
                let word = usize::from(vector >> 6);
                let bit = 1u64 << (vector & 63);
                if level_triggered {
                    self.level[word].fetch_or(bit, Ordering::SeqCst);
                } else {
                    self.level[word].fetch_and(!bit, Ordering::SeqCst);
                }
                self.fixed[word].fetch_or(bit, Ordering::SeqCst);
            }
            DeliveryMode::Smi => return,
            DeliveryMode::Nmi => self.nmi.store(true, Ordering::SeqCst),
            DeliveryMode::Init => self.init.store(true, Ordering::SeqCst),
            DeliveryMode::StartUp => self
                .sipi
                .store(SIPI_PENDING | u32::from(vector), Ordering::SeqCst),
            DeliveryMode::ExtInt => self.extint.store(true, Ordering::SeqCst),
        }
        self.signal();
    }

    /// Sets the level of the 8259's INTR output on this CPU's LINT0 (only the BSP's is
    /// wired). A rising level wakes the vCPU.
    pub fn set_extint_line(&self, level: bool) {
        let old = self.extint_line.swap(level, Ordering::SeqCst);
        if level && !old {
            self.signal();
        }
    }

    /// The current level of the 8259's INTR on LINT0.
    pub fn extint_line(&self) -> bool {
        self.extint_line.load(Ordering::SeqCst)
    }

    /// Takes everything posted so far (owner thread only).
    pub fn take(&self) -> InboxContents {
        // Clear the flag first: a message posted meanwhile sets it again after its bits.
        self.has_work.store(false, Ordering::SeqCst);
        let mut out = InboxContents::default();
        for i in 0..4 {
            out.fixed[i] = self.fixed[i].swap(0, Ordering::SeqCst);
            out.level[i] = self.level[i].load(Ordering::SeqCst) & out.fixed[i];
        }
        out.nmi = self.nmi.swap(false, Ordering::SeqCst);
        out.init = self.init.swap(false, Ordering::SeqCst);
        let sipi = self.sipi.swap(0, Ordering::SeqCst);
        out.sipi = (sipi & SIPI_PENDING != 0).then_some(sipi as u8);
        out.extint = self.extint.swap(false, Ordering::SeqCst);
        out
    }
}

/// What routing needs to know about one local APIC.
#[derive(Default)]
struct ApicRouting {
    /// Hardware-enabled (IA32_APIC_BASE bit 11): a disabled APIC accepts nothing.
    enabled: AtomicBool,
    x2apic: AtomicBool,
    ldr: AtomicU32,
    dfr: AtomicU32,
}

type EoiListener = Box<dyn Fn(u8) + Send + Sync>;

/// Routes [`ApicMessage`]s to the inboxes of the vCPUs they address.
pub struct ApicRouter {
    inboxes: Vec<Arc<ApicInbox>>,
    routing: Vec<ApicRouting>,
    eoi_listener: RwLock<Option<EoiListener>>,
}

impl ApicRouter {
    /// A router for `num_cpus` vCPUs with APIC ids 0..num_cpus.
    pub fn new(num_cpus: usize) -> Arc<Self> {
        let num_cpus = num_cpus.max(1);
        Arc::new(Self {
            inboxes: (0..num_cpus).map(|_| Arc::new(ApicInbox::new())).collect(),
            routing: (0..num_cpus)
                .map(|_| ApicRouting {
                    enabled: AtomicBool::new(true),
                    x2apic: AtomicBool::new(false),
                    ldr: AtomicU32::new(0),
                    dfr: AtomicU32::new(0xffff_ffff),
                })
                .collect(),
            eoi_listener: RwLock::new(None),
        })
    }

    pub fn num_cpus(&self) -> usize {
        self.inboxes.len()
    }

    /// The inbox of APIC `apic_id`; ids past the end share the last inbox rather than panic.
    pub fn inbox(&self, apic_id: u32) -> Arc<ApicInbox> {
        let index = (apic_id as usize).min(self.inboxes.len() - 1);
        self.inboxes[index].clone()
    }

    /// Publishes a local APIC's routing state (called by the APIC when it changes).
    pub fn update_apic(&self, apic_id: u32, enabled: bool, x2apic: bool, ldr: u32, dfr: u32) {
        if let Some(r) = self.routing.get(apic_id as usize) {
            r.enabled.store(enabled, Ordering::SeqCst);
            r.x2apic.store(x2apic, Ordering::SeqCst);
            r.ldr.store(ldr, Ordering::SeqCst);
            r.dfr.store(dfr, Ordering::SeqCst);
        }
    }

    /// Whether APIC `id` matches logical destination `dest`.
    fn logical_match(&self, id: usize, dest: u32) -> bool {
        let r = &self.routing[id];
        let ldr = r.ldr.load(Ordering::SeqCst);
        if r.x2apic.load(Ordering::SeqCst) {
            if dest == 0xffff_ffff {
                return true;
            }
            // x2APIC cluster: high 16 bits cluster id, low 16 bits member mask.
            return (dest >> 16) == (ldr >> 16) && (dest & ldr & 0xffff) != 0;
        }
        let dest = dest & 0xff;
        if dest == 0xff {
            return true;
        }
        let logical_id = ldr >> 24;
        if r.dfr.load(Ordering::SeqCst) >> 28 == 0xf {
            // Flat model: one bit per APIC.
            logical_id & dest != 0
        } else {
            // Cluster model: high nibble cluster, low nibble member mask.
            (logical_id >> 4) == (dest >> 4) && (logical_id & dest & 0xf) != 0
        }
    }

    /// The APIC ids a message addresses, in increasing order.
    fn targets(&self, dest: Destination) -> Vec<usize> {
        let n = self.inboxes.len();
        let enabled = |i: &usize| self.routing[*i].enabled.load(Ordering::SeqCst);
        match dest {
            Destination::Physical(id) => {
                // 0xff is the xAPIC broadcast id, and also what the IOAPIC's 8-bit field
                // sends to x2APIC CPUs; it only names a CPU when there are more than 255.
                let broadcast = id == 0xffff_ffff || (id == 0xff && n <= 0xff);
                (0..n)
                    .filter(enabled)
                    .filter(|&i| broadcast || id as usize == i)
                    .collect()
            }
            Destination::Logical(mask) => (0..n)
                .filter(enabled)
                .filter(|&i| self.logical_match(i, mask))
                .collect(),
            Destination::AllIncludingSelf => (0..n).filter(enabled).collect(),
            Destination::AllExcludingSelf { source } => (0..n)
                .filter(enabled)
                .filter(|&i| i != source as usize)
                .collect(),
            Destination::OnlySelf { source } => (0..n)
                .filter(|&i| i == source as usize)
                .filter(enabled)
                .collect(),
        }
    }

    /// Delivers a message to every APIC it addresses (lowest priority: to the lowest id).
    pub fn deliver(&self, msg: ApicMessage) {
        if msg.mode == DeliveryMode::Smi {
            return;
        }
        let targets = self.targets(msg.dest);
        let chosen: &[usize] = if msg.mode == DeliveryMode::LowestPriority {
            &targets[..targets.len().min(1)]
        } else {
            &targets
        };
        let level = msg.level_triggered
            && matches!(msg.mode, DeliveryMode::Fixed | DeliveryMode::LowestPriority);
        for &i in chosen {
            self.inboxes[i].post(msg.mode, msg.vector, level);
        }
    }

    /// Registers the callback for EOIs of level-triggered vectors (the IOAPIC's remote IRR).
    pub fn set_eoi_listener(&self, f: Box<dyn Fn(u8) + Send + Sync>) {
        let mut slot = self.eoi_listener.write().unwrap_or_else(|p| p.into_inner());
        *slot = Some(f);
    }

    /// A local APIC finished a level-triggered vector.
    pub fn end_of_interrupt(&self, vector: u8) {
        let slot = self.eoi_listener.read().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = slot.as_ref() {
            f(vector);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn fixed(dest: Destination, vector: u8) -> ApicMessage {
        ApicMessage {
            dest,
            mode: DeliveryMode::Fixed,
            vector,
            level_triggered: false,
        }
    }

    #[test]
    fn msi_messages_decode_as_linux_writes_them() {
        // Linux: address 0xfee0_0000 | dest << 12, data = vector (fixed, edge).
        let msg = ApicMessage::from_msi(0xfee0_1000, 0x0041);
        assert_eq!(msg, Some(fixed(Destination::Physical(1), 0x41)));
        let logical = ApicMessage::from_msi(0xfee0_1004, 0x0141);
        assert_eq!(logical.map(|m| m.dest), Some(Destination::Logical(1)));
        assert_eq!(logical.map(|m| m.mode), Some(DeliveryMode::LowestPriority));
        assert_eq!(ApicMessage::from_msi(0x1000, 0x41), None);
        assert_eq!(ApicMessage::from_msi(0xfee0_0000, 0x0341), None);
    }

    #[test]
    fn physical_and_broadcast_delivery() {
        let router = ApicRouter::new(3);
        router.deliver(fixed(Destination::Physical(1), 0x40));
        assert!(!router.inbox(0).has_work());
        assert!(router.inbox(1).has_work());
        let got = router.inbox(1).take();
        assert_eq!(got.fixed[1], 1);
        assert!(!router.inbox(1).has_work());

        router.deliver(fixed(Destination::Physical(0xff), 0x41));
        for i in 0..3 {
            assert_eq!(router.inbox(i).take().fixed[1], 2);
        }
        router.deliver(fixed(Destination::AllExcludingSelf { source: 1 }, 0x42));
        assert!(router.inbox(0).has_work() && router.inbox(2).has_work());
        assert!(!router.inbox(1).has_work());
    }

    #[test]
    fn logical_flat_cluster_and_lowest_priority() {
        let router = ApicRouter::new(3);
        router.update_apic(0, true, false, 1 << 24, 0xffff_ffff);
        router.update_apic(1, true, false, 2 << 24, 0xffff_ffff);
        router.update_apic(2, true, false, 4 << 24, 0xffff_ffff);
        router.deliver(fixed(Destination::Logical(0x6), 0x50));
        assert!(!router.inbox(0).has_work());
        assert!(router.inbox(1).take().fixed[1] & (1 << 0x10) != 0);
        assert!(router.inbox(2).take().fixed[1] & (1 << 0x10) != 0);

        router.deliver(ApicMessage {
            mode: DeliveryMode::LowestPriority,
            ..fixed(Destination::Logical(0x6), 0x51)
        });
        assert!(router.inbox(1).has_work() && !router.inbox(2).has_work());
        router.inbox(1).take();

        router.update_apic(2, true, false, 0x21 << 24, 0x0fff_ffff);
        router.deliver(fixed(Destination::Logical(0x23), 0x52));
        assert!(router.inbox(2).has_work());
        // x2APIC cluster: cluster 0, member bit 1.
        router.update_apic(1, true, true, 0x2, 0);
        router.inbox(1).take();
        router.deliver(fixed(Destination::Logical(0x0000_0002), 0x53));
        assert!(router.inbox(1).has_work());
    }

    #[test]
    fn disabled_apic_receives_nothing_and_special_modes() {
        let router = ApicRouter::new(2);
        router.update_apic(1, false, false, 0, 0xffff_ffff);
        router.deliver(fixed(Destination::AllIncludingSelf, 0x30));
        assert!(!router.inbox(1).has_work());
        router.inbox(0).take();
        router.deliver(ApicMessage {
            mode: DeliveryMode::StartUp,
            ..fixed(Destination::Physical(0), 0x9a)
        });
        router.deliver(ApicMessage {
            mode: DeliveryMode::Nmi,
            ..fixed(Destination::Physical(0), 0)
        });
        let got = router.inbox(0).take();
        assert_eq!(got.sipi, Some(0x9a));
        assert!(got.nmi && !got.init);
        router.deliver(ApicMessage {
            mode: DeliveryMode::Smi,
            ..fixed(Destination::Physical(0), 0)
        });
        assert!(!router.inbox(0).has_work());
    }

    #[test]
    fn wait_wakes_on_post_kick_and_deadline() {
        let router = ApicRouter::new(1);
        let inbox = router.inbox(0);
        let start = Instant::now();
        inbox.wait(Some(start + Duration::from_millis(5)));
        assert!(start.elapsed() >= Duration::from_millis(5));

        let r2 = router.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            r2.deliver(fixed(Destination::Physical(0), 0x20));
        });
        inbox.wait(None);
        assert!(inbox.has_work());
        t.join().unwrap();
        inbox.take();

        inbox.kick();
        inbox.wait(None);
        assert!(!inbox.has_work());
    }

    #[test]
    fn eoi_listener_gets_level_vectors() {
        let router = ApicRouter::new(1);
        let seen = Arc::new(AtomicU32::new(0));
        let s = seen.clone();
        router.set_eoi_listener(Box::new(move |v| s.store(u32::from(v), Ordering::SeqCst)));
        router.end_of_interrupt(0x61);
        assert_eq!(seen.load(Ordering::SeqCst), 0x61);
    }
}
