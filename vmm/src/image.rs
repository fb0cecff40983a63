//! What the vmm needs to know about an image file before a device process serves it: its
//! format (probed as QEMU does when none is given), and for qcow2 the header fields that
//! decide how to open it — the virtual size, the backing file and its format, and whether
//! it is encrypted. The device process does the actual format work; the vmm resolves the
//! backing chain so that it can open every file and hand over the fds.

use std::fs::File;
use std::os::unix::fs::FileExt;

use std::path::{Path, PathBuf};

/// "QFI\xfb".
const QCOW2_MAGIC: u32 = 0x5146_49fb;
/// Header extension holding the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_END: u32 = 0;
/// Longest backing file name qcow2 allows (QEMU's limit).
const MAX_BACKING_NAME: u32 = 1023;
/// How deep a backing chain may go before we call it a loop (QEMU allows 16 levels).
pub const MAX_CHAIN_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("Could not read image '{path}': {reason}")]
    Read { path: String, reason: String },
    #[error("Image '{path}' is not in qcow2 format")]
    NotQcow2 { path: String },
    #[error("Unsupported qcow2 version {version} in '{path}'")]
    Version { path: String, version: u32 },
    #[error("Image '{path}' is corrupt: {reason}")]
    Corrupt { path: String, reason: &'static str },
    #[error("Could not open backing file '{backing}' of '{path}': {reason}")]
    Backing {
        path: String,
        backing: String,
        reason: String,
    },
    #[error("Backing chain of '{0}' is too deep or circular")]
    Chain(String),
}

/// The image formats we serve: the device protocol's own type.
pub use ipc::blk::ImageFormat as Format;

/// A `format=` value, if it is one we serve.
pub fn parse_format(name: &str) -> Option<Format> {
    match name {
        "raw" => Some(Format::Raw),
        "qcow2" => Some(Format::Qcow2),
        _ => None,
    }
}

/// The fields of a qcow2 header that matter to the vmm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub size: u64,
    pub cluster_bits: u32,
    /// 0: none, 1: legacy AES, 2: LUKS.
    pub crypt_method: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

fn read_err(path: &Path, e: std::io::Error) -> ImageError {
    ImageError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(x)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Probe the format of `file` as QEMU's probing would between our two formats: a qcow2
/// magic means qcow2, anything else raw.
pub fn probe(file: &File, path: &Path) -> Result<Format, ImageError> {
    let mut magic = [0u8; 4];
    match file.read_at(&mut magic, 0) {
        Ok(4) if u32::from_be_bytes(magic) == QCOW2_MAGIC => Ok(Format::Qcow2),
        Ok(_) => Ok(Format::Raw),
        Err(e) => Err(read_err(path, e)),
    }
}

/// Read the qcow2 header of `file`.
pub fn read_qcow2_header(file: &File, path: &Path) -> Result<Qcow2Header, ImageError> {
    let corrupt = |reason| ImageError::Corrupt {
        path: path.display().to_string(),
        reason,
    };
    let mut h = [0u8; 104];
    let n = file.read_at(&mut h, 0).map_err(|e| read_err(path, e))?;
    if n < 72 || be32(&h, 0) != QCOW2_MAGIC {
        return Err(ImageError::NotQcow2 {
            path: path.display().to_string(),
        });
    }
    let version = be32(&h, 4);
    if version != 2 && version != 3 {
        return Err(ImageError::Version {
            path: path.display().to_string(),
            version,
        });
    }
    let backing_offset = be64(&h, 8);
    let backing_size = be32(&h, 16);
    let cluster_bits = be32(&h, 20);
    let size = be64(&h, 24);
    let crypt_method = be32(&h, 32);
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt("cluster size out of range"));
    }
    let header_length = if version == 3 {
        if n < 104 {
            return Err(corrupt("truncated version 3 header"));
        }
        u64::from(be32(&h, 100))
    } else {
        72
    };
    let backing_file = if backing_offset != 0 && backing_size != 0 {
        if backing_size > MAX_BACKING_NAME {
            return Err(corrupt("backing file name too long"));
        }
        let mut name = vec![0u8; backing_size as usize];
        let got = file
            .read_at(&mut name, backing_offset)
            .map_err(|e| read_err(path, e))?;
        if got != name.len() {
            return Err(corrupt("backing file name beyond the end of the file"));
        }
        Some(String::from_utf8(name).map_err(|_| corrupt("backing file name is not UTF-8"))?)
    } else {
        None
    };
    // Header extensions follow the header: type, length, data padded to 8 bytes.
    let mut backing_format = None;
    let mut at = header_length;
    for _ in 0..64 {
        let mut ext = [0u8; 8];
        if file.read_at(&mut ext, at).map_err(|e| read_err(path, e))? != 8 {
            break;
        }
        let (kind, len) = (be32(&ext, 0), be32(&ext, 4));
        if kind == EXT_END {
            break;
        }
        if len > 65536 {
            return Err(corrupt("header extension too large"));
        }
        if kind == EXT_BACKING_FORMAT {
            let mut data = vec![0u8; len as usize];
            if file
                .read_at(&mut data, at + 8)
                .map_err(|e| read_err(path, e))?
                != data.len()
            {
                return Err(corrupt("truncated header extension"));
            }
            backing_format =
                Some(String::from_utf8(data).map_err(|_| corrupt("backing format is not UTF-8"))?);
        }
        at += 8 + u64::from(len).next_multiple_of(8);
    }
    Ok(Qcow2Header {
        version,
        size,
        cluster_bits,
        crypt_method,
        backing_file,
        backing_format,
    })
}

