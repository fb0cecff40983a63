//! ACPI tables for our PC machine: RSDP, XSDT, FADT, MADT, MCFG and a DSDT written in AML.
//!
//! The machine is "hardware-reduced" ACPI (as Cloud Hypervisor's): no PM1 blocks, GPEs or SCI.
//! Power-off and reset go through the FADT's sleep control and reset registers
//! ([`crate::devices::acpi::AcpiPmDevice`]); the power button and PCI hot-plug
//! ([`crate::devices::pci_hotplug`]) are signalled through the Generic Event Device
//! ([`crate::devices::acpi::GedDevice`]).
//!
//! The tables are placed in the BIOS area at `layout::ACPI_START`, where Linux finds the RSDP
//! by scanning, so no boot protocol field is needed to point at it.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Arg, CreateDWordField, Device, EISAName, Else,
    Equal, Field, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt,
    Local, Memory32Fixed, Method, MethodCall, Name, NotEqual, Notify, OpRegion, OpRegionSpace, Or,
    Package, PackageBuilder, Path, ResourceTemplate, Return, Scope, Store, Uuid, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags as FadtFlags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

use crate::arch::layout;
use crate::devices::acpi::{GedEvent, GED_EVENT_REGISTER_LEN};
use crate::devices::pci_hotplug::{self, HOTPLUG_SLOTS};

/// Identity of our tables' author, in every table header.
const OEM_ID: [u8; 6] = *b"VMMRS ";
const OEM_TABLE_ID: [u8; 8] = *b"VMMRSPC ";
const OEM_REVISION: u32 = 1;
const CREATOR_ID: [u8; 4] = *b"VMMR";
const CREATOR_REVISION: u32 = 1;
/// FADT "Hypervisor Vendor Identity".
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"VMMRSHYP";

/// Most vCPUs the MADT can describe: xAPIC entries have 8-bit APIC ids and 0xff is the
/// broadcast id (and the "all processors" uid of the NMI entry).
pub const MAX_CPUS: u32 = 255;
/// Most serial ports the DSDT describes (device names COM1..COM9).
pub const MAX_SERIAL_PORTS: usize = 9;

// Addresses the 32-bit fields of the tables hold.
const _: () = assert!(layout::PCI_MMIO32_START.0 + layout::PCI_MMIO32_SIZE <= 1 << 32);
const _: () = assert!(layout::PCI_MMCONFIG_START.0 + layout::PCI_MMCONFIG_SIZE <= 1 << 32);
const _: () = assert!(layout::GED_START.0 + layout::GED_SIZE <= 1 << 32);
const _: () = assert!(layout::APIC_START.0 < 1 << 32);
const _: () = assert!(layout::IOAPIC_START.0 < 1 << 32);
const _: () = assert!(layout::ACPI_START.0 + layout::ACPI_SIZE <= 1 << 32);

/// What the tables describe. Plain data, filled in by the machine builder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; APIC id and ACPI processor uid are both the vCPU index.
    pub num_cpus: u32,
    /// Serial ports as (base I/O port, GSI), described as COM1, COM2, ... in this order.
    pub serial_ports: Vec<(u16, u32)>,
    /// The 64-bit PCI MMIO window as (start, size); a size of 0 leaves it out.
    pub pci_mmio64: (u64, u64),
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("cannot describe {count} vCPUs: between 1 and {MAX_CPUS} are supported")]
    InvalidCpuCount { count: u32 },
    #[error("cannot describe {count} serial ports: at most {MAX_SERIAL_PORTS} are supported")]
    TooManySerialPorts { count: usize },
    #[error("serial port at {port:#x} does not leave room for its 8 registers")]
    InvalidSerialPort { port: u16 },
    #[error("serial port at {port:#x} uses GSI {gsi}, beyond the IOAPIC's pins")]
    InvalidSerialGsi { port: u16, gsi: u32 },
    #[error("the 64-bit PCI MMIO window {start:#x}+{size:#x} wraps around")]
    InvalidPciMmio64Window { start: u64, size: u64 },
    #[error("the ACPI tables need {needed:#x} bytes but the ACPI area holds {available:#x}")]
    TablesTooLarge { needed: u64, available: u64 },
    #[error("failed to write the {table} table to guest memory at {address:#x}: {source}")]
    WriteGuestMemory {
        table: &'static str,
        address: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// One table's bytes and the guest address they were built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedTable {
    /// "RSDP" or the table's four-character signature.
    pub name: &'static str,
    pub address: GuestAddress,
    pub bytes: Vec<u8>,
}

/// All the tables, with every pointer between them resolved for their addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    pub rsdp: PlacedTable,
    pub xsdt: PlacedTable,
    pub fadt: PlacedTable,
    pub madt: PlacedTable,
    pub mcfg: PlacedTable,
    pub dsdt: PlacedTable,
}

impl AcpiTables {
    /// The tables in address order, RSDP first.
    pub fn iter(&self) -> impl Iterator<Item = &PlacedTable> {
        [
            &self.rsdp, &self.xsdt, &self.fadt, &self.madt, &self.mcfg, &self.dsdt,
        ]
        .into_iter()
    }
}

/// Build every table for placement at `layout::ACPI_START`.
pub fn build_tables(config: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    validate(config)?;

    // Everything but the XSDT and FADT is independent of where the tables go, and those two
    // have fixed sizes, so the layout can be computed before they are built.
    let dsdt = build_dsdt(config);
    let madt = build_madt(config.num_cpus);
    let mcfg = build_mcfg();
    let rsdp_len = Rsdp::len() as u64;
    let xsdt_len = (TABLE_HEADER_LEN + 3 * 8) as u64;
    let fadt_len = FADT_LEN as u64;

    let mut next = layout::RSDP_POINTER.0;
    let mut place = |len: u64| {
        let address = align8(next);
        next = address + len;
        GuestAddress(address)
    };
    let rsdp_addr = place(rsdp_len);
    let xsdt_addr = place(xsdt_len);
    let fadt_addr = place(fadt_len);
    let madt_addr = place(madt.len() as u64);
    let mcfg_addr = place(mcfg.len() as u64);
    let dsdt_addr = place(dsdt.len() as u64);
    let needed = next - layout::ACPI_START.0;
    if needed > layout::ACPI_SIZE {
        return Err(AcpiError::TablesTooLarge {
            needed,
            available: layout::ACPI_SIZE,
        });
    }

    let fadt = build_fadt(dsdt_addr);
    let xsdt = build_xsdt(&[fadt_addr, madt_addr, mcfg_addr]);
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr.0).to_aml_bytes(&mut rsdp);
    debug_assert_eq!(xsdt.len() as u64, xsdt_len);
    debug_assert_eq!(fadt.len() as u64, fadt_len);

    let placed = |name, address, bytes| PlacedTable {
        name,
        address,
        bytes,
    };
    Ok(AcpiTables {
        rsdp: placed("RSDP", rsdp_addr, rsdp),
        xsdt: placed("XSDT", xsdt_addr, xsdt),
        fadt: placed("FACP", fadt_addr, fadt),
        madt: placed("APIC", madt_addr, madt),
        mcfg: placed("MCFG", mcfg_addr, mcfg),
        dsdt: placed("DSDT", dsdt_addr, dsdt),
    })
}

