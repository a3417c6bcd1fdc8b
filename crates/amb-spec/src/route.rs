//! A server route: a name clients ask for, and the upstreams it leads to.

use std::str::FromStr;

use amb_proto::RouteName;

use crate::UpstreamSetSpec;

/// One route: `NAME=UPSTREAM[,UPSTREAM...]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RouteSpec {
    /// What clients ask for.
    pub name: RouteName,
    /// Where its streams go.
    pub upstream: UpstreamSetSpec,
}

/// Why a route is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RouteSpecError(String);

impl FromStr for RouteSpec {
    type Err = RouteSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, upstream) = s.split_once('=').ok_or_else(|| {
            RouteSpecError(format!(
                "{s:?}: write NAME=UPSTREAM[,UPSTREAM...] with each HOST:PORT or unix:PATH, e.g. pg=db.internal:5432"
            ))
        })?;
        Ok(RouteSpec {
            name: name.parse().map_err(|e| RouteSpecError(format!("{e}")))?,
            upstream: upstream
                .parse()
                .map_err(|e| RouteSpecError(format!("{e}")))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_and_upstream() {
        let route: RouteSpec = "pg=db:5432".parse().unwrap();
        assert_eq!(
            (route.name.as_str(), route.upstream.to_string().as_str()),
            ("pg", "db:5432")
        );
        let route: RouteSpec = "cache=unix:/run/redis/redis.sock".parse().unwrap();
        assert_eq!(route.upstream.to_string(), "unix:/run/redis/redis.sock");
        for bad in ["pg", "PG=db:1", "pg=db"] {
            assert!(bad.parse::<RouteSpec>().is_err(), "{bad}");
        }
    }
}
