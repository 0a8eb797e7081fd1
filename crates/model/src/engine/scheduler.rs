//! Which sequences run at each step: [`Scheduler`] admits waiting requests up to the
//! sequences-in-flight and key/value budgets, prefills each distinct prompt once, forks its
//! samples off the prompt's blocks, and frees a sequence's blocks the step it ends, so a waiting
//! request takes the slot at the next step.
//!
//! Admission reserves a request's worst case (`prompt + max_new_tokens` positions) against the
//! block budget, so a running sequence never waits for memory and nothing is ever preempted;
//! the blocks themselves are taken only as positions are written.

use std::collections::{HashMap, VecDeque};

use super::block_cache::{BLOCK_SIZE, BlockCache};
use super::sequence::Decoding;

/// A distinct prompt: prefilled once, its blocks shared by its samples.
#[derive(Debug)]
pub(super) struct Group {
    pub prompt: Vec<u32>,
    pub blocks: Vec<u32>,
    /// Prompt positions already cached.
    pub prefilled: usize,
    /// Logits after the last prompt token, once prefilled.
    pub logits: Option<Vec<f32>>,
    /// Samples of the group not yet forked off the prompt.
    pub unforked: usize,
}

/// A request in flight.
#[derive(Debug)]
pub(super) struct Seq {
    pub request: usize,
    pub group: usize,
    pub decoding: Decoding,
    pub table: Vec<u32>,
    /// Positions cached (the next token goes at this position).
    pub len: usize,
    reserved: usize,
}

/// One row of a step.
#[derive(Debug, Clone, Copy)]
pub(super) enum RowKind {
    /// A prompt token of group `.0`; `.1` when it is the last one (its logits start the samples).
    Prefill(usize, bool),
    /// The next token of running sequence `.0`.
    Decode(usize),
}

/// The rows of one step.
#[derive(Debug, Default)]
pub(super) struct Plan {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub tables: Vec<Vec<u32>>,
    pub kinds: Vec<RowKind>,
}

/// The state of one engine run.
#[derive(Debug)]
pub(super) struct Scheduler {
    pub groups: Vec<Group>,
    group_of: Vec<usize>,
    seeds: Vec<(u64, u64)>,
    waiting: VecDeque<usize>,
    /// Admitted, waiting for their prompt's logits.
    pub joining: Vec<Seq>,
    pub running: Vec<Seq>,
    max_seqs: usize,
    budget_blocks: usize,
    reserved: usize,
    max_new_tokens: usize,
    prefill_chunk: usize,
}

/// Blocks covering `positions`.
fn blocks_for(positions: usize) -> usize {
    positions.div_ceil(BLOCK_SIZE)
}

impl Scheduler {
    /// Requests `prompts[i]` drawing from `seeds[i]` = (seed, stream), in this order.
    pub fn new(
        prompts: &[Vec<u32>],
        seeds: Vec<(u64, u64)>,
        max_seqs: usize,
        budget_blocks: usize,
        max_new_tokens: usize,
        prefill_chunk: usize,
    ) -> Self {
        let mut index: HashMap<&[u32], usize> = HashMap::new();
        let mut groups: Vec<Group> = Vec::new();
        let group_of: Vec<usize> = prompts
            .iter()
            .map(|p| {
                let g = *index.entry(p.as_slice()).or_insert_with(|| {
                    groups.push(Group {
                        prompt: p.clone(),
                        blocks: Vec::new(),
                        prefilled: 0,
                        logits: None,
                        unforked: 0,
                    });
                    groups.len() - 1
                });
                groups[g].unforked += 1;
                g
            })
            .collect();
        // Samples of one prompt are admitted one after another so its blocks go back early;
        // the order of admission changes no token (every row is batch-invariant).
        let mut waiting: Vec<usize> = (0..prompts.len()).collect();
        waiting.sort_by_key(|&r| group_of[r]);
        Self {
            groups,
            group_of,
            seeds,
            waiting: waiting.into(),
            joining: Vec::new(),
            running: Vec::new(),
            max_seqs: max_seqs.max(1),
            budget_blocks,
            reserved: 0,
            max_new_tokens,
            prefill_chunk: prefill_chunk.max(1),
        }
    }

    /// Whether every request has finished.
    pub fn is_done(&self) -> bool {
        self.waiting.is_empty() && self.joining.is_empty() && self.running.is_empty()
    }

