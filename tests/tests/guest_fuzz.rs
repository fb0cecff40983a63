//! The hostile-guest fuzzer (vmm_tests::guest_fuzz) on every PCI device for a short
//! while (GUEST_FUZZ_SECONDS, default 8; `guest-fuzz` runs it for longer), and its
//! negative control: with a bounds check removed on purpose in the virtio-pci transport
//! (the VMM_TEST_DELIBERATE_BUG hook), it must fail.

use std::time::Duration;

use vmm_tests::guest_fuzz::{self, TARGETS};

fn seconds() -> u64 {
    std::env::var("GUEST_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8)
}

/// A fixed seed per device for CI (a failure repeats), or GUEST_FUZZ_SEED.
fn seed(name: &str) -> u64 {
    std::env::var("GUEST_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            })
        })
}

fn fuzz(name: &str) {
    let target = guest_fuzz::target(name).unwrap();
    let seed = seed(name);
    match guest_fuzz::run(target, Duration::from_secs(seconds()), seed) {
        Ok(r) => {
            eprintln!("{name}: seed {seed}: {r:?}");
            assert!(r.ops > 0 && r.checks > 0, "{r:?}");
        }
        Err(why) => panic!("seed {seed}: {why}"),
    }
}

#[test]
fn every_target_is_tested() {
    let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    assert_eq!(
        names,
        [
            "virtio-blk-pci",
            "virtio-scsi-pci",
            "virtio-net-pci",
            "virtio-balloon-pci",
            "virtio-keyboard-pci",
            "virtio-tablet-pci",
            "bochs-display"
        ]
    );
}

#[test]
fn virtio_blk() {
    fuzz("virtio-blk-pci");
}

#[test]
fn virtio_scsi() {
    fuzz("virtio-scsi-pci");
}

#[test]
fn virtio_net() {
    fuzz("virtio-net-pci");
}

#[test]
fn virtio_balloon() {
    fuzz("virtio-balloon-pci");
}

#[test]
fn virtio_keyboard() {
    fuzz("virtio-keyboard-pci");
}

#[test]
fn virtio_tablet() {
    fuzz("virtio-tablet-pci");
}

#[test]
fn bochs_display() {
    fuzz("bochs-display");
}

#[test]
fn a_deliberate_bug_is_found() {
    let target = guest_fuzz::target("virtio-balloon-pci").unwrap();
    let found = guest_fuzz::run_with_env(
        target,
        Duration::from_secs(30),
        seed("deliberate"),
        &[("VMM_TEST_DELIBERATE_BUG", "virtio-queue-select")],
    );
    let why = found.expect_err("the fuzzer missed a queue_select without a bounds check");
    assert!(why.contains("lost the vmm"), "{why}");
}

/// A guest that repeats something the vmm logs (here: asking for an ACPI sleep state we do
/// not implement, a `warn` line each time) cannot flood the log: each call site prints a
/// burst, one line saying the rest are suppressed, and nothing more within the window.
#[test]
fn a_guest_cannot_flood_the_log() {
    use vmm_tests::qtest::Qtest;
    const SLEEP_CONTROL_PORT: u16 = 0x600;
    // SLP_EN with SLP_TYP 3 (S3, which the DSDT does not offer).
    const SLEEP_S3: u8 = (1 << 5) | (3 << 2);
    let mut qt = Qtest::start_env("64M", &[], &[("VMM_LOG", "warn")]).unwrap();
    for _ in 0..5000 {
        qt.outb(SLEEP_CONTROL_PORT, SLEEP_S3).unwrap();
    }
    // The machine still answers, and the sleep request still "wakes" at once.
    assert_ne!(qt.inb(SLEEP_CONTROL_PORT + 1).unwrap() & 0x80, 0);
    let log = qt.stderr();
    let repeated = log
        .lines()
        .filter(|l| l.contains("unsupported ACPI sleep state"))
        .count();
    assert_eq!(repeated, logging::BURST as usize, "{log}");
    let notes = log
        .lines()
        .filter(|l| l.contains("more are suppressed"))
        .count();
    assert_eq!(notes, 1, "{log}");
}
