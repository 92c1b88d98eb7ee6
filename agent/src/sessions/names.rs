//! Interned names for the session table: a million sessions typically share a few
//! IdPs, boots and group lists, and often users, so each distinct one is kept once and
//! a session holds its number. Names nobody uses any more are dropped when the table
//! rebuilds them (`SessionTable`).

use std::hash::{BuildHasher, Hash, Hasher};

use hashbrown::{DefaultHashBuilder, HashTable};

/// Strings, each kept once in one buffer, numbered from 0 in the order first seen.
#[derive(Default)]
pub(super) struct Names {
    text: String,
    /// Where name `i` ends in `text` (it starts where `i - 1` ends).
    ends: Vec<u32>,
    /// Name numbers, found by the hash of their text.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
}

impl Names {
    /// The number of `name`, added if new.
    pub fn intern(&mut self, name: &str) -> u32 {
        let hash = self.hasher.hash_one(name);
        let Self {
            text, ends, index, ..
        } = self;
        let found = index.find(hash, |&id| slice(text, ends, id) == name);
        if let Some(&id) = found {
            return id;
        }
        let id = ends.len() as u32;
        text.push_str(name);
        ends.push(text.len() as u32);
        let hasher = &self.hasher;
        index.insert_unique(hash, id, |&id| hasher.hash_one(slice(text, ends, id)));
        id
    }

    pub fn get(&self, id: u32) -> &str {
        slice(&self.text, &self.ends, id)
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }
}

fn slice<'a>(text: &'a str, ends: &[u32], id: u32) -> &'a str {
    let end = ends[id as usize] as usize;
    let start = match id {
        0 => 0,
        _ => ends[id as usize - 1] as usize,
    };
    &text[start..end]
}

/// Group lists, each distinct list (in the IdP's order) kept once.
#[derive(Default)]
pub(super) struct GroupLists {
    lists: Vec<Box<[String]>>,
    /// List numbers, found by the hash of their groups.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
}

impl GroupLists {
    /// The number of `groups` (`String`s or `&str`s), added if new.
    pub fn intern<G: AsRef<str>>(&mut self, groups: &[G]) -> u32 {
        let hash = hash_list(&self.hasher, groups);
        let Self { lists, index, .. } = self;
        let same = |list: &[String]| {
            list.len() == groups.len() && list.iter().zip(groups).all(|(a, b)| a == b.as_ref())
        };
        if let Some(&id) = index.find(hash, |&id| same(&lists[id as usize])) {
            return id;
        }
        let id = lists.len() as u32;
        lists.push(groups.iter().map(|g| g.as_ref().to_owned()).collect());
        let hasher = &self.hasher;
        index.insert_unique(hash, id, |&id| hash_list(hasher, &lists[id as usize]));
        id
    }

    pub fn get(&self, id: u32) -> &[String] {
        &self.lists[id as usize]
    }

    pub fn len(&self) -> usize {
        self.lists.len()
    }
}

/// One hash for a list of groups, the same whether they are `String`s or `&str`s.
fn hash_list<G: AsRef<str>>(hasher: &DefaultHashBuilder, groups: &[G]) -> u64 {
    let mut state = hasher.build_hasher();
    groups.len().hash(&mut state);
    for group in groups {
        group.as_ref().hash(&mut state);
    }
    state.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_name_is_kept_once_and_read_back_by_its_number() {
        let mut names = Names::default();
        let alice = names.intern("alice@example.com");
        let okta = names.intern("okta");
        assert_eq!(names.intern("alice@example.com"), alice);
        assert_ne!(alice, okta);
        assert_eq!(names.get(alice), "alice@example.com");
        assert_eq!(names.get(okta), "okta");
        let empty = names.intern("");
        assert_eq!(names.get(empty), "");
        for i in 0..10_000 {
            names.intern(&format!("user{i}"));
        }
        assert_eq!(names.len(), 10_003);
        let last = names.intern("user9999");
        assert_eq!(names.get(last), "user9999");
        assert_eq!(names.get(okta), "okta");
    }

    #[test]
    fn group_lists_are_kept_once_in_their_order() {
        let mut lists = GroupLists::default();
        let ab = lists.intern(&["a", "b"]);
        let ba = lists.intern(&["b", "a"]);
        let none = lists.intern::<&str>(&[]);
        // Owned or borrowed, the same list is the same number.
        assert_eq!(lists.intern(&[String::from("a"), String::from("b")]), ab);
        assert_eq!(lists.intern::<String>(&[]), none);
        assert_ne!(ab, ba);
        // A list is not its groups run together.
        assert_ne!(lists.intern(&["ab"]), ab);
        assert_eq!(lists.get(ba), ["b", "a"]);
        assert!(lists.get(none).is_empty());
        assert_eq!(lists.len(), 4);
    }
}
