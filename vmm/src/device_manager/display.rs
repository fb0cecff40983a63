//! The display: the `bochs-display` adapter, the VNC server `-vnc` asks for, and the
//! `vmm-display` process that serves both (started once the machine's devices are in,
//! restarted like any device process). screendump, set_password, expire_password,
//! add_client and query-vnc as QEMU 7.2 has them, and the VNC events.
//!
//! The framebuffer is the adapter's memfd, so a restarted process shows the same screen;
//! the password and its expiry live here and are given to every new process.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ipc::display::{
    DisplayChannel, DisplayConfig, DisplayEvent, DisplayReply, DisplayRequest, Expiry, ImageFormat,
    InputKind, VncAuth, VncClient, VncConfig,
};
use ipc::DeviceKind;
use qmp::EventSender;
use serde_json::{json, Map, Value};

use super::process::{self, Misbehaved, SupervisedDevice, Supervision, WatchSink};
use super::{lock, DeviceConfig, DeviceError, DeviceManager, SETUP_TIMEOUT};
use crate::devices::bochs_display::{self, BochsDisplay};
use crate::devices::i8042::I8042;
use crate::pci::PciDevice;
use crate::snapshot::{decode, encode, SnapshotError, Snapshottable};
use crate::supervisor::VhostUserListener;
use crate::virtio::input::{self, VirtioInput};
use crate::virtio::pci::VirtioPciDevice;
use crate::virtio::vhost_user::VhostUserDevice;
use crate::virtio::VirtioBackend;
use crate::vnc::VncOptions;

/// PCI class of an input device (input, other), as QEMU gives virtio-input.
const CLASS_INPUT_OTHER: (u8, u8) = (0x09, 0x80);

/// A virtio-input device, whose queues vmm-display serves on `listener`.
pub(super) struct InputDevice {
    kind: InputKind,
    /// `virtio-input[ID]`, for logs.
    name: String,
    listener: VhostUserListener,
    function: Arc<Mutex<VirtioPciDevice>>,
    slot: u8,
    /// query-mice's index (PS/2's is 2; QEMU numbers mice in creation order).
    mouse_index: u32,
}

type SharedInputs = Arc<Mutex<Vec<InputDevice>>>;

/// Have the display process serve `input`'s queues, and connect its frontend: a fresh
/// vhost-user device, or the existing one reconnected (after a restart).
fn connect_input(
    control: &mut DisplayChannel,
    process: &crate::supervisor::DeviceProcess,
    input: &InputDevice,
    memory: &crate::memory::GuestMemoryMmap,
) -> Result<(), DeviceError> {
    let process_name = process.name();
    let request = DisplayRequest::AddInput { kind: input.kind };
    match process::setup_call(process_name, control, request, &[input.listener.as_fd()])? {
        DisplayReply::Done => {}
        other => return Err(process::unexpected(process_name, "AddInput", &other)),
    }
    let stream = input
        .listener
        .connect()
        .map_err(|e| crate::supervisor::SupervisorError::Sockets(input.name.clone(), e))?;
    let mut function = lock(&input.function);
    let backend = function
        .backend_mut()
        .as_input()
        .ok_or_else(|| DeviceError::Display(format!("{}: not an input device", input.name)))?;
    match backend.as_vhost_user() {
        Some(vhost) => {
            vhost.on_violation(process::violation_hook(process));
            vhost.reconnect(stream)?
        }
        None => {
            let mut vhost = VhostUserDevice::connect(
                &input.name,
                input::VIRTIO_ID_INPUT,
                stream,
                2,
                input::QUEUE_SIZE,
                0,
                memory.clone(),
            )?;
            vhost.on_violation(process::violation_hook(process));
            backend.attach(vhost);
        }
    }
    Ok(())
}

/// The display's parts, as the device manager keeps them.
#[derive(Default)]
pub(super) struct Display {
    pub(super) adapter: Option<Arc<Mutex<BochsDisplay>>>,
    vnc: Option<VncOptions>,
    /// The PS/2 keyboard and mouse that VNC input reaches.
    input: Option<Arc<Mutex<I8042>>>,
    pub(super) process: Option<Arc<Mutex<DisplayProcess>>>,
    /// The process was started: display devices can no longer be added.
    started: bool,
    /// The PS/2 mouse buttons HMP's mouse_button last set.
    mouse_buttons: std::sync::atomic::AtomicU8,
    /// virtio-input devices, served by the display process.
    inputs: SharedInputs,
    /// QEMU's input-handler index of the next input device.
    next_mouse_index: u32,
    /// The state shared with the display process: the adapter's mode, the keyboard LEDs.
    page: Option<Arc<crate::memory::DeviceMemory>>,
}

