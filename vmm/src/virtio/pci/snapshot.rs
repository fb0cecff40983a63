//! The transport's state for live migration: the PCI configuration space, the common
//! configuration the driver programmed (status, features, each queue), the MSI-X table and
//! vectors, the ISR, and the backend's own state. On the destination the same device,
//! built from the same options, takes it and its backend starts where the source stopped.

use serde::{Deserialize, Serialize};

use super::{lock, QueueState, VirtioPciDevice, STATUS_DRIVER_OK};
use crate::snapshot::{decode, encode, SnapshotError, Snapshottable};
use crate::virtio::msix::MsixTable;

const WHAT: &str = "a virtio PCI function";

#[derive(Serialize, Deserialize)]
struct SavedQueue {
    size: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

#[derive(Serialize, Deserialize)]
struct TransportState {
    registers: Vec<u32>,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    config_generation: u8,
    queues: Vec<SavedQueue>,
    msix: MsixTable,
    queue_vectors: Vec<u16>,
    config_vector: u16,
    isr: u8,
    backend: Vec<u8>,
}

fn invalid(message: impl Into<String>) -> SnapshotError {
    SnapshotError::Decode {
        what: WHAT,
        message: message.into(),
    }
}

impl VirtioPciDevice {
    /// Why this function cannot move with a migration yet, if it cannot.
    pub fn migration_blocker(&self) -> Option<String> {
        self.backend.migration_blocker()
    }

    /// A migration failed after the state was saved: the backend's queues run again.
    pub fn resume_after_save(&mut self) {
        if self.status & STATUS_DRIVER_OK != 0 {
            self.backend.resume_after_save();
        }
    }
}

impl Snapshottable for VirtioPciDevice {
    fn save(&mut self) -> Result<Vec<u8>, SnapshotError> {
        let backend = if self.status & STATUS_DRIVER_OK != 0 {
            self.backend.save_state()?
        } else {
            Vec::new()
        };
        let irq = lock(&self.interrupt);
        encode(
            WHAT,
            &TransportState {
                registers: self.config.registers().to_vec(),
                status: self.status,
                device_feature_select: self.device_feature_select,
                driver_feature_select: self.driver_feature_select,
                driver_features: self.driver_features,
                queue_select: self.queue_select,
                config_generation: self.config_generation,
                queues: self
                    .queues
                    .iter()
                    .map(|q| SavedQueue {
                        size: q.size,
                        enabled: q.enabled,
                        desc: q.desc,
                        avail: q.avail,
                        used: q.used,
                    })
                    .collect(),
                msix: irq.msix.clone(),
                queue_vectors: irq.queue_vectors.clone(),
                config_vector: irq.config_vector,
                isr: irq.isr(),
                backend,
            },
        )
    }

    /// Take the state into this (freshly built) function: the configuration space, the
    /// driver's settings and interrupts, then, if the driver had started the device, the
    /// backend resumes on the same queues and takes its own state. The bus routes the
    /// BARs afterwards (`PciBus::reroute`).
    fn restore(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let s: TransportState = decode(WHAT, state)?;
        if s.queues.len() != self.queues.len() || s.queue_vectors.len() != self.queues.len() {
            return Err(invalid(format!(
                "{} queues saved, this device has {}",
                s.queues.len(),
                self.queues.len()
            )));
        }
        {
            let irq = lock(&self.interrupt);
            if s.msix.num_vectors() != irq.msix.num_vectors() {
                return Err(invalid("the MSI-X table has another size"));
            }
        }
        for (q, max) in s.queues.iter().zip(&self.queue_max_sizes) {
            if q.size > *max {
                return Err(invalid(format!("a queue of {} entries", q.size)));
            }
        }
        self.config
            .set_registers(&s.registers)
            .map_err(|e| invalid(e.to_string()))?;
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.driver_features = s.driver_features;
        self.queue_select = s.queue_select;
        self.config_generation = s.config_generation;
        for (q, saved) in self.queues.iter_mut().zip(&s.queues) {
            *q = QueueState {
                size: saved.size,
                enabled: saved.enabled,
                desc: saved.desc,
                avail: saved.avail,
                used: saved.used,
            };
        }
        {
            let mut irq = lock(&self.interrupt);
            irq.msix = s.msix;
            irq.queue_vectors = s.queue_vectors;
            irq.config_vector = s.config_vector;
            irq.set_isr(s.isr);
        }
        self.status = s.status;
        if s.status & STATUS_DRIVER_OK != 0 {
            self.activate(true).map_err(|e| invalid(e.to_string()))?;
            self.backend.restore_state(&s.backend)?;
        }
        self.refresh_interrupt_paths();
        if self.status & STATUS_DRIVER_OK != 0 && self.backend.config_changed_after_restore() {
            self.config_changed();
        }
        Ok(())
    }
}
