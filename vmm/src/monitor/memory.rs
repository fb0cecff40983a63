//! Guest memory for the monitor: virtual-to-physical translation through a vCPU's page
//! tables (as the vCPU's CR0/CR3/CR4/EFER set them up) and the memsave / pmemsave dumps.
//! A dump is written to a temporary file next to the target and renamed into place, so a
//! failed dump leaves no partial file.

use std::io::Write;
use std::path::{Path, PathBuf};

use qmp::schema::{ArgType, CommandSpec, ParamSpec};
use qmp::QmpError;
use serde_json::{json, Value};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

use super::command::{Command, CommandContext};
use super::MonitorCall;
use crate::accel::PagingRegisters;
use crate::machine::Machine;

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PTE_PRESENT: u64 = 1;
const PTE_LARGE: u64 = 1 << 7;
/// Physical address bits 12..51 of a 64-bit entry.
const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PAGE_SIZE: u64 = 0x1000;
/// How much is copied per step.
const CHUNK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MemoryDumpError {
    /// QEMU's text for a range that is not (entirely) readable.
    #[error("Invalid addr 0x{addr:016x}/size {size} specified")]
    InvalidRange { addr: u64, size: i64 },
    /// QEMU's text for a dump file that cannot be created.
    #[error("Could not open '{path}': {reason}")]
    Open { path: String, reason: String },
    #[error("failed to write '{path}': {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Translate the guest-virtual `va` with the paging mode `regs` select; None if unmapped.
pub fn translate(mem: &GuestMemoryMmap, regs: &PagingRegisters, va: u64) -> Option<u64> {
    if regs.cr0 & CR0_PG == 0 {
        return Some(va);
    }
    if regs.efer & EFER_LMA != 0 {
        let levels = if regs.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        return walk_64(mem, regs.cr3 & PTE_ADDR_MASK, va, levels);
    }
    if regs.cr4 & CR4_PAE != 0 {
        let va = va & 0xffff_ffff;
        let pdpte_addr = (regs.cr3 & 0xffff_ffe0) + ((va >> 30) & 3) * 8;
        let pdpte: u64 = mem.read_obj(GuestAddress(pdpte_addr)).ok()?;
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        return walk_64(mem, pdpte & PTE_ADDR_MASK, va, 2);
    }
    walk_32(
        mem,
        regs.cr3 & 0xffff_f000,
        va & 0xffff_ffff,
        regs.cr4 & CR4_PSE != 0,
    )
}

/// A walk through `levels` levels of 8-byte entries below `table` (the last level maps
/// 4 KiB pages; a large-page bit ends it early above that).
fn walk_64(mem: &GuestMemoryMmap, mut table: u64, va: u64, levels: u32) -> Option<u64> {
    for level in (0..levels).rev() {
        let shift = 12 + 9 * level;
        let entry: u64 = mem
            .read_obj(GuestAddress(table + ((va >> shift) & 511) * 8))
            .ok()?;
        if entry & PTE_PRESENT == 0 {
            return None;
        }
        let page_mask = (1u64 << shift) - 1;
        if level == 0 || (level <= 2 && entry & PTE_LARGE != 0) {
            return Some((entry & PTE_ADDR_MASK & !page_mask) | (va & page_mask));
        }
        table = entry & PTE_ADDR_MASK;
    }
    None
}

/// The legacy two-level walk with 4-byte entries (4 MiB pages under CR4.PSE).
fn walk_32(mem: &GuestMemoryMmap, dir: u64, va: u64, pse: bool) -> Option<u64> {
    let pde: u32 = mem.read_obj(GuestAddress(dir + (va >> 22) * 4)).ok()?;
    let pde = u64::from(pde);
    if pde & PTE_PRESENT == 0 {
        return None;
    }
    if pse && pde & PTE_LARGE != 0 {
        return Some((pde & 0xffc0_0000) | (va & 0x3f_ffff));
    }
    let pte: u32 = mem
        .read_obj(GuestAddress((pde & 0xffff_f000) + ((va >> 12) & 1023) * 4))
        .ok()?;
    let pte = u64::from(pte);
    (pte & PTE_PRESENT != 0).then_some((pte & 0xffff_f000) | (va & 0xfff))
}

/// Reads `size` bytes at `addr`, mapping each page with `map` (identity for physical).
fn read_range(
    mem: &GuestMemoryMmap,
    addr: u64,
    size: i64,
    mut map: impl FnMut(u64) -> Option<u64>,
) -> Result<Vec<u8>, MemoryDumpError> {
    let invalid = || MemoryDumpError::InvalidRange { addr, size };
    let len = u64::try_from(size).map_err(|_| invalid())?;
    addr.checked_add(len).ok_or_else(invalid)?;
    let mut data = vec![0u8; usize::try_from(len).map_err(|_| invalid())?];
    let mut done = 0usize;
    while done < data.len() {
        let va = addr + done as u64;
        let in_page = (PAGE_SIZE - (va % PAGE_SIZE)) as usize;
        let step = in_page.min(data.len() - done).min(CHUNK);
        let pa = map(va).ok_or_else(invalid)?;
        mem.read_slice(&mut data[done..done + step], GuestAddress(pa))
            .map_err(|_| invalid())?;
        done += step;
    }
    Ok(data)
}

/// QMP pmemsave: guest-physical memory to a file.
pub fn save_physical(
    mem: &GuestMemoryMmap,
    addr: u64,
    size: i64,
    filename: &str,
) -> Result<(), MemoryDumpError> {
    let data = read_range(mem, addr, size, Some)?;
    write_atomically(filename, &data)
}

/// QMP memsave: guest-virtual memory as a vCPU with `regs` sees it, to a file.
pub fn save_virtual(
    mem: &GuestMemoryMmap,
    regs: &PagingRegisters,
    addr: u64,
    size: i64,
    filename: &str,
) -> Result<(), MemoryDumpError> {
    let data = read_range(mem, addr, size, |va| translate(mem, regs, va))?;
    write_atomically(filename, &data)
}

/// Write `data` to a temporary file beside `filename`, then rename it over `filename`.
fn write_atomically(filename: &str, data: &[u8]) -> Result<(), MemoryDumpError> {
    let target = Path::new(filename);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp: PathBuf = target.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let open_error = |e: std::io::Error| MemoryDumpError::Open {
        path: filename.to_string(),
        reason: io_reason(&e),
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&temp)
        .map_err(open_error)?;
    let written = file.write_all(data).and_then(|()| file.sync_data());
    drop(file);
    let result = written.and_then(|()| std::fs::rename(&temp, target));
    if let Err(source) = result {
        let _ = std::fs::remove_file(&temp);
        return Err(MemoryDumpError::Write {
            path: filename.to_string(),
            source,
        });
    }
    Ok(())
}

/// strerror's text without Rust's " (os error N)" suffix, as QEMU prints it.
fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(end) => text[..end].to_string(),
        None => text,
    }
}

