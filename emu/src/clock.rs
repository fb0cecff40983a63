//! Guest time: the host's monotonic clock. A pause (QMP `stop`) freezes what the guest can
//! read, and `cont` lets it catch up with the host at once, so that the guest's clock never
//! drifts from the host's across a pause; each vCPU then tells its guest through kvmclock's
//! PVCLOCK_GUEST_STOPPED flag, so that Linux's lockup watchdogs take the jump for a pause.
//! The guest TSC ticks at 1 GHz, which makes a TSC value and a guest nanosecond count the
//! same number and keeps kvmclock's scaling trivial.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Guest TSC frequency: 1 GHz, so 1 tick = 1 ns.
pub const TSC_HZ: u64 = 1_000_000_000;

/// `flags` bit of pvclock_vcpu_time_info: the TSC is stable across vCPUs.
pub const PVCLOCK_TSC_STABLE_BIT: u8 = 1;
/// `flags` bit of pvclock_vcpu_time_info: the VM was paused (the guest clears it).
pub const PVCLOCK_GUEST_STOPPED: u8 = 2;
/// Offset of `flags` in pvclock_vcpu_time_info.
pub const PVCLOCK_FLAGS_OFFSET: u64 = 29;

/// Size of Linux's `struct pvclock_vcpu_time_info`.
pub const PVCLOCK_TIME_INFO_SIZE: usize = 32;
/// Size of Linux's `struct pvclock_wall_clock`.
pub const PVCLOCK_WALL_CLOCK_SIZE: usize = 12;

/// Marks "not paused" in [`VirtualClock::paused_guest_ns`].
const RUNNING: u64 = u64::MAX;

/// Where raw (unpaused) time comes from.
enum TimeSource {
    /// Host CLOCK_MONOTONIC (std's `Instant`), counted from `base`.
    Host { base: Instant },
    /// Test time that only moves when the test says so.
    Manual { ns: AtomicU64 },
}

/// The guest's view of time. Cheap to read from many threads: two atomic loads and a
/// clock read.
pub struct VirtualClock {
    source: TimeSource,
    /// Guest time frozen at the pause, or `RUNNING`.
    paused_guest_ns: AtomicU64,
    /// Added (wrapping) to the source's time: a restored snapshot goes on from its own.
    offset_ns: AtomicU64,
    /// How many pauses have ended (vCPUs compare it to flag the pause to their guest).
    resumes: AtomicU64,
    /// Serialises pause and resume against each other (readers do not take it).
    transition: Mutex<()>,
}

impl Default for VirtualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtualClock {
    /// A clock that follows the host's monotonic clock, at guest time 0 now.
    pub fn new() -> Self {
        Self::with_source(TimeSource::Host {
            base: Instant::now(),
        })
    }

    /// A clock that only moves through [`VirtualClock::advance`]; for unit tests of the
    /// timers built on it.
    pub fn new_manual() -> Self {
        Self::with_source(TimeSource::Manual {
            ns: AtomicU64::new(0),
        })
    }

    fn with_source(source: TimeSource) -> Self {
        Self {
            source,
            paused_guest_ns: AtomicU64::new(RUNNING),
            offset_ns: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            transition: Mutex::new(()),
        }
    }

    /// Moves a manual clock forward (no effect on a host clock).
    pub fn advance(&self, ns: u64) {
        if let TimeSource::Manual { ns: now } = &self.source {
            now.fetch_add(ns, Ordering::SeqCst);
        }
    }

    fn raw_ns(&self) -> u64 {
        let source = match &self.source {
            TimeSource::Host { base } => base.elapsed().as_nanos() as u64,
            TimeSource::Manual { ns } => ns.load(Ordering::SeqCst),
        };
        source.wrapping_add(self.offset_ns.load(Ordering::Acquire))
    }

    /// Make guest time read `guest_ns` now and go on from there (a restored snapshot's
    /// time: the guest's clock does not jump). A paused clock stays paused at it.
    pub fn set_now_ns(&self, guest_ns: u64) {
        let _guard = self
            .transition
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let source = self
            .raw_ns()
            .wrapping_sub(self.offset_ns.load(Ordering::Acquire));
        self.offset_ns
            .store(guest_ns.wrapping_sub(source), Ordering::Release);
        if self.paused_guest_ns.load(Ordering::Acquire) != RUNNING {
            self.paused_guest_ns.store(guest_ns, Ordering::Release);
        }
    }

