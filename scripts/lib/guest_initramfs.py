#!/usr/bin/env python3
"""Helper for scripts/guest-assets: builds and checks the guest initramfs.

Written in plain python3 (standard library only) so the build needs neither
cpio nor depmod on the host. Subcommands:

  build            resolve kernel module dependencies from each module's
                   .modinfo section, add dynamically linked programs from
                   unpacked Debian packages with the shared libraries they
                   need (DT_NEEDED closure, PT_INTERP), and write a
                   gzip-compressed newc cpio
  check-initramfs  verify an initramfs is a complete, readable newc archive
                   whose dynamic executables and libraries all find their
                   interpreter and libraries inside it
  kernel-release   verify a bzImage header and print its kernel release
"""

import argparse
import gzip
import io
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib

# Fixed timestamp for every archive entry so identical inputs give an
# identical initramfs (byte for byte).
ARCHIVE_MTIME = 0

NEWC_MAGIC = b"070701"
NEWC_CRC_MAGIC = b"070702"
NEWC_HEADER_LEN = 110
TRAILER_NAME = "TRAILER!!!"

MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


class GuestAssetsError(Exception):
    """A problem the caller should report as-is and stop."""


def fail(message):
    raise GuestAssetsError(message)


# --------------------------------------------------------------------------
# Kernel modules
# --------------------------------------------------------------------------


def normalize_module_name(name):
    """Module names treat '-' and '_' as the same character."""
    return name.replace("-", "_")


def module_name_from_path(path):
    base = os.path.basename(path)
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            return normalize_module_name(base[: -len(suffix)])
    return None


def module_compression(path):
    for suffix, kind in ((".ko.xz", "xz"), (".ko.zst", "zstd"), (".ko.gz", "gzip")):
        if path.endswith(suffix):
            return kind
    return "none"


def read_module_bytes(path):
    """Returns the ELF image of a module, decompressing it if needed.

    Busybox insmod cannot load compressed modules, so the initramfs always
    stores the decompressed image.
    """
    kind = module_compression(path)
    try:
        if kind == "none":
            with open(path, "rb") as f:
                return f.read()
        if kind == "xz":
            with lzma.open(path, "rb") as f:
                return f.read()
        if kind == "gzip":
            with gzip.open(path, "rb") as f:
                return f.read()
        if shutil.which("zstd") is None:
            fail(f"{path} is zstd-compressed but the zstd tool is not installed")
        return subprocess.run(
            ["zstd", "-q", "-d", "-c", path], check=True, stdout=subprocess.PIPE
        ).stdout
    except (OSError, lzma.LZMAError, subprocess.CalledProcessError) as err:
        fail(f"cannot read module {path}: {err}")


