//! Block migration (`migrate` with `blk` or `inc`) between two vmm processes with their own
//! images, with a tiny guest that only halts (its disks are idle: what is checked here is
//! how their contents travel). The contents arrive whole (`qemu-img compare`, `qemu-img
//! check`); `inc` sends only what the overlay holds over a base both sides have; the
//! destination refuses a wrong size, a missing or different backing file and an image
//! another process holds, before the source's guest stops; a copy that did not finish stays
//! marked incomplete, and the vmm will not serve it. The stock guest writing its disks
//! during the move is in emu_block_migration.rs.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use vmm_tests::guest::hanging_guest;
use vmm_tests::qmp::Qmp;
use vmm_tests::{qemu_img, vmm_binary, wait_until, TempDir};

const TIMEOUT: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;

struct Vm {
    child: Child,
    qmp: Qmp<UnixStream>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A vmm with the halting guest and one virtio-blk disk per `(image, format)`, drives
/// `d0`, `d1`, ...; `extra` goes last (-incoming).
fn vm(dir: &TempDir, name: &str, disks: &[(&Path, &str)], extra: &[&str]) -> Vm {
    let kernel = hanging_guest(dir, "up\n");
    let sock = dir.join(&format!("{name}.qmp"));
    let qmp_arg = format!("unix:{},server=on,wait=off", sock.display());
    let mut args: Vec<String> = [
        "-accel",
        "emu",
        "-m",
        "32",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        &kernel,
        "-qmp",
        &qmp_arg,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for (i, (image, format)) in disks.iter().enumerate() {
        args.push("-drive".into());
        args.push(format!(
            "file={},format={format},if=none,id=d{i}",
            image.display()
        ));
        args.push("-device".into());
        args.push(format!("virtio-blk-pci,drive=d{i},id=v{i}"));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let child = Command::new(vmm_binary())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn vmm");
    wait_until("the monitor socket", TIMEOUT, || sock.exists());
    let qmp = Qmp::connect(&sock);
    Vm { child, qmp }
}

fn qemu_io(image: &Path, format: &str, command: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", format, "-c", command])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-io {command}: {out:?}");
}

/// A qcow2 overlay at `image` over `base` (a name in the same directory).
fn overlay(image: &Path, base: &str) {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base,
        "-F",
        "qcow2",
        p(image),
    ]);
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Migrate `a` to `b` over `uri` with `args` (blk/inc) and wait for the end: the final
/// query-migrate.
fn migrate(a: &mut Vm, uri: &str, mode: &str) -> Value {
    a.qmp.ok("migrate", Some(json!({ "uri": uri, mode: true })));
    let mut info = Value::Null;
    wait_until("the migration to end", TIMEOUT, || {
        info = a.qmp.ok("query-migrate", None);
        matches!(
            info["status"].as_str(),
            Some("completed" | "failed" | "cancelled")
        )
    });
    info
}

/// The guest and its disks move: a raw and a qcow2 disk, each partly written (a short
/// last chunk on the raw one), onto empty images with garbage where the source has zeroes.
#[test]
fn blk_copies_raw_and_qcow2_disks_onto_empty_images() {
    let dir = TempDir::new("blkmig-full");
    let (src_raw, dst_raw) = (dir.join("src.raw"), dir.join("dst.raw"));
    let (src_q, dst_q) = (dir.join("src.qcow2"), dir.join("dst.qcow2"));
    let raw_size = (20 * MIB + 512).to_string();
    for (img, fmt, size) in [
        (&src_raw, "raw", raw_size.as_str()),
        (&dst_raw, "raw", raw_size.as_str()),
        (&src_q, "qcow2", "32M"),
        (&dst_q, "qcow2", "32M"),
    ] {
        qemu_img(&["create", "-q", "-f", fmt, p(img), size]);
    }
    qemu_io(&src_raw, "raw", "write -P 0x11 1M 3M");
    qemu_io(&src_raw, "raw", &format!("write -P 0x12 {} 512", 20 * MIB));
    qemu_io(&src_q, "qcow2", "write -P 0x21 0 1M");
    qemu_io(&src_q, "qcow2", "write -P 0x22 17M 5M");
    qemu_io(&dst_q, "qcow2", "write -P 0xee 8M 1M");
    qemu_io(&dst_raw, "raw", "write -P 0xee 10M 1M");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut a = vm(&dir, "a", &[(&src_raw, "raw"), (&src_q, "qcow2")], &[]);
    let mut b = vm(
        &dir,
        "b",
        &[(&dst_raw, "raw"), (&dst_q, "qcow2")],
        &["-incoming", &uri],
    );
    let info = migrate(&mut a, &uri, "blk");
    eprintln!("{info}");
    assert_eq!(info["status"], "completed", "{info}");
    // The copies are marked incomplete until they are on stable storage.
    wait_until("the copies to be synced", TIMEOUT, || {
        !marked(&dst_q) && !marked(&dst_raw)
    });
    // Every chunk of both disks was announced; the zero ones went as flags.
    let total = info["disk"]["total"].as_u64().unwrap();
    assert_eq!(total, (21 + 32) * MIB, "{info}");
    let sent = info["disk"]["transferred"].as_u64().unwrap();
    assert!((9 * MIB..9 * MIB + 8192).contains(&sent), "{info}");
    assert_eq!(b.qmp.ok("query-status", None)["status"], "running");
    assert_eq!(a.qmp.ok("query-status", None)["status"], "postmigrate");
    b.qmp.ok("quit", None);
    let _ = b.child.wait();
    a.qmp.ok("quit", None);
    let _ = a.child.wait();
    let same = Command::new("cmp")
        .arg(&src_raw)
        .arg(&dst_raw)
        .status()
        .unwrap();
    assert!(same.success(), "the raw copy differs");
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        p(&src_q),
        p(&dst_q),
    ]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let check = qemu_img(&["check", p(&dst_q)]);
    assert!(check.contains("No errors were found"), "{check}");
    assert!(
        !marked(&dst_q) && !marked(&dst_raw),
        "the copies are complete"
    );
}

