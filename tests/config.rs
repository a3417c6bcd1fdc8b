//! The config file, end to end: routes with allow-lists of their own, a client's listeners from
//! its file, and a bad file refused with one line naming the file and line, before anything is
//! bound. Tunnel cases run over QUIC and over TLS.

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use amb_pki::LeafSpec;
use support::*;

per_transport!(
    each_identity_reaches_exactly_the_routes_it_is_allowed_on,
    a_client_configured_by_its_file_carries_its_listeners,
    a_sighup_swaps_in_the_routes_of_the_rewritten_file,
    reload_under_load_leaves_unchanged_routes_alone_and_cuts_what_was_revoked,
    a_client_follows_its_file_as_listeners_come_go_and_change,
    amb_check_connect_dials_each_peer_and_upstream_and_says_what_answered,
    a_client_dropped_from_the_server_wide_list_is_drained_then_cut,
);

/// `[server]` with explicit certificate paths, listening on a free loopback port.
fn server_part(pki: &Pki) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
        pki.path("server.pem").display(),
        pki.path("server.key").display(),
        pki.path("ca.pem").display()
    )
}

async fn each_identity_reaches_exactly_the_routes_it_is_allowed_on(t: Transport) {
    let pki = Pki::new();
    for name in ["web", "worker"] {
        pki.write_leaf(name, &pki.ca.issue(&LeafSpec::client(name, 30)).unwrap());
    }
    let (cache, jobs, open) = (
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
    );
    let config = format!(
        "{}\n[[server.route]]\nname = \"cache\"\nupstream = \"{}\"\nallow = [\"uri:spiffe://amb/web\"]\n\n\
         [[server.route]]\nname = \"jobs\"\nupstream = \"{}\"\nallow = [\"uri:spiffe://amb/worker\"]\n\n\
         [[server.route]]\nname = \"open\"\nupstream = \"{}\"\n",
        server_part(&pki),
        cache.addr,
        jobs.addr,
        open.addr
    );
    std::fs::write(pki.path("amb.toml"), config).unwrap();
    let path = pki.path("amb.toml").display().to_string();
    let server = Amb::spawn(&["server".into(), "--config".into(), path]);
    let addr = server.server_addr();
    let listens = [
        "--listen", "0=cache", "--listen", "0=jobs", "--listen", "0=open", "--listen", "0=nope",
    ];
    for (identity, allowed) in [("web", "cache"), ("worker", "jobs")] {
        let client = Amb::client(&pki, identity, addr, t, &listens);
        client.wait_tunnel_up();
        for route in ["cache", "jobs", "open", "nope"] {
            let listen = client.listen_addr_for(route);
            if route == allowed || route == "open" {
                assert!(echo_works(listen).await, "{identity} on {route}");
            } else {
                // 403, for a route of another identity and an unknown one alike.
                assert_reset_after_write(listen, b"hi").await;
            }
        }
    }
    assert_eq!(
        (cache.accepted(), jobs.accepted(), open.accepted()),
        (1, 1, 2),
        "each upstream was dialed only for the identities allowed on it"
    );
}

async fn a_client_configured_by_its_file_carries_its_listeners(t: Transport) {
    let pki = Pki::new();
    let (one, two) = (Upstream::echo().await, Upstream::echo().await);
    let server = Amb::server(
        &pki,
        0,
        &[
            "--route",
            &format!("one={}", one.addr),
            "--route",
            &format!("two={}", two.addr),
        ],
    );
    let config = format!(
        "[client]\npeer = \"localhost:{}\"\ntransport = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\n\
         [[client.listen]]\nlisten = \"0\"\nroute = \"one\"\n\n\
         [[client.listen]]\nlisten = \"127.0.0.1:0\"\nroute = \"two\"\n",
        server.server_addr().port(),
        t.flag(),
        pki.path("client.pem").display(),
        pki.path("client.key").display(),
        pki.path("ca.pem").display()
    );
    std::fs::write(pki.path("client.toml"), config).unwrap();
    let path = pki.path("client.toml").display().to_string();
    let client = Amb::spawn(&["client".into(), "--config".into(), path]);
    for route in ["one", "two"] {
        assert!(echo_works(client.listen_addr_for(route)).await, "{route}");
    }
    assert_eq!((one.accepted(), two.accepted()), (1, 1));
}

