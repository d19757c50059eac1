//! Exercises the adapter contract end to end with a toy family (byte-level tokens, an
//! embedding and an output projection): config → load from safetensors → template →
//! collate → forward, through the type-erased `DynFamily` the registry stores. The loss is
//! checked against a cross-entropy computed independently from the saved weights.

use std::path::Path;

use anyhow::Result;
use lmms_ft_core::data::{Conversation, DecodedMedia, RgbImage, Role, Turn, VideoClip};
use lmms_ft_core::family::*;
use lmms_ft_core::loss::LossTargets;
use tch::{nn, nn::Module, Device, Kind, Tensor};

struct Toy;
struct ToyConfig {
    vocab: i64,
    hidden: i64,
}
impl HfConfig for ToyConfig {
    fn from_hf_json(v: &serde_json::Value) -> Result<Self> {
        let get = |k: &str, d| v[k].as_i64().unwrap_or(d);
        Ok(ToyConfig {
            vocab: get("vocab_size", 260),
            hidden: get("hidden_size", 8),
        })
    }
    fn num_parameters(&self) -> u64 {
        (2 * self.vocab * self.hidden) as u64
    }
}
struct NoMedia;
impl Processor for NoMedia {
    type Media = ();
    fn process(&self, i: &[RgbImage], v: &[VideoClip]) -> Result<((), MediaTokens)> {
        anyhow::ensure!(i.is_empty() && v.is_empty(), "toy takes no media");
        Ok(((), MediaTokens::default()))
    }
}
/// Bytes as tokens; 256 = start of turn, 257 = end of turn. Assistant bytes and its end
/// marker are labeled.
struct Bytes;
impl ChatTemplate for Bytes {
    fn encode(&self, c: &Conversation, _: &MediaTokens, all: bool) -> Result<EncodedText> {
        let mut out = EncodedText::default();
        let mut push = |id: i64, label: bool| {
            out.input_ids.push(id);
            out.labels.push(if label { id } else { IGNORE_INDEX });
        };
        for t in &c.turns {
            let train = all || t.role == Role::Assistant;
            push(256, all);
            for p in &t.parts {
                if let lmms_ft_core::data::Part::Text { text } = p {
                    text.bytes().for_each(|b| push(b as i64, train));
                }
            }
            push(257, train);
        }
        Ok(out)
    }
    fn encode_prompt(&self, c: &Conversation, m: &MediaTokens) -> Result<Vec<i64>> {
        Ok([self.encode(c, m, false)?.input_ids, vec![256]].concat())
    }
}
/// The core collates the text; the toy has nothing to add.
struct Pad;
impl Collator for Pad {
    type Media = ();
    type Batch = TextBatch;
    fn assemble(
        &self,
        t: TextBatch,
        _: Vec<Sample<()>>,
        _: &[Placement],
        _: Device,
    ) -> Result<TextBatch> {
        Ok(t)
    }
}
struct ToyModel {
    vs: nn::VarStore,
    embed: nn::Embedding,
    head: nn::Linear,
}
impl Trainable for ToyModel {
    fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }
}
impl Model for ToyModel {
    type Batch = TextBatch;
    fn hidden_states(&self, batch: &TextBatch, _train: bool) -> Result<Tensor> {
        Ok(self.embed.forward(&batch.input_ids))
    }
    fn loss_targets<'a>(&self, batch: &'a TextBatch) -> Option<&'a LossTargets> {
        batch.targets.as_ref()
    }
    fn lm_head(&self, hidden: &Tensor) -> Tensor {
        self.head.forward(hidden)
    }
}
impl ToyModel {
    fn new(vs: nn::VarStore, c: &ToyConfig) -> ToyModel {
        let root = vs.root();
        let embed = nn::embedding(
            &root / "model" / "embed_tokens",
            c.vocab,
            c.hidden,
            Default::default(),
        );
        let no_bias = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        let head = nn::linear(&root / "lm_head", c.hidden, c.vocab, no_bias);
        ToyModel { vs, embed, head }
    }
}
impl Family for Toy {
    type Config = ToyConfig;
    type Processor = NoMedia;
    type Template = Bytes;
    type Collator = Pad;
    type Model = ToyModel;
    fn processor(_: &ToyConfig, _: &Path, _: &ProcessorOptions) -> Result<NoMedia> {
        Ok(NoMedia)
    }
    fn template(_: &ToyConfig, _: &Path) -> Result<Bytes> {
        Ok(Bytes)
    }
    fn collator(_: &ToyConfig) -> Pad {
        Pad
    }
    fn load(c: &ToyConfig, dir: &Path, device: Device, kind: Kind) -> Result<ToyModel> {
        let mut model = ToyModel::new(nn::VarStore::new(device), c);
        model.vs.load(dir.join("model.safetensors"))?;
        model.vs.set_kind(kind);
        Ok(model)
    }
}

fn conversation() -> Conversation {
    Conversation {
        turns: vec![
            Turn::text(Role::System, "be brief"),
            Turn::text(Role::User, "hi?"),
            Turn::text(Role::Assistant, "hello"),
        ],
    }
}

