//! The TLS listener's handshakes: TLS 1.2 and 1.3, ALPN offering HTTP/2 and HTTP/1.1, and
//! the certificate of the current configuration (a reload that read new certificate files
//! changes what the next handshake presents; open connections keep theirs).

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::listeners::tls::Acceptor;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use crate::gateway::Gateway;

/// Presents the certificate of the configuration in force.
struct CurrentCertificate {
    gateway: Arc<ArcSwap<Gateway>>,
    /// The certificate read at start, should a reloaded configuration have no TLS listener
    /// (the listener itself stays until restart).
    first: Arc<CertifiedKey>,
}

impl fmt::Debug for CurrentCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentCertificate")
    }
}

impl ResolvesServerCert for CurrentCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let gateway = self.gateway.load();
        Some(match &gateway.config.server.tls {
            Some(tls) => tls.certified.clone(),
            None => self.first.clone(),
        })
    }
}

/// The acceptor of the TLS listener, whose certificate follows the configuration.
pub fn acceptor(
    gateway: Arc<ArcSwap<Gateway>>,
    first: Arc<CertifiedKey>,
) -> anyhow::Result<Acceptor> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(CurrentCertificate { gateway, first }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Acceptor::from_server_config(Arc::new(config)))
}
