//! Rectangle encodings: Raw, Zlib, ZRLE and Tight (lossless: fill, palette and copy
//! with zlib; never JPEG), each client with its own zlib streams, as RFB requires (a
//! stream lives as long as the connection).

use std::io;

use flate2::{Compress, Compression, FlushCompress};

use super::pixel::PixelFormat;

pub const RAW: i32 = 0;
pub const ZLIB: i32 = 6;
pub const TIGHT: i32 = 7;
pub const ZRLE: i32 = 16;
pub const DESKTOP_SIZE: i32 = -223;
pub const POINTER_TYPE_CHANGE: i32 = -257;
pub const QEMU_EXTENDED_KEY: i32 = -258;
pub const QEMU_LED_STATE: i32 = -261;
/// Compression levels 0..=9 (Tight's pseudo-encodings).
pub const COMPRESS_LEVEL_0: i32 = -256;
pub const COMPRESS_LEVEL_9: i32 = -247;
/// QEMU's compression level for Zlib and Tight until a client asks for another.
pub const DEFAULT_LEVEL: u32 = 9;

/// Largest rectangle Tight sends (its decoders' buffers): 2048 pixels wide, 64 Ki pixels.
pub const TIGHT_MAX_WIDTH: u32 = 2048;
pub const TIGHT_MAX_PIXELS: u32 = 65536;

const ZRLE_TILE: usize = 64;
/// Tight data shorter than this is sent without compression.
const TIGHT_MIN_TO_COMPRESS: usize = 12;
const TIGHT_STREAM_COPY: u8 = 0;
const TIGHT_STREAM_PALETTE: u8 = 1;
const TIGHT_FILL: u8 = 0x80;
const TIGHT_EXPLICIT_FILTER: u8 = 0x40;
const TIGHT_FILTER_PALETTE: u8 = 1;

/// A rectangle of the screen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

/// A client's encoder: its pixel format and its zlib streams.
pub struct Encoder {
    pub format: PixelFormat,
    zlib: Compress,
    zrle: Compress,
    tight: [Compress; 2],
    scratch: Vec<u8>,
}

impl Encoder {
    /// An encoder whose Zlib and Tight streams compress at `level` (0-9; QEMU's default
    /// is 9, and a client may ask for another with the compression-level pseudo-encoding);
    /// ZRLE's compresses at zlib's default, as QEMU's does.
    pub fn new(format: PixelFormat, level: u32) -> Self {
        let z = |level| Compress::new(Compression::new(level), true);
        Encoder {
            format,
            zlib: z(level),
            zrle: z(Compression::default().level()),
            tight: [z(level), z(level)],
            scratch: Vec::new(),
        }
    }

    /// Compress Zlib and Tight at `level` from now on: each stream not used yet starts
    /// over at that level (a used one must go on as it is, or the client could not inflate
    /// it; clients choose their level when they connect).
    pub fn set_level(&mut self, level: u32) {
        let level = Compression::new(level.min(9));
        let [t0, t1] = &mut self.tight;
        for z in [&mut self.zlib, t0, t1] {
            if z.total_in() == 0 {
                *z = Compress::new(level, true);
            }
        }
    }

    /// Append the rectangle header and the pixels of `rect` in `encoding`.
    pub fn rect(
        &mut self,
        encoding: i32,
        rect: Rect,
        px: &[u32],
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        let Rect { x, y, w, h } = rect;
        header(x, y, w, h, encoding, out);
        match encoding {
            ZLIB => self.zlib_rect(px, out),
            ZRLE => self.zrle_rect(w as usize, h as usize, px, out),
            TIGHT => self.tight_rect(w as usize, px, out),
            _ => {
                self.format.put_all(px, out);
                Ok(())
            }
        }
    }

    fn zlib_rect(&mut self, px: &[u32], out: &mut Vec<u8>) -> io::Result<()> {
        let mut raw = std::mem::take(&mut self.scratch);
        raw.clear();
        self.format.put_all(px, &mut raw);
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        deflate(&mut self.zlib, &raw, out)?;
        let len = (out.len() - len_at - 4) as u32;
        out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        self.scratch = raw;
        Ok(())
    }

