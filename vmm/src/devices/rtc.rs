//! The MC146818 CMOS real-time clock at ports 0x70 (index; bit 7 disables NMI) and 0x71
//! (data).
//!
//! Time registers are computed from a clock (the host's UTC time) plus an offset at the
//! moment they are read, in the binary/BCD and 12/24-hour formats register B selects. A
//! guest that sets the time (SET bit in register B, or a direct write of a time register)
//! changes the offset, never the host clock. The update-in-progress flag is reported during
//! the last 244 us of each second, as the chip does before an update, so readers such as
//! Linux's `mc146818_get_time` never see a torn time. Register C's flags are computed from
//! the clock when read; the periodic, alarm and update-ended interrupts (IRQ 8) are raised
//! by a small timer thread that runs only while the guest has one of them enabled.
//! The other CMOS bytes are plain memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::devices::bus::BusDevice;
use crate::devices::interrupt::IrqLine;
use crate::snapshot::{decode, encode, SnapshotError, Snapshottable};

/// Ports covered: index and data.
pub const RTC_PORT_COUNT: u64 = 2;
/// The CMOS byte holding the century, as our FADT's century field names it.
pub const CMOS_CENTURY: u8 = 0x32;

const CMOS_SIZE: usize = 128;

const REG_SECONDS: u8 = 0x00;
const REG_SECONDS_ALARM: u8 = 0x01;
const REG_MINUTES: u8 = 0x02;
const REG_MINUTES_ALARM: u8 = 0x03;
const REG_HOURS: u8 = 0x04;
const REG_HOURS_ALARM: u8 = 0x05;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;

const A_UIP: u8 = 0x80;
const A_RATE_MASK: u8 = 0x0f;
/// 32.768 kHz time base, 1024 Hz periodic rate: what firmware leaves behind.
const A_DEFAULT: u8 = 0x26;

const B_SET: u8 = 0x80;
const B_PIE: u8 = 0x40;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const B_INTERRUPTS: u8 = B_PIE | B_AIE | B_UIE;
const B_DEFAULT: u8 = B_24H;

const C_IRQF: u8 = 0x80;
const C_PF: u8 = 0x40;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;

/// Register D: the battery is good and the time is valid.
const D_VALID: u8 = 0x80;

/// The update-in-progress flag rises this long before each second's update.
const UIP_LEAD: Duration = Duration::from_micros(244);

/// An alarm register with both top bits set matches any value.
const ALARM_DONT_CARE: u8 = 0xc0;

/// The time registers that follow the clock while updates run.
const TIME_REGISTERS: [u8; 8] = [
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_WEEKDAY,
    REG_DAY,
    REG_MONTH,
    REG_YEAR,
    CMOS_CENTURY,
];

/// Where the RTC reads the time: UTC, as a duration since the Unix epoch.
pub trait RtcClock: Send + Sync {
    fn now(&self) -> Duration;
}

/// The host's real-time clock.
pub struct SystemClock;

impl RtcClock for SystemClock {
    fn now(&self) -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CalendarTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Sunday.
    weekday: u32,
}

/// Days since 1970-01-01 to a civil (proleptic Gregorian) date.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // March = 0
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A civil date to days since 1970-01-01.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year.rem_euclid(400);
    let month_index = i64::from((month + 9) % 12); // March = 0
    let day_of_year = (153 * month_index + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl CalendarTime {
    fn from_unix(seconds: i64) -> Self {
        let days = seconds.div_euclid(86_400);
        let in_day = seconds.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: in_day / 3600,
            minute: in_day / 60 % 60,
            second: in_day % 60,
            // 1970-01-01 was a Thursday.
            weekday: (days + 4).rem_euclid(7) as u32,
        }
    }

    /// None if the fields do not make a date.
    fn to_unix(self) -> Option<i64> {
        let valid = (1..=12).contains(&self.month)
            && self.day >= 1
            && self.day <= days_in_month(self.year, self.month)
            && self.hour < 24
            && self.minute < 60
            && self.second < 60;
        valid.then(|| {
            days_from_civil(self.year, self.month, self.day) * 86_400
                + i64::from(self.hour * 3600 + self.minute * 60 + self.second)
        })
    }
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    u32::from(v >> 4) * 10 + u32::from(v & 0x0f)
}

