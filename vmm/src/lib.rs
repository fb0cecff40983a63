//! The vmm library: machine model, accelerators and devices. The `vmm` binary is a thin
//! command-line front end over it.

pub mod accel;
pub mod arch;
pub mod chardev;
pub mod cli;
pub mod config;
pub mod control;
pub mod cpu;
pub mod devices;
pub mod launch;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod monitor;
pub mod pci;
