//! The OCI runtime spec (`config.json`) of a `lazylayer run`, made from the image config and the
//! command line, as `docker run` would make it.
//!
//! The process: the image's `Entrypoint` followed by the command given (or the image's `Cmd`),
//! its `Env` with `-e` on top, its `WorkingDir` unless `-w`, its `User` unless `-u` (names looked
//! up in the image's own `/etc/passwd` and `/etc/group`, as runc does not). The container: its own
//! pid, ipc, uts and mount namespaces, and a network namespace with loopback only for
//! `--network none`; the host's network otherwise, with its `resolv.conf` and `hosts`. Docker's
//! default capabilities and masked paths, so that what runs in `docker run` runs here. The root
//! is writable (an overlay over the lazy mount); no cgroup limits are set.

use std::path::Path;

use serde::Deserialize;
use serde_json::{Value, json};

/// The parts of an image config's `config` section a run uses.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImageRuntime {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

impl ImageRuntime {
    /// The `config` section of an image config document (absent: all defaults).
    pub fn from_config(config: &[u8]) -> Result<ImageRuntime, String> {
        #[derive(Deserialize)]
        struct Doc {
            #[serde(default)]
            config: Option<ImageRuntime>,
        }
        let doc: Doc = serde_json::from_slice(config).map_err(|e| e.to_string())?;
        Ok(doc.config.unwrap_or_default())
    }
}

/// How the container reaches the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Network {
    /// The host's network (and its resolv.conf and hosts).
    Host,
    /// A network namespace of its own with loopback only.
    None,
}

/// A `-v HOST:CONTAINER[:ro]` bind mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Volume {
    pub host: String,
    pub container: String,
    pub read_only: bool,
}

impl Volume {
    pub fn parse(text: &str) -> Result<Volume, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let (host, container, read_only) = match parts.as_slice() {
            [h, c] => (*h, *c, false),
            [h, c, "ro"] => (*h, *c, true),
            [h, c, "rw"] => (*h, *c, false),
            _ => return Err(format!("`{text}`: expected HOST:CONTAINER[:ro]")),
        };
        if !host.starts_with('/') || !container.starts_with('/') {
            return Err(format!("`{text}`: both paths must be absolute"));
        }
        Ok(Volume {
            host: host.to_string(),
            container: container.to_string(),
            read_only,
        })
    }
}

/// Docker's default capabilities.
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The process's argv: the image's entrypoint, then the given command or else the image's cmd.
pub fn argv(image: &ImageRuntime, command: &[String]) -> Result<Vec<String>, String> {
    let mut argv = image.entrypoint.clone().unwrap_or_default();
    match command.is_empty() {
        true => argv.extend(image.cmd.clone().unwrap_or_default()),
        false => argv.extend(command.iter().cloned()),
    }
    if argv.is_empty() {
        return Err("the image has no Entrypoint or Cmd: give a command after the image".into());
    }
    Ok(argv)
}

/// The environment: the image's, then `-e K=V` (or `-e K`, the host's value) replacing by key.
pub fn environment(image: &ImageRuntime, given: &[String], tty: bool) -> Vec<String> {
    let mut env: Vec<String> = image.env.clone().unwrap_or_default();
    let key = |kv: &str| kv.split('=').next().unwrap_or_default().to_string();
    let mut set = |kv: String| {
        let k = key(&kv);
        env.retain(|e| key(e) != k);
        env.push(kv);
    };
    for item in given {
        match item.contains('=') {
            true => set(item.clone()),
            false => {
                if let Ok(value) = std::env::var(item) {
                    set(format!("{item}={value}"));
                }
            }
        }
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    if tty && !env.iter().any(|e| e.starts_with("TERM=")) {
        env.push("TERM=xterm".into());
    }
    env
}

/// Whether `command` names a file in the image under `rootfs`: a path as it is, a bare name on
/// the `PATH` of `env`. Links are not followed (an absolute target would be read on the host);
/// finding the link is enough.
pub fn command_exists(rootfs: &Path, command: &str, env: &[String]) -> bool {
    let present = |path: &str| {
        rootfs
            .join(path.trim_start_matches('/'))
            .symlink_metadata()
            .is_ok()
    };
    if command.contains('/') {
        return present(command);
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(&DEFAULT_PATH["PATH=".len()..]);
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .any(|dir| present(&format!("{dir}/{command}")))
}

/// Resolves `USER[:GROUP]` (names or numbers) against the image's `/etc/passwd` and
/// `/etc/group` under `rootfs`; an empty user is root.
pub fn user_ids(user: &str, rootfs: &Path) -> Result<(u32, u32), String> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (name, group) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let table = |file: &str| std::fs::read_to_string(rootfs.join(file)).unwrap_or_default();
    // The id (third field) and, for passwd, the primary group (fourth) of the line whose field
    // `by` is `key`.
    let find = |text: &str, by: usize, key: &str| -> Option<(u32, Option<u32>)> {
        text.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.len() >= 4 && fields[by] == key)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok())))
                .flatten()
        })
    };
    let passwd = table("etc/passwd");
    let (uid, primary_gid) = match name.parse::<u32>() {
        Ok(uid) => (uid, find(&passwd, 2, name).and_then(|(_, gid)| gid)),
        Err(_) => find(&passwd, 0, name)
            .ok_or_else(|| format!("user `{name}` is not in the image's /etc/passwd"))?,
    };
    let gid = match group {
        None => primary_gid.unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                find(&table("etc/group"), 0, g)
                    .ok_or_else(|| format!("group `{g}` is not in the image's /etc/group"))?
                    .0
            }
        },
    };
    Ok((uid, gid))
}

