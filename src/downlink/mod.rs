//! Commands for sleepy devices (SPEC §5): what a command is and how it moves through its states
//! ([`command`]), and each device's queue of open commands ([`queue`]). Both are free of I/O and
//! clocks; the registry keeps one queue per device and the dialects deliver what it hands out.
//! Upgrade requests ([`PcpRequest`]) travel the same channel, ahead of commands.

pub mod command;
pub mod queue;
pub mod stored;

pub use command::{CommandId, CommandRecord, CommandStatus, CommandView, SendStrategy};
pub use queue::{CancelError, Queue, QueueFull, Settlement};

/// A PCP request of the platform (19, 20 or 23) for the device's downlink channel. Only the latest
/// is kept: each replaces the one before, which the upgrade no longer needs.
#[derive(Debug, Clone)]
pub struct PcpRequest {
    pub frame: Vec<u8>,
    /// The exchange carrying it, while one does.
    pub in_flight: Option<crate::coap::resource::ExchangeKey>,
}

impl PcpRequest {
    /// Queues `frame` unless the same request is already on its way.
    pub fn queue(slot: &mut Option<PcpRequest>, frame: Vec<u8>) {
        if slot.as_ref().is_none_or(|p| p.frame != frame || p.in_flight.is_none()) {
            *slot = Some(PcpRequest { frame, in_flight: None });
        }
    }

    /// The exchange carrying it ended: delivered (gone), or not (it waits for the next chance).
    pub fn settle(slot: &mut Option<PcpRequest>, exchange: crate::coap::resource::ExchangeKey, delivered: bool) {
        if let Some(p) = slot
            && p.in_flight == Some(exchange)
        {
            if delivered {
                *slot = None;
            } else {
                p.in_flight = None;
            }
        }
    }
}
