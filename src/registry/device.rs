//! A device as the running server holds it: its immutable identity and credentials, and the
//! small mutable state every request touches (enabled, last contact, flow-control counters).

use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use crate::clock::UnixMs;
use crate::coap::observe::Latest;
use crate::config::DeviceConfig;
use crate::identity::Home;
use crate::identity::{DeviceId, DeviceName, NodeId, ObserveToken, ProductKey, Secret, Token};
use crate::registry::routes::Route;
use crate::store::records::{DeviceRecord, PresenceRecord, Radio, Registration};
use crate::sync::lock;

/// How stale the stored last contact may get. A busy device would otherwise add a write to every
/// uplink; status thresholds are hours, so after a crash a minute of staleness costs nothing.
const PRESENCE_WRITE_INTERVAL_MS: u64 = 60_000;

pub struct Device {
    pub id: DeviceId,
    pub product_key: ProductKey,
    pub device_name: DeviceName,
    pub secret: Secret,
    pub node_id: Option<NodeId>,
    pub psk_hex: Option<String>,
    pub created_at: u64,
    state: Mutex<DeviceState>,
}

pub struct DeviceState {
    pub enabled: bool,
    pub registered: bool,
    /// Set when the device is deleted; sessions still pointing at it stop working.
    pub deleted: bool,
    pub radio: Radio,
    pub last_seen: Option<UnixMs>,
    pub address: Option<SocketAddr>,
    /// `last_seen` as last written to the store.
    persisted_seen: Option<UnixMs>,
    /// Live tokens (the current one per port family and any still in their grace period).
    pub tokens: Vec<Token>,
    flow: FlowCounter,
    /// The socket that last heard from the device: where a command for it is sent from.
    pub route: Option<Route>,
    /// Huawei observe relation on `/t/d`, once the device acknowledged it.
    pub observe: Option<ObserveToken>,
    /// The relation asked for at the last bind, until the device acknowledges it.
    pub pending_observe: Option<ObserveToken>,
    /// The newest notification of the current relation since it began or the server started:
    /// a copy from another address may not move the device's downlink.
    pub latest_notification: Option<Latest>,
    /// The status last told to subscribers (`device_status` events announce changes).
    pub announced: Status,
    /// The version the device last reported over PCP.
    pub version: Option<String>,
    /// Served here, or moving or moved to another instance.
    pub home: Home,
    /// Its LwM2M registration, while it has one.
    pub registration: Option<Registration>,
    /// The registration of the last Register, until the device answers the observe request it
    /// was sent (a Register proves nothing before that).
    pub pending_registration: Option<Registration>,
    /// The token of the server's observation of the client's firmware update state (`/5/0/3`):
    /// kept across re-registration and restarts, since a client reports its update's result
    /// after the reboot under the observation made before it.
    pub firmware_observe: Option<ObserveToken>,
    /// The newest report under that observation since the server started.
    pub latest_firmware_report: Option<Latest>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Inactive,
    Online,
    Abnormal,
    Offline,
}

impl Status {
    pub fn to_byte(self) -> u8 {
        self as u8
    }

    pub fn from_byte(b: u8) -> Option<Status> {
        [Status::Inactive, Status::Online, Status::Abnormal, Status::Offline].get(b as usize).copied()
    }
}