/// Build the tables and write them into guest memory. Returns the RSDP's address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    config: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    let tables = build_tables(config)?;
    for table in tables.iter() {
        mem.write_slice(&table.bytes, table.address)
            .map_err(|source| AcpiError::WriteGuestMemory {
                table: table.name,
                address: table.address.0,
                source,
            })?;
    }
    Ok(tables.rsdp.address)
}

fn validate(config: &AcpiConfig) -> Result<(), AcpiError> {
    if config.num_cpus == 0 || config.num_cpus > MAX_CPUS {
        return Err(AcpiError::InvalidCpuCount {
            count: config.num_cpus,
        });
    }
    if config.serial_ports.len() > MAX_SERIAL_PORTS {
        return Err(AcpiError::TooManySerialPorts {
            count: config.serial_ports.len(),
        });
    }
    for &(port, gsi) in &config.serial_ports {
        if port.checked_add(SERIAL_PORT_LEN - 1).is_none() {
            return Err(AcpiError::InvalidSerialPort { port });
        }
        if gsi >= layout::IOAPIC_NUM_PINS {
            return Err(AcpiError::InvalidSerialGsi { port, gsi });
        }
    }
    let (start, size) = config.pci_mmio64;
    if size != 0 && start.checked_add(size - 1).is_none() {
        return Err(AcpiError::InvalidPciMmio64Window { start, size });
    }
    Ok(())
}

fn align8(value: u64) -> u64 {
    value.next_multiple_of(8)
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

const TABLE_HEADER_LEN: usize = 36;
const HEADER_LENGTH_OFFSET: usize = 4;
const HEADER_CHECKSUM_OFFSET: usize = 9;

/// A system description table being built: the standard header with our identity, then the
/// body appended piece by piece; [`Table::finish`] fixes up the length and checksum.
struct Table {
    bytes: Vec<u8>,
}

impl Table {
    fn new(signature: [u8; 4], revision: u8) -> Self {
        let mut bytes = Vec::with_capacity(TABLE_HEADER_LEN);
        bytes.extend_from_slice(&signature);
        bytes.extend_from_slice(&0u32.to_le_bytes()); // length, set by finish()
        bytes.push(revision);
        bytes.push(0); // checksum, set by finish()
        bytes.extend_from_slice(&OEM_ID);
        bytes.extend_from_slice(&OEM_TABLE_ID);
        bytes.extend_from_slice(&OEM_REVISION.to_le_bytes());
        bytes.extend_from_slice(&CREATOR_ID);
        bytes.extend_from_slice(&CREATOR_REVISION.to_le_bytes());
        debug_assert_eq!(bytes.len(), TABLE_HEADER_LEN);
        Self { bytes }
    }

    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
    }

    fn finish(mut self) -> Vec<u8> {
        // Every table is far below 4 GiB: they must fit the ACPI area, checked by the caller.
        let len = self.bytes.len() as u32;
        self.bytes[HEADER_LENGTH_OFFSET..HEADER_LENGTH_OFFSET + 4]
            .copy_from_slice(&len.to_le_bytes());
        self.bytes[HEADER_CHECKSUM_OFFSET] = checksum(&self.bytes);
        self.bytes
    }
}

impl AmlSink for Table {
    fn byte(&mut self, byte: u8) {
        self.bytes.push(byte);
    }

    fn vec(&mut self, v: &[u8]) {
        self.bytes.extend_from_slice(v);
    }
}

fn build_xsdt(entries: &[GuestAddress]) -> Vec<u8> {
    let mut table = Table::new(*b"XSDT", 1);
    for entry in entries {
        table.push(&entry.0.to_le_bytes());
    }
    table.finish()
}

/// Size of the ACPI 6.x FADT (revision 6).
const FADT_LEN: usize = 276;

/// IA-PC boot architecture flags (FADT offset 109).
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

