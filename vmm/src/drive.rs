//! Drives: QEMU's `-drive` option and the image file behind it. The vmm opens and locks the
//! image; the block device process only ever receives the open fd.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::chardev::{split_key_value, split_options};
use crate::image::{self, BackingLink, Format, ImageError};
use ipc::blk::{ErrorAction, ErrorPolicy};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriveError {
    #[error("Invalid parameter '{0}'")]
    UnknownParameter(String),
    #[error("Parameter '{key}' expects {expected}")]
    InvalidValue { key: String, expected: &'static str },
    #[error("'{0}' invalid format")]
    UnknownFormat(String),
    #[error("format '{0}' is not supported (only raw and qcow2)")]
    UnsupportedFormat(String),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("'{0}' is LUKS-encrypted: only qcow2's legacy AES encryption is supported")]
    Encrypted(String),
    #[error("interface '{0}' is not supported (use if=virtio or if=none)")]
    UnsupportedInterface(String),
    #[error("A block device must be given a file, except for removable media")]
    NoFile,
    #[error("Could not open '{path}': {reason}")]
    Open { path: String, reason: String },
    #[error("Failed to get \"{what}\" lock: is another process using the image [{path}]?")]
    Locked { path: String, what: &'static str },
    #[error("Could not lock '{path}': {reason}")]
    Lock { path: String, reason: String },
}

/// Where the guest sees a drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveInterface {
    /// Only a backend; a `-device` attaches it.
    None,
    /// Shorthand for a virtio-blk-pci device of its own.
    Virtio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriveMedia {
    Disk,
    Cdrom,
}

/// One `-drive`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    pub id: String,
    pub file: Option<String>,
    pub readonly: bool,
    pub interface: DriveInterface,
    pub media: DriveMedia,
    pub serial: Option<String>,
    /// `format=`; `None` until probed (QEMU probes, and warns when it guesses raw).
    pub format: Option<Format>,
    /// `rerror=` and `werror=`.
    pub error_policy: ErrorPolicy,
}

/// Parse a `-drive` value. `index` numbers drives without an `id` as QEMU does
/// (`virtio0`, ...).
pub fn parse_drive(value: &str, index: usize) -> Result<DriveConfig, DriveError> {
    let mut cfg = DriveConfig {
        id: String::new(),
        file: None,
        readonly: false,
        interface: DriveInterface::None,
        media: DriveMedia::Disk,
        serial: None,
        format: None,
        error_policy: ErrorPolicy::default(),
    };
    let mut id = None;
    let mut interface = None;
    for part in split_options(value) {
        if part.is_empty() {
            continue;
        }
        let (key, v) = split_key_value(&part);
        let v = v.unwrap_or("");
        match key {
            "file" => cfg.file = Some(v.to_string()).filter(|f| !f.is_empty()),
            "id" => id = Some(v.to_string()),
            "format" => match image::parse_format(v) {
                Some(f) => cfg.format = Some(f),
                None => match v {
                    "qcow" | "vmdk" | "vdi" | "vpc" | "vhdx" | "qed" | "luks" | "cloop" | "dmg"
                    | "parallels" | "bochs" => {
                        return Err(DriveError::UnsupportedFormat(v.to_string()))
                    }
                    _ => return Err(DriveError::UnknownFormat(v.to_string())),
                },
            },
            "if" => {
                interface = Some(match v {
                    "none" => DriveInterface::None,
                    "virtio" => DriveInterface::Virtio,
                    other => return Err(DriveError::UnsupportedInterface(other.to_string())),
                })
            }
            "readonly" => cfg.readonly = parse_on_off(key, v)?,
            "media" => {
                cfg.media = match v {
                    "disk" => DriveMedia::Disk,
                    "cdrom" => DriveMedia::Cdrom,
                    _ => {
                        return Err(DriveError::InvalidValue {
                            key: key.into(),
                            expected: "'disk' or 'cdrom'",
                        })
                    }
                }
            }
            "serial" => cfg.serial = Some(v.to_string()),
            // Accepted for compatibility; the device process always does direct, synchronous
            // I/O through the page cache and honours flushes.
            "cache" => match v {
                "none" | "writeback" | "writethrough" | "directsync" | "unsafe" => {}
                _ => {
                    return Err(DriveError::InvalidValue {
                        key: key.into(),
                        expected: "a cache mode",
                    })
                }
            },
            "werror" => cfg.error_policy.write = parse_error_action(key, v, true)?,
            "rerror" => cfg.error_policy.read = parse_error_action(key, v, false)?,
            "aio" | "discard" | "detect-zeroes" | "index" => {}
            other => return Err(DriveError::UnknownParameter(other.to_string())),
        }
    }
    // QEMU's default interface on a PC is IDE, which we do not have.
    cfg.interface = interface.ok_or(DriveError::UnsupportedInterface("ide".into()))?;
    if cfg.media == DriveMedia::Cdrom {
        cfg.readonly = true;
    } else if cfg.file.is_none() {
        return Err(DriveError::NoFile);
    }
    cfg.id = id.unwrap_or_else(|| match cfg.interface {
        DriveInterface::Virtio => format!("virtio{index}"),
        DriveInterface::None => format!("none{index}"),
    });
    Ok(cfg)
}

