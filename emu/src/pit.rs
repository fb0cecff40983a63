//! The 8254 programmable interval timer (ports 0x40-0x43) and the port 0x61 bits wired to
//! it (channel 2 gate, speaker enable, channel 2 output, refresh toggle). Counters are not
//! stepped: each channel remembers the guest time its count was loaded and derives its
//! count and output from the [`VirtualClock`], so a paused VM's PIT stands still too.
//! Channel 0 drives IRQ0: [`Pit::poll`] reports the rising edges of its output that have
//! happened since the last poll.

use std::sync::Arc;
use std::time::Instant;

use crate::clock::VirtualClock;
use serde::{Deserialize, Serialize};

/// The PIT input clock.
pub const PIT_HZ: u64 = 1_193_182;

/// I/O ports.
pub const PIT_PORT_CHANNEL0: u16 = 0x40;
pub const PIT_PORT_CHANNEL2: u16 = 0x42;
pub const PIT_PORT_COMMAND: u16 = 0x43;
pub const PORT_SYSTEM_CONTROL_B: u16 = 0x61;

/// Read/write access states (also the RW field of the command: 1 LSB, 2 MSB, 3 LSB+MSB).
const ACCESS_LSB: u8 = 1;
const ACCESS_MSB: u8 = 2;
const ACCESS_WORD_LOW: u8 = 3;
const ACCESS_WORD_HIGH: u8 = 4;

/// Length of a DRAM refresh cycle as seen through port 0x61 bit 4 (about 15 µs).
const REFRESH_PERIOD_NS: u64 = 15_085;

fn ns_to_ticks(ns: u64) -> u64 {
    (u128::from(ns) * u128::from(PIT_HZ) / 1_000_000_000) as u64
}

/// The first guest ns at which `ticks` input clocks have elapsed.
fn ticks_to_ns(ticks: u64) -> u64 {
    (u128::from(ticks) * 1_000_000_000).div_ceil(u128::from(PIT_HZ)) as u64
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Channel {
    mode: u8,
    bcd: bool,
    access: u8,
    read_state: u8,
    write_state: u8,
    write_low: u8,
    /// Reload value, 1..=0x10000 (a written 0 means 0x10000).
    count: u64,
    /// Tick at which counting started; None until a count is written after a mode set.
    load_tick: Option<u64>,
    latched_count: Option<u16>,
    latched_state: u8,
    latched_status: Option<u8>,
    gate: bool,
}

impl Channel {
    fn new(gate: bool) -> Self {
        Self {
            mode: 0,
            bcd: false,
            access: ACCESS_WORD_LOW,
            read_state: ACCESS_WORD_LOW,
            write_state: ACCESS_WORD_LOW,
            write_low: 0,
            count: 0x10000,
            load_tick: None,
            latched_count: None,
            latched_state: 0,
            latched_status: None,
            gate,
        }
    }

    fn periodic(&self) -> bool {
        matches!(self.mode, 2 | 3)
    }

    /// The counting element's value at tick `now`.
    fn count_at(&self, now: u64) -> u16 {
        let Some(load) = self.load_tick else {
            return self.count as u16;
        };
        let elapsed = now.saturating_sub(load);
        let value = match self.mode {
            2 => self.count - elapsed % self.count,
            3 => self.count - (2 * elapsed) % self.count,
            _ => self.count.wrapping_sub(elapsed) & 0xffff,
        };
        value as u16
    }

    /// The OUT pin at tick `now`.
    fn output_at(&self, now: u64) -> bool {
        let Some(load) = self.load_tick else {
            // After a mode set, OUT is low in mode 0 and high in the others.
            return self.mode != 0;
        };
        let elapsed = now.saturating_sub(load);
        match self.mode {
            0 | 1 => elapsed >= self.count,
            2 => elapsed % self.count != self.count - 1,
            3 => elapsed % self.count < self.count.div_ceil(2),
            _ => elapsed != self.count,
        }
    }

    /// The first rising edge of OUT strictly after counting started, at or after `from`.
    fn next_edge(&self, from: u64) -> Option<u64> {
        let load = self.load_tick?;
        let first = load + self.count;
        if !self.periodic() {
            return (first >= from).then_some(first);
        }
        if from <= first {
            return Some(first);
        }
        let periods = (from - load).div_ceil(self.count);
        Some(load + periods * self.count)
    }

    fn status(&self, now: u64) -> u8 {
        (u8::from(self.output_at(now)) << 7)
            | (self.access << 4)
            | (self.mode << 1)
            | u8::from(self.bcd)
    }
}

/// The 8254's channels and port 0x61, as a snapshot keeps them (times in guest ticks).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PitState {
    channels: [Channel; 3],
    irq_next_tick: Option<u64>,
    speaker_enable: bool,
}

