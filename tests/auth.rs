//! Connection tokens on the WebSocket upgrade: which are accepted (101) and which are
//! refused (401 before the upgrade), over real sockets with keys made by `openssl`.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use herald_server::config::{PublishAccess, SubscribeAccess};
// The test kit's tokens are signed with the same secret.
use herald_testkit::{history_rule, key_pair, Client, KeyKind, Node, TEST_SECRET as SECRET};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

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
        key_pair(&dir, "rsa", KeyKind::Rsa);
        key_pair(&dir, "ec", KeyKind::EcP256);
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

/// A client connected with `token` as `Authorization: Bearer`.
async fn connect_as(node: &Node, token: &str) -> Client {
    let mut req = node.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    Client::from_stream(ws).await
}

fn hs(claims: serde_json::Value) -> String {
    token(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
    )
}

/// The reply to one request (an `id` is added).
async fn ask(c: &mut Client, mut req: serde_json::Value, id: u64) -> serde_json::Value {
    req["id"] = json!(id);
    c.send_json(&req).await;
    let r = c.recv_json().await;
    assert_eq!(r["id"], id, "{r}");
    r
}

/// A node with the rules of the issue's example: public, personal, member-only and
/// private (claims) channels.
async fn ruled_node() -> Node {
    Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(SECRET.into());
        let rule = |pattern: &str, subscribe, publish| {
            let mut r = history_rule(pattern, 0);
            r.subscribe = subscribe;
            r.publish = publish;
            r
        };
        c.channels.rules = vec![
            rule("public:*", SubscribeAccess::Anyone, PublishAccess::Nobody),
            rule(
                "user:{sub}:*",
                SubscribeAccess::Authenticated,
                PublishAccess::Nobody,
            ),
            rule(
                "members:*",
                SubscribeAccess::Authenticated,
                PublishAccess::Authenticated,
            ),
            rule("private:*", SubscribeAccess::Claims, PublishAccess::Claims),
        ];
    })
    .await
}

