//! Certificate reload. A side's TLS configurations are rebuilt from their files when asked
//! ([`Reload::now`], which the binary calls on SIGHUP) and when the files change on disk, and
//! the transports take the newest for each new handshake; a reload that finds the files as they
//! were changes nothing. A change of the CA certificates moves the trust generation, by which a
//! server drains the connections it verified before. Files that do not load (a key that does
//! not match its certificate, a file half written) leave the running configuration in place,
//! with an error naming them; their next change is tried again.

use std::sync::Arc;
use std::time::Duration;

use amb_metrics::{CertificateExpiry, Metrics, Side};
use amb_pki::{FilesContents, FilesStamp, PkiError, TlsFiles};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{error, info};

/// Asks a running client or server to reload its certificates: every set of configurations
/// it keeps (a server dialing app sides has two).
#[derive(Clone, Debug)]
pub struct Reload {
    requests: Arc<watch::Sender<u64>>,
    /// Never moved on: a reloader's copy sees every request made since the handle was made.
    seen: watch::Receiver<u64>,
}

impl Default for Reload {
    fn default() -> Self {
        let (requests, seen) = watch::channel(0);
        Reload {
            requests: Arc::new(requests),
            seen,
        }
    }
}

impl Reload {
    /// Reloads now (or as soon as the reloaders run, if they have not started yet).
    pub fn now(&self) {
        self.requests.send_modify(|n| *n += 1);
    }
}

/// Builds one side's configuration for an ALPN from the files.
pub(crate) type Build<C> = fn(&TlsFiles, &[u8]) -> Result<Arc<C>, PkiError>;

