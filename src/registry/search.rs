//! A product's devices in name order, filtered by what the directory holds of each.
//!
//! Every filtered value lives in memory already, and the time-based ones change with each uplink
//! (status and last contact), so an index would add a write to the uplink path for every device
//! to speed up a query an operator runs now and then. A search scans the product's names in
//! order instead, with a bound on how many one request reads: a page that hits the bound ends
//! early, with a cursor to go on from, so one request never holds the directory for long.

use std::ops::Bound;
use std::sync::Arc;

use super::{Device, DeviceState, Registry, Status};
use crate::clock::UnixMs;
use crate::config::DeviceConfig;
use crate::identity::DeviceName;
use crate::sync::read;

/// How many devices one request reads at most.
pub const SCAN_LIMIT: usize = 100_000;
/// How many are read per hold of the directory's lock.
const CHUNK: usize = 2048;

/// What a device must have to be listed; an unset field lets every device through.
#[derive(Debug, Default)]
pub struct Filter {
    /// Any of these.
    pub status: Vec<Status>,
    /// Last heard from at or after this time (devices never heard from do not match).
    pub seen_after: Option<UnixMs>,
    /// Last heard from before this time (devices never heard from do not match).
    pub seen_before: Option<UnixMs>,
    /// The version it last reported, exactly.
    pub version: Option<String>,
    /// The cell its radio was last reported in, exactly.
    pub cell_id: Option<String>,
    /// Part of its name (an operator's search box).
    pub name_contains: Option<String>,
}

impl Filter {
    pub fn matches(&self, name: &str, s: &DeviceState, now: UnixMs, cfg: &DeviceConfig) -> bool {
        self.name_contains.as_ref().is_none_or(|part| name.contains(part.as_str()))
            && (self.status.is_empty() || self.status.contains(&s.status(now, cfg)))
            && self.seen_after.is_none_or(|t| s.last_seen.is_some_and(|seen| seen >= t))
            && self.seen_before.is_none_or(|t| s.last_seen.is_some_and(|seen| seen < t))
            && self.version.as_ref().is_none_or(|v| s.version.as_ref() == Some(v))
            && self.cell_id.as_ref().is_none_or(|c| s.radio.cell_id.as_ref() == Some(c))
    }
}

/// One page of a search.
pub struct Page {
    pub devices: Vec<Arc<Device>>,
    /// Where the next page starts (exclusive); none once the product's last device was read.
    pub next: Option<DeviceName>,
}

impl Registry {
    /// Devices of `pk` after `after` (exclusive) in name order that match `filter`: at most
    /// `limit` of them, from at most `scan` devices read.
    pub fn search(&self, pk: &str, filter: &Filter, after: Option<&str>, limit: usize, scan: usize) -> Page {
        let now = UnixMs::now();
        let cfg = &self.config.device;
        let mut devices = Vec::new();
        let mut from: Bound<String> = match after {
            Some(a) => Bound::Excluded(a.to_owned()),
            None => Bound::Unbounded,
        };
        let mut read_so_far = 0;
        loop {
            let directory = read(&self.devices);
            let Some(names) = directory.by_product.get(pk) else { return Page { devices, next: None } };
            let mut range = names.range::<str, _>((from.as_ref().map(String::as_str), Bound::Unbounded));
            let mut last = None;
            for (name, d) in range.by_ref().take(CHUNK.min(scan - read_so_far)) {
                read_so_far += 1;
                last = Some(name);
                if filter.matches(name.as_str(), &d.state(), now, cfg) {
                    devices.push(d.clone());
                    if devices.len() == limit {
                        break;
                    }
                }
            }
            let Some(last) = last.cloned() else { return Page { devices, next: None } };
            if range.next().is_none() {
                return Page { devices, next: None };
            }
            if devices.len() == limit || read_so_far == scan {
                return Page { devices, next: Some(last) };
            }
            drop(directory);
            from = Bound::Excluded(last.to_string());
        }
    }
}

/// How many of a product's devices are in each status.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Census {
    pub inactive: usize,
    pub online: usize,
    pub abnormal: usize,
    pub offline: usize,
}

