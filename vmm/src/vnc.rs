//! `-vnc` (and `-display vnc=`): where the VNC server listens and how clients
//! authenticate, in QEMU's syntax. The vmm opens the listening socket and hands it to
//! `vmm-display`, which opens nothing.

use std::net::{TcpListener, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;

/// VNC display numbers count from this TCP port.
const VNC_BASE_PORT: u16 = 5900;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VncListen {
    /// `HOST:N`; an empty host listens on every address.
    Tcp {
        host: String,
        display: u16,
    },
    Unix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VncOptions {
    pub listen: VncListen,
    /// `password=on`: VNC Authentication, with no password until set_password.
    pub password: bool,
}

/// The listening socket and what `query-vnc` says of it.
pub struct VncListener {
    pub fd: OwnedFd,
    pub host: String,
    pub service: String,
    pub family: String,
}

/// Parse `-vnc`'s value: `None` for `none`. Warnings (QEMU's deprecations) go to stderr.
pub fn parse_vnc(value: &str) -> Result<Option<VncOptions>, String> {
    let mut parts = value.split(',');
    let address = parts.next().unwrap_or("");
    if address == "none" {
        return Ok(None);
    }
    let listen = if let Some(path) = address.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("a unix socket path is required".into());
        }
        VncListen::Unix(path.to_string())
    } else {
        let (host, display) = address
            .rsplit_once(':')
            .ok_or_else(|| format!("address '{address}' is not HOST:DISPLAY or unix:PATH"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let display = display
            .parse::<u16>()
            .ok()
            .filter(|d| *d <= u16::MAX - VNC_BASE_PORT)
            .ok_or_else(|| format!("display number '{display}' is not valid"))?;
        VncListen::Tcp {
            host: host.to_string(),
            display,
        }
    };
    let mut password = false;
    for option in parts {
        match option.split_once('=') {
            Some(("password", v)) => {
                password = match v {
                    "on" | "yes" | "true" => true,
                    "off" | "no" | "false" => false,
                    _ => return Err("Parameter 'password' expects 'on' or 'off'".to_string()),
                }
            }
            None if option == "password" => {
                crate::report!("warning: short-form boolean option 'password' deprecated");
                crate::report!("Please use password=on instead");
                password = true;
            }
            _ => {
                let name = option.split('=').next().unwrap_or(option);
                return Err(format!("Invalid parameter '{name}'"));
            }
        }
    }
    Ok(Some(VncOptions { listen, password }))
}

impl VncOptions {
    /// Open the listening socket.
    pub fn listen(&self) -> std::io::Result<VncListener> {
        match &self.listen {
            VncListen::Unix(path) => {
                // A stale socket from an earlier run would make bind fail.
                if std::fs::symlink_metadata(path)
                    .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                    .unwrap_or(false)
                {
                    let _ = std::fs::remove_file(path);
                }
                let l = UnixListener::bind(path)?;
                Ok(VncListener {
                    fd: l.into(),
                    host: String::new(),
                    service: path.clone(),
                    family: "unix".into(),
                })
            }
            VncListen::Tcp { host, display } => {
                let port = VNC_BASE_PORT + display;
                let host = if host.is_empty() { "0.0.0.0" } else { host };
                let addr = (host, port)
                    .to_socket_addrs()?
                    .next()
                    .ok_or_else(|| std::io::Error::other(format!("no address for '{host}'")))?;
                let l = TcpListener::bind(addr)?;
                let local = l.local_addr()?;
                Ok(VncListener {
                    fd: l.into(),
                    host: local.ip().to_string(),
                    service: local.port().to_string(),
                    family: if local.is_ipv4() { "ipv4" } else { "ipv6" }.into(),
                })
            }
        }
    }

    /// `query-vnc`'s and the events' `auth`.
    pub fn auth_name(&self) -> &'static str {
        if self.password {
            "vnc"
        } else {
            "none"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemus_spellings() {
        assert_eq!(parse_vnc("none").unwrap(), None);
        let o = parse_vnc(":1").unwrap().unwrap();
        assert_eq!(
            o.listen,
            VncListen::Tcp {
                host: String::new(),
                display: 1
            }
        );
        assert!(!o.password);
        let o = parse_vnc("127.0.0.1:5,password=on").unwrap().unwrap();
        assert!(o.password);
        assert_eq!(o.auth_name(), "vnc");
        assert!(
            parse_vnc("unix:/tmp/v.sock,password")
                .unwrap()
                .unwrap()
                .password
        );
        assert_eq!(
            parse_vnc("[::1]:0").unwrap().unwrap().listen,
            VncListen::Tcp {
                host: "::1".into(),
                display: 0
            }
        );
        assert!(parse_vnc("localhost").is_err());
        assert!(parse_vnc(":x").is_err());
        assert!(parse_vnc(":70000").is_err());
        assert_eq!(
            parse_vnc(":1,frob=1").unwrap_err(),
            "Invalid parameter 'frob'"
        );
        assert!(parse_vnc("unix:").is_err());
    }

    #[test]
    fn listeners_report_their_address() {
        let dir = std::env::temp_dir().join(format!("vnc-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock").display().to_string();
        let o = parse_vnc(&format!("unix:{path}")).unwrap().unwrap();
        let l = o.listen().unwrap();
        assert_eq!(
            (l.family.as_str(), l.service.as_str()),
            ("unix", path.as_str())
        );
        drop(l);
        // A stale socket is replaced.
        assert!(o.listen().is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
