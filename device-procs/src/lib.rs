//! The device processes (`vmm-blk`, `vmm-net`, `vmm-display`) and what they share: how a
//! process picks up the sockets the vmm's supervisor handed it, and the sandbox it enters
//! before serving.

pub mod inherit;
pub mod sandbox;
