//! The OpenSSL context every DTLS peer on a port shares: DTLS 1.2 only, the PSK callback that
//! resolves device identities, the stateless cookie, and the certificate when one is configured.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use hmac::{Hmac, KeyInit, Mac};
use openssl::ex_data::Index;
use openssl::ssl::{
    ExtensionContext, Ssl, SslAlert, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslMode, SslOptions,
    SslSessionCacheMode, SslVersion,
};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::cid::{self, Cid};
use super::psk::{self, Refusal};
use crate::identity::DeviceId;

/// Suites served, all implemented by the record layer of established sessions. The client's
/// order decides (no server preference): iotkit v3 devices in certificate mode also offer PSK
/// suites they have no key for (mbedTLS lists them regardless), RSA first, and only their own
/// order picks a suite they can complete. AEAD suites: CCM_8 is what constrained stacks (tinydtls,
/// LwM2M) ship, GCM what OpenSSL, GnuTLS and mbedTLS clients prefer. The CBC suites are the only
/// ones the Alibaba devices in the field offer: iotkit v3 (RSA, PSK and RSA-PSK key exchange) and
/// Link SDK 4.x (TLS_PSK_WITH_AES_128_CBC_SHA).
pub const CIPHERS: &str = "PSK-AES128-CCM8:PSK-AES128-CCM:PSK-AES128-GCM-SHA256:PSK-AES256-GCM-SHA384:\
ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-CCM8:ECDHE-ECDSA-AES128-CCM:\
ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384:\
PSK-AES128-CBC-SHA256:PSK-AES128-CBC-SHA:PSK-AES256-CBC-SHA:PSK-AES256-CBC-SHA384:\
RSA-PSK-AES128-CBC-SHA256:RSA-PSK-AES128-CBC-SHA:RSA-PSK-AES256-CBC-SHA:RSA-PSK-AES256-CBC-SHA384:\
AES128-SHA256:AES256-SHA256:AES128-SHA:AES256-SHA";

const COOKIE_LEN: usize = 16;

/// Per-connection data the callbacks read and write.
#[derive(Clone, Copy)]
pub struct Slots {
    /// The peer a cookie is computed for (set before each `DTLSv1_listen`).
    pub peer: Index<Ssl, SocketAddr>,
    /// The device a PSK identity resolved to.
    pub device: Index<Ssl, DeviceId>,
    /// Why a PSK identity was refused; the handshake then fails like a wrong key would.
    pub refusal: Index<Ssl, Refusal>,
    /// The CID the client's `connection_id` extension asked us to send with (RFC 9146).
    pub client_cid: Index<Ssl, Box<[u8]>>,
    /// The CID the peer table chose for this handshake; the ServerHello offers it to a client
    /// that asked for CIDs. Unset when CIDs are off.
    pub server_cid: Index<Ssl, Cid>,
}

