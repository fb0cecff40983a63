//! `vmm-display`: the display device process (see `device_procs::display`).

fn main() {
    std::process::exit(device_procs::display::main());
}
