//! RFB pixel formats: the one a client asks for with SetPixelFormat, and conversion of
//! our 0x00RRGGBB pixels into it (whole pixels, ZRLE's compressed CPIXELs and Tight's
//! TPIXELs).

/// A true-colour pixel format (RFC 6143 7.4). Colour-map formats are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PixelFormat {
    pub bits_per_pixel: u8,
    pub depth: u8,
    pub big_endian: bool,
    /// Red, green, blue maxima and shifts.
    pub max: [u16; 3],
    pub shift: [u8; 3],
}

impl PixelFormat {
    /// What the server offers in ServerInit: 32 bits, depth 24, little-endian x8r8g8b8.
    pub const SERVER: PixelFormat = PixelFormat {
        bits_per_pixel: 32,
        depth: 24,
        big_endian: false,
        max: [255, 255, 255],
        shift: [16, 8, 0],
    };

    /// Parse the 16 bytes of a PIXEL_FORMAT.
    pub fn parse(b: &[u8; 16]) -> Result<Self, String> {
        let bits_per_pixel = b[0];
        if !matches!(bits_per_pixel, 8 | 16 | 32) {
            return Err(format!("bits per pixel {bits_per_pixel}"));
        }
        if b[3] == 0 {
            return Err("colour-map pixel formats are not supported".into());
        }
        let max = [
            u16::from_be_bytes([b[4], b[5]]),
            u16::from_be_bytes([b[6], b[7]]),
            u16::from_be_bytes([b[8], b[9]]),
        ];
        let shift = [b[10], b[11], b[12]];
        for i in 0..3 {
            let bits = 16 - max[i].leading_zeros();
            if max[i] == 0 || u32::from(shift[i]) + bits > u32::from(bits_per_pixel) {
                return Err(format!("colour {i}: max {} shift {}", max[i], shift[i]));
            }
        }
        Ok(PixelFormat {
            bits_per_pixel,
            depth: b[1],
            big_endian: b[2] != 0,
            max,
            shift,
        })
    }

    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0] = self.bits_per_pixel;
        b[1] = self.depth;
        b[2] = u8::from(self.big_endian);
        b[3] = 1;
        for i in 0..3 {
            b[4 + 2 * i..6 + 2 * i].copy_from_slice(&self.max[i].to_be_bytes());
            b[10 + i] = self.shift[i];
        }
        b
    }

    pub fn bytes_per_pixel(&self) -> usize {
        usize::from(self.bits_per_pixel / 8)
    }

    /// The pixel value of 0x00RRGGBB.
    pub fn value(&self, rgb: u32) -> u32 {
        let mut v = 0;
        for i in 0..3 {
            let c = (rgb >> (16 - 8 * i)) & 0xff;
            let max = u32::from(self.max[i]);
            v |= ((c * max + 127) / 255) << self.shift[i];
        }
        v
    }

    /// The server's own format: pixels go out as they are.
    pub fn is_server(&self) -> bool {
        self.bits_per_pixel == 32
            && !self.big_endian
            && self.max == [255, 255, 255]
            && self.shift == [16, 8, 0]
    }

    /// Append the pixels of `px` (0x00RRGGBB each).
    pub fn put_all(&self, px: &[u32], out: &mut Vec<u8>) {
        if self.is_server() && cfg!(target_endian = "little") {
            // SAFETY: a u32 slice is readable as bytes (u8 has no alignment and no invalid
            // values); on a little-endian host those bytes are the pixels' LE encoding.
            let bytes =
                unsafe { std::slice::from_raw_parts(px.as_ptr().cast::<u8>(), px.len() * 4) };
            out.extend_from_slice(bytes);
        } else {
            for p in px {
                self.put(*p, out);
            }
        }
    }

    /// Append the pixel of `rgb`, `bytes_per_pixel` bytes in the client's byte order.
    pub fn put(&self, rgb: u32, out: &mut Vec<u8>) {
        let v = self.value(rgb);
        match (self.bits_per_pixel, self.big_endian) {
            (8, _) => out.push(v as u8),
            (16, false) => out.extend_from_slice(&(v as u16).to_le_bytes()),
            (16, true) => out.extend_from_slice(&(v as u16).to_be_bytes()),
            (_, false) => out.extend_from_slice(&v.to_le_bytes()),
            (_, true) => out.extend_from_slice(&v.to_be_bytes()),
        }
    }

    /// Where ZRLE's 3-byte CPIXEL comes from, if it is 3 bytes: the pixel's bytes to keep.
    fn compressed_bytes(&self) -> Option<std::ops::Range<usize>> {
        if self.bits_per_pixel != 32 || self.depth > 24 {
            return None;
        }
        let top = (0..3)
            .map(|i| u32::from(self.shift[i]) + (16 - self.max[i].leading_zeros()))
            .max()
            .unwrap_or(0);
        let bottom = (0..3).map(|i| self.shift[i]).min().unwrap_or(0);
        // The colour bits fit the least significant three bytes, or the most significant.
        let low = top <= 24;
        let high = bottom >= 8;
        match (low, high, self.big_endian) {
            (true, _, false) => Some(0..3),
            (true, _, true) => Some(1..4),
            (false, true, false) => Some(1..4),
            (false, true, true) => Some(0..3),
            _ => None,
        }
    }

    /// Bytes of a ZRLE CPIXEL.
    pub fn cpixel_len(&self) -> usize {
        self.compressed_bytes()
            .map_or(self.bytes_per_pixel(), |r| r.len())
    }

    /// Append the ZRLE CPIXEL of `rgb`.
    pub fn put_cpixel(&self, rgb: u32, out: &mut Vec<u8>) {
        match self.compressed_bytes() {
            Some(range) => {
                let start = out.len();
                self.put(rgb, out);
                let bytes: [u8; 4] = out[start..start + 4].try_into().unwrap_or([0; 4]);
                out.truncate(start);
                out.extend_from_slice(&bytes[range]);
            }
            None => self.put(rgb, out),
        }
    }

    /// Tight sends 3-byte R, G, B pixels for 32-bit depth-24 formats with 8-bit colours.
    pub fn tight_rgb(&self) -> bool {
        self.bits_per_pixel == 32 && self.depth == 24 && self.max == [255, 255, 255]
    }

    /// Bytes of a Tight TPIXEL.
    pub fn tpixel_len(&self) -> usize {
        if self.tight_rgb() {
            3
        } else {
            self.bytes_per_pixel()
        }
    }

    /// Append the Tight TPIXEL of `rgb`.
    pub fn put_tpixel(&self, rgb: u32, out: &mut Vec<u8>) {
        if self.tight_rgb() {
            out.extend_from_slice(&[(rgb >> 16) as u8, (rgb >> 8) as u8, rgb as u8]);
        } else {
            self.put(rgb, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_format_round_trips() {
        let f = PixelFormat::SERVER;
        assert_eq!(PixelFormat::parse(&f.encode()).unwrap(), f);
        let mut out = Vec::new();
        f.put(0x102030, &mut out);
        assert_eq!(out, [0x30, 0x20, 0x10, 0]);
        out.clear();
        f.put_cpixel(0x102030, &mut out);
        assert_eq!(out, [0x30, 0x20, 0x10]);
        out.clear();
        f.put_tpixel(0x102030, &mut out);
        assert_eq!(out, [0x10, 0x20, 0x30]);
    }

    #[test]
    fn other_formats_convert() {
        let mut rgb565 = PixelFormat::SERVER;
        rgb565.bits_per_pixel = 16;
        rgb565.depth = 16;
        rgb565.max = [31, 63, 31];
        rgb565.shift = [11, 5, 0];
        let mut out = Vec::new();
        rgb565.put(0xff0000, &mut out);
        assert_eq!(out, 0xf800u16.to_le_bytes());
        assert_eq!(rgb565.cpixel_len(), 2);
        // Big-endian with colours in the top three bytes: the CPIXEL is the first three.
        let mut be = PixelFormat::SERVER;
        be.big_endian = true;
        be.shift = [24, 16, 8];
        out.clear();
        be.put_cpixel(0x102030, &mut out);
        assert_eq!(out, [0x10, 0x20, 0x30]);
    }

    #[test]
    fn bad_formats_are_refused() {
        let mut b = PixelFormat::SERVER.encode();
        b[3] = 0;
        assert!(PixelFormat::parse(&b).is_err(), "colour map");
        let mut b = PixelFormat::SERVER.encode();
        b[0] = 7;
        assert!(PixelFormat::parse(&b).is_err());
        let mut b = PixelFormat::SERVER.encode();
        b[10] = 30;
        assert!(PixelFormat::parse(&b).is_err(), "shift past the pixel");
    }
}
