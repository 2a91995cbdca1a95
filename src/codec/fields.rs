//! A declarative codec for operators who do not write scripts: a product's messages described as
//! fields of fixed binary types, the model of Huawei's online codec editor (seed 003 §4.4). It
//! reads and writes the same JSON a script of the same vendor's style does, so the shadow, JSON
//! commands and their answers cannot tell the two apart. Free of I/O and clocks.
//!
//! A frame is its message-id field (when the layout has one) and then the message's fields in
//! order, integers big-endian. Strings and byte fields have a fixed length, take their length
//! from an earlier unsigned field, or (the last field only) run to the end of the frame.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::Style;
use super::command::integer;

/// Most messages one layout describes, and fields one message has.
const MAX_MESSAGES: usize = 64;
const MAX_FIELDS: usize = 64;

/// Alibaba's methods when a message does not name its own.
const ALIBABA_REPORT: &str = "thing.event.property.post";
const ALIBABA_COMMAND: &str = "thing.service.property.set";

/// A product's messages, as uploaded in place of a script.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    /// Whose JSON the codec reads and writes.
    pub style: Style,
    /// The integer type of the leading field that says which message a frame is; unset when
    /// the device sends one kind of message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<FieldType>,
    pub messages: Vec<Message>,
}

/// What a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Device data: Huawei `deviceReq`, Alibaba `thing.event.property.post`.
    Report,
    /// The device's answer to a command: Huawei `deviceRsp`, Alibaba's `down_raw_reply`.
    Response,
    /// Sent to the device: Huawei `cloudReq`, Alibaba `thing.service.property.set`.
    Command,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub kind: Kind,
    /// The message-id field's value for this message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// Huawei: the `serviceId` of a report's data or of a command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// A command's name: Huawei's `cmd`, or Alibaba's method (also a report's, when it is not
    /// `thing.event.property.post`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    pub fields: Vec<Field>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// A string's or bytes' fixed length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length: Option<usize>,
    /// The earlier unsigned field that holds a string's or bytes' length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub length_field: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    U8,
    U16,
    U32,
    I8,
    I16,
    I32,
    /// UTF-8; a fixed-length one is padded with NUL bytes.
    String,
    /// Raw bytes, as a lowercase hex string in JSON.
    Bytes,
}

impl FieldType {
    /// Width in bytes and signedness, for the integer types.
    fn int(self) -> Option<(usize, bool)> {
        match self {
            FieldType::U8 => Some((1, false)),
            FieldType::U16 => Some((2, false)),
            FieldType::U32 => Some((4, false)),
            FieldType::I8 => Some((1, true)),
            FieldType::I16 => Some((2, true)),
            FieldType::I32 => Some((4, true)),
            FieldType::String | FieldType::Bytes => None,
        }
    }

    fn range(self) -> Option<(i64, i64)> {
        let (width, signed) = self.int()?;
        let bits = 8 * width as u32;
        Some(if signed { (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) } else { (0, (1 << bits) - 1) })
    }
}

/// The envelope fields of a message: taken out of its data and put where the vendor's JSON has
/// them (`mid`, `errcode`; Alibaba's `id`, `code`).
fn envelope(style: Style, kind: Kind) -> &'static [&'static str] {
    match (style, kind) {
        (Style::Huawei, Kind::Report) => &[],
        (Style::Huawei, Kind::Response) => &["mid", "errcode"],
        (Style::Huawei, Kind::Command) => &["mid"],
        (Style::Alibaba, Kind::Response) => &["id", "code"],
        (Style::Alibaba, _) => &["id"],
    }
}

impl Layout {
    /// A layout as uploaded, checked whole: every problem is named with its message and field.
    pub fn parse(value: &Value) -> Result<Layout, String> {
        let layout: Layout = serde_json::from_value(value.clone()).map_err(|e| format!("fields: {e}"))?;
        layout.check()?;
        Ok(layout)
    }

