//! Pools (DESIGN.md, "Pools"): one profile name served from several member profiles of
//! one provider.
//!
//! A request asks [`Pool::plan`] for the members to try, best first. A member is
//! *available* unless it is paused after a 429, at or over the highest `[usage] warn_at`
//! in any quota window (or refused outright by the provider), in `needs_login`, or without
//! a credential. The handlers try the available members in order, moving on only on a
//! failure another member can fix ([`moves_on`]) and only before anything reached the
//! client; when none is left they make one last attempt on a member that merely waits
//! (paused or over quota), which then behaves as a lone profile would (it waits out the
//! pause and retries).
//!
//! Strategies rank the available members: `fill-first` in config order, `round-robin` from
//! a cursor that moves one member per request, `least-used` by the highest share used of
//! any quota window (ties: fewest requests served by this pool, then config order). An agent
//! with a sticky member (set by its last answered request, for `sticky_secs`) gets that
//! member first while it is available.

use crate::config::{PoolConfig, Strategy};
use crate::profile::Profile;
use crate::sync::lock;
use llmd_proto::methods::{PoolMemberStatus, PoolStatus, ProfileState};
use llmd_proto::{ErrorKind, RpcError};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

/// Agents remembered per pool for stickiness; beyond it, expired entries are dropped and
/// then new agents are simply not stuck.
const MAX_STICKY_AGENTS: usize = 4096;

/// Why a member is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Skip {
    /// No credential, or the last attempt to get one failed.
    NoCredential,
    /// The login is dead.
    NeedsLogin,
    /// A quota window is at or over the highest `warn_at`, or the provider refuses it.
    OverQuota,
    /// Paused after a 429 (or a provider's zero-remaining signal).
    Paused,
}

impl Skip {
    /// The `status` spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NoCredential => "no_credential",
            Skip::NeedsLogin => "needs_login",
            Skip::OverQuota => "over_quota",
            Skip::Paused => "paused",
        }
    }

    /// True for members that come back by themselves (worth a last, waiting attempt).
    pub fn waits(self) -> bool {
        matches!(self, Skip::OverQuota | Skip::Paused)
    }
}

/// What the pool sees of one member when it picks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    /// Why it is skipped, if it is.
    pub skip: Option<Skip>,
    /// The highest share used of any current quota window (0 when none is known).
    pub level: f64,
}

impl View {
    /// Reads a member now; `skip_at` is the highest `[usage] warn_at`.
    pub fn of(p: &Profile, skip_at: f64) -> View {
        let (level, rejected) = p.quota.level(SystemTime::now());
        let skip = match p.health() {
            ProfileState::NeedsLogin => Some(Skip::NeedsLogin),
            ProfileState::Missing | ProfileState::Error => Some(Skip::NoCredential),
            _ if p.limiter.is_paused() => Some(Skip::Paused),
            _ if rejected || level >= skip_at => Some(Skip::OverQuota),
            _ => None,
        };
        View { skip, level }
    }
}

/// Ranks the available members (indices into `views`) by `strategy`. `start` is the
/// round-robin cursor, `served` the requests each member answered for this pool.
pub fn rank(strategy: Strategy, views: &[View], served: &[u64], start: usize) -> Vec<usize> {
    let n = views.len();
    let mut order: Vec<usize> = match strategy {
        Strategy::FillFirst | Strategy::LeastUsed => (0..n).collect(),
        Strategy::RoundRobin => (0..n).map(|k| (start + k) % n.max(1)).collect(),
    };
    order.retain(|&i| views[i].skip.is_none());
    if strategy == Strategy::LeastUsed {
        order.sort_by(|&a, &b| {
            views[a]
                .level
                .total_cmp(&views[b].level)
                .then(served.get(a).cmp(&served.get(b)))
                .then(a.cmp(&b))
        });
    }
    order
}

/// The last attempt when no available member answered: the first member (in config
/// order) that only has to wait, else `None`.
pub fn fallback(views: &[View]) -> Option<usize> {
    views.iter().position(|v| v.skip.is_some_and(Skip::waits))
}

