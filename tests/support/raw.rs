//! Raw tunnel peers for multiplexer abuse: an authenticated client that writes HTTP/2 frames by
//! hand (so it can break the rules a well-behaved h2 library enforces), and a bare quinn
//! connection that opens streams as the test dictates.

use std::net::SocketAddr;
use std::sync::Arc;

use amb_pki::TlsFiles;
use rustls::client::{
    Tls12ClientSessionValue as Tls12Session, Tls13ClientSessionValue as Tls13Session,
};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::Pki;

/// The client identity's files in `pki`, as `amb client` would load them.
fn files(pki: &Pki, cert: &str) -> TlsFiles {
    TlsFiles {
        cert: pki.path(&format!("{cert}.pem")),
        key: pki.path(&format!("{cert}.key")),
        ca: pki.path("ca.pem"),
    }
}

/// A TLS connection to the server's TCP port with `cert`'s identity (its PEM may hold a chain).
pub async fn tls_connect(
    pki: &Pki,
    cert: &str,
    addr: SocketAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let config = amb_pki::client_config(&files(pki, cert), amb_proto::ALPN_H2).unwrap();
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// Whether the server turns `cert` away. In TLS 1.3 the client finishes its handshake before the
/// server has checked its certificate, so the verdict is what the first read returns: the
/// server's HTTP/2 SETTINGS for an accepted client, an alert or EOF for a rejected one.
pub async fn tls_rejected(pki: &Pki, cert: &str, addr: SocketAddr) -> bool {
    let Ok(mut tls) = tls_connect(pki, cert, addr).await else {
        return true;
    };
    if tls
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .is_err()
    {
        return true;
    }
    let mut buf = [0u8; 9];
    !matches!(tls.read(&mut buf).await, Ok(n) if n > 0)
}

/// HTTP/2 frame types and flags used here (RFC 9113 §6).
pub mod frame {
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;
    pub const CANCEL: u32 = 0x8;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// An mTLS connection speaking HTTP/2 one frame at a time.
pub struct RawH2 {
    write: WriteHalf<TlsStream<TcpStream>>,
    pending: Vec<u8>,
    /// Frames the server sent, as they arrive.
    pub frames: tokio::sync::mpsc::UnboundedReceiver<(u8, u8, u32, Vec<u8>)>,
}

impl RawH2 {
    /// Handshakes TLS with `cert`'s identity and sends the connection preface and SETTINGS.
    pub async fn connect(pki: &Pki, cert: &str, addr: SocketAddr) -> Self {
        let tls = tls_connect(pki, cert, addr).await.unwrap();
        let (read, write) = tokio::io::split(tls);
        let (tx, frames) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(read_frames(read, tx));
        let mut h2 = RawH2 {
            write,
            pending: Vec::new(),
            frames,
        };
        h2.pending
            .extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        h2.frame(frame::SETTINGS, 0, 0, &[]);
        h2.flush().await.unwrap();
        h2
    }

    /// Queues one frame.
    pub fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        self.pending.extend_from_slice(&len.to_be_bytes()[1..]);
        self.pending.push(kind);
        self.pending.push(flags);
        self.pending.extend_from_slice(&stream.to_be_bytes());
        self.pending.extend_from_slice(payload);
    }

    /// Queues a CONNECT request for `route` on `stream` (HPACK literals, no Huffman, no table).
    pub fn connect_request(&mut self, stream: u32, route: &str) {
        let mut block = Vec::new();
        // Literal header field without indexing, name from the static table (RFC 7541 §6.2.2):
        // index 2 is `:method`, index 1 is `:authority`.
        for (index, value) in [(2u8, "CONNECT"), (1, route)] {
            block.push(index);
            block.push(value.len() as u8);
            block.extend_from_slice(value.as_bytes());
        }
        self.frame(frame::HEADERS, frame::END_HEADERS, stream, &block);
    }

    /// Queues RST_STREAM with `code`.
    pub fn reset(&mut self, stream: u32, code: u32) {
        self.frame(frame::RST_STREAM, 0, stream, &code.to_be_bytes());
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        let bytes = std::mem::take(&mut self.pending);
        self.write.write_all(&bytes).await?;
        self.write.flush().await
    }

    /// Sends a PING and waits for its ACK: the server has then read every frame sent before it.
    /// Frames that arrive meanwhile are dropped.
    pub async fn round_trip(&mut self) {
        self.frame(frame::PING, 0, 0, &[0; 8]);
        self.flush().await.unwrap();
        while let Some((kind, flags, _, _)) = self.frames.recv().await {
            if kind == frame::PING && flags & frame::ACK != 0 {
                return;
            }
        }
        panic!("the connection ended before the PING's ACK");
    }

    /// Waits for the GOAWAY with ENHANCE_YOUR_CALM that ends an abusive connection.
    pub async fn expect_calm_goaway(&mut self) {
        let code = tokio::time::timeout(super::READY, self.goaway())
            .await
            .expect("the server kept the abusive connection open");
        assert_eq!(code, Some(frame::ENHANCE_YOUR_CALM), "GOAWAY code");
    }

    /// Ends the connection as a client that goes away: TLS close_notify, then FIN.
    pub async fn close(mut self) {
        let _ = self.write.shutdown().await;
    }

    /// Waits for the server's GOAWAY and returns its error code, or `None` if the connection
    /// ended without one.
    pub async fn goaway(&mut self) -> Option<u32> {
        while let Some((kind, _, _, payload)) = self.frames.recv().await {
            if kind == frame::GOAWAY {
                return Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
            }
        }
        None
    }
}

async fn read_frames(
    mut read: ReadHalf<TlsStream<TcpStream>>,
    tx: tokio::sync::mpsc::UnboundedSender<(u8, u8, u32, Vec<u8>)>,
) {
    let mut head = [0u8; 9];
    while read.read_exact(&mut head).await.is_ok() {
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        if read.read_exact(&mut payload).await.is_err()
            || tx.send((head[3], head[4], stream, payload)).is_err()
        {
            return;
        }
    }
}

/// A quinn connection with `cert`'s identity, speaking amb's QUIC ALPN.
pub async fn quic_connect(pki: &Pki, cert: &str, addr: SocketAddr) -> quinn::Connection {
    let config = amb_pki::client_config(&files(pki, cert), amb_proto::ALPN_QUIC).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint
        .connect(addr, "localhost")
        .unwrap()
        .await
        .expect("QUIC handshake")
}

/// Whether the server turns `cert` away over QUIC: the handshake fails, or the server closes
/// the connection instead of sending its welcome.
pub async fn quic_rejected(pki: &Pki, cert: &str, addr: SocketAddr) -> bool {
    let config = amb_pki::client_config(&files(pki, cert), amb_proto::ALPN_QUIC).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(config).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let Ok(conn) = endpoint.connect(addr, "localhost").unwrap().await else {
        return true;
    };
    let welcome = tokio::time::timeout(super::READY, conn.accept_uni()).await;
    !matches!(welcome, Ok(Ok(_)))
}

/// Waits until the server closes `conn` for spending its refusal budget.
pub async fn expect_closed_for_abuse(conn: &quinn::Connection) {
    let closed = tokio::time::timeout(super::READY, conn.closed())
        .await
        .expect("the server kept the abusive connection open");
    assert!(
        closed.to_string().contains("too many refused streams"),
        "closed with: {closed}"
    );
}

/// The stream-open header amb writes first on every QUIC stream.
pub fn open_header(route: &str) -> Vec<u8> {
    amb_proto::encode_open_header(&route.parse().unwrap(), None).to_vec()
}

/// A client that would resume sessions and send 0-RTT data if the server let it: the amb client
/// configuration with resumption and early data switched back on, its session cache shared by
/// every connection made through it.
pub struct Resumer {
    tls: Arc<rustls::ClientConfig>,
    quic: quinn::Endpoint,
    sessions: Arc<CountingSessions>,
}

/// rustls' in-memory session cache, counting the TLS 1.3 tickets servers hand out.
#[derive(Debug)]
struct CountingSessions {
    cache: rustls::client::ClientSessionMemoryCache,
    tickets: std::sync::atomic::AtomicUsize,
}

impl rustls::client::ClientSessionStore for CountingSessions {
    fn set_kx_hint(&self, name: ServerName<'static>, group: rustls::NamedGroup) {
        self.cache.set_kx_hint(name, group)
    }
    fn kx_hint(&self, name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.cache.kx_hint(name)
    }
    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12Session) {
        self.cache.set_tls12_session(name, value)
    }
    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12Session> {
        self.cache.tls12_session(name)
    }
    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.cache.remove_tls12_session(name)
    }
    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13Session) {
        self.tickets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.cache.insert_tls13_ticket(name, value)
    }
    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13Session> {
        self.cache.take_tls13_ticket(name)
    }
}

