//! virtio-input (`virtio-tablet-pci`, `virtio-keyboard-pci`, `virtio-mouse-pci`): the
//! configuration space here, as QEMU's devices describe themselves (names, ids, event
//! bits, the tablet's axes), and the queues in `vmm-display` over vhost-user, so that VNC
//! input reaches the guest's event queue without passing through the vmm.
//!
//! The vhost-user connection is made when the display process starts, which is after the
//! command line's devices: until then the device has no backend, and the driver cannot
//! get that far before the machine runs.

use ipc::display::InputKind;

use super::vhost_user::VhostUserDevice;
use super::{Activation, VirtioBackend, VirtioError, VIRTIO_F_VERSION_1};
use crate::snapshot::{decode, encode, SnapshotError};

pub const VIRTIO_ID_INPUT: u16 = 18;
pub const QUEUE_SIZE: u16 = 64;
const SNAPSHOT: &str = "a virtio-input device";
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

// Configuration selectors.
const CFG_UNSET: u8 = 0;
const CFG_ID_NAME: u8 = 1;
const CFG_ID_SERIAL: u8 = 2;
const CFG_ID_DEVIDS: u8 = 3;
const CFG_PROP_BITS: u8 = 0x10;
const CFG_EV_BITS: u8 = 0x11;
const CFG_ABS_INFO: u8 = 0x12;
/// select, subsel, size, 5 reserved bytes, then the 128-byte payload.
const CONFIG_SIZE: usize = 136;
const PAYLOAD: usize = 8;

const EV_KEY: u8 = 1;
const EV_REL: u8 = 2;
const EV_ABS: u8 = 3;
const EV_LED: u8 = 0x11;
const EV_REP: u8 = 0x14;
const BTN_LEFT: u16 = 0x110;
const BTN_RIGHT: u16 = 0x111;
const BTN_MIDDLE: u16 = 0x112;
const REL_X: u16 = 0;
const REL_Y: u16 = 1;
const REL_WHEEL: u16 = 8;
const ABS_MAX: u32 = 0x7fff;
const BUS_VIRTUAL: u16 = 0x06;

/// QEMU's name for a device of `kind` (the guest's input device name, and query-mice's).
pub fn device_name(kind: InputKind) -> &'static str {
    match kind {
        InputKind::Tablet => "QEMU Virtio Tablet",
        InputKind::Keyboard => "QEMU Virtio Keyboard",
        InputKind::Mouse => "QEMU Virtio Mouse",
    }
}

fn bitmap(bits: impl IntoIterator<Item = u16>) -> Vec<u8> {
    let mut map = Vec::new();
    for bit in bits {
        let byte = usize::from(bit / 8);
        if map.len() <= byte {
            map.resize(byte + 1, 0);
        }
        map[byte] |= 1 << (bit % 8);
    }
    map
}