impl Slots {
    pub fn get() -> Slots {
        static SLOTS: OnceLock<Slots> = OnceLock::new();
        *SLOTS.get_or_init(|| Slots {
            peer: Ssl::new_ex_index().expect("OpenSSL ex_data index"),
            device: Ssl::new_ex_index().expect("OpenSSL ex_data index"),
            refusal: Ssl::new_ex_index().expect("OpenSSL ex_data index"),
            client_cid: Ssl::new_ex_index().expect("OpenSSL ex_data index"),
            server_cid: Ssl::new_ex_index().expect("OpenSSL ex_data index"),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("OpenSSL refused the DTLS settings: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
    #[error("dtls.cert {path}: {error}")]
    Certificate { path: String, error: openssl::error::ErrorStack },
    #[error("dtls.key {path}: {error}")]
    Key { path: String, error: openssl::error::ErrorStack },
    #[error("dtls.ciphers {0:?} names no DTLS 1.2 suite OpenSSL knows")]
    NoCiphers(String),
    #[error("dtls.ciphers: nbhub does not implement {0} (it serves: {CIPHERS})")]
    Unsupported(String),
}

/// Builds the context for `ciphers` (an OpenSSL cipher string; empty for [`CIPHERS`]). With
/// `certificates` ((chain, key) pairs, one per key type), the certificate suites are offered too.
pub fn build(
    keys: Arc<dyn psk::Keys>,
    ciphers: &str,
    certificates: &[(&Path, &Path)],
) -> Result<SslContext, ContextError> {
    let slots = Slots::get();
    let mut b = SslContext::builder(SslMethod::dtls_server())?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    b.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
    let list = if ciphers.is_empty() { CIPHERS } else { ciphers };
    b.set_cipher_list(list).map_err(|_| ContextError::NoCiphers(list.to_string()))?;
    b.set_options(
        SslOptions::NO_QUERY_MTU | SslOptions::COOKIE_EXCHANGE | SslOptions::NO_RENEGOTIATION | SslOptions::NO_TICKET,
    );
    // No resumption: a session cache would hold memory for devices that mostly never come back
    // within its lifetime, and PSK handshakes are as cheap as an abbreviated one.
    b.set_session_cache_mode(SslSessionCacheMode::OFF);
    // Idle sessions keep no read/write buffers (most of an established session's memory).
    b.set_mode(SslMode::RELEASE_BUFFERS);
    b.set_read_ahead(false);

    b.set_psk_server_callback(move |ssl, identity, out| {
        let identity = identity.unwrap_or_default();
        match psk::resolve(&*keys, identity) {
            Ok((device, key)) if key.len() <= out.len() => {
                out[..key.len()].copy_from_slice(&key);
                ssl.set_ex_data(slots.device, device);
                Ok(key.len())
            }
            result => {
                // Answer with a random key instead of an alert: the handshake then fails exactly
                // as with a wrong key, so a peer cannot tell unknown identities from known ones.
                let refusal = result.err().unwrap_or(Refusal::NoKey);
                ssl.set_ex_data(slots.refusal, refusal);
                let fake: [u8; 16] = rand::random();
                out[..16].copy_from_slice(&fake);
                Ok(16)
            }
        }
    });

    let secret: [u8; 32] = rand::random();
    b.set_cookie_generate_cb(move |ssl, out| {
        let peer = ssl.ex_data(slots.peer).copied().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
        out[..COOKIE_LEN].copy_from_slice(&cookie(&secret, cookie_epoch(unix_secs()), peer));
        Ok(COOKIE_LEN)
    });
    b.set_cookie_verify_cb(move |ssl, presented| {
        let Some(peer) = ssl.ex_data(slots.peer).copied() else { return false };
        cookie_valid(&secret, unix_secs(), peer, presented)
    });

    // OpenSSL 3.0 knows no CID, so the extension is negotiated here and the records it changes
    // are the peer table's; a ServerHello carries it only when the ClientHello did.
    b.add_custom_ext(
        cid::EXTENSION,
        ExtensionContext::TLS1_2_AND_BELOW_ONLY
            | ExtensionContext::DTLS_ONLY
            | ExtensionContext::CLIENT_HELLO
            | ExtensionContext::TLS1_2_SERVER_HELLO,
        move |ssl, _, _| Ok(ssl.ex_data(slots.server_cid).map(|c| cid::encode_extension(c.as_bytes()))),
        move |ssl, _, body, _| {
            let theirs = cid::decode_extension(body).ok_or(SslAlert::DECODE_ERROR)?;
            ssl.set_ex_data(slots.client_cid, theirs.into());
            Ok(())
        },
    )?;

    for (cert, key) in certificates {
        use_certificate(&mut b, cert, key)?;
    }
    let ctx = b.build();
    // Every suite OpenSSL may negotiate must have a record layer once the handshake is over.
    let ssl = Ssl::new(&ctx)?;
    // TLS 1.3 suites (0x13xx) are listed too but never negotiated in DTLS 1.2.
    let dtls_1_2 = |c: &&openssl::ssl::SslCipherRef| c.protocol_id()[0] != 0x13;
    let ciphers: Vec<_> = super::ffi::ciphers(&ssl).into_iter().flatten().filter(dtls_1_2).collect();
    if let Some(c) = ciphers.iter().find(|c| !super::record::implements(c.protocol_id())) {
        return Err(ContextError::Unsupported(c.name().to_string()));
    }
    if ciphers.is_empty() {
        return Err(ContextError::NoCiphers(list.to_string()));
    }
    Ok(ctx)
}

fn use_certificate(b: &mut SslContextBuilder, cert: &Path, key: &Path) -> Result<(), ContextError> {
    let path = |p: &Path| p.display().to_string();
    b.set_certificate_chain_file(cert).map_err(|error| ContextError::Certificate { path: path(cert), error })?;
    b.set_private_key_file(key, SslFiletype::PEM).map_err(|error| ContextError::Key { path: path(key), error })?;
    b.check_private_key().map_err(|error| ContextError::Key { path: path(key), error })?;
    Ok(())
}

/// A cookie is valid in the window it was made in and the next one, so a secret effectively
/// changes every window (RFC 6347 §4.2.1: change it frequently) while a device answering a
/// HelloVerifyRequest across a window boundary is not turned away.
const COOKIE_WINDOW_S: u64 = 300;

fn unix_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn cookie_epoch(unix_secs: u64) -> u8 {
    (unix_secs / COOKIE_WINDOW_S) as u8
}

/// The window's number, then an HMAC of it and the peer's address: proves the peer receives at
/// the address it claims without the server remembering anything. The secret is per start.
fn cookie(secret: &[u8; 32], epoch: u8, peer: SocketAddr) -> [u8; COOKIE_LEN] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(&[epoch]);
    match peer.ip() {
        std::net::IpAddr::V4(ip) => mac.update(&ip.octets()),
        std::net::IpAddr::V6(ip) => mac.update(&ip.octets()),
    }
    mac.update(&peer.port().to_be_bytes());
    let tag = mac.finalize().into_bytes();
    let mut out = [0; COOKIE_LEN];
    out[0] = epoch;
    out[1..].copy_from_slice(&tag[..COOKIE_LEN - 1]);
    out
}

fn cookie_valid(secret: &[u8; 32], unix_secs: u64, peer: SocketAddr, presented: &[u8]) -> bool {
    let now = cookie_epoch(unix_secs);
    let Some(&epoch) = presented.first() else { return false };
    (epoch == now || epoch == now.wrapping_sub(1)) && bool::from(presented.ct_eq(&cookie(secret, epoch, peer)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_bind_the_address_and_expire_after_the_next_window() {
        let secret = [5u8; 32];
        let peer: SocketAddr = "192.0.2.7:5684".parse().unwrap();
        let t = 1_795_426_240;
        let c = cookie(&secret, cookie_epoch(t), peer);
        assert!(cookie_valid(&secret, t, peer, &c));
        assert!(cookie_valid(&secret, t + COOKIE_WINDOW_S, peer, &c), "next window");
        assert!(!cookie_valid(&secret, t + 2 * COOKIE_WINDOW_S, peer, &c), "two windows later");
        assert!(!cookie_valid(&secret, t, "192.0.2.7:5685".parse().unwrap(), &c), "another port");
        assert!(!cookie_valid(&[6u8; 32], t, peer, &c), "another start");
        assert!(!cookie_valid(&secret, t, peer, &c[..8]));
        assert!(!cookie_valid(&secret, t, peer, &[]));
    }
}