/// What one stream open got: how the handshake went and the server's answer.
#[derive(Debug)]
pub struct Opened {
    /// `Full` or `Resumed` (TLS); for QUIC, `Resumed` only if 0-RTT was possible.
    pub handshake: rustls::HandshakeKind,
    /// The HTTP status of the CONNECT (200 opened), or for QUIC the status byte mapped the same
    /// way (`Refusal::http_status`).
    pub status: u16,
    /// The server's leaf certificate (DER), as the handshake presented it.
    pub server_cert: Vec<u8>,
}

impl Resumer {
    pub fn new(pki: &Pki, cert: &str) -> Self {
        let sessions = Arc::new(CountingSessions {
            cache: rustls::client::ClientSessionMemoryCache::new(64),
            tickets: Default::default(),
        });
        let enable = |alpn: &[u8]| {
            let mut config = (*amb_pki::client_config(&files(pki, cert), alpn).unwrap()).clone();
            config.resumption = rustls::client::Resumption::store(sessions.clone());
            config.enable_early_data = true;
            Arc::new(config)
        };
        let crypto =
            quinn::crypto::rustls::QuicClientConfig::try_from(enable(amb_proto::ALPN_QUIC))
                .unwrap();
        let mut quic = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        quic.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        Resumer {
            tls: enable(amb_proto::ALPN_H2),
            quic,
            sessions,
        }
    }

