//! The devices that `-device` (and `device_add`) creates, and what each one owns: its PCI
//! function, and for a device served by another process, that process and its control
//! channel. Drives (`-drive`) wait here until a device takes them.
//!
//! One module per kind of device ([`block`], [`scsi`]); the life of their processes
//! (spawn, hello, vhost-user replay, watch, restart budget, teardown) has one home,
//! [`process`], driven by the [`watcher`] thread for every kind alike. [`DRIVERS`] is the
//! table of device models, their properties and the function that adds each.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::memory::GuestMemoryMmap;
use qmp::EventSender;

use crate::accel::Accelerator;
use crate::chardev::ChardevSpec;
use crate::control::MachineControl;
use crate::drive::{DriveConfig, DriveError};
use crate::pci::{PciBus, PciDevice, PciError};
use crate::snapshot::Snapshottable;
use crate::supervisor::SupervisorError;
use crate::virtio::pci::{VirtioPciDevice, VirtioPciError, MAX_MSIX_VECTORS};
use crate::virtio::vhost_user::{ConfigNotifier, LogShare, VhostUserError};
use crate::virtio::VirtioBackend;

mod balloon;
mod block;
mod block_migration;
mod config;
mod display;
mod local;
mod net;
mod process;
mod qom;
mod scsi;
mod watcher;

pub use balloon::NO_BALLOON;
use block::SharedBlock;
pub use block::{BlockInfo, ImageInfo, IoStatus, RemovableState};
pub use config::{device_config_from_qmp, parse_device, DeviceConfig};
pub use net::{parse_mac, EVENT_NETDEV_STATE_LOST};
use process::SharedSupervised;
pub use process::{
    ProcessInfo, ProcessState, EVENT_PROCESS_EXITED, EVENT_PROCESS_FAILED,
    EVENT_PROCESS_MISBEHAVED, EVENT_PROCESS_RESTARTED,
};
pub use qom::QomError;
use scsi::SharedController;
use watcher::Watcher;

/// How long a device process may take to answer its setup.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a device process gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(3);
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
    /// QMP's DeviceNotFound (netdev_del, set_link).
    #[error("Device '{0}' not found")]
    NotFound(String),
    /// A network error in QEMU's words.
    #[error("{0}")]
    Net(String),
    #[error("Device '{0}' is not encrypted")]
    NotEncrypted(String),
    #[error("{0}")]
    Medium(String),
    #[error("{0}")]
    NoBus(String),
    /// The display and VNC, in QEMU's words.
    #[error("{0}")]
    Display(String),
    #[error("{0}")]
    Balloon(String),
    /// Block migration, in words for the migrate command or the incoming stream.
    #[error("{0}")]
    Migration(String),
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

/// How a device model is added.
type AddFn = fn(&mut DeviceManager, &DeviceConfig) -> Result<Option<u8>, DeviceError>;

/// A device model: its name, the properties it accepts besides `id`, `bus` and `addr`,
/// and what adds one (returning the PCI slot it took, if it is a PCI function).
pub struct Driver {
    pub name: &'static str,
    pub properties: &'static [&'static str],
    add: AddFn,
}

/// The device models we know.
pub const DRIVERS: &[Driver] = &[
    Driver {
        name: "virtio-blk-pci",
        properties: &["drive", "num-queues", "queue-size", "serial", "bootindex"],
        add: DeviceManager::add_virtio_blk,
    },
    // A vhost-user-blk backend we did not start (qemu-storage-daemon, say), reached
    // through a `-chardev socket`.
    Driver {
        name: "vhost-user-blk-pci",
        properties: &["chardev", "num-queues", "queue-size", "bootindex"],
        add: DeviceManager::add_vhost_user_blk,
    },
    // A SCSI host adapter served by vmm-scsi, and CD-ROM drives on its bus.
    Driver {
        name: "virtio-scsi-pci",
        properties: &["num_queues", "virtqueue_size"],
        add: DeviceManager::add_virtio_scsi,
    },
    Driver {
        name: "virtio-net-pci",
        properties: &[
            "netdev",
            "mac",
            "mq",
            "vectors",
            "romfile",
            "bootindex",
            "disable-legacy",
            "disable-modern",
            "rx_queue_size",
            "tx_queue_size",
        ],
        add: DeviceManager::add_virtio_net,
    },
    Driver {
        name: "virtio-tablet-pci",
        properties: &["disable-legacy", "disable-modern"],
        add: DeviceManager::add_virtio_input,
    },
    Driver {
        name: "virtio-keyboard-pci",
        properties: &["disable-legacy", "disable-modern"],
        add: DeviceManager::add_virtio_input,
    },
    Driver {
        name: "virtio-mouse-pci",
        properties: &["disable-legacy", "disable-modern"],
        add: DeviceManager::add_virtio_input,
    },
    Driver {
        name: "virtio-balloon-pci",
        properties: &[
            "deflate-on-oom",
            "free-page-reporting",
            "guest-stats-polling-interval",
            "disable-legacy",
            "disable-modern",
        ],
        add: DeviceManager::add_virtio_balloon,
    },
    Driver {
        name: "bochs-display",
        properties: &["vgamem"],
        add: DeviceManager::add_bochs_display,
    },
    Driver {
        name: "scsi-cd",
        properties: &["drive", "scsi-id", "lun", "channel", "serial", "bootindex"],
        add: DeviceManager::add_scsi_cd,
    },
];

