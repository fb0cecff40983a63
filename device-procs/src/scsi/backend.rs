//! The vhost-user-scsi backend: features, the virtio-scsi configuration space, and the
//! queues: control (task management and asynchronous notification, answered at once),
//! event (its buffers are kept: no event is ever posted, since hotplug and parameter
//! changes are not offered and Linux finds media changes by unit attention and GET EVENT
//! STATUS NOTIFICATION), and the request queues, whose commands go to the [`Bus`].
//!
//! Everything in a chain is guest input. A chain that is cut short, has a device-readable
//! descriptor after a device-writable one, or a buffer outside guest memory, or has no
//! room for the response header, is completed with a used length of 0 and nothing is
//! written. A request header that is too short, or data buffers in both directions, get
//! VIRTIO_SCSI_S_FAILURE; an unknown target VIRTIO_SCSI_S_BAD_TARGET; data buffers in the
//! wrong direction for the command VIRTIO_SCSI_S_OVERRUN (as QEMU).
//!
//! One worker thread per queue; connection after connection is served by
//! [`crate::vhost_daemon::serve`].

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_bindings::virtio_scsi::{
    VIRTIO_SCSI_CDB_DEFAULT_SIZE, VIRTIO_SCSI_F_CHANGE, VIRTIO_SCSI_SENSE_DEFAULT_SIZE,
    VIRTIO_SCSI_S_BAD_TARGET, VIRTIO_SCSI_S_FAILURE, VIRTIO_SCSI_S_FUNCTION_REJECTED,
    VIRTIO_SCSI_S_INCORRECT_LUN, VIRTIO_SCSI_S_OK, VIRTIO_SCSI_S_OVERRUN, VIRTIO_SCSI_T_AN_QUERY,
    VIRTIO_SCSI_T_AN_SUBSCRIBE, VIRTIO_SCSI_T_TMF, VIRTIO_SCSI_T_TMF_ABORT_TASK,
    VIRTIO_SCSI_T_TMF_ABORT_TASK_SET, VIRTIO_SCSI_T_TMF_CLEAR_ACA,
    VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET, VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET,
    VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, VIRTIO_SCSI_T_TMF_QUERY_TASK,
    VIRTIO_SCSI_T_TMF_QUERY_TASK_SET,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use super::bus::{Address as LunAddress, Bus};
use super::cdrom::{direction, Cdb, Data, Direction, Outcome, Sense, CDB_LEN};

/// Most request queues (with the control and event queues, one bit each in
/// vhost-user-backend's 64-bit thread masks).
pub const MAX_REQUEST_QUEUES: u16 = 62;
/// Largest split virtqueue.
pub const MAX_QUEUE_SIZE: u16 = 32768;

use crate::vhost_daemon::{self, ExitEvents, Served, Vring};
pub use crate::vhost_daemon::{GuestMem, Memory};

const CONTROL_QUEUE: usize = 0;
const EVENT_QUEUE: usize = 1;

/// Bytes of virtio_scsi_config.
const CONFIG_LEN: usize = 36;
/// virtio_scsi_cmd_req without the CDB: lun[8], tag, task_attr, prio, crn.
const REQ_HEADER_LEN: u64 = 19;
/// virtio_scsi_cmd_resp without the sense: sense_len, resid, status_qualifier, status,
/// response.
const RESP_HEADER_LEN: u64 = 12;
/// READ data moves through a bounce buffer of this size.
const CHUNK: u64 = 256 * 1024;
/// SCSI status bytes.
const STATUS_GOOD: u8 = 0x00;
const STATUS_CHECK_CONDITION: u8 = 0x02;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0} request queues: a controller has 1 to {MAX_REQUEST_QUEUES}")]
    NumQueues(u16),
    #[error("queue size {0}: a power of two from 1 to {MAX_QUEUE_SIZE}")]
    QueueSize(u16),
    #[error("bad virtio-scsi configuration write: sense_size {sense_size}, cdb_size {cdb_size}")]
    Config { sense_size: u32, cdb_size: u32 },
}