    fn zrle_rect(&mut self, w: usize, h: usize, px: &[u32], out: &mut Vec<u8>) -> io::Result<()> {
        let mut data = std::mem::take(&mut self.scratch);
        data.clear();
        let mut tile = Vec::with_capacity(ZRLE_TILE * ZRLE_TILE);
        for ty in (0..h).step_by(ZRLE_TILE) {
            for tx in (0..w).step_by(ZRLE_TILE) {
                let (tw, th) = (ZRLE_TILE.min(w - tx), ZRLE_TILE.min(h - ty));
                tile.clear();
                for row in ty..ty + th {
                    tile.extend_from_slice(&px[row * w + tx..row * w + tx + tw]);
                }
                zrle_tile(&self.format, tw, &tile, &mut data);
            }
        }
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        deflate(&mut self.zrle, &data, out)?;
        let len = (out.len() - len_at - 4) as u32;
        out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        self.scratch = data;
        Ok(())
    }

    /// One Tight rectangle `w` pixels wide (the caller keeps it within
    /// [`TIGHT_MAX_WIDTH`] and [`TIGHT_MAX_PIXELS`]).
    fn tight_rect(&mut self, w: usize, px: &[u32], out: &mut Vec<u8>) -> io::Result<()> {
        let palette = Palette::of(px, 256);
        let f = self.format;
        match &palette {
            Some(pal) if pal.len() == 1 => {
                out.push(TIGHT_FILL);
                f.put_tpixel(pal.colours[0], out);
                Ok(())
            }
            Some(pal) if pal.len() <= 16 || px.len() > 4 * pal.len() => {
                out.push((TIGHT_STREAM_PALETTE << 4) | TIGHT_EXPLICIT_FILTER);
                out.push(TIGHT_FILTER_PALETTE);
                out.push((pal.len() - 1) as u8);
                for c in &pal.colours {
                    f.put_tpixel(*c, out);
                }
                let data = tight_indices(px, pal, w);
                self.tight_data(TIGHT_STREAM_PALETTE, &data, out)
            }
            _ => {
                out.push(TIGHT_STREAM_COPY << 4);
                let mut data = Vec::with_capacity(px.len() * f.tpixel_len());
                for p in px {
                    f.put_tpixel(*p, &mut data);
                }
                self.tight_data(TIGHT_STREAM_COPY, &data, out)
            }
        }
    }

    fn tight_data(&mut self, stream: u8, data: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        if data.len() < TIGHT_MIN_TO_COMPRESS {
            out.extend_from_slice(data);
            return Ok(());
        }
        let mut z = Vec::with_capacity(data.len() / 2 + 64);
        deflate(&mut self.tight[usize::from(stream)], data, &mut z)?;
        compact_length(z.len(), out);
        out.extend_from_slice(&z);
        Ok(())
    }
}

/// A rectangle header.
pub fn header(x: u32, y: u32, w: u32, h: u32, encoding: i32, out: &mut Vec<u8>) {
    for v in [x, y, w, h] {
        out.extend_from_slice(&(v as u16).to_be_bytes());
    }
    out.extend_from_slice(&encoding.to_be_bytes());
}

