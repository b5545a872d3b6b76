//! The one mapping of upstream failures into the errors stoa answers, whichever connector
//! met them: pingora's (pass-through) or the pooled client's (fetches).

use pingora::{ErrorSource, ErrorType};

use crate::config::Upstream;
use crate::error::StoaError;
use crate::ratelimit::Overloaded;

/// What went wrong on the way to an upstream, as far as the answer cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No connection within the upstream's `connect_timeout`.
    ConnectTimeout,
    /// No answer, or no progress, within its `timeout`.
    Timeout,
    /// No connection at all (refused, no route, bad address).
    Unreachable(String),
    /// The TLS session failed: certificate not trusted or not for the host, handshake
    /// refused, client certificate wanted or rejected.
    Tls(String),
    /// Anything else: reset, malformed answer, an answer too large.
    Failed(String),
}

impl Failure {
    /// The failure a pingora error of a pass-through request stands for, when it is the
    /// upstream's (`None`: the client's or stoa's own, see `proxy::fail`).
    pub fn of_pingora(e: &pingora::Error) -> Option<Failure> {
        let tls = is_tls(e.etype());
        // A TLS error may also surface later, on the first read (a client certificate
        // refused after the handshake): the cause tells.
        if tls || e.esource() == &ErrorSource::Upstream {
            if let Some(detail) = tls_cause_of_pingora(e) {
                return Some(Failure::Tls(detail));
            }
        }
        if tls {
            return Some(Failure::Tls(handshake_detail(e)));
        }
        let failure = match e.etype() {
            ErrorType::ConnectTimedout => Failure::ConnectTimeout,
            ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                Failure::Timeout
            }
            ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::BindError
            | ErrorType::SocketError => Failure::Unreachable(e.etype().as_str().to_string()),
            _ if e.esource() == &ErrorSource::Upstream => {
                Failure::Failed(e.etype().as_str().to_string())
            }
            _ => return None,
        };
        Some(failure)
    }

    /// The failure an error of the pooled client stands for.
    pub fn of_client(e: &reqwest::Error) -> Failure {
        if let Some(detail) = tls_cause(e) {
            Failure::Tls(detail)
        } else if e.is_timeout() {
            if e.is_connect() {
                Failure::ConnectTimeout
            } else {
                Failure::Timeout
            }
        } else if e.is_connect() {
            Failure::Unreachable(root_cause(e))
        } else {
            Failure::Failed(root_cause(e))
        }
    }

    /// The error stoa answers, naming `upstream` and the timeout that ran out (an unknown
    /// upstream is named "" with a timeout of 0).
    pub fn into_error(self, upstream: Option<&Upstream>) -> StoaError {
        let name = upstream.map(|u| u.name.clone()).unwrap_or_default();
        match self {
            Failure::ConnectTimeout => StoaError::UpstreamTimeout {
                upstream: name,
                timeout_ms: upstream.map_or(0, |u| u.connect_timeout.as_millis()),
            },
            Failure::Timeout => StoaError::UpstreamTimeout {
                upstream: name,
                timeout_ms: upstream.map_or(0, |u| u.timeout.as_millis()),
            },
            Failure::Unreachable(detail) => StoaError::UpstreamUnreachable {
                upstream: name,
                detail,
            },
            Failure::Failed(detail) => StoaError::UpstreamFailed {
                upstream: name,
                detail,
            },
            Failure::Tls(detail) => StoaError::UpstreamTls {
                upstream: name,
                detail,
            },
        }
    }
}

/// The answer to a request the upstream's protection limits turned away.
pub fn overloaded(upstream: &Upstream, o: Overloaded) -> StoaError {
    StoaError::Overloaded {
        upstream: upstream.name.clone(),
        retry_after_secs: o.retry_after_secs,
    }
}

/// The TLS error (rustls') behind `e`, if any, described. An I/O error carries it as its
/// inner error, which its `source()` skips, so each I/O error is looked into.
fn tls_cause(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(found) = tls_cause(inner) {
                return Some(found);
            }
        }
        // pingora's errors keep their cause in a field of their own, boxed or not.
        if let Some(p) = err.downcast_ref::<pingora::Error>() {
            return tls_cause_of_pingora(p);
        }
        if let Some(p) = err.downcast_ref::<Box<pingora::Error>>() {
            return tls_cause_of_pingora(p);
        }
        cur = err.source();
    }
    None
}

