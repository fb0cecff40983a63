//! The EDID a display device shows its driver (bochs-display's BAR2 offset 0): a VESA EDID
//! 1.4 base block naming a "QEMU Monitor" whose preferred mode is 1280x800, as QEMU's
//! generator does, with standard timings up to 1920x1080 so that the driver offers them.

/// Bytes of the EDID window (the base block, then an empty second block).
pub const EDID_SIZE: usize = 256;

/// Pixels per inch, for the physical size the EDID claims.
const DPI: u32 = 100;

/// Standard timings: width, and the aspect-ratio code (EDID 1.4: 0 = 16:10, 1 = 4:3,
/// 2 = 5:4, 3 = 16:9), all at 60 Hz.
const STANDARD_TIMINGS: [(u32, u8); 8] = [
    (1280, 0),
    (1280, 2),
    (1280, 3),
    (1440, 0),
    (1600, 1),
    (1600, 3),
    (1680, 0),
    (1920, 3),
];

/// The EDID of a monitor that prefers `width`x`height`.
pub fn generate(width: u32, height: u32) -> [u8; EDID_SIZE] {
    let mut e = [0u8; EDID_SIZE];
    e[..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // Manufacturer "RHT" (three 5-bit letters, big-endian), product 0x1234, serial 0.
    let id = |c: u8| u16::from(c - b'A' + 1);
    let vendor = id(b'R') << 10 | id(b'H') << 5 | id(b'T');
    e[8..10].copy_from_slice(&vendor.to_be_bytes());
    e[10..12].copy_from_slice(&0x1234u16.to_le_bytes());
    e[16] = 1; // week
    e[17] = (2022 - 1990) as u8;
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0xa5; // digital, 8 bits per colour, DisplayPort
    let (width_mm, height_mm) = (width * 254 / DPI / 10, height * 254 / DPI / 10);
    e[21] = width_mm.div_ceil(10).min(255) as u8;
    e[22] = height_mm.div_ceil(10).min(255) as u8;
    e[23] = 120; // gamma 2.2
                 // sRGB default colour space, the preferred timing is native, continuous frequency.
    e[24] = 0x07;
    // sRGB chromaticity.
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    // Established timings: 640x480, 800x600 and 1024x768 at 60 Hz.
    e[35] = 0x21;
    e[36] = 0x08;
    for (i, (w, aspect)) in STANDARD_TIMINGS.iter().enumerate() {
        e[38 + 2 * i] = (w / 8 - 31) as u8;
        e[39 + 2 * i] = aspect << 6;
    }
    e[54..72].copy_from_slice(&detailed_timing(width, height, width_mm, height_mm));
    // Range limits: 50-125 Hz vertical, 30-160 kHz horizontal, up to 300 MHz.
    e[72..90].copy_from_slice(&[
        0, 0, 0, 0xfd, 0, 50, 125, 30, 160, 30, 0x01, 0x0a, 0x20, 0x20, 0x20, 0x20, 0x20, 0x20,
    ]);
    e[90..108].copy_from_slice(&text_descriptor(0xfc, b"QEMU Monitor"));
    // A dummy descriptor.
    e[111] = 0x10;
    e[127] = checksum(&e[..127]);
    e
}

/// The 18-byte detailed timing of `width`x`height` at 60 Hz with reduced blanking.
fn detailed_timing(width: u32, height: u32, width_mm: u32, height_mm: u32) -> [u8; 18] {
    let (hblank, hfront, hsync) = (160u32, 48u32, 32u32);
    let (vblank, vfront, vsync) = (23u32, 3u32, 6u32);
    let clock = (width + hblank) * (height + vblank) * 60 / 10_000;
    let mut d = [0u8; 18];
    d[0..2].copy_from_slice(&(clock.min(0xffff) as u16).to_le_bytes());
    d[2] = width as u8;
    d[3] = hblank as u8;
    d[4] = ((width >> 8 & 0xf) << 4 | (hblank >> 8 & 0xf)) as u8;
    d[5] = height as u8;
    d[6] = vblank as u8;
    d[7] = ((height >> 8 & 0xf) << 4 | (vblank >> 8 & 0xf)) as u8;
    d[8] = hfront as u8;
    d[9] = hsync as u8;
    d[10] = ((vfront & 0xf) << 4 | (vsync & 0xf)) as u8;
    d[11] = ((hfront >> 8 & 3) << 6
        | (hsync >> 8 & 3) << 4
        | (vfront >> 4 & 3) << 2
        | (vsync >> 4 & 3)) as u8;
    d[12] = width_mm as u8;
    d[13] = height_mm as u8;
    d[14] = ((width_mm >> 8 & 0xf) << 4 | (height_mm >> 8 & 0xf)) as u8;
    d[17] = 0x1e; // digital separate sync, both polarities positive
    d
}

/// A display descriptor holding up to 13 bytes of text, ended by a newline.
fn text_descriptor(tag: u8, text: &[u8]) -> [u8; 18] {
    let mut d = [0x20u8; 18];
    d[..5].copy_from_slice(&[0, 0, 0, tag, 0]);
    let n = text.len().min(13);
    d[5..5 + n].copy_from_slice(&text[..n]);
    if n < 13 {
        d[5 + n] = 0x0a;
    }
    d
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_block_is_valid() {
        let e = generate(1280, 800);
        assert_eq!(e[..8], [0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(e[..128].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(e[126], 0, "no extension blocks");
        // The preferred mode is the first detailed timing.
        let d = &e[54..72];
        let w = u32::from(d[2]) | u32::from(d[4] >> 4) << 8;
        let h = u32::from(d[5]) | u32::from(d[7] >> 4) << 8;
        assert_eq!((w, h), (1280, 800));
        assert!(u16::from_le_bytes([d[0], d[1]]) > 0);
        assert_eq!(&e[95..108], b"QEMU Monitor\n");
        // 1920x1080 is offered: 1920/8-31 with the 16:9 code.
        assert!(e[38..54]
            .chunks(2)
            .any(|t| t == [(1920 / 8 - 31) as u8, 0xc0]));
    }

    #[test]
    fn large_modes_do_not_overflow_fields() {
        let e = generate(8192, 8192);
        assert_eq!(e[..128].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }
}
