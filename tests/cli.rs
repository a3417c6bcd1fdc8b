//! The command line as a newcomer meets it: `amb certs init` then a working pair, and start-up
//! errors that are one clear line with a non-zero exit.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use support::*;

/// Runs `amb` to completion; returns (success, stderr).
fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(AMB)
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

fn assert_one_line_error(args: &[&str], needles: &[&str]) {
    let (ok, stderr) = run(args);
    assert!(!ok, "amb {args:?} should fail");
    assert_eq!(
        stderr.lines().count(),
        1,
        "one line expected, got:\n{stderr}"
    );
    for n in needles {
        assert!(stderr.contains(n), "{n:?} missing from: {stderr}");
    }
}

#[test]
fn certs_init_then_pair_carries_redis_end_to_end() {
    let dir = TempDir::new("cli-init");
    let certs = dir.0.join("certs");
    let certs = certs.to_str().unwrap();
    let (ok, err) = run(&[
        "certs",
        "init",
        "--dir",
        certs,
        "--server-name",
        "big-server",
    ]);
    assert!(ok, "{err}");
    for key in ["ca.key", "server.key", "client.key"] {
        let mode = std::fs::metadata(dir.0.join("certs").join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    // Refuses to overwrite without --force, then overwrites with it.
    assert_one_line_error(
        &["certs", "init", "--dir", certs],
        &["already exists", "--force"],
    );
    assert!(run(&["certs", "init", "--dir", certs, "--force"]).0);
    let (ok, err) = run(&[
        "certs",
        "issue",
        "--dir",
        certs,
        "--client",
        "app2",
        "--san",
        "dns:app2.internal",
    ]);
    assert!(ok, "{err}");

    let redis = Redis::start();
    let upstream = format!("127.0.0.1:{}", redis.port);
    let server = Amb::spawn(&[
        "server".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--upstream".into(),
        upstream,
        "--certs-dir".into(),
        certs.into(),
    ]);
    let peer = format!("localhost:{}", server.server_addr().port());
    // One client per transport; each also runs on a different runtime flavour.
    for (transport, threads) in [("quic", "1"), ("tls", "2")] {
        let client = Amb::spawn(&[
            "--threads".into(),
            threads.into(),
            "client".into(),
            "--listen".into(),
            "0".into(),
            "--peer".into(),
            peer.clone(),
            "--transport".into(),
            transport.into(),
            "--certs-dir".into(),
            certs.into(),
        ]);
        let port = client.listen_addr().port();
        assert_eq!(
            redis_cli(port, &["ping"]).as_deref(),
            Some("PONG"),
            "{transport}"
        );
        assert_eq!(
            redis_cli(port, &["set", "k", transport]).as_deref(),
            Some("OK")
        );
        assert_eq!(redis_cli(port, &["get", "k"]).as_deref(), Some(transport));
    }
}

#[test]
fn missing_certificates_say_to_run_certs_init() {
    let dir = TempDir::new("cli-missing");
    let certs = dir.0.to_str().unwrap();
    assert_one_line_error(
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--certs-dir",
            certs,
        ],
        &[certs, "file not found", "amb certs init"],
    );
    assert_one_line_error(
        &[
            "client",
            "--listen",
            "0",
            "--peer",
            "localhost:1",
            "--certs-dir",
            certs,
        ],
        &[certs, "file not found", "amb certs init"],
    );
}

#[test]
fn group_readable_key_is_refused() {
    let pki = Pki::new();
    let key = pki.path("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let flags = pki.cert_flags("server");
    let mut args = vec![
        "server",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "127.0.0.1:1",
    ];
    args.extend(flags.iter().map(String::as_str));
    assert_one_line_error(&args, &["server.key", "group or others", "chmod 600"]);
}

#[test]
fn address_in_use_is_named() {
    let pki = Pki::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let flags = pki.cert_flags("server");
    let mut args = vec![
        "server",
        "--listen",
        &addr,
        "--upstream",
        "127.0.0.1:1",
        "--transport",
        "tls",
    ];
    args.extend(flags.iter().map(String::as_str));
    assert_one_line_error(&args, &[&addr, "in use"]);

    let flags = pki.cert_flags("client");
    let port = taken.local_addr().unwrap().port().to_string();
    let mut args = vec!["client", "--listen", &port, "--peer", "localhost:1"];
    args.extend(flags.iter().map(String::as_str));
    assert_one_line_error(&args, &[&format!("127.0.0.1:{port}"), "in use"]);
}

#[test]
fn unparsable_values_are_named() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["server", "--listen", "nowhere", "--upstream", "x:1"],
            "nowhere",
        ),
        (&["server", "--upstream", "redis"], "redis"),
        (
            &["server", "--upstream", "x:1", "--allow", "spiffe://amb/x"],
            "spiffe://amb/x",
        ),
        (
            &["server", "--upstream", "x:1", "--allow", "dns:*.example"],
            "wildcard",
        ),
        (&["server", "--route", "Bad=x:1"], "Bad"),
        (&["client", "--listen", "redis", "--peer", "x:1"], "redis"),
        (&["client", "--listen", "1=", "--peer", "x:1"], "1="),
        (
            &["certs", "issue", "--client", "c", "--san", "email:x"],
            "email:x",
        ),
    ];
    for (args, needle) in cases {
        let (ok, stderr) = run(args);
        assert!(!ok, "{args:?} should fail");
        assert!(
            stderr.contains(needle),
            "{args:?}: {needle:?} missing from:\n{stderr}"
        );
    }
}

