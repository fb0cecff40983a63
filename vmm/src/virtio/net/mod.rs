//! virtio-net: the device the guest sees (features, configuration space with the MAC and
//! the link status, and the control queue), with the data queues served by a vhost-user
//! backend (`vmm-net`, or one we did not start).
//!
//! The control queue stays here, as in QEMU and Cloud Hypervisor: the guest's RX mode,
//! MAC table and VLAN filter (reported by query-rx-filter and NIC_RX_FILTER_CHANGED, and
//! handed to the backend), the announce acknowledgement, and the number of queue pairs in
//! use (whose rings are enabled and disabled over vhost-user). It is served in place when
//! the guest notifies it: commands are rare and the driver waits for each.

use std::sync::{Arc, Mutex};

mod snapshot;

use ipc::net::RxFilter;
use qmp::EventSender;
use serde_json::{json, Map, Value};
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::vhost_user::VhostUserDevice;
use super::{Activation, QueueSetup, VirtioBackend, VirtioError, VIRTIO_F_VERSION_1};

/// virtio device id of network cards.
pub const VIRTIO_ID_NET: u16 = 1;
/// MAC table entries before the filter gives up and overflows (QEMU's MAC_TABLE_ENTRIES).
const MAC_TABLE_ENTRIES: usize = 64;
const MAX_VLAN: usize = 4096;
/// The control queue's size.
const CTRL_QUEUE_SIZE: u16 = 64;
/// Commands longer than this are refused (the largest, a full MAC table, is ~800 bytes).
const MAX_COMMAND: usize = 4096;

/// Feature bits the backend serves (the data path): offered to the guest when the backend
/// offers them, and passed on to it once acked.
const BACKEND_FEATURES: &[u32] = &[
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_ECN,
    VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
];

fn bits(list: &[u32]) -> u64 {
    list.iter().fold(0, |f, b| f | 1u64 << b)
}

/// A MAC address as QEMU prints it.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Who hears of the guest's filter changes.
pub struct FilterSink {
    /// Where NIC_RX_FILTER_CHANGED goes.
    pub events: Arc<Mutex<EventSender>>,
    /// The NIC's id (the event's `name`), if it has one.
    pub name: Option<String>,
    /// Its QOM path (the event's `path`).
    pub path: String,
    /// The backend, which applies the filter (none for a backend we did not start).
    pub backend: Option<Box<dyn Fn(RxFilter) + Send>>,
}

/// The guest's RX state, as its control queue set it (QEMU's fields).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct RxState {
    promisc: bool,
    allmulti: bool,
    alluni: bool,
    nomulti: bool,
    nouni: bool,
    nobcast: bool,
    unicast: Vec<[u8; 6]>,
    multicast: Vec<[u8; 6]>,
    uni_overflow: bool,
    multi_overflow: bool,
    vlans: Vec<bool>,
}

impl RxState {
    /// After a device reset: promiscuous, no tables; VLANs all pass until the driver
    /// negotiates VLAN filtering.
    fn reset() -> Self {
        RxState {
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
            unicast: Vec::new(),
            multicast: Vec::new(),
            uni_overflow: false,
            multi_overflow: false,
            vlans: vec![true; MAX_VLAN],
        }
    }
}

/// The control queue while the device runs.
struct CtrlQueue {
    queue: Queue,
    call: EventFd,
    event_idx: bool,
}

pub struct VirtioNet {
    name: String,
    /// The backend of the data queues; None once its netdev is gone (or never was).
    vhost: Option<VhostUserDevice>,
    /// Its feature bits, remembered when it goes.
    backend_features: u64,
    /// The address the device was given, and the one the guest set.
    default_mac: [u8; 6],
    mac: [u8; 6],
    link_up: bool,
    announce: bool,
    max_pairs: u16,
    mq: bool,
    /// Queue pairs the guest uses.
    pairs: u16,
    rx: RxState,
    /// NIC_RX_FILTER_CHANGED is sent once, then not until query-rx-filter re-arms it.
    notify_armed: bool,
    sink: FilterSink,
    memory: GuestMemoryMmap,
    ctrl: Option<CtrlQueue>,
    features: u64,
    /// The sizes of the RX and TX queues (`rx_queue_size`, `tx_queue_size`).
    queue_sizes: (u16, u16),
}

