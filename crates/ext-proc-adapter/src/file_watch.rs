//! Reloading a file when its content changes: the endpoints file of `epp`, the adapters and
//! endpoints files of `epp bbr`.
//!
//! The file is read every [`CHECK_INTERVAL`] and compared by content, not modification time,
//! so a rewrite within the same second or a restored old time is seen. Content that cannot be
//! read or applied leaves the last good state in place (a half-written file must not empty
//! it) and is not tried again until the content changes.

use std::fmt::Display;
use std::future::Future;
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
    applied: Vec<u8>,
    mut apply: impl FnMut(&Path, &[u8]) -> Result<usize, E>,
) {
    watch_and_refresh(path, what, applied, true, None, |path, content| {
        std::future::ready(apply(path, content))
    })
    .await
}

/// [`watch`] (when `follow_changes`), with an `apply` whose work may wait (it reads the
/// content, then returns the rest of its work as a future), and that is also called every
/// `refresh` with the content last applied (for content that names something outside the
/// file, such as a DNS name, which may change on its own). A refused refresh keeps the last
/// good state. With neither, returns at once.
pub(crate) async fn watch_and_refresh<E, F, Fut>(
    path: PathBuf,
    what: &'static str,
    mut applied: Vec<u8>,
    follow_changes: bool,
    refresh: Option<Duration>,
    mut apply: F,
) where
    E: Display,
    F: FnMut(&Path, &[u8]) -> Fut,
    Fut: Future<Output = Result<usize, E>>,
{
    if !follow_changes && refresh.is_none() {
        return;
    }
    let mut refused: Option<Vec<u8>> = None;
    let mut refreshed_at = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(CHECK_INTERVAL).await;
        if let Some(every) = refresh
            && refreshed_at.elapsed() >= every
        {
            refreshed_at = tokio::time::Instant::now();
            if let Err(error) = apply(&path, &applied).await {
                tracing::warn!(%error, "{what} not refreshed; keeping the last good one");
            }
        }
        if !follow_changes {
            continue;
        }
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
        match apply(&path, &content).await {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_file_not_followed_is_still_refreshed_with_what_was_applied() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&seen);
        let path = PathBuf::from("/nonexistent/endpoints.yaml");
        let watcher = tokio::spawn(watch_and_refresh(
            path,
            "endpoints file",
            b"applied".to_vec(),
            false,
            Some(Duration::from_secs(5)),
            move |_: &Path, content: &[u8]| {
                recorded.lock().push(content.to_vec());
                std::future::ready(Ok::<usize, String>(1))
            },
        ));
        tokio::time::sleep(Duration::from_secs(12)).await;
        watcher.abort();
        let seen = seen.lock();
        assert_eq!(seen.len(), 2, "one refresh every 5 s: {seen:?}");
        assert!(seen.iter().all(|content| content == b"applied"));
    }

    #[tokio::test(start_paused = true)]
    async fn neither_following_nor_refreshing_returns_at_once() {
        let watcher = watch_and_refresh(
            PathBuf::from("/nonexistent"),
            "endpoints file",
            Vec::new(),
            false,
            None,
            |_: &Path, _: &[u8]| std::future::ready(Ok::<usize, String>(0)),
        );
        tokio::time::timeout(Duration::from_millis(1), watcher).await.unwrap();
    }
}
