//! What an operator sees without reading logs, end to end with the real binary, a real redis
//! and a real HTTP client (`curl`): exact counts for known traffic and refusals on both sides,
//! handshake failures by reason, `/readyz` following the tunnel, the scrape parsed by
//! `promtool` (where installed); and in the logs, one access line per connection and repeated
//! refusals rate-limited with a count of those not written. Over QUIC and over TLS.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use amb_pki::{CertAuthority, LeafSpec};
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

per_transport!(
    known_traffic_and_refusals_are_counted_exactly_on_both_sides,
    a_foreign_certificate_is_one_handshake_failure_by_its_reason,
    readyz_follows_the_tunnel_connection,
    each_connection_ends_with_one_access_line,
    repeated_refusals_are_logged_once_a_second_with_a_count,
);

const INCR: &[u8] = b"*2\r\n$4\r\nINCR\r\n$4\r\nhits\r\n";

/// The metric names `text` (PromQL, JSON or YAML) refers to.
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .match_indices("amb_")
        .filter(|(i, _)| !text[..*i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_'))
        .map(|(i, _)| {
            let rest = &text[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            rest[..end].to_owned()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// The metric names a scrape declares (`# TYPE`) or holds samples of.
fn scraped_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(declared) => declared.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        })
        .map(str::to_owned)
        .collect()
}

/// The dashboard's and the alert rules' expressions name only metrics a running pair exports,
/// and parse as PromQL; the alerts fire on the series they are written for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_use_the_metrics_amb_exports() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let dashboard = std::fs::read_to_string(examples.join("grafana/amb.json")).unwrap();
    let rules = examples.join("prometheus/amb.rules.yml");
    let rules_text = std::fs::read_to_string(&rules).unwrap();

    let pki = Pki::new();
    let redis = Redis::start();
    let (_held, dead) = dead_port();
    let upstreams = format!("127.0.0.1:{},127.0.0.1:{dead}", redis.port);
    let server = Amb::server(
        &pki,
        0,
        &["--upstream", &upstreams, "--metrics", "127.0.0.1:0"],
    );
    let client = Amb::client(
        &pki,
        "client",
        server.server_addr(),
        Transport::Quic,
        &["--metrics", "127.0.0.1:0", "--listen", "0=nosuch"],
    );
    client.wait_pool_up(Transport::Quic);
    for _ in 0..4 {
        incr_exactly(client.listen_addr_for("default")).await;
    }
    refused(client.listen_addr_for("nosuch")).await;
    // A failed handshake and a reload, so that those series exist too.
    let other = CertAuthority::generate("some other CA").unwrap();
    pki.write_leaf(
        "foreign",
        &other.issue(&LeafSpec::client("client", 30)).unwrap(),
    );
    assert!(raw::tls_rejected(&pki, "foreign", server.server_addr()).await);
    server.signal("HUP");
    let reloads = r#"amb_reloads_total{what="certificates",result="ok"}"#;
    wait_until(metrics_addr(&server), reloads, |n| n >= 1.0).await;
    let failures =
        r#"amb_handshake_failures_total{direction="accepted",transport="tls",reason="unknown_ca"}"#;
    wait_sample(metrics_addr(&server), failures, 1.0).await;
    let mut exported = scraped_names(&scrape(metrics_addr(&server)).await);
    exported.extend(scraped_names(&scrape(metrics_addr(&client)).await));
    for name in metric_names(&dashboard)
        .iter()
        .chain(&metric_names(&rules_text))
    {
        let histogram = format!("{name}_bucket");
        assert!(
            exported.contains(name) || exported.contains(&histogram),
            "{name} is not exported; exported: {exported:?}"
        );
    }

    // Each panel's query as a recording rule, Grafana's variables filled in, for promtool.
    let exprs: Vec<String> = dashboard
        .lines()
        .filter_map(|line| line.trim().strip_prefix("\"expr\": \""))
        .map(|e| {
            e.trim_end_matches(',')
                .trim_end_matches('"')
                .replace("\\\"", "\"")
        })
        .map(|e| {
            e.replace("$__rate_interval", "5m")
                .replace("$instance", ".*")
        })
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let recorded: String = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| format!("      - record: dashboard:panel_{i}\n        expr: '{e}'\n"))
        .collect();
    let panels = pki.path("dashboard.rules.yml");
    std::fs::write(
        &panels,
        format!("groups:\n  - name: dashboard\n    rules:\n{recorded}"),
    )
    .unwrap();
    let promtool = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(examples.join("prometheus"))
            .output();
        match out {
            Err(_) => eprintln!("promtool not installed: {args:?} not checked"),
            Ok(out) => assert!(
                out.status.success(),
                "promtool {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    };
    let (check, test) = ("check".as_ref(), "test".as_ref());
    promtool(&[
        check,
        "rules".as_ref(),
        rules.as_os_str(),
        panels.as_os_str(),
    ]);
    promtool(&[test, "rules".as_ref(), "amb.rules.test.yml".as_ref()]);
}

/// Scrapes until `/readyz` answers `want`.
async fn wait_ready(addr: SocketAddr, want: u16) -> String {
    let deadline = std::time::Instant::now() + READY;
    loop {
        let (status, body) = curl(addr, "/readyz").await;
        if status == want {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz never answered {want}; last: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `promtool check metrics` on a scrape, where promtool is installed (Debian's `prometheus`).
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        return eprintln!(
            "promtool not installed: the scrape is checked by the crate's parser only"
        );
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One `INCR` on a fresh connection, closed cleanly; the bytes of the answer.
async fn incr_exactly(listen: SocketAddr) -> usize {
    let mut tcp = BufReader::new(TcpStream::connect(listen).await.unwrap());
    tcp.get_mut().write_all(INCR).await.unwrap();
    let mut line = String::new();
    tcp.read_line(&mut line).await.unwrap();
    assert!(line.starts_with(':'), "{line:?}");
    tcp.get_mut().shutdown().await.unwrap();
    let mut rest = Vec::new();
    tcp.read_to_end(&mut rest).await.unwrap();
    line.len() + rest.len()
}

/// A connection through `listen` the server refuses: the app sees it reset.
async fn refused(listen: SocketAddr) {
    assert_reset_after_write(listen, INCR).await;
}

/// A `[server]` config file on a free port with `routes` (TOML) and metrics on any port.
fn server_config(pki: &Pki, routes: &str) -> String {
    let file = pki.path("server.toml");
    std::fs::write(
        &file,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n{routes}",
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
            pki.path("ca.pem").display()
        ),
    )
    .unwrap();
    file.display().to_string()
}

/// A port held bound but not listening: connections to it are refused, and no other test's
/// process can take it while this lives.
fn dead_port() -> (tokio::net::TcpSocket, u16) {
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = held.local_addr().unwrap().port();
    (held, port)
}

async fn known_traffic_and_refusals_are_counted_exactly_on_both_sides(t: Transport) {
    let pki = Pki::new();
    let redis = Redis::start();
    let (_held, dead) = dead_port();
    let stalled = Stalled::new().await;
    let config = server_config(
        &pki,
        &format!(
            "connect-timeout = \"300ms\"\n\
             [[server.route]]\nname = \"default\"\nupstream = \"127.0.0.1:{}\"\n\
             [[server.route]]\nname = \"slow\"\nupstream = \"{}\"\n\
             [[server.route]]\nname = \"dead\"\nupstream = \"127.0.0.1:{dead}\"\n",
            redis.port, stalled.addr
        ),
    );
    let server = Amb::spawn(&["server".into(), "--config".into(), config]);
    let listens = [
        "--listen", "0=slow", "--listen", "0=nosuch", "--listen", "0=dead",
    ];
    let mut extra = vec!["--metrics", "127.0.0.1:0"];
    extra.extend(listens);
    let client = Amb::client(&pki, "client", server.server_addr(), t, &extra);
    let (server_metrics, client_metrics) = (metrics_addr(&server), metrics_addr(&client));
    client.wait_pool_up(t);

    let listen = client.listen_addr_for("default");
    let mut down = 0;
    for _ in 0..100 {
        down += incr_exactly(listen).await;
    }
    let up = 100 * INCR.len();
    for side in ["server", "client"] {
        let addr = if side == "server" {
            server_metrics
        } else {
            client_metrics
        };
        let ok = format!(r#"amb_connections_total{{side="{side}",route="default",end="ok"}}"#);
        let text = wait_sample(addr, &ok, 100.0).await;
        let bytes = |direction: &str| {
            sample(
                &text,
                &format!(
                    r#"amb_relayed_bytes_total{{side="{side}",route="default",direction="{direction}"}}"#
                ),
            )
        };
        assert_eq!(bytes("up"), Some(up as f64), "{side}: bytes up");
        assert_eq!(bytes("down"), Some(down as f64), "{side}: bytes down");
        let open = format!(r#"amb_connections_open{{side="{side}",route="default"}}"#);
        assert_eq!(sample(&text, &open), Some(0.0), "{side}: none open");
        let opened = format!(r#"amb_stream_open_seconds_count{{side="{side}",route="default"}}"#);
        assert_eq!(
            sample(&text, &opened),
            Some(100.0),
            "{side}: stream opens timed"
        );
    }
    assert_eq!(hits(&redis), 100);

    for route in ["slow", "nosuch", "dead"] {
        refused(client.listen_addr_for(route)).await;
    }
    let refusals = [
        ("slow", "slow", "upstream_timeout"),
        ("nosuch", "(unknown)", "unknown_route"),
        ("dead", "dead", "upstream_refused"),
    ];
    for (route, server_label, reason) in refusals {
        for (side, addr, label) in [
            ("server", server_metrics, server_label),
            ("client", client_metrics, route),
        ] {
            let series =
                format!(r#"amb_refusals_total{{side="{side}",route="{label}",reason="{reason}"}}"#);
            let text = wait_sample(addr, &series, 1.0).await;
            let ended =
                format!(r#"amb_connections_total{{side="{side}",route="{label}",end="refused"}}"#);
            assert_eq!(
                sample(&text, &ended),
                Some(1.0),
                "{side}: {route} refused once"
            );
        }
    }
    let dials = format!(
        r#"amb_upstream_dials_total{{route="dead",upstream="127.0.0.1:{dead}",outcome="refused"}}"#
    );
    let text = wait_sample(server_metrics, &dials, 1.0).await;
    let tunnels = format!(
        r#"amb_tunnel_connections{{direction="accepted",peer="",transport="{}"}}"#,
        t.flag()
    );
    assert_eq!(sample(&text, &tunnels), Some(t.pool_size() as f64));
    promtool_accepts(&text);
    let text = scrape(client_metrics).await;
    let port = server.server_addr().port();
    let tunnels = format!(
        r#"amb_tunnel_connections{{direction="dialed",peer="localhost:{port}",transport="{}"}}"#,
        t.flag()
    );
    assert_eq!(sample(&text, &tunnels), Some(t.pool_size() as f64));
    let leaf = r#"amb_certificate_expiry_seconds{side="client",kind="leaf",subject="client"}"#;
    let left = sample(&text, leaf).unwrap();
    assert!(
        (29.0 * 86_400.0..=30.0 * 86_400.0).contains(&left),
        "{left}"
    );
    promtool_accepts(&text);
}

async fn a_foreign_certificate_is_one_handshake_failure_by_its_reason(t: Transport) {
    let pki = Pki::new();
    let up = Upstream::echo().await;
    let server = Amb::server(
        &pki,
        0,
        &[
            "--upstream",
            &up.addr.to_string(),
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let metrics = metrics_addr(&server);
    let other = CertAuthority::generate("some other CA").unwrap();
    pki.write_leaf(
        "foreign",
        &other.issue(&LeafSpec::client("client", 30)).unwrap(),
    );
    // One handshake, with a certificate the server's CA did not sign.
    let addr = server.server_addr();
    let rejected = match t {
        Transport::Quic => raw::quic_rejected(&pki, "foreign", addr).await,
        Transport::Tls => raw::tls_rejected(&pki, "foreign", addr).await,
    };
    assert!(
        rejected,
        "the server must turn the foreign certificate away"
    );
    let failures = format!(
        r#"amb_handshake_failures_total{{direction="accepted",transport="{}",reason="unknown_ca"}}"#,
        t.flag()
    );
    let text = wait_sample(metrics, &failures, 1.0).await;
    let accepted = format!(
        r#"amb_handshakes_total{{direction="accepted",peer="",transport="{}"}}"#,
        t.flag()
    );
    assert_eq!(sample(&text, &accepted), None, "no handshake passed");

    // The client's side: a server whose CA it does not trust.
    std::fs::write(pki.path("other-ca.pem"), &other.cert_pem).unwrap();
    let other_ca = pki.path("other-ca.pem").display().to_string();
    let peer = format!("localhost:{}", server.server_addr().port());
    let foreign = |ext: &str| pki.path(&format!("foreign.{ext}")).display().to_string();
    let client = Amb::spawn(
        &[
            "client",
            "--listen",
            "0",
            "--peer",
            &peer,
            "--transport",
            t.flag(),
            "--cert",
            &foreign("pem"),
            "--key",
            &foreign("key"),
            "--ca",
            &other_ca,
            "--metrics",
            "127.0.0.1:0",
        ]
        .map(String::from),
    );
    let dialed = format!(
        r#"amb_handshake_failures_total{{direction="dialed",transport="{}",reason="unknown_ca"}}"#,
        t.flag()
    );
    // It keeps trying, so at least one.
    wait_until(metrics_addr(&client), &dialed, |n| n >= 1.0).await;

    // A verified client the server-wide allow-list leaves out: each tunnel connection counts.
    let allowing = Amb::server(
        &pki,
        0,
        &[
            "--upstream",
            &up.addr.to_string(),
            "--allow",
            "uri:spiffe://amb/someone-else",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let left_out = Amb::client(&pki, "client", allowing.server_addr(), t, &[]);
    left_out.wait_pool_up(t);
    let not_allowed = format!(
        r#"amb_handshake_failures_total{{direction="accepted",transport="{}",reason="not_allowed"}}"#,
        t.flag()
    );
    wait_sample(metrics_addr(&allowing), &not_allowed, t.pool_size() as f64).await;
}

async fn readyz_follows_the_tunnel_connection(t: Transport) {
    let pki = Pki::new();
    let up = Upstream::echo().await;
    let port = free_port();
    let client = Amb::spawn(&{
        let mut args: Vec<String> = [
            "client",
            "--listen",
            "0",
            "--peer",
            &format!("localhost:{port}"),
            "--transport",
            t.flag(),
            "--metrics",
            "127.0.0.1:0",
            "--idle-timeout",
            "2s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(pki.cert_flags("client"));
        args
    });
    let metrics = metrics_addr(&client);
    let body = wait_ready(metrics, 503).await;
    assert!(body.contains(&format!("localhost:{port}")), "{body}");
    assert_eq!(curl(metrics, "/healthz").await.0, 200);

    let upstream = up.addr.to_string();
    let server = Amb::server(
        &pki,
        port,
        &["--upstream", &upstream, "--metrics", "127.0.0.1:0"],
    );
    assert_eq!(curl(metrics_addr(&server), "/readyz").await.0, 200);
    wait_ready(metrics, 200).await;
    assert!(echo_works(client.listen_addr()).await);

    server.signal("KILL");
    // TLS hears the kernel's reset at once; QUIC waits out the 2 s idle timeout.
    wait_ready(metrics, 503).await;
    assert_eq!(curl(metrics, "/nothing-here").await.0, 404);
}

async fn each_connection_ends_with_one_access_line(t: Transport) {
    let pki = Pki::new();
    let redis = Redis::start();
    // An upstream that reads a little and then resets the connection.
    let resetting = Upstream::start(|mut tcp: TcpStream| async move {
        let mut buf = [0u8; 4];
        let _ = tcp.read_exact(&mut buf).await;
        let _ = tcp.set_zero_linger();
    })
    .await;
    let server = Amb::server(
        &pki,
        0,
        &[
            "--upstream",
            &format!("127.0.0.1:{}", redis.port),
            "--route",
            &format!("resets={}", resetting.addr),
        ],
    );
    let client = Amb::client(
        &pki,
        "client",
        server.server_addr(),
        t,
        &["--listen", "0=resets"],
    );
    client.wait_pool_up(t);
    let down = incr_exactly(client.listen_addr_for("default")).await;
    let mut tcp = TcpStream::connect(client.listen_addr_for("resets"))
        .await
        .unwrap();
    tcp.write_all(INCR).await.unwrap();
    assert_reset(&mut tcp).await;

    let upstream = format!("127.0.0.1:{}", redis.port);
    for (amb, side) in [(&server, "server"), (&client, "client")] {
        let ok = amb.log.wait_for(&["amb::access", "route=default"]);
        assert_eq!(field(&ok, "end"), "ok", "{side}: {ok}");
        assert_eq!(field(&ok, "up"), INCR.len().to_string(), "{side}: {ok}");
        assert_eq!(field(&ok, "down"), down.to_string(), "{side}: {ok}");
        assert!(!field(&ok, "duration").is_empty());
        let reset = amb.log.wait_for(&["amb::access", "route=resets"]);
        assert_eq!(field(&reset, "end"), "reset", "{side}: {reset}");
        assert!(reset.contains("reason="), "{side}: {reset}");
        if side == "server" {
            assert_eq!(field(&ok, "upstream"), upstream);
            assert_eq!(field(&reset, "upstream"), resetting.addr.to_string());
        } else {
            let peer = format!("localhost:{}", server.server_addr().port());
            assert_eq!(field(&ok, "peer"), peer);
            assert!(field(&ok, "app").starts_with("127.0.0.1:"));
        }
    }

    // --access-log off: no line, the connection still counted.
    let mut quiet = Amb::client(
        &pki,
        "client",
        server.server_addr(),
        t,
        &["--access-log", "off", "--metrics", "127.0.0.1:0"],
    );
    let metrics = metrics_addr(&quiet);
    quiet.wait_pool_up(t);
    incr_exactly(quiet.listen_addr()).await;
    let ok = r#"amb_connections_total{side="client",route="default",end="ok"}"#;
    wait_sample(metrics, ok, 1.0).await;
    quiet.signal("TERM");
    assert!(quiet.wait_exit(READY).success());
    assert_eq!(quiet.log.count(&["amb::access"]), 0, "{}", quiet.log.text());
}

/// The `suppressed=N` counts of the lines holding `needles`.
fn suppressed(amb: &Amb, needles: &[&str]) -> Vec<u64> {
    let text = amb.log.text();
    text.lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .map(|line| field(line, "suppressed").parse().unwrap())
        .collect()
}

async fn repeated_refusals_are_logged_once_a_second_with_a_count(t: Transport) {
    let pki = Pki::new();
    let (_held, dead) = dead_port();
    let server = Amb::server(
        &pki,
        0,
        &[
            "--upstream",
            &format!("127.0.0.1:{dead}"),
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let client = Amb::client(&pki, "client", server.server_addr(), t, &[]);
    client.wait_pool_up(t);
    let listen = client.listen_addr();
    let needles = ["stream refused", "reason=upstream_refused"];
    let mut made = 0u64;
    // Refusals as fast as they come, until a second has passed and a line says how many the
    // one before it stood for.
    let deadline = std::time::Instant::now() + READY;
    while !suppressed(&server, &needles).iter().any(|&n| n > 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            server.log.text()
        );
        refused(listen).await;
        made += 1;
    }
    let series = r#"amb_refusals_total{side="server",route="default",reason="upstream_refused"}"#;
    let text = wait_sample(metrics_addr(&server), series, made as f64).await;
    assert!(sample(&text, series).is_some());
    for (amb, needles) in [(&server, &needles[..]), (&client, &needles[..])] {
        let counts = suppressed(amb, needles);
        let written = counts.len() as u64;
        assert!(
            written >= 1 && written < made / 2,
            "{written} lines for {made} refusals"
        );
        assert!(
            written + counts.iter().sum::<u64>() <= made,
            "lines and suppressed counts add up to at most the refusals: {counts:?} for {made}"
        );
    }
}
