//! Tiny hand-made guests run by the `vmm` binary under KVM (kvm-pvm on our machines):
//! UART output to a file chardev, PCI config space through 0xCF8/0xCFC, isa-debug-exit,
//! and resets from a triple fault or the i8042 (or exit under -no-reboot).

use std::time::Duration;

use iced_x86::code_asm::*;
use vmm_tests::guest::{Asm, DEBUG_EXIT_PORT};
use vmm_tests::{require_kvm, run_vmm, TempDir};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Run `elf` under KVM with COM1 on a file; returns (exit code, serial output, stderr).
fn run_guest(elf: Vec<u8>, extra: &[&str]) -> (i32, String, String) {
    let dir = TempDir::new("kvm");
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf).unwrap();
    let serial = dir.join("serial.out");
    let serial_arg = format!("file:{}", serial.display());
    let debug_exit = format!("isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=4");
    let mut args = vec![
        "-accel",
        "kvm",
        "-m",
        "32",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        kernel.to_str().unwrap(),
        "-serial",
        &serial_arg,
        "-device",
        &debug_exit,
    ];
    args.extend_from_slice(extra);
    let done = run_vmm(&args, TIMEOUT);
    let out = std::fs::read_to_string(&serial).unwrap_or_default();
    (done.status.code().unwrap_or(-1), out, done.stderr)
}

#[test]
fn hello_reaches_the_file_chardev() {
    require_kvm!();
    let mut g = Asm::new();
    g.print("hello\n");
    g.debug_exit(0);
    let (code, out, err) = run_guest(g.elf(), &[]);
    assert_eq!(out, "hello\n", "stderr: {err}");
    assert_eq!(code, 1, "debug-exit 0 exits with status 1; stderr: {err}");
}

#[test]
fn debug_exit_status_matches_the_value() {
    require_kvm!();
    for value in [0x10u32, 0x3f] {
        let mut g = Asm::new();
        g.debug_exit(value);
        let (code, _, err) = run_guest(g.elf(), &[]);
        assert_eq!(code, ((value << 1) | 1) as i32, "stderr: {err}");
    }
}

/// Read the config dword at `address` (0xCF8 format) and print it as `label` + hex.
fn print_config_dword(g: &mut Asm, address: u32, label: &str) {
    g.a.mov(dx, 0xcf8u32).unwrap();
    g.a.mov(eax, address).unwrap();
    g.a.out(dx, eax).unwrap();
    g.a.mov(dx, 0xcfcu32).unwrap();
    g.a.in_(eax, dx).unwrap();
    g.a.push(rax).unwrap();
    g.print(label);
    g.a.pop(rax).unwrap();
    g.print_eax_hex();
}

#[test]
fn reads_the_host_bridge_ids_through_cf8_cfc() {
    require_kvm!();
    let mut g = Asm::new();
    // Bus 0, device 0, function 0, register 0: vendor and device id.
    print_config_dword(&mut g, 0x8000_0000, "id=");
    // Class code register (0x08): class 06 (bridge), subclass 00 (host).
    print_config_dword(&mut g, 0x8000_0008, " class=");
    // An empty slot (device 31) reads all ones.
    print_config_dword(&mut g, 0x8000_f800, " empty=");
    g.print("\n");
    g.debug_exit(0);
    let (code, out, err) = run_guest(g.elf(), &[]);
    assert_eq!(code, 1, "stderr: {err}");
    let class = out
        .split("class=")
        .nth(1)
        .map(|s| &s[..8])
        .unwrap_or_default()
        .to_string();
    assert!(out.starts_with("id=00081b36 "), "serial: {out:?}");
    assert!(class.starts_with("0600"), "class register {class}");
    assert!(out.contains("empty=ffffffff"), "serial: {out:?}");
}

