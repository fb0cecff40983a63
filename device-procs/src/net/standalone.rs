//! `vmm-net` on its own: a vhost-user-net daemon on a unix socket path over taps, for a
//! frontend we did not start (QEMU's `-netdev vhost-user`). It opens its taps and binds
//! its socket, then enters the sandbox and serves one frontend after another, each
//! through [`crate::vhost_relay`].

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::sync::Arc;

use super::backend::NetBackend;
use super::cli::{Standalone, TapSource};
use super::port::Port;
use super::supervised::probe_ufo;
use super::tap::Tap;
use super::NetError;
use crate::sandbox::{self, Profile};
use crate::supervised as process;

pub fn run(args: &Standalone) -> Result<(), NetError> {
    let multi_queue = args.taps.len() > 1;
    let taps = args
        .taps
        .iter()
        .map(|source| match source {
            TapSource::Name(name) => Tap::open(name, args.vnet_hdr, multi_queue),
            TapSource::Fd(fd) => {
                // SAFETY: the fd was inherited for us to serve, as the command line says;
                // nothing else in this process owns it. Tap::new checks it is a tap.
                Tap::new(unsafe { OwnedFd::from_raw_fd(*fd) })
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    let offloads = taps.iter().all(Tap::vnet_hdr);
    let ufo = offloads && taps.first().is_some_and(probe_ufo);
    let names: Vec<String> = taps.iter().map(|t| t.name().to_string()).collect();
    let ports: Vec<Arc<dyn Port>> = taps
        .into_iter()
        .map(|t| Arc::new(t) as Arc<dyn Port>)
        .collect();
    let backend = Arc::new(NetBackend::new(ports, args.queue_size, offloads, ufo)?);
    // A socket left by an earlier run is replaced; anything else at that path is an error
    // from bind.
    if std::fs::symlink_metadata(&args.socket).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&args.socket);
    }
    let listener = UnixListener::bind(&args.socket).map_err(|source| NetError::Io {
        what: format!("cannot listen on {}", args.socket.display()),
        source,
    })?;
    process::block_termination_signals()?;
    sandbox::enter(Profile::NET_STANDALONE)?;
    tracing::info!(
        "serving taps {} on {}",
        names.join(","),
        args.socket.display()
    );
    process::spawn_signal_thread(Arc::new(|| {}))?;
    crate::vhost_relay::serve_relayed(backend, listener)?;
    Ok(())
}
