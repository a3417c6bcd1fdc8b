//! Fixtures for end-to-end tests: a per-test PKI made with rcgen, a real `redis-server` on a
//! free port, in-process TCP upstreams, and the real `amb` binary with log-based readiness.
#![allow(dead_code, missing_docs)]

pub mod impair;
pub mod netns;
pub mod raw;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use amb_pki::{CertAuthority, IssuedLeaf, LeafSpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const AMB: &str = env!("CARGO_BIN_EXE_amb");

/// How long any readiness wait may take before the test fails.
pub const READY: Duration = Duration::from_secs(20);

/// The two tunnel transports; scenario tests run once for each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Quic,
    Tls,
}

impl Transport {
    pub fn flag(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tls => "tls",
        }
    }

    /// Tunnel connections `amb client` keeps warm by default (`--connections`).
    pub fn pool_size(self) -> usize {
        match self {
            Transport::Quic => 1,
            Transport::Tls => 2,
        }
    }
}

/// Writes one scenario test per transport: `scenario!(name)` calls `name(Transport)`.
#[macro_export]
macro_rules! per_transport {
    ($($name:ident),* $(,)?) => {
        mod quic {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::support::Transport::Quic).await
                }
            )*
        }
        mod tls {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::support::Transport::Tls).await
                }
            )*
        }
    };
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "amb-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test PKI in a temporary directory: `ca.pem`, `server.*`, `client.*`, and helpers to write
/// more leaves (from this CA or another).
pub struct Pki {
    pub dir: TempDir,
    pub ca: CertAuthority,
}

