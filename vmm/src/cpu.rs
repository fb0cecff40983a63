//! The [`CpuManager`] owns the vCPU threads: it starts them, pauses and resumes them all,
//! resets them in place, and stops them. Each vCPU object lives on its own thread; the
//! manager reaches it only through a shared control block and the vCPU's kicker.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::accel::{AccelError, IoHandler, PagingRegisters, Vcpu, VcpuExit, VcpuKicker};
use crate::arch::boot::EntryState;
use crate::control::{MachineControl, MachineRequest, ResetCause};

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("failed to spawn the thread for vCPU {id}: {source}")]
    Spawn {
        id: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to reset vCPU {id}: {source}")]
    Reset {
        id: u32,
        #[source]
        source: AccelError,
    },
    #[error("vCPU {id}: {source}")]
    State {
        id: u32,
        #[source]
        source: AccelError,
    },
    #[error("the snapshot has state for {got} vCPUs, this machine has {want}")]
    VcpuCount { got: usize, want: usize },
}

/// Work a parked vCPU's own thread carries out for the main thread.
enum Order {
    /// Power-on state, entering with the entry state (the boot CPU) or waiting for SIPI.
    Reset(Box<Option<EntryState>>),
    Save,
    Restore(Vec<u8>),
}

const WANT_RUN: u8 = 0;
const WANT_PAUSE: u8 = 1;
const WANT_STOP: u8 = 2;

struct Ctl {
    /// Bumped by every reset; a vCPU parked after a fatal exit waits for the next one.
    epoch: u64,
    /// How many vCPU threads are parked (paused, or waiting for a reset).
    parked: usize,
    /// Per-vCPU orders, taken and carried out by the vCPU's own thread; how many are done,
    /// what failed, and the states saved.
    pending: Vec<Option<Order>>,
    orders_done: usize,
    order_errors: Vec<(u32, AccelError)>,
    saved: Vec<Vec<u8>>,
    /// Each vCPU's state as it last left [`Vcpu::run`], and how often it has left it.
    snapshots: Vec<VcpuSnapshot>,
    run_returns: Vec<u64>,
}

/// What the monitor shows of a vCPU (QMP query-cpus): its instruction pointer and whether
/// it waits in HLT.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VcpuSnapshot {
    pub pc: u64,
    pub halted: bool,
    /// None if the accelerator could not read them.
    pub paging: Option<PagingRegisters>,
    /// The register dump HMP `info registers` shows.
    pub registers: String,
}

/// The time slice of CPU throttling (QEMU's CPU_THROTTLE_TIMESLICE_NS).
const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// How long a snapshot of running vCPUs waits for each to leave the guest.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1);

