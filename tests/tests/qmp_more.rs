//! More QMP commands against the real `vmm` binary and tiny KVM guests: query-pci,
//! query-chardev, cpu, inject-nmi, query-cpus, memsave, pmemsave and human-monitor-command.

use std::os::unix::net::UnixStream;
use std::process::Child;
use std::time::Duration;

use iced_x86::code_asm::*;
use serde_json::json;
use vmm_tests::guest::{Asm, LOAD_ADDR};
use vmm_tests::qmp::Qmp;
use vmm_tests::{read_file, require_kvm, spawn_vmm, wait_until, wait_with_timeout, TempDir};

const TIMEOUT: Duration = Duration::from_secs(30);
/// Where the NMI guest builds its IDT.
const IDT_ADDR: u64 = 0x30_0000;
/// Where the NMI guest keeps the IDTR it loads.
const IDTR_ADDR: u64 = 0x30_1000;

/// A guest that installs an NMI handler printing "nmi\n", prints "ready\n", and halts
/// with interrupts off (an NMI still gets through and the guest halts again).
fn nmi_guest(dir: &TempDir) -> String {
    let mut g = Asm::new();
    let mut handler = g.a.create_label();
    let a = &mut g.a;
    // Gate 2 (NMI): a 64-bit interrupt gate to `handler` in the current code segment.
    a.mov(rdi, IDT_ADDR + 2 * 16).unwrap();
    a.lea(rax, ptr(handler)).unwrap();
    a.mov(word_ptr(rdi), ax).unwrap();
    a.mov(cx, cs).unwrap();
    a.mov(word_ptr(rdi + 2), cx).unwrap();
    a.mov(word_ptr(rdi + 4), 0x8e00u32).unwrap();
    a.shr(rax, 16u32).unwrap();
    a.mov(word_ptr(rdi + 6), ax).unwrap();
    a.shr(rax, 16u32).unwrap();
    a.mov(dword_ptr(rdi + 8), eax).unwrap();
    a.mov(dword_ptr(rdi + 12), 0u32).unwrap();
    a.mov(rdi, IDTR_ADDR).unwrap();
    a.mov(word_ptr(rdi), 0xfffu32).unwrap();
    a.mov(rax, IDT_ADDR).unwrap();
    a.mov(qword_ptr(rdi + 2), rax).unwrap();
    a.lidt(ptr(rdi)).unwrap();
    g.print("ready\n");
    g.hang();
    g.a.set_label(&mut handler).unwrap();
    g.a.push(rax).unwrap();
    g.a.push(rdx).unwrap();
    g.print("nmi\n");
    g.a.pop(rdx).unwrap();
    g.a.pop(rax).unwrap();
    g.a.iretq().unwrap();
    let path = dir.join("guest.elf");
    std::fs::write(&path, g.elf()).unwrap();
    path.to_str().unwrap().to_string()
}

struct Vm {
    child: Child,
    _dir: TempDir,
    socket: std::path::PathBuf,
    serial: std::path::PathBuf,
}

fn start_vm(tag: &str, kernel: impl FnOnce(&TempDir) -> String, extra: &[&str]) -> Vm {
    start_vm_on("kvm", tag, kernel, extra)
}

fn start_vm_on(
    accel: &str,
    tag: &str,
    kernel: impl FnOnce(&TempDir) -> String,
    extra: &[&str],
) -> Vm {
    let dir = TempDir::new(tag);
    let kernel = kernel(&dir);
    let socket = dir.join("qmp.sock");
    let serial = dir.join("serial.out");
    let qmp_arg = format!("unix:{},server=on,wait=off", socket.display());
    let serial_arg = format!("file:{}", serial.display());
    let mut args = vec![
        "-accel",
        accel,
        "-m",
        "32",
        "-nodefaults",
        "-display",
        "none",
        "-kernel",
        &kernel,
        "-serial",
        &serial_arg,
        "-qmp",
        &qmp_arg,
    ];
    args.extend_from_slice(extra);
    let child = spawn_vmm(&args);
    Vm {
        child,
        _dir: dir,
        socket,
        serial,
    }
}

impl Vm {
    fn quit(self, qmp: &mut Qmp<UnixStream>) {
        assert_eq!(qmp.request("quit", None), json!({ "return": {} }));
        let done = wait_with_timeout(self.child, TIMEOUT);
        assert_eq!(done.status.code(), Some(0), "stderr: {}", done.stderr);
    }
}