/// Cluster size of the overlays we create (qemu-img's default).
const OVERLAY_CLUSTER_BITS: u32 = 16;

/// Write an empty qcow2 (version 3) image of `size` bytes into `file`, whose backing file is
/// `backing` in format `backing_format`: what `qemu-img create -f qcow2 -b B -F F` makes. The
/// layout: header, extensions and backing name in cluster 0, the refcount table in cluster 1,
/// one refcount block in cluster 2, the (zero) L1 table from cluster 3.
pub fn write_overlay(
    file: &File,
    size: u64,
    backing: &str,
    backing_format: Format,
) -> std::io::Result<()> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
    let cluster = 1u64 << OVERLAY_CLUSTER_BITS;
    if backing.is_empty() || backing.len() > MAX_BACKING_NAME as usize {
        return Err(invalid("the backing file name is empty or too long"));
    }
    // Each L1 entry maps one L2 table: cluster/8 clusters of data.
    let per_l1 = cluster * (cluster / 8);
    let l1_size = size.div_ceil(per_l1);
    let l1_clusters = (l1_size * 8).div_ceil(cluster).max(1);
    let total_clusters = 3 + l1_clusters;
    // One refcount block holds cluster/2 16-bit entries.
    if total_clusters > cluster / 2 || l1_size > u64::from(u32::MAX) {
        return Err(invalid("the image is too large for an overlay"));
    }
    let mut header = vec![0u8; cluster as usize];
    let put32 = |b: &mut [u8], at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |b: &mut [u8], at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut header, 0, QCOW2_MAGIC);
    put32(&mut header, 4, 3);
    put32(&mut header, 20, OVERLAY_CLUSTER_BITS);
    put64(&mut header, 24, size);
    put32(&mut header, 32, 0);
    put32(&mut header, 36, l1_size as u32);
    put64(&mut header, 40, 3 * cluster);
    put64(&mut header, 48, cluster);
    put32(&mut header, 56, 1);
    put32(&mut header, 96, 4); // refcount_order: 16-bit refcounts
    put32(&mut header, 100, 104); // header_length
                                  // Extensions: the backing format, then the end marker; the name follows them.
    let mut at = 104usize;
    let fmt = backing_format.name().as_bytes();
    put32(&mut header, at, EXT_BACKING_FORMAT);
    put32(&mut header, at + 4, fmt.len() as u32);
    header[at + 8..at + 8 + fmt.len()].copy_from_slice(fmt);
    at += 8 + fmt.len().next_multiple_of(8);
    put32(&mut header, at, EXT_END);
    put32(&mut header, at + 4, 0);
    at += 8;
    header[at..at + backing.len()].copy_from_slice(backing.as_bytes());
    put64(&mut header, 8, at as u64);
    put32(&mut header, 16, backing.len() as u32);

    let mut refcount_table = vec![0u8; cluster as usize];
    put64(&mut refcount_table, 0, 2 * cluster);
    let mut refcount_block = vec![0u8; cluster as usize];
    for c in 0..total_clusters as usize {
        refcount_block[2 * c..2 * c + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    file.set_len(0)?;
    file.write_all_at(&refcount_table, cluster)?;
    file.write_all_at(&refcount_block, 2 * cluster)?;
    file.set_len(total_clusters * cluster)?;
    // The header last: until it is there, the file is no image at all.
    file.write_all_at(&header, 0)?;
    file.sync_all()
}

/// One image of a backing chain, opened read-only.
#[derive(Debug)]
pub struct BackingLink {
    pub path: PathBuf,
    /// The name as the overlay records it.
    pub recorded_name: String,
    pub format: Format,
    pub file: File,
}

/// Where a backing file name points: absolute as is, relative to the overlay's directory.
pub fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        overlay.parent().unwrap_or(Path::new(".")).join(p)
    }
}

