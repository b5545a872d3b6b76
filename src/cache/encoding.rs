//! Compressed variants of stored answers: which coding a client's `Accept-Encoding` picks,
//! compressing an answer once when it is stored, and decoding an answer an upstream sent
//! encoded although the shared fetch did not ask for it.
//!
//! Variants are made in the fetch task, before the entry is stored: the store weighs an
//! entry once, when it is inserted, so the variants are weighed with it, and a hit only
//! picks one (no compression, lock or allocation of its own).

use std::io::{Read, Write};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{header, HeaderValue};
use pingora::http::ResponseHeader;
use prometheus::IntCounter;

use super::origin::Fetched;
use crate::config::{Coding, CompressionSettings};
use crate::error::StoaError;

/// Fixed levels, for a body compressed once and served many times: brotli 5 and zstd 3
/// are fast and close to their high levels on JSON; gzip 6 is zlib's default.
const BROTLI_QUALITY: u32 = 5;
const BROTLI_WINDOW: u32 = 22;
const ZSTD_LEVEL: i32 = 3;
const GZIP_LEVEL: u32 = 6;

/// Compressions done and bytes saved, per coding: `stoa_cache_compressions_total` and
/// `stoa_cache_compression_saved_bytes_total`.
#[derive(Clone)]
pub struct Counters {
    /// (compressions, bytes saved), in [`Coding::ALL`] order.
    by_coding: [(IntCounter, IntCounter); 3],
}

impl Counters {
    pub fn new(by_coding: [(IntCounter, IntCounter); 3]) -> Self {
        Counters { by_coding }
    }

    fn record(&self, coding: Coding, saved: usize) {
        let i = Coding::ALL.iter().position(|c| *c == coding).unwrap_or(0);
        let (done, bytes) = &self.by_coding[i];
        done.inc();
        bytes.inc_by(saved as u64);
    }
}

/// One compressed form of a stored answer, with the head to send it with.
#[derive(Debug)]
pub struct Variant {
    pub coding: Coding,
    pub header: ResponseHeader,
    pub body: Bytes,
    /// `header` as bytes to send, built by the first answer that writes it.
    pub wire: OnceLock<Bytes>,
    /// `header` as the HTTP/2 writer sends it, built by the first such answer.
    pub h2_head: OnceLock<Box<ResponseHeader>>,
}

/// The compressed forms of an entry, in the route's order of preference; most entries
/// have none.
#[derive(Debug, Default)]
pub struct Variants(Box<[Variant]>);

impl Variants {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The variant the client's `Accept-Encoding` picks; `None`: identity.
    pub fn pick(&self, accept: Option<&HeaderValue>) -> Option<&Variant> {
        let accept = accept?;
        let coding = choose(accept.as_bytes(), self.0.iter().map(|v| v.coding))?;
        self.0.iter().find(|v| v.coding == coding)
    }

    /// The compressed bodies alone (shared, not copied), to build variants for new heads.
    pub fn bodies(&self) -> Compressed {
        Compressed(self.0.iter().map(|v| (v.coding, v.body.clone())).collect())
    }

    /// Bytes held: bodies and heads.
    pub fn weight(&self) -> u64 {
        self.0
            .iter()
            // The head counts three times: as headers, as the bytes to send (`wire`) and
            // as the HTTP/2 head (`h2_head`).
            .map(|v| (v.body.len() + 3 * header_bytes(&v.header)) as u64)
            .sum()
    }

    /// The variants of the identity `header` (which already says `Vary`) for the bodies
    /// `compressed` made: `Content-Encoding`, the compressed `Content-Length`, and a strong
    /// `ETag` made weak (the bytes differ, the representation's meaning does not).
    pub fn build(header: &ResponseHeader, compressed: Compressed) -> Result<Self, StoaError> {
        let internal = |e: Box<pingora::Error>| StoaError::Internal(e.to_string());
        let mut out = Vec::with_capacity(compressed.0.len());
        for (coding, body) in compressed.0 {
            let mut h = header.clone();
            h.insert_header(header::CONTENT_ENCODING, coding.token())
                .map_err(internal)?;
            h.insert_header(header::CONTENT_LENGTH, body.len())
                .map_err(internal)?;
            if let Some(weak) = h.headers.get(header::ETAG).and_then(weakened) {
                h.insert_header(header::ETAG, weak).map_err(internal)?;
            }
            out.push(Variant {
                coding,
                header: h,
                body,
                wire: OnceLock::new(),
                h2_head: OnceLock::new(),
            });
        }
        Ok(Variants(out.into_boxed_slice()))
    }
}

