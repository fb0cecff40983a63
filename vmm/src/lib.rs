//! The vmm library: machine model, accelerators and devices. The `vmm` binary is a thin
//! command-line front end over it.

pub mod arch;
pub mod chardev;
pub mod control;
pub mod devices;
pub mod pci;
