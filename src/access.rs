//! Which trackers a session may see: the one status computation shared by the WebSocket subscribe
//! ([`crate::ws`]) and the HTTP API ([`crate::http`]), so both answer `normal`, `blocked`,
//! `unknown` or `disallowed` (PROTOCOL.md §3) for the same facts. Owns the rule, not the SQL
//! (that is [`queries::tracker_access`]) nor what a caller does with the answer.

use std::collections::HashMap;

use crate::db::queries::{self, SessionRow};
use crate::hub::TrackerFacts;
use crate::model::{TrackerId, TrackerState};
use sqlx::PgPool;

/// Not blocked: its state events are delivered.
pub const NORMAL: &str = "normal";
/// Blocked: lifecycle events only.
pub const BLOCKED: &str = "blocked";
/// No such tracker, removed, or another account's.
pub const UNKNOWN: &str = "unknown";
/// In the session's account, but a sub-user without a grant for it.
pub const DISALLOWED: &str = "disallowed";

/// One requested tracker: its id, its status, and (for `normal` and `blocked`) what the hub needs
/// to know of it.
pub type Status = (TrackerId, &'static str, Option<TrackerFacts>);

/// Each requested tracker's status for this session, in request order, in one query.
pub async fn statuses(
    pool: &PgPool,
    session: &SessionRow,
    ids: &[TrackerId],
) -> Result<Vec<Status>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = queries::tracker_access(pool, session.user_id, ids).await?;
    let by_id: HashMap<TrackerId, &queries::TrackerAccess> =
        rows.iter().map(|r| (r.id, r)).collect();
    Ok(ids
        .iter()
        .map(|&id| match by_id.get(&id) {
            Some(r) if r.account_id == Some(session.account_id) && r.removed == Some(false) => {
                let facts = TrackerFacts {
                    source_id: r.source_id.unwrap_or_default(),
                    account_id: session.account_id,
                    blocked: r.blocked.unwrap_or(false),
                    change_no: r.change_no.unwrap_or(0),
                };
                if session.is_sub_user && !r.granted {
                    (id, DISALLOWED, None)
                } else if facts.blocked {
                    (id, BLOCKED, Some(facts))
                } else {
                    (id, NORMAL, Some(facts))
                }
            }
            _ => (id, UNKNOWN, None),
        })
        .collect())
}

/// Statuses (one query) and the current states of the `normal` trackers (one query).
pub async fn snapshot(
    pool: &PgPool,
    session: &SessionRow,
    ids: &[TrackerId],
) -> Result<(Vec<Status>, Vec<TrackerState>), sqlx::Error> {
    let statuses = statuses(pool, session, ids).await?;
    // The source ids come with the statuses; the states' read leaves them out.
    let normal: HashMap<TrackerId, i64> = statuses
        .iter()
        .filter(|(_, s, _)| *s == NORMAL)
        .filter_map(|(id, _, facts)| Some((*id, facts.as_ref()?.source_id)))
        .collect();
    let mut states = if normal.is_empty() {
        Vec::new()
    } else {
        let ids: Vec<TrackerId> = normal.keys().copied().collect();
        queries::states_by_ids_unsourced(pool, &ids).await?
    };
    for s in &mut states {
        s.source_id = normal.get(&s.tracker_id).copied().unwrap_or_default();
    }
    Ok((statuses, states))
}