/// memsave and pmemsave: guest memory to a file.
pub const COMMANDS: &[Command] = &[
    // QEMU 7.2's memsave also takes the CPU whose page tables translate `val`.
    Command::machine("memsave", memsave).with_spec(|| {
        CommandSpec::new(
            "memsave",
            vec![
                ParamSpec::required("val", ArgType::Integer),
                ParamSpec::required("size", ArgType::Integer),
                ParamSpec::required("filename", ArgType::String),
                ParamSpec::optional("cpu-index", ArgType::Integer),
            ],
        )
    }),
    Command::machine("pmemsave", pmemsave),
];

/// The (val, size, filename) of memsave and pmemsave, already type-checked.
fn dump_args(call: &MonitorCall) -> (u64, i64, &str) {
    let int = |name| call.args.get(name).and_then(Value::as_i64).unwrap_or(0);
    // QEMU takes `val` as a 64-bit address: negative JSON numbers wrap.
    (
        int("val") as u64,
        int("size"),
        call.str_arg("filename").unwrap_or(""),
    )
}

/// The dump range of memsave / pmemsave as given.
pub(super) struct DumpRange<'a> {
    pub addr: u64,
    pub size: i64,
    pub filename: &'a str,
}

/// memsave for QMP and HMP: `cpu` indexes the vCPU whose page tables translate.
pub(super) fn dump_virtual(machine: &Machine, cpu: i64, range: &DumpRange) -> Result<(), QmpError> {
    let snapshots = machine.cpus().snapshots();
    let state = usize::try_from(cpu)
        .ok()
        .and_then(|i| snapshots.get(i))
        .ok_or_else(|| QmpError::generic("Parameter 'cpu-index' expects a CPU number"))?;
    let regs = state
        .paging
        .ok_or_else(|| QmpError::generic("Cannot read the CPU's paging registers"))?;
    save_virtual(
        machine.memory().guest_memory(),
        &regs,
        range.addr,
        range.size,
        range.filename,
    )
    .map_err(|e| QmpError::generic(e.to_string()))
}

/// pmemsave for QMP and HMP.
pub(super) fn dump_physical(machine: &Machine, range: &DumpRange) -> Result<(), QmpError> {
    save_physical(
        machine.memory().guest_memory(),
        range.addr,
        range.size,
        range.filename,
    )
    .map_err(|e| QmpError::generic(e.to_string()))
}

