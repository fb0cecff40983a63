//! A device process for the supervisor tests: it adopts its sockets like the real ones,
//! says hello as a block device over `ipc`, enters the block sandbox if given `--sandbox`,
//! and answers requests (echo, the list of its open fds, exit, and attempts to open a
//! file or connect to an address). With `--spawn-child` it is instead a stand-in for the vmm: it starts
//! another device-echo (with `--stay`, so that it outlives its control connection)
//! through the supervisor, prints the child's pid and waits, so a test can kill it and
//! watch the child die with it.

use std::io::Write;
use std::time::Duration;

use vmm_tests::device_echo::{Reply, Request};

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--spawn-child") {
        let program = std::env::current_exe().expect("own path");
        let child = vmm::supervisor::DeviceProcess::spawn("echo", &program, &["--stay"])
            .expect("spawn the child");
        println!("{}", child.pid());
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_secs(600));
        return;
    }
    let code = serve();
    // `--stay`: outlive the control connection, so that only PR_SET_PDEATHSIG ends us.
    if std::env::args().any(|a| a == "--stay") {
        std::thread::sleep(Duration::from_secs(600));
    }
    std::process::exit(code);
}

fn serve() -> i32 {
    let (control, _vhost_user) = match device_procs::inherit::inherited_sockets() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("device-echo: {e}");
            return 2;
        }
    };
    let mut ch: ipc::Channel<Request, Reply, ()> = ipc::Channel::new(control);
    if let Err(e) = ch.hello(
        ipc::DeviceKind::Block,
        ipc::DeviceKind::Block,
        Duration::from_secs(10),
    ) {
        eprintln!("device-echo: hello: {e}");
        return 3;
    }
    if std::env::args().any(|a| a == "--sandbox") {
        if let Err(e) = device_procs::sandbox::enter(device_procs::sandbox::Profile::BLOCK) {
            eprintln!("device-echo: {e}");
            return 4;
        }
    }
    while let Ok((msg, _fds)) = ch.recv(None) {
        let ipc::Message::Request { id, body } = msg else {
            continue;
        };
        let reply = match body {
            Request::Echo(text) => Reply::Echo(text),
            Request::OpenFds => {
                let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
                    .map(|dir| {
                        dir.flatten()
                            .filter_map(|e| e.file_name().to_str()?.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                fds.sort_unstable();
                Reply::OpenFds(fds)
            }
            Request::Exit(code) => std::process::exit(code),
            Request::TryOpen(path) => Reply::Outcome(
                std::fs::File::open(&path)
                    .map(drop)
                    .map_err(|e| e.to_string()),
            ),
            Request::TryConnect(addr) => Reply::Outcome(
                std::net::TcpStream::connect(&addr)
                    .map(drop)
                    .map_err(|e| e.to_string()),
            ),
        };
        if ch.reply(id, Ok(reply), &[]).is_err() {
            break;
        }
    }
    0
}
