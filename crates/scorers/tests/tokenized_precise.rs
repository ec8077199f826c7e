//! `token-producer` with the model's tokenizer feeding the precise prefix producer: a chat
//! request sent as text finds the blocks an engine reported for the same conversation, which
//! without the tokenizer only a pre-tokenized request could.

#![cfg(all(feature = "kv-events-index", feature = "tokenizers"))]

use std::path::PathBuf;
use std::sync::Arc;

use kv_events::{BlockStored, Event, EventBatch};
use parking_lot::Mutex;
use scheduler_core::{
    Endpoint, EndpointPickerConfig, EndpointState, InferenceRequest, PoolSnapshot, ScheduleOptions,
    Scheduler, SharedPool,
};
use scorers::precise_prefix::{EventFedProducer, PRODUCER_TYPE_NAME};
use scorers::prefix_cache::RecordApplication;
use scorers::token_producer::TokenProducer;
use tokenizer::{ChatMessage, PromptTokenizer, TokenizerFiles};

const TOKEN_PRODUCER: &str = "
- type: token-producer
  parameters:
    modelName: m
    tokenizerFile: TOKENIZER
    tokenizerConfigFile: CONFIG
";

const PRECISE: &str = "
- name: precise
  type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {blockSizeTokens: 4}
";

const REST: &str = "
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise
    affinityLoadTolerance: 0
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
  - pluginRef: max-score-picker
";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tokenizer/fixtures").join(name)
}

const SYSTEM: &str = "You route requests to the replica that holds their prefix.";
const QUESTION: &str = "Which replica holds the system prompt of this conversation?";

struct Fixture {
    scheduler: Scheduler,
    producer: Arc<EventFedProducer>,
    tokens: Option<Arc<TokenProducer>>,
    pool: Arc<PoolSnapshot>,
}

impl Fixture {
    /// A scheduler over two endpoints from a config with the token producer declared before
    /// the precise producer, after it, or not at all.
    fn new(token_producer: Placement, template: &str) -> Self {
        let built: Arc<Mutex<Option<Arc<EventFedProducer>>>> = Arc::default();
        let mut registry = scorers::builtin_registry();
        let sink = Arc::clone(&built);
        registry.register(PRODUCER_TYPE_NAME, move |spec| {
            let (plugin, producer) = EventFedProducer::plugin(spec, RecordApplication::OnFlush)?;
            *sink.lock() = Some(producer);
            Ok(plugin)
        });
        let tokens = TOKEN_PRODUCER
            .replace("TOKENIZER", &fixture("tokenizer.json").display().to_string())
            .replace("CONFIG", &fixture(&format!("{template}.json")).display().to_string());
        let plugins = match token_producer {
            Placement::Before => format!("{tokens}{PRECISE}"),
            Placement::After => format!("{PRECISE}{tokens}"),
            Placement::Absent => PRECISE.to_owned(),
        };
        let yaml = format!("plugins:{plugins}{REST}");
        let config = EndpointPickerConfig::from_yaml(&yaml).unwrap();
        let plugins = config.construct_plugins(&registry).unwrap();
        let tokens = scorers::token_producer::find(&plugins);
        let scheduler = config.build_with(&plugins, &registry).unwrap().with_seed(3);
        let shared = SharedPool::new(PoolSnapshot::new([]));
        scheduler.observe_pool(&shared);
        shared.publish(PoolSnapshot::new([
            EndpointState::new(Endpoint::new(([10, 0, 0, 1], 8000).into())),
            EndpointState::new(Endpoint::new(([10, 0, 0, 2], 8000).into())),
        ]));
        let producer = built.lock().clone().expect("the config builds the producer");
        Self { scheduler, producer, tokens, pool: shared.load() }
    }

    /// Endpoint `server`'s engine computed and stored the blocks of `tokens` (whole blocks).
    fn engine_stored(&self, server: usize, tokens: &[u32]) {
        let whole = tokens.len() / 4 * 4;
        let batch = EventBatch {
            ts: 0.0,
            events: vec![Event::BlockStored(BlockStored {
                block_hashes: (0..whole as u64 / 4).map(|n| 7_000 + n).collect(),
                token_ids: tokens[..whole].to_vec(),
                block_size: 4,
                ..BlockStored::default()
            })],
            data_parallel_rank: None,
        };
        let endpoint = self.pool.endpoints()[server].id();
        assert!(self.producer.index().apply_batch(endpoint, "m", &batch));
    }

