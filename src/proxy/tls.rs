//! TLS termination (`[proxy.tls]`): the HTTPS listener's certificate, read from PEM files and
//! replaced in place when they change or on SIGHUP.
//!
//! rustls asks [`Certificates`] for the certificate at every handshake, and gets whatever pair
//! was last loaded (an [`ArcSwap`]): a reload touches no connection, open or being set up, and
//! the next handshake presents the new certificate. A pair that does not load (unreadable,
//! mismatched, expired) is refused at start-up with a message naming the key and the file, and
//! later only logged: the pair being served stays.
//!
//! Changes are found by polling the files' metadata every [`POLL`] (following symlinks, so the
//! `live/` links of certbot, swapped on renewal, count), and acted on once they have stood still
//! for one poll: a client of the files that writes the certificate and then the key is read
//! after both writes, not between them.
//!
//! Also here: [`redirect`], the plain listener's answer under `proxy.tls.redirect_http`.

use std::{
    io::Read,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio_util::sync::CancellationToken;

use bytes::Bytes;
use hyper::{
    Request, Response,
    body::Incoming,
    header::{self, HeaderValue},
};

use super::{body::ClientBody, error::ProxyError};
use crate::config::ProxyTlsConfig;

/// How often the certificate and key files are checked for changes.
pub const POLL: Duration = Duration::from_secs(1);

/// Largest certificate or key file read (a chain of a few certificates is a few KiB).
const MAX_FILE: u64 = 1024 * 1024;

/// Why a certificate and key could not be used. Each message starts with the configuration key
/// and names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // The causes are part of the message (`error`, not `source`): start-up errors are printed
    // with their chain, which would repeat them.
    #[error("{key}: cannot read {}: {error}", path.display())]
    Read {
        key: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{key}: {} is larger than 1 MiB; it is not a PEM file", path.display())]
    TooLarge { key: &'static str, path: PathBuf },
    #[error("proxy.tls.cert: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)", .0.display())]
    NoCertificate(PathBuf),
    #[error("proxy.tls.cert: {} is not a valid PEM certificate chain: {message}", path.display())]
    BadCertificate { path: PathBuf, message: String },
    #[error(
        "proxy.tls.key: {} holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {message}",
        path.display()
    )]
    NoKey { path: PathBuf, message: String },
    #[error("proxy.tls.key: {} is not a usable private key: {error}", path.display())]
    BadKey { path: PathBuf, error: rustls::Error },
    #[error(
        "proxy.tls.key: {} is not the key of the certificate in proxy.tls.cert ({})",
        key.display(),
        cert.display()
    )]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("proxy.tls.cert: the certificate in {} expired at {not_after}", path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error("proxy.tls.cert: the certificate in {} is not valid before {not_before}", path.display())]
    NotYetValid { path: PathBuf, not_before: String },
}

/// A certificate chain and key that loaded, and what operators want to know about it.
pub struct Loaded {
    pub key: Arc<CertifiedKey>,
    /// The server certificate's subject, e.g. `CN=api.example.com`.
    pub subject: String,
    /// Its serial number, hex bytes separated by colons.
    pub serial: String,
    /// Its end of validity, Unix seconds.
    pub not_after: i64,
}

impl Loaded {
    fn describe(&self) -> String {
        format!(
            "{} (serial {}, valid until {})",
            self.subject,
            self.serial,
            rfc3339(self.not_after)
        )
    }
}

/// Reads and checks the pair named by `[proxy.tls]`.
pub fn load(cert: &Path, key: &Path) -> Result<Loaded, TlsError> {
    let cert_pem = read_capped("proxy.tls.cert", cert)?;
    let key_pem = read_capped("proxy.tls.key", key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::BadCertificate {
            path: cert.to_owned(),
            message: error.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate(cert.to_owned()));
    };
    let (subject, serial, not_before, not_after) = match x509_parser::parse_x509_certificate(leaf) {
        Ok((_, parsed)) => (
            parsed.subject().to_string(),
            parsed.raw_serial_as_string(),
            parsed.validity().not_before.timestamp(),
            parsed.validity().not_after.timestamp(),
        ),
        Err(error) => {
            return Err(TlsError::BadCertificate {
                path: cert.to_owned(),
                message: error.to_string(),
            });
        }
    };
    let now = chrono::Utc::now().timestamp();
    if now > not_after {
        return Err(TlsError::Expired {
            path: cert.to_owned(),
            not_after: rfc3339(not_after),
        });
    }
    if now < not_before {
        return Err(TlsError::NotYetValid {
            path: cert.to_owned(),
            not_before: rfc3339(not_before),
        });
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|error| TlsError::NoKey {
        path: key.to_owned(),
        message: error.to_string(),
    })?;
    let certified =
        CertifiedKey::from_der(chain, private, &provider()).map_err(|error| match error {
            rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            },
            error => TlsError::BadKey {
                path: key.to_owned(),
                error,
            },
        })?;
    Ok(Loaded {
        key: Arc::new(certified),
        subject,
        serial,
        not_after,
    })
}

