//! DTLS 1.2 for CoAP on 5684 (SPEC §3.3): PSK devices (three identity forms) and certificate
//! devices (ECDSA and RSA) on one port, modern AEAD suites and the AES-CBC ones deployed Alibaba
//! devices offer, a stateless cookie before any per-peer state, and a bounded peer table.
//! OpenSSL runs the handshakes (`context`, `ffi`); established sessions use our own record layer
//! (`record`, `cbc`), which keeps an idle session under 2 KB instead of OpenSSL's 35 KB.

mod cbc;
mod chain;
pub mod client;
pub mod context;
mod ffi;
pub mod peers;
pub mod pipe;
pub mod psk;
pub mod quota;
mod record;

use std::path::Path;
use std::sync::Arc;

use openssl::ssl::SslContext;

use crate::config::DtlsConfig;
use crate::registry::Registry;

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
pub fn setup(registry: Arc<Registry>, config: &DtlsConfig) -> Result<(SslContext, usize), SetupError> {
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
    let ctx = context::build(registry, &config.ciphers, &certificates)?;
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
    data.len() > 13 && data[0] == 22 && data[1] == 0xfe && epoch(data) == Some(0) && data[13] == 1
}

fn epoch(data: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*data.get(3)?, *data.get(4)?]))
}
