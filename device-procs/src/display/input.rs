//! virtio-input devices (tablet, keyboard, mouse) served over vhost-user, so that input
//! from a VNC client goes straight into the guest's event queue. The configuration space
//! (names, ids, event bits, axis ranges) stays in the vmm; this is the queues.
//!
//! Events are queued here ([`InputBackend::push`], from the VNC client threads) and
//! written into the guest's event buffers by the device's worker, woken by an eventfd;
//! when the guest posts no buffers the oldest events are dropped past a limit. The status
//! queue (LEDs from the guest) is taken and completed.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ipc::display::InputKind;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vhost_daemon::{self, EpollHandler, ExitEvents, Memory, Served, Vring};

const EVENT_QUEUE: u16 = 0;
const STATUS_QUEUE: u16 = 1;
/// The worker's event for queued input (after the two queues and the exit event, which
/// vhost-user-backend numbers 0..=2).
const INJECT: u16 = 3;
const QUEUE_SIZE: usize = 64;
/// Events kept while the guest posts no buffers.
const MAX_PENDING: usize = 1024;

// Linux input event types and codes.
pub const EV_SYN: u16 = 0;
pub const EV_KEY: u16 = 1;
pub const EV_REL: u16 = 2;
pub const EV_ABS: u16 = 3;
pub const EV_LED: u16 = 0x11;
pub const SYN_REPORT: u16 = 0;
pub const REL_X: u16 = 0;
pub const REL_Y: u16 = 1;
pub const REL_WHEEL: u16 = 8;
pub const ABS_X: u16 = 0;
pub const ABS_Y: u16 = 1;
pub const BTN_LEFT: u16 = 0x110;
pub const BTN_RIGHT: u16 = 0x111;
pub const BTN_MIDDLE: u16 = 0x112;
/// The tablet's axes run 0..=ABS_MAX, as QEMU's.
pub const ABS_MAX: u32 = 0x7fff;

/// One `struct virtio_input_event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputEvent {
    pub kind: u16,
    pub code: u16,
    pub value: u32,
}

impl InputEvent {
    pub const fn new(kind: u16, code: u16, value: u32) -> Self {
        InputEvent { kind, code, value }
    }

    pub const SYNC: InputEvent = InputEvent::new(EV_SYN, SYN_REPORT, 0);

    fn bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0..2].copy_from_slice(&self.kind.to_le_bytes());
        b[2..4].copy_from_slice(&self.code.to_le_bytes());
        b[4..8].copy_from_slice(&self.value.to_le_bytes());
        b
    }
}

pub struct InputBackend {
    pub kind: InputKind,
    mem: RwLock<Option<Memory>>,
    event_idx: AtomicBool,
    exit_events: ExitEvents,
    pending: Mutex<VecDeque<InputEvent>>,
    inject: EventFd,
    /// A keyboard's LEDs as the guest set them through the status queue (bit 0 scroll,
    /// 1 num, 2 caps lock, as the PS/2 keyboard's).
    leds: std::sync::atomic::AtomicU8,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl InputBackend {
    pub fn new(kind: InputKind) -> io::Result<Self> {
        Ok(InputBackend {
            kind,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            exit_events: ExitEvents::default(),
            pending: Mutex::new(VecDeque::new()),
            inject: EventFd::new(EFD_NONBLOCK)?,
            leds: std::sync::atomic::AtomicU8::new(0),
        })
    }

    /// The driver set the device up (the frontend shared guest memory with us): until
    /// then input goes to the PS/2 devices instead.
    pub fn active(&self) -> bool {
        self.mem.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Queue `events` for the guest (a SYN_REPORT should end each group).
    pub fn push(&self, events: &[InputEvent]) {
        {
            let mut pending = lock(&self.pending);
            pending.extend(events.iter().copied());
            while pending.len() > MAX_PENDING {
                pending.pop_front();
            }
        }
        if let Err(e) = self.inject.write(1) {
            tracing::debug!("input: cannot wake the worker: {e}");
        }
    }

    /// Write queued events into the guest's event buffers.
    fn deliver(&self, vring: &Vring) {
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return;
        };
        if !vring.get_ref().get_queue().ready() {
            return;
        }
        let mem = atomic.memory();
        let mut pending = lock(&self.pending);
        let mut delivered = 0;
        while let Some(event) = pending.front().copied() {
            let Some(chain) = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let buffer = chain.clone().find(|d| d.is_write_only() && d.len() >= 8);
            let used = match buffer {
                Some(d) if mem.write_slice(&event.bytes(), d.addr()).is_ok() => 8,
                _ => {
                    tracing::debug!("input: event buffer {head} refused");
                    0
                }
            };
            vhost_daemon::complete(vring, head, used);
            pending.pop_front();
            delivered += 1;
        }
        if delivered > 0 {
            vhost_daemon::notify(vring);
        }
    }

    /// A keyboard's LEDs (bit 0 scroll, 1 num, 2 caps lock).
    pub fn leds(&self) -> u8 {
        self.leds.load(Ordering::Acquire)
    }

    /// Take the guest's status events (LEDs) and give the buffers back.
    fn take_status(&self, vring: &Vring) -> usize {
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return 0;
        };
        let mem = atomic.memory();
        let mut done = 0;
        loop {
            // Popped in a statement of its own: the vring's lock is released before
            // `complete` takes it again (in a `while let` it would be held over the body,
            // and the first status event, a guest's caps lock, deadlocked the worker).
            let Some(chain) = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem) else {
                break;
            };
            for d in chain.clone().filter(|d| !d.is_write_only() && d.len() >= 8) {
                let mut b = [0u8; 8];
                if mem.read_slice(&mut b, d.addr()).is_err() {
                    continue;
                }
                let kind = u16::from_le_bytes([b[0], b[1]]);
                let code = u16::from_le_bytes([b[2], b[3]]);
                let on = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) != 0;
                // LED_NUML 0, LED_CAPSL 1, LED_SCROLLL 2, to the PS/2 bit order.
                let bit = match (kind, code) {
                    (EV_LED, 0) => 2,
                    (EV_LED, 1) => 4,
                    (EV_LED, 2) => 1,
                    _ => continue,
                };
                let leds = self.leds.load(Ordering::Acquire);
                let leds = if on { leds | bit } else { leds & !bit };
                self.leds.store(leds, Ordering::Release);
            }
            vhost_daemon::complete(vring, chain.head_index(), 0);
            done += 1;
        }
        if done > 0 {
            vhost_daemon::notify(vring);
        }
        done
    }
}

