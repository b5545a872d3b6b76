//! The TLS keys of an `https://` upstream (`ca_file`, `tls_verify`, `client_cert`,
//! `client_key`): the PEM files are read and checked when the configuration is loaded (so
//! a reload re-reads them), and every problem names the file and the key.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use super::raw::RawUpstream;
use super::validate::Validator;

/// How stoa speaks TLS to one https upstream.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// Sent as SNI and verified against the certificate: the URL's host.
    pub server_name: String,
    /// `false` (`tls_verify = false`): the upstream's certificate is not verified at all.
    pub verify: bool,
    /// The CA certificates (DER) trusted instead of the system roots (`ca_file`).
    pub ca: Option<Arc<[Vec<u8>]>>,
    /// The client certificate shown to the upstream (`client_cert`, `client_key`).
    pub client: Option<ClientIdentity>,
}

/// A client certificate chain and its private key, checked to match.
#[derive(Clone)]
pub struct ClientIdentity {
    /// Leaf first, then any intermediates (DER).
    pub chain: Vec<Vec<u8>>,
    /// The private key (DER: PKCS#8, PKCS#1 or SEC1).
    pub key: Vec<u8>,
    /// The key then the chain, as PEM (the form the client of fetches takes).
    pub pem: Vec<u8>,
}

/// The private key stays out of logs.
impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// A checked certificate chain and its private key, in the forms the TLS stacks take.
pub(super) struct KeyPair {
    pub chain: Vec<Vec<u8>>,
    pub key_der: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    /// Ready for a TLS server (rustls).
    pub certified: Arc<CertifiedKey>,
}

impl Validator<'_> {
    /// The TLS settings of the upstream at `path`: `None` for a plain http upstream (whose
    /// TLS keys are a problem). `Err(())` when a problem was reported.
    pub(super) fn upstream_tls(
        &mut self,
        path: &str,
        raw: &RawUpstream,
        https: Option<&str>,
    ) -> Result<Option<UpstreamTls>, ()> {
        let Some(server_name) = https else {
            let mut bad = false;
            for (key, set) in [
                ("ca_file", raw.ca_file.is_some()),
                ("tls_verify", raw.tls_verify.is_some()),
                ("client_cert", raw.client_cert.is_some()),
                ("client_key", raw.client_key.is_some()),
            ] {
                if set {
                    self.problem(
                        format!("{path}.{key}"),
                        "applies to https upstreams only (the url is http)",
                    );
                    bad = true;
                }
            }
            return if bad { Err(()) } else { Ok(None) };
        };
        let before = self.problems.len();
        let ca = raw.ca_file.as_deref().and_then(|file| {
            let (certs, _) = self.certificates(&format!("{path}.ca_file"), file)?;
            Some(Arc::from(certs))
        });
        let client = match (&raw.client_cert, &raw.client_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => self.client_identity(path, cert, key),
            (Some(_), None) => {
                self.problem(
                    format!("{path}.client_key"),
                    "missing: client_cert needs its client_key",
                );
                None
            }
            (None, Some(_)) => {
                self.problem(
                    format!("{path}.client_cert"),
                    "missing: client_key needs its client_cert",
                );
                None
            }
        };
        if self.problems.len() != before {
            return Err(());
        }
        Ok(Some(UpstreamTls {
            server_name: server_name.to_string(),
            verify: raw.tls_verify.unwrap_or(true),
            ca,
            client,
        }))
    }

    /// The certificates of the PEM file at `file` (key path `key`), each parseable and not
    /// expired (DER), and the file as read; `None` when a problem was reported.
    pub(super) fn certificates(
        &mut self,
        key: &str,
        file: &str,
    ) -> Option<(Vec<Vec<u8>>, Vec<u8>)> {
        let pem = self.read_file(key, file)?;
        let mut certs = Vec::new();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            match cert {
                Ok(cert) => certs.push(cert.to_vec()),
                Err(e) => {
                    self.problem(key, format!("{file}: not a PEM certificate file: {e}"));
                    return None;
                }
            }
        }
        if certs.is_empty() {
            self.problem(key, format!("{file}: no PEM certificate in it"));
            return None;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        for der in &certs {
            match x509_parser::parse_x509_certificate(der) {
                Ok((_, cert)) => {
                    let not_after = cert.validity().not_after;
                    if not_after.timestamp() < now {
                        self.problem(
                            key,
                            format!(
                                "{file}: certificate {} expired on {not_after}",
                                cert.subject()
                            ),
                        );
                        return None;
                    }
                }
                Err(e) => {
                    self.problem(key, format!("{file}: not a valid certificate: {e}"));
                    return None;
                }
            }
        }
        Some((certs, pem))
    }

    fn client_identity(
        &mut self,
        path: &str,
        cert_file: &str,
        key_file: &str,
    ) -> Option<ClientIdentity> {
        let pair = self.key_pair(
            (&format!("{path}.client_cert"), cert_file),
            (&format!("{path}.client_key"), key_file),
        )?;
        // The files as written: the key, then the chain.
        let mut pem = pair.key_pem;
        pem.push(b'\n');
        pem.extend_from_slice(&pair.cert_pem);
        Some(ClientIdentity {
            chain: pair.chain,
            key: pair.key_der,
            pem,
        })
    }

    /// Reads and checks a certificate chain file and its private key file (each given as
    /// the key path naming it and the file): every certificate parseable and not expired,
    /// the key usable and matching the leaf certificate. `None` when a problem was reported.
    pub(super) fn key_pair(
        &mut self,
        (cert_key, cert_file): (&str, &str),
        (key_path, key_file): (&str, &str),
    ) -> Option<KeyPair> {
        let chain = self.certificates(cert_key, cert_file);
        let key_pem = self.read_file(key_path, key_file)?;
        let key = match PrivateKeyDer::from_pem_slice(&key_pem) {
            Ok(key) => key,
            Err(e) => {
                self.problem(
                    key_path,
                    format!("{key_file}: not a PEM private key file: {e}"),
                );
                return None;
            }
        };
        // pass-through connections take the key as bare DER and tell its format from it.
        if PrivateKeyDer::try_from(key.secret_der().to_vec()).is_err() {
            self.problem(
                key_path,
                format!("{key_file}: unrecognised private key format"),
            );
            return None;
        }
        let signing = match rustls::crypto::ring::sign::any_supported_type(&key) {
            Ok(signing) => signing,
            Err(e) => {
                self.problem(key_path, format!("{key_file}: unusable private key: {e}"));
                return None;
            }
        };
        let (chain, cert_pem) = chain?;
        let ders = chain.iter().map(|c| CertificateDer::from(c.clone()));
        let certified = CertifiedKey::new(ders.collect(), signing);
        if certified.keys_match().is_err() {
            self.problem(
                key_path,
                format!("{key_file}: does not match the certificate in {cert_file}"),
            );
            return None;
        }
        Some(KeyPair {
            chain,
            key_der: key.secret_der().to_vec(),
            key_pem,
            cert_pem,
            certified: Arc::new(certified),
        })
    }

    fn read_file(&mut self, key: &str, file: &str) -> Option<Vec<u8>> {
        match std::fs::read(file) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                self.problem(key, format!("{file}: cannot read: {e}"));
                None
            }
        }
    }
}
