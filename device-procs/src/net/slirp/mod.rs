//! A safe wrapper around libslirp, the user-mode network stack behind QEMU's
//! `-netdev user`.
//!
//! [`UserConfig`] holds the `-netdev user` options we support (parsed with QEMU's rules and
//! error texts by [`UserConfig::from_options`] and [`HostForward::parse`]); [`UserNet`] owns
//! one slirp instance: frames from the guest go in through [`UserNet::input`], frames for the
//! guest come out through the `on_frame` callback, and [`UserNet::poll`] drives slirp's host
//! sockets and timers.
//!
//! IPv6 is supported with QEMU's fixed defaults (prefix `fec0::/64`, host `fec0::2`, DNS
//! `fec0::3`); host forwarding is IPv4 only, as in QEMU 7.2.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use libslirp_sys as sys;

mod config;

pub use config::{HostForward, UserConfig};

/// The SlirpConfig version we hand to `slirp_new`. Version 4 would make libslirp read the
/// `init_completed` and `timer_new_opaque` callbacks, which libslirp-sys's `SlirpCb` lacks
/// (it would read past the struct), so 3 is the highest we can use.
const SLIRP_CONFIG_VERSION: u32 = 3;

/// libslirp's MTU bounds (`IF_MTU_MIN`, `IF_MTU_MAX`); outside them `slirp_new` fails.
const MTU_MIN: usize = 68;
const MTU_MAX: usize = 65521;

/// QEMU's fixed IPv6 network for `-netdev user` (no `ipv6-prefix=` support yet).
const IPV6_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0);
const IPV6_PREFIX_LEN: u8 = 64;
const IPV6_HOST: Ipv6Addr = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 2);
const IPV6_DNS: Ipv6Addr = Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 3);