    fn check(&self) -> Result<(), String> {
        if self.messages.is_empty() || self.messages.len() > MAX_MESSAGES {
            return Err(format!("fields: between 1 and {MAX_MESSAGES} messages are needed"));
        }
        if let Some(t) = self.message_id
            && t.int().is_none()
        {
            return Err("fields.message_id must be an integer type (u8 … i32)".into());
        }
        let uplinks = self.messages.iter().filter(|m| m.kind != Kind::Command).count();
        if self.message_id.is_none() && uplinks > 1 {
            return Err("fields: more than one uplink message needs a message_id to tell them apart".into());
        }
        let mut ids = Vec::new();
        for (i, m) in self.messages.iter().enumerate() {
            let at = |what: String| format!("fields.messages[{i}]: {what}");
            match (self.message_id.and_then(FieldType::range), m.id) {
                (Some((lo, hi)), Some(id)) if (lo..=hi).contains(&id) => {
                    if ids.contains(&id) {
                        return Err(at(format!("id {id} is used twice")));
                    }
                    ids.push(id);
                }
                (Some((lo, hi)), Some(id)) => return Err(at(format!("id {id} is outside {lo}..={hi}"))),
                (Some(_), None) => return Err(at("needs an id (the layout has a message_id)".into())),
                (None, Some(_)) => return Err(at("has an id but the layout has no message_id".into())),
                (None, None) => {}
            }
            let named = |v: &Option<String>| v.as_deref().is_some_and(|s| !s.is_empty());
            if self.style == Style::Huawei && m.kind != Kind::Response && !named(&m.service) {
                return Err(at("a Huawei report or command needs its service".into()));
            }
            if self.style == Style::Huawei && m.kind == Kind::Command && !named(&m.command) {
                return Err(at("a Huawei command needs its command name".into()));
            }
            let duplicate = self.messages[..i].iter().any(|o| {
                o.kind == Kind::Command && m.kind == Kind::Command && o.service == m.service && o.command == m.command
            });
            if duplicate {
                return Err(at("another command has the same service and name".into()));
            }
            check_fields(&m.fields).map_err(at)?;
        }
        Ok(())
    }

    /// A frame from the device as the vendor's JSON.
    pub fn decode(&self, frame: &[u8]) -> Result<Value, String> {
        let mut r = Reader { frame, at: 0 };
        let message = match self.message_id {
            Some(t) => {
                let id = r.int(t, "the message id")?;
                self.messages
                    .iter()
                    .find(|m| m.kind != Kind::Command && m.id == Some(id))
                    .ok_or_else(|| format!("no uplink message has id {id}"))?
            }
            None => {
                self.messages.iter().find(|m| m.kind != Kind::Command).ok_or("the codec describes no uplink message")?
            }
        };
        let mut data = Map::new();
        for f in &message.fields {
            let value = match f.ty.int() {
                Some(_) => Value::from(r.int(f.ty, &f.name)?),
                None => {
                    let len = match (&f.length, &f.length_field) {
                        (Some(n), _) => *n,
                        (None, Some(by)) => data.get(by).and_then(Value::as_u64).ok_or_else(|| {
                            format!("{} takes its length from {by}, which is not read before it", f.name)
                        })? as usize,
                        // The last field (only it, checked at parse) runs to the end.
                        (None, None) => frame.len() - r.at,
                    };
                    let bytes = r.take(len, &f.name)?;
                    match f.ty {
                        FieldType::Bytes => Value::from(hex::encode(bytes)),
                        _ => {
                            let text = if f.length.is_some() { trim_nul(bytes) } else { bytes };
                            let text = std::str::from_utf8(text).map_err(|_| format!("{} is not UTF-8", f.name))?;
                            Value::from(text)
                        }
                    }
                }
            };
            data.insert(f.name.clone(), value);
        }
        if r.at < frame.len() {
            return Err(format!("{} bytes are left after the last field", frame.len() - r.at));
        }
        for f in &message.fields {
            if let Some(by) = &f.length_field {
                data.remove(by);
            }
        }
        let mut take = |name: &str| data.remove(name);
        Ok(match (self.style, message.kind) {
            (Style::Huawei, Kind::Response) => {
                let mid = take("mid").unwrap_or(Value::Null);
                let errcode = take("errcode").unwrap_or_else(|| 0.into());
                json!({"msgType": "deviceRsp", "mid": mid, "errcode": errcode, "body": data})
            }
            (Style::Huawei, _) => json!({"msgType": "deviceReq", "hasMore": 0,
                "data": [{"serviceId": message.service, "serviceData": data}]}),
            (Style::Alibaba, Kind::Response) => {
                // Strings, as the vendor's example script writes them (`'' + n`).
                let id = take("id").map_or_else(|| "0".into(), |v| v.to_string());
                let code = take("code").map_or_else(|| "200".into(), |v| v.to_string());
                json!({"id": id, "code": code, "data": data, "version": "1.0"})
            }
            (Style::Alibaba, _) => {
                let id = take("id").map_or_else(|| "0".into(), |v| v.to_string());
                let method = message.command.as_deref().unwrap_or(ALIBABA_REPORT);
                json!({"method": method, "id": id, "params": data, "version": "1.0"})
            }
        })
    }

