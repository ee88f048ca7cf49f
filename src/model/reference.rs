//! Image references as users type them, normalised the way Docker and containerd do.
//!
//! `python:3.12` means `docker.io/library/python:3.12`; `host:5000/ns/img@sha256:...` names a
//! manifest by digest on another registry; a reference with neither tag nor digest means tag
//! `latest`. The rules follow `distribution/reference` (the Go package Docker, containerd and
//! skopeo share), so a reference that works with `docker pull` works here and means the same image:
//! the first path component is a registry host only if it contains `.` or `:`, is `localhost`,
//! or has upper-case letters; otherwise the registry is Docker Hub, where one-component names live
//! under `library/`.
//!
//! `oci:PATH[:TAG]` (or `oci:PATH@DIGEST`) names an image in a local OCI image layout directory,
//! as skopeo spells it. Without a tag, a layout holding exactly one image means that image.

use std::fmt;
use std::path::PathBuf;

use crate::model::digest::{Digest, DigestError};

/// Docker Hub's canonical name, used in references and as the credentials key.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves Docker Hub's registry API.
const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// Longest repository name `distribution/reference` accepts (host included).
const MAX_NAME_LEN: usize = 255;
/// Longest tag the distribution spec accepts.
const MAX_TAG_LEN: usize = 128;

/// What the user asked for: an image in a registry or in a local OCI layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    Registry(RegistryRef),
    Layout(LayoutRef),
    S3(S3Ref),
}

/// An OCI image layout stored under a prefix of an S3 bucket: `s3://BUCKET/PREFIX[:TAG][@DIGEST]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Ref {
    pub bucket: String,
    /// Key prefix of the layout (`images/app`), without leading or trailing `/`; may be empty.
    pub prefix: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

/// An image in a registry, fully normalised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryRef {
    /// Registry host with optional port, as in the reference (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path inside the registry (`library/python`).
    pub repository: String,
    /// Tag; `None` only when a digest is given.
    pub tag: Option<String>,
    /// Manifest digest; when present it wins over the tag, as in Docker.
    pub digest: Option<Digest>,
}

/// An image in a local OCI image layout directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayoutRef {
    pub path: PathBuf,
    /// `org.opencontainers.image.ref.name` of the wanted entry in `index.json`.
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

/// What the registry or layout is asked for: a tag, or a manifest digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestSelector {
    Tag(String),
    Digest(Digest),
}

/// As it appears in a registry URL and in messages: the tag, or the digest.
impl fmt::Display for ManifestSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestSelector::Tag(t) => f.write_str(t),
            ManifestSelector::Digest(d) => d.fmt(f),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("empty image reference")]
    Empty,
    #[error(
        "invalid image reference `{reference}`: {reason} (expected [HOST[:PORT]/]NAME[:TAG][@sha256:DIGEST], oci:PATH[:TAG] or s3://BUCKET/PREFIX[:TAG])"
    )]
    Invalid { reference: String, reason: String },
    #[error("invalid digest in image reference `{reference}`: {source}")]
    Digest {
        reference: String,
        source: DigestError,
    },
}

impl ImageRef {
    /// Parses a reference as typed on the command line.
    pub fn parse(s: &str) -> Result<ImageRef, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            return LayoutRef::parse(s, rest).map(ImageRef::Layout);
        }
        if let Some(rest) = s.strip_prefix("s3://") {
            return S3Ref::parse(s, rest).map(ImageRef::S3);
        }
        RegistryRef::parse(s).map(ImageRef::Registry)
    }

    /// The same image pinned to one manifest, as `NAME@DIGEST` pins it: what a tag resolved to
    /// once, so that another process opens that very manifest without asking for the tag again.
    pub fn pinned(mut self, manifest: Digest) -> ImageRef {
        match &mut self {
            ImageRef::Registry(r) => r.digest = Some(manifest),
            ImageRef::Layout(l) => l.digest = Some(manifest),
            ImageRef::S3(r) => r.digest = Some(manifest),
        }
        self
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageRef::Registry(r) => r.fmt(f),
            ImageRef::Layout(l) => l.fmt(f),
            ImageRef::S3(r) => r.fmt(f),
        }
    }
}

