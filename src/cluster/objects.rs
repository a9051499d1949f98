//! The objects of one listing or informer, by name and namespace.
//!
//! One listing can cover many namespaces (`cluster.namespaces = ["*"]`: one cluster-wide
//! listing and one informer per backend), and two namespaces can hold objects of the same
//! name. [`ObjectMap`] keeps one entry per namespace and name, so a deletion of `ns-a/x`
//! removes that object only and `ns-b/x` still protects its row. What the sweep looks at stays
//! by name ([`ObjectMap::get`], [`ObjectMap::iter`]): a name is present while an object of
//! that name exists in any watched namespace, exactly as the confirming GETs see it.
//!
//! Namespaces are interned (an object refers to its namespace by index), so the common case,
//! one namespace per name, costs a few bytes more than a map by name.

use super::{NameMap, ObjectFacts};

/// Where one name exists: the first namespace, and any others.
#[derive(Debug, Clone)]
struct Placements {
    first: (u32, ObjectFacts),
    more: Vec<(u32, ObjectFacts)>,
}

impl Placements {
    fn iter(&self) -> impl Iterator<Item = &(u32, ObjectFacts)> {
        std::iter::once(&self.first).chain(self.more.iter())
    }

    /// The facts of the name, merged over namespaces as [`BackendView::insert`] merges them.
    ///
    /// [`BackendView::insert`]: crate::snapshot::BackendView::insert
    fn merged(&self) -> ObjectFacts {
        let mut facts = self.first.1;
        for (_, f) in &self.more {
            facts.terminating |= f.terminating;
            facts.suspended |= f.suspended;
            facts.managed |= f.managed;
        }
        facts
    }
}

/// Objects keyed by namespace and name; looked up by name.
#[derive(Debug, Clone, Default)]
pub struct ObjectMap {
    namespaces: Vec<Box<str>>,
    namespace_index: NameMap<u32>,
    by_name: NameMap<Placements>,
    objects: usize,
}

impl ObjectMap {
    fn namespace_id(&mut self, namespace: &str) -> u32 {
        if let Some(id) = self.namespace_index.get(namespace) {
            return *id;
        }
        let id = self.namespaces.len() as u32;
        self.namespaces.push(namespace.into());
        self.namespace_index.insert(namespace.into(), id);
        id
    }

    /// Adds or replaces the object `namespace/name`.
    pub fn insert(&mut self, namespace: &str, name: &str, facts: ObjectFacts) {
        let ns = self.namespace_id(namespace);
        match self.by_name.get_mut(name) {
            None => {
                self.by_name.insert(
                    name.into(),
                    Placements {
                        first: (ns, facts),
                        more: Vec::new(),
                    },
                );
                self.objects += 1;
            }
            Some(p) if p.first.0 == ns => p.first.1 = facts,
            Some(p) => match p.more.iter_mut().find(|(n, _)| *n == ns) {
                Some(entry) => entry.1 = facts,
                None => {
                    p.more.push((ns, facts));
                    self.objects += 1;
                }
            },
        }
    }

    /// Removes the object `namespace/name`; objects of that name in other namespaces stay.
    /// Returns whether it was there.
    pub fn remove(&mut self, namespace: &str, name: &str) -> bool {
        let Some(ns) = self.namespace_index.get(namespace).copied() else {
            return false;
        };
        let Some(p) = self.by_name.get_mut(name) else {
            return false;
        };
        if p.first.0 == ns {
            match p.more.pop() {
                Some(last) => p.first = last,
                None => {
                    self.by_name.remove(name);
                }
            }
        } else {
            let Some(i) = p.more.iter().position(|(n, _)| *n == ns) else {
                return false;
            };
            p.more.swap_remove(i);
        }
        self.objects -= 1;
        true
    }

    /// The facts of `name` when it exists in any namespace (merged over namespaces).
    pub fn get(&self, name: &str) -> Option<ObjectFacts> {
        self.by_name.get(name).map(Placements::merged)
    }

    /// The namespaces holding an object named `name`.
    pub fn namespaces_of(&self, name: &str) -> Vec<&str> {
        self.by_name
            .get(name)
            .map(|p| {
                p.iter()
                    .map(|(ns, _)| &*self.namespaces[*ns as usize])
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Objects (a name in two namespaces counts twice).
    pub fn len(&self) -> usize {
        self.objects
    }

    pub fn is_empty(&self) -> bool {
        self.objects == 0
    }

    /// Distinct names.
    pub fn names(&self) -> usize {
        self.by_name.len()
    }

    /// Every name with its facts merged over namespaces.
    pub fn iter(&self) -> impl Iterator<Item = (&str, ObjectFacts)> {
        self.by_name.iter().map(|(k, p)| (&**k, p.merged()))
    }

    pub fn clear(&mut self) {
        self.by_name.clear();
        self.objects = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_stays_while_any_namespace_holds_it() {
        let mut map = ObjectMap::default();
        let live = ObjectFacts::default();
        let terminating = ObjectFacts {
            terminating: true,
            ..ObjectFacts::default()
        };
        map.insert("ns-a", "x", live);
        map.insert("ns-b", "x", terminating);
        map.insert("ns-b", "y", live);
        assert_eq!((map.len(), map.names()), (3, 2));
        assert!(map.get("x").is_some_and(|f| f.terminating));
        assert_eq!(map.namespaces_of("x"), ["ns-a", "ns-b"]);
        assert!(map.remove("ns-a", "x"));
        assert!(!map.remove("ns-a", "x"), "already gone");
        assert!(!map.remove("ns-c", "x"), "never there");
        assert_eq!(map.get("x"), Some(terminating));
        assert_eq!(map.namespaces_of("x"), ["ns-b"]);
        map.insert("ns-b", "x", live);
        assert_eq!(map.get("x"), Some(live), "replaced, not added");
        assert_eq!(map.len(), 2);
        assert!(map.remove("ns-b", "x"));
        assert_eq!(map.get("x"), None);
        assert_eq!((map.len(), map.names()), (1, 1));
        // Removing the first of three keeps the other two.
        for ns in ["a", "b", "c"] {
            map.insert(ns, "z", live);
        }
        assert!(map.remove("a", "z"));
        let mut left = map.namespaces_of("z");
        left.sort();
        assert_eq!(left, ["b", "c"]);
        map.clear();
        assert!(map.is_empty() && map.get("y").is_none());
    }
}
