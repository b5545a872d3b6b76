//! What stoa's phases need of a request's exchange with its client: its head, where it came
//! from, its body, and the writing of an answer. pingora's proxy session is one; the front
//! has its own for the requests it answers (`crate::front::exchange`), which reads nothing
//! twice and makes pingora's session only when an answer must go through it.

use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::Session;

/// A request's exchange with its client, as stoa's phases use it. The methods are those of
/// pingora's proxy session, by the same names.
pub trait Exchange: Send {
    fn req_header(&self) -> &RequestHeader;

    fn req_header_mut(&mut self) -> &mut RequestHeader;

    /// The address a request came from: the peer of its connection (a proxy's, when it
    /// came through one). Its client, as the rate limiter and the access log know it, is
    /// `crate::ratelimit::client_addr` of it.
    fn peer_ip(&self) -> Option<IpAddr>;

    /// Whether the request came over TLS (the TLS listener).
    fn over_tls(&self) -> bool;

    fn is_http2(&self) -> bool;

    /// The connection's stream (HTTP/1).
    fn stream(&self) -> Option<&Stream>;

    /// Whether an HTTP/1.1 answer written now would leave the connection open.
    fn will_keepalive(&self) -> bool;

    fn is_body_empty(&mut self) -> bool;

    fn is_body_done(&mut self) -> bool;

    fn set_keepalive(&mut self, duration: Option<u64>);

    fn set_read_timeout(&mut self, timeout: Option<Duration>);

    fn response_written(&self) -> Option<&ResponseHeader>;

    fn body_bytes_sent(&self) -> usize;

    fn read_request_body(&mut self) -> impl Future<Output = Result<Option<Bytes>>> + Send;

    fn write_response_header(
        &mut self,
        resp: Box<ResponseHeader>,
        end_of_stream: bool,
    ) -> impl Future<Output = Result<()>> + Send;

    fn write_response_body(
        &mut self,
        data: Option<Bytes>,
        end_of_stream: bool,
    ) -> impl Future<Output = Result<()>> + Send;
}

impl Exchange for Session {
    fn req_header(&self) -> &RequestHeader {
        self.downstream_session.req_header()
    }

    fn req_header_mut(&mut self) -> &mut RequestHeader {
        self.downstream_session.req_header_mut()
    }

    fn peer_ip(&self) -> Option<IpAddr> {
        self.downstream_session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
    }

    fn over_tls(&self) -> bool {
        self.downstream_session
            .digest()
            .is_some_and(|d| d.ssl_digest.is_some())
    }

    fn is_http2(&self) -> bool {
        self.downstream_session.is_http2()
    }

    fn stream(&self) -> Option<&Stream> {
        self.downstream_session.stream()
    }

    fn will_keepalive(&self) -> bool {
        match &*self.downstream_session {
            ServerSession::H1(v1) => v1.will_keepalive(),
            _ => false,
        }
    }

    fn is_body_empty(&mut self) -> bool {
        self.downstream_session.is_body_empty()
    }

    fn is_body_done(&mut self) -> bool {
        self.downstream_session.is_body_done()
    }

    fn set_keepalive(&mut self, duration: Option<u64>) {
        self.downstream_session.set_keepalive(duration);
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.downstream_session.set_read_timeout(timeout);
    }

    fn response_written(&self) -> Option<&ResponseHeader> {
        self.downstream_session.response_written()
    }

    fn body_bytes_sent(&self) -> usize {
        self.downstream_session.body_bytes_sent()
    }

    fn read_request_body(&mut self) -> impl Future<Output = Result<Option<Bytes>>> + Send {
        self.downstream_session.read_request_body()
    }

    fn write_response_header(
        &mut self,
        resp: Box<ResponseHeader>,
        end_of_stream: bool,
    ) -> impl Future<Output = Result<()>> + Send {
        // The proxy session's own: it runs the downstream modules.
        Session::write_response_header(self, resp, end_of_stream)
    }

    fn write_response_body(
        &mut self,
        data: Option<Bytes>,
        end_of_stream: bool,
    ) -> impl Future<Output = Result<()>> + Send {
        Session::write_response_body(self, data, end_of_stream)
    }
}

/// The address of a connection's peer, from its stream.
pub fn peer_of(stream: &Stream) -> Option<IpAddr> {
    let peer = stream.get_socket_digest()?.peer_addr()?.as_inet()?.ip();
    Some(peer)
}