fn read_capped(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_error = |error| TlsError::Read {
        key,
        path: path.to_owned(),
        error,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_FILE + 1).read_to_end(&mut bytes))
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_FILE {
        return Err(TlsError::TooLarge {
            key,
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0).map_or_else(|| unix.to_string(), |t| t.to_rfc3339())
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// What identifies one version of a file: a rewrite changes the modification time (and usually
/// the size), a replacement (rename, symlink swap) the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: meta.dev(),
        ino: meta.ino(),
        len: meta.len(),
        mtime: meta.mtime(),
        mtime_nsec: meta.mtime_nsec(),
    })
}

type Stamps = (Option<Stamp>, Option<Stamp>);

/// The HTTPS listener's certificate: what rustls serves, and the files it comes from.
pub struct Certificates {
    cert: PathBuf,
    key: PathBuf,
    current: ArcSwap<Loaded>,
    /// The files' stamps when they were last read, successfully or not: a pair that failed is
    /// read again only once a file changes again (or on SIGHUP).
    read: Mutex<Stamps>,
    /// Reloads that replaced the pair, and reloads that kept it because the new one failed.
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish()
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().key.clone())
    }
}

impl Certificates {
    /// Loads the pair once; an error here is a start-up error.
    pub fn new(config: &ProxyTlsConfig) -> Result<Arc<Self>, TlsError> {
        let (cert, key) = config
            .files()
            .expect("Certificates::new is called when proxy.tls is on");
        let stamps = (stamp(cert), stamp(key));
        let loaded = load(cert, key)?;
        tracing::info!(certificate = %loaded.describe(), "TLS certificate loaded");
        Ok(Arc::new(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: ArcSwap::from_pointee(loaded),
            read: Mutex::new(stamps),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }))
    }

    /// The rustls configuration of the HTTPS listener: this certificate, TLS 1.2 and 1.3 with
    /// rustls's default (safe) cipher suites, ALPN `h2` then `http/1.1`.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// The pair being served.
    pub fn current(&self) -> Arc<Loaded> {
        self.current.load_full()
    }

    /// Reads the files again and serves the new pair; when it does not load, logs why and keeps
    /// the current one. `why` is for the log (`SIGHUP`, `files changed`).
    pub fn reload(&self, why: &str) -> Result<(), TlsError> {
        let stamps = (stamp(&self.cert), stamp(&self.key));
        *self.read.lock().unwrap_or_else(|e| e.into_inner()) = stamps;
        match load(&self.cert, &self.key) {
            Ok(loaded) => {
                tracing::info!(
                    reason = why,
                    certificate = %loaded.describe(),
                    "TLS certificate reloaded"
                );
                self.current.store(Arc::new(loaded));
                self.reloads.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(error) => {
                tracing::error!(
                    reason = why,
                    %error,
                    kept = %self.current.load().describe(),
                    "TLS certificate not reloaded; still serving the current one"
                );
                self.reload_failures.fetch_add(1, Relaxed);
                Err(error)
            }
        }
    }

    /// Polls the files every [`POLL`] until `shutdown`, reloading once a change has stood still
    /// for one poll.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut settling: Option<Stamps> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                () = tokio::time::sleep(POLL) => {}
            }
            let now = (stamp(&self.cert), stamp(&self.key));
            if now == *self.read.lock().unwrap_or_else(|e| e.into_inner()) {
                settling = None;
            } else if settling == Some(now) {
                settling = None;
                let _ = self.reload("files changed");
            } else {
                settling = Some(now);
            }
        }
    }
}

/// `proxy.tls.redirect_http`: 308 to the same host, path and query over HTTPS (on
/// `https_port`); 400 when the request names no valid host.
pub fn redirect(req: &Request<Incoming>, https_port: u16) -> Response<ClientBody> {
    let authority = req
        .headers()
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .and_then(|host| host.parse::<hyper::http::uri::Authority>().ok());
    let Some(authority) = authority else {
        return ProxyError::NoHost.into_response(None);
    };
    let port = match https_port {
        443 => String::new(),
        port => format!(":{port}"),
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{}{port}{target}", authority.host());
    let Ok(location) = HeaderValue::from_str(&location) else {
        return ProxyError::NoHost.into_response(None);
    };
    let mut response = Response::new(ClientBody::local(Bytes::new()));
    *response.status_mut() = hyper::StatusCode::PERMANENT_REDIRECT;
    response.headers_mut().insert(header::LOCATION, location);
    response
}
