//! Device-facing protocols served over the CoAP endpoint.

pub mod alibaba;
