//! Live migration: the running guest moves to another vmm. The source sends its RAM while
//! the guest runs (precopy: a bulk pass, then passes over the pages written meanwhile,
//! until what is left fits the downtime limit at the measured bandwidth), then stops, sends
//! the last pages and every device's state, and waits for the destination to say it
//! loaded everything; only then is it done. The destination (`-incoming URI`) checks the
//! stream's header against its own configuration before it loads a byte.
//!
//! The parts: [`stream`] (the format), [`uri`] (tcp, unix, exec, fd), [`source`] (the
//! sending thread), [`destination`] (the receiving thread), [`ram`] (pages of the guest-RAM
//! memfd). The machine gives and takes the device state on its own thread (see
//! `machine/migration.rs`); this module never touches the machine directly.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

pub mod destination;
pub mod disk;
pub mod local;
pub mod log;
pub mod ram;
pub mod source;
pub mod stream;
pub mod uri;

pub use destination::{DestinationHost, IncomingMigration};
pub use source::{Outgoing, SourceHost};

/// QEMU 7.2's defaults: 128 MiB/s and 300 ms.
pub const DEFAULT_MAX_BANDWIDTH: u64 = 128 << 20;
pub const DEFAULT_DOWNTIME_LIMIT_MS: u64 = 300;
/// QEMU's ceiling for the downtime limit (2000 s in ms).
pub const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Uri(#[from] uri::UriError),
    #[error(transparent)]
    Stream(#[from] stream::StreamError),
    #[error("migration stream: {0}")]
    Io(#[from] std::io::Error),
    /// The destination's configuration is not the source's.
    #[error("the incoming migration does not match this VM: {0}")]
    Mismatch(String),
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("{0}")]
    Machine(String),
    #[error("migration cancelled")]
    Cancelled,
    #[error("cannot take the dirty log: {0}")]
    DirtyLog(String),
}

/// `query-migrate`'s `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    None,
    Setup,
    Active,
    Cancelling,
    Cancelled,
    Completed,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
            Status::Completed => "completed",
            Status::Failed => "failed",
        }
    }

    /// A migration in this state is still going on.
    pub fn is_active(self) -> bool {
        matches!(self, Status::Setup | Status::Active | Status::Cancelling)
    }
}

/// `migrate-set-parameters` (and the seed's migrate_set_speed / migrate_set_downtime).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parameters {
    /// Bytes per second.
    pub max_bandwidth: u64,
    pub downtime_limit_ms: u64,
}

impl Default for Parameters {
    fn default() -> Self {
        Parameters {
            max_bandwidth: DEFAULT_MAX_BANDWIDTH,
            downtime_limit_ms: DEFAULT_DOWNTIME_LIMIT_MS,
        }
    }
}

/// `migrate-set-capabilities`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// MIGRATION and MIGRATION_PASS events.
    pub events: bool,
    /// Throttle the vCPUs when the guest dirties memory faster than it is sent.
    pub auto_converge: bool,
    /// Local migration: memory and host resources move as fds over a unix socket.
    pub x_local: bool,
}

/// The capabilities `query-migrate-capabilities` lists, in QEMU's order of ours (and ours
/// after QEMU's).
pub const CAPABILITIES: &[&str] = &["auto-converge", "events", "x-local"];

/// Where a running migration leaves how to shut its connection down (migrate_cancel).
pub type ShutdownSlot = Arc<Mutex<Option<Box<dyn Fn() + Send + Sync>>>>;

/// What `query-migrate` shows, kept up to date by the migration thread.
#[derive(Debug, Clone)]
pub struct Progress {
    pub status: Status,
    pub started: Option<Instant>,
    pub setup_time_ms: u64,
    pub total_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    /// The same, in microseconds (a local migration's is a few milliseconds).
    pub downtime_us: Option<u64>,
    pub expected_downtime_ms: u64,
    /// Bytes of the stream sent.
    pub transferred: u64,
    /// RAM bytes still to send (dirty) at the last pass.
    pub remaining: u64,
    pub total: u64,
    /// Zero pages sent as flags, and pages sent whole.
    pub duplicate: u64,
    pub normal: u64,
    pub dirty_pages_rate: u64,
    pub mbps: f64,
    pub dirty_sync_count: u64,
    /// How much the vCPUs are throttled (auto-converge), percent.
    pub cpu_throttle: u8,
    /// Block migration: the disks' bytes sent, still to send (marked), and to send in
    /// the bulk pass.
    pub block: bool,
    pub disk_transferred: u64,
    pub disk_remaining: u64,
    pub disk_total: u64,
    pub error: Option<String>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            status: Status::None,
            started: None,
            setup_time_ms: 0,
            total_time_ms: None,
            downtime_ms: None,
            downtime_us: None,
            expected_downtime_ms: 0,
            transferred: 0,
            remaining: 0,
            total: 0,
            duplicate: 0,
            normal: 0,
            dirty_pages_rate: 0,
            mbps: 0.0,
            dirty_sync_count: 0,
            cpu_throttle: 0,
            block: false,
            disk_transferred: 0,
            disk_remaining: 0,
            disk_total: 0,
            error: None,
        }
    }
}