#[test]
fn a_bad_file_is_one_line_naming_file_and_line_and_nothing_is_bound() {
    let dir = TempDir::new("config-bad");
    let port = free_port();
    let server = |rest: &str| format!("[server]\nlisten = \"127.0.0.1:{port}\"\n{rest}");
    let client = |rest: &str| format!("[client]\npeer = \"localhost:7443\"\n{rest}");
    let cases = [
        (
            "server",
            server("upstreams = [\"a:1\"]\n"),
            ":3: ",
            "unknown field `upstreams`",
        ),
        (
            "server",
            server("upstream = \"a:1\"\n[[server.route]]\nname = \"default\"\nupstream = \"b:1\"\n"),
            ":5: ",
            "route default is given twice",
        ),
        ("server", server("max-streams = \"many\"\n"), ":3: ", "max-streams"),
        (
            "server",
            server("[[server.route]]\nname = \"r\"\nupstream = \"redis\"\n"),
            ":5: ",
            "not HOST:PORT",
        ),
        (
            "client",
            client(&format!("[[client.listen]]\nlisten = \"{port}\"\n[[client.listen]]\nlisten = \"127.0.0.1:{port}\"\n")),
            ":6: ",
            "is given twice",
        ),
        (
            "client",
            format!("[server]\nupstream = \"a:1\"\n{}", client(&format!("[[client.listen]]\nlisten = \"{port}\"\nroute = \"pg\"\n"))),
            ":6: ",
            "asks for route pg",
        ),
        (
            "client",
            client("[[client.listen]]\nlisten = \"localhost:1\"\n"),
            ":4: ",
            "listen",
        ),
    ];
    for (i, (command, text, line, needle)) in cases.iter().enumerate() {
        let path = dir.0.join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(AMB)
            .args([command, "--config"])
            .arg(&path)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        let at = format!("{}{line}", path.display());
        assert!(
            stderr.contains(&at) && stderr.contains(needle),
            "{text}: {stderr}"
        );
    }
    // Nothing was bound: the port is still free.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port was left free");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amb_run_serves_both_parts_of_one_file_in_one_process() {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let port = free_port();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ntransport = \"tls\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{ca}\"\n\n\
         [[server.route]]\nname = \"echo\"\nupstream = \"{}\"\n\n\
         [client]\npeer = \"localhost:{port}\"\ntransport = \"tls\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{ca}\"\n\n\
         [[client.listen]]\nlisten = \"0\"\nroute = \"echo\"\n",
        pki.path("server.pem").display(),
        pki.path("server.key").display(),
        upstream.addr,
        pki.path("client.pem").display(),
        pki.path("client.key").display(),
        ca = pki.path("ca.pem").display(),
    );
    std::fs::write(pki.path("both.toml"), config).unwrap();
    let path = pki.path("both.toml").display().to_string();
    // The file describes both parts: AMB_* variables, each naming one part's setting (a
    // server's ADDR:PORT, a client's PORT), are not read by `amb run`.
    let both = Amb::spawn_env(
        &["run", "--config", &path],
        &[("AMB_LISTEN", "1"), ("AMB_TRANSPORT", "quic")],
    );
    both.log.wait_for(&["amb server listening"]);
    assert!(echo_works(both.listen_addr_for("echo")).await);
    assert_eq!(upstream.accepted(), 1);
}

/// Runs `amb check --config FILE`; returns (success, stdout and stderr).
fn check(path: &std::path::Path) -> (bool, String) {
    check_with(vec!["--config".into(), path.display().to_string()])
}