def elf_section(image, wanted, origin):
    """Returns the bytes of section `wanted` of a 64-bit little-endian ELF."""
    if len(image) < 64 or image[:4] != b"\x7fELF":
        fail(f"{origin} is not an ELF file")
    if image[4] != 2 or image[5] != 1:
        fail(f"{origin} is not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", image, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", image, 0x3A)
    if shentsize < 64 or shstrndx >= shnum or shoff + shnum * shentsize > len(image):
        fail(f"{origin} has a malformed section header table")

    def header(index):
        base = shoff + index * shentsize
        name, _kind = struct.unpack_from("<II", image, base)
        offset, size = struct.unpack_from("<QQ", image, base + 0x18)
        if offset + size > len(image):
            fail(f"{origin}: section {index} lies outside the file")
        return name, offset, size

    _, str_offset, str_size = header(shstrndx)
    names = image[str_offset : str_offset + str_size]
    for index in range(shnum):
        name_offset, offset, size = header(index)
        end = names.find(b"\0", name_offset)
        if end >= 0 and names[name_offset:end] == wanted:
            return image[offset : offset + size]
    return None


def parse_modinfo(image, origin):
    """Returns the .modinfo key=value pairs; keys may repeat (alias=)."""
    section = elf_section(image, b".modinfo", origin)
    if section is None:
        fail(f"{origin} has no .modinfo section: is it a kernel module?")
    pairs = []
    for raw in section.split(b"\0"):
        if b"=" in raw:
            key, value = raw.split(b"=", 1)
            pairs.append((key.decode("ascii", "replace"), value.decode("utf-8", "replace")))
    return pairs


def parse_softdep_pre(value):
    """`softdep=pre: a b post: c` -> [a, b]."""
    wanted = []
    phase = None
    for word in value.split():
        if word in ("pre:", "post:"):
            phase = word
        elif phase == "pre:":
            wanted.append(word)
    return wanted


class ModuleTree:
    """The modules of one unpacked kernel package (lib/modules/<release>)."""

    def __init__(self, module_dir, release):
        self.module_dir = module_dir
        self.release = release
        self.paths = {}  # name -> path relative to module_dir
        self.builtin = set()
        self._modinfo = {}
        self._aliases = None

        kernel_dir = os.path.join(module_dir, "kernel")
        if not os.path.isdir(kernel_dir):
            fail(f"{kernel_dir} does not exist: the kernel package ships no modules")
        for root, _dirs, files in os.walk(kernel_dir):
            for file_name in sorted(files):
                name = module_name_from_path(file_name)
                if name is None:
                    continue
                rel = os.path.relpath(os.path.join(root, file_name), module_dir)
                if name in self.paths:
                    fail(f"module {name} exists twice: {self.paths[name]} and {rel}")
                self.paths[name] = rel

        builtin_list = os.path.join(module_dir, "modules.builtin")
        if os.path.exists(builtin_list):
            with open(builtin_list, encoding="utf-8") as f:
                for line in f:
                    name = module_name_from_path(line.strip())
                    if name:
                        self.builtin.add(name)

    def image(self, name):
        return read_module_bytes(os.path.join(self.module_dir, self.paths[name]))

    def modinfo(self, name):
        if name not in self._modinfo:
            pairs = parse_modinfo(self.image(name), self.paths[name])
            vermagic = [v for k, v in pairs if k == "vermagic"]
            if vermagic and vermagic[0].split()[0] != self.release:
                fail(
                    f"{self.paths[name]} was built for kernel {vermagic[0].split()[0]}, "
                    f"not {self.release}"
                )
            self._modinfo[name] = pairs
        return self._modinfo[name]

    def depends(self, name):
        values = [v for k, v in self.modinfo(name) if k == "depends"]
        return [normalize_module_name(d) for v in values for d in v.split(",") if d]

    def softdeps_pre(self, name):
        values = [v for k, v in self.modinfo(name) if k == "softdep"]
        return [w for v in values for w in parse_softdep_pre(v)]

    def providers_of_alias(self, alias):
        """Modules declaring `alias=<alias>` (scans every module once)."""
        if self._aliases is None:
            self._aliases = {}
            for name in sorted(self.paths):
                for key, value in self.modinfo(name):
                    if key == "alias":
                        self._aliases.setdefault(value, []).append(name)
        return self._aliases.get(alias, [])

    def resolve_soft(self, wanted):
        """Maps a softdep (a module name or an alias) to one module name.

        Among several providers of an alias, the *_generic one wins: it works
        on every CPU, unlike accelerated variants such as crc32c_intel.
        Returns None when nothing provides it (a softdep is optional).
        """
        name = normalize_module_name(wanted)
        if name in self.paths or name in self.builtin:
            return name
        providers = self.providers_of_alias(wanted)
        if not providers:
            return None
        generic = [p for p in providers if p.endswith("_generic")]
        return (generic or providers)[0]

    def load_order(self, requested):
        """Returns (modules in load order, requested modules that are built in).

        Hard dependencies (depends=) and the `pre:` soft dependencies are
        placed before the module needing them.
        """
        order = []
        builtin_hits = []
        state = {}  # name -> "visiting" | "done"

        def visit(name, chain, required):
            if name in self.builtin:
                if not chain and name not in builtin_hits:
                    builtin_hits.append(name)
                return
            if name not in self.paths:
                if not required:
                    return
                via = " (needed by " + " <- ".join(reversed(chain)) + ")" if chain else ""
                fail(
                    f"module {name}{via} is neither built into kernel {self.release} "
                    f"nor shipped as a module"
                )
            if state.get(name) == "done":
                return
            if state.get(name) == "visiting":
                fail("module dependency cycle: " + " -> ".join(chain + [name]))
            state[name] = "visiting"
            for soft in self.softdeps_pre(name):
                target = self.resolve_soft(soft)
                if target is not None and target != name:
                    visit(target, chain + [name], required=False)
            for dep in self.depends(name):
                visit(dep, chain + [name], required=True)
            state[name] = "done"
            order.append(name)

        for name in requested:
            visit(normalize_module_name(name), [], required=True)
        return order, builtin_hits


# --------------------------------------------------------------------------
# Dynamically linked programs
# --------------------------------------------------------------------------

# Where the x86-64 glibc loader looks without an ld.so.cache (there is none in
# the initramfs), in its order. Debian's glibc is built with these multiarch
# directories as its trusted system directories.
LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib", "usr/lib")

PT_DYNAMIC = 2
PT_INTERP = 3
PT_LOAD = 1
DT_NULL = 0
DT_NEEDED = 1
DT_STRTAB = 5
DT_STRSZ = 10
ET_EXEC = 2
ET_DYN = 3


def elf_dynamic(image, origin):
    """Returns (interpreter, [DT_NEEDED names]) of a 64-bit little-endian ELF
    executable or shared library, read through its program headers as the
    loader does; (None, []) for a static binary or another kind of ELF file.
    """
    if len(image) < 64 or image[:4] != b"\x7fELF":
        fail(f"{origin} is not an ELF file")
    if image[4] != 2 or image[5] != 1:
        fail(f"{origin} is not a 64-bit little-endian ELF file")
    (kind,) = struct.unpack_from("<H", image, 0x10)
    if kind not in (ET_EXEC, ET_DYN):
        return None, []
    (phoff,) = struct.unpack_from("<Q", image, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    if phentsize < 56 or phoff + phnum * phentsize > len(image):
        fail(f"{origin} has a malformed program header table")
    headers = []
    for index in range(phnum):
        base = phoff + index * phentsize
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", image, base
        )
        if p_offset + p_filesz > len(image):
            fail(f"{origin}: segment {index} lies outside the file")
        headers.append((p_type, p_offset, p_vaddr, p_filesz))

    interpreter = None
    for p_type, offset, _vaddr, size in headers:
        if p_type == PT_INTERP:
            interpreter = image[offset : offset + size].split(b"\0")[0].decode("utf-8", "replace")

    dynamic = [h for h in headers if h[0] == PT_DYNAMIC]
    if not dynamic:
        return interpreter, []
    _, dyn_offset, _, dyn_size = dynamic[0]
    entries = []
    for pos in range(dyn_offset, dyn_offset + dyn_size - 15, 16):
        tag, value = struct.unpack_from("<qQ", image, pos)
        if tag == DT_NULL:
            break
        entries.append((tag, value))
    strtab = [v for t, v in entries if t == DT_STRTAB]
    strsz = [v for t, v in entries if t == DT_STRSZ]
    needed = [v for t, v in entries if t == DT_NEEDED]
    if not needed:
        return interpreter, []
    if not strtab or not strsz:
        fail(f"{origin} has DT_NEEDED entries but no string table")

    def file_offset(vaddr):
        for p_type, offset, seg_vaddr, size in headers:
            if p_type == PT_LOAD and seg_vaddr <= vaddr < seg_vaddr + size:
                return vaddr - seg_vaddr + offset
        fail(f"{origin}: address {vaddr:#x} is in no loaded segment")

    table_start = file_offset(strtab[0])
    table = image[table_start : table_start + strsz[0]]
    names = []
    for name_offset in needed:
        end = table.find(b"\0", name_offset)
        if name_offset >= len(table) or end < 0:
            fail(f"{origin}: DT_NEEDED points outside the string table")
        names.append(table[name_offset:end].decode("utf-8", "replace"))
    return interpreter, names


class PackageRoots:
    """Files of Debian packages unpacked (dpkg -x) side by side, looked up by
    the absolute path they would have on an installed system."""

    def __init__(self, roots):
        self.roots = roots

    def _host_path(self, path):
        rel = path.lstrip("/")
        for root in self.roots:
            host = os.path.join(root, rel)
            if os.path.lexists(host):
                return host
        return None

    def exists(self, path):
        return self._host_path(path) is not None

    def entries(self, path):
        """Returns [(path, symlink target or None, host file)] from `path` to
        the regular file it finally names, following symlinks the way the
        installed system would (absolute targets from the root)."""
        chain = []
        for _ in range(40):
            host = self._host_path(path)
            if host is None:
                fail(f"{path} is in none of the unpacked packages")
            if os.path.islink(host):
                target = os.readlink(host)
                chain.append((path, target, None))
                path = os.path.normpath(os.path.join(os.path.dirname(path), target))
                continue
            if not os.path.isfile(host):
                fail(f"{path} (in {host}) is not a regular file")
            chain.append((path, None, host))
            return chain
        fail(f"{path}: too many levels of symbolic links")


def find_library(name, exists):
    for directory in LIBRARY_DIRS:
        candidate = f"/{directory}/{name}"
        if exists(candidate):
            return candidate
    return None


def add_programs(cpio, roots, programs):
    """Adds each program and, recursively, its interpreter and DT_NEEDED
    libraries at the paths where the loader looks for them. Symlinks (such as
    /lib64/ld-linux-x86-64.so.2 or libfoo.so.1 -> libfoo.so.1.2) are kept, so
    the archive has the same layout as an installed system. Returns the
    libraries' names in the order they were added."""
    libraries = []
    pending = [(p, None) for p in programs]
    done = set()
    while pending:
        path, needed_by = pending.pop(0)
        if path in done:
            continue
        done.add(path)
        real_host = None
        for name, target, host in roots.entries(path):
            entry = name.lstrip("/")
            if entry in cpio.seen:
                continue
            if target is not None:
                cpio.symlink(entry, target)
            else:
                mode = os.stat(host).st_mode & 0o755
                with open(host, "rb") as f:
                    cpio.file(entry, f.read(), mode=mode)
            real_host = host
        if real_host is None:
            continue  # already added through another name
        with open(real_host, "rb") as f:
            interpreter, needed = elf_dynamic(f.read(), path)
        if needed_by is None and interpreter is None and not needed:
            continue  # a static program
        if interpreter is not None:
            if not roots.exists(interpreter):
                fail(f"{path} asks for the interpreter {interpreter}, which none of "
                     f"the unpacked packages ships")
            pending.append((interpreter, path))
        for library in needed:
            found = find_library(library, roots.exists)
            if found is None:
                fail(f"{path} needs {library}, which none of the unpacked packages "
                     f"ships in {', '.join('/' + d for d in LIBRARY_DIRS)}: add its "
                     f"package to scripts/guest-assets")
            if library not in libraries:
                libraries.append(library)
            pending.append((found, path))
    return libraries


def archive_resolve(entries, path):
    """Follows symlinks inside an archive; returns the final entry name or None."""
    for _ in range(40):
        entry = entries.get(path)
        if entry is None:
            return None
        mode, data = entry
        if not stat.S_ISLNK(mode):
            return path
        target = data.decode("utf-8", "replace")
        path = os.path.normpath(os.path.join("/" + os.path.dirname(path), target)).lstrip("/")
    return None


def check_dynamic_links(entries, origin):
    """Every dynamically linked file in the archive must find its interpreter
    and each DT_NEEDED library (as a regular file) in the loader's directories."""
    def exists(path):
        name = archive_resolve(entries, path.lstrip("/"))
        return name is not None and stat.S_ISREG(entries[name][0])

    for name, (mode, data) in sorted(entries.items()):
        if not stat.S_ISREG(mode) or data[:4] != b"\x7fELF" or "/modules/" in name:
            continue
        interpreter, needed = elf_dynamic(data, f"{origin}:/{name}")
        if interpreter is not None and not exists(interpreter):
            fail(f"{origin}: /{name} needs the interpreter {interpreter}, which is missing")
        for library in needed:
            if find_library(library, exists) is None:
                fail(f"{origin}: /{name} needs {library}, which is missing")


# --------------------------------------------------------------------------
# newc cpio
# --------------------------------------------------------------------------


class CpioWriter:
    """Writes a newc ("070701") cpio archive, the format the kernel unpacks."""

    def __init__(self, out):
        self.out = out
        self.next_inode = 1
        self.seen = set()

    def _pad(self, length):
        self.out.write(b"\0" * ((4 - length % 4) % 4))

    def _entry(self, name, mode, data=b"", rdev=(0, 0), nlink=1):
        name_bytes = name.encode("utf-8") + b"\0"
        fields = [
            self.next_inode if name != TRAILER_NAME else 0,
            mode,
            0,  # uid
            0,  # gid
            nlink,
            ARCHIVE_MTIME,
            len(data),
            0,  # dev major
            0,  # dev minor
            rdev[0],
            rdev[1],
            len(name_bytes),
            0,  # check
        ]
        self.next_inode += 1
        header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
        self.out.write(header)
        self.out.write(name_bytes)
        self._pad(len(header) + len(name_bytes))
        self.out.write(data)
        self._pad(len(data))

    def _claim(self, name):
        if name in self.seen:
            fail(f"initramfs entry {name} added twice")
        self.seen.add(name)

    def directory(self, name, mode=0o755):
        # Parents first: the kernel does not create missing directories.
        parent = os.path.dirname(name)
        if parent and parent not in self.seen:
            self.directory(parent)
        if name in self.seen:
            return
        self._claim(name)
        self._entry(name, stat.S_IFDIR | mode, nlink=2)

    def file(self, name, data, mode=0o644):
        self.directory(os.path.dirname(name))
        self._claim(name)
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name, target):
        self.directory(os.path.dirname(name))
        self._claim(name)
        self._entry(name, stat.S_IFLNK | 0o777, target.encode("utf-8"))

    def char_device(self, name, major, minor, mode=0o600):
        self.directory(os.path.dirname(name))
        self._claim(name)
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self):
        self._entry(TRAILER_NAME, 0, nlink=1)


