//! Several upstreams per route, end to end with real redis-servers started and killed by the
//! tests: connections spread over the upstreams; one killed under load costs nothing but what
//! was live on it and rejoins when it is back; `failover` keeps to the first up; all down is
//! refused at once; `redis-master` health checks follow a promotion. Each app connection runs
//! `INCR hits`, so every redis counts the connections that reached it (and a replica refuses
//! it). Tunnel cases run over QUIC and over TLS.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use support::*;

per_transport!(
    connections_spread_and_a_killed_upstream_costs_only_what_was_on_it,
    failover_keeps_to_the_first_upstream_up_and_returns_to_it,
    every_upstream_down_is_refused_at_once_as_no_healthy_upstream,
    redis_master_checks_follow_a_promotion,
    round_robin_takes_turns_by_weight,
);

/// A loop of fresh app connections in the background, counting those that failed.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<usize>,
}

impl Load {
    fn start(listen: SocketAddr) -> Self {
        let (stop, done) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (stopping, counting) = (stop.clone(), done.clone());
        let task = tokio::spawn(async move {
            let mut failed = 0;
            while !stopping.load(Ordering::Relaxed) {
                if !incr(listen).await {
                    failed += 1;
                }
                counting.fetch_add(1, Ordering::Relaxed);
            }
            failed
        });
        Load { stop, done, task }
    }

    /// Waits until `n` more connections were made.
    async fn run_for(&self, n: usize) {
        let target = self.done.load(Ordering::Relaxed) + n;
        yield_until("the load to make its connections", || {
            self.done.load(Ordering::Relaxed) >= target
        })
        .await;
    }

    /// Stops; returns (connections made, failed).
    async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        let failed = self.task.await.unwrap();
        (self.done.load(Ordering::Relaxed), failed)
    }
}

/// A server over `upstreams` (one route) and a client; the PKI lives as long as they do.
fn pair(t: Transport, upstreams: &[&Redis], extra: &[&str]) -> (Pki, Amb, Amb) {
    let pki = Pki::new();
    let list: Vec<String> = upstreams
        .iter()
        .map(|r| format!("127.0.0.1:{}", r.port))
        .collect();
    let list = list.join(",");
    let mut flags = vec!["--upstream", &list];
    flags.extend(extra);
    let server = Amb::server(&pki, 0, &flags);
    let client = Amb::client(&pki, "client", server.server_addr(), t, &[]);
    client.wait_tunnel_up();
    (pki, server, client)
}

/// Makes fresh app connections, each of which must succeed, until `reached` holds (each check
/// after one connection); returns how many it made.
async fn until_reached(listen: SocketAddr, reached: impl Fn() -> bool) -> usize {
    let mut made = 0;
    while !reached() {
        assert!(incr(listen).await, "a fresh connection failed after {made}");
        made += 1;
        assert!(made < 100_000, "never reached");
    }
    made
}

async fn connections_spread_and_a_killed_upstream_costs_only_what_was_on_it(t: Transport) {
    let (a, b) = (Redis::start(), Redis::start());
    let a_port = a.port;
    let (_pki, server, client) = pair(t, &[&a, &b], &[]);
    let listen = client.listen_addr();
    for _ in 0..40 {
        assert!(incr(listen).await);
    }
    let (on_a, on_b) = (hits(&a), hits(&b));
    assert_eq!(on_a + on_b, 40);
    assert!(on_a >= 5 && on_b >= 5, "both used: {on_a} and {on_b}");

    // Kill one under a loop of fresh connections: nothing fails but what was live on it (at
    // most the one connection in flight).
    let load = Load::start(listen);
    load.run_for(20).await;
    drop(a);
    load.run_for(100).await;
    let (made, failed) = load.stop().await;
    assert!(failed <= 1, "{failed} of {made} fresh connections failed");
    server
        .log
        .wait_for(&["upstream marked down", &format!("127.0.0.1:{a_port}")]);

    // Back on its port: once its back-off ends, it gets connections again.
    let a = Redis::start_on(a_port);
    until_reached(listen, || hits(&a) > 0).await;
    server
        .log
        .wait_for(&["upstream up again", &format!("127.0.0.1:{a_port}")]);
}

