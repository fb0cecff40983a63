//! The interactive human monitor: `-monitor stdio|unix:PATH,server=on|tcp:...,server=on`,
//! or `-chardev ... -mon chardev=ID` (mode=readline, QEMU's default). Each line runs
//! through the same HMP as QMP's human-monitor-command, on the main thread, and the
//! console prints QEMU's banner and `(qemu) ` prompt. Unlike QEMU's readline it does not
//! echo or edit input: it is line-oriented, for scripts and `socat`. A socket serves one
//! client at a time, as QEMU's monitor chardev does. `cpu N` sets this console's current
//! CPU.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixListener;

use serde_json::{Map, Value};

use super::{remove_stale_socket, MonitorCall, MonitorError};
use crate::chardev::SocketAddress;
use crate::config::{MonitorConfig, MonitorEndpoint};
use crate::control::{MachineControl, MachineRequest};

const BANNER: &str = "QEMU 7.2.0 monitor - type 'help' for more information\r\n";
const PROMPT: &str = "(qemu) ";
/// Longest line a client may send; longer input is cut into lines of this size.
const MAX_LINE: usize = 64 * 1024;

/// A running interactive monitor. Its threads run until the process exits; dropping this
/// removes its unix socket file, as QEMU does at exit.
pub struct HmpConsole {
    socket_path: Option<std::path::PathBuf>,
}

