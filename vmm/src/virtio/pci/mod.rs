//! The modern virtio-pci transport (virtio 1.x, 4.1): a PCI function whose vendor-specific
//! capabilities point the driver at the common configuration, notification, ISR and device
//! configuration structures in BAR 4, with an MSI-X table and pending bits in the same BAR
//! and INTx as the fallback.
//!
//! Guest notifications never reach this code on the fast path: each queue's notify address
//! is an ioeventfd that the accelerator signals directly, and the backend reads it.

use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::{CallRelay, VirtioInterrupt, VIRTIO_MSI_NO_VECTOR};
use super::msix::{MsiMessage, MSIX_ENABLE, MSIX_FUNCTION_MASK};
use super::{Activation, QueueSetup, VirtioBackend, VirtioError, VIRTIO_F_VERSION_1};
use crate::accel::{Accelerator, IoEventAddress};
use crate::devices::IrqLine;
use crate::pci::configuration::{PciConfiguration, PciIdentity};
use crate::pci::device::{BarReprogram, PciBar, PciBarKind, PciDevice, PciInterruptPin};

const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device ids are 0x1040 + the virtio device id.
const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;

/// The BAR holding every structure.
const BAR_INDEX: usize = 4;
const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const COMMON_SIZE: u64 = 0x38;
const ISR_OFFSET: u64 = 0x1000;
const ISR_SIZE: u64 = 1;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_SIZE: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
/// Each queue's notify address is `NOTIFY_OFFSET + queue * NOTIFY_MULTIPLIER`.
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;
/// As many table entries (16 bytes each) as fit below the PBA.
pub const MAX_MSIX_VECTORS: u16 = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / 16) as u16;

/// Capability ids and virtio capability types.
const PCI_CAP_ID_VENDOR: u8 = 0x09;
const PCI_CAP_ID_MSIX: u8 = 0x11;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

