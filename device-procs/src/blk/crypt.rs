//! qcow2's legacy AES encryption (`crypt_method` 1), done around imago, which reads and
//! writes the stored bytes of encrypted images as they are.
//!
//! QEMU's scheme (crypto/block-qcow.c, block/qcow2.c): AES-128-CBC on each 512-byte sector
//! of a data cluster, the IV being the sector number in the *guest* (virtual disk) offset,
//! little-endian in the first 8 of its 16 bytes ("plain64"); the key is the password's
//! bytes up to its first NUL, zero-padded or cut to 16. Only allocated data clusters hold
//! ciphertext: unallocated and zero clusters read as zeroes (or the backing image's data)
//! without decryption, and a cluster is always written whole, so that no plaintext (imago's
//! copy-on-write of the rest of a new cluster) ever lands in an encrypted cluster.
//!
//! Reads resolve the chain's mapping themselves ([`read`]): each piece is read from the file
//! that holds it and decrypted when that file is an encrypted image. Writes ([`write`]) go
//! cluster by cluster: a cluster only partly written is read (decrypted) first, merged,
//! encrypted when the top image is encrypted, and written whole. Any chain with an
//! encrypted image goes this way, encrypted top or not: imago's own copy-on-write would
//! otherwise copy an encrypted backing image's ciphertext into the top as if it were data.

use std::io;

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, InnerIvInit, KeyInit};
use aes::Aes128;
use imago::{Mapping, StorageExt};

use super::config::SECTOR_SIZE;
use super::image::Layer;

/// Bytes of an AES block.
const BLOCK: usize = 16;

/// The key of an encrypted image.
#[derive(Clone)]
pub struct Key {
    aes: Aes128,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// The key QEMU derives from `password`: its bytes up to the first NUL (QEMU takes the
    /// secret as a C string), zero-padded or cut to 16.
    pub fn from_password(password: &str) -> Key {
        let bytes = password.as_bytes();
        let bytes = &bytes[..bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len())];
        let mut key = [0u8; 16];
        let n = bytes.len().min(key.len());
        key[..n].copy_from_slice(&bytes[..n]);
        Key {
            aes: Aes128::new(&key.into()),
        }
    }

    fn iv(sector: u64) -> GenericArray<u8, aes::cipher::consts::U16> {
        let mut iv = [0u8; BLOCK];
        iv[..8].copy_from_slice(&sector.to_le_bytes());
        iv.into()
    }

    /// Encrypt `buf` (whole sectors) in place; `offset` is its guest offset.
    pub fn encrypt(&self, buf: &mut [u8], offset: u64) {
        debug_assert!(whole_sectors(offset, buf.len() as u64));
        for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE as usize).enumerate() {
            let iv = Self::iv(offset / SECTOR_SIZE + i as u64);
            let mut cbc = cbc::Encryptor::<Aes128>::inner_iv_init(self.aes.clone(), &iv);
            for block in sector.chunks_exact_mut(BLOCK) {
                cbc.encrypt_block_mut(GenericArray::from_mut_slice(block));
            }
        }
    }

    /// Decrypt `buf` (whole sectors) in place; `offset` is its guest offset.
    pub fn decrypt(&self, buf: &mut [u8], offset: u64) {
        debug_assert!(whole_sectors(offset, buf.len() as u64));
        for (i, sector) in buf.chunks_exact_mut(SECTOR_SIZE as usize).enumerate() {
            let iv = Self::iv(offset / SECTOR_SIZE + i as u64);
            let mut cbc = cbc::Decryptor::<Aes128>::inner_iv_init(self.aes.clone(), &iv);
            for block in sector.chunks_exact_mut(BLOCK) {
                cbc.decrypt_block_mut(GenericArray::from_mut_slice(block));
            }
        }
    }
}

/// `offset` and `len` are whole sectors.
fn whole_sectors(offset: u64, len: u64) -> bool {
    offset.is_multiple_of(SECTOR_SIZE) && len.is_multiple_of(SECTOR_SIZE)
}

fn misaligned(offset: u64, len: usize) -> io::Error {
    io::Error::other(format!(
        "encrypted data at {offset}+{len} is not in whole 512-byte sectors"
    ))
}

