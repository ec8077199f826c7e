//! GPU utilization from an NVIDIA DCGM exporter page, as `dcgm-extractor` reads it.
//!
//! The exporter publishes `DCGM_FI_DEV_GPU_UTIL` (a gauge, percent busy) once per GPU. An
//! endpoint's utilization is the busiest of its GPUs, scaled to `[0, 1]`. When the exporter
//! runs per node it labels each GPU's series with the `pod` using it; series of other pods are
//! then left out. A series without a `pod` label, or an endpoint without a name, counts.

use crate::text::{MetricKind, NameFilter, ParseError, Parser, Record};

/// The metric read: each GPU's utilization in percent.
pub const GPU_UTIL_METRIC: &str = "DCGM_FI_DEV_GPU_UTIL";
/// The label a node-level exporter uses to name the pod a GPU serves.
pub const POD_LABEL: &str = "pod";

/// Why a page gave no utilization.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum DcgmError {
    /// The page is not valid exposition text.
    #[error("{0}")]
    Parse(#[from] ParseError),
    /// The page has no `DCGM_FI_DEV_GPU_UTIL`.
    #[error("metric {GPU_UTIL_METRIC:?} not found in the DCGM exporter's page")]
    Missing,
    /// The metric is declared with a type other than gauge, or not declared at all.
    #[error("metric {GPU_UTIL_METRIC:?} is not a gauge ({0})")]
    NotAGauge(&'static str),
    /// The metric is there, but none of its series is this endpoint's.
    #[error("metric {GPU_UTIL_METRIC:?} has no series for pod {0:?}")]
    NoSeriesForPod(String),
}

/// The utilization in `[0, 1]` (a 0-100 percentage divided by 100; not clamped) of the
/// busiest GPU on `page` that belongs to pod `pod` (every GPU when `pod` is empty).
pub fn gpu_utilization(page: &[u8], pod: &str) -> Result<f64, DcgmError> {
    let mut declared: Option<MetricKind> = None;
    let mut present = false;
    let mut busiest: Option<f64> = None;
    let parser = Parser::from_bytes(page).with_filter(NameFilter::exact([GPU_UTIL_METRIC]));
    for record in parser {
        match record? {
            Record::Type { family, kind } if family == GPU_UTIL_METRIC => declared = Some(kind),
            Record::Sample(sample) if sample.name == GPU_UTIL_METRIC => {
                present = true;
                let kind = declared.unwrap_or(MetricKind::Unknown);
                if kind != MetricKind::Gauge {
                    return Err(DcgmError::NotAGauge(kind.keyword()));
                }
                let belongs =
                    pod.is_empty() || sample.labels.get(POD_LABEL).is_none_or(|owner| owner == pod);
                if belongs {
                    busiest = Some(busiest.map_or(sample.value, |max| max.max(sample.value)));
                }
            }
            _ => {}
        }
    }
    match (present, busiest) {
        (false, _) => Err(DcgmError::Missing),
        (true, None) => Err(DcgmError::NoSeriesForPod(pod.to_owned())),
        (true, Some(max)) => Ok(max / 100.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE_PAGE: &str = "\
# HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu=\"0\",UUID=\"GPU-a\",pod=\"vllm-0\",namespace=\"ns\"} 35
DCGM_FI_DEV_GPU_UTIL{gpu=\"1\",UUID=\"GPU-b\",pod=\"vllm-0\",namespace=\"ns\"} 80
DCGM_FI_DEV_GPU_UTIL{gpu=\"2\",UUID=\"GPU-c\",pod=\"vllm-1\",namespace=\"ns\"} 99
# TYPE DCGM_FI_DEV_FB_USED gauge
DCGM_FI_DEV_FB_USED{gpu=\"0\"} 1024
";

    #[test]
    fn the_busiest_gpu_of_the_pod_counts() {
        assert_eq!(gpu_utilization(NODE_PAGE.as_bytes(), "vllm-0"), Ok(0.8));
        assert_eq!(gpu_utilization(NODE_PAGE.as_bytes(), "vllm-1"), Ok(0.99));
        assert_eq!(gpu_utilization(NODE_PAGE.as_bytes(), ""), Ok(0.99), "no pod: every GPU");
        assert_eq!(
            gpu_utilization(NODE_PAGE.as_bytes(), "vllm-2"),
            Err(DcgmError::NoSeriesForPod("vllm-2".into()))
        );
    }

    #[test]
    fn series_without_a_pod_label_count_for_any_pod() {
        let page = "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\nDCGM_FI_DEV_GPU_UTIL{gpu=\"0\"} 12\n";
        assert_eq!(gpu_utilization(page.as_bytes(), "anyone"), Ok(0.12));
    }

    #[test]
    fn a_missing_or_mistyped_metric_is_an_error() {
        let page = "# TYPE DCGM_FI_DEV_FB_USED gauge\nDCGM_FI_DEV_FB_USED 1\n";
        assert_eq!(gpu_utilization(page.as_bytes(), ""), Err(DcgmError::Missing));
        let untyped = "DCGM_FI_DEV_GPU_UTIL{gpu=\"0\"} 12\n";
        assert_eq!(gpu_utilization(untyped.as_bytes(), ""), Err(DcgmError::NotAGauge("untyped")));
        let counter = "# TYPE DCGM_FI_DEV_GPU_UTIL counter\nDCGM_FI_DEV_GPU_UTIL 3\n";
        assert_eq!(gpu_utilization(counter.as_bytes(), ""), Err(DcgmError::NotAGauge("counter")));
        assert!(matches!(gpu_utilization(b"DCGM_FI_DEV_GPU_UTIL{", ""), Err(DcgmError::Parse(_))));
    }
}
