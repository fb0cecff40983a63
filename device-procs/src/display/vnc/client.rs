//! One VNC client: the RFB handshake and message loop on its reader thread, updates on
//! its writer thread.
//!
//! Anything that breaks the protocol (a version we do not speak, a security type we did
//! not offer, a wrong password, a pixel format we cannot send, an unknown message, a cut
//! text over 1 MiB) drops this client, after QEMU's failure reply where RFB has one.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ipc::display::{DisplayEvent, InputKind, VncClient};

use super::auth;
use super::encoding::{self, Encoder, Rect};
use super::keys::{self, Key};
use super::pixel::PixelFormat;
use super::{lock, VncServer};
use crate::display::input::{self, InputEvent, BTN_LEFT, BTN_MIDDLE, BTN_RIGHT};
use crate::display::screen::{Damage, TILE};

/// How long a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that has not taken an update's bytes in this time is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest ClientCutText we accept (QEMU's limit).
const MAX_CUT_TEXT: u32 = 1 << 20;
const SECURITY_NONE: u8 = 1;
const SECURITY_VNC: u8 = 2;
const AUTH_FAILED: &str = "Authentication failed";

// Client message types.
const SET_PIXEL_FORMAT: u8 = 0;
const SET_ENCODINGS: u8 = 2;
const UPDATE_REQUEST: u8 = 3;
const KEY_EVENT: u8 = 4;
const POINTER_EVENT: u8 = 5;
const CUT_TEXT: u8 = 6;
const QEMU_MESSAGE: u8 = 255;
const QEMU_EXTENDED_KEY_EVENT: u8 = 0;

/// The encodings the client accepts, by what we make of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Features {
    /// The first encoding the client listed that we send (Raw if none).
    encoding: i32,
    desktop_size: bool,
    extended_key: bool,
    pointer_type_change: bool,
    /// QEMU's LED state pseudo-encoding.
    led_state: bool,
    /// Zlib and Tight compression level (0-9).
    level: u32,
}

