//! Faults under load: the stock guest under emu writes checksummed blocks to three disks
//! (one on a small host filesystem that runs out of space, one on a FUSE filesystem that
//! fails writes with EIO when told), receives a long TCP transfer through a tap, and shows
//! its screen to VNC clients, while this suite injects faults at random times for as long
//! as asked: kill -9 of each device process kind (vmm-blk, vmm-net, vmm-display), a storm
//! of monitor clients with a hot-plug cycle, host-side EIO (the VM stops on it: the suite
//! continues it and the write is retried) and host-side ENOSPC (the small filesystem
//! fills: the VM stops, the suite makes room and continues it). A monitor client asks the vmm's status all along. At the end nothing may
//! be lost: every block the guest wrote reads back with its checksum, the transfer's
//! checksum matches, a VNC client gets a whole frame, every device process runs.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::console::{stock_linux_args, GuestConsole};
use crate::netns::NetNs;
use crate::qmp::Checked as Monitor;
use crate::rng::Rng;
use crate::transfer::{data, guest_sum, sha256};
use crate::TempDir;

const HOST: &str = "10.12.0.1";
const GUEST: &str = "10.12.0.2";
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
const CMD_TIMEOUT: Duration = Duration::from_secs(120);
/// The disk the guest cycles over (MiB blocks), and the one on the small filesystem.
const BLOCKS: u32 = 16;
const SMALL_BLOCKS: u32 = 48;
/// The small filesystem starts with room for this many MiB and grows by GROW at each
/// ENOSPC.
const SMALL_FS_MIB: u32 = 12;
const GROW_MIB: u32 = 12;
/// Kills of one process kind allowed in a window: under the vmm's restart budget (5 a
/// minute), with room for timing.
const KILLS_PER_WINDOW: usize = 3;
const KILL_WINDOW: Duration = Duration::from_secs(70);
/// The slowest answer the monitor may give while faults go on.
const MONITOR_BOUND: Duration = Duration::from_secs(10);

/// How long, from which seed, and how many clients a storm has.
#[derive(Debug, Clone)]
pub struct Options {
    pub duration: Duration,
    pub seed: u64,
    pub storm_clients: usize,
}

/// What a run did and found.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Faults injected (and survived), by kind.
    pub faults: BTreeMap<&'static str, u64>,
    pub blocks_written: u64,
    pub blocks_verified: u64,
    pub transfer_bytes: u64,
    pub vnc_sessions: u64,
    pub monitor_polls: u64,
    pub monitor_slowest: Duration,
    /// The vmm's private resident memory (KiB, guest RAM excluded) and open fds at the
    /// start of the faults and at the end.
    pub rss_kib: (u64, u64),
    pub fds: (u64, u64),
    /// The same, every [`SAMPLE_EVERY`] of the run: (time into the run, KiB, fds).
    pub samples: Vec<(Duration, u64, u64)>,
}

/// How often a run samples the vmm's footprint, to show whether it levels off.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(60);

/// A tmpfs of `mib` MiB at `path` (its size changed with [`grow`]); unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(path: &Path, mib: u32) -> Result<Self, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "tmpfs",
                &display(path),
            ],
        )?;
        Ok(SmallFs(path.to_path_buf()))
    }
}

/// The faulty FUSE filesystem (tests/tools/faulty-fs.py) at `mountpoint`, serving
/// `backing` as `disk.raw`; unmounted on drop.
struct FaultyFs {
    mountpoint: PathBuf,
    daemon: std::process::Child,
}

