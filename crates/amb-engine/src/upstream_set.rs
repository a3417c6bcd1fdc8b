//! A route's upstreams as they run. Each new app connection is given one: the pick follows the
//! route's balance mode over the members that are up ([`pick`], pure); a dial that is refused
//! or times out marks its member down for a back-off (1 s doubling to 30 s, reset by a good
//! dial) and the same app connection is dialed again at the next member, all within the
//! connect timeout. With every member down the stream is refused at once (503, no healthy
//! upstream). A route of one listed upstream keeps no passive health: each dial tries it.
//!
//! A route may also check its upstreams actively (`tcp`, `redis`: `PING` answered `+PONG`,
//! `redis-master`: also `ROLE` answered `master`), every interval, in a task that ends with the
//! set; a member that fails its check is out until it passes one, whatever its dials did.
//!
//! A discovered set (`srv:NAME`) takes its members from the discovery's latest answer: the
//! first dial after a change rebuilds the member list, keeping each member still listed (its
//! health, its open connections); priorities are honoured (the next only when all of the
//! lowest are down), weights within one.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use amb_metrics::{Metrics, RouteMetrics, Side, UpstreamHealth, UpstreamMetrics};
use amb_pki::ServiceTlsFiles;
use amb_proto::{Refusal, RouteName};
use amb_spec::{
    Balance, HealthCheck, HealthCheckKind, ProxyProtocol, RedisAuth, UpstreamSetSpec, UpstreamSpec,
    MAX_UPSTREAMS,
};
use arc_swap::ArcSwap;
use futures_util::future::join_all;
use rand::Rng;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use crate::endpoints::{
    discover, proxy_v2_header, Discovered, Located, Origin, Resolver, Role, TlsConnector,
    UpstreamStream,
};
use crate::upstream::{DialFailure, Upstream};

/// The first back-off after a failed dial; it doubles with each failure in a row.
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest back-off.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A route's upstreams, built from its spec; clones share their members' health.
#[derive(Clone)]
pub struct UpstreamSet(Arc<Inner>);

struct Inner {
    spec: UpstreamSetSpec,
    route: RouteName,
    members: ArcSwap<Vec<Arc<Member>>>,
    /// A discovered set's source, the resolver its targets are looked up by, and the dial
    /// counters they share (labelled by the discovery, not by targets that come and go).
    discovered: Option<(
        Mutex<watch::Receiver<Discovered>>,
        Resolver,
        UpstreamMetrics,
    )>,
    /// TLS to the upstreams, if the spec asks for it; why it cannot be made, if so.
    tls: Option<Result<TlsConnector, String>>,
    /// Round-robin's position.
    turn: AtomicUsize,
    /// The route's counters.
    metrics: RouteMetrics,
}

struct Member {
    upstream: Upstream,
    dials: UpstreamMetrics,
    weight: u32,
    /// Lower first (SRV); 0 for listed members.
    priority: u16,
    /// App connections on it now (least-conn's measure).
    open: AtomicUsize,
    health: Mutex<Health>,
    /// What the last active check found ([`CHECK_UNKNOWN`] before the first).
    checked: AtomicU8,
}

