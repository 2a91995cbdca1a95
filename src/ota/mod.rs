//! Firmware and software upgrades over Huawei's PCP (SPEC §6, seed 003 §3.8): the message codec
//! ([`pcp`]), packages ([`package`]), the per-cell download budget ([`coverage`]), tasks
//! ([`task`]), the per-device upgrade state machine ([`upgrade`]), and the campaign that runs
//! them ([`campaign`]).

pub mod campaign;
pub mod coverage;
pub mod package;
pub mod pcp;
pub mod stored;
pub mod task;
pub mod upgrade;