/// QEMU's error actions; `enospc` only for writes (QEMU: "enospc is not supported for
/// rerror").
fn parse_error_action(key: &str, v: &str, write: bool) -> Result<ErrorAction, DriveError> {
    match v {
        "report" => Ok(ErrorAction::Report),
        "ignore" => Ok(ErrorAction::Ignore),
        "stop" => Ok(ErrorAction::Stop),
        "enospc" if write => Ok(ErrorAction::Enospc),
        _ => Err(DriveError::InvalidValue {
            key: key.into(),
            expected: if write {
                "'report', 'ignore', 'stop' or 'enospc'"
            } else {
                "'report', 'ignore' or 'stop'"
            },
        }),
    }
}

fn parse_on_off(key: &str, v: &str) -> Result<bool, DriveError> {
    match v {
        "on" | "yes" | "true" | "" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(DriveError::InvalidValue {
            key: key.into(),
            expected: "'on' or 'off'",
        }),
    }
}

/// QEMU's image locking (block/file-posix.c): shared OFD locks on byte 100 + n for each
/// permission n held, and on byte 200 + n for each permission n not shared with others.
/// QEMU and we then refuse to write an image that another process uses.
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;
const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;

/// An image ready to be handed to a device process: the top file (opened and locked as
/// the drive says) and, for qcow2, its backing chain (read-only).
#[derive(Debug)]
pub struct OpenedImage {
    pub path: String,
    pub format: Format,
    pub top: File,
    pub backing: Vec<BackingLink>,
    /// Virtual size from the qcow2 header; for raw, the file size.
    pub size: u64,
}

impl OpenedImage {
    /// The chain as the device process's Attach describes it.
    pub fn chain(&self) -> ipc::blk::ImageChain {
        ipc::blk::ImageChain {
            format: self.format,
            backing: self
                .backing
                .iter()
                .map(|l| ipc::blk::BackingImage {
                    format: l.format,
                    filename: l.recorded_name.clone(),
                })
                .collect(),
        }
    }

    /// Every file, top first: the fds of the Attach message.
    pub fn files(&self) -> Vec<&File> {
        std::iter::once(&self.top)
            .chain(self.backing.iter().map(|l| &l.file))
            .collect()
    }
}

/// Probe the format of a drive's image if `format=` was left out, warning as QEMU does when
/// the guess is raw.
pub fn probe_drive(drive: &mut DriveConfig) -> Result<(), DriveError> {
    let (Some(path), None) = (drive.file.as_deref(), drive.format) else {
        return Ok(());
    };
    let file = open_path(path, false)?;
    let format = image::probe(&file, Path::new(path))?;
    if format == Format::Raw {
        crate::report!(
            "vmm: warning: Image format was not specified for '{path}' and probing guessed \
             raw.\n         Automatically detecting the format is dangerous for raw images, \
             write operations on block 0 will be restricted.\n         Specify the 'raw' \
             format explicitly to remove the restrictions."
        );
    }
    drive.format = Some(format);
    Ok(())
}