#[tokio::test]
async fn channel_rules_decide_who_subscribes() {
    let node = ruled_node().await;
    let sub = |c: &str| json!({"op": "subscribe", "channel": c});
    let mut u42 = connect_as(&node, &hs(json!({"sub": "42", "exp": now() + 60}))).await;
    assert_eq!(
        ask(&mut u42, sub("user:42:inbox"), 1).await["op"],
        "subscribed"
    );
    let refused = ask(&mut u42, sub("user:43:inbox"), 2).await;
    assert_eq!(
        (&refused["op"], &refused["code"]),
        (&json!("error"), &json!("forbidden"))
    );
    assert_eq!(
        ask(&mut u42, sub("members:all"), 3).await["op"],
        "subscribed"
    );
    assert_eq!(
        ask(&mut u42, sub("private:vip"), 4).await["code"],
        "forbidden"
    );
    // Anonymous: public channels only.
    let mut anon = node.client().await;
    assert_eq!(
        ask(&mut anon, sub("public:news"), 1).await["op"],
        "subscribed"
    );
    assert_eq!(
        ask(&mut anon, sub("user:42:inbox"), 2).await["code"],
        "forbidden"
    );
    assert_eq!(
        ask(&mut anon, sub("members:all"), 3).await["code"],
        "forbidden"
    );
    // `claims` follows the token's channels claim.
    let vip = hs(json!({"sub": "7", "exp": now() + 60, "channels": ["private:vip"]}));
    let mut vip = connect_as(&node, &vip).await;
    assert_eq!(
        ask(&mut vip, sub("private:vip"), 1).await["op"],
        "subscribed"
    );
    assert_eq!(
        ask(&mut vip, sub("private:other"), 2).await["code"],
        "forbidden"
    );

    // The refused clients were not harmed: their subscriptions still deliver, and
    // nothing reached a channel they were refused.
    assert_eq!(node.publish("user:42:inbox", r#"{"n":1}"#).await, 200);
    assert_eq!(node.publish("public:news", r#"{"n":2}"#).await, 200);
    assert_eq!(node.publish("private:vip", r#"{"n":3}"#).await, 200);
    assert_eq!(u42.recv_json().await["data"]["n"], 1);
    assert_eq!(anon.recv_json().await["data"]["n"], 2);
    assert_eq!(vip.recv_json().await["data"]["n"], 3);
    for c in [&mut u42, &mut anon, &mut vip] {
        c.expect_silence(std::time::Duration::from_millis(200))
            .await;
    }
    assert_eq!(
        node.metric("herald_client_errors_total{code=\"forbidden\"}"),
        5.0
    );
}

#[tokio::test]
async fn subscription_tokens_open_one_private_channel_to_one_user() {
    let node = ruled_node().await;
    let mut u42 = connect_as(&node, &hs(json!({"sub": "42", "exp": now() + 60}))).await;
    let grant =
        |user: &str, channel: &str| hs(json!({"sub": user, "exp": now() + 60, "channel": channel}));
    let sub = |c: &str, t: String| json!({"op": "subscribe", "channel": c, "token": t});
    let ok = ask(&mut u42, sub("private:x", grant("42", "private:x")), 1).await;
    assert_eq!(ok["op"], "subscribed", "{ok}");
    let wrong_channel = ask(&mut u42, sub("private:y", grant("42", "private:x")), 2).await;
    assert_eq!(wrong_channel["code"], "forbidden");
    let other_user = ask(&mut u42, sub("private:z", grant("43", "private:z")), 3).await;
    assert_eq!(other_user["code"], "forbidden");
    let forged = ask(&mut u42, sub("private:z", "not.a.token".into()), 4).await;
    assert_eq!(forged["code"], "forbidden");
    // A subscription token opens no connection, and a connection token no channel.
    assert_eq!(
        upgrade(&node, Some(&grant("42", "private:x")), None)
            .await
            .0,
        401
    );
    let conn_token = hs(json!({"sub": "42", "exp": now() + 60}));
    assert_eq!(
        ask(&mut u42, sub("private:w", conn_token), 5).await["code"],
        "forbidden"
    );
    // Publishing on `claims` follows the publish claim; `authenticated` any token.
    let pubs = |c: &str| json!({"op": "publish", "channel": c, "data": 1});
    assert_eq!(
        ask(&mut u42, pubs("private:x"), 6).await["code"],
        "forbidden"
    );
    assert_eq!(
        ask(&mut u42, pubs("public:news"), 7).await["code"],
        "forbidden"
    );
    assert_eq!(
        ask(&mut u42, pubs("members:all"), 8).await["op"],
        "published"
    );
    // The granted subscription delivers.
    assert_eq!(node.publish("private:x", "5").await, 200);
    assert_eq!(u42.recv_json().await["data"], 5);
}

#[tokio::test]
async fn refresh_keeps_a_connection_and_expiry_closes_it_with_4001() {
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(SECRET.into());
        c.auth.expiry_grace = std::time::Duration::from_millis(500);
    })
    .await;
    // Both expire in 2 s; one refreshes before that.
    let soon = now() + 2;
    let mut keeps = connect_as(&node, &hs(json!({"sub": "1", "exp": soon}))).await;
    let mut lapses = connect_as(&node, &hs(json!({"sub": "2", "exp": soon}))).await;
    keeps.subscribe("news").await;
    lapses.subscribe("news").await;
    let later = now() + 600;
    let fresh = hs(json!({"sub": "1", "exp": later}));
    let r = ask(&mut keeps, json!({"op": "refresh", "token": fresh}), 1).await;
    assert_eq!(
        (&r["op"], &r["expires"]),
        (&json!("refreshed"), &json!(later))
    );
    // Refreshing with another user's token, or a bad one, is refused (and harmless).
    let other = hs(json!({"sub": "9", "exp": later}));
    let r = ask(&mut keeps, json!({"op": "refresh", "token": other}), 2).await;
    assert_eq!(r["code"], "forbidden");
    let r = ask(&mut keeps, json!({"op": "refresh", "token": "x"}), 3).await;
    assert_eq!(r["code"], "forbidden");

    let (closed, _) = lapses.closed().await;
    assert_eq!(closed.code, Some(4001), "{}", closed.reason);
    assert_eq!(closed.reason, "token expired");
    assert!(node.metric("herald_close_codes_total{code=\"4001\"}") >= 1.0);
    // The refreshed one lives on past the old expiry and still receives.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(node.publish("news", "1").await, 200);
    assert_eq!(keeps.recv_json().await["data"], 1);
}

/// A signed token whose `exp` is near `u64::MAX` once made the heartbeat sweeper panic:
/// the node drained and exited, and did so again after every restart (issue 18). It is
/// accepted with its expiry capped, and the node and its other clients go on.
#[tokio::test]
async fn a_token_that_never_expires_harms_no_one() {
    let node = Node::start_with(|c| {
        c.auth.jwt.hmac_secret = Some(SECRET.into());
        c.auth.expiry_grace = std::time::Duration::from_millis(500);
    })
    .await;
    let mut forever = connect_as(&node, &hs(json!({"sub": "1", "exp": u64::MAX - 1}))).await;
    forever.subscribe("news").await;
    // Several sweeps (every 250 ms with this grace).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let mut other = connect_as(&node, &hs(json!({"sub": "2", "exp": now() + 60}))).await;
    other.subscribe("news").await;
    assert_eq!(node.publish("news", "1").await, 200);
    assert_eq!(forever.recv_json().await["data"], 1);
    assert_eq!(other.recv_json().await["data"], 1);
    // A refresh to such a token answers the capped expiry.
    let huge = hs(json!({"sub": "1", "exp": u64::MAX}));
    let r = ask(&mut forever, json!({"op": "refresh", "token": huge}), 1).await;
    assert_eq!(r["expires"], herald_auth::MAX_EXP, "{r}");
}

/// `{sub}` is a whole segment (issue 18): under `user:{sub}:*`, a user id holding the
/// segment's end (`:`) matches nothing, so `4:x` cannot read user `4`'s channels and
/// `alice` keeps `alice:...` to herself; a pattern where `{sub}` runs into the rest
/// (`dm.{sub}*`, which let user `4` read `dm.42`) is refused at start-up.
#[tokio::test]
async fn sub_placeholders_never_overlap_between_users() {
    let node = ruled_node().await;
    let sub = |c: &str| json!({"op": "subscribe", "channel": c});
    let mut four = connect_as(&node, &hs(json!({"sub": "4", "exp": now() + 60}))).await;
    let mut colon = connect_as(&node, &hs(json!({"sub": "4:x", "exp": now() + 60}))).await;
    assert_eq!(
        ask(&mut four, sub("user:4:x:inbox"), 1).await["op"],
        "subscribed"
    );
    assert_eq!(
        ask(&mut four, sub("user:42:inbox"), 2).await["code"],
        "forbidden"
    );
    assert_eq!(
        ask(&mut colon, sub("user:4:x:inbox"), 1).await["code"],
        "forbidden"
    );
    assert_eq!(
        ask(&mut colon, sub("user:4:inbox"), 2).await["code"],
        "forbidden"
    );
    // Nothing reached the refused, and the allowed subscription delivers.
    assert_eq!(node.publish("user:4:x:inbox", r#"{"n":1}"#).await, 200);
    assert_eq!(four.recv_json().await["data"]["n"], 1);
    colon
        .expect_silence(std::time::Duration::from_millis(200))
        .await;

    // A configuration with such a pattern is refused (the process exits 64 with this
    // message: crates/herald/tests/process.rs).
    let e = herald_protocol::ChannelPattern::new("dm.{sub}*")
        .unwrap_err()
        .to_string();
    assert!(e.contains("{sub}:*"), "{e}");
}