impl Device {
    pub fn from_record(r: DeviceRecord, last_seen: Option<UnixMs>, address: Option<SocketAddr>) -> Device {
        Device {
            id: r.id,
            product_key: r.product_key,
            device_name: r.device_name,
            secret: r.device_secret,
            node_id: r.node_id,
            psk_hex: r.psk_hex,
            created_at: r.created_at,
            state: Mutex::new(DeviceState {
                enabled: r.enabled,
                registered: r.registered,
                deleted: false,
                radio: r.radio,
                last_seen,
                address,
                persisted_seen: last_seen,
                tokens: Vec::new(),
                flow: FlowCounter::default(),
                route: None,
                observe: r.observe,
                pending_observe: None,
                latest_notification: None,
                announced: Status::Inactive,
                version: r.version,
                home: r.home,
                registration: r.registration,
                pending_registration: None,
                firmware_observe: r.firmware_observe,
                latest_firmware_report: None,
            }),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, DeviceState> {
        // A panic while holding this lock cannot leave the counters inconsistent in a way that
        // matters more than refusing every later request would.
        lock(&self.state)
    }

    /// Its id, product key and name: what names it in its commands and events.
    pub fn key(&self) -> (DeviceId, ProductKey, DeviceName) {
        (self.id, self.product_key.clone(), self.device_name.clone())
    }

    /// The stored form for `s`, this device's state locked by the caller.
    pub fn record_with(&self, s: &DeviceState) -> DeviceRecord {
        DeviceRecord {
            id: self.id,
            product_key: self.product_key.clone(),
            device_name: self.device_name.clone(),
            device_secret: self.secret.clone(),
            node_id: self.node_id.clone(),
            psk_hex: self.psk_hex.clone(),
            enabled: s.enabled,
            registered: s.registered,
            radio: s.radio.clone(),
            created_at: self.created_at,
            observe: s.observe,
            version: s.version.clone(),
            home: s.home.clone(),
            registration: s.registration.clone(),
            firmware_observe: s.firmware_observe,
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({}/{})", self.product_key, self.device_name)
    }
}

impl crate::store::LiveRecord for Device {
    /// Nothing for a deleted device, nor for an arriving one: its import writes its record.
    fn current(&self) -> Option<DeviceRecord> {
        let s = self.state();
        (!s.deleted && s.home != Home::Arriving).then(|| self.record_with(&s))
    }
}

/// An uplink event names the device that sent it: the live device is the event's source, so
/// asking for one costs no allocation.
impl crate::store::UplinkEvent for Device {
    fn encode(&self, device: DeviceId, message: crate::store::MessageId, received_at: UnixMs) -> Vec<u8> {
        crate::northbound::event::uplink_record(&self.product_key, &self.device_name, device, message, received_at)
    }
}

impl DeviceState {
    /// Status from the time since the last uplink (SPEC §7, thresholds from config).
    pub fn status(&self, now: UnixMs, cfg: &DeviceConfig) -> Status {
        match self.last_seen {
            None => Status::Inactive,
            Some(seen) => {
                let age_s = now.0.saturating_sub(seen.0) / 1000;
                if age_s <= cfg.online_within_s {
                    Status::Online
                } else if age_s <= cfg.abnormal_within_s {
                    Status::Abnormal
                } else {
                    Status::Offline
                }
            }
        }
    }

    /// Counts a request against the device's limits; `Err(seconds)` tells when to retry.
    pub fn admit(&mut self, now: UnixMs, cfg: &DeviceConfig) -> Result<(), u32> {
        self.flow.admit(now, cfg.max_per_second, cfg.max_per_minute)
    }

    /// Records a contact; returns the presence to store when the stored one is due for renewal
    /// (older than a minute, or the device moved to another address).
    pub fn seen(&mut self, now: UnixMs, address: SocketAddr) -> Option<PresenceRecord> {
        let moved = self.address != Some(address);
        self.last_seen = Some(now);
        self.address = Some(address);
        let due = self.persisted_seen.is_none_or(|p| now.0 >= p.0 + PRESENCE_WRITE_INTERVAL_MS);
        (moved || due).then(|| {
            self.persisted_seen = Some(now);
            PresenceRecord { last_seen: now, address: Some(address) }
        })
    }

    /// Whether a message sent now reaches the device: an LwM2M client registered without queue
    /// mode always listens; any other device only in its awake window, heard from within
    /// `window_s` (its PSM active timer).
    pub fn awake(&self, now: UnixMs, window_s: u32) -> bool {
        self.always_listening() || self.last_seen.is_some_and(|seen| now.0 <= seen.plus_secs(window_s as u64).0)
    }

    /// An LwM2M client registered without queue mode (`b=U`): it never sleeps.
    pub fn always_listening(&self) -> bool {
        self.registration.as_ref().is_some_and(|r| !r.queue)
    }

    /// The last contact as it is now, to store regardless of when it was stored last.
    pub fn presence(&mut self) -> PresenceRecord {
        self.persisted_seen = self.last_seen;
        PresenceRecord { last_seen: self.last_seen.unwrap_or_default(), address: self.address }
    }

    /// Records a contact through `route`; like [`DeviceState::seen`].
    pub fn heard(&mut self, now: UnixMs, address: SocketAddr, route: Route) -> Option<PresenceRecord> {
        self.route = Some(route);
        self.seen(now, address)
    }

    /// Activated devices may no longer use dynamic registration.
    pub fn activated(&self) -> bool {
        self.registered || self.last_seen.is_some()
    }
}

/// Fixed one-second and one-minute windows. Only admitted requests count, so a device that
/// bursts is throttled for the rest of the window, not locked out by its own refused retries.
#[derive(Debug, Default)]
struct FlowCounter {
    second: u64,
    in_second: u32,
    minute: u64,
    in_minute: u32,
}

impl FlowCounter {
    fn admit(&mut self, now: UnixMs, per_second: u32, per_minute: u32) -> Result<(), u32> {
        let second = now.0 / 1000;
        let minute = second / 60;
        if second != self.second {
            self.second = second;
            self.in_second = 0;
        }
        if minute != self.minute {
            self.minute = minute;
            self.in_minute = 0;
        }
        if self.in_minute >= per_minute {
            return Err((60 - second % 60) as u32);
        }
        if self.in_second >= per_second {
            return Err(1);
        }
        self.in_second += 1;
        self.in_minute += 1;
        Ok(())
    }
}

/// The record of device `d` of product `p` (secret `s`, id 1), for unit tests.
#[cfg(test)]
pub(crate) fn test_record() -> DeviceRecord {
    DeviceRecord {
        id: DeviceId(1),
        product_key: ProductKey::new("p").unwrap(),
        device_name: DeviceName::new("d").unwrap(),
        device_secret: Secret::new("s").unwrap(),
        node_id: None,
        psk_hex: None,
        enabled: true,
        registered: false,
        radio: Radio::default(),
        created_at: 0,
        observe: None,
        version: None,
        home: Home::Here,
        registration: None,
        firmware_observe: None,
    }
}

/// Device `d` of product `p`, last heard at 0 from `address`, for unit tests.
#[cfg(test)]
pub(crate) fn test_device(address: Option<SocketAddr>) -> Device {
    Device::from_record(test_record(), address.map(|_| UnixMs(0)), address)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DeviceConfig {
        DeviceConfig { online_within_s: 90_000, abnormal_within_s: 176_400, max_per_second: 5, max_per_minute: 300 }
    }

    #[test]
    fn flow_control_limits_per_second_and_minute() {
        let mut f = FlowCounter::default();
        let t = UnixMs(1_000_000_000);
        for _ in 0..5 {
            assert_eq!(f.admit(t, 5, 7), Ok(()));
        }
        assert_eq!(f.admit(t, 5, 7), Err(1));
        assert_eq!(f.admit(UnixMs(t.0 + 1000), 5, 7), Ok(()));
        assert_eq!(f.admit(UnixMs(t.0 + 1000), 5, 7), Ok(()));
        // the minute budget of 7 is spent
        let e = f.admit(UnixMs(t.0 + 2000), 5, 7).unwrap_err();
        assert!(e > 1 && e <= 60);
        assert_eq!(f.admit(UnixMs(t.0 + 60_000), 5, 7), Ok(()));
    }

    #[test]
    fn status_thresholds() {
        let c = cfg();
        let now = UnixMs(200_000_000_000);
        let mut s = DeviceState {
            enabled: true,
            registered: false,
            deleted: false,
            radio: Radio::default(),
            last_seen: None,
            address: None,
            persisted_seen: None,
            tokens: vec![],
            flow: FlowCounter::default(),
            route: None,
            observe: None,
            pending_observe: None,
            latest_notification: None,
            announced: Status::Inactive,
            version: None,
            home: Home::Here,
            registration: None,
            pending_registration: None,
            firmware_observe: None,
            latest_firmware_report: None,
        };
        assert_eq!(s.status(now, &c), Status::Inactive);
        s.last_seen = Some(UnixMs(now.0 - 25 * 3600 * 1000));
        assert_eq!(s.status(now, &c), Status::Online);
        s.last_seen = Some(UnixMs(now.0 - 25 * 3600 * 1000 - 1000));
        assert_eq!(s.status(now, &c), Status::Abnormal);
        s.last_seen = Some(UnixMs(now.0 - 49 * 3600 * 1000 - 1000));
        assert_eq!(s.status(now, &c), Status::Offline);
    }

    #[test]
    fn an_lwm2m_client_without_queue_mode_is_always_awake() {
        let mut d = test_device(None);
        let s = d.state.get_mut().unwrap();
        let now = UnixMs(1_000_000);
        assert!(!s.awake(now, 20), "never heard");
        let registration =
            |queue| Registration { version: "1.0".into(), lifetime_s: 60, queue, objects: Vec::new(), updated_at: 0 };
        s.registration = Some(registration(false));
        assert!(s.awake(now, 20));
        s.registration = Some(registration(true));
        assert!(!s.awake(now, 20), "queue mode: only within the awake window");
        s.last_seen = Some(UnixMs(now.0 - 10_000));
        assert!(s.awake(now, 20));
    }

    #[test]
    fn presence_is_written_once_a_minute_or_on_a_move() {
        let mut s = test_device(None);
        let s = s.state.get_mut().unwrap();
        let a: SocketAddr = "10.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:1".parse().unwrap();
        assert!(s.seen(UnixMs(1_000), a).is_some());
        assert!(s.seen(UnixMs(30_000), a).is_none());
        assert_eq!(s.last_seen, Some(UnixMs(30_000)));
        assert!(s.seen(UnixMs(31_000), b).is_some(), "a new address is written at once");
        assert!(s.seen(UnixMs(91_000), b).is_some());
    }
}
