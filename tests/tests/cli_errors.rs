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

/// Drives that cannot be served stop the start-up with one clear line, whatever process
/// would have served them: a missing image, an unsupported format, an unknown drive, and
/// an image another process writes (QEMU's lock bytes, here taken by qemu-storage-daemon).
#[test]
fn bad_drives() {
    let dir = TempDir::new("cli-drives");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let img_s = img.to_str().unwrap();
    let qtest = [
        "-accel",
        "qtest",
        "-m",
        "64",
        "-nodefaults",
        "-display",
        "none",
    ];
    let with = |extra: &[&str]| -> Vec<String> {
        qtest.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let missing = with(&["-drive", "file=/nonexistent/disk.img,format=raw,if=virtio"]);
    let args: Vec<&str> = missing.iter().map(String::as_str).collect();
    fails_with(&args, "Could not open '/nonexistent/disk.img'");
    // A wrong format (a raw file named as qcow2), and an unsupported one.
    let qcow = format!("file={img_s},format=qcow2,if=virtio");
    let args = with(&["-drive", &qcow]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(&args, "is not in qcow2 format");
    let vmdk = format!("file={img_s},format=vmdk,if=virtio");
    let args = with(&["-drive", &vmdk]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(&args, "format 'vmdk' is not supported");
    let args = with(&["-device", "virtio-blk-pci,drive=nope"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(&args, "can't find value 'nope'");

    // A corrupt qcow2, a missing backing file, a circular chain.
    let corrupt = dir.join("corrupt.qcow2");
    std::fs::write(&corrupt, b"QFI\xfb\0\0\0\x03garbage-garbage-garbage").unwrap();
    let d = format!("file={},format=qcow2,if=virtio", corrupt.display());
    let args = with(&["-drive", &d]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(&args, "corrupt.qcow2");
    let qemu_img = |a: &[&str]| {
        let ok = std::process::Command::new("qemu-img")
            .args(a)
            .status()
            .expect("qemu-img")
            .success();
        assert!(ok, "qemu-img {a:?}");
    };
    let base = dir.join("base.raw");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    let over = dir.join("over.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        over.to_str().unwrap(),
    ]);
    std::fs::remove_file(&base).unwrap();
    let d = format!("file={},format=qcow2,if=virtio", over.display());
    let args = with(&["-drive", &d]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(&args, "Could not open backing file 'base.raw'");
    let a = dir.join("a.qcow2");
    let b = dir.join("b.qcow2");
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        a.to_str().unwrap(),
    ]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        b.to_str().unwrap(),
    ]);
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        a.to_str().unwrap(),
    ]);
    let d = format!("file={},format=qcow2,if=virtio", b.display());
    let args = with(&["-drive", &d]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(&args, "too deep or circular");

    let sock = dir.join("qsd.sock");
    let mut qsd = std::process::Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f0,filename={img_s}"))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (Debian qemu-system-common)");
    vmm_tests::wait_until("qemu-storage-daemon", TIMEOUT, || sock.exists());
    let locked = format!("file={img_s},format=raw,if=virtio");
    let args = with(&["-drive", &locked]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    fails_with(&args, "Failed to get \"write\" lock");
    let _ = qsd.kill();
    let _ = qsd.wait();
}
