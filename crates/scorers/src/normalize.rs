//! Normalisations shared by scorers.

/// Replaces each raw value `v` in `values` by `(max - v) / (max - min)`, so lower raw values
/// score higher; when all are equal, all score 1.
pub(crate) fn min_max_inverted(values: &mut [f64]) {
    let (min, max) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(min, max), &v| (min.min(v), max.max(v)));
    let range = max - min;
    for value in values.iter_mut() {
        *value = if range > 0.0 { (max - *value) / range } else { 1.0 };
    }
}
