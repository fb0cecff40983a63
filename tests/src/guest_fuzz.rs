//! A hostile guest, through the qtest harness, in the spirit of QEMU's generic-fuzz: one
//! PCI device at a time is driven with random, malformed and racing requests (its config
//! space, its BARs, and for virtio its queues: chains that loop or point outside RAM or at
//! MMIO, indices that jump, queues resized, reset or notified mid-flight), for a set time.
//! Every so often, and at the end, the machine is checked: the vmm answers the harness and
//! the monitor, every device process still runs and was never restarted or dropped, and
//! after a reset the device serves a well-formed request. The PRNG seed makes a failing
//! run repeatable.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::libqos::blk::{self, BlkDevice, BlkOptions};
use crate::libqos::pci::{self, BarAllocator, PciAddress};
use crate::libqos::virtio::{common, VirtioPciDevice, VIRTIO_PCI_VENDOR_ID};
use crate::libqos::virtqueue::{Buffer, GuestAlloc};
use crate::qmp::Checked as Monitor;
use crate::qtest::Qtest;
use crate::rng::Rng;
use crate::TempDir;

const RAM: u64 = 128 << 20;
const MEM: &str = "128M";
/// Where the fuzzer's rings, tables and buffers go: guest RAM that nothing else uses.
const ARENA: u64 = 32 << 20;
const ARENA_SIZE: u64 = 16 << 20;
/// Operations between two checks of the machine's health.
const CHECK_EVERY: u64 = 400;
/// The image's first sector, for the well-formed read of virtio-blk.
const BLK_PATTERN: u8 = 0x5a;

/// A device to fuzz: how to put it in a machine, and how to find its function.
pub struct Target {
    pub name: &'static str,
    /// Its arguments, with files in the directory given.
    args: fn(&Path) -> Vec<String>,
    vendor: u16,
    device: u16,
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn disk(dir: &Path, name: &str) -> String {
    let img = dir.join(name);
    let mut bytes = vec![0u8; 4 << 20];
    bytes[..512].fill(BLK_PATTERN);
    if let Err(e) = std::fs::write(&img, bytes) {
        panic!("cannot write {}: {e}", img.display());
    }
    img.display().to_string()
}

fn vnc(dir: &Path) -> String {
    format!("unix:{}", dir.join("vnc.sock").display())
}

/// Every PCI device a guest can be given, each alone in a machine.
pub const TARGETS: &[Target] = &[
    Target {
        name: "virtio-blk-pci",
        args: |d| {
            let drive = format!("file={},if=none,id=d0,format=raw", disk(d, "blk.raw"));
            strings(&[
                "-drive",
                &drive,
                "-device",
                "virtio-blk-pci,drive=d0,id=dev0",
            ])
        },
        vendor: VIRTIO_PCI_VENDOR_ID,
        device: 0x1042,
    },
    Target {
        name: "virtio-scsi-pci",
        args: |d| {
            let drive = format!(
                "file={},if=none,id=d0,format=raw,media=cdrom",
                disk(d, "scsi.iso")
            );
            strings(&[
                "-device",
                "virtio-scsi-pci,id=dev0",
                "-drive",
                &drive,
                "-device",
                "scsi-cd,drive=d0,bus=dev0.0",
            ])
        },
        vendor: VIRTIO_PCI_VENDOR_ID,
        device: 0x1048,
    },
    Target {
        name: "virtio-net-pci",
        args: |_| {
            let port = |_| {
                std::net::UdpSocket::bind("127.0.0.1:0")
                    .and_then(|s| s.local_addr())
                    .map(|a| a.port())
                    .unwrap_or(47001)
            };
            let netdev = format!(
                "socket,id=n0,udp=127.0.0.1:{},localaddr=127.0.0.1:{}",
                port(0),
                port(1)
            );
            strings(&[
                "-netdev",
                &netdev,
                "-device",
                "virtio-net-pci,netdev=n0,id=dev0",
            ])
        },
        vendor: VIRTIO_PCI_VENDOR_ID,
        device: 0x1041,
    },
    Target {
        name: "virtio-balloon-pci",
        args: |_| {
            strings(&[
                "-device",
                "virtio-balloon-pci,id=dev0,free-page-reporting=on",
            ])
        },
        vendor: VIRTIO_PCI_VENDOR_ID,
        device: 0x1045,
    },
    Target {
        name: "virtio-keyboard-pci",
        args: |d| strings(&["-vnc", &vnc(d), "-device", "virtio-keyboard-pci,id=dev0"]),
        vendor: VIRTIO_PCI_VENDOR_ID,
        device: 0x1052,
    },
    Target {
        name: "virtio-tablet-pci",
        args: |d| strings(&["-vnc", &vnc(d), "-device", "virtio-tablet-pci,id=dev0"]),
        vendor: VIRTIO_PCI_VENDOR_ID,
        device: 0x1052,
    },
    Target {
        name: "bochs-display",
        args: |d| strings(&["-vnc", &vnc(d), "-device", "bochs-display,id=dev0"]),
        vendor: 0x1234,
        device: 0x1111,
    },
];

/// The target named `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// What a run did.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub ops: u64,
    pub chains: u64,
    pub checks: u64,
    pub elapsed: Duration,
}

