//! A device shadow (seed 002 §7): the state an application wants (`desired`) and the state the
//! device last reported (`reported`), each key's last change time, and a version that every
//! accepted update raises. The rules for updates, deletes, versions and the limits of seed 004
//! are here, free of I/O and clocks (times are passed in).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// Seed 004's limits for one shadow.
pub const MAX_BYTES: usize = 16 * 1024;
pub const MAX_DEPTH: usize = 5;
pub const MAX_PROPERTIES: usize = 128;

/// Why an update was refused, with the vendor's error code (seed 002 table 7-3).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShadowError {
    #[error("the shadow request is not a JSON object: {0}")]
    BadJson(String),
    #[error("the shadow request has no method")]
    NoMethod,
    #[error("the shadow request has no state")]
    NoState,
    #[error("the shadow request's version must be a positive integer")]
    BadVersion,
    #[error("the shadow request's state has no {0} section")]
    NoSection(&'static str),
    #[error("the shadow request's {0} section is empty")]
    EmptySection(&'static str),
    #[error("the shadow request's method {0:?} is not update, get or delete")]
    BadMethod(String),
    #[error("the shadow request is empty")]
    Empty,
    #[error("the shadow's {0} section would hold {1} properties; at most {MAX_PROPERTIES} are allowed")]
    TooManyProperties(&'static str, usize),
    #[error("version {given} is not greater than the shadow's version {current}")]
    VersionConflict { given: u64, current: u64 },
    #[error("the shadow would be {0} bytes of JSON; at most {MAX_BYTES} are allowed")]
    TooLarge(usize),
    #[error("the shadow would be nested {0} levels deep; at most {MAX_DEPTH} are allowed")]
    TooDeep(usize),
}

impl ShadowError {
    /// The vendor's code for it (table 7-3; size and depth, which it does not number, as 400
    /// "incorrect JSON file").
    pub fn vendor_code(&self) -> u16 {
        match self {
            ShadowError::BadJson(_) | ShadowError::TooLarge(_) | ShadowError::TooDeep(_) => 400,
            ShadowError::NoMethod => 401,
            ShadowError::NoState => 402,
            ShadowError::BadVersion => 403,
            ShadowError::NoSection(_) => 404,
            ShadowError::EmptySection(_) => 405,
            ShadowError::BadMethod(_) => 406,
            ShadowError::Empty => 407,
            ShadowError::TooManyProperties(..) => 408,
            ShadowError::VersionConflict { .. } => 409,
        }
    }
}

/// Which half of the state a change touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Desired,
    Reported,
}

impl Section {
    pub fn name(self) -> &'static str {
        match self {
            Section::Desired => "desired",
            Section::Reported => "reported",
        }
    }
}

/// One half of the state, and when each of its keys last changed (Unix ms).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Half {
    values: Map<String, Value>,
    changed: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Shadow {
    desired: Half,
    reported: Half,
    /// The last accepted change, Unix ms.
    timestamp: u64,
    /// 0 until the first change.
    version: u64,
}

/// A change to one section: keys set to `null` (or Alibaba's `"null"`) are deleted; `None` for
/// the whole section clears it.
pub type Changes = Option<Map<String, Value>>;

/// Alibaba writes a deletion as the string `"null"`.
fn is_null(v: &Value) -> bool {
    v.is_null() || v.as_str() == Some("null")
}

/// Whether `reported` shows what `desired` asks: the same value (numbers by value, `1` as
/// `1.0`), or for an object, each of its keys matched.
fn matches(desired: &Value, reported: &Value) -> bool {
    match (desired, reported) {
        (Value::Object(d), Value::Object(r)) => d.iter().all(|(k, v)| r.get(k).is_some_and(|r| matches(v, r))),
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => desired == reported,
    }
}

/// How a view writes times: the admin API in Unix ms, devices in Unix seconds (seed 002's
/// examples).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamps {
    Millis,
    Seconds,
}

impl Stamps {
    pub fn of(self, ms: u64) -> u64 {
        match self {
            Stamps::Millis => ms,
            Stamps::Seconds => ms / 1000,
        }
    }
}