    /// A command in the vendor's JSON as the frame for the device.
    pub fn encode(&self, command: &Value) -> Result<Vec<u8>, String> {
        let (message, values, section) = match self.style {
            Style::Huawei => {
                if command["msgType"] != "cloudReq" {
                    return Err("only cloudReq messages are encoded".into());
                }
                let (service, cmd) = (command["serviceId"].as_str(), command["cmd"].as_str());
                let message = self
                    .messages
                    .iter()
                    .find(|m| m.kind == Kind::Command && m.service.as_deref() == service && m.command.as_deref() == cmd)
                    .ok_or_else(|| {
                        format!("the codec has no command {} of service {}", cmd.unwrap_or("?"), service.unwrap_or("?"))
                    })?;
                (message, &command["paras"], "paras")
            }
            Style::Alibaba => {
                let method = command["method"].as_str().unwrap_or_default();
                let message = self
                    .messages
                    .iter()
                    .find(|m| m.kind == Kind::Command && m.command.as_deref().unwrap_or(ALIBABA_COMMAND) == method)
                    .ok_or_else(|| format!("the codec has no command for method {method}"))?;
                (message, &command["params"], "params")
            }
        };
        let mut out = Vec::new();
        if let (Some(t), Some(id)) = (self.message_id, message.id) {
            put_int(&mut out, t, id);
        }
        let lengths: Vec<&str> = message.fields.iter().filter_map(|f| f.length_field.as_deref()).collect();
        let mut at = 0;
        while at < message.fields.len() {
            let f = &message.fields[at];
            at += 1;
            if lengths.contains(&f.name.as_str()) {
                // Written with the field whose length it is, which comes later.
                continue;
            }
            let enveloped = envelope(self.style, message.kind).contains(&f.name.as_str());
            let (value, whose) =
                if enveloped { (&command[&f.name], "the message") } else { (&values[&f.name], section) };
            match f.ty.range() {
                Some((lo, hi)) => {
                    let n = integer(value).ok_or_else(|| format!("{whose} needs {} as an integer", f.name))?;
                    if !(lo..=hi).contains(&n) {
                        return Err(format!("{} = {n} is outside {lo}..={hi}", f.name));
                    }
                    put_int(&mut out, f.ty, n);
                }
                None => {
                    let bytes = match (f.ty, value) {
                        (FieldType::Bytes, Value::String(h)) => {
                            hex::decode(h).map_err(|e| format!("{} must be hex: {e}", f.name))?
                        }
                        (FieldType::String, Value::String(s)) => s.as_bytes().to_vec(),
                        _ => return Err(format!("{whose} needs {} as a string", f.name)),
                    };
                    match (f.length, &f.length_field) {
                        (Some(n), _) if bytes.len() > n || (f.ty == FieldType::Bytes && bytes.len() != n) => {
                            return Err(format!("{} is {} bytes; its field holds {n}", f.name, bytes.len()));
                        }
                        (Some(n), _) => {
                            out.extend_from_slice(&bytes);
                            out.resize(out.len() + n - bytes.len(), 0);
                        }
                        (None, Some(by)) => {
                            let holder = message.fields.iter().find(|h| &h.name == by);
                            let Some((holder, (_, hi))) = holder.and_then(|h| Some((h, h.ty.range()?))) else {
                                return Err(format!(
                                    "{} takes its length from {by}, which is not an integer field",
                                    f.name
                                ));
                            };
                            if bytes.len() as i64 > hi {
                                return Err(format!("{} is {} bytes; {by} counts at most {hi}", f.name, bytes.len()));
                            }
                            // The holder is the field just before (checked at parse), skipped above.
                            put_int(&mut out, holder.ty, bytes.len() as i64);
                            out.extend_from_slice(&bytes);
                        }
                        (None, None) => out.extend_from_slice(&bytes),
                    }
                }
            }
        }
        Ok(out)
    }
}

