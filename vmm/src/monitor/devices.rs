//! Devices: device_add and device_del (PCI hot-plug through ACPI), query-pci, and our
//! downstream query of the device processes.

use qmp::schema::CommandSpec;
use qmp::QmpError;
use serde_json::{json, Value};

use super::command::{Command, CommandContext};
use crate::machine::Machine;
use crate::pci::{PciBarKind, PciDeviceInfo};

/// Our downstream query (the QMP spec's `__RFQDN_` prefix): every device process, its pid,
/// state and restart count.
pub const QUERY_DEVICE_PROCESSES: &str = "__org.vmm_query-device-processes";

pub const COMMANDS: &[Command] = &[
    Command::machine("device_add", device_add),
    Command::machine("device_del", device_del),
    // Documented by the seed without a command table entry.
    Command::machine("query-pci", |ctx| Ok(query_pci(ctx.machine)))
        .with_spec(|| CommandSpec::no_args("query-pci")),
    Command::machine(QUERY_DEVICE_PROCESSES, |ctx| {
        Ok(query_device_processes(ctx.machine))
    })
    .with_spec(|| CommandSpec::no_args(QUERY_DEVICE_PROCESSES)),
];

/// QMP device_add: create the device and tell the guest (ACPI hot-plug); a paused guest
/// hears of it when it runs.
fn device_add(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let machine = &mut *ctx.machine;
    let slot = crate::device_manager::device_config_from_qmp(&ctx.call.args)
        .and_then(|cfg| machine.devices_mut().add_device(&cfg))
        .map_err(|e| QmpError::generic(e.to_string()))?;
    if let Some(slot) = slot {
        let mut hp = machine
            .pci_hotplug()
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Err(e) = hp.plug(slot) {
            tracing::warn!(slot, "hot-plug notification: {e}");
        }
    }
    Ok(json!({}))
}

/// QMP device_del: ask the guest to eject the device; it goes once the guest did
/// (DEVICE_DELETED), as in QEMU.
fn device_del(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let id = ctx.call.str_arg("id").unwrap_or("");
    let machine = &mut *ctx.machine;
    let Some(slot) = machine.devices().slot_of(id) else {
        // A device that is not a PCI function (a scsi-cd on its controller) has no slot to
        // eject; unplugging its controller takes it along.
        if machine.devices().has_device_id(id) {
            return Err(QmpError::generic(format!(
                "Device '{id}' is not a PCI function and cannot be unplugged on its own; \
                 device_del its controller instead"
            )));
        }
        return Err(QmpError::device_not_found(id));
    };
    // The display adapter's VRAM stays mapped for the display process and the
    // accelerator: it is not unplugged (QEMU's words for a device that cannot be).
    if machine.devices().is_display_adapter(slot) {
        return Err(QmpError::generic(format!(
            "Device '{id}' does not support hotplugging"
        )));
    }
    let mut hp = machine
        .pci_hotplug()
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    match hp.request_unplug(slot) {
        Ok(()) => Ok(json!({})),
        Err(crate::devices::pci_hotplug::PciHotplugError::UnplugPending { .. }) => Err(
            QmpError::generic(format!("Device {id} is already in the process of unplug")),
        ),
        Err(e) => Err(QmpError::generic(e.to_string())),
    }
}

/// Our downstream query: every device process, its pid, state and restart count.
fn query_device_processes(machine: &Machine) -> Value {
    json!(machine
        .devices()
        .processes()
        .iter()
        .map(|p| json!({
            "device": p.device,
            "drive": p.serves,
            "program": p.program,
            "pid": p.pid,
            "state": p.state.as_str(),
            "restarts": p.restarts,
        }))
        .collect::<Vec<_>>())
}

/// QMP query-pci in QEMU 7.2's shape: one bus with its functions.
pub(super) fn query_pci(machine: &Machine) -> Value {
    let devices: Vec<Value> = {
        let bus = machine.pci().lock().unwrap_or_else(|e| e.into_inner());
        bus.pci_info().iter().map(pci_device_json).collect()
    };
    json!([{ "bus": 0, "devices": devices }])
}

fn pci_device_json(dev: &PciDeviceInfo) -> Value {
    let class = (u16::from(dev.class_code) << 8) | u16::from(dev.subclass);
    let mut class_info = json!({ "class": class });
    if let Some(desc) = pci_class_description(class) {
        class_info["desc"] = json!(desc);
    }
    let mut id = json!({ "device": dev.device_id, "vendor": dev.vendor_id });
    // Only a type 0 header has the subsystem registers.
    if dev.header_type & 0x7f == 0 {
        id["subsystem"] = json!(dev.subsystem_id);
        id["subsystem-vendor"] = json!(dev.subsystem_vendor_id);
    }
    let regions: Vec<Value> = dev
        .bars
        .iter()
        .filter(|bar| bar.size != 0)
        .map(|bar| {
            // QEMU shows a BAR that is not decoded at address -1.
            let address = bar.mapped_at.map_or(-1, |a| a as i64);
            let mut region = json!({ "bar": bar.index, "address": address, "size": bar.size });
            match bar.kind {
                PciBarKind::Io => region["type"] = json!("io"),
                PciBarKind::Mmio32 | PciBarKind::Mmio64 => {
                    region["type"] = json!("memory");
                    region["prefetch"] = json!(bar.prefetchable);
                    region["mem_type_64"] = json!(bar.kind == PciBarKind::Mmio64);
                }
            }
            region
        })
        .collect();
    let mut device = json!({
        "bus": dev.bus,
        "slot": dev.slot,
        "function": dev.function,
        "class_info": class_info,
        "id": id,
        "irq_pin": dev.irq_pin,
        "qdev_id": dev.id.as_deref().unwrap_or(""),
        "regions": regions,
    });
    if dev.irq_pin != 0 {
        device["irq"] = json!(dev.irq_line);
    }
    device
}

