//! The PS/2 controller (Intel 8042) with a keyboard and a mouse behind it.
//!
//! Enough of the controller for Linux's i8042 driver to probe cleanly (self tests, the
//! command byte, AUX loopback and its interrupt test), a keyboard answering atkbd's probe
//! and a mouse answering psmouse's (including the IntelliMouse/Explorer knocks), plus the
//! reset line: command 0xFE (or 0xD1 with bit 0 clear) asks the machine to reset.
//!
//! Placement: the controller decodes port 0x60 (data) and port 0x64 (status/command).
//! Either insert [`I8042`] alone at 0x60 covering 5 ports (offsets 0 and 4; offsets 1..3
//! read 0xff), or, to leave 0x61 (the PIT/speaker port) free for another device, insert
//! [`I8042`] at 0x60 with length 1 and an [`I8042CommandPort`] at 0x64 with length 1.
//!
//! Keyboard bytes are translated from scan code set 2 to set 1 when the command byte's
//! translate bit is set, as the real controller does. Linux keeps whatever the firmware
//! left; we start with translation on, like a PC after its BIOS, so the guest sees an
//! "AT Translated Set 2 keyboard" as it does under QEMU.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::control::{MachineControl, MachineRequest, ResetCause};
use crate::devices::bus::BusDevice;
use crate::devices::interrupt::IrqLine;
use crate::snapshot::{decode, encode, SnapshotError, Snapshottable};

/// Ports covered when [`I8042`] alone is inserted at the data port.
pub const I8042_PORT_SPAN: u64 = 5;
/// Offset of the status/command port from the data port.
const COMMAND_OFFSET: u64 = 4;

// Status register.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;
const STATUS_AUX_DATA: u8 = 0x20;

// Controller command byte (CTR).
const CTR_KBD_INT: u8 = 0x01;
const CTR_AUX_INT: u8 = 0x02;
const CTR_SYSTEM: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_TRANSLATE: u8 = 0x40;
const CTR_INITIAL: u8 = CTR_KBD_INT | CTR_AUX_INT | CTR_SYSTEM | CTR_TRANSLATE;

// Output port.
const OUTPUT_PORT_RESET: u8 = 0x01;
const OUTPUT_PORT_A20: u8 = 0x02;
const OUTPUT_PORT_KBD_FULL: u8 = 0x10;
const OUTPUT_PORT_AUX_FULL: u8 = 0x20;
const OUTPUT_PORT_INITIAL: u8 = OUTPUT_PORT_RESET | OUTPUT_PORT_A20;

// Device replies.
const ACK: u8 = 0xfa;
const SELF_TEST_PASSED: u8 = 0xaa;

/// Most bytes a device queues before it drops new input (a real keyboard holds 16).
const DEVICE_QUEUE_LIMIT: usize = 256;

/// Mouse button bits for [`I8042::mouse_event`] (the PS/2 packet's order).
pub const MOUSE_BUTTON_LEFT: u8 = 0x01;
pub const MOUSE_BUTTON_RIGHT: u8 = 0x02;
pub const MOUSE_BUTTON_MIDDLE: u8 = 0x04;
/// The 4th and 5th buttons (reported only once the guest enabled the Explorer protocol).
pub const MOUSE_BUTTON_SIDE: u8 = 0x08;
pub const MOUSE_BUTTON_EXTRA: u8 = 0x10;

/// Who put the byte in the output buffer: AUX bytes set the AUX status bit and raise
/// IRQ 12; everything else raises IRQ 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Source {
    Keyboard,
    Aux,
}

fn push_limited(queue: &mut VecDeque<u8>, bytes: &[u8]) {
    if queue.len() + bytes.len() <= DEVICE_QUEUE_LIMIT {
        queue.extend(bytes);
    } else {
        tracing::debug!("i8042: device queue full, {} bytes dropped", bytes.len());
    }
}

/// An MF2 keyboard.
#[derive(Clone, Serialize, Deserialize)]
struct Keyboard {
    queue: VecDeque<u8>,
    /// A command waiting for its argument byte.
    pending: Option<u8>,
    scanning: bool,
    scancode_set: u8,
    leds: u8,
    last_sent: u8,
}

impl Keyboard {
    fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            pending: None,
            scanning: true,
            scancode_set: 2,
            leds: 0,
            last_sent: 0,
        }
    }

    fn set_defaults(&mut self) {
        self.scancode_set = 2;
        self.leds = 0;
    }

    fn reply(&mut self, bytes: &[u8]) {
        if let Some(&last) = bytes.last() {
            self.last_sent = last;
        }
        push_limited(&mut self.queue, bytes);
    }

    fn write(&mut self, byte: u8) {
        if let Some(command) = self.pending.take() {
            // A byte with the top bit set is a new command, not an argument (the real
            // keyboard behaves so, which lets a driver abort a half-sent command).
            if byte & 0x80 == 0 {
                match command {
                    0xed => self.leds = byte & 0x07,
                    0xf0 if byte == 0 => {
                        let set = self.scancode_set;
                        self.reply(&[ACK, set]);
                        return;
                    }
                    0xf0 if (1..=3).contains(&byte) => self.scancode_set = byte,
                    _ => {} // 0xf3 typematic rate/delay: accepted, not modelled.
                }
                self.reply(&[ACK]);
                return;
            }
        }
        match byte {
            0xed | 0xf0 | 0xf3 => {
                self.pending = Some(byte);
                self.reply(&[ACK]);
            }
            0xee => self.reply(&[0xee]),
            0xf2 => self.reply(&[ACK, 0xab, 0x83]),
            0xf4 => {
                self.scanning = true;
                self.reply(&[ACK]);
            }
            0xf5 => {
                self.set_defaults();
                self.scanning = false;
                self.reply(&[ACK]);
            }
            0xf6 => {
                self.set_defaults();
                self.scanning = true;
                self.reply(&[ACK]);
            }
            0xfe => {
                let last = self.last_sent;
                self.reply(&[last]);
            }
            0xff => {
                self.queue.clear();
                self.set_defaults();
                self.scanning = true;
                self.reply(&[ACK, SELF_TEST_PASSED]);
            }
            // Set-3 key type commands and anything else: acknowledged and ignored.
            _ => self.reply(&[ACK]),
        }
    }
}

