//! Faults under load (vmm_tests::fault_suite) for as long as asked:
//!
//!   fault-suite [--seconds N] [--seed S] [--clients C]
//!
//! Boots the stock guest under emu (the guest assets must be there: scripts/guest-assets),
//! injects faults for N seconds (default 1800) with storms of C monitor clients (default
//! 500), checks that nothing was lost, and prints what was injected and measured. Needs
//! root (a network namespace, a tap, a tmpfs). Exit status 1 if anything was lost.

use std::time::Duration;

use vmm_tests::fault_suite::{run_suite, Options};

fn main() {
    let mut opts = Options {
        duration: Duration::from_secs(1800),
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        storm_clients: 500,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        match (a.as_str(), value) {
            ("--seconds", Some(n)) => opts.duration = Duration::from_secs(n),
            ("--seed", Some(n)) => opts.seed = n,
            ("--clients", Some(n)) => opts.storm_clients = n as usize,
            _ => {
                eprintln!("usage: fault-suite [--seconds N] [--seed S] [--clients C]");
                std::process::exit(2);
            }
        }
    }
    println!("fault-suite: {opts:?}");
    match run_suite(&opts) {
        Ok(t) => {
            println!("fault-suite: nothing lost");
            for (fault, n) in &t.faults {
                println!("  {n:5} x {fault}");
            }
            println!(
                "  blocks: {} written, {} verified; transfer: {} bytes, checksum right; \
                 VNC sessions: {}; monitor: {} polls, slowest {:?}",
                t.blocks_written,
                t.blocks_verified,
                t.transfer_bytes,
                t.vnc_sessions,
                t.monitor_polls,
                t.monitor_slowest
            );
            println!(
                "  vmm private RSS {} -> {} KiB (guest RAM excluded), fds {} -> {}",
                t.rss_kib.0, t.rss_kib.1, t.fds.0, t.fds.1
            );
            println!("  every minute (s: KiB, fds):");
            for (at, rss, fds) in &t.samples {
                println!("    {:6}: {rss} KiB, {fds} fds", at.as_secs());
            }
        }
        Err(why) => {
            println!("fault-suite: FAILED (seed {}): {why}", opts.seed);
            std::process::exit(1);
        }
    }
}