/// Check a controller's queue configuration.
pub fn check_queues(num_queues: u16, queue_size: u16) -> Result<(), BackendError> {
    if num_queues == 0 || num_queues > MAX_REQUEST_QUEUES {
        return Err(BackendError::NumQueues(num_queues));
    }
    if !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
        return Err(BackendError::QueueSize(queue_size));
    }
    Ok(())
}

/// The controller.
pub struct ScsiBackend {
    bus: Arc<Bus>,
    /// Request queues.
    num_queues: u16,
    queue_size: u16,
    event_idx: AtomicBool,
    mem: RwLock<Option<Memory>>,
    exit_events: ExitEvents,
    /// The driver may write these two configuration fields.
    sense_size: AtomicU32,
    cdb_size: AtomicU32,
    work: vhost_daemon::QueueWork,
}

impl ScsiBackend {
    pub fn new(bus: Arc<Bus>, num_queues: u16, queue_size: u16) -> Result<Self, BackendError> {
        check_queues(num_queues, queue_size)?;
        Ok(ScsiBackend {
            bus,
            num_queues,
            queue_size,
            event_idx: AtomicBool::new(false),
            mem: RwLock::new(None),
            exit_events: ExitEvents::default(),
            sense_size: AtomicU32::new(VIRTIO_SCSI_SENSE_DEFAULT_SIZE),
            cdb_size: AtomicU32::new(VIRTIO_SCSI_CDB_DEFAULT_SIZE),
            work: vhost_daemon::QueueWork::new(2 + usize::from(num_queues)),
        })
    }

    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    /// virtio_scsi_config, as QEMU fills it.
    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0u8; CONFIG_LEN];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(0, &u32::from(self.num_queues).to_le_bytes());
        // seg_max: room for the header and response descriptors in a full queue.
        let seg_max = u32::from(self.queue_size).saturating_sub(2).max(1);
        put(4, &seg_max.to_le_bytes());
        put(8, &0xffffu32.to_le_bytes()); // max_sectors
        put(12, &128u32.to_le_bytes()); // cmd_per_lun
        put(16, &16u32.to_le_bytes()); // event_info_size
        put(20, &self.sense_size.load(Ordering::Acquire).to_le_bytes());
        put(24, &self.cdb_size.load(Ordering::Acquire).to_le_bytes());
        put(28, &0u16.to_le_bytes()); // max_channel
        put(30, &255u16.to_le_bytes()); // max_target
        put(32, &16383u32.to_le_bytes()); // max_lun
        b
    }

    /// Run every available chain of queue `index`; how many there were.
    fn process_queue(&self, index: usize, vring: &Vring) -> usize {
        if index == EVENT_QUEUE {
            // Event buffers are kept until there is an event, and there never is one.
            return 0;
        }
        let Some(atomic) = self.mem.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return 0;
        };
        let mem = atomic.memory();
        let mut done = 0;
        loop {
            let chain = vring.get_mut().get_queue_mut().pop_descriptor_chain(&*mem);
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let used_len = match Buffers::of(&chain) {
                Some(bufs) if index == CONTROL_QUEUE => self.control(&bufs),
                Some(bufs) => self.request(&bufs),
                None => {
                    tracing::debug!("malformed chain {head} refused");
                    0
                }
            };
            vhost_daemon::complete(vring, head, used_len);
            done += 1;
        }
        if done > 0 {
            vhost_daemon::notify(vring);
        }
        done
    }

    /// A control queue request; the used length.
    fn control(&self, bufs: &Buffers<'_>) -> u32 {
        let Some(head) = bufs.read(0, 4) else {
            return 0;
        };
        let kind = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        match kind {
            VIRTIO_SCSI_T_TMF => {
                // type, subtype, lun[8], tag -> response byte.
                let Some(req) = bufs.read(0, 24) else {
                    return 0;
                };
                let subtype = u32::from_le_bytes([req[4], req[5], req[6], req[7]]);
                let mut lun = [0u8; 8];
                lun.copy_from_slice(&req[8..16]);
                let response = self.tmf(subtype, &lun);
                match bufs.write(0, &[response as u8]) {
                    true => 1,
                    false => 0,
                }
            }
            VIRTIO_SCSI_T_AN_QUERY | VIRTIO_SCSI_T_AN_SUBSCRIBE => {
                // type, lun[8], event_requested -> event_actual, response. No events.
                if bufs.read(0, 16).is_none() {
                    return 0;
                }
                let mut resp = [0u8; 5];
                resp[4] = VIRTIO_SCSI_S_OK as u8;
                match bufs.write(0, &resp) {
                    true => 5,
                    false => 0,
                }
            }
            _ => {
                tracing::debug!("control request type {kind} refused");
                0
            }
        }
    }

    /// A task management function: nothing is ever in flight (requests complete before
    /// the next is popped), so aborts and queries find nothing to do; resets reset the
    /// unit (unlock, unit attention).
    fn tmf(&self, subtype: u32, lun: &[u8; 8]) -> u32 {
        let Some(addr) = LunAddress::decode(lun).filter(|a| self.bus.has_target(a.target)) else {
            return VIRTIO_SCSI_S_BAD_TARGET;
        };
        match subtype {
            VIRTIO_SCSI_T_TMF_ABORT_TASK
            | VIRTIO_SCSI_T_TMF_ABORT_TASK_SET
            | VIRTIO_SCSI_T_TMF_CLEAR_ACA
            | VIRTIO_SCSI_T_TMF_CLEAR_TASK_SET
            | VIRTIO_SCSI_T_TMF_QUERY_TASK
            | VIRTIO_SCSI_T_TMF_QUERY_TASK_SET => {
                if self.bus.has_lun(addr) {
                    VIRTIO_SCSI_S_OK
                } else {
                    VIRTIO_SCSI_S_INCORRECT_LUN
                }
            }
            VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET => {
                if self.bus.reset_lun(addr) {
                    VIRTIO_SCSI_S_OK
                } else {
                    VIRTIO_SCSI_S_INCORRECT_LUN
                }
            }
            VIRTIO_SCSI_T_TMF_I_T_NEXUS_RESET => {
                self.bus.reset_target(addr.target);
                VIRTIO_SCSI_S_OK
            }
            _ => VIRTIO_SCSI_S_FUNCTION_REJECTED,
        }
    }

    /// A command request; the used length.
    fn request(&self, bufs: &Buffers<'_>) -> u32 {
        let cdb_size = u64::from(self.cdb_size.load(Ordering::Acquire));
        let sense_size = u64::from(self.sense_size.load(Ordering::Acquire));
        let req_len = REQ_HEADER_LEN + cdb_size;
        let resp_len = RESP_HEADER_LEN + sense_size;
        let (readable, writable) = (bufs.readable_len(), bufs.writable_len());
        if writable < resp_len {
            tracing::debug!("command without room for its response refused");
            return 0;
        }
        let data_in = writable - resp_len;
        let mut resp = Response::new(data_in);
        let outcome = match bufs.read(0, req_len) {
            None => resp.fail(VIRTIO_SCSI_S_FAILURE),
            Some(_) if readable > req_len && data_in > 0 => resp.fail(VIRTIO_SCSI_S_FAILURE),
            Some(req) => self.command(&req, readable - req_len, data_in, &mut resp),
        };
        let mut written = 0u64;
        match outcome.map(|o| o.data) {
            None | Some(Data::None) => {}
            Some(Data::Bytes(bytes)) => {
                let n = (bytes.len() as u64).min(data_in);
                if bufs.write(resp_len, &bytes[..n as usize]) {
                    written = n;
                } else {
                    resp.fail(VIRTIO_SCSI_S_FAILURE);
                }
            }
            Some(Data::Image { file, offset, len }) => {
                if len > data_in {
                    resp.fail(VIRTIO_SCSI_S_OVERRUN);
                } else {
                    match copy_image(bufs, resp_len, &file, offset, len) {
                        Ok(()) => written = len,
                        Err(CopyError::Read(e)) => {
                            tracing::warn!("reading the medium at byte {offset}: {e}");
                            resp.check(Sense::READ_ERROR);
                        }
                        Err(CopyError::Guest) => {
                            resp.fail(VIRTIO_SCSI_S_FAILURE);
                        }
                    }
                }
            }
        }
        resp.resid = u32::try_from(data_in - written).unwrap_or(u32::MAX);
        if bufs.write(0, &resp.bytes(sense_size as usize)) {
            u32::try_from(resp_len + written).unwrap_or(u32::MAX)
        } else {
            0
        }
    }

    /// Decode and run one command (its header `req`). None when the response says it all.
    fn command(
        &self,
        req: &[u8],
        data_out: u64,
        data_in: u64,
        resp: &mut Response,
    ) -> Option<Outcome> {
        let mut lun = [0u8; 8];
        lun.copy_from_slice(&req[..8]);
        let Some(addr) = LunAddress::decode(&lun) else {
            return resp.fail(VIRTIO_SCSI_S_BAD_TARGET);
        };
        let mut cdb: Cdb = [0u8; CDB_LEN];
        let given = &req[REQ_HEADER_LEN as usize..];
        let n = given.len().min(CDB_LEN);
        cdb[..n].copy_from_slice(&given[..n]);
        match direction(cdb[0]) {
            Direction::In if data_out > 0 => return resp.fail(VIRTIO_SCSI_S_OVERRUN),
            Direction::Out if data_in > 0 => return resp.fail(VIRTIO_SCSI_S_OVERRUN),
            _ => {}
        }
        let Some(outcome) = self.bus.command(addr, &cdb) else {
            return resp.fail(VIRTIO_SCSI_S_BAD_TARGET);
        };
        if let Some(sense) = outcome.sense {
            resp.check(sense);
            return None;
        }
        Some(outcome)
    }
}