    /// Admits waiting requests while slots and budget allow (at least one when nothing runs).
    /// Returns the admitted sequences whose prompt is already prefilled: they fork now.
    pub fn admit(&mut self, cache: &mut BlockCache) -> Vec<Seq> {
        let mut ready = Vec::new();
        while let Some(&request) = self.waiting.front() {
            let in_flight = self.running.len() + self.joining.len() + ready.len();
            if in_flight >= self.max_seqs {
                break;
            }
            let group = self.group_of[request];
            let need = blocks_for(self.groups[group].prompt.len() + self.max_new_tokens);
            if in_flight > 0 && self.reserved + need > self.budget_blocks {
                break;
            }
            self.waiting.pop_front();
            self.reserved += need;
            let g = &mut self.groups[group];
            if g.blocks.is_empty() {
                g.blocks = (0..blocks_for(g.prompt.len()))
                    .map(|_| cache.allocate())
                    .collect();
            }
            let (seed, stream) = self.seeds[request];
            let seq = Seq {
                request,
                group,
                decoding: Decoding::new(seed, stream),
                table: Vec::new(),
                len: 0,
                reserved: need,
            };
            if g.logits.is_some() {
                ready.push(seq);
            } else {
                self.joining.push(seq);
            }
        }
        ready
    }

    /// Gives `seq` its prompt: the full blocks by reference, a copy of the partly filled one.
    /// The group lets go of its blocks once its last sample has forked.
    pub fn fork(&mut self, seq: &mut Seq, cache: &mut BlockCache) {
        let g = &mut self.groups[seq.group];
        let len = g.prompt.len();
        let full = len / BLOCK_SIZE;
        for &b in &g.blocks[..full] {
            cache.retain(b);
            seq.table.push(b);
        }
        if !len.is_multiple_of(BLOCK_SIZE) {
            seq.table.push(cache.copy_of(g.blocks[full]));
        }
        seq.len = len;
        g.unforked -= 1;
        if g.unforked == 0 {
            for b in std::mem::take(&mut g.blocks) {
                cache.release(b);
            }
            g.logits = None;
        }
    }

    /// Lets go of a finished sequence's blocks and reservation.
    pub fn retire(&mut self, seq: Seq, cache: &mut BlockCache) -> (usize, Decoding) {
        for &b in &seq.table {
            cache.release(b);
        }
        self.reserved -= seq.reserved;
        (seq.request, seq.decoding)
    }

    /// The rows of the next step: prompt chunks of groups being prefilled (up to
    /// `prefill_chunk` tokens in all), then one row per running sequence, whose table gains a
    /// block when its next position starts one.
    pub fn plan(&mut self, cache: &mut BlockCache) -> Plan {
        let mut plan = Plan::default();
        let mut budget = self.prefill_chunk;
        for (gi, g) in self.groups.iter_mut().enumerate() {
            if budget == 0 {
                break;
            }
            if g.blocks.is_empty() || g.prefilled == g.prompt.len() {
                continue;
            }
            let end = g.prompt.len().min(g.prefilled + budget);
            for pos in g.prefilled..end {
                plan.tokens.push(g.prompt[pos]);
                plan.positions.push(pos);
                plan.tables.push(g.blocks.clone());
                plan.kinds
                    .push(RowKind::Prefill(gi, pos + 1 == g.prompt.len()));
            }
            budget -= end - g.prefilled;
            g.prefilled = end;
        }
        for (i, seq) in self.running.iter_mut().enumerate() {
            if seq.len / BLOCK_SIZE >= seq.table.len() {
                seq.table.push(cache.allocate());
            }
            plan.tokens
                .push(seq.decoding.last().expect("a running sequence has a token"));
            plan.positions.push(seq.len);
            plan.tables.push(seq.table.clone());
            plan.kinds.push(RowKind::Decode(i));
        }
        plan
    }

    /// Distinct blocks the live tables need: each group's prompt blocks while it has samples to
    /// fork, each sequence's blocks up to the one its next position falls in.
    pub fn live_blocks(&self) -> usize {
        let mut seen: std::collections::HashSet<u32> = std::collections::HashSet::new();
        for g in &self.groups {
            seen.extend(g.blocks.iter().copied().take(blocks_for(g.prompt.len())));
        }
        for s in self.running.iter().chain(&self.joining) {
            seen.extend(s.table.iter().copied().take(blocks_for(s.len + 1)));
        }
        seen.len()
    }

    /// Admitted sequences of `group`, which has just been prefilled.
    pub fn take_joining(&mut self, group: usize) -> Vec<Seq> {
        let (mine, rest) = std::mem::take(&mut self.joining)
            .into_iter()
            .partition(|s| s.group == group);
        self.joining = rest;
        mine
    }
}
