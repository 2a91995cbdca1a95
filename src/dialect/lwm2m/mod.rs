//! LwM2M 1.x over CoAP as Huawei's platform serves it (seed 003 §2.1.1, §4.5.2): the requests of
//! the registration interface, and the forms device data and commands take in object 19 (Binary
//! App Data Container). Only wire rules live here; the observe channel they open is served by the
//! same code as the raw Huawei dialect's (`huawei/`), which picks these forms for a device that
//! registered. [`firmware`] holds Object 5's.

pub mod firmware;

use crate::coap::message::{Code, MessageBuilder, MessageType};
use crate::coap::option::{OptionNumber, content_format};

/// Where a registered client's data is filed: the resource the server observes.
pub const UPLINK_TOPIC: &str = "/19/0/0";

/// A registration's lifetime when `lt` is absent (OMA LwM2M 1.x, Server object resource 1).
pub const DEFAULT_LIFETIME_S: u32 = 86_400;

/// What a Register (`POST /rd`) says of the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Register {
    pub endpoint: String,
    /// `lwm2m`; 1.0 when absent (modules often leave it out).
    pub version: String,
    pub lifetime_s: u32,
    /// Queue mode: `b=UQ` (1.0), or the `Q` parameter (1.1).
    pub queue: bool,
}

/// What an Update (`POST /rd/<ep>`) changes; absent parameters stay as registered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    pub lifetime_s: Option<u32>,
    pub queue: Option<bool>,
}

/// Why a registration request is malformed (answered 4.00, changing nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    NoEndpoint,
    Lifetime,
    /// A binding without UDP (SMS only), which this server cannot reach.
    Binding,
    Version,
    Links,
}

impl Malformed {
    pub fn reason(self) -> &'static str {
        match self {
            Malformed::NoEndpoint => "no_endpoint",
            Malformed::Lifetime => "bad_lifetime",
            Malformed::Binding => "bad_binding",
            Malformed::Version => "bad_version",
            Malformed::Links => "bad_links",
        }
    }
}

/// The `name=value` (or bare `name`) parts of a Uri-Query.
fn parts<'a>(queries: impl Iterator<Item = &'a [u8]>) -> impl Iterator<Item = (&'a [u8], Option<&'a [u8]>)> {
    queries.map(|q| match q.iter().position(|b| *b == b'=') {
        Some(i) => (&q[..i], Some(&q[i + 1..])),
        None => (q, None),
    })
}

fn text(v: Option<&[u8]>) -> Option<&str> {
    std::str::from_utf8(v?).ok()
}

fn lifetime(v: Option<&[u8]>) -> Result<u32, Malformed> {
    text(v).and_then(|t| t.parse().ok()).filter(|s| *s > 0).ok_or(Malformed::Lifetime)
}

/// `b`: UDP must be among the transports; `Q` asks for queue mode.
fn binding(v: Option<&[u8]>) -> Result<bool, Malformed> {
    let b = text(v).ok_or(Malformed::Binding)?;
    if !b.contains('U') || !b.chars().all(|c| matches!(c, 'U' | 'Q' | 'S' | 'T' | 'N')) {
        return Err(Malformed::Binding);
    }
    Ok(b.contains('Q'))
}

/// A Register's query: `ep` is required; `lt`, `b`, `lwm2m` and `Q` are read; the rest (`sms`,
/// `apn`, `im`, `ct`, `mt`, `mv`, …) are ignored.
pub fn register<'a>(queries: impl Iterator<Item = &'a [u8]>) -> Result<Register, Malformed> {
    let mut r =
        Register { endpoint: String::new(), version: "1.0".into(), lifetime_s: DEFAULT_LIFETIME_S, queue: false };
    for (name, value) in parts(queries) {
        match name {
            b"ep" => r.endpoint = text(value).filter(|e| !e.is_empty()).ok_or(Malformed::NoEndpoint)?.to_string(),
            b"lt" => r.lifetime_s = lifetime(value)?,
            b"b" => r.queue |= binding(value)?,
            b"Q" => r.queue = true,
            b"lwm2m" => {
                let v = text(value).filter(|v| matches!(*v, "1.0" | "1.1" | "1.2")).ok_or(Malformed::Version)?;
                r.version = v.to_string();
            }
            _ => {}
        }
    }
    if r.endpoint.is_empty() {
        return Err(Malformed::NoEndpoint);
    }
    Ok(r)
}