/// True for failures another member may not have: a 429, a dead or missing login, a
/// refresh that failed. Anything else (a bad request, a provider error) would fail on
/// every member alike.
pub fn moves_on(e: &RpcError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::RateLimited
            | ErrorKind::NeedsLogin
            | ErrorKind::MissingCredential
            | ErrorKind::RefreshFailed
    )
}

/// Which agent keeps which member, until when.
#[derive(Debug, Default)]
pub struct Sticky {
    agents: Mutex<HashMap<String, (usize, Instant)>>,
}

impl Sticky {
    /// The member `agent` keeps at `now`, if its time has not run out.
    pub fn get(&self, agent: &str, now: Instant) -> Option<usize> {
        lock(&self.agents)
            .get(agent)
            .filter(|(_, until)| *until > now)
            .map(|(m, _)| *m)
    }

    /// Sticks `agent` to `member` for `secs` from `now`.
    pub fn set(&self, agent: &str, member: usize, now: Instant, secs: u64) {
        let mut agents = lock(&self.agents);
        if agents.len() >= MAX_STICKY_AGENTS && !agents.contains_key(agent) {
            agents.retain(|_, (_, until)| *until > now);
            if agents.len() >= MAX_STICKY_AGENTS {
                return;
            }
        }
        agents.insert(agent.to_owned(), (member, now + Duration::from_secs(secs)));
    }
}

/// One configured pool, built with the members of its registry generation.
#[derive(Debug)]
pub struct Pool {
    /// The pool's name.
    pub name: String,
    /// Its config.
    pub config: PoolConfig,
    /// The member profiles, in config order.
    pub members: Vec<Arc<Profile>>,
    skip_at: f64,
    cursor: AtomicUsize,
    served: Vec<AtomicU64>,
    sticky: Sticky,
}

impl Pool {
    /// A pool of `members`; `skip_at` is the highest `[usage] warn_at`.
    pub fn new(name: &str, config: PoolConfig, members: Vec<Arc<Profile>>, skip_at: f64) -> Pool {
        let served = members.iter().map(|_| AtomicU64::new(0)).collect();
        Pool {
            name: name.to_owned(),
            config,
            members,
            skip_at,
            cursor: AtomicUsize::new(0),
            served,
            sticky: Sticky::default(),
        }
    }

    fn views(&self) -> Vec<View> {
        self.members
            .iter()
            .map(|m| View::of(m, self.skip_at))
            .collect()
    }

    /// The available members to try for one request of `agent`, best first.
    pub fn plan(&self, agent: Option<&str>) -> Vec<usize> {
        let views = self.views();
        let stuck = agent
            .filter(|_| self.config.sticky_secs.is_some())
            .and_then(|a| self.sticky.get(a, Instant::now()))
            .filter(|&m| views.get(m).is_some_and(|v| v.skip.is_none()));
        let start = match (self.config.strategy, stuck) {
            // A stuck agent does not move the cursor: the others keep their rotation.
            (Strategy::RoundRobin, None) => self.cursor.fetch_add(1, Ordering::Relaxed),
            _ => self.cursor.load(Ordering::Relaxed),
        };
        let served: Vec<u64> = self
            .served
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect();
        let mut available = rank(self.config.strategy, &views, &served, start);
        if let Some(m) = stuck {
            available.retain(|&i| i != m);
            available.insert(0, m);
        }
        available
    }

    /// The last attempt after every available member failed (views read anew: a member
    /// that just got a 429 is paused now).
    pub fn fallback(&self) -> Option<usize> {
        fallback(&self.views())
    }

    /// Notes that `member` answered a request of `agent`.
    pub fn served(&self, member: usize, agent: Option<&str>) {
        if let Some(s) = self.served.get(member) {
            s.fetch_add(1, Ordering::Relaxed);
        }
        if let (Some(a), Some(secs)) = (agent, self.config.sticky_secs) {
            self.sticky.set(a, member, Instant::now(), secs);
        }
    }