async fn failover_keeps_to_the_first_upstream_up_and_returns_to_it(t: Transport) {
    let (a, b) = (Redis::start(), Redis::start());
    let a_port = a.port;
    let (_pki, _server, client) = pair(t, &[&a, &b], &["--balance", "failover"]);
    let listen = client.listen_addr();
    for _ in 0..10 {
        assert!(incr(listen).await);
    }
    assert_eq!((hits(&a), hits(&b)), (10, 0), "all on the first");

    drop(a);
    for _ in 0..10 {
        assert!(incr(listen).await, "moved to the second at once");
    }
    assert_eq!(hits(&b), 10);

    let a = Redis::start_on(a_port);
    until_reached(listen, || hits(&a) > 0).await;
    let before = hits(&b);
    for _ in 0..10 {
        assert!(incr(listen).await);
    }
    assert_eq!(hits(&b), before, "all back on the first");
}

async fn every_upstream_down_is_refused_at_once_as_no_healthy_upstream(t: Transport) {
    let (a, b) = (Redis::start(), Redis::start());
    let (_pki, server, client) = pair(t, &[&a, &b], &[]);
    let listen = client.listen_addr();
    assert!(incr(listen).await);
    drop((a, b));
    // The first connection finds both refusing (502); the next, both marked down (503).
    assert_reset_after_write(listen, b"*1\r\n$4\r\nPING\r\n").await;
    assert_reset_after_write(listen, b"*1\r\n$4\r\nPING\r\n").await;
    server
        .log
        .wait_for(&["stream refused", "no healthy upstream"]);
    client
        .log
        .wait_for(&["refused by server: no healthy upstream"]);
}

async fn redis_master_checks_follow_a_promotion(t: Transport) {
    let primary = Redis::start();
    let replica = Redis::start_with(&["--replicaof", "127.0.0.1", &primary.port.to_string()]);
    let (p, r) = (primary.port.to_string(), replica.port.to_string());
    let flags = [
        "--health-check",
        "redis-master",
        "--health-interval",
        "200ms",
    ];
    // The replica first: only the check keeps writes off it.
    let (_pki, server, client) = pair(t, &[&replica, &primary], &flags);
    let listen = client.listen_addr();
    server.log.wait_for(&["upstream health", "→ up", &p]);
    for _ in 0..10 {
        assert!(incr(listen).await, "a write reached a replica");
    }

    // Promote the replica, demote the primary: new connections follow within an interval.
    assert_eq!(
        redis_cli(replica.port, &["replicaof", "no", "one"]).as_deref(),
        Some("OK")
    );
    assert_eq!(
        redis_cli(primary.port, &["replicaof", "127.0.0.1", &r]).as_deref(),
        Some("OK")
    );
    server
        .log
        .wait_for(&["upstream health: up → down", "ROLE says slave", &p]);
    server.log.wait_for(&["upstream health: down → up", &r]);
    let before = hits(&replica);
    for _ in 0..10 {
        assert!(incr(listen).await, "a write reached the demoted primary");
    }
    assert_eq!(hits(&replica), before + 10, "every write on the new master");
}

/// `round-robin` takes the upstreams in turn, each as many times as its weight says: over
/// weights 1 and 3, forty connections one after another land exactly 10 and 30.
async fn round_robin_takes_turns_by_weight(t: Transport) {
    let (a, b) = (Redis::start(), Redis::start());
    let pki = Pki::new();
    let list = format!(
        "127.0.0.1:{} weight=1,127.0.0.1:{} weight=3",
        a.port, b.port
    );
    let server = Amb::server(&pki, 0, &["--upstream", &list, "--balance", "round-robin"]);
    let client = Amb::client(&pki, "client", server.server_addr(), t, &[]);
    client.wait_tunnel_up();
    let listen = client.listen_addr();
    for _ in 0..40 {
        assert!(incr(listen).await);
    }
    assert_eq!((hits(&a), hits(&b)), (10, 30));
}
