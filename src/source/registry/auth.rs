//! Registry authentication: challenges, credentials and a per-scope token cache.
//!
//! The distribution spec leaves auth to a challenge: a request without (valid) credentials gets
//! `401` with `WWW-Authenticate: Basic realm=...` or `Bearer realm=...,service=...,scope=...`.
//! For Basic we resend with the user's credentials. For Bearer we ask the token server named by
//! `realm` for a token for the scope (anonymously, or with Basic credentials when we have them)
//! and resend with `Authorization: Bearer`. This is the Docker Hub flow that containerd and
//! Docker implement; the OAuth2 POST variant is not used because every token server also answers
//! the GET form.
//!
//! Tokens are cached per scope (`repository:NAME:pull`) and reused until shortly before
//! `expires_in` runs out, so a long run of range reads never presents an expired token; a `401`
//! on a cached token drops it and fetches a new one once (the server may have revoked it, or the
//! clocks may disagree). Both paths are invisible to callers of the registry client.
//!
//! Credentials come from `--user` or from Docker's `config.json`, with Docker's rules: a
//! credential helper named for the registry in `credHelpers` wins, then the `credsStore` helper,
//! then the `auths` entry (`auth`, base64 of `user:password`). A helper is run as Docker runs it
//! (`docker-credential-NAME get`, the registry on stdin, JSON on stdout), with a time limit
//! ([`HELPER_TIMEOUT`]); one that is missing, fails, hangs or prints something else is an
//! error naming it and the config file, and "credentials not found" means anonymous, as in
//! Docker. The config file is the user's own (the daemon runs as root and reads root's), so the
//! helpers it names are trusted as Docker trusts them. Credentials never appear in logs, errors
//! or `Debug` output: a helper's output is quoted in an error only when it is not JSON.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::RegistryError;
use crate::source::config::Credentials;

/// `Authorization: Basic` for `credentials`.
fn basic_header(credentials: &Credentials) -> String {
    format!(
        "Basic {}",
        BASE64.encode(format!("{}:{}", credentials.username, credentials.password))
    )
}

/// The authentication scheme a registry asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scheme {
    Basic,
    Bearer,
    Other(String),
}

/// One challenge from a `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    pub scheme: Scheme,
    /// Parameter names are lower-cased (they are case-insensitive in RFC 7235).
    pub params: BTreeMap<String, String>,
}

/// Parses a `WWW-Authenticate` value, which may hold several challenges
/// (`Bearer realm="a",scope="x:y:pull,push", Basic realm="b"`). Quoted values may contain commas
/// and backslash escapes. Malformed trailing input is ignored rather than failing the request:
/// the caller then reports that no usable challenge was offered.
pub fn parse_www_authenticate(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let b = header.as_bytes();
    let mut i = 0;
    let is_token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&c);
    while i < b.len() {
        while i < b.len() && (b[i] == b' ' || b[i] == b',' || b[i] == b'\t') {
            i += 1;
        }
        let start = i;
        while i < b.len() && is_token(b[i]) {
            i += 1;
        }
        if start == i {
            break; // not a token: stop parsing
        }
        let word = &header[start..i];
        let mut j = i;
        while j < b.len() && b[j] == b' ' {
            j += 1;
        }
        let is_param = j < b.len() && b[j] == b'=' && !out.is_empty();
        if !is_param {
            let scheme = match word.to_ascii_lowercase().as_str() {
                "basic" => Scheme::Basic,
                "bearer" => Scheme::Bearer,
                _ => Scheme::Other(word.to_string()),
            };
            out.push(Challenge {
                scheme,
                params: BTreeMap::new(),
            });
            continue;
        }
        i = j + 1;
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        let mut value = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                let ch_len = header[i..].chars().next().map_or(1, char::len_utf8);
                value.push_str(&header[i..i + ch_len]);
                i += ch_len;
            }
            i += 1; // closing quote
        } else {
            let vs = i;
            while i < b.len() && b[i] != b',' && b[i] != b' ' {
                i += 1;
            }
            value.push_str(&header[vs..i]);
        }
        if let Some(last) = out.last_mut() {
            last.params.insert(word.to_ascii_lowercase(), value);
        }
    }
    out
}

