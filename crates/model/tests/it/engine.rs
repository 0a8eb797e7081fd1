//! The generation engine (issue 21): a request's tokens are bit-identical alone, among 255
//! others that start and end at other steps, with its prompt shared or not; and the block cache
//! holds no more blocks than the live rows need and returns every block.

use std::path::Path;

use retort_model::{
    EngineOptions, FinishReason, Generated, GenerationParams, LoadOptions, LoadedModel, Request,
    generate_all, load,
};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures");

fn model(name: &str) -> LoadedModel {
    let dir = Path::new(FIXTURES).join(name);
    load(dir.to_str().expect("utf8 path"), &LoadOptions::default()).expect("load fixture")
}

/// 256 requests: 16 prompts of 1 to 46 tokens (some across block boundaries), 16 samples each
/// with its own seed.
fn requests(m: &LoadedModel) -> Vec<Request> {
    let vocab = m.model.config().vocab_size as u64;
    let mut state = 12_345u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    let prompts: Vec<Vec<u32>> = (0..16)
        .map(|i| {
            let len = [1, 3, 15, 16, 17, 31, 32, 33, 46][i % 9] + i / 9;
            (0..len).map(|_| (next() % vocab) as u32).collect()
        })
        .collect();
    let mut out = Vec::new();
    for sample in 0..16u64 {
        for p in &prompts {
            out.push(Request {
                prompt: p.clone(),
                seed: next(),
                stream: sample,
            });
        }
    }
    out
}

fn run(m: &LoadedModel, reqs: &[Request], p: &GenerationParams, max_seqs: usize) -> Vec<Generated> {
    let options = EngineOptions {
        max_seqs,
        ..EngineOptions::default()
    };
    let (out, stats) = generate_all(&m.model, &m.tokenizer, reqs, p, &options).expect("generate");
    assert_eq!(stats.blocks_in_use_after, 0, "every block goes back");
    assert_eq!(
        stats.max_blocks_beyond_live, 0,
        "no block held beyond live rows"
    );
    out
}

fn params(seed_eos: u32, stop: &str) -> GenerationParams {
    GenerationParams {
        max_new_tokens: 40,
        temperature: 1.0,
        top_p: 0.95,
        eos_ids: vec![seed_eos],
        stop_strings: vec![stop.to_string()],
        ..GenerationParams::default()
    }
}

/// The fixtures with an EOS id and a stop string that end some rows early.
const MODELS: [(&str, u32, &str); 3] = [
    ("qwen2-tiny", 7, "e"),
    ("qwen3-tiny", 11, "a"),
    ("llama-tiny", 5, "o"),
];

#[test]
fn a_row_is_identical_alone_among_255_others_and_joining_late() {
    for (name, eos, stop) in MODELS {
        check_invariance(&model(name), name, eos, stop);
    }
}

/// As above with the linear weights stored in bf16 (issue 15): the projections widen them
/// exactly, so a row still does not depend on the rows beside it.
#[test]
fn a_bf16_weight_row_is_identical_alone_among_255_others() {
    for (name, eos, stop) in MODELS {
        let opts = LoadOptions {
            dtype: Some(candle_core::DType::BF16),
            ..LoadOptions::default()
        };
        let dir = Path::new(FIXTURES).join(name);
        let m = load(dir.to_str().expect("utf8 path"), &opts).expect("load fixture");
        assert_eq!(m.model.weight_dtype(), candle_core::DType::BF16);
        check_invariance(&m, &format!("{name} bf16"), eos, stop);
    }
}

fn check_invariance(m: &LoadedModel, name: &str, eos: u32, stop: &str) {
    let reqs = requests(m);
    let p = params(eos, stop);
    let all = run(m, &reqs, &p, 0);
    // 7 in flight: rows join at many different steps, beside other prompts' prefill.
    let few = run(m, &reqs, &p, 7);
    assert_eq!(all, few, "{name}: 256 in flight vs 7 in flight");
    // Alone, each sample prefilling its prompt by itself (no sharing), for 24 rows.
    for i in (0..reqs.len()).step_by(11) {
        let alone = run(m, std::slice::from_ref(&reqs[i]), &p, 1);
        assert_eq!(alone[0], all[i], "{name}: row {i} alone vs among 255");
    }
    let stopped = all
        .iter()
        .filter(|g| g.finish_reason == FinishReason::Stop)
        .count();
    let lengths: std::collections::BTreeSet<usize> =
        all.iter().map(|g| g.token_ids.len()).collect();
    println!(
        "{name}: 256 rows identical; {stopped} stopped early, {} distinct lengths",
        lengths.len()
    );
    assert!(
        stopped > 0 && lengths.len() > 5,
        "{name}: rows end at different steps"
    );
}

#[test]
fn shared_prompt_samples_equal_unshared_ones() {
    let m = model("qwen2-tiny");
    let reqs = requests(&m);
    let p = params(7, "zz");
    let shared = run(&m, &reqs, &p, 0);
    // The same requests, each prompt made distinct by where it sits: one request per run of
    // 16, so no two requests in flight share a prompt.
    for chunk in 0..16 {
        let mine: Vec<Request> = reqs.iter().skip(chunk).step_by(16).cloned().collect();
        let out = run(&m, &mine, &p, 0);
        for (k, g) in out.iter().enumerate() {
            assert_eq!(*g, shared[chunk + 16 * k], "request {}", chunk + 16 * k);
        }
    }
}

#[test]
fn the_cache_follows_live_tokens() {
    let m = model("qwen2-tiny");
    let reqs = requests(&m);
    let p = GenerationParams {
        max_new_tokens: 40,
        temperature: 1.0,
        ..GenerationParams::default()
    };
    let options = EngineOptions {
        max_seqs: 4,
        ..EngineOptions::default()
    };
    let (_, stats) = generate_all(&m.model, &m.tokenizer, &reqs, &p, &options).expect("gen");
    let longest = reqs.iter().map(|r| r.prompt.len()).max().expect("requests");
    // Four sequences of at most `longest + 40` positions, plus one prompt being prefilled.
    let bound = 5 * (longest + 40).div_ceil(16);
    println!(
        "peak {} blocks ({} bytes), bound {bound}, prefill tokens {}",
        stats.peak_blocks,
        stats.peak_kv_bytes(),
        stats.prefill_tokens
    );
    assert!(stats.peak_blocks <= bound);
    assert_eq!(stats.blocks_in_use_after, 0);
    assert_eq!(stats.max_blocks_beyond_live, 0);
    assert!(stats.peak_in_flight <= 4);
    // Each distinct prompt is prefilled once.
    let distinct: usize = reqs[..16].iter().map(|r| r.prompt.len()).sum();
    assert!(
        stats.prefill_tokens <= distinct * 2,
        "{}",
        stats.prefill_tokens
    );
}
