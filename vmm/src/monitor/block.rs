//! Block devices: query-block, query-blockstats, block_resize, live snapshots, keys of
//! encrypted images, and removable media (eject, change).

use qmp::QmpError;
use serde_json::{json, Value};

use super::command::{Command, CommandContext};
use crate::device_manager::{DeviceError, ImageInfo};
use crate::machine::Machine;

pub const COMMANDS: &[Command] = &[
    Command::machine("block_resize", block_resize),
    Command::machine("query-block", |ctx| Ok(query_block(ctx.machine))),
    Command::machine("query-blockstats", |ctx| Ok(query_blockstats(ctx.machine))),
    Command::machine("blockdev-snapshot-sync", blockdev_snapshot_sync)
        .with_file_arg("snapshot-file"),
    Command::machine("block_passwd", block_passwd),
    Command::machine("eject", eject),
    Command::machine("change", change).with_file_arg("target"),
];

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
fn image_info(images: &[ImageInfo], backing: &[(String, crate::image::Format)]) -> Option<Value> {
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

fn block_resize(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let device = ctx.str_arg("device").unwrap_or("");
    let size = ctx
        .call
        .args
        .get("size")
        .and_then(Value::as_i64)
        .unwrap_or(-1);
    if size < 0 {
        return Err(QmpError::generic("Parameter 'size' expects a >0 size"));
    }
    ctx.machine
        .devices()
        .resize_drive(device, size as u64)
        .map(|_| json!({}))
        .map_err(|e| QmpError::generic(e.to_string()))
}

/// A block command's outcome: an unknown device is QEMU's DeviceNotFound.
fn block_result(result: Result<(), DeviceError>) -> Result<Value, QmpError> {
    result.map(|()| json!({})).map_err(|e| match e {
        DeviceError::DriveNotFoundForCommand(d) => QmpError::device_not_found(&d),
        other => QmpError::generic(other.to_string()),
    })
}

fn eject(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let device = ctx.str_arg("device").unwrap_or("");
    let force = ctx.bool_arg("force", false);
    block_result(ctx.machine.devices().eject(device, force))
}

fn change(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let fd = ctx.call.fd.take();
    let device = ctx.str_arg("device").unwrap_or("");
    let target = ctx.str_arg("target").unwrap_or("");
    let format = ctx.str_arg("arg");
    if device == "vnc" {
        return super::display::change_vnc(ctx.machine, target, format).map(|()| json!({}));
    }
    block_result(
        ctx.machine
            .devices()
            .change_medium(device, target, format, fd),
    )
}

fn block_passwd(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let device = ctx.str_arg("device").unwrap_or("");
    let password = ctx.str_arg("password").unwrap_or("");
    block_result(ctx.machine.devices().set_password(device, password))
}

fn blockdev_snapshot_sync(ctx: &mut CommandContext<'_>) -> Result<Value, QmpError> {
    let fd = ctx.call.fd.take();
    let device = ctx.str_arg("device").unwrap_or("");
    let format = ctx.str_arg("format");
    let Some(file) = ctx.str_arg("snapshot-file") else {
        return Err(QmpError::generic("Parameter 'snapshot-file' is missing"));
    };
    ctx.machine
        .devices()
        .snapshot_drive(device, file, format, fd)
        .map(|()| json!({}))
        .map_err(|e| QmpError::generic(e.to_string()))
}
