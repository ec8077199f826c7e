//! The Rust tokenizer and template engine against what Hugging Face's Python libraries
//! computed for the same files (`fixtures/make_fixtures.py`): the same rendered text and the
//! same token ids, for three template families and for completion prompts.

use std::path::PathBuf;

use proptest::prelude::*;
use serde_json::Value;
use tokenizer::{ChatMessage, PromptTokenizer, TokenizerError, TokenizerFiles};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

fn load(template: &str) -> PromptTokenizer {
    let tokenizer = fixture("tokenizer.json");
    let config = fixture(&format!("{template}.json"));
    PromptTokenizer::from_files(&TokenizerFiles {
        tokenizer: Some(&tokenizer),
        tokenizer_config: Some(&config),
        chat_template: None,
    })
    .unwrap()
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap()
}

fn ids(value: &Value) -> Vec<u32> {
    value.as_array().unwrap().iter().map(|id| id.as_u64().unwrap() as u32).collect()
}

#[test]
fn chats_render_and_tokenize_as_transformers_does() {
    let expected = expected();
    let cases = expected["chats"].as_array().unwrap();
    assert!(cases.len() >= 15);
    let mut out = Vec::new();
    for case in cases {
        let template = case["template"].as_str().unwrap();
        let tokenizer = load(template);
        let messages: Vec<ChatMessage<'_>> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().unwrap(),
                content: m["content"].as_str().unwrap(),
            })
            .collect();
        match case.get("error").and_then(Value::as_str) {
            Some(error) => {
                let found = tokenizer.encode_chat(&messages, &mut out).unwrap_err();
                assert!(
                    matches!(&found, TokenizerError::Render(text) if text.contains(error)),
                    "{template}: {found}"
                );
            }
            None => {
                let text = tokenizer.render_chat(&messages).unwrap();
                assert_eq!(text, case["text"].as_str().unwrap(), "{template}: {messages:?}");
                tokenizer.encode_chat(&messages, &mut out).unwrap();
                assert_eq!(out, ids(&case["ids"]), "{template}: {messages:?}");
            }
        }
    }
}

#[test]
fn completions_get_the_tokenizers_special_tokens() {
    let expected = expected();
    let tokenizer = load("chatml");
    let mut out = vec![7, 7, 7];
    for case in expected["completions"].as_array().unwrap() {
        tokenizer.encode_text(case["text"].as_str().unwrap(), &mut out).unwrap();
        assert_eq!(out, ids(&case["ids"]), "{:?}", case["text"]);
        // The post-processor's <|begin_of_text|> (id 0) comes first.
        assert_eq!(out.first(), Some(&0));
    }
}