def read_newc(blob, origin):
    """Parses a newc archive; returns {name: (mode, data)}. Strict on purpose."""
    entries = {}
    pos = 0
    while True:
        if pos + NEWC_HEADER_LEN > len(blob):
            fail(f"{origin}: archive ends without a TRAILER!!! entry (truncated?)")
        magic = blob[pos : pos + 6]
        if magic not in (NEWC_MAGIC, NEWC_CRC_MAGIC):
            fail(f"{origin}: bad cpio header magic {magic!r} at offset {pos}")
        try:
            fields = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        except ValueError:
            fail(f"{origin}: corrupt cpio header at offset {pos}")
        mode, file_size, name_size = fields[1], fields[6], fields[11]
        name_start = pos + NEWC_HEADER_LEN
        name_end = name_start + name_size
        if name_size == 0 or name_end > len(blob) or blob[name_end - 1] != 0:
            fail(f"{origin}: corrupt entry name at offset {pos}")
        name = blob[name_start : name_end - 1].decode("utf-8", "replace")
        data_start = (name_end + 3) & ~3
        data_end = data_start + file_size
        if data_end > len(blob):
            fail(f"{origin}: entry {name} is cut short (truncated archive?)")
        if name == TRAILER_NAME:
            return entries
        if name.startswith("./"):
            name = name[2:]
        entries[name] = (mode, blob[data_start:data_end])
        pos = (data_end + 3) & ~3


