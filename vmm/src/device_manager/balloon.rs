//! The memory balloon (`virtio-balloon-pci`, QEMU 1.1's `-balloon virtio`): balloon and
//! query-balloon as QEMU 7.2 has them. The device itself (in the vmm, see
//! [`crate::virtio::balloon`]) releases the pages.

use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::{lock, DeviceConfig, DeviceError, DeviceManager};
use crate::virtio::balloon::VirtioBalloon;
use crate::virtio::pci::VirtioPciDevice;

/// PCI class of the balloon, as QEMU gives it (others).
const CLASS_OTHERS: (u8, u8) = (0xff, 0x00);

/// QEMU's words when there is no balloon.
pub const NO_BALLOON: &str = "No balloon device has been activated";

fn on_off(cfg: &DeviceConfig, property: &str) -> Result<bool, DeviceError> {
    match cfg.properties.get(property).map(String::as_str) {
        None | Some("off" | "false") => Ok(false),
        Some("on" | "true") => Ok(true),
        Some(other) => Err(DeviceError::InvalidProperty {
            driver: cfg.driver.clone(),
            property: property.to_string(),
            value: other.to_string(),
        }),
    }
}

impl DeviceManager {
    /// `-device virtio-balloon-pci[,deflate-on-oom=on][,free-page-reporting=on]`.
    pub(super) fn add_virtio_balloon(
        &mut self,
        cfg: &DeviceConfig,
    ) -> Result<Option<u8>, DeviceError> {
        if self.balloon.is_some() {
            return Err(DeviceError::Balloon(
                "Only one balloon device is supported".into(),
            ));
        }
        let deflate_on_oom = on_off(cfg, "deflate-on-oom")?;
        let reporting = on_off(cfg, "free-page-reporting")?;
        let balloon = VirtioBalloon::new(
            self.memory.clone(),
            deflate_on_oom,
            reporting,
            self.events.clone(),
        );
        let name = cfg.id.clone().unwrap_or_else(|| "virtio-balloon".into());
        let (slot, function) =
            self.plug_virtio(cfg, &name, Box::new(balloon), CLASS_OTHERS, None)?;
        self.balloon = Some((slot, function));
        Ok(Some(slot))
    }

    fn balloon_function(&self) -> Option<&Arc<Mutex<VirtioPciDevice>>> {
        self.balloon.as_ref().map(|(_, f)| f)
    }

    /// `balloon value`: leave the guest `target` bytes. `Err(None)`: there is no balloon.
    pub fn set_balloon(&self, target: u64) -> Result<(), Option<DeviceError>> {
        let function = self.balloon_function().ok_or(None)?;
        let mut function = lock(function);
        let changed = function
            .backend_mut()
            .as_balloon()
            .map(|b| b.set_target(target))
            .ok_or(None)?;
        if changed {
            function.config_changed();
        }
        Ok(())
    }

    /// `query-balloon`, or None without a balloon.
    pub fn query_balloon(&self) -> Option<Value> {
        let mut function = lock(self.balloon_function()?);
        function.backend_mut().as_balloon().map(|b| b.query())
    }

    /// The balloon in `slot` was unplugged.
    pub(super) fn remove_balloon(&mut self, slot: u8) {
        if self.balloon.as_ref().is_some_and(|(s, _)| *s == slot) {
            self.balloon = None;
        }
    }
}
