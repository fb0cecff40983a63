//! `bochs-display`: QEMU's PCI display adapter without VGA (1234:1111, revision 2), which
//! Linux's `bochs` DRM driver drives.
//!
//! BAR0 is the framebuffer (VRAM), a memfd of its own: the accelerator maps it where the
//! guest puts the BAR, so pixel writes never leave the vCPU, and `vmm-display` maps the
//! same pages to serve them. BAR2 holds the EDID (offset 0), the DISPI registers (0x500,
//! 16 bits each) and QEMU's extension registers (0x600). The mode the DISPI registers
//! describe is published in the scanout page ([`ipc::display::Scanout`]) whenever it
//! changes, page flips included.

use std::sync::Arc;

use ipc::display::{Mode, PixelFormat, Scanout, SCANOUT_PAGE_SIZE};

use super::edid;
use crate::accel::{AccelError, Accelerator};
use crate::memory::{DeviceMemory, MemoryError};
use crate::pci::{
    BarReprogram, PciBar, PciBarKind, PciConfiguration, PciDevice, PciIdentity, PciInterruptPin,
};
use crate::snapshot::{decode, encode, SnapshotError, Snapshottable};

/// Default and allowed VRAM sizes (QEMU's `vgamem`).
pub const DEFAULT_VGAMEM: u64 = 16 << 20;
const MIN_VGAMEM: u64 = 4 << 20;
const MAX_VGAMEM: u64 = 256 << 20;

const MMIO_BAR_SIZE: u64 = 4096;
const VRAM_BAR: usize = 0;
const MMIO_BAR: usize = 2;

// BAR2 layout.
const EDID_END: u64 = edid::EDID_SIZE as u64;
const DISPI_START: u64 = 0x500;
const EXT_START: u64 = 0x600;
const EXT_REG_SIZE: u64 = 0x600;
const EXT_REG_BYTEORDER: u64 = 0x604;
/// Bytes of extension registers (what the size register reads).
const EXT_SIZE: u32 = 8;
const BYTEORDER_LITTLE: u32 = 0x1e1e_1e1e;
const BYTEORDER_BIG: u32 = 0xbebe_bebe;