def decompress_initramfs(path):
    with open(path, "rb") as f:
        blob = f.read()
    if blob[:2] == b"\x1f\x8b":
        try:
            # gzip.decompress checks the CRC and length of every member.
            return gzip.decompress(blob)
        except (OSError, EOFError, zlib.error) as err:
            fail(f"{path}: gzip data is damaged: {err}")
    return blob


# --------------------------------------------------------------------------
# bzImage
# --------------------------------------------------------------------------


def bzimage_release(path):
    """Validates the x86 boot protocol header and returns the kernel release."""
    with open(path, "rb") as f:
        image = f.read()
    if len(image) < 0x1000:
        fail(f"{path} is too small to be a kernel image")
    if image[0x1FE:0x200] != b"\x55\xaa":
        fail(f"{path} has no boot sector signature 0xAA55 at 0x1FE")
    if image[0x202:0x206] != b"HdrS":
        fail(f"{path} has no 'HdrS' boot protocol magic at 0x202: not a bzImage")
    (version_ptr,) = struct.unpack_from("<H", image, 0x20E)
    start = version_ptr + 0x200
    end = image.find(b"\0", start, start + 256)
    if version_ptr == 0 or end < 0:
        fail(f"{path} has no kernel version string")
    words = image[start:end].decode("ascii", "replace").split()
    if not words:
        fail(f"{path} has an empty kernel version string")
    return words[0]


