//! libqos virtio against virtio-blk-pci and its vmm-blk process: a CPU-less machine reads
//! and writes the disk through a split virtqueue, with MSI-X completions.

use std::time::Duration;

use vmm_tests::libqos::pci::{self, BarAllocator};
use vmm_tests::libqos::virtio::{VirtioPciDevice, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK};
use vmm_tests::libqos::virtqueue::{Buffer, GuestAlloc, Virtqueue};
use vmm_tests::qtest::Qtest;

const RAM: u64 = 128 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);
const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_GET_ID: u32 = 8;
const MSI_DATA_BASE: u32 = 0x4030;

/// One request: header, one 512-byte data buffer, status byte. Returns the used length.
fn request(
    qt: &mut Qtest,
    vq: &mut Virtqueue,
    mem: &mut GuestAlloc,
    kind: u32,
    sector: u64,
    data: &[u8; 512],
) -> (u32, [u8; 512]) {
    let hdr = mem.alloc(16, 16).unwrap();
    let buf = mem.alloc(512, 512).unwrap();
    let status = mem.alloc(1, 1).unwrap();
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    qt.memwrite(hdr, &h).unwrap();
    qt.memwrite(buf, data).unwrap();
    qt.memset(status, 1, 0xff).unwrap();
    let data_buf = if kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_GET_ID {
        Buffer::writable(buf, 512)
    } else {
        Buffer::readable(buf, 512)
    };
    let head = vq
        .add_chain(
            qt,
            &[
                Buffer::readable(hdr, 16),
                data_buf,
                Buffer::writable(status, 1),
            ],
        )
        .unwrap();
    vq.kick(qt).unwrap();
    // Queue 0 uses MSI-X vector 1.
    assert_eq!(
        qt.wait_msi(TIMEOUT).unwrap(),
        (0xfee0_0000, VirtioPciDevice::msi_data(MSI_DATA_BASE, 1))
    );
    let used = vq.wait_used(qt, TIMEOUT).unwrap();
    assert_eq!(used.id, head);
    assert_eq!(qt.memread(status, 1).unwrap(), [0], "request status");
    let mut out = [0u8; 512];
    out.copy_from_slice(&qt.memread(buf, 512).unwrap());
    (used.len, out)
}

#[test]
fn virtio_blk_reads_and_writes_sectors() {
    let dir = vmm_tests::TempDir::new("qtest-blk");
    let img = dir.join("disk.raw");
    let disk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 13 + 1) as u8).collect();
    std::fs::write(&img, &disk).unwrap();
    let drive = format!("file={},if=none,id=d0,format=raw", img.display());
    let mut qt = Qtest::start(
        "128M",
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0,serial=SER123",
        ],
    )
    .unwrap();

    let f = pci::enumerate_bus0(&mut qt)
        .unwrap()
        .into_iter()
        .find(|f| f.vendor_id == 0x1af4)
        .expect("a virtio function");
    let mut bars = BarAllocator::for_ram(RAM);
    let mut dev = VirtioPciDevice::new(&mut qt, f, Some(&mut bars)).unwrap();
    assert_eq!(dev.device_type(), VIRTIO_ID_BLOCK);
    let features = dev.negotiate(&mut qt, VIRTIO_F_VERSION_1).unwrap();
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    dev.enable_msix(&mut qt, MSI_DATA_BASE).unwrap();
    dev.set_config_vector(&mut qt, 0).unwrap();
    let mut mem = GuestAlloc::for_ram(RAM);
    let mut vq = dev.setup_queue(&mut qt, &mut mem, 0, 0, Some(1)).unwrap();
    dev.driver_ok(&mut qt).unwrap();
    // virtio_blk_config.capacity, in 512-byte sectors.
    assert_eq!(
        dev.config_readq(&mut qt, 0).unwrap(),
        (disk.len() / 512) as u64
    );

    let (len, data) = request(&mut qt, &mut vq, &mut mem, VIRTIO_BLK_T_IN, 1, &[0; 512]);
    assert_eq!(len, 513);
    assert_eq!(&data[..], &disk[512..1024]);

    let new = [0x5a; 512];
    request(&mut qt, &mut vq, &mut mem, VIRTIO_BLK_T_OUT, 2, &new);
    let (_, back) = request(&mut qt, &mut vq, &mut mem, VIRTIO_BLK_T_IN, 2, &[0; 512]);
    assert_eq!(back, new);
    let (_, id) = request(
        &mut qt,
        &mut vq,
        &mut mem,
        VIRTIO_BLK_T_GET_ID,
        0,
        &[0; 512],
    );
    assert_eq!(&id[..7], b"SER123\0");
    drop(qt);
    assert_eq!(&std::fs::read(&img).unwrap()[1024..1536], &new[..]);
}

