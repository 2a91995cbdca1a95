//! The record layer of established DTLS 1.2 sessions (RFC 6347 §4.1, RFC 5246 §6), kept outside
//! OpenSSL. OpenSSL runs the handshake; then the session's keys are derived from its master
//! secret and the `SSL` object is freed. An OpenSSL DTLS connection keeps about 35 KB for its
//! whole life (its 21 KB handshake buffer stays for possible retransmissions, by design); these
//! keys and counters are a few hundred bytes, which is what lets one server hold a fleet's idle
//! sessions.
//!
//! AEAD suites (AES-GCM, AES-CCM, AES-CCM_8) and, for the devices already in the field, AES-CBC
//! with HMAC (`super::cbc`): every suite [`super::context::CIPHERS`] offers.

use aes::Aes128;
use aes_gcm::aead::{Aead, AeadInOut, KeyInit, Nonce, Payload};
use aes_gcm::{Aes128Gcm, Aes256Gcm};
use bytes::Bytes;
use ccm::Ccm;
use ccm::consts::{U8, U12, U16};
use hmac::{Hmac, Mac};
use openssl::ssl::SslRef;
use sha2::{Sha256, Sha384};
use smallvec::SmallVec;

use super::cbc::{CbcKeys, MacHash};

type Aes128Ccm = Ccm<Aes128, U16, U12>;
type Aes128Ccm8 = Ccm<Aes128, U8, U12>;

pub const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
pub const CONTENT_ALERT: u8 = 21;
pub const CONTENT_HANDSHAKE: u8 = 22;
pub const CONTENT_APPLICATION_DATA: u8 = 23;
const DTLS_1_2: [u8; 2] = [0xfe, 0xfd];
const HEADER_LEN: usize = 13;
const EXPLICIT_NONCE_LEN: usize = 8;
/// Epoch of the keys a handshake establishes (no renegotiation, so the only one).
const EPOCH: u16 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prf {
    Sha256,
    Sha384,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Aes128Gcm,
    Aes256Gcm,
    Aes128Ccm,
    Aes128Ccm8,
    Cbc { key_len: usize, mac: MacHash },
}

const AES128_SHA: Algorithm = Algorithm::Cbc { key_len: 16, mac: MacHash::Sha1 };
const AES256_SHA: Algorithm = Algorithm::Cbc { key_len: 32, mac: MacHash::Sha1 };
const AES128_SHA256: Algorithm = Algorithm::Cbc { key_len: 16, mac: MacHash::Sha256 };
const AES256_SHA256: Algorithm = Algorithm::Cbc { key_len: 32, mac: MacHash::Sha256 };
const AES256_SHA384: Algorithm = Algorithm::Cbc { key_len: 32, mac: MacHash::Sha384 };

/// Whether the record layer implements the suite with this IANA number.
pub fn implements(id: [u8; 2]) -> bool {
    suite(id).is_some()
}

/// The suite OpenSSL negotiated, by its IANA number.
fn suite(id: [u8; 2]) -> Option<(Algorithm, Prf)> {
    use Prf::{Sha256 as P256, Sha384 as P384};
    Some(match u16::from_be_bytes(id) {
        // TLS_PSK_, TLS_ECDHE_ECDSA_ and TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        0x00a8 | 0xc02b | 0xc02f => (Algorithm::Aes128Gcm, P256),
        // TLS_PSK_, TLS_ECDHE_ECDSA_ and TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        0x00a9 | 0xc02c | 0xc030 => (Algorithm::Aes256Gcm, P384),
        // TLS_PSK_ and TLS_ECDHE_ECDSA_WITH_AES_128_CCM
        0xc0a4 | 0xc0ac => (Algorithm::Aes128Ccm, P256),
        // TLS_PSK_ and TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8
        0xc0a8 | 0xc0ae => (Algorithm::Aes128Ccm8, P256),
        // TLS_RSA_, TLS_PSK_ and TLS_RSA_PSK_WITH_AES_128_CBC_SHA
        0x002f | 0x008c | 0x0094 => (AES128_SHA, P256),
        // TLS_RSA_, TLS_PSK_ and TLS_RSA_PSK_WITH_AES_256_CBC_SHA
        0x0035 | 0x008d | 0x0095 => (AES256_SHA, P256),
        // TLS_RSA_, TLS_PSK_ and TLS_RSA_PSK_WITH_AES_128_CBC_SHA256
        0x003c | 0x00ae | 0x00b6 => (AES128_SHA256, P256),
        // TLS_RSA_WITH_AES_256_CBC_SHA256
        0x003d => (AES256_SHA256, P256),
        // TLS_PSK_ and TLS_RSA_PSK_WITH_AES_256_CBC_SHA384
        0x00af | 0x00b7 => (AES256_SHA384, P384),
        _ => return None,
    })
}

