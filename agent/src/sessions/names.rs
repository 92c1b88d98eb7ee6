//! Interned names for the session table: a million sessions typically share a few
//! IdPs, boots and group lists, and often users, so each distinct one is kept once and
//! a session holds its number. Names nobody uses any more are dropped when the table
//! rebuilds them (`SessionTable`).

use std::{hash::BuildHasher, sync::Arc};

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};

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
    lists: Vec<Arc<[String]>>,
    index: HashMap<Arc<[String]>, u32>,
}

impl GroupLists {
    /// The number of `groups`, added if new.
    pub fn intern(&mut self, groups: &[String]) -> u32 {
        if let Some(&id) = self.index.get(groups) {
            return id;
        }
        let id = self.lists.len() as u32;
        let list: Arc<[String]> = groups.into();
        self.lists.push(Arc::clone(&list));
        self.index.insert(list, id);
        id
    }

    pub fn get(&self, id: u32) -> &[String] {
        &self.lists[id as usize]
    }

    pub fn len(&self) -> usize {
        self.lists.len()
    }
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
        let ab = lists.intern(&["a".into(), "b".into()]);
        let ba = lists.intern(&["b".into(), "a".into()]);
        let none = lists.intern(&[]);
        assert_eq!(lists.intern(&["a".into(), "b".into()]), ab);
        assert_ne!(ab, ba);
        assert_eq!(lists.get(ba), ["b", "a"]);
        assert!(lists.get(none).is_empty());
        assert_eq!(lists.len(), 3);
    }
}