/// Runs `amb check ARGS`; returns (success, stdout and stderr).
fn check_with(args: Vec<String>) -> (bool, String) {
    let out = Command::new(AMB)
        .arg("check")
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn amb_check_passes_a_good_pki_and_names_each_broken_one() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    let file = |server: &str, client: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:7443\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{ca}\"\nupstream = \"127.0.0.1:6379\"\n\n\
             [client]\npeer = \"localhost:7443\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{ca}\"\n[[client.listen]]\nlisten = \"6379\"\n",
            pki.path(&format!("{server}.pem")).display(),
            pki.path(&format!("{server}.key")).display(),
            pki.path(&format!("{client}.pem")).display(),
            pki.path(&format!("{client}.key")).display(),
            ca = pki.path("ca.pem").display(),
        )
    };
    let path = pki.path("check.toml");
    std::fs::write(&path, file("server", "client")).unwrap();
    let (ok, out) = check(&path);
    assert!(
        ok && out.contains("ok: ") && !out.contains("warning:"),
        "{out}"
    );

    // A client certificate three days from its end: a warning, still a pass.
    pki.write_leaf("soon", &pki.ca.issue(&LeafSpec::client("soon", 3)).unwrap());
    std::fs::write(&path, file("server", "soon")).unwrap();
    let (ok, out) = check(&path);
    assert!(ok, "{out}");
    assert!(
        out.contains("warning: ") && out.contains("soon.pem expires in "),
        "{out}"
    );

    // The client's certificate as the server's: the wrong EKU for the role.
    std::fs::write(&path, file("client", "client")).unwrap();
    let (ok, out) = check(&path);
    assert!(!ok, "{out}");
    assert!(
        out.contains("error: ") && out.contains("as the server certificate"),
        "{out}"
    );

    // A key others may read, and a missing file.
    std::fs::set_permissions(
        pki.path("client.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    std::fs::write(&path, file("server", "client")).unwrap();
    let (ok, out) = check(&path);
    assert!(
        !ok && out.contains("error: ") && out.contains("client.key"),
        "{out}"
    );
    std::fs::write(&path, file("nothing", "soon")).unwrap();
    let (ok, out) = check(&path);
    assert!(
        !ok && out.contains("error: ") && out.contains("nothing.pem"),
        "{out}"
    );
}

/// What a handshake would refuse, `amb check` names before anything starts: a key that is
/// not its certificate's, a chain to another CA, a certificate expired or not yet valid, the
/// wrong EKU for a client, and a server certificate that does not cover the name the same
/// file's client dials it by. A client-only file is checked as what it is.
#[test]
fn amb_check_names_what_a_handshake_would_refuse() {
    use time::{Duration as Days, OffsetDateTime};
    let pki = Pki::new();
    let leaf = |name: &str| {
        format!(
            "cert = \"{}\"\nkey = \"{}\"\n",
            pki.path(&format!("{name}.pem")).display(),
            pki.path(&format!("{name}.key")).display()
        )
    };
    let ca = pki.path("ca.pem").display().to_string();
    let file = |server: &str, client: &str, client_extra: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:7443\"\n{server}ca = \"{ca}\"\nupstream = \"127.0.0.1:6379\"\n\n\
             [client]\npeer = \"localhost:7443\"\n{client}ca = \"{ca}\"\n{client_extra}\
             [[client.listen]]\nlisten = \"6379\"\n"
        )
    };
    let path = pki.path("check.toml");
    let expect_error = |text: String, needles: &[&str]| {
        std::fs::write(&path, text).unwrap();
        let (ok, out) = check(&path);
        assert!(!ok, "{out}");
        for needle in needles {
            assert!(out.contains(needle), "{needle:?} not in: {out}");
        }
    };
    let now = OffsetDateTime::now_utc();
    let dated = |name: &str, from: Days, to: Days| {
        let mut spec = LeafSpec::client(name, 30);
        (spec.not_before, spec.not_after) = (now + from, now + to);
        pki.write_leaf(name, &pki.ca.issue(&spec).unwrap());
    };
    dated("expired", Days::days(-30), Days::days(-1));
    dated("early", Days::days(1), Days::days(30));
    let other = amb_pki::CertAuthority::generate("another CA").unwrap();
    pki.write_leaf(
        "stranger",
        &other.issue(&LeafSpec::client("stranger", 30)).unwrap(),
    );
    // The client's certificate with the server's key.
    let mismatched = format!(
        "cert = \"{}\"\nkey = \"{}\"\n",
        pki.path("client.pem").display(),
        pki.path("server.key").display()
    );

    // The pair as issued passes, the server's certificate checked for localhost, the name the
    // client part dials it by.
    std::fs::write(&path, file(&leaf("server"), &leaf("client"), "")).unwrap();
    let (ok, out) = check(&path);
    assert!(ok && !out.contains("error"), "{out}");

    expect_error(
        file(&leaf("server"), &mismatched, ""),
        &["error: ", "client"],
    );
    expect_error(
        file(&leaf("server"), &leaf("expired"), ""),
        &["error: ", "expired.pem"],
    );
    expect_error(
        file(&leaf("server"), &leaf("early"), ""),
        &["error: ", "early.pem"],
    );
    expect_error(
        file(&leaf("server"), &leaf("stranger"), ""),
        &["error: ", "stranger.pem"],
    );
    expect_error(
        file(&leaf("server"), &leaf("server"), ""),
        &["error: ", "server.pem", "as a client certificate"],
    );
    // The client pins a name the server's certificate does not carry.
    expect_error(
        file(
            &leaf("server"),
            &leaf("client"),
            "server-name = \"big-server\"\n",
        ),
        &["error: ", "server.pem", "for big-server"],
    );

    // Client-only mode: its CA and file are what it needs, no amb server, no certificate.
    std::fs::write(
        &path,
        format!(
            "[client]\ntls-upstream = \"127.0.0.1:6380\"\nca = \"{ca}\"\n[[client.listen]]\nlisten = \"6379\"\n"
        ),
    )
    .unwrap();
    let (ok, out) = check(&path);
    assert!(ok && out.contains("ok: "), "{out}");
}

