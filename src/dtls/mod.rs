//! DTLS 1.2 for CoAP on 5684 (SPEC §3.3), on OpenSSL: PSK devices (three identity forms) and
//! certificate-mode devices on one port, a stateless cookie before any per-peer state, and a
//! bounded peer table.

pub mod client;
pub mod context;
mod ffi;
pub mod peers;
mod pipe;
pub mod psk;
mod record;

use std::path::Path;
use std::sync::Arc;

use openssl::ssl::SslContext;

use crate::config::DtlsConfig;
use crate::registry::Registry;

/// Where the embedded default configuration looks for the certificate; when nothing is there the
/// server still starts (PSK only), so `nbhub serve` works before `scripts/dev-certs` has run.
const DEFAULT_CERT: &str = "certs/server.crt";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Context(#[from] context::ContextError),
    #[error("dtls.cert {0} does not exist (run scripts/dev-certs, or set dtls.cert and dtls.key to \"\" for PSK only)")]
    MissingCertificate(String),
}

/// The context for `config`, and whether certificate mode is on.
pub fn setup(registry: Arc<Registry>, config: &DtlsConfig) -> Result<(SslContext, bool), SetupError> {
    let certificate = if !config.has_certificate() {
        None
    } else if config.cert.exists() {
        Some((config.cert.as_path(), config.key.as_path()))
    } else if config.cert == Path::new(DEFAULT_CERT) {
        tracing::warn!(
            cert = DEFAULT_CERT,
            "no DTLS server certificate: certificate-mode devices cannot connect (run scripts/dev-certs); PSK devices can"
        );
        None
    } else {
        return Err(SetupError::MissingCertificate(config.cert.display().to_string()));
    };
    let ctx = context::build(registry, certificate)?;
    Ok((ctx, certificate.is_some()))
}

/// DTLSPlaintext header (RFC 6347 §4.1): type, version, epoch, sequence, length; then the
/// handshake header whose first byte is the message type.
fn is_client_hello(data: &[u8]) -> bool {
    data.len() > 13 && data[0] == 22 && data[1] == 0xfe && epoch(data) == Some(0) && data[13] == 1
}

fn epoch(data: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*data.get(3)?, *data.get(4)?]))
}