/// One direction's cipher, boxed so an idle session stays small in the peer table.
enum Cipher {
    Aes128Gcm(Box<Aes128Gcm>),
    Aes256Gcm(Box<Aes256Gcm>),
    Aes128Ccm(Box<Aes128Ccm>),
    Aes128Ccm8(Box<Aes128Ccm8>),
}

impl Cipher {
    fn new(algorithm: Algorithm, key: &[u8]) -> Option<Cipher> {
        Some(match algorithm {
            Algorithm::Aes128Gcm => Cipher::Aes128Gcm(Box::new(Aes128Gcm::new_from_slice(key).ok()?)),
            Algorithm::Aes256Gcm => Cipher::Aes256Gcm(Box::new(Aes256Gcm::new_from_slice(key).ok()?)),
            Algorithm::Aes128Ccm => Cipher::Aes128Ccm(Box::new(Aes128Ccm::new_from_slice(key).ok()?)),
            Algorithm::Aes128Ccm8 => Cipher::Aes128Ccm8(Box::new(Aes128Ccm8::new_from_slice(key).ok()?)),
            Algorithm::Cbc { .. } => return None,
        })
    }

    fn tag_len(&self) -> usize {
        match self {
            Cipher::Aes128Ccm8(_) => 8,
            _ => 16,
        }
    }

    /// Encrypts `buf` in place and returns the tag to append.
    fn seal_in_place(&self, nonce: &[u8; 12], aad: &[u8], buf: &mut [u8]) -> Option<SmallVec<[u8; 16]>> {
        fn detached<C: AeadInOut>(c: &C, nonce: &Nonce<C>, aad: &[u8], buf: &mut [u8]) -> Option<SmallVec<[u8; 16]>> {
            c.encrypt_inout_detached(nonce, aad, buf.into()).ok().map(|tag| SmallVec::from_slice(&tag))
        }
        match self {
            Cipher::Aes128Gcm(c) => detached(&**c, &Nonce::<Aes128Gcm>::from(*nonce), aad, buf),
            Cipher::Aes256Gcm(c) => detached(&**c, &Nonce::<Aes256Gcm>::from(*nonce), aad, buf),
            Cipher::Aes128Ccm(c) => detached(&**c, &Nonce::<Aes128Ccm>::from(*nonce), aad, buf),
            Cipher::Aes128Ccm8(c) => detached(&**c, &Nonce::<Aes128Ccm8>::from(*nonce), aad, buf),
        }
    }

    fn open(&self, nonce: &[u8; 12], aad: &[u8], msg: &[u8]) -> Option<Vec<u8>> {
        let p = Payload { msg, aad };
        match self {
            Cipher::Aes128Gcm(c) => c.decrypt(&Nonce::<Aes128Gcm>::from(*nonce), p).ok(),
            Cipher::Aes256Gcm(c) => c.decrypt(&Nonce::<Aes256Gcm>::from(*nonce), p).ok(),
            Cipher::Aes128Ccm(c) => c.decrypt(&Nonce::<Aes128Ccm>::from(*nonce), p).ok(),
            Cipher::Aes128Ccm8(c) => c.decrypt(&Nonce::<Aes128Ccm8>::from(*nonce), p).ok(),
        }
    }
}

