//! An MSI-X table and pending-bit array (PCI Local Bus 3.0, 6.8.2), as a device keeps them
//! in one of its BARs. Masked vectors remember that they fired and deliver once unmasked.

/// Bytes per table entry: address low, address high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Vector control bit 0: the entry is masked.
const ENTRY_MASKED: u32 = 1;
/// Message control bits of the capability.
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;

/// One table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixEntry {
    pub address: u64,
    pub data: u32,
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        // Entries come out of reset masked.
        MsixEntry {
            address: 0,
            data: 0,
            control: ENTRY_MASKED,
        }
    }
}

/// A message to send: the write a device would make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The table, the pending bits and the capability's enable and function-mask bits.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MsixTable {
    entries: Vec<MsixEntry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

impl MsixTable {
    pub fn new(num_vectors: u16) -> Self {
        let n = usize::from(num_vectors.max(1));
        MsixTable {
            entries: vec![MsixEntry::default(); n],
            pending: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
        }
    }

    pub fn num_vectors(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Bytes of table, for placing it in a BAR.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Bytes of pending-bit array (a multiple of 8).
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Back to power-on state.
    pub fn reset(&mut self) {
        let n = self.entries.len() as u16;
        *self = MsixTable::new(n);
    }

    /// The guest wrote the capability's message control. Returns messages that were
    /// pending and are now deliverable.
    pub fn set_control(&mut self, control: u16) -> Vec<MsiMessage> {
        self.enabled = control & MSIX_ENABLE != 0;
        self.function_masked = control & MSIX_FUNCTION_MASK != 0;
        self.flush_pending()
    }

    /// A read in the table region, at `offset` from its start. Unaligned or out-of-range
    /// reads give all ones, as for a missing register.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some((entry, field)) = self.locate(offset, data.len()) else {
            return;
        };
        let e = &self.entries[entry];
        let value: u64 = match (field, data.len()) {
            (0, 8) => e.address,
            (8, 8) => u64::from(e.data) | u64::from(e.control) << 32,
            (0, 4) => e.address & 0xffff_ffff,
            (4, 4) => e.address >> 32,
            (8, 4) => u64::from(e.data),
            (12, 4) => u64::from(e.control),
            _ => return,
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    /// A write in the table region. Returns a message if the write unmasked a vector that
    /// was pending.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Option<MsiMessage> {
        let (entry, field) = self.locate(offset, data.len())?;
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let e = &mut self.entries[entry];
        match (field, data.len()) {
            (0, 8) => e.address = value,
            (8, 8) => {
                e.data = value as u32;
                e.control = (value >> 32) as u32;
            }
            (0, 4) => e.address = (e.address & !0xffff_ffff) | value,
            (4, 4) => e.address = (e.address & 0xffff_ffff) | value << 32,
            (8, 4) => e.data = value as u32,
            (12, 4) => e.control = value as u32,
            _ => return None,
        }
        if self.is_masked(entry) || !self.is_pending(entry) {
            return None;
        }
        self.clear_pending(entry);
        Some(self.message(entry))
    }

