//! Which hosts serve a registry, and how to reach them: containerd's registry host configuration
//! (`hosts.toml` under `/etc/containerd/certs.d`), read with containerd's rules, so that a node's
//! mirrors, private CA and client certificates apply to lazy reads as they apply to containerd's
//! own pulls.
//!
//! For registry `HOST:PORT` the first existing directory of `DIR/HOST_PORT_`, `DIR/HOST:PORT` and
//! `DIR/_default` is used. Its `hosts.toml` lists `[host."URL"]` entries, tried in the order the
//! file gives them, and `server` (the registry itself), tried last. Each has `capabilities`
//! (`pull`, `resolve`, `push`; all three when absent), `ca` (a path or a list), `client` (a
//! certificate path, a list of them, or a list of `[cert, key]` pairs; without a key, the key is
//! in the certificate file), `skip_verify`, `override_path` (the URL's path is the API root as
//! written, instead of `PATH/v2`) and `header` (values a string or a list). The top-level keys
//! belong to `server`. Relative paths are relative to the directory. Without `server`, the
//! registry is `https://HOST` (docker.io: `registry-1.docker.io`; a loopback host or
//! `--plain-http`: `http://`). A directory without `hosts.toml` gives its `*.crt` files as CAs and
//! its `*.cert`/`*.key` pairs as client certificates to the registry, as Docker's certs.d does.
//!
//! One difference from containerd, on purpose: a `hosts.toml` that does not parse, or names a
//! capability or a value of a type containerd does not know, is an error naming the file.
//! containerd logs it and goes on as if the file were not there, which silently bypasses the
//! mirror or the CA the administrator configured. Keys containerd does not read are ignored, as
//! containerd ignores them, so that files written for newer containerd versions still load.
//!
//! The directory is read whenever a registry client is made (each mount, pull, or image the
//! snapshotter prepares), so that, as in containerd, an edit applies without a restart. Reading
//! it costs a few `stat`s and one small file.

use std::path::{Path, PathBuf};

use url::Url;

use super::RegistryError;
use crate::model::reference::RegistryRef;

/// What a host may be used for (containerd's host capabilities).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetching content by digest: blobs, and manifests by digest.
    pub pull: bool,
    /// Turning a tag into a digest, and the referrers of a manifest.
    pub resolve: bool,
    pub push: bool,
}

impl Capabilities {
    const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// One host serving a registry: a mirror, or the registry itself.
#[derive(Clone, Debug, PartialEq)]
pub struct RegistryHost {
    /// The API root, ending in `/`: `https://mirror.example:5000/v2/`.
    pub api: Url,
    pub capabilities: Capabilities,
    /// PEM files of CAs trusted for this host on top of the system's.
    pub ca: Vec<PathBuf>,
    /// Client certificates, each with its key file (`None`: the key is in the certificate file).
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Accept any certificate. Absent means no.
    pub skip_verify: bool,
    /// Headers sent with every request to this host.
    pub headers: reqwest::header::HeaderMap,
    /// Whether this is the registry itself (`server`) rather than a mirror.
    pub is_server: bool,
    /// The file that configured it, for messages; `None` for the built-in default.
    pub configured_in: Option<PathBuf>,
}

impl RegistryHost {
    /// The name credentials are looked up by and messages use: the registry's own name
    /// (`docker.io`) for the server, `HOST[:PORT]` of its URL for a mirror.
    pub fn name(&self, registry: &str) -> String {
        if self.is_server {
            return registry.to_string();
        }
        let host = self.api.host_str().unwrap_or_default();
        match self.api.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        }
    }
}

/// The hosts to try for `reference`'s registry, mirrors first and the registry itself last, from
/// `hosts_dir` (containerd's `--hosts-dir`; `None` or a missing directory: the registry alone).
pub fn registry_hosts(
    hosts_dir: Option<&Path>,
    reference: &RegistryRef,
    plain_http: bool,
) -> Result<Vec<RegistryHost>, RegistryError> {
    let dir = hosts_dir.and_then(|root| host_directory(root, &reference.registry));
    let mut hosts = match &dir {
        Some(dir) => load_dir(dir)?,
        None => vec![HostEntry::default()],
    };
    let server = hosts.pop().expect("a hosts list ends with the server");
    let mut out = Vec::with_capacity(hosts.len() + 1);
    for entry in hosts {
        let url = entry.url.clone().expect("mirrors are named by their URL");
        out.push(entry.into_host(url, false, dir.as_deref())?);
    }
    let server_url = match &server.url {
        Some(url) => url.clone(),
        None => {
            let scheme = if plain_http || reference.is_loopback() {
                "http"
            } else {
                "https"
            };
            format!("{scheme}://{}", reference.api_host())
        }
    };
    out.push(server.into_host(server_url, true, dir.as_deref())?);
    Ok(out)
}

