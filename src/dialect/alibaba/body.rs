//! Request bodies of `/auth` and `/auth/register/device`: a flat JSON or CBOR map whose values may
//! be strings or numbers (iotkit sends `"seq":"10"`, other firmware `"seq":10`). Values become
//! their string form, which is also what enters the signature (`16` signs as `"16"`).

use std::collections::BTreeMap;

use crate::coap::option::content_format;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the body is not a JSON or CBOR object")]
    NotAnObject,
    #[error("a value is neither a string nor a number")]
    BadValue,
}

/// Keys whose values are ignored whatever their type (Link SDK sends `resources` as an object).
const IGNORED_STRUCTURED: [&str; 1] = ["resources"];

pub type Fields = BTreeMap<String, String>;

pub fn parse(content_format: Option<u32>, payload: &[u8]) -> Result<Fields, BodyError> {
    match content_format {
        Some(content_format::CBOR) => parse_cbor(payload),
        _ => parse_json(payload),
    }
}

fn parse_json(payload: &[u8]) -> Result<Fields, BodyError> {
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(payload).map_err(|_| BodyError::NotAnObject)?;
    let mut out = Fields::new();
    for (k, v) in map {
        let s = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            _ if IGNORED_STRUCTURED.contains(&k.as_str()) => continue,
            _ => return Err(BodyError::BadValue),
        };
        out.insert(k, s);
    }
    Ok(out)
}

fn parse_cbor(payload: &[u8]) -> Result<Fields, BodyError> {
    use ciborium::Value;
    let value: Value = ciborium::from_reader(payload).map_err(|_| BodyError::NotAnObject)?;
    let Value::Map(entries) = value else { return Err(BodyError::NotAnObject) };
    let mut out = Fields::new();
    for (k, v) in entries {
        let Value::Text(k) = k else { return Err(BodyError::NotAnObject) };
        let s = match v {
            Value::Text(s) => s,
            Value::Integer(i) => i128::from(i).to_string(),
            Value::Float(f) => serde_json::Number::from_f64(f).ok_or(BodyError::BadValue)?.to_string(),
            _ if IGNORED_STRUCTURED.contains(&k.as_str()) => continue,
            _ => return Err(BodyError::BadValue),
        };
        out.insert(k, s);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_and_numbers() {
        let f = parse(Some(50), br#"{"productKey":"pk","seq":16,"timestamp":"789","resources":{"a":1}}"#).unwrap();
        assert_eq!(f["seq"], "16");
        assert_eq!(f["timestamp"], "789");
        assert!(!f.contains_key("resources"));
        assert_eq!(parse(None, b"[1]"), Err(BodyError::NotAnObject));
        assert_eq!(parse(None, br#"{"a":[1]}"#), Err(BodyError::BadValue));
        assert_eq!(parse(None, b"{\"a\":"), Err(BodyError::NotAnObject));
    }

    #[test]
    fn cbor_map() {
        use ciborium::Value;
        let v = Value::Map(vec![
            (Value::Text("productKey".into()), Value::Text("pk".into())),
            (Value::Text("seq".into()), Value::Integer(10.into())),
        ]);
        let mut buf = Vec::new();
        ciborium::into_writer(&v, &mut buf).unwrap();
        let f = parse(Some(60), &buf).unwrap();
        assert_eq!(f["productKey"], "pk");
        assert_eq!(f["seq"], "10");
    }
}