// DISPI register indices.
const INDEX_ID: usize = 0;
const INDEX_XRES: usize = 1;
const INDEX_YRES: usize = 2;
const INDEX_BPP: usize = 3;
const INDEX_ENABLE: usize = 4;
const INDEX_VIRT_WIDTH: usize = 6;
const INDEX_X_OFFSET: usize = 8;
const INDEX_Y_OFFSET: usize = 9;
const INDEX_VIDEO_MEMORY_64K: usize = 10;
/// Registers the guest may write (ID through Y_OFFSET).
const DISPI_REGS: usize = 10;
/// What the ID register reads: the newest interface revision, as QEMU's.
const DISPI_ID5: u16 = 0xb0c5;
const DISPI_ENABLED: u16 = 0x01;
/// Smallest mode QEMU shows.
const MIN_DIMENSION: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum BochsDisplayError {
    #[error("bochs-display: video memory too small")]
    VramTooSmall,
    #[error("bochs-display: video memory too big")]
    VramTooBig,
    #[error("bochs-display: {0}")]
    Memory(#[from] MemoryError),
    #[error("bochs-display: {0}")]
    Accel(#[from] AccelError),
}

/// The VRAM size QEMU gives a `vgamem` request: 4 to 256 MiB, rounded up to a power of two.
pub fn vram_size(vgamem: u64) -> Result<u64, BochsDisplayError> {
    if vgamem < MIN_VGAMEM {
        return Err(BochsDisplayError::VramTooSmall);
    }
    if vgamem > MAX_VGAMEM {
        return Err(BochsDisplayError::VramTooBig);
    }
    Ok(vgamem.next_power_of_two())
}

/// The page the display's state is shared in with `vmm-display` (see
/// [`ipc::display::Scanout`]).
pub fn new_scanout_page() -> Result<Arc<DeviceMemory>, MemoryError> {
    DeviceMemory::new("display-scanout", SCANOUT_PAGE_SIZE).map(Arc::new)
}

pub struct BochsDisplay {
    id: Option<String>,
    config: PciConfiguration,
    vram: Arc<DeviceMemory>,
    /// The accelerator's handle on the VRAM, when it maps it; otherwise this device
    /// serves BAR0's accesses itself (the qtest machine).
    vram_handle: Option<u32>,
    accel: Arc<dyn Accelerator>,
    /// Our view of the page `vmm-display` reads the mode from, and the page itself, kept
    /// mapped for as long as the view.
    scanout: Scanout,
    _scanout_page: Arc<DeviceMemory>,
    regs: [u16; DISPI_REGS],
    big_endian: bool,
    edid: [u8; edid::EDID_SIZE],
    /// The mode last published.
    mode: Option<Mode>,
    /// The VRAM itself moves to the destination (a local migration hands its memfd over):
    /// its contents stay out of the saved state, and a restore leaves them as they are.
    vram_moves: bool,
}

impl BochsDisplay {
    /// A display with `vram_size` bytes of VRAM (from [`vram_size`]) that publishes its
    /// mode in `scanout_page` (a [`new_scanout_page`]).
    pub fn new(
        id: Option<String>,
        vram_size: u64,
        accel: Arc<dyn Accelerator>,
        scanout_page: Arc<DeviceMemory>,
    ) -> Result<Self, BochsDisplayError> {
        if scanout_page.len() < SCANOUT_PAGE_SIZE {
            return Err(BochsDisplayError::Memory(MemoryError::Unaligned(
                scanout_page.len() as u64,
            )));
        }
        let vram = Arc::new(DeviceMemory::new("bochs-display-vram", vram_size as usize)?);
        // SAFETY: the page is mapped for as long as `_scanout_page`, which this device
        // keeps as long as the view; mmap returns page-aligned memory.
        let scanout = unsafe { Scanout::new(scanout_page.as_ptr()) };
        let vram_handle = match accel.add_device_memory(vram.clone()) {
            Ok(handle) => Some(handle),
            Err(AccelError::Unsupported(_)) => None,
            Err(e) => return Err(e.into()),
        };
        let mut config = PciConfiguration::new(
            PciIdentity {
                vendor_id: 0x1234,
                device_id: 0x1111,
                revision_id: 2,
                class_code: 0x03,
                subclass: 0x80,
                prog_if: 0,
                subsystem_vendor_id: 0x1af4,
                subsystem_id: 0x1100,
            },
            PciInterruptPin::None,
        );
        let bars = [
            PciBar {
                index: VRAM_BAR,
                kind: PciBarKind::Mmio32,
                size: vram_size,
                prefetchable: true,
            },
            PciBar {
                index: MMIO_BAR,
                kind: PciBarKind::Mmio32,
                size: MMIO_BAR_SIZE,
                prefetchable: false,
            },
        ];
        for bar in bars {
            config
                .add_bar(bar)
                .map_err(|e| AccelError::DeviceMemory(e.to_string()))?;
        }
        let display = BochsDisplay {
            id,
            config,
            vram,
            vram_handle,
            accel,
            _scanout_page: scanout_page,
            scanout,
            regs: [0; DISPI_REGS],
            big_endian: false,
            edid: edid::generate(1280, 800),
            mode: None,
            vram_moves: false,
        };
        display.scanout.publish(None);
        Ok(display)
    }

    /// The VRAM, to share with the display process.
    pub fn vram(&self) -> &Arc<DeviceMemory> {
        &self.vram
    }

    /// Whether the VRAM moves by itself in the next save or restore (a local migration).
    pub fn set_vram_moves(&mut self, moves: bool) {
        self.vram_moves = moves;
    }

    /// The mode on screen.
    pub fn mode(&self) -> Option<Mode> {
        self.mode
    }

    /// Power-on state: no mode, little-endian.
    pub fn reset(&mut self) {
        self.regs = [0; DISPI_REGS];
        self.big_endian = false;
        self.update_mode();
    }

    /// The mode the registers describe, by QEMU's rules: enabled, 16 or 32 bits per
    /// pixel, at least 64x64, and inside VRAM (a guest asking for more shows nothing).
    fn decode_mode(&self) -> Option<Mode> {
        let r = &self.regs;
        if r[INDEX_ENABLE] & DISPI_ENABLED == 0 {
            return None;
        }
        let format = match r[INDEX_BPP] {
            16 => PixelFormat::Rgb565,
            32 if self.big_endian => PixelFormat::Xrgb8888BigEndian,
            32 => PixelFormat::Xrgb8888,
            _ => return None,
        };
        let bpp = format.bytes_per_pixel();
        let width = u32::from(r[INDEX_XRES]);
        let height = u32::from(r[INDEX_YRES]);
        let stride = u32::from(r[INDEX_VIRT_WIDTH]).max(width) * bpp;
        let offset = u64::from(r[INDEX_X_OFFSET]) * u64::from(bpp)
            + u64::from(r[INDEX_Y_OFFSET]) * u64::from(stride);
        let mode = Mode {
            width,
            height,
            stride,
            format,
            offset,
        };
        (width >= MIN_DIMENSION && height >= MIN_DIMENSION && mode.fits(self.vram.len() as u64))
            .then_some(mode)
    }

    fn update_mode(&mut self) {
        let mode = self.decode_mode();
        if mode != self.mode {
            self.mode = mode;
            self.scanout.publish(mode);
        }
    }

    fn dispi_read(&self, index: usize) -> u16 {
        match index {
            INDEX_ID => DISPI_ID5,
            INDEX_VIDEO_MEMORY_64K => (self.vram.len() / (64 << 10)) as u16,
            i => self.regs.get(i).copied().unwrap_or(0xffff),
        }
    }

    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o + data.len() as u64 <= EDID_END => {
                let o = o as usize;
                data.copy_from_slice(&self.edid[o..o + data.len()]);
            }
            o if (DISPI_START..EXT_START).contains(&o) => {
                for (i, byte) in data.iter_mut().enumerate() {
                    let at = o - DISPI_START + i as u64;
                    let reg = self.dispi_read((at / 2) as usize);
                    *byte = reg.to_le_bytes()[(at % 2) as usize];
                }
            }
            EXT_REG_SIZE if data.len() == 4 => data.copy_from_slice(&EXT_SIZE.to_le_bytes()),
            EXT_REG_BYTEORDER if data.len() == 4 => {
                let order = if self.big_endian {
                    BYTEORDER_BIG
                } else {
                    BYTEORDER_LITTLE
                };
                data.copy_from_slice(&order.to_le_bytes());
            }
            _ => {}
        }
    }

    fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if (DISPI_START..EXT_START).contains(&o) => {
                for (i, byte) in data.iter().enumerate() {
                    let at = o - DISPI_START + i as u64;
                    let Some(reg) = self.regs.get_mut((at / 2) as usize) else {
                        continue;
                    };
                    let mut bytes = reg.to_le_bytes();
                    bytes[(at % 2) as usize] = *byte;
                    *reg = u16::from_le_bytes(bytes);
                }
                self.update_mode();
            }
            EXT_REG_BYTEORDER if data.len() == 4 => {
                let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                match value {
                    BYTEORDER_BIG => self.big_endian = true,
                    BYTEORDER_LITTLE => self.big_endian = false,
                    _ => {}
                }
                self.update_mode();
            }
            _ => {}
        }
    }
}

