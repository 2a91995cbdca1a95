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
use super::cid::{self, CONTENT_TLS12_CID, Cid};

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
    fn open(&self, header: Header<'_>, content_type: u8, fragment: &[u8]) -> Option<Vec<u8>> {
        match self {
            Protection::Aead { cipher, iv } => {
                let plain_len = fragment.len().checked_sub(EXPLICIT_NONCE_LEN + cipher.tag_len())?;
                let mut nonce = [0u8; 12];
                nonce[..4].copy_from_slice(iv);
                nonce[4..].copy_from_slice(&fragment[..EXPLICIT_NONCE_LEN]);
                let aad = header.additional_data(content_type, plain_len);
                cipher.open(&nonce, &aad, &fragment[EXPLICIT_NONCE_LEN..])
            }
            Protection::Cbc(keys) => keys.open(header, content_type, fragment),
        }
    }

    /// Appends the record's fragment for `plain` to `out`.
    fn seal_into(&self, header: Header<'_>, content_type: u8, plain: &[u8], out: &mut Vec<u8>) -> Option<()> {
        match self {
            Protection::Aead { cipher, iv } => {
                // The explicit nonce is the record's own epoch and sequence number: unique per key.
                let mut nonce = [0u8; 12];
                nonce[..4].copy_from_slice(iv);
                nonce[4..].copy_from_slice(header.epoch_seq);
                let aad = header.additional_data(content_type, plain.len());
                out.extend_from_slice(header.epoch_seq);
                let start = out.len();
                out.extend_from_slice(plain);
                let tag = cipher.seal_in_place(&nonce, &aad, &mut out[start..])?;
                out.extend_from_slice(&tag);
                Some(())
            }
            Protection::Cbc(keys) => keys.seal_into(header, content_type, plain, out),
        }
    }
}

/// What a record's MAC or AEAD tag covers besides its content: its epoch and sequence number,
/// and for a tls12_cid record the CID it carries.
#[derive(Debug, Clone, Copy)]
pub struct Header<'a> {
    pub epoch_seq: &'a [u8],
    pub cid: Option<&'a [u8]>,
}

impl Header<'_> {
    /// RFC 5246 §6.2.3.1 and §6.2.3.3 with DTLS's epoch and sequence number (type, version,
    /// length after them); for a CID record RFC 9146 §5: a placeholder of eight 0xff, the
    /// tls12_cid type, the CID's length, the type again, version, epoch, sequence number, the CID
    /// and the length (of the inner plaintext, or of the ciphertext under encrypt-then-MAC).
    pub fn additional_data(&self, content_type: u8, len: usize) -> SmallVec<[u8; 64]> {
        let mut aad = SmallVec::new();
        match self.cid {
            None => {
                aad.extend_from_slice(self.epoch_seq);
                aad.push(content_type);
                aad.extend_from_slice(&DTLS_1_2);
            }
            Some(cid) => {
                aad.extend_from_slice(&[0xff; 8]);
                aad.extend_from_slice(&[CONTENT_TLS12_CID, cid.len() as u8, CONTENT_TLS12_CID]);
                aad.extend_from_slice(&DTLS_1_2);
                aad.extend_from_slice(self.epoch_seq);
                aad.extend_from_slice(cid);
            }
        }
        aad.extend_from_slice(&(len as u16).to_be_bytes());
        aad
    }
}

/// What a session's record protection is made of, as kept in the store: the negotiated suite,
/// RFC 7366's choice, and the key block derived from the master secret (the secret itself is
/// not kept).
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    pub suite: [u8; 2],
    pub encrypt_then_mac: bool,
    pub block: Vec<u8>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keys({})", hex::encode(self.suite))
    }
}