async fn a_sighup_swaps_in_the_routes_of_the_rewritten_file(t: Transport) {
    let pki = Pki::new();
    let (first, second) = (Upstream::echo().await, Upstream::echo().await);
    let route = |name: &str, up: &Upstream| {
        format!(
            "[[server.route]]\nname = \"{name}\"\nupstream = \"{}\"\n",
            up.addr
        )
    };
    let path = pki.path("amb.toml");
    std::fs::write(&path, server_part(&pki) + &route("one", &first)).unwrap();
    let server = Amb::spawn(&[
        "server".into(),
        "--config".into(),
        path.display().to_string(),
        "--drain-timeout".into(),
        "2s".into(),
    ]);
    let listens = ["--listen", "0=one", "--listen", "0=two"];
    let client = Amb::client(&pki, "client", server.server_addr(), t, &listens);
    client.wait_tunnel_up();
    let (one, two) = (client.listen_addr_for("one"), client.listen_addr_for("two"));
    // A stream that lives across the reloads.
    let mut live = tokio::net::TcpStream::connect(one).await.unwrap();
    echo_on(&mut live, b"before").await;
    assert_reset_after_write(two, b"hi").await;

    // Route two added, route one removed: new streams follow the file at once.
    std::fs::write(&path, server_part(&pki) + &route("two", &second)).unwrap();
    let removed_at = Instant::now();
    server.signal("HUP");
    server
        .log
        .wait_for_nth(&["config file reloaded", "changes=2"], 1);
    assert!(echo_works(two).await, "the added route");
    assert_reset_after_write(one, b"hi").await;
    echo_on(&mut live, b"after").await;

    // A broken file changes nothing.
    std::fs::write(&path, "[server]\nlisten = 7443\n").unwrap();
    server.signal("HUP");
    server.log.wait_for(&["config file not reloaded"]);
    assert!(echo_works(two).await, "still served after a broken file");

    // A setting only a restart applies: the reload says so, naming it, and changes nothing.
    let limited = server_part(&pki) + "max-streams = 100\n" + &route("two", &second);
    std::fs::write(&path, limited).unwrap();
    server.signal("HUP");
    server
        .log
        .wait_for(&["WARN", "keys=\"max-streams\"", "restart"]);
    assert!(
        echo_works(two).await,
        "still served after a restart-only change"
    );
    assert_eq!((first.accepted(), second.accepted()), (1, 3));

    // The removed route's stream had --drain-timeout (2 s) to finish, and is then reset.
    assert_reset(&mut live).await;
    let lived = removed_at.elapsed();
    assert!(
        lived >= Duration::from_millis(1900) && lived < Duration::from_secs(8),
        "cut {lived:?} after the route was removed"
    );
}

