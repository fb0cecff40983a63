//! Checks `scripts/guest-assets`: it must produce a bootable bzImage and an
//! initramfs holding /init, busybox, every guest kernel module with its
//! whole dependency closure, iperf3 with its loader and every shared library
//! it needs, and the udhcpc event script; a second run must leave everything
//! alone.
//!
//! The first run downloads Debian packages, so the Debian package registry
//! must be reachable.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

/// The modules the guest needs (dependencies are checked on top of these).
const GUEST_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_blk",
    "virtio_net",
    "virtio_balloon",
    "virtio_input",
    "virtio_scsi",
    "sr_mod",
    "cdrom",
    "isofs",
    "ext4",
    "bochs",
    "psmouse",
    "evdev",
    "button",
];

/// Dynamically linked programs the network tests run in the guest.
const GUEST_PROGRAMS: &[&str] = &["usr/bin/iperf3"];

/// Where the glibc loader looks for libraries when there is no ld.so.cache.
const LIBRARY_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib",
    "usr/lib",
];

const ASSET_FILES: &[&str] = &[
    "vmlinuz",
    "initramfs.img",
    "kernel-version",
    "package-version",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn guest_dir() -> PathBuf {
    repo_root().join("target").join("guest")
}

/// Runs the script and returns its stdout; panics with its output on failure.
fn run_guest_assets() -> String {
    let script = repo_root().join("scripts").join("guest-assets");
    let output = Command::new(&script)
        // Any cwd must work: the script finds the repo from its own path.
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap_or_else(|err| panic!("cannot run {}: {err}", script.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed ({}). It fetches Debian packages with apt-get: is the Debian \
         package registry reachable and the bookworm archive configured?\n\
         --- stdout\n{stdout}\n--- stderr\n{stderr}",
        script.display(),
        output.status
    );
    stdout
}

fn read_u16(data: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes([data[offset], data[offset + 1]])
}

fn read_u32(data: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(data[offset..offset + 4].try_into().unwrap())
}

fn read_u64(data: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(data[offset..offset + 8].try_into().unwrap())
}

/// Checks the x86 boot protocol header and returns the embedded release.
fn bzimage_release(image: &[u8]) -> String {
    assert!(
        image.len() > 0x1000,
        "vmlinuz is only {} bytes",
        image.len()
    );
    assert_eq!(&image[0x1fe..0x200], &[0x55, 0xaa], "no boot flag at 0x1FE");
    assert_eq!(&image[0x202..0x206], b"HdrS", "no HdrS magic at 0x202");
    let protocol = read_u16(image, 0x206);
    assert!(protocol >= 0x020c, "boot protocol {protocol:#x} is too old");
    let start = read_u16(image, 0x20e) as usize + 0x200;
    let end = start + image[start..].iter().position(|&b| b == 0).unwrap();
    let version = std::str::from_utf8(&image[start..end]).unwrap();
    version.split_whitespace().next().unwrap().to_string()
}

struct CpioEntry {
    mode: u32,
    data: Vec<u8>,
}

/// Parses a newc ("070701") archive into path -> entry.
fn parse_newc(blob: &[u8]) -> BTreeMap<String, CpioEntry> {
    let mut entries = BTreeMap::new();
    let mut pos = 0;
    loop {
        assert!(pos + 110 <= blob.len(), "cpio archive has no trailer");
        let header = &blob[pos..pos + 110];
        assert!(
            &header[..6] == b"070701" || &header[..6] == b"070702",
            "bad cpio magic at offset {pos}"
        );
        let field = |index: usize| {
            let text = std::str::from_utf8(&header[6 + 8 * index..14 + 8 * index]).unwrap();
            u32::from_str_radix(text, 16).unwrap() as usize
        };
        let (mode, file_size, name_size) = (field(1) as u32, field(6), field(11));
        let name_start = pos + 110;
        let name_end = name_start + name_size;
        let name = std::str::from_utf8(&blob[name_start..name_end - 1])
            .unwrap()
            .trim_start_matches("./")
            .to_string();
        let data_start = (name_end + 3) & !3;
        let data_end = data_start + file_size;
        assert!(data_end <= blob.len(), "cpio entry {name} is truncated");
        if name == "TRAILER!!!" {
            return entries;
        }
        let data = blob[data_start..data_end].to_vec();
        entries.insert(name, CpioEntry { mode, data });
        pos = (data_end + 3) & !3;
    }
}

/// Returns the contents of the named section of a 64-bit ELF file.
fn elf_section<'a>(image: &'a [u8], wanted: &str, origin: &str) -> Option<&'a [u8]> {
    assert_eq!(
        &image[..4],
        b"\x7fELF",
        "{origin} is not an uncompressed ELF"
    );
    let shoff = read_u64(image, 0x28) as usize;
    let shentsize = read_u16(image, 0x3a) as usize;
    let shnum = read_u16(image, 0x3c) as usize;
    let shstrndx = read_u16(image, 0x3e) as usize;
    let section = |index: usize| {
        let base = shoff + index * shentsize;
        let name = read_u32(image, base) as usize;
        let kind = read_u32(image, base + 4);
        let offset = read_u64(image, base + 0x18) as usize;
        let size = read_u64(image, base + 0x20) as usize;
        // SHT_NOBITS (.bss) has a size but no bytes in the file.
        let size = if kind == 8 { 0 } else { size };
        (name, &image[offset..offset + size])
    };
    let (_, names) = section(shstrndx);
    let mut wanted_z = wanted.as_bytes().to_vec();
    wanted_z.push(0);
    (0..shnum)
        .map(section)
        .find(|(name, _)| names[*name..].starts_with(&wanted_z))
        .map(|(_, data)| data)
}