/// The TLS 1.2 PRF (RFC 5246 §5): P_hash(secret, label + seed).
fn prf(hash: Prf, secret: &[u8], label: &[u8], seed: &[u8], len: usize) -> Vec<u8> {
    fn p_hash<M: Mac + KeyInit + Clone>(secret: &[u8], seed: &[u8], len: usize) -> Vec<u8> {
        let mac = <M as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
        let mut out = Vec::with_capacity(len);
        let mut a = mac.clone().chain_update(seed).finalize().into_bytes().to_vec();
        while out.len() < len {
            out.extend_from_slice(&mac.clone().chain_update(&a).chain_update(seed).finalize().into_bytes());
            a = mac.clone().chain_update(&a).finalize().into_bytes().to_vec();
        }
        out.truncate(len);
        out
    }
    let seed = [label, seed].concat();
    match hash {
        Prf::Sha256 => p_hash::<Hmac<Sha256>>(secret, &seed, len),
        Prf::Sha384 => p_hash::<Hmac<Sha384>>(secret, &seed, len),
    }
}

/// What one received record turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    Data(Vec<u8>),
    /// An alert: (level, description). close_notify is (1, 0).
    Alert(u8, u8),
    /// An encrypted handshake message: the peer retransmits its Finished, so ours was lost.
    Handshake,
}

/// Sliding anti-replay window over the peer's sequence numbers (RFC 6347 §4.1.2.6).
#[derive(Default)]
struct ReplayWindow {
    /// Highest sequence number accepted plus one; 0 before the first.
    next: u64,
    /// Bit i: `next - 1 - i` was accepted.
    seen: u64,
}

impl ReplayWindow {
    fn is_fresh(&self, seq: u64) -> bool {
        if seq >= self.next {
            return true;
        }
        let age = self.next - 1 - seq;
        age < 64 && self.seen & (1 << age) == 0
    }

    fn mark(&mut self, seq: u64) {
        if seq >= self.next {
            let shift = seq + 1 - self.next;
            self.seen = if shift >= 64 { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.next = seq + 1;
        } else {
            self.seen |= 1 << (self.next - 1 - seq);
        }
    }
}

/// How one direction's records are protected.
enum Protection {
    /// Nonce = 4-byte implicit IV from the key block + the 8-byte explicit nonce of the record.
    Aead {
        cipher: Cipher,
        iv: [u8; 4],
    },
    Cbc(Box<CbcKeys>),
}

impl Protection {
    fn open(&self, epoch_seq: &[u8], content_type: u8, fragment: &[u8]) -> Option<Vec<u8>> {
        match self {
            Protection::Aead { cipher, iv } => {
                let plain_len = fragment.len().checked_sub(EXPLICIT_NONCE_LEN + cipher.tag_len())?;
                let mut nonce = [0u8; 12];
                nonce[..4].copy_from_slice(iv);
                nonce[4..].copy_from_slice(&fragment[..EXPLICIT_NONCE_LEN]);
                let aad = pseudo_header(epoch_seq, content_type, plain_len);
                cipher.open(&nonce, &aad, &fragment[EXPLICIT_NONCE_LEN..])
            }
            Protection::Cbc(keys) => keys.open(epoch_seq, content_type, fragment),
        }
    }

