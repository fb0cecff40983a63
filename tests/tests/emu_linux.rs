//! End to end under the emu accelerator: the stock Debian kernel and the busybox initramfs
//! boot to GUEST-READY and a shell, and the shell's answers are checked against the host.
//! One boot serves every check, since a boot costs seconds.

use std::time::Duration;

use vmm_tests::console::GuestConsole;
use vmm_tests::repo_root;

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(120);

fn host_sha256(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum on the host");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn stock_linux_boots_to_a_shell_under_emu() {
    let guest = repo_root().join("target/guest");
    let mut console = GuestConsole::boot_stock_linux(&[]);
    console.wait_for("GUEST-READY", BOOT_TIMEOUT);
    console.wait_for("# ", CMD_TIMEOUT);

    let release = std::fs::read_to_string(guest.join("kernel-version")).unwrap();
    // Kernel messages may interleave with command output on the console, so each check
    // looks for its line rather than taking the whole output.
    let uname = console.run("uname -r", CMD_TIMEOUT);
    assert!(
        uname.lines().any(|l| l.trim() == release.trim()),
        "uname -r: {uname:?}, expected {release:?}"
    );

    let cpuinfo = console.run("grep 'model name' /proc/cpuinfo", CMD_TIMEOUT);
    assert!(cpuinfo.contains("vmm emu"), "cpuinfo: {cpuinfo}");

    let date = console.run("date +%s", CMD_TIMEOUT);
    let guest_time: i64 = date
        .lines()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("date +%s printed no number: {date:?}"));
    let host_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_time - host_time).abs() < 60,
        "guest {guest_time} host {host_time}"
    );

    let digest = console.run("sha256sum /init", CMD_TIMEOUT);
    let expected = host_sha256(&repo_root().join("scripts/lib/initramfs-init"));
    assert!(
        !expected.is_empty() && digest.lines().any(|l| l.starts_with(&expected)),
        "guest digest {digest:?}, host {expected}"
    );

    console.send("poweroff -f\n");
    assert_eq!(console.wait_exit(CMD_TIMEOUT), Some(0));
}