/// Returns the interpreter (`.interp`) and the DT_NEEDED names (`.dynamic`
/// against `.dynstr`) of an executable or shared library.
fn elf_dynamic(image: &[u8], origin: &str) -> (Option<String>, Vec<String>) {
    let interp = elf_section(image, ".interp", origin).map(|data| {
        let end = data.iter().position(|&b| b == 0).unwrap_or(data.len());
        String::from_utf8_lossy(&data[..end]).into_owned()
    });
    let Some(dynamic) = elf_section(image, ".dynamic", origin) else {
        return (interp, Vec::new());
    };
    let strings = elf_section(image, ".dynstr", origin)
        .unwrap_or_else(|| panic!("{origin} has .dynamic but no .dynstr"));
    let needed = dynamic
        .chunks_exact(16)
        .map(|entry| (read_u64(entry, 0), read_u64(entry, 8) as usize))
        .take_while(|&(tag, _)| tag != 0)
        .filter(|&(tag, _)| tag == 1)
        .map(|(_, offset)| {
            let end = offset + strings[offset..].iter().position(|&b| b == 0).unwrap();
            String::from_utf8_lossy(&strings[offset..end]).into_owned()
        })
        .collect();
    (interp, needed)
}

/// Follows symlinks inside the archive to a regular file; returns its path.
fn resolve(entries: &BTreeMap<String, CpioEntry>, path: &str) -> Option<String> {
    let mut path = path.trim_start_matches('/').to_string();
    for _ in 0..40 {
        let entry = entries.get(&path)?;
        match entry.mode & 0o170000 {
            0o100000 => return Some(path),
            0o120000 => {
                let target = String::from_utf8_lossy(&entry.data).into_owned();
                path = if let Some(absolute) = target.strip_prefix('/') {
                    absolute.to_string()
                } else {
                    match path.rsplit_once('/') {
                        Some((dir, _)) => format!("{dir}/{target}"),
                        None => target,
                    }
                };
            }
            _ => return None,
        }
    }
    None
}

/// Returns the `depends=` names from a module's `.modinfo` ELF section.
fn module_depends(image: &[u8], origin: &str) -> Vec<String> {
    let modinfo = elf_section(image, ".modinfo", origin)
        .unwrap_or_else(|| panic!("{origin} has no .modinfo section"));
    modinfo
        .split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| std::str::from_utf8(list).unwrap().split(','))
        .filter(|name| !name.is_empty())
        .map(|name| name.replace('-', "_"))
        .collect()
}

fn module_name(path: &str) -> Option<String> {
    let base = path.rsplit('/').next()?;
    Some(base.strip_suffix(".ko")?.replace('-', "_"))
}

fn snapshot() -> BTreeMap<&'static str, (SystemTime, Vec<u8>)> {
    ASSET_FILES
        .iter()
        .map(|name| {
            let path = guest_dir().join(name);
            let modified = fs::metadata(&path).unwrap().modified().unwrap();
            (*name, (modified, fs::read(&path).unwrap()))
        })
        .collect()
}

