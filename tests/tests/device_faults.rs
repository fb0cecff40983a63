//! Hostile device processes: each kind (vmm-blk, vmm-scsi, vmm-net, vmm-display), turned
//! hostile by the `VMM_TEST_HOSTILE` test hook, breaks the control protocol (garbage, an
//! oversized or trickled frame, forged replies, silence) or the vhost-user protocol (a
//! wrong reply, silence). The vmm must drop it with `__org.vmm_DEVICE_PROCESS_MISBEHAVED`
//! and never start it again, keep the VM running, and never leave the monitor or a vCPU
//! (the qtest harness's register writes) waiting on it for long.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_tests::device_kinds::{machine, Kind};
use vmm_tests::libqos::pci::{self, BarAllocator};
use vmm_tests::libqos::virtio::{
    VirtioPciDevice, VIRTIO_F_VERSION_1, VIRTIO_PCI_MODERN_DEVICE_BASE, VIRTIO_PCI_VENDOR_ID,
};
use vmm_tests::libqos::virtqueue::GuestAlloc;
use vmm_tests::qmp::Qmp;
use vmm_tests::qtest::Qtest;
use vmm_tests::TempDir;

const RAM: u64 = 128 << 20;
/// The vmm's bounds: a control request (10 s), a vhost-user exchange (5 s); with slack
/// for a loaded machine.
const CONTROL_BOUND: Duration = Duration::from_secs(14);
const VHOST_BOUND: Duration = Duration::from_secs(9);

/// When the process turns hostile: after the vmm has set it up.
const HOSTILE_AFTER_MS: u64 = 1000;

struct Rig {
    qt: Qtest,
    qmp: Qmp<std::os::unix::net::UnixStream>,
    /// Events that came before a reply.
    events: Vec<Value>,
    _dir: TempDir,
}

fn start(kind: Kind, mode: &str, delay_ms: u64) -> Rig {
    let dir = TempDir::new("device-faults");
    let spec = format!("{}:{mode}@{delay_ms}", kind.program());
    let (qt, qmp) = machine(kind, &dir, &[("VMM_TEST_HOSTILE", &spec)]);
    Rig {
        qt,
        qmp,
        events: Vec::new(),
        _dir: dir,
    }
}

impl Rig {
    /// Run `command`: its reply; events before it are kept.
    fn call(&mut self, command: &str) -> Value {
        self.qmp.send(command, None);
        loop {
            let msg = self.qmp.message();
            if msg.get("event").is_none() {
                return msg;
            }
            self.events.push(msg);
        }
    }

    fn process(&mut self, program: &str) -> Value {
        let all = self.call("__org.vmm_query-device-processes")["return"].clone();
        all.as_array()
            .and_then(|a| a.iter().find(|p| p["program"] == program).cloned())
            .unwrap_or_else(|| panic!("no {program} in {all}"))
    }

    /// The MISBEHAVED event, within `within` (the monitor is asked something now and
    /// then, so events come in while it answers).
    fn misbehaved(&mut self, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let found = self
                .events
                .iter()
                .position(|e| e["event"] == "__org.vmm_DEVICE_PROCESS_MISBEHAVED");
            if let Some(i) = found {
                return self.events.remove(i);
            }
            assert!(
                Instant::now() < deadline,
                "no MISBEHAVED event; events {:?}; vmm stderr:\n{}",
                self.events,
                self.qt.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
            self.call("query-status");
        }
    }

    /// Set up the kind's virtio function, start it and reset it, so the vmm starts and
    /// stops the backend's queues over vhost-user: how long the vCPU's (qtest's) writes
    /// took.
    fn drive_virtio(&mut self, kind: Kind) -> Duration {
        let qt = &mut self.qt;
        let f = pci::enumerate_bus0(qt)
            .unwrap()
            .into_iter()
            .find(|f| {
                f.vendor_id == VIRTIO_PCI_VENDOR_ID
                    && f.device_id == VIRTIO_PCI_MODERN_DEVICE_BASE + kind.virtio_id()
            })
            .unwrap_or_else(|| panic!("no virtio function of {kind:?}"));
        let mut bars = BarAllocator::for_ram(RAM);
        let mut dev = VirtioPciDevice::new(qt, f, Some(&mut bars)).unwrap();
        let mut mem = GuestAlloc::for_ram(RAM);
        dev.negotiate(qt, VIRTIO_F_VERSION_1).unwrap();
        dev.setup_queue(qt, &mut mem, 0, 16, None).unwrap();
        // DRIVER_OK starts the queues (messages without replies), a reset stops them
        // (GET_VRING_BASE: a reply to wait for). The vmm may fail the device (NEEDS_RESET)
        // rather than the write.
        let started = Instant::now();
        let _ = dev.driver_ok(qt);
        let _ = dev.set_status(qt, 0);
        started.elapsed()
    }
}

