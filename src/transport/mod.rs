//! The I/O shell: sockets and the tasks that feed the protocol cores.

pub mod dtls;
pub mod link;
pub mod mmsg;
pub mod udp;
