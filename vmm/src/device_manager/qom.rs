//! qom-get and qom-set on the devices' QOM paths, as QEMU 7.2 resolves them: a device by
//! its absolute path (`/machine/peripheral/ID`, `/machine/peripheral-anon/device[N]`, and
//! the balloon's `.../virtio-backend` child), or by a partial path that ends one path and
//! no other. Every device has `type`; the balloon has its statistics properties.

use serde_json::{json, Value};

use super::balloon::Balloon;
use super::{peripheral_path, DeviceManager};

#[derive(Debug, thiserror::Error)]
pub enum QomError {
    /// QMP's DeviceNotFound.
    #[error("Device '{0}' not found")]
    NotFound(String),
    #[error("Property '{type_name}.{property}' not found")]
    NoProperty { type_name: String, property: String },
    #[error("{0}")]
    Generic(String),
}

/// What a QOM path named.
enum Target {
    /// The balloon's PCI function, or (`true`) its virtio device.
    Balloon(bool),
    /// Another device, by its driver.
    Device(String),
}

impl Target {
    fn type_name(&self) -> String {
        match self {
            Target::Balloon(backend) => Balloon::qom_type(*backend).to_string(),
            Target::Device(driver) => driver.clone(),
        }
    }
}

impl DeviceManager {
    /// Every object a path may name, with its absolute path.
    fn qom_objects(&self) -> Vec<(String, Target)> {
        let mut objects = Vec::new();
        if let Some(b) = &self.balloon {
            objects.push((b.path.clone(), Target::Balloon(false)));
            objects.push((format!("{}/virtio-backend", b.path), Target::Balloon(true)));
        }
        for (slot, f) in &self.functions {
            if self.balloon.as_ref().is_some_and(|b| b.slot == *slot) {
                continue;
            }
            if let Some(id) = &f.id {
                objects.push((peripheral_path(id), Target::Device(f.driver.clone())));
            }
        }
        objects
    }

    fn qom_resolve(&self, path: &str) -> Result<Target, QomError> {
        let suffix = format!("/{path}");
        let mut found = self.qom_objects().into_iter().filter(|(p, _)| {
            if path.starts_with('/') {
                p == path
            } else {
                p.ends_with(&suffix)
            }
        });
        match (found.next(), found.next()) {
            (Some((_, target)), None) => Ok(target),
            // Nothing, or a partial path that fits more than one object.
            _ => Err(QomError::NotFound(path.to_string())),
        }
    }

    /// qom-get `property` of the object at `path`.
    pub fn qom_get(&self, path: &str, property: &str) -> Result<Value, QomError> {
        let target = self.qom_resolve(path)?;
        if property == "type" {
            return Ok(json!(target.type_name()));
        }
        let value = match (&target, &self.balloon) {
            (Target::Balloon(_), Some(b)) => b.qom_get(property),
            _ => None,
        };
        value.ok_or_else(|| QomError::NoProperty {
            type_name: target.type_name(),
            property: property.to_string(),
        })
    }

    /// qom-set `property` of the object at `path` to `value`.
    pub fn qom_set(&mut self, path: &str, property: &str, value: &Value) -> Result<(), QomError> {
        let target = self.qom_resolve(path)?;
        if property == "type" {
            return Err(QomError::Generic(format!(
                "Property '{}.type' is not writable",
                target.type_name()
            )));
        }
        let result = match (&target, &mut self.balloon) {
            (Target::Balloon(_), Some(b)) => b.qom_set(property, value),
            _ => None,
        };
        result.unwrap_or_else(|| {
            Err(QomError::NoProperty {
                type_name: target.type_name(),
                property: property.to_string(),
            })
        })
    }
}