fn invalid(reference: &str, reason: impl Into<String>) -> ReferenceError {
    ReferenceError::Invalid {
        reference: reference.to_string(),
        reason: reason.into(),
    }
}

/// Splits `NAME[:TAG][@DIGEST]`: the digest after `@`, the tag after the last `:` that is not
/// followed by a `/` (so `host:5000/name` has a port, not a tag).
fn split_tag_and_digest(
    reference: &str,
    s: &str,
) -> Result<(String, Option<String>, Option<Digest>), ReferenceError> {
    let (rest, digest) = match s.split_once('@') {
        Some((rest, d)) => {
            let digest = d.parse().map_err(|source| ReferenceError::Digest {
                reference: reference.to_string(),
                source,
            })?;
            (rest, Some(digest))
        }
        None => (s, None),
    };
    let (name, tag) = match rest.rfind(':') {
        Some(i) if !rest[i + 1..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
        _ => (rest, None),
    };
    if let Some(tag) = tag {
        validate_tag(reference, tag)?;
    }
    Ok((name.to_string(), tag.map(str::to_string), digest))
}

fn validate_tag(reference: &str, tag: &str) -> Result<(), ReferenceError> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    let ok = tag.len() <= MAX_TAG_LEN
        && chars.next().is_some_and(word)
        && chars.all(|c| word(c) || c == '.' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            reference,
            format!("tag `{tag}` must be 1-128 of [A-Za-z0-9_.-], not starting with `.` or `-`"),
        ))
    }
}

/// One path component: `[a-z0-9]+` runs joined by a single `.`, `_`, `__` or any run of `-`.
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let allowed = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !allowed {
            return false;
        }
    }
    true
}

/// A registry host: DNS labels (letters, digits, inner `-`) joined by `.`, or a bracketed IPv6
/// address, with an optional numeric port.
fn valid_host(h: &str) -> bool {
    let (host, port) = if let Some(rest) = h.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, tail)) => {
                if ip.parse::<std::net::Ipv6Addr>().is_err() {
                    return false;
                }
                match tail {
                    "" => return true,
                    t => ("ipv6", t.strip_prefix(':').unwrap_or("x")),
                }
            }
            None => return false,
        }
    } else {
        match h.rsplit_once(':') {
            Some((host, port)) => (host, port),
            None => (h, "0"),
        }
    };
    let port_ok = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
    let label_ok = |l: &str| {
        !l.is_empty()
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    port_ok && host.split('.').all(label_ok)
}