/// The payload for `select`/`subsel` on a device of `kind` (empty: nothing there).
pub fn config_payload(kind: InputKind, select: u8, subsel: u8) -> Vec<u8> {
    match select {
        CFG_ID_NAME if subsel == 0 => device_name(kind).as_bytes().to_vec(),
        CFG_ID_SERIAL => Vec::new(),
        CFG_ID_DEVIDS if subsel == 0 => {
            let product: u16 = match kind {
                InputKind::Keyboard => 1,
                InputKind::Mouse => 2,
                InputKind::Tablet => 3,
            };
            [BUS_VIRTUAL, 0x0627, product, 1]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
        CFG_PROP_BITS => Vec::new(),
        CFG_EV_BITS => match (kind, subsel) {
            (InputKind::Keyboard, EV_KEY) => bitmap(1..128),
            (InputKind::Keyboard, EV_REP) => vec![],
            (InputKind::Keyboard, EV_LED) => bitmap([0, 1, 2]),
            (InputKind::Tablet | InputKind::Mouse, EV_KEY) => {
                bitmap([BTN_LEFT, BTN_RIGHT, BTN_MIDDLE])
            }
            (InputKind::Tablet, EV_REL) => bitmap([REL_WHEEL]),
            (InputKind::Tablet, EV_ABS) => bitmap([0, 1]),
            (InputKind::Mouse, EV_REL) => bitmap([REL_X, REL_Y, REL_WHEEL]),
            _ => Vec::new(),
        },
        CFG_ABS_INFO if kind == InputKind::Tablet && subsel <= 1 => {
            // min, max, fuzz, flat, res
            [0, ABS_MAX, 0, 0, 0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
        _ => Vec::new(),
    }
}

/// A virtio-input device: its configuration, and its queues' backend once connected.
pub struct VirtioInput {
    kind: InputKind,
    select: u8,
    subsel: u8,
    backend: Option<VhostUserDevice>,
}

impl VirtioInput {
    pub fn new(kind: InputKind) -> Self {
        VirtioInput {
            kind,
            select: CFG_UNSET,
            subsel: 0,
            backend: None,
        }
    }

    pub fn kind(&self) -> InputKind {
        self.kind
    }

    /// The queues' backend is connected.
    pub fn attach(&mut self, backend: VhostUserDevice) {
        self.backend = Some(backend);
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        c[0] = self.select;
        c[1] = self.subsel;
        let payload = config_payload(self.kind, self.select, self.subsel);
        // EV_REP is reported present with an empty bitmap, as QEMU's keyboard does.
        let present = !payload.is_empty()
            || (self.kind == InputKind::Keyboard
                && self.select == CFG_EV_BITS
                && self.subsel == EV_REP);
        let n = payload.len().min(CONFIG_SIZE - PAYLOAD);
        c[2] = if present { n.max(1) as u8 } else { 0 };
        c[PAYLOAD..PAYLOAD + n].copy_from_slice(&payload[..n]);
        c
    }
}

impl VirtioBackend for VirtioInput {
    fn migration_blocker(&self) -> Option<String> {
        self.backend.as_ref().and_then(|b| b.migration_blocker())
    }

    /// The queues stop in the display process; the configuration selector moves.
    fn save_state(&mut self) -> Result<Vec<u8>, SnapshotError> {
        if let Some(backend) = &mut self.backend {
            backend.save_state()?;
        }
        encode(SNAPSHOT, &(self.select, self.subsel))
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        (self.select, self.subsel) = decode(SNAPSHOT, state)?;
        Ok(())
    }

    fn resume_after_save(&mut self) {
        if let Some(backend) = &mut self.backend {
            backend.resume_after_save();
        }
    }

    fn device_type(&self) -> u16 {
        VIRTIO_ID_INPUT
    }

    fn num_queues(&self) -> usize {
        2
    }

    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            match offset + i as u64 {
                0 => self.select = *byte,
                1 => self.subsel = *byte,
                _ => {}
            }
        }
    }

    fn activate(&mut self, activation: Activation<'_>) -> Result<(), VirtioError> {
        match &mut self.backend {
            Some(backend) => backend.activate(activation),
            None => Err(VirtioError::Backend(
                "the input device has no backend (vmm-display is not running)".into(),
            )),
        }
    }

    fn reset(&mut self) {
        if let Some(backend) = &mut self.backend {
            backend.reset();
        }
        self.select = CFG_UNSET;
        self.subsel = 0;
    }

    fn as_vhost_user(&mut self) -> Option<&mut VhostUserDevice> {
        self.backend.as_mut()
    }

    fn as_input(&mut self) -> Option<&mut VirtioInput> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dev: &mut VirtioInput, select: u8, subsel: u8) -> (u8, Vec<u8>) {
        dev.write_config(0, &[select, subsel]);
        let mut c = [0u8; CONFIG_SIZE];
        dev.read_config(0, &mut c);
        (c[2], c[PAYLOAD..PAYLOAD + usize::from(c[2])].to_vec())
    }

    #[test]
    fn the_tablet_describes_itself_as_qemus_does() {
        let mut t = VirtioInput::new(InputKind::Tablet);
        assert_eq!(read(&mut t, CFG_ID_NAME, 0).1, b"QEMU Virtio Tablet");
        let (size, ids) = read(&mut t, CFG_ID_DEVIDS, 0);
        assert_eq!(size, 8);
        assert_eq!(ids, [6, 0, 0x27, 0x06, 3, 0, 1, 0]);
        assert_eq!(read(&mut t, CFG_EV_BITS, EV_ABS).1, [0b11]);
        let (size, keys) = read(&mut t, CFG_EV_BITS, EV_KEY);
        assert_eq!(usize::from(size), 0x112 / 8 + 1);
        assert_eq!(keys[0x110 / 8], 0b111);
        let (size, abs) = read(&mut t, CFG_ABS_INFO, 0);
        assert_eq!(size, 20);
        assert_eq!(abs[4..8], 0x7fffu32.to_le_bytes());
        assert_eq!(read(&mut t, CFG_EV_BITS, EV_LED).0, 0, "no LEDs");
        assert_eq!(read(&mut t, 0x99, 0).0, 0);
    }

    #[test]
    fn keyboard_and_mouse() {
        let mut k = VirtioInput::new(InputKind::Keyboard);
        assert_eq!(read(&mut k, CFG_EV_BITS, EV_KEY).0, 16);
        assert_eq!(read(&mut k, CFG_EV_BITS, EV_REP).0, 1);
        assert_eq!(read(&mut k, CFG_EV_BITS, EV_LED).1, [0b111]);
        let mut m = VirtioInput::new(InputKind::Mouse);
        assert_eq!(read(&mut m, CFG_EV_BITS, EV_REL).1, [0b11, 0b1]);
        assert_eq!(read(&mut m, CFG_EV_BITS, EV_ABS).0, 0);
    }
}
