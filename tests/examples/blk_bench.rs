//! The driver behind `scripts/bench/blk`: one virtio-blk disk under `vmm -accel qtest`,
//! served by our `vmm-blk` (`-drive` + `virtio-blk-pci`) or by qemu-storage-daemon's
//! vhost-user-blk export (`-chardev socket` + `vhost-user-blk-pci`), driven through the
//! same libqos code, from a raw or a qcow2 image. Prints one JSON line per workload.
//!
//! Data stays in guest RAM: only the request headers, the available index, the kick, the
//! used-index polls and the status bytes cross the qtest socket. Each batch puts QD
//! requests in the ring (static descriptor chains, one per slot, and an available ring
//! written once), publishes them with one index write, kicks once and polls the used index
//! until all QD are back; interrupts are suppressed (VRING_AVAIL_F_NO_INTERRUPT).
//!
//! The reads are checked against `--reference` (default: the image itself), a raw file
//! with the bytes the guest should see: for a qcow2 image, the raw image it was filled
//! from. Reads run before writes, so an image fresh from that raw file still matches it.
//!
//! Usage: blk_bench --backend vmm-blk|qsd --image PATH [--format raw|qcow2]
//!                  [--reference PATH] [--seconds S] [--socket PATH]

use std::error::Error;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use vmm_tests::libqos::blk::{self, BlkDevice, BlkOptions, SECTOR_SIZE};
use vmm_tests::libqos::blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vmm_tests::libqos::virtqueue::{
    Descriptor, GuestAlloc, Virtqueue, VringLayout, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use vmm_tests::qtest::Qtest;

type Res<T> = Result<T, Box<dyn Error>>;

const RAM: u64 = 256 << 20;
const MEM: &str = "256M";
const MAX_QD: usize = 32;
const MAX_BS: usize = 1 << 20;
const QUEUE_SIZE: u16 = 128;
const POLL_TIMEOUT: Duration = Duration::from_secs(30);
const USAGE: &str = "usage: blk_bench --backend vmm-blk|qsd --image PATH [--format raw|qcow2] \
                     [--reference PATH] [--seconds S] [--socket PATH]";

struct Args {
    backend: String,
    image: PathBuf,
    /// raw or qcow2 (one image per run: the script runs both formats).
    format: String,
    /// A raw file with the guest-visible contents of the image, for checking reads.
    reference: Option<PathBuf>,
    seconds: f64,
    socket: Option<PathBuf>,
}

fn args() -> Res<Args> {
    let mut a = Args {
        backend: String::new(),
        image: PathBuf::new(),
        format: "raw".into(),
        reference: None,
        seconds: 3.0,
        socket: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        match k.as_str() {
            "--backend" => a.backend = v,
            "--image" => a.image = PathBuf::from(v),
            "--format" => a.format = v,
            "--reference" => a.reference = Some(PathBuf::from(v)),
            "--seconds" => a.seconds = v.parse()?,
            "--socket" => a.socket = Some(PathBuf::from(v)),
            _ => return Err(format!("unknown option {k}").into()),
        }
    }
    if !["vmm-blk", "qsd"].contains(&a.backend.as_str())
        || !["raw", "qcow2"].contains(&a.format.as_str())
        || a.image.as_os_str().is_empty()
    {
        return Err(USAGE.into());
    }
    if a.format == "qcow2" && a.reference.is_none() {
        return Err("a qcow2 image needs --reference (the raw file it was filled from)".into());
    }
    Ok(a)
}

/// qemu-storage-daemon, killed when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The daemon exports the file node (raw) or a qcow2 node over it.
fn start_qsd(image: &Path, format: &str, sock: &Path) -> Res<Daemon> {
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new("qemu-storage-daemon");
    cmd.arg("--blockdev").arg(format!(
        "driver=file,node-name=file0,filename={}",
        image.display()
    ));
    let node = if format == "qcow2" {
        cmd.arg("--blockdev")
            .arg("driver=qcow2,node-name=fmt0,file=file0");
        "fmt0"
    } else {
        "file0"
    };
    let child = cmd
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("start qemu-storage-daemon: {e}"))?;
    let mut d = Daemon(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Some(status) = d.0.try_wait()? {
            return Err(format!("qemu-storage-daemon exited: {status}").into());
        }
        if Instant::now() > deadline {
            return Err("qemu-storage-daemon did not create its socket".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(d)
}

/// The guest side: a queue whose slot `i` is the chain 3i (header), 3i+1 (data),
/// 3i+2 (status), with headers and statuses in arrays and data buffers of [`MAX_BS`].
struct Bench {
    qt: Qtest,
    vq: Virtqueue,
    headers: u64,
    statuses: u64,
    data: u64,
    capacity: u64,
    avail_idx: u16,
    /// A raw file with the bytes the guest should read (see the module doc).
    reference: PathBuf,
    /// The direction the descriptor table is set up for (true: reads).
    table: Option<(bool, usize)>,
    /// The batch size the available ring is set up for.
    ring_qd: usize,
}

impl Bench {
    fn new(mut qt: Qtest, reference: &Path) -> Res<Bench> {
        let mut mem = GuestAlloc::for_ram(RAM);
        let opts = BlkOptions {
            queues: 1,
            queue_size: QUEUE_SIZE,
            ..Default::default()
        };
        let mut blk = BlkDevice::init(&mut qt, RAM, &mut mem, opts)
            .map_err(|e| format!("{e}; vmm stderr:\n{}", qt.stderr()))?;
        let vq = blk.queues.remove(0);
        if usize::from(vq.size()) < 3 * MAX_QD {
            return Err(format!("queue size {} does not fit the bench", vq.size()).into());
        }
        let headers = mem.alloc(16 * MAX_QD as u64, 16)?;
        let statuses = mem.alloc(MAX_QD as u64, 8)?;
        let data = mem.alloc((MAX_BS * MAX_QD) as u64, 4096)?;
        for i in 0..MAX_QD {
            qt.memset(data + (i * MAX_BS) as u64, MAX_BS, 0x5a ^ i as u8)?;
        }
        // No interrupts: completions are found by polling the used index.
        vq.set_no_interrupt(&mut qt, true)?;
        Ok(Bench {
            qt,
            vq,
            headers,
            statuses,
            data,
            capacity: blk.capacity,
            avail_idx: 0,
            reference: reference.to_path_buf(),
            table: None,
            ring_qd: 0,
        })
    }

    fn setup_table(&mut self, read: bool, bs: usize) -> Res<()> {
        if self.table == Some((read, bs)) {
            return Ok(());
        }
        let mut table = Vec::with_capacity(3 * MAX_QD * 16);
        for i in 0..MAX_QD as u16 {
            let data_flags = if read { VRING_DESC_F_WRITE } else { 0 };
            for d in [
                Descriptor {
                    addr: self.headers + 16 * u64::from(i),
                    len: 16,
                    flags: VRING_DESC_F_NEXT,
                    next: 3 * i + 1,
                },
                Descriptor {
                    addr: self.data + (usize::from(i) * MAX_BS) as u64,
                    len: bs as u32,
                    flags: data_flags | VRING_DESC_F_NEXT,
                    next: 3 * i + 2,
                },
                Descriptor {
                    addr: self.statuses + u64::from(i),
                    len: 1,
                    flags: VRING_DESC_F_WRITE,
                    next: 0,
                },
            ] {
                table.extend_from_slice(&d.to_bytes());
            }
        }
        self.qt.memwrite(self.vq.desc, &table)?;
        self.table = Some((read, bs));
        Ok(())
    }

    /// The available ring never changes within a workload: position p offers slot
    /// p % qd's chain. As qd divides the ring size, a batch is always slots 0..qd.
    fn setup_ring(&mut self, qd: usize) -> Res<()> {
        if self.ring_qd == qd {
            return Ok(());
        }
        if !usize::from(self.vq.size()).is_multiple_of(qd) {
            return Err(format!("QD {qd} does not divide the queue size").into());
        }
        let ring: Vec<u8> = (0..self.vq.size())
            .flat_map(|p| (3 * (p % qd as u16)).to_le_bytes())
            .collect();
        self.qt
            .memwrite(self.vq.avail + self.vq.layout.avail_ring_entry(0), &ring)?;
        self.ring_qd = qd;
        Ok(())
    }

    /// One batch: the requests at `sectors`, all in flight at once, until all are back.
    fn batch(&mut self, kind: u32, sectors: &[u64]) -> Res<()> {
        let n = sectors.len();
        let headers: Vec<u8> = sectors.iter().flat_map(|&s| blk::header(kind, s)).collect();
        self.qt.memwrite(self.headers, &headers)?;
        self.qt.memset(self.statuses, n, 0xff)?;
        self.avail_idx = self.avail_idx.wrapping_add(n as u16);
        self.qt.memwrite(
            self.vq.avail + VringLayout::AVAIL_IDX,
            &self.avail_idx.to_le_bytes(),
        )?;
        self.vq.kick(&mut self.qt)?;
        let deadline = Instant::now() + POLL_TIMEOUT;
        while self.vq.used_idx(&mut self.qt)? != self.avail_idx {
            if Instant::now() > deadline {
                return Err(format!("requests not completed in {POLL_TIMEOUT:?}").into());
            }
        }
        let status = self.qt.memread(self.statuses, n)?;
        if let Some(bad) = status.iter().find(|&&s| s != VIRTIO_BLK_S_OK) {
            return Err(format!("a request failed with status {bad}").into());
        }
        Ok(())
    }

    /// Run `pattern` (random or sequential, QD, block size, reads or writes) for
    /// `seconds` after a short warm-up; requests per second.
    fn run(&mut self, random: bool, read: bool, qd: usize, bs: usize, seconds: f64) -> Res<f64> {
        self.setup_table(read, bs)?;
        self.setup_ring(qd)?;
        let kind = if read {
            VIRTIO_BLK_T_IN
        } else {
            VIRTIO_BLK_T_OUT
        };
        let per = bs as u64 / SECTOR_SIZE;
        let blocks = self.capacity / per;
        let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next_seq = 0u64;
        let mut sectors = vec![0u64; qd];
        let mut pick = |sectors: &mut [u64]| {
            for s in sectors.iter_mut() {
                let block = if random {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % blocks
                } else {
                    next_seq = (next_seq + 1) % blocks;
                    next_seq
                };
                *s = block * per;
            }
        };
        let warmup = Instant::now();
        while warmup.elapsed() < Duration::from_millis(300) {
            pick(&mut sectors);
            self.batch(kind, &sectors)?;
        }
        let start = Instant::now();
        let mut done = 0u64;
        while start.elapsed().as_secs_f64() < seconds {
            pick(&mut sectors);
            self.batch(kind, &sectors)?;
            done += qd as u64;
        }
        let rate = done as f64 / start.elapsed().as_secs_f64();
        if read {
            // The data really came from the image: check the last batch's first slot.
            self.check_slot(sectors[0], bs)?;
        }
        Ok(rate)
    }

    /// Slot 0's buffer holds what the image has at `sector` (per the reference file).
    fn check_slot(&mut self, sector: u64, bs: usize) -> Res<()> {
        let got = self.qt.memread(self.data, bs)?;
        let mut want = vec![0u8; bs];
        std::fs::File::open(&self.reference)?.read_exact_at(&mut want, sector * SECTOR_SIZE)?;
        if got != want {
            return Err(format!("the data read at sector {sector} is not the image's").into());
        }
        Ok(())
    }

    /// Microseconds per qtest round trip (a read of the used index): the best of five
    /// rounds, so that QD / (round trips per batch x this) bounds the request rate.
    fn round_trip(&mut self) -> Res<f64> {
        let n = 1000;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let start = Instant::now();
            for _ in 0..n {
                self.vq.used_idx(&mut self.qt)?;
            }
            best = best.min(start.elapsed().as_secs_f64() * 1e6 / f64::from(n));
        }
        Ok(best)
    }
}

fn main() -> Res<()> {
    let a = args()?;
    let image_arg;
    let chardev;
    let _daemon;
    let extra: Vec<&str> = if a.backend == "vmm-blk" {
        image_arg = format!(
            "file={},if=none,id=d0,format={}",
            a.image.display(),
            a.format
        );
        vec![
            "-drive",
            &image_arg,
            "-device",
            "virtio-blk-pci,drive=d0,queue-size=128",
        ]
    } else {
        let sock = a.socket.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("blk-bench-qsd-{}.sock", std::process::id()))
        });
        _daemon = start_qsd(&a.image, &a.format, &sock)?;
        chardev = format!("socket,id=vu,path={}", sock.display());
        vec![
            "-chardev",
            &chardev,
            "-device",
            "vhost-user-blk-pci,chardev=vu,queue-size=128",
        ]
    };
    let qt = Qtest::start(MEM, &extra)?;
    let reference = a.reference.clone().unwrap_or_else(|| a.image.clone());
    let mut b = Bench::new(qt, &reference)?;
    let rtt = b.round_trip()?;
    println!(
        "{}",
        json!({ "backend": a.backend, "format": a.format, "workload": "qtest-rtt", "us": rtt })
    );
    let workloads = [
        ("4k-randread", true, true, 4096),
        ("1m-seqread", false, true, MAX_BS),
        ("1m-seqwrite", false, false, MAX_BS),
    ];
    for (name, random, read, bs) in workloads {
        for qd in [1, MAX_QD] {
            let iops = b.run(random, read, qd, bs, a.seconds)?;
            println!(
                "{}",
                json!({
                    "backend": a.backend,
                    "format": a.format,
                    "workload": name,
                    "qd": qd,
                    "bs": bs,
                    "iops": iops,
                    "mib_s": iops * bs as f64 / f64::from(1 << 20),
                })
            );
        }
    }
    Ok(())
}