impl Display {
    fn page(&mut self) -> Result<Arc<crate::memory::DeviceMemory>, DeviceError> {
        if let Some(page) = &self.page {
            return Ok(page.clone());
        }
        let page = bochs_display::new_scanout_page()
            .map_err(|e| DeviceError::Display(format!("display state page: {e}")))?;
        self.page = Some(page.clone());
        Ok(page)
    }
}

/// What QMP says of the VNC server.
#[derive(Debug, Clone)]
struct ServerInfo {
    host: String,
    service: String,
    family: String,
    auth: &'static str,
}

impl ServerInfo {
    fn json(&self) -> Value {
        json!({
            "auth": self.auth,
            "family": self.family,
            "service": self.service,
            "host": self.host,
            "websocket": false,
        })
    }
}

fn client_json(c: &VncClient) -> Value {
    json!({
        "family": c.family,
        "service": c.service,
        "host": c.host,
        "websocket": c.websocket,
    })
}

/// The `vmm-display` process and what a new one needs.
pub(super) struct DisplayProcess {
    supervision: Supervision,
    control: DisplayChannel,
    config: DisplayConfig,
    /// VRAM, scanout page, listener: what every new process gets.
    fds: Vec<OwnedFd>,
    server: Option<ServerInfo>,
    input: Option<Arc<Mutex<I8042>>>,
    events: Arc<Mutex<EventSender>>,
    inputs: SharedInputs,
    memory: crate::memory::GuestMemoryMmap,
}

const EVENT_VNC_CONNECTED: &str = "VNC_CONNECTED";
const EVENT_VNC_INITIALIZED: &str = "VNC_INITIALIZED";
const EVENT_VNC_DISCONNECTED: &str = "VNC_DISCONNECTED";

fn start_display_process(
    name: &str,
    config: &DisplayConfig,
    fds: &[OwnedFd],
) -> Result<(crate::supervisor::DeviceProcess, DisplayChannel), DeviceError> {
    let (process, mut control) = process::start::<DisplayRequest, DisplayReply, DisplayEvent>(
        name,
        "vmm-display",
        &[],
        DeviceKind::Display,
    )?;
    let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    match process::setup_call(
        name,
        &mut control,
        DisplayRequest::Attach(config.clone()),
        &fds,
    )? {
        DisplayReply::Done => Ok((process, control)),
        other => Err(process::unexpected(name, "Attach", &other)),
    }
}

impl DisplayProcess {
    /// The VNC password: kept for a restarted process, and given to this one
    /// (`disconnect`: its clients are dropped).
    fn set_password(&mut self, password: String, disconnect: bool) -> Result<(), DeviceError> {
        if let Some(vnc) = &mut self.config.vnc {
            vnc.password = Some(password.clone());
        }
        self.call(
            DisplayRequest::SetPassword {
                password,
                disconnect,
            },
            &[],
        )
        .map(drop)
    }

    /// When the password stops working, kept and given as the password is.
    fn set_expiry(&mut self, expiry: Expiry) -> Result<(), DeviceError> {
        if let Some(vnc) = &mut self.config.vnc {
            vnc.expiry = expiry;
        }
        self.call(DisplayRequest::ExpirePassword(expiry), &[])
            .map(drop)
    }