    /// Guest nanoseconds since the clock was created (frozen while paused).
    pub fn now_ns(&self) -> u64 {
        let paused = self.paused_guest_ns.load(Ordering::Acquire);
        if paused != RUNNING {
            return paused;
        }
        self.raw_ns()
    }

    /// The guest TSC (equal to [`VirtualClock::now_ns`] at 1 GHz).
    pub fn tsc(&self) -> u64 {
        self.now_ns()
    }

    /// Freezes guest time. Idempotent.
    pub fn pause(&self) {
        let _guard = self
            .transition
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.paused_guest_ns.load(Ordering::Acquire) != RUNNING {
            return;
        }
        let now = self.now_ns();
        self.paused_guest_ns.store(now, Ordering::Release);
    }

    /// Lets guest time run again, caught up with the host's. Idempotent.
    pub fn resume(&self) {
        let _guard = self
            .transition
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.paused_guest_ns.load(Ordering::Acquire) == RUNNING {
            return;
        }
        self.resumes.fetch_add(1, Ordering::AcqRel);
        self.paused_guest_ns.store(RUNNING, Ordering::Release);
    }

    /// How many pauses have ended so far.
    pub fn resumes(&self) -> u64 {
        self.resumes.load(Ordering::Acquire)
    }

    /// Whether guest time is frozen.
    pub fn is_paused(&self) -> bool {
        self.paused_guest_ns.load(Ordering::Acquire) != RUNNING
    }

    /// The host instant at which guest time reaches `guest_ns` if the VM keeps running (now
    /// or earlier if it already has). While paused, the answer assumes a resume right now.
    pub fn host_deadline(&self, guest_ns: u64) -> Instant {
        let remaining = guest_ns.saturating_sub(self.now_ns());
        let now = Instant::now();
        now.checked_add(Duration::from_nanos(remaining))
            .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
    }

    /// `struct pvclock_vcpu_time_info` for kvmclock, little-endian:
    /// u32 version, u32 pad, u64 tsc_timestamp, u64 system_time, u32 tsc_to_system_mul,
    /// i8 tsc_shift, u8 flags, u8 pad[2]. With a 1 GHz TSC, mul = 2^31 and shift = 1 make
    /// the guest's scaling the identity. `version` must be even for the guest to accept it.
    pub fn pvclock_time_info(&self, version: u32) -> [u8; PVCLOCK_TIME_INFO_SIZE] {
        let now = self.now_ns();
        let mut info = [0u8; PVCLOCK_TIME_INFO_SIZE];
        info[0..4].copy_from_slice(&version.to_le_bytes());
        info[8..16].copy_from_slice(&now.to_le_bytes());
        info[16..24].copy_from_slice(&now.to_le_bytes());
        info[24..28].copy_from_slice(&0x8000_0000u32.to_le_bytes());
        info[28] = 1i8 as u8;
        info[29] = PVCLOCK_TSC_STABLE_BIT;
        info
    }