impl Member {
    fn new(upstream: Upstream, dials: UpstreamMetrics, weight: u32, priority: u16) -> Arc<Self> {
        Arc::new(Member {
            upstream,
            dials,
            weight,
            priority,
            open: AtomicUsize::new(0),
            health: Mutex::new(Health::default()),
            checked: AtomicU8::new(CHECK_UNKNOWN),
        })
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

const CHECK_UNKNOWN: u8 = 0;
const CHECK_UP: u8 = 1;
const CHECK_DOWN: u8 = 2;

/// One member's passive health.
#[derive(Clone, Copy, Debug, Default)]
struct Health {
    /// Down until then; up once it has passed (the next dial tries it again).
    down_until: Option<Instant>,
    /// The back-off of the last failure in a row.
    backoff: Duration,
}

/// What [`pick`] knows of a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its weight.
    pub weight: u32,
    /// Its priority: only the eligible members of the lowest are picked from.
    pub priority: u16,
    /// App connections on it.
    pub open: usize,
    /// Up, and not yet tried for this app connection.
    pub eligible: bool,
}

/// The weight an SRV record's weight stands for: a weight of 0 gets a very small share next
/// to any other (RFC 2782), and all of 0 share alike.
pub fn srv_weight(weight: u16) -> u32 {
    match weight {
        0 => 1,
        w => u32::from(w) * 100,
    }
}

/// The member a new app connection goes to, of `candidates` (in the order configured), or
/// `None` if none is eligible. `turn` is round-robin's counter; `random(n)` draws from `0..n`.
pub fn pick(
    balance: Balance,
    candidates: &[Candidate],
    turn: usize,
    mut random: impl FnMut(u64) -> u64,
) -> Option<usize> {
    let priority = candidates
        .iter()
        .filter(|c| c.eligible)
        .map(|c| c.priority)
        .min()?;
    let eligible = || {
        let picked = |c: &Candidate| c.eligible && c.priority == priority;
        candidates
            .iter()
            .enumerate()
            .filter(move |(_, c)| picked(c))
    };
    let total: u64 = eligible().map(|(_, c)| u64::from(c.weight)).sum();
    // The eligible member at `point` of the eligible weights laid end to end.
    let at = |point: u64| {
        let mut point = point;
        eligible().find_map(|(i, c)| match point.checked_sub(u64::from(c.weight)) {
            Some(rest) => {
                point = rest;
                None
            }
            None => Some(i),
        })
    };
    match balance {
        Balance::Failover => eligible().map(|(i, _)| i).next(),
        _ if total == 0 => None,
        Balance::RoundRobin => at(turn as u64 % total),
        Balance::LeastConn => {
            let (a, b) = (at(random(total))?, at(random(total))?);
            let (ca, cb) = (&candidates[a], &candidates[b]);
            // Fewer open connections per unit of weight (a.open / a.weight against
            // b.open / b.weight, cross-multiplied); a tie keeps the first draw.
            let a_load = ca.open as u128 * u128::from(cb.weight);
            let b_load = cb.open as u128 * u128::from(ca.weight);
            Some(if b_load < a_load { b } else { a })
        }
    }
}

/// A member in use by one app connection: counted as open on it while this lives.
pub struct Lease(Arc<Member>);

impl Lease {
    fn new(member: &Arc<Member>) -> Self {
        member.open.fetch_add(1, Ordering::Relaxed);
        Lease(member.clone())
    }