/// A PS/2 mouse with the IntelliMouse (wheel) and Explorer (5 buttons) extensions.
#[derive(Clone, Serialize, Deserialize)]
struct Mouse {
    queue: VecDeque<u8>,
    pending: Option<u8>,
    reporting: bool,
    remote: bool,
    wrap: bool,
    scaling_2to1: bool,
    resolution: u8,
    sample_rate: u8,
    /// 0 = standard PS/2, 3 = IntelliMouse, 4 = IntelliMouse Explorer.
    id: u8,
    recent_rates: [u8; 3],
    buttons: u8,
    dx: i32,
    dy: i32,
    dz: i32,
}

impl Mouse {
    fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            pending: None,
            reporting: false,
            remote: false,
            wrap: false,
            scaling_2to1: false,
            resolution: 2,
            sample_rate: 100,
            id: 0,
            recent_rates: [0; 3],
            buttons: 0,
            dx: 0,
            dy: 0,
            dz: 0,
        }
    }

    fn set_defaults(&mut self) {
        self.reporting = false;
        self.remote = false;
        self.scaling_2to1 = false;
        self.resolution = 2;
        self.sample_rate = 100;
        self.dx = 0;
        self.dy = 0;
        self.dz = 0;
    }

    fn reply(&mut self, bytes: &[u8]) {
        push_limited(&mut self.queue, bytes);
    }

    fn status_byte(&self) -> u8 {
        let mut status = 0;
        if self.remote {
            status |= 0x40;
        }
        if self.reporting {
            status |= 0x20;
        }
        if self.scaling_2to1 {
            status |= 0x10;
        }
        if self.buttons & MOUSE_BUTTON_LEFT != 0 {
            status |= 0x04;
        }
        if self.buttons & MOUSE_BUTTON_MIDDLE != 0 {
            status |= 0x02;
        }
        if self.buttons & MOUSE_BUTTON_RIGHT != 0 {
            status |= 0x01;
        }
        status
    }

    /// The sample-rate "knocks" that switch on the wheel and the extra buttons.
    fn note_sample_rate(&mut self, rate: u8) {
        self.recent_rates = [self.recent_rates[1], self.recent_rates[2], rate];
        match self.recent_rates {
            [200, 100, 80] if self.id == 0 => self.id = 3,
            [200, 200, 80] if self.id == 3 => self.id = 4,
            _ => {}
        }
    }

    fn write(&mut self, byte: u8) {
        if let Some(command) = self.pending.take() {
            match command {
                0xf3 => {
                    self.sample_rate = byte;
                    self.note_sample_rate(byte);
                }
                _ => self.resolution = byte.min(3), // 0xe8
            }
            self.reply(&[ACK]);
            return;
        }
        if self.wrap && byte != 0xec && byte != 0xff {
            self.reply(&[byte]);
            return;
        }
        match byte {
            0xe6 => {
                self.scaling_2to1 = false;
                self.reply(&[ACK]);
            }
            0xe7 => {
                self.scaling_2to1 = true;
                self.reply(&[ACK]);
            }
            0xe8 | 0xf3 => {
                self.pending = Some(byte);
                self.reply(&[ACK]);
            }
            0xe9 => {
                let status = [ACK, self.status_byte(), self.resolution, self.sample_rate];
                self.reply(&status);
            }
            0xea => {
                self.remote = false;
                self.reply(&[ACK]);
            }
            0xeb => {
                self.reply(&[ACK]);
                self.send_packet();
            }
            0xec => {
                self.wrap = false;
                self.reply(&[ACK]);
            }
            0xee => {
                self.wrap = true;
                self.reply(&[ACK]);
            }
            0xf0 => {
                self.remote = true;
                self.reply(&[ACK]);
            }
            0xf2 => {
                let id = self.id;
                self.reply(&[ACK, id]);
            }
            0xf4 => {
                self.reporting = true;
                self.reply(&[ACK]);
            }
            0xf5 => {
                self.reporting = false;
                self.reply(&[ACK]);
            }
            0xf6 => {
                self.set_defaults();
                self.reply(&[ACK]);
            }
            0xff => {
                self.queue.clear();
                self.set_defaults();
                self.wrap = false;
                self.id = 0;
                self.recent_rates = [0; 3];
                self.reply(&[ACK, SELF_TEST_PASSED, 0x00]);
            }
            _ => self.reply(&[ACK]),
        }
    }

    /// Queue one movement packet with as much of the accumulated motion as fits.
    fn send_packet(&mut self) {
        let dx = self.dx.clamp(-256, 255);
        let dy = self.dy.clamp(-256, 255);
        let mut packet = [0u8; 4];
        packet[0] = 0x08 | (self.buttons & 0x07);
        if dx < 0 {
            packet[0] |= 0x10;
        }
        if dy < 0 {
            packet[0] |= 0x20;
        }
        packet[1] = dx as u8;
        packet[2] = dy as u8;
        let (len, dz) = match self.id {
            3 => {
                let dz = self.dz.clamp(-127, 127);
                packet[3] = dz as u8;
                (4, dz)
            }
            4 => {
                let dz = self.dz.clamp(-8, 7);
                packet[3] = (dz as u8 & 0x0f) | ((self.buttons & 0x18) << 1);
                (4, dz)
            }
            _ => (3, 0),
        };
        self.reply(&packet[..len]);
        self.dx -= dx;
        self.dy -= dy;
        self.dz -= dz;
    }

    fn event(&mut self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        if !self.reporting {
            return;
        }
        self.dx = self.dx.saturating_add(dx);
        // PS/2 counts up as positive; callers give screen motion (down positive).
        self.dy = self.dy.saturating_sub(dy);
        self.dz = self.dz.saturating_add(dz);
        self.buttons = buttons;
        if self.remote {
            return; // Reported when the guest polls with 0xeb.
        }
        loop {
            if self.queue.len() + 4 > DEVICE_QUEUE_LIMIT {
                break;
            }
            self.send_packet();
            if self.dx == 0 && self.dy == 0 && self.dz == 0 {
                break;
            }
        }
    }
}