/// Open a drive's image (locked) and, for qcow2, its backing chain.
pub fn open_drive(drive: &DriveConfig) -> Result<OpenedImage, DriveError> {
    open_drive_locked(drive, true)
}

/// [`open_drive`], with the top image unlocked unless `lock` (a migration's destination
/// opens its images inactive and takes their locks at the switchover, once the source has
/// let go of them, as QEMU does; the backing chain is shared and locked at once).
pub fn open_drive_locked(drive: &DriveConfig, lock: bool) -> Result<OpenedImage, DriveError> {
    let path = drive.file.as_deref().ok_or(DriveError::NoFile)?;
    let top = if lock {
        open_image(path, drive.readonly)?
    } else {
        open_path(path, !drive.readonly)?
    };
    let format = match drive.format {
        Some(f) => f,
        None => image::probe(&top, Path::new(path))?,
    };
    match format {
        Format::Raw => {
            let size = top.metadata().map(|m| m.len()).unwrap_or(0);
            Ok(OpenedImage {
                path: path.to_string(),
                format,
                top,
                backing: Vec::new(),
                size,
            })
        }
        Format::Qcow2 => {
            let header = image::read_qcow2_header(&top, Path::new(path))?;
            // Legacy AES (1) is served once block_passwd gives the key; LUKS (2) is not.
            if header.crypt_method > 1 {
                return Err(DriveError::Encrypted(path.to_string()));
            }
            let backing = image::open_backing_chain(&top, Path::new(path))?;
            Ok(OpenedImage {
                path: path.to_string(),
                format,
                top,
                backing,
                size: header.size,
            })
        }
    }
}

/// Create (or take over) the file of a live snapshot at `path`, open read-write and locked.
/// An existing file is only reused if it is empty or already a qcow2 image: anything else
/// stays untouched. Returns the file and whether we created it.
pub fn create_snapshot_file(path: &str) -> Result<(File, bool), DriveError> {
    let open_err = |reason: String| DriveError::Open {
        path: path.to_string(),
        reason,
    };
    let (file, created) = match OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => (f, true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::metadata(path).map_err(|e| open_err(e.to_string()))?;
            if !meta.is_file() {
                return Err(open_err("it exists and is not a regular file".into()));
            }
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(path)
                .map_err(|e| open_err(e.to_string()))?;
            if meta.len() != 0 && image::probe(&f, Path::new(path))? != Format::Qcow2 {
                return Err(open_err(
                    "it exists and is not an image; refusing to overwrite it".into(),
                ));
            }
            (f, false)
        }
        Err(e) => return Err(open_err(e.to_string())),
    };
    if let Err(e) = lock_image(&file, path, false) {
        if created {
            let _ = std::fs::remove_file(path);
        }
        return Err(e);
    }
    Ok((file, created))
}

/// File descriptor sets (`-add-fd fd=N,set=S`): management hands the vmm open files, and a
/// drive names a set as `file=/dev/fdset/S`. The vmm then never opens that image by path;
/// like QEMU's, the sets are one list for the whole process.
static FD_SETS: std::sync::Mutex<Vec<(u32, std::os::fd::OwnedFd)>> =
    std::sync::Mutex::new(Vec::new());

/// Where fd sets are named.
pub const FDSET_PREFIX: &str = "/dev/fdset/";