impl Pki {
    pub fn new() -> Self {
        let dir = TempDir::new("pki");
        let ca = CertAuthority::generate("amb test CA").unwrap();
        let pki = Pki { dir, ca };
        write(&pki.path("ca.pem"), &pki.ca.cert_pem, false);
        pki.write_leaf("server", &pki.ca.issue(&LeafSpec::server(&[], 30)).unwrap());
        pki.write_leaf(
            "client",
            &pki.ca.issue(&LeafSpec::client("client", 30)).unwrap(),
        );
        pki
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// Writes `<name>.pem` and `<name>.key` (0600).
    pub fn write_leaf(&self, name: &str, leaf: &IssuedLeaf) {
        write(&self.path(&format!("{name}.pem")), &leaf.cert_pem, false);
        write(&self.path(&format!("{name}.key")), &leaf.key_pem, true);
    }

    /// Flags naming an explicit cert/key and this PKI's CA.
    pub fn cert_flags(&self, name: &str) -> Vec<String> {
        vec![
            "--cert".into(),
            self.path(&format!("{name}.pem")).display().to_string(),
            "--key".into(),
            self.path(&format!("{name}.key")).display().to_string(),
            "--ca".into(),
            self.path("ca.pem").display().to_string(),
        ]
    }
}

fn write(path: &Path, text: &str, secret: bool) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    let mode = if secret { 0o600 } else { 0o644 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Log lines of a child process, shared with the reader thread.
#[derive(Clone, Default)]
pub struct Log(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Log {
    fn push(&self, line: String) {
        let (lines, cv) = &*self.0;
        lines.lock().unwrap().push(line);
        cv.notify_all();
    }

    /// Waits until a line contains every one of `needles`; returns it.
    pub fn wait_for(&self, needles: &[&str]) -> String {
        self.wait_for_nth(needles, 1)
    }

    /// Waits until `n` lines contain every one of `needles`; returns the n-th.
    pub fn wait_for_nth(&self, needles: &[&str], n: usize) -> String {
        // Blocking here must not starve the in-process upstreams on the test's runtime.
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::task::block_in_place(|| self.wait_blocking(needles, n))
        } else {
            self.wait_blocking(needles, n)
        }
    }

    fn wait_blocking(&self, needles: &[&str], n: usize) -> String {
        let (lines, cv) = &*self.0;
        let deadline = Instant::now() + READY;
        let mut guard = lines.lock().unwrap();
        loop {
            let found: Vec<&String> = guard.iter().filter(|l| matches(l, needles)).collect();
            if found.len() >= n {
                return found[n - 1].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no log line with {needles:?} within {READY:?}; log:\n{}",
                guard.join("\n")
            );
            guard = cv.wait_timeout(guard, left).unwrap().0;
        }
    }

    /// Number of lines containing every needle so far.
    pub fn count(&self, needles: &[&str]) -> usize {
        let lines = self.0 .0.lock().unwrap();
        lines.iter().filter(|l| matches(l, needles)).count()
    }

    pub fn text(&self) -> String {
        self.0 .0.lock().unwrap().join("\n")
    }
}

/// Whether `line` holds every needle, ignoring ASCII case.
fn matches(line: &str, needles: &[&str]) -> bool {
    let line = line.to_ascii_lowercase();
    needles
        .iter()
        .all(|n| line.contains(&n.to_ascii_lowercase()))
}

/// A running `amb` process, killed on drop.
pub struct Amb {
    pub child: Child,
    pub log: Log,
}

impl Amb {
    /// Starts `amb` with `args`; stderr is captured into [`Log`].
    pub fn spawn(args: &[String]) -> Self {
        let mut cmd = Command::new(AMB);
        cmd.args(args);
        Self::spawn_command(cmd)
    }

    /// Starts `amb` with `args` and the environment variables `env` (`AMB_*` settings).
    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(AMB);
        cmd.args(args).envs(env.iter().copied());
        Self::spawn_command(cmd)
    }

    /// Runs `script` with `sh -c` (e.g. to set a `ulimit` first); it must `exec` amb.
    pub fn spawn_shell(script: &str) -> Self {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        Self::spawn_command(cmd)
    }

    fn spawn_command(mut cmd: Command) -> Self {
        let mut child = cmd
            .env(
                "RUST_LOG",
                "info,amb_engine=debug,amb_quic=debug,amb_tls=debug",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn amb");
        let log = Log::default();
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.push(line);
            }
        });
        Amb { child, log }
    }

    /// `amb server` on 127.0.0.1:`port` (0 for any) with the given extra flags.
    pub fn server(pki: &Pki, port: u16, extra: &[&str]) -> Self {
        let mut args: Vec<String> = vec![
            "server".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        args.extend(pki.cert_flags("server"));
        args.extend(extra.iter().map(|s| s.to_string()));
        Amb::spawn(&args)
    }

    /// The address `amb server` reported listening on.
    pub fn server_addr(&self) -> SocketAddr {
        let line = self.log.wait_for(&["amb server listening"]);
        field(&line, "addr").parse().unwrap()
    }

    /// `amb client` listening on a free loopback port, for `peer` over `transport`.
    pub fn client(
        pki: &Pki,
        cert: &str,
        peer: SocketAddr,
        transport: Transport,
        extra: &[&str],
    ) -> Self {
        let mut args: Vec<String> = vec![
            "client".into(),
            "--listen".into(),
            "0".into(),
            "--peer".into(),
            format!("localhost:{}", peer.port()),
            "--transport".into(),
            transport.flag().into(),
        ];
        args.extend(pki.cert_flags(cert));
        args.extend(extra.iter().map(|s| s.to_string()));
        Amb::spawn(&args)
    }

    /// The first address `amb client` reported listening on.
    pub fn listen_addr(&self) -> SocketAddr {
        let line = self.log.wait_for(&["amb client listening"]);
        field(&line, "listen").parse().unwrap()
    }

    /// The address of the listener for `route` (from a `--listen ...=ROUTE`).
    pub fn listen_addr_for(&self, route: &str) -> SocketAddr {
        let line = self
            .log
            .wait_for(&["amb client listening", &format!("route={route}")]);
        field(&line, "listen").parse().unwrap()
    }

    /// Waits until every tunnel connection of the client's pool is up; returns how many times a
    /// tunnel came up so far, for [`Amb::wait_reconnected`].
    pub fn wait_pool_up(&self, t: Transport) -> usize {
        self.log
            .wait_for_nth(&["tunnel connection up"], t.pool_size());
        self.log.count(&["tunnel connection up"])
    }

    /// Waits until `lost` tunnel connections came back up after the `ups` counted before.
    pub fn wait_reconnected(&self, ups: usize, lost: usize) {
        self.log.wait_for_nth(&["tunnel connection up"], ups + lost);
    }

    /// Waits until the client has a tunnel connection up.
    pub fn wait_tunnel_up(&self) {
        self.log.wait_for(&["tunnel connection up"]);
    }

    /// Sends a signal by name (e.g. `TERM`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// Stops the process (SIGSTOP) and waits until every thread of it is stopped.
    pub fn pause(&self) {
        self.signal("STOP");
        let tasks = format!("/proc/{}/task", self.child.id());
        let stopped = || {
            std::fs::read_dir(&tasks).unwrap().all(|task| {
                let stat = std::fs::read_to_string(task.unwrap().path().join("stat"));
                // The state follows the parenthesised command name.
                stat.is_ok_and(|s| {
                    s.rsplit_once(") ")
                        .is_some_and(|(_, rest)| rest.starts_with('T'))
                })
            })
        };
        let deadline = Instant::now() + READY;
        while !stopped() {
            assert!(Instant::now() < deadline, "amb did not stop");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Continues a process stopped by [`pause`](Self::pause).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// Waits for exit, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "amb did not exit within {limit:?}; log:\n{}",
                self.log.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Amb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of `key=value` in a log line.
pub fn field(line: &str, key: &str) -> String {
    let start = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        + key.len()
        + 1;
    line[start..]
        .split_whitespace()
        .next()
        .unwrap()
        .trim_matches('"')
        .to_string()
}

/// A real `redis-server` on a free port, shut down on drop.
pub struct Redis {
    child: Child,
    pub port: u16,
    /// The `redis-cli` flags its port needs: none, or TLS with a client certificate.
    pub cli_flags: Vec<String>,
    _dir: TempDir,
}

impl Redis {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// On `port` (e.g. again after it was killed).
    pub fn start_on(port: u16) -> Self {
        Self::try_start(port, &[], None).unwrap_or_else(|why| panic!("{why}"))
    }

    /// With extra `redis-server` flags, on a free port. A port taken by another test between
    /// its pick and redis's bind is picked again.
    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_retrying(extra, None)
    }

    /// Speaking TLS only (`--tls-port`, with `pki`'s `server` certificate), and only to
    /// clients that present a certificate of `pki`'s CA.
    pub fn start_tls(pki: &Pki) -> Self {
        Self::start_retrying(&[], Some(pki))
    }

    fn start_retrying(extra: &[&str], tls: Option<&Pki>) -> Self {
        let mut last = String::new();
        for _ in 0..5 {
            match Self::try_start(free_port(), extra, tls) {
                Ok(redis) => return redis,
                Err(why) => last = why,
            }
        }
        panic!("{last}")
    }

    fn try_start(port: u16, extra: &[&str], tls: Option<&Pki>) -> Result<Self, String> {
        let dir = TempDir::new("redis");
        let path = |pki: &Pki, name: &str| pki.path(name).display().to_string();
        let (listen, cli_flags): (Vec<String>, Vec<String>) = match tls {
            None => (vec!["--port".into(), port.to_string()], vec![]),
            Some(pki) => (
                [
                    "--port".into(),
                    "0".into(),
                    "--tls-port".into(),
                    port.to_string(),
                    "--tls-cert-file".into(),
                    path(pki, "server.pem"),
                    "--tls-key-file".into(),
                    path(pki, "server.key"),
                    "--tls-ca-cert-file".into(),
                    path(pki, "ca.pem"),
                    "--tls-auth-clients".into(),
                    "yes".into(),
                ]
                .into(),
                [
                    "--tls".into(),
                    "--cert".into(),
                    path(pki, "client.pem"),
                    "--key".into(),
                    path(pki, "client.key"),
                    "--cacert".into(),
                    path(pki, "ca.pem"),
                ]
                .into(),
            ),
        };
        let child = Command::new("redis-server")
            .args(&listen)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(extra)
            .arg("--dir")
            .arg(&dir.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        let mut redis = Redis {
            child,
            port,
            cli_flags,
            _dir: dir,
        };
        let deadline = Instant::now() + READY;
        // Up once it answers, if only to ask for a password; ours only while our child runs
        // (another redis may hold the port).
        let answers = |redis: &Redis| {
            redis
                .cli(&["ping"])
                .is_some_and(|a| a == "PONG" || a.starts_with("NOAUTH"))
        };
        loop {
            if let Ok(Some(status)) = redis.child.try_wait() {
                return Err(format!(
                    "redis-server on {port} exited ({status}): port taken?"
                ));
            }
            if answers(&redis) {
                // Answered: ours, unless it exits on a port another one holds.
                if redis.child.try_wait().ok().flatten().is_none() {
                    return Ok(redis);
                }
                continue;
            }
            if Instant::now() >= deadline {
                return Err(format!("redis-server on {port} not ready"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `redis-cli` against it (over TLS if it speaks TLS); its trimmed output.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let flags: Vec<&str> = self.cli_flags.iter().map(String::as_str).collect();
        redis_cli(self.port, &[&flags[..], args].concat())
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `INCR hits` over an open app connection; whether it was answered within 5 s.
pub async fn incr_on(tcp: &mut tokio::io::BufReader<TcpStream>) -> bool {
    use tokio::io::AsyncBufReadExt;
    let exchange = async {
        let command = b"*2\r\n$4\r\nINCR\r\n$4\r\nhits\r\n";
        tcp.get_mut().write_all(command).await.ok()?;
        let mut line = String::new();
        tcp.read_line(&mut line).await.ok()?;
        Some(line.starts_with(':'))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), exchange).await,
        Ok(Some(true))
    )
}

/// One fresh app connection through `listen` running `INCR hits` (see [`incr_on`]).
pub async fn incr(listen: SocketAddr) -> bool {
    match TcpStream::connect(listen).await {
        Ok(tcp) => incr_on(&mut tokio::io::BufReader::new(tcp)).await,
        Err(_) => false,
    }
}

/// One RESP command on a fresh connection through `listen`, the write side closed after it;
/// everything answered.
pub async fn resp_call(listen: SocketAddr, command: &[&str]) -> std::io::Result<String> {
    let mut tcp = TcpStream::connect(listen).await?;
    let mut resp = format!("*{}\r\n", command.len());
    for arg in command {
        resp += &format!("${}\r\n{arg}\r\n", arg.len());
    }
    tcp.write_all(resp.as_bytes()).await?;
    tcp.shutdown().await?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// How many `INCR hits` reached this redis.
pub fn hits(redis: &Redis) -> usize {
    redis_cli(redis.port, &["get", "hits"])
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Runs `redis-cli -p PORT args...`; its trimmed output, or None if it failed.
pub fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.starts_with("Could not connect") && !text.is_empty())
        .then_some(text)
}

/// Bytes waiting in the receive queue of the UDP socket bound to `port` on 127.0.0.1.
pub fn udp_queued(port: u16) -> u64 {
    let local = format!("0100007F:{port:04X}");
    let table = std::fs::read_to_string("/proc/net/udp").unwrap();
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1) == Some(&local.as_str()))
        .and_then(|f| u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok())
        .unwrap_or_else(|| panic!("no UDP socket on {local} in /proc/net/udp"))
}

/// Yields to the runtime until `done`, failing after [`READY`].
pub async fn yield_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + READY;
    while !done() {
        assert!(std::time::Instant::now() < deadline, "not in time: {what}");
        tokio::task::yield_now().await;
    }
}

/// A TCP address whose connects hang until [`Stalled::release`]: a listener with a backlog of
/// 0 whose one queue slot is taken, so the kernel drops further SYNs (the dialer retries them
/// after its SYN timeout, 1 s, then 3, 7, ... until it gives up about two minutes later).
pub struct Stalled {
    listener: Option<tokio::net::TcpListener>,
    pub addr: SocketAddr,
    _filler: tokio::net::TcpStream,
}

impl Stalled {
    pub async fn new() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let filler = tokio::time::timeout(READY, tokio::net::TcpStream::connect(addr))
            .await
            .expect("the filler connection to the stalled listener")
            .unwrap();
        Stalled {
            listener: Some(listener),
            addr,
            _filler: filler,
        }
    }

    /// Waits until `n` connects toward it are in progress (`SYN_SENT` in `/proc/net/tcp`).
    pub fn wait_connecting(&self, n: usize) {
        let port = format!(":{:04X}", self.addr.port());
        let deadline = std::time::Instant::now() + READY;
        loop {
            let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
            let connecting = table
                .lines()
                .filter_map(|l| {
                    let fields: Vec<&str> = l.split_whitespace().collect();
                    Some((*fields.get(2)?, *fields.get(3)?))
                })
                .filter(|(remote, state)| remote.ends_with(&port) && *state == "02")
                .count();
            if connecting >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{connecting} of {n} connects toward {} in progress",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Accepts (and drops) every connection from now on: with a backlog raised for all of
    /// them at once, the hanging connects complete together at their next SYN retry.
    pub fn release(&mut self) {
        let listener = self.listener.take().unwrap();
        socket2::SockRef::from(&listener).listen(4096).unwrap();
        tokio::spawn(async move { while listener.accept().await.is_ok() {} });
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An in-process TCP upstream that counts the connections it accepted.
pub struct Upstream {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Serves each connection with `serve`.
    pub async fn start<F, Fut>(serve: F) -> Self
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), serve)
    }

    pub fn start_on<F, Fut>(listener: TcpListener, serve: F) -> Self
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp));
            }
        });
        Upstream {
            addr,
            accepted,
            task,
        }
    }

    /// An echo server.
    pub async fn echo() -> Self {
        Self::start(echo).await
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Echoes until EOF, then closes its write side.
pub async fn echo(mut tcp: TcpStream) {
    let (mut r, mut w) = tcp.split();
    if tokio::io::copy(&mut r, &mut w).await.is_ok() {
        let _ = w.shutdown().await;
    }
}

/// Reads to EOF.
pub async fn read_all(tcp: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    tcp.read_to_end(&mut out).await?;
    Ok(out)
}

/// Reads `count` every `every` until two readings agree (what it counts has stopped moving) and
/// returns that reading; panics after [`READY`].
pub async fn until_still<T: PartialEq + Copy>(every: Duration, count: impl Fn() -> T) -> T {
    tokio::time::timeout(READY, async {
        let mut last = count();
        loop {
            tokio::time::sleep(every).await;
            let now = count();
            if now == last {
                return now;
            }
            last = now;
        }
    })
    .await
    .expect("the count never stopped moving")
}

/// Connects through the client and checks an echo round trip; returns whether it worked.
pub async fn echo_works(addr: SocketAddr) -> bool {
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return false;
    };
    if tcp.write_all(b"ping").await.is_err() || tcp.shutdown().await.is_err() {
        return false;
    }
    matches!(tokio::time::timeout(READY, read_all(&mut tcp)).await, Ok(Ok(v)) if v == b"ping")
}

