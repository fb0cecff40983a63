//! `vmm`: the central VMM process. See `vmm -h` and the README.

fn main() {
    let code = vmm::launch::main_entry(std::env::args().skip(1));
    std::process::exit(code);
}
