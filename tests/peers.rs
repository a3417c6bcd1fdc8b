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
    peer_round_robin_takes_the_peers_in_turn,
    each_peer_is_verified_against_its_own_name,
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

    /// Takes server `i` away: a crash (SIGKILL). Over TLS its tunnel's TCP connection ends at
    /// once; over QUIC nothing tells the client, which takes the server for dead at its 2 s
    /// liveness deadline, and a fresh connection sent to it meanwhile is carried again on the
    /// other peer, its first bytes sent again.
    fn take_away(&mut self, i: usize) {
        let server = &mut self.servers[i];
        server.signal("KILL");
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

    fleet.take_away(0);
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
    fleet.take_away(0);
    for _ in 0..10 {
        assert!(incr(listen).await);
    }
    assert_eq!(hits(&fleet.redis[1]), 10, "the standby took over");
}

async fn peer_round_robin_takes_the_peers_in_turn(t: Transport) {
    let fleet = Fleet::start(t, &["--peer-balance", "round-robin"]);
    let listen = fleet.client.listen_addr();
    for _ in 0..40 {
        assert!(incr(listen).await);
    }
    assert_eq!((hits(&fleet.redis[0]), hits(&fleet.redis[1])), (20, 20));
}

/// Each peer is verified against its own host: one server's certificate names only
/// `localhost`, the other's only `127.0.0.1`, and the client dials them by those names. Both
/// are used; a server dialed by a name its certificate lacks is refused.
async fn each_peer_is_verified_against_its_own_name(t: Transport) {
    use amb_pki::{LeafRole, LeafSpec};
    use amb_proto::San;
    let pki = Pki::new();
    let only = |name: &str, san: San| {
        let mut spec = LeafSpec::server(&[], 30);
        spec.sans = vec![san];
        pki.write_leaf(name, &pki.ca.issue(&spec).unwrap());
        assert!(spec.usages.contains(&LeafRole::Server));
    };
    only("by-name", San::Dns("localhost".into()));
    only("by-ip", San::Ip([127, 0, 0, 1].into()));
    let redis = [Redis::start(), Redis::start()];
    let server = |leaf: &str, redis: &Redis| {
        let mut args: Vec<String> = ["server", "--listen", "127.0.0.1:0", "--upstream"]
            .map(String::from)
            .into();
        args.push(format!("127.0.0.1:{}", redis.port));
        args.extend(pki.cert_flags(leaf));
        Amb::spawn(&args)
    };
    let (by_name, by_ip) = (server("by-name", &redis[0]), server("by-ip", &redis[1]));
    let peers = [
        format!("localhost:{}", by_name.server_addr().port()),
        format!("127.0.0.1:{}", by_ip.server_addr().port()),
    ];
    let client = Amb::client(
        &pki,
        "client",
        by_name.server_addr(),
        t,
        &["--peer", &peers[1], "--peer-balance", "round-robin"],
    );
    client
        .log
        .wait_for_nth(&["tunnel connection up"], 2 * t.pool_size());
    let listen = client.listen_addr();
    for _ in 0..10 {
        assert!(incr(listen).await);
    }
    assert_eq!((hits(&redis[0]), hits(&redis[1])), (5, 5));

    // The same server dialed by the other name: its certificate does not cover it.
    let wrong = format!("127.0.0.1:{}", by_name.server_addr().port());
    let mut flags = vec!["client".to_owned(), "--listen".into(), "0".into()];
    flags.extend([
        "--peer".into(),
        wrong,
        "--transport".into(),
        t.flag().into(),
    ]);
    flags.extend(pki.cert_flags("client"));
    let refused = Amb::spawn(&flags);
    refused.log.wait_for(&["127.0.0.1", "not valid for name"]);
}
