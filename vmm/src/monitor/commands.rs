//! QMP commands carried out on the main thread against the [`Machine`], with QEMU 7.2's
//! reply shapes and errors. Events of synchronous actions are emitted before the reply.

use qmp::{GreetingInfo, QmpError};
use serde_json::{json, Value};

use super::{hmp, memory, MonitorCall};
use crate::accel::AccelKind;
use crate::machine::{Machine, MachineExit};
use crate::pci::{PciBarKind, PciDeviceInfo};

/// The UUID QEMU reports when none was given.
const NULL_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// Runs one command and replies. Returns how the machine must exit, if it must.
pub fn execute(machine: &mut Machine, mut call: MonitorCall) -> Option<MachineExit> {
    let mut exit = None;
    let result = match call.command.as_str() {
        "quit" => {
            machine.emit_shutdown(false, "host-qmp-quit");
            machine.set_quit_flush(call.take_flushed());
            exit = Some(MachineExit::Shutdown);
            Ok(json!({}))
        }
        "stop" => {
            machine.stop();
            Ok(json!({}))
        }
        "cont" => machine.cont().map(|()| json!({})),
        "system_reset" => match machine.host_reset() {
            Ok(outcome) => {
                exit = outcome;
                Ok(json!({}))
            }
            Err(e) => Err(QmpError::generic(e.to_string())),
        },
        "system_powerdown" => {
            machine.emit("POWERDOWN", None);
            machine.power_button();
            Ok(json!({}))
        }
        "query-status" => Ok(query_status(machine)),
        "query-version" => Ok(query_version()),
        "query-kvm" => Ok(json!({
            "enabled": machine.accel_kind() == AccelKind::Kvm,
            "present": kvm_present(),
        })),
        "query-name" => Ok(match &machine.config().name {
            Some(name) => json!({ "name": name }),
            None => json!({}),
        }),
        "query-uuid" => Ok(json!({
            "UUID": machine.config().uuid.as_deref().unwrap_or(NULL_UUID),
        })),
        "query-mice" => Ok(json!(mice()
            .iter()
            .map(|m| json!({
                "name": m.name,
                "index": m.index,
                "current": m.current,
                "absolute": m.absolute,
            }))
            .collect::<Vec<_>>())),
        "query-cpus-fast" => Ok(query_cpus_fast(machine)),
        "query-cpus" => Ok(query_cpus(machine)),
        "query-pci" => Ok(query_pci(machine)),
        "query-chardev" => Ok(query_chardev(machine)),
        super::QUERY_DEVICE_PROCESSES => Ok(query_device_processes(machine)),
        "block_resize" => block_resize(machine, &call).map(|()| json!({})),
        "query-block" => Ok(query_block(machine)),
        "query-blockstats" => Ok(query_blockstats(machine)),
        "device_add" => crate::device_manager::device_config_from_qmp(&call.args)
            .and_then(|cfg| machine.devices_mut().add_device(&cfg))
            .map(|slot| {
                // Tell the guest (ACPI hot-plug); a paused guest hears of it when it runs.
                if let Some(slot) = slot {
                    let mut hp = machine
                        .pci_hotplug()
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    if let Err(e) = hp.plug(slot) {
                        tracing::warn!(slot, "hot-plug notification: {e}");
                    }
                }
                json!({})
            })
            .map_err(|e| QmpError::generic(e.to_string())),
        "device_del" => device_del(machine, call.str_arg("id").unwrap_or("")),
        "eject" => {
            let device = call.str_arg("device").unwrap_or("");
            let force = call
                .args
                .get("force")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            block_result(machine.devices().eject(device, force))
        }
        "change" => {
            let fd = call.fd.take();
            let device = call.str_arg("device").unwrap_or("");
            let target = call.str_arg("target").unwrap_or("");
            let format = call.str_arg("arg");
            block_result(machine.devices().change_medium(device, target, format, fd))
        }
        "block_passwd" => {
            let device = call.str_arg("device").unwrap_or("");
            let password = call.str_arg("password").unwrap_or("");
            machine
                .devices()
                .set_password(device, password)
                .map(|()| json!({}))
                .map_err(|e| match e {
                    crate::device_manager::DeviceError::DriveNotFoundForCommand(d) => {
                        QmpError::device_not_found(&d)
                    }
                    other => QmpError::generic(other.to_string()),
                })
        }
        "blockdev-snapshot-sync" => {
            let fd = call.fd.take();
            let device = call.str_arg("device").unwrap_or("");
            let format = call.str_arg("format");
            match call.str_arg("snapshot-file") {
                None => Err(QmpError::generic("Parameter 'snapshot-file' is missing")),
                Some(file) => machine
                    .devices()
                    .snapshot_drive(device, file, format, fd)
                    .map(|()| json!({}))
                    .map_err(|e| QmpError::generic(e.to_string())),
            }
        }
        "inject-nmi" => {
            machine.inject_nmi();
            Ok(json!({}))
        }
        "cpu" => set_cpu(machine, &call).map(|()| json!({})),
        "human-monitor-command" => {
            let line = call.str_arg("command-line").unwrap_or("").to_string();
            let cpu = call.args.get("cpu-index").map(|v| v.as_i64().unwrap_or(-1));
            hmp::run(machine, &line, cpu).map(|(text, outcome)| {
                exit = outcome;
                json!(text)
            })
        }
        "memsave" => memsave(machine, &call).map(|()| json!({})),
        "pmemsave" => pmemsave(machine, &call).map(|()| json!({})),
        other => Err(QmpError::command_not_found(other)),
    };
    call.reply(result);
    exit
}