/// Open the backing chain below `top` (a qcow2 image), read-only, checking for loops and
/// missing files. Returns the links in chain order (the first is `top`'s backing file).
pub fn open_backing_chain(top: &File, top_path: &Path) -> Result<Vec<BackingLink>, ImageError> {
    let mut chain: Vec<BackingLink> = Vec::new();
    let mut seen = vec![file_id(top)];
    let mut header = read_qcow2_header(top, top_path)?;
    let mut current = top_path.to_path_buf();
    while let Some(name) = header.backing_file.clone() {
        if chain.len() >= MAX_CHAIN_DEPTH {
            return Err(ImageError::Chain(top_path.display().to_string()));
        }
        let path = resolve_backing(&current, &name);
        let backing_err = |reason: String| ImageError::Backing {
            path: current.display().to_string(),
            backing: name.clone(),
            reason,
        };
        let file = File::open(&path).map_err(|e| backing_err(e.to_string()))?;
        let id = file_id(&file);
        if seen.contains(&id) {
            return Err(ImageError::Chain(top_path.display().to_string()));
        }
        seen.push(id);
        let format = match header.backing_format.as_deref() {
            Some(f) => parse_format(f)
                .ok_or_else(|| backing_err(format!("unsupported backing format '{f}'")))?,
            None => probe(&file, &path)?,
        };
        let next = match format {
            Format::Qcow2 => Some(read_qcow2_header(&file, &path)?),
            Format::Raw => None,
        };
        chain.push(BackingLink {
            path: path.clone(),
            recorded_name: name,
            format,
            file,
        });
        current = path;
        match next {
            Some(h) => header = h,
            None => break,
        }
    }
    Ok(chain)
}

/// (device, inode) of an open file, to recognise the same file under two names.
fn file_id(file: &File) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    file.metadata()
        .map(|m| (m.dev(), m.ino()))
        .unwrap_or((u64::MAX, u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) -> bool {
        Command::new("qemu-img")
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    #[test]
    fn probes_and_reads_chains_that_qemu_img_made() {
        let dir = std::env::temp_dir().join(format!("vmm-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = dir.join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let mid = dir.join("mid.qcow2");
        let top = dir.join("top.qcow2");
        if !qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            mid.to_str().unwrap(),
        ]) || !qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ]) {
            eprintln!("SKIP: qemu-img is not installed");
            return;
        }
        let f = File::open(&top).unwrap();
        assert_eq!(probe(&f, &top).unwrap(), Format::Qcow2);
        assert_eq!(
            probe(&File::open(&base).unwrap(), &base).unwrap(),
            Format::Raw
        );
        let h = read_qcow2_header(&f, &top).unwrap();
        assert_eq!(h.size, 1 << 20);
        assert_eq!(h.backing_file.as_deref(), Some("mid.qcow2"));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(h.crypt_method, 0);
        let chain = open_backing_chain(&f, &top).unwrap();
        let names: Vec<(&str, Format)> = chain
            .iter()
            .map(|l| (l.recorded_name.as_str(), l.format))
            .collect();
        assert_eq!(
            names,
            vec![("mid.qcow2", Format::Qcow2), ("base.raw", Format::Raw)]
        );

        // An overlay we write is what qemu-img would have made.
        let ov = dir.join("ov.qcow2");
        let ovf = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&ov)
            .unwrap();
        write_overlay(&ovf, 3 << 30, "top.qcow2", Format::Qcow2).unwrap();
        let check = Command::new("qemu-img")
            .args(["check", "-f", "qcow2", "-U"])
            .arg(&ov)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "qemu-img check: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let h = read_qcow2_header(&ovf, &ov).unwrap();
        assert_eq!(h.size, 3 << 30);
        assert_eq!(h.backing_file.as_deref(), Some("top.qcow2"));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        let info = Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(&ov)
            .output()
            .unwrap();
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(
            info.contains("\"backing-filename\": \"top.qcow2\""),
            "{info}"
        );

        // A missing backing file, and a loop (mid's backing rewritten to top).
        std::fs::rename(&base, dir.join("gone.raw")).unwrap();
        assert!(matches!(
            open_backing_chain(&f, &top),
            Err(ImageError::Backing { .. })
        ));
        assert!(qemu_img(&[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            "top.qcow2",
            "-F",
            "qcow2",
            mid.to_str().unwrap()
        ]));
        assert!(matches!(
            open_backing_chain(&f, &top),
            Err(ImageError::Chain(_))
        ));
        // Not qcow2 at all, and garbage.
        let junk = dir.join("junk");
        std::fs::write(&junk, b"QFI\xfb\0\0\0\x07").unwrap();
        assert!(read_qcow2_header(&File::open(&junk).unwrap(), &junk).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
