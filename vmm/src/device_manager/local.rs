//! Local migration's side of the device manager: the host resources a source hands over
//! (each writable disk's image, each tap, the framebuffer), and on the destination their
//! checks against its own configuration and their adoption. A device process whose
//! resource changes is replaced (the watcher starts a successor on the new fds, as after a
//! crash): the disks' and the taps' before the source stops, the display's once the guest
//! runs again.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::process::SupervisedDevice;
use super::{lock, DeviceError, DeviceManager};
use crate::migration::local::{LocalFds, LocalItem};

/// Why a process is replaced, in its events.
pub(super) const HANDED_OVER: &str = "its host resources were handed over by a local migration";
/// How long a replaced disk process may take to come back.
const REPLACE_TIMEOUT: Duration = Duration::from_secs(10);

fn local_error(why: String) -> DeviceError {
    DeviceError::Migration(why)
}

fn dup(fd: impl AsFd, what: &str) -> Result<OwnedFd, DeviceError> {
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(|e| local_error(format!("cannot hand {what} over: {e}")))
}

/// The device and inode of an open file.
fn identity(file: &File) -> Option<(u64, u64)> {
    file.metadata().ok().map(|m| (m.dev(), m.ino()))
}

impl DeviceManager {
    /// The source's side: a copy of every resource to hand over.
    pub fn local_resources(&self) -> Result<LocalFds, DeviceError> {
        let mut fds = LocalFds::new();
        if let Some(adapter) = &self.display.adapter {
            fds.push((
                LocalItem::Vram,
                dup(lock(adapter).vram().file(), "the VRAM")?,
            ));
        }
        for block in &self.blocks {
            let b = lock(block);
            if !b.drive_config.readonly {
                let item = LocalItem::Image {
                    drive: b.drive.clone(),
                };
                fds.push((item, dup(&b.image.top, "an image")?));
            }
        }
        for (netdev, taps) in self.network.taps() {
            for (queue, fd) in taps.into_iter().enumerate() {
                let item = LocalItem::Tap {
                    netdev: netdev.clone(),
                    queue: queue as u16,
                };
                fds.push((item, fd));
            }
        }
        Ok(fds)
    }

    /// The destination's side, when the offer arrives: every resource must match one of
    /// ours and each of ours must be offered; the disks' images are adopted now (their
    /// processes replaced and back before this returns). What is left for later.
    pub fn prepare_local(&self, fds: LocalFds) -> Result<LocalFds, DeviceError> {
        let offered = |want: &LocalItem| fds.iter().any(|(item, _)| item == want);
        let differ =
            |what: String| local_error(format!("the source's configuration differs: {what}"));
        if self.display.adapter.is_some() != offered(&LocalItem::Vram) {
            return Err(differ(
                "one side has a display adapter, the other not".into(),
            ));
        }
        for block in &self.blocks {
            let b = lock(block);
            let want = LocalItem::Image {
                drive: b.drive.clone(),
            };
            if !b.drive_config.readonly && !offered(&want) {
                return Err(differ(format!("drive '{}' is not on the source", b.drive)));
            }
        }
        let ours = self.network.taps();
        for (netdev, taps) in &ours {
            for queue in 0..taps.len() {
                let want = LocalItem::Tap {
                    netdev: netdev.clone(),
                    queue: queue as u16,
                };
                if !offered(&want) {
                    return Err(differ(format!(
                        "netdev '{netdev}' has no tap {queue} there"
                    )));
                }
            }
        }
        let mut later = LocalFds::new();
        let mut images = Vec::new();
        let mut taps = Vec::new();
        for (item, fd) in fds {
            match &item {
                LocalItem::Image { drive } => {
                    let block = self
                        .blocks
                        .iter()
                        .find(|b| {
                            let b = lock(b);
                            b.drive == *drive && !b.drive_config.readonly
                        })
                        .ok_or_else(|| differ(format!("drive '{drive}' is not here")))?;
                    let file = File::from(fd);
                    let same = identity(&file).is_some()
                        && identity(&file) == identity(&lock(block).image.top);
                    if !same {
                        return Err(differ(format!("drive '{drive}' is another image here")));
                    }
                    images.push((block.clone(), file));
                }
                LocalItem::Tap { netdev, queue } => {
                    let known = ours
                        .iter()
                        .any(|(n, taps)| n == netdev && usize::from(*queue) < taps.len());
                    if !known {
                        return Err(differ(format!("netdev '{netdev}' has no tap {queue} here")));
                    }
                    taps.push((netdev.clone(), *queue, fd));
                }
                LocalItem::Vram => {
                    let Some(adapter) = &self.display.adapter else {
                        return Err(differ("no display adapter here".into()));
                    };
                    let len = File::from(dup(&fd, "the VRAM")?)
                        .metadata()
                        .map(|m| m.len())
                        .unwrap_or(0);
                    if len != lock(adapter).vram().len() as u64 {
                        return Err(differ("the VRAM sizes differ".into()));
                    }
                    later.push((item, fd));
                }
                LocalItem::Ram => later.push((item, fd)),
            }
        }
        // The disks' processes serve the source's open images from now on (their locks
        // are the source's until it lets go of them at the switchover).
        // So do the netdevs' processes the source's taps (they read them only once the
        // cards' queues run, on this side of the switchover).
        let mut replaced = Vec::new();
        for (block, file) in images {
            let mut b = lock(&block);
            b.image.top = file;
            let old = b.supervision().process.pid();
            b.supervision_mut().replace(HANDED_OVER);
            drop(b);
            replaced.push((block, old));
        }
        for (block, old) in replaced {
            wait_replaced(&block, old)?;
        }
        for (process, old) in self.network.adopt_taps(taps, HANDED_OVER)? {
            wait_replaced(&process, old)?;
        }
        Ok(later)
    }

    /// A local migration is under way (or over): the framebuffer moves by itself, so the
    /// adapter's state leaves its contents out.
    pub fn set_vram_moves(&self, moves: bool) {
        if let Some(adapter) = &self.display.adapter {
            lock(adapter).set_vram_moves(moves);
        }
    }

    /// The destination's framebuffer becomes the source's (before the devices' state is
    /// restored: the adapter's mode points into it).
    pub fn adopt_local_vram(&self, fds: &LocalFds) -> Result<(), DeviceError> {
        let (Some(adapter), Some((_, fd))) = (
            &self.display.adapter,
            fds.iter().find(|(item, _)| *item == LocalItem::Vram),
        ) else {
            return Ok(());
        };
        lock(adapter)
            .vram()
            .adopt(fd)
            .map_err(|e| local_error(format!("cannot take the source's VRAM over: {e}")))
    }

    /// Once the guest runs: the display process is replaced by one mapping the adopted
    /// framebuffer.
    pub fn adopt_local_devices(&self, fds: LocalFds) -> Result<(), DeviceError> {
        for (item, fd) in fds {
            if item == LocalItem::Vram {
                if let Some(process) = &self.display.process {
                    lock(process).adopt_vram(fd)?;
                }
            }
        }
        Ok(())
    }
}

/// Wait until the watcher has replaced the process `old` of `device`.
fn wait_replaced<D: SupervisedDevice + ?Sized>(
    device: &Arc<Mutex<D>>,
    old: u32,
) -> Result<(), DeviceError> {
    let start = Instant::now();
    loop {
        {
            let d = lock(device);
            let s = d.supervision();
            if s.process.pid() != old && s.running() {
                return Ok(());
            }
            if start.elapsed() > REPLACE_TIMEOUT {
                return Err(local_error(format!(
                    "{} did not come back on the handed-over resources",
                    s.name
                )));
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
