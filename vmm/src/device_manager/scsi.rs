//! virtio-scsi-pci controllers, each served by a `vmm-scsi` process, and the `scsi-cd`
//! drives on them: removable media with a tray and a guest-controlled lock, changed with
//! QMP `eject` and `change`.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use ipc::scsi::{ScsiChannel, ScsiEvent, ScsiReply, ScsiRequest};
use ipc::DeviceKind;
use serde_json::json;

use super::block::{BlockInfo, ImageInfo, IoStatus, RemovableState};
use super::process::{self, Misbehaved, SupervisedDevice, Supervision, WatchSink};
use super::{lock, DeviceConfig, DeviceError, DeviceManager, CLASS_STORAGE_SCSI, SETUP_TIMEOUT};
use crate::drive::{self, DriveConfig};
use crate::image::Format;
use crate::supervisor::DeviceProcess;
use crate::virtio::pci::VirtioPciDevice;
use crate::virtio::vhost_user::VhostUserDevice;

/// virtio device id of SCSI host adapters.
pub const VIRTIO_ID_SCSI: u16 = 8;
/// struct virtio_scsi_config.
pub const VIRTIO_SCSI_CONFIG_SIZE: usize = 36;
/// Control and event queues come before the request queues.
pub const FIXED_QUEUES: usize = 2;

/// A CD-ROM drive on a controller.
pub(super) struct CdLun {
    pub drive: DriveConfig,
    pub target: u8,
    pub lun: u8,
    /// The device's `id=`, or its QOM path: DEVICE_TRAY_MOVED's `id`.
    pub qdev_id: String,
    pub qdev: String,
    pub serial: String,
    /// The medium's image, held open (and locked) while it is in the drive.
    pub medium: Option<std::fs::File>,
}

/// One virtio-scsi-pci function and its process.
pub(super) struct ScsiController {
    pub supervision: Supervision,
    pub id: Option<String>,
    pub slot: u8,
    pub control: ScsiChannel,
    pub function: Arc<Mutex<VirtioPciDevice>>,
    pub luns: Vec<CdLun>,
    pub num_queues: u16,
    pub queue_size: u16,
}

pub(super) type SharedController = Arc<Mutex<ScsiController>>;

/// The LUN state the process reports.
pub(super) struct LunState {
    pub tray_open: bool,
    pub locked: bool,
    pub inserted: bool,
}

/// Start `vmm-scsi` for a controller with `num_queues` request queues.
pub(super) fn start_controller(
    name: &str,
    num_queues: u16,
    queue_size: u16,
) -> Result<(DeviceProcess, ScsiChannel), DeviceError> {
    // The SCSI protocol is one of the block kind's.
    let (process, mut control) = process::start(name, "vmm-scsi", &[], DeviceKind::Block)?;
    let request = ScsiRequest::AttachController {
        num_queues,
        queue_size,
    };
    match process::setup_call(name, &mut control, request, &[])? {
        ScsiReply::Attached => Ok((process, control)),
        other => Err(process::unexpected(name, "AttachController", &other)),
    }
}

/// Open a CD image read-only (and locked for sharing, as QEMU does for read-only media).
pub(super) fn open_medium(path: &str) -> Result<std::fs::File, DeviceError> {
    Ok(drive::open_image(path, true)?)
}

