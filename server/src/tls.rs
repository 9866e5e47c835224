//! HTTPS with rustls: the certificate chain and private key from `SSL_CERT_PATH` /
//! `SSL_KEY_PATH` (the original's variables), checked at start (readable, PEM, the key matches
//! the certificate: otherwise the start stops naming the file), and read again on SIGHUP (a
//! reload that fails is logged and the previous certificate stays in use).

use std::path::{Path, PathBuf};

use poem::listener::{RustlsCertificate, RustlsConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider every TLS config uses (aws-lc-rs, as the rest of the tree).
fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
    rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
}

/// Read and check the pair; the config poem serves it with.
pub fn load(cert: &Path, key: &Path) -> Result<RustlsConfig, String> {
    let cert_pem = std::fs::read(cert)
        .map_err(|e| format!("SSL_CERT_PATH={}: cannot read it: {e}", cert.display()))?;
    let key_pem = std::fs::read(key)
        .map_err(|e| format!("SSL_KEY_PATH={}: cannot read it: {e}", key.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "SSL_CERT_PATH={}: not a PEM certificate: {e}",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "SSL_CERT_PATH={}: holds no PEM certificate",
            cert.display()
        ));
    }
    let der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("SSL_KEY_PATH={}: not a PEM private key: {e}", key.display()))?;
    rustls::sign::CertifiedKey::from_der(chain, der, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "SSL_KEY_PATH={} is not the private key of the certificate in SSL_CERT_PATH={}",
            key.display(),
            cert.display()
        ),
        other => format!(
            "SSL_CERT_PATH={} / SSL_KEY_PATH={}: {other}",
            cert.display(),
            key.display()
        ),
    })?;
    Ok(RustlsConfig::new().fallback(RustlsCertificate::new().cert(cert_pem).key(key_pem)))
}

/// The configs to serve: the one checked at start, then a fresh one after each SIGHUP.
pub fn reloading(
    cert: PathBuf,
    key: PathBuf,
    first: RustlsConfig,
) -> impl futures_util::Stream<Item = RustlsConfig> + Send + 'static {
    // Registered now, so a SIGHUP never meets the default action (exit).
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    futures_util::stream::unfold((Some(first), hup), move |(first, mut hup)| {
        let (cert, key) = (cert.clone(), key.clone());
        async move {
            if let Some(c) = first {
                return Some((c, (None, hup)));
            }
            loop {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await?;
                    }
                    None => std::future::pending::<()>().await,
                }
                match load(&cert, &key) {
                    Ok(c) => {
                        tracing::info!(cert = %cert.display(), "TLS certificate reloaded (SIGHUP)");
                        return Some((c, (None, hup)));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "TLS reload failed; the previous certificate stays in use")
                    }
                }
            }
        }
    })
}