/// The 8254 and port 0x61.
pub struct Pit {
    clock: Arc<VirtualClock>,
    channels: [Channel; 3],
    /// Tick of the next channel 0 rising edge not yet reported by `poll`.
    irq_next_tick: Option<u64>,
    speaker_enable: bool,
}

impl Pit {
    pub fn save(&self) -> PitState {
        PitState {
            channels: self.channels.clone(),
            irq_next_tick: self.irq_next_tick,
            speaker_enable: self.speaker_enable,
        }
    }

    /// The channels in the portable form (load times as guest ns).
    pub fn export(&self) -> [crate::portable::PortablePitChannel; 3] {
        std::array::from_fn(|i| {
            let c = &self.channels[i];
            crate::portable::PortablePitChannel {
                count: c.count as u32,
                load_ns: c.load_tick.map(ticks_to_ns),
                latched_count: c.latched_count,
                latched_state: c.latched_state,
                latched_status: c.latched_status,
                read_state: c.read_state,
                write_state: c.write_state,
                write_low: c.write_low,
                access: c.access,
                mode: c.mode,
                bcd: c.bcd,
                gate: c.gate,
            }
        })
    }

    /// Take portable channels (the guest clock is already where they were saved).
    pub fn import(&mut self, channels: &[crate::portable::PortablePitChannel; 3]) {
        let access = |a: u8| {
            if (ACCESS_LSB..=ACCESS_WORD_HIGH).contains(&a) {
                a
            } else {
                ACCESS_WORD_LOW
            }
        };
        for (c, p) in self.channels.iter_mut().zip(channels) {
            c.count = u64::from(p.count.clamp(1, 0x10000));
            c.load_tick = p.load_ns.map(ns_to_ticks);
            c.latched_count = p.latched_count;
            c.latched_state = p.latched_state;
            c.latched_status = p.latched_status;
            c.read_state = access(p.read_state);
            c.write_state = access(p.write_state);
            c.write_low = p.write_low;
            c.access = access(p.access);
            c.mode = p.mode & 7;
            c.bcd = p.bcd;
            c.gate = p.gate;
        }
        self.rearm_irq();
    }

    pub fn restore(&mut self, s: &PitState) {
        self.channels = s.channels.clone();
        self.irq_next_tick = s.irq_next_tick;
        self.speaker_enable = s.speaker_enable;
    }

    pub fn new(clock: Arc<VirtualClock>) -> Self {
        Self {
            clock,
            channels: [Channel::new(true), Channel::new(true), Channel::new(false)],
            irq_next_tick: None,
            speaker_enable: false,
        }
    }

    /// Back to the power-on state: nothing programmed, channel 2 gate low.
    pub fn reset(&mut self) {
        self.channels = [Channel::new(true), Channel::new(true), Channel::new(false)];
        self.irq_next_tick = None;
        self.speaker_enable = false;
    }

    fn now_tick(&self) -> u64 {
        ns_to_ticks(self.clock.now_ns())
    }

    fn rearm_irq(&mut self) {
        let now = self.now_tick();
        self.irq_next_tick = self.channels[0].next_edge(now);
    }

    fn load_count(&mut self, index: usize, value: u16) {
        let now = self.now_tick();
        let channel = &mut self.channels[index];
        channel.count = if value == 0 {
            0x10000
        } else {
            u64::from(value)
        };
        // Modes 1 and 5 wait for a gate trigger; the others start now (gate permitting).
        channel.load_tick = if matches!(channel.mode, 1 | 5) && index != 0 {
            None
        } else {
            Some(now)
        };
        if index == 0 {
            self.rearm_irq();
        }
    }

    fn write_command(&mut self, value: u8) {
        let now = self.now_tick();
        let select = value >> 6;
        if select == 3 {
            // Read-back: bit 5 clear latches counts, bit 4 clear latches status.
            for index in 0..3 {
                if value & (2 << index) == 0 {
                    continue;
                }
                let channel = &mut self.channels[index];
                if value & 0x20 == 0 && channel.latched_count.is_none() {
                    channel.latched_count = Some(channel.count_at(now));
                    channel.latched_state = channel.access;
                }
                if value & 0x10 == 0 && channel.latched_status.is_none() {
                    channel.latched_status = Some(channel.status(now));
                }
            }
            return;
        }
        let index = usize::from(select);
        let access = (value >> 4) & 3;
        let channel = &mut self.channels[index];
        if access == 0 {
            if channel.latched_count.is_none() {
                channel.latched_count = Some(channel.count_at(now));
                channel.latched_state = channel.access;
            }
            return;
        }
        let mode = (value >> 1) & 7;
        channel.mode = if mode >= 6 { mode - 4 } else { mode };
        channel.bcd = value & 1 != 0;
        channel.access = access;
        channel.read_state = access;
        channel.write_state = access;
        channel.load_tick = None;
        if index == 0 {
            self.irq_next_tick = None;
        }
    }