impl Default for Features {
    fn default() -> Self {
        Features {
            encoding: encoding::RAW,
            desktop_size: false,
            extended_key: false,
            pointer_type_change: false,
            led_state: false,
            level: encoding::DEFAULT_LEVEL,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    closed: bool,
    format: Option<PixelFormat>,
    features: Features,
    /// An update was asked for and not sent yet.
    requested: bool,
    /// The whole screen is to be sent (a non-incremental request).
    full: bool,
    /// Changed tiles since the last update, for the screen of `generation`.
    dirty: Vec<bool>,
    generation: u64,
    resized: bool,
    /// Pseudo-rectangles to send unasked: the extended key event's acknowledgement, the
    /// pointer type.
    announce_extended_key: bool,
    announce_pointer_type: bool,
    announce_leds: bool,
}

impl State {
    fn has_work(&self) -> bool {
        self.announce_extended_key
            || self.announce_pointer_type
            || self.announce_leds
            || (self.requested && (self.full || self.resized || self.dirty.iter().any(|d| *d)))
    }
}

pub struct Client {
    pub id: u64,
    pub info: VncClient,
    stream: UnixStream,
    state: Mutex<State>,
    wake: Condvar,
}

/// What `query-vnc` and the events say of the peer of `stream`.
pub fn peer_info(stream: &UnixStream, id: u64) -> VncClient {
    let (host, service, family) = peer_address(stream)
        .unwrap_or_else(|| (String::new(), String::new(), "unknown".to_string()));
    VncClient {
        id,
        host,
        service,
        family,
        websocket: false,
    }
}

fn peer_address(stream: &UnixStream) -> Option<(String, String, String)> {
    // SAFETY: sockaddr_storage is plain data; zeroes are a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getpeername writes at most `len` bytes into the storage we own.
    let r = unsafe {
        libc::getpeername(
            stream.as_raw_fd(),
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return None;
    }
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: libc::sockaddr_in =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some((
                ip.to_string(),
                u16::from_be(sin.sin_port).to_string(),
                "ipv4".into(),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: libc::sockaddr_in6 =
                unsafe { std::ptr::read((&ss as *const libc::sockaddr_storage).cast()) };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some((
                ip.to_string(),
                u16::from_be(sin6.sin6_port).to_string(),
                "ipv6".into(),
            ))
        }
        libc::AF_UNIX => Some((String::new(), String::new(), "unix".into())),
        _ => None,
    }
}

/// Why a client was dropped.
#[derive(Debug, thiserror::Error)]
enum ClientError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
}

fn protocol<T>(what: impl Into<String>) -> Result<T, ClientError> {
    Err(ClientError::Protocol(what.into()))
}

fn read_array<const N: usize>(r: &mut impl Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

impl Client {
    /// Start serving `stream` on threads of its own.
    pub fn start(
        server: Arc<VncServer>,
        stream: UnixStream,
        info: VncClient,
        skipauth: bool,
    ) -> io::Result<()> {
        let client = Arc::new(Client {
            id: info.id,
            info,
            stream: stream.try_clone()?,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        });
        std::thread::Builder::new()
            .name(format!("vnc-client-{}", client.id))
            .spawn(move || client.run(server, stream, skipauth))
            .map(drop)
    }

    /// Drop the connection: both threads end.
    pub fn close(&self) {
        lock(&self.state).closed = true;
        self.wake.notify_all();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn run(self: Arc<Self>, server: Arc<VncServer>, mut stream: UnixStream, skipauth: bool) {
        // Listed (query-vnc) from the start, as QEMU lists a client still authenticating.
        server.register(self.clone());
        server.emit(DisplayEvent::Connected(self.info.clone()));
        let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        match self.handshake(&server, &mut stream, skipauth) {
            Ok((shared, size)) => {
                let _ = stream.set_read_timeout(None);
                if !shared {
                    server.disconnect_others(self.id);
                }
                server.emit(DisplayEvent::Initialized(self.info.clone()));
                let writer = self.clone();
                let display = server.clone();
                let out = stream.try_clone();
                let spawned = out.and_then(|out| {
                    std::thread::Builder::new()
                        .name(format!("vnc-update-{}", self.id))
                        .spawn(move || writer.write_updates(&display, out, size))
                });
                match spawned {
                    Ok(_) => {
                        if let Err(e) = self.read_messages(&server, &mut stream) {
                            tracing::info!(client = self.id, "vnc: client dropped: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("vnc: cannot start an update thread: {e}"),
                }
            }
            Err(e) => tracing::info!(client = self.id, "vnc: handshake failed: {e}"),
        }
        server.unregister(self.id);
        self.close();
        server.emit(DisplayEvent::Disconnected(self.info.clone()));
    }

    /// Version, security, ClientInit and ServerInit: whether the client shares the
    /// desktop, and the size it was told.
    fn handshake(
        &self,
        server: &VncServer,
        s: &mut UnixStream,
        skipauth: bool,
    ) -> Result<(bool, (u32, u32)), ClientError> {
        s.write_all(b"RFB 003.008\n")?;
        let version: [u8; 12] = read_array(s)?;
        let minor = match &version {
            b"RFB 003.003\n" | b"RFB 003.004\n" | b"RFB 003.005\n" | b"RFB 003.006\n" => 3,
            b"RFB 003.007\n" => 7,
            b"RFB 003.008\n" | b"RFB 003.889\n" => 8,
            other => {
                return protocol(format!(
                    "unsupported client version {:?}",
                    String::from_utf8_lossy(other)
                ))
            }
        };
        let credentials = if skipauth { None } else { server.credentials() };
        let offered = if credentials.is_some() {
            SECURITY_VNC
        } else {
            SECURITY_NONE
        };
        if minor == 3 {
            s.write_all(&u32::from(offered).to_be_bytes())?;
        } else {
            s.write_all(&[1, offered])?;
            let [chosen] = read_array(s)?;
            if chosen != offered {
                if minor == 8 {
                    fail(s, "Unsupported security type")?;
                }
                return protocol(format!("security type {chosen} was not offered"));
            }
        }
        if let Some(password) = credentials {
            let challenge = auth::challenge()?;
            s.write_all(&challenge)?;
            let answer: [u8; auth::CHALLENGE_LEN] = read_array(s)?;
            let good = password
                .map(|p| auth::matches(&auth::response(&p, &challenge), &answer))
                .unwrap_or(false);
            if !good {
                if minor == 8 {
                    fail(s, AUTH_FAILED)?;
                } else {
                    s.write_all(&1u32.to_be_bytes())?;
                }
                return protocol(AUTH_FAILED);
            }
            s.write_all(&0u32.to_be_bytes())?;
        } else if minor == 8 {
            s.write_all(&0u32.to_be_bytes())?;
        }
        let [shared] = read_array(s)?;
        // The screen as it is now, not as the last refresh (perhaps long ago) saw it.
        server.refresh();
        let (generation, width, height) = server.display.size();
        {
            let mut st = lock(&self.state);
            st.format = Some(PixelFormat::SERVER);
            st.generation = generation;
        }
        let mut init = Vec::with_capacity(24 + server.name.len());
        init.extend_from_slice(&(width as u16).to_be_bytes());
        init.extend_from_slice(&(height as u16).to_be_bytes());
        init.extend_from_slice(&PixelFormat::SERVER.encode());
        init.extend_from_slice(&(server.name.len() as u32).to_be_bytes());
        init.extend_from_slice(server.name.as_bytes());
        s.write_all(&init)?;
        Ok((shared != 0, (width, height)))
    }

    fn read_messages(&self, server: &VncServer, s: &mut UnixStream) -> Result<(), ClientError> {
        let mut input = Input::default();
        let mut r = io::BufReader::new(s.try_clone()?);
        loop {
            let [kind] = read_array(&mut r)?;
            match kind {
                SET_PIXEL_FORMAT => {
                    let b: [u8; 19] = read_array(&mut r)?;
                    let format = PixelFormat::parse(&b[3..19].try_into().unwrap_or([0; 16]))
                        .or_else(|e| protocol(format!("pixel format: {e}")))?;
                    let mut st = lock(&self.state);
                    st.format = Some(format);
                    st.full = true;
                }
                SET_ENCODINGS => {
                    let b: [u8; 3] = read_array(&mut r)?;
                    let n = u16::from_be_bytes([b[1], b[2]]);
                    let mut list = Vec::with_capacity(usize::from(n));
                    for _ in 0..n {
                        list.push(i32::from_be_bytes(read_array(&mut r)?));
                    }
                    self.set_encodings(&list);
                }
                UPDATE_REQUEST => {
                    let b: [u8; 9] = read_array(&mut r)?;
                    {
                        let mut st = lock(&self.state);
                        st.requested = true;
                        if b[0] == 0 {
                            st.full = true;
                        }
                    }
                    self.wake.notify_all();
                    server.wake_refresh();
                }
                KEY_EVENT => {
                    let b: [u8; 7] = read_array(&mut r)?;
                    let keysym = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
                    input.keysym(server, b[0] != 0, keysym);
                }
                POINTER_EVENT => {
                    let b: [u8; 5] = read_array(&mut r)?;
                    let x = u16::from_be_bytes([b[1], b[2]]);
                    let y = u16::from_be_bytes([b[3], b[4]]);
                    // A client told the pointer is relative sends offsets from 0x7fff.
                    let relative_offsets = lock(&self.state).features.pointer_type_change
                        && server.inputs.find(InputKind::Tablet).is_none();
                    input.pointer(server, b[0], x, y, relative_offsets);
                }
                CUT_TEXT => {
                    let b: [u8; 7] = read_array(&mut r)?;
                    let len = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
                    if len > MAX_CUT_TEXT {
                        return protocol(format!("cut text of {len} bytes"));
                    }
                    io::copy(&mut (&mut r).take(u64::from(len)), &mut io::sink())?;
                }
                QEMU_MESSAGE => {
                    let [sub] = read_array(&mut r)?;
                    if sub != QEMU_EXTENDED_KEY_EVENT {
                        return protocol(format!("QEMU message {sub}"));
                    }
                    let b: [u8; 10] = read_array(&mut r)?;
                    let down = u16::from_be_bytes([b[0], b[1]]) != 0;
                    let keysym = u32::from_be_bytes([b[2], b[3], b[4], b[5]]);
                    let keycode = u32::from_be_bytes([b[6], b[7], b[8], b[9]]);
                    match keys::key_for_qemu_keycode(keycode) {
                        Some(key) => input.key(server, key, down),
                        None => input.keysym(server, down, keysym),
                    }
                }
                other => return protocol(format!("unknown message type {other}")),
            }
        }
    }

    fn set_encodings(&self, list: &[i32]) {
        let mut f = Features::default();
        let supported = [
            encoding::RAW,
            encoding::ZLIB,
            encoding::TIGHT,
            encoding::ZRLE,
        ];
        if let Some(first) = list.iter().find(|e| supported.contains(e)) {
            f.encoding = *first;
        }
        f.desktop_size = list.contains(&encoding::DESKTOP_SIZE);
        f.extended_key = list.contains(&encoding::QEMU_EXTENDED_KEY);
        f.pointer_type_change = list.contains(&encoding::POINTER_TYPE_CHANGE);
        f.led_state = list.contains(&encoding::QEMU_LED_STATE);
        if let Some(level) = list
            .iter()
            .find(|e| (encoding::COMPRESS_LEVEL_0..=encoding::COMPRESS_LEVEL_9).contains(e))
        {
            f.level = (level - encoding::COMPRESS_LEVEL_0) as u32;
        }
        let mut st = lock(&self.state);
        st.announce_extended_key = f.extended_key;
        st.announce_pointer_type = f.pointer_type_change;
        st.announce_leds = f.led_state;
        st.features = f;
        drop(st);
        self.wake.notify_all();
    }

    /// An update was asked for and not sent yet.
    pub fn update_requested(&self) -> bool {
        lock(&self.state).requested
    }

    /// The keyboard LEDs changed.
    pub fn leds_changed(&self) {
        let mut st = lock(&self.state);
        if st.features.led_state {
            st.announce_leds = true;
            drop(st);
            self.wake.notify_all();
        }
    }

    /// Merge a refresh's damage.
    pub fn add_damage(&self, damage: &Damage, generation: u64) {
        let mut st = lock(&self.state);
        if st.generation != generation || st.dirty.len() != damage.tiles.len() {
            st.generation = generation;
            st.dirty = vec![true; damage.tiles.len()];
            st.resized = true;
        } else {
            for (d, t) in st.dirty.iter_mut().zip(&damage.tiles) {
                *d |= *t;
            }
        }
        st.resized |= damage.resized;
        let work = st.has_work();
        drop(st);
        if work {
            self.wake.notify_all();
        }
    }

    /// The writer thread: wait for something to send, send it, until the client goes.
    fn write_updates(&self, server: &VncServer, mut out: UnixStream, mut size: (u32, u32)) {
        let mut encoder = Encoder::new(PixelFormat::SERVER, encoding::DEFAULT_LEVEL);
        let mut level = encoding::DEFAULT_LEVEL;
        let mut message = Vec::new();
        let mut pixels = Vec::new();
        loop {
            let work = {
                let mut st = lock(&self.state);
                while !st.closed && !st.has_work() {
                    st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.closed {
                    return;
                }
                let work = Work {
                    format: st.format.unwrap_or(PixelFormat::SERVER),
                    features: st.features,
                    announce_extended_key: std::mem::take(&mut st.announce_extended_key),
                    announce_pointer_type: std::mem::take(&mut st.announce_pointer_type),
                    announce_leds: std::mem::take(&mut st.announce_leds),
                    update: st.requested.then(|| Update {
                        full: st.full || st.resized,
                        tiles: std::mem::take(&mut st.dirty),
                        generation: st.generation,
                    }),
                };
                if st.requested {
                    st.dirty = vec![false; work.update.as_ref().map_or(0, |u| u.tiles.len())];
                    st.requested = false;
                    st.full = false;
                    st.resized = false;
                }
                work
            };
            encoder.format = work.format;
            if work.features.level != level {
                level = work.features.level;
                encoder.set_level(level);
            }
            message.clear();
            let rects = self.compose(
                server,
                &work,
                &mut encoder,
                &mut size,
                &mut message,
                &mut pixels,
            );
            let sent = rects.and_then(|n| {
                let mut header = vec![0u8, 0];
                header.extend_from_slice(&n.to_be_bytes());
                out.write_all(&header)?;
                out.write_all(&message)
            });
            if let Err(e) = sent {
                tracing::info!(client = self.id, "vnc: client dropped while sending: {e}");
                self.close();
                return;
            }
        }
    }

    /// The rectangles of one FramebufferUpdate into `out`; their number.
    fn compose(
        &self,
        server: &VncServer,
        work: &Work,
        encoder: &mut Encoder,
        size: &mut (u32, u32),
        out: &mut Vec<u8>,
        pixels: &mut Vec<u32>,
    ) -> io::Result<u16> {
        let mut count = 0u16;
        if work.announce_extended_key {
            encoding::header(0, 0, 0, 0, encoding::QEMU_EXTENDED_KEY, out);
            count += 1;
        }
        if work.announce_pointer_type {
            // x is 1 for an absolute pointer (a tablet), 0 for a relative one.
            let absolute = server.inputs.find(InputKind::Tablet).is_some();
            encoding::header(
                u32::from(absolute),
                0,
                0,
                0,
                encoding::POINTER_TYPE_CHANGE,
                out,
            );
            count += 1;
        }
        if work.announce_leds {
            encoding::header(0, 0, 1, 1, encoding::QEMU_LED_STATE, out);
            out.push(server.leds());
            count += 1;
        }
        let Some(update) = &work.update else {
            return Ok(count);
        };
        let screen = server.display.screen();
        let mut full = update.full || update.generation != screen.generation;
        if (screen.width, screen.height) != *size && work.features.desktop_size {
            encoding::header(
                0,
                0,
                screen.width,
                screen.height,
                encoding::DESKTOP_SIZE,
                out,
            );
            count += 1;
            *size = (screen.width, screen.height);
            full = true;
        }
        let (width, height) = (screen.width.min(size.0), screen.height.min(size.1));
        pixels.clear();
        let mut rects = Vec::new();
        let tiles_x = screen.tiles_x();
        let tiles_y = screen.tiles_y();
        let tight = work.features.encoding == encoding::TIGHT;
        // Runs of dirty tiles along each tile row; Tight's within its size limits.
        let max_run = if tight {
            (encoding::TIGHT_MAX_PIXELS / (TILE * TILE)).min(encoding::TIGHT_MAX_WIDTH / TILE)
        } else {
            u32::MAX
        };
        // Runs of dirty tiles along each tile row (Tight's within its size limits), a run
        // joining the one above it when they span the same columns (not for Tight).
        let mut runs: Vec<(u32, u32, u32, u32)> = Vec::new(); // x0, x1, y0, y1 in tiles
        for ty in 0..tiles_y {
            let mut tx = 0;
            let row_start = runs.len();
            while tx < tiles_x {
                let dirty = |t: u32| {
                    full || update
                        .tiles
                        .get((ty * tiles_x + t) as usize)
                        .copied()
                        .unwrap_or(true)
                };
                if !dirty(tx) {
                    tx += 1;
                    continue;
                }
                let start = tx;
                while tx < tiles_x && dirty(tx) && tx - start < max_run {
                    tx += 1;
                }
                let above = (!tight)
                    .then(|| {
                        runs[..row_start]
                            .iter()
                            .rposition(|r| r.0 == start && r.1 == tx && r.3 == ty)
                    })
                    .flatten();
                match above {
                    Some(i) => runs[i].3 = ty + 1,
                    None => runs.push((start, tx, ty, ty + 1)),
                }
            }
        }
        for (x0, x1, y0, y1) in runs {
            let (x, y) = (x0 * TILE, y0 * TILE);
            if x >= width || y >= height {
                continue;
            }
            let w = ((x1 - x0) * TILE).min(width - x);
            let h = ((y1 - y0) * TILE).min(height - y);
            // Copied out under the lock; encoded after it, so that the refresh never
            // waits for this client's encoder.
            let at = pixels.len();
            screen.append_rect(x, y, w, h, pixels);
            rects.push((Rect { x, y, w, h }, at));
        }
        drop(screen);
        for (rect, at) in rects {
            let n = (rect.w * rect.h) as usize;
            encoder.rect(work.features.encoding, rect, &pixels[at..at + n], out)?;
            count = count.saturating_add(1);
        }
        Ok(count)
    }
}

struct Update {
    full: bool,
    tiles: Vec<bool>,
    generation: u64,
}

struct Work {
    format: PixelFormat,
    features: Features,
    announce_extended_key: bool,
    announce_pointer_type: bool,
    announce_leds: bool,
    update: Option<Update>,
}

/// A 3.8 failure: SecurityResult 1 and the reason.
fn fail(s: &mut UnixStream, reason: &str) -> io::Result<()> {
    let mut b = 1u32.to_be_bytes().to_vec();
    b.extend_from_slice(&(reason.len() as u32).to_be_bytes());
    b.extend_from_slice(reason.as_bytes());
    s.write_all(&b)
}

/// A client's keyboard and pointer state, turned into events for the guest's devices:
/// the virtio-input ones if there are (the tablet takes absolute coordinates), else the
/// vmm's PS/2 keyboard and mouse.
#[derive(Default)]
struct Input {
    shift: bool,
    last: Option<(u16, u16)>,
    buttons: u8,
}

impl Input {
    /// Keys going down or up, in order.
    fn send_keys(&mut self, server: &VncServer, keys: &[(Key, bool)]) {
        if let Some(keyboard) = server.inputs.find(InputKind::Keyboard) {
            let mut events = Vec::new();
            for (key, down) in keys {
                if let Some(code) = input::linux_keycode(key.code, key.extended) {
                    events.push(InputEvent::new(input::EV_KEY, code, u32::from(*down)));
                    events.push(InputEvent::SYNC);
                }
            }
            keyboard.push(&events);
            return;
        }
        let scancodes = keys
            .iter()
            .flat_map(|(key, down)| keys::scancodes(*key, *down))
            .collect();
        server.emit(DisplayEvent::Key { scancodes });
    }

    fn key(&mut self, server: &VncServer, key: Key, down: bool) {
        self.send_keys(server, &[(key, down)]);
    }

    fn keysym(&mut self, server: &VncServer, down: bool, keysym: u32) {
        if matches!(keysym, 0xffe1 | 0xffe2) {
            self.shift = down;
        }
        let Some((key, shifted)) = keys::key_for(keysym) else {
            tracing::debug!("vnc: no key for keysym {keysym:#x}");
            return;
        };
        // A symbol typed with Shift, from a client that did not press Shift.
        if down && shifted && !self.shift {
            let shift = keys::LEFT_SHIFT;
            self.send_keys(server, &[(shift, true), (key, true), (shift, false)]);
        } else {
            self.send_keys(server, &[(key, down)]);
        }
    }

    /// RFB's button mask (1 left, 2 middle, 4 right, 8/16 wheel up/down).
    fn pointer(&mut self, server: &VncServer, mask: u8, x: u16, y: u16, offsets: bool) {
        let changed = mask ^ self.buttons;
        self.buttons = mask;
        let wheel = match mask & changed & 0x18 {
            0x08 => -1,
            0x10 => 1,
            _ => 0,
        };
        let buttons = [(1u8, BTN_LEFT), (2, BTN_MIDDLE), (4, BTN_RIGHT)];
        let button_events = |events: &mut Vec<InputEvent>| {
            for (bit, code) in buttons {
                if changed & bit != 0 {
                    events.push(InputEvent::new(
                        input::EV_KEY,
                        code,
                        u32::from(mask & bit != 0),
                    ));
                }
            }
            if wheel != 0 {
                events.push(InputEvent::new(
                    input::EV_REL,
                    input::REL_WHEEL,
                    (-wheel) as u32,
                ));
            }
            events.push(InputEvent::SYNC);
        };
        let (dx, dy) = if offsets {
            (i32::from(x) - 0x7fff, i32::from(y) - 0x7fff)
        } else {
            let (lx, ly) = self.last.unwrap_or((x, y));
            (i32::from(x) - i32::from(lx), i32::from(y) - i32::from(ly))
        };
        self.last = Some((x, y));
        if let Some(tablet) = server.inputs.find(InputKind::Tablet) {
            let (_, width, height) = server.display.size();
            // QEMU's scaling: 0..size onto 0..=ABS_MAX.
            let scale = |v: u16, size: u32| {
                (u32::from(v).min(size) * input::ABS_MAX / size.max(1)).min(input::ABS_MAX)
            };
            let mut events = vec![
                InputEvent::new(input::EV_ABS, input::ABS_X, scale(x, width)),
                InputEvent::new(input::EV_ABS, input::ABS_Y, scale(y, height)),
            ];
            button_events(&mut events);
            tablet.push(&events);
            return;
        }
        if let Some(mouse) = server.inputs.find(InputKind::Mouse) {
            let mut events = Vec::new();
            if dx != 0 {
                events.push(InputEvent::new(input::EV_REL, input::REL_X, dx as u32));
            }
            if dy != 0 {
                events.push(InputEvent::new(input::EV_REL, input::REL_Y, dy as u32));
            }
            button_events(&mut events);
            mouse.push(&events);
            return;
        }
        let buttons = (mask & 1) | ((mask & 4) >> 1) | ((mask & 2) << 1);
        server.emit(DisplayEvent::Pointer {
            dx,
            dy,
            dz: wheel,
            buttons,
        });
    }
}