/// How deep `v` nests: a scalar is 0, `{"a": 1}` is 1.
fn depth(v: &Value) -> usize {
    match v {
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

impl Shadow {
    pub fn version(&self) -> u64 {
        self.version
    }

    fn half(&self, section: Section) -> &Half {
        match section {
            Section::Desired => &self.desired,
            Section::Reported => &self.reported,
        }
    }

    fn half_mut(&mut self, section: Section) -> &mut Half {
        match section {
            Section::Desired => &mut self.desired,
            Section::Reported => &mut self.reported,
        }
    }

    /// Applies `changes` (to one section or both) at `now` as version `version` (the next one
    /// when not given): all or nothing. A change to `reported` clears the desired keys it now
    /// matches (Huawei's rule: what the device reports as wanted has been carried out).
    pub fn update(
        &mut self,
        changes: &[(Section, Changes)],
        version: Option<u64>,
        now: u64,
    ) -> Result<(), ShadowError> {
        let mut next = self.clone();
        for (section, c) in changes {
            next.apply(*section, c, now);
        }
        if changes.iter().any(|(s, _)| *s == Section::Reported) {
            for key in next.delta_keys(false) {
                next.desired.values.remove(&key);
                next.desired.changed.remove(&key);
            }
        }
        next.commit(version, now)?;
        *self = next;
        Ok(())
    }

    /// What `desired` asks that `reported` does not show yet: what to send the device.
    pub fn delta(&self) -> Map<String, Value> {
        let pending = self.delta_keys(true);
        self.desired.values.iter().filter(|(k, _)| pending.contains(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The desired keys the reported state does (`unmatched` false) or does not yet match.
    fn delta_keys(&self, unmatched: bool) -> Vec<String> {
        let reported = &self.reported.values;
        self.desired
            .values
            .iter()
            .filter(|(k, v)| reported.get(*k).is_some_and(|r| matches(v, r)) != unmatched)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn apply(&mut self, section: Section, changes: &Changes, now: u64) {
        let half = self.half_mut(section);
        match changes {
            None => {
                half.values.clear();
                half.changed.clear();
            }
            Some(changes) => {
                for (k, v) in changes {
                    if is_null(v) {
                        half.values.remove(k);
                        half.changed.remove(k);
                    } else {
                        half.values.insert(k.clone(), v.clone());
                        half.changed.insert(k.clone(), now);
                    }
                }
            }
        }
    }

    /// Checks the limits and the version, then stamps the change.
    fn commit(&mut self, version: Option<u64>, now: u64) -> Result<(), ShadowError> {
        for section in [Section::Desired, Section::Reported] {
            let n = self.half(section).values.len();
            if n > MAX_PROPERTIES {
                return Err(ShadowError::TooManyProperties(section.name(), n));
            }
        }
        let current = self.version;
        let version = match version {
            Some(0) => return Err(ShadowError::BadVersion),
            Some(given) if given <= current => return Err(ShadowError::VersionConflict { given, current }),
            Some(given) => given,
            None => current + 1,
        };
        self.version = version;
        self.timestamp = now;
        let view = self.view(Stamps::Millis);
        let deep = depth(&view["state"]).saturating_sub(1);
        if deep > MAX_DEPTH {
            return Err(ShadowError::TooDeep(deep));
        }
        let bytes = view.to_string().len();
        if bytes > MAX_BYTES {
            return Err(ShadowError::TooLarge(bytes));
        }
        Ok(())
    }

    /// The state and metadata sections of seed 002's document (empty halves absent).
    pub fn state(&self, stamps: Stamps) -> (Value, Value) {
        let mut state = Map::new();
        let mut metadata = Map::new();
        for section in [Section::Desired, Section::Reported] {
            let half = self.half(section);
            if half.values.is_empty() {
                continue;
            }
            state.insert(section.name().into(), Value::Object(half.values.clone()));
            let times = half.changed.iter().map(|(k, t)| (k.clone(), json!({ "timestamp": stamps.of(*t) }))).collect();
            metadata.insert(section.name().into(), Value::Object(times));
        }
        (Value::Object(state), Value::Object(metadata))
    }

    /// The document in seed 002's shape.
    pub fn view(&self, stamps: Stamps) -> Value {
        let (state, metadata) = self.state(stamps);
        json!({ "state": state, "metadata": metadata, "timestamp": stamps.of(self.timestamp), "version": self.version })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(v: Value) -> Changes {
        Some(v.as_object().unwrap().clone())
    }

    #[test]
    fn desired_and_reported_keep_their_keys_times_and_the_version() {
        let mut s = Shadow::default();
        s.update(&[(Section::Reported, changes(json!({"color": "red"})))], Some(1), 1000).unwrap();
        s.update(&[(Section::Desired, changes(json!({"color": "green"})))], None, 2000).unwrap();
        assert_eq!(
            s.view(Stamps::Millis),
            json!({"state": {"desired": {"color": "green"}, "reported": {"color": "red"}},
                   "metadata": {"desired": {"color": {"timestamp": 2000}}, "reported": {"color": {"timestamp": 1000}}},
                   "timestamp": 2000, "version": 2})
        );
    }

    #[test]
    fn a_version_not_above_the_current_one_is_a_conflict_and_changes_nothing() {
        let mut s = Shadow::default();
        s.update(&[(Section::Desired, changes(json!({"a": 1})))], Some(5), 1).unwrap();
        let before = s.clone();
        let e = s.update(&[(Section::Desired, changes(json!({"a": 2})))], Some(5), 2).unwrap_err();
        assert_eq!((e.vendor_code(), &s), (409, &before));
        assert_eq!(
            s.update(&[(Section::Desired, changes(json!({"a": 2})))], Some(0), 2).unwrap_err().vendor_code(),
            403
        );
        s.update(&[(Section::Desired, changes(json!({"a": 2})))], Some(9), 3).unwrap();
        assert_eq!(s.version(), 9);
    }

    #[test]
    fn null_deletes_a_key_and_a_null_section_clears_it() {
        let mut s = Shadow::default();
        s.update(&[(Section::Reported, changes(json!({"a": 1, "b": 2, "c": 3})))], None, 1).unwrap();
        s.update(&[(Section::Reported, changes(json!({"a": null, "b": "null"})))], None, 2).unwrap();
        assert_eq!(s.view(Stamps::Millis)["state"]["reported"], json!({"c": 3}));
        s.update(&[(Section::Reported, None)], None, 3).unwrap();
        assert_eq!(s.view(Stamps::Millis)["state"], json!({}));
        assert_eq!(s.version(), 3);
    }

    #[test]
    fn arrays_are_replaced_whole() {
        let mut s = Shadow::default();
        s.update(&[(Section::Reported, changes(json!({"colors": ["RED", "GREEN", "BLUE"]})))], None, 1).unwrap();
        s.update(&[(Section::Reported, changes(json!({"colors": ["RED"]})))], None, 2).unwrap();
        assert_eq!(s.view(Stamps::Millis)["state"]["reported"]["colors"], json!(["RED"]));
    }

    #[test]
    fn the_limits_of_seed_004_refuse_the_whole_update() {
        let mut s = Shadow::default();
        let many: Map<String, Value> = (0..129).map(|i| (format!("k{i}"), json!(i))).collect();
        let e = s.update(&[(Section::Desired, Some(many))], None, 1).unwrap_err();
        assert_eq!((e.vendor_code(), s.version()), (408, 0));
        let deep = json!({"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}});
        assert!(matches!(s.update(&[(Section::Desired, changes(deep))], None, 1), Err(ShadowError::TooDeep(6))));
        let five = json!({"a": {"b": {"c": {"d": {"e": 1}}}}});
        s.update(&[(Section::Desired, changes(five))], None, 1).unwrap();
        let big = json!({"blob": "x".repeat(MAX_BYTES)});
        assert!(matches!(s.update(&[(Section::Reported, changes(big))], None, 2), Err(ShadowError::TooLarge(_))));
        assert_eq!(s.version(), 1);
    }
}
