//! The guest physical address map of our PC machine, and the I/O ports and GSIs that are
//! fixed by it. Everything that places data or a device in the guest reads it from here.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BIOS data area (not given to the allocator)
//! 0x0000_0500  boot GDT, then boot IDT
//! 0x0000_7000  boot_params (the "zero page")
//! 0x0000_8ff0  boot stack top
//! 0x0000_9000  boot page tables: PML4, PDPT, 4 x PD (identity map of the first 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables, RSDP first (the BIOS area, scanned by Linux)
//! 0x0010_0000  RAM from here up to the 32-bit hole
//! 0xc000_0000  32-bit PCI MMIO window (BARs)
//! 0xe000_0000  PCI ECAM (MMCONFIG), 256 buses
//! 0xfeb0_0000  ACPI GED event register block
//! 0xfec0_0000  IOAPIC
//! 0xfed0_0000  HPET (emu only)
//! 0xfee0_0000  local APIC
//! 0x1_0000_0000 RAM above 4 GiB, then the 64-bit PCI MMIO window
//! ```

use vm_memory::GuestAddress;

/// Boot GDT: null, code64, data, tss (as Firecracker/Cloud Hypervisor lay it out).
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// Maximum number of GDT entries the boot GDT area can hold.
pub const BOOT_GDT_MAX: usize = 4;
/// Boot IDT (empty: the guest installs its own before enabling interrupts).
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);
/// Linux boot_params ("zero page").
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: GuestAddress = GuestAddress(0x8ff0);
/// Boot page tables: PML4, then PDPT, then four page directories of 2 MiB pages.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
/// How many GiB the boot page tables identity-map (one PD page per GiB).
pub const BOOT_IDENTITY_MAP_GIB: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Upper bound of the command-line area (the kernel's own limit may be lower).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Extended BIOS data area: the end of usable conventional memory.
pub const EBDA_START: GuestAddress = GuestAddress(0x9fc00);
/// ACPI tables live in the BIOS area, which Linux never uses as RAM.
pub const ACPI_START: GuestAddress = GuestAddress(0xe0000);
pub const ACPI_SIZE: u64 = 0x20000;
/// The RSDP sits at the start of the ACPI area (16-byte aligned, inside the scanned range).
pub const RSDP_POINTER: GuestAddress = ACPI_START;
/// Start of high memory: where a bzImage's protected-mode code is loaded.
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);

/// The 32-bit hole below 4 GiB that holds PCI and platform MMIO.
pub const MEM_32BIT_GAP_START: GuestAddress = GuestAddress(0xc000_0000);
pub const MEM_32BIT_GAP_SIZE: u64 = 0x4000_0000;
/// 32-bit PCI BAR window.
pub const PCI_MMIO32_START: GuestAddress = GuestAddress(0xc000_0000);
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCI Express enhanced configuration space (ECAM), segment 0, buses 0..=255.
pub const PCI_MMCONFIG_START: GuestAddress = GuestAddress(0xe000_0000);
pub const PCI_MMCONFIG_SIZE: u64 = 0x1000_0000;
pub const PCI_MMCONFIG_END_BUS: u8 = 255;
/// ACPI Generic Event Device: one 32-bit read-to-clear event register.
pub const GED_START: GuestAddress = GuestAddress(0xfeb0_0000);
pub const GED_SIZE: u64 = 0x1000;
/// IOAPIC MMIO (fixed by the PC platform).
pub const IOAPIC_START: GuestAddress = GuestAddress(0xfec0_0000);
pub const IOAPIC_SIZE: u64 = 0x1000;
/// HPET MMIO (only modelled under the emu accelerator).
pub const HPET_START: GuestAddress = GuestAddress(0xfed0_0000);
pub const HPET_SIZE: u64 = 0x1000;
/// Local APIC MMIO (fixed by the PC platform).
pub const APIC_START: GuestAddress = GuestAddress(0xfee0_0000);
pub const APIC_SIZE: u64 = 0x10_0000;

/// RAM above the 32-bit hole starts here.
pub const RAM_64BIT_START: GuestAddress = GuestAddress(0x1_0000_0000);
/// Size of the 64-bit PCI MMIO window placed after the end of RAM (1 GiB aligned).
pub const PCI_MMIO64_SIZE: u64 = 0x10_0000_0000;

/// Number of IOAPIC pins (and so of GSIs routed through it).
pub const IOAPIC_NUM_PINS: u32 = 24;

// Fixed I/O ports.
/// i8042 keyboard controller data and command/status ports.
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_CMD_PORT: u16 = 0x64;
/// CMOS RTC index and data ports.
pub const CMOS_PORT: u16 = 0x70;
/// COM1..COM4.
pub const SERIAL_PORTS: [u16; 4] = [0x3f8, 0x2f8, 0x3e8, 0x2e8];
/// PCI configuration mechanism #1 address and data ports.
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;
pub const PCI_CONFIG_DATA_PORT: u16 = 0xcfc;
/// Hardware-reduced ACPI sleep control/status and reset registers (one byte each).
pub const ACPI_PM_PORT: u16 = 0x600;
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
pub const ACPI_RESET_PORT: u16 = 0x602;
pub const ACPI_PM_PORT_LEN: u16 = 4;
/// ACPI PCI hot-plug registers (up, down, eject, removable, select; 32 bits each), at the
/// port QEMU's PIIX4 uses (see `devices::pci_hotplug`).
pub const PCI_HOTPLUG_PORT: u16 = 0xae00;
pub const PCI_HOTPLUG_PORT_LEN: u16 = 0x14;
/// Value the FADT tells the guest to write to the reset register.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The SLP_TYP value our DSDT gives for S5 (soft off).
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;

// Fixed GSIs (IOAPIC pins).
pub const SERIAL_GSIS: [u32; 4] = [4, 3, 4, 3];
pub const I8042_KBD_GSI: u32 = 1;
pub const I8042_AUX_GSI: u32 = 12;
pub const RTC_GSI: u32 = 8;
/// The GED interrupt (edge, active high).
pub const GED_GSI: u32 = 9;
/// PCI INTx lines are swizzled over GSIs 16..=23 (level, active low).
pub const PCI_INTX_GSI_BASE: u32 = 16;
pub const PCI_INTX_GSI_COUNT: u32 = 8;