fn check_fields(fields: &[Field]) -> Result<(), String> {
    if fields.len() > MAX_FIELDS {
        return Err(format!("at most {MAX_FIELDS} fields are allowed"));
    }
    for (i, f) in fields.iter().enumerate() {
        let at = |what: &str| format!("field {:?} {what}", f.name);
        if f.name.is_empty() {
            return Err(format!("fields[{i}] needs a name"));
        }
        if fields[..i].iter().any(|o| o.name == f.name) {
            return Err(at("is named twice"));
        }
        match (f.ty.int(), f.length, &f.length_field) {
            (Some(_), None, None) => {}
            (Some(_), ..) => return Err(at("is an integer: its length is its type's")),
            (None, Some(_), Some(_)) => return Err(at("has both length and length_field")),
            (None, Some(0), None) => return Err(at("needs a length of at least 1")),
            (None, Some(_), None) => {}
            (None, None, Some(by)) => {
                let holder = if i > 0 { Some(&fields[i - 1]) } else { None };
                match holder {
                    Some(h) if &h.name == by && matches!(h.ty, FieldType::U8 | FieldType::U16 | FieldType::U32) => {}
                    _ => {
                        return Err(at(&format!(
                            "takes its length from {by:?}, which must be the unsigned field just before it"
                        )));
                    }
                }
            }
            (None, None, None) if i + 1 == fields.len() => {}
            (None, None, None) => return Err(at("needs length or length_field (only the last field runs to the end)")),
        }
    }
    Ok(())
}

struct Reader<'a> {
    frame: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let rest = self.frame.len() - self.at;
        if n > rest {
            return Err(format!("the frame ends before {what}: {n} bytes needed, {rest} left"));
        }
        let bytes = &self.frame[self.at..self.at + n];
        self.at += n;
        Ok(bytes)
    }

    fn int(&mut self, ty: FieldType, what: &str) -> Result<i64, String> {
        let (width, signed) = ty.int().expect("an integer type");
        let bytes = self.take(width, what)?;
        let unsigned = bytes.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b));
        let bits = 8 * width as u32;
        Ok(if signed && unsigned >> (bits - 1) == 1 { unsigned as i64 - (1i64 << bits) } else { unsigned as i64 })
    }
}

fn put_int(out: &mut Vec<u8>, ty: FieldType, n: i64) {
    let (width, _) = ty.int().expect("an integer type");
    out.extend_from_slice(&n.to_be_bytes()[8 - width..]);
}

