//! The registry's entries as a graph: each entry names its parents (one for a cast, a quantized
//! copy, a delta or an import; several for a merge), so entries form a DAG whose roots are
//! base directories. Pure functions over the plain data: parents, ancestors in topological
//! order, dependents, and the checks that a hand-edited or concurrently changed registry is
//! still a DAG (no cycle, no missing parent).

use std::collections::BTreeSet;

use super::{EntryKind, Error, Registry};

impl EntryKind {
    /// The entries this one is made from, in recipe order (a merge: its base first, if any).
    pub fn parents(&self) -> Vec<&str> {
        match self {
            EntryKind::Base { .. } => vec![],
            EntryKind::Cast { base, .. }
            | EntryKind::Quantized { base, .. }
            | EntryKind::Delta { base, .. }
            | EntryKind::Imported { base, .. } => vec![base.as_str()],
            EntryKind::Merge { parents, .. } => parents.iter().map(String::as_str).collect(),
        }
    }
}

impl Registry {
    /// The parents of entry `name` (empty for a base); an error if `name` does not exist.
    pub fn parents(&self, name: &str) -> Result<Vec<&str>, Error> {
        Ok(self.get(name)?.kind.parents())
    }

    /// Entry `name` and everything it is made from, parents before children (`name` last), each
    /// once: the order in which views are built. A missing parent or a cycle (a hand-edited
    /// registry) is an error naming it.
    pub fn ancestors(&self, name: &str) -> Result<Vec<&str>, Error> {
        let mut order: Vec<&str> = vec![];
        let mut done: BTreeSet<&str> = BTreeSet::new();
        // Depth-first with an explicit stack (no recursion on user data): (entry, its child,
        // whether its parents were pushed). `path` holds the entries being visited.
        let (key, _) = self.entries.get_key_value(name).ok_or_else(|| Error::NotFound(name.to_owned()))?;
        let mut stack: Vec<(&str, bool)> = vec![(key.as_str(), false)];
        let mut path: Vec<&str> = vec![];
        while let Some((current, expanded)) = stack.pop() {
            if expanded {
                path.pop();
                if done.insert(current) {
                    order.push(current);
                }
                continue;
            }
            if done.contains(current) {
                continue;
            }
            if path.contains(&current) {
                return Err(Error::Cycle(current.to_owned()));
            }
            path.push(current);
            stack.push((current, true));
            let entry = self.entries.get(current).expect("pushed only when present");
            for parent in entry.kind.parents().into_iter().rev() {
                let (key, _) = self.entries.get_key_value(parent).ok_or_else(|| Error::MissingBase {
                    entry: current.to_owned(),
                    base: parent.to_owned(),
                })?;
                if path.contains(&key.as_str()) {
                    return Err(Error::Cycle(key.clone()));
                }
                if !done.contains(key.as_str()) {
                    stack.push((key.as_str(), false));
                }
            }
        }
        Ok(order)
    }

    /// Entries that name `name` as a parent.
    pub fn dependents(&self, name: &str) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(_, e)| e.kind.parents().contains(&name))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Every entry is reachable down to base directories without a cycle or a missing parent.
    pub fn check_graph(&self) -> Result<(), Error> {
        self.entries.keys().try_for_each(|name| self.ancestors(name).map(drop))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Entry, EntryKind, ModelInfo, Registry};
    use super::Error;

    fn entry(kind: EntryKind) -> Entry {
        Entry {
            kind,
            info: ModelInfo::default(),
            family: String::new(),
            template: String::new(),
            chat_template: None,
            created: 1,
            generation: 1,
        }
    }

    fn base() -> EntryKind {
        EntryKind::Base { dir: "/x".into(), copied: false, files: vec![] }
    }

    fn cast(of: &str) -> EntryKind {
        EntryKind::Cast { base: of.into(), dtype: crate::format::Dtype::F16 }
    }

    fn registry(entries: &[(&str, EntryKind)]) -> Registry {
        let mut r = Registry::default();
        for (n, k) in entries {
            r.entries.insert(n.to_string(), entry(k.clone()));
        }
        r
    }

    #[test]
    fn ancestors_come_parents_first_each_once() {
        let r = registry(&[("b", base()), ("c1", cast("b")), ("c2", cast("c1"))]);
        assert_eq!(r.ancestors("c2").unwrap(), ["b", "c1", "c2"]);
        assert_eq!(r.ancestors("b").unwrap(), ["b"]);
        assert_eq!(r.dependents("b"), ["c1"]);
        assert!(r.check_graph().is_ok());
    }

    #[test]
    fn cycles_and_missing_parents_are_errors() {
        let r = registry(&[("a", cast("b")), ("b", cast("a")), ("c", cast("zz")), ("d", cast("d"))]);
        assert!(matches!(r.ancestors("a"), Err(Error::Cycle(_))));
        assert!(matches!(r.ancestors("d"), Err(Error::Cycle(_))));
        assert!(matches!(r.ancestors("c"), Err(Error::MissingBase { .. })));
        assert!(matches!(r.ancestors("nope"), Err(Error::NotFound(_))));
        assert!(r.check_graph().is_err());
    }
}
