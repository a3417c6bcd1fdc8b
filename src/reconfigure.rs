//! Keeping a running process on its files: each SIGHUP reloads the certificates and, with a
//! config file, the routes and allow-lists; a check every `--reload-check` reloads the routes
//! when the config file changed (the engine watches the certificate files itself). A file that
//! does not load or validate changes nothing: one error line, and the running routes stay.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use amb_engine::{Reload, Routes};
use amb_proto::RouteTable;
use amb_spec::UpstreamSpec;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::{Instant, MissedTickBehavior};

/// Builds a server's routes from its config file (merged with its flags, as at the start).
pub type RouteBuilder = Box<dyn Fn() -> anyhow::Result<RouteTable<UpstreamSpec>> + Send + Sync>;

/// A server's config file, how to build routes from it, and the routes to replace.
pub struct Reconfigure {
    /// The config file.
    pub path: PathBuf,
    /// Reads it again.
    pub build: RouteBuilder,
    /// The running server's routes.
    pub routes: Routes,
}

/// What identifies a version of a file without reading it: a rewrite in place changes its
/// modification time or length, a replacement by rename its inode.
type Stamp = Option<(i64, i64, u64, u64)>;

fn stamp(path: &std::path::Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.mtime(), meta.mtime_nsec(), meta.len(), meta.ino()))
}

impl Reconfigure {
    /// Builds the routes from the file and swaps them in, or says why not.
    fn apply(&self, why: &str) {
        match (self.build)() {
            Ok(table) => {
                let changes = self.routes.replace(table);
                tracing::info!(file = %self.path.display(), changes, "{why}: config file reloaded");
            }
            Err(e) => tracing::error!(
                file = %self.path.display(),
                "{why}: config file not reloaded, the running routes stay: {e:#}"
            ),
        }
    }
}

/// Reloads the certificates at each SIGHUP and, given a config file, the routes at each SIGHUP
/// and when a check every `check_every` finds the file changed. The SIGHUP handler is in place
/// when this returns, so a SIGHUP sent once the process reports listening reloads rather than
/// ends it.
pub fn keep_current(reload: Reload, config: Option<Reconfigure>, check_every: Option<Duration>) {
    let mut hangups = signal(SignalKind::hangup())
        .inspect_err(|e| {
            tracing::warn!("SIGHUP cannot be caught ({e}): files reload only when a --reload-check finds them changed")
        })
        .ok();
    let mut checks = config
        .as_ref()
        .and(check_every.filter(|d| !d.is_zero()))
        .map(|every| {
            let mut checks = tokio::time::interval_at(Instant::now() + every, every);
            checks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            checks
        });
    // Stamped before each read, so a change made while it is read is seen at the next check.
    let mut loaded = config.as_ref().map(|c| stamp(&c.path));
    tokio::spawn(async move {
        loop {
            let why = tokio::select! {
                Some(()) = next_hangup(&mut hangups) => {
                    reload.now();
                    "SIGHUP"
                }
                Some(()) = next_check(&mut checks) => {
                    let now = config.as_ref().map(|c| stamp(&c.path));
                    if now == loaded {
                        continue;
                    }
                    "config file changed"
                }
                else => return,
            };
            if let Some(config) = &config {
                loaded = Some(stamp(&config.path));
                config.apply(why);
            }
        }
    });
}

async fn next_hangup(hangups: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    hangups.as_mut()?.recv().await
}

async fn next_check(checks: &mut Option<tokio::time::Interval>) -> Option<()> {
    checks.as_mut()?.tick().await;
    Some(())
}
