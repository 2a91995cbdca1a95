//! Commands as JSON, in each vendor's shapes: what an application's JSON becomes before the
//! script encodes it (Huawei's `cloudReq` with its `mid`, an Alink message with its `id`), and
//! how a decoded uplink is recognised as a device's answer to one (Huawei's `deviceRsp` with the
//! `mid` and `errcode`, Alibaba's `down_raw_reply` with the `id` and `code`).

use serde_json::{Map, Value};

use super::Style;

/// The Huawei `mid` of command `id`: its low 16 bits, unique over any 65,536 consecutive
/// commands of the instance and so over a device's recent ones.
pub fn mid_of(id: u64) -> u16 {
    (id & 0xffff) as u16
}

/// The newest command id at most `newest` whose `mid` is `mid`.
pub fn id_of_mid(mid: u16, newest: u64) -> Option<u64> {
    let candidate = (newest & !0xffff) | u64::from(mid);
    if candidate <= newest { Some(candidate) } else { candidate.checked_sub(0x1_0000) }
}

/// The message an application's JSON command `app` becomes for a codec of `style`, as command
/// `id`: the fields that link the device's answer to it are nbhub's to set.
pub fn outgoing(style: Style, id: u64, app: &Value) -> Result<Value, String> {
    let Value::Object(fields) = app else { return Err("payload_json must be a JSON object".into()) };
    let mut m: Map<String, Value> = fields.clone();
    match style {
        Style::Huawei => {
            if m.contains_key("mid") {
                return Err("payload_json must not set mid: nbhub numbers the command".into());
            }
            match m.get("msgType") {
                None => {
                    m.insert("msgType".into(), "cloudReq".into());
                }
                Some(t) if t == "cloudReq" => {}
                Some(t) => return Err(format!("payload_json has msgType {t}; a command is a cloudReq")),
            }
            if !m.get("serviceId").is_some_and(Value::is_string) || !m.get("cmd").is_some_and(Value::is_string) {
                return Err("payload_json must name the command's serviceId and cmd as strings".into());
            }
            m.entry("paras").or_insert_with(|| Value::Object(Map::new()));
            m.entry("hasMore").or_insert(0.into());
            m.insert("mid".into(), mid_of(id).into());
        }
        Style::Alibaba => {
            if m.contains_key("id") {
                return Err("payload_json must not set id: nbhub numbers the command".into());
            }
            m.entry("method").or_insert_with(|| "thing.service.property.set".into());
            m.entry("version").or_insert_with(|| "1.0".into());
            m.entry("params").or_insert_with(|| Value::Object(Map::new()));
            m.insert("id".into(), id.to_string().into());
        }
    }
    Ok(Value::Object(m))
}

/// Which command a device's answer names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerTo {
    /// Huawei's `mid`: the low bits of the command's id.
    Mid(u16),
    /// Alibaba's `id`: the command's id.
    Id(u64),
}

/// A device's answer to a command, as its codec read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub to: AnswerTo,
    /// Huawei's `errcode` (0 is success), Alibaba's `code` (200 is success).
    pub code: i64,
    pub ok: bool,
}

/// The answer an uplink on `topic` decoded as `decoded` by a codec of `style` carries, if any.
pub fn answer(style: Style, topic: &str, decoded: &Value) -> Option<Answer> {
    match style {
        Style::Huawei => {
            if decoded.get("msgType")? != "deviceRsp" {
                return None;
            }
            let mid = u16::try_from(decoded.get("mid")?.as_u64()?).ok()?;
            let code = decoded.get("errcode").map_or(Some(0), integer)?;
            Some(Answer { to: AnswerTo::Mid(mid), code, ok: code == 0 })
        }
        Style::Alibaba => {
            if !topic.ends_with("/thing/model/down_raw_reply") {
                return None;
            }
            let id = u64::try_from(integer(decoded.get("id")?)?).ok()?;
            let code = decoded.get("code").map_or(Some(200), integer)?;
            Some(Answer { to: AnswerTo::Id(id), code, ok: code == 200 })
        }
    }
}

/// The properties a decoded uplink reports, as they go into the device shadow's `reported`
/// section: Huawei's `deviceReq` as `{serviceId: serviceData}` per entry of `data`, Alibaba's
/// `thing.event.property.post` as its `params`.
pub fn properties(style: Style, decoded: &Value) -> Option<Map<String, Value>> {
    match style {
        Style::Huawei => {
            if decoded.get("msgType")? != "deviceReq" {
                return None;
            }
            let reported: Map<String, Value> = decoded
                .get("data")?
                .as_array()?
                .iter()
                .filter_map(|d| Some((d.get("serviceId")?.as_str()?.to_string(), d.get("serviceData")?.clone())))
                .filter(|(_, data)| data.is_object())
                .collect();
            (!reported.is_empty()).then_some(reported)
        }
        Style::Alibaba => {
            if decoded.get("method")? != "thing.event.property.post" {
                return None;
            }
            decoded.get("params")?.as_object().filter(|p| !p.is_empty()).cloned()
        }
    }
}

/// The command that asks a Huawei device to take on a service's desired properties: nbhub's
/// convention (documented in the README) is `cmd` `SET_PROPERTIES` with the properties as
/// `paras`, for the product's script to encode like any other command.
pub const SET_PROPERTIES: &str = "SET_PROPERTIES";

