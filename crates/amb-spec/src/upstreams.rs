//! A route's upstreams: one or several, each with a weight, and how new connections are spread
//! over them.

use std::fmt;
use std::str::FromStr;

use crate::{Discovery, UpstreamSpec};

/// Implements `FromStr` and `Display` for a fieldless enum by its `NAMES` table; an unknown
/// name is `$error` of the text given.
macro_rules! by_name {
    ($type:ty, $error:ident) => {
        impl FromStr for $type {
            type Err = $error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                <$type>::NAMES
                    .iter()
                    .find(|(name, _)| *name == s)
                    .map(|(_, value)| *value)
                    .ok_or_else(|| $error(s.to_owned()))
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let name = <$type>::NAMES.iter().find(|(_, value)| value == self);
                f.write_str(name.map_or("", |(name, _)| *name))
            }
        }
    };
}

/// How a route spreads new connections over its healthy upstreams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Balance {
    /// The one with fewer connections (per weight) of two picked at random, weighted: spreads
    /// load without herding onto whichever looked idlest.
    #[default]
    LeastConn,
    /// Each in turn, as often as its weight says.
    RoundRobin,
    /// The first healthy one in the order written; new connections move back when an earlier
    /// one recovers.
    Failover,
}

impl Balance {
    const NAMES: [(&'static str, Balance); 3] = [
        ("least-conn", Balance::LeastConn),
        ("round-robin", Balance::RoundRobin),
        ("failover", Balance::Failover),
    ];
}

/// Why a balance mode is not one amb knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("balance {0:?}: write least-conn, round-robin or failover")]
pub struct BalanceError(String);

by_name!(Balance, BalanceError);

/// What an active health check asks of each upstream of a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HealthCheckKind {
    /// A TCP (or Unix socket) connection is accepted.
    Tcp,
    /// Redis answers `PING` with `+PONG`.
    Redis,
    /// Redis answers `PING`, and `ROLE` says `master`: a route over a primary and its replicas
    /// follows a promotion.
    RedisMaster,
}

impl HealthCheckKind {
    const NAMES: [(&'static str, HealthCheckKind); 3] = [
        ("tcp", HealthCheckKind::Tcp),
        ("redis", HealthCheckKind::Redis),
        ("redis-master", HealthCheckKind::RedisMaster),
    ];
}

/// Why a health check kind is not one amb knows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("health check {0:?}: write tcp, redis or redis-master")]
pub struct HealthCheckKindError(String);

by_name!(HealthCheckKind, HealthCheckKindError);

/// The PROXY protocol header a route sends first on each upstream connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProxyProtocol {
    /// Version 2 (binary), with the peer's identity in a TLV.
    V2,
}

impl ProxyProtocol {
    const NAMES: [(&'static str, ProxyProtocol); 1] = [("v2", ProxyProtocol::V2)];
}

/// Why a PROXY protocol version is not one amb sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("proxy-protocol {0:?}: write v2")]
pub struct ProxyProtocolError(String);

by_name!(ProxyProtocol, ProxyProtocolError);

/// An active health check: what to ask, and how often.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HealthCheck {
    /// What to ask.
    pub kind: HealthCheckKind,
    /// How often; each check must be answered within it.
    pub interval: std::time::Duration,
}

/// The interval of a health check when none is given.
pub const DEFAULT_HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// A secret (a password): compared like any value, never shown (`Debug` and `Display` print
/// `***`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(String);

impl Secret {
    /// Wraps `secret`.
    pub fn new(secret: String) -> Self {
        Secret(secret)
    }

    /// The secret itself, to send where it belongs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Credentials the server ambassador gives a Redis upstream (`AUTH`) on each new connection,
/// before the app's bytes: the app connects with none.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RedisAuth {
    /// The ACL user; `None` for `requirepass`.
    pub user: Option<String>,
    /// The password, as read at the last (re)load.
    pub password: Secret,
}

/// TLS to a route's upstreams (`upstream-tls`): each upstream connection is a TLS connection
/// whose certificate must chain to `ca` and name `server_name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamTls {
    /// PEM CA certificate(s) the upstream's certificate must chain to.
    pub ca: std::path::PathBuf,
    /// The name (DNS or IP) its certificate must carry; `None`: each upstream's host as
    /// written.
    pub server_name: Option<String>,
    /// A client certificate and its key, for an upstream that asks for one.
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// A digest of the files' contents at the last (re)load: a reload after they changed
    /// builds the route again.
    pub digest: [u8; 32],
}