/// The directory configuring `registry`, if any: containerd's `HOST_PORT_` spelling first, then
/// `HOST:PORT`, then `_default`.
fn host_directory(root: &Path, registry: &str) -> Option<PathBuf> {
    let mut candidates = Vec::with_capacity(3);
    if let Some((host, port)) = registry.rsplit_once(':') {
        candidates.push(root.join(format!("{host}_{port}_")));
    }
    candidates.push(root.join(registry));
    candidates.push(root.join("_default"));
    candidates.into_iter().find(|p| p.is_dir())
}

/// One `[host."URL"]` table, or the top level (the server), before its paths are resolved.
#[derive(Default)]
struct HostEntry {
    /// `None`: the server, with its default URL.
    url: Option<String>,
    capabilities: Option<Capabilities>,
    ca: Vec<PathBuf>,
    client: Vec<(PathBuf, Option<PathBuf>)>,
    skip_verify: bool,
    override_path: bool,
    headers: reqwest::header::HeaderMap,
}

impl HostEntry {
    fn into_host(
        self,
        url: String,
        is_server: bool,
        dir: Option<&Path>,
    ) -> Result<RegistryHost, RegistryError> {
        let file = dir.map(|d| d.join("hosts.toml"));
        let bad = |reason: String| RegistryError::HostsConfig {
            path: file.clone().unwrap_or_default(),
            reason,
        };
        let url = if url.starts_with("http://") || url.starts_with("https://") {
            url
        } else {
            format!("https://{url}")
        };
        let mut api =
            Url::parse(&url).map_err(|e| bad(format!("host `{url}` is not a URL: {e}")))?;
        if api.host_str().is_none_or(str::is_empty) {
            return Err(bad(format!("host `{url}` names no host")));
        }
        let path = api.path().trim_end_matches('/').to_string();
        let path = if self.override_path || path.ends_with("/v2") {
            path
        } else {
            format!("{path}/v2")
        };
        api.set_path(&format!("{path}/"));
        api.set_query(None);
        api.set_fragment(None);
        let within = |p: PathBuf| match dir {
            Some(d) if p.is_relative() => d.join(p),
            _ => p,
        };
        Ok(RegistryHost {
            api,
            capabilities: self.capabilities.unwrap_or(Capabilities::ALL),
            ca: self.ca.into_iter().map(within).collect(),
            client: self
                .client
                .into_iter()
                .map(|(c, k)| (within(c), k.map(within)))
                .collect(),
            skip_verify: self.skip_verify,
            headers: self.headers,
            is_server,
            configured_in: file,
        })
    }
}

/// The entries a host directory gives, the server's last.
fn load_dir(dir: &Path) -> Result<Vec<HostEntry>, RegistryError> {
    let file = dir.join("hosts.toml");
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(RegistryError::HostsConfig {
                path: file,
                reason: e.to_string(),
            });
        }
    };
    if text.trim().is_empty() {
        return cert_files(dir);
    }
    parse_hosts_toml(&text).map_err(|reason| RegistryError::HostsConfig { path: file, reason })
}

/// Docker's certs.d layout: `*.crt` CAs and `*.cert` client certificates with their `*.key`.
fn cert_files(dir: &Path) -> Result<Vec<HostEntry>, RegistryError> {
    let unreadable = |e: std::io::Error| RegistryError::HostsConfig {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(unreadable)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| !t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    let mut server = HostEntry::default();
    for name in names {
        if name.ends_with(".crt") {
            server.ca.push(dir.join(&name));
        } else if let Some(stem) = name.strip_suffix(".cert") {
            let key = dir.join(format!("{stem}.key"));
            server
                .client
                .push((dir.join(&name), key.exists().then_some(key)));
        }
    }
    Ok(vec![server])
}

/// Parses a `hosts.toml`; the error says which key is wrong and why.
fn parse_hosts_toml(text: &str) -> Result<Vec<HostEntry>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        // toml's message spans several lines with a caret diagram; the first says what.
        e.to_string().lines().next().unwrap_or_default().to_string()
    })?;
    let mut entries = Vec::new();
    if let Some(hosts) = table.get("host") {
        let hosts = hosts
            .as_table()
            .ok_or("`host` must be a table of [host.\"URL\"] sections")?;
        // The table keeps the file's order (toml's preserve_order): mirrors are tried in it.
        for (url, value) in hosts {
            let keys = value
                .as_table()
                .ok_or_else(|| format!("[host.\"{url}\"] must be a table"))?;
            let mut entry = parse_entry(keys).map_err(|e| format!("in [host.\"{url}\"]: {e}"))?;
            entry.url = Some(url.clone());
            entries.push(entry);
        }
    }
    let mut server = parse_entry(&table)?;
    server.url = match table.get("server") {
        None => None,
        Some(toml::Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => {
            return Err(format!(
                "`server` must be a URL string, not {}",
                other.type_str()
            ));
        }
    };
    entries.push(server);
    Ok(entries)
}

