//! The devices that `-device` (and later `device_add`) creates, and what each one owns: its
//! PCI function, and for a device served by another process, that process and its control
//! channel. Drives (`-drive`) wait here until a device takes them.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipc::blk::{AttachConfig, BlkChannel, BlkReply, BlkRequest};
use ipc::DeviceKind;
use vm_memory::GuestMemoryMmap;

use crate::accel::Accelerator;
use crate::chardev::{split_key_value, split_options};
use crate::drive::{self, DriveConfig, DriveError, DriveInterface, DriveMedia};
use crate::pci::{PciBus, PciDevice, PciError};
use crate::supervisor::{self, DeviceProcess, SupervisorError};
use crate::virtio::pci::{VirtioPciDevice, VirtioPciError};
use crate::virtio::vhost_user::{VhostUserDevice, VhostUserError};
use crate::virtio::VIRTIO_ID_BLOCK;

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
    #[error("Property '{driver}.drive' can't find value '{drive}'")]
    DriveNotFound { driver: String, drive: String },
    #[error("Duplicate device ID '{0}'")]
    DuplicateId(String),
    #[error("Bus '{0}' not found")]
    BusNotFound(String),
    #[error("Duplicate drive ID '{0}'")]
    DuplicateDrive(String),
    #[error(transparent)]
    Drive(#[from] DriveError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
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
const DRIVERS: &[(&str, &[&str])] = &[(
    "virtio-blk-pci",
    &["drive", "num-queues", "queue-size", "serial", "bootindex"],
)];

/// Parse a `-device` value (`driver,key=value,...`).
pub fn parse_device(value: &str) -> Result<DeviceConfig, DeviceError> {
    let mut parts = split_options(value).into_iter();
    let first = parts.next().unwrap_or_default();
    let driver = first.strip_prefix("driver=").unwrap_or(&first).to_string();
    let Some((_, allowed)) = DRIVERS.iter().find(|(name, _)| *name == driver) else {
        return Err(DeviceError::UnknownDriver(driver));
    };
    let mut cfg = DeviceConfig {
        driver: driver.clone(),
        id: None,
        properties: BTreeMap::new(),
    };
    for part in parts {
        if part.is_empty() {
            continue;
        }
        let (key, v) = split_key_value(&part);
        let v = v.unwrap_or("on").to_string();
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

/// A virtio-blk disk served by a `vmm-blk` process.
struct BlockDevice {
    id: Option<String>,
    drive: String,
    slot: u8,
    process: DeviceProcess,
    /// Kept open: the process exits when the vmm's end closes.
    _control: BlkChannel,
    _function: Arc<Mutex<VirtioPciDevice>>,
}

/// Owner of the configured drives and of every device with a process behind it.
pub struct DeviceManager {
    accel: Arc<dyn Accelerator>,
    memory: GuestMemoryMmap,
    pci: Arc<Mutex<PciBus>>,
    /// Drives that no device has taken yet.
    drives: Vec<DriveConfig>,
    blocks: Vec<BlockDevice>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DeviceManager {
    pub fn new(
        accel: Arc<dyn Accelerator>,
        memory: GuestMemoryMmap,
        pci: Arc<Mutex<PciBus>>,
    ) -> Self {
        DeviceManager {
            accel,
            memory,
            pci,
            drives: Vec::new(),
            blocks: Vec::new(),
        }
    }

    /// Add a drive; `if=virtio` also creates its device.
    pub fn add_drive(&mut self, drive: DriveConfig) -> Result<(), DeviceError> {
        if self.drives.iter().any(|d| d.id == drive.id)
            || self.blocks.iter().any(|b| b.drive == drive.id)
        {
            return Err(DeviceError::DuplicateDrive(drive.id));
        }
        if drive.format_probed {
            if let Some(file) = &drive.file {
                crate::report!(
                    "vmm: warning: Image format was not specified for '{file}' and probing \
                     guessed raw.\n         Automatically detecting the format is dangerous \
                     for raw images, write operations on block 0 will be restricted.\n         \
                     Specify the 'raw' format explicitly to remove the restrictions."
                );
            }
        }
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

    /// Create the device `cfg` describes and plug it in.
    pub fn add_device(&mut self, cfg: &DeviceConfig) -> Result<(), DeviceError> {
        if let Some(id) = &cfg.id {
            if self.blocks.iter().any(|b| b.id.as_deref() == Some(id)) {
                return Err(DeviceError::DuplicateId(id.clone()));
            }
        }
        match cfg.driver.as_str() {
            "virtio-blk-pci" => self.add_virtio_blk(cfg),
            other => Err(DeviceError::UnknownDriver(other.to_string())),
        }
    }

    fn add_virtio_blk(&mut self, cfg: &DeviceConfig) -> Result<(), DeviceError> {
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
                driver: cfg.driver.clone(),
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
        let file = drive.file.as_deref().ok_or(DriveError::NoFile)?;
        let image = drive::open_image(file, drive.readonly)?;

        let name = format!("vmm-blk[{}]", drive.id);
        let program = supervisor::device_program("vmm-blk")?;
        let process = DeviceProcess::spawn(&name, &program, &[])?;
        let ipc_err = |source| DeviceError::Ipc {
            name: name.clone(),
            source,
        };
        let control_sock = process
            .control
            .try_clone()
            .map_err(|e| ipc_err(ipc::IpcError::Socket(e)))?;
        let mut control = BlkChannel::new(control_sock);
        control
            .hello(DeviceKind::Block, DeviceKind::Block, SETUP_TIMEOUT)
            .map_err(ipc_err)?;
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
        };
        let (reply, _) = control
            .call(BlkRequest::Attach(attach), &[image.as_fd()], SETUP_TIMEOUT)
            .map_err(ipc_err)?;
        let BlkReply::Attached { size } = reply;
        drop(image);
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
        let function = VirtioPciDevice::new(
            &name,
            cfg.id.clone(),
            Box::new(backend),
            self.accel.clone(),
            self.memory.clone(),
            CLASS_STORAGE_SCSI,
        )?;
        let function = Arc::new(Mutex::new(function));
        let slot =
            lock(&self.pci).add_device(slot, function.clone() as Arc<Mutex<dyn PciDevice>>)?;
        self.drives.remove(index);
        self.blocks.push(BlockDevice {
            id: cfg.id.clone(),
            drive: drive.id,
            slot,
            process,
            _control: control,
            _function: function,
        });
        Ok(())
    }

    /// Stop every device process (at quit).
    pub fn shutdown(&mut self) {
        for mut block in self.blocks.drain(..) {
            if let Some(pci) = self.pci.try_lock().ok().as_mut() {
                let _ = pci.remove_device(block.slot);
            }
            block.process.terminate(STOP_GRACE);
        }
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
