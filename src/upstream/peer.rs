//! Peers and pools: what every connection to an upstream is opened and kept with.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};

use crate::config::Upstream;

/// How long an idle pooled upstream connection is kept, by either connector.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle connections kept per upstream by the client of cached fetches.
pub const MAX_IDLE_PER_UPSTREAM: usize = 256;

/// The pingora peer pass-through requests to `upstream` go to, with its timeouts, and for
/// an https upstream its TLS settings: SNI and the certificate name from the URL's host,
/// verified against `ca_file` or the system roots unless `tls_verify = false`, and the
/// client certificate if one is set.
pub fn peer_for(upstream: &Upstream) -> HttpPeer {
    let mut peer = match &upstream.tls {
        None => HttpPeer::new(upstream.addr, false, String::new()),
        Some(tls) => {
            let mut peer = HttpPeer::new(upstream.addr, true, tls.server_name.clone());
            peer.options.verify_cert = tls.verify;
            peer.options.verify_hostname = tls.verify;
            if let Some(ca) = &tls.ca {
                // The certificates were parsed when the configuration was loaded.
                let roots: Vec<WrappedX509> = ca
                    .iter()
                    .map(|der| WrappedX509::new(der.clone(), parse_x509))
                    .collect();
                peer.options.ca = Some(Arc::from(roots));
                // Pooled connections are shared by peers of equal hash, which leaves the
                // CA out: a connection verified against one CA is not reused for another.
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                ca.hash(&mut hasher);
                peer.group_key = hasher.finish();
            }
            if let Some(client) = &tls.client {
                peer.client_cert_key = Some(Arc::new(CertKey::new(
                    client.chain.clone(),
                    client.key.clone(),
                )));
            }
            peer
        }
    };
    peer.options.connection_timeout = Some(upstream.connect_timeout);
    peer.options.read_timeout = Some(upstream.timeout);
    peer.options.write_timeout = Some(upstream.timeout);
    peer.options.idle_timeout = Some(IDLE_TIMEOUT);
    peer
}