/// Interval of the periodic interrupt for register A's rate select, if it runs.
fn periodic_interval(register_a: u8) -> Option<Duration> {
    let rate = match register_a & A_RATE_MASK {
        0 => return None,
        // Rates 1 and 2 repeat rates 8 and 9 on a 32.768 kHz time base.
        1 => 8,
        2 => 9,
        r => r,
    };
    // Frequency = 32768 >> (rate - 1) Hz.
    Some(Duration::from_nanos(
        (1_000_000_000u64 << (rate - 1)) / 32_768,
    ))
}

struct RtcState {
    index: u8,
    nmi_disabled: bool,
    cmos: [u8; CMOS_SIZE],
    /// Guest time minus host time, in seconds.
    offset: i64,
    /// Register C's PF/AF/UF flags (and IRQF).
    flags: u8,
    /// Clock time up to which the flags are current.
    flags_checked: Duration,
}

/// What the timer thread and the device share.
struct Shared {
    state: Mutex<RtcState>,
    /// Woken when register B or A changes, or to stop.
    changed: Condvar,
    stop: AtomicBool,
    clock: Arc<dyn RtcClock>,
    irq: IrqLine,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, RtcState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RtcState {
    fn reg_b(&self) -> u8 {
        self.cmos[usize::from(REG_B)]
    }

    fn updates_halted(&self) -> bool {
        self.reg_b() & B_SET != 0
    }

    fn guest_seconds(&self, now: Duration) -> i64 {
        now.as_secs() as i64 + self.offset
    }

    fn encode(&self, value: u32) -> u8 {
        if self.reg_b() & B_BINARY != 0 {
            value as u8
        } else {
            to_bcd(value)
        }
    }

    fn decode(&self, value: u8) -> u32 {
        if self.reg_b() & B_BINARY != 0 {
            u32::from(value)
        } else {
            from_bcd(value)
        }
    }

    fn encode_hour(&self, hour: u32) -> u8 {
        if self.reg_b() & B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { 0x80 } else { 0 };
        let hour12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(hour12) | pm
    }

    fn decode_hour(&self, value: u8) -> u32 {
        if self.reg_b() & B_24H != 0 {
            return self.decode(value);
        }
        let hour12 = self.decode(value & 0x7f) % 12;
        if value & 0x80 != 0 {
            hour12 + 12
        } else {
            hour12
        }
    }

    /// The value of time register `reg` for the guest time `seconds`.
    fn time_register(&self, reg: u8, seconds: i64) -> u8 {
        let t = CalendarTime::from_unix(seconds);
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS => self.encode_hour(t.hour),
            REG_WEEKDAY => self.encode(t.weekday + 1),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u32),
            _ => self.encode(t.year.div_euclid(100).clamp(0, 99) as u32), // CMOS_CENTURY
        }
    }

    /// Copy the running time into the time registers (before the guest edits them).
    fn freeze_time(&mut self, now: Duration) {
        let seconds = self.guest_seconds(now);
        for reg in TIME_REGISTERS {
            self.cmos[usize::from(reg)] = self.time_register(reg, seconds);
        }
    }

    /// Take the time registers as the new guest time.
    fn adopt_time(&mut self, now: Duration) {
        let reg = |r: u8| self.cmos[usize::from(r)];
        let time = CalendarTime {
            year: i64::from(self.decode(reg(CMOS_CENTURY))) * 100
                + i64::from(self.decode(reg(REG_YEAR))),
            month: self.decode(reg(REG_MONTH)),
            day: self.decode(reg(REG_DAY)),
            hour: self.decode_hour(reg(REG_HOURS)),
            minute: self.decode(reg(REG_MINUTES)),
            second: self.decode(reg(REG_SECONDS)),
            weekday: 0,
        };
        match time.to_unix() {
            Some(seconds) => self.offset = seconds - now.as_secs() as i64,
            None => tracing::debug!(?time, "rtc: guest wrote an invalid time; ignored"),
        }
    }

    fn alarm_matches(&self, seconds: i64) -> bool {
        [
            (REG_SECONDS_ALARM, REG_SECONDS),
            (REG_MINUTES_ALARM, REG_MINUTES),
            (REG_HOURS_ALARM, REG_HOURS),
        ]
        .iter()
        .all(|&(alarm, reg)| {
            let alarm = self.cmos[usize::from(alarm)];
            alarm & ALARM_DONT_CARE == ALARM_DONT_CARE || alarm == self.time_register(reg, seconds)
        })
    }

    /// Bring register C up to `now`: an update ended at each second boundary passed, the
    /// alarm fired if one of those seconds matched it, and the periodic flag if a period
    /// ended. Returns true if IRQF just rose (the interrupt line goes active).
    fn update_flags(&mut self, now: Duration) -> bool {
        let last = self.flags_checked;
        if now <= last {
            // The clock stood still or went back: start counting from here.
            self.flags_checked = now;
            return false;
        }
        self.flags_checked = now;
        if !self.updates_halted() {
            let (from, to) = (last.as_secs(), now.as_secs());
            if to > from {
                self.flags |= C_UF;
                // Over a day, every alarm setting has matched at least once.
                let alarm = to - from >= 86_400
                    || (from + 1..=to).any(|s| self.alarm_matches(s as i64 + self.offset));
                if alarm {
                    self.flags |= C_AF;
                }
            }
        }
        if let Some(period) = periodic_interval(self.cmos[usize::from(REG_A)]) {
            let period = period.as_nanos();
            if now.as_nanos() / period > last.as_nanos() / period {
                self.flags |= C_PF;
            }
        }
        let was_active = self.flags & C_IRQF != 0;
        if self.flags & self.reg_b() & B_INTERRUPTS != 0 {
            self.flags |= C_IRQF;
        }
        !was_active && self.flags & C_IRQF != 0
    }

    /// When the next flag could be raised, for the timer thread.
    fn next_event(&self, now: Duration) -> Option<Duration> {
        let b = self.reg_b();
        let mut next = None;
        if b & (B_AIE | B_UIE) != 0 && !self.updates_halted() {
            next = Some(Duration::from_secs(now.as_secs() + 1));
        }
        if b & B_PIE != 0 {
            if let Some(period) = periodic_interval(self.cmos[usize::from(REG_A)]) {
                let period_ns = period.as_nanos();
                let boundary = (now.as_nanos() / period_ns + 1) * period_ns;
                let boundary = Duration::from_nanos(u64::try_from(boundary).unwrap_or(u64::MAX));
                next = Some(next.map_or(boundary, |n: Duration| n.min(boundary)));
            }
        }
        next
    }
}

