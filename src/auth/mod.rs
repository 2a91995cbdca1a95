//! Device credentials as pure functions: signatures, the 5682 session cipher, anti-replay windows.

pub mod cipher;
pub mod replay;
pub mod sign;
