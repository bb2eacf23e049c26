//! Checks on the untrusted messages that describe an action: Directory
//! nodes, symlink targets, and a Command's paths. Pure functions of the
//! message, so the coordinator (before it queues anything), the agent
//! (before it lays anything out) and the fuzz targets share them.
//!
//! The rules follow the REAPI's canonical Directory form: every name is
//! one plain path segment, each list is sorted by name and no name appears
//! twice across files, directories and symlinks. Paths in a Command are
//! relative, may use `..`, but must stay inside the input root.

use crate::reapi;

/// Why a message was refused; the text names the offending entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid(message: String) -> Invalid {
    Invalid(message)
}

/// A path segment: not empty, not `.` or `..`, no `/` or NUL.
pub fn name(name: &str) -> Result<(), Invalid> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(invalid(format!(
            "the entry {name:?} is not a plain name (no '/', '.' or '..')"
        )));
    }
    Ok(())
}

/// One Directory on its own: names plain, each list sorted, no name twice.
pub fn directory(dir: &reapi::Directory) -> Result<(), Invalid> {
    sorted(dir.files.iter().map(|f| f.name.as_str()), "files")?;
    sorted(
        dir.directories.iter().map(|d| d.name.as_str()),
        "directories",
    )?;
    sorted(dir.symlinks.iter().map(|s| s.name.as_str()), "symlinks")?;
    let mut names: Vec<&str> = entry_names(dir).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
        // Two entries for one path would let a symlink stand in for a
        // directory the agent writes into.
        return Err(invalid(format!(
            "the name {:?} appears more than once",
            pair[0]
        )));
    }
    for s in &dir.symlinks {
        if s.target.is_empty() || s.target.contains('\0') {
            return Err(invalid(format!(
                "the symlink {:?} has an empty target or one with NUL",
                s.name
            )));
        }
    }
    Ok(())
}

/// Every entry's name: files, then directories, then symlinks.
pub fn entry_names(dir: &reapi::Directory) -> impl Iterator<Item = &str> {
    dir.files
        .iter()
        .map(|f| f.name.as_str())
        .chain(dir.directories.iter().map(|d| d.name.as_str()))
        .chain(dir.symlinks.iter().map(|s| s.name.as_str()))
}

fn sorted<'a>(names: impl Iterator<Item = &'a str>, list: &str) -> Result<(), Invalid> {
    let mut previous: Option<&str> = None;
    for n in names {
        name(n)?;
        if let Some(p) = previous
            && p > n
        {
            return Err(invalid(format!(
                "the {list} are not sorted by name ({p:?} before {n:?})"
            )));
        }
        previous = Some(n);
    }
    Ok(())
}

/// Whether a relative symlink target, placed in a directory `depth` levels
/// below the input root, leaves the root when resolved. Absolute targets
/// are the caller's policy (they point into the action's view of the
/// host, not into the tree).
pub fn symlink_escapes(depth: usize, target: &str) -> bool {
    if target.starts_with('/') {
        return false;
    }
    let mut level = depth as i64;
    for segment in target.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                level -= 1;
                if level < 0 {
                    return true;
                }
            }
            _ => level += 1,
        }
    }
    false
}

/// Resolves a relative path against `base` (itself already resolved, as
/// segments), refusing absolute paths, NUL and any `..` that climbs above
/// the input root.
pub fn resolve(base: &[String], path: &str, what: &str) -> Result<Vec<String>, Invalid> {
    if path.starts_with('/') {
        return Err(invalid(format!(
            "{what} {path:?} is absolute; paths are relative to the input root"
        )));
    }
    if path.contains('\0') {
        return Err(invalid(format!("{what} {path:?} contains NUL")));
    }
    let mut out = base.to_vec();
    for segment in path.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if out.pop().is_none() {
                    return Err(invalid(format!("{what} {path:?} leaves the input root")));
                }
            }
            s => out.push(s.to_owned()),
        }
    }
    Ok(out)
}

#[derive(PartialEq, Eq)]
enum Output {
    Path,
    File,
    Directory,
}

