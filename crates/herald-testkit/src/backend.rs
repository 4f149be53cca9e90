//! [`Backend`]: a real HTTP server standing for the application's backend (hooks and
//! webhooks), which records every request and answers as the test says.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::http::WAIT;

/// One request the backend received.
#[derive(Debug, Clone)]
pub struct Call {
    /// The request path.
    pub path: String,
    /// The request headers.
    pub headers: hyper::HeaderMap,
    /// The body's bytes.
    pub raw: Bytes,
    /// The body as JSON (`Null` if it is not).
    pub body: Value,
    /// The status the backend answered.
    pub status: u16,
}

type Answer = dyn Fn(&Call) -> (u16, String) + Send + Sync;

/// The backend: on `addr`, until dropped.
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Starts a backend that answers each request with `answer(call)`: status and body.
    pub async fn start(answer: impl Fn(&Call) -> (u16, String) + Send + Sync + 'static) -> Backend {
        Backend::serve(answer, None).await
    }

    /// The same over TLS (`https://127.0.0.1:port`), with the certificate `cert` and key
    /// `key` (PEM files).
    pub async fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        answer: impl Fn(&Call) -> (u16, String) + Send + Sync + 'static,
    ) -> Backend {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        Backend::serve(
            answer,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
        .await
    }

    async fn serve(
        answer: impl Fn(&Call) -> (u16, String) + Send + Sync + 'static,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let answer: Arc<Answer> = Arc::new(answer);
        let recorded = calls.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (answer, recorded, tls) = (answer.clone(), recorded.clone(), tls.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (answer, recorded) = (answer.clone(), recorded.clone());
                            async move {
                                let path = req.uri().path().to_owned();
                                let headers = req.headers().clone();
                                let raw = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
                                let mut call = Call {
                                    path,
                                    headers,
                                    raw,
                                    body,
                                    status: 0,
                                };
                                let (status, text) = answer(&call);
                                call.status = status;
                                recorded.lock().unwrap().push(call);
                                let mut r = hyper::Response::new(Full::new(Bytes::from(text)));
                                *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                                Ok::<_, Infallible>(r)
                            }
                        },
                    );
                    let http = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        Some(tls) => match tls.accept(stream).await {
                            Ok(s) => {
                                http.serve_connection(hyper_util::rt::TokioIo::new(s), service)
                                    .await
                            }
                            Err(_) => return,
                        },
                        None => {
                            http.serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                    };
                });
            }
        });
        Backend { addr, calls, task }
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Waits (up to the kit's wait) until the requests so far satisfy `done`; panics
    /// naming `what` and showing them otherwise.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let calls = self.calls();
            if done(&calls) {
                return calls;
            }
            if tokio::time::Instant::now() > deadline {
                let bodies: Vec<&Value> = calls.iter().map(|c| &c.body).collect();
                panic!("timed out waiting for {what}; the backend got {bodies:?}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