/// Docker's `config.json`: the `auths` map is all we read.
#[derive(Deserialize, Default)]
struct DockerConfigFile {
    #[serde(default)]
    auths: HashMap<String, DockerAuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
struct DockerAuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Looks up credentials for `registry` (as written in image references; `docker.io` for Docker
/// Hub) in a Docker `config.json`. A missing file means no credentials; an unreadable or
/// malformed one is an error naming the file, since silently going anonymous would turn into a
/// confusing "unauthorized" later.
pub fn docker_config_credentials(
    path: &Path,
    registry: &str,
) -> Result<Option<Credentials>, RegistryError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(RegistryError::Config {
                path: path.to_path_buf(),
                reason: e.to_string(),
            });
        }
    };
    let file: DockerConfigFile =
        serde_json::from_slice(&text).map_err(|e| RegistryError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let wanted = normalize_auth_key(registry);
    let helper = file
        .cred_helpers
        .iter()
        .find(|(k, _)| normalize_auth_key(k) == wanted)
        .map(|(_, v)| v)
        .or(file.creds_store.as_ref())
        .filter(|h| !h.is_empty());
    if let Some(helper) = helper {
        return helper_credentials(helper, registry, None, HELPER_TIMEOUT).map_err(|reason| {
            RegistryError::CredentialHelper {
                helper: helper.clone(),
                config: path.to_path_buf(),
                registry: registry.to_string(),
                reason,
            }
        });
    }
    let entry = file
        .auths
        .iter()
        .find(|(k, _)| normalize_auth_key(k) == wanted)
        .map(|(_, v)| v);
    let Some(entry) = entry else {
        return Ok(None);
    };
    let bad = |reason: &str| RegistryError::Config {
        path: path.to_path_buf(),
        reason: format!("auths entry for {registry}: {reason}"),
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = BASE64
            .decode(auth.trim())
            .map_err(|_| bad("`auth` is not valid base64"))?;
        let decoded = String::from_utf8(decoded).map_err(|_| bad("`auth` is not UTF-8"))?;
        return Credentials::parse(&decoded)
            .map(Some)
            .map_err(|_| bad("`auth` does not decode to USER:PASSWORD"));
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) => Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        })),
        _ => Ok(None),
    }
}

/// How long a credential helper may take: keychains and cloud helpers (ECR, GCR) answer in
/// well under a second, or a few seconds when they refresh a token; a helper that has not
/// answered in 10 s is stuck (waiting for a desktop prompt nobody sees, a dead network).
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a credential helper prints for `get`.
#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// Runs `docker-credential-HELPER get` (from `PATH`, or from `dir`) for `registry`, as Docker
/// does: the server on stdin (`https://index.docker.io/v1/` for Docker Hub, as `docker login`
/// stores it), JSON on stdout; killed after `timeout`. `None`: the helper has no credentials
/// for it.
fn helper_credentials(
    helper: &str,
    registry: &str,
    dir: Option<&Path>,
    timeout: Duration,
) -> Result<Option<Credentials>, String> {
    use std::io::{Read, Write};
    if helper.contains('/') {
        return Err("a helper name cannot contain `/`".into());
    }
    let program = format!("docker-credential-{helper}");
    let program = match dir {
        Some(dir) => dir.join(program),
        None => program.into(),
    };
    let server = match normalize_auth_key(registry).as_str() {
        "docker.io" => "https://index.docker.io/v1/".to_string(),
        _ => registry.to_string(),
    };
    use std::os::unix::process::CommandExt;
    let mut child = std::process::Command::new(&program)
        .arg("get")
        // Its own process group, so that a helper that hangs is killed with its children.
        .process_group(0)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => "not found on PATH (install it, or remove it from \
                                             the config)"
                .to_string(),
            _ => format!("cannot start it: {e}"),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading is judged by its exit status below.
        let _ = stdin.write_all(server.as_bytes());
    }
    // Read in threads, so that a helper that fills a pipe cannot stall the wait.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(pipe) = pipe {
                let _ = pipe.take(1 << 20).read_to_end(&mut out);
            }
            out
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(None) => {
                // SAFETY: kill(2) on the process group of a child we started and have not
                // reaped (its pid is still ours).
                unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                let _ = child.wait();
                return Err(format!("no answer within {} s", timeout.as_secs_f64()));
            }
            Err(e) => return Err(e.to_string()),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let answer = serde_json::from_slice::<HelperAnswer>(&stdout);
    if status.success() {
        return match answer {
            Ok(a) if a.username == "<token>" => Err(
                "it gave an identity token, which lazylayer cannot use yet; log in with a \
                 password or pass --user"
                    .into(),
            ),
            Ok(a) => Ok(Some(Credentials {
                username: a.username,
                password: a.secret,
            })),
            Err(_) => Err("its answer is not the JSON credential helpers print".into()),
        };
    }
    // Helpers report errors as text on stdout (the docker-credential-helpers library) or on
    // stderr; a failure's output is never credentials, but JSON is not quoted all the same.
    let said = [&stdout, &stderr]
        .into_iter()
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .find(|t| !t.is_empty() && serde_json::from_str::<serde_json::Value>(t).is_err())
        .unwrap_or_default();
    if said.to_ascii_lowercase().contains("credentials not found") {
        return Ok(None);
    }
    let said: String = said
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    Err(match said.is_empty() {
        true => format!("it failed ({status})"),
        false => format!("it failed ({status}): {said}"),
    })
}

