//! Huawei observe relations (RFC 7641): which token names which device, the relation a bind
//! asks for until the device acknowledges it, and the order of its notifications (§3.4). Lock
//! order: the directory, then the device.

use std::net::SocketAddr;
use std::sync::Arc;

use super::{Device, DeviceState, Registry};
use crate::clock::UnixMs;
use crate::coap::observe::Latest;
use crate::identity::ObserveToken;
use crate::store::Op;
use crate::store::records::Registration;
use crate::sync::{read, write};

/// How a notification stands against the relation's latest (RFC 7641 §3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationOrder {
    /// Newer than any before: it becomes the latest.
    Newer,
    /// Older, from the device's own address: a reordered report, stored but not the latest.
    Reordered,
    /// Not newer and from elsewhere: the token travels in clear, so this may be a copy sent by
    /// anyone; it may change nothing.
    Stale,
}

impl NotificationOrder {
    /// Where a notification numbered `number` (its Observe option) at `now` stands against its
    /// relation's `latest`; `own` when it came from the device's address.
    pub fn of(latest: Option<Latest>, number: Option<u32>, own: bool, now: UnixMs) -> NotificationOrder {
        let newer = match (latest, number) {
            (None, _) => true,
            (Some(latest), Some(n)) => latest.is_older_than(n, now.0),
            (Some(_), None) => false,
        };
        match newer {
            true => NotificationOrder::Newer,
            false if own => NotificationOrder::Reordered,
            false => NotificationOrder::Stale,
        }
    }
}

impl DeviceState {
    /// Where a notification numbered `number` (its Observe option) from `peer` at `now` stands.
    pub fn notification_order(&self, number: Option<u32>, peer: SocketAddr, now: UnixMs) -> NotificationOrder {
        NotificationOrder::of(self.latest_notification, number, self.address == Some(peer), now)
    }

    /// A notification was accepted: the newest becomes the relation's latest.
    pub fn notification_accepted(&mut self, order: NotificationOrder, number: Option<u32>, now: UnixMs) {
        if let (NotificationOrder::Newer, Some(number)) = (order, number) {
            self.latest_notification = Some(Latest { number, at_ms: now.0 });
        }
    }
}

impl Registry {
    pub fn device_by_observe(&self, token: &ObserveToken) -> Option<Arc<Device>> {
        read(&self.devices).by_observe.get(token).cloned()
    }

    /// Indexes the relation a bind asks for, or an LwM2M Register with its `registration`
    /// (replacing an earlier unacknowledged one). The registration takes effect with the relation.
    pub fn ask_observe(&self, device: &Arc<Device>, token: ObserveToken, registration: Option<Registration>) {
        let mut devices = write(&self.devices);
        let mut s = device.state();
        // A device that began leaving after its bind was admitted gets no relation here.
        if s.deleted || !s.home.is_here() {
            return;
        }
        if let Some(old) = s.pending_observe.replace(token) {
            devices.by_observe.remove(&old);
        }
        s.pending_registration = registration;
        devices.by_observe.insert(token, device.clone());
    }

    /// The device acknowledged the relation asked for with `token`: it replaces the previous one
    /// and is stored, with the registration asked for with it (none after a bind: the device
    /// speaks the raw dialect again). False if `token` is not the one asked for last.
    pub fn establish_observe(&self, device: &Arc<Device>, token: ObserveToken) -> bool {
        // Every Huawei uplink asks; only the first after a bind needs the registry-wide lock.
        if device.state().pending_observe != Some(token) {
            return false;
        }
        let mut devices = write(&self.devices);
        let mut s = device.state();
        if s.deleted || s.pending_observe != Some(token) || !s.home.is_here() {
            return false;
        }
        s.pending_observe = None;
        s.registration = s.pending_registration.take();
        s.latest_notification = None;
        if let Some(old) = s.observe.replace(token) {
            devices.by_observe.remove(&old);
        }
        // Queued under the device's lock, so relation changes are stored in their order.
        self.writer.record([Op::PutDevice(device.clone())]);
        true
    }

