//! The virtio-blk configuration space (`struct virtio_blk_config`), laid out byte by byte
//! in little-endian order as the virtio 1.x specification defines it.

/// Bytes of the configuration we fill in: up to and including `write_zeroes_may_unmap`
/// and its padding. Reads beyond are zeroes (secure erase and zoned fields: not offered).
pub const CONFIG_LEN: usize = 60;

/// The logical block size the guest sees.
pub const SECTOR_SIZE: u64 = 512;
/// Largest discard or write-zeroes request, in sectors (QEMU's `BDRV_REQUEST_MAX_SECTORS`).
pub const MAX_DISCARD_SECTORS: u32 = (i32::MAX as u32 & !(SECTOR_SIZE as u32 - 1)) >> 9;
/// Discard and write-zeroes requests carry one range each.
pub const MAX_DISCARD_SEGMENTS: u32 = 1;

// Offsets in struct virtio_blk_config.
const CAPACITY: usize = 0;
const SEG_MAX: usize = 12;
const BLK_SIZE: usize = 20;
const NUM_QUEUES: usize = 34;
const MAX_DISCARD_SECTORS_OFF: usize = 36;
const MAX_DISCARD_SEG_OFF: usize = 40;
const DISCARD_SECTOR_ALIGNMENT: usize = 44;
const MAX_WRITE_ZEROES_SECTORS: usize = 48;
const MAX_WRITE_ZEROES_SEG: usize = 52;
const WRITE_ZEROES_MAY_UNMAP: usize = 56;

/// What the configuration space says about a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Size in 512-byte sectors.
    pub capacity: u64,
    /// Most data segments in one request.
    pub seg_max: u32,
    pub num_queues: u16,
    /// Discard and write-zeroes limits are filled in (the features are offered).
    pub discard: bool,
}

impl BlkConfig {
    /// The configuration space's bytes.
    pub fn to_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        put(&mut b, CAPACITY, &self.capacity.to_le_bytes());
        put(&mut b, SEG_MAX, &self.seg_max.to_le_bytes());
        put(&mut b, BLK_SIZE, &(SECTOR_SIZE as u32).to_le_bytes());
        put(&mut b, NUM_QUEUES, &self.num_queues.to_le_bytes());
        if self.discard {
            put(
                &mut b,
                MAX_DISCARD_SECTORS_OFF,
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(
                &mut b,
                MAX_DISCARD_SEG_OFF,
                &MAX_DISCARD_SEGMENTS.to_le_bytes(),
            );
            put(&mut b, DISCARD_SECTOR_ALIGNMENT, &1u32.to_le_bytes());
            put(
                &mut b,
                MAX_WRITE_ZEROES_SECTORS,
                &MAX_DISCARD_SECTORS.to_le_bytes(),
            );
            put(
                &mut b,
                MAX_WRITE_ZEROES_SEG,
                &MAX_DISCARD_SEGMENTS.to_le_bytes(),
            );
            b[WRITE_ZEROES_MAY_UNMAP] = 1;
        }
        b
    }

    /// `size` bytes of the configuration space from `offset`, as GET_CONFIG returns them:
    /// zeroes past the fields we define, and an empty vector for a range past the 4 KiB
    /// a vhost-user config message can address.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let (offset, size) = (offset as usize, size as usize);
        match offset.checked_add(size) {
            Some(end) if end <= vhost::vhost_user::message::VHOST_USER_CONFIG_SIZE as usize => {}
            _ => return Vec::new(),
        }
        let bytes = self.to_bytes();
        (offset..offset + size)
            .map(|i| bytes.get(i).copied().unwrap_or(0))
            .collect()
    }
}

fn put(b: &mut [u8; CONFIG_LEN], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_blk::virtio_blk_config;

    #[test]
    fn layout_matches_the_kernel_struct() {
        assert_eq!(std::mem::offset_of!(virtio_blk_config, capacity), CAPACITY);
        assert_eq!(std::mem::offset_of!(virtio_blk_config, seg_max), SEG_MAX);
        assert_eq!(std::mem::offset_of!(virtio_blk_config, blk_size), BLK_SIZE);
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, num_queues),
            NUM_QUEUES
        );
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, max_discard_sectors),
            MAX_DISCARD_SECTORS_OFF
        );
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, max_discard_seg),
            MAX_DISCARD_SEG_OFF
        );
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, discard_sector_alignment),
            DISCARD_SECTOR_ALIGNMENT
        );
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            MAX_WRITE_ZEROES_SECTORS
        );
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, max_write_zeroes_seg),
            MAX_WRITE_ZEROES_SEG
        );
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            WRITE_ZEROES_MAY_UNMAP
        );
        assert_eq!(
            std::mem::offset_of!(virtio_blk_config, max_secure_erase_sectors),
            CONFIG_LEN
        );
    }

    #[test]
    fn fields_and_ranges() {
        let c = BlkConfig {
            capacity: 0x1234_5678_9abc,
            seg_max: 126,
            num_queues: 4,
            discard: true,
        };
        let b = c.to_bytes();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), c.capacity);
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 126);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 512);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 1);
        assert_eq!(c.read(0, 8), b[0..8].to_vec());
        // Past our fields: zeroes, as many as asked for.
        assert_eq!(c.read(56, 16), [&b[56..60], &[0u8; 12][..]].concat());
        assert!(c.read(0x1000, 1).is_empty());
        assert!(c.read(u32::MAX, 2).is_empty());
    }
}