/// Scan code set 2 to set 1, as the controller's translation does (indexed by the set 2
/// code, 0x00..=0x7f; 0x83, F7, is handled separately).
const SET2_TO_SET1: [u8; 128] = [
    0xff, 0x43, 0x41, 0x3f, 0x3d, 0x3b, 0x3c, 0x58, 0x64, 0x44, 0x42, 0x40, 0x3e, 0x0f, 0x29, 0x59,
    0x65, 0x38, 0x2a, 0x70, 0x1d, 0x10, 0x02, 0x5a, 0x66, 0x71, 0x2c, 0x1f, 0x1e, 0x11, 0x03, 0x5b,
    0x67, 0x2e, 0x2d, 0x20, 0x12, 0x05, 0x04, 0x5c, 0x68, 0x39, 0x2f, 0x21, 0x14, 0x13, 0x06, 0x5d,
    0x69, 0x31, 0x30, 0x23, 0x22, 0x15, 0x07, 0x5e, 0x6a, 0x72, 0x32, 0x24, 0x16, 0x08, 0x09, 0x5f,
    0x6b, 0x33, 0x25, 0x17, 0x18, 0x0b, 0x0a, 0x60, 0x6c, 0x34, 0x35, 0x26, 0x27, 0x19, 0x0c, 0x61,
    0x6d, 0x73, 0x28, 0x74, 0x1a, 0x0d, 0x62, 0x6e, 0x3a, 0x36, 0x1c, 0x1b, 0x75, 0x2b, 0x63, 0x76,
    0x55, 0x56, 0x77, 0x78, 0x79, 0x7a, 0x0e, 0x7b, 0x7c, 0x4f, 0x7d, 0x4b, 0x47, 0x7e, 0x7f, 0x6f,
    0x52, 0x53, 0x50, 0x4c, 0x4d, 0x48, 0x01, 0x45, 0x57, 0x4e, 0x51, 0x4a, 0x37, 0x49, 0x46, 0x54,
];

/// Translate one set 2 byte to set 1. Bytes from 0x80 up (replies, prefixes) pass as is.
fn translate_to_set1(byte: u8) -> u8 {
    match byte {
        0x83 => 0x41,
        0x00..=0x7f => SET2_TO_SET1[usize::from(byte)],
        _ => byte,
    }
}

/// Set 1 to set 2: the inverse of [`SET2_TO_SET1`] (set 1 make codes 0x00..=0x7f).
fn set1_to_set2(code: u8) -> u8 {
    if code == 0x41 {
        return 0x83;
    }
    SET2_TO_SET1
        .iter()
        .position(|&c| c == code)
        .map_or(0, |i| i as u8)
}

/// Set 1 bytes of one key event (0xe0 prefixes, breaks with bit 7 set) in set 2.
fn set1_bytes_to_set2(set1: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(set1.len() + 1);
    for &b in set1 {
        match b {
            0xe0 | 0xe1 => out.push(b),
            _ if b & 0x80 != 0 => out.extend_from_slice(&[0xf0, set1_to_set2(b & 0x7f)]),
            _ => out.push(set1_to_set2(b)),
        }
    }
    out
}

/// Told the keyboard LEDs (bit 0 scroll, 1 num, 2 caps lock) when the guest sets them.
pub type LedListener = std::sync::Arc<dyn Fn(u8) + Send + Sync>;

/// Everything of the controller but its connections to the machine: what a snapshot
/// keeps.
#[derive(Clone, Serialize, Deserialize)]
struct I8042State {
    ctr: u8,
    output_port: u8,
    last_write_was_command: bool,
    /// The output buffer the guest reads from port 0x60.
    output: Option<(u8, Source)>,
    /// What port 0x60 returns when the buffer is empty (the stale last byte).
    last_output: u8,
    /// Bytes the controller itself produced (command replies, 0xd2/0xd3 writes); they go
    /// out before device bytes.
    controller_queue: VecDeque<(u8, Source)>,
    /// A controller command waiting for its data byte on port 0x60.
    pending_command: Option<u8>,
    /// Translation saw a set 2 break prefix (0xf0) and holds it for the next byte.
    translate_break: bool,
    keyboard: Keyboard,
    mouse: Mouse,
    kbd_irq_level: bool,
    aux_irq_level: bool,
}

/// The 8042 controller. See the module documentation for placement.
pub struct I8042 {
    control: MachineControl,
    kbd_irq: IrqLine,
    aux_irq: IrqLine,
    /// Everything a snapshot keeps, in one place so that none of it is left behind.
    state: I8042State,
    led_listener: Option<LedListener>,
}

impl I8042 {
    /// A controller raising `kbd_irq` (GSI 1) and `aux_irq` (GSI 12), sending reset
    /// requests through `control`.
    pub fn new(control: MachineControl, kbd_irq: IrqLine, aux_irq: IrqLine) -> Self {
        Self {
            control,
            kbd_irq,
            aux_irq,
            state: I8042State {
                ctr: CTR_INITIAL,
                output_port: OUTPUT_PORT_INITIAL,
                last_write_was_command: false,
                output: None,
                last_output: 0,
                controller_queue: VecDeque::new(),
                pending_command: None,
                translate_break: false,
                keyboard: Keyboard::new(),
                mouse: Mouse::new(),
                kbd_irq_level: false,
                aux_irq_level: false,
            },
            led_listener: None,
        }
    }

    /// Back to the power-on state (for a machine reset).
    pub fn reset(&mut self) {
        let (control, kbd_irq, aux_irq) = (
            self.control.clone(),
            self.kbd_irq.clone(),
            self.aux_irq.clone(),
        );
        let listener = self.led_listener.take();
        *self = Self::new(control, kbd_irq, aux_irq);
        if let Some(listener) = &listener {
            listener(0);
        }
        self.led_listener = listener;
    }

