//! FastChat's model adapters as data, and `get_model_adapter` over them.
//!
//! Why data and not code: fschat 0.2.36 registers 88 adapters, and each `match()` and
//! `get_default_conv_template()` is a small test on the model path. The generator
//! (scripts/gen_fastchat_tables.py) translates them from FastChat's Python source into
//! `Cond` trees (fastchat_tables.rs), proving on every recorded name that the translation
//! answers as FastChat does; this module only evaluates them.

/// What a condition looks at: the path `match()` was given, as FastChat's code reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Subject {
    /// `model_path` as given.
    Raw,
    /// `model_path.lower()`.
    Lower,
    /// `remove_parent_directory_name(model_path)`: the last `/` component.
    Leaf,
    /// Its `.lower()`.
    #[allow(dead_code)] // the generator can emit it; fschat 0.2.36 has no use for it
    LeafLower,
}

/// One regex atom: a character in one of `ranges` (inclusive), once or, with `plus`, once
/// or more. FastChat's adapters use only literals, classes and `+` (the generator refuses
/// anything else).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Atom {
    pub ranges: &'static [(char, char)],
    pub plus: bool,
}

/// A translated test on the model path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cond {
    True,
    #[allow(dead_code)] // the generator can emit it; fschat 0.2.36's tables simplify it away
    False,
    /// Python's `needle in subject`.
    Contains(Subject, &'static str),
    /// `model_path == s` (the API models' exact names).
    Eq(&'static str),
    /// `re.search` of any of the alternatives.
    Regex(Subject, &'static [&'static [Atom]]),
    And(&'static [Cond]),
    Or(&'static [Cond]),
    Not(&'static Cond),
}

/// One FastChat model adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Adapter {
    /// FastChat's class name, e.g. `VicunaAdapter`.
    pub name: &'static str,
    /// llmfs's short name for it (registry `family`), e.g. `vicuna`.
    pub family: &'static str,
    /// "fschat 0.2.36" or "FastChat main".
    pub origin: &'static str,
    /// `match(model_path)`.
    pub matches: Cond,
    /// `get_default_conv_template(model_path)` as a first-match list (the last entry is
    /// `True`); `None` for PeftModelAdapter, whose template is its base model's.
    pub templates: Option<&'static [(Cond, &'static str)]>,
}

fn subject(path: &str, s: Subject) -> std::borrow::Cow<'_, str> {
    let leaf = || {
        let p = path.strip_suffix('/').unwrap_or(path);
        p.rsplit('/').next().unwrap_or(p)
    };
    match s {
        Subject::Raw => path.into(),
        Subject::Lower => path.to_lowercase().into(),
        Subject::Leaf => leaf().into(),
        Subject::LeafLower => leaf().to_lowercase().into(),
    }
}

fn regex_at(atoms: &[Atom], text: &[char]) -> bool {
    let Some((atom, rest)) = atoms.split_first() else { return true };
    let fits = |c: char| atom.ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi);
    let mut n = 0;
    while n < text.len() && fits(text[n]) {
        n += 1;
        if !atom.plus {
            break;
        }
    }
    (1..=n).rev().any(|k| regex_at(rest, &text[k..]))
}

impl Cond {
    pub(crate) fn holds(&self, path: &str) -> bool {
        match *self {
            Cond::True => true,
            Cond::False => false,
            Cond::Contains(s, needle) => subject(path, s).contains(needle),
            Cond::Eq(s) => path == s,
            Cond::Regex(s, alts) => {
                let text: Vec<char> = subject(path, s).chars().collect();
                alts.iter().any(|alt| (0..=text.len()).any(|p| regex_at(alt, &text[p..])))
            }
            Cond::And(cs) => cs.iter().all(|c| c.holds(path)),
            Cond::Or(cs) => cs.iter().any(|c| c.holds(path)),
            Cond::Not(c) => !c.holds(path),
        }
    }
}

impl Adapter {
    /// The template `get_default_conv_template(model_path)` names (`None`: the base
    /// model's, for PeftModelAdapter).
    pub(crate) fn template_for(&self, model_path: &str) -> Option<&'static str> {
        let list = self.templates?;
        list.iter().find(|(c, _)| c.holds(model_path)).map(|&(_, t)| t)
    }
}

/// Python's `os.path.basename(os.path.normpath(path))` for `/`-separated paths.
pub(crate) fn normpath_basename(path: &str) -> &str {
    let mut parts: Vec<&str> = Vec::new();
    let absolute = path.starts_with('/');
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." if parts.last().is_some_and(|p| *p != "..") => {
                parts.pop();
            }
            ".." if absolute => {}
            p => parts.push(p),
        }
    }
    match parts.last() {
        Some(p) => p,
        None if absolute => "",
        None => ".",
    }
}

/// FastChat's `get_model_adapter`: the first adapter (other than the catch-all last one)
/// matching the path's basename, else the first matching the whole path.
pub(crate) fn model_adapter(adapters: &'static [Adapter], model_path: &str) -> &'static Adapter {
    let (fallback, named) = adapters.split_last().expect("BaseModelAdapter is registered");
    let basename = normpath_basename(model_path);
    named
        .iter()
        .find(|a| a.matches.holds(basename))
        .or_else(|| adapters.iter().find(|a| a.matches.holds(model_path)))
        .unwrap_or(fallback)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normpath_basename_is_pythons() {
        for (path, want) in [
            ("lmsys/vicuna-7b-v1.5", "vicuna-7b-v1.5"),
            ("/models/vicuna/", "vicuna"),
            ("a//b/./c", "c"),
            ("a/b/..", "a"),
            ("../x", "x"),
            ("..", ".."),
            ("", "."),
            ("/", ""),
            ("gpt-4", "gpt-4"),
        ] {
            assert_eq!(normpath_basename(path), want, "{path:?}");
        }
    }

    #[test]
    fn regex_atoms_search_anywhere_with_backtracking() {
        const TWO: Atom = Atom { ranges: &[('2', '2')], plus: false };
        const DOT: Atom = Atom { ranges: &[('.', '.')], plus: false };
        const DASH: Atom = Atom { ranges: &[('-', '-')], plus: false };
        const DIGITS: Atom = Atom { ranges: &[('2', '9')], plus: true };
        let re = Cond::Regex(Subject::Raw, &[&[DASH, TWO, DOT, DIGITS]]);
        assert!(re.holds("airoboros-l2-70b-2.2.1"));
        assert!(re.holds("x-2.9"));
        assert!(!re.holds("airoboros-l2-70b-2.1"));
        assert!(!re.holds("x-2."));
        let plus_then = Cond::Regex(Subject::Raw, &[&[DIGITS, TWO]]);
        assert!(plus_then.holds("a22"), "+ gives back what the next atom needs");
        assert!(!plus_then.holds("2"));
    }

    #[test]
    fn subjects() {
        assert!(Cond::Contains(Subject::Leaf, "v0").holds("vicuna-v0/models/vicuna-7b-v0/"));
        assert!(!Cond::Contains(Subject::Leaf, "v0").holds("vicuna-v0/vicuna-7b"));
        assert!(Cond::Contains(Subject::LeafLower, "abc").holds("x/ABC"));
        assert!(!Cond::Contains(Subject::Raw, "ReaLM").holds("realm-7b"));
        assert!(Cond::Not(&Cond::Eq("bard")).holds("Bard"));
    }
}
