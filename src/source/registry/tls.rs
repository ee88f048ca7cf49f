//! TLS towards one registry host: the CAs, client certificate and `skip_verify` its hosts.toml
//! gives (see [`super::hosts`]), none of it for a host reached over plain HTTP until it sends a
//! request to an https URL ([`HostClients`]), and telling a certificate failure from other
//! connect failures.
//!
//! The system's roots stay trusted when a host names CAs (containerd adds to the system pool
//! too). A certificate failure is reported as such and not retried: no number of attempts makes
//! an unknown issuer known, while a refused connection may be a registry that is restarting.
//! reqwest takes one client identity per client; containerd offers every pair it is given and
//! lets the handshake pick, but a host with several client certificates is rare enough that the
//! first one is used and the others are named in a warning.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use reqwest::{Method, RequestBuilder, Url};

use super::RegistryError;
use super::hosts::RegistryHost;

/// The HTTP clients of one registry host; requests pick theirs by their URL's scheme.
///
/// A host reached over plain HTTP gets a client without the system's root certificates: loading
/// them reads every file of `/etc/ssl/certs` (about 150 on Debian), which took about 40 ms of a
/// cold `lazylayer pull` (page cache dropped) and as much again in the snapshotter's mount, for
/// a connection that makes no TLS handshake. Such a host may still send a request to an https
/// URL (a blob redirected to object storage, a token server): the client with the roots is
/// made then, once. A host reached over https has that client from the start, so that a broken
/// CA or client certificate file is reported before any request.
#[derive(Clone)]
pub(super) struct HostClients {
    /// The client for the host's own scheme.
    own: reqwest::Client,
    /// For a plain-HTTP host: the client with roots, made on the first https URL.
    tls: Option<Arc<LazyTls>>,
}

type MakeClient = dyn Fn() -> Result<reqwest::Client, RegistryError> + Send + Sync;

struct LazyTls {
    client: OnceLock<reqwest::Client>,
    make: Box<MakeClient>,
}

impl HostClients {
    /// `builder` makes a builder with everything but TLS (timeouts, headers); `host`'s TLS
    /// settings are added as [`client`] does.
    pub(super) fn new(
        builder: impl Fn() -> reqwest::ClientBuilder + Send + Sync + 'static,
        name: &str,
        host: &RegistryHost,
    ) -> Result<HostClients, RegistryError> {
        if host.api.scheme() != "http" {
            return Ok(HostClients {
                own: client(builder(), name, host)?,
                tls: None,
            });
        }
        let own = client(builder().tls_built_in_root_certs(false), name, host)?;
        let (name, host) = (name.to_string(), host.clone());
        Ok(HostClients {
            own,
            tls: Some(Arc::new(LazyTls {
                client: OnceLock::new(),
                make: Box::new(move || client(builder(), &name, &host)),
            })),
        })
    }

    /// The client for `url`.
    fn for_url(&self, url: &Url) -> &reqwest::Client {
        match &self.tls {
            Some(lazy) if url.scheme() == "https" => lazy.client.get_or_init(|| {
                // Only a certificate file can fail, and the plain client was made with the same
                // files; its handshake then reports what is wrong with the URL it was sent to.
                (lazy.make)().unwrap_or_else(|_| self.own.clone())
            }),
            _ => &self.own,
        }
    }

    pub(super) fn request(&self, method: Method, url: Url) -> RequestBuilder {
        self.for_url(&url).request(method, url)
    }

    pub(super) fn get(&self, url: Url) -> RequestBuilder {
        self.request(Method::GET, url)
    }

    pub(super) fn head(&self, url: Url) -> RequestBuilder {
        self.request(Method::HEAD, url)
    }

    pub(super) fn put(&self, url: Url) -> RequestBuilder {
        self.request(Method::PUT, url)
    }

    pub(super) fn post(&self, url: Url) -> RequestBuilder {
        self.request(Method::POST, url)
    }

    pub(super) fn delete(&self, url: Url) -> RequestBuilder {
        self.request(Method::DELETE, url)
    }
}

