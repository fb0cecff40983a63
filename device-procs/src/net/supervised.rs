//! `vmm-net` as a device process of the vmm (see [`crate::supervised`]): after the hello,
//! Attach (the netdev and its fds), then link changes and the guest's RX filter on the
//! control socket while the vhost-user listener serves the queues.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use ipc::net::{Backend, NetConfig, NetEvent, NetReply, NetRequest};
use ipc::{DeviceKind, RemoteError};

use super::backend::{self, NetBackend};
use super::port::{DgramPort, Port, QueuedPort};
use super::slirp::UserConfig;
use super::stream::{self, StreamEvent, StreamSocket};
use super::tap::{self, Tap};
use super::{user, NetError};
use crate::sandbox::Profile;
use crate::supervised::{self as process, Sender};

/// Frames queued each way between the device and a stream's or the user network's thread.
const QUEUED_FRAMES: usize = 256;

type NetSender = Sender<NetRequest, NetReply, NetEvent>;

pub fn run(host_network: bool) -> Result<(), NetError> {
    let profile = if host_network {
        Profile::NET_USER
    } else {
        Profile::NET
    };
    let (mut channel, listener) =
        process::start::<NetRequest, NetReply, NetEvent>(DeviceKind::Net, profile)?;
    let sender = process::Sender::new(&channel)?;
    let events = sender.clone();
    let (attach_id, (backend, description)) =
        process::wait_for_setup(&mut channel, |request, fds| match request {
            NetRequest::Attach(config) => {
                attach(&config, fds, &events).map_err(|e| RemoteError(e.to_string()))
            }
            _ => Err(RemoteError("no netdev is attached yet".into())),
        })?;
    let features = backend.features_offered();
    sender.reply(
        attach_id,
        Ok(NetReply::Attached {
            features,
            description,
        }),
    );
    let controlled = backend.clone();
    let nothing: Arc<dyn Fn() + Send + Sync> = Arc::new(|| {});
    process::spawn_control_loop(
        channel,
        sender,
        move |request, _fds| control_request(&controlled, request),
        nothing.clone(),
    )?;
    process::spawn_signal_thread(nothing)?;
    crate::vhost_daemon::serve(backend, listener)?;
    Ok(())
}

/// Set up the netdev of `config` on `fds`: the device, and what `info network` says of
/// its backend.
fn attach(
    config: &NetConfig,
    fds: Vec<OwnedFd>,
    events: &NetSender,
) -> Result<(Arc<NetBackend>, String), NetError> {
    backend::check_queues(config.queue_pairs, config.queue_size)?;
    let one_fd = |fds: Vec<OwnedFd>| {
        <[OwnedFd; 1]>::try_from(fds)
            .map(|[fd]| fd)
            .map_err(|fds| NetError::Setup(format!("expected one fd, got {}", fds.len())))
    };
    let queued = || {
        QueuedPort::new(QUEUED_FRAMES)
            .map(Arc::new)
            .map_err(|source| NetError::Io {
                what: "eventfd".into(),
                source,
            })
    };
    let (ports, offloads, ufo, description): (Vec<Arc<dyn Port>>, bool, bool, String) =
        match &config.backend {
            Backend::Tap { .. } => {
                if fds.len() != usize::from(config.queue_pairs) {
                    return Err(NetError::Setup(format!(
                        "{} queue pairs need as many tap fds, got {}",
                        config.queue_pairs,
                        fds.len()
                    )));
                }
                let taps = fds
                    .into_iter()
                    .map(Tap::new)
                    .collect::<Result<Vec<_>, _>>()?;
                let offloads = taps.iter().all(|t| t.vnet_hdr());
                let ufo = offloads && probe_ufo(&taps[0]);
                let description = taps[0].name().to_string();
                let ports = taps
                    .into_iter()
                    .map(|t| Arc::new(t) as Arc<dyn Port>)
                    .collect();
                (ports, offloads, ufo, description)
            }
            Backend::User { options } => {
                let user_config = UserConfig::from_options(
                    options.iter().map(|(k, v)| (k.as_str(), v.as_str())),
                )?;
                let port = queued()?;
                user::spawn(port.clone(), &user_config)?;
                (vec![port], false, false, user::description(&user_config))
            }
            Backend::Stream { listening } => {
                // A listening stream may come back with the peer it had (after a restart):
                // the listener, then the connection.
                let mut fds = fds.into_iter();
                let (first, second) = (fds.next(), fds.next());
                if fds.next().is_some() || first.is_none() || (second.is_some() && !listening) {
                    return Err(NetError::Setup(
                        "a stream takes its socket, and a listener its peer too".into(),
                    ));
                }
                let port = queued()?;
                let socket = if *listening {
                    StreamSocket {
                        listener: first,
                        connection: second,
                    }
                } else {
                    StreamSocket {
                        listener: None,
                        connection: first,
                    }
                };
                let events = events.clone();
                stream::spawn(
                    port.clone(),
                    socket,
                    Box::new(move |event| match event {
                        StreamEvent::Connected { peer, fd } => {
                            events.event(NetEvent::StreamConnected { peer }, &[fd.as_fd()])
                        }
                        StreamEvent::Disconnected => {
                            events.event(NetEvent::StreamDisconnected, &[])
                        }
                    }),
                )
                .map_err(NetError::Thread)?;
                (vec![port], false, false, String::new())
            }
            Backend::Dgram => {
                let port = DgramPort::new(one_fd(fds)?).map_err(|source| NetError::Io {
                    what: "datagram socket".into(),
                    source,
                })?;
                (vec![Arc::new(port)], false, false, String::new())
            }
        };
    let backend = NetBackend::new(ports, config.queue_size, offloads, ufo)?;
    tracing::info!("netdev {} ready", config.id);
    Ok((Arc::new(backend), description))
}

/// Whether the host takes UDP fragmentation offload (QEMU's tap_probe_has_ufo): newer
/// kernels dropped it.
pub fn probe_ufo(tap: &Tap) -> bool {
    let all = tap::TUN_F_CSUM | tap::TUN_F_TSO4 | tap::TUN_F_TSO6 | tap::TUN_F_UFO;
    let ufo = tap.set_offload(all).is_ok();
    if let Err(e) = tap.set_offload(0) {
        tracing::warn!("{e}");
    }
    ufo
}

/// Answer one control request after Attach.
fn control_request(backend: &NetBackend, request: NetRequest) -> Result<NetReply, RemoteError> {
    match request {
        NetRequest::SetLink { up } => {
            backend.set_link(up);
            tracing::info!("link {}", if up { "up" } else { "down" });
            Ok(NetReply::Done)
        }
        NetRequest::SetRxFilter(filter) => {
            backend.set_filter(filter);
            Ok(NetReply::Done)
        }
        NetRequest::Query => Ok(NetReply::Info(backend.info())),
        NetRequest::Attach(_) => Err(RemoteError("a netdev is already attached".into())),
    }
}