    /// A request, and its reply; events that came meanwhile are acted on.
    fn call(
        &mut self,
        request: DisplayRequest,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<DisplayReply, DeviceError> {
        if !self.supervision.running() {
            return Err(DeviceError::Display(
                "the display process is not running".into(),
            ));
        }
        let result = self
            .control
            .call(request, fds, SETUP_TIMEOUT)
            .map(|(reply, _)| reply)
            .map_err(|e| process::ipc_error(&self.supervision.name, e));
        while let Some((event, _)) = self.control.take_event() {
            self.act_on(event);
        }
        result
    }

    fn act_on(&self, event: DisplayEvent) {
        let vnc_event = |name: &str, client: &VncClient| {
            let Some(server) = &self.server else {
                return;
            };
            let mut data = Map::new();
            data.insert("server".into(), server.json());
            data.insert("client".into(), client_json(client));
            lock(&self.events).emit(name, Some(data));
        };
        match event {
            DisplayEvent::Key { scancodes } => {
                if let Some(input) = &self.input {
                    lock(input).key_event_set1(&scancodes);
                }
            }
            DisplayEvent::Pointer {
                dx,
                dy,
                dz,
                buttons,
            } => {
                if let Some(input) = &self.input {
                    lock(input).mouse_event(dx, dy, dz, buttons);
                }
            }
            DisplayEvent::Connected(c) => vnc_event(EVENT_VNC_CONNECTED, &c),
            DisplayEvent::Initialized(c) => vnc_event(EVENT_VNC_INITIALIZED, &c),
            DisplayEvent::Disconnected(c) => vnc_event(EVENT_VNC_DISCONNECTED, &c),
        }
    }
}

impl DisplayProcess {
    /// A local migration handed the VRAM over (`fd`, adopted by the adapter already): a
    /// new process maps it.
    pub(super) fn adopt_vram(&mut self, fd: OwnedFd) -> Result<(), DeviceError> {
        // The fds: the state page, then the VRAM.
        if self.config.vram_size == 0 || self.fds.len() < 2 {
            return Err(DeviceError::Display(
                "the display process has no VRAM".into(),
            ));
        }
        self.fds[1] = fd;
        self.supervision.replace(super::local::HANDED_OVER);
        Ok(())
    }
}

impl SupervisedDevice for DisplayProcess {
    fn supervision(&self) -> &Supervision {
        &self.supervision
    }

    fn supervision_mut(&mut self) -> &mut Supervision {
        &mut self.supervision
    }

    fn control_fd(&self) -> RawFd {
        self.control.socket().as_raw_fd()
    }

    fn serves(&self) -> String {
        "display".into()
    }

    fn control_message(&mut self, _sink: &dyn WatchSink) -> Result<(), Misbehaved> {
        while let Some((event, _)) = self.control.take_event() {
            self.act_on(event);
        }
        if let Some(event) = process::receive_event(&mut self.control, &mut self.supervision)? {
            self.act_on(event);
        }
        Ok(())
    }

