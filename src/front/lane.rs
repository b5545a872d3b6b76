//! The one place a request's lane is chosen ([`choose`]), with its route looked up once.

use crate::error::StoaError;
use crate::gateway::Gateway;
use crate::proxy::{self, Routed};

pub use crate::lane::{Lane, Why};

use super::head::{Body, Head};

/// A request's lane and its route lookup (carried in its context, so that no phase looks
/// it up again). `head` is the request's head, `buf` the bytes read (the head first), and
/// `forwards` whether the front forwards pass-through requests (`server.front_forward`).
///
/// - `proxy:target`: a target that is not in origin form, or `CONNECT` (pingora reads it);
/// - `answer`: a cached or aggregate route, or none (stoa's 404, 405 or 400);
/// - a pass-through route: `forward` when the whole request is in `buf` and nothing in it
///   needs interpreting, else `proxy:off` (the front does not forward), `proxy:headers`
///   (an upgrade, `Expect`, a `Connection` that names headers) or `proxy:framing`
///   (HTTP/1.0, a chunked body, a body still to come).
pub fn choose(
    head: &Head,
    buf: &[u8],
    gateway: &Gateway,
    forwards: bool,
) -> (Lane, Option<Result<Routed, StoaError>>) {
    if !head.origin_form || head.method == http::Method::CONNECT {
        return (Lane::Proxy(Why::Target), None);
    }
    let target = head.target(buf);
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    let routing = proxy::route(gateway, &head.method, path, query);
    let pass_through = routing.as_ref().is_ok_and(|routed| {
        gateway
            .routes
            .routes()
            .get(routed.index)
            .is_some_and(|route| route.cache.is_none())
    });
    let lane = if !pass_through {
        Lane::Answer
    } else if !forwards {
        Lane::Proxy(Why::Off)
    } else if !head.plain {
        Lane::Proxy(Why::Headers)
    } else if !head.http11 || !body_in(head, buf) {
        Lane::Proxy(Why::Framing)
    } else {
        Lane::Forward
    };
    (lane, Some(routing))
}

/// Whether the request's body, if any, is whole in `buf` (the forwarder sends only those).
fn body_in(head: &Head, buf: &[u8]) -> bool {
    match head.body {
        Body::Length(n) => n <= (buf.len() - head.len) as u64,
        Body::Chunked => false,
    }
}
