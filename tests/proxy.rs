//! `proxy-protocol = "v2"` on a route: the server ambassador sends a PROXY protocol v2 header
//! first on each upstream connection, with the app's own addresses (which the client ambassador
//! passes in its stream open) and the peer's identity in a TLV. A real HAProxy with
//! `accept-proxy` reports the addresses; a parser (the `ppp` crate) behind the pair reads the
//! TLV, and shows that a PROXY header an app sends arrives as its data. Both transports.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

per_transport!(
    haproxy_sees_the_apps_own_address,
    the_identity_tlv_names_the_client_and_an_apps_header_is_data,
);

/// A route `name` with `proxy-protocol = "v2"` to `upstream`, in a server config file.
fn server_with_proxy_route(pki: &Pki, upstream: SocketAddr) -> Amb {
    let path = |name: &str| pki.path(name).display().to_string();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\
         [[server.route]]\nname = \"default\"\nupstream = \"{upstream}\"\nproxy-protocol = \"v2\"\n",
        path("server.pem"),
        path("server.key"),
        path("ca.pem"),
    );
    let file = pki.path("amb.toml");
    std::fs::write(&file, config).unwrap();
    Amb::spawn(&[
        "server".into(),
        "--config".into(),
        file.display().to_string(),
    ])
}

/// HAProxy in TCP mode, taking a PROXY header on `port` (`accept-proxy`) and logging each
/// connection's source and destination as it read them, in front of `backend`.
struct Haproxy {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl Haproxy {
    fn start(backend: SocketAddr) -> (Self, SocketAddr) {
        let dir = TempDir::new("haproxy");
        let port = free_port();
        let config = format!(
            "global\n  log stdout format raw local0\n\
             defaults\n  mode tcp\n  log global\n  option logasap\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend fe\n  bind 127.0.0.1:{port} accept-proxy\n  log-format \"seen src=%[src]:%[src_port] dst=%[dst]:%[dst_port]\"\n  default_backend be\n\
             backend be\n  server echo {backend}\n"
        );
        let file = dir.0.join("haproxy.cfg");
        std::fs::write(&file, config).unwrap();
        let mut child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy must be installed (apt-get install haproxy)");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + READY;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "haproxy not listening on {addr}");
            assert!(child.try_wait().unwrap().is_none(), "haproxy exited");
            std::thread::sleep(Duration::from_millis(20));
        }
        (
            Haproxy {
                child,
                lines,
                _dir: dir,
            },
            addr,
        )
    }

    /// Waits for a log line containing `needle`.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + READY;
        loop {
            if let Some(line) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
            {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "haproxy logged no {needle:?}: {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `payload` on a fresh app connection to `listen`, half-closes, reads all back; the
/// app socket's own address too.
async fn exchange(listen: SocketAddr, payload: &[u8]) -> (SocketAddr, Vec<u8>) {
    let mut tcp = TcpStream::connect(listen).await.unwrap();
    let app = tcp.local_addr().unwrap();
    tcp.write_all(payload).await.unwrap();
    tcp.shutdown().await.unwrap();
    let back = tokio::time::timeout(READY, read_all(&mut tcp))
        .await
        .expect("no answer")
        .unwrap();
    (app, back)
}

async fn haproxy_sees_the_apps_own_address(t: Transport) {
    let pki = Pki::new();
    let echo = Upstream::echo().await;
    let (haproxy, front) = Haproxy::start(echo.addr);
    let server = server_with_proxy_route(&pki, front);
    let client = Amb::client(&pki, "client", server.server_addr(), t, &[]);
    client.wait_pool_up(t);
    let listen = client.listen_addr();
    let (app, back) = exchange(listen, b"through haproxy").await;
    assert_eq!(back, b"through haproxy");
    // What HAProxy read from the header: the app's socket and the client ambassador's
    // listener, not the server ambassador's own connection.
    haproxy.wait_for(&format!("seen src={app} dst={listen}"));
}

/// One connection's PROXY header, as `ppp` parses it, and the bytes after it.
type Seen = Arc<Mutex<Vec<(String, Vec<u8>, Vec<u8>)>>>;

/// An upstream that parses the PROXY v2 header with `ppp`, records the addresses and TLVs,
/// and echoes what follows.
async fn parsing_upstream(seen: Seen) -> Upstream {
    Upstream::start(move |mut tcp: TcpStream| {
        let seen = seen.clone();
        async move {
            let mut head = [0u8; 16];
            tcp.read_exact(&mut head).await.unwrap();
            let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
            let mut header = head.to_vec();
            header.resize(16 + len, 0);
            tcp.read_exact(&mut header[16..]).await.unwrap();
            let parsed = ppp::v2::Header::try_from(header.as_slice()).unwrap();
            let tlv = parsed
                .tlvs()
                .map(Result::unwrap)
                .find(|tlv| tlv.kind == 0xE0)
                .map(|tlv| tlv.value.to_vec())
                .unwrap_or_default();
            let rest = read_all(&mut tcp).await.unwrap();
            tcp.write_all(&rest).await.unwrap();
            seen.lock()
                .unwrap()
                .push((format!("{:?}", parsed.addresses), tlv, rest));
        }
    })
    .await
}

async fn the_identity_tlv_names_the_client_and_an_apps_header_is_data(t: Transport) {
    let pki = Pki::new();
    let seen = Seen::default();
    let upstream = parsing_upstream(seen.clone()).await;
    let server = server_with_proxy_route(&pki, upstream.addr);
    let client = Amb::client(&pki, "client", server.server_addr(), t, &[]);
    client.wait_pool_up(t);
    let listen = client.listen_addr();

    // The app's bytes start with a PROXY header of its own, claiming another address.
    let forged: SocketAddr = "203.0.113.9:4444".parse().unwrap();
    let mut payload = ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (forged, forged),
    )
    .build()
    .unwrap();
    payload.extend_from_slice(b"after the forged header");
    let (app, back) = exchange(listen, &payload).await;
    assert_eq!(back, payload, "the app's header came back as data");

    let seen = seen.lock().unwrap();
    let (addresses, tlv, rest) = &seen[0];
    assert_eq!(
        addresses,
        &format!("{:?}", ppp::v2::Addresses::from((app, listen))),
        "amb's header names the app, not the forged address"
    );
    assert_eq!(tlv, b"spiffe://amb/client");
    assert_eq!(rest, &payload, "the upstream got the app's header as data");
}
