//! `featureGates`: entries `name`, `name=true` or `name=false`, checked against the gates this
//! EPP knows, as the Go loader checks them (an unknown gate or an unreadable value is an error).

/// A gate this EPP knows and whether it is on when the config does not mention it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownGate {
    /// The gate's name.
    pub name: &'static str,
    /// Its value when absent.
    pub default: bool,
}

/// Every gate accepted in `featureGates`. `flowControl` and `haPopulateNonLeaderDatastore` are
/// the gates the llm-d EPP registers; `dataLayer` and `prepareDataPlugins` are GIE's, accepted
/// so GIE configs load unchanged (they switch nothing here: those features are always on).
pub const KNOWN_GATES: &[KnownGate] = &[
    KnownGate { name: "flowControl", default: false },
    KnownGate { name: "haPopulateNonLeaderDatastore", default: true },
    KnownGate { name: "dataLayer", default: false },
    KnownGate { name: "prepareDataPlugins", default: false },
];

/// A `featureGates` entry that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    /// The gate is not one of [`KNOWN_GATES`].
    #[error(
        "featureGates[{index}]: feature gate '{name}' is unknown (known gates: {})",
        known_gate_names()
    )]
    Unknown {
        /// Position of the entry.
        index: usize,
        /// The gate named.
        name: String,
    },
    /// The value after `=` is not a boolean.
    #[error(
        "featureGates[{index}]: '{value}' is not a valid value for the feature gate {name} (expected true or false)"
    )]
    InvalidValue {
        /// Position of the entry.
        index: usize,
        /// The gate named.
        name: String,
        /// The value found.
        value: String,
    },
}

fn known_gate_names() -> String {
    KNOWN_GATES.iter().map(|gate| gate.name).collect::<Vec<_>>().join(", ")
}

/// Splits an entry into its gate name and value; a bare name means `true`. The value is read
/// as Go's `strconv.ParseBool` reads it after lower-casing (`1`, `t`, `true`, `0`, `f`,
/// `false`), so configs the Go EPP accepts are accepted here. `None` for an unreadable value.
pub(crate) fn parse_entry(entry: &str) -> (&str, Option<bool>) {
    // Go splits on every `=` and reads the second part: `a=true=x` is gate `a`, value `true`.
    let mut parts = entry.split('=');
    let name = parts.next().unwrap_or_default();
    let value = match parts.next() {
        None => Some(true),
        Some(text) => match text.trim().to_ascii_lowercase().as_str() {
            "1" | "t" | "true" => Some(true),
            "0" | "f" | "false" => Some(false),
            _ => None,
        },
    };
    (name, value)
}

/// Checks every entry of `gates`: the first unknown gate or unreadable value is the error.
pub(crate) fn validate(gates: &[String]) -> Result<(), GateError> {
    for (index, entry) in gates.iter().enumerate() {
        let (name, value) = parse_entry(entry);
        if !KNOWN_GATES.iter().any(|gate| gate.name == name) {
            return Err(GateError::Unknown { index, name: name.to_owned() });
        }
        if value.is_none() {
            let value = entry.split('=').nth(1).unwrap_or_default().to_owned();
            return Err(GateError::InvalidValue { index, name: name.to_owned(), value });
        }
    }
    Ok(())
}

/// Whether gate `name` is on: the last entry naming it decides (later entries override earlier
/// ones, as in Go), else the gate's default; unknown gates are off.
pub(crate) fn enabled(gates: &[String], name: &str) -> bool {
    gates
        .iter()
        .rev()
        .map(|entry| parse_entry(entry))
        .find(|(gate, _)| *gate == name)
        .and_then(|(_, value)| value)
        .unwrap_or_else(|| KNOWN_GATES.iter().any(|gate| gate.name == name && gate.default))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gates(entries: &[&str]) -> Vec<String> {
        entries.iter().map(|entry| (*entry).to_owned()).collect()
    }

    #[test]
    fn bare_names_and_explicit_values() {
        assert!(enabled(&gates(&["flowControl"]), "flowControl"));
        assert!(enabled(&gates(&["flowControl=true"]), "flowControl"));
        assert!(enabled(&gates(&["flowControl= TRUE "]), "flowControl"));
        assert!(enabled(&gates(&["flowControl=1"]), "flowControl"));
        assert!(!enabled(&gates(&["flowControl=false"]), "flowControl"));
        assert!(!enabled(&gates(&["flowControl=F"]), "flowControl"));
        assert!(!enabled(&gates(&[]), "flowControl"), "off by default");
        assert!(enabled(&gates(&[]), "haPopulateNonLeaderDatastore"), "on by default");
        assert!(!enabled(
            &gates(&["haPopulateNonLeaderDatastore=false"]),
            "haPopulateNonLeaderDatastore"
        ));
    }

    #[test]
    fn the_last_entry_wins() {
        assert!(!enabled(&gates(&["flowControl", "flowControl=false"]), "flowControl"));
        assert!(enabled(&gates(&["flowControl=false", "flowControl"]), "flowControl"));
    }

    #[test]
    fn unknown_gates_and_bad_values_are_errors() {
        assert_eq!(
            validate(&gates(&["flowControl", "warpDrive=true"])),
            Err(GateError::Unknown { index: 1, name: "warpDrive".to_owned() })
        );
        let error = validate(&gates(&["flowControl=maybe"])).unwrap_err();
        assert_eq!(
            error,
            GateError::InvalidValue {
                index: 0,
                name: "flowControl".to_owned(),
                value: "maybe".to_owned()
            }
        );
        assert!(error.to_string().contains("featureGates[0]"), "{error}");
        assert_eq!(validate(&gates(&["flowControl=false", "dataLayer"])), Ok(()));
    }
}
