//! The skeleton of a device process that the vmm supervises, the same for every kind:
//! take the inherited sockets (control at fd 3, vhost-user listener at fd 4), block the
//! termination signals, enter the sandbox, say hello, wait for the kind's setup request,
//! then answer control requests on a thread of their own while events go out on the same
//! socket; the vmm closing the socket, or SIGTERM, ends the process.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipc::{Channel, DeviceKind, FrameError, IpcError, Message, RemoteError};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::hostile::Mode;
use crate::inherit;
use crate::sandbox::{self, Profile};

const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SupervisedError {
    #[error(transparent)]
    Inherit(#[from] inherit::InheritError),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error("control socket: {0}")]
    Ipc(#[from] IpcError),
    #[error("control socket: {0}")]
    Control(#[source] io::Error),
    #[error("cannot block SIGTERM and SIGINT: {0}")]
    Signals(#[source] io::Error),
    #[error("cannot start a thread: {0}")]
    Thread(#[source] io::Error),
}

/// Logs to stderr, which the vmm shares with its device processes: the `VMM_LOG` filter,
/// each call site rate-limited (see the `logging` crate).
pub fn init_logging() {
    logging::init(&[]);
}

/// A program's exit status: 0, or 1 after one line on stderr.
pub fn exit_status<E: std::fmt::Display>(program: &str, result: Result<(), E>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{program}: {e}");
            1
        }
    }
}

fn termination_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

/// Block SIGTERM and SIGINT in this thread and so in every thread started after: only the
/// signal thread takes them. Call before starting threads.
pub fn block_termination_signals() -> Result<(), SupervisedError> {
    let set = termination_signals();
    // SAFETY: pthread_sigmask reads the set we pass.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(SupervisedError::Signals(io::Error::from_raw_os_error(r)));
    }
    Ok(())
}

/// A thread that waits for SIGTERM or SIGINT and exits with status 0, after
/// `before_exit` (a disk's flush, say).
pub fn spawn_signal_thread(
    before_exit: Arc<dyn Fn() + Send + Sync>,
) -> Result<(), SupervisedError> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = termination_signals();
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: sigwait reads the set and writes the signal number we pass.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    tracing::info!("signal {sig}: exiting");
                    before_exit();
                    std::process::exit(0);
                }
            }
        })
        .map(drop)
        .map_err(SupervisedError::Thread)
}

/// Take the inherited sockets, block the termination signals, enter the sandbox of
/// `profile` and exchange hellos as a process of kind `kind`: the control channel and the
/// vhost-user listener.
pub fn start<Req, Rep, Ev>(
    kind: DeviceKind,
    profile: Profile,
) -> Result<(Channel<Req, Rep, Ev>, UnixListener), SupervisedError>
where
    Req: Serialize + DeserializeOwned,
    Rep: Serialize + DeserializeOwned,
    Ev: Serialize + DeserializeOwned,
{
    let (control, listener) = inherit::inherited_sockets()?;
    block_termination_signals()?;
    crate::hostile::prepare();
    sandbox::enter(profile)?;
    let mut channel = Channel::new(control);
    channel.hello(kind, kind, HELLO_TIMEOUT)?;
    Ok((channel, listener))
}

/// Wait for the kind's setup request: `setup` takes each request (and its fds) and sets
/// the device up, or refuses it (a request that is not the setup one, or a bad one); a
/// refusal is replied to and the wait goes on. The request's id and what `setup` made;
/// the reply is the caller's.
pub fn wait_for_setup<Req, Rep, Ev, T>(
    channel: &mut Channel<Req, Rep, Ev>,
    mut setup: impl FnMut(Req, Vec<OwnedFd>) -> Result<T, RemoteError>,
) -> Result<(u64, T), SupervisedError>
where
    Req: Serialize + DeserializeOwned,
    Rep: Serialize + DeserializeOwned,
    Ev: Serialize + DeserializeOwned,
{
    loop {
        let (msg, fds) = channel.recv(None)?;
        let Message::Request { id, body } = msg else {
            tracing::warn!("ignoring a control message before the setup request");
            continue;
        };
        match setup(body, fds) {
            Ok(made) => return Ok((id, made)),
            Err(e) => {
                tracing::warn!("setup refused: {e}");
                channel.reply(id, Err(e), &[])?;
            }
        }
    }
}

