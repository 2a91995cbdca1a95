//! Why a device's request changed nothing: one bounded set of reasons, counted in
//! `nbhub_refusals_total{dialect,reason}` and logged at debug with the device, so an operator can
//! tell from `/metrics` and the log why a device is refused. `/auth`, registration and
//! `/bootstrap` count theirs in `nbhub_auth_total` and `nbhub_bootstrap_total`.

use crate::coap::message::Code;
use crate::coap::resource::Request;
use crate::registry::Device;
use crate::telemetry::metric;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Alibaba,
    Huawei,
    Lwm2m,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Alibaba => "alibaba",
            Dialect::Huawei => "huawei",
            Dialect::Lwm2m => "lwm2m",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token and no DTLS identity, or a token this port family did not issue, or one expired.
    UnknownToken,
    Disabled,
    /// The device lives at another instance (it asks `/bootstrap`).
    Moved,
    /// A topic level that is empty, relative or holds a separator.
    BadTopic,
    /// A topic of another device.
    ForeignTopic,
    /// 5682: a payload without the seq option 2089.
    MissingSeq,
    /// 5682: an option 2089 that does not decrypt to a seq at or above the session's offset.
    BadSeq,
    /// 5682: a seq seen before under this token, or below the replay window.
    ReplayedSeq,
    /// 5682: a payload that does not decrypt under the session key.
    Undecryptable,
    TooLarge,
    /// Over the device's flow-control budget.
    FlowControl,
    /// 5682: an empty request without a seq (Link SDK 4.x sends them): it proves nothing, so it
    /// is answered without changing anything.
    Unproven,
    BadPageSize,
    /// Huawei: a bind without `ep`.
    BadQuery,
    /// Huawei: a node id no device has.
    UnknownNode,
    /// Inside DTLS: a request naming another device than the session's PSK identity.
    ForeignIdentity,
    /// Huawei: a notification under a token no relation has.
    UnknownObserve,
    /// Huawei: a notification from a new address that is not fresher than the relation's last
    /// one (RFC 7641 §3.4): a copy, which may not move the device's downlink.
    StaleNotification,
    /// LwM2M: a Register or Update whose query or link format is malformed.
    BadRegistration(crate::dialect::lwm2m::Malformed),
    /// LwM2M: a Register from an endpoint no device has as its node id.
    UnknownEndpoint,
    /// LwM2M: an Update or Deregister for a registration that does not exist.
    UnknownRegistration,
    /// LwM2M: a Register whose link format comes in a Content-Format other than 40, 0 or 42.
    LinksFormat,
    /// LwM2M: a bootstrap in clear for a device with a PSK, which would have to carry the key.
    KeyInClear,
    /// LwM2M: a Deregister from an address the device's relation did not answer from.
    ForeignAddress,
    /// LwM2M: a package block for a key or task that names no download in progress.
    NoPackage,
    /// LwM2M: a Block2 option that is malformed or uses the reserved size.
    BadBlock,
    /// LwM2M: a package block that starts past the package's end (RFC 7959 §2.2).
    BlockPastEnd,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::UnknownToken => "unknown_token",
            Refusal::Disabled => "disabled",
            Refusal::Moved => "moved",
            Refusal::BadTopic => "bad_topic",
            Refusal::ForeignTopic => "foreign_topic",
            Refusal::MissingSeq => "missing_seq",
            Refusal::BadSeq => "bad_seq",
            Refusal::ReplayedSeq => "replayed_seq",
            Refusal::Undecryptable => "undecryptable",
            Refusal::TooLarge => "too_large",
            Refusal::FlowControl => "flow_control",
            Refusal::Unproven => "unproven",
            Refusal::BadPageSize => "bad_page_size",
            Refusal::BadQuery => "bad_query",
            Refusal::UnknownNode => "unknown_node",
            Refusal::ForeignIdentity => "foreign_identity",
            Refusal::UnknownObserve => "unknown_observe",
            Refusal::StaleNotification => "stale_notification",
            Refusal::BadRegistration(m) => m.reason(),
            Refusal::UnknownEndpoint => "unknown_endpoint",
            Refusal::UnknownRegistration => "unknown_registration",
            Refusal::LinksFormat => "links_format",
            Refusal::KeyInClear => "key_in_clear",
            Refusal::ForeignAddress => "foreign_address",
            Refusal::NoPackage => "no_package",
            Refusal::BadBlock => "bad_block",
            Refusal::BlockPastEnd => "block_past_end",
        }
    }

    /// The code a request refused for this reason gets (SPEC §3.2, §4). Notifications have none:
    /// they are rejected, acknowledged or dropped instead.
    pub fn code(self) -> Code {
        match self {
            Refusal::UnknownToken => Code::UNAUTHORIZED,
            Refusal::Disabled
            | Refusal::Moved
            | Refusal::ForeignTopic
            | Refusal::ForeignIdentity
            | Refusal::UnknownEndpoint
            | Refusal::KeyInClear
            | Refusal::ForeignAddress => Code::FORBIDDEN,
            Refusal::UnknownRegistration | Refusal::NoPackage => Code::NOT_FOUND,
            Refusal::BlockPastEnd => Code::BAD_OPTION,
            Refusal::BadRegistration(_) => Code::BAD_REQUEST,
            Refusal::LinksFormat => Code::UNSUPPORTED_CONTENT_FORMAT,
            // 4.00, not 4.01, for seq trouble: a 4.01 would send the device back to /auth.
            Refusal::BadTopic
            | Refusal::MissingSeq
            | Refusal::BadSeq
            | Refusal::ReplayedSeq
            | Refusal::Undecryptable
            | Refusal::BadPageSize
            | Refusal::BadQuery
            | Refusal::BadBlock
            | Refusal::UnknownObserve
            | Refusal::StaleNotification => Code::BAD_REQUEST,
            Refusal::TooLarge => Code::REQUEST_ENTITY_TOO_LARGE,
            Refusal::FlowControl => Code::TOO_MANY_REQUESTS,
            Refusal::Unproven => Code::CHANGED,
            // LiteOS reads an ACK 5.00 to its bind as "device does not exist".
            Refusal::UnknownNode => Code::INTERNAL_SERVER_ERROR,
        }
    }

    /// Counts and logs the refusal, and notes it for the device's trace; `device` when the
    /// request named one.
    pub fn record(self, dialect: Dialect, device: Option<&Device>, req: &Request<'_, '_>) {
        let peer = req.peer;
        req.note.refused(self.reason(), device.map(|d| d.id));
        metrics::counter!(metric::REFUSALS, "dialect" => dialect.name(), "reason" => self.reason()).increment(1);
        match device {
            Some(d) => tracing::debug!(
                dialect = dialect.name(),
                reason = self.reason(),
                product_key = %d.product_key,
                device_name = %d.device_name,
                %peer,
                "refused"
            ),
            None => tracing::debug!(dialect = dialect.name(), reason = self.reason(), %peer, "refused"),
        }
    }
}

/// What became of a request over its device's flow-control budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverBudget {
    /// Answered 4.29 with Max-Age.
    Refused,
    /// Left unanswered (a notification has no 4.29): a CON is retransmitted later.
    Dropped,
}

/// Counts a request over its device's budget (`nbhub_flow_control_rejections_total{action}` besides the
/// refusal) and logs it.
pub fn over_budget(dialect: Dialect, device: &Device, req: &Request<'_, '_>, what: OverBudget) {
    let action = match what {
        OverBudget::Refused => "refused",
        OverBudget::Dropped => "dropped",
    };
    metrics::counter!(metric::FLOW_CONTROL, "action" => action).increment(1);
    Refusal::FlowControl.record(dialect, Some(device), req);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_trouble_never_sends_a_device_back_to_auth() {
        for r in [Refusal::MissingSeq, Refusal::BadSeq, Refusal::ReplayedSeq, Refusal::Undecryptable] {
            assert_eq!(r.code(), Code::BAD_REQUEST, "{r:?}");
        }
        assert_eq!(Refusal::UnknownToken.code(), Code::UNAUTHORIZED);
    }
}