fn parse_entry(keys: &toml::Table) -> Result<HostEntry, String> {
    let mut entry = HostEntry::default();
    if let Some(v) = keys.get("capabilities") {
        let mut caps = Capabilities {
            pull: false,
            resolve: false,
            push: false,
        };
        for c in strings(v, "capabilities")? {
            match c.to_ascii_lowercase().as_str() {
                "pull" => caps.pull = true,
                "resolve" => caps.resolve = true,
                "push" => caps.push = true,
                _ => {
                    return Err(format!(
                        "unknown capability `{c}` (known: pull, resolve, push)"
                    ));
                }
            }
        }
        // containerd treats an empty list as absent: every capability.
        if caps
            != (Capabilities {
                pull: false,
                resolve: false,
                push: false,
            })
        {
            entry.capabilities = Some(caps);
        }
    }
    if let Some(v) = keys.get("ca") {
        entry.ca = strings(v, "ca")?.into_iter().map(PathBuf::from).collect();
    }
    if let Some(v) = keys.get("client") {
        let items = match v {
            toml::Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        };
        for item in items {
            match item {
                toml::Value::String(cert) => entry.client.push((cert.into(), None)),
                toml::Value::Array(pair) => match pair.as_slice() {
                    [toml::Value::String(cert), toml::Value::String(key)] => {
                        entry.client.push((cert.into(), Some(key.into())))
                    }
                    _ => return Err("`client` pairs must be [\"CERT\", \"KEY\"]".to_string()),
                },
                other => {
                    return Err(format!(
                        "`client` must be a path, a list of paths or of [\"CERT\", \"KEY\"] pairs, not {}",
                        other.type_str()
                    ));
                }
            }
        }
    }
    for (key, field) in [
        ("skip_verify", &mut entry.skip_verify),
        ("override_path", &mut entry.override_path),
    ] {
        if let Some(v) = keys.get(key) {
            *field = v
                .as_bool()
                .ok_or_else(|| format!("`{key}` must be true or false, not {}", v.type_str()))?;
        }
    }
    if let Some(v) = keys.get("header") {
        let header = v.as_table().ok_or("`header` must be a table")?;
        for (name, values) in header {
            let key = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("`{name}` is not a valid header name"))?;
            for value in strings(values, &format!("header.{name}"))? {
                let value = reqwest::header::HeaderValue::from_str(&value)
                    .map_err(|_| format!("header `{name}` has a value that is not valid"))?;
                entry.headers.append(key.clone(), value);
            }
        }
    }
    Ok(entry)
}