    /// Queue keyboard scan code bytes (make and break sequences, with their 0xe0/0xf0
    /// prefixes) in the keyboard's current scan code set, set 2 unless the guest changed
    /// it (see [`I8042::scancode_set`]). Dropped while the guest has scanning disabled.
    pub fn key_event(&mut self, scancodes: &[u8]) {
        if !self.state.keyboard.scanning {
            return;
        }
        push_limited(&mut self.state.keyboard.queue, scancodes);
        self.refill();
    }

    /// Call `listener` with the LEDs whenever the guest changes them (it runs on a vCPU
    /// thread: it must not block).
    pub fn set_led_listener(&mut self, listener: LedListener) {
        self.led_listener = Some(listener);
    }

    /// Queue a key event given in set 1 bytes (what display clients send), in whatever
    /// set the keyboard uses (set 3 is given set 2's codes, which agree for most keys).
    pub fn key_event_set1(&mut self, set1: &[u8]) {
        if self.state.keyboard.scancode_set == 1 {
            self.key_event(set1);
        } else {
            self.key_event(&set1_bytes_to_set2(set1));
        }
    }

    /// The scan code set the keyboard sends (1, 2 or 3) as the guest selected it.
    pub fn scancode_set(&self) -> u8 {
        self.state.keyboard.scancode_set
    }

    /// The keyboard LEDs as the guest set them (bit 0 scroll, 1 num, 2 caps lock).
    pub fn keyboard_leds(&self) -> u8 {
        self.state.keyboard.leds
    }

    /// Report relative mouse motion and the button state. `dx` is positive to the
    /// right, `dy` positive downwards (screen direction), `dz` positive for the wheel
    /// turned towards the user; `buttons` is a mask of the `MOUSE_BUTTON_*` bits. Ignored
    /// until the guest enables the mouse.
    pub fn mouse_event(&mut self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        self.state.mouse.event(dx, dy, dz, buttons);
        self.refill();
    }

    fn status(&self) -> u8 {
        let mut status = STATUS_UNLOCKED;
        if self.state.ctr & CTR_SYSTEM != 0 {
            status |= STATUS_SYSTEM;
        }
        if self.state.last_write_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        match self.state.output {
            Some((_, Source::Aux)) => status |= STATUS_OUTPUT_FULL | STATUS_AUX_DATA,
            Some(_) => status |= STATUS_OUTPUT_FULL,
            None => {}
        }
        status
    }

    fn read_data(&mut self) -> u8 {
        let value = match self.state.output.take() {
            Some((byte, _)) => {
                self.state.last_output = byte;
                byte
            }
            None => self.state.last_output,
        };
        self.update_irqs();
        self.refill();
        value
    }

    fn next_keyboard_byte(&mut self) -> Option<u8> {
        loop {
            let byte = self.state.keyboard.queue.pop_front()?;
            if self.state.ctr & CTR_TRANSLATE == 0 {
                return Some(byte);
            }
            if byte == 0xf0 {
                self.state.translate_break = true;
                continue;
            }
            let mut translated = translate_to_set1(byte);
            if std::mem::take(&mut self.state.translate_break) {
                translated |= 0x80;
            }
            return Some(translated);
        }
    }

    /// Move the next pending byte into the empty output buffer, if any.
    fn refill(&mut self) {
        if self.state.output.is_none() {
            if let Some(entry) = self.state.controller_queue.pop_front() {
                self.state.output = Some(entry);
            } else if self.state.ctr & CTR_KBD_DISABLE == 0 {
                if let Some(byte) = self.next_keyboard_byte() {
                    self.state.output = Some((byte, Source::Keyboard));
                }
            }
            if self.state.output.is_none() && self.state.ctr & CTR_AUX_DISABLE == 0 {
                if let Some(byte) = self.state.mouse.queue.pop_front() {
                    self.state.output = Some((byte, Source::Aux));
                }
            }
        }
        self.update_irqs();
    }

    /// Each IRQ line follows "output buffer full from this source and its interrupt
    /// enabled"; the ISA interrupt is edge triggered, so a rising level is one pulse.
    fn update_irqs(&mut self) {
        let (kbd, aux) = match self.state.output {
            Some((_, Source::Aux)) => (false, self.state.ctr & CTR_AUX_INT != 0),
            Some(_) => (self.state.ctr & CTR_KBD_INT != 0, false),
            None => (false, false),
        };
        if kbd && !self.state.kbd_irq_level {
            if let Err(e) = self.kbd_irq.pulse() {
                tracing::warn!("i8042: failed to raise the keyboard interrupt: {e}");
            }
        }
        if aux && !self.state.aux_irq_level {
            if let Err(e) = self.aux_irq.pulse() {
                tracing::warn!("i8042: failed to raise the mouse interrupt: {e}");
            }
        }
        self.state.kbd_irq_level = kbd;
        self.state.aux_irq_level = aux;
    }

    fn controller_reply(&mut self, byte: u8, source: Source) {
        self.state.controller_queue.push_back((byte, source));
        self.refill();
    }

