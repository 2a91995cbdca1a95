//! LwM2M 1.x over CoAP as Huawei's platform serves it (seed 003 §2.1.1, §4.5.2): the requests of
//! the registration interface, and the forms device data and commands take in object 19 (Binary
//! App Data Container). Only wire rules live here; the observe channel they open is served by the
//! same code as the raw Huawei dialect's (`huawei/`), which picks these forms for a device that
//! registered.

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
