//! DTLS 1.2 for CoAP on 5684 (SPEC §3.3): PSK devices (three identity forms) and certificate
//! devices (ECDSA and RSA) on one port, modern AEAD suites and the AES-CBC ones deployed Alibaba
//! devices offer, a stateless cookie before any per-peer state, and a bounded peer table.
//! OpenSSL runs the handshakes (`context`, `ffi`); established sessions use our own record layer
//! (`record`, `cbc`), which keeps an idle session under 2 KB instead of OpenSSL's 35 KB. Owning
//! the record layer is also what gives Connection IDs (`cid`, RFC 9146, which OpenSSL lacks) and
//! sessions kept in the store across restarts (`durable`).

mod cbc;
mod chain;
pub mod cid;
pub mod client;
pub mod context;
pub mod durable;
mod ffi;
pub mod peers;
pub mod pipe;
pub mod psk;
pub mod quota;
pub mod record;

use std::path::Path;
use std::sync::Arc;

use openssl::ssl::SslContext;

use crate::config::DtlsConfig;

/// Where the embedded default configuration looks for certificates; when nothing is there the
/// server still starts (PSK only), so `nbhub serve` works before `scripts/dev-certs` has run.
const DEFAULT_CERTS: [&str; 2] = ["certs/server.crt", "certs/server-rsa.crt"];

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Context(#[from] context::ContextError),
    #[error("{key} {path} does not exist (run scripts/dev-certs, or set it and its key to \"\" to go without)")]
    MissingCertificate { key: &'static str, path: String },
}

/// The context for `config`, and how many certificates it serves.
pub fn setup(keys: Arc<dyn psk::Keys>, config: &DtlsConfig) -> Result<(SslContext, usize), SetupError> {
    let mut certificates = Vec::new();
    for (key, cert, private_key) in config.certificates() {
        if cert.exists() {
            warn_unverifiable(key, cert);
            certificates.push((cert, private_key));
        } else if DEFAULT_CERTS.iter().any(|d| cert == Path::new(d)) {
            tracing::warn!(cert = %cert.display(), "no DTLS server certificate here: run scripts/dev-certs; PSK devices are served regardless");
        } else {
            return Err(SetupError::MissingCertificate { key, path: cert.display().to_string() });
        }
    }
    let ctx = context::build(keys, &config.ciphers, &certificates)?;
    Ok((ctx, certificates.len()))
}

/// Warns about what keeps the clients `cert` serves from verifying it. The server starts
/// regardless: other clients may still verify the chain, and a file OpenSSL cannot read is
/// reported by [`context::build`].
fn warn_unverifiable(key: &'static str, cert: &Path) {
    let Ok(certs) = std::fs::read(cert).map(|pem| openssl::x509::X509::stack_from_pem(&pem)) else { return };
    for problem in certs.iter().flat_map(|c| chain::problems(c)) {
        tracing::warn!("{key} {}: {problem}", cert.display());
    }
}

/// DTLSPlaintext header (RFC 6347 §4.1): type, version, epoch, sequence, length; then the
/// handshake header whose first byte is the message type.
fn is_client_hello(data: &[u8]) -> bool {
    data.len() > 13 && data[0] == 22 && data[1] == 0xfe && data[3..5] == [0, 0] && data[13] == 1
}

const RECORD_HEADER_LEN: usize = 13;

/// One record of a datagram: its content type, its epoch, and its bytes (header included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawRecord<'a> {
    content_type: u8,
    epoch: u16,
    bytes: &'a [u8],
}

/// The records one datagram carries: a datagram may hold several (RFC 6347 §4.1.1), e.g. a
/// client's ClientKeyExchange, ChangeCipherSpec and Finished. A tls12_cid record's header holds
/// a CID of `cid_len` bytes (ours: all of one length) before its length. Ends before a record
/// that is cut short, which no DTLS stack reads either.
fn records(mut datagram: &[u8], cid_len: usize) -> impl Iterator<Item = RawRecord<'_>> {
    std::iter::from_fn(move || {
        let content_type = *datagram.first()?;
        let header_len = match content_type {
            cid::CONTENT_TLS12_CID => RECORD_HEADER_LEN + cid_len,
            _ => RECORD_HEADER_LEN,
        };
        let header = datagram.get(..header_len)?;
        let len = u16::from_be_bytes([header[header_len - 2], header[header_len - 1]]) as usize;
        let bytes = datagram.get(..header_len + len)?;
        datagram = &datagram[bytes.len()..];
        Some(RawRecord { content_type, epoch: u16::from_be_bytes([header[3], header[4]]), bytes })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of `len` zero bytes after its header.
    pub(super) fn record(content_type: u8, epoch: u16, len: usize) -> Vec<u8> {
        let mut r = vec![content_type, 0xfe, 0xfd];
        r.extend_from_slice(&epoch.to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0, 0, 7]);
        r.extend_from_slice(&(len as u16).to_be_bytes());
        r.resize(RECORD_HEADER_LEN + len, 0);
        r
    }

    #[test]
    fn every_record_of_a_datagram_is_walked() {
        let parts = [record(22, 0, 70), record(20, 0, 1), record(22, 1, 40)];
        let datagram = parts.concat();
        let walked: Vec<RawRecord> = records(&datagram, 0).collect();
        assert_eq!(
            walked,
            [
                RawRecord { content_type: 22, epoch: 0, bytes: &parts[0] },
                RawRecord { content_type: 20, epoch: 0, bytes: &parts[1] },
                RawRecord { content_type: 22, epoch: 1, bytes: &parts[2] },
            ]
        );
    }

    #[test]
    fn a_record_cut_short_ends_the_walk() {
        let mut datagram = [record(22, 0, 70), record(22, 1, 40)].concat();
        datagram.truncate(datagram.len() - 1);
        assert_eq!(records(&datagram, 0).count(), 1);
        assert_eq!(records(&datagram[..12], 0).count(), 0, "not even a header");
        assert_eq!(records(&[], 0).count(), 0);
        // A length that points past the end.
        let mut lying = record(23, 1, 4);
        lying[11..13].copy_from_slice(&[0xff, 0xff]);
        assert_eq!(records(&lying, 0).count(), 0);
    }
}
