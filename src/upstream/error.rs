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
    /// Anything else: reset, malformed answer, an answer too large.
    Failed(String),
}

impl Failure {
    /// The failure a pingora error of a pass-through request stands for, when it is the
    /// upstream's (`None`: the client's or stoa's own, see `proxy::fail`).
    pub fn of_pingora(e: &pingora::Error) -> Option<Failure> {
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
        if e.is_timeout() {
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