    /// Ends the relation `token` names (the device answered it with RST: it no longer knows it,
    /// RFC 7641 §3.6); its commands wait for the next bind.
    pub fn end_observe(&self, device: &Arc<Device>, token: ObserveToken) {
        let mut devices = write(&self.devices);
        let mut s = device.state();
        if s.observe == Some(token) {
            s.observe = None;
            devices.by_observe.remove(&token);
            self.writer.record([Op::PutDevice(device.clone())]);
        }
    }

    /// Ends the LwM2M registrations whose lifetime passed without an Update, with their
    /// relations; returns how many.
    pub fn expire_registrations(&self, now: UnixMs) -> usize {
        let registered: Vec<_> = read(&self.devices)
            .by_id
            .values()
            .filter(|d| d.state().registration.as_ref().is_some_and(|r| r.expired(now)))
            .cloned()
            .collect();
        let mut ended = 0;
        for device in registered {
            let mut devices = write(&self.devices);
            let mut s = device.state();
            if !s.registration.as_ref().is_some_and(|r| r.expired(now)) {
                continue;
            }
            s.registration = None;
            if let Some(token) = s.observe.take() {
                devices.by_observe.remove(&token);
            }
            // Queued under the device's lock, like every change of it.
            self.writer.record([Op::PutDevice(device.clone())]);
            ended += 1;
        }
        ended
    }

    /// The token of `device`'s observation of its firmware update state: the one it has, else a
    /// new one, indexed and queued for the store before it is first used (the client may report
    /// under it after a reboot, and a server that forgot it would answer that report with RST;
    /// the result is read after the client registers again either way).
    pub fn firmware_observe(&self, device: &Arc<Device>) -> Option<ObserveToken> {
        if let Some(t) = device.state().firmware_observe {
            return Some(t);
        }
        let mut devices = write(&self.devices);
        let mut s = device.state();
        if s.deleted || !s.home.is_here() {
            return None;
        }
        if let Some(t) = s.firmware_observe {
            return Some(t);
        }
        let token = ObserveToken::generate();
        s.firmware_observe = Some(token);
        devices.by_observe.insert(token, device.clone());
        self.writer.record([Op::PutDevice(device.clone())]);
        Some(token)
    }

    /// Forgets a relation the device refused or never acknowledged.
    pub fn drop_pending_observe(&self, device: &Arc<Device>, token: ObserveToken) {
        let mut devices = write(&self.devices);
        let mut s = device.state();
        if s.pending_observe == Some(token) {
            s.pending_observe = None;
            s.pending_registration = None;
            devices.by_observe.remove(&token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::device::test_device;

    #[test]
    fn notifications_are_ordered_by_number_and_copies_from_elsewhere_are_stale() {
        let d = test_device(Some("10.0.0.1:5000".parse().unwrap()));
        let mut s = d.state();
        let (own, other): (SocketAddr, SocketAddr) = ("10.0.0.1:5000".parse().unwrap(), "10.9.9.9:1".parse().unwrap());
        let t = UnixMs(1_000_000);
        // The relation's first notification is newer, from anywhere.
        assert_eq!(s.notification_order(Some(5), other, t), NotificationOrder::Newer);
        s.notification_accepted(NotificationOrder::Newer, Some(5), t);
        assert_eq!(s.notification_order(Some(6), other, t), NotificationOrder::Newer);
        // The same number again, or an older one: a copy from elsewhere, a reordered report from
        // the device's own address.
        assert_eq!(s.notification_order(Some(5), other, t), NotificationOrder::Stale);
        assert_eq!(s.notification_order(Some(4), own, t), NotificationOrder::Reordered);
        assert_eq!(s.notification_order(None, other, t), NotificationOrder::Stale);
        // A reordered one does not become the latest.
        s.notification_accepted(NotificationOrder::Reordered, Some(4), t);
        assert_eq!(s.notification_order(Some(5), other, t), NotificationOrder::Stale);
        // After 128 s any number is newer (it may have wrapped unseen).
        assert_eq!(s.notification_order(Some(1), other, UnixMs(t.0 + 128_001)), NotificationOrder::Newer);
    }
}
