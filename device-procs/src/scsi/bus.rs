//! The SCSI bus of one controller: its logical units by (target, LUN), the addressing of
//! virtio-scsi's 8-byte LUN field, what a target answers for a LUN it lacks, and the
//! control requests on the units. Tray moves, whoever causes them, go to the event hook
//! (the control channel's [`ScsiEvent::TrayMoved`]) after the unit's lock is released.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use ipc::scsi::{LunInfo, ScsiEvent};

use super::cdrom::{self, Cdb, Cdrom, CdromError, Medium, Outcome, Sense};

/// Called for every event of the bus.
pub type EventHook = Box<dyn Fn(ScsiEvent) + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("there is already a device at target {target}, LUN {lun}")]
    Exists { target: u8, lun: u8 },
    #[error("there is no device at target {target}, LUN {lun}")]
    NoSuchLun { target: u8, lun: u8 },
    #[error(transparent)]
    Cdrom(#[from] CdromError),
}

/// How a virtio-scsi LUN field addresses a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub target: u8,
    /// 0..=16383 (flat space addressing).
    pub lun: u16,
}

impl Address {
    /// Decode a virtio-scsi LUN field: byte 0 is 1, byte 1 the target, bytes 2-3 the LUN
    /// (single level; flat addressing from 256). None for anything else (QEMU's
    /// virtio_scsi_device_get).
    pub fn decode(field: &[u8; 8]) -> Option<Address> {
        if field[0] != 1 {
            return None;
        }
        if field[2] != 0 && !(0x40..0x80).contains(&field[2]) {
            return None;
        }
        Some(Address {
            target: field[1],
            lun: (u16::from(field[2]) << 8 | u16::from(field[3])) & 0x3fff,
        })
    }
}

/// The units by (target, LUN).
type Units = BTreeMap<(u8, u8), Arc<Mutex<Cdrom>>>;

/// The bus.
pub struct Bus {
    luns: RwLock<Units>,
    on_event: Option<EventHook>,
}

impl Bus {
    pub fn new(on_event: Option<EventHook>) -> Bus {
        Bus {
            luns: RwLock::new(BTreeMap::new()),
            on_event,
        }
    }