/// Whether the image carries the incomplete-copy mark.
fn marked(image: &Path) -> bool {
    let path = std::ffi::CString::new(p(image)).unwrap();
    let mut value = [0u8; 32];
    // SAFETY: getxattr writes at most value.len() bytes into our buffer.
    let n = unsafe {
        libc::getxattr(
            path.as_ptr(),
            c"user.vmm.migration".as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n > 0 && value[..n as usize].starts_with(b"incomplete")
}

/// A 64 MiB base that both sides have and an overlay the source wrote 3 MiB into (one
/// MiB of it explicit zeroes over base data): only the overlay's chunks travel (HMP
/// `migrate -i`), and the destination's overlay reads the same as the source's.
#[test]
fn inc_sends_only_what_the_overlay_holds_over_a_shared_base() {
    let dir = TempDir::new("blkmig-inc");
    let base = dir.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "64M"]);
    qemu_io(&base, "qcow2", "write -P 0x5a 0 64M");
    let (src, dst) = (dir.join("src.qcow2"), dir.join("dst.qcow2"));
    for img in [&src, &dst] {
        overlay(img, "base.qcow2");
    }
    qemu_io(&src, "qcow2", "write -P 0x33 4M 2M");
    qemu_io(&src, "qcow2", "write -z 40M 1M");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut a = vm(&dir, "a", &[(&src, "qcow2")], &[]);
    let mut b = vm(&dir, "b", &[(&dst, "qcow2")], &["-incoming", &uri]);
    // HMP's `migrate -i` this time, and `info migrate` with the disk's figures.
    let out = a.qmp.hmp(&format!("migrate -i {uri}"));
    assert_eq!(out, "", "{out}");
    let mut info = Value::Null;
    wait_until("the migration to end", TIMEOUT, || {
        info = a.qmp.ok("query-migrate", None);
        matches!(info["status"].as_str(), Some("completed" | "failed"))
    });
    eprintln!("{info}");
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(
        info["disk"]["total"],
        json!(3 * MIB),
        "the overlay's 3 chunks: {info}"
    );
    let text = a.qmp.hmp("info migrate");
    assert!(text.contains("total disk: 3072 kbytes"), "{text}");
    let sent = info["disk"]["transferred"].as_u64().unwrap();
    assert!(
        (2 * MIB..2 * MIB + 4096).contains(&sent),
        "the zero chunk went as a flag: {info}"
    );
    b.qmp.ok("quit", None);
    let _ = b.child.wait();
    drop(a);
    let cmp = qemu_img(&["compare", p(&src), p(&dst)]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let check = qemu_img(&["check", p(&dst)]);
    assert!(check.contains("No errors were found"), "{check}");
}

/// What the destination refuses before the source's guest stops: the source fails the
/// migration, runs on, and can migrate again once the destination is right.
#[test]
fn a_wrong_destination_image_is_refused_and_the_source_runs_on() {
    let dir = TempDir::new("blkmig-refuse");
    let base = dir.join("base.qcow2");
    let other = dir.join("other.qcow2");
    for (img, pattern) in [(&base, "0x5a"), (&other, "0x5b")] {
        qemu_img(&["create", "-q", "-f", "qcow2", p(img), "16M"]);
        qemu_io(img, "qcow2", &format!("write -P {pattern} 0 16M"));
    }
    let src = dir.join("src.qcow2");
    overlay(&src, "base.qcow2");
    qemu_io(&src, "qcow2", "write -P 0x33 1M 1M");
    let mut a = vm(&dir, "a", &[(&src, "qcow2")], &[]);
    let cases: Vec<(&str, Vec<&str>, &str, &str)> = vec![
        ("small", vec!["create", "-q", "-f", "qcow2"], "8M", "holds"),
        (
            "nobacking",
            vec!["create", "-q", "-f", "qcow2"],
            "16M",
            "no backing file here",
        ),
        (
            "otherbacking",
            vec![
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "other.qcow2",
                "-F",
                "qcow2",
            ],
            "",
            "is not the source's",
        ),
    ];
    for (name, create, size, why) in cases {
        let dst = dir.join(&format!("{name}.qcow2"));
        let mut args = create.clone();
        args.push(p(&dst));
        if !size.is_empty() {
            args.push(size);
        }
        qemu_img(&args);
        let uri = format!("unix:{}", dir.join(&format!("{name}.sock")).display());
        let _b = vm(&dir, name, &[(&dst, "qcow2")], &["-incoming", &uri]);
        let info = migrate(&mut a, &uri, "inc");
        assert_eq!(info["status"], "failed", "{name}: {info}");
        let desc = info["error-desc"].as_str().unwrap_or_default();
        assert!(desc.contains(why), "{name}: {desc}");
        assert_eq!(
            a.qmp.ok("query-status", None)["status"],
            "running",
            "{name}"
        );
    }
    // An image another process holds (qemu-io keeps it open, locked, while it waits on
    // its input).
    let dst = dir.join("held.qcow2");
    overlay(&dst, "base.qcow2");
    let uri = format!("unix:{}", dir.join("held.sock").display());
    let _b = vm(&dir, "held", &[(&dst, "qcow2")], &["-incoming", &uri]);
    let holder = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(&dst)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let info = migrate(&mut a, &uri, "inc");
    let mut holder = holder;
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(info["status"], "failed", "{info}");
    let desc = info["error-desc"].as_str().unwrap_or_default();
    assert!(desc.contains("lock"), "{desc}");
    assert_eq!(a.qmp.ok("query-status", None)["status"], "running");
    assert!(!marked(&dst), "nothing was written");

    // Right this time.
    let dst = dir.join("good.qcow2");
    overlay(&dst, "base.qcow2");
    let uri = format!("unix:{}", dir.join("good.sock").display());
    let _b = vm(&dir, "good", &[(&dst, "qcow2")], &["-incoming", &uri]);
    let info = migrate(&mut a, &uri, "inc");
    assert_eq!(info["status"], "completed", "{info}");
}

/// A migration cancelled during the disk phase leaves the source's image untouched and
/// running, and the destination's marked incomplete: the vmm refuses to serve it.
#[test]
fn a_copy_that_did_not_finish_stays_marked_incomplete() {
    let dir = TempDir::new("blkmig-cancel");
    let (src, dst) = (dir.join("src.raw"), dir.join("dst.raw"));
    for img in [&src, &dst] {
        qemu_img(&["create", "-q", "-f", "raw", p(img), "256M"]);
    }
    qemu_io(&src, "raw", "write -P 0x44 0 256M");
    let before = std::fs::read(&src).unwrap();
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut a = vm(&dir, "a", &[(&src, "raw")], &[]);
    let mut b = vm(&dir, "b", &[(&dst, "raw")], &["-incoming", &uri]);
    a.qmp
        .ok("migrate_set_speed", Some(json!({ "value": 32u64 << 20 })));
    a.qmp
        .ok("migrate", Some(json!({ "uri": uri, "blk": true })));
    wait_until("the disk phase", TIMEOUT, || {
        let info = a.qmp.ok("query-migrate", None);
        info["disk"]["transferred"].as_u64() > Some(16 * MIB)
    });
    a.qmp.ok("migrate_cancel", None);
    wait_until("the cancel", TIMEOUT, || {
        a.qmp.ok("query-migrate", None)["status"] == "cancelled"
    });
    assert_eq!(a.qmp.ok("query-status", None)["status"], "running");
    // The destination gives up (as QEMU's does) and leaves its image marked.
    let status = b.child.wait().unwrap();
    assert!(!status.success());
    assert!(marked(&dst), "the partial copy is marked");
    drop(a);
    assert_eq!(
        std::fs::read(&src).unwrap(),
        before,
        "the source is untouched"
    );
    // The vmm will not serve it.
    let kernel = hanging_guest(&dir, "up\n");
    let out = Command::new(vmm_binary())
        .args([
            "-accel",
            "emu",
            "-m",
            "32",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-kernel", &kernel])
        .args([
            "-drive",
            &format!("file={},format=raw,if=virtio", dst.display()),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("incomplete copy of a block migration"),
        "{err}"
    );
}

/// The pid of the vmm-blk serving drive `drive`.
fn blk_pid(qmp: &mut Qmp<UnixStream>, drive: &str) -> i32 {
    let procs = qmp.ok("__org.vmm_query-device-processes", None);
    procs
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["program"] == "vmm-blk" && p["drive"] == drive)
        .and_then(|p| p["pid"].as_u64())
        .unwrap_or_else(|| panic!("no vmm-blk for {drive}: {procs}")) as i32
}

/// The source's vmm-blk killed (-9) while it reads chunks, then the destination's while it
/// writes them: each is restarted, the chunks go again, and the copy is whole.
#[test]
fn a_device_process_killed_during_the_disk_phase_costs_nothing() {
    let dir = TempDir::new("blkmig-kill");
    let (src, dst) = (dir.join("src.qcow2"), dir.join("dst.qcow2"));
    for img in [&src, &dst] {
        qemu_img(&["create", "-q", "-f", "qcow2", p(img), "160M"]);
    }
    qemu_io(&src, "qcow2", "write -P 0x66 0 150M");
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut a = vm(&dir, "a", &[(&src, "qcow2")], &[]);
    let mut b = vm(&dir, "b", &[(&dst, "qcow2")], &["-incoming", &uri]);
    a.qmp
        .ok("migrate_set_speed", Some(json!({ "value": 32u64 << 20 })));
    a.qmp
        .ok("migrate", Some(json!({ "uri": uri, "blk": true })));
    let sent = |a: &mut Vm| a.qmp.ok("query-migrate", None)["disk"]["transferred"].as_u64();
    wait_until("the disk phase", TIMEOUT, || sent(&mut a) > Some(20 * MIB));
    // SAFETY: kill(2) of a vmm-blk, as a crash would end it.
    assert_eq!(
        unsafe { libc::kill(blk_pid(&mut a.qmp, "d0"), libc::SIGKILL) },
        0
    );
    wait_until("more of the disk phase", TIMEOUT, || {
        sent(&mut a) > Some(70 * MIB)
    });
    // SAFETY: as above, on the destination.
    assert_eq!(
        unsafe { libc::kill(blk_pid(&mut b.qmp, "d0"), libc::SIGKILL) },
        0
    );
    a.qmp
        .ok("migrate_set_speed", Some(json!({ "value": 1u64 << 30 })));
    let mut info = Value::Null;
    wait_until("the migration to end", TIMEOUT, || {
        info = a.qmp.ok("query-migrate", None);
        matches!(info["status"].as_str(), Some("completed" | "failed"))
    });
    assert_eq!(info["status"], "completed", "{info}");
    assert_eq!(b.qmp.ok("query-status", None)["status"], "running");
    b.qmp.ok("quit", None);
    let _ = b.child.wait();
    drop(a);
    let cmp = qemu_img(&["compare", p(&src), p(&dst)]);
    assert!(cmp.contains("Images are identical"), "{cmp}");
    let check = qemu_img(&["check", p(&dst)]);
    assert!(check.contains("No errors were found"), "{check}");
}