impl VhostUserBackend for InputBackend {
    /// Guest memory carries the migration dirty log (see [`vhost_daemon::GuestMem`]);
    /// events go in with `write_slice`, which logs them.
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // LOG_ALL: our writes to guest memory are logged, so the vmm may migrate.
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | vhost_daemon::LOG_ALL
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
        // Never an error: that would end the worker thread and with it the queues.
        let (Some(events), Some(status)) = (
            vrings.get(usize::from(EVENT_QUEUE)),
            vrings.get(usize::from(STATUS_QUEUE)),
        ) else {
            return Ok(());
        };
        match device_event {
            EVENT_QUEUE => self.deliver(events),
            INJECT => {
                // Readable: this does not block.
                let _ = self.inject.read();
                self.deliver(events);
            }
            STATUS_QUEUE => {
                let event_idx = self.event_idx.load(Ordering::Acquire);
                vhost_daemon::drain(status, event_idx, true, || self.take_status(status));
            }
            _ => {}
        }
        Ok(())
    }
}

impl Served for InputBackend {
    const NAME: &'static str = "vmm-display-input";

    fn exit_events(&self) -> &ExitEvents {
        &self.exit_events
    }

    fn connection_starts(&self) {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.event_idx.store(false, Ordering::Release);
    }

    fn connection_ended(&self) {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    fn workers_started(&self, workers: Vec<Arc<EpollHandler<Self>>>) {
        if let Some(worker) = workers.first() {
            if let Err(e) =
                worker.register_listener(self.inject.as_raw_fd(), EventSet::IN, u64::from(INJECT))
            {
                tracing::warn!("input: cannot watch the event queue's wake-up: {e}");
            }
        }
    }
}

/// The virtio-input devices VNC input goes to.
#[derive(Default)]
pub struct Inputs {
    devices: RwLock<Vec<Arc<InputBackend>>>,
}

impl Inputs {
    pub fn add(&self, device: Arc<InputBackend>) {
        self.devices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(device);
    }

    /// The newest device of `kind` whose driver set it up (QEMU's active handler).
    pub fn find(&self, kind: InputKind) -> Option<Arc<InputBackend>> {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .rev()
            .find(|d| d.kind == kind && d.active())
            .cloned()
    }
}

/// The Linux key code of a set-1 key (`extended`: with the 0xe0 prefix).
pub fn linux_keycode(code: u8, extended: bool) -> Option<u16> {
    if !extended {
        return (1..0x80).contains(&code).then_some(u16::from(code));
    }
    Some(match code {
        0x1c => 96,  // KEY_KPENTER
        0x1d => 97,  // KEY_RIGHTCTRL
        0x35 => 98,  // KEY_KPSLASH
        0x37 => 99,  // KEY_SYSRQ
        0x38 => 100, // KEY_RIGHTALT
        0x47 => 102, // KEY_HOME
        0x48 => 103, // KEY_UP
        0x49 => 104, // KEY_PAGEUP
        0x4b => 105, // KEY_LEFT
        0x4d => 106, // KEY_RIGHT
        0x4f => 107, // KEY_END
        0x50 => 108, // KEY_DOWN
        0x51 => 109, // KEY_PAGEDOWN
        0x52 => 110, // KEY_INSERT
        0x53 => 111, // KEY_DELETE
        0x5b => 125, // KEY_LEFTMETA
        0x5c => 126, // KEY_RIGHTMETA
        0x5d => 127, // KEY_COMPOSE
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_laid_out_as_virtio_input_events() {
        let e = InputEvent::new(EV_ABS, ABS_Y, 0x1234);
        assert_eq!(e.bytes(), [3, 0, 1, 0, 0x34, 0x12, 0, 0]);
        assert_eq!(linux_keycode(0x1e, false), Some(30), "KEY_A");
        assert_eq!(linux_keycode(0x48, true), Some(103), "KEY_UP");
        assert_eq!(linux_keycode(0x10, true), None);
    }

    #[test]
    fn queued_events_are_bounded() {
        let b = InputBackend::new(InputKind::Tablet).unwrap();
        for i in 0..(MAX_PENDING + 10) {
            b.push(&[InputEvent::new(EV_ABS, ABS_X, i as u32)]);
        }
        let pending = lock(&b.pending);
        assert_eq!(pending.len(), MAX_PENDING);
        assert_eq!(
            pending.front().map(|e| e.value),
            Some(10),
            "the oldest went"
        );
    }
}
