//! The `vmm-net` device process: the user-mode network stack (libslirp) behind `-netdev user`.

pub mod slirp;
