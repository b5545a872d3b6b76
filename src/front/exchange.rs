//! The exchange of a request the front answers itself (the `answer` lane): stoa's phases
//! read the head the front has already read, as a `RequestHeader` whose target and values
//! share the head's bytes, and an answer from an entry goes out as bytes. pingora's HTTP/1
//! session is made only when something must go through it (a body to read, an answer the
//! byte writer does not write): it then reads the head from the same bytes, and takes over
//! the header stoa's phases may have changed.

use std::future::Future;
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::proxy::Session;
use pingora::ErrorType;

use super::head::{Body, Head, MAX_HEADERS};
use super::Next;
use crate::exchange::Exchange;

/// What becomes of a connection once its answer is written ([`FrontExchange::into_next`]).
pub enum After {
    /// The connection and the bytes of the next request read with this one, if it goes on.
    Done(Option<Next>),
    /// pingora's session holds it, to end the answer with.
    Session(Box<ServerSession>),
}

/// A request on the `answer` lane, with its connection.
pub struct FrontExchange {
    header: RequestHeader,
    /// The connection, until pingora's session takes it.
    stream: Option<Stream>,
    /// The head's bytes, which the header's target and values share.
    head: Bytes,
    /// What was read past the head: the body, or requests pipelined after it.
    rest: BytesMut,
    body: Body,
    /// Whether the connection stays open after the answer.
    keepalive: bool,
    /// A read timeout set before pingora's session was made, for it.
    read_timeout: Option<Option<Duration>>,
    /// pingora's session, once made (boxed: a request's future holds this exchange).
    session: Option<Box<Session>>,
}

impl FrontExchange {
    /// The exchange of the request whose head (`head`, read whole by the front) starts
    /// `buf`. `Err` gives the pieces back when the head needs pingora's own reading (not in
    /// origin form, or with a field the header cannot hold as it is).
    pub fn new(
        stream: Stream,
        mut buf: BytesMut,
        head: &Head,
    ) -> std::result::Result<FrontExchange, (Stream, BytesMut)> {
        if !head.origin_form {
            return Err((stream, buf));
        }
        let rest = buf.split_off(head.len);
        let bytes = buf.freeze();
        let Some(header) = request_header(&bytes) else {
            let mut buf = BytesMut::from(bytes);
            buf.unsplit(rest);
            return Err((stream, buf));
        };
        let keepalive = !head.close && keeps_alive(&header);
        Ok(FrontExchange {
            header,
            stream: Some(stream),
            head: bytes,
            rest,
            body: head.body,
            keepalive,
            read_timeout: None,
            session: None,
        })
    }

    /// pingora's session for the request, made now if it was not: it reads the head again
    /// from its bytes (and the body, if any, after them) and takes the header stoa's phases
    /// hold.
    async fn session(&mut self) -> Result<&mut Session> {
        if self.session.is_none() {
            let Some(stream) = self.stream.take() else {
                return Error::e_explain(ErrorType::InternalError, "the connection is gone");
            };
            let mut buf = BytesMut::with_capacity(self.head.len() + self.rest.len());
            buf.extend_from_slice(&self.head);
            buf.extend_from_slice(&self.rest);
            self.rest = BytesMut::new();
            let mut session = Session::new_h1(stream);
            if let ServerSession::H1(v1) = &mut *session.downstream_session {
                v1.set_pipelining_enabled(true);
                v1.set_pipelined_prefix(buf);
            }
            if !session.downstream_session.read_request().await? {
                return Error::e_explain(ErrorType::ConnectionClosed, "the connection closed");
            }
            if !self.keepalive {
                session.downstream_session.set_keepalive(None);
            }
            if let Some(timeout) = self.read_timeout {
                session.downstream_session.set_read_timeout(timeout);
            }
            std::mem::swap(
                session.downstream_session.req_header_mut(),
                &mut self.header,
            );
            self.session = Some(Box::new(session));
        }
        match &mut self.session {
            Some(session) => Ok(session),
            None => Error::e_explain(ErrorType::InternalError, "no session"),
        }
    }

    /// The connection once the answer is written: with the bytes read past the request if
    /// it may carry another, or with pingora's session if one was made (which ends the
    /// answer: [`super::finish`]).
    pub fn into_next(self) -> After {
        if let Some(session) = self.session {
            return After::Session(session.downstream_session);
        }
        if !self.keepalive || self.body != Body::Length(0) {
            return After::Done(None);
        }
        let next = (!self.rest.is_empty()).then_some(self.rest);
        After::Done(self.stream.map(|stream| (stream, next)))
    }
}

impl Exchange for FrontExchange {
    fn req_header(&self) -> &RequestHeader {
        match &self.session {
            Some(session) => session.downstream_session.req_header(),
            None => &self.header,
        }
    }

    fn req_header_mut(&mut self) -> &mut RequestHeader {
        match &mut self.session {
            Some(session) => session.downstream_session.req_header_mut(),
            None => &mut self.header,
        }
    }