/// The response of one command.
struct Response {
    response: u8,
    status: u8,
    sense: Option<Sense>,
    resid: u32,
}

impl Response {
    fn new(data_in: u64) -> Response {
        Response {
            response: VIRTIO_SCSI_S_OK as u8,
            status: STATUS_GOOD,
            sense: None,
            resid: u32::try_from(data_in).unwrap_or(u32::MAX),
        }
    }

    /// A transport failure (the command did not run, or its data could not move).
    fn fail(&mut self, response: u32) -> Option<Outcome> {
        self.response = response as u8;
        self.status = STATUS_GOOD;
        self.sense = None;
        None
    }

    fn check(&mut self, sense: Sense) {
        self.status = STATUS_CHECK_CONDITION;
        self.sense = Some(sense);
    }

    /// virtio_scsi_cmd_resp with a `sense_size`-byte sense field.
    fn bytes(&self, sense_size: usize) -> Vec<u8> {
        let mut b = vec![0u8; RESP_HEADER_LEN as usize + sense_size];
        let sense = self.sense.map(|s| s.fixed());
        let sense_len = sense.map_or(0, |s| s.len().min(sense_size));
        b[0..4].copy_from_slice(&(sense_len as u32).to_le_bytes());
        b[4..8].copy_from_slice(&self.resid.to_le_bytes());
        b[10] = self.status;
        b[11] = self.response;
        if let Some(s) = sense {
            b[12..12 + sense_len].copy_from_slice(&s[..sense_len]);
        }
        b
    }
}

