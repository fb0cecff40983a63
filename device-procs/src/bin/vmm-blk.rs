//! `vmm-blk`: the vhost-user-blk device process (see `device_procs::blk`).

fn main() {
    std::process::exit(device_procs::blk::main());
}
