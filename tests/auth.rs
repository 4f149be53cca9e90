//! Connection tokens on the WebSocket upgrade: which are accepted (101) and which are
//! refused (401 before the upgrade), over real sockets with keys made by `openssl`.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use herald_testkit::{system_tool, Client, Node};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Keys for one test, made with `openssl` in a fresh directory.
struct Keys {
    dir: PathBuf,
}

impl Keys {
    fn new(name: &str) -> Keys {
        let dir = std::env::temp_dir().join(format!("herald-auth-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = system_tool("openssl", "openssl");
        let run = |args: &[&str]| {
            let ok = std::process::Command::new(&openssl)
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap()
                .status
                .success();
            assert!(ok, "openssl {args:?}");
        };
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.pem",
        ]);
        run(&["pkey", "-in", "rsa.pem", "-pubout", "-out", "rsa.pub.pem"]);
        run(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec.pem",
        ]);
        run(&["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub.pem"]);
        // A JWKS with two HMAC keys, chosen by kid.
        let k = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let jwks = json!({"keys": [
            {"kty": "oct", "kid": "k1", "alg": "HS256", "k": k("first-key-first-key-first-key-12")},
            {"kty": "oct", "kid": "k2", "alg": "HS256", "k": k("second-key-second-key-second-k34")},
        ]});
        std::fs::write(dir.join("jwks.json"), jwks.to_string()).unwrap();
        Keys { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    fn pem(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).unwrap()
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn token(
    alg: Algorithm,
    kid: Option<&str>,
    key: &EncodingKey,
    claims: serde_json::Value,
) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, &claims, key).unwrap()
}

fn claims(sub: &str) -> serde_json::Value {
    json!({"sub": sub, "exp": now() + 600, "aud": "herald"})
}