#[test]
fn query_pci_and_query_chardev() {
    require_kvm!();
    let vm = start_vm("qmp-more-pci", nmi_guest, &["-S"]);
    let mut qmp = Qmp::connect(&vm.socket);

    let buses = qmp.ok("query-pci", None);
    let buses = buses.as_array().unwrap();
    assert_eq!(buses.len(), 1);
    assert_eq!(buses[0]["bus"], 0);
    let devices = buses[0]["devices"].as_array().unwrap();
    let bridge = devices
        .iter()
        .find(|d| d["slot"] == 0)
        .expect("the host bridge");
    assert_eq!(
        *bridge,
        json!({
            "bus": 0, "slot": 0, "function": 0, "irq_pin": 0, "qdev_id": "",
            "class_info": { "class": 0x0600, "desc": "Host bridge" },
            "id": { "vendor": 0x1b36, "device": 0x0008,
                    "subsystem-vendor": 0x1af4, "subsystem": 0x1100 },
            "regions": [],
        })
    );

    assert_eq!(
        qmp.ok("query-chardev", None),
        json!([{ "label": "serial0", "filename": "file", "frontend-open": true }])
    );
    vm.quit(&mut qmp);
}

#[test]
fn cpu_inject_nmi_and_query_cpus() {
    require_kvm!();
    let vm = start_vm("qmp-more-nmi", nmi_guest, &["-smp", "2"]);
    let mut qmp = Qmp::connect(&vm.socket);
    wait_until("the guest", TIMEOUT, || read_file(&vm.serial) == "ready\n");

    // The boot CPU halts inside the guest image; the AP waits for SIPI.
    let cpus = qmp.ok("query-cpus", None);
    let cpus = cpus.as_array().unwrap();
    assert_eq!(cpus.len(), 2);
    assert_eq!(cpus[0]["CPU"], 0);
    assert_eq!(cpus[0]["current"], true);
    assert_eq!(cpus[1]["current"], false);
    assert_eq!(cpus[0]["halted"], true);
    let pc = cpus[0]["pc"].as_u64().unwrap();
    assert!(
        (LOAD_ADDR..LOAD_ADDR + 0x1000).contains(&pc),
        "pc {pc:#x} lies in the guest image"
    );
    assert!(cpus[0]["thread_id"].as_i64().unwrap() > 0);
    assert_ne!(cpus[0]["thread_id"], cpus[1]["thread_id"]);

    // Paused, the same vCPU shows the same halted pc.
    qmp.ok("stop", None);
    let paused = qmp.ok("query-cpus", None);
    assert_eq!(paused[0]["pc"], pc);
    qmp.ok("cont", None);

    assert_eq!(qmp.ok("cpu", Some(json!({ "index": 1 }))), json!({}));
    let cpus = qmp.ok("query-cpus", None);
    assert_eq!(cpus[0]["current"], false);
    assert_eq!(cpus[1]["current"], true);
    let bad = qmp.request("cpu", Some(json!({ "index": 2 })));
    assert_eq!(
        bad["error"],
        json!({ "class": "GenericError", "desc": "Invalid CPU index" })
    );
    let bad = qmp.request("cpu", Some(json!({ "index": -1 })));
    assert_eq!(bad["error"]["desc"], "Invalid CPU index");

    // The NMI gets through CLI; HLT, and the guest halts again after its handler.
    assert_eq!(qmp.ok("inject-nmi", None), json!({}));
    wait_until("the NMI handler", TIMEOUT, || {
        read_file(&vm.serial) == "ready\nnmi\n"
    });
    assert_eq!(qmp.ok("inject-nmi", None), json!({}));
    wait_until("the second NMI", TIMEOUT, || {
        read_file(&vm.serial) == "ready\nnmi\nnmi\n"
    });
    vm.quit(&mut qmp);
}