# --------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------

POWER_BUTTON_HANDLER = b"""#!/bin/sh
echo "guest-init: power button pressed, powering off" >/dev/ttyS0
sync
poweroff -f
"""

# busybox udhcpc runs this on each DHCP event with the lease in the environment
# ($interface $ip $mask $broadcast $router $dns $domain; mask is a prefix
# length). Debian's busybox looks for /etc/udhcpc/default.script, upstream's
# for /usr/share/udhcpc/default.script: both names lead here.
UDHCPC_SCRIPT = b"""#!/bin/sh
# udhcpc event handler: deconfig | bound | renew (others are ignored).
case "$1" in
    deconfig)
        ip -4 addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound | renew)
        address="$ip/${mask:-32}"
        # A renew that keeps the address leaves it (and the routes) alone.
        if [ "$1" = bound ] || ! ip -4 -o addr show dev "$interface" | grep -q " $address "; then
            ip -4 addr flush dev "$interface"
            ip addr add "$address" broadcast "${broadcast:-+}" dev "$interface"
        fi
        if [ -n "$router" ]; then
            while ip route del default dev "$interface" 2>/dev/null; do :; done
            for gateway in $router; do
                # A router outside the subnet is reached through a host route.
                ip route add default via "$gateway" dev "$interface" 2>/dev/null ||
                    { ip route add "$gateway" dev "$interface" &&
                        ip route add default via "$gateway" dev "$interface"; } && break
            done
        fi
        {
            [ -n "$domain" ] && echo "search $domain"
            for server in $dns; do echo "nameserver $server"; done
        } >/etc/resolv.conf.udhcpc
        mv -f /etc/resolv.conf.udhcpc /etc/resolv.conf
        ;;
esac
exit 0
"""
UDHCPC_SCRIPT_PATH = "usr/share/udhcpc/default.script"