/// Compress `input` onto `out` with a sync flush, so the client can decode it all now.
fn deflate(z: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
    let start = z.total_in();
    loop {
        out.reserve(input.len() / 2 + 1024);
        let done = (z.total_in() - start) as usize;
        z.compress_vec(&input[done..], out, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        let done = (z.total_in() - start) as usize;
        if done == input.len() && out.len() < out.capacity() {
            return Ok(());
        }
    }
}

/// Tight's compact length: 7 bits per byte, up to 3 bytes (22 bits).
fn compact_length(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x4000 {
        out.extend_from_slice(&[(len as u8) | 0x80, (len >> 7) as u8]);
    } else {
        out.extend_from_slice(&[
            (len as u8) | 0x80,
            ((len >> 7) as u8) | 0x80,
            (len >> 14) as u8,
        ]);
    }
}

/// The distinct colours of a rectangle, in order of appearance, with a lookup table from
/// colour to index (pixels are 0x00RRGGBB, so `EMPTY` is never a colour).
struct Palette {
    colours: Vec<u32>,
    table: Vec<(u32, u8)>,
}

const PALETTE_SLOTS: usize = 1024;
const EMPTY: u32 = u32::MAX;

fn slot(p: u32) -> usize {
    (p.wrapping_mul(0x9e37_79b1) >> 22) as usize % PALETTE_SLOTS
}

impl Palette {
    /// The palette of `px`, if it has at most `max` (at most 256) colours.
    fn of(px: &[u32], max: usize) -> Option<Palette> {
        let mut pal = Palette {
            colours: Vec::new(),
            table: vec![(EMPTY, 0); PALETTE_SLOTS],
        };
        let mut last = None;
        for &p in px {
            if last == Some(p) {
                continue;
            }
            last = Some(p);
            let mut i = slot(p);
            loop {
                match pal.table[i] {
                    (c, _) if c == p => break,
                    (EMPTY, _) => {
                        if pal.colours.len() == max.min(256) {
                            return None;
                        }
                        pal.table[i] = (p, pal.colours.len() as u8);
                        pal.colours.push(p);
                        break;
                    }
                    _ => i = (i + 1) % PALETTE_SLOTS,
                }
            }
        }
        Some(pal)
    }

    fn index(&self, p: u32) -> u8 {
        let mut i = slot(p);
        // At most 256 of the 1024 slots are taken: an empty one ends every probe.
        loop {
            match self.table[i] {
                (c, index) if c == p => return index,
                (EMPTY, _) => return 0,
                _ => i = (i + 1) % PALETTE_SLOTS,
            }
        }
    }

    fn len(&self) -> usize {
        self.colours.len()
    }
}

/// Pack palette indices `bits` wide, MSB first, each row padded to a byte.
fn pack_indices(px: &[u32], pal: &Palette, width: usize, bits: usize, out: &mut Vec<u8>) {
    for row in px.chunks(width.max(1)) {
        let (mut byte, mut used) = (0u8, 0);
        for &p in row {
            byte = (byte << bits) | pal.index(p);
            used += bits;
            if used == 8 {
                out.push(byte);
                (byte, used) = (0, 0);
            }
        }
        if used > 0 {
            out.push(byte << (8 - used));
        }
    }
}

/// Tight's palette data: one bit per pixel for two colours, else a byte.
fn tight_indices(px: &[u32], pal: &Palette, width: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(px.len());
    if pal.len() == 2 {
        pack_indices(px, pal, width, 1, &mut data);
    } else {
        data.extend(px.iter().map(|p| pal.index(*p)));
    }
    data
}

/// Runs of equal pixels.
fn runs(px: &[u32]) -> Vec<(u32, usize)> {
    let mut runs: Vec<(u32, usize)> = Vec::new();
    for &p in px {
        match runs.last_mut() {
            Some((c, n)) if *c == p => *n += 1,
            _ => runs.push((p, 1)),
        }
    }
    runs
}

fn run_length(mut n: usize, out: &mut Vec<u8>) {
    n -= 1;
    while n >= 255 {
        out.push(255);
        n -= 255;
    }
    out.push(n as u8);
}

/// One ZRLE tile of width `w`: solid, packed palette, plain RLE, palette RLE or raw,
/// whichever is smallest.
fn zrle_tile(f: &PixelFormat, w: usize, px: &[u32], out: &mut Vec<u8>) {
    let cpx = f.cpixel_len();
    let h = px.len() / w.max(1);
    let colours = Palette::of(px, 127);
    if let Some(pal) = colours.as_ref().filter(|p| p.len() == 1) {
        out.push(1);
        f.put_cpixel(pal.colours[0], out);
        return;
    }
    let runs = runs(px);
    let run_bytes: usize = runs.iter().map(|(_, n)| (n - 1) / 255 + 1).sum();
    let raw_size = px.len() * cpx;
    let plain_rle = runs.len() * cpx + run_bytes;
    let (packed, palette_rle) = match &colours {
        Some(c) => {
            let bits = match c.len() {
                2 => 1,
                3..=4 => 2,
                _ => 4,
            };
            let packed = (c.len() <= 16).then(|| c.len() * cpx + h * (w * bits).div_ceil(8));
            let single = runs.iter().filter(|(_, n)| *n == 1).count();
            (
                packed,
                Some(c.len() * cpx + runs.len() + run_bytes - single),
            )
        }
        None => (None, None),
    };
    let best = [Some(raw_size), packed, Some(plain_rle), palette_rle]
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (s, i)))
        .min()
        .map_or(0, |(_, i)| i);
    match (best, &colours) {
        (1, Some(c)) => {
            out.push(c.len() as u8);
            for colour in &c.colours {
                f.put_cpixel(*colour, out);
            }
            let bits = match c.len() {
                2 => 1,
                3..=4 => 2,
                _ => 4,
            };
            pack_indices(px, c, w, bits, out);
        }
        (2, _) => {
            out.push(128);
            for (colour, n) in &runs {
                f.put_cpixel(*colour, out);
                run_length(*n, out);
            }
        }
        (3, Some(c)) => {
            out.push(128 + c.len() as u8);
            for colour in &c.colours {
                f.put_cpixel(*colour, out);
            }
            for (colour, n) in &runs {
                let i = c.index(*colour);
                if *n == 1 {
                    out.push(i);
                } else {
                    out.push(i | 0x80);
                    run_length(*n, out);
                }
            }
        }
        _ => {
            out.push(0);
            for p in px {
                f.put_cpixel(*p, out);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::{Decompress, FlushDecompress};

    /// Inflate from a client's stream.
    fn inflate(z: &mut Decompress, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 << 22);
        z.decompress_vec(data, &mut out, FlushDecompress::Sync)
            .unwrap();
        out
    }

    fn cpixel(f: &PixelFormat, b: &[u8]) -> u32 {
        // Our test formats are the server's: CPIXEL bytes are B, G, R.
        let _ = f;
        u32::from(b[2]) << 16 | u32::from(b[1]) << 8 | u32::from(b[0])
    }

    /// A ZRLE decoder for the server pixel format, as a client would have.
    pub fn decode_zrle(z: &mut Decompress, w: usize, h: usize, body: &[u8]) -> Vec<u32> {
        let len = u32::from_be_bytes(body[..4].try_into().unwrap()) as usize;
        assert_eq!(body.len(), 4 + len);
        let data = inflate(z, &body[4..]);
        let f = PixelFormat::SERVER;
        let mut at = 0;
        let mut px = vec![0u32; w * h];
        let mut take = |n: usize| {
            let s = &data[at..at + n];
            at += n;
            s.to_vec()
        };
        for ty in (0..h).step_by(64) {
            for tx in (0..w).step_by(64) {
                let (tw, th) = (64.min(w - tx), 64.min(h - ty));
                let mut tile = Vec::new();
                let sub = take(1)[0];
                let read_len = |take: &mut dyn FnMut(usize) -> Vec<u8>| {
                    let mut n = 1;
                    loop {
                        let b = take(1)[0];
                        n += usize::from(b);
                        if b != 255 {
                            return n;
                        }
                    }
                };
                match sub {
                    0 => (0..tw * th).for_each(|_| tile.push(cpixel(&f, &take(3)))),
                    1 => tile = vec![cpixel(&f, &take(3)); tw * th],
                    2..=16 => {
                        let pal: Vec<u32> = (0..sub).map(|_| cpixel(&f, &take(3))).collect();
                        let bits = match sub {
                            2 => 1,
                            3..=4 => 2,
                            _ => 4,
                        };
                        for _ in 0..th {
                            let row = take((tw * bits).div_ceil(8));
                            for x in 0..tw {
                                let bit = x * bits;
                                let v = (row[bit / 8] >> (8 - bits - bit % 8)) & ((1 << bits) - 1);
                                tile.push(pal[usize::from(v)]);
                            }
                        }
                    }
                    128 => {
                        while tile.len() < tw * th {
                            let c = cpixel(&f, &take(3));
                            let n = read_len(&mut take);
                            tile.extend(std::iter::repeat_n(c, n));
                        }
                    }
                    130..=255 => {
                        let pal: Vec<u32> = (0..sub - 128).map(|_| cpixel(&f, &take(3))).collect();
                        while tile.len() < tw * th {
                            let i = take(1)[0];
                            let n = if i & 0x80 != 0 {
                                read_len(&mut take)
                            } else {
                                1
                            };
                            tile.extend(std::iter::repeat_n(pal[usize::from(i & 0x7f)], n));
                        }
                    }
                    other => panic!("subencoding {other}"),
                }
                for (i, p) in tile.into_iter().enumerate() {
                    px[(ty + i / tw) * w + tx + i % tw] = p;
                }
            }
        }
        assert_eq!(at, data.len());
        px
    }

    /// A Tight decoder (lossless subset) for the server pixel format.
    pub fn decode_tight(z: &mut [Decompress; 4], w: usize, h: usize, body: &[u8]) -> Vec<u32> {
        let control = body[0];
        let rgb = |b: &[u8]| u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        if control == TIGHT_FILL {
            return vec![rgb(&body[1..4]); w * h];
        }
        let stream = usize::from((control >> 4) & 3);
        let mut at = 1;
        let mut pal = Vec::new();
        if control & TIGHT_EXPLICIT_FILTER != 0 {
            assert_eq!(body[at], TIGHT_FILTER_PALETTE);
            let n = usize::from(body[at + 1]) + 1;
            at += 2;
            pal = (0..n).map(|i| rgb(&body[at + 3 * i..])).collect();
            at += 3 * n;
        }
        let raw_len = if pal.is_empty() {
            w * h * 3
        } else if pal.len() == 2 {
            w.div_ceil(8) * h
        } else {
            w * h
        };
        let data = if raw_len < TIGHT_MIN_TO_COMPRESS {
            body[at..at + raw_len].to_vec()
        } else {
            let mut len = 0;
            for i in 0..3 {
                let b = body[at];
                at += 1;
                len |= usize::from(b & if i == 2 { 0xff } else { 0x7f }) << (7 * i);
                if b & 0x80 == 0 || i == 2 {
                    break;
                }
            }
            assert_eq!(body.len(), at + len);
            inflate(&mut z[stream], &body[at..])
        };
        assert_eq!(data.len(), raw_len);
        match pal.len() {
            0 => data.chunks(3).map(rgb).collect(),
            2 => (0..w * h)
                .map(|i| {
                    let (x, y) = (i % w, i / w);
                    let byte = data[y * w.div_ceil(8) + x / 8];
                    pal[usize::from((byte >> (7 - x % 8)) & 1)]
                })
                .collect(),
            _ => data.iter().map(|i| pal[usize::from(*i)]).collect(),
        }
    }

    fn pattern(w: usize, h: usize, kind: usize) -> Vec<u32> {
        (0..w * h)
            .map(|i| match kind {
                0 => 0x123456,
                1 => {
                    if ((i % w) / 3).is_multiple_of(2) {
                        0xffffff
                    } else {
                        0
                    }
                }
                2 => [0xff0000, 0x00ff00, 0x0000ff, 0xffff00, 0x00ffff][(i / 7) % 5],
                3 => (i as u32).wrapping_mul(2_654_435_761) & 0xffffff,
                _ => [0x10, 0x20][(i / 300) % 2],
            })
            .collect()
    }

    /// A client's decoder of one rectangle's body: width, height, bytes to pixels.
    type Decoder<'a> = &'a mut dyn FnMut(usize, usize, &[u8]) -> Vec<u32>;

    /// Encode every test pattern at each size with `encoding` and decode it back.
    fn round_trip(encoding: i32, sizes: &[(usize, usize)], decode: Decoder<'_>) {
        let mut e = Encoder::new(PixelFormat::SERVER, DEFAULT_LEVEL);
        for &(w, h) in sizes {
            for kind in 0..5 {
                let px = pattern(w, h, kind);
                let mut out = Vec::new();
                let rect = Rect {
                    x: 0,
                    y: 0,
                    w: w as u32,
                    h: h as u32,
                };
                e.rect(encoding, rect, &px, &mut out).unwrap();
                assert_eq!(decode(w, h, &out[12..]), px, "{w}x{h} pattern {kind}");
            }
        }
    }

    #[test]
    fn zrle_round_trips_every_kind_of_tile() {
        let mut z = Decompress::new(true);
        round_trip(
            ZRLE,
            &[(64, 64), (100, 70), (1, 1), (130, 3)],
            &mut |w, h, body| decode_zrle(&mut z, w, h, body),
        );
    }

    #[test]
    fn tight_round_trips_fill_palette_and_copy() {
        let mut z: [Decompress; 4] = std::array::from_fn(|_| Decompress::new(true));
        round_trip(
            TIGHT,
            &[(64, 64), (100, 70), (1, 1), (3, 2)],
            &mut |w, h, body| decode_tight(&mut z, w, h, body),
        );
    }

    #[test]
    fn zlib_and_raw_carry_client_pixels() {
        let mut e = Encoder::new(PixelFormat::SERVER, DEFAULT_LEVEL);
        let px = pattern(10, 10, 3);
        let mut out = Vec::new();
        e.rect(
            RAW,
            Rect {
                x: 1,
                y: 2,
                w: 10,
                h: 10,
            },
            &px,
            &mut out,
        )
        .unwrap();
        assert_eq!(out[..12], [0, 1, 0, 2, 0, 10, 0, 10, 0, 0, 0, 0]);
        assert_eq!(out.len(), 12 + 400);
        let mut z = Decompress::new(true);
        for _ in 0..3 {
            let mut zl = Vec::new();
            e.rect(
                ZLIB,
                Rect {
                    x: 1,
                    y: 2,
                    w: 10,
                    h: 10,
                },
                &px,
                &mut zl,
            )
            .unwrap();
            assert_eq!(zl[8..12], 6i32.to_be_bytes());
            let len = u32::from_be_bytes(zl[12..16].try_into().unwrap()) as usize;
            assert_eq!(zl.len(), 16 + len);
            assert_eq!(inflate(&mut z, &zl[16..]), out[12..]);
        }
    }

    #[test]
    fn compact_lengths() {
        for (len, want) in [
            (5, vec![5]),
            (200, vec![0xc8, 0x01]),
            (70000, vec![0xf0, 0xa2, 0x04]),
        ] {
            let mut out = Vec::new();
            compact_length(len, &mut out);
            assert_eq!(out, want, "{len}");
        }
    }
}
