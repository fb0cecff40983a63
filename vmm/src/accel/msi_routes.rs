//! MSI routes: GSIs above the IOAPIC's pins that stand for one MSI message each, as in
//! KVM's GSI routing. An irqfd registered on such a GSI delivers the message whenever its
//! eventfd is signalled, so a device's interrupts need no vmm thread.

use std::collections::BTreeMap;
use std::sync::RwLock;

use crate::arch::layout;

/// How many MSI routes a VM may hold (one per queue vector of every device).
pub const MAX_MSI_ROUTES: u32 = 1024;

/// First GSI used for MSI routes: the IOAPIC's pins come before.
pub const FIRST_MSI_GSI: u32 = layout::IOAPIC_NUM_PINS;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsiRouteError {
    #[error("all {MAX_MSI_ROUTES} MSI routes are in use")]
    Full,
    #[error("GSI {0} is not an MSI route")]
    NotRoute(u32),
}

/// The message of each MSI route, by GSI.
#[derive(Default)]
pub struct MsiRoutes {
    routes: RwLock<BTreeMap<u32, (u64, u32)>>,
}

impl MsiRoutes {
    /// A new route for `address`/`data`: its GSI.
    pub fn add(&self, address: u64, data: u32) -> Result<u32, MsiRouteError> {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        let gsi = (FIRST_MSI_GSI..FIRST_MSI_GSI + MAX_MSI_ROUTES)
            .find(|g| !routes.contains_key(g))
            .ok_or(MsiRouteError::Full)?;
        routes.insert(gsi, (address, data));
        Ok(gsi)
    }

    /// Point route `gsi` at a new message.
    pub fn set(&self, gsi: u32, address: u64, data: u32) -> Result<(), MsiRouteError> {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        let route = routes.get_mut(&gsi).ok_or(MsiRouteError::NotRoute(gsi))?;
        *route = (address, data);
        Ok(())
    }

    pub fn remove(&self, gsi: u32) -> Result<(), MsiRouteError> {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        routes
            .remove(&gsi)
            .map(|_| ())
            .ok_or(MsiRouteError::NotRoute(gsi))
    }

    /// The message of route `gsi`.
    pub fn get(&self, gsi: u32) -> Option<(u64, u32)> {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        routes.get(&gsi).copied()
    }

    /// Every route, in GSI order.
    pub fn all(&self) -> Vec<(u32, u64, u32)> {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        routes.iter().map(|(g, (a, d))| (*g, *a, *d)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_take_the_lowest_free_gsi() {
        let r = MsiRoutes::default();
        let a = r.add(0xfee0_0000, 0x41).unwrap();
        let b = r.add(0xfee0_1000, 0x42).unwrap();
        assert_eq!((a, b), (FIRST_MSI_GSI, FIRST_MSI_GSI + 1));
        r.remove(a).unwrap();
        assert_eq!(r.add(0xfee0_0000, 0x43).unwrap(), a);
        r.set(b, 0xfee0_0000, 0x44).unwrap();
        assert_eq!(r.get(b), Some((0xfee0_0000, 0x44)));
        assert_eq!(r.remove(5), Err(MsiRouteError::NotRoute(5)));
        assert_eq!(r.set(5, 0, 0), Err(MsiRouteError::NotRoute(5)));
        assert_eq!(r.all().len(), 2);
        for _ in 0..MAX_MSI_ROUTES - 2 {
            r.add(0, 0).unwrap();
        }
        assert_eq!(r.add(0, 0), Err(MsiRouteError::Full));
    }
}
