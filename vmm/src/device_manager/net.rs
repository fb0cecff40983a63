//! Network: netdevs (each served by a `vmm-net` process, or by a vhost-user backend we
//! did not start) and the `virtio-net-pci` cards on them. netdev_add and netdev_del,
//! set_link, query-rx-filter and `info network` as QEMU 7.2 has them.
//!
//! A netdev deleted under its card leaves the card with its link down until the card goes
//! (QEMU's peer-deleted NIC); the id is free at once. A card's link is one state with its
//! netdev's: set_link on either changes both.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};

use ipc::net::{Backend, NetChannel, NetConfig, NetEvent, NetReply, NetRequest, RxFilter};
use ipc::DeviceKind;
use serde_json::{json, Value};

use super::process::{self, Misbehaved, SupervisedDevice, Supervision, WatchSink};
use super::{lock, DeviceConfig, DeviceError, DeviceManager, SETUP_TIMEOUT};
use crate::chardev::{ChardevSpec, SocketAddress};
use crate::netdev::{self, FdSource, NetdevOptions};
use crate::supervisor::DeviceProcess;
use crate::virtio::net::{format_mac, FilterSink, VirtioNet};
use crate::virtio::pci::VirtioPciDevice;
use crate::virtio::vhost_user::VhostUserDevice;

/// PCI class of a network card (network, Ethernet).
const CLASS_ETHERNET: (u8, u8) = (0x02, 0x00);
/// Default MACs are 52:54:00:12:34:XX from this last byte up, as in QEMU.
const MAC_PREFIX: [u8; 5] = [0x52, 0x54, 0x00, 0x12, 0x34];
const FIRST_MAC: u8 = 0x56;
/// The largest data queue a netdev's process takes (a card's are smaller or the same).
const QUEUE_SIZE: u16 = crate::virtio::net::MAX_QUEUE_SIZE;
/// Emitted when a user netdev's process restarted: its connections and NAT state are gone.
pub const EVENT_NETDEV_STATE_LOST: &str = "__org.vmm_NETDEV_STATE_LOST";

/// The process of a netdev, and what a new one needs.
/// A netdev's process, shared with the watcher.
pub(super) type SharedNetProcess = Arc<Mutex<NetProcess>>;

pub(super) struct NetProcess {
    supervision: Supervision,
    /// Shared with the card's control-queue hook, which sends the guest's filter.
    control: Arc<Mutex<NetChannel>>,
    config: NetConfig,
    /// The fds every new process gets (taps, sockets).
    fds: Vec<OwnedFd>,
    args: Vec<&'static str>,
    /// The card on this netdev, whose vhost-user frontend a new process is connected to.
    function: Option<Weak<Mutex<VirtioPciDevice>>>,
    link_up: bool,
    /// The guest's filter, as last sent (given again to a new process).
    filter: Arc<Mutex<Option<RxFilter>>>,
    /// A listening stream's peer: its connection (a new process goes on with it) and
    /// what `info network` says of it.
    peer: Option<(OwnedFd, String)>,
}

impl NetProcess {
    /// A request, and its reply.
    fn call(&self, request: NetRequest) -> Result<NetReply, DeviceError> {
        let name = &self.supervision.name;
        lock(&self.control)
            .call(request, &[], SETUP_TIMEOUT)
            .map(|(reply, _)| reply)
            .map_err(|e| process::ipc_error(name, e))
    }

    fn set_link(&mut self, up: bool) {
        self.link_up = up;
        if !self.supervision.running() {
            return;
        }
        if let Err(e) = self.call(NetRequest::SetLink { up }) {
            tracing::warn!(device = %self.supervision.name, "set_link: {e}");
        }
    }
}

