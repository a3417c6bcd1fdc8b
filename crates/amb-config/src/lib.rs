//! The config file: TOML with a `[server]` part, a `[client]` part, or both. Keys are the
//! flags' own names (`connect-timeout`, `certs-dir`), values are written as the flags take
//! them, and each is parsed by the same parser as its flag, so the file accepts exactly what the
//! command line does. Unknown keys, wrong types and duplicates are errors naming the file, the
//! line and the key; nothing here does I/O but reading the file.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use amb_proto::{AllowList, RouteName, San, WildcardError};
use amb_spec::{
    Balance, EtcdKey, HealthCheck, HealthCheckKind, ListenerSpec, PeerSpec, ProxyProtocol,
    UpstreamSetSpec, WeightedUpstream, DEFAULT_HEALTH_INTERVAL,
};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

/// A value written as text and parsed by its type's own parser (as its flag is).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed<T>(pub T);

impl<'de, T> Deserialize<'de> for Parsed<T>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(Parsed).map_err(de::Error::custom)
    }
}

/// A duration as written: `500ms`, `10s`, `2m`.
pub type Duration = Parsed<humantime::Duration>;

impl Parsed<humantime::Duration> {
    /// As a standard duration.
    pub fn get(&self) -> std::time::Duration {
        *self.0
    }
}

/// The transports a server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerTransport {
    /// UDP only.
    Quic,
    /// TCP only.
    Tls,
    /// Both, on the same port.
    Both,
}

/// The transport a client dials with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientTransport {
    /// QUIC over UDP.
    Quic,
    /// HTTP/2 over TLS 1.3.
    Tls,
    /// QUIC where it works, else TLS.
    Auto,
}

/// `access-log`: on or off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

/// The `[server]` part. (The certificate keys and bounds are spelled out in both parts: serde
/// cannot flatten a shared struct into one that denies unknown keys.)
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerFile {
    /// `listen`: the tunnel endpoint, ADDR:PORT.
    pub listen: Option<Parsed<SocketAddr>>,
    /// `peers`: app sides this server dials (reverse tunnels), each HOST:PORT; with them, the
    /// server listens only if `listen` is given too.
    pub peers: Option<Vec<Parsed<PeerSpec>>>,
    /// `transport`.
    pub transport: Option<ServerTransport>,
    /// `upstream`: the route named `default`, as `--upstream` (one, or several separated by
    /// commas).
    pub upstream: Option<Parsed<UpstreamSetSpec>>,
    /// `balance`: how routes without a `balance` of their own spread new connections.
    pub balance: Option<Parsed<Balance>>,
    /// `health-check`: the active check of routes without one of their own.
    pub health_check: Option<Parsed<HealthCheckKind>>,
    /// `health-interval`: how often those checks run.
    pub health_interval: Option<Duration>,
    /// `allow`: the server-wide allow-list.
    pub allow: Option<Spanned<Vec<Parsed<San>>>>,
    /// `connect-timeout`.
    pub connect_timeout: Option<Duration>,
    /// `tls-route`: the route a standard TLS client is served when its SNI names none.
    pub tls_route: Option<Parsed<RouteName>>,
    /// `register`: the etcd key (`etcd://HOST:PORT/PREFIX/NAME`) the server registers at.
    pub register: Option<Parsed<EtcdKey>>,
    /// `advertise`: the address it registers, HOST:PORT.
    pub advertise: Option<String>,
    /// `dns-server`: where names and SRV records are looked up, ADDR:PORT.
    pub dns_server: Option<Parsed<SocketAddr>>,
    /// `etcd-ca`: the CA an `etcds://` registry's certificate chains to.
    pub etcd_ca: Option<PathBuf>,
    /// `etcd-cert`: a client certificate for an `etcds://` registry.
    pub etcd_cert: Option<PathBuf>,
    /// `etcd-key`: its key.
    pub etcd_key: Option<PathBuf>,
    /// `certs-dir`.
    pub certs_dir: Option<PathBuf>,
    /// `cert`.
    pub cert: Option<PathBuf>,
    /// `key`.
    pub key: Option<PathBuf>,
    /// `ca`.
    pub ca: Option<PathBuf>,
    /// `reload-check`.
    pub reload_check: Option<Duration>,
    /// `idle-timeout`.
    pub idle_timeout: Option<Duration>,
    /// `handshake-timeout`.
    pub handshake_timeout: Option<Duration>,
    /// `max-streams`.
    pub max_streams: Option<u32>,
    /// `drain-timeout`.
    pub drain_timeout: Option<Duration>,
    /// `max-connections`.
    pub max_connections: Option<usize>,
    /// `metrics`: where `/metrics`, `/healthz` and `/readyz` are served, ADDR:PORT.
    pub metrics: Option<Parsed<SocketAddr>>,
    /// `access-log`: one line per app connection when it ends.
    pub access_log: Option<Switch>,
    /// `[[server.route]]` tables.
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteFile>,
}