    /// The prefix scores of both endpoints for `request`, and the endpoint picked.
    fn decide(&self, request: &InferenceRequest) -> (Vec<f64>, usize) {
        let options = ScheduleOptions { explain: true, ..Default::default() };
        let result = self.scheduler.schedule_with(request, &self.pool, options).unwrap();
        self.scheduler.flush();
        let scores = result.explanation().unwrap()[0].scorers[0].2.clone();
        (scores, self.pool.index_of(result.primary().id()).unwrap() as usize)
    }
}

#[derive(Clone, Copy)]
enum Placement {
    Before,
    After,
    Absent,
}

fn engine_tokenizer(template: &str) -> PromptTokenizer {
    let tokenizer = fixture("tokenizer.json");
    let config = fixture(&format!("{template}.json"));
    PromptTokenizer::from_files(&TokenizerFiles {
        tokenizer: Some(&tokenizer),
        tokenizer_config: Some(&config),
        chat_template: None,
    })
    .unwrap()
}

fn chat_body(turns: &[(&str, &str)]) -> Vec<u8> {
    let messages: Vec<serde_json::Value> = turns
        .iter()
        .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
        .collect();
    serde_json::to_vec(&serde_json::json!({"model": "m", "messages": messages})).unwrap()
}

fn chat(turns: &[(&str, &str)]) -> InferenceRequest {
    InferenceRequest::from_openai(Some("/v1/chat/completions"), [], &chat_body(turns)).unwrap()
}

#[test]
fn a_text_chat_finds_the_engine_that_holds_its_conversation() {
    for placement in [Placement::Before, Placement::After] {
        let fixture = Fixture::new(placement, "llama3");
        // The engine served the first turn: it holds the blocks of the rendered conversation.
        let engine = engine_tokenizer("llama3");
        let mut first_turn = Vec::new();
        engine
            .encode_chat(
                &[
                    ChatMessage { role: "system", content: SYSTEM },
                    ChatMessage { role: "user", content: QUESTION },
                ],
                &mut first_turn,
            )
            .unwrap();
        assert!(first_turn.len() >= 24, "{}", first_turn.len());
        let second_turn = chat(&[
            ("system", SYSTEM),
            ("user", QUESTION),
            ("assistant", "The one the picker sent it to."),
            ("user", "And the next turn?"),
        ]);
        let (scores, _) = fixture.decide(&second_turn);
        assert_eq!(scores, [0.0, 0.0]);
        fixture.engine_stored(1, &first_turn);
        let (scores, picked) = fixture.decide(&second_turn);
        assert_eq!(picked, 1);
        assert_eq!(scores[0], 0.0);
        // The second turn's prompt extends the first turn's, up to the generation prompt the
        // first turn ended with: most of its blocks are held.
        assert!(scores[1] > 0.4 && scores[1] < 1.0, "{scores:?}");
        let stats = fixture.tokens.as_ref().unwrap().stats();
        assert_eq!(stats.tokenized.load(std::sync::atomic::Ordering::Relaxed), 2);
    }
}

#[test]
fn without_the_token_producer_the_same_chat_is_matched_only_approximately() {
    let fixture = Fixture::new(Placement::Absent, "llama3");
    assert!(fixture.tokens.is_none());
    let engine = engine_tokenizer("llama3");
    let mut held = Vec::new();
    engine
        .encode_chat(
            &[
                ChatMessage { role: "system", content: SYSTEM },
                ChatMessage { role: "user", content: QUESTION },
            ],
            &mut held,
        )
        .unwrap();
    fixture.engine_stored(1, &held);
    let (scores, _) = fixture.decide(&chat(&[("system", SYSTEM), ("user", QUESTION)]));
    assert_eq!(scores, [0.0, 0.0]);
}

