//! The vmm library: machine model, accelerators and devices. The `vmm` binary is a thin
//! command-line front end over it.

/// `eprintln!` that never panics: a management program may close our stderr, and a
/// message about the machine must not take a vCPU or the signal thread down with it.
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub mod accel;
pub mod arch;
pub mod chardev;
pub mod cli;
pub mod config;
pub mod control;
pub mod cpu;
pub mod device_manager;
pub mod devices;
pub mod drive;
pub mod image;
pub mod launch;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod migration;
pub mod monitor;
pub mod netdev;
pub mod pci;
pub mod runstate;
pub mod snapshot;
pub mod supervisor;
pub mod virtio;
pub mod vnc;
