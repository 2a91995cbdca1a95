//! Batched UDP I/O with `recvmmsg`/`sendmmsg`: one system call moves up to a batch of datagrams,
//! which is how a UDP server gets near the kernel's packet rate. Linux only, like the server.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use bytes::Bytes;

/// Receive buffers for one `recvmmsg` call.
pub struct RecvBatch {
    slot: usize,
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    lens: Vec<(usize, bool)>,
}

// SAFETY: the raw pointers in `iovs`/`hdrs` are rebuilt before every call and only ever point
// into this struct's own buffers; nothing is shared across threads while a call is running.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// `count` datagrams of at most `slot` bytes each; longer ones are reported truncated.
    pub fn new(count: usize, slot: usize) -> RecvBatch {
        RecvBatch {
            slot,
            bufs: vec![0; count * slot],
            // SAFETY: all-zero is a valid sockaddr_storage / iovec / mmsghdr.
            addrs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..count).map(|_| unsafe { zeroed() }).collect(),
            lens: vec![(0, false); count],
        }
    }

    pub fn capacity(&self) -> usize {
        self.hdrs.len()
    }

    /// Receives without blocking; `WouldBlock` when nothing is queued.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.hdrs.len();
        for i in 0..n {
            self.iovs[i] = libc::iovec { iov_base: self.bufs[i * self.slot..].as_mut_ptr().cast(), iov_len: self.slot };
            // SAFETY: zeroed msghdr is valid; the pointers set below outlive the call.
            let mut h: libc::msghdr = unsafe { zeroed() };
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            self.hdrs[i] = libc::mmsghdr { msg_hdr: h, msg_len: 0 };
        }
        // SAFETY: hdrs holds n initialised headers pointing into live buffers.
        let r = unsafe {
            libc::recvmmsg(fd, self.hdrs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT, std::ptr::null_mut())
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = r as usize;
        for i in 0..r {
            let truncated = self.hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            self.lens[i] = ((self.hdrs[i].msg_len as usize).min(self.slot), truncated);
        }
        Ok(r)
    }

    /// Datagram `i` of the last call: sender, bytes, and whether it was longer than the slot.
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8], bool)> {
        let (len, truncated) = self.lens[i];
        let peer = from_sockaddr(&self.addrs[i])?;
        Some((peer, &self.bufs[i * self.slot..i * self.slot + len], truncated))
    }
}

/// Sends `datagrams` with as few `sendmmsg` calls as possible. Returns how many were handed to
/// the kernel; `WouldBlock` if none could be. A datagram the kernel refuses outright (say, an
/// unreachable address) is skipped and counted as sent so one bad peer cannot wedge the queue.
pub fn send(fd: RawFd, datagrams: &[(SocketAddr, Bytes)]) -> io::Result<usize> {
    const BATCH: usize = 64;
    let mut done = 0;
    while done < datagrams.len() {
        let chunk = &datagrams[done..(done + BATCH).min(datagrams.len())];
        let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
            chunk.iter().map(|(a, _)| to_sockaddr(a)).collect();
        let mut iovs: Vec<libc::iovec> = chunk
            .iter()
            .map(|(_, d)| libc::iovec { iov_base: d.as_ptr() as *mut libc::c_void, iov_len: d.len() })
            .collect();
        let mut hdrs: Vec<libc::mmsghdr> = (0..chunk.len())
            .map(|i| {
                // SAFETY: zeroed msghdr is valid; pointers refer to the vectors above.
                let mut h: libc::msghdr = unsafe { zeroed() };
                h.msg_name = (&mut addrs[i].0 as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = addrs[i].1;
                h.msg_iov = &mut iovs[i];
                h.msg_iovlen = 1;
                libc::mmsghdr { msg_hdr: h, msg_len: 0 }
            })
            .collect();
        // SAFETY: hdrs holds chunk.len() initialised headers pointing into live buffers.
        let r = unsafe { libc::sendmmsg(fd, hdrs.as_mut_ptr(), chunk.len() as libc::c_uint, libc::MSG_DONTWAIT) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                return if done == 0 { Err(e) } else { Ok(done) };
            }
            tracing::debug!(peer = %chunk[0].0, error = %e, "datagram not sent");
            done += 1;
            continue;
        }
        done += r as usize;
    }
    Ok(done)
}

fn from_sockaddr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(s as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(s as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage; the casts below write within its size.
    let mut s: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = unsafe { &mut *(&mut s as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr { s_addr: u32::from(*a.ip()).to_be() };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = unsafe { &mut *(&mut s as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr = libc::in6_addr { s6_addr: a.ip().octets() };
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (s, len as libc::socklen_t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn batch_round_trip_over_loopback() {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = b.local_addr().unwrap();
        let msgs: Vec<(SocketAddr, Bytes)> = (0..10u8).map(|i| (to, Bytes::from(vec![i; 3 + i as usize]))).collect();
        assert_eq!(send(a.as_raw_fd(), &msgs).unwrap(), 10);
        let mut batch = RecvBatch::new(16, 8);
        std::thread::sleep(std::time::Duration::from_millis(50));
        let n = batch.recv(b.as_raw_fd()).unwrap();
        assert_eq!(n, 10);
        for i in 0..n {
            let (peer, data, truncated) = batch.get(i).unwrap();
            assert_eq!(peer, a.local_addr().unwrap());
            assert_eq!(truncated, 3 + i > 8);
            assert_eq!(data, &vec![i as u8; (3 + i).min(8)][..]);
        }
        assert_eq!(batch.recv(b.as_raw_fd()).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }
}
