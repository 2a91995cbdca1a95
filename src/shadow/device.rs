//! The Alibaba device's side of its shadow (seed 002 §7.2): what it asks on
//! `/shadow/update/{pk}/{dn}` (`update`, `get`, `delete`), the `reply` it gets, and the `control`
//! message that carries the state an application wants (on `/shadow/get/{pk}/{dn}`). Times in
//! these messages are Unix seconds, as in the vendor's examples.

use serde_json::{Map, Value, json};

use super::document::{Changes, Section, Shadow, ShadowError, Stamps};
use crate::identity::{DeviceName, ProductKey};

/// The topic a device sends its shadow requests to.
pub fn is_update_topic(segments: &[&str]) -> bool {
    matches!(segments, ["shadow", "update", _, _])
}

/// The topic a device hears its shadow on.
pub fn get_topic(pk: &ProductKey, dn: &DeviceName) -> String {
    format!("/shadow/get/{pk}/{dn}")
}

/// A device's shadow request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Get,
    /// `update` and `delete` both become changes to the sections they name.
    Change {
        changes: Vec<(Section, Changes)>,
        version: Option<u64>,
    },
}

impl Request {
    /// Reads a request as seed 002 §7.2 writes it, refusing it with table 7-3's code.
    pub fn parse(body: &[u8]) -> Result<Request, ShadowError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Err(ShadowError::Empty);
        }
        let Ok(Value::Object(mut request)) = serde_json::from_slice::<Value>(body) else {
            let why = serde_json::from_slice::<Value>(body).err().map_or("not an object".into(), |e| e.to_string());
            return Err(ShadowError::BadJson(why));
        };
        if request.is_empty() {
            return Err(ShadowError::Empty);
        }
        let deleting = match request.get("method") {
            None => return Err(ShadowError::NoMethod),
            Some(m) if m == "get" => return Ok(Request::Get),
            Some(m) if m == "update" => false,
            Some(m) if m == "delete" => true,
            Some(m) => return Err(ShadowError::BadMethod(m.as_str().map_or_else(|| m.to_string(), str::to_string))),
        };
        let version = match request.get("version") {
            None => None,
            Some(v) => Some(v.as_u64().filter(|v| *v > 0).ok_or(ShadowError::BadVersion)?),
        };
        let Some(state) = request.remove("state") else { return Err(ShadowError::NoState) };
        let Value::Object(mut state) = state else {
            return Err(ShadowError::BadJson("state must be an object".into()));
        };
        let mut changes = Vec::new();
        for section in [Section::Reported, Section::Desired] {
            let Some(given) = state.remove(section.name()) else { continue };
            let change = match given {
                // `"null"` (or null) clears the whole section.
                v if v.is_null() || v.as_str() == Some("null") => None,
                Value::Object(m) if m.is_empty() => return Err(ShadowError::EmptySection(section.name())),
                // A delete names the keys to remove, whatever values it gives them.
                Value::Object(m) if deleting => Some(m.into_iter().map(|(k, _)| (k, Value::Null)).collect()),
                Value::Object(m) => Some(m),
                _ => {
                    return Err(ShadowError::BadJson(format!(
                        "state.{} must be an object or \"null\"",
                        section.name()
                    )));
                }
            };
            changes.push((section, change));
        }
        if changes.is_empty() {
            return Err(ShadowError::NoSection("reported"));
        }
        Ok(Request::Change { changes, version })
    }
}

/// An accepted update or delete: the version it made.
pub fn success(shadow: &Shadow, now_ms: u64) -> Vec<u8> {
    reply(json!({"status": "success", "version": shadow.version()}), now_ms)
}

/// A refused request, with table 7-3's code and nbhub's message.
pub fn error(e: &ShadowError, now_ms: u64) -> Vec<u8> {
    let content = json!({"errorcode": e.vendor_code().to_string(), "errormessage": e.to_string()});
    reply(json!({"status": "error", "content": content}), now_ms)
}

/// The answer to `get`: the whole shadow.
pub fn document(shadow: &Shadow, now_ms: u64) -> Vec<u8> {
    reply(with_state(shadow, json!({"status": "success"})), now_ms)
}

