//! `vmm-scsi`: a virtio-scsi host adapter (vhost-user-scsi) serving CD-ROM logical
//! units, sandboxed, started and driven by the vmm (one process per `virtio-scsi-pci`
//! controller).
//!
//! The control socket (fd 3, protocol [`ipc::scsi`]) sets the controller up, adds LUNs
//! and changes media; the vhost-user socket (fd 4) serves the queues. The parts:
//! [`supervised`] (the process and its control loop), [`backend`] (vhost-user and the
//! virtio-scsi queues), [`bus`] (targets and LUNs) and [`cdrom`] (the MMC commands).

pub mod backend;
pub mod bus;
pub mod cdrom;
pub mod supervised;

use std::io;

use crate::{inherit, sandbox};

#[derive(Debug, thiserror::Error)]
pub enum ScsiError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Inherit(#[from] inherit::InheritError),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error("control socket: {0}")]
    Ipc(#[from] ipc::IpcError),
    #[error("control socket: {0}")]
    Control(#[source] io::Error),
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error("cannot block SIGTERM and SIGINT: {0}")]
    Signals(#[source] io::Error),
    #[error("cannot start a thread: {0}")]
    Thread(#[source] io::Error),
}

pub const USAGE: &str = "\
usage: vmm-scsi
The virtio-scsi (vhost-user) CD-ROM controller process of the vmm. It is started by the
vmm with its control socket at fd 3 and a listening vhost-user socket at fd 4, and takes
no arguments. VMM_LOG sets the log filter (tracing EnvFilter syntax; default warn).";

/// The program: run, and return the exit status (0, or 1 after printing one line on
/// stderr).
pub fn main() -> i32 {
    init_logging();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        None => supervised::run(),
        Some("-h" | "--help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(ScsiError::Usage(format!(
            "unexpected argument '{other}' (see --help)"
        ))),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("vmm-scsi: {e}");
            1
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .try_init();
}

fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Block SIGTERM and SIGINT in this thread and so in every thread started after: only the
/// signal thread takes them. Call before starting threads.
fn block_termination_signals() -> Result<(), ScsiError> {
    let set = termination_signals();
    // SAFETY: pthread_sigmask reads the set we pass.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(ScsiError::Signals(io::Error::from_raw_os_error(r)));
    }
    Ok(())
}

/// A thread that waits for SIGTERM or SIGINT and exits with status 0 (every command
/// completes synchronously and nothing is written: nothing is lost).
fn spawn_signal_thread() -> Result<(), ScsiError> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let set = termination_signals();
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: sigwait reads the set and writes the signal number we pass.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    tracing::info!("signal {sig}: exiting");
                    std::process::exit(0);
                }
            }
        })
        .map(drop)
        .map_err(ScsiError::Thread)
}