/// Device status bits (virtio 1.x, 2.1) that the device acts on.
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error("cannot build the configuration space: {0}")]
    Configuration(#[from] crate::pci::configuration::ConfigurationError),
    #[error("cannot create a queue eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

mod snapshot;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the driver programmed for one queue.
#[derive(Clone, Copy, Debug)]
struct QueueState {
    /// Reads as the device's maximum until the driver picks a (smaller) size.
    size: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueState {
    fn new(max_size: u16) -> Self {
        QueueState {
            size: max_size,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// A queue's call eventfd wired to an MSI route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DirectRoute {
    gsi: u32,
    msg: MsiMessage,
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice {
    name: String,
    id: Option<String>,
    config: PciConfiguration,
    /// None: no MSI-X (`vectors=0`), interrupts are INTx.
    msix_cap_offset: Option<usize>,
    backend: Box<dyn VirtioBackend>,
    accel: Arc<dyn Accelerator>,
    memory: GuestMemoryMmap,
    interrupt: Arc<Mutex<VirtioInterrupt>>,
    /// Relays the call eventfds of active queues that have no direct route.
    relay: Option<CallRelay>,
    /// Per queue: the accelerator's MSI route its call eventfd is an irqfd on, when its
    /// vector is deliverable and the accelerator has routes. Such queues interrupt the
    /// guest with no vmm thread involved.
    routes: Vec<Option<DirectRoute>>,
    /// Queues the driver started (for the relay and routes).
    active: Vec<bool>,
    /// One kick and one call eventfd per queue, for the device's lifetime: a backend that
    /// restarts gets the same ones.
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    /// Where BAR 4 is decoded, while it is (the kicks are registered there).
    bar_address: Option<u64>,
    queues: Vec<QueueState>,
    /// Per queue: the largest size the driver may give it.
    queue_max_sizes: Vec<u16>,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    config_generation: u8,
}

impl VirtioPciDevice {
    /// A function for `backend`; `name` is for logs, `id` the user's device id.
    /// `msix_vectors`: the MSI-X table's size (`vectors=`; 0 for none, at most
    /// [`MAX_MSIX_VECTORS`]), by default one per queue and one for configuration changes.
    pub fn new(
        name: &str,
        id: Option<String>,
        backend: Box<dyn VirtioBackend>,
        accel: Arc<dyn Accelerator>,
        memory: GuestMemoryMmap,
        class: (u8, u8),
        msix_vectors: Option<u16>,
    ) -> Result<Self, VirtioPciError> {
        let device_type = backend.device_type();
        let num_queues = backend.num_queues();
        let mut config = PciConfiguration::new(
            PciIdentity {
                vendor_id: VIRTIO_PCI_VENDOR_ID,
                device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type,
                revision_id: 1,
                class_code: class.0,
                subclass: class.1,
                prog_if: 0,
                subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
                subsystem_id: 0x1100,
            },
            PciInterruptPin::IntA,
        );
        config.add_bar(PciBar {
            index: BAR_INDEX,
            kind: PciBarKind::Mmio64,
            size: BAR_SIZE,
            prefetchable: false,
        })?;
        let queue_max_sizes: Vec<u16> = (0..num_queues).map(|q| backend.queue_size(q)).collect();
        // One vector per queue plus the configuration vector unless told otherwise.
        let vectors = msix_vectors
            .unwrap_or(num_queues as u16 + 1)
            .min(MAX_MSIX_VECTORS);
        let interrupt = VirtioInterrupt::new(num_queues, vectors, accel.clone());
        let msix_cap_offset = if vectors == 0 {
            None
        } else {
            // MSI-X first, as QEMU lists it: the virtio capabilities follow.
            let mut msix = vec![PCI_CAP_ID_MSIX, 0];
            msix.extend_from_slice(&(vectors - 1).to_le_bytes());
            msix.extend_from_slice(&(MSIX_TABLE_OFFSET as u32 | BAR_INDEX as u32).to_le_bytes());
            msix.extend_from_slice(&(MSIX_PBA_OFFSET as u32 | BAR_INDEX as u32).to_le_bytes());
            let mut msix_mask = vec![0u8; msix.len()];
            msix_mask[3] = ((MSIX_ENABLE | MSIX_FUNCTION_MASK) >> 8) as u8;
            Some(config.add_capability_with_mask(&msix, &msix_mask)?)
        };
        for (cfg_type, offset, length) in [
            (VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_SIZE),
            (VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE),
            (VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_SIZE),
        ] {
            config.add_capability(&virtio_cap(cfg_type, offset, length, None))?;
        }
        let notify_len = num_queues as u64 * u64::from(NOTIFY_MULTIPLIER);
        config.add_capability(&virtio_cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            NOTIFY_OFFSET,
            notify_len.max(u64::from(NOTIFY_MULTIPLIER)),
            Some(NOTIFY_MULTIPLIER),
        ))?;
        let new_fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioPciError::EventFd);
        let kicks = (0..num_queues)
            .map(|_| new_fd())
            .collect::<Result<_, _>>()?;
        let calls = (0..num_queues)
            .map(|_| new_fd())
            .collect::<Result<_, _>>()?;
        Ok(VirtioPciDevice {
            name: name.to_string(),
            id,
            config,
            msix_cap_offset,
            backend,
            accel,
            memory,
            interrupt: Arc::new(Mutex::new(interrupt)),
            relay: None,
            routes: vec![None; num_queues],
            active: vec![false; num_queues],
            kicks,
            calls,
            bar_address: None,
            queues: queue_max_sizes
                .iter()
                .map(|&m| QueueState::new(m))
                .collect(),
            queue_max_sizes,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            config_generation: 0,
        })
    }

    /// The driver set DRIVER_OK (and has not reset the device since).
    pub fn is_active(&self) -> bool {
        self.status & STATUS_DRIVER_OK != 0
    }

    pub fn backend_mut(&mut self) -> &mut dyn VirtioBackend {
        self.backend.as_mut()
    }

    /// The configuration space changed under the driver (a resize, say): bump the
    /// generation and interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        lock(&self.interrupt).signal_config();
    }

    fn device_features(&self) -> u64 {
        self.backend.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut QueueState> {
        let index = usize::from(self.queue_select);
        if deliberate_bug("virtio-queue-select") {
            // The bounds check removed, so the hostile-guest fuzzer can show it sees.
            return Some(&mut self.queues[index]);
        }
        self.queues.get_mut(index)
    }

    /// A machine reset: the device goes back to its power-on state (the driver will set
    /// it up again), and so does its MSI-X table.
    pub fn system_reset(&mut self) {
        self.reset_device();
        let mut irq = lock(&self.interrupt);
        irq.msix.reset();
    }

    fn reset_device(&mut self) {
        self.active.fill(false);
        self.refresh_interrupt_paths();
        if self.status & STATUS_DRIVER_OK != 0 {
            self.backend.reset();
        }
        for fd in self.kicks.iter().chain(&self.calls) {
            let _ = fd.read();
        }
        for (q, &max) in self.queues.iter_mut().zip(&self.queue_max_sizes) {
            *q = QueueState::new(max);
        }
        lock(&self.interrupt).reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
    }

    fn set_status(&mut self, value: u8) {
        if value == 0 {
            self.reset_device();
            return;
        }
        // A driver may only add bits until it resets the device (virtio 1.x, 2.1.2):
        // a write that drops some is taken as adding the rest. Dropping DRIVER_OK and
        // setting it again would start a running backend a second time.
        let mut value = value | (self.status & !STATUS_NEEDS_RESET);
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 && self.driver_features & !self.device_features() != 0 {
            // Features the device never offered: refuse FEATURES_OK; the driver sees it
            // missing on read-back and fails the device.
            tracing::warn!(device = %self.name, "driver accepted unoffered features {:#x}",
                self.driver_features & !self.device_features());
            value &= !STATUS_FEATURES_OK;
        }
        if newly & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK != 0 {
            if let Err(e) = self.activate(false) {
                tracing::error!(device = %self.name, "cannot start the device: {e}");
                value |= STATUS_NEEDS_RESET;
            }
        }
        self.status = value;
    }

    /// Start the backend on the enabled queues; `resume`: they were running elsewhere (a
    /// migrated device) and go on from where the used rings are.
    fn activate(&mut self, resume: bool) -> Result<(), VirtioError> {
        let mut queues = Vec::new();
        for (index, q) in self.queues.iter().enumerate() {
            if !q.enabled || q.size == 0 {
                continue;
            }
            // Each ring whole, and aligned as the spec asks (2.7): a backend would refuse
            // anything else and drop the connection, leaving the device dead.
            let size = u64::from(q.size);
            for (what, address, len, align) in [
                ("descriptor", q.desc, 16 * size, 16),
                ("avail", q.avail, 6 + 2 * size, 2),
                ("used", q.used, 6 + 8 * size, 4),
            ] {
                let whole = usize::try_from(len)
                    .is_ok_and(|len| self.memory.check_range(GuestAddress(address), len));
                if address % align != 0 || !whole {
                    return Err(VirtioError::QueueAddress {
                        queue: index,
                        what,
                        address,
                    });
                }
            }
            let dup = |fd: &EventFd| {
                fd.try_clone()
                    .map_err(|e| VirtioError::Backend(format!("duplicate a queue eventfd: {e}")))
            };
            queues.push(QueueSetup {
                index,
                size: q.size,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
                kick: dup(&self.kicks[index])?,
                call: dup(&self.calls[index])?,
            });
        }
        let started: Vec<usize> = queues.iter().map(|q| q.index).collect();
        self.backend.activate(Activation {
            features: self.driver_features,
            queues,
            memory: &self.memory,
            resume,
        })?;
        for index in started {
            self.active[index] = true;
        }
        self.refresh_interrupt_paths();
        Ok(())
    }

    /// Decide, for every active queue, how its call eventfd reaches the guest: an irqfd on
    /// an MSI route while its vector is deliverable (no vmm thread), otherwise the relay
    /// thread (INTx, masked vectors with their pending bits, accelerators without routes).
    fn refresh_interrupt_paths(&mut self) {
        let wanted: Vec<Option<MsiMessage>> = {
            let irq = lock(&self.interrupt);
            (0..self.queues.len())
                .map(|q| {
                    let vector = irq.queue_vectors.get(q).copied()?;
                    if !self.active[q] || vector == VIRTIO_MSI_NO_VECTOR {
                        return None;
                    }
                    irq.msix.deliverable(vector)
                })
                .collect()
        };
        let mut relay_changed = self.relay.is_none() && self.active.iter().any(|a| *a);
        for (q, msg) in wanted.into_iter().enumerate() {
            match (self.routes[q], msg) {
                (Some(route), Some(msg)) if route.msg == msg => {}
                (Some(route), Some(msg)) => {
                    match self.accel.set_msi_route(route.gsi, msg.address, msg.data) {
                        Ok(()) => {
                            self.routes[q] = Some(DirectRoute {
                                gsi: route.gsi,
                                msg,
                            })
                        }
                        Err(e) => {
                            tracing::warn!(device = %self.name, "queue {q}: MSI route: {e}");
                            self.drop_route(q);
                            relay_changed = true;
                        }
                    }
                }
                (Some(_), None) => {
                    self.drop_route(q);
                    relay_changed = true;
                }
                (None, Some(msg)) => {
                    if self.add_route(q, msg) {
                        relay_changed = true;
                    }
                }
                (None, None) => {}
            }
        }
        if relay_changed || !self.active.iter().any(|a| *a) {
            self.restart_relay();
        }
    }

    /// Wire queue `q`'s call eventfd to a new MSI route; false if the accelerator cannot.
    fn add_route(&mut self, q: usize, msg: MsiMessage) -> bool {
        let gsi = match self.accel.add_msi_route(msg.address, msg.data) {
            Ok(gsi) => gsi,
            Err(_) => return false,
        };
        // The relay must not consume this eventfd any more before the irqfd owns it.
        self.relay = None;
        match self.accel.register_irqfd(&self.calls[q], gsi) {
            Ok(()) => {
                self.routes[q] = Some(DirectRoute { gsi, msg });
                true
            }
            Err(e) => {
                tracing::warn!(device = %self.name, "queue {q}: irqfd: {e}");
                let _ = self.accel.remove_msi_route(gsi);
                true
            }
        }
    }

    fn drop_route(&mut self, q: usize) {
        if let Some(route) = self.routes[q].take() {
            let _ = self.accel.unregister_irqfd(&self.calls[q], route.gsi);
            let _ = self.accel.remove_msi_route(route.gsi);
        }
    }

    /// (Re)start the relay for the active queues without a direct route.
    fn restart_relay(&mut self) {
        self.relay = None;
        let relayed: Vec<(usize, EventFd)> = (0..self.queues.len())
            .filter(|&q| self.active[q] && self.routes[q].is_none())
            .filter_map(|q| self.calls[q].try_clone().ok().map(|fd| (q, fd)))
            .collect();
        if relayed.is_empty() {
            return;
        }
        match CallRelay::start(&self.name, relayed, self.interrupt.clone()) {
            Ok(relay) => self.relay = Some(relay),
            Err(e) => tracing::error!(device = %self.name, "no interrupts: {e}"),
        }
    }

    fn read_common(&mut self, offset: u64, data: &mut [u8]) {
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => match self.device_feature_select {
                0 => self.device_features() & 0xffff_ffff,
                1 => self.device_features() >> 32,
                _ => 0,
            },
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x0c, 4) => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            (0x10, 2) => u64::from(lock(&self.interrupt).config_vector),
            (0x12, 2) => self.queues.len() as u64,
            (0x14, 1) => u64::from(self.status),
            (0x15, 1) => u64::from(self.config_generation),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => self.selected_queue().map_or(0, |q| u64::from(q.size)),
            (0x1a, 2) => {
                let q = usize::from(self.queue_select);
                let irq = lock(&self.interrupt);
                u64::from(
                    irq.queue_vectors
                        .get(q)
                        .copied()
                        .unwrap_or(VIRTIO_MSI_NO_VECTOR),
                )
            }
            (0x1c, 2) => self.selected_queue().map_or(0, |q| u64::from(q.enabled)),
            (0x1e, 2) => u64::from(self.queue_select),
            (0x20, 4) => self.selected_queue().map_or(0, |q| q.desc & 0xffff_ffff),
            (0x24, 4) => self.selected_queue().map_or(0, |q| q.desc >> 32),
            (0x28, 4) => self.selected_queue().map_or(0, |q| q.avail & 0xffff_ffff),
            (0x2c, 4) => self.selected_queue().map_or(0, |q| q.avail >> 32),
            (0x30, 4) => self.selected_queue().map_or(0, |q| q.used & 0xffff_ffff),
            (0x34, 4) => self.selected_queue().map_or(0, |q| q.used >> 32),
            (0x20, 8) => self.selected_queue().map_or(0, |q| q.desc),
            (0x28, 8) => self.selected_queue().map_or(0, |q| q.avail),
            (0x30, 8) => self.selected_queue().map_or(0, |q| q.used),
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(bytes);
        // Queue fields may only change before DRIVER_OK.
        let live = self.status & STATUS_DRIVER_OK != 0;
        let set_low = |old: u64| (old & !0xffff_ffff) | (value & 0xffff_ffff);
        let set_high = |old: u64| (old & 0xffff_ffff) | (value << 32);
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) if self.status & STATUS_FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => self.driver_features = set_low(self.driver_features),
                    1 => self.driver_features = set_high(self.driver_features),
                    _ => {}
                }
            }
            (0x10, 2) => {
                let mut irq = lock(&self.interrupt);
                irq.config_vector = irq.accept_vector(value as u16);
            }
            (0x14, 1) => self.set_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) if !live => {
                let max = self
                    .queue_max_sizes
                    .get(usize::from(self.queue_select))
                    .copied()
                    .unwrap_or(0);
                if let Some(q) = self.selected_queue() {
                    let size = value as u16;
                    // Split queues need a power of two no larger than the device's.
                    q.size = if size.is_power_of_two() && size <= max {
                        size
                    } else {
                        0
                    };
                }
            }
            (0x1a, 2) => {
                let q = usize::from(self.queue_select);
                {
                    let mut irq = lock(&self.interrupt);
                    let vector = irq.accept_vector(value as u16);
                    if let Some(slot) = irq.queue_vectors.get_mut(q) {
                        *slot = vector;
                    }
                }
                if live {
                    self.refresh_interrupt_paths();
                }
            }
            (0x1c, 2) if !live => {
                if let Some(q) = self.selected_queue() {
                    q.enabled = value & 1 != 0;
                }
            }
            (0x20, 4) if !live => self.update_queue(|q| q.desc = set_low(q.desc)),
            (0x24, 4) if !live => self.update_queue(|q| q.desc = set_high(q.desc)),
            (0x28, 4) if !live => self.update_queue(|q| q.avail = set_low(q.avail)),
            (0x2c, 4) if !live => self.update_queue(|q| q.avail = set_high(q.avail)),
            (0x30, 4) if !live => self.update_queue(|q| q.used = set_low(q.used)),
            (0x34, 4) if !live => self.update_queue(|q| q.used = set_high(q.used)),
            (0x20, 8) if !live => self.update_queue(|q| q.desc = value),
            (0x28, 8) if !live => self.update_queue(|q| q.avail = value),
            (0x30, 8) if !live => self.update_queue(|q| q.used = value),
            _ => {
                tracing::debug!(device = %self.name, "ignored common config write at {offset:#x}");
            }
        }
    }

    fn update_queue(&mut self, f: impl FnOnce(&mut QueueState)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn notify_address(base: u64, queue: usize) -> u64 {
        base + NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_MULTIPLIER)
    }

    fn register_kicks(&self, base: u64) {
        for (q, fd) in self.kicks.iter().enumerate() {
            if self.backend.inline_queue(q) {
                // Served where the notification lands, in write_bar.
                continue;
            }
            let addr = IoEventAddress::Mmio(Self::notify_address(base, q));
            if let Err(e) = self.accel.register_ioevent(fd, addr, None) {
                // The BAR's write handler still kicks, just more slowly.
                tracing::warn!(device = %self.name, "queue {q} notify ioeventfd: {e}");
            }
        }
    }

    fn unregister_kicks(&self, base: u64) {
        for (q, fd) in self.kicks.iter().enumerate() {
            if self.backend.inline_queue(q) {
                continue;
            }
            let addr = IoEventAddress::Mmio(Self::notify_address(base, q));
            let _ = self.accel.unregister_ioevent(fd, addr, None);
        }
    }

    fn msix_control(&self) -> u16 {
        let Some(offset) = self.msix_cap_offset else {
            return 0;
        };
        let mut b = [0u8; 2];
        let _ = self.config.read_bytes(offset + 2, &mut b);
        u16::from_le_bytes(b)
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        if let Some(base) = self.bar_address.take() {
            self.unregister_kicks(base);
        }
        self.relay = None;
        for q in 0..self.routes.len() {
            self.drop_route(q);
        }
    }
}