#[derive(Debug, thiserror::Error)]
pub enum SlirpError {
    /// A hostfwd rule that does not parse; the texts are QEMU's.
    #[error("Invalid host forwarding rule '{rule}' ({reason})")]
    BadHostForward { rule: String, reason: &'static str },
    /// slirp could not bind the host side of a forwarding rule.
    #[error("Could not set up host forwarding rule '{0}'")]
    HostForwardSetup(String),
    /// An inconsistent network configuration; the texts are QEMU's.
    #[error("{0}")]
    Config(&'static str),
    #[error("Invalid parameter '{0}'")]
    UnknownOption(String),
    #[error("Parameter '{0}' expects 'on' or 'off'")]
    BadBool(String),
    #[error("'{0}' parameter cannot contain a NUL byte")]
    Nul(&'static str),
    #[error("MTU {0} is outside libslirp's range {MTU_MIN}-{MTU_MAX}")]
    Mtu(usize),
    #[error("libslirp refused the configuration")]
    Init,
    #[error("poll: {0}")]
    Poll(#[source] io::Error),
}

/// libslirp keeps process-wide state (its clock `curtime`, a one-time init) without locking,
/// so every call into libslirp, from any instance, holds this lock.
static SLIRP_LOCK: Mutex<()> = Mutex::new(());

fn slirp_lock() -> MutexGuard<'static, ()> {
    SLIRP_LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Where slirp's frames for the guest go.
pub type FrameSink = Box<dyn FnMut(&[u8]) + Send>;

/// A timer slirp created; one-shot like QEMU's.
struct Timer {
    cb: sys::SlirpTimerCb,
    cb_opaque: *mut c_void,
    /// Milliseconds on [`now_ns`]'s clock; `None` while disarmed.
    expire_ms: Option<i64>,
}

/// What slirp's callbacks reach through their opaque pointer. Only shared references to it
/// ever exist (libslirp holds the pointer while we do), so its mutable parts are cells.
struct Shared {
    on_frame: RefCell<FrameSink>,
    timers: RefCell<BTreeMap<usize, Timer>>,
    next_timer: Cell<usize>,
}

impl Shared {
    fn next_deadline_ms(&self) -> Option<i64> {
        let timers = self.timers.try_borrow().ok()?;
        timers.values().filter_map(|t| t.expire_ms).min()
    }
}

/// A user-mode network: one libslirp instance and its callbacks.
///
/// Callbacks run inside `input`, `poll` and `add_hostfwd`; `on_frame` must not call into
/// another `UserNet` (all instances share one lock).
pub struct UserNet {
    slirp: NonNull<sys::Slirp>,
    /// A leaked `Box<Shared>`, freed in `Drop` after `slirp_cleanup`.
    shared: NonNull<Shared>,
}

// SAFETY: a UserNet exclusively owns its Slirp and its Shared state (the raw pointers are
// not shared with anything but that Slirp). libslirp has no thread affinity (no thread-local
// state, no main context), its process-wide state is guarded by SLIRP_LOCK, the callback
// it may run (`on_frame`) is Send, and the timer opaques are the Slirp's own pointers. So the
// whole may move to another thread; it is not Sync (methods are not safe to run concurrently
// on one instance and the cells are not thread-safe).
unsafe impl Send for UserNet {}

impl UserNet {
    /// Starts the stack and sets up `config.hostfwd`. `on_frame` gets every ethernet frame
    /// slirp sends to the guest.
    pub fn new(config: &UserConfig, on_frame: FrameSink) -> Result<Self, SlirpError> {
        config.validate()?;
        let cstring = |name, s: &Option<String>| {
            s.as_deref()
                .map(|s| CString::new(s).map_err(|_| SlirpError::Nul(name)))
                .transpose()
        };
        let hostname = cstring("hostname", &config.hostname)?;
        let domainname = cstring("domainname", &config.domainname)?;
        let opt_ptr = |s: &Option<CString>| s.as_ref().map_or(ptr::null(), |s| s.as_ptr());

        let mask = config.mask();
        let cfg = sys::SlirpConfig {
            version: SLIRP_CONFIG_VERSION,
            restricted: c_int::from(config.restrict),
            in_enabled: true,
            vnetwork: (config.net & mask).into(),
            vnetmask: mask.into(),
            vhost: config.host.into(),
            in6_enabled: config.ipv6,
            vprefix_addr6: IPV6_PREFIX.into(),
            vprefix_len: IPV6_PREFIX_LEN,
            vhost6: IPV6_HOST.into(),
            vhostname: opt_ptr(&hostname),
            tftp_server_name: ptr::null(),
            tftp_path: ptr::null(),
            bootfile: ptr::null(),
            vdhcp_start: config.dhcp_start.into(),
            vnameserver: config.dns.into(),
            vnameserver6: IPV6_DNS.into(),
            vdnssearch: ptr::null_mut(),
            vdomainname: opt_ptr(&domainname),
            if_mtu: config.mtu,
            if_mru: config.mtu,
            disable_host_loopback: false,
            enable_emu: false,
            outbound_addr: ptr::null(),
            outbound_addr6: ptr::null(),
            disable_dns: false,
            disable_dhcp: false,
        };

        let shared = NonNull::from(Box::leak(Box::new(Shared {
            on_frame: RefCell::new(on_frame),
            timers: RefCell::new(BTreeMap::new()),
            next_timer: Cell::new(1),
        })));
        let slirp = {
            let _lock = slirp_lock();
            // SAFETY: cfg and the strings it points to live across the call (slirp copies
            // the strings); CALLBACKS is a static, and `shared` stays allocated until Drop,
            // after slirp_cleanup, so both outlive the instance.
            unsafe { sys::slirp_new(&cfg, &CALLBACKS, shared.as_ptr().cast()) }
        };
        let Some(slirp) = NonNull::new(slirp) else {
            // SAFETY: `shared` came from Box::leak above and slirp_new failed, so nothing
            // else refers to it.
            drop(unsafe { Box::from_raw(shared.as_ptr()) });
            return Err(SlirpError::Init);
        };
        let mut net = UserNet { slirp, shared };
        for fwd in &config.hostfwd {
            net.add_hostfwd(fwd)?;
        }
        Ok(net)
    }

    fn shared(&self) -> &Shared {
        // SAFETY: `shared` is valid until Drop, and only shared references to it exist.
        unsafe { self.shared.as_ref() }
    }

    /// Adds a forwarding rule (as HMP `hostfwd_add` does); fails if the host side cannot
    /// be bound.
    pub fn add_hostfwd(&mut self, fwd: &HostForward) -> Result<(), SlirpError> {
        let _lock = slirp_lock();
        // SAFETY: self.slirp is a live instance; the arguments are plain values.
        let rc = unsafe {
            sys::slirp_add_hostfwd(
                self.slirp.as_ptr(),
                c_int::from(fwd.udp),
                fwd.host_addr.into(),
                c_int::from(fwd.host_port),
                fwd.guest_addr.into(),
                c_int::from(fwd.guest_port),
            )
        };
        if rc < 0 {
            return Err(SlirpError::HostForwardSetup(fwd.to_string()));
        }
        Ok(())
    }

    /// Removes the rule listening on `host_addr:host_port` (HMP `hostfwd_remove`); false if
    /// there is none.
    pub fn remove_hostfwd(&mut self, udp: bool, host_addr: Ipv4Addr, host_port: u16) -> bool {
        let _lock = slirp_lock();
        // SAFETY: self.slirp is a live instance; the arguments are plain values.
        let rc = unsafe {
            sys::slirp_remove_hostfwd(
                self.slirp.as_ptr(),
                c_int::from(udp),
                host_addr.into(),
                c_int::from(host_port),
            )
        };
        rc == 0
    }

    /// A frame from the guest.
    pub fn input(&mut self, frame: &[u8]) {
        let Ok(len) = c_int::try_from(frame.len()) else {
            tracing::warn!("dropping a {}-byte frame from the guest", frame.len());
            return;
        };
        let _lock = slirp_lock();
        // SAFETY: the frame is valid for `len` bytes during the call; slirp copies it.
        unsafe { sys::slirp_input(self.slirp.as_ptr(), frame.as_ptr(), len) };
    }

    /// Waits up to `timeout` for slirp's sockets or for any of `extra` to be readable,
    /// services slirp's sockets and expired timers, and says which of `extra` are readable
    /// (or hung up or in error, so that a read will not block). The wait is shorter when
    /// slirp or a timer needs it (at most a second), so callers loop.
    pub fn poll(&mut self, extra: &[RawFd], timeout: Duration) -> Result<Vec<bool>, SlirpError> {
        let mut timeout_ms = u32::try_from(timeout.as_nanos().div_ceil(1_000_000))
            .unwrap_or(u32::MAX)
            .min(i32::MAX as u32);
        if let Some(deadline) = self.shared().next_deadline_ms() {
            let left = deadline.saturating_sub(now_ns() / 1_000_000).max(0);
            timeout_ms = timeout_ms.min(u32::try_from(left).unwrap_or(u32::MAX));
        }

        let mut fds: Vec<libc::pollfd> = Vec::new();
        {
            let _lock = slirp_lock();
            // SAFETY: `fds` outlives the call and add_poll only pushes to it.
            unsafe {
                sys::slirp_pollfds_fill(
                    self.slirp.as_ptr(),
                    &mut timeout_ms,
                    Some(add_poll),
                    ptr::addr_of_mut!(fds).cast(),
                )
            };
        }
        let first_extra = fds.len();
        fds.extend(extra.iter().map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }));

        let wait = c_int::try_from(timeout_ms).unwrap_or(c_int::MAX);
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait) };
        let error = (n < 0).then(io::Error::last_os_error);
        {
            let _lock = slirp_lock();
            // SAFETY: `fds` outlives the call and get_revents only reads it.
            unsafe {
                sys::slirp_pollfds_poll(
                    self.slirp.as_ptr(),
                    c_int::from(error.is_some()),
                    Some(get_revents),
                    ptr::addr_of_mut!(fds).cast(),
                )
            };
            self.run_timers();
        }
        match error {
            Some(e) if e.kind() == io::ErrorKind::Interrupted => Ok(vec![false; extra.len()]),
            Some(e) => Err(SlirpError::Poll(e)),
            None => Ok(fds[first_extra..]
                .iter()
                .map(|p| {
                    p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
                })
                .collect()),
        }
    }