impl Keys {
    /// The keys of the handshake OpenSSL ran on `ssl`, once it has the master secret (after the
    /// client's key exchange); `encrypt_then_mac` when its ServerHello agreed to RFC 7366 (CBC
    /// suites only). `None` for a suite this layer does not implement.
    pub fn of_handshake(ssl: &SslRef, encrypt_then_mac: bool) -> Option<Keys> {
        let suite = ssl.current_cipher()?.protocol_id();
        let (algorithm, hash) = self::suite(suite)?;
        let mut master = [0u8; 48];
        if ssl.session()?.master_key(&mut master) != master.len() {
            return None; // none yet: the client's key exchange has not been read
        }
        let mut client_random = [0u8; 32];
        let mut server_random = [0u8; 32];
        ssl.client_random(&mut client_random);
        ssl.server_random(&mut server_random);
        let seed = [&server_random[..], &client_random[..]].concat();
        let block = prf(hash, &master, b"key expansion", &seed, 2 * key_lens(algorithm).iter().sum::<usize>());
        Some(Keys { suite, encrypt_then_mac, block })
    }

    /// Both directions' protection: (client to server, server to client).
    fn protections(&self) -> Option<(Protection, Protection)> {
        let (algorithm, _) = suite(self.suite)?;
        let [mac_len, key_len, iv_len] = key_lens(algorithm);
        if self.block.len() != 2 * (mac_len + key_len + iv_len) {
            return None;
        }
        // RFC 5246 §6.3: MAC keys, keys, then implicit IVs (AEAD only).
        let (client_mac, rest) = self.block.split_at(mac_len);
        let (server_mac, rest) = rest.split_at(mac_len);
        let (client_key, rest) = rest.split_at(key_len);
        let (server_key, ivs) = rest.split_at(key_len);
        let etm = self.encrypt_then_mac;
        Some(match algorithm {
            Algorithm::Cbc { mac, .. } => (
                Protection::Cbc(Box::new(CbcKeys::new(client_key, client_mac, mac, etm))),
                Protection::Cbc(Box::new(CbcKeys::new(server_key, server_mac, mac, etm))),
            ),
            _ => (
                Protection::Aead { cipher: Cipher::new(algorithm, client_key)?, iv: ivs[..4].try_into().ok()? },
                Protection::Aead { cipher: Cipher::new(algorithm, server_key)?, iv: ivs[4..8].try_into().ok()? },
            ),
        })
    }
}

/// MAC key, key and implicit IV lengths of one direction.
fn key_lens(algorithm: Algorithm) -> [usize; 3] {
    match algorithm {
        Algorithm::Cbc { key_len, mac } => [mac.len(), key_len, 0],
        Algorithm::Aes256Gcm => [0, 32, 4],
        _ => [0, 16, 4],
    }
}

/// The connection IDs a session negotiated (RFC 9146).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cids {
    /// Ours: the client puts it on every record it sends. `None` without CID.
    pub ours: Option<Cid>,
    /// The client's: we put it on every record we send. Empty when the client asked for records
    /// without one.
    pub theirs: Box<[u8]>,
}

/// Where the anti-replay window stands, as kept in the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayPosition {
    pub next: u64,
    pub seen: u64,
}

/// An established session's keys and counters (server side).
pub struct Session {
    read: Protection,
    write: Protection,
    cids: Cids,
    write_seq: u64,
    replay: ReplayWindow,
    /// The server's last flight (ChangeCipherSpec, Finished), resent if the client shows it was
    /// lost; dropped once the client's first application data proves it arrived.
    final_flight: Option<Box<[Bytes]>>,
}

impl Session {
    /// A session under `keys` whose next record sent has sequence number `write_seq` and whose
    /// replay window stands at `replay`.
    pub fn new(keys: &Keys, cids: Cids, write_seq: u64, replay: ReplayPosition) -> Option<Session> {
        let (read, write) = keys.protections()?;
        let replay = ReplayWindow { next: replay.next, seen: replay.seen };
        Some(Session { read, write, cids, write_seq, replay, final_flight: None })
    }

    /// The session OpenSSL just established under `keys`, whose last flight was `final_flight`:
    /// what it sent under the new keys is sent again with the client's CID (RFC 9146 applies to
    /// every record of the new epoch, Finished included).
    pub fn from_handshake(keys: &Keys, cids: Cids, final_flight: Vec<Bytes>) -> Option<Session> {
        // The Finished in the final flight already used epoch 1's first sequence number(s).
        let write_seq = final_flight.iter().filter_map(|d| last_seq(d, EPOCH)).max().map_or(0, |s| s + 1);
        let mut session = Session::new(keys, cids, write_seq, ReplayPosition::default())?;
        let flight = final_flight.iter().map(|d| session.with_cid(d)).collect::<Option<Vec<Bytes>>>()?;
        session.final_flight = Some(flight.into_boxed_slice());
        Some(session)
    }