    /// The upstream dialed.
    pub fn upstream(&self) -> &UpstreamSpec {
        self.0.upstream.spec()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl UpstreamSet {
    /// The upstreams `spec` describes, for `route` (named in health log lines); names are
    /// looked up by `resolver`; connections and dials are counted in `metrics`, as the
    /// server's.
    pub fn new(
        route: &RouteName,
        spec: &UpstreamSetSpec,
        resolver: &Resolver,
        metrics: &Metrics,
    ) -> Self {
        Self::on_side(Side::Server, route, spec, resolver, metrics)
    }

    /// [`UpstreamSet::new`], its connections counted as `side`'s (a client in client-only
    /// mode dials TLS services itself).
    pub fn on_side(
        side: Side,
        route: &RouteName,
        spec: &UpstreamSetSpec,
        resolver: &Resolver,
        metrics: &Metrics,
    ) -> Self {
        let members = spec
            .members()
            .iter()
            .map(|m| {
                let dials = metrics.upstream(route.as_str(), &m.upstream.to_string());
                Member::new(Upstream::new(&m.upstream, resolver), dials, m.weight, 0)
            })
            .collect();
        let discovered = spec.discovery().map(|discovery| {
            let found = discover(discovery, Role::Upstream, resolver);
            let dials = metrics.upstream(route.as_str(), &discovery.to_string());
            (Mutex::new(found), resolver.clone(), dials)
        });
        let tls = spec.tls.as_ref().map(|tls| {
            let files = ServiceTlsFiles {
                ca: tls.ca.clone(),
                identity: tls.identity.clone(),
            };
            TlsConnector::new(&files, tls.server_name.as_deref()).inspect_err(
                |why| warn!(%route, "upstream TLS unusable: {why}; its streams are refused"),
            )
        });
        let set = UpstreamSet(Arc::new(Inner {
            spec: spec.clone(),
            route: route.clone(),
            members: ArcSwap::from_pointee(members),
            discovered,
            tls,
            turn: AtomicUsize::new(0),
            metrics: metrics.route(side, route.as_str()),
        }));
        if let Some(check) = spec.health {
            tokio::spawn(check_while_used(Arc::downgrade(&set.0), check));
        }
        set
    }

    /// Takes over what `previous` (the set this one replaces in a reload) knew of members
    /// both list: passive health, and what the last active check found when both check the
    /// same way. So a changed route (a rotated password, a member added) does not start with
    /// every member unchecked: a `redis-master` route is not left without a master, nor a
    /// member known down tried again, until the first check answers.
    pub fn carry_health_from(&self, previous: &UpstreamSet) {
        let same_check =
            self.0.spec.health.map(|c| c.kind) == previous.0.spec.health.map(|c| c.kind);
        let before = previous.0.members.load();
        for member in self.0.members.load().iter() {
            let spec = member.upstream.spec();
            let Some(old) = before.iter().find(|old| old.upstream.spec() == spec) else {
                continue;
            };
            *member.health() = *old.health();
            if same_check {
                // Unless this set's own first check has answered already.
                let checked = old.checked.load(Ordering::Relaxed);
                let (unknown, relaxed) = (CHECK_UNKNOWN, Ordering::Relaxed);
                let _ = member
                    .checked
                    .compare_exchange(unknown, checked, relaxed, relaxed);
            }
        }
    }

    /// What it was built from.
    pub fn spec(&self) -> &UpstreamSetSpec {
        &self.0.spec
    }

    /// The route's counters.
    pub fn metrics(&self) -> &RouteMetrics {
        &self.0.metrics
    }

    /// Reports each member's health: whether a new connection may go to it now.
    pub fn health(&self, out: &mut Vec<UpstreamHealth>) {
        let inner = &*self.0;
        let members = inner.members.load();
        let keeps_health = inner.keeps_health(&members);
        let now = Instant::now();
        out.extend(members.iter().map(|m| UpstreamHealth {
            route: inner.route.to_string(),
            upstream: m.upstream.to_string(),
            healthy: inner.is_up(m, keeps_health, now),
        }));
    }

    /// Connects one app connection (for `origin`, which a PROXY header tells): members in the
    /// order the balance mode picks, each that fails marked down, until one answers or
    /// `timeout` has passed.
    pub async fn dial(
        &self,
        timeout: Duration,
        origin: Option<&Origin<'_>>,
    ) -> Result<(UpstreamStream, Lease), DialFailure> {
        let inner = &*self.0;
        let deadline = Instant::now() + timeout;
        let members = self.members(deadline).await?;
        let keeps_health = inner.keeps_health(&members);
        // Bit i: member i was tried for this connection (a set has at most 64).
        let mut tried = 0u64;
        let mut failures: Vec<String> = Vec::new();
        let (mut all_timed_out, mut all_tls) = (true, true);
        loop {
            let now = Instant::now();
            let left = deadline.saturating_duration_since(now);
            let (picked, untried) = match &members[..] {
                // One upstream, the common route: nothing to pick or allocate.
                [one] if !keeps_health => {
                    ((tried == 0 && inner.is_up(one, false, now)).then_some(0), 1)
                }
                members => {
                    let candidates: Vec<Candidate> = members
                        .iter()
                        .enumerate()
                        .map(|(i, m)| Candidate {
                            weight: m.weight,
                            priority: m.priority,
                            open: m.open.load(Ordering::Relaxed),
                            eligible: tried & (1 << i) == 0 && inner.is_up(m, keeps_health, now),
                        })
                        .collect();
                    let turn = inner.turn.fetch_add(1, Ordering::Relaxed);
                    let picked = pick(inner.spec.balance, &candidates, turn, |n| {
                        rand::rng().random_range(0..n)
                    });
                    (
                        picked,
                        candidates.iter().filter(|c| c.eligible).count() as u32,
                    )
                }
            };
            let Some(index) = picked.filter(|_| !left.is_zero()) else {
                let tls = all_tls && !failures.is_empty();
                let mut refusal = inner.refusal(failures, all_timed_out);
                if tls {
                    refusal.reason = Some("upstream_tls");
                }
                return Err(refusal);
            };
            tried |= 1 << index;
            // The time left, shared among the members still to try, so one that does not
            // answer leaves the others theirs.
            let limit = left / untried.max(1);
            let member = &members[index];
            let lease = Lease::new(member);
            let dialing = Instant::now();
            // The PROXY header and TLS are part of reaching this member, within its share of
            // the time: one that fails them (a wrong certificate, a stalled handshake) is
            // marked down as a refused dial is, and the next one tried.
            let dialed = match member.upstream.dial(limit).await {
                Ok(stream) => {
                    let limit = limit.saturating_sub(dialing.elapsed());
                    let prepared = inner.prepare(stream, &member.upstream, origin, limit);
                    prepared.await.map_err(Unprepared::into_failure)
                }
                Err(failure) => Err(failure),
            };
            match &dialed {
                Ok(_) => member.dials.connected(dialing.elapsed()),
                Err(f) => member.dials.failed(f.refusal == Refusal::UpstreamTimeout),
            }
            match dialed {
                Ok(mut stream) => {
                    // Credentials fail for the route's settings, not the upstream's health: no
                    // other member is tried.
                    if let Some(auth) = &inner.spec.redis_auth {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if let Err(why) = authenticate(&mut stream, auth, left).await {
                            return Err(DialFailure {
                                reason: None,
                                refusal: Refusal::UpstreamAuth,
                                detail: format!(
                                    "{}: upstream auth refused: {why}",
                                    member.upstream
                                ),
                            });
                        }
                    }
                    if keeps_health {
                        inner.mark_up(member);
                    }
                    return Ok((stream, lease));
                }
                Err(failure) => {
                    drop(lease);
                    all_timed_out &= failure.refusal == Refusal::UpstreamTimeout;
                    all_tls &= failure.reason == Some("upstream_tls");
                    if keeps_health {
                        inner.mark_down(member, &failure);
                    }
                    failures.push(format!("{}: {}", member.upstream, failure.detail));
                }
            }
        }
    }

    /// The members a dial picks from: a listed set's; a discovered set's latest, rebuilt
    /// after a change, and for the first dials awaited (within `deadline`).
    async fn members(&self, deadline: Instant) -> Result<Arc<Vec<Arc<Member>>>, DialFailure> {
        let inner = &*self.0;
        let Some((found, _, _)) = &inner.discovered else {
            return Ok(inner.members.load_full());
        };
        let lock = || found.lock().unwrap_or_else(PoisonError::into_inner);
        let mut first = lock().clone();
        if first.borrow().is_none() {
            let answered = tokio::time::timeout_at(deadline, first.wait_for(Option::is_some));
            if !matches!(answered.await, Ok(Ok(_))) {
                return Err(DialFailure {
                    reason: None,
                    refusal: Refusal::NoHealthyUpstream,
                    detail: format!("{} has not answered yet", inner.spec),
                });
            }
        }
        inner.refresh();
        let members = inner.members.load_full();
        if members.is_empty() {
            let why = match &*lock().borrow() {
                Some(Err(why)) => why.clone(),
                _ => "no targets".to_owned(),
            };
            return Err(DialFailure {
                reason: None,
                refusal: Refusal::NoHealthyUpstream,
                detail: format!("{}: {why}", inner.spec),
            });
        }
        Ok(members)
    }
}

/// Why a connected upstream stream could not be readied: its TLS failed, or it did not take
/// the PROXY header; in time, or not.
struct Unprepared {
    tls: bool,
    timed_out: bool,
    why: String,
}

impl Unprepared {
    /// As a dial's failure: 504 if it ran out of time, else 502; `upstream_tls` for TLS.
    fn into_failure(self) -> DialFailure {
        DialFailure {
            reason: self.tls.then_some("upstream_tls"),
            refusal: match self.timed_out {
                true => Refusal::UpstreamTimeout,
                false => Refusal::UpstreamRefused,
            },
            detail: self.why,
        }
    }
}

impl Inner {
    /// `stream` readied for the app's bytes, within `limit`: the route's PROXY header for
    /// `origin` (LOCAL without one: the ambassador's own connection), then TLS, when the set's
    /// upstreams want them.
    async fn prepare(
        &self,
        mut stream: UpstreamStream,
        upstream: &Upstream,
        origin: Option<&Origin<'_>>,
        limit: Duration,
    ) -> Result<UpstreamStream, Unprepared> {
        if let Some(ProxyProtocol::V2) = self.spec.proxy_protocol {
            let refused = |timed_out, why| Unprepared {
                tls: false,
                timed_out,
                why,
            };
            // Never the app's bytes without the header: an upstream would parse them as one.
            let header = proxy_v2_header(origin).map_err(|e| refused(false, e))?;
            tokio::time::timeout(limit, stream.write_all(&header))
                .await
                .map_err(|_| refused(true, format!("PROXY header not taken within {limit:?}")))?
                .map_err(|e| refused(false, format!("sending the PROXY header: {e}")))?;
        }
        let Some(tls) = &self.tls else {
            return Ok(stream);
        };
        let failed = |timed_out, why| Unprepared {
            tls: true,
            timed_out,
            why,
        };
        let tls = tls
            .as_ref()
            .map_err(|why| failed(false, format!("upstream TLS unusable: {why}")))?;
        match tokio::time::timeout(limit, tls.connect(stream, upstream.spec())).await {
            Ok(connected) => connected.map_err(|why| failed(false, why)),
            Err(_) => Err(failed(true, format!("no TLS handshake within {limit:?}"))),
        }
    }

    /// Whether members have health (a route of one listed upstream has none: each dial tries
    /// it; a discovered one always has, its targets come and go).
    fn keeps_health(&self, members: &[Arc<Member>]) -> bool {
        self.discovered.is_some() || members.len() > 1
    }

    /// A discovered set: rebuilds the members if the discovery changed since they were built
    /// (the shared receiver marks the answer they were built from).
    fn refresh(&self) {
        if let Some((found, _, _)) = &self.discovered {
            let mut found = found.lock().unwrap_or_else(PoisonError::into_inner);
            if found.has_changed().unwrap_or(false) {
                found.borrow_and_update();
                self.follow_discovery(&found);
            }
        }
    }

    /// Rebuilds the members from the discovery's latest set: a target still listed keeps its
    /// member (health, open connections, looked-up addresses); at most [`MAX_UPSTREAMS`], the
    /// lowest priorities first.
    fn follow_discovery(&self, found: &watch::Receiver<Discovered>) {
        let Some((_, resolver, dials)) = &self.discovered else {
            return;
        };
        let Some(Ok(targets)) = found.borrow().clone() else {
            return;
        };
        let before = self.members.load();
        let route = &self.route;
        if targets.len() > MAX_UPSTREAMS {
            warn!(%route, discovered = targets.len(), "a route uses at most {MAX_UPSTREAMS} upstreams: the lowest priorities first");
        }
        let members = targets
            .iter()
            .take(MAX_UPSTREAMS)
            .filter_map(|target| {
                let Located {
                    host,
                    port,
                    priority,
                    weight,
                } = target;
                let spec: UpstreamSpec = format!("{host}:{port}").parse().ok()?;
                let weight = srv_weight(*weight);
                let kept = before.iter().find(|m| {
                    m.upstream.spec() == &spec && m.weight == weight && m.priority == *priority
                });
                Some(match kept {
                    Some(member) => member.clone(),
                    None => Member::new(
                        Upstream::new(&spec, resolver),
                        dials.clone(),
                        weight,
                        *priority,
                    ),
                })
            })
            .collect();
        self.members.store(Arc::new(members));
    }

    fn is_up(&self, member: &Member, keeps_health: bool, now: Instant) -> bool {
        let checked = match member.checked.load(Ordering::Relaxed) {
            CHECK_UP => true,
            CHECK_DOWN => false,
            // Before the first check: up, unless only a master may be used.
            _ => self.spec.health.map(|c| c.kind) != Some(HealthCheckKind::RedisMaster),
        };
        checked && (!keeps_health || member.health().down_until.is_none_or(|until| until <= now))
    }

    /// After a good dial: a member that was down is up again (one line).
    fn mark_up(&self, member: &Member) {
        let was_down = std::mem::take(&mut *member.health()).down_until.is_some();
        if was_down {
            let upstream = &member.upstream;
            info!(route = %self.route, %upstream, "upstream up again: a connection to it succeeded");
        }
    }

    /// After a failed dial: down for a back-off that doubles while it keeps failing (one line
    /// when it goes down).
    fn mark_down(&self, member: &Member, failure: &DialFailure) {
        let (was_down, backoff) = {
            let mut health = member.health();
            let was_down = health.down_until.is_some();
            health.backoff = match was_down {
                true => (health.backoff * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF),
                false => FIRST_BACKOFF,
            };
            health.down_until = Some(Instant::now() + health.backoff);
            (was_down, health.backoff)
        };
        let upstream = &member.upstream;
        if !was_down {
            warn!(route = %self.route, %upstream, retry_in = ?backoff, "upstream marked down: {}", failure.detail);
        }
    }

    /// Why no member could be dialed.
    fn refusal(&self, failures: Vec<String>, all_timed_out: bool) -> DialFailure {
        if failures.is_empty() {
            return DialFailure {
                reason: None,
                refusal: Refusal::NoHealthyUpstream,
                detail: format!(
                    "every upstream of the route is down ({}); each is tried again when its back-off ends",
                    self.spec
                ),
            };
        }
        DialFailure {
            reason: None,
            refusal: if all_timed_out {
                Refusal::UpstreamTimeout
            } else {
                Refusal::UpstreamRefused
            },
            detail: failures.join("; "),
        }
    }
}

/// Checks every member of a set each interval, for as long as the set is in use.
async fn check_while_used(set: Weak<Inner>, check: HealthCheck) {
    let mut ticks = tokio::time::interval(check.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = set.upgrade() else {
            return;
        };
        inner.refresh();
        let members = inner.members.load_full();
        let probes = members
            .iter()
            .map(|m| probe(&inner, &m.upstream, check.kind, check.interval));
        let results = join_all(probes).await;
        for (member, result) in members.iter().zip(results) {
            let now = if result.is_ok() { CHECK_UP } else { CHECK_DOWN };
            let before = member.checked.swap(now, Ordering::Relaxed);
            let (route, upstream) = (&inner.route, &member.upstream);
            let was = match before {
                CHECK_UP => "up",
                CHECK_DOWN => "down",
                _ => "unchecked",
            };
            match result {
                Ok(()) => {
                    // A check passed outweighs the dials that failed before it.
                    *member.health() = Health::default();
                    if before != CHECK_UP {
                        info!(%route, %upstream, check = %check.kind, "upstream health: {was} → up");
                    }
                }
                Err(why) if before != CHECK_DOWN => {
                    warn!(%route, %upstream, check = %check.kind, "upstream health: {was} → down: {why}");
                }
                Err(_) => {}
            }
        }
    }
}

/// One active check of `upstream`, over TLS and authenticated as the set's connections are,
/// answered within `limit`.
async fn probe(
    set: &Inner,
    upstream: &Upstream,
    kind: HealthCheckKind,
    limit: Duration,
) -> Result<(), String> {
    let checked = async {
        let stream = upstream.dial(limit).await.map_err(|f| f.detail)?;
        let prepared = set.prepare(stream, upstream, None, limit).await;
        let stream = prepared.map_err(|unprepared| unprepared.why)?;
        match kind {
            HealthCheckKind::Tcp => Ok(()),
            _ => ask_redis(stream, kind, set.spec.redis_auth.as_ref()).await,
        }
    };
    tokio::time::timeout(limit, checked)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
}

/// `PING`, and for [`HealthCheckKind::RedisMaster`] `ROLE`, over one connection.
async fn ask_redis(
    io: impl AsyncRead + AsyncWrite + Unpin,
    kind: HealthCheckKind,
    auth: Option<&RedisAuth>,
) -> Result<(), String> {
    let mut io = BufReader::new(io);
    if let Some(auth) = auth {
        let answer = redis_call(&mut io, &auth_command(auth)).await?;
        if answer != "+OK" {
            return Err(format!("AUTH answered {answer}"));
        }
    }
    let pong = redis_call(&mut io, b"*1\r\n$4\r\nPING\r\n").await?;
    if pong != "+PONG" {
        return Err(format!("PING answered {pong:?}, not +PONG"));
    }
    if kind == HealthCheckKind::RedisMaster {
        // ROLE answers an array whose first element is the role: *3, $6, master, ...
        let head = redis_call(&mut io, b"*1\r\n$4\r\nROLE\r\n").await?;
        if !head.starts_with('*') {
            return Err(format!("ROLE answered {head:?}"));
        }
        let _length = redis_line(&mut io).await?;
        let role = redis_line(&mut io).await?;
        if role != "master" {
            return Err(format!("ROLE says {role}, not master"));
        }
    }
    Ok(())
}

/// `AUTH [user] password` as a RESP array.
fn auth_command(auth: &RedisAuth) -> Vec<u8> {
    let mut args: Vec<&[u8]> = vec![b"AUTH"];
    if let Some(user) = &auth.user {
        args.push(user.as_bytes());
    }
    args.push(auth.password.expose().as_bytes());
    let mut command = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        command.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        command.extend_from_slice(arg);
        command.extend_from_slice(b"\r\n");
    }
    command
}

/// Gives a fresh upstream connection its credentials before the app's bytes: `AUTH`, and
/// `+OK` read to its end and no further, so that nothing of the app's stream is consumed.
/// Returns Redis's answer when it is not `+OK` (Redis never repeats the password).
async fn authenticate(
    stream: &mut UpstreamStream,
    auth: &RedisAuth,
    limit: Duration,
) -> Result<(), String> {
    tokio::time::timeout(limit, auth_exchange(stream, auth))
        .await
        .unwrap_or_else(|_| Err(format!("no answer to AUTH within {limit:?}")))
}

async fn auth_exchange(
    io: &mut (impl AsyncRead + AsyncWrite + Unpin),
    auth: &RedisAuth,
) -> Result<(), String> {
    io.write_all(&auth_command(auth))
        .await
        .map_err(|e| format!("sending AUTH: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = io
            .read(&mut buf)
            .await
            .map_err(|e| format!("reading AUTH's answer: {e}"))?;
        if n == 0 {
            return Err("the connection closed before AUTH's answer".into());
        }
        answer.extend_from_slice(&buf[..n]);
        if let Some(end) = answer.windows(2).position(|w| w == b"\r\n") {
            if end + 2 != answer.len() {
                return Err("more than AUTH's answer came back".into());
            }
            answer.truncate(end);
            break;
        }
        if answer.len() > buf.len() {
            return Err("AUTH's answer is over 512 bytes".into());
        }
    }
    match &answer[..] {
        b"+OK" => Ok(()),
        other => Err(String::from_utf8_lossy(other).into_owned()),
    }
}

/// Sends `command` and reads the first line of the answer.
async fn redis_call<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<IO>,
    command: &[u8],
) -> Result<String, String> {
    io.write_all(command)
        .await
        .map_err(|e| format!("sending: {e}"))?;
    redis_line(io).await
}

/// One line of a RESP answer, without its CRLF (at most 512 bytes).
async fn redis_line<IO: AsyncRead + Unpin>(io: &mut BufReader<IO>) -> Result<String, String> {
    let mut line = Vec::new();
    let read = (&mut *io).take(512).read_until(b'\n', &mut line).await;
    match read {
        Ok(0) => Err("the connection closed".into()),
        Ok(_) if line.ends_with(b"\r\n") => {
            line.truncate(line.len() - 2);
            Ok(String::from_utf8_lossy(&line).into_owned())
        }
        Ok(_) => Err("an answer line over 512 bytes or cut short".into()),
        Err(e) => Err(format!("reading: {e}")),
    }
}

impl std::fmt::Display for UpstreamSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.spec.fmt(f)
    }
}

