//! The two small hash functions the core and its plugins share: FNV-1a over bytes (stable
//! across runs and platforms, for ids) and the SplitMix64 finaliser (to spread a 64-bit value
//! whose low bits are not random: counters, ids, positions).

/// FNV-1a offset basis: the state before any byte.
pub const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

/// Folds `bytes` into an FNV-1a `state` (start from [`FNV_OFFSET_BASIS`]).
pub fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        state = (state ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    state
}

/// The SplitMix64 finaliser (Steele, Lea and Flood, 2014): a bijection on `u64` whose every
/// output bit depends on every input bit.
pub fn mix64(mut value: u64) -> u64 {
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

/// The SplitMix64 generator's step for the `n`-th output: consecutive counters give unrelated
/// values (per-decision seeds from a counter).
pub fn split_mix(n: u64) -> u64 {
    mix64(n.wrapping_add(0x9e37_79b9_7f4a_7c15))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // FNV-1a of "a" and the first SplitMix64 output from seed 0 (published test vectors).
        assert_eq!(fnv1a(FNV_OFFSET_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(split_mix(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(mix64(0), 0);
    }
}
