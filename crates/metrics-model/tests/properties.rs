//! Property tests: rendered pages parse back to the same samples, and no input makes the
//! parser or the mappings panic.

use std::collections::BTreeMap;
use std::time::Instant;

use metrics_model::render::{write_help, write_sample, write_type};
use metrics_model::{Engine, MetricKind, NameFilter};
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct GeneratedSample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
    timestamp_ms: Option<i64>,
    help: Option<String>,
}

fn metric_name() -> impl Strategy<Value = String> {
    "[a-zA-Z_:][a-zA-Z0-9_:]{0,24}"
}

fn label_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 ./-]{0,12}",
        // Delimiters, escapes and non-ASCII text that must survive the round trip.
        "[\"\\\\\n,={}# \tée😀a]{0,12}",
        any::<String>(),
    ]
}

fn value() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        (0u32..10_000).prop_map(f64::from),
    ]
}

fn sample() -> impl Strategy<Value = GeneratedSample> {
    (
        metric_name(),
        proptest::collection::btree_map("[a-zA-Z_][a-zA-Z0-9_]{0,12}", label_value(), 0..5),
        value(),
        proptest::option::of(any::<i64>()),
        proptest::option::of(any::<String>()),
    )
        .prop_map(|(name, labels, value, timestamp_ms, help)| GeneratedSample {
            name,
            labels,
            value,
            timestamp_ms,
            help,
        })
}

fn render(samples: &[GeneratedSample]) -> String {
    let mut page = String::new();
    for sample in samples {
        if let Some(help) = &sample.help {
            write_help(&mut page, &sample.name, help).expect("writing to a String");
            write_type(&mut page, &sample.name, MetricKind::Gauge).expect("writing to a String");
        }
        let labels: Vec<(&str, &str)> =
            sample.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        write_sample(&mut page, &sample.name, &labels, sample.value, sample.timestamp_ms)
            .expect("writing to a String");
    }
    page
}

fn same_value(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || a == b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn rendered_pages_round_trip(samples in proptest::collection::vec(sample(), 0..12)) {
        let page = render(&samples);
        let parsed: Vec<_> = metrics_model::text::parse(&page)
            .samples()
            .collect::<Result<_, _>>()
            .map_err(|e| TestCaseError::fail(format!("{e}\n{page}")))?;
        prop_assert_eq!(parsed.len(), samples.len());
        for (got, want) in parsed.iter().zip(&samples) {
            prop_assert_eq!(got.name, want.name.as_str());
            let labels: BTreeMap<String, String> =
                got.labels.iter().map(|l| (l.name.to_owned(), l.value.into_owned())).collect();
            prop_assert_eq!(&labels, &want.labels);
            prop_assert!(same_value(got.value, want.value), "{} vs {}", got.value, want.value);
            prop_assert_eq!(got.timestamp, want.timestamp_ms.map(|t| t as f64));
        }

        // HELP text survives too.
        let helps: Vec<String> = metrics_model::text::parse(&page)
            .filter_map(|r| match r {
                Ok(metrics_model::Record::Help { text, .. }) => Some(text.into_owned()),
                _ => None,
            })
            .collect();
        let expected: Vec<String> = samples
            .iter()
            .filter_map(|s| s.help.clone())
            .map(|h| h.trim_start_matches([' ', '\t']).trim_end().to_owned())
            .collect();
        prop_assert_eq!(helps, expected);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let text = String::from_utf8_lossy(&bytes);
        exercise(&text);
    }

    #[test]
    fn exposition_like_text_never_panics(
        text in "[a-z_:{}=\",# \\\\\n\t\rNaIf+\\-0-9.eé]{0,300}"
    ) {
        exercise(&text);
    }

    #[test]
    fn mutated_engine_pages_never_panic(
        cut in 0usize..20_000,
        insert in "[{}\"=,\\\\# \n]{0,3}",
    ) {
        let page = include_str!("data/vllm.prom");
        let mut at = cut.min(page.len());
        while !page.is_char_boundary(at) {
            at -= 1;
        }
        let mutated = format!("{}{}{}", &page[..at], insert, &page[at..]);
        exercise(&mutated);
    }
}

