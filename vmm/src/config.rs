//! The machine configuration, as the command line (and later QMP) describes it.

use crate::accel::AccelKind;
use crate::chardev::{ChardevSpec, SocketAddress};
use crate::device_manager::DeviceConfig;
use crate::drive::DriveConfig;

/// Where a QMP monitor (`-qmp`, or `-chardev` with `-mon mode=control`) talks to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorEndpoint {
    /// The process's stdin and stdout.
    Stdio,
    /// A listening socket; `wait`: accept the first client before the machine starts.
    Listen { address: SocketAddress, wait: bool },
}

/// One QMP monitor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitorConfig {
    /// The option as the user wrote it, for error messages.
    pub option: String,
    pub endpoint: MonitorEndpoint,
}

/// Direct Linux boot inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    pub path: String,
    pub initrd: Option<String>,
    pub cmdline: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub memory_size: u64,
    pub cpus: u32,
    pub kernel: Option<KernelConfig>,
    /// Accelerators to try in order; None means auto.
    pub accel: Option<Vec<AccelKind>>,
    /// Unpack a bzImage on the host; None means the accelerator's default.
    pub decompress_kernel: Option<bool>,
    pub name: Option<String>,
    pub process_name: Option<String>,
    pub uuid: Option<String>,
    /// Chardev specs for COM1.. in order.
    pub serials: Vec<String>,
    pub start_paused: bool,
    pub no_shutdown: bool,
    pub no_reboot: bool,
    pub nodefaults: bool,
    pub daemonize: bool,
    pub pidfile: Option<String>,
    /// isa-debug-exit (iobase, iosize).
    pub debug_exit: Option<(u16, u16)>,
    /// `-d in_asm`: log every instruction the emu CPU executes.
    pub trace_instructions: bool,
    /// QMP monitors, in command-line order.
    pub monitors: Vec<MonitorConfig>,
    /// Interactive human monitors (`-monitor`, `-mon mode=readline`).
    pub hmp_monitors: Vec<MonitorConfig>,
    /// `-drive`s, with the option text for error messages.
    pub drives: Vec<(String, DriveConfig)>,
    /// `-netdev`s (and the backends of `-net` and `-nic`), with the option text.
    pub netdevs: Vec<(String, crate::netdev::NetdevOptions)>,
    /// `-device`s other than the built-in ones above, with the option text.
    pub devices: Vec<(String, DeviceConfig)>,
    /// Every `-chardev`, by id (devices such as vhost-user-blk-pci refer to them).
    pub chardevs: Vec<(String, ChardevSpec)>,
    /// `-qtest`: the socket of the test that drives a `-accel qtest` machine.
    pub qtest: Option<crate::accel::qtest::QtestEndpoint>,
    /// `-add-fd fd=N,set=S`: descriptors management passed, by fd set.
    pub fd_sets: Vec<(i32, u32)>,
    /// `-vnc`: the VNC server `vmm-display` runs.
    pub vnc: Option<crate::vnc::VncOptions>,
    /// `-incoming URI` (or `defer`, for `migrate-incoming`): wait for a migration.
    pub incoming: Option<String>,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            memory_size: 128 << 20,
            cpus: 1,
            kernel: None,
            accel: None,
            decompress_kernel: None,
            name: None,
            process_name: None,
            uuid: None,
            serials: Vec::new(),
            start_paused: false,
            no_shutdown: false,
            no_reboot: false,
            nodefaults: false,
            daemonize: false,
            pidfile: None,
            incoming: None,
            debug_exit: None,
            trace_instructions: false,
            monitors: Vec::new(),
            hmp_monitors: Vec::new(),
            drives: Vec::new(),
            netdevs: Vec::new(),
            devices: Vec::new(),
            chardevs: Vec::new(),
            qtest: None,
            fd_sets: Vec::new(),
            vnc: None,
        }
    }
}