    /// Appends the record's fragment for `plain` to `out`.
    fn seal_into(&self, epoch_seq: &[u8; 8], content_type: u8, plain: &[u8], out: &mut Vec<u8>) -> Option<()> {
        match self {
            Protection::Aead { cipher, iv } => {
                // The explicit nonce is the record's own epoch and sequence number: unique per key.
                let mut nonce = [0u8; 12];
                nonce[..4].copy_from_slice(iv);
                nonce[4..].copy_from_slice(epoch_seq);
                let aad = pseudo_header(epoch_seq, content_type, plain.len());
                out.extend_from_slice(epoch_seq);
                let start = out.len();
                out.extend_from_slice(plain);
                let tag = cipher.seal_in_place(&nonce, &aad, &mut out[start..])?;
                out.extend_from_slice(&tag);
                Some(())
            }
            Protection::Cbc(keys) => keys.seal_into(epoch_seq, content_type, plain, out),
        }
    }
}

/// An established session's keys and counters (server side).
pub struct Session {
    read: Protection,
    write: Protection,
    write_seq: u64,
    replay: ReplayWindow,
    /// The server's last flight (ChangeCipherSpec, Finished), resent if the client shows it was
    /// lost; dropped once the client's first application data proves it arrived.
    final_flight: Option<Box<[Bytes]>>,
}

impl Session {
    /// The session OpenSSL just established on `ssl`, whose last flight was `final_flight`;
    /// `encrypt_then_mac` when its ServerHello agreed to RFC 7366 (CBC suites only).
    /// `None` for a suite this layer does not implement.
    pub fn from_handshake(ssl: &SslRef, final_flight: Vec<Bytes>, encrypt_then_mac: bool) -> Option<Session> {
        let (algorithm, hash) = suite(ssl.current_cipher()?.protocol_id())?;
        let mut master = [0u8; 48];
        if ssl.session()?.master_key(&mut master) != 48 {
            return None;
        }
        let (mut client_random, mut server_random) = ([0u8; 32], [0u8; 32]);
        ssl.client_random(&mut client_random);
        ssl.server_random(&mut server_random);
        let seed = [&server_random[..], &client_random[..]].concat();
        // RFC 5246 §6.3: client and server MAC keys, keys, then implicit IVs (AEAD only).
        let (mac_len, key_len, iv_len) = match algorithm {
            Algorithm::Cbc { key_len, mac } => (mac.len(), key_len, 0),
            Algorithm::Aes256Gcm => (0, 32, 4),
            _ => (0, 16, 4),
        };
        let block = prf(hash, &master, b"key expansion", &seed, 2 * (mac_len + key_len + iv_len));
        let (client_mac, rest) = block.split_at(mac_len);
        let (server_mac, rest) = rest.split_at(mac_len);
        let (client_key, rest) = rest.split_at(key_len);
        let (server_key, ivs) = rest.split_at(key_len);
        let (read, write) = match algorithm {
            Algorithm::Cbc { mac, .. } => (
                Protection::Cbc(Box::new(CbcKeys::new(client_key, client_mac, mac, encrypt_then_mac))),
                Protection::Cbc(Box::new(CbcKeys::new(server_key, server_mac, mac, encrypt_then_mac))),
            ),
            _ => (
                Protection::Aead { cipher: Cipher::new(algorithm, client_key)?, iv: ivs[..4].try_into().ok()? },
                Protection::Aead { cipher: Cipher::new(algorithm, server_key)?, iv: ivs[4..8].try_into().ok()? },
            ),
        };
        // The Finished in the final flight already used epoch 1's first sequence number(s).
        let write_seq = final_flight.iter().filter_map(|d| last_seq(d, EPOCH)).max().map_or(0, |s| s + 1);
        Some(Session {
            read,
            write,
            write_seq,
            replay: ReplayWindow::default(),
            final_flight: Some(final_flight.into_boxed_slice()),
        })
    }

    /// The records of one datagram that authenticate and are not replays; anything else is
    /// discarded silently, as DTLS requires (RFC 6347 §4.1.2.7).
    pub fn open(&mut self, mut datagram: &[u8], mut each: impl FnMut(Record)) {
        while datagram.len() >= HEADER_LEN {
            let len = u16::from_be_bytes([datagram[11], datagram[12]]) as usize;
            let Some(record) = datagram.get(..HEADER_LEN + len) else { return };
            datagram = &datagram[HEADER_LEN + len..];
            if let Some(r) = self.open_record(record) {
                if matches!(r, Record::Data(_)) {
                    self.final_flight = None;
                }
                each(r);
            }
        }
    }

    fn open_record(&mut self, record: &[u8]) -> Option<Record> {
        let content_type = record[0];
        let epoch = u16::from_be_bytes([record[3], record[4]]);
        if epoch != EPOCH || record[1..3] != DTLS_1_2 {
            return None;
        }
        let seq = seq48(&record[5..11]);
        if !self.replay.is_fresh(seq) {
            return None;
        }
        let plain = self.read.open(&record[3..11], content_type, &record[HEADER_LEN..])?;
        self.replay.mark(seq);
        match content_type {
            CONTENT_APPLICATION_DATA => Some(Record::Data(plain)),
            CONTENT_ALERT if plain.len() == 2 => Some(Record::Alert(plain[0], plain[1])),
            CONTENT_HANDSHAKE => Some(Record::Handshake),
            _ => None,
        }
    }