    /// Fires expired timers; the caller holds SLIRP_LOCK. A callback may free or re-arm any
    /// timer, so each is looked up again just before it fires.
    fn run_timers(&self) {
        let now_ms = now_ns() / 1_000_000;
        let due: Vec<usize> = match self.shared().timers.try_borrow() {
            Ok(timers) => timers
                .iter()
                .filter(|(_, t)| t.expire_ms.is_some_and(|e| e <= now_ms))
                .map(|(&id, _)| id)
                .collect(),
            Err(_) => return,
        };
        for id in due {
            let fire = {
                let Ok(mut timers) = self.shared().timers.try_borrow_mut() else {
                    return;
                };
                match timers.get_mut(&id) {
                    Some(t) if t.expire_ms.is_some_and(|e| e <= now_ms) => {
                        t.expire_ms = None;
                        t.cb.map(|cb| (cb, t.cb_opaque))
                    }
                    _ => None,
                }
            };
            if let Some((cb, cb_opaque)) = fire {
                // SAFETY: slirp gave us this callback and its opaque in timer_new and has
                // not freed the timer; no borrow of the timer list is held across the call.
                unsafe { cb(cb_opaque) };
            }
        }
    }

    /// `slirp_connection_info`: the table HMP `info usernet` prints.
    pub fn connection_info(&self) -> String {
        let _lock = slirp_lock();
        // SAFETY: self.slirp is a live instance.
        let text = unsafe { sys::slirp_connection_info(self.slirp.as_ptr()) };
        if text.is_null() {
            return String::new();
        }
        // SAFETY: libslirp returns a NUL-terminated string allocated with g_malloc, which we
        // own and free once copied.
        unsafe {
            let info = CStr::from_ptr(text).to_string_lossy().into_owned();
            g_free(text.cast());
            info
        }
    }
}

