//! Northbound (SPEC §9): events for applications, appended to a durable outbox in the same write
//! batch as the change they report ([`event`]), and delivered to webhook subscribers at least
//! once, with retries and back-off, by one task per subscription ([`delivery`]).

pub mod delivery;
pub mod event;
pub mod inbound;
pub mod mqtt;
pub mod nats;
pub mod outlet;
pub mod readers;
pub mod stored;
pub mod streaming;
pub mod subject;
pub mod webhooks;

pub use event::{Event, EventKind, Wanted};
pub use webhooks::{WebhookId, WebhookRecord, Webhooks};
