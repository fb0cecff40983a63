//! The Linux 64-bit boot protocol: e820 map, boot_params, identity page tables, the boot
//! GDT, and the register state a vCPU starts the kernel with. Accelerator-neutral: KVM
//! turns [`EntryState`] into sregs/regs, the emu CPU loads it directly.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::arch::layout;
use crate::memory::{GuestMemoryMmap, RamRange};

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// "HdrS": the setup header magic.
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// The boot_flag magic at 0x1fe.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// type_of_loader: "undefined" bootloader.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// loadflags: the protected-mode kernel is loaded at 0x100000.
const LOADED_HIGH: u8 = 0x1;
/// Default kernel alignment for kernels that carry no setup header (ELF).
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("the e820 map has {0} entries, more than boot_params can hold")]
    TooManyE820Entries(usize),
    #[error("failed to write {what} to guest memory at {addr:#x}: {source}")]
    GuestWrite {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("the kernel command line is {len} bytes, more than the {max} the kernel accepts")]
    CommandLineTooLong { len: usize, max: usize },
    #[error("the kernel command line contains a NUL byte")]
    CommandLineNul,
}

/// One e820 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The e820 map for our PC layout and the given RAM ranges.
pub fn e820_map(ram: &[RamRange]) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for r in ram {
        let start = r.guest_addr.raw_value();
        let end = start + r.size;
        if start < layout::HIMEM_START.0 {
            // Conventional memory up to the EBDA; the ISA hole above it is not RAM.
            let low_end = end.min(layout::EBDA_START.0);
            map.push(E820Entry {
                addr: start,
                size: low_end - start,
                kind: E820_RAM,
            });
            map.push(E820Entry {
                addr: layout::EBDA_START.0,
                size: 0xa0000 - layout::EBDA_START.0,
                kind: E820_RESERVED,
            });
            map.push(E820Entry {
                addr: layout::ACPI_START.0,
                size: layout::ACPI_SIZE,
                kind: E820_RESERVED,
            });
            if end > layout::HIMEM_START.0 {
                map.push(E820Entry {
                    addr: layout::HIMEM_START.0,
                    size: end - layout::HIMEM_START.0,
                    kind: E820_RAM,
                });
            }
        } else {
            map.push(E820Entry {
                addr: start,
                size: r.size,
                kind: E820_RAM,
            });
        }
    }
    // Linux only trusts MMCONFIG space that the firmware marks reserved.
    map.push(E820Entry {
        addr: layout::PCI_MMCONFIG_START.0,
        size: layout::PCI_MMCONFIG_SIZE,
        kind: E820_RESERVED,
    });
    map.sort_by_key(|e| e.addr);
    map
}

/// Where the initrd was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub addr: GuestAddress,
    pub size: u64,
}

/// Inputs for [`write_boot_params`].
pub struct BootParamsConfig<'a> {
    /// The kernel's own setup header (bzImage), or None for an ELF kernel.
    pub setup_header: Option<setup_header>,
    pub cmdline_addr: GuestAddress,
    pub cmdline_len: usize,
    pub initrd: Option<InitrdPlacement>,
    pub e820: &'a [E820Entry],
    pub rsdp_addr: Option<GuestAddress>,
}

/// Build the zero page.
pub fn build_boot_params(cfg: &BootParamsConfig<'_>) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = cfg.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = cfg.cmdline_addr.raw_value() as u32;
    params.hdr.cmdline_size = cfg.cmdline_len as u32;
    if let Some(initrd) = cfg.initrd {
        params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        params.ext_ramdisk_image = (initrd.addr.raw_value() >> 32) as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    if let Some(rsdp) = cfg.rsdp_addr {
        params.acpi_rsdp_addr = rsdp.raw_value();
    }
    if cfg.e820.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820Entries(cfg.e820.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(cfg.e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries = cfg.e820.len() as u8;
    Ok(params)
}

/// Write the zero page to its fixed address.
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    mem.write_obj(*params, layout::ZERO_PAGE_START)
        .map_err(|source| BootError::GuestWrite {
            what: "boot_params",
            addr: layout::ZERO_PAGE_START.0,
            source,
        })
}

/// Write the NUL-terminated command line; `max_len` is the kernel's limit (without NUL).
pub fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    max_len: usize,
) -> Result<usize, BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CommandLineNul);
    }
    let max = max_len.min(layout::CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max {
        return Err(BootError::CommandLineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, layout::CMDLINE_START)
        .map_err(|source| BootError::GuestWrite {
            what: "the kernel command line",
            addr: layout::CMDLINE_START.0,
            source,
        })?;
    Ok(cmdline.len())
}

/// A segment descriptor in unpacked form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    pub selector: u16,
    pub base: u64,
    pub limit: u32,
    /// Type field (4 bits).
    pub type_: u8,
    /// S: code/data (1) or system (0).
    pub s: bool,
    pub dpl: u8,
    pub present: bool,
    pub avl: bool,
    /// L: 64-bit code.
    pub l: bool,
    /// D/B: default operand size 32.
    pub db: bool,
    /// G: limit in 4 KiB units.
    pub g: bool,
}