impl Drop for UserNet {
    fn drop(&mut self) {
        {
            let _lock = slirp_lock();
            // SAFETY: the instance is live and never used again; its timer_free callbacks
            // still find `shared`, which is freed only below.
            unsafe { sys::slirp_cleanup(self.slirp.as_ptr()) };
        }
        // SAFETY: `shared` came from Box::leak in new() and libslirp, now gone, was the only
        // other holder of the pointer.
        drop(unsafe { Box::from_raw(self.shared.as_ptr()) });
    }
}

#[link(name = "glib-2.0")]
extern "C" {
    /// Frees what libslirp allocates for us (the connection_info text).
    fn g_free(mem: *mut c_void);
}

/// libslirp keeps a pointer to this for the instance's lifetime, hence a static.
static CALLBACKS: sys::SlirpCb = sys::SlirpCb {
    send_packet: Some(send_packet),
    guest_error: Some(guest_error),
    clock_get_ns: Some(clock_get_ns),
    timer_new: Some(timer_new),
    timer_free: Some(timer_free),
    timer_mod: Some(timer_mod),
    register_poll_fd: Some(register_poll_fd),
    unregister_poll_fd: Some(unregister_poll_fd),
    notify: Some(notify),
};

/// Runs a callback body without letting a panic unwind into C.
fn no_unwind<R>(fallback: R, body: impl FnOnce() -> R) -> R {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// # Safety
/// `opaque` is the `Shared` pointer given to slirp_new, still alive.
unsafe fn shared<'a>(opaque: *mut c_void) -> &'a Shared {
    // SAFETY: per the function's contract.
    unsafe { &*opaque.cast::<Shared>() }
}

unsafe extern "C" fn send_packet(buf: *const c_void, len: usize, opaque: *mut c_void) -> isize {
    no_unwind(-1, || {
        // SAFETY: slirp passes its opaque (our Shared) and a frame of `len` bytes.
        let (shared, frame) = unsafe {
            (
                shared(opaque),
                std::slice::from_raw_parts(buf.cast::<u8>(), len),
            )
        };
        match shared.on_frame.try_borrow_mut() {
            Ok(mut on_frame) => on_frame(frame),
            Err(_) => tracing::warn!("slirp sent a frame from inside on_frame; dropped"),
        }
        isize::try_from(len).unwrap_or(isize::MAX)
    })
}

unsafe extern "C" fn guest_error(msg: *const c_char, _opaque: *mut c_void) {
    no_unwind((), || {
        if msg.is_null() {
            return;
        }
        // SAFETY: slirp passes a NUL-terminated message.
        let msg = unsafe { CStr::from_ptr(msg) };
        tracing::warn!("slirp: guest error: {}", msg.to_string_lossy());
    })
}

fn now_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec)
}

