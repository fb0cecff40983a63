//! The control protocol of `vmm-scsi`, the virtio-scsi host adapter process (one per
//! `virtio-scsi-pci` controller) serving CD-ROM logical units.
//!
//! The data path is vhost-user-scsi on the process's second socket; this channel sets the
//! controller up, adds its LUNs, and changes their media. The vmm opens the images itself
//! and hands them over as fds: the device process never opens a path. The hello uses
//! [`crate::DeviceKind::Block`].
//!
//! Tray and medium semantics mirror QEMU 7.2's `scsi-cd` (hw/scsi/scsi-disk.c,
//! blockdev.c): see each request.

use serde::{Deserialize, Serialize};

use crate::channel::Channel;

/// What the vmm asks of a SCSI controller process.
///
/// New variants go at the end: postcard numbers them in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScsiRequest {
    /// Set the controller up: `num_queues` request queues (besides the control and event
    /// queues) of at most `queue_size` entries. Sent once, first, with no fd; replied to
    /// with [`ScsiReply::Attached`], after which the vmm may connect to the vhost-user
    /// socket.
    AttachController { num_queues: u16, queue_size: u16 },
    /// Add a CD-ROM at `target` (0..=255), `lun`. `id` names the drive (the block backend
    /// name, `cd0` for `-drive id=cd0`): it is the device identification of INQUIRY VPD
    /// page 0x83 and the `id` of [`ScsiEvent::TrayMoved`]. `serial` (empty: none) is VPD
    /// page 0x80. The message carries zero fds (an empty drive, tray closed) or one, a
    /// read-only image (raw / ISO) present from power-on, with no unit attention for it.
    /// Replied to with [`ScsiReply::Added`].
    AddCdrom {
        target: u8,
        lun: u8,
        id: String,
        serial: String,
    },
    /// QMP `change` (blockdev-change-medium): the one fd of this message is a read-only
    /// image (raw / ISO). If the tray is closed and the guest locked the medium, nothing
    /// changes: the guest is sent an eject request and the reply is
    /// [`ScsiReply::Locked`]. Otherwise the tray opens (if closed), the new medium goes in
    /// and the tray closes ([`ScsiEvent::TrayMoved`] for each move): the guest sees UNIT
    /// ATTENTION (3Ah/00h, then 28h/00h MEDIUM MAY HAVE CHANGED) on its next commands and
    /// a NEW MEDIA event in GET EVENT STATUS NOTIFICATION. Replied to with
    /// [`ScsiReply::Inserted`].
    InsertMedium { target: u8, lun: u8 },
    /// QMP `eject`: open the tray and remove the medium. If the guest locked the medium
    /// (PREVENT ALLOW MEDIUM REMOVAL) and the tray is closed, the guest is sent an eject
    /// request (GET EVENT STATUS NOTIFICATION, media class) in any case; without `force`
    /// nothing else happens and the reply is [`ScsiReply::Locked`]; with `force` the lock
    /// is broken and the medium ejected (the guest sees UNIT ATTENTION 3Ah/00h, then NOT
    /// READY 3Ah/00h, and a MEDIA REMOVAL event). Replied to with [`ScsiReply::Ejected`]
    /// otherwise (also when the tray was open or the drive empty already).
    Eject { target: u8, lun: u8, force: bool },
    /// The state of every LUN: [`ScsiReply::Luns`].
    Query,
    /// A system reset (QEMU's device reset): every LUN's medium is unlocked and its tray
    /// closed (no [`ScsiEvent::TrayMoved`], as in QEMU), and the guest's next command sees
    /// UNIT ATTENTION 29h/00h (POWER ON, RESET). Replied to with [`ScsiReply::Reset`].
    Reset,
}

/// One LUN as [`ScsiRequest::Query`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LunInfo {
    pub target: u8,
    pub lun: u8,
    pub id: String,
    pub tray_open: bool,
    /// The guest prevents medium removal.
    pub locked: bool,
    /// A medium is in the drive (also when the tray is open).
    pub inserted: bool,
    /// The medium's size in bytes (0 without one).
    pub size: u64,
}

/// Replies to [`ScsiRequest`]s. Errors (no controller yet, no such LUN, a LUN added
/// twice, a missing fd, an unreadable image) are [`crate::RemoteError`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScsiReply {
    /// The controller is set up.
    Attached,
    /// The LUN exists; `size` is its medium's size in bytes, if it was given one.
    Added { size: Option<u64> },
    /// The new medium is in and the tray closed; it holds `size` bytes.
    Inserted { size: u64 },
    /// The tray is open and the drive empty.
    Ejected,
    /// Refused: the guest locked the medium and `force` was not given. The guest was sent
    /// an eject request. QEMU's QMP error (GenericError): "Device '%s' is locked and force
    /// was not specified, wait for tray to open and try again".
    Locked,
    /// The answer to [`ScsiRequest::Query`], in (target, lun) order.
    Luns(Vec<LunInfo>),
    /// The answer to [`ScsiRequest::Reset`].
    Reset,
}

/// Unsolicited reports from a SCSI controller process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ScsiEvent {
    /// The tray of drive `id` moved: the guest's START STOP UNIT with LoEj, or an
    /// [`ScsiRequest::Eject`] / [`ScsiRequest::InsertMedium`]. QMP DEVICE_TRAY_MOVED.
    TrayMoved { id: String, tray_open: bool },
}

/// The vmm's end of a SCSI process's control socket.
pub type ScsiChannel = Channel<ScsiRequest, ScsiReply, ScsiEvent>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::Message;

    #[test]
    fn messages_round_trip() {
        let msgs: Vec<Message<ScsiRequest, ScsiReply, ScsiEvent>> = vec![
            Message::Request {
                id: 1,
                body: ScsiRequest::AttachController {
                    num_queues: 2,
                    queue_size: 128,
                },
            },
            Message::Request {
                id: 2,
                body: ScsiRequest::AddCdrom {
                    target: 3,
                    lun: 0,
                    id: "cd0".into(),
                    serial: String::new(),
                },
            },
            Message::Request {
                id: 3,
                body: ScsiRequest::Eject {
                    target: 3,
                    lun: 0,
                    force: true,
                },
            },
            Message::Reply {
                id: 4,
                body: Ok(ScsiReply::Luns(vec![LunInfo {
                    target: 3,
                    lun: 0,
                    id: "cd0".into(),
                    tray_open: false,
                    locked: true,
                    inserted: true,
                    size: 1 << 20,
                }])),
            },
            Message::Event(ScsiEvent::TrayMoved {
                id: "cd0".into(),
                tray_open: true,
            }),
        ];
        for m in msgs {
            let bytes = postcard::to_stdvec(&m).unwrap();
            let back: Message<ScsiRequest, ScsiReply, ScsiEvent> =
                postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back, m);
        }
    }
}