/// A virtio vendor capability (struct virtio_pci_cap, plus the notify multiplier).
fn virtio_cap(cfg_type: u8, offset: u64, length: u64, multiplier: Option<u32>) -> Vec<u8> {
    let len: u8 = if multiplier.is_some() { 20 } else { 16 };
    let mut cap = vec![
        PCI_CAP_ID_VENDOR,
        0,
        len,
        cfg_type,
        BAR_INDEX as u8,
        0,
        0,
        0,
    ];
    cap.extend_from_slice(&(offset as u32).to_le_bytes());
    cap.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(m) = multiplier {
        cap.extend_from_slice(&m.to_le_bytes());
    }
    cap
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_register(reg_idx)
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarReprogram> {
        let before = self.msix_control();
        let moved = self.config.write_register(reg_idx, offset, data);
        let after = self.msix_control();
        if before != after {
            {
                let mut irq = lock(&self.interrupt);
                for msg in irq.msix.set_control(after) {
                    irq.send(msg);
                }
            }
            self.refresh_interrupt_paths();
        }
        moved
    }

    fn bars(&self) -> Vec<PciBar> {
        self.config.bars()
    }

    fn read_bar(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            o if (COMMON_OFFSET..COMMON_OFFSET + COMMON_SIZE).contains(&o) => {
                self.read_common(o - COMMON_OFFSET, data)
            }
            o if o == ISR_OFFSET => {
                data.fill(0);
                data[0] = lock(&self.interrupt).read_isr();
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.backend.read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => lock(&self.interrupt)
                .msix
                .read_table(o - MSIX_TABLE_OFFSET, data),
            o if o >= MSIX_PBA_OFFSET => lock(&self.interrupt)
                .msix
                .read_pba(o - MSIX_PBA_OFFSET, data),
            _ => data.fill(0),
        }
    }

    fn write_bar(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            o if (COMMON_OFFSET..COMMON_OFFSET + COMMON_SIZE).contains(&o) => {
                self.write_common(o - COMMON_OFFSET, data)
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_SIZE).contains(&o) => {
                self.backend.write_config(o - DEVICE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // Reached only when the ioeventfd is not registered.
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if self.backend.inline_queue(q) {
                    if self.active.get(q).copied().unwrap_or(false) {
                        self.backend.queue_notify(q);
                    }
                } else if let Some(fd) = self.kicks.get(q) {
                    let _ = fd.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                {
                    let mut irq = lock(&self.interrupt);
                    if let Some(msg) = irq.msix.write_table(o - MSIX_TABLE_OFFSET, data) {
                        irq.send(msg);
                    }
                }
                if self.active.iter().any(|a| *a) {
                    self.refresh_interrupt_paths();
                }
            }
            _ => {}
        }
    }

    fn bar_moved(&mut self, index: usize, mapped_at: Option<u64>) {
        if index != BAR_INDEX {
            return;
        }
        if let Some(old) = self.bar_address.take() {
            self.unregister_kicks(old);
        }
        if let Some(new) = mapped_at {
            self.register_kicks(new);
            self.bar_address = Some(new);
        }
    }

    fn interrupt_pin(&self) -> PciInterruptPin {
        PciInterruptPin::IntA
    }

    fn assign_intx(&mut self, line: IrqLine) {
        lock(&self.interrupt).set_intx(line);
    }

    fn id(&self) -> Option<String> {
        self.id.clone()
    }
}

/// Test hook: `VMM_TEST_DELIBERATE_BUG=NAME` turns on the deliberate bug NAME, the
/// negative control of the hostile-guest fuzzer (tests/tests/guest_fuzz.rs). Off unless
/// the variable names it.
fn deliberate_bug(name: &str) -> bool {
    static BUG: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BUG.get_or_init(|| std::env::var("VMM_TEST_DELIBERATE_BUG").ok())
        .as_deref()
        == Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::test_util::RecordingAccel;

    const STATUS_ACKNOWLEDGE: u8 = 1;
    const STATUS_DRIVER: u8 = 2;

    /// One activation: the features and each queue's (index, size, descriptor address).
    type ActivationRecord = (u64, Vec<(usize, u16, u64)>);

    /// A backend that records what the transport asks of it.
    #[derive(Default)]
    struct FakeBackend {
        activations: Arc<Mutex<Vec<ActivationRecord>>>,
        resets: Arc<Mutex<usize>>,
    }

    impl VirtioBackend for FakeBackend {
        fn device_type(&self) -> u16 {
            2
        }
        fn num_queues(&self) -> usize {
            2
        }
        fn queue_max_size(&self) -> u16 {
            256
        }
        fn features(&self) -> u64 {
            1 << 9
        }
        fn read_config(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = offset as u8 + i as u8;
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, a: Activation<'_>) -> Result<(), VirtioError> {
            let qs = a.queues.iter().map(|q| (q.index, q.size, q.desc)).collect();
            lock(&self.activations).push((a.features, qs));
            Ok(())
        }
        fn reset(&mut self) {
            *lock(&self.resets) += 1;
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn read(dev: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        dev.read_bar(0, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn write(dev: &mut VirtioPciDevice, offset: u64, len: usize, value: u64) {
        dev.write_bar(0, offset, &value.to_le_bytes()[..len]);
    }

    fn device() -> (VirtioPciDevice, FakeBackend, Arc<RecordingAccel>) {
        device_with(RecordingAccel::default())
    }

    fn device_with(accel: RecordingAccel) -> (VirtioPciDevice, FakeBackend, Arc<RecordingAccel>) {
        device_vectors(accel, None)
    }

    fn device_vectors(
        accel: RecordingAccel,
        vectors: Option<u16>,
    ) -> (VirtioPciDevice, FakeBackend, Arc<RecordingAccel>) {
        let backend = FakeBackend::default();
        let shared = FakeBackend {
            activations: backend.activations.clone(),
            resets: backend.resets.clone(),
        };
        let accel = Arc::new(accel);
        let dev = VirtioPciDevice::new(
            "test",
            Some("disk0".into()),
            Box::new(backend),
            accel.clone(),
            memory(),
            (1, 0),
            vectors,
        )
        .unwrap();
        (dev, shared, accel)
    }

    #[test]
    fn vectors_sets_the_msix_table_size_or_leaves_msix_out() {
        let (dev, _, _) = device_vectors(RecordingAccel::default(), Some(7));
        assert_eq!(dev.msix_control() & 0x7ff, 6);
        let (dev, _, _) = device_vectors(RecordingAccel::default(), Some(0));
        let ids: Vec<u8> = dev.config.capabilities().iter().map(|c| c.0).collect();
        assert_eq!(ids, vec![9, 9, 9, 9], "no MSI-X capability");
        assert_eq!(dev.msix_control(), 0);
        let (dev, _, _) = device_vectors(RecordingAccel::default(), Some(u16::MAX));
        assert_eq!(dev.msix_control() & 0x7ff, MAX_MSIX_VECTORS - 1);
    }

    #[test]
    fn capabilities_describe_the_bar_layout() {
        let (mut dev, _, _) = device();
        assert_eq!(dev.read_config_register(0), 0x1042_1af4);
        let caps = dev.config.capabilities();
        let ids: Vec<u8> = caps.iter().map(|c| c.0).collect();
        assert_eq!(ids, vec![0x11, 9, 9, 9, 9]);
        let mut types = Vec::new();
        for &(_, off) in &caps[1..] {
            let mut cap = [0u8; 20];
            dev.config.read_bytes(off, &mut cap[..16]).unwrap();
            types.push((
                cap[3],
                cap[4],
                u32::from_le_bytes([cap[8], cap[9], cap[10], cap[11]]),
            ));
        }
        assert_eq!(
            types,
            vec![(1, 4, 0), (3, 4, 0x1000), (4, 4, 0x2000), (2, 4, 0x3000)]
        );
        // Three MSI-X vectors: two queues and configuration.
        assert_eq!(dev.msix_control() & 0x7ff, 2);
    }

    #[test]
    fn driver_handshake_activates_enabled_queues() {
        let (mut dev, backend, accel) = device();
        dev.bar_moved(BAR_INDEX, Some(0x1_0000_0000));
        assert_eq!(accel.ioevents.lock().unwrap().len(), 2);
        assert_eq!(read(&mut dev, 0x12, 2), 2);
        write(
            &mut dev,
            0x14,
            1,
            u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER),
        );
        write(&mut dev, 0x00, 4, 1);
        assert_eq!(read(&mut dev, 0x04, 4), 1, "VERSION_1 in the high word");
        write(&mut dev, 0x00, 4, 0);
        assert_eq!(read(&mut dev, 0x04, 4), 1 << 9);
        write(&mut dev, 0x08, 4, 0);
        write(&mut dev, 0x0c, 4, 1 << 9);
        write(&mut dev, 0x08, 4, 1);
        write(&mut dev, 0x0c, 4, 1);
        write(&mut dev, 0x14, 1, 0x0b);
        assert_eq!(read(&mut dev, 0x14, 1), 0x0b);
        write(&mut dev, 0x16, 2, 1);
        assert_eq!(read(&mut dev, 0x18, 2), 256, "size starts at the maximum");
        write(&mut dev, 0x18, 2, 300);
        assert_eq!(read(&mut dev, 0x18, 2), 0, "not a power of two");
        write(&mut dev, 0x18, 2, 128);
        write(&mut dev, 0x20, 8, 0x1000);
        write(&mut dev, 0x28, 4, 0x2000);
        write(&mut dev, 0x2c, 4, 0);
        write(&mut dev, 0x30, 8, 0x3000);
        write(&mut dev, 0x1a, 2, 1);
        assert_eq!(read(&mut dev, 0x1a, 2), 1);
        write(&mut dev, 0x1a, 2, 7);
        assert_eq!(read(&mut dev, 0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        write(&mut dev, 0x1c, 2, 1);
        write(&mut dev, 0x14, 1, 0x0f);
        assert_eq!(read(&mut dev, 0x14, 1), 0x0f);
        assert_eq!(
            *lock(&backend.activations),
            vec![(VIRTIO_F_VERSION_1 | 1 << 9, vec![(1, 128, 0x1000)])]
        );
        // Reset stops the backend and clears the queues.
        write(&mut dev, 0x14, 1, 0);
        assert_eq!(*lock(&backend.resets), 1);
        assert_eq!(read(&mut dev, 0x14, 1), 0);
        write(&mut dev, 0x16, 2, 1);
        assert_eq!(read(&mut dev, 0x18, 2), 256);
        assert_eq!(read(&mut dev, 0x20, 8), 0);
        dev.bar_moved(BAR_INDEX, None);
        assert!(accel.ioevents.lock().unwrap().is_empty());
    }

    #[test]
    fn unoffered_features_and_bad_queue_addresses_are_refused() {
        let (mut dev, backend, _) = device();
        write(&mut dev, 0x14, 1, 3);
        write(&mut dev, 0x08, 4, 0);
        write(&mut dev, 0x0c, 4, 1 << 3);
        write(&mut dev, 0x14, 1, 0x0b);
        assert_eq!(read(&mut dev, 0x14, 1), 3, "FEATURES_OK refused");
        write(&mut dev, 0x14, 1, 0);
        write(&mut dev, 0x14, 1, 3);
        write(&mut dev, 0x14, 1, 0x0b);
        write(&mut dev, 0x16, 2, 0);
        write(&mut dev, 0x18, 2, 64);
        write(&mut dev, 0x20, 8, 0x4000_0000);
        write(&mut dev, 0x1c, 2, 1);
        write(&mut dev, 0x14, 1, 0x0f);
        assert_eq!(
            read(&mut dev, 0x14, 1) as u8 & STATUS_NEEDS_RESET,
            STATUS_NEEDS_RESET
        );
        assert!(lock(&backend.activations).is_empty());
        // Out-of-range selectors and offsets read as zero and never panic.
        write(&mut dev, 0x16, 2, 999);
        assert_eq!(read(&mut dev, 0x18, 2), 0);
        write(&mut dev, 0x18, 2, 64);
        assert_eq!(read(&mut dev, 0x37, 1), 0);
        assert_eq!(read(&mut dev, 0x7fff, 1), 0);
        write(&mut dev, 0x3ffc, 4, 1);
    }

    /// Start queue 0 with MSI-X vector 1 programmed to `data`, unmasked.
    fn start_with_msix(dev: &mut VirtioPciDevice, data: u32) {
        // Message control: enable MSI-X.
        let ctl = dev.msix_cap_offset.unwrap();
        dev.write_config_register(ctl / 4, 2, &MSIX_ENABLE.to_le_bytes());
        let entry = MSIX_TABLE_OFFSET + 16;
        write(dev, entry, 4, 0xfee0_0000);
        write(dev, entry + 8, 4, u64::from(data));
        write(dev, entry + 12, 4, 0);
        write(dev, 0x14, 1, 3);
        write(dev, 0x0c, 4, 0);
        write(dev, 0x08, 4, 1);
        write(dev, 0x0c, 4, 1);
        write(dev, 0x14, 1, 0x0b);
        write(dev, 0x16, 2, 0);
        write(dev, 0x20, 8, 0x1000);
        write(dev, 0x28, 8, 0x2000);
        write(dev, 0x30, 8, 0x3000);
        write(dev, 0x1a, 2, 1);
        write(dev, 0x1c, 2, 1);
        write(dev, 0x14, 1, 0x0f);
    }

    #[test]
    fn deliverable_vectors_use_msi_routes_and_masking_falls_back_to_the_relay() {
        let (mut dev, _, accel) = device_with(RecordingAccel {
            routes: Some(crate::accel::msi_routes::MsiRoutes::default()),
            ..Default::default()
        });
        start_with_msix(&mut dev, 0x51);
        let gsi = dev.routes[0].expect("a direct route").gsi;
        assert_eq!(*accel.irqfds.lock().unwrap(), vec![gsi]);
        assert_eq!(
            accel.routes.as_ref().unwrap().get(gsi),
            Some((0xfee0_0000, 0x51))
        );
        assert!(dev.relay.is_none(), "nothing left to relay");
        // A new message for the vector moves the route.
        write(&mut dev, MSIX_TABLE_OFFSET + 16 + 8, 4, 0x52);
        assert_eq!(
            accel.routes.as_ref().unwrap().get(gsi),
            Some((0xfee0_0000, 0x52))
        );
        // Masked: the relay takes over (and keeps the pending bit).
        write(&mut dev, MSIX_TABLE_OFFSET + 16 + 12, 4, 1);
        assert!(dev.routes[0].is_none());
        assert!(accel.irqfds.lock().unwrap().is_empty());
        assert!(dev.relay.is_some());
        write(&mut dev, MSIX_TABLE_OFFSET + 16 + 12, 4, 0);
        assert!(dev.routes[0].is_some());
        // Reset tears everything down.
        write(&mut dev, 0x14, 1, 0);
        assert!(dev.routes[0].is_none() && dev.relay.is_none());
        assert!(accel.routes.as_ref().unwrap().all().is_empty());
    }

    #[test]
    fn without_routes_the_relay_serves_every_queue() {
        let (mut dev, _, accel) = device();
        start_with_msix(&mut dev, 0x51);
        assert!(dev.routes[0].is_none());
        assert!(dev.relay.is_some());
        dev.calls[0].write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while accel.msis().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(accel.msis(), vec![(0xfee0_0000, 0x51)]);
    }

    #[test]
    fn device_config_and_isr() {
        let (mut dev, _, _) = device();
        assert_eq!(read(&mut dev, DEVICE_OFFSET + 4, 4), 0x0706_0504);
        dev.config_changed();
        assert_eq!(read(&mut dev, 0x15, 1), 1);
        assert_eq!(read(&mut dev, ISR_OFFSET, 1), 2);
        assert_eq!(read(&mut dev, ISR_OFFSET, 1), 0);
    }
}