    fn write_command(&mut self, command: u8) {
        self.state.last_write_was_command = true;
        self.state.pending_command = None;
        match command {
            0x20 => self.controller_reply(self.state.ctr, Source::Keyboard),
            // The rest of the controller's RAM: not modelled, reads as zero.
            0x21..=0x3f => self.controller_reply(0, Source::Keyboard),
            0x60..=0x7f | 0xd1..=0xd4 => self.state.pending_command = Some(command),
            0xa7 => self.set_ctr(self.state.ctr | CTR_AUX_DISABLE),
            0xa8 => self.set_ctr(self.state.ctr & !CTR_AUX_DISABLE),
            // AUX and keyboard interface tests: 0 means no error.
            0xa9 | 0xab => self.controller_reply(0x00, Source::Keyboard),
            0xaa => {
                self.state.ctr |= CTR_SYSTEM;
                self.controller_reply(0x55, Source::Keyboard);
            }
            0xad => self.set_ctr(self.state.ctr | CTR_KBD_DISABLE),
            0xae => self.set_ctr(self.state.ctr & !CTR_KBD_DISABLE),
            // Input port: keyboard not inhibited.
            0xc0 => self.controller_reply(0x80, Source::Keyboard),
            0xd0 => {
                let mut port =
                    self.state.output_port & !(OUTPUT_PORT_KBD_FULL | OUTPUT_PORT_AUX_FULL);
                match self.state.output {
                    Some((_, Source::Aux)) => port |= OUTPUT_PORT_AUX_FULL,
                    Some(_) => port |= OUTPUT_PORT_KBD_FULL,
                    None => {}
                }
                self.controller_reply(port, Source::Keyboard);
            }
            // Fast A20 gate control: A20 is always enabled here.
            0xdd | 0xdf => {}
            // Test inputs: clock and data lines low.
            0xe0 => self.controller_reply(0x00, Source::Keyboard),
            // Pulse output port lines for 6us: a 0 in bit 0 pulses the reset line.
            0xf0..=0xff => {
                if command & 0x01 == 0 {
                    self.request_reset();
                }
            }
            _ => tracing::debug!("i8042: unhandled controller command {command:#04x}"),
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.state.last_write_was_command = false;
        match self.state.pending_command.take() {
            Some(0x60) => self.set_ctr(byte),
            Some(0x61..=0x7f) => {}
            Some(0xd1) => {
                self.state.output_port = byte | OUTPUT_PORT_A20;
                if byte & OUTPUT_PORT_RESET == 0 {
                    self.request_reset();
                }
            }
            Some(0xd2) => self.controller_reply(byte, Source::Keyboard),
            Some(0xd3) => self.controller_reply(byte, Source::Aux),
            Some(0xd4) => {
                // Talking to the mouse re-enables its interface, as on QEMU.
                self.state.ctr &= !CTR_AUX_DISABLE;
                self.state.mouse.write(byte);
                self.refill();
            }
            _ => {
                self.state.ctr &= !CTR_KBD_DISABLE;
                let leds = self.state.keyboard.leds;
                self.state.keyboard.write(byte);
                if self.state.keyboard.leds != leds {
                    if let Some(listener) = &self.led_listener {
                        listener(self.state.keyboard.leds);
                    }
                }
                self.refill();
            }
        }
    }

    fn set_ctr(&mut self, ctr: u8) {
        self.state.ctr = ctr;
        self.refill();
    }

    fn request_reset(&self) {
        self.control
            .request(MachineRequest::Reset(ResetCause::Keyboard));
    }

    fn read_command_port(&mut self, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(first) = data.first_mut() {
            *first = self.status();
        }
    }

    fn write_command_port(&mut self, data: &[u8]) {
        if let Some(&command) = data.first() {
            self.write_command(command);
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 => {
                data.fill(0xff);
                if let Some(first) = data.first_mut() {
                    *first = self.read_data();
                }
            }
            COMMAND_OFFSET => self.read_command_port(data),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.first()) {
            (0, Some(&byte)) => self.write_data(byte),
            (COMMAND_OFFSET, _) => self.write_command_port(data),
            _ => {}
        }
    }
}

/// Name of the controller's state in snapshots and their errors.
const SNAPSHOT_NAME: &str = "i8042";

impl Snapshottable for I8042 {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        encode(SNAPSHOT_NAME, &self.state)
    }

    /// The IRQs are edge triggered: a line whose level was up had its edge sent on the
    /// source, and it is sent again here so that a byte waiting in the output buffer
    /// cannot be left without its interrupt (at worst the guest's handler runs once more
    /// and finds nothing to read).
    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let s: I8042State = decode(SNAPSHOT_NAME, state)?;
        for (device, len) in [
            ("keyboard", s.keyboard.queue.len()),
            ("mouse", s.mouse.queue.len()),
        ] {
            if len > DEVICE_QUEUE_LIMIT {
                return Err(SnapshotError::Decode {
                    what: SNAPSHOT_NAME,
                    message: format!("{len} bytes queued in the {device}, more than it holds"),
                });
            }
        }
        let leds = self.state.keyboard.leds;
        self.state = s;
        for (level, line, name) in [
            (self.state.kbd_irq_level, &self.kbd_irq, "keyboard"),
            (self.state.aux_irq_level, &self.aux_irq, "mouse"),
        ] {
            if level {
                if let Err(e) = line.pulse() {
                    tracing::warn!("i8042: failed to raise the {name} interrupt: {e}");
                }
            }
        }
        if self.state.keyboard.leds != leds {
            if let Some(listener) = &self.led_listener {
                listener(self.state.keyboard.leds);
            }
        }
        Ok(())
    }
}

/// The status/command port (0x64) as a device of its own, for placing the controller
/// without claiming ports 0x61..0x63.
pub struct I8042CommandPort {
    controller: Arc<Mutex<I8042>>,
}

impl I8042CommandPort {
    pub fn new(controller: Arc<Mutex<I8042>>) -> Self {
        Self { controller }
    }
}

