//! Interrupt routing shared by both accelerators. Devices hold an [`IrqLine`]; the
//! accelerator supplies the [`IrqChip`] behind it (KVM's in-kernel IOAPIC/PIC, or the emu's
//! own models).

use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    #[error("GSI {0} is out of range")]
    InvalidGsi(u32),
    #[error("failed to set the level of GSI {gsi}: {source}")]
    SetLevel {
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Something that can drive the level of a global system interrupt (GSI).
pub trait IrqChip: Send + Sync {
    fn set_irq_level(&self, gsi: u32, level: bool) -> Result<(), InterruptError>;
}

/// One interrupt line of a device, wired to a GSI.
#[derive(Clone)]
pub struct IrqLine {
    chip: Arc<dyn IrqChip>,
    gsi: u32,
}

impl IrqLine {
    pub fn new(chip: Arc<dyn IrqChip>, gsi: u32) -> Self {
        Self { chip, gsi }
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Raise and lower the line: one edge for an edge-triggered interrupt.
    pub fn pulse(&self) -> Result<(), InterruptError> {
        self.chip.set_irq_level(self.gsi, true)?;
        self.chip.set_irq_level(self.gsi, false)
    }

    /// Hold the line at `level`, for level-triggered interrupts.
    pub fn set_level(&self, level: bool) -> Result<(), InterruptError> {
        self.chip.set_irq_level(self.gsi, level)
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;
    use std::sync::Mutex;

    /// An irqchip that records every level change, for device unit tests.
    #[derive(Default)]
    pub struct RecordingIrqChip {
        pub events: Mutex<Vec<(u32, bool)>>,
    }

    impl IrqChip for RecordingIrqChip {
        fn set_irq_level(&self, gsi: u32, level: bool) -> Result<(), InterruptError> {
            self.events.lock().unwrap().push((gsi, level));
            Ok(())
        }
    }

    impl RecordingIrqChip {
        /// Number of rising edges seen on `gsi`.
        pub fn edges(&self, gsi: u32) -> usize {
            self.events
                .lock()
                .unwrap()
                .iter()
                .filter(|(g, l)| *g == gsi && *l)
                .count()
        }
    }
}