/// One `[[server.route]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RouteFile {
    /// `name`: what clients ask for.
    pub name: Spanned<Parsed<RouteName>>,
    /// `upstream`: one upstream, or several separated by commas.
    pub upstream: Option<Parsed<UpstreamSetSpec>>,
    /// `upstreams`: the upstreams as a list, each `HOST:PORT` or `unix:PATH`, optionally followed
    /// by ` weight=N`.
    pub upstreams: Option<Vec<Parsed<WeightedUpstream>>>,
    /// `balance`: how new connections are spread over the upstreams.
    pub balance: Option<Parsed<Balance>>,
    /// `health-check`: `tcp`, `redis` or `redis-master`, checked every `health-interval`.
    pub health_check: Option<Parsed<HealthCheckKind>>,
    /// `health-interval`.
    pub health_interval: Option<Duration>,
    /// `redis-auth`: credentials the server gives each new upstream connection.
    pub redis_auth: Option<Spanned<RedisAuthFile>>,
    /// `upstream-tls`: TLS to the upstreams, verified against a CA.
    pub upstream_tls: Option<Spanned<UpstreamTlsFile>>,
    /// `proxy-protocol`: `v2` sends a PROXY protocol v2 header on each upstream connection.
    pub proxy_protocol: Option<Parsed<ProxyProtocol>>,
    /// `allow`: this route's own allow-list.
    pub allow: Option<Spanned<Vec<Parsed<San>>>>,
}

/// The `[client]` part.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ClientFile {
    /// `peer`: the server every listener without a peer of its own dials.
    pub peer: Option<Parsed<PeerSpec>>,
    /// `peers`: several such servers (with `peer`, if given, first).
    pub peers: Option<Vec<Parsed<PeerSpec>>>,
    /// `peer-balance`: how new app connections are spread over several peers.
    pub peer_balance: Option<Parsed<Balance>>,
    /// `accept`: where service-side ambassadors connect in (reverse tunnels), ADDR:PORT; the
    /// listeners without a peer of their own carry over them.
    pub accept: Option<Parsed<SocketAddr>>,
    /// `allow`: the service-side identities `accept` takes in (required with it).
    pub allow: Option<Spanned<Vec<Parsed<San>>>>,
    /// `tls-upstream`: client-only mode, each app connection its own TLS connection to this
    /// service (or these, separated by commas); no peer then.
    pub tls_upstream: Option<Parsed<UpstreamSetSpec>>,
    /// `transport`.
    pub transport: Option<ClientTransport>,
    /// `server-name`.
    pub server_name: Option<String>,
    /// `dns-server`: where names and SRV records are looked up, ADDR:PORT.
    pub dns_server: Option<Parsed<SocketAddr>>,
    /// `etcd-ca`: the CA an `etcds://` registry's certificate chains to.
    pub etcd_ca: Option<PathBuf>,
    /// `etcd-cert`: a client certificate for an `etcds://` registry.
    pub etcd_cert: Option<PathBuf>,
    /// `etcd-key`: its key.
    pub etcd_key: Option<PathBuf>,
    /// `connections`.
    pub connections: Option<usize>,
    /// `tunnel-wait`.
    pub tunnel_wait: Option<Duration>,
    /// `certs-dir`.
    pub certs_dir: Option<PathBuf>,
    /// `cert`.
    pub cert: Option<PathBuf>,
    /// `key`.
    pub key: Option<PathBuf>,
    /// `ca`.
    pub ca: Option<PathBuf>,
    /// `reload-check`.
    pub reload_check: Option<Duration>,
    /// `idle-timeout`.
    pub idle_timeout: Option<Duration>,
    /// `handshake-timeout`.
    pub handshake_timeout: Option<Duration>,
    /// `max-streams`.
    pub max_streams: Option<u32>,
    /// `drain-timeout`.
    pub drain_timeout: Option<Duration>,
    /// `max-connections`.
    pub max_connections: Option<usize>,
    /// `metrics`: where `/metrics`, `/healthz` and `/readyz` are served, ADDR:PORT.
    pub metrics: Option<Parsed<SocketAddr>>,
    /// `access-log`: one line per app connection when it ends.
    pub access_log: Option<Switch>,
    /// `[[client.listen]]` tables.
    #[serde(default, rename = "listen")]
    pub listeners: Vec<ListenerFile>,
}

