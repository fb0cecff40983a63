//! virtio-blk disks, each served by a `vmm-blk` process, and the drives (`-drive`) that
//! wait for a device: query-block, query-blockstats, block_resize, live snapshots, keys of
//! encrypted images and the error policies' stops. Also `vhost-user-blk-pci`, a disk whose
//! backend we did not start.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use ipc::blk::{
    AttachConfig, BlkChannel, BlkEvent, BlkReply, BlkRequest, ErrorAction, InitialChunks,
};
use ipc::DeviceKind;
use serde_json::json;

use super::process::{self, Misbehaved, SupervisedDevice, Supervision, WatchSink};
use super::{
    config_changed, lock, DeviceConfig, DeviceError, DeviceManager, CLASS_STORAGE_SCSI,
    SETUP_TIMEOUT,
};
use crate::chardev::{ChardevSpec, SocketAddress};
use crate::control::MachineRequest;
use crate::drive::{self, DriveConfig, DriveInterface, DriveMedia, OpenedImage};
use crate::image::Format;
use crate::migration::disk::ChunkBitmap;
use crate::supervisor::DeviceProcess;
use crate::virtio::pci::VirtioPciDevice;
use crate::virtio::vhost_user::VhostUserDevice;
use crate::virtio::VIRTIO_ID_BLOCK;

/// Size of struct virtio_blk_config up to the write-zeroes fields (Linux 6.1).
const VIRTIO_BLK_CONFIG_SIZE: usize = 60;

pub(super) type SharedBlock = Arc<Mutex<BlockDevice>>;

/// A virtio-blk disk served by a `vmm-blk` process.
pub(super) struct BlockDevice {
    pub(super) supervision: Supervision,
    pub(super) drive: String,
    /// The drive as configured, for query-block.
    pub(super) drive_config: DriveConfig,
    /// The virtual size in bytes, as the process last reported it.
    pub(super) size: u64,
    /// `/machine/peripheral/ID` or `/machine/peripheral-anon/device[N]`.
    qdev: String,
    pub(super) slot: u8,
    /// The image and its backing chain, kept for a restarted process.
    pub(super) image: OpenedImage,
    /// The writable top image is locked (not yet, on a migration's destination; no more,
    /// on its source once the guest has moved).
    pub(super) locked: bool,
    attach: AttachConfig,
    /// Kept open: the process exits when the vmm's end closes.
    pub(super) control: BlkChannel,
    function: Arc<Mutex<VirtioPciDevice>>,
    /// An image of the chain is encrypted; the process refuses I/O until it has the key.
    encrypted: bool,
    /// The password given with block_passwd (kept to give it to a restarted process).
    password: Option<String>,
    /// query-block's io-status: set when an error policy stopped the VM for this disk.
    io_status: IoStatus,
    /// Block migration's dirty-chunk bitmap while one runs (a restarted process is
    /// handed it again).
    pub(super) tracking: Option<Arc<ChunkBitmap>>,
    /// An incoming block migration writes this disk: its image is marked incomplete.
    pub(super) incomplete: bool,
}

/// A disk's I/O status as query-block reports it (`io-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    Ok,
    Failed,
    Nospace,
}

impl IoStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            IoStatus::Ok => "ok",
            IoStatus::Failed => "failed",
            IoStatus::Nospace => "nospace",
        }
    }
}

/// A drive as query-block describes it.
#[derive(Debug, Clone)]
pub struct BlockInfo {
    pub drive: DriveConfig,
    /// The image file on top (after snapshots, the newest overlay).
    pub file: String,
    pub format: Format,
    /// The backing chain below it: path and format, nearest first.
    pub backing: Vec<(String, Format)>,
    /// The top image and its backing images, as QEMU's ImageInfo describes them.
    pub images: Vec<ImageInfo>,
    /// Virtual size in bytes.
    pub size: u64,
    /// The QOM path of the device using it, if one does.
    pub qdev: Option<String>,
    pub encrypted: bool,
    pub io_status: IoStatus,
    /// For removable drives: tray, lock and medium.
    pub removable: Option<RemovableState>,
}

