//! Reading request bodies: the announced length, the whole body of a request stoa answers
//! itself, and what a failed read means.

use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::prelude::*;
use pingora::ErrorType;

use crate::error::StoaError;
use crate::exchange::Exchange;

/// `Err` (413) when the length a request announces is over `limit`.
pub fn announced_within(req: &RequestHeader, limit: u64) -> std::result::Result<(), StoaError> {
    let announced: Option<u64> = req
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    match announced {
        Some(n) if n > limit => Err(StoaError::BodyTooLarge { limit }),
        _ => Ok(()),
    }
}

/// The answer to a request body whose framing is broken (a bad chunk size, a missing
/// chunk end): the client's mistake, told without internal detail.
pub fn malformed_body() -> StoaError {
    StoaError::BadRequest("the request body's framing is malformed".into())
}

/// Whether a pingora error while reading from the client means the client went away or
/// stalled (nobody to answer) rather than sent something malformed.
pub fn client_gone(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ReadError
            | ErrorType::WriteError
            | ErrorType::ConnectionClosed
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout
    )
}

/// Reads the whole request body, or says it is over `limit` or malformed.
pub async fn read_body(
    session: &mut impl Exchange,
    limit: u64,
) -> Result<std::result::Result<Bytes, StoaError>> {
    if session.is_body_empty() {
        return Ok(Ok(Bytes::new()));
    }
    let mut body = bytes::BytesMut::new();
    loop {
        let chunk = match session.read_request_body().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(mut e) if client_gone(&e) => {
                e.as_down();
                return Err(e);
            }
            Err(e) => {
                tracing::debug!("malformed request body: {e}");
                // Where the next request would start is unknown: close after the answer.
                session.set_keepalive(None);
                return Ok(Err(malformed_body()));
            }
        };
        if (body.len() + chunk.len()) as u64 > limit {
            return Ok(Err(StoaError::BodyTooLarge { limit }));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Ok(body.freeze()))
}
