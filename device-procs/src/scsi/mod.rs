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

use crate::supervised::{self as process, SupervisedError};

#[derive(Debug, thiserror::Error)]
pub enum ScsiError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Process(#[from] SupervisedError),
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error(transparent)]
    Daemon(#[from] crate::vhost_daemon::DaemonError),
}

pub const USAGE: &str = "\
usage: vmm-scsi
The virtio-scsi (vhost-user) CD-ROM controller process of the vmm. It is started by the
vmm with its control socket at fd 3 and a listening vhost-user socket at fd 4, and takes
no arguments. VMM_LOG sets the log filter (tracing EnvFilter syntax; default warn).";

/// The program: run, and return the exit status (0, or 1 after printing one line on
/// stderr).
pub fn main() -> i32 {
    process::init_logging();
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
    process::exit_status("vmm-scsi", result)
}
