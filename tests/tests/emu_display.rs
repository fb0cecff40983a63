//! The display end to end under emu: the stock guest's `bochs` DRM driver on our
//! bochs-display, a static C program (`tests/guest/fbpattern.c`) drawing a known pattern
//! on /dev/fb0, and that pattern pixel for pixel in `screendump` (PPM and PNG) and in
//! vncdotool's captures over Raw and ZRLE; keys typed with vncdotool and HMP sendkey
//! reaching the guest's tty; the VNC events with their data; add_client with a socketpair;
//! clients that misbehave dropped while others go on; a screendump that cannot be written
//! leaving no file; `kill -9` of vmm-display while a client watches. Passwords: none set,
//! right, wrong, expired, set_password connected=disconnect, a restart keeping them. And
//! QEMU 7.2's own bochs-display showing the guest's pattern the same.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::console::GuestConsole;
use vmm_tests::display::{vnc_capture, vnc_client, Handshake, Image, RawClient};
use vmm_tests::qmp::Qmp;
use vmm_tests::{guest_program_disk, repo_root, TempDir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const CMD_TIMEOUT: Duration = Duration::from_secs(180);
/// The mode the guest's fbdev comes up in: the EDID's preferred one (as QEMU's).
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;

struct Vm {
    console: GuestConsole,
    qmp: Qmp<UnixStream>,
    /// A second monitor connection that only collects events.
    events: Qmp<UnixStream>,
    vnc: PathBuf,
    dir: TempDir,
}

/// The stock guest with a bochs-display, VNC on a unix socket (`vnc_options` after the
/// address), the pattern program on a disk, and two monitor connections; `extra` goes to
/// the vmm.
fn boot(tag: &str, vnc_options: &str, wait_ready: bool, extra: &[&str]) -> Vm {
    let dir = TempDir::new(tag);
    let (disk, len) = guest_program_disk(&dir, "fbpattern", 0);
    let qmp_sock = dir.join("qmp.sock");
    let vnc = dir.join("vnc.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let vnc_arg = format!("unix:{}{vnc_options}", vnc.display());
    let drive = format!("file={},format=raw,if=none,id=prog", disk.display());
    let mut args = vec![
        "-qmp",
        &qmp_arg,
        "-device",
        "bochs-display",
        "-device",
        "virtio-tablet-pci,id=tablet",
        "-vnc",
        &vnc_arg,
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=prog",
    ];
    if !wait_ready {
        args.push("-S");
    }
    args.extend_from_slice(extra);
    let mut console = GuestConsole::boot_stock_linux(&args);
    let mut qmp = Qmp::unix(&qmp_sock);
    qmp.negotiate();
    let mut events = Qmp::unix(&qmp_sock);
    events.negotiate();
    if wait_ready {
        console.wait_for("GUEST-READY", BOOT_TIMEOUT);
        console.wait_for("# ", CMD_TIMEOUT);
        console.install_program("/dev/vda", len, "fbpattern", CMD_TIMEOUT);
    }
    Vm {
        console,
        qmp,
        events,
        vnc,
        dir,
    }
}

fn screendump(qmp: &mut Qmp<UnixStream>, path: &Path, format: Option<&str>) -> Value {
    let mut args = json!({ "filename": path.display().to_string() });
    if let Some(f) = format {
        args["format"] = json!(f);
    }
    qmp.request("screendump", Some(args))
}

fn read_png(path: &Path) -> Image {
    let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    Image {
        width: info.width,
        height: info.height,
        rgb: buf,
    }
}

/// The next message that is not an event.
fn reply(qmp: &mut Qmp<UnixStream>) -> Value {
    loop {
        let m = qmp.message();
        if m.get("event").is_none() {
            return m;
        }
    }
}

/// The next event named `name` on the events connection (others skipped).
fn next_event(events: &mut Qmp<UnixStream>, name: &str) -> Value {
    events.wait_event(name)
}

/// Wait until `f` holds, polling.
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + CMD_TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The display process's pid and restart count.
fn display_process(qmp: &mut Qmp<UnixStream>) -> (u64, u64) {
    let procs = qmp.ok("__org.vmm_query-device-processes", None);
    let p = procs
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["program"] == "vmm-display")
        .unwrap_or_else(|| panic!("no vmm-display in {procs}"))
        .clone();
    (p["pid"].as_u64().unwrap(), p["restarts"].as_u64().unwrap())
}

#[test]
fn the_guest_screen_reaches_screendump_and_vnc_clients() {
    let mut vm = boot("display", "", true, &[]);
    let dmesg = vm
        .console
        .run("dmesg | grep -i -E \"bochs|edid\"", CMD_TIMEOUT);
    assert!(dmesg.contains("Found bochs VGA, ID 0xb0c5"), "{dmesg}");
    assert!(dmesg.contains("Found EDID data blob"), "{dmesg}");
    assert!(dmesg.contains("fb0: bochs-drmdrmfb"), "{dmesg}");
    let out = vm.console.run("/tmp/fbpattern", CMD_TIMEOUT);
    assert!(out.contains(&format!("FB-OK {WIDTH} {HEIGHT}")), "{out}");
    let expected = Image::pattern(WIDTH, HEIGHT);

    // screendump, PPM and PNG.
    let ppm = vm.dir.join("screen.ppm");
    assert_eq!(screendump(&mut vm.qmp, &ppm, None), json!({"return": {}}));
    Image::read_ppm(&ppm).assert_same(&expected, "screendump (PPM)");
    let png_path = vm.dir.join("screen.png");
    assert_eq!(
        screendump(&mut vm.qmp, &png_path, Some("png")),
        json!({"return": {}})
    );
    read_png(&png_path).assert_same(&expected, "screendump (PNG)");

    // vncdotool over Raw and ZRLE, and the events of each connection.
    for encoding in ["raw", "zrle"] {
        vnc_capture(&vm.vnc, &vm.dir, encoding, None)
            .assert_same(&expected, &format!("vncdotool over {encoding}"));
        let server = json!({"auth": "none", "family": "unix", "service": vm.vnc.display().to_string(), "host": "", "websocket": false});
        let client = json!({"family": "unix", "service": "", "host": "", "websocket": false});
        for name in ["VNC_CONNECTED", "VNC_INITIALIZED", "VNC_DISCONNECTED"] {
            let e = next_event(&mut vm.events, name);
            assert_eq!(
                e["data"],
                json!({"server": server, "client": client}),
                "{e}"
            );
        }
    }
    let info = vm.qmp.ok("query-vnc", None);
    assert_eq!(
        info,
        json!({"enabled": true, "host": "", "service": vm.vnc.display().to_string(),
               "family": "unix", "auth": "none", "clients": []})
    );

    // Keys from a VNC client, and from HMP sendkey, reach the guest's first VT.
    vm.console.run(
        "(head -n1 /dev/tty1 > /tmp/keys 2>&1 &); sleep 1",
        CMD_TIMEOUT,
    );
    let typed = vnc_client(&[vm.vnc.to_str().unwrap(), "type", "Hello, VNC! 42\n"]);
    assert_eq!(typed["ok"], true, "{typed}");
    for name in ["VNC_CONNECTED", "VNC_INITIALIZED", "VNC_DISCONNECTED"] {
        next_event(&mut vm.events, name);
    }
    eventually("the typed line", || {
        vm.console
            .run("cat /tmp/keys", CMD_TIMEOUT)
            .contains("Hello, VNC! 42")
    });
    vm.console.run(
        "(head -n1 /dev/tty1 > /tmp/keys2 2>&1 &); sleep 1",
        CMD_TIMEOUT,
    );
    for key in ["h", "shift-i", "ret"] {
        assert_eq!(vm.qmp.hmp(&format!("sendkey {key}")), "");
    }
    eventually("the sendkey line", || {
        vm.console.run("cat /tmp/keys2", CMD_TIMEOUT).contains("hI")
    });
    assert_eq!(vm.qmp.hmp("sendkey frob"), "invalid parameter: frob\r\n");

    // The tablet: query-mice lists it (current once its driver runs), and a VNC pointer
    // reaches it as absolute coordinates (0..=0x7fff over the screen, as QEMU scales).
    let mice = vm.qmp.ok("query-mice", None);
    assert_eq!(
        mice,
        json!([
            {"name": "QEMU Virtio Tablet", "index": 3, "current": true, "absolute": true},
            {"name": "QEMU PS/2 Mouse", "index": 2, "current": false, "absolute": false},
        ])
    );
    vm.console.run(
        "for e in /sys/class/input/event*; do \
           [ \"$(cat $e/device/name)\" = \"QEMU Virtio Tablet\" ] && tablet=/dev/input/${e##*/}; \
         done; (cat $tablet > /tmp/tablet.bin &); sleep 1",
        CMD_TIMEOUT,
    );
    let moved = vnc_client(&[vm.vnc.to_str().unwrap(), "move", "320", "600"]);
    assert_eq!(moved["ok"], true, "{moved}");
    // Its connection is gone once its VNC_DISCONNECTED is out.
    for name in ["VNC_CONNECTED", "VNC_INITIALIZED", "VNC_DISCONNECTED"] {
        next_event(&mut vm.events, name);
    }
    let want_x = 320 * 0x7fff / WIDTH;
    let want_y = 600 * 0x7fff / HEIGHT;
    eventually("the tablet's events", || {
        let dump = vm
            .console
            .run("od -An -tu2 -w24 -v /tmp/tablet.bin", CMD_TIMEOUT);
        // struct input_event: 16 bytes of time, then type, code, value (u16 words 8..12).
        let events: Vec<Vec<u32>> = dump
            .lines()
            .map(|l| {
                l.split_whitespace()
                    .filter_map(|w| w.parse().ok())
                    .collect()
            })
            .filter(|w: &Vec<u32>| w.len() == 12)
            .map(|w| vec![w[8], w[9], w[10] | w[11] << 16])
            .collect();
        events.contains(&vec![3, 0, want_x])
            && events.contains(&vec![3, 1, want_y])
            && events.contains(&vec![1, 0x110, 1])
            && events.contains(&vec![1, 0x110, 0])
    });

    // add_client: one end of a socketpair, handed over with getfd.
    let (ours, theirs) = UnixStream::pair().unwrap();
    vm.qmp.send_with_fd(
        "getfd",
        Some(json!({"fdname": "vncclient"})),
        theirs.as_raw_fd(),
    );
    assert_eq!(reply(&mut vm.qmp), json!({"return": {}}));
    drop(theirs);
    let r = vm.qmp.request(
        "add_client",
        Some(json!({"protocol": "vnc", "fdname": "vncclient", "skipauth": true})),
    );
    assert_eq!(r, json!({"return": {}}));
    let mut client = RawClient::new(ours);
    assert_eq!(
        client.handshake(None),
        Handshake::Ready {
            width: WIDTH as u16,
            height: HEIGHT as u16,
            name: "QEMU".into()
        }
    );
    let e = next_event(&mut vm.events, "VNC_CONNECTED");
    assert_eq!(e["data"]["client"]["family"], "unix", "{e}");
    let clients = vm.qmp.ok("query-vnc", None)["clients"].clone();
    assert_eq!(clients.as_array().unwrap().len(), 1, "{clients}");
    drop(client);
    next_event(&mut vm.events, "VNC_DISCONNECTED");

    // add_client's errors, in QEMU's words.
    let r = vm.qmp.request(
        "add_client",
        Some(json!({"protocol": "vnc", "fdname": "nothere"})),
    );
    assert_eq!(
        r["error"]["desc"],
        "File descriptor named 'nothere' has not been found"
    );
    let pipe = {
        let mut fds = [0; 2];
        // SAFETY: pipe fills the two fds.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        fds
    };
    for (name, protocol, want) in [
        ("apipe", "vnc", "parameter @fdname must name a socket"),
        ("another", "bogus", "protocol 'bogus' is invalid"),
    ] {
        vm.qmp
            .send_with_fd("getfd", Some(json!({"fdname": name})), pipe[0]);
        assert_eq!(reply(&mut vm.qmp), json!({"return": {}}));
        let r = vm.qmp.request(
            "add_client",
            Some(json!({"protocol": protocol, "fdname": name})),
        );
        assert_eq!(r["error"]["desc"], want, "{r}");
    }
    // SAFETY: closing the pipe we made.
    unsafe {
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }

    // Clients that misbehave are dropped; a good one meanwhile gets the screen.
    let mut watcher = RawClient::connect(&vm.vnc);
    assert!(matches!(watcher.handshake(None), Handshake::Ready { .. }));
    let mut garbage = RawClient::connect(&vm.vnc);
    garbage.read_exact(12);
    garbage.write(b"HTTP/1.1 GET\n");
    assert!(garbage.closed(), "a bad version is dropped");
    let mut unknown = RawClient::connect(&vm.vnc);
    assert!(matches!(unknown.handshake(None), Handshake::Ready { .. }));
    unknown.write(&[42, 0, 0, 0]);
    assert!(unknown.closed(), "an unknown message type is dropped");
    let mut huge = RawClient::connect(&vm.vnc);
    assert!(matches!(huge.handshake(None), Handshake::Ready { .. }));
    huge.write(&[6, 0, 0, 0, 0x10, 0, 0, 0]);
    assert!(huge.closed(), "a 256 MiB cut text is dropped");
    // The watcher asks for the whole screen and gets an update of it.
    watcher.write(&[3, 0, 0, 0, 0, 0, 0x05, 0x00, 0x03, 0x20]);
    let header = watcher.read_exact(4);
    assert_eq!(header[0], 0, "a FramebufferUpdate");
    vnc_capture(&vm.vnc, &vm.dir, "zrle", None).assert_same(&expected, "after bad clients");
    drop(watcher);

    // A screendump that cannot be written leaves nothing behind.
    let r = screendump(&mut vm.qmp, Path::new("/nonexistent/dir/x.ppm"), None);
    assert_eq!(
        r["error"]["desc"],
        "failed to open file '/nonexistent/dir/x.ppm': No such file or directory"
    );
    let small = vm.dir.join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&small)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if mounted {
        let full = small.join("x.ppm");
        let r = screendump(&mut vm.qmp, &full, None);
        assert!(
            r["error"]["desc"]
                .as_str()
                .unwrap_or("")
                .contains("No space left"),
            "{r}"
        );
        assert!(!full.exists(), "the partial file is removed");
        let _ = Command::new("umount").arg(&small).status();
    } else {
        eprintln!("skipping the full-filesystem screendump: cannot mount a tmpfs");
    }

    // kill -9 of vmm-display while a client watches: the client is dropped, the process
    // comes back, a new client sees the same screen, the guest runs on.
    let mut watcher = RawClient::connect(&vm.vnc);
    assert!(matches!(watcher.handshake(None), Handshake::Ready { .. }));
    let (pid, restarts) = display_process(&mut vm.qmp);
    // SAFETY: signalling a process of ours.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    assert!(watcher.closed(), "the watching client sees the disconnect");
    eventually("vmm-display restarted", || {
        let (new_pid, new_restarts) = display_process(&mut vm.qmp);
        new_pid != pid && new_restarts == restarts + 1
    });
    vnc_capture(&vm.vnc, &vm.dir, "raw", None).assert_same(&expected, "after a restart");
    let alive = vm.console.run("echo still-here", CMD_TIMEOUT);
    assert!(alive.contains("still-here"), "{alive}");
}

