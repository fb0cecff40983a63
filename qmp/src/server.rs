//! The QMP server: any number of listeners (unix, tcp) and pre-connected
//! streams (stdio, chardev sockets), each connection with its own
//! negotiation state and fd table, replies in request order, and events
//! broadcast to every negotiated connection.
//!
//! Slow clients: every connection has a bounded outbound queue
//! (`ServerConfig::outbound_queue`). Replies wait for room (a client that does
//! not read its replies stops being served, as in QEMU). Events never wait:
//! if a connection's queue is full when an event is emitted, that connection
//! is disconnected. So `EventSender::emit` never blocks, a stuck client costs
//! at most one bounded queue, and the other clients and the VM carry on.
//! QEMU instead buffers without bound; we prefer the bound.
//!
//! Rate-limited events: QEMU sends some events (`BALLOON_CHANGE`, `RTC_CHANGE`, ...) at
//! most once a second; one emitted within the second waits, replacing any that waited
//! before it, and goes out when the second ends. A guest inflating its balloon page batch
//! by page batch then gives clients a few events, not hundreds.
//!
//! Many clients: each listener serves at most `ServerConfig::max_connections` at once;
//! beyond that it stops accepting, so new clients wait in the kernel's listen backlog (and
//! are refused once that is full) until one leaves. A connection holds no read buffer
//! until it has something to read. So a client that opens connections in a loop, sends a
//! command on each and goes away without reading costs a bounded amount, however fast it
//! is.
//!
//! fd passing: on unix sockets, fds sent with SCM_RIGHTS alongside the bytes
//! are queued on the connection (at most `max_received_fds`, oldest closed
//! first). A command that does not use them leaves them queued for the next
//! `getfd`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::unix::OwnedReadHalf;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::protocol::{
    error_line, event_line, greeting_line, success_line, Action, GreetingInfo, QmpError, Session,
    Timestamp,
};
use crate::schema::Schema;
use crate::stream::{JsonStream, StreamLimits};

/// Most fds accepted in one recvmsg.
const MAX_FDS_PER_MESSAGE: usize = 16;
/// Descriptors one connection may hold by name (getfd): with the cap on connections, a
/// bound on what monitor clients can make the vmm keep open.
pub const MAX_NAMED_FDS: usize = 64;
/// Bytes read from a connection at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Connections one listener serves at once (QEMU serves one; management stacks open a
/// few, tests a hundred).
const MAX_CONNECTIONS: usize = 256;
/// How long a closing connection may take to flush its last replies.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the server's own I/O (not sent to clients).
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("accepting a QMP connection on monitor {monitor}: {source}")]
    Accept { monitor: String, source: io::Error },
}

/// Tunables; the defaults suit the VMM.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub greeting: GreetingInfo,
    pub limits: StreamLimits,
    /// Messages (replies and events) a connection may have waiting.
    pub outbound_queue: usize,
    /// fds received with SCM_RIGHTS and not yet claimed by getfd.
    pub max_received_fds: usize,
    /// Connections one listener serves at once.
    pub max_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            greeting: GreetingInfo::default(),
            limits: StreamLimits::default(),
            outbound_queue: 1024,
            max_received_fds: MAX_FDS_PER_MESSAGE,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Implemented by the VMM: runs one command that passed the protocol and
/// argument checks. `qmp_capabilities` never reaches it.
pub trait Dispatcher: Send + Sync + 'static {
    fn dispatch(
        &self,
        ctx: &mut ConnectionContext,
        command: &str,
        args: Map<String, Value>,
    ) -> impl Future<Output = Result<Value, QmpError>> + Send;
}

/// The state of one connection that commands may use.
pub struct ConnectionContext {
    monitor_id: String,
    connection_id: u64,
    named_fds: HashMap<String, OwnedFd>,
    received_fds: VecDeque<OwnedFd>,
    max_received_fds: usize,
    close_request: Option<oneshot::Sender<()>>,
    close_requested: bool,
    events: EventSender,
}

impl ConnectionContext {
    fn new(
        monitor_id: String,
        connection_id: u64,
        max_received_fds: usize,
        events: EventSender,
    ) -> Self {
        ConnectionContext {
            monitor_id,
            connection_id,
            named_fds: HashMap::new(),
            received_fds: VecDeque::new(),
            max_received_fds,
            close_request: None,
            close_requested: false,
            events,
        }
    }

