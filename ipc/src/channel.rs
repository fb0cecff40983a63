//! A typed, postcard-encoded conversation over one unix socket: a versioned hello, then
//! requests with ids and their replies, and unsolicited events, each with fds alongside.
//!
//! Each device kind defines its own request, reply and event types; the envelope
//! ([`Message`]) and the handshake are shared. Decoding is total: a payload that does not
//! decode is an error ([`IpcError::Decode`]), after which the caller closes the
//! connection; it never panics, and the frame limits bound what a peer can make us
//! allocate.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::frame::{recv_frame, send_frame, FrameError};

/// Version of the envelope and of every device protocol; bumped on any change.
pub const PROTOCOL_VERSION: u32 = 1;

/// The process kinds that speak to the vmm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    Block,
    Net,
    Display,
}

/// The first message in each direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub kind: DeviceKind,
    /// The sender's process id (for logs and the supervisor's checks).
    pub pid: u32,
}

/// An error the other side reports for one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{0}")]
pub struct RemoteError(pub String);

/// The envelope of every message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message<Req, Rep, Ev> {
    Hello(Hello),
    Request {
        id: u64,
        body: Req,
    },
    Reply {
        id: u64,
        body: Result<Rep, RemoteError>,
    },
    Event(Ev),
}

#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("cannot encode a message: {0}")]
    Encode(#[source] postcard::Error),
    #[error("undecodable message from the peer: {0}")]
    Decode(#[source] postcard::Error),
    #[error("the peer speaks protocol version {theirs}, we speak {PROTOCOL_VERSION}")]
    Version { theirs: u32 },
    #[error("expected a {expected:?} process, the peer is {got:?}")]
    Kind {
        expected: DeviceKind,
        got: DeviceKind,
    },
    #[error("expected {expected}, the peer sent something else")]
    Unexpected { expected: &'static str },
    #[error("the peer failed the request: {0}")]
    Remote(#[from] RemoteError),
    #[error("socket setup: {0}")]
    Socket(#[source] std::io::Error),
    #[error("the peer broke the protocol earlier ({0}); the channel is closed")]
    Broken(String),
}

impl IpcError {
    /// Whether this error shows the peer breaking the protocol (an undecodable or
    /// oversized frame, a message out of place), as opposed to the peer going away or
    /// refusing a request.
    pub fn is_violation(&self) -> bool {
        match self {
            IpcError::Frame(f) => matches!(
                f,
                FrameError::TooLarge(_) | FrameError::TooManyFds | FrameError::Stalled
            ),
            IpcError::Decode(_)
            | IpcError::Version { .. }
            | IpcError::Kind { .. }
            | IpcError::Unexpected { .. } => true,
            _ => false,
        }
    }
}

/// Called once with the reason when a strict channel's peer breaks the protocol.
pub type ViolationHook = Box<dyn Fn(&str) + Send>;

/// A received message and the fds that came with it.
pub type Received<Req, Rep, Ev> = (Message<Req, Rep, Ev>, Vec<OwnedFd>);

/// One end of a conversation about device kind `Req`/`Rep`/`Ev`.
pub struct Channel<Req, Rep, Ev> {
    sock: UnixStream,
    next_id: u64,
    /// Events that arrived while waiting for a reply.
    events: VecDeque<(Ev, Vec<OwnedFd>)>,
    /// Strict mode (see [`Channel::strict`]): what to tell when the peer breaks the
    /// protocol, and why it did once it has.
    on_violation: Option<ViolationHook>,
    broken: Option<String>,
    _types: PhantomData<fn() -> (Req, Rep)>,
}

impl<Req, Rep, Ev> Channel<Req, Rep, Ev>
where
    Req: Serialize + DeserializeOwned,
    Rep: Serialize + DeserializeOwned,
    Ev: Serialize + DeserializeOwned,
{
    pub fn new(sock: UnixStream) -> Self {
        Channel {
            sock,
            next_id: 1,
            events: VecDeque::new(),
            on_violation: None,
            broken: None,
            _types: PhantomData,
        }
    }

    /// Make this channel strict, as the vmm's end of a device process's channel is: a peer
    /// that breaks the protocol (see [`IpcError::is_violation`]), forges a reply to a
    /// request never sent, or leaves a call unanswered past its timeout is reported to
    /// `hook` once, and every later send, receive or call fails at once with
    /// [`IpcError::Broken`] instead of waiting on it again.
    pub fn strict(mut self, hook: ViolationHook) -> Self {
        self.on_violation = Some(hook);
        self
    }

    /// Why a strict channel was broken, if it was.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// In strict mode, record `error` if it is a violation (or `timeout_too` and it is a
    /// timeout) and tell the hook; `error` is returned either way.
    fn judge(&mut self, error: IpcError, timeout_too: bool) -> IpcError {
        let Some(hook) = &self.on_violation else {
            return error;
        };
        let timed_out = matches!(error, IpcError::Frame(FrameError::TimedOut));
        if self.broken.is_none() && (error.is_violation() || (timeout_too && timed_out)) {
            let reason = if timed_out {
                "a request went unanswered".to_string()
            } else {
                error.to_string()
            };
            hook(&reason);
            self.broken = Some(reason);
        }
        error
    }

    fn check_broken(&self) -> Result<(), IpcError> {
        match &self.broken {
            Some(reason) => Err(IpcError::Broken(reason.clone())),
            None => Ok(()),
        }
    }

    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Send one message with `fds`.
    pub fn send(
        &mut self,
        msg: &Message<Req, Rep, Ev>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), IpcError> {
        self.check_broken()?;
        let bytes = postcard::to_stdvec(msg).map_err(IpcError::Encode)?;
        send_frame(&self.sock, &bytes, fds)?;
        Ok(())
    }

    /// The next message, waiting at most `timeout` (None: forever).
    pub fn recv(&mut self, timeout: Option<Duration>) -> Result<Received<Req, Rep, Ev>, IpcError> {
        self.check_broken()?;
        self.receive(timeout).map_err(|e| self.judge(e, false))
    }

    fn receive(&mut self, timeout: Option<Duration>) -> Result<Received<Req, Rep, Ev>, IpcError> {
        self.sock
            .set_read_timeout(timeout.map(|t| t.max(Duration::from_millis(1))))
            .map_err(IpcError::Socket)?;
        let (payload, fds) = recv_frame(&self.sock)?;
        let msg = postcard::from_bytes(&payload).map_err(IpcError::Decode)?;
        Ok((msg, fds))
    }

    /// Exchange hellos: send ours, then require the peer's to have our version and the
    /// expected kind. Returns the peer's.
    pub fn hello(
        &mut self,
        kind: DeviceKind,
        expect: DeviceKind,
        timeout: Duration,
    ) -> Result<Hello, IpcError> {
        let ours = Hello {
            version: PROTOCOL_VERSION,
            kind,
            pid: std::process::id(),
        };
        self.send(&Message::Hello(ours), &[])?;
        match self.recv(Some(timeout))? {
            (Message::Hello(theirs), _) => {
                if theirs.version != PROTOCOL_VERSION {
                    return Err(IpcError::Version {
                        theirs: theirs.version,
                    });
                }
                if theirs.kind != expect {
                    return Err(IpcError::Kind {
                        expected: expect,
                        got: theirs.kind,
                    });
                }
                Ok(theirs)
            }
            _ => Err(IpcError::Unexpected { expected: "hello" }),
        }
    }

    /// Send a request and wait (at most `timeout` in all) for its reply. Events that come
    /// first are kept for [`Channel::take_event`]; a late reply to an earlier request that
    /// timed out is dropped.
    pub fn call(
        &mut self,
        body: Req,
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<(Rep, Vec<OwnedFd>), IpcError> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&Message::Request { id, body }, fds)?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.judge(FrameError::TimedOut.into(), true));
            }
            let received = self.recv(Some(left));
            match received {
                Ok((Message::Reply { id: got, body }, fds)) if got == id => {
                    return body.map(|rep| (rep, fds)).map_err(IpcError::Remote)
                }
                // A late reply to a request that timed out.
                Ok((Message::Reply { id: got, .. }, _)) if got < id => continue,
                Ok((Message::Reply { .. }, _)) => {
                    let forged = IpcError::Unexpected {
                        expected: "a reply to a request that was sent",
                    };
                    return Err(self.judge(forged, false));
                }
                Ok((Message::Event(ev), fds)) => self.events.push_back((ev, fds)),
                Ok(_) => {
                    let stray = IpcError::Unexpected {
                        expected: "a reply or an event",
                    };
                    return Err(self.judge(stray, false));
                }
                Err(e) => return Err(self.judge(e, true)),
            }
        }
    }

    /// An event that arrived during a [`Channel::call`].
    pub fn take_event(&mut self) -> Option<(Ev, Vec<OwnedFd>)> {
        self.events.pop_front()
    }

    /// Answer request `id`.
    pub fn reply(
        &mut self,
        id: u64,
        body: Result<Rep, RemoteError>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), IpcError> {
        self.send(&Message::Reply { id, body }, fds)
    }

    /// Send an unsolicited event.
    pub fn event(&mut self, event: Ev, fds: &[BorrowedFd<'_>]) -> Result<(), IpcError> {
        self.send(&Message::Event(event), fds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::{AsFd, FromRawFd};

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum TestReq {
        Add(u32, u32),
        Hold,
        Fail,
    }
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum TestRep {
        Sum(u32),
        Held,
    }
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    enum TestEv {
        Tick(u64),
    }
    type TestChannel = Channel<TestReq, TestRep, TestEv>;

    const T: Duration = Duration::from_secs(5);

    fn pair() -> (TestChannel, TestChannel) {
        let (a, b) = UnixStream::pair().unwrap();
        (Channel::new(a), Channel::new(b))
    }

    /// A device side that answers until the vmm hangs up.
    fn serve(mut dev: TestChannel) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            dev.hello(DeviceKind::Block, DeviceKind::Block, T).unwrap();
            while let Ok((msg, fds)) = dev.recv(None) {
                let Message::Request { id, body } = msg else {
                    continue;
                };
                match body {
                    TestReq::Add(a, b) => {
                        dev.event(TestEv::Tick(id), &[]).unwrap();
                        dev.reply(id, Ok(TestRep::Sum(a + b)), &[]).unwrap();
                    }
                    TestReq::Hold => {
                        // Send the fd it got straight back.
                        let back: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
                        dev.reply(id, Ok(TestRep::Held), &back).unwrap();
                    }
                    TestReq::Fail => dev
                        .reply(id, Err(RemoteError("no such thing".into())), &[])
                        .unwrap(),
                }
            }
        })
    }

    #[test]
    fn hello_calls_events_errors_and_fds() {
        let (mut vmm, dev) = pair();
        let server = serve(dev);
        let hello = vmm.hello(DeviceKind::Block, DeviceKind::Block, T).unwrap();
        assert_eq!(hello.version, PROTOCOL_VERSION);
        assert_eq!(hello.pid, std::process::id());

        let (rep, _) = vmm.call(TestReq::Add(2, 3), &[], T).unwrap();
        assert_eq!(rep, TestRep::Sum(5));
        // The event sent before the reply was kept.
        assert_eq!(vmm.take_event().map(|e| e.0), Some(TestEv::Tick(1)));
        assert!(vmm.take_event().is_none());

        let err = vmm.call(TestReq::Fail, &[], T).unwrap_err();
        assert!(matches!(err, IpcError::Remote(RemoteError(ref m)) if m == "no such thing"));

        let file = tempfile_fd();
        let (rep, fds) = vmm.call(TestReq::Hold, &[file.as_fd()], T).unwrap();
        assert_eq!(rep, TestRep::Held);
        assert_eq!(fds.len(), 1);
        // Same open file: a write through the returned fd shows in the original.
        std::fs::File::from(fds.into_iter().next().unwrap())
            .write_all(b"via ipc")
            .unwrap();
        let mut text = String::new();
        use std::io::{Read, Seek};
        let mut original = std::fs::File::from(file);
        original.rewind().unwrap();
        original.read_to_string(&mut text).unwrap();
        assert_eq!(text, "via ipc");

        drop(vmm);
        server.join().unwrap();
    }

    fn tempfile_fd() -> OwnedFd {
        let name = std::ffi::CString::new("ipc-test").unwrap();
        // SAFETY: memfd_create with a valid C string; the fd is ours.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: just created, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    #[test]
    fn hello_checks_version_and_kind() {
        let (mut vmm, mut dev) = pair();
        let t = std::thread::spawn(move || {
            let msg: Message<TestReq, TestRep, TestEv> = Message::Hello(Hello {
                version: PROTOCOL_VERSION + 1,
                kind: DeviceKind::Block,
                pid: 1,
            });
            dev.send(&msg, &[]).unwrap();
            dev
        });
        let err = vmm
            .hello(DeviceKind::Block, DeviceKind::Block, T)
            .unwrap_err();
        assert!(matches!(err, IpcError::Version { theirs } if theirs == PROTOCOL_VERSION + 1));
        drop(t.join().unwrap());

        let (mut vmm, mut dev) = pair();
        let t = std::thread::spawn(move || {
            dev.hello(DeviceKind::Net, DeviceKind::Block, T).ok();
        });
        let err = vmm
            .hello(DeviceKind::Block, DeviceKind::Block, T)
            .unwrap_err();
        assert!(matches!(
            err,
            IpcError::Kind {
                got: DeviceKind::Net,
                ..
            }
        ));
        t.join().unwrap();
    }

    #[test]
    fn a_call_times_out_and_a_late_reply_is_dropped() {
        let (mut vmm, mut dev) = pair();
        let err = vmm
            .call(TestReq::Add(1, 1), &[], Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(err, IpcError::Frame(FrameError::TimedOut)));
        // The device answers the first request late, then the second one.
        let t = std::thread::spawn(move || {
            for _ in 0..2 {
                let (Message::Request { id, body }, _) = dev.recv(None).unwrap() else {
                    panic!("expected a request");
                };
                let sum = match body {
                    TestReq::Add(a, b) => a + b,
                    _ => 0,
                };
                dev.reply(id, Ok(TestRep::Sum(sum)), &[]).unwrap();
            }
        });
        let (rep, _) = vmm.call(TestReq::Add(20, 22), &[], T).unwrap();
        assert_eq!(rep, TestRep::Sum(42));
        t.join().unwrap();
    }

    /// A strict channel and a count of the reports its hook got.
    fn strict_pair() -> (
        TestChannel,
        TestChannel,
        std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) {
        let (vmm, dev) = pair();
        let reports = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = reports.clone();
        let vmm = vmm.strict(Box::new(move |why| {
            seen.lock().unwrap().push(why.to_string())
        }));
        (vmm, dev, reports)
    }

    #[test]
    fn a_strict_channel_breaks_once_on_an_unanswered_call() {
        let (mut vmm, _dev, reports) = strict_pair();
        let err = vmm
            .call(TestReq::Add(1, 1), &[], Duration::from_millis(50))
            .unwrap_err();
        assert!(
            matches!(err, IpcError::Frame(FrameError::TimedOut)),
            "{err}"
        );
        assert_eq!(reports.lock().unwrap().len(), 1);
        // Later calls fail at once, without waiting, and report nothing more.
        let started = Instant::now();
        let err = vmm.call(TestReq::Add(1, 1), &[], T).unwrap_err();
        assert!(matches!(err, IpcError::Broken(_)), "{err}");
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(matches!(vmm.recv(Some(T)), Err(IpcError::Broken(_))));
        assert_eq!(reports.lock().unwrap().len(), 1);
        assert!(vmm.broken().is_some());
    }

    #[test]
    fn a_strict_channel_breaks_on_a_forged_reply_and_on_garbage() {
        let (mut vmm, mut dev, reports) = strict_pair();
        // A reply to a request the vmm never sent.
        let t = std::thread::spawn(move || {
            let (Message::Request { id, .. }, _) = dev.recv(None).unwrap() else {
                panic!("expected a request");
            };
            dev.reply(id + 5, Ok(TestRep::Held), &[]).unwrap();
            dev
        });
        let err = vmm.call(TestReq::Hold, &[], T).unwrap_err();
        assert!(matches!(err, IpcError::Unexpected { .. }), "{err}");
        assert_eq!(reports.lock().unwrap().len(), 1);
        drop(t.join().unwrap());

        // Garbage while the vmm only listens (the watcher's receive).
        let (mut vmm, dev, reports) = strict_pair();
        send_frame(dev.socket(), &[0xff, 0xff, 0xff, 0xff, 0x0f], &[]).unwrap();
        assert!(matches!(vmm.recv(Some(T)), Err(IpcError::Decode(_))));
        assert_eq!(reports.lock().unwrap().len(), 1);
        // A timeout of a plain receive is no violation; a peer that goes away is none.
        let (mut vmm, dev, reports) = strict_pair();
        assert!(matches!(
            vmm.recv(Some(Duration::from_millis(20))),
            Err(IpcError::Frame(FrameError::TimedOut))
        ));
        drop(dev);
        assert!(matches!(
            vmm.recv(Some(T)),
            Err(IpcError::Frame(FrameError::Closed))
        ));
        assert!(reports.lock().unwrap().is_empty());
    }

    #[test]
    fn garbage_never_panics() {
        // Every payload of a valid frame decodes or fails cleanly.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..2000usize {
            let (a, b) = UnixStream::pair().unwrap();
            let mut bytes = Vec::with_capacity(len % 64);
            for _ in 0..len % 64 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                bytes.push(seed as u8);
            }
            send_frame(&a, &bytes, &[]).unwrap();
            let mut ch: TestChannel = Channel::new(b);
            match ch.recv(Some(T)) {
                Ok(_) | Err(IpcError::Decode(_)) => {}
                Err(e) => panic!("unexpected error {e}"),
            }
        }
        // A huge claimed sequence length decodes to an error without a huge allocation.
        let (a, b) = UnixStream::pair().unwrap();
        // Variant 1 (Request), id 1, then TestReq variant 0 with varints that claim more.
        send_frame(&a, &[1, 1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f], &[]).unwrap();
        let mut ch: TestChannel = Channel::new(b);
        let _ = ch.recv(Some(T));
    }
}
