//! Where a chunked request body ends (RFC 9112 §7.1), found as its bytes go by.
//!
//! Below both users: the front (`crate::front`) hands a chunked request to pingora's proxy
//! with its stream's reads fenced at the body's end (`crate::connections::fence_chunked`): each read may take at most
//! [`Chunked::most`] bytes, which the body still has whatever they are, so the bytes of a
//! request pipelined after it stay in the socket for the front.
//!
//! The body ends where pingora's body reader ends it: chunk-size lines as `httparse` reads
//! them (size, optional extensions, CRLF), chunk data followed by CRLF, a last chunk of size
//! 0, then trailer lines (any bytes but CR and LF, each ending in CRLF) up to an empty line.

/// Longest chunk-size line, extensions included (pingora's own limit).
const MAX_SIZE_LINE: usize = 8 * 1024;

/// The fewest bytes a body can still have once a chunk-size line is due: `0\r\n\r\n`.
const LAST_CHUNK: u64 = 5;

/// The largest bound [`Chunked::most`] gives (far from the fence's own markers).
const MOST: u64 = 1 << 62;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a chunk-size line (its bytes so far in `line`).
    Size,
    /// In a chunk's data, with this many bytes to go.
    Data(u64),
    /// After a chunk's data: its CR, then its LF.
    DataCr,
    DataLf,
    /// After the last chunk: at the start of a trailer line or of the closing empty line.
    LineStart,
    /// In a trailer line; after its CR.
    Trailer,
    TrailerLf,
    /// After the CR of the closing empty line.
    EndLf,
    Done,
    Invalid,
}

/// A chunked body's framing as far as its bytes were fed.
#[derive(Debug, Clone)]
pub struct Chunked {
    state: State,
    /// The chunk-size line read so far.
    line: Vec<u8>,
}

/// What feeding bytes gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fed {
    /// The body goes on past these bytes.
    More,
    /// The body ends after this many of them.
    End(usize),
    /// The bytes are not a chunked body (pingora's reader refuses them too).
    Invalid,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked {
            state: State::Size,
            line: Vec::new(),
        }
    }
}

impl Chunked {
    /// Reads `bytes`, the body's next ones.
    pub fn feed(&mut self, bytes: &[u8]) -> Fed {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                State::Done => return Fed::End(i),
                State::Invalid => return Fed::Invalid,
                State::Data(left) => {
                    let take = (bytes.len() - i).min(usize::try_from(left).unwrap_or(usize::MAX));
                    i += take;
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data(left)
                    };
                    continue;
                }
                State::Size => self.size_byte(b),
                State::DataCr if b == b'\r' => State::DataLf,
                State::DataLf if b == b'\n' => State::Size,
                State::DataCr | State::DataLf => State::Invalid,
                State::LineStart => match b {
                    b'\r' => State::EndLf,
                    b'\n' => State::Invalid,
                    _ => State::Trailer,
                },
                State::Trailer => match b {
                    b'\r' => State::TrailerLf,
                    b'\n' => State::Invalid,
                    _ => State::Trailer,
                },
                State::TrailerLf | State::EndLf if b != b'\n' => State::Invalid,
                State::TrailerLf => State::LineStart,
                State::EndLf => State::Done,
            };
            i += 1;
        }
        match self.state {
            State::Done => Fed::End(bytes.len()),
            State::Invalid => Fed::Invalid,
            _ => Fed::More,
        }
    }

    /// One byte of a chunk-size line: the line is read as `httparse` reads it once it has
    /// its LF (or, not yet, a CR).
    fn size_byte(&mut self, b: u8) -> State {
        self.line.push(b);
        if b != b'\n' {
            return if self.line.len() > MAX_SIZE_LINE {
                State::Invalid
            } else {
                State::Size
            };
        }
        let state = match httparse::parse_chunk_size(&self.line) {
            Ok(httparse::Status::Complete((_, 0))) => State::LineStart,
            Ok(httparse::Status::Complete((_, size))) => State::Data(size),
            Ok(httparse::Status::Partial) => return State::Size,
            Err(_) => State::Invalid,
        };
        self.line = Vec::new();
        state
    }

    /// How many bytes may be read next without passing the body's end, whatever they are
    /// (0 once it has ended or is not a chunked body).
    pub fn most(&self) -> u64 {
        let most = match self.state {
            State::Size => match hex(&self.line) {
                _ if self.line.is_empty() => LAST_CHUNK,
                // `\r\n\r\n` after the last chunk's size.
                Some(0) => 4,
                // `\r\n`, the data, `\r\n`, and the last chunk.
                Some(size) => size.saturating_add(4 + LAST_CHUNK),
                None => 1,
            },
            State::Data(left) => left.saturating_add(2 + LAST_CHUNK),
            State::DataCr => 2 + LAST_CHUNK,
            State::DataLf => 1 + LAST_CHUNK,
            State::LineStart => 2,
            State::Trailer => 4,
            State::TrailerLf => 3,
            State::EndLf => 1,
            State::Done | State::Invalid => 0,
        };
        most.min(MOST)
    }
}

/// A chunk size of hex digits only (at most 15, as `httparse` reads them).
fn hex(line: &[u8]) -> Option<u64> {
    if line.len() > 15 {
        return None;
    }
    line.iter().try_fold(0u64, |n, b| {
        let digit = (*b as char).to_digit(16)?;
        Some(n * 16 + u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(body: &[u8]) -> Fed {
        Chunked::default().feed(body)
    }

    #[test]
    fn a_chunked_body_ends_after_its_last_chunk_and_trailers() {
        assert_eq!(end(b"5\r\nhello\r\n0\r\n\r\nGET /"), Fed::End(15));
        assert_eq!(end(b"0\r\n\r\n"), Fed::End(5));
        assert_eq!(
            end(b"5;a=b\r\nhello\r\n0\r\nX-T: 1\r\n\r\nnext"),
            Fed::End(27)
        );
        assert_eq!(end(b"A\r\n0123456789\r\n0"), Fed::More);
        assert_eq!(end(b"5\r\nhelloX\r\n"), Fed::Invalid);
        assert_eq!(end(b"5\nhello\r\n"), Fed::Invalid);
        assert_eq!(end(b"0\r\nX-T: 1\n\r\n"), Fed::Invalid);
        assert_eq!(end(b"z\r\n"), Fed::Invalid);
    }

    /// Fed a byte at a time, the body ends at the same byte; and reading what `most` allows
    /// never passes its end, for every body and every point in it.
    #[test]
    fn most_never_reads_past_the_end() {
        let bodies: [&[u8]; 5] = [
            b"5\r\nhello\r\n0\r\n\r\n",
            b"0\r\n\r\n",
            b"1;ext=\"x\"\r\na\r\n00\r\nA: b\r\nC: d\r\n\r\n",
            b"10\r\n0123456789abcdef\r\n0\r\n\r\n",
            b"0;x\r\n\r\n",
        ];
        for body in bodies {
            let Fed::End(len) = end(body) else {
                panic!("{body:?} did not end");
            };
            assert_eq!(len, body.len());
            for step in [usize::MAX, 1] {
                let mut chunked = Chunked::default();
                let mut at = 0;
                while at < len {
                    let most = usize::try_from(chunked.most()).unwrap();
                    assert!(most >= 1 && at + most <= len, "{body:?} at {at}: {most}");
                    let next = at + most.min(step);
                    let fed = chunked.feed(&body[at..next]);
                    at = next;
                    assert_eq!(fed == Fed::More, at < len, "{body:?} at {at}");
                }
                assert_eq!(chunked.most(), 0);
            }
        }
    }
}