/// Data queue sizes: by default (QEMU's), and the largest they may have.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
pub const MAX_QUEUE_SIZE: u16 = 1024;

impl VirtioNet {
    /// A NIC with address `mac` and `max_pairs` queue pairs (`mq`: the guest may use more
    /// than one), its data queues served by `vhost`.
    pub fn new(
        name: &str,
        vhost: Option<VhostUserDevice>,
        mac: [u8; 6],
        max_pairs: u16,
        mq: bool,
        sink: FilterSink,
        memory: GuestMemoryMmap,
    ) -> Self {
        let backend_features = vhost.as_ref().map_or(0, |v| v.features());
        VirtioNet {
            name: name.to_string(),
            vhost,
            backend_features,
            default_mac: mac,
            mac,
            link_up: true,
            announce: false,
            max_pairs: max_pairs.max(1),
            mq,
            pairs: 1,
            rx: RxState::reset(),
            notify_armed: true,
            sink,
            memory,
            ctrl: None,
            features: 0,
            queue_sizes: (DEFAULT_QUEUE_SIZE, DEFAULT_QUEUE_SIZE),
        }
    }

    /// The sizes of the RX and TX queues, each a power of two up to [`MAX_QUEUE_SIZE`].
    pub fn set_queue_sizes(&mut self, rx: u16, tx: u16) {
        self.queue_sizes = (rx, tx);
    }

    fn data_queues(&self) -> usize {
        2 * usize::from(self.max_pairs)
    }

    fn ctrl_index(&self) -> usize {
        self.data_queues()
    }

