//! A cache of kernels unpacked on the host.
//!
//! Unpacking the stock bzImage's xz payload takes most of a second, on every boot, for the
//! same bytes. So the unpacked kernel is kept in a file named by the SHA-256 of the bzImage,
//! under the user's cache directory: only the first boot of a given image pays for it.
//!
//! - An entry is a small header (magic, length, CRC-32 of the content) and the content. It is
//!   checked when opened; a corrupt or truncated entry is removed and built again.
//! - An entry is written to a temporary file and renamed into place, so a reader sees a
//!   whole entry or none; two vmm processes that miss at once both unpack and both rename
//!   (the same bytes), and each keeps the file it opened. No locks.
//! - After an insertion the oldest entries (by last use) go until the cache is within its
//!   bound; an entry larger than the bound is used once and not kept.
//!
//! `VMM_KERNEL_CACHE` names the directory (default `$XDG_CACHE_HOME/vmm/kernels`, else
//! `~/.cache/vmm/kernels`) or turns the cache `off`; `VMM_KERNEL_CACHE_MAX_MIB` bounds it
//! (default 512).

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use super::LoaderError;

/// The default bound on the cache's size.
pub const DEFAULT_MAX_BYTES: u64 = 512 << 20;

const MAGIC: [u8; 8] = *b"vmmkrnl1";
/// Magic, content length (u64), CRC-32 of the content (u32), 4 bytes reserved.
pub const HEADER_LEN: u64 = 24;
/// A temporary file this old was left by a writer that died.
const STALE_TEMP: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("kernel cache {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image itself is bad (nothing to do with the cache).
    #[error(transparent)]
    Image(#[from] LoaderError),
}

/// An unpacked kernel: `len` bytes at `offset` of `file`.
#[derive(Debug)]
pub struct CachedKernel {
    pub file: File,
    pub offset: u64,
    pub len: u64,
    /// Found in the cache (rather than unpacked now).
    pub hit: bool,
}

/// The cache directory and its bound.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl KernelCache {
    pub fn new(dir: PathBuf, max_bytes: u64) -> Self {
        KernelCache { dir, max_bytes }
    }

    /// The cache the environment asks for (see the module's documentation), or None if it
    /// is turned off or there is no home to put it in.
    pub fn from_env() -> Option<Self> {
        let dir = match std::env::var_os("VMM_KERNEL_CACHE") {
            Some(v) if v == "off" || v == "0" || v.is_empty() => return None,
            Some(v) => PathBuf::from(v),
            None => std::env::var_os("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?
                .join("vmm/kernels"),
        };
        let max_bytes = std::env::var("VMM_KERNEL_CACHE_MAX_MIB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(DEFAULT_MAX_BYTES, |mib| mib.saturating_mul(1 << 20));
        Some(Self::new(dir, max_bytes))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The unpacked form of `image`: from the cache, or written by `unpack` now (and kept,
    /// if it fits the bound).
    pub fn vmlinux(
        &self,
        image: &[u8],
        unpack: impl FnOnce(&mut dyn Write) -> Result<(), LoaderError>,
    ) -> Result<CachedKernel, CacheError> {
        let key = hex(&Sha256::digest(image));
        let path = self.dir.join(format!("{key}.vmlinux"));
        match open_entry(&path) {
            Ok(Some(entry)) => {
                // Its last use, for eviction; a cache we cannot write is still worth reading.
                let _ = entry.file.set_modified(SystemTime::now());
                tracing::debug!("kernel cache: {} found", path.display());
                return Ok(entry);
            }
            Ok(None) => {}
            Err(why) => {
                tracing::warn!("kernel cache: {}: {why}; building it again", path.display());
                let _ = std::fs::remove_file(&path);
            }
        }
        let io = |source| CacheError::Io {
            path: self.dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io)?;
        // Unique among processes (pid) and among this one's threads (a count).
        static WRITES: AtomicU64 = AtomicU64::new(0);
        let temp = self.dir.join(format!(
            ".{key}.{}.{}.tmp",
            std::process::id(),
            WRITES.fetch_add(1, Ordering::Relaxed)
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io)?;
        // Removes the temporary file on every way out but the rename.
        let mut guard = RemoveOnDrop(Some(temp.clone()));
        let (len, crc) = write_entry(&self.dir, &file, unpack)?;
        let entry = CachedKernel {
            file,
            offset: HEADER_LEN,
            len,
            hit: false,
        };
        if HEADER_LEN + len > self.max_bytes {
            tracing::info!(
                "kernel cache: the unpacked kernel ({len} bytes) is larger than the cache's \
                 bound ({} bytes); not kept",
                self.max_bytes
            );
            return Ok(entry);
        }
        std::fs::rename(&temp, &path).map_err(io)?;
        guard.0 = None;
        tracing::debug!("kernel cache: {} written (crc {crc:#010x})", path.display());
        self.evict(&path);
        Ok(entry)
    }

    /// Remove the least recently used entries until the cache is within its bound (never
    /// `keep`, just written), and temporary files whose writer died.
    fn evict(&self, keep: &Path) {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        let mut entries = Vec::new();
        for e in dir.flatten() {
            let path = e.path();
            let Ok(meta) = e.metadata() else { continue };
            let modified = meta.modified().unwrap_or(now);
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                if now.duration_since(modified).unwrap_or_default() > STALE_TEMP {
                    let _ = std::fs::remove_file(&path);
                }
            } else if name.ends_with(".vmlinux") {
                entries.push((modified, meta.len(), path));
            }
        }
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        entries.sort();
        for (_, size, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            if path != keep && std::fs::remove_file(&path).is_ok() {
                tracing::debug!("kernel cache: {} evicted", path.display());
                total -= size;
            }
        }
    }
}

/// Write an entry to `file` (in the cache at `dir`): the content from `unpack` after room
/// for the header, then the header. Returns the content's length and CRC.
fn write_entry(
    dir: &Path,
    file: &File,
    unpack: impl FnOnce(&mut dyn Write) -> Result<(), LoaderError>,
) -> Result<(u64, u32), CacheError> {
    let io = |source| CacheError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Checksummed {
        out: BufWriter::with_capacity(1 << 20, file),
        crc: crc32fast::Hasher::new(),
        len: 0,
    };
    out.out.write_all(&[0; HEADER_LEN as usize]).map_err(io)?;
    unpack(&mut out)?;
    out.out.flush().map_err(io)?;
    let Checksummed { len, crc, .. } = out;
    let crc = crc.finalize();
    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(&MAGIC);
    header[8..16].copy_from_slice(&len.to_le_bytes());
    header[16..20].copy_from_slice(&crc.to_le_bytes());
    file.write_all_at(&header, 0).map_err(io)?;
    Ok((len, crc))
}

/// A writer that counts and checksums what goes through it.
struct Checksummed<W> {
    out: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.out.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// The entry at `path`, checked: None if there is none, an error saying what is wrong with
/// it if it is not whole.
fn open_entry(path: &Path) -> Result<Option<CachedKernel>, String> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut header = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut header, 0)
        .map_err(|_| format!("truncated header ({size} bytes)"))?;
    if header[..8] != MAGIC {
        return Err("not a cache entry (bad magic)".into());
    }
    let field = |r: std::ops::Range<usize>| header.get(r).unwrap_or_default();
    let len = u64::from_le_bytes(field(8..16).try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(field(16..20).try_into().unwrap_or_default());
    if HEADER_LEN.checked_add(len) != Some(size) {
        return Err(format!(
            "truncated: {size} bytes for {len} of content and the header"
        ));
    }
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], HEADER_LEN + done)
            .map_err(|e| e.to_string())?;
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    let found = hasher.finalize();
    if found != crc {
        return Err(format!(
            "content does not match its checksum ({found:#010x}, not {crc:#010x})"
        ));
    }
    Ok(Some(CachedKernel {
        file,
        offset: HEADER_LEN,
        len,
        hit: true,
    }))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;
    use std::sync::Arc;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "vmm-kernel-cache-{name}-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// What an image "unpacks" to in these tests: its bytes repeated, `n` times.
    fn unpacked(image: &[u8], n: usize) -> Vec<u8> {
        image.repeat(n)
    }

    fn content(entry: &CachedKernel) -> Vec<u8> {
        let mut b = vec![0u8; entry.len as usize];
        entry.file.read_exact_at(&mut b, entry.offset).unwrap();
        b
    }

    /// Looks `image` up, counting the unpacks.
    fn get(cache: &KernelCache, image: &[u8], unpacks: &AtomicU32) -> CachedKernel {
        cache
            .vmlinux(image, |out| {
                unpacks.fetch_add(1, Ordering::SeqCst);
                out.write_all(&unpacked(image, 1000))
                    .map_err(LoaderError::Decompress)
            })
            .unwrap()
    }

    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_kernel_is_unpacked_once_then_found() {
        let dir = temp_dir("hit");
        let cache = KernelCache::new(dir.clone(), DEFAULT_MAX_BYTES);
        let unpacks = AtomicU32::new(0);
        let first = get(&cache, b"kernel one", &unpacks);
        assert!(!first.hit);
        let second = get(&cache, b"kernel one", &unpacks);
        assert!(second.hit);
        assert_eq!(unpacks.load(Ordering::SeqCst), 1);
        assert_eq!(content(&second), unpacked(b"kernel one", 1000));
        assert_eq!(content(&first), content(&second));
        // Another image is another entry.
        get(&cache, b"kernel two", &unpacks);
        assert_eq!(unpacks.load(Ordering::SeqCst), 2);
        assert_eq!(entries(&dir).len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_corrupt_or_truncated_entry_is_detected_and_built_again() {
        let dir = temp_dir("corrupt");
        let cache = KernelCache::new(dir.clone(), DEFAULT_MAX_BYTES);
        let unpacks = AtomicU32::new(0);
        get(&cache, b"kernel", &unpacks);
        let path = entries(&dir).pop().unwrap();
        let good = std::fs::read(&path).unwrap();
        type Damage = fn(&mut Vec<u8>);
        let damage: [(&str, Damage); 5] = [
            ("a flipped content byte", |b| {
                b[HEADER_LEN as usize + 500] ^= 1
            }),
            ("truncated content", |b| b.truncate(b.len() - 1)),
            ("truncated header", |b| b.truncate(10)),
            ("an empty file", |b| b.clear()),
            ("a bad magic", |b| b[0] = b'X'),
        ];
        for (i, (what, damage)) in damage.iter().enumerate() {
            let mut bad = good.clone();
            damage(&mut bad);
            std::fs::write(&path, &bad).unwrap();
            let entry = get(&cache, b"kernel", &unpacks);
            assert!(!entry.hit, "{what}");
            assert_eq!(unpacks.load(Ordering::SeqCst), i as u32 + 2, "{what}");
            assert_eq!(content(&entry), unpacked(b"kernel", 1000), "{what}");
            assert_eq!(std::fs::read(&path).unwrap(), good, "{what}: rebuilt");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_cache_never_grows_past_its_bound() {
        let dir = temp_dir("bound");
        // Each entry: 24 + 8 * 1000 bytes. Room for three.
        let cache = KernelCache::new(dir.clone(), 3 * 8024 + 100);
        let unpacks = AtomicU32::new(0);
        for i in 0..10u64 {
            let image = i.to_le_bytes();
            get(&cache, &image, &unpacks);
            let total: u64 = entries(&dir)
                .iter()
                .map(|p| std::fs::metadata(p).unwrap().len())
                .sum();
            assert!(total <= 3 * 8024 + 100, "{total}");
            // The newest is always there.
            assert!(get(&cache, &image, &unpacks).hit);
            // Distinct modification times order the entries.
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(entries(&dir).len(), 3);
        // The most recently used survive.
        for i in 7..10u64 {
            assert!(get(&cache, &i.to_le_bytes(), &unpacks).hit);
        }
        // One larger than the bound is used, but not kept.
        let big = KernelCache::new(dir.clone(), 1000);
        let entry = get(&big, b"too big for it", &unpacks);
        assert_eq!(content(&entry), unpacked(b"too big for it", 1000));
        assert!(!get(&big, b"too big for it", &unpacks).hit);
        assert!(entries(&dir)
            .iter()
            .all(|p| p.extension().unwrap() == "vmlinux"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_misses_all_get_the_kernel() {
        let dir = temp_dir("race");
        let cache = Arc::new(KernelCache::new(dir.clone(), DEFAULT_MAX_BYTES));
        let unpacks = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (cache, unpacks) = (cache.clone(), unpacks.clone());
                std::thread::spawn(move || content(&get(&cache, b"shared kernel", &unpacks)))
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), unpacked(b"shared kernel", 1000));
        }
        // One entry, whole, and no temporary file left.
        let left = entries(&dir);
        assert_eq!(left.len(), 1, "{left:?}");
        assert!(open_entry(&left[0]).unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_bad_image_is_its_error_and_leaves_nothing() {
        let dir = temp_dir("bad");
        let cache = KernelCache::new(dir.clone(), DEFAULT_MAX_BYTES);
        let err = cache
            .vmlinux(b"bad", |out| {
                out.write_all(b"partial").map_err(LoaderError::Decompress)?;
                Err(LoaderError::DecompressedTooLarge { limit: 7 })
            })
            .unwrap_err();
        assert!(matches!(
            err,
            CacheError::Image(LoaderError::DecompressedTooLarge { limit: 7 })
        ));
        assert!(entries(&dir).is_empty());
        // A directory that cannot be made is a cache error (the caller unpacks in memory).
        let blocked = dir.join("file");
        std::fs::write(&blocked, b"").unwrap();
        let cache = KernelCache::new(blocked.join("sub"), DEFAULT_MAX_BYTES);
        assert!(matches!(
            cache.vmlinux(b"x", |_| Ok(())),
            Err(CacheError::Io { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
