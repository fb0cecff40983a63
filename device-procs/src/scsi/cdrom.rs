//! An MMC CD-ROM logical unit: the SCSI commands a Linux guest (sr_mod, cdrom, isofs,
//! udev's cdrom_id) sends, answered as QEMU 7.2's `scsi-cd` answers them
//! (hw/scsi/scsi-disk.c, hw/block/cdrom.c), and the tray, lock and medium state that QMP
//! `eject` and `change` act on.
//!
//! Pure state and byte building: no guest memory and no I/O here. A READ becomes
//! [`Data::Image`], a range of the medium the transport copies into guest memory.
//!
//! Unit attentions follow QEMU: a drive starts with POWER ON, RESET (29h/00h); a medium
//! change (tray closed on a new medium) first reports 3Ah/00h, then, once that was
//! reported, MEDIUM MAY HAVE CHANGED (28h/00h). INQUIRY, REPORT LUNS, GET CONFIGURATION
//! and GET EVENT STATUS NOTIFICATION never report them; REQUEST SENSE returns them as
//! its data.
//!
//! GET EVENT STATUS NOTIFICATION (polled, media class) reports NEW MEDIA once the tray
//! closed on a medium, EJECT REQUEST after a refused eject, as QEMU, and also MEDIA
//! REMOVAL once after an eject opened the tray (QEMU reports none then; Linux takes it
//! as a media change, as it does the open tray).

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::sync::Arc;

/// Bytes of a CD-ROM block.
pub const BLOCK_SIZE: u64 = 2048;
/// Media larger than a 80-minute CD are DVDs (GET CONFIGURATION's current profile).
const CD_MAX_BYTES: u64 = 80 * 60 * 75 * 2048;

/// How many bytes of a CDB the commands here look at.
pub const CDB_LEN: usize = 16;
/// A command descriptor block, zero-padded.
pub type Cdb = [u8; CDB_LEN];

/// The strings QEMU's scsi-cd reports (guests' udev rules and tools know them).
const VENDOR: &[u8; 8] = b"QEMU    ";
const PRODUCT: &[u8; 16] = b"QEMU CD-ROM     ";
const TARGET_PRODUCT: &[u8; 16] = b"QEMU TARGET     ";
const REVISION: &[u8; 4] = b"2.5+";

/// Peripheral device type: CD/DVD (MMC).
const TYPE_ROM: u8 = 0x05;

pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const SEEK_10: u8 = 0x2b;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4a;
    pub const READ_DISC_INFORMATION: u8 = 0x51;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const RESERVE_10: u8 = 0x56;
    pub const RELEASE_10: u8 = 0x57;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const SET_READ_AHEAD: u8 = 0xa7;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const SET_CD_SPEED: u8 = 0xbb;
    pub const MECHANISM_STATUS: u8 = 0xbd;
}

/// Sense key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

const fn sense(key: u8, asc: u8, ascq: u8) -> Sense {
    Sense { key, asc, ascq }
}

impl Sense {
    pub const NO_SENSE: Sense = sense(0x00, 0x00, 0x00);
    /// NOT READY, MEDIUM NOT PRESENT.
    pub const NO_MEDIUM: Sense = sense(0x02, 0x3a, 0x00);
    /// NOT READY, LOGICAL UNIT NOT READY (a medium of no whole block).
    pub const LUN_NOT_READY: Sense = sense(0x02, 0x04, 0x00);
    /// NOT READY, MEDIUM REMOVAL PREVENTED.
    pub const NOT_READY_REMOVAL_PREVENTED: Sense = sense(0x02, 0x53, 0x02);
    /// MEDIUM ERROR, UNRECOVERED READ ERROR (the host could not read the image).
    pub const READ_ERROR: Sense = sense(0x03, 0x11, 0x00);
    /// ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = sense(0x05, 0x20, 0x00);
    /// ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = sense(0x05, 0x21, 0x00);
    /// ILLEGAL REQUEST, INVALID FIELD IN CDB.
    pub const INVALID_FIELD: Sense = sense(0x05, 0x24, 0x00);
    /// ILLEGAL REQUEST, LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = sense(0x05, 0x25, 0x00);
    /// ILLEGAL REQUEST, SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_PARAMS_NOT_SUPPORTED: Sense = sense(0x05, 0x39, 0x00);
    /// ILLEGAL REQUEST, MEDIUM REMOVAL PREVENTED.
    pub const ILLEGAL_REQ_REMOVAL_PREVENTED: Sense = sense(0x05, 0x53, 0x02);
    /// UNIT ATTENTION, MEDIUM MAY HAVE CHANGED.
    pub const MEDIUM_CHANGED: Sense = sense(0x06, 0x28, 0x00);
    /// UNIT ATTENTION, POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const RESET: Sense = sense(0x06, 0x29, 0x00);
    /// UNIT ATTENTION, MEDIUM NOT PRESENT.
    pub const UA_NO_MEDIUM: Sense = sense(0x06, 0x3a, 0x00);
    /// DATA PROTECT, WRITE PROTECTED.
    pub const WRITE_PROTECTED: Sense = sense(0x07, 0x27, 0x00);

    /// Fixed-format sense data (response code 70h), 18 bytes.
    pub fn fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = 0x70;
        b[2] = self.key;
        b[7] = 10;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }

    /// Descriptor-format sense data (response code 72h) without descriptors.
    pub fn descriptor(&self) -> [u8; 8] {
        [0x72, self.key, self.asc, self.ascq, 0, 0, 0, 0]
    }

    /// QEMU's scsi_ua_precedence: which unit attention wins (lower is stronger).
    fn precedence(&self) -> u32 {
        if self.key != 0x06 {
            return u32::MAX;
        }
        match (self.asc, self.ascq) {
            (0x29, 0x04) => 1,
            (0x3f, 0x01) => 2,
            (0x29, q) if q <= 0x07 && q != 0x05 && q != 0x06 => u32::from(q),
            (0x2f, 0x01) => 8,
            (a, q) => u32::from(a) << 8 | u32::from(q),
        }
    }
}

/// Where a command's data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// No data, or a command this device does not know.
    None,
    /// From the device to the guest.
    In,
    /// From the guest to the device.
    Out,
}