/// Most upstreams a route may have.
pub const MAX_UPSTREAMS: usize = 64;

/// Largest weight an upstream may have.
pub const MAX_WEIGHT: u32 = 1000;

/// One upstream of a route and its weight: `HOST:PORT`, `unix:PATH`, either followed by
/// ` weight=N` (1 to 1000; 1 when not given).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WeightedUpstream {
    /// Where it is.
    pub upstream: UpstreamSpec,
    /// Its share of new connections, relative to the route's other upstreams.
    pub weight: u32,
}

/// Why an upstream entry is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamsError {
    /// An upstream address is malformed.
    #[error(transparent)]
    Upstream(#[from] crate::UpstreamSpecError),
    /// A weight is malformed or out of range.
    #[error("{0:?}: write UPSTREAM or UPSTREAM weight=N with N from 1 to {MAX_WEIGHT}")]
    Weight(String),
    /// No upstream at all.
    #[error("no upstream given")]
    Empty,
    /// More upstreams than a route may have.
    #[error("{0} upstreams: a route may have at most {MAX_UPSTREAMS}")]
    TooMany(usize),
    /// An upstream appears twice.
    #[error("upstream {0} is given twice (give it a weight instead)")]
    Duplicate(String),
    /// A discovered set among other upstreams.
    #[error("{0} stands alone: a route's upstreams are either listed or discovered")]
    DiscoveryNotAlone(String),
    /// A malformed discovery name.
    #[error(transparent)]
    Discovery(#[from] crate::DiscoveryError),
}

impl FromStr for WeightedUpstream {
    type Err = UpstreamsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (upstream, weight) = match s.split_once(char::is_whitespace) {
            None => (s, 1),
            Some((upstream, rest)) => {
                let weight = rest
                    .trim()
                    .strip_prefix("weight=")
                    .and_then(|w| w.parse::<u32>().ok())
                    .filter(|w| (1..=MAX_WEIGHT).contains(w))
                    .ok_or_else(|| UpstreamsError::Weight(s.to_owned()))?;
                (upstream, weight)
            }
        };
        Ok(WeightedUpstream {
            upstream: upstream.parse()?,
            weight,
        })
    }
}

impl fmt::Display for WeightedUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.weight {
            1 => self.upstream.fmt(f),
            weight => write!(f, "{} weight={weight}", self.upstream),
        }
    }
}

/// Everything a route says about where its streams go: its upstreams (at least one, none
/// twice) and how new connections are spread over them. Plain data, compared by what was
/// written: a reload keeps a route whose set is equal as it runs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamSetSpec {
    /// Listed members; empty when discovered.
    members: Vec<WeightedUpstream>,
    /// Where the members are discovered, instead of listed.
    discovered: Option<Discovery>,
    /// How new connections are spread.
    pub balance: Balance,
    /// The active health check, if any.
    pub health: Option<HealthCheck>,
    /// Credentials to give each new upstream connection, if any.
    pub redis_auth: Option<RedisAuth>,
    /// TLS to the upstreams, if they speak it.
    pub tls: Option<UpstreamTls>,
    /// The PROXY protocol header sent first on each upstream connection, if any.
    pub proxy_protocol: Option<ProxyProtocol>,
}

impl UpstreamSetSpec {
    /// A set of `members` (in the order given, which `failover` follows).
    pub fn new(members: Vec<WeightedUpstream>, balance: Balance) -> Result<Self, UpstreamsError> {
        if members.is_empty() {
            return Err(UpstreamsError::Empty);
        }
        if members.len() > MAX_UPSTREAMS {
            return Err(UpstreamsError::TooMany(members.len()));
        }
        for (i, member) in members.iter().enumerate() {
            if members[..i].iter().any(|m| m.upstream == member.upstream) {
                return Err(UpstreamsError::Duplicate(member.upstream.to_string()));
            }
        }
        Ok(UpstreamSetSpec {
            members,
            discovered: None,
            balance,
            health: None,
            redis_auth: None,
            tls: None,
            proxy_protocol: None,
        })
    }

    /// A set whose members `discovery` lists, as they change.
    pub fn discovered(discovery: Discovery, balance: Balance) -> Self {
        UpstreamSetSpec {
            members: Vec::new(),
            discovered: Some(discovery),
            balance,
            health: None,
            redis_auth: None,
            tls: None,
            proxy_protocol: None,
        }
    }

