//! The `[admin]` section: the admin listener, whether requests are counted, the API token.

use std::net::SocketAddr;

use super::raw::RawAdmin;
use super::validate::Validator;

#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    /// Whether requests are counted for `/metrics`.
    pub metrics: bool,
    /// Bearer token for the admin API (purge, refresh, reload, config); without one the
    /// admin API is closed.
    pub token: Option<String>,
}

impl Validator<'_> {
    pub(super) fn admin(&mut self, raw: RawAdmin) -> Option<AdminSettings> {
        let listen = self.address("admin.listen", raw.listen.as_deref(), "127.0.0.1:9901")?;
        let token = raw.token.filter(|t| !t.is_empty());
        if token.as_ref().is_some_and(|t| t.len() < 8) {
            self.problem("admin.token", "must be at least 8 characters");
            return None;
        }
        Some(AdminSettings {
            listen,
            metrics: raw.metrics.unwrap_or(true),
            token,
        })
    }
}