impl Drop for HmpConsole {
    fn drop(&mut self) {
        if let Some(path) = &self.socket_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Start one interactive monitor.
pub fn start(config: &MonitorConfig, control: MachineControl) -> Result<HmpConsole, MonitorError> {
    let socket_path = match &config.endpoint {
        MonitorEndpoint::Listen {
            address: SocketAddress::Unix(path),
            ..
        } => Some(path.clone()),
        _ => None,
    };
    serve_endpoint(config, control)?;
    Ok(HmpConsole { socket_path })
}

fn serve_endpoint(config: &MonitorConfig, control: MachineControl) -> Result<(), MonitorError> {
    let (address, wait) = match &config.endpoint {
        MonitorEndpoint::Stdio => {
            return spawn("hmp-stdio", move || {
                serve(std::io::stdin().lock(), std::io::stdout(), &control);
            })
        }
        MonitorEndpoint::Listen { address, wait } => (address, *wait),
    };
    let text = match address {
        SocketAddress::Unix(path) => path.display().to_string(),
        SocketAddress::Tcp { host, port } => format!("{host}:{port}"),
    };
    let listen_error = |source| MonitorError::Listen {
        option: config.option.clone(),
        address: text.clone(),
        source,
    };
    let accept_error = |source| MonitorError::Accept {
        option: config.option.clone(),
        address: text.clone(),
        source,
    };
    match address {
        SocketAddress::Unix(path) => {
            remove_stale_socket(path);
            let listener = UnixListener::bind(path).map_err(listen_error)?;
            let accept = move || listener.accept().map(|(s, _)| s);
            serve_clients("hmp-unix", wait, accept, control).map_err(accept_error)?
        }
        SocketAddress::Tcp { host, port } => {
            let host = if host.is_empty() { "0.0.0.0" } else { host };
            let listener = TcpListener::bind((host, *port)).map_err(listen_error)?;
            let accept = move || listener.accept().map(|(s, _)| s);
            serve_clients("hmp-tcp", wait, accept, control).map_err(accept_error)?
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<(), MonitorError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(MonitorError::Runtime)
}

/// Serve the clients `accept` returns, one at a time, on a thread of their own; with
/// `wait`, the first client is accepted before this returns (QEMU's `wait=on`). The
/// outer error is accepting that first client; the inner one starting the thread.
fn serve_clients<S>(
    name: &str,
    wait: bool,
    mut accept: impl FnMut() -> std::io::Result<S> + Send + 'static,
    control: MachineControl,
) -> std::io::Result<Result<(), MonitorError>>
where
    S: Read + Write + TryClone + Send + 'static,
{
    let first = if wait { Some(accept()?) } else { None };
    Ok(spawn(name, move || {
        if let Some(stream) = first {
            serve_stream(stream, &control);
        }
        loop {
            // A failed accept (a client that went away first) just waits for the next.
            if let Ok(stream) = accept() {
                serve_stream(stream, &control);
            }
        }
    }))
}

/// Serve one connected client (a unix or tcp stream) until it hangs up.
fn serve_stream<S: Read + Write + TryClone>(stream: S, control: &MachineControl) {
    match stream.try_clone_stream() {
        Ok(reader) => serve(BufReader::new(reader), stream, control),
        Err(e) => tracing::warn!("human monitor: cannot serve a client: {e}"),
    }
}

/// `try_clone` of the socket types, for a reader and a writer on one connection.
trait TryClone: Sized {
    fn try_clone_stream(&self) -> std::io::Result<Self>;
}

impl TryClone for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}

impl TryClone for std::net::TcpStream {
    fn try_clone_stream(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}

/// The console loop: banner, prompt, and one HMP command per line until EOF, a write
/// error, or `quit`.
fn serve(mut input: impl BufRead, mut output: impl Write, control: &MachineControl) {
    let mut current_cpu = 0i64;
    if write_flush(&mut output, &format!("{BANNER}{PROMPT}")).is_err() {
        return;
    }
    let mut line = Vec::new();
    loop {
        line.clear();
        match (&mut input)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        let command = text.trim();
        let (reply, quit) = if command.is_empty() {
            (String::new(), false)
        } else {
            run(control, command, &mut current_cpu)
        };
        if quit {
            let _ = write_flush(&mut output, &reply);
            return;
        }
        if write_flush(&mut output, &format!("{reply}{PROMPT}")).is_err() {
            return;
        }
    }
}

fn write_flush(output: &mut impl Write, text: &str) -> std::io::Result<()> {
    output.write_all(text.as_bytes())?;
    output.flush()
}

/// Run one line on the main thread. Returns the text to print and whether the console
/// should close (after `quit`, or when the machine is gone).
fn run(control: &MachineControl, line: &str, current_cpu: &mut i64) -> (String, bool) {
    let mut args = Map::new();
    args.insert("command-line".into(), Value::String(line.to_string()));
    args.insert("cpu-index".into(), Value::from(*current_cpu));
    let (call, reply, handed_off) = MonitorCall::new("human-monitor-command", args);
    control.request(MachineRequest::Run(Box::new(call)));
    let result = reply.blocking_recv();
    let _ = handed_off.send(());
    let quit = matches!(line.split_whitespace().next(), Some("quit" | "q"));
    match result {
        Ok(Ok(Value::String(text))) => {
            // `cpu N` that succeeded (no text) makes N this console's current CPU.
            let mut words = line.split_whitespace();
            if words.next() == Some("cpu") && text.is_empty() {
                if let Some(n) = words.next().and_then(|w| w.parse().ok()) {
                    *current_cpu = n;
                }
            }
            (text, quit)
        }
        Ok(Ok(other)) => (format!("{other}\r\n"), quit),
        Ok(Err(e)) => (format!("Error: {}\r\n", e.desc), quit),
        // The machine stopped listening: it is exiting.
        Err(_) => (String::new(), true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_prints_banner_prompt_and_replies() {
        let (control, requests) = MachineControl::new();
        let machine = std::thread::spawn(move || {
            while let Ok(MachineRequest::Run(job)) = requests.recv() {
                let Ok(call) = job.into_any().downcast::<MonitorCall>() else {
                    panic!("a job that is not a monitor call");
                };
                let line = call.str_arg("command-line").unwrap_or("").to_string();
                let cpu = call.args.get("cpu-index").cloned();
                call.reply(Ok(Value::String(format!("ran {line} on {cpu:?}\r\n"))));
            }
        });
        let mut out = Vec::new();
        serve(&b"info status\n\n  help  \n"[..], &mut out, &control);
        drop(control);
        let _ = machine.join();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            format!(
                "{BANNER}{PROMPT}ran info status on Some(Number(0))\r\n{PROMPT}{PROMPT}\
                 ran help on Some(Number(0))\r\n{PROMPT}"
            )
        );
    }
}
