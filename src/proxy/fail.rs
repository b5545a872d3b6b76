//! Failures pingora meets while proxying: which answer each gets (the upstream's through
//! the one mapping in [`crate::upstream::error`]), and which are the client's doing.

use pingora::{ErrorSource, ErrorType};

use super::body;
use crate::connections;
use crate::error::StoaError;
use crate::gateway::Route;
use crate::upstream::error::Failure;

/// The error stoa answers for a pingora error; `None` when the client is gone.
pub fn classify(
    e: &pingora::Error,
    route: Option<&Route>,
    max_body_bytes: u64,
) -> Option<StoaError> {
    if let Some(timeout) = connections::body_timed_out(e) {
        return Some(StoaError::RequestTimeout {
            what: "request body",
            timeout_ms: timeout.as_millis(),
        });
    }
    let err = match e.etype() {
        ErrorType::HTTPStatus(413) => StoaError::BodyTooLarge {
            limit: max_body_bytes,
        },
        ErrorType::HTTPStatus(code) if (400..500).contains(code) => {
            StoaError::BadRequest("the request is malformed".into())
        }
        _ => match Failure::of_pingora(e) {
            Some(failure) => failure.into_error(route.and_then(|r| r.upstream())),
            None => match e.esource() {
                // The client is gone: nobody to answer.
                ErrorSource::Downstream if body::client_gone(e) => return None,
                // What pingora finds wrong while reading a request body is its framing.
                ErrorSource::Downstream => body::malformed_body(),
                _ => StoaError::Internal(e.to_string()),
            },
        },
    };
    Some(err)
}

/// Whether an error is the client's mistake or departure rather than stoa's.
pub fn is_clients(e: &pingora::Error) -> bool {
    *e.esource() == ErrorSource::Downstream
        || matches!(e.etype(), ErrorType::HTTPStatus(code) if (400..500).contains(code))
}