pub(super) fn query_status(machine: &Machine) -> Value {
    let state = machine.run_state();
    json!({
        "status": state.as_str(),
        "singlestep": false,
        "running": state.is_running(),
    })
}

/// The QEMU version whose command set we implement, and our own package name.
pub(super) fn query_version() -> Value {
    let info = GreetingInfo::default();
    json!({
        "qemu": { "major": info.major, "minor": info.minor, "micro": info.micro },
        "package": info.package,
    })
}

/// Whether KVM could be used on this host (QEMU's `present`).
pub(super) fn kvm_present() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// QEMU 7.2's query-cpus-fast for a pc machine with one vCPU per socket (its default
/// topology for `-smp N`).
fn query_cpus_fast(machine: &Machine) -> Value {
    let cpus = machine
        .cpus()
        .thread_ids()
        .into_iter()
        .map(|(index, thread_id)| {
            json!({
                "cpu-index": index,
                "qom-path": format!("/machine/unattached/device[{index}]"),
                "thread-id": thread_id,
                "props": { "core-id": 0, "thread-id": 0, "socket-id": index },
                "target": "x86_64",
            })
        })
        .collect();
    Value::Array(cpus)
}

/// QMP `cpu`: choose the monitor's current CPU.
fn set_cpu(machine: &mut Machine, call: &MonitorCall) -> Result<(), QmpError> {
    let index = call.args.get("index").and_then(Value::as_i64).unwrap_or(-1);
    match u32::try_from(index) {
        Ok(index) if machine.set_current_cpu(index) => Ok(()),
        _ => Err(QmpError::generic("Invalid CPU index")),
    }
}

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
pub(super) fn save_virtual(machine: &Machine, cpu: i64, range: &DumpRange) -> Result<(), QmpError> {
    let snapshots = machine.cpus().snapshots();
    let state = usize::try_from(cpu)
        .ok()
        .and_then(|i| snapshots.get(i))
        .ok_or_else(|| QmpError::generic("Parameter 'cpu-index' expects a CPU number"))?;
    let regs = state
        .paging
        .ok_or_else(|| QmpError::generic("Cannot read the CPU's paging registers"))?;
    memory::save_virtual(
        machine.memory().guest_memory(),
        &regs,
        range.addr,
        range.size,
        range.filename,
    )
    .map_err(|e| QmpError::generic(e.to_string()))
}

/// pmemsave for QMP and HMP.
pub(super) fn save_physical(machine: &Machine, range: &DumpRange) -> Result<(), QmpError> {
    memory::save_physical(
        machine.memory().guest_memory(),
        range.addr,
        range.size,
        range.filename,
    )
    .map_err(|e| QmpError::generic(e.to_string()))
}

/// QMP memsave: virtual memory as the chosen (or the current) CPU sees it.
fn memsave(machine: &Machine, call: &MonitorCall) -> Result<(), QmpError> {
    let (addr, size, filename) = dump_args(call);
    let cpu = match call.args.get("cpu-index") {
        Some(v) => v.as_i64().unwrap_or(-1),
        None => i64::from(machine.current_cpu()),
    };
    save_virtual(
        machine,
        cpu,
        &DumpRange {
            addr,
            size,
            filename,
        },
    )
}

/// QMP pmemsave: guest-physical memory.
fn pmemsave(machine: &Machine, call: &MonitorCall) -> Result<(), QmpError> {
    let (addr, size, filename) = dump_args(call);
    save_physical(
        machine,
        &DumpRange {
            addr,
            size,
            filename,
        },
    )
}