#[test]
fn memsave_and_pmemsave() {
    require_kvm!();
    let vm = start_vm("qmp-more-memsave", nmi_guest, &["-smp", "2"]);
    let mut qmp = Qmp::connect(&vm.socket);
    wait_until("the guest", TIMEOUT, || read_file(&vm.serial) == "ready\n");
    // The ELF image's code follows its 0x78-byte header.
    let image = std::fs::read(vm._dir.join("guest.elf")).unwrap();
    let code = &image[0x78..0x78 + 64];
    let out = vm._dir.join("dump.bin");
    let out_str = out.to_str().unwrap();

    let args = json!({ "val": LOAD_ADDR, "size": 64, "filename": out_str });
    assert_eq!(qmp.ok("pmemsave", Some(args.clone())), json!({}));
    assert_eq!(std::fs::read(&out).unwrap(), code);
    std::fs::remove_file(&out).unwrap();

    // The boot page tables map the low 4 GiB one to one.
    assert_eq!(qmp.ok("memsave", Some(args.clone())), json!({}));
    assert_eq!(std::fs::read(&out).unwrap(), code);
    std::fs::remove_file(&out).unwrap();
    let mut with_cpu = args.clone();
    with_cpu["cpu-index"] = json!(0);
    assert_eq!(qmp.ok("memsave", Some(with_cpu)), json!({}));
    assert_eq!(std::fs::read(&out).unwrap(), code);
    std::fs::remove_file(&out).unwrap();

    // Unmapped virtual and absent physical ranges fail and leave no file behind.
    let unmapped = json!({ "val": 0x8000_0000_0000u64, "size": 16, "filename": out_str });
    let reply = qmp.request("memsave", Some(unmapped));
    assert_eq!(
        reply["error"],
        json!({ "class": "GenericError",
                "desc": "Invalid addr 0x0000800000000000/size 16 specified" })
    );
    let beyond = json!({ "val": 0x10_0000_0000u64, "size": 16, "filename": out_str });
    let reply = qmp.request("pmemsave", Some(beyond));
    assert_eq!(
        reply["error"]["desc"],
        "Invalid addr 0x0000001000000000/size 16 specified"
    );
    let mut bad_cpu = args.clone();
    bad_cpu["cpu-index"] = json!(2);
    let reply = qmp.request("memsave", Some(bad_cpu));
    assert_eq!(
        reply["error"]["desc"],
        "Parameter 'cpu-index' expects a CPU number"
    );
    assert!(!out.exists());
    let names: Vec<_> = std::fs::read_dir(vm._dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with(".tmp")),
        "no temporary files: {names:?}"
    );
    vm.quit(&mut qmp);
}

