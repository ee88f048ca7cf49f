//! `lazylayer ls` output: the merged tree printed the way `ls` prints a directory.
//!
//! Owners are numeric (an image's `/etc/passwd` is not the host's), times are UTC, and the long
//! format follows `ls -l`: type and permission string with setuid/setgid/sticky letters, link
//! count, owner, group, size (or `major, minor` for devices), mtime, name and symlink target.

use std::fmt::Write as _;
use std::io::{self, Write};

use crate::fs::tree::{Ino, MergedTree, Node, NodeKind};

/// What to print.
#[derive(Clone, Copy, Debug, Default)]
pub struct ListOptions {
    pub long: bool,
    pub recursive: bool,
    /// Show names starting with `.`, as `ls -a` does (without `.` and `..`).
    pub all: bool,
}

/// `drwxr-xr-x`-style type and permission string.
pub fn mode_string(node: &Node) -> String {
    let kind = node.type_char();
    let m = node.meta.mode;
    let bit = |mask: u32, c: char| if m & mask != 0 { c } else { '-' };
    let special = |exec: bool, set: bool, lower: char, upper: char| match (exec, set) {
        (true, true) => lower,
        (false, true) => upper,
        (true, false) => 'x',
        (false, false) => '-',
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    s.push(bit(0o400, 'r'));
    s.push(bit(0o200, 'w'));
    s.push(special(m & 0o100 != 0, m & 0o4000 != 0, 's', 'S'));
    s.push(bit(0o040, 'r'));
    s.push(bit(0o020, 'w'));
    s.push(special(m & 0o010 != 0, m & 0o2000 != 0, 's', 'S'));
    s.push(bit(0o004, 'r'));
    s.push(bit(0o002, 'w'));
    s.push(special(m & 0o001 != 0, m & 0o1000 != 0, 't', 'T'));
    s
}

fn format_time(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| secs.to_string())
}

/// One line of `ls -l` for `node` shown as `name`.
pub fn long_line(node: &Node, name: &str) -> String {
    let size = match node.kind {
        NodeKind::Char { major, minor } | NodeKind::Block { major, minor } => {
            format!("{major}, {minor}")
        }
        _ => node.size().to_string(),
    };
    let mut line = format!(
        "{} {:>3} {:>5} {:>5} {:>10} {} {}",
        mode_string(node),
        node.nlink,
        node.meta.uid,
        node.meta.gid,
        size,
        format_time(node.meta.mtime),
        name
    );
    if let NodeKind::Symlink { target } = &node.kind {
        let _ = write!(line, " -> {}", String::from_utf8_lossy(target));
    }
    line
}

fn entry(
    out: &mut impl Write,
    tree: &MergedTree,
    ino: Ino,
    name: &str,
    options: ListOptions,
) -> io::Result<()> {
    let node = tree.node(ino).expect("listed inode exists");
    if options.long {
        writeln!(out, "{}", long_line(node, name))
    } else {
        writeln!(out, "{name}")
    }
}

/// Lists `ino` (shown as `shown`, the path the user typed) to `out`: a directory's entries, or
/// the single entry itself. Written as it goes, never built whole: a recursive listing repeats
/// every directory's path, so a deep tree's listing is quadratic in its depth (an 82 KB TOC of
/// a deep tree lists to gigabytes), while what is held here is one path per pending directory.
pub fn list(
    out: &mut impl Write,
    tree: &MergedTree,
    ino: Ino,
    shown: &str,
    options: ListOptions,
) -> io::Result<()> {
    let is_dir = tree.node(ino).is_some_and(Node::is_dir);
    if !is_dir {
        return entry(out, tree, ino, shown, options);
    }
    let mut queue = vec![(ino, shown.to_string())];
    let mut first = true;
    while let Some((dir, path)) = queue.pop() {
        if options.recursive {
            if !first {
                writeln!(out)?;
            }
            writeln!(out, "{path}:")?;
        }
        first = false;
        let mut subdirs = Vec::new();
        for (name, &child) in tree.children(dir).into_iter().flatten() {
            let name = String::from_utf8_lossy(name);
            if !options.all && name.starts_with('.') {
                continue;
            }
            entry(out, tree, child, &name, options)?;
            if options.recursive && tree.node(child).is_some_and(Node::is_dir) {
                let sep = if path.ends_with('/') { "" } else { "/" };
                subdirs.push((child, format!("{path}{sep}{name}")));
            }
        }
        // Depth first, in name order, as `ls -R` prints.
        queue.extend(subdirs.into_iter().rev());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Meta;

    fn node(kind: NodeKind, mode: u32) -> Node {
        Node {
            kind,
            meta: Meta {
                mode,
                ..Meta::default()
            },
            nlink: 1,
        }
    }

    #[test]
    fn mode_strings() {
        let file = |mode| {
            node(
                NodeKind::File {
                    size: 0,
                    layer: 0,
                    chunks: std::sync::Arc::from(vec![]),
                },
                mode,
            )
        };
        assert_eq!(mode_string(&file(0o644)), "-rw-r--r--");
        assert_eq!(mode_string(&file(0o4755)), "-rwsr-xr-x");
        assert_eq!(mode_string(&file(0o2644)), "-rw-r-Sr--");
        let dir = node(
            NodeKind::Dir {
                children: Default::default(),
                parent: 1,
            },
            0o1777,
        );
        assert_eq!(mode_string(&dir), "drwxrwxrwt");
        let dev = node(NodeKind::Char { major: 1, minor: 3 }, 0o666);
        assert_eq!(mode_string(&dev), "crw-rw-rw-");
        assert!(long_line(&dev, "null").contains("1, 3"));
        let link = node(
            NodeKind::Symlink {
                target: b"usr/bin".to_vec().into(),
            },
            0o777,
        );
        assert!(long_line(&link, "bin").ends_with("bin -> usr/bin"));
    }
}