/// Read `buf.len()` bytes of the disk at `offset` through `top`, decrypting what comes from
/// encrypted images.
pub fn read(top: &Layer, key: &Key, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0usize;
    while done < buf.len() {
        let at = offset + done as u64;
        let (mapping, len) = top.get_mapping(at, (buf.len() - done) as u64)?;
        // At most what was asked for, so it fits.
        let len = len as usize;
        if len == 0 {
            // The end of the image: zeroes after it.
            buf[done..].fill(0);
            break;
        }
        let chunk = &mut buf[done..done + len];
        match mapping {
            Mapping::Raw {
                storage,
                offset: stored,
                ..
            } => {
                storage.read(&mut *chunk, stored)?;
                if storage.encrypted() {
                    if !whole_sectors(at, len as u64) {
                        return Err(misaligned(at, len));
                    }
                    key.decrypt(chunk, at);
                }
            }
            Mapping::Zero { .. } | Mapping::Eof { .. } => chunk.fill(0),
            // Compressed clusters: QEMU stores them compressed, not encrypted, and reads them
            // without decrypting; imago decompresses.
            Mapping::Special { layer, offset, .. } => layer.read(&mut *chunk, offset)?,
            _ => {
                return Err(io::Error::other(format!(
                    "unknown kind of mapping at byte {at}"
                )))
            }
        }
        done += len;
    }
    Ok(())
}

/// Write `len` bytes at `offset` through `top`, whole clusters of `cluster_size` at a time,
/// encrypting them when `encrypt` (the top image's key) is given. `fill(buf, at)` puts the
/// new data for the disk bytes `at..at + buf.len()` into `buf`. `disk_size` is the top
/// image's size: the last cluster may be cut by it. The caller keeps other writes out of
/// the way (a partly written cluster is read, merged and written back).
pub fn write(
    top: &Layer,
    key: &Key,
    encrypt: bool,
    cluster_size: u64,
    offset: u64,
    len: u64,
    mut fill: impl FnMut(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    let disk_size = top.size();
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= disk_size)
        .ok_or_else(|| io::Error::other("write past the end of the disk"))?;
    if !whole_sectors(offset, len) {
        return Err(misaligned(offset, len as usize));
    }
    let mut buf = Vec::new();
    let mut cluster = offset - offset % cluster_size;
    while cluster < end {
        let cluster_end = cluster.saturating_add(cluster_size).min(disk_size);
        // A cluster (64 KiB by default, 2 MiB at most): fits.
        buf.resize((cluster_end - cluster) as usize, 0);
        let (from, to) = (offset.max(cluster), end.min(cluster_end));
        if from != cluster || to != cluster_end {
            read(top, key, &mut buf, cluster)?;
        }
        fill(
            &mut buf[(from - cluster) as usize..(to - cluster) as usize],
            from,
        )?;
        if encrypt {
            key.encrypt(&mut buf, cluster);
        }
        top.write(&buf[..], cluster)?;
        cluster = cluster_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sectors_round_trip_and_depend_on_the_guest_sector() {
        let key = Key::from_password("pw");
        let plain: Vec<u8> = (0..1024).map(|i| i as u8).collect();
        let mut a = plain.clone();
        key.encrypt(&mut a, 4096);
        assert_ne!(a, plain);
        // The same data one sector further on encrypts differently (IV = sector number).
        let mut b = plain[512..].to_vec();
        key.encrypt(&mut b, 4096 + 512);
        assert_eq!(b, a[512..]);
        let mut c = plain[..512].to_vec();
        key.encrypt(&mut c, 0);
        assert_ne!(c, a[..512]);
        key.decrypt(&mut a, 4096);
        assert_eq!(a, plain);
    }

    #[test]
    fn the_key_is_the_password_padded_or_cut_to_16_bytes() {
        let mut x = vec![7u8; 512];
        let mut y = x.clone();
        Key::from_password("0123456789abcdefTAIL").encrypt(&mut x, 0);
        Key::from_password("0123456789abcdef").encrypt(&mut y, 0);
        assert_eq!(x, y);
        let mut z = vec![7u8; 512];
        Key::from_password("pw\0ignored").encrypt(&mut z, 0);
        let mut w = vec![7u8; 512];
        Key::from_password("pw").encrypt(&mut w, 0);
        assert_eq!(z, w);
    }

    #[test]
    fn aes_128_cbc_with_the_plain64_iv() {
        // FIPS-197 appendix C.1: AES-128 of 00112233..ff under key 00010203..0f. With an IV
        // of zeroes (sector 0) the first CBC block is that plain AES block.
        let key = Key {
            aes: Aes128::new(&core::array::from_fn::<u8, 16, _>(|i| i as u8).into()),
        };
        let mut sector = [0u8; 512];
        for (i, b) in sector[..16].iter_mut().enumerate() {
            *b = (i as u8) * 0x11;
        }
        key.encrypt(&mut sector, 0);
        let expected = [
            0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30, 0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4,
            0xc5, 0x5a,
        ];
        assert_eq!(sector[..16], expected);
    }
}