/// Put `fd` (inherited from whoever started us) into fd set `set`.
pub fn add_fd(fd: std::os::fd::RawFd, set: u32) -> Result<(), String> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("fd {fd} is not valid or already in use"));
    }
    let mut sets = FD_SETS.lock().unwrap_or_else(|e| e.into_inner());
    if sets.iter().any(|(_, f)| f.as_raw_fd() == fd) {
        return Err(format!("fd {fd} is not valid or already in use"));
    }
    // SAFETY: the descriptor is open (checked above) and was handed to this process to
    // own; nothing else in the vmm refers to it.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // Keep it from leaking into device processes.
    // SAFETY: F_SETFD on an fd we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    sets.push((set, owned));
    Ok(())
}

/// A new descriptor for `/dev/fdset/S`, from the set's fds whose access mode allows
/// `write` (QEMU's rule: O_RDWR for read-write, O_RDONLY or O_RDWR for read-only).
fn open_fdset(path: &str, write: bool) -> Result<File, DriveError> {
    let open_err = |reason: &str| DriveError::Open {
        path: path.to_string(),
        reason: reason.to_string(),
    };
    let set: u32 = path[FDSET_PREFIX.len()..]
        .parse()
        .map_err(|_| open_err("not an fd set number"))?;
    let sets = FD_SETS.lock().unwrap_or_else(|e| e.into_inner());
    for (s, fd) in sets.iter() {
        if *s != set {
            continue;
        }
        // SAFETY: F_GETFL only queries the open file description.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        let mode = flags & libc::O_ACCMODE;
        if flags >= 0 && (mode == libc::O_RDWR || (!write && mode == libc::O_RDONLY)) {
            let dup = fd
                .try_clone()
                .map_err(|e| open_err(&format!("cannot duplicate: {e}")))?;
            return Ok(File::from(dup));
        }
    }
    Err(open_err(if write {
        "no read-write descriptor in that fd set"
    } else {
        "no descriptor in that fd set"
    }))
}

/// Open `path` (or take a descriptor of its fd set) for reading, and for writing too.
fn open_path(path: &str, write: bool) -> Result<File, DriveError> {
    if path.starts_with(FDSET_PREFIX) {
        return open_fdset(path, write);
    }
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| DriveError::Open {
            path: path.to_string(),
            reason: e.to_string(),
        })
}

/// Open the image of a drive for the device process, and lock it as QEMU would.
pub fn open_image(path: &str, readonly: bool) -> Result<File, DriveError> {
    let file = open_path(path, !readonly)?;
    if !file.metadata().map(|m| m.is_file()).unwrap_or(false) {
        let block = file
            .metadata()
            .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
            .unwrap_or(false);
        if !block {
            return Err(DriveError::Open {
                path: path.to_string(),
                reason: "not a regular file or block device".into(),
            });
        }
    }
    lock_image(&file, path, readonly)?;
    if !readonly {
        refuse_incomplete(&file, path)?;
    }
    Ok(file)
}

/// Take an image that came as a descriptor (`fd:NAME` from getfd): its access mode must
/// allow `readonly`'s use, and it is locked as a path would be.
pub fn image_from_fd(
    fd: std::os::fd::OwnedFd,
    label: &str,
    readonly: bool,
) -> Result<File, DriveError> {
    // SAFETY: F_GETFL only queries the open file description.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    let mode = flags & libc::O_ACCMODE;
    if flags < 0 || (!readonly && mode != libc::O_RDWR) || mode == libc::O_WRONLY {
        return Err(DriveError::Open {
            path: label.to_string(),
            reason: if readonly {
                "the descriptor is not open for reading".into()
            } else {
                "the descriptor is not open for reading and writing".into()
            },
        });
    }
    let file = File::from(fd);
    lock_image(&file, label, readonly)?;
    if !readonly {
        refuse_incomplete(&file, label)?;
    }
    Ok(file)
}

/// The extended attribute that marks the image of an incoming block migration until the
/// guest has arrived: a copy whose migration failed keeps it, and is never served as a
/// good disk (remove it with `setfattr -x user.vmm.migration FILE` to serve it anyway).
const INCOMPLETE_XATTR: &std::ffi::CStr = c"user.vmm.migration";
const INCOMPLETE_VALUE: &[u8] = b"incomplete";