    fn peer_ip(&self) -> Option<IpAddr> {
        crate::exchange::peer_of(self.stream()?)
    }

    fn over_tls(&self) -> bool {
        self.stream().is_some_and(|s| s.get_ssl_digest().is_some())
    }

    fn is_http2(&self) -> bool {
        false
    }

    fn stream(&self) -> Option<&Stream> {
        match &self.session {
            Some(session) => session.downstream_session.stream(),
            None => self.stream.as_ref(),
        }
    }

    fn will_keepalive(&self) -> bool {
        match &self.session {
            Some(session) => Exchange::will_keepalive(&**session),
            None => self.keepalive,
        }
    }

    fn is_body_empty(&mut self) -> bool {
        match &mut self.session {
            Some(session) => session.downstream_session.is_body_empty(),
            None => self.body == Body::Length(0),
        }
    }

    fn is_body_done(&mut self) -> bool {
        match &mut self.session {
            Some(session) => session.downstream_session.is_body_done(),
            None => self.body == Body::Length(0),
        }
    }

    fn set_keepalive(&mut self, duration: Option<u64>) {
        match &mut self.session {
            Some(session) => session.downstream_session.set_keepalive(duration),
            None => self.keepalive = duration.is_some(),
        }
    }

    fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        match &mut self.session {
            Some(session) => session.downstream_session.set_read_timeout(timeout),
            None => self.read_timeout = Some(timeout),
        }
    }

    fn response_written(&self) -> Option<&ResponseHeader> {
        self.session
            .as_ref()
            .and_then(|s| s.downstream_session.response_written())
    }

    fn body_bytes_sent(&self) -> usize {
        self.session
            .as_ref()
            .map_or(0, |s| s.downstream_session.body_bytes_sent())
    }

    // The three below are boxed: they may make pingora's session, whose reading of the
    // head is a large future, and an answer from an entry (the front's hits) needs none of
    // them; unboxed, every request's future would carry it.

    fn read_request_body(&mut self) -> impl Future<Output = Result<Option<Bytes>>> + Send {
        Box::pin(async move {
            if self.session.is_none() && self.body == Body::Length(0) {
                return Ok(None);
            }
            self.session()
                .await?
                .downstream_session
                .read_request_body()
                .await
        })
    }

    fn write_response_header(
        &mut self,
        resp: Box<ResponseHeader>,
        end_of_stream: bool,
    ) -> impl Future<Output = Result<()>> + Send {
        Box::pin(async move {
            let session = self.session().await?;
            Exchange::write_response_header(session, resp, end_of_stream).await
        })
    }

    fn write_response_body(
        &mut self,
        data: Option<Bytes>,
        end_of_stream: bool,
    ) -> impl Future<Output = Result<()>> + Send {
        Box::pin(async move {
            let session = self.session().await?;
            Exchange::write_response_body(session, data, end_of_stream).await
        })
    }
}

/// Whether a request's head lets its connection stay open after the answer, as pingora's
/// session decides it: its first `Connection` field's `keep-alive` or `close`, else the
/// version's default (open for HTTP/1.1).
pub(crate) fn keeps_alive(header: &RequestHeader) -> bool {
    let said = header
        .headers
        .get(http::header::CONNECTION)
        .and_then(|value| {
            let tokens = || {
                value
                    .as_bytes()
                    .split(|b| *b == b',')
                    .map(<[u8]>::trim_ascii)
            };
            if tokens().any(|t| t.eq_ignore_ascii_case(b"keep-alive")) {
                Some(true)
            } else if tokens().any(|t| t.eq_ignore_ascii_case(b"close")) {
                Some(false)
            } else {
                None
            }
        });
    said.unwrap_or(header.version == http::Version::HTTP_11)
}

/// The head in `bytes` (whole, and held to the front's rules already) as a `RequestHeader`
/// like the one pingora's session reads: its target and values share `bytes`, and no map
/// of the names' case is kept (nothing the front answers writes the request's head out).
/// `None` for a head whose target or a field the types refuse.
pub fn request_header(bytes: &Bytes) -> Option<RequestHeader> {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let Ok(httparse::Status::Complete(_)) = req.parse_with_uninit_headers(bytes, &mut fields)
    else {
        return None;
    };
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = http::Method::from_bytes(req.method?.as_bytes()).ok()?;
    parts.uri = http::Uri::from_maybe_shared(bytes.slice_ref(req.path?.as_bytes())).ok()?;
    parts.version = match req.version? {
        1 => http::Version::HTTP_11,
        _ => http::Version::HTTP_10,
    };
    let mut headers = http::HeaderMap::with_capacity(req.headers.len());
    for field in req.headers.iter() {
        let name = http::HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let value = http::HeaderValue::from_maybe_shared(bytes.slice_ref(field.value)).ok()?;
        headers.append(name, value);
    }
    parts.headers = headers;
    Some(RequestHeader::from(parts))
}
