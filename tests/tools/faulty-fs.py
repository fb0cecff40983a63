#!/usr/bin/python3
"""A FUSE filesystem with one file, disk.raw, passed through to BACKING, whose writes fail
with EIO (as a failing disk's would) while the file CONTROL holds a number above zero:
each failed write counts it down by one. The fault suite (tests/src/fault_suite.rs) puts a
disk image here to inject host-side EIO under load.

    faulty-fs.py BACKING CONTROL MOUNTPOINT      (runs in the foreground until unmounted)
"""
import errno
import os
import sys
import threading

from fusepy import FUSE, FuseOSError, Operations

NAME = "/disk.raw"


class Faulty(Operations):
    def __init__(self, backing, control):
        self.backing = backing
        self.control = control
        self.mutex = threading.Lock()

    def take_failure(self):
        with self.mutex:
            try:
                with open(self.control) as f:
                    left = int(f.read().strip() or 0)
            except (OSError, ValueError):
                return False
            if left <= 0:
                return False
            with open(self.control, "w") as f:
                f.write(str(left - 1))
            return True

    def getattr(self, path, fh=None):
        if path == "/":
            return dict(st_mode=0o40755, st_nlink=2)
        if path != NAME:
            raise FuseOSError(errno.ENOENT)
        st = os.lstat(self.backing)
        return {k: getattr(st, k) for k in
                ("st_mode", "st_nlink", "st_size", "st_uid", "st_gid",
                 "st_atime", "st_mtime", "st_ctime", "st_blocks")}

    def readdir(self, path, fh):
        return [".", "..", NAME[1:]]

    def open(self, path, flags):
        if path != NAME:
            raise FuseOSError(errno.ENOENT)
        return os.open(self.backing, flags & ~(os.O_CREAT | os.O_DIRECT))

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        if self.take_failure():
            raise FuseOSError(errno.EIO)
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        os.truncate(self.backing, length)

    def flush(self, path, fh):
        return 0

    def fsync(self, path, datasync, fh):
        os.fsync(fh)
        return 0

    def release(self, path, fh):
        os.close(fh)
        return 0


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    backing, control, mountpoint = sys.argv[1:]
    FUSE(Faulty(backing, control), mountpoint, foreground=True, nothreads=False,
         allow_other=True)


if __name__ == "__main__":
    main()