struct Shared {
    want: AtomicU8,
    /// Percent of each time slice the vCPUs sleep (live migration's auto-converge).
    throttle: AtomicU8,
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Per-vCPU facts that other threads may read.
#[derive(Default)]
pub struct VcpuInfo {
    /// Host thread id (gettid) of the vCPU thread.
    pub thread_id: AtomicI32,
    /// An NMI the vCPU thread injects before it next enters the guest.
    nmi_pending: AtomicBool,
}

struct VcpuHandle {
    id: u32,
    kicker: Arc<dyn VcpuKicker>,
    info: Arc<VcpuInfo>,
    thread: Option<JoinHandle<()>>,
}

/// Owner of all vCPU threads.
pub struct CpuManager {
    shared: Arc<Shared>,
    vcpus: Vec<VcpuHandle>,
}

impl CpuManager {
    /// Start one thread per vCPU. Threads start parked (paused); call [`resume`](Self::resume).
    pub fn start(
        vcpus: Vec<Box<dyn Vcpu>>,
        io: Arc<dyn IoHandler + Send>,
        control: MachineControl,
    ) -> Result<Self, CpuError> {
        let n = vcpus.len();
        let shared = Arc::new(Shared {
            want: AtomicU8::new(WANT_PAUSE),
            throttle: AtomicU8::new(0),
            ctl: Mutex::new(Ctl {
                epoch: 0,
                parked: 0,
                pending: (0..n).map(|_| None).collect(),
                orders_done: 0,
                order_errors: Vec::new(),
                saved: vec![Vec::new(); n],
                snapshots: vec![VcpuSnapshot::default(); n],
                run_returns: vec![0; n],
            }),
            cv: Condvar::new(),
        });
        let mut mgr = CpuManager {
            shared: shared.clone(),
            vcpus: Vec::new(),
        };
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let id = vcpu.id();
            let kicker = vcpu.kicker();
            let info = Arc::new(VcpuInfo::default());
            let t_shared = shared.clone();
            let t_io = io.clone();
            let t_info = info.clone();
            let t_control = control.clone();
            let t_kicker = kicker.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    vcpu_thread(index, vcpu, t_shared, t_io, t_info, t_control, t_kicker)
                })
                .map_err(|source| CpuError::Spawn { id, source })?;
            mgr.vcpus.push(VcpuHandle {
                id,
                kicker,
                info,
                thread: Some(thread),
            });
        }
        mgr.wait_parked();
        Ok(mgr)
    }

    pub fn num_vcpus(&self) -> usize {
        self.vcpus.len()
    }

    /// Host thread ids of the vCPU threads, in vCPU order.
    pub fn thread_ids(&self) -> Vec<(u32, i32)> {
        self.vcpus
            .iter()
            .map(|v| (v.id, v.info.thread_id.load(Ordering::Relaxed)))
            .collect()
    }

    /// Every vCPU takes an NMI before it next enters the guest (at once if running).
    pub fn inject_nmi(&self) {
        for v in &self.vcpus {
            v.info.nmi_pending.store(true, Ordering::SeqCst);
            v.kicker.kick();
        }
    }

    /// Each vCPU's instruction pointer and halt state, in vCPU order. Running vCPUs are
    /// kicked out of the guest to publish fresh values (and go on at once); a vCPU that
    /// does not answer in time is shown as it last was.
    pub fn snapshots(&self) -> Vec<VcpuSnapshot> {
        let running = self.shared.want.load(Ordering::SeqCst) == WANT_RUN;
        let before = self.shared.lock().run_returns.clone();
        if running {
            self.kick_all();
        }
        let deadline = Instant::now() + SNAPSHOT_TIMEOUT;
        let mut g = self.shared.lock();
        while running
            && g.run_returns
                .iter()
                .zip(&before)
                .any(|(now, then)| now == then)
        {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = self
                .shared
                .cv
                .wait_timeout(g, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        g.snapshots.clone()
    }

    fn kick_all(&self) {
        for v in &self.vcpus {
            v.kicker.kick();
        }
    }

    fn wait_parked(&self) {
        let n = self.vcpus.len();
        let mut g = self.shared.lock();
        while g.parked < n {
            g = self.shared.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Make the vCPUs sleep `percent` of their time (QEMU's CPU throttling, for a migration
    /// that cannot keep up with the guest's writes): every time slice a ticker kicks them
    /// out of the guest and each sleeps `percent / (100 - percent)` slices. 0 ends it.
    pub fn set_throttle(&self, percent: u8) {
        let percent = percent.min(99);
        let before = self.shared.throttle.swap(percent, Ordering::SeqCst);
        if percent == 0 || before != 0 {
            return;
        }
        let shared = self.shared.clone();
        let kickers: Vec<_> = self.vcpus.iter().map(|v| v.kicker.clone()).collect();
        let started = std::thread::Builder::new()
            .name("cpu-throttle".into())
            .spawn(move || {
                while shared.throttle.load(Ordering::SeqCst) > 0
                    && shared.want.load(Ordering::SeqCst) != WANT_STOP
                {
                    std::thread::sleep(THROTTLE_SLICE);
                    kickers.iter().for_each(|k| k.kick());
                }
            });
        if let Err(e) = started {
            tracing::warn!("cannot throttle the vCPUs: {e}");
            self.shared.throttle.store(0, Ordering::SeqCst);
        }
    }

    /// Stop every vCPU and wait until all are parked.
    pub fn pause(&self) {
        self.shared.want.store(WANT_PAUSE, Ordering::SeqCst);
        self.kick_all();
        self.wait_parked();
    }

    /// Let every vCPU run.
    pub fn resume(&self) {
        let _g = self.shared.lock();
        self.shared.want.store(WANT_RUN, Ordering::SeqCst);
        self.shared.cv.notify_all();
    }

    /// Reset every vCPU to its power-on state: the first enters with `entry`, the others
    /// wait for SIPI. The vCPUs must be paused; they stay paused.
    pub fn reset(&self, entry: &EntryState) -> Result<(), CpuError> {
        let orders = (0..self.vcpus.len())
            .map(|i| Order::Reset(Box::new((i == 0).then(|| entry.clone()))))
            .collect();
        self.order_all(orders, true)
            .map(|_| ())
            .map_err(|(id, source)| CpuError::Reset { id, source })
    }

    /// Every vCPU's state, in vCPU order (they are paused first and stay paused).
    pub fn save_state(&self) -> Result<Vec<Vec<u8>>, CpuError> {
        let orders = self.vcpus.iter().map(|_| Order::Save).collect();
        self.order_all(orders, false)
            .map_err(|(id, source)| CpuError::State { id, source })
    }

    /// Give every vCPU the state [`CpuManager::save_state`] gave (paused; they stay so).
    pub fn restore_state(&self, states: Vec<Vec<u8>>) -> Result<(), CpuError> {
        if states.len() != self.vcpus.len() {
            return Err(CpuError::VcpuCount {
                got: states.len(),
                want: self.vcpus.len(),
            });
        }
        let orders = states.into_iter().map(Order::Restore).collect();
        self.order_all(orders, true)
            .map(|_| ())
            .map_err(|(id, source)| CpuError::State { id, source })
    }

    /// Pause, hand each vCPU thread its order and wait for all; with `new_epoch`, vCPUs
    /// parked after a fatal exit may run again. The states saved, or the first failure.
    fn order_all(
        &self,
        orders: Vec<Order>,
        new_epoch: bool,
    ) -> Result<Vec<Vec<u8>>, (u32, AccelError)> {
        self.pause();
        let n = self.vcpus.len();
        let mut g = self.shared.lock();
        for (slot, order) in g.pending.iter_mut().zip(orders) {
            *slot = Some(order);
        }
        g.orders_done = 0;
        g.order_errors.clear();
        self.shared.cv.notify_all();
        while g.orders_done < n {
            g = self.shared.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        if new_epoch {
            g.epoch += 1;
        }
        self.shared.cv.notify_all();
        match g.order_errors.pop() {
            Some(e) => Err(e),
            None => Ok(std::mem::take(&mut g.saved)),
        }
    }

    /// Stop and join every vCPU thread.
    pub fn shutdown(&mut self) {
        {
            let _g = self.shared.lock();
            self.shared.want.store(WANT_STOP, Ordering::SeqCst);
            self.shared.cv.notify_all();
        }
        self.kick_all();
        for v in &mut self.vcpus {
            if let Some(t) = v.thread.take() {
                if t.join().is_err() {
                    tracing::error!("vcpu{} thread panicked", v.id);
                }
            }
        }
    }
}

impl Drop for CpuManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Block while the vCPU should not run. Returns false when the thread should exit.
fn park_while_blocked(
    index: usize,
    vcpu: &mut dyn Vcpu,
    shared: &Shared,
    parked_at_epoch: &mut Option<u64>,
) -> bool {
    let mut g = shared.lock();
    let mut counted = false;
    let keep_running = loop {
        if let Some(order) = g.pending[index].take() {
            drop(g);
            let result = match order {
                Order::Reset(entry) => vcpu.reset(entry.as_ref().as_ref()).map(|()| None),
                Order::Save => vcpu.save_state().map(Some),
                Order::Restore(state) => vcpu.restore_state(&state).map(|()| None),
            };
            g = shared.lock();
            match result {
                Ok(Some(state)) => {
                    if g.saved.len() != g.pending.len() {
                        g.saved = vec![Vec::new(); g.pending.len()];
                    }
                    g.saved[index] = state;
                }
                Ok(None) => {}
                Err(e) => g.order_errors.push((vcpu.id(), e)),
            }
            g.orders_done += 1;
            g.snapshots[index] = snapshot(vcpu);
            shared.cv.notify_all();
        }
        let want = shared.want.load(Ordering::SeqCst);
        if want == WANT_STOP {
            break false;
        }
        let blocked = want == WANT_PAUSE || *parked_at_epoch == Some(g.epoch);
        if !blocked {
            break true;
        }
        if !counted {
            g.parked += 1;
            counted = true;
            shared.cv.notify_all();
        }
        g = shared.cv.wait(g).unwrap_or_else(|e| e.into_inner());
    };
    if counted {
        g.parked -= 1;
    }
    if keep_running {
        *parked_at_epoch = None;
    }
    keep_running
}

fn snapshot(vcpu: &mut dyn Vcpu) -> VcpuSnapshot {
    VcpuSnapshot {
        pc: vcpu.instruction_pointer().unwrap_or(0),
        halted: vcpu.is_halted(),
        paging: vcpu.paging_registers().ok(),
        registers: vcpu.dump_registers(),
    }
}

/// A throttled vCPU's sleep, cut short when the vCPUs are to pause or stop (a migration's
/// last stop must not wait up to a second for it).
fn throttle_sleep(shared: &Shared, duration: Duration) {
    let until = Instant::now() + duration;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || shared.want.load(Ordering::SeqCst) != WANT_RUN {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(5)));
    }
}

fn vcpu_thread(
    index: usize,
    mut vcpu: Box<dyn Vcpu>,
    shared: Arc<Shared>,
    io: Arc<dyn IoHandler + Send>,
    info: Arc<VcpuInfo>,
    control: MachineControl,
    kicker: Arc<dyn VcpuKicker>,
) {
    // SAFETY: gettid has no preconditions.
    info.thread_id
        .store(unsafe { libc::gettid() }, Ordering::Relaxed);
    vcpu.bind_to_current_thread();
    let mut parked_at_epoch: Option<u64> = None;
    // When the vCPU last came back from a throttle sleep (auto-converge).
    let mut running_since = Instant::now();
    while park_while_blocked(index, vcpu.as_mut(), &shared, &mut parked_at_epoch) {
        if info.nmi_pending.swap(false, Ordering::SeqCst) {
            if let Err(e) = vcpu.inject_nmi() {
                tracing::warn!("vcpu{}: {e}", vcpu.id());
            }
        }
        let exit = vcpu.run(io.as_ref());
        let state = snapshot(vcpu.as_mut());
        {
            let mut g = shared.lock();
            g.snapshots[index] = state;
            g.run_returns[index] += 1;
            shared.cv.notify_all();
        }
        let fatal = match exit {
            Ok(VcpuExit::Interrupted) => {
                // Throttled: sleep in proportion to the time run since the last sleep, so
                // that the vCPU runs (100 - percent)% of the time however the kicks fall
                // (a kick that lands during a sleep ends the next run at once).
                let percent = u32::from(shared.throttle.load(Ordering::Relaxed));
                if percent > 0 {
                    let ran = running_since.elapsed().min(THROTTLE_SLICE);
                    throttle_sleep(&shared, ran * percent / (100 - percent));
                }
                running_since = Instant::now();
                None
            }
            Ok(VcpuExit::TripleFault) => {
                crate::report!(
                    "vmm: vcpu{}: triple fault; the machine resets\n{}",
                    vcpu.id(),
                    vcpu.dump_registers()
                );
                Some(MachineRequest::Reset(ResetCause::TripleFault))
            }
            Ok(VcpuExit::InternalError(msg)) => {
                crate::report!("vmm: vcpu{}: {msg}\n{}", vcpu.id(), vcpu.dump_registers());
                Some(MachineRequest::InternalError)
            }
            Err(e) => {
                crate::report!("vmm: vcpu{}: {e}\n{}", vcpu.id(), vcpu.dump_registers());
                Some(MachineRequest::InternalError)
            }
        };
        if let Some(req) = fatal {
            // This vCPU cannot go on; wait for the machine to reset it (or stop it).
            parked_at_epoch = Some(shared.lock().epoch);
            control.request(req);
        }
    }
    kicker.retire();
}
