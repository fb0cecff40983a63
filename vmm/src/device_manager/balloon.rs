//! The memory balloon (`virtio-balloon-pci`, QEMU 1.1's `-balloon virtio`): balloon and
//! query-balloon as QEMU 7.2 has them, and its QOM properties `guest-stats-polling-interval`
//! (a timer that asks the guest for fresh statistics) and `guest-stats`. The device itself
//! (in the vmm, see [`crate::virtio::balloon`]) releases the pages.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde_json::{json, Value};

use super::qom::QomError;
use super::{lock, DeviceConfig, DeviceError, DeviceManager};
use crate::virtio::balloon::{BalloonCounters, VirtioBalloon};
use crate::virtio::pci::VirtioPciDevice;

/// PCI class of the balloon, as QEMU gives it (others).
const CLASS_OTHERS: (u8, u8) = (0xff, 0x00);

/// QEMU's words when there is no balloon.
pub const NO_BALLOON: &str = "No balloon device has been activated";

/// The QOM type of the balloon's virtio device (the PCI function's `virtio-backend`
/// child), which QEMU names in errors about the properties it owns.
const BACKEND_TYPE: &str = "virtio-balloon-device";
pub(super) const POLL_INTERVAL: &str = "guest-stats-polling-interval";
pub(super) const GUEST_STATS: &str = "guest-stats";

/// The balloon that is plugged.
pub(super) struct Balloon {
    pub(super) slot: u8,
    function: Arc<Mutex<VirtioPciDevice>>,
    /// Its QOM path (`/machine/peripheral/ID` or `/machine/peripheral-anon/device[N]`).
    pub(super) path: String,
    /// Seconds between statistics requests; 0: none.
    poll_interval: u32,
    poller: Option<StatsPoller>,
}

/// The thread that hands the stats buffer back to the guest every interval. It ends when
/// this is dropped (the interval changes, or the balloon goes) or its function is gone.
struct StatsPoller {
    _stop: mpsc::Sender<()>,
}

impl StatsPoller {
    fn start(function: Weak<Mutex<VirtioPciDevice>>, interval: u32) -> Result<Self, String> {
        let (stop, stopped) = mpsc::channel::<()>();
        let every = Duration::from_secs(u64::from(interval));
        std::thread::Builder::new()
            .name("balloon-stats".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    let Some(function) = function.upgrade() else {
                        return;
                    };
                    let mut function = lock(&function);
                    if let Some(b) = function.backend_mut().as_balloon() {
                        b.request_stats();
                    }
                }
            })
            .map_err(|e| format!("cannot start the statistics timer: {e}"))?;
        Ok(StatsPoller { _stop: stop })
    }
}

/// A boolean property, with QEMU's words for anything else.
fn on_off(cfg: &DeviceConfig, property: &str) -> Result<bool, DeviceError> {
    match cfg.properties.get(property).map(String::as_str) {
        None | Some("off" | "false") => Ok(false),
        Some("on" | "true") => Ok(true),
        Some(_) => Err(DeviceError::Balloon(format!(
            "Parameter '{property}' expects 'on' or 'off'"
        ))),
    }
}

/// `guest-stats-polling-interval` as QEMU 7.2 checks it.
fn poll_interval(value: &Value) -> Result<u32, QomError> {
    let n = value.as_i64().ok_or_else(|| {
        QomError::Generic(format!(
            "Invalid parameter type for '{POLL_INTERVAL}', expected: integer"
        ))
    })?;
    if n < 0 {
        return Err(QomError::Generic(
            "timer value must be greater than zero".into(),
        ));
    }
    u32::try_from(n).map_err(|_| QomError::Generic("timer value is too big".into()))
}

