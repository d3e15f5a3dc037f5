//! `usage`: what the ledger holds for a window, grouped, with chart buckets.

use super::{ok, parse, Ctx, Reply};
use crate::usage::ledger;
use llmd_proto::methods::{parse_since, UsageParams, UsageResult};
use llmd_proto::{ErrorKind, RpcError};
use serde_json::value::RawValue;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long `usage` waits for queued rows to reach the file before reading it anyway.
const FLUSH_LIMIT: Duration = Duration::from_secs(5);
/// Windows up to this long are charted by hour, longer ones by day.
const HOURLY_UP_TO: u64 = 48 * 3_600;

/// Reads the ledger for `since` (default `24h`), grouped `by` (default `profile`).
pub async fn handle(ctx: &Ctx, params: Option<&RawValue>) -> Reply {
    let p: UsageParams = parse(params)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let since = parse_since(p.since.as_deref().unwrap_or("24h"), now)
        .map_err(|e| RpcError::invalid_params(e.to_string()))?;
    let recorder = &ctx.daemon.usage;
    if let Some(e) = recorder.error() {
        return Err(RpcError::new(
            ErrorKind::Internal,
            format!("the usage ledger is unavailable: {e}"),
        ));
    }
    // What was recorded before this call is in the answer.
    recorder.flush(FLUSH_LIMIT).await;
    let (bucket, bucket_secs) = if now.saturating_sub(since) <= HOURLY_UP_TO {
        ("hour", 3_600)
    } else {
        ("day", 86_400)
    };
    let path = recorder.path().to_owned();
    let by = p.by;
    let report =
        tokio::task::spawn_blocking(move || ledger::query(&path, since, now, by, bucket_secs))
            .await
            .map_err(|e| RpcError::internal(format!("usage query failed: {e}")))?
            .map_err(|e| RpcError::internal(e.to_string()))?;
    ok(&UsageResult {
        since,
        by,
        rows: report.rows,
        totals: report.totals,
        bucket: bucket.into(),
        buckets: report.buckets,
        token_calls: report.token_calls,
        dropped: recorder.dropped(),
        enabled: recorder.enabled(),
    })
}
