//! The thread that watches every device process: it restarts one that dies (with the
//! same fds, replaying the vhost-user setup), reads the events processes send (I/O errors,
//! error-policy stops), and drops a process that breaks the control protocol.

use super::*;

/// What the watcher thread works with.
pub(super) struct WatchContext {
    pub(super) blocks: Arc<Mutex<Vec<SharedBlock>>>,
    pub(super) controllers: Arc<Mutex<Vec<SharedController>>>,
    pub(super) events: Arc<Mutex<EventSender>>,
    /// Where an error policy's stop goes.
    pub(super) machine: MachineControl,
    pub(super) wake: EventFd,
    pub(super) stop: Arc<AtomicBool>,
}

impl WatchContext {
    fn emit(&self, name: &str, data: Value) {
        let data = match data {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        lock(&self.events).emit(name, Some(data));
    }

    pub(super) fn run(self) {
        while !self.stop.load(Ordering::SeqCst) {
            let watched: Vec<SharedBlock> = lock(&self.blocks)
                .iter()
                .filter(|b| lock(b).state == ProcessState::Running)
                .cloned()
                .collect();
            // Two entries per device: its pidfd and its control socket.
            let mut fds = Vec::with_capacity(watched.len() * 2 + 1);
            for b in &watched {
                let b = lock(b);
                fds.push(libc::pollfd {
                    fd: b.process.pidfd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                fds.push(libc::pollfd {
                    // A negative fd is ignored by poll.
                    fd: if b.control_closed {
                        -1
                    } else {
                        b.control.socket().as_raw_fd()
                    },
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            // Then the same two for each SCSI controller.
            let controllers: Vec<SharedController> = lock(&self.controllers)
                .iter()
                .filter(|c| !scsi::failed(c))
                .cloned()
                .collect();
            for c in &controllers {
                let c = lock(c);
                fds.push(libc::pollfd {
                    fd: c.process.pidfd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                });
                fds.push(libc::pollfd {
                    fd: if c.control_closed {
                        -1
                    } else {
                        c.control.socket().as_raw_fd()
                    },
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
            fds.push(libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: `fds` is a valid array of pollfd of the given length; the fds stay
            // open while their devices are in `watched`.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
            if n <= 0 {
                continue;
            }
            if fds.last().is_some_and(|p| p.revents != 0) {
                let _ = self.wake.read();
            }
            let base = 2 * watched.len();
            for (i, c) in controllers.iter().enumerate() {
                if fds[base + 2 * i + 1].revents != 0 {
                    self.controller_message(c);
                }
                if fds[base + 2 * i].revents != 0 {
                    self.controller_exited(c);
                }
            }
            for (i, block) in watched.iter().enumerate() {
                if self.stop.load(Ordering::SeqCst) {
                    break;
                }
                if fds[2 * i + 1].revents != 0 {
                    self.control_message(block);
                }
                if fds[2 * i].revents != 0 {
                    self.restart(block);
                }
            }
        }
    }

    /// An event from a SCSI controller: the tray of one of its drives moved.
    fn controller_message(&self, c: &SharedController) {
        let mut c = lock(c);
        if c.removed {
            return;
        }
        match c.control.recv(Some(Duration::from_millis(100))) {
            Ok((ipc::Message::Event(ipc::scsi::ScsiEvent::TrayMoved { id, tray_open }), _)) => {
                let qdev_id = c
                    .luns
                    .iter()
                    .find(|l| l.drive.id == id)
                    .map(|l| l.qdev_id.clone())
                    .unwrap_or_default();
                self.emit(
                    "DEVICE_TRAY_MOVED",
                    json!({"device": id, "tray-open": tray_open, "id": qdev_id}),
                );
            }
            Ok(_) => tracing::warn!(device = %c.name, "unexpected control message"),
            Err(ipc::IpcError::Frame(ipc::FrameError::Closed)) => c.control_closed = true,
            Err(ipc::IpcError::Frame(ipc::FrameError::TimedOut)) => {}
            Err(e) => tracing::warn!(device = %c.name, "control socket: {e}"),
        }
    }

    /// A SCSI controller's process ended: report it and start a new one (with back-off),
    /// or give up after too many restarts, as for block processes.
    fn controller_exited(&self, c: &SharedController) {
        let mut c = lock(c);
        if c.removed {
            return;
        }
        let pid = c.process.pid();
        let _ = c.process.wait_exit(Duration::ZERO);
        let device = c.id.clone().unwrap_or_else(|| c.name.clone());
        tracing::warn!(device = %c.name, pid, "SCSI controller process ended; restarting");
        self.emit(
            EVENT_PROCESS_EXITED,
            json!({"device": device, "pid": pid, "reason": "exited"}),
        );
        loop {
            let Some(backoff) = c.restarts.next() else {
                c.failed = true;
                self.emit(
                    EVENT_PROCESS_FAILED,
                    json!({"device": device, "restarts": c.restarts.total()}),
                );
                return;
            };
            std::thread::sleep(backoff);
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            match c.respawn() {
                Ok(()) => {
                    let pid = c.process.pid();
                    self.emit(
                        EVENT_PROCESS_RESTARTED,
                        json!({"device": device, "pid": pid, "restarts": c.restarts.total()}),
                    );
                    return;
                }
                Err(e) => tracing::warn!(device = %c.name, "restart failed: {e}"),
            }
        }
    }

    /// A message (or end of file) on a device's control socket.
    fn control_message(&self, block: &SharedBlock) {
        let mut b = lock(block);
        if b.removed {
            return;
        }
        let reason = match b.control.recv(Some(Duration::from_millis(100))) {
            Ok((ipc::Message::Event(BlkEvent::IoError { write, message }), _)) => {
                let op = if write { "write" } else { "read" };
                tracing::warn!(device = %b.name, "guest {op} failed: {message}");
                return;
            }
            Ok((
                ipc::Message::Event(BlkEvent::RequestFailed {
                    write,
                    action,
                    nospace,
                    reason,
                }),
                _,
            )) => {
                let action_name = match action {
                    ErrorAction::Report | ErrorAction::Enospc => "report",
                    ErrorAction::Ignore => "ignore",
                    ErrorAction::Stop => "stop",
                };
                // QEMU 7.2's BLOCK_IO_ERROR, then (for stop) the VM stops: STOP follows.
                self.emit(
                    "BLOCK_IO_ERROR",
                    json!({
                        "device": b.drive,
                        "node-name": b.name,
                        "operation": if write { "write" } else { "read" },
                        "action": action_name,
                        "nospace": nospace,
                        "reason": reason,
                    }),
                );
                if action == ErrorAction::Stop {
                    b.io_status = if nospace {
                        IoStatus::Nospace
                    } else {
                        IoStatus::Failed
                    };
                    self.machine.request(MachineRequest::BlockIoErrorStop);
                }
                return;
            }
            Ok(_) => "a message that is not an event".to_string(),
            Err(ipc::IpcError::Frame(ipc::FrameError::Closed)) => {
                // The process is exiting; its pidfd tells the rest.
                b.control_closed = true;
                return;
            }
            Err(ipc::IpcError::Frame(ipc::FrameError::TimedOut)) => return,
            Err(e) => e.to_string(),
        };
        // Whatever sent this may be compromised: stop it and do not trust a new one either.
        let device = b.id.clone().unwrap_or_else(|| b.name.clone());
        let pid = b.process.pid();
        tracing::error!(device = %b.name, pid, "bad control message ({reason}): stopping it");
        b.state = ProcessState::Failed;
        b.process.kill();
        self.emit(
            EVENT_PROCESS_MISBEHAVED,
            json!({"device": device, "pid": pid, "reason": reason}),
        );
    }

    /// The process of `block` exited: report it and start a new one, or give up.
    fn restart(&self, block: &SharedBlock) {
        let mut b = lock(block);
        if b.removed {
            // Unplugged (device_del): its exit is the one we asked for.
            return;
        }
        let old_pid = b.process.pid();
        let status = b.process.wait_exit(Duration::ZERO);
        let how = match status {
            Some(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(sig)) => format!("signal {sig}"),
                _ => "unknown".to_string(),
            },
            None => "unknown".to_string(),
        };
        let device = b.id.clone().unwrap_or_else(|| b.name.clone());
        tracing::warn!(device = %b.name, pid = old_pid, "device process ended ({how}); restarting");
        self.emit(
            EVENT_PROCESS_EXITED,
            json!({"device": device, "pid": old_pid, "reason": how}),
        );
        loop {
            let Some(backoff) = b.restarts.next() else {
                b.state = ProcessState::Failed;
                tracing::error!(device = %b.name, "device process keeps crashing: marked failed");
                self.emit(
                    EVENT_PROCESS_FAILED,
                    json!({"device": device, "restarts": b.restarts.total()}),
                );
                return;
            };
            if !backoff.is_zero() {
                drop(b);
                std::thread::sleep(backoff);
                b = lock(block);
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            match respawn(&mut b) {
                Ok(()) => {
                    let pid = b.process.pid();
                    tracing::info!(device = %b.name, pid, "device process restarted");
                    self.emit(
                        EVENT_PROCESS_RESTARTED,
                        json!({"device": device, "pid": pid, "restarts": b.restarts.total()}),
                    );
                    return;
                }
                Err(e) => tracing::warn!(device = %b.name, "restart failed: {e}"),
            }
        }
    }
}

/// A new process for `b` with the same image, and the vhost-user setup replayed.
fn respawn(b: &mut BlockDevice) -> Result<(), DeviceError> {
    let (process, mut control, _size, _encrypted) =
        start_blk_process(&b.name, &b.image, &b.attach)?;
    if let Some(password) = &b.password {
        control
            .call(
                BlkRequest::SetKey {
                    password: password.clone(),
                },
                &[],
                SETUP_TIMEOUT,
            )
            .map_err(|source| DeviceError::Ipc {
                name: b.name.clone(),
                source,
            })?;
    }
    let stream = process.connect_vhost_user()?;
    {
        let mut function = lock(&b.function);
        let backend = function
            .backend_mut()
            .as_vhost_user()
            .ok_or_else(|| DeviceError::NotRestartable(b.name.clone()))?;
        backend.reconnect(stream)?;
    }
    // The old process is gone; dropping its handle reaps nothing more.
    b.process = process;
    b.control = control;
    Ok(())
}