/// A removable drive's state.
#[derive(Debug, Clone, Copy)]
pub struct RemovableState {
    pub tray_open: bool,
    pub locked: bool,
    pub inserted: bool,
}

/// One image of a chain, as query-block's `image` describes it.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    pub filename: String,
    pub format: Format,
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: u64,
    pub cluster_size: Option<u64>,
    /// The backing file as the image records it, and its format.
    pub backing: Option<(String, Option<String>)>,
}

impl ImageInfo {
    /// Read from an open file (never reopened by path: it may have come as an fd).
    pub(super) fn read(file: &std::fs::File, filename: &str, format: Format) -> ImageInfo {
        let actual_size = file
            .metadata()
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
        let header = match format {
            Format::Qcow2 => crate::image::read_qcow2_header(file, Path::new(filename)).ok(),
            Format::Raw => None,
        };
        ImageInfo {
            filename: filename.to_string(),
            format,
            virtual_size: match &header {
                Some(h) => h.size,
                None => file.metadata().map_or(0, |m| m.len()),
            },
            actual_size,
            cluster_size: header.as_ref().map(|h| 1u64 << h.cluster_bits),
            backing: header.and_then(|h| Some((h.backing_file?, h.backing_format))),
        }
    }
}

impl DeviceManager {
    pub(super) fn has_drive(&self, id: &str) -> bool {
        self.controllers
            .iter()
            .any(|c| lock(c).luns.iter().any(|l| l.drive.id == id))
            || self.drives.iter().any(|d| d.id == id)
            || self.blocks.iter().any(|b| lock(b).drive == id)
    }

    /// QMP block_resize: grow drive `drive` to `size` bytes while the guest runs. The
    /// device process extends the image and the guest gets a configuration interrupt.
    pub fn resize_drive(&self, drive: &str, size: u64) -> Result<u64, DeviceError> {
        let block = self.blocks.iter().find(|b| lock(b).drive == drive).cloned();
        if let Some(block) = block {
            let mut b = lock(&block);
            if !b.supervision.running() {
                return Err(DeviceError::Resize(format!(
                    "the process serving '{drive}' has failed"
                )));
            }
            let name = b.supervision.name.clone();
            let reply = b
                .control
                .call(BlkRequest::Resize { size }, &[], SETUP_TIMEOUT)
                .map_err(|e| match e {
                    ipc::IpcError::Remote(r) => DeviceError::Resize(r.0),
                    source => DeviceError::Ipc {
                        name: name.clone(),
                        source,
                    },
                })?;
            return match reply.0 {
                BlkReply::Resized { size } => {
                    // The process does not speak the backend channel: the driver hears of
                    // the new size from us.
                    b.size = size;
                    let function = b.function.clone();
                    drop(b);
                    config_changed(&name, &function);
                    Ok(size)
                }
                other => Err(DeviceError::Resize(format!(
                    "unexpected answer to a resize: {other:?}"
                ))),
            };
        }
        // A drive no device uses: its image file grows here.
        let d = self
            .drives
            .iter()
            .find(|d| d.id == drive)
            .ok_or_else(|| DeviceError::NoSuchDrive(drive.to_string()))?;
        let file = d
            .file
            .as_deref()
            .ok_or_else(|| DeviceError::Resize(format!("Device '{drive}' has no medium")))?;
        if d.readonly {
            return Err(DeviceError::Resize(format!(
                "Device '{drive}' is read only"
            )));
        }
        let image = drive::open_image(file, false)?;
        let len = image
            .metadata()
            .map_err(|e| DeviceError::Resize(e.to_string()))?
            .len();
        if size < len {
            return Err(DeviceError::Resize(
                "shrinking a disk is not supported".into(),
            ));
        }
        image
            .set_len(size)
            .map_err(|e| DeviceError::Resize(format!("cannot grow '{file}': {e}")))?;
        Ok(size)
    }

