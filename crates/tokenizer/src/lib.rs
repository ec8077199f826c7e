//! Prompt tokenization as the engine does it, for precise prefix-cache routing.
//!
//! The precise prefix index keys blocks by the engine's token ids. A request that arrives as
//! text has to be tokenized exactly as the engine will: the model's own `tokenizer.json`
//! (loaded by Hugging Face's `tokenizers`, the library vLLM's fast tokenizers run) and, for a
//! chat request, the model's Jinja chat template from `tokenizer_config.json`, rendered with
//! the options Hugging Face's `apply_chat_template` uses (`trim_blocks`, `lstrip_blocks`,
//! Python string methods, `raise_exception`, `strftime_now`) and then tokenized without added
//! special tokens, since the template writes them. A completion prompt is tokenized with them.
//!
//! Rendering is bounded: a template that loops longer than a budget of instructions fails
//! rather than holding a core on a hostile conversation.
//!
//! ```
//! use tokenizer::{ChatMessage, ChatTemplate};
//!
//! let template = ChatTemplate::new(
//!     "{% for m in messages %}<|{{ m.role }}|>{{ m.content.strip() }}\n{% endfor %}\
//!      {% if add_generation_prompt %}<|assistant|>{% endif %}",
//!     "",
//!     "",
//! )?;
//! let text = template.render(&[ChatMessage { role: "user", content: " Hello " }])?;
//! assert_eq!(text, "<|user|>Hello\n<|assistant|>");
//! # Ok::<(), tokenizer::TokenizerError>(())
//! ```

mod config;
mod error;
mod pieces;
mod prompt;
mod template;

pub use config::TokenizerConfig;
pub use error::TokenizerError;
pub use prompt::{PromptTokenizer, TokenizerFiles};
pub use template::{ChatMessage, ChatTemplate};