fn io_register_u8(port: u16) -> GAS {
    GAS::new(
        GasSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn build_fadt(dsdt: GuestAddress) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        // HW_REDUCED_ACPI: no PM1/GPE blocks and no SCI; PWR_BUTTON: the power button is a
        // control-method device (PNP0C0C, notified by the GED), not a fixed feature.
        .flag(FadtFlags::HwReducedAcpi)
        .flag(FadtFlags::PwrButton)
        .flag(FadtFlags::ResetRegSup);
    fadt.creator_id = CREATOR_ID;
    fadt.creator_revision = CREATOR_REVISION.to_le_bytes();
    // The tables live below 1 MiB, so the 32-bit DSDT field can hold the same address
    // (layout asserts at the top of this file).
    fadt.dsdt = (dsdt.0 as u32).into();
    fadt.x_dsdt = dsdt.0.into();
    // The ISA devices (COM, RTC) exist and the i8042 must be probed; there is no VGA.
    fadt.iapc_boot_arch =
        (BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042 | BOOT_ARCH_VGA_NOT_PRESENT).into();
    fadt.reset_reg = io_register_u8(layout::ACPI_RESET_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_register_u8(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register_u8(layout::ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    let mut bytes = Vec::with_capacity(FADT_LEN);
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// MADT flag: the machine also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
// MADT interrupt controller structure types.
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
const MADT_LOCAL_APIC_ENABLED: u32 = 1;
/// MPS INTI flags: polarity and trigger mode both "conforms to the bus" (ISA: edge, high).
const MPS_INTI_CONFORMS: u16 = 0;
/// The ACPI processor uid meaning "all processors" in a Local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;

fn build_madt(num_cpus: u32) -> Vec<u8> {
    let mut table = Table::new(*b"APIC", 5);
    table.push(&(layout::APIC_START.0 as u32).to_le_bytes());
    table.push(&MADT_PCAT_COMPAT.to_le_bytes());
    // validate() keeps num_cpus within MAX_CPUS, so every index fits the 8-bit fields.
    for cpu in 0..num_cpus.min(MAX_CPUS) as u8 {
        // type, length, ACPI processor uid, APIC id, flags
        table.push(&[MADT_LOCAL_APIC, 8, cpu, cpu]);
        table.push(&MADT_LOCAL_APIC_ENABLED.to_le_bytes());
    }
    // type, length, I/O APIC id, reserved, address, GSI base
    table.push(&[MADT_IO_APIC, 12, 0, 0]);
    table.push(&(layout::IOAPIC_START.0 as u32).to_le_bytes());
    table.push(&0u32.to_le_bytes());
    // The PIT's ISA IRQ 0 is wired to IOAPIC pin 2, as on every PC.
    // type, length, bus (ISA), source IRQ, GSI, flags
    table.push(&[MADT_INTERRUPT_SOURCE_OVERRIDE, 10, 0, 0]);
    table.push(&2u32.to_le_bytes());
    table.push(&MPS_INTI_CONFORMS.to_le_bytes());
    // NMIs arrive on LINT1 of every local APIC.
    // type, length, ACPI processor uid, flags, LINT#
    table.push(&[MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS]);
    table.push(&MPS_INTI_CONFORMS.to_le_bytes());
    table.push(&[1]);
    table.finish()
}

fn build_mcfg() -> Vec<u8> {
    let mut table = Table::new(*b"MCFG", 1);
    table.push(&[0; 8]); // reserved
                         // base address, PCI segment group, start bus, end bus, reserved
    table.push(&layout::PCI_MMCONFIG_START.0.to_le_bytes());
    table.push(&0u16.to_le_bytes());
    table.push(&[0, layout::PCI_MMCONFIG_END_BUS]);
    table.push(&[0; 4]);
    table.finish()
}

/// AML bytes that were generated elsewhere, to splice into an object's children.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn aml_bytes(object: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    object.to_aml_bytes(&mut bytes);
    bytes
}

/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;

fn build_dsdt(config: &AcpiConfig) -> Vec<u8> {
    let mut system_bus = Vec::new();
    system_bus.extend(pci_host_bridge_aml(config.pci_mmio64));
    system_bus.extend(motherboard_resources_aml());
    for (index, &(port, gsi)) in config.serial_ports.iter().enumerate() {
        system_bus.extend(serial_port_aml(index, port, gsi));
    }
    system_bus.extend(i8042_aml());
    system_bus.extend(rtc_aml());
    system_bus.extend(power_button_aml());
    system_bus.extend(ged_aml());
    for cpu in 0..config.num_cpus {
        system_bus.extend(processor_aml(cpu));
    }

    let mut table = Table::new(*b"DSDT", DSDT_REVISION);
    table.push(&Scope::raw(Path::new("\\_SB_"), system_bus));
    // \_S5_: SLP_TYP for soft-off. Element 1 (SLP_TYPb) is unused in a hardware-reduced machine.
    Name::new(
        Path::new("_S5_"),
        &Package::new(vec![
            &layout::ACPI_S5_SLEEP_TYPE,
            &aml::ZERO,
            &aml::ZERO,
            &aml::ZERO,
        ]),
    )
    .to_aml_bytes(&mut table);
    table.finish()
}

/// UUID of the PCI host bridge `_OSC` (PCI Firmware Specification 3.x, section 4.5).
const PCI_HOST_BRIDGE_OSC_UUID: &str = "33DB4D5B-1FF7-401C-9657-7441C03DD766";
// _OSC status bits in the first capabilities dword.
const OSC_UNRECOGNIZED_UUID: u8 = 1 << 2;
const OSC_UNRECOGNIZED_REVISION: u8 = 1 << 3;
const OSC_CAPABILITIES_MASKED: u8 = 1 << 4;
// PCI Express control bits in the third capabilities dword that we hand to the OS.
const OSC_CONTROL_SHPC_HOTPLUG: u8 = 1 << 1;
const OSC_CONTROL_PME: u8 = 1 << 2;
const OSC_CONTROL_AER: u8 = 1 << 3;
const OSC_CONTROL_PCIE_CAPABILITY: u8 = 1 << 4;
/// Control we grant. Native PCIe hot-plug (bit 0) stays with the firmware: slots on the root
/// bus will be hot-plugged through ACPI (GED + `_EJ0`), and LTR and later features are not
/// modelled.
const OSC_GRANTED_CONTROL: u8 =
    OSC_CONTROL_SHPC_HOTPLUG | OSC_CONTROL_PME | OSC_CONTROL_AER | OSC_CONTROL_PCIE_CAPABILITY;

/// `_OSC` of the host bridge: grant the PCIe features in [`OSC_GRANTED_CONTROL`] and report
/// the rest as masked, per the PCI Firmware Specification.
fn pci_osc_method_aml() -> Vec<u8> {
    let cdw1 = Path::new("CDW1");
    let cdw3 = Path::new("CDW3");
    let create_cdw1 = CreateDWordField::new(&cdw1, &Arg(3), &0u8);
    let create_cdw3 = CreateDWordField::new(&cdw3, &Arg(3), &8u8);
    // Local0 = CDW3 & granted
    let granted = aml::And::new(&Local(0), &cdw3, &OSC_GRANTED_CONTROL);
    // If (Arg1 != 1) { CDW1 |= unrecognized revision }
    let bad_revision = NotEqual::new(&Arg(1), &aml::ONE);
    let set_bad_revision = Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_REVISION);
    let check_revision = If::new(&bad_revision, vec![&set_bad_revision]);
    // If (CDW3 != Local0) { CDW1 |= capabilities masked }
    let masked = NotEqual::new(&cdw3, &Local(0));
    let set_masked = Or::new(&cdw1, &cdw1, &OSC_CAPABILITIES_MASKED);
    let check_masked = If::new(&masked, vec![&set_masked]);
    let store_granted = Store::new(&cdw3, &Local(0));
    let uuid = Uuid::new(PCI_HOST_BRIDGE_OSC_UUID);
    let is_pci_uuid = Equal::new(&Arg(0), &uuid);
    let pci_uuid = If::new(
        &is_pci_uuid,
        vec![
            &create_cdw3,
            &granted,
            &check_revision,
            &check_masked,
            &store_granted,
        ],
    );
    let set_bad_uuid = Or::new(&cdw1, &cdw1, &OSC_UNRECOGNIZED_UUID);
    let other_uuid = Else::new(vec![&set_bad_uuid]);
    let return_buffer = Return::new(&Arg(3));
    // Serialized: the method creates named buffer fields.
    aml_bytes(&Method::new(
        Path::new("_OSC"),
        4,
        true,
        vec![&create_cdw1, &pci_uuid, &other_uuid, &return_buffer],
    ))
}

/// `_PRT` entries: every slot's INTA..INTD, swizzled over the PCI INTx GSIs. Entries name the
/// GSI directly (source 0), which makes them level-triggered, active low.
fn pci_routing_table_aml() -> Vec<u8> {
    const PCI_SLOTS: u32 = 32;
    const PCI_PINS: u8 = 4;
    let mut table = PackageBuilder::new();
    for slot in 0..PCI_SLOTS {
        // _ADR form: device in the high word, 0xffff = any function.
        let address = (slot << 16) | 0xffff;
        for pin in 0..PCI_PINS {
            let gsi =
                layout::PCI_INTX_GSI_BASE + (slot + u32::from(pin)) % layout::PCI_INTX_GSI_COUNT;
            table.add_element(&Package::new(vec![&address, &pin, &aml::ZERO, &gsi]));
        }
    }
    aml_bytes(&Name::new(Path::new("_PRT"), &table))
}

/// Notify values for the hot-plug slots (ACPI 6.x, 5.6.6 "Device Object Notifications").
const NOTIFY_DEVICE_CHECK: u8 = 1;
const NOTIFY_EJECT_REQUEST: u8 = 3;

/// The slot numbers that [`HOTPLUG_SLOTS`] marks.
fn hotplug_slots() -> impl Iterator<Item = u8> {
    (0..32u8).filter(|slot| HOTPLUG_SLOTS & (1 << slot) != 0)
}

/// Name of the object of hot-plug slot `slot` in PCI0 (QEMU's: S01 .. S1F).
fn slot_name(slot: u8) -> String {
    format!("S{slot:02X}_")
}

/// The PCI hot-plug objects of `\_SB.PCI0`, in the manner of QEMU's PIIX4 DSDT:
/// - `PCST`, an I/O region over the hot-plug registers, with the fields PCIU (plugged slots),
///   PCID (slots asked to unplug) and B0EJ (write: eject slots);
/// - for each slot in `slots` a `Device(Sxx)` with `_ADR` (slot << 16, every function),
///   `_SUN` (the slot number, the name of Linux's /sys/bus/pci/slots/N) and `_EJ0`, which
///   writes the slot's bit to B0EJ;
/// - `DVNT(bitmap, value)`, which notifies each slot whose bit is set with `value`;
/// - `PCNT`, called by the GED's `_EVT`: device check (1) for the slots in PCIU and eject
///   request (3) for those in PCID. Both registers clear when read, so each is read once.
fn pci_hotplug_slots_aml(slots: &[u8]) -> Vec<u8> {
    let region = OpRegion::new(
        Path::new("PCST"),
        OpRegionSpace::SystemIO,
        &layout::PCI_HOTPLUG_PORT,
        &layout::PCI_HOTPLUG_PORT_LEN,
    );
    const _: () = assert!(pci_hotplug::PCIU_OFFSET == 0);
    const _: () = assert!(pci_hotplug::PCID_OFFSET == 4);
    const _: () = assert!(pci_hotplug::B0EJ_OFFSET == 8);
    let field = Field::new(
        Path::new("PCST"),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
            FieldEntry::Named(*b"B0EJ", 32),
        ],
    );
    let mut bytes = aml_bytes(&region);
    bytes.extend(aml_bytes(&field));

    let eject_register = Path::new("B0EJ");
    for &slot in slots {
        let address = u32::from(slot) << 16;
        let bit = 1u32 << slot;
        let adr = Name::new(Path::new("_ADR"), &address);
        let sun = Name::new(Path::new("_SUN"), &slot);
        let eject = Store::new(&eject_register, &bit);
        let ej0 = Method::new(Path::new("_EJ0"), 1, false, vec![&eject]);
        bytes.extend(aml_bytes(&Device::new(
            Path::new(&slot_name(slot)),
            vec![&adr, &sun, &ej0],
        )));
    }

    let slot_paths: Vec<(u32, Path)> = slots
        .iter()
        .map(|&slot| (1u32 << slot, Path::new(&slot_name(slot))))
        .collect();
    let notifies: Vec<Notify> = slot_paths
        .iter()
        .map(|(_, path)| Notify::new(path, &Arg(1)))
        .collect();
    let tests: Vec<aml::And> = slot_paths
        .iter()
        .map(|(bit, _)| aml::And::new(&aml::ZERO, &Arg(0), bit))
        .collect();
    let branches: Vec<If> = tests
        .iter()
        .zip(&notifies)
        .map(|(test, notify)| If::new(test, vec![notify]))
        .collect();
    let branch_refs: Vec<&dyn Aml> = branches.iter().map(|b| b as &dyn Aml).collect();
    bytes.extend(aml_bytes(&Method::new(
        Path::new("DVNT"),
        2,
        false,
        branch_refs,
    )));

    let plugged = Path::new("PCIU");
    let unplugging = Path::new("PCID");
    let notify_plugged = MethodCall::new(Path::new("DVNT"), vec![&plugged, &NOTIFY_DEVICE_CHECK]);
    let notify_unplugging =
        MethodCall::new(Path::new("DVNT"), vec![&unplugging, &NOTIFY_EJECT_REQUEST]);
    bytes.extend(aml_bytes(&Method::new(
        Path::new("PCNT"),
        0,
        true,
        vec![&notify_plugged, &notify_unplugging],
    )));
    bytes
}

/// `\_SB.PCI0`: the PCIe host bridge with its bus, I/O and memory windows and INTx routing.
/// It has a `_HID` and so no `_ADR`: the spec allows only one of the two (iasl warns otherwise).
fn pci_host_bridge_aml(mmio64: (u64, u64)) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0A08"));
    let cid = Name::new(Path::new("_CID"), &EISAName::new("PNP0A03"));
    let seg = Name::new(Path::new("_SEG"), &aml::ZERO);
    let uid = Name::new(Path::new("_UID"), &aml::ZERO);
    let bbn = Name::new(Path::new("_BBN"), &aml::ZERO);

    let bus_numbers =
        AddressSpace::<u16>::new_bus_number(0, u16::from(layout::PCI_MMCONFIG_END_BUS));
    // The configuration mechanism #1 ports belong to the bridge itself.
    let config_ports = IO::new(
        layout::PCI_CONFIG_ADDRESS_PORT,
        layout::PCI_CONFIG_ADDRESS_PORT,
        1,
        8,
    );
    let io_below_config = AddressSpace::<u16>::new_io(0, layout::PCI_CONFIG_ADDRESS_PORT - 1, None);
    let io_above_config = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio32_start = layout::PCI_MMIO32_START.0 as u32;
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio32_start,
        mmio32_start + (layout::PCI_MMIO32_SIZE as u32 - 1),
        None,
    );
    let (mmio64_start, mmio64_size) = mmio64;
    // validate() checked that a non-empty window does not wrap.
    let mmio64 = (mmio64_size != 0).then(|| {
        AddressSpace::<u64>::new_memory(
            AddressSpaceCacheable::Cacheable,
            true,
            mmio64_start,
            mmio64_start + (mmio64_size - 1),
            None,
        )
    });
    let mut resources: Vec<&dyn Aml> = vec![
        &bus_numbers,
        &config_ports,
        &io_below_config,
        &io_above_config,
        &mmio32,
    ];
    if let Some(mmio64) = &mmio64 {
        resources.push(mmio64);
    }
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(resources));

    let osc = RawAml(pci_osc_method_aml());
    let prt = RawAml(pci_routing_table_aml());
    let slots: Vec<u8> = hotplug_slots().collect();
    let hotplug_slots = RawAml(pci_hotplug_slots_aml(&slots));
    aml_bytes(&Device::new(
        Path::new("PCI0"),
        vec![
            &hid,
            &cid,
            &seg,
            &uid,
            &bbn,
            &crs,
            &osc,
            &prt,
            &hotplug_slots,
        ],
    ))
}