impl PciDevice for BochsDisplay {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config.read_register(reg_idx)
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Option<BarReprogram> {
        self.config.write_register(reg_idx, offset, data)
    }

    fn bars(&self) -> Vec<PciBar> {
        self.config.bars()
    }

    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        if self.config.bar_address(VRAM_BAR) == Some(base) {
            // Only when the accelerator does not map the VRAM.
            let n = self.vram.read(offset as usize, data);
            data[n..].fill(0xff);
        } else {
            self.mmio_read(offset, data);
        }
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
        if self.config.bar_address(VRAM_BAR) == Some(base) {
            self.vram.write(offset as usize, data);
        } else {
            self.mmio_write(offset, data);
        }
    }

    fn bar_moved(&mut self, index: usize, mapped_at: Option<u64>) {
        if index != VRAM_BAR {
            return;
        }
        if let Some(handle) = self.vram_handle {
            if let Err(e) = self.accel.move_device_memory(handle, mapped_at) {
                tracing::error!("bochs-display: cannot map VRAM at {mapped_at:x?}: {e}");
            }
        }
    }

    fn id(&self) -> Option<String> {
        self.id.clone()
    }
}

/// What moves with a migration: the configuration space (where the BARs are), the DISPI
/// registers and byte order (the mode), and the framebuffer's pages that are not zero.
/// The VRAM goes whole with the vCPUs stopped: it is mapped straight into the guest, so no
/// dirty log sees its writes.
#[derive(serde::Serialize, serde::Deserialize)]
struct AdapterState {
    registers: Vec<u32>,
    regs: [u16; DISPI_REGS],
    big_endian: bool,
    vram_size: u64,
    /// (page index, its bytes) for every page that is not all zero.
    pages: Vec<(u32, Vec<u8>)>,
}

const SNAPSHOT: &str = "bochs-display";
const VRAM_PAGE: usize = 4096;