/// QMP memsave: virtual memory as the chosen (or the current) CPU sees it.
fn memsave(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let (addr, size, filename) = dump_args(ctx.call);
    let cpu = match ctx.call.args.get("cpu-index") {
        Some(v) => v.as_i64().unwrap_or(-1),
        None => i64::from(ctx.machine.current_cpu()),
    };
    dump_virtual(
        ctx.machine,
        cpu,
        &DumpRange {
            addr,
            size,
            filename,
        },
    )
    .map(|()| json!({}))
}

/// QMP pmemsave: guest-physical memory.
fn pmemsave(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let (addr, size, filename) = dump_args(ctx.call);
    dump_physical(
        ctx.machine,
        &DumpRange {
            addr,
            size,
            filename,
        },
    )
    .map(|()| json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn write64(mem: &GuestMemoryMmap, addr: u64, value: u64) {
        mem.write_obj(value, GuestAddress(addr)).unwrap();
    }

    fn long_mode(cr3: u64) -> PagingRegisters {
        PagingRegisters {
            cr0: CR0_PG | 1,
            cr3,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
        }
    }

    /// PML4 at 0x1000, PDPT at 0x2000, PD at 0x3000, PT at 0x4000:
    /// va 0x4000_0000_0000 + 0x20_5000 -> pa 0x10_0000 (4 KiB page), and
    /// va 0x4000_0000_0000 + 0x40_0000.. -> 2 MiB page at pa 0x20_0000.
    fn four_level(mem: &GuestMemoryMmap) -> u64 {
        let base = 0x4000_0000_0000u64;
        write64(mem, 0x1000 + ((base >> 39) & 511) * 8, 0x2003);
        write64(mem, 0x2000, 0x3003);
        write64(mem, 0x3000 + 8, 0x4003); // PD[1]: 0x20_0000..0x40_0000 -> PT
        write64(mem, 0x3000 + 16, 0x20_0083); // PD[2]: 2 MiB page
        write64(mem, 0x4000 + 5 * 8, 0x10_0003); // PT[5]
        base
    }

    #[test]
    fn walks_four_level_tables_with_4k_and_2m_pages() {
        let mem = memory();
        let base = four_level(&mem);
        let regs = long_mode(0x1000);
        assert_eq!(translate(&mem, &regs, base + 0x20_5123), Some(0x10_0123));
        assert_eq!(translate(&mem, &regs, base + 0x41_2345), Some(0x21_2345));
        assert_eq!(translate(&mem, &regs, base + 0x20_6000), None);
        assert_eq!(translate(&mem, &regs, 0), None);
        // Paging off: identity.
        let flat = PagingRegisters::default();
        assert_eq!(translate(&mem, &flat, 0x1234), Some(0x1234));
    }

    #[test]
    fn walks_legacy_32_bit_tables() {
        let mem = memory();
        mem.write_obj(0x5003u32, GuestAddress(0x1000 + 4)).unwrap(); // 0x40_0000 -> PT
        mem.write_obj(0x7003u32, GuestAddress(0x5000 + 2 * 4))
            .unwrap();
        mem.write_obj(0x0080_0083u32, GuestAddress(0x1000 + 8))
            .unwrap(); // 4 MiB page
        let regs = PagingRegisters {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PSE,
            efer: 0,
        };
        assert_eq!(translate(&mem, &regs, 0x40_2abc), Some(0x7abc));
        assert_eq!(translate(&mem, &regs, 0x80_1234), Some(0x80_1234));
        assert_eq!(translate(&mem, &regs, 0xc0_0000), None);
    }

    #[test]
    fn memsave_crosses_pages_and_leaves_nothing_on_error() {
        let mem = memory();
        let base = four_level(&mem);
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x10_0ffe))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("vmm-memsave-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("dump");
        let out_str = out.to_str().unwrap();
        let regs = long_mode(0x1000);
        save_virtual(&mem, &regs, base + 0x20_5ffe, 2, out_str).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), vec![1, 2]);
        std::fs::remove_file(&out).unwrap();

        // The next page is unmapped: an error in QEMU's words, and no file.
        let err = save_virtual(&mem, &regs, base + 0x20_5ffe, 4, out_str).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("Invalid addr 0x{:016x}/size 4 specified", base + 0x20_5ffe)
        );
        assert!(std::fs::read_dir(&dir).unwrap().next().is_none());

        save_physical(&mem, 0x10_0ffe, 4, out_str).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), vec![1, 2, 3, 4]);
        let err = save_physical(&mem, 0x3f_fff0, 0x20, out_str).unwrap_err();
        assert!(matches!(err, MemoryDumpError::InvalidRange { .. }));
        assert_eq!(std::fs::read(&out).unwrap(), vec![1, 2, 3, 4]);
        let err = save_physical(&mem, 0, -1, out_str).unwrap_err();
        assert!(matches!(err, MemoryDumpError::InvalidRange { .. }));
        let err = save_physical(&mem, 0, 1, "/nonexistent-dir/x").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Could not open '/nonexistent-dir/x': No such file or directory"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