    pub fn cids(&self) -> &Cids {
        &self.cids
    }

    /// The sequence number the next record sent will have.
    pub fn write_seq(&self) -> u64 {
        self.write_seq
    }

    pub fn replay_position(&self) -> ReplayPosition {
        ReplayPosition { next: self.replay.next, seen: self.replay.seen }
    }

    /// The records of one datagram that authenticate and are not replays; anything else is
    /// discarded silently, as DTLS requires (RFC 6347 §4.1.2.7). True if one of them was the
    /// newest the session has read: only such a record may move the session to its source
    /// address (RFC 9146 §6), so a replayed or delayed one cannot pull it back.
    pub fn open(&mut self, datagram: &[u8], mut each: impl FnMut(Record)) -> bool {
        let mut newest = false;
        for record in super::records(datagram, self.cid_len()) {
            let was_next = self.replay.next;
            if let Some(r) = self.open_record(record.bytes) {
                newest |= self.replay.next > was_next;
                if matches!(r, Record::Data(_)) {
                    self.final_flight = None;
                }
                each(r);
            }
        }
        newest
    }

    fn cid_len(&self) -> usize {
        self.cids.ours.map_or(0, |c| c.byte_len())
    }

    /// The content type and plaintext of one record under the read keys, and its sequence
    /// number; the replay window is not consulted.
    fn decrypt(&self, record: &[u8]) -> Option<(u8, Vec<u8>, u64)> {
        let epoch = u16::from_be_bytes([record[3], record[4]]);
        if epoch != EPOCH || record[1..3] != DTLS_1_2 {
            return None;
        }
        let seq = seq48(&record[5..11]);
        let epoch_seq = &record[3..11];
        match (record[0], self.cids.ours) {
            (CONTENT_TLS12_CID, Some(ours)) => {
                let cid = record.get(cid::OFFSET..cid::OFFSET + ours.byte_len())?;
                if cid != ours.as_bytes() {
                    return None;
                }
                let header = Header { epoch_seq, cid: Some(cid) };
                let inner = self.read.open(header, CONTENT_TLS12_CID, record.get(HEADER_LEN + ours.byte_len()..)?)?;
                let (content_type, content) = inner_plaintext(inner)?;
                Some((content_type, content, seq))
            }
            // With a CID negotiated, records without it are not the client's (RFC 9146 §4).
            (CONTENT_TLS12_CID, None) | (_, Some(_)) => None,
            (content_type, None) => {
                let header = Header { epoch_seq, cid: None };
                Some((content_type, self.read.open(header, content_type, &record[HEADER_LEN..])?, seq))
            }
        }
    }

    fn open_record(&mut self, record: &[u8]) -> Option<Record> {
        let seq = seq48(record.get(5..11)?);
        if !self.replay.is_fresh(seq) {
            return None;
        }
        let (content_type, plain, seq) = self.decrypt(record)?;
        self.replay.mark(seq);
        match content_type {
            CONTENT_APPLICATION_DATA => Some(Record::Data(plain)),
            CONTENT_ALERT if plain.len() == 2 => Some(Record::Alert(plain[0], plain[1])),
            CONTENT_HANDSHAKE => Some(Record::Handshake),
            _ => None,
        }
    }

    /// A client's tls12_cid record during the handshake (its Finished), as the plain record of
    /// the same content, epoch and sequence number OpenSSL reads; `None` if it does not
    /// authenticate.
    pub fn without_cid(&self, record: &[u8]) -> Option<Vec<u8>> {
        let (content_type, plain, _) = self.decrypt(record)?;
        let mut out = Vec::with_capacity(record.len());
        push_header(&mut out, content_type, &record[3..11], None);
        let header = Header { epoch_seq: &record[3..11], cid: None };
        self.read.seal_into(header, content_type, &plain, &mut out)?;
        finish_length(&mut out, 0, HEADER_LEN);
        Some(out)
    }