    /// The monitor (listener or stream) this connection came through.
    pub fn monitor_id(&self) -> &str {
        &self.monitor_id
    }

    /// Unique per server.
    pub fn connection_id(&self) -> u64 {
        self.connection_id
    }

    pub fn events(&self) -> &EventSender {
        &self.events
    }

    fn push_received_fd(&mut self, fd: OwnedFd) {
        if self.received_fds.len() >= self.max_received_fds.max(1) {
            // Dropping closes the oldest fd.
            self.received_fds.pop_front();
        }
        self.received_fds.push_back(fd);
    }

    /// Takes the oldest fd received with SCM_RIGHTS and not claimed yet.
    pub fn take_received_fd(&mut self) -> Option<OwnedFd> {
        self.received_fds.pop_front()
    }

    /// Number of received fds waiting for getfd.
    pub fn received_fd_count(&self) -> usize {
        self.received_fds.len()
    }

    /// The `getfd` command, with QEMU 7.2's checks and errors: the received
    /// fd is consumed (and closed on error); a duplicate name closes and
    /// replaces the old fd.
    pub fn getfd(&mut self, name: &str) -> Result<(), QmpError> {
        let Some(fd) = self.take_received_fd() else {
            return Err(QmpError::generic(
                "No file descriptor supplied via SCM_RIGHTS",
            ));
        };
        if name.starts_with(|c: char| c.is_ascii_digit()) {
            drop(fd);
            return Err(QmpError::generic(
                "Parameter 'fdname' expects a name not starting with a digit",
            ));
        }
        if self.named_fds.len() >= MAX_NAMED_FDS && !self.named_fds.contains_key(name) {
            drop(fd);
            return Err(QmpError::generic(format!(
                "This connection holds {MAX_NAMED_FDS} file descriptors already; closefd some \
                 first"
            )));
        }
        self.named_fds.insert(name.to_string(), fd);
        Ok(())
    }

    /// The `closefd` command.
    pub fn closefd(&mut self, name: &str) -> Result<(), QmpError> {
        match self.named_fds.remove(name) {
            Some(fd) => {
                drop(fd);
                Ok(())
            }
            None => Err(QmpError::generic(format!(
                "File descriptor named '{name}' not found"
            ))),
        }
    }

    /// Takes a named fd for a consumer (netdev fd=, add_client, ...), which
    /// removes it from the table as QEMU's monitor_get_fd does.
    pub fn take_fd(&mut self, name: &str) -> Result<OwnedFd, QmpError> {
        self.named_fds.remove(name).ok_or_else(|| {
            QmpError::generic(format!("File descriptor named '{name}' has not been found"))
        })
    }

    /// Raw fd of a named fd, left in the table.
    pub fn named_fd(&self, name: &str) -> Option<RawFd> {
        self.named_fds.get(name).map(AsRawFd::as_raw_fd)
    }

    pub fn fd_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.named_fds.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// For `quit`: after this command's reply has been written, the
    /// connection is closed. The receiver completes when the reply is out
    /// (or the connection is gone), so the VMM can exit after it.
    pub fn close_after_reply(&mut self) -> oneshot::Receiver<()> {
        let (sender, receiver) = oneshot::channel();
        self.close_request = Some(sender);
        self.close_requested = true;
        receiver
    }
}

/// A message waiting to be written to a connection.
enum Outbound {
    Bytes(Arc<[u8]>),
    /// Shut the connection down after everything before this.
    Close(Option<oneshot::Sender<()>>),
}

struct Subscriber {
    connection_id: u64,
    queue: mpsc::Sender<Outbound>,
    kick: watch::Sender<bool>,
}

#[derive(Default)]
struct EventHub {
    subscribers: Mutex<Vec<Subscriber>>,
    /// The rate-limited events within their second, and the one waiting for its end.
    throttled: Mutex<HashMap<&'static str, Option<Arc<[u8]>>>>,
}