#[test]
fn guest_assets_are_built_complete_and_idempotent() {
    run_guest_assets();
    let dir = guest_dir();

    let release = fs::read_to_string(dir.join("kernel-version")).unwrap();
    let release = release.trim();
    assert!(
        release.starts_with("6.1.") && release.ends_with("-amd64"),
        "{release}"
    );
    let package_version = fs::read_to_string(dir.join("package-version")).unwrap();
    assert!(
        package_version.trim().starts_with("6.1."),
        "{package_version}"
    );

    let vmlinuz = fs::read(dir.join("vmlinuz")).unwrap();
    assert_eq!(bzimage_release(&vmlinuz), release);

    let mut cpio = Vec::new();
    flate2::read::MultiGzDecoder::new(fs::File::open(dir.join("initramfs.img")).unwrap())
        .read_to_end(&mut cpio)
        .expect("initramfs.img is not valid gzip");
    let entries = parse_newc(&cpio);

    let init = entries.get("init").expect("initramfs has no /init");
    assert_eq!(
        init.mode & 0o170000,
        0o100000,
        "/init is not a regular file"
    );
    assert_ne!(init.mode & 0o111, 0, "/init is not executable");
    let init_text = String::from_utf8_lossy(&init.data);
    assert!(
        init_text.contains("GUEST-READY"),
        "/init never prints GUEST-READY"
    );
    let busybox = entries
        .get("bin/busybox")
        .expect("initramfs has no /bin/busybox");
    assert_eq!(&busybox.data[..4], b"\x7fELF");
    assert!(entries.contains_key("dev/console"), "no /dev/console node");

    let module_dir = format!("lib/modules/{release}/");
    let modules: BTreeMap<String, &str> = entries
        .keys()
        .filter(|path| path.starts_with(&module_dir))
        .filter_map(|path| Some((module_name(path)?, path.as_str())))
        .collect();
    let builtin: BTreeSet<String> = entries
        .get(&format!("{module_dir}modules.builtin"))
        .map(|entry| {
            String::from_utf8_lossy(&entry.data)
                .lines()
                .filter_map(module_name)
                .collect()
        })
        .unwrap_or_default();

    // Every module (unless built in) and the closure of its depends=.
    let mut pending: Vec<String> = GUEST_MODULES.iter().map(|m| m.to_string()).collect();
    let mut checked = BTreeSet::new();
    let mut depends_of = BTreeMap::new();
    while let Some(name) = pending.pop() {
        if !checked.insert(name.clone()) || builtin.contains(&name) {
            continue;
        }
        let path = modules
            .get(&name)
            .unwrap_or_else(|| panic!("module {name} is missing from the initramfs"));
        let depends = module_depends(&entries[*path].data, path);
        pending.extend(depends.iter().cloned());
        depends_of.insert(name, depends);
    }

    // modules.load lists every module after all of its dependencies.
    let load = entries
        .get(&format!("{module_dir}modules.load"))
        .expect("initramfs has no modules.load");
    let load = String::from_utf8_lossy(&load.data);
    let mut loaded = BTreeSet::new();
    for line in load.lines().filter(|line| !line.is_empty()) {
        let path = format!("{module_dir}{line}");
        assert!(
            entries.contains_key(&path),
            "modules.load names missing {line}"
        );
        let name = module_name(line).unwrap();
        for dep in module_depends(&entries[&path].data, line) {
            assert!(
                loaded.contains(&dep) || builtin.contains(&dep),
                "modules.load loads {name} before its dependency {dep}"
            );
        }
        loaded.insert(name);
    }
    for name in depends_of.keys() {
        assert!(loaded.contains(name), "modules.load does not load {name}");
    }

    // Each program, its interpreter and the closure of its DT_NEEDED
    // libraries, where the loader looks for them.
    let mut pending: Vec<String> = GUEST_PROGRAMS.iter().map(|p| p.to_string()).collect();
    let mut visited = BTreeSet::new();
    let mut libraries = BTreeSet::new();
    while let Some(path) = pending.pop() {
        let file = resolve(&entries, &path)
            .unwrap_or_else(|| panic!("/{path} is missing from the initramfs"));
        if !visited.insert(file.clone()) {
            continue;
        }
        let image = &entries[&file];
        let (interp, needed) = elf_dynamic(&image.data, &file);
        if GUEST_PROGRAMS.contains(&path.as_str()) {
            assert_ne!(image.mode & 0o111, 0, "/{file} is not executable");
            assert_eq!(
                interp.as_deref(),
                Some("/lib64/ld-linux-x86-64.so.2"),
                "/{path}'s interpreter"
            );
        }
        pending.extend(interp);
        for library in needed {
            let found = LIBRARY_DIRS
                .iter()
                .map(|dir| format!("{dir}/{library}"))
                .find(|candidate| resolve(&entries, candidate).is_some())
                .unwrap_or_else(|| panic!("/{file} needs {library}, which is missing"));
            libraries.insert(library);
            pending.push(found);
        }
    }
    for library in [
        "libc.so.6",
        "libm.so.6",
        "libiperf.so.0",
        "libcrypto.so.3",
        "libsctp.so.1",
    ] {
        assert!(
            libraries.contains(library),
            "iperf3 no longer needs {library}? found {libraries:?}"
        );
    }

    // udhcpc's event script, under Debian's and upstream's default names.
    let script = entries
        .get("usr/share/udhcpc/default.script")
        .expect("initramfs has no /usr/share/udhcpc/default.script");
    assert_ne!(
        script.mode & 0o111,
        0,
        "the udhcpc script is not executable"
    );
    let script_text = String::from_utf8_lossy(&script.data);
    assert!(script_text.starts_with("#!/bin/sh\n"));
    for event in ["deconfig", "bound", "renew", "resolv.conf"] {
        assert!(
            script_text.contains(event),
            "the udhcpc script lacks {event}"
        );
    }
    assert_eq!(
        resolve(&entries, "etc/udhcpc/default.script").as_deref(),
        Some("usr/share/udhcpc/default.script")
    );

    // A second run must find everything sound and touch nothing.
    let before = snapshot();
    let stdout = run_guest_assets();
    assert!(
        stdout.contains("up to date"),
        "second run rebuilt: {stdout}"
    );
    let after = snapshot();
    for name in ASSET_FILES {
        assert_eq!(before[name].0, after[name].0, "{name} mtime changed");
        assert!(before[name].1 == after[name].1, "{name} content changed");
    }
}