/// An Update's query: only `lt`, `b` and `Q` mean anything there.
pub fn update<'a>(queries: impl Iterator<Item = &'a [u8]>) -> Result<Update, Malformed> {
    let mut u = Update::default();
    for (name, value) in parts(queries) {
        match name {
            b"lt" => u.lifetime_s = Some(lifetime(value)?),
            b"b" => u.queue = Some(binding(value)? || u.queue == Some(true)),
            b"Q" => u.queue = Some(true),
            _ => {}
        }
    }
    Ok(u)
}

/// The objects and instances a Register's CoRE link format (RFC 6690) lists, e.g.
/// `</>;rt="oma.lwm2m",</1/0>,</3/0>,</19/0>` gives `/1/0`, `/3/0`, `/19/0` (the root link and
/// its attributes are not objects). An empty payload lists none.
pub fn objects(payload: &[u8]) -> Result<Vec<String>, Malformed> {
    let text = std::str::from_utf8(payload).map_err(|_| Malformed::Links)?.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let mut objects = Vec::new();
    for link in text.split(',') {
        let link = link.trim();
        let target = link.strip_prefix('<').and_then(|l| l.split_once('>')).ok_or(Malformed::Links)?;
        let (path, attributes) = target;
        if !(attributes.is_empty() || attributes.starts_with(';')) {
            return Err(Malformed::Links);
        }
        let path = path.strip_suffix('/').unwrap_or(path);
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if path.is_empty() || segments == [""] {
            continue;
        }
        // An object or object instance: at most two numeric levels (a path prefix such as
        // `/lwm2m/` would appear as the root link's target).
        if segments.len() > 2 || !segments.iter().all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())) {
            return Err(Malformed::Links);
        }
        objects.push(format!("/{}", segments.join("/")));
    }
    Ok(objects)
}

/// The observe request on `/19/0/0` the server sends after every Register, under `token`.
pub fn observe_data(token: &[u8]) -> Vec<u8> {
    MessageBuilder::new(MessageType::Con, Code::GET, 0, token)
        .option(OptionNumber::OBSERVE, &[])
        .option(OptionNumber::URI_PATH, b"19")
        .option(OptionNumber::URI_PATH, b"0")
        .option(OptionNumber::URI_PATH, b"0")
        .uint_option(OptionNumber::ACCEPT, content_format::OCTET_STREAM)
        .build()
}

/// A command, or a PCP message of the platform, as LwM2M devices take it: a Write of `payload`
/// to `/19/1/0` (never an Execute, whose payload agent_tiny drops).
pub fn write_command(token: &[u8], payload: &[u8]) -> Vec<u8> {
    MessageBuilder::new(MessageType::Con, Code::PUT, 0, token)
        .option(OptionNumber::URI_PATH, b"19")
        .option(OptionNumber::URI_PATH, b"1")
        .option(OptionNumber::URI_PATH, b"0")
        .uint_option(OptionNumber::CONTENT_FORMAT, content_format::OCTET_STREAM)
        .payload(payload)
        .build()
}

/// The Content-Format of OMA LwM2M TLV.
pub const TLV: u32 = 11542;

/// A resource value as LwM2M TLV carries it (OMA LwM2M 1.0 §6.4.3).
pub enum Value<'a> {
    Text(&'a str),
    Integer(i64),
    Boolean(bool),
    Opaque(&'a [u8]),
}

impl Value<'_> {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Value::Text(t) => t.as_bytes().to_vec(),
            Value::Opaque(b) => b.to_vec(),
            Value::Boolean(b) => vec![*b as u8],
            // The shortest of 1, 2, 4 or 8 bytes, two's complement, big-endian.
            Value::Integer(i) => match *i {
                v if i8::try_from(v).is_ok() => (v as i8).to_be_bytes().to_vec(),
                v if i16::try_from(v).is_ok() => (v as i16).to_be_bytes().to_vec(),
                v if i32::try_from(v).is_ok() => (v as i32).to_be_bytes().to_vec(),
                v => v.to_be_bytes().to_vec(),
            },
        }
    }
}

