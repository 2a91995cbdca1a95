//! Radio coverage and the per-cell download budget (SPEC §6, seed 003 §3.7): a cell serves at
//! most 50 concurrent downloads of level-0 devices, 10 of level 1, 1 of level 2, and 10 when only
//! the cell is known. Mixed levels share the cell: a level-L download costs 1/limit(L) of it and
//! the sum stays within 1, counted here in whole units (the cell holds [`CELL_UNITS`]).

use std::collections::HashMap;

use crate::identity::DeviceId;

/// A cell's budget in units: the least common multiple of the limits, so every cost is whole.
pub const CELL_UNITS: u32 = 50;

/// How well a device hears its cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Coverage {
    /// 0: RSRP ≥ −105 dBm and SINR ≥ 7 dB; 1: RSRP ≥ −115 and SINR ≥ −3; 2: anything weaker.
    Level(u8),
    /// Only the cell id is known.
    CellOnly,
}

impl Coverage {
    /// The coverage radio measurements give; the weaker of RSRP and SINR wins. `None` when
    /// neither the measurements nor the cell are known (the device cannot be scheduled).
    pub fn from_radio(rsrp: Option<f64>, sinr: Option<f64>, cell_known: bool) -> Option<Coverage> {
        match (rsrp, sinr) {
            (Some(rsrp), Some(sinr)) => {
                let by_rsrp = if rsrp >= -105.0 {
                    0
                } else if rsrp >= -115.0 {
                    1
                } else {
                    2
                };
                let by_sinr = if sinr >= 7.0 {
                    0
                } else if sinr >= -3.0 {
                    1
                } else {
                    2
                };
                Some(Coverage::Level(by_rsrp.max(by_sinr)))
            }
            _ if cell_known => Some(Coverage::CellOnly),
            _ => None,
        }
    }

    /// Concurrent downloads a cell allows at this coverage alone.
    pub fn limit(self) -> u32 {
        match self {
            Coverage::Level(0) => 50,
            Coverage::Level(1) | Coverage::CellOnly => 10,
            Coverage::Level(_) => 1,
        }
    }

    /// What one download costs the cell.
    pub fn units(self) -> u32 {
        CELL_UNITS / self.limit()
    }
}

/// Radio state a device reports in a JSON uplink (SPEC §6): any of `rsrp` (dBm), `sinr` (dB) and
/// `cell_id` (string or number) at the top level. Values out of physical range are ignored.
#[derive(Debug, Default, PartialEq)]
pub struct RadioReport {
    pub rsrp: Option<f64>,
    pub sinr: Option<f64>,
    pub cell_id: Option<String>,
}

impl RadioReport {
    pub fn from_uplink(payload: &[u8]) -> Option<RadioReport> {
        // Most uplinks are not JSON or carry no radio fields: a cheap look first.
        let start = payload.iter().position(|b| !b.is_ascii_whitespace())?;
        let named = |f: &[u8]| payload.windows(f.len()).any(|w| w == f);
        if payload[start] != b'{' || !(named(b"rsrp") || named(b"sinr") || named(b"cell_id")) {
            return None;
        }
        let serde_json::Value::Object(m) = serde_json::from_slice(payload).ok()? else { return None };
        let number = |k: &str, range: std::ops::RangeInclusive<f64>| m.get(k)?.as_f64().filter(|v| range.contains(v));
        let cell_id = match m.get("cell_id") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
        .filter(|c| (1..=64).contains(&c.len()));
        let report = RadioReport { rsrp: number("rsrp", -160.0..=0.0), sinr: number("sinr", -30.0..=50.0), cell_id };
        (report != RadioReport::default()).then_some(report)
    }
}

/// Which downloads hold a slot in which cell. Devices whose cell is not known share one
/// anonymous cell, so they are never more than one cell's worth.
#[derive(Debug, Default)]
pub struct CellBudget {
    used: HashMap<String, u32>,
    holders: HashMap<DeviceId, (String, Coverage)>,
    /// Most units ever in use at once per cell, for the benchmark and metrics.
    peak: HashMap<String, u32>,
}

impl CellBudget {
    /// Takes a slot for `device` in `cell` if the cell has room; true if it holds one (also when it
    /// already did).
    pub fn acquire(&mut self, device: DeviceId, cell: &str, coverage: Coverage) -> bool {
        if self.holders.contains_key(&device) {
            return true;
        }
        let units = coverage.units();
        let used = self.used.entry(cell.to_string()).or_default();
        if *used + units > CELL_UNITS {
            return false;
        }
        *used += units;
        let peak = self.peak.entry(cell.to_string()).or_default();
        *peak = (*peak).max(*used);
        self.holders.insert(device, (cell.to_string(), coverage));
        true
    }

    /// Frees `device`'s slot (on success, failure, timeout or stop); the cell it was in.
    pub fn release(&mut self, device: DeviceId) -> Option<String> {
        let (cell, coverage) = self.holders.remove(&device)?;
        if let Some(used) = self.used.get_mut(&cell) {
            *used -= coverage.units();
            if *used == 0 {
                self.used.remove(&cell);
            }
        }
        Some(cell)
    }

    /// Units in use in `cell`.
    pub fn used(&self, cell: &str) -> u32 {
        self.used.get(cell).copied().unwrap_or(0)
    }