fn trim_nul(bytes: &[u8]) -> &[u8] {
    let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
    &bytes[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Reading;
    use crate::codec::script::{Budget, Script};
    use std::time::Duration;

    fn script(source: &str) -> Script {
        let budget =
            Budget { call_timeout: Duration::from_millis(200), memory_bytes: 16 << 20, stack_bytes: 256 << 10 };
        Script::compile(source, budget).unwrap()
    }

    fn layout(v: Value) -> Layout {
        Layout::parse(&v).unwrap()
    }

    /// A Huawei script and the layout that describes the same frames.
    const HUAWEI: &str = r#"
    function decode(p, topic) {
        if (p[0] == 0) {
            return JSON.stringify({ msgType: 'deviceReq', hasMore: 0, data: [{ serviceId: 'Meter',
                serviceData: { reading: (p[1] << 24 | p[2] << 16 | p[3] << 8 | p[4]) >>> 0,
                               temperature: (p[5] << 24 >> 16) | p[6], battery: p[7] } }] });
        }
        return JSON.stringify({ msgType: 'deviceRsp', mid: (p[1] << 8) | p[2], errcode: p[3],
            body: { result: p[4] } });
    }
    function encode(json) {
        var o = JSON.parse(json);
        return [1, (o.mid >> 8) & 0xff, o.mid & 0xff, o.paras.open];
    }"#;

    fn huawei() -> Layout {
        layout(json!({"style": "huawei", "message_id": "u8", "messages": [
            {"kind": "report", "id": 0, "service": "Meter", "fields": [
                {"name": "reading", "type": "u32"}, {"name": "temperature", "type": "i16"},
                {"name": "battery", "type": "u8"}]},
            {"kind": "response", "id": 2, "fields": [
                {"name": "mid", "type": "u16"}, {"name": "errcode", "type": "u8"}, {"name": "result", "type": "u8"}]},
            {"kind": "command", "id": 1, "service": "Valve", "command": "SET_VALVE", "fields": [
                {"name": "mid", "type": "u16"}, {"name": "open", "type": "u8"}]}
        ]}))
    }

    #[test]
    fn a_huawei_layout_reads_and_writes_what_its_script_does() {
        let (mut s, l) = (script(HUAWEI), huawei());
        for frame in [&[0, 0xff, 0, 0, 1, 0xff, 0xd6, 87][..], &[2, 0x01, 0x02, 0, 7]] {
            assert_eq!(l.decode(frame).unwrap(), s.read(Reading::Raw, "", frame).unwrap(), "{frame:?}");
        }
        assert_eq!(l.decode(&[0, 0, 0, 0, 5, 0xff, 0xd6, 1]).unwrap()["data"][0]["serviceData"]["temperature"], -42);
        let command = json!({"msgType": "cloudReq", "serviceId": "Valve", "cmd": "SET_VALVE", "mid": 258,
                             "paras": {"open": 1}});
        assert_eq!(l.encode(&command).unwrap(), s.write(&command).unwrap());
        assert_eq!(l.encode(&command).unwrap(), [1, 1, 2, 1]);
    }

    #[test]
    fn an_alibaba_layout_reads_and_writes_what_its_script_does() {
        let source = r#"
        function rawDataToProtocol(bytes) {
            var u = new Uint8Array(bytes.length);
            for (var i = 0; i < bytes.length; i++) { u[i] = bytes[i] & 0xff; }
            var v = new DataView(u.buffer, 0);
            if (u[0] == 0) {
                return { method: 'thing.event.property.post', version: '1.0', id: '' + v.getInt32(1),
                         params: { temperature: v.getInt16(5), switch: u[7] } };
            }
            return { version: '1.0', id: '' + v.getInt32(1), code: '' + v.getUint8(5), data: {} };
        }
        function protocolToRawData(json) {
            var id = parseInt(json['id']);
            return [1, (id >> 24) & 0xff, (id >> 16) & 0xff, (id >> 8) & 0xff, id & 0xff, json.params.switch];
        }"#;
        let l = layout(json!({"style": "alibaba", "message_id": "u8", "messages": [
            {"kind": "report", "id": 0, "fields": [{"name": "id", "type": "i32"},
                {"name": "temperature", "type": "i16"}, {"name": "switch", "type": "u8"}]},
            {"kind": "response", "id": 3, "fields": [{"name": "id", "type": "i32"}, {"name": "code", "type": "u8"}]},
            {"kind": "command", "id": 1, "fields": [{"name": "id", "type": "i32"}, {"name": "switch", "type": "u8"}]}
        ]}));
        let mut s = script(source);
        for frame in [&[0, 0, 0, 0, 7, 0xff, 0xd6, 1][..], &[3, 0, 0, 1, 0, 200]] {
            assert_eq!(l.decode(frame).unwrap(), s.read(Reading::Raw, "", frame).unwrap(), "{frame:?}");
        }
        let set =
            json!({"method": "thing.service.property.set", "id": "256", "version": "1.0", "params": {"switch": 1}});
        assert_eq!(l.encode(&set).unwrap(), s.write(&set).unwrap());
    }

    #[test]
    fn strings_and_bytes_take_fixed_given_or_remaining_lengths() {
        let l = layout(json!({"style": "huawei", "messages": [
            {"kind": "report", "service": "Tag", "fields": [
                {"name": "model", "type": "string", "length": 6},
                {"name": "n", "type": "u8"}, {"name": "label", "type": "string", "length_field": "n"},
                {"name": "rest", "type": "bytes"}]},
            {"kind": "command", "service": "Tag", "command": "NAME", "fields": [
                {"name": "len", "type": "u8"}, {"name": "name", "type": "string", "length_field": "len"},
                {"name": "code", "type": "bytes", "length": 2}, {"name": "pad", "type": "string", "length": 4}]}
        ]}));
        let frame = b"NB-1\0\0\x03abc\xde\xad";
        let data = &l.decode(frame).unwrap()["data"][0]["serviceData"];
        assert_eq!(*data, json!({"model": "NB-1", "label": "abc", "rest": "dead"}), "the length field is not data");
        let cmd = json!({"msgType": "cloudReq", "serviceId": "Tag", "cmd": "NAME", "mid": 1,
                         "paras": {"name": "kitchen", "code": "beef", "pad": "ab"}});
        assert_eq!(l.encode(&cmd).unwrap(), b"\x07kitchen\xbe\xefab\0\0");

        let fails = |frame: &[u8]| l.decode(frame).unwrap_err();
        assert!(fails(b"NB-1").contains("6 bytes needed, 4 left"));
        assert!(fails(b"NB-1\0\0\x09abc").contains("label"));
        assert!(fails(b"NB-1\0\0\x01\xff").contains("label is not UTF-8"));
        let bad = |paras: Value| {
            l.encode(&json!({"msgType": "cloudReq", "serviceId": "Tag", "cmd": "NAME", "paras": paras})).unwrap_err()
        };
        assert!(
            bad(json!({"name": "x", "code": "beef", "pad": "toolong"})).contains("pad is 7 bytes; its field holds 4")
        );
        assert!(bad(json!({"name": "x", "code": "be", "pad": ""})).contains("code is 1 bytes"));
        assert!(bad(json!({"name": "x", "code": "zz", "pad": ""})).contains("code must be hex"));
        assert!(bad(json!({"code": "beef", "pad": ""})).contains("paras needs name as a string"));
        assert!(bad(json!({"name": "x".repeat(256), "code": "beef", "pad": ""})).contains("len counts at most 255"));
    }

    #[test]
    fn frames_and_commands_that_do_not_fit_are_named() {
        let l = huawei();
        assert_eq!(l.decode(&[9]).unwrap_err(), "no uplink message has id 9");
        assert_eq!(l.decode(&[1, 0, 1, 1]).unwrap_err(), "no uplink message has id 1", "a command is not an uplink");
        assert!(l.decode(&[2, 0, 1, 0, 0, 9]).unwrap_err().contains("1 bytes are left"));
        assert!(l.decode(&[]).unwrap_err().contains("before the message id"));
        let cmd = |paras: Value, mid: Value| {
            json!({"msgType": "cloudReq", "serviceId": "Valve", "cmd": "SET_VALVE",
                                                     "mid": mid, "paras": paras})
        };
        assert!(l.encode(&cmd(json!({"open": 256}), json!(1))).unwrap_err().contains("open = 256 is outside 0..=255"));
        assert!(l.encode(&cmd(json!({}), json!(1))).unwrap_err().contains("paras needs open as an integer"));
        assert!(l.encode(&cmd(json!({"open": 1}), Value::Null)).unwrap_err().contains("the message needs mid"));
        let other = json!({"msgType": "cloudReq", "serviceId": "Valve", "cmd": "EXPLODE", "paras": {}});
        assert_eq!(l.encode(&other).unwrap_err(), "the codec has no command EXPLODE of service Valve");
        assert!(l.encode(&json!({"msgType": "deviceReq"})).is_err());
    }

    #[test]
    fn layouts_that_do_not_hold_together_are_refused_with_the_place() {
        let refused = |v: Value| Layout::parse(&v).unwrap_err();
        let report = |fields: Value| {
            json!({"style": "huawei", "messages": [
            {"kind": "report", "service": "S", "fields": fields}]})
        };
        assert!(refused(json!({"style": "huawei", "messages": []})).contains("between 1 and 64"));
        assert!(refused(json!({"style": "tuya", "messages": []})).contains("unknown variant"));
        assert!(
            refused(report(json!([{"name": "a", "type": "u8"}, {"name": "a", "type": "u8"}]))).contains("named twice")
        );
        assert!(refused(report(json!([{"name": "a", "type": "u24"}]))).contains("unknown variant"));
        assert!(refused(report(json!([{"name": "a", "type": "u8", "length": 2}]))).contains("is an integer"));
        assert!(
            refused(report(json!([{"name": "s", "type": "string"}, {"name": "b", "type": "u8"}])))
                .contains("only the last field")
        );
        assert!(
            refused(report(json!([{"name": "n", "type": "i8"}, {"name": "s", "type": "string", "length_field": "n"}])))
                .contains("unsigned field just before")
        );
        assert!(
            refused(json!({"style": "huawei", "messages": [{"kind": "report", "fields": []}]}))
                .contains("messages[0]: a Huawei report or command needs its service")
        );
        let two = json!({"style": "alibaba", "messages": [{"kind": "report", "fields": []},
                                                          {"kind": "response", "fields": []}]});
        assert!(refused(two).contains("needs a message_id"));
        let ids = |a: i64, b: i64| {
            json!({"style": "alibaba", "message_id": "u8", "messages": [
            {"kind": "report", "id": a, "fields": []}, {"kind": "command", "id": b, "fields": []}]})
        };
        assert!(refused(ids(1, 1)).contains("messages[1]: id 1 is used twice"));
        assert!(refused(ids(1, 300)).contains("id 300 is outside 0..=255"));
        assert!(Layout::parse(&ids(0, 255)).is_ok());
        let stringly =
            json!({"style": "alibaba", "message_id": "string", "messages": [{"kind": "report", "fields": []}]});
        assert!(refused(stringly).contains("integer type"));
    }
}