impl Segment {
    /// Unpack a 64-bit GDT entry (the limit is expanded to bytes when G is set).
    pub fn from_gdt_entry(selector: u16, entry: u64) -> Self {
        let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
        let raw_limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
        let g = (entry >> 55) & 1 == 1;
        Segment {
            selector,
            base,
            limit: if g {
                (raw_limit << 12) | 0xfff
            } else {
                raw_limit
            },
            type_: ((entry >> 40) & 0xf) as u8,
            s: (entry >> 44) & 1 == 1,
            dpl: ((entry >> 45) & 3) as u8,
            present: (entry >> 47) & 1 == 1,
            avl: (entry >> 52) & 1 == 1,
            l: (entry >> 53) & 1 == 1,
            db: (entry >> 54) & 1 == 1,
            g,
        }
    }
}

/// Pack a GDT entry from flags (bits 8..16 of the high dword's upper part), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code (0x08), data (0x10), TSS (0x18).
pub const BOOT_GDT: [u64; layout::BOOT_GDT_MAX] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

pub const X86_CR0_PE: u64 = 1 << 0;
pub const X86_CR0_ET: u64 = 1 << 4;
pub const X86_CR0_NE: u64 = 1 << 5;
pub const X86_CR0_PG: u64 = 1 << 31;
pub const X86_CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