/// Resources of one object instance, in TLV (each a "resource with value" entry).
pub fn tlv(resources: &[(u16, Value<'_>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, value) in resources {
        let v = value.bytes();
        let mut kind = 0b1100_0000u8;
        if *id > 0xff {
            kind |= 0b0010_0000;
        }
        let len = v.len();
        let length: Vec<u8> = match len {
            0..=7 => {
                kind |= len as u8;
                Vec::new()
            }
            8..=0xff => {
                kind |= 0b0000_1000;
                vec![len as u8]
            }
            0x100..=0xffff => {
                kind |= 0b0001_0000;
                (len as u16).to_be_bytes().to_vec()
            }
            _ => {
                kind |= 0b0001_1000;
                (len as u32).to_be_bytes()[1..].to_vec()
            }
        };
        out.push(kind);
        match *id > 0xff {
            true => out.extend_from_slice(&id.to_be_bytes()),
            false => out.push(*id as u8),
        }
        out.extend(length);
        out.extend(v);
    }
    out
}

/// What a bootstrap writes into a client (OMA LwM2M 1.0 §5.2.7): where its LwM2M server is and
/// how to reach it.
pub struct Provisioning<'a> {
    /// `coaps://host:port` or `coap://host:port`.
    pub server_uri: &'a str,
    /// The PSK identity and key, for a `coaps` server; none for NoSec.
    pub psk: Option<(&'a [u8], &'a [u8])>,
    pub lifetime_s: u32,
    pub binding: &'a str,
}

/// The short id of the one LwM2M server a bootstrap provisions.
const SHORT_SERVER_ID: i64 = 1;

