//! TLS on the public listener (`[tls]`): the certificate and key, read at start and
//! again on SIGHUP, behind an acceptor each new connection takes.

use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

use crate::config::TlsConfig;

/// The keys in force; a reload swaps them for new connections only.
pub(crate) struct TlsKeys {
    /// Where they are read from.
    files: TlsConfig,
    /// The configuration new handshakes use.
    config: RwLock<Arc<ServerConfig>>,
}

impl TlsKeys {
    /// The keys `[tls]` names; `None` when it names none (plain TCP).
    pub(crate) fn load(files: &TlsConfig) -> Result<Option<TlsKeys>, String> {
        let (cert, key) = match (&files.cert_file, &files.key_file) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) => return Ok(None),
            _ => return Err("cert_file and key_file go together".into()),
        };
        Ok(Some(TlsKeys {
            config: RwLock::new(server_config(cert, key)?),
            files: files.clone(),
        }))
    }

    /// Reads the files again; on an error the keys in force stay.
    pub(crate) fn reload(&self) -> Result<(), String> {
        let (Some(cert), Some(key)) = (&self.files.cert_file, &self.files.key_file) else {
            return Ok(());
        };
        *self.config.write() = server_config(cert, key)?;
        Ok(())
    }

    /// An acceptor with the keys in force now.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.read().clone())
    }
}

/// TLS 1.2 and 1.3 (rustls supports nothing older), HTTP/1.1 by ALPN (WebSocket
/// upgrades need it).
fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("cert_file {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "cert_file {}: no certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("key_file {}: {e}", key.display()))?;
    let mut config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("cert_file and key_file: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