/// The data direction of a command, for checking the guest's buffers against it.
pub fn direction(opcode: u8) -> Direction {
    use op::*;
    match opcode {
        REQUEST_SENSE
        | READ_6
        | INQUIRY
        | MODE_SENSE_6
        | MODE_SENSE_10
        | READ_CAPACITY_10
        | READ_10
        | READ_12
        | READ_16
        | READ_TOC
        | GET_CONFIGURATION
        | GET_EVENT_STATUS_NOTIFICATION
        | READ_DISC_INFORMATION
        | SERVICE_ACTION_IN_16
        | REPORT_LUNS
        | MECHANISM_STATUS => Direction::In,
        MODE_SELECT_6 | MODE_SELECT_10 | WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16
        | WRITE_VERIFY_10 => Direction::Out,
        _ => Direction::None,
    }
}

/// The data a command returns.
#[derive(Debug)]
pub enum Data {
    None,
    /// Bytes built here (already cut to the command's allocation length).
    Bytes(Vec<u8>),
    /// `len` bytes of the medium at `offset` (a READ).
    Image {
        file: Arc<File>,
        offset: u64,
        len: u64,
    },
}

/// The result of one command.
#[derive(Debug)]
pub struct Outcome {
    /// CHECK CONDITION with this sense, or GOOD.
    pub sense: Option<Sense>,
    pub data: Data,
    /// The command moved the tray: open (true) or closed.
    pub tray_moved: Option<bool>,
}

impl Outcome {
    pub fn good() -> Outcome {
        Outcome {
            sense: None,
            data: Data::None,
            tray_moved: None,
        }
    }

    pub fn check(sense: Sense) -> Outcome {
        Outcome {
            sense: Some(sense),
            ..Outcome::good()
        }
    }