    /// Session tickets received so far, over both transports.
    pub fn tickets(&self) -> usize {
        self.sessions
            .tickets
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Connects afresh over `transport` and opens one stream to `route`; `Err` when the
    /// connection is turned away.
    pub async fn open(
        &self,
        transport: super::Transport,
        addr: SocketAddr,
        route: &str,
    ) -> Result<Opened, String> {
        let attempt = async {
            match transport {
                super::Transport::Tls => self.open_tls(addr, route).await,
                super::Transport::Quic => self.open_quic(addr, route).await,
            }
        };
        tokio::time::timeout(super::READY, attempt)
            .await
            .map_err(|_| "no answer in time".to_string())?
    }

    /// The server at `addr` turns this client away at the handshake, with a log line, and no
    /// stream reaches `upstream` beyond the `streams_before` of earlier tests.
    pub async fn assert_turned_away(
        &self,
        transport: super::Transport,
        addr: SocketAddr,
        server: &super::Amb,
        upstream: &super::Upstream,
        streams_before: usize,
    ) {
        let result = self.open(transport, addr, "default").await;
        assert!(result.is_err(), "the old client got in: {result:?}");
        server.log.wait_for(&[
            "handshake failed",
            transport.flag(),
            "invalid peer certificate",
        ]);
        assert_eq!(
            upstream.accepted(),
            streams_before,
            "a stream reached the upstream"
        );
    }

    async fn open_tls(&self, addr: SocketAddr, route: &str) -> Result<Opened, String> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let handshake = tls.get_ref().1.handshake_kind().unwrap();
        let server_cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let (mut h2, conn) = h2::client::handshake(tls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let request = http::Request::connect(route).body(()).unwrap();
        let (response, _send) = h2.send_request(request, false).map_err(|e| e.to_string())?;
        let response = response.await.map_err(|e| e.to_string())?;
        Ok(Opened {
            handshake,
            status: response.status().as_u16(),
            server_cert,
        })
    }

    async fn open_quic(&self, addr: SocketAddr, route: &str) -> Result<Opened, String> {
        let connecting = self
            .quic
            .connect(addr, "localhost")
            .map_err(|e| e.to_string())?;
        let (conn, handshake) = match connecting.into_0rtt() {
            Ok((conn, _accepted)) => (conn, rustls::HandshakeKind::Resumed),
            Err(connecting) => (
                connecting.await.map_err(|e| e.to_string())?,
                rustls::HandshakeKind::Full,
            ),
        };
        let open = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&open_header(route)).await?;
            let mut status = [0u8; 1];
            recv.read_exact(&mut status).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status[0])
        };
        let status = open.await.map_err(|e| e.to_string())?;
        let chain = conn.peer_identity().unwrap();
        let server_cert = chain
            .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
            .unwrap()[0]
            .to_vec();
        Ok(Opened {
            handshake,
            server_cert,
            status: match amb_proto::Refusal::from_status_byte(status) {
                Ok(()) => 200,
                Err(refusal) => refusal.http_status(),
            },
        })
    }
}