    fn luns(&self) -> std::sync::RwLockReadGuard<'_, Units> {
        self.luns.read().unwrap_or_else(|e| e.into_inner())
    }

    fn unit(&self, target: u8, lun: u8) -> Result<Arc<Mutex<Cdrom>>, BusError> {
        self.luns()
            .get(&(target, lun))
            .cloned()
            .ok_or(BusError::NoSuchLun { target, lun })
    }

    fn emit(&self, id: &str, moves: &[bool]) {
        if let Some(hook) = &self.on_event {
            for &tray_open in moves {
                hook(ScsiEvent::TrayMoved {
                    id: id.to_owned(),
                    tray_open,
                });
            }
        }
    }

    /// Add a CD-ROM with `medium` in it (from power-on).
    pub fn add_cdrom(
        &self,
        target: u8,
        lun: u8,
        id: &str,
        serial: &str,
        medium: Option<Medium>,
    ) -> Result<(), BusError> {
        let mut luns = self.luns.write().unwrap_or_else(|e| e.into_inner());
        if luns.contains_key(&(target, lun)) {
            return Err(BusError::Exists { target, lun });
        }
        let cd = Cdrom::new(id, serial, medium);
        luns.insert((target, lun), Arc::new(Mutex::new(cd)));
        Ok(())
    }

    /// QMP `eject` on a unit.
    pub fn eject(&self, target: u8, lun: u8, force: bool) -> Result<(), BusError> {
        let unit = self.unit(target, lun)?;
        let (id, moves) = {
            let mut cd = lock(&unit);
            (cd.id().to_owned(), cd.eject(force))
        };
        let moves = moves?;
        self.emit(&id, &moves);
        Ok(())
    }

    /// QMP `change` on a unit.
    pub fn insert(&self, target: u8, lun: u8, medium: Medium) -> Result<(), BusError> {
        let unit = self.unit(target, lun)?;
        let (id, moves) = {
            let mut cd = lock(&unit);
            (cd.id().to_owned(), cd.insert(medium))
        };
        let moves = moves?;
        self.emit(&id, &moves);
        Ok(())
    }

    /// A system reset of every unit.
    pub fn reset(&self) {
        for unit in self.luns().values() {
            lock(unit).reset();
        }
    }

    pub fn query(&self) -> Vec<LunInfo> {
        self.luns()
            .iter()
            .map(|(&(target, lun), unit)| {
                let cd = lock(unit);
                LunInfo {
                    target,
                    lun,
                    id: cd.id().to_owned(),
                    tray_open: cd.tray_open(),
                    locked: cd.locked(),
                    inserted: cd.medium().is_some(),
                    size: cd.medium().map_or(0, Medium::size),
                }
            })
            .collect()
    }

    /// Whether `target` has any unit.
    pub fn has_target(&self, target: u8) -> bool {
        self.luns()
            .range((target, 0)..=(target, u8::MAX))
            .next()
            .is_some()
    }

    /// Run a command for `addr`; None when there is no such target (the transport answers
    /// BAD_TARGET).
    pub fn command(&self, addr: Address, cdb: &Cdb) -> Option<Outcome> {
        let (unit, luns) = {
            let luns = self.luns();
            let on_target: Vec<u8> = luns
                .range((addr.target, 0)..=(addr.target, u8::MAX))
                .map(|(&(_, lun), _)| lun)
                .collect();
            if on_target.is_empty() {
                return None;
            }
            let unit = u8::try_from(addr.lun)
                .ok()
                .and_then(|lun| luns.get(&(addr.target, lun)).cloned());
            (unit, on_target)
        };
        if cdb[0] == cdrom::op::REPORT_LUNS {
            return Some(cdrom::report_luns(cdb, &luns));
        }
        let Some(unit) = unit else {
            return Some(no_lun(cdb, addr.lun));
        };
        let (id, outcome) = {
            let mut cd = lock(&unit);
            (cd.id().to_owned(), cd.command(cdb))
        };
        if let Some(open) = outcome.tray_moved {
            self.emit(&id, &[open]);
        }
        Some(outcome)
    }

    /// A LUN reset (task management): the unit is reset as by [`Bus::reset`]. False
    /// when there is no such unit.
    pub fn reset_lun(&self, addr: Address) -> bool {
        let Ok(lun) = u8::try_from(addr.lun) else {
            return false;
        };
        match self.unit(addr.target, lun) {
            Ok(unit) => {
                lock(&unit).reset();
                true
            }
            Err(_) => false,
        }
    }

    /// Reset every unit of a target (I_T nexus reset).
    pub fn reset_target(&self, target: u8) {
        for (_, unit) in self.luns().range((target, 0)..=(target, u8::MAX)) {
            lock(unit).reset();
        }
    }

    /// Whether the unit at `addr` exists.
    pub fn has_lun(&self, addr: Address) -> bool {
        u8::try_from(addr.lun).is_ok_and(|lun| self.luns().contains_key(&(addr.target, lun)))
    }
}

fn lock(unit: &Mutex<Cdrom>) -> MutexGuard<'_, Cdrom> {
    unit.lock().unwrap_or_else(|e| e.into_inner())
}

/// A command for a LUN its target lacks.
fn no_lun(cdb: &Cdb, lun: u16) -> Outcome {
    match cdb[0] {
        cdrom::op::INQUIRY => cdrom::inquiry_no_lun(cdb, lun),
        cdrom::op::REQUEST_SENSE => {
            let alloc = usize::from(cdb[4]);
            let s = Sense::LUN_NOT_SUPPORTED;
            let bytes = if cdb[1] & 1 != 0 {
                s.descriptor().to_vec()
            } else {
                s.fixed().to_vec()
            };
            Outcome::data(bytes, alloc)
        }
        _ => Outcome::check(Sense::LUN_NOT_SUPPORTED),
    }
}
