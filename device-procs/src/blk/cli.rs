//! `vmm-blk`'s command line.

use std::path::PathBuf;

use ipc::blk::ImageFormat;

use super::backend::{MAX_QUEUES, MAX_QUEUE_SIZE};

pub const USAGE: &str = "\
usage: vmm-blk [--supervised]
       vmm-blk --socket PATH --image PATH [--format raw|qcow2] [--readonly] [--num-queues N]
               [--queue-size N] [--serial S]

Without arguments (or with --supervised) vmm-blk is a device process of the vmm, which starts
it with its control socket at fd 3 and a listening vhost-user socket at fd 4.

With --socket and --image it serves IMAGE (raw by default; a qcow2 image with its backing
chain, each backing file named with its format in the header) as a vhost-user-blk device on
the unix socket PATH, like `qemu-storage-daemon --export type=vhost-user-blk`: one frontend
at a time, one after another, until SIGTERM or SIGINT.";

pub const DEFAULT_QUEUE_SIZE: u16 = 256;

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Supervised,
    Standalone(Standalone),
    Help,
}

/// The standalone export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standalone {
    pub socket: PathBuf,
    pub image: PathBuf,
    pub format: ImageFormat,
    pub readonly: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("{0}: missing value")]
    MissingValue(String),
    #[error("{option}: invalid value '{value}' ({why})")]
    Invalid {
        option: &'static str,
        value: String,
        why: String,
    },
    #[error("unknown option '{0}' (see --help)")]
    Unknown(String),
    #[error("{0} is required with --socket/--image (see --help)")]
    Missing(&'static str),
    #[error("--supervised takes no other options")]
    SupervisedWithOthers,
}

fn number(option: &'static str, value: String, min: u16, max: u16) -> Result<u16, CliError> {
    match value.parse::<u16>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(CliError::Invalid {
            option,
            value,
            why: format!("a number from {min} to {max}"),
        }),
    }
}

/// Parse the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Mode, CliError> {
    let mut args = args.into_iter();
    let (mut socket, mut image, mut serial) = (None, None, None);
    let (mut readonly, mut supervised, mut any) = (false, false, false);
    let mut num_queues = 1;
    let mut format = ImageFormat::Raw;
    let mut queue_size = DEFAULT_QUEUE_SIZE;
    while let Some(arg) = args.next() {
        // Accept both --opt VALUE and --opt=VALUE.
        let (opt, inline) = match arg.split_once('=') {
            Some((o, v)) if o.starts_with("--") => (o.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| CliError::MissingValue(name.to_string()))
        };
        match opt.as_str() {
            "--help" | "-h" => return Ok(Mode::Help),
            "--supervised" => {
                supervised = true;
                continue;
            }
            "--socket" => socket = Some(PathBuf::from(value("--socket")?)),
            "--image" => image = Some(PathBuf::from(value("--image")?)),
            "--serial" => serial = Some(value("--serial")?),
            "--format" => {
                format = match value("--format")?.as_str() {
                    "raw" => ImageFormat::Raw,
                    "qcow2" => ImageFormat::Qcow2,
                    other => {
                        return Err(CliError::Invalid {
                            option: "--format",
                            value: other.to_string(),
                            why: "raw or qcow2".into(),
                        })
                    }
                }
            }
            "--readonly" => readonly = true,
            "--num-queues" => {
                num_queues = number("--num-queues", value("--num-queues")?, 1, MAX_QUEUES)?
            }
            "--queue-size" => {
                let v = value("--queue-size")?;
                queue_size = number("--queue-size", v.clone(), 1, MAX_QUEUE_SIZE)?;
                if !queue_size.is_power_of_two() {
                    return Err(CliError::Invalid {
                        option: "--queue-size",
                        value: v,
                        why: "a power of two".into(),
                    });
                }
            }
            _ => return Err(CliError::Unknown(arg)),
        }
        any = true;
    }
    match (supervised, any) {
        (true, true) => return Err(CliError::SupervisedWithOthers),
        (_, false) => return Ok(Mode::Supervised),
        (false, true) => {}
    }
    Ok(Mode::Standalone(Standalone {
        socket: socket.ok_or(CliError::Missing("--socket"))?,
        image: image.ok_or(CliError::Missing("--image"))?,
        format,
        readonly,
        num_queues,
        queue_size,
        serial: serial.unwrap_or_default(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Mode, CliError> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn modes() {
        assert_eq!(p(&[]), Ok(Mode::Supervised));
        assert_eq!(p(&["--supervised"]), Ok(Mode::Supervised));
        assert_eq!(p(&["--help"]), Ok(Mode::Help));
        let Ok(Mode::Standalone(s)) = p(&[
            "--socket",
            "/tmp/s",
            "--image=/tmp/i",
            "--readonly",
            "--num-queues",
            "4",
            "--serial",
            "abc",
            "--format",
            "qcow2",
        ]) else {
            panic!("not standalone");
        };
        assert_eq!(s.socket, PathBuf::from("/tmp/s"));
        assert_eq!(s.image, PathBuf::from("/tmp/i"));
        assert!(s.readonly);
        assert_eq!((s.num_queues, s.queue_size), (4, DEFAULT_QUEUE_SIZE));
        assert_eq!(s.serial, "abc");
        assert_eq!(s.format, ImageFormat::Qcow2);
        assert!(matches!(
            p(&["--socket", "s", "--image", "i", "--format", "vmdk"]),
            Err(CliError::Invalid {
                option: "--format",
                ..
            })
        ));
    }

    #[test]
    fn errors_name_the_option() {
        assert_eq!(p(&["--socket", "s"]), Err(CliError::Missing("--image")));
        assert_eq!(
            p(&["--image"]),
            Err(CliError::MissingValue("--image".into()))
        );
        assert!(matches!(
            p(&["--socket", "s", "--image", "i", "--num-queues", "0"]),
            Err(CliError::Invalid {
                option: "--num-queues",
                ..
            })
        ));
        assert!(matches!(
            p(&["--socket", "s", "--image", "i", "--queue-size", "100"]),
            Err(CliError::Invalid {
                option: "--queue-size",
                ..
            })
        ));
        assert_eq!(p(&["--bogus"]), Err(CliError::Unknown("--bogus".into())));
        assert_eq!(
            p(&["--supervised", "--readonly"]),
            Err(CliError::SupervisedWithOthers)
        );
    }
}