/// Mark an image as the incomplete copy of a block migration.
pub fn mark_incomplete(file: &File, path: &str) -> Result<(), DriveError> {
    // SAFETY: fsetxattr reads the name and value we pass, on an fd we hold.
    let r = unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            INCOMPLETE_XATTR.as_ptr(),
            INCOMPLETE_VALUE.as_ptr().cast(),
            INCOMPLETE_VALUE.len(),
            0,
        )
    };
    if r != 0 {
        return Err(DriveError::Open {
            path: path.to_string(),
            reason: format!(
                "cannot mark the image as an incomplete copy (user extended attributes): {}",
                std::io::Error::last_os_error()
            ),
        });
    }
    Ok(())
}

/// The block migration that wrote the image is done.
pub fn clear_incomplete(file: &File, path: &str) -> Result<(), DriveError> {
    // SAFETY: fremovexattr reads the name we pass, on an fd we hold.
    let r = unsafe { libc::fremovexattr(file.as_raw_fd(), INCOMPLETE_XATTR.as_ptr()) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENODATA) {
        return Err(DriveError::Open {
            path: path.to_string(),
            reason: format!(
                "cannot clear the incomplete mark: {}",
                std::io::Error::last_os_error()
            ),
        });
    }
    Ok(())
}

/// Whether the image is marked as the incomplete copy of a block migration.
pub fn is_incomplete(file: &File) -> bool {
    let mut value = [0u8; 16];
    // SAFETY: fgetxattr writes at most value.len() bytes into our buffer.
    let n = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            INCOMPLETE_XATTR.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n > 0 && value[..n as usize].starts_with(INCOMPLETE_VALUE)
}

/// Refuse to serve an image a failed block migration left incomplete.
pub fn refuse_incomplete(file: &File, path: &str) -> Result<(), DriveError> {
    if is_incomplete(file) {
        return Err(DriveError::Open {
            path: path.to_string(),
            reason: "the image is the incomplete copy of a block migration that did not \
                     finish (extended attribute user.vmm.migration)"
                .into(),
        });
    }
    Ok(())
}

/// Let go of an image's locks (a migration's source, before the destination takes them).
pub fn unlock_image(file: &File) {
    let bytes = [
        LOCK_PERM_BASE + PERM_CONSISTENT_READ,
        LOCK_PERM_BASE + PERM_WRITE,
        LOCK_SHARED_BASE + PERM_CONSISTENT_READ,
        LOCK_SHARED_BASE + PERM_WRITE,
    ];
    for byte in bytes {
        let mut fl = flock(libc::F_UNLCK as i16, byte);
        // SAFETY: fcntl with F_OFD_SETLK reads the flock struct we pass.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    }
}

/// Lock an image as QEMU would (refused while another process uses it).
pub fn lock_image(file: &File, path: &str, readonly: bool) -> Result<(), DriveError> {
    let mut held = vec![PERM_CONSISTENT_READ];
    if !readonly {
        held.push(PERM_WRITE);
    }
    // Like a QEMU guest device without share-rw: others may not write.
    let unshared = [PERM_WRITE];
    let name = |perm: i64| match perm {
        PERM_WRITE => "write",
        _ => "consistent read",
    };
    for &perm in &held {
        if byte_locked(file, LOCK_SHARED_BASE + perm, path)? {
            return Err(DriveError::Locked {
                path: path.into(),
                what: name(perm),
            });
        }
    }
    for &perm in &unshared {
        if byte_locked(file, LOCK_PERM_BASE + perm, path)? {
            return Err(DriveError::Locked {
                path: path.into(),
                what: name(perm),
            });
        }
    }
    let bytes = held
        .iter()
        .map(|p| LOCK_PERM_BASE + p)
        .chain(unshared.iter().map(|p| LOCK_SHARED_BASE + p));
    for byte in bytes {
        let mut fl = flock(libc::F_RDLCK as i16, byte);
        // SAFETY: fcntl with F_OFD_SETLK reads the flock struct we pass.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(DriveError::Lock {
                path: path.into(),
                reason: e.to_string(),
            });
        }
    }
    Ok(())
}