    /// `struct pvclock_wall_clock` (u32 version, u32 sec, u32 nsec): the host's wall-clock
    /// time at guest time 0, so that wall clock + kvmclock system time = now.
    pub fn pvclock_wall_clock(&self, version: u32) -> [u8; PVCLOCK_WALL_CLOCK_SIZE] {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(Duration::from_nanos(self.now_ns()));
        let mut out = [0u8; PVCLOCK_WALL_CLOCK_SIZE];
        out[0..4].copy_from_slice(&version.to_le_bytes());
        out[4..8].copy_from_slice(&(wall.as_secs() as u32).to_le_bytes());
        out[8..12].copy_from_slice(&wall.subsec_nanos().to_le_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_time_goes_on_from_itself() {
        let c = VirtualClock::new_manual();
        c.advance(1_000);
        c.set_now_ns(5_000_000);
        assert_eq!(c.now_ns(), 5_000_000);
        c.advance(10);
        assert_eq!(c.now_ns(), 5_000_010);
        c.pause();
        c.set_now_ns(7_000);
        assert_eq!(c.now_ns(), 7_000, "paused at the restored time");
        c.advance(5);
        c.resume();
        assert_eq!(c.now_ns(), 7_005, "resumed from it");
    }

    /// The guest side of kvmclock (Linux `pvclock_scale_delta` + `__pvclock_read_cycles`).
    fn guest_ns_from_tsc(info: &[u8; 32], tsc: u64) -> u64 {
        let tsc_timestamp = u64::from_le_bytes(info[8..16].try_into().unwrap());
        let system_time = u64::from_le_bytes(info[16..24].try_into().unwrap());
        let mul = u32::from_le_bytes(info[24..28].try_into().unwrap());
        let shift = info[28] as i8;
        let mut delta = tsc - tsc_timestamp;
        if shift < 0 {
            delta >>= -shift;
        } else {
            delta <<= shift;
        }
        system_time + ((delta as u128 * mul as u128) >> 32) as u64
    }

    #[test]
    fn pause_freezes_time_and_resume_catches_up_with_the_host() {
        let clock = VirtualClock::new_manual();
        clock.advance(1000);
        assert_eq!(clock.now_ns(), 1000);
        clock.pause();
        clock.pause();
        clock.advance(5000);
        assert_eq!(clock.now_ns(), 1000);
        assert!(clock.is_paused());
        assert_eq!(clock.resumes(), 0);
        clock.resume();
        clock.resume();
        assert_eq!(clock.resumes(), 1, "one pause ended");
        assert_eq!(clock.now_ns(), 6000);
        clock.advance(10);
        assert_eq!(clock.now_ns(), 6010);
        assert_eq!(clock.tsc(), 6010);
    }

    #[test]
    fn host_clock_is_monotonic_and_pauses() {
        let clock = VirtualClock::new();
        let a = clock.now_ns();
        std::thread::sleep(Duration::from_millis(2));
        let b = clock.now_ns();
        assert!(b >= a + 1_000_000);
        clock.pause();
        let frozen = clock.now_ns();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(clock.now_ns(), frozen);
        clock.resume();
        let after = clock.now_ns();
        assert!(after >= frozen + 5_000_000, "the pause is not hidden");
    }

    #[test]
    fn host_deadline_is_in_the_future_by_the_remaining_time() {
        let clock = VirtualClock::new_manual();
        clock.advance(100);
        let before = Instant::now();
        let deadline = clock.host_deadline(1_000_100);
        assert!(deadline >= before + Duration::from_millis(1));
        assert!(deadline <= Instant::now() + Duration::from_millis(1));
        assert!(clock.host_deadline(50) <= Instant::now());
    }

    #[test]
    fn pvclock_layout_and_scaling() {
        let clock = VirtualClock::new_manual();
        clock.advance(123_456_789);
        let info = clock.pvclock_time_info(4);
        assert_eq!(u32::from_le_bytes(info[0..4].try_into().unwrap()), 4);
        assert_eq!(
            u32::from_le_bytes(info[24..28].try_into().unwrap()),
            0x8000_0000
        );
        assert_eq!(info[28], 1);
        assert_eq!(info[29], PVCLOCK_TSC_STABLE_BIT);
        clock.advance(987_654_321);
        let tsc = clock.tsc();
        assert_eq!(guest_ns_from_tsc(&info, tsc), clock.now_ns());
        assert_eq!(guest_ns_from_tsc(&info, tsc + (1 << 40)), tsc + (1 << 40));
    }

    #[test]
    fn wall_clock_plus_guest_time_is_now() {
        let clock = VirtualClock::new_manual();
        clock.advance(5_000_000_000);
        let wall = clock.pvclock_wall_clock(2);
        assert_eq!(u32::from_le_bytes(wall[0..4].try_into().unwrap()), 2);
        let sec = u32::from_le_bytes(wall[4..8].try_into().unwrap()) as u64;
        let nsec = u32::from_le_bytes(wall[8..12].try_into().unwrap()) as u64;
        assert!(nsec < 1_000_000_000);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let derived = sec + 5;
        assert!(derived.abs_diff(now) <= 1);
    }
}
