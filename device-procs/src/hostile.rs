//! Test modes in which a device process plays a compromised one, so tests can check that
//! the vmm drops it (`__org.vmm_DEVICE_PROCESS_MISBEHAVED`) and keeps the VM running. The
//! vmm passes its environment on to its device processes; with
//! `VMM_TEST_HOSTILE=PROGRAM:MODE@MS` there, the process named PROGRAM (`vmm-blk`,
//! `vmm-scsi`, `vmm-net`, `vmm-display`, or `any`) turns hostile MS milliseconds after it
//! was set up. The same modes serve every kind, from the two places every kind shares:
//! the control loop ([`crate::supervised`]) and the vhost-user daemon
//! ([`crate::vhost_daemon`]).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::vhost_relay::PreparedRelay;

/// The test hook variable.
pub const TEST_HOOK_HOSTILE: &str = "VMM_TEST_HOSTILE";

/// What a hostile process does once its time comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A well-framed control message that does not decode.
    Garbage,
    /// A control frame header announcing more than the frame limit.
    Oversized,
    /// A control frame started and then trickled a byte at a time.
    Trickle,
    /// Replies to control requests carry the id of a request never sent.
    ForgedReply,
    /// Control requests are read and never answered.
    Silent,
    /// The next vhost-user request gets a reply to another request.
    VhostGarbage,
    /// vhost-user requests are read and never answered.
    VhostSilent,
    /// A system call outside every seccomp allowlist (ptrace), as an escape would try:
    /// the filter must kill the process.
    ForbiddenCall,
}

impl Mode {
    fn parse(text: &str) -> Option<Mode> {
        Some(match text {
            "garbage" => Mode::Garbage,
            "oversized" => Mode::Oversized,
            "trickle" => Mode::Trickle,
            "forged-reply" => Mode::ForgedReply,
            "silent" => Mode::Silent,
            "vhost-garbage" => Mode::VhostGarbage,
            "vhost-silent" => Mode::VhostSilent,
            "forbidden-call" => Mode::ForbiddenCall,
            _ => return None,
        })
    }

    /// Whether the mode plays out on the vhost-user connection (else on the control
    /// socket).
    pub fn on_vhost_user(self) -> bool {
        matches!(self, Mode::VhostGarbage | Mode::VhostSilent)
    }
}

/// A hostile mode and when it starts.
#[derive(Debug, Clone, Copy)]
pub struct Hostile {
    pub mode: Mode,
    pub from: Instant,
}

impl Hostile {
    /// Whether the process is hostile by now.
    pub fn active(&self) -> bool {
        Instant::now() >= self.from
    }

    /// Sleep until the process turns hostile.
    pub fn wait(&self) {
        std::thread::sleep(self.from.saturating_duration_since(Instant::now()));
    }
}

/// `PROGRAM:MODE@MS` for this program, from the environment.
pub fn from_env() -> Option<Hostile> {
    let spec = std::env::var(TEST_HOOK_HOSTILE).ok()?;
    let program = std::env::args()
        .next()
        .and_then(|a| a.rsplit('/').next().map(str::to_string))
        .unwrap_or_default();
    let hostile = parse(&spec, &program, Instant::now());
    match &hostile {
        Some(h) => tracing::warn!("test hook {TEST_HOOK_HOSTILE}={spec}: turning {:?}", h.mode),
        None if spec.split(':').next() == Some(program.as_str()) => {
            tracing::error!("test hook {TEST_HOOK_HOSTILE}={spec}: not understood")
        }
        None => {}
    }
    hostile
}

fn parse(spec: &str, program: &str, now: Instant) -> Option<Hostile> {
    let (who, rest) = spec.split_once(':')?;
    if who != program && who != "any" {
        return None;
    }
    let (mode, delay) = match rest.split_once('@') {
        Some((mode, ms)) => (mode, ms.parse::<u64>().ok()?),
        None => (rest, 0),
    };
    Some(Hostile {
        mode: Mode::parse(mode)?,
        from: now + Duration::from_millis(delay),
    })
}

/// A vhost-user mode's relay, made by [`prepare`] before the sandbox.
static PREPARED: Mutex<Option<PreparedRelay>> = Mutex::new(None);

/// Before the sandbox: if this process is to turn hostile on vhost-user, make the relay's
/// sockets while it still may.
pub fn prepare() {
    if !from_env().is_some_and(|h| h.mode.on_vhost_user()) {
        return;
    }
    match PreparedRelay::new() {
        Ok(relay) => *PREPARED.lock().unwrap_or_else(|e| e.into_inner()) = Some(relay),
        Err(e) => tracing::error!("test hook: cannot make the hostile relay: {e}"),
    }
}

/// The relay [`prepare`] made, once, and the mode, its delay counted from now (when the
/// device is served).
pub fn take_prepared_relay() -> Option<(PreparedRelay, Hostile)> {
    let relay = PREPARED.lock().unwrap_or_else(|e| e.into_inner()).take()?;
    Some((relay, from_env()?))
}

/// Play a control-socket mode that needs no request to act on: send its bad bytes on
/// `socket` once the time comes.
pub fn spawn_control_attack(hostile: Hostile, socket: std::os::unix::net::UnixStream) {
    let attack = move || {
        hostile.wait();
        let sent = match hostile.mode {
            // An enum tag far out of range.
            Mode::Garbage => ipc::frame::send_frame(&socket, &[0xff, 0xff, 0xff, 0xff, 0x0f], &[])
                .map_err(|e| e.to_string()),
            Mode::Oversized => write_raw(&socket, &(64u32 << 20).to_le_bytes()),
            Mode::Trickle => {
                let mut result = write_raw(&socket, &4096u32.to_le_bytes());
                for _ in 0..4096 {
                    if result.is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    result = write_raw(&socket, &[0]);
                }
                result
            }
            Mode::ForbiddenCall => {
                tracing::warn!("test hook: ptrace(PTRACE_TRACEME), expecting SIGSYS");
                // SAFETY: PTRACE_TRACEME takes no pointers; the seccomp filter is to kill
                // the process here.
                let r = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
                Err(format!(
                    "ptrace returned {r}: the seccomp filter let it through"
                ))
            }
            _ => Ok(()),
        };
        if let Err(e) = sent {
            tracing::warn!("test hook: the attack stopped: {e}");
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("hostile".into())
        .spawn(attack)
    {
        tracing::error!("test hook: cannot start the hostile thread: {e}");
    }
}

fn write_raw(socket: &std::os::unix::net::UnixStream, bytes: &[u8]) -> Result<(), String> {
    std::io::Write::write_all(&mut &*socket, bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_name_a_program_a_mode_and_a_delay() {
        let now = Instant::now();
        let h = parse("vmm-blk:silent@1500", "vmm-blk", now).unwrap();
        assert_eq!(h.mode, Mode::Silent);
        assert_eq!(h.from, now + Duration::from_millis(1500));
        assert!(parse("vmm-blk:silent@1500", "vmm-net", now).is_none());
        let h = parse("any:vhost-garbage", "vmm-net", now).unwrap();
        assert_eq!((h.mode, h.from), (Mode::VhostGarbage, now));
        assert!(h.mode.on_vhost_user());
        for bad in ["vmm-blk", "vmm-blk:nonsense", "vmm-blk:silent@soon", ""] {
            assert!(parse(bad, "vmm-blk", now).is_none(), "{bad}");
        }
    }
}
