//! Local migration (capability `x-local`) of the counting guest under emu: the guest RAM
//! memfd moves to the destination by SCM_RIGHTS instead of being copied. The counter goes
//! on with every page checked, the downtime stays under 10 ms however fast the guest
//! writes, and the source exits leaving no fd or mapping of the guest's memory behind.
//! A destination of another handoff version, of another configuration, or without
//! `x-local` set refuses, and the source runs on.

use std::time::{Duration, Instant};

use serde_json::json;
use vmm_tests::migration::*;
use vmm_tests::{read_file, wait_until, TempDir};

const TIMEOUT: Duration = Duration::from_secs(120);

fn set_local(vm: &mut Vm) {
    vm.qmp.ok(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-local", "state": true}]})),
    );
}

#[test]
fn the_memory_moves_by_fd_and_the_source_exits() {
    let dir = TempDir::new("local-mig");
    let kernel = counting_guest(&dir);
    let uri = format!("unix:{}", dir.join("mig.sock").display());
    let mut a = vm(&dir, "a", &kernel, &[]);
    let before = wait_counts(&a.serial, 2);
    let mut b = vm(&dir, "b", &kernel, &["-incoming", &uri]);
    set_local(&mut a);
    set_local(&mut b);
    let caps = a.qmp.ok("query-migrate-capabilities", None);
    assert!(
        caps.as_array()
            .unwrap()
            .contains(&json!({"capability": "x-local", "state": true})),
        "{caps}"
    );
    let ino = guest_ram_inode(a.child.id());
    let started = Instant::now();
    a.qmp.ok("migrate", Some(json!({ "uri": uri })));
    // The source reports and exits once the guest runs on in the destination.
    let status = a.child.wait().unwrap();
    let elapsed = started.elapsed();
    assert!(status.success(), "the source exits cleanly: {status}");
    let log = read_file(&a.log);
    let downtime_us = handover_downtime_us(&log);
    eprintln!("local migration: {elapsed:?} in all, downtime {downtime_us} us");
    assert!(downtime_us < 10_000, "downtime {downtime_us} us");
    // The destination runs the same memory (the same memfd), and the guest goes on, every
    // page in its place.
    assert_eq!(b.qmp.ok("query-status", None)["status"], "running");
    assert_eq!(
        guest_ram_inode(b.child.id()),
        ino,
        "no copy: the same memfd"
    );
    let after = wait_counts(&b.serial, 3);
    assert!(after.last() > before.last(), "{before:?} -> {after:?}");
    // Nothing outside the destination's process tree holds the guest's memory.
    wait_until("the source's device processes to go", TIMEOUT, || {
        holders(ino).iter().all(|&pid| in_tree(pid, b.child.id()))
    });
}

/// A destination without x-local, of another handoff version, or with other RAM refuses
/// before the source stops; the source runs on and then moves to a right one.
#[test]
fn a_destination_that_differs_refuses_and_the_source_runs_on() {
    let dir = TempDir::new("local-mig-refuse");
    let kernel = counting_guest(&dir);
    let mut a = vm(&dir, "a", &kernel, &[]);
    set_local(&mut a);
    wait_counts(&a.serial, 1);
    // Name, extra arguments, environment, x-local set, the refusal's words.
    type Case<'a> = (
        &'a str,
        &'a [&'a str],
        &'a [(&'a str, &'a str)],
        bool,
        &'a str,
    );
    let cases: [Case; 3] = [
        ("nolocal", &[], &[], false, "x-local is not set here"),
        (
            "version",
            &[],
            &[("VMM_TEST_LOCAL_VERSION", "99")],
            true,
            "version 1 is not this vmm's (99)",
        ),
        ("memory", &["-m", "64"], &[], true, "MiB of RAM"),
    ];
    for (name, extra, env, local, why) in cases {
        let uri = format!("unix:{}", dir.join(&format!("{name}.sock")).display());
        let mut args: Vec<&str> = extra.to_vec();
        args.extend(["-incoming", uri.as_str()]);
        let mut b = vm_with_env(&dir, name, &kernel, &args, env);
        if local {
            set_local(&mut b);
        }
        a.qmp.ok("migrate", Some(json!({ "uri": uri })));
        let mut info = json!(null);
        wait_until("the refusal", TIMEOUT, || {
            info = a.qmp.ok("query-migrate", None);
            info["status"] == "failed"
        });
        let desc = info["error-desc"].as_str().unwrap_or_default();
        assert!(desc.contains(why), "{name}: {desc}");
        assert_eq!(
            a.qmp.ok("query-status", None)["status"],
            "running",
            "{name}"
        );
    }
    let counted = wait_counts(&a.serial, 1).len();
    wait_counts(&a.serial, counted + 1);
    // x-local needs a unix socket.
    let err = a
        .qmp
        .request("migrate", Some(json!({ "uri": "tcp:127.0.0.1:1" })));
    assert!(err["error"]["desc"]
        .as_str()
        .unwrap_or_default()
        .contains("unix"));
    let uri = format!("unix:{}", dir.join("good.sock").display());
    let mut b = vm(&dir, "good", &kernel, &["-incoming", &uri]);
    set_local(&mut b);
    a.qmp.ok("migrate", Some(json!({ "uri": uri })));
    assert!(a.child.wait().unwrap().success());
    assert_eq!(b.qmp.ok("query-status", None)["status"], "running");
}