unsafe extern "C" fn clock_get_ns(_opaque: *mut c_void) -> i64 {
    now_ns()
}

unsafe extern "C" fn timer_new(
    cb: sys::SlirpTimerCb,
    cb_opaque: *mut c_void,
    opaque: *mut c_void,
) -> *mut c_void {
    no_unwind(ptr::null_mut(), || {
        // SAFETY: slirp passes its opaque, our Shared.
        let shared = unsafe { shared(opaque) };
        let Ok(mut timers) = shared.timers.try_borrow_mut() else {
            return ptr::null_mut();
        };
        let id = shared.next_timer.get();
        shared.next_timer.set(id.wrapping_add(1).max(1));
        timers.insert(
            id,
            Timer {
                cb,
                cb_opaque,
                expire_ms: None,
            },
        );
        // The handle is the timer's id (never 0), not an address.
        id as *mut c_void
    })
}

unsafe extern "C" fn timer_free(timer: *mut c_void, opaque: *mut c_void) {
    no_unwind((), || {
        // SAFETY: slirp passes its opaque, our Shared.
        let shared = unsafe { shared(opaque) };
        if let Ok(mut timers) = shared.timers.try_borrow_mut() {
            timers.remove(&(timer as usize));
        }
    })
}

unsafe extern "C" fn timer_mod(timer: *mut c_void, expire_time: i64, opaque: *mut c_void) {
    no_unwind((), || {
        // SAFETY: slirp passes its opaque, our Shared.
        let shared = unsafe { shared(opaque) };
        if let Ok(mut timers) = shared.timers.try_borrow_mut() {
            if let Some(t) = timers.get_mut(&(timer as usize)) {
                t.expire_ms = Some(expire_time);
            }
        }
    })
}

/// poll() re-collects slirp's sockets every round (slirp_pollfds_fill), so there is nothing
/// to register.
unsafe extern "C" fn register_poll_fd(_fd: c_int, _opaque: *mut c_void) {}

unsafe extern "C" fn unregister_poll_fd(_fd: c_int, _opaque: *mut c_void) {}

/// slirp asks to be polled again soon; our caller polls in a loop anyway.
unsafe extern "C" fn notify(_opaque: *mut c_void) {}

const POLL_FLAGS: [(c_int, libc::c_short); 5] = [
    (sys::SLIRP_POLL_IN, libc::POLLIN),
    (sys::SLIRP_POLL_OUT, libc::POLLOUT),
    (sys::SLIRP_POLL_PRI, libc::POLLPRI),
    (sys::SLIRP_POLL_ERR, libc::POLLERR),
    (sys::SLIRP_POLL_HUP, libc::POLLHUP),
];

unsafe extern "C" fn add_poll(fd: c_int, events: c_int, opaque: *mut c_void) -> c_int {
    no_unwind(-1, || {
        // SAFETY: poll() passes its `Vec<pollfd>`, not otherwise borrowed during the call.
        let fds = unsafe { &mut *opaque.cast::<Vec<libc::pollfd>>() };
        let Ok(idx) = c_int::try_from(fds.len()) else {
            return -1;
        };
        let events = POLL_FLAGS
            .iter()
            .filter(|(s, _)| events & s != 0)
            .fold(0, |acc, (_, p)| acc | p);
        fds.push(libc::pollfd {
            fd,
            events,
            revents: 0,
        });
        idx
    })
}

unsafe extern "C" fn get_revents(idx: c_int, opaque: *mut c_void) -> c_int {
    no_unwind(0, || {
        // SAFETY: poll() passes its `Vec<pollfd>`, not otherwise borrowed during the call.
        let fds = unsafe { &*opaque.cast::<Vec<libc::pollfd>>() };
        let Some(p) = usize::try_from(idx).ok().and_then(|i| fds.get(i)) else {
            return 0;
        };
        POLL_FLAGS
            .iter()
            .filter(|(_, f)| p.revents & f != 0)
            .fold(0, |acc, (s, _)| acc | s)
    })
}

#[cfg(test)]
mod tests;
