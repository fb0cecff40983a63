//! `-device` and `device_add` arguments: a driver, its id and its properties, checked
//! against the driver table ([`super::DRIVERS`]).

use std::collections::BTreeMap;

use super::DeviceError;
use crate::chardev::{split_key_value, split_options};

/// One `-device` (or `device_add`): a driver and its properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub driver: String,
    pub id: Option<String>,
    pub properties: BTreeMap<String, String>,
}

/// Parse a `-device` value (`driver,key=value,...`).
pub fn parse_device(value: &str) -> Result<DeviceConfig, DeviceError> {
    let mut parts = split_options(value).into_iter();
    let first = parts.next().unwrap_or_default();
    let driver = first.strip_prefix("driver=").unwrap_or(&first).to_string();
    let properties = parts.filter(|p| !p.is_empty()).map(|part| {
        let (key, v) = split_key_value(&part);
        (key.to_string(), v.unwrap_or("on").to_string())
    });
    device_config(driver, properties)
}

/// QMP device_add's arguments (`driver`, `id`, `bus` and the properties) as a device.
pub fn device_config_from_qmp(
    args: &serde_json::Map<String, serde_json::Value>,
) -> Result<DeviceConfig, DeviceError> {
    let driver = args
        .get("driver")
        .and_then(serde_json::Value::as_str)
        .ok_or(DeviceError::MissingDriver)?
        .to_string();
    let properties = args.iter().filter(|(k, _)| *k != "driver").map(|(k, v)| {
        let v = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            other => other.to_string(),
        };
        (k.clone(), v)
    });
    device_config(driver, properties)
}

/// Check `driver` and its properties against the driver table.
fn device_config(
    driver: String,
    properties: impl Iterator<Item = (String, String)>,
) -> Result<DeviceConfig, DeviceError> {
    let Some(allowed) = super::driver(&driver).map(|d| d.properties) else {
        return Err(DeviceError::UnknownDriver(driver));
    };
    let mut cfg = DeviceConfig {
        driver: driver.clone(),
        id: None,
        properties: BTreeMap::new(),
    };
    for (key, v) in properties {
        let key = key.as_str();
        match key {
            "id" => cfg.id = Some(v),
            "bus" | "addr" => {
                cfg.properties.insert(key.to_string(), v);
            }
            k if allowed.contains(&k) => {
                cfg.properties.insert(key.to_string(), v);
            }
            _ => {
                return Err(DeviceError::UnknownProperty {
                    driver,
                    property: key.to_string(),
                })
            }
        }
    }
    Ok(cfg)
}

impl DeviceConfig {
    pub(super) fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, DeviceError> {
        let Some(v) = self.properties.get(key) else {
            return Ok(None);
        };
        let parsed = match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok().map(|n| n.to_string()),
            None => Some(v.clone()),
        };
        parsed
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| DeviceError::InvalidProperty {
                driver: self.driver.clone(),
                property: key.to_string(),
                value: v.clone(),
            })
    }

    /// The PCI slot from `addr=SLOT[.FN]`, and a check of `bus=`.
    pub(super) fn pci_slot(&self) -> Result<Option<u8>, DeviceError> {
        if let Some(bus) = self.properties.get("bus") {
            if bus != "pci.0" {
                return Err(DeviceError::BusNotFound(bus.clone()));
            }
        }
        let Some(addr) = self.properties.get("addr") else {
            return Ok(None);
        };
        let (slot, function) = addr.split_once('.').unwrap_or((addr, "0"));
        let slot = u8::from_str_radix(slot.trim_start_matches("0x"), 16).ok();
        match (slot, function) {
            (Some(s), "0") if s < 32 => Ok(Some(s)),
            _ => Err(DeviceError::InvalidProperty {
                driver: self.driver.clone(),
                property: "addr".into(),
                value: addr.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_options() {
        let d = parse_device("virtio-blk-pci,drive=d0,id=disk0,addr=0x5,num-queues=2").unwrap();
        assert_eq!(d.driver, "virtio-blk-pci");
        assert_eq!(d.id.as_deref(), Some("disk0"));
        assert_eq!(d.pci_slot().unwrap(), Some(5));
        assert_eq!(d.number::<u16>("num-queues").unwrap(), Some(2));
        assert_eq!(
            parse_device("e1000").unwrap_err().to_string(),
            "'e1000' is not a valid device model name"
        );
        assert_eq!(
            parse_device("virtio-blk-pci,foo=1")
                .unwrap_err()
                .to_string(),
            "Property 'virtio-blk-pci.foo' not found"
        );
        let bad = parse_device("virtio-blk-pci,drive=d,addr=0x40").unwrap();
        assert!(bad.pci_slot().is_err());
        let bus = parse_device("virtio-blk-pci,drive=d,bus=pci.1").unwrap();
        assert_eq!(
            bus.pci_slot().unwrap_err().to_string(),
            "Bus 'pci.1' not found"
        );
        let n = parse_device("virtio-blk-pci,num-queues=x").unwrap();
        assert!(n.number::<u16>("num-queues").is_err());
    }
}