/// The virtio structures of the function, if it is a virtio one.
struct Layout {
    function: PciAddress,
    virtio: Option<VirtioPciDevice>,
    bars: Vec<pci::Bar>,
}

/// A queue as the fuzzer set it up, for posting chains.
#[derive(Clone, Copy)]
struct Queue {
    index: u16,
    size: u16,
    desc: u64,
    avail: u64,
    avail_idx: u16,
}

struct Fuzzer {
    qt: Qtest,
    monitor: Monitor,
    target: &'static Target,
    rng: Rng,
    layout: Layout,
    queues: Vec<Queue>,
    report: Report,
    /// The last operations, for the failure message.
    log: std::collections::VecDeque<String>,
    _dir: TempDir,
}

/// Fuzz `target` for `duration` from `seed`: the report, or why the machine failed (with
/// the last operations before it).
pub fn run(target: &'static Target, duration: Duration, seed: u64) -> Result<Report, String> {
    run_with_env(target, duration, seed, &[])
}

/// [`run`] with `env` in the vmm's environment (test hooks).
pub fn run_with_env(
    target: &'static Target,
    duration: Duration,
    seed: u64,
    env: &[(&str, &str)],
) -> Result<Report, String> {
    let mut f = Fuzzer::start(target, seed, env)?;
    let started = Instant::now();
    let result = f.fuzz(started, duration);
    f.report.elapsed = started.elapsed();
    match result {
        Ok(()) => Ok(f.report.clone()),
        Err(why) => Err(f.failure(&why)),
    }
}