/// The requests of a bootstrap, in order, each complete but for its message id: Bootstrap-Delete
/// of everything but the bootstrap server's account, the Security instance of the LwM2M server,
/// its Server instance, then Bootstrap-Finish.
pub fn bootstrap_requests(p: &Provisioning<'_>) -> Vec<Vec<u8>> {
    let token = |i: u8| [0xb0, i];
    let (mode, identity, key) = match p.psk {
        Some((identity, key)) => (0, identity, key),
        None => (3, &[][..], &[][..]),
    };
    let security = tlv(&[
        (0, Value::Text(p.server_uri)),
        (1, Value::Boolean(false)),
        (2, Value::Integer(mode)),
        (3, Value::Opaque(identity)),
        (4, Value::Opaque(&[])),
        (5, Value::Opaque(key)),
        (10, Value::Integer(SHORT_SERVER_ID)),
    ]);
    let server = tlv(&[
        (0, Value::Integer(SHORT_SERVER_ID)),
        (1, Value::Integer(p.lifetime_s as i64)),
        (7, Value::Text(p.binding)),
    ]);
    let write = |i: u8, path: [&[u8]; 2], body: &[u8]| {
        MessageBuilder::new(MessageType::Con, Code::PUT, 0, &token(i))
            .option(OptionNumber::URI_PATH, path[0])
            .option(OptionNumber::URI_PATH, path[1])
            .uint_option(OptionNumber::CONTENT_FORMAT, TLV)
            .payload(body)
            .build()
    };
    vec![
        MessageBuilder::new(MessageType::Con, Code::DELETE, 0, &token(0)).build(),
        write(1, [b"0", b"1"], &security),
        write(2, [b"1", b"0"], &server),
        MessageBuilder::new(MessageType::Con, Code::POST, 0, &token(3)).option(OptionNumber::URI_PATH, b"bs").build(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(parts: &[&str]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.as_bytes().to_vec()).collect()
    }

    #[test]
    fn register_queries_as_agent_tiny_and_modules_send_them() {
        let agent = q(&["lwm2m=1.0", "ep=863921034567891", "b=UQ", "lt=20"]);
        let r = register(agent.iter().map(Vec::as_slice)).unwrap();
        assert_eq!(
            r,
            Register { endpoint: "863921034567891".into(), version: "1.0".into(), lifetime_s: 20, queue: true }
        );
        let module = q(&["ep=86", "sms=+8613800000000", "apn=cmnet"]);
        let r = register(module.iter().map(Vec::as_slice)).unwrap();
        assert_eq!((r.version.as_str(), r.lifetime_s, r.queue), ("1.0", DEFAULT_LIFETIME_S, false));
        let v11 = q(&["ep=x", "lwm2m=1.1", "b=U", "Q"]);
        assert!(register(v11.iter().map(Vec::as_slice)).unwrap().queue);
        for (bad, why) in [
            (q(&["lt=20"]), Malformed::NoEndpoint),
            (q(&["ep="]), Malformed::NoEndpoint),
            (q(&["ep=x", "lt=0"]), Malformed::Lifetime),
            (q(&["ep=x", "lt=soon"]), Malformed::Lifetime),
            (q(&["ep=x", "b=S"]), Malformed::Binding),
            (q(&["ep=x", "lwm2m=2.0"]), Malformed::Version),
        ] {
            assert_eq!(register(bad.iter().map(Vec::as_slice)), Err(why));
        }
    }

    #[test]
    fn update_queries_change_only_what_they_name() {
        assert_eq!(update(std::iter::empty()), Ok(Update::default()));
        let u = q(&["lt=300", "b=UQ"]);
        assert_eq!(update(u.iter().map(Vec::as_slice)), Ok(Update { lifetime_s: Some(300), queue: Some(true) }));
        let bad = q(&["lt=-1"]);
        assert_eq!(update(bad.iter().map(Vec::as_slice)), Err(Malformed::Lifetime));
    }

    #[test]
    fn tlv_resources_as_the_specification_encodes_them() {
        // OMA LwM2M 1.0 §6.4.3.1's Device object example: resource 0 "Open Mobile Alliance".
        let manufacturer = tlv(&[(0, Value::Text("Open Mobile Alliance"))]);
        assert_eq!(manufacturer[..3], [0xc8, 0x00, 0x14]);
        assert_eq!(&manufacturer[3..], b"Open Mobile Alliance");
        // Short values carry their length in the type byte; integers take the fewest bytes.
        assert_eq!(tlv(&[(2, Value::Integer(3))]), [0xc1, 0x02, 0x03]);
        assert_eq!(tlv(&[(1, Value::Integer(86_400))]), [0xc4, 0x01, 0x00, 0x01, 0x51, 0x80]);
        assert_eq!(tlv(&[(1, Value::Integer(-1))]), [0xc1, 0x01, 0xff]);
        assert_eq!(tlv(&[(1, Value::Boolean(false))]), [0xc1, 0x01, 0x00]);
        assert_eq!(tlv(&[(300, Value::Opaque(&[7; 300]))])[..5], [0xf0, 0x01, 0x2c, 0x01, 0x2c]);
    }

    #[test]
    fn link_format_lists_objects_and_instances() {
        let agent = br#"</>;rt="oma.lwm2m",</1/0>,</2>,</3/0>,</4/0>,</6/0>,</19/0>,</19/1>"#;
        assert_eq!(objects(agent).unwrap(), ["/1/0", "/2", "/3/0", "/4/0", "/6/0", "/19/0", "/19/1"]);
        assert_eq!(objects(b"").unwrap(), Vec::<String>::new());
        assert_eq!(objects(b"</3/0>, </5/0>;ver=1.0").unwrap(), ["/3/0", "/5/0"]);
        for bad in [&b"/3/0"[..], b"<3/0", b"</3/0>x", b"</a/b>", b"</3/0/1>", b"\xff"] {
            assert_eq!(objects(bad), Err(Malformed::Links), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
