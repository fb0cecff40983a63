//! Block migration's side of the device manager: each writable virtio-blk disk's `vmm-blk`
//! tracks the chunks the guest changes (re-armed on a restarted process with the same
//! bitmap) and reads chunks on the source; on the destination it writes them, into an
//! image we checked (size, backing file), locked, and marked incomplete until the guest
//! has arrived.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipc::blk::{BlkChannel, BlkReply, BlkRequest, InitialChunks};

use super::block::{BlockDevice, SharedBlock};
use super::{lock, DeviceError, DeviceManager};
use crate::drive;
use crate::migration::disk::{
    BackingId, BlockMode, ChunkBitmap, DiskInfo, DiskIo, SourceDisk, CHUNK_SIZE,
};

/// How long one read or write of chunks may take.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

fn migration_error(why: String) -> DeviceError {
    DeviceError::Migration(why)
}

/// Ask `control` to track into `bitmap` (marking `initial` at once): how many it marked.
pub(super) fn track(
    name: &str,
    control: &mut BlkChannel,
    bitmap: &ChunkBitmap,
    initial: InitialChunks,
) -> Result<u64, DeviceError> {
    let request = BlkRequest::TrackDirty {
        chunk_size: CHUNK_SIZE,
        initial,
    };
    match control.call(request, &[bitmap.fd()], CHUNK_TIMEOUT) {
        Ok((BlkReply::Tracking { marked, .. }, _)) => Ok(marked),
        Ok((other, _)) => Err(super::process::unexpected(name, "TrackDirty", &other)),
        Err(ipc::IpcError::Remote(r)) => Err(migration_error(format!("{name}: {}", r.0))),
        Err(source) => Err(DeviceError::Ipc {
            name: name.to_string(),
            source,
        }),
    }
}

/// The backing file of a disk's top image, as an incremental migration compares it.
fn backing_id(b: &BlockDevice) -> Result<Option<BackingId>, DeviceError> {
    let Some(link) = b.image.backing.first() else {
        return Ok(None);
    };
    BackingId::read(&link.file, &link.recorded_name)
        .map(Some)
        .map_err(|e| {
            migration_error(format!(
                "cannot read backing file '{}' of drive '{}': {e}",
                link.recorded_name, b.drive
            ))
        })
}

impl DeviceManager {
    /// Start a block migration: every writable virtio-blk disk's process marks the chunks
    /// to send (all, or what the top image holds) and tracks the guest's writes. Refused
    /// for a disk whose contents we cannot read (an external vhost-user-blk backend).
    pub fn start_block_migration(&self, mode: BlockMode) -> Result<Vec<SourceDisk>, DeviceError> {
        if let Some(f) = self
            .functions
            .values()
            .find(|f| f.driver == "vhost-user-blk-pci")
        {
            let name = f.id.as_deref().unwrap_or(&f.driver);
            return Err(migration_error(format!(
                "Block migration cannot copy '{name}': its backend is not ours (use shared storage)"
            )));
        }
        let initial = match mode {
            BlockMode::Shared => return Ok(Vec::new()),
            BlockMode::Full => InitialChunks::All,
            BlockMode::Incremental => InitialChunks::Top,
        };
        let mut disks = Vec::new();
        for block in &self.blocks {
            let mut b = lock(block);
            if b.drive_config.readonly {
                continue;
            }
            if !b.supervision.running() {
                drop(b);
                self.stop_block_migration();
                return Err(migration_error(format!(
                    "the process serving drive '{}' is not running",
                    lock(block).drive
                )));
            }
            let result = self.arm_disk(&mut b, mode, initial, block);
            match result {
                Ok(disk) => disks.push(disk),
                Err(e) => {
                    drop(b);
                    self.stop_block_migration();
                    return Err(e);
                }
            }
        }
        Ok(disks)
    }

    fn arm_disk(
        &self,
        b: &mut BlockDevice,
        mode: BlockMode,
        initial: InitialChunks,
        block: &SharedBlock,
    ) -> Result<SourceDisk, DeviceError> {
        let backing = match mode {
            BlockMode::Incremental => backing_id(b)?,
            _ => None,
        };
        let bitmap = Arc::new(ChunkBitmap::new(b.size).map_err(migration_error)?);
        let name = b.supervision.name.clone();
        let marked = track(&name, &mut b.control, &bitmap, initial)?;
        bitmap
            .initial
            .store(marked, std::sync::atomic::Ordering::Relaxed);
        b.tracking = Some(bitmap.clone());
        Ok(SourceDisk {
            info: DiskInfo {
                drive: b.drive.clone(),
                size: b.size,
                incremental: mode == BlockMode::Incremental,
                backing,
            },
            bitmap,
            io: Box::new(BlockIo {
                block: block.clone(),
            }),
        })
    }

    /// The block migration is over: the processes stop tracking.
    pub fn stop_block_migration(&self) {
        for block in &self.blocks {
            let mut b = lock(block);
            if b.tracking.take().is_some() && b.supervision.running() {
                if let Err(e) = b.control.call(BlkRequest::StopTracking, &[], CHUNK_TIMEOUT) {
                    tracing::warn!(drive = %b.drive, "cannot stop tracking the disk: {e}");
                }
            }
        }
    }

