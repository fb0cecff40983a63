//! `vmm-net`: the vhost-user-net device process (see `device_procs::net`).

fn main() {
    std::process::exit(device_procs::net::main());
}