    /// A read of the pending-bit array (read-only for the guest).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let word = (offset / 8) as usize;
        let Some(bits) = self.pending.get(word) else {
            return;
        };
        let bytes = bits.to_le_bytes();
        let start = (offset % 8) as usize;
        let n = data.len().min(8 - start);
        data[..n].copy_from_slice(&bytes[start..start + n]);
    }

    /// Vector `vector` fires: the message to send, or `None` if it is masked (then it is
    /// pending), out of range, or MSI-X is disabled.
    pub fn trigger(&mut self, vector: u16) -> Option<MsiMessage> {
        let entry = usize::from(vector);
        if !self.enabled || entry >= self.entries.len() {
            return None;
        }
        if self.is_masked(entry) {
            self.pending[entry / 64] |= 1 << (entry % 64);
            return None;
        }
        Some(self.message(entry))
    }

    /// The message of `vector` if it would be sent now (MSI-X on, vector unmasked): a
    /// device may then hand the vector to the accelerator as a direct route.
    pub fn deliverable(&self, vector: u16) -> Option<MsiMessage> {
        let entry = usize::from(vector);
        (self.enabled && entry < self.entries.len() && !self.is_masked(entry))
            .then(|| self.message(entry))
    }

    fn flush_pending(&mut self) -> Vec<MsiMessage> {
        let mut out = Vec::new();
        if !self.enabled || self.function_masked {
            return out;
        }
        for entry in 0..self.entries.len() {
            if self.is_pending(entry) && !self.is_masked(entry) {
                self.clear_pending(entry);
                out.push(self.message(entry));
            }
        }
        out
    }

    fn message(&self, entry: usize) -> MsiMessage {
        let e = &self.entries[entry];
        MsiMessage {
            address: e.address,
            data: e.data,
        }
    }

    fn is_masked(&self, entry: usize) -> bool {
        self.function_masked || self.entries[entry].control & ENTRY_MASKED != 0
    }

    fn is_pending(&self, entry: usize) -> bool {
        self.pending[entry / 64] & (1 << (entry % 64)) != 0
    }

    fn clear_pending(&mut self, entry: usize) {
        self.pending[entry / 64] &= !(1 << (entry % 64));
    }

    /// The entry and the byte offset inside it of an aligned 4- or 8-byte access.
    fn locate(&self, offset: u64, len: usize) -> Option<(usize, u64)> {
        if !(len == 4 || len == 8) || !offset.is_multiple_of(len as u64) {
            return None;
        }
        let entry = usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?;
        (entry < self.entries.len()).then_some((entry, offset % MSIX_ENTRY_SIZE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program(t: &mut MsixTable, entry: u64, address: u64, data: u32) {
        let base = entry * MSIX_ENTRY_SIZE;
        t.write_table(base, &(address as u32).to_le_bytes());
        t.write_table(base + 4, &((address >> 32) as u32).to_le_bytes());
        t.write_table(base + 8, &data.to_le_bytes());
    }

    #[test]
    fn masked_vectors_pend_and_deliver_on_unmask() {
        let mut t = MsixTable::new(3);
        assert_eq!(t.table_size(), 48);
        assert_eq!(t.pba_size(), 8);
        program(&mut t, 1, 0xfee0_0000, 0x41);
        // Disabled: nothing is sent or remembered.
        assert_eq!(t.trigger(1), None);
        t.set_control(MSIX_ENABLE);
        // Still masked from reset: pending.
        assert_eq!(t.trigger(1), None);
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b010);
        // Unmasking delivers the pending message once.
        let sent = t.write_table(MSIX_ENTRY_SIZE + 12, &0u32.to_le_bytes());
        assert_eq!(
            sent,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        );
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert!(t.trigger(1).is_some());
        assert_eq!(t.trigger(7), None);
        assert_eq!(t.deliverable(1).map(|m| m.data), Some(0x41));
        assert_eq!(t.deliverable(0), None, "masked");
        assert_eq!(t.deliverable(9), None);
    }

    #[test]
    fn function_mask_holds_every_vector() {
        let mut t = MsixTable::new(2);
        program(&mut t, 0, 0xfee0_1000, 0x30);
        t.write_table(12, &0u32.to_le_bytes());
        t.set_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        assert_eq!(t.trigger(0), None);
        let sent = t.set_control(MSIX_ENABLE);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].data, 0x30);
    }

    #[test]
    fn table_reads_and_bad_accesses() {
        let mut t = MsixTable::new(1);
        program(&mut t, 0, 0x1_fee0_0000, 0x55);
        let mut q = [0u8; 8];
        t.read_table(0, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_0000);
        let mut d = [0u8; 4];
        t.read_table(12, &mut d);
        assert_eq!(u32::from_le_bytes(d), 1);
        // Unaligned, odd sizes and beyond the table.
        t.read_table(2, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut b = [0u8; 1];
        t.read_table(0, &mut b);
        assert_eq!(b, [0xff]);
        t.read_table(16, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(t.write_table(3, &[1, 2, 3, 4]), None);
        assert_eq!(t.write_table(64, &[1, 2, 3, 4]), None);
    }
}
