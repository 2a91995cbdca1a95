//! The wire rules of an LwM2M firmware update (OMA LwM2M 1.0 Object 5, as seed 003 §3.7 drives
//! it): the resources the server reads (version, radio, update state and result), the
//! observation of the update state, the package URI write and the Update execute, and the path
//! the package is served on block-wise.

use crate::auth::sign::SignMethod;
use crate::coap::message::{Code, MessageBuilder, MessageType};
use crate::coap::option::{OptionNumber, content_format};
use crate::identity::ObserveToken;

use super::TLV;

/// Resources of the client the server reads or observes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// `/3/0/3`, Device: Firmware Version.
    FirmwareVersion,
    /// `/4/0/2`, Connectivity Monitoring: Radio Signal Strength (dBm; RSRP on NB-IoT).
    SignalStrength,
    /// `/4/0/3`, Connectivity Monitoring: Link Quality (SINR on Huawei's modules).
    LinkQuality,
    /// `/4/0/8`, Connectivity Monitoring: Cell ID.
    CellId,
    /// `/5/0/3`, Firmware Update: State.
    UpdateState,
    /// `/5/0/5`, Firmware Update: Update Result.
    UpdateResult,
}

impl Resource {
    pub fn path(self) -> [&'static [u8]; 3] {
        match self {
            Resource::FirmwareVersion => [b"3", b"0", b"3"],
            Resource::SignalStrength => [b"4", b"0", b"2"],
            Resource::LinkQuality => [b"4", b"0", b"3"],
            Resource::CellId => [b"4", b"0", b"8"],
            Resource::UpdateState => [b"5", b"0", b"3"],
            Resource::UpdateResult => [b"5", b"0", b"5"],
        }
    }

    /// As an operator reads it in a failure reason.
    pub fn name(self) -> &'static str {
        match self {
            Resource::FirmwareVersion => "/3/0/3",
            Resource::SignalStrength => "/4/0/2",
            Resource::LinkQuality => "/4/0/3",
            Resource::CellId => "/4/0/8",
            Resource::UpdateState => "/5/0/3",
            Resource::UpdateResult => "/5/0/5",
        }
    }
}

fn request(code: Code, token: &[u8], path: [&[u8]; 3]) -> MessageBuilder {
    let b = MessageBuilder::new(MessageType::Con, code, 0, token);
    path.iter().fold(b, |b, segment| b.option(OptionNumber::URI_PATH, segment))
}

/// A Read of `resource`.
pub fn read(resource: Resource, token: &[u8]) -> Vec<u8> {
    request(Code::GET, token, resource.path()).build()
}

/// An Observe of `resource` under `token`; the same token again renews the observation.
pub fn observe(resource: Resource, token: ObserveToken) -> Vec<u8> {
    MessageBuilder::new(MessageType::Con, Code::GET, 0, &token.0)
        .option(OptionNumber::OBSERVE, &[])
        .option(OptionNumber::URI_PATH, resource.path()[0])
        .option(OptionNumber::URI_PATH, resource.path()[1])
        .option(OptionNumber::URI_PATH, resource.path()[2])
        .build()
}

/// The Write of the package URI to `/5/0/1`, as text (Content-Format 0).
pub fn write_package_uri(token: &[u8], uri: &str) -> Vec<u8> {
    request(Code::PUT, token, [b"5", b"0", b"1"])
        .uint_option(OptionNumber::CONTENT_FORMAT, content_format::TEXT)
        .payload(uri.as_bytes())
        .build()
}

/// The Execute of `/5/0/2` (Update), with no arguments.
pub fn execute_update(token: &[u8]) -> Vec<u8> {
    request(Code::POST, token, [b"5", b"0", b"2"]).build()
}

/// The first segment of the path packages are served on: `/fw/<task>/<ep>/<key>`.
pub const PACKAGE_PATH: &str = "fw";

