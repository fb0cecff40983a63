//! The device processes (`vmm-blk`, `vmm-net`, `vmm-display`) and what they share: how a
//! process picks up the sockets the vmm's supervisor handed it, the sandbox it enters
//! before serving, and the seccomp allowlists per process kind.

pub mod blk;
pub mod display;
pub mod hostile;
pub mod inherit;
pub mod net;
pub mod sandbox;
pub mod scsi;
pub mod seccomp;
pub mod shared_map;
pub mod supervised;
pub mod vhost_daemon;
pub mod vhost_relay;