/// One `[[client.listen]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ListenerFile {
    /// `listen`: `[ADDR:]PORT`, loopback when no address (as `--listen`).
    pub listen: Spanned<String>,
    /// `route`: default `default`.
    pub route: Option<Parsed<RouteName>>,
    /// `peer`: a server of its own.
    pub peer: Option<Parsed<PeerSpec>>,
    /// `peers`: several servers of its own (with `peer`, if given, first).
    pub peers: Option<Vec<Parsed<PeerSpec>>>,
}

/// A whole config file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[server]`.
    pub server: Option<ServerFile>,
    /// `[client]`.
    pub client: Option<ClientFile>,
}

/// A config file that cannot be used; the message names the file, and the line and key where
/// there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid here: a syntax error, an unknown key, a wrong value, a duplicate.
    #[error("{path}:{line}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line (1-based); 0 when the problem is the file as a whole.
        line: usize,
        /// What is wrong, naming the key.
        message: String,
    },
}

impl ConfigFile {
    /// The files a reload of this file reads again for its routes, beside the file itself:
    /// each route's password file and upstream TLS files, and client-only mode's TLS files. A change to one of them is a
    /// change of the configuration (a rotated secret applies to new connections).
    pub fn route_files(&self) -> Vec<PathBuf> {
        let routes = self.server.iter().flat_map(|s| &s.routes);
        let mut files = Vec::new();
        for route in routes {
            let auth = route.redis_auth.as_ref().map(|a| a.get_ref());
            files.extend(auth.and_then(|a| a.password_file.clone()));
            if let Some(tls) = route.upstream_tls.as_ref().map(|t| t.get_ref()) {
                files.push(tls.ca.clone());
                files.extend(tls.cert.iter().chain(&tls.key).cloned());
            }
        }
        // Client-only mode's TLS files, read again at each reload.
        if let Some(client) = self.client.as_ref().filter(|c| c.tls_upstream.is_some()) {
            files.extend(
                client
                    .ca
                    .iter()
                    .chain(&client.cert)
                    .chain(&client.key)
                    .cloned(),
            );
        }
        files.sort();
        files.dedup();
        files
    }