/// What an application wants of the device: sent while `desired` asks for what `reported` does
/// not show.
pub fn control(shadow: &Shadow, now_ms: u64) -> Vec<u8> {
    let payload = with_state(shadow, json!({"status": "success"}));
    json!({"method": "control", "payload": payload, "timestamp": Stamps::Seconds.of(now_ms)}).to_string().into_bytes()
}

fn with_state(shadow: &Shadow, mut payload: Value) -> Value {
    let (state, metadata) = shadow.state(Stamps::Seconds);
    let fields: &mut Map<String, Value> = payload.as_object_mut().expect("an object");
    fields.insert("state".into(), state);
    fields.insert("metadata".into(), metadata);
    fields.insert("version".into(), shadow.version().into());
    payload
}

fn reply(payload: Value, now_ms: u64) -> Vec<u8> {
    json!({"method": "reply", "payload": payload, "timestamp": Stamps::Seconds.of(now_ms)}).to_string().into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<Request, ShadowError> {
        Request::parse(v.to_string().as_bytes())
    }

    fn code(body: &[u8]) -> u16 {
        Request::parse(body).unwrap_err().vendor_code()
    }

    #[test]
    fn the_vendors_requests_read_as_changes() {
        let update = parse(json!({"method": "update", "state": {"reported": {"color": "red"}}, "version": 1}));
        let reported = json!({"color": "red"}).as_object().cloned();
        assert_eq!(update, Ok(Request::Change { changes: vec![(Section::Reported, reported)], version: Some(1) }));
        let clear = parse(json!({"method": "update", "state": {"desired": "null"}, "version": 4}));
        assert_eq!(clear, Ok(Request::Change { changes: vec![(Section::Desired, None)], version: Some(4) }));
        let delete = parse(json!({"method": "delete", "state": {"reported": {"color": "null", "t": 1}}}));
        let gone = json!({"color": null, "t": null}).as_object().cloned();
        assert_eq!(delete, Ok(Request::Change { changes: vec![(Section::Reported, gone)], version: None }));
        assert_eq!(parse(json!({"method": "get"})), Ok(Request::Get));
    }

    #[test]
    fn bad_requests_get_table_7_3s_codes() {
        assert_eq!(code(b"{not json"), 400);
        assert_eq!(code(br#"{"state": {}}"#), 401);
        assert_eq!(code(br#"{"method": "update"}"#), 402);
        assert_eq!(code(br#"{"method": "update", "state": {"reported": {"a": 1}}, "version": "x"}"#), 403);
        assert_eq!(code(br#"{"method": "update", "state": {"other": {}}}"#), 404);
        assert_eq!(code(br#"{"method": "update", "state": {"reported": {}}}"#), 405);
        assert_eq!(code(br#"{"method": "patch", "state": {}}"#), 406);
        assert_eq!(code(b""), 407);
        assert_eq!(code(b"{}"), 407);
    }

    #[test]
    fn replies_and_control_carry_the_version_and_seconds() {
        let mut s = Shadow::default();
        let desired = json!({"color": "green"}).as_object().cloned();
        s.update(&[(Section::Desired, desired)], None, 1_469_564_576_000).unwrap();
        let reply: Value = serde_json::from_slice(&success(&s, 1_469_564_577_000)).unwrap();
        assert_eq!(
            reply,
            json!({"method": "reply", "payload": {"status": "success", "version": 1}, "timestamp": 1_469_564_577})
        );
        let control: Value = serde_json::from_slice(&control(&s, 1_469_564_577_000)).unwrap();
        assert_eq!(control["method"], "control");
        assert_eq!(control["payload"]["state"], json!({"desired": {"color": "green"}}));
        assert_eq!(control["payload"]["metadata"]["desired"]["color"]["timestamp"], 1_469_564_576);
        let refused: Value =
            serde_json::from_slice(&error(&ShadowError::VersionConflict { given: 1, current: 2 }, 0)).unwrap();
        assert_eq!(refused["payload"]["content"]["errorcode"], "409");
    }
}
