//! Block migration's side of `vmm-blk`, through the control socket as the vmm drives it:
//! the chunks the guest changes marked in a bitmap the test shares, the bulk pass's initial
//! set (every chunk, or what the top image holds), chunks read into a shared buffer on one
//! process and written from it by another, so that the copy is the same disk (`qemu-img
//! compare`, `qemu-img check`). Needs root (the sandbox) and qemu-img.

mod common;

use common::vring::*;
use common::Dir;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use ipc::blk::{BackingImage, BlkReply, BlkRequest, ImageFormat, InitialChunks};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES};

const MIB: u64 = 1 << 20;

/// A memfd of `len` bytes, as the vmm shares them.
fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a static name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"test-shared".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: we own the new fd.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len).unwrap();
    file
}

/// The chunks set in the bitmap, cleared as the vmm takes them.
fn take(bitmap: &File) -> Vec<u64> {
    let len = bitmap.metadata().unwrap().len() as usize;
    let mut bytes = vec![0u8; len];
    bitmap.read_exact_at(&mut bytes, 0).unwrap();
    bitmap.write_all_at(&vec![0u8; len], 0).unwrap();
    let mut set = Vec::new();
    for (w, word) in bytes.chunks_exact(8).enumerate() {
        let mut bits = u64::from_le_bytes(word.try_into().unwrap());
        while bits != 0 {
            set.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
            bits &= bits - 1;
        }
    }
    set
}

fn track(s: &mut Supervised, bitmap: &File, initial: InitialChunks) -> Result<BlkReply, String> {
    s.call(
        BlkRequest::TrackDirty {
            chunk_size: MIB,
            initial,
        },
        &[bitmap],
    )
}

/// The chunks the guest writes, discards or zeroes are marked once each, reads are not,
/// and nothing is marked before the tracking starts or after it stops; a resize waits for
/// the migration.
#[test]
fn the_chunks_the_guest_changes_are_marked_in_the_shared_bitmap() {
    for format in [ImageFormat::Raw, ImageFormat::Qcow2] {
        let dir = Dir::new("vmm-blk-mig-dirty");
        let img = dir.path("disk");
        qemu_img(&["create", "-q", "-f", format.name(), p(&img), "4M"]);
        let mut s = Supervised::start(&dir);
        let file = rw(&img);
        s.attach(format, vec![], &[&file]).unwrap();
        let mut d = Driver::connect(&s.socket);
        d.write(0, &pattern(1, 4096));
        let bitmap = memfd(4096);
        let bad = s.call(
            BlkRequest::TrackDirty {
                chunk_size: 1000,
                initial: InitialChunks::None,
            },
            &[&bitmap],
        );
        assert!(bad.unwrap_err().contains("a chunk of 1000 bytes"));
        assert_eq!(
            track(&mut s, &bitmap, InitialChunks::None),
            Ok(BlkReply::Tracking {
                size: 4 * MIB,
                marked: 0
            })
        );
        assert!(take(&bitmap).is_empty(), "the write before tracking");
        d.read(0, 4096);
        d.write(2048, &pattern(2, 8192)); // bytes 1 MiB .. 1 MiB + 8 KiB: chunk 1
        d.range(VIRTIO_BLK_T_DISCARD, 3 * 2048, 8, 0); // chunk 3
        d.range(VIRTIO_BLK_T_WRITE_ZEROES, 2047, 2, 0); // chunks 0 and 1
        assert_eq!(take(&bitmap), [0, 1, 3], "{format:?}");
        let resize = s.call(BlkRequest::Resize { size: 8 * MIB }, &[]);
        assert!(
            resize.unwrap_err().contains("while a block migration"),
            "{format:?}"
        );
        assert_eq!(
            s.call(BlkRequest::StopTracking, &[]),
            Ok(BlkReply::Tracking { size: 0, marked: 0 })
        );
        d.write(0, &pattern(3, 512));
        assert!(take(&bitmap).is_empty());
        // A bitmap too small for the disk, or no bitmap at all, is refused.
        assert!(track(&mut s, &memfd(0), InitialChunks::All).is_err());
        let none = s.call(
            BlkRequest::TrackDirty {
                chunk_size: MIB,
                initial: InitialChunks::All,
            },
            &[],
        );
        assert!(none.unwrap_err().contains("exactly one fd"));
        drop(d);
        s.stop();
    }
}