/// The model named `name`.
pub fn driver(name: &str) -> Option<&'static Driver> {
    DRIVERS.iter().find(|d| d.name == name)
}

/// A PCI function on the bus, as device_del and slot conflicts name it.
struct PluggedFunction {
    driver: String,
    id: Option<String>,
    function: PciFunction,
}

/// The kinds of function we plug.
enum PciFunction {
    Virtio(Arc<Mutex<VirtioPciDevice>>),
    Display(Arc<Mutex<crate::devices::bochs_display::BochsDisplay>>),
}

impl PciFunction {
    /// Back to the power-on state (a machine reset).
    fn reset(&self) {
        match self {
            PciFunction::Virtio(f) => lock(f).system_reset(),
            PciFunction::Display(d) => lock(d).reset(),
        }
    }
}

/// Owner of the configured drives and of every device with a process behind it.
pub struct DeviceManager {
    /// Requests to the machine (an error policy stopping the VM).
    machine: MachineControl,
    /// `-chardev`s that devices may name.
    chardevs: Vec<(String, ChardevSpec)>,
    accel: Arc<dyn Accelerator>,
    memory: GuestMemoryMmap,
    pci: Arc<Mutex<PciBus>>,
    /// Every function we plugged, by slot.
    functions: BTreeMap<u8, PluggedFunction>,
    /// Drives that no device has taken yet.
    drives: Vec<DriveConfig>,
    blocks: Vec<SharedBlock>,
    /// virtio-scsi controllers and their CD-ROM drives.
    controllers: Vec<SharedController>,
    /// Netdevs and network cards.
    network: net::Network,
    /// The display adapter, the VNC server and their process.
    display: display::Display,
    /// The memory balloon.
    balloon: Option<balloon::Balloon>,
    /// Every device with a process, of whatever kind, for the watcher.
    supervised: Arc<Mutex<Vec<SharedSupervised>>>,
    events: Arc<Mutex<EventSender>>,
    watcher: Option<Watcher>,
    /// Devices created without an id so far (QEMU numbers them in its QOM paths).
    anonymous_devices: usize,
    /// Disks are opened without their locks (a migration's destination).
    images_inactive: bool,
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
            accel,
            memory,
            pci,
            functions: BTreeMap::new(),
            drives: Vec::new(),
            blocks: Vec::new(),
            controllers: Vec::new(),
            network: net::Network::default(),
            display: display::Display::default(),
            balloon: None,
            supervised: Arc::new(Mutex::new(Vec::new())),
            events: Arc::new(Mutex::new(EventSender::default())),
            watcher: None,
            anonymous_devices: 0,
            images_inactive: false,
        }
    }

    /// Open disks without their locks from now on (a migration's destination takes them
    /// at the switchover: [`DeviceManager::activate_images`]).
    pub fn set_images_inactive(&mut self, inactive: bool) {
        self.images_inactive = inactive;
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
        self.functions.values().any(|f| f.id.as_deref() == Some(id))
            || self
                .controllers
                .iter()
                .any(|c| lock(c).luns.iter().any(|l| l.qdev_id == id))
    }

    /// Every device process, for `__org.vmm_query-device-processes`: disks first, then
    /// the other kinds.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        lock(&self.supervised)
            .iter()
            .map(|d| {
                let d = lock(d);
                d.supervision().info(d.serves())
            })
            .collect()
    }

    /// Watch `device`'s process from now on (the watcher starts with the first one).
    fn supervise(&mut self, device: SharedSupervised) -> Result<(), DeviceError> {
        lock(&self.supervised).push(device);
        match &self.watcher {
            Some(w) => w.wake(),
            None => {
                let watcher = Watcher::start(
                    self.supervised.clone(),
                    self.events.clone(),
                    self.machine.clone(),
                )
                .map_err(|e| SupervisorError::Sockets("watcher".into(), e))?;
                self.watcher = Some(watcher);
            }
        }
        Ok(())
    }

    /// Stop watching `device` and stop its process (unplugged, or at exit).
    fn unsupervise(&self, device: &SharedSupervised) {
        lock(&self.supervised).retain(|d| !Arc::ptr_eq(d, device));
        lock(device).supervision_mut().stop();
    }

    /// The PCI slot of the device with id `id` (device_del).
    pub fn slot_of(&self, id: &str) -> Option<u8> {
        self.functions
            .iter()
            .find(|(_, f)| f.id.as_deref() == Some(id))
            .map(|(slot, _)| *slot)
    }

    /// The guest ejected the function in `slot`: unplug it, stop its process, and release
    /// its drive (in QEMU 1.1 the drive goes with the device). The device's id and QOM
    /// path, for DEVICE_DELETED.
    pub fn remove_slot(&mut self, slot: u8) -> Option<(Option<String>, String)> {
        let plugged = self.functions.remove(&slot)?;
        let _ = lock(&self.pci).remove_device(slot);
        let path = if let Some(i) = self.blocks.iter().position(|b| lock(b).slot == slot) {
            let block = self.blocks.remove(i);
            let path = lock(&block).qdev_path();
            self.unsupervise(&(block as SharedSupervised));
            path
        } else if let Some((_, path)) = self.remove_nic(slot) {
            path
        } else if matches!(
            plugged.driver.as_str(),
            "virtio-tablet-pci" | "virtio-keyboard-pci" | "virtio-mouse-pci"
        ) {
            self.remove_input(slot);
            plugged.id.as_deref().map_or(String::new(), peripheral_path)
        } else if plugged.driver == "virtio-balloon-pci" {
            self.remove_balloon(slot);
            plugged.id.as_deref().map_or(String::new(), peripheral_path)
        } else if let Some(i) = self.controllers.iter().position(|c| lock(c).slot == slot) {
            let controller = self.controllers.remove(i);
            self.unsupervise(&(controller as SharedSupervised));
            plugged.id.as_deref().map_or(String::new(), peripheral_path)
        } else {
            plugged.id.as_deref().map_or(String::new(), peripheral_path)
        };
        Some((plugged.id, path))
    }

    /// Why the plugged devices cannot move with a live migration yet, naming each.
    pub fn migration_blockers(&self) -> Vec<String> {
        self.functions
            .values()
            .filter_map(|f| {
                let name = f.id.as_deref().unwrap_or(&f.driver);
                let why = match &f.function {
                    PciFunction::Virtio(v) => lock(v).migration_blocker(),
                    PciFunction::Display(_) => None,
                };
                why.map(|why| format!("{name}: {why}"))
            })
            .collect()
    }

    /// The PCI functions, as sections of a migration: `pci SLOT DRIVER [ID]`.
    pub fn migration_sections(&self) -> Vec<(String, Arc<Mutex<dyn Snapshottable>>)> {
        self.functions
            .iter()
            .map(|(slot, f)| {
                let mut name = format!("pci {slot} {}", f.driver);
                if let Some(id) = &f.id {
                    name.push(' ');
                    name.push_str(id);
                }
                let state = match &f.function {
                    PciFunction::Virtio(v) => v.clone() as Arc<Mutex<dyn Snapshottable>>,
                    PciFunction::Display(d) => self.display_section(d),
                };
                (name, state)
            })
            .collect()
    }

    /// Every vhost-user backend logs its writes into `log` (None: stops).
    pub fn set_dirty_logging(&self, log: Option<&LogShare>) -> Result<(), String> {
        for f in self.functions.values() {
            if let PciFunction::Virtio(v) = &f.function {
                if let Some(vhost) = lock(v).backend_mut().as_vhost_user() {
                    vhost.set_logging(log.cloned()).map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// A migration failed after the devices' state was saved: their queues run again.
    pub fn resume_after_migration(&self) {
        for f in self.functions.values() {
            if let PciFunction::Virtio(v) = &f.function {
                lock(v).resume_after_save();
            }
        }
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

    /// Create the device `cfg` describes and plug it in; the PCI slot it took, if it is a
    /// PCI function.
    pub fn add_device(&mut self, cfg: &DeviceConfig) -> Result<Option<u8>, DeviceError> {
        let driver =
            driver(&cfg.driver).ok_or_else(|| DeviceError::UnknownDriver(cfg.driver.clone()))?;
        if let Ok(Some(slot)) = cfg.pci_slot() {
            if let Some(f) = self.functions.get(&slot) {
                return Err(DeviceError::SlotTaken {
                    slot,
                    driver: cfg.driver.clone(),
                    // QEMU names an occupant `driver,id=ID`.
                    occupant: format!("{},id={}", f.driver, f.id.as_deref().unwrap_or("(null)")),
                });
            }
        }
        if let Some(id) = &cfg.id {
            if self.has_device_id(id) {
                return Err(DeviceError::DuplicateId(id.clone()));
            }
        }
        (driver.add)(self, cfg)
    }

    /// Put a virtio-pci function for `backend` on the bus (in `slot`, or the first free
    /// one), with the backend's configuration changes (if it reports any) reaching the
    /// guest.
    fn plug_virtio(
        &mut self,
        cfg: &DeviceConfig,
        name: &str,
        backend: Box<dyn VirtioBackend>,
        class: (u8, u8),
        notifier: Option<Arc<ConfigNotifier>>,
    ) -> Result<(u8, Arc<Mutex<VirtioPciDevice>>), DeviceError> {
        let slot = cfg.pci_slot()?;
        let vectors = match cfg.number::<u32>("vectors")? {
            Some(n) if n > u32::from(MAX_MSIX_VECTORS) => {
                // QEMU's words; the function goes on without MSI-X, as there.
                eprintln!("warning: unable to init msix vectors to {n}");
                Some(0)
            }
            n => n.map(|n| n as u16),
        };
        let function = Arc::new(Mutex::new(VirtioPciDevice::new(
            name,
            cfg.id.clone(),
            backend,
            self.accel.clone(),
            self.memory.clone(),
            class,
            vectors,
        )?));
        if let Some(notifier) = notifier {
            let weak = Arc::downgrade(&function);
            let device = name.to_string();
            notifier.set(Arc::new(move || {
                if let Some(function) = weak.upgrade() {
                    config_changed(&device, &function);
                }
            }));
        }
        let slot =
            lock(&self.pci).add_device(slot, function.clone() as Arc<Mutex<dyn PciDevice>>)?;
        self.functions.insert(
            slot,
            PluggedFunction {
                driver: cfg.driver.clone(),
                id: cfg.id.clone(),
                function: PciFunction::Virtio(function.clone()),
            },
        );
        Ok((slot, function))
    }

    /// [`DeviceManager::plug_virtio`] for a vhost-user backend.
    fn plug_vhost_user(
        &mut self,
        cfg: &DeviceConfig,
        name: &str,
        backend: crate::virtio::vhost_user::VhostUserDevice,
        class: (u8, u8),
    ) -> Result<(u8, Arc<Mutex<VirtioPciDevice>>), DeviceError> {
        let notifier = backend.config_notifier();
        self.plug_virtio(cfg, name, Box::new(backend), class, Some(notifier))
    }

    /// A machine reset: every virtio function back to its power-on state (its backend
    /// stops its queues), and the CD drives unlocked with their trays closed, as QEMU's
    /// device reset does.
    pub fn reset(&self) {
        for f in self.functions.values() {
            f.function.reset();
        }
        for c in &self.controllers {
            let mut c = lock(c);
            if c.supervision.running() {
                c.reset_luns();
            }
        }
    }

    /// Stop every device process (at quit).
    pub fn shutdown(&mut self) {
        self.watcher = None;
        let devices: Vec<SharedSupervised> = lock(&self.supervised).drain(..).collect();
        if let Ok(mut pci) = self.pci.try_lock() {
            for slot in self.functions.keys() {
                let _ = pci.remove_device(*slot);
            }
        }
        self.functions.clear();
        self.controllers.clear();
        self.blocks.clear();
        for d in devices {
            lock(&d).supervision_mut().stop();
        }
        self.shutdown_network();
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

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}
