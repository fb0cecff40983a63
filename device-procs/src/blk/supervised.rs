//! `vmm-blk` as a device process of the vmm: control socket at fd 3, listening vhost-user
//! socket at fd 4, sandbox first, then hello, Attach (the image arrives as an fd), and
//! vhost-user connections one after another until the vmm goes away or sends SIGTERM.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipc::blk::{AttachConfig, BlkEvent, BlkReply, BlkRequest, ImageChain};
use ipc::frame::FrameError;
use ipc::{Channel, DeviceKind, IpcError, Message, RemoteError};

use super::backend::{self, BlkBackend, EventHook};
use super::image::Image;
use super::request::{Disk, Fault};
use super::BlkError;
use crate::sandbox::{self, Profile};
use crate::{inherit, seccomp};

/// The device's end of the control channel.
pub type DeviceChannel = Channel<BlkRequest, BlkReply, BlkEvent>;

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run() -> Result<(), BlkError> {
    let (control, listener) = inherit::inherited_sockets()?;
    super::block_termination_signals()?;
    sandbox::enter(Profile::BLOCK.with_seccomp(seccomp::Kind::Block))?;
    let mut channel = DeviceChannel::new(control);
    channel.hello(DeviceKind::Block, DeviceKind::Block, HELLO_TIMEOUT)?;
    let (attach_id, disk, config) = wait_for_attach(&mut channel)?;
    let size = disk.capacity() * super::config::SECTOR_SIZE;
    let encrypted = disk.encrypted();

    // Replies (control thread) and events (queue threads) share one sender; the control
    // thread receives on its own handle of the same socket.
    let sender = Arc::new(Mutex::new(DeviceChannel::new(
        channel.socket().try_clone().map_err(BlkError::Control)?,
    )));
    let backend = Arc::new(BlkBackend::new(
        disk,
        config.num_queues,
        config.queue_size,
        config.error_policy,
        Some(event_hook(sender.clone())),
    )?);
    reply(
        &sender,
        attach_id,
        Ok(BlkReply::Attached { size, encrypted }),
    );
    if let Some(delay) = std::env::var(TEST_HOOK_BAD_RPC)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        let sender = sender.clone();
        std::thread::Builder::new()
            .name("test-hook".into())
            .spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(delay));
                send_garbage(&sender);
            })
            .map_err(BlkError::Thread)?;
    }
    std::thread::Builder::new()
        .name("control".into())
        .spawn({
            let backend = backend.clone();
            move || control_loop(channel, sender, &backend)
        })
        .map_err(BlkError::Thread)?;
    let flushing = backend.clone();
    super::spawn_signal_thread(Arc::new(move || flushing.disk().flush_for_exit()))?;
    backend::serve(backend, listener)?;
    Ok(())
}

/// Test hook: with this variable in the environment (the vmm passes its own on) set to a
/// number of milliseconds, the process plays a compromised backend and sends an
/// undecodable control message that long after it is attached, so tests can check that
/// the vmm drops it and keeps the VM running.
pub const TEST_HOOK_BAD_RPC: &str = "VMM_BLK_TEST_BAD_RPC";

/// Test hooks: with these variables in the environment when the disk is attached, the
/// guest's reads (or writes) fail on the host with an errno, so that tests can drive the
/// error policies. The value is `eio`, `enospc` or an errno number, optionally followed by
/// `:COUNT` to fail only the next COUNT requests (e.g. `eio:1`); without a count every one
/// fails. Only plain reads and writes fail (not flushes, discards or write-zeroes).
pub const TEST_HOOK_FAIL_READS: &str = "VMM_BLK_TEST_FAIL_READS";
pub const TEST_HOOK_FAIL_WRITES: &str = "VMM_BLK_TEST_FAIL_WRITES";

/// The fault a test hook variable asks for.
fn test_fault(var: &str) -> Result<Option<Fault>, BlkError> {
    match std::env::var(var) {
        Ok(spec) => {
            let fault = Fault::parse(&spec)
                .map_err(|why| BlkError::Image(std::io::Error::other(format!("{var}: {why}"))))?;
            tracing::warn!("test hook {var}={spec}: host I/O errors are injected");
            Ok(Some(fault))
        }
        Err(_) => Ok(None),
    }
}

fn send_garbage(sender: &Arc<Mutex<DeviceChannel>>) {
    let ch = sender.lock().unwrap_or_else(|e| e.into_inner());
    // A well-framed payload that is no Message: an enum tag far out of range.
    let garbage = [0xffu8, 0xff, 0xff, 0xff, 0x0f, 0x42];
    if let Err(e) = ipc::frame::send_frame(ch.socket(), &garbage, &[]) {
        eprintln!("vmm-blk: test hook: could not send the bad message: {e}");
    }
}

/// Wait for the Attach request; refuse bad ones (with a reply) and wait on. The request's
/// id, its disk and its configuration; the reply is the caller's.
fn wait_for_attach(channel: &mut DeviceChannel) -> Result<(u64, Disk, AttachConfig), BlkError> {
    loop {
        let (msg, fds) = channel.recv(None)?;
        let (id, config, chain) = match msg {
            Message::Request {
                id,
                body: BlkRequest::Attach(config),
            } => (id, config, ImageChain::raw()),
            Message::Request {
                id,
                body: BlkRequest::AttachChain { config, chain },
            } => (id, config, chain),
            Message::Request { id, .. } => {
                channel.reply(id, Err(RemoteError("no disk is attached yet".into())), &[])?;
                continue;
            }
            _ => {
                tracing::warn!("ignoring a control message before Attach");
                continue;
            }
        };
        match attach(&config, &chain, fds) {
            Ok(disk) => return Ok((id, disk, config)),
            Err(e) => {
                tracing::warn!("Attach refused: {e}");
                channel.reply(id, Err(RemoteError(e.to_string())), &[])?;
            }
        }
    }
}