impl Progress {
    /// `query-migrate`'s reply, with QEMU 7.2's members for the state it is in.
    pub fn to_json(&self) -> Value {
        let mut info = Map::new();
        if self.status == Status::None {
            return Value::Object(info);
        }
        info.insert("status".into(), json!(self.status.as_str()));
        let ram = json!({
            "transferred": self.transferred,
            "remaining": self.remaining,
            "total": self.total,
            "duplicate": self.duplicate,
            "skipped": 0,
            "normal": self.normal,
            "normal-bytes": self.normal * stream::PAGE_SIZE as u64,
            "dirty-pages-rate": self.dirty_pages_rate,
            "mbps": self.mbps,
            "dirty-sync-count": self.dirty_sync_count,
            "page-size": stream::PAGE_SIZE,
            "multifd-bytes": 0,
            "pages-per-second": 0,
            "precopy-bytes": self.transferred,
            "downtime-bytes": 0,
            "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0,
        });
        let elapsed = || self.started.map_or(0, |s| s.elapsed().as_millis() as u64);
        // QEMU's MigrationStats for the disks: only the three byte counts mean anything.
        let disk = json!({
            "transferred": self.disk_transferred,
            "remaining": self.disk_remaining,
            "total": self.disk_total,
            "duplicate": 0,
            "skipped": 0,
            "normal": 0,
            "normal-bytes": 0,
            "dirty-pages-rate": 0,
            "mbps": 0.0,
            "dirty-sync-count": 0,
            "page-size": 0,
            "multifd-bytes": 0,
            "pages-per-second": 0,
            "precopy-bytes": self.disk_transferred,
            "downtime-bytes": 0,
            "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0,
        });
        if self.block
            && matches!(
                self.status,
                Status::Active | Status::Cancelling | Status::Completed
            )
        {
            info.insert("disk".into(), disk);
        }
        match self.status {
            Status::Setup => {}
            Status::Active | Status::Cancelling => {
                info.insert("ram".into(), ram);
                info.insert("total-time".into(), json!(elapsed()));
                info.insert("expected-downtime".into(), json!(self.expected_downtime_ms));
                info.insert("setup-time".into(), json!(self.setup_time_ms));
                if self.cpu_throttle > 0 {
                    info.insert("cpu-throttle-percentage".into(), json!(self.cpu_throttle));
                }
            }
            Status::Completed => {
                info.insert("ram".into(), ram);
                info.insert(
                    "total-time".into(),
                    json!(self.total_time_ms.unwrap_or_else(elapsed)),
                );
                info.insert("downtime".into(), json!(self.downtime_ms.unwrap_or(0)));
                info.insert("setup-time".into(), json!(self.setup_time_ms));
            }
            Status::Failed => {
                if let Some(e) = &self.error {
                    info.insert("error-desc".into(), json!(e));
                }
            }
            Status::Cancelled | Status::None => {}
        }
        Value::Object(info)
    }
}

/// The monitor's view of migration: parameters, capabilities, the progress of the last
/// outgoing migration, and how to cancel it. The machine owns one.
#[derive(Default)]
pub struct MigrationState {
    /// Shared with a running migration, which follows changes (migrate_set_speed).
    pub params: Arc<Mutex<Parameters>>,
    pub caps: Capabilities,
    pub progress: Arc<Mutex<Progress>>,
    pub cancel: Arc<AtomicBool>,
    /// Wakes a source thread out of a blocking write when cancelled.
    pub shutdown: ShutdownSlot,
    /// What `client_migrate_info` recorded (protocol, hostname, port, tls-port).
    pub client_info: Option<Value>,
}

pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MigrationState {
    pub fn status(&self) -> Status {
        lock(&self.progress).status
    }

    /// migrate_cancel: an active migration stops; the source runs on.
    pub fn request_cancel(&self) {
        let mut p = lock(&self.progress);
        if !p.status.is_active() {
            return;
        }
        p.status = Status::Cancelling;
        drop(p);
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(shutdown) = lock(&self.shutdown).as_ref() {
            shutdown();
        }
    }

    /// A new migration starts from a clean slate.
    pub fn begin(&self) {
        *lock(&self.progress) = Progress {
            status: Status::Setup,
            started: Some(Instant::now()),
            ..Progress::default()
        };
        self.cancel.store(false, Ordering::SeqCst);
    }
}

/// How long to wait between bandwidth checks while sending.
pub(crate) const RATE_PERIOD: Duration = Duration::from_millis(100);