impl RegistryRef {
    fn parse(reference: &str) -> Result<RegistryRef, ReferenceError> {
        let (name, tag, digest) = split_tag_and_digest(reference, reference)?;
        if name.is_empty() {
            return Err(invalid(reference, "missing repository name"));
        }
        let (registry, mut repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.clone()),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        if !valid_host(&registry) {
            return Err(invalid(
                reference,
                format!("`{registry}` is not a valid registry host"),
            ));
        }
        if registry == DOCKER_HUB && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        if repository.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(invalid(
                reference,
                format!("repository name `{repository}` must be lower-case"),
            ));
        }
        if let Some(bad) = repository.split('/').find(|c| !valid_path_component(c)) {
            return Err(invalid(
                reference,
                format!(
                    "path component `{bad}` must be lower-case letters and digits separated by `.`, `_`, `__` or `-`"
                ),
            ));
        }
        if registry.len() + 1 + repository.len() > MAX_NAME_LEN {
            return Err(invalid(
                reference,
                format!("name is longer than {MAX_NAME_LEN} characters"),
            ));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        Ok(RegistryRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// What to ask the registry for: the digest when there is one (it pins the content), else
    /// the tag.
    pub fn selector(&self) -> ManifestSelector {
        match (&self.digest, &self.tag) {
            (Some(d), _) => ManifestSelector::Digest(d.clone()),
            (None, Some(t)) => ManifestSelector::Tag(t.clone()),
            (None, None) => ManifestSelector::Tag("latest".to_string()),
        }
    }

    /// Host (and port) that serves the registry API for this reference.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// Whether containerd and Docker would talk plain HTTP to this host without being asked:
    /// only loopback registries.
    pub fn is_loopback(&self) -> bool {
        let host = match self.registry.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => &self.registry,
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

impl fmt::Display for RegistryRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl LayoutRef {
    fn parse(reference: &str, rest: &str) -> Result<LayoutRef, ReferenceError> {
        if rest.is_empty() {
            return Err(invalid(reference, "missing layout path after `oci:`"));
        }
        let (path, tag, digest) = split_tag_digest(reference, rest)?;
        Ok(LayoutRef {
            path: PathBuf::from(path),
            tag,
            digest,
        })
    }
}

/// Splits `[:TAG][@DIGEST]` off the end of a layout location (a `:` followed by something with a
/// `/` belongs to the location).
fn split_tag_digest<'a>(
    reference: &str,
    rest: &'a str,
) -> Result<(&'a str, Option<String>, Option<Digest>), ReferenceError> {
    let (location, digest) = match rest.split_once('@') {
        Some((p, d)) => {
            let digest = d.parse().map_err(|source| ReferenceError::Digest {
                reference: reference.to_string(),
                source,
            })?;
            (p, Some(digest))
        }
        None => (rest, None),
    };
    match location.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') && !p.is_empty() => {
            validate_tag(reference, t)?;
            Ok((p, Some(t.to_string()), digest))
        }
        _ => Ok((location, None, digest)),
    }
}

impl S3Ref {
    fn parse(reference: &str, rest: &str) -> Result<S3Ref, ReferenceError> {
        let (location, tag, digest) = split_tag_digest(reference, rest)?;
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        // S3's bucket naming rules, so a typo is reported here and not as a DNS failure.
        let valid_bucket = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
            && bucket.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !valid_bucket {
            return Err(invalid(
                reference,
                format!(
                    "`{bucket}` is not an S3 bucket name (3-63 lowercase letters, digits, `.` and `-`)"
                ),
            ));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|c| c == ".." || c == ".") {
            return Err(invalid(
                reference,
                "`.` and `..` are not allowed in the prefix",
            ));
        }
        Ok(S3Ref {
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            tag,
            digest,
        })
    }
}

impl fmt::Display for S3Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if !self.prefix.is_empty() {
            write!(f, "/{}", self.prefix)?;
        }
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Display for LayoutRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oci:{}", self.path.display())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn a_pinned_reference_reads_back_as_itself() {
        for s in [
            "127.0.0.1:5000/test/app:esgz",
            "python",
            "oci:/srv/images:python-app",
            "oci:./layout",
            "s3://bucket/images/app:v1",
        ] {
            let pinned = ImageRef::parse(s).unwrap().pinned(D.parse().unwrap());
            let text = pinned.to_string();
            assert!(text.ends_with(&format!("@{D}")), "{text}");
            assert_eq!(ImageRef::parse(&text).unwrap(), pinned, "{s}");
        }
    }

    fn reg(s: &str) -> RegistryRef {
        match ImageRef::parse(s) {
            Ok(ImageRef::Registry(r)) => r,
            other => panic!("{s}: {other:?}"),
        }
    }

    /// Cases from Docker's normalisation (`docker pull NAME` and what it resolves to).
    #[test]
    fn docker_normalisation() {
        let cases = [
            ("python:3.12", "docker.io/library/python:3.12"),
            ("python", "docker.io/library/python:latest"),
            ("library/python", "docker.io/library/python:latest"),
            ("docker.io/python", "docker.io/library/python:latest"),
            ("index.docker.io/python", "docker.io/library/python:latest"),
            ("user/app:v1", "docker.io/user/app:v1"),
            ("localhost/app", "localhost/app:latest"),
            ("localhost:5000/app", "localhost:5000/app:latest"),
            ("127.0.0.1:5000/ns/img:1.0", "127.0.0.1:5000/ns/img:1.0"),
            ("ghcr.io/a/b/c:tag", "ghcr.io/a/b/c:tag"),
            ("Registry/app", "Registry/app:latest"),
            ("[::1]:5000/app", "[::1]:5000/app:latest"),
            // `localhost:5000` alone is an image named localhost with tag 5000, as in Docker.
            ("localhost:5000", "docker.io/library/localhost:5000"),
            (
                "a__b/c-d.e--f_g:T_a.g-1",
                "docker.io/a__b/c-d.e--f_g:T_a.g-1",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(reg(input).to_string(), want, "input {input}");
        }
    }

    #[test]
    fn digest_references() {
        let r = reg(&format!("host:5000/ns/img@{D}"));
        assert_eq!(r.registry, "host:5000");
        assert_eq!(r.repository, "ns/img");
        assert_eq!(r.tag, None);
        assert_eq!(r.selector(), ManifestSelector::Digest(D.parse().unwrap()));
        let r = reg(&format!("img:1@{D}"));
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.selector(), ManifestSelector::Digest(D.parse().unwrap()));
        assert_eq!(
            reg("img").selector(),
            ManifestSelector::Tag("latest".into())
        );
    }

    #[test]
    fn invalid_references_are_rejected_with_a_reason() {
        for bad in [
            "UPPER",
            "docker.io/UPPER/x",
            "img:",
            "img:-tag",
            "img:.tag",
            "a//b",
            "a/b/",
            "-a/b",
            "a_-b",
            "a...b",
            "img@sha256:123",
            "img@md5:abc",
            "host:port/x",
            "[::zz]:5000/x",
            "/abs",
            ":tag",
        ] {
            let err = ImageRef::parse(bad).expect_err(bad);
            assert!(!err.to_string().is_empty());
        }
        assert_eq!(ImageRef::parse(""), Err(ReferenceError::Empty));
        let long = format!("h/{}", "a".repeat(300));
        assert!(ImageRef::parse(&long).is_err());
        let long_tag = format!("a:{}", "t".repeat(129));
        assert!(ImageRef::parse(&long_tag).is_err());
    }

    #[test]
    fn docker_hub_api_host_and_loopback() {
        assert_eq!(reg("python").api_host(), "registry-1.docker.io");
        assert_eq!(reg("127.0.0.1:5000/a").api_host(), "127.0.0.1:5000");
        assert!(reg("127.0.0.1:5000/a").is_loopback());
        assert!(reg("localhost/a").is_loopback());
        assert!(reg("[::1]:5000/a").is_loopback());
        assert!(!reg("python").is_loopback());
        assert!(!reg("example.com:5000/a").is_loopback());
    }

    #[test]
    fn s3_references() {
        let r = |s: &str| match ImageRef::parse(s).unwrap() {
            ImageRef::S3(r) => r,
            other => panic!("{other:?}"),
        };
        let a = r("s3://images/team/app:v1");
        assert_eq!(
            (a.bucket.as_str(), a.prefix.as_str()),
            ("images", "team/app")
        );
        assert_eq!(a.tag.as_deref(), Some("v1"));
        assert_eq!(a.to_string(), "s3://images/team/app:v1");
        let b = r(&format!("s3://my.bucket-1@{D}"));
        assert_eq!(b.prefix, "");
        assert_eq!(b.digest.unwrap().to_string(), D);
        assert_eq!(r("s3://bkt/a/b/").prefix, "a/b");
        for bad in [
            "s3://",
            "s3://UPPER/x",
            "s3://ab/x",
            "s3://bkt/../x",
            "s3://-bkt/x",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn layout_references() {
        let ImageRef::Layout(l) = ImageRef::parse("oci:../shared/images:python-app").unwrap()
        else {
            panic!()
        };
        assert_eq!(l.path, PathBuf::from("../shared/images"));
        assert_eq!(l.tag.as_deref(), Some("python-app"));
        let ImageRef::Layout(l) = ImageRef::parse("oci:/tmp/x").unwrap() else {
            panic!()
        };
        assert_eq!((l.path, l.tag), (PathBuf::from("/tmp/x"), None));
        let ImageRef::Layout(l) = ImageRef::parse(&format!("oci:dir@{D}")).unwrap() else {
            panic!()
        };
        assert_eq!(l.digest, Some(D.parse().unwrap()));
        assert!(ImageRef::parse("oci:").is_err());
        assert!(ImageRef::parse("oci:dir:bad tag").is_err());
        assert_eq!(
            ImageRef::parse("oci:dir:v1").unwrap().to_string(),
            "oci:dir:v1"
        );
    }
}
