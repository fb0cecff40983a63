//! The thread that watches every device process, whatever its kind: it restarts one that
//! dies (with the same fds, replaying the vhost-user setup, within the restart budget),
//! hands the kind the events its process sends, and drops a process that breaks the
//! control protocol.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use qmp::EventSender;
use serde_json::{json, Map, Value};
use vmm_sys_util::eventfd::EventFd;

use super::lock;
use super::process::{
    ProcessState, SharedSupervised, WatchSink, EVENT_PROCESS_EXITED, EVENT_PROCESS_FAILED,
    EVENT_PROCESS_MISBEHAVED, EVENT_PROCESS_RESTARTED,
};
use crate::control::MachineControl;

/// The running watcher thread.
pub(super) struct Watcher {
    wake: EventFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Start watching the devices in `devices` (which may grow: call [`Watcher::wake`]).
    pub(super) fn start(
        devices: Arc<Mutex<Vec<SharedSupervised>>>,
        events: Arc<Mutex<EventSender>>,
        machine: MachineControl,
    ) -> std::io::Result<Self> {
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop = Arc::new(AtomicBool::new(false));
        let context = WatchContext {
            devices,
            events,
            machine,
            wake: wake.try_clone()?,
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("device-watch".into())
            .spawn(move || context.run())?;
        Ok(Watcher {
            wake,
            stop,
            thread: Some(thread),
        })
    }

    /// Look at the device list again.
    pub(super) fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the watcher thread works with.
struct WatchContext {
    devices: Arc<Mutex<Vec<SharedSupervised>>>,
    events: Arc<Mutex<EventSender>>,
    /// Where an error policy's stop goes.
    machine: MachineControl,
    wake: EventFd,
    stop: Arc<AtomicBool>,
}

impl WatchSink for WatchContext {
    fn emit(&self, name: &str, data: Value) {
        let data = match data {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        lock(&self.events).emit(name, Some(data));
    }

    fn machine(&self) -> &MachineControl {
        &self.machine
    }
}

impl WatchContext {
    fn run(self) {
        while !self.stop.load(Ordering::SeqCst) {
            let watched: Vec<SharedSupervised> = lock(&self.devices)
                .iter()
                .filter(|d| {
                    let d = lock(d);
                    let s = d.supervision();
                    s.running() && !s.removed
                })
                .cloned()
                .collect();
            // Two entries per device: its pidfd and its control socket.
            let mut fds = Vec::with_capacity(watched.len() * 2 + 1);
            for d in &watched {
                let d = lock(d);
                let s = d.supervision();
                fds.push(pollfd(s.process.pidfd().as_raw_fd()));
                // A negative fd is ignored by poll.
                fds.push(pollfd(if s.control_closed { -1 } else { d.control_fd() }));
            }
            fds.push(pollfd(self.wake.as_raw_fd()));
            // SAFETY: `fds` is a valid array of pollfd of the given length; the fds stay
            // open while their devices are in `watched`.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
            if n <= 0 {
                continue;
            }
            if fds.last().is_some_and(|p| p.revents != 0) {
                let _ = self.wake.read();
            }
            for (i, device) in watched.iter().enumerate() {
                if self.stop.load(Ordering::SeqCst) {
                    break;
                }
                if fds[2 * i + 1].revents != 0 {
                    self.control_message(device);
                }
                if fds[2 * i].revents != 0 {
                    self.restart(device);
                }
            }
        }
    }

    /// A message (or end of file) on a device's control socket.
    fn control_message(&self, device: &SharedSupervised) {
        let mut d = lock(device);
        if d.supervision().removed {
            return;
        }
        if let Err(misbehaved) = d.control_message(self) {
            // Killed now; reported when its exit shows on the pidfd.
            d.supervision().process.verdict().convict(&misbehaved.0);
        }
    }

    /// The process of `device` exited: report it and start a new one, or give up.
    fn restart(&self, device: &SharedSupervised) {
        let mut d = lock(device);
        let s = d.supervision_mut();
        if s.removed {
            // Unplugged (device_del): its exit is the one we asked for.
            return;
        }
        let old_pid = s.process.pid();
        let planned = s.planned.take();
        let status = s.process.wait_exit(Duration::ZERO);
        let signal = status.and_then(|s| std::os::unix::process::ExitStatusExt::signal(&s));
        // The outer process of a sandbox exits with 128 + the signal that killed the inner.
        let sigsys = signal == Some(libc::SIGSYS)
            || status.and_then(|s| s.code()) == Some(128 + libc::SIGSYS);
        if planned.is_none() && sigsys {
            // Its seccomp filter killed it: it tried what none of our code does.
            s.process
                .verdict()
                .convict("a system call outside its seccomp allowlist (SIGSYS)");
        }
        if let Some(reason) = s.process.verdict().reason() {
            // Whatever it sent may come from an attacker: stopped, and not trusted again.
            tracing::error!(device = %s.name, pid = old_pid, "misbehaved ({reason}): stopped");
            s.state = ProcessState::Failed;
            s.process.kill();
            self.emit(
                EVENT_PROCESS_MISBEHAVED,
                json!({"device": s.device, "pid": old_pid, "reason": reason}),
            );
            return;
        }
        let how = match (planned, status) {
            (Some(why), _) => why.to_string(),
            (None, status) => match status {
                Some(status) => match (status.code(), signal) {
                    (Some(code), _) => format!("exit status {code}"),
                    (None, Some(sig)) => format!("signal {sig}"),
                    _ => "unknown".to_string(),
                },
                None => "unknown".to_string(),
            },
        };
        let name = s.name.clone();
        let label = s.device.clone();
        tracing::warn!(device = %name, pid = old_pid, "device process ended ({how}); restarting");
        self.emit(
            EVENT_PROCESS_EXITED,
            json!({"device": label, "pid": old_pid, "reason": how}),
        );
        loop {
            let backoff = if planned.is_some() {
                Some(Duration::ZERO)
            } else {
                d.supervision_mut().restarts.next()
            };
            let Some(backoff) = backoff else {
                let s = d.supervision_mut();
                s.state = ProcessState::Failed;
                tracing::error!(device = %name, "device process keeps crashing: marked failed");
                self.emit(
                    EVENT_PROCESS_FAILED,
                    json!({"device": label, "restarts": s.restarts.total()}),
                );
                return;
            };
            if !backoff.is_zero() {
                drop(d);
                std::thread::sleep(backoff);
                d = lock(device);
            }
            if self.stop.load(Ordering::SeqCst) || d.supervision().removed {
                return;
            }
            match d.respawn() {
                Ok(()) => {
                    let s = d.supervision();
                    let pid = s.process.pid();
                    tracing::info!(device = %name, pid, "device process restarted");
                    self.emit(
                        EVENT_PROCESS_RESTARTED,
                        json!({"device": label, "pid": pid, "restarts": s.restarts.total()}),
                    );
                    d.after_restart(self);
                    return;
                }
                Err(e) => tracing::warn!(device = %name, "restart failed: {e}"),
            }
        }
    }
}

fn pollfd(fd: std::os::fd::RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}
