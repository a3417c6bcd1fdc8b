//! TLS over a connected upstream stream, for services that speak it themselves
//! (`upstream-tls`): the service's certificate verified as strictly as a peer's.

use std::sync::Arc;

use amb_pki::{ServerName, ServiceTlsFiles};
use amb_spec::{UpstreamSpec, UpstreamTarget};
use tokio_rustls::rustls::ClientConfig;

use super::UpstreamStream;

/// Makes TLS connections over connected upstream streams.
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<ClientConfig>,
    /// The name every upstream's certificate must carry; `None`: each upstream's own host.
    server_name: Option<ServerName<'static>>,
}

impl TlsConnector {
    /// A connector with the configuration `files` make, expecting `server_name` (if given) in
    /// every upstream's certificate.
    pub fn new(files: &ServiceTlsFiles, server_name: Option<&str>) -> Result<Self, String> {
        let server_name = server_name
            .map(|name| {
                ServerName::try_from(name.to_owned())
                    .map_err(|_| format!("server-name {name:?} is not a DNS name or an IP address"))
            })
            .transpose()?;
        Ok(TlsConnector {
            config: files.client_config().map_err(|e| e.to_string())?,
            server_name,
        })
    }

    /// The name `upstream`'s certificate must carry: the one given, else its host.
    pub fn name_for(&self, upstream: &UpstreamSpec) -> Result<ServerName<'static>, String> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        match upstream.target() {
            UpstreamTarget::Tcp(host_port) => ServerName::try_from(host_port.host())
                .map_err(|_| format!("{upstream}: its host is not a name a certificate can carry; give server-name")),
            UpstreamTarget::Unix(_) => Err(format!(
                "{upstream}: a Unix socket has no host name to verify; give server-name"
            )),
        }
    }

    /// Shakes hands over `stream` with the upstream `upstream` and verifies it.
    pub async fn connect(
        &self,
        stream: UpstreamStream,
        upstream: &UpstreamSpec,
    ) -> Result<UpstreamStream, String> {
        let name = self.name_for(upstream)?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        let tls = connector
            .connect(name, stream)
            .await
            .map_err(|e| format!("TLS handshake failed: {e}"))?;
        Ok(UpstreamStream::Tls(Box::new(tls)))
    }
}
