//! The route table and the authorization decision, made before any upstream dial.

use std::collections::BTreeMap;

use crate::identity::{AllowList, PeerIdentity};
use crate::route::RouteName;
use crate::status::Refusal;

/// Maps route names to upstreams, with an optional allow-list guarding every route and one of
/// its own on any route.
///
/// `U` is whatever the engine dials (an address list); this type only decides.
#[derive(Clone, Debug)]
pub struct RouteTable<U> {
    routes: BTreeMap<RouteName, Route<U>>,
    allow: Option<AllowList>,
    /// Whether some route has an allow-list of its own: then an unknown route is answered as
    /// a forbidden one, so that no peer can tell which routes exist.
    any_restricted: bool,
}

/// How a route differs between two tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteChange {
    /// Only in the new table.
    Added,
    /// Only in the old table.
    Removed,
    /// In both, with another upstream or allow-list.
    Changed,
}

#[derive(Clone, Debug)]
struct Route<U> {
    upstream: U,
    allow: Option<AllowList>,
}

impl<U> RouteTable<U> {
    /// A table; `allow: None` admits every peer whose certificate verified.
    pub fn new(routes: BTreeMap<RouteName, U>, allow: Option<AllowList>) -> Self {
        let routes = routes
            .into_iter()
            .map(|(name, upstream)| {
                (
                    name,
                    Route {
                        upstream,
                        allow: None,
                    },
                )
            })
            .collect();
        RouteTable {
            routes,
            allow,
            any_restricted: false,
        }
    }

    /// Admits to `route` only the peers `allow` permits (besides the table's own list).
    /// Returns false if there is no such route.
    pub fn restrict(&mut self, route: &RouteName, allow: AllowList) -> bool {
        let Some(entry) = self.routes.get_mut(route) else {
            return false;
        };
        entry.allow = Some(allow);
        self.any_restricted = true;
        true
    }

    /// Decides whether `peer` may open `route`, and if so which upstream to dial.
    ///
    /// Authorization is checked first, so an unauthorized peer learns nothing about which
    /// routes exist; once any route has a list of its own, an unknown route is refused as
    /// forbidden too, since a 404 there would tell a peer that a 403 route exists.
    pub fn decide(&self, peer: &PeerIdentity, route: &RouteName) -> Result<&U, Refusal> {
        if !self.admits_peer(peer) {
            return Err(Refusal::Forbidden);
        }
        match self.routes.get(route) {
            Some(Route {
                allow: Some(allow), ..
            }) if !allow.permits(peer) => Err(Refusal::Forbidden),
            Some(route) => Ok(&route.upstream),
            None if self.any_restricted => Err(Refusal::Forbidden),
            None => Err(Refusal::UnknownRoute),
        }
    }

    /// Whether the table-wide allow-list (if any) admits `peer`: a peer it does not is refused
    /// every route.
    pub fn admits_peer(&self, peer: &PeerIdentity) -> bool {
        self.allow.as_ref().is_none_or(|allow| allow.permits(peer))
    }

    /// The same table with each upstream turned into what `f` makes of it (and its route name).
    pub fn map<V>(&self, mut f: impl FnMut(&RouteName, &U) -> V) -> RouteTable<V> {
        let routes = self.routes.iter().map(|(name, route)| {
            let mapped = Route {
                upstream: f(name, &route.upstream),
                allow: route.allow.clone(),
            };
            (name.clone(), mapped)
        });
        RouteTable {
            routes: routes.collect(),
            allow: self.allow.clone(),
            any_restricted: self.any_restricted,
        }
    }

    /// What changed from `self` to `new`, route by route, in name order: a route whose
    /// upstream or own allow-list differs is changed. (The table-wide list is compared by the
    /// caller: it touches every route.)
    pub fn diff(&self, new: &RouteTable<U>) -> Vec<(RouteName, RouteChange)>
    where
        U: PartialEq,
    {
        let mut changes = Vec::new();
        for (name, old) in &self.routes {
            match new.routes.get(name) {
                None => changes.push((name.clone(), RouteChange::Removed)),
                Some(now) if now.upstream != old.upstream || now.allow != old.allow => {
                    changes.push((name.clone(), RouteChange::Changed))
                }
                Some(_) => {}
            }
        }
        for name in new.routes.keys().filter(|n| !self.routes.contains_key(*n)) {
            changes.push((name.clone(), RouteChange::Added));
        }
        changes.sort_by(|a, b| a.0.cmp(&b.0));
        changes
    }

    /// Whether the table-wide allow-lists of `self` and `other` are the same.
    pub fn same_allow(&self, other: &RouteTable<U>) -> bool {
        self.allow == other.allow
    }