    /// One record of `content_type` carrying `plaintext`, as a datagram.
    pub fn seal(&mut self, content_type: u8, plaintext: &[u8]) -> Option<Bytes> {
        let seq = self.write_seq;
        if seq >= 1 << 48 {
            return None; // the sequence space is spent; the session must end
        }
        self.write_seq += 1;
        let mut epoch_seq = [0u8; 8];
        epoch_seq[..2].copy_from_slice(&EPOCH.to_be_bytes());
        epoch_seq[2..].copy_from_slice(&seq.to_be_bytes()[2..]);
        // Room for the explicit nonce or IV, a MAC or tag and CBC padding: one allocation.
        let mut out = Vec::with_capacity(HEADER_LEN + plaintext.len() + 96);
        out.push(content_type);
        out.extend_from_slice(&DTLS_1_2);
        out.extend_from_slice(&epoch_seq);
        out.extend_from_slice(&[0, 0]); // length, known once sealed
        self.write.seal_into(&epoch_seq, content_type, plaintext, &mut out)?;
        let len = (out.len() - HEADER_LEN) as u16;
        out[11..HEADER_LEN].copy_from_slice(&len.to_be_bytes());
        Some(Bytes::from(out))
    }

    /// The final flight again, if the client may still be missing it.
    pub fn final_flight(&self) -> &[Bytes] {
        self.final_flight.as_deref().unwrap_or_default()
    }
}

/// Whether the ServerHello among the records of `datagram` (one the server sent) agrees to
/// encrypt-then-MAC (RFC 7366, extension 22); `None` when the datagram holds no ServerHello.
/// OpenSSL negotiates it without saying so, and CBC records depend on it. A ServerHello is about
/// 100 bytes, so it is never fragmented at our MTU.
pub fn server_hello_encrypt_then_mac(mut datagram: &[u8]) -> Option<bool> {
    while datagram.len() >= HEADER_LEN {
        let len = u16::from_be_bytes([datagram[11], datagram[12]]) as usize;
        let record = datagram.get(..HEADER_LEN + len)?;
        datagram = &datagram[HEADER_LEN + len..];
        if record[0] != CONTENT_HANDSHAKE || record[3..5] != [0, 0] {
            continue;
        }
        // DTLS handshake header: type, length(3), message_seq(2), fragment_offset(3), fragment_length(3).
        let mut messages = &record[HEADER_LEN..];
        while messages.len() >= 12 {
            let fragment_len = seq48(&messages[9..12]) as usize;
            let body = messages.get(12..12 + fragment_len)?;
            if messages[0] == 2 {
                return Some(extensions(body)?.any(|t| t == EXTENSION_ENCRYPT_THEN_MAC));
            }
            messages = &messages[12 + fragment_len..];
        }
    }
    None
}

const EXTENSION_ENCRYPT_THEN_MAC: u16 = 22;

/// The extension types of a ServerHello body (RFC 5246 §7.4.1.3).
fn extensions(body: &[u8]) -> Option<impl Iterator<Item = u16> + '_> {
    let session_id_len = *body.get(34)? as usize;
    // version, random, session id, cipher suite, compression method
    let mut rest = body.get(35 + session_id_len + 3..)?;
    if rest.len() >= 2 {
        rest = rest.get(2..2 + u16::from_be_bytes([rest[0], rest[1]]) as usize)?;
    }
    Some(std::iter::from_fn(move || {
        let (t, len) =
            (u16::from_be_bytes([*rest.first()?, *rest.get(1)?]), u16::from_be_bytes([*rest.get(2)?, *rest.get(3)?]));
        rest = rest.get(4 + len as usize..)?;
        Some(t)
    }))
}

fn seq48(b: &[u8]) -> u64 {
    b.iter().fold(0, |acc, &x| acc << 8 | x as u64)
}

