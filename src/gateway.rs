//! The runtime form of a validated configuration: the compiled route table with a ready
//! upstream peer per route. The proxy reads it once per request.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pingora::upstreams::peer::HttpPeer;

use crate::cache::{CacheEngine, CachedRoute};
use crate::config::{Config, RouteSpec, Upstream};
use crate::error::StoaError;
use crate::fetch::UpstreamClient;
use crate::routes::{PathTemplate, Routable, RouteTable};

/// How long an idle pooled upstream connection is kept.
const UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A route as served: its settings and the peer its requests go to.
#[derive(Debug)]
pub struct Route {
    pub spec: RouteSpec,
    pub peer: HttpPeer,
    /// Set on cached routes, which are answered from `request_filter`.
    pub cache: Option<Arc<CachedRoute>>,
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
    pub cache: Arc<CacheEngine>,
}

impl Gateway {
    /// Compiles `config`; cached routes share `cache` (which outlives configurations).
    pub fn new(config: &Config, cache: Arc<CacheEngine>) -> Result<Arc<Self>, StoaError> {
        let mut clients: HashMap<&str, UpstreamClient> = HashMap::new();
        let mut routes = Vec::with_capacity(config.routes.len());
        for spec in &config.routes {
            let cached = match &spec.cache {
                None => None,
                Some(settings) => {
                    let name = spec.upstream.name.as_str();
                    let client = match clients.get(name) {
                        Some(c) => c.clone(),
                        None => {
                            let c = UpstreamClient::new(&spec.upstream)?;
                            clients.insert(name, c.clone());
                            c
                        }
                    };
                    Some(Arc::new(CachedRoute {
                        name: spec.name.clone(),
                        settings: settings.clone(),
                        client,
                    }))
                }
            };
            routes.push(Route {
                peer: peer_for(&spec.upstream),
                spec: spec.clone(),
                cache: cached,
            });
        }
        Ok(Arc::new(Gateway {
            routes: RouteTable::new(routes),
            max_body_bytes: config.server.max_body_bytes,
            cache,
        }))
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
