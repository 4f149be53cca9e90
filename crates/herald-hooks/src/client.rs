//! The pooled HTTP/1.1 client hooks and webhooks share: `http://` and `https://` URLs,
//! TLS through rustls (ring) trusting the system's roots plus an optional private CA.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use crate::InvalidHooks;

/// The client.
pub(crate) type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A `POST` of the JSON `body` to `url`, with `X-Herald-Timestamp` and, when `secret`
/// is set, `X-Herald-Signature` ([`crate::sign`]).
pub(crate) fn signed_post(
    url: &str,
    secret: &str,
    body: Bytes,
) -> Result<hyper::Request<Full<Bytes>>, String> {
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("x-herald-timestamp", timestamp.to_string());
    if !secret.is_empty() {
        req = req.header("x-herald-signature", crate::sign(secret, timestamp, &body));
    }
    req.body(Full::new(body)).map_err(|e| e.to_string())
}

/// Checks that `url` (of the table `name`) is an `http://` or `https://` URL with a host.
pub(crate) fn check_url(name: &str, url: &str) -> Result<(), InvalidHooks> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| InvalidHooks(format!("{name}.url {url:?}: {e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(()),
        _ => Err(InvalidHooks(format!(
            "{name}.url {url:?}: an http:// or https:// URL with a host"
        ))),
    }
}

fn read_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, InvalidHooks> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|e| InvalidHooks(format!("tls_ca_file {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(InvalidHooks(format!(
            "tls_ca_file {}: no certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// Checks that `ca` (if any) holds certificates.
pub(crate) fn check_ca(ca: Option<&Path>) -> Result<(), InvalidHooks> {
    ca.map(read_ca).transpose().map(drop)
}

/// A client with pooled keep-alive connections (30 s idle), TCP_NODELAY, trusting the
/// system's roots and the certificates in `ca`.
pub(crate) fn new(ca: Option<&Path>) -> Result<HttpClient, InvalidHooks> {
    let mut roots = rustls::RootCertStore::empty();
    // A machine without a system store can still reach an http:// backend, or an
    // https:// one through `tls_ca_file`.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(ca) = ca {
        for cert in read_ca(ca)? {
            roots
                .add(cert)
                .map_err(|e| InvalidHooks(format!("tls_ca_file {}: {e}", ca.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| InvalidHooks(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector))
}
