//! Peers and pools: what every connection to an upstream is opened and kept with.

use std::time::Duration;

use pingora::upstreams::peer::HttpPeer;

use crate::config::Upstream;

/// How long an idle pooled upstream connection is kept, by either connector.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle connections kept per upstream by the client of cached fetches.
pub const MAX_IDLE_PER_UPSTREAM: usize = 256;

/// The pingora peer pass-through requests to `upstream` go to, with its timeouts.
pub fn peer_for(upstream: &Upstream) -> HttpPeer {
    let mut peer = HttpPeer::new(upstream.addr, false, String::new());
    peer.options.connection_timeout = Some(upstream.connect_timeout);
    peer.options.read_timeout = Some(upstream.timeout);
    peer.options.write_timeout = Some(upstream.timeout);
    peer.options.idle_timeout = Some(IDLE_TIMEOUT);
    peer
}