    /// GOOD with `bytes`, cut to `alloc` bytes.
    pub fn data(mut bytes: Vec<u8>, alloc: usize) -> Outcome {
        bytes.truncate(alloc);
        Outcome {
            data: Data::Bytes(bytes),
            ..Outcome::good()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CdromError {
    #[error("cannot find the size of the image: {0}")]
    Size(#[source] io::Error),
    #[error("the medium is locked: the guest prevents its removal")]
    Locked,
}

/// A medium: a read-only image and its size in bytes.
#[derive(Debug, Clone)]
pub struct Medium {
    file: Arc<File>,
    size: u64,
}

impl Medium {
    /// Take `file` (its size is taken now: seeking to the end works for files and block
    /// devices alike; reads use pread and do not care about the offset).
    pub fn new(file: File) -> Result<Medium, CdromError> {
        let size = (&file).seek(SeekFrom::End(0)).map_err(CdromError::Size)?;
        Ok(Medium {
            file: Arc::new(file),
            size,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whole blocks (a partial last block is not served).
    fn blocks(&self) -> u64 {
        self.size / BLOCK_SIZE
    }
}

/// A CD-ROM drive: tray, lock, medium, and what the guest has yet to be told.
#[derive(Debug)]
pub struct Cdrom {
    id: String,
    serial: String,
    medium: Option<Medium>,
    tray_open: bool,
    locked: bool,
    /// A medium was loaded: once the pending unit attention is reported, report MEDIUM
    /// MAY HAVE CHANGED (QEMU's media_changed).
    media_changed: bool,
    /// GET EVENT STATUS NOTIFICATION reports NEW MEDIA next (QEMU's media_event).
    media_event: bool,
    /// GET EVENT STATUS NOTIFICATION reports EJECT REQUEST next.
    eject_request: bool,
    /// GET EVENT STATUS NOTIFICATION reports MEDIA REMOVAL next (the tray was opened by
    /// an eject or change; QEMU reports nothing then, the guest sees the open tray).
    media_removed: bool,
    /// The pending unit attention.
    ua: Option<Sense>,
}

/// How a control request moved the tray, in order (true: opened).
pub type TrayMoves = Vec<bool>;

impl Cdrom {
    /// A drive as at power-on: tray closed, unlocked, `medium` in it, POWER ON pending.
    pub fn new(id: &str, serial: &str, medium: Option<Medium>) -> Cdrom {
        Cdrom {
            id: id.to_owned(),
            serial: serial.to_owned(),
            medium,
            tray_open: false,
            locked: false,
            media_changed: false,
            media_event: false,
            eject_request: false,
            media_removed: false,
            ua: Some(Sense::RESET),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn tray_open(&self) -> bool {
        self.tray_open
    }

    pub fn locked(&self) -> bool {
        self.locked
    }

    pub fn medium(&self) -> Option<&Medium> {
        self.medium.as_ref()
    }

    /// A medium is in and the tray closed.
    fn available(&self) -> Option<&Medium> {
        self.medium.as_ref().filter(|_| !self.tray_open)
    }

    fn set_ua(&mut self, sense: Sense) {
        let current = self.ua.map_or(u32::MAX, |s| s.precedence());
        if sense.precedence() < current {
            self.ua = Some(sense);
        }
    }

    /// The pending unit attention was reported (QEMU's unit_attention_reported).
    fn take_ua(&mut self) -> Option<Sense> {
        let ua = self.ua.take()?;
        if self.media_changed {
            self.media_changed = false;
            self.set_ua(Sense::MEDIUM_CHANGED);
        }
        Some(ua)
    }

    /// QEMU's scsi_cd_change_media_cb: the tray closes on a loaded medium (`load`) or
    /// opens. Whether the tray moved.
    fn change_media(&mut self, load: bool) -> bool {
        let was_open = self.tray_open;
        self.media_changed = load;
        self.tray_open = !load;
        self.set_ua(Sense::UA_NO_MEDIUM);
        self.media_event = true;
        self.eject_request = false;
        self.media_removed = !load;
        was_open != self.tray_open
    }

    /// QMP `eject`: open the tray (see [`ipc::scsi::ScsiRequest::Eject`]) and remove the
    /// medium.
    pub fn eject(&mut self, force: bool) -> Result<TrayMoves, CdromError> {
        let mut moves = Vec::new();
        if !self.tray_open {
            if self.locked {
                self.eject_request = true;
                if !force {
                    return Err(CdromError::Locked);
                }
                self.locked = false;
            }
            if self.change_media(false) {
                moves.push(true);
            }
        }
        self.medium = None;
        Ok(moves)
    }

    /// QMP `change`: open the tray unless locked, put `medium` in, close the tray.
    pub fn insert(&mut self, medium: Medium) -> Result<TrayMoves, CdromError> {
        let mut moves = self.eject(false)?;
        self.medium = Some(medium);
        if self.change_media(true) {
            moves.push(false);
        }
        Ok(moves)
    }

    /// A device reset: unlocked, tray closed, POWER ON, RESET pending.
    pub fn reset(&mut self) {
        self.locked = false;
        self.tray_open = false;
        self.ua = Some(Sense::RESET);
    }

    /// Run one command.
    pub fn command(&mut self, cdb: &Cdb) -> Outcome {
        use op::*;
        let opcode = cdb[0];
        if !matches!(
            opcode,
            INQUIRY
                | REPORT_LUNS
                | GET_CONFIGURATION
                | GET_EVENT_STATUS_NOTIFICATION
                | REQUEST_SENSE
        ) {
            if let Some(ua) = self.take_ua() {
                return Outcome::check(ua);
            }
        }
        let needs_medium = !matches!(
            opcode,
            INQUIRY
                | MODE_SENSE_6
                | MODE_SENSE_10
                | RESERVE_6
                | RESERVE_10
                | RELEASE_6
                | RELEASE_10
                | START_STOP_UNIT
                | PREVENT_ALLOW_MEDIUM_REMOVAL
                | GET_CONFIGURATION
                | GET_EVENT_STATUS_NOTIFICATION
                | MECHANISM_STATUS
                | REQUEST_SENSE
                | SET_CD_SPEED
                | SET_READ_AHEAD
        );
        let known = direction(opcode) != Direction::None
            || matches!(
                opcode,
                TEST_UNIT_READY
                    | RESERVE_6
                    | RESERVE_10
                    | RELEASE_6
                    | RELEASE_10
                    | START_STOP_UNIT
                    | PREVENT_ALLOW_MEDIUM_REMOVAL
                    | SEEK_10
                    | VERIFY_10
                    | SYNCHRONIZE_CACHE_10
                    | SYNCHRONIZE_CACHE_16
                    | SET_READ_AHEAD
                    | SET_CD_SPEED
            );
        if !known {
            return Outcome::check(Sense::INVALID_OPCODE);
        }
        let medium = match self.available() {
            Some(m) => Some(m.clone()),
            None if needs_medium => return Outcome::check(Sense::NO_MEDIUM),
            None => None,
        };
        match (opcode, medium) {
            (REQUEST_SENSE, _) => self.request_sense(cdb),
            (INQUIRY, _) => self.inquiry(cdb),
            (MODE_SENSE_6 | MODE_SENSE_10, _) => self.mode_sense(cdb),
            (START_STOP_UNIT, _) => self.start_stop(cdb),
            (PREVENT_ALLOW_MEDIUM_REMOVAL, _) => {
                self.locked = cdb[4] & 1 != 0;
                Outcome::good()
            }
            (GET_CONFIGURATION, _) => self.get_configuration(cdb),
            (GET_EVENT_STATUS_NOTIFICATION, _) => self.event_status(cdb),
            (MECHANISM_STATUS, _) => {
                let mut b = vec![0u8; 8];
                b[5] = 1; // one slot
                Outcome::data(b, be16(cdb, 8))
            }
            (
                RESERVE_6 | RESERVE_10 | RELEASE_6 | RELEASE_10 | SET_CD_SPEED | SET_READ_AHEAD,
                _,
            ) => Outcome::good(),
            (_, Some(m)) => with_medium(cdb, &m),
            // Every opcode that reaches here needs a medium, so has one.
            (_, None) => Outcome::check(Sense::NO_MEDIUM),
        }
    }

    fn request_sense(&mut self, cdb: &Cdb) -> Outcome {
        let alloc = usize::from(cdb[4]);
        let sense = self.take_ua().unwrap_or(Sense::NO_SENSE);
        let bytes = if cdb[1] & 1 != 0 {
            sense.descriptor().to_vec()
        } else {
            sense.fixed().to_vec()
        };
        Outcome::data(bytes, alloc)
    }

    fn inquiry(&self, cdb: &Cdb) -> Outcome {
        let alloc = be16(cdb, 3);
        let page = cdb[2];
        if cdb[1] & 1 == 0 {
            if page != 0 || cdb[1] & 2 != 0 {
                return Outcome::check(Sense::INVALID_FIELD);
            }
            let mut b = vec![0u8; 36];
            b[0] = TYPE_ROM;
            b[1] = 0x80; // removable
            b[2] = 5; // SPC-3
            b[3] = 2 | 0x10; // response data format 2, HiSup
            b[4] = 36 - 5;
            b[7] = 0x10 | 0x02; // Sync, CmdQue
            b[8..16].copy_from_slice(VENDOR);
            b[16..32].copy_from_slice(PRODUCT);
            b[32..36].copy_from_slice(REVISION);
            return Outcome::data(b, alloc);
        }
        let mut b = vec![TYPE_ROM, page, 0, 0];
        match page {
            0x00 => {
                b.push(0x00);
                if !self.serial.is_empty() {
                    b.push(0x80);
                }
                b.push(0x83);
            }
            0x80 if !self.serial.is_empty() => {
                let s = self.serial.as_bytes();
                b.extend_from_slice(&s[..s.len().min(36)]);
            }
            0x83 => {
                let id = self.id.as_bytes();
                let n = id.len().min(255 - 8);
                if n > 0 {
                    // ASCII, vendor-specific designator.
                    b.extend_from_slice(&[0x02, 0x00, 0x00, n as u8]);
                    b.extend_from_slice(&id[..n]);
                }
            }
            _ => return Outcome::check(Sense::INVALID_FIELD),
        }
        let len = (b.len() - 4) as u16;
        b[2..4].copy_from_slice(&len.to_be_bytes());
        Outcome::data(b, alloc)
    }

    fn mode_sense(&self, cdb: &Cdb) -> Outcome {
        let ten = cdb[0] == op::MODE_SENSE_10;
        let page = cdb[2] & 0x3f;
        let control = cdb[2] >> 6;
        let subpage = cdb[3];
        let alloc = if ten {
            be16(cdb, 7)
        } else {
            usize::from(cdb[4])
        };
        if control == 3 {
            return Outcome::check(Sense::SAVING_PARAMS_NOT_SUPPORTED);
        }
        if subpage != 0 && !(page == 0x3f && subpage == 0xff) {
            return Outcome::check(Sense::INVALID_FIELD);
        }
        // MMC drives have no block descriptors and no device-specific parameter.
        let mut b = if ten { vec![0u8; 8] } else { vec![0u8; 4] };
        let pages: &[u8] = match page {
            0x3f => &[0x01, 0x08, 0x0e, 0x2a],
            0x01 => &[0x01],
            0x08 => &[0x08],
            0x0e => &[0x0e],
            0x2a => &[0x2a],
            _ => return Outcome::check(Sense::INVALID_FIELD),
        };
        for &p in pages {
            self.mode_page(p, control == 1, &mut b);
        }
        if ten {
            let len = (b.len() - 2) as u16;
            b[0..2].copy_from_slice(&len.to_be_bytes());
        } else {
            b[0] = (b.len() - 1) as u8;
        }
        Outcome::data(b, alloc)
    }

    /// Append mode page `page`: its current values, or which of them may change (none).
    fn mode_page(&self, page: u8, changeable: bool, b: &mut Vec<u8>) {
        let mut p: Vec<u8> = match page {
            // Read-write error recovery: AWRE, read retry count.
            0x01 => vec![0x80, 0x20, 0, 0, 0, 0, 0, 0, 0, 0],
            // Caching: WCE.
            0x08 => {
                let mut p = vec![0u8; 18];
                p[0] = 0x04;
                p
            }
            // CD audio control.
            0x0e => vec![0u8; 14],
            // CD capabilities and mechanical status, as QEMU.
            0x2a => {
                let speed = (50u16 * 176).to_be_bytes();
                let current = (16u16 * 176).to_be_bytes();
                let mut p = vec![0u8; 20];
                p[0] = 0x3b; // CD-R and CD-RW read
                p[2] = 0x7f; // audio, composite, digital out, mode 2 form 1&2, multi-session
                p[3] = 0xff; // CD-DA, accurate, R-W, C2, ISRC, UPC, bar code
                p[4] = 0x2d | if self.locked { 0x02 } else { 0 }; // lock, jumper, eject, tray
                p[6..8].copy_from_slice(&speed);
                p[8..10].copy_from_slice(&2u16.to_be_bytes()); // volume levels
                p[10..12].copy_from_slice(&2048u16.to_be_bytes()); // buffer KiB
                p[12..14].copy_from_slice(&current);
                p[16..18].copy_from_slice(&current);
                p[18..20].copy_from_slice(&current);
                p
            }
            _ => return,
        };
        if changeable {
            p.iter_mut().for_each(|x| *x = 0);
        }
        b.push(page);
        b.push(p.len() as u8);
        b.extend_from_slice(&p);
    }

    fn start_stop(&mut self, cdb: &Cdb) -> Outcome {
        let start = cdb[4] & 1 != 0;
        let loej = cdb[4] & 2 != 0;
        // Load and eject only with power condition 0.
        if cdb[4] & 0xf0 != 0 || !loej {
            return Outcome::good();
        }
        if !start && !self.tray_open && self.locked {
            return Outcome::check(if self.medium.is_some() {
                Sense::ILLEGAL_REQ_REMOVAL_PREVENTED
            } else {
                Sense::NOT_READY_REMOVAL_PREVENTED
            });
        }
        let mut outcome = Outcome::good();
        if self.tray_open == start {
            self.tray_open = !start;
            outcome.tray_moved = Some(self.tray_open);
        }
        outcome
    }

    fn get_configuration(&self, cdb: &Cdb) -> Outcome {
        const PROFILE_NONE: u16 = 0x0000;
        const PROFILE_CD_ROM: u16 = 0x0008;
        const PROFILE_DVD_ROM: u16 = 0x0010;
        let current = match self.available() {
            Some(m) if m.size > CD_MAX_BYTES => PROFILE_DVD_ROM,
            Some(_) => PROFILE_CD_ROM,
            None => PROFILE_NONE,
        };
        let mut b = vec![0u8; 40];
        b[0..4].copy_from_slice(&36u32.to_be_bytes());
        b[6..8].copy_from_slice(&current.to_be_bytes());
        // Feature 0: profile list (DVD-ROM, CD-ROM).
        b[10] = 0x03; // persistent, current
        b[11] = 8;
        b[12..14].copy_from_slice(&PROFILE_DVD_ROM.to_be_bytes());
        b[14] = u8::from(current == PROFILE_DVD_ROM);
        b[16..18].copy_from_slice(&PROFILE_CD_ROM.to_be_bytes());
        b[18] = u8::from(current == PROFILE_CD_ROM);
        // Feature 1: core (SCSI), DBE.
        b[20..22].copy_from_slice(&1u16.to_be_bytes());
        b[22] = 0x08 | 0x03;
        b[23] = 4;
        b[24..28].copy_from_slice(&1u32.to_be_bytes());
        b[28] = 1;
        // Feature 3: removable medium (tray, load, eject, lock).
        b[32..34].copy_from_slice(&3u16.to_be_bytes());
        b[34] = 0x08 | 0x03;
        b[35] = 4;
        b[36] = 0x39;
        Outcome::data(b, be16(cdb, 7))
    }

    fn event_status(&mut self, cdb: &Cdb) -> Outcome {
        const MEDIA_CLASS: u8 = 4;
        // Only polled operation.
        if cdb[1] & 1 == 0 {
            return Outcome::check(Sense::INVALID_FIELD);
        }
        let mut b = vec![0u8, 0, 0, 1 << MEDIA_CLASS];
        if cdb[4] & (1 << MEDIA_CLASS) != 0 {
            b[2] = MEDIA_CLASS;
            let status = if self.tray_open {
                1 // tray open
            } else if self.medium.is_some() {
                2 // medium present
            } else {
                0
            };
            let mut event = 0; // no change
            if self.media_removed {
                event = 3; // media removal
                self.media_removed = false;
            } else if !self.tray_open {
                if self.media_event {
                    event = 2; // new media
                    self.media_event = false;
                } else if self.eject_request {
                    event = 1; // eject request
                    self.eject_request = false;
                }
            }
            b.extend_from_slice(&[event, status, 0, 0]);
        } else {
            b[2] = 0x80; // no event available
        }
        let len = (b.len() - 4) as u16;
        b[0..2].copy_from_slice(&len.to_be_bytes());
        Outcome::data(b, be16(cdb, 7))
    }
}

/// The commands that need a medium, with the one in the drive.
fn with_medium(cdb: &Cdb, m: &Medium) -> Outcome {
    use op::*;
    let blocks = m.blocks();
    match cdb[0] {
        TEST_UNIT_READY | SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 | MODE_SELECT_6
        | MODE_SELECT_10 => Outcome::good(),
        READ_CAPACITY_10 => {
            if blocks == 0 {
                return Outcome::check(Sense::LUN_NOT_READY);
            }
            // Without PMI the LBA field must be zero.
            if cdb[8] & 1 == 0 && be32(cdb, 2) != 0 {
                return Outcome::check(Sense::INVALID_FIELD);
            }
            let last = u32::try_from(blocks - 1).unwrap_or(u32::MAX);
            let mut b = vec![0u8; 8];
            b[0..4].copy_from_slice(&last.to_be_bytes());
            b[4..8].copy_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
            Outcome::data(b, 8)
        }
        SERVICE_ACTION_IN_16 => {
            // READ CAPACITY(16) is the only service action.
            if cdb[1] & 0x1f != 0x10 {
                return Outcome::check(Sense::INVALID_FIELD);
            }
            if blocks == 0 {
                return Outcome::check(Sense::LUN_NOT_READY);
            }
            let mut b = vec![0u8; 32];
            b[0..8].copy_from_slice(&(blocks - 1).to_be_bytes());
            b[8..12].copy_from_slice(&(BLOCK_SIZE as u32).to_be_bytes());
            Outcome::data(b, be32(cdb, 10) as usize)
        }
        READ_6 | READ_10 | READ_12 | READ_16 => {
            let (lba, count) = match cdb[0] {
                READ_6 => {
                    let lba = u64::from(cdb[1] & 0x1f) << 16 | u64::from(cdb[2]) << 8;
                    let count = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
                    (lba | u64::from(cdb[3]), count)
                }
                READ_10 => (u64::from(be32(cdb, 2)), be16(cdb, 7) as u64),
                READ_12 => (u64::from(be32(cdb, 2)), u64::from(be32(cdb, 6))),
                _ => (be64(cdb, 2), u64::from(be32(cdb, 10))),
            };
            // RDPROTECT: no protection information here.
            if cdb[0] != READ_6 && cdb[1] & 0xe0 != 0 {
                return Outcome::check(Sense::INVALID_FIELD);
            }
            if lba.checked_add(count).is_none_or(|end| end > blocks) {
                return Outcome::check(Sense::LBA_OUT_OF_RANGE);
            }
            if count == 0 {
                return Outcome::good();
            }
            Outcome {
                data: Data::Image {
                    file: m.file.clone(),
                    offset: lba * BLOCK_SIZE,
                    len: count * BLOCK_SIZE,
                },
                ..Outcome::good()
            }
        }
        SEEK_10 => {
            if u64::from(be32(cdb, 2)) >= blocks {
                return Outcome::check(Sense::LBA_OUT_OF_RANGE);
            }
            Outcome::good()
        }
        VERIFY_10 => {
            // Only the medium check (BYTCHK 0).
            if cdb[1] & 0x02 != 0 {
                return Outcome::check(Sense::INVALID_FIELD);
            }
            let end = u64::from(be32(cdb, 2)) + be16(cdb, 7) as u64;
            if end > blocks {
                return Outcome::check(Sense::LBA_OUT_OF_RANGE);
            }
            Outcome::good()
        }
        WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 | WRITE_VERIFY_10 => {
            Outcome::check(Sense::WRITE_PROTECTED)
        }
        READ_TOC => read_toc(cdb, blocks),
        READ_DISC_INFORMATION => {
            // Data types 1 and 2 are for Blu-ray only.
            if cdb[1] & 7 != 0 {
                return Outcome::check(Sense::INVALID_FIELD);
            }
            let mut b = vec![0u8; 34];
            b[1] = 32;
            b[2] = 0x0e; // last session complete, disc finalized
            b[3] = 1; // first track
            b[4] = 1; // sessions
            b[5] = 1; // first track of the last session
            b[6] = 1; // last track of the last session
            b[7] = 0x20; // unrestricted use
            Outcome::data(b, be16(cdb, 7))
        }
        _ => Outcome::check(Sense::INVALID_OPCODE),
    }
}

/// READ TOC/PMA/ATIP of a one-track data disc (QEMU's hw/block/cdrom.c).
fn read_toc(cdb: &Cdb, blocks: u64) -> Outcome {
    let msf = cdb[1] & 2 != 0;
    let format = cdb[2] & 0x0f;
    let start_track = cdb[6];
    let alloc = be16(cdb, 7);
    let blocks = u32::try_from(blocks).unwrap_or(u32::MAX);
    // An address, as LBA or as MSF.
    let address = |b: &mut Vec<u8>, lba: u32| {
        if msf {
            let (m, s, f) = lba_to_msf(lba);
            b.extend_from_slice(&[0, m, s, f]);
        } else {
            b.extend_from_slice(&lba.to_be_bytes());
        }
    };
    let mut b = vec![0u8, 0, 1, 1]; // length, first and last track (or session)
    match format {
        0 => {
            if start_track > 1 && start_track != 0xaa {
                return Outcome::check(Sense::INVALID_FIELD);
            }
            if start_track <= 1 {
                b.extend_from_slice(&[0, 0x14, 1, 0]); // data track 1
                address(&mut b, 0);
            }
            b.extend_from_slice(&[0, 0x16, 0xaa, 0]); // lead-out
            address(&mut b, blocks);
        }
        1 => {
            // One session, starting with track 1 at 0.
            b = vec![0u8; 12];
            b[2] = 1;
            b[3] = 1;
        }
        2 => {
            // Raw TOC: the A0, A1 and A2 points and track 1.
            b.extend_from_slice(&[1, 0x14, 0, 0xa0, 0, 0, 0, 0, 1, 0x00, 0x00]);
            b.extend_from_slice(&[1, 0x14, 0, 0xa1, 0, 0, 0, 0, 1, 0x00, 0x00]);
            b.extend_from_slice(&[1, 0x14, 0, 0xa2, 0, 0, 0]);
            address(&mut b, blocks);
            b.extend_from_slice(&[1, 0x14, 0, 1, 0, 0, 0]);
            address(&mut b, 0);
        }
        _ => return Outcome::check(Sense::INVALID_FIELD),
    }
    let len = (b.len() - 2) as u16;
    b[0..2].copy_from_slice(&len.to_be_bytes());
    Outcome::data(b, alloc)
}

/// Minutes, seconds and frames of `lba` (with the 2-second pregap), saturated.
fn lba_to_msf(lba: u32) -> (u8, u8, u8) {
    let lba = lba.saturating_add(150);
    let m = (lba / 75 / 60).min(255) as u8;
    ((m), (lba / 75 % 60) as u8, (lba % 75) as u8)
}

/// INQUIRY of a LUN that does not exist on an existing target (QEMU's target emulation):
/// peripheral qualifier 3, "no device"; only VPD page 0.
pub fn inquiry_no_lun(cdb: &Cdb, lun: u16) -> Outcome {
    let alloc = be16(cdb, 3);
    if cdb[1] & 2 != 0 {
        return Outcome::check(Sense::INVALID_FIELD);
    }
    if cdb[1] & 1 != 0 {
        if cdb[2] != 0 {
            return Outcome::check(Sense::INVALID_FIELD);
        }
        return Outcome::data(vec![0x7f, 0x00, 0x00, 0x01, 0x00], alloc);
    }
    if cdb[2] != 0 {
        return Outcome::check(Sense::INVALID_FIELD);
    }
    let mut b = vec![0u8; 36];
    if lun == 0 {
        b[0] = 0x3f; // not present, inactive
        b[2] = 5;
        b[3] = 2 | 0x10;
        b[4] = 36 - 5;
        b[7] = 0x10 | 0x02;
        b[8..16].copy_from_slice(VENDOR);
        b[16..32].copy_from_slice(TARGET_PRODUCT);
        b[32..36].copy_from_slice(REVISION);
    } else {
        b[0] = 0x7f;
    }
    Outcome::data(b, alloc)
}

/// REPORT LUNS of a target with `luns`.
pub fn report_luns(cdb: &Cdb, luns: &[u8]) -> Outcome {
    let alloc = be32(cdb, 6) as usize;
    if cdb[2] > 2 || alloc < 16 {
        return Outcome::check(Sense::INVALID_FIELD);
    }
    let mut b = vec![0u8; 8];
    b[0..4].copy_from_slice(&((luns.len() as u32) * 8).to_be_bytes());
    for &lun in luns {
        b.extend_from_slice(&[0, lun, 0, 0, 0, 0, 0, 0]);
    }
    Outcome::data(b, alloc)
}

fn be16(cdb: &Cdb, at: usize) -> usize {
    usize::from(u16::from_be_bytes([cdb[at], cdb[at + 1]]))
}

fn be32(cdb: &Cdb, at: usize) -> u32 {
    u32::from_be_bytes([cdb[at], cdb[at + 1], cdb[at + 2], cdb[at + 3]])
}

fn be64(cdb: &Cdb, at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&cdb[at..at + 8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A medium of `blocks` blocks where block n is filled with byte n.
    fn medium(blocks: u64) -> Medium {
        let name = std::ffi::CString::new("cdrom-test").unwrap();
        // SAFETY: memfd_create with a valid C string; the fd is ours.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned by nothing else.
        let mut f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        for b in 0..blocks {
            f.write_all(&[b as u8; BLOCK_SIZE as usize]).unwrap();
        }
        Medium::new(f).unwrap()
    }

    fn cdb(bytes: &[u8]) -> Cdb {
        let mut c = [0u8; CDB_LEN];
        c[..bytes.len()].copy_from_slice(bytes);
        c
    }

    fn tur(cd: &mut Cdrom) -> Option<Sense> {
        cd.command(&cdb(&[op::TEST_UNIT_READY])).sense
    }

    fn bytes(o: Outcome) -> Vec<u8> {
        assert_eq!(o.sense, None);
        match o.data {
            Data::Bytes(b) => b,
            other => panic!("{other:?}"),
        }
    }

    /// GET EVENT STATUS NOTIFICATION, media class: (event code, media status).
    fn gesn(cd: &mut Cdrom) -> (u8, u8) {
        let b = bytes(cd.command(&cdb(&[
            op::GET_EVENT_STATUS_NOTIFICATION,
            1,
            0,
            0,
            0x10,
            0,
            0,
            0,
            8,
        ])));
        // The event data length as QEMU gives it (the 4 descriptor bytes).
        assert_eq!(&b[..4], &[0, 4, 4, 0x10]);
        (b[4], b[5])
    }

    #[test]
    fn power_on_then_ready() {
        let mut cd = Cdrom::new("cd0", "", Some(medium(4)));
        // INQUIRY does not see the unit attention.
        let inq = bytes(cd.command(&cdb(&[op::INQUIRY, 0, 0, 0, 36])));
        assert_eq!(inq.len(), 36);
        assert_eq!((inq[0], inq[1]), (5, 0x80));
        assert_eq!(&inq[16..27], b"QEMU CD-ROM");
        assert_eq!(tur(&mut cd), Some(Sense::RESET));
        assert_eq!(tur(&mut cd), None);
        let cap = bytes(cd.command(&cdb(&[op::READ_CAPACITY_10])));
        assert_eq!(cap, [0, 0, 0, 3, 0, 0, 8, 0]);
        let o = cd.command(&cdb(&[op::READ_10, 0, 0, 0, 0, 2, 0, 0, 2]));
        match o.data {
            Data::Image { offset, len, .. } => assert_eq!((offset, len), (4096, 4096)),
            other => panic!("{other:?}"),
        }
        let o = cd.command(&cdb(&[op::READ_10, 0, 0, 0, 0, 3, 0, 0, 2]));
        assert_eq!(o.sense, Some(Sense::LBA_OUT_OF_RANGE));
        let o = cd.command(&cdb(&[
            op::READ_16,
            0,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0xff,
            0,
            0,
            0,
            2,
        ]));
        assert_eq!(o.sense, Some(Sense::LBA_OUT_OF_RANGE));
        let o = cd.command(&cdb(&[0xee]));
        assert_eq!(o.sense, Some(Sense::INVALID_OPCODE));
        let o = cd.command(&cdb(&[op::WRITE_10, 0, 0, 0, 0, 0, 0, 0, 1]));
        assert_eq!(o.sense, Some(Sense::WRITE_PROTECTED));
    }

    #[test]
    fn an_empty_drive_is_not_ready() {
        let mut cd = Cdrom::new("cd0", "", None);
        assert_eq!(tur(&mut cd), Some(Sense::RESET));
        assert_eq!(tur(&mut cd), Some(Sense::NO_MEDIUM));
        let o = cd.command(&cdb(&[op::READ_10, 0, 0, 0, 0, 0, 0, 0, 1]));
        assert_eq!(o.sense, Some(Sense::NO_MEDIUM));
        assert_eq!(gesn(&mut cd), (0, 0));
        let conf = bytes(cd.command(&cdb(&[op::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 40])));
        assert_eq!(&conf[6..8], &[0, 0]);
        // MODE SENSE works without a medium.
        let ms = bytes(cd.command(&cdb(&[op::MODE_SENSE_10, 0, 0x2a, 0, 0, 0, 0, 0, 64])));
        assert_eq!(ms.len(), 8 + 22);
        assert_eq!(u16::from_be_bytes([ms[0], ms[1]]), 28);
        assert_eq!((ms[8], ms[9], ms[14]), (0x2a, 0x14, 0x2d));
    }

    #[test]
    fn change_eject_and_lock() {
        let mut cd = Cdrom::new("cd0", "", None);
        assert_eq!(tur(&mut cd), Some(Sense::RESET));
        assert_eq!(cd.insert(medium(2)).unwrap(), vec![true, false]);
        // QEMU's order: NOT PRESENT, then MEDIUM MAY HAVE CHANGED, once each.
        assert_eq!(gesn(&mut cd), (2, 2));
        assert_eq!(gesn(&mut cd), (0, 2));
        assert_eq!(tur(&mut cd), Some(Sense::UA_NO_MEDIUM));
        assert_eq!(tur(&mut cd), Some(Sense::MEDIUM_CHANGED));
        assert_eq!(tur(&mut cd), None);
        assert_eq!(
            cd.command(&cdb(&[op::PREVENT_ALLOW_MEDIUM_REMOVAL, 0, 0, 0, 1]))
                .sense,
            None
        );
        assert!(cd.locked());
        let ms = bytes(cd.command(&cdb(&[op::MODE_SENSE_6, 0, 0x2a, 0, 64])));
        assert_eq!(ms[4 + 6], 0x2f);
        // Locked: refused, and the guest is asked to eject.
        assert!(matches!(cd.eject(false), Err(CdromError::Locked)));
        assert!(matches!(cd.insert(medium(1)), Err(CdromError::Locked)));
        assert_eq!(gesn(&mut cd), (1, 2));
        assert_eq!(tur(&mut cd), None);
        // The guest cannot open a locked tray either.
        let o = cd.command(&cdb(&[op::START_STOP_UNIT, 0, 0, 0, 2]));
        assert_eq!(o.sense, Some(Sense::ILLEGAL_REQ_REMOVAL_PREVENTED));
        // Forced.
        assert_eq!(cd.eject(true).unwrap(), vec![true]);
        assert!(!cd.locked() && cd.tray_open() && cd.medium().is_none());
        assert_eq!(tur(&mut cd), Some(Sense::UA_NO_MEDIUM));
        assert_eq!(tur(&mut cd), Some(Sense::NO_MEDIUM));
        assert_eq!(gesn(&mut cd), (3, 1));
        assert_eq!(gesn(&mut cd), (0, 1));
        // Ejecting again is fine.
        assert_eq!(cd.eject(false).unwrap(), vec![]);
        // A new medium into the open tray: only the close moves it.
        assert_eq!(cd.insert(medium(3)).unwrap(), vec![false]);
        assert_eq!(tur(&mut cd), Some(Sense::UA_NO_MEDIUM));
        assert_eq!(tur(&mut cd), Some(Sense::MEDIUM_CHANGED));
        let cap = bytes(cd.command(&cdb(&[op::READ_CAPACITY_10])));
        assert_eq!(&cap[..4], &[0, 0, 0, 2]);
    }

    #[test]
    fn guest_opens_and_closes_the_tray() {
        let mut cd = Cdrom::new("cd0", "", Some(medium(2)));
        cd.command(&cdb(&[op::REQUEST_SENSE, 0, 0, 0, 18]));
        let o = cd.command(&cdb(&[op::START_STOP_UNIT, 0, 0, 0, 2]));
        assert_eq!((o.sense, o.tray_moved), (None, Some(true)));
        assert_eq!(tur(&mut cd), Some(Sense::NO_MEDIUM));
        assert_eq!(gesn(&mut cd), (0, 1));
        let o = cd.command(&cdb(&[op::START_STOP_UNIT, 0, 0, 0, 3]));
        assert_eq!((o.sense, o.tray_moved), (None, Some(false)));
        assert_eq!(tur(&mut cd), None);
        // Closing a closed tray does not move it.
        let o = cd.command(&cdb(&[op::START_STOP_UNIT, 0, 0, 0, 3]));
        assert_eq!(o.tray_moved, None);
    }

    #[test]
    fn request_sense_returns_and_clears_the_unit_attention() {
        let mut cd = Cdrom::new("cd0", "", Some(medium(1)));
        let s = bytes(cd.command(&cdb(&[op::REQUEST_SENSE, 0, 0, 0, 252])));
        assert_eq!((s.len(), s[0], s[2], s[12], s[13]), (18, 0x70, 6, 0x29, 0));
        let s = bytes(cd.command(&cdb(&[op::REQUEST_SENSE, 1, 0, 0, 252])));
        assert_eq!(&s[..4], &[0x72, 0, 0, 0]);
        assert_eq!(tur(&mut cd), None);
    }

    #[test]
    fn vpd_pages() {
        let mut cd = Cdrom::new("cd0", "SER1", None);
        let p = bytes(cd.command(&cdb(&[op::INQUIRY, 1, 0, 0, 255])));
        assert_eq!(p, [5, 0, 0, 3, 0x00, 0x80, 0x83]);
        let p = bytes(cd.command(&cdb(&[op::INQUIRY, 1, 0x80, 0, 255])));
        assert_eq!(&p[4..], b"SER1");
        let p = bytes(cd.command(&cdb(&[op::INQUIRY, 1, 0x83, 0, 255])));
        assert_eq!(&p[..8], &[5, 0x83, 0, 7, 2, 0, 0, 3]);
        assert_eq!(&p[8..], b"cd0");
        let o = cd.command(&cdb(&[op::INQUIRY, 1, 0xb0, 0, 255]));
        assert_eq!(o.sense, Some(Sense::INVALID_FIELD));
        let o = cd.command(&cdb(&[op::INQUIRY, 0, 0x80, 0, 255]));
        assert_eq!(o.sense, Some(Sense::INVALID_FIELD));
        let mut cd = Cdrom::new("cd0", "", None);
        let p = bytes(cd.command(&cdb(&[op::INQUIRY, 1, 0, 0, 255])));
        assert_eq!(p, [5, 0, 0, 2, 0x00, 0x83]);
        let o = cd.command(&cdb(&[op::INQUIRY, 1, 0x80, 0, 255]));
        assert_eq!(o.sense, Some(Sense::INVALID_FIELD));
        // Cut to the allocation length.
        let p = bytes(cd.command(&cdb(&[op::INQUIRY, 0, 0, 0, 5])));
        assert_eq!(p.len(), 5);
    }

    #[test]
    fn toc_disc_info_capacity16_and_configuration() {
        let mut cd = Cdrom::new("cd0", "", Some(medium(300)));
        assert_eq!(tur(&mut cd), Some(Sense::RESET));
        let toc = bytes(cd.command(&cdb(&[op::READ_TOC, 0, 0, 0, 0, 0, 0, 0, 100])));
        assert_eq!(
            toc,
            [0, 18, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0, 0, 0x16, 0xaa, 0, 0, 0, 1, 44]
        );
        // MSF: 300 + 150 frames = 0:06:00.
        let toc = bytes(cd.command(&cdb(&[op::READ_TOC, 2, 0, 0, 0, 0, 0xaa, 0, 100])));
        assert_eq!(toc, [0, 10, 1, 1, 0, 0x16, 0xaa, 0, 0, 0, 6, 0]);
        let o = cd.command(&cdb(&[op::READ_TOC, 0, 0, 0, 0, 0, 2, 0, 100]));
        assert_eq!(o.sense, Some(Sense::INVALID_FIELD));
        let s = bytes(cd.command(&cdb(&[op::READ_TOC, 0, 1, 0, 0, 0, 0, 0, 12])));
        assert_eq!(s, [0, 10, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        let raw = bytes(cd.command(&cdb(&[op::READ_TOC, 0, 2, 0, 0, 0, 0, 0, 200])));
        assert_eq!(raw.len(), 4 + 4 * 11);
        let di = bytes(cd.command(&cdb(&[op::READ_DISC_INFORMATION, 0, 0, 0, 0, 0, 0, 0, 34])));
        assert_eq!((di.len(), di[2]), (34, 0x0e));
        let cap = bytes(cd.command(&cdb(&[
            op::SERVICE_ACTION_IN_16,
            0x10,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            32,
        ])));
        assert_eq!(&cap[..12], &[0, 0, 0, 0, 0, 0, 1, 43, 0, 0, 8, 0]);
        let conf = bytes(cd.command(&cdb(&[op::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 8])));
        assert_eq!(conf, [0, 0, 0, 36, 0, 0, 0, 8]);
        let ms = bytes(cd.command(&cdb(&[op::MECHANISM_STATUS, 0, 0, 0, 0, 0, 0, 0, 0, 8])));
        assert_eq!(ms, [0, 0, 0, 0, 0, 1, 0, 0]);
        let all = bytes(cd.command(&cdb(&[op::MODE_SENSE_6, 0, 0x3f, 0, 255])));
        assert_eq!(all.len(), 4 + 12 + 20 + 16 + 22);
        assert_eq!(all[0] as usize, all.len() - 1);
        let o = cd.command(&cdb(&[op::MODE_SENSE_6, 0, 0xc0 | 0x2a, 0, 255]));
        assert_eq!(o.sense, Some(Sense::SAVING_PARAMS_NOT_SUPPORTED));
        let o = cd.command(&cdb(&[op::MODE_SENSE_6, 0, 0x04, 0, 255]));
        assert_eq!(o.sense, Some(Sense::INVALID_FIELD));
    }

    #[test]
    fn a_dvd_sized_medium_is_a_dvd() {
        let name = std::ffi::CString::new("dvd").unwrap();
        // SAFETY: memfd_create with a valid C string; the fd is ours.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned by nothing else.
        let f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        f.set_len(CD_MAX_BYTES + BLOCK_SIZE).unwrap();
        let mut cd = Cdrom::new("cd0", "", Some(Medium::new(f).unwrap()));
        let conf = bytes(cd.command(&cdb(&[op::GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 40])));
        assert_eq!(&conf[6..8], &[0, 0x10]);
        assert_eq!((conf[14], conf[18]), (1, 0));
    }

    #[test]
    fn random_cdbs_never_panic() {
        let mut cd = Cdrom::new("cd0", "s", Some(medium(8)));
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for i in 0..20000 {
            let mut c = [0u8; CDB_LEN];
            for b in c.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *b = seed as u8;
            }
            // Mostly known opcodes.
            if i % 4 != 0 {
                const OPS: [u8; 16] = [
                    0x00, 0x03, 0x08, 0x12, 0x1a, 0x1b, 0x1e, 0x25, 0x28, 0x43, 0x46, 0x4a, 0x51,
                    0x5a, 0x88, 0x9e,
                ];
                c[0] = OPS[(seed >> 40) as usize % OPS.len()];
            }
            let _ = cd.command(&c);
            let _ = inquiry_no_lun(&c, (seed >> 20) as u16);
            let _ = report_luns(&c, &[0, 1]);
        }
    }
}
