//! Process-level start-up and exit for the `vmm` binary: command-line errors, -daemonize,
//! -pidfile, host signals, and the exit status.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::cli::{self, Command};
use crate::config::VmConfig;
use crate::machine::Machine;
use crate::monitor::Monitor;

/// Run the vmm with the arguments after the program name; returns the exit status.
pub fn main_entry<I, S>(args: I) -> i32
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let args: Vec<String> = args.into_iter().map(|a| a.as_ref().to_string()).collect();
    let trace = args
        .windows(2)
        .any(|w| w[0] == "-d" && w[1].split(',').any(|i| i == "in_asm" || i == "exec"));
    init_logging(trace);
    match cli::parse_args(args) {
        Err(e) => {
            crate::report!("vmm: {e}");
            1
        }
        Ok(Command::Help) => {
            print!("{}", cli::HELP);
            0
        }
        Ok(Command::Version) => {
            println!("vmm version {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Ok(Command::Run(cfg)) => run(*cfg),
    }
}

fn init_logging(trace_instructions: bool) {
    let trace: &[&str] = if trace_instructions {
        &["emu::trace=trace"]
    } else {
        &[]
    };
    logging::init(trace);
}

/// Signals that end the vmm in an orderly way. They are blocked in every thread and taken
/// by one thread with sigwait, so no handler runs inside a vCPU.
const QUIT_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn quit_sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in QUIT_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

fn run(cfg: VmConfig) -> i32 {
    let set = quit_sigset();
    // SAFETY: blocking signals in this thread; threads spawned later inherit the mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };

    let daemon = if cfg.daemonize {
        match daemonize() {
            Ok(d) => Some(d),
            Err(e) => {
                crate::report!("vmm: -daemonize: {e}");
                return 1;
            }
        }
    } else {
        None
    };

    let pidfile = match cfg.pidfile.as_deref().map(PidFile::create).transpose() {
        Ok(p) => p,
        Err(e) => {
            crate::report!("vmm: {e}");
            return 1;
        }
    };
    if let Some(name) = cfg.process_name.as_deref() {
        set_process_name(name);
    }

    let start_paused = cfg.start_paused;
    let incoming = cfg.incoming.clone();
    let monitors = cfg.monitors.clone();
    let hmp_monitors = cfg.hmp_monitors.clone();
    let mut machine = match Machine::new(cfg) {
        Ok(m) => m,
        Err(e) => {
            crate::report!("vmm: {e}");
            return 1;
        }
    };

    let monitor = if monitors.is_empty() {
        None
    } else {
        match Monitor::start(&monitors, machine.control()) {
            Ok(m) => {
                machine.attach_monitor(m.events());
                Some(m)
            }
            Err(e) => {
                crate::report!("vmm: {e}");
                return 1;
            }
        }
    };

    let mut hmp_consoles = Vec::new();
    for config in &hmp_monitors {
        match crate::monitor::hmp_console::start(config, machine.control()) {
            Ok(console) => hmp_consoles.push(console),
            Err(e) => {
                crate::report!("vmm: {e}");
                return 1;
            }
        }
    }

    let control = machine.control();
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid sigset and `sig` a valid out-pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                crate::report!("vmm: terminating on signal {sig}");
                control.request(crate::control::MachineRequest::Quit);
            }
        });
    if let Err(e) = spawned {
        crate::report!("vmm: failed to start the signal thread: {e}");
        return 1;
    }

    match incoming.as_deref() {
        // migrate-incoming names the URI later.
        Some("defer") => machine.defer_incoming(!start_paused),
        Some(uri) => {
            if let Err(e) = machine.start_incoming(uri, !start_paused) {
                crate::report!("vmm: -incoming {uri}: {e}");
                return 1;
            }
        }
        None if !start_paused => machine.start(),
        None => {}
    }
    if let Some(d) = daemon {
        d.ready();
    }

    let code = match machine.run() {
        Ok(exit) => exit.exit_code(),
        Err(e) => {
            crate::report!("vmm: {e}");
            1
        }
    };
    machine.shutdown();
    if let Some(monitor) = monitor {
        monitor.shutdown(machine.take_quit_flush());
    }
    crate::chardev::restore_terminal();
    drop(hmp_consoles);
    drop(pidfile);
    code
}

fn set_process_name(name: &str) {
    let mut bytes: Vec<u8> = name.bytes().filter(|b| *b != 0).take(15).collect();
    bytes.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, bytes.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot create PID file {path}: {source}")]
    PidFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot lock PID file {0}: another process holds it")]
    PidFileLocked(String),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A locked pidfile, removed when dropped (as QEMU does at exit).
pub struct PidFile {
    path: String,
    _file: File,
}

impl PidFile {
    pub fn create(path: &str) -> Result<Self, LaunchError> {
        let err = |source| LaunchError::PidFile {
            path: path.to_string(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(err)?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(LaunchError::PidFileLocked(path.to_string()));
        }
        file.set_len(0).map_err(err)?;
        writeln!(file, "{}", std::process::id()).map_err(err)?;
        file.flush().map_err(err)?;
        Ok(Self {
            path: path.to_string(),
            _file: file,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The child's end of -daemonize: tells the waiting parent that start-up succeeded.
pub struct Daemon {
    ready: File,
}

impl Daemon {
    /// Start-up is done: let the parent exit 0 and detach from the terminal.
    pub fn ready(mut self) {
        let _ = self.ready.write_all(&[0]);
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            for fd in 0..3 {
                // SAFETY: dup2 onto the standard descriptors, which we own.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
        let _ = std::env::set_current_dir("/");
    }
}

/// Fork. The parent waits until the child reports ready (exit 0) or dies (its status);
/// it never returns. The child returns in a new session.
fn daemonize() -> Result<Daemon, LaunchError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(LaunchError::Os {
            what: "pipe",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: the descriptors are fresh and owned by us alone.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is still single-threaded here (no machine threads yet).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(LaunchError::Os {
            what: "fork",
            source: std::io::Error::last_os_error(),
        });
    }
    if pid > 0 {
        drop(write_end);
        let mut byte = [0u8; 1];
        let mut reader = File::from(read_end);
        if matches!(reader.read(&mut byte), Ok(1)) {
            std::process::exit(0);
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            1
        };
        std::process::exit(if code == 0 { 1 } else { code });
    }
    drop(read_end);
    // SAFETY: setsid in the child has no memory-safety preconditions.
    if unsafe { libc::setsid() } < 0 {
        return Err(LaunchError::Os {
            what: "setsid",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(Daemon {
        ready: File::from(write_end),
    })
}
