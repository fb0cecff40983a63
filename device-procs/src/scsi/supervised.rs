//! `vmm-scsi` as a device process of the vmm: control socket at fd 3, listening
//! vhost-user socket at fd 4, sandbox first, then hello, AttachController, and vhost-user
//! connections one after another while a control thread adds LUNs and changes media,
//! until the vmm closes the control socket or sends SIGTERM.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipc::frame::FrameError;
use ipc::scsi::{ScsiEvent, ScsiReply, ScsiRequest};
use ipc::{Channel, DeviceKind, IpcError, Message, RemoteError};

use super::backend::{self, ScsiBackend};
use super::bus::{Bus, BusError, EventHook};
use super::cdrom::Medium;
use super::ScsiError;
use crate::sandbox::{self, Profile};
use crate::{inherit, seccomp};

/// The device's end of the control channel.
pub type DeviceChannel = Channel<ScsiRequest, ScsiReply, ScsiEvent>;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run() -> Result<(), ScsiError> {
    let (control, listener) = inherit::inherited_sockets()?;
    super::block_termination_signals()?;
    sandbox::enter(Profile::BLOCK.with_seccomp(seccomp::Kind::Block))?;
    let mut channel = DeviceChannel::new(control);
    channel.hello(DeviceKind::Block, DeviceKind::Block, HELLO_TIMEOUT)?;
    let (attach_id, num_queues, queue_size) = wait_for_attach(&mut channel)?;

    // Replies (control thread) and events (control and queue threads) share one sender;
    // the control thread receives on its own handle of the same socket.
    let sender = Arc::new(Mutex::new(DeviceChannel::new(
        channel.socket().try_clone().map_err(ScsiError::Control)?,
    )));
    let bus = Arc::new(Bus::new(Some(event_hook(sender.clone()))));
    let backend = Arc::new(ScsiBackend::new(bus.clone(), num_queues, queue_size)?);
    reply(&sender, attach_id, Ok(ScsiReply::Attached));
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || control_loop(channel, sender, &bus))
        .map_err(ScsiError::Thread)?;
    super::spawn_signal_thread()?;
    backend::serve(backend, listener)?;
    Ok(())
}

/// Wait for AttachController; refuse anything else (with a reply) and bad configurations.
/// The request's id and the configuration; the reply is the caller's.
fn wait_for_attach(channel: &mut DeviceChannel) -> Result<(u64, u16, u16), ScsiError> {
    loop {
        let (msg, _fds) = channel.recv(None)?;
        match msg {
            Message::Request {
                id,
                body:
                    ScsiRequest::AttachController {
                        num_queues,
                        queue_size,
                    },
            } => match backend::check_queues(num_queues, queue_size) {
                Ok(()) => return Ok((id, num_queues, queue_size)),
                Err(e) => {
                    tracing::warn!("AttachController refused: {e}");
                    channel.reply(id, Err(RemoteError(e.to_string())), &[])?;
                }
            },
            Message::Request { id, .. } => {
                channel.reply(
                    id,
                    Err(RemoteError("no controller is attached yet".into())),
                    &[],
                )?;
            }
            _ => tracing::warn!("ignoring a control message before AttachController"),
        }
    }
}

fn reply(sender: &Mutex<DeviceChannel>, id: u64, body: Result<ScsiReply, RemoteError>) {
    let mut ch = sender.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = ch.reply(id, body, &[]) {
        tracing::warn!("cannot reply on the control socket: {e}");
    }
}

/// Send the bus's events (tray moves) to the vmm.
fn event_hook(sender: Arc<Mutex<DeviceChannel>>) -> EventHook {
    Box::new(move |event| {
        let mut ch = sender.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = ch.event(event, &[]) {
            tracing::warn!("cannot send an event on the control socket: {e}");
        }
    })
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

/// Serve control requests after AttachController. The vmm closing the socket ends the
/// process.
fn control_loop(mut channel: DeviceChannel, sender: Arc<Mutex<DeviceChannel>>, bus: &Bus) {
    loop {
        match channel.recv(None) {
            Ok((Message::Request { id, body }, fds)) => {
                let result = handle(bus, body, fds);
                if let Err(e) = &result {
                    tracing::warn!("control request refused: {e}");
                }
                reply(&sender, id, result);
            }
            Ok(_) => tracing::warn!("ignoring an unexpected control message"),
            Err(IpcError::Frame(FrameError::Closed)) => {
                tracing::info!("the vmm closed the control socket: exiting");
                std::process::exit(0);
            }
            Err(e) => {
                tracing::error!("control socket: {e}");
                std::process::exit(1);
            }
        }
    }
}