/// Bodies compressed for an entry, in the route's order of preference.
#[derive(Debug, Default)]
pub struct Compressed(Vec<(Coding, Bytes)>);

impl Compressed {
    pub fn none() -> Self {
        Compressed::default()
    }

    /// Bodies made elsewhere (read back from the shared tier).
    pub fn from_bodies(bodies: Vec<(Coding, Bytes)>) -> Self {
        Compressed(bodies)
    }

    pub fn bodies(&self) -> impl Iterator<Item = (Coding, &Bytes)> {
        self.0.iter().map(|(c, b)| (*c, b))
    }
}

fn header_bytes(header: &ResponseHeader) -> usize {
    header
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum()
}

/// `W/"x"` for a strong `"x"`; `None` when already weak (or not an entity tag).
fn weakened(etag: &HeaderValue) -> Option<HeaderValue> {
    let b = etag.as_bytes();
    if b.starts_with(b"W/") || !b.starts_with(b"\"") {
        return None;
    }
    let mut weak = Vec::with_capacity(b.len() + 2);
    weak.extend_from_slice(b"W/");
    weak.extend_from_slice(b);
    HeaderValue::from_bytes(&weak).ok()
}

/// The coding to answer with among `offered` (in preference order), by the client's
/// `Accept-Encoding` (RFC 9110 §12.5.3): the highest q-value wins, ties go to the earlier
/// offered; `q=0` excludes; `*` stands for every coding not named; `x-gzip` is gzip.
/// `None` (identity) when nothing offered is acceptable, or when the client names
/// `identity` (or `*`) with a higher q-value than any offered coding.
pub fn choose(accept: &[u8], offered: impl Iterator<Item = Coding>) -> Option<Coding> {
    let Ok(accept) = std::str::from_utf8(accept) else {
        return None;
    };
    // Explicit q-values, in Coding::ALL order; then `*` and `identity`.
    let mut named: [Option<f32>; 3] = [None; 3];
    let mut star = None;
    let mut identity = None;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let token = parts.next().unwrap_or("").trim();
        if token.is_empty() {
            continue;
        }
        let mut q = Some(1.0);
        for param in parts {
            if let Some((name, value)) = param.split_once('=') {
                if name.trim().eq_ignore_ascii_case("q") {
                    q = value
                        .trim()
                        .parse::<f32>()
                        .ok()
                        .filter(|q| (0.0..=1.0).contains(q));
                }
            }
        }
        // A malformed q-value makes the element meaningless: it is ignored.
        let Some(q) = q else { continue };
        let slot = if token == "*" {
            &mut star
        } else if token.eq_ignore_ascii_case("identity") {
            &mut identity
        } else if token.eq_ignore_ascii_case("x-gzip") {
            &mut named[2]
        } else {
            match Coding::parse(token) {
                Some(c) => &mut named[Coding::ALL.iter().position(|x| *x == c).unwrap_or(0)],
                None => continue,
            }
        };
        // A token named twice keeps its larger q-value.
        *slot = Some(slot.map_or(q, |old: f32| old.max(q)));
    }
    let mut best: Option<(Coding, f32)> = None;
    for coding in offered {
        let i = Coding::ALL.iter().position(|x| *x == coding).unwrap_or(0);
        let q = named[i].or(star).unwrap_or(0.0);
        if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((coding, q));
        }
    }
    let (coding, q) = best?;
    match identity.or(star) {
        Some(iq) if iq > q => None,
        _ => Some(coding),
    }
}

