//! An encrypted disk end to end under emu: a qcow2 image with QEMU's legacy AES encryption
//! (made and filled by qemu-img and qemu-io) keeps the VM from starting until block_passwd
//! gives its key; then the stock guest reads the data qemu-io wrote.

use std::process::Command;
use std::time::Duration;

use serde_json::json;
use vmm_tests::console::GuestConsole;
use vmm_tests::qmp::Qmp;
use vmm_tests::TempDir;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().expect(program);
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_encrypted_disk_stays_locked_until_block_passwd() {
    let dir = TempDir::new("emu-encrypted");
    let img = dir.join("secret.qcow2");
    let img_s = img.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=s0,data=hunter2",
            "-o",
            "encrypt.format=aes,encrypt.key-secret=s0",
            img_s,
            "16M",
        ],
    );
    let opts =
        format!("driver=qcow2,file.filename={img_s},encrypt.format=aes,encrypt.key-secret=s0");
    run(
        "qemu-io",
        &[
            "--object",
            "secret,id=s0,data=hunter2",
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x5a 0 64k",
        ],
    );
    let qmp_sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let drive = format!("file={img_s},format=qcow2,if=virtio");
    let mut console = GuestConsole::boot_stock_linux(&["-S", "-drive", &drive, "-qmp", &qmp_arg]);
    let mut qmp = Qmp::connect(&qmp_sock);
    let info = qmp.ok("query-block", None);
    assert_eq!(info[0]["inserted"]["encrypted"], true, "{info}");
    let refused = qmp.request("cont", None);
    assert_eq!(
        refused["error"]["desc"],
        json!(format!("'virtio0' ({img_s}) is encrypted")),
        "{refused}"
    );
    assert_eq!(qmp.ok("query-status", None)["status"], "prelaunch");
    let unknown = qmp.request(
        "block_passwd",
        Some(json!({"device": "nope", "password": "hunter2"})),
    );
    assert_eq!(unknown["error"]["class"], "DeviceNotFound");
    qmp.ok(
        "block_passwd",
        Some(json!({"device": "virtio0", "password": "hunter2"})),
    );
    qmp.ok("cont", None);

    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);
    let bytes = console.run(
        "dd if=/dev/vda bs=512 count=1 2>/dev/null | od -An -tx1 | head -1",
        CMD_TIMEOUT,
    );
    assert!(
        bytes.lines().any(|l| l.trim().starts_with("5a 5a 5a 5a")),
        "the guest reads what qemu-io wrote: {bytes}"
    );
    console.send("poweroff -f\n");
    assert_eq!(console.wait_exit(CMD_TIMEOUT), Some(0));
}