/// Start `vmm-net` for `config` on `fds`: the process, its channel, and what it says of
/// its backend.
fn start_net_process(
    name: &str,
    config: &NetConfig,
    fds: &[std::os::fd::BorrowedFd<'_>],
    args: &[&str],
) -> Result<(DeviceProcess, NetChannel, String), DeviceError> {
    let (process, mut control) = process::start(name, "vmm-net", args, DeviceKind::Net)?;
    let request = NetRequest::Attach(config.clone());
    match control.call(request, fds, SETUP_TIMEOUT) {
        Ok((NetReply::Attached { description, .. }, _)) => Ok((process, control, description)),
        Ok((other, _)) => Err(process::unexpected(name, "Attach", &other)),
        // The process refused the netdev: its words are the user's error.
        Err(ipc::IpcError::Remote(e)) => Err(DeviceError::Net(e.0)),
        Err(e) => Err(process::ipc_error(name, e)),
    }
}

impl SupervisedDevice for NetProcess {
    fn supervision(&self) -> &Supervision {
        &self.supervision
    }

    fn supervision_mut(&mut self) -> &mut Supervision {
        &mut self.supervision
    }

    fn control_fd(&self) -> RawFd {
        lock(&self.control).socket().as_raw_fd()
    }

    fn serves(&self) -> String {
        self.config.id.clone()
    }

    /// A listening stream's peers come and go.
    fn control_message(&mut self, _sink: &dyn WatchSink) -> Result<(), Misbehaved> {
        let mut control = lock(&self.control);
        let (event, fds) = match control.recv(Some(std::time::Duration::from_millis(100))) {
            Ok((ipc::Message::Event(event), fds)) => (event, fds),
            Ok(_) => return Err(Misbehaved("a message that is not an event".into())),
            Err(ipc::IpcError::Frame(ipc::FrameError::Closed)) => {
                self.supervision.control_closed = true;
                return Ok(());
            }
            Err(ipc::IpcError::Frame(ipc::FrameError::TimedOut)) => return Ok(()),
            Err(e) => return Err(Misbehaved(e.to_string())),
        };
        match event {
            NetEvent::StreamConnected { peer } => {
                let Some(fd) = fds.into_iter().next() else {
                    return Err(Misbehaved("StreamConnected without its fd".into()));
                };
                self.peer = Some((fd, peer));
            }
            NetEvent::StreamDisconnected => self.peer = None,
        }
        Ok(())
    }

    /// A new process with the same fds (and a stream's current peer), the card's
    /// vhost-user setup replayed, and the link and filter as they were.
    fn respawn(&mut self) -> Result<(), DeviceError> {
        let name = self.supervision.name.clone();
        let mut fds: Vec<_> = self.fds.iter().map(|f| f.as_fd()).collect();
        if let Some((peer, _)) = &self.peer {
            fds.push(peer.as_fd());
        }
        let (process, mut control, _) = start_net_process(&name, &self.config, &fds, &self.args)?;
        let filter = lock(&self.filter).clone();
        let replay = |control: &mut NetChannel, request| {
            control
                .call(request, &[], SETUP_TIMEOUT)
                .map(drop)
                .map_err(|e| process::ipc_error(&name, e))
        };
        if !self.link_up {
            replay(&mut control, NetRequest::SetLink { up: false })?;
        }
        if let Some(filter) = filter {
            replay(&mut control, NetRequest::SetRxFilter(filter))?;
        }
        if let Some(function) = self.function.as_ref().and_then(Weak::upgrade) {
            process::reconnect(&name, &function, &process)?;
        }
        *lock(&self.control) = control;
        self.supervision.replaced(process);
        Ok(())
    }

    fn after_restart(&self, sink: &dyn WatchSink) {
        if matches!(self.config.backend, Backend::User { .. }) {
            sink.emit(
                EVENT_NETDEV_STATE_LOST,
                json!({
                    "netdev": self.config.id,
                    "reason": "the user network restarted: its connections and NAT state are lost",
                }),
            );
        }
    }
}

/// Where a netdev's frames go.
enum NetdevBackend {
    Process(Arc<Mutex<NetProcess>>),
    /// A vhost-user backend we did not start, reached when a card takes the netdev.
    VhostUser {
        path: PathBuf,
        queues: u16,
    },
}

/// A netdev.
pub(super) struct Netdev {
    id: String,
    kind: String,
    /// What `info network` says of the backend.
    info: String,
    queue_pairs: u16,
    backend: NetdevBackend,
    /// The card using it.
    nic: Option<String>,
    /// A tap's down script and interface.
    downscript: Option<(String, String)>,
    /// Creation order among the net clients (info network's order).
    order: u64,
}

impl Netdev {
    /// Its `info network` line(s) (one per queue pair), with `prefix` before each.
    fn info_lines(&self, prefix: &str) -> String {
        let info = match &self.backend {
            NetdevBackend::Process(p) => {
                let p = lock(p);
                match &p.peer {
                    Some((_, peer)) if self.kind == "socket" => {
                        format!(
                            "socket: connection from {}",
                            peer.trim_start_matches("tcp:")
                        )
                    }
                    Some((_, peer)) => peer.clone(),
                    None => self.info.clone(),
                }
            }
            NetdevBackend::VhostUser { .. } => self.info.clone(),
        };
        let line = format!("{prefix}{}: index=0,type={},{info}\r\n", self.id, self.kind);
        line.repeat(usize::from(self.queue_pairs.max(1)))
    }
}

/// A `virtio-net-pci` card.
pub(super) struct Nic {
    /// Its net client name: the id, or `virtio-net-pci.N`.
    name: String,
    id: Option<String>,
    /// `/machine/peripheral/ID` (DEVICE_DELETED's path).
    qdev: String,
    pub(super) slot: u8,
    mac: [u8; 6],
    netdev: Option<String>,
    /// The `info network` line of a netdev deleted under it.
    deleted_peer: Option<String>,
    function: Arc<Mutex<VirtioPciDevice>>,
    order: u64,
}

impl Nic {
    fn with_net<R>(&self, f: impl FnOnce(&mut VirtioNet) -> R) -> Option<R> {
        let mut function = lock(&self.function);
        function.backend_mut().as_net().map(f)
    }

    /// Set the card's link; the driver hears of a change through a configuration
    /// interrupt.
    fn set_link(&self, up: bool) {
        let mut function = lock(&self.function);
        let changed = function
            .backend_mut()
            .as_net()
            .is_some_and(|n| n.set_link(up));
        if changed {
            function.config_changed();
        }
    }
}

/// The net state of the device manager.
#[derive(Default)]
pub(super) struct Network {
    netdevs: Vec<Netdev>,
    nics: Vec<Nic>,
    /// Cards created without an id so far (they are named `virtio-net-pci.N`).
    anonymous_nics: usize,
    next_order: u64,
}

impl Network {
    /// Every tap netdev and a copy of its taps (one per queue pair), for a local
    /// migration to hand over.
    pub(super) fn taps(&self) -> Vec<(String, Vec<OwnedFd>)> {
        let mut out = Vec::new();
        for n in &self.netdevs {
            let NetdevBackend::Process(p) = &n.backend else {
                continue;
            };
            let p = lock(p);
            if !matches!(p.config.backend, Backend::Tap { .. }) {
                continue;
            }
            let taps = p.fds.iter().filter_map(|f| f.try_clone().ok()).collect();
            out.push((n.id.clone(), taps));
        }
        out
    }

    /// A local migration handed the source's taps over: each netdev's process is replaced
    /// by one serving them (the watcher starts it; it reads a tap only once the card's
    /// queues run). The processes replaced, and their old pids.
    pub(super) fn adopt_taps(
        &self,
        taps: Vec<(String, u16, OwnedFd)>,
        why: &'static str,
    ) -> Result<Vec<(SharedNetProcess, u32)>, DeviceError> {
        let mut replaced: Vec<(String, SharedNetProcess)> = Vec::new();
        for (netdev, queue, fd) in taps {
            let Some(NetdevBackend::Process(p)) = self
                .netdevs
                .iter()
                .find(|n| n.id == netdev)
                .map(|n| &n.backend)
            else {
                return Err(DeviceError::Net(format!(
                    "no netdev '{netdev}' for its tap"
                )));
            };
            let mut process = lock(p);
            let Some(slot) = process.fds.get_mut(usize::from(queue)) else {
                return Err(DeviceError::Net(format!(
                    "netdev '{netdev}' has no tap {queue}"
                )));
            };
            *slot = fd;
            if !replaced.iter().any(|(id, _)| *id == netdev) {
                replaced.push((netdev, p.clone()));
            }
        }
        Ok(replaced
            .into_iter()
            .map(|(_, p)| {
                let mut process = lock(&p);
                let old = process.supervision.process.pid();
                process.supervision.replace(why);
                drop(process);
                (p, old)
            })
            .collect())
    }

    fn order(&mut self) -> u64 {
        self.next_order += 1;
        self.next_order
    }

    fn netdev(&self, id: &str) -> Option<&Netdev> {
        self.netdevs.iter().find(|n| n.id == id)
    }

    fn nic(&self, name: &str) -> Option<&Nic> {
        self.nics.iter().find(|n| n.name == name)
    }

    /// The lowest default MAC no card has (QEMU's allocation).
    fn free_mac(&self) -> [u8; 6] {
        let used: BTreeSet<u8> = self
            .nics
            .iter()
            .filter(|n| n.mac[..5] == MAC_PREFIX)
            .map(|n| n.mac[5])
            .collect();
        let last = (FIRST_MAC..=0xfe)
            .find(|b| !used.contains(b))
            .unwrap_or(FIRST_MAC);
        let mut mac = [0u8; 6];
        mac[..5].copy_from_slice(&MAC_PREFIX);
        mac[5] = last;
        mac
    }
}

/// A MAC as QEMU parses `mac=`: six pairs of hex digits separated by `:` or `-`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    Some(mac)
}