/// The RTC/CMOS device; a [`BusDevice`] covering [`RTC_PORT_COUNT`] ports at 0x70.
pub struct Rtc {
    shared: Arc<Shared>,
    timer: Option<JoinHandle<()>>,
}

impl Rtc {
    /// An RTC on the host's clock, raising `irq` (GSI 8).
    pub fn new(irq: IrqLine) -> Self {
        Self::with_clock(irq, Arc::new(SystemClock))
    }

    /// An RTC reading its time from `clock` (tests use a fake one).
    pub fn with_clock(irq: IrqLine, clock: Arc<dyn RtcClock>) -> Self {
        let mut cmos = [0u8; CMOS_SIZE];
        cmos[usize::from(REG_A)] = A_DEFAULT;
        cmos[usize::from(REG_B)] = B_DEFAULT;
        cmos[usize::from(REG_D)] = D_VALID;
        let now = clock.now();
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(RtcState {
                    index: 0,
                    nmi_disabled: false,
                    cmos,
                    offset: 0,
                    flags: 0,
                    flags_checked: now,
                }),
                changed: Condvar::new(),
                stop: AtomicBool::new(false),
                clock,
                irq,
            }),
            timer: None,
        }
    }

    /// Set a plain CMOS byte (for firmware-style information such as memory sizes).
    /// Clock registers (0x00..=0x0d) are left to the guest.
    pub fn set_cmos_byte(&mut self, index: u8, value: u8) {
        if (0x0e..CMOS_SIZE as u8).contains(&index) {
            self.shared.lock().cmos[usize::from(index)] = value;
        }
    }

    /// Whether the guest has NMIs masked through bit 7 of the index port.
    pub fn nmi_disabled(&self) -> bool {
        self.shared.lock().nmi_disabled
    }

    /// The guest's clock offset from the host's, in seconds (for snapshots and tests).
    pub fn offset_seconds(&self) -> i64 {
        self.shared.lock().offset
    }

    pub fn set_offset_seconds(&mut self, offset: i64) {
        self.shared.lock().offset = offset;
    }

    fn pulse(&self) {
        if let Err(e) = self.shared.irq.pulse() {
            tracing::warn!("rtc: failed to raise the interrupt: {e}");
        }
    }

    fn read_data(&mut self) -> u8 {
        let now = self.shared.clock.now();
        let mut st = self.shared.lock();
        let raised = st.update_flags(now);
        let reg = st.index;
        let value = match reg {
            REG_A => {
                let mut a = st.cmos[usize::from(REG_A)] & !A_UIP;
                let to_next_second =
                    Duration::from_secs(1) - Duration::from_nanos(u64::from(now.subsec_nanos()));
                if !st.updates_halted() && to_next_second <= UIP_LEAD {
                    a |= A_UIP;
                }
                a
            }
            REG_C => std::mem::take(&mut st.flags),
            REG_D => D_VALID,
            r if TIME_REGISTERS.contains(&r) && !st.updates_halted() => {
                let seconds = st.guest_seconds(now);
                st.time_register(r, seconds)
            }
            r => st.cmos[usize::from(r)],
        };
        drop(st);
        if raised {
            self.pulse();
        }
        value
    }

    fn write_data(&mut self, value: u8) {
        let now = self.shared.clock.now();
        let mut st = self.shared.lock();
        st.update_flags(now);
        let reg = st.index;
        match reg {
            REG_A => {
                st.cmos[usize::from(REG_A)] = value & !A_UIP;
            }
            REG_B => {
                let old = st.reg_b();
                let mut new = value;
                if new & B_SET != 0 {
                    // Setting SET stops updates and, per the datasheet, clears UIE.
                    new &= !B_UIE;
                }
                st.cmos[usize::from(REG_B)] = new;
                if old & B_SET == 0 && new & B_SET != 0 {
                    // Snapshot in the new format, which is the one the guest will use.
                    st.freeze_time(now);
                } else if old & B_SET != 0 && new & B_SET == 0 {
                    // The guest finished setting the time.
                    st.adopt_time(now);
                }
            }
            REG_C | REG_D => {} // Read-only.
            r if TIME_REGISTERS.contains(&r) => {
                if st.updates_halted() {
                    st.cmos[usize::from(r)] = value;
                } else {
                    // A direct write while the clock runs sets that field now.
                    st.freeze_time(now);
                    st.cmos[usize::from(r)] = value;
                    st.adopt_time(now);
                }
            }
            r => st.cmos[usize::from(r)] = value,
        }
        // Enabling an interrupt whose flag is already up raises it at once.
        let was_active = st.flags & C_IRQF != 0;
        if st.flags & st.reg_b() & B_INTERRUPTS != 0 {
            st.flags |= C_IRQF;
        }
        let raised = !was_active && st.flags & C_IRQF != 0;
        let wants_timer = st.reg_b() & B_INTERRUPTS != 0;
        drop(st);
        if raised {
            self.pulse();
        }
        if matches!(reg, REG_A | REG_B) {
            self.shared.changed.notify_all();
            if wants_timer {
                self.start_timer();
            }
        }
    }

    /// Start the interrupt timer thread the first time the guest enables an interrupt.
    fn start_timer(&mut self) {
        if self.timer.is_some() {
            return;
        }
        let shared = self.shared.clone();
        match std::thread::Builder::new()
            .name("rtc-timer".to_string())
            .spawn(move || run_timer(&shared))
        {
            Ok(handle) => self.timer = Some(handle),
            Err(e) => tracing::warn!("rtc: cannot start the interrupt timer: {e}"),
        }
    }
}

