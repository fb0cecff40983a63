//! `vmm`: the central VMM process. See `vmm -h` and the README.

fn main() {
    // A panic is a bug: the process ends at once (the device processes die with it)
    // rather than going on with a thread gone and the locks it held.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    let code = vmm::launch::main_entry(std::env::args().skip(1));
    std::process::exit(code);
}
