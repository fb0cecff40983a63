//! Every fuzz target replays its corpus (`fuzz/corpus/TARGET/`: the seeds made from real
//! traffic by `write_seeds`, and every input fuzzing kept or that once crashed), so a bug
//! found once stays fixed. `cargo test -p fuzz-targets -- --ignored write_seeds` writes the
//! seeds again.

use std::path::PathBuf;

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

#[test]
fn every_target_replays_its_corpus() {
    for (name, target) in fuzz_targets::TARGETS {
        let dir = corpus_dir(name);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .flatten()
            .map(|e| e.path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name} has no corpus");
        for input in &inputs {
            let data = std::fs::read(input).unwrap();
            target(&data);
        }
        eprintln!("{name}: {} inputs replayed", inputs.len());
    }
}

/// Seeds from real traffic: what our own clients, streams and tools produce.
#[test]
#[ignore]
fn write_seeds() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
    };

    // QMP: a negotiation and the commands management sends, some with bad arguments.
    let sessions: &[(&str, &str)] = &[
        ("negotiate", "{\"execute\": \"qmp_capabilities\"}\n{\"execute\": \"query-status\", \"id\": 1}\n"),
        ("device-add", "\u{1b}{\"execute\":\"qmp_capabilities\"}{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"virtio-blk-pci\",\"drive\":\"d0\",\"id\":\"v0\"}}"),
        ("migrate", "{\"execute\":\"qmp_capabilities\"}{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"unix:/tmp/m\",\"blk\":true}}{\"execute\":\"query-migrate\"}"),
        ("oob", "{\"execute\":\"qmp_capabilities\",\"arguments\":{\"enable\":[\"oob\"]}}{\"exec-oob\":\"migrate-pause\",\"id\":\"x\"}"),
        ("bad-args", "{\"execute\":\"qmp_capabilities\"}{\"execute\":\"block_resize\",\"arguments\":{\"device\":3,\"size\":\"x\"}}{\"execute\":\"balloon\",\"arguments\":{\"value\":-1}}"),
        ("broken", "{\"execute\": \"qmp_capabilities\"\n]}{\"execute\": [1, {\"a\": \"\\ud800\"}]}\n"),
        ("nested", "[[[[[[[[[[[[[[[[[[[[{\"execute\":\"x\"}]]]]]]]]]]]]]]]]]]]]"),
    ];
    for (name, text) in sessions {
        write("qmp_stream", name, text.as_bytes());
    }

    // A migration stream as our source writes it: header, RAM, disks, a section, the end.
    {
        use vmm::migration::disk::DiskInfo;
        use vmm::migration::stream::{Header, StreamWriter};
        let mut w = StreamWriter::new(Vec::new()).unwrap();
        w.header(&Header {
            ram_size: 32 << 20,
            vcpus: 1,
            accel: "emu".into(),
            devices: vec!["serial 0".into(), "pci 3 virtio-blk-pci v0".into()],
            running: true,
        })
        .unwrap();
        let page = vec![0x5a; 4096];
        w.ram(0, &[Some(&page), None, Some(&page)]).unwrap();
        w.disks(&[DiskInfo {
            drive: "d0".into(),
            size: (1 << 20) + 512,
            incremental: false,
            backing: None,
        }])
        .unwrap();
        w.disk_chunks(0, 1, &[Some(&[7u8; 512][..])]).unwrap();
        w.section("serial 0", &[1, 2, 3, 4]).unwrap();
        w.end().unwrap();
        write("migration_stream", "blk", &w.into_inner());
    }

    // Control messages of every kind, as the channel sends them.
    {
        use ipc::channel::Message;
        let blk: Message<ipc::blk::BlkRequest, ipc::blk::BlkReply, ipc::blk::BlkEvent> =
            Message::Request {
                id: 7,
                body: ipc::blk::BlkRequest::WriteChunks {
                    chunk_size: 1 << 20,
                    first: 3,
                    zero: vec![true, false],
                },
            };
        write(
            "ipc_messages",
            "blk-write-chunks",
            &postcard::to_stdvec(&blk).unwrap(),
        );
        let reply: Message<ipc::blk::BlkRequest, ipc::blk::BlkReply, ipc::blk::BlkEvent> =
            Message::Reply {
                id: 7,
                body: Ok(ipc::blk::BlkReply::ChunksRead {
                    zero: vec![false; 8],
                }),
            };
        write(
            "ipc_messages",
            "blk-chunks-read",
            &postcard::to_stdvec(&reply).unwrap(),
        );
        let event: Message<ipc::blk::BlkRequest, ipc::blk::BlkReply, ipc::blk::BlkEvent> =
            Message::Event(ipc::blk::BlkEvent::IoError {
                write: true,
                message: "EIO".into(),
            });
        write(
            "ipc_messages",
            "blk-event",
            &postcard::to_stdvec(&event).unwrap(),
        );
        let net: Message<ipc::net::NetRequest, ipc::net::NetReply, ipc::net::NetEvent> =
            Message::Request {
                id: 1,
                body: ipc::net::NetRequest::SetRxFilter(ipc::net::RxFilter {
                    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                    multicast: vec![[1, 0, 0x5e, 0, 0, 1]],
                    vlans: Some(vec![1, 4095]),
                    ..Default::default()
                }),
            };
        write(
            "ipc_messages",
            "net-filter",
            &postcard::to_stdvec(&net).unwrap(),
        );
    }

    // qcow2 images as qemu-img makes them: empty, and with data, zero and a backing name.
    {
        let dir = std::env::temp_dir().join(format!("fuzz-seeds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("x.qcow2");
        let run = |cmd: &str, args: &[&str]| {
            let ok = std::process::Command::new(cmd).args(args).status().unwrap();
            assert!(ok.success(), "{cmd} {args:?}");
        };
        let p = img.to_str().unwrap();
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                p,
                "64K",
            ],
        );
        write("qcow2_image", "empty", &std::fs::read(&img).unwrap());
        run(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x33 1k 2k",
                "-c",
                "write -z 8k 1k",
                p,
            ],
        );
        write("qcow2_image", "data", &std::fs::read(&img).unwrap());
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-u",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=512",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                p,
                "64K",
            ],
        );
        write("qcow2_image", "overlay", &std::fs::read(&img).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // virtio-blk requests as Linux's driver makes them: a read, a write, a discard.
    {
        let desc = |addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = addr.to_le_bytes().to_vec();
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&flags.to_le_bytes());
            d.extend_from_slice(&next.to_le_bytes());
            d
        };
        let (next, device_writes) = (1u16, 2u16);
        let base = 0x8_0000u64;
        for (name, kind, data_flags, data_len) in [
            ("read", 0u32, next | device_writes, 1024u32),
            ("write", 1, next, 1024),
            ("discard", 11, next, 16),
        ] {
            let mut bytes = desc(base, 16, next, 1);
            bytes.extend(desc(base + 16, data_len, data_flags, 2));
            bytes.extend(desc(base + 16 + u64::from(data_len), 1, device_writes, 0));
            bytes.resize(8 * 16, 0);
            let mut header = kind.to_le_bytes().to_vec();
            header.extend_from_slice(&0u32.to_le_bytes());
            header.extend_from_slice(&2u64.to_le_bytes());
            bytes.extend(header);
            if kind == 11 {
                // One range: sector 4, 8 sectors, no flags.
                bytes.extend_from_slice(&4u64.to_le_bytes());
                bytes.extend_from_slice(&8u32.to_le_bytes());
                bytes.extend_from_slice(&0u32.to_le_bytes());
            } else {
                bytes.extend(std::iter::repeat_n(0x33u8, data_len as usize));
            }
            write("virtio_blk_chain", name, &bytes);
        }
    }

    // Socket traffic: control frames as the channel sends them, and a local offer.
    {
        use std::os::fd::AsFd;
        use std::os::unix::net::UnixStream;
        let (a, mut b) = UnixStream::pair().unwrap();
        let frame = postcard::to_stdvec(&ipc::channel::Message::<
            ipc::blk::BlkRequest,
            ipc::blk::BlkReply,
            ipc::blk::BlkEvent,
        >::Request {
            id: 1,
            body: ipc::blk::BlkRequest::Stats,
        })
        .unwrap();
        ipc::frame::send_frame(&a, &frame, &[]).unwrap();
        ipc::frame::send_frame(&a, &frame, &[]).unwrap();
        drop(a);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut b, &mut bytes).unwrap();
        write("socket_frames", "control", &bytes);

        let (a, mut b) = UnixStream::pair().unwrap();
        let ram = std::fs::File::open("/dev/null").unwrap();
        let fds = vec![(
            vmm::migration::local::LocalItem::Ram,
            ram.as_fd().try_clone_to_owned().unwrap(),
        )];
        vmm::migration::local::send_offer(&a, &fds).unwrap();
        drop(a);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut b, &mut bytes).unwrap();
        write("socket_frames", "local-offer", &bytes);
    }

    // Command lines as management and the tests write them.
    let lines: &[(&str, &[&str])] = &[
        (
            "emu",
            &[
                "vmm",
                "-accel",
                "emu",
                "-m",
                "512",
                "-kernel",
                "k",
                "-append",
                "console=ttyS0",
                "-serial",
                "stdio",
                "-display",
                "none",
            ],
        ),
        (
            "drives",
            &[
                "vmm",
                "-drive",
                "file=a.qcow2,format=qcow2,if=none,id=d0",
                "-device",
                "virtio-blk-pci,drive=d0,id=v0",
                "-incoming",
                "unix:/tmp/m",
            ],
        ),
        (
            "net",
            &[
                "vmm",
                "-netdev",
                "tap,id=n0,ifname=tap0,script=no,downscript=no",
                "-device",
                "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
                "-qmp",
                "unix:/tmp/q,server=on,wait=off",
            ],
        ),
        (
            "bad",
            &[
                "vmm",
                "-m",
                "1T",
                "-smp",
                "0",
                "-drive",
                "if=floppy",
                "-vnc",
                ":99999",
            ],
        ),
    ];
    for (name, args) in lines {
        write("cli_args", name, args.join("\0").as_bytes());
    }
}
