//! The machine's side of live migration: what the sending and receiving threads of
//! [`crate::migration`] ask of it, done on the machine's own thread. The source stops and
//! hands over its state as named sections (the platform, each vCPU, each device); the
//! destination takes them back in the same order, then runs.

use std::os::fd::OwnedFd;
use std::sync::{mpsc, Arc, Mutex};

use super::{Machine, MachineExit};
use crate::control::{FnJob, MachineControl, MachineRequest};
use crate::migration::disk::{BlockMode, DiskInfo, DiskIo, SourceDisk};
use crate::migration::local::{LocalFds, LocalItem};
use crate::migration::log::DeviceDirtyLog;
use crate::migration::ram::RamPages;
use crate::migration::stream::Header;
use crate::migration::uri::{self, MigrationUri};
use crate::migration::{
    self, lock, DestinationHost, IncomingMigration, Outgoing, SourceHost, Status,
};
use crate::runstate::RunState;
use crate::snapshot::Snapshottable;
use crate::virtio::vhost_user::LogShare;

/// The sections every machine has besides its devices.
const PLATFORM_SECTION: &str = "platform";

fn cpu_section(index: usize) -> String {
    format!("cpu {index}")
}

/// Run `f` on the machine's thread and wait for its answer.
fn on_machine<T: Send + 'static>(
    control: &MachineControl,
    f: impl FnOnce(&mut Machine) -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    control.request(MachineRequest::Run(Box::new(FnJob::new(move |m| {
        let _ = tx.send(f(m));
        None
    }))));
    rx.recv().ok()
}

/// The source's requests, carried to the machine's thread.
struct MachineSource {
    control: MachineControl,
}

impl SourceHost for MachineSource {
    fn stop_and_save(&self) -> Result<Vec<(String, Vec<u8>)>, String> {
        on_machine(&self.control, |m| {
            m.stop_into(RunState::FinishMigrate);
            if m.run_state != RunState::FinishMigrate {
                // It was not running: stopped all the same for the last part.
                m.migration_was_running = false;
                m.cpus.pause();
                m.accel.pause();
                m.run_state = RunState::FinishMigrate;
            }
            let sections = m.save_sections()?;
            // The destination takes the disks' locks once it has the guest.
            m.devices.inactivate_images();
            Ok(sections)
        })
        .unwrap_or_else(|| Err("the machine is gone".into()))
    }

    fn finish(&self, completed: bool) {
        on_machine(&self.control, move |m| m.migration_finished(completed));
    }

    fn handed_over(&self, downtime_us: u64) {
        self.control
            .request(MachineRequest::Run(Box::new(FnJob::new(move |_| {
                crate::report!(
                    "vmm: local migration completed (downtime {} ms, {downtime_us} us): the \
                     guest runs on in the destination; exiting",
                    downtime_us / 1000
                );
                Some(MachineExit::Shutdown)
            }))));
    }

    fn throttle(&self, percent: u8) {
        on_machine(&self.control, move |m| m.cpus.set_throttle(percent));
    }
}

/// The destination's requests, carried to the machine's thread.
struct MachineDestination {
    control: MachineControl,
}

impl DestinationHost for MachineDestination {
    fn restore(&self, sections: Vec<(String, Vec<u8>)>, running: bool) -> Result<(), String> {
        let start = std::time::Instant::now();
        let result = on_machine(&self.control, move |m| {
            tracing::debug!("restore job started after {:?}", start.elapsed());
            m.restore_sections(sections, running)
        })
        .unwrap_or_else(|| Err("the machine is gone".into()));
        tracing::info!(
            "incoming migration: the state restored in {:?}",
            start.elapsed()
        );
        result
    }

    fn prepare_disks(&self, disks: Vec<DiskInfo>) -> Result<Vec<Box<dyn DiskIo>>, String> {
        on_machine(&self.control, move |m| {
            m.devices
                .prepare_incoming_disks(&disks)
                .map_err(|e| e.to_string())
        })
        .unwrap_or_else(|| Err("the machine is gone".into()))
    }

    fn local_allowed(&self) -> bool {
        on_machine(&self.control, |m| m.migration.caps.x_local).unwrap_or(false)
    }

    fn prepare_local(&self, fds: LocalFds) -> Result<(), String> {
        on_machine(&self.control, move |m| m.prepare_local(fds))
            .unwrap_or_else(|| Err("the machine is gone".into()))
    }

    fn failed(&self, message: String) {
        self.control
            .request(MachineRequest::Run(Box::new(FnJob::new(move |_| {
                crate::report!("vmm: {message}");
                Some(MachineExit::MigrationFailed)
            }))));
    }
}