    fn write_data(&mut self, index: usize, value: u8) {
        let channel = &mut self.channels[index];
        match channel.write_state {
            ACCESS_LSB => self.load_count(index, u16::from(value)),
            ACCESS_MSB => self.load_count(index, u16::from(value) << 8),
            ACCESS_WORD_LOW => {
                channel.write_low = value;
                channel.write_state = ACCESS_WORD_HIGH;
            }
            _ => {
                channel.write_state = ACCESS_WORD_LOW;
                let low = channel.write_low;
                self.load_count(index, u16::from_le_bytes([low, value]));
            }
        }
    }

    fn read_data(&mut self, index: usize) -> u8 {
        let now = self.now_tick();
        let channel = &mut self.channels[index];
        if let Some(status) = channel.latched_status.take() {
            return status;
        }
        if let Some(latched) = channel.latched_count {
            let [low, high] = latched.to_le_bytes();
            return match channel.latched_state {
                ACCESS_LSB => {
                    channel.latched_count = None;
                    low
                }
                ACCESS_MSB => {
                    channel.latched_count = None;
                    high
                }
                _ => {
                    // Low byte now, high byte on the next read.
                    channel.latched_state = ACCESS_MSB;
                    low
                }
            };
        }
        let [low, high] = channel.count_at(now).to_le_bytes();
        match channel.read_state {
            ACCESS_LSB => low,
            ACCESS_MSB => high,
            ACCESS_WORD_LOW => {
                channel.read_state = ACCESS_WORD_HIGH;
                low
            }
            _ => {
                channel.read_state = ACCESS_WORD_LOW;
                high
            }
        }
    }

    fn set_gate2(&mut self, gate: bool) {
        let now = self.now_tick();
        let channel = &mut self.channels[2];
        let rising = gate && !channel.gate;
        channel.gate = gate;
        // A gate trigger (re)starts the count in modes 1, 2, 3 and 5.
        if rising && matches!(channel.mode, 1 | 2 | 3 | 5) && channel.count != 0 {
            let armed = channel.load_tick.is_some() || matches!(channel.mode, 1 | 5);
            if armed {
                channel.load_tick = Some(now);
            }
        }
    }

    pub fn read_port(&mut self, port: u16) -> u8 {
        match port {
            0x40..=0x42 => self.read_data(usize::from(port - 0x40)),
            PORT_SYSTEM_CONTROL_B => {
                let now_ns = self.clock.now_ns();
                let out2 = self.channels[2].output_at(ns_to_ticks(now_ns));
                u8::from(self.channels[2].gate)
                    | (u8::from(self.speaker_enable) << 1)
                    | (u8::from((now_ns / REFRESH_PERIOD_NS) & 1 == 1) << 4)
                    | (u8::from(out2) << 5)
            }
            _ => 0xff,
        }
    }

    pub fn write_port(&mut self, port: u16, value: u8) {
        match port {
            0x40..=0x42 => self.write_data(usize::from(port - 0x40), value),
            PIT_PORT_COMMAND => self.write_command(value),
            PORT_SYSTEM_CONTROL_B => {
                self.speaker_enable = value & 2 != 0;
                self.set_gate2(value & 1 != 0);
            }
            _ => {}
        }
    }

    /// Rising edges of channel 0's output (IRQ0) since the last poll.
    pub fn poll(&mut self) -> u32 {
        let Some(next) = self.irq_next_tick else {
            return 0;
        };
        let now = self.now_tick();
        if now < next {
            return 0;
        }
        let channel = &self.channels[0];
        if channel.periodic() {
            let edges = (now - next) / channel.count + 1;
            self.irq_next_tick = Some(next + edges * channel.count);
            u32::try_from(edges).unwrap_or(u32::MAX)
        } else {
            self.irq_next_tick = None;
            1
        }
    }

