//! The thread behind `-netdev user`: libslirp ([`super::slirp`]) on one side, a
//! [`QueuedPort`] on the other. libslirp is driven by polling its sockets; frames from the
//! guest wake the poll through the port's eventfd.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use super::port::QueuedPort;
use super::slirp::{UserConfig, UserNet};
use super::NetError;

/// Start the user network of `config` for `port`. Errors in the configuration (a
/// hostfwd that cannot bind, say) come back from here; the thread runs until the process
/// ends.
pub fn spawn(port: Arc<QueuedPort>, config: &UserConfig) -> Result<(), NetError> {
    let sink = port.clone();
    let mut net = UserNet::new(config, Box::new(move |frame| sink.push_rx(frame)))?;
    let thread = std::thread::Builder::new()
        .name("slirp".into())
        .spawn(move || loop {
            let wake = [port.wake.as_raw_fd()];
            match net.poll(&wake, Duration::from_millis(500)) {
                Ok(ready) if ready.first() == Some(&true) => {
                    for frame in port.take_tx() {
                        net.input(&frame);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::error!("user network: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        });
    thread.map(drop).map_err(NetError::Thread)
}

/// What `info network` says of a user netdev: `net=10.0.2.0,restrict=off`.
pub fn description(config: &UserConfig) -> String {
    format!(
        "net={},restrict={}",
        config.net,
        if config.restrict { "on" } else { "off" }
    )
}