    /// QMP blockdev-snapshot-sync: put a new qcow2 overlay at `path` on top of drive
    /// `drive` while the guest runs. The vmm writes the overlay (its backing file is the
    /// current top, by absolute name); the device process drains its requests, flushes,
    /// and switches to it. On any failure the drive stays as it was and a file we created
    /// is removed.
    pub fn snapshot_drive(
        &self,
        drive: &str,
        path: &str,
        format: Option<&str>,
        fd: Option<std::os::fd::OwnedFd>,
    ) -> Result<(), DeviceError> {
        if let Some(f) = format {
            if f != "qcow2" {
                return Err(DeviceError::Snapshot(format!(
                    "a live snapshot must be qcow2 (a '{f}' image has no backing file)"
                )));
            }
        }
        let block = self.blocks.iter().find(|b| lock(b).drive == drive).cloned();
        let Some(block) = block else {
            return Err(if self.drives.iter().any(|d| d.id == drive) {
                DeviceError::Snapshot(format!("Device '{drive}' has no device using it"))
            } else {
                DeviceError::NoSuchDrive(drive.to_string())
            });
        };
        let mut b = lock(&block);
        if !b.supervision.running() {
            return Err(DeviceError::Snapshot(format!(
                "the process serving '{drive}' has failed"
            )));
        }
        if b.drive_config.readonly {
            return Err(DeviceError::Snapshot(format!(
                "Device '{drive}' is read only"
            )));
        }
        if b.image.path.starts_with("/dev/fdset/") {
            return Err(DeviceError::Snapshot(
                "an image passed as a file descriptor has no name to record as a backing file"
                    .into(),
            ));
        }
        let backing_name = std::fs::canonicalize(&b.image.path)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| b.image.path.clone());
        let (file, created) = match fd {
            // `fd:NAME`: management made the file; we only write the overlay into it.
            Some(fd) => (drive::image_from_fd(fd, path, false)?, false),
            None => drive::create_snapshot_file(path)?,
        };
        let cleanup = |e: DeviceError| {
            if created {
                let _ = std::fs::remove_file(path);
            }
            e
        };
        crate::image::write_overlay(&file, b.size, &backing_name, b.image.format)
            .map_err(|e| cleanup(DeviceError::Snapshot(format!("cannot write '{path}': {e}"))))?;
        let name = b.supervision.name.clone();
        let reply = b
            .control
            .call(
                BlkRequest::Snapshot {
                    format: Format::Qcow2,
                },
                &[file.as_fd()],
                SETUP_TIMEOUT,
            )
            .map_err(|e| {
                cleanup(match e {
                    ipc::IpcError::Remote(r) => DeviceError::Snapshot(r.0),
                    source => DeviceError::Ipc { name, source },
                })
            })?;
        if reply.0 != BlkReply::SnapshotTaken {
            return Err(cleanup(DeviceError::Snapshot(format!(
                "unexpected answer to a snapshot: {:?}",
                reply.0
            ))));
        }
        // The old top is now the overlay's backing file (its fd stays ours, for restarts).
        let old_top = std::mem::replace(&mut b.image.top, file);
        let link = crate::image::BackingLink {
            path: std::path::PathBuf::from(&b.image.path),
            recorded_name: backing_name,
            format: b.image.format,
            file: old_top,
        };
        b.image.backing.insert(0, link);
        b.image.path = path.to_string();
        b.image.format = Format::Qcow2;
        b.drive_config.file = Some(path.to_string());
        b.drive_config.format = Some(Format::Qcow2);
        Ok(())
    }

    /// How many drives were ever configured (numbers the ids QEMU gives anonymous ones).
    pub fn drive_count(&self) -> usize {
        self.drives.len() + self.blocks.len()
    }

    /// The first disk that is encrypted and has no key yet: its drive and file (`cont`
    /// refuses to run the guest until block_passwd gave every key).
    pub fn missing_key(&self) -> Option<(String, String)> {
        self.blocks.iter().find_map(|b| {
            let b = lock(b);
            (b.encrypted && b.password.is_none()).then(|| (b.drive.clone(), b.image.path.clone()))
        })
    }

    /// QMP block_passwd: give an encrypted disk its key.
    pub fn set_password(&self, drive: &str, password: &str) -> Result<(), DeviceError> {
        let block = self
            .blocks
            .iter()
            .find(|b| lock(b).drive == drive)
            .cloned()
            .ok_or_else(|| DeviceError::DriveNotFoundForCommand(drive.to_string()))?;
        let mut b = lock(&block);
        if !b.encrypted {
            return Err(DeviceError::NotEncrypted(drive.to_string()));
        }
        let name = b.supervision.name.clone();
        let request = BlkRequest::SetKey {
            password: password.to_string(),
        };
        match b.control.call(request, &[], SETUP_TIMEOUT) {
            Ok((BlkReply::KeySet, _)) => {
                b.password = Some(password.to_string());
                Ok(())
            }
            Ok((other, _)) => Err(DeviceError::Resize(format!(
                "unexpected answer to a key: {other:?}"
            ))),
            Err(ipc::IpcError::Remote(r)) => Err(DeviceError::Resize(r.0)),
            Err(source) => Err(DeviceError::Ipc { name, source }),
        }
    }

    /// Before the VM continues: every disk that an error policy stopped carries out its
    /// held requests again, and its I/O status is ok again.
    pub fn resume_held_requests(&self) {
        for block in self.blocks.iter() {
            let mut b = lock(block);
            if b.io_status == IoStatus::Ok || !b.supervision.running() {
                b.io_status = IoStatus::Ok;
                continue;
            }
            b.io_status = IoStatus::Ok;
            match b.control.call(BlkRequest::Resume, &[], SETUP_TIMEOUT) {
                Ok((BlkReply::Resumed { retried }, _)) => {
                    tracing::info!(device = %b.supervision.name, retried, "held requests carried out again");
                }
                Ok((other, _)) => {
                    tracing::warn!(device = %b.supervision.name, "answered Resume with {other:?}")
                }
                Err(e) => {
                    tracing::warn!(device = %b.supervision.name, "cannot resume its requests: {e}")
                }
            }
        }
    }

    /// I/O statistics of every drive, in query-block's order: counted by the device
    /// processes (fetched over their control channels); a drive nobody serves did no I/O.
    pub fn block_stats(&self) -> Vec<(String, Option<String>, ipc::blk::BlockStats)> {
        let mut out = Vec::new();
        for block in self.blocks.iter() {
            let mut b = lock(block);
            let stats = if b.supervision.running() {
                match b.control.call(BlkRequest::Stats, &[], SETUP_TIMEOUT) {
                    Ok((BlkReply::Stats(s), _)) => s,
                    Ok((other, _)) => {
                        tracing::warn!(device = %b.supervision.name, "answered Stats with {other:?}");
                        ipc::blk::BlockStats::default()
                    }
                    Err(e) => {
                        tracing::warn!(device = %b.supervision.name, "statistics: {e}");
                        ipc::blk::BlockStats::default()
                    }
                }
            } else {
                ipc::blk::BlockStats::default()
            };
            out.push((b.drive.clone(), Some(b.qdev.clone()), stats));
        }
        for d in &self.drives {
            out.push((d.id.clone(), None, ipc::blk::BlockStats::default()));
        }
        out
    }

    /// Every drive, attached or not, in creation order: what query-block reports.
    pub fn block_info(&self) -> Vec<BlockInfo> {
        let mut out: Vec<BlockInfo> =
            self.blocks
                .iter()
                .map(|b| {
                    let b = lock(b);
                    BlockInfo {
                        drive: b.drive_config.clone(),
                        file: b.image.path.clone(),
                        format: b.image.format,
                        backing: b
                            .image
                            .backing
                            .iter()
                            .map(|l| (l.path.display().to_string(), l.format))
                            .collect(),
                        images: std::iter::once(ImageInfo::read(
                            &b.image.top,
                            &b.image.path,
                            b.image.format,
                        ))
                        .chain(b.image.backing.iter().map(|l| {
                            ImageInfo::read(&l.file, &l.path.display().to_string(), l.format)
                        }))
                        .collect(),
                        size: b.size,
                        qdev: Some(b.qdev.clone()),
                        encrypted: b.encrypted,
                        io_status: b.io_status,
                        removable: None,
                    }
                })
                .collect();
        out.extend(self.cd_info());
        out.extend(self.drives.iter().map(|d| {
            let file = d.file.clone().unwrap_or_default();
            // A drive no device uses is not open: read what its header says now.
            let opened = std::fs::File::open(&file).ok();
            let header = match (d.format, &opened) {
                (Some(Format::Qcow2), Some(f)) => {
                    crate::image::read_qcow2_header(f, Path::new(&file)).ok()
                }
                _ => None,
            };
            let format = d.format.unwrap_or(Format::Raw);
            BlockInfo {
                images: opened
                    .iter()
                    .map(|f| ImageInfo::read(f, &file, format))
                    .collect(),
                drive: d.clone(),
                format: d.format.unwrap_or(Format::Raw),
                backing: header
                    .as_ref()
                    .and_then(|h| {
                        let name = h.backing_file.as_deref()?;
                        let path = crate::image::resolve_backing(Path::new(&file), name);
                        let format = h
                            .backing_format
                            .as_deref()
                            .and_then(crate::image::parse_format)
                            .unwrap_or(Format::Raw);
                        Some(vec![(path.display().to_string(), format)])
                    })
                    .unwrap_or_default(),
                size: match &header {
                    Some(h) => h.size,
                    None => std::fs::metadata(&file).map_or(0, |m| m.len()),
                },
                encrypted: header.as_ref().is_some_and(|h| h.crypt_method != 0),
                file,
                qdev: None,
                io_status: IoStatus::Ok,
                removable: None,
            }
        }));
        out
    }

    pub fn add_drive(&mut self, drive: DriveConfig) -> Result<(), DeviceError> {
        if self.has_drive(&drive.id) {
            return Err(DeviceError::DuplicateDrive(drive.id));
        }
        let mut drive = drive;
        drive::probe_drive(&mut drive)?;
        let virtio = drive.interface == DriveInterface::Virtio;
        let id = drive.id.clone();
        self.drives.push(drive);
        if virtio {
            let mut properties = BTreeMap::new();
            properties.insert("drive".to_string(), id);
            self.add_device(&DeviceConfig {
                driver: "virtio-blk-pci".into(),
                id: None,
                properties,
            })?;
        }
        Ok(())
    }

    pub(super) fn add_virtio_blk(&mut self, cfg: &DeviceConfig) -> Result<Option<u8>, DeviceError> {
        let drive_id = cfg.properties.get("drive").ok_or(DeviceError::NoDrive)?;
        // Checked before a process is started for it.
        cfg.pci_slot()?;
        let num_queues: u16 = cfg.number("num-queues")?.unwrap_or(1);
        let queue_size: u16 = cfg.number("queue-size")?.unwrap_or(256);
        if num_queues == 0 || num_queues > 16 {
            return Err(DeviceError::InvalidProperty {
                driver: cfg.driver.clone(),
                property: "num-queues".into(),
                value: num_queues.to_string(),
            });
        }
        if !queue_size.is_power_of_two() || !(2..=1024).contains(&queue_size) {
            return Err(DeviceError::InvalidProperty {
                driver: cfg.driver.clone(),
                property: "queue-size".into(),
                value: queue_size.to_string(),
            });
        }
        let index = self
            .drives
            .iter()
            .position(|d| &d.id == drive_id)
            .ok_or_else(|| DeviceError::DriveNotFound {
                // QEMU names the inner virtio device here.
                driver: "virtio-blk-device".into(),
                drive: drive_id.clone(),
            })?;
        let drive = self.drives[index].clone();
        if drive.media == DriveMedia::Cdrom {
            return Err(DeviceError::InvalidProperty {
                driver: cfg.driver.clone(),
                property: "drive".into(),
                value: drive.id.clone(),
            });
        }
        let image = drive::open_drive_locked(&drive, !self.images_inactive)?;
        let locked = !self.images_inactive || drive.readonly;
        let file = image.path.clone();

        let name = format!("vmm-blk[{}]", drive.id);
        let serial = cfg
            .properties
            .get("serial")
            .or(drive.serial.as_ref())
            .cloned()
            .unwrap_or_default();
        let attach = AttachConfig {
            readonly: drive.readonly,
            serial,
            num_queues,
            queue_size,
            error_policy: drive.error_policy,
        };
        let (process, control, size, encrypted) = start_blk_process(&name, &image, &attach)?;
        tracing::info!(device = %name, pid = process.pid(), "serving {file} ({size} bytes)");

        let stream = process.connect_vhost_user()?;
        let mut backend = VhostUserDevice::connect(
            &name,
            VIRTIO_ID_BLOCK,
            stream,
            usize::from(num_queues),
            queue_size,
            VIRTIO_BLK_CONFIG_SIZE,
            self.memory.clone(),
        )?;
        backend.on_violation(process::violation_hook(&process));
        let (slot, function) = self.plug_vhost_user(cfg, &name, backend, CLASS_STORAGE_SCSI)?;
        self.drives.remove(index);
        let qdev = format!("{}/virtio-backend", self.qom_path(cfg.id.as_deref()));
        let block = Arc::new(Mutex::new(BlockDevice {
            supervision: Supervision::new(&name, cfg.id.as_deref(), "vmm-blk", process),
            drive: drive.id.clone(),
            drive_config: drive,
            size,
            qdev,
            slot,
            image,
            locked,
            attach,
            control,
            function,
            encrypted,
            password: None,
            io_status: IoStatus::Ok,
            tracking: None,
            incomplete: false,
        }));
        self.blocks.push(block.clone());
        self.supervise(block)?;
        Ok(Some(slot))
    }

    pub(super) fn add_vhost_user_blk(
        &mut self,
        cfg: &DeviceConfig,
    ) -> Result<Option<u8>, DeviceError> {
        let chardev =
            cfg.properties
                .get("chardev")
                .ok_or_else(|| DeviceError::MissingProperty {
                    driver: cfg.driver.clone(),
                    property: "chardev",
                })?;
        let path = match self.chardevs.iter().find(|(id, _)| id == chardev) {
            Some((
                _,
                ChardevSpec::Socket {
                    address: SocketAddress::Unix(path),
                    server: false,
                    ..
                },
            )) => path.clone(),
            Some(_) => {
                return Err(DeviceError::InvalidProperty {
                    driver: cfg.driver.clone(),
                    property: "chardev".into(),
                    value: format!("{chardev} (must be a unix socket client)"),
                })
            }
            None => {
                return Err(DeviceError::InvalidProperty {
                    driver: cfg.driver.clone(),
                    property: "chardev".into(),
                    value: chardev.clone(),
                })
            }
        };
        // Checked before a process is started for it.
        cfg.pci_slot()?;
        let num_queues: u16 = cfg.number("num-queues")?.unwrap_or(1);
        let queue_size: u16 = cfg.number("queue-size")?.unwrap_or(128);
        let name = format!("vhost-user-blk[{chardev}]");
        let stream =
            std::os::unix::net::UnixStream::connect(&path).map_err(|e| DeviceError::Connect {
                path: path.display().to_string(),
                source: e,
            })?;
        let backend = VhostUserDevice::connect(
            &name,
            VIRTIO_ID_BLOCK,
            stream,
            usize::from(num_queues.max(1)),
            queue_size,
            VIRTIO_BLK_CONFIG_SIZE,
            self.memory.clone(),
        )?;
        let (slot, _) = self.plug_vhost_user(cfg, &name, backend, CLASS_STORAGE_SCSI)?;
        Ok(Some(slot))
    }
}

