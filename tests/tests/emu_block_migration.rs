//! Block migration of the stock guest under emu: two vmm processes with their own images.
//! The guest writes its raw and qcow2 disks (1 MiB blocks, each checksummed by the guest
//! as it writes it) while `migrate blk:true` copies them onto empty images; the
//! destination, started with -S, is checked while paused: its images hold what the
//! source's do (`cmp` for raw, `qemu-img compare` for qcow2). It then runs on, the guest
//! stops its writer, and every block it reads back matches the checksum it recorded; the
//! qcow2 copy passes `qemu-img check`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use vmm_tests::console::{stock_linux_args, GuestConsole};
use vmm_tests::qmp::Qmp;
use vmm_tests::{qemu_img, wait_until, TempDir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(180);
/// Blocks of 1 MiB the guest writes on each disk, round and round.
const BLOCKS: u32 = 24;

/// The 1 MiB chunks of `image` its own layer holds data for (`qemu-img map`).
fn allocated_chunks(image: &Path) -> u64 {
    let map = qemu_img(&["map", "-U", "--output=json", p(image)]);
    let entries: serde_json::Value = serde_json::from_str(&map).unwrap();
    let mut chunks = std::collections::BTreeSet::new();
    for e in entries.as_array().unwrap() {
        if e["depth"] == 0 && e["data"] == true {
            let start = e["start"].as_u64().unwrap();
            let end = start + e["length"].as_u64().unwrap();
            chunks.extend(start >> 20..end.div_ceil(1 << 20));
        }
    }
    chunks.len() as u64
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

#[test]
fn the_guest_writes_its_disks_while_blk_copies_them() {
    copy_while_the_guest_writes(Mode::Full);
}

/// The same with `inc` over a base both sides have: the guest writes only the qcow2
/// overlay (the raw disk stays all holes), and only the overlay's chunks travel:
/// `disk.total` is what the overlay holds.
#[test]
fn the_guest_writes_its_overlay_while_inc_copies_it() {
    copy_while_the_guest_writes(Mode::Incremental);
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Full,
    Incremental,
}

fn copy_while_the_guest_writes(mode: Mode) {
    let dir = TempDir::new("emu-blkmig");
    let (src_raw, dst_raw) = (dir.join("src.raw"), dir.join("dst.raw"));
    let (src_q, dst_q) = (dir.join("src.qcow2"), dir.join("dst.qcow2"));
    for img in [&src_raw, &dst_raw] {
        qemu_img(&["create", "-q", "-f", "raw", p(img), "48M"]);
    }
    if mode == Mode::Full {
        for img in [&src_q, &dst_q] {
            qemu_img(&["create", "-q", "-f", "qcow2", p(img), "48M"]);
        }
    } else {
        let base = dir.join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "48M"]);
        let io = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x5a 0 48M"])
            .arg(&base)
            .status()
            .unwrap();
        assert!(io.success());
        for img in [&src_q, &dst_q] {
            qemu_img(&[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                p(img),
            ]);
        }
    }
    // What the guest writes: both disks for blk, the overlay alone for inc.
    let disks = match mode {
        Mode::Full => "vda vdb",
        Mode::Incremental => "vdb",
    };
    let (qa, qb, mig) = (dir.join("a.qmp"), dir.join("b.qmp"), dir.join("mig.sock"));
    let qmp_a = format!("unix:{},server=on,wait=off", qa.display());
    let qmp_b = format!("unix:{},server=on,wait=off", qb.display());
    let uri = format!("unix:{}", mig.display());
    let drives = |raw: &Path, q: &Path| {
        vec![
            "-drive".to_string(),
            format!("file={},format=raw,if=none,id=draw", raw.display()),
            "-device".into(),
            "virtio-blk-pci,drive=draw,id=vraw".into(),
            "-drive".into(),
            format!("file={},format=qcow2,if=none,id=dq", q.display()),
            "-device".into(),
            "virtio-blk-pci,drive=dq,id=vq".into(),
        ]
    };
    let mut args_a = vec!["-qmp".to_string(), qmp_a];
    args_a.extend(drives(&src_raw, &src_q));
    let args_a: Vec<&str> = args_a.iter().map(String::as_str).collect();
    let mut a = GuestConsole::boot_stock_linux(&args_a);
    a.wait_for("GUEST-READY", BOOT_TIMEOUT);
    a.wait_for("# ", CMD_TIMEOUT);
    // Block i % BLOCKS of each disk gets i, its checksum kept in /tmp/sum.DISK.BLOCK; the
    // loop ends at the top of a round once /tmp/stop exists.
    let started = a.run(
        &format!(
            "(i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); j=$((i % {BLOCKS})); \
             printf '%01048576d' $i > /tmp/w; s=$(md5sum < /tmp/w); \
             for d in {disks}; do dd if=/tmp/w of=/dev/$d bs=1048576 seek=$j count=1 \
             oflag=direct 2>/dev/null; echo \"$s\" > /tmp/sum.$d.$j; done; echo $i > /tmp/n; \
             done; echo WRITER-DONE > /tmp/done) & sleep 3; echo started $(cat /tmp/n)"
        ),
        CMD_TIMEOUT,
    );
    assert!(started.contains("started"), "{started}");
    let mut qa = Qmp::connect(&qa);
    let mut args_b = vec![
        "-qmp".to_string(),
        qmp_b,
        "-S".into(),
        "-incoming".into(),
        uri.clone(),
    ];
    args_b.extend(drives(&dst_raw, &dst_q));
    let args_b: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let args_b = stock_linux_args(&args_b);
    let args_b: Vec<&str> = args_b.iter().map(String::as_str).collect();
    let mut b = GuestConsole::spawn(&args_b);
    wait_until("the destination's monitor", CMD_TIMEOUT, || qb.exists());
    let mut qb = Qmp::connect(&qb);
    // Slow enough that the guest writes while the disks are copied.
    qa.ok("migrate_set_speed", Some(json!({ "value": 24u64 << 20 })));
    // Every block of the overlay written: what it holds now.
    let held = match mode {
        Mode::Full => 0,
        Mode::Incremental => {
            wait_until("the overlay to be written all over", CMD_TIMEOUT, || {
                let n = a.run("cat /tmp/n", CMD_TIMEOUT);
                n.trim().parse::<u32>().unwrap_or(0) >= BLOCKS
            });
            // The overlay's clusters, and the raw disk's first block (qemu-img allocates
            // it when it creates an image), in 1 MiB chunks.
            let held = allocated_chunks(&src_q) + allocated_chunks(&src_raw);
            assert_eq!(allocated_chunks(&src_q), u64::from(BLOCKS));
            held << 20
        }
    };
    let flag = match mode {
        Mode::Full => "blk",
        Mode::Incremental => "inc",
    };
    qa.ok("migrate", Some(json!({ "uri": uri, flag: true })));
    let mut during = json!(null);
    wait_until("the disk phase", CMD_TIMEOUT, || {
        during = qa.ok("query-migrate", None);
        during["disk"]["transferred"].as_u64() > Some(8 << 20)
    });
    let written_during = a.run("cat /tmp/n", CMD_TIMEOUT);
    eprintln!("during: {during} (guest at {written_during:?})");
    let total = match mode {
        Mode::Full => 96u64 << 20,
        Mode::Incremental => held,
    };
    assert_eq!(during["disk"]["total"], json!(total), "{during}");
    qa.ok("migrate_set_speed", Some(json!({ "value": 1u64 << 30 })));
    wait_until("the migration", CMD_TIMEOUT, || {
        let info = qa.ok("query-migrate", None);
        assert_ne!(info["status"], "failed", "{info}");
        info["status"] == "completed"
    });
    eprintln!("{}", qa.ok("query-migrate", None));
    assert_eq!(qb.ok("query-status", None)["status"], "paused");
    // Both sides stand still at the switchover: the copies are the source's disks.
    let same = Command::new("cmp")
        .arg(&src_raw)
        .arg(&dst_raw)
        .status()
        .unwrap();
    assert!(same.success(), "the raw copy differs from the source");
    let cmp = qemu_img(&["compare", "-U", p(&src_q), p(&dst_q)]);
    assert!(cmp.contains("Images are identical"), "{cmp}");

    qb.ok("cont", None);
    let check = b.run(
        &format!(
            "touch /tmp/stop; while [ ! -e /tmp/done ]; do sleep 0.2; done; sync; \
             bad=0; for d in {disks}; do for j in $(seq 0 {}); do [ -e /tmp/sum.$d.$j ] || \
             continue; s=$(dd if=/dev/$d bs=1048576 skip=$j count=1 iflag=direct \
             2>/dev/null | md5sum); [ \"$s\" = \"$(cat /tmp/sum.$d.$j)\" ] || bad=$((bad+1)); \
             done; done; echo MISMATCHES $bad AFTER $(cat /tmp/n)",
            BLOCKS - 1
        ),
        CMD_TIMEOUT,
    );
    eprintln!("{check}");
    assert!(
        check.contains("MISMATCHES 0 AFTER"),
        "blocks the guest wrote read back otherwise: {check}"
    );
    qb.ok("quit", None);
    drop(b);
    drop(a);
    let check = qemu_img(&["check", p(&dst_q)]);
    assert!(check.contains("No errors were found"), "{check}");
}
