//! The guest's screen as the display process sees it: the VRAM and scanout page mapped
//! from the vmm's memfds ([`Framebuffer`]), and a shadow copy ([`Screen`]) that a refresh
//! compares with the VRAM to find what changed, tile by tile. Clients encode from the
//! shadow, never from VRAM the guest is writing.

use std::os::fd::OwnedFd;

use crate::shared_map::SharedMapping;

use ipc::display::{Mode, PixelFormat, Scanout, SCANOUT_PAGE_SIZE};

/// Damage is tracked in tiles of this many pixels square.
pub const TILE: u32 = 64;
/// What a client sees when the guest shows nothing (no display device, or no valid mode).
pub const BLANK_WIDTH: u32 = 640;
pub const BLANK_HEIGHT: u32 = 480;

/// The guest's VRAM (if it has a display adapter) and the scanout page that says what
/// part of it is on screen, and the keyboard LEDs.
pub struct Framebuffer {
    vram: Option<SharedMapping>,
    // Declared before `_page`: the view must not outlive the mapping.
    scanout: Scanout,
    _page: SharedMapping,
}

impl Framebuffer {
    /// Map the scanout page and `vram` (`vram_size` bytes), read-only.
    pub fn map(page: &OwnedFd, vram: Option<(&OwnedFd, u64)>) -> std::io::Result<Self> {
        let vram = match vram {
            Some((fd, size)) => Some(SharedMapping::new(fd, size as usize, false)?),
            None => None,
        };
        // The page is written by the vmm only, but a sequence lock's reader uses atomics,
        // which need the mapping readable; it stays read-only.
        let page = SharedMapping::new(page, SCANOUT_PAGE_SIZE, false)?;
        // SAFETY: the page is mapped for as long as `_page`, which outlives the view
        // (field order); mmap returns page-aligned memory.
        let scanout = unsafe { Scanout::new(page.as_ptr()) };
        Ok(Framebuffer {
            vram,
            scanout,
            _page: page,
        })
    }

    /// The mode on screen, if it lies inside VRAM.
    pub fn mode(&self) -> Option<Mode> {
        let vram = self.vram.as_ref()?;
        self.scanout
            .read()
            .filter(|m| m.fits(vram.len() as u64) && m.width > 0 && m.height > 0)
    }

    /// The PS/2 keyboard's LEDs as the guest set them.
    pub fn leds(&self) -> u8 {
        self.scanout.leds()
    }

    /// Copy line `y` of `mode` (its visible bytes) into `out`.
    fn copy_line(&self, mode: &Mode, y: u32, out: &mut [u8]) {
        let Some(vram) = &self.vram else {
            return;
        };
        let start = mode.offset as usize + y as usize * mode.stride as usize;
        let n = out
            .len()
            .min((mode.width * mode.format.bytes_per_pixel()) as usize);
        if start + n <= vram.len() {
            // SAFETY: start + n is inside the mapping (checked); the guest may be writing
            // these bytes, which only makes the copy's contents racy.
            unsafe { std::ptr::copy_nonoverlapping(vram.as_ptr().add(start), out.as_mut_ptr(), n) };
        }
    }
}

/// The shadow copy of the screen, in 0x00RRGGBB pixels, and the tiles that changed.
pub struct Screen {
    pub width: u32,
    pub height: u32,
    /// `width * height` pixels.
    pub pixels: Vec<u32>,
    /// The guest's bytes the pixels came from, to compare with VRAM cheaply.
    raw: Vec<u8>,
    mode: Option<Mode>,
    /// Bumped when the size changes.
    pub generation: u64,
    line: Vec<u8>,
}

/// What a refresh found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Damage {
    /// The size changed: everything is new.
    pub resized: bool,
    /// Changed tiles, row by row ([`Screen::tiles_x`] per row).
    pub tiles: Vec<bool>,
}

impl Damage {
    pub fn any(&self) -> bool {
        self.resized || self.tiles.iter().any(|t| *t)
    }
}

impl Default for Screen {
    fn default() -> Self {
        Self::new()
    }
}