/// `\_SB.MBRD`: motherboard resources. Linux only uses the MCFG's ECAM area if it is reserved
/// here (or in the e820 map), and reserving the PM and PCI hot-plug ports keeps PCI I/O BARs
/// off them.
fn motherboard_resources_aml() -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0C02"));
    let uid = Name::new(Path::new("_UID"), &aml::ZERO);
    let ecam = Memory32Fixed::new(
        true,
        layout::PCI_MMCONFIG_START.0 as u32,
        layout::PCI_MMCONFIG_SIZE as u32,
    );
    let pm_ports = IO::new(
        layout::ACPI_PM_PORT,
        layout::ACPI_PM_PORT,
        1,
        layout::ACPI_PM_PORT_LEN as u8,
    );
    let hotplug_ports = IO::new(
        layout::PCI_HOTPLUG_PORT,
        layout::PCI_HOTPLUG_PORT,
        1,
        layout::PCI_HOTPLUG_PORT_LEN as u8,
    );
    let crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![&ecam, &pm_ports, &hotplug_ports]),
    );
    aml_bytes(&Device::new(Path::new("MBRD"), vec![&hid, &uid, &crs]))
}

/// Number of I/O ports of a 16550 UART.
const SERIAL_PORT_LEN: u16 = 8;

/// Edge-triggered, active-high, exclusive interrupt: an ISA device line.
fn isa_interrupt(gsi: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, gsi)
}