/// Asserts that the connection ends with a reset (not a clean FIN), within `READY`.
pub async fn assert_reset(tcp: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + READY;
    loop {
        let read = tokio::time::timeout(READY, tcp.read(&mut buf))
            .await
            .expect("no reset in time");
        match read {
            Ok(0) => panic!("connection ended with a clean FIN, expected a reset"),
            Ok(_) => assert!(
                Instant::now() < deadline,
                "data kept coming, expected a reset"
            ),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                return;
            }
        }
    }
}

/// Connects to `addr`, sends `bytes`, and asserts the connection is reset: during the connect,
/// the write, or the read after it (a fast refusal may arrive before `connect` returns).
pub async fn assert_reset_after_write(addr: SocketAddr, bytes: &[u8]) {
    let is_reset = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        )
    };
    let mut tcp = match TcpStream::connect(addr).await {
        Ok(tcp) => tcp,
        Err(e) => return assert!(is_reset(&e), "connect to {addr}: {e}"),
    };
    if let Err(e) = tcp.write_all(bytes).await {
        return assert!(is_reset(&e), "write to {addr}: {e}");
    }
    assert_reset(&mut tcp).await;
}

/// Raises this process's descriptor limits (root may raise the hard limit); children inherit.
pub fn raise_nofile(want: u64) {
    use rlimit::Resource;
    let (soft, hard) = Resource::NOFILE.get().unwrap();
    if hard < want && Resource::NOFILE.set(want, want).is_ok() {
        return;
    }
    let _ = Resource::NOFILE.set(soft.max(hard.min(want)), hard);
}

