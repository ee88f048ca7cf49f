//! containerd's filter syntax for `Walk`/`List`: which snapshots a caller asked for.
//!
//! A filter string is selectors joined by `,` (all must match), and alternatives joined by `|`;
//! several strings in one request are alternatives too, as containerd's `filters.ParseAll` does.
//! A selector is `FIELDPATH[OP VALUE]`: the field path is dot-separated names, any of them quoted
//! Go-style (`labels."containerd.io/gc.root"`); `OP` is `==`, `!=` or `~=` (a regular expression,
//! unanchored); without one the selector asks that the field exist. A snapshot's fields are
//! `name`, `parent`, `kind` (`active`, `view`, `committed`) and `labels.KEY`.
//!
//! Matching follows containerd's snapshot adaptor: `==` needs the field to exist, `!=` compares
//! a missing field as the empty string. containerd re-checks what it walks in places, but its
//! garbage collector and `ctr snapshots ls` rely on the snapshotter's answer, and a filter that
//! returned everything made `Walk` results wrong for them (containerd's snapshotter suite).

use super::SnapshotInfo;
use super::store::Kind;

/// Alternatives, each a conjunction of selectors. No alternative at all matches everything.
pub struct SnapshotFilter {
    any: Vec<Vec<Selector>>,
}

struct Selector {
    path: Vec<String>,
    op: Op,
}

enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(regex::Regex),
}

impl SnapshotFilter {
    /// Parses a request's filter strings; the error says what is wrong and where.
    pub fn parse(filters: &[String]) -> Result<SnapshotFilter, String> {
        let mut any = Vec::new();
        for filter in filters.iter().filter(|f| !f.trim().is_empty()) {
            let mut parser = Parser {
                text: filter,
                at: 0,
            };
            any.extend(
                parser
                    .alternatives()
                    .map_err(|why| format!("filter {filter:?}: {why}"))?,
            );
        }
        Ok(SnapshotFilter { any })
    }

    pub fn matches(&self, snapshot: &SnapshotInfo) -> bool {
        self.any.is_empty()
            || self
                .any
                .iter()
                .any(|all| all.iter().all(|s| s.matches(snapshot)))
    }
}

impl Selector {
    fn matches(&self, snapshot: &SnapshotInfo) -> bool {
        let record = &snapshot.record;
        let field = match self.path.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["name"] => Some(snapshot.name.as_str()),
            ["parent"] => Some(record.parent.as_deref().unwrap_or("")),
            ["kind"] => Some(match record.kind {
                Kind::Active => "active",
                Kind::View => "view",
                Kind::Committed => "committed",
            }),
            ["labels", key] => record.labels.get(key).map(String::as_str),
            _ => None,
        };
        match &self.op {
            Op::Present => field.is_some(),
            Op::Equal(value) => field == Some(value.as_str()),
            Op::NotEqual(value) => field.unwrap_or("") != value,
            Op::Matches(re) => re.is_match(field.unwrap_or("")),
        }
    }
}

struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.text[self.at..]
    }

    fn skip_spaces(&mut self) {
        let rest = self.rest();
        self.at += rest.len() - rest.trim_start().len();
    }

    fn eat(&mut self, token: &str) -> bool {
        self.skip_spaces();
        let found = self.rest().starts_with(token);
        if found {
            self.at += token.len();
        }
        found
    }

    fn alternatives(&mut self) -> Result<Vec<Vec<Selector>>, String> {
        let mut any = vec![vec![self.selector()?]];
        loop {
            if self.eat(",") {
                any.last_mut()
                    .expect("one alternative")
                    .push(self.selector()?);
            } else if self.eat("|") {
                any.push(vec![self.selector()?]);
            } else {
                self.skip_spaces();
                if self.rest().is_empty() {
                    return Ok(any);
                }
                return Err(format!("unexpected {:?} at {}", self.rest(), self.at));
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, String> {
        let mut path = vec![self.field()?];
        while self.eat(".") {
            path.push(self.field()?);
        }
        let op = if self.eat("==") {
            Op::Equal(self.value()?)
        } else if self.eat("!=") {
            Op::NotEqual(self.value()?)
        } else if self.eat("~=") {
            let pattern = self.value()?;
            Op::Matches(
                regex::Regex::new(&pattern)
                    .map_err(|e| format!("{pattern:?} is not a regular expression: {e}"))?,
            )
        } else {
            Op::Present
        };
        Ok(Selector { path, op })
    }

    fn field(&mut self) -> Result<String, String> {
        self.skip_spaces();
        if self.rest().starts_with('"') {
            return self.quoted();
        }
        let len = self
            .rest()
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(format!("expected a field name at {}", self.at));
        }
        let name = self.rest()[..len].to_string();
        self.at += len;
        Ok(name)
    }

    fn value(&mut self) -> Result<String, String> {
        self.skip_spaces();
        if self.rest().starts_with('"') {
            return self.quoted();
        }
        let len = self
            .rest()
            .find(|c: char| c == ',' || c == '|' || c.is_whitespace())
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(format!("expected a value at {}", self.at));
        }
        let value = self.rest()[..len].to_string();
        self.at += len;
        Ok(value)
    }

    /// A Go-style double-quoted string (the escapes containerd's filters accept).
    fn quoted(&mut self) -> Result<String, String> {
        let start = self.at;
        let mut out = String::new();
        let mut chars = self.rest().char_indices().skip(1);
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.at += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some('r') => out.push('\r'),
                    Some(c @ ('"' | '\\' | '/')) => out.push(c),
                    other => return Err(format!("bad escape {other:?} in the string at {start}")),
                },
                c => out.push(c),
            }
        }
        Err(format!("unterminated string at {start}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::containerd::snapshotter::store::Record;
    use crate::containerd::snapshotter::tests::labels;

    fn snapshot(name: &str, kind: Kind, parent: &str, l: &[(&str, &str)]) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            record: Record {
                id: 1,
                kind,
                parent: (!parent.is_empty()).then(|| parent.into()),
                labels: labels(l),
                created: 0,
                updated: 0,
                remote: None,
            },
        }
    }

    fn names(filters: &[&str], all: &[SnapshotInfo]) -> Vec<String> {
        let filter =
            SnapshotFilter::parse(&filters.iter().map(|f| f.to_string()).collect::<Vec<_>>())
                .unwrap();
        all.iter()
            .filter(|s| filter.matches(s))
            .map(|s| s.name.clone())
            .collect()
    }

    #[test]
    fn selectors_combine_as_containerd_walks_them() {
        let gc = ("containerd.io/gc.root", "walk");
        let all = [
            snapshot("p", Kind::Committed, "", &[gc]),
            snapshot("a", Kind::Active, "p", &[gc]),
            snapshot("v", Kind::View, "p", &[gc, ("l", "3")]),
            snapshot("a-np", Kind::Active, "", &[("l", "2")]),
        ];
        assert_eq!(names(&[], &all), ["p", "a", "v", "a-np"]);
        assert_eq!(
            names(&[r#"labels."containerd.io/gc.root"==walk"#], &all),
            ["p", "a", "v"]
        );
        assert_eq!(
            names(
                &[r#"kind==active,labels."containerd.io/gc.root"==walk"#],
                &all
            ),
            ["a"]
        );
        assert_eq!(names(&["name==p", "name==a-np"], &all), ["p", "a-np"]);
        assert_eq!(names(&["name==p|kind==view"], &all), ["p", "v"]);
        assert_eq!(names(&["labels.l"], &all), ["v", "a-np"]);
        assert_eq!(names(&["labels.l==2"], &all), ["a-np"]);
        assert_eq!(names(&["parent==p"], &all), ["a", "v"]);
        assert_eq!(names(&[r#"parent!="""#], &all), ["a", "v"]);
        assert_eq!(names(&["labels.l!=3"], &all), ["p", "a", "a-np"]);
        assert_eq!(
            names(&["name~=^a", " kind == view "], &all),
            ["a", "v", "a-np"]
        );
        assert_eq!(names(&["nosuchfield"], &all), Vec::<String>::new());
    }

    #[test]
    fn malformed_filters_are_refused_with_where() {
        for bad in [
            "name==",
            "name==a,",
            r#"labels."open"#,
            "name~=(",
            "==x",
            r#"name=="\q""#,
        ] {
            let err = SnapshotFilter::parse(&[bad.to_string()]).err();
            assert!(err.is_some(), "{bad:?} was accepted");
            let err = err.unwrap();
            assert!(
                err.contains(&format!("{bad:?}")),
                "{err} does not quote {bad:?}"
            );
        }
    }
}
