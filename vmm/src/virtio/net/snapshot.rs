//! What a NIC carries across a live migration: the address the guest set, the link, the
//! queue pairs in use, the RX filter its control queue programmed (QEMU's MAC table and
//! VLAN filter), and where the control queue stands. The data queues stop in `vmm-net`
//! (GET_VRING_BASE) and start again on the destination's from the used rings. Once the
//! guest runs there, it is asked to announce itself (VIRTIO_NET_S_ANNOUNCE), so that the
//! network learns where its address went.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_ANNOUNCE;
use virtio_queue::QueueT;

use super::{RxState, VirtioNet, MAX_VLAN};
use crate::snapshot::{decode, encode, SnapshotError};
use crate::virtio::VirtioBackend;

const WHAT: &str = "a virtio-net card";

#[derive(Serialize, Deserialize)]
pub(super) struct NetState {
    mac: [u8; 6],
    link_up: bool,
    pairs: u16,
    rx: RxState,
    notify_armed: bool,
    /// The control queue's next available and used indices.
    ctrl: Option<(u16, u16)>,
}

fn invalid(message: impl Into<String>) -> SnapshotError {
    SnapshotError::Decode {
        what: WHAT,
        message: message.into(),
    }
}

impl VirtioNet {
    /// The state, with the data queues stopped.
    pub(super) fn save_net(&mut self) -> Result<Vec<u8>, SnapshotError> {
        if let Some(vhost) = &mut self.vhost {
            vhost.save_state()?;
        }
        encode(
            WHAT,
            &NetState {
                mac: self.mac,
                link_up: self.link_up,
                pairs: self.pairs,
                rx: self.rx.clone(),
                notify_armed: self.notify_armed,
                ctrl: self
                    .ctrl
                    .as_ref()
                    .map(|c| (c.queue.next_avail(), c.queue.next_used())),
            },
        )
    }

    /// Take the state after the resumed activation: the backend gets the filter and the
    /// pairs, and the guest will announce itself.
    pub(super) fn restore_net(&mut self, state: &[u8]) -> Result<(), SnapshotError> {
        let s: NetState = decode(WHAT, state)?;
        if s.rx.vlans.len() != MAX_VLAN {
            return Err(invalid(format!("a VLAN table of {}", s.rx.vlans.len())));
        }
        if s.pairs == 0 || s.pairs > self.max_pairs {
            return Err(invalid(format!(
                "{} queue pairs in use, this card has {}",
                s.pairs, self.max_pairs
            )));
        }
        self.mac = s.mac;
        self.link_up = s.link_up;
        self.pairs = s.pairs;
        self.rx = s.rx;
        self.notify_armed = s.notify_armed;
        if let (Some(ctrl), Some((avail, used))) = (&mut self.ctrl, s.ctrl) {
            ctrl.queue.set_next_avail(avail);
            ctrl.queue.set_next_used(used);
        }
        self.apply_pairs();
        if let Some(backend) = &self.sink.backend {
            backend(self.rx_filter());
        }
        // QEMU's post-load: a guest that can announce itself is asked to.
        self.announce = self.has(VIRTIO_NET_F_GUEST_ANNOUNCE) && self.link_up;
        Ok(())
    }

    /// The guest is asked to announce itself after a move: the driver must read the
    /// status again.
    pub(super) fn announce_pending(&self) -> bool {
        self.announce
    }

    /// A failed migration: the data queues run again.
    pub(super) fn resume_net(&mut self) {
        if let Some(vhost) = &mut self.vhost {
            vhost.resume_after_save();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::nic;
    use super::*;
    use virtio_bindings::virtio_net::*;

    #[test]
    fn the_filter_and_link_move_and_the_guest_announces() {
        let (mut a, _) = nic();
        a.features = 1 << VIRTIO_NET_F_CTRL_VLAN | 1 << VIRTIO_NET_F_GUEST_ANNOUNCE;
        a.rx.vlans = vec![false; MAX_VLAN];
        let mac = VIRTIO_NET_CTRL_MAC as u8;
        let ok = VIRTIO_NET_OK as u8;
        let new_mac = [0x52, 0x54, 0, 0, 0, 9];
        assert_eq!(
            a.command(mac, VIRTIO_NET_CTRL_MAC_ADDR_SET as u8, &new_mac),
            ok
        );
        let vlan = VIRTIO_NET_CTRL_VLAN as u8;
        assert_eq!(
            a.command(vlan, VIRTIO_NET_CTRL_VLAN_ADD as u8, &7u16.to_le_bytes()),
            ok
        );
        a.set_link(false);
        let state = a.save_state().unwrap();

        let (mut b, seen) = nic();
        b.features = a.features;
        b.restore_state(&state).unwrap();
        assert_eq!(b.mac(), new_mac);
        assert!(!b.link_up());
        assert!(!b.announce_pending(), "no announcement with the link down");
        assert_eq!(b.query_rx_filter("nic0"), a.query_rx_filter("nic0"));
        let applied = seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(applied.vlans, Some(vec![7]), "the backend has the filter");

        a.set_link(true);
        let (mut c, _) = nic();
        c.features = a.features;
        c.restore_state(&a.save_state().unwrap()).unwrap();
        assert!(c.announce_pending());
        let mut status = [0u8; 2];
        c.read_config(6, &mut status);
        assert_eq!(
            u16::from_le_bytes(status),
            (VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE) as u16
        );
        let announce = VIRTIO_NET_CTRL_ANNOUNCE as u8;
        assert_eq!(
            c.command(announce, VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8, &[]),
            ok
        );
        assert!(!c.announce_pending());
    }

    #[test]
    fn a_state_for_another_card_is_refused() {
        let (mut a, _) = nic();
        a.pairs = 2;
        let state = a.save_state().unwrap();
        let (mut b, _) = nic();
        b.max_pairs = 1;
        assert!(b.restore_state(&state).is_err());
        assert!(b.restore_state(&[1, 2, 3]).is_err());
    }
}
