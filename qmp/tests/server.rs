//! The QMP server over real unix sockets: negotiation, chunked input, many
//! clients, a client that stops reading, fd passing and quit.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qmp::{ConnectionContext, Dispatcher, QmpError, Schema, Server, ServerConfig};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::timeout;

struct TestVmm;

impl Dispatcher for TestVmm {
    async fn dispatch(
        &self,
        ctx: &mut ConnectionContext,
        command: &str,
        args: Map<String, Value>,
    ) -> Result<Value, QmpError> {
        let fdname = || {
            args.get("fdname")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        match command {
            "query-status" => {
                Ok(json!({"status": "running", "singlestep": false, "running": true}))
            }
            "stop" => {
                ctx.events().emit("STOP", None);
                Ok(json!({}))
            }
            "getfd" => ctx.getfd(&fdname()).map(|()| json!({})),
            "closefd" => ctx.closefd(&fdname()).map(|()| json!({})),
            "x-fds" => Ok(json!({"received": ctx.received_fd_count(), "named": ctx.fd_names()})),
            "quit" => {
                let mut data = Map::new();
                data.insert("guest".into(), json!(false));
                data.insert("reason".into(), json!("host-qmp-quit"));
                ctx.events().emit("SHUTDOWN", Some(data));
                let _closed = ctx.close_after_reply();
                Ok(json!({}))
            }
            other => Err(QmpError::command_not_found(other)),
        }
    }
}

fn socket_path(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("qmp-test-{}-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn start(name: &str, config: ServerConfig) -> (Server<TestVmm>, PathBuf) {
    let mut schema = Schema::seed().unwrap();
    schema.insert(qmp::CommandSpec::no_args("x-fds"));
    let server = Server::new(config, schema, Arc::new(TestVmm));
    let path = socket_path(name);
    let listener = UnixListener::bind(&path).unwrap();
    server.spawn_unix_listener(listener, "monitor0");
    (server, path)
}

struct Client {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
}

impl Client {
    async fn connect(path: &PathBuf) -> Client {
        let stream = UnixStream::connect(path).await.unwrap();
        Self::from_stream(stream)
    }

    fn from_stream(stream: UnixStream) -> Client {
        let (reader, writer) = stream.into_split();
        Client {
            lines: BufReader::new(reader).lines(),
            writer,
        }
    }

    async fn line(&mut self) -> String {
        timeout(Duration::from_secs(10), self.lines.next_line())
            .await
            .expect("timed out")
            .unwrap()
            .expect("EOF")
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.unwrap();
    }

    async fn negotiated(path: &PathBuf) -> Client {
        let mut client = Client::connect(path).await;
        let greeting: Value = serde_json::from_str(&client.line().await).unwrap();
        assert_eq!(
            greeting["QMP"]["version"]["qemu"],
            json!({"major": 7, "minor": 2, "micro": 0})
        );
        client.send(b"{\"execute\":\"qmp_capabilities\"}").await;
        assert_eq!(client.line().await, "{\"return\": {}}");
        client
    }
}

#[tokio::test]
async fn greeting_negotiation_and_chunked_input() {
    let (_server, path) = start("basic", ServerConfig::default());
    let mut client = Client::connect(&path).await;
    let greeting = client.line().await;
    assert!(greeting.starts_with(
        "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}"
    ));
    assert!(greeting.ends_with("\"capabilities\": [\"oob\"]}}"));
    client.send(b"{\"execute\":\"query-status\"}").await;
    assert_eq!(
        client.line().await,
        "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}"
    );
    client.send(b"{\"execute\":\"qmp_capabilities\"}").await;
    assert_eq!(client.line().await, "{\"return\": {}}");
    // One object split over writes gets one reply.
    client.send(b"{\"execute\":\"query-").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.send(b"status\", \"id\": 'a'}").await;
    assert_eq!(
        client.line().await,
        // QEMU prints "status" before "singlestep" (same QDict bucket, newest
        // first); without insertion order we break such ties by name.
        "{\"return\": {\"singlestep\": false, \"status\": \"running\", \"running\": true}, \"id\": \"a\"}"
    );
    // Two objects in one write get two replies, in order; the event comes
    // before the reply of the command that caused it.
    client
        .send(b"{\"execute\":\"stop\",\"id\":1}{\"execute\":\"no-such-cmd\",\"id\":2}")
        .await;
    let event: Value = serde_json::from_str(&client.line().await).unwrap();
    assert_eq!(event["event"], "STOP");
    assert!(event["timestamp"]["seconds"].as_u64().unwrap() > 0);
    assert!(event.get("data").is_none());
    assert_eq!(client.line().await, "{\"return\": {}, \"id\": 1}");
    assert_eq!(
        client.line().await,
        "{\"id\": 2, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command no-such-cmd has not been found\"}}"
    );
    // Malformed input, then the connection still works.
    client.send(b"{\xff").await;
    assert_eq!(
        client.line().await,
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, stray '\\uFFFD'\"}}"
    );
    client.send(b"{\"execute\":\"query-status\"}").await;
    assert!(client.line().await.starts_with("{\"return\": {"));
}

#[tokio::test]
async fn hundred_clients_receive_an_event() {
    let (server, path) = start("hundred", ServerConfig::default());
    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push(Client::negotiated(&path).await);
    }
    // A connection that never negotiated gets no events.
    let mut silent = Client::connect(&path).await;
    silent.line().await;
    assert_eq!(server.events().subscriber_count(), 100);
    assert_eq!(server.events().emit("RESUME", None), 100);
    for client in &mut clients {
        let event: Value = serde_json::from_str(&client.line().await).unwrap();
        assert_eq!(event["event"], "RESUME");
    }
    silent.send(b"{\"execute\":\"qmp_capabilities\"}").await;
    assert_eq!(silent.line().await, "{\"return\": {}}");
}

/// Beyond `max_connections`, a new client waits (in the listen backlog) until one leaves.
#[tokio::test]
async fn clients_beyond_the_cap_wait_for_a_slot() {
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let (_server, path) = start("cap", config);
    let first = Client::negotiated(&path).await;
    let mut second = Client::negotiated(&path).await;
    let mut third = Client::connect(&path).await;
    let waited = timeout(Duration::from_millis(300), third.lines.next_line()).await;
    assert!(
        waited.is_err(),
        "the third client was served beyond the cap"
    );
    drop(first);
    let greeting: Value = serde_json::from_str(&third.line().await).unwrap();
    assert!(greeting.get("QMP").is_some(), "{greeting}");
    third.send(b"{\"execute\":\"qmp_capabilities\"}").await;
    assert_eq!(third.line().await, "{\"return\": {}}");
    second.send(b"{\"execute\":\"query-status\"}").await;
    assert!(second.line().await.starts_with("{\"return\": {"));
}

#[tokio::test]
async fn a_client_that_stops_reading_does_not_stall_others() {
    let config = ServerConfig {
        outbound_queue: 32,
        ..ServerConfig::default()
    };
    let (server, path) = start("slow", config);
    let events = server.events();
    let mut good = Client::negotiated(&path).await;
    // Negotiates, then never reads again.
    let stuck = Client::negotiated(&path).await;
    assert_eq!(events.subscriber_count(), 2);

    let mut data = Map::new();
    data.insert("padding".into(), json!("x".repeat(4000)));
    let mut sent = 0;
    for _round in 0..400 {
        for _ in 0..16 {
            // emit never blocks, whatever the stuck client does.
            events.emit("PING", Some(data.clone()));
            sent += 1;
        }
        for _ in 0..16 {
            let line = good.line().await;
            assert!(line.contains("\"event\": \"PING\""));
        }
        if events.subscriber_count() == 1 {
            break;
        }
    }
    assert_eq!(
        events.subscriber_count(),
        1,
        "the stuck client is disconnected after {sent} events"
    );
    good.send(b"{\"execute\":\"query-status\"}").await;
    assert!(good.line().await.starts_with("{\"return\""));
    drop(stuck);
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe() writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: pipe() just created both fds; nothing else owns them.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn send_with_fd(socket: &StdUnixStream, bytes: &[u8], fd: RawFd) {
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut _,
        iov_len: bytes.len(),
    };
    // SAFETY: zeroed msghdr is valid; it points at live buffers and the CMSG
    // macros stay inside `control`.
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

#[tokio::test]
async fn getfd_over_scm_rights() {
    let (_server, path) = start("getfd", ServerConfig::default());
    let std_stream = StdUnixStream::connect(&path).unwrap();
    let sender = std_stream.try_clone().unwrap();
    std_stream.set_nonblocking(true).unwrap();
    let mut client = Client::from_stream(UnixStream::from_std(std_stream).unwrap());
    client.line().await;
    client.send(b"{\"execute\":\"qmp_capabilities\"}").await;
    client.line().await;

    client
        .send(b"{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"p\"}}")
        .await;
    assert_eq!(
        client.line().await,
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"No file descriptor supplied via SCM_RIGHTS\"}}"
    );
    // An fd attached to a command that does not use it stays queued.
    let (read_end, _write_end) = pipe();
    send_with_fd(
        &sender,
        b"{\"execute\":\"query-status\"}",
        read_end.as_raw_fd(),
    );
    assert!(client.line().await.starts_with("{\"return\""));
    client.send(b"{\"execute\":\"x-fds\"}").await;
    assert_eq!(
        client.line().await,
        "{\"return\": {\"received\": 1, \"named\": []}}"
    );
    client
        .send(b"{\"execute\":\"getfd\",\"arguments\":{\"fdname\":\"p\"}}")
        .await;
    assert_eq!(client.line().await, "{\"return\": {}}");
    client.send(b"{\"execute\":\"x-fds\"}").await;
    assert_eq!(
        client.line().await,
        "{\"return\": {\"received\": 0, \"named\": [\"p\"]}}"
    );
    client
        .send(b"{\"execute\":\"closefd\",\"arguments\":{\"fdname\":\"p\"}}")
        .await;
    assert_eq!(client.line().await, "{\"return\": {}}");
    client
        .send(b"{\"execute\":\"closefd\",\"arguments\":{\"fdname\":\"p\"}}")
        .await;
    assert_eq!(
        client.line().await,
        "{\"error\": {\"class\": \"GenericError\", \"desc\": \"File descriptor named 'p' not found\"}}"
    );
}

#[tokio::test]
async fn quit_replies_then_closes() {
    let (_server, path) = start("quit", ServerConfig::default());
    let mut client = Client::negotiated(&path).await;
    client
        .send(b"{\"execute\":\"quit\"}{\"execute\":\"query-status\"}")
        .await;
    let event: Value = serde_json::from_str(&client.line().await).unwrap();
    assert_eq!(event["event"], "SHUTDOWN");
    assert_eq!(
        event["data"],
        json!({"guest": false, "reason": "host-qmp-quit"})
    );
    assert_eq!(client.line().await, "{\"return\": {}}");
    let end = timeout(Duration::from_secs(10), client.lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(end, None, "EOF after the quit reply");
}

/// At exit, close_all writes each client's queued events, then closes its connection.
#[tokio::test]
async fn close_all_flushes_queued_events_then_closes() {
    let (server, path) = start("closeall", ServerConfig::default());
    let mut a = Client::negotiated(&path).await;
    let mut b = Client::negotiated(&path).await;
    let events = server.events();
    events.emit("SHUTDOWN", None);
    let flushed = events.close_all();
    assert_eq!(flushed.len(), 2);
    for done in flushed {
        done.await.unwrap();
    }
    assert_eq!(events.subscriber_count(), 0);
    for client in [&mut a, &mut b] {
        let event: Value = serde_json::from_str(&client.line().await).unwrap();
        assert_eq!(event["event"], "SHUTDOWN");
        let end = timeout(Duration::from_secs(10), client.lines.next_line()).await;
        assert!(matches!(end, Ok(Ok(None))), "then end of file: {end:?}");
    }
}