/// The seed's query-cpus: every vCPU's pc and halt state, and which one is current.
fn query_cpus(machine: &Machine) -> Value {
    let current = machine.current_cpu();
    let cpus = machine.cpus();
    let list = cpus
        .thread_ids()
        .into_iter()
        .zip(cpus.snapshots())
        .map(|((index, thread_id), state)| {
            json!({
                "CPU": index,
                "current": index == current,
                "halted": state.halted,
                "pc": state.pc,
                "thread_id": thread_id,
            })
        })
        .collect();
    Value::Array(list)
}

/// QMP query-chardev: each backend's label, QEMU-style filename, and whether its front
/// end (the device) is open.
pub(super) fn query_chardev(machine: &Machine) -> Value {
    let list = machine
        .chardevs()
        .iter()
        .map(|c| {
            json!({
                "label": c.label(),
                "filename": c.filename(),
                "frontend-open": true,
            })
        })
        .collect();
    Value::Array(list)
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

/// A pointing device as query-mice and `info mice` show it.
pub struct MouseInfo {
    pub name: &'static str,
    pub index: u32,
    pub current: bool,
    pub absolute: bool,
}

/// The machine's mice: the i8042's PS/2 mouse, which every pc machine has. The index is
/// QEMU 7.2's input-handler index for it on the same machine (the keyboard handlers come
/// first), so management software sees the same numbers from both.
pub fn mice() -> [MouseInfo; 1] {
    [MouseInfo {
        name: "QEMU PS/2 Mouse",
        index: 2,
        current: true,
        absolute: false,
    }]
}

/// QEMU 7.2's BlockInfo for each drive: the seed's fields (device, type, removable, locked,
/// inserted with file/ro/drv/backing_file/encrypted, io-status) and 7.2's usual companions.
fn query_block(machine: &Machine) -> Value {
    let mut out = Vec::new();
    for (index, info) in machine.devices().block_info().into_iter().enumerate() {
        let d = &info.drive;
        let mut entry = json!({
            "device": d.id,
            "locked": info.removable.is_some_and(|r| r.locked),
            // A drive no device uses counts as removable in QEMU.
            "removable": info.qdev.is_none() || info.removable.is_some(),
            "type": "unknown",
        });
        if let Some(r) = info.removable {
            // QEMU 7.2 spells it with an underscore; the seed (QEMU 1.1) with a dash.
            // Clients of either era find theirs.
            entry["tray_open"] = json!(r.tray_open);
            entry["tray-open"] = json!(r.tray_open);
        }
        let has_medium = info.removable.map_or(d.file.is_some(), |r| r.inserted);
        if let Some(qdev) = &info.qdev {
            entry["io-status"] = json!(info.io_status.as_str());
            entry["qdev"] = json!(qdev);
        }
        if has_medium {
            let mut inserted = json!({
                "file": info.file,
                "ro": d.readonly,
                "drv": info.format.name(),
                "encrypted": info.encrypted,
                "backing_file_depth": info.backing.len(),
                "node-name": format!("#block{}", 100 + index),
                "cache": {"no-flush": false, "direct": false, "writeback": true},
                "detect_zeroes": "off",
                "write_threshold": 0,
                "bps": 0, "bps_rd": 0, "bps_wr": 0,
                "iops": 0, "iops_rd": 0, "iops_wr": 0,
            });
            if let Some((backing, _)) = info.backing.first() {
                inserted["backing_file"] = json!(backing);
            }
            if let Some(image) = image_info(&info.images, &info.backing) {
                inserted["image"] = image;
            }
            entry["inserted"] = inserted;
        }
        out.push(entry);
    }
    json!(out)
}

/// QEMU 7.2's BlockStats for each drive: the device's counters (`stats`) and, beneath the
/// format, the file's (`parent`), both counted in the device process. QEMU's failed_*,
/// invalid_* and *_merged counters stay zero: failed requests are not counted apart, and
/// nothing merges requests.
fn query_blockstats(machine: &Machine) -> Value {
    fn counters(c: &ipc::blk::Counters, accounted: bool) -> Value {
        json!({
            "rd_bytes": c.rd_bytes,
            "wr_bytes": c.wr_bytes,
            "rd_operations": c.rd_operations,
            "wr_operations": c.wr_operations,
            "flush_operations": c.flush_operations,
            "rd_total_time_ns": c.rd_total_time_ns,
            "wr_total_time_ns": c.wr_total_time_ns,
            "flush_total_time_ns": c.flush_total_time_ns,
            "wr_highest_offset": c.wr_highest_offset,
            "unmap_operations": c.discard_operations,
            "unmap_bytes": c.discard_bytes,
            "unmap_total_time_ns": c.discard_total_time_ns,
            "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0,
            "failed_rd_operations": 0, "failed_wr_operations": 0,
            "failed_flush_operations": 0, "failed_unmap_operations": 0,
            "invalid_rd_operations": 0, "invalid_wr_operations": 0,
            "invalid_flush_operations": 0, "invalid_unmap_operations": 0,
            "account_invalid": accounted,
            "account_failed": accounted,
            "timed_stats": [],
        })
    }
    let mut out = Vec::new();
    for (index, (device, qdev, stats)) in machine.devices().block_stats().into_iter().enumerate() {
        let parent = stats.parent.unwrap_or(stats.stats);
        let mut entry = json!({
            "device": device,
            "node-name": format!("#block{}", 100 + index),
            "stats": counters(&stats.stats, true),
            "parent": {
                "node-name": format!("#block{}", 200 + index),
                "stats": counters(&parent, false),
                "driver-specific": {
                    "driver": "file",
                    "discard-nb-ok": parent.discard_operations,
                    "discard-nb-failed": 0,
                    "discard-bytes-ok": parent.discard_bytes,
                },
            },
        });
        if let Some(qdev) = qdev {
            entry["qdev"] = json!(qdev);
        }
        out.push(entry);
    }
    json!(out)
}

/// QEMU's ImageInfo for `images[0]`, with its backing images nested below it.
fn image_info(
    images: &[crate::device_manager::ImageInfo],
    backing: &[(String, crate::image::Format)],
) -> Option<Value> {
    let (image, rest) = images.split_first()?;
    let mut v = json!({
        "filename": image.filename,
        "format": image.format.name(),
        "virtual-size": image.virtual_size,
        "actual-size": image.actual_size,
        "dirty-flag": false,
    });
    if let Some(cluster) = image.cluster_size {
        v["cluster-size"] = json!(cluster);
        v["format-specific"] = json!({
            "type": "qcow2",
            "data": {
                "compat": "1.1",
                "compression-type": "zlib",
                "lazy-refcounts": false,
                "refcount-bits": 16,
                "corrupt": false,
                "extended-l2": false,
            },
        });
    }
    if let Some((recorded, format)) = &image.backing {
        v["backing-filename"] = json!(recorded);
        if let Some((full, _)) = backing.first() {
            v["full-backing-filename"] = json!(full);
        }
        if let Some(f) = format {
            v["backing-filename-format"] = json!(f);
        }
    }
    if let Some(nested) = image_info(rest, backing.get(1..).unwrap_or(&[])) {
        v["backing-image"] = nested;
    }
    Some(v)
}

fn block_resize(machine: &Machine, call: &MonitorCall) -> Result<(), QmpError> {
    let device = call.str_arg("device").unwrap_or("");
    let size = call.args.get("size").and_then(Value::as_i64).unwrap_or(-1);
    if size < 0 {
        return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
    }
    machine
        .devices()
        .resize_drive(device, size as u64)
        .map(|_| ())
        .map_err(|e| QmpError::generic(e.to_string()))
}

/// QMP device_del: ask the guest to eject the device; it goes once the guest did
/// (DEVICE_DELETED), as in QEMU.
fn device_del(machine: &mut Machine, id: &str) -> Result<Value, QmpError> {
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

/// A block command's outcome: an unknown device is QEMU's DeviceNotFound.
fn block_result(result: Result<(), crate::device_manager::DeviceError>) -> Result<Value, QmpError> {
    result.map(|()| json!({})).map_err(|e| match e {
        crate::device_manager::DeviceError::DriveNotFoundForCommand(d) => {
            QmpError::device_not_found(&d)
        }
        other => QmpError::generic(other.to_string()),
    })
}

fn query_device_processes(machine: &Machine) -> Value {
    use crate::device_manager::ProcessState;
    json!(machine
        .devices()
        .processes()
        .iter()
        .map(|p| json!({
            "device": p.device,
            "drive": p.drive,
            "program": p.program,
            "pid": p.pid,
            "state": match p.state {
                ProcessState::Running => "running",
                ProcessState::Failed => "failed",
            },
            "restarts": p.restarts,
        }))
        .collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_names_qemu_7_2_and_us() {
        let v = query_version();
        assert_eq!(v["qemu"], json!({"major": 7, "minor": 2, "micro": 0}));
        assert!(v["package"].as_str().unwrap().starts_with("vmm "));
    }

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