    /// Cells with no room left for even a level-0 download.
    pub fn saturated(&self) -> usize {
        self.used.values().filter(|u| **u == CELL_UNITS).count()
    }

    pub fn peak(&self, cell: &str) -> u32 {
        self.peak.get(cell).copied().unwrap_or(0)
    }

    /// Every cell with a download in progress: units in use and downloads by coverage.
    pub fn cells(&self) -> HashMap<&str, CellUse> {
        let mut cells: HashMap<&str, CellUse> = self
            .used
            .iter()
            .map(|(cell, used)| (cell.as_str(), CellUse { used: *used, peak: self.peak(cell), ..CellUse::default() }))
            .collect();
        for (cell, coverage) in self.holders.values() {
            let downloads = &mut cells.entry(cell.as_str()).or_default().downloads;
            *match coverage {
                Coverage::Level(0) => &mut downloads.level_0,
                Coverage::Level(1) => &mut downloads.level_1,
                Coverage::Level(_) => &mut downloads.level_2,
                Coverage::CellOnly => &mut downloads.cell_only,
            } += 1;
        }
        cells
    }
}

/// What a cell's budget holds now.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CellUse {
    /// Units in use, of [`CELL_UNITS`].
    pub used: u32,
    /// Most units ever in use at once.
    pub peak: u32,
    pub downloads: ByCoverage,
}

/// A count per coverage level.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ByCoverage {
    pub level_0: u32,
    pub level_1: u32,
    pub level_2: u32,
    pub cell_only: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn radio_fields_are_read_from_json_uplinks() {
        let r = RadioReport::from_uplink(br#" {"temp": 21, "rsrp": -98.5, "sinr": 12, "cell_id": 460001}"#).unwrap();
        assert_eq!(r, RadioReport { rsrp: Some(-98.5), sinr: Some(12.0), cell_id: Some("460001".into()) });
        assert_eq!(RadioReport::from_uplink(br#"{"cell_id": "a1"}"#).unwrap().cell_id.as_deref(), Some("a1"));
        assert_eq!(RadioReport::from_uplink(br#"{"temp": 21}"#), None);
        assert_eq!(RadioReport::from_uplink(br#"{"rsrp": 40}"#), None, "out of range");
        assert_eq!(RadioReport::from_uplink(b"rsrp=-90"), None);
        assert_eq!(RadioReport::from_uplink(br#"{"rsrp": -90"#), None);
    }

    #[test]
    fn levels_take_the_weaker_measurement() {
        let at = |r, s| Coverage::from_radio(Some(r), Some(s), true);
        assert_eq!(at(-100.0, 10.0), Some(Coverage::Level(0)));
        assert_eq!(at(-105.0, 7.0), Some(Coverage::Level(0)));
        assert_eq!(at(-100.0, 0.0), Some(Coverage::Level(1)));
        assert_eq!(at(-110.0, 10.0), Some(Coverage::Level(1)));
        assert_eq!(at(-120.0, 10.0), Some(Coverage::Level(2)));
        assert_eq!(at(-100.0, -5.0), Some(Coverage::Level(2)));
        assert_eq!(Coverage::from_radio(Some(-100.0), None, true), Some(Coverage::CellOnly));
        assert_eq!(Coverage::from_radio(None, None, false), None);
    }

    fn fill(budget: &mut CellBudget, cell: &str, coverage: Coverage, devices: std::ops::Range<u64>) -> usize {
        devices.filter(|d| budget.acquire(DeviceId(*d), cell, coverage)).count()
    }

    #[test]
    fn per_cell_limits_and_mixed_levels() {
        let mut b = CellBudget::default();
        assert_eq!(fill(&mut b, "A", Coverage::Level(0), 0..60), 50);
        assert_eq!(fill(&mut b, "B", Coverage::Level(1), 100..112), 10);
        assert_eq!(fill(&mut b, "C", Coverage::Level(2), 200..203), 1);
        assert_eq!(fill(&mut b, "D", Coverage::CellOnly, 300..320), 10);
        assert_eq!(b.saturated(), 4);
        // Mixed: 20 level-0 downloads (20 units) leave room for 6 level-1 ones (30), not a level 2.
        assert_eq!(fill(&mut b, "E", Coverage::Level(0), 400..420), 20);
        assert_eq!(fill(&mut b, "E", Coverage::Level(2), 500..501), 0);
        assert_eq!(fill(&mut b, "E", Coverage::Level(1), 600..610), 6);
        assert_eq!(b.used("E"), 50);
        let e = b.cells()["E"];
        assert_eq!((e.used, e.downloads), (50, ByCoverage { level_0: 20, level_1: 6, ..ByCoverage::default() }));
        assert_eq!(b.cells()["D"].downloads.cell_only, 10);
        // Freed slots are taken again; a holder asking twice keeps one slot.
        b.release(DeviceId(0));
        assert!(b.acquire(DeviceId(50), "A", Coverage::Level(0)));
        assert!(b.acquire(DeviceId(50), "A", Coverage::Level(0)));
        assert_eq!(b.used("A"), 50);
        for d in 1..=50 {
            b.release(DeviceId(d));
        }
        assert_eq!((b.used("A"), b.peak("A")), (0, 50));
        assert!(b.acquire(DeviceId(999), "A", Coverage::Level(2)), "an empty cell takes a level-2 download");
    }
}
