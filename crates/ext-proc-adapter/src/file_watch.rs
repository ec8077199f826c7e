//! Reloading a file when its content changes: the endpoints file of `epp`, the adapters and
//! endpoints files of `epp bbr`.
//!
//! The file is read every [`CHECK_INTERVAL`] and compared by content, not modification time,
//! so a rewrite within the same second or a restored old time is seen. Content that cannot be
//! read or applied leaves the last good state in place (a half-written file must not empty
//! it) and is not tried again until the content changes.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the file is read.
pub(crate) const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Calls `apply` with the file's content each time it changes, until the task is dropped.
/// `applied` is the content applied at startup, so a change made between startup and the
/// first check is not missed; `what` names the file in logs. `apply` returns how many entries
/// the content held (logged), or why it was refused.
pub(crate) async fn watch<E: Display>(
    path: PathBuf,
    what: &'static str,
    mut applied: Vec<u8>,
    mut apply: impl FnMut(&Path, &[u8]) -> Result<usize, E>,
) {
    let mut refused: Option<Vec<u8>> = None;
    loop {
        tokio::time::sleep(CHECK_INTERVAL).await;
        let content = match tokio::fs::read(&path).await {
            Ok(content) => content,
            Err(error) => {
                if refused.is_none() {
                    tracing::warn!(path = %path.display(), %error, "{what} unreadable; keeping the last good one");
                    refused = Some(Vec::new());
                }
                continue;
            }
        };
        if applied == content || refused.as_ref() == Some(&content) {
            continue;
        }
        match apply(&path, &content) {
            Ok(entries) => {
                tracing::info!(path = %path.display(), entries, "{what} reloaded");
                applied = content;
                refused = None;
            }
            Err(error) => {
                tracing::warn!(%error, "{what} not reloaded; keeping the last good one");
                refused = Some(content);
            }
        }
    }
}