impl FaultyFs {
    fn mount(backing: &Path, control: &Path, mountpoint: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(mountpoint).map_err(|e| e.to_string())?;
        std::fs::write(control, "0").map_err(|e| e.to_string())?;
        let script = crate::repo_root().join("tests/tools/faulty-fs.py");
        let daemon = std::process::Command::new("/usr/bin/python3")
            .arg(&script)
            .args([backing, control, mountpoint])
            .stdin(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", script.display()))?;
        let fs = FaultyFs {
            mountpoint: mountpoint.to_path_buf(),
            daemon,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !fs.image().exists() {
            if Instant::now() > deadline {
                return Err("the faulty filesystem did not come up (python3-fusepy?)".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(fs)
    }

    fn image(&self) -> PathBuf {
        self.mountpoint.join("disk.raw")
    }
}

impl Drop for FaultyFs {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", &display(&self.mountpoint)]);
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

/// Give the tmpfs at `path` a new size.
fn resize_tmpfs(path: &Path, mib: u32) -> Result<(), String> {
    run(
        "mount",
        &["-o", &format!("remount,size={mib}m"), &display(path)],
    )
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", &display(&self.0)]);
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The device processes as the vmm reports them: (program, label) -> (pid, state, restarts).
fn processes(m: &mut Monitor) -> Result<Vec<Value>, String> {
    Ok(m.execute("__org.vmm_query-device-processes", None)?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Resident private KiB (RssAnon: the guest's RAM, a shared memfd, is not in it) and
/// open fds of `pid`.
fn footprint(pid: u32) -> (u64, u64) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    (rss, fds)
}

/// One VNC session: RFB 3.8 without authentication, one whole-frame update in raw
/// encoding read to its end. The frame's size.
pub fn vnc_frame(path: &Path) -> Result<(u16, u16), String> {
    let io = |e: std::io::Error| format!("VNC: {e}");
    let mut s = UnixStream::connect(path).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let read = |s: &mut UnixStream, n: usize| -> Result<Vec<u8>, String> {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b).map_err(io)?;
        Ok(b)
    };
    if read(&mut s, 12)? != b"RFB 003.008\n" {
        return Err("VNC: not RFB 3.8".into());
    }
    s.write_all(b"RFB 003.008\n").map_err(io)?;
    let n = read(&mut s, 1)?[0] as usize;
    let types = read(&mut s, n)?;
    if !types.contains(&1) {
        return Err(format!("VNC: security types {types:?}"));
    }
    s.write_all(&[1]).map_err(io)?;
    if read(&mut s, 4)? != [0, 0, 0, 0] {
        return Err("VNC: security failed".into());
    }
    s.write_all(&[1]).map_err(io)?;
    let init = read(&mut s, 24)?;
    let (w, h) = (
        u16::from_be_bytes([init[0], init[1]]),
        u16::from_be_bytes([init[2], init[3]]),
    );
    let bytes_per_pixel = usize::from(init[4] / 8);
    let name_len = u32::from_be_bytes([init[20], init[21], init[22], init[23]]) as usize;
    read(&mut s, name_len)?;
    let mut request = vec![3u8, 0];
    for v in [0u16, 0, w, h] {
        request.extend_from_slice(&v.to_be_bytes());
    }
    s.write_all(&request).map_err(io)?;
    let mut covered = 0usize;
    while covered < usize::from(w) * usize::from(h) {
        let head = read(&mut s, 4)?;
        if head[0] != 0 {
            return Err(format!(
                "VNC: message type {} instead of an update",
                head[0]
            ));
        }
        for _ in 0..u16::from_be_bytes([head[2], head[3]]) {
            let r = read(&mut s, 12)?;
            let (rw, rh) = (
                usize::from(u16::from_be_bytes([r[4], r[5]])),
                usize::from(u16::from_be_bytes([r[6], r[7]])),
            );
            let encoding = i32::from_be_bytes([r[8], r[9], r[10], r[11]]);
            if encoding != 0 {
                return Err(format!("VNC: encoding {encoding} without asking"));
            }
            read(&mut s, rw * rh * bytes_per_pixel)?;
            covered += rw * rh;
        }
    }
    Ok((w, h))
}

/// Run the suite.
pub fn run_suite(opts: &Options) -> Result<Tally, String> {
    let ns = NetNs::new("faults");
    ns.ip(&["link", "add", "br0", "type", "bridge"]);
    ns.ip(&["addr", "add", &format!("{HOST}/24"), "dev", "br0"]);
    ns.ip(&["link", "set", "br0", "up"]);
    ns.tap("tap0", None, false);
    ns.ip(&["link", "set", "tap0", "master", "br0"]);

    let dir = TempDir::new("fault-suite");
    let disk = dir.join("disk.raw");
    let spare = dir.join("spare.raw");
    for (path, len) in [(&disk, u64::from(BLOCKS) << 20), (&spare, 8 << 20)] {
        std::fs::File::create(path)
            .and_then(|f| f.set_len(len))
            .map_err(|e| e.to_string())?;
    }
    let small_fs = SmallFs::mount(&dir.join("small"), SMALL_FS_MIB)?;
    let small = dir.join("small/disk.raw");
    std::fs::File::create(&small)
        .and_then(|f| f.set_len(u64::from(SMALL_BLOCKS) << 20))
        .map_err(|e| e.to_string())?;
    let eio_backing = dir.join("eio-backing.raw");
    std::fs::File::create(&eio_backing)
        .and_then(|f| f.set_len(u64::from(BLOCKS) << 20))
        .map_err(|e| e.to_string())?;
    let eio_control = dir.join("eio-control");
    let faulty_fs = FaultyFs::mount(&eio_backing, &eio_control, &dir.join("eio"))?;
    let (qmp, vnc) = (dir.join("qmp.sock"), dir.join("vnc.sock"));
    let args: Vec<String> = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
        "-device".into(),
        "bochs-display".into(),
        "-vnc".into(),
        format!("unix:{}", vnc.display()),
        "-netdev".into(),
        "tap,id=n0,ifname=tap0,script=no,downscript=no".into(),
        "-device".into(),
        "virtio-net-pci,netdev=n0,id=nic0".into(),
        "-drive".into(),
        format!("file={},format=raw,if=none,id=d0", disk.display()),
        "-device".into(),
        "virtio-blk-pci,drive=d0,id=disk0".into(),
        "-drive".into(),
        format!(
            "file={},format=raw,if=none,id=d1,werror=enospc",
            small.display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=d1,id=disk1".into(),
        "-drive".into(),
        format!(
            "file={},format=raw,if=none,id=d2,werror=stop,rerror=stop",
            faulty_fs.image().display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=d2,id=disk2".into(),
    ];
    let log = dir.join("vmm.log");
    let vmm = crate::vmm_binary().display().to_string();
    let redirect = format!("exec \"$0\" \"$@\" 2> {}", log.display());
    let mut argv: Vec<String> = ns.wrap("sh").into_iter().map(str::to_string).collect();
    argv.extend(["-c".to_string(), redirect, vmm]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    argv.extend(stock_linux_args(&args));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut guest = GuestConsole::spawn_program(Path::new("ip"), &argv);
    guest.wait_for("GUEST-READY", BOOT_TIMEOUT);
    guest.wait_for("# ", CMD_TIMEOUT);
    let vmm_pid = guest.pid().ok_or("the vmm has no pid")?;
    let fail = |why: String| -> String { format!("{why}\nvmm log (tail):\n{}", tail(&log, 40)) };

    let up = guest.run(
        &format!("ip link set eth0 up; ip addr add {GUEST}/24 dev eth0; ping -c 2 -W 5 {HOST}"),
        CMD_TIMEOUT,
    );
    if !up.contains("2 packets received") {
        return Err(fail(format!("the guest's network: {up}")));
    }
    let mut tally = Tally::default();
    let mut monitor = Monitor::connect(&qmp).map_err(fail)?;
    tally.rss_kib.0 = footprint(vmm_pid).0;
    tally.fds.0 = footprint(vmm_pid).1;

    // The poller, before the writer can fill the small filesystem: the vmm's status
    // every 200 ms, the slowest answer, and ENOSPC handled
    // (the VM stopped on an I/O error: room made, the VM continued).
    let stop = Arc::new(AtomicBool::new(false));
    // Polls, the slowest answer, ENOSPC and EIO stops seen.
    let poll_stats = Arc::new(Mutex::new((0u64, Duration::ZERO, 0u64, 0u64)));
    let poller = {
        let (stop, stats) = (stop.clone(), poll_stats.clone());
        let mut m = Monitor::connect(&qmp).map_err(fail)?;
        let fs_path = small_fs.0.clone();
        std::thread::spawn(move || -> Result<(), String> {
            let mut size = SMALL_FS_MIB;
            while !stop.load(Ordering::Relaxed) {
                let asked = Instant::now();
                let status = m.execute("query-status", None)?;
                let took = asked.elapsed();
                {
                    let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                    s.0 += 1;
                    s.1 = s.1.max(took);
                }
                if took > MONITOR_BOUND {
                    return Err(format!("the monitor took {took:?} to answer"));
                }
                if status["status"] == "io-error" || status["status"] == "paused" {
                    // Which disk stopped it: the full filesystem gets room, the failing
                    // disk has failed its one write; the VM retries both on cont.
                    let blocks = m.execute("query-block", None)?;
                    let io = |state: &str| {
                        blocks
                            .as_array()
                            .is_some_and(|a| a.iter().any(|b| b["io-status"] == state))
                    };
                    let (nospace, failed) = (io("nospace"), io("failed"));
                    if nospace {
                        size += GROW_MIB;
                        resize_tmpfs(&fs_path, size)
                            .map_err(|e| format!("cannot grow the small filesystem: {e}"))?;
                    }
                    m.execute("cont", None)?;
                    let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                    s.2 += u64::from(nospace);
                    s.3 += u64::from(failed);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Ok(())
        })
    };
    // The writer: block i % BLOCKS of vda and vdc and i % SMALL_BLOCKS of vdb get i, the
    // checksum
    // kept in /tmp/sum.DISK.BLOCK; it ends at the top of a round once /tmp/stop exists.
    let started = guest.run(
        &format!(
            "(i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); \
             printf '%01048576d' $i > /tmp/w; s=$(md5sum < /tmp/w); \
             j=$((i % {BLOCKS})); dd if=/tmp/w of=/dev/vda bs=1048576 seek=$j count=1 \
             oflag=direct 2>/dev/null && echo \"$s\" > /tmp/sum.vda.$j; \
             j=$((i % {SMALL_BLOCKS})); dd if=/tmp/w of=/dev/vdb bs=1048576 seek=$j count=1 \
             oflag=direct 2>/dev/null && echo \"$s\" > /tmp/sum.vdb.$j; \
             j=$((i % {BLOCKS})); dd if=/tmp/w of=/dev/vdc bs=1048576 seek=$j count=1 \
             oflag=direct 2>/dev/null && echo \"$s\" > /tmp/sum.vdc.$j; \
             echo $i > /tmp/n; done; echo WRITER-DONE > /tmp/done) & sleep 2; echo started"
        ),
        CMD_TIMEOUT,
    );
    if !started.contains("started") {
        return Err(fail(format!("the writer: {started}")));
    }
    // The transfer: paced so that it lasts the run; the guest keeps only its checksum.
    let total = (opts.duration.as_secs().max(20) as usize) << 20;
    let payload = data(total, opts.seed);
    let sum = sha256(&payload);
    guest.send("(nc -l -p 5003 < /dev/null | sha256sum > /tmp/in.sum) &\n");
    std::thread::sleep(Duration::from_millis(500));
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let sender = ns.spawn_inside(move || -> Result<(), String> {
        let mut stream = crate::transfer::connect_retry((GUEST, 5003), CMD_TIMEOUT);
        for chunk in payload.chunks(32 << 10) {
            stream
                .write_all(chunk)
                .map_err(|e| format!("the transfer broke: {e}"))?;
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(())
    });

    let vnc_sessions = Arc::new(AtomicU64::new(0));

    let mut rng = Rng::new(opts.seed);
    let mut kills: BTreeMap<&str, Vec<Instant>> = BTreeMap::new();
    let started_at = Instant::now();
    let mut result = Ok(());
    while started_at.elapsed() < opts.duration {
        if started_at.elapsed() >= SAMPLE_EVERY * tally.samples.len() as u32 {
            let (rss, fds) = footprint(vmm_pid);
            tally.samples.push((started_at.elapsed(), rss, fds));
        }
        std::thread::sleep(Duration::from_millis(3000 + rng.below(4000)));
        let mut fault = match rng.below(6) {
            0 => "kill vmm-blk",
            1 => "kill vmm-net",
            2 => "kill vmm-display",
            3 => "monitor storm + hot-plug",
            4 => "host EIO",
            _ => "vnc session",
        };
        // The vmm gives up on a process that dies 5 times a minute (as it should): stay
        // under its budget.
        if fault.starts_with("kill") {
            let times = kills.entry(fault).or_default();
            times.retain(|t| t.elapsed() < KILL_WINDOW);
            if times.len() >= KILLS_PER_WINDOW {
                fault = "vnc session";
            } else {
                times.push(Instant::now());
            }
        }
        let done = match fault {
            "monitor storm + hot-plug" => storm(
                &qmp,
                opts.storm_clients,
                &mut monitor,
                &spare,
                rng.next_u64(),
            ),
            // The disk's next write fails (once): the VM stops, the poller continues it.
            "host EIO" => std::fs::write(&eio_control, "1").map_err(|e| e.to_string()),
            "vnc session" => vnc_frame(&vnc).map(|_| {
                vnc_sessions.fetch_add(1, Ordering::Relaxed);
            }),
            kill => kill_one(&mut monitor, kill.trim_start_matches("kill ")),
        };
        if let Err(e) = done {
            result = Err(format!("{fault}: {e}"));
            break;
        }
        *tally.faults.entry(fault).or_default() += 1;
    }
    result.map_err(fail)?;

    // Nothing lost.
    sender
        .join()
        .map_err(|_| "the sender panicked".to_string())?
        .map_err(fail)?;
    tally.transfer_bytes = sent.load(Ordering::Relaxed);
    let out = guest.run(
        "while ! [ -s /tmp/in.sum ]; do sleep 0.5; done; cat /tmp/in.sum",
        CMD_TIMEOUT,
    );
    if guest_sum(&out) != sum {
        return Err(fail(format!("the transfer arrived otherwise: {out}")));
    }
    let check = guest.run(
        &format!(
            "touch /tmp/stop; while [ ! -e /tmp/done ]; do sleep 0.2; done; sync; \
             bad=0; n=0; for d in vda vdb vdc; do for j in $(seq 0 {}); do \
             [ -e /tmp/sum.$d.$j ] || continue; n=$((n+1)); \
             s=$(dd if=/dev/$d bs=1048576 skip=$j count=1 iflag=direct 2>/dev/null | md5sum); \
             [ \"$s\" = \"$(cat /tmp/sum.$d.$j)\" ] || bad=$((bad+1)); done; done; \
             echo VERIFIED $n MISMATCHES $bad WRITES $(cat /tmp/n)",
            SMALL_BLOCKS.max(BLOCKS) - 1
        ),
        CMD_TIMEOUT,
    );
    let field = |name: &str| -> u64 {
        check
            .split_whitespace()
            .skip_while(|w| *w != name)
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX)
    };
    if field("MISMATCHES") != 0 {
        return Err(fail(format!("blocks read back otherwise: {check}")));
    }
    tally.blocks_verified = field("VERIFIED");
    tally.blocks_written = field("WRITES").saturating_mul(3);
    vnc_frame(&vnc).map_err(fail)?;
    tally.vnc_sessions = vnc_sessions.load(Ordering::Relaxed) + 1;
    for p in processes(&mut monitor)? {
        if p["state"] != "running" {
            return Err(fail(format!("a device process is not running: {p}")));
        }
    }
    // The poller ran through the checks too (a stop there needs continuing as well).
    stop.store(true, Ordering::Relaxed);
    poller
        .join()
        .map_err(|_| "the poller panicked".to_string())?
        .map_err(fail)?;
    {
        let s = poll_stats.lock().unwrap_or_else(|e| e.into_inner());
        tally.monitor_polls = s.0;
        tally.monitor_slowest = s.1;
        if s.2 > 0 {
            let what = "host ENOSPC (VM stopped, room made, continued)";
            tally.faults.insert(what, s.2);
        }
        // Each EIO injected stopped the VM once (the last may not have been hit yet).
        let injected = tally.faults.get("host EIO").copied().unwrap_or(0);
        if s.3 + 1 < injected {
            return Err(fail(format!(
                "{injected} EIO injected, the VM stopped for {} of them",
                s.3
            )));
        }
    }
    let (rss, fds) = footprint(vmm_pid);
    tally.rss_kib.1 = rss;
    tally.fds.1 = fds;
    let _ = monitor.execute("quit", None);
    drop(guest);
    drop(small_fs);
    drop(faulty_fs);
    Ok(tally)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// kill -9 the process of `program`, and wait for the vmm to have started another.
fn kill_one(m: &mut Monitor, program: &str) -> Result<(), String> {
    let before = processes(m)?;
    let row = before
        .iter()
        .find(|p| p["program"] == program)
        .ok_or_else(|| format!("no {program}"))?;
    let pid = row["pid"].as_u64().ok_or("no pid")? as i32;
    let restarts = row["restarts"].as_u64().unwrap_or(0);
    // SAFETY: kill with a pid the vmm reports and a constant signal.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = processes(m)?;
        if let Some(p) = now.iter().find(|p| p["program"] == program) {
            if p["state"] != "running" {
                return Err(format!("{program} was not restarted: {p}"));
            }
            if p["restarts"].as_u64() > Some(restarts) && p["pid"].as_u64() != Some(pid as u64) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{program} was not restarted within 30 s"));
        }
    }
}

/// `clients` monitor clients at once, each negotiating and asking a few things, then a
/// hot-plug cycle of the spare disk (the guest sees it come and go).
fn storm(
    qmp: &Path,
    clients: usize,
    m: &mut Monitor,
    spare: &Path,
    tag: u64,
) -> Result<(), String> {
    let failures = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|i| {
            let (qmp, failures) = (qmp.to_path_buf(), failures.clone());
            std::thread::spawn(move || {
                let asked = Monitor::connect(&qmp).and_then(|mut c| {
                    c.execute("query-status", None)?;
                    c.execute(
                        if i % 2 == 0 {
                            "query-block"
                        } else {
                            "query-pci"
                        },
                        None,
                    )?;
                    Ok(())
                });
                if asked.is_err() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // A drive goes with its device when that is unplugged, as in QEMU: a new one each
    // time.
    let drive = format!("spare{tag:x}");
    let added = m.execute(
        "human-monitor-command",
        Some(json!({"command-line": format!(
            "drive_add 0 file={},if=none,id={drive},format=raw",
            spare.display()
        )})),
    )?;
    if !added.as_str().is_some_and(|t| t.contains("OK")) {
        return Err(format!("drive_add: {added}"));
    }
    m.execute(
        "device_add",
        Some(json!({"driver": "virtio-blk-pci", "drive": drive, "id": "spare0"})),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    m.execute("device_del", Some(json!({"id": "spare0"})))?;
    m.wait_event("DEVICE_DELETED", Duration::from_secs(60))?;
    for t in threads {
        let _ = t.join();
    }
    match failures.load(Ordering::Relaxed) {
        0 => Ok(()),
        n => Err(format!("{n} of {clients} monitor clients failed")),
    }
}
