//! `vmm-scsi` as a device process of the vmm: control socket at fd 3, listening
//! vhost-user socket at fd 4, sandbox first, then hello, AttachController, and vhost-user
//! connections one after another while a control thread adds LUNs and changes media,
//! until the vmm closes the control socket or sends SIGTERM.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use ipc::scsi::{ScsiEvent, ScsiReply, ScsiRequest};
use ipc::{DeviceKind, RemoteError};

use super::backend::{self, ScsiBackend};
use super::bus::{Bus, BusError};
use super::cdrom::Medium;
use super::ScsiError;
use crate::sandbox::Profile;
use crate::seccomp;
use crate::supervised as process;

pub fn run() -> Result<(), ScsiError> {
    let (mut channel, listener) = process::start::<ScsiRequest, ScsiReply, ScsiEvent>(
        DeviceKind::Block,
        Profile::BLOCK.with_seccomp(seccomp::Kind::Block),
    )?;
    let (attach_id, (num_queues, queue_size)) =
        process::wait_for_setup(&mut channel, attach_request)?;

    // Replies (control thread) and events (control and queue threads) share one sender;
    // the control thread receives on its own handle of the same socket.
    let sender = process::Sender::new(&channel)?;
    let events = sender.clone();
    let bus = Arc::new(Bus::new(Some(Box::new(move |event| {
        events.event(event, &[])
    }))));
    let backend = Arc::new(ScsiBackend::new(bus.clone(), num_queues, queue_size)?);
    sender.reply(attach_id, Ok(ScsiReply::Attached));
    // Every command completes synchronously and nothing is written: nothing to do before
    // exiting.
    let nothing: Arc<dyn Fn() + Send + Sync> = Arc::new(|| {});
    process::spawn_control_loop(
        channel,
        sender,
        move |request, fds| handle(&bus, request, fds),
        nothing.clone(),
    )?;
    process::spawn_signal_thread(nothing)?;
    crate::vhost_daemon::serve(backend, listener)?;
    Ok(())
}

/// The setup request, AttachController: refuse anything else, and bad configurations.
fn attach_request(request: ScsiRequest, _fds: Vec<OwnedFd>) -> Result<(u16, u16), RemoteError> {
    match request {
        ScsiRequest::AttachController {
            num_queues,
            queue_size,
        } => backend::check_queues(num_queues, queue_size)
            .map(|()| (num_queues, queue_size))
            .map_err(|e| RemoteError(e.to_string())),
        _ => Err(RemoteError("no controller is attached yet".into())),
    }
}

/// The one image fd of a message, as a medium.
fn medium(fds: Vec<OwnedFd>) -> Result<Medium, RemoteError> {
    match <[OwnedFd; 1]>::try_from(fds) {
        Ok([fd]) => Medium::new(File::from(fd)).map_err(|e| RemoteError(e.to_string())),
        Err(fds) => Err(RemoteError(format!(
            "the message carries the image as exactly one fd, this one carried {}",
            fds.len()
        ))),
    }
}

/// Answer one request after AttachController.
fn handle(bus: &Bus, body: ScsiRequest, fds: Vec<OwnedFd>) -> Result<ScsiReply, RemoteError> {
    let remote = |e: BusError| RemoteError(e.to_string());
    // Locked is an answer, not a failure.
    let locked = |e: BusError| match e {
        BusError::Cdrom(super::cdrom::CdromError::Locked) => Ok(ScsiReply::Locked),
        e => Err(remote(e)),
    };
    match body {
        ScsiRequest::AttachController { .. } => {
            Err(RemoteError("the controller is already attached".into()))
        }
        ScsiRequest::AddCdrom {
            target,
            lun,
            id,
            serial,
        } => {
            let medium = match fds.len() {
                0 => None,
                _ => Some(medium(fds)?),
            };
            let size = medium.as_ref().map(Medium::size);
            bus.add_cdrom(target, lun, &id, &serial, medium)
                .map_err(remote)?;
            tracing::info!("CD-ROM {id} at target {target}, LUN {lun}");
            Ok(ScsiReply::Added { size })
        }
        ScsiRequest::InsertMedium { target, lun } => {
            let medium = medium(fds)?;
            let size = medium.size();
            match bus.insert(target, lun, medium) {
                Ok(()) => Ok(ScsiReply::Inserted { size }),
                Err(e) => locked(e),
            }
        }
        ScsiRequest::Eject { target, lun, force } => match bus.eject(target, lun, force) {
            Ok(()) => Ok(ScsiReply::Ejected),
            Err(e) => locked(e),
        },
        ScsiRequest::Query => Ok(ScsiReply::Luns(bus.query())),
        ScsiRequest::Reset => {
            bus.reset();
            Ok(ScsiReply::Reset)
        }
    }
}