    /// `datagram` (one OpenSSL sent) with its records of the new epoch carrying the client's CID.
    fn with_cid(&self, datagram: &Bytes) -> Option<Bytes> {
        if self.cids.theirs.is_empty() {
            return Some(datagram.clone());
        }
        let mut out = Vec::with_capacity(datagram.len() + 16 + self.cids.theirs.len());
        for record in super::records(datagram, 0) {
            let b = record.bytes;
            if record.epoch != EPOCH {
                out.extend_from_slice(b);
                continue;
            }
            let header = Header { epoch_seq: &b[3..11], cid: None };
            let plain = self.write.open(header, b[0], &b[HEADER_LEN..])?;
            self.seal_record(b[3..11].try_into().ok()?, b[0], &plain, &mut out)?;
        }
        Some(Bytes::from(out))
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
        let mut out = Vec::with_capacity(HEADER_LEN + self.cids.theirs.len() + plaintext.len() + 97);
        self.seal_record(epoch_seq, content_type, plaintext, &mut out)?;
        Some(Bytes::from(out))
    }

    /// Appends one record to `out`: a tls12_cid record when the client gave a CID (RFC 9146 §4:
    /// the content, then its real type, no padding), a plain one otherwise.
    fn seal_record(&self, epoch_seq: [u8; 8], content_type: u8, plaintext: &[u8], out: &mut Vec<u8>) -> Option<()> {
        let start = out.len();
        if self.cids.theirs.is_empty() {
            push_header(out, content_type, &epoch_seq, None);
            self.write.seal_into(Header { epoch_seq: &epoch_seq, cid: None }, content_type, plaintext, out)?;
            finish_length(out, start, HEADER_LEN);
            return Some(());
        }
        let cid = &self.cids.theirs[..];
        push_header(out, CONTENT_TLS12_CID, &epoch_seq, Some(cid));
        let inner = [plaintext, &[content_type]].concat();
        self.write.seal_into(Header { epoch_seq: &epoch_seq, cid: Some(cid) }, CONTENT_TLS12_CID, &inner, out)?;
        finish_length(out, start, HEADER_LEN + cid.len());
        Some(())
    }

    /// The final flight again, if the client may still be missing it.
    pub fn final_flight(&self) -> &[Bytes] {
        self.final_flight.as_deref().unwrap_or_default()
    }
}

/// Appends a record's header with its length left 0: type, version, epoch and sequence, CID,
/// length. Into the datagram's own buffer: sealing allocates once per record.
fn push_header(out: &mut Vec<u8>, content_type: u8, epoch_seq: &[u8], cid: Option<&[u8]>) {
    out.push(content_type);
    out.extend_from_slice(&DTLS_1_2);
    out.extend_from_slice(epoch_seq);
    out.extend_from_slice(cid.unwrap_or_default());
    out.extend_from_slice(&[0, 0]);
}

/// Writes the length of the record starting at `start` of `out`, whose header is `header_len`.
fn finish_length(out: &mut [u8], start: usize, header_len: usize) {
    let len = (out.len() - start - header_len) as u16;
    out[start + header_len - 2..start + header_len].copy_from_slice(&len.to_be_bytes());
}

