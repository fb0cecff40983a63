//! Image locking compatible with QEMU's (`block/file-posix.c`), so that QEMU and vmm-blk
//! refuse to write an image the other one uses.
//!
//! QEMU describes a user of an image with open file description (OFD) read locks on single
//! bytes: byte 100 + i when it holds permission i, and byte 200 + i when it does not let
//! others have permission i. Permission 0 is "consistent read", 1 is "write". After taking
//! its bytes it tests (F_OFD_GETLK with a write lock) that nobody else locked 200 + i for a
//! permission i it holds, nor 100 + i for a permission i it does not share.
//!
//! Like a QEMU virtio-blk device without `share-rw`, we hold "consistent read" (and "write"
//! unless read-only) and share everything except "write": two readers can share an image,
//! a writer excludes every other user that does not share writes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const CONSISTENT_READ: i64 = 0;
const WRITE: i64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot lock byte {byte}: {source}")]
    Lock {
        byte: i64,
        #[source]
        source: io::Error,
    },
    #[error("cannot test the lock on byte {byte}: {source}")]
    Test {
        byte: i64,
        #[source]
        source: io::Error,
    },
    #[error("Failed to get {0} lock: is another process using the image?")]
    Conflict(&'static str),
}

fn name(perm: i64) -> &'static str {
    if perm == WRITE {
        "\"write\""
    } else {
        "\"consistent read\""
    }
}

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: flock is plain data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn set_shared(file: &File, byte: i64) -> Result<(), LockError> {
    let fl = flock(libc::F_RDLCK, byte);
    // SAFETY: F_OFD_SETLK reads the flock we pass.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } < 0 {
        return Err(LockError::Lock {
            byte,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte`.
fn taken(file: &File, byte: i64) -> Result<bool, LockError> {
    let mut fl = flock(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK reads and writes the flock we pass.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } < 0 {
        return Err(LockError::Test {
            byte,
            source: io::Error::last_os_error(),
        });
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Lock `file` as QEMU would for a disk that reads (and writes, if `write`). The locks
/// live as long as the open file description.
pub fn lock_image(file: &File, write: bool) -> Result<(), LockError> {
    let held: &[i64] = if write {
        &[CONSISTENT_READ, WRITE]
    } else {
        &[CONSISTENT_READ]
    };
    let unshared: &[i64] = &[WRITE];
    for &p in held {
        set_shared(file, PERM_BASE + p)?;
    }
    for &p in unshared {
        set_shared(file, SHARED_BASE + p)?;
    }
    for &p in held {
        if taken(file, SHARED_BASE + p)? {
            return Err(LockError::Conflict(name(p)));
        }
    }
    for &p in unshared {
        if taken(file, PERM_BASE + p)? {
            return Err(LockError::Conflict(if p == WRITE {
                "shared \"write\""
            } else {
                "shared \"consistent read\""
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    fn open(path: &std::path::Path, write: bool) -> File {
        OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .unwrap()
    }

    #[test]
    fn writers_exclude_each_other_and_readers_share() {
        let path = std::env::temp_dir().join(format!("vmm-blk-lock-{}.img", std::process::id()));
        std::fs::write(&path, [0u8; 4096]).unwrap();

        let w1 = open(&path, true);
        lock_image(&w1, true).unwrap();
        let w2 = open(&path, true);
        assert!(matches!(lock_image(&w2, true), Err(LockError::Conflict(_))));
        let r = open(&path, false);
        assert!(matches!(lock_image(&r, false), Err(LockError::Conflict(_))));
        drop((w1, w2, r));

        // Readers share; a writer then cannot come in.
        let r1 = open(&path, false);
        lock_image(&r1, false).unwrap();
        let r2 = open(&path, false);
        lock_image(&r2, false).unwrap();
        let w = open(&path, true);
        let err = lock_image(&w, true).unwrap_err();
        assert!(err.to_string().contains("\"write\" lock"), "{err}");
        drop((r1, r2, w));

        // Everything closed: free again.
        let w = open(&path, true);
        lock_image(&w, true).unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
