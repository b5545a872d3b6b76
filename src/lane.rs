//! Which code answered a request: its lane. The front chooses it once per request
//! (`crate::front::lane`), and the access log (`lane`) and the request metrics
//! (`stoa_requests_total{lane}`) name it.

/// Which code answers a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// stoa answers it: a cached or aggregate route, or one of stoa's own errors.
    Answer,
    /// The front's forwarder forwards it: an HTTP/1 pass-through request whose framing
    /// leaves nothing to interpret, or an HTTP/2 pass-through stream without a body (taken
    /// from pingora's proxy, answered through its session).
    Forward,
    /// pingora's proxy serves it, for this reason.
    Proxy(Why),
}

/// Why a request goes to pingora's proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// HTTP/2 (chosen by ALPN, or h2c's preface): a cached or aggregate route, stoa's own
    /// errors, or a pass-through stream with a body, all on pingora's proxy session.
    H2,
    /// The front is off: `server.front = false`, or `server.front_forward = false` for a
    /// pass-through request.
    Off,
    /// A pass-through request whose body the proxy frames: `Transfer-Encoding`, a body that
    /// did not come with the head, or HTTP/1.0.
    Framing,
    /// A pass-through request with a header the proxy interprets: `Upgrade`, `Expect`,
    /// `HTTP2-Settings`, or a `Connection` header that names other headers.
    Headers,
    /// A target that is not in origin form: absolute form, `CONNECT`'s authority, `*`, or
    /// one with a fragment.
    Target,
}

impl Lane {
    /// Every lane, in the order of [`Lane::index`].
    pub const ALL: [Lane; 7] = [
        Lane::Answer,
        Lane::Forward,
        Lane::Proxy(Why::H2),
        Lane::Proxy(Why::Off),
        Lane::Proxy(Why::Framing),
        Lane::Proxy(Why::Headers),
        Lane::Proxy(Why::Target),
    ];

    /// The name the access log and the metrics give it.
    pub fn label(self) -> &'static str {
        match self {
            Lane::Answer => "answer",
            Lane::Forward => "forward",
            Lane::Proxy(Why::H2) => "proxy:h2",
            Lane::Proxy(Why::Off) => "proxy:off",
            Lane::Proxy(Why::Framing) => "proxy:framing",
            Lane::Proxy(Why::Headers) => "proxy:headers",
            Lane::Proxy(Why::Target) => "proxy:target",
        }
    }

    /// Its place in [`Lane::ALL`], for tables indexed by lane.
    pub fn index(self) -> usize {
        match self {
            Lane::Answer => 0,
            Lane::Forward => 1,
            Lane::Proxy(Why::H2) => 2,
            Lane::Proxy(Why::Off) => 3,
            Lane::Proxy(Why::Framing) => 4,
            Lane::Proxy(Why::Headers) => 5,
            Lane::Proxy(Why::Target) => 6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Lane;

    #[test]
    fn every_lane_has_its_own_index_and_label() {
        for (i, lane) in Lane::ALL.iter().enumerate() {
            assert_eq!(lane.index(), i);
        }
        let labels: std::collections::HashSet<_> = Lane::ALL.iter().map(|l| l.label()).collect();
        assert_eq!(labels.len(), Lane::ALL.len());
    }
}