    /// Host time of the next IRQ0 edge.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.irq_next_tick
            .map(|tick| self.clock.host_deadline(ticks_to_ns(tick)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Arc<VirtualClock>, Pit) {
        let clock = Arc::new(VirtualClock::new_manual());
        let pit = Pit::new(clock.clone());
        (clock, pit)
    }

    fn advance_ticks(clock: &VirtualClock, ticks: u64) {
        let now = clock.now_ns();
        let target = ticks_to_ns(ns_to_ticks(now) + ticks);
        clock.advance(target - now);
    }

    #[test]
    fn mode2_period_and_irq_edges() {
        let (clock, mut pit) = setup();
        assert_eq!(pit.poll(), 0);
        assert!(pit.next_deadline().is_none());
        // Channel 0, lo/hi, mode 2, count 1000.
        pit.write_port(0x43, 0x34);
        pit.write_port(0x40, 0xe8);
        pit.write_port(0x40, 0x03);
        assert!(pit.next_deadline().is_some());
        advance_ticks(&clock, 999);
        assert_eq!(pit.poll(), 0);
        advance_ticks(&clock, 1);
        assert_eq!(pit.poll(), 1);
        assert_eq!(pit.poll(), 0);
        advance_ticks(&clock, 3000);
        assert_eq!(pit.poll(), 3);
        advance_ticks(&clock, 999);
        assert_eq!(pit.poll(), 0);
        advance_ticks(&clock, 1);
        assert_eq!(pit.poll(), 1);
    }

    #[test]
    fn counter_latch_and_readback() {
        let (clock, mut pit) = setup();
        pit.write_port(0x43, 0x34);
        pit.write_port(0x40, 0x00);
        pit.write_port(0x40, 0x10); // 0x1000
        advance_ticks(&clock, 0x100);
        // Latch channel 0, then time moves on: the latched value is read.
        pit.write_port(0x43, 0x00);
        advance_ticks(&clock, 0x10);
        let low = pit.read_port(0x40);
        let high = pit.read_port(0x40);
        assert_eq!(u16::from_le_bytes([low, high]), 0x0f00);
        // Unlatched read follows the counter.
        let low = pit.read_port(0x40);
        let high = pit.read_port(0x40);
        assert_eq!(u16::from_le_bytes([low, high]), 0x0ef0);
        // Read-back status + count of channel 0.
        pit.write_port(0x43, 0xc2);
        assert_eq!(pit.read_port(0x40), 0x80 | 0x30 | 0x04);
        let low = pit.read_port(0x40);
        let high = pit.read_port(0x40);
        assert_eq!(u16::from_le_bytes([low, high]), 0x0ef0);
    }

    #[test]
    fn mode0_one_shot_and_lsb_access() {
        let (clock, mut pit) = setup();
        pit.write_port(0x43, 0x10); // ch0, LSB only, mode 0
        pit.write_port(0x40, 100);
        advance_ticks(&clock, 40);
        assert_eq!(pit.read_port(0x40), 60);
        advance_ticks(&clock, 60);
        assert_eq!(pit.poll(), 1);
        advance_ticks(&clock, 1000);
        assert_eq!(pit.poll(), 0);
    }

    #[test]
    fn channel2_gate_and_output_on_port_61() {
        let (clock, mut pit) = setup();
        // Linux's PIT calibration: gate on, speaker off, ch2 mode 0.
        pit.write_port(0x61, 0x01);
        pit.write_port(0x43, 0xb0);
        pit.write_port(0x42, 0x34);
        pit.write_port(0x42, 0x12);
        assert_eq!(pit.read_port(0x61) & 0x21, 0x01);
        advance_ticks(&clock, 0x1233);
        assert_eq!(pit.read_port(0x61) & 0x20, 0);
        advance_ticks(&clock, 1);
        assert_eq!(pit.read_port(0x61) & 0x20, 0x20);
        // Mode 3 square wave restarted by the gate.
        pit.write_port(0x61, 0x00);
        pit.write_port(0x43, 0xb6);
        pit.write_port(0x42, 100);
        pit.write_port(0x42, 0);
        pit.write_port(0x61, 0x01);
        assert_eq!(pit.read_port(0x61) & 0x20, 0x20);
        advance_ticks(&clock, 50);
        assert_eq!(pit.read_port(0x61) & 0x20, 0);
        advance_ticks(&clock, 50);
        assert_eq!(pit.read_port(0x61) & 0x20, 0x20);
    }

    #[test]
    fn pit_stands_still_while_paused() {
        let (clock, mut pit) = setup();
        pit.write_port(0x43, 0x34);
        pit.write_port(0x40, 0x00);
        pit.write_port(0x40, 0x10);
        advance_ticks(&clock, 0x10);
        clock.pause();
        clock.advance(1_000_000);
        let low = pit.read_port(0x40);
        let high = pit.read_port(0x40);
        assert_eq!(u16::from_le_bytes([low, high]), 0x0ff0);
    }
}