/// The events QEMU 7.2 rate-limits (its `monitor_qapi_event_conf`) that are not told apart
/// by their data, and their period.
const THROTTLED_EVENTS: &[&str] = &[
    "RTC_CHANGE",
    "WATCHDOG",
    "BALLOON_CHANGE",
    "MEMORY_DEVICE_SIZE_CHANGE",
];
const THROTTLE_PERIOD: Duration = Duration::from_secs(1);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding a lock leaves the data usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Emits QMP events to every negotiated connection. Cheap to clone, usable
/// from any thread, never blocks (see the module notes on slow clients).
#[derive(Clone, Default)]
pub struct EventSender {
    hub: Arc<EventHub>,
}

impl EventSender {
    /// Sends `{"timestamp", "event": name, "data"?}` now. Returns the number
    /// of connections it was queued for.
    /// A rate-limited event may wait (see the module notes).
    pub fn emit(&self, name: &str, data: Option<Map<String, Value>>) -> usize {
        let line: Arc<[u8]> = event_line(name, data.as_ref(), Timestamp::now()).into();
        if let Some(&throttled) = THROTTLED_EVENTS.iter().find(|&&e| e == name) {
            let mut periods = lock(&self.hub.throttled);
            if let Some(waiting) = periods.get_mut(throttled) {
                *waiting = Some(line);
                return self.subscriber_count();
            }
            if self.start_period(throttled) {
                periods.insert(throttled, None);
            }
        }
        self.broadcast(line)
    }

    /// A second in which `name` waits begins; at its end the waiting event goes out and
    /// another second begins, or the period is over. False if no timer could be started.
    fn start_period(&self, name: &'static str) -> bool {
        let hub = self.hub.clone();
        std::thread::Builder::new()
            .name("qmp-event-throttle".into())
            .spawn(move || loop {
                std::thread::sleep(THROTTLE_PERIOD);
                let waiting = {
                    let mut periods = lock(&hub.throttled);
                    match periods.get_mut(name).and_then(Option::take) {
                        Some(line) => line,
                        None => {
                            periods.remove(name);
                            return;
                        }
                    }
                };
                EventSender { hub: hub.clone() }.broadcast(waiting);
            })
            .is_ok()
    }

    fn broadcast(&self, line: Arc<[u8]>) -> usize {
        let mut subscribers = self.lock();
        subscribers.retain(|subscriber| {
            match subscriber.queue.try_send(Outbound::Bytes(line.clone())) {
                Ok(()) => true,
                Err(_) => {
                    // Full or gone: disconnect it rather than wait.
                    subscriber.kick.send_replace(true);
                    false
                }
            }
        });
        subscribers.len()
    }

    /// The process is exiting: every connection writes what is queued for it (the last
    /// events, say SHUTDOWN) and closes. The receivers complete as each one is done.
    pub fn close_all(&self) -> Vec<oneshot::Receiver<()>> {
        let subscribers = std::mem::take(&mut *self.lock());
        subscribers
            .into_iter()
            .filter_map(|subscriber| {
                let (done, flushed) = oneshot::channel();
                subscriber
                    .queue
                    .try_send(Outbound::Close(Some(done)))
                    .ok()
                    .map(|()| flushed)
            })
            .collect()
    }

    /// Connections currently receiving events.
    pub fn subscriber_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        lock(&self.hub.subscribers)
    }

    fn subscribe(&self, subscriber: Subscriber) {
        self.lock().push(subscriber);
    }

    fn unsubscribe(&self, connection_id: u64) {
        self.lock().retain(|s| s.connection_id != connection_id);
    }
}

struct Shared<D> {
    config: ServerConfig,
    schema: Arc<Schema>,
    dispatcher: Arc<D>,
    events: EventSender,
    next_connection: AtomicU64,
}

/// The server. Clone it freely; all clones serve the same monitors.
pub struct Server<D> {
    shared: Arc<Shared<D>>,
}

impl<D> Clone for Server<D> {
    fn clone(&self) -> Self {
        Server {
            shared: self.shared.clone(),
        }
    }
}

impl<D: Dispatcher> Server<D> {
    /// `schema` lists exactly the commands that exist (CommandNotFound for the
    /// rest) and their argument specs.
    pub fn new(config: ServerConfig, schema: Schema, dispatcher: Arc<D>) -> Self {
        Self::with_events(config, schema, dispatcher, EventSender::default())
    }

    /// Like `new`, with an EventSender created earlier (so devices built
    /// before the server can hold one).
    pub fn with_events(
        config: ServerConfig,
        schema: Schema,
        dispatcher: Arc<D>,
        events: EventSender,
    ) -> Self {
        Server {
            shared: Arc::new(Shared {
                config,
                schema: Arc::new(schema),
                dispatcher,
                events,
                next_connection: AtomicU64::new(0),
            }),
        }
    }