#[test]
fn every_setting_can_come_from_amb_variables_and_a_flag_wins() {
    let dir = TempDir::new("cli-env");
    let certs = dir.0.join("certs");
    let certs = certs.to_str().unwrap();
    let (ok, err) = run(&["certs", "init", "--dir", certs]);
    assert!(ok, "{err}");
    let redis = Redis::start();
    let upstream = format!("127.0.0.1:{}", redis.port);
    // The server serves TLS only, so the client gets through only if its --transport flag
    // (tls) wins over its AMB_TRANSPORT (quic).
    let server = Amb::spawn_env(
        &["server"],
        &[
            ("AMB_LISTEN", "127.0.0.1:0"),
            ("AMB_UPSTREAM", &upstream),
            ("AMB_TRANSPORT", "tls"),
            ("AMB_CERTS_DIR", certs),
        ],
    );
    let peer = format!("localhost:{}", server.server_addr().port());
    let client = Amb::spawn_env(
        &["client", "--transport", "tls"],
        &[
            ("AMB_PEER", &peer),
            ("AMB_LISTEN", "0"),
            ("AMB_TRANSPORT", "quic"),
            ("AMB_CERTS_DIR", certs),
            ("AMB_TUNNEL_WAIT", "20s"),
        ],
    );
    let port = client.listen_addr().port();
    assert_eq!(redis_cli(port, &["ping"]).as_deref(), Some("PONG"));
}

/// A flag, and an `AMB_*` variable, win over the config file's value for the same key. Each
/// file names a dead upstream or peer and QUIC: the pair answers only if the flags' upstream
/// and peer and the variables' transport (TLS) were taken.
#[test]
fn flags_and_variables_win_over_the_config_file() {
    let dir = TempDir::new("cli-over-file");
    let certs = dir.0.join("certs");
    let certs = certs.to_str().unwrap();
    let (ok, err) = run(&["certs", "init", "--dir", certs]);
    assert!(ok, "{err}");
    let redis = Redis::start();
    let dead = free_port();
    let server_file = dir.0.join("server.toml");
    std::fs::write(
        &server_file,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntransport = \"quic\"\ncerts-dir = \"{certs}\"\n\
             upstream = \"127.0.0.1:{dead}\"\n"
        ),
    )
    .unwrap();
    let upstream = format!("127.0.0.1:{}", redis.port);
    let server = Amb::spawn_env(
        &[
            "server",
            "--config",
            server_file.to_str().unwrap(),
            "--upstream",
            &upstream,
        ],
        &[("AMB_TRANSPORT", "tls")],
    );
    let client_file = dir.0.join("client.toml");
    std::fs::write(
        &client_file,
        format!(
            "[client]\npeer = \"localhost:{dead}\"\ntransport = \"quic\"\ncerts-dir = \"{certs}\"\n\
             tunnel-wait = \"20s\"\n[[client.listen]]\nlisten = \"0\"\n"
        ),
    )
    .unwrap();
    let peer = format!("localhost:{}", server.server_addr().port());
    let client = Amb::spawn_env(
        &[
            "client",
            "--config",
            client_file.to_str().unwrap(),
            "--peer",
            &peer,
        ],
        &[("AMB_TRANSPORT", "tls")],
    );
    let port = client.listen_addr().port();
    assert_eq!(redis_cli(port, &["ping"]).as_deref(), Some("PONG"));
}

#[test]
fn completions_and_the_man_page_come_from_the_cli_definition() {
    let output = |args: &[&str]| {
        let out = Command::new(AMB).args(args).output().unwrap();
        assert!(out.status.success(), "amb {args:?} failed");
        String::from_utf8(out.stdout).unwrap()
    };
    for shell in ["bash", "zsh", "fish"] {
        let script = output(&["completions", shell]);
        assert!(
            script.contains("--peer"),
            "{shell}: no --peer in the script"
        );
    }
    let dir = TempDir::new("cli-completions");
    let bash = dir.0.join("amb.bash");
    std::fs::write(&bash, output(&["completions", "bash"])).unwrap();
    let syntax = Command::new("bash").arg("-n").arg(&bash).status().unwrap();
    assert!(
        syntax.success(),
        "the bash completion script does not parse"
    );
    let man = output(&["man"]);
    assert!(
        man.starts_with(".ie") || man.contains(".TH amb"),
        "not roff:\n{man}"
    );
    assert!(
        man.contains("completions"),
        "the man page lists the subcommands"
    );
}
