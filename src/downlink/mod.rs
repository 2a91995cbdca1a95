//! Commands for sleepy devices (SPEC §5): what a command is and how it moves through its states
//! ([`command`]), and each device's queue of open commands ([`queue`]), both free of I/O and
//! clocks; the service that keeps every device's queue ([`service`]), whose commands the dialects
//! deliver.

pub mod command;
pub mod queue;
pub mod service;
pub mod stored;

pub use command::{
    Answered, CommandId, CommandRecord, CommandStatus, CommandView, JsonCommand, NewRecord, SendStrategy,
};
pub use queue::{CancelError, Queue, QueueFull, Settlement};
pub use service::{CommandError, Commands, NewCommand};
