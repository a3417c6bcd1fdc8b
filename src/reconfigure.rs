//! Keeping a running process on its files: each SIGHUP reloads the certificates and, with a
//! config file, a server's routes and allow-lists or a client's listeners; a check every
//! `--reload-check` reloads them when the config file, or a file its routes read (a password
//! file, upstream TLS files), changed (the engine watches the certificate files itself). A file that does not load or validate changes nothing: one error
//! line, and the running configuration stays.

use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use amb_engine::{DirectListeners, EngineError, Listeners, Reload, Routes};
use amb_proto::{AllowList, RouteTable};
use amb_spec::{ListenerSpec, PeerSpec, UpstreamSetSpec};
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::{Instant, MissedTickBehavior};

/// Reads the config file again and applies what it says to the running part; returns how
/// many routes or listeners changed.
pub type Apply =
    Box<dyn Fn() -> Pin<Box<dyn Future<Output = anyhow::Result<usize>> + Send>> + Send + Sync>;

/// One part's config file, and how to apply it.
pub struct Reconfigure {
    /// The config file.
    pub path: PathBuf,
    /// `server` or `client`, for the log.
    pub part: &'static str,
    /// Reads and applies it.
    pub apply: Apply,
}

/// What a server's file reload swaps in: its routes and the app sides it dials.
pub type ServerPart = (RouteTable<UpstreamSetSpec>, Vec<PeerSpec>);

/// A server's routes (and the app sides it dials) follow the file: `build` reads them (with
/// the flags given at start). Reading and swapping in a large file runs off the runtime's
/// workers, so the streams they carry do not wait for it.
pub fn server_routes(
    path: PathBuf,
    build: impl Fn() -> anyhow::Result<ServerPart> + Send + Sync + 'static,
    routes: Routes,
) -> Reconfigure {
    let build = Arc::new(build);
    Reconfigure {
        path,
        part: "server",
        apply: Box::new(move || {
            let (build, routes) = (build.clone(), routes.clone());
            Box::pin(async move {
                let apply = move || {
                    let (table, peers) = build()?;
                    let peers = routes.replace_peers(&peers)?;
                    Ok(routes.replace(table) + peers)
                };
                tokio::task::spawn_blocking(apply).await?
            })
        }),
    }
}

/// What a client's file reload swaps in: its listeners, the default peers, and (accepting
/// service-side ambassadors) their allow-list.
pub type ListenersPart = (Vec<ListenerSpec>, Vec<PeerSpec>, Option<AllowList>);

/// What a client-only file reload swaps in: its listeners and the TLS service.
pub type DirectPart = (Vec<ListenerSpec>, UpstreamSetSpec);

/// A running client part that takes what its file says now.
pub trait TakesFile<P>: Clone + Send + Sync + 'static {
    /// Swaps in `part`; returns how many listeners (or services) changed.
    fn take(&self, part: P) -> impl Future<Output = Result<usize, EngineError>> + Send;
}

impl TakesFile<ListenersPart> for Listeners {
    fn take(&self, part: ListenersPart) -> impl Future<Output = Result<usize, EngineError>> + Send {
        let (listens, peers, allow) = part;
        self.replace(listens, peers, allow)
    }
}

impl TakesFile<DirectPart> for DirectListeners {
    fn take(&self, part: DirectPart) -> impl Future<Output = Result<usize, EngineError>> + Send {
        let (listens, service) = part;
        self.replace(listens, service)
    }
}

/// A client's listeners (and peers, or client-only mode's service) follow the file: `build`
/// reads them, `running` takes them.
pub fn client_part<P: Send + 'static>(
    path: PathBuf,
    build: impl Fn() -> anyhow::Result<P> + Send + Sync + 'static,
    running: impl TakesFile<P>,
) -> Reconfigure {
    Reconfigure {
        path,
        part: "client",
        apply: Box::new(move || {
            let (built, running) = (build(), running.clone());
            Box::pin(async move { Ok(running.take(built?).await?) })
        }),
    }
}

/// What identifies a version of a file without reading it: a rewrite in place changes its
/// modification time or length, a replacement by rename its inode.
type Stamp = Option<(i64, i64, u64, u64)>;

fn stamp(path: &std::path::Path) -> Stamp {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.mtime(), meta.mtime_nsec(), meta.len(), meta.ino()))
}

/// The stamps of a config file and of the files its routes read (password files, upstream
/// TLS files), so a rotated secret is followed as an edit of the file is.
#[derive(PartialEq)]
struct Stamps {
    files: Vec<PathBuf>,
    stamps: Vec<Stamp>,
}

impl Stamps {
    /// Stamps `config` and the files it names now (none, if it does not load).
    fn take(config: &std::path::Path) -> Self {
        let mut files = vec![config.to_owned()];
        files.extend(
            amb_config::ConfigFile::load(config).map_or_else(|_| Vec::new(), |f| f.route_files()),
        );
        let stamps = files.iter().map(|f| stamp(f)).collect();
        Stamps { files, stamps }
    }

    /// Whether any of the same files changed since these stamps.
    fn changed(&self) -> bool {
        self.files
            .iter()
            .zip(&self.stamps)
            .any(|(f, s)| stamp(f) != *s)
    }
}

impl Reconfigure {
    /// Applies the file, or says why not.
    async fn apply(&self, why: &str) {
        let (file, part) = (self.path.display(), self.part);
        let applied = (self.apply)().await;
        crate::cli::process_metrics().reloaded("config", applied.is_ok());
        match applied {
            Ok(changes) => tracing::info!(%file, part, changes, "{why}: config file reloaded"),
            Err(e) => tracing::error!(
                %file,
                part,
                "{why}: config file not reloaded, the running configuration stays: {e:#}"
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
    let mut loaded = config.as_ref().map(|c| Stamps::take(&c.path));
    tokio::spawn(async move {
        loop {
            let why = tokio::select! {
                Some(()) = next_hangup(&mut hangups) => {
                    reload.now();
                    "SIGHUP"
                }
                Some(()) = next_check(&mut checks) => {
                    if !loaded.as_ref().is_some_and(Stamps::changed) {
                        continue;
                    }
                    "config file changed"
                }
                else => return,
            };
            if let Some(config) = &config {
                loaded = Some(Stamps::take(&config.path));
                config.apply(why).await;
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