/// The application-side command for one service's delta, before [`outgoing`] numbers it.
pub fn property_set(service: &str, delta: &Value) -> Option<Value> {
    delta.is_object().then(|| serde_json::json!({"serviceId": service, "cmd": SET_PROPERTIES, "paras": delta}))
}

/// A number, or a string of one (Alibaba's scripts write ids and codes as `'' + n`).
pub(super) fn integer(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.trim().parse().ok(),
        v => v.as_i64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mids_are_the_low_bits_and_lead_back_to_the_newest_id() {
        assert_eq!(mid_of(0x1_0005), 5);
        assert_eq!(id_of_mid(5, 0x1_0007), Some(0x1_0005));
        assert_eq!(id_of_mid(9, 0x1_0007), Some(0x0009));
        assert_eq!(id_of_mid(9, 7), None);
        assert_eq!(id_of_mid(7, 7), Some(7));
    }

    #[test]
    fn huawei_commands_become_cloud_requests_numbered_by_nbhub() {
        let app = json!({"serviceId": "Valve", "cmd": "SET", "paras": {"open": 1}});
        let m = outgoing(Style::Huawei, 0x2_0003, &app).unwrap();
        assert_eq!(
            m,
            json!({"msgType": "cloudReq", "serviceId": "Valve", "cmd": "SET", "paras": {"open": 1}, "hasMore": 0, "mid": 3})
        );
        assert!(
            outgoing(Style::Huawei, 1, &json!({"serviceId": "V", "cmd": "S", "mid": 4})).unwrap_err().contains("mid")
        );
        assert!(outgoing(Style::Huawei, 1, &json!({"cmd": "S"})).unwrap_err().contains("serviceId"));
        assert!(outgoing(Style::Huawei, 1, &json!([1])).unwrap_err().contains("object"));
        let rsp = outgoing(Style::Huawei, 1, &json!({"msgType": "deviceRsp", "serviceId": "V", "cmd": "S"}));
        assert!(rsp.unwrap_err().contains("cloudReq"));
    }

    #[test]
    fn alibaba_commands_become_alink_messages_with_the_command_id() {
        let m = outgoing(Style::Alibaba, 42, &json!({"params": {"switch": 1}})).unwrap();
        assert_eq!(
            m,
            json!({"method": "thing.service.property.set", "version": "1.0", "params": {"switch": 1}, "id": "42"})
        );
        assert!(outgoing(Style::Alibaba, 42, &json!({"id": "1"})).unwrap_err().contains("id"));
    }

    #[test]
    fn reported_properties_come_from_each_vendors_property_report() {
        let req = json!({"msgType": "deviceReq", "hasMore": 0, "data": [
            {"serviceId": "Meter", "serviceData": {"volume": 12}},
            {"serviceId": "Battery", "serviceData": {"level": 80}},
            {"serviceId": "Odd", "serviceData": 5}]});
        assert_eq!(
            properties(Style::Huawei, &req),
            Some(json!({"Meter": {"volume": 12}, "Battery": {"level": 80}}).as_object().unwrap().clone())
        );
        assert_eq!(properties(Style::Huawei, &json!({"msgType": "deviceRsp", "mid": 1})), None);
        let post = json!({"method": "thing.event.property.post", "id": "1", "params": {"temp": 21}});
        assert_eq!(properties(Style::Alibaba, &post), Some(json!({"temp": 21}).as_object().unwrap().clone()));
        assert_eq!(properties(Style::Alibaba, &json!({"method": "thing.event.Error.post", "params": {"e": 1}})), None);
        assert_eq!(
            property_set("Valve", &json!({"open": 1})),
            Some(json!({"serviceId": "Valve", "cmd": "SET_PROPERTIES", "paras": {"open": 1}}))
        );
        assert_eq!(property_set("Valve", &json!(1)), None);
    }

    #[test]
    fn answers_are_recognised_by_their_vendor_shape() {
        let rsp = json!({"msgType": "deviceRsp", "mid": 3, "errcode": 0, "body": {"result": 0}});
        assert_eq!(answer(Style::Huawei, "", &rsp), Some(Answer { to: AnswerTo::Mid(3), code: 0, ok: true }));
        let failed = json!({"msgType": "deviceRsp", "mid": 3, "errcode": 1});
        assert_eq!(answer(Style::Huawei, "", &failed).map(|a| a.ok), Some(false));
        assert_eq!(answer(Style::Huawei, "", &json!({"msgType": "deviceReq", "mid": 3})), None);
        assert_eq!(answer(Style::Huawei, "", &json!({"msgType": "deviceRsp", "mid": 70000})), None);

        let reply = json!({"id": "42", "code": 200, "data": {}});
        let topic = "/sys/pk/dn/thing/model/down_raw_reply";
        assert_eq!(answer(Style::Alibaba, topic, &reply), Some(Answer { to: AnswerTo::Id(42), code: 200, ok: true }));
        assert_eq!(answer(Style::Alibaba, topic, &json!({"id": 42, "code": 6813})).map(|a| a.ok), Some(false));
        let strings = json!({"id": "42", "code": "200", "data": {}});
        assert_eq!(answer(Style::Alibaba, topic, &strings).map(|a| (a.to, a.ok)), Some((AnswerTo::Id(42), true)));
        assert_eq!(answer(Style::Alibaba, "/sys/pk/dn/thing/model/up_raw", &reply), None);
    }
}