/// Runs blocking work (child processes, waits) off the async worker threads.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Open descriptors of a process.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// A real `dnsmasq` serving the records of its config lines (`srv-host=...`,
/// `host-record=...`) on a free loopback port, with a 1 s TTL; killed on drop.
pub struct Dnsmasq {
    child: Child,
    pub port: u16,
    dir: TempDir,
}

impl Dnsmasq {
    pub fn start(records: &[String]) -> Self {
        let dir = TempDir::new("dnsmasq");
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            match Self::try_start(&dir, port, records) {
                Ok(child) => return Dnsmasq { child, port, dir },
                Err(why) => last = why,
            }
        }
        panic!("{last}")
    }

    /// `ADDR:PORT` for `--dns-server`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Serves `records` instead, on the same port (dnsmasq reads SRV records only at start).
    pub fn replace(&mut self, records: &[String]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child =
            Self::try_start(&self.dir, self.port, records).unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_start(dir: &TempDir, port: u16, records: &[String]) -> Result<Child, String> {
        let conf = dir.0.join("dnsmasq.conf");
        let mut text = format!(
            "port={port}\nlisten-address=127.0.0.1\nbind-interfaces\nno-resolv\nno-hosts\n\
             no-poll\nlocal-ttl=1\nuser=root\npid-file=\n"
        );
        for line in records {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(&conf, text).unwrap();
        let mut child = Command::new("dnsmasq")
            .arg("-k")
            .arg(format!("--conf-file={}", conf.display()))
            .arg("--log-facility=-")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dnsmasq must be installed (apt-get install dnsmasq-base)");
        // It logs `started` once its sockets are bound, or says why it exits; the rest of its
        // log is drained so that it never blocks on (or dies of) a full pipe.
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let (lines, said) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let mut before = Vec::new();
        while let Ok(line) = said.recv_timeout(READY) {
            if line.contains("started, version") {
                return Ok(child);
            }
            before.push(line);
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(format!(
            "dnsmasq on {port} did not start: {}",
            before.join("; ")
        ))
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real single-node `etcd` on free loopback ports with its own data directory; killed on
/// drop. [`Etcd::stop`] and [`Etcd::start_again`] keep its ports and data.
pub struct Etcd {
    child: Option<Child>,
    pub port: u16,
    peer_port: u16,
    dir: TempDir,
    /// Served over TLS with this PKI's `server` certificate, requiring client certificates
    /// of its CA.
    tls: Option<PathBuf>,
}

impl Etcd {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Over TLS (`etcds://`): its certificate is `pki`'s server one; clients must present one
    /// of `pki`'s CA.
    pub fn start_tls(pki: &Pki) -> Self {
        Self::start_with(Some(pki.dir.0.clone()))
    }

    fn start_with(tls: Option<PathBuf>) -> Self {
        let mut etcd = Etcd {
            child: None,
            port: free_port(),
            peer_port: free_port(),
            dir: TempDir::new("etcd"),
            tls,
        };
        etcd.start_again();
        etcd
    }

    /// `etcd://127.0.0.1:PORT/key` (`etcds://` over TLS) for `--peer`, `--route`, `--register`.
    pub fn url(&self, key: &str) -> String {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        let key = key.trim_start_matches('/');
        format!("{scheme}://127.0.0.1:{}/{key}", self.port)
    }

    /// Runs `etcdctl` against it; its trimmed output, or None if it failed.
    pub fn ctl(&self, args: &[&str]) -> Option<String> {
        let mut ctl = Command::new("etcdctl");
        if let Some(pki) = &self.tls {
            ctl.arg(format!("--cacert={}", pki.join("ca.pem").display()))
                .arg(format!("--cert={}", pki.join("client.pem").display()))
                .arg(format!("--key={}", pki.join("client.key").display()));
        }
        let out = ctl
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=127.0.0.1:{}", self.port))
            .arg("--dial-timeout=2s")
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The keys under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.ctl(&["get", "--prefix", "--keys-only", prefix])
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect()
    }

    /// Kills it (its data stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it on its ports and data, and waits until it answers.
    pub fn start_again(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.port);
        let mut etcd = Command::new("etcd");
        if let Some(pki) = &self.tls {
            etcd.arg(format!("--cert-file={}", pki.join("server.pem").display()))
                .arg(format!("--key-file={}", pki.join("server.key").display()))
                .arg(format!(
                    "--trusted-ca-file={}",
                    pki.join("ca.pem").display()
                ))
                .arg("--client-cert-auth");
        }
        let child = etcd
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.0.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd must be installed (apt-get install etcd-server etcd-client)");
        self.child = Some(child);
        let deadline = Instant::now() + READY;
        while self.ctl(&["endpoint", "health"]).is_none() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("etcd on {} exited ({status}): port taken?", self.port);
            }
            assert!(Instant::now() < deadline, "etcd on {} not ready", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The metrics endpoint `amb` reported listening on.
pub fn metrics_addr(amb: &Amb) -> SocketAddr {
    let line = amb.log.wait_for(&["metrics endpoint listening"]);
    field(&line, "addr").parse().unwrap()
}

/// `curl` GET of `path`: the status code and the body.
pub async fn curl(addr: SocketAddr, path: &str) -> (u16, String) {
    let url = format!("http://{addr}{path}");
    let out = blocking(move || {
        Command::new("curl")
            .args(["-s", "-m", "5", "-w", "\n%{http_code}", &url])
            .output()
            .unwrap()
    })
    .await;
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.parse().unwrap_or(0), body.to_owned())
}

/// A scrape of `/metrics`.
pub async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = curl(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of `series` (name and labels, as encoded) in a scrape.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until `series` reads `want`; the last scrape.
pub async fn wait_sample(addr: SocketAddr, series: &str, want: f64) -> String {
    wait_until(addr, series, |v| v == want).await
}

/// Scrapes until `series` reads a value `good` accepts; the last scrape.
pub async fn wait_until(addr: SocketAddr, series: &str, good: impl Fn(f64) -> bool) -> String {
    let deadline = std::time::Instant::now() + READY;
    loop {
        let text = scrape(addr).await;
        if sample(&text, series).is_some_and(&good) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{series} never read the value wanted; last scrape:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `len` random bytes through the echo and checks they come back exactly; `midway` runs
/// once a third has come back.
pub async fn echo_exact(
    addr: std::net::SocketAddr,
    len: usize,
    midway: impl std::future::Future<Output = ()>,
) {
    let mut payload = vec![0u8; len];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut payload);
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = tcp.split();
    let send = async {
        for chunk in payload.chunks(64 << 10) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut got = Vec::with_capacity(len);
        let mut buf = vec![0u8; 64 << 10];
        let mut midway = Some(midway);
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                return got;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() >= len / 3 {
                if let Some(f) = midway.take() {
                    f.await;
                }
            }
        }
    };
    let ((), got) = tokio::time::timeout(READY * 6, async { tokio::join!(send, recv) })
        .await
        .expect("transfer stalled");
    assert_eq!(got.len(), len);
    assert!(
        <sha2::Sha256 as sha2::Digest>::digest(&got)
            == <sha2::Sha256 as sha2::Digest>::digest(&payload),
        "bytes altered on the impaired link"
    );
}
