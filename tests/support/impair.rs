//! A user-space link impairment relay (this kernel has no netem): it sits between `amb client`
//! and `amb server` and forwards TCP and UDP with delay, jitter (and so reordering), loss (UDP),
//! a rate limit (TCP), a switchable blackhole, and, for UDP, a change of source address.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Notify};

/// Impairments, changeable while the relay runs.
#[derive(Default)]
pub struct Impairments {
    /// One-way delay in milliseconds.
    pub delay_ms: AtomicU64,
    /// Extra random delay up to this many milliseconds (reorders UDP datagrams).
    pub jitter_ms: AtomicU64,
    /// UDP datagrams dropped per million.
    pub loss_ppm: AtomicU64,
    /// TCP bytes per second each way (0: unlimited).
    pub rate_bps: AtomicU64,
    /// Drop every UDP datagram and hold every TCP byte while set.
    pub blackhole: AtomicBool,
    /// The largest UDP datagram seen from the client side and from the server side.
    pub largest_datagram: [AtomicUsize; 2],
    /// TLS records the client side has sent over TCP, counted from their plaintext headers.
    pub tls_records_up: AtomicUsize,
    healed: Notify,
}

impl Impairments {
    fn delay(&self) -> Duration {
        let jitter = self.jitter_ms.load(Ordering::Relaxed);
        let extra = if jitter == 0 {
            0
        } else {
            rand::rng().random_range(0..=jitter)
        };
        Duration::from_millis(self.delay_ms.load(Ordering::Relaxed) + extra)
    }

    fn drop_datagram(&self) -> bool {
        self.blackhole.load(Ordering::Relaxed)
            || rand::rng().random_range(0..1_000_000) < self.loss_ppm.load(Ordering::Relaxed)
    }

    /// Starts or ends a blackhole.
    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
        if !on {
            self.healed.notify_waiters();
        }
    }

    async fn wait_healed(&self) {
        while self.blackhole.load(Ordering::SeqCst) {
            let healed = self.healed.notified();
            if !self.blackhole.load(Ordering::SeqCst) {
                break;
            }
            healed.await;
        }
    }
}

/// The relay: clients dial `addr` (TCP and UDP, same port); it forwards to `target`.
pub struct Relay {
    pub addr: SocketAddr,
    pub link: Arc<Impairments>,
    udp_out: Arc<Mutex<Arc<UdpSocket>>>,
    rebound: Arc<Notify>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let link = Arc::new(Impairments::default());
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let udp_in = Arc::new(UdpSocket::bind(addr).await.unwrap());
        let udp_out = Arc::new(Mutex::new(Arc::new(
            UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        )));
        let rebound = Arc::new(Notify::new());
        let mut tasks = Vec::new();

        let l = link.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok((inbound, _)) = tcp.accept().await {
                let l = l.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::join!(pipe(ri, wo, l.clone(), true), pipe(ro, wi, l, false));
                });
            }
        }));

        // UDP: one client (the amb client) at a time; answers go back to its latest address.
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (l, out, c, inb) = (
            link.clone(),
            udp_out.clone(),
            client.clone(),
            udp_in.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = inb.recv_from(&mut buf).await {
                *c.lock().unwrap() = Some(from);
                l.largest_datagram[0].fetch_max(n, Ordering::Relaxed);
                if l.drop_datagram() {
                    continue;
                }
                let (data, delay, sock) =
                    (buf[..n].to_vec(), l.delay(), out.lock().unwrap().clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = sock.send_to(&data, target).await;
                });
            }
        }));
        let (l, out, c, inb, rb) = (
            link.clone(),
            udp_out.clone(),
            client,
            udp_in,
            rebound.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let sock = out.lock().unwrap().clone();
                let received = tokio::select! {
                    r = sock.recv_from(&mut buf) => r,
                    _ = rb.notified() => continue,
                };
                let Ok((n, _)) = received else { return };
                l.largest_datagram[1].fetch_max(n, Ordering::Relaxed);
                let Some(to) = *c.lock().unwrap() else {
                    continue;
                };
                if l.drop_datagram() {
                    continue;
                }
                let (data, delay, inb) = (buf[..n].to_vec(), l.delay(), inb.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = inb.send_to(&data, to).await;
                });
            }
        }));
        Relay {
            addr,
            link,
            udp_out,
            rebound,
            tasks,
        }
    }

    /// Moves the server-facing UDP socket to a new port: to the server, the client's address
    /// changed (a NAT rebinding or a roaming client).
    pub async fn rebind_udp(&self) -> SocketAddr {
        let fresh = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = fresh.local_addr().unwrap();
        *self.udp_out.lock().unwrap() = fresh;
        self.rebound.notify_waiters();
        addr
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Copies one TCP direction with delay (order kept), rate limit and blackhole; `up` (client
/// to server) also counts TLS records.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    link: Arc<Impairments>,
    up: bool,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let l = link.clone();
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            l.wait_healed().await;
            let rate = l.rate_bps.load(Ordering::Relaxed);
            if rate > 0 {
                tokio::time::sleep(Duration::from_secs_f64(chunk.len() as f64 / rate as f64)).await;
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 16 << 10];
    let base = link.delay_ms.load(Ordering::Relaxed);
    let mut records = TlsRecords::default();
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if up {
                    let started = records.feed(&buf[..n]);
                    link.tls_records_up.fetch_add(started, Ordering::SeqCst);
                }
                let due = tokio::time::Instant::now() + Duration::from_millis(base);
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Finds TLS record boundaries in a byte stream split anywhere (5-byte header: type, version,
/// big-endian body length).
#[derive(Default)]
struct TlsRecords {
    header: Vec<u8>,
    body_left: usize,
}

impl TlsRecords {
    /// Consumes `bytes`; returns how many records started in them.
    fn feed(&mut self, mut bytes: &[u8]) -> usize {
        let mut started = 0;
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let skip = self.body_left.min(bytes.len());
                self.body_left -= skip;
                bytes = &bytes[skip..];
                continue;
            }
            let take = (5 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.header.len() == 5 {
                started += 1;
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
                self.header.clear();
            }
        }
        started
    }
}