/// Name of the RTC's state in snapshots and their errors.
const SNAPSHOT_NAME: &str = "rtc";

/// [`RtcState`] for snapshots: serde derives no arrays of 128, hence the `Vec`.
#[derive(Serialize, Deserialize)]
struct RtcSnapshot {
    index: u8,
    nmi_disabled: bool,
    cmos: Vec<u8>,
    /// Guest minus host wall-clock seconds: the guest's time goes on from the host's UTC
    /// on the destination too.
    offset: i64,
    flags: u8,
    /// Host clock time; on a destination whose clock is behind, flags restart from its now.
    flags_checked: Duration,
}

impl Snapshottable for Rtc {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        let snapshot = {
            let st = self.shared.lock();
            RtcSnapshot {
                index: st.index,
                nmi_disabled: st.nmi_disabled,
                cmos: st.cmos.to_vec(),
                offset: st.offset,
                flags: st.flags,
                flags_checked: st.flags_checked,
            }
        };
        encode(SNAPSHOT_NAME, &snapshot)
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let snapshot: RtcSnapshot = decode(SNAPSHOT_NAME, state)?;
        let invalid = |message: String| SnapshotError::Decode {
            what: SNAPSHOT_NAME,
            message,
        };
        let cmos = <[u8; CMOS_SIZE]>::try_from(snapshot.cmos.as_slice()).map_err(|_| {
            invalid(format!(
                "{} CMOS bytes instead of {CMOS_SIZE}",
                snapshot.cmos.len()
            ))
        })?;
        // The index port keeps 7 bits; a wider index would address past the CMOS.
        if usize::from(snapshot.index) >= CMOS_SIZE {
            return Err(invalid(format!("CMOS index {:#x}", snapshot.index)));
        }
        let wants_timer = {
            let mut st = self.shared.lock();
            *st = RtcState {
                index: snapshot.index,
                nmi_disabled: snapshot.nmi_disabled,
                cmos,
                offset: snapshot.offset,
                flags: snapshot.flags,
                flags_checked: snapshot.flags_checked,
            };
            st.reg_b() & B_INTERRUPTS != 0
        };
        // A running timer reprograms itself from the new registers A and B; a guest with
        // interrupts enabled needs one running.
        self.shared.changed.notify_all();
        if wants_timer {
            self.start_timer();
        }
        Ok(())
    }
}

