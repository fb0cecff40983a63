//! `vmm-display`: the display device process, sandboxed. It maps the guest's framebuffer
//! (the display device's VRAM, a memfd of the vmm's) and the scanout page, serves VNC
//! clients on the listening socket the vmm opened and on client sockets it hands in, and
//! writes screendumps to files the vmm opened: it opens nothing itself.
//!
//! [`screen`] keeps a shadow copy of the screen and finds what changed; [`vnc`] is the
//! RFB server; [`screendump`] writes images. Keys and pointer motion for the vmm's PS/2
//! devices go back over the control channel.

pub mod input;
pub mod screen;
pub mod screendump;
pub mod vnc;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use ipc::display::{DisplayConfig, DisplayEvent, DisplayReply, DisplayRequest};
use ipc::{DeviceKind, RemoteError};

use crate::sandbox::Profile;
use crate::supervised::{self as process, Sender, SupervisedError};
use input::{InputBackend, Inputs};
use screen::{Framebuffer, Screen};
use vnc::VncServer;

/// The refresh looks at the screen this often while it changes, backs off by
/// [`REFRESH_BACKOFF`] per idle look up to [`REFRESH_MAX`] (QEMU's pacing), and looks at
/// once when a client asks for an update, then every [`REFRESH_MIN`] while one waits
/// for a change, but never twice within [`REFRESH_MIN`].
const REFRESH_BASE: Duration = Duration::from_millis(30);
const REFRESH_BACKOFF: Duration = Duration::from_millis(50);
const REFRESH_MAX: Duration = Duration::from_millis(3000);
const REFRESH_MIN: Duration = Duration::from_millis(10);
/// The keyboard LEDs are looked at this often while clients watch.
const LED_POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum DisplayError {
    #[error(transparent)]
    Process(#[from] SupervisedError),
    #[error("{0}")]
    Setup(String),
    #[error("cannot start a thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The guest's screen: the framebuffer (and the LEDs) the vmm shares, and its shadow.
pub struct Display {
    framebuffer: Framebuffer,
    screen: RwLock<Screen>,
}

impl Display {
    pub fn new(framebuffer: Framebuffer) -> Self {
        Display {
            framebuffer,
            screen: RwLock::new(Screen::new()),
        }
    }

    /// The PS/2 keyboard's LEDs (bit 0 scroll, 1 num, 2 caps lock).
    pub fn leds(&self) -> u8 {
        self.framebuffer.leds()
    }

    /// Take in what changed on screen: the damage and the screen's generation.
    pub fn refresh(&self) -> (screen::Damage, u64) {
        let mut screen = self.screen.write().unwrap_or_else(|e| e.into_inner());
        let damage = screen.refresh(Some(&self.framebuffer));
        (damage, screen.generation)
    }

    pub fn screen(&self) -> RwLockReadGuard<'_, Screen> {
        self.screen.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The generation, width and height of the screen.
    pub fn size(&self) -> (u64, u32, u32) {
        let s = self.screen();
        (s.generation, s.width, s.height)
    }
}

type DisplaySender = Sender<DisplayRequest, DisplayReply, DisplayEvent>;

/// The program.
pub fn main() -> i32 {
    process::init_logging();
    process::exit_status("vmm-display", run())
}

fn run() -> Result<(), DisplayError> {
    let profile = Profile::DISPLAY;
    let (mut channel, _vhost_listener) =
        process::start::<DisplayRequest, DisplayReply, DisplayEvent>(DeviceKind::Display, profile)?;
    let sender = process::Sender::new(&channel)?;
    let events = sender.clone();
    let inputs = Arc::new(Inputs::default());
    let (id, (display, vnc)) =
        process::wait_for_setup(&mut channel, |request, fds| match request {
            DisplayRequest::Attach(config) => {
                attach(&config, fds, &inputs, &events).map_err(|e| RemoteError(e.to_string()))
            }
            _ => Err(RemoteError("the display is not set up yet".into())),
        })?;
    sender.reply(id, Ok(DisplayReply::Done));
    let controlled = (display.clone(), vnc.clone(), inputs);
    let nothing: Arc<dyn Fn() + Send + Sync> = Arc::new(|| {});
    process::spawn_control_loop(
        channel,
        sender,
        move |request, fds| {
            let (display, vnc, inputs) = &controlled;
            control_request(display, vnc.as_ref(), inputs, request, fds)
        },
        nothing.clone(),
    )?;
    process::spawn_signal_thread(nothing)?;
    refresh_loop(vnc.as_deref());
    Ok(())
}

/// Map the framebuffer and start the VNC server of `config` on `fds` (the state page,
/// the VRAM if there is a display adapter, then the listener).
fn attach(
    config: &DisplayConfig,
    fds: Vec<OwnedFd>,
    inputs: &Arc<Inputs>,
    events: &DisplaySender,
) -> Result<(Arc<Display>, Option<Arc<VncServer>>), DisplayError> {
    let mut fds = fds.into_iter();
    let page = fds
        .next()
        .ok_or_else(|| DisplayError::Setup("the display state page is missing".into()))?;
    let vram = if config.vram_size > 0 {
        Some(
            fds.next()
                .ok_or_else(|| DisplayError::Setup("the framebuffer fd is missing".into()))?,
        )
    } else {
        None
    };
    let framebuffer = Framebuffer::map(&page, vram.as_ref().map(|fd| (fd, config.vram_size)))
        .map_err(|e| DisplayError::Setup(format!("cannot map the framebuffer: {e}")))?;
    let display = Arc::new(Display::new(framebuffer));
    let vnc = match &config.vnc {
        Some(vnc_config) => {
            let listener = fds
                .next()
                .ok_or_else(|| DisplayError::Setup("the VNC listener is missing".into()))?;
            let sink = events.clone();
            let server = VncServer::new(
                display.clone(),
                inputs.clone(),
                vnc_config,
                Arc::new(move |event| sink.event(event, &[])),
            );
            server.listen(listener).map_err(DisplayError::Thread)?;
            Some(server)
        }
        None => None,
    };
    Ok((display, vnc))
}

fn control_request(
    display: &Display,
    vnc: Option<&Arc<VncServer>>,
    inputs: &Inputs,
    request: DisplayRequest,
    fds: Vec<OwnedFd>,
) -> Result<DisplayReply, RemoteError> {
    let no_vnc = || RemoteError("VNC is not in use".into());
    match request {
        DisplayRequest::Attach(_) => Err(RemoteError("the display is set up already".into())),
        DisplayRequest::SetPassword {
            password,
            disconnect,
        } => {
            let vnc = vnc.ok_or_else(no_vnc)?;
            vnc.set_password(password);
            if disconnect {
                vnc.disconnect_all();
            }
            Ok(DisplayReply::Done)
        }
        DisplayRequest::ExpirePassword(expiry) => {
            vnc.ok_or_else(no_vnc)?.expire_password(expiry);
            Ok(DisplayReply::Done)
        }
        DisplayRequest::AddClient { skipauth } => {
            let vnc = vnc.ok_or_else(no_vnc)?;
            let fd = one_fd(fds)?;
            if !is_stream_socket(&fd) {
                return Err(RemoteError(
                    "the file descriptor is not a stream socket".into(),
                ));
            }
            vnc.add_client(UnixStream::from(fd), skipauth);
            Ok(DisplayReply::Done)
        }
        DisplayRequest::Screendump(format) => {
            let file = std::fs::File::from(one_fd(fds)?);
            // What changed since the last look goes to the VNC clients too.
            match vnc {
                Some(vnc) => {
                    vnc.refresh();
                }
                None => {
                    display.refresh();
                }
            }
            screendump::write(&display.screen(), format, file)
                .map_err(|e| RemoteError(e.to_string()))?;
            Ok(DisplayReply::Done)
        }
        DisplayRequest::QueryVnc => Ok(DisplayReply::Vnc {
            clients: vnc.map(|v| v.clients()).unwrap_or_default(),
        }),
        DisplayRequest::AddInput { kind } => {
            let listener = std::os::unix::net::UnixListener::from(one_fd(fds)?);
            let device = Arc::new(
                InputBackend::new(kind).map_err(|e| RemoteError(format!("input device: {e}")))?,
            );
            let served = device.clone();
            std::thread::Builder::new()
                .name(format!("input-{kind:?}").to_lowercase())
                .spawn(move || {
                    if let Err(e) = crate::vhost_daemon::serve(served, listener) {
                        tracing::error!("input device: {e}");
                    }
                })
                .map_err(|e| RemoteError(format!("cannot start a thread: {e}")))?;
            inputs.add(device);
            Ok(DisplayReply::Done)
        }
    }
}

fn one_fd(fds: Vec<OwnedFd>) -> Result<OwnedFd, RemoteError> {
    <[OwnedFd; 1]>::try_from(fds)
        .map(|[fd]| fd)
        .map_err(|fds| RemoteError(format!("expected one fd, got {}", fds.len())))
}

fn is_stream_socket(fd: &OwnedFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `kind`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut kind as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    r == 0 && kind == libc::SOCK_STREAM
}

/// Look at the screen while clients watch it, and hand them what changed.
fn refresh_loop(vnc: Option<&VncServer>) {
    let Some(vnc) = vnc else {
        // Nobody watches; screendumps refresh for themselves.
        loop {
            std::thread::park();
        }
    };
    let mut interval = REFRESH_BASE;
    let mut last = Instant::now();
    let mut leds = vnc.leds();
    loop {
        let (flag, cond) = &*vnc.activity;
        let woken = {
            let mut woken = vnc::lock(flag);
            let wait = if vnc.has_clients() {
                interval.saturating_sub(last.elapsed()).min(LED_POLL)
            } else {
                Duration::from_secs(1)
            };
            if !*woken {
                woken = cond
                    .wait_timeout(woken, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
            std::mem::take(&mut *woken)
        };
        let now_leds = vnc.leds();
        if now_leds != leds {
            leds = now_leds;
            vnc.leds_changed();
        }
        if woken {
            interval = REFRESH_BASE;
        } else if last.elapsed() < interval {
            continue;
        }
        if !vnc.has_clients() {
            continue;
        }
        let since = last.elapsed();
        if since < REFRESH_MIN {
            std::thread::sleep(REFRESH_MIN - since);
        }
        last = Instant::now();
        if vnc.refresh() {
            interval = REFRESH_BASE;
        } else if vnc.update_requested() {
            // A client waits for the next change: look again soon.
            interval = REFRESH_MIN;
        } else {
            interval = (interval + REFRESH_BACKOFF).min(REFRESH_MAX);
        }
    }
}
