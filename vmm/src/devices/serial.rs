//! A 16550A UART (the PC's COM ports) on `vm-superio`.
//!
//! Output goes to a `Write` sink, normally a [`ChardevWriter`](crate::chardev::ChardevWriter).
//! Input arrives through [`SerialInput`], which a chardev's input thread drives: it offers
//! bytes while the 64-byte receive FIFO has room and otherwise waits until the guest has
//! drained it, so input is flow-controlled rather than dropped.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Trigger;

use crate::chardev::ChardevInput;
use crate::devices::bus::BusDevice;
use crate::devices::interrupt::{InterruptError, IrqLine};
use crate::snapshot::{decode, encode, SnapshotError, Snapshottable};

/// Number of I/O ports a UART occupies.
pub const SERIAL_PORT_COUNT: u64 = 8;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("failed to restore the UART state: {0}")]
    Restore(String),
}

/// Raises the UART's ISA interrupt: one edge per event.
pub struct IrqTrigger(IrqLine);

impl Trigger for IrqTrigger {
    type E = InterruptError;

    fn trigger(&self) -> Result<(), InterruptError> {
        self.0.pulse()
    }
}

/// Wakes the input side when the guest has emptied the receive FIFO.
#[derive(Default)]
pub struct RoomSignal {
    emptied: Mutex<bool>,
    cond: Condvar,
}

impl RoomSignal {
    fn wait(&self, timeout: Duration) {
        let emptied = self.emptied.lock().unwrap_or_else(|e| e.into_inner());
        let (mut emptied, _) = self
            .cond
            .wait_timeout_while(emptied, timeout, |e| !*e)
            .unwrap_or_else(|e| e.into_inner());
        *emptied = false;
    }
}

impl SerialEvents for RoomSignal {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        *self.emptied.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cond.notify_all();
    }
}

type Uart = vm_superio::Serial<IrqTrigger, Arc<RoomSignal>, Box<dyn Write + Send>>;

/// A 16550A serial port: a [`BusDevice`] covering [`SERIAL_PORT_COUNT`] ports.
pub struct Serial {
    uart: Uart,
    room: Arc<RoomSignal>,
    /// Whether an output error was already logged (so a broken sink does not flood the log).
    output_error_logged: bool,
}

impl Serial {
    /// A UART raising `irq` and writing the guest's output to `out`.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>) -> Self {
        let room = Arc::new(RoomSignal::default());
        Self {
            uart: vm_superio::Serial::with_events(IrqTrigger(irq), room.clone(), out),
            room,
            output_error_logged: false,
        }
    }

    /// Rebuild a UART from a saved [`SerialState`].
    pub fn from_state(
        state: &SerialState,
        irq: IrqLine,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, SerialError> {
        let room = Arc::new(RoomSignal::default());
        let uart = vm_superio::Serial::from_state(state, IrqTrigger(irq), room.clone(), out)
            .map_err(|e| SerialError::Restore(format!("{e:?}")))?;
        Ok(Self {
            uart,
            room,
            output_error_logged: false,
        })
    }

    /// The register and FIFO state, for snapshots.
    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// Put as many of `bytes` into the receive FIFO as fit; return how many did.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        if bytes.is_empty() || room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::Trigger(e)) => {
                // The bytes are in the FIFO; only the interrupt failed.
                tracing::warn!("serial: failed to raise the receive interrupt: {e}");
                bytes.len().min(room)
            }
            Err(e) => {
                tracing::debug!("serial: input not queued: {e}");
                0
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    fn read_register(&mut self, offset: u64) -> u8 {
        match u8::try_from(offset) {
            Ok(o) if u64::from(o) < SERIAL_PORT_COUNT => self.uart.read(o),
            _ => 0xff,
        }
    }

    fn write_register(&mut self, offset: u64, value: u8) {
        let Ok(o) = u8::try_from(offset) else {
            return;
        };
        if u64::from(o) >= SERIAL_PORT_COUNT {
            return;
        }
        match self.uart.write(o, value) {
            Ok(()) => {}
            Err(vm_superio::serial::Error::Trigger(e)) => {
                tracing::warn!("serial: failed to raise an interrupt: {e}");
            }
            Err(e) => {
                if !self.output_error_logged {
                    self.output_error_logged = true;
                    tracing::warn!("serial: output lost: {e}");
                }
            }
        }
    }
}

