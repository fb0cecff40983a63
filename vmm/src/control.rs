//! Requests that devices, vCPUs and the QMP monitor make of the machine as a whole: reset,
//! power off, the debug-exit used by tests, and monitor commands. They are sent to the main
//! thread, which owns the machine.

use std::sync::mpsc;

use crate::machine::{Machine, MachineExit};

/// What a device, vCPU or monitor asks the machine to do.
#[derive(Debug, PartialEq)]
pub enum MachineRequest {
    /// The guest asked for a reset (i8042 0xFE, ACPI reset register, triple fault).
    Reset(ResetCause),
    /// The guest powered off (ACPI S5).
    Shutdown,
    /// The guest wrote `value` to the debug-exit port: exit with `(value << 1) | 1`,
    /// as QEMU's isa-debug-exit does.
    DebugExit(u32),
    /// A vCPU hit an error it cannot continue from.
    InternalError,
    /// A disk's error policy says stop: the VM goes to the io-error state.
    BlockIoErrorStop,
    /// The host asked the vmm to exit (SIGTERM, SIGINT, SIGHUP).
    Quit,
    /// The guest ejected the device in PCI slot `slot` of bus 0 (it wrote the slot's bit to
    /// the hot-plug eject register, B0EJ, from the slot's `_EJ0`).
    PciEject { slot: u8 },
    /// Work to do on the main thread against the machine (a QMP command; the reply goes
    /// back through the job).
    Run(Box<dyn MachineJob>),
}

/// Work handed to the main thread, which owns the machine.
pub trait MachineJob: Send + std::fmt::Debug {
    /// Do it; how the machine must exit, if it must.
    fn run(self: Box<Self>, machine: &mut Machine) -> Option<MachineExit>;
    /// The job itself, for tests that answer jobs without a machine.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any>;
}

/// Work for the main thread as a closure.
type JobFn = Box<dyn FnOnce(&mut Machine) -> Option<MachineExit> + Send>;

/// A closure run on the main thread against the machine (migration's requests).
pub struct FnJob(JobFn);

impl FnJob {
    pub fn new(f: impl FnOnce(&mut Machine) -> Option<MachineExit> + Send + 'static) -> Self {
        FnJob(Box::new(f))
    }
}

impl std::fmt::Debug for FnJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnJob")
    }
}

impl MachineJob for FnJob {
    fn run(self: Box<Self>, machine: &mut Machine) -> Option<MachineExit> {
        (self.0)(machine)
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any> {
        self
    }
}

/// Two jobs are the same request only if they are the same job.
impl PartialEq for dyn MachineJob {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::addr_eq(self, other)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetCause {
    Keyboard,
    AcpiResetRegister,
    TripleFault,
}

/// A cloneable handle through which devices send [`MachineRequest`]s.
#[derive(Clone)]
pub struct MachineControl {
    tx: mpsc::Sender<MachineRequest>,
}

impl MachineControl {
    pub fn new() -> (Self, mpsc::Receiver<MachineRequest>) {
        let (tx, rx) = mpsc::channel();
        (Self { tx }, rx)
    }

    /// Send a request. The machine may already be gone during teardown; that is not an error
    /// anyone can act on, so it is logged and dropped.
    pub fn request(&self, req: MachineRequest) {
        if let Err(mpsc::SendError(req)) = self.tx.send(req) {
            tracing::debug!(?req, "machine request after the machine stopped listening");
        }
    }
}