/// A string or a list of strings.
fn strings(v: &toml::Value, key: &str) -> Result<Vec<String>, String> {
    let wrong = || format!("`{key}` must be a string or a list of strings");
    match v {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string).ok_or_else(wrong))
            .collect(),
        _ => Err(wrong()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(registry: &str) -> RegistryRef {
        match crate::model::reference::ImageRef::parse(&format!("{registry}/app:1")).unwrap() {
            crate::model::reference::ImageRef::Registry(r) => r,
            _ => unreachable!(),
        }
    }

    fn with_file(dir_name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(dir_name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts.toml"), text).unwrap();
        (root, dir)
    }

    #[test]
    fn without_a_directory_the_registry_alone_serves_with_containerds_default_scheme() {
        let hosts = registry_hosts(None, &reference("registry.example"), false).unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].api.as_str(), "https://registry.example/v2/");
        assert!(hosts[0].is_server && hosts[0].capabilities == Capabilities::ALL);
        let hub = registry_hosts(None, &reference("docker.io"), false).unwrap();
        assert_eq!(hub[0].api.as_str(), "https://registry-1.docker.io/v2/");
        let local = registry_hosts(None, &reference("127.0.0.1:5000"), false).unwrap();
        assert_eq!(local[0].api.as_str(), "http://127.0.0.1:5000/v2/");
        let plain = registry_hosts(None, &reference("registry.example"), true).unwrap();
        assert_eq!(plain[0].api.as_str(), "http://registry.example/v2/");
    }

    #[test]
    fn mirrors_come_in_file_order_before_the_server_with_their_settings() {
        let (root, dir) = with_file(
            "registry.example_5000_",
            r#"
server = "https://registry.example:5000"
ca = "/etc/ca.pem"

[host."http://zeta.local:1000"]
  capabilities = ["pull", "resolve"]
  header = { X-Tenant = "a", X-Multi = ["1", "2"] }

[host."https://alpha.local/cache"]
  capabilities = ["pull"]
  ca = ["alpha.pem", "/abs/b.pem"]
  client = [["c.cert", "c.key"], "both.pem"]
  skip_verify = true

[host."https://beta.local/custom/root"]
  override_path = true
"#,
        );
        let hosts = registry_hosts(
            Some(root.path()),
            &reference("registry.example:5000"),
            false,
        )
        .unwrap();
        let apis: Vec<&str> = hosts.iter().map(|h| h.api.as_str()).collect();
        assert_eq!(
            apis,
            [
                "http://zeta.local:1000/v2/",
                "https://alpha.local/cache/v2/",
                "https://beta.local/custom/root/",
                "https://registry.example:5000/v2/",
            ]
        );
        let zeta = &hosts[0];
        assert!(zeta.capabilities.pull && zeta.capabilities.resolve && !zeta.capabilities.push);
        // Header names as HTTP sends them, lower case; repeated values kept in order.
        let headers: Vec<(&str, &str)> = zeta
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            headers,
            [("x-tenant", "a"), ("x-multi", "1"), ("x-multi", "2")]
        );
        let alpha = &hosts[1];
        assert_eq!(
            alpha.ca,
            [dir.join("alpha.pem"), PathBuf::from("/abs/b.pem")]
        );
        assert_eq!(
            alpha.client,
            [
                (dir.join("c.cert"), Some(dir.join("c.key"))),
                (dir.join("both.pem"), None)
            ]
        );
        assert!(alpha.skip_verify && !alpha.capabilities.resolve);
        assert_eq!(hosts[2].capabilities, Capabilities::ALL);
        let server = &hosts[3];
        assert!(server.is_server && !hosts[0].is_server);
        assert_eq!(server.ca, [PathBuf::from("/etc/ca.pem")]);
        assert_eq!(server.configured_in, Some(dir.join("hosts.toml")));
        assert_eq!(zeta.name("registry.example:5000"), "zeta.local:1000");
        assert_eq!(
            server.name("registry.example:5000"),
            "registry.example:5000"
        );
    }

    #[test]
    fn the_directory_is_found_as_containerd_finds_it() {
        let (root, _) = with_file("_default", "[host.\"http://mirror.local\"]\n");
        let hosts = registry_hosts(Some(root.path()), &reference("other.example"), false).unwrap();
        assert_eq!(hosts[0].api.as_str(), "http://mirror.local/v2/");
        // Without `server`, the registry keeps its default URL.
        assert_eq!(hosts[1].api.as_str(), "https://other.example/v2/");
        // HOST:PORT is used when HOST_PORT_ is absent, and wins over _default.
        std::fs::create_dir_all(root.path().join("other.example:8443")).unwrap();
        std::fs::write(
            root.path().join("other.example:8443/hosts.toml"),
            "server = \"other.example:8443\"\n",
        )
        .unwrap();
        let hosts =
            registry_hosts(Some(root.path()), &reference("other.example:8443"), false).unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].api.as_str(), "https://other.example:8443/v2/");
        // A missing root is no configuration.
        let none = registry_hosts(
            Some(&root.path().join("absent")),
            &reference("a.example"),
            false,
        )
        .unwrap();
        assert_eq!(none.len(), 1);
    }

    #[test]
    fn a_directory_without_hosts_toml_gives_its_certificate_files_to_the_registry() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("registry.example");
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "ca.crt",
            "client.cert",
            "client.key",
            "lone.cert",
            "notes.txt",
        ] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        let hosts =
            registry_hosts(Some(root.path()), &reference("registry.example"), false).unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].ca, [dir.join("ca.crt")]);
        assert_eq!(
            hosts[0].client,
            [
                (dir.join("client.cert"), Some(dir.join("client.key"))),
                (dir.join("lone.cert"), None)
            ]
        );
    }

    #[test]
    fn a_broken_hosts_toml_is_an_error_naming_the_file_and_the_key() {
        let cases = [
            ("server = [1\n", "hosts.toml"),
            (
                "[host.\"http://m\"]\ncapabilities = [\"fetch\"]\n",
                "unknown capability `fetch`",
            ),
            ("ca = 3\n", "`ca` must be a string or a list of strings"),
            (
                "[host.\"http://m\"]\nclient = [[\"only-one\"]]\n",
                "[\"CERT\", \"KEY\"]",
            ),
            (
                "skip_verify = \"yes\"\n",
                "`skip_verify` must be true or false",
            ),
            (
                "[host.\"http://m\"]\nheader = { \"bad name\" = \"x\" }\n",
                "not a valid header name",
            ),
            ("server = 5\n", "`server` must be a URL string"),
            ("[host.\"http://\"]\n", "host `http://`"),
        ];
        for (text, needle) in cases {
            let (root, dir) = with_file("registry.example", text);
            let err = registry_hosts(Some(root.path()), &reference("registry.example"), false)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
            assert!(
                err.contains(&dir.join("hosts.toml").display().to_string()),
                "{err}"
            );
        }
    }
}