enum CopyError {
    Read(io::Error),
    Guest,
}

/// Copy `len` bytes of `file` at `offset` into the writable buffers at byte `at`.
fn copy_image(
    bufs: &Buffers<'_>,
    at: u64,
    file: &std::fs::File,
    offset: u64,
    len: u64,
) -> Result<(), CopyError> {
    let mut buf = vec![0u8; len.min(CHUNK) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        let chunk = &mut buf[..n];
        file.read_exact_at(chunk, offset + done)
            .map_err(CopyError::Read)?;
        if !bufs.write(at + done, chunk) {
            return Err(CopyError::Guest);
        }
        done += n as u64;
    }
    Ok(())
}

/// A guest buffer: address and length.
type Segment = (GuestAddress, u64);

/// A chain's device-readable and device-writable buffers, all inside guest memory.
struct Buffers<'m> {
    mem: &'m GuestMem,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

impl<'m> Buffers<'m> {
    /// The buffers of `chain`; None if the chain is cut short, misordered, or has a
    /// buffer outside guest memory.
    fn of<M>(chain: &'m DescriptorChain<M>) -> Option<Buffers<'m>>
    where
        M: std::ops::Deref<Target = GuestMem> + Clone,
    {
        let mem: &GuestMem = chain.memory();
        // The iterator stops by itself at the end of the chain, after `queue_size`
        // descriptors (a loop), at an unreadable descriptor or a bad indirect table; a
        // last descriptor that still points on means it gave up.
        let descs: Vec<Descriptor> = chain.clone().collect();
        if descs.last().is_none_or(|d| d.has_next()) {
            return None;
        }
        let mut bufs = Buffers {
            mem,
            readable: Vec::new(),
            writable: Vec::new(),
        };
        for d in descs {
            let len = u64::from(d.len());
            if len == 0 {
                continue;
            }
            if !GuestMemoryBackend::check_range(mem, d.addr(), len as usize) {
                return None;
            }
            if d.is_write_only() {
                bufs.writable.push((d.addr(), len));
            } else if bufs.writable.is_empty() {
                bufs.readable.push((d.addr(), len));
            } else {
                return None;
            }
        }
        Some(bufs)
    }

    fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| s.1).sum()
    }

    fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| s.1).sum()
    }

    /// `len` readable bytes from byte `at`; None if there are fewer.
    fn read(&self, at: u64, len: u64) -> Option<Vec<u8>> {
        let end = at.checked_add(len)?;
        if end > self.readable_len() {
            return None;
        }
        let mut out = vec![0u8; len as usize];
        let mut done = 0usize;
        for (addr, n) in pieces(&self.readable, at, len) {
            self.mem
                .read_slice(&mut out[done..done + n as usize], addr)
                .ok()?;
            done += n as usize;
        }
        Some(out)
    }

    /// Write `data` into the writable buffers from byte `at`; false if it does not fit.
    fn write(&self, at: u64, data: &[u8]) -> bool {
        let len = data.len() as u64;
        if at
            .checked_add(len)
            .is_none_or(|end| end > self.writable_len())
        {
            return false;
        }
        let mut done = 0usize;
        for (addr, n) in pieces(&self.writable, at, len) {
            if self
                .mem
                .write_slice(&data[done..done + n as usize], addr)
                .is_err()
            {
                return false;
            }
            done += n as usize;
        }
        true
    }
}

