//! The control protocol of `vmm-display`, the display device process, and the scanout
//! page it shares with the vmm.
//!
//! The framebuffer is the display device's VRAM, a memfd of the vmm's that the guest
//! writes through its BAR; the process maps it read-only. What part of it is on screen
//! (the mode the guest set through the DISPI registers, and the offset it flips pages
//! with) changes on vCPU threads, which must not wait on a socket: the vmm publishes it in
//! a second shared page, the [`Scanout`], under a sequence lock, and the process reads it
//! whenever it looks at the screen.
//!
//! Everything the process serves arrives as an fd: the framebuffer, the scanout page, the
//! VNC listening socket the vmm opened, client sockets (`add_client`), and the files
//! `screendump` writes.

use std::sync::atomic::{fence, AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use crate::channel::Channel;

/// Size of the scanout page.
pub const SCANOUT_PAGE_SIZE: usize = 4096;

/// How the guest's pixels are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PixelFormat {
    /// 32 bits per pixel, x8r8g8b8 in little-endian words (blue first in memory).
    Xrgb8888,
    /// 32 bits per pixel, x8r8g8b8 in big-endian words (the guest set the big-endian
    /// byte order in the extension registers).
    Xrgb8888BigEndian,
    /// 16 bits per pixel, r5g6b5 little-endian.
    Rgb565,
}

impl PixelFormat {
    pub fn bytes_per_pixel(self) -> u32 {
        match self {
            PixelFormat::Rgb565 => 2,
            _ => 4,
        }
    }

    fn code(self) -> u32 {
        match self {
            PixelFormat::Xrgb8888 => 1,
            PixelFormat::Xrgb8888BigEndian => 2,
            PixelFormat::Rgb565 => 3,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(PixelFormat::Xrgb8888),
            2 => Some(PixelFormat::Xrgb8888BigEndian),
            3 => Some(PixelFormat::Rgb565),
            _ => None,
        }
    }

    /// The (red, green, blue) of the pixel whose bytes start `px`.
    pub fn rgb(self, px: &[u8]) -> (u8, u8, u8) {
        match self {
            PixelFormat::Xrgb8888 => (px[2], px[1], px[0]),
            PixelFormat::Xrgb8888BigEndian => (px[1], px[2], px[3]),
            PixelFormat::Rgb565 => {
                let v = u16::from_le_bytes([px[0], px[1]]);
                let r = ((v >> 11) & 0x1f) as u8;
                let g = ((v >> 5) & 0x3f) as u8;
                let b = (v & 0x1f) as u8;
                (
                    (r << 3) | (r >> 2),
                    (g << 2) | (g >> 4),
                    (b << 3) | (b >> 2),
                )
            }
        }
    }
}

/// The part of the framebuffer on screen: a valid mode the guest enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mode {
    pub width: u32,
    pub height: u32,
    /// Bytes from one line to the next.
    pub stride: u32,
    pub format: PixelFormat,
    /// Byte offset of the first visible pixel in the framebuffer.
    pub offset: u64,
}

impl Mode {
    /// Bytes of framebuffer the mode shows, from `offset`.
    pub fn size(&self) -> u64 {
        u64::from(self.stride) * u64::from(self.height)
    }

    /// Does the mode lie inside a framebuffer of `len` bytes, with lines long enough?
    pub fn fits(&self, len: u64) -> bool {
        let line = u64::from(self.width) * u64::from(self.format.bytes_per_pixel());
        u64::from(self.stride) >= line
            && self
                .offset
                .checked_add(self.size())
                .is_some_and(|end| end <= len)
    }
}

// Word offsets in the scanout page.
const SEQ: usize = 0;
const FORMAT: usize = 1;
const WIDTH: usize = 2;
const HEIGHT: usize = 3;
const STRIDE: usize = 4;
const OFFSET_LO: usize = 5;
const OFFSET_HI: usize = 6;
/// The keyboard LEDs (bit 0 scroll lock, 1 num lock, 2 caps lock), outside the sequence
/// lock: one word, written and read whole.
const LEDS: usize = 7;
const WORDS: usize = 8;

/// A view of the shared scanout page: the vmm writes it, the display process reads it.
///
/// A sequence lock: the writer makes the sequence odd, stores, makes it even again; a
/// reader retries while the sequence is odd or changed under it. A stuck or hostile writer
/// can only make the reader see no mode.
pub struct Scanout {
    words: *const AtomicU32,
}

// SAFETY: all accesses are atomics on shared memory that outlives the view (`new`'s
// contract).
unsafe impl Send for Scanout {}
// SAFETY: as above.
unsafe impl Sync for Scanout {}

