//! The I/O shell around a CoAP [`Endpoint`]: one task per socket moves datagrams in batches,
//! through its [`Link`] (plain or DTLS), hands writes to the store's writer and sends what the
//! endpoint decides, when it decides it.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use metrics::Counter;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use super::link::{Datagram, Link, Wire};
use super::mmsg::{self, RecvBatch};
use crate::clock::Now;
use crate::coap::endpoint::{Actions, Endpoint};
use crate::coap::message::Code;
use crate::coap::resource::{Resources, StoredId, WriteFailed, Written};
use crate::registry::routes::Kicks;
use crate::store::{CommitSink, Committed, Completion, Job, MessageId, Ops, StoreError, Writer};
use crate::telemetry::metric;

/// Binds `count` sockets to `addr` with SO_REUSEPORT so the kernel spreads peers over them (a
/// peer's 4-tuple always hashes to the same socket, so its exchanges stay on one endpoint).
/// With port 0 the first socket picks the port and the others join it.
pub fn bind(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut sockets = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        s.set_reuse_port(true)?;
        // Bursts of thousands of devices must not overflow the kernel queue; the kernel caps
        // these at net.core.{r,w}mem_max.
        let _ = s.set_recv_buffer_size(8 << 20);
        let _ = s.set_send_buffer_size(4 << 20);
        s.set_nonblocking(true)?;
        s.bind(&bound.into())?;
        bound = s.local_addr()?.as_socket().unwrap_or(bound);
        sockets.push(s.into());
    }
    Ok(sockets)
}