impl DeviceManager {
    /// `-device virtio-balloon-pci[,deflate-on-oom=on][,free-page-reporting=on]
    /// [,guest-stats-polling-interval=SECONDS]`.
    pub(super) fn add_virtio_balloon(
        &mut self,
        cfg: &DeviceConfig,
    ) -> Result<Option<u8>, DeviceError> {
        // Properties are checked first, as QEMU sets them before it realizes the device.
        let deflate_on_oom = on_off(cfg, "deflate-on-oom")?;
        let reporting = on_off(cfg, "free-page-reporting")?;
        let interval = match cfg.properties.get(POLL_INTERVAL) {
            None => 0,
            Some(v) => v
                .parse::<i64>()
                .ok()
                .and_then(|n| poll_interval(&json!(n)).ok())
                .ok_or_else(|| DeviceError::InvalidProperty {
                    driver: cfg.driver.clone(),
                    property: POLL_INTERVAL.into(),
                    value: v.clone(),
                })?,
        };
        if self.balloon.is_some() {
            return Err(DeviceError::Balloon(
                "Only one balloon device is supported".into(),
            ));
        }
        let balloon = VirtioBalloon::new(
            self.memory.clone(),
            self.accel.clone(),
            deflate_on_oom,
            reporting,
            self.events.clone(),
        );
        let name = cfg.id.clone().unwrap_or_else(|| "virtio-balloon".into());
        let path = self.qom_path(cfg.id.as_deref());
        let (slot, function) =
            self.plug_virtio(cfg, &name, Box::new(balloon), CLASS_OTHERS, None)?;
        let mut balloon = Balloon {
            slot,
            function,
            path,
            poll_interval: 0,
            poller: None,
        };
        balloon
            .set_poll_interval(interval)
            .map_err(DeviceError::Balloon)?;
        self.balloon = Some(balloon);
        Ok(Some(slot))
    }

    fn balloon_function(&self) -> Option<&Arc<Mutex<VirtioPciDevice>>> {
        self.balloon.as_ref().map(|b| &b.function)
    }

    /// `balloon value`: leave the guest `target` bytes. `Err(None)`: there is no balloon.
    pub fn set_balloon(&self, target: u64) -> Result<(), Option<DeviceError>> {
        let function = self.balloon_function().ok_or(None)?;
        let mut function = lock(function);
        let changed = function
            .backend_mut()
            .as_balloon()
            .map(|b| b.set_target(target))
            .ok_or(None)?;
        if changed {
            function.config_changed();
        }
        Ok(())
    }

    /// `query-balloon`, or None without a balloon.
    pub fn query_balloon(&self) -> Option<Value> {
        let balloon = self.balloon.as_ref()?;
        let mut function = lock(&balloon.function);
        let polling = balloon.poll_interval > 0;
        function
            .backend_mut()
            .as_balloon()
            .map(|b| b.query(polling))
    }

    /// What the balloon counted (released bytes, refused buffers), or None without one.
    pub fn balloon_counters(&self) -> Option<BalloonCounters> {
        let mut function = lock(self.balloon_function()?);
        function.backend_mut().as_balloon().map(|b| b.counters())
    }

    /// The balloon in `slot` was unplugged.
    pub(super) fn remove_balloon(&mut self, slot: u8) {
        if self.balloon.as_ref().is_some_and(|b| b.slot == slot) {
            self.balloon = None;
        }
    }
}

impl Balloon {
    fn set_poll_interval(&mut self, interval: u32) -> Result<(), String> {
        if interval == self.poll_interval {
            return Ok(());
        }
        self.poller = None;
        self.poll_interval = 0;
        if interval > 0 {
            self.poller = Some(StatsPoller::start(
                Arc::downgrade(&self.function),
                interval,
            )?);
            self.poll_interval = interval;
        }
        Ok(())
    }

    /// qom-get of one of the balloon's own properties (`backend`: asked of the
    /// `virtio-backend` child); None for a property it does not have.
    pub(super) fn qom_get(&self, property: &str) -> Option<Value> {
        match property {
            POLL_INTERVAL => Some(json!(self.poll_interval)),
            GUEST_STATS => lock(&self.function)
                .backend_mut()
                .as_balloon()
                .map(|b| b.guest_stats()),
            _ => None,
        }
    }

    /// qom-set of one of the balloon's own properties; None for one it does not have.
    pub(super) fn qom_set(
        &mut self,
        property: &str,
        value: &Value,
    ) -> Option<Result<(), QomError>> {
        match property {
            POLL_INTERVAL => Some(
                poll_interval(value)
                    .and_then(|n| self.set_poll_interval(n).map_err(QomError::Generic)),
            ),
            GUEST_STATS => Some(Err(QomError::Generic(format!(
                "Property '{BACKEND_TYPE}.{GUEST_STATS}' is not writable"
            )))),
            _ => None,
        }
    }

    /// The type QEMU gives the function (`backend`: its virtio device).
    pub(super) fn qom_type(backend: bool) -> &'static str {
        if backend {
            BACKEND_TYPE
        } else {
            "virtio-balloon-pci"
        }
    }
}