/// The key of `task`'s package URI for a device: derived from the device's secret (which an
/// LwM2M client never holds or sends), so it is the same after a restart without being stored,
/// differs per task, and nobody who has not seen the URI can have the package served.
pub fn package_key(device_secret: &str, task: u64) -> String {
    let mac = SignMethod::HmacSha256.sign_hex(device_secret.as_bytes(), format!("nbhub-package/{task}").as_bytes());
    mac[..16].to_string()
}

/// The package URI written to a client: no query (agent_tiny ignores one).
pub fn package_uri(scheme: &str, host: &str, port: u16, task: u64, endpoint: &str, key: &str) -> String {
    let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
    format!("{scheme}://{host}:{port}/{PACKAGE_PATH}/{task}/{endpoint}/{key}")
}

/// The client's firmware update state (`/5/0/3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateState {
    Idle,
    Downloading,
    Downloaded,
    Updating,
}

impl UpdateState {
    pub fn from_value(v: i64) -> Option<UpdateState> {
        Some(match v {
            0 => UpdateState::Idle,
            1 => UpdateState::Downloading,
            2 => UpdateState::Downloaded,
            3 => UpdateState::Updating,
            _ => return None,
        })
    }
}

/// What an Update Result (`/5/0/5`) says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateResult {
    /// 0: no update finished yet (or a new download began).
    Initial,
    /// 1: the firmware was updated.
    Succeeded,
    /// 2–9, with the failure reason the platform reports.
    Failed(String),
}

impl UpdateResult {
    pub fn from_value(v: i64) -> UpdateResult {
        let why = match v {
            0 => return UpdateResult::Initial,
            1 => return UpdateResult::Succeeded,
            2 => "Not enough storage for the new firmware package",
            3 => "Out of memory during downloading process",
            4 => "Connection lost during downloading process",
            5 => "Integrity check failure for new downloaded package",
            6 => "Unsupported package type",
            7 => "Invalid URI",
            8 => "Firmware update failed",
            9 => "Unsupported protocol",
            other => {
                return UpdateResult::Failed(format!(
                    "The device reports update result {other}, which LwM2M does not define"
                ));
            }
        };
        UpdateResult::Failed(why.into())
    }
}

/// The value of the first resource in a TLV payload.
fn tlv_value(b: &[u8]) -> Option<&[u8]> {
    let kind = *b.first()?;
    let id_len = if kind & 0b0010_0000 != 0 { 2 } else { 1 };
    let len_len = ((kind >> 3) & 0b11) as usize;
    let header = 1 + id_len + len_len;
    let len = match len_len {
        0 => (kind & 0b111) as usize,
        _ => b.get(1 + id_len..header)?.iter().fold(0usize, |acc, x| (acc << 8) | *x as usize),
    };
    b.get(header..header + len)
}