    pub fn events(&self) -> EventSender {
        self.shared.events.clone()
    }

    pub fn schema(&self) -> Arc<Schema> {
        self.shared.schema.clone()
    }

    /// Accepts connections for ever (until the task is aborted); each one is
    /// served concurrently. Unix connections support fd passing.
    pub fn spawn_unix_listener(
        &self,
        listener: UnixListener,
        monitor_id: &str,
    ) -> JoinHandle<Result<(), ServerError>> {
        let server = self.clone();
        let monitor = monitor_id.to_string();
        let slots = self.connection_slots();
        tokio::spawn(async move {
            loop {
                // A slot first: beyond the cap, clients wait in the listen backlog.
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return Ok(());
                };
                let (stream, _) =
                    listener
                        .accept()
                        .await
                        .map_err(|source| ServerError::Accept {
                            monitor: monitor.clone(),
                            source,
                        })?;
                let (reader, writer) = stream.into_split();
                server.spawn_connection(
                    Reader::Unix(reader),
                    Box::new(writer),
                    &monitor,
                    Some(slot),
                );
            }
        })
    }

    pub fn spawn_tcp_listener(
        &self,
        listener: TcpListener,
        monitor_id: &str,
    ) -> JoinHandle<Result<(), ServerError>> {
        let server = self.clone();
        let monitor = monitor_id.to_string();
        let slots = self.connection_slots();
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return Ok(());
                };
                let (stream, _) =
                    listener
                        .accept()
                        .await
                        .map_err(|source| ServerError::Accept {
                            monitor: monitor.clone(),
                            source,
                        })?;
                // Replies are small and interactive.
                let _ = stream.set_nodelay(true);
                let (reader, writer) = stream.into_split();
                server.spawn_connection(
                    Reader::Plain(Box::new(reader)),
                    Box::new(writer),
                    &monitor,
                    Some(slot),
                );
            }
        })
    }

    /// Serves one connected unix socket (with fd passing).
    pub fn spawn_unix_stream(&self, stream: UnixStream, monitor_id: &str) -> JoinHandle<()> {
        let (reader, writer) = stream.into_split();
        self.spawn_connection(Reader::Unix(reader), Box::new(writer), monitor_id, None)
    }

    /// The connections a new listener may serve at once.
    fn connection_slots(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.shared.config.max_connections.max(1)))
    }

    /// Serves any byte stream (tcp, pty, a chardev), without fd passing.
    pub fn spawn_stream<R, W>(&self, reader: R, writer: W, monitor_id: &str) -> JoinHandle<()>
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        self.spawn_connection(
            Reader::Plain(Box::new(reader)),
            Box::new(writer),
            monitor_id,
            None,
        )
    }

    /// `-qmp stdio`.
    pub fn spawn_stdio(&self, monitor_id: &str) -> JoinHandle<()> {
        self.spawn_stream(tokio::io::stdin(), tokio::io::stdout(), monitor_id)
    }

    /// Serve a connection; `slot` (its listener's) is given back when it ends.
    fn spawn_connection(
        &self,
        reader: Reader,
        writer: BoxedWriter,
        monitor_id: &str,
        slot: Option<OwnedSemaphorePermit>,
    ) -> JoinHandle<()> {
        let shared = self.shared.clone();
        let monitor = monitor_id.to_string();
        tokio::spawn(async move {
            serve_connection(shared, reader, writer, monitor).await;
            drop(slot);
        })
    }
}

type BoxedWriter = Box<dyn AsyncWrite + Send + Unpin>;

enum Reader {
    Unix(OwnedReadHalf),
    Plain(Box<dyn AsyncRead + Send + Unpin>),
}

impl Reader {
    /// Waits until there is something to read (or the peer went away), reading nothing.
    async fn readable(&mut self) -> io::Result<()> {
        match self {
            // A plain stream has no readiness of its own: its read waits.
            Reader::Plain(_) => Ok(()),
            Reader::Unix(half) => {
                let stream: &UnixStream = half.as_ref();
                stream.readable().await
            }
        }
    }

