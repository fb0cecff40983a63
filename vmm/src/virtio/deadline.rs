//! A bound on how long a thread may block on a peer's socket. The vhost-user frontend
//! waits for a backend's replies on the thread that asked (a vCPU writing a register, the
//! monitor), and the `vhost` crate retries a read that times out, so `SO_RCVTIMEO` cannot
//! bound the wait. Instead one watchdog thread shuts the socket down when an armed
//! deadline passes: the blocked read sees end of file and returns, and the caller learns
//! from [`Armed::fired`] that the peer went silent rather than away.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

struct Entry {
    id: u64,
    deadline: Instant,
    socket: Arc<OwnedFd>,
    fired: Arc<AtomicBool>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    entries: Vec<Entry>,
}

struct Watchdog {
    state: Mutex<State>,
    wake: Condvar,
}

fn watchdog() -> &'static Watchdog {
    static WATCHDOG: OnceLock<&'static Watchdog> = OnceLock::new();
    WATCHDOG.get_or_init(|| {
        let dog: &'static Watchdog = Box::leak(Box::new(Watchdog {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
        }));
        if let Err(e) = std::thread::Builder::new()
            .name("socket-deadlines".into())
            .spawn(move || dog.run())
        {
            tracing::error!("cannot start the socket watchdog ({e}): waits are unbounded");
        }
        dog
    })
}

impl Watchdog {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            state.entries.retain(|e| {
                if e.deadline > now {
                    return true;
                }
                e.fired.store(true, Ordering::SeqCst);
                // SAFETY: shutdown on an fd we hold open; it only changes the socket's state.
                unsafe { libc::shutdown(e.socket.as_raw_fd(), libc::SHUT_RDWR) };
                false
            });
            let next = state.entries.iter().map(|e| e.deadline).min();
            state = match next {
                Some(at) => {
                    let wait = at.saturating_duration_since(now);
                    self.wake
                        .wait_timeout(state, wait)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.wake.wait(state).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// An armed deadline; dropping it disarms it.
pub struct Armed {
    id: u64,
    fired: Arc<AtomicBool>,
}

impl Armed {
    /// Whether the deadline passed and the socket was shut down.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        let mut state = watchdog().lock();
        state.entries.retain(|e| e.id != self.id);
    }
}

/// Shut `socket` down if the returned guard still exists `timeout` from now.
pub fn arm(socket: &Arc<OwnedFd>, timeout: Duration) -> Armed {
    let dog = watchdog();
    let fired = Arc::new(AtomicBool::new(false));
    let mut state = dog.lock();
    let id = state.next_id;
    state.next_id += 1;
    state.entries.push(Entry {
        id,
        deadline: Instant::now() + timeout,
        socket: socket.clone(),
        fired: fired.clone(),
    });
    drop(state);
    dog.wake.notify_one();
    Armed { id, fired }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_blocked_read_returns_when_the_deadline_passes() {
        let (mut a, _b) = UnixStream::pair().unwrap();
        let fd = Arc::new(OwnedFd::from(a.try_clone().unwrap()));
        let started = Instant::now();
        let armed = arm(&fd, Duration::from_millis(100));
        let mut buf = [0u8; 1];
        // Blocks until the watchdog shuts the socket down: end of file.
        assert_eq!(a.read(&mut buf).unwrap(), 0);
        assert!(armed.fired());
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[test]
    fn a_disarmed_deadline_leaves_the_socket_alone() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let fd = Arc::new(OwnedFd::from(a.try_clone().unwrap()));
        let armed = arm(&fd, Duration::from_millis(50));
        drop(armed);
        std::thread::sleep(Duration::from_millis(150));
        std::io::Write::write_all(&mut b, b"x").unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(a.read(&mut buf).unwrap(), 1);
    }
}
