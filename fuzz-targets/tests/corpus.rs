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

    // HMP lines as the tests and a person at the console type them.
    let consoles: &[(&str, &str)] = &[
        ("info", "info status\ninfo registers 0\ninfo registers -a\ninfo pci\nhelp info\nhelp cpu\n"),
        ("balloon", "balloon 64\nballoon -5\nballoon 1.5\nballoon 99999999\nballoon\ninfo balloon\n"),
        ("memory", "memsave 0x1000 4096 \"/tmp/a b\"\npmemsave 0 0x10 /tmp/p\ncpu 1\ncpu x\n"),
        ("input", "sendkey ctrl-alt-f1\nsendkey shift-a 200\nsendkey frob\nmouse_move 10 -5 1\nmouse_button 4\n"),
        ("migrate", "migrate_set_speed 100m\nmigrate_set_speed 5G\nmigrate_set_downtime 0.5\nmigrate -d -b unix:/tmp/m\nmigrate_incoming unix:/tmp/m\n"),
        ("devices", "netdev_add user,id=h1\nnetdev_add user,id=h2,restrict=maybe\nset_link h1 off\ndrive_add 0 file=a.qcow2,format=qcow2,if=none,id=d1\nscreendump /tmp/s.png -f png\n"),
        ("display", "change vnc password abc\nset_password vnc secret keep\nexpire_password vnc +60\ninfo vnc\n"),
        ("quotes", "screendump \"/tmp/x \\\"y\\\\\"\ninfo \"x\n"),
    ];
    for (name, text) in consoles {
        write("hmp_line", name, text.as_bytes());
    }

    // SCSI commands as Linux's sr and cdrom drivers, udev's cdrom_id and isofs send them
    // (the allocation lengths and buffer sizes theirs), after the power-on unit attention.
    {
        let rec = |flags: u8, data_out: u16, data_in: u16, cdb: &[u8]| {
            let mut r = vec![flags];
            r.extend_from_slice(&data_out.to_le_bytes());
            r.extend_from_slice(&data_in.to_le_bytes());
            r.extend_from_slice(&[0, 0, 0]);
            let mut c = [0u8; 16];
            c[..cdb.len()].copy_from_slice(cdb);
            r.extend_from_slice(&c);
            r
        };
        let probe: Vec<Vec<u8>> = vec![
            rec(0, 0, 0, &[0x00]),                            // TEST UNIT READY: UA
            rec(0, 0, 96, &[0x03, 0, 0, 0, 96, 0]),           // REQUEST SENSE
            rec(0, 0, 36, &[0x12, 0, 0, 0, 36, 0]),           // INQUIRY
            rec(0, 0, 255, &[0x12, 1, 0x00, 0, 255, 0]),      // INQUIRY VPD pages
            rec(0, 0, 255, &[0x12, 1, 0x80, 0, 255, 0]),      // unit serial number
            rec(0, 0, 255, &[0x12, 1, 0x83, 0, 255, 0]),      // device identification
            rec(0, 0, 8, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]), // READ CAPACITY(10)
            rec(
                0,
                0,
                32,
                &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0],
            ),
            rec(0, 0, 128, &[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 128, 0]), // MODE SENSE(10) caps
            rec(0, 0, 255, &[0x1a, 0, 0x3f, 0, 255, 0]),             // MODE SENSE(6) all pages
            rec(0, 0, 8, &[0x46, 0, 0, 0, 0, 0, 0, 0, 8, 0]),        // GET CONFIGURATION
            rec(0, 0, 65530, &[0x46, 2, 0, 0, 0, 0, 0, 0xff, 0xfa, 0]),
            rec(0, 0, 8, &[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]), // GET EVENT STATUS
            rec(0, 0, 12, &[0x43, 0, 0, 0, 0, 0, 0, 0, 12, 0]),  // READ TOC
            rec(0, 0, 12, &[0x43, 2, 1, 0, 0, 0, 0, 0, 12, 0]),  // READ TOC MSF, session
            rec(0, 0, 1024, &[0x43, 2, 2, 0, 0, 0, 0, 4, 0, 0]), // full TOC
            rec(0, 0, 32, &[0x51, 0, 0, 0, 0, 0, 0, 0, 32, 0]),  // READ DISC INFORMATION
            rec(0, 0, 16, &[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]), // REPORT LUNS
            rec(0, 0, 8, &[0xbd, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0]), // MECHANISM STATUS
            rec(
                0,
                0,
                0,
                &[0xbb, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0],
            ), // SET CD SPEED
        ];
        write("scsi_cdb", "probe", &[&[0u8][..], &probe.concat()].concat());
        let reads: Vec<Vec<u8>> = vec![
            rec(0, 0, 0, &[0x00]),
            rec(0, 0, 0, &[0x00]),
            rec(0, 0, 4096, &[0x28, 0, 0, 0, 0, 16, 0, 0, 2, 0]), // READ(10) 2 blocks
            rec(4, 0, 8192, &[0xa8, 0, 0, 0, 0, 3, 0, 0, 0, 4, 0, 0]), // READ(12), split
            rec(
                12,
                0,
                2048,
                &[0x88, 0, 0, 0, 0, 0, 0, 0, 0, 63, 0, 0, 0, 1, 0, 0],
            ),
            rec(0, 0, 2048, &[0x08, 0, 0, 5, 1, 0]), // READ(6)
            rec(0, 0, 4096, &[0x28, 0, 0, 0, 0, 63, 0, 0, 2, 0]), // past the end
            rec(0, 0, 0, &[0x2f, 0, 0, 0, 0, 1, 0, 0, 1, 0]), // VERIFY(10)
            rec(0, 0, 0, &[0x2b, 0, 0, 0, 0, 9, 0, 0, 0, 0]), // SEEK(10)
            rec(0, 2048, 0, &[0x2a, 0, 0, 0, 0, 1, 0, 0, 1, 0]), // WRITE(10): read-only
            rec(0, 0, 0, &[0x35]),                   // SYNCHRONIZE CACHE
        ];
        write("scsi_cdb", "reads", &[&[2u8][..], &reads.concat()].concat());
        let tray: Vec<Vec<u8>> = vec![
            rec(0, 0, 0, &[0x00]),
            rec(0, 0, 0, &[0x1e, 0, 0, 0, 1, 0]), // PREVENT
            rec(0, 0, 0, &[0x1b, 0, 0, 0, 2, 0]), // eject: refused
            rec(0, 0, 8, &[0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8, 0]),
            rec(0, 0, 0, &[0x1e, 0, 0, 0, 0, 0]), // ALLOW
            rec(0, 0, 0, &[0x1b, 0, 0, 0, 2, 0]), // eject
            rec(0, 0, 0, &[0x00]),
            rec(0, 0, 18, &[0x03, 0, 0, 0, 18, 0]),
            rec(0, 0, 0, &[0x1b, 0, 0, 0, 3, 0]),   // load
            rec(1, 0, 36, &[0x12, 0, 0, 0, 36, 0]), // the empty drive
            rec(1, 0, 0, &[0x00]),
            rec(2, 0, 36, &[0x12, 0, 0, 0, 36, 0]), // no such target
            rec(0x10, 0, 0, &[0, 5]),               // TMF LUN reset
            rec(0x10, 0, 0, &[1, 0, 5]),            // AN query
            rec(0, 0, 0, &[0x00]),
        ];
        write("scsi_cdb", "tray", &[&[0u8][..], &tray.concat()].concat());
        // sense_size 32, cdb_size 16; malformed chains.
        let odd: Vec<Vec<u8>> = vec![
            rec(0, 0, 0, &[0x00]),
            rec(8, 512, 0, &[0x12, 0, 0, 0, 36, 0]), // readable after writable
            rec(0, 512, 36, &[0x12, 0, 0, 0, 36, 0]), // both directions
            rec(0x20, 0, 36, &[0x12, 0, 0, 0, 36, 0]), // no room for the response
            rec(0, 2048, 0, &[0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0]), // data-out for a READ
            rec(0, 0, 100, &[0xff]),                 // unknown opcode
        ];
        write(
            "scsi_cdb",
            "odd",
            &[&[4u8, 32, 16][..], &odd.concat()].concat(),
        );
    }

    // vhost-user: a session between the vmm's frontend and vmm-blk's backend, through a
    // proxy that records each direction (and passes the fds on).
    {
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::os::unix::net::{UnixListener, UnixStream};
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;

        /// Receive exactly `buf.len()` bytes, and the fds that come with them.
        fn recv_exact(from: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> bool {
            let mut done = 0;
            while done < buf.len() {
                let mut raw = [0; 8];
                let mut iov = [libc::iovec {
                    iov_base: buf[done..].as_mut_ptr().cast(),
                    iov_len: buf.len() - done,
                }];
                // SAFETY: the iovec is the rest of `buf`, which lives through the call.
                let (n, nfds) = unsafe { from.recv_with_fds(&mut iov, &mut raw) }.unwrap();
                // SAFETY: received with the message: ours.
                fds.extend(
                    raw[..nfds]
                        .iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) }),
                );
                if n == 0 {
                    return false;
                }
                done += n;
            }
            true
        }

        /// Forward message after message (header, then the body its size says), each with
        /// its fds; the bytes, recorded.
        fn pump(from: UnixStream, to: UnixStream) -> Vec<u8> {
            use std::os::fd::AsRawFd;
            let mut recorded = Vec::new();
            loop {
                let mut fds = Vec::new();
                let mut msg = vec![0u8; 12];
                if !recv_exact(&from, &mut msg, &mut fds) {
                    let _ = to.shutdown(std::net::Shutdown::Write);
                    return recorded;
                }
                let size = u32::from_le_bytes([msg[8], msg[9], msg[10], msg[11]]) as usize;
                msg.resize(12 + size, 0);
                let whole = recv_exact(&from, &mut msg[12..], &mut fds);
                recorded.extend_from_slice(&msg);
                let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
                let _ = to.send_with_fds(&[&msg[..]], &raw);
                if !whole {
                    let _ = to.shutdown(std::net::Shutdown::Write);
                    return recorded;
                }
            }
        }

        /// The two directions of a session of the frontend's exchanges with `backend`.
        fn record<B: device_procs::vhost_daemon::Served>(
            backend: B,
            path: &std::path::Path,
        ) -> (Vec<u8>, Vec<u8>) {
            let mut listener = vhost::vhost_user::Listener::from(UnixListener::bind(path).unwrap());
            let backend = std::sync::Arc::new(backend);
            let server = std::thread::spawn(move || {
                device_procs::vhost_daemon::serve_one(&backend, &mut listener).unwrap();
            });
            let (front, proxy_front) = UnixStream::pair().unwrap();
            let proxy_back = UnixStream::connect(path).unwrap();
            let (f2, b2) = (
                proxy_front.try_clone().unwrap(),
                proxy_back.try_clone().unwrap(),
            );
            let requests = std::thread::spawn(move || pump(f2, b2));
            let replies = std::thread::spawn(move || pump(proxy_back, proxy_front));
            let ram = vmm::memory::MemoryManager::new(2 << 20).unwrap();
            fuzz_targets::vhost_frontend_exchanges(front, ram.guest_memory(), &mut || {});
            let requests = requests.join().unwrap();
            let replies = replies.join().unwrap();
            server.join().unwrap();
            (requests, replies)
        }

        let dir = std::env::temp_dir().join(format!("fuzz-vhost-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk_file = || {
            use std::io::Write;
            let mut f = tempfile_in(&dir);
            f.write_all(&[0x5a; 64 * 1024]).unwrap();
            f
        };
        let disk = device_procs::blk::request::Disk::new(disk_file(), false, "seed").unwrap();
        let blk =
            device_procs::blk::backend::BlkBackend::new(disk, 1, 128, Default::default(), None)
                .unwrap();
        let (requests, replies) = record(blk, &dir.join("blk.sock"));
        write(
            "vhost_user_messages",
            "blk-requests",
            &[&[0u8][..], &requests].concat(),
        );
        write(
            "vhost_user_messages",
            "blk-replies",
            &[&[1u8][..], &replies].concat(),
        );
        // The same replies from a backend that also offers its channel (BACKEND_REQ), and
        // its requests on it: configuration changes, one that wants an answer, a VRING_CALL
        // without its fd.
        let mut offering = replies.clone();
        let mut at = 0;
        while at + 12 <= offering.len() {
            let size = u32::from_le_bytes(offering[at + 8..at + 12].try_into().unwrap()) as usize;
            if offering[at] == 15 {
                offering[at + 12] |= 0x20;
            }
            at += 12 + size;
        }
        let header = |request: u32, flags: u32, size: u32| {
            [
                request.to_le_bytes(),
                flags.to_le_bytes(),
                size.to_le_bytes(),
            ]
            .concat()
        };
        let channel = [
            header(2, 1, 0),
            header(2, 1 | 8, 0),
            header(4, 1, 8),
            0u64.to_le_bytes().to_vec(),
        ]
        .concat();
        write(
            "vhost_user_messages",
            "blk-replies-channel",
            &[
                &[3u8][..],
                &(offering.len() as u16).to_le_bytes(),
                &offering,
                &channel,
            ]
            .concat(),
        );
        let bus = std::sync::Arc::new(device_procs::scsi::bus::Bus::new(None));
        let medium = device_procs::scsi::cdrom::Medium::new(disk_file()).unwrap();
        bus.add_cdrom(0, 0, "cd0", "", Some(medium)).unwrap();
        let scsi = device_procs::scsi::backend::ScsiBackend::new(bus, 1, 128).unwrap();
        let (requests, _) = record(scsi, &dir.join("scsi.sock"));
        write(
            "vhost_user_messages",
            "scsi-requests",
            &[&[2u8][..], &requests].concat(),
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // Virtio queues as Linux's drivers fill them (buffer: le16 length, flags: 1 writable,
    // 4 contents follow, 8 last).
    {
        let buf = |len: usize, flags: u8, contents: &[u8]| {
            let mut b = (len as u16).to_le_bytes().to_vec();
            b.push(flags);
            b.extend_from_slice(contents);
            b
        };
        let (w, c, last) = (1u8, 4u8, 8u8);

        // virtio-balloon: stats primed, inflate 256 pages, deflate them, a free page
        // report, the driver's `actual`, a new target.
        let mut stats = Vec::new();
        for tag in 0..10u16 {
            stats.extend_from_slice(&tag.to_le_bytes());
            stats.extend_from_slice(&(u64::from(tag) << 20).to_le_bytes());
        }
        let pfns: Vec<u8> = (0x100u32..0x200).flat_map(|p| p.to_le_bytes()).collect();
        let mut balloon = vec![0x1e];
        balloon.push(2);
        balloon.extend(buf(stats.len(), c | last, &stats));
        balloon.push(0);
        balloon.extend(buf(pfns.len(), c | last, &pfns));
        balloon.push(8);
        balloon.extend_from_slice(&256u32.to_le_bytes());
        balloon.push(1 | 4);
        balloon.extend(buf(pfns.len(), c | last, &pfns));
        balloon.push(3 | 16);
        balloon.extend_from_slice(&(1024u32).to_le_bytes());
        balloon.extend(buf(32 * 1024, w | last, &[]));
        balloon.push(2);
        balloon.extend(buf(stats.len(), c | last, &stats));
        write("virtio_balloon", "linux", &balloon);

        // virtio-net: control commands as Linux sends them at probe and for `ip link`,
        // RX buffers, frames from the host (broadcast ARP, unicast, multicast) and a
        // frame from the guest.
        let ctrl = |class: u8, cmd: u8, data: &[u8]| {
            let mut r = vec![0u8];
            r.extend(buf(2, c, &[class, cmd]));
            if !data.is_empty() {
                r.extend(buf(data.len(), c, data));
            }
            r.extend(buf(1, w | last, &[]));
            r
        };
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let mut table = 1u32.to_le_bytes().to_vec();
        table.extend_from_slice(&[0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
        table.extend_from_slice(&2u32.to_le_bytes());
        table.extend_from_slice(&[1, 0, 0x5e, 0, 0, 1, 0x33, 0x33, 0, 0, 0, 1]);
        let arp: Vec<u8> = [
            &[0xff; 6][..],
            &[0x52, 0x55, 10, 0, 2, 2],
            &[8, 6, 0, 1, 8, 0, 6, 4, 0, 1],
            &[0x52, 0x55, 10, 0, 2, 2, 10, 0, 2, 2],
            &[0; 6],
            &[10, 0, 2, 15, 0, 0],
        ]
        .concat();
        let mut unicast = mac.to_vec();
        unicast.extend_from_slice(&[0x52, 0x55, 10, 0, 2, 2, 8, 0]);
        unicast.resize(64, 0x45);
        let mut multicast = vec![1, 0, 0x5e, 0, 0, 1, 0x52, 0x55, 10, 0, 2, 2, 8, 0];
        multicast.resize(64, 0);
        let frame = |f: &[u8]| {
            let mut r = vec![3u8, f.len().div_ceil(8) as u8];
            let mut f = f.to_vec();
            f.resize(f.len().next_multiple_of(8), 0);
            r.extend(f);
            r
        };
        let mut net = vec![0x38];
        net.extend(ctrl(0, 0, &[0])); // promiscuous off
        net.extend(ctrl(0, 1, &[1])); // all-multicast on
        net.extend(ctrl(1, 0, &table)); // MAC tables
        net.extend(ctrl(1, 1, &mac)); // MAC address
        net.extend(ctrl(2, 0, &5u16.to_le_bytes())); // VLAN 5
        net.extend(ctrl(4, 0, &1u16.to_le_bytes())); // one queue pair
        net.extend(ctrl(3, 0, &[])); // announcement acknowledged
                                     // With MRG_RXBUF and GSO the device waits for room for a 64 KiB frame.
        for _ in 0..20 {
            net.push(1);
            net.extend(buf(4096, w | last, &[]));
        }
        net.extend(frame(&arp));
        net.extend(frame(&unicast));
        net.extend(frame(&multicast));
        let mut tx = vec![2u8];
        tx.extend(buf(12, c, &[0; 12]));
        tx.extend(buf(arp.len(), c | last, &arp));
        net.extend(tx);
        net.push(4); // link down
        net.extend(frame(&arp));
        net.push(8 | 1); // link up, a buffer
        net.extend(buf(1526, w | last, &[]));
        write("virtio_net_chain", "linux", &net);
        // Without offloads: MRG_RXBUF, then neither (a buffer per frame, the header and
        // the frame in separate descriptors as older drivers did).
        for (name, setup) in [("mergeable", 0x30u8), ("plain", 0x20)] {
            let mut net = vec![setup];
            net.extend(ctrl(0, 0, &[0]));
            for _ in 0..4 {
                net.push(1);
                net.extend(buf(12, w, &[]));
                net.extend(buf(1514, w | last, &[]));
            }
            net.extend(frame(&arp));
            net.extend(frame(&unicast));
            net.extend(frame(&multicast));
            let mut tx = vec![2u8];
            tx.extend(buf(12, c, &[0; 12]));
            tx.extend(buf(unicast.len(), c | last, &unicast));
            net.extend(tx);
            write("virtio_net_chain", name, &net);
        }

        // virtio-input: the keyboard's configuration as Linux's driver reads it, event
        // buffers, a caps lock LED, keys from a VNC client; then a tablet.
        for (name, setup, events) in [
            (
                "keyboard",
                1u8 | 4,
                [(1u16, 30u16, 1u32), (0, 0, 0), (1, 30, 0), (0, 0, 0)],
            ),
            (
                "tablet",
                4,
                [(3, 0, 0x4000), (3, 1, 0x2000), (1, 0x110, 1), (0, 0, 0)],
            ),
        ] {
            let mut input = vec![setup];
            for (select, subsel) in [
                (1u8, 0u8),
                (2, 0),
                (3, 0),
                (0x11, 0),
                (0x11, 1),
                (0x11, 0x11),
                (0x12, 0),
                (0x12, 1),
            ] {
                input.extend([0, select, subsel]);
            }
            for _ in 0..8 {
                input.push(1);
                input.extend(buf(8, w | last, &[]));
            }
            input.push(2);
            let mut led = 0x11u16.to_le_bytes().to_vec();
            led.extend_from_slice(&1u16.to_le_bytes());
            led.extend_from_slice(&1u32.to_le_bytes());
            input.extend(buf(8, c | last, &led));
            input.extend([3, events.len() as u8]);
            for (kind, code, value) in events {
                input.extend_from_slice(&kind.to_le_bytes());
                input.extend_from_slice(&code.to_le_bytes());
                input.extend_from_slice(&value.to_le_bytes());
            }
            write("virtio_input", name, &input);
        }
    }

    // VNC clients as vncviewer (TigerVNC), gvncviewer and noVNC talk: the handshake of
    // each version, the pixel formats and encodings they ask for, updates, keys, the
    // pointer, cut text, QEMU's extended key event.
    {
        use device_procs::display::vnc::encoding as enc;
        let encodings = |list: &[i32]| {
            let mut m = vec![2u8, 0];
            m.extend_from_slice(&(list.len() as u16).to_be_bytes());
            for e in list {
                m.extend_from_slice(&e.to_be_bytes());
            }
            m
        };
        let pixel_format = |bpp: u8, depth: u8, big: u8, max: [u16; 3], shift: [u8; 3]| {
            let mut m = vec![0u8, 0, 0, 0, bpp, depth, big, 1];
            for v in max {
                m.extend_from_slice(&v.to_be_bytes());
            }
            m.extend_from_slice(&shift);
            m.extend_from_slice(&[0, 0, 0]);
            m
        };
        let update = |incremental: u8| {
            let mut m = vec![3u8, incremental, 0, 0, 0, 0];
            m.extend_from_slice(&64u16.to_be_bytes());
            m.extend_from_slice(&48u16.to_be_bytes());
            m
        };
        let key = |down: u8, keysym: u32| {
            let mut m = vec![4u8, down, 0, 0];
            m.extend_from_slice(&keysym.to_be_bytes());
            m
        };
        let pointer = |mask: u8, x: u16, y: u16| {
            let mut m = vec![5u8, mask];
            m.extend_from_slice(&x.to_be_bytes());
            m.extend_from_slice(&y.to_be_bytes());
            m
        };
        let qemu_key = |down: u16, keysym: u32, keycode: u32| {
            let mut m = vec![255u8, 0];
            m.extend_from_slice(&down.to_be_bytes());
            m.extend_from_slice(&keysym.to_be_bytes());
            m.extend_from_slice(&keycode.to_be_bytes());
            m
        };
        let mut tiger = vec![0b1110u8];
        tiger.extend_from_slice(b"RFB 003.008\n");
        tiger.extend_from_slice(&[1, 1]);
        tiger.extend(pixel_format(32, 24, 0, [255, 255, 255], [16, 8, 0]));
        tiger.extend(encodings(&[
            enc::TIGHT,
            enc::ZRLE,
            enc::ZLIB,
            enc::RAW,
            enc::DESKTOP_SIZE,
            enc::QEMU_EXTENDED_KEY,
            enc::POINTER_TYPE_CHANGE,
            enc::QEMU_LED_STATE,
            enc::COMPRESS_LEVEL_0 + 2,
        ]));
        tiger.extend(update(0));
        tiger.extend(key(1, 0x61));
        tiger.extend(key(0, 0x61));
        tiger.extend(key(1, 0x21)); // '!' without shift
        tiger.extend(key(0, 0x21));
        tiger.extend(pointer(0, 10, 10));
        tiger.extend(pointer(1, 12, 11));
        tiger.extend(pointer(8, 12, 11)); // wheel
        tiger.extend(pointer(0, 12, 11));
        tiger.extend_from_slice(&[6, 0, 0, 0, 0, 0, 0, 5]);
        tiger.extend_from_slice(b"hello");
        tiger.extend(qemu_key(1, 0xffe1, 0x2a));
        tiger.extend(qemu_key(0, 0xffe1, 0x2a));
        tiger.extend(update(1));
        write("rfb_client", "tigervnc", &tiger);

        let mut old = vec![0u8];
        old.extend_from_slice(b"RFB 003.003\n");
        old.push(0);
        old.extend(encodings(&[enc::RAW]));
        old.extend(update(0));
        old.extend(pointer(4, 100, 100));
        old.extend(key(1, 0xff0d));
        write("rfb_client", "rfb33-raw", &old);

        let mut small = vec![0b1000u8];
        small.extend_from_slice(b"RFB 003.007\n");
        small.extend_from_slice(&[1, 1]);
        small.extend(pixel_format(16, 16, 1, [31, 63, 31], [11, 5, 0]));
        small.extend(encodings(&[enc::ZRLE, enc::POINTER_TYPE_CHANGE]));
        small.extend(update(0));
        small.extend(pointer(2, 0x7fff + 5, 0x7fff - 3));
        small.extend(pixel_format(8, 8, 0, [7, 7, 3], [0, 3, 6]));
        small.extend(encodings(&[enc::ZLIB, enc::COMPRESS_LEVEL_9]));
        small.extend(update(0));
        write("rfb_client", "rfb37-16bpp", &small);

        let mut password = vec![1u8];
        password.extend_from_slice(b"RFB 003.008\n");
        password.push(2);
        password.extend_from_slice(&[0x5a; 16]);
        password.push(1);
        write("rfb_client", "password", &password);
    }

    // Kernels: a small ELF vmlinux (a PVH-style 64-bit image), bzImages with its payload
    // gzip-, xz- and zstd-compressed (as the kernel's build makes them: xz with its size
    // appended), and the head of a real bzImage (the guest kernel the tests boot) entered
    // at startup_64.
    {
        use std::io::Write;
        let elf = vmm::loader::elf64_image(0x100_0000, &[0xfa, 0xf4, 0xeb, 0xfd], 0x2000);
        write("kernel_loader", "elf", &[&[0u8][..], &elf].concat());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&elf).unwrap();
        let gz = gz.finish().unwrap();
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
        xz.write_all(&elf).unwrap();
        let mut xz = xz.finish().unwrap();
        xz.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        let zst = zstd::encode_all(&elf[..], 19).unwrap();
        for (name, payload) in [("gzip", gz), ("xz", xz), ("zstd", zst)] {
            write(
                "kernel_loader",
                &format!("bzimage-{name}"),
                &[&[1u8][..], &vmm::loader::bzimage_image(&payload)].concat(),
            );
        }
        let guest =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest/vmlinuz");
        if let Ok(kernel) = std::fs::read(guest) {
            let head = &kernel[..kernel.len().min(32 * 1024)];
            write(
                "kernel_loader",
                "vmlinuz-head",
                &[&[0u8][..], head].concat(),
            );
        }
    }
}

/// An unnamed file in `dir` (a disk image).
fn tempfile_in(dir: &std::path::Path) -> std::fs::File {
    let path = dir.join("disk.img");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file
}
