//! What the device-procs integration tests share.

#[allow(dead_code)] // Not every test binary runs a standalone vmm-blk.
pub mod daemon;
#[allow(dead_code)] // Only the format and block migration tests drive a vring.
pub mod vring;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A temp directory, removed on drop: `TAG-PID-N` under the system's temp dir.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// A file in it.
    #[allow(dead_code)] // Not every test binary names files this way.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