/// Start a `vmm-blk` process and give it `image`: the process, its control channel, the
/// image size and whether it is encrypted.
fn start_blk_process(
    name: &str,
    image: &OpenedImage,
    attach: &AttachConfig,
) -> Result<(DeviceProcess, BlkChannel, u64, bool), DeviceError> {
    let (process, mut control) = process::start(name, "vmm-blk", &[], DeviceKind::Block)?;
    let fds: Vec<_> = image.files().into_iter().map(|f| f.as_fd()).collect();
    let request = BlkRequest::AttachChain {
        config: attach.clone(),
        chain: image.chain(),
    };
    match process::setup_call(name, &mut control, request, &fds)? {
        BlkReply::Attached { size, encrypted } => Ok((process, control, size, encrypted)),
        other => Err(process::unexpected(name, "Attach", &other)),
    }
}

impl BlockDevice {
    /// The device's QOM path (DEVICE_DELETED's `path`): `qdev` without the virtio child.
    pub(super) fn qdev_path(&self) -> String {
        self.qdev.trim_end_matches("/virtio-backend").to_string()
    }
}

impl SupervisedDevice for BlockDevice {
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
        self.drive.clone()
    }

    /// I/O errors (logged) and the error policy's failures (BLOCK_IO_ERROR, and for `stop`
    /// the VM stops).
    fn control_message(&mut self, sink: &dyn WatchSink) -> Result<(), Misbehaved> {
        let event = process::receive_event(&mut self.control, &mut self.supervision)?;
        match event {
            None => {}
            Some(BlkEvent::IoError { write, message }) => {
                let op = if write { "write" } else { "read" };
                tracing::warn!(device = %self.supervision.name, "guest {op} failed: {message}");
            }
            Some(BlkEvent::RequestFailed {
                write,
                action,
                nospace,
                reason,
            }) => {
                let action_name = match action {
                    ErrorAction::Report | ErrorAction::Enospc => "report",
                    ErrorAction::Ignore => "ignore",
                    ErrorAction::Stop => "stop",
                };
                // QEMU 7.2's BLOCK_IO_ERROR, then (for stop) the VM stops: STOP follows.
                sink.emit(
                    "BLOCK_IO_ERROR",
                    json!({
                        "device": self.drive,
                        "node-name": self.supervision.name,
                        "operation": if write { "write" } else { "read" },
                        "action": action_name,
                        "nospace": nospace,
                        "reason": reason,
                    }),
                );
                if action == ErrorAction::Stop {
                    self.io_status = if nospace {
                        IoStatus::Nospace
                    } else {
                        IoStatus::Failed
                    };
                    sink.machine().request(MachineRequest::BlockIoErrorStop);
                }
            }
        }
        Ok(())
    }

    /// A new process with the same image (and key), and the vhost-user setup replayed.
    fn respawn(&mut self) -> Result<(), DeviceError> {
        let name = self.supervision.name.clone();
        let (process, mut control, _size, _encrypted) =
            start_blk_process(&name, &self.image, &self.attach)?;
        if let Some(password) = &self.password {
            let request = BlkRequest::SetKey {
                password: password.clone(),
            };
            process::setup_call(&name, &mut control, request, &[])?;
        }
        if let Some(bitmap) = &self.tracking {
            // A block migration runs: the new process marks into the same bitmap, before
            // the guest's requests (and those the old one left) reach it.
            super::block_migration::track(&name, &mut control, bitmap, InitialChunks::None)?;
        }
        process::reconnect(&name, &self.function, &process)?;
        self.supervision.replaced(process);
        self.control = control;
        Ok(())
    }
}

impl DeviceManager {
    /// A migration's source lets go of its disks' locks (the destination takes them).
    pub fn inactivate_images(&self) {
        for b in &self.blocks {
            let mut b = lock(b);
            if b.locked && !b.drive_config.readonly {
                drive::unlock_image(&b.image.top);
                b.locked = false;
            }
        }
    }

    /// Take the disks' locks: on a migration's destination at the switchover, or on its
    /// source again when the migration failed. Refused while another process holds one.
    pub fn activate_images(&self) -> Result<(), DeviceError> {
        for b in &self.blocks {
            let mut b = lock(b);
            if !b.locked {
                drive::lock_image(&b.image.top, &b.image.path, b.drive_config.readonly)?;
                b.locked = true;
            }
            if !b.incomplete && !b.drive_config.readonly {
                drive::refuse_incomplete(&b.image.top, &b.image.path)?;
            }
        }
        Ok(())
    }
}
