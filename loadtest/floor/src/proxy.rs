//! `--path proxy`: pingora's `ProxyHttp` machinery with a fixed peer and nothing else.

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::prelude::*;

pub struct Floor {
    pub peer: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.peer, false, String::new())))
    }
}