impl Census {
    pub fn total(&self) -> usize {
        self.inactive + self.online + self.abnormal + self.offline
    }
}

impl Registry {
    /// Counts `pk`'s devices by status, [`CHUNK`] per hold of the directory's lock.
    pub fn census(&self, pk: &str) -> Census {
        let now = UnixMs::now();
        let cfg = &self.config.device;
        let mut census = Census::default();
        let mut from: Bound<String> = Bound::Unbounded;
        loop {
            let directory = read(&self.devices);
            let Some(names) = directory.by_product.get(pk) else { return census };
            let mut last = None;
            for (name, d) in names.range::<str, _>((from.as_ref().map(String::as_str), Bound::Unbounded)).take(CHUNK) {
                last = Some(name);
                *match d.state().status(now, cfg) {
                    Status::Inactive => &mut census.inactive,
                    Status::Online => &mut census.online,
                    Status::Abnormal => &mut census.abnormal,
                    Status::Offline => &mut census.offline,
                } += 1;
            }
            let Some(last) = last else { return census };
            from = Bound::Excluded(last.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::NodeId;
    use crate::registry::NewDevice;
    use crate::registry::tests::with_product;
    use crate::store::records::Radio;

    #[tokio::test]
    async fn a_search_reads_a_bounded_number_of_devices_per_page_and_misses_none() {
        let dir = tempfile::tempdir().unwrap();
        let (registry, _store, thread, pk) = with_product(dir.path(), |_| {}).await;
        let rows = (0..5000)
            .map(|i| {
                let new = NewDevice {
                    device_name: Some(DeviceName::new(format!("d{i:04}")).unwrap()),
                    device_secret: None,
                    node_id: (i % 2 == 0).then(|| NodeId::new(format!("86{i:013}")).unwrap()),
                    psk_hex: None,
                };
                let cell = (i % 700 == 0).then(|| "rare".to_string());
                (i + 2, new, Radio { cell_id: cell, ..Radio::default() })
            })
            .collect();
        registry.create_devices(&pk, rows).await.unwrap();
        let rare = Filter { cell_id: Some("rare".into()), ..Filter::default() };
        let (mut found, mut after, mut pages) = (Vec::new(), None::<String>, 0);
        loop {
            let page = registry.search(pk.as_str(), &rare, after.as_deref(), 100, 1000);
            pages += 1;
            found.extend(page.devices.iter().map(|d| d.device_name.to_string()));
            match page.next {
                Some(n) => after = Some(n.to_string()),
                None => break,
            }
        }
        let expected: Vec<String> = (0..5000).step_by(700).map(|i| format!("d{i:04}")).collect();
        assert_eq!(found, expected);
        assert_eq!(pages, 5, "1,000 devices read per page");

        let page = registry.search(pk.as_str(), &rare, None, 2, SCAN_LIMIT);
        assert_eq!(page.devices.len(), 2);
        assert_eq!(page.next.as_ref().map(|n| n.as_str()), Some("d0700"), "a full page ends at its last match");
        let last = registry.search(pk.as_str(), &Filter::default(), Some("d4998"), 100, SCAN_LIMIT);
        assert_eq!((last.devices.len(), last.next), (1, None));
        assert!(registry.search("other", &Filter::default(), None, 100, SCAN_LIMIT).devices.is_empty());

        let named = Filter { name_contains: Some("49".into()), ..Filter::default() };
        let page = registry.search(pk.as_str(), &named, None, 1000, SCAN_LIMIT);
        let expected = (0..5000).map(|i| format!("d{i:04}")).filter(|n| n.contains("49")).count();
        assert_eq!(page.devices.len(), expected);
        assert!(page.devices.iter().all(|d| d.device_name.as_str().contains("49")));
        // Never heard from: all 5,000 (more than a chunk) are inactive.
        let census = registry.census(pk.as_str());
        assert_eq!((census.inactive, census.total()), (5000, 5000));
        assert_eq!(registry.census("other"), Census::default());
        thread.stop();
    }
}