    /// Reads bytes, and on unix sockets the fds that came with them.
    async fn read(&mut self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
        match self {
            Reader::Plain(reader) => reader.read(buf).await,
            Reader::Unix(half) => {
                let stream: &UnixStream = half.as_ref();
                loop {
                    stream.readable().await?;
                    let raw = stream.as_raw_fd();
                    match stream.try_io(Interest::READABLE, || recv_with_fds(raw, buf, fds)) {
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                        result => return result,
                    }
                }
            }
        }
    }
}

/// recvmsg with room for SCM_RIGHTS fds; received fds are close-on-exec.
fn recv_with_fds(socket: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    const FD_BYTES: usize = MAX_FDS_PER_MESSAGE * std::mem::size_of::<RawFd>();
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 64];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(FD_BYTES as u32) } as usize;
    let control_len = space.min(std::mem::size_of_val(&control));
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = control_len as _;
    // SAFETY: msg points at a live iovec over `buf` and a control buffer of
    // `control_len` bytes, both valid for the duration of the call.
    let received = unsafe { libc::recvmsg(socket, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: msg was filled by recvmsg; the CMSG macros walk the control
    // buffer within msg_controllen, and each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / 4 fds that the kernel just installed for us.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(received as usize)
}

async fn write_loop(mut writer: BoxedWriter, mut queue: mpsc::Receiver<Outbound>) {
    while let Some(message) = queue.recv().await {
        match message {
            Outbound::Bytes(bytes) => {
                if writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err() {
                    return;
                }
            }
            Outbound::Close(done) => {
                let _ = writer.shutdown().await;
                if let Some(done) = done {
                    let _ = done.send(());
                }
                return;
            }
        }
    }
}

/// Why the reading side stopped.
enum Stop {
    /// End of input or a read error: flush what is queued, then close.
    Eof,
    /// Kicked for being too slow: close at once.
    Kicked,
    /// A command asked for the connection to close after its reply.
    Close,
}

async fn serve_connection<D: Dispatcher>(
    shared: Arc<Shared<D>>,
    mut reader: Reader,
    writer: BoxedWriter,
    monitor: String,
) {
    let connection_id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
    let (queue, outbound) = mpsc::channel(shared.config.outbound_queue.max(1));
    let (kick, mut kicked) = watch::channel(false);
    let mut writer_task = tokio::spawn(write_loop(writer, outbound));
    let mut ctx = ConnectionContext::new(
        monitor,
        connection_id,
        shared.config.max_received_fds,
        shared.events.clone(),
    );

    let stop = {
        let mut connection = Connection {
            shared: &shared,
            ctx: &mut ctx,
            queue: &queue,
            kick: &kick,
            session: Session::new(shared.config.greeting.offer_oob),
            stream: JsonStream::new(shared.config.limits),
            subscribed: false,
        };
        tokio::select! {
            stop = connection.run(&mut reader) => stop,
            _ = kicked.wait_for(|k| *k) => Stop::Kicked,
        }
    };

    shared.events.unsubscribe(connection_id);
    match stop {
        Stop::Kicked => writer_task.abort(),
        Stop::Eof | Stop::Close => {
            let done = ctx.close_request.take();
            // The writer may be blocked on a client that does not read.
            let close =
                tokio::time::timeout(FLUSH_TIMEOUT, queue.send(Outbound::Close(done))).await;
            drop(queue);
            if close.is_err()
                || tokio::time::timeout(FLUSH_TIMEOUT, &mut writer_task)
                    .await
                    .is_err()
            {
                writer_task.abort();
            }
        }
    }
}

/// The reading side of one connection.
struct Connection<'a, D> {
    shared: &'a Shared<D>,
    ctx: &'a mut ConnectionContext,
    queue: &'a mpsc::Sender<Outbound>,
    kick: &'a watch::Sender<bool>,
    session: Session,
    stream: JsonStream,
    subscribed: bool,
}

