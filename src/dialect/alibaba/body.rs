//! Request bodies of `/auth` and `/auth/register/device`: a flat JSON or CBOR map whose values may
//! be strings or numbers (iotkit sends `"seq":"10"`, other firmware `"seq":10`). Values become
//! their string form, which is also what enters the signature (`16` signs as `"16"`).

use std::collections::BTreeMap;

use crate::auth::sign::SignMethod;
use crate::coap::message::Code;
use crate::coap::option::{OptionNumber, content_format};
use crate::coap::resource::{Request, Response};

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

/// A signed request body (`/auth`, `/auth/register/device`) with the representation the device
/// wants its answer in.
pub struct SignedBody {
    pub fields: Fields,
    /// Content-Format for the reply: JSON unless the device asked for CBOR.
    pub accept: u32,
    pub method: SignMethod,
}

/// Why a signed body was refused: the CoAP code and a label for the metrics.
pub type Refusal = (Code, &'static str);

impl SignedBody {
    /// Content negotiation (seed 002 table 3-3: 4.06 / 4.15), parsing, and `signmethod`
    /// (`default` when absent).
    pub fn read(req: &Request<'_, '_>, default: SignMethod) -> Result<SignedBody, Refusal> {
        let accept = match req.msg.uint_option(OptionNumber::ACCEPT) {
            Ok(None) => content_format::JSON,
            Ok(Some(f @ (content_format::JSON | content_format::CBOR))) => f,
            _ => return Err((Code::NOT_ACCEPTABLE, "not_acceptable")),
        };
        let cf = match req.msg.uint_option(OptionNumber::CONTENT_FORMAT) {
            Ok(f @ (None | Some(content_format::JSON | content_format::CBOR))) => f,
            _ => return Err((Code::UNSUPPORTED_CONTENT_FORMAT, "unsupported_content_format")),
        };
        let fields = parse(cf, req.msg.payload).map_err(|_| (Code::BAD_REQUEST, "bad_body"))?;
        let method = match fields.get("signmethod") {
            None => default,
            Some(m) => SignMethod::parse(m).ok_or((Code::BAD_REQUEST, "bad_signmethod"))?,
        };
        Ok(SignedBody { fields, accept, method })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// The values of required fields, or 4.00 if one is missing.
    pub fn require<const N: usize>(&self, keys: [&str; N]) -> Result<[&str; N], Refusal> {
        let mut out = [""; N];
        for (slot, key) in out.iter_mut().zip(keys) {
            *slot = self.get(key).ok_or((Code::BAD_REQUEST, "missing_field"))?;
        }
        Ok(out)
    }

    /// A 2.05 carrying `value` as JSON or CBOR, as the device accepts.
    pub fn reply(&self, value: serde_json::Value) -> Response {
        if self.accept == content_format::CBOR {
            let mut buf = Vec::new();
            ciborium::into_writer(&value, &mut buf).expect("a JSON value encodes as CBOR");
            Response::with_payload(Code::CONTENT, content_format::CBOR, buf)
        } else {
            Response::with_payload(Code::CONTENT, content_format::JSON, value.to_string().into_bytes())
        }
    }
}

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
