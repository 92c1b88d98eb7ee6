//! The UDP flow tables (`SG_FLOWS_V4/V6`, bucketed, written by the program): counting
//! the active flows, carrying them over to a replacement datapath, and filling them
//! for benchmarks.

use std::os::fd::AsFd;

use agent_common::{
    hashing::bucket,
    logic::flow_active,
    maps::{FlowBucketV4, FlowBucketV6, WAYS, names},
    tables::FlowSlot,
};
use aya::maps::{Array, IterableMap, MapData};

use super::Maps;
use crate::datapath::{DatapathError, sys};
#[cfg(feature = "bench")]
use {super::map_err, agent_common::maps::FlowKeyV4};

impl Maps {
    /// Adds tracked IPv4 UDP flows as the program would have admitted them at
    /// `last_seen_ns` (benchmarks fill the table with this). Flows whose bucket is
    /// full are left out, as the program would have evicted them.
    #[cfg(feature = "bench")]
    pub fn track_flows_v4(
        &mut self,
        flows: impl IntoIterator<Item = FlowKeyV4>,
        last_seen_ns: u64,
    ) -> Result<(), DatapathError> {
        let mask = self.geometry.flow_buckets - 1;
        let mut buckets: std::collections::HashMap<u32, FlowBucketV4> =
            std::collections::HashMap::new();
        for key in flows {
            let folded = <agent_common::maps::FlowSlotV4 as FlowSlot>::fold(&key);
            let b = buckets.entry(bucket(folded, mask)).or_default();
            if let Some(free) = b.slots.iter_mut().find(|s| s.check == 0) {
                *free = FlowSlot::new(&key, folded, last_seen_ns);
            }
        }
        for (index, b) in buckets {
            self.flows_v4
                .set(index, b, 0)
                .map_err(map_err(names::FLOWS_V4))?;
        }
        Ok(())
    }

    /// Copies the tracked UDP flows of another datapath of this layout (pinned in
    /// `flows_v4`/`flows_v6`, any size) into these flow tables, each into its bucket
    /// under this geometry; a bucket that overflows keeps its most recently seen flows.
    /// Returns how many flows were copied.
    pub fn copy_flows_from(
        &mut self,
        flows_v4: &Array<MapData, FlowBucketV4>,
        flows_v6: &Array<MapData, FlowBucketV6>,
    ) -> Result<usize, DatapathError> {
        let mask = self.geometry.flow_buckets - 1;
        let read_error = |map| move |source| DatapathError::Batch { map, source };
        let mut buckets4: std::collections::HashMap<u32, FlowBucketV4> = Default::default();
        sys::read_array(flows_v4.map().fd().as_fd(), |chunk: &[FlowBucketV4]| {
            for slot in chunk.iter().flat_map(|b| b.slots) {
                rehash(&mut buckets4, slot, mask, |b| &mut b.slots);
            }
        })
        .map_err(read_error(names::FLOWS_V4))?;
        let mut buckets6: std::collections::HashMap<u32, FlowBucketV6> = Default::default();
        sys::read_array(flows_v6.map().fd().as_fd(), |chunk: &[FlowBucketV6]| {
            for slot in chunk.iter().flat_map(|b| b.slots) {
                rehash(&mut buckets6, slot, mask, |b| &mut b.slots);
            }
        })
        .map_err(read_error(names::FLOWS_V6))?;
        let copied = buckets4
            .values()
            .map(|b| b.slots.iter().filter(|s| s.check != 0).count())
            .sum::<usize>()
            + buckets6
                .values()
                .map(|b| b.slots.iter().filter(|s| s.check != 0).count())
                .sum::<usize>();
        let (index4, values4): (Vec<u32>, Vec<FlowBucketV4>) = buckets4.into_iter().unzip();
        sys::update_batch(self.flows_v4.map().fd().as_fd(), &index4, &values4)
            .map_err(read_error(names::FLOWS_V4))?;
        let (index6, values6): (Vec<u32>, Vec<FlowBucketV6>) = buckets6.into_iter().unzip();
        sys::update_batch(self.flows_v6.map().fd().as_fd(), &index6, &values6)
            .map_err(read_error(names::FLOWS_V6))?;
        Ok(copied)
    }

    /// Tracked UDP flows (IPv4, IPv6) still active at boot-clock `now_ns`. Reads the
    /// flow tables from their memory: cheap enough for every metrics scrape.
    pub fn flow_count(&self, now_ns: u64) -> (usize, usize) {
        let idle = self.current.udp_idle_ns;
        let v4 = sum_mapped(self.flows_v4.map(), |b: &FlowBucketV4| {
            active_flows(&b.slots, now_ns, idle)
        });
        let v6 = sum_mapped(self.flows_v6.map(), |b: &FlowBucketV6| {
            active_flows(&b.slots, now_ns, idle)
        });
        if let Some(e) = v4.as_ref().err().or(v6.as_ref().err()) {
            tracing::warn!(error = %e, "cannot read the flow tables; flow counts are partial");
        }
        (v4.unwrap_or(0), v6.unwrap_or(0))
    }
}

/// Puts a flow slot (if in use) into its bucket under `mask`, replacing the least
/// recently seen slot when the bucket is full.
fn rehash<B: Default, S: FlowSlot>(
    buckets: &mut std::collections::HashMap<u32, B>,
    slot: S,
    mask: u32,
    slots: impl Fn(&mut B) -> &mut [S; WAYS],
) {
    if slot.check() == 0 {
        return;
    }
    let index = bucket(S::fold(slot.key()), mask);
    let ways = slots(buckets.entry(index).or_default());
    let target = ways.iter().position(|s| s.check() == 0).or_else(|| {
        let (oldest, s) = ways
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.last_seen_ns())?;
        (s.last_seen_ns() < slot.last_seen_ns()).then_some(oldest)
    });
    if let Some(i) = target {
        ways[i] = slot;
    }
}

/// `count` of every bucket of a mappable flow table, summed, read from its memory.
fn sum_mapped<B: aya::Pod>(map: &MapData, count: impl Fn(&B) -> usize) -> std::io::Result<usize> {
    let table = sys::MappedArray::<B>::open(map, false)?;
    Ok((0..table.len()).map(|i| count(&table.get(i))).sum())
}

fn active_flows<S: FlowSlot>(slots: &[S], now_ns: u64, idle_ns: u64) -> usize {
    slots
        .iter()
        .filter(|s| s.check() != 0 && flow_active(now_ns, s.last_seen_ns(), idle_ns))
        .count()
}
