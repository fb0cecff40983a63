//! The VNC server: RFB 3.8 (3.3 and 3.7 clients too) on the listening socket the vmm
//! opened and on client sockets it hands in (`add_client`).
//!
//! Each client has a reader thread ([`client`]: the handshake, then its messages) and a
//! writer thread that sends updates at the pace that client asks for them. The screen's
//! refresh ([`crate::display::Display::refresh`]) marks changed tiles in every client's
//! damage; a slow client only lets its own damage pile up (it is merged, never queued),
//! and one that stops reading is dropped when a write times out, so it never holds back
//! the others or the guest.

pub mod auth;
mod client;
pub mod encoding;
pub mod keys;
pub mod pixel;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ipc::display::{DisplayEvent, Expiry, VncAuth, VncClient, VncConfig};

use super::input::Inputs;
use super::screen::Damage;
use super::Display;
pub use client::Client;

/// How long a refresh that found changes waits to look once more (see
/// [`VncServer::refresh`]).
const SETTLE: std::time::Duration = std::time::Duration::from_millis(2);

/// Where the server's events go (the control channel).
pub type EventSink = Arc<dyn Fn(DisplayEvent) + Send + Sync>;

/// Authentication as `-vnc`, set_password and expire_password made it.
#[derive(Debug, Clone)]
struct AuthState {
    auth: VncAuth,
    password: Option<String>,
    expiry: Expiry,
}

pub struct VncServer {
    display: Arc<Display>,
    /// The virtio-input devices client input goes to (PS/2 through the vmm without).
    inputs: Arc<Inputs>,
    name: String,
    auth: Mutex<AuthState>,
    clients: Mutex<Vec<Arc<Client>>>,
    next_id: AtomicU64,
    events: EventSink,
    /// Signalled when a client connects or asks for an update, so the refresh looks
    /// at the screen now rather than after its idle back-off.
    pub(crate) activity: Arc<(Mutex<bool>, Condvar)>,
}

/// Accept a connection on a listening socket of any family (std's `UnixListener` would
/// refuse, and close, a TCP peer). The stream type only carries the fd: reads, writes,
/// timeouts and shutdown are the same system calls for every family.
fn accept(listener: &OwnedFd) -> std::io::Result<UnixStream> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: accept4 with no address buffer on a listening socket we hold.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: accept4 returned a new fd that nothing else owns.
    Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl VncServer {
    pub fn new(
        display: Arc<Display>,
        inputs: Arc<Inputs>,
        config: &VncConfig,
        events: EventSink,
    ) -> Arc<Self> {
        Arc::new(VncServer {
            display,
            inputs,
            name: config.name.clone(),
            auth: Mutex::new(AuthState {
                auth: config.auth,
                password: config.password.clone(),
                expiry: config.expiry,
            }),
            clients: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            events,
            activity: Arc::new((Mutex::new(false), Condvar::new())),
        })
    }

    /// Accept clients on `listener` (a TCP or unix socket) on a thread of its own.
    pub fn listen(self: &Arc<Self>, listener: OwnedFd) -> std::io::Result<()> {
        let server = self.clone();
        std::thread::Builder::new()
            .name("vnc-accept".into())
            .spawn(move || loop {
                match accept(&listener) {
                    Ok(stream) => server.add_client(stream, false),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        tracing::error!("vnc: accept: {e}");
                        // A broken listener (EMFILE, say): back off rather than spin.
                        std::thread::sleep(std::time::Duration::from_millis(100));
                    }
                }
            })
            .map(drop)
    }

    /// Serve a connected client (`skipauth`: without authentication).
    pub fn add_client(self: &Arc<Self>, stream: UnixStream, skipauth: bool) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let info = client::peer_info(&stream, id);
        if let Err(e) = Client::start(self.clone(), stream, info, skipauth) {
            tracing::warn!("vnc: cannot serve a client: {e}");
        }
    }

    fn register(&self, client: Arc<Client>) {
        lock(&self.clients).push(client);
        self.wake_refresh();
    }

    fn unregister(&self, id: u64) {
        lock(&self.clients).retain(|c| c.id != id);
    }

    /// Connected clients, newest first.
    pub fn clients(&self) -> Vec<VncClient> {
        lock(&self.clients)
            .iter()
            .rev()
            .map(|c| c.info.clone())
            .collect()
    }

    pub fn has_clients(&self) -> bool {
        !lock(&self.clients).is_empty()
    }

    /// Whether a client waits for an update.
    pub fn update_requested(&self) -> bool {
        lock(&self.clients).iter().any(|c| c.update_requested())
    }

    /// Drop every client but `keep` (a client that asked for exclusive access).
    fn disconnect_others(&self, keep: u64) {
        let others: Vec<_> = lock(&self.clients)
            .iter()
            .filter(|c| c.id != keep)
            .cloned()
            .collect();
        for c in others {
            c.close();
        }
    }

    pub fn disconnect_all(&self) {
        self.disconnect_others(0);
    }

    pub fn set_password(&self, password: String) {
        lock(&self.auth).password = Some(password);
    }

    pub fn expire_password(&self, expiry: Expiry) {
        lock(&self.auth).expiry = expiry;
    }

    /// How a new client authenticates: `None` for no authentication, else the password
    /// it must prove, which is `None` when none is set or it expired (every attempt
    /// then fails, as in QEMU).
    fn credentials(&self) -> Option<Option<String>> {
        let auth = lock(&self.auth);
        match auth.auth {
            VncAuth::None => None,
            VncAuth::Password => {
                let expired = matches!(auth.expiry, Expiry::At(t) if now() >= t);
                Some(auth.password.clone().filter(|_| !expired))
            }
        }
    }

    fn emit(&self, event: DisplayEvent) {
        (self.events)(event);
    }

    /// Look at the screen now and hand every client what changed; whether anything did.
    pub fn refresh(&self) -> bool {
        let (mut damage, mut generation) = self.display.refresh();
        if !damage.any() {
            return false;
        }
        // The guest is likely in the middle of drawing (its fbdev copies whole areas at
        // once): look again a moment later and send both, rather than half a frame now
        // and the rest with the next update.
        std::thread::sleep(SETTLE);
        let (more, g) = self.display.refresh();
        if g == generation && more.tiles.len() == damage.tiles.len() {
            for (d, m) in damage.tiles.iter_mut().zip(&more.tiles) {
                *d |= *m;
            }
        } else {
            (damage, generation) = (more, g);
            damage.resized = true;
        }
        self.damage(&damage, generation);
        true
    }

    /// The keyboard LEDs clients are shown: the virtio keyboard's if the guest uses one,
    /// else the PS/2 keyboard's.
    pub fn leds(&self) -> u8 {
        match self.inputs.find(ipc::display::InputKind::Keyboard) {
            Some(keyboard) => keyboard.leds(),
            None => self.display.leds(),
        }
    }

    /// The LEDs changed: tell the clients that follow them.
    pub fn leds_changed(&self) {
        for c in lock(&self.clients).iter() {
            c.leds_changed();
        }
    }

    /// Merge a refresh's damage into every client's.
    fn damage(&self, damage: &Damage, generation: u64) {
        for c in lock(&self.clients).iter() {
            c.add_damage(damage, generation);
        }
    }

    fn wake_refresh(&self) {
        let (flag, cond) = &*self.activity;
        *lock(flag) = true;
        cond.notify_all();
    }
}
