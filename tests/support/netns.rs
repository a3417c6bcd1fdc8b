//! A network namespace joined to the host by a veth pair, removed on drop: a process run in it
//! reaches the host at [`Netns::host_ip`] and is reached at [`Netns::ns_ip`], and a firewall
//! rule inside it (nftables) touches no other test.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};

pub struct Netns {
    pub name: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
    host_veth: String,
}

/// Runs `ip ARGS...`, panicking with its output on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip(8) must be installed");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    pub fn new() -> Self {
        // One subnet per namespace of this process; the pid keeps processes apart.
        static NEXT: AtomicU8 = AtomicU8::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id() % 100_000);
        let (name, host_veth, ns_veth) = (format!("amb{id}"), format!("ah{id}"), format!("an{id}"));
        let subnet = (std::process::id() % 200) as u8 + 20;
        let (host_ip, ns_ip) = (
            Ipv4Addr::new(10, subnet, n, 1),
            Ipv4Addr::new(10, subnet, n, 2),
        );
        ip(&["netns", "add", &name]);
        let netns = Netns {
            name,
            host_ip,
            ns_ip,
            host_veth,
        };
        ip(&[
            "link",
            "add",
            &netns.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &ns_veth,
        ]);
        ip(&["link", "set", &ns_veth, "netns", &netns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{host_ip}/24"),
            "dev",
            &netns.host_veth,
        ]);
        ip(&["link", "set", &netns.host_veth, "up"]);
        netns.exec(&["ip", "addr", "add", &format!("{ns_ip}/24"), "dev", &ns_veth]);
        netns.exec(&["ip", "link", "set", &ns_veth, "up"]);
        netns.exec(&["ip", "link", "set", "lo", "up"]);
        netns
    }

    /// Runs a command inside, panicking with its output on failure.
    pub fn exec(&self, command: &[&str]) {
        let mut args = vec!["netns", "exec", &self.name];
        args.extend_from_slice(command);
        ip(&args);
    }

    /// The shell prefix that runs a command inside: `ip netns exec NAME`.
    pub fn prefix(&self) -> String {
        format!("ip netns exec {}", self.name)
    }

    /// Drops UDP datagrams sent from inside to `port` (`on`), or lets them pass again.
    pub fn drop_udp_to(&self, port: u16, on: bool) {
        if on {
            self.exec(&["nft", "add", "table", "inet", "amb"]);
            self.exec(&[
                "nft",
                "add chain inet amb out { type filter hook output priority 0 ; }",
            ]);
            self.exec(&[
                "nft",
                &format!("add rule inet amb out udp dport {port} drop"),
            ]);
        } else {
            self.exec(&["nft", "delete", "table", "inet", "amb"]);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and so the pair.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .status();
    }
}
