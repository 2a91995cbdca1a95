//! The transport OpenSSL sees for one peer: a pipe holding one received datagram at a time and
//! collecting what OpenSSL writes, each `write` being one datagram (as on a UDP socket).

use std::io::{self, Read, Write};

#[derive(Default)]
pub struct Pipe {
    inbound: Option<Vec<u8>>,
    outbound: Vec<Vec<u8>>,
}

impl Pipe {
    pub fn put(&mut self, datagram: &[u8]) {
        self.inbound = Some(datagram.to_vec());
    }

    pub fn take_outbound(&mut self) -> std::vec::Drain<'_, Vec<u8>> {
        self.outbound.drain(..)
    }

    /// Drops what the last call left unread, so it is never mistaken for a later datagram.
    pub fn clear_inbound(&mut self) {
        self.inbound = None;
    }
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inbound.take() {
            // A datagram larger than OpenSSL's buffer is cut, as a socket would; its record
            // then fails to parse and is discarded.
            Some(d) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Ok(n)
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.outbound.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