/// Raise the RTC's interrupts on time while the guest has them enabled.
fn run_timer(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let now = shared.clock.now();
        if st.update_flags(now) {
            if let Err(e) = shared.irq.pulse() {
                tracing::warn!("rtc: failed to raise the interrupt: {e}");
            }
        }
        // Without an enabled interrupt, sleep until the guest changes A or B.
        let wait = match st.next_event(now) {
            Some(at) => at.saturating_sub(now).max(Duration::from_micros(50)),
            None => Duration::from_secs(3600),
        };
        st = shared
            .changed
            .wait_timeout(st, wait)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

impl Drop for Rtc {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        if let Some(timer) = self.timer.take() {
            let _ = timer.join();
        }
    }
}

impl BusDevice for Rtc {
    /// Port 0x70 is write-only (reads 0xff); 0x71 reads the selected register. Wider
    /// accesses are split into byte accesses.
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset + i as u64 {
                1 => self.read_data(),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            match offset + i as u64 {
                0 => {
                    let mut st = self.shared.lock();
                    st.index = byte & 0x7f;
                    st.nmi_disabled = byte & 0x80 != 0;
                }
                1 => self.write_data(byte),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::interrupt::test_util::RecordingIrqChip;

    /// A clock the test moves by hand.
    struct FakeClock(Mutex<Duration>);

    impl RtcClock for FakeClock {
        fn now(&self) -> Duration {
            *self.0.lock().unwrap()
        }
    }

    impl FakeClock {
        fn advance(&self, d: Duration) {
            *self.0.lock().unwrap() += d;
        }
    }

    /// 2024-02-29 13:45:07 UTC, a Thursday.
    const KNOWN_TIME: u64 = 1_709_214_307;

    fn rtc_at(seconds: u64) -> (Rtc, Arc<FakeClock>, Arc<RecordingIrqChip>) {
        let clock = Arc::new(FakeClock(Mutex::new(Duration::from_secs(seconds))));
        let chip = Arc::new(RecordingIrqChip::default());
        let rtc = Rtc::with_clock(IrqLine::new(chip.clone(), 8), clock.clone());
        (rtc, clock, chip)
    }

    fn read(rtc: &mut Rtc, reg: u8) -> u8 {
        rtc.write(0, &[reg]);
        let mut d = [0];
        rtc.read(1, &mut d);
        d[0]
    }

    fn write(rtc: &mut Rtc, reg: u8, value: u8) {
        rtc.write(0, &[reg]);
        rtc.write(1, &[value]);
    }

    fn time_registers(rtc: &mut Rtc) -> [u8; 8] {
        TIME_REGISTERS.map(|r| read(rtc, r))
    }

    #[test]
    fn calendar_conversions() {
        let t = CalendarTime::from_unix(KNOWN_TIME as i64);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second, t.weekday),
            (2024, 2, 29, 13, 45, 7, 4)
        );
        assert_eq!(t.to_unix(), Some(KNOWN_TIME as i64));
        assert_eq!(CalendarTime::from_unix(0).weekday, 4);
        for s in [0i64, 951_782_400, 4_107_542_399, 946_684_799] {
            assert_eq!(CalendarTime::from_unix(s).to_unix(), Some(s));
        }
        let mut bad = t;
        bad.day = 30;
        assert_eq!(bad.to_unix(), None);
    }