impl<D: Dispatcher> Connection<'_, D> {
    async fn run(&mut self, reader: &mut Reader) -> Stop {
        if !self.send(greeting_line(&self.shared.config.greeting)).await {
            return Stop::Eof;
        }
        // No buffer until the client sends something (an idle or vanished client costs
        // none), and none kept while a command runs.
        let mut buf = Vec::new();
        let mut fds = Vec::new();
        loop {
            if reader.readable().await.is_err() {
                return Stop::Eof;
            }
            buf.resize(READ_CHUNK, 0);
            let read = reader.read(&mut buf, &mut fds).await;
            for fd in fds.drain(..) {
                self.ctx.push_received_fd(fd);
            }
            let count = match read {
                Ok(0) | Err(_) => return Stop::Eof,
                Ok(count) => count,
            };
            let items = self.stream.feed_collect(&buf[..count]);
            buf = Vec::new();
            for item in items {
                if !self.handle(item).await {
                    return if self.ctx.close_requested {
                        Stop::Close
                    } else {
                        Stop::Eof
                    };
                }
            }
        }
    }

    /// Handles one stream item; false when the connection must stop reading.
    async fn handle(&mut self, item: crate::stream::StreamItem) -> bool {
        let reply = match self.session.handle(item, &self.shared.schema) {
            Action::Reply(bytes) => bytes,
            Action::Dispatch(request) => {
                let result = self
                    .shared
                    .dispatcher
                    .dispatch(self.ctx, &request.command, request.arguments)
                    .await;
                match result {
                    Ok(value) => success_line(value, request.id.as_ref()),
                    Err(error) => error_line(&error, request.id.as_ref()),
                }
            }
        };
        if !self.send(reply).await {
            return false;
        }
        if self.session.negotiated() && !self.subscribed {
            self.subscribed = true;
            self.shared.events.subscribe(Subscriber {
                connection_id: self.ctx.connection_id,
                queue: self.queue.clone(),
                kick: self.kick.clone(),
            });
        }
        !self.ctx.close_requested
    }

    async fn send(&self, bytes: Vec<u8>) -> bool {
        self.queue.send(Outbound::Bytes(bytes.into())).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream as StdUnixStream;

    fn context() -> ConnectionContext {
        ConnectionContext::new("mon0".into(), 0, 4, EventSender::default())
    }

    /// The event lines a subscriber received so far.
    fn received(queue: &mut mpsc::Receiver<Outbound>) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(Outbound::Bytes(b)) = queue.try_recv() {
            lines.push(String::from_utf8_lossy(&b).into_owned());
        }
        lines
    }

    #[test]
    fn rate_limited_events_wait_and_only_the_latest_goes_out() {
        let events = EventSender::default();
        let (queue, mut rx) = mpsc::channel(64);
        let (kick, _) = watch::channel(false);
        events.subscribe(Subscriber {
            connection_id: 1,
            queue,
            kick,
        });
        let actual = |n: u64| {
            let mut data = Map::new();
            data.insert("actual".into(), Value::from(n));
            Some(data)
        };
        for n in 1..=100 {
            events.emit("BALLOON_CHANGE", actual(n));
        }
        events.emit("STOP", None);
        let now = received(&mut rx);
        assert_eq!(now.len(), 2, "{now:?}");
        assert!(
            now[0].contains(r#""actual": 1}"#),
            "the first at once: {now:?}"
        );
        assert!(now[1].contains("STOP"), "others are not held: {now:?}");
        std::thread::sleep(THROTTLE_PERIOD + Duration::from_millis(300));
        let later = received(&mut rx);
        assert_eq!(later.len(), 1, "{later:?}");
        assert!(
            later[0].contains(r#""actual": 100}"#),
            "the latest: {later:?}"
        );
        // A quiet second ends the period: the next one goes out at once.
        std::thread::sleep(THROTTLE_PERIOD + Duration::from_millis(300));
        events.emit("BALLOON_CHANGE", actual(7));
        assert_eq!(received(&mut rx).len(), 1);
    }

    /// A pipe: (read end, write end).
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: fds has room for the two descriptors pipe() writes.
        let rc = unsafe { libc::pipe(fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        // SAFETY: pipe() just created both fds and nothing else owns them.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// The read end of a pipe and its write end, through which the test can tell whether
    /// the read end was closed. Checking the read end's fd number instead would race with
    /// other test threads that open fds and get the freed number.
    fn pipe_fd() -> OwnedFd {
        pipe().0
    }

    /// Whether every read end of the pipe behind `writer` is closed (a write fails with
    /// EPIPE; the Rust runtime ignores SIGPIPE).
    fn reader_closed(writer: &OwnedFd) -> bool {
        // SAFETY: writes one byte from a live buffer to an fd we own.
        let n = unsafe { libc::write(writer.as_raw_fd(), b"x".as_ptr().cast(), 1) };
        n == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPIPE)
    }

    /// Error texts observed from QEMU 7.2.22.
    #[test]
    fn fd_table_rules() {
        let mut ctx = context();
        assert_eq!(
            ctx.getfd("x").unwrap_err().desc,
            "No file descriptor supplied via SCM_RIGHTS"
        );
        assert_eq!(
            ctx.closefd("x").unwrap_err().desc,
            "File descriptor named 'x' not found"
        );
        assert_eq!(
            ctx.take_fd("x").unwrap_err().desc,
            "File descriptor named 'x' has not been found"
        );

        let (fd, writer) = pipe();
        ctx.push_received_fd(fd);
        assert_eq!(
            ctx.getfd("1x").unwrap_err().desc,
            "Parameter 'fdname' expects a name not starting with a digit"
        );
        assert!(reader_closed(&writer), "a rejected fd is closed");

        let (first, first_writer) = pipe();
        let first_raw = first.as_raw_fd();
        ctx.push_received_fd(first);
        ctx.getfd("a").unwrap();
        assert_eq!(ctx.named_fd("a"), Some(first_raw));
        // A duplicate name closes and replaces the old fd.
        let (second, second_writer) = pipe();
        let second_raw = second.as_raw_fd();
        ctx.push_received_fd(second);
        ctx.getfd("a").unwrap();
        assert!(reader_closed(&first_writer));
        assert_eq!(ctx.named_fd("a"), Some(second_raw));
        assert!(!reader_closed(&second_writer));
        ctx.closefd("a").unwrap();
        assert!(reader_closed(&second_writer));
        assert!(ctx.fd_names().is_empty());
    }

    #[test]
    fn named_fds_are_bounded() {
        let mut ctx = context();
        let pass = |ctx: &mut ConnectionContext| {
            let (a, _b) = StdUnixStream::pair().unwrap();
            ctx.push_received_fd(OwnedFd::from(a));
        };
        for i in 0..MAX_NAMED_FDS {
            pass(&mut ctx);
            ctx.getfd(&format!("fd{i}")).unwrap();
        }
        pass(&mut ctx);
        let err = ctx.getfd("one-more").unwrap_err();
        assert!(format!("{err:?}").contains("closefd some first"), "{err:?}");
        // Replacing a name, or after a closefd, still works.
        pass(&mut ctx);
        ctx.getfd("fd0").unwrap();
        ctx.closefd("fd1").unwrap();
        pass(&mut ctx);
        ctx.getfd("one-more").unwrap();
    }

    #[test]
    fn received_fds_are_bounded() {
        let mut ctx = context();
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..6).map(|_| pipe()).collect();
        let mut writers = Vec::new();
        let mut raws = Vec::new();
        for (reader, writer) in pipes {
            raws.push(reader.as_raw_fd());
            writers.push(writer);
            ctx.push_received_fd(reader);
        }
        assert_eq!(ctx.received_fd_count(), 4);
        // The oldest two went, the rest are held.
        assert!(reader_closed(&writers[0]) && reader_closed(&writers[1]));
        assert!(!reader_closed(&writers[2]));
        assert_eq!(
            ctx.take_received_fd().map(|fd| fd.as_raw_fd()),
            Some(raws[2])
        );
    }

    #[test]
    fn recvmsg_collects_passed_fds() {
        let (a, b) = StdUnixStream::pair().unwrap();
        let fd = pipe_fd();
        send_with_fd(&a, b"hello", fd.as_raw_fd());
        let mut buf = [0u8; 16];
        let mut fds = Vec::new();
        let n = recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 1);
        assert_ne!(fds[0].as_raw_fd(), fd.as_raw_fd());
    }

    /// Sends bytes with one fd attached (test helper).
    pub(crate) fn send_with_fd(socket: &StdUnixStream, bytes: &[u8], fd: RawFd) {
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut _,
            iov_len: bytes.len(),
        };
        // SAFETY: zeroed msghdr is valid; fields are filled below with live
        // buffers, and the CMSG macros stay inside `control`.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(4) as _;
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(4) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
            assert_eq!(
                libc::sendmsg(socket.as_raw_fd(), &msg, 0),
                bytes.len() as isize
            );
        }
    }
}