impl Scanout {
    /// # Safety
    /// `page` must point to at least [`SCANOUT_PAGE_SIZE`] bytes of 4-byte-aligned memory
    /// that stays mapped for as long as the returned view lives.
    pub unsafe fn new(page: *mut u8) -> Self {
        Scanout {
            words: page as *const AtomicU32,
        }
    }

    fn word(&self, i: usize) -> &AtomicU32 {
        debug_assert!(i < WORDS);
        // SAFETY: i < WORDS, inside the page (`new`'s contract); AtomicU32 has u32's
        // layout and the page is aligned.
        unsafe { &*self.words.add(i) }
    }

    /// Publish `mode` (`None`: nothing on screen). One writer at a time.
    pub fn publish(&self, mode: Option<Mode>) {
        let seq = self.word(SEQ).load(Ordering::Relaxed);
        self.word(SEQ).store(seq | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        let m = mode.unwrap_or(Mode {
            width: 0,
            height: 0,
            stride: 0,
            format: PixelFormat::Xrgb8888,
            offset: 0,
        });
        let format = if mode.is_some() { m.format.code() } else { 0 };
        self.word(FORMAT).store(format, Ordering::Relaxed);
        self.word(WIDTH).store(m.width, Ordering::Relaxed);
        self.word(HEIGHT).store(m.height, Ordering::Relaxed);
        self.word(STRIDE).store(m.stride, Ordering::Relaxed);
        self.word(OFFSET_LO)
            .store(m.offset as u32, Ordering::Relaxed);
        self.word(OFFSET_HI)
            .store((m.offset >> 32) as u32, Ordering::Relaxed);
        self.word(SEQ)
            .store((seq | 1).wrapping_add(1), Ordering::Release);
    }

    /// The mode on screen, or `None` (no valid mode, or the writer is mid-update more
    /// than a few times in a row).
    pub fn read(&self) -> Option<Mode> {
        for _ in 0..64 {
            let before = self.word(SEQ).load(Ordering::Acquire);
            if before & 1 != 0 {
                std::hint::spin_loop();
                continue;
            }
            let format = self.word(FORMAT).load(Ordering::Relaxed);
            let width = self.word(WIDTH).load(Ordering::Relaxed);
            let height = self.word(HEIGHT).load(Ordering::Relaxed);
            let stride = self.word(STRIDE).load(Ordering::Relaxed);
            let offset = u64::from(self.word(OFFSET_LO).load(Ordering::Relaxed))
                | u64::from(self.word(OFFSET_HI).load(Ordering::Relaxed)) << 32;
            fence(Ordering::Acquire);
            if self.word(SEQ).load(Ordering::Relaxed) != before {
                continue;
            }
            return Some(Mode {
                width,
                height,
                stride,
                format: PixelFormat::from_code(format)?,
                offset,
            });
        }
        None
    }

    /// The guest set its keyboard LEDs (bit 0 scroll lock, 1 num lock, 2 caps lock).
    pub fn set_leds(&self, leds: u8) {
        self.word(LEDS).store(u32::from(leds), Ordering::Release);
    }

    pub fn leds(&self) -> u8 {
        (self.word(LEDS).load(Ordering::Acquire) & 0x7) as u8
    }

    /// The sequence number: it changes whenever the mode is published again.
    pub fn generation(&self) -> u32 {
        self.word(SEQ).load(Ordering::Acquire)
    }
}

/// VNC authentication as `-vnc` configured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VncAuth {
    None,
    /// VNC Authentication (DES challenge): `password=on`.
    Password,
}

/// When the VNC password stops working.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expiry {
    Never,
    /// Seconds since the Unix epoch; 0 is "already expired".
    At(u64),
}

/// The display process's setup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplayConfig {
    /// Framebuffer bytes (the memfd's size).
    pub vram_size: u64,
    /// The VNC server, if `-vnc` gave one (its listening socket comes with the request).
    pub vnc: Option<VncConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VncConfig {
    pub auth: VncAuth,
    /// What `query-vnc` and the events call the server: host, service, family
    /// (`ipv4`, `ipv6`, `unix`).
    pub host: String,
    pub service: String,
    pub family: String,
    /// The desktop name clients show.
    pub name: String,
    /// The password and its expiry (replayed to a restarted process).
    pub password: Option<String>,
    pub expiry: Expiry,
}

/// What a connected client looks like in `query-vnc` and the VNC events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VncClient {
    pub id: u64,
    pub host: String,
    pub service: String,
    pub family: String,
    pub websocket: bool,
}

/// The virtio-input devices `vmm-display` serves over vhost-user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputKind {
    /// Absolute pointer (`virtio-tablet-pci`): VNC coordinates land where the user
    /// points.
    Tablet,
    Keyboard,
    /// Relative pointer.
    Mouse,
}