    #[test]
    fn bcd_read_of_a_known_time() {
        let (mut rtc, _clock, _chip) = rtc_at(KNOWN_TIME);
        // sec, min, hour, weekday (Sunday = 1), day, month, year, century.
        assert_eq!(
            time_registers(&mut rtc),
            [0x07, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
        assert_eq!(read(&mut rtc, REG_A), A_DEFAULT);
        assert_eq!(read(&mut rtc, REG_B), B_24H);
        assert_eq!(read(&mut rtc, REG_D), 0x80);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let (mut rtc, clock, _chip) = rtc_at(KNOWN_TIME);
        write(&mut rtc, REG_B, B_24H | B_BINARY);
        assert_eq!(time_registers(&mut rtc), [7, 45, 13, 5, 29, 2, 24, 20]);
        write(&mut rtc, REG_B, B_BINARY);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x81, "1 PM");
        write(&mut rtc, REG_B, 0);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x81, "1 PM in BCD");
        clock.advance(Duration::from_secs(11 * 3600)); // 00:45
        assert_eq!(read(&mut rtc, REG_HOURS), 0x12, "12 AM");
        clock.advance(Duration::from_secs(12 * 3600)); // 12:45
        assert_eq!(read(&mut rtc, REG_HOURS), 0x92, "12 PM");
    }

