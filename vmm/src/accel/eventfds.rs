//! ioeventfd and irqfd for accelerators that are not KVM (emu, qtest): the same meaning as
//! KVM's, in user space. An [`IoEventTable`] is consulted on every port and MMIO write and
//! signals the eventfd of a matching registration instead of passing the write on; an
//! [`IrqFdRouter`] runs one thread that waits on the registered irqfds and raises an edge on
//! a signalled fd's GSI.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use vmm_sys_util::eventfd::EventFd;

use super::IoEventAddress;

#[derive(Debug, thiserror::Error)]
pub enum EventFdError {
    #[error("duplicate an {what}: {source}")]
    Dup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("no such {0} is registered")]
    NotRegistered(&'static str),
    #[error("GSI {0} is out of range")]
    InvalidGsi(u32),
    #[error("start the irqfd thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("eventfd for the irqfd thread: {0}")]
    WakeFd(#[source] std::io::Error),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered ioeventfd.
struct IoEvent {
    addr: IoEventAddress,
    datamatch: Option<u32>,
    fd: EventFd,
}

/// The registered ioeventfds of a VM.
#[derive(Default)]
pub struct IoEventTable {
    events: RwLock<Vec<IoEvent>>,
}

impl IoEventTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Signal `fd` on writes to `addr`; with `datamatch`, only on 4-byte writes of that value
    /// (KVM's 32-bit datamatch).
    pub fn register(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), EventFdError> {
        let fd = fd.try_clone().map_err(|source| EventFdError::Dup {
            what: "ioeventfd",
            source,
        })?;
        self.events
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(IoEvent {
                addr,
                datamatch,
                fd,
            });
        Ok(())
    }

    pub fn unregister(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<(), EventFdError> {
        let mut events = self.events.write().unwrap_or_else(|e| e.into_inner());
        let before = events.len();
        events.retain(|e| !(e.addr == addr && e.datamatch == datamatch && same_file(&e.fd, fd)));
        if events.len() == before {
            return Err(EventFdError::NotRegistered("ioeventfd"));
        }
        Ok(())
    }

    /// A write of `data` to `addr`: if a registration matches, signal its eventfd and return
    /// true (the write is consumed); otherwise false.
    pub fn signal(&self, addr: IoEventAddress, data: &[u8]) -> bool {
        let events = self.events.read().unwrap_or_else(|e| e.into_inner());
        if events.is_empty() {
            return false;
        }
        let mut b = [0u8; 8];
        let n = data.len().min(8);
        b[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(b);
        for e in events.iter() {
            let hit = e.addr == addr
                && match e.datamatch {
                    None => true,
                    Some(v) => data.len() == 4 && value == u64::from(v),
                };
            if hit {
                if let Err(err) = e.fd.write(1) {
                    tracing::warn!("ioeventfd write failed: {err}");
                }
                return true;
            }
        }
        false
    }
}

/// Raises an edge on a GSI; returns false once its target is gone (the thread then ends).
pub type RaiseEdge = Arc<dyn Fn(u32) -> bool + Send + Sync>;

/// Registered irqfds, served by one thread started on the first registration.
pub struct IrqFdRouter {
    list: Arc<Mutex<Vec<(EventFd, u32)>>>,
    /// Wakes the thread when the list changes or the router is dropped.
    wake: Arc<EventFd>,
    thread: OnceLock<()>,
    stop: Arc<AtomicBool>,
    raise: RaiseEdge,
    num_gsis: u32,
    thread_name: &'static str,
}

impl IrqFdRouter {
    /// `raise` is called on the router's thread for every signalled irqfd.
    pub fn new(
        thread_name: &'static str,
        num_gsis: u32,
        raise: RaiseEdge,
    ) -> Result<Self, EventFdError> {
        let wake =
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(EventFdError::WakeFd)?;
        Ok(Self {
            list: Arc::default(),
            wake: Arc::new(wake),
            thread: OnceLock::new(),
            stop: Arc::new(AtomicBool::new(false)),
            raise,
            num_gsis,
            thread_name,
        })
    }

    pub fn register(&self, fd: &EventFd, gsi: u32) -> Result<(), EventFdError> {
        if gsi >= self.num_gsis {
            return Err(EventFdError::InvalidGsi(gsi));
        }
        let fd = fd.try_clone().map_err(|source| EventFdError::Dup {
            what: "irqfd",
            source,
        })?;
        lock(&self.list).push((fd, gsi));
        self.ensure_thread()?;
        let _ = self.wake.write(1);
        Ok(())
    }

    pub fn unregister(&self, fd: &EventFd, gsi: u32) -> Result<(), EventFdError> {
        let mut list = lock(&self.list);
        let before = list.len();
        list.retain(|(f, g)| !(*g == gsi && same_file(f, fd)));
        if list.len() == before {
            return Err(EventFdError::NotRegistered("irqfd"));
        }
        drop(list);
        let _ = self.wake.write(1);
        Ok(())
    }

    fn ensure_thread(&self) -> Result<(), EventFdError> {
        if self.thread.get().is_some() {
            return Ok(());
        }
        let list = self.list.clone();
        let wake = self.wake.clone();
        let stop = self.stop.clone();
        let raise = self.raise.clone();
        std::thread::Builder::new()
            .name(self.thread_name.into())
            .spawn(move || irqfd_loop(list, wake, stop, raise))
            .map_err(EventFdError::Thread)?;
        let _ = self.thread.set(());
        Ok(())
    }
}

impl Drop for IrqFdRouter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.write(1);
    }
}

fn irqfd_loop(
    list: Arc<Mutex<Vec<(EventFd, u32)>>>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    raise: RaiseEdge,
) {
    while !stop.load(Ordering::Relaxed) {
        let mut pollfds = vec![libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        let gsis: Vec<u32> = {
            let list = lock(&list);
            for (fd, _) in list.iter() {
                pollfds.push(libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            list.iter().map(|(_, g)| *g).collect()
        };
        // SAFETY: pollfds is a valid array for the duration of the call.
        let n = unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, 1000) };
        if n <= 0 {
            continue;
        }
        if pollfds[0].revents != 0 {
            let _ = wake.read();
        }
        // Raise outside the list lock: the target may take its own locks.
        let mut due = Vec::new();
        {
            let list = lock(&list);
            for (i, pfd) in pollfds.iter().enumerate().skip(1) {
                if pfd.revents & libc::POLLIN == 0 {
                    continue;
                }
                // The list may have changed since poll: act only on an unchanged entry.
                if let Some((fd, gsi)) = list.get(i - 1) {
                    if fd.as_raw_fd() == pfd.fd && gsis.get(i - 1) == Some(gsi) && fd.read().is_ok()
                    {
                        due.push(*gsi);
                    }
                }
            }
        }
        for gsi in due {
            if !raise(gsi) {
                return;
            }
        }
    }
}

/// Do two eventfds refer to the same open file?
pub fn same_file(a: &EventFd, b: &EventFd) -> bool {
    let stat = |fd: i32| {
        // SAFETY: fstat on a valid descriptor into a zeroed stat buffer.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            (libc::fstat(fd, &mut st) == 0).then_some((st.st_dev, st.st_ino))
        }
    };
    let (sa, sb) = (stat(a.as_raw_fd()), stat(b.as_raw_fd()));
    sa.is_some() && sa == sb
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn efd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    #[test]
    fn ioevent_datamatch_and_any() {
        let t = IoEventTable::new();
        let any = efd();
        let only7 = efd();
        t.register(&any, IoEventAddress::Pio(0x10), None).unwrap();
        t.register(&only7, IoEventAddress::Mmio(0x1000), Some(7))
            .unwrap();
        assert!(t.signal(IoEventAddress::Pio(0x10), &[1]));
        assert_eq!(any.read().unwrap(), 1);
        assert!(!t.signal(IoEventAddress::Mmio(0x1000), &6u32.to_le_bytes()));
        assert!(!t.signal(IoEventAddress::Mmio(0x1000), &7u16.to_le_bytes()));
        assert!(only7.read().is_err());
        assert!(t.signal(IoEventAddress::Mmio(0x1000), &7u32.to_le_bytes()));
        assert_eq!(only7.read().unwrap(), 1);
        assert!(t
            .unregister(&only7, IoEventAddress::Mmio(0x1000), None)
            .is_err());
        t.unregister(&only7, IoEventAddress::Mmio(0x1000), Some(7))
            .unwrap();
        assert!(!t.signal(IoEventAddress::Mmio(0x1000), &7u32.to_le_bytes()));
    }

    #[test]
    fn irqfd_raises_its_gsi() {
        let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
        let s = seen.clone();
        let router = IrqFdRouter::new(
            "test-irqfd",
            24,
            Arc::new(move |gsi| {
                lock(&s).push(gsi);
                true
            }),
        )
        .unwrap();
        let fd = efd();
        assert!(matches!(
            router.register(&fd, 24),
            Err(EventFdError::InvalidGsi(24))
        ));
        router.register(&fd, 5).unwrap();
        fd.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while lock(&seen).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(*lock(&seen), vec![5]);
        router.unregister(&fd, 5).unwrap();
        assert!(router.unregister(&fd, 5).is_err());
    }
}