/// pingora's error types for a failed TLS session.
fn is_tls(etype: &ErrorType) -> bool {
    matches!(
        etype,
        ErrorType::TLSHandshakeFailure
            | ErrorType::TLSWantX509Lookup
            | ErrorType::InvalidCert
            | ErrorType::HandshakeError
    )
}

/// What a failed handshake on pingora's connector says: its reason is kept only as text
/// (the context, ending `... cause: <rustls' reason>, SNI: <name>`), which is passed on.
fn handshake_detail(e: &pingora::Error) -> String {
    let mut cur = e;
    loop {
        if let Some(context) = cur.context.as_ref().filter(|_| is_tls(cur.etype())) {
            let text = context.as_str();
            if let Some((_, reason)) = text.rsplit_once("cause: ") {
                let reason = reason.rsplit_once(", SNI: ").map_or(reason, |(r, _)| r);
                return reason.to_string();
            }
            if !text.is_empty() {
                return text.to_string();
            }
        }
        let next = cur.cause.as_deref().and_then(|c| {
            c.downcast_ref::<pingora::Error>()
                .or_else(|| c.downcast_ref::<Box<pingora::Error>>().map(|b| &**b))
        });
        match next {
            Some(next) => cur = next,
            None => return e.etype().as_str().to_string(),
        }
    }
}

/// [`tls_cause`] for pingora's errors, which keep their cause in a field of their own.
fn tls_cause_of_pingora(e: &pingora::Error) -> Option<String> {
    let cause = e.cause.as_deref()?;
    tls_cause(cause)
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream() -> Upstream {
        Upstream {
            name: "menu".into(),
            url: "http://127.0.0.1:1".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            host_header: "127.0.0.1:1".into(),
            base_path: String::new(),
            connect_timeout: std::time::Duration::from_millis(250),
            timeout: std::time::Duration::from_secs(5),
            guard: crate::config::UpstreamGuardSettings {
                max_in_flight: None,
                max_requests_per_second: None,
                queue_timeout: std::time::Duration::ZERO,
            },
            tls: None,
        }
    }

    #[test]
    fn pingora_errors_map_to_the_upstreams_failures() {
        let mut read = pingora::Error::new(ErrorType::ReadTimedout);
        read.as_up();
        assert_eq!(Failure::of_pingora(&read), Some(Failure::Timeout));
        let mut down = pingora::Error::new(ErrorType::ReadTimedout);
        down.as_down();
        assert_eq!(Failure::of_pingora(&down), None);
        let refused = pingora::Error::new(ErrorType::ConnectRefused);
        assert!(matches!(
            Failure::of_pingora(&refused),
            Some(Failure::Unreachable(_))
        ));
    }

    #[test]
    fn tls_errors_are_named_wherever_they_surface() {
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, alert);
        // On the first read, after the handshake: found through the I/O error.
        let inner = pingora::Error::because(ErrorType::ReadError, "reading", io);
        let mut read = pingora::Error::because(ErrorType::ReadError, "proxying", inner);
        read.as_up();
        match Failure::of_pingora(&read) {
            Some(Failure::Tls(detail)) => assert!(detail.contains("CertificateRequired")),
            other => panic!("{other:?}"),
        }
        // The handshake itself, its reason kept as text.
        let handshake = pingora::Error::explain(
            ErrorType::TLSHandshakeFailure,
            "TLS connect() failed:  TLSHandshakeFailure context: tls connect error cause: \
             invalid peer certificate: UnknownIssuer, SNI: localhost",
        );
        assert_eq!(
            Failure::of_pingora(&handshake),
            Some(Failure::Tls(
                "invalid peer certificate: UnknownIssuer".into()
            ))
        );
        let e = Failure::Tls("invalid peer certificate: UnknownIssuer".into())
            .into_error(Some(&upstream()));
        assert_eq!(e.status(), http::StatusCode::BAD_GATEWAY);
        assert_eq!(e.kind(), "upstream_tls");
        assert!(e.to_string().contains("TLS to upstream menu failed"));
    }

    #[test]
    fn failures_name_the_timeout_that_ran_out() {
        let up = upstream();
        match Failure::ConnectTimeout.into_error(Some(&up)) {
            StoaError::UpstreamTimeout {
                upstream,
                timeout_ms,
            } => assert_eq!((upstream.as_str(), timeout_ms), ("menu", 250)),
            e => panic!("{e:?}"),
        }
        match Failure::Timeout.into_error(None) {
            StoaError::UpstreamTimeout {
                upstream,
                timeout_ms,
            } => assert_eq!((upstream.as_str(), timeout_ms), ("", 0)),
            e => panic!("{e:?}"),
        }
    }
}
