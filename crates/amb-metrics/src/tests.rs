use super::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The value of the sample `name{labels}` in `text`, labels as they are encoded.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn a_connection_counts_open_then_by_its_end_with_its_bytes() {
    let m = Metrics::new("1.2.3");
    let route = m.route(Side::Server, "redis");
    let conn = route.connection();
    let text = m.encode();
    assert_eq!(
        sample(
            &text,
            r#"amb_connections_open{side="server",route="redis"}"#
        ),
        Some(1.0)
    );
    conn.opened(Duration::from_millis(3));
    let mut conn = conn;
    conn.ended(ConnectionEnd::Ok, 10, 20);
    drop(conn);
    drop(route.connection());
    let text = m.encode();
    let series = |s: &str| sample(&text, s);
    assert_eq!(
        series(r#"amb_connections_open{side="server",route="redis"}"#),
        Some(0.0)
    );
    assert_eq!(
        series(r#"amb_connections_total{side="server",route="redis",end="ok"}"#),
        Some(1.0)
    );
    assert_eq!(
        series(r#"amb_connections_total{side="server",route="redis",end="reset"}"#),
        Some(1.0),
        "dropped without an end: a reset"
    );
    assert_eq!(
        series(r#"amb_relayed_bytes_total{side="server",route="redis",direction="up"}"#),
        Some(10.0)
    );
    assert_eq!(
        series(r#"amb_relayed_bytes_total{side="server",route="redis",direction="down"}"#),
        Some(20.0)
    );
    assert_eq!(
        series(r#"amb_stream_open_seconds_count{side="server",route="redis"}"#),
        Some(1.0)
    );
    assert_eq!(series(r#"amb_build_info{version="1.2.3"}"#), Some(1.0));
}

#[test]
fn tunnels_handshakes_reloads_certificates_and_health() {
    let m = Metrics::new("0");
    let up = m.tunnel_up(Direction::Dialed, "big-server:7443", "quic");
    m.handshake_failed(Direction::Accepted, "tls", "unknown_ca");
    m.reloaded("config", true);
    m.reloaded("config", false);
    m.certificates_loaded(
        Side::Client,
        vec![CertificateExpiry {
            kind: "leaf",
            subject: "web".into(),
            not_after: SystemTime::now() + Duration::from_secs(86_400),
        }],
    );
    m.report_health(|out| {
        out.push(UpstreamHealth {
            route: "redis".into(),
            upstream: "10.0.0.1:6379".into(),
            healthy: false,
        })
    });
    let text = m.encode();
    let series = |s: &str| sample(&text, s);
    let tunnel = r#"{direction="dialed",peer="big-server:7443",transport="quic"}"#;
    assert_eq!(
        series(&format!("amb_tunnel_connections{tunnel}")),
        Some(1.0)
    );
    assert_eq!(series(&format!("amb_handshakes_total{tunnel}")), Some(1.0));
    assert_eq!(
        series(
            r#"amb_handshake_failures_total{direction="accepted",transport="tls",reason="unknown_ca"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        series(r#"amb_reloads_total{what="config",result="failed"}"#),
        Some(1.0)
    );
    assert!(series("amb_last_reload_success_timestamp_seconds").unwrap() > 1.7e9);
    let left = series(r#"amb_certificate_expiry_seconds{side="client",kind="leaf",subject="web"}"#)
        .unwrap();
    assert!((86_000.0..=86_400.0).contains(&left), "{left}");
    assert_eq!(
        series(r#"amb_upstream_healthy{route="redis",upstream="10.0.0.1:6379"}"#),
        Some(0.0)
    );
    drop(up);
    assert_eq!(
        sample(&m.encode(), &format!("amb_tunnel_connections{tunnel}")),
        Some(0.0)
    );
}

struct NotYet;

impl Readiness for NotYet {
    fn ready(&self) -> Result<(), String> {
        Err("no tunnel connection to big-server:7443".into())
    }
}

/// One HTTP/1.1 request over a real socket; the status line and the body.
async fn get(addr: SocketAddr, method: &str, path: &str) -> (String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await.unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

use std::net::SocketAddr;

#[tokio::test]
async fn the_endpoint_answers_its_three_paths_and_nothing_else() {
    let m = Metrics::new("0");
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(serve(listener, m.clone(), stop));
    let (status, body) = get(addr, "GET", "/metrics").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("amb_build_info"), "{body}");
    assert_eq!(get(addr, "GET", "/healthz").await.0, "HTTP/1.1 200 OK");
    assert_eq!(get(addr, "GET", "/readyz").await.0, "HTTP/1.1 200 OK");
    m.add_readiness(Arc::new(NotYet));
    let (status, body) = get(addr, "GET", "/readyz").await;
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable");
    assert_eq!(body, "not ready: no tunnel connection to big-server:7443\n");
    assert_eq!(get(addr, "GET", "/").await.0, "HTTP/1.1 404 Not Found");
    assert_eq!(
        get(addr, "POST", "/metrics").await.0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(
        get(addr, "HEAD", "/healthz").await.0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    stop_tx.send(true).unwrap();
    serving.await.unwrap();
}