/// QEMU's names for the common PCI classes (class code << 8 | subclass).
fn pci_class_description(class: u16) -> Option<&'static str> {
    Some(match class {
        0x0100 => "SCSI controller",
        0x0101 => "IDE controller",
        0x0102 => "Floppy controller",
        0x0103 => "IPI controller",
        0x0104 => "RAID controller",
        0x0106 => "SATA controller",
        0x0107 => "SAS controller",
        0x0180 => "Storage controller",
        0x0200 => "Ethernet controller",
        0x0201 => "Token Ring controller",
        0x0202 => "FDDI controller",
        0x0203 => "ATM controller",
        0x0280 => "Network controller",
        0x0300 => "VGA controller",
        0x0301 => "XGA controller",
        0x0302 => "3D controller",
        0x0380 => "Display controller",
        0x0400 => "Video controller",
        0x0401 => "Audio controller",
        0x0402 => "Phone",
        0x0403 => "Audio controller",
        0x0480 => "Multimedia controller",
        0x0500 => "RAM controller",
        0x0501 => "Flash controller",
        0x0580 => "Memory controller",
        0x0600 => "Host bridge",
        0x0601 => "ISA bridge",
        0x0602 => "EISA bridge",
        0x0603 => "MC bridge",
        0x0604 => "PCI bridge",
        0x0605 => "PCMCIA bridge",
        0x0606 => "NUBUS bridge",
        0x0607 => "CARDBUS bridge",
        0x0608 => "RACEWAY bridge",
        0x0680 => "Bridge",
        0x0700 => "Serial port",
        0x0701 => "Parallel port",
        0x0780 => "Communication controller",
        0x0800 => "PIC",
        0x0801 => "DMA controller",
        0x0802 => "Timer",
        0x0803 => "RTC",
        0x0880 => "System peripheral",
        0x0c00 => "Firewire controller",
        0x0c01 => "ACCESS controller",
        0x0c02 => "SSA controller",
        0x0c03 => "USB controller",
        0x0c04 => "Fibre Channel controller",
        0x0c05 => "SMBus",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_bridge() -> PciDeviceInfo {
        PciDeviceInfo {
            bus: 0,
            slot: 0,
            function: 0,
            vendor_id: 0x8086,
            device_id: 0x1237,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
            revision: 2,
            class_code: 6,
            subclass: 0,
            prog_if: 0,
            header_type: 0,
            irq_line: 0,
            irq_pin: 0,
            id: None,
            bars: Vec::new(),
        }
    }

    #[test]
    fn host_bridge_matches_qemu_7_2() {
        // QEMU 7.2's reply for the i440FX host bridge of `-machine pc`.
        let expected = json!({"irq_pin": 0, "bus": 0, "qdev_id": "", "slot": 0,
            "class_info": {"class": 1536, "desc": "Host bridge"},
            "id": {"device": 4663, "subsystem-vendor": 6900, "vendor": 32902, "subsystem": 4352},
            "function": 0, "regions": []});
        assert_eq!(pci_device_json(&host_bridge()), expected);
    }

    #[test]
    fn pci_regions_irq_and_unknown_class() {
        use crate::pci::PciBarReport;
        let mut dev = host_bridge();
        dev.class_code = 0xff;
        dev.irq_pin = 1;
        dev.irq_line = 11;
        dev.id = Some("net0".into());
        dev.bars = vec![
            PciBarReport {
                index: 0,
                kind: PciBarKind::Io,
                prefetchable: false,
                size: 32,
                address: 0xc000,
                mapped_at: Some(0xc000),
            },
            PciBarReport {
                index: 2,
                kind: PciBarKind::Mmio64,
                prefetchable: true,
                size: 0x4000,
                address: 0,
                mapped_at: None,
            },
        ];
        let v = pci_device_json(&dev);
        assert_eq!(v["class_info"], json!({"class": 0xff00}));
        assert_eq!(v["irq"], 11);
        assert_eq!(v["qdev_id"], "net0");
        assert_eq!(
            v["regions"],
            json!([
                {"bar": 0, "type": "io", "address": 0xc000, "size": 32},
                {"bar": 2, "type": "memory", "address": -1, "size": 0x4000,
                 "prefetch": true, "mem_type_64": true},
            ])
        );
    }
}