/// A guest that counts its boots in RAM that the boot image does not cover, prints the
/// count, and on boots 1 and 2 asks for a reset with `reset`; on boot 3 it exits with 0x10.
fn rebooting_guest(reset: impl Fn(&mut CodeAssembler)) -> Vec<u8> {
    const COUNTER: u64 = 0x30_0000;
    let mut g = Asm::new();
    let mut done = g.a.create_label();
    g.a.mov(rbx, COUNTER).unwrap();
    g.a.inc(dword_ptr(rbx)).unwrap();
    g.print("boot");
    g.a.mov(rbx, COUNTER).unwrap();
    g.a.mov(eax, dword_ptr(rbx)).unwrap();
    g.a.add(eax, b'0' as u32).unwrap();
    g.a.mov(dx, 0x3f8u32).unwrap();
    g.a.out(dx, al).unwrap();
    g.print("\n");
    g.a.mov(rbx, COUNTER).unwrap();
    g.a.cmp(dword_ptr(rbx), 3u32).unwrap();
    g.a.jae(done).unwrap();
    reset(&mut g.a);
    g.hang();
    g.a.set_label(&mut done).unwrap();
    g.debug_exit(0x10);
    g.elf()
}

fn triple_fault(a: &mut CodeAssembler) {
    // An empty IDT: the #UD cannot be delivered, nor the #GP, nor the #DF: shutdown.
    a.mov(rax, 0x6000u64).unwrap();
    a.mov(qword_ptr(rax), 0i32).unwrap();
    a.mov(qword_ptr(rax + 8), 0i32).unwrap();
    a.lidt(ptr(rax)).unwrap();
    a.ud2().unwrap();
}

fn keyboard_reset(a: &mut CodeAssembler) {
    a.mov(al, 0xfeu32).unwrap();
    a.out(0x64u32, al).unwrap();
}

#[test]
fn triple_fault_resets_the_machine() {
    require_kvm!();
    let (code, out, err) = run_guest(rebooting_guest(triple_fault), &[]);
    assert_eq!(out, "boot1\nboot2\nboot3\n", "stderr: {err}");
    assert_eq!(code, 0x21, "stderr: {err}");
}

#[test]
fn i8042_reset_line_resets_the_machine() {
    require_kvm!();
    let (code, out, err) = run_guest(rebooting_guest(keyboard_reset), &[]);
    assert_eq!(out, "boot1\nboot2\nboot3\n", "stderr: {err}");
    assert_eq!(code, 0x21, "stderr: {err}");
}

#[test]
fn no_reboot_turns_a_reset_into_exit_0() {
    require_kvm!();
    for reset in [triple_fault as fn(&mut CodeAssembler), keyboard_reset] {
        let (code, out, err) = run_guest(rebooting_guest(reset), &["-no-reboot"]);
        assert_eq!(out, "boot1\n", "stderr: {err}");
        assert_eq!(code, 0, "stderr: {err}");
    }
}

/// A guest that prints, then enters ACPI S5 through the FADT's sleep control register.
fn poweroff_guest() -> Vec<u8> {
    let mut g = Asm::new();
    g.print("off\n");
    g.a.mov(dx, 0x600u32).unwrap();
    g.a.mov(al, (5u32 << 2) | 0x20).unwrap(); // SLP_TYP=5 (our _S5), SLP_EN
    g.a.out(dx, al).unwrap();
    g.hang();
    g.elf()
}

#[test]
fn acpi_poweroff_exits_with_status_0() {
    require_kvm!();
    let (code, out, err) = run_guest(poweroff_guest(), &[]);
    assert_eq!(out, "off\n", "stderr: {err}");
    assert_eq!(code, 0, "stderr: {err}");
}

#[test]
fn no_shutdown_keeps_the_vmm_after_poweroff() {
    require_kvm!();
    let dir = vmm_tests::TempDir::new("noshutdown");
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, poweroff_guest()).unwrap();
    let serial = dir.join("serial.out");
    let serial_arg = format!("file:{}", serial.display());
    let mut child = vmm_tests::spawn_vmm(&[
        "-accel",
        "kvm",
        "-m",
        "32",
        "-nodefaults",
        "-kernel",
        kernel.to_str().unwrap(),
        "-serial",
        &serial_arg,
        "-no-shutdown",
    ]);
    let start = std::time::Instant::now();
    while std::fs::read_to_string(&serial).unwrap_or_default() != "off\n" {
        assert!(start.elapsed() < TIMEOUT, "no guest output");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the vmm stays after the guest powers off"
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let done = vmm_tests::wait_with_timeout(child, TIMEOUT);
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
}