impl ScsiController {
    fn call(
        &mut self,
        request: ScsiRequest,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<ScsiReply, DeviceError> {
        let name = self.supervision.name.clone();
        self.control
            .call(request, fds, SETUP_TIMEOUT)
            .map(|(r, _)| r)
            .map_err(|e| match e {
                ipc::IpcError::Remote(r) => DeviceError::Medium(r.0),
                source => DeviceError::Ipc { name, source },
            })
    }

    /// Add a CD-ROM for `drive` at `target`:`lun`, with its medium if it has a file.
    pub fn add_cdrom(
        &mut self,
        drive: DriveConfig,
        target: u8,
        lun: u8,
        serial: String,
        qdev_id: String,
        qdev: String,
    ) -> Result<(), DeviceError> {
        let medium = drive.file.as_deref().map(open_medium).transpose()?;
        let request = ScsiRequest::AddCdrom {
            target,
            lun,
            id: drive.id.clone(),
            serial: serial.clone(),
        };
        let fds: Vec<_> = medium.iter().map(|f| f.as_fd()).collect();
        match self.call(request, &fds)? {
            ScsiReply::Added { .. } => {}
            other => return Err(DeviceError::Medium(format!("unexpected answer {other:?}"))),
        }
        self.luns.push(CdLun {
            drive,
            target,
            lun,
            qdev_id,
            qdev,
            serial,
            medium,
        });
        Ok(())
    }

    fn lun_index(&self, drive: &str) -> Option<usize> {
        self.luns.iter().position(|l| l.drive.id == drive)
    }

    /// QMP eject.
    pub fn eject(&mut self, drive: &str, force: bool) -> Result<(), DeviceError> {
        let i = self
            .lun_index(drive)
            .ok_or_else(|| DeviceError::DriveNotFoundForCommand(drive.to_string()))?;
        let (target, lun) = (self.luns[i].target, self.luns[i].lun);
        match self.call(ScsiRequest::Eject { target, lun, force }, &[])? {
            ScsiReply::Ejected => {
                self.luns[i].medium = None;
                self.luns[i].drive.file = None;
                Ok(())
            }
            ScsiReply::Locked => Err(DeviceError::Medium(format!(
                "Device '{drive}' is locked and force was not specified, wait for tray to \
                 open and try again"
            ))),
            other => Err(DeviceError::Medium(format!("unexpected answer {other:?}"))),
        }
    }

    /// QMP change: a new medium from `path`, or from `fd` (`fd:NAME`, passed with getfd).
    pub fn change(
        &mut self,
        drive: &str,
        path: &str,
        fd: Option<std::os::fd::OwnedFd>,
    ) -> Result<(), DeviceError> {
        let i = self
            .lun_index(drive)
            .ok_or_else(|| DeviceError::DriveNotFoundForCommand(drive.to_string()))?;
        let medium = match fd {
            Some(fd) => drive::image_from_fd(fd, path, true)?,
            None => open_medium(path)?,
        };
        let (target, lun) = (self.luns[i].target, self.luns[i].lun);
        match self.call(ScsiRequest::InsertMedium { target, lun }, &[medium.as_fd()])? {
            ScsiReply::Inserted { .. } => {
                self.luns[i].medium = Some(medium);
                self.luns[i].drive.file = Some(path.to_string());
                Ok(())
            }
            ScsiReply::Locked => Err(DeviceError::Medium(format!(
                "Device '{drive}' is locked and force was not specified, wait for tray to \
                 open and try again"
            ))),
            other => Err(DeviceError::Medium(format!("unexpected answer {other:?}"))),
        }
    }

    /// QEMU's device reset: locks released, trays closed.
    pub fn reset_luns(&mut self) {
        if let Err(e) = self.call(ScsiRequest::Reset, &[]) {
            tracing::warn!(device = %self.supervision.name, "reset: {e}");
        }
    }

    /// Tray, lock and medium of every LUN, by drive id.
    pub fn lun_states(&mut self) -> Vec<(String, LunState)> {
        let luns = match self.call(ScsiRequest::Query, &[]) {
            Ok(ScsiReply::Luns(l)) => l,
            _ => return Vec::new(),
        };
        luns.into_iter()
            .map(|l| {
                (
                    l.id,
                    LunState {
                        tray_open: l.tray_open,
                        locked: l.locked,
                        inserted: l.inserted,
                    },
                )
            })
            .collect()
    }
}

/// `scsi-cd`'s `bus=` (`scsi0.0`) names the controller `scsi0`.
pub(super) fn controller_of_bus(bus: &str) -> &str {
    bus.split_once('.').map_or(bus, |(c, _)| c)
}

/// The number properties of `virtio-scsi-pci` and `scsi-cd`.
pub(super) fn number(cfg: &DeviceConfig, key: &str) -> Result<Option<u16>, DeviceError> {
    let Some(v) = cfg.properties.get(key) else {
        return Ok(None);
    };
    v.parse()
        .map(Some)
        .map_err(|_| DeviceError::InvalidProperty {
            driver: cfg.driver.clone(),
            property: key.to_string(),
            value: v.clone(),
        })
}

impl SupervisedDevice for ScsiController {
    fn supervision(&self) -> &Supervision {
        &self.supervision
    }

    fn supervision_mut(&mut self) -> &mut Supervision {
        &mut self.supervision
    }

    fn control_fd(&self) -> RawFd {
        self.control.socket().as_raw_fd()
    }

