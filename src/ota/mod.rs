//! Firmware and software upgrades over Huawei's PCP (SPEC §6, seed 003 §3.8): the message codec
//! ([`pcp`]), packages ([`package`]) and the per-cell download budget ([`coverage`]).

pub mod coverage;
pub mod package;
pub mod pcp;