impl Machine {
    /// Every device whose state moves, by section name: the built-in ones and the PCI
    /// functions plugged now.
    fn migrating_devices(&self) -> Vec<(String, Arc<Mutex<dyn Snapshottable>>)> {
        let mut devices = self.snapshot_devices.clone();
        devices.extend(self.devices.migration_sections());
        devices
    }

    /// What the stream's header says of this machine, for the destination to compare.
    fn migration_header(&self, running: bool) -> Header {
        let mut devices: Vec<String> = self
            .migrating_devices()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        devices.sort();
        Header {
            ram_size: self.config.memory_size,
            vcpus: self.cpus.num_vcpus() as u32,
            accel: self.accel.kind().name().to_string(),
            devices,
            running,
        }
    }

    /// Why this machine cannot migrate yet, if it cannot: a device whose state does not
    /// move yet (QEMU's migration blockers).
    fn migration_blocker(&self) -> Option<String> {
        self.devices
            .migration_blockers()
            .first()
            .map(|why| format!("State blocked by non-migratable device '{why}'"))
    }

    /// QMP `migrate`: start sending the guest to `uri` (`fd` for `fd:NAME`), with the
    /// disks' contents unless they are shared (`block`). Errors are QEMU's words for what
    /// it refuses before it starts.
    pub fn migrate(
        &mut self,
        uri: &str,
        fd: Option<OwnedFd>,
        block: BlockMode,
    ) -> Result<(), String> {
        if self.migration.status().is_active() {
            return Err("There's a migration process in progress".into());
        }
        if matches!(self.run_state, RunState::InMigrate) {
            return Err("Guest is waiting for an incoming migration".into());
        }
        let uri = MigrationUri::parse(uri).map_err(|e| e.to_string())?;
        if let (MigrationUri::Fd(name), None) = (&uri, &fd) {
            return Err(format!("File descriptor named '{name}' has not been found"));
        }
        if let Some(blocker) = self.migration_blocker() {
            return Err(blocker);
        }
        let local = self.migration.caps.x_local;
        let (device_log, disks, local_fds) = if local {
            if !matches!(uri, MigrationUri::Unix(_) | MigrationUri::Fd(_)) {
                return Err("A local migration (x-local) needs a unix: or fd: URI".into());
            }
            if block != BlockMode::Shared {
                return Err(
                    "A local migration (x-local) hands the disks over: blk and inc do not apply"
                        .into(),
                );
            }
            // Nothing is copied: nothing to log, and the framebuffer's contents stay out of
            // the display's state.
            let fds = self.local_resources()?;
            self.devices.set_vram_moves(true);
            (None, Vec::new(), Some(fds))
        } else {
            let (log, disks) = self.start_logging(block)?;
            (Some(log), disks, None)
        };
        self.migration.begin();
        let running = self.run_state.is_running();
        self.migration_was_running = running;
        let outgoing = Outgoing {
            uri,
            fd,
            shutdown: self.migration.shutdown.clone(),
            ram: RamPages::new(self.memory.guest_memory().clone()),
            accel: self.accel.clone(),
            host: Box::new(MachineSource {
                control: self.control.clone(),
            }),
            header: self.migration_header(running),
            params: self.migration.params.clone(),
            caps: self.migration.caps,
            progress: self.migration.progress.clone(),
            cancel: self.migration.cancel.clone(),
            events: self.events.clone(),
            device_log,
            disks,
            local: local_fds,
        };
        if let Err(e) = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || migration::source::run(outgoing))
        {
            self.accel.stop_dirty_log();
            let _ = self.devices.set_dirty_logging(None);
            self.devices.stop_block_migration();
            lock(&self.migration.progress).status = Status::Failed;
            return Err(format!("cannot start the migration thread: {e}"));
        }
        Ok(())
    }

    /// Every writer of guest memory logs what it writes (the device processes into a log
    /// they share with us, the accelerator its own), and for a block migration the disks'
    /// processes mark what to send: the device log and the disks.
    fn start_logging(
        &mut self,
        block: BlockMode,
    ) -> Result<(Arc<DeviceDirtyLog>, Vec<SourceDisk>), String> {
        let device_log =
            Arc::new(DeviceDirtyLog::new(self.memory.ram_end()).map_err(|e| e.to_string())?);
        let share = LogShare {
            fd: Arc::new(
                device_log
                    .fd()
                    .try_clone_to_owned()
                    .map_err(|e| format!("cannot share the dirty log: {e}"))?,
            ),
            size: device_log.size(),
        };
        if let Err(e) = self.devices.set_dirty_logging(Some(&share)) {
            let _ = self.devices.set_dirty_logging(None);
            return Err(format!("cannot log the devices' writes: {e}"));
        }
        let disks = match self.devices.start_block_migration(block) {
            Ok(disks) => disks,
            Err(e) => {
                let _ = self.devices.set_dirty_logging(None);
                return Err(e.to_string());
            }
        };
        if let Err(e) = self.accel.start_dirty_log() {
            let _ = self.devices.set_dirty_logging(None);
            self.devices.stop_block_migration();
            return Err(format!("cannot log the guest's writes: {e}"));
        }
        // Compiled code that ran before logging started stores on its own: let every vCPU
        // leave the guest once, so that all later writes are logged.
        let _ = self.cpus.snapshots();
        Ok((device_log, disks))
    }

    /// What a local migration hands over: the guest RAM memfd and the devices' host
    /// resources (each a copy of our fd).
    fn local_resources(&self) -> Result<LocalFds, String> {
        let ram = self
            .memory
            .memfd()
            .try_clone()
            .map_err(|e| format!("cannot hand the guest memory over: {e}"))?;
        let mut fds: LocalFds = vec![(LocalItem::Ram, OwnedFd::from(ram))];
        fds.extend(self.devices.local_resources().map_err(|e| e.to_string())?);
        Ok(fds)
    }

    /// A local migration's offer, on the destination: the guest RAM must be ours in size,
    /// and the devices' resources ours in kind; the disks' images are taken over at once,
    /// the rest when the state arrives.
    fn prepare_local(&mut self, fds: LocalFds) -> Result<(), String> {
        let Some((_, ram)) = fds.iter().find(|(item, _)| *item == LocalItem::Ram) else {
            return Err("the source hands over no guest memory".into());
        };
        let size = std::fs::File::from(ram.try_clone().map_err(|e| e.to_string())?)
            .metadata()
            .map_err(|e| e.to_string())?
            .len();
        if size != self.config.memory_size {
            return Err(format!(
                "the source has {} MiB of RAM, this VM {} MiB",
                size >> 20,
                self.config.memory_size >> 20
            ));
        }
        let fds = self.devices.prepare_local(fds).map_err(|e| e.to_string())?;
        // Nothing runs on this VM's memory yet: it can become the source's now, out of
        // the downtime.
        self.adopt_local_memory(&fds)?;
        self.incoming_local = Some(fds);
        Ok(())
    }

    /// The sending thread is done: completed leaves the source stopped (postmigrate);
    /// otherwise it runs again if it ran before.
    fn migration_finished(&mut self, completed: bool) {
        self.accel.stop_dirty_log();
        self.devices.stop_block_migration();
        self.devices.set_vram_moves(false);
        if let Err(e) = self.devices.set_dirty_logging(None) {
            tracing::warn!("migration: cannot stop the devices' dirty logging: {e}");
        }
        *lock(&self.migration.shutdown) = None;
        if completed {
            self.run_state = RunState::PostMigrate;
            return;
        }
        if self.run_state == RunState::FinishMigrate {
            // The devices' queues were stopped with their state, and the disks' locks
            // released: both come back.
            if let Err(e) = self.devices.activate_images() {
                tracing::error!("migration failed, and the disks cannot be locked again: {e}");
            }
            self.devices.resume_after_migration();
            self.run_state = RunState::Paused;
            if self.migration_was_running {
                let _ = self.cont();
            }
        }
    }

    /// Every section: the platform, each vCPU, each device (vCPUs stopped).
    fn save_sections(&mut self) -> Result<Vec<(String, Vec<u8>)>, String> {
        let mut sections = Vec::new();
        let platform = self
            .accel
            .save_platform()
            .map_err(|e| format!("saving the platform: {e}"))?;
        sections.push((PLATFORM_SECTION.to_string(), platform));
        let cpus = self.cpus.save_state().map_err(|e| e.to_string())?;
        for (i, state) in cpus.into_iter().enumerate() {
            sections.push((cpu_section(i), state));
        }
        for (name, device) in &self.migrating_devices() {
            let state = lock(device)
                .save()
                .map_err(|e| format!("saving {name}: {e}"))?;
            sections.push((name.clone(), state));
        }
        Ok(sections)
    }

    /// Take the sections back: the platform (guest time first), the vCPUs, the devices;
    /// then run if the guest ran on the source and this vmm may start it.
    fn restore_sections(
        &mut self,
        sections: Vec<(String, Vec<u8>)>,
        running: bool,
    ) -> Result<(), String> {
        let find = |name: &str| {
            sections
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.as_slice())
                .ok_or_else(|| format!("the stream has no state for {name}"))
        };
        // A local migration: the memory is the source's already (adopted with its offer).
        let local = self.incoming_local.take();
        let t = std::time::Instant::now();
        if local.is_some() {
            self.devices.set_vram_moves(true);
        }
        // The source let go of the disks: they are ours now (refused if someone else
        // took them meanwhile).
        self.devices.activate_images().map_err(|e| e.to_string())?;
        tracing::debug!("images activated at {:?}", t.elapsed());
        self.accel
            .restore_platform(find(PLATFORM_SECTION)?)
            .map_err(|e| format!("restoring the platform: {e}"))?;
        let cpus = (0..self.cpus.num_vcpus())
            .map(|i| find(&cpu_section(i)).map(<[u8]>::to_vec))
            .collect::<Result<Vec<_>, _>>()?;
        self.cpus.restore_state(cpus).map_err(|e| e.to_string())?;
        tracing::debug!("platform and vCPUs restored at {:?}", t.elapsed());
        for (name, device) in &self.migrating_devices() {
            let t = std::time::Instant::now();
            lock(device)
                .restore(find(name)?)
                .map_err(|e| format!("restoring {name}: {e}"))?;
            tracing::debug!("restored {name} in {:?}", t.elapsed());
        }
        self.devices.set_vram_moves(false);
        // The configuration spaces say where the BARs are: route them there.
        lock(&self.pci).reroute_all();
        tracing::debug!("devices restored at {:?}", t.elapsed());
        self.run_state = RunState::Paused;
        if running && self.incoming_autostart {
            self.cont().map_err(|e| e.desc)?;
        }
        // The disks a block migration wrote are complete copies once they are synced.
        self.devices.finish_incoming_disks();
        tracing::debug!("running at {:?}", t.elapsed());
        // The display process maps the framebuffer anew: the guest need not wait for it,
        // nor the source to hear that the guest runs here.
        if let Some(fds) = local {
            self.control
                .request(MachineRequest::Run(Box::new(FnJob::new(move |m| {
                    if let Err(e) = m.devices.adopt_local_devices(fds) {
                        tracing::error!(
                            "local migration: cannot serve the handed-over devices: {e}"
                        );
                    }
                    None
                }))));
        }
        Ok(())
    }

    /// A local migration's guest RAM and framebuffer become the source's memfds (mapped
    /// where ours were).
    fn adopt_local_memory(&self, fds: &LocalFds) -> Result<(), String> {
        for (item, fd) in fds {
            if *item == LocalItem::Ram {
                self.memory
                    .adopt(fd)
                    .map_err(|e| format!("cannot take the source's memory over: {e}"))?;
            }
        }
        self.devices
            .adopt_local_vram(fds)
            .map_err(|e| e.to_string())
    }

    /// `-incoming defer`: wait in inmigrate for `migrate-incoming` to name the URI.
    pub fn defer_incoming(&mut self, autostart: bool) {
        self.run_state = RunState::InMigrate;
        self.incoming_autostart = autostart;
        self.incoming_deferred = true;
    }

    /// QMP `migrate-incoming` (after `-incoming defer`).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), String> {
        if !self.incoming_deferred {
            return Err(if self.run_state == RunState::InMigrate {
                "The incoming migration has already been started".into()
            } else {
                "'-incoming' was not specified on the command line".into()
            });
        }
        self.start_incoming(uri, self.incoming_autostart)?;
        self.incoming_deferred = false;
        Ok(())
    }

    /// `-incoming URI`: wait for a source (listening at once) instead of starting; the
    /// guest runs when its state has arrived (unless `autostart` is off: -S).
    pub fn start_incoming(&mut self, uri: &str, autostart: bool) -> Result<(), String> {
        let parsed = MigrationUri::parse(uri).map_err(|e| e.to_string())?;
        let incoming = uri::listen(&parsed, None).map_err(|e| e.to_string())?;
        self.run_state = RunState::InMigrate;
        self.incoming_autostart = autostart;
        let m = IncomingMigration {
            incoming,
            ram: RamPages::new(self.memory.guest_memory().clone()),
            expected: self.migration_header(false),
            host: Box::new(MachineDestination {
                control: self.control.clone(),
            }),
        };
        std::thread::Builder::new()
            .name("incoming".into())
            .spawn(move || migration::destination::run(m))
            .map(|_| ())
            .map_err(|e| format!("cannot start the incoming migration thread: {e}"))
    }
}