/// The client `builder` makes with `host`'s TLS settings. Every file named is read now, so that
/// a missing or broken one is reported before any request, naming the file and where it was
/// configured (a client key that is not its certificate's is only found when the client is
/// built).
fn client(
    mut builder: reqwest::ClientBuilder,
    name: &str,
    host: &RegistryHost,
) -> Result<reqwest::Client, RegistryError> {
    let bad = |file: &Path, reason: String| RegistryError::TlsFile {
        host: name.to_string(),
        file: file.to_path_buf(),
        configured_in: host.configured_in.clone().unwrap_or_default(),
        reason,
    };
    let read = |file: &Path| std::fs::read(file).map_err(|e| bad(file, e.to_string()));
    for file in &host.ca {
        let certs = reqwest::Certificate::from_pem_bundle(&read(file)?)
            .ok()
            .filter(|certs| !certs.is_empty())
            .ok_or_else(|| bad(file, "not a PEM certificate".to_string()))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if let Some((cert, key)) = host.client.first() {
        if host.client.len() > 1 {
            tracing::warn!(host = name, used = %cert.display(), "only the first client certificate of a registry host is offered");
        }
        let mut pem = read(cert)?;
        if let Some(key) = key {
            pem.push(b'\n');
            pem.extend_from_slice(&read(key)?);
        }
        let shown = key.as_deref().unwrap_or(cert);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            bad(
                shown,
                format!(
                    "not a PEM certificate with its private key: {}",
                    super::error::describe_reqwest(&e)
                ),
            )
        })?;
        builder = builder.identity(identity);
    }
    if host.skip_verify {
        tracing::debug!(host = name, "certificate verification is off (skip_verify)");
        builder = builder.danger_accept_invalid_certs(true);
    }
    builder.build().map_err(|e| {
        let reason = super::error::describe_reqwest(&e);
        match host.client.first() {
            Some((cert, Some(key))) => bad(cert, format!("with key {}: {reason}", key.display())),
            Some((cert, None)) => bad(cert, reason),
            None => RegistryError::Connect {
                registry: name.to_string(),
                url: host.api.to_string(),
                reason,
            },
        }
    })
}

/// Whether `e` is a certificate failure: `Some(false)` when the registry's certificate was not
/// accepted, `Some(true)` when the registry did not accept ours (or wanted one); `None` for any
/// other failure.
pub(super) fn certificate_failure(e: &reqwest::Error) -> Option<bool> {
    use rustls::AlertDescription as Alert;
    // Alerts the registry sends when it does not accept our certificate, or wants one.
    const CLIENT_SIDE: [Alert; 7] = [
        Alert::BadCertificate,
        Alert::UnknownCA,
        Alert::CertificateRequired,
        Alert::CertificateUnknown,
        Alert::UnsupportedCertificate,
        Alert::CertificateExpired,
        Alert::CertificateRevoked,
    ];
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        // io::Error hides what it wraps from `source()` (and the TLS stack wraps io errors in
        // io errors); `get_ref` shows it.
        let mut inner: &(dyn std::error::Error + 'static) = err;
        while let Some(wrapped) = inner
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            inner = wrapped;
        }
        match inner.downcast_ref::<rustls::Error>() {
            Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
                return Some(false);
            }
            Some(rustls::Error::AlertReceived(alert)) if CLIENT_SIDE.contains(alert) => {
                return Some(true);
            }
            Some(_) => {}
            // An alert that arrives after the handshake (TLS 1.3 checks the client's
            // certificate then) reaches us as text only, in rustls's own words.
            None => {
                let text = inner.to_string();
                if CLIENT_SIDE
                    .iter()
                    .any(|a| text == rustls::Error::AlertReceived(*a).to_string())
                {
                    return Some(true);
                }
            }
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn host(api: &str) -> RegistryHost {
        RegistryHost {
            api: Url::parse(api).unwrap(),
            capabilities: super::super::hosts::Capabilities {
                pull: true,
                resolve: true,
                push: false,
            },
            ca: Vec::new(),
            client: Vec::new(),
            skip_verify: false,
            headers: Default::default(),
            is_server: true,
            configured_in: None,
        }
    }

    /// Counts the builders made: each is one client, and the client with roots costs reading
    /// the system's certificates.
    fn counted() -> (
        Arc<AtomicUsize>,
        impl Fn() -> reqwest::ClientBuilder + Send + Sync,
    ) {
        let made = Arc::new(AtomicUsize::new(0));
        let counter = made.clone();
        (made, move || {
            counter.fetch_add(1, Ordering::SeqCst);
            reqwest::Client::builder()
        })
    }

    #[test]
    fn a_plain_http_host_makes_its_tls_client_once_on_the_first_https_url() {
        let (made, builder) = counted();
        let clients = HostClients::new(builder, "reg", &host("http://reg:5000/v2/")).unwrap();
        assert_eq!(made.load(Ordering::SeqCst), 1);
        let plain = Url::parse("http://reg:5000/v2/x").unwrap();
        let tls = Url::parse("https://storage.example/blob").unwrap();
        assert!(std::ptr::eq(clients.for_url(&plain), &clients.own));
        assert_eq!(
            made.load(Ordering::SeqCst),
            1,
            "no TLS client for plain URLs"
        );
        let first = clients.for_url(&tls) as *const reqwest::Client;
        assert!(!std::ptr::eq(first, &clients.own));
        assert!(std::ptr::eq(clients.for_url(&tls), first));
        assert!(std::ptr::eq(clients.clone().for_url(&tls), first));
        assert_eq!(
            made.load(Ordering::SeqCst),
            2,
            "made once, shared by clones"
        );
    }

    #[test]
    fn an_https_host_has_one_client_with_roots_from_the_start() {
        let (made, builder) = counted();
        let clients = HostClients::new(builder, "reg", &host("https://reg/v2/")).unwrap();
        let tls = Url::parse("https://storage.example/blob").unwrap();
        assert!(std::ptr::eq(clients.for_url(&tls), &clients.own));
        assert_eq!(made.load(Ordering::SeqCst), 1);
    }
}