/// The bulk pass's set: every chunk for `blk`, and for `inc` only what the top image
/// holds (qcow2 clusters of the overlay, the data extents of a sparse raw file).
#[test]
fn the_initial_set_is_the_whole_disk_or_what_the_top_image_holds() {
    let dir = Dir::new("vmm-blk-mig-top");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "8M"]);
    qemu_io(&["-f", "qcow2", "-c", "write -P 7 0 8M", p(&base)]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        p(&top),
    ]);
    // The overlay holds chunk 2 (data) and chunk 5 (explicit zeroes over the base).
    qemu_io(&["-f", "qcow2", "-c", "write -P 9 2M 4k", p(&top)]);
    qemu_io(&["-f", "qcow2", "-c", "write -z 5M 64k", p(&top)]);
    let mut s = Supervised::start(&dir);
    let (t, b) = (rw(&top), File::open(&base).unwrap());
    let backing = vec![BackingImage {
        format: ImageFormat::Qcow2,
        filename: "base.qcow2".into(),
    }];
    s.attach(ImageFormat::Qcow2, backing, &[&t, &b]).unwrap();
    let bitmap = memfd(4096);
    assert_eq!(
        track(&mut s, &bitmap, InitialChunks::Top),
        Ok(BlkReply::Tracking {
            size: 8 * MIB,
            marked: 2
        })
    );
    assert_eq!(take(&bitmap), [2, 5]);
    s.call(BlkRequest::StopTracking, &[]).unwrap();
    assert_eq!(
        track(&mut s, &bitmap, InitialChunks::All),
        Ok(BlkReply::Tracking {
            size: 8 * MIB,
            marked: 8
        })
    );
    assert_eq!(take(&bitmap), (0..8).collect::<Vec<_>>());
    s.stop();

    let dir = Dir::new("vmm-blk-mig-raw");
    let img = dir.path("sparse.raw");
    let f = rw_create(&img, 10 * MIB);
    f.write_all_at(&[1; 4096], 3 * MIB + 100).unwrap();
    f.write_all_at(&[2; 4096], 9 * MIB).unwrap();
    let mut s = Supervised::start(&dir);
    s.attach(ImageFormat::Raw, vec![], &[&f]).unwrap();
    let reply = track(&mut s, &bitmap, InitialChunks::Top).unwrap();
    assert!(
        matches!(reply, BlkReply::Tracking { marked: 2, .. }),
        "{reply:?}"
    );
    assert_eq!(take(&bitmap), [3, 9]);
    s.stop();
}

/// `qemu-io` on an image (no sandbox of ours in the way).
fn qemu_io(args: &[&str]) {
    let out = std::process::Command::new("qemu-io")
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-io {args:?}: {out:?}");
}

fn rw_create(path: &std::path::Path, len: u64) -> File {
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
    drop(f);
    rw(path)
}

/// Chunks read on one process and written by another make the same disk: data, zero
/// chunks (flagged, not carried), and a short last chunk; for qcow2 the copy is clean.
#[test]
fn chunks_read_on_the_source_and_written_on_the_destination_copy_the_disk() {
    for format in [ImageFormat::Raw, ImageFormat::Qcow2] {
        let (src_dir, dst_dir) = (Dir::new("vmm-blk-mig-src"), Dir::new("vmm-blk-mig-dst"));
        let (src, dst) = (src_dir.path("src"), dst_dir.path("dst"));
        // 5.5 MiB: the last chunk is half a chunk.
        let size = 5 * MIB + MIB / 2;
        let arg = size.to_string();
        qemu_img(&["create", "-q", "-f", format.name(), p(&src), &arg]);
        qemu_img(&["create", "-q", "-f", format.name(), p(&dst), &arg]);
        // Garbage on the destination where the source is zero: the copy must clear it.
        let garbage = format!("write -P 0xee {} 64k", 4 * MIB);
        qemu_io(&["-f", format.name(), "-c", &garbage, p(&dst)]);
        let mut s = Supervised::start(&src_dir);
        let (sf, df) = (rw(&src), rw(&dst));
        s.attach(format, vec![], &[&sf]).unwrap();
        let mut d = Driver::connect(&s.socket);
        let data = pattern(5, 64 * 1024);
        d.write(0, &data);
        d.write(2 * 2048 + 8, &data);
        d.write((5 * MIB + MIB / 2) / 512 - 128, &data);
        let mut t = Supervised::start(&dst_dir);
        t.attach(format, vec![], &[&df]).unwrap();

        let buffer = memfd(4 * MIB);
        let mut expected = vec![0u8; size as usize];
        for at in [0, 2 * MIB + 4096, size - 65536] {
            expected[at as usize..at as usize + data.len()].copy_from_slice(&data);
        }
        for first in [0u64, 4] {
            let count = if first == 0 { 4 } else { 2 };
            let reply = s.call(
                BlkRequest::ReadChunks {
                    chunk_size: MIB,
                    first,
                    count,
                },
                &[&buffer],
            );
            let Ok(BlkReply::ChunksRead { zero }) = reply else {
                panic!("{reply:?}")
            };
            let want: Vec<bool> = (first..first + u64::from(count))
                .map(|c| ![0, 2, 5].contains(&c))
                .collect();
            assert_eq!(zero, want, "{format:?} chunks from {first}");
            let reply = t.call(
                BlkRequest::WriteChunks {
                    chunk_size: MIB,
                    first,
                    zero,
                },
                &[&buffer],
            );
            assert_eq!(reply, Ok(BlkReply::ChunksWritten), "{format:?}");
        }
        // Past the end, too many for one transfer, a buffer too small: refused.
        let bad = |c: u32, first: u64, buf: &File, s: &mut Supervised| {
            s.call(
                BlkRequest::ReadChunks {
                    chunk_size: MIB,
                    first,
                    count: c,
                },
                &[buf],
            )
            .unwrap_err()
        };
        assert!(bad(1, 6, &buffer, &mut s).contains("past the end"));
        assert!(bad(65, 0, &buffer, &mut s).contains("more than one transfer"));
        assert!(bad(4, 0, &memfd(MIB), &mut s).contains("transfer buffer"));
        drop(d);
        s.stop();
        t.stop();
        compare_format(&dst_dir, &dst, format.name(), &expected);
        if format == ImageFormat::Qcow2 {
            check_clean(&dst);
        }
    }
}
