//! Refused new flows per policy, as totals that survive reloads and restarts.
//!
//! The kernel counts refusals per slot of a configuration set (`SG_POLICY_DROPS`,
//! `policy_slot(set, index)`). A reload writes the set not in force and switches to it;
//! a restart adopts both sets as they are. Which policy a slot counts for is known only
//! here: `PolicyDrops` keeps the names of each set's policies by index, and the counts of
//! sets since overwritten ("retired") by name. A set's counts are folded into the
//! totals just before it is overwritten, so a policy kept across a reload, whatever its
//! index, keeps its count, and a policy removed keeps its past total.
//!
//! The record is written to `state_dir/policy_drops.json` (synced, renamed into place)
//! before each switch, so that an agent adopting the datapath knows what its two sets
//! hold. It belongs to the datapath that counted (the kernel id of its
//! `SG_POLICY_DROPS`): a new datapath (after a reboot, `detach` or `run --replace`)
//! starts from zero, as its verdict counters do.
//!
//! A crash between writing the record and switching leaves the record one generation
//! ahead of the kernel: the set it was about to write had its counts folded in already,
//! so its slots are left out. One behind (the record could not be written): the set
//! switched to is not known, and neither are its counts since the switch.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use agent_common::maps::{Settings, config_set};
use serde::{Deserialize, Serialize};

use crate::{
    datapath::{DatapathError, Maps, next_generation},
    policy::PolicyTable,
};

/// The record's file in `state_dir`.
pub const FILE_NAME: &str = "policy_drops.json";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    /// Kernel id of the `SG_POLICY_DROPS` map that counted.
    map_id: u32,
    /// `SG_GENERATION` the record describes.
    generation: u32,
    /// Each set's policy names by index; empty when not known (its counts are left out).
    sets: [Vec<String>; 2],
    /// Refused flows counted by sets since overwritten, by policy name.
    retired: BTreeMap<String, u64>,
}

pub struct PolicyDrops {
    path: PathBuf,
    record: Record,
}

impl PolicyDrops {
    /// The record for a datapath whose `SG_POLICY_DROPS` has kernel id `map_id` and
    /// whose generation in force is `generation`, as far as `state_dir` knows it.
    pub fn open(state_dir: &Path, map_id: u32, generation: u32) -> Self {
        let path = state_dir.join(FILE_NAME);
        let saved = match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Record>(&bytes) {
                Ok(record) => Some(record),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the per-policy refusal counts; they start from zero");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the per-policy refusal counts; they start from zero");
                None
            }
        };
        let record = match saved {
            Some(saved) if saved.map_id == map_id => reconcile(saved, generation),
            Some(_) => {
                tracing::info!(
                    "per-policy refusal counts start from zero: the ones recorded belong to a datapath no longer loaded"
                );
                fresh(map_id, generation)
            }
            None => fresh(map_id, generation),
        };
        Self { path, record }
    }

    /// The policy of set `set` at `index` (refusal events name it).
    pub fn name(&self, set: u32, index: u32) -> Option<&str> {
        self.record.sets[set as usize & 1]
            .get(index as usize)
            .map(String::as_str)
    }

    /// Puts a configuration in force (`Maps::apply`), whose policies are `names` by
    /// index: the counts of the set it overwrites are folded into the totals and the
    /// record written first.
    pub fn apply(
        &mut self,
        maps: &mut Maps,
        settings: Settings,
        table: &PolicyTable,
        names: Vec<String>,
    ) -> Result<(), DatapathError> {
        let set = config_set(next_generation(maps.generation()));
        let known = self.record.sets[set as usize].len();
        let (next, outgoing) = maps.outgoing_policy_drops(known)?;
        self.switching(next, &outgoing, names);
        maps.apply(settings, table).inspect_err(|_| {
            self.not_switched(maps.generation());
        })
    }

    /// The switch to generation `next` is about to overwrite its set, whose slots
    /// counted `outgoing`: those go into the totals, and the set will hold `names`.
    fn switching(&mut self, next: u32, outgoing: &[u64], names: Vec<String>) {
        let set = config_set(next) as usize;
        let old = std::mem::replace(&mut self.record.sets[set], names);
        for (name, n) in old.into_iter().zip(outgoing) {
            if *n > 0 {
                *self.record.retired.entry(name).or_default() += n;
            }
        }
        self.record.generation = next;
        self.save();
    }

    /// The switch did not happen; the generation in force is still `generation`. The
    /// set it was to overwrite holds nothing counted any more.
    fn not_switched(&mut self, generation: u32) {
        let set = config_set(next_generation(generation)) as usize;
        self.record.sets[set].clear();
        self.record.generation = generation;
        self.save();
    }

    /// Refused flows per policy name: the retired totals plus what each set counts now
    /// (`live[set]`, by index).
    pub fn totals(&self, live: [&[u64]; 2]) -> Vec<(String, u64)> {
        let mut totals = self.record.retired.clone();
        for (names, counts) in self.record.sets.iter().zip(live) {
            for (name, n) in names.iter().zip(counts) {
                *totals.entry(name.clone()).or_default() += n;
            }
        }
        totals.into_iter().collect()
    }

    /// How many policies of set `set` have known names (the slots worth reading).
    pub fn known(&self, set: u32) -> usize {
        self.record.sets[set as usize & 1].len()
    }

    /// Writes the record atomically. A failure is logged: the totals in memory stay
    /// right, and only a restart before the next successful write loses some.
    fn save(&self) {
        if let Err(e) = write_atomically(&self.path, &self.record) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot record the per-policy refusal counts; a restart before the next reload would lose some");
        }
    }
}

fn fresh(map_id: u32, generation: u32) -> Record {
    Record {
        map_id,
        generation,
        ..Record::default()
    }
}

/// The record as it stands for a kernel at `generation` (see the module notes).
fn reconcile(mut saved: Record, generation: u32) -> Record {
    if saved.generation == generation {
        return saved;
    }
    if next_generation(generation) == saved.generation {
        // Recorded, never switched to: that set's counts are in the totals already.
        saved.sets[config_set(saved.generation) as usize].clear();
    } else if next_generation(saved.generation) == generation {
        // Switched to, never recorded: what that set holds is not known.
        saved.sets[config_set(generation) as usize].clear();
        tracing::warn!(
            "the last reload's per-policy refusal counts were not recorded; those since it are left out"
        );
    } else {
        saved.sets = Default::default();
        tracing::warn!(
            recorded = saved.generation,
            generation,
            "the per-policy refusal counts were recorded for another configuration generation; the current ones are left out, the totals before them kept"
        );
    }
    saved.generation = generation;
    saved
}

fn write_atomically(path: &Path, record: &Record) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        serde_json::to_writer(&mut file, record)?;
        file.write_all(b"\n")?;
        file.sync_data()?;
        fs::rename(&tmp, path)?;
        match path.parent() {
            Some(dir) => fs::File::open(dir)?.sync_all(),
            None => Ok(()),
        }
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests;