/// The highest sequence number of `epoch` among the records of a datagram we sent.
pub fn last_seq(mut datagram: &[u8], epoch: u16) -> Option<u64> {
    let mut last = None;
    while datagram.len() >= HEADER_LEN {
        if u16::from_be_bytes([datagram[3], datagram[4]]) == epoch {
            last = last.max(Some(seq48(&datagram[5..11])));
        }
        let len = u16::from_be_bytes([datagram[11], datagram[12]]) as usize;
        datagram = datagram.get(HEADER_LEN + len..)?;
    }
    last
}

/// A fatal alert in a plaintext record, for a handshake whose keys never agreed: the client
/// still reads epoch 0 until our ChangeCipherSpec. `seq` follows the epoch-0 records sent before,
/// so the client's replay check lets it through.
pub fn plaintext_alert(seq: u64, level: u8, description: u8) -> Bytes {
    let mut out = Vec::with_capacity(HEADER_LEN + 2);
    out.push(CONTENT_ALERT);
    out.extend_from_slice(&DTLS_1_2);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&seq.to_be_bytes()[2..]);
    out.extend_from_slice(&2u16.to_be_bytes());
    out.extend_from_slice(&[level, description]);
    Bytes::from(out)
}

/// What a record's MAC or AEAD tag also covers (RFC 5246 §6.2.3.1 and §6.2.3.3, with DTLS's
/// epoch and sequence number): sequence number, type, version, length.
pub fn pseudo_header(epoch_seq: &[u8], content_type: u8, plain_len: usize) -> [u8; 13] {
    let mut aad = [0u8; 13];
    aad[..8].copy_from_slice(epoch_seq);
    aad[8] = content_type;
    aad[9..11].copy_from_slice(&DTLS_1_2);
    aad[11..].copy_from_slice(&(plain_len as u16).to_be_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtls::pipe::Pipe;
    use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslStream, SslVerifyMode};

    #[test]
    fn prf_known_answer() {
        // The TLS 1.2 PRF-SHA256 test vector published with the RFC 5246 test suite.
        let secret = hex::decode("9bbe436ba940f017b17652849a71db35").unwrap();
        let seed = hex::decode("a0ba9f936cda311827a6f796ffd5198c").unwrap();
        let out = prf(Prf::Sha256, &secret, b"test label", &seed, 100);
        assert_eq!(out.len(), 100);
        assert_eq!(hex::encode(&out[..16]), "e3f229ba727be17b8d122620557cd453");
    }

    #[test]
    fn replay_window_accepts_each_number_once() {
        let mut w = ReplayWindow::default();
        for s in [0, 1, 5, 3, 70, 10, 200] {
            assert!(w.is_fresh(s), "{s}");
            w.mark(s);
            assert!(!w.is_fresh(s), "{s}");
        }
        assert!(!w.is_fresh(136), "older than the window");
        assert!(w.is_fresh(199));
    }

    /// Runs an OpenSSL client against an OpenSSL server in memory, then replaces the server's
    /// record layer with a `Session` and checks both directions against the client.
    fn interoperate(cipher: &str, client_offers_etm: bool) {
        let mut sctx = SslContext::builder(SslMethod::dtls()).unwrap();
        sctx.set_cipher_list(cipher).unwrap();
        // One key and certificate of each type, made once (RSA key generation is slow).
        static IDENTITIES: std::sync::OnceLock<Vec<(PrivateKey, openssl::x509::X509)>> = std::sync::OnceLock::new();
        let identities = IDENTITIES.get_or_init(|| {
            [ec_key(), rsa_key()]
                .into_iter()
                .map(|k| {
                    let c = self_signed(&k);
                    (k, c)
                })
                .collect()
        });
        for (key, cert) in identities {
            sctx.set_certificate(cert).unwrap();
            sctx.set_private_key(key).unwrap();
        }
        sctx.set_psk_server_callback(|_, _, key| {
            key[..4].copy_from_slice(b"key!");
            Ok(4)
        });
        let mut cctx = SslContext::builder(SslMethod::dtls()).unwrap();
        cctx.set_cipher_list(cipher).unwrap();
        cctx.set_verify(SslVerifyMode::NONE);
        if !client_offers_etm {
            cctx.set_options(openssl::ssl::SslOptions::from_bits_retain(1 << 19)); // SSL_OP_NO_ENCRYPT_THEN_MAC
        }
        cctx.set_psk_client_callback(|_, _, id, key| {
            id[..3].copy_from_slice(b"id\0");
            key[..4].copy_from_slice(b"key!");
            Ok(4)
        });
        let mut server = SslStream::new(Ssl::new(&sctx.build()).unwrap(), Pipe::default()).unwrap();
        let mut client = SslStream::new(Ssl::new(&cctx.build()).unwrap(), Pipe::default()).unwrap();
        let mut final_flight = Vec::new();
        let mut etm = false;
        for _ in 0..10 {
            let c = client.connect();
            for d in client.get_mut().take_outbound().collect::<Vec<_>>() {
                server.get_mut().put(&d);
                let _ = server.accept();
            }
            let s: Vec<Vec<u8>> = server.get_mut().take_outbound().collect();
            for d in &s {
                etm |= server_hello_encrypt_then_mac(d).unwrap_or(false);
            }
            if server.ssl().is_init_finished() && final_flight.is_empty() {
                final_flight = s.iter().map(|d| Bytes::from(d.clone())).collect();
            }
            for d in s {
                client.get_mut().put(&d);
                let _ = client.connect();
            }
            if c.is_ok() && server.ssl().is_init_finished() {
                break;
            }
        }
        assert!(server.ssl().is_init_finished(), "{cipher}: handshake");
        let cbc = !(cipher.contains("GCM") || cipher.contains("CCM"));
        assert_eq!(etm, cbc && client_offers_etm, "{cipher}: encrypt-then-MAC only for CBC suites, when offered");
        let mut session = Session::from_handshake(server.ssl(), final_flight, etm).expect("supported suite");
        // client → session
        client.ssl_write(b"from the client").unwrap();
        let mut got = Vec::new();
        for d in client.get_mut().take_outbound().collect::<Vec<_>>() {
            session.open(&d, |r| got.push(r));
            session.open(&d, |r| got.push(r)); // a replay is dropped
        }
        assert_eq!(got, vec![Record::Data(b"from the client".to_vec())], "{cipher}");
        // session → client
        for _ in 0..2 {
            let d = session.seal(CONTENT_APPLICATION_DATA, b"from the server").unwrap();
            client.get_mut().put(&d);
            let mut buf = [0u8; 64];
            let n = client.ssl_read(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"from the server", "{cipher}");
        }
        // close_notify reaches the client
        let d = session.seal(CONTENT_ALERT, &[1, 0]).unwrap();
        client.get_mut().put(&d);
        let mut buf = [0u8; 8];
        assert_eq!(client.ssl_read(&mut buf).unwrap_err().code(), ErrorCode::ZERO_RETURN, "{cipher}");
        // a tampered record is dropped
        client.ssl_write(b"x").unwrap();
        let mut d = client.get_mut().take_outbound().next().unwrap();
        *d.last_mut().unwrap() ^= 1;
        let mut got = Vec::new();
        session.open(&d, |r| got.push(r));
        assert!(got.is_empty());
    }

    type PrivateKey = openssl::pkey::PKey<openssl::pkey::Private>;

    fn ec_key() -> PrivateKey {
        use openssl::ec::{EcGroup, EcKey};
        let group = EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
        openssl::pkey::PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
    }

    fn rsa_key() -> PrivateKey {
        openssl::pkey::PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap()
    }

    fn self_signed(key: &PrivateKey) -> openssl::x509::X509 {
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "localhost").unwrap();
        let name = name.build();
        let mut b = openssl::x509::X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(key).unwrap();
        b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap()).unwrap();
        b.sign(key, openssl::hash::MessageDigest::sha256()).unwrap();
        b.build()
    }

    /// Every suite the server offers has a record layer here.
    #[test]
    fn interoperates_with_openssl_for_every_offered_suite() {
        for cipher in crate::dtls::context::CIPHERS.split(':') {
            interoperate(cipher, true);
            interoperate(cipher, false);
        }
    }
}