/// QMP block_resize while the driver runs: vmm-blk grows the image (asked over the
/// control channel), the vmm raises the configuration change; the driver gets the MSI-X
/// configuration vector, a new config generation and the new capacity.
#[test]
fn block_resize_reaches_the_driver() {
    use vmm_tests::qmp::Qmp;
    let dir = vmm_tests::TempDir::new("qtest-resize");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("file={},if=none,id=d0,format=raw", img.display());
    let qmp_sock = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", qmp_sock.display());
    let mut qt = Qtest::start(
        "128M",
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-pci,drive=d0",
            "-qmp",
            &qmp_arg,
        ],
    )
    .unwrap();
    let f = pci::enumerate_bus0(&mut qt)
        .unwrap()
        .into_iter()
        .find(|f| f.vendor_id == 0x1af4)
        .expect("a virtio function");
    let mut bars = BarAllocator::for_ram(RAM);
    let mut dev = VirtioPciDevice::new(&mut qt, f, Some(&mut bars)).unwrap();
    dev.negotiate(&mut qt, VIRTIO_F_VERSION_1).unwrap();
    dev.enable_msix(&mut qt, MSI_DATA_BASE).unwrap();
    dev.set_config_vector(&mut qt, 0).unwrap();
    dev.driver_ok(&mut qt).unwrap();
    assert_eq!(dev.config_readq(&mut qt, 0).unwrap(), 2048);
    let generation = dev.config_generation(&mut qt).unwrap();

    let mut qmp = Qmp::connect(&qmp_sock);
    let bad = qmp.execute(
        "block_resize",
        Some(serde_json::json!({"device": "nope", "size": 1 << 21})),
    );
    assert_eq!(
        bad["error"]["desc"],
        "Cannot find device='nope' nor node-name=''"
    );
    let shrink = qmp.execute(
        "block_resize",
        Some(serde_json::json!({"device": "d0", "size": 1 << 19})),
    );
    assert!(shrink.get("error").is_some(), "shrinking: {shrink}");
    let ok = qmp.execute(
        "block_resize",
        Some(serde_json::json!({"device": "d0", "size": 4 << 20})),
    );
    assert_eq!(ok, serde_json::json!({"return": {}}));
    assert_eq!(
        qt.wait_msi(TIMEOUT).unwrap(),
        (0xfee0_0000, VirtioPciDevice::msi_data(MSI_DATA_BASE, 0)),
        "the configuration vector fired"
    );
    assert_eq!(dev.config_readq(&mut qt, 0).unwrap(), 8192);
    assert_ne!(dev.config_generation(&mut qt).unwrap(), generation);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 4 << 20);
}

/// Without MSI-X the function interrupts through INTx: its line (the GSI in the interrupt
/// line register) rises when a request completes, and reading the ISR lowers it.
#[test]
fn without_msix_completions_raise_intx_until_the_isr_is_read() {
    let dir = vmm_tests::TempDir::new("qtest-intx");
    let img = dir.join("disk.raw");
    std::fs::write(&img, vec![0x5au8; 1 << 20]).unwrap();
    let drive = format!("file={},if=none,id=d0,format=raw", img.display());
    let mut qt = Qtest::start(
        "128M",
        &["-drive", &drive, "-device", "virtio-blk-pci,drive=d0"],
    )
    .unwrap();
    qt.irq_intercept_in("ioapic").unwrap();
    let f = pci::enumerate_bus0(&mut qt)
        .unwrap()
        .into_iter()
        .find(|f| f.vendor_id == 0x1af4)
        .expect("a virtio function");
    let gsi = u32::from(pci::config_readb(&mut qt, f.addr, 0x3c).unwrap());
    assert!((16..24).contains(&gsi), "INTx line {gsi}");
    let mut bars = BarAllocator::for_ram(RAM);
    let mut dev = VirtioPciDevice::new(&mut qt, f, Some(&mut bars)).unwrap();
    dev.negotiate(&mut qt, VIRTIO_F_VERSION_1).unwrap();
    let mut mem = GuestAlloc::for_ram(RAM);
    let mut vq = dev.setup_queue(&mut qt, &mut mem, 0, 0, None).unwrap();
    dev.driver_ok(&mut qt).unwrap();

    let hdr = mem.alloc(16, 16).unwrap();
    let buf = mem.alloc(512, 512).unwrap();
    let status = mem.alloc(1, 1).unwrap();
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    qt.memwrite(hdr, &h).unwrap();
    qt.memset(status, 1, 0xff).unwrap();
    vq.add_chain(
        &mut qt,
        &[
            Buffer::readable(hdr, 16),
            Buffer::writable(buf, 512),
            Buffer::writable(status, 1),
        ],
    )
    .unwrap();
    vq.kick(&mut qt).unwrap();
    qt.wait_irq(gsi, TIMEOUT).unwrap();
    vq.wait_used(&mut qt, TIMEOUT).unwrap();
    assert_eq!(qt.memread(status, 1).unwrap(), [0]);
    assert_eq!(qt.memread(buf, 512).unwrap(), vec![0x5a; 512]);
    assert!(
        qt.get_irq(gsi).unwrap(),
        "the line stays up until the ISR is read"
    );
    assert_eq!(dev.read_isr(&mut qt).unwrap() & 1, 1, "queue interrupt");
    assert!(
        !qt.get_irq(gsi).unwrap(),
        "reading the ISR lowered the line"
    );
    assert_eq!(dev.read_isr(&mut qt).unwrap(), 0);
}
