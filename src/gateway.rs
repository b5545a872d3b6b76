//! The runtime form of a validated configuration: the compiled route table with a ready
//! upstream peer per route. The proxy reads it once per request.

use std::sync::Arc;
use std::time::Duration;

use pingora::upstreams::peer::HttpPeer;

use crate::config::{Config, RouteSpec, Upstream};
use crate::routes::{PathTemplate, Routable, RouteTable};

/// How long an idle pooled upstream connection is kept.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A route as served: its settings and the peer its requests go to.
#[derive(Debug)]
pub struct Route {
    pub spec: RouteSpec,
    pub peer: HttpPeer,
}

impl Routable for Route {
    fn path(&self) -> &PathTemplate {
        &self.spec.path
    }
    fn methods(&self) -> Option<&[http::Method]> {
        self.spec.methods.as_deref()
    }
}

impl Route {
    pub fn upstream(&self) -> &Upstream {
        &self.spec.upstream
    }
}

/// Everything the request path needs, built once from a [`Config`].
#[derive(Debug)]
pub struct Gateway {
    pub routes: RouteTable<Route>,
    pub max_body_bytes: u64,
}

impl Gateway {
    pub fn new(config: &Config) -> Arc<Self> {
        let routes = config
            .routes
            .iter()
            .map(|spec| Route {
                peer: peer_for(&spec.upstream),
                spec: spec.clone(),
            })
            .collect();
        Arc::new(Gateway {
            routes: RouteTable::new(routes),
            max_body_bytes: config.server.max_body_bytes,
        })
    }
}

fn peer_for(upstream: &Upstream) -> HttpPeer {
    let mut peer = HttpPeer::new(upstream.addr, false, String::new());
    peer.options.connection_timeout = Some(upstream.connect_timeout);
    peer.options.read_timeout = Some(upstream.timeout);
    peer.options.write_timeout = Some(upstream.timeout);
    peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
    peer
}