    fn has(&self, bit: u32) -> bool {
        self.features & (1u64 << bit) != 0
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// set_link: the status the guest reads. True if it changed (the caller then
    /// interrupts the driver with a configuration change).
    pub fn set_link(&mut self, up: bool) -> bool {
        let changed = self.link_up != up;
        self.link_up = up;
        changed
    }

    /// The netdev went away (netdev_del): the queues stop, and the link goes down.
    pub fn detach_backend(&mut self) -> bool {
        if let Some(mut vhost) = self.vhost.take() {
            vhost.reset();
        }
        self.set_link(false)
    }

    /// The rings of the pairs past the ones the guest uses are disabled.
    fn apply_pairs(&mut self) {
        let pairs = usize::from(self.pairs);
        if let Some(vhost) = &mut self.vhost {
            for q in 0..2 * usize::from(self.max_pairs) {
                if let Err(e) = vhost.set_ring_enabled(q, q / 2 < pairs) {
                    tracing::warn!(device = %self.name, "queue {q}: {e}");
                }
            }
        }
    }

    /// query-rx-filter's entry for this NIC (QEMU 7.2's fields, in its order); it arms
    /// NIC_RX_FILTER_CHANGED again.
    pub fn query_rx_filter(&mut self, name: &str) -> Value {
        self.notify_armed = true;
        let state = |none: bool, all: bool| {
            if none {
                "none"
            } else if all {
                "all"
            } else {
                "normal"
            }
        };
        // QEMU lists the VLANs from the highest down.
        let vlan_table: Vec<usize> = (0..MAX_VLAN).rev().filter(|&v| self.rx.vlans[v]).collect();
        let vlan = match vlan_table.len() {
            0 => "none",
            MAX_VLAN => "all",
            _ => "normal",
        };
        let macs = |t: &[[u8; 6]]| t.iter().map(format_mac).collect::<Vec<_>>();
        let mut v = Map::new();
        v.insert("promiscuous".into(), json!(self.rx.promisc));
        v.insert("name".into(), json!(name));
        v.insert("main-mac".into(), json!(format_mac(&self.mac)));
        v.insert(
            "unicast".into(),
            json!(state(self.rx.nouni, self.rx.alluni)),
        );
        v.insert("vlan".into(), json!(vlan));
        v.insert("vlan-table".into(), json!(vlan_table));
        v.insert("unicast-table".into(), json!(macs(&self.rx.unicast)));
        v.insert(
            "multicast".into(),
            json!(state(self.rx.nomulti, self.rx.allmulti)),
        );
        v.insert("multicast-overflow".into(), json!(self.rx.multi_overflow));
        v.insert("unicast-overflow".into(), json!(self.rx.uni_overflow));
        v.insert("multicast-table".into(), json!(macs(&self.rx.multicast)));
        // QEMU 7.2 reports its `nobcast` flag here.
        v.insert("broadcast-allowed".into(), json!(self.rx.nobcast));
        Value::Object(v)
    }

    /// The filter as the backend applies it.
    pub fn rx_filter(&self) -> RxFilter {
        let vlan_filtering = self.has(VIRTIO_NET_F_CTRL_VLAN);
        RxFilter {
            promiscuous: self.rx.promisc,
            all_multicast: self.rx.allmulti || self.rx.multi_overflow,
            all_unicast: self.rx.alluni || self.rx.uni_overflow,
            no_multicast: self.rx.nomulti,
            no_unicast: self.rx.nouni,
            no_broadcast: self.rx.nobcast,
            mac: self.mac,
            unicast: self.rx.unicast.clone(),
            multicast: self.rx.multicast.clone(),
            vlans: vlan_filtering.then(|| {
                (0..MAX_VLAN as u16)
                    .filter(|&v| self.rx.vlans[usize::from(v)])
                    .collect()
            }),
        }
    }

    /// The guest changed its filter: tell the backend, and management (once).
    fn filter_changed(&mut self) {
        if let Some(backend) = &self.sink.backend {
            backend(self.rx_filter());
        }
        if !self.notify_armed {
            return;
        }
        self.notify_armed = false;
        let mut data = Map::new();
        if let Some(name) = &self.sink.name {
            data.insert("name".into(), json!(name));
        }
        data.insert("path".into(), json!(self.sink.path));
        let events = self.sink.events.lock().unwrap_or_else(|e| e.into_inner());
        events.emit("NIC_RX_FILTER_CHANGED", Some(data));
    }

    /// Serve what the driver queued on the control queue.
    fn serve_ctrl(&mut self) {
        let Some(mut ctrl) = self.ctrl.take() else {
            return;
        };
        let memory = self.memory.clone();
        let mut served = false;
        loop {
            while let Some(chain) = ctrl.queue.pop_descriptor_chain(&memory) {
                let head = chain.head_index();
                let (command, ack_at) = read_command(&memory, chain);
                let status = match command {
                    Some((class, cmd, data)) => self.command(class, cmd, &data),
                    None => VIRTIO_NET_ERR as u8,
                };
                let used = match ack_at {
                    Some(at) if memory.write_obj(status, at).is_ok() => 1,
                    _ => 0,
                };
                if let Err(e) = ctrl.queue.add_used(&memory, head, used) {
                    tracing::debug!(device = %self.name, "control queue: {e}");
                }
                served = true;
            }
            // With EVENT_IDX the driver notifies again only once told where we are.
            if !ctrl.event_idx || !ctrl.queue.enable_notification(&memory).unwrap_or(false) {
                break;
            }
        }
        if served {
            let notify = !ctrl.event_idx || ctrl.queue.needs_notification(&memory).unwrap_or(true);
            if notify {
                let _ = ctrl.call.write(1);
            }
        }
        self.ctrl = Some(ctrl);
    }

    /// One control command: VIRTIO_NET_OK or VIRTIO_NET_ERR.
    fn command(&mut self, class: u8, cmd: u8, data: &[u8]) -> u8 {
        let ok = match u32::from(class) {
            VIRTIO_NET_CTRL_RX => self.rx_mode(cmd, data),
            VIRTIO_NET_CTRL_MAC => self.mac_command(cmd, data),
            VIRTIO_NET_CTRL_VLAN => self.vlan(cmd, data),
            VIRTIO_NET_CTRL_ANNOUNCE if u32::from(cmd) == VIRTIO_NET_CTRL_ANNOUNCE_ACK => {
                self.announce = false;
                true
            }
            VIRTIO_NET_CTRL_MQ => self.queue_pairs(cmd, data),
            _ => false,
        };
        if ok {
            VIRTIO_NET_OK as u8
        } else {
            tracing::debug!(device = %self.name, class, cmd, "control command refused");
            VIRTIO_NET_ERR as u8
        }
    }

    fn rx_mode(&mut self, cmd: u8, data: &[u8]) -> bool {
        let [on] = data else { return false };
        let on = *on != 0;
        let rx = &mut self.rx;
        let flag = match u32::from(cmd) {
            VIRTIO_NET_CTRL_RX_PROMISC => &mut rx.promisc,
            VIRTIO_NET_CTRL_RX_ALLMULTI => &mut rx.allmulti,
            VIRTIO_NET_CTRL_RX_ALLUNI => &mut rx.alluni,
            VIRTIO_NET_CTRL_RX_NOMULTI => &mut rx.nomulti,
            VIRTIO_NET_CTRL_RX_NOUNI => &mut rx.nouni,
            VIRTIO_NET_CTRL_RX_NOBCAST => &mut rx.nobcast,
            _ => return false,
        };
        *flag = on;
        self.filter_changed();
        true
    }

    fn mac_command(&mut self, cmd: u8, data: &[u8]) -> bool {
        match u32::from(cmd) {
            VIRTIO_NET_CTRL_MAC_ADDR_SET => {
                let Ok(mac) = <[u8; 6]>::try_from(data) else {
                    return false;
                };
                self.mac = mac;
            }
            VIRTIO_NET_CTRL_MAC_TABLE_SET => {
                // Two tables, each a le32 count and that many addresses.
                let Some((unicast, rest)) = mac_table(data) else {
                    return false;
                };
                let Some((multicast, rest)) = mac_table(rest) else {
                    return false;
                };
                if !rest.is_empty() {
                    return false;
                }
                let rx = &mut self.rx;
                rx.uni_overflow = unicast.len() > MAC_TABLE_ENTRIES;
                rx.unicast = if rx.uni_overflow { Vec::new() } else { unicast };
                rx.multi_overflow = rx.unicast.len() + multicast.len() > MAC_TABLE_ENTRIES;
                rx.multicast = if rx.multi_overflow {
                    Vec::new()
                } else {
                    multicast
                };
            }
            _ => return false,
        }
        self.filter_changed();
        true
    }

    fn vlan(&mut self, cmd: u8, data: &[u8]) -> bool {
        let Ok(vid) = <[u8; 2]>::try_from(data) else {
            return false;
        };
        let vid = usize::from(u16::from_le_bytes(vid));
        if vid >= MAX_VLAN {
            return false;
        }
        match u32::from(cmd) {
            VIRTIO_NET_CTRL_VLAN_ADD => self.rx.vlans[vid] = true,
            VIRTIO_NET_CTRL_VLAN_DEL => self.rx.vlans[vid] = false,
            _ => return false,
        }
        self.filter_changed();
        true
    }

    fn queue_pairs(&mut self, cmd: u8, data: &[u8]) -> bool {
        if u32::from(cmd) != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET || !self.has(VIRTIO_NET_F_MQ) {
            return false;
        }
        let Ok(pairs) = <[u8; 2]>::try_from(data) else {
            return false;
        };
        let pairs = u16::from_le_bytes(pairs);
        if pairs == 0 || pairs > self.max_pairs {
            return false;
        }
        self.pairs = pairs;
        self.apply_pairs();
        true
    }

    /// The configuration space: mac, status, max_virtqueue_pairs.
    fn config(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        let mut status = 0u16;
        if self.link_up {
            status |= VIRTIO_NET_S_LINK_UP as u16;
        }
        if self.announce {
            status |= VIRTIO_NET_S_ANNOUNCE as u16;
        }
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&self.max_pairs.to_le_bytes());
        c
    }
}

