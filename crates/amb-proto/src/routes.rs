//! The route table and the authorization decision, made before any upstream dial.

use std::collections::BTreeMap;

use crate::identity::{AllowList, PeerIdentity};
use crate::route::RouteName;
use crate::status::Refusal;

/// Maps route names to upstreams, with an optional allow-list guarding every route.
///
/// `U` is whatever the engine dials (an address list); this type only decides.
#[derive(Clone, Debug)]
pub struct RouteTable<U> {
    routes: BTreeMap<RouteName, U>,
    allow: Option<AllowList>,
}

impl<U> RouteTable<U> {
    /// A table; `allow: None` admits every peer whose certificate verified.
    pub fn new(routes: BTreeMap<RouteName, U>, allow: Option<AllowList>) -> Self {
        RouteTable { routes, allow }
    }

    /// Decides whether `peer` may open `route`, and if so which upstream to dial.
    ///
    /// Authorization is checked first, so an unauthorized peer learns nothing about which
    /// routes exist.
    pub fn decide(&self, peer: &PeerIdentity, route: &RouteName) -> Result<&U, Refusal> {
        if let Some(allow) = &self.allow {
            if !allow.permits(peer) {
                return Err(Refusal::Forbidden);
            }
        }
        self.routes.get(route).ok_or(Refusal::UnknownRoute)
    }

    /// The same table with each upstream turned into what `f` makes of it.
    pub fn map<V>(&self, f: impl FnMut(&U) -> V) -> RouteTable<V> {
        let mut f = f;
        RouteTable {
            routes: self.routes.iter().map(|(k, u)| (k.clone(), f(u))).collect(),
            allow: self.allow.clone(),
        }
    }

    /// The configured routes, for start-up logs.
    pub fn iter(&self) -> impl Iterator<Item = (&RouteName, &U)> {
        self.routes.iter()
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