/// Names that share prefixes and family suffixes, so skipping a rejected family's samples is
/// tested against its neighbours.
const CLASHING_NAMES: [&str; 9] =
    ["a", "a_total", "a_bucket", "a_x", "ab", "b", "b_count", "b_count_total", "c"];

/// A page of groups: optional HELP/TYPE for a family, then samples of any names (a sample
/// without metadata right after another family's group is valid text).
fn clashing_page() -> impl Strategy<Value = String> {
    let group = (
        proptest::option::of(0..CLASHING_NAMES.len()),
        proptest::collection::vec((0..CLASHING_NAMES.len(), 0u32..100, any::<bool>()), 0..6),
    );
    proptest::collection::vec(group, 0..8).prop_map(|groups| {
        let mut page = String::new();
        for (family, samples) in groups {
            if let Some(family) = family {
                write_help(&mut page, CLASHING_NAMES[family], "h").expect("writing to a String");
                write_type(&mut page, CLASHING_NAMES[family], MetricKind::Histogram)
                    .expect("writing to a String");
            }
            for (name, value, labelled) in samples {
                let labels: &[(&str, &str)] = if labelled { &[("le", "1")] } else { &[] };
                write_sample(&mut page, CLASHING_NAMES[name], labels, f64::from(value), None)
                    .expect("writing to a String");
            }
        }
        page
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn a_filtered_parse_yields_exactly_the_accepted_samples(
        page in clashing_page(),
        wanted in proptest::collection::vec(0..CLASHING_NAMES.len(), 0..3),
        whole_families in any::<bool>(),
    ) {
        let names: Vec<&str> = wanted.iter().map(|&i| CLASHING_NAMES[i]).collect();
        let filter = if whole_families {
            NameFilter::families(&names)
        } else {
            NameFilter::exact(&names)
        };
        let all: Vec<(String, f64)> = metrics_model::text::parse(&page)
            .samples()
            .map(|sample| sample.map(|s| (s.name.to_owned(), s.value)))
            .collect::<Result<_, _>>()
            .expect("rendered pages parse");
        let expected: Vec<(String, f64)> = all
            .into_iter()
            .filter(|(name, _)| {
                use metrics_model::text::SampleFilter;
                filter.accepts_sample(name)
            })
            .collect();
        let filtered: Vec<(String, f64)> = metrics_model::text::Parser::from_bytes(page.as_bytes())
            .with_filter(&filter)
            .samples()
            .map(|sample| sample.map(|s| (s.name.to_owned(), s.value)))
            .collect::<Result<_, _>>()
            .expect("rendered pages parse");
        prop_assert_eq!(filtered, expected);
        // The accepting side of the filter, against its definition.
        for name in CLASHING_NAMES {
            use metrics_model::text::SampleFilter;
            let by_definition = names.contains(&name)
                || (whole_families
                    && ["_bucket", "_count", "_sum", "_created", "_total", "_info", "_gcount", "_gsum"]
                        .iter()
                        .any(|suffix| name.strip_suffix(suffix).is_some_and(|f| names.contains(&f))));
            prop_assert_eq!(filter.accepts_sample(name), by_definition, "{}", name);
            let family_by_definition = names.contains(&name)
                || (!whole_families
                    && names.iter().any(|wanted| {
                        ["_bucket", "_count", "_sum", "_created", "_total", "_info", "_gcount", "_gsum"]
                            .iter()
                            .any(|suffix| wanted.strip_suffix(suffix) == Some(name))
                    }));
            prop_assert_eq!(filter.accepts_family(name), family_by_definition, "family {}", name);
        }
    }
}

/// Runs every entry point over `text`; only a panic fails.
fn exercise(text: &str) {
    for record in metrics_model::text::parse(text) {
        if let Ok(metrics_model::Record::Sample(sample)) = record {
            let _ = sample.labels.iter().count();
            let _ = sample.labels.get("le");
        }
    }
    let families = NameFilter::families(["a", "vllm:num_requests_waiting"]);
    let _ = metrics_model::text::parse(text).with_filter(&families).count();
    let at = Instant::now();
    for engine in [Engine::Vllm, Engine::Sglang, Engine::TrtLlm] {
        let _ = engine.mapping().extract(text, at);
    }
}