/// The architectural state a vCPU enters the guest with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryState {
    pub rip: u64,
    pub rsp: u64,
    pub rsi: u64,
    pub rflags: u64,
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt_base: u64,
    pub gdt_limit: u16,
    pub idt_base: u64,
    pub idt_limit: u16,
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// Write the boot GDT, an empty IDT and identity-mapping page tables for the first
/// [`layout::BOOT_IDENTITY_MAP_GIB`] GiB, and return the 64-bit entry state for `entry`.
pub fn setup_long_mode(
    mem: &GuestMemoryMmap,
    entry: GuestAddress,
) -> Result<EntryState, BootError> {
    let write = |what: &'static str, addr: GuestAddress, val: u64| {
        mem.write_obj(val, addr)
            .map_err(|source| BootError::GuestWrite {
                what,
                addr: addr.0,
                source,
            })
    };
    for (i, e) in BOOT_GDT.iter().enumerate() {
        write(
            "the boot GDT",
            layout::BOOT_GDT_START.unchecked_add(i as u64 * 8),
            *e,
        )?;
    }
    write("the boot IDT", layout::BOOT_IDT_START, 0)?;

    // PML4[0] -> PDPT; PDPT[i] -> PD i; each PD maps 1 GiB with 2 MiB pages.
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    write(
        "the boot PML4",
        layout::PML4_START,
        layout::PDPTE_START.0 | PRESENT_RW,
    )?;
    for gib in 0..layout::BOOT_IDENTITY_MAP_GIB {
        let pd = layout::PDE_START.unchecked_add(gib * 0x1000);
        write(
            "the boot PDPT",
            layout::PDPTE_START.unchecked_add(gib * 8),
            pd.0 | PRESENT_RW,
        )?;
        for i in 0..512u64 {
            let phys = (gib << 30) | (i << 21);
            write(
                "a boot page directory",
                pd.unchecked_add(i * 8),
                phys | PRESENT_RW | PAGE_SIZE_2M,
            )?;
        }
    }

    let code = Segment::from_gdt_entry(0x08, BOOT_GDT[1]);
    let data = Segment::from_gdt_entry(0x10, BOOT_GDT[2]);
    let tss = Segment::from_gdt_entry(0x18, BOOT_GDT[3]);
    Ok(EntryState {
        rip: entry.raw_value(),
        rsp: layout::BOOT_STACK_POINTER.0,
        rsi: layout::ZERO_PAGE_START.0,
        rflags: 0x2,
        cs: code,
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: tss,
        ldt: Segment {
            type_: 0x2,
            present: true,
            limit: 0xffff,
            ..Default::default()
        },
        gdt_base: layout::BOOT_GDT_START.0,
        gdt_limit: (std::mem::size_of_val(&BOOT_GDT) - 1) as u16,
        idt_base: layout::BOOT_IDT_START.0,
        idt_limit: 7,
        cr0: X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG,
        cr3: layout::PML4_START.0,
        cr4: X86_CR4_PAE,
        efer: EFER_LME | EFER_LMA,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::ram_ranges;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn e820_for_small_ram() {
        let map = e820_map(&ram_ranges(512 << 20));
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0xe0000,
                    size: 0x20000,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: (512 << 20) - 0x10_0000,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0xe000_0000,
                    size: 0x1000_0000,
                    kind: E820_RESERVED
                },
            ]
        );
    }

    #[test]
    fn e820_for_ram_above_4g() {
        let map = e820_map(&ram_ranges(6 << 30));
        let ram: Vec<_> = map.iter().filter(|e| e.kind == E820_RAM).collect();
        assert_eq!(ram.len(), 3);
        assert_eq!(ram[1].addr + ram[1].size, 0xc000_0000);
        assert_eq!(ram[2].addr, 1 << 32);
        assert_eq!(ram[2].size, 3 << 30);
        let total: u64 = ram.iter().map(|e| e.size).sum();
        assert_eq!(total, (6 << 30) - 0x10_0000 + 0x9fc00);
        // No two entries overlap.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{w:?}");
        }
    }

    #[test]
    fn boot_params_fields() {
        let e820 = e820_map(&ram_ranges(256 << 20));
        let mut hdr = setup_header {
            version: 0x020f,
            cmdline_size: 2047,
            ..Default::default()
        };
        hdr.header = KERNEL_HDR_MAGIC;
        let params = build_boot_params(&BootParamsConfig {
            setup_header: Some(hdr),
            cmdline_addr: layout::CMDLINE_START,
            cmdline_len: 12,
            initrd: Some(InitrdPlacement {
                addr: GuestAddress(0x0800_0000),
                size: 0x1234,
            }),
            e820: &e820,
            rsdp_addr: Some(layout::RSDP_POINTER),
        })
        .unwrap();
        let p = params;
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!(p.hdr.loadflags & LOADED_HIGH, LOADED_HIGH);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 12);
        assert_eq!({ p.hdr.ramdisk_image }, 0x0800_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries as usize, e820.len());
        let first = p.e820_table[0];
        assert_eq!(
            ({ first.addr }, { first.size }, { first.r#type }),
            (0, 0x9fc00, E820_RAM)
        );

        // The zero page lands at its fixed address with its magic at 0x202.
        let m = mem();
        write_boot_params(&m, &params).unwrap();
        let magic: u32 = m
            .read_obj(layout::ZERO_PAGE_START.unchecked_add(0x202))
            .unwrap();
        assert_eq!(magic, KERNEL_HDR_MAGIC);
        let rsdp: u64 = m
            .read_obj(layout::ZERO_PAGE_START.unchecked_add(0x70))
            .unwrap();
        assert_eq!(rsdp, 0xe0000);
        let entries: u8 = m
            .read_obj(layout::ZERO_PAGE_START.unchecked_add(0x1e8))
            .unwrap();
        assert_eq!(entries as usize, e820.len());
    }

    #[test]
    fn elf_kernels_get_a_default_header() {
        let p = build_boot_params(&BootParamsConfig {
            setup_header: None,
            cmdline_addr: layout::CMDLINE_START,
            cmdline_len: 0,
            initrd: None,
            e820: &[],
            rsdp_addr: None,
        })
        .unwrap();
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn too_many_e820_entries() {
        let many = vec![
            E820Entry {
                addr: 0,
                size: 1,
                kind: 1
            };
            200
        ];
        let r = build_boot_params(&BootParamsConfig {
            setup_header: None,
            cmdline_addr: layout::CMDLINE_START,
            cmdline_len: 0,
            initrd: None,
            e820: &many,
            rsdp_addr: None,
        });
        assert!(matches!(r, Err(BootError::TooManyE820Entries(200))));
    }

    #[test]
    fn cmdline_limits() {
        let m = mem();
        assert_eq!(write_cmdline(&m, "console=ttyS0", 2047).unwrap(), 13);
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, layout::CMDLINE_START).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        assert!(matches!(
            write_cmdline(&m, &"x".repeat(2048), 2047),
            Err(BootError::CommandLineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        assert!(write_cmdline(&m, "a\0b", 2047).is_err());
    }

    #[test]
    fn gdt_entries_round_trip() {
        let code = Segment::from_gdt_entry(0x8, BOOT_GDT[1]);
        assert!(code.l && code.present && code.s && code.g && !code.db);
        assert_eq!(code.type_, 0xb);
        assert_eq!(code.limit, 0xffff_ffff);
        let data = Segment::from_gdt_entry(0x10, BOOT_GDT[2]);
        assert!(data.db && !data.l);
        assert_eq!(data.type_, 0x3);
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn identity_map_covers_4g() {
        let m = mem();
        let st = setup_long_mode(&m, GuestAddress(0x100_0000)).unwrap();
        assert_eq!(st.rip, 0x100_0000);
        assert_eq!(st.rsi, layout::ZERO_PAGE_START.0);
        assert_eq!(st.cr3, layout::PML4_START.0);
        let pml4: u64 = m.read_obj(layout::PML4_START).unwrap();
        assert_eq!(pml4 & !0xfff, layout::PDPTE_START.0);
        // Walk 0xfee0_0000 (the local APIC) by hand.
        let va = 0xfee0_0000u64;
        let pdpte: u64 = m
            .read_obj(GuestAddress(layout::PDPTE_START.0 + ((va >> 30) & 511) * 8))
            .unwrap();
        let pde: u64 = m
            .read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8))
            .unwrap();
        assert_eq!(pde & 0x81, 0x81);
        assert_eq!(pde & !0x1f_ffff, va);
    }
}