    /// Reads, parses and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and checks `text`, the contents of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let invalid = |at: Option<usize>, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line: at.map_or(0, |offset| line_of(text, offset)),
            message,
        };
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|span| span.start);
            // The whole line, so the key is named even when the error points at its value.
            let context = at
                .map(|offset| {
                    let start = text[..offset].rfind('\n').map_or(0, |i| i + 1);
                    text[start..].lines().next().unwrap_or_default()
                })
                .filter(|l| !l.trim().is_empty())
                .map(|l| format!(" (at `{}`)", l.trim()))
                .unwrap_or_default();
            invalid(at, format!("{}{context}", e.message().trim()))
        })?;
        if let Some(server) = &file.server {
            let lists = server
                .allow
                .iter()
                .chain(server.routes.iter().flat_map(|r| &r.allow));
            for list in lists {
                if let Err(e) = allow_list(list) {
                    return Err(invalid(Some(list.span().start), format!("allow: {e}")));
                }
            }
            let mut seen = BTreeMap::new();
            if server.upstream.is_some() {
                seen.insert(RouteName::default_route(), 0);
            }
            for route in &server.routes {
                let name = &route.name.get_ref().0;
                if let Err(e) = route.upstream_set(&RouteDefaults::default()) {
                    return Err(invalid(
                        Some(route.name.span().start),
                        format!("route {name}: {e}"),
                    ));
                }
                if let Some(auth) = &route.redis_auth {
                    if let Err(e) = auth.get_ref().password_source() {
                        return Err(invalid(
                            Some(auth.span().start),
                            format!("route {name}: {e}"),
                        ));
                    }
                }
                if let Some(tls) = &route.upstream_tls {
                    if let Err(e) = tls.get_ref().identity() {
                        return Err(invalid(
                            Some(tls.span().start),
                            format!("route {name}: {e}"),
                        ));
                    }
                }
                if seen.insert(name.clone(), route.name.span().start).is_some() {
                    return Err(invalid(
                        Some(route.name.span().start),
                        format!("route {name} is given twice (note: `upstream` is the route named `default`)"),
                    ));
                }
            }
        }
        if let Some(client) = &file.client {
            let mut seen = BTreeMap::new();
            for listener in &client.listeners {
                let at = Some(listener.listen.span().start);
                let spec = listener
                    .spec()
                    .map_err(|e| invalid(at, format!("listen: {e}")))?;
                // Port 0 asks for any free port: two of them never collide.
                if spec.addr.port() != 0 && seen.insert(spec.addr, ()).is_some() {
                    return Err(invalid(at, format!("listen {} is given twice", spec.addr)));
                }
                let routes = file.server.as_ref().map(|s| s.route_names());
                if routes.is_some_and(|r| !r.contains(&spec.route)) {
                    return Err(invalid(
                        at,
                        format!(
                            "listen {} asks for route {}, which the [server] part of this file does not have",
                            spec.addr, spec.route
                        ),
                    ));
                }
            }
        }
        Ok(file)
    }
}

impl ServerFile {
    /// The names of the routes this part defines.
    pub fn route_names(&self) -> Vec<RouteName> {
        let default = self.upstream.as_ref().map(|_| RouteName::default_route());
        let named = self.routes.iter().map(|r| r.name.get_ref().0.clone());
        default.into_iter().chain(named).collect()
    }
}

impl RouteFile {
    /// The route's upstreams: from `upstream` or `upstreams` (exactly one of them), spread as
    /// its `balance` says and checked as its `health-check` says, else as `defaults` say.
    pub fn upstream_set(&self, defaults: &RouteDefaults) -> Result<UpstreamSetSpec, String> {
        let default_balance = defaults.balance;
        let mut set = match (&self.upstream, &self.upstreams) {
            (Some(one), None) => one.0.clone(),
            (None, Some(list)) => {
                let members = list.iter().map(|m| m.0.clone()).collect();
                UpstreamSetSpec::new(members, default_balance).map_err(|e| e.to_string())?
            }
            (None, None) => return Err("give `upstream` or `upstreams`".into()),
            (Some(_), Some(_)) => return Err("give `upstream` or `upstreams`, not both".into()),
        };
        set.balance = self.balance.as_ref().map_or(default_balance, |b| b.0);
        set.health = match (&self.health_check, &self.health_interval) {
            (Some(kind), interval) => Some(HealthCheck {
                kind: kind.0,
                interval: interval
                    .as_ref()
                    .map_or(DEFAULT_HEALTH_INTERVAL, Duration::get),
            }),
            (None, Some(_)) => return Err("`health-interval` without a `health-check`".into()),
            (None, None) => defaults.health,
        };
        set.proxy_protocol = self.proxy_protocol.as_ref().map(|p| p.0);
        Ok(set)
    }
}