impl BusDevice for I8042CommandPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset != 0 {
            data.fill(0xff);
            return;
        }
        self.controller
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_command_port(data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            self.controller
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_command_port(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set1_keys_become_set2_and_back() {
        // 'a' (0x1e), Up (e0 48), F7 (0x41), each pressed and released.
        assert_eq!(set1_bytes_to_set2(&[0x1e]), [0x1c]);
        assert_eq!(set1_bytes_to_set2(&[0x9e]), [0xf0, 0x1c]);
        assert_eq!(set1_bytes_to_set2(&[0xe0, 0xc8]), [0xe0, 0xf0, 0x75]);
        assert_eq!(set1_bytes_to_set2(&[0x41]), [0x83]);
        for code in 1..0x59u8 {
            assert_eq!(translate_to_set1(set1_to_set2(code)), code, "{code:#x}");
        }
    }
    use crate::devices::interrupt::test_util::RecordingIrqChip;
    use std::sync::mpsc::Receiver;

    const DATA: u64 = 0;
    const CMD: u64 = 4;

    struct Fixture {
        dev: I8042,
        chip: Arc<RecordingIrqChip>,
        requests: Receiver<MachineRequest>,
    }

    fn fixture() -> Fixture {
        let chip = Arc::new(RecordingIrqChip::default());
        let (control, requests) = MachineControl::new();
        let dev = I8042::new(
            control,
            IrqLine::new(chip.clone(), 1),
            IrqLine::new(chip.clone(), 12),
        );
        Fixture {
            dev,
            chip,
            requests,
        }
    }

    impl Fixture {
        fn status(&mut self) -> u8 {
            let mut d = [0];
            self.dev.read(CMD, &mut d);
            d[0]
        }
        fn command(&mut self, c: u8) {
            self.dev.write(CMD, &[c]);
        }
        fn put(&mut self, b: u8) {
            self.dev.write(DATA, &[b]);
        }
        /// Read every byte the controller has for us, with whether each was AUX data.
        fn drain(&mut self) -> Vec<(u8, bool)> {
            let mut out = Vec::new();
            while self.status() & STATUS_OUTPUT_FULL != 0 {
                let aux = self.status() & STATUS_AUX_DATA != 0;
                let mut d = [0];
                self.dev.read(DATA, &mut d);
                out.push((d[0], aux));
            }
            out
        }
        fn bytes(&mut self) -> Vec<u8> {
            self.drain().into_iter().map(|(b, _)| b).collect()
        }
        /// Linux's setup: interrupts off while probing, translation as found.
        fn write_ctr(&mut self, ctr: u8) {
            self.command(0x60);
            self.put(ctr);
        }
    }

    #[test]
    fn reset_commands_request_a_keyboard_reset() {
        let mut f = fixture();
        f.command(0xfe);
        assert_eq!(
            f.requests.try_recv().unwrap(),
            MachineRequest::Reset(ResetCause::Keyboard)
        );
        f.command(0xff); // Pulses no line.
        assert!(f.requests.try_recv().is_err());
        f.command(0xd1);
        f.put(0x02); // Bit 0 clear: reset asserted.
        assert_eq!(
            f.requests.try_recv().unwrap(),
            MachineRequest::Reset(ResetCause::Keyboard)
        );
        f.command(0xd1);
        f.put(0x03);
        assert!(f.requests.try_recv().is_err());
    }

    #[test]
    fn self_tests_and_command_byte() {
        let mut f = fixture();
        assert_eq!(
            f.status() & (STATUS_OUTPUT_FULL | 0x02),
            0,
            "empty, IBF clear"
        );
        f.command(0xaa);
        assert_eq!(f.drain(), vec![(0x55, false)]);
        assert_ne!(f.status() & STATUS_SYSTEM, 0);
        f.command(0xab);
        f.command(0xa9);
        assert_eq!(f.bytes(), vec![0x00, 0x00]);
        f.command(0x20);
        assert_eq!(f.bytes(), vec![CTR_INITIAL]);
        f.write_ctr(0x65);
        f.command(0x20);
        assert_eq!(f.bytes(), vec![0x65]);
        // 0xa7/0xa8 and 0xad/0xae show in the command byte, as i8042_check_aux expects.
        f.command(0xa8);
        f.command(0xae);
        f.command(0x20);
        assert_eq!(f.bytes(), vec![0x65 & !(CTR_AUX_DISABLE | CTR_KBD_DISABLE)]);
        f.command(0xa7);
        f.command(0xad);
        f.command(0x20);
        assert_eq!(f.bytes()[0] & 0x30, 0x30);
        f.command(0xd0);
        assert_eq!(f.bytes(), vec![OUTPUT_PORT_RESET | OUTPUT_PORT_A20]);
        f.command(0xc0);
        assert_eq!(f.bytes(), vec![0x80]);
        let mut unclaimed = [0];
        f.dev.read(2, &mut unclaimed);
        assert_eq!(unclaimed[0], 0xff);
    }

    #[test]
    fn keyboard_get_id_through_the_ports() {
        let mut f = fixture();
        f.write_ctr(CTR_SYSTEM | CTR_KBD_INT); // No translation.
        f.put(0xf2);
        assert_eq!(f.drain(), vec![(0xfa, false), (0xab, false), (0x83, false)]);
        // With translation on, the controller turns 0x83 into 0x41 as hardware does.
        f.write_ctr(CTR_SYSTEM | CTR_KBD_INT | CTR_TRANSLATE);
        f.put(0xf2);
        assert_eq!(f.bytes(), vec![0xfa, 0xab, 0x41]);
    }

    #[test]
    fn keyboard_probe_sequence() {
        let mut f = fixture();
        f.write_ctr(CTR_SYSTEM);
        f.put(0xff);
        assert_eq!(f.bytes(), vec![0xfa, 0xaa]);
        f.put(0xed);
        f.put(0x07);
        assert_eq!(f.bytes(), vec![0xfa, 0xfa]);
        assert_eq!(f.dev.keyboard_leds(), 7);
        f.put(0xf0);
        f.put(0x00);
        assert_eq!(f.bytes(), vec![0xfa, 0xfa, 0x02]);
        f.put(0xf0);
        f.put(0x03);
        f.put(0xf0);
        f.put(0x00);
        assert_eq!(f.bytes(), vec![0xfa, 0xfa, 0xfa, 0xfa, 0x03]);
        f.put(0xf6);
        assert_eq!(f.dev.scancode_set(), 2);
        f.put(0xf3);
        f.put(0x20);
        f.put(0xf4);
        f.put(0xf5);
        f.put(0xee);
        assert_eq!(f.bytes(), vec![0xfa, 0xfa, 0xfa, 0xfa, 0xfa, 0xee]);
        // Scanning disabled: keys are dropped.
        f.dev.key_event(&[0x1c]);
        assert!(f.bytes().is_empty());
        f.put(0xf4);
        f.dev.key_event(&[0x1c, 0xf0, 0x1c]);
        assert_eq!(f.bytes(), vec![0xfa, 0x1c, 0xf0, 0x1c]);
    }

    #[test]
    fn key_events_are_translated_to_set1() {
        let mut f = fixture();
        // 'A' make/break, then right ctrl (E0 14) make/break, in set 2.
        f.dev
            .key_event(&[0x1c, 0xf0, 0x1c, 0xe0, 0x14, 0xe0, 0xf0, 0x14]);
        assert_eq!(
            f.bytes(),
            vec![0x1e, 0x9e, 0xe0, 0x1d, 0xe0, 0x9d],
            "set 1: A = 0x1e, ctrl = 0x1d, breaks with bit 7"
        );
        f.dev.key_event(&[0x76, 0x5a, 0x29, 0x83]);
        assert_eq!(
            f.bytes(),
            vec![0x01, 0x1c, 0x39, 0x41],
            "Esc, Enter, Space, F7"
        );
    }

    #[test]
    fn mouse_probe_through_d4() {
        let mut f = fixture();
        f.write_ctr(CTR_SYSTEM);
        let send = |f: &mut Fixture, b: u8| {
            f.command(0xd4);
            f.put(b);
        };
        send(&mut f, 0xff);
        assert_eq!(f.drain(), vec![(0xfa, true), (0xaa, true), (0x00, true)]);
        send(&mut f, 0xf2);
        assert_eq!(f.bytes(), vec![0xfa, 0x00]);
        // IntelliMouse knock, then Explorer knock.
        for rate in [200, 100, 80] {
            send(&mut f, 0xf3);
            send(&mut f, rate);
        }
        send(&mut f, 0xf2);
        assert_eq!(f.bytes()[6..], [0xfa, 0x03]);
        for rate in [200, 200, 80] {
            send(&mut f, 0xf3);
            send(&mut f, rate);
        }
        send(&mut f, 0xf2);
        assert_eq!(f.bytes()[6..], [0xfa, 0x04]);
        send(&mut f, 0xe8);
        send(&mut f, 0x03);
        send(&mut f, 0xe7);
        send(&mut f, 0xe9);
        assert_eq!(f.bytes(), vec![0xfa, 0xfa, 0xfa, 0xfa, 0x10, 0x03, 80]);
        send(&mut f, 0xe6);
        send(&mut f, 0xf4);
        send(&mut f, 0xe9);
        assert_eq!(f.bytes(), vec![0xfa, 0xfa, 0xfa, 0x20, 0x03, 80]);
        // Remote mode: movement is read with 0xeb.
        send(&mut f, 0xf0);
        f.dev.mouse_event(5, 0, 0, MOUSE_BUTTON_LEFT);
        send(&mut f, 0xeb);
        assert_eq!(f.bytes(), vec![0xfa, 0xfa, 0x09, 5, 0, 0]);
        // Wrap mode echoes until 0xec.
        send(&mut f, 0xee);
        send(&mut f, 0x42);
        send(&mut f, 0xec);
        assert_eq!(f.bytes(), vec![0xfa, 0x42, 0xfa]);
    }

    #[test]
    fn aux_loopback_raises_irq12_and_keyboard_irq1() {
        let mut f = fixture();
        f.write_ctr(CTR_SYSTEM); // Interrupts off.
        f.command(0xd3);
        f.put(0x5a);
        assert_eq!(f.chip.edges(12), 0);
        assert_eq!(f.drain(), vec![(0x5a, true)]);
        f.write_ctr(CTR_SYSTEM | CTR_AUX_INT);
        f.command(0xd3);
        f.put(0xa5);
        assert_eq!(f.chip.edges(12), 1);
        assert_eq!(f.chip.edges(1), 0);
        assert_eq!(f.drain(), vec![(0xa5, true)]);
        // A pending byte interrupts as soon as its interrupt is enabled.
        f.write_ctr(CTR_SYSTEM);
        f.command(0xd2);
        f.put(0x11);
        assert_eq!(f.chip.edges(1), 0);
        f.write_ctr(CTR_SYSTEM | CTR_KBD_INT);
        assert_eq!(f.chip.edges(1), 1);
        assert_eq!(f.drain(), vec![(0x11, false)]);
        // Each further byte is a new edge (no translation with this command byte).
        f.dev.key_event(&[0x1c, 0xf0, 0x1c]);
        assert_eq!(f.chip.edges(1), 2);
        assert_eq!(f.bytes(), vec![0x1c, 0xf0, 0x1c]);
        assert_eq!(f.chip.edges(1), 4);
    }

    #[test]
    fn disabled_interfaces_hold_their_bytes() {
        let mut f = fixture();
        f.write_ctr(CTR_SYSTEM | CTR_TRANSLATE | CTR_KBD_DISABLE);
        f.dev.key_event(&[0x1c]);
        assert!(f.bytes().is_empty());
        f.command(0xae);
        assert_eq!(f.bytes(), vec![0x1e]);
    }

    #[test]
    fn mouse_packets() {
        let mut f = fixture();
        f.write_ctr(CTR_SYSTEM | CTR_AUX_INT);
        f.command(0xd4);
        f.put(0xf4);
        assert_eq!(f.bytes(), vec![0xfa]);
        let edges = f.chip.edges(12);
        f.dev.mouse_event(-3, 4, 0, MOUSE_BUTTON_RIGHT);
        assert_eq!(f.chip.edges(12), edges + 1);
        // dy 4 downwards is -4 in PS/2; both signs set.
        assert_eq!(f.drain(), vec![(0x3a, true), (0xfd, true), (0xfc, true)]);
        // Large motion is split over several packets.
        f.dev.mouse_event(600, 0, 0, 0);
        assert_eq!(f.bytes(), vec![0x08, 255, 0, 0x08, 255, 0, 0x08, 90, 0]);
    }

    #[test]
    fn split_placement_uses_the_same_controller() {
        let f = fixture();
        let dev = Arc::new(Mutex::new(f.dev));
        let mut port = I8042CommandPort::new(dev.clone());
        port.write(0, &[0xaa]);
        let mut status = [0];
        port.read(0, &mut status);
        assert_ne!(status[0] & STATUS_OUTPUT_FULL, 0);
        let mut data = [0];
        dev.lock().unwrap().read(DATA, &mut data);
        assert_eq!(data[0], 0x55);
    }

    /// Drive `f` into a state with something in every part of the controller: a full
    /// output buffer (mouse data, IRQ 12 up), a controller reply and keyboard, mouse bytes
    /// queued behind it, a held set 2 break prefix, a controller command and a keyboard
    /// command each waiting for their argument, and non-default settings everywhere.
    fn busy_controller(f: &mut Fixture) {
        f.command(0xd1);
        f.put(0x0b); // Output port; bit 0 set, so no reset.
        f.put(0xed);
        f.put(0x05); // LEDs.
        f.put(0xf0);
        f.put(0x03); // Scan code set 3.
        for b in [0xf4, 0xf3, 200, 0xf3, 100, 0xf3, 80, 0xe8, 0x01, 0xe7] {
            f.command(0xd4); // Mouse: reporting, IntelliMouse, resolution 1, 2:1 scaling.
            f.put(b);
        }
        f.bytes();
        f.put(0xf3); // Typematic rate: the keyboard waits for its argument.
        f.dev.key_event(&[0x1c, 0xf0]);
        assert_eq!(f.bytes(), vec![0xfa, 0x1e], "the break prefix is held");
        f.dev.mouse_event(3, -2, 1, MOUSE_BUTTON_LEFT);
        f.command(0x20);
        f.dev.key_event(&[0x1c]);
        f.command(0xd4); // The controller waits for a byte for the mouse.
    }

    /// A guest's reads and writes after the snapshot, and everything it got back.
    fn after_snapshot(f: &mut Fixture) -> Vec<(u8, bool)> {
        let mut seen = vec![(f.status(), false)];
        f.put(0xe9); // Mouse status request, through the pending 0xd4.
        f.put(0x20); // The keyboard's typematic argument.
        seen.extend(f.drain());
        let mut d = [0];
        f.dev.read(DATA, &mut d); // Empty: the last byte again.
        seen.push((d[0], false));
        f.command(0xd0);
        f.command(0xd4);
        f.put(0xf2);
        f.dev.mouse_event(-1, 1, -1, 0);
        seen.extend(f.drain());
        seen.push((f.dev.keyboard_leds(), false));
        seen.push((f.dev.scancode_set(), false));
        seen
    }

    #[test]
    fn snapshot_restores_what_the_guest_sees() {
        let mut f = fixture();
        busy_controller(&mut f);
        let saved = f.dev.save().unwrap();
        let mut g = fixture();
        let leds = Arc::new(Mutex::new(Vec::new()));
        let told = leds.clone();
        g.dev
            .set_led_listener(Arc::new(move |l| told.lock().unwrap().push(l)));
        g.dev.restore(&saved).unwrap();
        assert_eq!(*leds.lock().unwrap(), vec![5]);
        assert_eq!(
            g.chip.edges(12),
            1,
            "the waiting mouse byte's interrupt is sent"
        );
        assert_eq!(g.chip.edges(1), 0);

        let (f_kbd, f_aux) = (f.chip.edges(1), f.chip.edges(12));
        let expected = after_snapshot(&mut f);
        assert_eq!(after_snapshot(&mut g), expected);
        assert_eq!(g.chip.edges(1), f.chip.edges(1) - f_kbd);
        assert_eq!(g.chip.edges(12) - 1, f.chip.edges(12) - f_aux);
        // Spot checks: the waiting mouse byte, then the controller's reply, the keyboard's
        // bytes (the key after the held break prefix, the typematic ACK), the rest of the
        // IntelliMouse packet and the mouse's status reply.
        assert_eq!(
            expected[0],
            (
                STATUS_UNLOCKED
                    | STATUS_SYSTEM
                    | STATUS_LAST_WAS_COMMAND
                    | STATUS_OUTPUT_FULL
                    | STATUS_AUX_DATA,
                false
            )
        );
        assert_eq!(
            expected[1..12],
            [
                (0x09, true),
                (CTR_INITIAL, false),
                (0x9e, false),
                (0xfa, false),
                (3, true),
                (2, true),
                (1, true),
                (0xfa, true),
                (0x10 | 0x20 | 0x04, true),
                (1, true),
                (80, true),
            ]
        );
        assert!(g.requests.try_recv().is_err());
    }

    #[test]
    fn snapshot_refuses_bad_state() {
        let mut f = fixture();
        busy_controller(&mut f);
        let saved = f.dev.save().unwrap();
        let mut g = fixture();
        g.write_ctr(0x65);
        for len in 0..saved.len() {
            assert!(g.dev.restore(&saved[..len]).is_err(), "{len} bytes");
        }
        let mut state: I8042State = decode(SNAPSHOT_NAME, &saved).unwrap();
        state.mouse.queue = vec![0; DEVICE_QUEUE_LIMIT + 1].into();
        let overfull = encode(SNAPSHOT_NAME, &state).unwrap();
        assert!(g.dev.restore(&overfull).is_err());
        g.command(0x20);
        assert_eq!(g.bytes(), vec![0x65], "a refused state changes nothing");
    }

    #[test]
    fn translation_table_is_consistent() {
        // No two set 2 make codes translate to the same set 1 code (except the known
        // F7 alias), and every translated code is a make code.
        let mut seen = std::collections::HashMap::new();
        for (set2, &set1) in SET2_TO_SET1.iter().enumerate().skip(1) {
            assert!(set1 < 0x80 || set2 == 0, "{set2:#x}");
            if let Some(prev) = seen.insert(set1, set2) {
                panic!("{set1:#x} from both {prev:#x} and {set2:#x}");
            }
        }
    }
}
