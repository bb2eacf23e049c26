//! The profile pinned as rendered, and read back by a small SBPL reader
//! over a generated table of odd paths: every writable path is a write
//! rule, nothing else is, and a path that cannot be quoted is refused.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use super::*;

fn spec(network: Network) -> Spec {
    Spec {
        workspace: PathBuf::from("/Users/ci/outpost-agent/actions/lease-1"),
        writable: vec![
            PathBuf::from("/var/folders/xy/abc123/T"),
            PathBuf::from("/private/var/folders/xy/abc123/C"),
        ],
        hidden: vec![
            PathBuf::from("/Users/ci/outpost-agent"),
            PathBuf::from("/etc/outpost/token"),
        ],
        network,
    }
}

#[test]
fn the_profile_is_pinned() {
    let profile = render(&spec(Network::Localhost)).expect("renders");
    expect_test::expect![[r##"
        (version 1)
        (allow default)
        (deny network*)
        (allow network* (local ip "localhost:*"))
        (allow network* (remote ip "localhost:*"))
        (deny file-write*)
        (allow file-write* (literal "/dev/null"))
        (allow file-write* (literal "/dev/zero"))
        (allow file-write* (literal "/dev/random"))
        (allow file-write* (literal "/dev/urandom"))
        (allow file-write* (literal "/dev/tty"))
        (allow file-write* (literal "/dev/dtracehelper"))
        (allow file-write* (literal "/dev/stdout"))
        (allow file-write* (literal "/dev/stderr"))
        (allow file-write* (regex #"^/dev/tty[a-z0-9]*$") (regex #"^/dev/fd/"))
        (allow file-read* file-write* (subpath "/var/folders/xy/abc123/T"))
        (allow file-read* file-write* (subpath "/private/var/folders/xy/abc123/T"))
        (allow file-read* file-write* (subpath "/private/var/folders/xy/abc123/C"))
        (allow file-read* file-write* (subpath "/var/folders/xy/abc123/C"))
        (deny file-read* file-write* (subpath "/Users/ci/outpost-agent"))
        (deny file-read* file-write* (subpath "/etc/outpost/token"))
        (deny file-read* file-write* (subpath "/private/etc/outpost/token"))
        (allow file-read* file-write* (subpath "/Users/ci/outpost-agent/actions/lease-1"))
    "##]]
    .assert_eq(&profile);
}

/// One SBPL form as read back.
#[derive(Debug, PartialEq)]
enum Form {
    List(Vec<Form>),
    Atom(String),
    Str(String),
}

/// Reads a profile's top-level forms (strings with `\` escapes, `#"..."`
/// regexes as strings); panics on anything unbalanced.
fn read(profile: &str) -> Vec<Form> {
    let chars: Vec<char> = profile.chars().collect();
    let mut i = 0;
    fn form(c: &[char], i: &mut usize) -> Form {
        while c[*i].is_whitespace() {
            *i += 1;
        }
        match c[*i] {
            '(' => {
                *i += 1;
                let mut items = Vec::new();
                loop {
                    while c[*i].is_whitespace() {
                        *i += 1;
                    }
                    if c[*i] == ')' {
                        *i += 1;
                        return Form::List(items);
                    }
                    items.push(form(c, i));
                }
            }
            '"' | '#' => {
                if c[*i] == '#' {
                    *i += 1;
                }
                assert_eq!(c[*i], '"');
                *i += 1;
                let mut s = String::new();
                loop {
                    match c[*i] {
                        '"' => break,
                        '\\' => {
                            *i += 1;
                            s.push(c[*i]);
                        }
                        other => {
                            assert!(other != '\n', "a string spans lines");
                            s.push(other);
                        }
                    }
                    *i += 1;
                }
                *i += 1;
                Form::Str(s)
            }
            ')' => panic!("unbalanced ) at {i}"),
            _ => {
                let start = *i;
                while !c[*i].is_whitespace() && c[*i] != '(' && c[*i] != ')' {
                    *i += 1;
                }
                Form::Atom(c[start..*i].iter().collect())
            }
        }
    }
    let mut forms = Vec::new();
    loop {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i == chars.len() {
            return forms;
        }
        forms.push(form(&chars, &mut i));
    }
}

fn atoms(items: &[Form]) -> Vec<&str> {
    items
        .iter()
        .map_while(|f| match f {
            Form::Atom(a) => Some(a.as_str()),
            _ => None,
        })
        .collect()
}

/// Every string anywhere in a form.
fn strings(form: &Form, out: &mut Vec<String>) {
    match form {
        Form::List(items) => items.iter().for_each(|f| strings(f, out)),
        Form::Str(s) => out.push(s.clone()),
        Form::Atom(_) => {}
    }
}

/// The paths of `(allow file-read* file-write* (subpath P))` forms, the
/// paths of `(deny file-read* file-write* (subpath P))` forms, and the
/// strings of every other form.
fn rules(profile: &str) -> (BTreeSet<String>, BTreeSet<String>, Vec<String>) {
    let (mut write, mut hidden, mut other) = (BTreeSet::new(), BTreeSet::new(), Vec::new());
    for form in read(profile) {
        let Form::List(items) = &form else {
            panic!("a top-level atom: {form:?}");
        };
        let head = atoms(items);
        let subpath = match items.last() {
            Some(Form::List(inner)) if atoms(inner) == ["subpath"] && inner.len() == 2 => {
                match &inner[1] {
                    Form::Str(s) => Some(s.clone()),
                    _ => None,
                }
            }
            _ => None,
        };
        match (head.as_slice(), subpath) {
            (["allow", "file-read*", "file-write*"], Some(p)) if items.len() == 4 => {
                write.insert(p);
            }
            (["deny", "file-read*", "file-write*"], Some(p)) if items.len() == 4 => {
                hidden.insert(p);
            }
            _ => strings(&form, &mut other),
        }
    }
    (write, hidden, other)
}

fn all_spellings(paths: &[&Path]) -> BTreeSet<String> {
    paths
        .iter()
        .flat_map(|p| spellings(p))
        .map(|p| p.to_str().expect("utf-8").to_owned())
        .collect()
}

/// Names that are hard to quote; the last ones cannot be.
fn odd_names() -> Vec<(PathBuf, bool)> {
    let fine = [
        "plain",
        "with space",
        "quote\"d",
        "back\\slash",
        "trailing\\",
        "\\\"",
        "paren)(allow default)(",
        "\")(allow file-write* (subpath \"/\"))(\"",
        "#\"regex\"",
        "semi;colon",
        "ünïcödé ✓",
        "-dash",
    ];
    let refused: [&[u8]; 5] = [
        b"new\nline",
        b"tab\tstop",
        b"nul\x7f",
        b"carriage\rreturn",
        b"not utf-8 \xff\xfe",
    ];
    let mut out = Vec::new();
    for prefix in ["/tmp", "/private/var/folders/xy", "/Users/ci/work", "/etc"] {
        for name in fine {
            out.push((Path::new(prefix).join(name), true));
        }
        for name in refused {
            out.push((Path::new(prefix).join(OsStr::from_bytes(name)), false));
        }
    }
    out.push((PathBuf::from("relative/dir"), false));
    out
}

#[test]
fn every_writable_path_is_a_write_rule_and_nothing_else_is() {
    let base = spec(Network::None);
    for (odd, quotable) in odd_names() {
        // The odd path as each of the spec's paths in turn.
        for role in 0..3 {
            let mut spec = base.clone();
            match role {
                0 => spec.writable.push(odd.clone()),
                1 => spec.workspace = odd.clone(),
                _ => spec.hidden.push(odd.clone()),
            }
            let rendered = render(&spec);
            if !quotable {
                let err = rendered.expect_err("refused");
                assert_eq!(err.path, odd, "{err}");
                continue;
            }
            let profile = rendered.unwrap_or_else(|e| panic!("{odd:?}: {e}"));
            let (write, hidden, other) = rules(&profile);
            let writable: Vec<&Path> = spec
                .writable
                .iter()
                .chain([&spec.workspace])
                .map(PathBuf::as_path)
                .collect();
            let hidden_paths: Vec<&Path> = spec.hidden.iter().map(PathBuf::as_path).collect();
            assert_eq!(write, all_spellings(&writable), "{odd:?}\n{profile}");
            assert_eq!(hidden, all_spellings(&hidden_paths), "{odd:?}\n{profile}");
            // The other rules hold only the fixed devices and network.
            let fixed: BTreeSet<&str> = DEVICES
                .iter()
                .copied()
                .chain(["localhost:*", "^/dev/tty[a-z0-9]*$", "^/dev/fd/"])
                .collect();
            for s in &other {
                assert!(fixed.contains(s.as_str()), "{odd:?}: {s:?} in\n{profile}");
            }
        }
    }
}

#[test]
fn the_network_rule_follows_the_choice() {
    let network_forms = |n| -> Vec<Form> {
        read(&render(&spec(n)).expect("renders"))
            .into_iter()
            .filter(|f| matches!(f, Form::List(items) if atoms(items).iter().any(|a| a.starts_with("network"))))
            .collect()
    };
    assert!(network_forms(Network::All).is_empty());
    assert_eq!(
        network_forms(Network::None),
        [Form::List(vec![
            Form::Atom("deny".into()),
            Form::Atom("network*".into())
        ])]
    );
    let local = network_forms(Network::Localhost);
    assert_eq!(local.len(), 3);
    let mut s = Vec::new();
    local.iter().for_each(|f| strings(f, &mut s));
    assert_eq!(s, ["localhost:*", "localhost:*"]);
}

#[test]
fn both_spellings_of_macos_links_are_written() {
    let s = |p: &str| -> Vec<String> {
        spellings(Path::new(p))
            .into_iter()
            .map(|p| p.display().to_string())
            .collect()
    };
    assert_eq!(s("/tmp/x"), ["/tmp/x", "/private/tmp/x"]);
    assert_eq!(s("/private/tmp"), ["/private/tmp", "/tmp"]);
    assert_eq!(
        s("/var/folders/a"),
        ["/var/folders/a", "/private/var/folders/a"]
    );
    assert_eq!(
        s("/private/var/folders/a"),
        ["/private/var/folders/a", "/var/folders/a"]
    );
    // Only whole components: /tmpfoo is not under /tmp.
    assert_eq!(s("/tmpfoo"), ["/tmpfoo"]);
    assert_eq!(s("/Users/ci"), ["/Users/ci"]);
}