/// Makes the kernel hand a datagram whose first record carries a Connection ID to the socket
/// the CID's first byte names (modulo `sockets`; see `dtls::cid`), wherever it comes from: the
/// SO_REUSEPORT hash of a new address would pick any socket, and only one holds the session.
/// Other datagrams keep the kernel's hash (a program's answer beyond the group falls back to it).
pub fn steer_by_cid(socket: &std::net::UdpSocket, sockets: usize) -> io::Result<()> {
    use crate::dtls::cid::{CONTENT_TLS12_CID, OFFSET};
    // Classic BPF over the UDP payload: A = byte 0; if A == 25 { A = byte OFFSET; return A % n }
    // else return u32::MAX.
    let insn = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let program = [
        insn((libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16, 0, 0, 0),
        insn((libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16, 0, 3, CONTENT_TLS12_CID as u32),
        insn((libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16, 0, 0, OFFSET as u32),
        insn((libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K) as u16, 0, 0, sockets as u32),
        insn((libc::BPF_RET | libc::BPF_A) as u16, 0, 0, 0),
        insn((libc::BPF_RET | libc::BPF_K) as u16, 0, 0, u32::MAX),
    ];
    let prog = libc::sock_fprog { len: program.len() as u16, filter: program.as_ptr() as *mut libc::sock_filter };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies it.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Metric handles for one port, registered once rather than looked up per datagram.
struct PortMetrics {
    port: &'static str,
    received: Counter,
    sent: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    stored: Counter,
    /// Responses by code (indexed by the code byte), registered on first use: a lookup per
    /// response, so no hashing.
    codes: Box<[Option<Counter>; 256]>,
}

impl PortMetrics {
    fn count_response(&mut self, datagram: &[u8]) {
        // Byte 1 is the code. Class 0 is not a response: Empty ACK/RST (0.00) are message-layer,
        // 0.01-0.31 are the server's own requests (Huawei GET and POST /t/d).
        let Some(&code) = datagram.get(1) else { return };
        if Code(code).class() == 0 {
            return;
        }
        let port = self.port;
        self.codes[code as usize]
            .get_or_insert_with(
                || metrics::counter!(metric::RESPONSES, "port" => port, "code" => Code(code).to_string()),
            )
            .increment(1);
    }

    fn new(port: &'static str) -> PortMetrics {
        PortMetrics {
            port,
            codes: Box::new(std::array::from_fn(|_| None)),
            received: metrics::counter!(metric::DATAGRAMS_RECEIVED, "port" => port),
            sent: metrics::counter!(metric::DATAGRAMS_SENT, "port" => port),
            bytes_in: metrics::counter!(metric::BYTES_RECEIVED, "port" => port),
            bytes_out: metrics::counter!(metric::BYTES_SENT, "port" => port),
            stored: metrics::counter!(metric::UPLINKS_STORED, "port" => port),
        }
    }
}

const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// Most datagrams read before the loop looks at completions and timers again.
const READS_PER_TURN: usize = 8;

/// What a socket task is told about its port.
pub struct Port {
    /// Names the port in metrics.
    pub label: &'static str,
    /// Bytes per received datagram; longer ones are reported truncated.
    pub recv_slot: usize,
    /// Devices the admin API has something for, served by this socket.
    pub kicks: Kicks,
}

/// Runs one socket until `shutdown` flips, then waits (bounded) for its writes in flight so the
/// devices waiting on them still get their answers.
pub async fn serve<R: Resources<Writes = Ops>, L: Link>(
    socket: std::net::UdpSocket,
    mut endpoint: Endpoint<R>,
    mut link: L,
    writer: Writer,
    port: Port,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    let Port { label: port, recv_slot, mut kicks } = port;
    let socket = UdpSocket::from_std(socket)?;
    let fd = socket.as_raw_fd();
    let (sink, mut committed) = mpsc::unbounded_channel::<Vec<Committed>>();
    let mut batch = RecvBatch::new(32, recv_slot);
    let mut actions = Actions::default();
    let mut outbox: Wire = Vec::new();
    let mut m = PortMetrics::new(port);
    let mut last_export = Instant::now();
    loop {
        // Wake at least once a second so counters reach /metrics even on a quiet port.
        let deadline = [endpoint.poll_timeout(), link.poll_timeout(), Some(last_export + STATS_INTERVAL)]
            .into_iter()
            .flatten()
            .min()
            .expect("the stats deadline is always there");
        tokio::select! {
            _ = shutdown.changed() => break,
            ready = socket.readable() => {
                ready?;
                for _ in 0..READS_PER_TURN {
                    match socket.try_io(Interest::READABLE, || batch.recv(fd)) {
                        Ok(n) => {
                            let now = Now::read();
                            for i in 0..n {
                                let Some((peer, data, truncated)) = batch.get(i) else { continue };
                                m.received.increment(1);
                                m.bytes_in.increment(data.len() as u64);
                                link.receive(now, Datagram { peer, data, truncated }, &mut endpoint, &mut actions, &mut outbox);
                            }
                            if n < batch.capacity() {
                                break;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            // ICMP errors surface here (ECONNREFUSED from an earlier send); they
                            // concern one peer, never the socket.
                            tracing::debug!(error = %e, "receive error");
                            break;
                        }
                    }
                }
            }
            Some(device) = kicks.recv() => {
                endpoint.handle_kick(Now::read(), device, &mut actions);
            }
            Some(batch) = committed.recv() => {
                let now = Now::read();
                let mut next = Some(batch);
                while let Some(batch) = next {
                    for c in batch {
                        if matches!(c.result, Ok(Some(_))) {
                            m.stored.increment(1);
                        }
                        endpoint.handle_committed(now, c.ticket.into(), written(c.result), &mut actions);
                    }
                    next = committed.try_recv().ok();
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                let now = Now::read();
                endpoint.handle_timeout(now, &mut actions);
                link.handle_timeout(now.instant, &mut outbox);
            }
        }
        flush(&socket, &writer, &sink, &mut link, &mut actions, &mut outbox, &mut m).await;
        if last_export.elapsed() >= STATS_INTERVAL {
            last_export = Instant::now();
            export_stats(&mut endpoint, port);
            link.export_stats(port);
        }
    }
    // Answer what is already being written; new datagrams are no longer read.
    let drain_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while endpoint.pending_writes() > 0 {
        match tokio::time::timeout_at(drain_until, committed.recv()).await {
            Ok(Some(batch)) => {
                for c in batch {
                    endpoint.handle_committed(Now::read(), c.ticket.into(), written(c.result), &mut actions);
                }
            }
            _ => break,
        }
        flush(&socket, &writer, &sink, &mut link, &mut actions, &mut outbox, &mut m).await;
    }
    export_stats(&mut endpoint, port);
    link.export_stats(port);
    Ok(())
}

/// What the endpoint hears of a write: the stored message's id, or whether to ask for a retry.
pub fn written(result: Result<Option<MessageId>, StoreError>) -> Written {
    result.map(|id| id.map(|m| StoredId(m.0))).map_err(|e| WriteFailed { retry_after_s: e.retry_after_s() })
}

async fn flush(
    socket: &UdpSocket,
    writer: &Writer,
    sink: &CommitSink,
    link: &mut impl Link,
    actions: &mut Actions<Ops>,
    outbox: &mut Wire,
    m: &mut PortMetrics,
) {
    // The link's state first: a DTLS session's replay window is durable no later than what
    // its records caused.
    submit_detached(writer, link.take_writes());
    for (ticket, ops) in actions.writes.drain(..) {
        let completion = match ticket {
            Some(ticket) => Completion::Endpoint { sink: sink.clone(), ticket: ticket.into() },
            None => Completion::Detached,
        };
        writer.submit(Job { ops, completion });
    }
    for t in &actions.transmits {
        m.count_response(&t.data);
    }
    link.seal(actions.transmits.drain(..), outbox);
    // Write sequence numbers reserved while sealing are asked for before the records go out.
    submit_detached(writer, link.take_writes());
    let mut sent = 0;
    while sent < outbox.len() {
        match socket.try_io(Interest::WRITABLE, || mmsg::send(socket.as_raw_fd(), &outbox[sent..])) {
            Ok(n) => {
                for (_, d) in &outbox[sent..sent + n] {
                    m.bytes_out.increment(d.len() as u64);
                }
                m.sent.increment(n as u64);
                sent += n;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if socket.writable().await.is_err() {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "send failed");
                break;
            }
        }
    }
    outbox.clear();
}

fn submit_detached(writer: &Writer, ops: Ops) {
    if !ops.is_empty() {
        writer.submit(Job { ops, completion: Completion::Detached });
    }
}

fn export_stats<R: Resources>(endpoint: &mut Endpoint<R>, port: &'static str) {
    let (s, evictions, dedup_len) = endpoint.take_stats();
    metrics::counter!(metric::MALFORMED, "port" => port).increment(s.malformed);
    metrics::counter!(metric::DUPLICATES, "port" => port).increment(s.duplicates);
    metrics::counter!(metric::RETRANSMISSIONS, "port" => port).increment(s.retransmissions);
    metrics::counter!(metric::CON_TIMEOUTS, "port" => port).increment(s.con_timeouts);
    metrics::counter!(metric::PENDING_WRITES_FULL, "port" => port).increment(s.pending_full);
    metrics::counter!(metric::DEDUP_EVICTIONS, "port" => port).increment(evictions);
    metrics::gauge!(metric::DEDUP_ENTRIES, "port" => port).set(dedup_len as f64);
    metrics::counter!(metric::OUTGOING_FULL, "port" => port).increment(s.outgoing_full);
    metrics::gauge!(metric::OUTGOING, "port" => port).set(endpoint.outgoing() as f64);
}
