//! Docker-links variables: `REDIS_PORT_6379_TCP=tcp://big-server:7443`, the form `docker run
//! --link` injects, read by `--from-env`. The alias (`REDIS`, lower-cased) names the route, the
//! port in the variable's name is the service's port, the value says where it is.

use std::fmt;

use amb_proto::RouteName;

use crate::HostPort;

/// One `ALIAS_PORT_N_TCP=tcp://HOST:PORT` variable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerLink {
    /// The variable, for messages.
    pub variable: String,
    /// The alias, lower-cased: the route.
    pub route: RouteName,
    /// The port in the variable's name (the service's own port).
    pub port: u16,
    /// The value's address.
    pub addr: HostPort,
}

/// A variable of the links form that cannot be used; names it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{variable}={value:?}: {why}; the Docker-links form is ALIAS_PORT_6379_TCP=tcp://HOST:PORT"
)]
pub struct DockerLinkError {
    variable: String,
    value: String,
    why: String,
}

impl fmt::Display for DockerLink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (route {}, {})", self.variable, self.route, self.addr)
    }
}

/// The links among `vars`, sorted by variable name: every variable named `*_PORT_*_TCP`
/// (and nothing else) must be one; `_UDP` ones are not amb's to carry and are skipped.
pub fn docker_links(
    vars: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<DockerLink>, Vec<DockerLinkError>> {
    let mut links = Vec::new();
    let mut errors = Vec::new();
    for (variable, value) in vars {
        let Some(head) = variable.strip_suffix("_TCP") else {
            continue;
        };
        let Some((alias, port)) = head.rsplit_once("_PORT_") else {
            continue;
        };
        match parse_link(alias, port, &value) {
            Ok((route, port, addr)) => links.push(DockerLink {
                variable,
                route,
                port,
                addr,
            }),
            Err(why) => errors.push(DockerLinkError {
                variable,
                value,
                why,
            }),
        }
    }
    if !errors.is_empty() {
        errors.sort_by(|a, b| a.variable.cmp(&b.variable));
        return Err(errors);
    }
    links.sort_by(|a, b| a.variable.cmp(&b.variable));
    Ok(links)
}

fn parse_link(alias: &str, port: &str, value: &str) -> Result<(RouteName, u16, HostPort), String> {
    let route: RouteName = alias
        .to_ascii_lowercase()
        .parse()
        .map_err(|e| format!("the alias {alias:?} is no route name: {e}"))?;
    let port: u16 = match port.parse() {
        Ok(port) if port > 0 => port,
        _ => return Err(format!("{port:?} in the name is not a port (1-65535)")),
    };
    let addr = value
        .strip_prefix("tcp://")
        .ok_or("the value does not start with tcp://")?;
    let addr = HostPort::parse(addr).ok_or("the value is not tcp://HOST:PORT")?;
    Ok((route, port, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_alias_names_the_route_and_the_name_holds_the_port() {
        let links = docker_links(vars(&[
            ("PATH", "/usr/bin"),
            ("REDIS_PORT", "tcp://172.17.0.2:6379"),
            ("REDIS_PORT_6379_TCP", "tcp://172.17.0.2:6379"),
            ("REDIS_PORT_6379_TCP_ADDR", "172.17.0.2"),
            ("PG_MAIN_PORT_5432_TCP", "tcp://db-host:7443"),
            ("DNS_PORT_53_UDP", "udp://10.0.0.2:53"),
        ]))
        .unwrap();
        let seen: Vec<(&str, u16, String)> = links
            .iter()
            .map(|l| (l.route.as_str(), l.port, l.addr.to_string()))
            .collect();
        assert_eq!(
            seen,
            [
                ("pg_main", 5432, "db-host:7443".to_owned()),
                ("redis", 6379, "172.17.0.2:6379".to_owned()),
            ]
        );
    }

    #[test]
    fn each_malformed_variable_is_its_own_error() {
        let errors = docker_links(vars(&[
            ("A_PORT_x_TCP", "tcp://h:1"),
            ("B_PORT_80_TCP", "udp://h:1"),
            ("C_PORT_80_TCP", "tcp://h"),
            ("_PORT_80_TCP", "tcp://h:1"),
            ("OK_PORT_80_TCP", "tcp://h:1"),
        ]))
        .unwrap_err();
        let named: Vec<String> = errors.iter().map(|e| e.variable.clone()).collect();
        assert_eq!(
            named,
            [
                "A_PORT_x_TCP",
                "B_PORT_80_TCP",
                "C_PORT_80_TCP",
                "_PORT_80_TCP"
            ]
        );
        assert!(errors[1].to_string().contains("tcp://"), "{}", errors[1]);
    }
}
