//! Greedy generation through the family contract against the Hub code's greedy loop (one full
//! forward per token; its `generate` needs cache APIs transformers removed) for a text, a
//! one-image and a two-image two-turn prompt: prompt ids, reply tokens, per-step logits,
//! cached vs uncached and batched vs one by one (the shared
//! `core::testing::generation::check_generation`).

mod common;

use common::Fixture;
use lmms_ft_core::testing::generation::{check_generation, GenerationCase, TOLERANCE};
use lmms_ft_phi3_v::family::Phi3V;

#[test]
fn greedy_generation_matches_the_hub_code() {
    let fx = Fixture::load();
    let cases: Vec<GenerationCase> = ["text", "image", "two_images"]
        .into_iter()
        .map(|name| {
            let mut conv = fx.prepared(name);
            conv.conversation.turns.pop();
            GenerationCase {
                name: name.to_string(),
                conv,
                prompt_ids: Some(fx.ids(name, "prompt_ids")),
                generated: fx.ids(name, "generated"),
                step_logits: fx.tensor(name, "generated_logits").shallow_clone(),
                logit_tolerance: TOLERANCE,
            }
        })
        .collect();
    let max_new = fx.meta["max_new_tokens"].as_u64().unwrap() as usize;
    check_generation::<Phi3V>(&fx.dir, &cases, max_new);
}
