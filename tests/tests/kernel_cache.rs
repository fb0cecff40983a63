//! The kernel cache (vmm/src/loader/cache.rs) end to end: vmm processes booting a bzImage
//! under emu, which unpacks it on the host, share one cache directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vmm_tests::guest::{Asm, DEBUG_EXIT_PORT, LOAD_ADDR};
use vmm_tests::{vmm_binary, wait_with_timeout, Finished, TempDir};

const TIMEOUT: Duration = Duration::from_secs(60);
/// What the guest writes to the debug-exit port; the vmm exits with (v << 1) | 1.
const EXIT_VALUE: u32 = 0x2a;

/// A bzImage whose gzip payload is a guest that leaves through isa-debug-exit, with some
/// incompressible bytes after its code so the entry is not trivially small.
fn write_bzimage(dir: &TempDir) -> PathBuf {
    let mut g = Asm::new();
    g.debug_exit(EXIT_VALUE);
    g.hang();
    let mut code = g.code();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    code.extend((0..256 << 10).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    let elf = vmm::loader::elf64_image(LOAD_ADDR, &code, 0);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&elf).unwrap();
    let path = dir.join("bzImage");
    std::fs::write(&path, vmm::loader::bzimage_image(&gz.finish().unwrap())).unwrap();
    path
}

/// The vmm booting `kernel` under emu, with the loader's debug lines on stderr.
fn command(kernel: &Path) -> Command {
    let debug_exit = format!("isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=4");
    let mut cmd = Command::new(vmm_binary());
    cmd.args([
        "-accel",
        "emu",
        "-m",
        "64",
        "-nodefaults",
        "-display",
        "none",
    ])
    .arg("-kernel")
    .arg(kernel)
    .args(["-device", &debug_exit])
    .env("VMM_LOG", "warn,vmm::loader=debug")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

fn spawn(kernel: &Path, cache: &Path) -> Child {
    command(kernel)
        .env("VMM_KERNEL_CACHE", cache)
        .spawn()
        .unwrap()
}

fn booted(done: &Finished) -> bool {
    done.status.code() == Some(((EXIT_VALUE << 1) | 1) as i32)
}

/// Names in the cache directory.
fn listing(cache: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(cache)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn vmms_share_the_cache_and_a_damaged_entry_is_rebuilt() {
    let dir = TempDir::new("kernel-cache");
    let kernel = write_bzimage(&dir);
    let cache = dir.join("cache");

    // Two at once, with an empty cache: both unpack, both boot, one whole entry is left.
    let (a, b) = (spawn(&kernel, &cache), spawn(&kernel, &cache));
    let (a, b) = (wait_with_timeout(a, TIMEOUT), wait_with_timeout(b, TIMEOUT));
    assert!(booted(&a), "{:?}\n{}", a.status, a.stderr);
    assert!(booted(&b), "{:?}\n{}", b.status, b.stderr);
    let names = listing(&cache);
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].ends_with(".vmlinux"), "{names:?}");
    let entry = cache.join(&names[0]);
    let whole = std::fs::read(&entry).unwrap();
    assert!(whole.len() > 256 << 10);

    // The next boot finds it.
    let c = wait_with_timeout(spawn(&kernel, &cache), TIMEOUT);
    assert!(booted(&c), "{}", c.stderr);
    assert!(c.stderr.contains("found"), "{}", c.stderr);
    assert!(!c.stderr.contains("written"), "{}", c.stderr);

    // Truncated, then corrupted: detected, the guest boots anyway, the entry is whole again.
    for damage in [
        |b: &mut Vec<u8>| b.truncate(b.len() / 2),
        |b: &mut Vec<u8>| {
            let at = b.len() - 1000;
            b[at] ^= 0x55;
        },
    ] {
        let mut bad = whole.clone();
        damage(&mut bad);
        std::fs::write(&entry, &bad).unwrap();
        let d = wait_with_timeout(spawn(&kernel, &cache), TIMEOUT);
        assert!(booted(&d), "{}", d.stderr);
        assert!(d.stderr.contains("building it again"), "{}", d.stderr);
        assert_eq!(std::fs::read(&entry).unwrap(), whole);
    }

    // Turned off: nothing is read or written.
    let off = command(&kernel)
        .env("VMM_KERNEL_CACHE", "off")
        .env("HOME", dir.join("no-home"))
        .spawn()
        .unwrap();
    let off = wait_with_timeout(off, TIMEOUT);
    assert!(booted(&off), "{}", off.stderr);
    assert!(!dir.join("no-home").exists());
}

/// A cache on a full disk: the vmm says so once and unpacks the kernel in memory; the guest
/// boots and no partial entry is left behind.
#[test]
fn a_full_cache_disk_falls_back_to_memory() {
    let dir = TempDir::new("kernel-cache-full");
    let kernel = write_bzimage(&dir);
    let cache = dir.join("small");
    std::fs::create_dir_all(&cache).unwrap();
    // 64 KiB: smaller than the unpacked kernel (over 256 KiB).
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&cache)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "mount a small tmpfs (the tests run as root)"
    );
    let done = wait_with_timeout(spawn(&kernel, &cache), TIMEOUT);
    let names = listing(&cache);
    let _ = Command::new("umount").arg(&cache).status();
    assert!(booted(&done), "{:?}\n{}", done.status, done.stderr);
    assert!(
        done.stderr.contains("No space left on device")
            && done.stderr.contains("unpacking the kernel in memory"),
        "{}",
        done.stderr
    );
    assert!(names.is_empty(), "{names:?}");
}