    /// An incoming block migration names its disks: check each against ours (it exists,
    /// has the same size, and for `inc` the same backing file), take its image's lock
    /// (refused while another process holds it) and mark the image incomplete. Nothing is
    /// written before every disk passed.
    pub fn prepare_incoming_disks(
        &self,
        infos: &[DiskInfo],
    ) -> Result<Vec<Box<dyn DiskIo>>, DeviceError> {
        let mut found = Vec::new();
        for info in infos {
            let block = self
                .blocks
                .iter()
                .find(|b| lock(b).drive == info.drive)
                .ok_or_else(|| {
                    migration_error(format!(
                        "drive '{}' of the source has no disk here",
                        info.drive
                    ))
                })?;
            let b = lock(block);
            if b.drive_config.readonly {
                return Err(migration_error(format!(
                    "drive '{}' is read-only here",
                    info.drive
                )));
            }
            if b.size != info.size {
                return Err(migration_error(format!(
                    "drive '{}' holds {} bytes here but {} on the source",
                    info.drive, b.size, info.size
                )));
            }
            if let Some(want) = &info.backing {
                match backing_id(&b)? {
                    None => {
                        return Err(migration_error(format!(
                            "drive '{}' has no backing file here, but the source's is '{}'",
                            info.drive, want.filename
                        )))
                    }
                    Some(got) if !got.same_file(want) => {
                        return Err(migration_error(format!(
                            "drive '{}': backing file '{}' is not the source's '{}' (its size or contents differ)",
                            info.drive, got.filename, want.filename
                        )))
                    }
                    Some(_) => {}
                }
            }
            found.push(block.clone());
        }
        for block in &found {
            let mut b = lock(block);
            if !b.locked {
                drive::lock_image(&b.image.top, &b.image.path, false)?;
                b.locked = true;
            }
        }
        for block in &found {
            let mut b = lock(block);
            drive::mark_incomplete(&b.image.top, &b.image.path)?;
            b.incomplete = true;
        }
        Ok(found
            .into_iter()
            .map(|block| Box::new(BlockIo { block }) as Box<dyn DiskIo>)
            .collect())
    }

    /// The incoming migration is done and the guest runs: once what the disks received is
    /// on stable storage (a thread syncs them, out of the downtime), their images are no
    /// longer marked incomplete. Until then a host crash leaves them marked, as it should.
    pub fn finish_incoming_disks(&self) {
        let mut files = Vec::new();
        for block in &self.blocks {
            let b = lock(block);
            if !b.incomplete {
                continue;
            }
            match b.image.top.try_clone() {
                Ok(file) => files.push((block.clone(), file, b.image.path.clone())),
                Err(e) => tracing::error!(drive = %b.drive, "cannot sync the migrated disk: {e}"),
            }
        }
        if files.is_empty() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("disk-sync".into())
            .spawn(move || {
                for (block, file, path) in files {
                    let result = file.sync_data().map_err(|e| e.to_string()).and_then(|()| {
                        drive::clear_incomplete(&file, &path).map_err(|e| e.to_string())
                    });
                    match result {
                        Ok(()) => lock(&block).incomplete = false,
                        Err(e) => tracing::error!(
                            "the migrated disk '{path}' stays marked incomplete: {e}"
                        ),
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot sync the migrated disks: {e}");
        }
    }
}

/// A disk's chunk I/O, through its process (whichever one serves it now).
struct BlockIo {
    block: Arc<Mutex<BlockDevice>>,
}

impl BlockIo {
    fn call(&self, request: BlkRequest, buffer: BorrowedFd<'_>) -> Result<BlkReply, String> {
        let mut b = lock(&self.block);
        if !b.supervision.running() {
            return Err(format!(
                "the process serving drive '{}' is restarting",
                b.drive
            ));
        }
        let name = b.supervision.name.clone();
        b.control
            .call(request, &[buffer], CHUNK_TIMEOUT)
            .map(|(reply, _)| reply)
            .map_err(|e| format!("{name}: {e}"))
    }
}

impl DiskIo for BlockIo {
    fn read_chunks(
        &self,
        buffer: BorrowedFd<'_>,
        first: u64,
        count: u32,
    ) -> Result<Vec<bool>, String> {
        let request = BlkRequest::ReadChunks {
            chunk_size: CHUNK_SIZE,
            first,
            count,
        };
        match self.call(request, buffer)? {
            BlkReply::ChunksRead { zero } => Ok(zero),
            other => Err(format!("unexpected answer to ReadChunks: {other:?}")),
        }
    }

    fn write_chunks(
        &self,
        buffer: BorrowedFd<'_>,
        first: u64,
        zero: Vec<bool>,
    ) -> Result<(), String> {
        let request = BlkRequest::WriteChunks {
            chunk_size: CHUNK_SIZE,
            first,
            zero,
        };
        match self.call(request, buffer)? {
            BlkReply::ChunksWritten => Ok(()),
            other => Err(format!("unexpected answer to WriteChunks: {other:?}")),
        }
    }
}
