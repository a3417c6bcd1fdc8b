//! Client listener specs: `[ADDR:]PORT[=ROUTE]`. A bare port binds loopback only, so a
//! plaintext listener is never exposed by accident.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use amb_proto::RouteName;

use crate::PeerSpec;

/// One local listener and the route its connections ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSpec {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The route to open for each connection.
    pub route: RouteName,
    /// The servers its connections go to, when not the client's own `--peer`s (empty).
    pub peers: Vec<PeerSpec>,
}

/// Why a listener spec is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--listen {input:?}: {why}; write PORT, ADDR:PORT, or either followed by =ROUTE (e.g. 6379=redis)")]
pub struct ListenerSpecError {
    input: String,
    why: String,
}

impl FromStr for ListenerSpec {
    type Err = ListenerSpecError;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |why: String| ListenerSpecError {
            input: input.to_owned(),
            why,
        };
        let (addr, route) = match input.split_once('=') {
            Some((addr, route)) => (
                addr,
                route
                    .parse()
                    .map_err(|e: amb_proto::RouteNameError| err(e.to_string()))?,
            ),
            None => (input, RouteName::default_route()),
        };
        let addr = match addr.parse::<u16>() {
            Ok(port) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            Err(_) => addr
                .parse::<SocketAddr>()
                .map_err(|_| err(format!("{addr:?} is neither a port nor an IP:PORT address")))?,
        };
        Ok(ListenerSpec {
            addr,
            route,
            peers: Vec::new(),
        })
    }
}

/// How a client's listeners differ between two configurations ([`diff_listeners`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerChange {
    /// Only in the new configuration: bind it.
    Added(ListenerSpec),
    /// Only in the old: stop accepting there.
    Removed(ListenerSpec),
    /// The same address, now with another route or peer: the socket stays, new connections
    /// take the new target.
    Changed {
        /// As it was.
        old: ListenerSpec,
        /// As it is to be.
        new: ListenerSpec,
    },
}

/// What changes from `old` to `new`. A listener on a fixed port is the same listener while
/// its address is; one on port 0 (a port the system picks) is matched only by an equal spec,
/// since nothing else names it.
pub fn diff_listeners(old: &[ListenerSpec], new: &[ListenerSpec]) -> Vec<ListenerChange> {
    let mut unmatched: Vec<&ListenerSpec> = new.iter().collect();
    let mut changes = Vec::new();
    for was in old {
        let same = |now: &&ListenerSpec| {
            if was.addr.port() == 0 {
                *now == was
            } else {
                now.addr == was.addr
            }
        };
        match unmatched.iter().position(same) {
            Some(i) => {
                let now = unmatched.swap_remove(i);
                if now != was {
                    changes.push(ListenerChange::Changed {
                        old: was.clone(),
                        new: now.clone(),
                    });
                }
            }
            None => changes.push(ListenerChange::Removed(was.clone())),
        }
    }
    // In the order the new configuration gives them.
    let added = new
        .iter()
        .filter(|spec| unmatched.iter().any(|u| std::ptr::eq(*u, *spec)));
    changes.extend(added.cloned().map(ListenerChange::Added));
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(spec: &str, peer: Option<&str>) -> ListenerSpec {
        ListenerSpec {
            peers: peer.map(|p| p.parse().unwrap()).into_iter().collect(),
            ..spec.parse().unwrap()
        }
    }

    #[test]
    fn listeners_are_matched_by_address_and_port_zero_ones_by_all_they_say() {
        let old = [
            listener("6379=redis", None),
            listener("5432=pg", None),
            listener("8080=web", None),
            listener("0=a", None),
            listener("0=a", None),
            listener("0=b", None),
        ];
        let new = [
            listener("6379=redis", None),
            listener("5432=pg", Some("db:7443")),
            listener("9000=api", None),
            listener("0=a", None),
            listener("0=c", None),
        ];
        assert_eq!(
            diff_listeners(&old, &new),
            [
                ListenerChange::Changed {
                    old: old[1].clone(),
                    new: new[1].clone()
                },
                ListenerChange::Removed(old[2].clone()),
                ListenerChange::Removed(old[4].clone()),
                ListenerChange::Removed(old[5].clone()),
                ListenerChange::Added(new[2].clone()),
                ListenerChange::Added(new[4].clone()),
            ]
        );
        assert!(diff_listeners(&new, &new).is_empty());
    }

    #[test]
    fn bare_port_is_loopback_and_default_route() {
        let s: ListenerSpec = "6379".parse().unwrap();
        assert_eq!(s.addr, "127.0.0.1:6379".parse().unwrap());
        assert_eq!(s.route.as_str(), "default");
    }

    #[test]
    fn address_and_route() {
        let s: ListenerSpec = "0.0.0.0:5432=pg".parse().unwrap();
        assert_eq!(s.addr, "0.0.0.0:5432".parse().unwrap());
        assert_eq!(s.route.as_str(), "pg");
        let s: ListenerSpec = "[::1]:1=a".parse().unwrap();
        assert_eq!(s.addr, "[::1]:1".parse().unwrap());
        for bad in ["", "x", "6379=", "6379=Bad", "70000", "localhost:1"] {
            assert!(bad.parse::<ListenerSpec>().is_err(), "{bad}");
        }
    }
}
