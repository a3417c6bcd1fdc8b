//! Credential injection, end to end with a real `redis-server --requirepass` that also has an
//! ACL user: apps connect with no AUTH of their own; the server ambassador authenticates each
//! upstream connection with the password from a file or an environment variable; a wrong one
//! refuses the stream with the reason; health checks authenticate too; no secret reaches a log
//! line; a secret file others can read stops the start. Over QUIC and over TLS.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use support::*;

per_transport!(
    apps_reach_a_password_protected_redis_without_a_password,
    a_rotated_password_file_applies_to_new_connections_without_a_signal,
);

const PASSWORD: &str = "requirepass-Secret-7f3a";
const APP_PASSWORD: &str = "acl-Secret-91c2";
const WRONG: &str = "wrong-Secret-44d0";

fn secret_file(pki: &Pki, name: &str, secret: &str, mode: u32) -> String {
    let path = pki.path(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path.display().to_string()
}

async fn apps_reach_a_password_protected_redis_without_a_password(t: Transport) {
    let acl_user = format!(">{APP_PASSWORD}");
    let redis = Redis::start_with(&[
        "--requirepass",
        PASSWORD,
        "--user",
        "app",
        "on",
        &acl_user,
        "~*",
        "&*",
        "+@all",
    ]);
    let pki = Pki::new();
    let (good, wrong) = (
        secret_file(&pki, "redis-password", PASSWORD, 0o600),
        secret_file(&pki, "wrong-password", WRONG, 0o600),
    );
    let route = |name: &str, auth: &str| {
        format!(
            "\n[[server.route]]\nname = \"{name}\"\nupstream = \"127.0.0.1:{}\"\nredis-auth = {{ {auth} }}\n",
            redis.port
        )
    };
    let server_part = |good: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
            pki.path("ca.pem").display()
        ) + &route("secret", &format!("password-file = \"{good}\""))
            + "health-check = \"redis\"\nhealth-interval = \"200ms\"\n"
            + &route(
                "acl",
                "user = \"app\", password-env = \"APP_REDIS_PASSWORD\"",
            )
            + &route("wrong", &format!("password-file = \"{wrong}\""))
    };
    let config = pki.path("amb.toml");
    std::fs::write(&config, server_part(&good)).unwrap();
    let path = config.display().to_string();
    let server = Amb::spawn_env(
        &["server", "--config", &path],
        &[("APP_REDIS_PASSWORD", APP_PASSWORD)],
    );
    let listens = [
        "--listen", "0=secret", "--listen", "0=acl", "--listen", "0=wrong",
    ];
    let client = Amb::client(&pki, "client", server.server_addr(), t, &listens);
    client.wait_tunnel_up();

    // The health check authenticates too (a PING without AUTH is answered NOAUTH).
    server
        .log
        .wait_for(&["upstream health: unchecked → up", "route=secret"]);

    // The app sends no AUTH of its own.
    let secret = client.listen_addr_for("secret");
    assert_eq!(
        resp_call(secret, &["INCR", "hits"]).await.unwrap(),
        ":1\r\n"
    );
    let acl = client.listen_addr_for("acl");
    assert_eq!(
        resp_call(acl, &["ACL", "WHOAMI"]).await.unwrap(),
        "$3\r\napp\r\n"
    );

    // A wrong password: the stream is refused, with the reason on both sides.
    assert_reset_after_write(client.listen_addr_for("wrong"), b"*1\r\n$4\r\nPING\r\n").await;
    server
        .log
        .wait_for(&["stream refused", "upstream auth refused", "WRONGPASS"]);
    client
        .log
        .wait_for(&["refused by server: upstream auth refused"]);
    assert_eq!(
        redis_cli(
            redis.port,
            &["-a", PASSWORD, "--no-auth-warning", "get", "hits"]
        )
        .as_deref(),
        Some("1"),
        "only the app's INCR reached redis"
    );

    // No secret in any log line.
    for (side, log) in [("server", server.log.text()), ("client", client.log.text())] {
        for secret in [PASSWORD, APP_PASSWORD, WRONG] {
            assert!(!log.contains(secret), "the {side} logged a secret:\n{log}");
        }
    }

    // A password file others can read stops the start, before anything is bound.
    let open = secret_file(&pki, "open-password", PASSWORD, 0o644);
    std::fs::write(&config, server_part(&open)).unwrap();
    let out = Command::new(AMB)
        .args(["server", "--config", &path])
        .env("APP_REDIS_PASSWORD", APP_PASSWORD)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("readable by group or others") && stderr.contains("open-password"),
        "{stderr}"
    );
}

