//! virtio-scsi-pci controllers, each served by a `vmm-scsi` process, and the `scsi-cd`
//! drives on them: removable media with a tray and a guest-controlled lock, changed with
//! QMP `eject` and `change`.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use ipc::scsi::{ScsiChannel, ScsiReply, ScsiRequest};
use ipc::DeviceKind;

use super::{lock, DeviceConfig, DeviceError, SETUP_TIMEOUT};
use crate::drive::{self, DriveConfig};
use crate::supervisor::{self, DeviceProcess};
use crate::virtio::pci::VirtioPciDevice;

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
    pub id: Option<String>,
    pub name: String,
    pub slot: u8,
    pub process: DeviceProcess,
    pub control: ScsiChannel,
    pub _function: Arc<Mutex<VirtioPciDevice>>,
    pub luns: Vec<CdLun>,
    pub num_queues: u16,
    pub queue_size: u16,
    /// The control socket reached end of file (the process is going away).
    pub control_closed: bool,
    /// Unplugged: its process is being stopped on purpose, and is not to be restarted.
    pub removed: bool,
    pub failed: bool,
    pub restarts: super::RestartBudget,
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
    let program = supervisor::device_program("vmm-scsi")?;
    let mut process = DeviceProcess::spawn(name, &program, &[])?;
    let ipc_err = |source| DeviceError::Ipc {
        name: name.to_string(),
        source,
    };
    let sock = process
        .control
        .try_clone()
        .map_err(|e| ipc_err(ipc::IpcError::Socket(e)))?;
    let mut control = ScsiChannel::new(sock);
    control
        .hello(DeviceKind::Block, DeviceKind::Block, SETUP_TIMEOUT)
        .map_err(|e| super::setup_failure(&mut process, e))?;
    let request = ScsiRequest::AttachController {
        num_queues,
        queue_size,
    };
    match control.call(request, &[], SETUP_TIMEOUT).map_err(ipc_err)? {
        (ScsiReply::Attached, _) => Ok((process, control)),
        (other, _) => Err(ipc_err(unexpected("AttachController", &other))),
    }
}

fn unexpected(what: &str, reply: &ScsiReply) -> ipc::IpcError {
    ipc::IpcError::Remote(ipc::RemoteError(format!("answered {what} with {reply:?}")))
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
        let name = self.name.clone();
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

    /// A new process after this one died: the controller and its drives (with their
    /// media) set up again, and the vhost-user setup replayed. The guest's lock and tray
    /// state start afresh (a closed tray, unlocked).
    pub fn respawn(&mut self) -> Result<(), DeviceError> {
        let (process, control) = start_controller(&self.name, self.num_queues, self.queue_size)?;
        let old_control = std::mem::replace(&mut self.control, control);
        for i in 0..self.luns.len() {
            let l = &self.luns[i];
            let request = ScsiRequest::AddCdrom {
                target: l.target,
                lun: l.lun,
                id: l.drive.id.clone(),
                serial: l.serial.clone(),
            };
            let fds: Vec<_> = l.medium.iter().map(|f| f.as_fd()).collect();
            let name = self.name.clone();
            self.control
                .call(request, &fds, SETUP_TIMEOUT)
                .map_err(|source| DeviceError::Ipc { name, source })?;
        }
        drop(old_control);
        let stream = process.connect_vhost_user()?;
        {
            let mut function = lock(&self._function);
            let backend = function
                .backend_mut()
                .as_vhost_user()
                .ok_or_else(|| DeviceError::NotRestartable(self.name.clone()))?;
            backend.reconnect(stream)?;
        }
        self.process = process;
        self.control_closed = false;
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
            tracing::warn!(device = %self.name, "reset: {e}");
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

pub(super) fn shared(c: ScsiController) -> SharedController {
    Arc::new(Mutex::new(c))
}

pub(super) fn failed(c: &SharedController) -> bool {
    lock(c).failed
}
