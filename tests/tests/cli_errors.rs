//! Bad command lines and bad boot inputs: each gets one clear line on stderr that names the
//! problem, exit status 1, and no process left behind.

use std::time::Duration;

use vmm_tests::guest::Asm;
use vmm_tests::{require_kvm, run_vmm, TempDir};

const TIMEOUT: Duration = Duration::from_secs(30);

fn fails_with(args: &[&str], needle: &str) {
    let done = run_vmm(args, TIMEOUT);
    assert_eq!(
        done.status.code(),
        Some(1),
        "args {args:?}: stderr {}",
        done.stderr
    );
    let lines: Vec<&str> = done.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "one line for {args:?}, got {:?}",
        done.stderr
    );
    assert!(lines[0].starts_with("vmm: "), "{:?}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "{:?} should mention {needle:?}",
        lines[0]
    );
}

#[test]
fn bad_options_and_values() {
    fails_with(&["-bogus"], "-bogus: invalid option");
    fails_with(&["-m"], "-m: requires an argument");
    fails_with(&["-m", "0"], "-m 0");
    fails_with(&["-m", "9T"], "-m 9T");
    fails_with(&["-smp", "0"], "-smp 0");
    fails_with(&["-smp", "1000"], "-smp 1000");
    fails_with(&["-accel", "hvf"], "-accel hvf");
    fails_with(&["-serial", "telnet:x"], "-serial telnet:x");
    fails_with(&["-uuid", "123"], "-uuid 123");
    fails_with(&["-device", "e1000"], "-device e1000");
    fails_with(&["-display", "sdl"], "-display sdl");
}

#[test]
fn missing_kernel() {
    fails_with(&["-accel", "kvm", "-m", "64"], "no kernel given");
    fails_with(
        &[
            "-accel",
            "kvm",
            "-m",
            "64",
            "-kernel",
            "/nonexistent/vmlinuz",
        ],
        "/nonexistent/vmlinuz",
    );
}

#[test]
fn kernel_and_initrd_problems() {
    require_kvm!();
    let dir = TempDir::new("cli");
    let junk = dir.join("junk");
    std::fs::write(&junk, b"this is not a kernel").unwrap();
    fails_with(
        &[
            "-accel",
            "kvm",
            "-m",
            "64",
            "-kernel",
            junk.to_str().unwrap(),
        ],
        "neither a bzImage nor an ELF64",
    );

    let mut g = Asm::new();
    g.debug_exit(0);
    let kernel = dir.join("k.elf");
    std::fs::write(&kernel, g.elf()).unwrap();
    let k = kernel.to_str().unwrap();
    fails_with(
        &[
            "-accel",
            "kvm",
            "-m",
            "64",
            "-kernel",
            k,
            "-initrd",
            "/nonexistent/initrd",
        ],
        "could not read initrd '/nonexistent/initrd'",
    );
    let unreadable = dir.join("dir-as-initrd");
    std::fs::create_dir(&unreadable).unwrap();
    fails_with(
        &[
            "-accel",
            "kvm",
            "-m",
            "64",
            "-kernel",
            k,
            "-initrd",
            unreadable.to_str().unwrap(),
        ],
        "could not read initrd",
    );
    let big = dir.join("big.img");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(40 << 20).unwrap();
    fails_with(
        &[
            "-accel",
            "kvm",
            "-m",
            "32",
            "-kernel",
            k,
            "-initrd",
            big.to_str().unwrap(),
        ],
        "does not fit in guest RAM",
    );
}

#[test]
fn kvm_without_dev_kvm() {
    // Hide /dev/kvm under an empty /dev in a private mount namespace (needs root and unshare).
    let probe = std::process::Command::new("unshare")
        .args(["--mount", "true"])
        .status();
    if !matches!(probe, Ok(s) if s.success()) || !std::path::Path::new("/dev/kvm").exists() {
        eprintln!(
            "SKIP: cannot hide /dev/kvm here (needs unshare --mount and an existing /dev/kvm)"
        );
        return;
    }
    let vmm = vmm_tests::vmm_binary();
    let script = format!(
        "mount -t tmpfs none /dev && exec {} -accel kvm -m 64 -kernel /nonexistent",
        vmm.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("/dev/kvm"), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "stderr: {stderr}");
}