    #[test]
    fn setting_the_time_applies_an_offset() {
        let (mut rtc, clock, _chip) = rtc_at(KNOWN_TIME);
        write(&mut rtc, REG_B, B_SET | B_24H);
        // Frozen while SET: the clock advancing does not show.
        clock.advance(Duration::from_secs(3));
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x07);
        // 2031-12-31 23:59:50
        for (reg, v) in [
            (REG_SECONDS, 0x50),
            (REG_MINUTES, 0x59),
            (REG_HOURS, 0x23),
            (REG_DAY, 0x31),
            (REG_MONTH, 0x12),
            (REG_YEAR, 0x31),
        ] {
            write(&mut rtc, reg, v);
        }
        write(&mut rtc, REG_B, B_24H);
        let expected = CalendarTime {
            year: 2031,
            month: 12,
            day: 31,
            hour: 23,
            minute: 59,
            second: 50,
            weekday: 0,
        }
        .to_unix()
        .unwrap();
        assert_eq!(rtc.offset_seconds(), expected - (KNOWN_TIME as i64 + 3));
        clock.advance(Duration::from_secs(15));
        // 2032-01-01 00:00:05, a Thursday.
        assert_eq!(
            time_registers(&mut rtc),
            [0x05, 0x00, 0x00, 0x05, 0x01, 0x01, 0x32, 0x20]
        );
    }

    #[test]
    fn direct_time_register_write_moves_the_clock() {
        let (mut rtc, _clock, _chip) = rtc_at(KNOWN_TIME);
        write(&mut rtc, REG_MINUTES, 0x50);
        assert_eq!(rtc.offset_seconds(), 5 * 60);
        assert_eq!(read(&mut rtc, REG_MINUTES), 0x50);
        assert_eq!(read(&mut rtc, REG_HOURS), 0x13);
        // An invalid date is ignored.
        write(&mut rtc, REG_MONTH, 0x13);
        assert_eq!(rtc.offset_seconds(), 5 * 60);
    }

    #[test]
    fn update_in_progress_near_the_second_boundary() {
        let (mut rtc, clock, _chip) = rtc_at(KNOWN_TIME);
        clock.advance(Duration::from_millis(500));
        assert_eq!(read(&mut rtc, REG_A) & A_UIP, 0);
        clock.advance(Duration::from_micros(499_900));
        assert_eq!(read(&mut rtc, REG_A) & A_UIP, A_UIP);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x07, "still the old second");
        clock.advance(Duration::from_micros(200));
        assert_eq!(read(&mut rtc, REG_A) & A_UIP, 0);
        assert_eq!(read(&mut rtc, REG_SECONDS), 0x08);
    }

    #[test]
    fn register_c_flags_and_interrupts() {
        let (mut rtc, clock, chip) = rtc_at(KNOWN_TIME);
        assert_eq!(read(&mut rtc, REG_C), 0);
        clock.advance(Duration::from_millis(2));
        assert_eq!(read(&mut rtc, REG_C), C_PF, "1024 Hz periodic flag");
        write(&mut rtc, REG_A, 0x20); // Periodic rate off.
        clock.advance(Duration::from_secs(1));
        assert_eq!(read(&mut rtc, REG_C), C_UF, "flag without interrupt enable");
        assert_eq!(read(&mut rtc, REG_C), 0, "read clears");
        assert_eq!(chip.edges(8), 0);
        // Alarm at 13:45:10 with update interrupts on.
        write(&mut rtc, REG_SECONDS_ALARM, 0x10);
        write(&mut rtc, REG_MINUTES_ALARM, 0x45);
        write(&mut rtc, REG_HOURS_ALARM, ALARM_DONT_CARE);
        write(&mut rtc, REG_B, B_24H | B_UIE | B_AIE);
        clock.advance(Duration::from_secs(1)); // :09
        assert_eq!(read(&mut rtc, REG_A) & A_UIP, 0);
        assert_eq!(chip.edges(8), 1, "update-ended interrupt");
        assert_eq!(read(&mut rtc, REG_C), C_IRQF | C_UF);
        clock.advance(Duration::from_secs(1)); // :10
        assert_eq!(read(&mut rtc, REG_C), C_IRQF | C_UF | C_AF);
        assert_eq!(chip.edges(8), 2);
        write(&mut rtc, REG_B, B_24H);
    }

    #[test]
    fn cmos_memory_and_index_port() {
        let (mut rtc, _clock, _chip) = rtc_at(KNOWN_TIME);
        write(&mut rtc, 0x40, 0xab);
        assert_eq!(read(&mut rtc, 0x40), 0xab);
        // Bit 7 of the index masks NMI and is not part of the index.
        rtc.write(0, &[0x80 | 0x40]);
        assert!(rtc.nmi_disabled());
        let mut d = [0];
        rtc.read(1, &mut d);
        assert_eq!(d[0], 0xab);
        rtc.read(0, &mut d);
        assert_eq!(d[0], 0xff, "the index port is write-only");
        write(&mut rtc, REG_D, 0);
        assert_eq!(read(&mut rtc, REG_D), 0x80);
        rtc.set_cmos_byte(0x34, 0x12);
        assert_eq!(read(&mut rtc, 0x34), 0x12);
    }

    #[test]
    fn periodic_interrupt_from_the_timer() {
        let chip = Arc::new(RecordingIrqChip::default());
        let mut rtc = Rtc::new(IrqLine::new(chip.clone(), 8));
        write(&mut rtc, REG_A, 0x26); // 1024 Hz
        write(&mut rtc, REG_B, B_24H | B_PIE);
        let wait = |n: usize| {
            for _ in 0..200 {
                if chip.edges(8) >= n {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            panic!("no periodic interrupt");
        };
        wait(1);
        assert_eq!(read(&mut rtc, REG_C) & (C_IRQF | C_PF), C_IRQF | C_PF);
        wait(2);
        write(&mut rtc, REG_B, B_24H);
        drop(rtc);
    }

    #[test]
    fn snapshot_restores_time_cmos_flags_and_index() {
        let (mut rtc, clock, _chip) = rtc_at(KNOWN_TIME);
        write(&mut rtc, REG_MINUTES, 0x50); // Guest time 5 minutes ahead.
        write(&mut rtc, REG_B, B_24H | B_BINARY);
        write(&mut rtc, REG_A, 0x20); // No periodic flag.
        write(&mut rtc, REG_SECONDS_ALARM, 9);
        write(&mut rtc, REG_MINUTES_ALARM, ALARM_DONT_CARE);
        write(&mut rtc, REG_HOURS_ALARM, ALARM_DONT_CARE);
        write(&mut rtc, 0x40, 0xab);
        rtc.set_cmos_byte(0x7f, 0xcd);
        clock.advance(Duration::from_secs(2)); // Update-ended and alarm flags, unread.
        rtc.write(0, &[0x80 | 0x40]); // NMI masked, index at a plain CMOS byte.
        let saved = rtc.save().unwrap();

        let (mut fresh, fresh_clock, fresh_chip) = rtc_at(KNOWN_TIME + 2);
        fresh.restore(&saved).unwrap();
        assert_eq!(fresh_chip.edges(8), 0);
        assert!(fresh.nmi_disabled());
        assert_eq!(fresh.offset_seconds(), 5 * 60);
        let mut d = [0];
        fresh.read(1, &mut d);
        assert_eq!(d[0], 0xab, "the index port's selection survived");
        assert_eq!(read(&mut fresh, 0x7f), 0xcd);
        assert_eq!(read(&mut fresh, REG_B), B_24H | B_BINARY);
        assert_eq!(read(&mut fresh, REG_A), 0x20);
        assert_eq!(read(&mut fresh, REG_C), C_UF | C_AF);
        // 2024-02-29 13:50:09 in binary.
        assert_eq!(time_registers(&mut fresh), [9, 50, 13, 5, 29, 2, 24, 20]);
        fresh_clock.advance(Duration::from_secs(1));
        clock.advance(Duration::from_secs(1));
        assert_eq!(time_registers(&mut fresh), time_registers(&mut rtc));
        assert_eq!(read(&mut fresh, REG_C), C_UF);
    }

    #[test]
    fn snapshot_restore_restarts_the_periodic_timer() {
        let chip = Arc::new(RecordingIrqChip::default());
        let mut rtc = Rtc::new(IrqLine::new(chip, 8));
        write(&mut rtc, REG_A, 0x26); // 1024 Hz
        write(&mut rtc, REG_B, B_24H | B_PIE);
        let saved = rtc.save().unwrap();
        write(&mut rtc, REG_B, B_24H);
        drop(rtc);

        let chip = Arc::new(RecordingIrqChip::default());
        let mut fresh = Rtc::new(IrqLine::new(chip.clone(), 8));
        fresh.restore(&saved).unwrap();
        for _ in 0..200 {
            if chip.edges(8) >= 2 {
                break;
            }
            read(&mut fresh, REG_C); // Acknowledge, so the next period interrupts again.
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(chip.edges(8) >= 2, "no periodic interrupt after restore");
        write(&mut fresh, REG_B, B_24H);
    }

    #[test]
    fn snapshot_refuses_bad_state() {
        let (mut rtc, _clock, _chip) = rtc_at(KNOWN_TIME);
        write(&mut rtc, 0x40, 0x12);
        let saved = rtc.save().unwrap();
        let (mut fresh, _clock, _chip) = rtc_at(KNOWN_TIME);
        write(&mut fresh, 0x40, 0x34);
        for len in 0..saved.len() {
            assert!(fresh.restore(&saved[..len]).is_err(), "{len} bytes");
        }
        let snapshot: RtcSnapshot = decode(SNAPSHOT_NAME, &saved).unwrap();
        let short = RtcSnapshot {
            cmos: vec![0; CMOS_SIZE - 1],
            ..snapshot
        };
        assert!(fresh
            .restore(&encode(SNAPSHOT_NAME, &short).unwrap())
            .is_err());
        let wide_index = RtcSnapshot {
            cmos: vec![0; CMOS_SIZE],
            index: 0x80,
            ..short
        };
        assert!(fresh
            .restore(&encode(SNAPSHOT_NAME, &wide_index).unwrap())
            .is_err());
        assert_eq!(
            read(&mut fresh, 0x40),
            0x34,
            "a refused state changes nothing"
        );
    }
}