    /// The pool's entry in `status`.
    pub fn status(&self) -> PoolStatus {
        let views = self.views();
        PoolStatus {
            name: self.name.clone(),
            strategy: self.config.strategy.as_str().into(),
            sticky_secs: self.config.sticky_secs,
            members: self
                .members
                .iter()
                .zip(&views)
                .zip(&self.served)
                .map(|((m, v), s)| PoolMemberStatus {
                    name: m.name.clone(),
                    available: v.skip.is_none(),
                    skipped: v.skip.map(|s| s.as_str().to_owned()),
                    served: s.load(Ordering::Relaxed),
                })
                .collect(),
        }
    }

    /// The provider every member shares.
    pub fn provider(&self) -> Option<crate::config::Provider> {
        self.members.first().map(|m| m.config.provider)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(level: f64) -> View {
        View { skip: None, level }
    }

    fn skipped(s: Skip) -> View {
        View {
            skip: Some(s),
            level: 0.0,
        }
    }

    #[test]
    fn fill_first_takes_the_first_available_in_config_order() {
        let v = [skipped(Skip::Paused), ok(0.9), ok(0.1)];
        assert_eq!(rank(Strategy::FillFirst, &v, &[0, 0, 0], 7), vec![1, 2]);
    }

    #[test]
    fn round_robin_starts_one_member_further_each_time() {
        let v = [ok(0.0), ok(0.0), ok(0.0)];
        let firsts: Vec<usize> = (0..6)
            .map(|start| rank(Strategy::RoundRobin, &v, &[0; 3], start)[0])
            .collect();
        assert_eq!(firsts, vec![0, 1, 2, 0, 1, 2]);
        let v = [ok(0.0), skipped(Skip::NeedsLogin), ok(0.0)];
        assert_eq!(rank(Strategy::RoundRobin, &v, &[0; 3], 1), vec![2, 0]);
    }

    #[test]
    fn least_used_takes_the_lowest_quota_then_the_least_served() {
        let v = [ok(0.5), ok(0.2), ok(0.7)];
        assert_eq!(rank(Strategy::LeastUsed, &v, &[0, 9, 0], 0), vec![1, 0, 2]);
        let v = [ok(0.0), ok(0.0), ok(0.0)];
        assert_eq!(rank(Strategy::LeastUsed, &v, &[3, 1, 2], 0), vec![1, 2, 0]);
    }

    #[test]
    fn the_fallback_is_a_member_that_only_waits() {
        let v = [
            skipped(Skip::NeedsLogin),
            skipped(Skip::Paused),
            skipped(Skip::OverQuota),
        ];
        assert_eq!(fallback(&v), Some(1));
        assert_eq!(
            fallback(&[skipped(Skip::NoCredential), skipped(Skip::NeedsLogin)]),
            None
        );
    }

    #[test]
    fn moves_on_only_for_what_another_member_can_fix() {
        assert!(moves_on(&RpcError::new(ErrorKind::RateLimited, "429")));
        assert!(moves_on(&RpcError::new(ErrorKind::NeedsLogin, "dead")));
        assert!(!moves_on(&RpcError::invalid_params("bad")));
        assert!(!moves_on(&RpcError::new(ErrorKind::Upstream, "500")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_sticky_agent_keeps_its_member_until_its_time_runs_out() {
        let s = Sticky::default();
        s.set("agent/1", 2, Instant::now(), 60);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(s.get("agent/1", Instant::now()), Some(2));
        assert_eq!(s.get("other/1", Instant::now()), None);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(s.get("agent/1", Instant::now()), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sticky_table_is_bounded() {
        let s = Sticky::default();
        let now = Instant::now();
        for i in 0..MAX_STICKY_AGENTS + 10 {
            s.set(&format!("a{i}"), 0, now, 60);
        }
        assert_eq!(lock(&s.agents).len(), MAX_STICKY_AGENTS);
        tokio::time::advance(Duration::from_secs(61)).await;
        s.set("late", 1, Instant::now(), 60);
        assert_eq!(s.get("late", Instant::now()), Some(1));
        assert_eq!(lock(&s.agents).len(), 1);
    }
}