/// Writes `bytes` on `tcp` and expects them echoed.
async fn echo_on(tcp: &mut tokio::net::TcpStream, bytes: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(bytes).await.unwrap();
    let mut back = vec![0; bytes.len()];
    tcp.read_exact(&mut back).await.unwrap();
    assert_eq!(back, bytes);
}

/// Replaces `path` with `text` in one step, as a config management tool does.
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn reload_under_load_leaves_unchanged_routes_alone_and_cuts_what_was_revoked(t: Transport) {
    let pki = Pki::new();
    for name in ["web", "worker"] {
        pki.write_leaf(name, &pki.ca.issue(&LeafSpec::client(name, 30)).unwrap());
    }
    let [stable, moved_a, moved_b, doomed, guarded, extra] = [
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
    ];
    let drain = Duration::from_secs(3);
    // Rewrite `n` of the file: `moving` alternates between two upstreams, `extra-N` routes come
    // and go, `doomed` is removed from rewrite 10 on, and `worker` loses `guarded` from rewrite 5.
    let config = |n: usize| {
        let mut text = server_part(&pki)
            + &format!(
                "drain-timeout = \"{}s\"\nreload-check = \"50ms\"\n",
                drain.as_secs()
            );
        let mut route = |name: &str, up: &Upstream, allow: &str| {
            text += &format!(
                "\n[[server.route]]\nname = \"{name}\"\nupstream = \"{}\"\n{allow}",
                up.addr
            );
        };
        route("stable", &stable, "");
        route("moving", if n % 2 == 0 { &moved_a } else { &moved_b }, "");
        if n < 10 {
            route("doomed", &doomed, "");
        }
        let allowed = if n < 5 {
            "\"uri:spiffe://amb/web\", \"uri:spiffe://amb/worker\""
        } else {
            "\"uri:spiffe://amb/web\""
        };
        route("guarded", &guarded, &format!("allow = [{allowed}]\n"));
        for i in 0..n % 4 {
            route(&format!("extra-{i}"), &extra, "");
        }
        text
    };
    let path = pki.path("amb.toml");
    replace_file(&path, &config(0));
    let server = Amb::spawn(&[
        "server".into(),
        "--config".into(),
        path.display().to_string(),
    ]);
    let addr = server.server_addr();
    let web = Amb::client(
        &pki,
        "web",
        addr,
        t,
        &[
            "--listen",
            "0=stable",
            "--listen",
            "0=moving",
            "--listen",
            "0=doomed",
            "--listen",
            "0=guarded",
        ],
    );
    let worker = Amb::client(&pki, "worker", addr, t, &["--listen", "0=guarded"]);
    web.wait_tunnel_up();
    worker.wait_tunnel_up();

    // Long-lived streams: one on each route that a rewrite touches, one on the unchanged route.
    let connect = |addr| tokio::net::TcpStream::connect(addr);
    let mut live_stable = connect(web.listen_addr_for("stable")).await.unwrap();
    let mut live_doomed = connect(web.listen_addr_for("doomed")).await.unwrap();
    let mut live_kept = connect(web.listen_addr_for("guarded")).await.unwrap();
    let mut live_revoked = connect(worker.listen_addr_for("guarded")).await.unwrap();
    for live in [
        &mut live_stable,
        &mut live_doomed,
        &mut live_kept,
        &mut live_revoked,
    ] {
        echo_on(live, b"before").await;
    }

    // Fresh connections on the unchanged route and the moving one, all through the rewrites.
    let stop = Arc::new(AtomicBool::new(false));
    let load = |route: &str| {
        let (listen, stop) = (web.listen_addr_for(route), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, 0usize);
            while !stop.load(Ordering::Relaxed) {
                if echo_works(listen).await {
                    ok += 1;
                } else {
                    failed += 1;
                }
            }
            (ok, failed)
        })
    };
    let (stable_load, moving_load) = (load("stable"), load("moving"));

    let (mut reloads, mut revoked_at) = (0, None);
    for n in 1..=20 {
        if n == 15 {
            // A broken file: refused whole, everything keeps running.
            replace_file(
                &path,
                &(config(n)
                    + "\n[[server.route]]\nname = \"stable\"\nupstream = \"127.0.0.1:1\"\n"),
            );
            server.log.wait_for(&["config file not reloaded", "stable"]);
            continue;
        }
        replace_file(&path, &config(n));
        reloads += 1;
        server
            .log
            .wait_for_nth(&["config file changed: config file reloaded"], reloads);
        echo_on(&mut live_stable, b"during").await;
        if n == 5 {
            // Revoked, but not cut before the drain timeout.
            revoked_at = Some(Instant::now());
            echo_on(&mut live_revoked, b"grace").await;
        }
        if n == 10 {
            // The removed route's stream finishes: within the drain timeout it carries on and
            // ends cleanly.
            echo_on(&mut live_doomed, b"last words").await;
            live_doomed.shutdown().await.unwrap();
            assert_eq!(read_all(&mut live_doomed).await.unwrap(), b"");
            assert_reset_after_write(web.listen_addr_for("doomed"), b"hi").await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (stable_load, moving_load) = (stable_load.await.unwrap(), moving_load.await.unwrap());
    assert_eq!(
        stable_load.1, 0,
        "fresh connections on the unchanged route: {stable_load:?}"
    );
    assert_eq!(
        moving_load.1, 0,
        "fresh connections on the changed route: {moving_load:?}"
    );
    assert!(
        stable_load.0 > 20 && moving_load.0 > 20,
        "{stable_load:?} {moving_load:?}"
    );
    assert!(
        moved_a.accepted() > 1 && moved_b.accepted() > 0,
        "new streams followed `moving`"
    );

    // The revoked client's stream is cut once the drain timeout has passed; the peer still
    // allowed on the route keeps its own, and new streams of the revoked one are refused.
    assert_reset(&mut live_revoked).await;
    let revoked_for = revoked_at.unwrap().elapsed();
    assert!(
        revoked_for < drain * 2,
        "cut {revoked_for:?} after the reload"
    );
    assert_reset_after_write(worker.listen_addr_for("guarded"), b"hi").await;
    echo_on(&mut live_kept, b"still here").await;
    echo_on(&mut live_stable, b"after").await;
    assert_eq!(
        stable.accepted(),
        stable_load.0 + 1,
        "every connection on the unchanged route reached its upstream once"
    );
}

async fn a_client_follows_its_file_as_listeners_come_go_and_change(t: Transport) {
    let pki = Pki::new();
    let ups = [
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
    ];
    let routes = ["one", "two", "three", "four"];
    let mut flags = Vec::new();
    for (route, up) in routes.iter().zip(&ups) {
        flags.push("--route".to_owned());
        flags.push(format!("{route}={}", up.addr));
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = Amb::server(&pki, 0, &flags);
    let fixed = free_port();
    let file = |listeners: &[(String, &str)]| {
        let mut text = format!(
            "[client]\npeer = \"localhost:{}\"\ntransport = \"{}\"\nreload-check = \"50ms\"\n\
             cert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            server.server_addr().port(),
            t.flag(),
            pki.path("client.pem").display(),
            pki.path("client.key").display(),
            pki.path("ca.pem").display()
        );
        for (listen, route) in listeners {
            text += &format!("\n[[client.listen]]\nlisten = \"{listen}\"\nroute = \"{route}\"\n");
        }
        text
    };
    let path = pki.path("client.toml");
    replace_file(
        &path,
        &file(&[("0".into(), "one"), (fixed.to_string(), "two")]),
    );
    let client = Amb::spawn(&[
        "client".into(),
        "--config".into(),
        path.display().to_string(),
    ]);
    let removed = client.listen_addr_for("one");
    let retargeted: std::net::SocketAddr = format!("127.0.0.1:{fixed}").parse().unwrap();
    assert!(echo_works(retargeted).await, "before: two");
    let mut live = tokio::net::TcpStream::connect(removed).await.unwrap();
    echo_on(&mut live, b"before").await;

    // `one` removed, the fixed port moved from `two` to `three`, `four` added.
    replace_file(
        &path,
        &file(&[(fixed.to_string(), "three"), ("0".into(), "four")]),
    );
    client.log.wait_for(&["config file reloaded", "changes=3"]);
    assert!(
        echo_works(client.listen_addr_for("four")).await,
        "the added listener"
    );
    assert!(echo_works(retargeted).await, "the changed listener");
    echo_on(&mut live, b"after").await;
    let refused = tokio::time::timeout(Duration::from_secs(10), async {
        while tokio::net::TcpStream::connect(removed).await.is_ok() {
            tokio::task::yield_now().await;
        }
    });
    refused.await.expect("the removed listener stops accepting");

    // A listener that cannot be bound fails the whole file: nothing changes.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port().to_string();
    replace_file(
        &path,
        &file(&[(fixed.to_string(), "one"), (taken_port, "two")]),
    );
    client.log.wait_for(&["config file not reloaded"]);
    assert!(echo_works(retargeted).await, "still on three");
    assert_eq!(
        ups.iter().map(Upstream::accepted).collect::<Vec<_>>(),
        [1, 1, 2, 1],
        "each connection reached the upstream its listener named at the time"
    );
}

async fn amb_check_connect_dials_each_peer_and_upstream_and_says_what_answered(t: Transport) {
    let pki = Pki::new();
    let up = Upstream::echo().await;
    let server = Amb::server(&pki, 0, &["--upstream", &up.addr.to_string()]);
    // A port held bound but not listening: connections to it are refused, and no other
    // test's process can take it meanwhile.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let (port, dead) = (
        server.server_addr().port(),
        held.local_addr().unwrap().port(),
    );
    let certs = |pki: &Pki, leaf: &str| {
        format!(
            "cert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            pki.path(&format!("{leaf}.pem")).display(),
            pki.path(&format!("{leaf}.key")).display(),
            pki.path("ca.pem").display()
        )
    };
    // One listener to the live server, one to a port nothing answers on.
    let file = pki.path("client.toml");
    std::fs::write(
        &file,
        format!(
            "[client]\npeer = \"localhost:{port}\"\ntransport = \"{}\"\nhandshake-timeout = \"5s\"\n{}\n\
             [[client.listen]]\nlisten = \"0\"\n\n\
             [[client.listen]]\nlisten = \"0\"\nroute = \"x\"\npeer = \"localhost:{dead}\"\n",
            t.flag(),
            certs(&pki, "client")
        ),
    )
    .unwrap();
    let args = vec![
        "--config".into(),
        file.display().to_string(),
        "--connect".into(),
    ];
    let (ok, out) = blocking(move || check_with(args)).await;
    assert!(!ok, "{out}");
    let live = format!("ok: peer localhost:{port} ({}) at 127.0.0.1:{port}: handshake passed; presented dns:localhost", t.flag());
    assert!(out.contains(&live), "{out}");
    assert!(
        out.contains(&format!(
            "error: peer localhost:{dead} ({}): no handshake passed",
            t.flag()
        )),
        "{out}"
    );

    // The same through `amb check client` and its flags: the live peer alone passes.
    // `amb check client` to the live server, with `certs` flags.
    let client_check = |certs: Vec<String>| {
        let mut flags: Vec<String> = ["client", "--listen", "0", "--connect"]
            .map(String::from)
            .to_vec();
        flags.extend(["--transport".into(), t.flag().into()]);
        flags.extend(["--peer".into(), format!("localhost:{port}")]);
        flags.extend(["--handshake-timeout".into(), "5s".into()]);
        flags.extend(certs);
        flags
    };
    let flags = client_check(pki.cert_flags("client"));
    let (ok, out) = blocking(move || check_with(flags)).await;
    assert!(ok && out.contains(&live), "{out}");

    // A client certificate of another CA (which the client trusts too, so its files check
    // out): the server turns it away at the handshake, and the check says so.
    let stranger = Pki::new();
    let both_cas = std::fs::read_to_string(pki.path("ca.pem")).unwrap()
        + &std::fs::read_to_string(stranger.path("ca.pem")).unwrap();
    std::fs::write(stranger.path("both-cas.pem"), both_cas).unwrap();
    let stranger_file = |name: &str| stranger.path(name).display().to_string();
    let flags = client_check(
        [
            ("--cert", "client.pem"),
            ("--key", "client.key"),
            ("--ca", "both-cas.pem"),
        ]
        .into_iter()
        .flat_map(|(flag, file)| [flag.to_owned(), stranger_file(file)])
        .collect(),
    );
    let (ok, out) = blocking(move || check_with(flags)).await;
    assert!(!ok && out.contains("no handshake passed"), "{out}");

    // A server's upstreams: each dialed once.
    let mut flags: Vec<String> = vec!["server".into(), "--upstream".into(), up.addr.to_string()];
    flags.extend([
        "--route".into(),
        format!("gone=127.0.0.1:{dead}"),
        "--connect".into(),
    ]);
    flags.extend(pki.cert_flags("server"));
    let (ok, out) = blocking(move || check_with(flags)).await;
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "ok: route default: upstream {} accepted a connection",
            up.addr
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "error: route gone: upstream 127.0.0.1:{dead} did not accept a connection"
        )),
        "{out}"
    );
    // The check has exited; its one connection may still sit in the upstream's accept queue.
    yield_until("the upstream's accept", || up.accepted() >= 1).await;
    let dials = until_still(Duration::from_millis(50), || up.accepted()).await;
    assert_eq!(dials, 1, "the upstream was dialed once");
}

