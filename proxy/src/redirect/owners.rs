//! Which enrolled pod each address of the kernel's `INBOUND` map was registered for.
//!
//! `INBOUND` is one map for the whole node, keyed by address alone: the inbound program of
//! every pod's network namespace looks the connection's local address up in it. Cluster
//! addresses are unique, but link-local ones are only unique per link: two pods can carry the
//! same `fe80::` address (a pod with `NET_ADMIN` can even add another pod's), and without an
//! owner the last registration would win, silently taking the first pod's plaintext out of
//! capture, and releasing either pod would delete the other's entry. So sluice remembers the
//! owner of each entry: a registration for an address another pod holds is refused, and a
//! release removes only the entries that still belong to the pod being released.
//!
//! The owners live in this process only: a successor process (an upgrade) registers its own
//! listeners in the shared pinned map, over the previous process's entries, as it should.

use std::{collections::HashMap, fmt, net::IpAddr, sync::Arc};

/// An enrolled pod, as the owner of captured addresses.
#[derive(Debug, Clone)]
pub struct CaptureOwner {
    /// The pod's UID: what tells two pods apart (a re-created pod may reuse a name).
    pub uid: Arc<str>,
    /// "namespace/name", for messages.
    pub pod: Arc<str>,
}

impl CaptureOwner {
    fn is(&self, other: &CaptureOwner) -> bool {
        self.uid == other.uid
    }
}

impl fmt::Display for CaptureOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (uid {})", self.pod, self.uid)
    }
}

/// The owner of each registered address (addresses in canonical form: an IPv4-mapped IPv6
/// address is its IPv4 address, as the kernel keys it).
#[derive(Debug, Default)]
pub struct InboundOwners {
    by_addr: HashMap<IpAddr, CaptureOwner>,
}

impl InboundOwners {
    /// The pod other than `owner` that holds `ip`, if any.
    pub fn taken_by(&self, ip: IpAddr, owner: &CaptureOwner) -> Option<&CaptureOwner> {
        self.by_addr.get(&ip.to_canonical()).filter(|holder| !holder.is(owner))
    }

    /// Records that `ip` is registered for `owner` (checked with [`Self::taken_by`] first).
    pub fn record(&mut self, ip: IpAddr, owner: &CaptureOwner) {
        self.by_addr.insert(ip.to_canonical(), owner.clone());
    }

    /// Forgets `ip` if it belongs to `owner`; returns whether it did (only then may the
    /// kernel's entry be removed).
    pub fn release(&mut self, ip: IpAddr, owner: &CaptureOwner) -> bool {
        let ip = ip.to_canonical();
        match self.by_addr.get(&ip) {
            Some(holder) if holder.is(owner) => {
                self.by_addr.remove(&ip);
                true
            }
            _ => false,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_addr.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, name: &str) -> CaptureOwner {
        CaptureOwner { uid: uid.into(), pod: name.into() }
    }

    #[test]
    fn an_address_belongs_to_the_first_pod_until_it_releases_it() {
        let mut owners = InboundOwners::default();
        let (web, intruder) = (pod("u1", "shop/web"), pod("u2", "tenant/intruder"));
        let ll: IpAddr = "fe80::1".parse().unwrap();
        assert!(owners.taken_by(ll, &web).is_none());
        owners.record(ll, &web);
        // The same pod registering again (its listener re-created) is its own business.
        assert!(owners.taken_by(ll, &web).is_none());
        assert_eq!(owners.taken_by(ll, &intruder).map(|h| h.pod.to_string()), Some("shop/web".into()));
        // Another pod's release leaves the entry alone.
        assert!(!owners.release(ll, &intruder));
        assert!(owners.taken_by(ll, &intruder).is_some());
        // A re-created pod with the same name is another pod.
        assert!(owners.taken_by(ll, &pod("u3", "shop/web")).is_some());
        assert!(owners.release(ll, &web));
        assert_eq!(owners.len(), 0);
        assert!(owners.taken_by(ll, &intruder).is_none());
        assert!(!owners.release(ll, &web), "released once");
    }

    #[test]
    fn ipv4_mapped_addresses_are_their_ipv4_address() {
        let mut owners = InboundOwners::default();
        owners.record("10.244.1.10".parse().unwrap(), &pod("u1", "shop/web"));
        let mapped: IpAddr = "::ffff:10.244.1.10".parse().unwrap();
        assert!(owners.taken_by(mapped, &pod("u2", "shop/other")).is_some());
        assert!(owners.release(mapped, &pod("u1", "shop/web")));
        assert_eq!(owners.len(), 0);
    }
}