    /// The upstream of `route`, whoever asks.
    pub fn upstream(&self, route: &RouteName) -> Option<&U> {
        self.routes.get(route).map(|r| &r.upstream)
    }

    /// The configured routes, for start-up logs.
    pub fn iter(&self) -> impl Iterator<Item = (&RouteName, &U)> {
        self.routes
            .iter()
            .map(|(name, route)| (name, &route.upstream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::San;

    fn table(allow: Option<&str>) -> RouteTable<&'static str> {
        let routes = [("redis".parse().unwrap(), "127.0.0.1:6379")]
            .into_iter()
            .collect();
        let allow = allow.map(|a| AllowList::new(vec![a.parse().unwrap()]).unwrap());
        RouteTable::new(routes, allow)
    }

    fn peer(s: &str) -> PeerIdentity {
        PeerIdentity {
            sans: vec![s.parse::<San>().unwrap()],
        }
    }

    #[test]
    fn known_route_without_allow_list() {
        let t = table(None);
        assert_eq!(
            t.decide(&peer("dns:x"), &"redis".parse().unwrap()),
            Ok(&"127.0.0.1:6379")
        );
        assert_eq!(
            t.decide(&peer("dns:x"), &"pg".parse().unwrap()),
            Err(Refusal::UnknownRoute)
        );
    }

    #[test]
    fn a_route_of_its_own_list_admits_only_those_and_hides_the_others() {
        let mut t: RouteTable<&str> = RouteTable::new(
            [
                ("redis".parse().unwrap(), "r:1"),
                ("pg".parse().unwrap(), "p:1"),
            ]
            .into_iter()
            .collect(),
            None,
        );
        let web = AllowList::new(vec!["uri:spiffe://amb/web".parse().unwrap()]).unwrap();
        assert!(t.restrict(&"redis".parse().unwrap(), web.clone()));
        assert!(!t.restrict(&"nope".parse().unwrap(), web));
        let (web, worker) = (
            peer("uri:spiffe://amb/web"),
            peer("uri:spiffe://amb/worker"),
        );
        let route = |s: &str| s.parse::<RouteName>().unwrap();
        assert_eq!(t.decide(&web, &route("redis")), Ok(&"r:1"));
        assert_eq!(t.decide(&worker, &route("redis")), Err(Refusal::Forbidden));
        assert_eq!(t.decide(&worker, &route("pg")), Ok(&"p:1"), "an open route");
        assert_eq!(
            t.decide(&worker, &route("nope")),
            Err(Refusal::Forbidden),
            "unknown and forbidden routes answer alike"
        );
        let mapped = t.map(|_, u| u.len());
        assert_eq!(
            mapped.decide(&worker, &route("redis")),
            Err(Refusal::Forbidden)
        );
    }

    #[test]
    fn a_diff_names_routes_added_removed_and_changed() {
        let table = |routes: &[(&str, &'static str)]| -> RouteTable<&'static str> {
            let map = routes
                .iter()
                .map(|(n, u)| (n.parse().unwrap(), *u))
                .collect();
            RouteTable::new(map, None)
        };
        let old = table(&[("a", "a:1"), ("b", "b:1"), ("c", "c:1")]);
        let mut new = table(&[("a", "a:1"), ("b", "b:2"), ("d", "d:1"), ("c", "c:1")]);
        let list = AllowList::new(vec!["dns:x".parse().unwrap()]).unwrap();
        new.restrict(&"c".parse().unwrap(), list);
        let named: Vec<_> = old
            .diff(&new)
            .into_iter()
            .map(|(n, c)| (n.as_str().to_owned(), c))
            .collect();
        assert_eq!(
            named,
            [
                ("b".to_owned(), RouteChange::Changed),
                ("c".to_owned(), RouteChange::Changed),
                ("d".to_owned(), RouteChange::Added),
            ]
        );
        assert_eq!(
            new.diff(&old)[2],
            ("d".parse().unwrap(), RouteChange::Removed)
        );
        assert!(old.diff(&old).is_empty() && old.same_allow(&new));
    }

    #[test]
    fn unauthorized_peer_learns_nothing_about_routes() {
        let t = table(Some("uri:spiffe://amb/client"));
        let stranger = peer("dns:x");
        assert_eq!(
            t.decide(&stranger, &"redis".parse().unwrap()),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            t.decide(&stranger, &"pg".parse().unwrap()),
            Err(Refusal::Forbidden)
        );
        let ok = peer("uri:spiffe://amb/client");
        assert!(t.decide(&ok, &"redis".parse().unwrap()).is_ok());
    }
}