impl Fuzzer {
    fn start(target: &'static Target, seed: u64, env: &[(&str, &str)]) -> Result<Self, String> {
        let dir = TempDir::new("guest-fuzz");
        let sock = dir.join("qmp.sock");
        let mut args = vec![
            "-qmp".to_string(),
            format!("unix:{},server=on,wait=off", sock.display()),
        ];
        args.extend((target.args)(dir.path()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut qt = Qtest::start_env(MEM, &args, env).map_err(|e| e.to_string())?;
        let monitor = Monitor::connect(&sock)?;
        let layout = map(&mut qt, target)?;
        Ok(Fuzzer {
            qt,
            monitor,
            target,
            rng: Rng::new(seed),
            layout,
            queues: Vec::new(),
            report: Report::default(),
            log: Default::default(),
            _dir: dir,
        })
    }

    fn failure(&self, why: &str) -> String {
        let ops: Vec<&str> = self.log.iter().map(String::as_str).collect();
        format!(
            "{}: {why}\nafter {} operations; the last ones:\n  {}\nvmm stderr:\n{}",
            self.target.name,
            self.report.ops,
            ops.join("\n  "),
            self.qt.stderr()
        )
    }

    fn note(&mut self, op: String) {
        if self.log.len() == 24 {
            self.log.pop_front();
        }
        self.log.push_back(op);
    }

    fn fuzz(&mut self, started: Instant, duration: Duration) -> Result<(), String> {
        while started.elapsed() < duration {
            for _ in 0..CHECK_EVERY {
                self.step()?;
                self.report.ops += 1;
            }
            self.check()?;
        }
        self.check()?;
        self.well_formed()
    }

    /// A value a driver might write, or one no driver would.
    fn value(&mut self) -> u64 {
        let bar = self.layout.bars.first().map_or(0, |b| b.address);
        match self.rng.below(10) {
            0 => 0,
            1 => 1,
            2 => self
                .rng
                .pick(&[0xff, 0xffff, 0xffff_ffff, u64::MAX, 0x8000_0000]),
            3 => ARENA + self.rng.below(ARENA_SIZE),
            // Past the end of RAM, and far past it.
            4 => self
                .rng
                .pick(&[RAM, RAM + 0x1000, 1 << 40, 0xffff_ffff_ffff_f000]),
            // MMIO: a BAR, the MSI window, the IO-APIC.
            5 => self
                .rng
                .pick(&[bar, bar + 0x1000, 0xfee0_0000, 0xfec0_0000]),
            6 => self.rng.below(16),
            7 => 1 << self.rng.below(16),
            _ => self.rng.next_u64(),
        }
    }

    fn width(&mut self) -> u64 {
        self.rng.pick(&[1, 2, 4, 8])
    }

    fn write(&mut self, addr: u64, width: u64, v: u64) -> Result<(), String> {
        let qt = &mut self.qt;
        let r = match width {
            1 => qt.writeb(addr, v as u8),
            2 => qt.writew(addr, v as u16),
            4 => qt.writel(addr, v as u32),
            _ => qt.writeq(addr, v),
        };
        r.map_err(|e| format!("the harness lost the vmm: {e}"))
    }

    fn read(&mut self, addr: u64, width: u64) -> Result<(), String> {
        let qt = &mut self.qt;
        let r = match width {
            1 => qt.readb(addr).map(drop),
            2 => qt.readw(addr).map(drop),
            4 => qt.readl(addr).map(drop),
            _ => qt.readq(addr).map(drop),
        };
        r.map_err(|e| format!("the harness lost the vmm: {e}"))
    }

    /// One random operation.
    fn step(&mut self) -> Result<(), String> {
        let virtio = self.layout.virtio.is_some();
        match self.rng.below(100) {
            // Config space: reads anywhere, writes mostly outside the BARs (moving them
            // now and then too).
            0..=7 => {
                let offset = self.rng.below(256) as u8;
                let addr = self.layout.function;
                self.note(format!("config read {offset:#x}"));
                pci::config_readl(&mut self.qt, addr, offset & !3)
                    .map(drop)
                    .map_err(|e| format!("config read: {e}"))
            }
            8..=13 => {
                let mut offset = self.rng.below(256) as u8;
                if (0x10..0x28).contains(&offset) && !self.rng.chance(10) {
                    offset += 0x40;
                }
                let v = self.value() as u32;
                let addr = self.layout.function;
                self.note(format!("config write {offset:#x} = {v:#x}"));
                let r = match self.rng.below(3) {
                    0 => pci::config_writeb(&mut self.qt, addr, offset, v as u8),
                    1 => pci::config_writew(&mut self.qt, addr, offset & !1, v as u16),
                    _ => pci::config_writel(&mut self.qt, addr, offset & !3, v),
                };
                r.map_err(|e| format!("config write: {e}"))?;
                if (0x04..0x28).contains(&offset) {
                    // Memory decoding or a BAR may have changed: map it again.
                    self.remap()?;
                }
                Ok(())
            }
            // Anywhere in a BAR.
            14..=27 => {
                let Some(bar) = self.random_bar() else {
                    return Ok(());
                };
                let width = self.width();
                let addr = bar.0 + self.rng.below(bar.1.max(1)) / width * width;
                if self.rng.chance(50) {
                    let v = self.value();
                    self.note(format!("bar write {addr:#x}/{width} = {v:#x}"));
                    self.write(addr, width, v)
                } else {
                    self.note(format!("bar read {addr:#x}/{width}"));
                    self.read(addr, width)
                }
            }
            _ if !virtio => {
                // Not virtio: the BARs and config space are all there is; a bochs-display
                // also has its DISPI registers at 0x500 in BAR 2.
                let Some(bar) = self
                    .layout
                    .bars
                    .iter()
                    .find(|b| b.index == 2)
                    .map(|b| b.address)
                else {
                    return Ok(());
                };
                let reg = self.rng.below(16) * 2;
                let v = self.value() as u16;
                self.note(format!("dispi {reg:#x} = {v:#x}"));
                self.write(bar + 0x500 + reg, 2, u64::from(v))
            }
            // virtio: the common structure, field by field.
            28..=47 => self.common_op(),
            // Set up a queue, sanely or not.
            48..=55 => self.queue_setup(),
            // Post a chain and notify.
            56..=89 => self.chain(),
            // Notify any queue.
            90..=94 => {
                let q = self.rng.below(12);
                let (base, mult) = self
                    .layout
                    .virtio
                    .as_ref()
                    .map_or((0, 0), |v| (v.notify_base, v.notify_off_multiplier));
                self.note(format!("notify {q}"));
                self.write(base + q * u64::from(mult), 2, q)
            }
            // Garbage in the arena (request headers, rings).
            _ => {
                let at = ARENA + self.rng.below(ARENA_SIZE - 64);
                let bytes: Vec<u8> = (0..self.rng.below(64))
                    .map(|_| self.rng.next_u64() as u8)
                    .collect();
                self.note(format!("garbage at {at:#x} ({} bytes)", bytes.len()));
                self.qt
                    .memwrite(at, &bytes)
                    .map_err(|e| format!("the harness lost the vmm: {e}"))
            }
        }
    }

    fn random_bar(&mut self) -> Option<(u64, u64)> {
        let mut regions: Vec<(u64, u64)> = self
            .layout
            .bars
            .iter()
            .filter(|b| b.kind != pci::BarKind::Io && b.address != 0)
            .map(|b| (b.address, b.size.min(1 << 16)))
            .collect();
        if let Some(v) = &self.layout.virtio {
            regions.push((v.common, 0x38));
            regions.push((v.isr, 4));
            if let Some((at, len)) = v.device_cfg {
                regions.push((at, u64::from(len)));
            }
            if let Some(m) = v.msix {
                regions.push((m.table, u64::from(m.table_size) * 16));
            }
        }
        if regions.is_empty() {
            return None;
        }
        Some(self.rng.pick(&regions))
    }

    fn common_op(&mut self) -> Result<(), String> {
        let Some(c) = self.layout.virtio.as_ref().map(|v| v.common) else {
            return Ok(());
        };
        let (field, width) = self.rng.pick(&[
            (common::DEVICE_FEATURE_SELECT, 4),
            (common::DRIVER_FEATURE_SELECT, 4),
            (common::DRIVER_FEATURE, 4),
            (common::CONFIG_MSIX_VECTOR, 2),
            (common::DEVICE_STATUS, 1),
            (common::QUEUE_SELECT, 2),
            (common::QUEUE_SIZE, 2),
            (common::QUEUE_MSIX_VECTOR, 2),
            (common::QUEUE_ENABLE, 2),
            (common::QUEUE_DESC, 8),
            (common::QUEUE_DRIVER, 8),
            (common::QUEUE_DEVICE, 8),
        ]);
        let v = if field == common::DEVICE_STATUS {
            // Mostly the driver's sequence, sometimes a reset or nonsense.
            self.rng.pick(&[0, 1, 3, 0xb, 0xf, 0xf, 0x4f, 0x80, 0xff])
        } else {
            self.value()
        };
        self.note(format!("common {field:#x}/{width} = {v:#x}"));
        self.write(c + field, width, v)?;
        if field == common::DEVICE_STATUS && v == 0 {
            self.queues.clear();
        }
        if self.rng.chance(30) {
            self.read(c + field, width)?;
        }
        Ok(())
    }

    fn queue_setup(&mut self) -> Result<(), String> {
        let Some(c) = self.layout.virtio.as_ref().map(|v| v.common) else {
            return Ok(());
        };
        let index = if self.rng.chance(90) {
            self.rng.below(4) as u16
        } else {
            self.rng.next_u64() as u16
        };
        let size = if self.rng.chance(80) {
            self.rng.pick(&[2u16, 4, 8, 16, 64, 128, 256])
        } else {
            self.rng.next_u64() as u16
        };
        // The rings, in the arena (aligned or not), or somewhere hostile.
        let ring = |rng: &mut Rng| {
            if rng.chance(85) {
                ARENA + rng.below(ARENA_SIZE / 0x1000) * 0x1000
            } else {
                rng.pick(&[RAM - 8, RAM, 1 << 40, 0xfee0_0000, ARENA + 3])
            }
        };
        let (desc, avail, used) = (
            ring(&mut self.rng),
            ring(&mut self.rng),
            ring(&mut self.rng),
        );
        self.note(format!(
            "queue {index} size {size} desc {desc:#x} avail {avail:#x} used {used:#x}"
        ));
        let qt = &mut self.qt;
        let lost = |e: crate::qtest::QtestError| format!("the harness lost the vmm: {e}");
        qt.writew(c + common::QUEUE_SELECT, index).map_err(lost)?;
        qt.writew(c + common::QUEUE_SIZE, size).map_err(lost)?;
        qt.writeq(c + common::QUEUE_DESC, desc).map_err(lost)?;
        qt.writeq(c + common::QUEUE_DRIVER, avail).map_err(lost)?;
        qt.writeq(c + common::QUEUE_DEVICE, used).map_err(lost)?;
        // Empty rings to start from.
        for at in [avail, used] {
            if (ARENA..ARENA + ARENA_SIZE - 8).contains(&at) {
                qt.memwrite(at, &[0; 4]).map_err(lost)?;
            }
        }
        qt.writew(c + common::QUEUE_ENABLE, 1).map_err(lost)?;
        self.queues.retain(|q| q.index != index);
        if size.is_power_of_two() && (ARENA..ARENA + ARENA_SIZE - 0x1000).contains(&desc) {
            self.queues.push(Queue {
                index,
                size,
                desc,
                avail,
                avail_idx: 0,
            });
        }
        // Sometimes straight on to DRIVER_OK, with the device's features.
        if self.rng.chance(40) {
            qt.writel(c + common::DEVICE_FEATURE_SELECT, 1)
                .map_err(lost)?;
            let high = qt.readl(c + common::DEVICE_FEATURE).map_err(lost)?;
            qt.writel(c + common::DRIVER_FEATURE_SELECT, 1)
                .map_err(lost)?;
            qt.writel(c + common::DRIVER_FEATURE, high & 1)
                .map_err(lost)?;
            for s in [1u8, 3, 0xb, 0xf] {
                qt.writeb(c + common::DEVICE_STATUS, s).map_err(lost)?;
            }
        }
        Ok(())
    }

    /// A descriptor chain of random shape in a queue set up before, then a notify.
    fn chain(&mut self) -> Result<(), String> {
        if self.queues.is_empty() {
            return self.queue_setup();
        }
        let qi = self.rng.below(self.queues.len() as u64) as usize;
        let q = self.queues[qi];
        let n = 1 + self.rng.below(6);
        let base = self.rng.below(u64::from(q.size)) as u16;
        let mut table = Vec::new();
        for i in 0..n {
            let slot = (base + i as u16) % q.size;
            let addr = if self.rng.chance(75) {
                ARENA + self.rng.below(ARENA_SIZE - 0x1000)
            } else {
                self.value()
            };
            let len = match self.rng.below(10) {
                0 => 0,
                1 => u32::MAX,
                2 => self.rng.next_u64() as u32,
                _ => 1 + self.rng.below(4096) as u32,
            };
            // NEXT on all but the last (sometimes the last too: a loop or a jump),
            // WRITE at random, INDIRECT now and then.
            let mut flags = 0u16;
            if i + 1 < n || self.rng.chance(10) {
                flags |= 1;
            }
            if self.rng.chance(40) {
                flags |= 2;
            }
            if self.rng.chance(5) {
                flags |= 4;
            }
            let next = if self.rng.chance(90) {
                (slot + 1) % q.size
            } else {
                self.rng.next_u64() as u16
            };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            table.push((q.desc + u64::from(slot) * 16, d));
        }
        // Request bytes where the first buffer points, now and then a plausible header.
        let lost = |e: crate::qtest::QtestError| format!("the harness lost the vmm: {e}");
        for (at, d) in &table {
            self.qt.memwrite(*at, d).map_err(lost)?;
        }
        let head = if self.rng.chance(90) {
            base
        } else {
            self.rng.next_u64() as u16
        };
        let jump = if self.rng.chance(90) {
            1
        } else {
            self.rng.next_u64() as u16
        };
        let idx = q.avail_idx.wrapping_add(jump);
        let ring_slot = q.avail + 4 + u64::from(q.avail_idx % q.size) * 2;
        if (ARENA..ARENA + ARENA_SIZE - 8).contains(&q.avail)
            && (ARENA..ARENA + ARENA_SIZE).contains(&ring_slot)
        {
            self.qt.writew(ring_slot, head).map_err(lost)?;
            self.qt.writew(q.avail + 2, idx).map_err(lost)?;
        }
        self.queues[qi].avail_idx = idx;
        self.report.chains += 1;
        self.note(format!(
            "chain on queue {} head {head} ({n} descriptors) avail idx {idx}",
            q.index
        ));
        let Some(v) = &self.layout.virtio else {
            return Ok(());
        };
        let notify = v.notify_base + u64::from(q.index) * u64::from(v.notify_off_multiplier);
        self.write(notify, 2, u64::from(q.index))
    }

    fn remap(&mut self) -> Result<(), String> {
        self.layout = map(&mut self.qt, self.target)?;
        Ok(())
    }

    /// The machine is well: the harness and the monitor answer, the VM runs, and every
    /// device process runs as first started.
    fn check(&mut self) -> Result<(), String> {
        self.report.checks += 1;
        self.qt
            .readl(ARENA)
            .map_err(|e| format!("the harness lost the vmm: {e}"))?;
        // Interrupts the device raised: nobody waits for them.
        let _ = self.qt.take_irqs();
        let status = self.monitor.execute("query-status", None)?;
        if status["status"] != "running" {
            return Err(format!("the VM is not running: {status}"));
        }
        let processes = self
            .monitor
            .execute("__org.vmm_query-device-processes", None)?;
        for p in processes.as_array().into_iter().flatten() {
            if p["state"] != "running" || p["restarts"] != 0 {
                return Err(format!("a device process did not survive: {p}"));
            }
        }
        Ok(())
    }

    /// After a reset, the device takes a well-formed driver again, and virtio-blk
    /// serves a read with the image's bytes.
    fn well_formed(&mut self) -> Result<(), String> {
        self.note("well-formed driver".into());
        self.remap()?;
        if self.layout.virtio.is_none() {
            return Ok(());
        }
        let mut alloc = GuestAlloc::new(ARENA, ARENA + ARENA_SIZE);
        if self.target.name == "virtio-blk-pci" {
            let mut dev = BlkDevice::init(&mut self.qt, RAM, &mut alloc, BlkOptions::default())
                .map_err(|e| format!("a well-formed driver failed: {e}"))?;
            let header = alloc.alloc(16, 16).map_err(|e| e.to_string())?;
            let data = alloc.alloc(512, 512).map_err(|e| e.to_string())?;
            let status = alloc.alloc(1, 1).map_err(|e| e.to_string())?;
            let lost = |e: crate::qtest::QtestError| format!("the harness lost the vmm: {e}");
            self.qt.memwrite(header, &blk::header(0, 0)).map_err(lost)?;
            self.qt.memwrite(status, &[0xff]).map_err(lost)?;
            let vq = &mut dev.queues[0];
            vq.add_chain(
                &mut self.qt,
                &[
                    Buffer::readable(header, 16),
                    Buffer::writable(data, 512),
                    Buffer::writable(status, 1),
                ],
            )
            .map_err(|e| e.to_string())?;
            vq.kick(&mut self.qt).map_err(|e| e.to_string())?;
            blk::wait_used(&mut self.qt, vq, Duration::from_secs(10))
                .map_err(|e| format!("a well-formed read got no answer: {e}"))?;
            let got = self.qt.memread(data, 512).map_err(lost)?;
            let st = self.qt.memread(status, 1).map_err(lost)?;
            if st != [0] || got.iter().any(|b| *b != BLK_PATTERN) {
                return Err(format!("a well-formed read failed: status {st:?}"));
            }
            return Ok(());
        }
        let Some(v) = self.layout.virtio.as_mut() else {
            return Ok(());
        };
        let lost =
            |e: crate::libqos::virtio::VirtioError| format!("a well-formed driver failed: {e}");
        v.negotiate(&mut self.qt, crate::libqos::virtio::VIRTIO_F_VERSION_1)
            .map_err(lost)?;
        v.setup_queue(&mut self.qt, &mut alloc, 0, 16, None)
            .map_err(lost)?;
        v.driver_ok(&mut self.qt).map_err(lost)?;
        let status = v.status(&mut self.qt).map_err(lost)?;
        if status & crate::libqos::virtio::STATUS_DEVICE_NEEDS_RESET != 0 {
            return Err(format!(
                "the device needs a reset after a well-formed start: {status:#x}"
            ));
        }
        self.check()
    }
}

/// Find the target's function, give its BARs addresses, enable it, and find its virtio
/// structures.
fn map(qt: &mut Qtest, target: &Target) -> Result<Layout, String> {
    let function = pci::enumerate_bus0(qt)
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|f| f.vendor_id == target.vendor && f.device_id == target.device)
        .ok_or_else(|| format!("no {} function on bus 0", target.name))?;
    let mut bars = BarAllocator::for_ram(RAM);
    if target.vendor == VIRTIO_PCI_VENDOR_ID {
        let addr = function.addr;
        let v = VirtioPciDevice::new(qt, function, Some(&mut bars)).map_err(|e| e.to_string())?;
        let bars = v.bars.clone();
        return Ok(Layout {
            function: addr,
            virtio: Some(v),
            bars,
        });
    }
    let bars = pci::assign_bars(qt, function.addr, &mut bars).map_err(|e| e.to_string())?;
    pci::enable(qt, function.addr, true, true, true).map_err(|e| e.to_string())?;
    Ok(Layout {
        function: function.addr,
        virtio: None,
        bars,
    })
}
