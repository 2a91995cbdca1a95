//! CoAP (RFC 7252) without I/O: the message codec, option numbers, deduplication and the server
//! endpoint that drives resource handlers.

pub mod dedup;
pub mod endpoint;
pub mod message;
pub mod observe;
pub mod option;
pub mod resource;