impl std::fmt::Debug for UpstreamSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("UpstreamSet")
            .field(&self.0.spec.to_string())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(weight: u32, open: usize) -> Candidate {
        Candidate {
            weight,
            priority: 0,
            open,
            eligible: true,
        }
    }

    fn down(weight: u32) -> Candidate {
        Candidate {
            weight,
            priority: 0,
            open: 0,
            eligible: false,
        }
    }

    /// How many of `n` picks land on each member, drawing from a fixed sequence.
    fn spread(balance: Balance, candidates: &[Candidate], n: usize) -> Vec<usize> {
        let mut counts = vec![0; candidates.len()];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for turn in 0..n {
            let random = |bound: u64| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed % bound
            };
            counts[pick(balance, candidates, turn, random).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_follows_the_weights_and_skips_members_that_are_down() {
        assert_eq!(
            spread(Balance::RoundRobin, &[up(1, 0), up(3, 0)], 400),
            [100, 300]
        );
        assert_eq!(
            spread(Balance::RoundRobin, &[up(1, 0), down(1), up(1, 0)], 10),
            [5, 0, 5]
        );
    }

    #[test]
    fn the_lowest_priority_up_takes_everything_and_weights_share_within_it() {
        let at = |priority, c: Candidate| Candidate { priority, ..c };
        let srv = [
            at(10, up(srv_weight(1), 0)),
            at(10, up(srv_weight(3), 0)),
            at(20, up(srv_weight(9), 0)),
        ];
        for balance in [Balance::LeastConn, Balance::RoundRobin] {
            let counts = spread(balance, &srv, 4000);
            assert_eq!(counts[2], 0, "{balance}: {counts:?}");
            assert!((800..1200).contains(&counts[0]), "{balance}: {counts:?}");
        }
        // Only when all of the lowest are down does the next take over.
        let lowest_down = [at(10, down(100)), at(10, down(100)), at(20, up(100, 0))];
        assert_eq!(spread(Balance::LeastConn, &lowest_down, 10), [0, 0, 10]);
        // A weight of 0 gets a very small share beside any other.
        let zero = spread(
            Balance::RoundRobin,
            &[up(srv_weight(0), 0), up(srv_weight(1), 0)],
            1010,
        );
        assert_eq!(zero, [10, 1000]);
    }

    #[test]
    fn failover_takes_the_first_member_up_in_order() {
        assert_eq!(
            pick(Balance::Failover, &[up(1, 9), up(1, 0)], 0, |_| 0),
            Some(0)
        );
        assert_eq!(
            pick(Balance::Failover, &[down(1), up(1, 9)], 0, |_| 0),
            Some(1)
        );
        assert_eq!(pick(Balance::Failover, &[down(1), down(1)], 0, |_| 0), None);
    }

    #[test]
    fn least_conn_prefers_the_less_loaded_of_two_draws_per_weight() {
        // Draws 0 then 1: member 1 has fewer open connections.
        let mut draws = [0, 1].into_iter();
        let busy = [up(1, 5), up(1, 2)];
        assert_eq!(
            pick(Balance::LeastConn, &busy, 0, |_| draws.next().unwrap()),
            Some(1)
        );
        // Twice the weight carries twice the load at the same cost.
        let mut draws = [0, 1].into_iter();
        let weighted = [up(1, 3), up(2, 4)];
        assert_eq!(
            pick(Balance::LeastConn, &weighted, 0, |n| draws.next().unwrap()
                * n
                / 3),
            Some(1)
        );
        // Idle members share new connections by weight.
        let counts = spread(Balance::LeastConn, &[up(1, 0), up(3, 0)], 4000);
        assert!((800..1200).contains(&counts[0]), "{counts:?}");
        assert_eq!(
            spread(Balance::LeastConn, &[down(1), up(1, 7)], 10),
            [0, 10]
        );
        assert_eq!(pick(Balance::LeastConn, &[down(1)], 0, |_| 0), None);
    }
}
