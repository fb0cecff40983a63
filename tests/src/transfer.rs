//! Data transfers the network tests check end to end: reproducible payloads, sha256 as
//! the guest's `sha256sum` prints it, and a receiver that counts what arrived.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// sha256 of `data`, as sha256sum prints it.
pub fn sha256(data: &[u8]) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().expect("sha256sum's stdin");
    let bytes = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&bytes));
    let out = child.wait_with_output().expect("sha256sum's output");
    writer
        .join()
        .expect("the writer thread")
        .expect("writing to sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The first 64-hex-digit word of a guest's `sha256sum` output.
pub fn guest_sum(text: &str) -> String {
    text.split_whitespace()
        .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no checksum in {text:?}"))
        .to_string()
}

/// Random-looking bytes (xorshift), reproducible.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Accept one connection and read it to its end, counting bytes in `progress`.
pub fn receive_all(
    listener: TcpListener,
    progress: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("the guest connects");
        let mut all = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    all.extend_from_slice(&buf[..n]);
                    progress.store(all.len() as u64, Ordering::Relaxed);
                }
            }
        }
        all
    })
}

/// Connect to `addr`, retrying until `timeout` while the peer is not listening yet.
pub fn connect_retry(addr: (&str, u16), timeout: Duration) -> TcpStream {
    let deadline = Instant::now() + timeout;
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("connect {addr:?}: {e}"),
        }
    }
}

/// A transfer paced to span a migration: `payload` to `addr` from inside `ns`, 64 KiB every
/// 40 ms. The thread, and how many bytes it has sent so far.
pub fn paced_sender(
    ns: &crate::netns::NetNs,
    addr: (&'static str, u16),
    payload: Vec<u8>,
    timeout: Duration,
) -> (std::thread::JoinHandle<()>, Arc<AtomicU64>) {
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    let thread = ns.spawn_inside(move || {
        let mut stream = connect_retry(addr, timeout);
        for chunk in payload.chunks(64 << 10) {
            stream.write_all(chunk).expect("send to the guest");
            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(40));
        }
    });
    (thread, sent)
}