PASSWD = b"root:x:0:0:root:/root:/bin/sh\n"
GROUP = b"root:x:0:\n"


def cmd_build(args):
    module_dir = os.path.join(args.kernel_root, "lib", "modules", args.release)
    tree = ModuleTree(module_dir, args.release)
    requested = [m for m in args.modules.split(",") if m]
    order, builtin_hits = tree.load_order(requested)

    compressions = sorted({module_compression(tree.paths[name]) for name in order})

    with open(args.busybox, "rb") as f:
        busybox = f.read()
    if busybox[:4] != b"\x7fELF":
        fail(f"{args.busybox} is not an ELF binary")
    with open(args.init, "rb") as f:
        init = f.read()

    # Stored path inside lib/modules/<release>/, always uncompressed.
    def stored(name):
        rel = tree.paths[name]
        return rel[: rel.index(".ko") + 3]

    raw = io.BytesIO()
    cpio = CpioWriter(raw)
    for directory in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "etc", "mnt"):
        cpio.directory(directory)
    cpio.directory("root", mode=0o700)
    cpio.directory("tmp", mode=0o1777)
    # The kernel opens /dev/console for init before anything is mounted.
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, mode=0o666)
    cpio.file("init", init, mode=0o755)
    cpio.file("bin/busybox", busybox, mode=0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("etc/passwd", PASSWD)
    cpio.file("etc/group", GROUP)
    # busybox acpid runs /etc/acpi/PWRF/00000080 when the ACPI power button (the
    # vmm's system_powerdown) reports KEY_POWER through its input device.
    cpio.file("etc/acpi/PWRF/00000080", POWER_BUTTON_HANDLER, mode=0o755)
    cpio.file(UDHCPC_SCRIPT_PATH, UDHCPC_SCRIPT, mode=0o755)
    cpio.symlink("etc/udhcpc/default.script", "/" + UDHCPC_SCRIPT_PATH)

    # Programs from unpacked packages, with their libraries and the loader.
    libraries = add_programs(cpio, PackageRoots(args.root), args.program)

    base = f"lib/modules/{args.release}"
    for name in order:
        cpio.file(f"{base}/{stored(name)}", tree.image(name))
    cpio.file(f"{base}/modules.load", "".join(stored(n) + "\n" for n in order).encode())

    # modules.dep in depmod's format so busybox modprobe works too; each
    # line lists every (transitive) dependency, nearest first.
    def closure(name, seen):
        for dep in tree.depends(name):
            if dep in tree.paths and dep not in seen:
                seen.append(dep)
                closure(dep, seen)
        return seen

    dep_lines = []
    for name in order:
        deps = " ".join(stored(d) for d in closure(name, []))
        dep_lines.append(f"{stored(name)}:{' ' + deps if deps else ''}\n")
    cpio.file(f"{base}/modules.dep", "".join(dep_lines).encode())
    builtin_list = os.path.join(module_dir, "modules.builtin")
    if os.path.exists(builtin_list):
        with open(builtin_list, "rb") as f:
            cpio.file(f"{base}/modules.builtin", f.read())
    cpio.finish()

    with open(args.output, "wb") as out:
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as gz:
            gz.write(raw.getvalue())

    print(f"modules={len(order)}")
    print(f"module_compression={','.join(compressions)}")
    print(f"builtin={','.join(builtin_hits)}")
    print(f"load_order={','.join(order)}")
    print(f"programs={','.join(args.program)}")
    print(f"libraries={','.join(libraries)}")


def cmd_check_initramfs(args):
    entries = read_newc(decompress_initramfs(args.path), args.path)
    required = ["init", "bin/busybox", UDHCPC_SCRIPT_PATH]
    required += [p.lstrip("/") for p in args.program]
    for name in required:
        if name not in entries:
            fail(f"{args.path} has no /{name}")
        mode, data = entries[name]
        if not stat.S_ISREG(mode) or not mode & 0o111 or not data:
            fail(f"{args.path}: /{name} is not a non-empty executable file")
    check_dynamic_links(entries, args.path)
    if args.release:
        base = f"lib/modules/{args.release}"
        load = entries.get(f"{base}/modules.load")
        if load is None:
            fail(f"{args.path} has no /{base}/modules.load")
        for line in load[1].decode("utf-8", "replace").splitlines():
            line = line.strip()
            if line and f"{base}/{line}" not in entries:
                fail(f"{args.path}: modules.load names {line}, which is missing")


def cmd_kernel_release(args):
    print(bzimage_release(args.path))


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build")
    build.add_argument("--kernel-root", required=True, help="unpacked kernel .deb")
    build.add_argument("--release", required=True)
    build.add_argument("--busybox", required=True)
    build.add_argument("--init", required=True)
    build.add_argument("--modules", required=True, help="comma-separated names")
    build.add_argument(
        "--root", action="append", default=[],
        help="an unpacked (dpkg -x) package; repeat for each package",
    )
    build.add_argument(
        "--program", action="append", default=[],
        help="absolute path of a program in the --root trees to add with its libraries",
    )
    build.add_argument("--output", required=True)
    build.set_defaults(run=cmd_build)

    check = sub.add_parser("check-initramfs")
    check.add_argument("path")
    check.add_argument("--release")
    check.add_argument(
        "--program", action="append", default=[],
        help="absolute path of a program the initramfs must hold",
    )
    check.set_defaults(run=cmd_check_initramfs)

    release = sub.add_parser("kernel-release")
    release.add_argument("path")
    release.set_defaults(run=cmd_kernel_release)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except GuestAssetsError as err:
        print(f"guest_initramfs: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"guest_initramfs: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
