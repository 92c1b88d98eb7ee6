//! Devices' identity masks in the kernel (`SG_IDENTITIES_0/1`, one `u64` per slot and
//! set; layout in `agent_common::maps`), owned by the session maps: every session
//! written takes a fresh slot whose masks are written first, and its previous slot is
//! freed after, so the program never pairs a session with masks that are not its own.
//! A reload writes every device's mask of the set it is about to put in force
//! (`prepare`) before the flip.

use std::{collections::VecDeque, os::fd::AsFd};

use agent_common::maps::{IDENTITY_NONE, names};
use aya::maps::{Array, IterableMap, MapData};

use super::{
    DatapathError,
    maps::{MapSource, map_err, typed},
    sys,
};
use crate::config::{
    Identity, IdentityCondition, Limits,
    identity::{mask_of, masks_of},
};

/// Slots beyond two per device limit (one per family): a replaced session holds its
/// old slot until its new one is written.
const SPARE_SLOTS: u32 = 1024;

/// `SG_IDENTITIES_*` entries for `limits`.
pub fn slots_for(limits: &Limits) -> u32 {
    limits
        .max_sessions
        .saturating_mul(2)
        .saturating_add(SPARE_SLOTS)
}

/// Each set's identity-conditioned policies' conditions, in bit order. `None`: not
/// known (a set written by an earlier agent), so a device's mask in it is copied from
/// its previous slot rather than computed.
pub type SetConditions = [Option<Vec<IdentityCondition>>; 2];

pub struct Identities {
    masks: [Array<MapData, u64>; 2],
    conditions: SetConditions,
    /// Never-used slots are handed out first, then freed ones oldest first: a slot is
    /// reused as late as possible.
    next: u32,
    freed: VecDeque<u32>,
    /// Which slots are handed out: a slot freed twice (after a failure left the
    /// caller unsure) is still handed out once.
    taken: Vec<bool>,
    capacity: u32,
}

impl Identities {
    /// `used`: the slots the sessions already in the kernel hold (an adopted datapath).
    pub(super) fn open(
        source: &mut MapSource<'_>,
        limits: &Limits,
        used: &[u32],
    ) -> Result<Self, DatapathError> {
        let mut identities = Self {
            masks: [
                typed(source, names::IDENTITIES[0])?,
                typed(source, names::IDENTITIES[1])?,
            ],
            conditions: [None, None],
            next: 1,
            freed: VecDeque::new(),
            taken: Vec::new(),
            capacity: slots_for(limits),
        };
        identities.reset_used(used);
        Ok(identities)
    }

    /// Makes `used` the slots in use, every other one free: the kernel's sessions hold
    /// exactly these (read back at start-up, or after a batch failed part-way).
    pub(super) fn reset_used(&mut self, used: &[u32]) {
        let mut taken = vec![false; self.capacity as usize];
        for &slot in used {
            if let Some(t) = taken.get_mut(slot as usize) {
                *t = true;
            }
        }
        self.next = used.iter().max().map_or(1, |m| m + 1).max(1);
        self.freed = (1..self.next).filter(|s| !taken[*s as usize]).collect();
        self.taken = taken;
    }

    /// The conditions of both sets, as this agent's config has them (start-up). A set
    /// in force from an earlier agent may be left `None`.
    pub fn set_conditions(&mut self, conditions: SetConditions) {
        self.conditions = conditions;
    }

    /// A fresh slot for `who`, its masks written for both sets (copied from `previous`
    /// where a set's conditions are unknown; none for a set without conditions).
    pub(super) fn claim(
        &mut self,
        who: &Identity<'_>,
        previous: Option<u32>,
    ) -> Result<u32, DatapathError> {
        let slot = self.allocate()?;
        for set in 0..2 {
            if self.conditions[set].as_ref().is_some_and(Vec::is_empty) {
                continue;
            }
            let mask = self.mask(set, who, previous);
            if let Err(e) = self.masks[set].set(slot, mask, 0) {
                // No session holds the slot yet: it is free again.
                self.release(slot);
                return Err(map_err(names::IDENTITIES[set])(e));
            }
        }
        Ok(slot)
    }

    /// Fresh slots for many devices, their masks written in batches.
    pub(super) fn claim_many(
        &mut self,
        who: &[(Identity<'_>, Option<u32>)],
    ) -> Result<Vec<u32>, DatapathError> {
        let mut slots = Vec::with_capacity(who.len());
        for _ in who {
            match self.allocate() {
                Ok(slot) => slots.push(slot),
                Err(e) => {
                    slots.into_iter().for_each(|s| self.release(s));
                    return Err(e);
                }
            }
        }
        for set in 0..2 {
            let masks: Vec<u64> = match &self.conditions[set] {
                // A set without conditions never reads its masks (`forget`).
                Some(conditions) if conditions.is_empty() => continue,
                Some(conditions) => masks_of(conditions, who.iter().map(|(w, _)| w)),
                None => who
                    .iter()
                    .map(|(identity, previous)| self.mask(set, identity, *previous))
                    .collect(),
            };
            let written = sys::update_batch(self.masks[set].map().fd().as_fd(), &slots, &masks);
            if let Err(source) = written {
                slots.into_iter().for_each(|s| self.release(s));
                return Err(DatapathError::Batch {
                    map: names::IDENTITIES[set],
                    source,
                });
            }
        }
        Ok(slots)
    }

    /// Frees the slot of a session no longer in the kernel.
    pub(super) fn release(&mut self, slot: u32) {
        if let Some(taken) = self.taken.get_mut(slot as usize)
            && *taken
            && slot != IDENTITY_NONE
        {
            *taken = false;
            self.freed.push_back(slot);
        }
    }

    /// Writes set `set`'s mask of every device (`masks[i]` to slot `slots[i]`), computed
    /// for `conditions`, before the set is put in force.
    pub fn prepare(
        &mut self,
        set: usize,
        conditions: Vec<IdentityCondition>,
        slots: &[u32],
        masks: &[u64],
    ) -> Result<(), DatapathError> {
        sys::update_batch(self.masks[set].map().fd().as_fd(), slots, masks).map_err(|source| {
            DatapathError::Batch {
                map: names::IDENTITIES[set],
                source,
            }
        })?;
        self.conditions[set] = Some(conditions);
        Ok(())
    }

    /// A set without identity conditions: its masks are never read (it has no identity
    /// answers), so they are neither computed nor written until it gets some.
    pub fn forget(&mut self, set: usize) {
        self.conditions[set] = Some(Vec::new());
    }

    fn mask(&self, set: usize, who: &Identity<'_>, previous: Option<u32>) -> u64 {
        match (&self.conditions[set], previous) {
            (Some(conditions), _) => mask_of(conditions, who),
            (None, Some(old)) => self.masks[set].get(&old, 0).unwrap_or(0),
            (None, None) => 0,
        }
    }

    fn allocate(&mut self) -> Result<u32, DatapathError> {
        let slot = if self.next < self.capacity {
            self.next += 1;
            self.next - 1
        } else {
            self.freed
                .pop_front()
                .ok_or(DatapathError::IdentitySlotsFull {
                    limit: self.capacity,
                })?
        };
        self.taken[slot as usize] = true;
        Ok(slot)
    }
}