/// Check an Attach request and open its disk: `fds` are the image and its backing
/// images, in chain order.
fn attach(config: &AttachConfig, chain: &ImageChain, fds: Vec<OwnedFd>) -> Result<Disk, BlkError> {
    let count = fds.len();
    if count != chain.backing.len() + 1 {
        return Err(BlkError::AttachFds {
            got: count,
            want: chain.backing.len() + 1,
        });
    }
    let Some(fd) = fds.first() else {
        return Err(BlkError::AttachFds { got: 0, want: 1 });
    };
    if config.num_queues == 0 || config.num_queues > backend::MAX_QUEUES {
        return Err(backend::BackendError::NumQueues(config.num_queues).into());
    }
    if !config.queue_size.is_power_of_two() || config.queue_size > backend::MAX_QUEUE_SIZE {
        return Err(backend::BackendError::QueueSize(config.queue_size).into());
    }
    // SAFETY: F_GETFL on an fd we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(BlkError::Image(std::io::Error::last_os_error()));
    }
    if !config.readonly && flags & libc::O_ACCMODE == libc::O_RDONLY {
        return Err(BlkError::ReadOnlyFd);
    }
    let files: Vec<File> = fds.into_iter().map(File::from).collect();
    let image = Image::open(chain.format, &chain.backing, files, !config.readonly)?;
    let mut disk = Disk::with_image(image, config.readonly, &config.serial)?;
    disk.inject_faults(
        test_fault(TEST_HOOK_FAIL_READS)?,
        test_fault(TEST_HOOK_FAIL_WRITES)?,
    );
    if disk.encrypted() {
        tracing::info!("the disk is encrypted: every request fails until SetKey");
    }
    Ok(disk)
}

fn reply(sender: &Mutex<DeviceChannel>, id: u64, body: Result<BlkReply, RemoteError>) {
    let mut ch = sender.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(e) = ch.reply(id, body, &[]) {
        tracing::warn!("cannot reply on the control socket: {e}");
    }
}

/// Send events to the vmm. RequestFailed is not rate-limited (QEMU emits BLOCK_IO_ERROR
/// for every failure); the error policy sends one per failure, and for `stop` only the one
/// that stops the disk.
fn event_hook(sender: Arc<Mutex<DeviceChannel>>) -> EventHook {
    Box::new(move |event| {
        let mut ch = sender.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = ch.event(event, &[]) {
            tracing::warn!("cannot send an event on the control socket: {e}");
        }
    })
}

/// Serve control requests after Attach. The vmm closing the socket ends the process.
fn control_loop(
    mut channel: DeviceChannel,
    sender: Arc<Mutex<DeviceChannel>>,
    backend: &BlkBackend,
) {
    loop {
        match channel.recv(None) {
            Ok((
                Message::Request {
                    id,
                    body: BlkRequest::Resize { size },
                },
                _fds,
            )) => {
                let result = backend
                    .resize(size)
                    .map(|size| BlkReply::Resized { size })
                    .map_err(|e| RemoteError(format!("cannot resize the disk: {e}")));
                reply(&sender, id, result);
            }
            Ok((
                Message::Request {
                    id,
                    body: BlkRequest::Stats,
                },
                _fds,
            )) => reply(&sender, id, Ok(BlkReply::Stats(backend.disk().stats()))),
            Ok((
                Message::Request {
                    id,
                    body: BlkRequest::Snapshot { format },
                },
                fds,
            )) => {
                let result = match <[OwnedFd; 1]>::try_from(fds) {
                    Ok([fd]) => backend
                        .disk()
                        .snapshot(File::from(fd), format)
                        .map(|()| BlkReply::SnapshotTaken)
                        .map_err(|e| RemoteError(format!("cannot take the snapshot: {e}"))),
                    Err(fds) => Err(RemoteError(format!(
                        "Snapshot carries the overlay as exactly one fd, this one carried {}",
                        fds.len()
                    ))),
                };
                if let Err(e) = &result {
                    tracing::warn!("{}", e.0);
                } else {
                    tracing::info!("snapshot taken: writes go to the new overlay");
                }
                reply(&sender, id, result);
            }
            Ok((
                Message::Request {
                    id,
                    body: BlkRequest::SetKey { password },
                },
                _fds,
            )) => {
                let result = backend
                    .disk()
                    .set_key(&password)
                    .map(|()| BlkReply::KeySet)
                    .map_err(|e| RemoteError(format!("cannot set the key: {e}")));
                if result.is_ok() {
                    tracing::info!("key set: the encrypted disk is served");
                }
                reply(&sender, id, result);
            }
            Ok((
                Message::Request {
                    id,
                    body: BlkRequest::Resume,
                },
                _fds,
            )) => {
                let retried = backend.resume();
                tracing::info!("resumed: {retried} held requests carried out again");
                reply(&sender, id, Ok(BlkReply::Resumed { retried }));
            }
            Ok((
                Message::Request {
                    id,
                    body: BlkRequest::Attach(_) | BlkRequest::AttachChain { .. },
                },
                _fds,
            )) => reply(
                &sender,
                id,
                Err(RemoteError("a disk is already attached".into())),
            ),
            Ok(_) => tracing::warn!("ignoring an unexpected control message"),
            Err(IpcError::Frame(FrameError::Closed)) => {
                tracing::info!("the vmm closed the control socket: exiting");
                backend.disk().flush_for_exit();
                std::process::exit(0);
            }
            Err(e) => {
                tracing::error!("control socket: {e}");
                std::process::exit(1);
            }
        }
    }
}
