//! The devices that `-device` (and later `device_add`) creates, and what each one owns: its
//! PCI function, and for a device served by another process, that process and its control
//! channel. Drives (`-drive`) wait here until a device takes them.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qmp::EventSender;
use serde_json::{json, Map, Value};
use vmm_sys_util::eventfd::EventFd;

use crate::control::{MachineControl, MachineRequest};
use ipc::blk::{AttachConfig, BlkChannel, BlkEvent, BlkReply, BlkRequest, ErrorAction};
use ipc::DeviceKind;
use vm_memory::GuestMemoryMmap;

use crate::accel::Accelerator;
use crate::chardev::{split_key_value, split_options, ChardevSpec, SocketAddress};
use crate::drive::{self, DriveConfig, DriveError, DriveInterface, DriveMedia, OpenedImage};
use crate::image::Format;
use crate::pci::{PciBus, PciDevice, PciError};
use crate::supervisor::{self, DeviceProcess, SupervisorError};
use crate::virtio::pci::{VirtioPciDevice, VirtioPciError};
use crate::virtio::vhost_user::{VhostUserDevice, VhostUserError};
use crate::virtio::VIRTIO_ID_BLOCK;

mod scsi;
mod watcher;
use scsi::{ScsiController, SharedController};
use watcher::WatchContext;

/// How long a device process may take to answer its setup.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a device process gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Size of struct virtio_blk_config up to the write-zeroes fields (Linux 6.1).
const VIRTIO_BLK_CONFIG_SIZE: usize = 60;
/// PCI class of a virtio block function, as QEMU gives it (mass storage, SCSI).
const CLASS_STORAGE_SCSI: (u8, u8) = (0x01, 0x00);

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("'{0}' is not a valid device model name")]
    UnknownDriver(String),
    #[error("Property '{driver}.{property}' not found")]
    UnknownProperty { driver: String, property: String },
    #[error("Property '{driver}.{property}' doesn't take value '{value}'")]
    InvalidProperty {
        driver: String,
        property: String,
        value: String,
    },
    #[error("drive property not set")]
    NoDrive,
    #[error("Parameter 'driver' is missing")]
    MissingDriver,
    #[error("PCI: slot {slot} function 0 not available for {driver}, in use by {occupant}")]
    SlotTaken {
        slot: u8,
        driver: String,
        occupant: String,
    },
    #[error("{driver}: property '{property}' is required")]
    MissingProperty {
        driver: String,
        property: &'static str,
    },
    #[error("Failed to connect to '{path}': {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Property '{driver}.drive' can't find value '{drive}'")]
    DriveNotFound { driver: String, drive: String },
    #[error("Duplicate device ID '{0}'")]
    DuplicateId(String),
    #[error("Bus '{0}' not found")]
    BusNotFound(String),
    #[error("Duplicate ID '{0}' for drive")]
    DuplicateDrive(String),
    #[error("device {0} has no backend process to restart")]
    NotRestartable(String),
    #[error("Cannot find device='{0}' nor node-name=''")]
    NoSuchDrive(String),
    #[error("{0}")]
    Resize(String),
    #[error("{0}")]
    Snapshot(String),
    #[error("Device '{0}' not found")]
    DriveNotFoundForCommand(String),
    #[error("Device '{0}' is not encrypted")]
    NotEncrypted(String),
    #[error("{0}")]
    Medium(String),
    #[error("{0}")]
    NoBus(String),
    #[error(transparent)]
    Drive(#[from] DriveError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error("device process {name} exited while it was being set up ({status})")]
    ExitedDuringSetup {
        name: String,
        status: std::process::ExitStatus,
    },
    #[error("device process {name}: {source}")]
    Ipc {
        name: String,
        #[source]
        source: ipc::IpcError,
    },
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    #[error(transparent)]
    VirtioPci(#[from] VirtioPciError),
    #[error(transparent)]
    Pci(#[from] PciError),
}

/// One `-device` (or `device_add`): a driver and its properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub driver: String,
    pub id: Option<String>,
    pub properties: BTreeMap<String, String>,
}

/// The device models we know, with the properties each accepts besides `id`, `bus` and
/// `addr`.
const DRIVERS: &[(&str, &[&str])] = &[
    (
        "virtio-blk-pci",
        &["drive", "num-queues", "queue-size", "serial", "bootindex"],
    ),
    // A vhost-user-blk backend we did not start (qemu-storage-daemon, say), reached
    // through a `-chardev socket`.
    (
        "vhost-user-blk-pci",
        &["chardev", "num-queues", "queue-size", "bootindex"],
    ),
    // A SCSI host adapter served by vmm-scsi, and CD-ROM drives on its bus.
    ("virtio-scsi-pci", &["num_queues", "virtqueue_size"]),
    (
        "scsi-cd",
        &["drive", "scsi-id", "lun", "channel", "serial", "bootindex"],
    ),
];

/// Parse a `-device` value (`driver,key=value,...`).
pub fn parse_device(value: &str) -> Result<DeviceConfig, DeviceError> {
    let mut parts = split_options(value).into_iter();
    let first = parts.next().unwrap_or_default();
    let driver = first.strip_prefix("driver=").unwrap_or(&first).to_string();
    let properties = parts.filter(|p| !p.is_empty()).map(|part| {
        let (key, v) = split_key_value(&part);
        (key.to_string(), v.unwrap_or("on").to_string())
    });
    device_config(driver, properties)
}

/// QMP device_add's arguments (`driver`, `id`, `bus` and the properties) as a device.
pub fn device_config_from_qmp(
    args: &serde_json::Map<String, serde_json::Value>,
) -> Result<DeviceConfig, DeviceError> {
    let driver = args
        .get("driver")
        .and_then(serde_json::Value::as_str)
        .ok_or(DeviceError::MissingDriver)?
        .to_string();
    let properties = args.iter().filter(|(k, _)| *k != "driver").map(|(k, v)| {
        let v = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            other => other.to_string(),
        };
        (k.clone(), v)
    });
    device_config(driver, properties)
}