#[test]
fn vnc_passwords_expiry_and_disconnect() {
    let mut vm = boot("display-auth", ",password=on", false, &[]);
    let refused = |vm: &Vm, pw: &str| {
        let mut c = RawClient::connect(&vm.vnc);
        c.handshake(Some(pw))
    };
    let failed = Handshake::Refused("Authentication failed".into());
    // No password set yet: every login fails.
    assert_eq!(refused(&vm, ""), failed);
    let ok = |r: Value| assert_eq!(r, json!({"return": {}}));
    ok(vm.qmp.request(
        "set_password",
        Some(json!({"protocol": "vnc", "password": "secret-and-more"})),
    ));
    // Only the first 8 characters count.
    assert!(matches!(refused(&vm, "secret-a"), Handshake::Ready { .. }));
    assert_eq!(refused(&vm, "wrong"), failed);
    // vncdotool's own DES agrees.
    let verdict = vnc_client(&[
        vm.vnc.to_str().unwrap(),
        "capture",
        vm.dir.join("a.ppm").to_str().unwrap(),
        "--password",
        "secret-and-more",
    ]);
    assert_eq!(verdict["ok"], true, "{verdict}");
    let verdict = vnc_client(&[
        vm.vnc.to_str().unwrap(),
        "capture",
        vm.dir.join("b.ppm").to_str().unwrap(),
        "--password",
        "nope",
    ]);
    assert_eq!(verdict["ok"], false, "{verdict}");

    // Expiry: now, never, in an hour; junk reads as expired, as in QEMU.
    for (time, works) in [
        ("now", false),
        ("never", true),
        ("+3600", true),
        ("junk", false),
    ] {
        ok(vm.qmp.request(
            "expire_password",
            Some(json!({"protocol": "vnc", "time": time})),
        ));
        let got = refused(&vm, "secret-a");
        assert_eq!(
            matches!(got, Handshake::Ready { .. }),
            works,
            "{time}: {got:?}"
        );
    }
    ok(vm.qmp.request(
        "expire_password",
        Some(json!({"protocol": "vnc", "time": "never"})),
    ));

    // connected=disconnect drops a connected client; keep does not.
    let mut watcher = RawClient::connect(&vm.vnc);
    assert!(matches!(
        watcher.handshake(Some("secret-a")),
        Handshake::Ready { .. }
    ));
    ok(vm.qmp.request(
        "set_password",
        Some(json!({"protocol": "vnc", "password": "another1", "connected": "keep"})),
    ));
    assert_eq!(
        vm.qmp.ok("query-vnc", None)["clients"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    ok(vm.qmp.request(
        "set_password",
        Some(json!({"protocol": "vnc", "password": "another2", "connected": "disconnect"})),
    ));
    assert!(watcher.closed(), "connected=disconnect drops the client");
    assert_eq!(refused(&vm, "another1"), failed);
    assert!(matches!(refused(&vm, "another2"), Handshake::Ready { .. }));
    let server = next_event(&mut vm.events, "VNC_INITIALIZED")["data"]["server"].clone();
    assert_eq!(server["auth"], "vnc", "{server}");

    // Errors in QEMU's words.
    let r = vm.qmp.request(
        "set_password",
        Some(json!({"protocol": "spice", "password": "x"})),
    );
    assert_eq!(
        r["error"],
        json!({"class": "DeviceNotActive", "desc": "SPICE is not in use"})
    );
    let r = vm.qmp.request(
        "set_password",
        Some(json!({"protocol": "vnc", "password": "x", "connected": "bogus"})),
    );
    assert_eq!(
        r["error"]["desc"],
        "Parameter 'connected' does not accept value 'bogus'"
    );

    // The password and its expiry survive a restart of vmm-display.
    let (pid, restarts) = display_process(&mut vm.qmp);
    // SAFETY: signalling a process of ours.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    eventually("vmm-display restarted", || {
        display_process(&mut vm.qmp).1 == restarts + 1
    });
    eventually("the new process listens", || {
        UnixStream::connect(&vm.vnc).is_ok()
    });
    assert_eq!(refused(&vm, "another1"), failed);
    assert!(matches!(refused(&vm, "another2"), Handshake::Ready { .. }));
    drop(vm.console);
}

