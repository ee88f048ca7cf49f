//! A bearer-token server for Debian's docker-registry, as distribution's token spec describes:
//! `GET /token?service=S&scope=repository:NAME:pull` with Basic credentials answers
//! `{"token", "access_token", "expires_in"}`, the token an RS256 JWT whose header carries the
//! signing certificate (`x5c`) that the registry trusts through `rootcertbundle`.
//!
//! Two lifetimes are separate on purpose: `valid_for` is when the *registry* starts refusing the
//! token, `expires_in` is what the client is *told*. A test can thus check both renewal paths:
//! renewal ahead of an honest `expires_in`, and renewal after a 401 when the server lied.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::http::{HttpServer, Response};

/// distribution accepts a token this long after its `exp` (clock-skew leeway).
const REGISTRY_LEEWAY_SECS: i64 = 60;

pub struct TokenPolicy {
    pub user: String,
    pub password: String,
    /// Seconds after issue when the registry refuses the token.
    pub valid_for: i64,
    /// `expires_in` told to the client.
    pub expires_in: u64,
}

pub struct TokenServer {
    server: HttpServer,
    pub requests: Arc<AtomicUsize>,
    pub refused: Arc<AtomicUsize>,
    pub cert: PathBuf,
    pub service: String,
    pub issuer: String,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    pub fn start(policy: TokenPolicy) -> TokenServer {
        super::require_tool("openssl");
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("token.key");
        let cert = dir.path().join("token.crt");
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=lazylayer-test-token-issuer"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let key_pem = std::fs::read(&key).unwrap();
        let cert_pem = std::fs::read_to_string(&cert).unwrap();
        let cert_der_b64: String = cert_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let encoding_key = jsonwebtoken::EncodingKey::from_rsa_pem(&key_pem).unwrap();
        let service = "lazylayer-test-registry".to_string();
        let issuer = "lazylayer-test-issuer".to_string();
        let requests = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let expected_auth = format!(
            "Basic {}",
            BASE64.encode(format!("{}:{}", policy.user, policy.password))
        );
        let (svc, iss, req_count, refused_count) = (
            service.clone(),
            issuer.clone(),
            requests.clone(),
            refused.clone(),
        );
        let server = HttpServer::start(move |req| {
            req_count.fetch_add(1, Ordering::SeqCst);
            if req.header("authorization") != Some(expected_auth.as_str()) {
                refused_count.fetch_add(1, Ordering::SeqCst);
                return Response::new(401)
                    .header("WWW-Authenticate", "Basic realm=\"token\"")
                    .body(r#"{"details":"bad credentials"}"#);
            }
            let scope = req.query("scope").unwrap_or_default();
            let access: Vec<serde_json::Value> = scope
                .split(' ')
                .filter_map(|s| {
                    let mut parts = s.splitn(3, ':');
                    let (t, n, a) = (parts.next()?, parts.next()?, parts.next()?);
                    Some(serde_json::json!({"type": t, "name": n, "actions": a.split(',').collect::<Vec<_>>()}))
                })
                .collect();
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            let claims = serde_json::json!({
                "iss": iss, "sub": "user", "aud": svc,
                "exp": now + policy.valid_for - REGISTRY_LEEWAY_SECS,
                "nbf": now - 10, "iat": now,
                "jti": format!("{now}-{}", req_count.load(Ordering::SeqCst)),
                "access": access,
            });
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
            header.x5c = Some(vec![cert_der_b64.clone()]);
            let jwt = jsonwebtoken::encode(&header, &claims, &encoding_key).unwrap();
            let body = serde_json::json!({
                "token": jwt, "access_token": jwt, "expires_in": policy.expires_in,
            });
            Response::new(200)
                .header("Content-Type", "application/json")
                .body(body.to_string())
        });
        TokenServer {
            server,
            requests,
            refused,
            cert,
            service,
            issuer,
            _dir: dir,
        }
    }

    pub fn realm(&self) -> String {
        self.server.url("/token")
    }

    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}
