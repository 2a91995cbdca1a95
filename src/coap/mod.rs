//! CoAP (RFC 7252) without I/O: the message codec, option numbers, block-wise transfers, deduplication, the reliability
//! layer of the CONs the server sends, and the server endpoint that drives resource handlers. A
//! leaf: it knows nothing of devices' dialects or of the store.

pub mod block;
pub mod dedup;
pub mod endpoint;
pub mod message;
pub mod observe;
pub mod option;
pub mod pending;
pub mod reliability;
pub mod resource;
pub mod trace;

#[cfg(test)]
mod tests;
