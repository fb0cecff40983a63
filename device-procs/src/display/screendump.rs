//! `screendump`: the screen written to a file the vmm opened, as QEMU writes it: PPM
//! (`P6`, 8-bit RGB rows) or PNG (8-bit RGB).

use std::io::{self, Write};

use ipc::display::ImageFormat;

use super::screen::Screen;

/// Write `screen` to `out` in `format`.
pub fn write(screen: &Screen, format: ImageFormat, out: impl Write) -> io::Result<()> {
    match format {
        ImageFormat::Ppm => write_ppm(screen, out),
        ImageFormat::Png => write_png(screen, out),
    }
}

fn rgb_rows(screen: &Screen) -> impl Iterator<Item = Vec<u8>> + '_ {
    screen
        .pixels
        .chunks(screen.width.max(1) as usize)
        .map(|row| {
            row.iter()
                .flat_map(|p| [(p >> 16) as u8, (p >> 8) as u8, *p as u8])
                .collect()
        })
}

fn write_ppm(screen: &Screen, out: impl Write) -> io::Result<()> {
    let mut out = io::BufWriter::new(out);
    write!(out, "P6\n{} {}\n255\n", screen.width, screen.height)?;
    for row in rgb_rows(screen) {
        out.write_all(&row)?;
    }
    out.flush()
}

fn write_png(screen: &Screen, out: impl Write) -> io::Result<()> {
    let mut encoder = png::Encoder::new(io::BufWriter::new(out), screen.width, screen.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(io::Error::other)?;
    let data: Vec<u8> = rgb_rows(screen).flatten().collect();
    writer.write_image_data(&data).map_err(io::Error::other)?;
    writer.finish().map_err(io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn screen() -> Screen {
        let mut s = Screen::new();
        s.width = 2;
        s.height = 2;
        s.pixels = vec![0xff0000, 0x00ff00, 0x0000ff, 0x123456];
        s
    }

    #[test]
    fn ppm_as_qemu_writes_it() {
        let mut out = Vec::new();
        write(&screen(), ImageFormat::Ppm, &mut out).unwrap();
        let mut want = b"P6\n2 2\n255\n".to_vec();
        want.extend_from_slice(&[255, 0, 0, 0, 255, 0, 0, 0, 255, 0x12, 0x34, 0x56]);
        assert_eq!(out, want);
    }

    #[test]
    fn png_decodes_to_the_same_pixels() {
        let mut out = Vec::new();
        write(&screen(), ImageFormat::Png, &mut out).unwrap();
        let decoder = png::Decoder::new(&out[..]);
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (2, 2));
        assert_eq!(
            &buf[..12],
            &[255, 0, 0, 0, 255, 0, 0, 0, 255, 0x12, 0x34, 0x56]
        );
    }
}
