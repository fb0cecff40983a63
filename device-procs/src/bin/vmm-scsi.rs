//! `vmm-scsi`: the virtio-scsi CD-ROM controller process (see `device_procs::scsi`).

fn main() {
    std::process::exit(device_procs::scsi::main());
}