impl Snapshottable for BochsDisplay {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        let mut pages = Vec::new();
        let mut page = vec![0u8; VRAM_PAGE];
        let copied = if self.vram_moves { 0 } else { self.vram.len() };
        for index in 0..copied / VRAM_PAGE {
            let n = self.vram.read(index * VRAM_PAGE, &mut page);
            if page[..n].iter().any(|&b| b != 0) {
                pages.push((index as u32, page[..n].to_vec()));
            }
        }
        encode(
            SNAPSHOT,
            &AdapterState {
                registers: self.config.registers().to_vec(),
                regs: self.regs,
                big_endian: self.big_endian,
                vram_size: self.vram.len() as u64,
                pages,
            },
        )
    }

    /// Take the state; the bus routes the BARs (and with VRAM's, maps it) afterwards.
    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let s: AdapterState = decode(SNAPSHOT, state)?;
        let invalid = |message: String| SnapshotError::Decode {
            what: SNAPSHOT,
            message,
        };
        if s.vram_size != self.vram.len() as u64 {
            return Err(invalid(format!(
                "{} MiB of video memory, this adapter has {} MiB",
                s.vram_size >> 20,
                self.vram.len() >> 20
            )));
        }
        let pages = self.vram.len() / VRAM_PAGE;
        if let Some((index, _)) = s
            .pages
            .iter()
            .find(|(i, bytes)| *i as usize >= pages || bytes.len() != VRAM_PAGE)
        {
            return Err(invalid(format!("a framebuffer page {index} out of place")));
        }
        self.config
            .set_registers(&s.registers)
            .map_err(|e| invalid(e.to_string()))?;
        self.regs = s.regs;
        self.big_endian = s.big_endian;
        if !self.vram_moves {
            // Each page once: the saved bytes, or zeroes where none were sent.
            let zero = vec![0u8; VRAM_PAGE];
            let saved: std::collections::HashMap<usize, &Vec<u8>> =
                s.pages.iter().map(|(i, b)| (*i as usize, b)).collect();
            for index in 0..pages {
                let bytes = saved.get(&index).map_or(zero.as_slice(), |b| b.as_slice());
                self.vram.write(index * VRAM_PAGE, bytes);
            }
        }
        self.update_mode();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::test_util::RecordingAccel;

    fn display() -> BochsDisplay {
        let page = new_scanout_page().unwrap();
        BochsDisplay::new(
            None,
            DEFAULT_VGAMEM,
            Arc::new(RecordingAccel::default()),
            page,
        )
        .unwrap()
    }

    fn dispi(d: &mut BochsDisplay, index: usize, value: u16) {
        d.mmio_write(DISPI_START + 2 * index as u64, &value.to_le_bytes());
    }

    fn read16(d: &BochsDisplay, offset: u64) -> u16 {
        let mut b = [0u8; 2];
        d.mmio_read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    fn read32(d: &BochsDisplay, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        d.mmio_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// What Linux's bochs driver writes to set a mode.
    fn set_mode(d: &mut BochsDisplay, w: u16, h: u16, virt_h: u16) {
        dispi(d, INDEX_ENABLE, 0);
        dispi(d, INDEX_BPP, 32);
        dispi(d, INDEX_XRES, w);
        dispi(d, INDEX_YRES, h);
        dispi(d, 5, 0);
        dispi(d, INDEX_VIRT_WIDTH, w);
        dispi(d, 7, virt_h);
        dispi(d, INDEX_X_OFFSET, 0);
        dispi(d, INDEX_Y_OFFSET, 0);
        dispi(d, INDEX_ENABLE, 0x41);
    }

    #[test]
    fn identity_and_registers_read_as_the_driver_expects() {
        let mut d = display();
        assert_eq!(d.read_config_register(0), 0x1111_1234);
        assert_eq!(d.read_config_register(2), 0x0380_0002);
        let bars = d.bars();
        assert_eq!(bars[0].size, DEFAULT_VGAMEM);
        assert!(bars[0].prefetchable);
        assert_eq!(bars[1].size, 4096);
        assert_eq!(read16(&d, DISPI_START) & 0xfff0, 0xb0c0);
        assert_eq!(
            read16(&d, DISPI_START + 2 * 10),
            256,
            "VRAM in 64 KiB units"
        );
        assert_eq!(
            read16(&d, DISPI_START + 2 * 11),
            0xffff,
            "past the registers"
        );
        assert_eq!(read32(&d, EXT_REG_SIZE), 8);
        assert_eq!(read32(&d, EXT_REG_BYTEORDER), BYTEORDER_LITTLE);
        let mut header = [0u8; 8];
        d.mmio_read(0, &mut header);
        assert_eq!(header, [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    }

    #[test]
    fn a_mode_set_and_page_flips_reach_the_scanout_page() {
        let mut d = display();
        assert_eq!(d.scanout.read(), None);
        set_mode(&mut d, 1024, 768, 2048);
        let mode = d.scanout.read().unwrap();
        assert_eq!((mode.width, mode.height, mode.stride), (1024, 768, 4096));
        assert_eq!((mode.format, mode.offset), (PixelFormat::Xrgb8888, 0));
        dispi(&mut d, INDEX_Y_OFFSET, 768);
        assert_eq!(d.scanout.read().unwrap().offset, 768 * 4096);
        dispi(&mut d, INDEX_X_OFFSET, 16);
        assert_eq!(d.scanout.read().unwrap().offset, 768 * 4096 + 64);
        d.mmio_write(EXT_REG_BYTEORDER, &BYTEORDER_BIG.to_le_bytes());
        assert_eq!(
            d.scanout.read().unwrap().format,
            PixelFormat::Xrgb8888BigEndian
        );
        d.reset();
        assert_eq!(d.scanout.read(), None);
    }

    #[test]
    fn absurd_modes_show_nothing() {
        let mut d = display();
        set_mode(&mut d, 1920, 1080, 1080);
        assert!(d.mode().is_some(), "1920x1080 fits 16 MiB");
        for (w, h) in [(0, 768), (65535, 65535), (63, 100)] {
            set_mode(&mut d, w, h, h);
            assert_eq!(d.mode(), None, "{w}x{h}");
        }
        set_mode(&mut d, 1024, 768, 768);
        dispi(&mut d, INDEX_BPP, 7);
        assert_eq!(d.mode(), None, "bpp 7");
        dispi(&mut d, INDEX_BPP, 16);
        assert_eq!(d.mode().unwrap().format, PixelFormat::Rgb565);
        dispi(&mut d, INDEX_BPP, 32);
        dispi(&mut d, INDEX_Y_OFFSET, 65535);
        assert_eq!(d.mode(), None, "scanout past the end of VRAM");
        // Writes anywhere in BAR2, of any size, are harmless.
        for off in (0..MMIO_BAR_SIZE).step_by(3) {
            d.mmio_write(off, &[0xff; 3]);
            let mut b = [0u8; 4];
            d.mmio_read(off, &mut b);
        }
    }

    #[test]
    fn vgamem_follows_qemus_limits() {
        assert!(matches!(
            vram_size(1 << 20),
            Err(BochsDisplayError::VramTooSmall)
        ));
        assert!(matches!(
            vram_size(512 << 20),
            Err(BochsDisplayError::VramTooBig)
        ));
        assert_eq!(vram_size(5 << 20).unwrap(), 8 << 20);
        assert_eq!(
            BochsDisplayError::VramTooSmall.to_string(),
            "bochs-display: video memory too small"
        );
    }

    #[test]
    fn without_an_accelerator_mapping_the_vram_bar_is_served_here() {
        let mut d = display();
        d.write_config_register(4, 0, &0xe000_0000u32.to_le_bytes());
        d.write_bar(0xe000_0000, 0x100, &[1, 2, 3, 4]);
        let mut b = [0u8; 4];
        d.read_bar(0xe000_0000, 0x100, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
        let mut tail = [0u8; 4];
        d.read_bar(0xe000_0000, DEFAULT_VGAMEM - 2, &mut tail);
        assert_eq!(tail, [0, 0, 0xff, 0xff]);
    }

    #[test]
    fn the_mode_and_framebuffer_move_to_another_adapter() {
        let mut a = display();
        set_mode(&mut a, 640, 480, 480);
        a.vram.write(4096 * 3 + 5, &[1, 2, 3]);
        a.vram.write(640 * 480 * 4 - 1, &[9]);
        let state = a.save().unwrap();
        let mut b = display();
        b.vram.write(4096 * 7, &[0xee]);
        b.restore(&state).unwrap();
        assert_eq!(b.mode(), a.mode());
        assert!(b.mode().is_some());
        let mut got = [0u8; 3];
        b.vram.read(4096 * 3 + 5, &mut got);
        assert_eq!(got, [1, 2, 3]);
        let mut last = [0u8; 1];
        b.vram.read(640 * 480 * 4 - 1, &mut last);
        assert_eq!(last, [9]);
        let mut stale = [0u8; 1];
        b.vram.read(4096 * 7, &mut stale);
        assert_eq!(stale, [0], "what the destination had is gone");
        assert!(state.len() < 3 * 4096, "zero pages are not sent");
        let page = new_scanout_page().unwrap();
        let mut small =
            BochsDisplay::new(None, 8 << 20, Arc::new(RecordingAccel::default()), page).unwrap();
        assert!(small.restore(&state).is_err(), "another VRAM size");
    }
}