#[test]
fn a_completion_is_tokenized_with_the_tokenizers_special_tokens() {
    let fixture = Fixture::new(Placement::Before, "chatml");
    let prompt = "Once upon a time the picker kept every conversation on one replica. ".repeat(3);
    let mut held = Vec::new();
    engine_tokenizer("chatml").encode_text(&prompt, &mut held).unwrap();
    fixture.engine_stored(0, &held);
    let body = serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": prompt})).unwrap();
    let request = InferenceRequest::from_openai(Some("/v1/completions"), [], &body).unwrap();
    let (scores, picked) = fixture.decide(&request);
    assert_eq!(picked, 0);
    assert!(scores[0] > 0.9, "{scores:?}");
}

#[test]
fn a_conversation_the_template_refuses_falls_back_and_is_counted() {
    let fixture = Fixture::new(Placement::Before, "mistral");
    let request = chat(&[("assistant", "I speak first."), ("user", "x")]);
    let (scores, _) = fixture.decide(&request);
    assert_eq!(scores, [0.0, 0.0]);
    let stats = fixture.tokens.as_ref().unwrap().stats();
    assert_eq!(stats.failed.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(stats.tokenized.load(std::sync::atomic::Ordering::Relaxed), 0);
    // A pre-tokenized request keeps its ids, whatever the template.
    let body = br#"{"model": "m", "prompt": [1, 2, 3, 4, 5]}"#;
    let request = InferenceRequest::from_openai(Some("/v1/completions"), [], body).unwrap();
    fixture.decide(&request);
    assert_eq!(stats.tokenized.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[test]
fn context_length_counts_the_producers_tokens_not_characters() {
    let prompt = "Tokenizers pack common English words into single tokens; digits 1234567890 and \
                  punctuation ?!;:, split finer. "
        .repeat(4);
    let mut ids = Vec::new();
    engine_tokenizer("chatml").encode_text(&prompt, &mut ids).unwrap();
    let real = ids.len();
    let estimated = prompt.len().div_ceil(4);
    assert_ne!(real, estimated, "the test needs a prompt whose estimate is off");
    let yaml = format!(
        "plugins:{}
- type: context-length-aware
  parameters: {{enableFiltering: true}}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: context-length-aware
  - pluginRef: max-score-picker
",
        TOKEN_PRODUCER
            .replace("TOKENIZER", &fixture("tokenizer.json").display().to_string())
            .replace("CONFIG", &fixture("chatml.json").display().to_string())
    );
    let config = EndpointPickerConfig::from_yaml(&yaml).unwrap();
    let scheduler = config.build(&scorers::builtin_registry()).unwrap();
    let label = scorers::context_length::DEFAULT_LABEL;
    let pool = Arc::new(PoolSnapshot::new([
        EndpointState::new(
            Endpoint::new(([10, 0, 0, 1], 8000).into())
                .with_label(label, format!("{estimated}-{estimated}")),
        ),
        EndpointState::new(
            Endpoint::new(([10, 0, 0, 2], 8000).into()).with_label(label, format!("{real}-{real}")),
        ),
    ]));
    let body = serde_json::to_vec(&serde_json::json!({"model": "m", "prompt": prompt})).unwrap();
    let request = InferenceRequest::from_openai(Some("/v1/completions"), [], &body).unwrap();
    for _ in 0..5 {
        let result = scheduler.schedule(&request, &pool).unwrap();
        assert_eq!(pool.index_of(result.primary().id()), Some(1));
    }
}

#[test]
fn requests_whose_prompt_the_engine_builds_otherwise_are_not_tokenized() {
    let fixture = Fixture::new(Placement::Before, "chatml");
    let stats = fixture.tokens.as_ref().unwrap().stats();
    let image = br#"{"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}"#;
    let responses = br#"{"model": "m", "input": "Summarise the prefix cache."}"#;
    for (path, body) in [("/v1/chat/completions", &image[..]), ("/v1/responses", &responses[..])] {
        let request = InferenceRequest::from_openai(Some(path), [], body).unwrap();
        fixture.decide(&request);
    }
    assert_eq!(stats.tokenized.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert_eq!(stats.failed.load(std::sync::atomic::Ordering::Relaxed), 2);
}