    /// A set of one.
    pub fn one(upstream: UpstreamSpec) -> Self {
        UpstreamSetSpec {
            members: vec![WeightedUpstream {
                upstream,
                weight: 1,
            }],
            discovered: None,
            balance: Balance::default(),
            health: None,
            redis_auth: None,
            tls: None,
            proxy_protocol: None,
        }
    }

    /// Its upstreams, in the order given (none when discovered).
    pub fn members(&self) -> &[WeightedUpstream] {
        &self.members
    }

    /// Where its members are discovered, if they are.
    pub fn discovery(&self) -> Option<&Discovery> {
        self.discovered.as_ref()
    }
}

/// A comma-separated list, as `--upstream` and `--route NAME=...` take it:
/// `10.0.0.1:6379,10.0.0.2:6379 weight=3`.
impl FromStr for UpstreamSetSpec {
    type Err = UpstreamsError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if Discovery::is_discovery(s) {
            return match s.parse::<Discovery>() {
                Ok(discovery) => Ok(UpstreamSetSpec::discovered(discovery, Balance::default())),
                Err(_) if s.starts_with("srv:") && s.contains(',') => {
                    Err(UpstreamsError::DiscoveryNotAlone(s.to_owned()))
                }
                Err(e) => Err(e.into()),
            };
        }
        let members = s
            .split(',')
            .map(str::parse)
            .collect::<Result<Vec<WeightedUpstream>, _>>()?;
        UpstreamSetSpec::new(members, Balance::default())
    }
}

impl fmt::Display for UpstreamSetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(discovery) = &self.discovered {
            discovery.fmt(f)?;
        }
        for (i, member) in self.members.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            member.fmt(f)?;
        }
        if (self.members.len() > 1 || self.discovered.is_some())
            && self.balance != Balance::default()
        {
            write!(f, " ({})", self.balance)?;
        }
        if let Some(check) = &self.health {
            write!(
                f,
                " (health check {} every {:?})",
                check.kind, check.interval
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_weights_and_balance_modes_parse_and_print_as_written() {
        let set: UpstreamSetSpec = "10.0.0.1:6379,redis-b:6379 weight=3,unix:/run/r.sock"
            .parse()
            .unwrap();
        let weights: Vec<u32> = set.members().iter().map(|m| m.weight).collect();
        assert_eq!(weights, [1, 3, 1]);
        assert_eq!(
            set.to_string(),
            "10.0.0.1:6379,redis-b:6379 weight=3,unix:/run/r.sock"
        );
        let srv: UpstreamSetSpec = "srv:_redis._tcp.example.internal".parse().unwrap();
        assert_eq!(
            srv.discovery(),
            Some(&Discovery::Srv("_redis._tcp.example.internal".into()))
        );
        assert_eq!(srv.to_string(), "srv:_redis._tcp.example.internal");
        let one: UpstreamSetSpec = "db:5432".parse().unwrap();
        assert_eq!(one, UpstreamSetSpec::one("db:5432".parse().unwrap()));
        for (text, balance) in [
            ("least-conn", Balance::LeastConn),
            ("round-robin", Balance::RoundRobin),
            ("failover", Balance::Failover),
        ] {
            assert_eq!(text.parse::<Balance>().unwrap(), balance);
            assert_eq!(balance.to_string(), text);
        }
        assert!("random".parse::<Balance>().is_err());
    }

    #[test]
    fn bad_lists_say_what_is_wrong() {
        let too_many: String = (1..=65).map(|p| format!("a:{p},")).collect();
        let too_many = too_many.trim_end_matches(',').to_owned();
        for (bad, says) in [
            ("", "is not HOST:PORT"),
            ("a:1,", "is not HOST:PORT"),
            ("a:1 weight=0", "weight=N"),
            ("a:1 weight=1001", "weight=N"),
            ("a:1 weight=x", "weight=N"),
            ("a:1 heavy", "weight=N"),
            ("a:1,b:2,a:1", "given twice"),
            ("a:1,srv:_r._tcp.x", "is not HOST:PORT"),
            ("srv:_r._tcp.x,a:1", "stands alone"),
            ("srv:_r _tcp", "write srv:NAME"),
            (&too_many, "at most 64"),
        ] {
            let err = bad.parse::<UpstreamSetSpec>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }
}
