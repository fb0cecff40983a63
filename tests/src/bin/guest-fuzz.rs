//! The hostile-guest fuzzer (vmm_tests::guest_fuzz) for as long as asked:
//!
//!   guest-fuzz [--seconds N] [--seed S] [TARGET...]
//!
//! Each target (default: every one) is fuzzed for N seconds (default 60) from seed S
//! (default: from the clock; printed, so a failure can be repeated). One line per target;
//! the exit status is 1 if any failed.

use std::time::Duration;

use vmm_tests::guest_fuzz::{self, TARGETS};

fn main() {
    let mut seconds = 60u64;
    let mut seed = None;
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let number = |v: Option<String>| v.and_then(|v| v.parse::<u64>().ok());
        match a.as_str() {
            "--seconds" => match number(args.next()) {
                Some(n) => seconds = n,
                None => usage("--seconds takes a number"),
            },
            "--seed" => match number(args.next()) {
                Some(n) => seed = Some(n),
                None => usage("--seed takes a number"),
            },
            "-h" | "--help" => usage(""),
            name => names.push(name.to_string()),
        }
    }
    let targets: Vec<_> = if names.is_empty() {
        TARGETS.iter().collect()
    } else {
        names
            .iter()
            .map(|n| guest_fuzz::target(n).unwrap_or_else(|| usage(&format!("no target {n}"))))
            .collect()
    };
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut failed = false;
    for t in targets {
        match guest_fuzz::run(t, Duration::from_secs(seconds), seed) {
            Ok(r) => println!(
                "{}: ok, seed {seed}: {} operations ({:.0}/s), {} chains, {} checks in {:.1} s",
                t.name,
                r.ops,
                r.ops as f64 / r.elapsed.as_secs_f64(),
                r.chains,
                r.checks,
                r.elapsed.as_secs_f64()
            ),
            Err(why) => {
                failed = true;
                println!("{}: FAILED, seed {seed}: {why}", t.name);
            }
        }
    }
    std::process::exit(i32::from(failed));
}

fn usage(why: &str) -> ! {
    if !why.is_empty() {
        eprintln!("guest-fuzz: {why}");
    }
    let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    eprintln!(
        "usage: guest-fuzz [--seconds N] [--seed S] [TARGET...]\ntargets: {}",
        names.join(" ")
    );
    std::process::exit(2);
}