/// Compresses `body` with `coding`.
pub fn compress(coding: Coding, body: &[u8]) -> std::io::Result<Vec<u8>> {
    match coding {
        Coding::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 4),
                flate2::Compression::new(GZIP_LEVEL),
            );
            enc.write_all(body)?;
            enc.finish()
        }
        Coding::Br => {
            let mut out = Vec::with_capacity(body.len() / 4);
            {
                let mut enc =
                    brotli::CompressorWriter::new(&mut out, 4096, BROTLI_QUALITY, BROTLI_WINDOW);
                enc.write_all(body)?;
                enc.flush()?;
            }
            Ok(out)
        }
        Coding::Zstd => zstd::bulk::compress(body, ZSTD_LEVEL),
    }
}

/// Decodes a body in one coding, up to `limit` bytes; `None` if it is not valid in that
/// coding or decodes to more than `limit`.
pub fn decode(coding: Coding, body: &[u8], limit: usize) -> Option<Vec<u8>> {
    let reader: Box<dyn Read + '_> = match coding {
        Coding::Gzip => Box::new(flate2::read::MultiGzDecoder::new(body)),
        Coding::Br => Box::new(brotli::Decompressor::new(body, 4096)),
        Coding::Zstd => Box::new(zstd::stream::read::Decoder::new(body).ok()?),
    };
    let mut out = Vec::new();
    let read = reader.take(limit as u64 + 1).read_to_end(&mut out).ok()?;
    (read <= limit).then_some(out)
}

/// Readies an upstream answer on a route that compresses: an answer the upstream sent in
/// one coding stoa knows is decoded (so every client can be served, and it is compressed
/// again like any other), and an answer to `store` of a compressible type and size gets
/// its compressed bodies, counted. Runs on a blocking thread: compression takes time in
/// proportion to the body. An answer that cannot be decoded within `limit` bytes stays
/// as the upstream sent it, with no variants.
pub async fn prepare(
    settings: Option<Arc<CompressionSettings>>,
    counters: &Counters,
    fetched: Fetched,
    store: bool,
    limit: usize,
) -> Result<(Fetched, Compressed), StoaError> {
    let Some(settings) = settings else {
        return Ok((fetched, Compressed::none()));
    };
    let counters = counters.clone();
    let work = move || prepare_now(&settings, &counters, fetched, store, limit);
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StoaError::Internal(format!("compressing an answer failed: {e}")))
}

fn prepare_now(
    settings: &CompressionSettings,
    counters: &Counters,
    mut fetched: Fetched,
    store: bool,
    limit: usize,
) -> (Fetched, Compressed) {
    if let Some(encoded) = fetched.headers.get(header::CONTENT_ENCODING) {
        let coding = encoded.to_str().ok().map(str::trim).and_then(|t| {
            if t.eq_ignore_ascii_case("x-gzip") {
                Some(Coding::Gzip)
            } else {
                Coding::parse(t)
            }
        });
        let identity = encoded.as_bytes().eq_ignore_ascii_case(b"identity");
        let decoded = coding.and_then(|c| decode(c, &fetched.body, limit));
        match decoded {
            Some(body) => {
                fetched.body = Bytes::from(body);
                fetched.headers.remove(header::CONTENT_ENCODING);
                if let Some(weak) = fetched.headers.get(header::ETAG).and_then(weakened) {
                    fetched.headers.insert(header::ETAG, weak);
                }
            }
            None if identity => {
                fetched.headers.remove(header::CONTENT_ENCODING);
            }
            None => return (fetched, Compressed::none()),
        }
    }
    let compressible = store
        && fetched.body.len() as u64 >= settings.min_bytes.max(1)
        && fetched
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|t| settings.compresses_type(t.as_bytes()));
    if !compressible {
        return (fetched, Compressed::none());
    }
    let mut out = Vec::with_capacity(settings.encodings.len());
    for &coding in &settings.encodings {
        let Ok(body) = compress(coding, &fetched.body) else {
            continue;
        };
        // A variant no smaller than the identity body is not worth its memory.
        if body.len() < fetched.body.len() {
            counters.record(coding, fetched.body.len() - body.len());
            out.push((coding, Bytes::from(body)));
        }
    }
    (fetched, Compressed(out))
}