fn flock(kind: i16, byte: i64) -> libc::flock {
    // SAFETY: flock is plain data; all zeroes is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Does another open file description hold a lock on `byte`?
fn byte_locked(file: &File, byte: i64, path: &str) -> Result<bool, DriveError> {
    let mut fl = flock(libc::F_WRLCK as i16, byte);
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we pass.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } < 0 {
        let e = std::io::Error::last_os_error();
        return Err(DriveError::Lock {
            path: path.into(),
            reason: e.to_string(),
        });
    }
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_options() {
        let d = parse_drive("file=/a,,b.img,format=raw,if=none,id=d0,readonly=on", 0).unwrap();
        assert_eq!(d.file.as_deref(), Some("/a,b.img"));
        assert_eq!((d.id.as_str(), d.readonly), ("d0", true));
        assert_eq!(d.format, Some(Format::Raw));
        let v = parse_drive("file=x.img,if=virtio", 2).unwrap();
        assert_eq!(
            (v.id.as_str(), v.interface),
            ("virtio2", DriveInterface::Virtio)
        );
        assert_eq!(v.format, None);
        let cd = parse_drive("if=none,id=cd0,media=cdrom", 0).unwrap();
        assert_eq!((cd.file, cd.readonly), (None, true));
        assert_eq!(
            parse_drive("file=x,if=none,bogus=1", 0),
            Err(DriveError::UnknownParameter("bogus".into()))
        );
        assert_eq!(
            parse_drive("file=x", 0),
            Err(DriveError::UnsupportedInterface("ide".into()))
        );
        assert_eq!(parse_drive("if=none,id=x", 0), Err(DriveError::NoFile));
        assert_eq!(
            parse_drive("file=x,if=none,format=qcow2", 0).map(|d| d.format),
            Ok(Some(Format::Qcow2))
        );
        assert!(matches!(
            parse_drive("file=x,if=none,format=vmdk", 0),
            Err(DriveError::UnsupportedFormat(_))
        ));
        assert!(matches!(
            parse_drive("file=x,if=none,format=foo", 0),
            Err(DriveError::UnknownFormat(_))
        ));
        assert!(parse_drive("file=x,if=none,readonly=maybe", 0).is_err());
        let p = parse_drive("file=x,if=none,werror=stop,rerror=ignore", 0).unwrap();
        assert_eq!(
            (p.error_policy.write, p.error_policy.read),
            (ErrorAction::Stop, ErrorAction::Ignore)
        );
        assert_eq!(
            parse_drive("file=x,if=none", 0).unwrap().error_policy,
            ErrorPolicy::default()
        );
        assert!(parse_drive("file=x,if=none,rerror=enospc", 0).is_err());
        assert!(parse_drive("file=x,if=none,werror=explode", 0).is_err());
    }

    #[test]
    fn a_writer_excludes_other_users_as_qemu_does() {
        let dir = std::env::temp_dir().join(format!("vmm-drive-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let p = path.to_str().unwrap();
        let writer = open_image(p, false).unwrap();
        // OFD locks conflict between open file descriptions, even in one process.
        assert!(matches!(
            open_image(p, false),
            Err(DriveError::Locked { what: "write", .. })
        ));
        assert!(matches!(
            open_image(p, true),
            Err(DriveError::Locked { .. })
        ));
        drop(writer);
        let reader = open_image(p, true).unwrap();
        let reader2 = open_image(p, true).unwrap();
        assert!(open_image(p, false).is_err());
        drop((reader, reader2));
        assert!(open_image(p, false).is_ok());
        assert!(matches!(
            open_image(dir.join("missing").to_str().unwrap(), false),
            Err(DriveError::Open { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