/// The parts of `segs` that hold bytes `at..at + len` of their concatenation.
fn pieces(segs: &[Segment], mut at: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for &(addr, n) in segs {
        if len == 0 {
            break;
        }
        if at >= n {
            at -= n;
            continue;
        }
        let take = (n - at).min(len);
        // Inside a segment that check_range accepted, so no overflow.
        out.push((addr.unchecked_add(at), take));
        len -= take;
        at = 0;
    }
    out
}

impl VhostUserBackend for ScsiBackend {
    /// Guest memory carries the migration dirty log (see [`vhost_daemon::GuestMem`]);
    /// every write here goes through vm-memory, which logs it.
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2 + usize::from(self.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    /// VIRTIO_SCSI_F_CHANGE is offered though no parameter change is ever posted: QEMU's
    /// vhost-user-scsi-pci offers it to the guest itself (param_change=on) and passes the
    /// driver's acknowledgement on, which a backend without it would refuse. LOG_ALL: our
    /// writes to guest memory are logged, so the vmm may migrate.
    fn features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_SCSI_F_CHANGE,
        ]
        .iter()
        .fold(0u64, |f, b| f | 1 << b)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | vhost_daemon::LOG_ALL
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | vhost_daemon::LOG_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let (offset, size) = (offset as usize, size as usize);
        match offset.checked_add(size) {
            Some(end) if end <= vhost::vhost_user::message::VHOST_USER_CONFIG_SIZE as usize => {}
            _ => return Vec::new(),
        }
        let bytes = self.config();
        (offset..offset + size)
            .map(|i| bytes.get(i).copied().unwrap_or(0))
            .collect()
    }

    /// The driver may set sense_size and cdb_size (Linux writes the defaults); other
    /// fields are read-only and writes to them are ignored. Refused as QEMU refuses them:
    /// a sense size from 64 KiB or a CDB size from 256.
    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let mut bytes = self.config();
        let offset = offset as usize;
        for (i, &b) in buf.iter().enumerate() {
            if let Some(slot) = offset.checked_add(i).and_then(|at| bytes.get_mut(at)) {
                *slot = b;
            }
        }
        let field = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let (sense_size, cdb_size) = (field(20), field(24));
        if sense_size >= 65536 || cdb_size >= 256 {
            return Err(io::Error::other(BackendError::Config {
                sense_size,
                cdb_size,
            }));
        }
        self.sense_size.store(sense_size, Ordering::Release);
        self.cdb_size.store(cdb_size, Ordering::Release);
        Ok(())
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = Some(mem);
        Ok(())
    }

    /// One worker thread per queue: thread i serves queue i.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues() as u32).map(|q| 1u64 << q).collect()
    }

    /// The ring is stopped (GET_VRING_BASE): the command in progress finishes first, so
    /// nothing reaches the disks or guest memory after the frontend has the index.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.work.wait_idle(queue_index as usize);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.new_event()
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Never an error: that would end the worker thread and with it the queue.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            return Ok(());
        };
        let queue = thread_id;
        let event_idx = self.event_idx.load(Ordering::Acquire);
        let _serving = self.work.serving(usize::from(device_event));
        // The event queue holds buffers for events the device posts: not worth waiting on.
        vhost_daemon::drain(vring, event_idx, queue != EVENT_QUEUE, || {
            self.process_queue(queue, vring)
        });
        Ok(())
    }
}