/// A client the reloaded server-wide `allow` no longer names keeps its live stream for
/// --drain-timeout, then loses it and its tunnel: new app connections are refused. The client
/// still named is untouched.
async fn a_client_dropped_from_the_server_wide_list_is_drained_then_cut(t: Transport) {
    let pki = Pki::new();
    for name in ["web", "worker"] {
        pki.write_leaf(name, &pki.ca.issue(&LeafSpec::client(name, 30)).unwrap());
    }
    let up = Upstream::echo().await;
    let config = |allowed: &str| {
        server_part(&pki)
            + &format!(
                "drain-timeout = \"2s\"\nallow = [{allowed}]\n\n\
                 [[server.route]]\nname = \"echo\"\nupstream = \"{}\"\n",
                up.addr
            )
    };
    let path = pki.path("amb.toml");
    let both = "\"uri:spiffe://amb/web\", \"uri:spiffe://amb/worker\"";
    replace_file(&path, &config(both));
    let server = Amb::spawn(&[
        "server".into(),
        "--config".into(),
        path.display().to_string(),
    ]);
    let addr = server.server_addr();
    let listen = ["--listen", "0=echo", "--tunnel-wait", "1s"];
    let (web, worker) = (
        Amb::client(&pki, "web", addr, t, &listen),
        Amb::client(&pki, "worker", addr, t, &listen),
    );
    web.wait_tunnel_up();
    worker.wait_tunnel_up();
    let connect = |amb: &Amb| tokio::net::TcpStream::connect(amb.listen_addr_for("echo"));
    let (mut live_web, mut live_worker) = (
        connect(&web).await.unwrap(),
        connect(&worker).await.unwrap(),
    );
    echo_on(&mut live_web, b"before").await;
    echo_on(&mut live_worker, b"before").await;

    replace_file(&path, &config("\"uri:spiffe://amb/web\""));
    let revoked_at = Instant::now();
    server.signal("HUP");
    server.log.wait_for(&["config file reloaded", "changes=1"]);
    echo_on(&mut live_worker, b"grace").await;

    assert_reset(&mut live_worker).await;
    let lived = revoked_at.elapsed();
    assert!(
        lived >= Duration::from_millis(1900) && lived < Duration::from_secs(8),
        "cut {lived:?} after the revocation"
    );
    assert_reset_after_write(worker.listen_addr_for("echo"), b"hi").await;
    echo_on(&mut live_web, b"still here").await;
    assert!(echo_works(web.listen_addr_for("echo")).await);
}