    /// A new process on the same framebuffer and listeners, with the password as it is,
    /// serving the input devices again.
    fn respawn(&mut self) -> Result<(), DeviceError> {
        let name = self.supervision.name.clone();
        let (process, mut control) = start_display_process(&name, &self.config, &self.fds)?;
        for input in lock(&self.inputs).iter() {
            connect_input(&mut control, &process, input, &self.memory)?;
        }
        self.control = control;
        self.supervision.replaced(process);
        Ok(())
    }
}

/// The display's section of a migration: the adapter (mode and framebuffer) and the VNC
/// password with its expiry, which the destination takes when its own VNC server asks for
/// a password too (QEMU leaves that to management; moving it means a client reconnecting
/// to the destination uses the password it used before).
pub(super) struct DisplaySection {
    adapter: Arc<Mutex<BochsDisplay>>,
    process: Option<Arc<Mutex<DisplayProcess>>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct DisplayState {
    adapter: Vec<u8>,
    vnc_password: Option<(String, Expiry)>,
}

const DISPLAY_SNAPSHOT: &str = "the display";

impl Snapshottable for DisplaySection {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        let adapter = lock(&self.adapter).save()?;
        let vnc_password = self.process.as_ref().and_then(|p| {
            let p = lock(p);
            let vnc = p.config.vnc.as_ref()?;
            Some((vnc.password.clone()?, vnc.expiry))
        });
        encode(
            DISPLAY_SNAPSHOT,
            &DisplayState {
                adapter,
                vnc_password,
            },
        )
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let s: DisplayState = decode(DISPLAY_SNAPSHOT, state)?;
        lock(&self.adapter).restore(&s.adapter)?;
        let (Some((password, expiry)), Some(process)) = (s.vnc_password, &self.process) else {
            return Ok(());
        };
        let mut p = lock(process);
        if !matches!(&p.config.vnc, Some(v) if v.auth == VncAuth::Password) {
            return Ok(());
        }
        // Both are kept even if the process does not take them now.
        let set = p.set_password(password, false);
        let set = set.and(p.set_expiry(expiry));
        if let Err(e) = set {
            // The process is restarted with the configuration, password included.
            tracing::warn!("migration: the display process did not take the password: {e}");
        }
        Ok(())
    }
}

/// `expire_password`'s time: `now`, `never`, `+N` (seconds from now) or `N` (seconds
/// since the epoch). Like QEMU 7.2, anything else reads as 0: expired.
pub fn parse_expiry(time: &str, now: u64) -> Expiry {
    match time {
        "now" => Expiry::At(now),
        "never" => Expiry::Never,
        _ => match time.strip_prefix('+') {
            Some(rel) => Expiry::At(now.saturating_add(rel.parse().unwrap_or(0))),
            None => Expiry::At(time.parse().unwrap_or(0)),
        },
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// QEMU's size syntax for `vgamem`: bytes, or a number with a K, M or G suffix.
fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 10),
        (i, 'm' | 'M') => (&text[..i], 20),
        (i, 'g' | 'G') => (&text[..i], 30),
        _ => (text, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

impl DeviceManager {
    /// Where VNC keys and pointer motion go.
    pub fn set_keyboard(&mut self, input: Arc<Mutex<I8042>>) {
        self.display.input = Some(input);
    }

    /// The VNC server `-vnc` asked for.
    pub fn set_vnc(&mut self, vnc: Option<VncOptions>) {
        self.display.vnc = vnc;
    }

    /// `-device bochs-display[,vgamem=SIZE]`.
    pub(super) fn add_bochs_display(
        &mut self,
        cfg: &DeviceConfig,
    ) -> Result<Option<u8>, DeviceError> {
        if self.display.started {
            return Err(DeviceError::Display(format!(
                "Device '{}' can not be hotplugged on this machine",
                cfg.driver
            )));
        }
        if self.display.adapter.is_some() {
            return Err(DeviceError::Display(
                "only one display adapter is supported".into(),
            ));
        }
        let vgamem = match cfg.properties.get("vgamem") {
            Some(text) => parse_size(text).ok_or_else(|| DeviceError::InvalidProperty {
                driver: cfg.driver.clone(),
                property: "vgamem".into(),
                value: text.clone(),
            })?,
            None => bochs_display::DEFAULT_VGAMEM,
        };
        let size =
            bochs_display::vram_size(vgamem).map_err(|e| DeviceError::Display(e.to_string()))?;
        let slot = cfg.pci_slot()?;
        let page = self.display.page()?;
        let adapter = BochsDisplay::new(cfg.id.clone(), size, self.accel.clone(), page)
            .map_err(|e| DeviceError::Display(e.to_string()))?;
        let adapter = Arc::new(Mutex::new(adapter));
        let slot =
            lock(&self.pci).add_device(slot, adapter.clone() as Arc<Mutex<dyn PciDevice>>)?;
        self.functions.insert(
            slot,
            super::PluggedFunction {
                driver: cfg.driver.clone(),
                id: cfg.id.clone(),
                function: super::PciFunction::Display(adapter.clone()),
            },
        );
        self.display.adapter = Some(adapter);
        Ok(Some(slot))
    }

    /// Start `vmm-display` if there is anything to display or a VNC server to run: once,
    /// after the command line's devices.
    pub fn start_display(&mut self) -> Result<(), DeviceError> {
        self.display.started = true;
        if self.display.adapter.is_none()
            && self.display.vnc.is_none()
            && lock(&self.display.inputs).is_empty()
        {
            return Ok(());
        }
        let share = |file: &std::fs::File| {
            file.as_fd()
                .try_clone_to_owned()
                .map_err(|e| DeviceError::Display(format!("cannot share the framebuffer: {e}")))
        };
        // The state page, then the VRAM if there is an adapter, then the listener.
        let page = self.display.page()?;
        let mut fds = vec![share(page.file())?];
        let mut vram_size = 0;
        if let Some(adapter) = &self.display.adapter {
            let adapter = lock(adapter);
            vram_size = adapter.vram().len() as u64;
            fds.push(share(adapter.vram().file())?);
        }
        // The PS/2 keyboard's LEDs go to the page (VNC clients see them).
        if let Some(input) = &self.display.input {
            // SAFETY: the page stays mapped for as long as `page`, which the listener
            // holds; mmap returns page-aligned memory.
            let view = unsafe { ipc::display::Scanout::new(page.as_ptr()) };
            let holder = page.clone();
            let listener: crate::devices::i8042::LedListener = Arc::new(move |leds| {
                let _ = &holder;
                view.set_leds(leds);
            });
            let mut input = lock(input);
            listener(input.keyboard_leds());
            input.set_led_listener(listener);
        }
        let mut server = None;
        let vnc = match &self.display.vnc {
            Some(options) => {
                let listener = options.listen().map_err(|e| {
                    DeviceError::Display(format!("Failed to start VNC server: {e}"))
                })?;
                fds.push(listener.fd);
                let info = ServerInfo {
                    host: listener.host,
                    service: listener.service,
                    family: listener.family,
                    auth: options.auth_name(),
                };
                let config = VncConfig {
                    auth: if options.password {
                        VncAuth::Password
                    } else {
                        VncAuth::None
                    },
                    host: info.host.clone(),
                    service: info.service.clone(),
                    family: info.family.clone(),
                    name: "QEMU".into(),
                    password: None,
                    expiry: Expiry::Never,
                };
                server = Some(info);
                Some(config)
            }
            None => None,
        };
        let config = DisplayConfig { vram_size, vnc };
        let name = "vmm-display".to_string();
        let (process, mut control) = start_display_process(&name, &config, &fds)?;
        for input in lock(&self.display.inputs).iter() {
            connect_input(&mut control, &process, input, &self.memory)?;
        }
        let display = Arc::new(Mutex::new(DisplayProcess {
            supervision: Supervision::new(&name, Some("display"), "vmm-display", process),
            control,
            config,
            fds,
            server,
            input: self.display.input.clone(),
            events: self.events.clone(),
            inputs: self.display.inputs.clone(),
            memory: self.memory.clone(),
        }));
        self.display.process = Some(display.clone());
        self.supervise(display)?;
        Ok(())
    }

    /// `-device virtio-tablet-pci`, `virtio-keyboard-pci`, `virtio-mouse-pci` (and
    /// device_add of them once the machine runs).
    pub(super) fn add_virtio_input(
        &mut self,
        cfg: &DeviceConfig,
    ) -> Result<Option<u8>, DeviceError> {
        let kind = match cfg.driver.as_str() {
            "virtio-tablet-pci" => InputKind::Tablet,
            "virtio-keyboard-pci" => InputKind::Keyboard,
            _ => InputKind::Mouse,
        };
        let name = format!("virtio-input[{}]", cfg.id.as_deref().unwrap_or(&cfg.driver));
        let listener = VhostUserListener::new()
            .map_err(|e| crate::supervisor::SupervisorError::Sockets(name.clone(), e))?;
        let (slot, function) = self.plug_virtio(
            cfg,
            &name,
            Box::new(VirtioInput::new(kind)),
            CLASS_INPUT_OTHER,
            None,
        )?;
        // Every input device takes a handler index, keyboards too.
        let mouse_index = self.display.next_mouse_index.max(3);
        self.display.next_mouse_index = mouse_index + 1;
        let device = InputDevice {
            kind,
            name,
            listener,
            function,
            slot,
            mouse_index,
        };
        if let Some(process) = self.display.process.clone() {
            let mut guard = lock(&process);
            let p = &mut *guard;
            let result = connect_input(
                &mut p.control,
                &p.supervision.process,
                &device,
                &self.memory,
            );
            drop(guard);
            if let Err(e) = result {
                // Roll back: the function goes, as a failed device_add leaves nothing.
                self.functions.remove(&slot);
                let _ = lock(&self.pci).remove_device(slot);
                return Err(e);
            }
        } else if self.display.started {
            // A hot-plugged input device on a machine that had no display process yet.
            lock(&self.display.inputs).push(device);
            self.start_display()?;
            return Ok(Some(slot));
        }
        lock(&self.display.inputs).push(device);
        Ok(Some(slot))
    }

    /// Whether the function in `slot` is the display adapter.
    pub fn is_display_adapter(&self, slot: u8) -> bool {
        matches!(
            self.functions.get(&slot).map(|f| &f.function),
            Some(super::PciFunction::Display(_))
        )
    }

    /// The virtio-input device in `slot` was unplugged.
    pub(super) fn remove_input(&mut self, slot: u8) {
        lock(&self.display.inputs).retain(|i| i.slot != slot);
    }

    /// query-mice: the virtio mice and tablets, newest first, then the PS/2 mouse;
    /// `current` is the newest one whose driver set it up (else the PS/2 mouse).
    pub fn mice(&self) -> Vec<crate::monitor::info::MouseInfo> {
        let mut mice: Vec<crate::monitor::info::MouseInfo> = lock(&self.display.inputs)
            .iter()
            .rev()
            .filter(|i| i.kind != InputKind::Keyboard)
            .map(|i| crate::monitor::info::MouseInfo {
                name: input::device_name(i.kind),
                index: i.mouse_index,
                current: false,
                absolute: i.kind == InputKind::Tablet,
                active: lock(&i.function).is_active(),
            })
            .collect();
        mice.push(crate::monitor::info::MouseInfo {
            name: "QEMU PS/2 Mouse",
            index: 2,
            current: false,
            absolute: false,
            active: true,
        });
        if let Some(m) = mice.iter_mut().find(|m| m.active) {
            m.current = true;
        }
        mice
    }

    /// The display adapter's migration section.
    pub(super) fn display_section(
        &self,
        adapter: &Arc<Mutex<BochsDisplay>>,
    ) -> Arc<Mutex<dyn Snapshottable>> {
        Arc::new(Mutex::new(DisplaySection {
            adapter: adapter.clone(),
            process: self.display.process.clone(),
        }))
    }

    fn display_process(&self) -> Option<&Arc<Mutex<DisplayProcess>>> {
        self.display.process.as_ref()
    }

    /// Whether the VNC server asks for a password.
    pub fn vnc_has_password_auth(&self) -> bool {
        self.vnc_with_password().is_some()
    }

    /// Set 1 key bytes for the PS/2 keyboard (HMP sendkey).
    pub fn keyboard_event(&self, set1: &[u8]) {
        if let Some(input) = &self.display.input {
            lock(input).key_event_set1(set1);
        }
    }

    /// PS/2 mouse motion, with new buttons or the last ones (HMP mouse_move, mouse_button).
    pub fn mouse_event(&self, dx: i32, dy: i32, dz: i32, buttons: Option<u8>) {
        use std::sync::atomic::Ordering;
        let held = &self.display.mouse_buttons;
        let buttons = match buttons {
            Some(b) => {
                held.store(b, Ordering::Relaxed);
                b
            }
            None => held.load(Ordering::Relaxed),
        };
        if let Some(input) = &self.display.input {
            lock(input).mouse_event(dx, dy, dz, buttons);
        }
    }

    /// `query-vnc`.
    pub fn query_vnc(&self) -> Value {
        let Some(process) = self.display_process() else {
            return json!({"enabled": false});
        };
        let mut p = lock(process);
        let Some(server) = p.server.clone() else {
            return json!({"enabled": false});
        };
        let clients = match p.call(DisplayRequest::QueryVnc, &[]) {
            Ok(DisplayReply::Vnc { clients }) => clients.iter().map(client_json).collect(),
            _ => Vec::new(),
        };
        json!({
            "enabled": true,
            "host": server.host,
            "service": server.service,
            "family": server.family,
            "auth": server.auth,
            "clients": clients,
        })
    }

    /// The VNC server's process, if it has password authentication.
    fn vnc_with_password(&self) -> Option<&Arc<Mutex<DisplayProcess>>> {
        self.display_process()
            .filter(|p| matches!(&lock(p).config.vnc, Some(v) if v.auth == VncAuth::Password))
    }

    /// `set_password protocol=vnc`: `connected` is `keep` (the default), `disconnect`
    /// (drop every client) or `fail` (refuse while clients are connected).
    pub fn set_vnc_password(
        &self,
        password: &str,
        connected: Option<&str>,
    ) -> Result<(), DeviceError> {
        let disconnect = match connected.unwrap_or("keep") {
            "keep" => false,
            "disconnect" => true,
            "fail" => false,
            _ => return Err(DeviceError::Display("Invalid parameter 'connected'".into())),
        };
        let failed = || DeviceError::Display("Could not set password".into());
        let process = self.vnc_with_password().ok_or_else(failed)?;
        let mut p = lock(process);
        if connected == Some("fail") {
            if let Ok(DisplayReply::Vnc { clients }) = p.call(DisplayRequest::QueryVnc, &[]) {
                if !clients.is_empty() {
                    return Err(failed());
                }
            }
        }
        // Only the first 8 characters count, as in VNC Authentication.
        let password: String = password.chars().take(8).collect();
        p.set_password(password, disconnect).map_err(|_| failed())
    }

    /// `expire_password protocol=vnc`.
    pub fn expire_vnc_password(&self, time: &str) -> Result<(), DeviceError> {
        let failed = || DeviceError::Display("Could not set password expire time".into());
        let process = self.display_process().ok_or_else(failed)?;
        let mut p = lock(process);
        if p.config.vnc.is_none() {
            return Err(failed());
        }
        p.set_expiry(parse_expiry(time, now()))
            .map_err(|_| failed())
    }

    /// `add_client protocol=vnc`: serve the connected socket `fd`. Without a VNC server
    /// the fd is closed, as QEMU does.
    pub fn add_vnc_client(&self, fd: OwnedFd, skipauth: bool) -> Result<(), DeviceError> {
        if !is_socket(&fd) {
            return Err(DeviceError::Display(
                "parameter @fdname must name a socket".into(),
            ));
        }
        let Some(process) = self.display_process() else {
            return Ok(());
        };
        let mut p = lock(process);
        if p.server.is_none() {
            return Ok(());
        }
        p.call(DisplayRequest::AddClient { skipauth }, &[fd.as_fd()])
            .map(drop)
    }

    /// `screendump`: the vmm opens (creates, truncates) `filename` and the display process
    /// writes the image; a failed write leaves no file behind.
    pub fn screendump(&self, filename: &str, format: ImageFormat) -> Result<(), DeviceError> {
        let no_console =
            || DeviceError::Display("There is no console to take a screendump from".into());
        if self.display.adapter.is_none() {
            return Err(no_console());
        }
        let process = self.display_process().ok_or_else(no_console)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(filename)
            .map_err(|e| {
                DeviceError::Display(format!(
                    "failed to open file '{filename}': {}",
                    strerror(&e)
                ))
            })?;
        let regular = file.metadata().map(|m| m.is_file()).unwrap_or(false);
        let result = lock(process).call(DisplayRequest::Screendump(format), &[file.as_fd()]);
        drop(file);
        if let Err(e) = result {
            // What was written is no image; a device (say /dev/full) is left alone.
            if regular {
                let _ = std::fs::remove_file(filename);
            }
            return Err(match e {
                DeviceError::Ipc {
                    source: ipc::IpcError::Remote(r),
                    ..
                } => DeviceError::Display(format!("failed to write '{filename}': {}", r.0)),
                other => other,
            });
        }
        Ok(())
    }
}

/// An OS error's text without Rust's " (os error N)".
fn strerror(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

fn is_socket(fd: &OwnedFd) -> bool {
    // SAFETY: fstat fills the struct we pass, on an fd we hold.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::fstat(fd.as_raw_fd(), &mut st) };
    r == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_times_as_qemu_reads_them() {
        assert_eq!(parse_expiry("now", 100), Expiry::At(100));
        assert_eq!(parse_expiry("never", 100), Expiry::Never);
        assert_eq!(parse_expiry("+60", 100), Expiry::At(160));
        assert_eq!(parse_expiry("5000", 100), Expiry::At(5000));
        assert_eq!(parse_expiry("junk", 100), Expiry::At(0));
        assert_eq!(parse_expiry("+junk", 100), Expiry::At(100));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16M"), Some(16 << 20));
        assert_eq!(parse_size("4194304"), Some(4 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn os_errors_read_as_strerror() {
        let e = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(strerror(&e), "No such file or directory");
    }
}
