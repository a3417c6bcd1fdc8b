//! An etcd registry: servers register their tunnel address under a key (`register`, kept under
//! a 10 s lease renewed while they run, deleted on a graceful shutdown, left to expire if the
//! process dies); ambassadors follow the keys under a prefix (`follow`), each value a
//! `HOST:PORT`, by a watch, not by polling. etcd unreachable: the last known set stays in use;
//! the watch resumes from the revision it had reached when etcd is back, and a compaction that
//! removed that revision triggers a full read of the prefix.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use amb_spec::{EtcdKey, HostPort};
use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, KeyValue, PutOptions,
    TlsOptions, WatchOptions,
};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Discovered, Located, Role};

/// How long a registration outlives its server's last renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often a registration is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(3);
/// Retries after a failure: 1 s doubling to this.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// TLS for an `etcds://` cluster: the CA its certificate chains to (else the system's roots)
/// and, for a cluster that checks clients, this process's certificate and key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// The cluster's CA, PEM.
    pub ca: Option<PathBuf>,
    /// A client certificate chain, PEM.
    pub cert: Option<PathBuf>,
    /// Its key, PEM (refused if group or others may read it).
    pub key: Option<PathBuf>,
}

async fn connect(key: &EtcdKey, tls: &EtcdTls) -> Result<Client, String> {
    let scheme = if key.tls { "https" } else { "http" };
    let endpoints: Vec<String> = key
        .endpoints
        .iter()
        .map(|e| format!("{scheme}://{e}"))
        .collect();
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(3))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
    if key.tls {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))
        };
        let mut tls_options = TlsOptions::new();
        if let Some(ca) = &tls.ca {
            tls_options = tls_options.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(secret)) = (&tls.cert, &tls.key) {
            let secret = amb_pki::read_secret(secret).map_err(|e| e.to_string())?;
            tls_options = tls_options.identity(Identity::from_pem(read(cert)?, secret));
        }
        options = options.with_tls(tls_options);
    }
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|e| format!("connecting: {e}"))
}

/// A key's value as a server: `HOST:PORT`.
fn located(kv: &KeyValue) -> Option<Located> {
    let addr = HostPort::parse(kv.value_str().ok()?.trim())?;
    Some(Located {
        priority: 0,
        host: addr.host(),
        port: addr.port(),
        weight: 1,
    })
}

/// What a follower has read of its prefix, kept across reconnections.
#[derive(Default)]
struct Registry {
    servers: BTreeMap<String, Located>,
    /// The revision read up to; `None` before a full read (or after a compaction).
    revision: Option<i64>,
}

impl Registry {
    fn apply(&mut self, kv: &KeyValue, put: bool, role: Role, prefix: &str) {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match located(kv).filter(|_| put) {
            Some(server) => {
                self.servers.insert(key, server);
            }
            None => {
                if put {
                    let value = String::from_utf8_lossy(kv.value());
                    warn!(%prefix, %key, %value, of = role.noun(), "registry entry left out: its value is not HOST:PORT");
                }
                self.servers.remove(&key);
            }
        }
    }

    /// Publishes the set if it changed.
    fn publish(&self, found: &watch::Sender<Discovered>, name: &str, role: Role) {
        let servers = super::located_set(self.servers.values().cloned().collect());
        super::discover::publish(found, servers, name, role);
    }
}

/// The servers registered under `key` now, read once.
pub(super) async fn list(key: &EtcdKey, tls: &EtcdTls) -> Result<Vec<Located>, String> {
    let prefix = format!("{}/", key.key);
    let mut client = connect(key, tls).await?;
    let read = client
        .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
        .await
        .map_err(|e| format!("reading {prefix}: {e}"))?;
    Ok(super::located_set(
        read.kvs().iter().filter_map(located).collect(),
    ))
}

/// Follows the servers registered under `key` (its `KEY/...` keys) into `found`, until no
/// receiver is left.
pub(super) async fn follow(
    key: EtcdKey,
    tls: EtcdTls,
    role: Role,
    found: watch::Sender<Discovered>,
) {
    let mut registry = Registry::default();
    let mut failures = 0u32;
    let name = key.to_string();
    loop {
        let failed = tokio::select! {
            failed = follow_once(&key, &tls, role, &found, &mut registry, &mut failures) => failed,
            () = found.closed() => return,
        };
        failures += 1;
        let had_set = matches!(*found.borrow(), Some(Ok(_)));
        if failures == 1 {
            match had_set {
                true => {
                    warn!(discovery = %name, of = role.noun(), "registry unreachable: {failed}; keeping the set it had")
                }
                false => {
                    warn!(discovery = %name, of = role.noun(), "registry unreachable: {failed}; no set yet")
                }
            }
        }
        if !had_set {
            found.send_replace(Some(Err(failed)));
        }
        let retry = (Duration::from_secs(1) * 2u32.saturating_pow(failures - 1)).min(MAX_RETRY);
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            () = found.closed() => return,
        }
    }
}