/// Check `driver` and its properties against the driver table.
fn device_config(
    driver: String,
    properties: impl Iterator<Item = (String, String)>,
) -> Result<DeviceConfig, DeviceError> {
    let Some((_, allowed)) = DRIVERS.iter().find(|(name, _)| *name == driver) else {
        return Err(DeviceError::UnknownDriver(driver));
    };
    let mut cfg = DeviceConfig {
        driver: driver.clone(),
        id: None,
        properties: BTreeMap::new(),
    };
    for (key, v) in properties {
        let key = key.as_str();
        match key {
            "id" => cfg.id = Some(v),
            "bus" | "addr" => {
                cfg.properties.insert(key.to_string(), v);
            }
            k if allowed.contains(&k) => {
                cfg.properties.insert(key.to_string(), v);
            }
            _ => {
                return Err(DeviceError::UnknownProperty {
                    driver,
                    property: key.to_string(),
                })
            }
        }
    }
    Ok(cfg)
}

impl DeviceConfig {
    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, DeviceError> {
        let Some(v) = self.properties.get(key) else {
            return Ok(None);
        };
        let parsed = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok().map(|n| n.to_string()),
            None => Some(v.clone()),
        };
        parsed
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| DeviceError::InvalidProperty {
                driver: self.driver.clone(),
                property: key.to_string(),
                value: v.clone(),
            })
    }

    /// The PCI slot from `addr=SLOT[.FN]`, and a check of `bus=`.
    fn pci_slot(&self) -> Result<Option<u8>, DeviceError> {
        if let Some(bus) = self.properties.get("bus") {
            if bus != "pci.0" {
                return Err(DeviceError::BusNotFound(bus.clone()));
            }
        }
        let Some(addr) = self.properties.get("addr") else {
            return Ok(None);
        };
        let (slot, function) = addr.split_once('.').unwrap_or((addr, "0"));
        let slot = u8::from_str_radix(slot.trim_start_matches("0x"), 16).ok();
        match (slot, function) {
            (Some(s), "0") if s < 32 => Ok(Some(s)),
            _ => Err(DeviceError::InvalidProperty {
                driver: self.driver.clone(),
                property: "addr".into(),
                value: addr.clone(),
            }),
        }
    }
}

/// Downstream QMP names (the spec's `__RFQDN_` extension prefix) for device processes.
pub const EVENT_PROCESS_EXITED: &str = "__org.vmm_DEVICE_PROCESS_EXITED";
pub const EVENT_PROCESS_RESTARTED: &str = "__org.vmm_DEVICE_PROCESS_RESTARTED";
pub const EVENT_PROCESS_FAILED: &str = "__org.vmm_DEVICE_PROCESS_FAILED";
/// A device process broke the control protocol: it is stopped and not restarted (it may be
/// compromised); the guest keeps running without that device's backend.
pub const EVENT_PROCESS_MISBEHAVED: &str = "__org.vmm_DEVICE_PROCESS_MISBEHAVED";

/// Restarts allowed within [`RESTART_WINDOW`] before a device is marked failed.
const MAX_RESTARTS: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);
/// The wait before the n-th restart in the window: 0, 100 ms, 200 ms, 400 ms, ...
fn restart_backoff(recent: usize) -> Duration {
    match recent {
        0 => Duration::ZERO,
        n => Duration::from_millis(100 << (n - 1).min(6)),
    }
}