/// `\_SB.COMn`: a 16550 UART. `index` is below MAX_SERIAL_PORTS (checked by validate()).
fn serial_port_aml(index: usize, port: u16, gsi: u32) -> Vec<u8> {
    let number = index + 1;
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
    let uid = Name::new(Path::new("_UID"), &number);
    let io = IO::new(port, port, 1, SERIAL_PORT_LEN as u8);
    let irq = isa_interrupt(gsi);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&io, &irq]));
    let name = format!("COM{number}");
    aml_bytes(&Device::new(Path::new(&name), vec![&hid, &uid, &crs]))
}

/// `\_SB.KBD_` and `\_SB.MOU_`: the i8042's keyboard and auxiliary (mouse) ports, which
/// Linux's i8042 driver discovers through PNP.
fn i8042_aml() -> Vec<u8> {
    let kbd_hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0303"));
    let data_port = IO::new(layout::I8042_DATA_PORT, layout::I8042_DATA_PORT, 1, 1);
    let command_port = IO::new(layout::I8042_CMD_PORT, layout::I8042_CMD_PORT, 1, 1);
    let kbd_irq = isa_interrupt(layout::I8042_KBD_GSI);
    let kbd_crs = Name::new(
        Path::new("_CRS"),
        &ResourceTemplate::new(vec![&data_port, &command_port, &kbd_irq]),
    );
    let mut bytes = aml_bytes(&Device::new(Path::new("KBD_"), vec![&kbd_hid, &kbd_crs]));

    let mou_hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0F13"));
    let mou_irq = isa_interrupt(layout::I8042_AUX_GSI);
    let mou_crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&mou_irq]));
    bytes.extend(aml_bytes(&Device::new(
        Path::new("MOU_"),
        vec![&mou_hid, &mou_crs],
    )));
    bytes
}

/// `\_SB.RTC_`: the CMOS real-time clock.
fn rtc_aml() -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0B00"));
    let io = IO::new(layout::CMOS_PORT, layout::CMOS_PORT, 1, 2);
    let irq = isa_interrupt(layout::RTC_GSI);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&io, &irq]));
    aml_bytes(&Device::new(Path::new("RTC_"), vec![&hid, &crs]))
}

/// `\_SB.PWRB`: the control-method power button that the GED notifies.
fn power_button_aml() -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0C0C"));
    let uid = Name::new(Path::new("_UID"), &aml::ZERO);
    aml_bytes(&Device::new(Path::new("PWRB"), vec![&hid, &uid]))
}

/// Notify value asking the OS to handle a button press (ACPI 6.x, 5.6.6 "Device Object
/// Notifications").
const NOTIFY_BUTTON_PRESSED: u8 = 0x80;

/// `\_SB.GED_`: the Generic Event Device. Its interrupt runs `_EVT`, which reads (and so
/// clears) the event register once and dispatches on its bits:
/// - bit 0: power button, notify `\_SB.PWRB`;
/// - bit 1: PCI hot-plug, call `\_SB.PCI0.PCNT` to notify the slots.
fn ged_aml() -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &"ACPI0013");
    let uid = Name::new(Path::new("_UID"), &aml::ZERO);
    let ged_start = layout::GED_START.0 as u32;
    // Only the interrupt: Linux's acpi-ged driver takes every _CRS entry as one and
    // gives up on the device ("unable to parse IRQ resource") at anything else. The
    // register block is reached through the OperationRegion below.
    let irq = isa_interrupt(layout::GED_GSI);
    let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&irq]));
    let region = OpRegion::new(
        Path::new("GDST"),
        OpRegionSpace::SystemMemory,
        &ged_start,
        &GED_EVENT_REGISTER_LEN,
    );
    let field = Field::new(
        Path::new("GDST"),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"GDAT", 32)],
    );

    let event_register = Path::new("GDAT");
    let read_events = Store::new(&Local(0), &event_register);
    let power_button_bit = GedEvent::PowerButton.bit();
    let power_button_pressed = aml::And::new(&aml::ZERO, &Local(0), &power_button_bit);
    let power_button = Path::new("\\_SB_.PWRB");
    let notify_power_button = Notify::new(&power_button, &NOTIFY_BUTTON_PRESSED);
    let on_power_button = If::new(&power_button_pressed, vec![&notify_power_button]);
    let pci_hotplug_bit = GedEvent::PciHotplug.bit();
    let pci_hotplug_changed = aml::And::new(&aml::ZERO, &Local(0), &pci_hotplug_bit);
    let pci_notify = MethodCall::new(Path::new("\\_SB_.PCI0.PCNT"), vec![]);
    let on_pci_hotplug = If::new(&pci_hotplug_changed, vec![&pci_notify]);
    let evt = Method::new(
        Path::new("_EVT"),
        1,
        true,
        vec![&read_events, &on_power_button, &on_pci_hotplug],
    );
    aml_bytes(&Device::new(
        Path::new("GED_"),
        vec![&hid, &uid, &crs, &region, &field, &evt],
    ))
}