#[test]
fn erased_family_runs_end_to_end_and_matches_independent_loss() {
    tch::manual_seed(0);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"vocab_size": 260, "hidden_size": 8}"#,
    )
    .unwrap();
    let embed = Tensor::randn([260, 8], (Kind::Float, Device::Cpu));
    let head = Tensor::randn([260, 8], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(
        &[
            ("model.embed_tokens.weight", &embed),
            ("lm_head.weight", &head),
        ],
        dir.path().join("model.safetensors"),
    )
    .unwrap();

    let fam: &dyn DynFamily = &Erased::<Toy>::NEW;
    assert_eq!(
        fam.num_parameters(&serde_json::json!({"vocab_size": 260, "hidden_size": 8}))
            .unwrap(),
        4160
    );
    let pipe = fam
        .open(
            dir.path(),
            OpenOptions {
                device: Device::Cpu,
                kind: Kind::Float,
                processor: ProcessorOptions::default(),
            },
            None,
        )
        .unwrap();
    let batch = vec![PreparedConversation {
        conversation: conversation(),
        media: DecodedMedia::default(),
    }];
    let out = pipe.forward(&batch, true).unwrap();

    // Independent computation: labeled positions are "hello" + end marker (6 tokens).
    let enc = Bytes
        .encode(&conversation(), &MediaTokens::default(), false)
        .unwrap();
    let ids = Tensor::from_slice(&enc.input_ids);
    let logits = embed.index_select(0, &ids).matmul(&head.tr());
    let logp = logits.log_softmax(-1, Kind::Float);
    let mut expected = 0.0;
    let mut n = 0;
    for t in 1..enc.labels.len() {
        if enc.labels[t] != IGNORE_INDEX {
            expected -= logp.double_value(&[t as i64 - 1, enc.labels[t]]);
            n += 1;
        }
    }
    assert_eq!(n, 6);
    assert_eq!(out.num_label_tokens, 6);
    let got = out.loss_sum.as_ref().unwrap().double_value(&[]);
    assert!(
        (got - expected).abs() < 1e-4 * expected.abs(),
        "{got} vs {expected}"
    );

    // Gradients reach the Hub-named parameters.
    out.mean_loss().unwrap().backward();
    let vars = pipe.var_store().variables();
    let g = vars["lm_head.weight"].grad();
    assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn loading_a_checkpoint_of_another_shape_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"vocab_size": 260, "hidden_size": 8}"#,
    )
    .unwrap();
    let wrong = Tensor::zeros([260, 4], (Kind::Float, Device::Cpu));
    Tensor::write_safetensors(
        &[
            ("model.embed_tokens.weight", &wrong),
            ("lm_head.weight", &wrong),
        ],
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let fam: &dyn DynFamily = &Erased::<Toy>::NEW;
    let err = fam.open(
        dir.path(),
        OpenOptions {
            device: Device::Cpu,
            kind: Kind::Float,
            processor: ProcessorOptions::default(),
        },
        None,
    );
    assert!(err.is_err());
}

#[test]
fn loss_head_matches_full_logits_on_the_toy_family() {
    tch::manual_seed(0);
    let config = ToyConfig {
        vocab: 260,
        hidden: 8,
    };
    let model = ToyModel::new(nn::VarStore::new(Device::Cpu), &config);
    // Two rows of different lengths, so one is padded and its padding is never a target.
    let long = Conversation {
        turns: vec![
            Turn::text(Role::User, "what is the loss?"),
            Turn::text(Role::Assistant, "a sum over labeled tokens"),
        ],
    };
    let texts: Vec<EncodedText> = [conversation(), long]
        .iter()
        .map(|c| Bytes.encode(c, &MediaTokens::default(), false).unwrap())
        .collect();
    let len = texts.iter().map(|t| t.labels.len()).max().unwrap();
    let labels: Vec<i64> = texts
        .iter()
        .flat_map(|t| {
            t.labels
                .iter()
                .copied()
                .chain(std::iter::repeat(IGNORE_INDEX))
                .take(len)
        })
        .collect();
    let labels = Tensor::from_slice(&labels).view([2, len as i64]);
    let samples = texts.into_iter().map(|text| Sample { text, media: () });
    let batch = Pad.collate(samples.collect(), Device::Cpu).unwrap();
    lmms_ft_core::testing::assert_loss_head_matches_full_logits(&model, &batch, &labels, "toy");
}

#[test]
fn a_mode_the_family_does_not_list_is_refused() {
    use lmms_ft_core::registry::{FamilyEntry, Status, TrainMode};
    let entry = FamilyEntry {
        name: "toy",
        architectures: &[],
        model_types: &["toy"],
        modes: &[TrainMode::Full, TrainMode::Lora],
        status: Status::Implemented,
        registered_by: module_path!(),
        implementation: Some(&Erased::<Toy>::NEW),
    };
    entry.check_mode(TrainMode::Lora).unwrap();
    let err = entry.check_mode(TrainMode::Qlora).unwrap_err().to_string();
    assert!(
        err.contains("train.mode = \"qlora\"") && err.contains("supports: full, lora"),
        "{err}"
    );
}