/// A single resource's value as text, whatever form the client answered in (plain text, TLV, or
/// opaque bytes holding text).
pub fn text(content_format: Option<u32>, payload: &[u8]) -> Option<String> {
    let bytes = match content_format {
        Some(TLV) => tlv_value(payload)?,
        None | Some(content_format::TEXT | content_format::OCTET_STREAM) => payload,
        Some(_) => return None,
    };
    let s = std::str::from_utf8(bytes).ok()?.trim_end_matches('\0').trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// A single integer resource's value: decimal text, or a TLV integer (big-endian two's
/// complement of 1, 2, 4 or 8 bytes).
pub fn integer(content_format: Option<u32>, payload: &[u8]) -> Option<i64> {
    match content_format {
        Some(TLV) => {
            let v = tlv_value(payload)?;
            Some(match v.len() {
                1 => v[0] as i8 as i64,
                2 => i16::from_be_bytes(v.try_into().ok()?) as i64,
                4 => i32::from_be_bytes(v.try_into().ok()?) as i64,
                8 => i64::from_be_bytes(v.try_into().ok()?),
                _ => return None,
            })
        }
        _ => text(content_format, payload)?.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coap::message::Message;
    use crate::dialect::lwm2m::{Value, tlv};

    fn path_of(m: &Message<'_>) -> Vec<String> {
        m.options_of(OptionNumber::URI_PATH).map(|s| String::from_utf8(s.to_vec()).unwrap()).collect()
    }

    #[test]
    fn values_are_read_from_text_and_from_tlv() {
        assert_eq!(integer(Some(content_format::TEXT), b"-97"), Some(-97));
        assert_eq!(integer(None, b"2"), Some(2));
        assert_eq!(integer(Some(TLV), &tlv(&[(3, Value::Integer(2))])), Some(2));
        assert_eq!(integer(Some(TLV), &tlv(&[(2, Value::Integer(-105))])), Some(-105));
        assert_eq!(integer(Some(TLV), &tlv(&[(8, Value::Integer(123_456))])), Some(123_456));
        assert_eq!(integer(Some(content_format::TEXT), b"two"), None);
        assert_eq!(text(Some(TLV), &tlv(&[(3, Value::Text("V1.2.0"))])).as_deref(), Some("V1.2.0"));
        // A long value takes a length byte; an id above 255 two id bytes.
        let long = "v".repeat(20);
        assert_eq!(text(Some(TLV), &tlv(&[(300, Value::Text(&long))])), Some(long));
        assert_eq!(text(Some(content_format::TEXT), b"1.0.0\0"), Some("1.0.0".into()));
        assert_eq!(text(Some(content_format::JSON), b"{}"), None);
        assert_eq!(text(Some(TLV), &[0xC8, 3]), None, "truncated TLV");
    }

    #[test]
    fn requests_name_object_5_and_the_uri_carries_the_task_and_key() {
        let token = ObserveToken::from_bytes(&[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let key = package_key("secret", 7);
        assert_eq!(key.len(), 16);
        assert_ne!(key, package_key("secret", 8), "a key per task");
        assert_ne!(key, package_key("other", 7), "a key per device");
        let uri = package_uri("coap", "192.0.2.1", 5683, 7, "8639", &key);
        assert_eq!(uri, format!("coap://192.0.2.1:5683/fw/7/8639/{key}"));
        assert_eq!(package_uri("coaps", "::1", 5684, 7, "8639", &key), format!("coaps://[::1]:5684/fw/7/8639/{key}"));
        let w = write_package_uri(&[9], &uri);
        let m = Message::parse(&w).unwrap();
        assert_eq!((m.code, path_of(&m)), (Code::PUT, vec!["5".into(), "0".into(), "1".into()]));
        assert_eq!(m.uint_option(OptionNumber::CONTENT_FORMAT), Ok(Some(content_format::TEXT)));
        assert_eq!(m.payload, uri.as_bytes());
        let o = observe(Resource::UpdateState, token);
        let m = Message::parse(&o).unwrap();
        assert_eq!((m.token, m.option(OptionNumber::OBSERVE)), (&token.0[..], Some(&[][..])));
        let e = execute_update(&[9]);
        let m = Message::parse(&e).unwrap();
        assert_eq!((m.code, path_of(&m), m.payload), (Code::POST, vec!["5".into(), "0".into(), "2".into()], &[][..]));
    }

    #[test]
    fn update_results_name_their_failure() {
        assert_eq!(UpdateResult::from_value(1), UpdateResult::Succeeded);
        assert_eq!(UpdateResult::from_value(0), UpdateResult::Initial);
        assert_eq!(
            UpdateResult::from_value(5),
            UpdateResult::Failed("Integrity check failure for new downloaded package".into())
        );
        assert!(matches!(UpdateResult::from_value(42), UpdateResult::Failed(why) if why.contains("42")));
        assert_eq!(UpdateState::from_value(2), Some(UpdateState::Downloaded));
        assert_eq!(UpdateState::from_value(4), None);
    }
}