/// The upgrade's HTTP status and, on 101, the welcome frame's `user`.
async fn upgrade(node: &Node, bearer: Option<&str>, query: Option<&str>) -> (u16, Option<String>) {
    let url = match query {
        Some(t) => format!("{}?access_token={t}", node.ws_url()),
        None => node.ws_url(),
    };
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, resp)) => {
            let c = Client::from_stream(ws).await;
            let user = c.welcome["user"].as_str().map(str::to_owned);
            c.close().await;
            (resp.status().as_u16(), user)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (resp.status().as_u16(), None),
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

fn unsigned(claims: &serde_json::Value) -> String {
    let b = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    format!(
        "{}.{}.",
        b(&json!({"alg": "none", "typ": "JWT"})),
        b(claims)
    )
}

#[tokio::test]
async fn the_upgrade_accepts_only_valid_tokens() {
    let keys = Keys::new("matrix");
    let node = Node::start_with(|c| {
        c.auth.anonymous = false;
        c.auth.jwt.hmac_secret = Some(SECRET.into());
        c.auth.jwt.rsa_public_key_file = Some(keys.path("rsa.pub.pem"));
        c.auth.jwt.ecdsa_public_key_file = Some(keys.path("ec.pub.pem"));
        c.auth.jwt.jwks_file = Some(keys.path("jwks.json"));
        c.auth.jwt.audience = Some("herald".into());
    })
    .await;
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let rs = EncodingKey::from_rsa_pem(&keys.pem("rsa.pem")).unwrap();
    let es = EncodingKey::from_ec_pem(&keys.pem("ec.pem")).unwrap();
    let other = EncodingKey::from_secret(b"another-secret-another-secret-12345");
    let k1 = EncodingKey::from_secret(b"first-key-first-key-first-key-12");
    let k2 = EncodingKey::from_secret(b"second-key-second-key-second-k34");
    let mut expired = claims("u1");
    expired["exp"] = json!(now() - 10);
    let mut early = claims("u1");
    early["nbf"] = json!(now() + 600);
    let mut foreign = claims("u1");
    foreign["aud"] = json!("someone-else");

    let cases: Vec<(&str, Option<String>, u16)> = vec![
        ("no token", None, 401),
        (
            "bad signature",
            Some(token(Algorithm::HS256, None, &other, claims("u1"))),
            401,
        ),
        ("alg none", Some(unsigned(&claims("u1"))), 401),
        (
            "an algorithm no key allows",
            Some(token(Algorithm::PS256, None, &rs, claims("u1"))),
            401,
        ),
        (
            "expired",
            Some(token(Algorithm::HS256, None, &hs, expired)),
            401,
        ),
        (
            "not yet valid",
            Some(token(Algorithm::HS256, None, &hs, early)),
            401,
        ),
        (
            "wrong audience",
            Some(token(Algorithm::HS256, None, &hs, foreign)),
            401,
        ),
        ("garbage", Some("not.a.jwt".into()), 401),
        (
            "HS256",
            Some(token(Algorithm::HS256, None, &hs, claims("hs-user"))),
            101,
        ),
        (
            "HS512",
            Some(token(Algorithm::HS512, None, &hs, claims("hs-user"))),
            101,
        ),
        (
            "RS256",
            Some(token(Algorithm::RS256, None, &rs, claims("rs-user"))),
            101,
        ),
        (
            "ES256",
            Some(token(Algorithm::ES256, None, &es, claims("es-user"))),
            101,
        ),
        (
            "JWKS first key",
            Some(token(Algorithm::HS256, Some("k1"), &k1, claims("k1-user"))),
            101,
        ),
        (
            "JWKS second key",
            Some(token(Algorithm::HS256, Some("k2"), &k2, claims("k2-user"))),
            101,
        ),
        (
            "JWKS key under the other kid",
            Some(token(Algorithm::HS256, Some("k1"), &k2, claims("x"))),
            401,
        ),
    ];
    for (what, t, want) in &cases {
        let (status, user) = upgrade(&node, t.as_deref(), None).await;
        assert_eq!(status, *want, "{what}");
        if *want == 101 {
            assert!(
                user.is_some_and(|u| u.ends_with("-user")),
                "{what}: welcome names the user"
            );
        }
    }
    // Browsers cannot set headers: the query parameter works the same.
    let t = token(Algorithm::RS256, None, &rs, claims("q-user"));
    assert_eq!(
        upgrade(&node, None, Some(&t)).await,
        (101, Some("q-user".into()))
    );
    assert_eq!(upgrade(&node, None, Some("bad")).await.0, 401);
    let refused = cases.iter().filter(|c| c.2 == 401).count() + 1;
    assert_eq!(
        node.metric(r#"herald_connections_rejected_total{reason="unauthorized"}"#),
        refused as f64
    );
}

#[tokio::test]
async fn anonymous_clients_are_welcome_by_default_and_tokens_still_name_them() {
    let node = Node::start_with(|c| c.auth.jwt.hmac_secret = Some(SECRET.into())).await;
    assert_eq!(upgrade(&node, None, None).await, (101, None));
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let t = token(
        Algorithm::HS256,
        None,
        &hs,
        json!({"sub": "42", "exp": now() + 60}),
    );
    assert_eq!(
        upgrade(&node, Some(&t), None).await,
        (101, Some("42".into()))
    );
    // A bad token is refused even where anonymous clients are welcome: a client that
    // sends one expects to be someone.
    assert_eq!(upgrade(&node, Some("bad"), None).await.0, 401);
}

#[tokio::test]
async fn the_publish_claim_lets_a_client_publish() {
    let node = Node::start_with(|c| c.auth.jwt.hmac_secret = Some(SECRET.into())).await;
    let hs = EncodingKey::from_secret(SECRET.as_bytes());
    let t = token(
        Algorithm::HS256,
        None,
        &hs,
        json!({"sub": "7", "exp": now() + 60, "publish": ["chat:*"]}),
    );
    let mut req = node.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {t}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut c = Client::from_stream(ws).await;
    c.subscribe("chat:room").await;
    c.send_text(r#"{"op":"publish","channel":"chat:room","data":1,"id":9}"#)
        .await;
    assert_eq!(c.recv_json().await["op"], "published");
    assert_eq!(c.recv_json().await["data"], 1);
    c.send_text(r#"{"op":"publish","channel":"news","data":1,"id":10}"#)
        .await;
    assert_eq!(c.recv_json().await["code"], "forbidden");
    // Anonymous clients still cannot.
    let mut anon = node.client().await;
    anon.send_text(r#"{"op":"publish","channel":"chat:room","data":1,"id":1}"#)
        .await;
    assert_eq!(anon.recv_json().await["code"], "forbidden");
}