impl BusDevice for Serial {
    /// Byte registers; a wider access is split into byte accesses of consecutive
    /// registers, as the ISA bus does for an 8-bit device.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.read_register(offset + i as u64);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            self.write_register(offset + i as u64, *byte);
        }
    }
}

/// Name of the UART's state in snapshots and their errors.
const SNAPSHOT_NAME: &str = "serial";

/// [`SerialState`]'s fields for serde (vm-superio's type has no serde support).
#[derive(Serialize, Deserialize)]
#[serde(remote = "SerialState")]
struct SerialStateDef {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

/// The UART's state as a snapshot encodes it.
#[derive(Serialize, Deserialize)]
struct SerialSnapshot(#[serde(with = "SerialStateDef")] SerialState);

impl Snapshottable for Serial {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        encode(SNAPSHOT_NAME, &SerialSnapshot(self.uart.state()))
    }

    /// vm-superio cannot load a state in place, so a new UART is built from it with this
    /// one's interrupt and room signal, and then takes over this one's output writer (the
    /// new UART starts with a sink, so a refused state leaves the device as it was). As
    /// vm-superio does, a pending THR-empty or received-data interrupt is raised again.
    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let snapshot: SerialSnapshot = decode(SNAPSHOT_NAME, state)?;
        let irq = IrqTrigger(self.uart.interrupt_evt().0.clone());
        let mut uart = vm_superio::Serial::from_state(
            &snapshot.0,
            irq,
            self.room.clone(),
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        )
        .map_err(|e| SnapshotError::Decode {
            what: SNAPSHOT_NAME,
            message: e.to_string(),
        })?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        // An input thread waiting for room must look again: the FIFO's fill level changed.
        if self.uart.fifo_capacity() > 0 {
            self.room.in_buffer_empty();
        }
        Ok(())
    }
}

/// Connects a chardev's input to a [`Serial`]. Holds the device weakly: once the device is
/// gone, input is discarded instead of waited on.
pub struct SerialInput {
    device: Weak<Mutex<Serial>>,
    room: Arc<RoomSignal>,
}

impl SerialInput {
    pub fn new(device: Arc<Mutex<Serial>>) -> Self {
        let room = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .room
            .clone();
        Self {
            device: Arc::downgrade(&device),
            room,
        }
    }
}

impl ChardevInput for SerialInput {
    fn offer(&self, bytes: &[u8]) -> usize {
        match self.device.upgrade() {
            Some(dev) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .enqueue_input(bytes),
            None => bytes.len(),
        }
    }