/// `https://index.docker.io/v1/`, `registry-1.docker.io` and `docker.io` all mean Docker Hub;
/// other keys may carry a scheme and path that are not part of the host.
fn normalize_auth_key(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k).to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io".to_string(),
        _ => host,
    }
}

/// Token server response (the distribution token spec; `access_token` is the OAuth2 spelling).
#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// Tokens without `expires_in` live 60 s, per the token spec.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Renew this long before expiry at most: enough for a slow request to finish with the old token.
const MAX_RENEW_MARGIN: Duration = Duration::from_secs(30);

struct CachedToken {
    header: String,
    renew_at: Instant,
}

/// Authentication state for one registry host, shared by every request to it.
pub struct Authenticator {
    registry: String,
    credentials: Option<Credentials>,
    http: super::tls::HostClients,
    /// The last challenge the registry sent; `None` until the first 401.
    challenge: std::sync::Mutex<Option<Challenge>>,
    /// Bearer tokens by scope. The async mutex serialises token fetches so that many
    /// concurrent reads after a 401 fetch one token, not one each.
    tokens: Mutex<HashMap<String, CachedToken>>,
}

impl Authenticator {
    pub(super) fn new(
        registry: String,
        credentials: Option<Credentials>,
        http: super::tls::HostClients,
    ) -> Self {
        Authenticator {
            registry,
            credentials,
            http,
            challenge: std::sync::Mutex::new(None),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    /// The `Authorization` value to send for `scope`, or `None` when the registry has not asked
    /// for auth (yet). Fetches or renews a bearer token when needed.
    pub async fn authorization(&self, scope: &str) -> Result<Option<String>, RegistryError> {
        let challenge = self.challenge.lock().expect("challenge lock").clone();
        let Some(challenge) = challenge else {
            return Ok(None);
        };
        match challenge.scheme {
            Scheme::Basic => Ok(self.credentials.as_ref().map(basic_header)),
            Scheme::Bearer => {
                let mut tokens = self.tokens.lock().await;
                if let Some(t) = tokens.get(scope)
                    && Instant::now() < t.renew_at
                {
                    return Ok(Some(t.header.clone()));
                }
                let fresh = self.fetch_token(&challenge, scope).await?;
                let header = fresh.header.clone();
                tokens.insert(scope.to_string(), fresh);
                Ok(Some(header))
            }
            Scheme::Other(ref s) => Err(RegistryError::UnsupportedAuth {
                registry: self.registry.clone(),
                scheme: s.clone(),
            }),
        }
    }

    /// Records the preferred challenge of a `WWW-Authenticate` value (Bearer over Basic).
    /// Returns its scheme, or `None` when the header offered nothing usable.
    pub fn learn_challenge(&self, www_authenticate: Option<&str>) -> Option<Scheme> {
        let challenges = www_authenticate
            .map(parse_www_authenticate)
            .unwrap_or_default();
        let chosen = challenges
            .iter()
            .find(|c| c.scheme == Scheme::Bearer)
            .or_else(|| challenges.iter().find(|c| c.scheme == Scheme::Basic))
            .or(challenges.first())
            .cloned()?;
        let scheme = chosen.scheme.clone();
        *self.challenge.lock().expect("challenge lock") = Some(chosen);
        Some(scheme)
    }

    /// Handles a 401: records its challenge and drops the token that was refused. Returns
    /// whether a retry can succeed where the refused request did not.
    pub async fn unauthorized(
        &self,
        www_authenticate: Option<&str>,
        scope: &str,
        sent_authorization: bool,
    ) -> bool {
        let Some(scheme) = self.learn_challenge(www_authenticate) else {
            return false;
        };
        self.tokens.lock().await.remove(scope);
        // Basic credentials that were already sent and refused will be refused again.
        !(scheme == Scheme::Basic && (sent_authorization || self.credentials.is_none()))
    }

    async fn fetch_token(
        &self,
        challenge: &Challenge,
        scope: &str,
    ) -> Result<CachedToken, RegistryError> {
        let realm = challenge
            .params
            .get("realm")
            .ok_or_else(|| RegistryError::BadChallenge {
                registry: self.registry.clone(),
                reason: "Bearer challenge without realm".into(),
            })?;
        let mut url = url::Url::parse(realm).map_err(|e| RegistryError::BadChallenge {
            registry: self.registry.clone(),
            reason: format!("realm `{realm}` is not a URL: {e}"),
        })?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(service) = challenge.params.get("service") {
                q.append_pair("service", service);
            }
            q.append_pair("scope", scope);
        }
        let mut req = self.http.get(url.clone());
        if let Some(c) = &self.credentials {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let token_host = url.host_str().unwrap_or("").to_string();
        let resp = req.send().await.map_err(|e| RegistryError::Token {
            registry: self.registry.clone(),
            realm: realm.clone(),
            reason: super::describe_reqwest(&e),
        })?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(RegistryError::Unauthorized {
                registry: self.registry.clone(),
                detail: format!(
                    "token server {token_host} refused {} for scope {scope}",
                    if self.credentials.is_some() {
                        "the given credentials"
                    } else {
                        "anonymous access"
                    }
                ),
            });
        }
        if !status.is_success() {
            return Err(RegistryError::Token {
                registry: self.registry.clone(),
                realm: realm.clone(),
                reason: format!("HTTP {status}"),
            });
        }
        let body = resp.bytes().await.map_err(|e| RegistryError::Token {
            registry: self.registry.clone(),
            realm: realm.clone(),
            reason: super::describe_reqwest(&e),
        })?;
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| RegistryError::Token {
                registry: self.registry.clone(),
                realm: realm.clone(),
                reason: format!("malformed token response: {e}"),
            })?;
        let token = parsed
            .token
            .or(parsed.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Token {
                registry: self.registry.clone(),
                realm: realm.clone(),
                reason: "response has neither `token` nor `access_token`".into(),
            })?;
        let lifetime = parsed
            .expires_in
            .filter(|s| *s > 0)
            .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
        let margin = (lifetime / 5).min(MAX_RENEW_MARGIN);
        tracing::debug!(registry = %self.registry, scope, lifetime_s = lifetime.as_secs(), "fetched registry token");
        Ok(CachedToken {
            header: format!("Bearer {token}"),
            renew_at: Instant::now() + lifetime - margin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_helpers_are_run_as_docker_runs_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // Every helper is written before any runs (a script still open for writing cannot be
        // executed).
        let helpers = [
            (
                "ok",
                r#"read s; echo "{\"ServerURL\":\"$s\",\"Username\":\"u-$s\",\"Secret\":\"pw\"}""#,
            ),
            (
                "none",
                "echo 'credentials not found in native keychain'; exit 1",
            ),
            ("broken", "echo 'dbus: the keyring is locked' >&2; exit 3"),
            ("garbage", "echo 'hello'"),
            (
                "token",
                r#"echo '{"Username":"<token>","Secret":"refresh"}'"#,
            ),
            ("slow", "sleep 5"),
        ];
        for (name, body) in helpers {
            let path = dir.path().join(format!("docker-credential-{name}"));
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let run = |helper: &str, registry: &str| {
            helper_credentials(helper, registry, Some(dir.path()), Duration::from_secs(1))
        };
        let got = run("ok", "registry.example:5000").unwrap().unwrap();
        assert_eq!(
            (got.username.as_str(), got.password.as_str()),
            ("u-registry.example:5000", "pw")
        );
        // Docker Hub is asked for under the name `docker login` stores it as.
        let hub = run("ok", "docker.io").unwrap().unwrap();
        assert_eq!(hub.username, "u-https://index.docker.io/v1/");
        assert!(run("none", "r").unwrap().is_none());
        let broken = run("broken", "r").unwrap_err();
        assert!(broken.contains("keyring is locked"), "{broken}");
        assert!(run("garbage", "r").unwrap_err().contains("not the JSON"));
        assert!(run("token", "r").unwrap_err().contains("identity token"));
        assert!(
            run("slow", "r")
                .unwrap_err()
                .contains("no answer within 1 s")
        );
        assert!(
            run("missing", "r")
                .unwrap_err()
                .contains("not found on PATH")
        );
        assert!(run("../x", "r").unwrap_err().contains("`/`"));
    }

    fn params(c: &Challenge) -> Vec<(&str, &str)> {
        c.params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn parses_docker_hub_bearer_challenge() {
        let c = parse_www_authenticate(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull""#,
        );
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].scheme, Scheme::Bearer);
        assert_eq!(
            params(&c[0]),
            vec![
                ("realm", "https://auth.docker.io/token"),
                ("scope", "repository:library/python:pull"),
                ("service", "registry.docker.io"),
            ]
        );
    }

    #[test]
    fn parses_multiple_challenges_commas_in_quotes_and_escapes() {
        let c = parse_www_authenticate(
            r#"Bearer realm="http://h/t", scope="repository:a/b:pull,push", error="insufficient_scope", Basic Realm="say \"hi\"""#,
        );
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].params["scope"], "repository:a/b:pull,push");
        assert_eq!(c[0].params["error"], "insufficient_scope");
        assert_eq!(c[1].scheme, Scheme::Basic);
        assert_eq!(c[1].params["realm"], "say \"hi\"");
    }