impl Served for ScsiBackend {
    const NAME: &'static str = "vmm-scsi";

    fn exit_events(&self) -> &ExitEvents {
        &self.exit_events
    }

    fn connection_starts(&self) {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.event_idx.store(false, Ordering::Release);
        self.sense_size
            .store(VIRTIO_SCSI_SENSE_DEFAULT_SIZE, Ordering::Release);
        self.cdb_size
            .store(VIRTIO_SCSI_CDB_DEFAULT_SIZE, Ordering::Release);
    }

    fn connection_ended(&self) {
        *self.mem.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::cdrom::Medium;
    use std::io::Write;
    use std::os::fd::FromRawFd;
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestMemoryMmap;

    const MEM_SIZE: usize = 0x10_0000;
    const REQ: u64 = 0x4_0000;
    const RESP: u64 = 0x5_0000;
    const DATA: u64 = 0x6_0000;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;

    fn backend() -> ScsiBackend {
        let name = std::ffi::CString::new("backend-test").unwrap();
        // SAFETY: memfd_create with a valid C string; the fd is ours.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned by nothing else.
        let mut f = unsafe { <std::fs::File as FromRawFd>::from_raw_fd(fd) };
        for b in 0..4u8 {
            f.write_all(&[b; 2048]).unwrap();
        }
        let bus = Arc::new(Bus::new(None));
        bus.add_cdrom(0, 0, "cd0", "", Some(Medium::new(f).unwrap()))
            .unwrap();
        ScsiBackend::new(bus, 1, 128).unwrap()
    }

    fn memory() -> GuestMem {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    /// Write `table` into a queue's descriptor table, make descriptor 0 available and run
    /// what pops on queue `index` (0: control, 2: requests). The used length.
    fn run(b: &ScsiBackend, mem: &GuestMem, index: usize, table: &[RawDescriptor]) -> u32 {
        let q = MockSplitQueue::new(mem, 16);
        for (i, d) in table.iter().enumerate() {
            q.desc_table().store(i as u16, *d).unwrap();
        }
        q.avail().ring().ref_at(0).unwrap().store(0u16.to_le());
        q.avail().idx().store(1u16.to_le());
        let mut queue: Queue = q.create_queue().unwrap();
        let chain = queue.iter(mem).unwrap().next().unwrap();
        match Buffers::of(&chain) {
            Some(bufs) if index == CONTROL_QUEUE => b.control(&bufs),
            Some(bufs) => b.request(&bufs),
            None => 0,
        }
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    fn request(mem: &GuestMem, cdb: &[u8]) {
        let mut req = [0u8; 51];
        req[0] = 1;
        req[3] = 0;
        req[19..19 + cdb.len()].copy_from_slice(cdb);
        mem.write_slice(&req, GuestAddress(REQ)).unwrap();
    }

    #[test]
    fn a_read_through_an_indirect_table() {
        let b = backend();
        let mem = memory();
        // Past the power-on unit attention.
        request(&mem, &[0x03, 0, 0, 0, 18]);
        let chain = [
            desc(REQ, 51, N, 1),
            desc(RESP, 108, W | N, 2),
            desc(DATA, 18, W, 0),
        ];
        assert_eq!(run(&b, &mem, 2, &chain), 108 + 18);
        request(&mem, &[0x28, 0, 0, 0, 0, 2, 0, 0, 1, 0]);
        let table = 0x9_0000u64;
        let entries = [
            desc(REQ, 51, N, 1),
            desc(RESP, 108, W | N, 2),
            desc(DATA, 1024, W | N, 3),
            desc(DATA + 0x1000, 1024, W, 0),
        ];
        for (i, d) in entries.iter().enumerate() {
            mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let used = run(
            &b,
            &mem,
            2,
            &[desc(table, 64, VRING_DESC_F_INDIRECT as u16, 0)],
        );
        assert_eq!(used, 108 + 2048);
        let mut resp = [0u8; 12];
        mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
        assert_eq!(resp, [0; 12]);
        let mut data = [0u8; 1024];
        mem.read_slice(&mut data, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(data, [2u8; 1024]);
    }

    #[test]
    fn config_writes() {
        let b = backend();
        assert_eq!(b.get_config(0, 36)[..4], 1u32.to_le_bytes());
        assert_eq!(b.get_config(20, 8), [96, 0, 0, 0, 32, 0, 0, 0]);
        b.set_config(20, &64u32.to_le_bytes()).unwrap();
        assert_eq!(b.get_config(20, 4), 64u32.to_le_bytes());
        assert!(b.set_config(24, &300u32.to_le_bytes()).is_err());
        // Read-only fields are ignored.
        b.set_config(0, &[9, 9, 9, 9]).unwrap();
        assert_eq!(b.get_config(0, 4), 1u32.to_le_bytes());
        assert!(b.get_config(u32::MAX, 4).is_empty());
    }

    #[test]
    fn random_chains_never_panic() {
        let b = backend();
        let mem = memory();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..4000 {
            let n = (next() % 5 + 1) as usize;
            let mut table = Vec::new();
            for _ in 0..n {
                let r = next();
                let addr = match r % 4 {
                    0 => REQ,
                    1 => RESP,
                    2 => DATA,
                    _ => next(),
                };
                let len = match (r >> 8) % 5 {
                    0 => 51,
                    1 => 108,
                    2 => 2048,
                    3 => 24,
                    _ => next() as u32,
                };
                let flags = (r >> 16) as u16 & 0x7;
                table.push(desc(addr, len, flags, (r >> 32) as u16 % 8));
            }
            let mut req = [0u8; 51];
            for x in req.iter_mut() {
                *x = next() as u8;
            }
            if i % 2 == 0 {
                req[..4].copy_from_slice(&[1, 0, 0, 0]);
            }
            mem.write_slice(&req, GuestAddress(REQ)).unwrap();
            // Random config sizes too.
            if i % 500 == 0 {
                let _ = b.set_config(20, &((next() % 300) as u32).to_le_bytes());
                let _ = b.set_config(24, &((next() % 300) as u32).to_le_bytes());
            }
            run(&b, &mem, 2, &table);
            run(&b, &mem, 0, &table);
        }
    }
}