#[test]
fn auth_none_refuses_a_password_and_qemu_agrees_on_the_screen() {
    // Both at the largest mode the EDID offers, chosen on the kernel command line.
    const APPEND: &str = "console=ttyS0 video=Virtual-1:1920x1080";
    const BIG_W: u32 = 1920;
    const BIG_H: u32 = 1080;
    // Our side: set_password on a display without password auth.
    let mut vm = boot("display-qemu", "", true, &["-append", APPEND]);
    let r = vm.qmp.request(
        "set_password",
        Some(json!({"protocol": "vnc", "password": "x"})),
    );
    assert_eq!(r["error"]["desc"], "Could not set password");
    assert_eq!(
        vm.qmp.hmp("change vnc password abc"),
        "If you want use passwords please enable password auth using '-vnc ${dpy},password'.\r\nError: Could not set password\r\n"
    );
    let out = vm.console.run("/tmp/fbpattern", CMD_TIMEOUT);
    assert!(out.contains(&format!("FB-OK {BIG_W} {BIG_H}")), "{out}");
    let ours = vm.dir.join("ours.ppm");
    assert_eq!(screendump(&mut vm.qmp, &ours, None), json!({"return": {}}));
    let ours = Image::read_ppm(&ours);

    // QEMU 7.2 with its own bochs-display, the same guest and program.
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    assert!(
        qemu.exists(),
        "QEMU 7.2 (scripts/test installs qemu-system-x86)"
    );
    let dir = TempDir::new("display-qemu-peer");
    let (disk, len) = guest_program_disk(&dir, "fbpattern", 0);
    let guest = repo_root().join("target/guest");
    let qmp_sock = dir.join("qmp.sock");
    let args: Vec<String> = [
        "-machine",
        "pc",
        "-accel",
        "tcg",
        "-m",
        "512",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        guest.join("vmlinuz").to_str().unwrap(),
        "-initrd",
        guest.join("initramfs.img").to_str().unwrap(),
        "-append",
        APPEND,
        "-serial",
        "stdio",
        "-device",
        "bochs-display",
        "-drive",
        &format!("file={},format=raw,if=none,id=prog", disk.display()),
        "-device",
        "virtio-blk-pci,drive=prog",
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp_sock.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut peer = GuestConsole::spawn_program(qemu, &args);
    peer.wait_for("GUEST-READY", BOOT_TIMEOUT);
    peer.wait_for("# ", CMD_TIMEOUT);
    let out = peer.run(
        &format!(
            "head -c {len} /dev/vda > /tmp/fbpattern; chmod +x /tmp/fbpattern; /tmp/fbpattern"
        ),
        CMD_TIMEOUT,
    );
    assert!(
        out.contains(&format!("FB-OK {BIG_W} {BIG_H}")),
        "QEMU: {out}"
    );
    let mut qmp = Qmp::unix(&qmp_sock);
    qmp.negotiate();
    let theirs = dir.join("theirs.ppm");
    assert_eq!(screendump(&mut qmp, &theirs, None), json!({"return": {}}));
    Image::read_ppm(&theirs).assert_same(&ours, "QEMU 7.2's screendump against ours");
    ours.assert_same(&Image::pattern(BIG_W, BIG_H), "the pattern");
}

/// The screen moves with a live migration: the guest's pattern, drawn on the source, is
/// what a VNC client reconnecting to the destination sees, with the password set on the
/// source; keys typed there reach the guest, and the tablet goes on working.
#[test]
fn a_vnc_client_reconnecting_to_the_destination_sees_the_same_screen() {
    let mut vm = boot("display-mig", ",password=on", true, &[]);
    vm.qmp.ok(
        "set_password",
        Some(json!({"protocol": "vnc", "password": "moving"})),
    );
    let out = vm.console.run("/tmp/fbpattern", CMD_TIMEOUT);
    assert!(out.contains(&format!("FB-OK {WIDTH} {HEIGHT}")), "{out}");
    let expected = Image::pattern(WIDTH, HEIGHT);
    vnc_capture(&vm.vnc, &vm.dir, "raw", Some("moving")).assert_same(&expected, "the source");

    let qmp_b = vm.dir.join("b.qmp");
    let vnc_b = vm.dir.join("b-vnc.sock");
    let mig = vm.dir.join("mig.sock");
    let uri = format!("unix:{}", mig.display());
    let drive = format!(
        "file={},format=raw,if=none,id=prog",
        vm.dir.join("fbpattern.img").display()
    );
    let args = vmm_tests::console::stock_linux_args(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", qmp_b.display()),
        "-device",
        "bochs-display",
        "-device",
        "virtio-tablet-pci,id=tablet",
        "-vnc",
        &format!("unix:{},password=on", vnc_b.display()),
        "-drive",
        &drive,
        "-device",
        "virtio-blk-pci,drive=prog",
        "-incoming",
        &uri,
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut b = GuestConsole::spawn(&args);
    eventually("the destination's monitor", || qmp_b.exists());
    let mut qb = Qmp::unix(&qmp_b);
    qb.negotiate();
    vm.qmp.ok("migrate", Some(json!({ "uri": uri })));
    eventually("the migration", || {
        let info = vm.qmp.ok("query-migrate", None);
        assert_ne!(info["status"], "failed", "{info}");
        info["status"] == "completed"
    });
    assert_eq!(qb.ok("query-status", None)["status"], "running");
    vnc_capture(&vnc_b, &vm.dir, "zrle", Some("moving"))
        .assert_same(&expected, "a client reconnecting to the destination");
    let ppm = vm.dir.join("b.ppm");
    qb.ok(
        "screendump",
        Some(json!({ "filename": ppm.display().to_string() })),
    );
    Image::read_ppm(&ppm).assert_same(&expected, "the destination's screendump");

    // Keys reach the guest through the destination's PS/2 keyboard; the tablet is there.
    b.run(
        "(head -n1 /dev/tty1 > /tmp/keys 2>&1 &); sleep 1",
        CMD_TIMEOUT,
    );
    let typed = vnc_client(&[
        vnc_b.to_str().unwrap(),
        "--password",
        "moving",
        "type",
        "moved 7\n",
    ]);
    assert_eq!(typed["ok"], true, "{typed}");
    let keys = b.run("sleep 1; cat /tmp/keys", CMD_TIMEOUT);
    assert!(keys.contains("moved 7"), "{keys}");
    let mice = qb.ok("query-mice", None);
    assert!(
        mice.as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "QEMU Virtio Tablet"),
        "{mice}"
    );
    let tablet = b.run(
        "grep -l 'QEMU Virtio Tablet' /sys/class/input/*/name | head -1",
        CMD_TIMEOUT,
    );
    assert!(tablet.contains("/sys/class/input/"), "{tablet}");
}