    #[test]
    fn parses_unquoted_values_and_odd_spacing() {
        let c = parse_www_authenticate("basic realm=registry ,  charset = UTF-8");
        assert_eq!(c[0].scheme, Scheme::Basic);
        assert_eq!(c[0].params["realm"], "registry");
        assert_eq!(c[0].params["charset"], "UTF-8");
        assert!(parse_www_authenticate("").is_empty());
        assert!(parse_www_authenticate("=garbage").is_empty());
        let c = parse_www_authenticate(r#"Bearer realm="unterminated"#);
        assert_eq!(c[0].params["realm"], "unterminated");
        assert_eq!(
            parse_www_authenticate("Negotiate abc")[0].scheme,
            Scheme::Other("Negotiate".into())
        );
    }

    #[test]
    fn credentials_parse_and_never_print_password() {
        let c = Credentials::parse("user:pa:ss").unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user", "pa:ss")
        );
        assert!(!format!("{c:?}").contains("pa:ss"));
        assert!(Credentials::parse("nopassword").is_err());
        assert!(Credentials::parse(":x").is_err());
    }

    #[test]
    fn docker_config_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let enc = |s: &str| BASE64.encode(s);
        std::fs::write(
            &path,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{}"}},"127.0.0.1:5000":{{"auth":"{}"}},"http://other.example:1234/v2/":{{"username":"u","password":"p"}},"broken.example":{{"auth":"%%%"}}}}}}"#,
                enc("hub:hubpw"),
                enc("local:localpw")
            ),
        )
        .unwrap();
        let get = |r: &str| docker_config_credentials(&path, r);
        assert_eq!(get("docker.io").unwrap().unwrap().username, "hub");
        assert_eq!(get("127.0.0.1:5000").unwrap().unwrap().password, "localpw");
        assert_eq!(get("other.example:1234").unwrap().unwrap().username, "u");
        assert_eq!(get("nothere:1").unwrap(), None);
        let err = get("broken.example").unwrap_err().to_string();
        assert!(
            err.contains("base64") && err.contains("config.json"),
            "{err}"
        );
        assert_eq!(
            docker_config_credentials(&dir.path().join("missing.json"), "x").unwrap(),
            None
        );
        std::fs::write(&path, "{not json").unwrap();
        assert!(get("docker.io").is_err());
    }
}