/// A MAC table of a TABLE_SET command, and what follows it.
fn mac_table(data: &[u8]) -> Option<(Vec<[u8; 6]>, &[u8])> {
    let count = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let len = count.checked_mul(6)?;
    let table = data.get(4..4 + len)?;
    let macs = table
        .chunks_exact(6)
        .filter_map(|m| <[u8; 6]>::try_from(m).ok())
        .collect();
    Some((macs, &data[4 + len..]))
}

/// A control command's class, command and data (the driver-readable part of the chain),
/// and where its ack byte goes (the first driver-writable byte); None for a chain that
/// does not hold a command.
type Command = (u8, u8, Vec<u8>);

fn read_command(
    memory: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> (Option<Command>, Option<GuestAddress>) {
    let mut readable = Vec::new();
    let mut ack = None;
    let mut bad = false;
    for desc in chain {
        if desc.is_write_only() {
            if ack.is_none() && desc.len() >= 1 {
                ack = Some(desc.addr());
            }
            continue;
        }
        if ack.is_some() || readable.len() + desc.len() as usize > MAX_COMMAND {
            // Readable after writable, or too long: not a command.
            bad = true;
            continue;
        }
        let mut buf = vec![0u8; desc.len() as usize];
        if memory.read_slice(&mut buf, desc.addr()).is_err() {
            bad = true;
            continue;
        }
        readable.extend_from_slice(&buf);
    }
    if bad || readable.len() < 2 {
        return (None, ack);
    }
    let data = readable.split_off(2);
    (Some((readable[0], readable[1], data)), ack)
}

impl VirtioBackend for VirtioNet {
    fn migration_blocker(&self) -> Option<String> {
        self.vhost.as_ref().and_then(|v| v.migration_blocker())
    }

    fn save_state(&mut self) -> Result<Vec<u8>, crate::snapshot::SnapshotError> {
        self.save_net()
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), crate::snapshot::SnapshotError> {
        self.restore_net(state)
    }

    fn resume_after_save(&mut self) {
        self.resume_net();
    }

    fn config_changed_after_restore(&self) -> bool {
        self.announce_pending()
    }

    fn device_type(&self) -> u16 {
        VIRTIO_ID_NET
    }

    fn num_queues(&self) -> usize {
        self.data_queues() + 1
    }

    fn queue_max_size(&self) -> u16 {
        self.queue_sizes.0.max(self.queue_sizes.1)
    }

    fn queue_size(&self, queue: usize) -> u16 {
        if queue == self.data_queues() {
            CTRL_QUEUE_SIZE
        } else if queue.is_multiple_of(2) {
            self.queue_sizes.0
        } else {
            self.queue_sizes.1
        }
    }

    fn features(&self) -> u64 {
        let mut ours = vec![
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_CTRL_RX,
            VIRTIO_NET_F_CTRL_VLAN,
            VIRTIO_NET_F_CTRL_RX_EXTRA,
            VIRTIO_NET_F_GUEST_ANNOUNCE,
            VIRTIO_NET_F_CTRL_MAC_ADDR,
        ];
        if self.mq && self.max_pairs > 1 {
            ours.push(VIRTIO_NET_F_MQ);
        }
        bits(&ours) | (self.backend_features & bits(BACKEND_FEATURES))
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // With VERSION_1 the MAC is set through the control queue; nothing is writable.
    }

    fn activate(&mut self, activation: Activation<'_>) -> Result<(), VirtioError> {
        self.features = activation.features;
        if !self.has(VIRTIO_NET_F_CTRL_VLAN) {
            self.rx.vlans = vec![true; MAX_VLAN];
        }
        let ctrl_index = self.ctrl_index();
        let (ctrl, data): (Vec<QueueSetup>, Vec<QueueSetup>) = activation
            .queues
            .into_iter()
            .partition(|q| q.index == ctrl_index);
        if let Some(q) = ctrl.into_iter().next() {
            self.ctrl = Some(ctrl_queue(q, self.has(VIRTIO_RING_F_EVENT_IDX))?);
        }
        if let Some(vhost) = &mut self.vhost {
            let features = (activation.features & bits(BACKEND_FEATURES) & self.backend_features)
                | VIRTIO_F_VERSION_1;
            vhost.activate(Activation {
                features,
                queues: data,
                memory: activation.memory,
                resume: activation.resume,
            })?;
        }
        self.pairs = 1;
        self.apply_pairs();
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(vhost) = &mut self.vhost {
            vhost.reset();
        }
        self.ctrl = None;
        self.features = 0;
        self.pairs = 1;
        self.announce = false;
        self.mac = self.default_mac;
        self.rx = RxState::reset();
        self.rx.vlans = vec![false; MAX_VLAN];
        if let Some(backend) = &self.sink.backend {
            backend(self.rx_filter());
        }
    }

    fn as_vhost_user(&mut self) -> Option<&mut VhostUserDevice> {
        self.vhost.as_mut()
    }

    fn as_net(&mut self) -> Option<&mut VirtioNet> {
        Some(self)
    }

    fn inline_queue(&self, queue: usize) -> bool {
        queue == self.ctrl_index()
    }

    fn queue_notify(&mut self, queue: usize) {
        if queue == self.ctrl_index() {
            self.serve_ctrl();
        }
    }
}

/// The control queue the driver set up, served here.
fn ctrl_queue(q: QueueSetup, event_idx: bool) -> Result<CtrlQueue, VirtioError> {
    Ok(CtrlQueue {
        queue: super::inline_queue(&q, CTRL_QUEUE_SIZE, event_idx, "control queue")?,
        call: q.call,
        event_idx,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn nic() -> (VirtioNet, Arc<Mutex<Vec<RxFilter>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let sink = FilterSink {
            events: Arc::new(Mutex::new(EventSender::default())),
            name: Some("nic0".into()),
            path: "/machine/peripheral/nic0/virtio-backend".into(),
            backend: Some(Box::new(move |f| log.lock().unwrap().push(f))),
        };
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        (
            VirtioNet::new("nic0", None, mac, 2, true, sink, memory),
            seen,
        )
    }

    #[test]
    fn config_space_and_link() {
        let (mut n, _) = nic();
        let mut c = [0u8; 10];
        n.read_config(0, &mut c);
        assert_eq!(c, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 2, 0]);
        assert!(n.set_link(false));
        assert!(!n.set_link(false));
        n.read_config(6, &mut c[..2]);
        assert_eq!(&c[..2], &[0, 0]);
        assert_ne!(n.features() & (1 << VIRTIO_NET_F_MQ), 0);
        assert_eq!(n.num_queues(), 5);
        assert!(n.inline_queue(4) && !n.inline_queue(0));
    }

    #[test]
    fn commands_change_the_filter_and_the_query_shows_it() {
        let (mut n, seen) = nic();
        let q = n.query_rx_filter("nic0");
        assert_eq!(q["promiscuous"], true);
        assert_eq!(q["vlan"], "all");
        assert_eq!(q["vlan-table"].as_array().unwrap().len(), 4096);
        assert_eq!(q["vlan-table"][0], 4095);
        n.features = 1 << VIRTIO_NET_F_CTRL_VLAN;
        n.rx.vlans = vec![false; MAX_VLAN];
        let ok = VIRTIO_NET_OK as u8;
        let rx = VIRTIO_NET_CTRL_RX as u8;
        assert_eq!(n.command(rx, VIRTIO_NET_CTRL_RX_PROMISC as u8, &[0]), ok);
        assert_eq!(n.command(rx, VIRTIO_NET_CTRL_RX_ALLMULTI as u8, &[1]), ok);
        assert_eq!(n.command(rx, 9, &[1]), VIRTIO_NET_ERR as u8);
        assert_eq!(
            n.command(rx, VIRTIO_NET_CTRL_RX_PROMISC as u8, &[]),
            VIRTIO_NET_ERR as u8
        );
        let mut table = 0u32.to_le_bytes().to_vec();
        table.extend_from_slice(&1u32.to_le_bytes());
        table.extend_from_slice(&[1, 0, 0x5e, 0, 0, 1]);
        let mac = VIRTIO_NET_CTRL_MAC as u8;
        assert_eq!(
            n.command(mac, VIRTIO_NET_CTRL_MAC_TABLE_SET as u8, &table),
            ok
        );
        let vlan = VIRTIO_NET_CTRL_VLAN as u8;
        assert_eq!(
            n.command(vlan, VIRTIO_NET_CTRL_VLAN_ADD as u8, &5u16.to_le_bytes()),
            ok
        );
        assert_eq!(
            n.command(vlan, VIRTIO_NET_CTRL_VLAN_ADD as u8, &4096u16.to_le_bytes()),
            VIRTIO_NET_ERR as u8
        );
        let q = n.query_rx_filter("nic0");
        assert_eq!(q["promiscuous"], false);
        assert_eq!(q["multicast"], "all");
        assert_eq!(q["multicast-table"], json!(["01:00:5e:00:00:01"]));
        assert_eq!(q["vlan"], "normal");
        assert_eq!(q["vlan-table"], json!([5]));
        let last = seen.lock().unwrap().last().cloned().unwrap();
        assert!(!last.promiscuous && last.all_multicast);
        assert_eq!(last.vlans, Some(vec![5]));
        // Too many addresses: overflow, and the table is dropped.
        let mut big = 0u32.to_le_bytes().to_vec();
        big.extend_from_slice(&65u32.to_le_bytes());
        big.extend(std::iter::repeat_n(1u8, 65 * 6));
        assert_eq!(
            n.command(mac, VIRTIO_NET_CTRL_MAC_TABLE_SET as u8, &big),
            ok
        );
        let q = n.query_rx_filter("nic0");
        assert_eq!(q["multicast-overflow"], true);
        assert_eq!(q["multicast-table"], json!([]));
        let new_mac = [0x52, 0x54, 0, 0, 0, 1];
        assert_eq!(
            n.command(mac, VIRTIO_NET_CTRL_MAC_ADDR_SET as u8, &new_mac),
            ok
        );
        assert_eq!(n.mac(), new_mac);
        n.reset();
        assert_eq!(n.mac()[5], 0x56, "reset restores the address");
    }

    #[test]
    fn queue_pairs_need_mq_and_a_valid_count() {
        let (mut n, _) = nic();
        let mq = VIRTIO_NET_CTRL_MQ as u8;
        let set = VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
        assert_eq!(
            n.command(mq, set, &2u16.to_le_bytes()),
            VIRTIO_NET_ERR as u8
        );
        n.features = 1 << VIRTIO_NET_F_MQ;
        assert_eq!(n.command(mq, set, &2u16.to_le_bytes()), VIRTIO_NET_OK as u8);
        assert_eq!(n.pairs, 2);
        assert_eq!(
            n.command(mq, set, &3u16.to_le_bytes()),
            VIRTIO_NET_ERR as u8
        );
        assert_eq!(
            n.command(mq, set, &0u16.to_le_bytes()),
            VIRTIO_NET_ERR as u8
        );
    }
}
