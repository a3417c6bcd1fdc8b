//! Discovered sets: a task per discovery name looks the set up in the background (SRV records
//! again at their TTL, clamped to [`MIN_REFRESH`] … [`MAX_REFRESH`]) and publishes it on a
//! watch channel; dials only read the latest. A lookup that fails or finds nothing keeps the
//! last good set (one warning per failure streak) and is retried with a back-off until it
//! answers again. The task ends when no receiver is left.

use std::sync::Arc;
use std::time::Duration;

use amb_spec::Discovery;
use tokio::sync::watch;
use tracing::{info, warn};

use super::resolve::{Located, Resolver};
use super::{Role, LOOKUP_LIMIT};

/// The shortest time between two lookups of a set that answered.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// The longest.
pub const MAX_REFRESH: Duration = Duration::from_secs(60);
/// After a failed lookup, the next comes this much later, doubling up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(10);

/// What a discovery has found: `None` before its first answer; `Err` (why) while no lookup
/// has ever answered; else the last good set (SRV: never empty; a registry may list none).
pub type Discovered = Option<Result<Arc<[Located]>, String>>;

/// Starts following `discovery` (an etcd registry with `resolver`'s TLS settings); the set,
/// as it changes.
pub fn discover(
    discovery: &Discovery,
    role: Role,
    resolver: &Resolver,
) -> watch::Receiver<Discovered> {
    let (found, receiver) = watch::channel(None);
    match discovery {
        Discovery::Srv(name) => {
            tokio::spawn(follow_srv(name.clone(), role, resolver.clone(), found));
        }
        Discovery::Etcd(key) => {
            let tls = resolver.etcd_tls().clone();
            tokio::spawn(super::etcd::follow(key.clone(), tls, role, found));
        }
    }
    receiver
}

/// Publishes `servers` (sorted, none twice) as the set found if it differs from the last one,
/// with one line saying what came and went; whether it did.
pub(super) fn publish(
    found: &watch::Sender<Discovered>,
    servers: Vec<Located>,
    discovery: &str,
    role: Role,
) -> bool {
    let servers: Arc<[Located]> = servers.into();
    let mut before: Option<Arc<[Located]>> = None;
    let changed = found.send_if_modified(|now| match now {
        Some(Ok(last)) if *last == servers => false,
        _ => {
            if let Some(Ok(last)) = now.replace(Ok(servers.clone())) {
                before = Some(last);
            }
            true
        }
    });
    if changed {
        let (came, went) = came_and_went(&before.unwrap_or_default(), &servers);
        let total = servers.len();
        info!(%discovery, of = role.noun(), total, ?came, ?went, "discovered set changed");
    }
    changed
}

/// The servers in `after` and not in `before`, and the other way round; both sorted.
fn came_and_went(before: &[Located], after: &[Located]) -> (Vec<String>, Vec<String>) {
    let (mut came, mut went) = (Vec::new(), Vec::new());
    let (mut old, mut new) = (before.iter().peekable(), after.iter().peekable());
    loop {
        match (old.peek(), new.peek()) {
            (Some(o), Some(n)) if o == n => {
                old.next();
                new.next();
            }
            (Some(o), Some(n)) if o < n => went.extend(old.next().map(ToString::to_string)),
            (_, Some(_)) => came.extend(new.next().map(ToString::to_string)),
            (Some(_), None) => went.extend(old.next().map(ToString::to_string)),
            (None, None) => return (came, went),
        }
    }
}

/// Looks `name`'s SRV records up again at their TTL, until no receiver is left.
async fn follow_srv(
    name: String,
    role: Role,
    resolver: Resolver,
    found: watch::Sender<Discovered>,
) {
    let discovery = format!("srv:{name}");
    let mut failures = 0u32;
    loop {
        let answer = match tokio::time::timeout(LOOKUP_LIMIT, resolver.lookup_srv(&name)).await {
            Ok(answer) => answer,
            Err(_) => Err(format!("no answer within {LOOKUP_LIMIT:?}")),
        };
        let next_lookup = match answer {
            Ok(answer) => {
                if !publish(&found, answer.targets, &discovery, role) && failures > 0 {
                    info!(%discovery, of = role.noun(), failures, "discovery answers again");
                }
                failures = 0;
                answer.ttl.clamp(MIN_REFRESH, MAX_REFRESH)
            }
            Err(why) => {
                failures += 1;
                let had_set = matches!(*found.borrow(), Some(Ok(_)));
                if failures == 1 {
                    match had_set {
                        true => {
                            warn!(%discovery, of = role.noun(), "discovery failed: {why}; keeping the set it had")
                        }
                        false => {
                            warn!(%discovery, of = role.noun(), "discovery failed: {why}; no set yet")
                        }
                    }
                }
                if !had_set {
                    found.send_replace(Some(Err(why)));
                }
                (FIRST_RETRY * 2u32.saturating_pow(failures - 1)).min(MAX_RETRY)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(next_lookup) => {}
            () = found.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(host: &str) -> Located {
        Located {
            priority: 0,
            host: host.into(),
            port: 1,
            weight: 1,
        }
    }

    #[test]
    fn a_change_names_what_came_and_what_went() {
        let (came, went) =
            came_and_went(&[at("a"), at("b"), at("d")], &[at("b"), at("c"), at("e")]);
        let names = |v: &[String]| v.iter().map(|s| &s[..1]).collect::<Vec<_>>().join(",");
        assert_eq!((names(&came), names(&went)), ("c,e".into(), "a,d".into()));
    }
}