/// The runtime spec for a process run as `(uid, gid)` in `args` with `env` and `cwd`, on
/// `rootfs`.
pub struct SpecInput<'a> {
    pub rootfs: &'a Path,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub tty: bool,
    pub hostname: &'a str,
    pub network: Network,
    pub volumes: &'a [Volume],
}

pub fn runtime_spec(input: &SpecInput) -> Value {
    let caps: Vec<&str> = CAPABILITIES.to_vec();
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
               "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
        json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
               "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}),
    ];
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    match input.network {
        Network::None => namespaces.push(json!({"type": "network"})),
        Network::Host => {
            for file in ["/etc/resolv.conf", "/etc/hosts"] {
                if Path::new(file).exists() {
                    mounts.push(json!({"destination": file, "type": "bind", "source": file,
                                       "options": ["rbind", "ro"]}));
                }
            }
        }
    }
    for v in input.volumes {
        let mut options = vec!["rbind"];
        if v.read_only {
            options.push("ro");
        }
        mounts.push(json!({"destination": v.container, "type": "bind",
                           "source": v.host, "options": options}));
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": input.tty,
            "user": {"uid": input.uid, "gid": input.gid},
            "args": input.args,
            "env": input.env,
            "cwd": input.cwd,
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
            },
            "noNewPrivileges": false,
        },
        "root": {"path": input.rootfs, "readonly": false},
        "hostname": input.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> ImageRuntime {
        ImageRuntime::from_config(
            br#"{"config": {"Env": ["PATH=/opt/bin", "A=1"], "Entrypoint": ["/entry"],
                 "Cmd": ["--default"], "WorkingDir": "/app", "User": "app"}}"#,
        )
        .unwrap()
    }

    #[test]
    fn argv_is_entrypoint_then_command_or_cmd() {
        assert_eq!(argv(&image(), &[]).unwrap(), ["/entry", "--default"]);
        assert_eq!(argv(&image(), &["x".into()]).unwrap(), ["/entry", "x"]);
        let bare = ImageRuntime::from_config(b"{}").unwrap();
        assert!(argv(&bare, &[]).unwrap_err().contains("command"));
        assert_eq!(argv(&bare, &["sh".into()]).unwrap(), ["sh"]);
    }

    #[test]
    fn given_environment_replaces_the_images_by_key() {
        let env = environment(&image(), &["A=2".into(), "B=3".into()], true);
        assert_eq!(env, ["PATH=/opt/bin", "A=2", "B=3", "TERM=xterm"]);
        let bare = ImageRuntime::default();
        assert_eq!(environment(&bare, &[], false), [DEFAULT_PATH]);
    }

    #[test]
    fn users_resolve_by_name_and_number() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), "staff:x:50:\n").unwrap();
        assert_eq!(user_ids("", root.path()).unwrap(), (0, 0));
        assert_eq!(user_ids("app", root.path()).unwrap(), (1000, 1001));
        assert_eq!(user_ids("1000", root.path()).unwrap(), (1000, 1001));
        assert_eq!(user_ids("app:staff", root.path()).unwrap(), (1000, 50));
        assert_eq!(user_ids("7:8", root.path()).unwrap(), (7, 8));
        assert!(
            user_ids("nobody", root.path())
                .unwrap_err()
                .contains("passwd")
        );
    }

    #[test]
    fn volumes_parse() {
        assert_eq!(
            Volume::parse("/h:/c:ro").unwrap(),
            Volume {
                host: "/h".into(),
                container: "/c".into(),
                read_only: true
            }
        );
        assert!(Volume::parse("rel:/c").is_err());
        assert!(Volume::parse("/h").is_err());
    }
}
