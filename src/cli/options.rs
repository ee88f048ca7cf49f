//! From flags to library options: each option's value comes from its flag, then the config file
//! (`--config`), then the library's own default, in that order and in this one place.

use std::time::Duration;

use super::args::{ReadArgs, RemoteArgs};
use super::error::CliError;
use super::size::parse_size;
use crate::cache::disk::DiskCache;
use crate::cli::config::{ConfigFile, FetchSection};
use crate::fs::ImageFsOptions;
use crate::model::oci::Platform;
use crate::source::config::Credentials;
use crate::source::config::FetchConfig;
use crate::source::retry::RetryPolicy;

pub(super) fn seconds(name: &'static str, value: f64) -> Result<Duration, CliError> {
    if value.is_finite() && value > 0.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(CliError::Timeout { name, value })
    }
}

impl RemoteArgs {
    /// The registry settings: flags first, then the config file, then built-in defaults.
    pub fn registry_config(&self) -> Result<FetchConfig, CliError> {
        let file = ConfigFile::load(self.config.as_deref())?.fetch;
        self.fetch_config(&file)
    }

    /// These flags over the config file's `[fetch]` section over [`FetchConfig::default`].
    fn fetch_config(&self, file: &FetchSection) -> Result<FetchConfig, CliError> {
        let defaults = FetchConfig::default();
        let secs = |name: &'static str, flag: Option<f64>, file: Option<f64>, default: Duration| {
            flag.or(file).map_or(Ok(default), |v| seconds(name, v))
        };
        let retry = RetryPolicy {
            max_attempts: self
                .max_attempts
                .or(file.max_attempts)
                .or(defaults.retry.max_attempts),
            read_timeout: secs(
                "read-timeout",
                self.read_timeout,
                file.read_timeout,
                defaults.retry.read_timeout,
            )?,
            initial_backoff: secs(
                "initial_backoff",
                None,
                file.initial_backoff,
                defaults.retry.initial_backoff,
            )?,
            max_backoff: secs(
                "max_backoff",
                None,
                file.max_backoff,
                defaults.retry.max_backoff,
            )?,
        };
        if retry.max_attempts == Some(0) {
            return Err(CliError::Attempts);
        }
        let mut config = FetchConfig {
            plain_http: self.plain_http,
            credentials: self
                .user
                .as_deref()
                .map(Credentials::parse)
                .transpose()
                .map_err(CliError::User)?,
            connect_timeout: secs(
                "connect-timeout",
                self.connect_timeout,
                file.connect_timeout,
                defaults.connect_timeout,
            )?,
            stall_timeout: secs(
                "stall-timeout",
                self.stall_timeout,
                file.stall_timeout,
                defaults.stall_timeout,
            )?,
            retry,
            s3: crate::source::config::S3Config {
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
            },
            ..defaults
        };
        if let Some(path) = &self.docker_config {
            // Only the default location may be absent (no `docker login` yet): a file named on
            // the command line that is not there is a typo that would turn into "unauthorized".
            if !path.exists() {
                return Err(CliError::DockerConfig {
                    path: path.display().to_string(),
                });
            }
            config.docker_config = Some(path.clone());
        }
        // As for the docker config: the default may be absent (no mirrors), a named one not.
        if let Some(dir) = self.hosts_dir.as_ref().or(file.hosts_dir.as_ref()) {
            if !dir.is_dir() {
                return Err(CliError::HostsDir {
                    path: dir.display().to_string(),
                });
            }
            config.hosts_dir = Some(dir.clone());
        }
        Ok(config)
    }

    pub fn platform(&self) -> Result<Platform, CliError> {
        Platform::parse(&self.platform).map_err(CliError::Platform)
    }
}

impl ReadArgs {
    /// The disk cache these flags ask for (`None` for `--cache-dir none`).
    pub fn disk_cache(&self) -> Result<Option<std::sync::Arc<DiskCache>>, CliError> {
        if self.cache_dir.as_os_str() == "none" {
            return Ok(None);
        }
        let budget = size_flag("cache-size", &self.cache_size)?;
        Ok(Some(std::sync::Arc::new(open_cache(
            &self.cache_dir,
            budget,
        )?)))
    }