/// `\_SB.Cxxx`: a processor device (ACPI0007) whose `_UID` matches the MADT processor uid,
/// so Linux's ACPI processor driver binds to each vCPU.
fn processor_aml(cpu: u32) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &"ACPI0007");
    let uid = Name::new(Path::new("_UID"), &cpu);
    let name = format!("C{cpu:03X}");
    aml_bytes(&Device::new(Path::new(&name), vec![&hid, &uid]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path as FsPath;
    use std::process::Command;
    use vm_memory::GuestMemoryBackend;
    use vmm_sys_util::tempdir::TempDir;

    fn config(num_cpus: u32) -> AcpiConfig {
        AcpiConfig {
            num_cpus,
            serial_ports: vec![
                (layout::SERIAL_PORTS[0], layout::SERIAL_GSIS[0]),
                (layout::SERIAL_PORTS[1], layout::SERIAL_GSIS[1]),
            ],
            pci_mmio64: (0x1_4000_0000, layout::PCI_MMIO64_SIZE),
        }
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
    }

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// (type, bytes) of each MADT interrupt controller structure.
    fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut entries = Vec::new();
        let mut offset = TABLE_HEADER_LEN + 8;
        while offset < madt.len() {
            let len = madt[offset + 1] as usize;
            assert!(len >= 2, "bad MADT entry length at {offset}");
            entries.push((madt[offset], madt[offset..offset + len].to_vec()));
            offset += len;
        }
        assert_eq!(offset, madt.len());
        entries
    }

    #[test]
    fn checksums_and_lengths() {
        let tables = build_tables(&config(4)).unwrap();
        let rsdp = &tables.rsdp.bytes;
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(rsdp.len(), 36);
        assert_eq!(sum(&rsdp[0..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(u32_at(rsdp, 20), 36, "RSDP length");
        assert_eq!(&rsdp[9..15], &OEM_ID);
        for table in tables.iter().skip(1) {
            let bytes = &table.bytes;
            assert_eq!(&bytes[0..4], table.name.as_bytes());
            assert_eq!(sum(bytes), 0, "{} checksum", table.name);
            assert_eq!(
                u32_at(bytes, 4) as usize,
                bytes.len(),
                "{} length",
                table.name
            );
            assert_eq!(&bytes[10..16], &OEM_ID);
            assert_eq!(&bytes[16..24], &OEM_TABLE_ID);
            assert_eq!(&bytes[28..32], &CREATOR_ID);
        }
    }

    #[test]
    fn tables_are_placed_in_the_acpi_area() {
        let tables = build_tables(&config(8)).unwrap();
        assert_eq!(tables.rsdp.address, layout::RSDP_POINTER);
        let mut end = layout::ACPI_START.0;
        for table in tables.iter() {
            assert_eq!(table.address.0 % 8, 0, "{} alignment", table.name);
            assert!(table.address.0 >= end, "{} overlaps", table.name);
            end = table.address.0 + table.bytes.len() as u64;
        }
        assert!(end <= layout::ACPI_START.0 + layout::ACPI_SIZE);
        // The biggest machine still fits.
        build_tables(&config(MAX_CPUS)).unwrap();
    }

    #[test]
    fn invalid_configs_are_refused() {
        assert!(matches!(
            build_tables(&config(0)),
            Err(AcpiError::InvalidCpuCount { count: 0 })
        ));
        assert!(matches!(
            build_tables(&config(MAX_CPUS + 1)),
            Err(AcpiError::InvalidCpuCount { .. })
        ));
        let mut bad = config(1);
        bad.serial_ports = vec![(0x3f8, 4); MAX_SERIAL_PORTS + 1];
        assert!(matches!(
            build_tables(&bad),
            Err(AcpiError::TooManySerialPorts { .. })
        ));
        let mut bad = config(1);
        bad.serial_ports = vec![(0xfffa, 4)];
        assert!(matches!(
            build_tables(&bad),
            Err(AcpiError::InvalidSerialPort { port: 0xfffa })
        ));
        let mut bad = config(1);
        bad.serial_ports = vec![(0x3f8, layout::IOAPIC_NUM_PINS)];
        assert!(matches!(
            build_tables(&bad),
            Err(AcpiError::InvalidSerialGsi { .. })
        ));
        let mut bad = config(1);
        bad.pci_mmio64 = (u64::MAX - 10, 12);
        assert!(matches!(
            build_tables(&bad),
            Err(AcpiError::InvalidPciMmio64Window { .. })
        ));
        // An empty 64-bit window is simply left out.
        let mut no_mmio64 = config(1);
        no_mmio64.pci_mmio64 = (0, 0);
        let with = build_tables(&config(1)).unwrap();
        let without = build_tables(&no_mmio64).unwrap();
        assert!(without.dsdt.bytes.len() < with.dsdt.bytes.len());
    }

    #[test]
    fn tables_in_guest_memory_link_up() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp_addr = create_acpi_tables(&mem, &config(2)).unwrap();
        assert_eq!(rsdp_addr, layout::RSDP_POINTER);

        let read = |addr: u64, len: usize| {
            let mut buf = vec![0u8; len];
            mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        };
        let signature_at = |addr: u64| read(addr, 4);
        let table_at = |addr: u64| {
            let len = u32_at(&read(addr, 8), 4) as usize;
            read(addr, len)
        };

        let rsdp = read(rsdp_addr.0, 36);
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = table_at(xsdt_addr);
        assert_eq!(&xsdt[0..4], b"XSDT");
        let entries: Vec<u64> = (TABLE_HEADER_LEN..xsdt.len())
            .step_by(8)
            .map(|offset| u64_at(&xsdt, offset))
            .collect();
        let signatures: Vec<Vec<u8>> = entries.iter().map(|a| signature_at(*a)).collect();
        assert_eq!(
            signatures,
            vec![b"FACP".to_vec(), b"APIC".to_vec(), b"MCFG".to_vec()]
        );

        let fadt = table_at(entries[0]);
        assert_eq!(signature_at(u64_at(&fadt, 140)), b"DSDT");
        assert_eq!(u64::from(u32_at(&fadt, 40)), u64_at(&fadt, 140));
        let dsdt = table_at(u64_at(&fadt, 140));
        assert_eq!(sum(&dsdt), 0);

        // The written MCFG describes our ECAM.
        let mcfg = table_at(entries[2]);
        assert_eq!(mcfg.len(), TABLE_HEADER_LEN + 8 + 16);
        assert_eq!(u64_at(&mcfg, 44), layout::PCI_MMCONFIG_START.0);
        assert_eq!(u16_at(&mcfg, 52), 0);
        assert_eq!(mcfg[54], 0);
        assert_eq!(mcfg[55], layout::PCI_MMCONFIG_END_BUS);
    }

    #[test]
    fn tables_that_do_not_fit_guest_memory_fail() {
        // Guest memory that ends before the ACPI area.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(mem.last_addr() < layout::ACPI_START);
        assert!(matches!(
            create_acpi_tables(&mem, &config(1)),
            Err(AcpiError::WriteGuestMemory { table: "RSDP", .. })
        ));
    }

    #[test]
    fn fadt_fields_sit_at_spec_offsets() {
        let tables = build_tables(&config(1)).unwrap();
        let fadt = &tables.fadt.bytes;
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6, "major revision");
        assert_eq!(fadt[131], 5, "minor revision");
        assert_eq!(u32_at(fadt, 40) as u64, tables.dsdt.address.0);
        assert_eq!(u64_at(fadt, 140), tables.dsdt.address.0);
        assert_eq!(u32_at(fadt, 36), 0, "no FACS");
        assert_eq!(u16_at(fadt, 46), 0, "no SCI");
        let boot_arch = u16_at(fadt, 109);
        assert_ne!(boot_arch & BOOT_ARCH_8042, 0);
        assert_ne!(boot_arch & BOOT_ARCH_VGA_NOT_PRESENT, 0);
        let flags = u32_at(fadt, 112);
        assert_eq!(
            flags,
            (1 << 20) | (1 << 4) | (1 << 10),
            "HW_REDUCED_ACPI | PWR_BUTTON | RESET_REG_SUP"
        );
        let io_byte_register = |offset: usize, port: u16| {
            assert_eq!(
                &fadt[offset..offset + 4],
                &[1, 8, 0, 1],
                "GAS at {offset}: system I/O, 8 bits, byte access"
            );
            assert_eq!(u64_at(fadt, offset + 4), u64::from(port));
        };
        io_byte_register(116, layout::ACPI_RESET_PORT);
        assert_eq!(fadt[128], layout::ACPI_RESET_VALUE);
        io_byte_register(244, layout::ACPI_SLEEP_CONTROL_PORT);
        io_byte_register(256, layout::ACPI_SLEEP_STATUS_PORT);
        assert_eq!(&fadt[268..276], &HYPERVISOR_VENDOR_ID);
        // No legacy PM blocks.
        assert!(fadt[56..88].iter().all(|b| *b == 0));
        assert!(fadt[148..244].iter().all(|b| *b == 0));
    }

    #[test]
    fn madt_describes_cpus_and_interrupt_controllers() {
        let num_cpus = 6;
        let tables = build_tables(&config(num_cpus)).unwrap();
        let madt = &tables.madt.bytes;
        assert_eq!(u32_at(madt, 36), layout::APIC_START.0 as u32);
        assert_eq!(u32_at(madt, 40), MADT_PCAT_COMPAT);
        let entries = madt_entries(madt);

        let lapics: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(kind, _)| *kind == MADT_LOCAL_APIC)
            .map(|(_, bytes)| bytes)
            .collect();
        assert_eq!(lapics.len(), num_cpus as usize);
        for (index, lapic) in lapics.iter().enumerate() {
            assert_eq!(lapic[2] as usize, index, "processor uid");
            assert_eq!(lapic[3] as usize, index, "APIC id");
            assert_eq!(u32_at(lapic, 4), 1, "enabled");
        }

        let ioapics: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(kind, _)| *kind == MADT_IO_APIC)
            .map(|(_, bytes)| bytes)
            .collect();
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0][2], 0, "IOAPIC id");
        assert_eq!(u32_at(ioapics[0], 4), layout::IOAPIC_START.0 as u32);
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");

        let overrides: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(kind, _)| *kind == MADT_INTERRUPT_SOURCE_OVERRIDE)
            .map(|(_, bytes)| bytes)
            .collect();
        assert_eq!(overrides.len(), 1);
        assert_eq!(overrides[0][3], 0, "source IRQ");
        assert_eq!(u32_at(overrides[0], 4), 2, "GSI");

        let nmis: Vec<&Vec<u8>> = entries
            .iter()
            .filter(|(kind, _)| *kind == MADT_LOCAL_APIC_NMI)
            .map(|(_, bytes)| bytes)
            .collect();
        assert_eq!(nmis.len(), 1);
        assert_eq!(nmis[0][2], 0xff, "all processors");
        assert_eq!(nmis[0][5], 1, "LINT1");
    }

    /// Run `iasl` with `args` in `dir`; fail the test with a hint if it is not installed.
    fn run_iasl(dir: &FsPath, args: &[&str]) -> String {
        let output = match Command::new("iasl").args(args).current_dir(dir).output() {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("iasl not found: install the Debian package acpica-tools to run this test")
            }
            Err(e) => panic!("failed to run iasl: {e}"),
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "iasl {args:?} failed:\n{text}");
        text
    }

    #[test]
    fn iasl_disassembles_all_tables() {
        let dir = TempDir::new_with_prefix("/tmp/vmm-acpi-test-").unwrap();
        let tables = build_tables(&config(4)).unwrap();
        for table in tables.iter().skip(2) {
            let name = table.name.to_lowercase();
            std::fs::write(dir.as_path().join(format!("{name}.dat")), &table.bytes).unwrap();
            let output = run_iasl(dir.as_path(), &["-d", &format!("{name}.dat")]);
            assert!(
                !output.contains("Error") && !output.contains("Warning"),
                "iasl -d {name}.dat complained:\n{output}"
            );
            let dsl = std::fs::read_to_string(dir.as_path().join(format!("{name}.dsl"))).unwrap();
            assert!(
                !dsl.contains("**** "),
                "iasl found problems in {name}:\n{dsl}"
            );
        }

        let dsdt = std::fs::read_to_string(dir.as_path().join("dsdt.dsl")).unwrap();
        for expected in [
            "Device (PCI0)",
            // iasl drops the padding underscores of names: GED_ prints as GED.
            "Device (GED)",
            "Device (PWRB)",
            "Name (_S5,",
            "Device (COM1)",
            "Device (COM2)",
            "Device (KBD)",
            "Device (MOU)",
            "Device (RTC)",
            "Device (MBRD)",
            "Device (C003)",
            "Method (_OSC",
            "Method (_EVT",
            "Notify (\\_SB.PWRB, 0x80)",
            "ACPI0013",
            "PNP0A08",
        ] {
            assert!(dsdt.contains(expected), "DSDT lacks {expected}:\n{dsdt}");
        }
        // Linux's acpi-ged driver rejects a _CRS that holds anything but interrupts.
        let ged = dsdt
            .split("Device (GED)")
            .nth(1)
            .and_then(|rest| rest.split("Method (_EVT").next())
            .unwrap_or_default();
        assert!(ged.contains("Interrupt ("), "GED _CRS:\n{ged}");
        assert!(!ged.contains("Memory32Fixed"), "GED _CRS:\n{ged}");
        // The disassembly compiles back cleanly.
        let output = run_iasl(dir.as_path(), &["-p", "recompiled", "dsdt.dsl"]);
        assert!(output.contains("0 Errors, 0 Warnings"), "{output}");

        let madt = std::fs::read_to_string(dir.as_path().join("apic.dsl")).unwrap();
        assert_eq!(madt.matches("Processor Local APIC").count(), 4, "{madt}");
        let fadt = std::fs::read_to_string(dir.as_path().join("facp.dsl")).unwrap();
        // iasl's own decoding of the fields agrees with ours.
        for expected in [
            "Revision : 06",
            "FADT Minor Revision : 05",
            "Hardware Reduced (V5) : 1",
            "Control Method Power Button (V1) : 1",
            "Reset Register Supported (V2) : 1",
            "8042 Present on ports 60/64 (V2) : 1",
            "VGA Not Present (V4) : 1",
            "Address : 0000000000000600",
            "Address : 0000000000000601",
            "Address : 0000000000000602",
        ] {
            assert!(fadt.contains(expected), "FADT lacks {expected}:\n{fadt}");
        }
        let mcfg = std::fs::read_to_string(dir.as_path().join("mcfg.dsl")).unwrap();
        assert!(mcfg.contains("Base Address : 00000000E0000000"), "{mcfg}");
    }

    /// The text between `start` and the next `end` in `text`, or "" if `start` is absent.
    fn section<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
        text.split_once(start)
            .and_then(|(_, rest)| rest.split(end).next())
            .unwrap_or_default()
    }

    /// Disassemble the DSDT of `config(2)`.
    fn disassembled_dsdt() -> String {
        let dir = TempDir::new_with_prefix("/tmp/vmm-acpi-test-").unwrap();
        let tables = build_tables(&config(2)).unwrap();
        std::fs::write(dir.as_path().join("dsdt.dat"), &tables.dsdt.bytes).unwrap();
        run_iasl(dir.as_path(), &["-d", "dsdt.dat"]);
        std::fs::read_to_string(dir.as_path().join("dsdt.dsl")).unwrap()
    }

    /// An AML integer as iasl prints it: One, or hex as wide as its encoding.
    fn iasl_integer(value: u32) -> String {
        match value {
            1 => "One".to_string(),
            0..=0xff => format!("0x{value:02X}"),
            0x100..=0xffff => format!("0x{value:04X}"),
            _ => format!("0x{value:08X}"),
        }
    }

    #[test]
    fn iasl_shows_the_pci_hotplug_slots() {
        let dsdt = disassembled_dsdt();
        let pci0 = section(&dsdt, "Device (PCI0)", "Device (MBRD)");
        assert!(
            pci0.contains("OperationRegion (PCST, SystemIO, 0xAE00, 0x14)"),
            "{pci0}"
        );
        let field = section(pci0, "Field (PCST, DWordAcc, NoLock, WriteAsZeros)", "}");
        for entry in ["PCIU,   32", "PCID,   32", "B0EJ,   32"] {
            assert!(field.contains(entry), "field lacks {entry}:\n{field}");
        }
        // Slot 0 is the host bridge: no slot object.
        assert!(!pci0.contains("Device (S00)"), "{pci0}");
        let dvnt = section(pci0, "Method (DVNT, 2, NotSerialized)", "Method (PCNT");
        for slot in 1..32u32 {
            let name = format!("S{slot:02X}");
            let device = section(pci0, &format!("Device ({name})\n"), "Device (");
            let bit = 1u32 << slot;
            for expected in [
                format!("Name (_ADR, 0x{:08X})", slot << 16),
                format!("Name (_SUN, {})", iasl_integer(slot)),
                "Method (_EJ0, 1, NotSerialized)".to_string(),
                format!("B0EJ = {}", iasl_integer(bit)),
            ] {
                assert!(
                    device.contains(&expected),
                    "{name} lacks {expected}:\n{device}"
                );
            }
            let branch = format!(
                "If ((Arg0 & {}))\n                {{\n                    Notify ({name}, Arg1)",
                iasl_integer(bit)
            );
            assert!(dvnt.contains(&branch), "DVNT lacks {branch}:\n{dvnt}");
        }
        // PCNT reads each read-to-clear register once: device check for PCIU, eject request
        // for PCID.
        let pcnt = section(pci0, "Method (PCNT, 0, Serialized)", "}");
        assert!(pcnt.contains("DVNT (PCIU, One)"), "{pcnt}");
        assert!(pcnt.contains("DVNT (PCID, 0x03)"), "{pcnt}");
        assert_eq!(pcnt.matches("PCI").count(), 2, "{pcnt}");

        // The GED's _EVT calls PCNT for the hot-plug bit.
        let evt = section(&dsdt, "Method (_EVT", "Device (C000)");
        let on_hotplug = format!(
            "If ((Local0 & {}))\n                {{\n                    \\_SB.PCI0.PCNT ()",
            iasl_integer(GedEvent::PciHotplug.bit())
        );
        assert!(evt.contains(&on_hotplug), "_EVT lacks {on_hotplug}:\n{evt}");
        // The registers are reserved as motherboard resources, away from PCI I/O BARs.
        let mbrd = section(&dsdt, "Device (MBRD)", "Device (");
        assert!(
            mbrd.contains("0xAE00,             // Range Minimum")
                && mbrd.contains("0x14,               // Length"),
            "{mbrd}"
        );
    }
}