    fn serves(&self) -> String {
        self.luns
            .iter()
            .map(|l| l.drive.id.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The tray of one of its drives moved: DEVICE_TRAY_MOVED.
    fn control_message(&mut self, sink: &dyn WatchSink) -> Result<(), Misbehaved> {
        let event = process::receive_event(&mut self.control, &mut self.supervision)?;
        if let Some(ScsiEvent::TrayMoved { id, tray_open }) = event {
            let qdev_id = self
                .luns
                .iter()
                .find(|l| l.drive.id == id)
                .map(|l| l.qdev_id.clone())
                .unwrap_or_default();
            sink.emit(
                "DEVICE_TRAY_MOVED",
                json!({"device": id, "tray-open": tray_open, "id": qdev_id}),
            );
        }
        Ok(())
    }

    /// A new process after this one died: the controller and its drives (with their
    /// media) set up again, and the vhost-user setup replayed. The guest's lock and tray
    /// state start afresh (a closed tray, unlocked).
    fn respawn(&mut self) -> Result<(), DeviceError> {
        let name = self.supervision.name.clone();
        let (process, mut control) = start_controller(&name, self.num_queues, self.queue_size)?;
        for l in &self.luns {
            let request = ScsiRequest::AddCdrom {
                target: l.target,
                lun: l.lun,
                id: l.drive.id.clone(),
                serial: l.serial.clone(),
            };
            let fds: Vec<_> = l.medium.iter().map(|f| f.as_fd()).collect();
            process::setup_call(&name, &mut control, request, &fds)?;
        }
        // The old process's control channel goes only now: it exits when that closes.
        self.control = control;
        process::reconnect(&name, &self.function, &process)?;
        self.supervision.replaced(process);
        Ok(())
    }
}

impl DeviceManager {
    pub(super) fn add_virtio_scsi(
        &mut self,
        cfg: &DeviceConfig,
    ) -> Result<Option<u8>, DeviceError> {
        // Checked before a process is started for it.
        cfg.pci_slot()?;
        let num_queues = number(cfg, "num_queues")?.unwrap_or(1).clamp(1, 16);
        let queue_size = number(cfg, "virtqueue_size")?.unwrap_or(128);
        if !queue_size.is_power_of_two() || !(2..=1024).contains(&queue_size) {
            return Err(DeviceError::InvalidProperty {
                driver: cfg.driver.clone(),
                property: "virtqueue_size".into(),
                value: queue_size.to_string(),
            });
        }
        let index = self.controllers.len();
        let label = cfg.id.clone().unwrap_or_else(|| format!("scsi{index}"));
        let name = format!("vmm-scsi[{label}]");
        let (process, control) = start_controller(&name, num_queues, queue_size)?;
        let stream = process.connect_vhost_user()?;
        let mut backend = VhostUserDevice::connect(
            &name,
            VIRTIO_ID_SCSI,
            stream,
            FIXED_QUEUES + usize::from(num_queues),
            queue_size,
            VIRTIO_SCSI_CONFIG_SIZE,
            self.memory.clone(),
        )?;
        backend.on_violation(process::violation_hook(&process));
        let (slot, function) = self.plug_vhost_user(cfg, &name, backend, CLASS_STORAGE_SCSI)?;
        tracing::info!(device = %name, pid = process.pid(), "SCSI controller");
        let controller = Arc::new(Mutex::new(ScsiController {
            supervision: Supervision::new(&name, cfg.id.as_deref(), "vmm-scsi", process),
            id: cfg.id.clone(),
            slot,
            control,
            function,
            luns: Vec::new(),
            num_queues,
            queue_size,
        }));
        self.controllers.push(controller.clone());
        self.supervise(controller)?;
        Ok(Some(slot))
    }

    pub(super) fn add_scsi_cd(&mut self, cfg: &DeviceConfig) -> Result<Option<u8>, DeviceError> {
        let drive_id = cfg.properties.get("drive").ok_or(DeviceError::NoDrive)?;
        let controller = {
            let controllers = &self.controllers;
            match cfg.properties.get("bus") {
                Some(bus) => {
                    let wanted = controller_of_bus(bus);
                    controllers
                        .iter()
                        .find(|c| lock(c).id.as_deref() == Some(wanted))
                        .cloned()
                        .ok_or_else(|| DeviceError::BusNotFound(bus.clone()))?
                }
                None => controllers.first().cloned().ok_or_else(|| {
                    DeviceError::NoBus("No 'SCSI' bus found for device 'scsi-cd'".into())
                })?,
            }
        };
        let index = self
            .drives
            .iter()
            .position(|d| &d.id == drive_id)
            .ok_or_else(|| DeviceError::DriveNotFound {
                driver: cfg.driver.clone(),
                drive: drive_id.clone(),
            })?;
        let drive = self.drives[index].clone();
        let lun = number(cfg, "lun")?.unwrap_or(0);
        let mut c = lock(&controller);
        let target = match number(cfg, "scsi-id")? {
            Some(t) => t,
            None => (0..=255u16)
                .find(|t| !c.luns.iter().any(|l| u16::from(l.target) == *t))
                .unwrap_or(0),
        };
        if target > 255 || lun > 255 {
            return Err(DeviceError::InvalidProperty {
                driver: cfg.driver.clone(),
                property: "scsi-id".into(),
                value: target.to_string(),
            });
        }
        let qdev = self.qom_path(cfg.id.as_deref());
        let qdev_id = cfg.id.clone().unwrap_or_else(|| qdev.clone());
        let serial = cfg.properties.get("serial").cloned().unwrap_or_default();
        c.add_cdrom(drive, target as u8, lun as u8, serial, qdev_id, qdev)?;
        drop(c);
        self.drives.remove(index);
        Ok(None)
    }

    /// The controller serving CD drive `drive`, if one does.
    fn controller_of(&self, drive: &str) -> Option<SharedController> {
        self.controllers
            .iter()
            .find(|c| lock(c).luns.iter().any(|l| l.drive.id == drive))
            .cloned()
    }

    /// QMP eject: open the tray of a removable drive (`force` breaks the guest's lock).
    pub fn eject(&self, drive: &str, force: bool) -> Result<(), DeviceError> {
        match self.controller_of(drive) {
            Some(c) => lock(&c).eject(drive, force),
            None if self.has_drive(drive) => Err(DeviceError::Medium(format!(
                "Device '{drive}' is not removable"
            ))),
            None => Err(DeviceError::DriveNotFoundForCommand(drive.to_string())),
        }
    }

    /// QMP change: put the image at `path` into a removable drive.
    pub fn change_medium(
        &self,
        drive: &str,
        path: &str,
        format: Option<&str>,
        fd: Option<std::os::fd::OwnedFd>,
    ) -> Result<(), DeviceError> {
        if let Some(f) = format {
            if f != "raw" {
                return Err(DeviceError::Medium(format!(
                    "a CD medium must be raw (an ISO image), not '{f}'"
                )));
            }
        }
        match self.controller_of(drive) {
            Some(c) => lock(&c).change(drive, path, fd),
            None if self.has_drive(drive) => Err(DeviceError::Medium(format!(
                "Device '{drive}' is not removable"
            ))),
            None => Err(DeviceError::DriveNotFoundForCommand(drive.to_string())),
        }
    }

    /// query-block's view of every CD drive: its configuration, QOM path, and what the
    /// process says of tray, lock and medium.
    pub(super) fn cd_info(&self) -> Vec<BlockInfo> {
        let mut out = Vec::new();
        for c in self.controllers.iter() {
            let mut c = lock(c);
            let states = c.lun_states();
            for l in &c.luns {
                let state = states
                    .iter()
                    .find(|(id, _)| *id == l.drive.id)
                    .map(|s| &s.1);
                let file = l.drive.file.clone().unwrap_or_default();
                let images = l
                    .medium
                    .iter()
                    .map(|f| ImageInfo::read(f, &file, Format::Raw))
                    .collect();
                out.push(BlockInfo {
                    drive: l.drive.clone(),
                    size: l
                        .medium
                        .as_ref()
                        .map_or(0, |f| f.metadata().map_or(0, |m| m.len())),
                    file,
                    format: Format::Raw,
                    backing: Vec::new(),
                    images,
                    qdev: Some(l.qdev.clone()),
                    encrypted: false,
                    io_status: IoStatus::Ok,
                    removable: Some(RemovableState {
                        tray_open: state.is_some_and(|s| s.tray_open),
                        locked: state.is_some_and(|s| s.locked),
                        inserted: state.map_or(l.medium.is_some(), |s| s.inserted),
                    }),
                });
            }
        }
        out
    }
}
