//! The stock Debian kernel under KVM, as far as kvm-pvm takes it. kvm-pvm cannot run a
//! Linux guest to a shell (DESIGN.md), but with the payload decompressed on the host the
//! kernel starts at once and its early log proves the boot path end to end: the ELF load,
//! boot_params, the command line, the e820 map, the initrd and the ACPI tables.

use std::time::{Duration, Instant};

use vmm_tests::{repo_root, require_kvm, spawn_vmm, wait_with_timeout, TempDir};

#[test]
fn stock_kernel_reads_our_boot_data() {
    require_kvm!();
    let guest = repo_root().join("target/guest");
    let kernel = guest.join("vmlinuz");
    let initrd = guest.join("initramfs.img");
    assert!(
        kernel.exists() && initrd.exists(),
        "guest assets are missing: run scripts/guest-assets (scripts/test does)"
    );
    let dir = TempDir::new("early-boot");
    let serial = dir.join("serial.out");
    let serial_arg = format!("file:{}", serial.display());
    let child = spawn_vmm(&[
        "-accel",
        "kvm",
        "-m",
        "512",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        kernel.to_str().unwrap(),
        "-initrd",
        initrd.to_str().unwrap(),
        "-append",
        "console=ttyS0 earlyprintk=ttyS0 vmm-test-marker",
        "-decompress-kernel",
        "on",
        "-serial",
        &serial_arg,
    ]);
    let wanted = "ACPI: MCFG";
    let start = Instant::now();
    let mut log = String::new();
    while start.elapsed() < Duration::from_secs(120) {
        log = std::fs::read_to_string(&serial).unwrap_or_default();
        if log.contains(wanted) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = wait_with_timeout(child, Duration::from_secs(30));

    let release = std::fs::read_to_string(guest.join("kernel-version")).unwrap();
    for needle in [
        format!("Linux version {}", release.trim()),
        "Command line: console=ttyS0 earlyprintk=ttyS0 vmm-test-marker".to_string(),
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable".to_string(),
        "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable".to_string(),
        "BIOS-e820: [mem 0x00000000e0000000-0x00000000efffffff] reserved".to_string(),
        "Hypervisor detected: KVM".to_string(),
        "RAMDISK: [mem ".to_string(),
        "ACPI: RSDP 0x00000000000E0000".to_string(),
        "ACPI: FACP".to_string(),
        "ACPI: DSDT".to_string(),
        "ACPI: APIC".to_string(),
        wanted.to_string(),
    ] {
        assert!(
            log.contains(&needle),
            "missing {needle:?} in the guest log:\n{log}"
        );
    }
}
