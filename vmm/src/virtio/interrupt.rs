//! How a virtio-pci function interrupts the guest: an MSI-X vector per queue and one for
//! configuration changes, or, while the driver has not enabled MSI-X, the INTx line with the
//! ISR status register. The backend signals a queue by writing that queue's call eventfd;
//! a relay thread turns those writes into interrupts.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::msix::{MsiMessage, MsixTable};
use crate::accel::Accelerator;
use crate::devices::IrqLine;

/// "No vector" in the queue and configuration vector registers.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// ISR status bits.
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("cannot create the stop eventfd of the interrupt relay: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("cannot start the interrupt relay thread: {0}")]
    Thread(#[source] std::io::Error),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The interrupt state of one function, shared by its transport and its relay thread.
pub struct VirtioInterrupt {
    pub msix: MsixTable,
    /// The MSI-X vector of each queue.
    pub queue_vectors: Vec<u16>,
    pub config_vector: u16,
    isr: u8,
    intx: Option<IrqLine>,
    accel: Arc<dyn Accelerator>,
}

impl VirtioInterrupt {
    /// `vectors`: the MSI-X table's size (0: no MSI-X).
    pub fn new(num_queues: usize, vectors: u16, accel: Arc<dyn Accelerator>) -> Self {
        VirtioInterrupt {
            msix: MsixTable::new(vectors),
            queue_vectors: vec![VIRTIO_MSI_NO_VECTOR; num_queues],
            config_vector: VIRTIO_MSI_NO_VECTOR,
            isr: 0,
            intx: None,
            accel,
        }
    }

    /// The ISR status bits (a snapshot keeps them).
    pub fn isr(&self) -> u8 {
        self.isr
    }

    pub fn set_intx(&mut self, line: IrqLine) {
        self.intx = Some(line);
    }

    /// Device reset: vectors unassigned, ISR clear, line low. The MSI-X table belongs to
    /// the PCI function, not to the virtio device, and survives.
    pub fn reset(&mut self) {
        self.queue_vectors.fill(VIRTIO_MSI_NO_VECTOR);
        self.config_vector = VIRTIO_MSI_NO_VECTOR;
        self.set_isr(0);
    }

    /// A vector number the driver may assign, or [`VIRTIO_MSI_NO_VECTOR`] if it is out of
    /// range (the driver reads that back and gives up on the vector, as the spec says).
    pub fn accept_vector(&self, vector: u16) -> u16 {
        if vector < self.msix.num_vectors() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    pub fn signal_queue(&mut self, queue: usize) {
        let vector = self
            .queue_vectors
            .get(queue)
            .copied()
            .unwrap_or(VIRTIO_MSI_NO_VECTOR);
        self.signal(vector, ISR_QUEUE);
    }

    pub fn signal_config(&mut self) {
        self.signal(self.config_vector, ISR_CONFIG);
    }

    fn signal(&mut self, vector: u16, isr_bit: u8) {
        if self.msix.enabled() {
            if vector != VIRTIO_MSI_NO_VECTOR {
                if let Some(msg) = self.msix.trigger(vector) {
                    self.send(msg);
                }
            }
        } else {
            self.set_isr(self.isr | isr_bit);
        }
    }

    /// The ISR status register: reading it returns the bits and clears them, which also
    /// lowers INTx.
    pub fn read_isr(&mut self) -> u8 {
        let value = self.isr;
        self.set_isr(0);
        value
    }

    pub fn send(&self, msg: MsiMessage) {
        if let Err(e) = self.accel.signal_msi(msg.address, msg.data) {
            tracing::warn!("virtio MSI-X message {msg:x?} not delivered: {e}");
        }
    }

    /// Set the ISR status bits, the INTx line following them.
    pub fn set_isr(&mut self, value: u8) {
        let was = self.isr != 0;
        self.isr = value;
        let now = value != 0;
        if was != now {
            if let Some(line) = &self.intx {
                if let Err(e) = line.set_level(now) {
                    tracing::warn!("virtio INTx: {e}");
                }
            }
        }
    }
}

/// A thread that waits on the call eventfds of a device's queues and interrupts the guest
/// for each signal. Stops when dropped.
pub struct CallRelay {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl CallRelay {
    /// Relay `calls` (queue index and its call eventfd) into `interrupt`.
    pub fn start(
        name: &str,
        calls: Vec<(usize, EventFd)>,
        interrupt: Arc<Mutex<VirtioInterrupt>>,
    ) -> Result<Self, InterruptError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::EventFd)?;
        let stop_copy = stop.try_clone().map_err(InterruptError::EventFd)?;
        let thread = std::thread::Builder::new()
            .name(format!("{name}-irq"))
            .spawn(move || relay_loop(&calls, &stop_copy, &interrupt))
            .map_err(InterruptError::Thread)?;
        Ok(CallRelay {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for CallRelay {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn relay_loop(calls: &[(usize, EventFd)], stop: &EventFd, interrupt: &Mutex<VirtioInterrupt>) {
    let mut fds: Vec<libc::pollfd> = calls
        .iter()
        .map(|(_, fd)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    fds.push(libc::pollfd {
        fd: stop.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("virtio interrupt relay: poll: {e}; interrupts stop");
            return;
        }
        if fds.last().is_some_and(|p| p.revents != 0) {
            return;
        }
        for (i, (queue, fd)) in calls.iter().enumerate() {
            if fds[i].revents == 0 {
                continue;
            }
            // Non-blocking read clears the counter; a concurrent signal re-arms it.
            if fd.read().is_ok() {
                lock(interrupt).signal_queue(*queue);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::interrupt::test_util::RecordingIrqChip;

    /// Enough of an accelerator to record MSIs.
    fn accel() -> Arc<crate::accel::test_util::RecordingAccel> {
        Arc::new(crate::accel::test_util::RecordingAccel::default())
    }

    #[test]
    fn intx_follows_isr_until_read() {
        let chip = Arc::new(RecordingIrqChip::default());
        let mut irq = VirtioInterrupt::new(2, 3, accel());
        irq.set_intx(IrqLine::new(chip.clone(), 20));
        irq.signal_queue(1);
        irq.signal_config();
        assert_eq!(irq.read_isr(), ISR_QUEUE | ISR_CONFIG);
        assert_eq!(irq.read_isr(), 0);
        assert_eq!(*lock(&chip.events), vec![(20, true), (20, false)]);
    }

    #[test]
    fn msix_vectors_and_relay() {
        let accel = accel();
        let irq = Arc::new(Mutex::new(VirtioInterrupt::new(2, 3, accel.clone())));
        {
            let mut i = lock(&irq);
            i.msix.write_table(16, &0xfee0_0000u32.to_le_bytes());
            i.msix.write_table(16 + 8, &0x45u32.to_le_bytes());
            i.msix.write_table(16 + 12, &0u32.to_le_bytes());
            i.msix.set_control(super::super::msix::MSIX_ENABLE);
            i.queue_vectors[0] = i.accept_vector(1);
            i.queue_vectors[1] = i.accept_vector(9);
            assert_eq!(i.queue_vectors[1], VIRTIO_MSI_NO_VECTOR);
        }
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let relay =
            CallRelay::start("test", vec![(0, call.try_clone().unwrap())], irq.clone()).unwrap();
        call.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while accel.msis().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        drop(relay);
        assert_eq!(accel.msis(), vec![(0xfee0_0000, 0x45)]);
        // No vector for queue 1: nothing at all, and the ISR stays clear under MSI-X.
        lock(&irq).signal_queue(1);
        assert_eq!(accel.msis().len(), 1);
        assert_eq!(lock(&irq).read_isr(), 0);
    }
}
