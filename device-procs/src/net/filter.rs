//! The guest's RX filter (set through the control queue in the vmm): which frames from
//! the host it takes, decided as QEMU's virtio-net does (receive_filter).

use ipc::net::RxFilter;

const BROADCAST: [u8; 6] = [0xff; 6];
const ETH_P_8021Q: [u8; 2] = [0x81, 0x00];

/// Whether a frame starting with `head` (its Ethernet header, at least 16 bytes for a
/// VLAN tag to be seen) passes `filter`.
pub fn accepts(filter: &RxFilter, head: &[u8]) -> bool {
    if filter.promiscuous {
        return true;
    }
    let Some(dest) = head.get(..6) else {
        return false;
    };
    if let (Some(vlans), Some(ethertype), Some(tci)) =
        (&filter.vlans, head.get(12..14), head.get(14..16))
    {
        if ethertype == ETH_P_8021Q {
            let vid = u16::from_be_bytes([tci[0], tci[1]]) & 0xfff;
            if !vlans.contains(&vid) {
                return false;
            }
        }
    }
    let listed = |table: &[[u8; 6]]| table.iter().any(|m| m[..] == *dest);
    if dest[0] & 1 != 0 {
        if dest == BROADCAST {
            return !filter.no_broadcast;
        }
        if filter.no_multicast {
            return false;
        }
        filter.all_multicast || listed(&filter.multicast)
    } else {
        if filter.no_unicast {
            return false;
        }
        filter.all_unicast || dest == filter.mac || listed(&filter.unicast)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn frame(dest: [u8; 6], vlan: Option<u16>) -> Vec<u8> {
        let mut f = dest.to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        if let Some(vid) = vlan {
            f.extend_from_slice(&ETH_P_8021Q);
            f.extend_from_slice(&vid.to_be_bytes());
        } else {
            f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        }
        f
    }

    #[test]
    fn unicast_multicast_broadcast_and_vlans() {
        let mut filter = RxFilter {
            mac: MAC,
            multicast: vec![[1, 0, 0x5e, 0, 0, 1]],
            ..RxFilter::default()
        };
        assert!(accepts(&filter, &frame(MAC, None)));
        assert!(!accepts(&filter, &frame([0x52, 0, 0, 0, 0, 9], None)));
        assert!(accepts(&filter, &frame([1, 0, 0x5e, 0, 0, 1], None)));
        assert!(!accepts(&filter, &frame([1, 0, 0x5e, 0, 0, 2], None)));
        assert!(accepts(&filter, &frame(BROADCAST, None)));
        filter.no_broadcast = true;
        assert!(!accepts(&filter, &frame(BROADCAST, None)));
        filter.all_multicast = true;
        assert!(accepts(&filter, &frame([1, 0, 0x5e, 0, 0, 2], None)));
        filter.vlans = Some(vec![5]);
        assert!(accepts(&filter, &frame(MAC, Some(5))));
        assert!(!accepts(&filter, &frame(MAC, Some(6))));
        assert!(accepts(&filter, &frame(MAC, None)), "untagged frames pass");
        filter.promiscuous = true;
        assert!(accepts(&filter, &frame([0x52, 0, 0, 0, 0, 9], Some(6))));
        assert!(!accepts(&RxFilter::default(), &[1, 2]), "too short");
    }
}
