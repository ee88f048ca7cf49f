//! The optional config file: settings an operator wants on every command without typing them.
//!
//! TOML, read from `--config FILE`, `$LAZYLAYER_CONFIG`, or `/etc/lazylayer/config.toml` when
//! that exists. Command-line flags win over the file, the file over built-in defaults. Unknown
//! keys are errors, so a typo is reported instead of silently ignored.
//!
//! ```toml
//! [fetch]
//! # max_attempts = 5     # attempts per remote read; unset: retry until read_timeout
//! read_timeout = 60      # seconds a read may go without a byte, retries included
//! stall_timeout = 30     # seconds without a byte before one attempt is abandoned
//! connect_timeout = 10   # seconds to connect
//! initial_backoff = 0.2  # first wait between attempts, seconds
//! max_backoff = 5        # longest wait between attempts, seconds
//! # hosts_dir = "/etc/containerd/certs.d"  # containerd's hosts.toml per registry; must exist if set
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the file is looked for when neither `--config` nor `$LAZYLAYER_CONFIG` names one.
pub const DEFAULT_PATH: &str = "/etc/lazylayer/config.toml";

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub fetch: FetchSection,
}

/// `[fetch]`: how remote reads are made and retried. Every field is optional; see
/// [`crate::source::retry::RetryPolicy`] and [`crate::source::config::FetchConfig`] for the defaults.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FetchSection {
    pub max_attempts: Option<u32>,
    pub read_timeout: Option<f64>,
    pub stall_timeout: Option<f64>,
    pub connect_timeout: Option<f64>,
    pub initial_backoff: Option<f64>,
    pub max_backoff: Option<f64>,
    pub hosts_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
}

impl ConfigFile {
    /// Loads the file named by `explicit`, or the default one if it exists (a missing default
    /// file is no error; a missing named one is).
    pub fn load(explicit: Option<&Path>) -> Result<ConfigFile, ConfigError> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None => {
                let default = PathBuf::from(DEFAULT_PATH);
                if !default.exists() {
                    return Ok(ConfigFile::default());
                }
                default
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        ConfigFile::parse(&text).map_err(|reason| ConfigError::Parse { path, reason })
    }

    pub fn parse(text: &str) -> Result<ConfigFile, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_unknown_keys() {
        let c = ConfigFile::parse("[fetch]\nmax_attempts = 3\nread_timeout = 2.5\n").unwrap();
        assert_eq!(c.fetch.max_attempts, Some(3));
        assert_eq!(c.fetch.read_timeout, Some(2.5));
        assert_eq!(c.fetch.stall_timeout, None);
        assert_eq!(ConfigFile::parse("").unwrap(), ConfigFile::default());
        let typo = ConfigFile::parse("[fetch]\nmax_atempts = 3\n").unwrap_err();
        assert!(typo.contains("max_atempts"), "{typo}");
        assert!(ConfigFile::parse("[fetch]\nmax_attempts = \"x\"\n").is_err());
    }
}