/// DTLSInnerPlaintext (RFC 9146 §4): the content, its real type, then zeros.
fn inner_plaintext(mut inner: Vec<u8>) -> Option<(u8, Vec<u8>)> {
    let end = inner.iter().rposition(|&b| b != 0)?;
    let content_type = inner[end];
    inner.truncate(end);
    Some((content_type, inner))
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
pub fn last_seq(datagram: &[u8], epoch: u16) -> Option<u64> {
    super::records(datagram, 0).filter(|r| r.epoch == epoch).map(|r| seq48(&r.bytes[5..11])).max()
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
        let keys = Keys::of_handshake(server.ssl(), etm).expect("supported suite");
        let mut session = Session::from_handshake(&keys, Cids::default(), final_flight).unwrap();
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

    /// A server session with CID `010203040506` and the client's mirror of it, which puts
    /// `theirs` on what it receives.
    fn cid_pair(id: [u8; 2], etm: bool, theirs: &[u8]) -> (Session, Session) {
        let (algorithm, _) = suite(id).unwrap();
        let keys = Keys {
            suite: id,
            encrypt_then_mac: etm,
            block: (0..2 * key_lens(algorithm).iter().sum::<usize>() as u8).collect(),
        };
        let ours = Cid::new(&[1, 2, 3, 4, 5, 6]).unwrap();
        let server =
            Session::new(&keys, Cids { ours: Some(ours), theirs: theirs.into() }, 0, ReplayPosition::default());
        let (c2s, s2c) = keys.protections().unwrap();
        let mirrored =
            Cids { ours: Some(theirs).filter(|c| !c.is_empty()).and_then(Cid::new), theirs: ours.as_bytes().into() };
        let client = Session {
            read: s2c,
            write: c2s,
            cids: mirrored,
            write_seq: 0,
            replay: ReplayWindow::default(),
            final_flight: None,
        };
        (server.unwrap(), client)
    }

    fn opened(session: &mut Session, datagram: &[u8]) -> Vec<Record> {
        let mut got = Vec::new();
        session.open(datagram, |r| got.push(r));
        got
    }

    #[test]
    fn cid_records_carry_their_cid_and_authenticate_it() {
        // AEAD (CCM_8, GCM) and CBC with HMAC, MAC-then-encrypt and encrypt-then-MAC.
        for (id, etm) in [([0xc0, 0xa8], false), ([0x00, 0xa8], false), ([0x00, 0xae], false), ([0x00, 0xae], true)] {
            for theirs in [&[0xc1, 0x1d][..], &[]] {
                let (mut server, mut client) = cid_pair(id, etm, theirs);
                let up = client.seal(CONTENT_APPLICATION_DATA, b"up").unwrap();
                assert_eq!((up[0], &up[11..17]), (CONTENT_TLS12_CID, &[1, 2, 3, 4, 5, 6][..]), "type 25, our CID");
                assert_eq!(opened(&mut server, &up), [Record::Data(b"up".to_vec())], "{id:?} {etm}");
                assert!(opened(&mut server, &up).is_empty(), "a replay");
                let mut tampered = client.seal(CONTENT_APPLICATION_DATA, b"up").unwrap().to_vec();
                tampered[16] ^= 1;
                assert!(opened(&mut server, &tampered).is_empty(), "the CID is authenticated");

                let down = server.seal(CONTENT_APPLICATION_DATA, b"down").unwrap();
                let expected_type = if theirs.is_empty() { CONTENT_APPLICATION_DATA } else { CONTENT_TLS12_CID };
                assert_eq!(down[0], expected_type, "with the client's CID, or none if it gave an empty one");
                assert_eq!(opened(&mut client, &down), [Record::Data(b"down".to_vec())], "{id:?} {etm}");

                // The client's Finished, rewritten for OpenSSL, is a plain record of the same keys.
                let finished = client.seal(CONTENT_HANDSHAKE, b"finished").unwrap();
                let plain = server.without_cid(&finished).unwrap();
                assert_eq!((plain[0], &plain[3..11]), (CONTENT_HANDSHAKE, &finished[3..11]));
                let mut no_cid = cid_pair(id, etm, &[]).0;
                no_cid.cids = Cids::default();
                assert_eq!(opened(&mut no_cid, &plain), [Record::Handshake]);
                assert!(opened(&mut server, &plain).is_empty(), "with a CID, records without one are refused");
            }
        }
    }

    #[test]
    fn a_restored_session_refuses_what_it_read_before_and_sends_past_what_it_reserved() {
        let (mut server, mut client) = cid_pair([0xc0, 0xa8], false, &[0xc1, 0x1d]);
        let before = client.seal(CONTENT_APPLICATION_DATA, b"before").unwrap();
        assert_eq!(opened(&mut server, &before).len(), 1);
        let keys = Keys { suite: [0xc0, 0xa8], encrypt_then_mac: false, block: (0..40).collect() };
        let mut restored = Session::new(&keys, server.cids().clone(), 1024, server.replay_position()).unwrap();
        assert!(opened(&mut restored, &before).is_empty(), "read before the crash");
        let after = client.seal(CONTENT_APPLICATION_DATA, b"after").unwrap();
        assert_eq!(opened(&mut restored, &after), [Record::Data(b"after".to_vec())]);
        let down = restored.seal(CONTENT_APPLICATION_DATA, b"down").unwrap();
        assert_eq!(seq48(&down[5..11]), 1024);
        assert_eq!(opened(&mut client, &down).len(), 1);
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