/// Image formats `screendump` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageFormat {
    Ppm,
    Png,
}

/// What the vmm asks of the display process. New variants go at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DisplayRequest {
    /// Sent once, first. Fds: the scanout page memfd, the framebuffer memfd (when
    /// `vram_size` is not 0), then the VNC listening socket if `vnc` is set. Replied to
    /// with [`DisplayReply::Done`].
    Attach(DisplayConfig),
    /// Set the VNC password; `disconnect`: drop every connected client too.
    SetPassword {
        password: String,
        disconnect: bool,
    },
    ExpirePassword(Expiry),
    /// Serve the connected client socket that comes with this request; `skipauth`: no
    /// authentication for it.
    AddClient {
        skipauth: bool,
    },
    /// Write the screen to the file that comes with this request (opened by the vmm).
    Screendump(ImageFormat),
    /// The server and its clients ([`DisplayReply::Vnc`]).
    QueryVnc,
    /// Serve a virtio-input device of `kind` over vhost-user on the listening socket
    /// that comes with this request; VNC input goes to it from now on.
    AddInput {
        kind: InputKind,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DisplayReply {
    Done,
    /// Connected clients, newest first.
    Vnc {
        clients: Vec<VncClient>,
    },
}

/// A key or pointer event from a client for a device the vmm models (the PS/2 keyboard
/// and mouse); virtio-input devices get theirs in their own queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DisplayEvent {
    /// Set-1 (XT) scancode bytes of one key press or release (0xe0 prefixes included).
    Key {
        scancodes: Vec<u8>,
    },
    /// Relative pointer motion and the buttons held (bit 0 left, 1 right, 2 middle).
    Pointer {
        dx: i32,
        dy: i32,
        dz: i32,
        buttons: u8,
    },
    /// A client connected (before authentication): `VNC_CONNECTED`.
    Connected(VncClient),
    /// The client authenticated and initialised: `VNC_INITIALIZED`.
    Initialized(VncClient),
    Disconnected(VncClient),
}

/// The vmm's end of the channel to the display process.
pub type DisplayChannel = Channel<DisplayRequest, DisplayReply, DisplayEvent>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scanout_page_round_trips_a_mode() {
        let mut page = vec![0u32; SCANOUT_PAGE_SIZE / 4];
        // SAFETY: the vector outlives the view and is 4-byte aligned.
        let s = unsafe { Scanout::new(page.as_mut_ptr().cast()) };
        assert_eq!(s.read(), None, "a zeroed page shows nothing");
        let mode = Mode {
            width: 1024,
            height: 768,
            stride: 4096,
            format: PixelFormat::Xrgb8888,
            offset: 5 << 32 | 4096,
        };
        let g = s.generation();
        s.publish(Some(mode));
        assert_eq!(s.read(), Some(mode));
        assert_ne!(s.generation(), g);
        s.publish(None);
        assert_eq!(s.read(), None);
        s.set_leds(5);
        assert_eq!((s.leds(), s.read()), (5, None), "LEDs apart from the mode");
        page[SEQ] = 7; // a writer that died mid-update
                       // SAFETY: as above.
        let s = unsafe { Scanout::new(page.as_mut_ptr().cast()) };
        assert_eq!(s.read(), None);
    }

    #[test]
    fn modes_must_fit_their_framebuffer() {
        let mut m = Mode {
            width: 1920,
            height: 1080,
            stride: 1920 * 4,
            format: PixelFormat::Xrgb8888,
            offset: 0,
        };
        assert!(m.fits(16 << 20));
        m.offset = (16 << 20) - 100;
        assert!(!m.fits(16 << 20));
        m.offset = u64::MAX - 10;
        assert!(!m.fits(u64::MAX));
        m.offset = 0;
        m.stride = 100;
        assert!(!m.fits(16 << 20), "lines overlap");
    }

    #[test]
    fn pixels_convert_to_rgb() {
        assert_eq!(
            PixelFormat::Xrgb8888.rgb(&[0x30, 0x20, 0x10, 0]),
            (0x10, 0x20, 0x30)
        );
        assert_eq!(
            PixelFormat::Xrgb8888BigEndian.rgb(&[0, 0x10, 0x20, 0x30]),
            (0x10, 0x20, 0x30)
        );
        assert_eq!(PixelFormat::Rgb565.rgb(&[0xff, 0xff]), (0xff, 0xff, 0xff));
        assert_eq!(PixelFormat::Rgb565.rgb(&[0x00, 0xf8]), (0xff, 0, 0));
    }
}