/// Adds `Vary: Accept-Encoding` to the head of an answer of a route that compresses,
/// unless its `Vary` covers it already.
pub fn add_vary(header: &mut ResponseHeader) -> Result<(), StoaError> {
    let covered = header.headers.get_all(header::VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .map(str::trim)
                .any(|h| h == "*" || h.eq_ignore_ascii_case("accept-encoding"))
        })
    });
    if covered {
        return Ok(());
    }
    header
        .append_header(header::VARY, "Accept-Encoding")
        .map(|_| ())
        .map_err(|e| StoaError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFFERED: [Coding; 3] = [Coding::Br, Coding::Zstd, Coding::Gzip];

    fn pick(accept: &str) -> Option<&'static str> {
        choose(accept.as_bytes(), OFFERED.into_iter()).map(Coding::token)
    }

    #[test]
    fn q_values_choose_the_coding() {
        let cases: &[(&str, Option<&str>)] = &[
            ("gzip", Some("gzip")),
            ("gzip, br", Some("br")),
            ("gzip, deflate, br, zstd", Some("br")),
            ("br;q=0.5, gzip", Some("gzip")),
            ("br;q=0, gzip;q=0.1", Some("gzip")),
            ("zstd;q=0.9, gzip;q=0.9", Some("zstd")),
            ("GZIP;Q=1", Some("gzip")),
            ("x-gzip", Some("gzip")),
            ("*", Some("br")),
            ("*;q=0.5, br;q=0", Some("zstd")),
            ("br;q=0, zstd;q=0, gzip;q=0", None),
            ("*;q=0", None),
            ("identity", None),
            ("deflate", None),
            ("", None),
            ("gzip;q=0.5, identity", None),
            ("gzip;q=0.5, identity;q=0.1", Some("gzip")),
            ("gzip;q=0.5", Some("gzip")),
            ("gzip;q=2", None),
            ("gzip;q=abc, br", Some("br")),
            (" , ,gzip ; q=0.8 ,", Some("gzip")),
        ];
        for (accept, want) in cases {
            assert_eq!(pick(accept), *want, "{accept:?}");
        }
        // Only what is offered, in the route's order.
        let only_gzip = [Coding::Gzip];
        assert_eq!(
            choose(b"br, gzip;q=0.1", only_gzip.into_iter()),
            Some(Coding::Gzip)
        );
        let zstd_first = [Coding::Zstd, Coding::Br];
        assert_eq!(
            choose(b"br, zstd", zstd_first.into_iter()),
            Some(Coding::Zstd)
        );
    }

    #[test]
    fn every_coding_decodes_to_the_identity_bytes() {
        let body: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("{{\"item\":{i},\"name\":\"dish {}\"}},", i % 37).into_bytes())
            .collect();
        for coding in Coding::ALL {
            let packed = compress(coding, &body).unwrap();
            assert!(
                packed.len() < body.len() / 4,
                "{coding:?}: {}",
                packed.len()
            );
            assert_eq!(
                decode(coding, &packed, body.len()).unwrap(),
                body,
                "{coding:?}"
            );
            assert!(
                decode(coding, &packed, body.len() - 1).is_none(),
                "{coding:?}: over the limit"
            );
            assert!(decode(coding, b"not compressed at all", 1 << 20).is_none());
        }
    }

    #[test]
    fn compressible_types() {
        let s = CompressionSettings::default();
        for t in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/problem+json",
            "text/html",
            "text/plain;charset=utf-8",
            "application/javascript",
            "application/xml",
            "image/svg+xml",
        ] {
            assert!(s.compresses_type(t.as_bytes()), "{t}");
        }
        for t in [
            "image/png",
            "application/octet-stream",
            "video/mp4",
            "json",
            "",
        ] {
            assert!(!s.compresses_type(t.as_bytes()), "{t}");
        }
    }

    fn counters() -> Counters {
        let c = |n: &str| IntCounter::new(n, "test").unwrap();
        Counters::new([
            (c("br"), c("br_saved")),
            (c("zstd"), c("zstd_saved")),
            (c("gzip"), c("gzip_saved")),
        ])
    }

    fn fetched(content_type: &str, body: &[u8]) -> Fetched {
        let mut headers = http::HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, content_type.parse().unwrap());
        headers.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        Fetched {
            status: http::StatusCode::OK,
            headers,
            body: Bytes::copy_from_slice(body),
        }
    }

    #[test]
    fn only_large_compressible_stored_answers_are_compressed() {
        let s = CompressionSettings::default();
        let c = counters();
        let big = "{\"a\":\"xxxxxxxxxxxxxxxx\"}".repeat(200);
        let (_, none) = prepare_now(&s, &c, fetched("application/json", b"{}"), true, 1 << 20);
        assert!(none.0.is_empty(), "small");
        let (_, none) = prepare_now(&s, &c, fetched("image/png", big.as_bytes()), true, 1 << 20);
        assert!(none.0.is_empty(), "binary");
        let (_, none) = prepare_now(
            &s,
            &c,
            fetched("text/plain", big.as_bytes()),
            false,
            1 << 20,
        );
        assert!(none.0.is_empty(), "not stored");
        assert_eq!(c.by_coding[2].0.get(), 0);
        let (f, some) = prepare_now(&s, &c, fetched("text/plain", big.as_bytes()), true, 1 << 20);
        let codings: Vec<Coding> = some.0.iter().map(|(c, _)| *c).collect();
        assert_eq!(codings, Coding::ALL);
        for (i, (coding, body)) in some.0.iter().enumerate() {
            assert_eq!(c.by_coding[i].0.get(), 1);
            assert_eq!(
                c.by_coding[i].1.get(),
                (big.len() - body.len()) as u64,
                "{coding:?}"
            );
        }
        let mut header = ResponseHeader::build(200, None).unwrap();
        for (k, v) in &f.headers {
            header.append_header(k.clone(), v.clone()).unwrap();
        }
        add_vary(&mut header).unwrap();
        add_vary(&mut header).unwrap();
        assert_eq!(header.headers.get_all(header::VARY).iter().count(), 1);
        let variants = Variants::build(&header, some).unwrap();
        let gzip = variants
            .pick(Some(&HeaderValue::from_static("gzip")))
            .unwrap();
        assert_eq!(gzip.header.headers[header::CONTENT_ENCODING], "gzip");
        assert_eq!(gzip.header.headers[header::ETAG], "W/\"v1\"");
        assert_eq!(
            gzip.header.headers[header::CONTENT_LENGTH],
            gzip.body.len().to_string().as_str()
        );
        assert!(variants.pick(None).is_none());
        assert!(variants.weight() > 0);
    }

    #[test]
    fn an_encoded_upstream_answer_is_stored_decoded() {
        let s = CompressionSettings::default();
        let c = counters();
        let body = "{\"menu\":\"soup\"}".repeat(100);
        let mut f = fetched(
            "application/json",
            &compress(Coding::Gzip, body.as_bytes()).unwrap(),
        );
        f.headers
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let (f, variants) = prepare_now(&s, &c, f, true, 1 << 20);
        assert_eq!(f.body, body.as_bytes());
        assert!(!f.headers.contains_key(header::CONTENT_ENCODING));
        assert_eq!(f.headers[header::ETAG], "W/\"v1\"");
        assert_eq!(variants.0.len(), 3);
        // Too large once decoded, or not decodable: kept as sent, not compressed again.
        let mut f = fetched(
            "application/json",
            &compress(Coding::Gzip, body.as_bytes()).unwrap(),
        );
        f.headers
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        let sent = f.body.clone();
        let (f, variants) = prepare_now(&s, &c, f, true, 100);
        assert_eq!(f.body, sent);
        assert_eq!(f.headers[header::CONTENT_ENCODING], "gzip");
        assert!(variants.0.is_empty());
    }
}