/// One connection's worth of following; returns why it stopped.
async fn follow_once(
    key: &EtcdKey,
    tls: &EtcdTls,
    role: Role,
    found: &watch::Sender<Discovered>,
    registry: &mut Registry,
    failures: &mut u32,
) -> String {
    let prefix = format!("{}/", key.key);
    let name = key.to_string();
    let mut client = match connect(key, tls).await {
        Ok(client) => client,
        Err(why) => return why,
    };
    let revision = match registry.revision {
        Some(revision) => revision,
        None => {
            let read = client
                .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
                .await;
            let read = match read {
                Ok(read) => read,
                Err(e) => return format!("reading {prefix}: {e}"),
            };
            registry.servers.clear();
            for kv in read.kvs() {
                registry.apply(kv, true, role, &prefix);
            }
            let revision = read.header().map_or(0, |h| h.revision());
            registry.revision = Some(revision);
            registry.publish(found, &name, role);
            revision
        }
    };
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = match client.watch(prefix.as_str(), Some(options)).await {
        Ok(stream) => stream,
        Err(e) => return format!("watching {prefix}: {e}"),
    };
    if *failures > 0 {
        info!(discovery = %name, of = role.noun(), failures = *failures, "registry reachable again");
        *failures = 0;
    }
    loop {
        let answer = match stream.message().await {
            Ok(Some(answer)) => answer,
            Ok(None) => return "the watch ended".to_owned(),
            Err(e) => return format!("watching {prefix}: {e}"),
        };
        if answer.canceled() {
            if answer.compact_revision() > 0 {
                // The revision to resume from is gone: read the whole prefix again.
                registry.revision = None;
                return format!(
                    "the watch fell behind a compaction (revision {})",
                    answer.compact_revision()
                );
            }
            return format!("the watch was canceled: {}", answer.cancel_reason());
        }
        for event in answer.events() {
            if let Some(kv) = event.kv() {
                registry.apply(kv, event.event_type() == EventType::Put, role, &prefix);
                registry.revision = Some(kv.mod_revision().max(registry.revision.unwrap_or(0)));
            }
        }
        if let Some(header) = answer.header() {
            registry.revision = Some(header.revision().max(registry.revision.unwrap_or(0)));
        }
        registry.publish(found, &name, role);
    }
}

/// Keeps `key` = `value` registered under a lease until `stop`, then deletes it. etcd
/// unreachable or the lease lost: registers again (with a new lease) once it can.
pub async fn register(key: EtcdKey, value: String, tls: EtcdTls, mut stop: watch::Receiver<bool>) {
    let mut failures = 0u32;
    loop {
        match register_once(&key, &value, &tls, &mut stop, &mut failures).await {
            Ok(()) => return,
            Err(why) => {
                failures += 1;
                if failures == 1 {
                    warn!(registry = %key, "registration failed: {why}; registering again");
                }
            }
        }
        let retry = (Duration::from_secs(1) * 2u32.saturating_pow(failures - 1)).min(MAX_RETRY);
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn register_once(
    key: &EtcdKey,
    value: &str,
    tls: &EtcdTls,
    stop: &mut watch::Receiver<bool>,
    failures: &mut u32,
) -> Result<(), String> {
    let mut client = connect(key, tls).await?;
    let ttl = LEASE_TTL.as_secs() as i64;
    let lease = client
        .lease_grant(ttl, None)
        .await
        .map_err(|e| format!("granting a lease: {e}"))?
        .id();
    client
        .put(
            key.key.as_str(),
            value,
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(|e| format!("writing {}: {e}", key.key))?;
    info!(registry = %key, advertise = %value, lease_ttl = ?LEASE_TTL, "registered");
    *failures = 0;
    let (mut keeper, mut renewals) = client
        .lease_keep_alive(lease)
        .await
        .map_err(|e| format!("renewing the lease: {e}"))?;
    loop {
        tokio::select! {
            () = tokio::time::sleep(RENEW_EVERY) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        keeper
            .keep_alive()
            .await
            .map_err(|e| format!("renewing the lease: {e}"))?;
        match renewals.message().await {
            Ok(Some(renewed)) if renewed.ttl() > 0 => {}
            Ok(_) => return Err("the lease expired".to_owned()),
            Err(e) => return Err(format!("renewing the lease: {e}")),
        }
    }
    // Deregistered at once rather than at the lease's end: clients stop sending new
    // connections while this server drains.
    let deleted = tokio::time::timeout(Duration::from_secs(2), async {
        client.delete(key.key.as_str(), None).await?;
        client.lease_revoke(lease).await
    })
    .await;
    match deleted {
        Ok(Ok(_)) => info!(registry = %key, "deregistered"),
        Ok(Err(e)) => {
            warn!(registry = %key, "deregistering failed: {e}; the key expires with its lease")
        }
        Err(_) => {
            warn!(registry = %key, "deregistering took over 2 s; the key expires with its lease")
        }
    }
    Ok(())
}
