//! A virtio backend in another process, reached over vhost-user (the `vhost` crate's
//! frontend). The device process gets guest RAM as memfd regions and each queue's kick and
//! call eventfds, and from then on moves data without us.
//!
//! Everything sent to the backend is remembered, so that a backend that died can be
//! replaced: [`VhostUserDevice::reconnect`] replays the setup on a new connection and
//! restarts each queue from the used index the guest can see, so requests that were in
//! flight are processed again.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::deadline;
use super::{Activation, VirtioBackend, VirtioError};

/// How long one exchange with the backend (a handshake, starting or stopping the queues)
/// may take before the backend is taken for hung: its socket is shut down and the caller
/// (a vCPU, the monitor) goes on.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Told once, with the reason, when the backend breaks the protocol or goes silent.
pub type ViolationHook = Arc<dyn Fn(&str) + Send + Sync>;

/// Protocol features we use when the backend offers them.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::LOG_SHMFD
}

/// The device feature that turns the backend's dirty logging on (VHOST_F_LOG_ALL).
const VHOST_F_LOG_ALL: u64 = 1 << 26;
/// The vring address flag that logs used-ring writes (VHOST_VRING_F_LOG).
const VHOST_VRING_F_LOG: u32 = 1;

/// The log a migration shares with the backend: a memfd of one bit per guest page.
#[derive(Clone)]
pub struct LogShare {
    pub fd: Arc<OwnedFd>,
    pub size: u64,
}

/// What to do when the backend says its configuration changed (a resize, say): set by the
/// owner of the transport once the device is plugged.
#[derive(Default)]
pub struct ConfigNotifier {
    action: Mutex<Option<Arc<dyn Fn() + Send + Sync>>>,
}

impl ConfigNotifier {
    pub fn set(&self, action: Arc<dyn Fn() + Send + Sync>) {
        *self.action.lock().unwrap_or_else(|e| e.into_inner()) = Some(action);
    }
}

impl VhostUserFrontendReqHandler for ConfigNotifier {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        let action = self
            .action
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(action) = action {
            // Not here: the action reads the configuration back over the main channel, and
            // the backend may be waiting for this message's reply before it reads that.
            let _ = std::thread::Builder::new()
                .name("vhost-config".into())
                .spawn(move || action());
        }
        Ok(0)
    }
}

/// The thread serving the backend's requests (the BACKEND_REQ channel).
struct BackendChannel {
    /// A duplicate of our end of the channel: shutting it down ends the thread.
    shutdown: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl BackendChannel {
    fn start(
        name: &str,
        frontend: &mut Frontend,
        notifier: Arc<ConfigNotifier>,
        reply_ack: bool,
    ) -> Result<Self, VhostUserError> {
        let err = |step: &'static str| {
            let device = name.to_string();
            move |source| VhostUserError::Protocol {
                device,
                step,
                source,
            }
        };
        let mut handler = FrontendReqHandler::new(notifier)
            .map_err(|e| err("backend channel")(vhost::Error::VhostUserProtocol(e)))?;
        handler.set_reply_ack_flag(reply_ack);
        // SAFETY: the handler owns this fd for as long as it lives; we only borrow it here
        // to duplicate it.
        let tx = unsafe { BorrowedFd::borrow_raw(handler.get_tx_raw_fd()) };
        let shutdown = tx
            .try_clone_to_owned()
            .map_err(|e| VhostUserError::Protocol {
                device: name.to_string(),
                step: "backend channel",
                source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketError(e)),
            })?;
        frontend
            .set_backend_request_fd(&shutdown.as_raw_fd())
            .map_err(err("SET_BACKEND_REQ_FD"))?;
        let device = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-backend-req"))
            .spawn(move || loop {
                match handler.handle_request() {
                    Ok(_) => {}
                    Err(vhost::vhost_user::Error::Disconnected)
                    | Err(vhost::vhost_user::Error::PartialMessage) => return,
                    Err(e) => {
                        tracing::debug!(device = %device, "backend channel ends: {e}");
                        return;
                    }
                }
            })
            .map_err(|e| VhostUserError::Protocol {
                device: name.to_string(),
                step: "backend channel thread",
                source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketError(e)),
            })?;
        Ok(BackendChannel {
            shutdown,
            thread: Some(thread),
        })
    }
}

