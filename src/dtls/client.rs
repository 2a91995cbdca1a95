//! A device-side DTLS 1.2 PSK client over a blocking UDP socket, for the load generator and the
//! tests. It can stop at any point of the handshake (a silent peer) and reuse its socket (a
//! device that reboots and keeps its port).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use openssl::ssl::{ErrorCode, Ssl, SslContext, SslMethod, SslOptions, SslStream, SslVerifyMode};

use super::pipe::Pipe;

/// SSL_OP_NO_ENCRYPT_THEN_MAC, which the `openssl` crate does not name.
const NO_ENCRYPT_THEN_MAC: u64 = 1 << 19;

pub struct ClientConfig<'a> {
    /// Identity and key; without, the client expects a certificate (and does not verify it).
    pub psk: Option<(&'a str, &'a [u8])>,
    /// OpenSSL cipher names, e.g. `PSK-AES128-CCM8` or `AES128-SHA`.
    pub ciphers: &'a str,
    /// Offer encrypt-then-MAC (RFC 7366) for CBC suites, as OpenSSL does by default.
    pub encrypt_then_mac: bool,
}

pub struct DtlsClient {
    pub socket: UdpSocket,
    stream: SslStream<Pipe>,
    /// ClientHellos sent so far (the first without a cookie, the second with one).
    pub hellos_sent: usize,
    /// Datagrams received so far, and the ones (1-based) to drop as if lost on the way.
    received: usize,
    pub lose: Vec<usize>,
    /// Sends the records of a datagram that holds several one by one, its last record first: a
    /// network that lets the Finished of a packed flight overtake the rest.
    pub overtake: bool,
    /// The last datagram OpenSSL wrote, as it wrote it (before `overtake` splits it).
    pub last_sent: Vec<u8>,
}

impl DtlsClient {
    /// A PSK client on `socket` (connected to the server), offering `ciphers`.
    pub fn psk(socket: UdpSocket, identity: &str, key: &[u8], ciphers: &str) -> DtlsClient {
        DtlsClient::new(socket, &ClientConfig { psk: Some((identity, key)), ciphers, encrypt_then_mac: true })
    }

    pub fn new(socket: UdpSocket, config: &ClientConfig<'_>) -> DtlsClient {
        let stream = stream(config);
        let _ = socket.set_read_timeout(Some(Duration::from_millis(200)));
        DtlsClient {
            socket,
            stream,
            hellos_sent: 0,
            received: 0,
            lose: Vec::new(),
            overtake: false,
            last_sent: Vec::new(),
        }
    }

    pub fn bind(server: SocketAddr) -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect(server).unwrap();
        s
    }

    /// Datagrams received from the server so far, lost ones included.
    pub fn datagrams_received(&self) -> usize {
        self.received
    }

    fn send_outbound(&mut self) {
        let outbound: Vec<Vec<u8>> = self.stream.get_mut().take_outbound().collect();
        for d in outbound {
            if super::is_client_hello(&d) {
                self.hellos_sent += 1;
            }
            if self.overtake {
                let mut parts: Vec<&[u8]> = super::records(&d, 0).map(|r| r.bytes).collect();
                parts.rotate_right(1);
                for part in parts {
                    self.socket.send(part).unwrap();
                }
            } else {
                self.socket.send(&d).unwrap();
            }
            self.last_sent = d;
        }
    }

    fn receive(&mut self) -> bool {
        let mut buf = [0u8; 2048];
        match self.socket.recv(&mut buf) {
            Ok(n) => {
                self.received += 1;
                if self.lose.contains(&self.received) {
                    return false;
                }
                self.stream.get_mut().put(&buf[..n]);
                true
            }
            Err(_) => false,
        }
    }

    /// Runs the handshake until it completes (`Ok`), fails, or `stop_after_hellos` ClientHellos
    /// have been sent (then the client goes silent and returns `Err("stopped")`).
    pub fn handshake(&mut self, stop_after_hellos: Option<usize>, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            match self.stream.connect() {
                Ok(()) => {
                    self.send_outbound();
                    return Ok(());
                }
                Err(e) if e.code() == ErrorCode::WANT_READ => {
                    self.send_outbound();
                    if stop_after_hellos.is_some_and(|n| self.hellos_sent >= n) {
                        return Err("stopped".into());
                    }
                    while !self.receive() {
                        if Instant::now() > deadline {
                            return Err("handshake timed out".into());
                        }
                        // Nothing came: retransmit the last flight once its timer runs out.
                        super::ffi::handle_timeout(super::ffi::ssl_mut(&mut self.stream));
                        self.send_outbound();
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Sends one CoAP datagram and returns the first one received back.
    pub fn exchange(&mut self, coap: &[u8], within: Duration) -> Option<Vec<u8>> {
        self.send(coap)?;
        self.recv(within)
    }

    /// Sends one CoAP datagram inside the session.
    pub fn send(&mut self, coap: &[u8]) -> Option<()> {
        self.stream.ssl_write(coap).ok()?;
        self.send_outbound();
        Some(())
    }

    /// The next CoAP datagram received inside the session, if one comes within `within`.
    pub fn recv(&mut self, within: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + within;
        let mut buf = vec![0u8; 16384];
        loop {
            if Instant::now() > deadline {
                return None;
            }
            if !self.receive() {
                continue;
            }
            match self.stream.ssl_read(&mut buf) {
                Ok(n) => return Some(buf[..n].to_vec()),
                Err(e) if e.code() == ErrorCode::WANT_READ => self.send_outbound(),
                Err(_) => return None,
            }
        }
    }

    /// Sends close_notify.
    pub fn close(mut self) -> UdpSocket {
        let _ = self.stream.shutdown();
        self.send_outbound();
        self.socket
    }
}

/// The device side of DTLS over an in-memory pipe, as `config` says: what [`DtlsClient`] runs
/// over its socket, and what unit tests run against the peer table directly.
pub fn stream(config: &ClientConfig<'_>) -> SslStream<Pipe> {
    let mut ctx = SslContext::builder(SslMethod::dtls_client()).expect("OpenSSL DTLS client context");
    if let Err(e) = ctx.set_cipher_list(config.ciphers) {
        panic!("cipher list {:?}: {e}", config.ciphers);
    }
    ctx.set_verify(SslVerifyMode::NONE);
    if !config.encrypt_then_mac {
        ctx.set_options(SslOptions::from_bits_retain(NO_ENCRYPT_THEN_MAC));
    }
    if let Some((identity, key)) = config.psk {
        let (identity, key) = (identity.as_bytes().to_vec(), key.to_vec());
        ctx.set_psk_client_callback(move |_, _hint, id_out, key_out| {
            id_out[..identity.len()].copy_from_slice(&identity);
            id_out[identity.len()] = 0;
            key_out[..key.len()].copy_from_slice(&key);
            Ok(key.len())
        });
    }
    let ssl = Ssl::new(&ctx.build()).expect("OpenSSL SSL");
    SslStream::new(ssl, Pipe::default()).expect("OpenSSL stream")
}