#[test]
fn a_template_file_replaces_the_configs_template() {
    let tokenizer = fixture("tokenizer.json");
    let config = fixture("chatml.json");
    let dir = std::env::temp_dir().join(format!("epp-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let template = dir.join("chat_template.jinja");
    std::fs::write(&template, "{% for m in messages %}[{{ m.content }}]{% endfor %}").unwrap();
    let loaded = PromptTokenizer::from_files(&TokenizerFiles {
        tokenizer: Some(&tokenizer),
        tokenizer_config: Some(&config),
        chat_template: Some(&template),
    })
    .unwrap();
    let text = loaded.render_chat(&[ChatMessage { role: "user", content: "hi" }]).unwrap();
    assert_eq!(text, "[hi]");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_and_broken_files_are_named() {
    let missing = PathBuf::from("/nonexistent/tokenizer.json");
    let error = PromptTokenizer::from_files(&TokenizerFiles {
        tokenizer: Some(&missing),
        ..TokenizerFiles::default()
    })
    .unwrap_err();
    assert!(error.to_string().contains("/nonexistent/tokenizer.json"), "{error}");

    let config = fixture("chatml.json");
    let error = PromptTokenizer::from_files(&TokenizerFiles {
        tokenizer: Some(&config),
        ..TokenizerFiles::default()
    })
    .unwrap_err();
    assert!(matches!(error, TokenizerError::Tokenizer(_)), "{error}");

    let error = PromptTokenizer::from_files(&TokenizerFiles::default()).unwrap_err();
    assert!(error.to_string().contains("no tokenizer.json"), "{error}");
}

#[test]
fn without_a_template_a_chat_is_refused_by_name() {
    let tokenizer = fixture("tokenizer.json");
    let loaded = PromptTokenizer::from_files(&TokenizerFiles {
        tokenizer: Some(&tokenizer),
        ..TokenizerFiles::default()
    })
    .unwrap();
    assert!(!loaded.has_chat_template());
    let error = loaded.encode_chat(&[ChatMessage { role: "user", content: "x" }], &mut Vec::new());
    assert_eq!(error, Err(TokenizerError::NoChatTemplate));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever a client sends as roles and contents, rendering and tokenizing return an
    /// answer (ids or an error), and a rendered chat's ids are the ids of its rendered text.
    #[test]
    fn any_conversation_renders_or_fails_cleanly(
        turns in proptest::collection::vec((".{0,12}", ".{0,200}"), 0..6),
        family in prop::sample::select(vec!["chatml", "llama3", "mistral"]),
    ) {
        let tokenizer = load(family);
        let messages: Vec<ChatMessage<'_>> = turns
            .iter()
            .map(|(role, content)| ChatMessage { role, content })
            .collect();
        let mut ids = Vec::new();
        match tokenizer.render_chat(&messages) {
            Ok(text) => {
                tokenizer.encode_chat(&messages, &mut ids).unwrap();
                let mut again = Vec::new();
                tokenizer.encode_text(&text, &mut again).unwrap();
                // encode_text adds the leading <|begin_of_text|>.
                prop_assert_eq!(&again[1..], &ids[..]);
            }
            Err(error) => prop_assert!(matches!(error, TokenizerError::Render(_))),
        }
    }
}

/// A few system prompts and questions long enough to be cached, drawn from for conversations
/// that share prefixes as real ones do.
const SYSTEMS: [&str; 2] = [
    "You are a careful assistant. Answer in full sentences and cite the documents you used.",
    "Tu es un assistant prudent; réponds brièvement. 日本語も話せます。 Emoji welcome 🚀🚀.",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Tokenizing piece by piece with the cache gives the ids of tokenizing the rendered
    /// conversation whole, for conversations that repeat earlier pieces (cache hits) and for
    /// contents that contain the special tokens' text themselves.
    #[test]
    fn pieces_and_cache_give_the_ids_of_the_whole_text(
        conversations in proptest::collection::vec(
            (0usize..2, proptest::collection::vec(
                prop_oneof![
                    Just("<|eot_id|>".to_owned()),
                    Just("<|im_start|>user".to_owned()),
                    "[a-zA-Z ,.!?\n]{0,90}",
                    ".{0,40}",
                ],
                1..5,
            )),
            1..6,
        ),
        family in prop::sample::select(vec!["chatml", "llama3"]),
    ) {
        let cached = load(family);
        prop_assert!(cached.caches_pieces());
        let whole = load(family).with_piece_cache_tokens(0);
        prop_assert!(!whole.caches_pieces());
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for (system, turns) in &conversations {
            let mut messages = vec![ChatMessage { role: "system", content: SYSTEMS[*system] }];
            for (n, content) in turns.iter().enumerate() {
                let role = if n % 2 == 0 { "user" } else { "assistant" };
                messages.push(ChatMessage { role, content });
                // Every growing prefix of the conversation, as its turns arrive.
                cached.encode_chat(&messages, &mut a).unwrap();
                whole.encode_chat(&messages, &mut b).unwrap();
                prop_assert_eq!(&a, &b);
            }
        }
    }
}

#[test]
fn a_piece_cache_evicting_all_along_gives_the_ids_of_the_whole_text() {
    let tokenizer = load("chatml").with_piece_cache_tokens(300);
    let mut ids = Vec::new();
    for n in 0..200 {
        let content = format!("Question number {n}: how are the blocks of this prompt hashed?");
        tokenizer
            .encode_chat(&[ChatMessage { role: "user", content: &content }], &mut ids)
            .unwrap();
        assert!(!ids.is_empty());
    }
    let whole = load("chatml").with_piece_cache_tokens(0);
    let mut again = Vec::new();
    let content = "Question number 7: how are the blocks of this prompt hashed?";
    tokenizer.encode_chat(&[ChatMessage { role: "user", content }], &mut ids).unwrap();
    whole.encode_chat(&[ChatMessage { role: "user", content }], &mut again).unwrap();
    assert_eq!(ids, again);
}

/// A Metaspace tokenizer that marks only the start of the input gives text after an added
/// token other ids when that text is tokenized alone: it is found out when it loads and
/// tokenized whole, so its ids are the tokenizer's own.
#[test]
fn a_tokenizer_whose_pieces_differ_is_tokenized_whole() {
    let metaspace = fixture("metaspace.json");
    let config = fixture("chatml.json");
    let tokenizer = PromptTokenizer::from_files(&TokenizerFiles {
        tokenizer: Some(&metaspace),
        tokenizer_config: Some(&config),
        chat_template: None,
    })
    .unwrap();
    assert!(!tokenizer.caches_pieces());
    let messages = [ChatMessage { role: "user", content: "xylophone yields zebra" }];
    let text = tokenizer.render_chat(&messages).unwrap();
    let whole = tokenizers::Tokenizer::from_file(&metaspace).unwrap();
    let expected = whole.encode_fast(text.as_str(), false).unwrap().get_ids().to_vec();
    let mut ids = Vec::new();
    tokenizer.encode_chat(&messages, &mut ids).unwrap();
    assert_eq!(ids, expected);
}