/// One side's TLS configurations, one per ALPN, following the files.
pub(crate) struct Certs<C> {
    files: TlsFiles,
    build: Build<C>,
    configs: Vec<(&'static [u8], watch::Sender<Arc<C>>)>,
    /// The files as they were at the last load, good or not.
    loaded: FilesStamp,
    /// What the files held at the last good load; `None` if they changed during it, so that
    /// which contents the configurations were built from is unknown.
    current: Option<FilesContents>,
    /// Counts the good loads that changed the CA file: the trust generation.
    trust: watch::Sender<u64>,
    /// Where the reloads and the loaded certificates' expiry are counted.
    metrics: Option<(Arc<Metrics>, Side)>,
}

impl<C> Certs<C> {
    /// The first load, for each of `alpns`: any failure stops the start.
    pub fn load(
        files: TlsFiles,
        build: Build<C>,
        alpns: &[&'static [u8]],
    ) -> Result<Self, PkiError> {
        let loaded = files.stamp();
        let before = files.contents()?;
        let configs = alpns
            .iter()
            .map(|alpn| Ok((*alpn, watch::Sender::new(build(&files, alpn)?))))
            .collect::<Result<_, PkiError>>()?;
        let current = known(before, files.contents()?);
        Ok(Certs {
            files,
            build,
            configs,
            loaded,
            current,
            trust: watch::Sender::new(0),
            metrics: None,
        })
    }

    /// Counts reloads into `metrics`, and reports the expiry of the certificates loaded (now
    /// and at each reload) as `side`'s.
    pub fn counted_in(mut self, metrics: &Arc<Metrics>, side: Side) -> Self {
        self.metrics = Some((metrics.clone(), side));
        self.report_expiry();
        self
    }

    fn report_expiry(&self) {
        if let Some((metrics, side)) = &self.metrics {
            let certs = amb_pki::expiries(&self.files)
                .into_iter()
                .map(|e| CertificateExpiry {
                    kind: if e.is_ca { "ca" } else { "leaf" },
                    subject: e.subject,
                    not_after: e.not_after,
                });
            metrics.certificates_loaded(*side, certs.collect());
        }
    }

    /// The trust generation: it moves when a reload changes the CAs, after the configurations
    /// with them are out. A server drains the connections it verified under an earlier one.
    pub fn trust(&self) -> watch::Receiver<u64> {
        self.trust.subscribe()
    }

    /// The configuration for `alpn`, kept current; `None` if it was not loaded.
    pub fn subscribe(&self, alpn: &[u8]) -> Option<watch::Receiver<Arc<C>>> {
        self.configs
            .iter()
            .find(|(a, _)| *a == alpn)
            .map(|(_, config)| config.subscribe())
    }

    /// Rebuilds every configuration from the files: all are replaced, or none, and none if the
    /// files hold what they held at the last good load (they are still checked: a key made
    /// readable by others fails).
    fn reload(&mut self) -> Result<Reloaded, PkiError> {
        // Stamped before reading, so a change made during the reload is seen at the next check.
        self.loaded = self.files.stamp();
        // The build reads the files itself: read before and after it, a file replaced during
        // the build counts as a change now, and again at the next reload.
        let before = self.files.contents()?;
        let fresh = self
            .configs
            .iter()
            .map(|(alpn, _)| (self.build)(&self.files, alpn))
            .collect::<Result<Vec<_>, _>>()?;
        let after = self.files.contents()?;
        if self.current.as_ref() == Some(&before) && after == before {
            return Ok(Reloaded::Unchanged);
        }
        for ((_, config), new) in self.configs.iter().zip(fresh) {
            config.send_replace(new);
        }
        let trust_before = self.current.as_ref().map(|current| &current.ca);
        if trust_before != Some(&before.ca) || after.ca != before.ca {
            self.trust.send_modify(|generation| *generation += 1);
        }
        self.current = known(before, after);
        Ok(Reloaded::Changed)
    }

    /// Reloads on each [`Reload::now`], and when a check (every `check_every`, if any) finds
    /// the files changed, until `stop` turns true.
    pub async fn keep_current(
        mut self,
        reload: Reload,
        check_every: Option<Duration>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut checks = check_every.filter(|d| !d.is_zero()).map(|every| {
            let mut checks = tokio::time::interval_at(Instant::now() + every, every);
            checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            checks
        });
        let mut requests = reload.seen.clone();
        loop {
            let why = tokio::select! {
                Ok(()) = requests.changed() => "reload requested",
                () = next_check(&mut checks) => {
                    if self.files.stamp() == self.loaded {
                        continue;
                    }
                    "certificate files changed"
                }
                _ = stop.wait_for(|stopping| *stopping) => return,
            };
            let reloaded = self.reload();
            if let Some((metrics, _)) = &self.metrics {
                metrics.reloaded("certificates", reloaded.is_ok());
            }
            match reloaded {
                Ok(Reloaded::Changed) => {
                    self.report_expiry();
                    info!(files = %self.files, "{why}: certificates reloaded; new connections use them")
                }
                Ok(Reloaded::Unchanged) => {
                    info!(files = %self.files, "{why}: the certificate files hold what they held; nothing to reload")
                }
                Err(e) => error!("{why}: {e}; the running certificates stay in use (fix the files: their next change, or a SIGHUP, loads them again)"),
            }
        }
    }
}

/// The contents a build read, if the reads `before` and `after` it agree.
fn known(before: FilesContents, after: FilesContents) -> Option<FilesContents> {
    (before == after).then_some(before)
}

/// What a good reload did.
#[derive(Debug, PartialEq, Eq)]
enum Reloaded {
    /// The files changed: the new configurations are out.
    Changed,
    /// The files hold what they held: the configurations stay as they are.
    Unchanged,
}

/// Resolves at the next check; never, if there are none.
async fn next_check(checks: &mut Option<tokio::time::Interval>) {
    match checks {
        Some(checks) => drop(checks.tick().await),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::{Path, PathBuf};

    /// A stand-in build: the configuration is the cert file's text, and `bad` fails. With a
    /// file `swap-ca` beside them, it replaces the CA file while it builds (once).
    fn build(files: &TlsFiles, alpn: &[u8]) -> Result<Arc<String>, PkiError> {
        let text = std::fs::read_to_string(&files.cert).unwrap();
        let dir = files.ca.parent().unwrap();
        if std::fs::remove_file(dir.join("swap-ca")).is_ok() {
            write_ca(dir, "ca swapped");
        }
        // Empty: a write caught between its truncation and its bytes, as a real build fails.
        if text == "bad" || text.is_empty() {
            return Err(PkiError::BadPem {
                path: files.cert.clone(),
                what: "bad".into(),
            });
        }
        Ok(Arc::new(format!(
            "{text}/{}",
            String::from_utf8_lossy(alpn)
        )))
    }

    /// A directory of its own for each test, removed at the end.
    struct Dir(PathBuf);

    impl Dir {
        fn new(test: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("amb-reload-{test}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn files(dir: &Path) -> TlsFiles {
        TlsFiles::in_dir(dir, "server")
    }

    fn write(dir: &Path, text: &str) {
        std::fs::write(dir.join("server.pem"), text).unwrap();
    }

    /// The stand-in build does not read the key, but a reload hashes it.
    fn write_key(dir: &Path, text: &str) {
        std::fs::write(dir.join("server.key"), text).unwrap();
    }

    /// Writes a new CA certificate named `name` (each call a new key, so a new CA).
    fn write_ca(dir: &Path, name: &str) {
        let ca = amb_pki::CertAuthority::generate(name).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.cert_pem).unwrap();
    }

    fn swap_ca_during_the_next_build(dir: &Path) {
        std::fs::write(dir.join("swap-ca"), "").unwrap();
    }

    /// Writes the first stand-in files: a cert file saying `one`, a key, a CA.
    fn write_first(dir: &Path) {
        write(dir, "one");
        write_key(dir, "key one");
        write_ca(dir, "ca one");
    }

    /// Stand-in certificates for `h2` from `dir`, whose cert file says `one`.
    fn loaded(dir: &Dir) -> (Certs<String>, watch::Receiver<Arc<String>>) {
        write_first(dir.path());
        let certs = Certs::load(files(dir.path()), build, &[b"h2"]).unwrap();
        let config = certs.subscribe(b"h2").unwrap();
        (certs, config)
    }

    #[test]
    fn a_reload_replaces_every_configuration_or_none() {
        let dir = Dir::new("all-or-none");
        write_first(dir.path());
        let mut certs = Certs::load(files(dir.path()), build, &[b"h2", b"amb/1"]).unwrap();
        let (h2, quic) = (
            certs.subscribe(b"h2").unwrap(),
            certs.subscribe(b"amb/1").unwrap(),
        );
        assert!(certs.subscribe(b"other").is_none());
        write(dir.path(), "two");
        certs.reload().unwrap();
        assert_eq!(
            (h2.borrow().as_str(), quic.borrow().as_str()),
            ("two/h2", "two/amb/1")
        );
        write(dir.path(), "bad");
        certs.reload().unwrap_err();
        assert_eq!(
            (h2.borrow().as_str(), quic.borrow().as_str()),
            ("two/h2", "two/amb/1")
        );
    }

    #[test]
    fn the_trust_generation_moves_when_a_good_reload_changes_the_ca() {
        let dir = Dir::new("trust");
        let (mut certs, _config) = loaded(&dir);
        let trust = certs.trust();
        write(dir.path(), "renewed");
        certs.reload().unwrap();
        assert_eq!(
            *trust.borrow(),
            0,
            "a renewed certificate is no change of trust"
        );
        write_ca(dir.path(), "ca two");
        write(dir.path(), "bad");
        certs.reload().unwrap_err();
        assert_eq!(*trust.borrow(), 0, "nothing changed: the load failed");
        write(dir.path(), "good");
        certs.reload().unwrap();
        assert_eq!(*trust.borrow(), 1);
        assert_eq!(certs.reload().unwrap(), Reloaded::Unchanged);
        assert_eq!(*trust.borrow(), 1, "the same CA again");
        let ca = dir.path().join("ca.pem");
        let rewritten = format!("# rewritten\n{}\n", std::fs::read_to_string(&ca).unwrap());
        std::fs::write(&ca, rewritten).unwrap();
        assert_eq!(certs.reload().unwrap(), Reloaded::Unchanged);
        assert_eq!(*trust.borrow(), 1, "the same certificates, written anew");
        // Which CA the build read is unknown: it moves now, and again at the next reload,
        // though the files then hold what they held after the build.
        swap_ca_during_the_next_build(dir.path());
        assert_eq!(certs.reload().unwrap(), Reloaded::Changed);
        assert_eq!(*trust.borrow(), 2);
        assert_eq!(certs.reload().unwrap(), Reloaded::Changed);
        assert_eq!(*trust.borrow(), 3);
        assert_eq!(certs.reload().unwrap(), Reloaded::Unchanged);
        assert_eq!(*trust.borrow(), 3);
    }

    #[test]
    fn a_change_during_the_first_load_is_taken_at_the_next_reload() {
        let dir = Dir::new("first-load");
        write_first(dir.path());
        swap_ca_during_the_next_build(dir.path());
        let mut certs = Certs::load(files(dir.path()), build, &[b"h2"]).unwrap();
        let (config, trust) = (certs.subscribe(b"h2").unwrap(), certs.trust());
        assert_eq!(certs.reload().unwrap(), Reloaded::Changed);
        assert!(config.has_changed().unwrap());
        assert_eq!(*trust.borrow(), 1, "the CA the first build read is unknown");
        assert_eq!(certs.reload().unwrap(), Reloaded::Unchanged);
    }

    #[test]
    fn a_reload_of_files_holding_what_they_held_publishes_nothing() {
        let dir = Dir::new("unchanged");
        let (mut certs, config) = loaded(&dir);
        let trust = certs.trust();
        assert_eq!(certs.reload().unwrap(), Reloaded::Unchanged);
        // Written again with the same bytes: a new stamp, the same contents.
        write(dir.path(), "one");
        write_key(dir.path(), "key one");
        assert_eq!(certs.reload().unwrap(), Reloaded::Unchanged);
        assert!(!config.has_changed().unwrap(), "nothing was published");
        // Bytes moved from the end of one file to the start of the other are a change.
        write(dir.path(), "on");
        write_key(dir.path(), "ekey one");
        assert_eq!(certs.reload().unwrap(), Reloaded::Changed);
        // So is a new key alone.
        write_key(dir.path(), "key two");
        assert_eq!(certs.reload().unwrap(), Reloaded::Changed);
        assert!(config.has_changed().unwrap());
        assert_eq!(*trust.borrow(), 0, "the CA stayed");
    }

    #[tokio::test]
    async fn changed_files_are_reloaded() {
        let dir = Dir::new("changed");
        let (certs, mut config) = loaded(&dir);
        let (stop, stopping) = watch::channel(false);
        let every = Some(Duration::from_millis(20));
        let running = tokio::spawn(certs.keep_current(Reload::default(), every, stopping));
        write(dir.path(), "two!");
        config.changed().await.unwrap();
        assert_eq!(config.borrow_and_update().as_str(), "two!/h2");
        // A bad file leaves the configuration as it was; the next change is tried again.
        write(dir.path(), "bad");
        write(dir.path(), "three");
        config.changed().await.unwrap();
        assert_eq!(config.borrow_and_update().as_str(), "three/h2");
        stop.send_replace(true);
        running.await.unwrap();
    }

    #[tokio::test]
    async fn a_requested_reload_reads_the_files_however_they_look() {
        let dir = Dir::new("requested");
        let (certs, mut config) = loaded(&dir);
        let reload = Reload::default();
        // No periodic check sees the change; asked before the reloader runs, it is not lost.
        write(dir.path(), "two");
        reload.now();
        let (_stop, stopping) = watch::channel(false);
        tokio::spawn(certs.keep_current(reload.clone(), None, stopping));
        config.changed().await.unwrap();
        assert_eq!(config.borrow_and_update().as_str(), "two/h2");
        write(dir.path(), "three");
        reload.now();
        config.changed().await.unwrap();
        assert_eq!(config.borrow_and_update().as_str(), "three/h2");
    }
}