#[test]
fn human_monitor_command() {
    require_kvm!();
    let vm = start_vm("qmp-more-hmp", nmi_guest, &["-smp", "2", "-name", "testvm"]);
    let mut qmp = Qmp::connect(&vm.socket);
    wait_until("the guest", TIMEOUT, || read_file(&vm.serial) == "ready\n");

    assert_eq!(qmp.hmp("info status"), "VM status: running\r\n");
    assert!(qmp.hmp("info version").starts_with("7.2.0vmm "));
    assert_eq!(qmp.hmp("info kvm"), "kvm support: enabled\r\n");
    assert_eq!(qmp.hmp("info name"), "testvm\r\n");
    assert_eq!(
        qmp.hmp("info uuid"),
        "00000000-0000-0000-0000-000000000000\r\n"
    );
    assert_eq!(qmp.hmp("info chardev"), "serial0: filename=file\r\n");
    let cpus = qmp.hmp("info cpus");
    let lines: Vec<&str> = cpus.split("\r\n").collect();
    assert!(lines[0].starts_with("* CPU #0: thread_id="), "{cpus}");
    assert!(lines[1].starts_with("  CPU #1: thread_id="), "{cpus}");
    let on_cpu1 = qmp.ok(
        "human-monitor-command",
        Some(json!({ "command-line": "info cpus", "cpu-index": 1 })),
    );
    assert!(on_cpu1.as_str().unwrap().contains("* CPU #1"));
    let bad = qmp.request(
        "human-monitor-command",
        Some(json!({ "command-line": "info cpus", "cpu-index": 7 })),
    );
    assert_eq!(
        bad["error"]["desc"],
        "Parameter 'cpu-index' expects a CPU number"
    );
    let pci = qmp.hmp("info pci");
    assert!(
        pci.starts_with(
            "  Bus  0, device   0, function 0:\r\n    Host bridge: PCI device 1b36:0008\r\n"
        ),
        "{pci}"
    );
    let registers = qmp.hmp("info registers");
    assert!(registers.starts_with("\r\nCPU#0\r\n"), "{registers}");
    assert!(registers.contains("RIP="), "{registers}");
    assert_eq!(qmp.hmp("info registers -a").matches("CPU#").count(), 2);

    assert_eq!(qmp.hmp("foo"), "unknown command: 'foo'\r\n");
    assert_eq!(qmp.hmp("info foo"), "unknown command: 'info foo'\r\n");
    assert_eq!(qmp.hmp(""), "");
    assert_eq!(qmp.hmp("cpu 1"), "");
    assert_eq!(qmp.hmp("cpu 5"), "invalid CPU index\r\n");
    assert_eq!(
        qmp.hmp("cpu x"),
        "invalid char 'x' in expression\r\nTry \"help cpu\" for more information\r\n"
    );
    assert!(qmp
        .hmp("help")
        .contains("cpu index -- set the default CPU\r\n"));
    assert_eq!(qmp.hmp("help cpu"), "cpu index -- set the default CPU\r\n");

    // Run control goes through the same paths as QMP.
    assert_eq!(qmp.hmp("stop"), "");
    assert_eq!(qmp.ok("query-status", None)["status"], "paused");
    assert_eq!(qmp.hmp("info status"), "VM status: paused\r\n");
    assert_eq!(qmp.hmp("c"), "");
    assert_eq!(qmp.ok("query-status", None)["status"], "running");

    // Dumps.
    let image = std::fs::read(vm._dir.join("guest.elf")).unwrap();
    let code = &image[0x78..0x78 + 32];
    let out = vm._dir.join("hmp.bin");
    let out_str = out.to_str().unwrap();
    assert_eq!(
        qmp.hmp(&format!("pmemsave {LOAD_ADDR:#x} 32 {out_str}")),
        ""
    );
    assert_eq!(std::fs::read(&out).unwrap(), code);
    assert_eq!(
        qmp.hmp(&format!("memsave {LOAD_ADDR} 32 \"{out_str}\"")),
        ""
    );
    assert_eq!(std::fs::read(&out).unwrap(), code);
    assert_eq!(
        qmp.hmp(&format!("memsave 0x800000000000 16 {out_str}")),
        "Error: Invalid addr 0x0000800000000000/size 16 specified\r\n"
    );

    assert_eq!(qmp.hmp("system_powerdown"), "");
    assert_eq!(qmp.hmp("system_reset"), "");
    wait_until("the guest after reset", TIMEOUT, || {
        read_file(&vm.serial).ends_with("ready\nready\n")
    });
    vm.quit(&mut qmp);
}

/// The emu accelerator routes inject-nmi through its APIC bus, and its vCPUs publish
/// their state like KVM's.
#[test]
fn emu_inject_nmi_query_cpus_and_memsave() {
    let vm = start_vm_on("emu", "qmp-more-emu", nmi_guest, &[]);
    let mut qmp = Qmp::connect(&vm.socket);
    wait_until("the guest", TIMEOUT, || read_file(&vm.serial) == "ready\n");
    let cpus = qmp.ok("query-cpus", None);
    let pc = cpus[0]["pc"].as_u64().unwrap();
    assert!((LOAD_ADDR..LOAD_ADDR + 0x1000).contains(&pc), "pc {pc:#x}");
    // The guest waits in HLT after printing.
    assert_eq!(cpus[0]["halted"], true, "{cpus}");
    assert_eq!(qmp.ok("inject-nmi", None), json!({}));
    wait_until("the NMI handler", TIMEOUT, || {
        read_file(&vm.serial) == "ready\nnmi\n"
    });

    let image = std::fs::read(vm._dir.join("guest.elf")).unwrap();
    let out = vm._dir.join("emu.bin");
    let args = json!({ "val": LOAD_ADDR, "size": 16, "filename": out.to_str().unwrap() });
    assert_eq!(qmp.ok("memsave", Some(args)), json!({}));
    assert_eq!(std::fs::read(&out).unwrap(), &image[0x78..0x78 + 16]);
    assert_eq!(
        qmp.ok(
            "human-monitor-command",
            Some(json!({ "command-line": "info kvm" }))
        ),
        "kvm support: disabled\r\n"
    );
    vm.quit(&mut qmp);
}