    fn wait_for_room(&self, timeout: Duration) {
        self.room.wait(timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::interrupt::test_util::RecordingIrqChip;

    const RBR_THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const LSR_DATA_READY: u8 = 0x01;

    /// A Write sink the test can look into.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn serial() -> (Arc<Mutex<Serial>>, SharedBuf, Arc<RecordingIrqChip>) {
        let chip = Arc::new(RecordingIrqChip::default());
        let out = SharedBuf::default();
        let dev = Serial::new(IrqLine::new(chip.clone(), 4), Box::new(out.clone()));
        (Arc::new(Mutex::new(dev)), out, chip)
    }

    fn read_byte(dev: &Arc<Mutex<Serial>>, offset: u64) -> u8 {
        let mut data = [0u8];
        dev.lock().unwrap().read(offset, &mut data);
        data[0]
    }

    #[test]
    fn output_reaches_sink_and_raises_thre_interrupt() {
        let (dev, out, chip) = serial();
        dev.lock().unwrap().write(RBR_THR, b"h");
        assert_eq!(chip.edges(4), 0, "no interrupt while IER is clear");
        dev.lock().unwrap().write(IER, &[IER_THRE]);
        let after_ier = chip.edges(4);
        assert_eq!(after_ier, 1, "enabling THRE with an empty THR interrupts");
        // Reading IIR acknowledges the THRE interrupt; the next byte raises it again.
        read_byte(&dev, 2);
        dev.lock().unwrap().write(RBR_THR, b"i");
        assert_eq!(chip.edges(4), after_ier + 1);
        assert_eq!(&out.0.lock().unwrap()[..], b"hi");
    }

    #[test]
    fn input_is_readable_from_rbr() {
        let (dev, _out, chip) = serial();
        dev.lock().unwrap().write(IER, &[IER_RDA]);
        let input = SerialInput::new(dev.clone());
        assert_eq!(input.offer(b"ok"), 2);
        assert_eq!(chip.edges(4), 1, "received data interrupt");
        assert_eq!(read_byte(&dev, LSR) & LSR_DATA_READY, LSR_DATA_READY);
        assert_eq!(read_byte(&dev, RBR_THR), b'o');
        assert_eq!(read_byte(&dev, RBR_THR), b'k');
        assert_eq!(read_byte(&dev, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn fifo_fills_then_refuses() {
        let (dev, _out, _chip) = serial();
        let input = SerialInput::new(dev.clone());
        assert_eq!(input.offer(&[b'a'; 100]), 64);
        assert_eq!(input.offer(b"b"), 0);
        read_byte(&dev, RBR_THR);
        assert_eq!(input.offer(b"bc"), 1);
    }

    #[test]
    fn wide_accesses_split_into_bytes() {
        let (dev, out, _chip) = serial();
        // Scratch register round trip, and a 2-byte write starting at THR.
        dev.lock().unwrap().write(7, &[0x5a]);
        assert_eq!(read_byte(&dev, 7), 0x5a);
        dev.lock().unwrap().write(RBR_THR, &[b'x', 0]);
        assert_eq!(&out.0.lock().unwrap()[..], b"x");
        let mut data = [0u8; 2];
        dev.lock().unwrap().read(7, &mut data);
        assert_eq!(
            data,
            [0x5a, 0xff],
            "beyond the 8 registers reads as unclaimed"
        );
    }

    #[test]
    fn flow_control_loses_no_bytes() {
        let (dev, _out, _chip) = serial();
        let input = SerialInput::new(dev.clone());
        let sent: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();

        let reader = {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                while got.len() < 1000 {
                    let ready = read_byte(&dev, LSR) & LSR_DATA_READY != 0;
                    if ready {
                        got.push(read_byte(&dev, RBR_THR));
                    } else {
                        std::thread::yield_now();
                    }
                }
                got
            })
        };

        // What a chardev input thread does: offer, and wait for room when full.
        let mut rest = &sent[..];
        let mut waits = 0;
        while !rest.is_empty() {
            let n = input.offer(rest);
            rest = &rest[n..];
            if n == 0 {
                waits += 1;
                input.wait_for_room(Duration::from_millis(100));
            }
        }
        assert_eq!(reader.join().unwrap(), sent);
        assert!(waits > 0, "the 64-byte FIFO must have filled at least once");
    }

    #[test]
    fn pasted_socket_input_reaches_the_guest_intact() {
        use crate::chardev::{parse_chardev, Chardev};
        use std::io::Read;
        use std::os::unix::net::UnixStream;

        let path = std::env::temp_dir().join(format!("vmm-serial-{}.sock", std::process::id()));
        let spec = parse_chardev(&format!("unix:{},server=on,wait=off", path.display())).unwrap();
        let chardev = Chardev::open(&spec, "serial0").unwrap();
        let chip = Arc::new(RecordingIrqChip::default());
        let dev = Arc::new(Mutex::new(Serial::new(
            IrqLine::new(chip, 4),
            Box::new(chardev.writer()),
        )));
        chardev.set_input(Arc::new(SerialInput::new(dev.clone())));

        let mut client = UnixStream::connect(&path).unwrap();
        let pasted: Vec<u8> = (0..20_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        client.write_all(&pasted).unwrap();

        // The "guest": a slow reader of the receive FIFO that echoes what it gets.
        let mut got = Vec::new();
        while got.len() < pasted.len() {
            if read_byte(&dev, LSR) & LSR_DATA_READY != 0 {
                let b = read_byte(&dev, RBR_THR);
                got.push(b);
                dev.lock().unwrap().write(RBR_THR, &[b]);
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        assert_eq!(got, pasted);
        let mut echoed = vec![0u8; pasted.len()];
        client.read_exact(&mut echoed).unwrap();
        assert_eq!(echoed, pasted);
    }

    #[test]
    fn input_to_a_removed_device_is_discarded() {
        let (dev, _out, _chip) = serial();
        let input = SerialInput::new(dev.clone());
        drop(dev);
        assert_eq!(input.offer(b"lost"), 4);
    }

    #[test]
    fn state_round_trip() {
        let (dev, _out, _chip) = serial();
        dev.lock().unwrap().write(7, &[0x42]);
        SerialInput::new(dev.clone()).offer(b"zz");
        let state = dev.lock().unwrap().state();
        let chip = Arc::new(RecordingIrqChip::default());
        let mut restored = Serial::from_state(
            &state,
            IrqLine::new(chip, 4),
            Box::new(SharedBuf::default()),
        )
        .unwrap();
        let mut data = [0u8];
        restored.read(7, &mut data);
        assert_eq!(data[0], 0x42);
        assert_eq!(restored.input_room(), 62);
    }

    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const SCRATCH: u64 = 7;
    const LCR_DLAB: u8 = 0x80;

    /// Every register a guest can read, without disturbing the FIFO (the divisor latch
    /// through DLAB, which is put back afterwards).
    fn registers(dev: &Arc<Mutex<Serial>>) -> Vec<u8> {
        let lcr = read_byte(dev, LCR);
        let mut regs = vec![
            read_byte(dev, IER),
            read_byte(dev, LCR),
            read_byte(dev, MCR),
            read_byte(dev, LSR),
            read_byte(dev, SCRATCH),
        ];
        dev.lock().unwrap().write(LCR, &[lcr | LCR_DLAB]);
        regs.push(read_byte(dev, 0));
        regs.push(read_byte(dev, 1));
        dev.lock().unwrap().write(LCR, &[lcr]);
        regs
    }

    #[test]
    fn snapshot_restores_registers_and_fifo_and_keeps_the_output() {
        let (dev, _out, _chip) = serial();
        // 38400 baud, 7E1, loopback off, OUT2 and RTS, a scratch value, RDA interrupts on.
        dev.lock().unwrap().write(LCR, &[LCR_DLAB]);
        dev.lock().unwrap().write(0, &[0x03, 0x00]);
        dev.lock().unwrap().write(LCR, &[0x1a]);
        dev.lock().unwrap().write(MCR, &[0x0a]);
        dev.lock().unwrap().write(SCRATCH, &[0x5a]);
        dev.lock().unwrap().write(IER, &[IER_RDA]);
        SerialInput::new(dev.clone()).offer(b"hey");
        let before = registers(&dev);
        let saved = dev.lock().unwrap().save().unwrap();

        let (fresh, out, chip) = serial();
        fresh.lock().unwrap().restore(&saved).unwrap();
        assert_eq!(
            chip.edges(4),
            1,
            "the pending received-data interrupt is raised"
        );
        assert_eq!(registers(&fresh), before);
        assert_eq!(read_byte(&fresh, IIR), read_byte(&dev, IIR));
        assert_eq!(fresh.lock().unwrap().input_room(), 61);
        assert_eq!(read_byte(&fresh, RBR_THR), b'h');
        assert_eq!(read_byte(&fresh, RBR_THR), b'e');
        assert_eq!(read_byte(&fresh, RBR_THR), b'y');
        assert_eq!(read_byte(&fresh, LSR) & LSR_DATA_READY, 0);
        // Output goes to the restored device's own writer.
        fresh.lock().unwrap().write(RBR_THR, b"!");
        assert_eq!(&out.0.lock().unwrap()[..], b"!");
        // And input reaches it through an input made before the restore.
        let input = SerialInput::new(fresh.clone());
        assert_eq!(input.offer(b"k"), 1);
        assert_eq!(read_byte(&fresh, RBR_THR), b'k');
    }

    #[test]
    fn snapshot_refuses_bad_state_and_leaves_the_device_alone() {
        let (dev, _out, _chip) = serial();
        dev.lock().unwrap().write(SCRATCH, &[0x11]);
        let saved = dev.lock().unwrap().save().unwrap();
        let (fresh, out, _chip) = serial();
        fresh.lock().unwrap().write(SCRATCH, &[0x22]);
        for len in 0..saved.len() {
            assert!(fresh.lock().unwrap().restore(&saved[..len]).is_err());
        }
        // More bytes than the 64-byte FIFO holds.
        let mut state: SerialSnapshot = decode(SNAPSHOT_NAME, &saved).unwrap();
        state.0.in_buffer = vec![b'x'; 65];
        let overfull = encode(SNAPSHOT_NAME, &state).unwrap();
        assert!(matches!(
            fresh.lock().unwrap().restore(&overfull),
            Err(SnapshotError::Decode { .. })
        ));
        assert_eq!(read_byte(&fresh, SCRATCH), 0x22);
        fresh.lock().unwrap().write(RBR_THR, b"o");
        assert_eq!(&out.0.lock().unwrap()[..], b"o");
    }
}