/// `redis-auth = { user = "app", password-file = "/run/secrets/redis" }`: the password from a
/// file (mode 0600) or an environment variable (`password-env`), read by whoever builds the
/// settings (this crate reads only the config file).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RedisAuthFile {
    /// The ACL user; none for `requirepass`.
    pub user: Option<String>,
    /// The file holding the password.
    pub password_file: Option<PathBuf>,
    /// The environment variable holding the password.
    pub password_env: Option<String>,
}

/// `upstream-tls = { ca = "...", server-name = "...", cert = "...", key = "..." }`: TLS to a
/// route's upstreams; their certificate must chain to `ca` and name `server-name` (each
/// upstream's host when not given); `cert` and `key`, together, for an upstream that asks for
/// a client certificate.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UpstreamTlsFile {
    /// The CA file.
    pub ca: PathBuf,
    /// The name the upstream's certificate must carry.
    pub server_name: Option<String>,
    /// A client certificate chain.
    pub cert: Option<PathBuf>,
    /// Its key.
    pub key: Option<PathBuf>,
}

impl UpstreamTlsFile {
    /// The client certificate and key: both or neither.
    pub fn identity(&self) -> Result<Option<(&Path, &Path)>, String> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some((cert, key))),
            (None, None) => Ok(None),
            _ => Err("upstream-tls: give `cert` and `key` together (or neither)".into()),
        }
    }
}

/// Where a `redis-auth` password is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PasswordSource<'a> {
    /// In this file.
    File(&'a Path),
    /// In this environment variable.
    Env(&'a str),
}

impl RedisAuthFile {
    /// Where the password is: exactly one of `password-file` and `password-env`.
    pub fn password_source(&self) -> Result<PasswordSource<'_>, String> {
        match (&self.password_file, &self.password_env) {
            (Some(file), None) => Ok(PasswordSource::File(file)),
            (None, Some(env)) => Ok(PasswordSource::Env(env)),
            _ => Err("redis-auth: give `password-file` or `password-env` (one of them)".into()),
        }
    }
}

/// What a route takes from its part when it does not say: how to spread new connections and
/// how to check its upstreams.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteDefaults {
    /// The balance mode.
    pub balance: Balance,
    /// The active health check, if any.
    pub health: Option<HealthCheck>,
}

impl ListenerFile {
    /// The listener as a spec: the address as `--listen` reads it, the route, the peer.
    pub fn spec(&self) -> Result<ListenerSpec, String> {
        let mut spec: ListenerSpec = self.listen.get_ref().parse().map_err(|e| format!("{e}"))?;
        if let Some(route) = &self.route {
            spec.route = route.0.clone();
        }
        spec.peers = peer_list(&self.peer, &self.peers);
        Ok(spec)
    }
}

impl ClientFile {
    /// The servers of every listener without peers of its own: `peer`, then `peers`.
    pub fn peer_list(&self) -> Vec<PeerSpec> {
        peer_list(&self.peer, &self.peers)
    }
}

/// `peer` then `peers`, each once.
fn peer_list(
    one: &Option<Parsed<PeerSpec>>,
    many: &Option<Vec<Parsed<PeerSpec>>>,
) -> Vec<PeerSpec> {
    let mut list: Vec<PeerSpec> = Vec::new();
    for peer in one.iter().chain(many.iter().flatten()) {
        if !list.contains(&peer.0) {
            list.push(peer.0.clone());
        }
    }
    list
}

/// An `allow` value as the allow-list it stands for.
pub fn allow_list(list: &Spanned<Vec<Parsed<San>>>) -> Result<AllowList, WildcardError> {
    AllowList::new(list.get_ref().iter().map(|san| san.0.clone()).collect())
}

/// The 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests;