    /// Options for opening an image with these flags, the given disk tier and retry policy.
    pub fn image_fs_options(
        &self,
        disk: Option<std::sync::Arc<DiskCache>>,
        retry: RetryPolicy,
    ) -> Result<ImageFsOptions, CliError> {
        let cap = self
            .background_bandwidth
            .as_deref()
            .map(|v| size_flag("background-bandwidth", v))
            .transpose()?;
        Ok(ImageFsOptions {
            cache_bytes: size_flag("memory-cache-size", &self.memory_cache_size)?,
            disk,
            request_slots: self.max_requests.max(1),
            // A cap of 0 turned the fill off before there was a separate flag for it.
            background_fill: !self.no_background_fetch && cap != Some(0),
            background_bytes_per_second: cap,
            profile_window: (self.profile_window > 0.0)
                .then(|| seconds("profile-window", self.profile_window))
                .transpose()?,
            retry,
            amplify_bytes: size_flag("amplify-io", &self.amplify_io)?,
            sibling_bytes: size_flag("prefetch-siblings", &self.prefetch_siblings)?,
        })
    }
}

/// A size option's value, or an error naming the option.
pub(super) fn size_flag(flag: &str, value: &str) -> Result<u64, CliError> {
    parse_size(value).map_err(|e| CliError::Size(format!("--{flag}: {e}")))
}

/// Opens the disk cache at `dir` (creating it), or an error naming the directory.
pub(super) fn open_cache(dir: &std::path::Path, budget: u64) -> Result<DiskCache, CliError> {
    DiskCache::open(dir, budget).map_err(cache_dir_error(dir))
}

