//! The older ways to give a guest a network card: `-net nic` with `-net TYPE`, and
//! `-nic TYPE`. QEMU joins a `-net nic` and a `-net TYPE` through a hub; here the n-th
//! card takes the n-th backend directly, which is what the pair is used for. Their
//! netdevs get internal ids (`#net0`, ...) that no user id can take.

use super::{parse, NetdevOptions};
use crate::config::VmConfig;
use crate::device_manager::DeviceConfig;

/// The card models these options may ask for.
const MODELS: &[&str] = &["virtio", "virtio-net-pci"];

#[derive(Default)]
pub struct LegacyNet {
    /// `-net nic` cards: their option text, MAC and id.
    nics: Vec<(String, Option<String>, Option<String>)>,
    /// `-net TYPE` backends.
    backends: Vec<(String, NetdevOptions)>,
    /// `-nic TYPE`: a backend and its card together.
    pairs: Vec<(String, NetdevOptions, Option<String>, Option<String>)>,
}

/// `TYPE,key=value,...` without an id, as a netdev with id `id`.
fn backend(text: &str, id: &str) -> Result<NetdevOptions, String> {
    let (kind, rest) = text.split_once(',').unwrap_or((text, ""));
    let mut opts = parse(&format!("{kind},id=placeholder,{rest}")).map_err(|e| e.to_string())?;
    opts.id = id.to_string();
    Ok(opts)
}

/// Take `model=`, `macaddr=`/`mac=` and `id=` out of `text`; the rest is left.
fn card_options(
    text: &str,
    mac_key: &str,
) -> Result<(String, Option<String>, Option<String>), String> {
    let mut rest = Vec::new();
    let (mut mac, mut id) = (None, None);
    for part in crate::chardev::split_options(text) {
        let (key, value) = crate::chardev::split_key_value(&part);
        match (key, value) {
            ("model", Some(m)) if MODELS.contains(&m) => {}
            ("model", m) => {
                return Err(format!(
                    "unsupported NIC model '{}': only virtio-net-pci is served",
                    m.unwrap_or("")
                ))
            }
            (k, Some(v)) if k == mac_key => mac = Some(v.to_string()),
            ("id", Some(v)) => id = Some(v.to_string()),
            ("vlan", _) | ("name", _) => {}
            _ => rest.push(part.replace(',', ",,")),
        }
    }
    Ok((rest.join(","), mac, id))
}

impl LegacyNet {
    /// A `-net` option.
    pub fn net(&mut self, text: &str) -> Result<(), String> {
        let kind = text.split(',').next().unwrap_or("");
        if kind == "nic" {
            let (rest, mac, id) = card_options(text, "macaddr")?;
            if let Some(extra) = rest.strip_prefix("nic").filter(|r| !r.is_empty()) {
                return Err(format!(
                    "Invalid parameter '{}'",
                    extra.trim_start_matches(',')
                ));
            }
            self.nics.push((text.to_string(), mac, id));
            return Ok(());
        }
        let id = format!("#net{}", self.backends.len());
        self.backends.push((text.to_string(), backend(text, &id)?));
        Ok(())
    }

    /// A `-nic` option.
    pub fn nic(&mut self, text: &str) -> Result<(), String> {
        let (rest, mac, id) = card_options(text, "mac")?;
        let netdev_id = format!("#nic{}", self.pairs.len());
        let opts = backend(&rest, &netdev_id)?;
        self.pairs.push((text.to_string(), opts, mac, id));
        Ok(())
    }

    /// The netdevs and cards, into the configuration.
    pub fn finish(self, cfg: &mut VmConfig) -> Result<(), String> {
        let mut backends = self.backends.into_iter();
        for (text, mac, id) in self.nics {
            let netdev = backends.next().map(|(option, opts)| {
                let id = opts.id.clone();
                cfg.netdevs.push((format!("-net {option}"), opts));
                id
            });
            cfg.devices
                .push((format!("-net {text}"), card(netdev.as_deref(), mac, id)?));
        }
        for (option, opts) in backends {
            cfg.netdevs.push((format!("-net {option}"), opts));
        }
        for (text, opts, mac, id) in self.pairs {
            let netdev = opts.id.clone();
            cfg.netdevs.push((format!("-nic {text}"), opts));
            cfg.devices
                .push((format!("-nic {text}"), card(Some(&netdev), mac, id)?));
        }
        Ok(())
    }
}

fn card(
    netdev: Option<&str>,
    mac: Option<String>,
    id: Option<String>,
) -> Result<DeviceConfig, String> {
    let mut text = "virtio-net-pci".to_string();
    if let Some(netdev) = netdev {
        text += &format!(",netdev={netdev}");
    }
    if let Some(mac) = mac {
        text += &format!(",mac={mac}");
    }
    if let Some(id) = id {
        text += &format!(",id={id}");
    }
    crate::device_manager::parse_device(&text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cards_take_backends_in_order() {
        let mut legacy = LegacyNet::default();
        legacy
            .net("nic,model=virtio,macaddr=52:54:00:00:00:01")
            .unwrap();
        legacy.net("user,restrict=on").unwrap();
        legacy
            .nic("user,model=virtio-net-pci,mac=52:54:00:00:00:02")
            .unwrap();
        let mut cfg = VmConfig::default();
        legacy.finish(&mut cfg).unwrap();
        let ids: Vec<&str> = cfg.netdevs.iter().map(|(_, n)| n.id.as_str()).collect();
        assert_eq!(ids, ["#net0", "#nic0"]);
        assert_eq!(cfg.netdevs[0].1.flag("restrict"), Some(true));
        assert_eq!(
            cfg.devices[0]
                .1
                .properties
                .get("netdev")
                .map(String::as_str),
            Some("#net0")
        );
        assert_eq!(
            cfg.devices[1].1.properties.get("mac").map(String::as_str),
            Some("52:54:00:00:00:02")
        );
        assert!(LegacyNet::default().net("nic,model=e1000").is_err());
    }
}
