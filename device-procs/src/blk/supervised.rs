//! `vmm-blk` as a device process of the vmm (see [`crate::supervised`]): after the hello,
//! Attach (the image and its backing chain arrive as fds), then resizes, snapshots, keys
//! and resumes on the control socket while the vhost-user listener serves the queues.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use ipc::blk::{AttachConfig, BlkEvent, BlkReply, BlkRequest, ImageChain};
use ipc::{DeviceKind, RemoteError};

use super::backend::{self, BlkBackend};
use super::image::Image;
use super::request::{Disk, Fault};
use super::BlkError;
use crate::sandbox::Profile;
use crate::seccomp;
use crate::supervised as process;

pub fn run() -> Result<(), BlkError> {
    let (mut channel, listener) = process::start::<BlkRequest, BlkReply, BlkEvent>(
        DeviceKind::Block,
        Profile::BLOCK.with_seccomp(seccomp::Kind::Block),
    )?;
    let (attach_id, (disk, config)) = process::wait_for_setup(&mut channel, attach_request)?;
    let size = disk.capacity() * super::config::SECTOR_SIZE;
    let encrypted = disk.encrypted();

    // Replies (control thread) and events (queue threads) share one sender; the control
    // thread receives on its own handle of the same socket.
    let sender = process::Sender::new(&channel)?;
    let events = sender.clone();
    let backend = Arc::new(BlkBackend::new(
        disk,
        config.num_queues,
        config.queue_size,
        config.error_policy,
        Some(Box::new(move |event| events.event(event, &[]))),
    )?);
    sender.reply(attach_id, Ok(BlkReply::Attached { size, encrypted }));
    let controlled = backend.clone();
    let flushing = backend.clone();
    let before_exit: Arc<dyn Fn() + Send + Sync> =
        Arc::new(move || flushing.disk().flush_for_exit());
    process::spawn_control_loop(
        channel,
        sender,
        move |request, fds| control_request(&controlled, request, fds),
        before_exit.clone(),
    )?;
    process::spawn_signal_thread(before_exit)?;
    crate::vhost_daemon::serve(backend, listener)?;
    Ok(())
}

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

/// The setup request, Attach: refuse anything else, and bad ones. The disk and its
/// configuration; the reply is the caller's.
fn attach_request(
    request: BlkRequest,
    fds: Vec<OwnedFd>,
) -> Result<(Disk, AttachConfig), RemoteError> {
    let (config, chain) = match request {
        BlkRequest::Attach(config) => (config, ImageChain::raw()),
        BlkRequest::AttachChain { config, chain } => (config, chain),
        _ => return Err(RemoteError("no disk is attached yet".into())),
    };
    let disk = attach(&config, &chain, fds).map_err(|e| RemoteError(e.to_string()))?;
    Ok((disk, config))
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

/// Answer one control request after Attach.
fn control_request(
    backend: &BlkBackend,
    request: BlkRequest,
    fds: Vec<OwnedFd>,
) -> Result<BlkReply, RemoteError> {
    match request {
        BlkRequest::Resize { size } => backend
            .resize(size)
            .map(|size| BlkReply::Resized { size })
            .map_err(|e| RemoteError(format!("cannot resize the disk: {e}"))),
        BlkRequest::Stats => Ok(BlkReply::Stats(backend.disk().stats())),
        BlkRequest::Snapshot { format } => {
            let fd = one_fd("Snapshot", fds)?;
            backend
                .disk()
                .snapshot(File::from(fd), format)
                .map_err(|e| RemoteError(format!("cannot take the snapshot: {e}")))?;
            tracing::info!("snapshot taken: writes go to the new overlay");
            Ok(BlkReply::SnapshotTaken)
        }
        BlkRequest::SetKey { password } => {
            backend
                .disk()
                .set_key(&password)
                .map_err(|e| RemoteError(format!("cannot set the key: {e}")))?;
            tracing::info!("key set: the encrypted disk is served");
            Ok(BlkReply::KeySet)
        }
        BlkRequest::Resume => {
            let retried = backend.resume();
            tracing::info!("resumed: {retried} held requests carried out again");
            Ok(BlkReply::Resumed { retried })
        }
        BlkRequest::TrackDirty {
            chunk_size,
            initial,
        } => {
            let fd = one_fd("TrackDirty", fds)?;
            let disk = backend.disk();
            let marked = disk
                .track_chunks(&fd, chunk_size, initial)
                .map_err(|e| RemoteError(format!("cannot track the disk's writes: {e}")))?;
            tracing::info!(
                "block migration: tracking chunks of {chunk_size} bytes, {marked} marked"
            );
            Ok(BlkReply::Tracking {
                size: disk.capacity() * super::config::SECTOR_SIZE,
                marked,
            })
        }
        BlkRequest::StopTracking => {
            backend.disk().dirty_chunks().stop();
            Ok(BlkReply::Tracking { size: 0, marked: 0 })
        }
        BlkRequest::ReadChunks {
            chunk_size,
            first,
            count,
        } => {
            let fd = one_fd("ReadChunks", fds)?;
            let zero = backend
                .disk()
                .read_chunks(&fd, chunk_size, first, count)
                .map_err(|e| RemoteError(format!("cannot read the disk for migration: {e}")))?;
            Ok(BlkReply::ChunksRead { zero })
        }
        BlkRequest::WriteChunks {
            chunk_size,
            first,
            zero,
        } => {
            let fd = one_fd("WriteChunks", fds)?;
            backend
                .disk()
                .write_chunks(&fd, chunk_size, first, &zero)
                .map_err(|e| RemoteError(format!("cannot write the migrated disk: {e}")))?;
            Ok(BlkReply::ChunksWritten)
        }
        BlkRequest::Attach(_) | BlkRequest::AttachChain { .. } => {
            Err(RemoteError("a disk is already attached".into()))
        }
    }
}

/// The one fd a request carries.
fn one_fd(request: &str, fds: Vec<OwnedFd>) -> Result<OwnedFd, RemoteError> {
    <[OwnedFd; 1]>::try_from(fds).map(|[fd]| fd).map_err(|fds| {
        RemoteError(format!(
            "{request} carries exactly one fd, this one carried {}",
            fds.len()
        ))
    })
}