impl Screen {
    pub fn new() -> Self {
        Screen {
            width: BLANK_WIDTH,
            height: BLANK_HEIGHT,
            pixels: vec![0; (BLANK_WIDTH * BLANK_HEIGHT) as usize],
            raw: Vec::new(),
            mode: None,
            generation: 0,
            line: Vec::new(),
        }
    }

    pub fn tiles_x(&self) -> u32 {
        self.width.div_ceil(TILE)
    }

    pub fn tiles_y(&self) -> u32 {
        self.height.div_ceil(TILE)
    }

    fn resize(&mut self, mode: Option<Mode>) {
        let (w, h) = mode.map_or((BLANK_WIDTH, BLANK_HEIGHT), |m| (m.width, m.height));
        self.width = w;
        self.height = h;
        self.pixels = vec![0; w as usize * h as usize];
        let line = mode.map_or(0, |m| (m.width * m.format.bytes_per_pixel()) as usize);
        // Zeroes; the refresh that resized takes every line in whatever it holds.
        self.raw = vec![0; line * h as usize];
        self.line = vec![0; line];
        self.mode = mode;
        self.generation += 1;
    }

    /// Compare the framebuffer with the shadow and take in what changed.
    pub fn refresh(&mut self, fb: Option<&Framebuffer>) -> Damage {
        let mode = fb.and_then(Framebuffer::mode);
        let resized = mode.map(|m| (m.width, m.height, m.format))
            != self.mode.map(|m| (m.width, m.height, m.format))
            || (mode.is_none() && self.mode.is_some());
        if resized {
            self.resize(mode);
        } else {
            // A page flip: same size, new offset.
            self.mode = mode;
        }
        let mut damage = Damage {
            resized,
            tiles: vec![resized; (self.tiles_x() * self.tiles_y()) as usize],
        };
        let (Some(fb), Some(mode)) = (fb, mode) else {
            return damage;
        };
        let bpp = mode.format.bytes_per_pixel() as usize;
        let tiles_x = self.tiles_x() as usize;
        let chunk = TILE as usize * bpp;
        let mut line = std::mem::take(&mut self.line);
        for y in 0..self.height {
            fb.copy_line(&mode, y, &mut line);
            let row = y as usize * line.len();
            let tile_row = (y / TILE) as usize * tiles_x;
            for (t, (new, old)) in line
                .chunks(chunk)
                .zip(self.raw[row..row + line.len()].chunks_mut(chunk))
                .enumerate()
            {
                if !resized && new == old {
                    continue;
                }
                old.copy_from_slice(new);
                damage.tiles[tile_row + t] = true;
                let x0 = t * TILE as usize;
                let out = &mut self.pixels[y as usize * self.width as usize + x0..];
                if mode.format == PixelFormat::Xrgb8888 {
                    for (o, px) in out.iter_mut().zip(new.chunks_exact(4)) {
                        *o = u32::from_le_bytes([px[0], px[1], px[2], 0]);
                    }
                } else {
                    for (o, px) in out.iter_mut().zip(new.chunks_exact(bpp)) {
                        let (r, g, b) = mode.format.rgb(px);
                        *o = u32::from(r) << 16 | u32::from(g) << 8 | u32::from(b);
                    }
                }
            }
        }
        self.line = line;
        damage
    }

