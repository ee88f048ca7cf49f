//! TLS towards one registry host: the CAs, client certificate and `skip_verify` its hosts.toml
//! gives (see [`super::hosts`]), and telling a certificate failure from other connect failures.
//!
//! The system's roots stay trusted when a host names CAs (containerd adds to the system pool
//! too). A certificate failure is reported as such and not retried: no number of attempts makes
//! an unknown issuer known, while a refused connection may be a registry that is restarting.
//! reqwest takes one client identity per client; containerd offers every pair it is given and
//! lets the handshake pick, but a host with several client certificates is rare enough that the
//! first one is used and the others are named in a warning.

use std::path::Path;

use super::RegistryError;
use super::hosts::RegistryHost;

/// The client `builder` makes with `host`'s TLS settings. Every file named is read now, so that
/// a missing or broken one is reported before any request, naming the file and where it was
/// configured (a client key that is not its certificate's is only found when the client is
/// built).
pub(super) fn client(
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