/// The restarts of one device process: how many fell in the last [`RESTART_WINDOW`], and
/// how many in all.
#[derive(Debug, Default)]
pub(super) struct RestartBudget {
    recent: Vec<Instant>,
    total: u64,
}

impl RestartBudget {
    /// Account for one more restart: the back-off to wait before it, or `None` when the
    /// process has crashed too often and must be marked failed.
    fn next(&mut self) -> Option<Duration> {
        let now = Instant::now();
        self.recent
            .retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        if self.recent.len() >= MAX_RESTARTS {
            return None;
        }
        let backoff = restart_backoff(self.recent.len());
        self.recent.push(now);
        self.total += 1;
        Some(backoff)
    }

    pub(super) fn total(&self) -> u64 {
        self.total
    }
}

/// The state of a device process, as `__org.vmm_query-device-processes` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    Running,
    /// Crashed too often, or broke the control protocol; the device no longer has a
    /// backend.
    Failed,
}

/// A virtio-blk disk served by a `vmm-blk` process.
struct BlockDevice {
    name: String,
    id: Option<String>,
    drive: String,
    /// The drive as configured, for query-block.
    drive_config: DriveConfig,
    /// The virtual size in bytes, as the process last reported it.
    size: u64,
    /// `/machine/peripheral/ID` or `/machine/peripheral-anon/device[N]`.
    qdev: String,
    slot: u8,
    /// The image and its backing chain, kept for a restarted process.
    image: OpenedImage,
    attach: AttachConfig,
    process: DeviceProcess,
    /// Kept open: the process exits when the vmm's end closes.
    control: BlkChannel,
    function: Arc<Mutex<VirtioPciDevice>>,
    state: ProcessState,
    /// An image of the chain is encrypted; the process refuses I/O until it has the key.
    encrypted: bool,
    /// The password given with block_passwd (kept to give it to a restarted process).
    password: Option<String>,
    /// query-block's io-status: set when an error policy stopped the VM for this disk.
    io_status: IoStatus,
    /// The control socket reached end of file (the process is going away).
    control_closed: bool,
    /// Unplugged: its process is being stopped on purpose, and is not to be restarted.
    removed: bool,
    restarts: RestartBudget,
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
    fn read(file: &std::fs::File, filename: &str, format: Format) -> ImageInfo {
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

/// One row of `__org.vmm_query-device-processes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    pub device: String,
    pub drive: String,
    pub program: &'static str,
    pub pid: u32,
    pub state: ProcessState,
    pub restarts: u64,
}

type SharedBlock = Arc<Mutex<BlockDevice>>;

/// The thread that watches every device process and restarts those that die.
struct Watcher {
    wake: EventFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// A device whose backend runs outside our supervision.
struct ExternalDevice {
    id: Option<String>,
    slot: u8,
    _function: Arc<Mutex<VirtioPciDevice>>,
}

/// Owner of the configured drives and of every device with a process behind it.
pub struct DeviceManager {
    /// Requests to the machine (an error policy stopping the VM).
    machine: MachineControl,
    /// `-chardev`s that devices may name.
    chardevs: Vec<(String, ChardevSpec)>,
    external: Vec<ExternalDevice>,
    accel: Arc<dyn Accelerator>,
    memory: GuestMemoryMmap,
    pci: Arc<Mutex<PciBus>>,
    /// Drives that no device has taken yet.
    drives: Vec<DriveConfig>,
    blocks: Arc<Mutex<Vec<SharedBlock>>>,
    /// virtio-scsi controllers and their CD-ROM drives.
    controllers: Arc<Mutex<Vec<SharedController>>>,
    events: Arc<Mutex<EventSender>>,
    watcher: Option<Watcher>,
    /// Devices created without an id so far (QEMU numbers them in its QOM paths).
    anonymous_devices: usize,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DeviceManager {
    pub fn new(
        accel: Arc<dyn Accelerator>,
        memory: GuestMemoryMmap,
        pci: Arc<Mutex<PciBus>>,
        machine: MachineControl,
    ) -> Self {
        DeviceManager {
            machine,
            chardevs: Vec::new(),
            external: Vec::new(),
            accel,
            memory,
            pci,
            drives: Vec::new(),
            blocks: Arc::new(Mutex::new(Vec::new())),
            controllers: Arc::new(Mutex::new(Vec::new())),
            events: Arc::new(Mutex::new(EventSender::default())),
            watcher: None,
            anonymous_devices: 0,
        }
    }

    /// Where device-process events go (the QMP monitor's sender).
    pub fn set_events(&self, events: EventSender) {
        *lock(&self.events) = events;
    }

    /// The `-chardev`s devices may refer to.
    pub fn set_chardevs(&mut self, chardevs: Vec<(String, ChardevSpec)>) {
        self.chardevs = chardevs;
    }

    pub fn has_device_id(&self, id: &str) -> bool {
        lock(&self.controllers).iter().any(|c| {
            let c = lock(c);
            c.id.as_deref() == Some(id) || c.luns.iter().any(|l| l.qdev_id == id)
        }) || lock(&self.blocks)
            .iter()
            .any(|b| lock(b).id.as_deref() == Some(id))
            || self.external.iter().any(|d| d.id.as_deref() == Some(id))
    }

    fn has_drive(&self, id: &str) -> bool {
        lock(&self.controllers)
            .iter()
            .any(|c| lock(c).luns.iter().any(|l| l.drive.id == id))
            || self.drives.iter().any(|d| d.id == id)
            || lock(&self.blocks).iter().any(|b| lock(b).drive == id)
    }

    /// QMP block_resize: grow drive `drive` to `size` bytes while the guest runs. The
    /// device process extends the image and the guest gets a configuration interrupt.
    pub fn resize_drive(&self, drive: &str, size: u64) -> Result<u64, DeviceError> {
        let block = lock(&self.blocks)
            .iter()
            .find(|b| lock(b).drive == drive)
            .cloned();
        if let Some(block) = block {
            let mut b = lock(&block);
            if b.state == ProcessState::Failed {
                return Err(DeviceError::Resize(format!(
                    "the process serving '{drive}' has failed"
                )));
            }
            let name = b.name.clone();
            let reply = b
                .control
                .call(BlkRequest::Resize { size }, &[], SETUP_TIMEOUT)
                .map_err(|e| match e {
                    ipc::IpcError::Remote(r) => DeviceError::Resize(r.0),
                    source => DeviceError::Ipc { name, source },
                })?;
            return match reply.0 {
                BlkReply::Resized { size } => {
                    // The process does not speak the backend channel: the driver hears of
                    // the new size from us.
                    b.size = size;
                    let function = b.function.clone();
                    drop(b);
                    config_changed(&name_of(&block), &function);
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
        let block = lock(&self.blocks)
            .iter()
            .find(|b| lock(b).drive == drive)
            .cloned();
        let Some(block) = block else {
            return Err(if self.drives.iter().any(|d| d.id == drive) {
                DeviceError::Snapshot(format!("Device '{drive}' has no device using it"))
            } else {
                DeviceError::NoSuchDrive(drive.to_string())
            });
        };
        let mut b = lock(&block);
        if b.state == ProcessState::Failed {
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
        let name = b.name.clone();
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
        self.drives.len() + lock(&self.blocks).len()
    }

    /// The first disk that is encrypted and has no key yet: its drive and file (`cont`
    /// refuses to run the guest until block_passwd gave every key).
    pub fn missing_key(&self) -> Option<(String, String)> {
        lock(&self.blocks).iter().find_map(|b| {
            let b = lock(b);
            (b.encrypted && b.password.is_none()).then(|| (b.drive.clone(), b.image.path.clone()))
        })
    }

    /// QMP block_passwd: give an encrypted disk its key.
    pub fn set_password(&self, drive: &str, password: &str) -> Result<(), DeviceError> {
        let block = lock(&self.blocks)
            .iter()
            .find(|b| lock(b).drive == drive)
            .cloned()
            .ok_or_else(|| DeviceError::DriveNotFoundForCommand(drive.to_string()))?;
        let mut b = lock(&block);
        if !b.encrypted {
            return Err(DeviceError::NotEncrypted(drive.to_string()));
        }
        let name = b.name.clone();
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
        for block in lock(&self.blocks).iter() {
            let mut b = lock(block);
            if b.io_status == IoStatus::Ok || b.state != ProcessState::Running {
                b.io_status = IoStatus::Ok;
                continue;
            }
            b.io_status = IoStatus::Ok;
            match b.control.call(BlkRequest::Resume, &[], SETUP_TIMEOUT) {
                Ok((BlkReply::Resumed { retried }, _)) => {
                    tracing::info!(device = %b.name, retried, "held requests carried out again");
                }
                Ok((other, _)) => {
                    tracing::warn!(device = %b.name, "answered Resume with {other:?}")
                }
                Err(e) => tracing::warn!(device = %b.name, "cannot resume its requests: {e}"),
            }
        }
    }

    /// I/O statistics of every drive, in query-block's order: counted by the device
    /// processes (fetched over their control channels); a drive nobody serves did no I/O.
    pub fn block_stats(&self) -> Vec<(String, Option<String>, ipc::blk::BlockStats)> {
        let mut out = Vec::new();
        for block in lock(&self.blocks).iter() {
            let mut b = lock(block);
            let stats = if b.state == ProcessState::Running {
                match b.control.call(BlkRequest::Stats, &[], SETUP_TIMEOUT) {
                    Ok((BlkReply::Stats(s), _)) => s,
                    Ok((other, _)) => {
                        tracing::warn!(device = %b.name, "answered Stats with {other:?}");
                        ipc::blk::BlockStats::default()
                    }
                    Err(e) => {
                        tracing::warn!(device = %b.name, "statistics: {e}");
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
            lock(&self.blocks)
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

    /// Every device process, for `__org.vmm_query-device-processes`.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        let controllers: Vec<ProcessInfo> = lock(&self.controllers)
            .iter()
            .map(|c| {
                let c = lock(c);
                ProcessInfo {
                    device: c.id.clone().unwrap_or_else(|| c.name.clone()),
                    drive: c
                        .luns
                        .iter()
                        .map(|l| l.drive.id.clone())
                        .collect::<Vec<_>>()
                        .join(","),
                    program: "vmm-scsi",
                    pid: c.process.pid(),
                    state: if c.failed {
                        ProcessState::Failed
                    } else {
                        ProcessState::Running
                    },
                    restarts: c.restarts.total(),
                }
            })
            .collect();
        let mut blocks: Vec<ProcessInfo> = lock(&self.blocks)
            .iter()
            .map(|b| {
                let b = lock(b);
                ProcessInfo {
                    device: b.id.clone().unwrap_or_else(|| b.name.clone()),
                    drive: b.drive.clone(),
                    program: "vmm-blk",
                    pid: b.process.pid(),
                    state: b.state,
                    restarts: b.restarts.total(),
                }
            })
            .collect();
        blocks.extend(controllers);
        blocks
    }

    fn ensure_watcher(&mut self) -> Result<(), DeviceError> {
        if let Some(w) = &self.watcher {
            let _ = w.wake.write(1);
            return Ok(());
        }
        let io = |e: std::io::Error| {
            DeviceError::Supervisor(SupervisorError::Sockets("watcher".into(), e))
        };
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(io)?;
        let stop = Arc::new(AtomicBool::new(false));
        let context = WatchContext {
            blocks: self.blocks.clone(),
            controllers: self.controllers.clone(),
            events: self.events.clone(),
            machine: self.machine.clone(),
            wake: wake.try_clone().map_err(io)?,
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("device-watch".into())
            .spawn(move || context.run())
            .map_err(io)?;
        self.watcher = Some(Watcher {
            wake,
            stop,
            thread: Some(thread),
        });
        Ok(())
    }

    /// Add a drive; `if=virtio` also creates its device.
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

    /// The PCI slot of the device with id `id` (device_del).
    pub fn slot_of(&self, id: &str) -> Option<u8> {
        lock(&self.blocks)
            .iter()
            .map(|b| lock(b))
            .find(|b| b.id.as_deref() == Some(id))
            .map(|b| b.slot)
            .or_else(|| {
                lock(&self.controllers)
                    .iter()
                    .map(|c| lock(c))
                    .find(|c| c.id.as_deref() == Some(id))
                    .map(|c| c.slot)
            })
            .or_else(|| {
                self.external
                    .iter()
                    .find(|e| e.id.as_deref() == Some(id))
                    .map(|e| e.slot)
            })
    }

    /// The guest ejected the function in `slot`: unplug it, stop its process, and release
    /// its drive (in QEMU 1.1 the drive goes with the device). The device's id and QOM
    /// path, for DEVICE_DELETED.
    pub fn remove_slot(&mut self, slot: u8) -> Option<(Option<String>, String)> {
        let removed = {
            let mut blocks = lock(&self.blocks);
            blocks
                .iter()
                .position(|b| lock(b).slot == slot)
                .map(|i| blocks.remove(i))
        };
        let _ = lock(&self.pci).remove_device(slot);
        if let Some(block) = removed {
            let mut b = lock(&block);
            // The watcher may hold this device from before: it must see the exit as ours.
            b.removed = true;
            b.process.terminate(STOP_GRACE);
            let path = b.qdev.trim_end_matches("/virtio-backend").to_string();
            return Some((b.id.clone(), path));
        }
        let controller = {
            let mut controllers = lock(&self.controllers);
            controllers
                .iter()
                .position(|c| lock(c).slot == slot)
                .map(|i| controllers.remove(i))
        };
        if let Some(c) = controller {
            let mut c = lock(&c);
            c.removed = true;
            c.process.terminate(STOP_GRACE);
            let path = c.id.as_deref().map_or(String::new(), peripheral_path);
            return Some((c.id.clone(), path));
        }
        let i = self.external.iter().position(|e| e.slot == slot)?;
        let e = self.external.remove(i);
        let path = e.id.as_deref().map_or(String::new(), peripheral_path);
        Some((e.id, path))
    }

    /// The QOM path QEMU gives a `-device`/`device_add`: by its id, or numbered among the
    /// devices created without one.
    fn qom_path(&mut self, id: Option<&str>) -> String {
        match id {
            Some(id) => peripheral_path(id),
            None => {
                let n = self.anonymous_devices;
                self.anonymous_devices += 1;
                format!("/machine/peripheral-anon/device[{n}]")
            }
        }
    }

    /// The device in PCI slot `slot`, as QEMU names an occupant: `driver,id=ID`.
    fn occupant(&self, slot: u8) -> Option<String> {
        let name = |driver: &str, id: &Option<String>| {
            format!("{driver},id={}", id.as_deref().unwrap_or("(null)"))
        };
        lock(&self.blocks)
            .iter()
            .map(|b| lock(b))
            .find(|b| b.slot == slot)
            .map(|b| name("virtio-blk-pci", &b.id))
            .or_else(|| {
                lock(&self.controllers)
                    .iter()
                    .map(|c| lock(c))
                    .find(|c| c.slot == slot)
                    .map(|c| name("virtio-scsi-pci", &c.id))
            })
            .or_else(|| {
                self.external
                    .iter()
                    .find(|e| e.slot == slot)
                    .map(|e| name("vhost-user-blk-pci", &e.id))
            })
    }

    /// Create the device `cfg` describes and plug it in; the PCI slot it took, if it is a
    /// PCI function.
    pub fn add_device(&mut self, cfg: &DeviceConfig) -> Result<Option<u8>, DeviceError> {
        if let Ok(Some(slot)) = cfg.pci_slot() {
            if let Some(occupant) = self.occupant(slot) {
                return Err(DeviceError::SlotTaken {
                    slot,
                    driver: cfg.driver.clone(),
                    occupant,
                });
            }
        }
        if let Some(id) = &cfg.id {
            if self.has_device_id(id) {
                return Err(DeviceError::DuplicateId(id.clone()));
            }
        }
        match cfg.driver.as_str() {
            "virtio-blk-pci" => self.add_virtio_blk(cfg),
            "vhost-user-blk-pci" => self.add_vhost_user_blk(cfg),
            "virtio-scsi-pci" => self.add_virtio_scsi(cfg),
            "scsi-cd" => self.add_scsi_cd(cfg),
            other => Err(DeviceError::UnknownDriver(other.to_string())),
        }
    }

    fn add_virtio_blk(&mut self, cfg: &DeviceConfig) -> Result<Option<u8>, DeviceError> {
        let drive_id = cfg.properties.get("drive").ok_or(DeviceError::NoDrive)?;
        let slot = cfg.pci_slot()?;
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
        let image = drive::open_drive(&drive)?;
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
        let backend = VhostUserDevice::connect(
            &name,
            VIRTIO_ID_BLOCK,
            stream,
            usize::from(num_queues),
            queue_size,
            VIRTIO_BLK_CONFIG_SIZE,
            self.memory.clone(),
        )?;
        let (slot, function) = self.plug_vhost_user(&name, cfg.id.clone(), slot, backend)?;
        self.drives.remove(index);
        let qdev = format!("{}/virtio-backend", self.qom_path(cfg.id.as_deref()));
        lock(&self.blocks).push(Arc::new(Mutex::new(BlockDevice {
            name,
            id: cfg.id.clone(),
            drive: drive.id.clone(),
            drive_config: drive,
            size,
            qdev,
            slot,
            image,
            attach,
            process,
            control,
            function,
            state: ProcessState::Running,
            encrypted,
            password: None,
            io_status: IoStatus::Ok,
            control_closed: false,
            removed: false,
            restarts: RestartBudget::default(),
        })));
        self.ensure_watcher()?;
        Ok(Some(slot))
    }

    fn add_vhost_user_blk(&mut self, cfg: &DeviceConfig) -> Result<Option<u8>, DeviceError> {
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
        let slot = cfg.pci_slot()?;
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
        let (slot, function) = self.plug_vhost_user(&name, cfg.id.clone(), slot, backend)?;
        self.external.push(ExternalDevice {
            id: cfg.id.clone(),
            slot,
            _function: function,
        });
        Ok(Some(slot))
    }

    /// Put a virtio-pci function for a vhost-user block `backend` on the bus (in `slot`, or
    /// the first free one), with the backend's configuration changes reaching the guest.
    fn plug_vhost_user(
        &mut self,
        name: &str,
        id: Option<String>,
        slot: Option<u8>,
        backend: VhostUserDevice,
    ) -> Result<(u8, Arc<Mutex<VirtioPciDevice>>), DeviceError> {
        let notifier = backend.config_notifier();
        let function = Arc::new(Mutex::new(VirtioPciDevice::new(
            name,
            id,
            Box::new(backend),
            self.accel.clone(),
            self.memory.clone(),
            CLASS_STORAGE_SCSI,
        )?));
        let weak = Arc::downgrade(&function);
        let device = name.to_string();
        notifier.set(Arc::new(move || {
            if let Some(function) = weak.upgrade() {
                config_changed(&device, &function);
            }
        }));
        let slot =
            lock(&self.pci).add_device(slot, function.clone() as Arc<Mutex<dyn PciDevice>>)?;
        Ok((slot, function))
    }

    fn add_virtio_scsi(&mut self, cfg: &DeviceConfig) -> Result<Option<u8>, DeviceError> {
        let slot = cfg.pci_slot()?;
        let num_queues = scsi::number(cfg, "num_queues")?.unwrap_or(1).clamp(1, 16);
        let queue_size = scsi::number(cfg, "virtqueue_size")?.unwrap_or(128);
        if !queue_size.is_power_of_two() || !(2..=1024).contains(&queue_size) {
            return Err(DeviceError::InvalidProperty {
                driver: cfg.driver.clone(),
                property: "virtqueue_size".into(),
                value: queue_size.to_string(),
            });
        }
        let index = lock(&self.controllers).len();
        let label = cfg.id.clone().unwrap_or_else(|| format!("scsi{index}"));
        let name = format!("vmm-scsi[{label}]");
        let (process, control) = scsi::start_controller(&name, num_queues, queue_size)?;
        let stream = process.connect_vhost_user()?;
        let backend = VhostUserDevice::connect(
            &name,
            scsi::VIRTIO_ID_SCSI,
            stream,
            scsi::FIXED_QUEUES + usize::from(num_queues),
            queue_size,
            scsi::VIRTIO_SCSI_CONFIG_SIZE,
            self.memory.clone(),
        )?;
        let (slot, function) = self.plug_vhost_user(&name, cfg.id.clone(), slot, backend)?;
        tracing::info!(device = %name, pid = process.pid(), "SCSI controller");
        lock(&self.controllers).push(scsi::shared(ScsiController {
            id: cfg.id.clone(),
            name,
            slot,
            process,
            control,
            _function: function,
            luns: Vec::new(),
            num_queues,
            queue_size,
            control_closed: false,
            removed: false,
            failed: false,
            restarts: RestartBudget::default(),
        }));
        self.ensure_watcher()?;
        Ok(Some(slot))
    }

    fn add_scsi_cd(&mut self, cfg: &DeviceConfig) -> Result<Option<u8>, DeviceError> {
        let drive_id = cfg.properties.get("drive").ok_or(DeviceError::NoDrive)?;
        let controller = {
            let controllers = lock(&self.controllers);
            match cfg.properties.get("bus") {
                Some(bus) => {
                    let wanted = scsi::controller_of_bus(bus);
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
        let lun = scsi::number(cfg, "lun")?.unwrap_or(0);
        let mut c = lock(&controller);
        let target = match scsi::number(cfg, "scsi-id")? {
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
        lock(&self.controllers)
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
    fn cd_info(&self) -> Vec<BlockInfo> {
        let mut out = Vec::new();
        for c in lock(&self.controllers).iter() {
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

    /// A machine reset: every virtio function back to its power-on state (its backend
    /// stops its queues), and the CD drives unlocked with their trays closed, as QEMU's
    /// device reset does.
    pub fn reset(&self) {
        for b in lock(&self.blocks).iter() {
            let function = lock(b).function.clone();
            lock(&function).system_reset();
        }
        for c in lock(&self.controllers).iter() {
            let mut c = lock(c);
            lock(&c._function).system_reset();
            if !c.failed {
                c.reset_luns();
            }
        }
        for e in &self.external {
            lock(&e._function).system_reset();
        }
    }

    /// Stop every device process (at quit).
    pub fn shutdown(&mut self) {
        if let Some(mut w) = self.watcher.take() {
            w.stop.store(true, Ordering::SeqCst);
            let _ = w.wake.write(1);
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        let controllers: Vec<SharedController> = lock(&self.controllers).drain(..).collect();
        for c in controllers {
            let mut c = lock(&c);
            if let Ok(mut pci) = self.pci.try_lock() {
                let _ = pci.remove_device(c.slot);
            }
            c.process.terminate(STOP_GRACE);
        }
        for device in self.external.drain(..) {
            if let Ok(mut pci) = self.pci.try_lock() {
                let _ = pci.remove_device(device.slot);
            }
        }
        let blocks: Vec<SharedBlock> = lock(&self.blocks).drain(..).collect();
        for block in blocks {
            let mut block = lock(&block);
            if let Ok(mut pci) = self.pci.try_lock() {
                let _ = pci.remove_device(block.slot);
            }
            block.process.terminate(STOP_GRACE);
        }
    }
}

/// The QOM path of a device with id `id`.
fn peripheral_path(id: &str) -> String {
    format!("/machine/peripheral/{id}")
}

/// The backend's configuration changed: read it again and interrupt the driver.
fn config_changed(device: &str, function: &Mutex<VirtioPciDevice>) {
    let mut function = lock(function);
    if let Some(backend) = function.backend_mut().as_vhost_user() {
        if let Err(e) = backend.refresh_config() {
            tracing::warn!(device = %device, "configuration change: {e}");
        }
    }
    function.config_changed();
}

fn name_of(block: &SharedBlock) -> String {
    lock(block).name.clone()
}

/// Start a `vmm-blk` process and give it `image`: the process, its control channel and the
/// image size.
fn start_blk_process(
    name: &str,
    image: &OpenedImage,
    attach: &AttachConfig,
) -> Result<(DeviceProcess, BlkChannel, u64, bool), DeviceError> {
    let program = supervisor::device_program("vmm-blk")?;
    let mut process = DeviceProcess::spawn(name, &program, &[])?;
    let ipc_err = |source| DeviceError::Ipc {
        name: name.to_string(),
        source,
    };
    let control_sock = process
        .control
        .try_clone()
        .map_err(|e| ipc_err(ipc::IpcError::Socket(e)))?;
    let mut control = BlkChannel::new(control_sock);
    control
        .hello(DeviceKind::Block, DeviceKind::Block, SETUP_TIMEOUT)
        .map_err(|e| setup_failure(&mut process, e))?;
    let fds: Vec<_> = image.files().into_iter().map(|f| f.as_fd()).collect();
    let request = BlkRequest::AttachChain {
        config: attach.clone(),
        chain: image.chain(),
    };
    let (reply, _) = control
        .call(request, &fds, SETUP_TIMEOUT)
        .map_err(ipc_err)?;
    match reply {
        BlkReply::Attached { size, encrypted } => Ok((process, control, size, encrypted)),
        other => Err(ipc_err(ipc::IpcError::Remote(ipc::RemoteError(format!(
            "answered Attach with {other:?}"
        ))))),
    }
}

/// Why a device process failed its handshake: its exit, if it died (a clearer reason than
/// the reset connection), else the IPC error.
pub(crate) fn setup_failure(process: &mut DeviceProcess, source: ipc::IpcError) -> DeviceError {
    match process.wait_exit(Duration::from_millis(200)) {
        Some(status) => DeviceError::ExitedDuringSetup {
            name: process.name().to_string(),
            status,
        },
        None => DeviceError::Ipc {
            name: process.name().to_string(),
            source,
        },
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_options() {
        let d = parse_device("virtio-blk-pci,drive=d0,id=disk0,addr=0x5,num-queues=2").unwrap();
        assert_eq!(d.driver, "virtio-blk-pci");
        assert_eq!(d.id.as_deref(), Some("disk0"));
        assert_eq!(d.pci_slot().unwrap(), Some(5));
        assert_eq!(d.number::<u16>("num-queues").unwrap(), Some(2));
        assert_eq!(
            parse_device("e1000").unwrap_err().to_string(),
            "'e1000' is not a valid device model name"
        );
        assert_eq!(
            parse_device("virtio-blk-pci,foo=1")
                .unwrap_err()
                .to_string(),
            "Property 'virtio-blk-pci.foo' not found"
        );
        let bad = parse_device("virtio-blk-pci,drive=d,addr=0x40").unwrap();
        assert!(bad.pci_slot().is_err());
        let bus = parse_device("virtio-blk-pci,drive=d,bus=pci.1").unwrap();
        assert_eq!(
            bus.pci_slot().unwrap_err().to_string(),
            "Bus 'pci.1' not found"
        );
        let n = parse_device("virtio-blk-pci,num-queues=x").unwrap();
        assert!(n.number::<u16>("num-queues").is_err());
    }
}