    /// Append the `w`x`h` pixels at (`x`, `y`) to `out` (clipped to the screen).
    pub fn append_rect(&self, x: u32, y: u32, w: u32, h: u32, out: &mut Vec<u32>) {
        let w = w.min(self.width.saturating_sub(x));
        let h = h.min(self.height.saturating_sub(y));
        for row in y..y + h {
            let start = (row * self.width + x) as usize;
            out.extend_from_slice(&self.pixels[start..start + w as usize]);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::shared_map::test_memfd;

    /// A framebuffer over memfds the test writes, as the vmm's would be.
    pub struct TestFb {
        pub vram: OwnedFd,
        pub page: OwnedFd,
        pub vram_size: u64,
        vram_map: SharedMapping,
        page_map: SharedMapping,
    }

    impl TestFb {
        pub fn new(vram_size: u64) -> Self {
            let vram = test_memfd(vram_size);
            let page = test_memfd(SCANOUT_PAGE_SIZE as u64);
            let vram_map = SharedMapping::new(&vram, vram_size as usize, true).unwrap();
            let page_map = SharedMapping::new(&page, SCANOUT_PAGE_SIZE, true).unwrap();
            TestFb {
                vram,
                page,
                vram_size,
                vram_map,
                page_map,
            }
        }

        pub fn set_mode(&self, mode: Option<Mode>) {
            // SAFETY: the page mapping lives as long as self.
            unsafe { Scanout::new(self.page_map.as_ptr()) }.publish(mode);
        }

        pub fn write(&self, offset: usize, bytes: &[u8]) {
            assert!(offset + bytes.len() <= self.vram_map.len());
            // SAFETY: inside the mapping (asserted).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    self.vram_map.as_ptr().add(offset),
                    bytes.len(),
                )
            };
        }

        pub fn framebuffer(&self) -> Framebuffer {
            Framebuffer::map(&self.page, Some((&self.vram, self.vram_size))).unwrap()
        }
    }

    pub fn xrgb_mode(width: u32, height: u32) -> Mode {
        Mode {
            width,
            height,
            stride: width * 4,
            format: PixelFormat::Xrgb8888,
            offset: 0,
        }
    }

    #[test]
    fn a_refresh_finds_the_tiles_that_changed() {
        let t = TestFb::new(4 << 20);
        let fb = t.framebuffer();
        let mut s = Screen::new();
        let d = s.refresh(Some(&fb));
        assert!(!d.resized, "no mode yet: still the blank screen");
        t.set_mode(Some(xrgb_mode(200, 100)));
        let d = s.refresh(Some(&fb));
        assert!(d.resized && d.tiles.iter().all(|t| *t));
        assert_eq!(
            (s.width, s.height, s.tiles_x(), s.tiles_y()),
            (200, 100, 4, 2)
        );
        assert!(!s.refresh(Some(&fb)).any(), "nothing changed");
        // One pixel at (130, 70): tile (2, 1).
        t.write((70 * 200 + 130) * 4, &[0x30, 0x20, 0x10, 0]);
        let d = s.refresh(Some(&fb));
        let dirty: Vec<usize> = (0..8).filter(|&i| d.tiles[i]).collect();
        assert_eq!(dirty, [4 + 2]);
        assert_eq!(s.pixels[70 * 200 + 130], 0x102030);
        let mut rect = Vec::new();
        s.append_rect(129, 70, 2, 1, &mut rect);
        assert_eq!(rect, [0, 0x102030]);
        rect.clear();
        s.append_rect(199, 99, 10, 10, &mut rect);
        assert_eq!(rect.len(), 1, "clipped");
    }

    #[test]
    fn page_flips_and_bad_modes() {
        let t = TestFb::new(4 << 20);
        let fb = t.framebuffer();
        let mut s = Screen::new();
        t.set_mode(Some(xrgb_mode(64, 64)));
        s.refresh(Some(&fb));
        t.write(64 * 64 * 4, &[0xff; 4]);
        let mut flipped = xrgb_mode(64, 64);
        flipped.offset = 64 * 64 * 4;
        t.set_mode(Some(flipped));
        let d = s.refresh(Some(&fb));
        assert!(!d.resized && d.tiles[0]);
        assert_eq!(s.pixels[0], 0xffffff);
        let mut past_the_end = xrgb_mode(64, 64);
        past_the_end.offset = (4 << 20) - 10;
        t.set_mode(Some(past_the_end));
        assert!(s.refresh(Some(&fb)).resized);
        assert_eq!((s.width, s.height), (BLANK_WIDTH, BLANK_HEIGHT));
        assert!(
            Framebuffer::map(&t.page, Some((&t.vram, 8 << 20))).is_err(),
            "too small"
        );
        assert!(Framebuffer::map(&t.page, None).unwrap().mode().is_none());
    }
}
