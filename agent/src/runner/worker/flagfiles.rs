//! Flagfile arguments, read the way Bazel's own worker runner reads them:
//!
//! - an argument is a flagfile argument when it is `@PATH`, `-flagfile=PATH`
//!   or `--flagfile=PATH` (PATH non-empty); those go into requests and the
//!   rest, plus `--persistent_worker`, start the worker;
//! - in a request, `@PATH` is replaced by the lines of PATH (relative to
//!   the working directory), each expanded again the same way;
//!   `@@...` (an escaped `@`) and `@repo//...` (a label of an external
//!   repository) are passed as they are, and so is `--flagfile=PATH`: the
//!   worker reads that file itself.

use std::path::Path;

/// Bound on one expansion's lines, all files together: a flagfile that
/// names itself, or a huge one, fails the request instead of the agent.
const MAX_LINES: usize = 1 << 20;
/// Bound on how deep `@file` lines may nest.
const MAX_DEPTH: usize = 64;

/// Whether `arg` is a flagfile argument.
pub fn is_flagfile(arg: &str) -> bool {
    let path = arg
        .strip_prefix('@')
        .or_else(|| arg.strip_prefix("--flagfile="))
        .or_else(|| arg.strip_prefix("-flagfile="));
    path.is_some_and(|p| !p.is_empty())
}

/// The argv split into the worker's start command (with
/// `--persistent_worker`) and its flagfile arguments; none when it has no
/// flagfile argument.
pub fn split(argv: &[String]) -> Option<(Vec<String>, Vec<String>)> {
    let (flagfiles, mut start): (Vec<String>, Vec<String>) =
        argv.iter().cloned().partition(|a| is_flagfile(a));
    if flagfiles.is_empty() || start.is_empty() {
        return None;
    }
    start.push("--persistent_worker".to_owned());
    Some((start, flagfiles))
}

/// The request's arguments: `flagfiles` expanded, with `@` paths read
/// under `dir`.
pub fn expand(dir: &Path, flagfiles: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for arg in flagfiles {
        expand_one(dir, arg, 0, &mut out)?;
    }
    Ok(out)
}

fn expand_one(dir: &Path, arg: &str, depth: usize, out: &mut Vec<String>) -> Result<(), String> {
    let expands = arg.starts_with('@') && !arg.starts_with("@@") && !is_repository_label(arg);
    if !expands {
        out.push(arg.to_owned());
        return Ok(());
    }
    if depth >= MAX_DEPTH {
        return Err(format!(
            "flagfile {arg} nests more than {MAX_DEPTH} levels deep"
        ));
    }
    let rel = &arg[1..];
    let path = dir.join(rel);
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("cannot read flagfile {rel}: {e}"))?;
    for line in text.lines() {
        if out.len() >= MAX_LINES {
            return Err(format!(
                "flagfile {rel} expands to more than {MAX_LINES} arguments"
            ));
        }
        expand_one(dir, line, depth + 1, out)?;
    }
    Ok(())
}

/// `@repo//pkg:target`: a label, not a file.
fn is_repository_label(arg: &str) -> bool {
    arg.starts_with('@') && arg.contains("//")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn flagfile_arguments_leave_the_start_command() {
        let (start, flagfiles) = split(&strings(&[
            "python3",
            "tool.py",
            "@args",
            "--flagfile=more",
            "-flagfile=other",
            "--verbose",
            "@",
        ]))
        .expect("has flagfiles");
        assert_eq!(
            start,
            strings(&[
                "python3",
                "tool.py",
                "--verbose",
                "@",
                "--persistent_worker"
            ])
        );
        assert_eq!(
            flagfiles,
            strings(&["@args", "--flagfile=more", "-flagfile=other"])
        );
        assert!(split(&strings(&["tool", "--out=x"])).is_none());
        assert!(split(&strings(&["@only"])).is_none());
    }

    #[test]
    fn at_files_expand_recursively_and_other_forms_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(
            dir.path().join("sub/args"),
            "--a\n@sub/nested\n@@literal\n@repo//pkg:t\n--flagfile=kept\n\n",
        )
        .expect("write");
        std::fs::write(dir.path().join("sub/nested"), "--b\n--c=1 2\n").expect("write");
        let got = expand(dir.path(), &strings(&["@sub/args", "--flagfile=x"])).expect("expands");
        assert_eq!(
            got,
            strings(&[
                "--a",
                "--b",
                "--c=1 2",
                "@@literal",
                "@repo//pkg:t",
                "--flagfile=kept",
                "",
                "--flagfile=x"
            ])
        );
        let err = expand(dir.path(), &strings(&["@missing"])).expect_err("missing");
        assert!(err.contains("cannot read flagfile missing"), "{err}");
        std::fs::write(dir.path().join("loop"), "@loop\n").expect("write");
        let err = expand(dir.path(), &strings(&["@loop"])).expect_err("a loop");
        assert!(err.contains("levels deep"), "{err}");
    }
}
