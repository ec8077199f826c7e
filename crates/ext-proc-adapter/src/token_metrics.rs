//! Metrics of the config's `token-producer` for `epp`: how many prompts it turned into the
//! engine's token ids and how many it could not (those were matched approximately). Only a
//! producer that tokenizes text (`tokenizerFile`, feature `tokenizers`) adds series.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use scheduler_core::ConstructedPlugins;

use crate::metrics::EppMetrics;

/// The counter's name.
pub const PROMPTS_TOTAL: &str = "epp_token_producer_prompts_total";

/// Adds the token producer's series to `metrics`' page; false when the config has no
/// producer that tokenizes text.
pub fn attach_metrics(plugins: &ConstructedPlugins, metrics: &EppMetrics) -> bool {
    let Some(producer) = scorers::token_producer::find(plugins) else { return false };
    if !producer.tokenizes_text() {
        return false;
    }
    metrics.add_section(move |out: &mut String| {
        let stats = producer.stats();
        let _ = writeln!(
            out,
            "# HELP {PROMPTS_TOTAL} Prompts the token producer tokenized, or could not \
             (matched approximately instead)."
        );
        let _ = writeln!(out, "# TYPE {PROMPTS_TOTAL} counter");
        for (outcome, counter) in [("tokenized", &stats.tokenized), ("failed", &stats.failed)] {
            let value = counter.load(Ordering::Relaxed);
            let _ = writeln!(out, "{PROMPTS_TOTAL}{{outcome=\"{outcome}\"}} {value}");
        }
    });
    true
}

#[cfg(test)]
mod tests {
    use scheduler_core::EndpointPickerConfig;

    use super::*;

    fn plugins(parameters: &str) -> ConstructedPlugins {
        let yaml = format!(
            "plugins:\n- type: token-producer\n  parameters: {parameters}\n- type: max-score-picker\n"
        );
        let config = EndpointPickerConfig::from_yaml(&yaml).unwrap();
        config.construct_plugins(&scorers::builtin_registry()).unwrap()
    }

    #[test]
    fn a_producer_that_makes_no_ids_adds_no_series() {
        let metrics = EppMetrics::new("pool", None);
        let plugins = plugins("{vllm: {url: 'http://localhost:8000'}}");
        assert!(!attach_metrics(&plugins, &metrics));
        assert!(!metrics.encode().contains(PROMPTS_TOTAL));
    }

    #[cfg(feature = "tokenizers")]
    #[test]
    fn the_page_counts_tokenized_and_failed_prompts() {
        use scheduler_core::{CycleState, InferenceRequest};

        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../tokenizer/fixtures");
        let plugins = plugins(&format!(
            "{{tokenizerFile: '{fixtures}/tokenizer.json', \
               tokenizerConfigFile: '{fixtures}/mistral.json'}}"
        ));
        let metrics = EppMetrics::new("pool", None);
        assert!(attach_metrics(&plugins, &metrics));
        let producer = scorers::token_producer::find(&plugins).unwrap();
        let requests = [
            (Some("/v1/completions"), r#"{"model":"m","prompt":"hello there"}"#),
            (
                Some("/v1/chat/completions"),
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            ),
            // The template refuses a conversation that starts with the assistant.
            (
                Some("/v1/chat/completions"),
                r#"{"model":"m","messages":[{"role":"assistant","content":"hi"}]}"#,
            ),
        ];
        for (seed, (path, body)) in requests.into_iter().enumerate() {
            let request = InferenceRequest::from_openai(path, [], body.as_bytes()).unwrap();
            let mut state = CycleState::new(std::time::Instant::now(), seed as u64);
            producer.tokens(&mut state, &request);
        }
        let page = metrics.encode();
        assert!(page.contains(&format!("{PROMPTS_TOTAL}{{outcome=\"tokenized\"}} 2")), "{page}");
        assert!(page.contains(&format!("{PROMPTS_TOTAL}{{outcome=\"failed\"}} 1")), "{page}");
    }
}
