//! The few OpenSSL DTLS entry points the `openssl` crate does not wrap: the stateless cookie
//! exchange (`DTLSv1_listen`), the retransmission timer (`DTLSv1_get_timeout`/`_handle_timeout`,
//! which are macros over `SSL_ctrl`) and the handshake state (`SSL_get_state`).

use std::os::raw::{c_int, c_long, c_void};
use std::time::Duration;

use foreign_types::ForeignTypeRef;
use openssl::ssl::{SslCipher, SslRef, SslStream};
use openssl::stack::StackRef;

#[repr(C)]
struct BioAddr {
    _opaque: [u8; 0],
}

unsafe extern "C" {
    fn DTLSv1_listen(ssl: *mut openssl_sys::SSL, client: *mut BioAddr) -> c_int;
    fn BIO_ADDR_new() -> *mut BioAddr;
    fn BIO_ADDR_free(addr: *mut BioAddr);
    fn SSL_get_ciphers(ssl: *const openssl_sys::SSL) -> *mut openssl_sys::stack_st_SSL_CIPHER;
    fn SSL_get_state(ssl: *const openssl_sys::SSL) -> c_int;
}

/// `TLS_ST_SR_CHANGE` of `OSSL_HANDSHAKE_STATE` (ssl.h). The enum's values are ABI: OpenSSL only
/// appends new states, so this is the same in every 1.1.1 and 3.x library.
const TLS_ST_SR_CHANGE: c_int = 31;

const DTLS_CTRL_GET_TIMEOUT: c_int = 73;
const DTLS_CTRL_HANDLE_TIMEOUT: c_int = 74;

/// The stream's `SslRef` for calls that change it (the crate only hands out `&SslRef`).
pub fn ssl_mut<S>(stream: &mut SslStream<S>) -> &mut SslRef {
    // SAFETY: the stream owns its SSL and is borrowed exclusively for the returned lifetime.
    unsafe { SslRef::from_ptr_mut(stream.ssl().as_ptr()) }
}

/// The address `DTLSv1_listen` fills in. Ours is a memory pipe with no peer address, so the
/// value is never read, but OpenSSL requires a valid object.
pub struct ListenAddr(*mut BioAddr);

// SAFETY: the BIO_ADDR is owned exclusively and only touched through `&mut self`/`Drop`.
unsafe impl Send for ListenAddr {}

impl ListenAddr {
    pub fn new() -> ListenAddr {
        // SAFETY: plain allocation; a null result (out of memory) is checked.
        let p = unsafe { BIO_ADDR_new() };
        assert!(!p.is_null(), "BIO_ADDR_new: out of memory");
        ListenAddr(p)
    }
}

impl Drop for ListenAddr {
    fn drop(&mut self) {
        // SAFETY: allocated by BIO_ADDR_new and freed once.
        unsafe { BIO_ADDR_free(self.0) }
    }
}

/// What `DTLSv1_listen` made of one datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Listen {
    /// A ClientHello with a valid cookie: the `Ssl` now holds it and `accept` continues.
    Verified,
    /// Anything else; a cookie-less ClientHello has been answered with a HelloVerifyRequest.
    NotYet,
    /// A fatal error; the `Ssl` must not be used again.
    Failed,
}

/// Runs the stateless cookie exchange (RFC 6347 §4.2.1) on `ssl`, whose read side holds one
/// datagram. No per-peer state survives a `NotYet`.
pub fn listen(ssl: &mut SslRef, addr: &mut ListenAddr) -> Listen {
    // SAFETY: `ssl` is a live SSL with a BIO attached; `addr` is a valid BIO_ADDR.
    let r = unsafe { DTLSv1_listen(ssl.as_ptr(), addr.0) };
    // Whatever OpenSSL queued about this datagram must not leak into the next call's errors.
    let _ = openssl::error::ErrorStack::get();
    match r {
        1.. => Listen::Verified,
        0 => Listen::NotYet,
        _ => Listen::Failed,
    }
}

/// Time left on the handshake retransmission timer, if it runs.
pub fn timeout(ssl: &SslRef) -> Option<Duration> {
    let mut tv = libc::timeval { tv_sec: 0, tv_usec: 0 };
    // SAFETY: DTLS_CTRL_GET_TIMEOUT writes one `struct timeval` through the pointer.
    let running =
        unsafe { openssl_sys::SSL_ctrl(ssl.as_ptr(), DTLS_CTRL_GET_TIMEOUT, 0, &mut tv as *mut _ as *mut c_void) };
    (running == 1).then(|| Duration::new(tv.tv_sec.max(0) as u64, (tv.tv_usec.max(0) as u32) * 1000))
}

/// Retransmits the last flight if its timer expired. `false` when OpenSSL gave up (too many
/// retransmissions) or failed.
pub fn handle_timeout(ssl: &mut SslRef) -> bool {
    // SAFETY: DTLS_CTRL_HANDLE_TIMEOUT takes no argument.
    let r: c_long = unsafe { openssl_sys::SSL_ctrl(ssl.as_ptr(), DTLS_CTRL_HANDLE_TIMEOUT, 0, std::ptr::null_mut()) };
    let _ = openssl::error::ErrorStack::get();
    r >= 0
}

/// Whether the server has read the client's ChangeCipherSpec and waits for its Finished: the
/// read side already uses the negotiated keys.
pub fn awaits_client_finished(ssl: &SslRef) -> bool {
    // SAFETY: reads the state of a live SSL.
    unsafe { SSL_get_state(ssl.as_ptr()) == TLS_ST_SR_CHANGE }
}

/// The suites `ssl` would offer, in order (what the context's cipher string expanded to).
pub fn ciphers(ssl: &SslRef) -> Option<&StackRef<SslCipher>> {
    // SAFETY: the stack belongs to `ssl` (or its context) and lives as long as the borrow.
    unsafe {
        let stack = SSL_get_ciphers(ssl.as_ptr());
        (!stack.is_null()).then(|| StackRef::from_ptr(stack))
    }
}