impl Drop for BackendChannel {
    fn drop(&mut self) {
        // SAFETY: shutdown on a socket fd we own.
        unsafe { libc::shutdown(self.shutdown.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VhostUserError {
    #[error("vhost-user {step} with {device}: {source}")]
    Protocol {
        device: String,
        step: &'static str,
        #[source]
        source: vhost::Error,
    },
    #[error("{device}: the backend does not offer {what}")]
    Missing { device: String, what: &'static str },
    #[error("{device}: the backend has {have} queues, the device needs {want}")]
    Queues {
        device: String,
        have: u64,
        want: usize,
    },
    #[error("{device}: queue {queue} is not in guest RAM")]
    QueueMemory { device: String, queue: usize },
    #[error("{device}: the backend left a vhost-user request unanswered for {REPLY_TIMEOUT:?}")]
    Unanswered { device: String },
}

impl VhostUserError {
    /// Whether the backend broke the protocol (a malformed or mismatched reply), as
    /// opposed to going away or lacking a feature.
    fn is_violation(&self) -> bool {
        use vhost::vhost_user::Error as E;
        match self {
            VhostUserError::Protocol { source, .. } => matches!(
                source,
                vhost::Error::VhostUserProtocol(
                    E::InvalidMessage | E::OversizedMsg | E::IncorrectFds
                )
            ),
            VhostUserError::Unanswered { .. } => true,
            _ => false,
        }
    }
}

/// A queue as it was started, for replay.
struct StartedQueue {
    index: usize,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    kick: EventFd,
    call: EventFd,
}

/// The driver's side of the device once it is running.
struct Active {
    features: u64,
    queues: Vec<StartedQueue>,
}

pub struct VhostUserDevice {
    name: String,
    device_type: u16,
    num_queues: usize,
    queue_max_size: u16,
    frontend: Frontend,
    /// Device features offered to the driver (without the vhost-user protocol bit).
    features: u64,
    /// Whether the backend speaks the protocol-features extension (then rings start
    /// disabled and need SET_VRING_ENABLE).
    protocol_features: bool,
    config: Vec<u8>,
    memory: GuestMemoryMmap,
    active: Option<Active>,
    /// Per ring: enabled (SET_VRING_ENABLE), kept for replays. All are, unless the device
    /// says otherwise (virtio-net's queue pairs the guest does not use).
    ring_enabled: Vec<bool>,
    notifier: Arc<ConfigNotifier>,
    backend_channel: Option<BackendChannel>,
    /// The backend logs its writes to guest memory (LOG_SHMFD negotiated).
    can_log: bool,
    /// While a migration runs: the log, re-armed on a backend that restarts.
    logging: Option<LogShare>,
    /// A backend restarted while a migration logged cannot log: its writes since went
    /// unseen, so the migration must fail rather than leave a stale destination.
    log_lost: bool,
    /// The queues were stopped for a migration (GET_VRING_BASE).
    stopped: bool,
    /// The frontend's socket, for the deadline that bounds each exchange.
    socket: Arc<OwnedFd>,
    on_violation: Option<ViolationHook>,
}

impl VhostUserDevice {
    /// Take over `stream`, negotiate, and read the device configuration (`config_size`
    /// bytes; 0: the device keeps its configuration space itself, as virtio-net does, and
    /// the backend need not speak GET_CONFIG). `num_queues` queues of up to
    /// `queue_max_size` entries are exposed.
    pub fn connect(
        name: &str,
        device_type: u16,
        stream: UnixStream,
        num_queues: usize,
        queue_max_size: u16,
        config_size: usize,
        memory: GuestMemoryMmap,
    ) -> Result<Self, VhostUserError> {
        let socket = socket_of(name, &stream)?;
        let mut frontend = Frontend::from_stream(stream, num_queues as u64);
        let notifier = Arc::new(ConfigNotifier::default());
        let armed = deadline::arm(&socket, REPLY_TIMEOUT);
        let (features, protocol, config, backend_channel) = within(name, &armed, || {
            let (features, protocol, config) =
                handshake(name, &mut frontend, num_queues, config_size)?;
            let channel = start_backend_channel(name, &mut frontend, protocol, &notifier)?;
            Ok((features, protocol, config, channel))
        })?;
        drop(armed);
        Ok(VhostUserDevice {
            socket,
            on_violation: None,
            can_log: protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD),
            logging: None,
            log_lost: false,
            stopped: false,
            notifier,
            backend_channel,
            name: name.to_string(),
            device_type,
            num_queues,
            queue_max_size,
            frontend,
            features,
            protocol_features: true,
            config,
            memory,
            active: None,
            ring_enabled: vec![true; num_queues],
        })
    }

    /// Where to report a backend that breaks the protocol or goes silent (its process is
    /// then stopped for good); set again for each new process.
    pub fn on_violation(&mut self, hook: ViolationHook) {
        self.on_violation = Some(hook);
    }

    /// Run one exchange with the backend under [`REPLY_TIMEOUT`], and report a violation.
    fn bounded<T>(
        &mut self,
        exchange: impl FnOnce(&mut Self) -> Result<T, VhostUserError>,
    ) -> Result<T, VhostUserError> {
        let armed = deadline::arm(&self.socket, REPLY_TIMEOUT);
        let name = self.name.clone();
        let result = within(&name, &armed, || exchange(self));
        drop(armed);
        if let Err(e) = &result {
            tracing::warn!(device = %self.name, "{e}");
            if let (true, Some(hook)) = (e.is_violation(), &self.on_violation) {
                hook(&e.to_string());
            }
        }
        result
    }

    /// Where the backend's configuration-change notifications go.
    pub fn config_notifier(&self) -> Arc<ConfigNotifier> {
        self.notifier.clone()
    }

    /// Continue on a new connection (the backend process was restarted): negotiate again
    /// and, if the driver had started the device, replay its setup.
    pub fn reconnect(&mut self, stream: UnixStream) -> Result<(), VhostUserError> {
        self.socket = socket_of(&self.name, &stream)?;
        self.bounded(|this| this.reconnect_on(stream))
    }

    fn reconnect_on(&mut self, stream: UnixStream) -> Result<(), VhostUserError> {
        let mut frontend = Frontend::from_stream(stream, self.num_queues as u64);
        let (features, protocol, _config) = handshake(
            &self.name,
            &mut frontend,
            self.num_queues,
            self.config.len(),
        )?;
        // The old channel's thread ends before the new one starts.
        self.backend_channel = None;
        self.backend_channel =
            start_backend_channel(&self.name, &mut frontend, protocol, &self.notifier)?;
        if features != self.features {
            tracing::warn!(device = %self.name,
                "the restarted backend offers features {features:#x} instead of {:#x}",
                self.features);
        }
        self.frontend = frontend;
        self.protocol_features = true;
        self.can_log = protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD);
        if self.logging.is_some() && !self.can_log {
            tracing::error!(device = %self.name,
                "the restarted backend cannot log its writes: the migration will fail");
            self.log_lost = true;
        }
        if let Some(active) = self.active.take() {
            let result = self.start(&active, true);
            self.active = Some(active);
            result?;
        }
        Ok(())
    }

    /// Enable or disable ring `index` (the backend neither takes nor posts buffers on a
    /// disabled one); kept for replays.
    pub fn set_ring_enabled(&mut self, index: usize, enabled: bool) -> Result<(), VhostUserError> {
        let Some(slot) = self.ring_enabled.get_mut(index) else {
            return Ok(());
        };
        if *slot == enabled {
            return Ok(());
        }
        *slot = enabled;
        let started = self
            .active
            .as_ref()
            .is_some_and(|a| a.queues.iter().any(|q| q.index == index));
        if started && self.protocol_features {
            self.bounded(|this| {
                this.frontend
                    .set_vring_enable(index, enabled)
                    .map_err(this.step("SET_VRING_ENABLE"))
            })?;
        }
        Ok(())
    }

    /// Re-read the device configuration (after the backend reported a change).
    pub fn refresh_config(&mut self) -> Result<(), VhostUserError> {
        if !self.config.is_empty() {
            self.config = self
                .bounded(|this| read_config(&this.name, &mut this.frontend, this.config.len()))?;
        }
        Ok(())
    }

    fn step(&self, step: &'static str) -> impl FnOnce(vhost::Error) -> VhostUserError + '_ {
        move |source| VhostUserError::Protocol {
            device: self.name.clone(),
            step,
            source,
        }
    }

    /// Send the memory table and every queue. `resume`: the queues continue from the used
    /// index in guest memory instead of from zero.
    fn start(&mut self, active: &Active, resume: bool) -> Result<(), VhostUserError> {
        let logging = self.logging.clone().filter(|_| self.can_log);
        self.frontend
            .set_features(self.backend_features(active))
            .map_err(self.step("SET_FEATURES"))?;
        let regions = self
            .memory
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(self.step("memory region"))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(self.step("SET_MEM_TABLE"))?;
        if let Some(log) = &logging {
            self.send_log_base(log)?;
        }
        for q in &active.queues {
            let host = |gpa: u64| {
                self.memory
                    .get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| VhostUserError::QueueMemory {
                        device: self.name.clone(),
                        queue: q.index,
                    })
            };
            let ring = VringConfigData {
                queue_max_size: self.queue_max_size,
                queue_size: q.size,
                flags: if logging.is_some() {
                    VHOST_VRING_F_LOG
                } else {
                    0
                },
                desc_table_addr: host(q.desc)?,
                used_ring_addr: host(q.used)?,
                avail_ring_addr: host(q.avail)?,
                log_addr: logging.as_ref().map(|_| q.used),
            };
            let base = if resume {
                // struct virtq_used { le16 flags; le16 idx; ... }
                self.memory
                    .read_obj::<u16>(GuestAddress(q.used + 2))
                    .map_err(|_| VhostUserError::QueueMemory {
                        device: self.name.clone(),
                        queue: q.index,
                    })?
            } else {
                0
            };
            self.frontend
                .set_vring_num(q.index, q.size)
                .map_err(self.step("SET_VRING_NUM"))?;
            self.frontend
                .set_vring_addr(q.index, &ring)
                .map_err(self.step("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(q.index, base)
                .map_err(self.step("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(q.index, &q.call)
                .map_err(self.step("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(q.index, &q.kick)
                .map_err(self.step("SET_VRING_KICK"))?;
            if self.protocol_features {
                let enabled = self.ring_enabled.get(q.index).copied().unwrap_or(true);
                self.frontend
                    .set_vring_enable(q.index, enabled)
                    .map_err(self.step("SET_VRING_ENABLE"))?;
            }
            if resume {
                // Requests the guest queued while the backend was down: look again.
                let _ = q.kick.write(1);
            }
        }
        Ok(())
    }
}

impl VhostUserDevice {
    fn send_log_base(&mut self, log: &LogShare) -> Result<(), VhostUserError> {
        let region = VhostUserDirtyLogRegion {
            mmap_size: log.size,
            mmap_offset: 0,
            mmap_handle: log.fd.as_raw_fd(),
        };
        self.frontend
            .set_log_base(0, Some(region))
            .map_err(self.step("SET_LOG_BASE"))
    }

    /// Start (`Some`) or stop logging the backend's writes into the migration's log. A
    /// running device is told at once (its features gain or lose VHOST_F_LOG_ALL).
    pub fn set_logging(&mut self, log: Option<LogShare>) -> Result<(), VhostUserError> {
        if log.is_some() && !self.can_log {
            return Err(VhostUserError::Missing {
                device: self.name.clone(),
                what: "dirty logging (LOG_SHMFD)",
            });
        }
        self.logging = log;
        self.log_lost = false;
        let Some(active) = &self.active else {
            return Ok(());
        };
        let features = self.backend_features(active);
        self.bounded(|this| {
            if let Some(log) = this.logging.clone() {
                this.send_log_base(&log)?;
            }
            this.frontend
                .set_features(features)
                .map_err(this.step("SET_FEATURES"))
        })
    }

    /// The features SET_FEATURES gives the backend: the driver's, the protocol-features
    /// bit, and VHOST_F_LOG_ALL while a migration logs.
    fn backend_features(&self, active: &Active) -> u64 {
        let mut features = active.features;
        if self.protocol_features {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        if self.logging.is_some() && self.can_log {
            features |= VHOST_F_LOG_ALL;
        }
        features
    }

    /// Stop every queue (GET_VRING_BASE): the backend finishes or gives back what it
    /// holds, and writes nothing more until it is started again.
    fn stop_queues(&mut self) -> Result<(), VhostUserError> {
        let Some(active) = &self.active else {
            return Ok(());
        };
        let indices: Vec<usize> = active.queues.iter().map(|q| q.index).collect();
        for index in indices {
            self.frontend
                .get_vring_base(index)
                .map_err(self.step("GET_VRING_BASE"))?;
        }
        self.stopped = true;
        Ok(())
    }
}

fn read_config(
    name: &str,
    frontend: &mut Frontend,
    size: usize,
) -> Result<Vec<u8>, VhostUserError> {
    let buf = vec![0u8; size];
    let (_, config) = frontend
        .get_config(0, size as u32, VhostUserConfigFlags::empty(), &buf)
        .map_err(|source| VhostUserError::Protocol {
            device: name.to_string(),
            step: "GET_CONFIG",
            source,
        })?;
    Ok(config)
}

/// SET_OWNER, features, protocol features, queue count and configuration.
fn handshake(
    name: &str,
    frontend: &mut Frontend,
    num_queues: usize,
    config_size: usize,
) -> Result<(u64, VhostUserProtocolFeatures, Vec<u8>), VhostUserError> {
    let err = |step: &'static str| {
        move |source| VhostUserError::Protocol {
            device: name.to_string(),
            step,
            source,
        }
    };
    frontend.set_owner().map_err(err("SET_OWNER"))?;
    let offered = frontend.get_features().map_err(err("GET_FEATURES"))?;
    let protocol_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    if offered & protocol_bit == 0 {
        return Err(VhostUserError::Missing {
            device: name.to_string(),
            what: "protocol features (needed for GET_CONFIG)",
        });
    }
    // The features themselves are set at activation, when the driver has chosen them
    // (some backends refuse a SET_FEATURES without VERSION_1 before that).
    let protocol = frontend
        .get_protocol_features()
        .map_err(err("GET_PROTOCOL_FEATURES"))?;
    if config_size > 0 && !protocol.contains(VhostUserProtocolFeatures::CONFIG) {
        return Err(VhostUserError::Missing {
            device: name.to_string(),
            what: "the CONFIG protocol feature",
        });
    }
    let protocol = protocol & wanted_protocol_features();
    frontend
        .set_protocol_features(protocol)
        .map_err(err("SET_PROTOCOL_FEATURES"))?;
    if num_queues > 1 {
        if !protocol.contains(VhostUserProtocolFeatures::MQ) {
            return Err(VhostUserError::Missing {
                device: name.to_string(),
                what: "multiqueue",
            });
        }
        let have = frontend.get_queue_num().map_err(err("GET_QUEUE_NUM"))?;
        if have < num_queues as u64 {
            return Err(VhostUserError::Queues {
                device: name.to_string(),
                have,
                want: num_queues,
            });
        }
    }
    let config = if config_size > 0 {
        read_config(name, frontend, config_size)?
    } else {
        Vec::new()
    };
    // VHOST_F_LOG_ALL is the frontend's business (migration), never the guest's.
    Ok((offered & !protocol_bit & !VHOST_F_LOG_ALL, protocol, config))
}

/// Our own handle of `stream`'s socket, for deadlines.
fn socket_of(name: &str, stream: &UnixStream) -> Result<Arc<OwnedFd>, VhostUserError> {
    stream
        .try_clone()
        .map(|s| Arc::new(OwnedFd::from(s)))
        .map_err(|e| VhostUserError::Protocol {
            device: name.to_string(),
            step: "socket",
            source: vhost::Error::VhostUserProtocol(vhost::vhost_user::Error::SocketError(e)),
        })
}

/// Run `exchange` under `armed`: if the deadline fired meanwhile, whatever error the shut
/// socket caused is the backend's silence.
fn within<T>(
    name: &str,
    armed: &deadline::Armed,
    exchange: impl FnOnce() -> Result<T, VhostUserError>,
) -> Result<T, VhostUserError> {
    match exchange() {
        Err(_) if armed.fired() => Err(VhostUserError::Unanswered {
            device: name.to_string(),
        }),
        result => result,
    }
}

/// The backend channel, if the backend speaks it.
fn start_backend_channel(
    name: &str,
    frontend: &mut Frontend,
    protocol: VhostUserProtocolFeatures,
    notifier: &Arc<ConfigNotifier>,
) -> Result<Option<BackendChannel>, VhostUserError> {
    if !protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
        return Ok(None);
    }
    let reply_ack = protocol.contains(VhostUserProtocolFeatures::REPLY_ACK);
    BackendChannel::start(name, frontend, notifier.clone(), reply_ack).map(Some)
}

impl VirtioBackend for VhostUserDevice {
    fn device_type(&self) -> u16 {
        self.device_type
    }

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn queue_max_size(&self) -> u16 {
        self.queue_max_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let Some(end) = start.checked_add(data.len()) else {
            return;
        };
        if end > self.config.len() {
            return;
        }
        let written = self.bounded(|this| {
            this.frontend
                .set_config(start as u32, VhostUserConfigFlags::WRITABLE, data)
                .map_err(this.step("SET_CONFIG"))
        });
        match written {
            Ok(()) => self.config[start..end].copy_from_slice(data),
            Err(e) => tracing::warn!(device = %self.name, "{e}"),
        }
    }

    fn activate(&mut self, activation: Activation<'_>) -> Result<(), VirtioError> {
        let active = Active {
            features: activation.features,
            queues: activation
                .queues
                .into_iter()
                .map(|q| StartedQueue {
                    index: q.index,
                    size: q.size,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                    kick: q.kick,
                    call: q.call,
                })
                .collect(),
        };
        self.bounded(|this| {
            // Started already (a driver that skipped the reset): stop the queues first,
            // or the backend would serve each one twice.
            if this.active.is_some() && !this.stopped {
                this.stop_queues()?;
            }
            this.start(&active, activation.resume)
        })
        .map_err(|e| VirtioError::Backend(e.to_string()))?;
        self.stopped = false;
        self.active = Some(active);
        Ok(())
    }

    fn migration_blocker(&self) -> Option<String> {
        (!self.can_log).then(|| format!("{}: its backend cannot log its writes", self.name))
    }

    /// The queues stop; their state is in guest memory (the used rings), where the
    /// destination's backend starts from.
    fn save_state(&mut self) -> Result<Vec<u8>, crate::snapshot::SnapshotError> {
        if self.log_lost {
            return Err(crate::snapshot::SnapshotError::Encode {
                what: "a vhost-user device",
                message: format!(
                    "{}: its backend was restarted without dirty logging, so its writes \
                     since are unknown",
                    self.name
                ),
            });
        }
        self.bounded(Self::stop_queues)
            .map_err(|e| crate::snapshot::SnapshotError::Encode {
                what: "a vhost-user device",
                message: e.to_string(),
            })?;
        Ok(Vec::new())
    }

    fn resume_after_save(&mut self) {
        if !std::mem::take(&mut self.stopped) {
            return;
        }
        if let Some(active) = self.active.take() {
            if let Err(e) = self.bounded(|this| this.start(&active, true)) {
                tracing::error!(device = %self.name, "cannot restart the queues: {e}");
            }
            self.active = Some(active);
        }
    }

    fn as_vhost_user(&mut self) -> Option<&mut VhostUserDevice> {
        Some(self)
    }

    fn reset(&mut self) {
        self.stopped = false;
        let Some(active) = self.active.take() else {
            return;
        };
        let stopped = self.bounded(|this| {
            for q in &active.queues {
                // GET_VRING_BASE stops the ring in the backend.
                this.frontend
                    .get_vring_base(q.index)
                    .map_err(this.step("GET_VRING_BASE"))?;
            }
            Ok(())
        });
        if let Err(e) = stopped {
            tracing::warn!(device = %self.name, "stopping the queues at reset: {e}");
        }
    }
}
