//! `vmm-blk`: a vhost-user-blk backend serving a raw image, sandboxed.
//!
//! Supervised by the vmm (see [`supervised`]) or standalone like
//! `qemu-storage-daemon --export type=vhost-user-blk` (see [`run_standalone`]). The
//! device itself: [`backend`] (vhost-user), [`request`] (virtio-blk requests on the
//! image), [`config`] (the configuration space); [`lock`] takes QEMU-compatible image
//! locks for the standalone mode.

pub mod backend;
pub mod chunks;
pub mod cli;
pub mod config;
pub mod crypt;
pub mod dirty;
pub mod image;
pub mod lock;
pub mod request;
pub mod supervised;

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipc::blk::{BackingImage, ImageFormat};

use crate::sandbox::{self, Profile};
use crate::seccomp;
use crate::supervised::{self as process, SupervisedError};

#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    #[error(transparent)]
    Cli(#[from] cli::CliError),
    #[error(transparent)]
    Process(#[from] SupervisedError),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error("Attach carries {got} fds, but the chain needs exactly one fd per image ({want})")]
    AttachFds { got: usize, want: usize },
    #[error(transparent)]
    Chain(#[from] image::ImageError),
    #[error("backing chain of {image}: {why}")]
    Backing { image: PathBuf, why: String },
    #[error("the image fd is read-only but the disk is not")]
    ReadOnlyFd,
    #[error("the image is encrypted: standalone vmm-blk has no way to take its key (the vmm's vmm-blk does)")]
    Encrypted,
    #[error("image: {0}")]
    Image(#[source] io::Error),
    #[error("cannot open image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: lock::LockError,
    },
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error(transparent)]
    Daemon(#[from] crate::vhost_daemon::DaemonError),
}

/// The program: parse the arguments, run, and return the exit status (0, or 1 after
/// printing one line on stderr).
pub fn main() -> i32 {
    process::init_logging();
    let result = match cli::parse(std::env::args().skip(1)) {
        Ok(cli::Mode::Help) => {
            println!("{}", cli::USAGE);
            Ok(())
        }
        Ok(cli::Mode::Supervised) => supervised::run(),
        Ok(cli::Mode::Standalone(args)) => run_standalone(&args),
        Err(e) => Err(e.into()),
    };
    process::exit_status("vmm-blk", result)
}

/// Serve an image on a unix socket path, like qemu-storage-daemon's vhost-user-blk export.
pub fn run_standalone(args: &cli::Standalone) -> Result<(), BlkError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!args.readonly)
        .open(&args.image)
        .map_err(|source| BlkError::Open {
            path: args.image.clone(),
            source,
        })?;
    lock::lock_image(&file, !args.readonly).map_err(|source| BlkError::Lock {
        path: args.image.clone(),
        source,
    })?;
    let (files, backing) = open_backing_chain(file, args)?;
    let image = image::Image::open(args.format, &backing, files, !args.readonly)?;
    if image.encrypted() {
        return Err(BlkError::Encrypted);
    }
    let disk = request::Disk::with_image(image, args.readonly, &args.serial)?;
    // A socket left by an earlier run is replaced (QEMU does the same); anything else at
    // that path is an error from bind.
    if std::fs::symlink_metadata(&args.socket).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(&args.socket);
    }
    let listener = UnixListener::bind(&args.socket).map_err(|source| BlkError::Listen {
        path: args.socket.clone(),
        source,
    })?;
    process::block_termination_signals()?;
    sandbox::enter(Profile::BLOCK.with_seccomp(seccomp::Kind::Block))?;
    // qemu-storage-daemon's export reports every error to the guest: there is nobody to
    // stop the VM or resume it.
    let policy = ipc::blk::ErrorPolicy {
        read: ipc::blk::ErrorAction::Report,
        write: ipc::blk::ErrorAction::Report,
    };
    let backend = Arc::new(backend::BlkBackend::new(
        disk,
        args.num_queues,
        args.queue_size,
        policy,
        None,
    )?);
    let flushing = backend.clone();
    process::spawn_signal_thread(Arc::new(move || flushing.disk().flush_for_exit()))?;
    crate::vhost_daemon::serve(backend, listener)?;
    Ok(())
}

/// The standalone daemon opens the backing chain itself (before its sandbox): each backing
/// file the headers name, relative to the directory of the image naming it, read-only and
/// locked for sharing. The files top first, and the backing images' descriptions.
fn open_backing_chain(
    top: File,
    args: &cli::Standalone,
) -> Result<(Vec<File>, Vec<BackingImage>), BlkError> {
    use std::os::unix::fs::MetadataExt;
    let key = |f: &File, path: &PathBuf| {
        f.metadata()
            .map(|m| (m.dev(), m.ino()))
            .map_err(|source| BlkError::Open {
                path: path.clone(),
                source,
            })
    };
    let mut seen = HashSet::from([key(&top, &args.image)?]);
    let mut files = vec![top];
    let mut backing = Vec::new();
    let (mut path, mut format) = (args.image.clone(), args.format);
    while let Some(file) = files.last() {
        let Some((name, named_format)) =
            image::recorded_backing(file, format, &path.display().to_string())?
        else {
            break;
        };
        let fail = |why: String| BlkError::Backing {
            image: path.clone(),
            why,
        };
        if files.len() >= image::MAX_CHAIN {
            return Err(fail(format!("longer than {} images", image::MAX_CHAIN)));
        }
        let next_format = match named_format.as_deref() {
            Some("raw") => ImageFormat::Raw,
            Some("qcow2") => ImageFormat::Qcow2,
            Some(other) => {
                return Err(fail(format!(
                    "backing file '{name}' has format '{other}' (raw or qcow2 are served)"
                )))
            }
            None => {
                return Err(fail(format!(
                    "backing file '{name}' has no recorded format (qemu-img rebase -u -F FMT)"
                )))
            }
        };
        let next = match path.parent() {
            Some(dir) if !Path::new(&name).is_absolute() => dir.join(&name),
            _ => PathBuf::from(&name),
        };
        let file = File::open(&next).map_err(|source| BlkError::Open {
            path: next.clone(),
            source,
        })?;
        if !seen.insert(key(&file, &next)?) {
            return Err(fail(format!("backing file '{name}' makes a loop")));
        }
        lock::lock_image(&file, false).map_err(|source| BlkError::Lock {
            path: next.clone(),
            source,
        })?;
        tracing::info!("backing file {} ({})", next.display(), next_format.name());
        files.push(file);
        backing.push(BackingImage {
            format: next_format,
            filename: name,
        });
        (path, format) = (next, next_format);
    }
    Ok((files, backing))
}