/// A password rotated in its file alone (the config file untouched, no SIGHUP) applies to new
/// connections once the server's check finds the file changed. The ACL user has the old and
/// the new password while the file is rotated, as a rotation runs: a loop of fresh connections
/// through it sees no failure, not even while the route is rebuilt (its `redis-master` check
/// starts from what the old route knew). Then the old password is taken away at Redis, and a
/// fresh connection still answers: the server uses the new one.
async fn a_rotated_password_file_applies_to_new_connections_without_a_signal(t: Transport) {
    const OLD: &str = "old-Secret-5b1e";
    const NEW: &str = "new-Secret-c83a";
    let (old_pass, new_pass) = (format!(">{OLD}"), format!(">{NEW}"));
    let redis = Redis::start_with(&[
        "--user", "app", "on", &old_pass, &new_pass, "~*", "&*", "+@all",
    ]);
    let pki = Pki::new();
    let file = secret_file(&pki, "redis-password", OLD, 0o600);
    let config = pki.path("amb.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\
             reload-check = \"100ms\"\n\n[[server.route]]\nname = \"redis\"\n\
             upstream = \"127.0.0.1:{}\"\nhealth-check = \"redis-master\"\nhealth-interval = \"1s\"\n\
             redis-auth = {{ user = \"app\", password-file = \"{file}\" }}\n",
            pki.path("server.pem").display(),
            pki.path("server.key").display(),
            pki.path("ca.pem").display(),
            redis.port,
        ),
    )
    .unwrap();
    let server = Amb::spawn_env(&["server", "--config", config.to_str().unwrap()], &[]);
    let client = Amb::client(
        &pki,
        "client",
        server.server_addr(),
        t,
        &["--listen", "0=redis"],
    );
    client.wait_tunnel_up();
    let listen = client.listen_addr_for("redis");
    server.log.wait_for(&["upstream health: unchecked → up"]);
    assert_eq!(resp_call(listen, &["PING"]).await.unwrap(), "+PONG\r\n");

    let (stop, tries, failures) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let fresh_connections = tokio::spawn({
        let (stop, tries, failures) = (stop.clone(), tries.clone(), failures.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                let answer = resp_call(listen, &["PING"]).await;
                tries.fetch_add(1, Ordering::Relaxed);
                if answer.as_deref().ok() != Some("+PONG\r\n") {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });

    // The rotation: a new file moved over the old one, as secret stores write them.
    let staged = secret_file(&pki, "redis-password.new", NEW, 0o600);
    std::fs::rename(&staged, &file).unwrap();
    server.log.wait_for(&["config file reloaded", "changes=1"]);
    let after_reload = tries.load(Ordering::Relaxed);
    while tries.load(Ordering::Relaxed) < after_reload + 20 {
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    fresh_connections.await.unwrap();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "fresh connections failed during the rotation ({} tried)",
        tries.load(Ordering::Relaxed)
    );

    // The old password taken away at Redis: the server sends the new one.
    let removed = redis_cli(redis.port, &["ACL", "SETUSER", "app", &format!("<{OLD}")]);
    assert_eq!(removed.as_deref(), Some("OK"));
    assert_eq!(resp_call(listen, &["PING"]).await.unwrap(), "+PONG\r\n");
    for secret in [OLD, NEW] {
        assert!(
            !server.log.text().contains(secret),
            "the server logged a secret"
        );
    }
}