/// The vhost-user-net backend's socket path for chardev `name`.
fn vhost_user_path(chardevs: &[(String, ChardevSpec)], name: &str) -> Result<PathBuf, DeviceError> {
    match chardevs.iter().find(|(id, _)| id == name) {
        Some((
            _,
            ChardevSpec::Socket {
                address: SocketAddress::Unix(path),
                server: false,
                ..
            },
        )) => Ok(path.clone()),
        Some(_) => Err(DeviceError::Net(format!(
            "chardev \"{name}\" is not a unix socket client"
        ))),
        None => Err(DeviceError::Net(format!("chardev \"{name}\" not found"))),
    }
}

impl DeviceManager {
    /// Whether a netdev has id `id`.
    pub fn has_netdev(&self, id: &str) -> bool {
        self.network.netdev(id).is_some()
    }

    /// netdev_add / `-netdev`: open what the netdev needs on the host (taking fds from
    /// `fds`), start its process and have it set up.
    pub fn add_netdev(
        &mut self,
        opts: &NetdevOptions,
        fds: &mut dyn FdSource,
    ) -> Result<(), DeviceError> {
        if self.network.netdev(&opts.id).is_some() {
            return Err(DeviceError::Net(format!("Duplicate ID '{}'", opts.id)));
        }
        let order = self.network.order();
        if opts.kind == "vhost-user" {
            let chardev = opts
                .get("chardev")
                .ok_or_else(|| DeviceError::Net("Parameter 'chardev' is missing".into()))?;
            let path = vhost_user_path(&self.chardevs, chardev)?;
            let queues = opts.number("queues").map_err(net_error)?.unwrap_or(1);
            let queues = u16::try_from(queues)
                .ok()
                .filter(|q| (1..=16).contains(q))
                .ok_or_else(|| DeviceError::Net(format!("queues={queues} is out of range")))?;
            self.network.netdevs.push(Netdev {
                id: opts.id.clone(),
                kind: opts.kind.clone(),
                info: format!("vhost-user to {}", path.display()),
                queue_pairs: 1,
                backend: NetdevBackend::VhostUser { path, queues },
                nic: None,
                downscript: None,
                order,
            });
            return Ok(());
        }
        let prepared = netdev::prepare(opts, fds).map_err(net_error)?;
        let config = NetConfig {
            id: opts.id.clone(),
            backend: prepared.backend,
            queue_pairs: prepared.queue_pairs,
            queue_size: QUEUE_SIZE,
        };
        let args: Vec<&'static str> = if opts.kind == "user" {
            vec!["--host-network"]
        } else {
            Vec::new()
        };
        let name = format!("vmm-net[{}]", opts.id);
        let borrowed: Vec<_> = prepared.fds.iter().map(|f| f.as_fd()).collect();
        let started = start_net_process(&name, &config, &borrowed, &args);
        let (process, control, description) = match started {
            Ok(started) => started,
            Err(e) => {
                if let Some((script, ifname)) = &prepared.downscript {
                    let _ = netdev::tap::run_script(script, ifname);
                }
                return Err(e);
            }
        };
        tracing::info!(netdev = %opts.id, pid = process.pid(), "netdev {}", opts.kind);
        let info = if prepared.info.is_empty() {
            description
        } else {
            prepared.info
        };
        let net_process = Arc::new(Mutex::new(NetProcess {
            supervision: Supervision::new(&name, Some(&opts.id), "vmm-net", process),
            control: Arc::new(Mutex::new(control)),
            config,
            fds: prepared.fds,
            args,
            function: None,
            link_up: true,
            filter: Arc::new(Mutex::new(None)),
            peer: None,
        }));
        self.network.netdevs.push(Netdev {
            id: opts.id.clone(),
            kind: opts.kind.clone(),
            info,
            queue_pairs: prepared.queue_pairs,
            backend: NetdevBackend::Process(net_process.clone()),
            nic: None,
            downscript: prepared.downscript,
            order,
        });
        self.supervise(net_process)?;
        Ok(())
    }

    /// netdev_del: the netdev goes at once (its id is free again); a card on it stays,
    /// with its link down, until it is unplugged.
    pub fn del_netdev(&mut self, id: &str) -> Result<(), DeviceError> {
        let Some(i) = self.network.netdevs.iter().position(|n| n.id == id) else {
            return Err(DeviceError::NotFound(id.to_string()));
        };
        let netdev = self.network.netdevs.remove(i);
        if let Some(nic_name) = &netdev.nic {
            if let Some(nic) = self.network.nics.iter_mut().find(|n| &n.name == nic_name) {
                nic.deleted_peer = Some(netdev.info_lines(" \\ "));
                nic.netdev = None;
                let mut function = lock(&nic.function);
                let changed = function
                    .backend_mut()
                    .as_net()
                    .is_some_and(VirtioNet::detach_backend);
                if changed {
                    function.config_changed();
                }
            }
        }
        if let NetdevBackend::Process(p) = netdev.backend {
            self.unsupervise(&(p.clone() as super::process::SharedSupervised));
            // The taps and sockets are free again now (the watcher may hold the device a
            // moment longer).
            let mut p = lock(&p);
            p.fds.clear();
            p.peer = None;
        }
        if let Some((script, ifname)) = &netdev.downscript {
            if let Err(e) = netdev::tap::run_script(script, ifname) {
                tracing::warn!(netdev = %id, "{e}");
            }
        }
        Ok(())
    }

    /// set_link: `name` is a card or a netdev; both ends of the pair change.
    pub fn set_link(&mut self, name: &str, up: bool) -> Result<(), DeviceError> {
        let (nic, netdev) = if let Some(nic) = self.network.nic(name) {
            (Some(nic), nic.netdev.clone())
        } else if let Some(netdev) = self.network.netdev(name) {
            (
                netdev.nic.as_deref().and_then(|n| self.network.nic(n)),
                Some(netdev.id.clone()),
            )
        } else {
            return Err(DeviceError::NotFound(name.to_string()));
        };
        if let Some(nic) = nic {
            nic.set_link(up);
        }
        if let Some(NetdevBackend::Process(p)) = netdev
            .as_deref()
            .and_then(|id| self.network.netdev(id))
            .map(|n| &n.backend)
        {
            lock(p).set_link(up);
        }
        Ok(())
    }

    /// query-rx-filter: one card (by name) or all; querying re-arms the card's
    /// NIC_RX_FILTER_CHANGED.
    pub fn query_rx_filter(&self, name: Option<&str>) -> Result<Value, DeviceError> {
        if let Some(name) = name {
            let Some(nic) = self.network.nic(name) else {
                if self.network.netdev(name).is_some() {
                    return Err(DeviceError::Net(format!("net client({name}) isn't a NIC")));
                }
                return Err(DeviceError::Net(format!("invalid net client name: {name}")));
            };
            let entry = nic
                .with_net(|n| n.query_rx_filter(name))
                .unwrap_or(Value::Null);
            return Ok(json!([entry]));
        }
        let list: Vec<Value> = self
            .network
            .nics
            .iter()
            .filter_map(|nic| nic.with_net(|n| n.query_rx_filter(&nic.name)))
            .collect();
        Ok(Value::Array(list))
    }

    /// `__org.vmm_query-netdev-stats`: each netdev's counters, as its process keeps them
    /// (since it started; a netdev served by a backend we did not start has none).
    pub fn netdev_stats(&self) -> Vec<Value> {
        let mut list = Vec::new();
        for netdev in &self.network.netdevs {
            let NetdevBackend::Process(process) = &netdev.backend else {
                continue;
            };
            let process = lock(process);
            if !process.supervision.running() {
                continue;
            }
            match process.call(NetRequest::Query) {
                Ok(NetReply::Info(info)) => list.push(json!({
                    "id": netdev.id,
                    "rx-frames": info.rx_frames,
                    "rx-bytes": info.rx_bytes,
                    "rx-dropped": info.rx_dropped,
                    "tx-frames": info.tx_frames,
                    "tx-bytes": info.tx_bytes,
                    "tx-dropped": info.tx_dropped,
                })),
                Ok(other) => tracing::warn!(
                    "{}",
                    process::unexpected(&process.supervision.name, "Query", &other)
                ),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        list
    }

    /// HMP `info network`: every net client in creation order, a netdev under its card.
    pub fn info_network(&self) -> String {
        enum Client<'a> {
            Nic(&'a Nic),
            Netdev(&'a Netdev),
        }
        let mut clients: Vec<(u64, Client<'_>)> = self
            .network
            .nics
            .iter()
            .map(|n| (n.order, Client::Nic(n)))
            .chain(
                self.network
                    .netdevs
                    .iter()
                    .filter(|n| n.nic.is_none())
                    .map(|n| (n.order, Client::Netdev(n))),
            )
            .collect();
        clients.sort_by_key(|(order, _)| *order);
        let mut out = String::new();
        for (_, client) in clients {
            match client {
                Client::Netdev(n) => out += &n.info_lines(""),
                Client::Nic(nic) => {
                    let mac = nic.with_net(|n| n.mac()).unwrap_or(nic.mac);
                    out += &format!(
                        "{}: index=0,type=nic,model=virtio-net-pci,macaddr={}\r\n",
                        nic.name,
                        format_mac(&mac)
                    );
                    if let Some(netdev) =
                        nic.netdev.as_deref().and_then(|id| self.network.netdev(id))
                    {
                        out += &netdev.info_lines(" \\ ");
                    } else if let Some(deleted) = &nic.deleted_peer {
                        out += deleted;
                    }
                }
            }
        }
        out
    }

    /// `-device virtio-net-pci` / device_add.
    pub(super) fn add_virtio_net(&mut self, cfg: &DeviceConfig) -> Result<Option<u8>, DeviceError> {
        cfg.pci_slot()?;
        let bad = |property: &str, value: &str| DeviceError::InvalidProperty {
            // QEMU names the inner virtio device here.
            driver: "virtio-net-device".into(),
            property: property.to_string(),
            value: value.to_string(),
        };
        let mac = match cfg.properties.get("mac") {
            Some(text) => parse_mac(text).ok_or_else(|| bad("mac", text))?,
            None => [0; 6],
        };
        let mac = if mac == [0; 6] {
            self.network.free_mac()
        } else {
            mac
        };
        let mq = match cfg.properties.get("mq").map(String::as_str) {
            None | Some("off" | "false") => false,
            Some("on" | "true") => true,
            Some(other) => return Err(bad("mq", other)),
        };
        let rx_size = queue_size(cfg, "rx_queue_size", ".")?;
        let tx_size = queue_size(cfg, "tx_queue_size", "")?;
        let netdev_id = cfg.properties.get("netdev").cloned();
        let (vhost, pairs, process) = match &netdev_id {
            None => (None, 1, None),
            Some(id) => {
                let Some(netdev) = self.network.netdev(id) else {
                    return Err(DeviceError::Net(format!(
                        "Property 'virtio-net-device.netdev' can't find value '{id}'"
                    )));
                };
                if netdev.nic.is_some() {
                    return Err(DeviceError::Net(format!(
                        "Property 'virtio-net-device.netdev' can't take value '{id}', it's in use"
                    )));
                }
                let pairs = netdev.queue_pairs;
                let name = format!("virtio-net[{id}]");
                match &netdev.backend {
                    NetdevBackend::Process(p) => {
                        let (stream, hook) = {
                            let p = lock(p);
                            let process = &p.supervision.process;
                            (
                                process.connect_vhost_user()?,
                                process::violation_hook(process),
                            )
                        };
                        let mut vhost = self.vhost_net(&name, stream, pairs)?;
                        vhost.on_violation(hook);
                        (Some(vhost), pairs, Some(p.clone()))
                    }
                    NetdevBackend::VhostUser { path, queues } => {
                        let stream =
                            std::os::unix::net::UnixStream::connect(path).map_err(|source| {
                                DeviceError::Connect {
                                    path: path.display().to_string(),
                                    source,
                                }
                            })?;
                        (Some(self.vhost_net(&name, stream, *queues)?), *queues, None)
                    }
                }
            }
        };
        let anonymous = cfg.id.is_none();
        let name = match &cfg.id {
            Some(id) => id.clone(),
            None => format!("virtio-net-pci.{}", self.network.anonymous_nics),
        };
        let qdev = self.qom_path(cfg.id.as_deref());
        let backend = process.as_ref().map(|p| {
            let p = lock(p);
            let control = Arc::downgrade(&p.control);
            let last = p.filter.clone();
            let device = p.supervision.name.clone();
            Box::new(move |filter: RxFilter| {
                *lock(&last) = Some(filter.clone());
                let Some(control) = control.upgrade() else {
                    return;
                };
                let sent = lock(&control).call(NetRequest::SetRxFilter(filter), &[], SETUP_TIMEOUT);
                if let Err(e) = sent {
                    tracing::warn!(device = %device, "RX filter: {e}");
                }
            }) as Box<dyn Fn(RxFilter) + Send>
        });
        let sink = FilterSink {
            events: self.events.clone(),
            name: cfg.id.clone(),
            path: format!("{qdev}/virtio-backend"),
            backend,
        };
        let link_up = process.as_ref().is_none_or(|p| lock(p).link_up);
        let mut net = VirtioNet::new(&name, vhost, mac, pairs, mq, sink, self.memory.clone());
        net.set_queue_sizes(rx_size, tx_size);
        net.set_link(link_up);
        let (slot, function) = self.plug_virtio(cfg, &name, Box::new(net), CLASS_ETHERNET, None)?;
        if let Some(p) = &process {
            lock(p).function = Some(Arc::downgrade(&function));
        }
        if anonymous {
            self.network.anonymous_nics += 1;
        }
        if let Some(id) = &netdev_id {
            if let Some(netdev) = self.network.netdevs.iter_mut().find(|n| &n.id == id) {
                netdev.nic = Some(name.clone());
            }
        }
        let order = self.network.order();
        self.network.nics.push(Nic {
            name,
            id: cfg.id.clone(),
            qdev,
            slot,
            mac,
            netdev: netdev_id,
            deleted_peer: None,
            function,
            order,
        });
        Ok(Some(slot))
    }

    /// A vhost-user frontend for `pairs` queue pairs on `stream`.
    fn vhost_net(
        &self,
        name: &str,
        stream: std::os::unix::net::UnixStream,
        pairs: u16,
    ) -> Result<VhostUserDevice, DeviceError> {
        Ok(VhostUserDevice::connect(
            name,
            crate::virtio::net::VIRTIO_ID_NET,
            stream,
            2 * usize::from(pairs),
            QUEUE_SIZE,
            0,
            self.memory.clone(),
        )?)
    }

    /// The card in `slot` was unplugged: its netdev is free again. Its id and QOM path.
    pub(super) fn remove_nic(&mut self, slot: u8) -> Option<(Option<String>, String)> {
        let i = self.network.nics.iter().position(|n| n.slot == slot)?;
        let nic = self.network.nics.remove(i);
        if let Some(netdev) = nic
            .netdev
            .as_deref()
            .and_then(|id| self.network.netdevs.iter_mut().find(|n| n.id == id))
        {
            netdev.nic = None;
            if let NetdevBackend::Process(p) = &netdev.backend {
                lock(p).function = None;
            }
        }
        Some((nic.id, nic.qdev))
    }

    /// Stop every netdev's process and run the tap down scripts (at exit).
    pub(super) fn shutdown_network(&mut self) {
        for netdev in self.network.netdevs.drain(..) {
            if let Some((script, ifname)) = &netdev.downscript {
                let _ = netdev::tap::run_script(script, ifname);
            }
        }
        self.network.nics.clear();
    }
}

/// A card's `rx_queue_size` or `tx_queue_size` (QEMU's limits and words; `end` is the
/// full stop that only one of them has).
fn queue_size(cfg: &DeviceConfig, key: &str, end: &str) -> Result<u16, DeviceError> {
    use crate::virtio::net::{DEFAULT_QUEUE_SIZE, MAX_QUEUE_SIZE};
    let Some(size) = cfg.number::<u16>(key)? else {
        return Ok(DEFAULT_QUEUE_SIZE);
    };
    if !size.is_power_of_two() || !(DEFAULT_QUEUE_SIZE..=MAX_QUEUE_SIZE).contains(&size) {
        return Err(DeviceError::Net(format!(
            "Invalid {key} (= {size}), must be a power of 2 between \
             {DEFAULT_QUEUE_SIZE} and {MAX_QUEUE_SIZE}{end}"
        )));
    }
    Ok(size)
}

fn net_error(e: netdev::NetdevError) -> DeviceError {
    DeviceError::Net(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_as_qemu_takes_them() {
        assert_eq!(
            parse_mac("52:54:00:AB:cd:ef"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        assert_eq!(parse_mac("52-54-00-ab-cd-e0").map(|m| m[5]), Some(0xe0));
        for bad in [
            "zz:00:00:00:00:00",
            "525400abcde2",
            "52:54:00:ab:cd",
            "2:54:0:12:34:5",
            "",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn default_macs_take_the_lowest_free_slot() {
        let network = Network::default();
        assert_eq!(network.free_mac(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    }
}
