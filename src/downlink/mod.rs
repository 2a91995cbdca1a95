//! Commands for sleepy devices (SPEC §5): what a command is and how it moves through its states
//! ([`command`]), and each device's queue of open commands ([`queue`]). Both are free of I/O and
//! clocks; the registry keeps one queue per device and the dialects deliver what it hands out.

pub mod command;
pub mod queue;

pub use command::{CommandId, CommandRecord, CommandStatus, CommandView, SendStrategy};
pub use queue::{CancelError, Queue, QueueFull, Settlement};