/// A Command: arguments present, environment names plain, the working
/// directory and every output path inside the input root (outputs not the
/// root itself).
pub fn command(cmd: &reapi::Command) -> Result<(), Invalid> {
    match cmd.arguments.first() {
        None => {
            return Err(invalid(
                "the Command has no program to run (arguments is empty)".to_owned(),
            ));
        }
        Some(program) if program.is_empty() => {
            return Err(invalid(
                "the Command's program (arguments[0]) is an empty string; name the program to run"
                    .to_owned(),
            ));
        }
        Some(_) => {}
    }
    if let Some(a) = cmd.arguments.iter().find(|a| a.contains('\0')) {
        return Err(invalid(format!("the argument {a:?} contains NUL")));
    }
    for v in &cmd.environment_variables {
        if v.name.is_empty() || v.name.contains(['=', '\0']) {
            return Err(invalid(format!(
                "the environment variable {:?} has an empty name, or '=' or NUL in it",
                v.name
            )));
        }
        if v.value.contains('\0') {
            return Err(invalid(format!(
                "the value of the environment variable {:?} contains NUL, which no process \
                 environment can hold",
                v.name
            )));
        }
    }
    let workdir = resolve(&[], &cmd.working_directory, "the working directory")?;
    let mut files = std::collections::HashMap::new();
    for (list, what, kind) in [
        (&cmd.output_paths, "the output path", Output::Path),
        (&cmd.output_files, "the output file", Output::File),
        (
            &cmd.output_directories,
            "the output directory",
            Output::Directory,
        ),
    ] {
        for path in list {
            let resolved = resolve(&workdir, path, what)?;
            if resolved.is_empty() {
                return Err(invalid(format!("{what} {path:?} is the input root itself")));
            }
            if kind == Output::File {
                files.insert(resolved, path);
            } else if kind == Output::Directory
                && let Some(file) = files.get(&resolved)
            {
                // One path cannot be both; finding out after the action
                // ran would waste the run.
                return Err(invalid(format!(
                    "the output file {file:?} and the output directory {path:?} are the same \
                     path; declare it once"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> reapi::FileNode {
        reapi::FileNode {
            name: name.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn directories_must_be_canonical() {
        let ok = reapi::Directory {
            files: vec![file("a"), file("b")],
            ..Default::default()
        };
        assert_eq!(directory(&ok), Ok(()));
        let unsorted = reapi::Directory {
            files: vec![file("b"), file("a")],
            ..Default::default()
        };
        assert!(
            directory(&unsorted)
                .expect_err("refused")
                .0
                .contains("not sorted")
        );
        let twice = reapi::Directory {
            files: vec![file("a")],
            directories: vec![reapi::DirectoryNode {
                name: "a".into(),
                digest: None,
            }],
            ..Default::default()
        };
        assert!(
            directory(&twice)
                .expect_err("refused")
                .0
                .contains("more than once")
        );
        for bad in ["", ".", "..", "a/b", "nul\0"] {
            let d = reapi::Directory {
                files: vec![file(bad)],
                ..Default::default()
            };
            assert!(directory(&d).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn symlinks_may_climb_only_as_far_as_the_root() {
        assert!(!symlink_escapes(0, "a/b"));
        assert!(symlink_escapes(0, "../x"));
        assert!(!symlink_escapes(1, "../x"));
        assert!(symlink_escapes(1, "a/../../../x"));
        assert!(!symlink_escapes(2, "./../../x"));
        assert!(!symlink_escapes(0, "/usr/bin/cc"));
    }

    #[test]
    fn command_paths_stay_inside_the_root() {
        let cmd = |workdir: &str, out: &str| reapi::Command {
            arguments: vec!["true".into()],
            working_directory: workdir.into(),
            output_paths: vec![out.into()],
            ..Default::default()
        };
        assert_eq!(command(&cmd("pkg", "../out/x")), Ok(()));
        assert!(command(&cmd("pkg", "../../x")).is_err());
        assert!(command(&cmd("", "/etc/passwd")).is_err());
        assert!(command(&cmd("..", "x")).is_err());
        assert!(command(&cmd("pkg", "..")).is_err());
        assert!(
            command(&reapi::Command::default())
                .expect_err("refused")
                .0
                .contains("no program")
        );
    }

    fn refusal(cmd: &reapi::Command) -> String {
        command(cmd).expect_err("refused").0
    }

    #[test]
    fn an_empty_program_is_not_an_empty_argument_list() {
        let empty_program = reapi::Command {
            arguments: vec![String::new()],
            ..Default::default()
        };
        let why = refusal(&empty_program);
        assert!(why.contains("arguments[0]) is an empty string"), "{why}");
        assert!(!why.contains("arguments is empty"), "{why}");
    }

    #[test]
    fn nul_in_an_environment_value_is_named_as_such() {
        let env = |name: &str, value: &str| reapi::Command {
            arguments: vec!["true".into()],
            environment_variables: vec![reapi::command::EnvironmentVariable {
                name: name.into(),
                value: value.into(),
            }],
            ..Default::default()
        };
        let why = refusal(&env("PATH", "/bin\0/usr/bin"));
        assert!(
            why.contains("value of the environment variable \"PATH\""),
            "{why}"
        );
        assert!(!why.contains("empty name"), "{why}");
        assert!(refusal(&env("A=B", "x")).contains("empty name, or '='"));
        assert_eq!(command(&env("PATH", "/bin")), Ok(()));
    }

    #[test]
    fn one_path_cannot_be_an_output_file_and_an_output_directory() {
        let outputs = |files: &[&str], dirs: &[&str]| reapi::Command {
            arguments: vec!["true".into()],
            working_directory: "pkg".into(),
            output_files: files.iter().map(|s| (*s).to_owned()).collect(),
            output_directories: dirs.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        };
        let why = refusal(&outputs(&["out/a"], &["out/./a"]));
        assert!(why.contains("are the same path"), "{why}");
        assert!(refusal(&outputs(&["x", "out"], &["../pkg/out"])).contains("same path"));
        assert_eq!(command(&outputs(&["out/a"], &["out/b"])), Ok(()));
        // A file inside an output directory is allowed.
        assert_eq!(command(&outputs(&["out/a"], &["out"])), Ok(()));
    }
}
