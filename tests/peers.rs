//! Several peers per client, end to end: two `amb server`s, each in front of its own real
//! redis-server, one client with both as `--peer`. New app connections use both; when one
//! server goes away, every fresh connection succeeds on the other at once (none waits out a
//! long `--tunnel-wait`); `--peer-balance failover` keeps to the first. Each app connection runs
//! `INCR hits`, so each redis counts the connections its server carried. Over QUIC and TLS.

mod support;

use std::time::Duration;

use support::*;

per_transport!(
    connections_use_both_peers_and_move_to_the_other_at_once,
    peer_failover_keeps_to_the_first_peer_up,
);

/// Far longer than any fresh connection may take here: one that waited for a dead peer fails.
const TUNNEL_WAIT: &str = "60s";

/// Two servers, each before its own redis, and a client with both as peers.
struct Fleet {
    redis: [Redis; 2],
    servers: [Amb; 2],
    client: Amb,
    _pki: Pki,
}

impl Fleet {
    fn start(t: Transport, extra: &[&str]) -> Self {
        let pki = Pki::new();
        let redis = [Redis::start(), Redis::start()];
        let servers = [0, 1].map(|i| {
            let upstream = format!("127.0.0.1:{}", redis[i].port);
            Amb::server(&pki, 0, &["--upstream", &upstream])
        });
        let peers: Vec<String> = servers
            .iter()
            .map(|s| format!("localhost:{}", s.server_addr().port()))
            .collect();
        let mut flags = vec!["--peer", &peers[1], "--tunnel-wait", TUNNEL_WAIT];
        flags.extend(extra);
        // Amb::client gives the first server as --peer; the second is added here.
        let client = Amb::client(&pki, "client", servers[0].server_addr(), t, &flags);
        // Every tunnel connection to both, so that the first app connections see both up.
        client
            .log
            .wait_for_nth(&["tunnel connection up"], 2 * t.pool_size());
        Fleet {
            redis,
            servers,
            client,
            _pki: pki,
        }
    }

    /// Takes server `i` away: a crash (SIGKILL) over TLS, whose tunnel's TCP connection then
    /// ends at once; a shutdown over QUIC, whose crash a client notices only after its
    /// liveness deadline (tests/crash.rs), not at once.
    fn take_away(&mut self, t: Transport, i: usize) {
        let server = &mut self.servers[i];
        match t {
            Transport::Tls => server.signal("KILL"),
            Transport::Quic => server.signal("TERM"),
        }
        server.wait_exit(Duration::from_secs(20));
    }
}

async fn connections_use_both_peers_and_move_to_the_other_at_once(t: Transport) {
    let mut fleet = Fleet::start(t, &[]);
    let listen = fleet.client.listen_addr();
    for _ in 0..40 {
        assert!(incr(listen).await);
    }
    let (a, b) = (hits(&fleet.redis[0]), hits(&fleet.redis[1]));
    assert_eq!(a + b, 40);
    assert!(a >= 5 && b >= 5, "both peers used: {a} and {b}");

    fleet.take_away(t, 0);
    for i in 0..50 {
        assert!(
            incr(listen).await,
            "fresh connection {i} after the peer went away"
        );
    }
    assert_eq!(hits(&fleet.redis[1]), b + 50, "all on the other peer");
}

async fn peer_failover_keeps_to_the_first_peer_up(t: Transport) {
    let mut fleet = Fleet::start(t, &["--peer-balance", "failover"]);
    let listen = fleet.client.listen_addr();
    for _ in 0..10 {
        assert!(incr(listen).await);
    }
    assert_eq!((hits(&fleet.redis[0]), hits(&fleet.redis[1])), (10, 0));
    fleet.take_away(t, 0);
    for _ in 0..10 {
        assert!(incr(listen).await);
    }
    assert_eq!(hits(&fleet.redis[1]), 10, "the standby took over");
}
