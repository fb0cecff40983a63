//! `vmm-net`: a vhost-user-net backend, one process per netdev, sandboxed.
//!
//! Supervised by the vmm ([`supervised`]: every tap and socket it serves arrives as an
//! fd), or standalone over taps on a unix socket path, for QEMU's `-netdev vhost-user`
//! ([`standalone`]). The device itself: [`backend`] (the vhost-user device and its queue
//! workers) over a [`port::Port`] per queue pair: a [`tap`] queue, a datagram socket, or
//! a thread that speaks to the host for the guest ([`stream`] sockets, and the [`user`]
//! network on libslirp, [`slirp`]). [`filter`] is the guest's RX filter.

pub mod backend;
pub mod cli;
pub mod filter;
pub mod port;
pub mod slirp;
pub mod standalone;
pub mod stream;
pub mod supervised;
pub mod tap;
pub mod user;

use std::io;

use crate::supervised::{self as process, SupervisedError};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Cli(#[from] cli::CliError),
    #[error(transparent)]
    Process(#[from] SupervisedError),
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    #[error(transparent)]
    Slirp(#[from] slirp::SlirpError),
    #[error(transparent)]
    Daemon(#[from] crate::vhost_daemon::DaemonError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot start a thread: {0}")]
    Thread(#[source] io::Error),
    #[error("{0}")]
    Setup(String),
}

/// The program: parse the arguments, run, and return the exit status (0, or 1 after
/// printing one line on stderr).
pub fn main() -> i32 {
    process::init_logging();
    let result = match cli::parse(std::env::args().skip(1)) {
        Ok(cli::Mode::Help) => {
            println!("{}", cli::USAGE);
            Ok(())
        }
        Ok(cli::Mode::Supervised { host_network }) => supervised::run(host_network),
        Ok(cli::Mode::Standalone(args)) => standalone::run(&args),
        Err(e) => Err(e.into()),
    };
    process::exit_status("vmm-net", result)
}