/// The sending half of the control channel, shared by the control thread (replies) and
/// the device's threads (events).
pub struct Sender<Req, Rep, Ev>(Arc<Mutex<Channel<Req, Rep, Ev>>>);

impl<Req, Rep, Ev> Clone for Sender<Req, Rep, Ev> {
    fn clone(&self) -> Self {
        Sender(self.0.clone())
    }
}

impl<Req, Rep, Ev> Sender<Req, Rep, Ev>
where
    Req: Serialize + DeserializeOwned,
    Rep: Serialize + DeserializeOwned,
    Ev: Serialize + DeserializeOwned,
{
    /// A sender on its own handle of `channel`'s socket.
    pub fn new(channel: &Channel<Req, Rep, Ev>) -> Result<Self, SupervisedError> {
        let socket = channel
            .socket()
            .try_clone()
            .map_err(SupervisedError::Control)?;
        Ok(Sender(Arc::new(Mutex::new(Channel::new(socket)))))
    }

    fn channel(&self) -> std::sync::MutexGuard<'_, Channel<Req, Rep, Ev>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answer request `id` (a failure to send is logged: the vmm is going away).
    pub fn reply(&self, id: u64, body: Result<Rep, RemoteError>) {
        if let Err(e) = self.channel().reply(id, body, &[]) {
            tracing::warn!("cannot reply on the control socket: {e}");
        }
    }

    /// Send an event, with fds.
    pub fn event(&self, event: Ev, fds: &[std::os::fd::BorrowedFd<'_>]) {
        if let Err(e) = self.channel().event(event, fds) {
            tracing::warn!("cannot send an event on the control socket: {e}");
        }
    }

    /// The raw socket, for tests that play a broken device.
    pub fn socket(&self) -> Result<std::os::unix::net::UnixStream, SupervisedError> {
        self.channel()
            .socket()
            .try_clone()
            .map_err(SupervisedError::Control)
    }
}

/// Answer control requests with `handle` on a thread of its own until the vmm closes the
/// socket; then `before_exit` runs and the process exits (status 0; 1 if the socket
/// broke).
pub fn spawn_control_loop<Req, Rep, Ev>(
    mut channel: Channel<Req, Rep, Ev>,
    sender: Sender<Req, Rep, Ev>,
    mut handle: impl FnMut(Req, Vec<OwnedFd>) -> Result<Rep, RemoteError> + Send + 'static,
    before_exit: Arc<dyn Fn() + Send + Sync>,
) -> Result<(), SupervisedError>
where
    Req: Serialize + DeserializeOwned + Send + 'static,
    Rep: Serialize + DeserializeOwned + Send + 'static,
    Ev: Serialize + DeserializeOwned + Send + 'static,
{
    let hostile = crate::hostile::from_env().filter(|h| !h.mode.on_vhost_user());
    if let Some(h) = hostile {
        crate::hostile::spawn_control_attack(h, sender.socket()?);
    }
    let turned = move |mode: Mode| hostile.is_some_and(|h| h.mode == mode && h.active());
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || loop {
            match channel.recv(None) {
                Ok((Message::Request { .. }, _)) if turned(Mode::Silent) => {}
                Ok((Message::Request { id, body }, fds)) => {
                    let result = handle(body, fds);
                    if let Err(e) = &result {
                        tracing::warn!("control request refused: {e}");
                    }
                    // A test mode: the reply names a request never sent.
                    let id = if turned(Mode::ForgedReply) {
                        id + (1 << 32)
                    } else {
                        id
                    };
                    sender.reply(id, result);
                }
                Ok(_) => tracing::warn!("ignoring an unexpected control message"),
                Err(IpcError::Frame(FrameError::Closed)) => {
                    tracing::info!("the vmm closed the control socket: exiting");
                    before_exit();
                    std::process::exit(0);
                }
                Err(e) => {
                    tracing::error!("control socket: {e}");
                    std::process::exit(1);
                }
            }
        })
        .map(drop)
        .map_err(SupervisedError::Thread)
}