pub(super) fn cache_dir_error(dir: &std::path::Path) -> impl Fn(std::io::Error) -> CliError + '_ {
    move |source| CliError::CacheDir {
        dir: dir.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::cli::args::{Cli, Command};

    fn cat_args(flags: &[&str]) -> RemoteArgs {
        let argv = ["lazylayer", "cat"]
            .iter()
            .chain(flags)
            .chain(&["img", "/f"]);
        match Cli::parse_from(argv).command {
            Command::Cat(args) => args.remote,
            _ => unreachable!("parsed as cat"),
        }
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file = ConfigFile::parse("[fetch]\nmax_attempts = 3\nstall_timeout = 7\n").unwrap();
        let from_file = cat_args(&[]).fetch_config(&file.fetch).unwrap();
        assert_eq!(from_file.retry.max_attempts, Some(3));
        assert_eq!(from_file.stall_timeout, Duration::from_secs(7));
        let defaults = FetchConfig::default();
        assert_eq!(from_file.connect_timeout, defaults.connect_timeout);
        assert_eq!(from_file.retry.read_timeout, defaults.retry.read_timeout);
        let flagged = cat_args(&["--max-attempts", "9"])
            .fetch_config(&file.fetch)
            .unwrap();
        assert_eq!(flagged.retry.max_attempts, Some(9));
        assert_eq!(flagged.stall_timeout, Duration::from_secs(7));
        assert!(matches!(
            cat_args(&["--max-attempts", "0"]).fetch_config(&FetchSection::default()),
            Err(CliError::Attempts)
        ));
    }

    /// A `--docker-config` that names no file is refused (a typo would otherwise read as no
    /// credentials); one that exists is used.
    #[test]
    fn a_docker_config_named_but_missing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("config.jsn");
        let err = cat_args(&["--docker-config", missing.to_str().unwrap()])
            .fetch_config(&FetchSection::default())
            .unwrap_err();
        assert!(matches!(err, CliError::DockerConfig { .. }), "{err}");
        assert!(err.to_string().contains("config.jsn"), "{err}");
        let present = dir.path().join("config.json");
        std::fs::write(&present, "{}").unwrap();
        let config = cat_args(&["--docker-config", present.to_str().unwrap()])
            .fetch_config(&FetchSection::default())
            .unwrap();
        assert_eq!(config.docker_config, Some(present));
    }

    /// The hosts directory: a named one must exist (flag or file, the flag winning); the
    /// default may be absent.
    #[test]
    fn a_hosts_dir_named_but_missing_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("certs.dd");
        let err = cat_args(&["--hosts-dir", missing.to_str().unwrap()])
            .fetch_config(&FetchSection::default())
            .unwrap_err();
        assert!(err.to_string().contains("certs.dd"), "{err}");
        let file = FetchSection {
            hosts_dir: Some(missing.clone()),
            ..FetchSection::default()
        };
        assert!(cat_args(&[]).fetch_config(&file).is_err());
        let flagged = cat_args(&["--hosts-dir", dir.path().to_str().unwrap()])
            .fetch_config(&file)
            .unwrap();
        assert_eq!(flagged.hosts_dir.as_deref(), Some(dir.path()));
        let default = cat_args(&[])
            .fetch_config(&FetchSection::default())
            .unwrap();
        assert_eq!(default.hosts_dir, FetchConfig::default().hosts_dir);
    }

    /// The config file examples we publish say they show the defaults; they must stay true.
    #[test]
    fn published_config_examples_state_the_defaults() {
        let readme = include_str!("../../README.md");
        let readme = readme
            .split("```toml\n")
            .find(|block| block.starts_with("[fetch]"))
            .and_then(|block| block.split("```").next())
            .expect("README has a [fetch] example");
        let module_doc: String = include_str!("config.rs")
            .lines()
            .filter_map(|l| l.strip_prefix("//! "))
            .skip_while(|l| *l != "[fetch]")
            .take_while(|l| !l.starts_with("```"))
            .map(|l| format!("{l}\n"))
            .collect();
        let kubernetes: String = include_str!("../../deploy/kubernetes/lazylayer-snapshotter.yaml")
            .lines()
            .skip_while(|l| !l.ends_with("config.toml: |"))
            .skip(1)
            .take_while(|l| l.starts_with("    "))
            .map(|l| format!("{}\n", l.trim()))
            .collect();
        let defaults = FetchConfig::default();
        for (name, text) in [
            ("README.md", readme),
            ("cli/config.rs", &module_doc),
            ("kubernetes", &kubernetes),
        ] {
            let file = ConfigFile::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(file.fetch.read_timeout.is_some(), "{name}: example found");
            let merged = cat_args(&[]).fetch_config(&file.fetch).unwrap();
            assert_eq!(merged.retry, defaults.retry, "{name}");
            assert_eq!(merged.connect_timeout, defaults.connect_timeout, "{name}");
            assert_eq!(merged.stall_timeout, defaults.stall_timeout, "{name}");
        }
    }

    /// The remote flags are optional (so the config file can fill them); their help states the
    /// default by hand, and that text must match the library's.
    #[test]
    fn help_states_the_fetch_defaults() {
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("cat")
            .expect("cat")
            .render_long_help()
            .to_string();
        let d = FetchConfig::default();
        for (flag, value) in [
            ("--connect-timeout", d.connect_timeout.as_secs().to_string()),
            ("--stall-timeout", d.stall_timeout.as_secs().to_string()),
            (
                "--max-attempts",
                d.retry
                    .max_attempts
                    .map_or("none".to_string(), |n| n.to_string()),
            ),
            ("--read-timeout", d.retry.read_timeout.as_secs().to_string()),
            (
                "--hosts-dir",
                d.hosts_dir.expect("a default").display().to_string(),
            ),
        ] {
            let text = help
                .split(&format!("{flag} <"))
                .nth(1)
                .and_then(|rest| rest.split("\n  -").next())
                .unwrap_or_else(|| panic!("{flag} in help"));
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(
                text.contains(&format!("[default: {value}]")),
                "{flag}: {text}"
            );
        }
    }

    #[test]
    fn read_flags_default_to_the_library_defaults() {
        let Command::Mount(mount) = Cli::parse_from(["lazylayer", "mount", "img", "/mnt"]).command
        else {
            unreachable!("parsed as mount")
        };
        let options = mount
            .read
            .image_fs_options(None, RetryPolicy::default())
            .unwrap();
        let library = ImageFsOptions::default();
        assert_eq!(options.cache_bytes, library.cache_bytes);
        assert_eq!(options.request_slots, library.request_slots);
        assert_eq!(options.amplify_bytes, library.amplify_bytes);
        assert_eq!(options.sibling_bytes, library.sibling_bytes);
        // The CLI fills in the background (it has a disk cache); the library only when asked.
        assert!(options.background_fill && options.background_bytes_per_second.is_none());
        assert_eq!(
            options.profile_window,
            Some(crate::fs::profile::DEFAULT_WINDOW)
        );
    }
}
