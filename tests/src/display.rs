//! What the display tests share: the pattern `tests/guest/fbpattern.c` draws, images read
//! back (PPM), a minimal RFB client for handshakes and hostile clients, and the
//! vncdotool-based client (`tests/python/vnc_client.py`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::{repo_root, TempDir};

/// Pixel (x, y) of fbpattern's pattern, as (r, g, b).
pub fn pattern(x: u32, y: u32) -> [u8; 3] {
    if (64..192).contains(&x) && (64..128).contains(&y) {
        return [0x20, 0x40, 0x80];
    }
    if (256..320).contains(&x) && y < 64 {
        return [0xff; 3];
    }
    [
        ((x * 7 + y * 3) & 0xff) as u8,
        ((x ^ y) & 0xff) as u8,
        (((x + y) / 4) & 0xff) as u8,
    ]
}

/// An RGB image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    /// RGB bytes, row by row.
    pub rgb: Vec<u8>,
}

impl Image {
    /// The pattern at `width`x`height`.
    pub fn pattern(width: u32, height: u32) -> Self {
        let mut rgb = Vec::with_capacity((width * height * 3) as usize);
        for y in 0..height {
            for x in 0..width {
                rgb.extend_from_slice(&pattern(x, y));
            }
        }
        Image { width, height, rgb }
    }

    /// A binary PPM (P6, maxval 255) as QEMU and PIL write it.
    pub fn read_ppm(path: &Path) -> Self {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut fields = Vec::new();
        let mut at = 0;
        while fields.len() < 4 {
            while data[at].is_ascii_whitespace() {
                at += 1;
            }
            let start = at;
            while !data[at].is_ascii_whitespace() {
                at += 1;
            }
            fields.push(String::from_utf8_lossy(&data[start..at]).into_owned());
        }
        at += 1;
        assert_eq!(fields[0], "P6", "{}", path.display());
        assert_eq!(fields[3], "255");
        let width: u32 = fields[1].parse().unwrap();
        let height: u32 = fields[2].parse().unwrap();
        let rgb = data[at..].to_vec();
        assert_eq!(
            rgb.len(),
            (width * height * 3) as usize,
            "{}",
            path.display()
        );
        Image { width, height, rgb }
    }

    /// Where `self` and `other` differ: the count and the first few (x, y).
    pub fn differences(&self, other: &Image) -> (usize, Vec<(u32, u32)>) {
        assert_eq!(
            (self.width, self.height),
            (other.width, other.height),
            "image sizes"
        );
        let mut first = Vec::new();
        let mut count = 0;
        for (i, (a, b)) in self.rgb.chunks(3).zip(other.rgb.chunks(3)).enumerate() {
            if a != b {
                count += 1;
                if first.len() < 5 {
                    first.push((i as u32 % self.width, i as u32 / self.width));
                }
            }
        }
        (count, first)
    }

    /// Assert that `self` is `other` pixel for pixel.
    pub fn assert_same(&self, other: &Image, what: &str) {
        let (count, first) = self.differences(other);
        assert_eq!(
            count, 0,
            "{what}: {count} pixels differ, first at {first:?}"
        );
    }
}

/// Run `tests/python/vnc_client.py` with `args`; its JSON verdict.
pub fn vnc_client(args: &[&str]) -> Value {
    let script = repo_root().join("tests/python/vnc_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(args)
        .output()
        .expect("python3 with vncdotool (scripts/test installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|_| {
        panic!(
            "vnc_client.py {args:?}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Capture the screen over VNC (vncdotool) with `encoding`, as an image.
pub fn vnc_capture(server: &Path, dir: &TempDir, encoding: &str, password: Option<&str>) -> Image {
    let out: PathBuf = dir.join(&format!("capture-{encoding}.ppm"));
    let server = server.display().to_string();
    let out_text = out.display().to_string();
    let mut args = vec![
        server.as_str(),
        "capture",
        out_text.as_str(),
        "--encoding",
        encoding,
    ];
    if let Some(pw) = password {
        args.extend(["--password", pw]);
    }
    let verdict = vnc_client(&args);
    assert_eq!(verdict["ok"], true, "capture over {encoding}: {verdict}");
    Image::read_ppm(&out)
}

/// A hand-driven RFB client, for handshakes and misbehaviour.
pub struct RawClient {
    pub stream: UnixStream,
}

/// What a handshake ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Handshake {
    /// ServerInit: the screen size and the desktop name.
    Ready {
        width: u16,
        height: u16,
        name: String,
    },
    /// SecurityResult failed, with the reason.
    Refused(String),
}

impl RawClient {
    pub fn new(stream: UnixStream) -> Self {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        RawClient { stream }
    }

    pub fn connect(path: &Path) -> Self {
        Self::new(UnixStream::connect(path).expect("connect to the VNC socket"))
    }

    pub fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.stream
            .read_exact(&mut b)
            .expect("read from the server");
        b
    }

    pub fn write(&mut self, b: &[u8]) {
        self.stream.write_all(b).expect("write to the server");
    }

    /// RFB 3.8 up to ServerInit; `password` answers VNC Authentication.
    pub fn handshake(&mut self, password: Option<&str>) -> Handshake {
        assert_eq!(self.read_exact(12), b"RFB 003.008\n");
        self.write(b"RFB 003.008\n");
        let n = self.read_exact(1)[0] as usize;
        let types = self.read_exact(n);
        if types.contains(&2) {
            self.write(&[2]);
            let challenge = self.read_exact(16);
            let answer = vnc_response(password.unwrap_or(""), &challenge);
            self.write(&answer);
        } else {
            assert_eq!(types, [1], "security types");
            self.write(&[1]);
        }
        let result = u32::from_be_bytes(self.read_exact(4).try_into().unwrap());
        if result != 0 {
            let len = u32::from_be_bytes(self.read_exact(4).try_into().unwrap());
            let reason = String::from_utf8_lossy(&self.read_exact(len as usize)).into_owned();
            return Handshake::Refused(reason);
        }
        self.write(&[1]); // shared
        let init = self.read_exact(24);
        let width = u16::from_be_bytes([init[0], init[1]]);
        let height = u16::from_be_bytes([init[2], init[3]]);
        let len = u32::from_be_bytes(init[20..24].try_into().unwrap());
        let name = String::from_utf8_lossy(&self.read_exact(len as usize)).into_owned();
        Handshake::Ready {
            width,
            height,
            name,
        }
    }

    /// Whether the server closed the connection (a read gives end of file or an error).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) | Err(_) => return true,
                // Updates may still be on their way.
                Ok(_) => continue,
            }
        }
    }
}

/// VNC Authentication's answer, computed here with the device crate's DES (the e2e tests
/// also log in with vncdotool, whose DES is its own).
pub fn vnc_response(password: &str, challenge: &[u8]) -> [u8; 16] {
    let challenge: [u8; 16] = challenge.try_into().expect("a 16-byte challenge");
    device_procs::display::vnc::auth::response(password, &challenge)
}