/// What every hostile mode must end in: the event naming the device and process, the
/// process gone and marked failed and not replaced, the VM running, the monitor and the
/// harness answering at once.
fn check_dropped(rig: &mut Rig, kind: Kind, pid: u64, event: &Value) {
    assert_eq!(event["data"]["device"], kind.process_label(), "{event}");
    assert_eq!(event["data"]["pid"].as_u64(), Some(pid), "{event}");
    assert!(
        event["data"]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{event}"
    );
    let p = rig.process(kind.program());
    assert_eq!(p["state"], "failed", "{p}");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the misbehaving process is still there"
    );
    std::thread::sleep(Duration::from_millis(300));
    let p = rig.process(kind.program());
    assert_eq!(
        (p["pid"].as_u64(), p["state"].clone()),
        (Some(pid), json!("failed"))
    );
    let started = Instant::now();
    let status = rig.call("query-status");
    assert_eq!(status["return"]["status"], json!("running"), "{status}");
    // Calls to the dropped process now fail or skip it at once.
    rig.call(kind.control_call());
    assert!(
        rig.qt.readl(0).is_ok(),
        "the harness still talks to the vmm"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the monitor waited on a dead process"
    );
}

/// Control-socket modes that need no request: the watcher catches them.
fn unprompted(kind: Kind, mode: &str) {
    let mut rig = start(kind, mode, HOSTILE_AFTER_MS);
    let pid = rig.process(kind.program())["pid"].as_u64().unwrap();
    let event = rig.misbehaved(Duration::from_secs(20));
    check_dropped(&mut rig, kind, pid, &event);
}

/// Control-socket modes that show in the reply to a request.
fn on_request(kind: Kind, mode: &str) {
    let mut rig = start(kind, mode, HOSTILE_AFTER_MS);
    let pid = rig.process(kind.program())["pid"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(HOSTILE_AFTER_MS + 200));
    let started = Instant::now();
    rig.call(kind.control_call());
    assert!(
        started.elapsed() < CONTROL_BOUND,
        "the monitor waited {:?}",
        started.elapsed()
    );
    let event = rig.misbehaved(Duration::from_secs(10));
    check_dropped(&mut rig, kind, pid, &event);
}

/// vhost-user modes: they show when the guest's driver starts the device.
fn on_vhost_user(kind: Kind, mode: &str) {
    let mut rig = start(kind, mode, HOSTILE_AFTER_MS);
    let pid = rig.process(kind.program())["pid"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(HOSTILE_AFTER_MS + 200));
    let took = rig.drive_virtio(kind);
    assert!(
        took < VHOST_BOUND,
        "a vCPU write waited {took:?} on the backend"
    );
    let event = rig.misbehaved(Duration::from_secs(10));
    check_dropped(&mut rig, kind, pid, &event);
}

macro_rules! hostile_tests {
    ($($kind:ident: $garbage:ident, $oversized:ident, $trickle:ident, $forged:ident,
       $silent:ident, $vgarbage:ident, $vsilent:ident;)*) => {$(
        #[test]
        fn $garbage() {
            unprompted(Kind::$kind, "garbage");
        }
        #[test]
        fn $oversized() {
            unprompted(Kind::$kind, "oversized");
        }
        #[test]
        fn $trickle() {
            unprompted(Kind::$kind, "trickle");
        }
        #[test]
        fn $forged() {
            on_request(Kind::$kind, "forged-reply");
        }
        #[test]
        fn $silent() {
            on_request(Kind::$kind, "silent");
        }
        #[test]
        fn $vgarbage() {
            on_vhost_user(Kind::$kind, "vhost-garbage");
        }
        #[test]
        fn $vsilent() {
            on_vhost_user(Kind::$kind, "vhost-silent");
        }
    )*};
}

hostile_tests! {
    Blk: blk_garbage, blk_oversized, blk_trickle, blk_forged_reply, blk_silent,
        blk_vhost_garbage, blk_vhost_silent;
    Scsi: scsi_garbage, scsi_oversized, scsi_trickle, scsi_forged_reply, scsi_silent,
        scsi_vhost_garbage, scsi_vhost_silent;
    Net: net_garbage, net_oversized, net_trickle, net_forged_reply, net_silent,
        net_vhost_garbage, net_vhost_silent;
    Display: display_garbage, display_oversized, display_trickle, display_forged_reply,
        display_silent, display_vhost_garbage, display_vhost_silent;
}
